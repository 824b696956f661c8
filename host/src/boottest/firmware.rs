//! The firmware a built image boots on, as the clouds run it: SeaBIOS or OVMF on amd64,
//! AAVMF (UEFI) on arm64, SLOF on ppc64el.

use crate::arch::Arch;
use anyhow::{bail, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

/// One firmware build on disk: where Debian installs it and which package has it.
pub struct Files {
    pub what: &'static str,
    pub code: &'static [&'static str],
    /// The template of the writable variable store (UEFI only).
    pub vars: &'static [&'static str],
    pub package: &'static str,
}

pub const SEABIOS: Files = Files {
    what: "SeaBIOS (amd64 BIOS)",
    code: &["/usr/share/qemu/bios-256k.bin", "/usr/share/seabios/bios-256k.bin"],
    vars: &[],
    package: "seabios",
};
pub const OVMF: Files = Files {
    what: "OVMF (amd64 UEFI)",
    code: &["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd"],
    vars: &["/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd"],
    package: "ovmf",
};
pub const AAVMF: Files = Files {
    what: "AAVMF (arm64 UEFI)",
    code: &["/usr/share/AAVMF/AAVMF_CODE.fd"],
    vars: &["/usr/share/AAVMF/AAVMF_VARS.fd"],
    package: "qemu-efi-aarch64",
};
pub const SLOF: Files = Files {
    what: "SLOF (ppc64el firmware)",
    code: &["/usr/share/qemu/slof.bin"],
    vars: &[],
    package: "qemu-system-ppc",
};

impl Files {
    pub fn code(&self) -> Option<&'static Path> {
        first(self.code)
    }
}

fn first(paths: &'static [&'static str]) -> Option<&'static Path> {
    paths.iter().map(Path::new).find(|p| p.exists())
}

/// The firmware an architecture's images are tested on when none is asked for.
pub fn defaults(arch: Arch) -> Vec<Firmware> {
    match arch {
        Arch::Amd64 => vec![Firmware::Bios, Firmware::Uefi],
        Arch::Arm64 => vec![Firmware::Uefi],
        // SLOF is pseries' only firmware; it counts as its BIOS.
        Arch::Ppc64el => vec![Firmware::Bios],
    }
}

/// How the firmware is named in reports.
pub fn name(arch: Arch, firmware: Firmware) -> &'static str {
    match (arch, firmware) {
        (Arch::Amd64, Firmware::Bios) => "seabios",
        (Arch::Amd64, Firmware::Uefi) => "ovmf",
        (Arch::Arm64, _) => "aavmf",
        (Arch::Ppc64el, _) => "slof",
    }
}

/// qemu arguments that give the machine its firmware. UEFI gets a private copy of the
/// variable store in `dir`, so the host's template is never written.
pub fn qemu_args(arch: Arch, firmware: Firmware, dir: &Path) -> Result<Vec<OsString>> {
    let files = match (arch, firmware) {
        (Arch::Amd64, Firmware::Bios) => &SEABIOS,
        (Arch::Amd64, Firmware::Uefi) => &OVMF,
        (Arch::Arm64, Firmware::Uefi) => &AAVMF,
        (Arch::Arm64, Firmware::Bios) => bail!("arm64 images boot with UEFI only: use --firmware uefi"),
        (Arch::Ppc64el, Firmware::Bios) => &SLOF,
        (Arch::Ppc64el, Firmware::Uefi) => bail!("ppc64el images boot with SLOF: use --firmware bios"),
    };
    let Some(code) = files.code() else {
        bail!(
            "{} is missing: apt-get install {} (see `imgvm doctor`)",
            files.what,
            files.package
        );
    };
    if files.vars.is_empty() {
        let mut args: Vec<OsString> = vec!["-bios".into()];
        args.push(code.into());
        return Ok(args);
    }
    // The variable store must match the code build (4M with 4M).
    let vars_template = files
        .code
        .iter()
        .position(|c| Path::new(c) == code)
        .and_then(|i| files.vars.get(i))
        .map(PathBuf::from)
        .filter(|p| p.exists());
    let Some(vars_template) = vars_template else {
        bail!("{}: no variable store next to {}", files.what, code.display());
    };
    let vars = dir.join("efivars.fd");
    std::fs::copy(&vars_template, &vars)?;
    let mut code_arg = OsString::from("if=pflash,format=raw,unit=0,readonly=on,file=");
    code_arg.push(code);
    let mut vars_arg = OsString::from("if=pflash,format=raw,unit=1,file=");
    vars_arg.push(&vars);
    Ok(vec!["-drive".into(), code_arg, "-drive".into(), vars_arg])
}
