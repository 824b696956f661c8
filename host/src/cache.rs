//! imgvm's cache directory, the only place besides the output directory it writes to.

use std::path::{Path, PathBuf};

/// The content-addressed store of verified downloads, named by their SHA256: packages
/// and indexes, whether the host fetched them for the appliance or the package proxy
/// for a guest. Nothing enters it unchecked.
pub fn verified() -> PathBuf {
    dir().join("archive").join("sha256")
}

/// `$IMGVM_CACHE_DIR`, else `$XDG_CACHE_HOME/imgvm`, else `~/.cache/imgvm`.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMGVM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("imgvm-{}", unsafe { libc::getuid() })));
    base.join("imgvm")
}

/// How large the verified store may grow: `$IMGVM_CACHE_LIMIT` (a size such as `20GiB`),
/// else 8 GiB, some builds' worth of packages for a few suites and architectures.
pub fn limit() -> u64 {
    std::env::var("IMGVM_CACHE_LIMIT")
        .ok()
        .and_then(|text| text.parse::<crate::recipe::Size>().ok())
        .map_or(8 << 30, |size| size.bytes())
}

/// Marks `file` as just used, so that [`trim`] keeps it longest.
pub fn touch(file: &Path) {
    let _ = std::fs::File::open(file).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// Removes the least recently used files of `dir` until it holds at most `limit` bytes;
/// what was removed, in bytes. A file removed under a build that was about to serve it
/// is fetched again.
pub fn trim(dir: &Path, limit: u64) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        // Partial files (`.imgvm-partial-…`) are a running build's.
        .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
        .filter_map(|e| {
            let meta = e.metadata().ok().filter(|m| m.is_file())?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    files.sort();
    let mut removed = 0;
    for (_, len, path) in files {
        if total <= limit {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed += len;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn trimming_removes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        for (name, age) in [(".imgvm-partial-x", 900), ("old", 300), ("middle", 200), ("new", 100)] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(now - Duration::from_secs(age)).unwrap();
        }
        // Using it makes the oldest the newest.
        touch(&dir.path().join("old"));
        assert_eq!(trim(dir.path(), 2000), 1000);
        assert!(!dir.path().join("middle").exists());
        assert!(dir.path().join("old").exists() && dir.path().join("new").exists());
        assert!(
            dir.path().join(".imgvm-partial-x").exists(),
            "a download in progress was removed"
        );
        assert_eq!(trim(dir.path(), 2000), 0);
    }
}
