//! Locks: `imgvm lock` pins what a recipe installs, a build beside the lock installs
//! exactly that, a lock naming a package the mirror no longer has fails the build
//! before any VM starts, naming the package, and two builds from one lock are the same
//! image, byte for byte: one from the states `imgvm lock` left in the step cache, one
//! from an empty disk after the mirror dropped a locked package, which then comes from
//! the recipe's `snapshot:`.

use imgvm_e2e::mirror::{Fault, Mirror};
use imgvm_e2e::{give_to_user, imgvm, run_ok, user_cache_dir, workdir};
use std::process::Command;
use std::time::{Duration, Instant};

/// The smallest recipe that bootstraps (mmdebstrap's `essential` variant), on Debian's
/// amd64 layout: a GPT with BIOS boot, an ESP with a file in a directory, and root. Its
/// mirror (`MIRROR`) is local, so that it can lose a package.
const RECIPE: &str = "name: locked
suite: trixie
mirror: MIRROR
disk:
  size: 1GiB
  table: gpt
  partitions:
    - {name: bios, type: bios-boot, number: 14, size: 1MiB}
    - {name: esp, type: esp, number: 15, size: 32MiB, filesystem: vfat, mount: /boot/efi}
    - {name: root, type: root, number: 1, filesystem: ext4, mount: /}
steps:
  - bootstrap: {variant: essential}
  - run: {script: 'mkdir -p /boot/efi/EFI/imgvm && echo hello > /boot/efi/EFI/imgvm/hello.txt'}
outputs: [raw, qcow2, rootfs]
";

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_build_follows_its_lock_and_a_lock_the_mirror_cannot_serve_fails_at_once() {
    let dir = workdir("lock");
    let (mirror, snapshot) = (Mirror::start(Fault::None), Mirror::start(Fault::None));
    let recipe = dir.join("locked.yaml");
    std::fs::write(&recipe, RECIPE.replace("MIRROR", &mirror.url)).unwrap();
    give_to_user(&recipe);
    // The same recipe naming a snapshot (another local mirror) for what its mirror lost.
    let with_snapshot = dir.join("with-snapshot.yaml");
    let text = RECIPE.replace("MIRROR", &mirror.url) + &format!("snapshot: {}\n", snapshot.url);
    std::fs::write(&with_snapshot, text).unwrap();
    give_to_user(&with_snapshot);

    // `imgvm lock` writes the lock beside the recipe, and nothing else there.
    let printed = run_ok(imgvm(["lock", "--trust-recipe", "--arch", "amd64"]).arg(&recipe));
    let lock_file = dir.join("locked-amd64.lock");
    assert_eq!(printed.trim(), lock_file.display().to_string());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["locked-amd64.lock", "locked.yaml", "with-snapshot.yaml"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&lock_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "a lock to commit, readable by all");
    let lock = json(&lock_file);
    let packages = lock["packages"].as_array().unwrap();
    assert!(packages.iter().any(|p| p["name"] == "dpkg"), "{lock}");
    // Without --update an existing lock is kept.
    let again = imgvm(["lock", "--trust-recipe", "--arch", "amd64"])
        .arg(&recipe)
        .output()
        .unwrap();
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
    let failed = imgvm(["build", "--trust-recipe", "--arch", "amd64", "--lock"])
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

    // A lock whose helper VM had another mke2fs: the build does not run its steps with
    // today's, it refuses before any VM starts.
    let mut other_helper = lock.clone();
    let e2fsprogs = other_helper["helper"]["packages"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == "e2fsprogs")
        .expect("the helper VM has e2fsprogs");
    let version = e2fsprogs["version"].as_str().unwrap().to_owned();
    e2fsprogs["version"] = "1.46.0-imgvm".into();
    let other_file = dir.join("other-helper.lock");
    std::fs::write(&other_file, serde_json::to_vec_pretty(&other_helper).unwrap()).unwrap();
    give_to_user(&other_file);
    let out = dir.join("out-other-helper");
    let started = Instant::now();
    let failed = imgvm(["build", "--trust-recipe", "--arch", "amd64", "--lock"])
        .arg(&other_file)
        .arg("-o")
        .arg(&out)
        .arg(&recipe)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("the lock's (~e2fsprogs 1.46.0-imgvm -> {version})")),
        "{stderr}"
    );
    assert!(!stderr.contains("helper VM up"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["locked-amd64.build-failed.log"], "only the failed build's log");

    // The build beside the lock follows it: it installs exactly the locked packages.
    // (This recipe names a snapshot too: a lock from its mirror is followed from the
    // mirror, as if it named none, while the mirror has everything.)
    let out = dir.join("out");
    let built = imgvm([
        "--log-format",
        "json",
        "build",
        "--trust-recipe",
        "--arch",
        "amd64",
        "-o",
    ])
    .arg(&out)
    .arg(&with_snapshot)
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stderr}");
    assert!(stderr.contains("following the lock"), "{stderr}");
    assert_eq!(
        snapshot.requests(),
        0,
        "the snapshot was asked while the mirror had everything"
    );
    let written = json(&out.join("locked-amd64.lock"));
    assert_eq!(written["packages"], lock["packages"]);
    assert_eq!(written["releases"], lock["releases"]);
    assert_eq!(written["source_date_epoch"], lock["source_date_epoch"]);
    assert_eq!(written["helper"], lock["helper"]);

    // That build started from the states `imgvm lock` left in the step cache; built again
    // from the same lock from an empty disk (`--no-cache`), after the mirror dropped
    // bash and imgvm's cache lost it: bash comes from the snapshot, the image names the
    // mirror as before, and the two are the same bytes; `imgvm diff` finds nothing.
    let cached = |out: &std::path::Path| -> Vec<String> {
        let manifest = json(&out.join("locked-amd64.manifest.json"));
        let steps = manifest["steps"].as_array().unwrap().iter();
        steps
            .filter(|s| s["cached"] == true)
            .map(|s| s["step"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        cached(&out),
        ["partition and format", "step 1/3 (bootstrap)", "step 2/3 (run)"]
    );
    let bash = lock["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bash")
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored_bash = user_cache_dir().join("archive/sha256").join(&bash);
    std::fs::remove_file(&stored_bash).unwrap();
    mirror.set_fault(Fault::Gone("bash"));
    let again = dir.join("out-again");
    run_ok(
        imgvm(["build", "--trust-recipe", "--no-cache", "--arch", "amd64", "-o"])
            .arg(&again)
            .arg(&with_snapshot),
    );
    assert_eq!(cached(&again), Vec::<String>::new());
    assert!(mirror.faults_served() > 0, "the mirror was not asked for bash");
    assert!(stored_bash.exists(), "bash did not come from the snapshot");
    assert_eq!(json(&again.join("locked-amd64.lock"))["mirror"], lock["mirror"]);
    let sums = |dir: &std::path::Path| -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
        // The manifest records the run (its times): everything else is the same.
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.ends_with(".manifest.json"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    // raw, qcow2, rootfs.tar, the lock and the SBOM.
    assert_eq!(sums(&out).len(), 5, "{:?}", sums(&out));
    assert_eq!(sums(&out), sums(&again), "two builds from one lock differ");
    run_ok(
        Command::new("sha256sum")
            .args(["--check", "--quiet", "SHA256SUMS"])
            .current_dir(&again),
    );
    let diff = imgvm(["diff"]).arg(&out).arg(&again).output().unwrap();
    assert_eq!(diff.status.code(), Some(0), "{diff:?}");

    // The image is whole, as tools outside imgvm read it: the GPT with its partitions,
    // a clean ext4, and the FAT with the file.
    let raw = again.join("locked-amd64.raw");
    let table: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new("sfdisk").arg("--json").arg(&raw))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{table}");
    let start = |name: &str| {
        let part = parts
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {table}"));
        part["start"].as_u64().unwrap() * 512
    };
    run_ok(
        Command::new("e2fsck")
            .arg("-fn")
            .arg(format!("{}?offset={}", raw.display(), start("root"))),
    );
    let esp = dir.join("esp.img");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", raw.display()))
            .arg(format!("of={}", esp.display()))
            .args(["bs=512", "count=65536", "status=none"])
            .arg(format!("skip={}", start("esp") / 512)),
    );
    let fsck = Command::new("fsck.vfat").args(["-n", "-l"]).arg(&esp).output().unwrap();
    assert!(fsck.status.success(), "{fsck:?}");
    assert!(
        String::from_utf8_lossy(&fsck.stdout).contains("/EFI/IMGVM/HELLO.TXT"),
        "{fsck:?}"
    );

    // File by file, the two images are the same; one whose file was changed after the
    // build (its mode, with debugfs) is named, and `diff` exits 1.
    let same = imgvm(["diff", "--files"]).arg(&out).arg(&again).output().unwrap();
    assert_eq!(same.status.code(), Some(0), "{same:?}");
    let changed = dir.join("out-changed");
    run_ok(
        Command::new("cp")
            .args(["-r", "--sparse=always"])
            .arg(&again)
            .arg(&changed),
    );
    give_to_user(&changed);
    let copy = changed.join("locked-amd64.raw");
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R", "sif /etc/hostname mode 0100600"])
            .arg(format!("{}?offset={}", copy.display(), start("root"))),
    );
    give_to_user(&copy);
    let differs = imgvm(["diff", "--files"]).arg(&out).arg(&changed).output().unwrap();
    assert_eq!(differs.status.code(), Some(1), "{differs:?}");
    assert_eq!(
        String::from_utf8_lossy(&differs.stdout),
        "~ file /etc/hostname (mode)\n"
    );
}
