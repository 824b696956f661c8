//! The identifiers a disk would otherwise get at random (GPT disk and partition GUIDs,
//! filesystem UUIDs, vfat volume ids, ext4 hash seeds), derived from the recipe's name,
//! the architecture and the build's `SOURCE_DATE_EPOCH`: a rebuild from the same lock
//! gets the same ones, the next day's image new ones, so that two images of different
//! days attached to one machine are not mistaken for each other. A recipe may still fix
//! a filesystem's UUID.

use crate::arch::Arch;
use sha2::{Digest, Sha256};

/// Derives the identifiers of one recipe's build.
pub struct Identity {
    seed: [u8; 32],
}

impl Identity {
    pub fn new(recipe: &str, arch: Arch, epoch: i64) -> Identity {
        let mut hash = Sha256::new();
        for part in [recipe, arch.debian(), &epoch.to_string()] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        Identity {
            seed: hash.finalize().into(),
        }
    }

    fn bytes(&self, what: &str) -> [u8; 16] {
        let digest = Sha256::new()
            .chain_update(self.seed)
            .chain_update(what.as_bytes())
            .finalize();
        digest[..16].try_into().expect("a SHA256 has 32 bytes")
    }

    /// A UUID for `what` (`partition root`, `filesystem root`): RFC 9562 version 8, the
    /// version for UUIDs made by a scheme of one's own.
    pub fn uuid(&self, what: &str) -> String {
        uuid_text(self.bytes(what), 8)
    }

    /// A vfat volume id (`ABCD-1234`).
    pub fn volume_id(&self, what: &str) -> String {
        let b = self.bytes(what);
        format!("{:02X}{:02X}-{:02X}{:02X}", b[0], b[1], b[2], b[3])
    }

    /// An MBR disk identifier (`0x1234abcd`).
    pub fn disk_id(&self) -> String {
        let b = self.bytes("disk");
        format!("0x{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
    }
}

/// `bytes` as a UUID of `version` (RFC 9562 variant), in its usual text form.
pub(crate) fn uuid_text(mut b: [u8; 16], version: u8) -> String {
    b[6] = (b[6] & 0x0f) | (version << 4);
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str, epoch: i64) -> Identity {
        Identity::new(name, Arch::Amd64, epoch)
    }

    #[test]
    fn identifiers_are_the_same_for_the_same_build_and_differ_otherwise() {
        let a = identity("web", 1_764_000_000);
        assert_eq!(
            a.uuid("partition root"),
            identity("web", 1_764_000_000).uuid("partition root")
        );
        assert_ne!(a.uuid("partition root"), a.uuid("filesystem root"));
        assert_ne!(
            a.uuid("partition root"),
            identity("web", 1_764_086_400).uuid("partition root")
        );
        assert_ne!(
            a.uuid("partition root"),
            identity("db", 1_764_000_000).uuid("partition root")
        );
        let arm64 = Identity::new("web", Arch::Arm64, 1_764_000_000);
        assert_ne!(a.uuid("partition root"), arm64.uuid("partition root"));
    }

    #[test]
    fn identifiers_have_their_formats() {
        let a = identity("web", 1_764_000_000);
        let uuid = a.uuid("filesystem root");
        let groups: Vec<usize> = uuid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{uuid}");
        assert_eq!(&uuid[14..15], "8", "version 8: {uuid}");
        assert!("89ab".contains(&uuid[19..20]), "RFC variant: {uuid}");
        let id = a.volume_id("filesystem esp");
        assert!(
            id.len() == 9
                && id.as_bytes()[4] == b'-'
                && id
                    .chars()
                    .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_lowercase()),
            "{id}"
        );
        let disk = a.disk_id();
        assert!(disk.starts_with("0x") && disk.len() == 10, "{disk}");
    }
}
