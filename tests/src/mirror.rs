//! A local Debian mirror for fault tests: it passes every request through to a real
//! mirror, so releases stay validly signed and packages are real, and answers the
//! package downloads it is told to with a fault.

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
}

struct State {
    fault: Fault,
    /// Only `.deb`s whose file name starts with this are faulted.
    package_prefix: String,
}

pub struct Mirror {
    /// What a recipe's `mirror:` names.
    pub url: String,
    state: Arc<Mutex<State>>,
    requests: Arc<AtomicU64>,
    faulted: Arc<AtomicU64>,
}

const UPSTREAM: &str = "http://deb.debian.org/debian";

impl Mirror {
    pub fn start() -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/debian", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            fault: Fault::None,
            package_prefix: String::new(),
        }));
        let (requests, faulted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, d, f) = (state.clone(), requests.clone(), faulted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, d, f) = (s.clone(), d.clone(), f.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &s, &d, &f);
                });
            }
        });
        Mirror {
            url,
            state,
            requests,
            faulted,
        }
    }

    /// From now on, `.deb`s whose name starts with `package_prefix` ("" for all) get `fault`.
    pub fn set_fault(&self, fault: Fault, package_prefix: &str) {
        let mut state = self.state.lock().unwrap();
        state.fault = fault;
        state.package_prefix = package_prefix.to_owned();
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
fn serve(stream: TcpStream, state: &Mutex<State>, requests: &AtomicU64, faulted: &AtomicU64) -> std::io::Result<()> {
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
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
    let Some(rest) = path.strip_prefix("/debian/") else {
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    let name = rest.rsplit('/').next().unwrap_or_default();
    let fault = if rest.ends_with(".deb") {
        let state = state.lock().unwrap();
        if name.starts_with(&state.package_prefix) {
            state.fault
        } else {
            Fault::None
        }
    } else {
        Fault::None
    };
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
