//! Operations on the image being built, the Debian way: the host says what, these modules
//! know how. The image's root is mounted at [`TARGET`]; work inside it runs in its chroot
//! with the image's own tools.

mod bootloader;
mod checks;
mod debian;
mod diagnose;
mod disk;
mod files;
mod system;

use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{ErrorKind, ImageOp, OperationError, Outcome, TARGET};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

pub fn execute(job: &Job, op: ImageOp) -> Result<Outcome, OperationError> {
    let done = |r: Result<(), OperationError>| r.map(|()| Outcome::Done);
    let result = match op {
        ImageOp::Partition {
            disk,
            table,
            partitions,
        } => done(disk::partition(job, &disk, table, &partitions)),
        ImageOp::Mkfs(mkfs) => done(disk::mkfs(job, &mkfs)),
        ImageOp::Mount { device, path } => done(disk::mount(job, &device, &path)),
        ImageOp::Unmount { trim } => done(disk::unmount(job, trim)),
        ImageOp::Bootstrap(bootstrap) => done(debian::bootstrap(job, &bootstrap)),
        ImageOp::EnterChroot { source } => done(debian::enter_chroot(job, &source)),
        ImageOp::Apt(apt) => done(debian::apt(job, &apt)),
        ImageOp::AptSources(sources) => done(debian::apt_sources(job, &sources)),
        ImageOp::Clean => done(debian::clean(job)),
        ImageOp::ListPackages => debian::list_packages(job).map(Outcome::Packages),
        ImageOp::Check(list) => checks::run(job, &list).map(Outcome::Checks),
        ImageOp::WriteFile { path, mode, owner } => done(files::write_file(job, &path, mode, &owner)),
        ImageOp::Unpack { path, owner } => done(files::unpack(job, &path, &owner)),
        ImageOp::Script { script, env, chroot } => done(files::script(job, &script, &env, chroot)),
        ImageOp::Users(users) => done(system::users(job, &users)),
        ImageOp::Hostname(name) => done(system::hostname(job, &name)),
        ImageOp::Locale(lang) => done(system::locale(job, &lang)),
        ImageOp::Timezone(zone) => done(system::timezone(job, &zone)),
        ImageOp::Services(services) => done(system::services(job, &services)),
        ImageOp::Fstab(entries) => done(system::fstab(job, &entries)),
        ImageOp::Bootloader(boot) => done(bootloader::install(job, &boot)),
    };
    result.map_err(diagnose::explain)
}

pub fn describe(op: &ImageOp) -> String {
    match op {
        ImageOp::Partition { disk, .. } => format!("partition {disk}"),
        ImageOp::Mkfs(m) => format!("mkfs {:?} on {}", m.filesystem, m.device).to_lowercase(),
        ImageOp::Mount { device, path } => format!("mount {device} at {path}"),
        ImageOp::Unmount { .. } => "unmount the image".into(),
        ImageOp::Bootstrap(b) => format!("bootstrap {} {}", b.suite, b.arch),
        ImageOp::EnterChroot { .. } => "prepare the chroot".into(),
        ImageOp::Apt(_) => "apt".into(),
        ImageOp::AptSources(s) => format!("apt sources {}", s.name),
        ImageOp::Clean => "clean the image".into(),
        ImageOp::ListPackages => "list installed packages".into(),
        ImageOp::Check(_) => "offline checks".into(),
        ImageOp::WriteFile { path, .. } => format!("write {path}"),
        ImageOp::Unpack { path, .. } => format!("copy into {path}"),
        ImageOp::Script { chroot: true, .. } => "script in the image".into(),
        ImageOp::Script { chroot: false, .. } => "script in the helper".into(),
        ImageOp::Users(_) => "users".into(),
        ImageOp::Hostname(_) => "hostname".into(),
        ImageOp::Locale(_) => "locale".into(),
        ImageOp::Timezone(_) => "timezone".into(),
        ImageOp::Services(_) => "services".into(),
        ImageOp::Fstab(_) => "fstab".into(),
        ImageOp::Bootloader(_) => "bootloader".into(),
    }
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
    Ok(format!("{TARGET}{}", path.trim_end_matches('/')))
}

/// A program run in the image's chroot, with its own tools and non-interactive apt.
fn chroot<S: AsRef<str>>(argv: &[S]) -> Program {
    let mut full = vec![String::from("chroot"), TARGET.to_owned()];
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

fn remove_full(job: &Job, full: &Path) -> Result<(), OperationError> {
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
