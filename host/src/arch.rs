//! The architectures imgvm builds for, and everything that differs between them.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
    Ppc64el,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Amd64, Arch::Arm64, Arch::Ppc64el];

    /// Debian's name, as in `dpkg --print-architecture`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Ppc64el => "ppc64el",
        }
    }

    /// The kernel's name, as in `uname -m`.
    pub fn uname(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
            Arch::Ppc64el => "ppc64le",
        }
    }

    /// The architecture imgvm itself was compiled for.
    pub fn host() -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| {
            a.uname() == std::env::consts::ARCH || (std::env::consts::ARCH == "powerpc64" && *a == Arch::Ppc64el)
        })
    }

    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86_64",
            Arch::Arm64 => "qemu-system-aarch64",
            Arch::Ppc64el => "qemu-system-ppc64",
        }
    }

    /// The serial console device the kernel writes to.
    pub fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
            Arch::Ppc64el => "hvc0",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.debian())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.debian() == s || a.uname() == s)
            .ok_or_else(|| format!("unknown architecture `{s}` (expected amd64, arm64 or ppc64el)"))
    }
}
