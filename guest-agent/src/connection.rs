//! The vsock connection to the host: handshake, then a read loop that routes every host
//! message to the operation it belongs to. Operations run on their own threads and
//! write through a shared [`Writer`].

use crate::ops::{self, Inbound};
use imgvm_protocol::{
    blocking, GuestMessage, Handshake, HostMessage, RequestId, AGENT_PORT, HOST_CID, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vsock::{VsockAddr, VsockStream};

/// How long to keep trying to reach the host: the transport may appear a little after
/// the modules load.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Serialises frames from many threads onto one stream.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<VsockStream>>);

impl Writer {
    pub fn send(&self, message: &GuestMessage) -> io::Result<()> {
        let mut stream = self.0.lock().unwrap_or_else(|e| e.into_inner());
        blocking::write(&mut *stream, message)?;
        stream.flush()
    }
}

type Routes = Arc<Mutex<HashMap<RequestId, Sender<Inbound>>>>;

pub fn serve() -> Result<(), String> {
    let mut stream = connect().map_err(|e| format!("cannot reach the host over vsock: {e}"))?;
    let writer = Writer(Arc::new(Mutex::new(stream.try_clone().map_err(|e| e.to_string())?)));
    writer
        .send(&GuestMessage::Hello(handshake()))
        .map_err(|e| format!("sending hello: {e}"))?;
    match blocking::read::<HostMessage>(&mut stream) {
        Ok(Some(HostMessage::Welcome { protocol_version })) if protocol_version == PROTOCOL_VERSION => {}
        Ok(Some(HostMessage::Welcome { protocol_version })) => {
            return Err(format!(
                "host speaks protocol {protocol_version}, agent {PROTOCOL_VERSION}"
            ))
        }
        Ok(other) => return Err(format!("expected welcome from host, got {other:?}")),
        Err(e) => return Err(format!("reading welcome: {e}")),
    }
    let heartbeat = writer.clone();
    std::thread::spawn(move || {
        while heartbeat.send(&GuestMessage::Heartbeat).is_ok() {
            std::thread::sleep(imgvm_protocol::HEARTBEAT_INTERVAL);
        }
    });
    let routes: Routes = Arc::default();
    let result = loop {
        let message = match blocking::read::<HostMessage>(&mut stream) {
            Ok(Some(message)) => message,
            Ok(None) => break Err("host closed the connection".to_owned()),
            Err(e) => break Err(format!("reading from host: {e}")),
        };
        let (id, inbound) = match message {
            HostMessage::Request { id, operation } => {
                start(id, operation, &routes, &writer);
                continue;
            }
            HostMessage::Shutdown => break Ok(()),
            HostMessage::Welcome { .. } => continue,
            HostMessage::Data { id, chunk } => (id, Inbound::Data(chunk)),
            HostMessage::EndOfData { id } => (id, Inbound::End),
            HostMessage::Credit { id, bytes } => (id, Inbound::Credit(bytes)),
            HostMessage::Cancel { id } => (id, Inbound::Cancel),
        };
        // Messages for requests that already ended are stale, not errors.
        if let Some(route) = routes.lock().unwrap().get(&id) {
            let _ = route.send(inbound);
        }
    };
    for route in routes.lock().unwrap().values() {
        let _ = route.send(Inbound::Cancel);
    }
    result
}

fn start(id: RequestId, operation: imgvm_protocol::Operation, routes: &Routes, writer: &Writer) {
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let mut routes = routes.lock().unwrap();
        if routes.contains_key(&id) {
            let _ = writer.send(&GuestMessage::Done {
                id,
                result: Err(ops::invalid(&operation, format!("request id {id} is already in use"))),
            });
            return;
        }
        routes.insert(id, tx.clone());
    }
    let routes = routes.clone();
    let writer = writer.clone();
    std::thread::spawn(move || {
        let result = ops::execute(id, operation, tx, rx, &writer);
        routes.lock().unwrap().remove(&id);
        let _ = writer.send(&GuestMessage::Done { id, result });
    });
}

/// The host chooses a port per VM (several imgvm runs share the host's vsock port space)
/// and passes it on the kernel command line as `imgvm.port=N`.
fn port() -> u32 {
    std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("imgvm.port=")?.parse().ok())
        })
        .unwrap_or(AGENT_PORT)
}

fn connect() -> io::Result<VsockStream> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    let port = port();
    loop {
        match VsockStream::connect(&VsockAddr::new(HOST_CID, port)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn handshake() -> Handshake {
    // SAFETY: uname fills a zeroed struct.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut uts) };
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Handshake {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        machine: field(&uts.machine),
        kernel: field(&uts.release),
    }
}
