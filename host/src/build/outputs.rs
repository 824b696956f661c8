//! Turning the built raw disk into the formats a recipe asks for, plus the manifest,
//! SHA256SUMS and the log. Conversions use the `qemu-img` program.

use super::{Log, Timing};
use crate::recipe::{OutputFormat, Recipe};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

#[derive(serde::Serialize)]
struct Manifest<'a> {
    name: &'a str,
    recipe: RecipeInfo<'a>,
    imgvm_version: &'static str,
    arch: String,
    suite: &'a str,
    mirror: &'a str,
    /// Seconds since the Unix epoch.
    built_at: u64,
    build_seconds: f64,
    partitions: &'a [crate::recipe::Partition],
    outputs: Vec<OutputInfo>,
    steps: &'a [Timing],
    packages: &'a [Package],
}

#[derive(serde::Serialize)]
struct RecipeInfo<'a> {
    name: &'a str,
    file: String,
    sha256: &'a str,
}

#[derive(serde::Serialize)]
struct OutputInfo {
    file: String,
    format: OutputFormat,
    bytes: u64,
    sha256: String,
}

/// Writes every output into `staging` and returns their paths (the log excepted).
#[allow(clippy::too_many_arguments)]
pub async fn write(
    recipe: &Recipe,
    name: &str,
    staging: &Path,
    disk: &Path,
    packages: &[Package],
    timings: &[Timing],
    started: Instant,
    log: &mut Log,
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for format in &recipe.outputs {
        let begun = Instant::now();
        let file = match format {
            OutputFormat::Raw => staging.join(format!("{name}.raw")),
            OutputFormat::Qcow2 => convert(disk, staging.join(format!("{name}.qcow2")), &["-O", "qcow2"]).await?,
            OutputFormat::Qcow2Compressed => {
                convert(
                    disk,
                    staging.join(format!("{name}.qcow2")),
                    &["-c", "-O", "qcow2", "-o", "compat=1.1"],
                )
                .await?
            }
            OutputFormat::Vmdk => {
                convert(
                    disk,
                    staging.join(format!("{name}.vmdk")),
                    &["-O", "vmdk", "-o", "subformat=streamOptimized"],
                )
                .await?
            }
            // Azure wants a fixed VHD whose size is a whole number of MiB (checked with the
            // recipe); force_size keeps qemu-img from rounding to CHS geometry.
            OutputFormat::Vhd => {
                convert(
                    disk,
                    staging.join(format!("{name}.vhd")),
                    &["-O", "vpc", "-o", "subformat=fixed,force_size"],
                )
                .await?
            }
            // GCE's layout: a gzipped tar holding one sparse member named disk.raw.
            OutputFormat::GceTar => {
                let out = staging.join(format!("{name}.tar.gz"));
                run(
                    "tar",
                    &[
                        "--format=oldgnu".as_ref(),
                        "-Sczf".as_ref(),
                        out.as_os_str(),
                        "-C".as_ref(),
                        staging.as_os_str(),
                        "disk.raw".as_ref(),
                    ],
                )
                .await?;
                out
            }
            OutputFormat::Rootfs => {
                let out = staging.join(format!("{name}.rootfs.tar"));
                std::fs::rename(staging.join("rootfs.tar"), &out).context("the rootfs tarball is missing")?;
                out
            }
        };
        log.line(&format!(
            "== output {format:?}: {} ({:.1} s)",
            file.display(),
            begun.elapsed().as_secs_f64()
        ));
        files.push(file);
    }
    // The raw image last: the conversions above read it.
    let raw = staging.join(format!("{name}.raw"));
    if recipe.outputs.contains(&OutputFormat::Raw) {
        std::fs::rename(disk, &raw)?;
    } else {
        std::fs::remove_file(disk)?;
    }

    let mut infos = Vec::new();
    let mut sums = String::new();
    for (file, format) in files.iter().zip(&recipe.outputs) {
        let sha256 = sha256(file)?;
        let base = file.file_name().expect("named").to_string_lossy().into_owned();
        sums.push_str(&format!("{sha256}  {base}\n"));
        infos.push(OutputInfo {
            file: base,
            format: *format,
            bytes: std::fs::metadata(file)?.len(),
            sha256,
        });
    }
    let manifest = Manifest {
        name,
        recipe: RecipeInfo {
            name: &recipe.name,
            file: recipe.file.display().to_string(),
            sha256: &recipe.hash,
        },
        imgvm_version: env!("CARGO_PKG_VERSION"),
        arch: recipe.arch.to_string(),
        suite: &recipe.suite,
        mirror: &recipe.mirror,
        built_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        build_seconds: started.elapsed().as_secs_f64(),
        partitions: &recipe.partitions,
        outputs: infos,
        steps: timings,
        packages,
    };
    let manifest_path = staging.join(format!("{name}.manifest.json"));
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)?;
    sums.push_str(&format!(
        "{}  {}\n",
        sha256(&manifest_path)?,
        manifest_path.file_name().expect("named").to_string_lossy()
    ));
    let sums_path = staging.join("SHA256SUMS");
    std::fs::write(&sums_path, sums)?;
    files.push(manifest_path);
    files.push(sums_path);
    Ok(files)
}

async fn convert(disk: &Path, out: PathBuf, args: &[&str]) -> Result<PathBuf> {
    let mut all: Vec<&std::ffi::OsStr> = vec!["convert".as_ref(), "-f".as_ref(), "raw".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.push(disk.as_os_str());
    all.push(out.as_os_str());
    run("qemu-img", &all).await?;
    Ok(out)
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {program} (see `imgvm doctor`)"))?;
    if !output.status.success() {
        bail!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(crate::archive::hex(&hasher.finalize()))
}
