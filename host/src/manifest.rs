//! `NAME.manifest.json`: what a build made, from what, and what is in it. `build` writes
//! it; `diff` reads two of them back. One type for both, so that they cannot drift.

use crate::build::{TestReport, Timing};
use crate::recipe::{OutputFormat, Partition, TableKind};
use imgvm_protocol::Package;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub recipe: RecipeInfo,
    pub imgvm_version: String,
    pub arch: String,
    pub suite: String,
    pub mirror: String,
    /// The build's `SOURCE_DATE_EPOCH` (seconds since the Unix epoch): the date of what
    /// is in the image, the same for every rebuild from one lock.
    pub built_at: u64,
    /// How long this build took, and each step (`steps`): a record of this run, the
    /// only part of a build's outputs that differs between two builds from one lock
    /// (`imgvm diff` leaves it out).
    pub build_seconds: f64,
    /// The partition table (absent in manifests of imgvm before it was recorded).
    #[serde(default)]
    pub table: Option<TableKind>,
    pub partitions: Vec<Partition>,
    pub outputs: Vec<OutputInfo>,
    pub steps: Vec<Timing>,
    /// Every package in the image's dpkg database.
    pub packages: Vec<Package>,
    /// With `--test`: every offline check and boot, passed or not. Written, not read.
    #[serde(skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub tests: Option<TestReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecipeInfo {
    pub name: String,
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OutputInfo {
    pub file: String,
    pub format: OutputFormat,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not an imgvm manifest: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path} holds no *.manifest.json")]
    NoneIn { path: String },
    #[error("{path} holds several manifests ({names}): name one of them")]
    Several { path: String, names: String },
}

impl Manifest {
    /// The manifest at `path`, or the one manifest in the output directory `path`.
    pub fn find(path: &Path) -> Result<(std::path::PathBuf, Manifest), ManifestError> {
        let shown = path.display().to_string();
        let file = if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| ManifestError::Read {
                path: shown.clone(),
                source,
            })?;
            let mut found: Vec<_> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
                .collect();
            found.sort();
            match found.len() {
                0 => return Err(ManifestError::NoneIn { path: shown }),
                1 => found.remove(0),
                _ => {
                    let names: Vec<_> = found
                        .iter()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .collect();
                    return Err(ManifestError::Several {
                        path: shown,
                        names: names.join(", "),
                    });
                }
            }
        } else {
            path.to_owned()
        };
        let shown = file.display().to_string();
        let text = std::fs::read(&file).map_err(|source| ManifestError::Read {
            path: shown.clone(),
            source,
        })?;
        let manifest = serde_json::from_slice(&text).map_err(|source| ManifestError::Parse { path: shown, source })?;
        Ok((file, manifest))
    }
}
