//! The disk a build makes its image on, and the step cache seen from a build: where the
//! build resumes, and the state kept after each step ([`crate::states`]).
//!
//! The disk is a chain of qcow2 files. Its top is the only one written; after a step
//! whose state may be kept, the guest freezes its filesystems, a new empty top is put
//! over the old one through QMP, and the old top, no longer written, is stored as that
//! step's state. A build that finds the states of its first steps stored starts with an
//! empty top over the last of them.

use super::outputs::run;
use super::Log;
use crate::helper::Helper;
use crate::states::{Meta, Store};
use anyhow::{Context, Result};
use imgvm_protocol::{Freeze, Thaw};
use std::path::Path;
use tokio_util::sync::CancellationToken;

pub struct WorkDisk {
    /// `None` with `--no-cache`: the chain is one file in the staging directory.
    store: Option<Store>,
    keys: Vec<Option<String>>,
    /// The phase whose state the build starts from.
    pub resume: Option<usize>,
    top: tempfile::NamedTempFile,
    size: u64,
    /// False once a state this build made turned out stored by another build meanwhile:
    /// what this build keeps after it would be a delta on the wrong file.
    storing: bool,
    recipe: String,
    arch: String,
}

impl WorkDisk {
    /// A disk of `size` bytes, in the step cache (`store`) or, without one, in `staging`;
    /// over the state of the longest prefix of `keys` the cache has.
    pub async fn new(
        store: Option<Store>,
        keys: Vec<Option<String>>,
        staging: &Path,
        size: u64,
        recipe: &str,
        arch: &str,
    ) -> Result<WorkDisk> {
        // The last phase's state is the finished image, not a disk to go on with.
        let before_last = &keys[..keys.len().saturating_sub(1)];
        let resume = store.as_ref().and_then(|s| s.resume_point(before_last));
        let dir = store.as_ref().map_or(staging, Store::dir);
        let backing = resume.and_then(|i| keys[i].as_deref());
        let top = overlay(dir, backing, size).await?;
        Ok(WorkDisk {
            store,
            keys,
            resume,
            top,
            size,
            storing: true,
            recipe: recipe.to_owned(),
            arch: arch.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        self.top.path()
    }

    /// The finished image a build with every one of these keys stored, and what that
    /// build found out about it.
    pub fn finished(&self) -> Option<(std::path::PathBuf, serde_json::Value)> {
        let store = self.store.as_ref()?;
        let last = self.keys.len().checked_sub(1)?;
        if self.resume != last.checked_sub(1) {
            return None;
        }
        let key = self.keys[last].as_deref()?;
        let result = store.meta(key)?.result?;
        Some((store.dir().join(Store::file_name(key)), result))
    }

    /// Stores the finished image (`sealed`, raw) as the state after the last phase
    /// (`label`), with `result`, what the build found out about it; a copy in qcow2, so
    /// it takes only the space its data does. A failure to store it is logged.
    pub async fn keep_finished(&self, sealed: &Path, label: &str, result: serde_json::Value, log: &mut Log) {
        let (Some(store), Some(Some(key))) = (&self.store, self.keys.last()) else {
            return;
        };
        if !self.storing {
            return;
        }
        let stored = async {
            let file = crate::leftovers::partial_file(store.dir())?;
            let args = ["convert", "-f", "raw", "-O", "qcow2"].map(std::ffi::OsStr::new);
            let paths = [sealed.as_os_str(), file.path().as_os_str()];
            run("qemu-img", &[&args[..], &paths[..]].concat()).await?;
            let meta = Meta {
                parent: self.keys.len().checked_sub(2).and_then(|i| self.keys[i].clone()),
                recipe: self.recipe.clone(),
                arch: self.arch.clone(),
                step: label.to_owned(),
                result: Some(result),
            };
            let (store, key) = (store.clone(), key.clone());
            Ok::<_, anyhow::Error>(tokio::task::spawn_blocking(move || store.commit(file, &key, &meta)).await??)
        };
        match stored.await {
            Ok(true) => log.line(&format!("== {label}: the finished image kept in the step cache")),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("the step cache: cannot keep the finished image: {e:#}");
                log.line(&format!("== {label}: cannot keep the finished image: {e:#}"));
            }
        }
    }

    /// Keeps the disk as phase `index` (`label`) left it, if its state may be kept: the
    /// helper's filesystems frozen meanwhile. A state that cannot be stored is logged;
    /// the build goes on.
    pub async fn keep(
        &mut self,
        helper: &Helper,
        index: usize,
        label: &str,
        log: &mut Log,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let (Some(store), Some(key)) = (&self.store, self.keys[index].clone()) else {
            return Ok(());
        };
        if !self.storing {
            return Ok(());
        }
        let started = std::time::Instant::now();
        tracing::info!("{label}: storing its state in the step cache");
        let next = overlay(store.dir(), Some(&key), self.size).await?;
        let session = &helper.session;
        session.image(Freeze, None, |_| {}, cancel).await??;
        let snapshot = helper.vm.snapshot_disk(0, next.path()).await;
        // Thawed whatever the snapshot did: the build goes on either way, or fails on
        // the snapshot's error.
        let thawed = session.image(Thaw, None, |_| {}, cancel).await;
        snapshot.context("keeping the state of the disk")?;
        thawed??;
        let done = std::mem::replace(&mut self.top, next);
        let meta = Meta {
            parent: index.checked_sub(1).and_then(|i| self.keys[i].clone()),
            recipe: self.recipe.clone(),
            arch: self.arch.clone(),
            step: label.to_owned(),
            result: None,
        };
        let store = store.clone();
        let stored = tokio::task::spawn_blocking(move || store.commit(done, &key, &meta)).await?;
        match stored {
            Ok(true) => log.line(&format!(
                "== {label}: state kept in the step cache ({:.1} s)",
                started.elapsed().as_secs_f64()
            )),
            Ok(false) => {
                self.storing = false;
                log.line(&format!(
                    "== {label}: another build stored this state meanwhile; the rest of this build is not kept"
                ));
            }
            Err(e) => {
                self.storing = false;
                tracing::warn!("the step cache: cannot keep the state after {label}: {e}");
                log.line(&format!("== {label}: cannot keep its state: {e}"));
            }
        }
        Ok(())
    }
}

/// A new empty qcow2 top in `dir` (a partial file, removed unless stored), backed by
/// the stored state `backing` if any. Its header names the state relative to `dir`, so
/// the chain still opens when the top becomes a state itself, and after the cache moved.
async fn overlay(dir: &Path, backing: Option<&str>, size: u64) -> Result<tempfile::NamedTempFile> {
    let file = crate::leftovers::partial_file(dir).with_context(|| format!("creating a disk in {}", dir.display()))?;
    let mut args: Vec<std::ffi::OsString> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some(key) = backing {
        // -u: the backing file is attached by the running VM, or opened when booting.
        args.extend([
            "-u".into(),
            "-b".into(),
            Store::file_name(key).into(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    args.push(file.path().into());
    args.push(size.to_string().into());
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run("qemu-img", &args).await?;
    Ok(file)
}
