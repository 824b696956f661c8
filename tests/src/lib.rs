//! Harness for the end-to-end tests: runs the real `imgvm` binary, as an unprivileged
//! user when the suite runs as root (imgvm promises to need no root, so the tests hold
//! it to that).

pub mod cyclonedx;
pub mod mirror;
pub mod terminal;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The user `cargo xtask setup` creates for this.
pub const TEST_USER: &str = "imgvm-test";

struct Env {
    bin: PathBuf,
    user: Option<User>,
    scratch: PathBuf,
}

struct User {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let built = std::env::var_os("IMGVM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/imgvm"));
        assert!(
            built.is_file(),
            "no imgvm binary at {}: run the suite with `cargo xtask test`",
            built.display()
        );
        let scratch = std::env::temp_dir().join(format!("imgvm-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let user = (unsafe { libc::geteuid() } == 0).then(lookup_test_user);
        // Copy imgvm and its agents where the test user can read them: the checkout may
        // live in root's home.
        let bin_dir = scratch.join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        for entry in std::fs::read_dir(built.parent().unwrap()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "imgvm" || name.starts_with("imgvm-agent-") {
                std::fs::copy(entry.path(), bin_dir.join(&name)).unwrap();
            }
        }
        Env {
            bin: bin_dir.join("imgvm"),
            user,
            scratch,
        }
    })
}

fn lookup_test_user() -> User {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, TEST_USER]).output().unwrap();
        assert!(
            out.status.success(),
            "user {TEST_USER} is missing: run `cargo xtask setup`"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let home = passwd
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{TEST_USER}:"))
                .and_then(|rest| rest.split(':').nth(4))
        })
        .map(PathBuf::from)
        .unwrap();
    User {
        uid: id("-u"),
        gid: id("-g"),
        home,
    }
}

/// `imgvm ARGS`, as the test user when running as root.
pub fn imgvm<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let env = env();
    let mut cmd = match &env.user {
        Some(user) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--init-groups")
                .arg("--")
                .arg(&env.bin)
                .env("HOME", &user.home)
                .env("USER", TEST_USER);
            cmd
        }
        None => Command::new(&env.bin),
    };
    cmd.args(args)
        .env_remove("IMGVM_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("IMGVM_AGENT_DIR")
        // A test that wants a build date sets it.
        .env_remove("SOURCE_DATE_EPOCH")
        .env(
            "PATH",
            format!("/usr/local/bin:{}", std::env::var("PATH").unwrap_or_default()),
        );
    cmd
}

/// The cache imgvm uses when it is not given one: the test user's, which the end-to-end
/// tests share (the appliance is assembled once for all of them).
pub fn user_cache_dir() -> PathBuf {
    let home = match &env().user {
        Some(user) => user.home.clone(),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")),
    };
    home.join(".cache/imgvm")
}

/// A fresh directory the test user owns.
pub fn workdir(name: &str) -> PathBuf {
    let env = env();
    let dir = env.scratch.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    give_to_user(&dir);
    dir
}

/// Makes a file or directory the test user's.
pub fn give_to_user(path: &Path) {
    if let Some(user) = &env().user {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).unwrap();
    }
}

/// The uid imgvm runs as in these tests.
pub fn imgvm_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    env().user.as_ref().map_or(unsafe { libc::geteuid() }, |u| u.uid)
}

/// A sparse file of `size` bytes owned by the test user.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    give_to_user(path);
}

/// Two numeric fields of the first JSON log line (`--log-format json`) that has both.
pub fn log_fields(stderr: &str, first: &str, second: &str) -> (u64, u64) {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| Some((v["fields"][first].as_u64()?, v["fields"][second].as_u64()?)))
        .unwrap_or_else(|| panic!("no {first} and {second} in the log:\n{stderr}"))
}

/// Output as text, with both streams in the panic message when the command failed.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Checks imgvm's verified store in the cache directory `cache`: every entry is what its
/// name (its SHA256) says, and nothing partial is left. The number of entries.
pub fn assert_store_verifies(cache: &Path) -> usize {
    use sha2::{Digest, Sha256};
    let mut count = 0;
    for entry in std::fs::read_dir(cache.join("archive/sha256")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "{name} left in the store");
        let sha: String = Sha256::digest(std::fs::read(entry.path()).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha, name, "{} does not verify", entry.path().display());
        count += 1;
    }
    count
}

/// Every state in the step cache directory `states` is whole: a qcow2 that `qemu-img
/// check` passes, with its description; no partial file is left.
pub fn assert_states_whole(states: &Path) {
    let Ok(entries) = std::fs::read_dir(states) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".imgvm-"), "{name} left in {}", states.display());
        if let Some(key) = name.strip_suffix(".qcow2") {
            assert!(
                states.join(format!("{key}.json")).is_file(),
                "{name} has no description"
            );
            run_ok(Command::new("qemu-img").args(["check", "-q"]).arg(entry.path()));
        }
    }
}
