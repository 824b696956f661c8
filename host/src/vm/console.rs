//! The serial console, captured to a file by qemu.

use std::path::{Path, PathBuf};

pub struct Console {
    path: PathBuf,
}

impl Console {
    pub fn new(path: PathBuf) -> Self {
        Console { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
