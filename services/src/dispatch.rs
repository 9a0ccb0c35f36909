//! Dispatch: the terminal service of the inbound stack.
//!
//! It runs the protocol's system messages itself (PROTOCOL.md §6.2): `client_hello` gets a
//! `server_hello`, `ping` a `PONG`, `subscription_update` subscribes through the bus and is
//! acknowledged, `sync_request` asks the snapshot provider and always ends with
//! `snapshot_complete`, a `batch` is unpacked; everything else goes to the application
//! [`Handler`](crate::handler::Handler).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use tower::{Service, ServiceExt};
//! use wsengine_core::{InboundMessage, WireFormat};
//! use wsengine_services::bus::MemoryBus;
//! use wsengine_services::connection::{Connection, ConnectionId};
//! use wsengine_services::dispatch::{Dispatch, DispatchContext};
//! use wsengine_services::message::{Inbound, OutboundBody};
//!
//! let context = Arc::new(DispatchContext::new(Arc::new(MemoryBus::new())));
//! let (tx, _rx) = wsengine_services::connection::delivery_channel(8);
//! let connection = Arc::new(Connection::new(ConnectionId::new(), None, WireFormat::Json, tx));
//! let mut dispatch = Dispatch::new(context, connection);
//! let ping: serde_json::Value = serde_json::json!({"t": "ping", "p": {"timestamp": 5}});
//! let message = InboundMessage::from_map(ping.as_object().unwrap().clone());
//! let reply = dispatch.ready().await.unwrap().call(Inbound::message(message)).await.unwrap();
//! let OutboundBody::Envelope(pong) = &reply.messages[0].body else { unreachable!() };
//! assert_eq!(pong.t, "PONG");
//! # });
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tower::Service;
use wsengine_core::topic::validate_topic;
use wsengine_core::{Category, Envelope, ErrorCode, InboundMessage, ProtocolError};

use crate::bus::Bus;
use crate::connection::Connection;
#[cfg(feature = "filters")]
use crate::filter::Filter;
use crate::handler::{AppBody, AppMessage, Handler, NoHandler, SignatureStatus, SnapshotProvider};
use crate::message::{BoxError, Inbound, InboundBody, OrderKey, Outbound, Reply, error_reply};
#[cfg(feature = "presence")]
use crate::presence::Presence;
use crate::queue::QueueGauge;
use crate::recovery::{ReplayLimit, SubscribeRecovery};

/// What `server_ready` and `server_hello` announce, and the subscription limit.
#[derive(Debug, Clone)]
pub struct ProtocolSettings {
    /// Server heartbeat interval (announced in milliseconds).
    pub ping_interval: Duration,
    /// Inbound message size limit (announced).
    pub max_message_size: usize,
    /// Subscriptions (topics and patterns) per connection; 0 means unlimited.
    pub max_subscriptions: usize,
    /// Whether publications are stamped and recoverable.
    pub recovery: bool,
    /// Whether the engine runs a multi-node bus.
    pub cluster: bool,
    /// Whether built-in JWT authentication is on (`features.rust_jwt`).
    pub jwt: bool,
    /// Whether the engine compresses outbound frames (`features.compression`). Default: on
    /// with the `compression` cargo feature; always announced `false` without it.
    pub compression: bool,
    /// Outbound event bucket: capacity and refill per second (announced).
    pub outbound_rate: (u64, u64),
    /// Inbound bucket: capacity and refill per second (announced).
    pub inbound_rate: (u64, u64),
    /// Send the snapshot events of newly subscribed topics after the subscribe ack.
    pub snapshot_on_subscribe: bool,
    /// The outbound queue's byte budget and message cap: a replay that would not fit is
    /// refused (PROTOCOL.md §9.4).
    pub outbound_queue: (usize, usize),
}

impl Default for ProtocolSettings {
    fn default() -> Self {
        ProtocolSettings {
            ping_interval: Duration::from_secs(25),
            max_message_size: wsengine_core::Limits::default().max_message_size,
            max_subscriptions: 0,
            recovery: false,
            cluster: false,
            jwt: false,
            compression: cfg!(feature = "compression"),
            outbound_rate: (100_000, 10_000),
            inbound_rate: (2_000, 200),
            snapshot_on_subscribe: false,
            outbound_queue: (16 << 20, 4096),
        }
    }
}

/// How dispatch charges the elements of a `batch` to the connection's inbound rate limit
/// (PROTOCOL.md §11.2: one token per element).
///
/// The inbound rate-limit layer sits before decoding, so it pays one token for the whole
/// frame; dispatch, which unpacks the batch, asks this hook for every further element. A
/// rate-limit layer installs the charge once per connection through
/// [`Connection::shared`]; without one every element is free. A refused element is skipped,
/// and the [`Reply`] the charge returned (an error frame at most once per second, or a close)
/// is sent instead; after a close no further element runs.
#[derive(Default)]
pub struct BatchTokens {
    charge: std::sync::OnceLock<Box<dyn Fn() -> Result<(), Reply> + Send + Sync>>,
}

impl fmt::Debug for BatchTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchTokens").field("installed", &self.charge.get().is_some()).finish()
    }
}

impl BatchTokens {
    /// Installs the charge; only the first one installed on a connection counts. Returns
    /// whether this one was installed.
    pub fn install(&self, charge: impl Fn() -> Result<(), Reply> + Send + Sync + 'static) -> bool {
        self.charge.set(Box::new(charge)).is_ok()
    }

    /// Takes one token for a batch element; `Err` skips the element and carries what to send.
    pub fn charge(&self) -> Result<(), Reply> {
        self.charge.get().map_or(Ok(()), |charge| charge())
    }
}

/// Engine-wide state every connection's dispatch shares.
pub struct DispatchContext {
    /// Where subscriptions go.
    pub bus: Arc<dyn Bus>,
    /// Application messages.
    pub handler: Arc<dyn Handler>,
    /// Snapshot source for `sync_request`; none means every request gets only `snapshot_complete`.
    pub snapshots: Option<Arc<dyn SnapshotProvider>>,
    /// Protocol parameters.
    pub settings: ProtocolSettings,
    /// The presence tracker; `None` when presence is disabled (PROTOCOL.md §6.3.6).
    #[cfg(feature = "presence")]
    pub presence: Option<Arc<Presence>>,
    /// Wraps every handler call with the calling connection at hand; `None` calls the handler
    /// directly.
    pub handler_guard: Option<Arc<dyn HandlerGuard>>,
}

/// A per-connection watch over application handler calls, such as the engine's
/// per-connection circuit breaker (PROTOCOL.md §12.1, close 1011).
///
/// [`DispatchContext::handler`] is shared by every connection; a guard gets each call
/// together with the connection that made it, so it can keep state per connection (through
/// [`Connection::shared`]), refuse a call, or turn its outcome into an error that closes the
/// connection ([`ProtocolError::closing`]).
pub trait HandlerGuard: Send + Sync + 'static {
    /// Wraps one handler call of `connection`; the returned future's outcome is used instead.
    fn guard(
        &self,
        connection: &Connection,
        call: BoxFuture<'static, Result<Vec<Envelope>, BoxError>>,
    ) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>>;
}

impl fmt::Debug for DispatchContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatchContext")
            .field("bus", &self.bus)
            .field("snapshots", &self.snapshots.is_some())
            .field("settings", &self.settings)
            .field("handler_guard", &self.handler_guard.is_some())
            .finish_non_exhaustive()
    }
}

impl DispatchContext {
    /// Defaults around a bus: no application handler, no snapshots.
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        DispatchContext {
            bus,
            handler: Arc::new(NoHandler),
            snapshots: None,
            settings: ProtocolSettings::default(),
            #[cfg(feature = "presence")]
            presence: None,
            handler_guard: None,
        }
    }

    /// The `server_ready` envelope for a connection (PROTOCOL.md §6.1.1).
    pub fn server_ready(&self, connection: &Connection) -> Envelope {
        let now = wsengine_core::time::now_rfc3339();
        Envelope::new(
            "server_ready",
            json!({
                "message": "Connection established",
                "details": {
                    "version": 1,
                    "connection_id": connection.id().to_string(),
                    "user_id": connection.user_id(),
                    "server_time": now,
                    "features": {
                        "compression": self.settings.compression && cfg!(feature = "compression"),
                        "encryption": false,
                        "batching": true,
                        "priority_queue": true,
                        "circuit_breaker": true,
                        "rust_transport": true,
                        "rust_jwt": self.settings.jwt,
                        "recovery": self.settings.recovery,
                    }
                }
            }),
        )
        .identified()
    }
}

/// The per-connection dispatch service.
#[derive(Debug, Clone)]
pub struct Dispatch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    context: Arc<DispatchContext>,
    connection: Arc<Connection>,
    last_invalid_request: Mutex<Option<Instant>>,
}

impl Dispatch {
    /// Dispatch for one connection.
    pub fn new(context: Arc<DispatchContext>, connection: Arc<Connection>) -> Self {
        Dispatch { inner: Arc::new(Inner { context, connection, last_invalid_request: Mutex::new(None) }) }
    }
}

impl Service<Inbound> for Dispatch {
    type Response = Reply;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Reply, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, inbound: Inbound) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.inbound(inbound).await })
    }
}

/// How an inbound message arrived, handed on to the application with it.
#[derive(Debug, Clone, Copy)]
struct Origin {
    encrypted: bool,
    signature: SignatureStatus,
}

fn reasons_mention(ack: &Value, reason: &str) -> bool {
    ack.get("failure_reasons").and_then(Value::as_object).is_some_and(|r| r.values().any(|v| v == reason))
}

fn protocol_error(code: ErrorCode, message: &'static str) -> BoxError {
    ProtocolError::new(code, message).into()
}

impl Inner {
    async fn inbound(&self, inbound: Inbound) -> Result<Reply, BoxError> {
        let origin = Origin { encrypted: inbound.encrypted, signature: inbound.signature };
        match inbound.body {
            InboundBody::Message(message) if message.t() == Some("batch") => {
                // Each element as if it had arrived alone; a failing element becomes its own
                // error frame and the rest still run (PROTOCOL.md §6.2.6).
                let mut reply = Reply::none();
                let elements = match message.p().and_then(|p| p.get("messages")) {
                    Some(Value::Array(elements)) => elements.clone(),
                    _ => return Err(protocol_error(ErrorCode::InvalidRequest, "batch needs a messages array")),
                };
                let tokens = self.connection.shared::<BatchTokens>();
                for (index, element) in elements.into_iter().enumerate() {
                    // The frame itself paid for the first element (PROTOCOL.md §11.2).
                    if index > 0 {
                        if let Err(refused) = tokens.charge() {
                            let closing = refused.close.is_some();
                            reply.extend(refused);
                            if closing {
                                break;
                            }
                            continue;
                        }
                    }
                    let Value::Object(fields) = element else { continue };
                    let message = InboundMessage::from_map(fields);
                    let result = if message.t() == Some("batch") {
                        self.application(AppBody::Message(message), origin).await
                    } else {
                        self.message(message, origin).await
                    };
                    reply.extend(result.unwrap_or_else(|e| error_reply(&e)));
                    // The connection is closing (say, its handler failed too often).
                    if reply.close.is_some() {
                        break;
                    }
                }
                Ok(reply)
            }
            InboundBody::Message(message) => self.message(message, origin).await,
            InboundBody::RawText(text) => {
                if self.context.handler.accepts_raw() {
                    self.application(AppBody::RawText(text), origin).await
                } else if self.may_send_invalid_request() {
                    Err(protocol_error(ErrorCode::InvalidRequest, "Messages must be JSON objects"))
                } else {
                    Ok(Reply::none())
                }
            }
            InboundBody::RawBinary(bytes) => {
                if self.context.handler.accepts_raw() {
                    self.application(AppBody::RawBinary(bytes), origin).await
                } else if self.may_send_invalid_request() {
                    Err(protocol_error(
                        ErrorCode::InvalidRequest,
                        "Binary frames must be C:, M: or E: encoded messages",
                    ))
                } else {
                    Ok(Reply::none())
                }
            }
            // No decrypt layer (encryption off): the frame is dropped (§3.4 step 3), and the
            // client learns why, as from the decrypt layer when it has no key.
            InboundBody::Encrypted(_) if self.may_send_invalid_request() => {
                Err(protocol_error(ErrorCode::InvalidRequest, "Encrypted frame, but encryption is off on this server"))
            }
            InboundBody::Encrypted(_) => Ok(Reply::none()),
            InboundBody::Frame(_) => Err("frame reached dispatch undecoded (is the decode layer missing?)".into()),
        }
    }

    /// INVALID_REQUEST errors go out at most once per second per connection.
    fn may_send_invalid_request(&self) -> bool {
        let mut last = self.last_invalid_request.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }

    async fn message(&self, message: InboundMessage, origin: Origin) -> Result<Reply, BoxError> {
        match message.t() {
            Some("client_hello") => Ok(self.client_hello(&message)),
            Some("ping" | "PING") => {
                let client_timestamp = message.p().and_then(|p| p.get("timestamp"));
                let pong = wsengine_core::envelope::pong(client_timestamp, wsengine_core::time::unix_millis());
                Ok(Reply::message(Outbound::protocol(pong)))
            }
            Some("PONG" | "pong") => Ok(Reply::none()),
            Some("subscription_update" | "subscription") => self.subscription(&message).await,
            Some("sync_request") => Ok(self.sync_request(&message).await),
            _ => self.application(AppBody::Message(message), origin).await,
        }
    }

    fn client_hello(&self, message: &InboundMessage) -> Reply {
        let features = message.p().and_then(|p| p.get("features"));
        if let Some(Value::Bool(compression)) = features.and_then(|f| f.get("compression")) {
            self.connection.set_compression(*compression);
        }
        let settings = &self.context.settings;
        let hello = Envelope::new(
            "server_hello",
            json!({
                "server_version": env!("CARGO_PKG_VERSION"),
                "protocol_version": 1,
                "connection_id": self.connection.id().to_string(),
                "server_time": wsengine_core::time::now_rfc3339(),
                "ping_interval": u64::try_from(settings.ping_interval.as_millis()).unwrap_or(u64::MAX),
                "features": {
                    "compression": settings.compression && cfg!(feature = "compression"),
                    "recovery": settings.recovery,
                    "cluster": settings.cluster,
                    "batching": true,
                    "priority_queue": true,
                    // `format=msgpack` connections get msgpack only with the feature.
                    "msgpack": cfg!(feature = "msgpack"),
                    "encryption": false,
                },
                "limits": {
                    "max_message_size": settings.max_message_size,
                    "rate_limit_capacity": settings.outbound_rate.0,
                    "rate_limit_refill": settings.outbound_rate.1,
                    "inbound_rate_limit_capacity": settings.inbound_rate.0,
                    "inbound_rate_limit_refill": settings.inbound_rate.1,
                }
            }),
        )
        .identified();
        Reply::message(Outbound::protocol(hello))
    }

    async fn subscription(&self, message: &InboundMessage) -> Result<Reply, BoxError> {
        let p = message.p();
        let action = match p.and_then(|p| p.get("action")) {
            None | Some(Value::Null) => "subscribe",
            Some(Value::String(a)) if a == "subscribe" || a == "unsubscribe" => a.as_str(),
            Some(_) => return Err(protocol_error(ErrorCode::InvalidAction, "action must be subscribe or unsubscribe")),
        };
        let topics = match p.and_then(|p| p.get("topics")) {
            Some(Value::Array(topics)) if !topics.is_empty() => topics,
            _ => {
                return Err(protocol_error(
                    ErrorCode::InvalidSubscription,
                    "subscription_update needs a non-empty topics array",
                ));
            }
        };
        let mut seen = HashSet::new();
        let mut requested = Vec::with_capacity(topics.len());
        for topic in topics {
            let Value::String(topic) = topic else {
                return Err(protocol_error(ErrorCode::InvalidSubscription, "topics must be strings"));
            };
            if seen.insert(topic.as_str()) {
                requested.push(topic.clone());
            }
        }
        if action == "subscribe" {
            return Ok(self.subscribe_reply(requested, p).await);
        }
        let ack = self.unsubscribe(requested);
        Ok(Reply::message(Outbound::protocol(Envelope::new("subscription_update", ack).identified())))
    }

    /// Subscribes and builds the whole answer, in the order the client must see it: the
    /// recovery replays, the ack (PROTOCOL.md §9.4), then with `snapshot_on_subscribe` the
    /// snapshot events of the newly subscribed topics and `snapshot_complete`.
    ///
    /// Live publications of these topics cannot get ahead: the subscriptions were registered
    /// together with their positions, so later publications wait in the delivery channel, and
    /// the driver queues this whole reply before it takes further deliveries.
    async fn subscribe_reply(&self, topics: Vec<String>, p: Option<&Value>) -> Reply {
        let settings = &self.context.settings;
        let queued = self.connection.shared::<QueueGauge>();
        let (queue_bytes, queue_messages) = settings.outbound_queue;
        let limit = ReplayLimit {
            // One place stays for the ack.
            messages: queue_messages.saturating_sub(queued.messages() + 1),
            bytes: queue_bytes.saturating_sub(queued.bytes()),
        };
        let mut recovery = SubscribeRecovery::new(settings.recovery, p, limit);
        let mut ack = self.subscribe(topics, p, &mut recovery);
        let new_topics: Vec<String> =
            recovery.new_topics().iter().filter(|t| !wsengine_core::topic::is_pattern(t)).cloned().collect();
        let replay = recovery.finish(self.context.bus.as_ref(), &self.connection, &mut ack);
        let mut reply = Reply { messages: replay.into_iter().map(Outbound::publication).collect(), close: None };
        reply.push(Outbound::protocol(Envelope::new("subscription_update", ack).identified()));
        if settings.snapshot_on_subscribe && self.context.snapshots.is_some() && !new_topics.is_empty() {
            let count = self.snapshot_events(&new_topics, &mut reply).await;
            let complete = Envelope::new("snapshot_complete", json!({ "topics": new_topics, "count": count }));
            reply.push(Outbound::protocol(complete.identified()));
        }
        reply
    }

    fn subscribe(&self, topics: Vec<String>, p: Option<&Value>, recovery: &mut SubscribeRecovery) -> Value {
        let limit = self.context.settings.max_subscriptions;
        let mut success = Vec::new();
        let mut failed = Vec::new();
        let mut reasons = Map::new();
        // `p.filter` and `p.presence` apply to every topic of the request (PROTOCOL.md §6.3.6;
        // filters are an engine extension, see the filter module).
        let filter = requested_filter(p);
        let presence = self.requested_presence(p);
        self.connection.with_subscriptions(|subscriptions| {
            for topic in topics {
                let reason = if !validate_topic(&topic) {
                    Some("INVALID_TOPIC")
                } else if !self.connection.may_access(&topic) {
                    // The subscription string itself; pattern deliveries are checked per topic by the bus.
                    Some("FORBIDDEN")
                } else if filter.is_err() {
                    Some("INVALID_FILTER")
                } else if presence.is_err() {
                    Some("INVALID_PRESENCE")
                } else if !subscriptions.contains(&topic) && limit != 0 && subscriptions.len() >= limit {
                    Some("LIMIT_EXCEEDED")
                } else if !self.apply_filter(&topic, filter.as_ref().ok().and_then(Option::as_ref)) {
                    // A bus that cannot filter: better refused than delivered unfiltered.
                    Some("INVALID_FILTER")
                } else {
                    if subscriptions.insert(topic.clone()) {
                        recovery.register(self.context.bus.as_ref(), &self.connection, &topic);
                    }
                    None
                };
                match reason {
                    Some(reason) => {
                        reasons.insert(topic.clone(), reason.into());
                        failed.push(topic);
                    }
                    None => success.push(topic),
                }
            }
        });
        let mut ack = json!({
            "action": "subscribe",
            "success": !success.is_empty(),
            "success_topics": success,
            "failed_topics": failed,
        });
        #[cfg(feature = "presence")]
        if let (Some(tracker), Ok(data)) = (&self.context.presence, presence.as_ref()) {
            for topic in &success {
                tracker.track(topic, &self.connection, data.clone());
            }
        }
        if !reasons.is_empty() {
            ack["failure_reasons"] = Value::Object(reasons);
        }
        // The reasons are codes (§6.1.5); the details go into fields of their own.
        if let Err(error) = &filter {
            ack["filter_error"] = error.as_str().into();
        } else if reasons_mention(&ack, "INVALID_FILTER") {
            ack["filter_error"] = "this bus does not support filters".into();
        }
        if let Err(error) = &presence {
            ack["presence_error"] = error.as_str().into();
        }
        ack["recovered"] = false.into();
        ack
    }

    /// Sets (or clears) the filter of this connection's subscription to `topic`; false when
    /// the bus cannot filter.
    fn apply_filter(&self, topic: &str, filter: Option<&RequestFilter>) -> bool {
        #[cfg(feature = "filters")]
        return self.context.bus.set_filter(self.connection.id(), topic, filter.cloned());
        #[cfg(not(feature = "filters"))]
        {
            let _ = topic;
            filter.is_none()
        }
    }

    /// The validated `p.presence` of a subscribe request; ignored while presence is off.
    fn requested_presence(&self, p: Option<&Value>) -> Result<Option<PresenceData>, String> {
        #[cfg(feature = "presence")]
        if let (Some(_), Some(data)) = (&self.context.presence, p.and_then(|p| p.get("presence"))) {
            if !data.is_null() {
                return Presence::validate(data).map(Some).map_err(|error| error.to_string());
            }
        }
        #[cfg(not(feature = "presence"))]
        let _ = p;
        Ok(None)
    }

    fn unsubscribe(&self, topics: Vec<String>) -> Value {
        self.connection.with_subscriptions(|subscriptions| {
            for topic in &topics {
                if subscriptions.remove(topic) {
                    self.context.bus.unsubscribe(self.connection.id(), topic);
                    #[cfg(feature = "presence")]
                    if let Some(presence) = &self.context.presence {
                        presence.untrack(topic, self.connection.id());
                    }
                }
            }
        });
        json!({
            "action": "unsubscribe",
            "success": true,
            "success_topics": [],
            "failed_topics": [],
            "unsubscribed_topics": topics,
        })
    }

    async fn sync_request(&self, message: &InboundMessage) -> Reply {
        let p = message.p();
        let requested: Option<Vec<String>> = match p.and_then(|p| p.get("topics")) {
            Some(Value::Array(topics)) if !topics.is_empty() => {
                topics.iter().map(|t| t.as_str().map(str::to_owned)).collect()
            }
            _ => None,
        };
        let mut topics = requested.unwrap_or_else(|| {
            let mut current: Vec<String> = self
                .connection
                .with_subscriptions(|s| s.iter().filter(|t| !wsengine_core::topic::is_pattern(t)).cloned().collect());
            current.sort();
            current
        });
        // Topics the ACL denies are removed silently (PROTOCOL.md §6.2.5 step 1).
        topics.retain(|topic| self.connection.may_access(topic));
        let wanted = !matches!(p.and_then(|p| p.get("include_snapshots")), Some(Value::Bool(false)));
        let mut reply = Reply::none();
        let mut count = 0usize;
        if wanted && !topics.is_empty() {
            count = self.snapshot_events(&topics, &mut reply).await;
        }
        let complete = Envelope::new("snapshot_complete", json!({ "topics": topics, "count": count })).identified();
        reply.push(Outbound::protocol(complete));
        reply
    }

    /// Asks the snapshot provider for `topics` (the one place it is called) and appends its
    /// events to `reply`: category `S`, a fresh `id` and `ts`, no stamp (PROTOCOL.md §6.2.5).
    /// An event that names one of the topics in `p.topic` (or the only topic asked for) is
    /// kept in order with that topic's publications, so a live publication queued after it
    /// never overtakes it whatever their priorities. A failing provider becomes a
    /// `SNAPSHOT_FAILED` error. Returns how many events were appended.
    async fn snapshot_events(&self, topics: &[String], reply: &mut Reply) -> usize {
        let Some(provider) = &self.context.snapshots else { return 0 };
        let mut count = 0usize;
        match provider.snapshot(self.connection.user_id(), topics).await {
            Ok(events) => {
                for mut event in events {
                    event.c = Category::Snapshot;
                    event.stamp = None;
                    event.id = None;
                    event.ts = None;
                    let named = event.p.get("topic").and_then(Value::as_str);
                    let topic = match (named, topics) {
                        (Some(named), _) => topics.iter().find(|t| t.as_str() == named),
                        (None, [only]) => Some(only),
                        (None, _) => None,
                    };
                    let mut outbound = Outbound::event(event.identified());
                    if let Some(topic) = topic {
                        outbound = outbound.in_stream(OrderKey::topic(topic));
                    }
                    reply.push(outbound);
                    count += 1;
                }
            }
            Err(error) => {
                tracing::warn!(connection = %self.connection.id(), %error, "snapshot provider failed");
                let mut failure = ProtocolError::new(ErrorCode::SnapshotFailed, "Snapshot failed")
                    .with_details(json!({ "topics": topics }));
                // A circuit breaker refused the call: pass on how long to wait.
                if let Some(open) =
                    error.downcast_ref::<ProtocolError>().filter(|e| e.code() == ErrorCode::CircuitBreakerOpen)
                {
                    for (key, value) in open.fields() {
                        failure = failure.with_field(key.clone(), value.clone());
                    }
                }
                reply.extend(error_reply(&failure.into()));
            }
        }
        count
    }

    async fn application(&self, body: AppBody, origin: Origin) -> Result<Reply, BoxError> {
        let message = AppMessage {
            connection_id: self.connection.id(),
            user_id: self.connection.user_id().to_owned(),
            body,
            encrypted: origin.encrypted,
            signature: origin.signature,
        };
        let call = self.context.handler.handle(message);
        let events = match &self.context.handler_guard {
            Some(guard) => guard.guard(&self.connection, call).await?,
            None => call.await?,
        };
        Ok(Reply { messages: events.into_iter().map(Outbound::event).collect(), close: None })
    }
}

/// A subscription filter as the bus takes it.
#[cfg(feature = "filters")]
type RequestFilter = Arc<Filter>;
#[cfg(not(feature = "filters"))]
type RequestFilter = std::convert::Infallible;

/// A connection's presence data.
#[cfg(feature = "presence")]
type PresenceData = Map<String, Value>;
#[cfg(not(feature = "presence"))]
type PresenceData = std::convert::Infallible;

/// The `p.filter` of a subscribe request, compiled (and shared with equal filters), or why it
/// is unusable.
fn requested_filter(p: Option<&Value>) -> Result<Option<RequestFilter>, String> {
    match p.and_then(|p| p.get("filter")) {
        None | Some(Value::Null) => Ok(None),
        #[cfg(feature = "filters")]
        Some(expression) => Filter::intern(expression).map(Some).map_err(|error| error.message().to_owned()),
        #[cfg(not(feature = "filters"))]
        Some(_) => Err("this server is built without filters (cargo feature `filters`)".to_owned()),
    }
}
