//! Builds that cannot succeed say why, in the words of the step that failed, and leave
//! nothing behind but the failed build's log.

use imgvm_e2e::{imgvm, workdir};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

/// Builds `recipe` (written into `dir`) and returns imgvm's stderr and the log it left.
/// From an empty disk: what the build fetches must not depend on what earlier runs left
/// in the step cache.
fn failed_build(dir: &Path, name: &str, recipe: &str) -> (String, String) {
    let (_, stderr, log) = failed_build_with(dir, name, recipe, None);
    (stderr, log)
}

/// [`failed_build`] with `--debug-shell` when given what to type in that shell: imgvm's
/// stdout (the shell's output), stderr and the log.
fn failed_build_with(dir: &Path, name: &str, recipe: &str, debug_shell: Option<&str>) -> (String, String, String) {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, recipe).unwrap();
    let out = dir.join(format!("out-{name}"));
    let mut cmd = imgvm(["--log-format", "json", "build", "--no-cache"]);
    cmd.arg(&file).args(["--arch", "amd64", "-o"]).arg(&out);
    if debug_shell.is_some() {
        cmd.arg("--debug-shell");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(debug_shell.unwrap_or("").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "the build should fail:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let log_name = format!("{name}-amd64.build-failed.log");
    assert_eq!(
        left,
        std::slice::from_ref(&log_name),
        "only the log of the failed build may remain"
    );
    let log = std::fs::read_to_string(out.join(log_name)).unwrap();
    (stdout, stderr, log)
}

const DISK: &str = "disk:
  size: SIZE
  table: none
  partitions:
    - {name: root, type: root, filesystem: ext4, mount: /}
";

#[test]
fn a_missing_package_and_a_full_disk_are_named() {
    let dir = workdir("build-errors");

    let recipe = format!(
        "name: missing\nsuite: trixie\n{}steps:\n  - bootstrap: {{variant: apt}}\n  - apt: {{install: [imgvm-no-such-package]}}\n",
        DISK.replace("SIZE", "1GiB")
    );
    let (stderr, log) = failed_build(&dir, "missing", &recipe);
    let file = dir.join("missing.yaml");
    let expected = format!(
        "{}: step 2/3 (apt): package imgvm-no-such-package is not in the archive \
         (apt: E: Unable to locate package imgvm-no-such-package)",
        file.display()
    );
    assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    assert!(
        log.contains("== step 1/3 (bootstrap): "),
        "the log has the steps before:\n{log}"
    );

    // First a step that leaves a daemon behind, holding the step's output open: it must
    // not hang the build (the agent kills what a step leaves running in the image).
    let recipe = format!(
        "name: full\nsuite: trixie\n{}steps:\n  \
         - bootstrap: {{variant: apt}}\n  \
         - run: {{script: 'setsid sleep 100000 & echo daemon started'}}\n  \
         - run: {{script: 'dd if=/dev/zero of=/filler bs=1M'}}\n",
        DISK.replace("SIZE", "700MiB")
    );
    // With --debug-shell, the shell opens in the image as the failed step left it (the
    // filler there), and the build still fails as it would have.
    let typed = "echo in the image: $(cat /etc/debian_version) $(ls /filler); exit 3\n";
    let (stdout, stderr, log) = failed_build_with(&dir, "full", &recipe, Some(typed));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("in the image: 13") && l.ends_with(" /filler")),
        "the debug shell's output:\n{stdout}\n{stderr}"
    );
    assert!(log.contains("== step 2/4 (run): "), "the daemon step ended:\n{log}");
    // The same bootstrap again: every package comes from the cache the first one filled.
    let (downloaded, cached) = imgvm_e2e::log_fields(&stderr, "downloaded_debs", "cached_debs");
    assert_eq!(downloaded, 0, "the second build downloaded packages");
    assert!(
        cached > 50,
        "the second build took only {cached} packages from the cache"
    );
    let file = dir.join("full.yaml");
    let expected = format!(
        "{}: step 3/4 (run): the image is full: dd: error writing '/filler': No space left on device",
        file.display()
    );
    assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    assert!(
        stderr.contains("The disk is 700MiB: raise `disk.size` in the recipe."),
        "{stderr}"
    );
}
