//! Circuit breakers around the engine's hooks and the bus, and the dead-letter queue.
//!
//! Three engine-wide breakers (feature `circuit_breaker`, config `circuit_breaker*`) guard
//! shared resources: `handler` (application messages), `snapshot` (the snapshot provider) and
//! `publish` (the bus publish of [`Engine::publish`]). They wrap the hooks, not the inbound
//! stack, so protocol traffic (`ping`, subscriptions, publications) never meets them; while
//! one is open its callers get `CIRCUIT_BREAKER_OPEN` and their connections stay open.
//!
//! A per-connection breaker (config `connection_breaker*`, same cargo feature) watches each
//! connection's own handler calls, through dispatch's [`HandlerGuard`] hook: when a
//! connection's application messages keep failing in the handler, the failing call's answer
//! becomes a final `SERVER_ERROR` ("Too many handler failures") and the connection is closed
//! with 1011 (PROTOCOL.md §12.1). It is the generic [`CircuitBreaker`] whose opening means
//! "close this connection"; it is created at the connection's first handler failure, so idle
//! and healthy connections carry none. Protocol answers (`ProtocolError`s other than
//! `SERVER_ERROR`, including `CIRCUIT_BREAKER_OPEN` from the engine-wide breakers, which are
//! the engine's own back-off) do not count as failures.
//!
//! Failed publishes and handler failures go to the dead-letter store, which
//! [`Engine::dead_letters`] lists and [`Engine::replay_dead_letters`] replays.
//!
//! ```no_run
//! # async fn example(engine: wsengine::Engine) -> Result<(), Box<dyn std::error::Error>> {
//! use wsengine::services::dlq::{DeadLetterFilter, DeadLetterQuery};
//!
//! let page = engine.dead_letters(DeadLetterQuery::new(DeadLetterFilter::topic("prices"))).await?;
//! println!("{} failed publications to prices", page.entries.len());
//! let report = engine.replay_dead_letters(DeadLetterFilter::topic("prices")).await?;
//! println!("replayed {}, still failing {}", report.replayed, report.failed);
//! println!("{:?}", engine.health().circuit_breakers);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use wsengine_core::{Category, Envelope};
use wsengine_services::bus::PublishReport;
use wsengine_services::connection::{ConnectionId, Delivery};
use wsengine_services::dispatch::HandlerGuard;
use wsengine_services::dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterLimits, DeadLetterOnFailure, DeadLetterPage, DeadLetterQuery,
    DeadLetterSource, DeadLetterStore, DlqError, MemoryDeadLetters, NewDeadLetter, ReplayReport,
};
use wsengine_services::handler::{AppBody, AppMessage, Handler, SnapshotProvider};
use wsengine_services::publication::Publication;

use super::{Engine, SendError, check_type};
use crate::config::Config;

#[cfg(feature = "circuit_breaker")]
use wsengine_layers::circuit_breaker::{CircuitBreaker, CircuitBreakerSettings};

/// One circuit breaker as `/health` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BreakerHealth {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Calls in the sliding window.
    pub calls: usize,
    /// Failed calls among them.
    pub failures: usize,
    /// How often the breaker has opened.
    pub times_opened: u64,
    /// Calls refused while open.
    pub rejected: u64,
    /// While open: seconds until probe calls are let through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

/// The engine's breakers and dead-letter store.
pub(super) struct Resilience {
    pub(super) dead_letters: Arc<dyn DeadLetterStore>,
    /// The guarded handler without dead-letter recording, for replays.
    replay_handler: Arc<dyn Handler>,
    #[cfg(feature = "circuit_breaker")]
    breakers: Vec<CircuitBreaker>,
    #[cfg(feature = "circuit_breaker")]
    publish_breaker: Option<CircuitBreaker>,
}

/// What [`Resilience::wrap`] hands to dispatch.
pub(super) struct Hooks {
    pub(super) handler: Arc<dyn Handler>,
    pub(super) snapshots: Option<Arc<dyn SnapshotProvider>>,
    /// The per-connection breaker, when `connection_breaker` is on.
    pub(super) handler_guard: Option<Arc<dyn HandlerGuard>>,
}

impl Resilience {
    /// Puts the configured breakers around the hooks and dead-letter recording around the
    /// handler.
    pub(super) fn wrap(
        config: &Config,
        handler: Arc<dyn Handler>,
        snapshots: Option<Arc<dyn SnapshotProvider>>,
        store: Option<Arc<dyn DeadLetterStore>>,
    ) -> (Hooks, Resilience) {
        let dead_letters = store.unwrap_or_else(|| {
            Arc::new(MemoryDeadLetters::new(DeadLetterLimits {
                max_per_topic: config.dlq_max_per_topic,
                max_entries: config.dlq_max_entries,
                ttl: config.dlq_ttl,
            }))
        });
        #[cfg(feature = "circuit_breaker")]
        let (handler, snapshots, breakers, publish_breaker) = guard(config, handler, snapshots);
        let replay_handler = Arc::clone(&handler);
        let handler: Arc<dyn Handler> = if config.dlq_handler_failures {
            Arc::new(DeadLetterOnFailure::new(handler, Arc::clone(&dead_letters)))
        } else {
            handler
        };
        let resilience = Resilience {
            dead_letters,
            replay_handler,
            #[cfg(feature = "circuit_breaker")]
            breakers,
            #[cfg(feature = "circuit_breaker")]
            publish_breaker,
        };
        #[cfg(feature = "circuit_breaker")]
        let handler_guard = super::connection_breaker::connection_breakers(config);
        #[cfg(not(feature = "circuit_breaker"))]
        let handler_guard = None;
        (Hooks { handler, snapshots, handler_guard }, resilience)
    }

    /// Every breaker by name.
    pub(super) fn health(&self) -> BTreeMap<String, BreakerHealth> {
        #[cfg(feature = "circuit_breaker")]
        {
            self.breakers
                .iter()
                .map(|breaker| {
                    let stats = breaker.stats();
                    let health = BreakerHealth {
                        state: stats.state.as_str(),
                        calls: stats.calls,
                        failures: stats.failures,
                        times_opened: stats.times_opened,
                        rejected: stats.rejected,
                        retry_after_seconds: stats.retry_after.map(|d| d.as_secs_f64()),
                    };
                    (breaker.name().to_owned(), health)
                })
                .collect()
        }
        #[cfg(not(feature = "circuit_breaker"))]
        BTreeMap::new()
    }
}

#[cfg(feature = "circuit_breaker")]
type Guarded = (Arc<dyn Handler>, Option<Arc<dyn SnapshotProvider>>, Vec<CircuitBreaker>, Option<CircuitBreaker>);

/// Wraps the handler and the snapshot provider in their breakers and makes the publish breaker.
#[cfg(feature = "circuit_breaker")]
fn guard(config: &Config, handler: Arc<dyn Handler>, snapshots: Option<Arc<dyn SnapshotProvider>>) -> Guarded {
    use tower::ServiceBuilder;
    use wsengine_core::ProtocolError;
    use wsengine_layers::circuit_breaker::{CircuitBreakerLayer, open_as_protocol_error};
    use wsengine_services::handler::{HandlerService, ServiceHandler, ServiceSnapshotProvider, SnapshotService};

    if !config.circuit_breaker {
        return (handler, snapshots, Vec::new(), None);
    }
    let settings = CircuitBreakerSettings {
        failure_rate: config.circuit_breaker_failure_rate,
        window_size: config.circuit_breaker_window,
        window_duration: config.circuit_breaker_window_duration,
        minimum_calls: config.circuit_breaker_min_calls,
        open_timeout: config.circuit_breaker_open_timeout,
        half_open_probes: config.circuit_breaker_half_open_probes,
    };
    // A ProtocolError is the hook's deliberate answer to the client (e.g. "no handler for this
    // type"), not a sign that the resource behind it is failing.
    let is_failure = |error: &wsengine_services::message::BoxError| !error.is::<ProtocolError>();
    let mut breakers = Vec::new();

    let handler_breaker = CircuitBreaker::new("handler", settings.clone());
    let raw = handler.accepts_raw();
    let service = ServiceBuilder::new()
        .map_err(open_as_protocol_error)
        .layer(CircuitBreakerLayer::new(handler_breaker.clone()).failure_if(is_failure))
        .map_err(publish_open_as_protocol_error)
        .service(HandlerService::new(handler));
    let handler: Arc<dyn Handler> = Arc::new(ServiceHandler::new(service, raw));
    breakers.push(handler_breaker);

    let snapshots = snapshots.map(|provider| {
        let snapshot_breaker = CircuitBreaker::new("snapshot", settings.clone());
        let service = ServiceBuilder::new()
            .map_err(open_as_protocol_error)
            .layer(CircuitBreakerLayer::new(snapshot_breaker.clone()).failure_if(is_failure))
            .service(SnapshotService::new(provider));
        breakers.push(snapshot_breaker);
        Arc::new(ServiceSnapshotProvider::new(service)) as Arc<dyn SnapshotProvider>
    });

    let publish_breaker = CircuitBreaker::new("publish", settings);
    breakers.push(publish_breaker.clone());
    (handler, snapshots, breakers, Some(publish_breaker))
}

/// A handler that failed because [`Engine::publish`] met the open publish breaker answers the
/// client with `CIRCUIT_BREAKER_OPEN` (PROTOCOL.md §12.2: "or the bus publish it needs"). As a
/// `ProtocolError` it does not count against the handler's breaker, and it is not recorded as
/// a handler failure: the publication itself is already in the dead-letter queue.
#[cfg(feature = "circuit_breaker")]
fn publish_open_as_protocol_error(error: wsengine_services::message::BoxError) -> wsengine_services::message::BoxError {
    match error.downcast_ref::<SendError>() {
        Some(SendError::CircuitOpen { retry_after }) => {
            wsengine_layers::circuit_breaker::CircuitOpen::new("publish", *retry_after).to_protocol_error().into()
        }
        _ => error,
    }
}

/// Rebuilds the envelope of a dead publication. The `id` is kept (clients deduplicate on it);
/// `ts` is not, so the replayed copy carries the time it was actually sent.
fn envelope_from_json(message: &Value) -> Option<Envelope> {
    let fields = message.as_object()?;
    let t = fields.get("t")?.as_str()?;
    let mut envelope = Envelope::new(t, fields.get("p").cloned().unwrap_or(Value::Null));
    if let Some(c) = fields.get("c").and_then(Value::as_str).and_then(Category::parse) {
        envelope.c = c;
    }
    let text = |key: &str| fields.get(key).and_then(Value::as_str).map(str::to_owned);
    envelope.id = text("id");
    envelope.cid = text("cid");
    envelope.pri = fields.get("pri").and_then(Value::as_u64).and_then(|p| u8::try_from(p).ok());
    Some(envelope)
}

impl Engine {
    /// Hands a validated publication to the bus, through the publish breaker when there is one.
    /// Nothing is recorded here; see [`Engine::publish`].
    pub(super) async fn publish_to_bus(&self, publication: Publication) -> Result<PublishReport, SendError> {
        #[cfg(feature = "circuit_breaker")]
        if let Some(breaker) = &self.inner.resilience.publish_breaker {
            use tower::{Layer, ServiceExt};
            use wsengine_layers::circuit_breaker::{CircuitBreakerLayer, CircuitOpen};
            let bus = Arc::clone(&self.inner.bus);
            let publish = tower::service_fn(move |publication: Publication| bus.publish(publication));
            return CircuitBreakerLayer::new(breaker.clone()).layer(publish).oneshot(publication).await.map_err(
                |error| match error.downcast::<CircuitOpen>() {
                    Ok(open) => SendError::CircuitOpen { retry_after: open.retry_after() },
                    Err(error) => SendError::Bus(error),
                },
            );
        }
        self.inner.bus.publish(publication).await.map_err(|e| SendError::Bus(e.into()))
    }

    /// Records a publication the bus did not take in the dead-letter store.
    pub(super) async fn dead_letter_publication(&self, topic: &str, json: &str, error: &SendError) {
        let message = serde_json::from_str(json).unwrap_or_else(|_| Value::String(json.to_owned()));
        let letter =
            NewDeadLetter::new(DeadLetterSource::Publish { topic: topic.to_owned() }, message, error.to_string());
        if let Err(store_error) = self.inner.resilience.dead_letters.push(letter).await {
            tracing::warn!(%store_error, topic, "could not record a failed publication");
        }
    }

    /// Lists dead letters (failed publications and handler failures), oldest first.
    pub async fn dead_letters(&self, query: DeadLetterQuery) -> Result<DeadLetterPage, DlqError> {
        self.inner.resilience.dead_letters.list(query).await
    }

    /// The dead-letter store.
    pub fn dead_letter_store(&self) -> &Arc<dyn DeadLetterStore> {
        &self.inner.resilience.dead_letters
    }

    /// Replays the dead letters matching `filter`, oldest first: publications go through the
    /// normal publish path again (validation, the publish breaker, the bus); handler failures go
    /// to the application handler again, and its answer to the connection if it is still there.
    /// Letters that go through are removed; the others stay with one more attempt and the new
    /// reason. A failing replay records nothing new. The replay runs to its end even if the
    /// caller stops waiting for it.
    pub async fn replay_dead_letters(&self, filter: DeadLetterFilter) -> Result<ReplayReport, DlqError> {
        let engine = self.clone();
        let run = tokio::spawn(async move {
            let store = Arc::clone(&engine.inner.resilience.dead_letters);
            wsengine_services::dlq::replay(store.as_ref(), filter, |letter| {
                let engine = engine.clone();
                let letter = letter.clone();
                async move { engine.replay_one(letter).await }
            })
            .await
        });
        run.await.map_err(|e| DlqError(format!("replay task failed: {e}")))?
    }

    async fn replay_one(&self, letter: DeadLetter) -> Result<(), String> {
        match letter.source {
            DeadLetterSource::Publish { topic } => {
                let envelope = envelope_from_json(&letter.message).ok_or("not a publishable message")?;
                check_type(&envelope).map_err(|e| e.to_string())?;
                if !wsengine_core::topic::validate_topic(&topic) {
                    return Err(SendError::InvalidTopic.to_string());
                }
                self.publish_to_bus(Publication::new(topic, envelope)).await.map(drop).map_err(|e| e.to_string())
            }
            DeadLetterSource::Handler { connection_id, user_id } => {
                let id = ConnectionId::parse(&connection_id).ok_or("the connection id is not a UUID")?;
                let body = match letter.message {
                    Value::Object(fields) => AppBody::Message(wsengine_core::InboundMessage::from_map(fields)),
                    Value::String(text) => AppBody::RawText(text.into()),
                    _ => return Err("not a replayable message".to_owned()),
                };
                let message = AppMessage {
                    connection_id: id,
                    user_id,
                    body,
                    encrypted: false,
                    signature: wsengine_services::handler::SignatureStatus::default(),
                };
                let events = self.inner.resilience.replay_handler.handle(message).await.map_err(|e| e.to_string())?;
                if let Some(connection) = self.inner.registry.get(id) {
                    for event in events {
                        connection.deliver(Delivery::Event(Box::new(event)));
                    }
                }
                Ok(())
            }
        }
    }

    pub(super) fn breaker_health(&self) -> BTreeMap<String, BreakerHealth> {
        self.inner.resilience.health()
    }
}
