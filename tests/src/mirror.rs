//! A local Debian mirror for fault tests: it passes every request through to a real
//! mirror, so releases stay validly signed and packages are real, and answers every
//! package download with the fault it is set to. The fault can change while the mirror
//! runs, so that builds sharing one mirror URL (and so one bootstrap in the step cache)
//! meet different faults later on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the mirror does to a faulted `.deb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Served as the real mirror serves it.
    None,
    /// `500 Internal Server Error`.
    Status500,
    /// The real length announced, half of the body sent, the connection closed.
    Truncated,
    /// Every byte sent, some of them flipped.
    Corrupted,
    /// `404 Not Found` for the `.deb`s of this package, as a mirror that dropped a
    /// superseded version answers; the others as the real mirror serves them.
    Gone(&'static str),
}

pub struct Mirror {
    /// What a recipe's `mirror:` names.
    pub url: String,
    fault: Arc<Mutex<Fault>>,
    requests: Arc<AtomicU64>,
    faulted: Arc<AtomicU64>,
}

const UPSTREAM: &str = "http://deb.debian.org/debian";

impl Mirror {
    /// A mirror answering every `.deb` with `fault` (until [`Mirror::set_fault`]), on a
    /// port of its own.
    pub fn start(fault: Fault) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/debian", listener.local_addr().unwrap());
        let fault = Arc::new(Mutex::new(fault));
        let (requests, faulted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, r, f) = (fault.clone(), requests.clone(), faulted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let fault = *s.lock().unwrap();
                let (r, f) = (r.clone(), f.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, fault, &r, &f);
                });
            }
        });
        Mirror {
            url,
            fault,
            requests,
            faulted,
        }
    }

    /// What the mirror does to the `.deb`s it is asked for from now on.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Faulted answers given so far.
    pub fn faults_served(&self) -> u64 {
        self.faulted.load(Ordering::SeqCst)
    }
}

/// One request per connection (`Connection: close`): the simplest thing every client
/// copes with.
fn serve(stream: TcpStream, fault: Fault, requests: &AtomicU64, faulted: &AtomicU64) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let mut out = stream;
    let head_only = request_line.starts_with("HEAD ");
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
    let Some(rest) = path.strip_prefix("/debian/") else {
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    let fault = if rest.ends_with(".deb") { fault } else { Fault::None };
    let file = rest.rsplit('/').next().unwrap_or_default();
    if matches!(fault, Fault::Gone(name) if file.starts_with(&format!("{name}_"))) {
        faulted.fetch_add(1, Ordering::SeqCst);
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    if fault == Fault::Status500 {
        faulted.fetch_add(1, Ordering::SeqCst);
        return out.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let (status, mut body) = match ureq::get(format!("{UPSTREAM}/{rest}")).call() {
        Ok(mut response) => {
            let mut body = Vec::new();
            response.body_mut().as_reader().read_to_end(&mut body)?;
            (200, body)
        }
        Err(ureq::Error::StatusCode(code)) => (code, Vec::new()),
        Err(_) => (502, Vec::new()),
    };
    if status != 200 {
        let head = format!("HTTP/1.1 {status} Upstream\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return out.write_all(head.as_bytes());
    }
    let len = body.len();
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    out.write_all(head.as_bytes())?;
    if head_only {
        return Ok(());
    }
    match fault {
        Fault::Truncated => {
            faulted.fetch_add(1, Ordering::SeqCst);
            out.write_all(&body[..len / 2])
        }
        Fault::Corrupted => {
            faulted.fetch_add(1, Ordering::SeqCst);
            for byte in body.iter_mut().skip(len / 2).take(64) {
                *byte ^= 0xff;
            }
            out.write_all(&body)
        }
        _ => out.write_all(&body),
    }
}
