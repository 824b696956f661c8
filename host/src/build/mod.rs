//! `imgvm build`: recipe → actions → helper VM → image and its companions (manifest,
//! checksums, log), which appear in the output directory only once all are complete.

mod layout;
mod outputs;
mod steps;

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use crate::recipe::{OutputFormat, Recipe, Step};
use anyhow::{bail, Context, Result};
use imgvm_protocol::{Command, ErrorKind, Event};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use steps::Action;
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
}

/// The build log: every line of every step, with step boundaries and times.
struct Log {
    file: std::io::BufWriter<std::fs::File>,
}

impl Log {
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.file, "{text}");
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
    let (timings, packages) = match result {
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
    let outputs = outputs::write(
        recipe,
        &name,
        staging.path(),
        &disk,
        &packages,
        &timings,
        started,
        &mut log,
    )
    .await?;
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
    })
}

/// Boots the helper with the disk, runs every step, returns the step timings and the
/// installed packages.
async fn run_steps(
    options: &BuildOptions,
    disk: &Path,
    staging: &Path,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<(Vec<Timing>, Vec<outputs::Package>)> {
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

    let work = async {
        let mut phases: Vec<(String, Vec<Action>)> = vec![("partition and format".into(), steps::prepare_disk(recipe))];
        let count = recipe.steps.len();
        for (i, step) in recipe.steps.iter().enumerate() {
            let label = format!("step {}/{count} ({})", i + 1, step.kind());
            if let Step::Finalize(finalize) = step {
                // The package list and a rootfs tarball are taken before the image is unmounted.
                phases.push((label, steps::finalize_cleanup()));
                for (label, actions) in phases.drain(..) {
                    timings.push(run_phase(&helper, &label, actions, log, cancel).await?);
                }
                let packages = list_packages(&helper, cancel).await?;
                if recipe.outputs.contains(&OutputFormat::Rootfs) {
                    let started = Instant::now();
                    let tarball = staging.join("rootfs.tar");
                    crate::transfer::copy_out(&helper.session, &format!("{}/", steps::TARGET), &tarball, cancel)
                        .await?;
                    timings.push(Timing {
                        step: "rootfs tarball".into(),
                        seconds: started.elapsed().as_secs_f64(),
                    });
                }
                timings.push(
                    run_phase(
                        &helper,
                        "unmount",
                        steps::finalize_unmount(recipe, finalize.trim),
                        log,
                        cancel,
                    )
                    .await?,
                );
                return Ok::<_, anyhow::Error>(packages);
            }
            phases.push((label, steps::step(recipe, step)));
            for (label, actions) in phases.drain(..) {
                timings.push(run_phase(&helper, &label, actions, log, cancel).await?);
            }
        }
        unreachable!("recipes end with finalize")
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
    let packages = result?;
    shutdown?;
    Ok((timings, packages))
}

async fn run_phase(
    helper: &Helper,
    label: &str,
    actions: Vec<Action>,
    log: &mut Log,
    cancel: &CancellationToken,
) -> Result<Timing> {
    let started = Instant::now();
    tracing::info!("{label}");
    log.line(&format!("== {label}"));
    let spinner = crate::progress::spinner(label.to_owned());
    for action in actions {
        match action {
            Action::Script(script) => {
                let reply = run_script(helper, script, cancel, |_, line| {
                    tracing::debug!("{line}");
                    log.line(line);
                })
                .await?;
                match reply {
                    Ok(_) => {}
                    Err(e) if e.kind == ErrorKind::Cancelled => bail!("{label}: cancelled"),
                    Err(e) => {
                        spinner.finish_and_clear();
                        let tail = e.stderr_tail.iter().map(|l| format!("\n  {l}")).collect::<String>();
                        bail!("{label} failed: {}{tail}", e.message);
                    }
                }
            }
            Action::Upload { path, data, mode } => {
                let reply = helper
                    .session
                    .upload(&data[..], &path, imgvm_protocol::Transfer::File, mode, cancel)
                    .await?;
                reply.map_err(|e| anyhow::anyhow!("{label}: writing {path}: {e}"))?;
            }
            Action::Copy { from, to } => crate::transfer::copy_in(&helper.session, &from, &to, cancel)
                .await
                .with_context(|| format!("{label}: copying {}", from.display()))?,
        }
    }
    spinner.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    log.line(&format!("== {label}: {seconds:.1} s"));
    Ok(Timing {
        step: label.to_owned(),
        seconds,
    })
}

/// Runs `script` with `sh -c` in the helper, handing each output line to `on_line`
/// (with whether it came from stdout).
async fn run_script(
    helper: &Helper,
    script: String,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(bool, &str),
) -> Result<crate::session::Reply, crate::session::SessionError> {
    let command = Command {
        argv: vec!["sh".into(), "-c".into(), script],
        ..Default::default()
    };
    let on_event = |event| match event {
        Event::Stdout(line) => on_line(true, &String::from_utf8_lossy(&line)),
        Event::Stderr(line) => on_line(false, &String::from_utf8_lossy(&line)),
        Event::Progress { .. } => {}
    };
    helper.session.run(command, None, on_event, cancel).await
}

async fn list_packages(helper: &Helper, cancel: &CancellationToken) -> Result<Vec<outputs::Package>> {
    let mut lines = Vec::new();
    let reply = run_script(helper, steps::package_list(), cancel, |stdout, line| {
        if stdout {
            lines.push(line.to_owned());
        }
    })
    .await?;
    reply.map_err(|e| anyhow::anyhow!("listing the installed packages: {e}"))?;
    Ok(lines
        .iter()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(outputs::Package {
                name: f.next()?.into(),
                version: f.next()?.into(),
                architecture: f.next()?.into(),
            })
        })
        .collect())
}
