//! The arguments of the operations on the image being built (listed, with their
//! replies, in [`crate::operations`]).
//!
//! The host plans them from a recipe and decides everything that depends on the recipe
//! (devices, type GUIDs, grub targets, package names); the agent knows how each is done on
//! a Debian tree and does it as root. The image's root is mounted at [`TARGET`] in the
//! helper VM; paths inside operations are paths in the image unless a field says
//! otherwise.
//!
//! Types that a recipe spells the same way (apt, services, users, sources) carry the
//! recipe's serde defaults too, so the recipe uses them as they are.

use serde::{Deserialize, Serialize};

/// Where the image's root filesystem is mounted in the helper VM.
pub const TARGET: &str = "/target";

// The operations: wire tag (append-only, never reused), argument type (below), name,
// reply type, and how logs and errors describe it. See `crate::operations`.
image_operations! {
    1 Partition "partition" -> (), |op| format!("partition {}", op.disk);
    2 Mkfs "mkfs" -> (), |op| format!("mkfs {} on {}", op.filesystem.name(), op.device);
    3 Mount "mount" -> (), |op| format!("mount {} at {}", op.device, op.path);
    4 Bootstrap "bootstrap" -> (), |op| format!("bootstrap {} {}", op.suite, op.arch);
    5 EnterChroot "enter-chroot" -> (), |_op| "prepare the chroot".into();
    6 Apt "apt" -> (), |op| format!("apt: install {:?}, remove {:?}, purge {:?}", op.install, op.remove, op.purge);
    7 WriteFile "write-file" -> (), |op| format!("write {}", op.path);
    8 Unpack "unpack" -> (), |op| format!("copy into {}", op.path);
    9 Script "script" -> (), |op| if op.chroot { "script in the image".into() } else { "script in the helper".into() };
    10 Users "users" -> (), |op| format!("users {}", op.0.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(", "));
    11 Hostname "hostname" -> (), |op| format!("hostname {}", op.0);
    12 Locale "locale" -> (), |op| format!("locale {}", op.0);
    13 Timezone "timezone" -> (), |op| format!("timezone {}", op.0);
    14 AptSources "apt-sources" -> (), |op| format!("apt sources {}", op.name);
    15 Services "services" -> (), |op| format!("services: enable {:?}, disable {:?}, mask {:?}", op.enable, op.disable, op.mask);
    16 Fstab "fstab" -> (), |op| format!("fstab with {} entries", op.0.len());
    17 Bootloader "bootloader" -> (), |op| format!("grub ({} installs), timeout {} s, `{}`", op.installs.len(), op.timeout, op.cmdline);
    18 Clean "clean" -> (), |_op| "clean the image".into();
    19 ListPackages "list-packages" -> Vec<Package>, |_op| "list installed packages".into();
    20 RunChecks "run-checks" -> Vec<CheckResult>, |op| format!("{} offline checks", op.0.len());
    21 Unmount "unmount" -> (), |_op| "unmount the image".into();
    22 Debconf "debconf" -> (), |op| format!("{} debconf answers", op.0.len());
    23 SourceDateEpoch "source-date-epoch" -> (), |op| format!("SOURCE_DATE_EPOCH={}", op.0);
    24 Seal "seal" -> (), |op| format!("seal {} into {} ({} filesystems from their trees)", op.from, op.to, op.filesystems.len());
    25 ListFiles "list-files" -> Vec<FileEntry>, |op| format!("list the files of {}", op.device);
    26 Freeze "freeze" -> (), |_op| "freeze the image's filesystems".into();
    27 Thaw "thaw" -> (), |_op| "thaw the image's filesystems".into();
    28 Prefetch "prefetch" -> (), |_op| "read the image's files ahead, in the background".into();
}

impl ImageOp {
    /// Whether the operation sets up the helper (its environment, its mounts) rather than
    /// changing the image: what a build that resumes from a stored state does again, in
    /// the order the plan has it, because a new helper VM has none of it.
    pub fn sets_up_helper(&self) -> bool {
        matches!(
            self,
            ImageOp::SourceDateEpoch(_) | ImageOp::Mount(_) | ImageOp::EnterChroot(_)
        )
    }
}

/// Writes a partition table on `disk` (or wipes its signatures when `table` is `None`)
/// and waits for the partitions' device nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Partition {
    pub disk: String,
    pub table: Option<Table>,
    pub partitions: Vec<PartitionSpec>,
    /// The GPT disk GUID (MBR: the disk identifier, `0x` and 8 hex digits); `None`
    /// lets sfdisk pick one at random.
    pub label_id: Option<String>,
}

/// Mounts `device` at `path` in the image (`/` first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Mount {
    pub device: String,
    pub path: String,
}

/// Readies the tree for work in a chroot: pseudo filesystems, no service starts, and an
/// apt configuration for the build that uses only `source` through the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct EnterChroot {
    pub source: AptSource,
}

/// The request's input stream becomes the file `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct WriteFile {
    pub path: String,
    pub mode: u32,
    pub owner: String,
}

/// The request's input stream, a tar archive, is unpacked into the directory `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Unpack {
    pub path: String,
    pub owner: String,
}

/// A shell script, in the image's chroot or in the helper itself (where `TARGET` in its
/// environment names the image's root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Script {
    pub script: String,
    pub env: Vec<(String, String)>,
    pub chroot: bool,
}

/// Accounts to create (password locked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Users(pub Vec<User>);

/// `/etc/hostname` and the `127.0.1.1` line of `/etc/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Hostname(pub String);

/// The default locale (`LANG`), generated unless it is built in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Locale(pub String);

/// A zone under /usr/share/zoneinfo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Timezone(pub String);

/// `/etc/fstab`, written whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Fstab(pub Vec<FstabEntry>);

/// What makes the image fresh at first boot: no build-time apt setup, caches, logs,
/// machine id or ssh host keys; and the chroot's pseudo filesystems unmounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Clean;

/// A small file given whole inside an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct TreeFile {
    pub path: String,
    pub mode: u32,
    pub content: crate::Bytes,
}

/// Every installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct ListPackages;

/// Offline checks of the finished tree, answered with one result per check in the same
/// order; a failing check is a result, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct RunChecks(pub Vec<Check>);

/// Brings every filesystem mounted below the image's root to a consistent state on its
/// disk and holds it there (`FIFREEZE`; a filesystem that cannot be frozen is synced), so
/// that the host can keep the disk as it is now: the state after a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Freeze;

/// Lets the filesystems [`Freeze`] held be written again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Thaw;

/// Starts reading the files of the image's root filesystem into the helper's memory in
/// the background, and answers at once. A build that resumes from a stored state boots
/// a helper that has read none of the image, and its last step (the seal) reads all of
/// it: read ahead while the steps before it run, it takes half as long. Bounded by the
/// helper's free memory; [`Unmount`] waits for it to stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Prefetch;

/// Unmounts the image (children first), trimming unused blocks first if asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Unmount {
    pub trim: bool,
}

/// Answers for debconf questions (`debconf-set-selections` in the image), so that
/// packages installed later configure themselves with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Debconf(pub Vec<DebconfAnswer>);

/// One line of `debconf-set-selections` input: `owner question type value`, e.g.
/// `locales locales/default_environment_locale select C.UTF-8`. Checked when read, on
/// either side, so that a malformed line never reaches debconf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct DebconfAnswer(String);

/// Only well-formed answers: a malformed one cannot be made, so it cannot round-trip.
#[cfg(feature = "arbitrary")]
impl proptest::arbitrary::Arbitrary for DebconfAnswer {
    type Parameters = ();
    type Strategy = proptest::strategy::BoxedStrategy<Self>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        use proptest::strategy::Strategy;
        "[a-z0-9-]{1,12} [a-z0-9/_-]{1,30} (string|boolean|select|multiselect|note) [ -~]{0,20}"
            .prop_map(|line| DebconfAnswer::new(&line).expect("the pattern is a valid answer"))
            .boxed()
    }
}

/// The types debconf knows (debconf-devel(7)).
const DEBCONF_TYPES: &[&str] = &[
    "string",
    "password",
    "boolean",
    "select",
    "multiselect",
    "note",
    "text",
    "title",
    "error",
];

impl DebconfAnswer {
    pub fn new(line: &str) -> Result<Self, String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if line.contains('\n') || fields.len() < 3 {
            return Err(format!(
                "invalid debconf answer `{line}`: expected one line `owner question type value`"
            ));
        }
        if !DEBCONF_TYPES.contains(&fields[2]) {
            return Err(format!(
                "invalid debconf answer `{line}`: `{}` is not a debconf type ({})",
                fields[2],
                DEBCONF_TYPES.join(", ")
            ));
        }
        Ok(DebconfAnswer(line.trim().to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for DebconfAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DebconfAnswer::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum Table {
    Gpt,
    Msdos,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct PartitionSpec {
    pub number: u32,
    /// The GPT partition GUID (PARTUUID); `None` lets sfdisk pick one at random.
    pub uuid: Option<String>,
    /// `None` takes the rest of the disk.
    pub size_bytes: Option<u64>,
    /// A GPT type GUID or an MBR type byte in hex.
    pub type_code: String,
    /// GPT partition name.
    pub name: String,
    /// MBR active flag.
    pub bootable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
    Xfs,
    Btrfs,
    Vfat,
    Swap,
}

impl Filesystem {
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
            Filesystem::Btrfs => "btrfs",
            Filesystem::Vfat => "vfat",
            Filesystem::Swap => "swap",
        }
    }
}

/// Makes a filesystem on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Mkfs {
    pub device: String,
    pub filesystem: Filesystem,
    pub label: Option<String>,
    /// A filesystem UUID (for vfat a volume id such as `ABCD-1234`), for reproducible
    /// fstab entries.
    pub uuid: Option<String>,
    /// ext4's directory hash seed (a UUID): with the UUID, what makes two ext4
    /// filesystems of the same tree the same bytes.
    pub hash_seed: Option<String>,
    /// Extra arguments for the mkfs program (feature options).
    pub options: Vec<String>,
}

/// Sets `SOURCE_DATE_EPOCH` (and `TZ=UTC`) for every program the agent starts from now
/// on: mmdebstrap, dpkg's maintainer scripts (shadow's password dates, the initramfs),
/// mke2fs and mtools then stamp the build's date instead of the day it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct SourceDateEpoch(pub i64);

/// Writes the finished image onto a second, empty disk so that the same tree always
/// becomes the same bytes: every filesystem in `filesystems` is made anew on `to`,
/// populated from its tree as mounted below [`TARGET`] (in name order, times clamped to
/// `SOURCE_DATE_EPOCH`), and everything else of `from` (partition tables, boot code,
/// partitions without such a filesystem) is copied as it is. A filesystem written by
/// the kernel holds the times and the allocation order of the build; one made by
/// `mke2fs -d` or `mkfs.vfat --invariant` and mtools holds neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Seal {
    pub from: String,
    pub to: String,
    pub filesystems: Vec<SealedFilesystem>,
}

/// Mounts `device` (a filesystem of a finished image) read-only and lists everything in
/// it, in path order, for `imgvm diff --files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct ListFiles {
    pub device: String,
    pub filesystem: Filesystem,
}

/// One file of a filesystem, as `imgvm diff` compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct FileEntry {
    /// From the filesystem's root, starting with `/` (not valid UTF-8: lossily).
    pub path: String,
    /// `f` file, `d` directory, `l` symlink, `c`/`b` device, `p` fifo, `s` socket.
    pub kind: char,
    /// Permission bits, with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    /// A symlink's target.
    pub target: Option<String>,
    /// A device's number.
    pub rdev: u64,
    /// A regular file's content.
    pub sha256: Option<String>,
}

/// One filesystem of the sealed disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct SealedFilesystem {
    /// Its partition number on both disks; `None` when it is the whole disk.
    pub partition: Option<u32>,
    /// Where its tree is mounted, below [`TARGET`].
    pub mount: String,
    /// How it is made on `to` (ext4 or vfat).
    pub mkfs: Mkfs,
}

/// mmdebstrap into the (empty) mounted root, through the guest's package proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Bootstrap {
    /// Written into the tree, owned by root, before any package is unpacked: settings that
    /// packages read while they install, such as `/etc/kernel-img.conf`.
    pub files: Vec<TreeFile>,
    pub suite: String,
    /// mmdebstrap's variant: minbase, apt, required, important, standard.
    pub variant: String,
    /// Debian's name for the architecture.
    pub arch: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub include: Vec<String>,
    /// OpenPGP keyring that signs the mirror's Release file (binary, not armoured).
    pub keyring: crate::Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct AptSource {
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
}

/// One apt run: removals and purges, then an upgrade if asked, then installs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct Apt {
    pub install: Vec<String>,
    pub remove: Vec<String>,
    pub purge: Vec<String>,
    pub upgrade: bool,
    pub recommends: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "bash")]
    pub shell: String,
    /// Authorized SSH keys. The password is always locked.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Passwordless sudo through a file in /etc/sudoers.d.
    #[serde(default)]
    pub sudo: bool,
}

fn bash() -> String {
    "/bin/bash".into()
}

/// A sources file in /etc/apt/sources.list.d.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct AptSources {
    /// File name in /etc/apt/sources.list.d, without extension.
    pub name: String,
    pub deb822: bool,
    pub entries: Vec<SourceEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    #[serde(default = "deb")]
    pub types: Vec<String>,
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

fn deb() -> Vec<String> {
    vec!["deb".into()]
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(default, deny_unknown_fields)]
pub struct Services {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    pub mask: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "lowercase")]
pub enum FstabKey {
    #[default]
    Uuid,
    Partuuid,
    Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct FstabEntry {
    /// The helper's device, whose key the agent reads with blkid.
    pub device: String,
    pub key: FstabKey,
    /// `none` for swap.
    pub mount: String,
    pub filesystem: Filesystem,
    pub options: String,
    pub pass: u8,
}

/// GRUB, and its settings: the one owner of `/etc/default/grub.d/99_imgvm.cfg`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Bootloader {
    /// One grub-install per entry, run with the image's own grub in its chroot.
    pub installs: Vec<GrubInstall>,
    /// The kernel command line, serial console included.
    pub cmdline: String,
    /// Whether the kernel finds its root by PARTUUID (Debian's choice) rather than by
    /// filesystem UUID (for disks without a partition table).
    pub root_by_partuuid: bool,
    /// Seconds the menu waits.
    pub timeout: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum GrubInstall {
    /// Into the MBR gap or BIOS boot partition of `disk` (`i386-pc`).
    Bios { disk: String },
    /// To the removable path of the ESP mounted at /boot/efi, without NVRAM entries.
    Efi { target: String },
    /// Onto the PReP partition `device` (`powerpc-ieee1275`).
    Prep { device: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// dpkg's `Multi-Arch` field (`same`, `foreign`, `allowed`), empty when it has none:
    /// Debian's build manifest names a `same` package `name:arch`, since several
    /// architectures of it can be installed together. Absent in manifests of imgvm
    /// before it was recorded.
    #[serde(default)]
    pub multi_arch: String,
}

/// One expectation about the finished image, tested without booting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// `expect` about `path`; when `optional`, a path that does not exist passes too.
    File {
        path: String,
        expect: FileExpect,
        optional: bool,
    },
    /// Some path matches the glob `pattern` (`*`, `?`, `[...]` per component; `*` does
    /// not match a leading dot), or, when `absent`, none does.
    Glob { pattern: String, absent: bool },
    /// An expectation about every entry of `/etc/passwd` or `/etc/group`.
    Accounts {
        database: AccountDatabase,
        expect: AccountExpect,
    },
    /// Installed (fully configured), at `version` if given.
    Package { name: String, version: Option<String> },
    /// `systemctl is-enabled` says `enabled`.
    ServiceEnabled { name: String },
    /// A shell script in the image's chroot exits 0.
    Command { script: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum FileExpect {
    Exists,
    Absent,
    /// A regular file of size 0, or a directory without entries.
    Empty,
    /// Has this exact line.
    ContainsLine(String),
    /// Has a line matching this extended regular expression (grep -E).
    Matches(String),
    Mode(u32),
    /// `user:group` by name, as the image's own passwd and group files say.
    Owner(String),
    /// Is of this kind (symlinks are not followed).
    Kind(FileKind),
    /// Has exactly this content.
    Content(String),
    /// A directory whose entries are all among these names.
    Only(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum AccountDatabase {
    /// `/etc/passwd`: users.
    Passwd,
    /// `/etc/group`: groups.
    Group,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "kebab-case")]
pub enum AccountExpect {
    /// These entries exist.
    Present(Vec<String>),
    /// Every entry's name is one of `names` or starts with one of `prefixes`.
    Names { names: Vec<String>, prefixes: Vec<String> },
    /// Every entry's id is below `below` or one of `also`.
    Ids { below: u32, also: Vec<u32> },
    /// Every user's shell is one listed for its name or for `*` (passwd only).
    Shells(Vec<(String, Vec<String>)>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct CheckResult {
    pub passed: bool,
    pub expected: String,
    pub actual: String,
}
