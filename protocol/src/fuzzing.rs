//! The bodies of the fuzz targets (`protocol/fuzz`), kept here so that the committed
//! corpus replays through them in every normal test run (`tests/fuzz_corpus.rs`), on the
//! stable toolchain, and not only under cargo-fuzz.

use crate::{decode, encode, FrameDecoder, GuestMessage, HostMessage, FRAME_HEADER_LEN};

/// Arbitrary bytes, in two pieces split where the first byte says, through the frame
/// decoder as each peer receives them. Nothing may panic, and whatever decodes must
/// encode back to a frame that decodes to the same message.
pub fn decode_frames(data: &[u8]) {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let (first, second) = bytes.split_at((split as usize).min(bytes.len()));
    let mut guest = FrameDecoder::new();
    let mut host = FrameDecoder::new();
    for piece in [first, second] {
        guest.push(piece);
        host.push(piece);
        while let Ok(Some(message)) = guest.decode_next::<GuestMessage>() {
            round_trip(&message);
        }
        while let Ok(Some(message)) = host.decode_next::<HostMessage>() {
            round_trip(&message);
        }
    }
}

fn round_trip<T>(message: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    // A decoded message may still be too large to send (a long string in a small frame
    // cannot be, but the limit is checked rather than assumed).
    let Ok(frame) = encode(message) else {
        return;
    };
    let again: T = decode(&frame[FRAME_HEADER_LEN..]).expect("an encoded message decodes");
    assert_eq!(&again, message, "decoding is not the inverse of encoding");
}
