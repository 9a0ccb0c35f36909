//! The WebSocket upgrade as a `tower::Service<http::Request<B>>`.
//!
//! [`WebSocketService`] validates the upgrade headers, reserves a connection slot, answers
//! `101 Switching Protocols` and spawns the connection driver. Because it is an ordinary
//! service over HTTP requests, handshake layers (auth, admission control, tower-http's
//! middleware) wrap it, and it mounts in any hyper or axum application.
//!
//! A handshake layer passes its verdict through the request extensions: an
//! [`Identity`] names the user, an [`AuthRejection`] makes the engine send the
//! protocol's auth error and close with 4401 after the upgrade (PROTOCOL.md §2.5). A
//! [`TopicAcl`] in the extensions becomes the connection's topic ACL.
//!
//! ```no_run
//! # fn example(connector: std::sync::Arc<wsengine_services::websocket::Connector>) {
//! use wsengine_services::websocket::WebSocketService;
//! let service = WebSocketService::new(connector);
//! // hyper::service::service_fn or a router hands it every upgrade request.
//! # let _ = service;
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_tungstenite::HyperWebsocketStream;
use tokio::sync::watch;
use tower::Service;
use tungstenite::protocol::WebSocketConfig;
use wsengine_core::WireFormat;

use crate::acl::TopicAcl;
use crate::connection::{AuthRejection, Connection, ConnectionId, Identity, Registry, Slot, delivery_channel};
use crate::dispatch::{Dispatch, DispatchContext};
use crate::driver::{self, DriverSettings, InboundService, OutboundService, Session, Shutdown};
use crate::queue::{OutboundQueue, QueueLimits};

/// The socket type of an upgraded hyper connection.
pub type Socket = HyperWebsocketStream;

/// Builds the message stacks of each new connection around its terminal services.
pub trait StackBuilder: Send + Sync + 'static {
    /// The inbound stack around `dispatch`.
    fn inbound(&self, connection: &Arc<Connection>, dispatch: Dispatch) -> InboundService;
    /// The outbound stack around `queue`.
    fn outbound(&self, connection: &Arc<Connection>, queue: OutboundQueue) -> OutboundService;
}

/// Per-connection limits of the connector.
#[derive(Debug, Clone)]
pub struct ConnectorSettings {
    /// Liveness timing.
    pub driver: DriverSettings,
    /// WebSocket buffer sizes and message limits.
    pub websocket: WebSocketConfig,
    /// Outbound queue byte budget per connection.
    pub queue_bytes: usize,
    /// Outbound queue message cap per connection.
    pub queue_messages: usize,
    /// How long a CRITICAL message may wait in the outbound queue before the connection is
    /// closed with 1013 as a slow consumer.
    pub critical_grace: std::time::Duration,
    /// Deliveries that may wait for a connection's driver before new ones are dropped.
    pub delivery_capacity: usize,
}

impl Default for ConnectorSettings {
    fn default() -> Self {
        ConnectorSettings {
            driver: DriverSettings::default(),
            websocket: WebSocketConfig::default(),
            queue_bytes: 16 << 20,
            queue_messages: 4096,
            critical_grace: std::time::Duration::from_secs(10),
            delivery_capacity: 1024,
        }
    }
}

/// Turns accepted sockets into running connections.
pub struct Connector {
    /// Engine-wide dispatch state.
    pub context: Arc<DispatchContext>,
    /// The connection registry.
    pub registry: Arc<Registry>,
    /// The stack assembly.
    pub stacks: Arc<dyn StackBuilder>,
    /// Limits and timing.
    pub settings: ConnectorSettings,
    /// Shutdown and drain signal.
    pub shutdown: watch::Receiver<Shutdown>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("context", &self.context)
            .field("registry", &self.registry)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How a handshake ended for a connection that was upgraded.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// The authenticated user, if any.
    pub identity: Option<Identity>,
    /// Set when authentication failed.
    pub rejection: Option<AuthRejection>,
    /// JSON or msgpack (`?format=msgpack`; always JSON without the `msgpack` cargo feature).
    pub format: WireFormat,
    /// The topic ACL a handshake layer installed, if any.
    pub acl: Option<TopicAcl>,
}

impl Connector {
    /// Runs one connection to its end on `socket` (any WebSocket stream).
    pub async fn run<S, E>(&self, socket: S, admission: Admission, slot: Slot)
    where
        S: futures_util::Stream<Item = Result<tungstenite::Message, tungstenite::Error>>
            + futures_util::Sink<tungstenite::Message, Error = E>
            + Unpin,
        E: fmt::Display,
    {
        if let Some(AuthRejection(error)) = admission.rejection {
            drop(slot);
            driver::reject(socket, error, self.settings.driver.close_grace).await;
            return;
        }
        let session = self.session(admission.identity, admission.format);
        if let Some(acl) = admission.acl {
            session.connection.set_acl(acl);
        }
        driver::run(socket, session).await;
        drop(slot);
    }

    /// Builds a connection's state, stacks and queue.
    pub fn session(&self, identity: Option<Identity>, format: WireFormat) -> Session {
        let (tx, deliveries) = delivery_channel(self.settings.delivery_capacity);
        let connection = Arc::new(Connection::new(ConnectionId::new(), identity, format, tx));
        let limits = QueueLimits {
            bytes: self.settings.queue_bytes,
            messages: self.settings.queue_messages,
            critical_grace: self.settings.critical_grace,
        };
        let (queue, reader) = OutboundQueue::for_connection(&connection, limits);
        let inbound =
            self.stacks.inbound(&connection, Dispatch::new(Arc::clone(&self.context), Arc::clone(&connection)));
        let outbound = self.stacks.outbound(&connection, queue);
        Session {
            connection,
            inbound,
            outbound,
            queue: reader,
            deliveries,
            context: Arc::clone(&self.context),
            registry: Arc::clone(&self.registry),
            settings: self.settings.driver.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Whether new upgrades are refused (drain or shutdown in progress).
    pub fn is_closing(&self) -> bool {
        !matches!(*self.shutdown.borrow(), Shutdown::Running)
    }
}

/// The upgrade service.
#[derive(Debug, Clone)]
pub struct WebSocketService {
    connector: Arc<Connector>,
}

impl WebSocketService {
    /// An upgrade service spawning connections on `connector`.
    pub fn new(connector: Arc<Connector>) -> Self {
        WebSocketService { connector }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    response
}

fn unavailable() -> Response<Full<Bytes>> {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "server at capacity or draining\n");
    response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

impl<B> Service<Request<B>> for WebSocketService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !hyper_tungstenite::is_upgrade_request(&request) {
            return ready(Ok(plain(StatusCode::UPGRADE_REQUIRED, "expected a WebSocket upgrade\n")));
        }
        if self.connector.is_closing() {
            return ready(Ok(unavailable()));
        }
        // The slot is reserved before 101 goes out, so capacity never closes an accepted socket.
        let Some(slot) = self.connector.registry.reserve() else {
            return ready(Ok(unavailable()));
        };
        let admission = Admission {
            identity: request.extensions().get::<Identity>().cloned(),
            rejection: request.extensions().get::<AuthRejection>().cloned(),
            format: WireFormat::from_query(request.uri().query()),
            acl: request.extensions().get::<TopicAcl>().cloned(),
        };
        let (response, websocket) =
            match hyper_tungstenite::upgrade(&mut request, Some(self.connector.settings.websocket)) {
                Ok(upgrade) => upgrade,
                Err(_) => return ready(Ok(plain(StatusCode::BAD_REQUEST, "invalid WebSocket upgrade request\n"))),
            };
        let connector = Arc::clone(&self.connector);
        tokio::spawn(async move {
            match websocket.await {
                Ok(socket) => connector.run(socket, admission, slot).await,
                Err(error) => tracing::debug!(%error, "upgrade did not complete"),
            }
        });
        ready(Ok(response))
    }
}
