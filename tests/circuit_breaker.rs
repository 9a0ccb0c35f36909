//! Circuit breakers of a running engine: a failing application handler trips its breaker,
//! clients get `CIRCUIT_BREAKER_OPEN` (connection open, protocol traffic untouched), and it
//! recovers through half-open probes; the snapshot and publish breakers likewise.
#![cfg(feature = "circuit_breaker")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use wsengine::client::Client;
use wsengine::services::bus::{Bus, BusError, MemoryBus, PublishReport};
use wsengine::services::connection::{Connection, ConnectionId};
use wsengine::services::message::BoxError;
use wsengine::services::publication::Publication;
use wsengine::{AppBody, AppMessage, Config, Envelope, SendError, handler_fn};

const OPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// Small windows and a short open timeout, so that tests run in real time.
fn breaker_config(config: &mut Config) {
    config.circuit_breaker_window = 3;
    config.circuit_breaker_min_calls = 3;
    config.circuit_breaker_failure_rate = 1.0;
    config.circuit_breaker_open_timeout = OPEN_TIMEOUT;
    config.circuit_breaker_half_open_probes = 2;
}

/// A handler that fails while `broken` is set and echoes otherwise; counts its calls.
fn switchable_handler(broken: Arc<AtomicBool>, calls: Arc<AtomicUsize>) -> impl wsengine::Handler {
    handler_fn(move |message: AppMessage| {
        let broken = broken.load(Ordering::SeqCst);
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if broken {
                return Err::<Vec<Envelope>, BoxError>(std::io::Error::other("database unreachable").into());
            }
            let AppBody::Message(m) = message.body else { return Ok(vec![]) };
            Ok(vec![Envelope::new("echo_reply", m.p().cloned().unwrap_or_default())])
        }
    })
}

async fn health(server: &TestServer) -> Value {
    let (status, body) = http(server.addr, "GET", "/health", None, None).await;
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn a_failing_handler_trips_the_breaker_and_recovers_through_half_open_probes() {
    let broken = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = switchable_handler(broken.clone(), calls.clone());
    let server = start_with(breaker_config, |b| b.handler(handler)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let mut other = Client::connect(&server.url()).await.unwrap();
    other.subscribe(&["prices"]).await.unwrap();

    let health_before = health(&server).await;
    assert_eq!(health_before["circuit_breakers"]["handler"]["state"], "closed");
    assert_eq!(health_before["circuit_breakers"]["publish"]["state"], "closed");

    // Three handler failures: each is a SERVER_ERROR, then the breaker opens.
    for n in 0..3 {
        client.send("work", json!({"n": n})).await.unwrap();
        let error = client.recv().await.unwrap();
        assert_eq!(error["p"]["code"], "SERVER_ERROR", "{error}");
        assert!(!error.to_string().contains("database"), "no internal details reach the client");
    }
    let h = health(&server).await;
    assert_eq!(h["circuit_breakers"]["handler"]["state"], "open", "{h}");
    assert_eq!(h["circuit_breakers"]["handler"]["times_opened"], 1);

    // Open: fail fast with retry_after, without calling the handler; the connection stays open.
    client.send("work", json!({"n": 3})).await.unwrap();
    let error = client.recv().await.unwrap();
    assert_eq!(error["t"], "error");
    assert_eq!(error["p"]["code"], "CIRCUIT_BREAKER_OPEN", "{error}");
    assert_eq!(error["p"]["retry_after"], 1.0, "whole seconds, rounded up");
    assert_eq!(error["p"]["recoverable"], true);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(client.ping().await.unwrap()["t"], "PONG");

    // The breaker is shared: another connection's application message is refused too, but its
    // protocol traffic (ping, subscribe) and its publications are untouched.
    other.send("work", json!({})).await.unwrap();
    assert_eq!(other.recv().await.unwrap()["p"]["code"], "CIRCUIT_BREAKER_OPEN");
    assert_eq!(other.ping().await.unwrap()["t"], "PONG");
    assert_eq!(other.subscribe(&["news"]).await.unwrap()["p"]["success"], true);
    server.engine.publish("prices", Envelope::new("price_update", json!({"AAPL": 1}))).await.unwrap();
    assert_eq!(other.recv().await.unwrap()["t"], "price_update");

    // The cause is fixed; after the open timeout the breaker lets two probes through and closes.
    broken.store(false, Ordering::SeqCst);
    tokio::time::sleep(OPEN_TIMEOUT + Duration::from_millis(100)).await;
    assert_eq!(health(&server).await["circuit_breakers"]["handler"]["state"], "half_open");
    client.send("work", json!({"n": 4})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "echo_reply");
    assert_eq!(health(&server).await["circuit_breakers"]["handler"]["state"], "half_open");
    other.send("work", json!({"n": 5})).await.unwrap();
    assert_eq!(other.recv().await.unwrap()["p"]["n"], 5);
    let h = health(&server).await;
    assert_eq!(h["circuit_breakers"]["handler"]["state"], "closed", "{h}");
    assert_eq!(h["circuit_breakers"]["handler"]["rejected"], 2);
    client.send("work", json!({"n": 6})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["n"], 6);
    server.stop().await;
}

#[tokio::test]
async fn a_failed_probe_opens_the_breaker_again() {
    let broken = Arc::new(AtomicBool::new(true));
    let handler = switchable_handler(broken.clone(), Arc::new(AtomicUsize::new(0)));
    let server = start_with(breaker_config, |b| b.handler(handler)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..3 {
        client.send("work", json!({})).await.unwrap();
        client.recv().await.unwrap();
    }
    tokio::time::sleep(OPEN_TIMEOUT + Duration::from_millis(100)).await;
    client.send("work", json!({})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["code"], "SERVER_ERROR", "the probe reached the handler");
    client.send("work", json!({})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["code"], "CIRCUIT_BREAKER_OPEN");
    let h = health(&server).await;
    assert_eq!(h["circuit_breakers"]["handler"]["state"], "open");
    assert_eq!(h["circuit_breakers"]["handler"]["times_opened"], 2);
    server.stop().await;
}

#[tokio::test]
async fn refusals_by_the_handler_do_not_trip_the_breaker() {
    // The default handler answers every application message with INVALID_REQUEST: that is an
    // answer for the client, not a failing resource.
    let server = start(breaker_config).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..10 {
        client.send("anything", json!({})).await.unwrap();
        assert_eq!(client.recv().await.unwrap()["p"]["code"], "INVALID_REQUEST");
    }
    let h = health(&server).await;
    assert_eq!(h["circuit_breakers"]["handler"]["state"], "closed");
    assert_eq!(h["circuit_breakers"]["handler"]["failures"], 0);
    server.stop().await;
}

struct FailingSnapshots {
    broken: Arc<AtomicBool>,
}

impl wsengine::SnapshotProvider for FailingSnapshots {
    fn snapshot(&self, _user: &str, topics: &[String]) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        let result = if self.broken.load(Ordering::SeqCst) {
            Err(std::io::Error::other("snapshot store down").into())
        } else {
            Ok(topics.iter().map(|t| Envelope::new("prices_snapshot", json!({"topic": t}))).collect())
        };
        Box::pin(async move { result })
    }
}

#[tokio::test]
async fn an_open_snapshot_breaker_still_ends_with_snapshot_complete() {
    let broken = Arc::new(AtomicBool::new(true));
    let provider = FailingSnapshots { broken: broken.clone() };
    let server = start_with(breaker_config, |b| b.snapshots(provider)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..3 {
        client.send("sync_request", json!({"topics": ["prices"]})).await.unwrap();
        let error = client.recv().await.unwrap();
        assert_eq!(error["p"]["code"], "SNAPSHOT_FAILED");
        assert!(error["p"].get("retry_after").is_none());
        assert_eq!(client.recv().await.unwrap()["t"], "snapshot_complete");
    }
    assert_eq!(health(&server).await["circuit_breakers"]["snapshot"]["state"], "open");
    client.send("sync_request", json!({"topics": ["prices"]})).await.unwrap();
    let error = client.recv().await.unwrap();
    assert_eq!(error["p"]["code"], "SNAPSHOT_FAILED");
    assert_eq!(error["p"]["details"]["topics"], json!(["prices"]));
    assert_eq!(error["p"]["retry_after"], 1.0);
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["t"], "snapshot_complete");
    assert_eq!(complete["p"], json!({"topics": ["prices"], "count": 0}));

    broken.store(false, Ordering::SeqCst);
    tokio::time::sleep(OPEN_TIMEOUT + Duration::from_millis(100)).await;
    client.send("sync_request", json!({"topics": ["prices"]})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "prices_snapshot");
    assert_eq!(client.recv().await.unwrap()["p"]["count"], 1);
    server.stop().await;
}

/// A bus that refuses publications while `broken` is set; clones share it.
#[derive(Debug, Clone, Default)]
struct FlakyBus(Arc<FlakyState>);

#[derive(Debug, Default)]
struct FlakyState {
    local: MemoryBus,
    broken: AtomicBool,
    attempts: AtomicUsize,
}

impl std::ops::Deref for FlakyBus {
    type Target = FlakyState;

    fn deref(&self) -> &FlakyState {
        &self.0
    }
}

impl Bus for FlakyBus {
    fn publish(&self, publication: Publication) -> BoxFuture<'static, Result<PublishReport, BusError>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BusError("redis connection refused".into())) });
        }
        self.local.publish(publication)
    }

    fn subscribe(&self, connection: &Arc<Connection>, topic: &str) {
        self.local.subscribe(connection, topic);
    }

    fn unsubscribe(&self, connection: ConnectionId, topic: &str) {
        self.local.unsubscribe(connection, topic);
    }

    fn subscription_count(&self) -> usize {
        self.local.subscription_count()
    }
}

#[tokio::test]
async fn an_open_publish_breaker_fails_publishes_fast_and_recovers() {
    let bus = FlakyBus::default();
    bus.broken.store(true, Ordering::SeqCst);
    let server = start_with(breaker_config, |b| b.bus(Arc::new(bus.clone()))).await;
    let mut subscriber = Client::connect(&server.url()).await.unwrap();
    subscriber.subscribe(&["prices"]).await.unwrap();
    let tick = |n: u64| Envelope::new("price_update", json!({"n": n}));

    for n in 0..3 {
        let error = server.engine.publish("prices", tick(n)).await.unwrap_err();
        assert!(matches!(error, SendError::Bus(_)), "{error}");
    }
    let error = server.engine.publish("prices", tick(3)).await.unwrap_err();
    let SendError::CircuitOpen { retry_after } = error else { panic!("expected CircuitOpen, got {error}") };
    assert!(retry_after <= OPEN_TIMEOUT);
    assert_eq!(bus.attempts.load(Ordering::SeqCst), 3, "an open breaker does not touch the bus");
    let (status, body) = post(server.addr, "/api/publish", &json!({"topic": "prices", "t": "price_update"})).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("circuit breaker open"), "{body}");
    assert_eq!(health(&server).await["circuit_breakers"]["publish"]["state"], "open");

    // Subscribers are unaffected by the breaker: the connection is alive and answers pings.
    assert_eq!(subscriber.ping().await.unwrap()["t"], "PONG");

    bus.broken.store(false, Ordering::SeqCst);
    tokio::time::sleep(OPEN_TIMEOUT + Duration::from_millis(100)).await;
    for n in 10..13 {
        assert_eq!(server.engine.publish("prices", tick(n)).await.unwrap().delivered, 1);
        assert_eq!(subscriber.recv().await.unwrap()["p"]["n"], n);
    }
    assert_eq!(health(&server).await["circuit_breakers"]["publish"]["state"], "closed");
    server.stop().await;
}

#[tokio::test]
async fn breakers_can_be_switched_off() {
    let broken = Arc::new(AtomicBool::new(true));
    let handler = switchable_handler(broken, Arc::new(AtomicUsize::new(0)));
    let server = start_with(
        |c| {
            breaker_config(c);
            c.circuit_breaker = false;
        },
        |b| b.handler(handler),
    )
    .await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..6 {
        client.send("work", json!({})).await.unwrap();
        assert_eq!(client.recv().await.unwrap()["p"]["code"], "SERVER_ERROR");
    }
    assert_eq!(health(&server).await["circuit_breakers"], json!({}));
    server.stop().await;
}

#[tokio::test]
async fn a_handler_meeting_the_open_publish_breaker_gets_circuit_breaker_open() {
    use wsengine::services::dlq::{DeadLetterFilter, DeadLetterKind, DeadLetterQuery};
    let bus = FlakyBus::default();
    bus.broken.store(true, Ordering::SeqCst);
    let engine_slot: Arc<std::sync::OnceLock<wsengine::Engine>> = Arc::default();
    let relay = {
        let engine_slot = engine_slot.clone();
        handler_fn(move |message: AppMessage| {
            let engine = engine_slot.get().cloned().expect("engine set before clients connect");
            async move {
                let AppBody::Message(m) = message.body else { return Ok(vec![]) };
                let p = m.p().cloned().unwrap_or_default();
                engine.publish("prices", Envelope::new("price_update", p)).await?;
                Ok(vec![Envelope::new("relayed", json!({}))])
            }
        })
    };
    let server = start_with(breaker_config, |b| b.bus(Arc::new(bus.clone())).handler(relay)).await;
    engine_slot.set(server.engine.clone()).unwrap();
    for n in 0..3 {
        server.engine.publish("prices", Envelope::new("price_update", json!({"n": n}))).await.unwrap_err();
    }
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.send("relay", json!({"n": 3})).await.unwrap();
    let error = client.recv().await.unwrap();
    assert_eq!(error["p"]["code"], "CIRCUIT_BREAKER_OPEN", "{error}");
    assert_eq!(error["p"]["retry_after"], 1.0);
    let h = health(&server).await;
    assert_eq!(h["circuit_breakers"]["handler"]["state"], "closed");
    assert_eq!(h["circuit_breakers"]["handler"]["failures"], 0, "the handler itself did not fail");
    // The publication is a dead letter; the application message is not.
    let kind = |kind| DeadLetterQuery::new(DeadLetterFilter { kind: Some(kind), ..DeadLetterFilter::default() });
    let publishes = server.engine.dead_letters(kind(DeadLetterKind::Publish)).await.unwrap();
    assert_eq!(publishes.entries.len(), 4);
    assert_eq!(publishes.entries[3].message["p"], json!({"n": 3}));
    assert!(server.engine.dead_letters(kind(DeadLetterKind::Handler)).await.unwrap().entries.is_empty());
    server.stop().await;
}
