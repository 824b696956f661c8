//! Finding the guest agent binary for an architecture. `cargo xtask agents` puts them
//! next to the `imgvm` binary; an installation puts them in `../lib/imgvm/`.

use crate::arch::Arch;
use anyhow::{bail, Result};
use std::path::PathBuf;

pub fn file_name(arch: Arch) -> String {
    format!("imgvm-agent-{arch}")
}

pub fn candidates(arch: Arch) -> Vec<PathBuf> {
    let name = file_name(arch);
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("IMGVM_AGENT_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.extend(crate::lib_dir());
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) {
        dirs.push(exe_dir);
    }
    dirs.into_iter().map(|d| d.join(&name)).collect()
}

pub fn locate(arch: Arch) -> Option<PathBuf> {
    candidates(arch).into_iter().find(|p| p.is_file())
}

pub fn load(arch: Arch) -> Result<Vec<u8>> {
    match locate(arch) {
        Some(path) => Ok(std::fs::read(path)?),
        None => bail!(
            "no guest agent for {arch}: build it with `cargo xtask agents` (looked for {})",
            candidates(arch)
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
