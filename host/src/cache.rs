//! imgvm's cache directory, the only place besides the output directory it writes to.

use std::path::PathBuf;

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
