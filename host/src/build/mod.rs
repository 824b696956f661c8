//! `imgvm build`: a recipe's plan carried out in a helper VM → the image and its
//! companions (manifest, checksums, log), which appear in the output directory only once
//! all are complete.

mod debian_build;
mod format_ids;
mod outputs;
mod work_disk;

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use crate::lock::{Lock, LockFile, LockedRelease};
use crate::plan::{Action, NamedCheck, Phase};
use crate::recipe::Recipe;
use crate::recipe::SourceKind;
use anyhow::{bail, Context, Result};
use imgvm_protocol::{Access, Command, ErrorKind, Event, ListPackages, OperationError, Prefetch, RunChecks, TARGET};
use indicatif::HumanBytes;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct BuildOptions {
    pub recipe: Recipe,
    pub output: PathBuf,
    pub memory_mib: u32,
    pub cpus: Option<u32>,
    pub boot_timeout: Duration,
    /// Where the helper VM's appliance comes from (default: its definition's).
    pub helper_mirror: Option<String>,
    pub helper_suite: Option<String>,
    /// Run the recipe's offline checks and boot the image on each of its firmwares.
    pub test: bool,
    /// Install exactly the packages this lock names.
    pub lock: Option<LockFile>,
    /// Write only the lock (`imgvm lock`): no image, no other output.
    pub lock_only: bool,
    /// Neither reuse nor store states of the image after its steps ([`crate::states`]).
    pub no_cache: bool,
    /// When a step fails, open a shell in the image before the build ends ([`debug_shell`]).
    pub debug_shell: bool,
    /// Where the files the mirror no longer has are fetched: the recipe's snapshot, when
    /// the build follows a lock from the mirror it stands in for. Decided by the build
    /// ([`follow_lock_mirror`]).
    pub fallback: Option<String>,
}

impl BuildOptions {
    /// The helper VM as the command line asks for it, with no disk, proxy or pin yet.
    fn helper(&self) -> HelperOptions {
        HelperOptions {
            arch: self.recipe.arch,
            disks: Vec::new(),
            read_only: false,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            boot_timeout: self.boot_timeout,
            mirror: self.helper_mirror.clone(),
            suite: self.helper_suite.clone(),
            bare: false,
            proxy_mirrors: Vec::new(),
            fallback: None,
            pinned: Vec::new(),
            appliance: None,
        }
    }
}

/// A lock written from the mirror that the recipe's `snapshot:` stands in for is
/// followed from that mirror, so that the image names it as the locked one did; the
/// snapshot then serves only what the mirror no longer has.
fn follow_lock_mirror(mut options: BuildOptions) -> BuildOptions {
    let recipe = &mut options.recipe;
    if let (Some(lock), Some(declared)) = (&options.lock, &recipe.snapshot_for) {
        if lock.lock.mirror == *declared && lock.lock.mirror != recipe.mirror {
            tracing::info!(
                "following the lock from {declared}; what it no longer has comes from {}",
                recipe.mirror
            );
            let snapshot = std::mem::replace(&mut recipe.mirror, declared.clone());
            recipe.snapshot_for = None;
            options.fallback = Some(snapshot);
        }
    }
    options
}

/// Wall time of one phase of the build, for the log, the manifest and `bench build`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub step: String,
    pub seconds: f64,
    /// The step did not run: the image as it leaves it came from the step cache.
    #[serde(default)]
    pub cached: bool,
}

pub struct Report {
    pub outputs: Vec<PathBuf>,
    pub timings: Vec<Timing>,
    pub seconds: f64,
    pub tests: Option<TestReport>,
}

/// What the helper VM found out about the finished image (kept with it in the step
/// cache).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Findings {
    packages: Vec<imgvm_protocol::Package>,
    checks: Vec<CheckOutcome>,
}

/// One offline check's result, as reports show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckOutcome {
    pub name: String,
    pub passed: bool,
    pub expected: String,
    pub actual: String,
}

/// The results of `--test`: offline checks, then a boot per firmware.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TestReport {
    pub checks: Vec<CheckOutcome>,
    pub boots: Vec<crate::boottest::BootResult>,
}

impl CheckOutcome {
    pub fn case(&self) -> crate::report::Case {
        crate::report::Case {
            name: self.name.clone(),
            seconds: 0.0,
            passed: self.passed,
            message: if self.passed {
                String::new()
            } else {
                format!("expected {}, found {}", self.expected, self.actual)
            },
            details: String::new(),
        }
    }
}

impl TestReport {
    pub fn passed(&self) -> bool {
        self.cases().iter().all(|c| c.passed)
    }

    /// Every check, then every boot.
    pub fn cases(&self) -> Vec<crate::report::Case> {
        let checks = self.checks.iter().map(CheckOutcome::case);
        checks.chain(self.boots.iter().map(|b| b.case())).collect()
    }
}

/// The image's disk in the staging directory, before conversion to the outputs.
const DISK_FILE: &str = "disk.raw";

/// The build log: every line of every step, with step boundaries and times, up to
/// [`LOG_LIMIT`]: the guest decides how much its steps print.
struct Log {
    file: std::io::BufWriter<std::fs::File>,
    written: u64,
    /// The last line a step printed, for the progress report of a long step.
    last: Arc<Mutex<String>>,
}

/// Largest build log; a step that prints more has its further lines left out (the last
/// lines of a failure are in its error).
const LOG_LIMIT: u64 = 256 << 20;

/// How much of a step's last line a progress report quotes.
const TAIL_CHARS: usize = 120;

impl Log {
    fn new(file: std::fs::File) -> Log {
        Log {
            file: std::io::BufWriter::new(file),
            written: 0,
            last: Arc::default(),
        }
    }

    /// What [`Log::line`] last wrote (at most [`TAIL_CHARS`] of it), as it changes.
    fn tail(&self) -> Arc<Mutex<String>> {
        self.last.clone()
    }

    /// Flushed line by line, so that `tail -f` follows a running build.
    fn line(&mut self, text: &str) {
        if !text.trim().is_empty() {
            *self.last.lock().unwrap() = text.trim().chars().take(TAIL_CHARS).collect();
        }
        if self.written > LOG_LIMIT {
            return;
        }
        self.written += text.len() as u64 + 1;
        let _ = if self.written > LOG_LIMIT {
            writeln!(
                self.file,
                "[imgvm: the log reached {LOG_LIMIT} bytes; further lines are left out]"
            )
        } else {
            writeln!(self.file, "{text}")
        };
        let _ = self.file.flush();
    }
}

pub async fn build(options: BuildOptions, cancel: CancellationToken) -> Result<Report> {
    let options = follow_lock_mirror(options);
    let removed = crate::cache::trim(&crate::cache::verified(), crate::cache::limit());
    if removed > 0 {
        tracing::info!("cache: removed {} of least recently used packages", HumanBytes(removed));
    }
    let recipe = &options.recipe;
    let started = Instant::now();
    let name = recipe.output_name();
    let (release, epoch) = resolve(&options, true).await?;
    std::fs::create_dir_all(&options.output).with_context(|| format!("creating {}", options.output.display()))?;
    // Outputs are assembled next to where they will end up, then renamed into place.
    let staging = crate::leftovers::ClaimedDir::new_in(&options.output, ".imgvm-build-")
        .with_context(|| format!("cannot write in {}", options.output.display()))?;
    let disk = staging.path().join(DISK_FILE);
    let settings = settings(&options, epoch);
    if settings.image {
        std::fs::File::create(&disk)?.set_len(recipe.disk_size.bytes())?;
    }
    let log_path = staging.path().join(format!("{name}.build.log"));
    let mut log = Log::new(std::fs::File::create(&log_path)?);
    log.line(&format!(
        "imgvm {} building {} ({}) for {}",
        env!("CARGO_PKG_VERSION"),
        recipe.name,
        recipe.file.display(),
        recipe.arch
    ));

    log.line(&format!(
        "SOURCE_DATE_EPOCH={epoch}, release {} ({})",
        release.url, release.date
    ));
    let sealed = settings.image.then_some(disk.as_path());
    let result = run_steps(&options, &settings, release, sealed, staging.path(), &mut log, &cancel).await;
    if !options.no_cache {
        trim_states();
    }
    let (timings, findings, lock) = match result {
        Ok(done) => done,
        Err(e) => {
            log.line(&format!("FAILED: {e:#}"));
            drop(log);
            // The log of a failed build is worth keeping; nothing else is. `imgvm lock`
            // builds in a scratch directory: its log goes where the lock would have.
            let dir = match options.lock_only {
                true => recipe.lock_path().parent().map_or_else(|| ".".into(), Path::to_owned),
                false => options.output.clone(),
            };
            let kept = dir.join(format!("{name}.build-failed.log"));
            if std::fs::rename(&log_path, &kept).is_err() {
                let _ = std::fs::copy(&log_path, &kept);
            }
            return Err(e.context(format!("building {name} failed (log: {})", kept.display())));
        }
    };
    if options.lock_only {
        let file = staging.path().join(format!("{name}.lock"));
        std::fs::write(&file, lock.to_json())?;
        let dest = options.output.join(format!("{name}.lock"));
        std::fs::rename(&file, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
        return Ok(Report {
            outputs: vec![dest],
            timings,
            seconds: started.elapsed().as_secs_f64(),
            tests: None,
        });
    }
    let tests = if options.test {
        let boots = boot_tests(&options, &disk, &lock, &mut log, &cancel).await?;
        Some(TestReport {
            checks: findings.checks,
            boots,
        })
    } else {
        None
    };
    let written = outputs::write(
        recipe,
        &name,
        staging.path(),
        &disk,
        &findings.packages,
        &lock,
        &timings,
        tests.as_ref(),
        started,
        &mut log,
    );
    // Conversions of a large disk take minutes: Ctrl-C stops them too. Dropping the
    // conversion kills its qemu-img; the staging directory goes with `staging`.
    let mut outputs = tokio::select! {
        written = written => written?,
        () = cancel.cancelled() => bail!("cancelled while writing the outputs of {name}"),
    };
    if let Some(tests) = &tests {
        let junit = staging.path().join(format!("{name}.junit.xml"));
        std::fs::write(&junit, crate::report::junit(&name, &tests.cases()))?;
        outputs.push(junit);
    }
    log.line(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    drop(log);
    let mut placed = Vec::new();
    for file in outputs.iter().chain([&log_path]) {
        let dest = options.output.join(file.file_name().expect("output files have names"));
        std::fs::rename(file, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
        placed.push(dest);
    }
    Ok(Report {
        outputs: placed,
        timings,
        seconds: started.elapsed().as_secs_f64(),
        tests,
    })
}

/// Keeps the step cache within its limit, unless another build is using it (which
/// trims it when it ends). First removes the disks of builds that were killed: the sweep
/// when this build started may have come too soon after one died to be sure it had.
fn trim_states() {
    crate::leftovers::sweep_partial_files(&crate::states::dir());
    if let Ok(store) = crate::states::Store::exclusive() {
        let removed = store.trim(crate::states::limit());
        if removed > 0 {
            tracing::info!(
                "step cache: removed {} of least recently used states",
                HumanBytes(removed)
            );
        }
    }
}

/// What `imgvm build --dry-run` prints: the plan this build would carry out.
pub async fn plan(options: BuildOptions) -> Result<crate::plan::Plan> {
    let options = follow_lock_mirror(options);
    let (_, epoch) = resolve(&options, false).await?;
    Ok(crate::plan::plan(&options.recipe, &settings(&options, epoch)))
}

fn settings(options: &BuildOptions, epoch: i64) -> crate::plan::Settings {
    crate::plan::Settings {
        test: options.test,
        epoch,
        image: !options.lock_only,
    }
}

/// The release the build installs from and its `SOURCE_DATE_EPOCH`, before any VM
/// starts: a lock's (which fails now if it cannot be followed), else the one the mirror
/// serves now, which the build then keeps to as to a lock.
/// A dry run (`check_packages` false) does not look for the lock's packages.
async fn resolve(options: &BuildOptions, check_packages: bool) -> Result<(LockedRelease, i64)> {
    let recipe = &options.recipe;
    let release = match &options.lock {
        Some(lock) if !check_packages => lock.check(&subject(recipe))?.clone(),
        Some(lock) => {
            tracing::info!("following the lock {}", lock.path.display());
            let release = lock.check(&subject(recipe))?.clone();
            let (lock, fallback) = (lock.clone(), options.fallback.clone());
            tokio::task::spawn_blocking(move || {
                lock.available(
                    &release,
                    fallback.as_deref(),
                    &Fetcher::default(),
                    &crate::cache::verified(),
                )
                .map(|()| release)
            })
            .await??
        }
        None => {
            let archive = crate::archive::Archive::new(
                &recipe.mirror,
                &recipe.suite,
                &crate::cache::verified(),
                Fetcher::default(),
            );
            tokio::task::spawn_blocking(move || archive.release().map(|(_, locked)| locked)).await??
        }
    };
    let from_environment = std::env::var("SOURCE_DATE_EPOCH").ok();
    let lock = options.lock.as_ref().map(|l| &l.lock);
    let epoch = crate::lock::source_date_epoch(from_environment.as_deref(), lock, &release)?;
    Ok((release, epoch))
}

/// Boots the finished disk on each firmware of its architecture: a [`Probe`] of it,
/// prepared in a helper VM made of what built it (the lock's appliance).
///
/// [`Probe`]: crate::boottest::Probe
async fn boot_tests(
    options: &BuildOptions,
    disk: &Path,
    lock: &Lock,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<Vec<crate::boottest::BootResult>> {
    let recipe = &options.recipe;
    let arch = recipe.arch;
    let helper = HelperOptions {
        appliance: Some(lock.helper.clone()),
        ..options.helper()
    };
    let spinner = crate::progress::spinner("boot test: preparing the image's overlay".into());
    let probe =
        crate::boottest::Probe::prepare(disk, recipe.table, &recipe.partitions, Vec::new(), helper, cancel).await;
    spinner.finish_and_clear();
    let probe = probe?;
    let mut results = Vec::new();
    for firmware in crate::boottest::firmware::defaults(arch) {
        let name = crate::boottest::firmware::name(arch, firmware);
        let label = format!("boot test ({name})");
        tracing::info!("{label}");
        let spinner = crate::progress::spinner(label.clone());
        let boot = crate::boottest::BootOptions {
            arch,
            firmware,
            timeout: Duration::from_secs(900),
            memory_mib: 1024,
            cpus: options.cpus.unwrap_or_else(crate::helper::default_cpus),
            may_fail: recipe.boot_test.may_fail.clone(),
        };
        let result = crate::boottest::boot(&boot, &probe, cancel).await;
        spinner.finish_and_clear();
        let result = result?;
        log.line(&result.case().line());
        if !result.passed {
            log.line(&result.console_tail);
        }
        results.push(result);
    }
    Ok(results)
}

/// Boots the helper with the work disk and `sealed` (the image's), runs every step the
/// step cache does not have, returns the step timings, what the helper found out about
/// the image and its lock.
async fn run_steps(
    options: &BuildOptions,
    settings: &crate::plan::Settings,
    release: LockedRelease,
    sealed: Option<&Path>,
    staging: &Path,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<(Vec<Timing>, Findings, Lock)> {
    let recipe = &options.recipe;
    let mut timings = Vec::new();
    let boot_started = Instant::now();
    let helper_options = HelperOptions {
        proxy_mirrors: vec![recipe.mirror.clone()],
        fallback: options.fallback.clone().map(|archive| (recipe.mirror.clone(), archive)),
        pinned: vec![release.clone()],
        appliance: options.lock.as_ref().map(|lock| lock.lock.helper.clone()),
        ..options.helper()
    };
    let fetcher = Fetcher::default();
    let prepared = tokio::select! {
        prepared = Helper::prepare(&helper_options, &fetcher) => prepared?,
        _ = cancel.cancelled() => bail!("cancelled while preparing the helper VM"),
    };
    let plan = crate::plan::plan(recipe, settings);
    let size = recipe.disk_size.bytes();
    let keys = crate::states::keys(
        &crate::states::base(&[
            env!("CARGO_PKG_VERSION"),
            prepared.identity(),
            &release.sha256,
            &recipe.arch.to_string(),
            &size.to_string(),
        ]),
        &plan.phases,
    );
    let store = match options.no_cache {
        true => None,
        false => Some(crate::states::Store::open()?),
    };
    let arch = recipe.arch.to_string();
    let mut work = work_disk::WorkDisk::new(store, keys, staging, size, &recipe.name, &arch).await?;
    if let (Some(sealed), Some((image, result))) = (sealed, work.finished()) {
        // Every phase, down to the finished image, is in the step cache: no helper VM
        // boots. Unpacking takes a while for a large disk: Ctrl-C stops it too (dropping
        // it kills its qemu-img).
        tokio::select! {
            unpacked = unpack_finished(&image, sealed) => unpacked?,
            _ = cancel.cancelled() => bail!("cancelled while unpacking the finished image from the step cache"),
        };
        let findings: Findings = serde_json::from_value(result).context("the step cache's finished image")?;
        for phase in &plan.phases {
            tracing::info!("{}: from the step cache", phase.label);
            log.line(&format!("== {}: from the step cache", phase.label));
            timings.push(Timing {
                step: phase.label.clone(),
                seconds: 0.0,
                cached: true,
            });
        }
        let lock = stored_lock(options, settings, release, &findings, prepared.appliance(), log).await?;
        return Ok((timings, findings, lock));
    }
    let last = plan.phases.len() - 1;
    let last_label = plan.phases[last].label.clone();
    let mut disks = vec![work.path().to_owned()];
    disks.extend(sealed.map(Path::to_owned));
    let mut helper = tokio::select! {
        helper = prepared.boot(disks, options.boot_timeout) => helper?,
        _ = cancel.cancelled() => bail!("cancelled while starting the helper VM"),
    };
    timings.push(Timing {
        step: "boot".into(),
        seconds: boot_started.elapsed().as_secs_f64(),
        cached: false,
    });

    let mut findings = Findings::default();
    let resume = work.resume;
    if resume.is_some() {
        // apt's lists are in the stored image; the proxy learns what they list.
        let proxy = helper.proxy.clone();
        tokio::task::spawn_blocking(move || proxy.recall()).await?;
    }
    let steps = async {
        for (index, phase) in plan.phases.into_iter().enumerate() {
            let label = phase.label.clone();
            if cancel.is_cancelled() {
                bail!("cancelled before {label}");
            }
            if resume.is_some_and(|last| index <= last) {
                reenter(&helper, phase, staging, &mut findings, log, cancel).await?;
                timings.push(Timing {
                    step: label,
                    seconds: 0.0,
                    cached: true,
                });
                continue;
            }
            if sealed.is_some() && resume.is_some_and(|last| index == last + 1) {
                // The seal reads the whole image; this helper has read none of it yet.
                // Only speed depends on it: a failure is logged, the build goes on.
                if let Err(e) = helper.session.image(Prefetch, None, |_| {}, cancel).await? {
                    tracing::warn!("the helper cannot read the image ahead: {e}");
                }
            }
            timings.push(run_phase(&helper, recipe, phase, staging, &mut findings, log, cancel).await?);
            if index < last {
                work.keep(&helper, index, &label, log, cancel).await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    let result = match steps.await {
        Ok(()) => Ok(()),
        Err(e) if options.debug_shell && !cancel.is_cancelled() => {
            let e = helper.explain(e).await;
            debug_shell(&helper, &e, cancel).await;
            Err(e)
        }
        Err(e) => Err(helper.explain(e).await),
    };
    let (downloaded, cached) = helper.proxy.debs();
    tracing::info!(
        downloaded_debs = downloaded,
        cached_debs = cached,
        "package proxy: {downloaded} .deb downloaded, {cached} from the cache"
    );
    log.line(&format!(
        "package proxy: {downloaded} .deb downloaded, {cached} from the cache"
    ));
    let lock = lock_of(
        recipe,
        settings,
        &findings,
        &helper.proxy.listed(),
        helper.appliance.clone(),
        log,
    );
    let shutdown = helper.shutdown().await;
    result?;
    shutdown?;
    if let Some(locked) = &options.lock {
        locked.followed_by(&lock)?;
    }
    if let Some(sealed) = sealed {
        work.keep_finished(sealed, &last_label, serde_json::to_value(&findings)?, log)
            .await;
    }
    Ok((timings, findings, lock))
}

/// `--debug-shell`: says what failed, then opens a shell in the image as the failed step
/// left it (writable: it is the build's own disk), or in the helper when no image is
/// mounted. The build fails as it would have whatever happens in the shell.
async fn debug_shell(helper: &Helper, error: &anyhow::Error, cancel: &CancellationToken) {
    tracing::error!("{error:#}");
    tracing::info!("--debug-shell: a root shell in the image as the failed step left it; leave it to end the build");
    let session = &helper.session;
    let is_mounted = Command {
        argv: ["sh", "-c", &format!("grep -q ' {TARGET} ' /proc/self/mounts")]
            .map(str::to_owned)
            .to_vec(),
        ..Command::default()
    };
    let image = match session.run(is_mounted, None, |_| {}, cancel).await {
        Ok(Ok(_)) => Some(Access::ReadWrite),
        _ => {
            tracing::info!("--debug-shell: no image is mounted yet; the shell is in the helper VM");
            None
        }
    };
    let opened = crate::shell::open(session, image, Vec::new(), cancel).await;
    if let Err(e) = opened {
        tracing::warn!("--debug-shell: {e:#}");
    }
}

/// The lock of what the build installed, from what the proxy learnt from signed indices;
/// installed packages that no index read lists are named in the log.
fn lock_of(
    recipe: &Recipe,
    settings: &crate::plan::Settings,
    findings: &Findings,
    listed: &crate::lock::Listed,
    appliance: crate::lock::HelperLock,
    log: &mut Log,
) -> Lock {
    let lock = Lock::new(subject(recipe), settings.epoch, &findings.packages, listed, appliance);
    if !lock.unlisted.is_empty() {
        let names: Vec<_> = lock
            .unlisted
            .iter()
            .map(|p| format!("{} {}", p.name, p.version))
            .collect();
        let line = format!(
            "lock: {} installed packages are in no signed index read, and cannot be fetched again: {}",
            names.len(),
            names.join(", ")
        );
        tracing::warn!("{line}");
        log.line(&line);
    }
    lock
}

/// The finished image the step cache holds (qcow2), onto `sealed` (the raw disk).
async fn unpack_finished(image: &Path, sealed: &Path) -> Result<()> {
    let args = ["convert", "-f", "qcow2", "-O", "raw"].map(std::ffi::OsStr::new);
    outputs::run(
        "qemu-img",
        &[&args[..], &[image.as_os_str(), sealed.as_os_str()]].concat(),
    )
    .await
}

/// The lock of a finished image from the step cache: made from the pinned release's
/// indices in the verified cache, as a build's proxy would have learnt them.
async fn stored_lock(
    options: &BuildOptions,
    settings: &crate::plan::Settings,
    release: LockedRelease,
    findings: &Findings,
    appliance: crate::lock::HelperLock,
    log: &mut Log,
) -> Result<Lock> {
    let recipe = &options.recipe;
    let proxy = crate::proxy::Proxy::new(std::slice::from_ref(&recipe.mirror), Fetcher::default());
    proxy.pin(&[release]);
    let learnt = proxy.clone();
    tokio::task::spawn_blocking(move || learnt.recall()).await?;
    let lock = lock_of(recipe, settings, findings, &proxy.listed(), appliance, log);
    if let Some(locked) = &options.lock {
        locked.followed_by(&lock)?;
    }
    Ok(lock)
}

/// A phase whose result came from the step cache: only what it set up in the helper
/// (mounts, the chroot, `SOURCE_DATE_EPOCH`) is done again, for the phases after it.
async fn reenter(
    helper: &Helper,
    phase: Phase,
    staging: &Path,
    findings: &mut Findings,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<()> {
    tracing::info!("{}: from the step cache", phase.label);
    log.line(&format!("== {}: from the step cache", phase.label));
    for action in phase.actions {
        if matches!(&action, Action::Op(op) if op.sets_up_helper()) {
            run_action(helper, action, staging, findings, log, cancel)
                .await
                .with_context(|| format!("{} (again, after the step cache)", phase.label))?;
        }
    }
    Ok(())
}

/// The recipe, as its lock names it.
fn subject(recipe: &Recipe) -> crate::lock::Subject<'_> {
    crate::lock::Subject {
        recipe: &recipe.name,
        arch: recipe.arch.to_string(),
        suite: &recipe.suite,
        mirror: &recipe.mirror,
    }
}

async fn run_phase(
    helper: &Helper,
    recipe: &Recipe,
    phase: Phase,
    staging: &Path,
    findings: &mut Findings,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<Timing> {
    let label = phase.label;
    let started = Instant::now();
    tracing::info!("{label}");
    log.line(&format!("== {label}"));
    let downloaded_before = helper.proxy.downloaded_bytes();
    let spinner = crate::progress::spinner(label.clone());
    // The spinner shows what this step has fetched from the mirror so far; without a
    // terminal, a line every REPORT_EVERY says that and what the step last printed.
    let ticker = {
        let (spinner, proxy, label, tail) = (spinner.clone(), helper.proxy.clone(), label.clone(), log.tail());
        let (debs_before, report) = (proxy.debs(), !crate::progress::on_terminal());
        tokio::spawn(async move {
            let mut next_report = started + crate::progress::REPORT_EVERY;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let bytes = proxy.downloaded_bytes() - downloaded_before;
                if bytes > 0 {
                    spinner.set_message(format!("{label} ({} downloaded)", HumanBytes(bytes)));
                }
                if report && Instant::now() >= next_report {
                    next_report += crate::progress::REPORT_EVERY;
                    let (downloaded, cached) = proxy.debs();
                    let debs = downloaded + cached - debs_before.0 - debs_before.1;
                    let tail = crate::text::printable(&tail.lock().unwrap()).into_owned();
                    tracing::info!(
                        "{label}: {:.0} s so far, {debs} packages fetched ({} from the mirror); last: {tail}",
                        started.elapsed().as_secs_f64(),
                        HumanBytes(bytes)
                    );
                }
            }
        })
    };
    let step_cancel = cancel.child_token();
    let work = async {
        for action in phase.actions {
            run_action(helper, action, staging, findings, log, &step_cancel).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let result = within(phase.timeout.0, &step_cancel, work).await;
    ticker.abort();
    spinner.finish_and_clear();
    let result = match result {
        Ok(result) => result,
        Err(TimedOut) => bail!(
            "{}: {label} did not finish within {}, and was stopped (raise the step's `timeout:` \
             or the recipe's `step_timeout:` if it needs longer)",
            recipe.file.display(),
            phase.timeout
        ),
    };
    if let Err(e) = result {
        return Err(match e.downcast::<OperationError>() {
            Ok(agent) => StepError {
                file: recipe.file.clone(),
                step: label,
                agent,
                disk_size: recipe.disk_size,
            }
            .into(),
            Err(e) => e.context(format!("{label} failed")),
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let downloaded = helper.proxy.downloaded_bytes() - downloaded_before;
    let fetched = if downloaded > 0 {
        format!(", {} downloaded", HumanBytes(downloaded))
    } else {
        String::new()
    };
    tracing::info!("{label}: {seconds:.1} s{fetched}");
    log.line(&format!("== {label}: {seconds:.1} s{fetched}"));
    Ok(Timing {
        step: label,
        seconds,
        cached: false,
    })
}

/// `work` ran longer than it may.
#[derive(Debug, PartialEq, Eq)]
struct TimedOut;

/// How long a timed-out step may take to stop; a guest that does not stop it is shut
/// down with the helper VM.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// `work`'s result, or after `limit` [`TimedOut`]: then `token` (which `work` carries
/// out its operations with) is cancelled and `work` is awaited until it ends (at most
/// [`STOP_GRACE`]), so the agent has stopped the operation before the build fails.
async fn within<T>(
    limit: Duration,
    token: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Result<T, TimedOut> {
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => Ok(result),
        _ = tokio::time::sleep(limit) => {
            token.cancel();
            let _ = tokio::time::timeout(STOP_GRACE, work).await;
            Err(TimedOut)
        }
    }
}

/// Carries out one planned action; an agent's refusal comes back as an `OperationError`
/// inside the `anyhow::Error`, for [`failure`] to word.
async fn run_action(
    helper: &Helper,
    action: Action,
    staging: &Path,
    findings: &mut Findings,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<()> {
    let session = &helper.session;
    let on_event = |event| {
        let (Event::Stdout(line) | Event::Stderr(line)) = event;
        let line = String::from_utf8_lossy(&line);
        tracing::debug!("{line}");
        log.line(&line);
    };
    match action {
        Action::Op(op) => session.image_op(op, None, on_event, cancel).await??,
        Action::Feed { op, content } => {
            let input = Box::new(std::io::Cursor::new(content.into_bytes()));
            session.image_op(op, Some(input), on_event, cancel).await??
        }
        Action::Stream { op, source } => match source.kind {
            SourceKind::Directory { .. } => {
                let (mut tar, stdout) = crate::transfer::tar_stream(&source.path)?;
                session.image_op(op, Some(Box::new(stdout)), on_event, cancel).await??;
                let status = tar.wait().await?;
                if !status.success() {
                    bail!("tar of {} failed ({status})", source.path.display());
                }
                return Ok(());
            }
            SourceKind::File { .. } => {
                let file = tokio::fs::File::open(&source.path)
                    .await
                    .with_context(|| format!("cannot read {}", source.path.display()))?;
                session.image_op(op, Some(Box::new(file)), on_event, cancel).await??
            }
        },
        Action::ListPackages => {
            findings.packages = session.image(ListPackages, None, on_event, cancel).await??;
            return Ok(());
        }
        Action::Checks(checks) => {
            let wanted = checks.iter().map(|c| c.check.clone()).collect();
            let results = session.image(RunChecks(wanted), None, on_event, cancel).await??;
            for outcome in check_outcomes(checks, results)? {
                log.line(&outcome.case().line());
                findings.checks.push(outcome);
            }
            return Ok(());
        }
        Action::RootfsTarball => {
            let tarball = staging.join("rootfs.tar");
            // The tree cannot hold more than the disk (the image's is as large as the
            // one it is built on); sparse files expanded by tar could, and then the
            // guest is not to be believed.
            let limit = 2 * std::fs::metadata(staging.join(DISK_FILE))?.len();
            return crate::transfer::copy_out(session, &format!("{TARGET}/"), &tarball, Some(limit), cancel).await;
        }
    };
    Ok(())
}

/// Pairs the planned checks with the agent's results, one for one: a guest that drops
/// or invents results must not turn into a pass.
pub fn check_outcomes(checks: Vec<NamedCheck>, results: Vec<imgvm_protocol::CheckResult>) -> Result<Vec<CheckOutcome>> {
    if results.len() != checks.len() {
        bail!(
            "the agent answered {} offline checks with {} results",
            checks.len(),
            results.len()
        );
    }
    Ok(checks
        .into_iter()
        .zip(results)
        .map(|(named, r)| CheckOutcome {
            name: named.name,
            passed: r.passed,
            expected: r.expected,
            actual: r.actual,
        })
        .collect())
}

/// A step the agent refused: which recipe and step, and the agent's structured error.
/// Shown worded for the user, with advice for the failures whose cause is known.
#[derive(Debug, thiserror::Error)]
#[error("{}: {step}{}", file.display(), self.worded())]
pub struct StepError {
    pub file: PathBuf,
    /// `step 3/12 (apt)`.
    pub step: String,
    pub agent: OperationError,
    disk_size: crate::recipe::Size,
}

impl StepError {
    fn worded(&self) -> String {
        let e = &self.agent;
        match e.kind {
            ErrorKind::Cancelled => ": cancelled".into(),
            ErrorKind::MissingPackage => format!(": {}", e.message),
            ErrorKind::NoSpace => format!(
                ": {}\nThe disk is {}: raise `disk.size` in the recipe.",
                e.message, self.disk_size
            ),
            _ => {
                let tail: String = e.stderr_tail.iter().map(|l| format!("\n  {l}")).collect();
                format!(" failed: {}: {}{tail}", e.operation, e.message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgvm_protocol::{Check, CheckResult};

    #[tokio::test(start_paused = true)]
    async fn a_step_over_its_time_is_cancelled_and_awaited() {
        let token = CancellationToken::new();
        let stopped = std::sync::atomic::AtomicBool::new(false);
        // Stands for an operation: it ends only when cancelled, as the agent's do.
        let work = async {
            token.cancelled().await;
            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        };
        let started = tokio::time::Instant::now();
        assert_eq!(within(Duration::from_secs(30), &token, work).await, Err(TimedOut));
        assert!(
            stopped.load(std::sync::atomic::Ordering::Relaxed),
            "the operation was not stopped"
        );
        assert_eq!(started.elapsed().as_secs(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_will_not_stop_is_abandoned_after_the_grace() {
        let token = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let result = within(Duration::from_secs(30), &token, std::future::pending::<()>()).await;
        assert_eq!(result, Err(TimedOut));
        assert_eq!(started.elapsed(), Duration::from_secs(30) + STOP_GRACE);
    }

    #[test]
    fn the_build_log_stops_growing_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = Log::new(std::fs::File::create(&path).unwrap());
        let line = "x".repeat(1 << 20);
        for _ in 0..(LOG_LIMIT >> 20) + 10 {
            log.line(&line);
        }
        drop(log);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= LOG_LIMIT + 200, "{size}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("further lines are left out]\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_in_time_is_left_alone() {
        let token = CancellationToken::new();
        assert_eq!(within(Duration::from_secs(30), &token, async { 7 }).await, Ok(7));
        assert!(!token.is_cancelled());
    }

    fn named(name: &str) -> NamedCheck {
        NamedCheck {
            name: name.into(),
            check: Check::ServiceEnabled { name: name.into() },
        }
    }

    #[test]
    fn step_errors_name_the_step_and_advise_on_known_causes() {
        let error = |kind, message: &str| StepError {
            file: "r.yaml".into(),
            step: "step 2/3 (apt)".into(),
            agent: OperationError {
                operation: "apt".into(),
                kind,
                message: message.into(),
                errno: None,
                exit_code: Some(100),
                stderr_tail: vec!["E: oops".into()],
            },
            disk_size: crate::recipe::Size(700 << 20),
        };
        assert_eq!(
            error(ErrorKind::NoSpace, "the image is full").to_string(),
            "r.yaml: step 2/3 (apt): the image is full\nThe disk is 700MiB: raise `disk.size` in the recipe."
        );
        assert_eq!(
            error(ErrorKind::CommandFailed, "`apt-get` exited with status 100").to_string(),
            "r.yaml: step 2/3 (apt) failed: apt: `apt-get` exited with status 100\n  E: oops"
        );
        assert_eq!(
            error(ErrorKind::Cancelled, "cancelled by the host").to_string(),
            "r.yaml: step 2/3 (apt): cancelled"
        );
    }

    #[test]
    fn checks_need_one_result_each() {
        let err = check_outcomes(vec![named("a"), named("b")], Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "the agent answered 2 offline checks with 0 results");
        let result = |passed| CheckResult {
            passed,
            expected: "enabled".into(),
            actual: "disabled".into(),
        };
        let outcomes = check_outcomes(vec![named("a"), named("b")], vec![result(true), result(false)]).unwrap();
        let report = TestReport {
            checks: outcomes,
            boots: Vec::new(),
        };
        assert!(!report.passed());
        let lines: Vec<String> = report.cases().iter().map(|c| c.line()).collect();
        assert_eq!(lines, ["PASS  a", "FAIL  b: expected enabled, found disabled"]);
    }
}
