//! The helper VM as one thing: appliance, agent, VM and session, booted together, with
//! the KVM probe and the fallback to TCG.

use crate::appliance::Spec;
use crate::arch::Arch;
use crate::archive::Fetcher;
use crate::lock::HelperLock;
use crate::session::{Session, SessionError};
use crate::vm::{Accel, Vm, VmConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a KVM boot may take before KVM is judged unusable on this host.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serial console lines shown when the helper VM fails to come up.
const CONSOLE_TAIL: usize = 30;

pub struct HelperOptions {
    pub arch: Arch,
    pub disks: Vec<PathBuf>,
    /// Attach the disks read-only.
    pub read_only: bool,
    pub memory_mib: u32,
    pub cpus: Option<u32>,
    pub boot_timeout: Duration,
    pub mirror: Option<String>,
    pub suite: Option<String>,
    /// Boot an initramfs with nothing but the agent and its modules (for measuring).
    pub bare: bool,
    /// Mirrors the guest's package proxy may fetch from, besides the appliance's own.
    pub proxy_mirrors: Vec<String>,
    /// A mirror, and the archive that serves what it no longer has ([`crate::proxy::Proxy::fall_back`]).
    pub fallback: Option<(String, String)>,
    /// Releases the proxy serves as a lock names them ([`crate::proxy::Proxy::pin`]).
    pub pinned: Vec<crate::lock::LockedRelease>,
    /// The appliance a lock names ([`Spec::pinned`]).
    pub appliance: Option<HelperLock>,
}

pub struct Helper {
    pub vm: Vm,
    /// The disks attached, for saying which one could not be written.
    disks: Vec<PathBuf>,
    pub session: Session,
    /// Launch to agent handshake.
    pub boot_time: Duration,
    /// The guest's package proxy, for its statistics.
    pub proxy: std::sync::Arc<crate::proxy::Proxy>,
    /// What the appliance consists of, for the lock of what it builds.
    pub appliance: HelperLock,
}

/// A helper VM ready to boot: its appliance assembled, its agent loaded, its package
/// proxy set up. What it is made of is known before it boots ([`Prepared::identity`]).
pub struct Prepared {
    config: VmConfig,
    proxy: std::sync::Arc<crate::proxy::Proxy>,
    built_from: HelperLock,
    identity: String,
}

impl Prepared {
    /// SHA256 over everything the helper runs steps with: the appliance's release and
    /// packages and the agent. Two helpers with the same identity do the same steps.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// What the appliance consists of, for the lock of what it builds.
    pub fn appliance(&self) -> HelperLock {
        self.built_from.clone()
    }

    /// Boots the helper with `disks` attached, trying KVM first where it may work.
    pub async fn boot(self, disks: Vec<PathBuf>, timeout: Duration) -> Result<Helper> {
        let Prepared {
            mut config,
            proxy,
            built_from,
            ..
        } = self;
        config.disks = disks;
        let arch = config.arch;
        let (accel, why_not_kvm) = Accel::choose(arch);
        if accel == Accel::Kvm {
            config.accel = Accel::Kvm;
            match Helper::start(&config, KVM_PROBE_TIMEOUT, proxy.clone(), built_from.clone()).await {
                Ok(helper) => {
                    Accel::record_probe(true);
                    return Ok(helper);
                }
                Err(e) => {
                    // Whatever went wrong, TCG may still work; remember not to try again.
                    Accel::record_probe(false);
                    let reason = format!("{e:#}");
                    let reason = reason.lines().next().unwrap_or_default();
                    tracing::warn!(
                        "KVM did not boot the helper VM ({reason}); falling back to TCG (software emulation)"
                    );
                    config.accel = Accel::Tcg;
                }
            }
        } else if let Some(why) = why_not_kvm {
            tracing::info!("using TCG (software emulation, {} vCPUs): {why}", config.cpus);
        }
        Helper::start(&config, timeout, proxy, built_from).await
    }
}

impl Helper {
    pub async fn boot(options: &HelperOptions, fetcher: &Fetcher) -> Result<Helper> {
        Helper::prepare(options, fetcher)
            .await?
            .boot(options.disks.clone(), options.boot_timeout)
            .await
    }

    /// Everything before booting (`options.disks` is not looked at).
    pub async fn prepare(options: &HelperOptions, fetcher: &Fetcher) -> Result<Prepared> {
        let arch = options.arch;
        let mut spec = Spec::new(arch, options.mirror.as_deref(), options.suite.as_deref())?;
        if let Some(pin) = &options.appliance {
            spec = spec.pinned(pin.clone())?;
        }
        let mut mirrors = vec![spec.definition.mirror.clone()];
        mirrors.extend(options.proxy_mirrors.iter().cloned());
        let proxy = crate::proxy::Proxy::new(&mirrors, fetcher.clone());
        proxy.pin(&options.pinned);
        if let Some((mirror, archive)) = &options.fallback {
            proxy.fall_back(mirror, archive);
        }
        let fetcher = fetcher.clone();
        let stats = fetcher.clone();
        let appliance = tokio::task::spawn_blocking(move || spec.ensure(&fetcher, false)).await??;
        tracing::info!(
            downloaded_files = stats.stats().files(),
            downloaded_bytes = stats.stats().bytes(),
            "appliance {}",
            appliance.dir.display()
        );
        let agent = crate::agent::load(arch)?;
        let initrd = appliance.initrd(&agent, options.bare)?;
        let built_from = appliance.manifest.built_from.clone();
        let identity = {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            hasher.update(serde_json::to_vec(&built_from)?);
            hasher.update(&agent);
            crate::archive::hex(&hasher.finalize())
        };
        let config = VmConfig {
            arch,
            kernel: appliance.kernel(),
            initrd,
            disks: Vec::new(),
            read_only: options.read_only,
            memory_mib: options.memory_mib,
            cpus: options.cpus.unwrap_or_else(default_cpus),
            accel: Accel::Tcg,
        };
        Ok(Prepared {
            config,
            proxy,
            built_from,
            identity,
        })
    }

    async fn start(
        config: &VmConfig,
        timeout: Duration,
        proxy: std::sync::Arc<crate::proxy::Proxy>,
        appliance: HelperLock,
    ) -> Result<Helper> {
        let started = Instant::now();
        let spinner = crate::progress::spinner(format!("booting the {} helper VM", config.arch));
        let mut vm = Vm::start(config).await?;
        let result = async {
            let (reader, writer) = vm.accept(timeout).await?;
            let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_secs(5));
            Ok::<_, anyhow::Error>(Session::connect(reader, writer, left, crate::session::SILENCE_LIMIT).await?)
        }
        .await;
        spinner.finish_and_clear();
        match result {
            Ok(session) => {
                let boot_time = started.elapsed();
                tracing::info!(
                    "helper VM up in {:.1} s ({})",
                    boot_time.as_secs_f64(),
                    config.accel.name()
                );
                vm.serve_proxy(proxy.clone());
                Ok(Helper {
                    appliance,
                    vm,
                    disks: config.disks.clone(),
                    session,
                    boot_time,
                    proxy,
                })
            }
            Err(e) => {
                let tail = vm.console_tail(CONSOLE_TAIL);
                drop(vm);
                Err(e.context(format!(
                    "the {} helper VM did not come up\n--- last lines of its serial console ---\n{tail}\n---",
                    config.arch
                )))
            }
        }
    }

    /// `error` with what the package proxy could not get from the mirror, and with what
    /// the VM's state says about it when the session to the agent broke: a paused VM
    /// (qemu stops a guest whose disk write failed with ENOSPC, and the agent then looks
    /// hung) is the host's full disk; a panicked guest is a crash.
    pub async fn explain(&mut self, error: anyhow::Error) -> anyhow::Error {
        // The guest only saw a 502; the host knows what the mirror did.
        let error = match self.proxy.failures() {
            Some(failures) => error.context(format!("the mirror failed to deliver:\n{failures}")),
            None => error,
        };
        let broken = error
            .chain()
            .any(|e| matches!(e.downcast_ref(), Some(SessionError::Silent(_) | SessionError::Lost(_))));
        if !broken {
            return error;
        }
        let status = self.vm.status().await;
        match status.as_deref() {
            Some("io-error") => error.context(full_disk(&self.disks)),
            Some("guest-panicked") | None => {
                // The console is complete once qemu is gone.
                self.vm.exited_within(Duration::from_secs(5)).await;
                let tail = self.vm.console_tail(CONSOLE_TAIL);
                let what = if self.vm.console_shows("Kernel panic") {
                    "the helper VM's kernel panicked"
                } else {
                    "the helper VM stopped"
                };
                error.context(format!("{what}\n--- last lines of its serial console ---\n{tail}\n---"))
            }
            Some(_) => error,
        }
    }

    /// Ends the session and waits for the VM to power off.
    pub async fn shutdown(self) -> Result<()> {
        self.session.shutdown().await;
        self.vm
            .shutdown(Duration::from_secs(30))
            .await
            .context("stopping the helper VM")
    }
}

/// Why qemu paused the VM on a write error, naming the disks and their free space.
fn full_disk(disks: &[PathBuf]) -> String {
    let disks: Vec<String> = disks
        .iter()
        .map(|disk| match crate::transfer::free_bytes(disk) {
            Some(free) => format!("{} ({} free there)", disk.display(), indicatif::HumanBytes(free)),
            None => disk.display().to_string(),
        })
        .collect();
    format!(
        "the host's disk is full: qemu paused the helper VM when a write to {} failed; \
         free some space (or use another output directory) and build again",
        disks.join(", ")
    )
}

pub fn default_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .min(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_named_with_its_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, b"").unwrap();
        let message = full_disk(std::slice::from_ref(&disk));
        assert!(message.starts_with("the host's disk is full"), "{message}");
        assert!(message.contains(&format!("{} (", disk.display())), "{message}");
        assert!(message.contains("free there)"), "{message}");
    }
}
