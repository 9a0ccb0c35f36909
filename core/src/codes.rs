//! WebSocket close codes and the `error` frame codes of PROTOCOL.md §12.
//!
//! ```
//! use wsengine_core::{CloseCode, ErrorCode};
//!
//! assert_eq!(CloseCode::AUTH_FAILED.0, 4401);
//! assert_eq!(ErrorCode::MessageTooLarge.as_str(), "MESSAGE_TOO_LARGE");
//! assert_eq!(ErrorCode::parse("RATE_LIMITED"), Some(ErrorCode::RateLimited));
//! ```

use std::fmt;

/// A WebSocket close status code (§12.1). Any `u16` can be wrapped; the engine's own uses are
/// the associated constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: echoing a client's close, or an application ending a session.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: engine shutdown.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: RFC 6455 protocol error.
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    /// 1007: invalid UTF-8 in a text frame.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy violation; only used by applications.
    pub const POLICY: CloseCode = CloseCode(1008);
    /// 1009: an inbound message exceeded the maximum message size.
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: unexpected engine failure on the connection, or the E2E key usage limit.
    pub const INTERNAL: CloseCode = CloseCode(1011);
    /// 1013: slow consumer.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 4300: drain (lame duck); clients reconnect, normally to another node.
    pub const DRAIN: CloseCode = CloseCode(4300);
    /// 4401: authentication failure, after an `AUTH_*` error frame.
    pub const AUTH_FAILED: CloseCode = CloseCode(4401);
    /// 4403: forbidden; only used by applications to end a session for good.
    pub const FORBIDDEN: CloseCode = CloseCode(4403);
    /// 4408: idle timeout.
    pub const IDLE_TIMEOUT: CloseCode = CloseCode(4408);
    /// 4429: persistent inbound rate-limit violation.
    pub const RATE_LIMITED: CloseCode = CloseCode(4429);
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl From<CloseCode> for tungstenite::protocol::frame::coding::CloseCode {
    fn from(code: CloseCode) -> Self {
        code.0.into()
    }
}

/// The `p.code` of an `error` frame (§12.2). Only codes the engine sends are listed; the
/// official clients treat some other codes as critical, so the engine never uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `AUTH_REQUIRED`: no credentials; the connection is closed with 4401.
    AuthRequired,
    /// `AUTH_FAILED`: invalid credentials or missing `sub`; closed with 4401.
    AuthFailed,
    /// `KEY_EXCHANGE_FAILED`: unusable client public key; stays open in plaintext.
    KeyExchangeFailed,
    /// `RATE_LIMITED`: an outbound event or inbound frame was dropped.
    RateLimited,
    /// `INVALID_SUBSCRIPTION`: `subscription_update` without a non-empty `topics` array.
    InvalidSubscription,
    /// `INVALID_ACTION`: `subscription_update` with an unknown `action`.
    InvalidAction,
    /// `INVALID_REQUEST`: a message with unusable fields, or an unparsable frame.
    InvalidRequest,
    /// `INVALID_SIGNATURE`: signature rejected (§8.2).
    InvalidSignature,
    /// `MESSAGE_TOO_LARGE`: inbound message over the limit; closed with 1009.
    MessageTooLarge,
    /// `CIRCUIT_BREAKER_OPEN`: the breaker around the application handler is open.
    CircuitBreakerOpen,
    /// `SNAPSHOT_FAILED`: the snapshot source failed for some topics.
    SnapshotFailed,
    /// `SERVER_ERROR`: an internal failure while handling a client message.
    ServerError,
}

impl ErrorCode {
    /// Every code, in the order of §12.2.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::AuthRequired,
        ErrorCode::AuthFailed,
        ErrorCode::KeyExchangeFailed,
        ErrorCode::RateLimited,
        ErrorCode::InvalidSubscription,
        ErrorCode::InvalidAction,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidSignature,
        ErrorCode::MessageTooLarge,
        ErrorCode::CircuitBreakerOpen,
        ErrorCode::SnapshotFailed,
        ErrorCode::ServerError,
    ];

    /// The wire form, e.g. `"AUTH_REQUIRED"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::KeyExchangeFailed => "KEY_EXCHANGE_FAILED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InvalidSubscription => "INVALID_SUBSCRIPTION",
            ErrorCode::InvalidAction => "INVALID_ACTION",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::InvalidSignature => "INVALID_SIGNATURE",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::CircuitBreakerOpen => "CIRCUIT_BREAKER_OPEN",
            ErrorCode::SnapshotFailed => "SNAPSHOT_FAILED",
            ErrorCode::ServerError => "SERVER_ERROR",
        }
    }

    /// Parses the wire form; `None` for codes the engine does not send.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// True for the authentication errors, which carry no `recoverable` field (§6.1.6).
    pub fn is_auth(self) -> bool {
        matches!(self, ErrorCode::AuthRequired | ErrorCode::AuthFailed)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_values() {
        let table = [
            (CloseCode::NORMAL, 1000),
            (CloseCode::GOING_AWAY, 1001),
            (CloseCode::PROTOCOL, 1002),
            (CloseCode::INVALID_PAYLOAD, 1007),
            (CloseCode::POLICY, 1008),
            (CloseCode::TOO_BIG, 1009),
            (CloseCode::INTERNAL, 1011),
            (CloseCode::TRY_AGAIN_LATER, 1013),
            (CloseCode::DRAIN, 4300),
            (CloseCode::AUTH_FAILED, 4401),
            (CloseCode::FORBIDDEN, 4403),
            (CloseCode::IDLE_TIMEOUT, 4408),
            (CloseCode::RATE_LIMITED, 4429),
        ];
        for (code, n) in table {
            assert_eq!(u16::from(code), n);
            assert_eq!(CloseCode::from(n), code);
            let t: tungstenite::protocol::frame::coding::CloseCode = code.into();
            assert_eq!(u16::from(t), n);
        }
    }

    #[test]
    fn error_code_strings() {
        let table = [
            (ErrorCode::AuthRequired, "AUTH_REQUIRED"),
            (ErrorCode::AuthFailed, "AUTH_FAILED"),
            (ErrorCode::KeyExchangeFailed, "KEY_EXCHANGE_FAILED"),
            (ErrorCode::RateLimited, "RATE_LIMITED"),
            (ErrorCode::InvalidSubscription, "INVALID_SUBSCRIPTION"),
            (ErrorCode::InvalidAction, "INVALID_ACTION"),
            (ErrorCode::InvalidRequest, "INVALID_REQUEST"),
            (ErrorCode::InvalidSignature, "INVALID_SIGNATURE"),
            (ErrorCode::MessageTooLarge, "MESSAGE_TOO_LARGE"),
            (ErrorCode::CircuitBreakerOpen, "CIRCUIT_BREAKER_OPEN"),
            (ErrorCode::SnapshotFailed, "SNAPSHOT_FAILED"),
            (ErrorCode::ServerError, "SERVER_ERROR"),
        ];
        assert_eq!(table.len(), ErrorCode::ALL.len());
        for (code, s) in table {
            assert_eq!(code.as_str(), s);
            assert_eq!(code.to_string(), s);
            assert_eq!(ErrorCode::parse(s), Some(code));
        }
        // Codes the clients treat as critical are never produced.
        assert_eq!(ErrorCode::parse("PROTOCOL_ERROR"), None);
        assert_eq!(ErrorCode::parse("INVALID_MESSAGE"), None);
    }
}
