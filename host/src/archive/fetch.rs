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

/// Redirects followed per request.
const MAX_REDIRECTS: usize = 5;

/// Which URLs a fetch may be redirected to.
pub type RedirectPolicy = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
pub struct Fetcher {
    agent: ureq::Agent,
    stats: Arc<Stats>,
    backoff: Duration,
    redirects: Option<RedirectPolicy>,
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
            // Followed here, where each hop can be checked.
            .max_redirects(0)
            .user_agent(concat!("imgvm/", env!("CARGO_PKG_VERSION")))
            .build();
        Fetcher {
            agent: config.into(),
            stats: Arc::default(),
            backoff,
            redirects: None,
        }
    }

    /// The same fetcher, following only redirects to URLs `allowed` accepts (the package
    /// proxy's, so a mirror cannot send the host elsewhere on the guest's behalf).
    pub fn redirecting_only_to(&self, allowed: RedirectPolicy) -> Fetcher {
        Fetcher {
            redirects: Some(allowed),
            ..self.clone()
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
            let mut tmp = crate::leftovers::partial_file(dir)?;
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
            let mut tmp = crate::leftovers::partial_file(dir)?;
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
            Err(e) if missing(&e) => Err(e.context(format!(
                "the mirror does not serve {url} although its signed index lists it \
                 (an incomplete mirror or one being synced): try again later or use another mirror"
            ))),
            other => other,
        }
    }

    /// Whether the mirror has `url` (a HEAD request, redirects followed and checked):
    /// `false` for 404 and 410, an error for anything else that is not a success.
    pub fn exists(&self, url: &str) -> Result<bool> {
        let result = self.retry(url, false, || self.request(url, Method::Head).map(drop));
        match result {
            Ok(()) => Ok(true),
            Err(e) if missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn count(&self, bytes: u64) {
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn open(&self, url: &str) -> Result<impl Read> {
        Ok(self.request(url, Method::Get)?.into_body().into_reader())
    }

    fn request(&self, url: &str, method: Method) -> Result<ureq::http::Response<ureq::Body>> {
        let mut url = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let sent = match method {
                Method::Get => self.agent.get(&url).call(),
                Method::Head => self.agent.head(&url).call(),
            };
            let response = sent.map_err(|e| match e {
                ureq::Error::StatusCode(code) => anyhow::Error::new(Status(code)),
                other => anyhow::Error::new(other),
            })?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .with_context(|| format!("{url}: a redirect without a location"))?;
            let next = resolve(&url, location);
            if let Some(allowed) = &self.redirects {
                if !allowed(&next) {
                    bail!("{url} redirects to {next}, which is not under an allowed mirror");
                }
            }
            tracing::debug!("{url} redirects to {next}");
            url = next;
        }
        bail!("{url}: more than {MAX_REDIRECTS} redirects")
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

#[derive(Clone, Copy)]
enum Method {
    Get,
    Head,
}

#[derive(Debug, thiserror::Error)]
#[error("HTTP status {0}")]
pub struct Status(pub u16);

/// Whether `e` is the mirror saying it has no such file (404 or 410).
pub fn missing(e: &anyhow::Error) -> bool {
    matches!(e.root_cause().downcast_ref::<Status>(), Some(Status(404 | 410)))
}

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

/// The absolute URL a `Location` header names, relative to `base`.
fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    if location.starts_with('/') {
        return format!("{}{location}", &base[..origin_end]);
    }
    let dir_end = base
        .rfind('/')
        .filter(|&i| i >= origin_end)
        .map_or(base.len(), |i| i + 1);
    let dir = &base[..dir_end];
    if dir.ends_with('/') {
        format!("{dir}{location}")
    } else {
        format!("{dir}/{location}")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA256 of what `file` holds from its current position on, in hex. Read a MiB at a
/// time: with `io::copy`'s 8 KiB, hashing a 3 GiB image takes half as long again.
pub fn sha256_of(file: &mut std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(hex(&hasher.finalize())),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_http::{ok, serve};

    fn redirect(to: &str) -> String {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    }

    #[test]
    fn a_truncated_body_is_an_error_not_a_short_file() {
        // The length announced, half of it sent, the connection closed.
        let base = serve(|_| "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nhalf".into());
        let dir = tempfile::tempdir().unwrap();
        let err = Fetcher::new(Duration::from_millis(1))
            .fetch(&format!("{base}/debian/x"), dir.path())
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("failed after 5 attempt(s)"), "{err}");
    }

    #[test]
    fn redirects_are_checked_at_every_hop() {
        let base = serve(|path| match path {
            "/debian/moved" => redirect("/debian/here"),
            "/debian/here" => ok("the file"),
            "/debian/away" => redirect("http://169.254.169.254/latest/meta-data/"),
            "/debian/sideways" => redirect("../secret"),
            _ => ok("secret"),
        });
        let prefix = format!("{base}/debian/");
        let fetcher = Fetcher::new(Duration::from_millis(1)).redirecting_only_to(Arc::new(move |url: &str| {
            url.starts_with(&prefix) && !url.contains("..")
        }));
        assert_eq!(fetcher.get(&format!("{base}/debian/moved")).unwrap(), b"the file");
        for path in ["away", "sideways"] {
            let err = format!("{:#}", fetcher.get(&format!("{base}/debian/{path}")).unwrap_err());
            assert!(err.contains("not under an allowed mirror"), "{err}");
        }
    }

    #[test]
    fn exists_tells_present_from_gone_and_from_broken() {
        let base = serve(|path| match path {
            "/debian/there" => ok("x"),
            "/debian/moved" => redirect("/debian/there"),
            "/debian/broken" => "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
            _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
        });
        let fetcher = Fetcher::new(Duration::from_millis(1));
        assert!(fetcher.exists(&format!("{base}/debian/there")).unwrap());
        assert!(fetcher.exists(&format!("{base}/debian/moved")).unwrap());
        assert!(!fetcher.exists(&format!("{base}/debian/gone")).unwrap());
        assert!(fetcher.exists(&format!("{base}/debian/broken")).is_err());
    }

    #[test]
    fn relative_locations_resolve_against_the_request() {
        assert_eq!(resolve("http://h/a/b", "/c"), "http://h/c");
        assert_eq!(resolve("http://h/a/b", "c"), "http://h/a/c");
        assert_eq!(resolve("http://h/a/b", "../c"), "http://h/a/../c");
        assert_eq!(resolve("http://h", "c"), "http://h/c");
        assert_eq!(resolve("http://h/a", "https://x/y"), "https://x/y");
    }
}
