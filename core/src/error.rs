//! Protocol errors: what the client is told in an `error` frame (PROTOCOL.md §6.1.6, §12.2),
//! and the close code that may follow.
//!
//! ```
//! use wsengine_core::{CloseCode, ErrorCode, ProtocolError};
//!
//! let err = ProtocolError::new(ErrorCode::MessageTooLarge, "Message too large")
//!     .closing(CloseCode::TOO_BIG, "Message too big");
//! assert_eq!(err.to_string(), "MESSAGE_TOO_LARGE: Message too large");
//! assert_eq!(err.close(), Some((CloseCode::TOO_BIG, "Message too big")));
//!
//! let frame = err.to_envelope();
//! assert_eq!(frame.t, "error");
//! assert_eq!(frame.p["code"], "MESSAGE_TOO_LARGE");
//! assert_eq!(frame.p["recoverable"], true);
//! ```

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

use crate::codes::{CloseCode, ErrorCode};
use crate::envelope::{Envelope, new_id};
use crate::frame::DecodeError;
use crate::time::now_rfc3339;

/// A protocol-level failure: what the client is told (an `error` frame with `code`/`message`)
/// and, optionally, the close code the connection is closed with afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolError {
    code: ErrorCode,
    message: Cow<'static, str>,
    close: Option<(CloseCode, Cow<'static, str>)>,
    fields: Vec<(String, Value)>,
    details: Option<Value>,
}

impl ProtocolError {
    /// An error with `code` and `message`; the connection stays open.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        ProtocolError { code, message: message.into(), close: None, fields: Vec::new(), details: None }
    }

    /// Closes the connection with `code` and `reason` after the error frame.
    pub fn closing(mut self, code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Self {
        self.close = Some((code, reason.into()));
        self
    }

    /// Adds `p.details`, structured context such as `{"topics": [...]}`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Adds a top-level payload field after `message`, such as `retry_after` and `direction`
    /// of `RATE_LIMITED` (§6.1.6). A later field with the same key replaces the earlier one;
    /// the keys `code`, `message`, `recoverable`, `details` and `timestamp` are ignored.
    pub fn with_field(mut self, key: impl Into<String>, value: Value) -> Self {
        let key = key.into();
        if matches!(key.as_str(), "code" | "message" | "recoverable" | "details" | "timestamp") {
            return self;
        }
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key, value)),
        }
        self
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The close code and reason, if the connection is closed after the error frame.
    pub fn close(&self) -> Option<(CloseCode, &str)> {
        self.close.as_ref().map(|(c, r)| (*c, r.as_ref()))
    }

    /// `p.details`, if any.
    pub fn details(&self) -> Option<&Value> {
        self.details.as_ref()
    }

    /// The extra payload fields added by [`with_field`](Self::with_field), in order.
    pub fn fields(&self) -> &[(String, Value)] {
        &self.fields
    }

    /// Builds the `error` envelope of §6.1.6: `c` WSE, `t` "error", a fresh `id` and `ts`,
    /// `v` 1, and `p` = `{code, message, [extra fields], recoverable: true, [details],
    /// timestamp}`. `recoverable` is left out for `AUTH_REQUIRED`/`AUTH_FAILED`; `timestamp`
    /// equals `ts`. `seq` is left `None` for the connection to fill.
    pub fn to_envelope(&self) -> Envelope {
        let now = now_rfc3339();
        let mut p = Map::with_capacity(5 + self.fields.len());
        p.insert("code".to_owned(), self.code.as_str().into());
        p.insert("message".to_owned(), self.message.as_ref().into());
        for (k, v) in &self.fields {
            p.insert(k.clone(), v.clone());
        }
        if !self.code.is_auth() {
            p.insert("recoverable".to_owned(), true.into());
        }
        if let Some(details) = &self.details {
            p.insert("details".to_owned(), details.clone());
        }
        p.insert("timestamp".to_owned(), now.clone().into());
        let mut env = Envelope::new("error", Value::Object(p));
        env.id = Some(new_id());
        env.ts = Some(now);
        env
    }

    /// `MESSAGE_TOO_LARGE`, closing with 1009 (§3.4 step 1).
    pub fn message_too_large(size: usize, limit: usize) -> Self {
        ProtocolError::new(
            ErrorCode::MessageTooLarge,
            format!("Message of {size} bytes exceeds the limit of {limit} bytes"),
        )
        .closing(CloseCode::TOO_BIG, "Message too big")
    }

    /// `INVALID_REQUEST` for a frame the engine could not use (§3.4 step 2).
    pub fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        ProtocolError::new(ErrorCode::InvalidRequest, message)
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

impl From<DecodeError> for ProtocolError {
    /// `TooLarge` becomes [`ProtocolError::message_too_large`]; every other decode failure an
    /// `INVALID_REQUEST` that keeps the connection open. (The protocol drops undecodable
    /// `C:`/`M:` frames silently; whether to answer at all is the caller's choice.)
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::TooLarge { size, limit } => ProtocolError::message_too_large(size, limit),
            other => ProtocolError::invalid_request(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::category::Category;
    use serde_json::json;

    #[test]
    fn envelope_shape() {
        let env = ProtocolError::new(ErrorCode::KeyExchangeFailed, "ECDH key exchange failed").to_envelope();
        assert_eq!(env.c, Category::Wse);
        assert_eq!(env.t, "error");
        assert_eq!(env.v, Some(1));
        assert!(env.seq.is_none());
        assert!(env.id.is_some());
        let ts = env.ts.clone().unwrap();
        let p = env.p.as_object().unwrap();
        let keys: Vec<&str> = p.keys().map(String::as_str).collect();
        assert_eq!(keys, ["code", "message", "recoverable", "timestamp"]);
        assert_eq!(p["timestamp"], json!(ts));
        let text = String::from_utf8(env.to_json()).unwrap();
        assert!(text.starts_with(r#"{"c":"WSE","t":"error","id":""#), "{text}");
        assert!(text.contains(
            r#""p":{"code":"KEY_EXCHANGE_FAILED","message":"ECDH key exchange failed","recoverable":true,"timestamp":""#
        ));
        assert!(text.ends_with(r#""},"v":1}"#));
    }

    #[test]
    fn auth_errors_have_no_recoverable() {
        for code in [ErrorCode::AuthRequired, ErrorCode::AuthFailed] {
            let env = ProtocolError::new(code, "No JWT cookie or Authorization header")
                .closing(CloseCode::AUTH_FAILED, "Authentication failed")
                .to_envelope();
            let keys: Vec<&str> = env.p.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, ["code", "message", "timestamp"]);
        }
    }

    #[test]
    fn rate_limited_field_order_matches_the_spec() {
        let env = ProtocolError::new(ErrorCode::RateLimited, "Rate limit exceeded")
            .with_field("retry_after", json!(1.0))
            .with_field("direction", json!("inbound"))
            .with_field("code", json!("IGNORED"))
            .to_envelope();
        let mut p = env.p.clone();
        p.as_object_mut().unwrap().insert("timestamp".into(), json!("…"));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"code":"RATE_LIMITED","message":"Rate limit exceeded","retry_after":1.0,"direction":"inbound","recoverable":true,"timestamp":"…"}"#
        );
    }

    #[test]
    fn details_and_accessors() {
        let err = ProtocolError::new(ErrorCode::SnapshotFailed, "Snapshot failed")
            .with_details(json!({"topics":["a"]}))
            .with_field("x", json!(1))
            .with_field("x", json!(2));
        assert_eq!(err.code(), ErrorCode::SnapshotFailed);
        assert_eq!(err.message(), "Snapshot failed");
        assert_eq!(err.close(), None);
        assert_eq!(err.details(), Some(&json!({"topics":["a"]})));
        assert_eq!(err.fields(), [("x".to_owned(), json!(2))]);
        let p = err.to_envelope().p;
        let keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["code", "message", "x", "recoverable", "details", "timestamp"]);
        let dyn_err: Box<dyn std::error::Error> = Box::new(err.clone());
        assert_eq!(dyn_err.to_string(), "SNAPSHOT_FAILED: Snapshot failed");
    }

    #[test]
    fn from_decode_error() {
        let e = ProtocolError::from(DecodeError::TooLarge { size: 2, limit: 1 });
        assert_eq!(e.code(), ErrorCode::MessageTooLarge);
        assert_eq!(e.close().map(|c| c.0), Some(CloseCode::TOO_BIG));
        let e = ProtocolError::from(DecodeError::MsgpackInvalid);
        assert_eq!(e.code(), ErrorCode::InvalidRequest);
        assert_eq!(e.close(), None);
    }
}
