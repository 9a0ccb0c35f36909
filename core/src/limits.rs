//! Size and nesting limits of PROTOCOL.md §3.5.
//!
//! ```
//! use wsengine_core::Limits;
//!
//! let limits = Limits::default();
//! assert_eq!(limits.max_message_size, 1024 * 1024);
//! assert_eq!(limits.max_msgpack_depth, 64);
//! ```

/// Inbound limits applied while decoding frames. The defaults are the protocol's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest inbound frame, in bytes (1 MiB). Larger frames close the connection with 1009.
    pub max_message_size: usize,
    /// Largest inflated `C:` content, in bytes (1 MiB); inflation stops as soon as it is passed.
    pub max_inflated_size: usize,
    /// Deepest msgpack nesting accepted (64); containers count, the outermost is depth 1.
    pub max_msgpack_depth: usize,
    /// Deepest JSON nesting accepted (128); deeper documents are treated as unparsable.
    pub max_json_depth: usize,
}

/// The protocol's default maximum message size, 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1_048_576;

/// Largest outbound message, prefix and encryption overhead included; fixed by the clients.
pub const MAX_OUTBOUND_MESSAGE_SIZE: usize = 1_048_576;

/// Shortest valid `E:` frame: prefix (2) + IV (12) + tag (16).
pub const MIN_ENCRYPTED_FRAME_LEN: usize = 30;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_inflated_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_msgpack_depth: 64,
            max_json_depth: 128,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_protocol() {
        let l = Limits::default();
        assert_eq!(l.max_message_size, 1_048_576);
        assert_eq!(l.max_inflated_size, 1_048_576);
        assert_eq!(l.max_msgpack_depth, 64);
        assert_eq!(l.max_json_depth, 128);
        assert_eq!(MAX_OUTBOUND_MESSAGE_SIZE, 1_048_576);
        assert_eq!(MIN_ENCRYPTED_FRAME_LEN, 2 + 12 + 16);
    }
}
