//! A guest's request to the package proxy, as arbitrary bytes. Run with
//! `cargo +nightly fuzz run proxy_head` in `host/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imgvm::proxy::fuzzing::request_head(data));
