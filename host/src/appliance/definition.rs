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
    pub kernel: BTreeMap<Arch, String>,
    pub modules: Vec<String>,
    pub packages: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Definition {
    pub fn parse(text: &str) -> Result<Definition> {
        serde_yaml_ng::from_str(text).context("images/appliance.yaml is invalid")
    }

    pub fn kernel_package(&self, arch: Arch) -> Result<&str> {
        self.kernel
            .get(&arch)
            .map(String::as_str)
            .with_context(|| format!("the appliance definition names no kernel for {arch}"))
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
