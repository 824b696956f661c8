//! The messages themselves. Every request carries a host-chosen id; everything the guest
//! says about that request carries the same id.

use serde::{Deserialize, Serialize};

pub type RequestId = u32;

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum HostMessage {
    /// Answer to the guest's hello: the host accepts the agent and will send requests.
    Welcome {
        protocol_version: u32,
    },
    Request {
        id: RequestId,
        operation: Operation,
    },
    /// A chunk of the request's input stream (stdin of a command, an uploaded file).
    Data {
        id: RequestId,
        #[serde(with = "serde_bytes")]
        chunk: Vec<u8>,
    },
    /// The request's input stream is complete.
    EndOfData {
        id: RequestId,
    },
    /// The host consumed `bytes` of the request's output stream.
    Credit {
        id: RequestId,
        bytes: u64,
    },
    /// Stop the request; it still ends with a [`GuestMessage::Done`].
    Cancel {
        id: RequestId,
    },
    /// No more requests: sync the disks and power off.
    Shutdown,
    /// The host has read `bytes` more bytes of the agent's frames (see
    /// [`crate::UPLINK_WINDOW`]).
    Ack {
        bytes: u64,
    },
    /// The terminal of a command run on one ([`Command::terminal`]) has a new size.
    Resize {
        id: RequestId,
        size: WindowSize,
    },
}

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum GuestMessage {
    Hello(Handshake),
    Event {
        id: RequestId,
        event: Event,
    },
    /// A chunk of the request's output stream (a downloaded file or tar stream).
    Data {
        id: RequestId,
        #[serde(with = "serde_bytes")]
        chunk: Vec<u8>,
    },
    EndOfData {
        id: RequestId,
    },
    /// The guest consumed `bytes` of the request's input stream.
    Credit {
        id: RequestId,
        bytes: u64,
    },
    /// The request ended. No message with this id follows.
    Done {
        id: RequestId,
        result: Result<Outcome, OperationError>,
    },
    /// Sent every [`crate::HEARTBEAT_INTERVAL`], so the host can tell a busy guest from a
    /// hung one.
    Heartbeat,
    /// A piece of the request's final result, encoded as [`Done`](GuestMessage::Done)'s
    /// `result` would be: a result that does not fit one [`crate::CHUNK_LEN`] frame (the
    /// package list of a large image, an error with long stderr) travels in pieces, each
    /// flow-controlled like any other frame, and never more than [`crate::MAX_REPLY_LEN`]
    /// in all.
    ReplyPart {
        id: RequestId,
        #[serde(with = "serde_bytes")]
        chunk: Vec<u8>,
    },
    /// The pieces sent as [`ReplyPart`](GuestMessage::ReplyPart) are complete: the
    /// request ended as if with `Done`.
    ReplyEnd {
        id: RequestId,
    },
}

/// What the agent says about itself before anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Handshake {
    pub protocol_version: u32,
    pub agent_version: String,
    /// `uname -m` of the guest.
    pub machine: String,
    /// `uname -r` of the guest.
    pub kernel: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum Operation {
    Run(Command),
    /// Write the request's input stream to `path` (a file, or with `Tar` a directory the
    /// stream is unpacked into).
    Upload {
        path: String,
        format: Transfer,
        mode: u32,
    },
    /// Send `path` (a file or block device, or with `Tar` a directory packed as a tar
    /// stream) as the request's output stream.
    Download {
        path: String,
        format: Transfer,
    },
    Image(crate::ImageOp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum Transfer {
    File,
    Tar,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Command {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Whether the host streams stdin as `Data`; otherwise stdin is `/dev/null`.
    pub stdin: bool,
    /// Run chrooted in the image mounted at [`crate::TARGET`] (with the helper's own
    /// /dev, /proc, /sys, /run and /tmp), instead of in the helper.
    pub image: Option<Access>,
    /// Run on a pseudo-terminal of this size, its stdin, stdout and stderr: the output
    /// arrives as raw `Data` (terminal bytes, not lines), the host's `Data` is typed on
    /// it, and [`HostMessage::Resize`] changes its size.
    pub terminal: Option<WindowSize>,
}

/// How a command in the image may touch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum Access {
    /// The image's filesystems are bound read-only where the command sees them.
    ReadOnly,
    ReadWrite,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum Event {
    /// One line of output, without its newline. Lines over [`crate::MAX_LINE_LEN`] arrive
    /// in pieces.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum Outcome {
    /// The command exited with status 0..=255.
    Exited {
        code: i32,
    },
    Transferred {
        bytes: u64,
    },
    /// An image operation completed; the reply's variant is the request's.
    Image(crate::ImageReply),
}

/// Why an operation failed, with what the host needs to tell the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct OperationError {
    pub operation: String,
    pub kind: ErrorKind,
    pub message: String,
    pub errno: Option<i32>,
    /// Exit code when a command failed, or the signal number as `128 + n` when it was killed.
    pub exit_code: Option<i32>,
    pub stderr_tail: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub enum ErrorKind {
    /// A command ran and exited non-zero or was killed.
    CommandFailed,
    /// A system call or I/O failed (see `errno`).
    Io,
    /// The request made no sense (bad path, unknown device, reused id).
    InvalidRequest,
    Cancelled,
    /// A filesystem of the image (or the helper's scratch space) is full.
    NoSpace,
    /// apt cannot find a package the recipe names.
    MissingPackage,
}

impl std::fmt::Display for OperationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.operation, self.message)?;
        if let Some(errno) = self.errno {
            write!(f, " (errno {errno})")?;
        }
        if !self.stderr_tail.is_empty() {
            write!(f, "\nlast lines of stderr:")?;
            for line in &self.stderr_tail {
                write!(f, "\n  {line}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for OperationError {}
