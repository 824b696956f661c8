//! `imgvm boot`: a built image on its architecture's firmware, as `imgvm test` boots it,
//! with its serial console on this terminal, to look around by hand.
//!
//! The image is attached as a snapshot unless asked otherwise, so that trying things
//! never changes what was built. imgvm, not qemu, owns the terminal: it puts it in raw
//! mode (Ctrl-C reaches the guest), relays both ways, and takes Ctrl-] for itself: the
//! first asks the guest to power off (ACPI), a second one ends the VM at once.

use crate::arch::Arch;
use crate::boottest::{firmware, seed, Firmware};
use crate::terminal::{keyboard, RawTerminal};
use crate::vm::qemu::{drive, escape_option, Boot, Qemu};
use crate::vm::{qmp, Accel};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The byte of Ctrl-], telnet's escape, which no console program needs.
pub const ESCAPE: u8 = 0x1d;

/// How long a guest may take to power off when asked before it is stopped.
const POWEROFF_GRACE: Duration = Duration::from_secs(90);

pub struct BootOptions {
    pub image: PathBuf,
    pub arch: Arch,
    pub firmware: Firmware,
    /// Write to the image itself rather than to a snapshot of it.
    pub persist: bool,
    /// Forward this port of 127.0.0.1 to the guest's 22.
    pub ssh_port: Option<u16>,
    /// `authorized_keys` lines for the image's default user, through a NoCloud seed.
    pub ssh_keys: Vec<String>,
    pub memory_mib: u32,
    pub cpus: u32,
}

/// Boots the image and relays its console until the machine stops; `Ok` when it
/// powered off (or was stopped by Ctrl-]), with what ended it.
pub async fn boot(options: &BootOptions, cancel: &CancellationToken) -> Result<&'static str> {
    let (accel, _) = Accel::choose(options.arch);
    match boot_with(options, accel, cancel).await? {
        Ended::As(how) => Ok(how),
        // KVM that cannot even start the firmware is a host problem: say so once, use TCG.
        Ended::AtStart(_) if accel == Accel::Kvm => {
            tracing::warn!("KVM did not start the VM; using TCG");
            Accel::record_probe(false);
            match boot_with(options, Accel::Tcg, cancel).await? {
                Ended::As(how) => Ok(how),
                Ended::AtStart(why) => bail!("{why}"),
            }
        }
        Ended::AtStart(why) => bail!("{why}"),
    }
}

enum Ended {
    As(&'static str),
    /// qemu failed before the guest printed anything: why.
    AtStart(String),
}

async fn boot_with(options: &BootOptions, accel: Accel, cancel: &CancellationToken) -> Result<Ended> {
    let dir = tempfile::Builder::new().prefix("imgvm-boot-").tempdir()?;
    let launcher = Qemu {
        arch: options.arch,
        accel,
        memory_mib: options.memory_mib,
        cpus: options.cpus,
        boot: Boot::Firmware,
    };
    let mut qemu = launcher.command();
    qemu.args(firmware::qemu_args(options.arch, options.firmware, dir.path())?)
        .args(["-serial", "stdio"]);
    let qmp_socket = dir.path().join("qmp.sock");
    let mut qmp_arg = std::ffi::OsString::from("unix:");
    qmp_arg.push(escape_option(&qmp_socket));
    qmp_arg.push(",server=on,wait=off");
    qemu.arg("-qmp").arg(qmp_arg);
    let snapshot = if options.persist { "off" } else { "on" };
    qemu.arg("-drive")
        .arg(drive(&options.image, &format!("if=none,id=image,snapshot={snapshot}"))?)
        .args(["-device", "virtio-blk-pci,drive=image,bootindex=0"]);
    if !options.ssh_keys.is_empty() {
        let seed_file = dir.path().join("seed.img");
        seed::write(
            &seed_file,
            "imgvm-boot",
            "imgvm",
            &seed::ssh_user_data(&options.ssh_keys),
        )?;
        qemu.arg("-drive")
            .arg(drive(&seed_file, "if=none,id=seed,readonly=on")?)
            .args(["-device", "virtio-blk-pci,drive=seed"]);
    }
    let mut netdev = "user,id=net".to_owned();
    if let Some(port) = options.ssh_port {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:22"));
    }
    qemu.args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net"])
        .args(["-device", "virtio-rng-pci"]);
    qemu.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = launcher.spawn(&mut qemu)?;
    let mut to_guest = child.stdin.take().expect("piped");
    let mut from_guest = child.stdout.take().expect("piped");
    let mut qemu_said = child.stderr.take().expect("piped");

    let _raw = RawTerminal::enter();
    let mut typed_keys = keyboard();
    let mut terminal_out = tokio::io::stdout();
    let mut output = vec![0u8; 16 * 1024];
    let mut shown_anything = false;
    let mut asked_to_stop: Option<tokio::time::Instant> = None;
    let ended = loop {
        let grace = async {
            match asked_to_stop {
                Some(at) => tokio::time::sleep_until(at + POWEROFF_GRACE).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Nothing more to type (stdin closed) leaves the console shown.
            Some(typed) = typed_keys.recv() => {
                let (before, escaped) = match typed.iter().position(|&b| b == ESCAPE) {
                    Some(i) => (&typed[..i], true),
                    None => (&typed[..], false),
                };
                to_guest.write_all(before).await.context("writing to the console")?;
                to_guest.flush().await?;
                if escaped {
                    if asked_to_stop.is_some() {
                        break "stopped at once (Ctrl-] twice)";
                    }
                    say(&mut terminal_out, "powering the machine off (Ctrl-] again stops it at once)").await;
                    if let Err(e) = qmp::powerdown(&qmp_socket).await {
                        tracing::warn!("could not ask the machine to power off: {e:#}");
                        break "stopped (it could not be asked to power off)";
                    }
                    asked_to_stop = Some(tokio::time::Instant::now());
                }
            }
            n = from_guest.read(&mut output) => {
                match n.unwrap_or(0) {
                    0 => break "powered off",
                    n => {
                        shown_anything = true;
                        terminal_out.write_all(&output[..n]).await?;
                        terminal_out.flush().await?;
                    }
                }
            }
            () = grace => break "stopped: it did not power off in time",
            () = cancel.cancelled() => break "stopped (cancelled)",
        }
    };
    // A machine that powered off closed its console as qemu ended: let it finish.
    if ended != "powered off"
        || tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
    {
        let _ = child.start_kill();
    }
    let status = child.wait().await?;
    if ended == "powered off" && !status.success() {
        let mut why = String::new();
        let _ = qemu_said.read_to_string(&mut why).await;
        let why = format!("qemu failed ({status}): {}", why.trim());
        if !shown_anything {
            return Ok(Ended::AtStart(why));
        }
        bail!("{why}");
    }
    say(&mut terminal_out, ended).await;
    Ok(Ended::As(ended))
}

/// One line of imgvm's own on the console, set apart from the guest's.
async fn say(out: &mut tokio::io::Stdout, text: &str) {
    let _ = out.write_all(format!("\r\n[imgvm: {text}]\r\n").as_bytes()).await;
    let _ = out.flush().await;
}

/// The `authorized_keys` lines of `text` (a public key file): what cloud-init is given.
pub fn ssh_keys(text: &str) -> Result<Vec<String>> {
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        bail!("no public key in it");
    }
    if let Some(key) = keys.iter().find(|k| k.contains("PRIVATE KEY")) {
        bail!(
            "this is a private key (`{}`): give the .pub file",
            &key[..key.len().min(40)]
        );
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_are_read_and_private_ones_refused() {
        let keys = ssh_keys("# mine\nssh-ed25519 AAAA me@host\n\nssh-rsa BBBB other\n").unwrap();
        assert_eq!(keys, ["ssh-ed25519 AAAA me@host", "ssh-rsa BBBB other"]);
        assert!(ssh_keys("\n# nothing\n")
            .unwrap_err()
            .to_string()
            .contains("no public key"));
        let private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n";
        assert!(ssh_keys(private)
            .unwrap_err()
            .to_string()
            .contains("give the .pub file"));
    }
}
