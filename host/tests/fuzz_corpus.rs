//! Replays the committed fuzz corpus of the package proxy's request parser
//! (`host/fuzz/corpus/proxy_head`) on the stable toolchain.

#[test]
fn the_proxy_head_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/proxy_head");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| imgvm::proxy::fuzzing::request_head(&data));
        assert!(result.is_ok(), "{} fails", path.display());
        count += 1;
    }
    assert!(count >= 10, "only {count} inputs in {}", dir.display());
}
