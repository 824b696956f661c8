//! One request being served: its id, the host's messages for it, and the way back.

use crate::connection::Writer;
use imgvm_protocol::{ErrorKind, OperationError, RequestId};
use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{Receiver, RecvError, Sender};
use std::sync::Mutex;

/// What reaches a running request: the host's stream messages, and for commands the exit
/// of the child (sent by its waiter thread).
pub enum Inbound {
    Data(Vec<u8>),
    End,
    Credit(u64),
    Cancel,
    /// The terminal of a command run on one has a new size.
    Resize(imgvm_protocol::WindowSize),
    Exited(i32),
}

pub struct Job<'a> {
    pub id: RequestId,
    /// How errors name the operation.
    pub name: String,
    /// Where the image's root is mounted: [`imgvm_protocol::TARGET`], or a directory tree
    /// in unit tests.
    pub root: String,
    pub tx: Sender<Inbound>,
    pub rx: Receiver<Inbound>,
    pub writer: &'a Writer,
    /// The request's input that a program of the agent's own received and left for the
    /// request's command ([`Job::keep`]).
    pub kept: Mutex<VecDeque<Inbound>>,
}

impl Job<'_> {
    /// The next message for the request: what was kept first.
    pub fn recv(&self) -> Result<Inbound, RecvError> {
        let kept = self.kept.lock().unwrap().pop_front();
        match kept {
            Some(message) => Ok(message),
            None => self.rx.recv(),
        }
    }

    /// Leaves `message`, part of the request's input stream, for what reads the request's
    /// messages next: the host streams a command's input from the start, while the agent
    /// may first run programs of its own for it (the mounts of a view of the image).
    pub fn keep(&self, message: Inbound) {
        self.kept.lock().unwrap().push_back(message);
    }

    pub fn error(&self, kind: ErrorKind, message: String) -> OperationError {
        OperationError {
            operation: self.name.clone(),
            kind,
            message,
            errno: None,
            exit_code: None,
            stderr_tail: Vec::new(),
        }
    }

    pub fn io_error(&self, e: &io::Error) -> OperationError {
        let kind = match e.raw_os_error() {
            _ if e.kind() == io::ErrorKind::Interrupted => ErrorKind::Cancelled,
            Some(libc::ENOSPC) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        OperationError {
            errno: e.raw_os_error(),
            ..self.error(kind, e.to_string())
        }
    }
}

pub fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "cancelled by the host")
}

/// A job for unit tests of operations that work on a directory tree: its messages go
/// nowhere, and `root` stands in for the image.
#[cfg(test)]
pub fn with_test_job<T>(root: &std::path::Path, f: impl FnOnce(&Job) -> T) -> T {
    let writer = Writer::new(std::io::sink());
    let (tx, rx) = std::sync::mpsc::channel();
    let job = Job {
        id: 1,
        name: "test".into(),
        root: root.to_str().expect("UTF-8 test path").to_owned(),
        tx,
        rx,
        writer: &writer,
        kept: Mutex::default(),
    };
    f(&job)
}
