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
