//! `imgvm build`: recipe → actions → helper VM → image and its companions (manifest,
//! checksums, log), which appear in the output directory only once all are complete.

mod layout;
mod outputs;
mod plan;

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use crate::recipe::Recipe;
use anyhow::{anyhow, bail, Context, Result};
use imgvm_protocol::{ErrorKind, Event, ImageOp, Operation, OperationError, Outcome, TARGET};
use indicatif::HumanBytes;
use plan::{Action, Phase};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncRead;
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
}

/// Wall time of one phase of the build, for the log, the manifest and `bench build`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    pub step: String,
    pub seconds: f64,
}

pub struct Report {
    pub outputs: Vec<PathBuf>,
    pub timings: Vec<Timing>,
    pub seconds: f64,
    pub tests: Option<TestReport>,
}

/// What the helper VM found out about the finished image.
#[derive(Default)]
struct Findings {
    packages: Vec<outputs::Package>,
    checks: Vec<CheckOutcome>,
}

/// One offline check's result, as reports show it.
#[derive(Debug, Clone, serde::Serialize)]
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

impl TestReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed) && self.boots.iter().all(|b| b.passed)
    }
}

/// The build log: every line of every step, with step boundaries and times.
struct Log {
    file: std::io::BufWriter<std::fs::File>,
}

impl Log {
    /// Flushed line by line, so that `tail -f` follows a running build.
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.file, "{text}");
        let _ = self.file.flush();
    }
}

pub async fn build(options: BuildOptions, cancel: CancellationToken) -> Result<Report> {
    let recipe = &options.recipe;
    let started = Instant::now();
    let name = format!("{}-{}", recipe.name, recipe.arch);
    std::fs::create_dir_all(&options.output).with_context(|| format!("creating {}", options.output.display()))?;
    // Outputs are assembled next to where they will end up, then renamed into place.
    let staging = tempfile::Builder::new()
        .prefix(".imgvm-build-")
        .tempdir_in(&options.output)
        .with_context(|| format!("cannot write in {}", options.output.display()))?;
    let disk = staging.path().join("disk.raw");
    std::fs::File::create(&disk)?.set_len(recipe.disk_size.bytes())?;
    let log_path = staging.path().join(format!("{name}.build.log"));
    let mut log = Log {
        file: std::io::BufWriter::new(std::fs::File::create(&log_path)?),
    };
    log.line(&format!(
        "imgvm {} building {} ({}) for {}",
        env!("CARGO_PKG_VERSION"),
        recipe.name,
        recipe.file.display(),
        recipe.arch
    ));

    let result = run_steps(&options, &disk, staging.path(), &mut log, &cancel).await;
    let (timings, findings) = match result {
        Ok(done) => done,
        Err(e) => {
            log.line(&format!("FAILED: {e:#}"));
            drop(log);
            // The log of a failed build is worth keeping; nothing else is.
            let kept = options.output.join(format!("{name}.build-failed.log"));
            let _ = std::fs::rename(&log_path, &kept);
            return Err(e.context(format!("building {name} failed (log: {})", kept.display())));
        }
    };
    let tests = if options.test {
        let boots = boot_tests(&options, &disk, &findings, &mut log, &cancel).await?;
        Some(TestReport {
            checks: findings.checks,
            boots,
        })
    } else {
        None
    };
    let mut outputs = outputs::write(
        recipe,
        &name,
        staging.path(),
        &disk,
        &findings.packages,
        &timings,
        tests.as_ref(),
        started,
        &mut log,
    )
    .await?;
    if let Some(tests) = &tests {
        let junit = staging.path().join(format!("{name}.junit.xml"));
        std::fs::write(&junit, junit_report(&name, tests))?;
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

/// Boots the finished disk (attached as a snapshot, so it stays as built) on each
/// firmware of its architecture.
async fn boot_tests(
    options: &BuildOptions,
    disk: &Path,
    findings: &Findings,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<Vec<crate::boottest::BootResult>> {
    let arch = options.recipe.arch;
    let mut results = Vec::new();
    for firmware in crate::boottest::firmware::defaults(arch) {
        let name = crate::boottest::firmware::name(arch, firmware);
        let label = format!("boot test ({name})");
        tracing::info!("{label}");
        let spinner = crate::progress::spinner(label.clone());
        let boot = crate::boottest::BootOptions {
            image: disk.to_owned(),
            arch,
            firmware,
            timeout: Duration::from_secs(900),
            memory_mib: 1024,
            cpus: options.cpus.unwrap_or_else(crate::helper::default_cpus),
            cloud_init: Some(findings.packages.iter().any(|p| p.name == "cloud-init")),
        };
        let result = crate::boottest::boot(&boot, cancel).await;
        spinner.finish_and_clear();
        let result = result?;
        let verdict = if result.passed { "PASS" } else { "FAIL" };
        log.line(&format!(
            "{verdict} {label} after {:.1} s: {}",
            result.seconds, result.message
        ));
        if !result.passed {
            log.line(&result.console_tail);
        }
        results.push(result);
    }
    Ok(results)
}

/// The test results as JUnit XML: one case per check and per boot.
fn junit_report(name: &str, tests: &TestReport) -> String {
    use crate::boottest::junit::{render, Case};
    let checks = tests.checks.iter().map(|c| Case {
        name: c.name.clone(),
        seconds: 0.0,
        failure: (!c.passed).then(|| (format!("expected {}, found {}", c.expected, c.actual), String::new())),
    });
    let boots = tests.boots.iter().map(|b| Case {
        name: format!("boot ({})", b.firmware),
        seconds: b.seconds,
        failure: (!b.passed).then(|| (b.message.clone(), b.console_tail.clone())),
    });
    render(name, &checks.chain(boots).collect::<Vec<_>>())
}

/// Boots the helper with the disk, runs every step, returns the step timings and the
/// installed packages.
async fn run_steps(
    options: &BuildOptions,
    disk: &Path,
    staging: &Path,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<(Vec<Timing>, Findings)> {
    let recipe = &options.recipe;
    let mut timings = Vec::new();
    let boot_started = Instant::now();
    let helper_options = HelperOptions {
        arch: recipe.arch,
        disks: vec![disk.to_owned()],
        memory_mib: options.memory_mib,
        cpus: options.cpus,
        boot_timeout: options.boot_timeout,
        mirror: options.helper_mirror.clone(),
        suite: options.helper_suite.clone(),
        bare: false,
        proxy_mirrors: vec![recipe.mirror.clone()],
    };
    let fetcher = Fetcher::default();
    let helper = tokio::select! {
        helper = Helper::boot(&helper_options, &fetcher) => helper?,
        _ = cancel.cancelled() => bail!("cancelled while starting the helper VM"),
    };
    timings.push(Timing {
        step: "boot".into(),
        seconds: boot_started.elapsed().as_secs_f64(),
    });

    let mut findings = Findings::default();
    let work = async {
        for phase in plan::plan(recipe, options.test) {
            timings.push(run_phase(&helper, recipe, phase, staging, &mut findings, log, cancel).await?);
        }
        Ok::<_, anyhow::Error>(())
    };
    let result = work.await;
    let (downloaded, cached) = helper.proxy.debs();
    tracing::info!(
        downloaded_debs = downloaded,
        cached_debs = cached,
        "package proxy: {downloaded} .deb downloaded, {cached} from the cache"
    );
    log.line(&format!(
        "package proxy: {downloaded} .deb downloaded, {cached} from the cache"
    ));
    let shutdown = helper.shutdown().await;
    result?;
    shutdown?;
    Ok((timings, findings))
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
    // The spinner shows what this step has fetched from the mirror so far.
    let ticker = {
        let (spinner, proxy, label) = (spinner.clone(), helper.proxy.clone(), label.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let bytes = proxy.downloaded_bytes() - downloaded_before;
                if bytes > 0 {
                    spinner.set_message(format!("{label} ({} downloaded)", HumanBytes(bytes)));
                }
            }
        })
    };
    let result = async {
        for action in phase.actions {
            run_action(helper, action, staging, findings, log, cancel).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    ticker.abort();
    spinner.finish_and_clear();
    if let Err(e) = result {
        return Err(match e.downcast::<OperationError>() {
            Ok(e) => failure(recipe, &label, e),
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
    Ok(Timing { step: label, seconds })
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
    let (op, input): (ImageOp, Option<Box<dyn AsyncRead + Send + Unpin>>) = match action {
        Action::Op(op) => (op, None),
        Action::Feed(op, bytes) => (op, Some(Box::new(std::io::Cursor::new(bytes)))),
        Action::Stream(op, path) if path.is_dir() => {
            let (mut tar, stdout) = crate::transfer::tar_stream(&path)?;
            request(helper, op, Some(Box::new(stdout)), log, cancel).await?;
            let status = tar.wait().await?;
            if !status.success() {
                bail!("tar of {} failed ({status})", path.display());
            }
            return Ok(());
        }
        Action::Stream(op, path) => {
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            (op, Some(Box::new(file)))
        }
        Action::ListPackages => {
            if let Outcome::Packages(list) = request(helper, ImageOp::ListPackages, None, log, cancel).await? {
                findings.packages = list
                    .into_iter()
                    .map(|p| outputs::Package {
                        name: p.name,
                        version: p.version,
                        architecture: p.architecture,
                    })
                    .collect();
            }
            return Ok(());
        }
        Action::Checks(checks) => {
            let (names, checks): (Vec<String>, Vec<_>) = checks.into_iter().unzip();
            if let Outcome::Checks(results) = request(helper, ImageOp::Check(checks), None, log, cancel).await? {
                for (name, r) in names.into_iter().zip(results) {
                    let verdict = if r.passed { "PASS" } else { "FAIL" };
                    log.line(&format!(
                        "{verdict} {name}: expected {}, found {}",
                        r.expected, r.actual
                    ));
                    findings.checks.push(CheckOutcome {
                        name,
                        passed: r.passed,
                        expected: r.expected,
                        actual: r.actual,
                    });
                }
            }
            return Ok(());
        }
        Action::RootfsTarball => {
            let tarball = staging.join("rootfs.tar");
            return crate::transfer::copy_out(&helper.session, &format!("{TARGET}/"), &tarball, cancel).await;
        }
    };
    request(helper, op, input, log, cancel).await.map(drop)
}

/// One image operation, its output lines going to the build log (and the debug log).
async fn request(
    helper: &Helper,
    op: ImageOp,
    input: Option<Box<dyn AsyncRead + Send + Unpin + '_>>,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    let on_event = |event| {
        if let Event::Stdout(line) | Event::Stderr(line) = event {
            let line = String::from_utf8_lossy(&line);
            tracing::debug!("{line}");
            log.line(&line);
        }
    };
    let reply = helper
        .session
        .request(Operation::Image(op), input, on_event, cancel)
        .await?;
    Ok(reply?)
}

/// The agent's error, worded for the user: which step, what went wrong, and for the
/// failures with a known cause what to do about it.
fn failure(recipe: &Recipe, label: &str, e: OperationError) -> anyhow::Error {
    let what = format!("{}: {label}", recipe.file.display());
    let tail: String = e.stderr_tail.iter().map(|l| format!("\n  {l}")).collect();
    match e.kind {
        ErrorKind::Cancelled => anyhow!("{what}: cancelled"),
        ErrorKind::MissingPackage => anyhow!("{what}: {}", e.message),
        ErrorKind::NoSpace => anyhow!(
            "{what}: {}\nThe disk is {}: raise `disk.size` in the recipe.",
            e.message,
            recipe.disk_size
        ),
        _ => anyhow!("{what} failed: {}: {}{tail}", e.operation, e.message),
    }
}
