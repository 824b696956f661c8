//! The system's identity and configuration: users, hostname, locale, timezone, services,
//! fstab.

use super::{chroot, run, target, write};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{
    ErrorKind, Fstab, FstabEntry, FstabKey, Handle, Hostname, Locale, OperationError, Services, Timezone, Users,
};

impl Handle<Users> for Job<'_> {
    fn handle(&self, op: Users) -> Result<(), OperationError> {
        let job = self;
        let Users(users) = &op;
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
}

impl Handle<Hostname> for Job<'_> {
    fn handle(&self, op: Hostname) -> Result<(), OperationError> {
        let job = self;
        let Hostname(name) = &op;
        write(job, "/etc/hostname", format!("{name}\n").as_bytes(), 0o644)?;
        let hosts = std::fs::read_to_string(target(job, "/etc/hosts")?).unwrap_or_default();
        write(job, "/etc/hosts", hosts_with(&hosts, name).as_bytes(), 0o644)
    }
}

/// `/etc/hosts` with the machine's own name on 127.0.1.1, as Debian's installer writes
/// it; an earlier name there is replaced.
fn hosts_with(hosts: &str, name: &str) -> String {
    let own = format!("127.0.1.1\t{name}");
    let mut lines: Vec<&str> = hosts.lines().filter(|l| !l.starts_with("127.0.1.1")).collect();
    let after_localhost = lines
        .iter()
        .position(|l| l.starts_with("127.0.0.1"))
        .map_or(0, |i| i + 1);
    lines.insert(after_localhost, &own);
    lines.join("\n") + "\n"
}

/// Sets the default locale, generating it first unless it is built in (C, C.UTF-8).
impl Handle<Locale> for Job<'_> {
    fn handle(&self, op: Locale) -> Result<(), OperationError> {
        let job = self;
        let Locale(lang) = &op;
        let lang = lang.as_str();
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
}

impl Handle<Timezone> for Job<'_> {
    fn handle(&self, op: Timezone) -> Result<(), OperationError> {
        let job = self;
        let Timezone(zone) = &op;
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
}

impl Handle<Services> for Job<'_> {
    fn handle(&self, op: Services) -> Result<(), OperationError> {
        let job = self;
        let services = &op;
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
}

impl Handle<Fstab> for Job<'_> {
    fn handle(&self, op: Fstab) -> Result<(), OperationError> {
        let job = self;
        let Fstab(entries) = &op;
        let text = fstab_text(entries, |device, key| {
            let blkid = Program::new(&["blkid", "-s", key, "-o", "value", device]);
            let value = command::run(job, &blkid, Input::Null, true)?;
            let value = String::from_utf8_lossy(&value).trim().to_owned();
            if value.is_empty() {
                return Err(job.error(ErrorKind::InvalidRequest, format!("{device} has no {key}")));
            }
            Ok(value)
        })?;
        write(job, "/etc/fstab", text.as_bytes(), 0o644)
    }
}

/// The fstab for `entries`, with each device's key looked up by `key_of(device, tag)`.
fn fstab_text(
    entries: &[FstabEntry],
    mut key_of: impl FnMut(&str, &str) -> Result<String, OperationError>,
) -> Result<String, OperationError> {
    let mut text = String::from("# /etc/fstab: static file system information (written by imgvm).\n");
    for e in entries {
        let key = match e.key {
            FstabKey::Uuid => "UUID",
            FstabKey::Partuuid => "PARTUUID",
            FstabKey::Label => "LABEL",
        };
        let value = key_of(&e.device, key)?;
        let fs = e.filesystem.name();
        text.push_str(&format!("{key}={value} {} {fs} {} 0 {}\n", e.mount, e.options, e.pass));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::with_test_job;
    use imgvm_protocol::Filesystem;

    #[test]
    fn hostname_writes_hostname_and_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n127.0.1.1\told\n::1\tlocalhost\n",
        )
        .unwrap();
        with_test_job(root, |job| job.handle(Hostname("web".into()))).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "web\n");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1\tlocalhost\n127.0.1.1\tweb\n::1\tlocalhost\n"
        );
    }

    #[test]
    fn builtin_locale_is_set_without_generating() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        with_test_job(root, |job| job.handle(Locale("C.UTF-8".into()))).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/default/locale")).unwrap(),
            "LANG=C.UTF-8\n"
        );
        // Any other locale needs locale-gen from the image's locales package.
        let err = with_test_job(root, |job| job.handle(Locale("de_DE.UTF-8".into()))).unwrap_err();
        assert!(err.message.contains("needs the locales package"), "{}", err.message);
    }

    #[test]
    fn timezone_links_localtime_to_the_zone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/share/zoneinfo/Europe")).unwrap();
        std::fs::write(root.join("usr/share/zoneinfo/Europe/Berlin"), "TZif").unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        with_test_job(root, |job| job.handle(Timezone("Europe/Berlin".into()))).unwrap();
        let link = std::fs::read_link(root.join("etc/localtime")).unwrap();
        assert_eq!(link, std::path::Path::new("/usr/share/zoneinfo/Europe/Berlin"));
        assert_eq!(
            std::fs::read_to_string(root.join("etc/timezone")).unwrap(),
            "Europe/Berlin\n"
        );
        let err = with_test_job(root, |job| job.handle(Timezone("Mars/Olympus".into()))).unwrap_err();
        assert!(
            err.message.starts_with("unknown timezone Mars/Olympus"),
            "{}",
            err.message
        );
    }

    #[test]
    fn fstab_names_each_filesystem_by_its_key() {
        let entry = |device: &str, key, mount: &str, filesystem, pass| FstabEntry {
            device: device.into(),
            key,
            mount: mount.into(),
            filesystem,
            options: "defaults".into(),
            pass,
        };
        let entries = [
            entry("/dev/vda1", FstabKey::Partuuid, "/", Filesystem::Ext4, 1),
            entry("/dev/vda15", FstabKey::Uuid, "/boot/efi", Filesystem::Vfat, 2),
            entry("/dev/vda2", FstabKey::Label, "none", Filesystem::Swap, 0),
        ];
        let text = fstab_text(&entries, |device, key| Ok(format!("{key}-of-{}", &device[5..]))).unwrap();
        assert_eq!(
            text.lines().skip(1).collect::<Vec<_>>(),
            [
                "PARTUUID=PARTUUID-of-vda1 / ext4 defaults 0 1",
                "UUID=UUID-of-vda15 /boot/efi vfat defaults 0 2",
                "LABEL=LABEL-of-vda2 none swap defaults 0 0",
            ]
        );
    }
}
