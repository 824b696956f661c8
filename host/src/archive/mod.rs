//! A client for Debian package archives that trusts nothing it downloads until it is
//! verified: `InRelease` against the archive keys shipped with imgvm, every index and
//! every `.deb` against the SHA256 sums the signed release lists. Verified files are kept
//! in a content-addressed cache, so they are downloaded once.

mod deb;
mod fetch;
mod packages;
mod release;

pub use deb::extract_data;
pub use fetch::{hex, missing, sha256_of, Fetcher, Stats, Status};
pub use packages::{Package, PackageIndex};
pub use release::{parse_date, Freshness, Release, KEYRING};

use crate::arch::Arch;
use crate::lock::{LockedPackage, LockedRelease};
use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// One suite of one mirror, e.g. `http://deb.debian.org/debian` `trixie`.
pub struct Archive {
    mirror: String,
    suite: String,
    fetcher: Fetcher,
    /// Where verified files are kept, named by their SHA256 ([`crate::cache::verified`]).
    store: PathBuf,
}

impl Archive {
    pub fn new(mirror: &str, suite: &str, store: &Path, fetcher: Fetcher) -> Self {
        Archive {
            mirror: mirror.trim_end_matches('/').to_owned(),
            suite: suite.to_owned(),
            fetcher,
            store: store.to_owned(),
        }
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub fn mirror(&self) -> &str {
        &self.mirror
    }

    pub fn suite(&self) -> &str {
        &self.suite
    }

    /// The verified package index of `main` for `arch` (which includes `Architecture: all`),
    /// and the release that lists it: the one the mirror serves now, or with `pin` the
    /// one a lock names.
    pub fn index(&self, arch: Arch, pin: Option<&LockedRelease>) -> Result<(PackageIndex, LockedRelease)> {
        let (release, locked) = match pin {
            Some(pin) => (self.pinned_release(pin)?, pin.clone()),
            None => self.release()?,
        };
        let url = &locked.url;
        let path = format!("main/binary-{}/Packages.xz", arch.debian());
        let entry = release
            .file(&path)
            .with_context(|| format!("{url} lists no {path}: is `{}` a Debian suite?", self.suite))?;
        let url = format!("{}/dists/{}/{path}", self.mirror, self.suite);
        let file = self.cached(&url, &entry.sha256, entry.size)?;
        let reader = liblzma::read::XzDecoder::new(std::fs::File::open(&file)?);
        let index = PackageIndex::parse(std::io::BufReader::new(reader)).with_context(|| format!("parsing {url}"))?;
        Ok((index, locked))
    }

    /// The suite's release as the mirror serves it now, verified, and kept in the
    /// verified store so that a lock naming it can be followed once the mirror moves on.
    pub fn release(&self) -> Result<(Release, LockedRelease)> {
        let url = crate::lock::release_url(&self.mirror, &self.suite);
        let signed = self.fetcher.get(&url).with_context(|| format!("fetching {url}"))?;
        let release =
            Release::verify(&signed, &self.suite, Freshness::of(&url)).with_context(|| format!("verifying {url}"))?;
        let locked = LockedRelease {
            url,
            sha256: hex(&sha2::Sha256::digest(&signed)),
            date: release.date().unwrap_or_default().to_owned(),
        };
        self.keep(&signed, &locked.sha256)?;
        Ok((release, locked))
    }

    /// The release `pin` names: from the verified store, or from the mirror while it
    /// still serves that very release.
    fn pinned_release(&self, pin: &LockedRelease) -> Result<Release> {
        let stored = self.store.join(&pin.sha256);
        let signed = match std::fs::read(&stored) {
            Ok(signed) if hex(&sha2::Sha256::digest(&signed)) == pin.sha256 => signed,
            _ => {
                let signed = self
                    .fetcher
                    .get(&pin.url)
                    .with_context(|| format!("fetching {}", pin.url))?;
                if hex(&sha2::Sha256::digest(&signed)) != pin.sha256 {
                    bail!(
                        "the release {} of {} is not in imgvm's cache, and the mirror now serves another one",
                        pin.url,
                        pin.date
                    );
                }
                self.keep(&signed, &pin.sha256)?;
                signed
            }
        };
        Release::verify(&signed, &self.suite, Freshness::Locked).with_context(|| format!("verifying {}", pin.url))
    }

    fn keep(&self, body: &[u8], sha256: &str) -> Result<()> {
        keep(&self.store, body, sha256)
    }

    /// `package` as the lock records it.
    pub fn locked(&self, package: &Package) -> LockedPackage {
        LockedPackage::listed(&self.mirror, package)
    }

    /// The `.deb` of `package`, verified against the index, from the cache if it is there.
    pub fn deb(&self, package: &Package) -> Result<PathBuf> {
        let url = format!("{}/{}", self.mirror, package.filename);
        self.cached(&url, &package.sha256, package.size)
            .with_context(|| format!("downloading {} {}", package.name, package.version))
    }

    fn cached(&self, url: &str, sha256: &str, size: u64) -> Result<PathBuf> {
        let path = self.store.join(sha256);
        if path.exists() {
            crate::cache::touch(&path);
        } else {
            self.fetcher.download(url, sha256, size, &path)?;
        }
        Ok(path)
    }
}

/// Puts `body`, which was checked to have the SHA256 `sha256`, into the verified `store`.
pub fn keep(store: &Path, body: &[u8], sha256: &str) -> Result<()> {
    let path = store.join(sha256);
    if path.exists() {
        crate::cache::touch(&path);
        return Ok(());
    }
    std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
    let mut tmp = crate::leftovers::partial_file(store)?;
    std::io::Write::write_all(&mut tmp, body)?;
    tmp.persist(&path)?;
    Ok(())
}

/// `work` on every item, `workers` at a time (the mirror's latency, not our bandwidth,
/// bounds a sequence of small requests); the results in the items' order, or the first
/// error, after which no further item is started.
pub fn in_parallel<T: Sync, R: Send, E: Send>(
    items: &[T],
    workers: usize,
    work: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    let queue = std::sync::Mutex::new(items.iter().enumerate());
    let results = std::sync::Mutex::new(Vec::with_capacity(items.len()));
    let failure = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let Some((i, item)) = queue.lock().unwrap().next() else {
                    return;
                };
                if failure.lock().unwrap().is_some() {
                    return;
                }
                match work(item) {
                    Ok(result) => results.lock().unwrap().push((i, result)),
                    Err(e) => {
                        failure.lock().unwrap().get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn in_parallel_keeps_the_order_and_stops_at_an_error() {
        let items: Vec<u32> = (0..50).collect();
        let doubled = super::in_parallel(&items, 4, |n| Ok::<_, ()>(n * 2)).unwrap();
        assert_eq!(doubled, (0..50).map(|n| n * 2).collect::<Vec<_>>());
        let started = std::sync::atomic::AtomicU32::new(0);
        let failed = super::in_parallel(&items, 1, |n| {
            started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if *n == 3 {
                Err(*n)
            } else {
                Ok(())
            }
        });
        assert_eq!(failed, Err(3));
        assert_eq!(started.into_inner(), 4, "nothing after the error was started");
    }
}
