//! Locks: `imgvm lock` pins what a recipe installs, a build beside the lock installs
//! exactly that, and a lock naming a package the mirror no longer has fails the build
//! before any VM starts, naming the package.

use imgvm_e2e::{give_to_user, imgvm, run_ok, workdir};
use std::time::{Duration, Instant};

/// The smallest recipe that bootstraps: mmdebstrap's `essential` variant.
const RECIPE: &str = "name: locked
suite: trixie
disk:
  size: 1GiB
  table: none
  partitions:
    - {name: root, type: root, filesystem: ext4, mount: /}
steps:
  - bootstrap: {variant: essential}
outputs: [raw]
";

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_build_follows_its_lock_and_a_lock_the_mirror_cannot_serve_fails_at_once() {
    let dir = workdir("lock");
    let recipe = dir.join("locked.yaml");
    std::fs::write(&recipe, RECIPE).unwrap();
    give_to_user(&recipe);

    // `imgvm lock` writes the lock beside the recipe, and nothing else there.
    let printed = run_ok(imgvm(["lock", "--arch", "amd64"]).arg(&recipe));
    let lock_file = dir.join("locked-amd64.lock");
    assert_eq!(printed.trim(), lock_file.display().to_string());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["locked-amd64.lock", "locked.yaml"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&lock_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "a lock to commit, readable by all");
    let lock = json(&lock_file);
    let packages = lock["packages"].as_array().unwrap();
    assert!(packages.iter().any(|p| p["name"] == "dpkg"), "{lock}");
    // Without --update an existing lock is kept.
    let again = imgvm(["lock", "--arch", "amd64"]).arg(&recipe).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--update"), "{again:?}");

    // A lock naming a version the mirror does not have: refused before anything starts.
    let mut stale = lock.clone();
    let bash = stale["packages"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == "bash")
        .expect("bash is essential");
    bash["version"] = "0.1-imgvm".into();
    bash["filename"] = "pool/main/b/bash/bash_0.1-imgvm_amd64.deb".into();
    bash["sha256"] = "0".repeat(64).into();
    let stale_file = dir.join("stale.lock");
    std::fs::write(&stale_file, serde_json::to_vec_pretty(&stale).unwrap()).unwrap();
    give_to_user(&stale_file);
    let out = dir.join("out-stale");
    let started = Instant::now();
    let failed = imgvm(["build", "--arch", "amd64", "--lock"])
        .arg(&stale_file)
        .arg("-o")
        .arg(&out)
        .arg(&recipe)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the mirror no longer has 1 package(s)") && stderr.contains("bash 0.1-imgvm (amd64)"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    assert!(!out.exists(), "the refused build started: {} exists", out.display());

    // The build beside the lock follows it: it installs exactly the locked packages.
    let out = dir.join("out");
    let built = imgvm(["--log-format", "json", "build", "--arch", "amd64", "-o"])
        .arg(&out)
        .arg(&recipe)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stderr}");
    assert!(stderr.contains("following the lock"), "{stderr}");
    let written = json(&out.join("locked-amd64.lock"));
    assert_eq!(written["packages"], lock["packages"]);
    assert_eq!(written["releases"], lock["releases"]);
}
