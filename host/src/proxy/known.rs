//! What the package proxy knows to be genuine, learnt the way apt learns it: a release
//! (`InRelease`) with a valid signature by a Debian archive key lists the SHA256 of
//! every index; an index listed there (a `Packages` file) lists the SHA256 of every
//! package. The proxy caches only files whose checksum it knows this way, stores them
//! under that checksum, and checks them again before serving them from the cache; what
//! it cannot check it passes through uncached (apt in the guest still checks it).
//! A by-hash URL names its own checksum, so its content is checked against its name.

use crate::archive::{Freshness, PackageIndex, Release};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

/// The SHA256 (and size, where known) a file must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub sha256: String,
    pub size: Option<u64>,
}

#[derive(Default)]
pub struct Known {
    /// SHA256 of an index listed by a verified release → its path there.
    indexes: Mutex<HashMap<String, String>>,
    /// Path under the mirror of a package listed by a verified index → its checksum.
    pool: Mutex<HashMap<String, Expected>>,
}

impl Known {
    /// What `path` (under the mirror) must be, if that is known.
    pub fn expected(&self, path: &str) -> Option<Expected> {
        if let Some(sha256) = by_hash(path) {
            return Some(Expected {
                sha256: sha256.to_owned(),
                size: None,
            });
        }
        self.pool.lock().unwrap().get(path).cloned()
    }

    /// Learns from a release the mirror served for `path` (`dists/SUITE/InRelease`), if
    /// it verifies.
    pub fn release(&self, path: &str, body: &[u8], freshness: Freshness) {
        let Some(suite) = path.strip_prefix("dists/").and_then(|p| p.strip_suffix("/InRelease")) else {
            return;
        };
        match Release::verify(body, suite, freshness) {
            Ok(release) => {
                let mut indexes = self.indexes.lock().unwrap();
                for (file, entry) in release.files() {
                    indexes.insert(entry.sha256.clone(), file.to_owned());
                }
            }
            Err(e) => tracing::debug!("package proxy: {path} does not verify: {e:#}"),
        }
    }

    /// Learns the packages of an index with checksum `sha256` stored at `file`, if a
    /// verified release lists it as a `Packages` index.
    pub fn index(&self, sha256: &str, file: &Path) {
        let is_packages = self
            .indexes
            .lock()
            .unwrap()
            .get(sha256)
            .is_some_and(|path| path.rsplit('/').next().is_some_and(|name| name.starts_with("Packages")));
        if !is_packages {
            return;
        }
        let parsed = std::fs::File::open(file)
            .map_err(anyhow::Error::from)
            .and_then(|f| PackageIndex::parse(std::io::BufReader::new(decompressed(f)?)));
        match parsed {
            Ok(index) => {
                let mut pool = self.pool.lock().unwrap();
                for package in index.packages() {
                    pool.insert(
                        package.filename.clone(),
                        Expected {
                            sha256: package.sha256.clone(),
                            size: Some(package.size),
                        },
                    );
                }
            }
            Err(e) => tracing::debug!("package proxy: cannot read index {sha256}: {e:#}"),
        }
    }
}

/// The checksum a `…/by-hash/SHA256/<hex>` path names.
fn by_hash(path: &str) -> Option<&str> {
    let (_, hex) = path.rsplit_once("/by-hash/SHA256/")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// `file` as text, whether it is xz, gzip or plain (by its magic number).
fn decompressed(mut file: std::fs::File) -> anyhow::Result<Box<dyn Read>> {
    use std::io::Seek;
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic)?;
    file.rewind()?;
    Ok(match &magic[..n] {
        [0xfd, b'7', b'z', b'X', b'Z', 0] => Box::new(liblzma::read::XzDecoder::new(file)),
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(file)),
        _ => Box::new(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hash_paths_name_their_checksum() {
        let hex = "a".repeat(64);
        let path = format!("dists/trixie/main/binary-amd64/by-hash/SHA256/{hex}");
        assert_eq!(
            Known::default().expected(&path),
            Some(Expected {
                sha256: hex,
                size: None
            })
        );
        assert_eq!(Known::default().expected("dists/trixie/main/by-hash/SHA256/xyz"), None);
        assert_eq!(Known::default().expected("pool/main/f/foo/foo_1_amd64.deb"), None);
    }

    #[test]
    fn packages_are_known_only_from_an_index_a_verified_release_lists() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("Packages");
        std::fs::write(
            &index,
            "Package: foo\nVersion: 1\nArchitecture: amd64\nFilename: pool/main/f/foo/foo_1_amd64.deb\nSize: 3\nSHA256: abc\n\n",
        )
        .unwrap();
        let known = Known::default();
        // No release listed it: a mirror's word alone is not enough.
        known.index("feed", &index);
        assert_eq!(known.expected("pool/main/f/foo/foo_1_amd64.deb"), None);
        known
            .indexes
            .lock()
            .unwrap()
            .insert("feed".into(), "main/binary-amd64/Packages".into());
        known.index("feed", &index);
        assert_eq!(
            known.expected("pool/main/f/foo/foo_1_amd64.deb"),
            Some(Expected {
                sha256: "abc".into(),
                size: Some(3)
            })
        );
    }

    #[test]
    fn an_unsigned_release_teaches_nothing() {
        let known = Known::default();
        known.release(
            "dists/trixie/InRelease",
            b"Suite: trixie\nSHA256:\n feed 1 main/binary-amd64/Packages\n",
            Freshness::Snapshot,
        );
        assert!(known.indexes.lock().unwrap().is_empty());
    }
}
