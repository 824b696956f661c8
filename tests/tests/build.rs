//! imgvm's main job end to end: a Debian cloud image built from a recipe in images/ by an
//! unprivileged user, checked from the host and, through `imgvm run`, from inside.

use imgvm_e2e::terminal::Terminal;
use imgvm_e2e::{give_to_user, imgvm, run_ok, workdir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// images/debian, copied where the test user can read it.
fn recipes(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/debian");
    let dest = dir.join("recipes");
    run_ok(Command::new("cp").arg("-r").arg(&src).arg(&dest));
    run_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(&dest));
    dest
}

fn build(recipe: &Path, out: &Path, cache: &Path, extra: &[&str]) -> String {
    let output = imgvm(["--log-format", "json", "build"])
        .arg(recipe)
        .args(["--arch", "amd64", "-o"])
        .arg(out)
        .args(extra)
        .env("IMGVM_CACHE_DIR", cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "imgvm build failed:\n{stderr}");
    stderr
}

#[test]
fn amd64_genericcloud_image_is_built_as_the_recipe_says() {
    let dir = workdir("build-amd64");
    let recipe = recipes(&dir).join("trixie-genericcloud.yaml");
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    give_to_user(&out);
    // A cache of its own, so that what the first build downloads is known: everything.
    let cache = dir.join("cache");
    std::fs::create_dir(&cache).unwrap();
    give_to_user(&cache);
    // With the recipe's offline checks and a boot under SeaBIOS and under OVMF, and a
    // version in the names, as Debian's official builds have it.
    let first = build(&recipe, &out, &cache, &["--test", "--version", "20261207-1"]);
    let name = "debian-13-genericcloud-amd64-20261207-1";

    // Without a terminal, the long bootstrap says how far it is every 30 s, not more often.
    let reports: Vec<(f64, u64)> = first
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let message = v["fields"]["message"].as_str()?.to_owned();
            let (_, rest) = message.strip_prefix("step 1/")?.split_once(" (bootstrap): ")?;
            let (seconds, rest) = rest.split_once(" s so far, ")?;
            let (packages, _) = rest.split_once(" packages fetched (")?;
            Some((seconds.parse().ok()?, packages.parse().ok()?))
        })
        .collect();
    assert!(reports.len() >= 2, "no progress reports in the bootstrap:\n{first}");
    assert!(reports.iter().any(|(_, packages)| *packages > 0), "{reports:?}");
    for pair in reports.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= 29.0, "reports closer than 30 s: {reports:?}");
    }

    // Everything is there, nothing else is, and the checksums hold.
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let expected = [
        "SHA256SUMS",
        "SHA512SUMS",
        "build.json",
        "build.log",
        "cdx.json",
        "junit.xml",
        "lock",
        "manifest.json",
        "qcow2",
        "raw",
        "tar",
    ];
    let mut wanted: Vec<String> = expected
        .iter()
        .map(|e| {
            if e.starts_with("SHA") {
                e.to_string()
            } else {
                format!("{name}.{e}")
            }
        })
        .collect();
    wanted.sort();
    assert_eq!(files, wanted);
    for (tool, list) in [("sha256sum", "SHA256SUMS"), ("sha512sum", "SHA512SUMS")] {
        let listed = std::fs::read_to_string(out.join(list)).unwrap();
        assert_eq!(listed.lines().count(), wanted.len() - 4, "{list}:\n{listed}");
        run_ok(Command::new(tool).args(["--check", "--quiet", list]).current_dir(&out));
    }
    let raw = out.join(format!("{name}.raw"));
    let qcow2_info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(out.join(format!("{name}.qcow2"))),
    );
    assert!(qcow2_info.contains("\"format\": \"qcow2\""), "{qcow2_info}");

    // Debian's archive: one sparse member, disk.raw, the whole 3 GiB disk; and its Build
    // manifest, which names the archive's SHA512 as Debian's tools check it.
    let tar = out.join(format!("{name}.tar"));
    let listing = run_ok(Command::new("tar").arg("-tvf").arg(&tar));
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(
        listing.contains(&format!(" {} ", 3u64 << 30)) && listing.trim_end().ends_with(" disk.raw"),
        "{listing}"
    );
    let digest = run_ok(Command::new("sh").arg("-c").arg(format!(
        "sha512sum {} | cut -d' ' -f1 | tr a-f A-F | basenc --base16 -d | base64 -w0 | tr -d =",
        tar.display()
    )));
    let build_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(format!("{name}.build.json"))).unwrap()).unwrap();
    assert_eq!(build_json["apiVersion"], "cloud.debian.org/v1alpha1");
    assert_eq!(
        build_json["metadata"]["annotations"]["cloud.debian.org/digest"],
        format!("sha512:{digest}")
    );
    let info = &build_json["data"]["info"];
    for (key, value) in [
        ("arch", "amd64"),
        ("release", "trixie"),
        ("release_id", "13"),
        ("vendor", "genericcloud"),
        ("version", "20261207-1"),
        ("type", "official"),
    ] {
        assert_eq!(info[key], value, "{key}: {info}");
    }
    let listed: Vec<&str> = build_json["data"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&"libc6:amd64") && listed.contains(&"base-files"),
        "{listed:?}"
    );

    // Debian's amd64 layout: BIOS boot p14, ESP p15, root p1 last.
    let table: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new("sfdisk").arg("--json").arg(&raw))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap().clone();
    assert_eq!(table["partitiontable"]["label"], "gpt");
    let by_number = |n: u32| {
        parts
            .iter()
            .find(|p| p["node"].as_str().unwrap().ends_with(&format!(".raw{n}")))
            .unwrap_or_else(|| panic!("no p{n}: {table}"))
    };
    assert_eq!(by_number(14)["type"], "21686148-6449-6E6F-744E-656564454649");
    assert_eq!(by_number(15)["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(by_number(1)["type"], "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
    let start = |p: &serde_json::Value| p["start"].as_u64().unwrap();
    assert!(
        parts.iter().all(|p| start(p) <= start(by_number(1))),
        "root is not last: {table}"
    );

    // The manifest lists the packages the recipe asked for.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(format!("{name}.manifest.json"))).unwrap()).unwrap();
    let packages: Vec<&str> = manifest["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for wanted in [
        "linux-image-cloud-amd64",
        "grub-cloud-amd64",
        "cloud-init",
        "openssh-server",
        "systemd-resolved",
    ] {
        assert!(packages.contains(&wanted), "{wanted} missing from the manifest");
    }

    lock_sbom_and_diff(&out, name, &manifest, &cache);

    // Every offline check passed and the image booted on both firmwares, as the manifest
    // and the JUnit report say.
    let tests = &manifest["tests"];
    let checks = tests["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["passed"] == true), "{tests}");
    // Debian's own offline suite is among them, one check per assertion.
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for debian in [
        "file /run kind",
        "file /run empty",
        "file /dev empty",
        "file /var/cache/apt empty",
        "file /vmlinuz absent",
        "file /initrd.img absent",
        "glob /boot/vmlinu[xz]* matches",
        "glob /boot/initrd.img* matches",
        "file /boot/grub/i386-pc kind",
        "file /boot/grub/x86_64-efi kind",
        "file /etc/cloud-release exists",
        "file /etc/default/locale content",
        "file /etc/fstab kind",
        "file /etc/resolv.conf kind (if present)",
        "groups exist",
        "groups have allowed names",
        "groups have allowed ids",
        "users exist",
        "users have allowed names",
        "users have allowed shells",
        "users have allowed ids",
        "command: every package fully installed",
        "file /var/log holds only",
    ] {
        assert!(names.contains(&debian), "no check `{debian}` in {names:?}");
    }
    let boots = tests["boots"].as_array().unwrap();
    let firmwares: Vec<&str> = boots.iter().map(|b| b["firmware"].as_str().unwrap()).collect();
    assert_eq!(firmwares, ["seabios", "ovmf"], "{tests}");
    assert!(boots.iter().all(|b| b["passed"] == true), "{tests}");
    let junit = std::fs::read_to_string(out.join(format!("{name}.junit.xml"))).unwrap();
    assert!(
        junit.contains(&format!("tests=\"{}\" failures=\"0\"", checks.len() + 2)),
        "{junit}"
    );

    // Inside the image.
    let script = "set -e
mount -o ro /dev/vda1 /mnt
mount -o ro /dev/vda15 /mnt/boot/efi
[ -d /mnt/boot/grub/i386-pc ] && echo grub-bios-modules
[ -f /mnt/boot/efi/EFI/BOOT/BOOTX64.EFI ] && echo grub-efi-removable
head -c 512 /dev/vda | grep -q GRUB && echo grub-in-mbr
grep -q 'linux.*console=ttyS0' /mnt/boot/grub/grub.cfg && echo serial-console
grep -q \"linux.*root=PARTUUID=$(blkid -s PARTUUID -o value /dev/vda1) \" /mnt/boot/grub/grub.cfg && echo root-by-partuuid
echo machine-id-bytes=$(stat -c %s /mnt/etc/machine-id)
echo ssh-host-keys=$(ls /mnt/etc/ssh/ | grep -c '^ssh_host_' || true)
echo apt-lists=$(ls /mnt/var/lib/apt/lists | grep -vc '^lock$\\|^partial$' || true)
echo apt-cache=$(ls -A /mnt/var/cache/apt | wc -l)
echo run=$(ls -A /mnt/run | wc -l) dev=$(ls -A /mnt/dev | wc -l)
echo root-kernel-links=$(ls -A /mnt | grep -c -e '^vmlinu' -e '^initrd' || true)
cat /mnt/etc/cloud-release
echo policy-rc-d=$([ -e /mnt/usr/sbin/policy-rc.d ] && echo present || echo absent)
echo build-apt-conf=$(ls /mnt/etc/apt/apt.conf.d | grep -c 'imgvm\\|mmdebstrap' || true)
echo apt-proxy=$(grep -rhI '^[[:space:]]*Acquire::http::Proxy' /mnt/etc/apt | wc -l)
cat /mnt/etc/default/locale
cat /mnt/etc/kernel-img.conf
echo menu-timeout=$(grep -A2 'x$feature_timeout_style = xy' /mnt/boot/grub/grub.cfg | sed -n 's/^ *set timeout=//p')
grep -A2 -x 'Name: grub2/force_efi_extra_removable' /mnt/var/cache/debconf/config.dat | grep -x 'Value: true' && echo removable-preseeded
chroot /mnt dpkg-query -W -f '${Package}=${db:Status-Status}\\n' cloud-init openssh-server linux-image-cloud-amd64
cat /mnt/etc/fstab";
    let stdout = run_ok(imgvm(["run", "--disk"]).arg(&raw).args(["--", "sh", "-c", script]));
    for line in [
        "grub-bios-modules",
        "grub-efi-removable",
        "grub-in-mbr",
        "serial-console",
        "root-by-partuuid",
        "machine-id-bytes=0",
        "ssh-host-keys=0",
        "apt-lists=0",
        // Debian's images have an empty /var/cache/apt (no archives/partial either).
        "apt-cache=0",
        // What the bootstrap left below the pseudo filesystems is gone too, and
        // kernel-img.conf came before the kernel: no /vmlinuz links.
        "run=0 dev=0",
        "root-kernel-links=0",
        "ID=genericcloud",
        "VERSION=\"20261207-1\"",
        "policy-rc-d=absent",
        // The build's apt configuration (its proxy) is not the image's.
        "build-apt-conf=0",
        "apt-proxy=0",
        "LANG=C.UTF-8",
        "do_symlinks = no",
        // The bootloader step is the one owner of GRUB's settings: genericcloud's 0 s.
        "menu-timeout=0",
        // The debconf step's answer, in debconf's database.
        "removable-preseeded",
        "cloud-init=installed",
        "openssh-server=installed",
        "linux-image-cloud-amd64=installed",
    ] {
        assert!(stdout.lines().any(|l| l == line), "`{line}` not found in:\n{stdout}");
    }
    let fstab: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" / ") || l.contains(" /boot/efi "))
        .collect();
    assert_eq!(fstab.len(), 2, "{stdout}");
    assert!(
        fstab
            .iter()
            .all(|l| l.starts_with("PARTUUID=") || l.starts_with("UUID=")),
        "{fstab:?}"
    );

    // The offline checks of an image built earlier, from outside the build: the recipe's
    // pass, nocloud's (no cloud-init, its netplan file) do not, and the image is unchanged.
    let sha256 = || run_ok(Command::new("sha256sum").arg(&raw));
    let before = sha256();
    let checks = |recipe: &str| {
        let output = imgvm(["test", "--json", "--no-boot", "--var", "version=20261207-1", "--checks"])
            .arg(recipes(&dir).join(recipe))
            .arg(&raw)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
        (output.status.code(), report)
    };
    let (status, report) = checks("trixie-genericcloud.yaml");
    assert_eq!(status, Some(0), "{report}");
    assert_eq!(report["cases"].as_array().unwrap().len(), names.len(), "{report}");
    let (status, report) = checks("trixie-nocloud.yaml");
    assert_eq!(status, Some(3), "{report}");
    let failed: Vec<&str> = report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(failed.contains(&"command: no cloud-init"), "{report}");
    assert!(failed.contains(&"file /etc/cloud-release content"), "{report}");
    assert_eq!(sha256(), before, "checking the image changed it");

    // `imgvm boot`, driven as a person would from a terminal: the serial console reaches
    // the login prompt, Ctrl-] has the guest power off (its kernel says so), and the image
    // is as it was: the boot wrote into a snapshot.
    let mut terminal = Terminal::spawn(imgvm(["boot"]).arg(&raw));
    assert!(
        terminal.wait_for(" login: ", Duration::from_secs(420)),
        "no login prompt:\n{}",
        terminal.shown()
    );
    terminal.send(&[0x1d]); // Ctrl-]
    let (status, shown) = terminal.finish(Duration::from_secs(180));
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{shown}");
    let said = |text: &str| assert!(shown.contains(text), "`{text}` not shown:\n{shown}");
    said("[imgvm: powering the machine off");
    said("reboot: Power down");
    said("[imgvm: powered off]");
    assert_eq!(sha256(), before, "the boot changed the image");

    shell(&raw, &sha256, &before);

    // The first build, on an empty cache, downloaded its packages (those the helper
    // appliance shares were stored, verified, when it was assembled just before). That a
    // second build gets them from the cache is build_errors' to show.
    let (downloaded, _) = imgvm_e2e::log_fields(&first, "downloaded_debs", "cached_debs");
    assert!(
        downloaded > 100,
        "the first build downloaded only {downloaded} packages"
    );
}

/// `imgvm shell`: a command prints the image's own file; the image is read-only unless
/// `--rw`; interactively, the shell has a terminal. Only `--rw` changes the image.
fn shell(raw: &Path, sha256: &dyn Fn() -> String, before: &str) {
    let run = |args: &[&str]| {
        let output = imgvm(["shell"]).args(args).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (output.status.code(), text(&output.stdout), text(&output.stderr))
    };
    let image = raw.to_str().unwrap();
    let (code, stdout, stderr) = run(&[image, "--", "cat", "/etc/os-release"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.lines().any(|l| l == "VERSION_CODENAME=trixie"),
        "not the image's os-release:\n{stdout}"
    );
    let (code, _, stderr) = run(&[image, "--", "sh", "-c", "touch /etc/imgvm-shell; exit 7"]);
    assert_eq!(code, Some(7), "the command's own status: {stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");

    let mut terminal = Terminal::spawn(imgvm(["shell"]).arg(raw));
    assert!(
        terminal.wait_for("# ", Duration::from_secs(300)),
        "no shell prompt:\n{}",
        terminal.shown()
    );
    terminal.send(b"tty; stty size\n");
    assert!(
        terminal.wait_for("/dev/pts/", Duration::from_secs(60)),
        "no terminal:\n{}",
        terminal.shown()
    );
    terminal.send(b"exit 0\n");
    let (status, shown) = terminal.finish(Duration::from_secs(120));
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{shown}");
    assert!(shown.contains("24 80"), "the terminal's size:\n{shown}");
    assert_eq!(sha256(), before, "a read-only shell changed the image");

    let (code, _, stderr) = run(&["--rw", image, "--", "sh", "-c", "echo written > /root/imgvm-shell"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = run(&[image, "--", "cat", "/root/imgvm-shell"]);
    assert_eq!((code, stdout.as_str()), (Some(0), "written\n"), "{stderr}");
}

/// The lock names every installed package with the very .deb it came from (checked in
/// the cache with dpkg-deb), the SBOM is valid CycloneDX listing them, and `imgvm diff`
/// tells a build from itself and from one with another package version.
fn lock_sbom_and_diff(out: &Path, name: &str, manifest: &serde_json::Value, cache: &Path) {
    let read = |file: String| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(file)).unwrap()).unwrap()
    };
    let lock = read(format!("{name}.lock"));
    assert!(
        lock.get("unlisted").is_none(),
        "packages of no signed index: {}",
        lock["unlisted"]
    );
    let locked = lock["packages"].as_array().unwrap();
    let installed = manifest["packages"].as_array().unwrap();
    assert_eq!(locked.len(), installed.len());
    for package in installed {
        let field = |p: &serde_json::Value, f: &str| p[f].as_str().unwrap().to_owned();
        let entry = locked
            .iter()
            .find(|l| {
                ["name", "version", "architecture"]
                    .iter()
                    .all(|f| field(l, f) == field(package, f))
            })
            .unwrap_or_else(|| panic!("{package} is not in the lock"));
        assert!(field(entry, "filename").starts_with("pool/"), "{entry}");
        // The .deb the lock names is the one in the verified cache, and is this package.
        let deb = cache.join("archive/sha256").join(field(entry, "sha256"));
        let sum = run_ok(Command::new("sha256sum").arg(&deb));
        assert!(sum.starts_with(&field(entry, "sha256")), "{sum}");
        let control = run_ok(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .args(["Package", "Version"]),
        );
        assert_eq!(
            control,
            format!(
                "Package: {}\nVersion: {}\n",
                field(entry, "name"),
                field(entry, "version")
            )
        );
    }
    let releases: Vec<&str> = lock["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["url"].as_str().unwrap())
        .collect();
    assert!(
        releases.iter().any(|u| u.ends_with("/dists/trixie/InRelease")),
        "{releases:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let epoch = lock["source_date_epoch"].as_i64().unwrap();
    assert!(now - 90 * 86400 < epoch && epoch <= now, "source_date_epoch {epoch}");
    assert!(
        lock["helper"]["packages"].as_array().unwrap().len() > 10,
        "{}",
        lock["helper"]
    );

    let sbom = read(format!("{name}.cdx.json"));
    assert_eq!(imgvm_e2e::cyclonedx::schema_errors(&sbom), Vec::<String>::new());
    let components = sbom["components"].as_array().unwrap();
    assert_eq!(components.len(), locked.len());
    let cloud_init = components.iter().find(|c| c["name"] == "cloud-init").unwrap();
    let purl = cloud_init["purl"].as_str().unwrap();
    assert_eq!(
        purl,
        format!(
            "pkg:deb/debian/cloud-init@{}?arch=all&distro=debian-13",
            cloud_init["version"].as_str().unwrap()
        )
    );

    // `imgvm diff`: nothing differs between a build and itself (exit 0, no output); a
    // manifest with another cloud-init names exactly that (exit 1).
    let diff = |new: &Path| imgvm(["diff"]).arg(out).arg(new).output().unwrap();
    let same = diff(out);
    assert_eq!(same.status.code(), Some(0), "{same:?}");
    assert!(same.stdout.is_empty(), "{same:?}");
    let mut edited = manifest.clone();
    let version = cloud_init["version"].as_str().unwrap();
    for p in edited["packages"].as_array_mut().unwrap() {
        if p["name"] == "cloud-init" {
            p["version"] = format!("{version}.1").into();
        }
    }
    let other = out.parent().unwrap().join("edited.manifest.json");
    std::fs::write(&other, serde_json::to_vec(&edited).unwrap()).unwrap();
    give_to_user(&other);
    let changed = diff(&other);
    assert_eq!(changed.status.code(), Some(1), "{changed:?}");
    assert_eq!(
        String::from_utf8_lossy(&changed.stdout),
        format!("~ cloud-init (all) {version} -> {version}.1\n")
    );
}

#[test]
fn dry_run_prints_the_plan_and_builds_nothing() {
    let dir = workdir("dry-run");
    let recipe = recipes(&dir).join("trixie-nocloud.yaml");
    let out = dir.join("out");
    let json = run_ok(
        imgvm(["build", "--dry-run", "--json", "--arch", "arm64", "-o"])
            .arg(&out)
            .arg(&recipe),
    );
    let plan: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(plan["recipe"], "debian-13-nocloud");
    assert_eq!(plan["arch"], "arm64");
    let labels: Vec<&str> = plan["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.first(), Some(&"partition and format"));
    assert!(labels.last().unwrap().ends_with("(finalize)"), "{labels:?}");
    // The plan is the golden one: the CLI prints what the library plans.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/tests/golden/plans/trixie-nocloud-arm64.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    assert_ne!(
        plan, golden,
        "the golden plan has the offline checks (--test), this one not"
    );
    // The golden plans' SOURCE_DATE_EPOCH (host/tests/plans.rs).
    let text = run_ok(
        imgvm(["build", "--dry-run", "--test", "--json", "--arch", "arm64"])
            .env("SOURCE_DATE_EPOCH", "1764547200")
            .arg(&recipe),
    );
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), golden);
    assert!(!out.exists(), "a dry run wrote {}", out.display());
}
