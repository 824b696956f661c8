//! Turning the built raw disk into the formats a recipe asks for, plus the manifest,
//! SHA256SUMS and the log. Conversions use the `qemu-img` program.

use super::{Log, Timing};
use crate::manifest::{Manifest, OutputInfo, RecipeInfo};
use crate::recipe::{OutputFormat, Recipe};
use anyhow::{bail, Context, Result};
use imgvm_protocol::Package;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Writes every output into `staging` and returns their paths (the log excepted).
#[allow(clippy::too_many_arguments)]
pub async fn write(
    recipe: &Recipe,
    name: &str,
    staging: &Path,
    disk: &Path,
    packages: &[Package],
    lock: &crate::lock::Lock,
    timings: &[Timing],
    tests: Option<&super::TestReport>,
    started: Instant,
    log: &mut Log,
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for format in &recipe.outputs {
        let begun = Instant::now();
        // Conversions of large disks take a while: say which one is under way.
        tracing::info!("output {}", format.name());
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
                let file = convert(
                    disk,
                    staging.join(format!("{name}.vmdk")),
                    &["-O", "vmdk", "-o", "subformat=streamOptimized"],
                )
                .await?;
                super::format_ids::vmdk(&file, name, lock.source_date_epoch).context("fixing the VMDK's CID")?;
                file
            }
            // Azure wants a fixed VHD whose size is a whole number of MiB (checked with the
            // recipe); force_size keeps qemu-img from rounding to CHS geometry.
            OutputFormat::Vhd => {
                let file = convert(
                    disk,
                    staging.join(format!("{name}.vhd")),
                    &["-O", "vpc", "-o", "subformat=fixed,force_size"],
                )
                .await?;
                super::format_ids::vhd(&file, name, lock.source_date_epoch).context("fixing the VHD's footer")?;
                file
            }
            OutputFormat::Tar => disk_tar(staging, format!("{name}.tar"), None, lock).await?,
            OutputFormat::GceTar => disk_tar(staging, format!("{name}.tar.gz"), Some("gzip -n"), lock).await?,
            OutputFormat::Rootfs => {
                let out = staging.join(format!("{name}.rootfs.tar"));
                std::fs::rename(staging.join("rootfs.tar"), &out).context("the rootfs tarball is missing")?;
                out
            }
        };
        log.line(&format!(
            "== output {}: {} ({:.1} s)",
            format.name(),
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
    let mut sums = Sums::default();
    let mut tar_sha512 = None;
    for ((file, format), digests) in files.iter().zip(&recipe.outputs).zip(digests_all(&files)?) {
        let base = file.file_name().expect("named").to_string_lossy().into_owned();
        sums.add(&base, &digests);
        if *format == OutputFormat::Tar {
            tar_sha512 = Some(digests.sha512.clone());
        }
        infos.push(OutputInfo {
            file: base,
            format: *format,
            bytes: std::fs::metadata(file)?.len(),
            sha256: digests.sha256,
        });
    }
    let manifest = Manifest {
        name: name.to_owned(),
        recipe: RecipeInfo {
            name: recipe.name.clone(),
            file: recipe.file.display().to_string(),
            sha256: recipe.hash.clone(),
        },
        imgvm_version: env!("CARGO_PKG_VERSION").to_owned(),
        arch: recipe.arch.to_string(),
        suite: recipe.suite.clone(),
        mirror: recipe.mirror.clone(),
        built_at: u64::try_from(lock.source_date_epoch).unwrap_or(0),
        build_seconds: started.elapsed().as_secs_f64(),
        table: Some(recipe.table),
        partitions: recipe.partitions.clone(),
        outputs: infos,
        steps: timings.to_vec(),
        packages: packages.to_vec(),
        tests: tests.cloned(),
    };
    let manifest_path = staging.join(format!("{name}.manifest.json"));
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)?;
    let lock_path = staging.join(format!("{name}.lock"));
    std::fs::write(&lock_path, lock.to_json())?;
    let sbom_path = staging.join(format!("{name}.cdx.json"));
    std::fs::write(&sbom_path, crate::sbom::cyclonedx(name, lock)?)?;
    let mut written = vec![manifest_path, lock_path, sbom_path];
    if let Some(json) = super::debian_build::build_json(recipe, packages, lock, tar_sha512.as_deref()) {
        let path = staging.join(format!("{name}.build.json"));
        std::fs::write(&path, json)?;
        written.push(path);
    }
    for file in written {
        sums.add(&file.file_name().expect("named").to_string_lossy(), &digests(&file)?);
        files.push(file);
    }
    for (list, text) in [("SHA256SUMS", sums.sha256), ("SHA512SUMS", sums.sha512)] {
        let path = staging.join(list);
        std::fs::write(&path, text)?;
        files.push(path);
    }
    Ok(files)
}

/// A file's SHA256 (what imgvm's manifest and lock name) and SHA512 (what Debian
/// publishes), from one read.
pub(super) struct Digests {
    pub sha256: String,
    pub sha512: Vec<u8>,
}

/// `sha256sum` and `sha512sum` lists of the outputs, in the order they were added.
#[derive(Default)]
struct Sums {
    sha256: String,
    sha512: String,
}

impl Sums {
    fn add(&mut self, name: &str, digests: &Digests) {
        self.sha256.push_str(&format!("{}  {name}\n", digests.sha256));
        self.sha512
            .push_str(&format!("{}  {name}\n", crate::archive::hex(&digests.sha512)));
    }
}

/// The disk as Debian's image archive and GCE's import format: a tar holding one sparse
/// member named disk.raw, compressed with `compress` if given. Dated SOURCE_DATE_EPOCH,
/// owned by root, and gzip without a time stamp, so that the same disk gives the same
/// archive.
async fn disk_tar(staging: &Path, file: String, compress: Option<&str>, lock: &crate::lock::Lock) -> Result<PathBuf> {
    let out = staging.join(file);
    let mtime = format!("--mtime=@{}", lock.source_date_epoch);
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--format=oldgnu".as_ref(),
        mtime.as_ref(),
        "--owner=0".as_ref(),
        "--group=0".as_ref(),
        "--numeric-owner".as_ref(),
    ];
    let program = compress.map(|c| format!("--use-compress-program={c}"));
    if let Some(program) = &program {
        args.push(program.as_ref());
    }
    args.extend([
        "-Scf".as_ref(),
        out.as_os_str(),
        "-C".as_ref(),
        staging.as_os_str(),
        "disk.raw".as_ref(),
    ]);
    run("tar", &args).await?;
    Ok(out)
}

async fn convert(disk: &Path, out: PathBuf, args: &[&str]) -> Result<PathBuf> {
    let mut all: Vec<&std::ffi::OsStr> = vec!["convert".as_ref(), "-f".as_ref(), "raw".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.push(disk.as_os_str());
    all.push(out.as_os_str());
    run("qemu-img", &all).await?;
    Ok(out)
}

pub(super) async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let output = crate::child::command(program)
        .args(args)
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

pub(super) fn digests(path: &Path) -> Result<Digests> {
    use sha2::{Digest, Sha256, Sha512};
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (mut sha256, mut sha512) = (Sha256::new(), Sha512::new());
    let mut buffer = vec![0; 1 << 20];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                sha256.update(&buffer[..n]);
                sha512.update(&buffer[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(Digests {
        sha256: crate::archive::hex(&sha256.finalize()),
        sha512: sha512.finalize().to_vec(),
    })
}

/// The digests of each of `files`, each on a thread of its own: the raw image alone takes
/// seconds, and the others need not wait for it.
fn digests_all(files: &[PathBuf]) -> Result<Vec<Digests>> {
    std::thread::scope(|scope| {
        let hashing: Vec<_> = files.iter().map(|file| scope.spawn(|| digests(file))).collect();
        hashing
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tool(program: &str, args: &[&str]) -> String {
        let out = Command::new(program).args(args).output().expect("tool runs");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The same disk, written at another time as another file, gives the same file in
    /// every disk format.
    #[tokio::test]
    async fn the_same_disk_gives_the_same_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let recipe_path = dir.path().join("r.yaml");
        std::fs::write(
            &recipe_path,
            "name: t\nsuite: trixie\ndisk:\n  size: 16MiB\n  partitions:\n    - {name: root, type: root, filesystem: ext4, mount: /}\noutputs: [raw, qcow2-compressed, vmdk, vhd, tar, gce-tar]\nvendor: generic\n",
        )
        .unwrap();
        let recipe = Recipe::load(&recipe_path, Some(crate::arch::Arch::Amd64)).unwrap();
        let lock = crate::lock::tests::lock(&[("base-files", "13.8")]);
        let mut sums = Vec::new();
        for (i, mtime) in [1_700_000_000, 1_800_000_000].into_iter().enumerate() {
            let staging = dir.path().join(format!("staging{i}"));
            std::fs::create_dir(&staging).unwrap();
            let disk = staging.join("disk.raw");
            let mut content = vec![0u8; 16 << 20];
            content[1 << 20..(1 << 20) + 11].copy_from_slice(b"the same fs");
            std::fs::write(&disk, &content).unwrap();
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
            std::fs::File::options()
                .write(true)
                .open(&disk)
                .unwrap()
                .set_modified(time)
                .unwrap();
            let mut log = Log::new(std::fs::File::create(dir.path().join(format!("log{i}"))).unwrap());
            write(
                &recipe,
                "t-amd64",
                &staging,
                &disk,
                &[],
                &lock,
                &[],
                None,
                Instant::now(),
                &mut log,
            )
            .await
            .unwrap();
            let text = std::fs::read_to_string(staging.join("SHA256SUMS")).unwrap();
            let mut images: Vec<String> = text
                .lines()
                .filter(|l| !l.ends_with(".json") && !l.ends_with(".lock"))
                .map(str::to_owned)
                .collect();
            assert_eq!(images.len(), 6, "{text}");
            images.push(std::fs::read_to_string(staging.join("t-amd64.build.json")).unwrap());
            sums.push(images);
        }
        assert_eq!(sums[0], sums[1]);
    }

    /// Every format from one small partitioned disk, checked with the tools its consumers
    /// use: qemu-img for the disk formats, tar for the archives, sha256sum for the sums.
    #[tokio::test]
    async fn every_format() {
        let dir = tempfile::tempdir().unwrap();
        let recipe_path = dir.path().join("r.yaml");
        std::fs::write(
            &recipe_path,
            "name: t\nsuite: trixie\ndisk:\n  size: 64MiB\n  partitions:\n    - {name: esp, type: esp, size: 8MiB, filesystem: vfat, mount: /boot/efi}\n    - {name: root, type: root, filesystem: ext4, mount: /}\noutputs: [raw, qcow2-compressed, vmdk, vhd, tar, gce-tar, rootfs]\nvendor: generic\n",
        )
        .unwrap();
        let recipe = Recipe::load(&recipe_path, Some(crate::arch::Arch::Amd64)).unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let disk = staging.join("disk.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(recipe.disk_size.bytes())
            .unwrap();
        let settings = crate::plan::Settings {
            test: false,
            epoch: 0,
            image: true,
        };
        let plan = crate::plan::plan(&recipe, &settings);
        let table = plan.phases[0]
            .actions
            .iter()
            .find_map(|a| match a {
                crate::plan::Action::Op(imgvm_protocol::ImageOp::Partition(table)) => Some(table),
                _ => None,
            })
            .expect("a plan starts by partitioning");
        let script = table
            .partitions
            .iter()
            .map(|p| match p.size_bytes {
                Some(size) => format!("size={}, type={}\n", size / 512, p.type_code),
                None => format!("type={}\n", p.type_code),
            })
            .collect::<String>();
        let mut sfdisk = Command::new("sfdisk")
            .args(["--quiet", "--label", "gpt"])
            .arg(&disk)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(sfdisk.wait().unwrap().success());
        std::fs::write(
            staging.join("rootfs.tar"),
            tool("tar", &["-c", "-f", "-", "-C", "/etc", "hostname"]),
        )
        .unwrap();
        let mut log = Log::new(std::fs::File::create(dir.path().join("log")).unwrap());
        let packages = [
            Package {
                name: "base-files".into(),
                version: "13.8".into(),
                architecture: "amd64".into(),
                multi_arch: "foreign".into(),
            },
            Package {
                name: "libc6".into(),
                version: "2.41-12".into(),
                architecture: "amd64".into(),
                multi_arch: "same".into(),
            },
        ];
        let files = write(
            &recipe,
            "t-amd64",
            &staging,
            &disk,
            &packages,
            &crate::lock::tests::lock(&[("base-files", "13.8")]),
            &[],
            None,
            Instant::now(),
            &mut log,
        )
        .await
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "t-amd64.raw",
                "t-amd64.qcow2",
                "t-amd64.vmdk",
                "t-amd64.vhd",
                "t-amd64.tar",
                "t-amd64.tar.gz",
                "t-amd64.rootfs.tar",
                "t-amd64.manifest.json",
                "t-amd64.lock",
                "t-amd64.cdx.json",
                "t-amd64.build.json",
                "SHA256SUMS",
                "SHA512SUMS"
            ]
        );
        assert!(!disk.exists(), "the working disk became the raw output");
        // What `diff` reads back is what was written.
        let (_, manifest) = Manifest::find(&staging).unwrap();
        assert_eq!(manifest.packages, packages);
        assert_eq!(manifest.outputs.len(), 7);
        let path = |name: &str| staging.join(name).display().to_string();
        // Named formats: qemu-img cannot tell a fixed VHD (a footer at the end) from raw.
        let info = |name: &str, format: &str| -> serde_json::Value {
            serde_json::from_str(&tool("qemu-img", &["info", "--output=json", "-f", format, &path(name)])).unwrap()
        };

        // Each converted image holds the same disk: same partition table, same bytes.
        for (name, format) in [
            ("t-amd64.qcow2", "qcow2"),
            ("t-amd64.vmdk", "vmdk"),
            ("t-amd64.vhd", "vpc"),
        ] {
            assert_eq!(info(name, format)["virtual-size"], 64 << 20, "{name}");
            tool(
                "qemu-img",
                &["compare", "-f", "raw", "-F", format, &path("t-amd64.raw"), &path(name)],
            );
        }
        assert_eq!(
            info("t-amd64.qcow2", "qcow2")["format-specific"]["data"]["compat"],
            "1.1"
        );
        assert_eq!(
            info("t-amd64.vmdk", "vmdk")["format-specific"]["data"]["create-type"],
            "streamOptimized"
        );
        // A fixed VHD is the disk itself plus a 512-byte footer that says "fixed" (type 2).
        let vhd = std::fs::read(path("t-amd64.vhd")).unwrap();
        assert_eq!(vhd.len(), (64 << 20) + 512);
        let footer = &vhd[64 << 20..];
        assert_eq!(&footer[..8], b"conectix");
        assert_eq!(footer[60..64], [0, 0, 0, 2]);
        // Its time stamp and UUID were replaced: its checksum still holds.
        let sum = (footer.iter().enumerate())
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
        assert_eq!(footer[64..68], (!sum).to_be_bytes(), "the footer's checksum is wrong");
        // Debian's archive and GCE's: a tar (gzipped for GCE) with one member, disk.raw,
        // the whole disk.
        for (archive, gzip) in [("t-amd64.tar", ""), ("t-amd64.tar.gz", "z")] {
            let listing = tool("tar", &[&format!("-tv{gzip}f"), &path(archive)]);
            let members: Vec<&str> = listing.lines().collect();
            assert_eq!(members.len(), 1, "{listing}");
            assert!(
                members[0].contains(&format!(" {} ", 64 << 20)) && members[0].ends_with(" disk.raw"),
                "{listing}"
            );
            let unpacked = dir.path().join(archive);
            std::fs::create_dir(&unpacked).unwrap();
            tool(
                "tar",
                &[&format!("-x{gzip}f"), &path(archive), "-C", unpacked.to_str().unwrap()],
            );
            tool(
                "cmp",
                &[&path("t-amd64.raw"), unpacked.join("disk.raw").to_str().unwrap()],
            );
        }
        // Debian's Build manifest: the tar's digest as Debian's tools check it, and a
        // Multi-Arch: same package by its architecture too.
        let build: serde_json::Value =
            serde_json::from_slice(&std::fs::read(staging.join("t-amd64.build.json")).unwrap()).unwrap();
        assert_eq!(build["apiVersion"], "cloud.debian.org/v1alpha1");
        assert_eq!(build["kind"], "Build");
        let sha512 = tool("sha512sum", &[&path("t-amd64.tar")]);
        let raw: Vec<u8> = (0..64)
            .map(|i| u8::from_str_radix(&sha512[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let digest = base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, raw);
        assert_eq!(
            build["metadata"]["annotations"]["cloud.debian.org/digest"],
            format!("sha512:{digest}")
        );
        assert_eq!(
            build["data"]["packages"],
            serde_json::json!([
                {"name": "base-files", "version": "13.8"},
                {"name": "libc6:amd64", "version": "2.41-12"}
            ])
        );
        let info = &build["data"]["info"];
        assert_eq!(
            (&info["release_id"], &info["vendor"], &info["type"], &info["arch"]),
            (&"13".into(), &"generic".into(), &"dev".into(), &"amd64".into())
        );
        assert_eq!(tool("tar", &["-tf", &path("t-amd64.rootfs.tar")]).trim(), "hostname");

        // The sums cover every output, the manifest, the lock and the SBOM, and they hold.
        for (list, tool) in [("SHA256SUMS", "sha256sum"), ("SHA512SUMS", "sha512sum")] {
            let sums = std::fs::read_to_string(staging.join(list)).unwrap();
            assert_eq!(sums.lines().count(), 11, "{sums}");
            let check = Command::new(tool)
                .args(["--check", "--strict", list])
                .current_dir(&staging)
                .output()
                .unwrap();
            assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(staging.join("t-amd64.manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["outputs"].as_array().unwrap().len(), 7);
        assert_eq!(manifest["outputs"][3]["format"], "vhd");
        assert_eq!(manifest["packages"][0]["name"], "base-files");
        assert_eq!(manifest["recipe"]["sha256"], recipe.hash.as_str());
    }
}
