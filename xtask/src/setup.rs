//! Installs everything imgvm and its tests need, on Debian or Ubuntu. Idempotent: what
//! is already there is skipped, so `cargo xtask test` can always start with it.

use crate::{exec, ARCHES};
use anyhow::{bail, Result};
use std::process::Command;

/// What imgvm runs for each architecture's VMs: its qemu, and the firmware its boot
/// tests boot on (SLOF comes with qemu). The Debian package depends on its own
/// architecture's and recommends the others.
pub const VM_PACKAGES: [(&str, &[&str]); 3] = [
    ("amd64", &["qemu-system-x86", "seabios", "ovmf"]),
    ("arm64", &["qemu-system-arm", "qemu-efi-aarch64"]),
    ("ppc64el", &["qemu-system-ppc"]),
];

/// What imgvm runs on every machine: qemu-img, and gpgv for archive signatures.
pub const RUNTIME_PACKAGES: &[&str] = &["qemu-utils", "gpgv"];

/// What only imgvm's tests and benchmarks need: host-side disk tools the tests inspect
/// images with, the linker for the ppc64le agent, dpkg-dev for the Debian package's
/// library dependencies, and mmdebstrap for the native bootstrap benchmarks compare with
/// and the clean systems the Debian package is installed on.
const DEVELOPMENT_PACKAGES: &[&str] = &[
    "fdisk",
    "e2fsprogs",
    "dosfstools",
    "util-linux",
    "gcc-powerpc64le-linux-gnu",
    "libc6-dev-ppc64el-cross",
    "dpkg-dev",
    "mmdebstrap",
];

/// The user-space vsock device imgvm talks to its helper VM through (where the kernel's
/// vhost-vsock is not usable): the version the agent's transfer limits were measured
/// against, installed by `setup` and shipped in the Debian package.
pub const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";

/// Where the tests' unprivileged user lives when the suite runs as root.
pub const TEST_USER: &str = "imgvm-test";

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_targets()?;
    vhost_device_vsock()?;
    test_user()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn sudo(args: &[&str]) -> Command {
    let mut cmd = if is_root() {
        Command::new(args[0])
    } else {
        let mut c = Command::new("sudo");
        c.arg(args[0]);
        c
    };
    cmd.args(&args[1..]).env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .flat_map(|(_, packages)| packages.iter())
        .chain(RUNTIME_PACKAGES)
        .chain(DEVELOPMENT_PACKAGES)
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "not a Debian/Ubuntu machine: install the equivalents of {} yourself",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    exec(&mut sudo(&["apt-get", "update", "-q"]))?;
    let mut install = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    // A qemu-utils from bookworm-backports (as on some images) conflicts with bookworm's
    // qemu-system; take qemu-system from backports as well then.
    let version = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "qemu-utils"])
        .output();
    let backports = version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("~bpo12"));
    if backports {
        let list = "/etc/apt/sources.list.d/imgvm-bookworm-backports.list";
        if !std::path::Path::new(list).exists() {
            exec(&mut sudo(&[
                "sh",
                "-c",
                &format!("echo 'deb http://deb.debian.org/debian bookworm-backports main' > {list}"),
            ]))?;
            exec(&mut sudo(&["apt-get", "update", "-q"]))?;
        }
        install.extend(["-t", "bookworm-backports"]);
    }
    install.extend(missing);
    exec(&mut sudo(&install))
}

fn rust_targets() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    let have = String::from_utf8_lossy(&out.stdout).into_owned();
    let missing: Vec<&str> = ARCHES
        .iter()
        .map(|(_, t)| *t)
        .filter(|t| !have.lines().any(|l| l == *t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    exec(Command::new("rustup").args(["target", "add"]).args(missing))
}

/// The user-space vsock device. As root it goes to /usr/local/bin so that the tests'
/// unprivileged user finds it too.
fn vhost_device_vsock() -> Result<()> {
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| std::path::Path::new(d).join("vhost-device-vsock").is_file());
    if on_path || std::path::Path::new("/usr/local/bin/vhost-device-vsock").is_file() {
        return Ok(());
    }
    let mut cmd = crate::cargo();
    cmd.args([
        "install",
        "--locked",
        "vhost-device-vsock",
        "--version",
        VHOST_DEVICE_VSOCK_VERSION,
    ]);
    if is_root() {
        cmd.args(["--root", "/usr/local"]);
    }
    exec(&mut cmd)
}

/// When the suite runs as root (as CI does), the end-to-end tests run imgvm as this
/// user, because imgvm promises to need no root.
fn test_user() -> Result<()> {
    if !is_root()
        || Command::new("id")
            .arg(TEST_USER)
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    exec(Command::new("useradd").args([
        "--system",
        "--create-home",
        "--home-dir",
        "/var/lib/imgvm-test",
        "--shell",
        "/usr/sbin/nologin",
        TEST_USER,
    ]))
}
