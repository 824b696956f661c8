//! The two ways the agent's vsock connection reaches imgvm:
//!
//! - the kernel's vhost-vsock (`/dev/vhost-vsock`), where imgvm listens on an AF_VSOCK
//!   port and qemu gets a `vhost-vsock-pci` with a random CID;
//! - vhost-user through `vhost-device-vsock`, which imgvm starts; the guest's connection
//!   to port P arrives on the Unix socket `<uds>_P`. It needs no privileges and no
//!   kernel module, which is why it is the fallback.
//!
//! The guest cannot tell them apart.

use anyhow::{bail, Context, Result};
use imgvm_protocol::AGENT_PORT;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::Child;

pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

// One per VM: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Transport {
    Kernel {
        cid: u32,
        port: u32,
        listener: tokio_vsock::VsockListener,
        proxy: Option<tokio_vsock::VsockListener>,
    },
    User {
        device: Child,
        socket: PathBuf,
        listener: tokio::net::UnixListener,
        proxy: Option<tokio::net::UnixListener>,
    },
}

/// Where the guest's package proxy connections arrive: the agent's port plus one.
pub enum ProxyListener {
    Kernel {
        cid: u32,
        listener: tokio_vsock::VsockListener,
    },
    User(tokio::net::UnixListener),
}

/// The agent's connection, whichever transport carried it.
pub type Connection = (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>);

pub fn kernel_vsock_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK_DEVICE)
        .is_ok()
}

/// `$IMGVM_VHOST_DEVICE_VSOCK`, else the one an installation brings (the Debian
/// package's), else `vhost-device-vsock` on `PATH`.
pub fn vhost_device_vsock() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("IMGVM_VHOST_DEVICE_VSOCK") {
        return Some(PathBuf::from(path));
    }
    crate::companion("vhost-device-vsock")
}

impl Transport {
    pub async fn start(dir: &Path) -> Result<Transport> {
        if kernel_vsock_usable() {
            return Transport::kernel();
        }
        let Some(binary) = vhost_device_vsock() else {
            bail!(
                "cannot reach the helper VM: {VHOST_VSOCK_DEVICE} is not usable and vhost-device-vsock is not installed\n\
                 install it with `cargo install vhost-device-vsock` (or load the vhost_vsock kernel module and make \
                 {VHOST_VSOCK_DEVICE} accessible)"
            );
        };
        Transport::user(&binary, dir).await
    }

    fn kernel() -> Result<Transport> {
        for _ in 0..16 {
            let port = 10_000 + random_u32() % 50_000;
            let bind = |port| tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, port));
            if let (Ok(listener), Ok(proxy)) = (bind(port), bind(port + 1)) {
                let cid = 3 + random_u32() % (u32::MAX - 16);
                tracing::info!("vsock: kernel vhost-vsock, guest CID {cid}");
                return Ok(Transport::Kernel {
                    cid,
                    port,
                    listener,
                    proxy: Some(proxy),
                });
            }
        }
        bail!("no free vsock port to listen on")
    }

    async fn user(binary: &Path, dir: &Path) -> Result<Transport> {
        let socket = dir.join("vhost-vsock.sock");
        let uds = dir.join("vsock");
        // Bind before the guest can connect.
        let listener = tokio::net::UnixListener::bind(format!("{}_{AGENT_PORT}", uds.display()))?;
        let proxy = tokio::net::UnixListener::bind(format!("{}_{}", uds.display(), AGENT_PORT + 1))?;
        let mut device = crate::child::command(binary)
            .arg("--guest-cid=3")
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        for _ in 0..200 {
            if socket.exists() {
                tracing::info!("vsock: vhost-user through {}", binary.display());
                return Ok(Transport::User {
                    device,
                    socket,
                    listener,
                    proxy: Some(proxy),
                });
            }
            if let Some(status) = device.try_wait()? {
                let mut text = String::new();
                if let Some(mut err) = device.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut text).await;
                }
                bail!("vhost-device-vsock exited at start ({status}): {}", text.trim());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("vhost-device-vsock did not create its socket within 5 s")
    }

    pub fn port(&self) -> u32 {
        match self {
            Transport::Kernel { port, .. } => *port,
            Transport::User { .. } => AGENT_PORT,
        }
    }

    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            Transport::Kernel { cid, .. } => vec!["-device".into(), format!("vhost-vsock-pci,guest-cid={cid}")],
            Transport::User { socket, .. } => vec![
                "-chardev".into(),
                format!("socket,id=vsock,path={}", socket.display()),
                "-device".into(),
                "vhost-user-vsock-pci,chardev=vsock".into(),
            ],
        }
    }

    pub async fn accept(&mut self) -> std::io::Result<Connection> {
        match self {
            Transport::Kernel { cid, listener, .. } => loop {
                let (stream, peer) = listener.accept().await?;
                // Another VM may guess our port; only our guest may talk to us.
                if peer.cid() == *cid {
                    let (r, w) = tokio::io::split(stream);
                    return Ok((Box::new(r), Box::new(w)));
                }
            },
            Transport::User { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }

    /// The package proxy's listener, to be served by its own task.
    pub fn take_proxy(&mut self) -> Option<ProxyListener> {
        match self {
            Transport::Kernel { cid, proxy, .. } => proxy
                .take()
                .map(|listener| ProxyListener::Kernel { cid: *cid, listener }),
            Transport::User { proxy, .. } => proxy.take().map(ProxyListener::User),
        }
    }

    pub async fn stop(&mut self) {
        if let Transport::User { device, .. } = self {
            let _ = device.kill().await;
        }
    }
}

impl ProxyListener {
    pub async fn accept(&self) -> std::io::Result<Connection> {
        match self {
            ProxyListener::Kernel { cid, listener } => loop {
                let (stream, peer) = listener.accept().await?;
                if peer.cid() == *cid {
                    let (r, w) = tokio::io::split(stream);
                    return Ok((Box::new(r), Box::new(w)));
                }
            },
            ProxyListener::User(listener) => {
                let (stream, _) = listener.accept().await?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    u32::from_le_bytes(buf)
}
