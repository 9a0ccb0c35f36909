//! Connections: identity, the state shared by a connection's stacks, and the registry.
//!
//! A [`Connection`] is created when an upgrade is accepted. Its message stacks and its driver
//! share it through an `Arc`. The [`Registry`] maps connection and user ids to the sender of
//! each connection's deliveries so that direct sends and broadcasts reach the right driver.
//!
//! ```
//! use wsengine_services::connection::{ConnectionId, Registry};
//!
//! let registry = Registry::new(10);
//! let slot = registry.reserve().expect("capacity");
//! assert_eq!(registry.len(), 0);
//! drop(slot);
//! assert!(ConnectionId::new().to_string().len() == 36);
//!
//! // Layers of one connection share state through `Connection::shared`.
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use wsengine_services::connection::Connection;
//! let (tx, _rx) = wsengine_services::connection::delivery_channel(1);
//! let connection = Connection::new(ConnectionId::new(), None, wsengine_core::WireFormat::Json, tx);
//! connection.shared::<AtomicU32>().fetch_add(1, Ordering::Relaxed);
//! assert_eq!(connection.shared::<AtomicU32>().load(Ordering::Relaxed), 1);
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use wsengine_core::codes::CloseCode;
use wsengine_core::{Envelope, WireFormat};

use crate::acl::TopicAcl;
use crate::publication::Publication;

/// A connection's id: a UUIDv7, sent to the client as `connection_id`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(uuid::Uuid);

impl ConnectionId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        ConnectionId(uuid::Uuid::now_v7())
    }

    /// Parses the hyphenated form.
    pub fn parse(text: &str) -> Option<Self> {
        uuid::Uuid::parse_str(text).ok().map(ConnectionId)
    }
}

impl Default for ConnectionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({self})")
    }
}

/// Something for a connection's driver to deliver.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A topic publication or broadcast.
    Publication(Arc<Publication>),
    /// A per-connection application event.
    Event(Box<Envelope>),
    /// Close the connection with this code and reason (boxed: rare, and it would double the
    /// size of every slot in the delivery channel).
    Close(Box<(CloseCode, String)>),
}

/// A bounded channel of deliveries for one connection's driver.
///
/// Unlike a general-purpose channel it allocates nothing until something is sent and gives
/// its buffer back once drained, because every idle connection carries one (the idle
/// connection budget is 8 KiB).
pub fn delivery_channel(capacity: usize) -> (DeliverySender, DeliveryReceiver) {
    let shared = Arc::new(DeliveryShared {
        capacity: capacity.max(1),
        state: Mutex::new(DeliveryState { items: VecDeque::new(), waker: None, senders: 1 }),
    });
    (DeliverySender { shared: Arc::clone(&shared) }, DeliveryReceiver { shared })
}

#[derive(Debug)]
struct DeliveryShared {
    capacity: usize,
    state: Mutex<DeliveryState>,
}

#[derive(Debug)]
struct DeliveryState {
    items: VecDeque<Delivery>,
    waker: Option<std::task::Waker>,
    senders: usize,
}

impl DeliveryShared {
    fn state(&self) -> std::sync::MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side of a connection's delivery channel.
#[derive(Debug)]
pub struct DeliverySender {
    shared: Arc<DeliveryShared>,
}

/// The channel is full (the connection is not keeping up); the delivery comes back.
#[derive(Debug)]
pub struct Full(pub Delivery);

impl DeliverySender {
    /// Queues a delivery without waiting.
    pub fn try_send(&self, delivery: Delivery) -> Result<(), Full> {
        let waker = {
            let mut state = self.shared.state();
            if state.items.len() >= self.shared.capacity {
                return Err(Full(delivery));
            }
            state.items.push_back(delivery);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl Clone for DeliverySender {
    fn clone(&self) -> Self {
        self.shared.state().senders += 1;
        DeliverySender { shared: Arc::clone(&self.shared) }
    }
}

impl Drop for DeliverySender {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.state();
            state.senders -= 1;
            if state.senders == 0 { state.waker.take() } else { None }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The receiving side of a connection's delivery channel (held by its driver).
#[derive(Debug)]
pub struct DeliveryReceiver {
    shared: Arc<DeliveryShared>,
}

/// Nothing is waiting in the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

impl DeliveryReceiver {
    /// The next delivery; `None` once every sender is gone and the channel is empty.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next delivery.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Delivery>> {
        let mut state = self.shared.state();
        match Self::pop(&mut state) {
            Some(delivery) => std::task::Poll::Ready(Some(delivery)),
            None if state.senders == 0 => std::task::Poll::Ready(None),
            None => {
                state.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }

    /// The next delivery if one is waiting.
    pub fn try_recv(&mut self) -> Result<Delivery, Empty> {
        Self::pop(&mut self.shared.state()).ok_or(Empty)
    }

    fn pop(state: &mut DeliveryState) -> Option<Delivery> {
        let delivery = state.items.pop_front();
        if state.items.is_empty() && state.items.capacity() > 0 {
            // Drained: give the buffer back so an idle connection holds none.
            state.items = VecDeque::new();
        }
        delivery
    }
}

/// The authenticated identity of a connection, put into the upgrade request's extensions by a
/// handshake layer (an auth layer, or the application).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub` of a JWT).
    pub user_id: String,
    /// When the credentials stop being valid: the driver then sends `AUTH_FAILED` and closes
    /// the connection with 4401 (checked at every heartbeat tick). `None`: never.
    pub expires_at: Option<std::time::SystemTime>,
}

impl Identity {
    /// A user whose session does not expire.
    pub fn new(user_id: impl Into<String>) -> Self {
        Identity { user_id: user_id.into(), expires_at: None }
    }
}

/// An authentication failure recorded by a handshake layer: the connection is upgraded, sent
/// this error and closed with 4401 (PROTOCOL.md §2.5).
#[derive(Debug, Clone)]
pub struct AuthRejection(pub wsengine_core::ProtocolError);

/// State of one connection shared by its inbound stack, outbound stack and driver.
#[derive(Debug)]
pub struct Connection {
    id: ConnectionId,
    user_id: String,
    format: WireFormat,
    authenticated: bool,
    compression: Arc<AtomicBool>,
    subscriptions: Mutex<HashSet<String>>,
    deliveries: DeliverySender,
    dropped: Arc<AtomicU64>,
    shared: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>,
    acl: OnceLock<TopicAcl>,
    expires_at: Option<std::time::SystemTime>,
}

impl Connection {
    /// A connection with the given identity and delivery channel. Anonymous connections use
    /// their connection id as user id.
    pub fn new(id: ConnectionId, identity: Option<Identity>, format: WireFormat, deliveries: DeliverySender) -> Self {
        let authenticated = identity.is_some();
        let expires_at = identity.as_ref().and_then(|i| i.expires_at);
        let user_id = identity.map(|i| i.user_id).unwrap_or_else(|| id.to_string());
        Connection {
            id,
            user_id,
            format,
            authenticated,
            compression: Arc::new(AtomicBool::new(true)),
            subscriptions: Mutex::new(HashSet::new()),
            deliveries,
            dropped: Arc::new(AtomicU64::new(0)),
            shared: Mutex::new(Vec::new()),
            acl: OnceLock::new(),
            expires_at,
        }
    }

    /// When the connection's credentials expire (see [`Identity::expires_at`]).
    pub fn expires_at(&self) -> Option<std::time::SystemTime> {
        self.expires_at
    }

    /// The connection id.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// The user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Whether a handshake layer authenticated the connection.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The topic ACL installed at the handshake, if any (PROTOCOL.md §6.2.4 step 3).
    pub fn acl(&self) -> Option<&TopicAcl> {
        self.acl.get()
    }

    /// Installs the connection's topic ACL; only the first call has an effect.
    pub fn set_acl(&self, acl: TopicAcl) {
        let _ = self.acl.set(acl);
    }

    /// Whether the ACL (if any) lets this connection receive or subscribe `topic`.
    pub fn may_access(&self, topic: &str) -> bool {
        self.acl.get().is_none_or(|acl| acl.allows(topic))
    }

    /// JSON or msgpack, chosen by `?format=msgpack` at connect time.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// Whether the client accepts `C:` frames (it may say no in `client_hello`).
    pub fn compression_enabled(&self) -> bool {
        self.compression.load(Ordering::Relaxed)
    }

    /// The compression switch shared with the connection's encode layer.
    pub fn compression_switch(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.compression)
    }

    /// Records the client's compression preference.
    pub fn set_compression(&self, enabled: bool) {
        self.compression.store(enabled, Ordering::Relaxed);
    }

    /// The sender of this connection's deliveries.
    pub fn deliveries(&self) -> &DeliverySender {
        &self.deliveries
    }

    /// Runs `f` on the set of subscribed topics and patterns.
    pub fn with_subscriptions<R>(&self, f: impl FnOnce(&mut HashSet<String>) -> R) -> R {
        f(&mut self.subscriptions.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The drop counter, shared with the connection's outbound queue.
    pub fn drop_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    /// Per-connection state of type `T` shared between layers, created on first use.
    ///
    /// Paired layers (say, a decrypt layer in the inbound stack and an encrypt layer in the
    /// outbound stack) each call this with the same type and get the same value.
    pub fn shared<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = shared.iter().find_map(|value| Arc::clone(value).downcast::<T>().ok()) {
            return found;
        }
        let value = Arc::new(T::default());
        shared.push(Arc::clone(&value) as Arc<dyn std::any::Any + Send + Sync>);
        value
    }

    /// Counts a delivery dropped because the connection could not keep up.
    pub fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages dropped so far because the connection could not keep up (full delivery
    /// channel or full outbound queue).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues a delivery without waiting; a full channel drops it and counts the drop.
    pub fn deliver(&self, delivery: Delivery) -> bool {
        match self.deliveries.try_send(delivery) {
            Ok(()) => true,
            Err(_) => {
                self.count_drop();
                false
            }
        }
    }
}

/// Every registered connection, by connection id and by user id, and the connection limit.
#[derive(Debug)]
pub struct Registry {
    max_connections: usize,
    reserved: AtomicUsize,
    inner: RwLock<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    connections: HashMap<ConnectionId, Arc<Connection>>,
    users: HashMap<String, Vec<ConnectionId>>,
}

/// A reserved connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    registry: Arc<Registry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    /// An empty registry admitting at most `max_connections` connections.
    pub fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Registry { max_connections, reserved: AtomicUsize::new(0), inner: RwLock::default() })
    }

    /// Reserves a slot before the upgrade is answered, so no connection ever has to be closed
    /// for capacity after it was accepted. `None` when full.
    pub fn reserve(self: &Arc<Self>) -> Option<Slot> {
        let mut current = self.reserved.load(Ordering::Acquire);
        loop {
            if current >= self.max_connections {
                return None;
            }
            match self.reserved.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Slot { registry: Arc::clone(self) }),
                Err(actual) => current = actual,
            }
        }
    }

    /// Connections holding a slot (registered or still in setup).
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RegistryInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a connection visible to direct sends and broadcasts.
    pub fn register(&self, connection: Arc<Connection>) {
        let mut inner = self.write();
        inner.users.entry(connection.user_id().to_owned()).or_default().push(connection.id());
        inner.connections.insert(connection.id(), connection);
    }

    /// Removes a connection.
    pub fn unregister(&self, id: ConnectionId) {
        let mut inner = self.write();
        if let Some(connection) = inner.connections.remove(&id) {
            let user = connection.user_id();
            if let Some(ids) = inner.users.get_mut(user) {
                ids.retain(|c| *c != id);
                if ids.is_empty() {
                    inner.users.remove(user);
                }
            }
        }
    }

    /// Registered connections.
    pub fn len(&self) -> usize {
        self.read().connections.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A registered connection.
    pub fn get(&self, id: ConnectionId) -> Option<Arc<Connection>> {
        self.read().connections.get(&id).cloned()
    }

    /// The connections of a user.
    pub fn user_connections(&self, user_id: &str) -> Vec<Arc<Connection>> {
        let inner = self.read();
        inner
            .users
            .get(user_id)
            .map(|ids| ids.iter().filter_map(|id| inner.connections.get(id).cloned()).collect())
            .unwrap_or_default()
    }

    /// Every registered connection (a snapshot).
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.read().connections.values().cloned().collect()
    }

    /// Delivers to every registered connection; returns how many accepted it.
    pub fn deliver_all(&self, delivery: &Delivery) -> usize {
        self.read().connections.values().filter(|c| c.deliver(delivery.clone())).count()
    }
}
