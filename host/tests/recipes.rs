//! Recipes: every recipe in images/ is valid for the architectures it names, and each
//! kind of mistake gets its own exact message with file, line and column.

use imgvm::arch::Arch;
use imgvm::recipe::{Overrides, Recipe};
use std::path::{Path, PathBuf};

const BASE: &str = "name: test
suite: trixie
disk:
  size: 2GiB
  partitions:
    - {name: esp, type: esp, size: 100MiB, filesystem: vfat, mount: /boot/efi}
    - {name: root, type: root, filesystem: ext4, mount: /}
";

/// Writes `files` (name, content) into a fresh directory and loads the first as a recipe.
fn load(files: &[(&str, &str)], arch: Arch) -> (tempfile::TempDir, Result<Recipe, String>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let result = Recipe::load(&dir.path().join(files[0].0), Some(arch)).map_err(|e| e.to_string());
    (dir, result)
}

/// The error for a one-file recipe, with the temporary directory replaced by `DIR`.
fn error(recipe: &str, arch: Arch) -> String {
    error_of(&[("r.yaml", recipe)], arch)
}

fn error_of(files: &[(&str, &str)], arch: Arch) -> String {
    let (dir, result) = load(files, arch);
    let err = result.expect_err("the recipe should be rejected");
    err.replace(&dir.path().display().to_string(), "DIR")
}

#[test]
fn base_recipe_is_valid() {
    let (_dir, recipe) = load(&[("r.yaml", BASE)], Arch::Arm64);
    let recipe = recipe.unwrap();
    let kinds: Vec<&str> = recipe.steps.iter().map(|s| s.kind()).collect();
    assert_eq!(kinds, ["bootstrap", "finalize"], "bootstrap and finalize are implied");
    assert_eq!(recipe.mirror, "http://deb.debian.org/debian");
}

#[test]
fn yaml_syntax_error() {
    assert_eq!(
        error("name: test\nsuite: [trixie\n", Arch::Amd64),
        "DIR/r.yaml:3:1: did not find expected ',' or ']', while parsing a flow sequence"
    );
}

#[test]
fn misspelt_field() {
    let err = error(&format!("{BASE}pakages: [vim]\n"), Arch::Amd64);
    assert!(
        err.starts_with("DIR/r.yaml:8:1: unknown field `pakages`, expected one of"),
        "{err}"
    );
}

#[test]
fn unknown_step() {
    let err = error(
        &format!("{BASE}steps:\n  - apt: {{install: [vim]}}\n  - aptt: {{install: [vim]}}\n"),
        Arch::Amd64,
    );
    assert!(
        err.starts_with("DIR/r.yaml:10:5: steps[1]: unknown variant `aptt`, expected one of"),
        "{err}"
    );
}

#[test]
fn misspelt_step_option() {
    let err = error(&format!("{BASE}steps:\n  - apt: {{instal: [vim]}}\n"), Arch::Amd64);
    assert!(
        err.starts_with("DIR/r.yaml:9:11: steps[0].apt: unknown field `instal`, expected one of"),
        "{err}"
    );
}

#[test]
fn bad_size() {
    assert_eq!(
        error(&BASE.replace("size: 2GiB", "size: 2XB"), Arch::Amd64),
        "DIR/r.yaml:4:9: disk: invalid size `2XB`: unknown unit `XB` (use B, KiB, MiB, GiB or TiB, or the SI kB, MB, GB or TB)"
    );
}

#[test]
fn file_mode_must_be_octal() {
    let recipe = format!("{BASE}steps:\n  - file: {{path: /etc/motd, content: hi, mode: 0999}}\n");
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:9:48: steps[0].file: invalid file mode `0999`: expected octal such as 0644"
    );
}

#[test]
fn unknown_variable() {
    assert_eq!(
        error(&BASE.replace("suite: trixie", "suite: ${release}"), Arch::Amd64),
        "DIR/r.yaml:2:8: unknown variable `release` (none are defined)"
    );
}

#[test]
fn missing_name() {
    assert_eq!(
        error(&BASE.replace("name: test\n", ""), Arch::Amd64),
        "DIR/r.yaml: missing field `name`"
    );
}

#[test]
fn only_the_last_partition_may_take_the_rest() {
    let recipe = BASE.replace("{name: esp, type: esp, size: 100MiB,", "{name: esp, type: esp,");
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:6:8: partition `esp`: only the last partition may leave out `size` (it takes the rest of the disk)"
    );
}

#[test]
fn nothing_mounted_at_root() {
    assert_eq!(
        error(&BASE.replace("mount: /}", "mount: /srv}"), Arch::Amd64),
        "DIR/r.yaml:5:3: disk.partitions: no partition is mounted at /"
    );
}

#[test]
fn partitions_larger_than_the_disk() {
    assert_eq!(
        error(&BASE.replace("size: 100MiB", "size: 3GiB"), Arch::Amd64),
        "DIR/r.yaml:4:3: the partitions need 3074MiB but the disk is 2GiB"
    );
}

#[test]
fn bios_boot_partition_on_arm64() {
    let recipe = BASE.replace(
        "    - {name: esp",
        "    - {name: bios, type: bios-boot, size: 1MiB}\n    - {name: esp",
    );
    assert_eq!(
        error(&recipe, Arch::Arm64),
        "DIR/r.yaml:6:8: partition `bios`: type bios-boot does not fit arm64 with a gpt table"
    );
}

#[test]
fn bootloader_needs_a_boot_partition() {
    let recipe = format!(
        "{}steps:\n  - bootloader: {{}}\n",
        BASE.replace("type: esp", "type: linux")
    );
    assert_eq!(
        error(&recipe, Arch::Arm64),
        "DIR/r.yaml:9:3: step 2 (bootloader): a bootable arm64 disk needs an esp partition"
    );
}

#[test]
fn bootloader_runs_after_every_other_step() {
    // A part's bootloader step, then a GRUB file from a later part and one from per_arch:
    // update-grub must see both.
    let recipe = format!(
        "{BASE}steps:\n  - bootloader: {{}}\n  - file: {{path: /etc/default/grub.d/15_style.cfg, content: \"GRUB_TIMEOUT_STYLE=countdown\\n\"}}\n\
         per_arch:\n  arm64:\n    steps:\n      - file: {{path: /etc/default/grub.d/20_console.cfg, content: \"GRUB_CMDLINE_LINUX_DEFAULT=x\\n\"}}\n"
    );
    let (_dir, recipe) = load(&[("r.yaml", &recipe)], Arch::Arm64);
    let kinds: Vec<&str> = recipe.unwrap().steps.iter().map(|s| s.kind()).collect();
    assert_eq!(kinds, ["bootstrap", "file", "file", "bootloader", "finalize"]);
}

#[test]
fn a_second_bootloader_step_is_refused() {
    let recipe = format!("{BASE}steps:\n  - bootloader: {{timeout: 0}}\n  - bootloader: {{timeout: 5}}\n");
    assert_eq!(
        error(&recipe, Arch::Arm64),
        "DIR/r.yaml:9:3: step 2 (bootloader): a second bootloader step; GRUB's settings have one owner, \
         the recipe's one bootloader step"
    );
}

#[test]
fn vendor_is_a_debian_vendor_name() {
    assert_eq!(
        error(&format!("{BASE}vendor: ../ec2\n"), Arch::Amd64),
        "DIR/r.yaml:8:1: vendor `../ec2`: use lowercase letters, digits and `-`, as Debian's vendor names do"
    );
}

#[test]
fn esp_needs_vfat() {
    assert_eq!(
        error(&BASE.replace("filesystem: vfat", "filesystem: ext4"), Arch::Amd64),
        "DIR/r.yaml:6:8: partition `esp`: an EFI system partition needs `filesystem: vfat`"
    );
}

#[test]
fn relative_file_path() {
    let recipe = format!("{BASE}steps:\n  - file: {{path: etc/motd, content: hi}}\n");
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:9:18: step 2 (file): path `etc/motd` is not an absolute path without `..`"
    );
}

#[test]
fn error_in_an_extended_file_points_into_it() {
    let base = BASE.replace("filesystem: vfat", "filesystem: ext4");
    assert_eq!(
        error_of(
            &[("r.yaml", "extends: [base.yaml]\nname: top\n"), ("base.yaml", &base)],
            Arch::Amd64
        ),
        "DIR/base.yaml:6:8: partition `esp`: an EFI system partition needs `filesystem: vfat`"
    );
}

#[test]
fn two_qcow2_outputs() {
    assert_eq!(
        error(&format!("{BASE}outputs: [qcow2, qcow2-compressed]\n"), Arch::Amd64),
        "DIR/r.yaml:8:1: qcow2 and qcow2-compressed would both be NAME.qcow2: choose one"
    );
}

#[test]
fn copy_out_of_the_image() {
    let recipe = format!("{BASE}steps:\n  - copy: {{from: r.yaml, to: /etc/../../x}}\n");
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:9:30: step 2 (copy): destination `/etc/../../x` is not an absolute path without `..`"
    );
}

#[test]
fn malformed_uuids() {
    let recipe = BASE.replace("filesystem: ext4,", "filesystem: ext4, uuid: 1234,");
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:7:56: partition `root`: uuid `1234` is not of the form 01234567-89ab-cdef-0123-456789abcdef"
    );
    let recipe = BASE.replace(
        "filesystem: vfat,",
        "filesystem: vfat, uuid: 0fc63daf-8483-4772-8e79-3d69d8477de4,",
    );
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:6:68: partition `esp`: uuid `0fc63daf-8483-4772-8e79-3d69d8477de4` is not of the form ABCD-1234"
    );
    let fixed = BASE
        .replace("filesystem: vfat,", "filesystem: vfat, uuid: ABCD-1234,")
        .replace(
            "filesystem: ext4,",
            "filesystem: ext4, uuid: 0fc63daf-8483-4772-8e79-3d69d8477de4,",
        );
    let (_dir, recipe) = load(&[("r.yaml", &fixed)], Arch::Amd64);
    assert_eq!(
        recipe.unwrap().partitions[1].uuid.as_deref(),
        Some("0fc63daf-8483-4772-8e79-3d69d8477de4")
    );
}

#[test]
fn copy_of_a_missing_host_file() {
    let recipe = format!("{BASE}steps:\n  - copy: {{from: files/motd, to: /etc/motd}}\n");
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:9:18: step 2 (copy): `files/motd` does not exist (looked for DIR/files/motd)"
    );
}

#[test]
fn bad_mirror() {
    assert_eq!(
        error(&format!("{BASE}mirror: deb.debian.org/debian\n"), Arch::Amd64),
        "DIR/r.yaml:8:9: invalid mirror `deb.debian.org/debian`: expected an http:// or https:// URL"
    );
}

#[test]
fn extends_a_missing_file() {
    assert_eq!(
        error(&format!("extends: [base.yaml]\n{BASE}"), Arch::Amd64),
        "DIR/r.yaml:1:11: extends `base.yaml`, which does not exist"
    );
}

#[test]
fn extends_cycle() {
    let err = error_of(
        &[
            ("a.yaml", "extends: [b.yaml]\nname: a\n"),
            ("b.yaml", "extends: [a.yaml]\n"),
        ],
        Arch::Amd64,
    );
    assert_eq!(
        err,
        "DIR/a.yaml: `extends` forms a cycle: DIR/a.yaml -> DIR/b.yaml -> DIR/a.yaml"
    );
}

#[test]
fn arch_the_recipe_does_not_build() {
    let err = error(&format!("{BASE}arches: [amd64]\n"), Arch::Ppc64el);
    assert_eq!(err, "DIR/r.yaml:8:1: this recipe builds amd64, not ppc64el");
}

#[test]
fn extends_merges_packages_steps_and_variables() {
    let base = "variables: {suite: bookworm}\nsuite: ${suite}\npackages: [a]\nsteps:\n  - hostname: base\n";
    let child = format!(
        "extends: [base.yaml]\nvariables: {{suite: trixie}}\npackages: [b]\nsteps:\n  - locale: C.UTF-8\n{}",
        BASE.replace("suite: trixie\n", "")
    );
    let (_dir, recipe) = load(&[("child.yaml", &child), ("base.yaml", base)], Arch::Amd64);
    let recipe = recipe.unwrap();
    assert_eq!(recipe.suite, "trixie", "the extending file's variables win");
    assert_eq!(recipe.packages, ["a", "b"]);
    let kinds: Vec<&str> = recipe.steps.iter().map(|s| s.kind()).collect();
    assert_eq!(kinds, ["bootstrap", "hostname", "locale", "finalize"]);
}

/// Every recipe in images/debian is valid for exactly the architectures Debian builds it
/// for, and refuses the others by saying which it builds.
#[test]
fn shipped_recipes_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/debian");
    let mut built = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for arch in Arch::ALL {
            match Recipe::load(&path, Some(arch)) {
                Ok(recipe) => {
                    assert_eq!(recipe.arch, arch);
                    assert!(
                        recipe.steps.iter().any(|s| s.kind() == "bootloader"),
                        "{}",
                        path.display()
                    );
                    built.push(format!("{file} {arch}"));
                }
                Err(e) => assert!(e.message.contains("this recipe builds"), "{e}"),
            }
        }
    }
    built.sort();
    let mut expected = Vec::new();
    for suite in ["bookworm", "trixie"] {
        for (vendor, arches) in [
            ("azure", &["amd64", "arm64"][..]),
            ("ec2", &["amd64", "arm64"]),
            ("gce", &["amd64"]),
            ("generic", &["amd64", "arm64", "ppc64el"]),
            ("genericcloud", &["amd64", "arm64"]),
            ("nocloud", &["amd64", "arm64", "ppc64el"]),
        ] {
            expected.extend(arches.iter().map(|arch| format!("{suite}-{vendor}.yaml {arch}")));
        }
    }
    assert_eq!(built, expected);
    let example = dir.join("../example.yaml");
    for arch in [Arch::Amd64, Arch::Arm64] {
        Recipe::load(&example, Some(arch)).unwrap();
    }
}

#[test]
fn variables_in_comments_are_left_alone() {
    let (_dir, recipe) = load(
        &[(
            "r.yaml",
            &format!("# uses ${{nothing}}\n{BASE}description: \"a # b ${{x}}\"\nvariables: {{x: y}}\n"),
        )],
        Arch::Amd64,
    );
    assert_eq!(recipe.unwrap().description.as_deref(), Some("a # b y"));
}

#[test]
fn grub_settings_belong_to_the_bootloader_step() {
    let recipe = format!(
        "{BASE}steps:\n  - file:\n      path: /etc/default/grub.d/15_timeout.cfg\n      content: \"GRUB_TIMEOUT=5\\n\"\n"
    );
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:10:13: step 2 (file): GRUB_TIMEOUT belongs to the bootloader step \
         (`bootloader: {timeout: N, cmdline: ...}`), which would override this file"
    );
    // Settings the bootloader step does not own stay the recipe's.
    let other = format!(
        "{BASE}steps:\n  - file:\n      path: /etc/default/grub.d/50_probe.cfg\n      content: \"GRUB_DISABLE_OS_PROBER=true\\n\"\n"
    );
    load(&[("r.yaml", &other)], Arch::Amd64).1.unwrap();
}

#[test]
fn check_language_mistakes_are_located() {
    let with_tests = |tests: &str| format!("{BASE}tests:\n{tests}");
    assert_eq!(
        error(
            &with_tests("  - groups: {names: [root], shells: {root: [/bin/bash]}}\n"),
            Arch::Amd64
        ),
        "DIR/r.yaml:9:29: test 1: groups have no shells (`shells` is for `users`)"
    );
    assert_eq!(
        error(&with_tests("  - file: {path: /run, absent: true, kind: directory}\n"), Arch::Amd64),
        "DIR/r.yaml:9:18: test 1: `/run` cannot be absent and have contents, a kind, a mode or an owner, or be optional"
    );
    assert_eq!(
        error(&with_tests("  - glob: {pattern: \"boot/*\"}\n"), Arch::Amd64),
        "DIR/r.yaml:9:22: test 1: glob `boot/*` is not an absolute path without `..`"
    );
    assert_eq!(
        error(&with_tests("  - users: {}\n"), Arch::Amd64),
        "DIR/r.yaml:9:5: test 1: give at least one of `required`, `names`, `prefixes`, `ids`, `shells`"
    );
    assert!(
        error(&with_tests("  - file: {path: /run, kind: socket}\n"), Arch::Amd64).contains("unknown variant `socket`")
    );
}

#[test]
fn bootstrap_files_stay_inside_the_image() {
    let recipe = format!(
        "{BASE}steps:\n  - bootstrap:\n      files:\n        - {{path: ../etc/kernel-img.conf, content: x}}\n  - finalize: {{}}\n"
    );
    assert_eq!(
        error(&recipe, Arch::Amd64),
        "DIR/r.yaml:11:18: step 1 (bootstrap): path `../etc/kernel-img.conf` is not an absolute path without `..`"
    );
}

#[test]
fn debconf_answers_are_checked() {
    let good = format!("{BASE}steps:\n  - debconf: [\"locales locales/default_environment_locale select C.UTF-8\"]\n");
    let (_dir, recipe) = load(&[("r.yaml", &good)], Arch::Amd64);
    let kinds: Vec<&str> = recipe.unwrap().steps.iter().map(|s| s.kind()).collect();
    assert_eq!(kinds, ["bootstrap", "debconf", "finalize"]);
    assert_eq!(
        error(
            &format!("{BASE}steps:\n  - debconf: [\"locales/default_environment_locale C.UTF-8\"]\n"),
            Arch::Amd64
        ),
        "DIR/r.yaml:9:16: steps[0].debconf: invalid debconf answer `locales/default_environment_locale C.UTF-8`: \
         expected one line `owner question type value`"
    );
    assert_eq!(
        error(&format!("{BASE}steps:\n  - debconf: [\"locales locales/x chose C.UTF-8\"]\n"), Arch::Amd64),
        "DIR/r.yaml:9:16: steps[0].debconf: invalid debconf answer `locales locales/x chose C.UTF-8`: `chose` is not a debconf type \
         (string, password, boolean, select, multiselect, note, text, title, error)"
    );
}

#[test]
fn names_are_file_names() {
    // The name becomes the output files' names: it must not lead out of `-o`.
    for bad in ["../../x", "/tmp/x", "a/b", ".hidden", "-x", "a b", ""] {
        let recipe = BASE.replace("name: test", &format!("name: '{bad}'"));
        assert_eq!(
            error(&recipe, Arch::Amd64),
            format!(
                "DIR/r.yaml:1:1: name `{bad}` is not a file name: use letters, digits, `.`, `_` and `-`, \
                 not starting with `.` or `-`"
            ),
        );
    }
    let ok = BASE.replace("name: test", "name: debian-13_generic.v2");
    load(&[("r.yaml", &ok)], Arch::Amd64).1.unwrap();
}

#[test]
fn a_copy_from_outside_the_recipe_directory_is_refused_where_it_is_written() {
    let recipe = format!("{BASE}steps:\n  - copy: {{from: ../../etc/hostname, to: /etc/x}}\n");
    let err = error(&recipe, Arch::Amd64);
    assert!(
        err.starts_with("DIR/r.yaml:9:18: `../../etc/hostname` is outside the recipe's directory"),
        "{err}"
    );
    assert!(err.contains("--trust-recipe"), "{err}");
}

#[test]
fn a_snapshot_is_a_timestamp_or_an_archive_url_and_stands_in_for_the_mirror() {
    let (_dir, recipe) = load(
        &[("r.yaml", &format!("{BASE}snapshot: 20261120T000000Z\n"))],
        Arch::Amd64,
    );
    let recipe = recipe.unwrap();
    assert_eq!(
        recipe.mirror,
        "http://snapshot.debian.org/archive/debian/20261120T000000Z"
    );
    assert_eq!(recipe.snapshot_for.as_deref(), Some("http://deb.debian.org/debian"));
    let text = format!(
        "{BASE}mirror: https://ftp.de.debian.org/debian\nsnapshot: https://snap.example.org/debian/20261120/\n"
    );
    let (_dir, recipe) = load(&[("r.yaml", &text)], Arch::Amd64);
    let recipe = recipe.unwrap();
    assert_eq!(recipe.mirror, "https://snap.example.org/debian/20261120");
    assert_eq!(recipe.snapshot_for.as_deref(), Some("https://ftp.de.debian.org/debian"));
    assert_eq!(
        error(&format!("{BASE}snapshot: yesterday\n"), Arch::Amd64),
        "DIR/r.yaml:8:11: invalid snapshot `yesterday`: expected a timestamp like 20261120T000000Z or an http(s):// URL"
    );
    let err = error(&format!("{BASE}snapshot: http://127.0.0.1:9/debian\n"), Arch::Amd64);
    assert!(
        err.starts_with("DIR/r.yaml:8:1: mirror `http://127.0.0.1:9/debian` is on this machine"),
        "{err}"
    );
}

#[test]
fn a_mirror_on_this_machine_is_refused_unless_trusted() {
    let recipe = format!("{BASE}mirror: http://127.0.0.1:3142/debian\n");
    let err = error(&recipe, Arch::Amd64);
    assert!(
        err.starts_with("DIR/r.yaml:8:1: mirror `http://127.0.0.1:3142/debian` is on this machine"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yaml"), &recipe).unwrap();
    let amd64 = Overrides {
        arch: Some(Arch::Amd64),
        ..Overrides::default()
    };
    let trusted = Recipe::load_with(&dir.path().join("r.yaml"), &amd64, imgvm::recipe::Trust::Trusted);
    assert_eq!(trusted.unwrap().mirror, "http://127.0.0.1:3142/debian");
    // A mirror on the command line is the user's own, not the recipe's: not confined.
    let local = Overrides {
        mirror: Some("http://localhost:3142/debian".into()),
        ..amd64
    };
    let overridden = Recipe::load_with(&dir.path().join("r.yaml"), &local, imgvm::recipe::Trust::Confined);
    assert_eq!(overridden.unwrap().mirror, "http://localhost:3142/debian");
}

#[test]
fn the_command_line_sets_declared_variables_and_names_an_undeclared_one() {
    let base =
        "variables: {suite: bookworm, flavour: cloud}\nsuite: ${suite}\npackages: [\"linux-image-${flavour}-amd64\"]\n";
    let top = format!(
        "extends: [base.yaml]\nvariables: {{suite: trixie}}\n{}",
        BASE.replace("suite: trixie\n", "")
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), base).unwrap();
    std::fs::write(dir.path().join("r.yaml"), top).unwrap();
    let with = |vars: &[(&str, &str)]| {
        let overrides = Overrides {
            arch: Some(Arch::Amd64),
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            mirror: None,
            version: None,
        };
        Recipe::load_with(&dir.path().join("r.yaml"), &overrides, imgvm::recipe::Trust::Confined)
            .map_err(|e| e.to_string().replace(&dir.path().display().to_string(), "DIR"))
    };
    assert_eq!(with(&[]).unwrap().suite, "trixie");
    // Over the recipe's own value and over the file it extends.
    let set = with(&[("suite", "forky"), ("flavour", "rt")]).unwrap();
    assert_eq!(set.suite, "forky");
    assert_eq!(set.packages, ["linux-image-rt-amd64"]);
    assert_eq!(
        with(&[("suit", "forky")]).unwrap_err(),
        "DIR/r.yaml: --var suit: the recipe declares no such variable in `variables:` (it has flavour, suite)"
    );
}

#[test]
fn steps_get_the_recipe_timeout_unless_a_run_step_sets_its_own() {
    let recipe =
        format!("{BASE}step_timeout: 2h\nsteps:\n  - run: {{script: 'sleep 1', timeout: 90s}}\n  - hostname: h\n");
    let (_dir, recipe) = load(&[("r.yaml", &recipe)], Arch::Amd64);
    let settings = imgvm::plan::Settings {
        test: false,
        epoch: 0,
        image: true,
    };
    let plan = imgvm::plan::plan(&recipe.unwrap(), &settings);
    let timeouts: Vec<(String, String)> = plan
        .phases
        .iter()
        .map(|p| (p.label.clone(), p.timeout.to_string()))
        .collect();
    assert!(
        timeouts.contains(&("step 2/4 (run)".into(), "90s".into())),
        "{timeouts:?}"
    );
    assert!(
        timeouts.contains(&("step 3/4 (hostname)".into(), "2h".into())),
        "{timeouts:?}"
    );
}

#[test]
fn a_bad_timeout_is_located() {
    let recipe = format!("{BASE}steps:\n  - run: {{script: 'true', timeout: 3 days}}\n");
    let err = error(&recipe, Arch::Amd64);
    assert!(err.starts_with("DIR/r.yaml:9:"), "{err}");
    assert!(err.contains("unknown unit `days`"), "{err}");
}

#[test]
fn a_version_names_the_outputs_and_fills_the_version_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.yaml");
    let with = |recipe: &str, version: Option<&str>, vars: &[(&str, &str)]| {
        std::fs::write(&file, recipe).unwrap();
        let overrides = Overrides {
            arch: Some(Arch::Amd64),
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            version: version.map(str::to_owned),
            ..Overrides::default()
        };
        Recipe::load_with(&file, &overrides, imgvm::recipe::Trust::Confined)
            .map_err(|e| e.to_string().replace(&dir.path().display().to_string(), "DIR"))
    };
    let declares = format!("variables: {{version: dev}}\ndescription: \"v${{version}}\"\n{BASE}");
    let recipe = with(&declares, Some("20261128-1"), &[]).unwrap();
    assert_eq!(recipe.output_name(), "test-amd64-20261128-1");
    assert_eq!(recipe.description.as_deref(), Some("v20261128-1"));
    // The lock belongs to the recipe and arch, whatever the version.
    assert_eq!(recipe.lock_path().file_name().unwrap(), "test-amd64.lock");
    let default = with(&declares, None, &[]).unwrap();
    assert_eq!(
        (default.output_name(), default.description.unwrap()),
        ("test-amd64".into(), "vdev".into())
    );
    // A recipe without the variable still gets the name.
    assert_eq!(with(BASE, Some("7"), &[]).unwrap().output_name(), "test-amd64-7");
    assert_eq!(
        with(&declares, Some("1"), &[("version", "2")]).unwrap_err(),
        "DIR/r.yaml: give --version or --var version=..., not both"
    );
    assert!(with(BASE, Some("../x"), &[])
        .unwrap_err()
        .contains("--version `../x`: use letters"));
    assert!(with(BASE, Some("-rc"), &[]).is_err());
}
