//! Offline checks of a finished image: each gives what was expected and what was found.

use super::{chroot, target};
use crate::command::{self, Input};
use crate::job::Job;
use imgvm_protocol::{Check, CheckResult, ErrorKind, FileExpect, Handle, OperationError, RunChecks};
use std::os::unix::fs::MetadataExt;

impl Handle<RunChecks> for Job<'_> {
    fn handle(&self, op: RunChecks) -> Result<Vec<CheckResult>, OperationError> {
        let job = self;
        let RunChecks(checks) = &op;
        checks.iter().map(|check| one(job, check)).collect()
    }
}

fn result(passed: bool, expected: impl Into<String>, actual: impl Into<String>) -> CheckResult {
    CheckResult {
        passed,
        expected: expected.into(),
        actual: actual.into(),
    }
}

fn one(job: &Job, check: &Check) -> Result<CheckResult, OperationError> {
    Ok(match check {
        Check::File { path, expect } => file(job, path, expect)?,
        Check::Package { name, version } => {
            let query = chroot(&["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", name]);
            let actual = match command::run(job, &query, Input::Null, true) {
                Ok(out) => String::from_utf8_lossy(&out).trim().to_owned(),
                Err(e) if e.kind == ErrorKind::CommandFailed => "not installed".to_owned(),
                Err(e) => return Err(e),
            };
            let (status, installed_version) = actual.split_once(' ').unwrap_or((&actual, ""));
            let expected = match version {
                Some(v) => format!("installed {v}"),
                None => "installed".to_owned(),
            };
            let passed = status == "installed" && version.as_ref().is_none_or(|v| v == installed_version);
            result(passed, expected, actual)
        }
        Check::ServiceEnabled { name } => {
            let query = chroot(&["systemctl", "is-enabled", name]);
            // is-enabled exits non-zero for anything but enabled; its answer is on stdout.
            let actual = match command::run(job, &query, Input::Null, true) {
                Ok(out) => String::from_utf8_lossy(&out).trim().to_owned(),
                Err(e) if e.kind == ErrorKind::CommandFailed => {
                    e.stderr_tail.last().cloned().unwrap_or_else(|| "not enabled".into())
                }
                Err(e) => return Err(e),
            };
            result(actual == "enabled", "enabled", actual)
        }
        // Its output goes to stderr, whose last line is the failure's explanation.
        Check::Command { script } => match command::run(
            job,
            &chroot(&["sh", "-c", &format!("exec 1>&2\n{script}")]),
            Input::Null,
            true,
        ) {
            Ok(_) => result(true, "exit status 0", "exit status 0"),
            Err(e) if e.kind == ErrorKind::CommandFailed => {
                let mut actual = format!("exit status {}", e.exit_code.unwrap_or(-1));
                if let Some(line) = e.stderr_tail.last() {
                    actual.push_str(&format!(": {line}"));
                }
                result(false, "exit status 0", actual)
            }
            Err(e) => return Err(e),
        },
    })
}

fn file(job: &Job, path: &str, expect: &FileExpect) -> Result<CheckResult, OperationError> {
    let full = target(job, path)?;
    let meta = std::fs::symlink_metadata(&full).ok();
    let missing = || result(false, describe(expect), "does not exist");
    Ok(match expect {
        FileExpect::Exists => match meta {
            Some(_) => result(true, "exists", "exists"),
            None => missing(),
        },
        FileExpect::Absent => match meta {
            Some(m) => result(false, "absent", format!("exists ({})", kind(&m))),
            None => result(true, "absent", "absent"),
        },
        FileExpect::Empty => match meta {
            Some(m) if m.is_dir() => {
                let entries: Vec<String> = std::fs::read_dir(&full)
                    .map_err(|e| job.io_error(&e))?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                let actual = if entries.is_empty() {
                    "empty".to_owned()
                } else {
                    format!("{} entries: {}", entries.len(), first_few(&entries))
                };
                result(entries.is_empty(), "empty", actual)
            }
            Some(m) => result(m.len() == 0, "empty", format!("{} bytes", m.len())),
            None => missing(),
        },
        FileExpect::ContainsLine(line) => match std::fs::read(&full) {
            Ok(text) => {
                let text = String::from_utf8_lossy(&text);
                let found = text.lines().any(|l| l.trim_end() == line.trim_end());
                let actual = if found {
                    "has the line".to_owned()
                } else {
                    format!("no such line in {} lines", text.lines().count())
                };
                result(found, format!("a line `{line}`"), actual)
            }
            Err(_) => missing(),
        },
        FileExpect::Matches(pattern) => {
            if meta.is_none() {
                return Ok(missing());
            }
            let grep = chroot(&["grep", "-E", "-m", "1", "--", pattern, path]);
            match command::run(job, &grep, Input::Null, true) {
                Ok(out) => result(
                    true,
                    format!("a line matching `{pattern}`"),
                    String::from_utf8_lossy(&out).trim().to_owned(),
                ),
                Err(e) if e.exit_code == Some(1) => {
                    result(false, format!("a line matching `{pattern}`"), "no line matches")
                }
                Err(e) => return Err(e),
            }
        }
        FileExpect::Mode(mode) => match meta {
            Some(m) => {
                let actual = m.mode() & 0o7777;
                result(
                    actual == *mode,
                    format!("mode {mode:04o}"),
                    format!("mode {actual:04o}"),
                )
            }
            None => missing(),
        },
        FileExpect::Owner(owner) => match meta {
            Some(m) => {
                let user = name_of(job, "/etc/passwd", m.uid())?;
                let group = name_of(job, "/etc/group", m.gid())?;
                let actual = format!("{user}:{group}");
                let wanted = if owner.contains(':') {
                    owner.clone()
                } else {
                    format!("{owner}:{group}")
                };
                result(actual == wanted, format!("owner {owner}"), format!("owner {actual}"))
            }
            None => missing(),
        },
    })
}

fn describe(expect: &FileExpect) -> String {
    match expect {
        FileExpect::Exists => "exists".into(),
        FileExpect::Absent => "absent".into(),
        FileExpect::Empty => "empty".into(),
        FileExpect::ContainsLine(l) => format!("a line `{l}`"),
        FileExpect::Matches(p) => format!("a line matching `{p}`"),
        FileExpect::Mode(m) => format!("mode {m:04o}"),
        FileExpect::Owner(o) => format!("owner {o}"),
    }
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    if meta.is_dir() {
        "a directory"
    } else if meta.file_type().is_symlink() {
        "a symlink"
    } else {
        "a file"
    }
}

fn first_few(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    if names.len() > shown.len() {
        shown.push("…");
    }
    shown.join(", ")
}

/// The name for numeric id `id` in the image's passwd or group file, else the number.
fn name_of(job: &Job, file: &str, id: u32) -> Result<String, OperationError> {
    let text = std::fs::read_to_string(target(job, file)?).unwrap_or_default();
    Ok(text
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_owned())
        })
        .unwrap_or_else(|| id.to_string()))
}
