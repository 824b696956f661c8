//! Debian itself: bootstrapping the tree, apt, and making the tree ready for chroot work
//! and, at the end, fresh for its first boot.

use super::{chroot, empty_dir, remove, remove_full, run, target, write};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{
    Apt, AptSources, Bootstrap, Clean, Debconf, DebconfAnswer, EnterChroot, ErrorKind, Handle, ListPackages,
    OperationError, Package, TARGET,
};

/// The guest end of the package proxy (see proxy.rs).
const PROXY: &str = "http://127.0.0.1:3142";

/// apt options for every apt call in the image during the build: the proxy, only the
/// recipe's mirror (the image's own sources may point where the proxy does not go), no
/// prompts, no fsync (the disk is written with cache=unsafe and flushed once at the end).
const APT_CONF: &str = "/etc/apt/apt.conf.d/00imgvm-build";
/// Where mmdebstrap leaves the bootstrap's `--aptopt`s, among them the build's proxy,
/// which the finished image must not keep.
const MMDEBSTRAP_APT_CONF: &str = "/etc/apt/apt.conf.d/99mmdebstrap";
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

impl Handle<Bootstrap> for Job<'_> {
    fn handle(&self, op: Bootstrap) -> Result<(), OperationError> {
        let job = self;
        let b = &op;
        let keyring = "/run/imgvm-keyring.gpg";
        std::fs::write(keyring, &b.keyring.0).map_err(|e| job.io_error(&e))?;
        for file in &b.files {
            write(job, &file.path, &file.content.0, file.mode)?;
        }
        let mut argv = vec![
            "mmdebstrap".to_owned(),
            "--mode=root".into(),
            format!("--variant={}", b.variant),
            format!("--arch={}", b.arch),
            format!("--components={}", b.components.join(",")),
            format!("--aptopt=Acquire::http::Proxy \"{PROXY}\""),
            // The host's proxy already retries what the mirror fails to deliver: apt's
            // own retries would only ask it again, and again, for what it gave up on.
            "--aptopt=Acquire::Retries \"0\"".into(),
            "--aptopt=APT::Install-Recommends \"false\"".into(),
            "--dpkgopt=force-unsafe-io".into(),
            // The lists are needed by the apt steps that follow; finalize removes them.
            "--skip=cleanup/apt/lists".into(),
            format!("--keyring={keyring}"),
        ];
        if !b.files.is_empty() {
            // The tree holds those files already; mmdebstrap otherwise wants it empty.
            argv.push("--skip=check/empty".into());
        }
        if !b.include.is_empty() {
            argv.push(format!("--include={}", b.include.join(",")));
        }
        argv.extend([b.suite.clone(), TARGET.to_owned(), b.mirror.clone()]);
        run(job, &Program::new(&argv))?;
        // mmdebstrap copies the helper's name; an image is nobody in particular until a
        // hostname step or cloud-init names it.
        write(job, "/etc/hostname", b"localhost\n", 0o644)
    }
}

impl Handle<EnterChroot> for Job<'_> {
    fn handle(&self, op: EnterChroot) -> Result<(), OperationError> {
        let job = self;
        let EnterChroot { source } = &op;
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
            "Acquire::http::Proxy \"{PROXY}\";\nAcquire::Retries \"0\";\nDir::Etc::SourceList \"{BUILD_SOURCES}\";\n\
         Dir::Etc::SourceParts \"/nonexistent\";\n\
         DPkg::Options {{ \"--force-unsafe-io\"; \"--force-confdef\"; \"--force-confold\"; }};\n"
        );
        write(job, APT_CONF, conf.as_bytes(), 0o644)
    }
}

impl Handle<Apt> for Job<'_> {
    fn handle(&self, op: Apt) -> Result<(), OperationError> {
        let job = self;
        let apt = &op;
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
}

impl Handle<AptSources> for Job<'_> {
    fn handle(&self, op: AptSources) -> Result<(), OperationError> {
        let (file, text) = sources_file(&op);
        write(self, &format!("/etc/apt/sources.list.d/{file}"), text.as_bytes(), 0o644)?;
        // One place for the sources: the old file only points to the new one.
        let pointer = format!("# See /etc/apt/sources.list.d/{file}\n");
        write(self, "/etc/apt/sources.list", pointer.as_bytes(), 0o644)
    }
}

/// The file name in sources.list.d and its content.
fn sources_file(sources: &AptSources) -> (String, String) {
    if sources.deb822 {
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
    }
}

/// Debian's cloud images remove these so that every instance starts fresh.
impl Handle<Clean> for Job<'_> {
    fn handle(&self, _: Clean) -> Result<(), OperationError> {
        let job = self;
        for path in [
            POLICY_RC,
            APT_CONF,
            MMDEBSTRAP_APT_CONF,
            BUILD_SOURCES,
            "/var/lib/dbus/machine-id",
            "/etc/mailname",
        ] {
            remove(job, path)?;
        }
        // Logs hold the build's times; ldconfig's aux cache the build's inode numbers
        // and ctimes. Neither belongs in an image that is to be the same every time.
        for log in [
            "/var/log/apt",
            "/var/log/dpkg.log",
            "/var/log/alternatives.log",
            "/var/log/bootstrap.log",
            "/var/cache/ldconfig/aux-cache",
        ] {
            remove(job, log)?;
        }
        // Python's compiled modules, written by py3compile while packages installed:
        // not Debian's files (dpkg does not list them), and not byte-for-byte the same
        // from one compilation to the next. Python writes them again when it first
        // imports a module.
        remove_named(job, &target(job, "/usr")?, "__pycache__")?;
        // What `apt-get clean` removes and the directories it leaves, as Debian's images
        // have it; without apt, so that images bootstrapped without it finish too.
        for dir in ["/var/cache/apt", "/var/lib/apt/lists", "/tmp", "/var/tmp"] {
            empty_dir(job, dir)?;
        }
        let keys = match std::fs::read_dir(target(job, "/etc/ssh")?) {
            Ok(entries) => entries.flatten().collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(job.io_error(&e)),
        };
        let mut removed_keys = false;
        for entry in keys {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_") {
                remove(job, &format!("/etc/ssh/{name}"))?;
                removed_keys = true;
            }
        }
        // cloud-init makes an instance's host keys; without it, nothing would, and sshd
        // would not start.
        if removed_keys && exists(job, "/usr/sbin/sshd")? && !exists(job, "/usr/bin/cloud-init")? {
            regenerate_host_keys(job)?;
        }
        // An empty machine-id (not a missing one) makes systemd generate one at first boot.
        write(job, "/etc/machine-id", b"", 0o444)?;
        write(job, "/var/lib/dpkg/available", b"", 0o644)?;
        for (dir, _) in PSEUDO.iter().rev() {
            run(job, &Program::new(&["umount", &target(job, dir)?]))?;
        }
        // Below the pseudo filesystems, what the bootstrap left (device nodes, /run/lock):
        // a booted system mounts its own there.
        for dir in ["/dev", "/proc", "/run", "/sys"] {
            empty_dir(job, dir)?;
        }
        Ok(())
    }
}

/// The unit that makes the host keys of an image without cloud-init at its first boot:
/// after the root filesystem is writable, before sshd (or its socket) can start.
const HOST_KEYS_UNIT: &str = "/etc/systemd/system/regenerate-ssh-host-keys.service";
const HOST_KEYS_SERVICE: &str = "[Unit]
Description=Generate the SSH host keys this machine does not have yet
DefaultDependencies=no
After=local-fs.target
Before=ssh.service ssh.socket shutdown.target
Conflicts=shutdown.target
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

/// Installs and enables [`HOST_KEYS_SERVICE`] (as `systemctl enable` would: a link in
/// the wants directory of its target).
fn regenerate_host_keys(job: &Job) -> Result<(), OperationError> {
    const LINK: &str = "/etc/systemd/system/multi-user.target.wants/regenerate-ssh-host-keys.service";
    write(job, HOST_KEYS_UNIT, HOST_KEYS_SERVICE.as_bytes(), 0o644)?;
    remove(job, LINK)?;
    let link = target(job, LINK)?;
    let io = |e: std::io::Error| job.io_error(&e);
    std::fs::create_dir_all(std::path::Path::new(&link).parent().expect("LINK has a parent")).map_err(io)?;
    std::os::unix::fs::symlink(HOST_KEYS_UNIT, &link).map_err(io)
}

/// Whether `path` in the image exists (a dangling symlink counts: it is there).
fn exists(job: &Job, path: &str) -> Result<bool, OperationError> {
    match std::fs::symlink_metadata(target(job, path)?) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(job.io_error(&e)),
    }
}

/// Removes every directory called `name` below `dir` (symlinks are not followed).
fn remove_named(job: &Job, dir: &str, name: &str) -> Result<(), OperationError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(job.io_error(&e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| job.io_error(&e))?;
        if !entry.file_type().map_err(|e| job.io_error(&e))?.is_dir() {
            continue;
        }
        let path = entry.path();
        if entry.file_name() == name {
            remove_full(job, &path)?;
        } else {
            remove_named(job, &path.to_string_lossy(), name)?;
        }
    }
    Ok(())
}

impl Handle<ListPackages> for Job<'_> {
    fn handle(&self, _: ListPackages) -> Result<Vec<Package>, OperationError> {
        let job = self;
        let query = chroot(&[
            "dpkg-query",
            "-W",
            "-f",
            "${Package}\\t${Version}\\t${Architecture}\\t${Multi-Arch}\\n",
        ]);
        let out = command::run(job, &query, Input::Null, true)?;
        let text =
            String::from_utf8(out).map_err(|_| job.error(ErrorKind::Io, "dpkg-query printed non-UTF-8".into()))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some(Package {
                    name: f.next()?.into(),
                    version: f.next()?.into(),
                    architecture: f.next()?.into(),
                    multi_arch: f.next()?.into(),
                })
            })
            .collect())
    }
}

impl Handle<Debconf> for Job<'_> {
    /// Before the apt steps that read the answers; debconf keeps them in its database.
    fn handle(&self, Debconf(answers): Debconf) -> Result<(), OperationError> {
        let program = chroot(&["debconf-set-selections"]);
        command::run(self, &program, Input::Bytes(selections(&answers)), false).map(drop)
    }
}

/// debconf-set-selections' input: one answer per line.
fn selections(answers: &[DebconfAnswer]) -> Vec<u8> {
    answers
        .iter()
        .flat_map(|a| [a.as_str(), "\n"])
        .collect::<String>()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::with_test_job;
    use imgvm_protocol::SourceEntry;

    fn entry(suites: &[&str], signed_by: Option<&str>) -> SourceEntry {
        SourceEntry {
            types: vec!["deb".into()],
            uris: vec!["https://deb.debian.org/debian".into()],
            suites: suites.iter().map(|s| s.to_string()).collect(),
            components: vec!["main".into(), "contrib".into()],
            signed_by: signed_by.map(Into::into),
        }
    }

    #[test]
    fn sources_are_written_deb822_and_sources_list_points_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let sources = AptSources {
            name: "debian".into(),
            deb822: true,
            entries: vec![entry(&["trixie", "trixie-updates"], Some("/usr/share/keyrings/k.gpg"))],
        };
        with_test_job(dir.path(), |job| job.handle(sources)).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/apt/sources.list.d/debian.sources")).unwrap(),
            "Types: deb\nURIs: https://deb.debian.org/debian\nSuites: trixie trixie-updates\n\
             Components: main contrib\nSigned-By: /usr/share/keyrings/k.gpg\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/apt/sources.list")).unwrap(),
            "# See /etc/apt/sources.list.d/debian.sources\n"
        );
    }

    #[test]
    fn one_line_sources_have_a_line_per_suite() {
        let sources = AptSources {
            name: "debian".into(),
            deb822: false,
            entries: vec![entry(&["trixie", "trixie-updates"], None)],
        };
        let (file, text) = sources_file(&sources);
        assert_eq!(file, "debian.list");
        assert_eq!(
            text,
            "deb https://deb.debian.org/debian trixie main contrib\n\
             deb https://deb.debian.org/debian trixie-updates main contrib\n"
        );
    }

    #[test]
    fn compiled_python_goes_and_the_sources_stay() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("usr/lib/python3/dist-packages/netplan");
        std::fs::create_dir_all(pkg.join("__pycache__")).unwrap();
        std::fs::write(pkg.join("__pycache__/cli.cpython-313.pyc"), b"x").unwrap();
        std::fs::write(pkg.join("cli.py"), b"x").unwrap();
        with_test_job(dir.path(), |job| {
            remove_named(job, &dir.path().join("usr").to_string_lossy(), "__pycache__")
        })
        .unwrap();
        assert!(!pkg.join("__pycache__").exists());
        assert!(pkg.join("cli.py").exists());
    }

    #[test]
    fn debconf_answers_are_one_per_line() {
        let answers = [
            DebconfAnswer::new("locales locales/default_environment_locale select C.UTF-8").unwrap(),
            DebconfAnswer::new("  grub-efi-amd64 grub2/force_efi_extra_removable boolean true ").unwrap(),
        ];
        assert_eq!(
            String::from_utf8(selections(&answers)).unwrap(),
            "locales locales/default_environment_locale select C.UTF-8\n\
             grub-efi-amd64 grub2/force_efi_extra_removable boolean true\n"
        );
    }
}
