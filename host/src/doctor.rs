//! `imgvm doctor`: what this machine has for imgvm, and what to install when it lacks it.

use crate::arch::Arch;
use crate::vm::vsock;
use std::path::Path;

/// One thing imgvm looked for.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    pub ok: bool,
    /// Missing things that make imgvm fail, as opposed to making it slower or less able.
    pub required: bool,
    pub what: String,
    /// Where it was found, or what to do to get it.
    pub detail: String,
}

/// What this machine has for imgvm.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Everything required is there.
    pub ready: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// A line per check: `ok`, `MISSING` (required) or `--` (optional), what, detail.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let mark = match (check.ok, check.required) {
                (true, _) => "ok  ",
                (false, true) => "MISSING",
                (false, false) => "--  ",
            };
            out.push_str(&format!("{mark:8} {:40} {}\n", check.what, check.detail));
        }
        out
    }
}

/// Looks at the machine.
pub fn examine() -> Report {
    let mut checks = Vec::new();
    let host = Arch::host();
    for arch in Arch::ALL {
        let qemu = crate::which(arch.qemu_binary());
        let package = match arch {
            Arch::Amd64 => "qemu-system-x86",
            Arch::Arm64 => "qemu-system-arm",
            Arch::Ppc64el => "qemu-system-ppc",
        };
        checks.push(Check {
            ok: qemu.is_some(),
            required: Some(arch) == host,
            what: format!("{} ({arch} VMs)", arch.qemu_binary()),
            detail: qemu.map_or(format!("install: apt-get install {package}"), |p| {
                p.display().to_string()
            }),
        });
        let agent = crate::agent::locate(arch);
        checks.push(Check {
            ok: agent.is_some(),
            required: Some(arch) == host,
            what: format!("guest agent for {arch}"),
            detail: agent.map_or("build: cargo xtask agents".into(), |p| p.display().to_string()),
        });
    }
    checks.push(file_check(
        "qemu-img",
        crate::which("qemu-img").as_deref(),
        true,
        "install: apt-get install qemu-utils",
    ));
    checks.push(file_check(
        "gpgv (verifies the Debian archive)",
        crate::which("gpgv").as_deref(),
        true,
        "install: apt-get install gpgv",
    ));
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    checks.push(Check {
        ok: kvm.is_ok(),
        required: false,
        what: "KVM (/dev/kvm)".into(),
        detail: match kvm {
            Ok(_) => "usable for same-arch VMs (verified by a probe boot on first use)".into(),
            Err(e) => {
                format!("{e}: VMs run under TCG (software emulation, much slower); add yourself to the kvm group")
            }
        },
    });
    let kernel_vsock = vsock::kernel_vsock_usable();
    checks.push(Check {
        ok: kernel_vsock,
        required: false,
        what: format!("kernel vsock ({})", vsock::VHOST_VSOCK_DEVICE),
        detail: if kernel_vsock {
            "usable".into()
        } else {
            "not usable: vhost-device-vsock is used instead".into()
        },
    });
    let device = vsock::vhost_device_vsock();
    checks.push(Check {
        ok: device.is_some(),
        required: !kernel_vsock,
        what: "vhost-device-vsock (user-space vsock)".into(),
        detail: device.map_or("install: cargo install vhost-device-vsock".into(), |p| {
            p.display().to_string()
        }),
    });
    use crate::boottest::firmware::{AAVMF, OVMF, SEABIOS, SLOF};
    for files in [SEABIOS, OVMF, AAVMF, SLOF] {
        checks.push(file_check(
            files.what,
            files.code(),
            false,
            &format!("install: apt-get install {}", files.package),
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    checks.push(Check {
        ok: uid != 0,
        required: false,
        what: "unprivileged user".into(),
        detail: if uid == 0 {
            "running as root: imgvm needs no root, run it as yourself".into()
        } else {
            format!("uid {uid}")
        },
    });
    let cache = crate::cache::dir();
    let writable = std::fs::create_dir_all(&cache).is_ok() && tempfile::tempfile_in(&cache).is_ok();
    checks.push(Check {
        ok: writable,
        required: true,
        what: "cache directory".into(),
        detail: format!(
            "{}{}",
            cache.display(),
            if writable {
                ""
            } else {
                " is not writable (set IMGVM_CACHE_DIR)"
            }
        ),
    });

    Report {
        ready: checks.iter().all(|c| c.ok || !c.required),
        checks,
    }
}

fn file_check(what: &str, found: Option<&Path>, required: bool, hint: &str) -> Check {
    Check {
        ok: found.is_some(),
        required,
        what: what.into(),
        detail: found.map_or(hint.into(), |p| p.display().to_string()),
    }
}
