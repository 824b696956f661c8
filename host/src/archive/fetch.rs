//! HTTP downloads with retries, hash checks and counters.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Attempts per file. Mirrors fail transiently (5xx, resets, a sync in progress that
/// briefly serves files not matching the index), so a few tries with backoff are normal.
const ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct Fetcher {
    agent: ureq::Agent,
    stats: Arc<Stats>,
    backoff: Duration,
}

/// What was really downloaded, as opposed to found in the cache.
#[derive(Default, Debug)]
pub struct Stats {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

impl Stats {
    pub fn files(&self) -> u64 {
        self.files.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Default for Fetcher {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

impl Fetcher {
    pub fn new(backoff: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_per_call(None)
            .timeout_recv_body(None)
            .timeout_global(None)
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("imgvm/", env!("CARGO_PKG_VERSION")))
            .build();
        Fetcher {
            agent: config.into(),
            stats: Arc::default(),
            backoff,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A small file, in memory (release files).
    pub fn get(&self, url: &str) -> Result<Vec<u8>> {
        self.retry(url, false, || {
            let mut body = Vec::new();
            self.open(url)?.take(64 << 20).read_to_end(&mut body)?;
            self.count(body.len() as u64);
            Ok(body)
        })
    }

    /// Streams `url` into a new temporary file in `dir`, unverified: for clients that
    /// verify themselves (apt in the guest, through the package proxy).
    pub fn fetch(&self, url: &str, dir: &Path) -> Result<tempfile::NamedTempFile> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        self.retry(url, false, || {
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            let n = std::io::copy(&mut self.open(url)?, tmp.as_file_mut())?;
            self.count(n);
            Ok(tmp)
        })
    }

    /// Streams `url` to `dest`, checking size and SHA256 on the way; `dest` appears only
    /// when both match.
    pub fn download(&self, url: &str, sha256: &str, size: u64, dest: &Path) -> Result<()> {
        let dir = dest.parent().context("download target has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // The signed index lists this file, so a 404 means a mirror in the middle of a
        // sync (or an incomplete one): worth waiting for.
        let result = self.retry(url, true, || {
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            let mut reader = self.open(url)?.take(size + 1);
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                tmp.write_all(&buf[..n])?;
                total += n as u64;
            }
            self.count(total);
            if total != size {
                bail!(Mismatch(format!("{url}: got {total} bytes, the index says {size}")));
            }
            let got = hex(&hasher.finalize());
            if got != sha256 {
                bail!(Mismatch(format!("{url}: SHA256 {got}, the index says {sha256}")));
            }
            tmp.persist(dest)?;
            Ok(())
        });
        match result {
            Err(e) if matches!(e.root_cause().downcast_ref::<Status>(), Some(Status(404))) => Err(e.context(format!(
                "the mirror does not serve {url} although its signed index lists it \
                 (an incomplete mirror or one being synced): try again later or use another mirror"
            ))),
            other => other,
        }
    }

    fn count(&self, bytes: u64) {
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn open(&self, url: &str) -> Result<impl Read> {
        let response = self.agent.get(url).call().map_err(|e| match e {
            ureq::Error::StatusCode(code) => anyhow::Error::new(Status(code)),
            other => anyhow::Error::new(other),
        })?;
        Ok(response.into_body().into_reader())
    }

    fn retry<T>(&self, url: &str, listed: bool, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
        let mut delay = self.backoff;
        for n in 1.. {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(e) if n < ATTEMPTS && transient(&e, listed) => {
                    tracing::warn!("{url}: {e:#}; retrying in {delay:?} (attempt {n} of {ATTEMPTS})");
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => return Err(e).with_context(|| format!("{url} failed after {n} attempt(s)")),
            }
        }
        unreachable!()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("HTTP status {0}")]
pub struct Status(pub u16);

/// Size or hash differs from the signed index: typically a mirror caught mid-sync.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Mismatch(String);

fn transient(e: &anyhow::Error, listed: bool) -> bool {
    if let Some(Status(code)) = e.downcast_ref::<Status>() {
        return *code >= 500 || *code == 408 || *code == 429 || (listed && *code == 404);
    }
    e.downcast_ref::<Mismatch>().is_some()
        || e.downcast_ref::<ureq::Error>().is_some()
        || e.downcast_ref::<std::io::Error>().is_some()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
