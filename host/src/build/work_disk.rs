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
        let resume = store.as_ref().and_then(|s| s.resume_point(&keys));
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
