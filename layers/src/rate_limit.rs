//! Rate limiting of PROTOCOL.md §11: inbound frames per connection and per user, outbound
//! events per connection, all token buckets (GCRA, via `governor`).
//!
//! - [`InboundRateLimitLayer`] sits right inside error-to-frame, before decryption and
//!   decoding, so a flood costs one bucket check per frame and nothing else. Every inbound
//!   data frame costs one token (a `ping` too); a frame that finds none is dropped (a dropped
//!   `ping` gets no `PONG`) and the client gets `RATE_LIMITED` with `direction:"inbound"` at
//!   most once per second. Frames dropped in each of N consecutive one-second windows close
//!   the connection with 4429. A `batch` costs one token per element: the layer pays for the
//!   frame and installs a [`BatchTokens`] charge that dispatch calls for every further
//!   element. An optional [`UserRateLimiter`] adds a bucket shared by all connections of an
//!   authenticated user.
//! - [`OutboundRateLimitLayer`] limits per-connection application events (direct sends and
//!   handler replies; not snapshot events, publications, broadcasts, replays or protocol
//!   frames). Below 20 % of capacity the client gets `rate_limit_warning` (at most once per
//!   second, just before the next outbound message); an event that finds no token is dropped,
//!   counted in [`RateLimitDrops`], logged, and answered with `RATE_LIMITED` with
//!   `direction:"outbound"` at most once per second. The connection stays open. It sits above
//!   signing and encoding, so a dropped event costs no encoding and leaves no gap in `seq`.
//!
//! Checks never wait: per-connection buckets are one atomic each, the per-user limiter is
//! sharded and holds a shard's lock only for a hash-map lookup. Time comes from
//! `tokio::time::Instant`, so tests can pause and advance it.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use wsengine_core::Frame;
//! use wsengine_layers::rate_limit::{InboundRateLimitLayer, Rate};
//! use wsengine_services::message::{BoxError, Inbound, Reply};
//!
//! let inner = service_fn(|_: Inbound| async { Ok::<_, BoxError>(Reply::none()) });
//! let layer = InboundRateLimitLayer::new(Rate::new(2, 1).unwrap());
//! let mut service = layer.layer(inner);
//! for _ in 0..2 {
//!     let reply = service.ready().await.unwrap().call(Inbound::frame(Frame::text("{}"))).await.unwrap();
//!     assert!(reply.messages.is_empty());
//! }
//! // The third frame within the second finds no token: dropped, and the client is told.
//! let reply = service.ready().await.unwrap().call(Inbound::frame(Frame::text("{}"))).await.unwrap();
//! assert_eq!(reply.messages.len(), 1);
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready as ready_future};
use governor::clock::{Clock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use serde_json::json;
use tower::{Layer, Service};
use wsengine_core::codes::CloseCode;
use wsengine_core::{Category, Envelope, ErrorCode, ProtocolError};
use wsengine_services::connection::Connection;
use wsengine_services::dispatch::BatchTokens;
use wsengine_services::message::{BoxError, Inbound, Outbound, OutboundBody, OutboundKind, Reply};

/// Close reason sent with 4429.
const CLOSE_REASON: &str = "Rate limit exceeded";
/// Notices (`RATE_LIMITED`, `rate_limit_warning`) go out at most once per this interval.
const NOTICE_INTERVAL: Nanos = Nanos::new(1_000_000_000);
/// The persistent-abuse rule counts one-second windows.
const WINDOW: Nanos = NOTICE_INTERVAL;
/// How often a [`UserRateLimiter`] forgets users whose bucket is full again.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Shards of a [`UserRateLimiter`]: checks of different users rarely share a lock.
const USER_SHARDS: usize = 16;

/// A token bucket: `capacity` tokens, refilled continuously at `refill_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    capacity: NonZeroU32,
    refill_per_second: NonZeroU32,
}

impl Rate {
    /// A bucket of `capacity` tokens refilled at `refill_per_second`; `None` if either is 0.
    pub fn new(capacity: u32, refill_per_second: u32) -> Option<Rate> {
        Some(Rate { capacity: NonZeroU32::new(capacity)?, refill_per_second: NonZeroU32::new(refill_per_second)? })
    }

    /// Tokens when full.
    pub fn capacity(&self) -> u32 {
        self.capacity.get()
    }

    /// Tokens added per second.
    pub fn refill_per_second(&self) -> u32 {
        self.refill_per_second.get()
    }

    fn quota(&self) -> Quota {
        Quota::per_second(self.refill_per_second).allow_burst(self.capacity)
    }
}

/// `tokio::time::Instant` as a governor clock, so that paused test time drives the buckets.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    fn new() -> Self {
        TokioClock { origin: tokio::time::Instant::now() }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;
type KeyedLimiter = RateLimiter<String, HashMapStateStore<String>, TokioClock, NoOpMiddleware<Nanos>>;

fn direct_limiter(rate: Rate, clock: TokioClock) -> DirectLimiter {
    RateLimiter::direct_with_clock(rate.quota(), clock).with_middleware::<StateInformationMiddleware>()
}

/// `retry_after` in seconds: the wait until the next token, rounded up to milliseconds.
fn retry_after(wait: Duration) -> f64 {
    (wait.as_nanos().div_ceil(1_000_000) as f64 / 1000.0).max(0.001)
}

/// How long until `not_until` allows a cell, on the clock of the limiter that refused.
fn wait_time(not_until: &NotUntil<Nanos>, clock: &TokioClock) -> Duration {
    not_until.wait_time_from(clock.now())
}

fn rate_limited(direction: &'static str, retry_after: f64) -> Outbound {
    let error = ProtocolError::new(ErrorCode::RateLimited, CLOSE_REASON)
        .with_field("retry_after", json!(retry_after))
        .with_field("direction", json!(direction));
    Outbound::protocol(error.to_envelope())
}

/// Whether a notice last sent at `last` may go out again at `now`; records it if so.
fn notice_due(last: &mut Option<Nanos>, now: Nanos) -> bool {
    if last.is_some_and(|sent| now.duration_since(sent) < NOTICE_INTERVAL) {
        return false;
    }
    *last = Some(now);
    true
}

/// Rate-limit drops of one connection, shared through [`Connection::shared`].
#[derive(Debug, Default)]
pub struct RateLimitDrops {
    inbound: AtomicU64,
    outbound: AtomicU64,
}

impl RateLimitDrops {
    /// Inbound frames (and batch elements) dropped so far.
    pub fn inbound(&self) -> u64 {
        self.inbound.load(Ordering::Relaxed)
    }

    /// Outbound events dropped so far: the application's sends that never reached the client.
    pub fn outbound(&self) -> u64 {
        self.outbound.load(Ordering::Relaxed)
    }
}

/// An inbound bucket shared by every connection of a user, keyed by user id.
///
/// Memory stays bounded: every 30 s the first check that notices forgets the users whose
/// bucket has refilled completely (which is indistinguishable from never having seen them),
/// shard by shard, so a user without connections costs memory for at most a refill period
/// plus 30 s. Clones share the buckets.
#[derive(Clone)]
pub struct UserRateLimiter {
    inner: Arc<UserShards>,
}

struct UserShards {
    rate: Rate,
    clock: TokioClock,
    hasher: RandomState,
    shards: Vec<KeyedLimiter>,
    /// Clock reading (nanoseconds) of the last sweep.
    swept: AtomicU64,
}

impl fmt::Debug for UserRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRateLimiter").field("rate", &self.inner.rate).field("users", &self.len()).finish()
    }
}

impl UserRateLimiter {
    /// One bucket of `rate` per user.
    pub fn new(rate: Rate) -> Self {
        let clock = TokioClock::new();
        let shards = (0..USER_SHARDS).map(|_| RateLimiter::hashmap_with_clock(rate.quota(), clock)).collect();
        let swept = AtomicU64::new(0);
        UserRateLimiter { inner: Arc::new(UserShards { rate, clock, hasher: RandomState::new(), shards, swept }) }
    }

    /// The per-user bucket.
    pub fn rate(&self) -> Rate {
        self.inner.rate
    }

    /// Users currently holding state (their bucket is not full, or no sweep ran yet).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(KeyedLimiter::len).sum()
    }

    /// Whether no user holds state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every user whose bucket is full again, now (the limiter also does this by
    /// itself every 30 s). Each shard's lock is held only while that shard is swept.
    pub fn retain_recent(&self) {
        for shard in &self.inner.shards {
            shard.retain_recent();
            shard.shrink_to_fit();
        }
    }

    /// Takes one token from `user`'s bucket; `Err` is the wait until the next one.
    fn check(&self, user: &String) -> Result<(), Duration> {
        let inner = &*self.inner;
        let now = inner.clock.now().as_u64();
        let swept = inner.swept.load(Ordering::Relaxed);
        let due = now.saturating_sub(swept) >= SWEEP_INTERVAL.as_nanos() as u64;
        // One caller wins the sweep; the others carry on without waiting for it.
        if due && inner.swept.compare_exchange(swept, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.retain_recent();
        }
        let index = (inner.hasher.hash_one(user) % USER_SHARDS as u64) as usize;
        inner.shards[index].check_key(user).map_err(|not_until| wait_time(&not_until, &inner.clock))
    }
}

/// Applies [`InboundRateLimit`].
#[derive(Debug, Clone)]
pub struct InboundRateLimitLayer {
    rate: Rate,
    close_windows: u32,
    users: Option<UserRateLimiter>,
    connection: Option<Arc<Connection>>,
}

impl InboundRateLimitLayer {
    /// A bucket of `rate` per connection; persistent abuse closes after 10 windows.
    pub fn new(rate: Rate) -> Self {
        InboundRateLimitLayer { rate, close_windows: 10, users: None, connection: None }
    }

    /// Closes with 4429 once frames were dropped in each of `windows` consecutive one-second
    /// windows; 0 never closes.
    pub fn close_after_windows(mut self, windows: u32) -> Self {
        self.close_windows = windows;
        self
    }

    /// Also charges every frame to the user's bucket in `users` (authenticated connections
    /// only: an anonymous connection is its own user, which the per-connection bucket covers).
    pub fn per_user(mut self, users: UserRateLimiter) -> Self {
        self.users = Some(users);
        self
    }

    /// The connection the stack serves: it names the user for [`per_user`](Self::per_user),
    /// receives the [`BatchTokens`] charge so that batch elements cost a token each, and
    /// counts drops in its [`RateLimitDrops`]. Without it batches cost one token per frame.
    pub fn connection(mut self, connection: &Arc<Connection>) -> Self {
        self.connection = Some(Arc::clone(connection));
        self
    }
}

impl<S> Layer<S> for InboundRateLimitLayer {
    type Service = InboundRateLimit<S>;

    fn layer(&self, inner: S) -> InboundRateLimit<S> {
        let clock = TokioClock::new();
        let user = self.connection.as_ref().filter(|c| c.is_authenticated()).map(|c| c.user_id().to_owned());
        let limiter = Arc::new(InboundLimiter {
            bucket: direct_limiter(self.rate, clock),
            clock,
            user: self.users.clone().zip(user),
            close_windows: self.close_windows,
            drops: self.connection.as_ref().map(|c| c.shared::<RateLimitDrops>()).unwrap_or_default(),
            state: Mutex::new(InboundState::default()),
        });
        if let Some(connection) = &self.connection {
            let batch = Arc::clone(&limiter);
            connection.shared::<BatchTokens>().install(move || match batch.admit() {
                None => Ok(()),
                Some(refused) => Err(refused),
            });
        }
        InboundRateLimit { inner, limiter }
    }
}

/// Drops inbound frames beyond the connection's (and user's) rate.
#[derive(Debug, Clone)]
pub struct InboundRateLimit<S> {
    inner: S,
    limiter: Arc<InboundLimiter>,
}

struct InboundLimiter {
    bucket: DirectLimiter,
    clock: TokioClock,
    user: Option<(UserRateLimiter, String)>,
    close_windows: u32,
    drops: Arc<RateLimitDrops>,
    state: Mutex<InboundState>,
}

impl fmt::Debug for InboundLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundLimiter")
            .field("user", &self.user.as_ref().map(|(_, user)| user))
            .field("close_windows", &self.close_windows)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct InboundState {
    last_notice: Option<Nanos>,
    /// Start of the latest one-second window with a drop, and how many consecutive windows
    /// up to it had drops.
    window: Option<Nanos>,
    streak: u32,
}

impl InboundLimiter {
    /// Takes one token; `None` admits, `Some(reply)` drops with what to tell the client.
    fn admit(&self) -> Option<Reply> {
        let now = self.clock.now();
        let wait = match self.bucket.check() {
            Ok(_) => match &self.user {
                Some((users, user)) => users.check(user).err(),
                None => None,
            },
            Err(not_until) => Some(wait_time(&not_until, &self.clock)),
        }?;
        self.drops.inbound.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.streak = match state.window {
            Some(start) if now.duration_since(start) < WINDOW => state.streak,
            Some(start) if now.duration_since(start) < WINDOW + WINDOW => {
                state.window = Some(start + WINDOW);
                state.streak + 1
            }
            _ => {
                state.window = Some(now);
                1
            }
        };
        let mut reply = Reply::none();
        if notice_due(&mut state.last_notice, now) {
            reply.push(rate_limited("inbound", retry_after(wait)));
        }
        if self.close_windows != 0 && state.streak >= self.close_windows {
            tracing::debug!(windows = state.streak, "inbound flood: closing with 4429");
            reply.close = Some((CloseCode::RATE_LIMITED, CLOSE_REASON.to_owned()));
        }
        Some(reply)
    }
}

impl<S> Service<Inbound> for InboundRateLimit<S>
where
    S: Service<Inbound, Response = Reply, Error = BoxError>,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = Either<Ready<Result<Reply, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, inbound: Inbound) -> Self::Future {
        match self.limiter.admit() {
            None => Either::Right(self.inner.call(inbound)),
            Some(refused) => Either::Left(ready_future(Ok(refused))),
        }
    }
}

/// Applies [`OutboundRateLimit`].
#[derive(Debug, Clone)]
pub struct OutboundRateLimitLayer {
    rate: Rate,
    drops: Option<Arc<RateLimitDrops>>,
}

impl OutboundRateLimitLayer {
    /// A bucket of `rate` per connection for its application events.
    pub fn new(rate: Rate) -> Self {
        OutboundRateLimitLayer { rate, drops: None }
    }

    /// Counts dropped events in `connection`'s [`RateLimitDrops`].
    pub fn connection(mut self, connection: &Arc<Connection>) -> Self {
        self.drops = Some(connection.shared::<RateLimitDrops>());
        self
    }
}

impl<S> Layer<S> for OutboundRateLimitLayer
where
    S: Service<Outbound>,
{
    type Service = OutboundRateLimit<S>;

    fn layer(&self, inner: S) -> OutboundRateLimit<S> {
        OutboundRateLimit {
            inner,
            bucket: direct_limiter(self.rate, TokioClock::new()),
            capacity: self.rate.capacity(),
            drops: self.drops.clone().unwrap_or_default(),
            last_warning: None,
            last_notice: None,
            pending: None,
            in_flight: None,
        }
    }
}

/// Drops per-connection application events beyond the connection's rate.
pub struct OutboundRateLimit<S: Service<Outbound>> {
    inner: S,
    bucket: DirectLimiter,
    capacity: u32,
    drops: Arc<RateLimitDrops>,
    last_warning: Option<Nanos>,
    last_notice: Option<Nanos>,
    /// A `rate_limit_warning` waiting for the inner service's next readiness.
    pending: Option<Outbound>,
    /// The call that is sending it.
    in_flight: Option<Pin<Box<S::Future>>>,
}

impl<S: Service<Outbound> + fmt::Debug> fmt::Debug for OutboundRateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundRateLimit")
            .field("inner", &self.inner)
            .field("capacity", &self.capacity)
            .field("drops", &self.drops)
            .field("pending", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether an outbound message is subject to the event limit (PROTOCOL.md §11.1).
fn is_limited(outbound: &Outbound) -> bool {
    match (&outbound.kind, &outbound.body) {
        (OutboundKind::Event, OutboundBody::Envelope(envelope)) => envelope.c != Category::Snapshot,
        (OutboundKind::Event, _) => true,
        _ => false,
    }
}

impl<S> Service<Outbound> for OutboundRateLimit<S>
where
    S: Service<Outbound, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Ready<Result<(), BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // A warning owed from the last event goes out first, with a readiness of its own.
        loop {
            if let Some(sending) = self.in_flight.as_mut() {
                let result = ready!(sending.as_mut().poll(cx));
                self.in_flight = None;
                if let Err(error) = result {
                    tracing::debug!(%error, "rate_limit_warning not sent");
                }
            }
            ready!(self.inner.poll_ready(cx))?;
            match self.pending.take() {
                Some(warning) => self.in_flight = Some(Box::pin(self.inner.call(warning))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }

    fn call(&mut self, outbound: Outbound) -> Self::Future {
        if !is_limited(&outbound) {
            return Either::Right(self.inner.call(outbound));
        }
        let now = self.bucket.clock().now();
        match self.bucket.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // "Fewer than 20 % of capacity remain" (§11.1), in integers.
                if u64::from(remaining) * 5 < u64::from(self.capacity) && notice_due(&mut self.last_warning, now) {
                    let warning = Envelope::new(
                        "rate_limit_warning",
                        json!({
                            "current_rate": self.capacity - remaining.min(self.capacity),
                            "limit": self.capacity,
                            "remaining": remaining,
                            "retry_after": 1.0,
                        }),
                    )
                    .identified();
                    self.pending = Some(Outbound::protocol(warning));
                }
                Either::Right(self.inner.call(outbound))
            }
            Err(not_until) => {
                let dropped = self.drops.outbound.fetch_add(1, Ordering::Relaxed) + 1;
                if notice_due(&mut self.last_notice, now) {
                    // The readiness reserved for the event carries the notice instead.
                    tracing::warn!(dropped, "outbound event rate limit: event dropped, client told RATE_LIMITED");
                    Either::Right(
                        self.inner
                            .call(rate_limited("outbound", retry_after(wait_time(&not_until, self.bucket.clock())))),
                    )
                } else {
                    tracing::debug!(dropped, "outbound event rate limit: event dropped");
                    Either::Left(ready_future(Ok(())))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use tower::ServiceExt;
    use tower_test::mock;
    use wsengine_core::{Frame, WireFormat};
    use wsengine_services::connection::{ConnectionId, Identity};
    use wsengine_services::message::InboundBody;

    fn connection(user: Option<&str>) -> Arc<Connection> {
        let (tx, _rx) = wsengine_services::connection::delivery_channel(1);
        let identity = user.map(Identity::new);
        Arc::new(Connection::new(ConnectionId::new(), identity, WireFormat::Json, tx))
    }

    fn envelope(outbound: &Outbound) -> &Envelope {
        match &outbound.body {
            OutboundBody::Envelope(envelope) => envelope,
            other => panic!("expected an envelope, got {other:?}"),
        }
    }

    fn error_fields(reply: &Reply) -> (String, Value, Value) {
        let error = envelope(&reply.messages[0]);
        assert_eq!(error.t, "error");
        (error.p["code"].as_str().unwrap().to_owned(), error.p["direction"].clone(), error.p["retry_after"].clone())
    }

    /// An inbound service over a mock that answers every request it gets with an empty reply.
    fn inbound_service(
        layer: InboundRateLimitLayer,
    ) -> (InboundRateLimit<mock::Mock<Inbound, Reply>>, mock::Handle<Inbound, Reply>) {
        let (service, handle) = mock::pair::<Inbound, Reply>();
        (layer.layer(service), handle)
    }

    /// Sends one frame; returns the reply and whether it reached the inner service.
    async fn send_frame(
        service: &mut InboundRateLimit<mock::Mock<Inbound, Reply>>,
        handle: &mut mock::Handle<Inbound, Reply>,
    ) -> (Reply, bool) {
        handle.allow(1);
        let call = service.ready().await.unwrap().call(Inbound::frame(Frame::text("{}")));
        let reached = tokio::select! {
            biased;
            request = handle.next_request() => {
                let (_, respond) = request.unwrap();
                respond.send_response(Reply::none());
                true
            }
            _ = std::future::ready(()) => false,
        };
        (call.await.unwrap(), reached)
    }

    #[tokio::test(start_paused = true)]
    async fn inbound_frames_beyond_the_bucket_are_dropped_with_one_notice_per_second() {
        let (mut service, mut handle) = inbound_service(InboundRateLimitLayer::new(Rate::new(3, 1).unwrap()));
        for _ in 0..3 {
            let (reply, reached) = send_frame(&mut service, &mut handle).await;
            assert!(reached && reply.messages.is_empty());
        }
        let (reply, reached) = send_frame(&mut service, &mut handle).await;
        assert!(!reached, "a frame without a token never reaches the stack");
        let (code, direction, retry_after) = error_fields(&reply);
        assert_eq!((code.as_str(), direction), ("RATE_LIMITED", json!("inbound")));
        assert_eq!(retry_after, json!(1.0));
        assert!(reply.close.is_none());
        // Within the same second: dropped silently.
        let (reply, reached) = send_frame(&mut service, &mut handle).await;
        assert!(!reached && reply.messages.is_empty());
        // One token later the frame passes again.
        tokio::time::advance(Duration::from_millis(1000)).await;
        let (reply, reached) = send_frame(&mut service, &mut handle).await;
        assert!(reached && reply.messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_flooding_closes_with_4429_and_a_pause_resets_the_count() {
        let layer = InboundRateLimitLayer::new(Rate::new(1, 1).unwrap()).close_after_windows(3);
        let (mut service, mut handle) = inbound_service(layer);
        assert!(send_frame(&mut service, &mut handle).await.1);
        // Drops in two consecutive windows, then a quiet window: no close.
        for _ in 0..2 {
            let (reply, reached) = send_frame(&mut service, &mut handle).await;
            assert!(!reached && reply.close.is_none());
            let (reply, _) = send_frame(&mut service, &mut handle).await;
            assert!(reply.close.is_none());
            tokio::time::advance(Duration::from_millis(600)).await;
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        // Now three consecutive windows with drops.
        let mut closes = Vec::new();
        for _ in 0..6 {
            send_frame(&mut service, &mut handle).await;
            let (reply, _) = send_frame(&mut service, &mut handle).await;
            closes.push(reply.close.clone());
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        let first_close = closes.iter().position(Option::is_some).expect("closed");
        assert!(first_close >= 3, "closed too early: {closes:?}");
        assert_eq!(closes[first_close], Some((CloseCode::RATE_LIMITED, "Rate limit exceeded".to_owned())));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_windows_never_close() {
        let layer = InboundRateLimitLayer::new(Rate::new(1, 1).unwrap()).close_after_windows(0);
        let (mut service, mut handle) = inbound_service(layer);
        for _ in 0..40 {
            let (reply, _) = send_frame(&mut service, &mut handle).await;
            assert!(reply.close.is_none());
            tokio::time::advance(Duration::from_millis(300)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connections_of_one_user_share_the_user_bucket() {
        let users = UserRateLimiter::new(Rate::new(4, 1).unwrap());
        let layer = InboundRateLimitLayer::new(Rate::new(100, 100).unwrap()).per_user(users.clone());
        let (alice_1, alice_2, bob) = (connection(Some("alice")), connection(Some("alice")), connection(Some("bob")));
        let (mut first, mut first_handle) = inbound_service(layer.clone().connection(&alice_1));
        let (mut second, mut second_handle) = inbound_service(layer.clone().connection(&alice_2));
        let (mut other, mut other_handle) = inbound_service(layer.clone().connection(&bob));
        for _ in 0..2 {
            assert!(send_frame(&mut first, &mut first_handle).await.1);
            assert!(send_frame(&mut second, &mut second_handle).await.1);
        }
        let (reply, reached) = send_frame(&mut second, &mut second_handle).await;
        assert!(!reached);
        assert_eq!(error_fields(&reply).1, json!("inbound"));
        assert!(!send_frame(&mut first, &mut first_handle).await.1);
        assert!(send_frame(&mut other, &mut other_handle).await.1, "another user has a bucket of their own");
        assert_eq!(alice_1.shared::<RateLimitDrops>().inbound(), 1);
        assert_eq!(alice_2.shared::<RateLimitDrops>().inbound(), 1);
        assert_eq!(users.len(), 2);

        // Anonymous connections are not charged to a user bucket.
        let anonymous = connection(None);
        let (mut anon, mut anon_handle) = inbound_service(layer.connection(&anonymous));
        for _ in 0..10 {
            assert!(send_frame(&mut anon, &mut anon_handle).await.1);
        }
        assert_eq!(users.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_users_are_forgotten() {
        let users = UserRateLimiter::new(Rate::new(2, 1).unwrap());
        for n in 0..100 {
            users.check(&format!("user-{n}")).unwrap();
        }
        assert_eq!(users.len(), 100);
        // Still refilling: kept.
        users.retain_recent();
        assert_eq!(users.len(), 100);
        tokio::time::advance(Duration::from_secs(3)).await;
        users.retain_recent();
        assert!(users.is_empty());
        // The periodic sweep does the same without being asked.
        for n in 0..100 {
            users.check(&format!("user-{n}")).unwrap();
        }
        tokio::time::advance(SWEEP_INTERVAL).await;
        users.check(&"someone".to_owned()).unwrap();
        assert_eq!(users.len(), 1, "the sweep left only the user who just sent");
    }

    #[tokio::test(start_paused = true)]
    async fn batch_elements_are_charged_through_the_dispatch_hook() {
        let alice = connection(Some("alice"));
        let layer = InboundRateLimitLayer::new(Rate::new(3, 1).unwrap()).close_after_windows(2).connection(&alice);
        let (mut service, mut handle) = inbound_service(layer);
        assert!(send_frame(&mut service, &mut handle).await.1);
        let tokens = alice.shared::<BatchTokens>();
        assert!(tokens.charge().is_ok());
        assert!(tokens.charge().is_ok());
        let refused = tokens.charge().unwrap_err();
        assert_eq!(error_fields(&refused).0, "RATE_LIMITED");
        assert!(tokens.charge().unwrap_err().messages.is_empty(), "one notice per second");
        tokio::time::advance(Duration::from_millis(1100)).await;
        tokens.charge().unwrap();
        let refused = tokens.charge().unwrap_err();
        assert_eq!(refused.close.map(|(code, _)| code), Some(CloseCode::RATE_LIMITED));
        assert_eq!(alice.shared::<RateLimitDrops>().inbound(), 3);
    }

    /// The outbound layer over a mock that records what reached it.
    fn outbound_service(rate: Rate) -> (OutboundRateLimit<mock::Mock<Outbound, ()>>, mock::Handle<Outbound, ()>) {
        let (service, handle) = mock::pair::<Outbound, ()>();
        (OutboundRateLimitLayer::new(rate).layer(service), handle)
    }

    /// Sends `outbound` and returns the messages that reached the inner service (the call's own
    /// and any owed warning sent during readiness).
    async fn send_outbound(
        service: &mut OutboundRateLimit<mock::Mock<Outbound, ()>>,
        handle: &mut mock::Handle<Outbound, ()>,
        outbound: Outbound,
    ) -> Vec<Outbound> {
        handle.allow(2);
        let mut reached = Vec::new();
        let call = async {
            service.ready().await.unwrap();
            service.call(outbound).await.unwrap();
        };
        let collect = async {
            loop {
                let (message, respond) = handle.next_request().await.unwrap();
                respond.send_response(());
                reached.push(message);
            }
        };
        tokio::select! {
            biased;
            () = call => {}
            () = collect => unreachable!(),
        }
        while let Ok(Some((message, respond))) =
            tokio::time::timeout(Duration::from_millis(1), handle.next_request()).await
        {
            respond.send_response(());
            reached.push(message);
        }
        reached
    }

    fn types(messages: &[Outbound]) -> Vec<String> {
        messages.iter().map(|m| envelope(m).t.clone()).collect()
    }

    fn event(n: u32) -> Outbound {
        Outbound::event(Envelope::new("tick", json!({ "n": n })))
    }

    #[tokio::test(start_paused = true)]
    async fn outbound_events_warn_below_twenty_percent_then_drop_with_one_notice() {
        let (mut service, mut handle) = outbound_service(Rate::new(10, 1).unwrap());
        for n in 0..9 {
            assert_eq!(types(&send_outbound(&mut service, &mut handle, event(n)).await), ["tick"]);
        }
        // The ninth event left one token (10 %): the warning precedes the next message.
        let reached = send_outbound(&mut service, &mut handle, event(9)).await;
        assert_eq!(types(&reached), ["rate_limit_warning", "tick"]);
        let warning = &envelope(&reached[0]).p;
        assert_eq!(*warning, json!({"current_rate": 9, "limit": 10, "remaining": 1, "retry_after": 1.0}));
        assert_eq!(envelope(&reached[0]).c, Category::Wse);
        // Empty: the event is replaced by RATE_LIMITED, then dropped silently for a second.
        let reached = send_outbound(&mut service, &mut handle, event(10)).await;
        assert_eq!(types(&reached), ["error"]);
        assert_eq!(envelope(&reached[0]).p["code"], "RATE_LIMITED");
        assert_eq!(envelope(&reached[0]).p["direction"], "outbound");
        // About a second until the next token (the helper's polling let a few ms pass).
        let retry_after = envelope(&reached[0]).p["retry_after"].as_f64().unwrap();
        assert!(retry_after > 0.9 && retry_after <= 1.0, "{retry_after}");
        assert!(send_outbound(&mut service, &mut handle, event(11)).await.is_empty());
        assert_eq!(service.drops.outbound(), 2);
        // Protocol frames, publications and snapshot events are never limited.
        let mut snapshot = Envelope::new("prices_snapshot", json!({}));
        snapshot.c = Category::Snapshot;
        let publication = Outbound::publication(Arc::new(wsengine_services::publication::Publication::new(
            "t",
            Envelope::new("x", json!({})),
        )));
        for outbound in [Outbound::protocol(Envelope::new("PONG", json!({}))), Outbound::event(snapshot), publication] {
            assert_eq!(send_outbound(&mut service, &mut handle, outbound).await.len(), 1);
        }
        // The bucket refills and events pass again.
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(types(&send_outbound(&mut service, &mut handle, event(12)).await), ["tick"]);
    }

    #[tokio::test]
    async fn inbound_bodies_other_than_frames_are_charged_too() {
        let (mut service, mut handle) = inbound_service(InboundRateLimitLayer::new(Rate::new(1, 1).unwrap()));
        assert!(send_frame(&mut service, &mut handle).await.1);
        let mut message = Inbound::frame(Frame::text("{}"));
        message.body = InboundBody::Encrypted(bytes::Bytes::from_static(b"E:x"));
        handle.allow(1);
        let reply = service.ready().await.unwrap().call(message).await.unwrap();
        assert_eq!(reply.messages.len(), 1);
    }
}
