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
    /// What a verify layer found out about its `sig` (PROTOCOL.md §8.2).
    pub signature: SignatureStatus,
}

/// The outcome of checking an inbound message's `sig` (PROTOCOL.md §8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureStatus {
    /// No verify layer looked at it (signing is off).
    #[default]
    Unchecked,
    /// The signature verifies with a configured secret and the message is fresh.
    Valid,
    /// The message carries no `sig`.
    Absent,
    /// The signature does not verify, or the message is stale or replayed.
    Invalid,
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

/// A [`Handler`] as a `tower::Service<AppMessage>`, so that tower layers (a circuit breaker,
/// a timeout) can wrap it; [`ServiceHandler`] turns the result back into a handler.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use tower::ServiceBuilder;
/// use wsengine_services::handler::{handler_fn, AppMessage, Handler, HandlerService, ServiceHandler};
///
/// let echo = Arc::new(handler_fn(|_m: AppMessage| async { Ok(vec![]) }));
/// let raw = echo.accepts_raw();
/// // Handler calls that take longer than 5 s fail (and reach the client as SERVER_ERROR).
/// let wrapped = ServiceBuilder::new().timeout(std::time::Duration::from_secs(5)).service(HandlerService::new(echo));
/// let handler: Arc<dyn Handler> = Arc::new(ServiceHandler::new(wrapped, raw));
/// # let _ = handler;
/// # });
/// ```
#[derive(Clone)]
pub struct HandlerService {
    handler: std::sync::Arc<dyn Handler>,
}

impl fmt::Debug for HandlerService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerService").finish_non_exhaustive()
    }
}

impl HandlerService {
    /// The service calling `handler`.
    pub fn new(handler: std::sync::Arc<dyn Handler>) -> Self {
        HandlerService { handler }
    }
}

impl tower::Service<AppMessage> for HandlerService {
    type Response = Vec<Envelope>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Envelope>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: AppMessage) -> Self::Future {
        self.handler.handle(message)
    }
}

/// A `tower::Service<AppMessage>` as a [`Handler`]: each message goes to a clone of the
/// service, which is awaited until ready and then called.
#[derive(Clone)]
pub struct ServiceHandler<S> {
    service: S,
    raw: bool,
}

impl<S> fmt::Debug for ServiceHandler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHandler").field("raw", &self.raw).finish_non_exhaustive()
    }
}

impl<S> ServiceHandler<S> {
    /// A handler calling `service`; `accepts_raw` is what [`Handler::accepts_raw`] answers
    /// (pass the wrapped handler's).
    pub fn new(service: S, accepts_raw: bool) -> Self {
        ServiceHandler { service, raw: accepts_raw }
    }
}

impl<S> Handler for ServiceHandler<S>
where
    S: tower::Service<AppMessage, Response = Vec<Envelope>, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn handle(&self, message: AppMessage) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        Box::pin(tower::ServiceExt::oneshot(self.service.clone(), message))
    }

    fn accepts_raw(&self) -> bool {
        self.raw
    }
}

/// A snapshot request as a value, for [`SnapshotService`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The requesting user.
    pub user_id: String,
    /// The topics wanted.
    pub topics: Vec<String>,
}

/// A [`SnapshotProvider`] as a `tower::Service<SnapshotRequest>`, so tower layers can wrap it;
/// [`ServiceSnapshotProvider`] turns the result back into a provider.
#[derive(Clone)]
pub struct SnapshotService {
    provider: std::sync::Arc<dyn SnapshotProvider>,
}

impl fmt::Debug for SnapshotService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotService").finish_non_exhaustive()
    }
}

impl SnapshotService {
    /// The service calling `provider`.
    pub fn new(provider: std::sync::Arc<dyn SnapshotProvider>) -> Self {
        SnapshotService { provider }
    }
}

impl tower::Service<SnapshotRequest> for SnapshotService {
    type Response = Vec<Envelope>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Envelope>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: SnapshotRequest) -> Self::Future {
        self.provider.snapshot(&request.user_id, &request.topics)
    }
}

/// A `tower::Service<SnapshotRequest>` as a [`SnapshotProvider`].
#[derive(Debug, Clone)]
pub struct ServiceSnapshotProvider<S> {
    service: S,
}

impl<S> ServiceSnapshotProvider<S> {
    /// A provider calling `service`.
    pub fn new(service: S) -> Self {
        ServiceSnapshotProvider { service }
    }
}

impl<S> SnapshotProvider for ServiceSnapshotProvider<S>
where
    S: tower::Service<SnapshotRequest, Response = Vec<Envelope>, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn snapshot(&self, user_id: &str, topics: &[String]) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        let request = SnapshotRequest { user_id: user_id.to_owned(), topics: topics.to_vec() };
        Box::pin(tower::ServiceExt::oneshot(self.service.clone(), request))
    }
}
