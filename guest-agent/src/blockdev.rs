//! Block devices as the kernel lists them in /sys/block.

use imgvm_protocol::BlockDevice;
use std::io;
use std::path::Path;

pub fn list() -> io::Result<Vec<BlockDevice>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let dir = entry?.path();
        let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        let sectors: u64 = read(&dir.join("size")).and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push(BlockDevice {
            name,
            size_bytes: sectors * 512,
            read_only: read(&dir.join("ro")).as_deref() == Some("1"),
            serial: read(&dir.join("serial")).filter(|s| !s.is_empty()),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}
