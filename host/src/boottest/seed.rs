//! The NoCloud seed: a small vfat disk labelled CIDATA holding `meta-data` and
//! `user-data`, which cloud-init reads at first boot. Written directly (no mkfs, no
//! mount), so no tool and no privilege is needed.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Big enough for FAT12 and a few small files.
const SIZE: u64 = 1 << 20;

/// Writes the seed to `path`: cloud-init prints `marker_command`'s output on the console
/// and powers the machine off.
pub fn write(path: &Path, instance_id: &str, marker_command: &str) -> Result<()> {
    let meta_data = format!("instance-id: {instance_id}\nlocal-hostname: imgvm-test\n");
    let user_data = format!(
        "#cloud-config\nruncmd:\n  - [sh, -c, {}]\npower_state:\n  mode: poweroff\n  delay: now\n  timeout: 30\n",
        serde_json::to_string(&format!("{marker_command} > /dev/console"))?
    );
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(SIZE)?;
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
    )
    .context("formatting the seed")?;
    let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).context("opening the seed")?;
    for (name, content) in [("meta-data", meta_data), ("user-data", user_data)] {
        let mut f = fs.root_dir().create_file(name)?;
        f.truncate()?;
        f.write_all(content.as_bytes())?;
    }
    fs.unmount()?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_is_a_cidata_vfat_with_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write(&path, "i-1", "echo hi").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let mut user_data = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut user_data)
            .unwrap();
        assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
        assert!(
            user_data.contains("  - [sh, -c, \"echo hi > /dev/console\"]\n"),
            "{user_data}"
        );
        let mut meta = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut meta)
            .unwrap();
        assert_eq!(meta, "instance-id: i-1\nlocal-hostname: imgvm-test\n");
    }
}
