//! Every message (every image operation and reply among them) survives encode →
//! arbitrary split into pieces → decode, and no byte sequence makes the decoder panic or
//! allocate past the frame limit.

use imgvm_protocol::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// Draws `count` values from `strategy`, deterministically.
fn sample<S: Strategy>(strategy: S, count: usize) -> Vec<S::Value> {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// The generators reach every image operation, every reply and every error kind, so the
/// round trips below cover them all (a generator that never makes a case tests nothing).
#[test]
fn generators_reach_every_operation_reply_and_error_kind() {
    let mut ops: Vec<u32> = sample(any::<ImageOp>(), 300).iter().map(ImageOp::tag).collect();
    let mut replies: Vec<u32> = sample(any::<ImageReply>(), 300).iter().map(ImageReply::tag).collect();
    let all: Vec<u32> = ImageOp::ALL.iter().map(|(tag, _)| *tag).collect();
    for seen in [&mut ops, &mut replies] {
        seen.sort();
        seen.dedup();
        assert_eq!(*seen, all);
    }
    let mut kinds: Vec<String> = sample(any::<ErrorKind>(), 500)
        .iter()
        .map(|k| format!("{k:?}"))
        .collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
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

/// Arbitrary messages that fit in a frame (generated collections can be far larger).
fn fitting<M: Arbitrary + serde::Serialize>() -> impl Strategy<Value = M> {
    any::<M>().prop_filter("fits in a frame", |m| encode(m).is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn host_messages_round_trip(messages in proptest::collection::vec(fitting::<HostMessage>(), 1..6),
                                cuts in proptest::collection::vec(1usize..64, 0..32)) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| encode(m).unwrap()).collect();
        prop_assert_eq!(decode_in_pieces::<HostMessage>(&stream, &cuts), messages);
    }

    #[test]
    fn guest_messages_round_trip(messages in proptest::collection::vec(fitting::<GuestMessage>(), 1..6),
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
