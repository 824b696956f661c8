//! Golden encodings: one value of every image operation, every reply and every message,
//! as bytes on the wire. The agent and imgvm are built from the same source, but a
//! helper built by one imgvm version may talk to another: an encoding that changes
//! must come with a new `PROTOCOL_VERSION`, and this test says so instead of memory.
//!
//! `IMGVM_BLESS=1 cargo test -p imgvm-protocol --test golden` rewrites the file, and
//! refuses to unless `PROTOCOL_VERSION` changed along with the encodings.

use imgvm_protocol::*;
use std::path::Path;

fn s(text: &str) -> String {
    text.to_owned()
}

fn user() -> User {
    User {
        name: s("admin"),
        groups: vec![s("sudo")],
        shell: s("/bin/bash"),
        ssh_keys: vec![s("ssh-ed25519 AAAA admin")],
        sudo: true,
    }
}

/// One value of every image operation, in tag order.
fn operations() -> Vec<ImageOp> {
    vec![
        Partition {
            disk: s("/dev/vda"),
            table: Some(Table::Gpt),
            partitions: vec![PartitionSpec {
                number: 1,
                size_bytes: None,
                type_code: s("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
                uuid: Some(s("6b2c3f0e-8d41-8a7e-9c55-0d1e2f3a4b5c")),
                name: s("root"),
                bootable: false,
            }],
            label_id: Some(s("0f1e2d3c-4b5a-8978-8695-a4b3c2d1e0f9")),
        }
        .into(),
        Mkfs {
            device: s("/dev/vda1"),
            filesystem: Filesystem::Ext4,
            label: Some(s("root")),
            uuid: None,
            hash_seed: None,
            options: vec![s("-O"), s("^metadata_csum_seed")],
        }
        .into(),
        Mount {
            device: s("/dev/vda1"),
            path: s("/"),
        }
        .into(),
        Bootstrap {
            files: vec![TreeFile {
                path: s("/etc/kernel-img.conf"),
                mode: 0o644,
                content: Bytes(b"do_symlinks = no\n".to_vec()),
            }],
            suite: s("trixie"),
            variant: s("minbase"),
            arch: s("amd64"),
            mirror: s("http://deb.debian.org/debian"),
            components: vec![s("main")],
            include: vec![s("systemd-sysv")],
            keyring: Bytes(vec![0x99, 0x01]),
        }
        .into(),
        EnterChroot {
            source: AptSource {
                mirror: s("http://deb.debian.org/debian"),
                suite: s("trixie"),
                components: vec![s("main")],
            },
        }
        .into(),
        Apt {
            install: vec![s("vim")],
            remove: vec![s("nano")],
            purge: vec![],
            upgrade: true,
            recommends: false,
        }
        .into(),
        WriteFile {
            path: s("/etc/motd"),
            mode: 0o644,
            owner: s("root"),
        }
        .into(),
        Unpack {
            path: s("/opt"),
            owner: s("root:root"),
        }
        .into(),
        Script {
            script: s("echo hi"),
            env: vec![(s("A"), s("1"))],
            chroot: true,
        }
        .into(),
        Users(vec![user()]).into(),
        Hostname(s("web")).into(),
        Locale(s("C.UTF-8")).into(),
        Timezone(s("Etc/UTC")).into(),
        AptSources {
            name: s("debian"),
            deb822: true,
            entries: vec![SourceEntry {
                types: vec![s("deb")],
                uris: vec![s("https://deb.debian.org/debian")],
                suites: vec![s("trixie")],
                components: vec![s("main")],
                signed_by: Some(s("/usr/share/keyrings/debian-archive-keyring.gpg")),
            }],
        }
        .into(),
        Services {
            enable: vec![s("ssh")],
            disable: vec![],
            mask: vec![s("getty@tty1")],
        }
        .into(),
        Fstab(vec![FstabEntry {
            device: s("/dev/vda1"),
            key: FstabKey::Partuuid,
            mount: s("/"),
            filesystem: Filesystem::Ext4,
            options: s("defaults"),
            pass: 1,
        }])
        .into(),
        Bootloader {
            installs: vec![
                GrubInstall::Bios { disk: s("/dev/vda") },
                GrubInstall::Efi {
                    target: s("x86_64-efi"),
                },
                GrubInstall::Prep {
                    device: s("/dev/vda15"),
                },
            ],
            cmdline: s("console=ttyS0"),
            root_by_partuuid: true,
            timeout: 5,
        }
        .into(),
        Clean.into(),
        ListPackages.into(),
        RunChecks(vec![
            Check::File {
                path: s("/etc/hostname"),
                expect: FileExpect::ContainsLine(s("web")),
                optional: false,
            },
            Check::File {
                path: s("/etc/shadow"),
                expect: FileExpect::Mode(0o640),
                optional: false,
            },
            Check::File {
                path: s("/etc/resolv.conf"),
                expect: FileExpect::Kind(FileKind::Symlink),
                optional: true,
            },
            Check::File {
                path: s("/var/log"),
                expect: FileExpect::Only(vec![s("apt"), s("journal")]),
                optional: false,
            },
            Check::File {
                path: s("/etc/default/locale"),
                expect: FileExpect::Content(s("LANG=C.UTF-8\n")),
                optional: false,
            },
            Check::Glob {
                pattern: s("/boot/vmlinu[xz]*"),
                absent: false,
            },
            Check::Accounts {
                database: AccountDatabase::Passwd,
                expect: AccountExpect::Shells(vec![(s("root"), vec![s("/bin/bash")])]),
            },
            Check::Accounts {
                database: AccountDatabase::Group,
                expect: AccountExpect::Ids {
                    below: 1000,
                    also: vec![65534],
                },
            },
            Check::Package {
                name: s("vim"),
                version: None,
            },
            Check::ServiceEnabled { name: s("ssh") },
            Check::Command { script: s("true") },
        ])
        .into(),
        Unmount { trim: true }.into(),
        Debconf(vec![DebconfAnswer::new(
            "locales locales/default_environment_locale select C.UTF-8",
        )
        .unwrap()])
        .into(),
        SourceDateEpoch(1_764_000_000).into(),
        Seal {
            from: s("/dev/vda"),
            to: s("/dev/vdb"),
            filesystems: vec![SealedFilesystem {
                partition: Some(15),
                mount: s("/boot/efi"),
                mkfs: Mkfs {
                    device: s("/dev/vdb15"),
                    filesystem: Filesystem::Vfat,
                    label: None,
                    uuid: Some(s("1A2B-3C4D")),
                    hash_seed: None,
                    options: Vec::new(),
                },
            }],
        }
        .into(),
        ListFiles {
            device: s("/dev/vda1"),
            filesystem: Filesystem::Ext4,
        }
        .into(),
        Freeze.into(),
        Thaw.into(),
        Prefetch.into(),
    ]
}

/// The reply of every operation, in tag order.
fn replies() -> Vec<ImageReply> {
    let mut replies = Vec::new();
    for (tag, _) in ImageOp::ALL {
        replies.push(match tag {
            1 => ImageReply::Partition(()),
            2 => ImageReply::Mkfs(()),
            3 => ImageReply::Mount(()),
            4 => ImageReply::Bootstrap(()),
            5 => ImageReply::EnterChroot(()),
            6 => ImageReply::Apt(()),
            7 => ImageReply::WriteFile(()),
            8 => ImageReply::Unpack(()),
            9 => ImageReply::Script(()),
            10 => ImageReply::Users(()),
            11 => ImageReply::Hostname(()),
            12 => ImageReply::Locale(()),
            13 => ImageReply::Timezone(()),
            14 => ImageReply::AptSources(()),
            15 => ImageReply::Services(()),
            16 => ImageReply::Fstab(()),
            17 => ImageReply::Bootloader(()),
            18 => ImageReply::Clean(()),
            19 => ImageReply::ListPackages(vec![Package {
                name: s("base-files"),
                version: s("13.8"),
                architecture: s("amd64"),
                multi_arch: s("foreign"),
            }]),
            20 => ImageReply::RunChecks(vec![CheckResult {
                passed: false,
                expected: s("mode 0600"),
                actual: s("mode 0644"),
            }]),
            21 => ImageReply::Unmount(()),
            22 => ImageReply::Debconf(()),
            23 => ImageReply::SourceDateEpoch(()),
            24 => ImageReply::Seal(()),
            25 => ImageReply::ListFiles(vec![FileEntry {
                path: s("/etc/hostname"),
                kind: 'f',
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 10,
                mtime: 1_764_000_000,
                target: None,
                rdev: 0,
                sha256: Some(s("ab").repeat(32)),
            }]),
            26 => ImageReply::Freeze(()),
            27 => ImageReply::Thaw(()),
            28 => ImageReply::Prefetch(()),
            _ => panic!("tag {tag} has no golden reply: add one"),
        });
    }
    replies
}

fn messages() -> Vec<(String, Vec<u8>)> {
    let error = OperationError {
        operation: s("apt"),
        kind: ErrorKind::MissingPackage,
        message: s("package x is not in the archive"),
        errno: Some(2),
        exit_code: Some(100),
        stderr_tail: vec![s("E: Unable to locate package x")],
    };
    let host = [
        HostMessage::Welcome { protocol_version: 3 },
        HostMessage::Request {
            id: 7,
            operation: Operation::Run(Command {
                argv: vec![s("uname"), s("-a")],
                env: vec![(s("LANG"), s("C"))],
                cwd: Some(s("/")),
                stdin: true,
                image: None,
                terminal: None,
            }),
        },
        HostMessage::Request {
            id: 11,
            operation: Operation::Run(Command {
                argv: vec![s("/bin/sh")],
                env: vec![(s("TERM"), s("xterm"))],
                cwd: None,
                stdin: true,
                image: Some(Access::ReadOnly),
                terminal: Some(WindowSize { rows: 24, cols: 80 }),
            }),
        },
        HostMessage::Request {
            id: 8,
            operation: Operation::Upload {
                path: s("/tmp/x"),
                format: Transfer::File,
                mode: 0o600,
            },
        },
        HostMessage::Request {
            id: 9,
            operation: Operation::Download {
                path: s("/target/"),
                format: Transfer::Tar,
            },
        },
        HostMessage::Request {
            id: 10,
            operation: Operation::Image(Hostname(s("web")).into()),
        },
        HostMessage::Data {
            id: 7,
            chunk: vec![1, 2, 3],
        },
        HostMessage::EndOfData { id: 7 },
        HostMessage::Credit { id: 9, bytes: 32768 },
        HostMessage::Cancel { id: 7 },
        HostMessage::Resize {
            id: 11,
            size: WindowSize { rows: 50, cols: 132 },
        },
        HostMessage::Shutdown,
        HostMessage::Ack { bytes: 65536 },
    ];
    let guest = [
        GuestMessage::Hello(Handshake {
            protocol_version: 3,
            agent_version: s("0.1.0"),
            machine: s("x86_64"),
            kernel: s("6.12.0"),
        }),
        GuestMessage::Event {
            id: 7,
            event: Event::Stdout(b"out".to_vec()),
        },
        GuestMessage::Event {
            id: 7,
            event: Event::Stderr(b"err".to_vec()),
        },
        GuestMessage::Data {
            id: 9,
            chunk: vec![4, 5],
        },
        GuestMessage::EndOfData { id: 9 },
        GuestMessage::Credit { id: 8, bytes: 3 },
        GuestMessage::Done {
            id: 7,
            result: Ok(Outcome::Exited { code: 0 }),
        },
        GuestMessage::Done {
            id: 8,
            result: Ok(Outcome::Transferred { bytes: 3 }),
        },
        GuestMessage::Done {
            id: 10,
            result: Ok(Outcome::Image(ImageReply::Hostname(()))),
        },
        GuestMessage::Done {
            id: 7,
            result: Err(error),
        },
        GuestMessage::Heartbeat,
        GuestMessage::ReplyPart {
            id: 9,
            chunk: vec![0, 1],
        },
        GuestMessage::ReplyEnd { id: 9 },
    ];
    let mut out = Vec::new();
    for op in operations() {
        out.push((format!("op {}", op.name()), postcard::to_stdvec(&op).unwrap()));
    }
    for reply in replies() {
        out.push((format!("reply {}", reply.name()), postcard::to_stdvec(&reply).unwrap()));
    }
    for m in host {
        out.push((format!("host {m:?}").chars().take(60).collect(), encode(&m).unwrap()));
    }
    for m in guest {
        out.push((format!("guest {m:?}").chars().take(60).collect(), encode(&m).unwrap()));
    }
    out
}

fn render() -> String {
    let mut text = format!("protocol_version {PROTOCOL_VERSION}\n");
    for (name, bytes) in messages() {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{name}\n  {hex}\n"));
    }
    text
}

#[test]
fn every_operation_has_a_golden_value() {
    let tags: Vec<u32> = operations().iter().map(ImageOp::tag).collect();
    let all: Vec<u32> = ImageOp::ALL.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, all, "add the new operation to operations()");
}

#[test]
fn encodings_match_the_golden_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/encoding.txt");
    let now = render();
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    if now == before {
        return;
    }
    let version_line = format!("protocol_version {PROTOCOL_VERSION}\n");
    let same_version = before.starts_with(&version_line);
    if std::env::var_os("IMGVM_BLESS").is_some() {
        assert!(
            !same_version,
            "the encodings changed but PROTOCOL_VERSION did not: bump it in protocol/src/lib.rs"
        );
        std::fs::write(&path, now).unwrap();
        return;
    }
    panic!(
        "the wire encoding changed (see the diff against {}).\n{}\
         Then rerun with IMGVM_BLESS=1.",
        path.display(),
        if same_version {
            "Bump PROTOCOL_VERSION in protocol/src/lib.rs: agents and hosts of different builds must not talk.\n"
        } else {
            ""
        }
    );
}
