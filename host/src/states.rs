//! The step cache: the image's work disk as it was after each step of a build, kept so
//! that the next build whose first steps are the same starts after them.
//!
//! A state is a qcow2 file holding what its step wrote, backed by the state before it
//! (named relative to the same directory, so the cache can move), and named by its key:
//! SHA256 over the key before it and the step's planned actions, which carry everything
//! the step reads (a `copy` source by its content hash, a file's text, the packages by
//! name from the release the build is pinned to); the first key covers what all steps
//! depend on ([`base`]). Two builds with the same keys start from the same tree; the
//! seal at the end makes the same tree the same image, so a reused state gives the image
//! a build from zero gives.
//!
//! A state appears under its name only complete (synced, then renamed) and never
//! replaces one: the states after it are deltas on exactly that file. `KEY.json` beside
//! it says what it is, for `imgvm cache info`, and its time is when it was last used.
//! Builds hold the store's lock shared while they use states; trimming and
//! `imgvm cache clean` take it exclusively, so a state never goes while a build reads it.

use crate::plan::Phase;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The key of the state before any step: what every step's result depends on besides
/// the step itself. `parts` are imgvm's version, the helper (appliance and agent), the
/// release installed from, the architecture and the disk's size.
pub fn base(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"imgvm state 1\0");
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    crate::archive::hex(&hasher.finalize())
}

/// The key of the state after each phase, `None` from the first phase that may not be
/// stored ([`Phase::cache`]) on: what follows it depends on something imgvm cannot see.
pub fn keys(base: &str, phases: &[Phase]) -> Vec<Option<String>> {
    let mut before = Some(base.to_owned());
    phases
        .iter()
        .map(|phase| {
            before = before.take().filter(|_| phase.cache).map(|before| {
                let mut hasher = Sha256::new();
                hasher.update(before.as_bytes());
                hasher.update(serde_json::to_vec(&phase.actions).expect("plans serialise"));
                crate::archive::hex(&hasher.finalize())
            });
            before.clone()
        })
        .collect()
}

/// What a state is, beside it as `KEY.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The state it is a delta on; `None` for the first step's.
    pub parent: Option<String>,
    pub recipe: String,
    pub arch: String,
    /// The step it is the state after, as the build named it (`step 3/12 (apt)`).
    pub step: String,
    /// Only for the state after the last step, which is the finished image itself (not a
    /// delta): what the build found out about it, as `build` records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

/// One stored state, for `imgvm cache info` and trimming.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub meta: Meta,
    /// Bytes the state's file takes on disk.
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// The states directory, held shared (or exclusively) while open.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    _lock: std::sync::Arc<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the step cache {0} is in use by a running build")]
    Busy(PathBuf),
    #[error("the step cache {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

impl Store {
    /// The store in imgvm's cache, held shared: other builds may use it at once.
    pub fn open() -> Result<Store, StoreError> {
        Store::open_in(&dir(), libc::LOCK_SH)
    }

    /// The store held exclusively, if no build is using it.
    pub fn exclusive() -> Result<Store, StoreError> {
        Store::open_in(&dir(), libc::LOCK_EX | libc::LOCK_NB)
    }

    fn open_in(dir: &Path, how: libc::c_int) -> Result<Store, StoreError> {
        let io = |source| StoreError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), how) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock => StoreError::Busy(dir.to_owned()),
                _ => io(e),
            });
        }
        Ok(Store {
            dir: dir.to_owned(),
            _lock: std::sync::Arc::new(lock),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of the state `key`, as a state after it names it (relative to the store).
    pub fn file_name(key: &str) -> String {
        format!("{key}.qcow2")
    }

    /// The last phase of the longest prefix of `keys` whose states are all stored: the
    /// chain the build's disk can start on. Marks those states used.
    pub fn resume_point(&self, keys: &[Option<String>]) -> Option<usize> {
        let stored = keys
            .iter()
            .take_while(|key| {
                key.as_ref()
                    .is_some_and(|k| self.dir.join(Store::file_name(k)).is_file())
            })
            .count();
        let found = stored.checked_sub(1)?;
        let now = SystemTime::now();
        for key in keys[..=found].iter().flatten() {
            let _ = File::open(self.dir.join(format!("{key}.json"))).and_then(|f| f.set_modified(now));
        }
        Some(found)
    }

    /// The description of the stored state `key`, marked used.
    pub fn meta(&self, key: &str) -> Option<Meta> {
        if !self.dir.join(Store::file_name(key)).is_file() {
            return None;
        }
        let json = self.dir.join(format!("{key}.json"));
        let meta = serde_json::from_slice(&std::fs::read(&json).ok()?).ok()?;
        let _ = File::open(&json).and_then(|f| f.set_modified(SystemTime::now()));
        Some(meta)
    }

    /// Stores `file` (complete: nothing writes it any more) as the state `key`. False
    /// when that state exists already (another build stored it meanwhile): it is not
    /// replaced, and the states after this one must not be stored either, as they are
    /// deltas on `file`.
    pub fn commit(&self, file: tempfile::NamedTempFile, key: &str, meta: &Meta) -> io::Result<bool> {
        file.as_file().sync_all()?;
        let json = self.dir.join(format!("{key}.json"));
        let mut partial = crate::leftovers::partial_file(&self.dir)?;
        serde_json::to_writer(&mut partial, meta)?;
        partial.as_file().sync_all()?;
        // The description first: a state without one would be invisible to trimming.
        partial.persist(&json).map_err(|e| e.error)?;
        match file.persist_noclobber(self.dir.join(Store::file_name(key))) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.error),
        }
    }

    /// Every stored state.
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".qcow2")) else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            let json = self.dir.join(format!("{key}.json"));
            let (Ok(text), Ok(state)) = (std::fs::read(&json), entry.metadata()) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<Meta>(&text) else {
                continue;
            };
            let last_used = json
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(Entry {
                key: key.to_owned(),
                meta,
                bytes: std::os::unix::fs::MetadataExt::blocks(&state) * 512,
                last_used,
            });
        }
        out.sort_by(|a, b| {
            (&a.meta.recipe, &a.meta.arch, a.last_used).cmp(&(&b.meta.recipe, &b.meta.arch, b.last_used))
        });
        out
    }

    /// Removes states, least recently used first, each with the states after it, until
    /// the store holds at most `limit` bytes; the bytes removed. Needs the store held
    /// exclusively ([`Store::exclusive`]).
    pub fn trim(&self, limit: u64) -> u64 {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let mut removed = 0;
        // Oldest first; a state is used whenever one after it is, so among equals the
        // later states go first.
        entries.sort_by_key(|e| e.last_used);
        let mut gone = HashSet::new();
        for entry in &entries {
            if total <= limit {
                break;
            }
            if gone.contains(&entry.key) {
                continue;
            }
            for key in descendants(&entries, &entry.key) {
                if gone.insert(key.clone()) {
                    let bytes = entries.iter().find(|e| e.key == key).map_or(0, |e| e.bytes);
                    self.remove(&key);
                    total -= bytes;
                    removed += bytes;
                }
            }
        }
        removed
    }

    /// Removes every state, and descriptions a killed build left without one; the bytes
    /// removed. Needs the store held exclusively.
    pub fn clean(&self) -> u64 {
        let removed = self.entries().into_iter().map(|e| e.bytes).sum();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json" || e == "qcow2") {
                let _ = std::fs::remove_file(path);
            }
        }
        removed
    }

    /// The state file first: without it the description describes nothing.
    fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.dir.join(Store::file_name(key)));
        let _ = std::fs::remove_file(self.dir.join(format!("{key}.json")));
    }
}

/// `key` and every state stored after it, `key` last.
fn descendants(entries: &[Entry], key: &str) -> Vec<String> {
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in entries {
        if let Some(parent) = &e.meta.parent {
            children.entry(parent).or_default().push(&e.key);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![key];
    while let Some(k) = stack.pop() {
        out.push(k.to_owned());
        stack.extend(children.get(k).into_iter().flatten());
    }
    out.reverse();
    out
}

/// Where the states are: `states` in imgvm's cache.
pub fn dir() -> PathBuf {
    crate::cache::dir().join("states")
}

/// How large the step cache may grow: `$IMGVM_STATE_CACHE_LIMIT` (a size such as
/// `20GiB`), else 10 GiB: the states of a few recipes (a Debian cloud image's bootstrap
/// is about 1 GiB).
pub fn limit() -> u64 {
    std::env::var("IMGVM_STATE_CACHE_LIMIT")
        .ok()
        .and_then(|text| text.parse::<crate::recipe::Size>().ok())
        .map_or(10 << 30, |size| size.bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Action;
    use imgvm_protocol as proto;

    fn phase(text: &str, cache: bool) -> Phase {
        Phase {
            label: format!("step ({text})"),
            timeout: crate::recipe::Timeout::DEFAULT,
            cache,
            actions: vec![Action::Op(proto::Hostname(text.into()).into())],
        }
    }

    #[test]
    fn a_changed_step_changes_its_key_and_every_later_one_only() {
        let before = keys("b", &[phase("a", true), phase("b", true), phase("c", true)]);
        let after = keys("b", &[phase("a", true), phase("B", true), phase("c", true)]);
        assert_eq!(before[0], after[0]);
        assert_ne!(before[1], after[1]);
        assert_ne!(before[2], after[2]);
        assert!(before.iter().all(Option::is_some));
        // Another helper, release or disk: nothing is shared.
        let other = keys("other", &[phase("a", true)]);
        assert_ne!(other[0], before[0]);
    }

    #[test]
    fn nothing_from_an_uncached_step_on_has_a_key() {
        let keys = keys("b", &[phase("a", true), phase("b", false), phase("c", true)]);
        assert!(keys[0].is_some());
        assert_eq!(keys[1..], [None, None]);
    }

    fn store(dir: &Path) -> Store {
        Store::open_in(dir, libc::LOCK_SH).unwrap()
    }

    fn state(store: &Store, key: &str, parent: Option<&str>, bytes: usize) {
        let mut file = crate::leftovers::partial_file(store.dir()).unwrap();
        io::Write::write_all(&mut file, &vec![1u8; bytes]).unwrap();
        let meta = Meta {
            parent: parent.map(str::to_owned),
            recipe: "r".into(),
            arch: "amd64".into(),
            step: key.into(),
            result: None,
        };
        assert!(store.commit(file, key, &meta).unwrap());
    }

    #[test]
    fn a_stored_state_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        state(&store, "k", None, 10);
        let mut other = crate::leftovers::partial_file(dir.path()).unwrap();
        io::Write::write_all(&mut other, b"another build's").unwrap();
        let meta = store.entries()[0].meta.clone();
        assert!(!store.commit(other, "k", &meta).unwrap());
        assert_eq!(std::fs::read(dir.path().join("k.qcow2")).unwrap(), vec![1u8; 10]);
        // The loser's file is gone, not left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
    }

    #[test]
    fn the_longest_stored_prefix_is_where_a_build_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let keys: Vec<_> = ["a", "b", "c"].iter().map(|k| Some(k.to_string())).collect();
        assert_eq!(store.resume_point(&keys), None);
        state(&store, "a", None, 1);
        state(&store, "b", Some("a"), 1);
        assert_eq!(store.resume_point(&keys), Some(1));
        assert_eq!(store.resume_point(&[Some("a".into()), None]), Some(0));
        // A chain with a state missing (removed by hand) is used only up to the gap.
        std::fs::remove_file(dir.path().join("a.qcow2")).unwrap();
        assert_eq!(store.resume_point(&keys), None);
    }

    #[test]
    fn trimming_removes_the_least_recently_used_with_what_follows_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        // Two chains: a <- b, and c <- d; a's chain used longest ago.
        state(&store, "a", None, 8192);
        state(&store, "b", Some("a"), 8192);
        state(&store, "c", None, 8192);
        state(&store, "d", Some("c"), 8192);
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        for key in ["a", "b"] {
            File::open(dir.path().join(format!("{key}.json")))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let total: u64 = store.entries().iter().map(|e| e.bytes).sum();
        // Room for one chain: the old one goes, both its states.
        let removed = store.trim(total / 2);
        assert_eq!(removed, total / 2);
        let mut left: Vec<_> = store.entries().into_iter().map(|e| e.key).collect();
        left.sort();
        assert_eq!(left, ["c", "d"]);
        // A parent removed takes its children along, even if they were used later.
        File::open(dir.path().join("c.json"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        store.trim(total / 4 + 1);
        assert!(store.entries().is_empty());
    }

    #[test]
    fn a_store_in_use_cannot_be_cleaned_and_a_free_one_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let build = store(dir.path());
        assert!(matches!(
            Store::open_in(dir.path(), libc::LOCK_EX | libc::LOCK_NB),
            Err(StoreError::Busy(_))
        ));
        state(&build, "a", None, 4096);
        // What a build killed between a description and its state leaves.
        std::fs::write(dir.path().join("b.json"), b"{}").unwrap();
        drop(build);
        let store = Store::open_in(dir.path(), libc::LOCK_EX | libc::LOCK_NB).unwrap();
        assert_eq!(store.clean(), 4096);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, [".lock"]);
    }
}
