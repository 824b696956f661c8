//! The lockfile, `NAME.lock`: what went into an image, precisely enough to fetch the very
//! same bytes again. Every package installed into the image (and into the helper VM that
//! built it) with its version, architecture, source package, where it lies in its
//! archive and its SHA256, and the signed releases whose indices listed them.
//!
//! Only the host's own knowledge goes in: a package's origin and checksum come from a
//! signed index the host verified ([`crate::proxy`] learns them as the guest's apt reads
//! them), never from the guest's word. An installed package that no such index lists
//! (a `.deb` a `run` step installed by hand) is recorded as `unlisted`: the lock cannot
//! fetch it again, and says so.

use crate::archive;
use imgvm_protocol::Package;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::HashMap;

/// Bumped when the lockfile's meaning changes; a reader refuses formats it does not know.
pub const FORMAT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub source: String,
    pub source_version: String,
    /// The archive (mirror URL) it comes from, and its path there.
    pub archive: String,
    pub filename: String,
    pub sha256: String,
}

impl LockedPackage {
    /// A package as the verified index of `archive` lists it.
    pub fn listed(archive: &str, package: &archive::Package) -> LockedPackage {
        LockedPackage {
            name: package.name.clone(),
            version: package.version.clone(),
            architecture: package.architecture.clone(),
            source: package.source.clone(),
            source_version: package.source_version.clone(),
            archive: archive.trim_end_matches('/').to_owned(),
            filename: package.filename.clone(),
            sha256: package.sha256.clone(),
        }
    }

    fn key(&self) -> (&str, &str, &str) {
        (&self.name, &self.version, &self.architecture)
    }
}

/// A signed release a build read its indices from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockedRelease {
    /// Where its `InRelease` was fetched.
    pub url: String,
    /// The SHA256 of that `InRelease`.
    pub sha256: String,
    /// Its `Date` field.
    pub date: String,
}

impl LockedRelease {
    /// Seconds since the epoch of its `Date`.
    pub fn seconds(&self) -> Option<i64> {
        archive::parse_date(&self.date)
    }
}

/// What the helper VM that did the build consisted of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperLock {
    /// Its suite's release, then any its backports come from.
    pub releases: Vec<LockedRelease>,
    pub packages: Vec<LockedPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub format: u32,
    /// The recipe's name, its architecture, suite and mirror.
    pub recipe: String,
    pub arch: String,
    pub suite: String,
    pub mirror: String,
    /// The date of the newest release read, in seconds since the epoch: the
    /// `SOURCE_DATE_EPOCH` of the image.
    pub source_date_epoch: i64,
    pub releases: Vec<LockedRelease>,
    /// Every package installed into the image, by name.
    pub packages: Vec<LockedPackage>,
    /// Installed packages that no verified index lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unlisted: Vec<Package>,
    pub helper: HelperLock,
}

/// What the host learnt from the signed archive during a build: the releases it verified
/// and every package their indices list.
#[derive(Debug, Default, Clone)]
pub struct Listed {
    pub releases: Vec<LockedRelease>,
    packages: HashMap<(String, String, String), LockedPackage>,
}

impl Listed {
    pub fn add_release(&mut self, release: LockedRelease) {
        if !self.releases.contains(&release) {
            self.releases.push(release);
        }
    }

    pub fn add_package(&mut self, package: LockedPackage) {
        let (name, version, arch) = package.key();
        let key = (name.to_owned(), version.to_owned(), arch.to_owned());
        self.packages.entry(key).or_insert(package);
    }

    fn find(&self, package: &Package) -> Option<&LockedPackage> {
        self.packages.get(&(
            package.name.clone(),
            package.version.clone(),
            package.architecture.clone(),
        ))
    }
}

/// The image's recipe as the lock names it.
pub struct Subject<'a> {
    pub recipe: &'a str,
    pub arch: String,
    pub suite: &'a str,
    pub mirror: &'a str,
}

impl Lock {
    /// The lock of an image whose dpkg database lists `installed`, built with
    /// `source_date_epoch` from what `listed` knows, in a helper VM of `helper`.
    pub fn new(
        subject: Subject,
        source_date_epoch: i64,
        installed: &[Package],
        listed: &Listed,
        helper: HelperLock,
    ) -> Lock {
        let mut packages = Vec::new();
        let mut unlisted = Vec::new();
        for package in installed {
            match listed.find(package) {
                Some(locked) => packages.push(locked.clone()),
                None => unlisted.push(package.clone()),
            }
        }
        packages.sort();
        unlisted.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
        let mut releases = listed.releases.clone();
        releases.sort();
        Lock {
            format: FORMAT,
            recipe: subject.recipe.to_owned(),
            arch: subject.arch,
            suite: subject.suite.to_owned(),
            mirror: subject.mirror.to_owned(),
            source_date_epoch,
            releases,
            packages,
            unlisted,
            helper,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("a lock serialises");
        json.push(b'\n');
        json
    }

    /// A name-based UUID (version 5 layout, over SHA256) of the lock's content: it names
    /// what the lock builds, the same from every build of it (the SBOM's serial number,
    /// the Build manifest's uid).
    pub fn uuid(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.to_json());
        crate::plan::uuid_text(digest[..16].try_into().expect("a SHA256 has 32 bytes"), 5)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read the lock {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}:{column}: not an imgvm lock: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: lock format {found}; this imgvm reads format {FORMAT}")]
    Format { path: String, found: u32 },
    #[error(
        "{path} locks {what} `{locked}`, but the recipe builds `{wanted}`: refresh the lock with `imgvm lock --update`"
    )]
    Mismatch {
        path: String,
        what: &'static str,
        locked: String,
        wanted: String,
    },
    #[error("{path} names no release of {mirror} {suite}: refresh it with `imgvm lock --update`")]
    NoRelease {
        path: String,
        mirror: String,
        suite: String,
    },
    #[error(
        "the release {url} that {path} names is not in imgvm's cache, and the mirror now serves another \
         one: {hint}, or refresh the lock with `imgvm lock --update`"
    )]
    ReleaseGone { path: String, url: String, hint: String },
    #[error(
        "the mirror no longer has {count} package(s) that {path} names: {names}; {hint}, or refresh the \
         lock with `imgvm lock --update`"
    )]
    Gone {
        path: String,
        count: usize,
        names: String,
        hint: String,
    },
    #[error("cannot check the lock's packages on the mirror: {0}")]
    Mirror(String),
    #[error("{0}")]
    Epoch(String),
    #[error(
        "the build installed other packages than {path} names ({changes}): the recipe changed \
         since the lock was written; refresh it with `imgvm lock --update`"
    )]
    Drift { path: String, changes: String },
}

/// A lock read from a file, for a build to follow.
#[derive(Debug, Clone)]
pub struct LockFile {
    pub path: std::path::PathBuf,
    pub lock: Lock,
}

impl LockFile {
    pub fn read(path: &std::path::Path) -> Result<LockFile, LockError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| LockError::Read {
            path: shown.clone(),
            source,
        })?;
        let parse_error = |e: serde_json::Error| LockError::Parse {
            path: shown.clone(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        };
        // The format first: a lock of another format need not parse as this one.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(&text).map_err(parse_error)?;
        if head.format != FORMAT {
            return Err(LockError::Format {
                path: shown,
                found: head.format,
            });
        }
        let lock: Lock = serde_json::from_slice(&text).map_err(parse_error)?;
        Ok(LockFile {
            path: path.to_owned(),
            lock,
        })
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// The lock is one for this recipe (architecture, suite, mirror), and names the
    /// release the build reads.
    pub fn check(&self, subject: &Subject) -> Result<&LockedRelease, LockError> {
        let lock = &self.lock;
        for (what, locked, wanted) in [
            ("the architecture", lock.arch.as_str(), subject.arch.as_str()),
            ("the suite", &lock.suite, subject.suite),
            ("the mirror", &lock.mirror, subject.mirror),
        ] {
            if locked != wanted {
                return Err(LockError::Mismatch {
                    path: self.shown(),
                    what,
                    locked: locked.to_owned(),
                    wanted: wanted.to_owned(),
                });
            }
        }
        let url = release_url(subject.mirror, subject.suite);
        lock.releases
            .iter()
            .find(|r| r.url == url)
            .ok_or_else(|| LockError::NoRelease {
                path: self.shown(),
                mirror: subject.mirror.to_owned(),
                suite: subject.suite.to_owned(),
            })
    }

    /// Before any VM starts: every release and package the lock names can still be had,
    /// from imgvm's cache (`store`), from the mirror or from the `fallback` archive (a
    /// snapshot of it). A release only the fallback still has is put into the store,
    /// where the package proxy serves it from.
    pub fn available(
        &self,
        release: &LockedRelease,
        fallback: Option<&str>,
        fetcher: &crate::archive::Fetcher,
        store: &std::path::Path,
    ) -> Result<(), LockError> {
        let mirror_error = |e: anyhow::Error| LockError::Mirror(format!("{e:#}"));
        // The same path in the fallback archive, for a file of the lock's mirror.
        let elsewhere = |url: &str| {
            let rest = url.strip_prefix(self.lock.mirror.as_str())?;
            fallback.map(|f| format!("{}/{}", f.trim_end_matches('/'), rest.trim_start_matches('/')))
        };
        if !store.join(&release.sha256).exists() {
            let mut candidates = vec![release.url.clone()];
            candidates.extend(elsewhere(&release.url));
            let mut found = false;
            for url in &candidates {
                let body = match fetcher.get(url) {
                    Ok(body) => body,
                    Err(_) if url != &release.url => continue,
                    Err(e) => return Err(mirror_error(e)),
                };
                if crate::archive::hex(&sha2::Sha256::digest(&body)) == release.sha256 {
                    crate::archive::keep(store, &body, &release.sha256).map_err(mirror_error)?;
                    found = true;
                    break;
                }
            }
            if !found {
                return Err(LockError::ReleaseGone {
                    path: self.shown(),
                    url: release.url.clone(),
                    hint: self.snapshot_hint(fallback),
                });
            }
        }
        let wanted: Vec<&LockedPackage> = self
            .lock
            .packages
            .iter()
            .filter(|p| !store.join(&p.sha256).exists())
            .collect();
        let present = crate::archive::in_parallel(&wanted, 8, |p| {
            let url = format!("{}/{}", p.archive, p.filename);
            match (fetcher.exists(&url)?, elsewhere(&url)) {
                (true, _) => Ok(true),
                (false, Some(url)) => fetcher.exists(&url),
                (false, None) => Ok(false),
            }
        })
        .map_err(mirror_error)?;
        let mut gone: Vec<&LockedPackage> = wanted
            .iter()
            .zip(present)
            .filter_map(|(p, present)| (!present).then_some(*p))
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        gone.sort();
        let names: Vec<String> = gone
            .iter()
            .map(|p| format!("{} {} ({})", p.name, p.version, p.architecture))
            .collect();
        Err(LockError::Gone {
            path: self.shown(),
            count: names.len(),
            names: names.join(", "),
            hint: self.snapshot_hint(fallback),
        })
    }

    /// What to do about what the mirror lost: name a snapshot of the lock's day, or
    /// another one than `fallback`, which lacks it too.
    fn snapshot_hint(&self, fallback: Option<&str>) -> String {
        let day = self
            .lock
            .releases
            .iter()
            .filter_map(LockedRelease::seconds)
            .max()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .map(|t| format!("{:04}{:02}{:02}T235959Z", t.year(), u8::from(t.month()), t.day()))
            .unwrap_or_else(|| "YYYYMMDDTHHMMSSZ".into());
        match fallback {
            None => format!("name a snapshot that has them in the recipe (`snapshot: {day}`, the lock's day)"),
            Some(url) => format!(
                "the snapshot {url} does not have them either: name another (`snapshot: {day}`, the lock's day)"
            ),
        }
    }

    /// After the build: it installed exactly what the lock names.
    pub fn followed_by(&self, built: &Lock) -> Result<(), LockError> {
        let ours: std::collections::BTreeSet<_> = self.lock.packages.iter().collect();
        let theirs: std::collections::BTreeSet<_> = built.packages.iter().collect();
        let mut changes: Vec<String> = theirs
            .difference(&ours)
            .map(|p| format!("+{} {}", p.name, p.version))
            .chain(ours.difference(&theirs).map(|p| format!("-{} {}", p.name, p.version)))
            .chain(
                built
                    .unlisted
                    .iter()
                    .map(|p| format!("+{} {} (unlisted)", p.name, p.version)),
            )
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let more = changes.len().saturating_sub(10);
        changes.truncate(10);
        if more > 0 {
            changes.push(format!("and {more} more"));
        }
        Err(LockError::Drift {
            path: self.shown(),
            changes: changes.join(", "),
        })
    }
}

/// The build's `SOURCE_DATE_EPOCH`, decided here only: `from_environment` (the
/// reproducible-builds convention) when set, else the lock's (what the locked build
/// used), else the date of the release the build installs from, so that the lock this
/// build writes rebuilds the same image.
pub fn source_date_epoch(
    from_environment: Option<&str>,
    lock: Option<&Lock>,
    release: &LockedRelease,
) -> Result<i64, LockError> {
    match (from_environment, lock) {
        (Some(text), _) => text
            .trim()
            .parse()
            .map_err(|_| LockError::Epoch(format!("SOURCE_DATE_EPOCH={text:?} is not a number of seconds"))),
        (None, Some(lock)) => Ok(lock.source_date_epoch),
        (None, None) => release
            .seconds()
            .ok_or_else(|| LockError::Epoch(format!("{} has no readable Date: {:?}", release.url, release.date))),
    }
}

/// Where a suite's signed release is, on `mirror`.
pub fn release_url(mirror: &str, suite: &str) -> String {
    format!("{}/dists/{suite}/InRelease", mirror.trim_end_matches('/'))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn package(name: &str, version: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            source: format!("{name}-src"),
            source_version: version.into(),
            archive: "http://deb.debian.org/debian".into(),
            filename: format!("pool/main/{name}_{version}_amd64.deb"),
            sha256: "ab".repeat(32),
        }
    }

    pub fn release(date: &str) -> LockedRelease {
        LockedRelease {
            url: "http://deb.debian.org/debian/dists/trixie/InRelease".into(),
            sha256: "cd".repeat(32),
            date: date.into(),
        }
    }

    pub fn subject() -> Subject<'static> {
        Subject {
            recipe: "test",
            arch: "amd64".into(),
            suite: "trixie",
            mirror: "http://deb.debian.org/debian",
        }
    }

    fn file(lock: Lock) -> LockFile {
        LockFile {
            path: "test-amd64.lock".into(),
            lock,
        }
    }

    pub fn helper(date: &str) -> HelperLock {
        HelperLock {
            releases: vec![release(date)],
            packages: vec![],
        }
    }

    pub fn installed(name: &str, version: &str, architecture: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            architecture: architecture.into(),
            multi_arch: String::new(),
        }
    }

    pub fn lock(packages: &[(&str, &str)]) -> Lock {
        let mut listed = Listed::default();
        listed.add_release(release("Sat, 28 Nov 2026 12:30:05 UTC"));
        let mut installed = Vec::new();
        for (name, version) in packages {
            listed.add_package(package(name, version));
            installed.push(self::installed(name, version, "amd64"));
        }
        let helper = HelperLock {
            packages: vec![package("busybox", "1")],
            ..helper("Thu, 01 Jan 1970 00:00:00 UTC")
        };
        Lock::new(subject(), 1_795_869_005, &installed, &listed, helper)
    }

    #[test]
    fn installed_packages_are_locked_from_what_the_signed_indices_list() {
        let mut listed = Listed::default();
        listed.add_package(package("bash", "5.2"));
        // The guest says it has bash 5.2 (listed) and a bash-completion nobody listed.
        let installed = [
            installed("bash", "5.2", "amd64"),
            installed("bash-completion", "9", "all"),
        ];
        let lock = Lock::new(
            subject(),
            7,
            &installed,
            &listed,
            helper("Sat, 28 Nov 2026 12:30:05 UTC"),
        );
        assert_eq!(lock.packages, [package("bash", "5.2")]);
        assert_eq!(lock.unlisted.len(), 1);
        assert_eq!(lock.unlisted[0].name, "bash-completion");
        assert_eq!(lock.source_date_epoch, 7, "the epoch the build used");
    }

    #[test]
    fn the_epoch_is_the_environments_else_the_locks_else_the_releases() {
        let release = release("Sat, 28 Nov 2026 12:30:05 UTC");
        let lock = Lock {
            source_date_epoch: 42,
            ..lock(&[])
        };
        assert_eq!(
            source_date_epoch(Some("1700000000"), Some(&lock), &release).unwrap(),
            1_700_000_000
        );
        assert_eq!(source_date_epoch(None, Some(&lock), &release).unwrap(), 42);
        assert_eq!(source_date_epoch(None, None, &release).unwrap(), 1_795_869_005);
        let bad = source_date_epoch(Some("yesterday"), None, &release).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "SOURCE_DATE_EPOCH=\"yesterday\" is not a number of seconds"
        );
    }

    #[test]
    fn a_version_the_index_does_not_list_is_not_locked() {
        let mut listed = Listed::default();
        listed.add_package(package("bash", "5.2"));
        let installed = [installed("bash", "5.3", "amd64")];
        let lock = Lock::new(subject(), 0, &installed, &listed, helper("x"));
        assert!(lock.packages.is_empty());
        assert_eq!(lock.unlisted[0].version, "5.3");
    }

    #[test]
    fn a_lock_is_for_one_recipe_and_release() {
        let locked = file(lock(&[("bash", "5.2")]));
        assert_eq!(locked.check(&subject()).unwrap().sha256, "cd".repeat(32));
        let other = Subject {
            suite: "bookworm",
            ..subject()
        };
        let err = locked.check(&other).unwrap_err().to_string();
        assert_eq!(
            err,
            "test-amd64.lock locks the suite `trixie`, but the recipe builds `bookworm`: \
             refresh the lock with `imgvm lock --update`"
        );
        let mut no_release = lock(&[]);
        no_release.releases.clear();
        assert!(matches!(
            file(no_release).check(&subject()),
            Err(LockError::NoRelease { .. })
        ));
    }

    #[test]
    fn reading_a_broken_or_foreign_lock_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        std::fs::write(&path, format!("{{\n  \"format\": {FORMAT},\n  \"recipe\": 3\n}}")).unwrap();
        let err = LockFile::read(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:3:", path.display())), "{err}");
        let mut future = lock(&[]);
        future.format = 99;
        std::fs::write(&path, future.to_json()).unwrap();
        let err = LockFile::read(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(&format!("lock format 99; this imgvm reads format {FORMAT}")),
            "{err}"
        );
        // An older lock is refused for its format, not for a field it lacks.
        std::fs::write(&path, "{\"format\": 1, \"helper\": {\"release\": {}}}").unwrap();
        let err = LockFile::read(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(&format!("lock format 1; this imgvm reads format {FORMAT}")),
            "{err}"
        );
    }

    #[test]
    fn a_build_that_installed_something_else_is_named_a_drift() {
        let locked = file(lock(&[("bash", "5.2"), ("zsh", "5")]));
        assert!(locked.followed_by(&lock(&[("zsh", "5"), ("bash", "5.2")])).is_ok());
        let err = locked
            .followed_by(&lock(&[("bash", "5.3"), ("zsh", "5")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("(+bash 5.3, -bash 5.2)"), "{err}");
    }

    #[test]
    fn packages_the_mirror_no_longer_has_are_named_before_the_build() {
        use crate::test_http::{ok, serve};
        let base = serve(|path| {
            if path.contains("gone") {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            } else {
                ok("")
            }
        });
        let snapshot = serve(|path| {
            if path.contains("gone") {
                ok("")
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            }
        });
        let mut locked = lock(&[("bash", "5.2"), ("gone", "1"), ("cached-gone", "2")]);
        locked.mirror = base.clone();
        for p in &mut locked.packages {
            p.archive = base.clone();
            p.sha256 = crate::archive::hex(&sha2::Sha256::digest(&p.name));
        }
        let store = tempfile::tempdir().unwrap();
        // The release and one package the mirror lacks are in the cache: that will do.
        let release = locked.releases[0].clone();
        std::fs::write(store.path().join(&release.sha256), "").unwrap();
        let cached = locked.packages.iter().find(|p| p.name == "cached-gone").unwrap();
        std::fs::write(store.path().join(&cached.sha256), "").unwrap();
        let fetcher = crate::archive::Fetcher::new(std::time::Duration::from_millis(1));
        let locked = file(locked);
        let err = locked.available(&release, None, &fetcher, store.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the mirror no longer has 1 package(s) that test-amd64.lock names: gone 1 (amd64);"),
            "{err}"
        );
        assert!(
            err.to_string().contains("`snapshot: 20261128T235959Z`, the lock's day"),
            "{err}"
        );
        // A snapshot that has it will do; one that does not is named.
        assert!(locked
            .available(&release, Some(&snapshot), &fetcher, store.path())
            .is_ok());
        let err = locked
            .available(&release, Some(&base), &fetcher, store.path())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("the snapshot {base} does not have them either")),
            "{err}"
        );
    }

    #[test]
    fn the_lock_reads_back_as_written() {
        let lock = lock(&[("zsh", "5"), ("bash", "5.2")]);
        assert_eq!(lock.packages[0].name, "bash", "sorted by name");
        let read: Lock = serde_json::from_slice(&lock.to_json()).unwrap();
        assert_eq!(read, lock);
    }
}
