//! Four builds of different recipes, started at once by one user on one empty cache:
//! they race to assemble the same helper appliance and to store the same packages, and
//! every one of them must succeed with its own image.
//!
//! Not part of the default run: four bootstraps under emulation at once cost about eight
//! minutes on the two-core machines CI runs on, most of the room it has left. Run it
//! with `cargo xtask test --test concurrent -- --ignored` after touching the cache, the
//! appliance or the leftovers sweep.

use imgvm_e2e::{give_to_user, imgvm, run_ok, workdir};
use std::process::Command;

#[test]
#[ignore = "about 8 minutes of four TCG VMs on two cores: `cargo xtask test --test concurrent -- --ignored`"]
fn four_builds_at_once_share_one_cache() {
    let dir = workdir("concurrent");
    let cache = dir.join("cache");
    std::fs::create_dir(&cache).unwrap();
    give_to_user(&cache);
    let builds: Vec<(String, std::process::Child)> = (1..=4)
        .map(|n| {
            let name = format!("parallel{n}");
            let recipe = dir.join(format!("{name}.yaml"));
            // Different names, sizes, contents and outputs; one suite, so one appliance
            // and one set of packages to share.
            std::fs::write(
                &recipe,
                format!(
                    "name: {name}\nsuite: trixie\ndisk:\n  size: {}MiB\n  table: none\n  partitions:\n    \
                     - {{name: root, type: root, filesystem: ext4, mount: /}}\nsteps:\n  \
                     - bootstrap: {{variant: essential}}\n  \
                     - file: {{path: /etc/which-build, content: \"{name}\\n\"}}\noutputs: [{}]\n",
                    900 + 100 * n,
                    if n % 2 == 0 { "raw, qcow2" } else { "raw" }
                ),
            )
            .unwrap();
            let out = dir.join(format!("out-{name}"));
            let child = imgvm(["build"])
                .arg(&recipe)
                // One vCPU each: four VMs share two cores here.
                .args(["--arch", "amd64", "--cpus", "1", "-o"])
                .arg(&out)
                .env("IMGVM_CACHE_DIR", &cache)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (name, child)
        })
        .collect();
    for (name, child) in builds {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{name} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let raw = dir.join(format!("out-{name}/{name}-amd64.raw"));
        // Each image is its own: its size, and its file, read from outside with debugfs.
        let n: u64 = name.trim_start_matches("parallel").parse().unwrap();
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), (900 + 100 * n) << 20, "{name}");
        let cat = run_ok(Command::new("debugfs").args(["-R", "cat /etc/which-build"]).arg(&raw));
        assert_eq!(cat, format!("{name}\n"), "{name}");
    }
    // One appliance for the four, and a store whose every entry is what its name says.
    let appliances: Vec<_> = std::fs::read_dir(cache.join("appliances"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(appliances.len(), 1, "{appliances:?}");
    let stored = imgvm_e2e::assert_store_verifies(&cache);
    assert!(stored > 50, "only {stored} files stored");
}
