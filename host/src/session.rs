//! The host's side of the protocol: handshake, then any number of concurrent requests.
//!
//! One task reads frames and routes them to the request they belong to; one task writes.
//! Everything the guest sends is untrusted: frames are size-checked before they are
//! buffered, unknown request ids are ignored, and a malformed frame ends the session with
//! an error rather than a guess.

use imgvm_protocol::{
    decode, encode, payload_len, Command, Event, GuestMessage, Handshake, HostMessage, ImageOp, ImageOperation,
    ImageReply, Operation, OperationError, Outcome, RequestId, Transfer, WindowSize, ACK_THRESHOLD, CHUNK_LEN,
    FRAME_HEADER_LEN, MAX_REPLY_LEN, PROTOCOL_VERSION, STREAM_WINDOW,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("the agent did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the agent speaks protocol version {agent}, this imgvm version {PROTOCOL_VERSION}: rebuild the agent")]
    Version { agent: u32 },
    #[error("the agent sent an invalid message: {0}")]
    Protocol(String),
    #[error("lost the connection to the agent: {0}")]
    Lost(String),
    #[error("the agent has not been heard from for {0:?}: the helper VM is hung or overloaded")]
    Silent(Duration),
    #[error("the guest sent more than {limit} bytes of {path}; stopped")]
    TooLarge { path: String, limit: u64 },
    #[error("writing what the guest sent: {0}")]
    Sink(String),
}

/// How long the agent may stay silent (it sends a heartbeat every
/// [`imgvm_protocol::HEARTBEAT_INTERVAL`]) before the session is declared dead. Generous,
/// because a guest under emulation on a loaded host can stall for a while.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// Messages of one request not yet taken by whoever waits for it. Bounded: when its owner
/// falls behind (a slow terminal under `imgvm run`), the reader stops reading, stops
/// acknowledging, and the agent stops sending at its uplink window, so backpressure
/// reaches the guest instead of the host's memory growing.
const ROUTE_DEPTH: usize = 32;

#[derive(Clone)]
struct Route {
    tx: mpsc::Sender<GuestMessage>,
    stream: Arc<StreamWindow>,
}

/// The request's output stream as both ends count it: the agent may send
/// [`STREAM_WINDOW`] bytes more than the host has credited, and not one more.
#[derive(Default)]
struct StreamWindow {
    credited: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
}

pub struct Session {
    out: mpsc::Sender<HostMessage>,
    routes: Arc<Mutex<HashMap<RequestId, Route>>>,
    /// Why the session ended, once it has.
    broken: Arc<Mutex<Option<SessionError>>>,
    next_id: AtomicU32,
    pub handshake: Handshake,
    writer: tokio::task::JoinHandle<()>,
}

/// One request in flight: its incoming messages and the means to talk back.
pub struct Request<'a> {
    pub id: RequestId,
    rx: mpsc::Receiver<GuestMessage>,
    stream: Arc<StreamWindow>,
    session: &'a Session,
}

/// How a request ended: the agent's outcome or its structured error.
pub type Reply = Result<Outcome, OperationError>;

impl Session {
    /// Waits for the agent's hello, checks its protocol version and welcomes it.
    pub async fn connect(
        mut reader: impl AsyncRead + Send + Unpin + 'static,
        mut writer: impl AsyncWrite + Send + Unpin + 'static,
        timeout: Duration,
        silence_limit: Duration,
    ) -> Result<Session, SessionError> {
        let hello = tokio::time::timeout(timeout, read_message(&mut reader))
            .await
            .map_err(|_| SessionError::HandshakeTimeout(timeout))??;
        let handshake = match hello.map(|(m, _)| m) {
            Some(GuestMessage::Hello(h)) => h,
            Some(other) => return Err(SessionError::Protocol(format!("expected hello, got {other:?}"))),
            None => {
                return Err(SessionError::Lost(
                    "the agent closed the connection before its hello".into(),
                ))
            }
        };
        if handshake.protocol_version != PROTOCOL_VERSION {
            return Err(SessionError::Version {
                agent: handshake.protocol_version,
            });
        }
        let (out, mut outbox) = mpsc::channel::<HostMessage>(64);
        let routes: Arc<Mutex<HashMap<RequestId, Route>>> = Arc::default();
        let broken: Arc<Mutex<Option<SessionError>>> = Arc::default();
        let fail = {
            let (routes, broken) = (routes.clone(), broken.clone());
            move |e: SessionError| {
                broken.lock().unwrap().get_or_insert(e);
                // Dropping the senders wakes every waiting request.
                routes.lock().unwrap().clear();
            }
        };
        let writer_fail = fail.clone();
        let writer = tokio::spawn(async move {
            while let Some(message) = outbox.recv().await {
                let frame = encode(&message).expect("host messages fit in a frame");
                if let Err(e) = writer.write_all(&frame).await {
                    writer_fail(SessionError::Lost(e.to_string()));
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        out.send(HostMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
        })
        .await
        .map_err(|_| SessionError::Lost("writer stopped".into()))?;
        let reader_routes = routes.clone();
        let acks = out.clone();
        tokio::spawn(async move {
            let mut unacked = 0u64;
            let mut replies = ReplyParts::new(MAX_REPLY_LEN);
            loop {
                if unacked >= ACK_THRESHOLD {
                    if acks.send(HostMessage::Ack { bytes: unacked }).await.is_err() {
                        break;
                    }
                    unacked = 0;
                }
                let Ok(message) = tokio::time::timeout(silence_limit, read_message(&mut reader)).await else {
                    break fail(SessionError::Silent(silence_limit));
                };
                if let Ok(Some((_, len))) = &message {
                    unacked += *len as u64;
                }
                match message.map(|m| m.map(|(m, _)| m)) {
                    Ok(Some(GuestMessage::Heartbeat)) => {}
                    Ok(Some(GuestMessage::Hello(_))) => {
                        break fail(SessionError::Protocol("a second hello".into()));
                    }
                    Ok(Some(message)) => {
                        let id = message_id(&message);
                        let Some(route) = reader_routes.lock().unwrap().get(&id).cloned() else {
                            // A request that has ended or was never made: stale, not buffered.
                            replies.forget(id);
                            continue;
                        };
                        let message = match replies.take(message) {
                            Ok(Some(message)) => message,
                            Ok(None) => continue,
                            Err(e) => break fail(e),
                        };
                        if let GuestMessage::Data { chunk, .. } = &message {
                            if let Err(e) = route.stream.receive(id, chunk.len()) {
                                break fail(e);
                            }
                        }
                        let done = matches!(message, GuestMessage::Done { .. });
                        // Waits while the request's owner is behind: see ROUTE_DEPTH.
                        let _ = route.tx.send(message).await;
                        if done {
                            reader_routes.lock().unwrap().remove(&id);
                        }
                    }
                    Ok(None) => break fail(SessionError::Lost("the agent closed the connection".into())),
                    Err(e) => break fail(e),
                }
            }
        });
        tracing::info!(
            "agent {} ready: {} kernel {}",
            handshake.agent_version,
            handshake.machine,
            handshake.kernel
        );
        Ok(Session {
            out,
            routes,
            broken,
            next_id: AtomicU32::new(1),
            handshake,
            writer,
        })
    }

    fn error(&self) -> SessionError {
        self.broken
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| SessionError::Lost("the session ended".into()))
    }

    async fn send(&self, message: HostMessage) -> Result<(), SessionError> {
        self.out.send(message).await.map_err(|_| self.error())
    }

    pub async fn start(&self, operation: Operation) -> Result<Request<'_>, SessionError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(ROUTE_DEPTH);
        let stream = Arc::<StreamWindow>::default();
        {
            if let Some(e) = self.broken.lock().unwrap().clone() {
                return Err(e);
            }
            let route = Route {
                tx,
                stream: stream.clone(),
            };
            self.routes.lock().unwrap().insert(id, route);
        }
        self.send(HostMessage::Request { id, operation }).await?;
        Ok(Request {
            id,
            rx,
            stream,
            session: self,
        })
    }

    /// Runs a command, handing each output line or progress event to `on_event`, and
    /// feeding it `stdin` if given. Cancelling `cancel` stops the command in the guest.
    pub async fn run(
        &self,
        command: Command,
        stdin: Option<Box<dyn AsyncRead + Send + Unpin + '_>>,
        on_event: impl FnMut(Event),
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let command = Command {
            stdin: stdin.is_some(),
            ..command
        };
        self.request(Operation::Run(command), stdin, on_event, cancel).await
    }

    /// Runs a command on a terminal in the guest ([`Command::terminal`]): `keys` is typed
    /// on it, its output is written to `screen` as it comes, and each size from `sizes`
    /// is the terminal's new size. Cancelling `cancel` stops the command.
    pub async fn terminal(
        &self,
        command: Command,
        mut keys: mpsc::Receiver<Vec<u8>>,
        mut sizes: mpsc::Receiver<WindowSize>,
        screen: &mut (impl AsyncWrite + Unpin),
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let mut request = self.start(Operation::Run(Command { stdin: true, ..command })).await?;
        let (mut sent, mut credited) = (0u64, 0u64);
        let mut cancelled = false;
        loop {
            // Keys wait while the guest has not taken what was typed before.
            let room = sent - credited < STREAM_WINDOW;
            tokio::select! {
                message = request.next() => match message? {
                    GuestMessage::Data { chunk, .. } => {
                        screen.write_all(&chunk).await.map_err(|e| SessionError::Sink(e.to_string()))?;
                        screen.flush().await.map_err(|e| SessionError::Sink(e.to_string()))?;
                        request.credit(chunk.len() as u64).await?;
                    }
                    GuestMessage::Credit { bytes, .. } => credited += bytes,
                    GuestMessage::Done { result, .. } => return Ok(result),
                    _ => {}
                },
                Some(typed) = keys.recv(), if room => {
                    for piece in typed.chunks(CHUNK_LEN) {
                        sent += piece.len() as u64;
                        self.send(HostMessage::Data { id: request.id, chunk: piece.to_vec() }).await?;
                    }
                }
                Some(size) = sizes.recv() => {
                    self.send(HostMessage::Resize { id: request.id, size }).await?;
                }
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    request.cancel().await?;
                }
            }
        }
    }

    /// Carries out `operation`, streaming `input` to it if given and handing its events
    /// to `on_event`. Cancelling `cancel` stops it in the guest.
    pub async fn request(
        &self,
        operation: Operation,
        input: Option<Box<dyn AsyncRead + Send + Unpin + '_>>,
        mut on_event: impl FnMut(Event),
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let mut request = self.start(operation).await?;
        match input {
            Some(input) => request.feed(input, &mut on_event, cancel).await,
            None => request.finish(&mut on_event, cancel).await,
        }
    }

    /// Carries out one image operation and returns its own reply type: a reply that
    /// belongs to another operation is a protocol error, never ignored.
    pub async fn image<O: ImageOperation>(
        &self,
        op: O,
        input: Option<Box<dyn AsyncRead + Send + Unpin + '_>>,
        on_event: impl FnMut(Event),
        cancel: &CancellationToken,
    ) -> Result<Result<O::Reply, OperationError>, SessionError> {
        match self.image_op(op.into(), input, on_event, cancel).await? {
            Ok(reply) => O::reply(reply)
                .map(Ok)
                .map_err(|other| SessionError::Protocol(format!("{} answered as {}", O::NAME, other.name()))),
            Err(e) => Ok(Err(e)),
        }
    }

    /// [`Session::image`] for an operation whose type is only known at run time: the
    /// reply is checked to be the operation's own.
    pub async fn image_op(
        &self,
        op: ImageOp,
        input: Option<Box<dyn AsyncRead + Send + Unpin + '_>>,
        on_event: impl FnMut(Event),
        cancel: &CancellationToken,
    ) -> Result<Result<ImageReply, OperationError>, SessionError> {
        let (tag, name) = (op.tag(), op.name());
        match self.request(Operation::Image(op), input, on_event, cancel).await? {
            Ok(Outcome::Image(reply)) if reply.tag() == tag => Ok(Ok(reply)),
            Ok(Outcome::Image(reply)) => Err(SessionError::Protocol(format!("{name} answered as {}", reply.name()))),
            Ok(other) => Err(SessionError::Protocol(format!("{name} answered with {other:?}"))),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Streams `source` into the guest as `path` (a file, or a directory for a tar stream).
    pub async fn upload(
        &self,
        source: impl AsyncRead + Send + Unpin,
        path: &str,
        format: Transfer,
        mode: u32,
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let mut request = self
            .start(Operation::Upload {
                path: path.to_owned(),
                format,
                mode,
            })
            .await?;
        request.feed(Box::new(source), &mut |_| {}, cancel).await
    }

    /// Streams the guest's `path` into `sink`, at most `limit` bytes of it: the guest
    /// decides how much it sends (a sparse file in a tar stream expands), the host how
    /// much it writes.
    pub async fn download(
        &self,
        path: &str,
        format: Transfer,
        sink: &mut (impl AsyncWrite + Unpin),
        limit: u64,
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let mut request = self
            .start(Operation::Download {
                path: path.to_owned(),
                format,
            })
            .await?;
        let mut cancelled = false;
        let mut written = 0u64;
        loop {
            let message = tokio::select! {
                m = request.next() => m?,
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    request.cancel().await?;
                    continue;
                }
            };
            match message {
                GuestMessage::Data { chunk, .. } => {
                    written += chunk.len() as u64;
                    if written > limit {
                        request.cancel().await?;
                        return Err(SessionError::TooLarge {
                            path: path.to_owned(),
                            limit,
                        });
                    }
                    sink.write_all(&chunk)
                        .await
                        .map_err(|e| SessionError::Sink(e.to_string()))?;
                    request.credit(chunk.len() as u64).await?;
                }
                GuestMessage::Done { result, .. } => {
                    sink.flush().await.map_err(|e| SessionError::Sink(e.to_string()))?;
                    return Ok(result);
                }
                _ => {}
            }
        }
    }

    /// Tells the agent there is nothing more to do, so it syncs and powers off.
    pub async fn shutdown(self) {
        let _ = self.out.send(HostMessage::Shutdown).await;
        drop(self.out);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer).await;
    }
}

impl Request<'_> {
    /// The next message for this request.
    pub async fn next(&mut self) -> Result<GuestMessage, SessionError> {
        self.rx.recv().await.ok_or_else(|| self.session.error())
    }

    /// Tells the agent `bytes` more of the output stream were consumed.
    pub async fn credit(&self, bytes: u64) -> Result<(), SessionError> {
        self.stream.credited.fetch_add(bytes, Ordering::Relaxed);
        self.session.send(HostMessage::Credit { id: self.id, bytes }).await
    }

    pub async fn cancel(&self) -> Result<(), SessionError> {
        self.session.send(HostMessage::Cancel { id: self.id }).await
    }

    /// Sends `input` as the request's data stream within the credit window, then waits
    /// for the request to end.
    async fn feed(
        &mut self,
        mut input: Box<dyn AsyncRead + Send + Unpin + '_>,
        on_event: &mut impl FnMut(Event),
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let (mut sent, mut credited) = (0u64, 0u64);
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            // Wait for credit (and handle whatever else arrives) while the window is full.
            while sent - credited + CHUNK_LEN as u64 > STREAM_WINDOW {
                tokio::select! {
                    m = self.next() => match m? {
                        GuestMessage::Credit { bytes, .. } => credited += bytes,
                        GuestMessage::Done { result, .. } => return Ok(result),
                        GuestMessage::Event { event, .. } => on_event(event),
                        _ => {}
                    },
                    _ = cancel.cancelled() => {
                        self.cancel().await?;
                        return self.finish(on_event, &CancellationToken::new()).await;
                    }
                }
            }
            let n = tokio::select! {
                n = input.read(&mut buf) => n.map_err(|e| SessionError::Lost(format!("reading input: {e}")))?,
                _ = cancel.cancelled() => {
                    self.cancel().await?;
                    return self.finish(on_event, &CancellationToken::new()).await;
                }
            };
            if n == 0 {
                break;
            }
            self.session
                .send(HostMessage::Data {
                    id: self.id,
                    chunk: buf[..n].to_vec(),
                })
                .await?;
            sent += n as u64;
        }
        self.session.send(HostMessage::EndOfData { id: self.id }).await?;
        self.finish(on_event, cancel).await
    }

    /// Waits for the request to end, passing on its events.
    async fn finish(
        &mut self,
        on_event: &mut impl FnMut(Event),
        cancel: &CancellationToken,
    ) -> Result<Reply, SessionError> {
        let mut cancelled = false;
        loop {
            let message = tokio::select! {
                m = self.next() => m?,
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    self.cancel().await?;
                    continue;
                }
            };
            match message {
                GuestMessage::Event { event, .. } => on_event(event),
                GuestMessage::Done { result, .. } => return Ok(result),
                _ => {}
            }
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        self.session.routes.lock().unwrap().remove(&self.id);
    }
}

fn message_id(message: &GuestMessage) -> RequestId {
    match message {
        GuestMessage::Hello(_) | GuestMessage::Heartbeat => 0,
        GuestMessage::Event { id, .. }
        | GuestMessage::Data { id, .. }
        | GuestMessage::EndOfData { id }
        | GuestMessage::Credit { id, .. }
        | GuestMessage::Done { id, .. }
        | GuestMessage::ReplyPart { id, .. }
        | GuestMessage::ReplyEnd { id } => *id,
    }
}

impl StreamWindow {
    /// Counts `len` bytes of output received for request `id`; more than the window
    /// beyond what was credited is a guest ignoring flow control.
    fn receive(&self, id: RequestId, len: usize) -> Result<(), SessionError> {
        let received = self.received.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        let credited = self.credited.load(Ordering::Relaxed);
        if received > credited + STREAM_WINDOW {
            return Err(SessionError::Protocol(format!(
                "request {id}: {} bytes of output beyond the {STREAM_WINDOW} granted",
                received - credited - STREAM_WINDOW
            )));
        }
        Ok(())
    }
}

/// Results that arrive in pieces ([`GuestMessage::ReplyPart`]), per live request, each
/// bounded by `limit` ([`MAX_REPLY_LEN`]).
struct ReplyParts {
    parts: HashMap<RequestId, Vec<u8>>,
    limit: usize,
}

impl ReplyParts {
    fn new(limit: usize) -> Self {
        ReplyParts {
            parts: HashMap::new(),
            limit,
        }
    }

    /// The message to hand to the request: `message` itself, or once a reply's last piece
    /// is in, the `Done` it stands for; `None` while pieces are still arriving.
    fn take(&mut self, message: GuestMessage) -> Result<Option<GuestMessage>, SessionError> {
        match message {
            GuestMessage::ReplyPart { id, chunk } => {
                let parts = self.parts.entry(id).or_default();
                if parts.len() + chunk.len() > self.limit {
                    return Err(SessionError::Protocol(format!(
                        "the reply to request {id} exceeds {} bytes",
                        self.limit
                    )));
                }
                parts.extend_from_slice(&chunk);
                Ok(None)
            }
            GuestMessage::ReplyEnd { id } => {
                let parts = self.parts.remove(&id).unwrap_or_default();
                let result =
                    decode(&parts).map_err(|e| SessionError::Protocol(format!("the reply to request {id}: {e}")))?;
                Ok(Some(GuestMessage::Done { id, result }))
            }
            GuestMessage::Done { id, .. } if self.parts.contains_key(&id) => Err(SessionError::Protocol(format!(
                "request {id} ended while its reply was arriving in pieces"
            ))),
            other => Ok(Some(other)),
        }
    }

    fn forget(&mut self, id: RequestId) {
        self.parts.remove(&id);
    }
}

/// The next message and its size on the wire.
async fn read_message(reader: &mut (impl AsyncRead + Unpin)) -> Result<Option<(GuestMessage, usize)>, SessionError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(SessionError::Lost(e.to_string())),
    }
    let len = payload_len(header).map_err(|e| SessionError::Protocol(e.to_string()))?;
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(|e| SessionError::Lost(e.to_string()))?;
    let message = decode(&payload).map_err(|e| SessionError::Protocol(e.to_string()))?;
    Ok(Some((message, FRAME_HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(id: RequestId, len: usize) -> GuestMessage {
        GuestMessage::ReplyPart {
            id,
            chunk: vec![0; len],
        }
    }

    #[test]
    fn pieces_of_a_reply_are_bounded() {
        let mut replies = ReplyParts::new(100);
        assert_eq!(replies.take(part(1, 60)).unwrap(), None);
        // Another request has its own allowance.
        assert_eq!(replies.take(part(2, 60)).unwrap(), None);
        let err = replies.take(part(1, 41)).unwrap_err();
        assert!(
            matches!(&err, SessionError::Protocol(m) if m.contains("exceeds 100 bytes")),
            "{err}"
        );
    }

    #[test]
    fn a_done_in_the_middle_of_pieces_is_refused() {
        let mut replies = ReplyParts::new(100);
        replies.take(part(1, 10)).unwrap();
        let done = GuestMessage::Done {
            id: 1,
            result: Ok(Outcome::Exited { code: 0 }),
        };
        assert!(replies.take(done).is_err());
    }

    #[test]
    fn pieces_that_do_not_decode_are_a_protocol_error() {
        let mut replies = ReplyParts::new(100);
        replies.take(part(1, 10)).unwrap();
        let err = replies.take(GuestMessage::ReplyEnd { id: 1 }).unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)), "{err}");
    }
}
