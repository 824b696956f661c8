//! Checks of the merged recipe as a whole: what no single field can know by itself.

use super::error::RecipeError;
use super::model::*;
use super::Recipe;
use crate::arch::Arch;
use std::collections::BTreeSet;

/// Room the partition table needs around the partitions: 1 MiB for alignment at the
/// start, 1 MiB for GPT's backup header at the end.
const TABLE_OVERHEAD: u64 = 2 << 20;

/// `locate` finds the file, line and column where a piece of text first appears.
pub fn check(recipe: &Recipe, locate: &dyn Fn(&str) -> (std::path::PathBuf, usize, usize)) -> Result<(), RecipeError> {
    let fail = |needle: &str, message: String| {
        let (file, line, column) = locate(needle);
        Err(RecipeError::new(file, line, column, message))
    };
    let arch = recipe.arch;
    let parts = &recipe.partitions;

    // Output files are named after the recipe: a name must not lead out of `-o`.
    let name = &recipe.name;
    let file_name = !name.is_empty()
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !file_name {
        return fail(
            "name:",
            format!(
                "name `{name}` is not a file name: use letters, digits, `.`, `_` and `-`, not starting with `.` or `-`"
            ),
        );
    }

    if recipe.table == TableKind::None {
        if parts.len() != 1 {
            return fail(
                "table:",
                format!("`table: none` takes exactly one partition, not {}", parts.len()),
            );
        }
    } else if parts.is_empty() {
        return fail("disk:", "disk.partitions: at least one partition is needed".into());
    }
    let mut names = BTreeSet::new();
    let mut mounts = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    let mut fixed = 0u64;
    for (i, part) in parts.iter().enumerate() {
        let here = format!("name: {}", part.name);
        let what = format!("partition `{}`", part.name);
        if !names.insert(&part.name) {
            return fail(&here, format!("{what}: another partition has the same name"));
        }
        match part.size {
            Some(size) => fixed += size.bytes(),
            None if i + 1 != parts.len() => {
                return fail(
                    &here,
                    format!("{what}: only the last partition may leave out `size` (it takes the rest of the disk)"),
                );
            }
            None => {}
        }
        let number = part.number.unwrap_or(i as u32 + 1);
        let max = if recipe.table == TableKind::Msdos { 4 } else { 128 };
        if number == 0 || number > max {
            return fail(
                &here,
                format!("{what}: partition number {number} is out of range 1..={max}"),
            );
        }
        if !numbers.insert(number) {
            return fail(&here, format!("{what}: partition number {number} is used twice"));
        }
        match (part.kind, part.filesystem) {
            (PartitionKind::BiosBoot | PartitionKind::Prep, Some(fs)) => {
                return fail(
                    &here,
                    format!(
                        "{what}: a {} partition holds no filesystem, not {}",
                        part.kind.name(),
                        fs.name()
                    ),
                );
            }
            (PartitionKind::Esp, fs) if fs != Some(Filesystem::Vfat) => {
                return fail(
                    &here,
                    format!("{what}: an EFI system partition needs `filesystem: vfat`"),
                );
            }
            _ => {}
        }
        if let Some(uuid) = &part.uuid {
            let hex_groups = |lens: &[usize]| {
                let groups: Vec<&str> = uuid.split('-').collect();
                groups.len() == lens.len()
                    && groups
                        .iter()
                        .zip(lens)
                        .all(|(g, &n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
            };
            let (ok, form) = match part.filesystem {
                None => return fail(&here, format!("{what}: has a uuid but no filesystem")),
                Some(Filesystem::Vfat) => (hex_groups(&[4, 4]), "ABCD-1234"),
                Some(_) => (hex_groups(&[8, 4, 4, 4, 12]), "01234567-89ab-cdef-0123-456789abcdef"),
            };
            if !ok {
                return fail(uuid, format!("{what}: uuid `{uuid}` is not of the form {form}"));
            }
        }
        let arch_ok = match part.kind {
            PartitionKind::BiosBoot => arch == Arch::Amd64 && recipe.table == TableKind::Gpt,
            PartitionKind::Prep => arch == Arch::Ppc64el,
            PartitionKind::Esp => arch != Arch::Ppc64el,
            _ => true,
        };
        if !arch_ok {
            let table = recipe.table.name();
            return fail(
                &here,
                format!(
                    "{what}: type {} does not fit {arch} with a {table} table",
                    part.kind.name()
                ),
            );
        }
        if let Some(mount) = &part.mount {
            if !mount.starts_with('/') {
                return fail(&here, format!("{what}: mount point `{mount}` is not absolute"));
            }
            if matches!(part.filesystem, None | Some(Filesystem::Swap)) {
                return fail(&here, format!("{what}: is mounted at {mount} but has no filesystem"));
            }
            if !mounts.insert(mount.as_str()) {
                return fail(&here, format!("{what}: another partition is mounted at {mount}"));
            }
        }
    }
    if !mounts.contains("/") {
        return fail("partitions:", "disk.partitions: no partition is mounted at /".into());
    }
    if fixed + TABLE_OVERHEAD > recipe.disk_size.bytes() {
        return fail(
            "size:",
            format!(
                "the partitions need {} but the disk is {}",
                super::size::Size(fixed + TABLE_OVERHEAD),
                recipe.disk_size
            ),
        );
    }

    if let Some(vendor) = &recipe.vendor {
        let valid = !vendor.is_empty()
            && vendor
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return fail(
                "vendor:",
                format!("vendor `{vendor}`: use lowercase letters, digits and `-`, as Debian's vendor names do"),
            );
        }
    }
    let last = recipe.steps.len() - 1;
    let mut outputs = BTreeSet::new();
    for format in &recipe.outputs {
        if !outputs.insert(format.name()) {
            return fail("outputs:", format!("output {} is listed twice", format.name()));
        }
        if *format == OutputFormat::Qcow2Compressed && recipe.outputs.contains(&OutputFormat::Qcow2) {
            return fail(
                "outputs:",
                "qcow2 and qcow2-compressed would both be NAME.qcow2: choose one".into(),
            );
        }
        if *format == OutputFormat::Vhd && !recipe.disk_size.bytes().is_multiple_of(1 << 20) {
            return fail(
                "outputs:",
                "a vhd output needs a disk size that is a whole number of MiB (Azure)".into(),
            );
        }
    }
    for (i, step) in recipe.steps.iter().enumerate() {
        let what = format!("step {} ({})", i + 1, step.kind());
        let needle = format!("- {}:", step.kind());
        if let Err(problem) = step.check() {
            return fail(
                problem.at.as_deref().unwrap_or(&needle),
                format!("{what}: {}", problem.message),
            );
        }
        // What a step cannot know by itself: its place, the host, the disk.
        match step {
            Step::Bootstrap(_) if i != 0 => return fail(&needle, format!("{what}: bootstrap must be the first step")),
            Step::Finalize(_) if i != last => return fail(&needle, format!("{what}: finalize must be the last step")),
            Step::Bootloader(_) if i + 1 != last => {
                return fail(
                    &needle,
                    format!("{what}: a second bootloader step; GRUB's settings have one owner, the recipe's one bootloader step"),
                )
            }
            Step::Copy(copy) => {
                let source = recipe.dir().join(&copy.from);
                if !source.exists() {
                    return fail(
                        &copy.from,
                        format!(
                            "{what}: `{}` does not exist (looked for {})",
                            copy.from,
                            source.display()
                        ),
                    );
                }
            }
            Step::Bootloader(_) => {
                let has = |kind| parts.iter().any(|p| p.kind == kind);
                let ok = recipe.table != TableKind::None
                    && match arch {
                        Arch::Amd64 => {
                            has(PartitionKind::Esp) || has(PartitionKind::BiosBoot) || recipe.table == TableKind::Msdos
                        }
                        Arch::Arm64 => has(PartitionKind::Esp),
                        Arch::Ppc64el => has(PartitionKind::Prep),
                    };
                if !ok {
                    let need = match arch {
                        Arch::Amd64 => "an esp or a bios-boot partition",
                        Arch::Arm64 => "an esp partition",
                        Arch::Ppc64el => "a prep partition",
                    };
                    return fail(&needle, format!("{what}: a bootable {arch} disk needs {need}"));
                }
            }
            _ => {}
        }
    }
    for (i, test) in recipe.tests.iter().enumerate() {
        let what = format!("test {}", i + 1);
        match test {
            Test::File(f) => {
                if !super::model::inside_image(&f.path) {
                    return fail(
                        &f.path,
                        format!("{what}: path `{}` is not an absolute path without `..`", f.path),
                    );
                }
                // What the plan would check: `absent` alone, or not at all.
                let others = crate::plan::file_expectations(f).len() > 1 || f.optional;
                if f.absent && others {
                    return fail(
                        &f.path,
                        format!(
                            "{what}: `{}` cannot be absent and have contents, a kind, a mode or an owner, or be optional",
                            f.path
                        ),
                    );
                }
            }
            Test::Glob(g) if !super::model::inside_image(&g.pattern) => {
                return fail(
                    &g.pattern,
                    format!("{what}: glob `{}` is not an absolute path without `..`", g.pattern),
                );
            }
            Test::Groups(a) if !a.shells.is_empty() => {
                return fail(
                    "shells:",
                    format!("{what}: groups have no shells (`shells` is for `users`)"),
                );
            }
            Test::Users(a) | Test::Groups(a) if crate::plan::account_expectations(a).is_empty() => {
                let needle = if matches!(test, Test::Users(_)) {
                    "users:"
                } else {
                    "groups:"
                };
                return fail(
                    needle,
                    format!("{what}: give at least one of `required`, `names`, `prefixes`, `ids`, `shells`"),
                );
            }
            Test::Command(c) if c.name.trim().is_empty() => {
                return fail("- command:", format!("{what}: a command check needs a `name`"));
            }
            _ => {}
        }
    }
    Ok(())
}
