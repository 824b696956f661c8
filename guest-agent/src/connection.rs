//! The vsock connection to the host: handshake, then a read loop that routes every host
//! message to the operation it belongs to. Operations run on their own threads and
//! write through a shared [`Writer`].

use crate::job::{Inbound, Job};
use crate::ops;
use imgvm_protocol::{
    blocking, encode, encode_payload, ErrorKind, GuestMessage, Handshake, HostMessage, OperationError, Outcome,
    RequestId, AGENT_PORT, CHUNK_LEN, HOST_CID, MAX_REPLY_LEN, PROTOCOL_VERSION, UPLINK_WINDOW,
};
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vsock::{VsockAddr, VsockStream};

/// How long to keep trying to reach the host: the transport may appear a little after
/// the modules load.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Largest single write to the vsock socket. Recent guest kernels (Debian's 6.12 among
/// them) send larger writes as non-linear buffers spread over several descriptors, which
/// vhost-device-vsock 0.3 rejects (`DescriptorLengthTooSmall`) and drops, corrupting the
/// stream. Writes of this size stay in one linear buffer.
const MAX_WRITE_LEN: usize = 16 * 1024;

/// Serialises frames from many threads onto one stream, never more than
/// [`UPLINK_WINDOW`] bytes ahead of the host's acknowledgements.
#[derive(Clone)]
pub struct Writer(Arc<(Mutex<Uplink>, Condvar)>);

struct Uplink {
    stream: Box<dyn Write + Send>,
    unacked: u64,
}

impl Writer {
    /// Over any byte sink: the vsock stream, or a buffer in tests.
    pub fn new(stream: impl Write + Send + 'static) -> Self {
        let stream = Box::new(stream);
        Writer(Arc::new((Mutex::new(Uplink { stream, unacked: 0 }), Condvar::new())))
    }

    pub fn send(&self, message: &GuestMessage) -> io::Result<()> {
        let frame = encode(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let (lock, acked) = &*self.0;
        let mut uplink = lock.lock().unwrap_or_else(|e| e.into_inner());
        // A frame larger than the window still goes out alone.
        while uplink.unacked > 0 && uplink.unacked + frame.len() as u64 > UPLINK_WINDOW {
            uplink = acked.wait(uplink).unwrap_or_else(|e| e.into_inner());
        }
        for piece in frame.chunks(MAX_WRITE_LEN) {
            uplink.stream.write_all(piece)?;
        }
        uplink.unacked += frame.len() as u64;
        Ok(())
    }

    /// Ends request `id` with `result`: in one `Done` frame when it fits a data chunk,
    /// otherwise in `ReplyPart` pieces that the uplink window paces like any data. A
    /// result that cannot be encoded (over [`MAX_REPLY_LEN`]) still ends the request, as
    /// an error that says so: the host never waits for a reply that was dropped.
    pub fn finish(&self, id: RequestId, operation: &str, result: Result<Outcome, OperationError>) -> io::Result<()> {
        let encoded = match encode_payload(&result) {
            Ok(bytes) if bytes.len() <= MAX_REPLY_LEN => bytes,
            Ok(bytes) => {
                let why = format!("{} bytes, over the limit of {MAX_REPLY_LEN}", bytes.len());
                return self.send(&done_unencodable(id, operation, why));
            }
            Err(e) => return self.send(&done_unencodable(id, operation, e.to_string())),
        };
        if encoded.len() <= CHUNK_LEN {
            return self.send(&GuestMessage::Done { id, result });
        }
        for chunk in encoded.chunks(CHUNK_LEN) {
            self.send(&GuestMessage::ReplyPart {
                id,
                chunk: chunk.to_vec(),
            })?;
        }
        self.send(&GuestMessage::ReplyEnd { id })
    }

    /// Called by the reader for each [`HostMessage::Ack`]; never blocks.
    fn ack(&self, bytes: u64) {
        let (lock, acked) = &*self.0;
        let mut uplink = lock.lock().unwrap_or_else(|e| e.into_inner());
        uplink.unacked = uplink.unacked.saturating_sub(bytes);
        acked.notify_all();
    }
}

fn done_unencodable(id: RequestId, operation: &str, why: String) -> GuestMessage {
    GuestMessage::Done {
        id,
        result: Err(OperationError {
            operation: operation.to_owned(),
            kind: ErrorKind::Io,
            message: format!("the agent could not encode its reply: {why}"),
            errno: None,
            exit_code: None,
            stderr_tail: Vec::new(),
        }),
    }
}

type Routes = Arc<Mutex<HashMap<RequestId, Sender<Inbound>>>>;

pub fn serve() -> Result<(), String> {
    let mut stream = connect().map_err(|e| format!("cannot reach the host over vsock: {e}"))?;
    let writer = Writer::new(stream.try_clone().map_err(|e| e.to_string())?);
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
            HostMessage::Ack { bytes } => {
                writer.ack(bytes);
                continue;
            }
            HostMessage::Welcome { .. } => continue,
            HostMessage::Data { id, chunk } => (id, Inbound::Data(chunk)),
            HostMessage::EndOfData { id } => (id, Inbound::End),
            HostMessage::Credit { id, bytes } => (id, Inbound::Credit(bytes)),
            HostMessage::Cancel { id } => (id, Inbound::Cancel),
            HostMessage::Resize { id, size } => (id, Inbound::Resize(size)),
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
            // Not from this thread: only it reads the acks a send may wait for.
            let (writer, result) = (
                writer.clone(),
                Err(ops::invalid(&operation, format!("request id {id} is already in use"))),
            );
            std::thread::spawn(move || writer.finish(id, "request", result));
            return;
        }
        routes.insert(id, tx.clone());
    }
    let routes = routes.clone();
    let writer = writer.clone();
    std::thread::spawn(move || {
        let job = Job {
            id,
            name: ops::describe(&operation),
            root: imgvm_protocol::TARGET.to_owned(),
            tx,
            rx,
            writer: &writer,
            kept: Default::default(),
        };
        let name = job.name.clone();
        let result = ops::execute(&job, operation);
        routes.lock().unwrap().remove(&id);
        let _ = writer.finish(id, &name, result);
    });
}

/// The host chooses a port per VM (several imgvm runs share the host's vsock port space)
/// and passes it on the kernel command line as `imgvm.port=N`.
pub fn port() -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use imgvm_protocol::{decode, payload_len, ImageReply, Package, FRAME_HEADER_LEN};

    /// A byte sink the test can read back, standing in for the vsock stream.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<u8>>>);

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Every frame the writer sent, with its length on the wire.
    fn frames(wire: &Wire) -> Vec<(GuestMessage, usize)> {
        let bytes = wire.0.lock().unwrap().clone();
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = payload_len(rest[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
            let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
            out.push((decode(payload).unwrap(), FRAME_HEADER_LEN + len));
            rest = &rest[FRAME_HEADER_LEN + len..];
        }
        out
    }

    /// Finishes with `result` while a host stand-in acknowledges everything it is sent.
    fn finish(result: Result<Outcome, OperationError>) -> Vec<(GuestMessage, usize)> {
        let wire = Wire::default();
        let writer = Writer::new(wire.clone());
        let acker = writer.clone();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let host = std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                acker.ack(u64::MAX);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        writer.finish(7, "list packages", result).unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        host.join().unwrap();
        frames(&wire)
    }

    fn packages(n: usize) -> Result<Outcome, OperationError> {
        let package = |i| Package {
            name: format!("package-{i}"),
            version: "1.0-1".into(),
            architecture: "amd64".into(),
            multi_arch: String::new(),
        };
        Ok(Outcome::Image(ImageReply::ListPackages((0..n).map(package).collect())))
    }

    #[test]
    fn a_small_result_is_one_done_frame() {
        let frames = finish(packages(3));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0].0,
            GuestMessage::Done {
                id: 7,
                result: packages(3)
            }
        );
    }

    #[test]
    fn a_large_result_arrives_in_pieces_that_fit_the_window() {
        // About 300 KB: more than the uplink window and than one frame may hold.
        let result = packages(10_000);
        let frames = finish(result.clone());
        assert!(frames.len() > 2, "{} frames", frames.len());
        let mut assembled = Vec::new();
        for (message, len) in &frames[..frames.len() - 1] {
            assert!(*len <= CHUNK_LEN + 64, "a frame of {len} bytes");
            match message {
                GuestMessage::ReplyPart { id: 7, chunk } => assembled.extend_from_slice(chunk),
                other => panic!("expected a reply part, got {other:?}"),
            }
        }
        assert_eq!(frames.last().unwrap().0, GuestMessage::ReplyEnd { id: 7 });
        let decoded: Result<Outcome, OperationError> = decode(&assembled).unwrap();
        assert_eq!(decoded, result);
    }

    #[test]
    fn a_result_too_large_to_send_still_ends_the_request_with_an_error() {
        let huge = Package {
            name: "x".repeat(MAX_REPLY_LEN),
            version: String::new(),
            architecture: String::new(),
            multi_arch: String::new(),
        };
        let frames = finish(Ok(Outcome::Image(ImageReply::ListPackages(vec![huge]))));
        assert_eq!(frames.len(), 1);
        match &frames[0].0 {
            GuestMessage::Done { id: 7, result: Err(e) } => {
                assert_eq!(e.operation, "list packages");
                assert!(e.message.contains("could not encode its reply"), "{}", e.message);
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
