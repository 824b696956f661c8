//! imgvm's host side: from a request on the command line to a helper VM doing the work.
//!
//! - [`archive`] fetches and verifies Debian packages,
//! - [`appliance`] assembles the helper VM's kernel and initramfs from them,
//! - [`vm`] boots it with qemu and a vsock transport,
//! - [`session`] speaks the protocol to the agent inside,
//! - [`helper`] ties those together, and [`run`] is `imgvm run` on top;
//! - [`recipe`] reads recipes and [`build`] turns them into images;
//! - [`boottest`] boots built images on their firmware (`imgvm test`), and [`boot`]
//!   boots one for a person at the terminal (`imgvm boot`).

pub mod agent;
pub mod appliance;
pub mod arch;
pub mod archive;
pub mod boot;
pub mod boottest;
pub mod build;
pub mod cache;
pub mod child;
pub mod diff;
pub mod doctor;
pub mod helper;
pub mod inspect;
pub mod leftovers;
pub mod lock;
pub mod manifest;
pub mod plan;
pub mod progress;
pub mod proxy;
pub mod recipe;
pub mod report;
pub mod run;
pub mod sbom;
pub mod session;
pub mod shell;
pub mod states;
pub mod terminal;
#[cfg(test)]
mod test_http;
pub mod text;
pub mod transfer;
pub mod vm;

use std::path::PathBuf;

/// The first executable called `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where an installation keeps imgvm's own companions (agents, and in the Debian
/// package the user-space vsock device): `../lib/imgvm` from the `imgvm` binary.
pub fn lib_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("../lib/imgvm"))
}

/// The executable `name` that an installation brings in [`lib_dir`], else the first on
/// `PATH`.
pub fn companion(name: &str) -> Option<PathBuf> {
    lib_dir()
        .map(|dir| dir.join(name))
        .filter(|p| is_executable(p))
        .or_else(|| which(name))
}
