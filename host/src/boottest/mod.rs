//! `imgvm test`: boots a built image on its architecture's real firmware, on the serial
//! console, with a NoCloud seed for cloud-init, where the image has it. What boots is a
//! [`Probe`]: an overlay of the image whose report unit prints a marker once systemd has
//! started everything it was going to. Passing means the marker appeared and no unit
//! failed or was left starting; failing names those units, or says how far the boot got.
//!
//! The image is never written: the overlay is thrown away, and each boot attaches it as
//! a snapshot.

pub mod firmware;
mod probe;
pub mod seed;
mod stage;

pub use firmware::Firmware;
pub use probe::Probe;
pub use stage::Stage;

use crate::arch::Arch;
use crate::recipe::{Partition, TableKind};
use crate::vm::qemu::{drive, escape_option, Boot, Qemu};
use crate::vm::Accel;
use anyhow::Result;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub struct BootOptions {
    pub arch: Arch,
    pub firmware: Firmware,
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Units that may fail or never finish starting without failing the boot (the
    /// recipe's `boot_test.may_fail`).
    pub may_fail: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BootResult {
    /// `seabios`, `ovmf`, `aavmf` or `slof`.
    pub firmware: &'static str,
    pub passed: bool,
    /// Time to the marker, or to the failure.
    pub seconds: f64,
    pub stage: Stage,
    pub message: String,
    pub console_tail: String,
}

/// What the image's manifest (written next to it by `imgvm build`) says about it.
#[derive(Debug, Default)]
pub struct ImageInfo {
    /// The build's name (`debian-13-genericcloud-amd64`), else the file's stem.
    pub name: String,
    pub arch: Option<Arch>,
    /// How its disk is laid out, for writing into its filesystems.
    pub layout: Option<(TableKind, Vec<Partition>)>,
}

impl ImageInfo {
    pub fn of(image: &Path) -> ImageInfo {
        let file = image
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = file.split_once('.').map_or(file.as_str(), |(s, _)| s).to_owned();
        let manifest = image.with_file_name(format!("{stem}.manifest.json"));
        let Some(manifest) = std::fs::read(&manifest)
            .ok()
            .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
        else {
            return ImageInfo {
                name: stem,
                ..ImageInfo::default()
            };
        };
        let table = serde_json::from_value(manifest["table"].clone()).unwrap_or(TableKind::Gpt);
        ImageInfo {
            name: manifest["name"].as_str().map_or(stem, str::to_owned),
            arch: manifest["arch"].as_str().and_then(|a| a.parse().ok()),
            layout: serde_json::from_value(manifest["partitions"].clone())
                .ok()
                .map(|partitions| (table, partitions)),
        }
    }
}

/// A boot that prints nothing on its console for this long is stuck: firmware, grub and
/// the kernel all write to the serial console within seconds, even under emulation.
const SILENCE_LIMIT: Duration = Duration::from_secs(240);

/// Console output kept for the report; older output is dropped.
const CONSOLE_KEEP: usize = 1 << 20;

/// Boots the probe once. `Err` means the test could not be run (qemu or firmware
/// missing); a boot that fails is an `Ok` with `passed: false`.
pub async fn boot(options: &BootOptions, probe: &Probe, cancel: &CancellationToken) -> Result<BootResult> {
    let arch = options.arch;
    if arch == Arch::Amd64 && options.firmware == Firmware::Bios && !probe.bios_boot_code {
        return Ok(BootResult {
            firmware: firmware::name(arch, options.firmware),
            passed: false,
            seconds: 0.0,
            stage: Stage::Firmware,
            message: format!(
                "boot stopped {}: the disk's first sector has no boot code",
                Stage::Firmware.describe()
            ),
            console_tail: String::new(),
        });
    }
    let (accel, _) = Accel::choose(arch);
    let result = boot_with(options, probe, accel, cancel).await?;
    // KVM that cannot even start the firmware is a host problem: say so once, use TCG.
    if accel == Accel::Kvm && !result.passed && result.console_tail.trim().is_empty() && result.seconds < 10.0 {
        tracing::warn!("KVM did not start the test VM; using TCG");
        Accel::record_probe(false);
        return boot_with(options, probe, Accel::Tcg, cancel).await;
    }
    Ok(result)
}

async fn boot_with(
    options: &BootOptions,
    probe: &Probe,
    accel: Accel,
    cancel: &CancellationToken,
) -> Result<BootResult> {
    let arch = options.arch;
    let dir = tempfile::Builder::new().prefix("imgvm-test-").tempdir()?;
    let seed = dir.path().join("seed.img");
    seed::write(&seed, &probe.instance_id, "imgvm-test", "#cloud-config\n")?;

    let launcher = Qemu {
        arch,
        accel,
        memory_mib: options.memory_mib,
        cpus: options.cpus,
        boot: Boot::Firmware,
    };
    let mut qemu = launcher.command();
    qemu.args(firmware::qemu_args(arch, options.firmware, dir.path())?)
        .args(["-serial", "stdio"]);
    // SeaBIOS says nothing on the serial port, but tells its debug port why it gave up.
    let firmware_log = dir.path().join("firmware.log");
    if arch == Arch::Amd64 {
        let mut chardev = std::ffi::OsString::from("file,id=firmware,path=");
        chardev.push(escape_option(&firmware_log));
        qemu.arg("-chardev")
            .arg(chardev)
            .args(["-device", "isa-debugcon,iobase=0x402,chardev=firmware"]);
    }
    qemu.arg("-drive")
        .arg(drive(&probe.overlay, "if=none,id=image,snapshot=on")?)
        .args(["-device", "virtio-blk-pci,drive=image,bootindex=0"])
        .arg("-drive")
        .arg(drive(&seed, "if=none,id=seed,readonly=on")?)
        .args(["-device", "virtio-blk-pci,drive=seed"]);
    // Entropy, so that early boot does not wait for it under emulation.
    qemu.args(["-device", "virtio-rng-pci"]);
    // A network card, as every cloud gives (a unit waiting for a link would fail without
    // one), on a network that reaches nothing; no option ROM, so no network boot.
    qemu.args([
        "-netdev",
        "user,id=net,restrict=on",
        "-device",
        "virtio-net-pci,netdev=net,romfile=",
    ]);
    qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = launcher.spawn(&mut qemu)?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");

    let mut console = String::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::sleep(options.timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_output = Instant::now();
    let failure = loop {
        tokio::select! {
            _ = tick.tick() => {
                let firmware_said = std::fs::read(&firmware_log).unwrap_or_default();
                let text = format!("{}\n{console}", String::from_utf8_lossy(&firmware_said));
                if let Some(end) = stage::dead_end(&text) {
                    break format!("`{end}`");
                }
                if last_output.elapsed() > SILENCE_LIMIT {
                    break format!("nothing on the console for {} s", SILENCE_LIMIT.as_secs());
                }
            }
            n = stdout.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    let status = child.wait().await?;
                    let mut why = String::new();
                    let _ = stderr.read_to_string(&mut why).await;
                    break format!("the machine stopped ({status}) {}", why.trim()).trim().to_owned();
                }
                last_output = Instant::now();
                console.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
                if console.len() > CONSOLE_KEEP {
                    let cut = console.len() - CONSOLE_KEEP / 2;
                    let cut = (cut..console.len()).find(|&i| console.is_char_boundary(i)).unwrap_or(0);
                    console.drain(..cut);
                }
                if let Some(report) = probe.report(&console) {
                    let _ = child.kill().await;
                    let (passed, message) = judge(&report, &options.may_fail);
                    return Ok(BootResult {
                        firmware: firmware::name(arch, options.firmware),
                        passed,
                        seconds: started.elapsed().as_secs_f64(),
                        stage: Stage::Started,
                        message,
                        console_tail: tail(&console, if passed { 20 } else { 30 }),
                    });
                }
            }
            _ = &mut deadline => {
                break format!("no marker within {} s", options.timeout.as_secs());
            }
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                anyhow::bail!("cancelled");
            }
        }
    };
    let _ = child.kill().await;
    let stage = Stage::reached(&console);
    let mut console_tail = tail(&console, 30);
    if stage == Stage::Firmware {
        let firmware_said = std::fs::read(&firmware_log).unwrap_or_default();
        console_tail = format!("{}\n{console_tail}", tail(&String::from_utf8_lossy(&firmware_said), 10));
    }
    Ok(BootResult {
        firmware: firmware::name(arch, options.firmware),
        passed: false,
        seconds: started.elapsed().as_secs_f64(),
        stage,
        message: format!("boot stopped {}: {failure}", stage.describe()),
        console_tail: console_tail.trim().to_owned(),
    })
}

impl BootResult {
    pub fn case(&self) -> crate::report::Case {
        crate::report::Case {
            name: format!("boot ({})", self.firmware),
            seconds: self.seconds,
            passed: self.passed,
            message: self.message.clone(),
            details: if self.passed {
                String::new()
            } else {
                self.console_tail.clone()
            },
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether a boot that reported `report` passed, and what to say: no unit may fail or
/// still be starting when the report gave up waiting, but those in `may_fail`.
fn judge(report: &probe::Report, may_fail: &[String]) -> (bool, String) {
    let allowed =
        |units: &[String]| -> (Vec<String>, Vec<String>) { units.iter().cloned().partition(|u| may_fail.contains(u)) };
    let (failed_allowed, failed) = allowed(&report.failed);
    let (stuck_allowed, stuck) = allowed(&report.stuck);
    // systemd says `degraded` when any unit failed, allowed ones too, and `starting`
    // while any start job runs.
    let state_ok = match report.state.as_str() {
        "running" => true,
        "degraded" => !failed_allowed.is_empty(),
        "starting" => !stuck_allowed.is_empty(),
        _ => false,
    };
    let mut problems = Vec::new();
    if !failed.is_empty() {
        problems.push(format!("failed units: {}", failed.join(", ")));
    }
    if !stuck.is_empty() {
        problems.push(format!("units that never finished starting: {}", stuck.join(", ")));
    }
    if problems.is_empty() && !state_ok {
        problems.push(format!("the system started as `{}`", report.state));
    }
    if !problems.is_empty() {
        return (false, problems.join("; "));
    }
    let allowed: Vec<String> = failed_allowed
        .iter()
        .map(|u| format!("{u} (failed)"))
        .chain(stuck_allowed.iter().map(|u| format!("{u} (still starting)")))
        .collect();
    match allowed.is_empty() {
        true => (true, "the system started with no failed unit".to_owned()),
        false => (
            true,
            format!(
                "the system started; only units the recipe allows outside its cloud did not: {}",
                allowed.join(", ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_units_the_recipe_names_may_fail_or_hang() {
        let report = |state: &str, failed: &[&str], stuck: &[&str]| probe::Report {
            state: state.into(),
            failed: failed.iter().map(|u| u.to_string()).collect(),
            stuck: stuck.iter().map(|u| u.to_string()).collect(),
        };
        let may_fail = ["chrony.service".to_owned(), "google-guest-agent.service".to_owned()];
        assert!(judge(&report("running", &[], &[]), &may_fail).0);
        let (passed, message) = judge(&report("degraded", &["chrony.service"], &[]), &may_fail);
        assert!(
            passed && message.ends_with("outside its cloud did not: chrony.service (failed)"),
            "{message}"
        );
        let (passed, message) = judge(&report("degraded", &["chrony.service", "ssh.service"], &[]), &may_fail);
        assert!(!passed && message == "failed units: ssh.service", "{message}");
        assert!(!judge(&report("degraded", &["chrony.service"], &[]), &[]).0);
        assert!(!judge(&report("degraded", &[], &[]), &may_fail).0);

        let hung = report("starting", &[], &["google-guest-agent.service"]);
        let (passed, message) = judge(&hung, &may_fail);
        assert!(
            passed && message.ends_with("google-guest-agent.service (still starting)"),
            "{message}"
        );
        let (passed, message) = judge(&hung, &[]);
        assert!(
            !passed && message == "units that never finished starting: google-guest-agent.service",
            "{message}"
        );
        let (passed, message) = judge(&report("starting", &["ssh.service"], &["slow.service"]), &may_fail);
        assert!(
            !passed && message == "failed units: ssh.service; units that never finished starting: slow.service",
            "{message}"
        );
        assert!(!judge(&report("starting", &[], &[]), &may_fail).0);
    }
}
