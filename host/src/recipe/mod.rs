//! Recipes: the declarative description of an image (see `images/`). This module reads
//! and checks them; everything after works on the merged, valid [`Recipe`].

pub mod builtin;
mod error;
mod host_source;
mod load;
mod model;
mod quantity;
mod size;
mod timeout;
pub mod trust;
mod validate;

pub use error::RecipeError;
pub use host_source::{HostSource, SourceKind};
pub use model::*;
pub use size::Size;
pub use timeout::Timeout;
pub use trust::Trust;

use crate::arch::Arch;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the command line sets over a recipe's own settings.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--arch`: else the recipe's `arch`, else the host's.
    pub arch: Option<Arch>,
    /// `--var NAME=VALUE`: wins over every file's `variables:`, and must name one of them
    /// (a misspelt name would otherwise change nothing, silently).
    pub vars: BTreeMap<String, String>,
    /// `--mirror`: the image's mirror instead of the recipe's `mirror:` (a `snapshot:`
    /// still serves the build). The user's own choice, so [`Trust`] does not confine it.
    pub mirror: Option<String>,
    /// `--version`: the build's version, in the output names and in the recipe's
    /// `version` variable when it declares one.
    pub version: Option<String>,
}

/// A recipe with its `extends` chain and per-architecture parts merged in, checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recipe {
    pub name: String,
    pub description: Option<String>,
    /// debian-cloud-images' vendor name, when the recipe gives one (`NAME.build.json`).
    pub vendor: Option<String>,
    pub arch: Arch,
    pub suite: String,
    /// The mirror packages come from (the snapshot archive with `snapshot:`).
    pub mirror: String,
    /// With `snapshot:`, the mirror the snapshot stands in for (`mirror:`, or the
    /// default): a lock written from that mirror is followed from it, and the snapshot
    /// serves only what the mirror no longer has, so the image names the same mirror.
    pub snapshot_for: Option<String>,
    pub components: Vec<String>,
    pub disk_size: Size,
    pub table: TableKind,
    pub partitions: Vec<Partition>,
    pub packages: Vec<String>,
    /// How long a step may take unless it says otherwise.
    pub step_timeout: Timeout,
    /// Always starts with bootstrap and ends with finalize.
    pub steps: Vec<Step>,
    pub outputs: Vec<OutputFormat>,
    pub tests: Vec<Test>,
    pub boot_test: BootTest,
    pub file: PathBuf,
    /// The build's version (`--version`), as Debian's image names carry it.
    pub version: Option<String>,
    /// SHA256 over every file of the recipe, for the manifest.
    pub hash: String,
}

impl Recipe {
    /// What it builds, whatever the version: `NAME-ARCH`.
    pub fn image_name(&self) -> String {
        format!("{}-{}", self.name, self.arch)
    }

    /// What the outputs of a build are named: `NAME-ARCH`, then `-VERSION` if given
    /// (Debian's `debian-13-genericcloud-amd64-20261128-1`).
    pub fn output_name(&self) -> String {
        match &self.version {
            Some(version) => format!("{}-{version}", self.image_name()),
            None => self.image_name(),
        }
    }

    /// Where the lock that pins its packages lives: beside it, named as its image.
    pub fn lock_path(&self) -> PathBuf {
        let dir = self.file.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        dir.join(format!("{}.lock", self.image_name()))
    }

    /// Reads `path` for `arch` (else the recipe's own `arch`, else the host's), confined
    /// as [`trust`] says.
    pub fn load(path: &Path, arch: Option<Arch>) -> Result<Recipe, RecipeError> {
        let overrides = Overrides {
            arch,
            ..Overrides::default()
        };
        load::load(path, &overrides, Trust::Confined)
    }

    /// [`Recipe::load`] with what the command line sets and the trust the user gave the
    /// recipe.
    pub fn load_with(path: &Path, overrides: &Overrides, trust: Trust) -> Result<Recipe, RecipeError> {
        load::load(path, overrides, trust)
    }

    /// The directory `copy` steps are relative to.
    pub fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }
}
