//! The one place a qemu command line starts: machine, CPU, accelerator, memory and the
//! options every imgvm VM shares. The helper VM (direct kernel boot, vsock) and the boot
//! tests (real firmware, the image as its disk) add only what differs.

use super::Accel;
use crate::arch::Arch;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::Path;
use tokio::process::Command;

/// How the machine starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// `-kernel`/`-initrd` of the appliance, with guest memory shareable with the
    /// vhost-user vsock device; on ppc64el without SLOF (VOF saves ten seconds).
    DirectKernel,
    /// The architecture's firmware, as a cloud would boot the image.
    Firmware,
}

pub struct Qemu {
    pub arch: Arch,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub boot: Boot,
}

impl Qemu {
    /// A qemu with no devices, no display and no reboot (a reboot ends the VM), kept
    /// from outliving its owner (see [`crate::child`]).
    ///
    /// Machine and CPU are chosen for boot speed under TCG (see the platform notes): q35
    /// boots the Debian kernel where microvm hangs; cortex-a72 avoids the cost of
    /// emulating pointer authentication.
    pub fn command(&self) -> Command {
        let kvm = self.accel == Accel::Kvm;
        let (machine, cpu) = match self.arch {
            Arch::Amd64 => ("q35", if kvm { "host" } else { "max" }),
            Arch::Arm64 => ("virt", if kvm { "host" } else { "cortex-a72" }),
            Arch::Ppc64el => ("pseries", if kvm { "host" } else { "power9" }),
        };
        let mut machine = machine.to_owned();
        let memory = format!("{}M", self.memory_mib);
        let mut cmd = crate::child::command(self.arch.qemu_binary());
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        if self.boot == Boot::DirectKernel {
            if self.arch == Arch::Ppc64el {
                machine.push_str(",x-vof=on");
            }
            machine.push_str(",memory-backend=mem");
            cmd.args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            ]);
        }
        cmd.args(["-machine", &machine, "-cpu", cpu, "-accel", self.accel.qemu_arg()])
            .args(["-m", &memory, "-smp", &self.cpus.to_string()]);
        cmd
    }

    pub fn spawn(&self, cmd: &mut Command) -> Result<tokio::process::Child> {
        tracing::debug!("starting {:?}", cmd.as_std());
        cmd.spawn()
            .with_context(|| format!("cannot run {} (see `imgvm doctor`)", self.arch.qemu_binary()))
    }
}

/// A `-drive` value for `path`: `file=PATH,format=…,` followed by `options`.
pub fn drive(path: &Path, options: &str) -> Result<OsString> {
    let mut spec = OsString::from("file=");
    spec.push(escape_option(path));
    spec.push(format!(",format={},{options}", disk_format(path)?));
    Ok(spec)
}

/// qcow2 and vmdk files are recognised by their magic; everything else (fixed VHDs
/// included: a footer after raw data) is attached raw.
pub fn disk_format(path: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open disk {}", path.display()))?;
    let n = std::io::Read::read(&mut file, &mut magic)?;
    Ok(match &magic[..n] {
        b"QFI\xfb" => "qcow2",
        b"KDMV" => "vmdk",
        _ => "raw",
    })
}

/// qemu's option syntax uses commas as separators; a literal comma is doubled.
pub fn escape_option(path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}
