//! `cargo xtask deb`: a Debian package of imgvm for this machine's architecture, laid
//! out as `cargo xtask install --prefix /usr` lays it out, with the user-space vsock
//! device beside the agents (Debian 12 does not package it). It depends on what imgvm
//! runs (qemu and firmware for this architecture's VMs, qemu-img, gpgv) and recommends
//! the other architectures' qemu; its library dependencies come from dpkg-shlibdeps.
//! Built on Debian 12, it installs on Debian 12 and 13 (`cargo xtask bench deb`).

use crate::setup::{RUNTIME_PACKAGES, VHOST_DEVICE_VSOCK_VERSION, VM_PACKAGES};
use crate::{exec, root};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's revision of the package: the first packaging of each upstream version.
const REVISION: &str = "1";

/// Builds `target/deb/imgvm_VERSION-1_ARCH.deb` and returns its path.
pub fn build() -> Result<PathBuf> {
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let version = format!("{}-{REVISION}", env!("CARGO_PKG_VERSION"));
    let work = root().join("target/deb");
    // dpkg-shlibdeps finds the package's files in debian/PACKAGE, as in a source package.
    let stage = work.join("debian/imgvm");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let usr = stage.join("usr");
    crate::install_tree(&usr, "zsh/vendor-completions")?;

    let tools = work.join("tools");
    exec(
        crate::cargo()
            .args([
                "install",
                "--quiet",
                "--locked",
                "vhost-device-vsock",
                "--version",
                VHOST_DEVICE_VSOCK_VERSION,
                "--root",
            ])
            .arg(&tools),
    )?;
    std::fs::copy(
        tools.join("bin/vhost-device-vsock"),
        usr.join("lib/imgvm/vhost-device-vsock"),
    )?;

    // Debian ships binaries stripped of their symbols.
    exec(
        Command::new("strip")
            .arg("--strip-unneeded")
            .arg(usr.join("bin/imgvm"))
            .arg(usr.join("lib/imgvm/vhost-device-vsock")),
    )?;
    // Debian's manual pages are compressed, reproducibly (no name or time in the header).
    let man = usr.join("share/man/man1");
    for page in std::fs::read_dir(&man)? {
        exec(Command::new("gzip").args(["-9n"]).arg(page?.path()))?;
    }
    let doc = usr.join("share/doc/imgvm");
    std::fs::create_dir_all(&doc)?;
    std::fs::write(doc.join("copyright"), copyright())?;

    std::fs::create_dir_all(work.join("debian"))?;
    std::fs::write(
        work.join("debian/control"),
        "Source: imgvm\n\nPackage: imgvm\nArchitecture: any\n",
    )?;
    let libraries = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&work)
            .args(["-O", "-edebian/imgvm/usr/bin/imgvm"])
            .arg("-edebian/imgvm/usr/lib/imgvm/vhost-device-vsock"),
    )
    .context("dpkg-shlibdeps (from dpkg-dev; `cargo xtask setup` installs it)")?;
    let libraries = libraries
        .strip_prefix("shlibs:Depends=")
        .with_context(|| format!("dpkg-shlibdeps said {libraries:?}"))?;

    let native: Vec<&str> = VM_PACKAGES
        .iter()
        .filter(|(a, _)| *a == arch)
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    if native.is_empty() {
        bail!("imgvm has no VMs for {arch} machines");
    }
    let others: Vec<&str> = VM_PACKAGES
        .iter()
        .filter(|(a, _)| *a != arch)
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    let depends: Vec<&str> = std::iter::once(libraries)
        .chain(native)
        .chain(RUNTIME_PACKAGES.iter().copied())
        .collect();
    let control = format!(
        "Package: imgvm\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {size}\n\
         Depends: {depends}\n\
         Recommends: {recommends}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: {summary}\n \
         imgvm builds operating-system disk images (Debian cloud images first) from a\n \
         declarative recipe, without root on the host: a small helper VM, run by qemu\n \
         (KVM when usable, software emulation otherwise, and for foreign architectures),\n \
         does the steps that need root.\n",
        maintainer = maintainer()?,
        size = kib(&stage)?,
        depends = depends.join(", "),
        recommends = others.join(", "),
        summary = description()?,
    );
    std::fs::create_dir_all(stage.join("DEBIAN"))?;
    std::fs::write(stage.join("DEBIAN/control"), control)?;

    let deb = work.join(format!("imgvm_{version}_{arch}.deb"));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb)
            .stdout(std::process::Stdio::null()),
    )?;
    Ok(deb)
}

/// Who the package says maintains it: `DEBFULLNAME` and `DEBEMAIL`, as Debian's tools
/// read them, else git's user.
fn maintainer() -> Result<String> {
    let git = |key: &str| output(Command::new("git").current_dir(root()).args(["config", key])).ok();
    let name = std::env::var("DEBFULLNAME").ok().or_else(|| git("user.name"));
    let email = std::env::var("DEBEMAIL").ok().or_else(|| git("user.email"));
    match (name, email) {
        (Some(name), Some(email)) => Ok(format!("{name} <{email}>")),
        _ => bail!("who maintains the package? set DEBFULLNAME and DEBEMAIL (or git's user.name and user.email)"),
    }
}

/// The summary line: imgvm's own description (host/Cargo.toml), in Debian's style.
fn description() -> Result<String> {
    let manifest = std::fs::read_to_string(root().join("host/Cargo.toml"))?;
    let line = manifest
        .lines()
        .find_map(|l| l.strip_prefix("description = "))
        .context("host/Cargo.toml has no description")?;
    let text = line.trim_matches('"');
    let mut chars = text.chars();
    let first = chars.next().context("an empty description")?;
    Ok(first.to_lowercase().chain(chars).collect())
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: imgvm\n\n\
         Files: *\n\
         Copyright: the imgvm developers\n\
         License: {}\n \
         On Debian systems the Apache License 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0; the MIT license is at\n \
         https://opensource.org/license/mit.\n",
        env!("CARGO_PKG_LICENSE").replace(" OR ", " or ")
    )
}

/// The size of the tree under `dir` in KiB, as `Installed-Size` counts it.
fn kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        total += if kind.is_dir() {
            kib(&entry.path())?
        } else {
            entry.metadata()?.len().div_ceil(1024)
        };
    }
    Ok(total)
}

/// A command's standard output, trimmed; an error when it fails.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
