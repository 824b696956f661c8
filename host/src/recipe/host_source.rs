//! What a `copy` step's source is on the host, read once while the recipe loads: the
//! plan made from the recipe then depends on nothing but the recipe, and the content
//! hash says whether the source changed between two builds.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct HostSource {
    /// Where to read it. Not part of the plan's printed form, which must not depend on
    /// where the recipe happens to be checked out.
    #[serde(skip)]
    pub path: PathBuf,
    pub kind: SourceKind,
    /// SHA-256 of a file's bytes; for a directory, of every entry's relative path, type,
    /// mode and content (or link target), in name order.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Written as one file with this mode.
    File { size: u64, mode: u32 },
    /// Streamed as a tar archive and unpacked.
    Directory { files: u64, bytes: u64 },
}

impl HostSource {
    pub fn read(path: &Path) -> std::io::Result<HostSource> {
        let meta = std::fs::metadata(path)?;
        let mut hasher = Sha256::new();
        let kind = if meta.is_dir() {
            let (mut files, mut bytes) = (0, 0);
            hash_dir(path, Path::new(""), &mut hasher, &mut files, &mut bytes)?;
            SourceKind::Directory { files, bytes }
        } else {
            hasher.update(std::fs::read(path)?);
            SourceKind::File {
                size: meta.len(),
                mode: meta.permissions().mode() & 0o7777,
            }
        };
        Ok(HostSource {
            path: path.to_owned(),
            kind,
            sha256: crate::archive::hex(&hasher.finalize()),
        })
    }
}

fn hash_dir(root: &Path, rel: &Path, hasher: &mut Sha256, files: &mut u64, bytes: &mut u64) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let meta = entry.path().symlink_metadata()?;
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        hasher.update((meta.permissions().mode() & 0o7777).to_le_bytes());
        if meta.is_dir() {
            hasher.update(b"d");
            hash_dir(root, &rel, hasher, files, bytes)?;
        } else if meta.file_type().is_symlink() {
            hasher.update(b"l");
            hasher.update(std::fs::read_link(entry.path())?.as_os_str().as_encoded_bytes());
        } else {
            hasher.update(b"f");
            let content = std::fs::read(entry.path())?;
            hasher.update((content.len() as u64).to_le_bytes());
            hasher.update(&content);
            *files += 1;
            *bytes += content.len() as u64;
        }
        hasher.update([0]);
    }
    Ok(())
}
