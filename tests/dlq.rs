//! The dead-letter queue of a running engine: failed publishes and handler failures are kept
//! (bounded per topic, globally and by age), listed and replayed through the Rust API and over
//! HTTP, and a replay succeeds once the cause is fixed.

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
use wsengine::services::dlq::{DeadLetterFilter, DeadLetterKind, DeadLetterQuery, DeadLetterSource, ReplayReport};
use wsengine::services::message::BoxError;
use wsengine::services::publication::Publication;
use wsengine::{AppBody, AppMessage, Config, Engine, Envelope, SendError, handler_fn};

/// A bus that refuses publications while `broken` is set; clones share it.
#[derive(Debug, Clone, Default)]
struct FlakyBus(Arc<FlakyState>);

#[derive(Debug, Default)]
struct FlakyState {
    local: MemoryBus,
    broken: AtomicBool,
    attempts: AtomicUsize,
}

impl FlakyBus {
    fn broken() -> Self {
        let bus = FlakyBus::default();
        bus.set_broken(true);
        bus
    }

    fn set_broken(&self, broken: bool) {
        self.0.broken.store(broken, Ordering::SeqCst);
    }
}

impl Bus for FlakyBus {
    fn publish(&self, publication: Publication) -> BoxFuture<'static, Result<PublishReport, BusError>> {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        if self.0.broken.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BusError("redis connection refused".into())) });
        }
        self.0.local.publish(publication)
    }

    fn subscribe(&self, connection: &Arc<Connection>, topic: &str) {
        self.0.local.subscribe(connection, topic);
    }

    fn unsubscribe(&self, connection: ConnectionId, topic: &str) {
        self.0.local.unsubscribe(connection, topic);
    }

    fn subscription_count(&self) -> usize {
        self.0.local.subscription_count()
    }
}

fn tick(n: u64) -> Envelope {
    Envelope::new("price_update", json!({"n": n}))
}

fn all() -> DeadLetterQuery {
    DeadLetterQuery::new(DeadLetterFilter::default()).limit(usize::MAX)
}

/// An engine that is not serving: the Rust API alone, so tests can pause the clock.
fn engine(bus: &FlakyBus, configure: impl FnOnce(&mut Config)) -> Engine {
    let mut config = test_config();
    configure(&mut config);
    Engine::builder(config).bus(Arc::new(bus.clone())).build().unwrap()
}

#[tokio::test]
async fn failed_publishes_are_kept_and_replayed_in_order_once_the_bus_is_back() {
    let bus = FlakyBus::broken();
    let server = start_with(
        |c| {
            c.circuit_breaker_window = 3;
            c.circuit_breaker_min_calls = 3;
            c.circuit_breaker_open_timeout = Duration::from_millis(300);
        },
        |b| b.bus(Arc::new(bus.clone())),
    )
    .await;
    let mut subscriber = Client::connect(&server.url()).await.unwrap();
    subscriber.subscribe(&["prices"]).await.unwrap();

    let mut ids = Vec::new();
    for n in 0..5 {
        let mut envelope = tick(n);
        envelope.id = Some(format!("tick-{n}"));
        ids.push(envelope.id.clone().unwrap());
        assert!(server.engine.publish("prices", envelope).await.is_err());
    }
    // Invalid publications are refused, not dead-lettered.
    assert!(matches!(server.engine.publish("", tick(9)).await, Err(SendError::InvalidTopic)));
    assert!(matches!(
        server.engine.publish("prices", Envelope::new("ping", json!({}))).await,
        Err(SendError::ReservedType(_))
    ));

    let page = server.engine.dead_letters(all()).await.unwrap();
    assert_eq!(page.entries.len(), 5);
    let reasons: Vec<&str> = page.entries.iter().map(|l| l.reason.as_str()).collect();
    assert!(reasons[..3].iter().all(|r| r.contains("redis connection refused")), "{reasons:?}");
    if cfg!(feature = "circuit_breaker") {
        assert!(reasons[3..].iter().all(|r| r.contains("circuit breaker open")), "{reasons:?}");
    }
    let first = &page.entries[0];
    assert_eq!(first.source, DeadLetterSource::Publish { topic: "prices".into() });
    assert_eq!(first.message["t"], "price_update");
    assert_eq!(first.message["p"], json!({"n": 0}));
    assert_eq!(first.message["id"], "tick-0");
    assert_eq!(first.attempts, 1);
    assert!(!first.failed_at.is_empty());

    // Still broken: every letter stays, with one more attempt.
    let report = server.engine.replay_dead_letters(DeadLetterFilter::topic("prices")).await.unwrap();
    assert_eq!(report, ReplayReport { replayed: 0, failed: 5 });
    let page = server.engine.dead_letters(all()).await.unwrap();
    assert!(page.entries.iter().all(|l| l.attempts == 2), "{page:?}");
    assert!(subscriber.recv_timeout(Duration::from_millis(50)).await.unwrap().is_none());

    // The cause is fixed (and the breaker's open timeout has passed): all five go through,
    // in their original order and with their original ids.
    bus.set_broken(false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = server.engine.replay_dead_letters(DeadLetterFilter::topic("prices")).await.unwrap();
    assert_eq!(report, ReplayReport { replayed: 5, failed: 0 });
    for (n, id) in ids.iter().enumerate() {
        let message = subscriber.recv().await.unwrap();
        assert_eq!((message["p"]["n"].as_u64(), message["id"].as_str()), (Some(n as u64), Some(id.as_str())));
    }
    assert!(server.engine.dead_letters(all()).await.unwrap().entries.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn handler_failures_are_kept_and_replayed_to_the_connection() {
    let broken = Arc::new(AtomicBool::new(true));
    let handler = {
        let broken = broken.clone();
        handler_fn(move |message: AppMessage| {
            let broken = broken.load(Ordering::SeqCst);
            async move {
                if broken {
                    return Err::<Vec<Envelope>, BoxError>(std::io::Error::other("inventory service down").into());
                }
                let AppBody::Message(m) = message.body else { return Ok(vec![]) };
                Ok(vec![Envelope::new("order_accepted", m.p().cloned().unwrap_or_default())])
            }
        })
    };
    let server = start_with(|_| {}, |b| b.handler(handler)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.send("place_order", json!({"sku": "A-1", "qty": 2})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["code"], "SERVER_ERROR");

    let (status, list) = http(server.addr, "GET", "/api/dlq?kind=handler", None, None).await;
    assert_eq!(status, 200, "{list}");
    let entries = list["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let letter = &entries[0];
    assert_eq!(letter["kind"], "handler");
    assert_eq!(letter["connection_id"], client.connection_id());
    assert_eq!(letter["user_id"], client.server_ready()["p"]["details"]["user_id"]);
    assert_eq!(letter["message"]["t"], "place_order");
    assert_eq!(letter["message"]["p"], json!({"sku": "A-1", "qty": 2}));
    assert_eq!(letter["reason"], "inventory service down");
    assert_eq!(letter["attempts"], 1);

    let (status, report) = http(server.addr, "POST", "/api/dlq/replay", Some(r#"{"kind":"handler"}"#), None).await;
    assert_eq!((status, report), (200, json!({"replayed": 0, "failed": 1})));
    let (_, list) = http(server.addr, "GET", "/api/dlq", None, None).await;
    assert_eq!(list["entries"][0]["attempts"], 2);
    assert!(client.recv_timeout(Duration::from_millis(50)).await.unwrap().is_none(), "a failed replay tells no one");

    broken.store(false, Ordering::SeqCst);
    let (status, report) = http(server.addr, "POST", "/api/dlq/replay", Some(""), None).await;
    assert_eq!((status, report), (200, json!({"replayed": 1, "failed": 0})));
    let answer = client.recv().await.unwrap();
    assert_eq!(answer["t"], "order_accepted");
    assert_eq!(answer["p"]["sku"], "A-1");
    let (_, list) = http(server.addr, "GET", "/api/dlq", None, None).await;
    assert_eq!(list, json!({"entries": [], "next_cursor": null}));
    server.stop().await;
}

#[tokio::test]
async fn the_http_api_lists_pages_filters_and_replays_by_id() {
    let bus = FlakyBus::broken();
    let server = start_with(
        |c| {
            c.api_key = Some("secret".into());
            c.circuit_breaker = false;
        },
        |b| b.bus(Arc::new(bus.clone())),
    )
    .await;
    let key = Some("secret");
    for n in 0..3 {
        let (status, body) = http(
            server.addr,
            "POST",
            "/api/publish",
            Some(&json!({"topic": "a/b", "t": "x", "p": {"n": n}}).to_string()),
            key,
        )
        .await;
        assert_eq!(status, 503, "a bus failure is the server's problem: {body}");
    }
    server.engine.publish("other", tick(7)).await.unwrap_err();

    // Behind the API key like the rest of /api.
    assert_eq!(http(server.addr, "GET", "/api/dlq", None, None).await.0, 401);
    assert_eq!(http(server.addr, "POST", "/api/dlq/replay", Some("{}"), Some("wrong")).await.0, 401);

    let (status, page) = http(server.addr, "GET", "/api/dlq?topic=a%2Fb&limit=2", None, key).await;
    assert_eq!(status, 200, "{page}");
    let numbers = |page: &Value| -> Vec<u64> {
        page["entries"].as_array().unwrap().iter().map(|l| l["message"]["p"]["n"].as_u64().unwrap()).collect()
    };
    assert_eq!(numbers(&page), [0, 1]);
    assert_eq!(page["entries"][0]["topic"], "a/b");
    assert_eq!(page["entries"][0]["kind"], "publish");
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, next) = http(server.addr, "GET", &format!("/api/dlq?topic=a%2Fb&limit=2&cursor={cursor}"), None, key).await;
    assert_eq!((numbers(&next), next["next_cursor"].clone()), (vec![2], Value::Null));
    let (_, everything) = http(server.addr, "GET", "/api/dlq", None, key).await;
    assert_eq!(numbers(&everything), [0, 1, 2, 7]);

    for bad in [
        "/api/dlq?limit=0",
        "/api/dlq?limit=1001",
        "/api/dlq?limit=x",
        "/api/dlq?kind=other",
        "/api/dlq?colour=red",
        "/api/dlq?topic=%zz",
    ] {
        let (status, body) = http(server.addr, "GET", bad, None, key).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    for bad in ["[1]", r#"{"topic": 5}"#, r#"{"ids": "1"}"#, r#"{"unknown": true}"#, r#"{"kind": "x"}"#] {
        let (status, body) = http(server.addr, "POST", "/api/dlq/replay", Some(bad), key).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(http(server.addr, "DELETE", "/api/dlq", None, key).await.0, 405);
    assert_eq!(http(server.addr, "GET", "/api/dlq/replay", None, key).await.0, 405);

    // Replay two letters by id, one of another topic, once the bus is back.
    bus.set_broken(false);
    let ids = json!({"ids": [everything["entries"][1]["id"], everything["entries"][3]["id"]]}).to_string();
    let (status, report) = http(server.addr, "POST", "/api/dlq/replay", Some(&ids), key).await;
    assert_eq!((status, report), (200, json!({"replayed": 2, "failed": 0})));
    let (_, left) = http(server.addr, "GET", "/api/dlq", None, key).await;
    assert_eq!(numbers(&left), [0, 2]);
    let (_, report) = http(server.addr, "POST", "/api/dlq/replay", Some(r#"{"topic": "a/b"}"#), key).await;
    assert_eq!(report, json!({"replayed": 2, "failed": 0}));
    let (_, report) = http(server.addr, "POST", "/api/dlq/replay", Some("{}"), key).await;
    assert_eq!(report, json!({"replayed": 0, "failed": 0}));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn caps_evict_the_oldest_and_letters_expire() {
    let bus = FlakyBus::broken();
    let engine = engine(&bus, |c| {
        c.circuit_breaker = false;
        c.dlq_max_per_topic = 3;
        c.dlq_max_entries = 5;
        c.dlq_ttl = Duration::from_secs(3600);
    });
    for n in 0..5 {
        engine.publish("a", tick(n)).await.unwrap_err();
    }
    let letters = engine.dead_letters(all()).await.unwrap();
    let numbers: Vec<u64> = letters.entries.iter().map(|l| l.message["p"]["n"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [2, 3, 4], "per-topic cap: the oldest go first");

    tokio::time::advance(Duration::from_secs(1800)).await;
    for n in 10..13 {
        engine.publish("b", tick(n)).await.unwrap_err();
    }
    let letters = engine.dead_letters(all()).await.unwrap();
    let numbers: Vec<u64> = letters.entries.iter().map(|l| l.message["p"]["n"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [3, 4, 10, 11, 12], "global cap: the oldest of all go first");

    tokio::time::advance(Duration::from_secs(1800)).await;
    let letters = engine.dead_letters(all()).await.unwrap();
    let numbers: Vec<u64> = letters.entries.iter().map(|l| l.message["p"]["n"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [10, 11, 12], "the first ones are an hour old");
    tokio::time::advance(Duration::from_secs(1800)).await;
    assert!(engine.dead_letters(all()).await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn the_default_ttl_is_seven_days_and_handler_recording_can_be_switched_off() {
    assert_eq!(Config::default().dlq_ttl, Duration::from_secs(7 * 24 * 3600));
    let handler = handler_fn(|_m: AppMessage| async { Err::<Vec<Envelope>, BoxError>("down".into()) });
    let server = start_with(|c| c.dlq_handler_failures = false, |b| b.handler(handler)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.send("work", json!({})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["code"], "SERVER_ERROR");
    let filter = DeadLetterFilter { kind: Some(DeadLetterKind::Handler), ..DeadLetterFilter::default() };
    assert!(server.engine.dead_letters(DeadLetterQuery::new(filter)).await.unwrap().entries.is_empty());
    server.stop().await;
}
