//! Every message survives encode → arbitrary split into pieces → decode, and no byte
//! sequence makes the decoder panic or allocate past the frame limit.

use imgvm_protocol::*;
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..512)
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn transfer() -> impl Strategy<Value = Transfer> {
    prop_oneof![Just(Transfer::File), Just(Transfer::Tar)]
}

fn operation() -> impl Strategy<Value = Operation> {
    let command = (
        proptest::collection::vec(text(), 0..5),
        proptest::collection::vec((text(), text()), 0..3),
        proptest::option::of(text()),
        any::<bool>(),
    )
        .prop_map(|(argv, env, cwd, stdin)| Command { argv, env, cwd, stdin });
    prop_oneof![
        command.prop_map(Operation::Run),
        (text(), transfer(), any::<u32>()).prop_map(|(path, format, mode)| Operation::Upload { path, format, mode }),
        (text(), transfer()).prop_map(|(path, format)| Operation::Download { path, format }),
        Just(Operation::ListBlockDevices),
    ]
}

fn host_message() -> impl Strategy<Value = HostMessage> {
    prop_oneof![
        any::<u32>().prop_map(|protocol_version| HostMessage::Welcome { protocol_version }),
        (any::<u32>(), operation()).prop_map(|(id, operation)| HostMessage::Request { id, operation }),
        (any::<u32>(), bytes()).prop_map(|(id, chunk)| HostMessage::Data { id, chunk }),
        any::<u32>().prop_map(|id| HostMessage::EndOfData { id }),
        (any::<u32>(), any::<u64>()).prop_map(|(id, bytes)| HostMessage::Credit { id, bytes }),
        any::<u32>().prop_map(|id| HostMessage::Cancel { id }),
        Just(HostMessage::Shutdown),
        any::<u64>().prop_map(|bytes| HostMessage::Ack { bytes }),
    ]
}

fn error() -> impl Strategy<Value = OperationError> {
    (
        text(),
        prop_oneof![
            Just(ErrorKind::CommandFailed),
            Just(ErrorKind::Io),
            Just(ErrorKind::InvalidRequest),
            Just(ErrorKind::Cancelled)
        ],
        text(),
        proptest::option::of(any::<i32>()),
        proptest::option::of(any::<i32>()),
        proptest::collection::vec(text(), 0..4),
    )
        .prop_map(
            |(operation, kind, message, errno, exit_code, stderr_tail)| OperationError {
                operation,
                kind,
                message,
                errno,
                exit_code,
                stderr_tail,
            },
        )
}

fn guest_message() -> impl Strategy<Value = GuestMessage> {
    let outcome = prop_oneof![
        any::<i32>().prop_map(|code| Outcome::Exited { code }),
        any::<u64>().prop_map(|bytes| Outcome::Transferred { bytes }),
        proptest::collection::vec(
            (text(), any::<u64>(), any::<bool>(), proptest::option::of(text())).prop_map(
                |(name, size_bytes, read_only, serial)| BlockDevice {
                    name,
                    size_bytes,
                    read_only,
                    serial
                }
            ),
            0..3
        )
        .prop_map(Outcome::BlockDevices),
    ];
    let event = prop_oneof![
        bytes().prop_map(Event::Stdout),
        bytes().prop_map(Event::Stderr),
        (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(done, total)| Event::Progress { done, total }),
    ];
    prop_oneof![
        (any::<u32>(), text(), text(), text()).prop_map(|(protocol_version, agent_version, machine, kernel)| {
            GuestMessage::Hello(Handshake {
                protocol_version,
                agent_version,
                machine,
                kernel,
            })
        }),
        (any::<u32>(), event).prop_map(|(id, event)| GuestMessage::Event { id, event }),
        (any::<u32>(), bytes()).prop_map(|(id, chunk)| GuestMessage::Data { id, chunk }),
        any::<u32>().prop_map(|id| GuestMessage::EndOfData { id }),
        (any::<u32>(), any::<u64>()).prop_map(|(id, bytes)| GuestMessage::Credit { id, bytes }),
        (any::<u32>(), prop_oneof![outcome.prop_map(Ok), error().prop_map(Err)])
            .prop_map(|(id, result)| GuestMessage::Done { id, result }),
        Just(GuestMessage::Heartbeat),
    ]
}

/// Feeds `stream` to a decoder in pieces of the given sizes and collects the messages.
fn decode_in_pieces<T: serde::de::DeserializeOwned>(stream: &[u8], cuts: &[usize]) -> Vec<T> {
    let mut decoder = FrameDecoder::new();
    let mut out = Vec::new();
    let mut rest = stream;
    for &cut in cuts.iter().chain(std::iter::repeat(&usize::MAX)) {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(cut.clamp(1, rest.len()));
        rest = tail;
        decoder.push(piece);
        while let Some(message) = decoder.decode_next().unwrap() {
            out.push(message);
        }
    }
    out
}

proptest! {
    #[test]
    fn host_messages_round_trip(messages in proptest::collection::vec(host_message(), 1..8),
                                cuts in proptest::collection::vec(1usize..64, 0..32)) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| encode(m).unwrap()).collect();
        prop_assert_eq!(decode_in_pieces::<HostMessage>(&stream, &cuts), messages);
    }

    #[test]
    fn guest_messages_round_trip(messages in proptest::collection::vec(guest_message(), 1..8),
                                 cuts in proptest::collection::vec(1usize..64, 0..32)) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| encode(m).unwrap()).collect();
        prop_assert_eq!(decode_in_pieces::<GuestMessage>(&stream, &cuts), messages);
    }

    #[test]
    fn arbitrary_bytes_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream);
        while let Ok(Some(_)) = decoder.decode_next::<GuestMessage>() {}
    }
}

#[test]
fn oversized_frame_is_rejected_from_its_header() {
    let mut decoder = FrameDecoder::new();
    decoder.push(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
    let err = decoder.decode_next::<GuestMessage>().unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { len } if len == MAX_FRAME_LEN + 1),
        "{err}"
    );
}

#[test]
fn oversized_message_cannot_be_encoded() {
    let message = GuestMessage::Data {
        id: 1,
        chunk: vec![0; MAX_FRAME_LEN],
    };
    assert!(matches!(encode(&message), Err(FrameError::TooLarge { .. })));
}

#[test]
fn full_chunk_fits_in_a_frame() {
    let message = GuestMessage::Data {
        id: u32::MAX,
        chunk: vec![0xff; CHUNK_LEN],
    };
    let frame = encode(&message).unwrap();
    assert!(frame.len() - FRAME_HEADER_LEN <= MAX_FRAME_LEN);
}

#[test]
fn trailing_garbage_in_a_frame_is_malformed() {
    let mut frame = encode(&HostMessage::Shutdown).unwrap();
    frame.push(0);
    let len = (frame.len() - FRAME_HEADER_LEN) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    let mut decoder = FrameDecoder::new();
    decoder.push(&frame);
    assert!(matches!(
        decoder.decode_next::<HostMessage>(),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn unknown_variant_is_malformed() {
    let mut decoder = FrameDecoder::new();
    decoder.push(&[1, 0, 0, 0, 200]);
    assert!(matches!(
        decoder.decode_next::<GuestMessage>(),
        Err(FrameError::Malformed(_))
    ));
}
