//! Each recipe step as the actions the helper VM runs: shell scripts (run as root in the
//! helper, the image mounted at /target) and uploads.

use super::layout::{device, numbered, sfdisk_script};
use crate::arch::Arch;
use crate::recipe::*;
use std::path::PathBuf;

/// Where the image is mounted in the helper VM.
pub const TARGET: &str = "/target";

/// The apt options every apt call in the image gets during the build: the guest's
/// package proxy, the recipe's mirror only (the image's own sources may point where the
/// proxy does not go), no prompts.
const APT_CONF: &str = "/etc/apt/apt.conf.d/00imgvm-build";
const BUILD_SOURCES: &str = "/etc/apt/imgvm-build.list";

pub enum Action {
    Script(String),
    /// Bytes to write to a path in the helper (usually under /target).
    Upload {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    /// A host file or directory to copy to a path in the helper.
    Copy {
        from: PathBuf,
        to: String,
    },
}

/// `'...'` quoting for sh.
pub fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn chroot(command: &str) -> String {
    format!("chroot {TARGET} {command}")
}

/// Partition, make filesystems, mount root at /target.
pub fn prepare_disk(recipe: &Recipe) -> Vec<Action> {
    let mut script = String::from("set -e\n");
    if recipe.table == TableKind::None {
        script.push_str("wipefs -a /dev/vda >/dev/null\n");
    } else {
        script.push_str(&format!(
            "sfdisk --quiet --wipe always /dev/vda <<'EOF'\n{}EOF\n",
            sfdisk_script(recipe)
        ));
        for (number, _) in numbered(recipe) {
            script.push_str(&format!(
                "for i in $(seq 100); do [ -b {dev} ] && break; sleep 0.1; done\n",
                dev = device(number)
            ));
        }
    }
    for (number, part) in numbered(recipe) {
        let Some(filesystem) = part.filesystem else { continue };
        let (mkfs, label_flag) = match filesystem {
            Filesystem::Ext4 => ("mkfs.ext4 -q", "-L"),
            Filesystem::Xfs => ("mkfs.xfs -q -f", "-L"),
            Filesystem::Btrfs => ("mkfs.btrfs -q -f", "-L"),
            Filesystem::Vfat => ("mkfs.vfat", "-n"),
            Filesystem::Swap => ("mkswap -q", "-L"),
        };
        let label = part
            .label
            .as_deref()
            .map_or(String::new(), |l| format!(" {label_flag} {}", q(l)));
        let extra: String = part.mkfs_options.iter().map(|o| format!(" {}", q(o))).collect();
        script.push_str(&format!(
            "{mkfs}{label}{extra} {} >/dev/null\n",
            partition_device(recipe, number)
        ));
    }
    let root = mounts(recipe)
        .into_iter()
        .next()
        .expect("validated: something is mounted at /");
    script.push_str(&format!("mkdir -p {TARGET}\nmount {} {TARGET}\n", root.0));
    vec![Action::Script(script)]
}

/// The device of partition `number`: the whole disk when there is no partition table.
fn partition_device(recipe: &Recipe, number: u32) -> String {
    if recipe.table == TableKind::None {
        "/dev/vda".to_owned()
    } else {
        device(number)
    }
}

/// (device, mount point) sorted so that parents come first; root is first.
fn mounts(recipe: &Recipe) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = numbered(recipe)
        .into_iter()
        .filter_map(|(n, p)| {
            let dev = partition_device(recipe, n);
            p.mount.clone().map(|m| (dev, m))
        })
        .collect();
    out.sort_by_key(|(_, m)| (m != "/", m.matches('/').count(), m.clone()));
    out
}

pub fn bootstrap(recipe: &Recipe, variant: BootstrapVariant) -> Vec<Action> {
    let variant = format!("{variant:?}").to_lowercase();
    let include = if recipe.packages.is_empty() {
        String::new()
    } else {
        format!(" --include={}", q(&recipe.packages.join(",")))
    };
    let mut script = format!(
        "set -e\nmmdebstrap --mode=root --variant={variant} --arch={arch} --components={components}{include} \\
         --aptopt='Acquire::http::Proxy \"http://127.0.0.1:3142\"' --aptopt='APT::Install-Recommends \"false\"' \\
         --dpkgopt=force-unsafe-io --skip=cleanup/apt/lists \\
         --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \\
         {suite} {TARGET} {mirror}\n",
        arch = recipe.arch.debian(),
        components = q(&recipe.components.join(",")),
        suite = q(&recipe.suite),
        mirror = q(&recipe.mirror),
    );
    // The other filesystems are mounted once the tree exists; then the image is made
    // ready for chroot work: pseudo filesystems, no service starts, build-time apt.
    for (dev, mount) in mounts(recipe).into_iter().skip(1) {
        script.push_str(&format!("mkdir -p {TARGET}{mount}\nmount {dev} {TARGET}{mount}\n"));
    }
    script.push_str(&format!(
        "mount -t proc proc {TARGET}/proc\nmount -t sysfs sysfs {TARGET}/sys\nmount --bind /dev {TARGET}/dev\n\
         mount --bind /dev/pts {TARGET}/dev/pts\nmount -t tmpfs tmpfs {TARGET}/run\n\
         printf '#!/bin/sh\\nexit 101\\n' > {TARGET}/usr/sbin/policy-rc.d\nchmod 755 {TARGET}/usr/sbin/policy-rc.d\n\
         echo 'deb {mirror} {suite} {components}' > {TARGET}{BUILD_SOURCES}\n\
         cat > {TARGET}{APT_CONF} <<'EOF'\nAcquire::http::Proxy \"http://127.0.0.1:3142\";\nDir::Etc::SourceList \"{BUILD_SOURCES}\";\n\
         Dir::Etc::SourceParts \"/nonexistent\";\nDPkg::Options {{ \"--force-unsafe-io\"; \"--force-confdef\"; \"--force-confold\"; }};\nEOF\n",
        mirror = recipe.mirror,
        suite = recipe.suite,
        components = recipe.components.join(" "),
    ));
    vec![Action::Script(script)]
}

pub fn step(recipe: &Recipe, step: &Step) -> Vec<Action> {
    let env = "DEBIAN_FRONTEND=noninteractive";
    match step {
        Step::Bootstrap(b) => bootstrap(recipe, b.variant),
        Step::Apt(apt) => {
            let recommends = if apt.recommends { "" } else { " --no-install-recommends" };
            let mut script = format!("set -e\n{}\n", chroot(&format!("env {env} apt-get update -q")));
            if apt.upgrade {
                script.push_str(&chroot(&format!("env {env} apt-get -y -q dist-upgrade\n")));
            }
            for (verb, list) in [("install", &apt.install), ("remove", &apt.remove), ("purge", &apt.purge)] {
                if !list.is_empty() {
                    let names: Vec<String> = list.iter().map(|p| q(p)).collect();
                    script.push_str(&chroot(&format!("env {env} apt-get -y -q{recommends} {verb} {}\n", names.join(" "))));
                }
            }
            vec![Action::Script(script)]
        }
        Step::File(file) => {
            let path = format!("{TARGET}{}", file.path);
            vec![
                Action::Script(format!("set -e\nmkdir -p \"$(dirname {})\"\n", q(&path))),
                Action::Upload { path: path.clone(), data: file.content.clone().into_bytes(), mode: file.mode.0 },
                Action::Script(format!(
                    "set -e\nchmod {:o} {p}\n{}",
                    file.mode.0,
                    chroot(&format!("chown {} {}\n", q(&file.owner), q(&file.path))),
                    p = q(&path)
                )),
            ]
        }
        Step::Copy(copy) => vec![
            Action::Copy { from: recipe.dir().join(&copy.from), to: format!("{TARGET}{}", copy.to) },
            Action::Script(chroot(&format!("chown -R {} {}", q(&copy.owner), q(&copy.to)))),
        ],
        Step::Run(run) => {
            let env: String = run.env.iter().map(|(k, v)| format!("{}={} ", k, q(v))).collect();
            let body = match (&run.script, &run.command) {
                (Some(script), _) => script.clone(),
                (None, Some(argv)) => argv.iter().map(|a| q(a)).collect::<Vec<_>>().join(" "),
                (None, None) => unreachable!("validated"),
            };
            if run.chroot {
                vec![
                    Action::Upload { path: format!("{TARGET}/tmp/imgvm-step.sh"), data: body.into_bytes(), mode: 0o700 },
                    Action::Script(format!("set -e\n{}rm -f {TARGET}/tmp/imgvm-step.sh\n", chroot(&format!("env {env}sh -e /tmp/imgvm-step.sh\n")))),
                ]
            } else {
                vec![Action::Script(format!("set -e\nexport TARGET={TARGET} {env}\n{body}\n"))]
            }
        }
        Step::Users(users) => {
            let mut script = String::from("set -e\n");
            for user in users {
                let name = q(&user.name);
                let groups = if user.groups.is_empty() { String::new() } else { format!(" -G {}", q(&user.groups.join(","))) };
                script.push_str(&chroot(&format!("useradd -m -s {}{groups} {name}\n", q(&user.shell))));
                script.push_str(&chroot(&format!("passwd -l {name} >/dev/null\n")));
                if !user.ssh_keys.is_empty() {
                    let ssh = format!("{TARGET}/home/{}/.ssh", user.name);
                    script.push_str(&format!(
                        "mkdir -p {ssh}\ncat > {ssh}/authorized_keys <<'EOF'\n{}\nEOF\nchmod 700 {ssh}\nchmod 600 {ssh}/authorized_keys\n",
                        user.ssh_keys.join("\n")
                    ));
                    script.push_str(&chroot(&format!("chown -R {name}: /home/{}/.ssh\n", user.name)));
                }
                if user.sudo {
                    script.push_str(&format!(
                        "echo {} > {TARGET}/etc/sudoers.d/90-imgvm-{}\nchmod 440 {TARGET}/etc/sudoers.d/90-imgvm-{}\n",
                        q(&format!("{} ALL=(ALL) NOPASSWD:ALL", user.name)),
                        user.name,
                        user.name
                    ));
                }
            }
            vec![Action::Script(script)]
        }
        Step::Hostname(name) => vec![Action::Script(format!(
            "set -e\necho {n} > {TARGET}/etc/hostname\nprintf '127.0.1.1\\t%s\\n' {n} >> {TARGET}/etc/hosts\n",
            n = q(name)
        ))],
        Step::Locale(lang) => {
            vec![Action::Upload { path: format!("{TARGET}/etc/default/locale"), data: format!("LANG={lang}\n").into_bytes(), mode: 0o644 }]
        }
        Step::Timezone(zone) => vec![Action::Script(format!(
            "set -e\n[ -e {TARGET}/usr/share/zoneinfo/{z} ] || {{ echo 'unknown timezone {z}' >&2; exit 1; }}\nln -sf /usr/share/zoneinfo/{z} {TARGET}/etc/localtime\necho {z} > {TARGET}/etc/timezone\n",
            z = zone
        ))],
        Step::AptSources(sources) => {
            let (file, text) = render_sources(sources);
            vec![
                Action::Upload { path: format!("{TARGET}/etc/apt/sources.list.d/{file}"), data: text.into_bytes(), mode: 0o644 },
                Action::Upload {
                    path: format!("{TARGET}/etc/apt/sources.list"),
                    data: format!("# See /etc/apt/sources.list.d/{file}\n").into_bytes(),
                    mode: 0o644,
                },
            ]
        }
        Step::Services(services) => {
            let mut script = String::from("set -e\n");
            for (verb, list) in [("enable", &services.enable), ("disable", &services.disable), ("mask", &services.mask)] {
                for unit in list {
                    script.push_str(&chroot(&format!("systemctl {verb} --quiet {}\n", q(unit))));
                }
            }
            vec![Action::Script(script)]
        }
        Step::Fstab(fstab) => vec![Action::Script(fstab_script(recipe, fstab.by))],
        Step::Bootloader(boot) => vec![Action::Script(bootloader_script(recipe, boot))],
        Step::Finalize(_) => finalize_cleanup(),
    }
}

fn render_sources(sources: &AptSources) -> (String, String) {
    match sources.format {
        SourcesFormat::Deb822 => {
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
        }
        SourcesFormat::List => {
            let mut text = String::new();
            for e in &sources.entries {
                for t in &e.types {
                    for uri in &e.uris {
                        for suite in &e.suites {
                            let opts = e
                                .signed_by
                                .as_ref()
                                .map_or(String::new(), |k| format!("[signed-by={k}] "));
                            text.push_str(&format!("{t} {opts}{uri} {suite} {}\n", e.components.join(" ")));
                        }
                    }
                }
            }
            (format!("{}.list", sources.name), text)
        }
    }
}

fn fstab_script(recipe: &Recipe, by: FstabKey) -> String {
    let mut script = String::from("set -e\n{\n");
    for (number, part) in numbered(recipe) {
        let dev = partition_device(recipe, number);
        let (mount, fs) = match (&part.mount, part.filesystem) {
            (Some(m), Some(fs)) => (m.clone(), format!("{fs:?}").to_lowercase()),
            (None, Some(Filesystem::Swap)) => ("none".to_owned(), "swap".to_owned()),
            _ => continue,
        };
        let key = match by {
            FstabKey::Uuid => "UUID",
            FstabKey::Partuuid if recipe.table != TableKind::None => "PARTUUID",
            FstabKey::Partuuid => "UUID",
            FstabKey::Label => "LABEL",
        };
        let options = part.options.clone().unwrap_or_else(|| "defaults".into());
        let pass = if mount == "/" {
            1
        } else if fs == "swap" {
            0
        } else {
            2
        };
        script.push_str(&format!(
            "  echo \"{key}=$(blkid -s {key} -o value {dev}) {mount} {fs} {options} 0 {pass}\"\n"
        ));
    }
    script.push_str(&format!("}} > {TARGET}/etc/fstab\ncat {TARGET}/etc/fstab\n"));
    script
}

fn bootloader_script(recipe: &Recipe, boot: &Bootloader) -> String {
    let console = match recipe.arch {
        Arch::Amd64 => "console=ttyS0,115200",
        Arch::Arm64 => "console=ttyAMA0",
        Arch::Ppc64el => "console=hvc0",
    };
    let cmdline = format!("{} {console}", boot.cmdline).trim().to_owned();
    let mut script = format!(
        "set -e\nmkdir -p {TARGET}/etc/default/grub.d\ncat > {TARGET}/etc/default/grub.d/99_imgvm.cfg <<'EOF'\n\
         GRUB_CMDLINE_LINUX=\"{cmdline}\"\nGRUB_TIMEOUT={timeout}\nGRUB_TERMINAL=\"console serial\"\nGRUB_SERIAL_COMMAND=\"serial --speed=115200\"\nEOF\n",
        timeout = boot.timeout
    );
    let has = |kind| recipe.partitions.iter().any(|p| p.kind == kind);
    let install = "grub-install --no-nvram --force";
    match recipe.arch {
        Arch::Amd64 => {
            if has(PartitionKind::BiosBoot) || recipe.table == TableKind::Msdos {
                script.push_str(&chroot(&format!("{install} --target=i386-pc /dev/vda\n")));
            }
            if has(PartitionKind::Esp) {
                script.push_str(&chroot(&format!(
                    "{install} --target=x86_64-efi --efi-directory=/boot/efi --removable\n"
                )));
            }
        }
        Arch::Arm64 => script.push_str(&chroot(&format!(
            "{install} --target=arm64-efi --efi-directory=/boot/efi --removable\n"
        ))),
        Arch::Ppc64el => {
            let prep = numbered(recipe)
                .into_iter()
                .find(|(_, p)| p.kind == PartitionKind::Prep)
                .map(|(n, _)| device(n));
            script.push_str(&chroot(&format!(
                "{install} --target=powerpc-ieee1275 {}\n",
                prep.expect("validated")
            )));
        }
    }
    script.push_str(&chroot("update-grub 2>&1\n"));
    script
}

/// What makes the image fresh at first boot: no build-time apt setup, caches, logs,
/// machine id or ssh host keys. The pseudo filesystems go too, so that a rootfs tarball
/// taken next holds only the image.
pub fn finalize_cleanup() -> Vec<Action> {
    vec![Action::Script(format!(
        "set -e\n{}\n\
         rm -f {TARGET}/usr/sbin/policy-rc.d {TARGET}{APT_CONF} {TARGET}{BUILD_SOURCES}\n\
         rm -rf {TARGET}/var/lib/apt/lists/* {TARGET}/var/cache/apt/*.bin {TARGET}/tmp/* {TARGET}/var/tmp/*\n\
         rm -f {TARGET}/etc/ssh/ssh_host_* {TARGET}/var/lib/dbus/machine-id {TARGET}/etc/mailname\n\
         rm -rf {TARGET}/var/log/apt {TARGET}/var/log/dpkg.log {TARGET}/var/log/alternatives.log {TARGET}/var/log/bootstrap.log\n\
         : > {TARGET}/etc/machine-id\n: > {TARGET}/var/lib/dpkg/available\n\
         umount {TARGET}/run {TARGET}/dev/pts {TARGET}/dev {TARGET}/sys {TARGET}/proc\n",
        chroot("apt-get clean")
    ))]
}

/// Trims (so the image stays sparse) and unmounts everything.
pub fn finalize_unmount(recipe: &Recipe, trim: bool) -> Vec<Action> {
    let mut script = String::from("set -e\n");
    if trim {
        script.push_str(&format!(
            "fstrim --all --quiet-unsupported 2>/dev/null || fstrim {TARGET} || true\n"
        ));
    }
    for (_, mount) in mounts(recipe).into_iter().rev() {
        script.push_str(&format!("umount {TARGET}{}\n", if mount == "/" { "" } else { &mount }));
    }
    script.push_str("sync\n");
    vec![Action::Script(script)]
}

/// `name version architecture` per installed package, read before finalize unmounts.
pub fn package_list() -> String {
    chroot("dpkg-query -W -f '${Package}\\t${Version}\\t${Architecture}\\n'")
}
