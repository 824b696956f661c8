//! Replays the committed fuzz corpus (`protocol/fuzz/corpus/decode`: the golden encodings
//! as frames, and hostile ones) through the fuzz target's body on the stable toolchain,
//! so what fuzzing once found stays fixed.

#[test]
fn the_decode_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| imgvm_protocol::fuzzing::decode_frames(&data));
        assert!(result.is_ok(), "{} fails", path.display());
        count += 1;
    }
    assert!(count > 40, "only {count} inputs in {}", dir.display());
}
