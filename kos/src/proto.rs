//! The CONN protocol (docs/KOS.md): length-prefixed frames over TCP, each a postcard-encoded
//! [`Request`] (KOS to agent) or [`Reply`] (agent to KOS). Pure functions, no I/O.
//!
//! A frame is a 4-byte big-endian body length followed by the body. The first request on a
//! connection is [`Request::Conn`] with the protocol version; `Conn` is variant 0 with the
//! version as its first field in every version, so any agent can read it and answer a
//! mismatch with a clear error.
//!
//! ```
//! use grapevine_kos::proto::{decode, encode_frame, frame_len, Request, DEFAULT_MAX_FRAME};
//! let mut wire = Vec::new();
//! encode_frame(&Request::Ping { id: 7 }, &mut wire)?;
//! let len = frame_len(wire[..4].try_into().unwrap(), DEFAULT_MAX_FRAME)?;
//! assert_eq!(decode::<Request>(&wire[4..4 + len])?, Request::Ping { id: 7 });
//! # Ok::<(), grapevine_kos::proto::ProtoError>(())
//! ```

use serde::{Deserialize, Serialize};

pub use grapevine_gvd_schema::frame::{
    decode, encode_frame, frame_len, FrameError as ProtoError, DEFAULT_MAX_FRAME, FRAME_HEADER_LEN,
};

use crate::nodes::Vdev;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a KOS sends.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum Request {
    /// First message of a connection. Must stay variant 0, version first, forever.
    Conn {
        /// The client's protocol version.
        version: u32,
        /// Who is connecting (for logs).
        client: String,
    },
    /// Open a VDEV by name (and driver, when names clash); answered by [`Reply::Opened`].
    Open {
        /// Request id, echoed in the reply.
        id: u64,
        /// The VDEV's name.
        vdev: String,
        /// The driver exposing it, if the name alone is ambiguous.
        driver: Option<String>,
    },
    /// Call a function of an open VDEV; answered by [`Reply::Result`].
    Call {
        /// Request id.
        id: u64,
        /// The handle from [`Reply::Opened`].
        handle: u32,
        /// The function.
        function: String,
        /// Its argument bytes.
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
    },
    /// Close a handle; answered by [`Reply::Closed`].
    Close {
        /// Request id.
        id: u64,
        /// The handle.
        handle: u32,
    },
    /// Liveness check; answered by [`Reply::Pong`] even while a call is running.
    Ping {
        /// Request id.
        id: u64,
    },
}

/// What an agent sends.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum Reply {
    /// The connection is accepted. Must stay variant 0, version first, forever.
    Conn {
        /// The agent's protocol version.
        version: u32,
        /// The node serving this connection.
        node_id: u64,
        /// The process id of the agent serving it.
        agent_pid: u32,
    },
    /// A VDEV was opened.
    Opened {
        /// Request id.
        id: u64,
        /// The handle to call it with.
        handle: u32,
        /// The driver exposing it.
        driver: String,
        /// The device.
        vdev: Vdev,
    },
    /// A call's answer.
    Result {
        /// Request id.
        id: u64,
        /// The answer bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A request failed; `id` is `None` when the failure is not tied to a request (a frame
    /// that could not be read, a refused connection).
    Error {
        /// Request id, if any.
        id: Option<u64>,
        /// What went wrong.
        kind: ErrorKind,
        /// Details for people.
        message: String,
    },
    /// A handle was closed.
    Closed {
        /// Request id.
        id: u64,
    },
    /// Answer to [`Request::Ping`].
    Pong {
        /// Request id.
        id: u64,
    },
}

/// Kinds of [`Reply::Error`].
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum ErrorKind {
    /// The versions differ; the connection is closed.
    VersionMismatch {
        /// The version the agent speaks.
        server: u32,
    },
    /// A request came before `Conn`; the connection is closed.
    NotConnected,
    /// A frame was larger than allowed; the connection is closed.
    FrameTooLarge {
        /// The limit.
        max: u32,
    },
    /// A frame could not be decoded (unknown message type, bad fields); the connection stays.
    UnknownMessage,
    /// No such VDEV on this node (now).
    NoSuchVdev,
    /// The handle is not open.
    NotOpen,
    /// The driver returned an error code (its panics are caught and become code -1).
    DriverFailed {
        /// The code.
        code: i32,
    },
    /// The call took longer than the agent allows; the agent ends and the connection with it.
    Timeout,
    /// The node serves as many connections as it may; try later.
    TooManyConnections,
    /// The agent could not do what was asked for another reason (driver failed to load, ...).
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::DeserializeOwned;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(message: &T) {
        let mut wire = vec![9, 9];
        encode_frame(message, &mut wire).unwrap();
        assert_eq!(&wire[..2], &[9, 9], "appends");
        let len = frame_len(wire[2..6].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len, wire.len() - 6);
        assert_eq!(&decode::<T>(&wire[6..]).unwrap(), message);
    }

    proptest! {
        #[test]
        fn requests_roundtrip(id: u64, handle: u32, function in ".{0,20}", args in proptest::collection::vec(any::<u8>(), 0..300)) {
            roundtrip(&Request::Call { id, handle, function, args });
            roundtrip(&Request::Close { id, handle });
        }

        #[test]
        fn replies_roundtrip(id: u64, data in proptest::collection::vec(any::<u8>(), 0..300), code: i32) {
            roundtrip(&Reply::Result { id, data });
            roundtrip(&Reply::Error { id: Some(id), kind: ErrorKind::DriverFailed { code }, message: "x".into() });
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Reply>(&bytes);
        }
    }

    #[test]
    fn conn_is_variant_zero_with_the_version_first() {
        let mut wire = Vec::new();
        encode_frame(
            &Request::Conn {
                version: 1,
                client: "k".into(),
            },
            &mut wire,
        )
        .unwrap();
        // Length 4, variant 0, version 1 (varint), a 1-byte string "k".
        assert_eq!(wire, [0, 0, 0, 4, 0, 1, 1, b'k']);
    }

    #[test]
    fn oversized_and_trailing_are_errors() {
        assert_eq!(
            frame_len([0, 0, 1, 1], 256),
            Err(ProtoError::FrameTooLarge { len: 257, max: 256 })
        );
        let mut wire = Vec::new();
        encode_frame(&Request::Ping { id: 1 }, &mut wire).unwrap();
        wire.push(0);
        assert!(matches!(
            decode::<Request>(&wire[4..]),
            Err(ProtoError::Decode(_))
        ));
        assert!(matches!(
            decode::<Request>(&[200]),
            Err(ProtoError::Decode(_))
        ));
    }
}
