//! `cargo xtask bench build`: the wall time of each step of the default recipe's build
//! for this machine, as its manifest records them.
//!
//! `cargo xtask bench boot`: per architecture, the helper VM's launch-to-handshake time,
//! next to the same kernel booting an initramfs that holds nothing but the agent and its
//! modules, measured the same way (launch to handshake over vsock). The difference is
//! what the appliance's userland costs at boot.
//!
//! `cargo xtask bench reproducible RECIPE [ARCH]`: the recipe built twice from one lock
//! (the first build's), each from empty disks; the time of each and the SHA256 of every
//! output, and `imgvm diff --files` of the two when they differ.
//!
//! `cargo xtask bench vendors [ARCH] [SUITE] [VENDOR...]`: the ec2, azure and gce
//! recipes (gce on amd64 only), or the vendors named, built from a cold step cache with `--test` (offline checks, and a boot on
//! each firmware of the arch), each output checked from outside imgvm to have its
//! vendor's format and size; the time of each build, its bootstrap and boots.
//!
//! `cargo xtask bench deb [SUITE...]`: the Debian package (`cargo xtask deb`) installed
//! with `apt-get install ./imgvm_*.deb` on a clean Debian of each suite (bookworm and
//! trixie unless named: an mmdebstrap chroot of the `apt` variant, thrown away after),
//! where an unprivileged user then runs `imgvm doctor` and boots the helper VM
//! (`imgvm run -- true`); the time of each. Needs root, for the chroot.
//!
//! `cargo xtask bench rebuild`: the default recipe (renamed, so that the step cache has
//! nothing of it yet) built cold, then again unchanged, after a change to its last `file`
//! step, and after a small package added in a late `apt` step; the time of each and the
//! steps it took from the step cache.

use anyhow::{bail, Context, Result};
use std::process::Command;

pub fn run(args: &[&str]) -> Result<()> {
    match args.first() {
        Some(&"boot") => boot(&args[1..]),
        Some(&"build") => build(),
        Some(&"peak-memory") => peak_memory(&args[1..]),
        Some(&"reproducible") => reproducible(&args[1..]),
        Some(&"rebuild") => rebuild(),
        Some(&"vendors") => vendors(&args[1..]),
        Some(&"deb") => deb(&args[1..]),
        _ => bail!(
            "usage: cargo xtask bench build | boot [ARCH[=SUITE]...] | reproducible RECIPE [ARCH] | rebuild | vendors [ARCH] [SUITE] [VENDOR...] | deb [SUITE...]"
        ),
    }
}

fn build() -> Result<()> {
    crate::exec(crate::cargo().args(["build", "--quiet", "--release", "--package", "imgvm"]))?;
    let bin = crate::agents("release")?.join("imgvm");
    let out = std::env::temp_dir().join(format!("imgvm-bench-build-{}", std::process::id()));
    // Through `peak-memory`, a process whose only descendants are imgvm and its VM.
    let status = Command::new(std::env::current_exe()?)
        .args(["bench", "peak-memory"])
        .arg(&bin)
        .args(["build", "--no-cache", "-o"])
        .arg(&out)
        .status()
        .context("running imgvm")?;
    if !status.success() {
        bail!("imgvm build failed ({status})");
    }
    let manifest = manifest_in(&out)?;
    let _ = std::fs::remove_dir_all(&out);
    println!("{:>9}  step", "seconds");
    for step in manifest["steps"].as_array().context("no steps in the manifest")? {
        println!(
            "{:>9.1}  {}",
            step["seconds"].as_f64().unwrap_or(f64::NAN),
            step["step"].as_str().unwrap_or("?")
        );
    }
    println!("{:>9.1}  total", manifest["build_seconds"].as_f64().unwrap_or(f64::NAN));
    Ok(())
}

fn reproducible(args: &[&str]) -> Result<()> {
    let (recipe, arch) = match args {
        [recipe] => (*recipe, std::env::consts::ARCH),
        [recipe, arch] => (*recipe, *arch),
        _ => bail!("usage: cargo xtask bench reproducible RECIPE [ARCH]"),
    };
    let arch = match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    crate::exec(crate::cargo().args(["build", "--quiet", "--release", "--package", "imgvm"]))?;
    let bin = crate::agents("release")?.join("imgvm");
    let base = std::env::temp_dir().join(format!("imgvm-bench-reproducible-{}", std::process::id()));
    let dirs = [base.join("first"), base.join("second")];
    let mut sums = Vec::new();
    for (i, out) in dirs.iter().enumerate() {
        let started = std::time::Instant::now();
        let mut build = Command::new(&bin);
        build
            .args(["build", "--no-cache", "--arch", arch, "-o"])
            .arg(out)
            .arg(recipe);
        match i {
            // The first ignores a lock beside the recipe; the second follows the first's.
            0 => build.arg("--no-lock"),
            _ => build.arg("--lock").arg(lock_in(&dirs[0])?),
        };
        let status = build.status().context("running imgvm")?;
        if !status.success() {
            bail!("build {} failed ({status})", i + 1);
        }
        println!("build {}: {:.0} s", i + 1, started.elapsed().as_secs_f64());
        let text = std::fs::read_to_string(out.join("SHA256SUMS"))?;
        sums.push(
            text.lines()
                .filter(|l| !l.ends_with(".manifest.json"))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    }
    for line in &sums[1] {
        let same = if sums[0].contains(line) { "same" } else { "DIFFERS" };
        println!("{same:>8}  {line}");
    }
    let identical = sums[0] == sums[1];
    if !identical {
        let status = Command::new(&bin).args(["diff", "--files"]).args(&dirs).status()?;
        println!("imgvm diff --files: {status}");
    }
    let _ = std::fs::remove_dir_all(&base);
    if !identical {
        bail!("the two builds differ");
    }
    Ok(())
}

fn rebuild() -> Result<()> {
    crate::exec(crate::cargo().args(["build", "--quiet", "--release", "--package", "imgvm"]))?;
    let bin = crate::agents("release")?.join("imgvm");
    let base = std::env::temp_dir().join(format!("imgvm-bench-rebuild-{}", std::process::id()));
    let recipes = base.join("recipes");
    std::fs::create_dir_all(&base)?;
    crate::exec(Command::new("cp").arg("-r").arg("images/debian").arg(&recipes))?;
    let recipe = recipes.join("trixie-nocloud.yaml");
    let edit = |file: &std::path::Path, from: &str, to: &str| -> Result<()> {
        let text = std::fs::read_to_string(file)?;
        if !text.contains(from) {
            bail!("{} has no `{from}`", file.display());
        }
        Ok(std::fs::write(file, text.replacen(from, to, 1))?)
    };
    let name = format!("name: debian-13-nocloud-bench-{}", std::process::id());
    edit(&recipe, "name: debian-13-nocloud", &name)?;
    let mut rows = Vec::new();
    let mut build = |what: &str| -> Result<()> {
        let out = base.join(format!("out-{}", rows.len()));
        let started = std::time::Instant::now();
        let status = Command::new(&bin)
            .args(["build", "-o"])
            .arg(&out)
            .arg(&recipe)
            .status()
            .context("running imgvm")?;
        if !status.success() {
            bail!("build `{what}` failed ({status})");
        }
        let seconds = started.elapsed().as_secs_f64();
        let manifest = manifest_in(&out)?;
        let steps = manifest["steps"].as_array().context("no steps in the manifest")?;
        let reused = steps.iter().filter(|s| s["cached"] == true).count();
        let of = steps.iter().filter(|s| s["step"] != "boot").count();
        // What the time went to: the steps that ran (the helper's boot is one of them),
        // and what the build did outside its steps (outputs, checksums, states).
        let ran: Vec<String> = steps
            .iter()
            .filter(|s| s["cached"] != true)
            .map(|s| {
                format!(
                    "{} {:.1}",
                    s["step"].as_str().unwrap_or("?"),
                    s["seconds"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        let in_steps: f64 = steps.iter().filter_map(|s| s["seconds"].as_f64()).sum();
        rows.push(format!(
            "{seconds:>9.1}  {what} ({reused} of {of} steps from the cache)\n{:>11}ran: {}; outside steps {:.1}",
            "",
            ran.join(", "),
            seconds - in_steps
        ));
        Ok(())
    };
    build("cold")?;
    build("nothing changed")?;
    edit(&recipes.join("parts/nocloud.yaml"), "version: 2", "version: 2 # edited")?;
    build("last file step changed")?;
    let mut text = std::fs::read_to_string(&recipe)?;
    text.push_str("steps:\n  - apt: {install: [hello]}\n");
    std::fs::write(&recipe, text)?;
    build("package added in a late apt step")?;
    let _ = std::fs::remove_dir_all(&base);
    println!("{:>9}  build", "seconds");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

fn vendors(args: &[&str]) -> Result<()> {
    let arch = args.first().copied().unwrap_or("amd64");
    let suite = args.get(1).copied().unwrap_or("trixie");
    crate::exec(crate::cargo().args(["build", "--quiet", "--release", "--package", "imgvm"]))?;
    let bin = crate::agents("release")?.join("imgvm");
    let base = std::env::temp_dir().join(format!("imgvm-bench-vendors-{}", std::process::id()));
    let vendors: &[&str] = match (args.get(2..), arch) {
        (Some(named), _) if !named.is_empty() => named,
        (_, "amd64") => &["ec2", "azure", "gce"],
        _ => &["ec2", "azure"],
    };
    println!("{:>9}  build", "seconds");
    for vendor in vendors {
        let out = base.join(vendor);
        let started = std::time::Instant::now();
        let status = Command::new(&bin)
            .args([
                "build",
                "--no-cache",
                "--test",
                "--version",
                "20261207-1",
                "--arch",
                arch,
                "-o",
            ])
            .arg(&out)
            .arg(format!("images/debian/{suite}-{vendor}.yaml"))
            .status()
            .context("running imgvm")?;
        if !status.success() {
            bail!("the {vendor} build failed ({status}); its log is in {}", out.display());
        }
        let seconds = started.elapsed().as_secs_f64();
        let manifest = manifest_in(&out)?;
        let name = manifest["name"].as_str().context("no name in the manifest")?.to_owned();
        let file = |ext: &str| out.join(format!("{name}.{ext}"));
        let build: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file("build.json"))?)?;
        if build["data"]["info"]["vendor"] != *vendor {
            bail!("{name}.build.json names vendor {}", build["data"]["info"]["vendor"]);
        }
        let format = vendor_format(vendor, &file)?;
        let step = |name: &str| {
            manifest["steps"]
                .as_array()
                .and_then(|steps| {
                    steps
                        .iter()
                        .find(|s| s["step"].as_str().is_some_and(|s| s.contains(name)))
                })
                .and_then(|s| s["seconds"].as_f64())
                .unwrap_or(f64::NAN)
        };
        let checks = manifest["tests"]["checks"].as_array().map_or(0, Vec::len);
        let boots: Vec<String> = manifest["tests"]["boots"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{} {:.1} s",
                    b["firmware"].as_str().unwrap_or("?"),
                    b["seconds"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        println!(
            "{seconds:>9.0}  {name}: {format}; bootstrap {:.0} s, {checks} checks passed, booted: {}",
            step("bootstrap"),
            boots.join(", ")
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

fn deb(args: &[&str]) -> Result<()> {
    let suites: &[&str] = if args.is_empty() { &["bookworm", "trixie"] } else { args };
    let deb = crate::deb::build()?;
    let name = deb.file_name().context("a file")?.to_string_lossy().into_owned();
    println!(
        "{:>9}  clean Debian: apt-get install ./{name}, then as a user imgvm doctor and imgvm run",
        "seconds"
    );
    for suite in suites {
        let started = std::time::Instant::now();
        // Each hook runs with the chroot's /dev, /proc and /sys mounted; the user's
        // imgvm cache (the helper's appliance) goes with the chroot.
        let hooks = [
            format!("copy-in {} /tmp", deb.display()),
            format!("chroot \"$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/{name}"),
            "chroot \"$1\" useradd --create-home builder".to_owned(),
            "chroot \"$1\" runuser -u builder -- imgvm doctor".to_owned(),
            "chroot \"$1\" runuser -u builder -- imgvm run -- cat /etc/os-release".to_owned(),
        ];
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["--quiet", "--variant=apt", "--include=passwd", suite, "/dev/null"]);
        for hook in &hooks {
            cmd.arg(format!("--customize-hook={hook}"));
        }
        crate::exec(&mut cmd)
            .with_context(|| format!("on a clean {suite} (mmdebstrap from `cargo xtask setup`; as root)"))?;
        println!(
            "{:>9.0}  {suite}: installed, doctor ready, helper VM ran",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Checks the vendor's own output with the tools the vendor's import uses, and says
/// what it is.
fn vendor_format(vendor: &str, file: &dyn Fn(&str) -> std::path::PathBuf) -> Result<String> {
    const GIB: u64 = 1 << 30;
    let output = |cmd: &mut Command| -> Result<String> {
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    };
    let info = |path: &std::path::Path, format: &str| -> Result<serde_json::Value> {
        let text = output(
            Command::new("qemu-img")
                .args(["info", "--output=json", "-f", format])
                .arg(path),
        )?;
        Ok(serde_json::from_str(&text)?)
    };
    match vendor {
        "ec2" => {
            let vmdk = info(&file("vmdk"), "vmdk")?;
            let kind = &vmdk["format-specific"]["data"]["create-type"];
            if kind != "streamOptimized" || vmdk["virtual-size"] != 8 * GIB {
                bail!("the VMDK is {kind}, {} bytes: {vmdk}", vmdk["virtual-size"]);
            }
            Ok("streamOptimized VMDK of 8 GiB".into())
        }
        "azure" => {
            // A fixed VHD: the disk and a 512-byte footer saying so (type 2).
            let path = file("vhd");
            let bytes = std::fs::metadata(&path)?.len();
            let mut tail = [0u8; 512];
            {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(&path)?;
                f.seek(SeekFrom::End(-512))?;
                f.read_exact(&mut tail)?;
            }
            let virtual_size = info(&path, "vpc")?["virtual-size"].as_u64().unwrap_or(0);
            if bytes != 30 * GIB + 512 || &tail[..8] != b"conectix" || tail[60..64] != [0, 0, 0, 2] {
                bail!("the VHD is {bytes} bytes, footer {:?}", &tail[..8]);
            }
            if virtual_size != 30 * GIB || virtual_size % (1 << 20) != 0 {
                bail!("the VHD's virtual size is {virtual_size}");
            }
            Ok("fixed VHD of 30 GiB (a whole number of MiB)".into())
        }
        "gce" => {
            let listing = output(Command::new("tar").arg("-tvzf").arg(file("tar.gz")))?;
            let members: Vec<&str> = listing.lines().collect();
            if members.len() != 1
                || !members[0].ends_with(" disk.raw")
                || !members[0].contains(&format!(" {} ", 10 * GIB))
            {
                bail!("the GCE archive holds: {listing}");
            }
            Ok("gzipped tar of one sparse disk.raw of 10 GiB".into())
        }
        other => bail!("no check for vendor {other}"),
    }
}

/// The manifest of the build written into `dir`.
fn manifest_in(dir: &std::path::Path) -> Result<serde_json::Value> {
    let manifest = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .context("no manifest in the output")?;
    Ok(serde_json::from_str(&std::fs::read_to_string(&manifest)?)?)
}

fn lock_in(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "lock"))
        .with_context(|| format!("no lock in {}", dir.display()))
}

/// Runs a command, then prints the peak resident memory of the largest process among it
/// and its descendants (imgvm, qemu, vhost-device-vsock).
fn peak_memory(command: &[&str]) -> Result<()> {
    let (program, args) = command.split_first().context("peak-memory: no command")?;
    let status = Command::new(program).args(args).status()?;
    // SAFETY: getrusage fills a zeroed struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    println!("peak memory of one process: {} MiB", usage.ru_maxrss / 1024);
    if !status.success() {
        bail!("{program} failed ({status})");
    }
    Ok(())
}

fn boot(arches: &[&str]) -> Result<()> {
    crate::exec(crate::cargo().args(["build", "--quiet", "--release", "--package", "imgvm"]))?;
    let bin = crate::agents("release")?.join("imgvm");
    let arches: Vec<&str> = if arches.is_empty() {
        crate::ARCHES.iter().map(|(a, _)| *a).collect()
    } else {
        arches.to_vec()
    };
    println!(
        "{:8} {:>22} {:>22}",
        "arch", "appliance boot (s)", "bare kernel+agent (s)"
    );
    for spec in arches {
        // `ppc64el=bookworm` measures the appliance of another suite.
        let (arch, suite) = spec.split_once('=').map_or((spec, None), |(a, s)| (a, Some(s)));
        let full = measure(&bin, arch, suite, false)?;
        let bare = measure(&bin, arch, suite, true)?;
        println!("{spec:8} {full:>22.2} {bare:>22.2}");
    }
    Ok(())
}

/// Median of three boots, as `imgvm appliance boot-time` reports them.
fn measure(bin: &std::path::Path, arch: &str, suite: Option<&str>, bare: bool) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let mut cmd = Command::new(bin);
        cmd.args(["--log-format", "json", "appliance", "boot-time", "--arch", arch]);
        if bare {
            cmd.arg("--bare");
        }
        if let Some(suite) = suite {
            cmd.args(["--suite", suite]);
        }
        let out = cmd.output().context("running imgvm")?;
        if !out.status.success() {
            bail!("imgvm failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let seconds: f64 = text
            .trim()
            .parse()
            .with_context(|| format!("unexpected output {text:?}"))?;
        times.push(seconds);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[1])
}
