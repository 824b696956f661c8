//! `imgvm diff --files`: every file of a finished image's filesystem, with what a
//! comparison needs (kind, mode, owner, size, time, link target, content hash).

use super::run;
use crate::command::Program;
use crate::job::Job;
use imgvm_protocol::{FileEntry, Filesystem, Handle, ListFiles, OperationError};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Where the filesystem is mounted while it is listed.
const MOUNT: &str = "/run/imgvm-list";

impl Handle<ListFiles> for Job<'_> {
    fn handle(&self, op: ListFiles) -> Result<Vec<FileEntry>, OperationError> {
        let job = self;
        std::fs::create_dir_all(MOUNT).map_err(|e| job.io_error(&e))?;
        // `noload`: a read-only ext4 whose journal needs replaying is read as it is.
        let options = match op.filesystem {
            Filesystem::Ext4 => "ro,noload",
            _ => "ro",
        };
        run(job, &Program::new(&["mount", "-o", options, &op.device, MOUNT]))?;
        let mut entries = Vec::new();
        let listed = list(job, Path::new(MOUNT), "", &mut entries);
        let unmounted = run(job, &Program::new(&["umount", MOUNT]));
        listed.and(unmounted).map(|()| entries)
    }
}

/// Appends `dir` (shown as `shown`) and everything below it, in name order.
fn list(job: &Job, dir: &Path, shown: &str, out: &mut Vec<FileEntry>) -> Result<(), OperationError> {
    let io = |e: std::io::Error| job.io_error(&e);
    out.push(entry(job, dir, if shown.is_empty() { "/" } else { shown })?);
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let shown = format!("{shown}/{}", name.to_string_lossy());
        if std::fs::symlink_metadata(&path).map_err(io)?.is_dir() {
            list(job, &path, &shown, out)?;
        } else {
            out.push(entry(job, &path, &shown)?);
        }
    }
    Ok(())
}

fn entry(job: &Job, path: &Path, shown: &str) -> Result<FileEntry, OperationError> {
    let io = |e: std::io::Error| job.io_error(&e);
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let kind = meta.file_type();
    let kind = match () {
        () if kind.is_file() => 'f',
        () if kind.is_dir() => 'd',
        () if kind.is_symlink() => 'l',
        () if kind.is_char_device() => 'c',
        () if kind.is_block_device() => 'b',
        () if kind.is_fifo() => 'p',
        _ => 's',
    };
    let target = match kind {
        'l' => Some(std::fs::read_link(path).map_err(io)?.to_string_lossy().into_owned()),
        _ => None,
    };
    let sha256 = match kind {
        'f' => Some(content_hash(path).map_err(io)?),
        _ => None,
    };
    Ok(FileEntry {
        path: shown.to_owned(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: if kind == 'd' { 0 } else { meta.size() },
        mtime: meta.mtime(),
        target,
        rdev: meta.rdev(),
        sha256,
    })
}

fn content_hash(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::with_test_job;

    #[test]
    fn a_tree_is_listed_in_path_order_with_content_hashes_and_link_targets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/hostname"), b"localhost\n").unwrap();
        std::os::unix::fs::symlink("hostname", dir.path().join("etc/name")).unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        let mut out = Vec::new();
        with_test_job(dir.path(), |job| list(job, dir.path(), "", &mut out)).unwrap();
        let paths: Vec<(&str, char)> = out.iter().map(|e| (e.path.as_str(), e.kind)).collect();
        assert_eq!(
            paths,
            [
                ("/", 'd'),
                ("/a", 'f'),
                ("/etc", 'd'),
                ("/etc/hostname", 'f'),
                ("/etc/name", 'l')
            ]
        );
        // sha256 of "localhost\n".
        assert_eq!(
            out[3].sha256.as_deref(),
            Some("d906aecb61d076a967d9ffe8821c7b04b063f72df9d9e35b33ef36b1c0d98f16")
        );
        assert_eq!(out[3].size, 10);
        assert_eq!(out[4].target.as_deref(), Some("hostname"));
    }
}
