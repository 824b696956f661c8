//! What the package proxy knows to be genuine, learnt the way apt learns it: a release
//! (`InRelease`) with a valid signature by a Debian archive key lists the SHA256 of
//! every index; an index listed there (a `Packages` file) lists the SHA256 of every
//! package. The proxy caches only files whose checksum it knows this way, stores them
//! under that checksum, and checks them again before serving them from the cache; what
//! it cannot check it passes through uncached (apt in the guest still checks it).
//! A by-hash URL names its own checksum, so its content is checked against its name.

use crate::archive::{Freshness, PackageIndex, Release};
use crate::lock::{Listed, LockedPackage, LockedRelease};
use sha2::Digest;
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
    /// SHA256 of an index listed by a verified release → its mirror and its path there.
    indexes: Mutex<HashMap<String, Index>>,
    /// Path under the mirror of a package listed by a verified index → its checksum.
    pool: Mutex<HashMap<String, Expected>>,
    /// The releases and packages above, for the build's lock.
    listed: Mutex<Listed>,
}

#[derive(Debug, Clone)]
struct Index {
    mirror: String,
    path: String,
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

    /// Everything learnt so far from verified releases and indices.
    pub fn listed(&self) -> Listed {
        self.listed.lock().unwrap().clone()
    }

    /// Learns from a release the mirror served at `url` for `path` (`dists/SUITE/InRelease`
    /// under the mirror), if it verifies; says whether it did.
    pub fn release(&self, url: &str, path: &str, body: &[u8]) -> bool {
        let Some(suite) = path.strip_prefix("dists/").and_then(|p| p.strip_suffix("/InRelease")) else {
            return false;
        };
        let Some(mirror) = url.strip_suffix(path) else {
            return false;
        };
        match Release::verify(body, suite, Freshness::of(url)) {
            Ok(release) => {
                let mut indexes = self.indexes.lock().unwrap();
                for (file, entry) in release.files() {
                    let index = Index {
                        mirror: mirror.trim_end_matches('/').to_owned(),
                        path: file.to_owned(),
                    };
                    indexes.insert(entry.sha256.clone(), index);
                }
                self.listed.lock().unwrap().add_release(LockedRelease {
                    url: url.to_owned(),
                    sha256: crate::archive::hex(&sha2::Sha256::digest(body)),
                    date: release.date().unwrap_or_default().to_owned(),
                });
                true
            }
            Err(e) => {
                tracing::debug!("package proxy: {path} does not verify: {e:#}");
                false
            }
        }
    }

    /// Learns the packages of an index with checksum `sha256` stored at `file`, if a
    /// verified release lists it as a `Packages` index.
    pub fn index(&self, sha256: &str, file: &Path) {
        let index = self.indexes.lock().unwrap().get(sha256).cloned();
        let Some(index) = index.filter(|i| i.path.rsplit('/').next().is_some_and(|n| n.starts_with("Packages"))) else {
            return;
        };
        let parsed = std::fs::File::open(file)
            .map_err(anyhow::Error::from)
            .and_then(|f| PackageIndex::parse(std::io::BufReader::new(decompressed(f)?)));
        match parsed {
            Ok(parsed) => {
                let mut pool = self.pool.lock().unwrap();
                let mut listed = self.listed.lock().unwrap();
                for package in parsed.packages() {
                    listed.add_package(LockedPackage::listed(&index.mirror, package));
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

    /// Learns every package index that a verified release lists and `store` holds.
    pub fn recall(&self, store: &Path) {
        let stored: Vec<String> = self
            .indexes
            .lock()
            .unwrap()
            .keys()
            .filter(|sha256| store.join(sha256).is_file())
            .cloned()
            .collect();
        for sha256 in stored {
            self.index(&sha256, &store.join(&sha256));
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
        known.indexes.lock().unwrap().insert(
            "feed".into(),
            Index {
                mirror: "http://m/debian".into(),
                path: "main/binary-amd64/Packages".into(),
            },
        );
        known.index("feed", &index);
        assert_eq!(
            known.expected("pool/main/f/foo/foo_1_amd64.deb"),
            Some(Expected {
                sha256: "abc".into(),
                size: Some(3)
            })
        ); // And the lock learns where it came from.
        let listed = known.listed();
        use crate::lock::{tests as lock, Lock};
        let installed = lock::installed("foo", "1", "amd64");
        let lock = Lock::new(lock::subject(), 0, &[installed], &listed, lock::helper("x"));
        assert_eq!(lock.packages[0].archive, "http://m/debian");
        assert_eq!(lock.packages[0].filename, "pool/main/f/foo/foo_1_amd64.deb");
        assert_eq!(lock.packages[0].sha256, "abc");
    }

    #[test]
    fn the_stored_indices_of_a_known_release_are_recalled() {
        let store = tempfile::tempdir().unwrap();
        let package = "Package: foo\nVersion: 1\nArchitecture: amd64\nFilename: pool/main/f/foo/foo_1_amd64.deb\nSize: 3\nSHA256: abc\n\n";
        std::fs::write(store.path().join("feed"), package).unwrap();
        let known = Known::default();
        for (sha256, path) in [
            ("feed", "main/binary-amd64/Packages"),
            ("gone", "main/binary-arm64/Packages"),
        ] {
            let index = Index {
                mirror: "http://m/debian".into(),
                path: path.into(),
            };
            known.indexes.lock().unwrap().insert(sha256.into(), index);
        }
        assert_eq!(known.expected("pool/main/f/foo/foo_1_amd64.deb"), None);
        known.recall(store.path());
        assert_eq!(known.expected("pool/main/f/foo/foo_1_amd64.deb").unwrap().sha256, "abc");
    }

    #[test]
    fn an_unsigned_release_teaches_nothing() {
        let known = Known::default();
        known.release(
            "http://snapshot.debian.org/archive/debian/20261128T000000Z/dists/trixie/InRelease",
            "dists/trixie/InRelease",
            b"Suite: trixie\nSHA256:\n feed 1 main/binary-amd64/Packages\n",
        );
        assert!(known.indexes.lock().unwrap().is_empty());
        assert!(known.listed().releases.is_empty());
    }
}
