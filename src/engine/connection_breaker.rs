//! The per-connection circuit breaker of PROTOCOL.md §12.1 (feature `circuit_breaker`, config
//! `connection_breaker*`): a connection whose handler calls keep failing is closed with 1011.
//!
//! It is dispatch's [`HandlerGuard`]: each connection gets the generic [`CircuitBreaker`] at its
//! first handler failure (idle and healthy connections carry none), and the breaker opening
//! means "close this connection": the failing call is answered with a final `SERVER_ERROR`
//! ("Too many handler failures") and close 1011. Only errors that reach the client as
//! `SERVER_ERROR` count; other protocol answers, including the engine-wide breakers'
//! `CIRCUIT_BREAKER_OPEN`, are deliberate replies.
//!
//! ```no_run
//! # fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = wsengine::Config {
//!     connection_breaker_min_calls: 5,
//!     connection_breaker_failure_rate: 0.8,
//!     ..wsengine::Config::default()
//! };
//! let engine = wsengine::Engine::builder(config).build()?;
//! # let _ = engine; Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use wsengine_core::Envelope;
use wsengine_layers::circuit_breaker::{CircuitBreaker, CircuitBreakerSettings};
use wsengine_services::connection::ConnectionId;
use wsengine_services::dispatch::HandlerGuard;

use crate::config::Config;

/// The per-connection breaker as dispatch's handler guard, when `connection_breaker` is on.
pub(super) fn connection_breakers(config: &Config) -> Option<Arc<dyn HandlerGuard>> {
    config.connection_breaker.then(|| {
        let settings = CircuitBreakerSettings {
            failure_rate: config.connection_breaker_failure_rate,
            window_size: config.connection_breaker_window,
            window_duration: config.connection_breaker_window_duration,
            minimum_calls: config.connection_breaker_min_calls,
            // Never reached: the connection closes as soon as its breaker opens.
            open_timeout: Duration::from_secs(3600),
            half_open_probes: 1,
        };
        Arc::new(ConnectionBreakers { name: Arc::from(CONNECTION_BREAKER), settings }) as Arc<dyn HandlerGuard>
    })
}

/// Whether a handler error counts against the connection: anything that reaches the client as
/// `SERVER_ERROR`. Other protocol answers (`INVALID_REQUEST`, the engine-wide breakers'
/// `CIRCUIT_BREAKER_OPEN`) are the handler's or the engine's deliberate replies.
fn is_handler_failure(error: &wsengine_services::message::BoxError) -> bool {
    error
        .downcast_ref::<wsengine_core::ProtocolError>()
        .is_none_or(|answer| answer.code() == wsengine_core::ErrorCode::ServerError)
}

/// The name of every per-connection breaker (in logs).
const CONNECTION_BREAKER: &str = "connection";

/// Gives each connection that fails in the handler a [`CircuitBreaker`] of its own and closes
/// the connection with 1011 when it opens.
struct ConnectionBreakers {
    name: Arc<str>,
    settings: CircuitBreakerSettings,
}

/// A connection's breaker (as the layer that applies it), created at its first handler
/// failure: most connections never fail, and an idle one must stay small.
#[derive(Default)]
struct ConnectionBreaker(std::sync::OnceLock<wsengine_layers::circuit_breaker::CircuitBreakerLayer>);

type HandlerCall =
    futures_util::future::BoxFuture<'static, Result<Vec<Envelope>, wsengine_services::message::BoxError>>;

impl HandlerGuard for ConnectionBreakers {
    fn guard(&self, connection: &wsengine_services::connection::Connection, call: HandlerCall) -> HandlerCall {
        use futures_util::FutureExt;

        let id = connection.id();
        let slot = connection.shared::<ConnectionBreaker>();
        if let Some(breaker) = slot.0.get() {
            return Box::pin(through(breaker, id, call));
        }
        let name = Arc::clone(&self.name);
        let settings = self.settings.clone();
        Box::pin(call.then(move |answer| -> HandlerCall {
            match answer {
                Err(error) if is_handler_failure(&error) => {
                    // Calls of one connection run one at a time, so nobody raced us to the slot.
                    let breaker = slot.0.get_or_init(|| {
                        wsengine_layers::circuit_breaker::CircuitBreakerLayer::new(CircuitBreaker::new(name, settings))
                            .failure_if(is_handler_failure)
                    });
                    Box::pin(through(breaker, id, Box::pin(std::future::ready(Err(error)))))
                }
                answer => Box::pin(std::future::ready(answer)),
            }
        }))
    }
}

/// The service whose requests are handler calls to run, so that the breaker's layer can wrap
/// them.
#[derive(Clone, Copy)]
struct RunCall;

impl tower::Service<HandlerCall> for RunCall {
    type Response = Vec<Envelope>;
    type Error = wsengine_services::message::BoxError;
    type Future = HandlerCall;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: HandlerCall) -> HandlerCall {
        call
    }
}

/// Runs `call` through the connection's breaker (which counts its outcome, or refuses it when
/// open); once the breaker is open, the answer is the final `SERVER_ERROR` and close 1011.
fn through(
    breaker: &wsengine_layers::circuit_breaker::CircuitBreakerLayer,
    connection: ConnectionId,
    call: HandlerCall,
) -> impl std::future::Future<Output = Result<Vec<Envelope>, wsengine_services::message::BoxError>> + Send + 'static {
    use futures_util::FutureExt;
    use tower::{Layer, Service};

    let mut service = breaker.layer(RunCall);
    // No poll_ready: RunCall is always ready, and the breaker refuses in `call`, not before.
    let breaker = breaker.breaker().clone();
    service.call(call).map(move |answer| answer.map_err(|error| verdict(&breaker, connection, error)))
}

/// The error a failed call answers with: its own while the connection's breaker is closed,
/// the closing `SERVER_ERROR` once it is open (this call tripped it, or it refused the call).
fn verdict(
    breaker: &CircuitBreaker,
    connection: ConnectionId,
    error: wsengine_services::message::BoxError,
) -> wsengine_services::message::BoxError {
    use wsengine_core::codes::CloseCode;
    use wsengine_core::{ErrorCode, ProtocolError};
    use wsengine_layers::circuit_breaker::{BreakerState, CircuitOpen};

    if breaker.state() == BreakerState::Closed {
        return error;
    }
    if !error.is::<CircuitOpen>() {
        tracing::warn!(%connection, last_error = %error, "too many handler failures; closing the connection with 1011");
    }
    ProtocolError::new(ErrorCode::ServerError, "Too many handler failures")
        .closing(CloseCode::INTERNAL, "too many handler failures")
        .into()
}
