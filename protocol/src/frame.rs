//! Length-prefixed framing: a little-endian `u32` payload length, then a postcard payload.
//!
//! The length is checked before any payload byte is buffered, so a hostile or broken
//! peer can make us allocate at most [`MAX_FRAME_LEN`] bytes.

use serde::{de::DeserializeOwned, Serialize};

/// Hard upper bound of a frame's payload. A data chunk plus its envelope fits easily.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Serialises `message` into one complete frame, header included.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(message, vec![0u8; FRAME_HEADER_LEN])?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// A value's encoding without a frame around it: what a frame's payload, or the pieces of
/// a [`crate::GuestMessage::ReplyPart`] stream, carry.
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    Ok(postcard::to_allocvec(value)?)
}

/// Parses a payload (the bytes after the header). Trailing bytes are an error: a frame
/// holds exactly one message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    let (message, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(postcard::Error::DeserializeUnexpectedEnd));
    }
    Ok(message)
}

/// Validates a length prefix before its payload is read.
pub fn payload_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Incremental decoder for byte streams that arrive in arbitrary pieces.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. After an error
    /// the stream is out of sync and must be dropped.
    pub fn decode_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let len = payload_len(*header)?;
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let message = decode(&self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
        self.buf.drain(..FRAME_HEADER_LEN + len);
        message.map(Some)
    }
}

/// Blocking helpers for the agent, which uses plain threads.
pub mod blocking {
    use super::*;
    use std::io::{self, Read, Write};

    /// Reads one message; `Ok(None)` on a clean end of stream between frames.
    pub fn read<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = payload_len(header).map_err(invalid)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        decode(&payload).map(Some).map_err(invalid)
    }

    pub fn write<T: Serialize>(w: &mut impl Write, message: &T) -> io::Result<()> {
        w.write_all(&encode(message).map_err(invalid)?)
    }

    fn invalid(e: FrameError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}
