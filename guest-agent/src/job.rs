//! One request being served: its id, the host's messages for it, and the way back.

use crate::connection::Writer;
use imgvm_protocol::{ErrorKind, OperationError, RequestId};
use std::io;
use std::sync::mpsc::{Receiver, Sender};

/// What reaches a running request: the host's stream messages, and for commands the exit
/// of the child (sent by its waiter thread).
pub enum Inbound {
    Data(Vec<u8>),
    End,
    Credit(u64),
    Cancel,
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
}

impl Job<'_> {
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
    };
    f(&job)
}
