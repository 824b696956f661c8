//! The NoCloud seed: a small vfat disk labelled CIDATA holding `meta-data` and
//! `user-data`, which cloud-init reads at first boot. Written directly (no mkfs, no
//! mount), so no tool and no privilege is needed.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Big enough for FAT12 and a few small files.
const SIZE: u64 = 1 << 20;

/// The user-data that lets these ssh keys (`authorized_keys` lines) in as the image's
/// default user.
pub fn ssh_user_data(keys: &[String]) -> String {
    let mut user_data = "#cloud-config\nssh_authorized_keys:\n".to_owned();
    for key in keys {
        user_data.push_str(&format!("  - {}\n", serde_json::Value::from(key.as_str())));
    }
    user_data
}

/// Writes the seed to `path`, for a machine named `hostname`.
pub fn write(path: &Path, instance_id: &str, hostname: &str, user_data: &str) -> Result<()> {
    let meta_data = format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n");
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
    for (name, content) in [("meta-data", meta_data.as_str()), ("user-data", user_data)] {
        let mut f = fs.root_dir().create_file(name)?;
        f.truncate()?;
        f.write_all(content.as_ref())?;
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
        write(&path, "i-1", "imgvm-test", "#cloud-config\nruncmd: [[echo, hi]]\n").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let mut user_data = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut user_data)
            .unwrap();
        assert_eq!(user_data, "#cloud-config\nruncmd: [[echo, hi]]\n");
        let mut meta = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut meta)
            .unwrap();
        assert_eq!(meta, "instance-id: i-1\nlocal-hostname: imgvm-test\n");
    }

    #[test]
    fn ssh_keys_are_quoted_for_yaml() {
        let keys = [
            "ssh-ed25519 AAAAC3Nz me@host".to_owned(),
            "ssh-rsa AAAAB3 \"odd\" #x".to_owned(),
        ];
        assert_eq!(
            ssh_user_data(&keys),
            "#cloud-config\nssh_authorized_keys:\n  - \"ssh-ed25519 AAAAC3Nz me@host\"\n  - \"ssh-rsa AAAAB3 \\\"odd\\\" #x\"\n"
        );
    }
}
