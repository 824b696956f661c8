//! Partition table, filesystems and the mount tree of the image.

use super::{run, target};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{ErrorKind, Filesystem, Handle, Mkfs, Mount, OperationError, Partition, Table, Unmount, TARGET};
use std::time::{Duration, Instant};

/// How long the kernel may take to create a new partition's device node.
const DEVICE_PATIENCE: Duration = Duration::from_secs(10);

impl Handle<Partition> for Job<'_> {
    fn handle(&self, op: Partition) -> Result<(), OperationError> {
        let job = self;
        let Partition {
            disk,
            table,
            partitions: parts,
        } = &op;
        let Some(table) = table else {
            return run(job, &Program::new(&["wipefs", "--all", "--quiet", disk]));
        };
        let gpt = *table == Table::Gpt;
        // Partitions are written in list order, so the last one (root) is physically last
        // whatever its number.
        let mut script = format!("label: {}\nunit: sectors\n\n", if gpt { "gpt" } else { "dos" });
        for part in parts {
            let mut fields = Vec::new();
            if let Some(size) = part.size_bytes {
                fields.push(format!("size={}", size / 512));
            }
            fields.push(format!("type={}", part.type_code));
            if gpt {
                fields.push(format!("name=\"{}\"", part.name.replace('"', "")));
            } else if part.bootable {
                fields.push("bootable".into());
            }
            script.push_str(&format!("{} : {}\n", device(disk, part.number), fields.join(", ")));
        }
        let sfdisk = Program::new(&[
            "sfdisk",
            "--quiet",
            "--wipe",
            "always",
            "--wipe-partitions",
            "always",
            disk,
        ]);
        command::run(job, &sfdisk, Input::Bytes(script.into_bytes()), false)?;
        let deadline = Instant::now() + DEVICE_PATIENCE;
        for part in parts {
            let dev = device(disk, part.number);
            while !std::path::Path::new(&dev).exists() {
                if Instant::now() > deadline {
                    return Err(job.error(ErrorKind::Io, format!("{dev} did not appear after partitioning")));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// The kernel's name for partition `number` of `disk` (`/dev/vda` → `/dev/vda1`).
fn device(disk: &str, number: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

impl Handle<Mkfs> for Job<'_> {
    fn handle(&self, op: Mkfs) -> Result<(), OperationError> {
        let job = self;
        let m = &op;
        let mut argv: Vec<String> = match m.filesystem {
            Filesystem::Ext4 => vec!["mkfs.ext4".into(), "-q".into()],
            Filesystem::Xfs => vec!["mkfs.xfs".into(), "-q".into(), "-f".into()],
            Filesystem::Btrfs => vec!["mkfs.btrfs".into(), "-q".into(), "-f".into()],
            Filesystem::Vfat => vec!["mkfs.vfat".into()],
            Filesystem::Swap => vec!["mkswap".into(), "-q".into()],
        };
        if let Some(label) = &m.label {
            argv.push(if m.filesystem == Filesystem::Vfat { "-n" } else { "-L" }.into());
            argv.push(label.clone());
        }
        if let Some(uuid) = &m.uuid {
            match m.filesystem {
                Filesystem::Vfat => argv.extend(["-i".into(), uuid.replace('-', "")]),
                Filesystem::Xfs => argv.extend(["-m".into(), format!("uuid={uuid}")]),
                _ => argv.extend(["-U".into(), uuid.clone()]),
            }
        }
        argv.extend(m.options.iter().cloned());
        argv.push(m.device.clone());
        run(job, &Program::new(&argv))
    }
}

impl Handle<Mount> for Job<'_> {
    fn handle(&self, op: Mount) -> Result<(), OperationError> {
        let job = self;
        let Mount { device, path } = &op;
        let dir = target(job, path)?;
        std::fs::create_dir_all(&dir).map_err(|e| job.io_error(&e))?;
        run(job, &Program::new(&["mount", device, &dir]))
    }
}

/// Trims, then unmounts everything below the image's root, deepest first, and syncs.
impl Handle<Unmount> for Job<'_> {
    fn handle(&self, op: Unmount) -> Result<(), OperationError> {
        let job = self;
        let Unmount { trim } = &op;
        let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| job.io_error(&e))?;
        let mut points: Vec<(String, &str)> = mounts
            .lines()
            .filter_map(|l| {
                let mut fields = l.split(' ').skip(1);
                Some((unescape(fields.next()?), fields.next()?))
            })
            .filter(|(p, _)| p == TARGET || p.starts_with(&format!("{TARGET}/")))
            .collect();
        points.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('/').count()));
        for (point, fstype) in points {
            // Trimming keeps the image sparse; filesystems that cannot do it are skipped.
            if *trim && ["ext4", "xfs", "btrfs", "vfat"].contains(&fstype) {
                run(job, &Program::new(&["fstrim", "--quiet-unsupported", &point]))?;
            }
            run(job, &Program::new(&["umount", &point]))?;
        }
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        Ok(())
    }
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}
