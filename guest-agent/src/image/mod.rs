//! Operations on the image being built, the Debian way: the host says what, these modules
//! know how. The image's root is mounted at [`TARGET`]; work inside it runs in its chroot
//! with the image's own tools.

mod bootloader;
mod checks;
mod debian;
mod diagnose;
mod disk;
mod files;
mod listing;
mod prefetch;
mod seal;
mod system;
pub mod view;

use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{ErrorKind, ImageOp, ImageReply, OperationError};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

/// Carries out `op` with this module's [`imgvm_protocol::Handle`] implementations (one
/// per operation, required by [`ImageOp::dispatch`]), wording known failures.
pub fn execute(job: &Job, op: ImageOp) -> Result<ImageReply, OperationError> {
    op.dispatch(job).map_err(diagnose::explain)
}

/// `path` (absolute, inside the image) as a path in the helper. Refuses `..` so that a
/// path can never leave the image.
fn target(job: &Job, path: &str) -> Result<String, OperationError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(job.error(
            ErrorKind::InvalidRequest,
            format!("{path:?} is not an absolute path inside the image"),
        ));
    }
    Ok(format!("{}{}", job.root, path.trim_end_matches('/')))
}

/// A program run in the image's chroot, with its own tools and non-interactive apt.
fn chroot<S: AsRef<str>>(argv: &[S]) -> Program {
    let mut full = vec![String::from("chroot"), imgvm_protocol::TARGET.to_owned()];
    full.extend(argv.iter().map(|a| a.as_ref().to_owned()));
    Program::new(&full).env("DEBIAN_FRONTEND", "noninteractive")
}

fn run(job: &Job, program: &Program) -> Result<(), OperationError> {
    command::run(job, program, Input::Null, false).map(drop)
}

/// Writes a file in the image (parents created) with `mode`, owned by root.
fn write(job: &Job, path: &str, content: &[u8], mode: u32) -> Result<(), OperationError> {
    let full = target(job, path)?;
    let io = |e: std::io::Error| {
        let mut error = job.io_error(&e);
        error.message = format!("writing {path}: {e}");
        error
    };
    if let Some(parent) = Path::new(&full).parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(&full, content).map_err(io)?;
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// Removes a file or a whole tree in the image (symlinks are not followed); absent is
/// fine.
fn remove(job: &Job, path: &str) -> Result<(), OperationError> {
    remove_full(job, Path::new(&target(job, path)?))
}

/// Empties a directory of the image, keeping the directory itself.
fn empty_dir(job: &Job, dir: &str) -> Result<(), OperationError> {
    let entries = match std::fs::read_dir(target(job, dir)?) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(job.io_error(&e)),
    };
    for entry in entries {
        remove_full(job, &entry.map_err(|e| job.io_error(&e))?.path())?;
    }
    Ok(())
}

pub(crate) fn remove_full(job: &Job, full: &Path) -> Result<(), OperationError> {
    let result = match std::fs::symlink_metadata(full) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(full),
        Ok(_) => std::fs::remove_file(full),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| {
        let mut error = job.io_error(&e);
        error.message = format!("removing {}: {e}", full.display());
        error
    })
}
