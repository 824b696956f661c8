//! Golden plans: what every shipped recipe asks the helper VM to do, per architecture,
//! as `imgvm build --dry-run --json --test` prints it. A change to planning shows up
//! here as a diff to review, without booting anything.
//!
//! `IMGVM_BLESS=1 cargo test -p imgvm --test plans` rewrites the files.

use imgvm::recipe::Recipe;
use std::path::{Path, PathBuf};

/// As `imgvm build --test` plans, built with `SOURCE_DATE_EPOCH=1764547200` (also in
/// tests/tests/build.rs, whose dry run must print these plans).
const SETTINGS: imgvm::plan::Settings = imgvm::plan::Settings {
    test: true,
    epoch: 1_764_547_200,
    image: true,
};

fn images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/plans")
}

/// Every shipped recipe: images/example.yaml and images/debian/*.yaml.
fn recipes() -> Vec<PathBuf> {
    let mut out = vec![images().join("example.yaml")];
    let mut debian: Vec<PathBuf> = std::fs::read_dir(images().join("debian"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    debian.sort();
    out.extend(debian);
    out
}

#[test]
fn plans_match_the_golden_files() {
    let bless = std::env::var_os("IMGVM_BLESS").is_some();
    let mut expected_files = Vec::new();
    let mut stale = Vec::new();
    for path in recipes() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        for arch in imgvm::arch::Arch::ALL {
            // A recipe that does not build this arch says so when loaded.
            let Ok(recipe) = Recipe::load(&path, Some(arch)) else {
                continue;
            };
            let plan = imgvm::plan::plan(&recipe, &SETTINGS);
            let json = serde_json::to_string_pretty(&plan).unwrap() + "\n";
            let file = format!("{stem}-{arch}.json");
            let golden = golden_dir().join(&file);
            expected_files.push(file.clone());
            if bless {
                std::fs::write(&golden, &json).unwrap();
            } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(json.as_str()) {
                stale.push(file);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "plans differ from host/tests/golden/plans/{stale:?}: review the change, then rerun with IMGVM_BLESS=1"
    );
    // Every golden file belongs to a recipe and arch that still exist.
    let mut present: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    // (Which arches each recipe builds is tests/recipes.rs's `shipped_recipes_are_valid`.)
    assert_eq!(present, expected_files, "golden plans without a recipe: remove them");
}
