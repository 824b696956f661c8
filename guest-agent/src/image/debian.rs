//! Debian itself: bootstrapping the tree, apt, and making the tree ready for chroot work
//! and, at the end, fresh for its first boot.

use super::{chroot, empty_dir, remove, run, target, write};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{Apt, AptSource, AptSources, Bootstrap, ErrorKind, OperationError, Package, TARGET};

/// The guest end of the package proxy (see proxy.rs).
const PROXY: &str = "http://127.0.0.1:3142";

/// apt options for every apt call in the image during the build: the proxy, only the
/// recipe's mirror (the image's own sources may point where the proxy does not go), no
/// prompts, no fsync (the disk is written with cache=unsafe and flushed once at the end).
const APT_CONF: &str = "/etc/apt/apt.conf.d/00imgvm-build";
const BUILD_SOURCES: &str = "/etc/apt/imgvm-build.list";
const POLICY_RC: &str = "/usr/sbin/policy-rc.d";

/// Pseudo filesystems for the chroot, in mount order.
const PSEUDO: [(&str, &[&str]); 5] = [
    ("/proc", &["-t", "proc", "proc"]),
    ("/sys", &["-t", "sysfs", "sysfs"]),
    ("/dev", &["--bind", "/dev"]),
    ("/dev/pts", &["--bind", "/dev/pts"]),
    ("/run", &["-t", "tmpfs", "tmpfs"]),
];

pub fn bootstrap(job: &Job, b: &Bootstrap) -> Result<(), OperationError> {
    let keyring = "/run/imgvm-keyring.gpg";
    std::fs::write(keyring, &b.keyring).map_err(|e| job.io_error(&e))?;
    let mut argv = vec![
        "mmdebstrap".to_owned(),
        "--mode=root".into(),
        format!("--variant={}", b.variant),
        format!("--arch={}", b.arch),
        format!("--components={}", b.components.join(",")),
        format!("--aptopt=Acquire::http::Proxy \"{PROXY}\""),
        "--aptopt=APT::Install-Recommends \"false\"".into(),
        "--dpkgopt=force-unsafe-io".into(),
        // The lists are needed by the apt steps that follow; finalize removes them.
        "--skip=cleanup/apt/lists".into(),
        format!("--keyring={keyring}"),
    ];
    if !b.include.is_empty() {
        argv.push(format!("--include={}", b.include.join(",")));
    }
    argv.extend([b.suite.clone(), TARGET.to_owned(), b.mirror.clone()]);
    run(job, &Program::new(&argv))?;
    // mmdebstrap copies the helper's name; an image is nobody in particular until a
    // hostname step or cloud-init names it.
    write(job, "/etc/hostname", b"localhost\n", 0o644)
}

pub fn enter_chroot(job: &Job, source: &AptSource) -> Result<(), OperationError> {
    for (dir, args) in PSEUDO {
        let mut argv = vec!["mount"];
        argv.extend(args);
        let point = target(job, dir)?;
        std::fs::create_dir_all(&point).map_err(|e| job.io_error(&e))?;
        argv.push(&point);
        run(job, &Program::new(&argv))?;
    }
    // Packages must not start services in the helper.
    write(job, POLICY_RC, b"#!/bin/sh\nexit 101\n", 0o755)?;
    let line = format!(
        "deb {} {} {}\n",
        source.mirror,
        source.suite,
        source.components.join(" ")
    );
    write(job, BUILD_SOURCES, line.as_bytes(), 0o644)?;
    let conf = format!(
        "Acquire::http::Proxy \"{PROXY}\";\nDir::Etc::SourceList \"{BUILD_SOURCES}\";\n\
         Dir::Etc::SourceParts \"/nonexistent\";\n\
         DPkg::Options {{ \"--force-unsafe-io\"; \"--force-confdef\"; \"--force-confold\"; }};\n"
    );
    write(job, APT_CONF, conf.as_bytes(), 0o644)
}

pub fn apt(job: &Job, apt: &Apt) -> Result<(), OperationError> {
    run(job, &chroot(&["apt-get", "update", "-q"]))?;
    if apt.upgrade {
        run(job, &chroot(&["apt-get", "-y", "-q", "dist-upgrade"]))?;
    }
    for (verb, list) in [
        ("install", &apt.install),
        ("remove", &apt.remove),
        ("purge", &apt.purge),
    ] {
        if list.is_empty() {
            continue;
        }
        let mut argv = vec!["apt-get", "-y", "-q"];
        if !apt.recommends {
            argv.push("--no-install-recommends");
        }
        argv.push(verb);
        argv.extend(list.iter().map(String::as_str));
        run(job, &chroot(&argv))?;
    }
    Ok(())
}

pub fn apt_sources(job: &Job, sources: &AptSources) -> Result<(), OperationError> {
    let (file, text) = if sources.deb822 {
        let stanzas: Vec<String> = sources
            .entries
            .iter()
            .map(|e| {
                let mut s = format!(
                    "Types: {}\nURIs: {}\nSuites: {}\nComponents: {}\n",
                    e.types.join(" "),
                    e.uris.join(" "),
                    e.suites.join(" "),
                    e.components.join(" ")
                );
                if let Some(key) = &e.signed_by {
                    s.push_str(&format!("Signed-By: {key}\n"));
                }
                s
            })
            .collect();
        (format!("{}.sources", sources.name), stanzas.join("\n"))
    } else {
        let mut text = String::new();
        for e in &sources.entries {
            let opts = e
                .signed_by
                .as_ref()
                .map_or(String::new(), |k| format!("[signed-by={k}] "));
            for t in &e.types {
                for uri in &e.uris {
                    for suite in &e.suites {
                        text.push_str(&format!("{t} {opts}{uri} {suite} {}\n", e.components.join(" ")));
                    }
                }
            }
        }
        (format!("{}.list", sources.name), text)
    };
    write(job, &format!("/etc/apt/sources.list.d/{file}"), text.as_bytes(), 0o644)?;
    // One place for the sources: the old file only points to the new one.
    let pointer = format!("# See /etc/apt/sources.list.d/{file}\n");
    write(job, "/etc/apt/sources.list", pointer.as_bytes(), 0o644)
}

/// Debian's cloud images remove these so that every instance starts fresh.
pub fn clean(job: &Job) -> Result<(), OperationError> {
    run(job, &chroot(&["apt-get", "clean"]))?;
    for path in [
        POLICY_RC,
        APT_CONF,
        BUILD_SOURCES,
        "/var/lib/dbus/machine-id",
        "/etc/mailname",
    ] {
        remove(job, path)?;
    }
    for log in [
        "/var/log/apt",
        "/var/log/dpkg.log",
        "/var/log/alternatives.log",
        "/var/log/bootstrap.log",
    ] {
        remove(job, log)?;
    }
    for dir in ["/var/lib/apt/lists", "/tmp", "/var/tmp"] {
        empty_dir(job, dir)?;
    }
    for (dir, prefix) in [("/var/cache/apt", ""), ("/etc/ssh", "ssh_host_")] {
        let entries = match std::fs::read_dir(target(job, dir)?) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(job.io_error(&e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let caches = prefix.is_empty() && name.ends_with(".bin");
            if caches || (!prefix.is_empty() && name.starts_with(prefix)) {
                remove(job, &format!("{dir}/{name}"))?;
            }
        }
    }
    // An empty machine-id (not a missing one) makes systemd generate one at first boot.
    write(job, "/etc/machine-id", b"", 0o444)?;
    write(job, "/var/lib/dpkg/available", b"", 0o644)?;
    for (dir, _) in PSEUDO.iter().rev() {
        run(job, &Program::new(&["umount", &target(job, dir)?]))?;
    }
    Ok(())
}

pub fn list_packages(job: &Job) -> Result<Vec<Package>, OperationError> {
    let query = chroot(&["dpkg-query", "-W", "-f", "${Package}\\t${Version}\\t${Architecture}\\n"]);
    let out = command::run(job, &query, Input::Null, true)?;
    let text = String::from_utf8(out).map_err(|_| job.error(ErrorKind::Io, "dpkg-query printed non-UTF-8".into()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Package {
                name: f.next()?.into(),
                version: f.next()?.into(),
                architecture: f.next()?.into(),
            })
        })
        .collect())
}
