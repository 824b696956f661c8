//! What a recipe file may say. Every type here rejects what it does not know, so a typo
//! is an error at its line and column rather than a silently ignored setting.

use super::size::Size;
use crate::arch::Arch;
/// Spelled in a recipe as they travel to the agent.
pub use imgvm_protocol::{Apt, Debconf, Filesystem, FstabKey, Services, SourceEntry, User};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One recipe file (or one `per_arch` part of it), before merging.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// Recipes this one builds on, relative to this file; theirs first, then this one's.
    #[serde(default)]
    pub extends: Vec<String>,
    /// `${name}` in any string of this file and the files extending it.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Additions for one architecture, merged after everything else.
    #[serde(default)]
    pub per_arch: BTreeMap<Arch, Body>,
    pub name: Option<String>,
    pub description: Option<String>,
    /// The cloud the image is for, as debian-cloud-images names it (`generic`, `ec2`,
    /// ...): with it, a build also writes `NAME.build.json`, Debian's Build manifest.
    pub vendor: Option<String>,
    /// The architecture built when `--arch` is not given.
    pub arch: Option<Arch>,
    /// The architectures this recipe can build.
    pub arches: Option<Vec<Arch>>,
    pub suite: Option<String>,
    pub mirror: Option<Mirror>,
    /// The archive as it was at one time: a snapshot.debian.org timestamp
    /// (`20261120T000000Z`) or the URL of another snapshot archive. Replaces the mirror,
    /// except for a lock written from the mirror (see [`super::Recipe::snapshot_for`]).
    pub snapshot: Option<Snapshot>,
    pub components: Option<Vec<String>>,
    pub disk: Option<DiskBody>,
    /// Installed with the bootstrap. Lists from all files are concatenated.
    pub packages: Option<Vec<String>>,
    /// Run in order. Lists from all files are concatenated. Written `- apt: {...}`.
    #[serde(default, with = "serde_yaml_ng::with::singleton_map_recursive")]
    pub steps: Option<Vec<Step>>,
    pub outputs: Option<Vec<OutputFormat>>,
    /// How long any step may take (default 3h); a `run` step may set its own `timeout`.
    pub step_timeout: Option<super::Timeout>,
    /// Offline checks of the built image (`imgvm build --test`). Lists from all files are
    /// concatenated. Written `- file: {...}`.
    #[serde(default, with = "serde_yaml_ng::with::singleton_map_recursive")]
    pub tests: Option<Vec<Test>>,
    pub boot_test: Option<BootTest>,
}

/// How the boot test judges this image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTest {
    /// Units that need the vendor's own machine (Hyper-V's PTP clock for Azure's chrony,
    /// the metadata server for GCE's guest agent) and so fail, or never finish starting,
    /// under qemu: the boot test names them, and passes.
    #[serde(default)]
    pub may_fail: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskBody {
    pub size: Option<Size>,
    pub table: Option<TableKind>,
    pub partitions: Option<Vec<Partition>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Msdos,
    /// A single filesystem on the whole disk.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// How steps and messages refer to the partition.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PartitionKind,
    /// Absent for the last partition, which takes the rest of the disk (root, so that it
    /// can grow).
    pub size: Option<Size>,
    /// The partition number (Debian's images use 14 for BIOS boot, 15 for the ESP and
    /// PReP, 1 for root). Default: the position in the list.
    pub number: Option<u32>,
    pub filesystem: Option<Filesystem>,
    pub label: Option<String>,
    /// The filesystem's UUID (for vfat its volume id, `ABCD-1234`). Default: derived from
    /// the recipe's name, the architecture and `SOURCE_DATE_EPOCH` (see
    /// `plan::identity`), so the same for every rebuild from one lock.
    pub uuid: Option<String>,
    pub mount: Option<String>,
    /// Mount options for fstab, e.g. `discard,errors=remount-ro`.
    pub options: Option<String>,
    /// Extra arguments for mkfs, e.g. `["-O", "^metadata_csum_seed"]`.
    #[serde(default)]
    pub mkfs_options: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum PartitionKind {
    BiosBoot,
    Esp,
    Prep,
    Root,
    Linux,
    Swap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum OutputFormat {
    Raw,
    Qcow2,
    Qcow2Compressed,
    Vmdk,
    Vhd,
    /// Debian's own image archive, `NAME.tar`: what its publishing tools take.
    Tar,
    GceTar,
    Rootfs,
}

/// An `http://` or `https://` URL without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirror(pub String);

impl std::str::FromStr for Mirror {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
        match rest {
            Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(Mirror(s.trim_end_matches('/').to_owned())),
            _ => Err(format!("invalid mirror `{s}`: expected an http:// or https:// URL")),
        }
    }
}

impl<'de> Deserialize<'de> for Mirror {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A snapshot archive's URL: from a timestamp `YYYYMMDDTHHMMSSZ`, as
/// snapshot.debian.org names its states, or given as an `http(s)://` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot(pub String);

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let b = s.as_bytes();
        let stamp =
            b.len() == 16 && b[8] == b'T' && b[15] == b'Z' && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
        if stamp {
            return Ok(Snapshot(format!("http://snapshot.debian.org/archive/debian/{s}")));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let Mirror(url) = s.parse().map_err(serde::de::Error::custom)?;
            return Ok(Snapshot(url));
        }
        Err(serde::de::Error::custom(format!(
            "invalid snapshot `{s}`: expected a timestamp like 20261120T000000Z or an http(s):// URL"
        )))
    }
}

/// The steps, in the order a recipe lists them. A step's kind (`apt-sources`) is its
/// name in the recipe.
#[derive(Debug, Clone, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[strum(serialize_all = "kebab-case")]
pub enum Step {
    /// mmdebstrap into the mounted target (the first step; added when missing).
    Bootstrap(Bootstrap),
    Apt(Apt),
    File(File),
    /// Host files or directories, relative to the recipe, streamed into the image.
    Copy(Copy),
    Run(Run),
    Users(Vec<User>),
    Hostname(String),
    Locale(String),
    Timezone(String),
    AptSources(AptSources),
    Services(Services),
    Fstab(Fstab),
    Bootloader(Bootloader),
    /// Answers for debconf's questions, for the packages installed after it.
    Debconf(Debconf),
    /// Cleanup that makes the image fresh at first boot (the last step; added when
    /// missing).
    Finalize(Finalize),
}

/// The names a recipe uses for these, for messages.
macro_rules! recipe_names {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn name(self) -> &'static str {
                self.into()
            }
        }
    )*};
}
recipe_names!(TableKind, PartitionKind, OutputFormat, BootstrapVariant);

impl Step {
    pub fn kind(&self) -> &'static str {
        self.into()
    }

    /// What is wrong with the step by itself. Every kind of step has its arm, so a new
    /// one cannot slip past unchecked; what needs the rest of the recipe (order, disk,
    /// host files) is checked in `validate`.
    pub fn check(&self) -> Result<(), Problem> {
        let problem = |at: &str, message: String| {
            Err(Problem {
                at: Some(at.to_owned()),
                message,
            })
        };
        match self {
            Step::File(file) => file_problem(&file.path, &file.content),
            Step::Bootstrap(b) => b.files.iter().try_for_each(|f| file_problem(&f.path, &f.content)),
            Step::Copy(copy) if !inside_image(&copy.to) => problem(
                &copy.to,
                format!("destination `{}` is not an absolute path without `..`", copy.to),
            ),
            Step::Run(run) if run.script.is_some() == run.command.is_some() => Err(Problem {
                at: None,
                message: "give either `script` or `command`".into(),
            }),
            Step::AptSources(sources)
                if sources.name.is_empty()
                    || !sources
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) =>
            {
                Err(Problem {
                    at: None,
                    message: format!("`{}` is not a valid sources file name", sources.name),
                })
            }
            Step::Users(users) => {
                for user in users {
                    let valid = !user.name.is_empty()
                        && user
                            .name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
                        && !user.name.starts_with('-');
                    if !valid {
                        return problem(
                            &format!("name: {}", user.name),
                            format!("`{}` is not a valid user name", user.name),
                        );
                    }
                }
                Ok(())
            }
            // Checked when read (Debconf), or free-form, or checked against the disk in
            // `validate` (Bootloader), or placed there (Finalize).
            Step::Copy(_)
            | Step::Run(_)
            | Step::AptSources(_)
            | Step::Apt(_)
            | Step::Hostname(_)
            | Step::Locale(_)
            | Step::Timezone(_)
            | Step::Services(_)
            | Step::Fstab(_)
            | Step::Bootloader(_)
            | Step::Debconf(_)
            | Step::Finalize(_) => Ok(()),
        }
    }
}

/// A step's mistake: the text to point at (else the step itself) and what is wrong.
#[derive(Debug)]
pub struct Problem {
    pub at: Option<String>,
    pub message: String,
}

/// What the bootloader operation writes (last, in /etc/default/grub.d/99_imgvm.cfg): a
/// recipe's own file setting one of these would silently lose.
const BOOTLOADER_SETTINGS: &[&str] = &[
    "GRUB_TIMEOUT",
    "GRUB_CMDLINE_LINUX",
    "GRUB_TERMINAL",
    "GRUB_SERIAL_COMMAND",
    "GRUB_DISABLE_LINUX_UUID",
    "GRUB_DISABLE_LINUX_PARTUUID",
];

/// What is wrong with writing `content` at `path` in the image: a path outside it, or a
/// GRUB setting the bootloader step owns (and would override).
fn file_problem(path: &str, content: &str) -> Result<(), Problem> {
    let problem = |message: String| {
        Err(Problem {
            at: Some(path.to_owned()),
            message,
        })
    };
    if !inside_image(path) {
        return problem(format!("path `{path}` is not an absolute path without `..`"));
    }
    if path.starts_with("/etc/default/grub") {
        let owned = content.lines().find_map(|line| {
            let name = line.trim_start().split('=').next()?;
            BOOTLOADER_SETTINGS.contains(&name).then_some(name)
        });
        if let Some(name) = owned {
            return problem(format!(
                "{name} belongs to the bootloader step (`bootloader: {{timeout: N, cmdline: ...}}`), \
                 which would override this file"
            ));
        }
    }
    Ok(())
}

/// Whether `path` names a place in the image: absolute, never climbing out with `..`.
pub(super) fn inside_image(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|c| c == "..")
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    #[serde(default)]
    pub variant: BootstrapVariant,
    /// Files in the tree before any package is unpacked, owned by root: what packages
    /// read while they install (Debian writes `/etc/kernel-img.conf` before the kernel).
    #[serde(default)]
    pub files: Vec<BootstrapFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapFile {
    pub path: String,
    pub content: String,
    #[serde(default = "default_file_mode")]
    pub mode: Mode,
}

/// mmdebstrap's variants, by mmdebstrap's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum BootstrapVariant {
    #[default]
    Minbase,
    Essential,
    Apt,
    Required,
    Important,
    Standard,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub path: String,
    pub content: String,
    #[serde(default = "default_file_mode")]
    pub mode: Mode,
    #[serde(default = "root")]
    pub owner: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Copy {
    pub from: String,
    pub to: String,
    #[serde(default = "root")]
    pub owner: String,
    /// What `from` is on the host, found while loading the recipe so that planning
    /// reads nothing from disk.
    #[serde(skip_deserializing)]
    pub source: Option<super::HostSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// A shell script (run with `sh -e`)...
    pub script: Option<String>,
    /// ...or a command.
    pub command: Option<Vec<String>>,
    /// Inside the image (the default) or in the helper VM, with the image at /target.
    #[serde(default = "yes")]
    pub chroot: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How long it may take, instead of the recipe's `step_timeout`.
    pub timeout: Option<super::Timeout>,
    /// Whether the build may reuse the image as a previous build left it after this
    /// step. imgvm knows a script only by its text: one that fetches something, or reads
    /// the date, says `cache: false`, and then runs, with every step after it, in every
    /// build.
    #[serde(default = "yes")]
    pub cache: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AptSources {
    /// deb822 `.sources` files (the default) or one-line `.list` files.
    #[serde(default)]
    pub format: SourcesFormat,
    /// The file name, without directory or extension.
    pub name: String,
    pub entries: Vec<SourceEntry>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourcesFormat {
    #[default]
    Deb822,
    List,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fstab {
    #[serde(default)]
    pub by: FstabKey,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootloader {
    /// Appended to the kernel command line (the serial console is always on it).
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub timeout: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finalize {
    /// Run fstrim on the filesystems so the image stays sparse.
    #[serde(default = "yes")]
    pub trim: bool,
}

/// An offline check of the built image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Test {
    File(FileTest),
    /// Installed and configured (at a version, if given).
    Package(PackageTest),
    /// A systemd unit that is enabled.
    Service(String),
    /// A script in the image's chroot that must exit 0.
    Command(CommandTest),
    /// Paths matching a glob exist (or, with `absent`, none does).
    Glob(GlobTest),
    /// Rules every entry of /etc/passwd must follow.
    Users(AccountsTest),
    /// Rules every entry of /etc/group must follow (no `shells`).
    Groups(AccountsTest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobTest {
    pub pattern: String,
    #[serde(default)]
    pub absent: bool,
}

/// Each rule given is one check of every entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsTest {
    /// Entries that must exist.
    #[serde(default)]
    pub required: Vec<String>,
    /// The allowed names (with `prefixes`, the only ones).
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    pub ids: Option<IdRule>,
    /// Allowed shells per user name; `"*"` lists those every user may have.
    #[serde(default)]
    pub shells: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdRule {
    pub below: u32,
    #[serde(default)]
    pub also: Vec<u32>,
}

/// Expectations about one path; with none given, that it exists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTest {
    pub path: String,
    #[serde(default)]
    pub absent: bool,
    /// A file of size 0, or a directory without entries.
    #[serde(default)]
    pub empty: bool,
    /// An exact line the file has.
    pub contains: Option<String>,
    /// An extended regular expression (grep -E) some line matches.
    pub matches: Option<String>,
    pub mode: Option<Mode>,
    /// `user` or `user:group`.
    pub owner: Option<String>,
    /// `file`, `directory` or `symlink` (not followed).
    pub kind: Option<FileKind>,
    /// The whole content, exactly.
    pub content: Option<String>,
    /// A directory holding nothing but these names.
    pub only: Option<Vec<String>>,
    /// The other expectations hold if the path exists; absent passes.
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageTest {
    pub name: String,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandTest {
    /// What the report calls the check.
    pub name: String,
    pub run: String,
}

/// An octal file mode (`0644`, `"0600"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match u32::from_str_radix(&s, 8) {
            Ok(mode) if mode <= 0o7777 => Ok(Mode(mode)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid file mode `{s}`: expected octal such as 0644"
            ))),
        }
    }
}

fn default_file_mode() -> Mode {
    Mode(0o644)
}
fn root() -> String {
    "root".into()
}
fn yes() -> bool {
    true
}
