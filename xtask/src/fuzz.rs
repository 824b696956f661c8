//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target for SECONDS (default 60)
//! each, on a nightly toolchain and cargo-fuzz that it installs when it can.
//!
//! The committed corpora replay on stable in every test run (`tests/fuzz_corpus.rs` of
//! each crate); this is the search for new inputs. New inputs go to a scratch corpus, not
//! into the committed one: what is worth keeping is chosen by hand (`cargo fuzz cmin`).

use crate::{exec, root};
use anyhow::{bail, Context, Result};
use std::process::Command;

/// (crate directory with a `fuzz/`, target) of every fuzz target.
const TARGETS: [(&str, &str); 2] = [("protocol", "decode"), ("host", "proxy_head")];

/// What `cargo xtask test` gives each target: enough for libFuzzer to get past the
/// committed corpus, small against the end-to-end tests.
pub const CI_SECONDS: u64 = 60;

pub fn run(args: &[&str]) -> Result<()> {
    let seconds = match args {
        [] => CI_SECONDS,
        [n] => n.parse().context("usage: cargo xtask fuzz [SECONDS]")?,
        _ => bail!("usage: cargo xtask fuzz [SECONDS]"),
    };
    if !toolchain()? {
        eprintln!(
            "xtask: fuzzing skipped: no nightly toolchain could be installed (the corpora still replay on stable)"
        );
        return Ok(());
    }
    for (dir, target) in TARGETS {
        let scratch = root().join("target/fuzz-scratch").join(target);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        let committed = root().join(dir).join("fuzz/corpus").join(target);
        eprintln!("xtask: fuzzing {dir}/{target} for {seconds} s");
        // No sanitizer (coverage instrumentation only): the targets are safe Rust, so a
        // panic or a broken oracle is what there is to find, and without AddressSanitizer
        // the build takes minutes less.
        exec(
            Command::new("cargo")
                .args(["+nightly", "fuzz", "run", "--sanitizer", "none", target])
                .arg(&scratch)
                .arg(&committed)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .current_dir(root().join(dir)),
        )
        .with_context(|| {
            format!("fuzz target {dir}/{target} failed (its crash input is under {dir}/fuzz/artifacts)")
        })?;
    }
    Ok(())
}

/// Installs nightly and cargo-fuzz when missing; `false` when nightly cannot be had.
fn toolchain() -> Result<bool> {
    let succeeds = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !succeeds(Command::new("cargo").args(["+nightly", "--version"]))
        && !succeeds(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
    {
        return Ok(false);
    }
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        exec(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(true)
}
