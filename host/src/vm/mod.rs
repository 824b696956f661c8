//! Booting the helper VM: qemu with the appliance's kernel and initramfs, the user's
//! disks as virtio-blk, a vsock transport to reach the agent, QMP to control it and the
//! serial console captured in memory, whose tail explains failures.
//!
//! Everything a VM owns (qemu, the vsock device process, sockets) lives in one temporary
//! directory and dies with [`Vm`], on success, error or Ctrl-C alike.

mod accel;
mod console;
pub mod qemu;
pub mod qmp;
pub mod vsock;

pub use accel::Accel;

use crate::arch::Arch;
use crate::leftovers::ClaimedDir;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Child;

pub struct VmConfig {
    pub arch: Arch,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disks: Vec<PathBuf>,
    /// Attach the disks read-only (an image that is looked at, not built).
    pub read_only: bool,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
}

/// A running helper VM. Dropping it kills qemu and the vsock device and removes the
/// run directory.
pub struct Vm {
    qemu: Child,
    transport: vsock::Transport,
    console: console::Console,
    qmp_path: PathBuf,
    /// Snapshots taken, for naming the next one's node.
    snapshots: std::sync::atomic::AtomicU32,
    proxy_task: Option<tokio::task::JoinHandle<()>>,
    pub accel: Accel,
    // Last: removed after the processes that use it are gone.
    _dir: ClaimedDir,
}

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the helper VM did not connect within {0:?}")]
    Timeout(Duration),
    #[error("qemu exited before the agent connected ({0})")]
    Exited(String),
}

impl Vm {
    pub async fn start(config: &VmConfig) -> Result<Vm> {
        let dir = ClaimedDir::new_in(&std::env::temp_dir(), "imgvm-run-").context("creating the run directory")?;
        let mut last_error = None;
        // Only the kernel vsock device can collide (on its CID); retry with another.
        for _ in 0..5 {
            let transport = vsock::Transport::start(dir.path()).await?;
            match Vm::launch(config, dir.path(), &transport).await {
                Ok((qemu, console)) => {
                    return Ok(Vm {
                        qemu,
                        transport,
                        console,
                        qmp_path: dir.path().join("qmp.sock"),
                        snapshots: Default::default(),
                        proxy_task: None,
                        accel: config.accel,
                        _dir: dir,
                    })
                }
                Err(e) if e.to_string().contains("unable to set guest cid") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("loop ran"))
    }

    async fn launch(config: &VmConfig, dir: &Path, transport: &vsock::Transport) -> Result<(Child, console::Console)> {
        let arch = config.arch;
        let qemu = qemu::Qemu {
            arch,
            accel: config.accel,
            memory_mib: config.memory_mib,
            cpus: config.cpus,
            boot: qemu::Boot::DirectKernel,
        };
        let mut cmd = qemu.command();
        cmd.arg("-kernel")
            .arg(&config.kernel)
            .arg("-initrd")
            .arg(&config.initrd)
            .args([
                "-append",
                &format!(
                    "console={} panic=-1 quiet rootfstype=ramfs imgvm.port={}",
                    arch.console(),
                    transport.port()
                ),
            ])
            .args(["-serial", "stdio"])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
            ])
            .args(transport.qemu_args());
        for (i, disk) in config.disks.iter().enumerate() {
            let options = match config.read_only {
                true => format!("if=none,id=disk{i},readonly=on"),
                false => format!("if=none,id=disk{i},cache=unsafe,discard=unmap"),
            };
            let spec = qemu::drive(disk, &options)?;
            cmd.arg("-drive").arg(spec);
            cmd.args(["-device", &format!("virtio-blk-pci,drive=disk{i},serial=disk{i}")]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut qemu = qemu.spawn(&mut cmd)?;
        let console = console::Console::capture(qemu.stdout.take().expect("piped"));
        // qemu answers QMP only once the machine is built, so a running QMP means the
        // command line was accepted; an early exit carries qemu's reason on stderr.
        let stderr = qemu.stderr.take();
        let up = qmp::wait_ready(&dir.join("qmp.sock"), &mut qemu).await;
        if let Err(e) = up {
            let mut text = String::new();
            if let Some(mut stderr) = stderr {
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
            }
            bail!("{e}: {}", text.trim());
        }
        Ok((qemu, console))
    }

    /// Waits for the agent to connect, or for the VM to fail trying.
    pub async fn accept(&mut self, timeout: Duration) -> Result<vsock::Connection, BootError> {
        tokio::select! {
            conn = self.transport.accept() => conn.map_err(|e| BootError::Exited(format!("vsock: {e}"))),
            status = self.qemu.wait() => Err(BootError::Exited(match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            })),
            _ = tokio::time::sleep(timeout) => Err(BootError::Timeout(timeout)),
        }
    }

    /// Serves the guest's package proxy through `proxy` until the VM is dropped.
    pub fn serve_proxy(&mut self, proxy: std::sync::Arc<crate::proxy::Proxy>) {
        let Some(listener) = self.transport.take_proxy() else {
            return;
        };
        self.proxy_task = Some(tokio::spawn(async move {
            while let Ok((reader, writer)) = listener.accept().await {
                tokio::spawn(proxy.clone().serve(reader, writer));
            }
        }));
    }

    /// Keeps disk `index` as it is now: `overlay` (an empty qcow2 whose header names
    /// what it is backed by) becomes its top, and the file that was the top is no longer
    /// written. The guest must have frozen its filesystems first.
    pub async fn snapshot_disk(&self, index: usize, overlay: &Path) -> Result<()> {
        let n = self.snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        qmp::snapshot(&self.qmp_path, &format!("disk{index}"), overlay, &format!("state{n}")).await
    }

    /// qemu's run state (`running`, `io-error`, `guest-panicked`, ...), if it answers.
    pub async fn status(&self) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(5), qmp::status(&self.qmp_path))
            .await
            .ok()?
            .ok()
    }

    /// Waits up to `limit` for qemu to exit (a guest that crashed reboots, which ends
    /// qemu), so that its console has said everything; whether it did.
    pub async fn exited_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.qemu.wait()).await.is_ok()
    }

    /// Whether the VM's serial console showed `text` (of its last [`console::KEEP`] bytes).
    pub fn console_shows(&self, text: &str) -> bool {
        self.console.contains(text)
    }

    /// The last lines the VM printed on its serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.tail(lines)
    }

    /// Waits for the guest to power itself off; asks qemu to quit over QMP if it does
    /// not within `grace`, and kills it if that fails too.
    pub async fn shutdown(mut self, grace: Duration) -> Result<()> {
        if tokio::time::timeout(grace, self.qemu.wait()).await.is_err() {
            let status = qmp::status(&self.qmp_path)
                .await
                .unwrap_or_else(|e| format!("unknown: {e}"));
            tracing::warn!("the helper VM did not power off within {grace:?} (status: {status}); stopping it over QMP");
            let quit = qmp::quit(&self.qmp_path);
            if tokio::time::timeout(Duration::from_secs(5), quit).await.is_err()
                || tokio::time::timeout(Duration::from_secs(5), self.qemu.wait())
                    .await
                    .is_err()
            {
                let _ = self.qemu.kill().await;
            }
        }
        self.transport.stop().await;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(task) = self.proxy_task.take() {
            task.abort();
        }
    }
}
