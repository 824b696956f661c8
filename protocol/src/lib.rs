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

mod frame;
mod message;

pub use frame::{blocking, decode, encode, payload_len, FrameDecoder, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use message::*;

/// Bumped on every incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent connects to when the kernel command line names none.
pub const AGENT_PORT: u32 = 1024;

/// The CID of the host, as seen from a guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// Size of one bulk data chunk. Small enough that a chunk never delays a control
/// message for long, large enough that per-frame overhead is negligible.
pub const CHUNK_LEN: usize = 128 * 1024;

/// Bytes a data sender may have in flight per stream before it waits for credit.
pub const STREAM_WINDOW: u64 = 8 * CHUNK_LEN as u64;

/// Longest output line sent as one event; longer lines are split.
pub const MAX_LINE_LEN: usize = 8 * 1024;

/// How often the agent says it is alive.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How many stderr lines an error report carries.
pub const STDERR_TAIL_LINES: usize = 20;
