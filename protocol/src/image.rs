//! Operations on the image being built.
//!
//! The host plans them from a recipe and decides everything that depends on the recipe
//! (devices, type GUIDs, grub targets, package names); the agent knows how each is done on
//! a Debian tree and does it as root. The image's root is mounted at [`TARGET`] in the
//! helper VM; paths inside operations are paths in the image unless a field says
//! otherwise.

use serde::{Deserialize, Serialize};

/// Where the image's root filesystem is mounted in the helper VM.
pub const TARGET: &str = "/target";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageOp {
    /// Writes a partition table on `disk` (or wipes its signatures when `table` is
    /// `None`) and waits for the partitions' device nodes.
    Partition {
        disk: String,
        table: Option<Table>,
        partitions: Vec<PartitionSpec>,
    },
    Mkfs(Mkfs),
    /// Mounts `device` at `path` in the image (`/` first).
    Mount {
        device: String,
        path: String,
    },
    /// mmdebstrap into the (empty) mounted root, through the guest's package proxy.
    Bootstrap(Bootstrap),
    /// Readies the tree for work in a chroot: pseudo filesystems, no service starts, and an
    /// apt configuration for the build that uses only `source` through the proxy.
    EnterChroot {
        source: AptSource,
    },
    Apt(Apt),
    /// The request's input stream becomes the file `path`.
    WriteFile {
        path: String,
        mode: u32,
        owner: String,
    },
    /// The request's input stream, a tar archive, is unpacked into the directory `path`.
    Unpack {
        path: String,
        owner: String,
    },
    /// A shell script, in the image's chroot or in the helper itself (where `TARGET` in
    /// its environment names the image's root).
    Script {
        script: String,
        env: Vec<(String, String)>,
        chroot: bool,
    },
    Users(Vec<User>),
    Hostname(String),
    Locale(String),
    Timezone(String),
    AptSources(AptSources),
    Services(Services),
    Fstab(Vec<FstabEntry>),
    Bootloader(Bootloader),
    /// What makes the image fresh at first boot: no build-time apt setup, caches, logs,
    /// machine id or ssh host keys; and the chroot's pseudo filesystems unmounted.
    Clean,
    /// Every installed package (answered with [`crate::Outcome::Packages`]).
    ListPackages,
    /// Offline checks of the finished tree (answered with [`crate::Outcome::Checks`], one
    /// result per check; a failing check is a result, not an error).
    Check(Vec<Check>),
    /// Unmounts the image (children first), trimming unused blocks first if asked.
    Unmount {
        trim: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Table {
    Gpt,
    Msdos,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSpec {
    pub number: u32,
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
pub enum Filesystem {
    Ext4,
    Xfs,
    Btrfs,
    Vfat,
    Swap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mkfs {
    pub device: String,
    pub filesystem: Filesystem,
    pub label: Option<String>,
    /// A filesystem UUID (for vfat a volume id such as `ABCD-1234`), for reproducible
    /// fstab entries.
    pub uuid: Option<String>,
    /// Extra arguments for the mkfs program (feature options).
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub suite: String,
    /// mmdebstrap's variant: minbase, apt, required, important, standard.
    pub variant: String,
    /// Debian's name for the architecture.
    pub arch: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub include: Vec<String>,
    /// OpenPGP keyring that signs the mirror's Release file (binary, not armoured).
    #[serde(with = "serde_bytes")]
    pub keyring: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AptSource {
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Apt {
    pub install: Vec<String>,
    pub remove: Vec<String>,
    pub purge: Vec<String>,
    pub upgrade: bool,
    pub recommends: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub shell: String,
    pub ssh_keys: Vec<String>,
    /// Passwordless sudo through a file in /etc/sudoers.d.
    pub sudo: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AptSources {
    /// File name in /etc/apt/sources.list.d, without extension.
    pub name: String,
    pub deb822: bool,
    pub entries: Vec<SourceEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEntry {
    pub types: Vec<String>,
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    pub mask: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FstabKey {
    Uuid,
    Partuuid,
    Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootloader {
    /// One grub-install per entry, run with the image's own grub in its chroot.
    pub installs: Vec<GrubInstall>,
    /// The kernel command line, serial console included.
    pub cmdline: String,
    /// Whether the kernel finds its root by PARTUUID (Debian's choice) rather than by
    /// filesystem UUID (for disks without a partition table).
    pub root_by_partuuid: bool,
    pub timeout: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrubInstall {
    /// Into the MBR gap or BIOS boot partition of `disk` (`i386-pc`).
    Bios { disk: String },
    /// To the removable path of the ESP mounted at /boot/efi, without NVRAM entries.
    Efi { target: String },
    /// Onto the PReP partition `device` (`powerpc-ieee1275`).
    Prep { device: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// One expectation about the finished image, tested without booting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Check {
    File {
        path: String,
        expect: FileExpect,
    },
    /// Installed (fully configured), at `version` if given.
    Package {
        name: String,
        version: Option<String>,
    },
    /// `systemctl is-enabled` says `enabled`.
    ServiceEnabled {
        name: String,
    },
    /// A shell script in the image's chroot exits 0.
    Command {
        script: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub passed: bool,
    pub expected: String,
    pub actual: String,
}
