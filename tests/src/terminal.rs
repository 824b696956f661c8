//! A pseudo-terminal for a command: its stdin, stdout and stderr are a terminal, as a
//! person's would be, and the test types on it and reads what it shows.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Terminal {
    child: Child,
    keyboard: std::fs::File,
    shown: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Terminal {
    /// Starts `cmd` on a new pseudo-terminal.
    pub fn spawn(cmd: &mut Command) -> Terminal {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty fills in two descriptors, which are owned from here on.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both were just opened and nothing else owns them.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let io = || Stdio::from(slave.try_clone().unwrap());
        let child = cmd.stdin(io()).stdout(io()).stderr(io()).spawn().unwrap();
        // Only the child holds the terminal's other end now: its end is our EOF.
        drop(slave);
        let keyboard = std::fs::File::from(master);
        let mut screen = keyboard.try_clone().unwrap();
        let shown = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let shown = shown.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // EIO once the child's end is closed, on Linux.
                while let Ok(n @ 1..) = screen.read(&mut buf) {
                    shown.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        Terminal {
            child,
            keyboard,
            shown,
            reader: Some(reader),
        }
    }

    /// Everything shown so far.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.shown.lock().unwrap()).into_owned()
    }

    /// Waits until `text` is shown; false when `limit` passed first or the command ended.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.shown().contains(text) {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                std::thread::sleep(Duration::from_millis(200));
                return self.shown().contains(text);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Types `bytes`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.keyboard.write_all(bytes).unwrap();
    }

    /// Waits for the command to end (killed after `limit`): its status and everything
    /// it showed.
    pub fn finish(mut self, limit: Duration) -> (Option<ExitStatus>, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.shown())
    }
}
