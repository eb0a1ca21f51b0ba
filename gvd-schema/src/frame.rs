//! Length-prefixed postcard frames, the framing of KOS connections (docs/KOS.md) and of
//! GrapeVineFS replication: a 4-byte big-endian body length, then the body. Pure functions.
//!
//! ```
//! use grapevine_gvd_schema::frame::{decode, encode_frame, frame_len, DEFAULT_MAX_FRAME};
//! let mut wire = Vec::new();
//! encode_frame(&(7u32, "hello"), &mut wire)?;
//! let len = frame_len(wire[..4].try_into().unwrap(), DEFAULT_MAX_FRAME)?;
//! assert_eq!(decode::<(u32, String)>(&wire[4..4 + len])?, (7, "hello".to_string()));
//! # Ok::<(), grapevine_gvd_schema::frame::FrameError>(())
//! ```

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame body accepted by default (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why bytes are not a frame or a message.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes, at most {max} allowed")]
    FrameTooLarge {
        /// Announced body length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The body is not a message of this version.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// The message cannot be encoded (too large for a frame).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// The body length announced by a frame header, checked against `max`.
///
/// # Errors
///
/// [`FrameError::FrameTooLarge`].
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(FrameError::FrameTooLarge {
            len: u64::from(len),
            max,
        }),
    }
}

/// Appends `message` as one frame to `out`.
///
/// # Errors
///
/// [`FrameError::Encode`] when it cannot be encoded or exceeds 4 GiB.
pub fn encode_frame<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let encoded = postcard::to_extend(message, std::mem::take(out));
    let mut buffer = encoded.map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = u32::try_from(buffer.len() - start - FRAME_HEADER_LEN)
        .map_err(|_| FrameError::Encode("message over 4 GiB".into()))?;
    buffer[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    *out = buffer;
    Ok(())
}

/// Decodes a frame body; trailing bytes are an error.
///
/// # Errors
///
/// [`FrameError::Decode`].
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(FrameError::Decode(format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}
