//! Reproducible images: the build's date for every program, and the finished tree
//! written onto a fresh disk as filesystems made from it, which hold none of the build's
//! times, allocation order or random values.

use super::disk::{device, mkfs, wait_for_partitions};
use super::{run, target};
use crate::command::{self, Program};
use crate::job::Job;
use imgvm_protocol::{ErrorKind, Filesystem, Handle, OperationError, Seal, SealedFilesystem, SourceDateEpoch};
use std::os::unix::fs::FileExt;
use std::path::Path;

impl Handle<SourceDateEpoch> for Job<'_> {
    fn handle(&self, SourceDateEpoch(epoch): SourceDateEpoch) -> Result<(), OperationError> {
        command::set_source_date_epoch(epoch);
        Ok(())
    }
}

/// Where a filesystem's own tree is seen while it is sealed: a bind mount of its mount
/// point alone, so that the filesystems mounted below it stay out (their mount points
/// are the empty directories they are on the disk).
const TREE: &str = "/run/imgvm-seal";

impl Handle<Seal> for Job<'_> {
    fn handle(&self, op: Seal) -> Result<(), OperationError> {
        let job = self;
        if op.filesystems.iter().all(|f| f.partition.is_some()) {
            let mut remade = Vec::new();
            for number in op.filesystems.iter().filter_map(|f| f.partition) {
                remade.push(partition_extent(job, &op.from, number)?);
            }
            copy_except(job, &op.from, &op.to, &remade)?;
            // The copied partition table, as the kernel's partitions of the new disk.
            run(job, &Program::new(&["blockdev", "--rereadpt", &op.to]))?;
            wait_for_partitions(job, &op.to, op.filesystems.iter().filter_map(|f| f.partition))?;
        }
        for fs in &op.filesystems {
            seal_one(job, fs)?;
        }
        Ok(())
    }
}

/// Makes `fs` on its device from the tree mounted at its mount point.
fn seal_one(job: &Job, fs: &SealedFilesystem) -> Result<(), OperationError> {
    std::fs::create_dir_all(TREE).map_err(|e| job.io_error(&e))?;
    run(job, &Program::new(&["mount", "--bind", &target(job, &fs.mount)?, TREE]))?;
    let made = match fs.mkfs.filesystem {
        Filesystem::Ext4 => run(job, &mkfs(&fs.mkfs, Some(TREE))),
        Filesystem::Vfat => {
            run(job, &mkfs(&fs.mkfs, None)).and_then(|()| fat_copy(job, Path::new(TREE), "::", &fs.mkfs.device))
        }
        other => Err(job.error(
            ErrorKind::InvalidRequest,
            format!("{} cannot be made from a tree", other.name()),
        )),
    };
    let unmounted = run(job, &Program::new(&["umount", TREE]));
    made.and(unmounted)
}

/// Copies the tree `dir` into the FAT filesystem on `device` at `at` (`::/EFI`), in name
/// order. Without `-m`, mtools stamps everything with `SOURCE_DATE_EPOCH`.
fn fat_copy(job: &Job, dir: &Path, at: &str, device: &str) -> Result<(), OperationError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| job.io_error(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| job.io_error(&e))?;
    entries.sort_by_key(|e| e.file_name());
    let mtools = |argv: &[&str]| {
        let mut full = argv.to_vec();
        full.extend(["-i", device]);
        Program::new(&full).env("MTOOLS_SKIP_CHECK", "1")
    };
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for entry in &entries {
        let kind = entry.file_type().map_err(|e| job.io_error(&e))?;
        let path = entry.path();
        match () {
            () if kind.is_dir() => dirs.push(path),
            () if kind.is_file() => files.push(path.to_string_lossy().into_owned()),
            () => {
                return Err(job.error(
                    ErrorKind::InvalidRequest,
                    format!(
                        "{} is neither a file nor a directory: a FAT filesystem cannot hold it",
                        path.display()
                    ),
                ))
            }
        }
    }
    if !files.is_empty() {
        let mut argv = vec!["mcopy", "-Q"];
        argv.extend(files.iter().map(String::as_str));
        let dest = format!("{at}/");
        argv.push(&dest);
        run(job, &mtools(&argv))?;
    }
    for sub in dirs {
        let name = sub.file_name().expect("read_dir names its entries").to_string_lossy();
        let inner = format!("{}/{name}", at.trim_end_matches('/'));
        run(job, &mtools(&["mmd", &inner]))?;
        fat_copy(job, &sub, &inner, device)?;
    }
    Ok(())
}

/// Where partition `number` of `disk` lies, in bytes (start, length), as the kernel has
/// it.
fn partition_extent(job: &Job, disk: &str, number: u32) -> Result<(u64, u64), OperationError> {
    let part = device(disk, number);
    let name = |p: &str| p.trim_start_matches("/dev/").to_owned();
    let sectors = |field: &str| -> Result<u64, OperationError> {
        let path = format!("/sys/block/{}/{}/{field}", name(disk), name(&part));
        let text = std::fs::read_to_string(&path).map_err(|e| job.io_error(&e))?;
        text.trim()
            .parse::<u64>()
            .map_err(|_| job.error(ErrorKind::Io, format!("{path} holds {text:?}, not a number")))
    };
    Ok((sectors("start")? * 512, sectors("size")? * 512))
}

/// Copies every byte of `from` outside `skip` (start, length) to the same place of `to`,
/// which is empty: blocks of zeros are left out, so the new disk stays sparse.
fn copy_except(job: &Job, from: &str, to: &str, skip: &[(u64, u64)]) -> Result<(), OperationError> {
    let io = |e: std::io::Error| job.io_error(&e);
    let source = std::fs::File::open(from).map_err(io)?;
    let dest = std::fs::OpenOptions::new().write(true).open(to).map_err(io)?;
    let size = std::fs::read_to_string(format!("/sys/block/{}/size", from.trim_start_matches("/dev/")))
        .map_err(io)?
        .trim()
        .parse::<u64>()
        .map_err(|_| job.error(ErrorKind::Io, format!("the size of {from} is not a number")))?
        * 512;
    let mut buffer = vec![0u8; 1 << 20];
    for (start, end) in ranges_outside(size, skip) {
        let mut at = start;
        while at < end {
            let len = (end - at).min(buffer.len() as u64) as usize;
            source.read_exact_at(&mut buffer[..len], at).map_err(io)?;
            if buffer[..len].iter().any(|&b| b != 0) {
                dest.write_all_at(&buffer[..len], at).map_err(io)?;
            }
            at += len as u64;
        }
    }
    dest.sync_all().map_err(io)
}

/// `[0, size)` without the ranges in `skip`, as (start, end) in order.
fn ranges_outside(size: u64, skip: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut skip = skip.to_vec();
    skip.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for (start, len) in skip {
        if start > at {
            out.push((at, start.min(size)));
        }
        at = at.max(start + len);
    }
    if at < size {
        out.push((at, size));
    }
    out.retain(|(s, e)| s < e);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_copied_is_the_disk_without_the_remade_partitions() {
        // GPT and BIOS boot before the ESP (1 MiB-4 MiB), root after it, backup GPT last.
        let mib = 1 << 20;
        let skip = [(128 * mib, 896 * mib - 34 * 512), (4 * mib, 124 * mib)];
        assert_eq!(
            ranges_outside(1024 * mib, &skip),
            [(0, 4 * mib), (1024 * mib - 34 * 512, 1024 * mib)]
        );
        assert_eq!(ranges_outside(10, &[]), [(0, 10)]);
        assert_eq!(ranges_outside(10, &[(0, 10)]), []);
    }
}
