//! Offline checks of a finished image: each gives what was expected and what was found.
//! Checks that read files do only that; programs (command checks, grep, dpkg-query,
//! systemctl) run chrooted in a read-only view of the tree, so that no check can change
//! the image it judges: a build with `--test` seals the same bytes as
//! one without, and `imgvm test --checks` leaves a finished image as it was.

use super::target;
use super::view::View;
use crate::command::{self, Input};
use crate::job::Job;
use imgvm_protocol::{
    AccountDatabase, AccountExpect, Check, CheckResult, ErrorKind, FileExpect, FileKind, Handle, OperationError,
    RunChecks,
};
use std::os::unix::fs::MetadataExt;

/// Where the image is seen while checks run.
const CHECKS_VIEW: &str = "/run/imgvm-checks";

impl Handle<RunChecks> for Job<'_> {
    fn handle(&self, op: RunChecks) -> Result<Vec<CheckResult>, OperationError> {
        let RunChecks(checks) = &op;
        let view = View::mount(self, CHECKS_VIEW, false)?;
        let results = checks.iter().map(|check| one(&view, check)).collect();
        view.unmount()?;
        results
    }
}

fn result(passed: bool, expected: impl Into<String>, actual: impl Into<String>) -> CheckResult {
    CheckResult {
        passed,
        expected: expected.into(),
        actual: actual.into(),
    }
}

fn one(view: &View, check: &Check) -> Result<CheckResult, OperationError> {
    let job = view.job;
    Ok(match check {
        Check::File { path, expect, optional } => {
            let present = std::fs::symlink_metadata(view.path(path)?).is_ok();
            if *optional && !present {
                result(true, format!("{} if present", describe(expect)), "absent")
            } else {
                file(view, path, expect)?
            }
        }
        Check::Glob { pattern, absent } => {
            let found = glob(view, pattern)?;
            let actual = if found.is_empty() {
                "no match".to_owned()
            } else {
                format!("{} matches: {}", found.len(), first_few(&found))
            };
            let expected = if *absent { "no match" } else { "a match" };
            result(found.is_empty() == *absent, expected, actual)
        }
        Check::Accounts { database, expect } => accounts(view, *database, expect)?,
        Check::Package { name, version } => {
            let query = view.chroot(&["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", name]);
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
            let query = view.chroot(&["systemctl", "is-enabled", name]);
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
            &view.chroot(&["sh", "-c", &format!("exec 1>&2\n{script}")]),
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

fn file(view: &View, path: &str, expect: &FileExpect) -> Result<CheckResult, OperationError> {
    let job = view.job;
    let full = view.path(path)?;
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
            let grep = view.chroot(&["grep", "-E", "-m", "1", "--", pattern, path]);
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
                let user = name_of(view, "/etc/passwd", m.uid())?;
                let group = name_of(view, "/etc/group", m.gid())?;
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
        FileExpect::Kind(want) => match meta {
            Some(m) => {
                let is = if m.file_type().is_symlink() {
                    FileKind::Symlink
                } else if m.is_dir() {
                    FileKind::Directory
                } else {
                    FileKind::File
                };
                result(is == *want, describe(expect), kind(&m))
            }
            None => missing(),
        },
        FileExpect::Content(wanted) => match std::fs::read(&full) {
            Ok(bytes) if bytes == wanted.as_bytes() => result(true, describe(expect), "that content"),
            Ok(bytes) => {
                let shown: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
                result(false, describe(expect), format!("{} bytes: {shown:?}", bytes.len()))
            }
            Err(_) => missing(),
        },
        FileExpect::Only(allowed) => match meta {
            Some(m) if m.is_dir() => {
                let others: Vec<String> = std::fs::read_dir(&full)
                    .map_err(|e| job.io_error(&e))?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| !allowed.contains(name))
                    .collect();
                let actual = if others.is_empty() {
                    "nothing else".to_owned()
                } else {
                    format!("also {}", first_few(&others))
                };
                result(others.is_empty(), describe(expect), actual)
            }
            Some(m) => result(false, describe(expect), kind(&m)),
            None => missing(),
        },
    })
}

/// The paths in the image that match `pattern`, component by component, sorted.
fn glob(view: &View, pattern: &str) -> Result<Vec<String>, OperationError> {
    target(view.job, pattern)?;
    let mut found = vec![String::new()];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            if !component.contains(['*', '?', '[']) {
                let path = format!("{dir}/{component}");
                if std::fs::symlink_metadata(format!("{}{path}", view.job.root)).is_ok() {
                    next.push(path);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(format!("{}{dir}/", view.job.root)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if fnmatch(component, &name) {
                    next.push(format!("{dir}/{name}"));
                }
            }
        }
        found = next;
    }
    found.sort();
    Ok(found)
}

/// fnmatch(3) with `FNM_PERIOD`: a leading dot is matched only by a dot.
fn fnmatch(pattern: &str, name: &str) -> bool {
    let (Ok(pattern), Ok(name)) = (std::ffi::CString::new(pattern), std::ffi::CString::new(name)) else {
        return false;
    };
    // SAFETY: both are NUL-terminated strings that outlive the call.
    unsafe { libc::fnmatch(pattern.as_ptr(), name.as_ptr(), libc::FNM_PERIOD) == 0 }
}

/// An expectation about every entry of the image's passwd or group file.
fn accounts(view: &View, database: AccountDatabase, expect: &AccountExpect) -> Result<CheckResult, OperationError> {
    let file = match database {
        AccountDatabase::Passwd => "/etc/passwd",
        AccountDatabase::Group => "/etc/group",
    };
    Ok(match std::fs::read_to_string(view.path(file)?) {
        Ok(text) => judge_accounts(file, &text, expect),
        Err(_) => result(false, format!("{file} readable"), "does not exist"),
    })
}

fn judge_accounts(file: &str, text: &str, expect: &AccountExpect) -> CheckResult {
    // name:password:id:..., and for passwd the shell last.
    let entries: Vec<(&str, &str, &str)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (
                fields[0],
                fields.get(2).copied().unwrap_or(""),
                fields.get(6).copied().unwrap_or(""),
            )
        })
        .collect();
    let offenders: Vec<String> = match expect {
        AccountExpect::Present(names) => names
            .iter()
            .filter(|n| !entries.iter().any(|(name, ..)| name == n))
            .cloned()
            .collect(),
        AccountExpect::Names { names, prefixes } => entries
            .iter()
            .filter(|(name, ..)| {
                !names.iter().any(|n| n == name) && !prefixes.iter().any(|p| name.starts_with(p.as_str()))
            })
            .map(|(name, ..)| name.to_string())
            .collect(),
        AccountExpect::Ids { below, also } => entries
            .iter()
            .filter(|(_, id, _)| id.parse::<u32>().map_or(true, |id| id >= *below && !also.contains(&id)))
            .map(|(name, id, _)| format!("{name} ({id})"))
            .collect(),
        AccountExpect::Shells(rules) => entries
            .iter()
            .filter(|(name, _, shell)| {
                !rules
                    .iter()
                    .filter(|(who, _)| who == name || who == "*")
                    .any(|(_, shells)| shells.iter().any(|s| s == shell))
            })
            .map(|(name, _, shell)| format!("{name} ({shell})"))
            .collect(),
    };
    let expected = match expect {
        AccountExpect::Present(names) => format!("{file} has {}", names.join(", ")),
        AccountExpect::Names { .. } => format!("only allowed names in {file}"),
        AccountExpect::Ids { below, also } => format!("ids below {below} (or {also:?}) in {file}"),
        AccountExpect::Shells(_) => format!("allowed shells in {file}"),
    };
    let actual = if offenders.is_empty() {
        format!("{} entries, all as expected", entries.len())
    } else {
        let what = match expect {
            AccountExpect::Present(_) => "missing",
            _ => "not allowed",
        };
        format!("{what}: {}", offenders.join(", "))
    };
    result(offenders.is_empty(), expected, actual)
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
        FileExpect::Kind(k) => format!("{k:?}").to_lowercase(),
        FileExpect::Content(c) => format!("content {c:?}"),
        FileExpect::Only(names) => format!("only {}", names.join(", ")),
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
fn name_of(view: &View, file: &str, id: u32) -> Result<String, OperationError> {
    let text = std::fs::read_to_string(view.path(file)?).unwrap_or_default();
    Ok(text
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_owned())
        })
        .unwrap_or_else(|| id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::with_test_job;

    fn run_in(tree: &std::path::Path, check: Check) -> CheckResult {
        with_test_job(tree, |job| {
            let view = View::of_tree(job);
            one(&view, &check).unwrap()
        })
    }

    fn file_check(path: &str, expect: FileExpect, optional: bool) -> Check {
        Check::File {
            path: path.into(),
            expect,
            optional,
        }
    }

    #[test]
    fn kinds_content_and_only_see_what_is_there() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        std::fs::create_dir_all(root.join("var/log/journal")).unwrap();
        std::fs::write(root.join("var/log/README"), "").unwrap();
        std::fs::create_dir_all(root.join("etc/default")).unwrap();
        std::fs::write(root.join("etc/default/locale"), "LANG=C.UTF-8\n").unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", root.join("etc/resolv.conf")).unwrap();

        let only = |names: &[&str]| FileExpect::Only(names.iter().map(|n| n.to_string()).collect());
        assert!(run_in(root, file_check("/var/log", only(&["journal", "README"]), false)).passed);
        let extra = run_in(root, file_check("/var/log", only(&["journal"]), false));
        assert!(!extra.passed);
        assert_eq!(extra.actual, "also README");

        let content = |c: &str| FileExpect::Content(c.into());
        assert!(
            run_in(
                root,
                file_check("/etc/default/locale", content("LANG=C.UTF-8\n"), false)
            )
            .passed
        );
        // A missing newline is a different content.
        assert!(!run_in(root, file_check("/etc/default/locale", content("LANG=C.UTF-8"), false)).passed);

        // A dangling symlink is a symlink, not missing, and not a file.
        let symlink = FileExpect::Kind(FileKind::Symlink);
        assert!(run_in(root, file_check("/etc/resolv.conf", symlink.clone(), false)).passed);
        assert!(
            !run_in(
                root,
                file_check("/etc/resolv.conf", FileExpect::Kind(FileKind::File), false)
            )
            .passed
        );
        assert!(!run_in(root, file_check("/etc/default", symlink.clone(), false)).passed);
        // Optional: absent passes, present must still hold.
        assert!(run_in(root, file_check("/etc/nothing", symlink.clone(), true)).passed);
        assert!(!run_in(root, file_check("/etc/nothing", symlink, false)).passed);
        assert!(
            !run_in(
                root,
                file_check("/etc/default/locale", FileExpect::Kind(FileKind::Directory), true)
            )
            .passed
        );
    }

    #[test]
    fn globs_match_per_component_and_not_hidden_names() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot/vmlinuz-6.12-cloud-amd64"), "").unwrap();
        std::fs::write(root.join("boot/.vmlinuz-hidden"), "").unwrap();
        let glob = |pattern: &str, absent: bool| {
            run_in(
                root,
                Check::Glob {
                    pattern: pattern.into(),
                    absent,
                },
            )
        };
        let found = glob("/boot/vmlinu[xz]*", false);
        assert!(found.passed);
        assert_eq!(found.actual, "1 matches: /boot/vmlinuz-6.12-cloud-amd64");
        assert!(!glob("/boot/initrd.img*", false).passed);
        assert!(glob("/boot/initrd.img*", true).passed);
        assert!(!glob("/b*/vmlinuz-*", true).passed);
        assert!(glob("/boot/*hidden", true).passed);
    }

    #[test]
    fn account_rules_name_every_offender() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nsync:x:4:65534:sync:/bin:/bin/sync\n\
                      _apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n\
                      debian:x:1000:1000::/home/debian:/bin/bash\nnobody:x:65534:65534::/:/usr/sbin/nologin\n";
        let judge = |expect: AccountExpect| judge_accounts("/etc/passwd", passwd, &expect);
        let names = judge(AccountExpect::Names {
            names: vec!["root".into(), "sync".into(), "nobody".into()],
            prefixes: vec!["_".into()],
        });
        assert!(!names.passed);
        assert_eq!(names.actual, "not allowed: debian");
        let ids = judge(AccountExpect::Ids {
            below: 1000,
            also: vec![65534],
        });
        assert_eq!(ids.actual, "not allowed: debian (1000)");
        let shells = judge(AccountExpect::Shells(vec![
            ("root".into(), vec!["/bin/bash".into()]),
            ("sync".into(), vec!["/bin/sync".into()]),
            ("*".into(), vec!["/usr/sbin/nologin".into()]),
        ]));
        assert_eq!(shells.actual, "not allowed: debian (/bin/bash)");
        let present = judge(AccountExpect::Present(vec!["root".into(), "gnats".into()]));
        assert_eq!(present.actual, "missing: gnats");
        assert!(judge(AccountExpect::Present(vec!["root".into(), "nobody".into()])).passed);
    }
}
