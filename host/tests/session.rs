//! The host's protocol session against fake agents that misbehave: every failure must
//! end in a clear error within a bounded time, never a hang or a panic.

use imgvm::session::{Session, SessionError};
use imgvm_protocol::{encode, Command, GuestMessage, Handshake, HostMessage, Outcome, MAX_FRAME_LEN, PROTOCOL_VERSION};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

fn hello(version: u32) -> GuestMessage {
    GuestMessage::Hello(Handshake {
        protocol_version: version,
        agent_version: "test".into(),
        machine: "x86_64".into(),
        kernel: "6.12".into(),
    })
}

async fn connect(host: UnixStream, timeout: Duration, silence: Duration) -> Result<Session, SessionError> {
    let (r, w) = host.into_split();
    Session::connect(r, w, timeout, silence).await
}

/// Reads one host message as the fake agent.
async fn read_host(guest: &mut UnixStream) -> HostMessage {
    let len = guest.read_u32_le().await.unwrap() as usize;
    let mut buf = vec![0; len];
    guest.read_exact(&mut buf).await.unwrap();
    imgvm_protocol::decode(&buf).unwrap()
}

/// A fake agent that completes the handshake.
async fn handshaken() -> (Session, UnixStream) {
    handshaken_with_silence_limit(Duration::from_secs(30)).await
}

async fn handshaken_with_silence_limit(silence: Duration) -> (Session, UnixStream) {
    let (host, mut guest) = UnixStream::pair().unwrap();
    guest
        .write_all(&encode(&hello(PROTOCOL_VERSION)).unwrap())
        .await
        .unwrap();
    let session = connect(host, Duration::from_secs(5), silence).await.unwrap();
    assert!(matches!(
        read_host(&mut guest).await,
        HostMessage::Welcome {
            protocol_version: PROTOCOL_VERSION
        }
    ));
    (session, guest)
}

async fn run_true(session: &Session) -> Result<imgvm::session::Reply, SessionError> {
    let command = Command {
        argv: vec!["true".into()],
        ..Default::default()
    };
    session.run(command, None, |_| {}, &CancellationToken::new()).await
}

#[tokio::test]
async fn guest_that_never_answers_times_out() {
    let (host, _guest) = UnixStream::pair().unwrap();
    let started = Instant::now();
    let err = connect(host, Duration::from_millis(500), Duration::from_secs(30))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, SessionError::HandshakeTimeout(_)), "{err}");
    assert_eq!(err.to_string(), "the agent did not complete the handshake within 500ms");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn guest_that_goes_silent_is_declared_dead() {
    let (session, _guest) = handshaken_with_silence_limit(Duration::from_millis(300)).await;
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), run_true(&session))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, SessionError::Silent(_)), "{err}");
    assert!(err.to_string().contains("has not been heard from"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn oversized_frame_is_refused_before_it_is_read() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    guest
        .write_all(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes())
        .await
        .unwrap();
    let err = connect(host, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "the agent sent an invalid message: frame of {} bytes exceeds the maximum of {MAX_FRAME_LEN} bytes",
            MAX_FRAME_LEN + 1
        )
    );
}

#[tokio::test]
async fn oversized_frame_mid_session_fails_the_request() {
    let (session, mut guest) = handshaken().await;
    let fake = async {
        let _request = read_host(&mut guest).await;
        guest.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        guest
    };
    let (result, _guest) =
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run_true(&session), fake) })
            .await
            .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, SessionError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("exceeds the maximum"), "{err}");
}

#[tokio::test]
async fn malformed_frame_mid_session_fails_the_request() {
    let (session, mut guest) = handshaken().await;
    let fake = async {
        let _request = read_host(&mut guest).await;
        guest.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
        guest
    };
    let (result, _guest) =
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run_true(&session), fake) })
            .await
            .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, SessionError::Protocol(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("the agent sent an invalid message: malformed message"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    guest
        .write_all(&encode(&hello(PROTOCOL_VERSION + 1)).unwrap())
        .await
        .unwrap();
    let err = connect(host, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, SessionError::Version { .. }), "{err}");
    assert!(err.to_string().contains("rebuild the agent"), "{err}");
}

#[tokio::test]
async fn disconnect_mid_request_is_reported() {
    let (session, mut guest) = handshaken().await;
    let fake = async {
        let _request = read_host(&mut guest).await;
        drop(guest);
    };
    let (result, ()) = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run_true(&session), fake) })
        .await
        .unwrap();
    assert!(matches!(result, Err(SessionError::Lost(_))), "{result:?}");
}

#[tokio::test]
async fn replies_for_other_ids_are_ignored_and_the_right_one_is_returned() {
    let (session, mut guest) = handshaken().await;
    let fake = async {
        let HostMessage::Request { id, .. } = read_host(&mut guest).await else {
            panic!("expected a request")
        };
        for message in [
            GuestMessage::Heartbeat,
            GuestMessage::Done {
                id: id + 100,
                result: Ok(Outcome::Exited { code: 0 }),
            },
            GuestMessage::Done {
                id,
                result: Ok(Outcome::Exited { code: 0 }),
            },
        ] {
            guest.write_all(&encode(&message).unwrap()).await.unwrap();
        }
        guest
    };
    let (result, _guest) =
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run_true(&session), fake) })
            .await
            .unwrap();
    assert_eq!(result.unwrap(), Ok(Outcome::Exited { code: 0 }));
}

/// The fake agent answers the first request with `outcome`.
async fn answer_with(guest: &mut UnixStream, outcome: Outcome) {
    let HostMessage::Request { id, .. } = read_host(guest).await else {
        panic!("expected a request")
    };
    let done = GuestMessage::Done {
        id,
        result: Ok(outcome),
    };
    guest.write_all(&encode(&done).unwrap()).await.unwrap();
}

#[tokio::test]
async fn an_image_operation_gets_its_own_reply_type() {
    use imgvm_protocol::{ImageReply, ListPackages, Package};
    let (session, mut guest) = handshaken().await;
    let packages = vec![Package {
        name: "base-files".into(),
        version: "13.8".into(),
        architecture: "amd64".into(),
        multi_arch: "foreign".into(),
    }];
    let reply = Outcome::Image(ImageReply::ListPackages(packages.clone()));
    let cancel = CancellationToken::new();
    let (result, _) = tokio::join!(
        session.image(ListPackages, None, |_| {}, &cancel),
        answer_with(&mut guest, reply)
    );
    assert_eq!(result.unwrap(), Ok(packages));
}

#[tokio::test]
async fn a_reply_of_another_operation_is_a_protocol_error() {
    use imgvm_protocol::{ImageReply, RunChecks};
    for wrong in [
        // What --test would have taken for "no checks failed".
        Outcome::Image(ImageReply::ListPackages(Vec::new())),
        Outcome::Exited { code: 0 },
    ] {
        let (session, mut guest) = handshaken().await;
        let cancel = CancellationToken::new();
        let (result, _) = tokio::join!(
            session.image(RunChecks(Vec::new()), None, |_| {}, &cancel),
            answer_with(&mut guest, wrong)
        );
        let err = result.unwrap_err();
        assert!(
            matches!(&err, SessionError::Protocol(m) if m.starts_with("run-checks answered")),
            "{err}"
        );
    }
}

/// Sends `messages` as the fake agent.
async fn send_all(guest: &mut (impl AsyncWriteExt + Unpin), messages: impl IntoIterator<Item = GuestMessage>) {
    for message in messages {
        guest.write_all(&encode(&message).unwrap()).await.unwrap();
    }
}

fn many_packages(n: usize) -> Vec<imgvm_protocol::Package> {
    (0..n)
        .map(|i| imgvm_protocol::Package {
            name: format!("package-{i}"),
            version: "1.0-1".into(),
            architecture: "amd64".into(),
            multi_arch: String::new(),
        })
        .collect()
}

#[tokio::test]
async fn a_reply_in_pieces_is_assembled() {
    use imgvm_protocol::{encode_payload, ImageReply, ListPackages, OperationError, CHUNK_LEN};
    let (session, mut guest) = handshaken().await;
    let packages = many_packages(10_000);
    let result: Result<Outcome, OperationError> = Ok(Outcome::Image(ImageReply::ListPackages(packages.clone())));
    let encoded = encode_payload(&result).unwrap();
    let fake = async {
        let HostMessage::Request { id, .. } = read_host(&mut guest).await else {
            panic!("expected a request")
        };
        let parts = encoded.chunks(CHUNK_LEN).map(|chunk| GuestMessage::ReplyPart {
            id,
            chunk: chunk.to_vec(),
        });
        send_all(&mut guest, parts.chain([GuestMessage::ReplyEnd { id }])).await;
    };
    let cancel = CancellationToken::new();
    let (result, _) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(session.image(ListPackages, None, |_| {}, &cancel), fake)
    })
    .await
    .unwrap();
    assert_eq!(result.unwrap(), Ok(packages));
}

/// A request whose owner does not take its messages makes the host stop reading, so it
/// stops acknowledging and the agent stops at its uplink window: host memory stays
/// bounded however much the guest has to say.
#[tokio::test]
async fn a_request_that_is_not_consumed_pushes_back_on_the_agent() {
    use imgvm_protocol::{Event, Operation, MAX_LINE_LEN};
    let (session, guest) = handshaken().await;
    let (mut guest_r, mut guest_w) = guest.into_split();
    let mut request = session.start(Operation::Run(Command::default())).await.unwrap();
    let len = guest_r.read_u32_le().await.unwrap() as usize;
    let mut buf = vec![0; len];
    guest_r.read_exact(&mut buf).await.unwrap();
    let HostMessage::Request { id, .. } = imgvm_protocol::decode(&buf).unwrap() else {
        panic!("expected a request")
    };
    // 4 MiB of output, written regardless of acknowledgements (a guest ignoring them).
    const LINES: usize = 512;
    let flood = tokio::spawn(async move {
        let line = vec![b'x'; MAX_LINE_LEN];
        let events = (0..LINES).map(move |_| GuestMessage::Event {
            id,
            event: Event::Stdout(line.clone()),
        });
        send_all(&mut guest_w, events).await;
        guest_w
    });
    // Count what the host says it has read while nobody takes the request's messages.
    let mut acked = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    loop {
        let read = async {
            let len = guest_r.read_u32_le().await.unwrap() as usize;
            let mut buf = vec![0; len];
            guest_r.read_exact(&mut buf).await.unwrap();
            imgvm_protocol::decode::<HostMessage>(&buf).unwrap()
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(HostMessage::Ack { bytes }) => acked += bytes,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(
        acked < 1024 * 1024,
        "the host read {acked} bytes for a request nobody consumes"
    );
    // Nothing was lost: every line arrives once the owner catches up.
    for _ in 0..LINES {
        let message = tokio::time::timeout(Duration::from_secs(5), request.next())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(message, GuestMessage::Event { .. }));
    }
    drop(flood);
}

#[tokio::test]
async fn data_beyond_the_granted_window_is_a_protocol_error() {
    use imgvm_protocol::{Transfer, STREAM_WINDOW};
    let (session, mut guest) = handshaken().await;
    let fake = async move {
        let HostMessage::Request { id, .. } = read_host(&mut guest).await else {
            panic!("expected a request")
        };
        // Twice the window in one go, without waiting for credit.
        let chunk = vec![0u8; 32 * 1024];
        let n = 2 * STREAM_WINDOW as usize / chunk.len();
        let data = (0..n).map(|_| GuestMessage::Data {
            id,
            chunk: chunk.clone(),
        });
        send_all(&mut guest, data).await;
        guest
    };
    let fake = tokio::spawn(fake);
    let mut sink = SlowSink;
    let cancel = CancellationToken::new();
    let download = session.download("/x", Transfer::File, &mut sink, u64::MAX, &cancel);
    let result = tokio::time::timeout(Duration::from_secs(10), download).await.unwrap();
    fake.abort();
    let err = result.unwrap_err();
    assert!(
        matches!(&err, SessionError::Protocol(m) if m.contains("beyond")),
        "{err}"
    );
}

/// A sink that takes its time over every write, as a slow disk would.
struct SlowSink;

impl tokio::io::AsyncWrite for SlowSink {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let waker = cx.waker().clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            waker.wake();
        });
        // Every other poll makes progress, so each write takes a wake-up.
        static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if READY.fetch_xor(true, std::sync::atomic::Ordering::Relaxed) {
            std::task::Poll::Ready(Ok(buf.len()))
        } else {
            std::task::Poll::Pending
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_download_stops_at_its_limit() {
    use imgvm_protocol::Transfer;
    let (session, mut guest) = handshaken().await;
    let fake = async move {
        let HostMessage::Request { id, .. } = read_host(&mut guest).await else {
            panic!("expected a request")
        };
        // Endless data, within the flow control: the host must stop it, not store it.
        loop {
            let data = GuestMessage::Data {
                id,
                chunk: vec![0u8; 32 * 1024],
            };
            if guest.write_all(&encode(&data).unwrap()).await.is_err() {
                break;
            }
            match read_host(&mut guest).await {
                HostMessage::Credit { .. } | HostMessage::Ack { .. } => {}
                HostMessage::Cancel { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        guest
    };
    let fake = tokio::spawn(fake);
    let mut sink = Vec::new();
    let cancel = CancellationToken::new();
    let download = session.download("/big", Transfer::File, &mut sink, 100_000, &cancel);
    let result = tokio::time::timeout(Duration::from_secs(10), download).await.unwrap();
    let err = result.unwrap_err();
    assert!(matches!(&err, SessionError::TooLarge { limit: 100_000, .. }), "{err}");
    assert!(sink.len() <= 100_000, "{} bytes written", sink.len());
    // The agent was told to stop.
    tokio::time::timeout(Duration::from_secs(5), fake)
        .await
        .unwrap()
        .unwrap();
}

/// A command on a terminal: what is typed and each new window size reach the agent, and
/// its raw output reaches the screen unchanged and is credited.
#[tokio::test]
async fn a_terminal_carries_keys_sizes_and_raw_output() {
    use imgvm_protocol::{Operation, WindowSize};
    let (session, mut guest) = handshaken().await;
    let (typed, keys) = tokio::sync::mpsc::channel(4);
    let (resized, sizes) = tokio::sync::mpsc::channel(4);
    let size = WindowSize { rows: 24, cols: 80 };
    let command = Command {
        argv: vec!["/bin/sh".into()],
        terminal: Some(size),
        ..Default::default()
    };
    let output = b"\x1b[1mbold\r\n# ".to_vec();
    let agent = async {
        let HostMessage::Request {
            id,
            operation: Operation::Run(asked),
        } = read_host(&mut guest).await
        else {
            panic!("expected a command")
        };
        assert!(asked.stdin && asked.terminal == Some(size), "{asked:?}");
        typed.send(b"ls\n".to_vec()).await.unwrap();
        let chunk = b"ls\n".to_vec();
        assert_eq!(read_host(&mut guest).await, HostMessage::Data { id, chunk });
        let bigger = WindowSize { rows: 50, cols: 132 };
        resized.send(bigger).await.unwrap();
        assert_eq!(read_host(&mut guest).await, HostMessage::Resize { id, size: bigger });
        let chunk = output.clone();
        send_all(&mut guest, [GuestMessage::Data { id, chunk }]).await;
        let bytes = output.len() as u64;
        assert_eq!(read_host(&mut guest).await, HostMessage::Credit { id, bytes });
        let result = Ok(Outcome::Exited { code: 0 });
        send_all(&mut guest, [GuestMessage::Done { id, result }]).await;
    };
    let mut screen = Vec::new();
    let cancel = CancellationToken::new();
    let (reply, ()) = tokio::join!(session.terminal(command, keys, sizes, &mut screen, &cancel), agent);
    assert_eq!(reply.unwrap(), Ok(Outcome::Exited { code: 0 }));
    assert_eq!(screen, output);
}
