//! The host end of the guest's package proxy (see the agent's `proxy`): a minimal
//! HTTP/1.1 forward proxy that answers GET and HEAD for URLs under the allowed mirrors
//! and nothing else, so code in the guest cannot reach anything else the host can.
//!
//! What the proxy can check against a signed release (see [`known`]) it keeps in
//! imgvm's verified store and serves from there next time; everything else (releases,
//! files it has no checksum for) is fetched anew each time. apt in the guest verifies
//! what it gets, as it would from any mirror.

mod known;

use crate::archive::{sha256_of, Fetcher, Status};
use known::{Expected, Known};
use std::io::Seek;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest request head accepted from the guest.
const MAX_HEAD: usize = 16 * 1024;

/// Connections served at once per VM. apt opens one per mirror host; more is a guest
/// trying to exhaust the host.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a connection may wait for its next request.
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Proxy {
    allowed: Vec<String>,
    connections: Arc<tokio::sync::Semaphore>,
    fetcher: Fetcher,
    /// [`crate::cache::verified`].
    store: PathBuf,
    known: Arc<Known>,
    /// Packages fetched from the mirror, as opposed to served from the cache.
    debs_downloaded: AtomicU64,
    debs_cached: AtomicU64,
    bytes_downloaded: AtomicU64,
    /// The files a signed index lists that the mirror failed to deliver since it last
    /// delivered one (the latest [`FAILURES_KEPT`]): the cause a guest's "502 Bad
    /// Gateway" does not tell.
    failures: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// How many there were.
    failing: std::sync::atomic::AtomicU32,
    /// Release URLs whose `InRelease` must be the one a lock names: its SHA256.
    pinned: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// A mirror's prefix, the prefix of an archive (a snapshot of it) that serves what
    /// the mirror fails to, and the fetcher for that archive ([`Proxy::fall_back`]).
    fallback: std::sync::OnceLock<(String, String, Fetcher)>,
}

/// Mirror failures remembered for the error of the step they broke.
const FAILURES_KEPT: usize = 3;

/// Listed files the mirror may fail in a row (each after the fetcher's retries) before
/// the proxy stops asking it: a mirror that fails everything would otherwise cost every
/// package's retries, one after another, before apt gives up.
const FAILURES_IN_A_ROW: u32 = 3;

impl Proxy {
    /// `mirrors` are URL prefixes such as `http://deb.debian.org/debian`.
    pub fn new(mirrors: &[String], fetcher: Fetcher) -> Arc<Proxy> {
        // Earlier versions cached by URL, unverified: nothing there can be trusted.
        let _ = std::fs::remove_dir_all(crate::cache::dir().join("proxy"));
        Proxy::with_store(mirrors, fetcher, crate::cache::verified())
    }

    /// A proxy keeping what it verifies in `store`.
    fn with_store(mirrors: &[String], fetcher: Fetcher, store: PathBuf) -> Arc<Proxy> {
        let allowed: Vec<String> = mirrors
            .iter()
            .map(|m| format!("{}/", m.trim_end_matches('/')))
            .collect();
        let prefixes = allowed.clone();
        let fetcher = fetcher.redirecting_only_to(Arc::new(move |url: &str| under(&prefixes, url)));
        Arc::new(Proxy {
            allowed,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            fetcher,
            store,
            known: Arc::default(),
            debs_downloaded: AtomicU64::new(0),
            debs_cached: AtomicU64::new(0),
            bytes_downloaded: AtomicU64::new(0),
            failures: Default::default(),
            failing: Default::default(),
            pinned: Default::default(),
            fallback: Default::default(),
        })
    }

    /// Files under `mirror` that it fails to deliver, or delivers other than a signed
    /// index or the lock says, are fetched from `archive` instead (same path), and are
    /// checked the same way: a lock's packages the mirror dropped, from a snapshot.
    pub fn fall_back(&self, mirror: &str, archive: &str) {
        let prefix = format!("{}/", archive.trim_end_matches('/'));
        let only = vec![prefix.clone()];
        let fetcher = self
            .fetcher
            .redirecting_only_to(Arc::new(move |url: &str| under(&only, url)));
        let mirror = format!("{}/", mirror.trim_end_matches('/'));
        let _ = self.fallback.set((mirror, prefix, fetcher));
    }

    /// `.deb` files (downloaded from the mirror, served from the cache) so far.
    pub fn debs(&self) -> (u64, u64) {
        (
            self.debs_downloaded.load(Ordering::Relaxed),
            self.debs_cached.load(Ordering::Relaxed),
        )
    }

    /// What the mirror failed to deliver since it last delivered something, one file
    /// per line; `None` when its last answer was good.
    pub fn failures(&self) -> Option<String> {
        let failures = self.failures.lock().unwrap();
        (!failures.is_empty()).then(|| failures.iter().cloned().collect::<Vec<_>>().join("\n"))
    }

    fn failed(&self, what: String) {
        self.failing.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap();
        failures.retain(|f| *f != what);
        if failures.len() == FAILURES_KEPT {
            failures.pop_front();
        }
        failures.push_back(what);
    }

    /// The mirror works (again): earlier failures were passing.
    fn delivered(&self) {
        self.failing.store(0, Ordering::Relaxed);
        self.failures.lock().unwrap().clear();
    }

    /// Serves these releases (from the verified cache, or from the mirror while it still
    /// has them) in place of whatever the mirror serves now: with the indices of the
    /// lock's day, apt installs the lock's packages.
    pub fn pin(&self, releases: &[crate::lock::LockedRelease]) {
        let mut pinned = self.pinned.lock().unwrap();
        for release in releases {
            pinned.insert(release.url.clone(), release.sha256.clone());
        }
    }

    /// Learns the pinned releases and the package indices of theirs that the verified
    /// cache holds, as if the guest had fetched them: a build that resumes from a stored
    /// state ([`crate::states`]) has apt's lists in the image already, and apt fetches
    /// packages without fetching the indices that list them again.
    pub fn recall(&self) {
        let pinned = self.pinned.lock().unwrap().clone();
        for (url, sha256) in pinned {
            let Some(at) = url.find("/dists/") else { continue };
            if let Ok(body) = std::fs::read(self.store.join(&sha256)) {
                self.known.release(&url, &url[at + 1..], &body);
            }
        }
        self.known.recall(&self.store);
    }

    /// The releases it verified and the packages their indices list, for the lock.
    pub fn listed(&self) -> crate::lock::Listed {
        self.known.listed()
    }

    /// Bytes fetched from the mirror so far (not counting what came from the cache).
    pub fn downloaded_bytes(&self) -> u64 {
        self.bytes_downloaded.load(Ordering::Relaxed)
    }

    /// Serves one tunnelled connection until the guest closes it, or refuses it when
    /// [`MAX_CONNECTIONS`] are being served.
    pub async fn serve(self: Arc<Self>, reader: impl AsyncRead + Unpin, mut writer: impl AsyncWrite + Unpin) {
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            tracing::warn!("package proxy: refused a connection (already {MAX_CONNECTIONS})");
            let _ = respond(&mut writer, 503, "too many connections", true).await;
            return;
        };
        let mut reader = BufReader::new(reader);
        loop {
            let Ok(head) = tokio::time::timeout(IDLE_LIMIT, read_head(&mut reader)).await else {
                return;
            };
            let head = match head {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(e) => {
                    let _ = respond(&mut writer, 400, &e, true).await;
                    return;
                }
            };
            let close = head.close;
            if self.answer(head, &mut writer).await.is_err() || close {
                return;
            }
        }
    }

    async fn answer(&self, head: Head, writer: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        if head.method != "GET" && head.method != "HEAD" {
            return respond(writer, 405, "only GET and HEAD", head.close).await;
        }
        if !under(&self.allowed, &head.url) {
            tracing::warn!("package proxy: refused {} (not under an allowed mirror)", head.url);
            return respond(writer, 403, "not under an allowed mirror", head.close).await;
        }
        let file = match self.file(&head.url).await {
            Ok(file) => file,
            Err(e) => {
                let status = match e.root_cause().downcast_ref::<Status>() {
                    Some(Status(code)) => *code,
                    None => 502,
                };
                tracing::debug!("package proxy: {} -> {status}: {e:#}", head.url);
                return respond(writer, status, &format!("{e:#}"), head.close).await;
            }
        };
        let mut source = tokio::fs::File::from_std(file);
        let len = source.metadata().await?.len();
        let connection = if head.close { "close" } else { "keep-alive" };
        let header = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: {connection}\r\n\r\n"
        );
        writer.write_all(header.as_bytes()).await?;
        if head.method == "GET" {
            tokio::io::copy(&mut source, writer).await?;
        }
        writer.flush().await
    }

    /// The body of `url`, open: from the verified store, or fetched (and stored when its
    /// checksum is known and matches). What is served is the very file that was checked:
    /// a trim or another build replacing the store's entry afterwards cannot swap it.
    async fn file(&self, url: &str) -> anyhow::Result<std::fs::File> {
        // As the index names it: apt escapes `~`, `:` and `+` of package versions.
        let escaped = self
            .allowed
            .iter()
            .find_map(|prefix| url.strip_prefix(prefix.as_str()))
            .unwrap_or(url);
        let path = percent_decode(escaped).unwrap_or_else(|| escaped.to_owned());
        let deb = url.ends_with(".deb");
        let release = path.ends_with("/InRelease");
        let pinned = self.pinned.lock().unwrap().get(url).cloned();
        let authority = if pinned.is_some() {
            "the lock"
        } else {
            "the signed index"
        };
        let expected = match pinned {
            Some(sha256) => Some(Expected { sha256, size: None }),
            None => self.known.expected(&path),
        };
        if let Some(expected) = &expected {
            let stored = self.store.join(&expected.sha256);
            let (check, file, known) = (expected.clone(), stored.clone(), self.known.clone());
            let (owned_url, owned_path) = (url.to_owned(), path.clone());
            let good = tokio::task::spawn_blocking(move || {
                let good = matching(&file, &check)?;
                if release {
                    known.release(&owned_url, &owned_path, &std::fs::read(&file).ok()?);
                }
                known.index(&check.sha256, &file);
                Some(good)
            });
            if let Some(good) = good.await? {
                if deb {
                    self.debs_cached.fetch_add(1, Ordering::Relaxed);
                }
                crate::cache::touch(&stored);
                return Ok(good);
            }
            if stored.exists() {
                tracing::warn!("package proxy: {} fails its check; fetching it again", stored.display());
                let _ = std::fs::remove_file(&stored);
            }
        }
        let listed = expected.is_some() || release;
        if listed && self.failing.load(Ordering::Relaxed) >= FAILURES_IN_A_ROW {
            return Err(anyhow::Error::new(Status(502)).context(format!(
                "not asking the mirror again: it failed the last {FAILURES_IN_A_ROW} files it was asked for"
            )));
        }
        let mut sources = vec![(url.to_owned(), self.fetcher.clone())];
        if let Some((mirror, archive, fetcher)) = self.fallback.get().filter(|_| listed) {
            if let Some(rest) = url.strip_prefix(mirror.as_str()) {
                sources.push((format!("{archive}{rest}"), fetcher.clone()));
            }
        }
        let last = sources.len() - 1;
        for (i, (source, fetcher)) in sources.into_iter().enumerate() {
            match self
                .fetch(&source, fetcher, &path, release, deb, expected.as_ref(), authority)
                .await
            {
                Err(e) if i < last => {
                    tracing::info!("package proxy: {e:#}; asking {source}'s fallback");
                }
                Err(e) => {
                    // A file the signed indexes list is one the guest cannot do without.
                    if listed {
                        self.failed(format!("{e:#}"));
                    }
                    return Err(e);
                }
                Ok(file) => {
                    self.delivered();
                    return Ok(file);
                }
            }
        }
        unreachable!("there is always the mirror to ask")
    }

    /// `url` fetched with `fetcher` and checked against `expected` (from `authority`):
    /// stored when it matches, or when it is a release that verifies.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        url: &str,
        fetcher: Fetcher,
        path: &str,
        release: bool,
        deb: bool,
        expected: Option<&Expected>,
        authority: &str,
    ) -> anyhow::Result<std::fs::File> {
        let (owned_url, dir) = (url.to_owned(), self.store.clone());
        let (known, owned_path) = (self.known.clone(), path.to_owned());
        let (tmp, sha256, verified_release) = tokio::task::spawn_blocking(move || {
            let mut tmp = fetcher.fetch(&owned_url, &dir)?;
            tmp.rewind()?;
            let sha256 = sha256_of(tmp.as_file_mut())?;
            let verified = release && known.release(&owned_url, &owned_path, &std::fs::read(tmp.path())?);
            known.index(&sha256, tmp.path());
            anyhow::Ok((tmp, sha256, verified))
        })
        .await??;
        let len = tmp.as_file().metadata()?.len();
        self.bytes_downloaded.fetch_add(len, Ordering::Relaxed);
        if deb {
            self.debs_downloaded.fetch_add(1, Ordering::Relaxed);
        }
        let Some(expected) = expected else {
            if verified_release {
                // Kept, so that a lock naming it can be followed once the mirror moved on.
                let mut file = tmp.persist(self.store.join(&sha256))?;
                file.rewind()?;
                return Ok(file);
            }
            // Served from the open file; its name goes when `tmp` is dropped.
            return Ok(tmp.reopen()?);
        };
        if sha256 != expected.sha256 || expected.size.is_some_and(|size| size != len) {
            // Not cached and not served: apt would refuse it, and then retry.
            let why = format!(
                "{url}: the mirror sent {len} bytes with SHA256 {sha256}; {authority} says {} with SHA256 {}",
                expected.size.map_or("any size".into(), |s| format!("{s} bytes")),
                expected.sha256
            );
            return Err(anyhow::Error::new(Status(502)).context(why));
        }
        let mut file = tmp.persist(self.store.join(&sha256))?;
        file.rewind()?;
        Ok(file)
    }
}

/// `file`, open at its start, when it exists with the expected size and checksum.
fn matching(file: &Path, expected: &Expected) -> Option<std::fs::File> {
    let mut open = std::fs::File::open(file).ok()?;
    let len = open.metadata().ok()?.len();
    if expected.size.is_some_and(|size| size != len) || sha256_of(&mut open).ok()? != expected.sha256 {
        return None;
    }
    open.rewind().ok()?;
    Some(open)
}

/// Whether `url` names a file under one of the mirror `prefixes`: after the prefix, only
/// plain path segments (percent-escapes decoded first, as the mirror's server would),
/// never `.`, `..`, an escaped slash, a query or a fragment. Requests and every redirect
/// the mirror answers with are held to it.
fn under(prefixes: &[String], url: &str) -> bool {
    let Some(rest) = prefixes.iter().find_map(|prefix| url.strip_prefix(prefix.as_str())) else {
        return false;
    };
    rest.split('/').all(|segment| {
        let Some(decoded) = percent_decode(segment) else {
            return false;
        };
        decoded != "."
            && decoded != ".."
            && decoded
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._~+-:@=,".contains(c))
    })
}

/// `%XX` escapes decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The body of the request-head fuzz target (`host/fuzz`), here so that its committed
/// corpus replays in the normal test run (`tests/fuzz_corpus.rs`).
#[doc(hidden)]
pub mod fuzzing {
    /// Parses `data` as a guest's request head. Nothing may panic; a head that parses has
    /// a method and a URL without spaces or line ends, and never more than the limit.
    pub fn request_head(data: &[u8]) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let mut reader = tokio::io::BufReader::new(data);
        if let Ok(Some(head)) = runtime.block_on(super::read_head(&mut reader)) {
            for text in [&head.method, &head.url] {
                assert!(!text.is_empty() && !text.contains([' ', '\r', '\n']), "{text:?}");
            }
            assert!(head.method.len() + head.url.len() <= super::MAX_HEAD);
        }
    }
}

struct Head {
    method: String,
    url: String,
    close: bool,
}

async fn read_head(reader: &mut (impl AsyncBufReadExt + Unpin)) -> Result<Option<Head>, String> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        // Never more than the head's remaining room, newline or not.
        let room = (MAX_HEAD + 1 - total) as u64;
        let n = tokio::io::AsyncReadExt::take(&mut *reader, room)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err("truncated request".into())
            };
        }
        total += n;
        if total > MAX_HEAD {
            return Err("request head too large".into());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        // A bare CR or another control character inside a line is how requests are
        // smuggled past a parser: never part of a valid head.
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return Err("control character in the request head".into());
        }
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(line);
    }
    // `METHOD SP TARGET SP HTTP/1.x`, nothing more or less.
    let parts: Vec<&str> = lines[0].split(' ').collect();
    let [method, url, version] = parts[..] else {
        return Err(format!("malformed request line `{}`", lines[0]));
    };
    if method.is_empty() || url.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(format!("malformed request line `{}`", lines[0]));
    }
    let close = version == "HTTP/1.0"
        || lines[1..].iter().any(|h| {
            h.split_once(':')
                .is_some_and(|(k, v)| k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close"))
        });
    Ok(Some(Head {
        method: method.to_owned(),
        url: url.to_owned(),
        close,
    }))
}

async fn respond(
    writer: &mut (impl AsyncWrite + Unpin),
    status: u16,
    message: &str,
    close: bool,
) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let body = format!("imgvm package proxy: {message}\n");
    let connection = if close { "close" } else { "keep-alive" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    writer.write_all(response.as_bytes()).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::hex;
    use sha2::{Digest, Sha256};

    async fn exchange(proxy: Arc<Proxy>, request: &str) -> String {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (server_r, server_w) = tokio::io::split(server);
        let task = tokio::spawn(proxy.serve(server_r, server_w));
        let (mut client_r, mut client_w) = tokio::io::split(client);
        // Each request asks for the connection to be closed after the answer.
        client_w.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut client_r, &mut out)
            .await
            .unwrap();
        task.await.unwrap();
        out
    }

    /// A proxy for `{base}/debian`, storing in `store`, retrying without waiting.
    fn on_mirror(base: &str, store: &Path) -> (Arc<Proxy>, String) {
        let mirror = format!("{base}/debian");
        let fetcher = Fetcher::new(std::time::Duration::from_millis(1));
        (
            Proxy::with_store(std::slice::from_ref(&mirror), fetcher, store.to_owned()),
            mirror,
        )
    }

    #[tokio::test]
    async fn refuses_urls_outside_the_mirrors() {
        let proxy = Proxy::new(&["http://deb.debian.org/debian".into()], Fetcher::default());
        for url in [
            "http://127.0.0.1:8080/secret",
            "http://deb.debian.org/debian-evil/x",
            "http://deb.debian.org/debian/../etc",
            "http://deb.debian.org/debian/..",
            "http://deb.debian.org/debian/pool/../../x",
            "http://deb.debian.org/debian/%2e%2e/x",
            "http://deb.debian.org/debian/pool/%2E%2e",
            "http://deb.debian.org/debian/a%2fb",
            "http://deb.debian.org/debian/./dists",
            "http://deb.debian.org/debian/dists?x=1",
            "http://deb.debian.org/debian/dists#x",
        ] {
            let request = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let out = exchange(proxy.clone(), &request).await;
            assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{url}: {out}");
        }
    }

    #[test]
    fn percent_encoded_names_of_the_archive_are_allowed() {
        let proxy = Proxy::new(&["http://deb.debian.org/debian".into()], Fetcher::default());
        assert!(under(
            &proxy.allowed,
            "http://deb.debian.org/debian/pool/main/f/foo/foo_1%3a2.0-1_amd64.deb"
        ));
        assert!(under(
            &proxy.allowed,
            "http://deb.debian.org/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/ab12"
        ));
    }

    #[tokio::test]
    async fn an_endless_request_line_is_cut_off_at_the_head_limit() {
        let proxy = Proxy::new(&["http://deb.debian.org/debian".into()], Fetcher::default());
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (server_r, server_w) = tokio::io::split(server);
        let task = tokio::spawn(proxy.serve(server_r, server_w));
        let (mut client_r, mut client_w) = tokio::io::split(client);
        // More than the limit, no newline, and the connection stays open.
        let endless = format!("GET {}", "a".repeat(MAX_HEAD + 100));
        client_w.write_all(endless.as_bytes()).await.unwrap();
        let mut out = String::new();
        let read = tokio::io::AsyncReadExt::read_to_string(&mut client_r, &mut out);
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the proxy waited for a newline")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains("request head too large"), "{out}");
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed() {
        let proxy = Proxy::new(&["http://deb.debian.org/debian".into()], Fetcher::default());
        let (client, server) = tokio::io::duplex(1024);
        let (server_r, server_w) = tokio::io::split(server);
        let task = tokio::spawn(proxy.serve(server_r, server_w));
        // A guest that opens a connection and says nothing does not hold it for ever.
        tokio::time::sleep(IDLE_LIMIT + std::time::Duration::from_secs(1)).await;
        assert!(task.is_finished(), "the connection is still served");
        drop(client);
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_refused() {
        let proxy = Proxy::new(&["http://deb.debian.org/debian".into()], Fetcher::default());
        let mut open = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (client, server) = tokio::io::duplex(1024);
            let (server_r, server_w) = tokio::io::split(server);
            open.push((client, tokio::spawn(proxy.clone().serve(server_r, server_w))));
        }
        tokio::task::yield_now().await;
        let out = exchange(proxy.clone(), "GET http://deb.debian.org/debian/x HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        // A connection that ends makes room for another.
        let (client, task) = open.pop().unwrap();
        drop(client);
        task.await.unwrap();
        let out = exchange(proxy, "POST http://deb.debian.org/debian/x HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
    }

    #[tokio::test]
    async fn only_files_that_match_their_checksum_are_stored_and_served() {
        use crate::test_http::{ok, serve};
        let index = "Package: foo\n";
        let good = hex(&Sha256::digest(index.as_bytes()));
        let bad = "0".repeat(64);
        let answer = good.clone();
        let base = serve(move |path| {
            if path.ends_with(&answer) {
                ok(index)
            } else {
                ok("tampered")
            }
        });
        let store = tempfile::tempdir().unwrap();
        let (proxy, mirror) = on_mirror(&base, store.path());
        let get = |hash: &str| {
            format!("GET {mirror}/dists/x/main/by-hash/SHA256/{hash} HTTP/1.1\r\nConnection: close\r\n\r\n")
        };

        let out = exchange(proxy.clone(), &get(&good)).await;
        assert!(out.starts_with("HTTP/1.1 200 ") && out.ends_with(index), "{out}");
        assert_eq!(std::fs::read_to_string(store.path().join(&good)).unwrap(), index);
        assert_eq!(proxy.failures(), None);

        // What does not match its name is neither served nor stored, and is remembered
        // as the mirror's failure.
        let out = exchange(proxy.clone(), &get(&bad)).await;
        assert!(out.starts_with("HTTP/1.1 502 ") && out.contains("SHA256"), "{out}");
        assert!(!store.path().join(&bad).exists());
        let failures = proxy.failures().unwrap();
        assert!(
            failures.contains(&bad) && failures.contains("the mirror sent 8 bytes"),
            "{failures}"
        );

        // A stored file that no longer matches is fetched again, never served.
        std::fs::write(store.path().join(&good), "rotten").unwrap();
        let out = exchange(proxy.clone(), &get(&good)).await;
        assert!(out.ends_with(index), "{out}");
        assert_eq!(std::fs::read_to_string(store.path().join(&good)).unwrap(), index);
        // The mirror delivers again: what it failed before did not break anything.
        assert_eq!(proxy.failures(), None);
    }

    #[tokio::test]
    async fn a_pinned_release_is_the_one_the_lock_names() {
        use crate::test_http::{ok, serve};
        let base = serve(|_| ok("today's release"));
        let store = tempfile::tempdir().unwrap();
        let (proxy, mirror) = on_mirror(&base, store.path());
        let url = format!("{mirror}/dists/trixie/InRelease");
        let request = format!("GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n");
        let locked = "the lock's release";
        let sha256 = hex(&Sha256::digest(locked));
        let pin = |sha256: &str| {
            proxy.pin(&[crate::lock::LockedRelease {
                url: url.clone(),
                sha256: sha256.to_owned(),
                date: String::new(),
            }])
        };
        // Unpinned, the mirror's.
        assert!(exchange(proxy.clone(), &request).await.ends_with("today's release"));
        // Pinned and cached: the lock's, although the mirror serves another.
        std::fs::write(store.path().join(&sha256), locked).unwrap();
        pin(&sha256);
        assert!(exchange(proxy.clone(), &request).await.ends_with(locked));
        // Pinned to one the cache lacks and the mirror no longer serves: refused.
        pin(&"e".repeat(64));
        let out = exchange(proxy.clone(), &request).await;
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        assert!(
            proxy.failures().unwrap().contains("the lock says"),
            "{:?}",
            proxy.failures()
        );
    }

    #[tokio::test]
    async fn what_the_mirror_lost_comes_from_the_fallback_checked_as_well() {
        use crate::test_http::{ok, serve};
        let base = serve(|path| {
            if path.ends_with("/InRelease") {
                ok("today's release")
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            }
        });
        let snapshot = serve(|path| match path {
            p if p.ends_with("/InRelease") => ok("the lock's release"),
            p if p.ends_with(&hex(&Sha256::digest("lost"))) => ok("lost"),
            _ => ok("not what the index says"),
        });
        let store = tempfile::tempdir().unwrap();
        let (proxy, mirror) = on_mirror(&base, store.path());
        proxy.fall_back(&mirror, &format!("{snapshot}/archive/20261128T000000Z"));
        let get = |path: &str| format!("GET {mirror}/{path} HTTP/1.1\r\nConnection: close\r\n\r\n");
        // A pinned release the mirror has moved on from, and a package it dropped.
        proxy.pin(&[crate::lock::LockedRelease {
            url: format!("{mirror}/dists/trixie/InRelease"),
            sha256: hex(&Sha256::digest("the lock's release")),
            date: String::new(),
        }]);
        assert!(exchange(proxy.clone(), &get("dists/trixie/InRelease"))
            .await
            .ends_with("the lock's release"));
        let by_hash = |body: &str| format!("dists/trixie/main/by-hash/SHA256/{}", hex(&Sha256::digest(body)));
        let out = exchange(proxy.clone(), &get(&by_hash("lost"))).await;
        assert!(
            out.starts_with("HTTP/1.1 200 ") && out.ends_with("\r\n\r\nlost"),
            "{out}"
        );
        // The fallback is checked as the mirror is: other bytes are refused.
        let out = exchange(proxy.clone(), &get(&by_hash("the real one"))).await;
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        // Files no index lists are not looked for elsewhere.
        let out = exchange(proxy.clone(), &get("pool/main/unlisted.deb")).await;
        assert!(out.starts_with("HTTP/1.1 404 "), "{out}");
    }

    #[tokio::test]
    async fn a_mirror_that_fails_everything_is_given_up_on() {
        let asked = Arc::new(AtomicU64::new(0));
        let count = asked.clone();
        let base = crate::test_http::serve(move |_| {
            count.fetch_add(1, Ordering::SeqCst);
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".into()
        });
        let store = tempfile::tempdir().unwrap();
        let (proxy, mirror) = on_mirror(&base, store.path());
        let get = |n: usize| {
            let hash = format!("{n:064}");
            format!("GET {mirror}/dists/x/main/by-hash/SHA256/{hash} HTTP/1.1\r\nConnection: close\r\n\r\n")
        };
        for n in 0..FAILURES_IN_A_ROW as usize {
            let out = exchange(proxy.clone(), &get(n)).await;
            assert!(out.starts_with("HTTP/1.1 500 "), "{out}");
        }
        let tried = asked.load(Ordering::SeqCst);
        let out = exchange(proxy.clone(), &get(99)).await;
        assert!(
            out.starts_with("HTTP/1.1 502 ") && out.contains("not asking the mirror again"),
            "{out}"
        );
        assert_eq!(asked.load(Ordering::SeqCst), tried, "the mirror was asked again");
        // What the build's error shows: the mirror's own answers.
        assert!(proxy.failures().unwrap().contains("HTTP status 500"));
    }

    #[tokio::test]
    async fn what_is_served_is_the_file_that_was_checked() {
        let index = "Package: foo\n";
        let sha = hex(&Sha256::digest(index.as_bytes()));
        let store = tempfile::tempdir().unwrap();
        std::fs::write(store.path().join(&sha), index).unwrap();
        // No mirror answers: the body can only come from the store.
        let (proxy, mirror) = on_mirror("http://127.0.0.1:9", store.path());
        let url = format!("{mirror}/dists/x/main/by-hash/SHA256/{sha}");
        let mut served = proxy.file(&url).await.unwrap();
        // A trim, or a tampering process, replaces the entry between check and send.
        std::fs::remove_file(store.path().join(&sha)).unwrap();
        std::fs::write(store.path().join(&sha), "swapped").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut served, &mut body).unwrap();
        assert_eq!(body, index);
    }

    #[tokio::test]
    async fn a_mirror_cannot_redirect_the_proxy_elsewhere() {
        let base = crate::test_http::serve(|_| {
            "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\nContent-Length: 0\r\n\r\n"
                .into()
        });
        let store = tempfile::tempdir().unwrap();
        let (proxy, mirror) = on_mirror(&base, store.path());
        let request = format!("GET {mirror}/dists/x/InRelease HTTP/1.1\r\nConnection: close\r\n\r\n");
        let out = exchange(proxy, &request).await;
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        assert!(out.contains("not under an allowed mirror"), "{out}");
    }

    #[tokio::test]
    async fn refuses_other_methods_and_garbage() {
        let proxy = Proxy::new(&["http://deb.debian.org/debian".into()], Fetcher::default());
        let out = exchange(proxy.clone(), "POST http://deb.debian.org/debian/x HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
        let out = exchange(proxy, "nonsense\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    }
}
