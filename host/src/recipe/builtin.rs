//! The recipes in images/debian, compiled in: `imgvm build` without a recipe builds
//! [`DEFAULT`] from them.

/// Debian stable, nocloud.
pub const DEFAULT: &str = "trixie-nocloud.yaml";

const FILES: &[(&str, &str)] = &[
    (
        "trixie-nocloud.yaml",
        include_str!("../../../images/debian/trixie-nocloud.yaml"),
    ),
    (
        "parts/common.yaml",
        include_str!("../../../images/debian/parts/common.yaml"),
    ),
    (
        "parts/kernel-base.yaml",
        include_str!("../../../images/debian/parts/kernel-base.yaml"),
    ),
    (
        "parts/nocloud.yaml",
        include_str!("../../../images/debian/parts/nocloud.yaml"),
    ),
    (
        "parts/netplan.yaml",
        include_str!("../../../images/debian/parts/netplan.yaml"),
    ),
    (
        "parts/time-systemd.yaml",
        include_str!("../../../images/debian/parts/time-systemd.yaml"),
    ),
];

/// Writes the built-in recipes to a temporary directory, which the caller keeps for as
/// long as the recipe is used.
pub fn materialize() -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("imgvm-recipe-").tempdir()?;
    for (name, text) in FILES {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(path, text)?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use crate::arch::Arch;
    use crate::recipe::Recipe;

    /// The compiled-in default is images/debian's, with every part it extends: a part
    /// missing from [`super::FILES`] would make `imgvm build` without a recipe fail.
    #[test]
    fn the_builtin_default_is_the_shipped_recipe() {
        let dir = super::materialize().unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/debian");
        for arch in Arch::ALL {
            let builtin = Recipe::load(&dir.path().join(super::DEFAULT), Some(arch)).unwrap();
            let file = Recipe::load(&shipped.join(super::DEFAULT), Some(arch)).unwrap();
            let json = |r: &Recipe| serde_json::to_value((&r.packages, &r.steps, &r.tests, &r.outputs)).unwrap();
            assert_eq!(json(&builtin), json(&file), "{arch}");
        }
    }
}
