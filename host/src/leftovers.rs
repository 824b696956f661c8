//! What a run leaves behind when it is killed, and how the next run removes it.
//!
//! imgvm writes temporary things in three kinds of places: its run directory (sockets,
//! the vsock device's files) under the system's temporary directory, staging directories
//! next to its outputs and in the cache, and partial files that become a cache entry or
//! an output once complete. A run that is SIGKILLed cannot clean up, so every such thing
//! carries a name that says it is imgvm's (`.imgvm-…`, `imgvm-run-…`) and:
//!
//! - a directory holds a lock file that its owner keeps locked (`flock`) while it lives;
//!   the kernel drops the lock when the owner dies, however it dies, so a directory
//!   whose lock can be taken belongs to nobody;
//! - a partial file is itself locked by its owner, from the moment after it is created
//!   until it is closed: one whose lock can be taken, and that is older than the gap
//!   between those two calls, belongs to nobody.
//!
//! Whoever creates such a thing in a directory first sweeps that directory.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// The lock file inside a claimed directory.
const OWNER: &str = ".imgvm-owner";

/// Prefix of partial files.
const PARTIAL: &str = ".imgvm-partial-";

/// How long a new directory may go without its lock file before it counts as abandoned
/// (its owner is between the two calls that create them).
pub const STALE: Duration = Duration::from_secs(10 * 60);

/// How long a partial file may go unlocked before it counts as abandoned: its owner
/// creates it and locks it in two calls.
const UNLOCKED_GRACE: Duration = Duration::from_secs(2);

/// A temporary directory that is this process's for as long as it lives: removed when
/// dropped, and by the next run's sweep if this one is killed.
pub struct ClaimedDir {
    // Before the lock: removed while still claimed.
    dir: tempfile::TempDir,
    _owner: File,
}

impl ClaimedDir {
    /// A new directory in `parent` named `prefix…`, after sweeping `parent` of
    /// abandoned ones with that prefix.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<ClaimedDir> {
        std::fs::create_dir_all(parent)?;
        sweep_dirs(parent, prefix);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        let owner = File::create(dir.path().join(OWNER))?;
        lock(&owner, true)?;
        Ok(ClaimedDir { dir, _owner: owner })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the directory, complete, to `dest`: it is no longer temporary.
    pub fn persist(self, dest: &Path) -> io::Result<()> {
        std::fs::remove_file(self.dir.path().join(OWNER))?;
        let path = self.dir.keep();
        std::fs::rename(&path, dest).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&path);
        })
    }
}

/// A new partial file in `dir`, locked while open, to be persisted under its final name
/// once complete; `dir` is swept of abandoned partial files first (once per process).
pub fn partial_file(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    static SWEPT: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    if SWEPT
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(dir.to_owned())
    {
        sweep_partial_files(dir);
    }
    let tmp = tempfile::Builder::new().prefix(PARTIAL).tempfile_in(dir)?;
    lock(tmp.as_file(), false)?;
    Ok(tmp)
}

/// Removes every `prefix…` directory in `parent` whose owner is gone.
pub fn sweep_dirs(parent: &Path, prefix: &str) {
    for path in entries(parent, prefix) {
        if abandoned_dir(&path) {
            tracing::info!("removing {} (left by a run that was killed)", path.display());
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Removes every partial file in `dir` whose owner is gone.
pub fn sweep_partial_files(dir: &Path) {
    for path in entries(dir, PARTIAL) {
        if abandoned_file(&path) {
            tracing::info!("removing {} (left by a run that was killed)", path.display());
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|e| e.path())
        .collect()
}

fn abandoned_dir(path: &Path) -> bool {
    if !path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return false;
    }
    match File::open(path.join(OWNER)) {
        // Taking the lock proves its owner is gone; ours is dropped with the file.
        Ok(owner) => lock(&owner, false).is_ok(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => age(path).is_some_and(|age| age > STALE),
        Err(_) => false,
    }
}

fn abandoned_file(path: &Path) -> bool {
    age(path).is_some_and(|age| age > UNLOCKED_GRACE) && File::open(path).is_ok_and(|file| lock(&file, false).is_ok())
}

fn age(path: &Path) -> Option<Duration> {
    let modified = path.symlink_metadata().ok()?.modified().ok()?;
    SystemTime::now().duration_since(modified).ok()
}

/// An exclusive lock on `file`, waiting for it when `wait`.
fn lock(file: &File, wait: bool) -> io::Result<()> {
    let how = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_age(path: &Path, age: Duration) {
        let when = SystemTime::now() - age;
        File::options()
            .write(true)
            .open(path)
            .or_else(|_| File::open(path))
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn a_claimed_directory_survives_sweeps_while_its_owner_lives() {
        let parent = tempfile::tempdir().unwrap();
        let claimed = ClaimedDir::new_in(parent.path(), ".imgvm-build-").unwrap();
        sweep_dirs(parent.path(), ".imgvm-build-");
        assert!(claimed.path().is_dir());
        let path = claimed.path().to_owned();
        drop(claimed);
        assert!(!path.exists());
    }

    #[test]
    fn a_directory_whose_owner_died_is_swept() {
        let parent = tempfile::tempdir().unwrap();
        // What a killed run leaves: the lock file is there, nobody holds its lock.
        let left = parent.path().join(".imgvm-build-dead");
        std::fs::create_dir(&left).unwrap();
        File::create(left.join(OWNER)).unwrap();
        std::fs::write(left.join("disk.raw"), b"half an image").unwrap();
        let unrelated = parent.path().join("imgvm-build-mine");
        std::fs::create_dir(&unrelated).unwrap();
        let fresh = ClaimedDir::new_in(parent.path(), ".imgvm-build-").unwrap();
        assert!(!left.exists(), "the abandoned directory is still there");
        assert!(unrelated.exists() && fresh.path().exists());
    }

    #[test]
    fn a_directory_without_a_lock_file_is_swept_only_when_stale() {
        let parent = tempfile::tempdir().unwrap();
        let young = parent.path().join(".imgvm-run-young");
        let old = parent.path().join(".imgvm-run-old");
        std::fs::create_dir(&young).unwrap();
        std::fs::create_dir(&old).unwrap();
        set_age(&old, STALE * 2);
        sweep_dirs(parent.path(), ".imgvm-run-");
        assert!(young.exists(), "a directory being set up was removed");
        assert!(!old.exists());
    }

    #[test]
    fn a_partial_file_whose_owner_died_is_swept_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // A killed run's download: nobody holds its lock, written to a minute ago.
        let dead = dir.path().join(".imgvm-partial-dead");
        std::fs::write(&dead, b"half a package").unwrap();
        set_age(&dead, Duration::from_secs(60));
        let new = partial_file(dir.path()).unwrap();
        assert!(!dead.exists(), "the killed run's partial file is still there");
        assert!(new.path().exists());
    }

    #[test]
    fn a_partial_file_whose_owner_lives_is_kept_however_old() {
        let dir = tempfile::tempdir().unwrap();
        let slow = partial_file(dir.path()).unwrap();
        set_age(slow.path(), STALE * 2);
        sweep_partial_files(dir.path());
        assert!(slow.path().exists(), "a live download was removed");
    }

    #[test]
    fn stale_partial_files_are_swept_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".imgvm-partial-abc");
        let fresh = dir.path().join(".imgvm-partial-def");
        let other = dir.path().join(".tmp-not-ours");
        for path in [&stale, &fresh, &other] {
            std::fs::write(path, b"x").unwrap();
        }
        set_age(&stale, STALE * 2);
        set_age(&other, STALE * 2);
        let new = partial_file(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists() && other.exists() && new.path().exists());
    }
}
