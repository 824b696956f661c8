//! Reading the image ahead: a helper that resumes a build from a stored state has none of
//! the image in memory, and the seal reads every file of it (through an emulated disk,
//! twice as slowly as from memory). One thread walks the root filesystem and asks the
//! kernel to read each file (`POSIX_FADV_WILLNEED`: the reads are queued, not copied
//! here), while the host goes on with the steps.

use crate::job::Job;
use imgvm_protocol::{Handle, OperationError, Prefetch};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The walk under way, if any: what [`stop`] ends.
static UNDER_WAY: Mutex<Option<Walk>> = Mutex::new(None);

struct Walk {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Handle<Prefetch> for Job<'_> {
    fn handle(&self, _op: Prefetch) -> Result<(), OperationError> {
        stop();
        let root = PathBuf::from(&self.root);
        // Half of what is free: reading more than memory holds would only push out what
        // was read first, and the steps meanwhile need memory too.
        let budget = available_memory().unwrap_or(0) / 2;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn({
                let stop = stop.clone();
                move || walk(&root, budget, &stop)
            })
            .map_err(|e| self.io_error(&e))?;
        *UNDER_WAY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Walk { stop, thread });
        Ok(())
    }
}

/// Ends the walk under way and waits for it, so that nothing of the image is open: called
/// before the image is unmounted.
pub(super) fn stop() {
    let walk = UNDER_WAY.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(walk) = walk {
        walk.stop.store(true, Ordering::Relaxed);
        let _ = walk.thread.join();
    }
}

/// Asks for the regular files below `root` on its own filesystem (the chroot's /proc,
/// /dev and /sys are other filesystems) to be read, until `budget` bytes were asked for
/// or `stop` is set. Returns how many bytes it asked for. What cannot be read (a file a
/// step removed meanwhile) is passed over: nothing depends on this but speed.
fn walk(root: &Path, budget: u64, stop: &AtomicBool) -> u64 {
    let Ok(device) = std::fs::symlink_metadata(root).map(|m| m.dev()) else {
        return 0;
    };
    let mut asked = 0;
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if stop.load(Ordering::Relaxed) {
                return asked;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != device {
                continue;
            }
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() && meta.len() > 0 {
                if asked.saturating_add(meta.len()) > budget {
                    return asked;
                }
                if read_ahead(&entry.path()) {
                    asked += meta.len();
                }
            }
        }
    }
    asked
}

/// Queues the reads of a whole file. `O_NOATIME`: reading it ahead must not change the
/// image.
fn read_ahead(path: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    else {
        return false;
    };
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_WILLNEED) == 0 }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_asks_for_every_file_within_its_budget_and_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/one"), [1u8; 100]).unwrap();
        std::fs::write(dir.path().join("a/two"), [2u8; 50]).unwrap();
        std::fs::write(dir.path().join("empty"), []).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let go_on = AtomicBool::new(false);
        assert_eq!(
            walk(dir.path(), u64::MAX, &go_on),
            150,
            "every file, links not followed"
        );
        assert!(walk(dir.path(), 120, &go_on) < 150, "the budget ends the walk");
        let stopped = AtomicBool::new(true);
        assert_eq!(walk(dir.path(), u64::MAX, &stopped), 0);
    }
}
