//! Feeds arbitrary bytes, in arbitrary pieces, to the frame decoder as both peers would
//! receive them. Run with `cargo +nightly fuzz run decode` in `protocol/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imgvm_protocol::fuzzing::decode_frames(data));
