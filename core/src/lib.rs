//! Protocol types and codec of WSE protocol v1: envelopes, categories, frame encodings, limits and errors.
//!
//! This crate is the stable core every other wsengine crate builds on. It does no I/O and
//! depends on neither tokio nor hyper: it turns envelopes into WebSocket frames and frames
//! back into messages, following `PROTOCOL.md` (§3 frame encodings, §4 envelopes, §6.1 protocol
//! frames, §9 stamps, §12 codes).
//!
//! Cargo features, both on by default: `compression` (the `C:` zlib form, through flate2) and
//! `msgpack` (the `M:` form and `format=msgpack` connections, through rmp-serde). The
//! [`frame`] module documents what the codec does without them.
//!
//! ```
//! use wsengine_core::{decode_frame, encode_data, Decoded, Envelope, Limits, WireFormat};
//!
//! let env = Envelope::new("echo_reply", serde_json::json!({"hello": "world"}));
//! assert_eq!(env.to_json(), br#"{"c":"U","t":"echo_reply","p":{"hello":"world"},"v":1}"#);
//!
//! // Per-connection events travel as binary plain JSON on JSON connections.
//! let frame = encode_data(&env, WireFormat::Json, false, Some((1024, 1)));
//! match decode_frame(&frame, WireFormat::Json, &Limits::default()).unwrap() {
//!     Decoded::Message(msg) => assert_eq!(msg.t(), Some("echo_reply")),
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

pub mod canonical;
pub mod category;
pub mod codes;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod limits;
pub mod time;
pub mod topic;

pub use category::Category;
pub use codes::{CloseCode, ErrorCode};
pub use envelope::{Envelope, InboundMessage, Stamp};
pub use error::ProtocolError;
#[cfg(feature = "compression")]
pub use frame::compress;
#[cfg(feature = "msgpack")]
pub use frame::decode_msgpack;
pub use frame::{
    DecodeError, Decoded, Frame, WireFormat, decode_frame, decode_plaintext, encode_data, encode_protocol,
};
pub use limits::Limits;
