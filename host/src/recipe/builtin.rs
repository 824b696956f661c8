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
