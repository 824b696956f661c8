//! The step cache: a build starts from the state the cache has after the last step that
//! did not change, runs only the steps from the first changed one on, and its image has
//! the change (read from outside imgvm, with debugfs) and is the image a build from zero
//! makes; a build interrupted while it stores a state leaves nothing that the next build
//! would take for a state.

use imgvm_e2e::{give_to_user, imgvm, run_ok, user_cache_dir, workdir};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The smallest recipe that bootstraps, then a `run` and a `file` step. No partition
/// table: the raw image is the ext4, which debugfs reads as it is.
fn recipe(name: &str, run: &str, file: &str) -> String {
    format!(
        "name: {name}
suite: trixie
disk:
  size: 1GiB
  table: none
  partitions:
    - {{name: root, type: root, filesystem: ext4, mount: /}}
steps:
  - bootstrap: {{variant: essential}}
  - run: {{script: 'echo {run} > /etc/imgvm-run'}}
  - file: {{path: /etc/motd, content: \"{file}\\n\"}}
outputs: [raw]
"
    )
}

/// Builds `recipe` (named `name`) into `out` with `--json`: each step and whether it came
/// from the step cache, in order, as the one JSON document on stdout says them, which must
/// be what the manifest says.
fn build(recipe: &Path, name: &str, out: &Path) -> Vec<(String, bool)> {
    let stdout = run_ok(imgvm(["build", "--json", "--arch", "amd64", "-o"]).arg(out).arg(recipe));
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document on stdout");
    let manifest = std::fs::read(out.join(format!("{name}-amd64.manifest.json"))).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let steps = |steps: &serde_json::Value| -> Vec<(String, bool)> {
        let steps = steps.as_array().unwrap().iter();
        steps
            .map(|s| (s["step"].as_str().unwrap().to_owned(), s["cached"] == true))
            .collect()
    };
    assert_eq!(steps(&result["steps"]), steps(&manifest["steps"]), "{stdout}");
    let outputs = result["outputs"].as_array().unwrap();
    let raw = out.join(format!("{name}-amd64.raw"));
    assert!(outputs.iter().any(|o| o["path"] == raw.to_str().unwrap()), "{stdout}");
    for output in outputs {
        let size = std::fs::metadata(output["path"].as_str().unwrap()).unwrap().len();
        assert_eq!(output["bytes"], size, "{output}");
    }
    assert_eq!(result["tests"], serde_json::Value::Null, "no --test");
    steps(&manifest["steps"])
}

/// The steps that came from the cache.
fn reused(steps: &[(String, bool)]) -> Vec<&str> {
    steps
        .iter()
        .filter(|(_, cached)| *cached)
        .map(|(s, _)| s.as_str())
        .collect()
}

/// A file of the image, read with debugfs.
fn file_in(raw: &Path, path: &str) -> String {
    run_ok(Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(raw))
}

#[test]
fn a_rebuild_runs_only_the_changed_steps_and_an_interrupted_store_is_not_reused() {
    let dir = workdir("step-cache");
    // A name no earlier run used: the first build finds nothing of its own stored.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("cached-{stamp:x}");
    let path = dir.join("recipe.yaml");
    let write = |run: &str, file: &str| {
        std::fs::write(&path, recipe(&name, run, file)).unwrap();
        give_to_user(&path);
    };
    let out = |n: &str| {
        let out = dir.join(n);
        std::fs::create_dir(&out).unwrap();
        give_to_user(&out);
        out
    };
    let states = user_cache_dir().join("states");
    write("one", "first");

    // Ctrl-C as the build stores its first state: it stops, saying so, and leaves no
    // partial state.
    let interrupted = out("interrupted");
    let mut child = imgvm(["--log-format", "json", "build", "--arch", "amd64", "-o"])
        .arg(&interrupted)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    let mut signalled = false;
    // Read to the end: imgvm goes on logging while it stops.
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        stderr.push_str(&line);
        stderr.push('\n');
        if !signalled && line.contains("storing its state in the step cache") {
            // SAFETY: kill(2) on the process group we started.
            assert_eq!(unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) }, 0);
            signalled = true;
        }
    }
    assert!(signalled, "no state was stored:\n{stderr}");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "cancelled: {stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    imgvm_e2e::assert_states_whole(&states);

    // Built whole (the first state, if it was stored before the Ctrl-C, may be reused).
    let first = build(&path, &name, &out("first"));
    let raw = |out: &Path| out.join(format!("{name}-amd64.raw"));
    assert!(reused(&first).iter().all(|s| *s == "partition and format"), "{first:?}");
    assert_eq!(
        first.len(),
        6,
        "boot, partition, bootstrap, run, file, finalize: {first:?}"
    );
    imgvm_e2e::assert_states_whole(&states);

    // The last step changed: everything before it comes from the cache.
    write("one", "second");
    let second_out = out("second");
    let second = build(&path, &name, &second_out);
    assert_eq!(
        reused(&second),
        ["partition and format", "step 1/4 (bootstrap)", "step 2/4 (run)"],
        "{second:?}"
    );
    assert_eq!(file_in(&raw(&second_out), "/etc/motd"), "second\n");
    assert_eq!(file_in(&raw(&second_out), "/etc/imgvm-run"), "one\n");

    // An earlier step changed: the build runs again from there.
    write("two", "second");
    let third_out = out("third");
    let third = build(&path, &name, &third_out);
    assert_eq!(
        reused(&third),
        ["partition and format", "step 1/4 (bootstrap)"],
        "{third:?}"
    );
    assert_eq!(file_in(&raw(&third_out), "/etc/imgvm-run"), "two\n");
    assert_eq!(file_in(&raw(&third_out), "/etc/motd"), "second\n");

    // Nothing changed: the finished image itself comes from the cache, no helper boots,
    // and it is the same image, byte for byte.
    let fourth_out = out("fourth");
    let fourth = build(&path, &name, &fourth_out);
    let phases = [
        "partition and format",
        "step 1/4 (bootstrap)",
        "step 2/4 (run)",
        "step 3/4 (file)",
    ];
    assert_eq!(
        reused(&fourth),
        [&phases[..], &["step 4/4 (finalize)"]].concat(),
        "{fourth:?}"
    );
    assert_eq!(fourth.len(), 5, "no helper VM booted: {fourth:?}");
    let sum = |out: &Path| {
        run_ok(Command::new("sha256sum").arg(raw(out)))
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(sum(&fourth_out), sum(&third_out));

    // A build resumed from a stored state (the second: its helper read the image ahead
    // and sealed it from there) made the image a build from zero makes.
    write("one", "second");
    let from_zero = out("from-zero");
    run_ok(
        imgvm(["build", "--no-cache", "--arch", "amd64", "-o"])
            .arg(&from_zero)
            .arg(&path),
    );
    assert_eq!(sum(&from_zero), sum(&second_out), "resumed and from zero differ");

    // `imgvm cache info` lists the recipe's states.
    let info = run_ok(&mut imgvm(["cache", "info"]));
    assert!(info.contains(&format!("{name} (amd64)")), "{info}");
    assert!(info.contains("step 2/4 (run)"), "{info}");
}
