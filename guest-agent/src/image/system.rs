//! The system's identity and configuration: users, hostname, locale, timezone, services,
//! fstab.

use super::{chroot, run, target, write};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{ErrorKind, FstabEntry, FstabKey, OperationError, Services, User};

pub fn users(job: &Job, users: &[User]) -> Result<(), OperationError> {
    for user in users {
        let name = user.name.as_str();
        let mut useradd = vec!["useradd", "--create-home", "--shell", &user.shell];
        let groups = user.groups.join(",");
        if !groups.is_empty() {
            useradd.extend(["--groups", &groups]);
        }
        useradd.push(name);
        run(job, &chroot(&useradd))?;
        // Locked: cloud images are entered with ssh keys, never a password.
        run(job, &chroot(&["passwd", "--lock", name]))?;
        if !user.ssh_keys.is_empty() {
            let ssh = format!("/home/{name}/.ssh");
            let keys = user.ssh_keys.join("\n") + "\n";
            write(job, &format!("{ssh}/authorized_keys"), keys.as_bytes(), 0o600)?;
            std::fs::set_permissions(target(job, &ssh)?, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| job.io_error(&e))?;
            run(job, &chroot(&["chown", "-R", &format!("{name}:"), &ssh]))?;
        }
        if user.sudo {
            let rule = format!("{name} ALL=(ALL) NOPASSWD:ALL\n");
            write(job, &format!("/etc/sudoers.d/90-imgvm-{name}"), rule.as_bytes(), 0o440)?;
        }
    }
    Ok(())
}

pub fn hostname(job: &Job, name: &str) -> Result<(), OperationError> {
    write(job, "/etc/hostname", format!("{name}\n").as_bytes(), 0o644)?;
    let hosts_path = target(job, "/etc/hosts")?;
    let mut hosts = std::fs::read_to_string(&hosts_path).unwrap_or_default();
    if !hosts.lines().any(|l| l.starts_with("127.0.1.1")) {
        hosts.push_str(&format!("127.0.1.1\t{name}\n"));
    }
    write(job, "/etc/hosts", hosts.as_bytes(), 0o644)
}

/// Sets the default locale, generating it first unless it is built in (C, C.UTF-8).
pub fn locale(job: &Job, lang: &str) -> Result<(), OperationError> {
    if !matches!(lang, "C" | "C.UTF-8" | "C.utf8" | "POSIX") {
        if !std::path::Path::new(&target(job, "/usr/sbin/locale-gen")?).exists() {
            return Err(job.error(
                ErrorKind::InvalidRequest,
                format!("locale {lang} has to be generated, which needs the locales package in the image"),
            ));
        }
        let charset = lang.split_once('.').map_or("ISO-8859-1", |(_, c)| c);
        let gen_path = target(job, "/etc/locale.gen")?;
        let mut list = std::fs::read_to_string(&gen_path).unwrap_or_default();
        list.push_str(&format!("{lang} {charset}\n"));
        write(job, "/etc/locale.gen", list.as_bytes(), 0o644)?;
        run(job, &chroot(&["locale-gen"]))?;
    }
    write(job, "/etc/default/locale", format!("LANG={lang}\n").as_bytes(), 0o644)
}

pub fn timezone(job: &Job, zone: &str) -> Result<(), OperationError> {
    let zoneinfo = format!("/usr/share/zoneinfo/{zone}");
    if !std::path::Path::new(&target(job, &zoneinfo)?).is_file() {
        return Err(job.error(
            ErrorKind::InvalidRequest,
            format!("unknown timezone {zone}: the image has no {zoneinfo} (is tzdata installed?)"),
        ));
    }
    let localtime = target(job, "/etc/localtime")?;
    let _ = std::fs::remove_file(&localtime);
    std::os::unix::fs::symlink(&zoneinfo, &localtime).map_err(|e| job.io_error(&e))?;
    write(job, "/etc/timezone", format!("{zone}\n").as_bytes(), 0o644)
}

pub fn services(job: &Job, services: &Services) -> Result<(), OperationError> {
    for (verb, units) in [
        ("enable", &services.enable),
        ("disable", &services.disable),
        ("mask", &services.mask),
    ] {
        for unit in units {
            run(job, &chroot(&["systemctl", verb, "--quiet", unit]))?;
        }
    }
    Ok(())
}

pub fn fstab(job: &Job, entries: &[FstabEntry]) -> Result<(), OperationError> {
    let mut text = String::from("# /etc/fstab: static file system information (written by imgvm).\n");
    for e in entries {
        let key = match e.key {
            FstabKey::Uuid => "UUID",
            FstabKey::Partuuid => "PARTUUID",
            FstabKey::Label => "LABEL",
        };
        let blkid = Program::new(&["blkid", "-s", key, "-o", "value", &e.device]);
        let value = command::run(job, &blkid, Input::Null, true)?;
        let value = String::from_utf8_lossy(&value).trim().to_owned();
        if value.is_empty() {
            return Err(job.error(ErrorKind::InvalidRequest, format!("{} has no {key}", e.device)));
        }
        let fs = format!("{:?}", e.filesystem).to_lowercase();
        text.push_str(&format!("{key}={value} {} {fs} {} 0 {}\n", e.mount, e.options, e.pass));
    }
    write(job, "/etc/fstab", text.as_bytes(), 0o644)
}
