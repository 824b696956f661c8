//! A recipe as the operations the helper VM carries out, grouped into the phases the user
//! sees (one per step). Everything recipe-specific is decided here, before any VM starts:
//! devices, partition types, grub targets, fstab keys.

use super::layout::{device, numbered, partition_specs, DISK};
use crate::arch::Arch;
use crate::recipe::{self, Filesystem, FstabKey, PartitionKind, Recipe, Step, TableKind};
use imgvm_protocol::{self as proto, ImageOp};
use std::path::PathBuf;

pub struct Phase {
    pub label: String,
    pub actions: Vec<Action>,
}

pub enum Action {
    Op(ImageOp),
    /// An operation whose input stream is these bytes (a file's content).
    Feed(ImageOp, Vec<u8>),
    /// An operation whose input stream is a host file, or a host directory as a tar stream.
    Stream(ImageOp, PathBuf),
    /// Record the installed packages for the manifest.
    ListPackages,
    /// Run the offline checks (named for reports) on the finished tree.
    Checks(Vec<(String, proto::Check)>),
    /// Copy the finished tree out as the rootfs tarball.
    RootfsTarball,
}

/// With `test`, the recipe's offline checks run on the finished tree.
pub fn plan(recipe: &Recipe, test: bool) -> Vec<Phase> {
    let mut phases = vec![Phase {
        label: "partition and format".into(),
        actions: prepare_disk(recipe),
    }];
    let count = recipe.steps.len();
    for (i, step) in recipe.steps.iter().enumerate() {
        phases.push(Phase {
            label: format!("step {}/{count} ({})", i + 1, step.kind()),
            actions: step_actions(recipe, step, test),
        });
    }
    phases
}

/// The device of partition `number`: the whole disk when there is no partition table.
fn partition_device(recipe: &Recipe, number: u32) -> String {
    if recipe.table == TableKind::None {
        DISK.to_owned()
    } else {
        device(number)
    }
}

/// (device, mount point), parents before children; root first.
fn mounts(recipe: &Recipe) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = numbered(recipe)
        .into_iter()
        .filter_map(|(n, p)| Some((partition_device(recipe, n), p.mount.clone()?)))
        .collect();
    out.sort_by_key(|(_, m)| (m != "/", m.matches('/').count(), m.clone()));
    out
}

fn filesystem(fs: Filesystem) -> proto::Filesystem {
    match fs {
        Filesystem::Ext4 => proto::Filesystem::Ext4,
        Filesystem::Xfs => proto::Filesystem::Xfs,
        Filesystem::Btrfs => proto::Filesystem::Btrfs,
        Filesystem::Vfat => proto::Filesystem::Vfat,
        Filesystem::Swap => proto::Filesystem::Swap,
    }
}

fn prepare_disk(recipe: &Recipe) -> Vec<Action> {
    let table = match recipe.table {
        TableKind::Gpt => Some(proto::Table::Gpt),
        TableKind::Msdos => Some(proto::Table::Msdos),
        TableKind::None => None,
    };
    let mut actions = vec![Action::Op(ImageOp::Partition {
        disk: DISK.into(),
        table,
        partitions: partition_specs(recipe),
    })];
    for (number, part) in numbered(recipe) {
        let Some(fs) = part.filesystem else { continue };
        actions.push(Action::Op(ImageOp::Mkfs(proto::Mkfs {
            device: partition_device(recipe, number),
            filesystem: filesystem(fs),
            label: part.label.clone(),
            uuid: part.uuid.clone(),
            options: part.mkfs_options.clone(),
        })));
    }
    let (device, path) = mounts(recipe).swap_remove(0);
    actions.push(Action::Op(ImageOp::Mount { device, path }));
    actions
}

fn step_actions(recipe: &Recipe, step: &Step, test: bool) -> Vec<Action> {
    let op = |op| vec![Action::Op(op)];
    match step {
        Step::Bootstrap(b) => {
            // mmdebstrap's variant names are the recipe's.
            let variant = format!("{:?}", b.variant).to_lowercase();
            let mut actions = vec![Action::Op(ImageOp::Bootstrap(proto::Bootstrap {
                suite: recipe.suite.clone(),
                variant,
                arch: recipe.arch.debian().into(),
                mirror: recipe.mirror.clone(),
                components: recipe.components.clone(),
                include: recipe.packages.clone(),
                keyring: crate::archive::KEYRING.to_vec(),
            }))];
            // The other filesystems go in once the tree exists (mmdebstrap wants an
            // empty directory).
            for (device, path) in mounts(recipe).into_iter().skip(1) {
                actions.push(Action::Op(ImageOp::Mount { device, path }));
            }
            actions.push(Action::Op(ImageOp::EnterChroot {
                source: proto::AptSource {
                    mirror: recipe.mirror.clone(),
                    suite: recipe.suite.clone(),
                    components: recipe.components.clone(),
                },
            }));
            actions
        }
        Step::Apt(apt) => op(ImageOp::Apt(proto::Apt {
            install: apt.install.clone(),
            remove: apt.remove.clone(),
            purge: apt.purge.clone(),
            upgrade: apt.upgrade,
            recommends: apt.recommends,
        })),
        Step::File(file) => vec![Action::Feed(
            ImageOp::WriteFile {
                path: file.path.clone(),
                mode: file.mode.0,
                owner: file.owner.clone(),
            },
            file.content.clone().into_bytes(),
        )],
        Step::Copy(copy) => {
            let from = recipe.dir().join(&copy.from);
            let op = if from.is_dir() {
                ImageOp::Unpack {
                    path: copy.to.clone(),
                    owner: copy.owner.clone(),
                }
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&from).map_or(0o644, |m| m.permissions().mode() & 0o7777);
                ImageOp::WriteFile {
                    path: copy.to.clone(),
                    mode,
                    owner: copy.owner.clone(),
                }
            };
            vec![Action::Stream(op, from)]
        }
        Step::Run(run) => {
            let script = match (&run.script, &run.command) {
                (Some(script), _) => script.clone(),
                (_, Some(argv)) => argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
                (None, None) => unreachable!("validated: script or command"),
            };
            op(ImageOp::Script {
                script,
                env: run.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                chroot: run.chroot,
            })
        }
        Step::Users(users) => op(ImageOp::Users(
            users
                .iter()
                .map(|u| proto::User {
                    name: u.name.clone(),
                    groups: u.groups.clone(),
                    shell: u.shell.clone(),
                    ssh_keys: u.ssh_keys.clone(),
                    sudo: u.sudo,
                })
                .collect(),
        )),
        Step::Hostname(name) => op(ImageOp::Hostname(name.clone())),
        Step::Locale(lang) => op(ImageOp::Locale(lang.clone())),
        Step::Timezone(zone) => op(ImageOp::Timezone(zone.clone())),
        Step::AptSources(sources) => op(ImageOp::AptSources(proto::AptSources {
            name: sources.name.clone(),
            deb822: sources.format == recipe::SourcesFormat::Deb822,
            entries: sources
                .entries
                .iter()
                .map(|e| proto::SourceEntry {
                    types: e.types.clone(),
                    uris: e.uris.clone(),
                    suites: e.suites.clone(),
                    components: e.components.clone(),
                    signed_by: e.signed_by.clone(),
                })
                .collect(),
        })),
        Step::Services(s) => op(ImageOp::Services(proto::Services {
            enable: s.enable.clone(),
            disable: s.disable.clone(),
            mask: s.mask.clone(),
        })),
        Step::Fstab(fstab) => op(ImageOp::Fstab(fstab_entries(recipe, fstab.by))),
        Step::Bootloader(boot) => op(ImageOp::Bootloader(bootloader(recipe, boot))),
        Step::Finalize(finalize) => {
            let mut actions = vec![Action::Op(ImageOp::Clean), Action::ListPackages];
            if test && !recipe.tests.is_empty() {
                actions.push(Action::Checks(checks(recipe)));
            }
            // Taken before unmounting, so it holds the whole tree.
            if recipe.outputs.contains(&recipe::OutputFormat::Rootfs) {
                actions.push(Action::RootfsTarball);
            }
            actions.push(Action::Op(ImageOp::Unmount { trim: finalize.trim }));
            actions
        }
    }
}

/// `'...'` quoting for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn fstab_entries(recipe: &Recipe, by: FstabKey) -> Vec<proto::FstabEntry> {
    let key = match by {
        FstabKey::Uuid => proto::FstabKey::Uuid,
        // Without a partition table there is no PARTUUID.
        FstabKey::Partuuid if recipe.table == TableKind::None => proto::FstabKey::Uuid,
        FstabKey::Partuuid => proto::FstabKey::Partuuid,
        FstabKey::Label => proto::FstabKey::Label,
    };
    let mut entries: Vec<proto::FstabEntry> = numbered(recipe)
        .into_iter()
        .filter_map(|(number, part)| {
            let fs = part.filesystem?;
            let mount = match (&part.mount, fs) {
                (Some(m), _) => m.clone(),
                (None, Filesystem::Swap) => "none".into(),
                (None, _) => return None,
            };
            let pass = match (mount.as_str(), fs) {
                ("/", _) => 1,
                (_, Filesystem::Swap) => 0,
                _ => 2,
            };
            Some(proto::FstabEntry {
                device: partition_device(recipe, number),
                key,
                mount,
                filesystem: filesystem(fs),
                options: part.options.clone().unwrap_or_else(|| "defaults".into()),
                pass,
            })
        })
        .collect();
    // Parents before children, as mount -a needs.
    entries.sort_by_key(|e| (e.mount != "/", e.mount.matches('/').count()));
    entries
}

fn bootloader(recipe: &Recipe, boot: &recipe::Bootloader) -> proto::Bootloader {
    let console = match recipe.arch {
        Arch::Amd64 => "console=ttyS0,115200",
        Arch::Arm64 => "console=ttyAMA0",
        Arch::Ppc64el => "console=hvc0",
    };
    let has = |kind| recipe.partitions.iter().any(|p| p.kind == kind);
    let mut installs = Vec::new();
    match recipe.arch {
        Arch::Amd64 => {
            if has(PartitionKind::BiosBoot) || recipe.table == TableKind::Msdos {
                installs.push(proto::GrubInstall::Bios { disk: DISK.into() });
            }
            if has(PartitionKind::Esp) {
                installs.push(proto::GrubInstall::Efi {
                    target: "x86_64-efi".into(),
                });
            }
        }
        Arch::Arm64 => installs.push(proto::GrubInstall::Efi {
            target: "arm64-efi".into(),
        }),
        Arch::Ppc64el => {
            let (number, _) = numbered(recipe)
                .into_iter()
                .find(|(_, p)| p.kind == PartitionKind::Prep)
                .expect("validated: ppc64el bootloader needs a prep partition");
            installs.push(proto::GrubInstall::Prep { device: device(number) });
        }
    }
    proto::Bootloader {
        installs,
        cmdline: format!("{} {console}", boot.cmdline).trim().to_owned(),
        root_by_partuuid: recipe.table != TableKind::None,
        timeout: boot.timeout,
    }
}

/// The recipe's `tests:` as the agent's checks, each with the name reports give it. A
/// file with several expectations becomes one check per expectation.
pub fn checks(recipe: &Recipe) -> Vec<(String, proto::Check)> {
    let mut out = Vec::new();
    for test in &recipe.tests {
        match test {
            recipe::Test::File(f) => {
                let mut expects = Vec::new();
                if f.absent {
                    expects.push(proto::FileExpect::Absent);
                }
                if f.empty {
                    expects.push(proto::FileExpect::Empty);
                }
                if let Some(line) = &f.contains {
                    expects.push(proto::FileExpect::ContainsLine(line.clone()));
                }
                if let Some(pattern) = &f.matches {
                    expects.push(proto::FileExpect::Matches(pattern.clone()));
                }
                if let Some(mode) = f.mode {
                    expects.push(proto::FileExpect::Mode(mode.0));
                }
                if let Some(owner) = &f.owner {
                    expects.push(proto::FileExpect::Owner(owner.clone()));
                }
                if expects.is_empty() {
                    expects.push(proto::FileExpect::Exists);
                }
                for expect in expects {
                    let what = match &expect {
                        proto::FileExpect::Exists => "exists".to_owned(),
                        proto::FileExpect::Absent => "absent".to_owned(),
                        proto::FileExpect::Empty => "empty".to_owned(),
                        proto::FileExpect::ContainsLine(_) => "contains".to_owned(),
                        proto::FileExpect::Matches(_) => "matches".to_owned(),
                        proto::FileExpect::Mode(_) => "mode".to_owned(),
                        proto::FileExpect::Owner(_) => "owner".to_owned(),
                    };
                    out.push((
                        format!("file {} {what}", f.path),
                        proto::Check::File {
                            path: f.path.clone(),
                            expect,
                        },
                    ));
                }
            }
            recipe::Test::Package(p) => out.push((
                format!("package {}", p.name),
                proto::Check::Package {
                    name: p.name.clone(),
                    version: p.version.clone(),
                },
            )),
            recipe::Test::Service(name) => out.push((
                format!("service {name} enabled"),
                proto::Check::ServiceEnabled { name: name.clone() },
            )),
            recipe::Test::Command(c) => out.push((
                format!("command: {}", c.name),
                proto::Check::Command { script: c.run.clone() },
            )),
        }
    }
    out
}
