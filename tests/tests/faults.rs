//! The fault matrix, for the bootstrap: builds interrupted (Ctrl-C), killed (SIGKILL,
//! then a new run) and fed a broken mirror (500, truncated bodies, corrupted packages).
//! Each must end within a bounded time with an error naming the cause, and leave no
//! process, no temporary file, no output but the failed build's log, and a cache whose
//! every entry still verifies.
//!
//! The cells run one after another in one test, on one output directory and temporary
//! directory and the test user's cache, so that what a killed build left is found (and must be swept)
//! by the next one. They go through a local mirror that passes real packages through
//! ([`imgvm_e2e::mirror`]). Faults in later steps and in the output conversion each
//! need a finished bootstrap; they wait for the step cache to make that affordable.

use imgvm_e2e::mirror::{Fault, Mirror};
use imgvm_e2e::{give_to_user, imgvm, workdir};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Marks every process of these builds (imgvm, qemu, the vsock device inherit it), so
/// that what outlives a build is found whoever it runs as.
const MARKER: &str = "IMGVM_FAULT_MATRIX";

/// How long any cell may take from the fault to imgvm's exit.
const BOUND: Duration = Duration::from_secs(240);

struct Bench {
    dir: PathBuf,
    out: PathBuf,
    cache: PathBuf,
    tmp: PathBuf,
    mirror: Mirror,
    marker: String,
    /// (cell, seconds from start to exit, what imgvm said)
    matrix: Vec<(String, f64, String)>,
}

struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl Running {
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `done` holds for imgvm's stderr so far.
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + BOUND;
        while !done(&self.stderr()) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("imgvm ended ({status}) before {what}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {BOUND:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to imgvm's process group, as a terminal does on Ctrl-C.
    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) on the group we started.
        assert_eq!(unsafe { libc::kill(-(self.child.id() as i32), signal) }, 0);
    }

    /// Waits for imgvm to exit, at most [`BOUND`]: its exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String, f64) {
        let deadline = Instant::now() + BOUND;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("imgvm did not end within {BOUND:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // The reader thread sees EOF once every holder of the pipe is gone.
        std::thread::sleep(Duration::from_millis(200));
        (status.code(), self.stderr(), self.started.elapsed().as_secs_f64())
    }
}

impl Bench {
    fn new() -> Bench {
        let dir = workdir("faults");
        let [out, tmp] = ["out", "tmp"].map(|d| {
            let path = dir.join(d);
            std::fs::create_dir(&path).unwrap();
            give_to_user(&path);
            path
        });
        Bench {
            marker: dir.display().to_string(),
            dir,
            out,
            // Shared with the other tests: its appliance is there already.
            cache: imgvm_e2e::user_cache_dir(),
            tmp,
            mirror: Mirror::start(),
            matrix: Vec::new(),
        }
    }

    /// A tiny image through the local mirror. Of another suite than the helper
    /// appliance's, whose packages are in the cache already: the mirror is asked for
    /// these from the bootstrap's first download on.
    fn recipe(&self, name: &str) -> PathBuf {
        let text = format!(
            "name: {name}\nsuite: bookworm\nmirror: {}\ndisk:\n  size: 1GiB\n  table: none\n  partitions:\n    \
             - {{name: root, type: root, filesystem: ext4, mount: /}}\nsteps:\n  \
             - bootstrap: {{variant: apt}}\noutputs: [raw]\n",
            self.mirror.url
        );
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, recipe: &Path) -> Running {
        let mut child = imgvm(["build"])
            .arg(recipe)
            // The mirror is on loopback: trusted for this test.
            .args(["--arch", "amd64", "--trust-recipe", "-o"])
            .arg(&self.out)
            .env("TMPDIR", &self.tmp)
            .env(MARKER, &self.marker)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group, as a shell gives a foreground job.
            .process_group(0)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        Running {
            child,
            stderr,
            started: Instant::now(),
        }
    }

    /// The pids of this test's builds' processes still alive, with their names.
    fn survivors(&self) -> Vec<String> {
        let needle = format!("{MARKER}={}", self.marker);
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ.split(|&b| b == 0).any(|var| var == needle.as_bytes()) {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                found.push(format!("{name} {}", comm.trim()));
            }
        }
        found
    }

    /// What imgvm left in `dir` (dot files included).
    fn left_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// No process lives on (after `grace`), nothing temporary is left, the output
    /// directory holds at most the failed build's log (removed here, for the next cell),
    /// and every cache entry is what its name says.
    fn assert_clean(&self, cell: &str, recipe_name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.survivors().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            self.survivors(),
            Vec::<String>::new(),
            "{cell}: processes outlived the build"
        );
        assert_eq!(
            Self::left_in(&self.tmp),
            Vec::<String>::new(),
            "{cell}: temporary files left"
        );
        let log = format!("{recipe_name}-amd64.build-failed.log");
        let left: Vec<String> = Self::left_in(&self.out).into_iter().filter(|n| *n != log).collect();
        assert_eq!(left, Vec::<String>::new(), "{cell}: outputs left");
        let _ = std::fs::remove_file(self.out.join(log));
        self.assert_cache_verifies(cell);
    }

    /// Nothing imgvm left half-done in the cache, and a store that verifies.
    fn assert_cache_verifies(&self, cell: &str) {
        let mut stack = vec![self.cache.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with(".imgvm-"),
                    "{cell}: {} left in the cache",
                    entry.path().display()
                );
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        assert!(
            imgvm_e2e::assert_store_verifies(&self.cache) > 0,
            "{cell}: the store is empty"
        );
    }

    /// A cell that must fail: its exit code, what imgvm said, recorded in the matrix.
    fn failed(&mut self, cell: &str, running: Running, recipe_name: &str, cause: &str) -> String {
        let (code, stderr, seconds) = running.finish();
        assert_ne!(code, Some(0), "{cell}: the build succeeded:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{cell}:\n{stderr}");
        assert!(stderr.contains(cause), "{cell}: expected `{cause}` in:\n{stderr}");
        let said = stderr
            .lines()
            .rev()
            .find(|l| l.contains(cause))
            .unwrap_or_default()
            .to_owned();
        self.matrix.push((cell.to_owned(), seconds, said));
        self.assert_clean(cell, recipe_name);
        stderr
    }

    /// SIGKILL of imgvm alone, as `kill -9` does: its children must die with it.
    fn killed(&mut self, cell: &str, mut running: Running) {
        running.child.kill().unwrap();
        let (_, _, seconds) = running.finish();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.survivors().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            self.survivors(),
            Vec::<String>::new(),
            "{cell}: processes outlived imgvm"
        );
        // What it had under way stays until the next run, which must sweep it.
        assert!(
            Self::left_in(&self.out).iter().any(|n| n.starts_with(".imgvm-build-")),
            "{cell}: killed before it staged anything: {:?}",
            Self::left_in(&self.out)
        );
        self.matrix.push((cell.to_owned(), seconds, "killed".into()));
    }
}

#[test]
fn every_fault_ends_the_build_cleanly_and_names_its_cause() {
    let mut bench = Bench::new();
    // --- in the bootstrap ---
    let plain = bench.recipe("plain");

    // Ctrl-C while the bootstrap downloads: cancelled, saying so.
    let mut running = bench.start(&plain);
    running.wait_for("the bootstrap", |e| e.contains("(bootstrap)"));
    let before = bench.mirror.requests();
    wait_until("a download", || bench.mirror.requests() > before);
    running.signal_group(libc::SIGINT);
    bench.failed("bootstrap, Ctrl-C", running, "plain", "cancelled");

    // SIGKILL while the bootstrap downloads; the next cell's run sweeps what it left.
    let mut running = bench.start(&plain);
    running.wait_for("the bootstrap", |e| e.contains("(bootstrap)"));
    let before = bench.mirror.requests();
    wait_until("a download", || bench.mirror.requests() > before);
    bench.killed("bootstrap, SIGKILL", running);

    // The mirror fails every package it is asked for, three ways.
    for (fault, cell, cause) in [
        (Fault::Status500, "bootstrap, mirror 500", "HTTP status 500"),
        (
            Fault::Truncated,
            "bootstrap, truncated bodies",
            "the mirror failed to deliver",
        ),
        (Fault::Corrupted, "bootstrap, corrupted .deb", "the signed index says"),
    ] {
        bench.mirror.set_fault(fault, "");
        let before = bench.mirror.faults_served();
        let running = bench.start(&plain);
        bench.failed(cell, running, "plain", cause);
        assert!(
            bench.mirror.faults_served() > before,
            "{cell}: the mirror was never asked"
        );
    }
    bench.mirror.set_fault(Fault::None, "");

    eprintln!("fault matrix (seconds from start to exit):");
    for (cell, seconds, said) in &bench.matrix {
        eprintln!("  {cell:<32} {seconds:>6.1}  {said}");
    }
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within {BOUND:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
