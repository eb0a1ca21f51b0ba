//! Payload encoding: the user's keys, leaves and deltas travel as postcard-encoded serde data.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::DecodeError;

/// Appends the encoding of `value` to `out`.
///
/// # Errors
///
/// When the value's `Serialize` implementation fails.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    postcard::to_io(value, out)
        .map(|_| ())
        .map_err(|e| EncodeError(e.to_string()))
}

/// Decodes a whole payload; trailing bytes are an error.
///
/// # Errors
///
/// [`DecodeError::Payload`] when the bytes are not exactly one `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Payload(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}

/// A value could not be encoded.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("cannot encode payload: {0}")]
pub struct EncodeError(pub String);
