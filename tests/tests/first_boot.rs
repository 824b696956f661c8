//! A site image as a new user writes one from the README: openssh-server, a user with an
//! ssh key, root locked, no cloud-init. Its first boot starts sshd (its host keys are
//! made at that boot, as the build removed them), `--test` says so on both amd64
//! firmwares without a login, a plain qemu with user networking lets the key in, and a
//! unit that fails makes the boot test fail naming it.

use imgvm_e2e::{imgvm, workdir};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recipe(key: &str, extra_steps: &str) -> String {
    format!(
        "name: site
suite: trixie
disk:
  size: 2GiB
  partitions:
    - {{name: bios, type: bios-boot, number: 14, size: 3MiB}}
    - {{name: esp, type: esp, number: 15, size: 124MiB, filesystem: vfat, mount: /boot/efi}}
    - {{name: root, type: root, number: 1, filesystem: ext4, mount: /}}
packages: [systemd-sysv, openssh-server, linux-image-cloud-amd64, grub-cloud-amd64]
steps:
  - hostname: site
  - users:
      - {{name: admin, ssh_keys: [\"{key}\"]}}
  - run: {{script: passwd --lock root}}
  - file:
      path: /etc/systemd/network/80-dhcp.network
      content: \"[Match]\\nName=en*\\n\\n[Network]\\nDHCP=yes\\n\"
  - services: {{enable: [systemd-networkd]}}
  - fstab: {{by: uuid}}
  - bootloader: {{timeout: 1}}
{extra_steps}outputs: [raw]
"
    )
}

/// A unit that exits 1 at every boot.
const BROKEN_UNIT: &str = "  - file:
      path: /etc/systemd/system/broken.service
      content: \"[Service]\\nType=oneshot\\nExecStart=/bin/false\\n\\n[Install]\\nWantedBy=multi-user.target\\n\"
  - services: {enable: [broken]}
";

fn build(recipe: &Path, out: &Path, test: bool) -> (Option<i32>, String) {
    let mut cmd = imgvm(["build", "--arch", "amd64", "-o"]);
    cmd.arg(out).arg(recipe);
    if test {
        cmd.arg("--test");
    }
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.code(), format!("{stdout}\n{stderr}"))
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_site_image_without_cloud_init_starts_sshd_and_its_boot_test_names_failed_units() {
    let dir = workdir("first-boot");
    let key = dir.join("id_ed25519");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "first-boot-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let recipe_path = dir.join("site.yaml");
    std::fs::write(&recipe_path, recipe(public.trim(), "")).unwrap();
    let out = dir.join("out");

    // The boot test passes on both firmwares: the system started and no unit failed.
    let (code, said) = build(&recipe_path, &out, true);
    assert_eq!(code, Some(0), "{said}");
    for firmware in ["seabios", "ovmf"] {
        let line = format!("PASS  boot ({firmware})");
        assert!(said.lines().any(|l| l.starts_with(&line)), "no `{line}`:\n{said}");
    }

    // Booted as a person would, with plain qemu: sshd is up and takes the key.
    let raw = out.join("site-amd64.raw");
    let port = free_port();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "2",
        ])
        .args(["-snapshot", "-drive"])
        .arg(format!("file={},format=raw,if=virtio", raw.display()))
        .args([
            "-nic",
            &format!("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22"),
        ])
        .args(["-serial", "null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let logged_in = loop {
        let ssh = Command::new("ssh")
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-i"])
            .arg(&key)
            .args(["-p", &port.to_string(), "admin@127.0.0.1", "cat /etc/hostname"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&ssh.stdout).into_owned();
        if ssh.status.success() || started.elapsed() > Duration::from_secs(480) {
            break (
                ssh.status.success(),
                format!("{stdout}{}", String::from_utf8_lossy(&ssh.stderr)),
            );
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(logged_in.0, "no ssh login within 480 s: {}", logged_in.1);
    assert_eq!(logged_in.1.lines().next(), Some("site"), "{}", logged_in.1);

    // A unit that exits 1: `imgvm test` of the rebuilt image fails and names it.
    std::fs::write(&recipe_path, recipe(public.trim(), BROKEN_UNIT)).unwrap();
    let (code, said) = build(&recipe_path, &out, false);
    assert_eq!(code, Some(0), "{said}");
    let tested = imgvm(["test", "--json", "--firmware", "bios"])
        .arg(&raw)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&tested.stdout);
    assert_eq!(
        tested.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    let case = &result["cases"][0];
    assert_eq!(case["passed"], false, "{result}");
    assert_eq!(case["message"], "failed units: broken.service", "{result}");
}
