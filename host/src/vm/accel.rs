//! KVM or TCG. KVM is used when the guest arch is the host's and /dev/kvm opens; whether
//! it really runs a guest is only known by trying (some hosts expose a /dev/kvm that
//! stock kernels cannot use), so the first KVM boot is a probe whose outcome is
//! remembered in the cache per host kernel.

use crate::arch::Arch;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=multi",
        }
    }

    /// How logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }

    /// What to try first for `arch`, with the reason when it is not KVM.
    pub fn choose(arch: Arch) -> (Accel, Option<String>) {
        if Arch::host() != Some(arch) {
            return (Accel::Tcg, Some(format!("{arch} is not the host architecture")));
        }
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            return (Accel::Tcg, Some(format!("/dev/kvm is not usable ({e})")));
        }
        if std::fs::read_to_string(probe_file()).is_ok_and(|s| s.trim() == format!("fail {}", host_kernel())) {
            return (
                Accel::Tcg,
                Some("KVM failed to boot the helper VM on this host kernel before".into()),
            );
        }
        (Accel::Kvm, None)
    }

    /// Remembers whether KVM booted the helper VM.
    pub fn record_probe(ok: bool) {
        let path = probe_file();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(path, format!("{} {}\n", if ok { "ok" } else { "fail" }, host_kernel()));
    }
}

fn probe_file() -> PathBuf {
    crate::cache::dir().join("kvm-probe")
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
