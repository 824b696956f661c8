//! `cargo xtask`: the project's own automation (see the `cargo xtask` convention).
//!
//! - `setup`   installs what imgvm and its tests need on a Debian/Ubuntu machine
//! - `agents`  cross-builds the guest agent for every architecture
//! - `install` installs `imgvm` and its agents (default prefix: ~/.cargo)
//! - `deb`     builds a Debian package of imgvm for this machine's architecture
//! - `test`    setup + agents + the whole test suite (what CI runs)
//! - `fuzz`    runs the fuzz targets for a while (nightly, installed when it can be)
//! - `bench`   boot and build benchmarks

mod bench;
mod deb;
mod fuzz;
mod setup;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const ARCHES: [(&str, &str); 3] = [
    ("amd64", "x86_64-unknown-linux-musl"),
    ("arm64", "aarch64-unknown-linux-musl"),
    ("ppc64el", "powerpc64le-unknown-linux-gnu"),
];

fn main() -> std::process::ExitCode {
    match dispatch() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("agents") => agents("debug").map(drop),
        Some("install") => install(&rest),
        Some("deb") => deb::build().map(|deb| println!("{}", deb.display())),
        Some("test") => test(&rest),
        Some("fuzz") => fuzz::run(&rest),
        Some("bench") => bench::run(&rest),
        _ => {
            eprintln!("usage: cargo xtask <setup|agents|install [--prefix DIR]|deb|test|fuzz [SECONDS]|bench ...>");
            std::process::exit(2)
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Builds the agents and places them next to the `imgvm` binary of `profile`, where
/// imgvm looks for them. Returns that directory.
pub fn agents(profile: &str) -> Result<PathBuf> {
    let target_dir = root().join("target");
    let out = target_dir.join(profile);
    std::fs::create_dir_all(&out)?;
    for (arch, triple) in ARCHES {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--quiet",
            "--package",
            "imgvm-agent",
            "--profile",
            "agent",
            "--target",
            triple,
        ]);
        if triple.contains("-gnu") {
            // Static glibc: the appliance's libc is not the one the agent was linked against.
            cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
        }
        exec(&mut cmd).with_context(|| format!("building the {arch} agent (did `cargo xtask setup` run?)"))?;
        let built = target_dir.join(triple).join("agent").join("imgvm-agent");
        std::fs::copy(&built, out.join(format!("imgvm-agent-{arch}")))?;
    }
    Ok(out)
}

/// Installs `PREFIX/bin/imgvm` and `PREFIX/lib/imgvm/imgvm-agent-*`, where imgvm
/// looks for its agents, its manual pages and shell completions.
fn install(args: &[&str]) -> Result<()> {
    let prefix = match args {
        ["--prefix", dir] => PathBuf::from(dir),
        [] => std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")),
        _ => bail!("usage: cargo xtask install [--prefix DIR]"),
    };
    // zsh looks in PREFIX/share/zsh/site-functions for a local prefix.
    install_tree(&prefix, "zsh/site-functions")?;
    eprintln!(
        "xtask: installed {}, its agents in {}, its manual pages and shell completions in {}",
        prefix.join("bin/imgvm").display(),
        prefix.join("lib/imgvm").display(),
        prefix.join("share").display()
    );
    Ok(())
}

/// Builds imgvm (release) and lays it out under `prefix` as an installation: the binary,
/// the agents in `lib/imgvm`, manual pages in `share/man/man1`, and completions for
/// bash, fish and zsh (in `share/ZSH_DIR`, which differs between a local prefix and a
/// distribution's).
pub fn install_tree(prefix: &Path, zsh_dir: &str) -> Result<()> {
    exec(cargo().args(["build", "--quiet", "--release", "--package", "imgvm"]))?;
    let built = agents("release")?;
    let (bin, lib) = (prefix.join("bin"), prefix.join("lib/imgvm"));
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&lib)?;
    // Replace rather than overwrite: the old binary may be running.
    let tmp = bin.join(".imgvm.new");
    std::fs::copy(built.join("imgvm"), &tmp)?;
    std::fs::rename(&tmp, bin.join("imgvm"))?;
    for (arch, _) in ARCHES {
        let name = format!("imgvm-agent-{arch}");
        std::fs::copy(built.join(&name), lib.join(&name))?;
    }
    // man(1) finds PREFIX/share/man from PREFIX/bin on the PATH.
    let share = prefix.join("share");
    let imgvm = || Command::new(bin.join("imgvm"));
    exec(
        imgvm()
            .arg("man")
            .arg("--dir")
            .arg(share.join("man/man1"))
            .stdout(std::process::Stdio::null()),
    )?;
    for (shell, place) in [
        ("bash", "bash-completion/completions/imgvm".to_owned()),
        ("zsh", format!("{zsh_dir}/_imgvm")),
        ("fish", "fish/vendor_completions.d/imgvm.fish".to_owned()),
    ] {
        let script = imgvm().args(["completions", shell]).output()?;
        if !script.status.success() {
            bail!("imgvm completions {shell} failed ({})", script.status);
        }
        let path = share.join(place);
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        std::fs::write(&path, script.stdout)?;
    }
    Ok(())
}

/// What CI runs: everything from a fresh machine to a green (or red) suite.
fn test(extra: &[&str]) -> Result<()> {
    setup::run()?;
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    if extra.is_empty() {
        // Before the end-to-end tests: a minute each, and a crash should not wait for them.
        fuzz::run(&[])?;
    }
    exec(cargo().args(["build", "--quiet", "--package", "imgvm"]))?;
    let bin_dir = agents("debug")?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(extra)
        .env("IMGVM_BIN", bin_dir.join("imgvm"));
    exec(&mut cmd)
}
