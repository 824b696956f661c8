//! Partition table, filesystems and the mount tree of the image.

use super::{run, target};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{
    ErrorKind, Filesystem, Freeze, Handle, Mkfs, Mount, OperationError, Partition, Table, Thaw, Unmount, TARGET,
};
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
            label_id,
        } = &op;
        let Some(table) = table else {
            return run(job, &Program::new(&["wipefs", "--all", "--quiet", disk]));
        };
        let gpt = *table == Table::Gpt;
        // Partitions are written in list order, so the last one (root) is physically last
        // whatever its number.
        let mut script = format!("label: {}\nunit: sectors\n", if gpt { "gpt" } else { "dos" });
        if let Some(id) = label_id {
            script.push_str(&format!("label-id: {id}\n"));
        }
        script.push('\n');
        for part in parts {
            let mut fields = Vec::new();
            if let Some(size) = part.size_bytes {
                fields.push(format!("size={}", size / 512));
            }
            fields.push(format!("type={}", part.type_code));
            if let (true, Some(uuid)) = (gpt, &part.uuid) {
                fields.push(format!("uuid={uuid}"));
            }
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
        wait_for_partitions(job, disk, parts.iter().map(|p| p.number))
    }
}

/// Waits (at most [`DEVICE_PATIENCE`]) for the kernel to create the device nodes of a
/// new partition table's partitions.
pub(super) fn wait_for_partitions(
    job: &Job,
    disk: &str,
    numbers: impl Iterator<Item = u32>,
) -> Result<(), OperationError> {
    let deadline = Instant::now() + DEVICE_PATIENCE;
    for number in numbers {
        let dev = device(disk, number);
        while !std::path::Path::new(&dev).exists() {
            if Instant::now() > deadline {
                return Err(job.error(ErrorKind::Io, format!("{dev} did not appear after partitioning")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// The kernel's name for partition `number` of `disk` (`/dev/vda` → `/dev/vda1`).
pub(super) fn device(disk: &str, number: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

impl Handle<Mkfs> for Job<'_> {
    fn handle(&self, op: Mkfs) -> Result<(), OperationError> {
        run(self, &mkfs(&op, None))
    }
}

/// The mkfs program for `m`; with `tree`, mke2fs populates the new ext4 from it.
pub(super) fn mkfs(m: &Mkfs, tree: Option<&str>) -> Program {
    let mut argv: Vec<String> = match m.filesystem {
        Filesystem::Ext4 => vec!["mkfs.ext4".into(), "-q".into()],
        Filesystem::Xfs => vec!["mkfs.xfs".into(), "-q".into(), "-f".into()],
        Filesystem::Btrfs => vec!["mkfs.btrfs".into(), "-q".into(), "-f".into()],
        // Without random or time-based values: only the volume id differs, and it is
        // given.
        Filesystem::Vfat => vec!["mkfs.vfat".into(), "--invariant".into()],
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
    let mut options = m.options.clone();
    if let (Filesystem::Ext4, Some(seed)) = (m.filesystem, &m.hash_seed) {
        extended_option(&mut options, &format!("hash_seed={seed}"));
    }
    argv.extend(options);
    if let (Filesystem::Ext4, Some(tree)) = (m.filesystem, tree) {
        argv.extend(["-d".into(), tree.into()]);
    }
    argv.push(m.device.clone());
    Program::new(&argv)
}

/// Adds `option` to mke2fs's `-E` list: mke2fs reads only the last `-E`, so a recipe's
/// own extended options are extended, not replaced.
fn extended_option(options: &mut Vec<String>, option: &str) {
    match options.iter().rposition(|o| o == "-E") {
        Some(i) if i + 1 < options.len() => options[i + 1] = format!("{},{option}", options[i + 1]),
        _ => options.extend(["-E".into(), option.into()]),
    }
}

impl Handle<Mount> for Job<'_> {
    fn handle(&self, op: Mount) -> Result<(), OperationError> {
        let job = self;
        let Mount { device, path } = &op;
        let dir = target(job, path)?;
        std::fs::create_dir_all(&dir).map_err(|e| job.io_error(&e))?;
        // No access times: reading a file during the build must not change the image.
        run(job, &Program::new(&["mount", "-o", "noatime", device, &dir]))
    }
}

/// Trims, then unmounts everything below the image's root, deepest first, and syncs.
impl Handle<Unmount> for Job<'_> {
    fn handle(&self, op: Unmount) -> Result<(), OperationError> {
        let job = self;
        let Unmount { trim } = &op;
        // Nothing of the image may be open while it is unmounted.
        super::prefetch::stop();
        let mut points = image_mounts().map_err(|e| job.io_error(&e))?;
        points.sort_by_key(|m| std::cmp::Reverse(m.point.matches('/').count()));
        for ImageMount { point, fstype, .. } in points {
            // Trimming keeps the image sparse; filesystems that cannot do it are skipped.
            if *trim && ["ext4", "xfs", "btrfs", "vfat"].contains(&fstype.as_str()) {
                run(job, &Program::new(&["fstrim", "--quiet-unsupported", &point]))?;
            }
            run(job, &Program::new(&["umount", &point]))?;
        }
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        Ok(())
    }
}

/// `FIFREEZE` and `FITHAW`, `_IOWR('X', 119 / 120, int)`: the same number on every
/// architecture imgvm builds for (powerpc's direction bits land on the same value).
const FIFREEZE: u64 = 0xC004_5877;
const FITHAW: u64 = 0xC004_5878;

/// Syncs, then freezes the image's disk filesystems, parents first; one that cannot be
/// frozen (vfat) has been written out by the sync and is left as it is: nothing in the
/// helper writes between a step and the host keeping its state.
impl Handle<Freeze> for Job<'_> {
    fn handle(&self, _op: Freeze) -> Result<(), OperationError> {
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        for mount in disk_mounts(self)? {
            match filesystem_ioctl(&mount.point, FIFREEZE) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(self.error(ErrorKind::Io, format!("cannot freeze {}: {e}", mount.point))),
            }
        }
        Ok(())
    }
}

/// Thaws what [`Freeze`] froze, children first; one that is not frozen is left alone.
impl Handle<Thaw> for Job<'_> {
    fn handle(&self, _op: Thaw) -> Result<(), OperationError> {
        let mut mounts = disk_mounts(self)?;
        mounts.reverse();
        for mount in mounts {
            match filesystem_ioctl(&mount.point, FITHAW) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
                Err(e) => return Err(self.error(ErrorKind::Io, format!("cannot thaw {}: {e}", mount.point))),
            }
        }
        Ok(())
    }
}

/// The image's filesystems on a disk (not the chroot's pseudo filesystems), parents first.
fn disk_mounts(job: &Job) -> Result<Vec<ImageMount>, OperationError> {
    let mut mounts: Vec<_> = image_mounts()
        .map_err(|e| job.io_error(&e))?
        .into_iter()
        .filter(|m| m.source.starts_with("/dev/vd"))
        .collect();
    mounts.sort_by_key(|m| m.point.matches('/').count());
    Ok(mounts)
}

fn filesystem_ioctl(point: &str, request: u64) -> std::io::Result<()> {
    let dir = std::fs::File::open(point)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take an int argument (unused) on an open directory.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&dir), request as _, &mut arg) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A mount at or below the image's root.
struct ImageMount {
    source: String,
    point: String,
    fstype: String,
}

fn image_mounts() -> std::io::Result<Vec<ImageMount>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ');
            Some(ImageMount {
                source: unescape(fields.next()?),
                point: unescape(fields.next()?),
                fstype: fields.next()?.to_owned(),
            })
        })
        .filter(|m| m.point == TARGET || m.point.starts_with(&format!("{TARGET}/")))
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4(options: &[&str]) -> Mkfs {
        Mkfs {
            device: "/dev/vdb1".into(),
            filesystem: Filesystem::Ext4,
            label: Some("root".into()),
            uuid: Some("0f1e2d3c-4b5a-8978-8695-a4b3c2d1e0f9".into()),
            hash_seed: Some("6b2c3f0e-8d41-8a7e-9c55-0d1e2f3a4b5c".into()),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn an_ext4_is_made_with_its_uuid_and_hash_seed_and_populated_from_its_tree() {
        let program = mkfs(&ext4(&["-O", "^metadata_csum_seed"]), Some("/run/tree"));
        assert_eq!(
            program.argv.join(" "),
            "mkfs.ext4 -q -L root -U 0f1e2d3c-4b5a-8978-8695-a4b3c2d1e0f9 -O ^metadata_csum_seed \
             -E hash_seed=6b2c3f0e-8d41-8a7e-9c55-0d1e2f3a4b5c -d /run/tree /dev/vdb1"
        );
    }

    #[test]
    fn the_hash_seed_joins_the_recipes_own_extended_options() {
        let program = mkfs(&ext4(&["-E", "lazy_itable_init=0"]), None);
        assert!(
            program
                .argv
                .join(" ")
                .contains(" -E lazy_itable_init=0,hash_seed=6b2c3f0e-8d41-8a7e-9c55-0d1e2f3a4b5c /dev/vdb1"),
            "{:?}",
            program.argv
        );
        assert_eq!(program.argv.iter().filter(|a| *a == "-E").count(), 1);
    }

    #[test]
    fn a_vfat_is_made_without_random_or_time_based_values() {
        let m = Mkfs {
            device: "/dev/vdb15".into(),
            filesystem: Filesystem::Vfat,
            label: None,
            uuid: Some("1A2B-3C4D".into()),
            hash_seed: None,
            options: Vec::new(),
        };
        assert_eq!(
            mkfs(&m, None).argv.join(" "),
            "mkfs.vfat --invariant -i 1A2B3C4D /dev/vdb15"
        );
    }
}
