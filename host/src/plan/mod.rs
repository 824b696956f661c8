//! A recipe as the operations the helper VM carries out, grouped into the phases the user
//! sees (one per step). Everything recipe-specific is decided here, before any VM starts:
//! devices, partition types, grub targets, fstab keys.
//!
//! Planning is a pure function of the loaded recipe (whose host facts, such as what a
//! `copy` source is, were read while loading): it reads no file and starts nothing, so
//! `imgvm build --dry-run` shows exactly what a build will do, and the golden plans in
//! `host/tests/golden/` show every change to planning as a diff.

mod identity;
mod layout;

use crate::arch::Arch;
use crate::recipe::{self, Filesystem, FstabKey, HostSource, PartitionKind, Recipe, Step, TableKind, Timeout};
pub(crate) use identity::uuid_text;
use identity::Identity;
use imgvm_protocol::{self as proto, ImageOp};
use layout::{device, device_of, numbered, partition_specs, DISK, SEALED};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Plan {
    pub recipe: String,
    pub arch: Arch,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub label: String,
    /// How long the phase may take before it is cancelled and the build fails.
    pub timeout: Timeout,
    /// Whether the image as this phase leaves it may be stored and reused by a later
    /// build ([`crate::states`]): not after a `run` step marked `cache: false`, whose
    /// inputs imgvm does not know. After finalize the state is the sealed image with
    /// what the build found out about it; not when the build also takes the tree out
    /// as a tarball, which is not kept.
    pub cache: bool,
    pub actions: Vec<Action>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Op(ImageOp),
    /// An operation whose input stream is this text (a file's content).
    Feed {
        op: ImageOp,
        content: String,
    },
    /// An operation whose input stream is a host file, or a host directory as a tar stream.
    Stream {
        op: ImageOp,
        source: HostSource,
    },
    /// Record the installed packages for the manifest.
    ListPackages,
    /// Run the offline checks on the finished tree.
    Checks(Vec<NamedCheck>),
    /// Copy the finished tree out as the rootfs tarball.
    RootfsTarball,
}

/// An offline check with the name reports give it.
#[derive(Debug, Clone, Serialize)]
pub struct NamedCheck {
    pub name: String,
    pub check: proto::Check,
}

impl Action {
    /// One line for `--dry-run`.
    pub fn describe(&self) -> String {
        match self {
            Action::Op(op) => op.describe(),
            Action::Feed { op, content } => format!("{} ({} bytes)", op.describe(), content.len()),
            Action::Stream { op, source } => format!("{} (from {})", op.describe(), source.path.display()),
            Action::ListPackages => "list installed packages".into(),
            Action::Checks(checks) => format!("{} offline checks", checks.len()),
            Action::RootfsTarball => "copy the tree out as rootfs.tar".into(),
        }
    }
}

impl Plan {
    /// What `--dry-run` prints: each phase, then its operations.
    pub fn text(&self) -> String {
        let mut out = format!("{} for {}\n", self.recipe, self.arch);
        for phase in &self.phases {
            out.push_str(&format!("{}\n", phase.label));
            for action in &phase.actions {
                out.push_str(&format!("  - {}\n", action.describe()));
            }
        }
        out
    }
}

/// What a build decides besides its recipe.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Run the recipe's offline checks on the finished tree.
    pub test: bool,
    /// The build's `SOURCE_DATE_EPOCH`: every program in the helper gets it, and the
    /// disk's identifiers derive from it.
    pub epoch: i64,
    /// The build writes an image (`imgvm lock` does not): the finished tree is sealed
    /// onto the second disk ([`proto::Seal`]), and taken out as a tarball if asked.
    pub image: bool,
}

pub fn plan(recipe: &Recipe, settings: &Settings) -> Plan {
    let ids = Identity::new(&recipe.name, recipe.arch, settings.epoch);
    let mut actions = vec![Action::Op(proto::SourceDateEpoch(settings.epoch).into())];
    actions.extend(prepare_disk(recipe, &ids));
    let mut phases = vec![Phase {
        label: "partition and format".into(),
        timeout: recipe.step_timeout,
        cache: true,
        actions,
    }];
    let count = recipe.steps.len();
    for (i, step) in recipe.steps.iter().enumerate() {
        let timeout = match step {
            Step::Run(run) => run.timeout,
            _ => None,
        };
        let actions = step_actions(recipe, step, settings, &ids);
        let cache = match step {
            Step::Run(run) => run.cache,
            Step::Finalize(_) => !actions.iter().any(|a| matches!(a, Action::RootfsTarball)),
            _ => true,
        };
        phases.push(Phase {
            label: format!("step {}/{count} ({})", i + 1, step.kind()),
            timeout: timeout.unwrap_or(recipe.step_timeout),
            cache,
            actions,
        });
    }
    Plan {
        recipe: recipe.name.clone(),
        arch: recipe.arch,
        phases,
    }
}

/// The device of partition `number` of `disk`: the whole disk when there is no
/// partition table.
fn partition_device(table: TableKind, disk: &str, number: u32) -> String {
    if table == TableKind::None {
        disk.to_owned()
    } else {
        device_of(disk, number)
    }
}

/// The mounted filesystems of a finished image attached as `disk`: (device, mount
/// point, filesystem), root first. What `imgvm diff --files` lists.
pub fn image_filesystems(
    table: TableKind,
    partitions: &[recipe::Partition],
    disk: &str,
) -> Vec<(String, String, Filesystem)> {
    let mut out: Vec<_> = numbered(partitions)
        .into_iter()
        .filter_map(|(number, part)| {
            let device = partition_device(table, disk, number);
            Some((device, part.mount.clone()?, part.filesystem?))
        })
        .filter(|(_, _, fs)| *fs != Filesystem::Swap)
        .collect();
    out.sort_by_key(|(_, mount, _)| (mount != "/", mount.matches('/').count()));
    out
}

/// (device, mount point), parents before children; root first.
fn mounts(recipe: &Recipe) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = numbered(&recipe.partitions)
        .into_iter()
        .filter_map(|(n, p)| Some((partition_device(recipe.table, DISK, n), p.mount.clone()?)))
        .collect();
    out.sort_by_key(|(_, m)| (m != "/", m.matches('/').count(), m.clone()));
    out
}

fn prepare_disk(recipe: &Recipe, ids: &Identity) -> Vec<Action> {
    let (table, label_id) = match recipe.table {
        TableKind::Gpt => (Some(proto::Table::Gpt), Some(ids.uuid("disk"))),
        TableKind::Msdos => (Some(proto::Table::Msdos), Some(ids.disk_id())),
        TableKind::None => (None, None),
    };
    let mut actions = vec![Action::Op(
        proto::Partition {
            disk: DISK.into(),
            table,
            partitions: partition_specs(recipe, ids),
            label_id,
        }
        .into(),
    )];
    for (number, part) in numbered(&recipe.partitions) {
        if let Some(mkfs) = mkfs(recipe, ids, DISK, number, part) {
            actions.push(Action::Op(mkfs.into()));
        }
    }
    let (device, path) = mounts(recipe).swap_remove(0);
    actions.push(Action::Op(proto::Mount { device, path }.into()));
    actions
}

/// How partition `number` gets its filesystem on `disk`, if it has one: with the
/// recipe's UUID or a derived one, and for ext4 a derived hash seed.
fn mkfs(recipe: &Recipe, ids: &Identity, disk: &str, number: u32, part: &recipe::Partition) -> Option<proto::Mkfs> {
    let filesystem = part.filesystem?;
    let what = format!("filesystem {}", part.name);
    let derived = match filesystem {
        Filesystem::Vfat => ids.volume_id(&what),
        _ => ids.uuid(&what),
    };
    Some(proto::Mkfs {
        device: partition_device(recipe.table, disk, number),
        filesystem,
        label: part.label.clone(),
        uuid: Some(part.uuid.clone().unwrap_or(derived)),
        hash_seed: (filesystem == Filesystem::Ext4).then(|| ids.uuid(&format!("hash seed {}", part.name))),
        options: part.mkfs_options.clone(),
    })
}

/// The finished image onto the second disk: each mounted ext4 and vfat made anew from
/// its tree, the rest (boot code, BIOS boot and PReP partitions, swap, xfs and btrfs)
/// copied as built.
fn seal(recipe: &Recipe, ids: &Identity) -> proto::Seal {
    let filesystems = numbered(&recipe.partitions)
        .into_iter()
        .filter(|(_, part)| matches!(part.filesystem, Some(Filesystem::Ext4 | Filesystem::Vfat)))
        .filter_map(|(number, part)| {
            Some(proto::SealedFilesystem {
                partition: (recipe.table != TableKind::None).then_some(number),
                mount: part.mount.clone()?,
                mkfs: mkfs(recipe, ids, SEALED, number, part)?,
            })
        })
        .collect();
    proto::Seal {
        from: DISK.into(),
        to: SEALED.into(),
        filesystems,
    }
}

fn step_actions(recipe: &Recipe, step: &Step, settings: &Settings, ids: &Identity) -> Vec<Action> {
    fn op(op: impl Into<ImageOp>) -> Vec<Action> {
        vec![Action::Op(op.into())]
    }
    match step {
        Step::Bootstrap(b) => {
            // mmdebstrap's variant names are the recipe's.
            let variant = b.variant.name().to_owned();
            let mut actions = vec![Action::Op(ImageOp::Bootstrap(proto::Bootstrap {
                files: b
                    .files
                    .iter()
                    .map(|f| proto::TreeFile {
                        path: f.path.clone(),
                        mode: f.mode.0,
                        content: proto::Bytes(f.content.clone().into_bytes()),
                    })
                    .collect(),
                suite: recipe.suite.clone(),
                variant,
                arch: recipe.arch.debian().into(),
                mirror: recipe.mirror.clone(),
                components: recipe.components.clone(),
                include: recipe.packages.clone(),
                keyring: proto::Bytes(crate::archive::KEYRING.to_vec()),
            }))];
            // The other filesystems go in once the tree exists (mmdebstrap wants an
            // empty directory).
            for (device, path) in mounts(recipe).into_iter().skip(1) {
                actions.push(Action::Op(proto::Mount { device, path }.into()));
            }
            actions.push(Action::Op(
                proto::EnterChroot {
                    source: proto::AptSource {
                        mirror: recipe.mirror.clone(),
                        suite: recipe.suite.clone(),
                        components: recipe.components.clone(),
                    },
                }
                .into(),
            ));
            actions
        }
        Step::Apt(apt) => op(apt.clone()),
        Step::Debconf(answers) => op(answers.clone()),
        Step::File(file) => vec![Action::Feed {
            op: proto::WriteFile {
                path: file.path.clone(),
                mode: file.mode.0,
                owner: file.owner.clone(),
            }
            .into(),
            content: file.content.clone(),
        }],
        Step::Copy(copy) => {
            let source = copy
                .source
                .clone()
                .expect("copy sources are read while loading the recipe");
            let op = match source.kind {
                recipe::SourceKind::Directory { .. } => proto::Unpack {
                    path: copy.to.clone(),
                    owner: copy.owner.clone(),
                }
                .into(),
                recipe::SourceKind::File { mode, .. } => proto::WriteFile {
                    path: copy.to.clone(),
                    mode,
                    owner: copy.owner.clone(),
                }
                .into(),
            };
            vec![Action::Stream { op, source }]
        }
        Step::Run(run) => {
            let script = match (&run.script, &run.command) {
                (Some(script), _) => script.clone(),
                (_, Some(argv)) => argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
                (None, None) => unreachable!("validated: script or command"),
            };
            op(proto::Script {
                script,
                env: run.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                chroot: run.chroot,
            })
        }
        Step::Users(users) => op(proto::Users(users.clone())),
        Step::Hostname(name) => op(proto::Hostname(name.clone())),
        Step::Locale(lang) => op(proto::Locale(lang.clone())),
        Step::Timezone(zone) => op(proto::Timezone(zone.clone())),
        Step::AptSources(sources) => op(proto::AptSources {
            name: sources.name.clone(),
            deb822: sources.format == recipe::SourcesFormat::Deb822,
            entries: sources.entries.clone(),
        }),
        Step::Services(services) => op(services.clone()),
        Step::Fstab(fstab) => op(proto::Fstab(fstab_entries(recipe, fstab.by))),
        Step::Bootloader(boot) => op(bootloader(recipe, boot)),
        Step::Finalize(finalize) => {
            let mut actions = vec![Action::Op(proto::Clean.into()), Action::ListPackages];
            if settings.test && !recipe.tests.is_empty() {
                actions.push(Action::Checks(checks(recipe)));
            }
            // Taken before unmounting, so it holds the whole tree.
            if settings.image && recipe.outputs.contains(&recipe::OutputFormat::Rootfs) {
                actions.push(Action::RootfsTarball);
            }
            if settings.image {
                actions.push(Action::Op(seal(recipe, ids).into()));
            }
            actions.push(Action::Op(proto::Unmount { trim: finalize.trim }.into()));
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
        // Without a partition table there is no PARTUUID.
        FstabKey::Partuuid if recipe.table == TableKind::None => FstabKey::Uuid,
        key => key,
    };
    let mut entries: Vec<proto::FstabEntry> = numbered(&recipe.partitions)
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
                device: partition_device(recipe.table, DISK, number),
                key,
                mount,
                filesystem: fs,
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
    // The serial console the helper VM and the boot tests read, at the speed GRUB's
    // serial terminal uses on PCs.
    let console = match recipe.arch {
        Arch::Amd64 => format!("console={},115200", recipe.arch.console()),
        arch => format!("console={}", arch.console()),
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
            let (number, _) = numbered(&recipe.partitions)
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
pub fn checks(recipe: &Recipe) -> Vec<NamedCheck> {
    let mut out = Vec::new();
    let mut push = |name: String, check: proto::Check| out.push(NamedCheck { name, check });
    for test in &recipe.tests {
        match test {
            recipe::Test::File(f) => {
                for (what, expect) in file_expectations(f) {
                    let check = proto::Check::File {
                        path: f.path.clone(),
                        expect,
                        optional: f.optional,
                    };
                    let if_present = if f.optional { " (if present)" } else { "" };
                    push(format!("file {} {what}{if_present}", f.path), check);
                }
            }
            recipe::Test::Package(p) => push(
                format!("package {}", p.name),
                proto::Check::Package {
                    name: p.name.clone(),
                    version: p.version.clone(),
                },
            ),
            recipe::Test::Service(name) => push(
                format!("service {name} enabled"),
                proto::Check::ServiceEnabled { name: name.clone() },
            ),
            recipe::Test::Command(c) => push(
                format!("command: {}", c.name),
                proto::Check::Command { script: c.run.clone() },
            ),
            recipe::Test::Glob(g) => push(
                format!(
                    "glob {} {}",
                    g.pattern,
                    if g.absent { "matches nothing" } else { "matches" }
                ),
                proto::Check::Glob {
                    pattern: g.pattern.clone(),
                    absent: g.absent,
                },
            ),
            recipe::Test::Users(a) | recipe::Test::Groups(a) => {
                let (database, noun) = match test {
                    recipe::Test::Users(_) => (proto::AccountDatabase::Passwd, "users"),
                    _ => (proto::AccountDatabase::Group, "groups"),
                };
                for (what, expect) in account_expectations(a) {
                    push(format!("{noun} {what}"), proto::Check::Accounts { database, expect });
                }
            }
        }
    }
    out
}

/// One expectation per field given, each named for the report; none given means that
/// the path exists.
pub(crate) fn file_expectations(f: &recipe::FileTest) -> Vec<(&'static str, proto::FileExpect)> {
    use proto::FileExpect as E;
    let kind = f.kind.map(|k| match k {
        recipe::FileKind::File => proto::FileKind::File,
        recipe::FileKind::Directory => proto::FileKind::Directory,
        recipe::FileKind::Symlink => proto::FileKind::Symlink,
    });
    let expects = [
        f.absent.then_some(("absent", E::Absent)),
        kind.map(|k| ("kind", E::Kind(k))),
        f.empty.then_some(("empty", E::Empty)),
        f.content.clone().map(|c| ("content", E::Content(c))),
        f.only.clone().map(|names| ("holds only", E::Only(names))),
        f.contains.clone().map(|l| ("contains", E::ContainsLine(l))),
        f.matches.clone().map(|p| ("matches", E::Matches(p))),
        f.mode.map(|m| ("mode", E::Mode(m.0))),
        f.owner.clone().map(|o| ("owner", E::Owner(o))),
    ];
    let expects: Vec<_> = expects.into_iter().flatten().collect();
    if expects.is_empty() {
        vec![("exists", E::Exists)]
    } else {
        expects
    }
}

pub(crate) fn account_expectations(a: &recipe::AccountsTest) -> Vec<(&'static str, proto::AccountExpect)> {
    use proto::AccountExpect as E;
    let rules = [
        (!a.required.is_empty()).then(|| ("exist", E::Present(a.required.clone()))),
        (!a.names.is_empty() || !a.prefixes.is_empty()).then(|| {
            let names = E::Names {
                names: a.names.clone(),
                prefixes: a.prefixes.clone(),
            };
            ("have allowed names", names)
        }),
        a.ids.as_ref().map(|ids| {
            let ids = E::Ids {
                below: ids.below,
                also: ids.also.clone(),
            };
            ("have allowed ids", ids)
        }),
        (!a.shells.is_empty()).then(|| {
            let shells = a.shells.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            ("have allowed shells", E::Shells(shells))
        }),
    ];
    rules.into_iter().flatten().collect()
}
