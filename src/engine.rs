//! The engine: assembles the standard stack from a [`Config`] and runs it.
//!
//! [`Engine::builder`] takes a configuration, optional hooks (application handler, snapshot
//! provider, bus) and optional user layers, and builds every connection's message stacks in
//! one fixed order:
//!
//! - inbound, outermost first: error-to-frame → inbound rate limit (per connection and per
//!   user, one token per frame; dispatch charges further `batch` elements through the
//!   limiter's hook) → decrypt (`E:` frames, key exchange; unless `encryption = "off"`) →
//!   decode → verify signature (when `signing` is on) → *user inbound layers* → dispatch;
//! - outbound, outermost first: *user outbound layers* → outbound event rate limit (direct
//!   sends and handler replies only) → sign (when `signing` is on and `sign_outbound`) →
//!   encode (format, `seq`, `C:` compression when the `compression` key is on) → encrypt (E2E
//!   connections) → outbound queue.
//!
//! User inbound layers therefore see decoded, decrypted and verified messages just before
//! dispatch, and user outbound layers see envelopes and publications before they are signed
//! and encoded. The inbound limiter comes before any decryption or decoding, so a flood
//! costs one bucket check per frame. The outbound limiter sits above sign and encode rather
//! than just above the queue: a dropped event then costs no signing or encoding and leaves
//! no gap in `seq`, snapshot events are still recognisable by their category (they are not
//! limited), and its own `rate_limit_warning` / `RATE_LIMITED` frames get a `seq` like every
//! other protocol frame.
//!
//! The circuit breakers are not in the inbound stack: they wrap the hooks dispatch calls (the
//! application handler, the snapshot provider) and the bus publish of [`Engine::publish`], one
//! engine-wide breaker each, so protocol traffic never meets them. A per-connection breaker
//! around each connection's handler calls closes a connection whose messages keep failing
//! with 1011 (`connection_breaker`). Failed publishes and handler failures go to the
//! dead-letter queue ([`Engine::dead_letters`],
//! [`Engine::replay_dead_letters`]); see the `resilience` submodule.
//!
//! Before any of that, the upgrade request passes the handshake tier
//! ([`Engine::handshake_service`]), outermost first: admission (Origin allow-list, per-IP
//! connect rate) → authentication (JWT from `jwt_secret` / `jwt_public_key`, or the hook of
//! `EngineBuilder::auth_hook`) → the upgrade service (connection limit).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use wsengine::{Config, Engine, Envelope};
//!
//! let engine = Engine::builder(Config::default()).build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = tokio::spawn(engine.clone().serve(listener));
//! engine.publish("prices", Envelope::new("price_update", serde_json::json!({"AAPL": 187.5}))).await?;
//! engine.shutdown();
//! server.await??;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Sink, Stream};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::{BoxLayer, BoxService};
use tower::{Layer, Service, ServiceBuilder};
use wsengine_core::codes::CloseCode;
use wsengine_core::topic::validate_topic;
use wsengine_core::{Envelope, Limits};
use wsengine_layers::decode::DecodeLayer;
use wsengine_layers::encode::EncodeLayer;
use wsengine_layers::error_to_frame::ErrorToFrameLayer;
use wsengine_services::bus::{Bus, MemoryBus, PublishReport};
use wsengine_services::connection::{Connection, ConnectionId, Delivery, Registry};
use wsengine_services::dispatch::{Dispatch, DispatchContext, ProtocolSettings};
use wsengine_services::driver::{DriverSettings, InboundService, OutboundService, Shutdown};
use wsengine_services::handler::{Handler, NoHandler, SnapshotProvider};
use wsengine_services::message::{BoxError, Inbound, Outbound, Reply};
#[cfg(feature = "presence")]
use wsengine_services::presence::{Presence, PresenceSettings};
use wsengine_services::publication::Publication;
use wsengine_services::queue::OutboundQueue;
#[cfg(feature = "recovery")]
use wsengine_services::recovery::RecoverySettings;
use wsengine_services::tungstenite::protocol::WebSocketConfig;
use wsengine_services::tungstenite::{Error as WsError, Message};
use wsengine_services::websocket::{Admission, Connector, ConnectorSettings, StackBuilder, WebSocketService};

use crate::config::{Config, ConfigError};

#[cfg(feature = "circuit_breaker")]
mod connection_breaker;
#[cfg(feature = "presence")]
mod presence;
mod rate_limits;
mod resilience;
mod security;
pub use resilience::BreakerHealth;

/// A user layer for the inbound stack (type-erased).
pub type InboundLayer = BoxLayer<InboundService, Inbound, Reply, BoxError>;
/// A user layer for the outbound stack (type-erased).
pub type OutboundLayer = BoxLayer<OutboundService, Outbound, (), BoxError>;

/// Types that application messages must not use (PROTOCOL.md §4.4).
const RESERVED_TYPES: &[&str] = &[
    "server_ready",
    "server_hello",
    "client_hello",
    "client_hello_ack",
    "ping",
    "PING",
    "pong",
    "PONG",
    "error",
    "rate_limit_warning",
    "subscription_update",
    "subscription",
    "sync_request",
    "snapshot_complete",
    "batch",
    "presence_join",
    "presence_leave",
    "presence_update",
    "health_check",
    "health_check_response",
    "metrics_request",
    "metrics_response",
    "sync_response",
    "config_update",
    "config_response",
    "config_update_response",
    "connection_quality",
    "connection_state_change",
    "connection_state_response",
    "heartbeat",
    "priority_message",
    "debug_response",
    "sequence_stats_response",
    "encryption_response",
    "key_rotation_response",
    "batch_message_result",
];

/// Whether `t` is reserved by the protocol or the official clients.
pub fn is_reserved_type(t: &str) -> bool {
    RESERVED_TYPES.contains(&t)
}

/// Why the engine refused to publish or send a message.
#[derive(Debug)]
pub enum SendError {
    /// The topic is empty, too long or has control characters.
    InvalidTopic,
    /// The type is empty or reserved by the protocol.
    ReservedType(String),
    /// The encoded message would exceed the 1 MiB outbound limit.
    TooLarge(usize),
    /// The bus failed.
    Bus(BoxError),
    /// The circuit breaker around the bus publish is open; try again after `retry_after`.
    CircuitOpen {
        /// Time until the breaker lets probe publishes through.
        retry_after: Duration,
    },
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::InvalidTopic => f.write_str("topic must be 1-256 bytes without control characters"),
            SendError::ReservedType(t) if t.is_empty() => f.write_str("message type must not be empty"),
            SendError::ReservedType(t) => write!(f, "message type {t:?} is reserved by the protocol"),
            SendError::TooLarge(size) => write!(f, "message of {size} bytes exceeds the 1 MiB limit"),
            SendError::Bus(error) => write!(f, "bus: {error}"),
            SendError::CircuitOpen { retry_after } => {
                write!(f, "publish circuit breaker open; retry after {:.3} s", retry_after.as_secs_f64())
            }
        }
    }
}

impl std::error::Error for SendError {}

/// The engine is at its connection limit, draining or shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection refused: engine at capacity or closing")
    }
}

impl std::error::Error for Refused {}

/// Who a direct send goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One connection.
    Connection(ConnectionId),
    /// Every connection of a user.
    User(String),
}

/// A running engine; clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    bus: Arc<dyn Bus>,
    registry: Arc<Registry>,
    connector: Arc<Connector>,
    shutdown: watch::Sender<Shutdown>,
    started: Instant,
    handshake: crate::http::HandshakeLayers,
    resilience: resilience::Resilience,
    security: security::MessageSecurity,
    #[cfg(feature = "presence")]
    presence: Option<Arc<Presence>>,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .field("connections", &self.inner.registry.len())
            .finish_non_exhaustive()
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    config: Config,
    bus: Option<Arc<dyn Bus>>,
    handler: Arc<dyn Handler>,
    snapshots: Option<Arc<dyn SnapshotProvider>>,
    inbound_layers: Vec<InboundLayer>,
    outbound_layers: Vec<OutboundLayer>,
    stacks: Option<Arc<dyn StackBuilder>>,
    #[cfg(feature = "auth")]
    auth_hook: Option<Arc<dyn wsengine_layers::auth::AuthHook>>,
    dead_letters: Option<Arc<dyn wsengine_services::dlq::DeadLetterStore>>,
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("config", &self.config)
            .field("inbound_layers", &self.inbound_layers.len())
            .field("outbound_layers", &self.outbound_layers.len())
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Uses `bus` instead of the in-memory bus.
    pub fn bus(mut self, bus: Arc<dyn Bus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Hands application messages to `handler` (default: dropped).
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Arc::new(handler);
        self
    }

    /// Answers `sync_request` with snapshots from `provider`.
    pub fn snapshots(mut self, provider: impl SnapshotProvider) -> Self {
        self.snapshots = Some(Arc::new(provider));
        self
    }

    /// Keeps dead letters in `store` instead of the in-memory store sized by the `dlq_*` keys.
    pub fn dead_letters(mut self, store: Arc<dyn wsengine_services::dlq::DeadLetterStore>) -> Self {
        self.dead_letters = Some(store);
        self
    }

    /// Adds a layer to every connection's inbound stack, just outside dispatch. Layers added
    /// first are outermost.
    pub fn inbound_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<InboundService> + Send + Sync + 'static,
        L::Service: Service<Inbound, Response = Reply, Error = BoxError> + Send + 'static,
        <L::Service as Service<Inbound>>::Future: Send + 'static,
    {
        self.inbound_layers.push(BoxLayer::new(layer));
        self
    }

    /// Adds a layer to every connection's outbound stack, outside encoding. Layers added
    /// first are outermost.
    pub fn outbound_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<OutboundService> + Send + Sync + 'static,
        L::Service: Service<Outbound, Response = (), Error = BoxError> + Send + 'static,
        <L::Service as Service<Outbound>>::Future: Send + 'static,
    {
        self.outbound_layers.push(BoxLayer::new(layer));
        self
    }

    /// Replaces the standard stacks altogether with your own assembly.
    pub fn stacks(mut self, stacks: impl StackBuilder) -> Self {
        self.stacks = Some(Arc::new(stacks));
        self
    }

    /// Authenticates upgrades with your own hook (`custom` mode, PROTOCOL.md §2.3) instead of
    /// JWT: it sees the headers, query and peer address and returns a user id (and optionally
    /// a topic ACL) or a refusal (`AUTH_FAILED` with its message, close 4401). Cannot be
    /// combined with `jwt_secret` / `jwt_public_key`.
    #[cfg(feature = "auth")]
    pub fn auth_hook(mut self, hook: impl wsengine_layers::auth::AuthHook) -> Self {
        self.auth_hook = Some(Arc::new(hook));
        self
    }

    /// Validates the configuration and builds the engine. Needs a Tokio runtime only when serving.
    pub fn build(self) -> Result<Engine, ConfigError> {
        let config = self.config;
        config.validate()?;
        #[cfg(feature = "auth")]
        let handshake = crate::http::HandshakeLayers::from_config(&config, self.auth_hook)?;
        #[cfg(not(feature = "auth"))]
        let handshake = crate::http::HandshakeLayers::from_config(&config)?;
        #[cfg(feature = "tls")]
        let tls = crate::tls::acceptor_from_config(&config)?;
        #[cfg(not(feature = "tls"))]
        if config.tls_cert.is_some() {
            return Err(ConfigError::new("tls_cert", "this build of wsengine has no `tls` feature"));
        }
        let bus = self.bus.unwrap_or_else(|| {
            #[cfg_attr(not(feature = "recovery"), allow(unused_mut))]
            let mut bus = MemoryBus::new().dedup_window(config.publish_dedup_window);
            #[cfg(feature = "recovery")]
            if config.recovery_enabled {
                bus = bus.recovery(RecoverySettings {
                    buffer_size: config.recovery_buffer_size,
                    ttl: config.recovery_ttl,
                    max_replay: config.recovery_max_replay,
                    memory_budget: config.recovery_memory,
                });
            }
            Arc::new(bus)
        });
        let limits = Limits {
            max_message_size: config.max_message_size,
            max_inflated_size: config.max_message_size,
            ..Limits::default()
        };
        let (hooks, resilience) =
            resilience::Resilience::wrap(&config, self.handler, self.snapshots, self.dead_letters);
        #[cfg(feature = "presence")]
        let presence = config.presence_enabled.then(|| {
            let settings = PresenceSettings { max_members: config.presence_max_members };
            Arc::new(Presence::new(Arc::clone(&bus), settings))
        });
        let context = Arc::new(DispatchContext {
            #[cfg(feature = "presence")]
            presence: presence.clone(),
            bus: Arc::clone(&bus),
            handler: hooks.handler,
            snapshots: hooks.snapshots,
            handler_guard: hooks.handler_guard,
            settings: ProtocolSettings {
                ping_interval: config.ping_interval,
                max_message_size: config.max_message_size,
                max_subscriptions: config.max_subscriptions_per_connection,
                jwt: handshake.jwt_mode(),
                compression: config.compression,
                outbound_rate: (config.outbound_rate_capacity.into(), config.outbound_rate_refill.into()),
                inbound_rate: (config.inbound_rate_capacity.into(), config.inbound_rate_refill.into()),
                recovery: config.recovery_enabled,
                snapshot_on_subscribe: config.snapshot_on_subscribe,
                outbound_queue: (config.outbound_queue_bytes, config.outbound_queue_messages),
                ..ProtocolSettings::default()
            },
        });
        let security = security::MessageSecurity::from_config(&config);
        let stacks = self.stacks.unwrap_or_else(|| {
            Arc::new(StandardStacks {
                limits,
                compression: config.compression.then_some((config.compression_threshold, config.compression_level)),
                inbound_layers: self.inbound_layers,
                outbound_layers: self.outbound_layers,
                security: security.clone(),
                rate_limits: rate_limits::RateLimits::from_config(&config),
            })
        });
        let registry = Registry::new(config.max_connections);
        let (shutdown, shutdown_rx) = watch::channel(Shutdown::Running);
        let mut websocket = WebSocketConfig::default();
        websocket.read_buffer_size = config.read_buffer_size;
        websocket.write_buffer_size = config.write_buffer_size;
        websocket.max_write_buffer_size = usize::MAX;
        websocket.max_message_size = Some(config.max_message_size);
        websocket.max_frame_size = Some(config.max_message_size);
        let connector = Arc::new(Connector {
            context,
            registry: Arc::clone(&registry),
            stacks,
            settings: ConnectorSettings {
                driver: DriverSettings {
                    ping_interval: config.ping_interval,
                    idle_timeout: config.idle_timeout,
                    close_grace: config.shutdown_grace,
                },
                websocket,
                queue_bytes: config.outbound_queue_bytes,
                queue_messages: config.outbound_queue_messages,
                critical_grace: config.critical_grace,
                delivery_capacity: config.outbound_queue_messages.min(1024),
            },
            shutdown: shutdown_rx,
        });
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                bus,
                registry,
                connector,
                shutdown,
                started: Instant::now(),
                handshake,
                resilience,
                security,
                #[cfg(feature = "presence")]
                presence,
                #[cfg(feature = "tls")]
                tls,
            }),
        })
    }
}

/// The standard stacks of [`EngineBuilder`], in the order the module documentation gives.
struct StandardStacks {
    limits: Limits,
    /// Threshold and level; `None` when the `compression` key is off.
    compression: Option<(usize, u32)>,
    inbound_layers: Vec<InboundLayer>,
    outbound_layers: Vec<OutboundLayer>,
    security: security::MessageSecurity,
    rate_limits: rate_limits::RateLimits,
}

impl StackBuilder for StandardStacks {
    fn inbound(&self, connection: &Arc<Connection>, dispatch: Dispatch) -> InboundService {
        let mut service = BoxService::new(dispatch);
        for layer in self.inbound_layers.iter().rev() {
            service = layer.layer(service);
        }
        BoxService::new(
            ServiceBuilder::new()
                .layer(ErrorToFrameLayer::new())
                .option_layer(self.rate_limits.inbound(connection))
                .option_layer(self.security.decrypt(connection, &self.limits))
                .layer(DecodeLayer::new(self.limits.clone(), connection.format()))
                .option_layer(self.security.verify(connection))
                .service(service),
        )
    }

    fn outbound(&self, connection: &Arc<Connection>, queue: OutboundQueue) -> OutboundService {
        let mut encode = EncodeLayer::new(connection.format()).compression_switch(connection.compression_switch());
        if let Some((threshold, level)) = self.compression {
            encode = encode.compression(threshold, level);
        }
        let mut service = BoxService::new(
            ServiceBuilder::new()
                .option_layer(self.rate_limits.outbound(connection))
                .option_layer(self.security.sign())
                .layer(encode)
                .option_layer(self.security.encrypt(connection))
                .service(queue),
        );
        for layer in self.outbound_layers.iter().rev() {
            service = layer.layer(service);
        }
        service
    }
}

fn check_type(envelope: &Envelope) -> Result<(), SendError> {
    if envelope.t.is_empty() || is_reserved_type(&envelope.t) {
        return Err(SendError::ReservedType(envelope.t.clone()));
    }
    Ok(())
}

/// A snapshot of one connection's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The user id.
    pub user_id: String,
    /// Subscribed topics and patterns, sorted.
    pub subscriptions: Vec<String>,
    /// Messages dropped because the connection could not keep up.
    pub dropped: u64,
    /// Bytes waiting in the connection's outbound queue.
    pub queued_bytes: usize,
    /// Messages waiting in the connection's outbound queue.
    pub queued_messages: usize,
    /// Inbound frames (and batch elements) dropped by the inbound rate limit.
    pub rate_limited_inbound: u64,
    /// Application events to this connection dropped by the outbound event rate limit
    /// ([`Engine::send`] counted them as taken; the limit applies later, per connection).
    pub rate_limited_outbound: u64,
}

/// Engine health, as `GET /health` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// `ok`, or `draining` once the engine refuses new connections.
    pub status: &'static str,
    /// Registered connections.
    pub connections: usize,
    /// Subscriptions on the local bus.
    pub subscriptions: usize,
    /// Seconds since the engine was built.
    pub uptime_seconds: f64,
    /// The engine's version.
    pub version: &'static str,
    /// Every circuit breaker by name (`handler`, `snapshot`, `publish`); empty when they are off.
    pub circuit_breakers: std::collections::BTreeMap<String, BreakerHealth>,
}

impl Engine {
    /// Starts building an engine from `config`.
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder {
            config,
            bus: None,
            handler: Arc::new(NoHandler),
            snapshots: None,
            inbound_layers: Vec::new(),
            outbound_layers: Vec::new(),
            stacks: None,
            #[cfg(feature = "auth")]
            auth_hook: None,
            dead_letters: None,
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Publishes to every subscriber of `topic`; the report says how many local subscribers
    /// it reached. A publication the bus fails to take ([`SendError::Bus`], or
    /// [`SendError::CircuitOpen`] while the publish circuit breaker is open) is also recorded
    /// in the dead-letter queue ([`Engine::dead_letters`]); invalid ones are only refused.
    pub async fn publish(&self, topic: &str, envelope: Envelope) -> Result<PublishReport, SendError> {
        if !validate_topic(topic) {
            return Err(SendError::InvalidTopic);
        }
        check_type(&envelope)?;
        let publication = self.inner.security.sign_publication(Publication::new(topic, envelope));
        let size = publication.json_len();
        if size > wsengine_core::limits::MAX_OUTBOUND_MESSAGE_SIZE {
            return Err(SendError::TooLarge(size));
        }
        // The JSON is memoized by the size check: keeping it costs a reference count.
        let json = publication.json().clone();
        let result = self.publish_to_bus(publication).await;
        if let Err(error) = &result {
            self.dead_letter_publication(topic, json.as_str(), error).await;
        }
        result
    }

    /// Sends a per-connection event to one connection or to every connection of a user;
    /// returns how many connections took it.
    ///
    /// "Took it" means queued for the connection's driver. The outbound event rate limit
    /// (PROTOCOL.md §11.1, `outbound_rate_capacity` / `outbound_rate_refill`) applies later,
    /// per connection: an event over the limit is dropped there, logged, counted in
    /// [`ConnectionInfo::rate_limited_outbound`], and the client gets `RATE_LIMITED`.
    pub fn send(&self, target: &Target, envelope: Envelope) -> Result<usize, SendError> {
        check_type(&envelope)?;
        // Refused here rather than dropped later by the encode layer, so the caller learns it.
        let size = envelope.to_json().len();
        if size > wsengine_core::limits::MAX_OUTBOUND_MESSAGE_SIZE {
            return Err(SendError::TooLarge(size));
        }
        let connections = match target {
            Target::Connection(id) => self.inner.registry.get(*id).into_iter().collect(),
            Target::User(user) => self.inner.registry.user_connections(user),
        };
        Ok(connections.iter().filter(|c| c.deliver(Delivery::Event(Box::new(envelope.clone())))).count())
    }

    /// Sends to every registered connection; returns how many took it.
    pub fn broadcast(&self, envelope: Envelope) -> Result<usize, SendError> {
        check_type(&envelope)?;
        let publication = self.inner.security.sign_publication(Publication::broadcast(envelope));
        let size = publication.json_len();
        if size > wsengine_core::limits::MAX_OUTBOUND_MESSAGE_SIZE {
            return Err(SendError::TooLarge(size));
        }
        Ok(self.inner.registry.deliver_all(&Delivery::Publication(Arc::new(publication))))
    }

    /// Closes one connection with `code` and `reason`.
    pub fn disconnect(&self, id: ConnectionId, code: CloseCode, reason: &str) -> bool {
        self.inner.registry.get(id).is_some_and(|c| c.deliver(Delivery::Close(Box::new((code, reason.to_owned())))))
    }

    /// What the engine knows about one registered connection.
    pub fn connection_info(&self, id: ConnectionId) -> Option<ConnectionInfo> {
        let connection = self.inner.registry.get(id)?;
        let mut subscriptions: Vec<String> = connection.with_subscriptions(|s| s.iter().cloned().collect());
        subscriptions.sort();
        let queue = connection.shared::<wsengine_services::queue::QueueGauge>();
        let (rate_limited_inbound, rate_limited_outbound) = rate_limits::RateLimits::drops(&connection);
        Some(ConnectionInfo {
            user_id: connection.user_id().to_owned(),
            subscriptions,
            dropped: connection.dropped(),
            queued_bytes: queue.bytes(),
            queued_messages: queue.messages(),
            rate_limited_inbound,
            rate_limited_outbound,
        })
    }

    /// Subscribes a connection to a topic or pattern on the application's behalf (without a
    /// filter: subscribing again removes one). No ACL or subscription limit applies. The
    /// connection is tracked for presence when it has data from `Engine::set_presence`.
    /// Returns `Ok(false)` when there is no such connection.
    pub fn subscribe(&self, id: ConnectionId, topic: &str) -> Result<bool, SendError> {
        self.add_subscription(id, topic, None)
    }

    /// Subscribes like [`Engine::subscribe`], with an optional payload filter
    /// ([`Filter::intern`](wsengine_services::filter::Filter::intern) shares equal filters);
    /// subscribing again replaces the filter.
    #[cfg(feature = "filters")]
    pub fn subscribe_filtered(
        &self,
        id: ConnectionId,
        topic: &str,
        filter: Option<Arc<wsengine_services::filter::Filter>>,
    ) -> Result<bool, SendError> {
        self.add_subscription(id, topic, filter)
    }

    fn add_subscription(
        &self,
        id: ConnectionId,
        topic: &str,
        filter: Option<SubscriptionFilter>,
    ) -> Result<bool, SendError> {
        if !validate_topic(topic) {
            return Err(SendError::InvalidTopic);
        }
        let Some(connection) = self.inner.registry.get(id) else { return Ok(false) };
        // Set (or, without one, cleared) before the subscription exists, so no unfiltered
        // delivery slips through.
        #[cfg(feature = "filters")]
        if !self.inner.bus.set_filter(id, topic, filter) {
            return Err(SendError::Bus("this bus does not support filters".into()));
        }
        #[cfg(not(feature = "filters"))]
        let _ = filter;
        if connection.with_subscriptions(|s| s.insert(topic.to_owned())) {
            self.inner.bus.subscribe(&connection, topic);
        }
        #[cfg(feature = "presence")]
        if let Some(presence) = &self.inner.presence {
            presence.track(topic, &connection, None);
        }
        Ok(true)
    }

    /// Removes a subscription of a connection (releasing its presence there); returns
    /// whether it was subscribed.
    pub fn unsubscribe(&self, id: ConnectionId, topic: &str) -> bool {
        let Some(connection) = self.inner.registry.get(id) else { return false };
        if !connection.with_subscriptions(|s| s.remove(topic)) {
            return false;
        }
        self.inner.bus.unsubscribe(id, topic);
        #[cfg(feature = "presence")]
        if let Some(presence) = &self.inner.presence {
            presence.untrack(topic, id);
        }
        true
    }

    /// Registered connections.
    pub fn connection_count(&self) -> usize {
        self.inner.registry.len()
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health {
            status: if self.inner.connector.is_closing() { "draining" } else { "ok" },
            connections: self.inner.registry.len(),
            subscriptions: self.inner.bus.subscription_count(),
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
            version: env!("CARGO_PKG_VERSION"),
            circuit_breakers: self.breaker_health(),
        }
    }

    /// The bare WebSocket upgrade service, for mounting in another hyper or axum application
    /// under handshake layers of your own. It does not run the configured admission and
    /// authentication checks; [`Engine::handshake_service`] does.
    pub fn websocket_service(&self) -> WebSocketService {
        WebSocketService::new(Arc::clone(&self.inner.connector))
    }

    /// The configured handshake stack around the upgrade service: admission control (Origin
    /// allow-list, per-IP connect rate) → authentication (JWT or the custom hook) → upgrade.
    /// Mount this in another hyper or axum application to keep the configured checks; put the
    /// peer's `SocketAddr` into the request extensions for the per-IP rate and the hook.
    pub fn handshake_service(&self) -> crate::http::HandshakeService {
        crate::http::HandshakeService::new(self.inner.handshake.clone(), self.websocket_service())
    }

    #[cfg(feature = "tls")]
    pub(crate) fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.inner.tls.clone()
    }

    /// The whole HTTP surface (WebSocket upgrades, `/api/*`, `/health`) as one service.
    pub fn http_service(&self) -> crate::http::HttpService {
        crate::http::HttpService::new(self.clone())
    }

    /// Closes every connection with 1001 and stops serving.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(Shutdown::Closing(CloseCode::GOING_AWAY, "server shutting down".into()));
    }

    /// Lame duck: refuses new upgrades and closes every connection with the configured drain
    /// code (default 4300, empty reason) so that clients reconnect elsewhere.
    pub fn drain(&self) {
        let code = CloseCode(self.inner.config.drain_close_code);
        self.inner.shutdown.send_replace(Shutdown::Draining(code, String::new()));
    }

    /// Runs one connection on any WebSocket transport (a tungstenite socket, a bridge from
    /// another server, in-memory channels) through the same stacks and driver as upgrades
    /// accepted by [`Engine::serve`]. Returns when the connection has closed; refuses at once
    /// when the engine is full or closing.
    pub async fn run_connection<S, E>(&self, socket: S, admission: Admission) -> Result<(), Refused>
    where
        S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = E> + Unpin,
        E: fmt::Display,
    {
        if self.is_closing() {
            return Err(Refused);
        }
        let slot = self.inner.registry.reserve().ok_or(Refused)?;
        self.inner.connector.run(socket, admission, slot).await;
        Ok(())
    }

    /// Whether shutdown or drain has begun.
    pub fn is_closing(&self) -> bool {
        self.inner.connector.is_closing()
    }

    /// Serves HTTP and WebSocket connections on `listener` until [`Engine::shutdown`], then
    /// waits (up to the drain timeout) for connections to close. While draining
    /// ([`Engine::drain`]) it keeps answering HTTP but refuses upgrades with 503.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        crate::http::serve(self, listener).await
    }

    /// Waits until every connection has closed, or `timeout` passes.
    pub async fn wait_for_connections(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.inner.registry.reserved() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<Shutdown> {
        self.inner.shutdown.subscribe()
    }
}

/// A subscription's payload filter, as the bus takes it.
#[cfg(feature = "filters")]
type SubscriptionFilter = Arc<wsengine_services::filter::Filter>;
#[cfg(not(feature = "filters"))]
type SubscriptionFilter = std::convert::Infallible;
