//! Feeds arbitrary bytes, in arbitrary pieces, to the frame decoder as both peers would
//! receive them. Run with `cargo +nightly fuzz run decode` in `protocol/`.
#![no_main]

use imgvm_protocol::{FrameDecoder, GuestMessage, HostMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let (first, second) = bytes.split_at((split as usize).min(bytes.len()));
    let mut guest = FrameDecoder::new();
    let mut host = FrameDecoder::new();
    for piece in [first, second] {
        guest.push(piece);
        host.push(piece);
        while let Ok(Some(_)) = guest.decode_next::<GuestMessage>() {}
        while let Ok(Some(_)) = host.decode_next::<HostMessage>() {}
    }
});
