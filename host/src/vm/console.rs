//! The helper VM's serial console, kept as its last [`KEEP`] bytes in memory: what a
//! failure report quotes. The guest decides how much it prints, so nothing of it grows
//! without bound, on disk or in memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of console output kept: some hundreds of lines.
pub const KEEP: usize = 64 * 1024;

#[derive(Clone, Default)]
pub struct Console {
    ring: Arc<Mutex<VecDeque<u8>>>,
}

impl Console {
    /// Reads `output` (qemu's serial port on its stdout) until it ends.
    pub fn capture(mut output: impl AsyncRead + Send + Unpin + 'static) -> Console {
        let console = Console::default();
        let ring = console.ring.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = output.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut ring = ring.lock().unwrap();
                ring.extend(&buf[..n]);
                let excess = ring.len().saturating_sub(KEEP);
                ring.drain(..excess);
            }
        });
        console
    }

    /// Whether the kept output contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        let bytes: Vec<u8> = self.ring.lock().unwrap().iter().copied().collect();
        String::from_utf8_lossy(&bytes).contains(text)
    }

    pub fn tail(&self, lines: usize) -> String {
        let bytes: Vec<u8> = self.ring.lock().unwrap().iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_flood_on_the_console_keeps_only_its_end() {
        let (mut guest, host) = tokio::io::duplex(64 * 1024);
        let console = Console::capture(host);
        for i in 0..200_000 {
            guest.write_all(format!("line {i}\n").as_bytes()).await.unwrap();
        }
        drop(guest);
        // Until the capture has read everything.
        for _ in 0..200 {
            if console.tail(1) == "line 199999" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(console.tail(2), "line 199998\nline 199999");
        assert!(console.ring.lock().unwrap().len() <= KEEP);
    }
}
