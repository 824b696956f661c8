//! `InRelease`: checked with `gpgv` against the Debian archive keys compiled into imgvm,
//! then parsed for the SHA256 of every index file.
//!
//! A valid signature is not enough: a mirror (or whoever sits between it and us) could
//! serve an older, validly signed release with known-vulnerable packages, or the release
//! of another suite. So, as apt does, the release must name the suite asked for (as its
//! `Suite` or `Codename`), must not be past its `Valid-Until` (except from a snapshot
//! archive, whose releases are old by design), and its signing key must be neither
//! expired nor revoked.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;

/// Debian's archive keyring (bullseye, bookworm and trixie keys), from the
/// `debian-archive-keyring` package.
pub const KEYRING: &[u8] = include_bytes!("../../../images/keys/debian-archive-keyring.gpg");

pub struct Release {
    files: HashMap<String, Entry>,
    fields: HashMap<String, String>,
}

/// How fresh a release must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Not past its `Valid-Until` at this time (seconds since the epoch).
    At(i64),
    /// From a snapshot archive: `Valid-Until` is not checked.
    Snapshot,
    /// The one a lock names by its SHA256: old by design, like a snapshot's.
    Locked,
}

impl Freshness {
    /// What a release fetched from `url` must meet, now.
    pub fn of(url: &str) -> Freshness {
        if url.contains("://snapshot.debian.org/") {
            Freshness::Snapshot
        } else {
            Freshness::At(now())
        }
    }
}

pub struct Entry {
    pub sha256: String,
    pub size: u64,
}

impl Release {
    /// Verifies the clearsigned `InRelease` and parses only the signed text that `gpgv`
    /// hands back, never the bytes around it.
    pub fn verify(in_release: &[u8], suite: &str, freshness: Freshness) -> Result<Release> {
        let dir = tempfile::tempdir()?;
        let keyring = dir.path().join("keyring.gpg");
        std::fs::write(&keyring, KEYRING)?;
        let input = dir.path().join("InRelease");
        std::fs::File::create(&input)?.write_all(in_release)?;
        let output = dir.path().join("Release");
        let result = crate::child::std_command("gpgv")
            .arg("--status-fd=1")
            .arg("--keyring")
            .arg(&keyring)
            .arg("--output")
            .arg(&output)
            .arg(&input)
            .output()
            .context("running gpgv (install the gpgv package)")?;
        if let Err(why) = signature(&String::from_utf8_lossy(&result.stdout)) {
            bail!(
                "{why}{}",
                String::from_utf8_lossy(&result.stderr)
                    .lines()
                    .map(|l| format!("\n  gpgv: {l}"))
                    .collect::<String>()
            );
        }
        let release = Release::parse(&std::fs::read_to_string(&output)?);
        release.check(suite, freshness)?;
        Ok(release)
    }

    /// The release is of `suite` and still valid.
    fn check(&self, suite: &str, freshness: Freshness) -> Result<()> {
        let field = |name: &str| self.fields.get(name).map(String::as_str);
        if field("Suite") != Some(suite) && field("Codename") != Some(suite) {
            bail!(
                "the release is of suite {} ({}), not {suite}",
                field("Suite").unwrap_or("?"),
                field("Codename").unwrap_or("?")
            );
        }
        if let (Freshness::At(now), Some(until)) = (freshness, field("Valid-Until")) {
            let until_time = parse_date(until).with_context(|| format!("unreadable Valid-Until `{until}`"))?;
            if now > until_time {
                bail!(
                    "the release expired at {until}: the mirror serves an outdated archive \
                     (use another mirror, or `snapshot:` for a past state)"
                );
            }
        }
        Ok(())
    }

    fn parse(text: &str) -> Release {
        let mut files = HashMap::new();
        let mut fields = HashMap::new();
        let mut in_sha256 = false;
        for line in text.lines() {
            if !line.starts_with(' ') {
                in_sha256 = line.trim_end() == "SHA256:";
                if let Some((name, value)) = line.split_once(':') {
                    fields.insert(name.to_owned(), value.trim().to_owned());
                }
                continue;
            }
            if !in_sha256 {
                continue;
            }
            let mut fields = line.split_whitespace();
            if let (Some(sha256), Some(Ok(size)), Some(path)) =
                (fields.next(), fields.next().map(str::parse), fields.next())
            {
                files.insert(
                    path.to_owned(),
                    Entry {
                        sha256: sha256.to_owned(),
                        size,
                    },
                );
            }
        }
        Release { files, fields }
    }

    /// The release's `Date` field, as written.
    pub fn date(&self) -> Option<&str> {
        self.fields.get("Date").map(String::as_str)
    }

    pub fn file(&self, path: &str) -> Option<&Entry> {
        self.files.get(path)
    }

    /// Every file the release lists, by its path under `dists/SUITE/`.
    pub fn files(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.files.iter().map(|(path, entry)| (path.as_str(), entry))
    }
}

/// Whether gpgv's status lines show a good signature by a key that is neither expired
/// nor revoked (what apt's gpgv method accepts).
fn signature(status: &str) -> Result<(), String> {
    let has = |tag: &str| status.lines().any(|l| l.starts_with(&format!("[GNUPG:] {tag} ")));
    for (tag, why) in [
        ("BADSIG", "a bad signature"),
        ("EXPKEYSIG", "a signature by an expired key"),
        ("REVKEYSIG", "a signature by a revoked key"),
        ("EXPSIG", "an expired signature"),
    ] {
        if has(tag) {
            return Err(format!("{why}, not a valid signature by a Debian archive key"));
        }
    }
    if !has("VALIDSIG") {
        return Err("no valid signature by a Debian archive key".into());
    }
    Ok(())
}

/// Seconds since the epoch of a release date, `Sat, 05 Dec 2026 08:12:34 UTC`.
pub fn parse_date(text: &str) -> Option<i64> {
    let mut words = text.split_whitespace();
    let _weekday = words.next()?;
    let day: i64 = words.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month_name = words.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? as i64 + 1;
    let year: i64 = words.next()?.parse().ok()?;
    let mut clock = words.next()?.split(':').map(|n| n.parse::<i64>().ok());
    let (h, m, s) = (clock.next()??, clock.next()??, clock.next()??);
    if !matches!(words.next(), Some("UTC" | "GMT" | "+0000")) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// Now, in seconds since the epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sha256_section_only() {
        let text = "Origin: Debian\nMD5Sum:\n 0123 10 main/binary-amd64/Packages.xz\nSHA256:\n abcd 42 main/binary-amd64/Packages.xz\n ef01 7 main/binary-arm64/Packages.xz\n";
        let release = Release::parse(text);
        let entry = release.file("main/binary-amd64/Packages.xz").unwrap();
        assert_eq!((entry.sha256.as_str(), entry.size), ("abcd", 42));
        assert_eq!(release.file("main/binary-arm64/Packages.xz").unwrap().size, 7);
    }

    #[test]
    fn rejects_unsigned_release() {
        let err = Release::verify(b"Origin: Debian\nSHA256:\n abcd 42 x\n", "trixie", Freshness::At(now()))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("no valid signature"), "{err:#}");
    }

    const TRIXIE: &str = "Origin: Debian\nSuite: stable\nCodename: trixie\nDate: Sat, 22 Nov 2026 09:00:00 UTC\nValid-Until: Sat, 29 Nov 2026 09:00:00 UTC\nSHA256:\n abcd 42 main/binary-amd64/Packages.xz\n";

    #[test]
    fn a_release_of_another_suite_is_refused() {
        let release = Release::parse(TRIXIE);
        let now = parse_date("Fri, 27 Nov 2026 00:00:00 UTC").unwrap();
        assert!(release.check("trixie", Freshness::At(now)).is_ok());
        assert!(release.check("stable", Freshness::At(now)).is_ok());
        let err = release.check("bookworm", Freshness::At(now)).unwrap_err();
        assert_eq!(err.to_string(), "the release is of suite stable (trixie), not bookworm");
    }

    #[test]
    fn an_expired_release_is_refused_except_from_a_snapshot() {
        let release = Release::parse(TRIXIE);
        let later = parse_date("Mon, 30 Nov 2026 00:00:00 UTC").unwrap();
        let err = release.check("trixie", Freshness::At(later)).unwrap_err();
        assert!(
            err.to_string().contains("expired at Sat, 29 Nov 2026 09:00:00 UTC"),
            "{err}"
        );
        assert!(release.check("trixie", Freshness::Snapshot).is_ok());
    }

    #[test]
    fn release_dates_are_read() {
        assert_eq!(parse_date("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(parse_date("Sat, 28 Nov 2026 12:30:05 UTC"), Some(1_795_869_005));
        assert_eq!(parse_date("Sat, 28 Nov 2026 12:30:05 CET"), None);
        assert_eq!(parse_date("yesterday"), None);
    }

    #[test]
    fn signatures_by_expired_or_revoked_keys_are_refused() {
        let valid = "[GNUPG:] GOODSIG 6ED0E7B82643E131 Debian Archive\n[GNUPG:] VALIDSIG 4CB5 2023 0 0\n";
        assert!(signature(valid).is_ok());
        for tag in ["EXPKEYSIG", "REVKEYSIG", "EXPSIG", "BADSIG"] {
            let status = format!("{valid}[GNUPG:] {tag} 6ED0E7B82643E131 Debian Archive\n");
            assert!(signature(&status).is_err(), "{tag} was accepted");
        }
        assert!(signature("[GNUPG:] NO_PUBKEY 123\n").is_err());
    }
}
