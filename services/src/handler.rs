//! Application hooks: the handler for application messages and the snapshot provider.
//!
//! The engine runs the protocol by itself; an application only sees the messages that are
//! its own (PROTOCOL.md §6.2.8) and may answer them with events for the same connection.
//!
//! ```
//! use wsengine_core::Envelope;
//! use wsengine_services::handler::{handler_fn, AppBody, AppMessage, Handler};
//!
//! let echo = handler_fn(|message: AppMessage| async move {
//!     match message.body {
//!         AppBody::Message(m) => Ok(vec![Envelope::new("echo_reply", m.p().cloned().unwrap_or_default())]),
//!         _ => Ok(vec![]),
//!     }
//! });
//! # fn assert_handler(_: &impl Handler) {}
//! assert_handler(&echo);
//! ```

use std::fmt;
use std::future::Future;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tungstenite::Utf8Bytes;
use wsengine_core::{Envelope, InboundMessage};

use crate::connection::ConnectionId;
use crate::message::BoxError;

/// An application message with where it came from.
#[derive(Debug, Clone)]
pub struct AppMessage {
    /// The sending connection.
    pub connection_id: ConnectionId,
    /// The sending user.
    pub user_id: String,
    /// The message.
    pub body: AppBody,
    /// Whether it arrived in an `E:` frame.
    pub encrypted: bool,
}

/// The content of an application message.
#[derive(Debug, Clone)]
pub enum AppBody {
    /// A decoded envelope.
    Message(InboundMessage),
    /// Text that is not a JSON object (only for handlers that accept raw messages).
    RawText(Utf8Bytes),
    /// Binary data of no known form (only for handlers that accept raw messages).
    RawBinary(Bytes),
}

/// Receives application messages. Messages of one connection arrive one at a time, in order.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message; the returned envelopes are sent back to the same connection as
    /// per-connection events.
    fn handle(&self, message: AppMessage) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>>;

    /// Whether raw (non-envelope) messages are wanted. When not, a text frame that is not a
    /// JSON object gets an `INVALID_REQUEST` error and raw binary frames are dropped.
    fn accepts_raw(&self) -> bool {
        false
    }
}

/// The default handler, for engines without application code: every application message is
/// answered with an `INVALID_REQUEST` error naming its type, so a client learns at once that
/// nothing is listening.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHandler;

impl Handler for NoHandler {
    fn handle(&self, message: AppMessage) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        let t = match &message.body {
            AppBody::Message(m) => m.t().map(|t| t.chars().take(64).collect::<String>()),
            _ => None,
        };
        let text = match t {
            Some(t) => format!("No handler for message type {t:?}"),
            None => "Messages need a string type field t".to_owned(),
        };
        let error = wsengine_core::ProtocolError::new(wsengine_core::ErrorCode::InvalidRequest, text);
        Box::pin(std::future::ready(Err(error.into())))
    }
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F> {
    f: F,
    raw: bool,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").field("raw", &self.raw).finish_non_exhaustive()
    }
}

/// Makes a [`Handler`] from `async fn(AppMessage) -> Result<Vec<Envelope>, BoxError>`.
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(AppMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Envelope>, BoxError>> + Send + 'static,
{
    HandlerFn { f, raw: false }
}

impl<F> HandlerFn<F> {
    /// Also receive raw text and binary messages.
    pub fn accept_raw(mut self) -> Self {
        self.raw = true;
        self
    }
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(AppMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Envelope>, BoxError>> + Send + 'static,
{
    fn handle(&self, message: AppMessage) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        Box::pin((self.f)(message))
    }

    fn accepts_raw(&self) -> bool {
        self.raw
    }
}

/// Answers `sync_request`: the snapshot events for some topics (PROTOCOL.md §6.2.5).
pub trait SnapshotProvider: Send + Sync + 'static {
    /// Snapshot events for `topics` as seen by `user_id`. They are sent with category `S`.
    fn snapshot(&self, user_id: &str, topics: &[String]) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>>;
}
