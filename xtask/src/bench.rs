//! `cargo xtask bench build`: the wall time of each step of the default recipe's build
//! for this machine, as its manifest records them.
//!
//! `cargo xtask bench boot`: per architecture, the helper VM's launch-to-handshake time,
//! next to the same kernel booting an initramfs that holds nothing but the agent and its
//! modules, measured the same way (launch to handshake over vsock). The difference is
//! what the appliance's userland costs at boot.

use anyhow::{bail, Context, Result};
use std::process::Command;

pub fn run(args: &[&str]) -> Result<()> {
    match args.first() {
        Some(&"boot") => boot(&args[1..]),
        Some(&"build") => build(),
        Some(&"peak-memory") => peak_memory(&args[1..]),
        _ => bail!("usage: cargo xtask bench build | boot [ARCH[=SUITE]...]"),
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
        .args(["build", "-o"])
        .arg(&out)
        .status()
        .context("running imgvm")?;
    if !status.success() {
        bail!("imgvm build failed ({status})");
    }
    let manifest = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .context("no manifest in the output")?;
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)?;
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
