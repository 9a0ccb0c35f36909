//! A circuit breaker around any `tower::Service`: after too many failures it fails fast for a
//! while instead of calling the service, then lets a few probe calls through to see whether
//! the service has recovered.
//!
//! The state lives in a shared [`CircuitBreaker`] handle, so one breaker can guard one resource
//! (the application handler, the snapshot provider, the bus) across every connection and every
//! service the layer wraps, and can be observed (`/health`) while it runs.
//!
//! - **closed**: calls pass; the outcome of the last `window_size` calls (and only those younger
//!   than `window_duration`) is kept. Once at least `minimum_calls` are in the window and the
//!   share of failures reaches `failure_rate`, the breaker opens.
//! - **open**: calls fail at once with [`CircuitOpen`], which carries `retry_after`, the time
//!   left until the breaker turns half-open. After `open_timeout` it turns half-open.
//! - **half-open**: up to `half_open_probes` calls pass as probes; the others fail fast. When
//!   that many probes have succeeded the breaker closes (with an empty window); one failed
//!   probe opens it again for a full `open_timeout`.
//!
//! Which errors count as failures is the layer's choice ([`CircuitBreakerLayer::failure_if`]);
//! by default every error does. Time is read from the Tokio clock, so tests can pause it.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use wsengine_layers::circuit_breaker::{
//!     BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitBreakerSettings, CircuitOpen,
//! };
//!
//! let settings = CircuitBreakerSettings { minimum_calls: 2, ..CircuitBreakerSettings::default() };
//! let breaker = CircuitBreaker::new("database", settings);
//! let failing = service_fn(|_: ()| async { Err::<(), _>(std::io::Error::other("down")) });
//! let service = CircuitBreakerLayer::new(breaker.clone()).layer(failing);
//!
//! for _ in 0..2 {
//!     assert!(service.clone().oneshot(()).await.is_err());
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! let error = service.clone().oneshot(()).await.unwrap_err();
//! let open = error.downcast_ref::<CircuitOpen>().expect("fails fast");
//! assert!(open.retry_after() <= Duration::from_secs(30));
//! # });
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use wsengine_core::{ErrorCode, ProtocolError};
use wsengine_services::message::BoxError;

/// When a [`CircuitBreaker`] opens and how it recovers.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerSettings {
    /// Share of failed calls in the window (0 < rate ≤ 1) at which the breaker opens. Default 0.5.
    pub failure_rate: f64,
    /// How many of the most recent calls the window holds. Default 20.
    pub window_size: usize,
    /// Calls older than this leave the window. Default 60 s.
    pub window_duration: Duration,
    /// The breaker never opens with fewer calls than this in the window. Default 10.
    pub minimum_calls: usize,
    /// How long the breaker stays open before it lets probes through. Default 30 s.
    pub open_timeout: Duration,
    /// Probe calls let through while half-open; this many successes close the breaker. Default 3.
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        CircuitBreakerSettings {
            failure_rate: 0.5,
            window_size: 20,
            window_duration: Duration::from_secs(60),
            minimum_calls: 10,
            open_timeout: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls pass and their outcomes are counted.
    Closed,
    /// Calls fail fast.
    Open,
    /// A few probe calls pass.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a breaker looks like right now (for health reports and tests).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerStats {
    /// The current state.
    pub state: BreakerState,
    /// Calls in the sliding window (closed state only).
    pub calls: usize,
    /// Failed calls among them.
    pub failures: usize,
    /// Probe calls running now (half-open state only).
    pub probes_in_flight: u32,
    /// Probe calls that succeeded so far (half-open state only).
    pub probe_successes: u32,
    /// How often the breaker has opened since it was created.
    pub times_opened: u64,
    /// Calls refused because the breaker was open or out of probes.
    pub rejected: u64,
    /// While open: the time left until it turns half-open.
    pub retry_after: Option<Duration>,
}

/// The shared state of one circuit breaker; clones observe and drive the same breaker.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: Arc<str>,
    settings: CircuitBreakerSettings,
    state: Mutex<State>,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Bumped on every transition; outcomes of calls admitted in an earlier phase are ignored.
    generation: u64,
    /// (finished at, failed) of the most recent calls, oldest first.
    window: VecDeque<(Instant, bool)>,
    failures: usize,
    times_opened: u64,
    rejected: u64,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("settings", &self.shared.settings)
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker. `name` shows in errors and logs. Out-of-range settings are clamped:
    /// the window and the probe count hold at least one call, the failure rate lies in (0, 1].
    pub fn new(name: impl Into<Arc<str>>, mut settings: CircuitBreakerSettings) -> Self {
        settings.window_size = settings.window_size.max(1);
        settings.minimum_calls = settings.minimum_calls.clamp(1, settings.window_size);
        settings.half_open_probes = settings.half_open_probes.max(1);
        if !(settings.failure_rate > 0.0 && settings.failure_rate <= 1.0) {
            settings.failure_rate = 1.0;
        }
        let state = State {
            phase: Phase::Closed,
            generation: 0,
            window: VecDeque::with_capacity(settings.window_size.min(1024)),
            failures: 0,
            times_opened: 0,
            rejected: 0,
        };
        CircuitBreaker { shared: Arc::new(Shared { name: name.into(), settings, state: Mutex::new(state) }) }
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The settings in force (after clamping).
    pub fn settings(&self) -> &CircuitBreakerSettings {
        &self.shared.settings
    }

    /// The current state; an open breaker whose timeout has passed reports half-open.
    pub fn state(&self) -> BreakerState {
        self.stats().state
    }

    /// State and counters.
    pub fn stats(&self) -> BreakerStats {
        let now = Instant::now();
        let mut state = self.lock();
        self.refresh(&mut state, now);
        let (probes_in_flight, probe_successes) = match state.phase {
            Phase::HalfOpen { in_flight, successes } => (in_flight, successes),
            _ => (0, 0),
        };
        BreakerStats {
            state: state.phase.public(),
            calls: state.window.len(),
            failures: state.failures,
            probes_in_flight,
            probe_successes,
            times_opened: state.times_opened,
            rejected: state.rejected,
            retry_after: match state.phase {
                Phase::Open { until } => Some(until.saturating_duration_since(now)),
                _ => None,
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a few field writes.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the time-driven transitions: open → half-open, and ageing of the window.
    fn refresh(&self, state: &mut State, now: Instant) {
        if let Phase::Open { until } = state.phase {
            if now >= until {
                state.phase = Phase::HalfOpen { in_flight: 0, successes: 0 };
                state.generation += 1;
                tracing::info!(breaker = %self.shared.name, "circuit breaker half-open");
            }
        }
        let max_age = self.shared.settings.window_duration;
        while let Some(&(at, failed)) = state.window.front() {
            if now.saturating_duration_since(at) < max_age {
                break;
            }
            state.window.pop_front();
            state.failures -= usize::from(failed);
        }
    }

    /// Admits a call or refuses it with the time to wait.
    fn admit(&self) -> Result<Permit, CircuitOpen> {
        let mut state = self.lock();
        // Closed is the common case and needs no clock: the window ages when outcomes arrive.
        if let Phase::Closed = state.phase {
            return Ok(Permit::new(self, state.generation, false));
        }
        let now = Instant::now();
        self.refresh(&mut state, now);
        let generation = state.generation;
        let probes = self.shared.settings.half_open_probes;
        let refusal = match &mut state.phase {
            Phase::Closed => return Ok(Permit::new(self, generation, false)),
            Phase::HalfOpen { in_flight, successes } if *in_flight + *successes < probes => {
                *in_flight += 1;
                return Ok(Permit::new(self, generation, true));
            }
            // Out of probes: the answer to the running probes is near, so no wait is known.
            Phase::HalfOpen { .. } => Duration::ZERO,
            Phase::Open { until } => until.saturating_duration_since(now),
        };
        state.rejected += 1;
        Err(CircuitOpen { breaker: Arc::clone(&self.shared.name), retry_after: refusal })
    }

    fn open(&self, state: &mut State, now: Instant) {
        state.phase = Phase::Open { until: now + self.shared.settings.open_timeout };
        state.generation += 1;
        state.times_opened += 1;
        state.window.clear();
        state.failures = 0;
        tracing::warn!(breaker = %self.shared.name, "circuit breaker open");
    }

    fn record(&self, generation: u64, probe: bool, failed: bool) {
        let now = Instant::now();
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        let settings = &self.shared.settings;
        match &mut state.phase {
            Phase::Closed => {
                if state.window.len() >= settings.window_size {
                    if let Some((_, old_failed)) = state.window.pop_front() {
                        state.failures -= usize::from(old_failed);
                    }
                }
                state.window.push_back((now, failed));
                state.failures += usize::from(failed);
                self.refresh(&mut state, now);
                let calls = state.window.len();
                #[allow(clippy::cast_precision_loss)] // window sizes are far below 2^52
                let rate = state.failures as f64 / calls.max(1) as f64;
                if calls >= settings.minimum_calls && rate >= settings.failure_rate {
                    self.open(&mut state, now);
                }
            }
            Phase::HalfOpen { in_flight, successes } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if failed {
                    self.open(&mut state, now);
                } else {
                    *successes += 1;
                    if *successes >= settings.half_open_probes {
                        state.phase = Phase::Closed;
                        state.generation += 1;
                        tracing::info!(breaker = %self.shared.name, "circuit breaker closed");
                    }
                }
            }
            _ => {}
        }
    }

    fn release_probe(&self, generation: u64) {
        let mut state = self.lock();
        if state.generation == generation {
            if let Phase::HalfOpen { in_flight, .. } = &mut state.phase {
                *in_flight = in_flight.saturating_sub(1);
            }
        }
    }
}

impl Phase {
    fn public(&self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// An admitted call. Dropped without an outcome (the caller gave up on the call), it frees its
/// probe slot without counting.
struct Permit {
    breaker: CircuitBreaker,
    generation: u64,
    probe: bool,
    settled: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("generation", &self.generation).field("probe", &self.probe).finish()
    }
}

impl Permit {
    fn new(breaker: &CircuitBreaker, generation: u64, probe: bool) -> Self {
        Permit { breaker: breaker.clone(), generation, probe, settled: false }
    }

    fn settle(mut self, failed: bool) {
        self.settled = true;
        self.breaker.record(self.generation, self.probe, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.release_probe(self.generation);
        }
    }
}

/// The error of a call refused by an open (or fully probed half-open) breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    breaker: Arc<str>,
    retry_after: Duration,
}

impl CircuitOpen {
    /// A refusal by the breaker `breaker`, to retry after `retry_after`; for code that reports
    /// a refusal it learned of another way.
    pub fn new(breaker: &str, retry_after: Duration) -> Self {
        CircuitOpen { breaker: breaker.into(), retry_after }
    }

    /// The name of the breaker that refused the call.
    pub fn breaker(&self) -> &str {
        &self.breaker
    }

    /// Time until the breaker turns half-open (zero while half-open with every probe running).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The `CIRCUIT_BREAKER_OPEN` error frame of PROTOCOL.md §12.2. `p.retry_after` is in whole
    /// seconds, rounded up and at least 1, so a client never retries in a tight loop.
    pub fn to_protocol_error(&self) -> ProtocolError {
        let seconds = self.retry_after.as_secs_f64().ceil().max(1.0);
        ProtocolError::new(ErrorCode::CircuitBreakerOpen, "Service temporarily unavailable, retry later")
            .with_field("retry_after", seconds.into())
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit breaker {} is open; retry after {:.3} s", self.breaker, self.retry_after.as_secs_f64())
    }
}

impl std::error::Error for CircuitOpen {}

impl From<CircuitOpen> for ProtocolError {
    fn from(open: CircuitOpen) -> Self {
        open.to_protocol_error()
    }
}

/// Replaces a [`CircuitOpen`] error by its `CIRCUIT_BREAKER_OPEN` [`ProtocolError`], so that it
/// reaches the client as that frame; other errors pass unchanged.
pub fn open_as_protocol_error(error: BoxError) -> BoxError {
    match error.downcast_ref::<CircuitOpen>() {
        Some(open) => open.to_protocol_error().into(),
        None => error,
    }
}

type FailurePredicate = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;

/// Applies a [`CircuitBreaker`] to services; every service it makes shares the one breaker.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    breaker: CircuitBreaker,
    is_failure: Option<FailurePredicate>,
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .field("custom_failure_rule", &self.is_failure.is_some())
            .finish()
    }
}

impl CircuitBreakerLayer {
    /// A layer guarding its services with `breaker`.
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer { breaker, is_failure: None }
    }

    /// Counts only the errors for which `is_failure` is true as failures; the others count as
    /// successes (the service answered, e.g. with a client error). Default: every error.
    pub fn failure_if(mut self, is_failure: impl Fn(&BoxError) -> bool + Send + Sync + 'static) -> Self {
        self.is_failure = Some(Arc::new(is_failure));
        self
    }

    /// The breaker, for observing it.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreakerService<S>;

    fn layer(&self, inner: S) -> CircuitBreakerService<S> {
        CircuitBreakerService { inner, breaker: self.breaker.clone(), is_failure: self.is_failure.clone() }
    }
}

/// A service guarded by a [`CircuitBreaker`]; errors are boxed, refusals are [`CircuitOpen`].
#[derive(Clone)]
pub struct CircuitBreakerService<S> {
    inner: S,
    breaker: CircuitBreaker,
    is_failure: Option<FailurePredicate>,
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreakerService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService").field("inner", &self.inner).field("breaker", &self.breaker).finish()
    }
}

impl<S> CircuitBreakerService<S> {
    /// The breaker, for observing it.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

impl<S, R> Service<R> for CircuitBreakerService<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = CircuitBreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self.breaker.admit() {
            Ok(permit) => CircuitBreakerFuture {
                inner: Some(self.inner.call(request)),
                permit: Some(permit),
                refusal: None,
                is_failure: self.is_failure.clone(),
            },
            Err(open) => CircuitBreakerFuture { inner: None, permit: None, refusal: Some(open), is_failure: None },
        }
    }
}

pin_project! {
    /// Response future of [`CircuitBreakerService`].
    pub struct CircuitBreakerFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<Permit>,
        refusal: Option<CircuitOpen>,
        is_failure: Option<FailurePredicate>,
    }
}

impl<F> fmt::Debug for CircuitBreakerFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerFuture").field("refusal", &self.refusal).finish_non_exhaustive()
    }
}

impl<F, T, E> Future for CircuitBreakerFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let open = this.refusal.take().expect("CircuitBreakerFuture polled after completion");
            return Poll::Ready(Err(open.into()));
        };
        let result = ready!(inner.poll(cx)).map_err(Into::into);
        let failed = match &result {
            Ok(_) => false,
            Err(error) => this.is_failure.as_ref().is_none_or(|is_failure| is_failure(error)),
        };
        if let Some(permit) = this.permit.take() {
            permit.settle(failed);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;
    use tower::util::BoxCloneService;
    use tower_test::mock;

    fn settings() -> CircuitBreakerSettings {
        CircuitBreakerSettings {
            failure_rate: 0.5,
            window_size: 4,
            window_duration: Duration::from_secs(60),
            minimum_calls: 4,
            open_timeout: Duration::from_secs(10),
            half_open_probes: 2,
        }
    }

    /// A service that fails when asked to (`true` = fail).
    fn flaky(breaker: &CircuitBreaker) -> BoxCloneService<bool, (), BoxError> {
        BoxCloneService::new(CircuitBreakerLayer::new(breaker.clone()).layer(tower::service_fn(
            |fail: bool| async move { if fail { Err::<(), BoxError>("boom".into()) } else { Ok(()) } },
        )))
    }

    async fn run<S>(service: &S, fail: bool) -> Result<(), BoxError>
    where
        S: Service<bool, Response = (), Error = BoxError> + Clone,
    {
        service.clone().oneshot(fail).await
    }

    fn is_open(result: &Result<(), BoxError>) -> bool {
        matches!(result, Err(e) if e.is::<CircuitOpen>())
    }

    #[tokio::test(start_paused = true)]
    async fn closed_stays_closed_below_the_minimum_calls() {
        let breaker = CircuitBreaker::new("t", settings());
        let service = flaky(&breaker);
        for _ in 0..3 {
            assert!(!is_open(&run(&service, true).await));
        }
        let stats = breaker.stats();
        assert_eq!((stats.state, stats.calls, stats.failures), (BreakerState::Closed, 3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_opens_at_the_failure_rate() {
        let breaker = CircuitBreaker::new("t", settings());
        let service = flaky(&breaker);
        for fail in [false, true, false] {
            run(&service, fail).await.ok();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        run(&service, true).await.ok(); // 2 of 4 failed = 0.5
        let stats = breaker.stats();
        assert_eq!(stats.state, BreakerState::Open);
        assert_eq!(stats.times_opened, 1);
        assert_eq!(stats.retry_after, Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_over_the_last_calls() {
        let breaker = CircuitBreaker::new("t", settings());
        let service = flaky(&breaker);
        // f s s s s: when the fifth call arrives the first failure leaves the window.
        for fail in [true, false, false, false, false, true] {
            run(&service, fail).await.ok();
        }
        let stats = breaker.stats();
        assert_eq!((stats.state, stats.calls, stats.failures), (BreakerState::Closed, 4, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn old_calls_age_out_of_the_window() {
        let breaker = CircuitBreaker::new("t", settings());
        let service = flaky(&breaker);
        for _ in 0..3 {
            run(&service, true).await.ok();
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(breaker.stats().calls, 0);
        run(&service, true).await.ok();
        assert_eq!(breaker.state(), BreakerState::Closed, "one recent failure is below the minimum");
    }

    #[tokio::test(start_paused = true)]
    async fn open_fails_fast_with_retry_after_and_does_not_call_the_service() {
        let breaker = CircuitBreaker::new("t", settings());
        let (service, mut handle) = mock::pair::<(), ()>();
        let mut service = CircuitBreakerLayer::new(breaker.clone()).layer(service);
        handle.allow(4);
        for _ in 0..4 {
            let call = tokio::spawn({
                let mut service = service.clone();
                async move { service.ready().await?.call(()).await }
            });
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_error(std::io::Error::other("down"));
            assert!(call.await.unwrap().is_err());
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(4)).await;
        handle.allow(1);
        let error = service.ready().await.unwrap().call(()).await.unwrap_err();
        let open = error.downcast_ref::<CircuitOpen>().unwrap();
        assert_eq!(open.retry_after(), Duration::from_secs(6));
        assert_eq!(open.breaker(), "t");
        assert_eq!(breaker.stats().rejected, 1);
        // Nothing reached the inner service.
        assert!(tokio::time::timeout(Duration::from_millis(1), handle.next_request()).await.is_err());
        let frame = open.to_protocol_error().to_envelope();
        assert_eq!(frame.p["code"], "CIRCUIT_BREAKER_OPEN");
        assert_eq!(frame.p["retry_after"], 6.0);
    }

    async fn tripped() -> (CircuitBreaker, BoxCloneService<bool, (), BoxError>) {
        let breaker = CircuitBreaker::new("t", settings());
        let service = flaky(&breaker);
        for _ in 0..4 {
            run(&service, true).await.ok();
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        (breaker, service)
    }

    #[tokio::test(start_paused = true)]
    async fn open_turns_half_open_after_the_timeout() {
        let (breaker, _service) = tripped().await;
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(breaker.stats().retry_after, None);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_closes_after_enough_probe_successes() {
        let (breaker, service) = tripped().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        run(&service, false).await.unwrap();
        let stats = breaker.stats();
        assert_eq!((stats.state, stats.probe_successes), (BreakerState::HalfOpen, 1));
        run(&service, false).await.unwrap();
        let stats = breaker.stats();
        assert_eq!((stats.state, stats.calls, stats.failures), (BreakerState::Closed, 0, 0));
        // Closed again with a fresh window: one failure does not reopen it.
        run(&service, true).await.ok();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_reopens_on_a_probe_failure() {
        let (breaker, service) = tripped().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        run(&service, false).await.unwrap();
        assert!(!is_open(&run(&service, true).await), "the probe itself reaches the service");
        let stats = breaker.stats();
        assert_eq!(stats.state, BreakerState::Open);
        assert_eq!(stats.times_opened, 2);
        assert_eq!(stats.retry_after, Some(Duration::from_secs(10)), "a full timeout again");
        assert!(is_open(&run(&service, false).await));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_only_the_probe_count() {
        let breaker = CircuitBreaker::new("t", settings());
        let (service, mut handle) = mock::pair::<(), ()>();
        let service = CircuitBreakerLayer::new(breaker.clone()).layer(service);
        handle.allow(100);
        for _ in 0..4 {
            let call = tokio::spawn(service.clone().oneshot(()));
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_error(std::io::Error::other("down"));
            call.await.unwrap().ok();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let first = tokio::spawn(service.clone().oneshot(()));
        let second = tokio::spawn(service.clone().oneshot(()));
        let (_, respond_first) = handle.next_request().await.unwrap();
        let (_, respond_second) = handle.next_request().await.unwrap();
        assert_eq!(breaker.stats().probes_in_flight, 2);
        let third = service.clone().oneshot(()).await.unwrap_err();
        assert_eq!(third.downcast_ref::<CircuitOpen>().unwrap().retry_after(), Duration::ZERO);
        assert_eq!(third.downcast_ref::<CircuitOpen>().unwrap().to_protocol_error().fields()[0].1, 1.0);
        respond_first.send_response(());
        respond_second.send_response(());
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot() {
        let breaker = CircuitBreaker::new("t", CircuitBreakerSettings { half_open_probes: 1, ..settings() });
        let (service, mut handle) = mock::pair::<(), ()>();
        let service = CircuitBreakerLayer::new(breaker.clone()).layer(service);
        handle.allow(100);
        for _ in 0..4 {
            let call = tokio::spawn(service.clone().oneshot(()));
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_error(std::io::Error::other("down"));
            call.await.unwrap().ok();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = tokio::spawn(service.clone().oneshot(()));
        let _request = handle.next_request().await.unwrap();
        assert_eq!(breaker.stats().probes_in_flight, 1);
        probe.abort();
        assert!(probe.await.unwrap_err().is_cancelled());
        assert_eq!(breaker.stats().probes_in_flight, 0);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_the_rule_excludes_count_as_successes() {
        let breaker = CircuitBreaker::new("t", settings());
        let service = CircuitBreakerLayer::new(breaker.clone()).failure_if(|error| !error.is::<ProtocolError>()).layer(
            tower::service_fn(|_: ()| async {
                Err::<(), BoxError>(ProtocolError::new(ErrorCode::InvalidRequest, "client mistake").into())
            }),
        );
        for _ in 0..10 {
            assert!(service.clone().oneshot(()).await.is_err());
        }
        let stats = breaker.stats();
        assert_eq!((stats.state, stats.failures), (BreakerState::Closed, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn one_breaker_is_shared_by_every_service_of_the_layer() {
        let breaker = CircuitBreaker::new("t", settings());
        let layer = CircuitBreakerLayer::new(breaker.clone());
        let failing = layer.layer(tower::service_fn(|_: ()| async { Err::<(), BoxError>("down".into()) }));
        let healthy = layer.layer(tower::service_fn(|_: ()| async { Ok::<(), BoxError>(()) }));
        for _ in 0..4 {
            failing.clone().oneshot(()).await.ok();
        }
        let error = healthy.clone().oneshot(()).await.unwrap_err();
        assert!(error.is::<CircuitOpen>());
        assert!(open_as_protocol_error(error).is::<ProtocolError>());
        assert!(!open_as_protocol_error("other".into()).is::<ProtocolError>());
    }

    #[test]
    fn settings_are_clamped() {
        let breaker = CircuitBreaker::new(
            "t",
            CircuitBreakerSettings {
                failure_rate: 0.0,
                window_size: 0,
                minimum_calls: 50,
                half_open_probes: 0,
                ..CircuitBreakerSettings::default()
            },
        );
        let s = breaker.settings();
        assert_eq!((s.failure_rate, s.window_size, s.minimum_calls, s.half_open_probes), (1.0, 1, 1, 1));
        assert_eq!(BreakerState::HalfOpen.to_string(), "half_open");
    }
}
