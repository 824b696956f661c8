//! What a boot test boots: a throw-away qcow2 overlay of the image into which a helper
//! VM has written a one-shot unit that waits for systemd to finish starting the system,
//! then prints the marker, the system's state and the failed units on the console. So a
//! boot is judged the same way for every image, with or without cloud-init, with root
//! locked or not, and without logging in; the image itself is never written.

use crate::helper::{Helper, HelperOptions};
use crate::recipe::{Partition, TableKind};
use anyhow::{bail, Context, Result};
use imgvm_protocol::{Check, CheckResult, RunChecks, Unmount, WriteFile};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// The files written into the overlay: the report script, its unit, and the drop-in that
/// has the default target want it (regular files only, so no `systemctl` is needed).
const SCRIPT: &str = "/etc/imgvm-boot-report";
const UNIT: &str = "/etc/systemd/system/imgvm-boot-report.service";
const WANTS: &str = "/etc/systemd/system/multi-user.target.d/imgvm-boot-report.conf";

/// Waits for systemd to finish starting the system, for at most `SETTLE_LIMIT`: a unit
/// that waits for its cloud (GCE's guest agent for the metadata server) may never finish
/// starting on qemu, and the console stays silent meanwhile. Then (for at most 30 s) it
/// waits for what is still starting or stopping: a unit that failed and is being
/// restarted is neither failed nor running until it settles. Prints one line, naming
/// the failed units and the units whose start was still running, on every console the
/// kernel has: `/dev/console` is only the last `console=` of the command line, which
/// need not be the serial port the test reads (EC2's arm64 images name Graviton's
/// ttyS0 last, which qemu's virt machine does not have). The script computes the
/// marker's number, so the marker itself is in no file.
const SCRIPT_TEXT: &str = r#"# imgvm's boot test: how the boot ended, on the console.
timeout @SETTLE@ systemctl is-system-running --wait > /dev/null
if [ $? -ne 124 ]; then
    for i in $(seq 30); do
        [ -z "$(systemctl list-units --state=activating,deactivating --plain --no-legend --no-pager)" ] && break
        sleep 1
    done
fi
failed=$(systemctl list-units --state=failed,auto-restart --plain --no-legend --no-pager |
    while read -r unit rest; do printf '%s ' "$unit"; done)
stuck=$(systemctl list-jobs --plain --no-legend --no-pager |
    while read -r job unit type state rest; do [ "$state" = running ] && printf '%s ' "$unit"; done)
state=$(systemctl is-system-running)
report=$(printf '%s state=%s failed=%s stuck=%s' "imgvm-boot-$((6*7))-@TOKEN@" "$state" "$failed" "$stuck")
for console in $(cat /sys/class/tty/console/active 2>/dev/null) console; do
    printf '\n%s\n' "$report" > "/dev/$console" 2>/dev/null
done
"#;

/// How long the report waits for systemd to finish starting the system: well inside the
/// boot test's limit of console silence, so that a unit that never finishes starting is
/// named instead of the boot timing out.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// `Type=exec`: the unit's start job ends once the script runs, so the boot it waits for
/// can finish.
const UNIT_TEXT: &str = "[Unit]
Description=imgvm boot test: report how the boot ended

[Service]
Type=exec
ExecStart=/bin/sh /etc/imgvm-boot-report
";

const WANTS_TEXT: &str = "[Unit]\nWants=imgvm-boot-report.service\n";

/// The longest report line read from the console; a longer one is cut there.
const REPORT_LIMIT: usize = 8 * 1024;

/// An image ready to be booted for a test, on any number of firmwares: each boot
/// attaches the overlay as a snapshot, so each starts from the same first boot.
pub struct Probe {
    /// Holds the overlay; removed with the probe.
    _dir: tempfile::TempDir,
    pub overlay: PathBuf,
    /// What the report line starts with; never in any file the guest has, so an echo of
    /// the script cannot pass for it.
    marker: String,
    /// The NoCloud seed's instance, new for every probe.
    pub instance_id: String,
    /// Whether the first sector has code for a BIOS to run: without it, a BIOS boot
    /// hangs in silence.
    pub bios_boot_code: bool,
    /// The results of the offline checks asked for, one per check, in their order: run
    /// on the image as it is, before the report unit is written.
    pub checks: Vec<CheckResult>,
}

/// How the boot ended, as the report unit saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// `systemctl is-system-running` once starting ended: `running`, `degraded`, ...
    pub state: String,
    /// Failed units, and units that failed and are being restarted.
    pub failed: Vec<String>,
    /// Units whose start job was still running when the report gave up waiting.
    pub stuck: Vec<String>,
}

impl Probe {
    /// Makes the overlay of `image` and has a helper VM (`helper`, whose disks are
    /// replaced) write the report unit into the image's filesystems, as `table` and
    /// `partitions` (the manifest's) lay them out.
    pub async fn prepare(
        image: &Path,
        table: TableKind,
        partitions: &[Partition],
        checks: Vec<Check>,
        mut helper: HelperOptions,
        cancel: &CancellationToken,
    ) -> Result<Probe> {
        let dir = tempfile::Builder::new().prefix("imgvm-test-").tempdir()?;
        let overlay = dir.path().join("overlay.qcow2");
        let image = std::fs::canonicalize(image).with_context(|| format!("cannot open {}", image.display()))?;
        let format = crate::vm::qemu::disk_format(&image)?;
        let status = crate::child::command("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(&image)
            .arg(&overlay)
            .status()
            .await
            .context("cannot run qemu-img (see `imgvm doctor`)")?;
        if !status.success() {
            bail!("qemu-img could not make an overlay of {} ({status})", image.display());
        }
        let boot_code = dir.path().join("boot-code");
        let status = crate::child::command("qemu-img")
            .args(["dd", "-f", "qcow2", "-O", "raw", "bs=440", "count=1"])
            .arg(arg("if=", &overlay))
            .arg(arg("of=", &boot_code))
            .status()
            .await?;
        if !status.success() {
            bail!(
                "qemu-img could not read the first sector of {} ({status})",
                image.display()
            );
        }
        let bios_boot_code = std::fs::read(&boot_code)?.iter().any(|&b| b != 0);

        let token = format!(
            "{:016x}",
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        );
        let script = SCRIPT_TEXT
            .replace("@TOKEN@", &token)
            .replace("@SETTLE@", &SETTLE_LIMIT.as_secs().to_string());
        helper.disks = vec![overlay.clone()];
        helper.read_only = false;
        let fetcher = crate::archive::Fetcher::default();
        let helper = tokio::select! {
            helper = Helper::boot(&helper, &fetcher) => helper?,
            _ = cancel.cancelled() => bail!("cancelled while starting the helper VM"),
        };
        let written = async {
            crate::shell::mount(&helper.session, table, partitions, cancel).await?;
            let results = match checks.is_empty() {
                true => Vec::new(),
                false => helper.session.image(RunChecks(checks), None, |_| {}, cancel).await??,
            };
            for (path, text, mode) in [
                (SCRIPT, script.as_str(), 0o755),
                (UNIT, UNIT_TEXT, 0o644),
                (WANTS, WANTS_TEXT, 0o644),
            ] {
                let op = WriteFile {
                    path: path.into(),
                    mode,
                    owner: "0:0".into(),
                };
                let input = Box::new(std::io::Cursor::new(text.as_bytes().to_vec()));
                helper.session.image(op, Some(input), |_| {}, cancel).await??;
            }
            helper
                .session
                .image(Unmount { trim: false }, None, |_| {}, cancel)
                .await??;
            Ok::<_, anyhow::Error>(results)
        }
        .await;
        let shutdown = helper.shutdown().await;
        let checks = written.context("checking the image and writing the boot test's report unit into its overlay")?;
        shutdown?;
        Ok(Probe {
            _dir: dir,
            overlay,
            marker: format!("imgvm-boot-42-{token}"),
            instance_id: format!("imgvm-{token}"),
            bios_boot_code,
            checks,
        })
    }

    /// The report on `console`, once its whole line has arrived.
    pub fn report(&self, console: &str) -> Option<Report> {
        report(console, &self.marker)
    }
}

/// `name` followed by `path`: one of qemu-img dd's operands.
fn arg(name: &str, path: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(name);
    arg.push(path);
    arg
}

fn report(console: &str, marker: &str) -> Option<Report> {
    let start = console.find(marker)? + marker.len();
    let rest = &console[start..];
    let line = &rest[..rest.find('\n')?];
    let cut = (0..=line.len().min(REPORT_LIMIT))
        .rev()
        .find(|&i| line.is_char_boundary(i));
    let line = &line[..cut.unwrap_or(0)];
    let (state, units) = line.trim().strip_prefix("state=")?.split_once(" failed=")?;
    let (failed, stuck) = units.split_once("stuck=")?;
    // Only what a unit name can hold: anything else is not the guest's unit list.
    let units = |list: &str| {
        list.split_whitespace()
            .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c)))
            .map(str::to_owned)
            .collect()
    };
    Some(Report {
        state: crate::text::printable(state).into_owned(),
        failed: units(failed),
        stuck: units(stuck),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_report_line_once_whole() {
        let marker = "imgvm-boot-42-00ff";
        let units = |names: &[&str]| names.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        assert_eq!(
            report("[  OK  ] Reached target\nimgvm-boot-42-00ff state=runn", marker),
            None
        );
        assert_eq!(
            report(
                "\nimgvm-boot-42-00ff state=running failed= stuck=\nlocalhost login: ",
                marker
            ),
            Some(Report {
                state: "running".into(),
                failed: vec![],
                stuck: vec![],
            })
        );
        assert_eq!(
            report(
                "imgvm-boot-42-00ff state=degraded failed=broken.service ssh.socket \u{1b}[0m  stuck=\n",
                marker
            ),
            Some(Report {
                state: "degraded".into(),
                failed: units(&["broken.service", "ssh.socket"]),
                stuck: vec![],
            })
        );
        assert_eq!(
            report(
                "imgvm-boot-42-00ff state=starting failed= stuck=google-guest-agent.service \n",
                marker
            ),
            Some(Report {
                state: "starting".into(),
                failed: vec![],
                stuck: units(&["google-guest-agent.service"]),
            })
        );
        assert_eq!(
            report("imgvm-boot-42-00fe state=running failed= stuck=\n", marker),
            None
        );
    }

    /// The report script itself, run by `sh` against a stand-in `systemctl` whose start
    /// of the system never ends: it names the failed unit and the one still starting.
    #[test]
    fn the_script_names_failed_units_and_starts_that_never_end() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = |name: &str, text: &str| {
            use std::os::unix::fs::PermissionsExt;
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{text}")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        tool("timeout", "[ \"$1\" = 180 ] || exit 2\nexit 124\n");
        tool(
            "systemctl",
            r#"case "$*" in
is-system-running) echo starting; exit 1 ;;
"list-units --state=failed,auto-restart "*) echo "broken.service loaded failed failed Broken" ;;
"list-jobs "*) printf '  1 multi-user.target start waiting\n  7 google-guest-agent.service start running\n' ;;
*) echo "unexpected: $*" >&2; exit 1 ;;
esac
"#,
        );
        // The kernel's consoles: one that this machine does not have, then the serial port.
        let active = dir.path().join("active");
        std::fs::write(&active, "ttyS0 ttyAMA0\n").unwrap();
        let dev = dir.path().join("dev");
        std::fs::create_dir(&dev).unwrap();
        let console = dev.join("ttyAMA0");
        std::fs::write(&console, "").unwrap();
        let script = SCRIPT_TEXT
            .replace("@TOKEN@", "00ff")
            .replace("@SETTLE@", &SETTLE_LIMIT.as_secs().to_string())
            .replace("/sys/class/tty/console/active", active.to_str().unwrap())
            .replace("\"/dev/$console\"", &format!("\"{}/$console\"", dev.display()));
        let path = format!("{}:/usr/bin:/bin", bin.display());
        let ran = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
        assert!(ran.stderr.is_empty(), "{}", String::from_utf8_lossy(&ran.stderr));
        let said = std::fs::read_to_string(&console).unwrap();
        assert_eq!(
            report(&said, "imgvm-boot-42-00ff"),
            Some(Report {
                state: "starting".into(),
                failed: vec!["broken.service".into()],
                stuck: vec!["google-guest-agent.service".into()],
            }),
            "{said}"
        );
    }
}
