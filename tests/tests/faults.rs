//! The fault matrix: builds interrupted (Ctrl-C), killed (SIGKILL, then a new run), whose
//! helper kernel panics, or fed a broken mirror (500, truncated bodies, corrupted
//! packages), in the bootstrap, in a late step and in the output conversion. Each must
//! end within a bounded time with an error naming the cause, and leave no process, no
//! temporary file, no output but the failed build's log, and a cache whose every entry
//! still verifies.
//!
//! The builds share the test user's cache and one temporary directory, and the build
//! after a SIGKILL writes where the killed one did, so that what the killed build left
//! is found (and must be swept) by the next run. They go through local mirrors that pass
//! real packages through ([`imgvm_e2e::mirror`]). The late-step and conversion cells
//! share one mirror, so one bootstrap: the step cache holds it (and the finished image)
//! after one healthy build, and each cell starts from there.

use imgvm_e2e::mirror::{Fault, Mirror};
use imgvm_e2e::{give_to_user, imgvm, workdir};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Marks every process of these builds (imgvm, qemu, the vsock device inherit it), so
/// that what outlives a build is found whoever it runs as.
const MARKER: &str = "IMGVM_FAULT_MATRIX";

/// How long any cell may take from its start to imgvm's exit.
const BOUND: Duration = Duration::from_secs(300);

/// The cells run one after another: each checks that nothing of its own is left in the
/// shared cache and temporary directory, which another cell's build would fill.
static SERIAL: Mutex<()> = Mutex::new(());

struct Bench {
    dir: PathBuf,
    cache: PathBuf,
    tmp: PathBuf,
    marker: String,
}

/// One build of the matrix: its recipe (through its own mirror) and output directory.
struct Cell {
    name: &'static str,
    mirror: Arc<Mirror>,
    recipe: PathBuf,
    out: PathBuf,
}

/// How a cell knows the work it interrupts has started.
enum UnderWay {
    /// A host process of this name runs.
    Host(&'static str),
    /// The guest has had this long: what runs there cannot be seen from the host.
    Guest(Duration),
}

/// imgvm's exit code and the seconds it ran.
type Exit = (Option<i32>, f64);

struct Running {
    pid: i32,
    stderr: Arc<Mutex<String>>,
    /// Set when imgvm exits.
    exit: Arc<Mutex<Option<Exit>>>,
    started: Instant,
}

impl Running {
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.lock().unwrap()
    }

    /// Waits until `done` holds, while imgvm runs.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) {
        while !done(&self.stderr()) {
            if let Some((code, _)) = self.exited() {
                panic!("imgvm ended ({code:?}) before {what}:\n{}", self.stderr());
            }
            assert!(
                self.started.elapsed() < BOUND,
                "no {what} within {BOUND:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to imgvm (`group`: to its process group, as a terminal does on
    /// Ctrl-C).
    fn signal(&self, signal: i32, group: bool) {
        let pid = if group { -self.pid } else { self.pid };
        // SAFETY: kill(2) on the process (group) we started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for imgvm to exit, at most [`BOUND`] after it started: its exit code, its
    /// stderr and the seconds it ran.
    fn finish(self) -> (Option<i32>, String, f64) {
        let (code, seconds) = loop {
            if let Some(exit) = self.exited() {
                break exit;
            }
            if self.started.elapsed() > BOUND {
                self.signal(libc::SIGKILL, false);
                panic!("imgvm did not end within {BOUND:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // The reader thread sees EOF once every holder of the pipe is gone.
        std::thread::sleep(Duration::from_millis(200));
        (code, self.stderr(), seconds)
    }
}

impl Bench {
    fn new(name: &str) -> Bench {
        let dir = workdir(name);
        let tmp = dir.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        give_to_user(&tmp);
        Bench {
            marker: dir.display().to_string(),
            // Shared with the other tests: its appliance is there already.
            cache: imgvm_e2e::user_cache_dir(),
            dir,
            tmp,
        }
    }

    /// A tiny image through a mirror of its own with `fault`, built into `out`. Of
    /// another suite than the helper appliance's, whose packages are in the cache
    /// already: the mirror is asked for these from the bootstrap's first download on.
    fn cell(&self, name: &'static str, fault: Fault, out: &str) -> Cell {
        let mirror = Arc::new(Mirror::start(fault));
        self.cell_on(name, "bookworm", &mirror, "", "raw", out)
    }

    /// The tiny image of `suite` through `mirror`, with `steps` after its bootstrap
    /// (YAML list items) and `outputs`, built into `out`.
    fn cell_on(
        &self,
        name: &'static str,
        suite: &str,
        mirror: &Arc<Mirror>,
        steps: &str,
        outputs: &str,
        out: &str,
    ) -> Cell {
        let text = format!(
            "name: tiny\nsuite: {suite}\nmirror: {}\ndisk:\n  size: 1GiB\n  table: none\n  partitions:\n    \
             - {{name: root, type: root, filesystem: ext4, mount: /}}\nsteps:\n  \
             - bootstrap: {{variant: apt}}\n{steps}outputs: [{outputs}]\n",
            mirror.url
        );
        let stem = name.replace([' ', ','], "-");
        let recipe = self.dir.join(format!("{stem}.yaml"));
        std::fs::write(&recipe, text).unwrap();
        let out = self.dir.join(out);
        if !out.exists() {
            std::fs::create_dir(&out).unwrap();
            give_to_user(&out);
        }
        Cell {
            name,
            mirror: mirror.clone(),
            recipe,
            out,
        }
    }

    fn start(&self, cell: &Cell) -> Running {
        let mut child = imgvm(["build"])
            .arg(&cell.recipe)
            // The mirror is on loopback: trusted for this test.
            .args(["--arch", "amd64", "--trust-recipe", "-o"])
            .arg(&cell.out)
            .env("TMPDIR", &self.tmp)
            .env(MARKER, &self.marker)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group, as a shell gives a foreground job.
            .process_group(0)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let exit = Arc::new(Mutex::new(None));
        let (pid, done) = (child.id() as i32, exit.clone());
        std::thread::spawn(move || {
            let status = child.wait().unwrap();
            *done.lock().unwrap() = Some((status.code(), started.elapsed().as_secs_f64()));
        });
        Running {
            pid,
            stderr,
            exit,
            started,
        }
    }

    /// Starts `cell` and waits until imgvm says `what`, then until the work is under way
    /// (so that a signal finds it started).
    fn start_at(&self, cell: &Cell, what: &str, under_way: UnderWay) -> Running {
        let running = self.start(cell);
        running.wait_for(what, |e| e.contains(what));
        match under_way {
            UnderWay::Host(process) => running.wait_for(process, |_| {
                self.survivors().iter().any(|p| p.ends_with(&format!(" {process}")))
            }),
            UnderWay::Guest(time) => std::thread::sleep(time),
        }
        running
    }

    /// Interrupts `running` (of `cell`) with `signal` and checks what that left: after
    /// Ctrl-C (to the group, as a terminal sends it) a clean failure that says it was
    /// cancelled; after SIGKILL (to imgvm alone) no process, and its staging directory
    /// for the next run to sweep. What it said, and when it ended.
    fn interrupt(&self, cell: &Cell, running: Running, signal: i32) -> (String, f64) {
        if signal == libc::SIGINT {
            running.signal(signal, true);
            let result = failure(cell, running, "cancelled");
            self.assert_clean(cell);
            return result;
        }
        running.signal(signal, false);
        let (_, _, seconds) = running.finish();
        self.assert_no_survivors(cell.name);
        let staged = Bench::left_in(&cell.out);
        assert!(staged.iter().any(|n| n.starts_with(".imgvm-build-")), "{staged:?}");
        ("killed".into(), seconds)
    }

    /// Starts `cell` and waits until its bootstrap is fetching from the mirror.
    fn start_downloading(&self, cell: &Cell) -> Running {
        let running = self.start(cell);
        running.wait_for("the bootstrap", |e| e.contains("(bootstrap)"));
        let deadline = Instant::now() + BOUND;
        while cell.mirror.requests() == 0 {
            assert!(Instant::now() < deadline, "{}: the mirror was never asked", cell.name);
            std::thread::sleep(Duration::from_millis(100));
        }
        running
    }

    /// This test's processes still alive, as `pid name`.
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

    /// Waits a little for processes to go, then insists.
    fn assert_no_survivors(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.survivors().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            self.survivors(),
            Vec::<String>::new(),
            "{what}: processes outlived imgvm"
        );
    }

    /// What is in `dir`, dot files included.
    fn left_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// No process lives on, nothing temporary is left, the output directory holds at
    /// most the failed build's log (removed here, for the next cell), and the cache has
    /// nothing half-done and a store that verifies.
    fn assert_clean(&self, cell: &Cell) {
        self.assert_no_survivors(cell.name);
        assert_eq!(
            Self::left_in(&self.tmp),
            Vec::<String>::new(),
            "{}: temporary files left",
            cell.name
        );
        let log = "tiny-amd64.build-failed.log";
        let left: Vec<String> = Self::left_in(&cell.out).into_iter().filter(|n| n != log).collect();
        assert_eq!(left, Vec::<String>::new(), "{}: outputs left", cell.name);
        let _ = std::fs::remove_file(cell.out.join(log));
        let mut stack = vec![self.cache.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with(".imgvm-"),
                    "{}: {} left in the cache",
                    cell.name,
                    entry.path().display()
                );
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        assert!(imgvm_e2e::assert_store_verifies(&self.cache) > 0);
        imgvm_e2e::assert_states_whole(&self.cache.join("states"));
    }
}

/// Prints the matrix: each cell, the seconds from its start to imgvm's exit, and what
/// imgvm said.
fn print(matrix: &[(&str, f64, String)]) {
    eprintln!("fault matrix (seconds from start to exit):");
    for (cell, seconds, said) in matrix {
        eprintln!("  {cell:<28} {seconds:>6.1}  {said}");
    }
}

/// A cell that must fail naming `cause`: the line of imgvm's error that does, and the
/// seconds it took.
fn failure(cell: &Cell, running: Running, cause: &str) -> (String, f64) {
    let (code, stderr, seconds) = running.finish();
    assert_ne!(code, Some(0), "{}: the build succeeded:\n{stderr}", cell.name);
    // A Rust panic of imgvm (the guest kernel's panic is a cause it names).
    assert!(!stderr.contains(" panicked at "), "{}:\n{stderr}", cell.name);
    let said = stderr.lines().rev().find(|l| l.contains(cause));
    let said = said.unwrap_or_else(|| panic!("{}: expected `{cause}` in:\n{stderr}", cell.name));
    (said.trim().to_owned(), seconds)
}

#[test]
fn every_fault_in_the_bootstrap_ends_the_build_cleanly_and_names_its_cause() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bench = Bench::new("faults-bootstrap");
    let mut matrix: Vec<(&str, f64, String)> = Vec::new();

    // Ctrl-C while the bootstrap downloads: cancelled, saying so.
    let cell = bench.cell("bootstrap, Ctrl-C", Fault::None, "out");
    let running = bench.start_downloading(&cell);
    let (said, seconds) = bench.interrupt(&cell, running, libc::SIGINT);
    matrix.push((cell.name, seconds, said));

    // SIGKILL of imgvm alone, as `kill -9` does: its children must die with it. What it
    // had under way stays until the next run into the same directory sweeps it.
    let cell = bench.cell("bootstrap, SIGKILL", Fault::None, "out");
    let running = bench.start_downloading(&cell);
    let (said, seconds) = bench.interrupt(&cell, running, libc::SIGKILL);
    assert!(
        !Bench::left_in(&bench.tmp).is_empty(),
        "the killed run left no run directory"
    );
    matrix.push((cell.name, seconds, said));

    // The mirror fails every package it is asked for, three ways, in three builds at once
    // (they mostly wait on retries). The first writes where the killed build did.
    let cells = [
        (
            bench.cell("bootstrap, mirror 500", Fault::Status500, "out"),
            "HTTP status 500",
        ),
        (
            bench.cell("bootstrap, truncated bodies", Fault::Truncated, "out-truncated"),
            "failed after 5 attempt(s)",
        ),
        (
            bench.cell("bootstrap, corrupted .deb", Fault::Corrupted, "out-corrupted"),
            "the signed index says",
        ),
    ];
    let running: Vec<Running> = cells.iter().map(|(cell, _)| bench.start(cell)).collect();
    for ((cell, cause), running) in cells.iter().zip(running) {
        let (said, seconds) = failure(cell, running, cause);
        assert!(
            cell.mirror.faults_served() > 0,
            "{}: the mirror was never asked",
            cell.name
        );
        matrix.push((cell.name, seconds, said));
    }
    for (cell, _) in &cells {
        bench.assert_clean(cell);
    }

    print(&matrix);
}

/// The suite of the late-step and conversion cells: the helper appliance's, whose
/// packages are in the cache, so that their bootstrap is quick. Not the bootstrap
/// cells' (bookworm): those need their packages not to be in the cache, so that the
/// faulty mirror is asked for them.
const LATE_SUITE: &str = "trixie";

#[test]
fn every_fault_in_a_late_step_or_the_conversion_ends_the_build_cleanly_and_names_its_cause() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bench = Bench::new("faults-late");
    let mirror = Arc::new(Mirror::start(Fault::None));
    let mut matrix: Vec<(&str, f64, String)> = Vec::new();

    // One healthy build fills the step cache with the bootstrap and with the finished
    // image. Its 300 MiB of noise make the compressed conversion last long enough to be
    // interrupted.
    let noise = "  - run: {script: 'head -c 300M /dev/urandom > /var/noise'}\n";
    let healthy = bench.cell_on("healthy", LATE_SUITE, &mirror, noise, "qcow2-compressed", "out");
    let (code, stderr, _) = bench.start(&healthy).finish();
    assert_eq!(code, Some(0), "the healthy build failed:\n{stderr}");
    for name in Bench::left_in(&healthy.out) {
        std::fs::remove_file(healthy.out.join(name)).unwrap();
    }

    // A late step under way: Ctrl-C, then SIGKILL.
    let sleep = "  - run: {script: 'sleep 600'}\n";
    let cell = bench.cell_on("late step, Ctrl-C", LATE_SUITE, &mirror, sleep, "raw", "out");
    let running = bench.start_at(&cell, "(run)", UnderWay::Guest(Duration::from_secs(3)));
    assert!(running.stderr().contains("(bootstrap): from the step cache"));
    let (said, seconds) = bench.interrupt(&cell, running, libc::SIGINT);
    matrix.push((cell.name, seconds, said));

    let cell = bench.cell_on("late step, SIGKILL", LATE_SUITE, &mirror, sleep, "raw", "out");
    let running = bench.start_at(&cell, "(run)", UnderWay::Guest(Duration::from_secs(3)));
    let (said, seconds) = bench.interrupt(&cell, running, libc::SIGKILL);
    let states = Bench::left_in(&bench.cache.join("states"));
    assert!(
        states.iter().any(|n| n.starts_with(".imgvm-")),
        "the killed run left no work disk in the step cache: {states:?}"
    );
    matrix.push((cell.name, seconds, said));

    // The helper's kernel panics in a late step; this build also writes where the killed
    // one did, and must sweep what it left (checked by assert_clean).
    let panic = "  - run: {script: 'echo c > /proc/sysrq-trigger'}\n";
    let cell = bench.cell_on("late step, kernel panic", LATE_SUITE, &mirror, panic, "raw", "out");
    let (said, seconds) = failure(&cell, bench.start(&cell), "kernel panicked");
    bench.assert_clean(&cell);
    matrix.push((cell.name, seconds, said));

    // A late `apt` step meets a broken mirror, three ways (one package no other test
    // installs, so it is not in the verified store already).
    let apt = "  - apt: {install: [hello]}\n";
    for (name, fault, cause) in [
        ("late step, mirror 500", Fault::Status500, "HTTP status 500"),
        (
            "late step, truncated body",
            Fault::Truncated,
            "failed after 5 attempt(s)",
        ),
        ("late step, corrupted .deb", Fault::Corrupted, "the signed index says"),
    ] {
        mirror.set_fault(fault);
        let served = mirror.faults_served();
        let cell = bench.cell_on(name, LATE_SUITE, &mirror, apt, "raw", "out");
        let (said, seconds) = failure(&cell, bench.start(&cell), cause);
        // The proxy's 5 attempts, and no more: apt in the guest does not ask again for
        // what the proxy gave up on.
        let asked = mirror.faults_served() - served;
        assert!((1..=5).contains(&asked), "{name}: the mirror was asked {asked} times");
        bench.assert_clean(&cell);
        matrix.push((cell.name, seconds, said));
    }
    mirror.set_fault(Fault::None);

    // The conversion under way (the finished image comes from the step cache, so no VM
    // boots): Ctrl-C, then SIGKILL and a new run.
    let cell = bench.cell_on(
        "conversion, Ctrl-C",
        LATE_SUITE,
        &mirror,
        noise,
        "qcow2-compressed",
        "out",
    );
    let running = bench.start_at(&cell, "output qcow2-compressed", UnderWay::Host("qemu-img"));
    let (said, seconds) = bench.interrupt(&cell, running, libc::SIGINT);
    matrix.push((cell.name, seconds, said));

    let cell = bench.cell_on(
        "conversion, SIGKILL",
        LATE_SUITE,
        &mirror,
        noise,
        "qcow2-compressed",
        "out",
    );
    let running = bench.start_at(&cell, "output qcow2-compressed", UnderWay::Host("qemu-img"));
    let (said, seconds) = bench.interrupt(&cell, running, libc::SIGKILL);
    matrix.push((cell.name, seconds, said));
    // The next run into the same directory sweeps it and builds.
    let (code, stderr, _) = bench.start(&cell).finish();
    assert_eq!(code, Some(0), "the build after the kill failed:\n{stderr}");
    let left = Bench::left_in(&cell.out);
    assert!(left.iter().all(|n| !n.starts_with(".imgvm-")), "{left:?}");
    assert!(left.iter().any(|n| n == "tiny-amd64.qcow2"), "{left:?}");

    print(&matrix);
}
