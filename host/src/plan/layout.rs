//! The disk layout: partition numbers, devices and Debian's partition type GUIDs.

use super::identity::Identity;
use crate::arch::Arch;
use crate::recipe::{Partition, PartitionKind, Recipe, TableKind};
use imgvm_protocol::PartitionSpec;

/// The image while it is built, as the helper VM sees it: its first virtio disk.
pub const DISK: &str = "/dev/vda";

/// The empty second disk that the finished image is sealed onto
/// ([`imgvm_protocol::Seal`]), which becomes the output.
pub const SEALED: &str = "/dev/vdb";

/// The kernel's name for partition `number` of the image.
pub fn device(number: u32) -> String {
    device_of(DISK, number)
}

/// The kernel's name for partition `number` of `disk`.
pub fn device_of(disk: &str, number: u32) -> String {
    format!("{disk}{number}")
}

/// The number each partition gets: its own, else its position.
pub fn numbered(partitions: &[Partition]) -> Vec<(u32, &Partition)> {
    partitions
        .iter()
        .enumerate()
        .map(|(i, p)| (p.number.unwrap_or(i as u32 + 1), p))
        .collect()
}

/// The partition table's entries in list order, so the last one (root) is physically last
/// whatever its number.
pub fn partition_specs(recipe: &Recipe, ids: &Identity) -> Vec<PartitionSpec> {
    let gpt = recipe.table == TableKind::Gpt;
    numbered(&recipe.partitions)
        .into_iter()
        .map(|(number, part)| PartitionSpec {
            number,
            uuid: gpt.then(|| ids.uuid(&format!("partition {}", part.name))),
            size_bytes: part.size.map(|s| s.bytes()),
            type_code: type_code(part.kind, recipe.arch, gpt).into(),
            name: part.name.clone(),
            bootable: !gpt && (part.mount.as_deref() == Some("/") || part.kind == PartitionKind::Esp),
        })
        .collect()
}

/// GPT type GUIDs as Debian's images use them; MBR type bytes otherwise.
fn type_code(kind: PartitionKind, arch: Arch, gpt: bool) -> &'static str {
    if !gpt {
        return match kind {
            PartitionKind::Esp => "ef",
            PartitionKind::Prep => "41",
            PartitionKind::Swap => "82",
            _ => "83",
        };
    }
    match kind {
        PartitionKind::BiosBoot => "21686148-6449-6E6F-744E-656564454649",
        PartitionKind::Esp => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        PartitionKind::Prep => "9E1A2D38-C612-4316-AA26-8B49521E5A8B",
        PartitionKind::Swap => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        PartitionKind::Linux => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        PartitionKind::Root => match arch {
            Arch::Amd64 => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            Arch::Arm64 => "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
            Arch::Ppc64el => "C31C45E6-3F39-412E-80FB-4809C4980599",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_partitions_have_each_architectures_discoverable_type() {
        // The Discoverable Partitions Specification's root types, as Debian's images use.
        let root = |arch| type_code(PartitionKind::Root, arch, true);
        assert_eq!(root(Arch::Amd64), "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
        assert_eq!(root(Arch::Arm64), "B921B045-1DF0-41C3-AF44-4C6F280D3FAE");
        assert_eq!(root(Arch::Ppc64el), "C31C45E6-3F39-412E-80FB-4809C4980599");
    }

    #[test]
    fn boot_partitions_are_the_same_on_every_architecture() {
        for arch in Arch::ALL {
            assert_eq!(
                type_code(PartitionKind::Esp, arch, true),
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
            );
            assert_eq!(
                type_code(PartitionKind::BiosBoot, arch, true),
                "21686148-6449-6E6F-744E-656564454649"
            );
            assert_eq!(
                type_code(PartitionKind::Prep, arch, true),
                "9E1A2D38-C612-4316-AA26-8B49521E5A8B"
            );
        }
    }

    #[test]
    fn msdos_tables_use_type_bytes() {
        let mbr = |kind| type_code(kind, Arch::Amd64, false);
        assert_eq!(
            [
                mbr(PartitionKind::Esp),
                mbr(PartitionKind::Prep),
                mbr(PartitionKind::Swap),
                mbr(PartitionKind::Root)
            ],
            ["ef", "41", "82", "83"]
        );
    }
}
