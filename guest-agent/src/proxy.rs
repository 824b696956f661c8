//! The helper VM has no network interface. Package downloads inside it (mmdebstrap, apt)
//! go to an HTTP proxy on the guest's loopback, and each proxy connection is carried over
//! its own vsock connection to the host, which fetches from the mirror through its cache
//! and decides what may be fetched at all.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use vsock::{VsockAddr, VsockStream};

/// Where apt inside the guest finds its proxy.
pub const LISTEN: &str = "127.0.0.1:3142";

/// Largest write to vsock (see `connection::MAX_WRITE_LEN`).
const PIECE: usize = 16 * 1024;

/// Brings up `lo` and serves the proxy on a thread. Connections go to the host on
/// `port` (the agent's port plus one).
pub fn start(port: u32) -> io::Result<()> {
    loopback_up()?;
    let listener = TcpListener::bind(LISTEN)?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(e) = tunnel(client, port) {
                    crate::log(&format!("proxy connection failed: {e}"));
                }
            });
        }
    });
    Ok(())
}

fn tunnel(client: TcpStream, port: u32) -> io::Result<()> {
    let host = VsockStream::connect(&VsockAddr::new(imgvm_protocol::HOST_CID, port))?;
    let (mut client_in, mut host_out) = (client.try_clone()?, host.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = copy(&mut client_in, &mut host_out);
        let _ = host_out.shutdown(Shutdown::Write);
    });
    let (mut host_in, mut client_out) = (host, client);
    let _ = copy(&mut host_in, &mut client_out);
    let _ = client_out.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; PIECE];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `ip link set lo up`, without iproute2.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket used only for the ioctls below, closed at the end.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; the name is NUL-terminated within IFNAMSIZ.
    let result = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    result
}
