//! A deliberately broken image: its failing offline checks are reported with the check,
//! the expectation and what was found, and its boot test says the boot stopped in the
//! firmware, because the recipe has no bootloader step.

use imgvm_e2e::{imgvm, workdir};

const RECIPE: &str = "name: broken
suite: trixie
disk:
  size: 1GiB
  partitions:
    - {name: bios, type: bios-boot, size: 1MiB}
    - {name: esp, type: esp, size: 32MiB, filesystem: vfat, mount: /boot/efi}
    - {name: root, type: root, filesystem: ext4, mount: /}
# The smallest bootstrap with apt: the checks need nothing more.
steps:
  - bootstrap: {variant: apt}
tests:
  - file: {path: /etc/hostname}
  - file: {path: /etc/os-release, contains: ID=imgvm}
  - file: {path: /etc/debian_version, mode: '0600'}
outputs: [raw]
";

#[test]
fn a_broken_image_fails_its_checks_and_its_boot_saying_where() {
    let dir = workdir("image-tests");
    let recipe = dir.join("broken.yaml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let out = dir.join("out");
    let output = imgvm(["build"])
        .arg(&recipe)
        .args(["--arch", "amd64", "--test", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(3),
        "failed tests fail the command, with the status of failed tests:\n{stdout}\n{stderr}"
    );
    for line in [
        "PASS  file /etc/hostname exists",
        "FAIL  file /etc/debian_version mode: expected mode 0600, found mode 0644",
        // Nothing for SeaBIOS to run: said at once, without booting.
        "FAIL  boot (seabios): boot stopped in the firmware (no bootloader ran): the disk's first sector has no boot code",
        "FAIL  boot (ovmf) after ",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "`{line}` missing:\n{stdout}"
        );
    }
    let os_release = stdout
        .lines()
        .find(|l| l.starts_with("FAIL  file /etc/os-release contains: "))
        .unwrap_or_else(|| panic!("no os-release line:\n{stdout}"));
    assert!(
        os_release.contains("expected a line `ID=imgvm`, found no such line in "),
        "{os_release}"
    );
    for boot in stdout.lines().filter(|l| l.starts_with("FAIL  boot")) {
        assert!(
            boot.contains("boot stopped in the firmware (no bootloader ran)"),
            "the stage is named: {boot}"
        );
    }

    // The image was built; its reports carry the failures.
    let junit = std::fs::read_to_string(out.join("broken-amd64.junit.xml")).unwrap();
    assert!(junit.contains("tests=\"5\" failures=\"4\""), "{junit}");
    assert!(
        junit.contains("<failure message=\"expected mode 0600, found mode 0644\">"),
        "{junit}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("broken-amd64.manifest.json")).unwrap()).unwrap();
    let boots = manifest["tests"]["boots"].as_array().unwrap();
    assert!(
        boots.iter().all(|b| b["passed"] == false && b["stage"] == "firmware"),
        "{boots:?}"
    );
    assert!(out.join("broken-amd64.raw").exists());

    // `imgvm test --json`: one JSON document with the case, the status of failed tests.
    let tested = imgvm(["test", "--json", "--firmware", "bios"])
        .arg(out.join("broken-amd64.raw"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&tested.stdout);
    assert_eq!(tested.status.code(), Some(3), "{stdout}");
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(result["passed"], false);
    assert_eq!(result["arch"], "amd64", "from the manifest");
    let cases = result["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 1, "{result}");
    assert_eq!(cases[0]["name"], "boot (seabios)");
    assert_eq!(cases[0]["passed"], false);
    assert!(
        cases[0]["message"]
            .as_str()
            .unwrap()
            .contains("boot stopped in the firmware"),
        "{result}"
    );
}
