//! `images/appliance.yaml`: what goes into the helper VM.

use crate::arch::Arch;
use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// The definition shipped with imgvm, compiled in so the binary works on its own.
pub const BUILTIN: &str = include_str!("../../../images/appliance.yaml");

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub suite: String,
    pub mirror: String,
    pub arches: BTreeMap<Arch, ArchSpecific>,
    pub modules: Vec<String>,
    pub packages: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Per suite, source packages whose builds come from `SUITE-backports`.
    #[serde(default)]
    pub backports: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchSpecific {
    pub kernel: String,
    #[serde(default)]
    pub modules: Vec<String>,
}

impl Definition {
    pub fn parse(text: &str) -> Result<Definition> {
        serde_yaml_ng::from_str(text).context("images/appliance.yaml is invalid")
    }

    fn arch(&self, arch: Arch) -> Result<&ArchSpecific> {
        self.arches
            .get(&arch)
            .with_context(|| format!("the appliance definition does not cover {arch}"))
    }

    pub fn kernel_package(&self, arch: Arch) -> Result<&str> {
        Ok(&self.arch(arch)?.kernel)
    }

    /// The common modules followed by the architecture's own.
    pub fn modules(&self, arch: Arch) -> Result<Vec<String>> {
        Ok(self.modules.iter().chain(&self.arch(arch)?.modules).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtin_definition_parses_and_covers_every_arch() {
        let def = super::Definition::parse(super::BUILTIN).unwrap();
        for arch in crate::arch::Arch::ALL {
            assert!(def.kernel_package(arch).is_ok(), "{arch}");
        }
        assert!(def.packages.iter().any(|p| p == "mmdebstrap"));
    }
}
