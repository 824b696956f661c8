//! The language spoken between `imgvm` on the host and `imgvm-agent` inside the helper VM.
//!
//! One vsock connection carries everything: the guest connects to the host, says
//! [`GuestMessage::Hello`], and from then on the host sends [`HostMessage::Request`]s
//! tagged with ids it chooses. Output, progress and bulk data for a request travel as
//! messages tagged with the same id, so several operations can be in flight at once.
//!
//! Bulk data is flow-controlled with credits (see [`STREAM_WINDOW`]): a sender may have at
//! most that many bytes unacknowledged per stream, so neither side ever buffers a whole
//! file and one big transfer cannot starve the control messages of another.
//!
//! On top of that the whole guest-to-host direction is flow-controlled by
//! [`HostMessage::Ack`] (see [`UPLINK_WINDOW`]). vhost-device-vsock (0.3) mishandles the
//! data it has to buffer when the host socket is momentarily full (it stalls or drops
//! bytes), so the agent never lets more be in flight than the socket always holds.

mod bytes;
mod frame;
// First: its macros declare the operations in `image`.
#[macro_use]
mod operations;
mod image;
mod message;

#[doc(hidden)]
pub mod fuzzing;

pub use bytes::Bytes;
pub use frame::{
    blocking, decode, encode, encode_payload, payload_len, FrameDecoder, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN,
};
pub use image::*;
pub use message::*;
pub use operations::{Handle, ImageOperation};

/// Changed whenever an encoding changes. Not kept from memory: `tests/golden.rs` fails
/// when the pinned encodings differ and this number does not.
pub const PROTOCOL_VERSION: u32 = 10;

/// The vsock port the agent connects to when the kernel command line names none.
pub const AGENT_PORT: u32 = 1024;

/// The CID of the host, as seen from a guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// Size of one bulk data chunk. Small enough that a chunk never delays a control
/// message for long, large enough that per-frame overhead is negligible.
pub const CHUNK_LEN: usize = 32 * 1024;

/// Bytes a data sender may have in flight per stream before it waits for credit.
pub const STREAM_WINDOW: u64 = 32 * CHUNK_LEN as u64;

/// Bytes of frames the agent may have sent that the host has not acknowledged reading.
/// Well below the ~200 KiB a Unix socket holds by default (see the crate docs).
pub const UPLINK_WINDOW: u64 = 128 * 1024;

/// The host acknowledges once it has read this many bytes; smaller than
/// `UPLINK_WINDOW - CHUNK_LEN - MAX_LINE_LEN`, so the agent can always make progress.
pub const ACK_THRESHOLD: u64 = 32 * 1024;

/// Longest output line sent as one event; longer lines are split.
pub const MAX_LINE_LEN: usize = 8 * 1024;

/// Largest final result the host assembles from [`GuestMessage::ReplyPart`]s.
pub const MAX_REPLY_LEN: usize = 64 << 20;

/// How often the agent says it is alive.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How many stderr lines an error report carries.
pub const STDERR_TAIL_LINES: usize = 20;
