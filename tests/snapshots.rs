//! Snapshots over real sockets (PROTOCOL.md §6.2.5, §6.1.8): on `sync_request`, on subscribe
//! (`snapshot_on_subscribe`), and their order against live publications racing them.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use wsengine::client::Client;
use wsengine::services::handler::SnapshotProvider;
use wsengine::services::message::BoxError;
use wsengine::{Engine, Envelope};

/// A price that a publisher keeps moving; its snapshot is the current value. While a snapshot
/// is on its way the provider itself publishes three more updates, so every snapshot races
/// live publications.
#[derive(Clone, Default)]
struct Prices {
    engine: Arc<OnceLock<Engine>>,
    value: Arc<AtomicU64>,
}

fn update(n: u64) -> Envelope {
    // HIGH priority, above the snapshot events: only the ordering guarantee keeps them behind.
    Envelope { pri: Some(8), ..Envelope::new("price_update", json!({ "n": n })) }
}

impl Prices {
    async fn publish_next(&self) {
        let n = self.value.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(engine) = self.engine.get() {
            engine.publish("prices", update(n)).await.unwrap();
        }
    }
}

impl SnapshotProvider for Prices {
    fn snapshot(&self, _user_id: &str, topics: &[String]) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        let prices = self.clone();
        let topics = topics.to_vec();
        Box::pin(async move {
            let n = prices.value.load(Ordering::SeqCst);
            for _ in 0..3 {
                prices.publish_next().await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(topics
                .iter()
                .map(|topic| Envelope {
                    id: Some("app-chosen-id".into()),
                    ..Envelope::new("prices_snapshot", json!({ "topic": topic, "n": n }))
                })
                .collect())
        })
    }
}

async fn start_prices(snapshot_on_subscribe: bool) -> (TestServer, Prices) {
    let prices = Prices::default();
    let server = start_with(
        |c| {
            c.snapshot_on_subscribe = snapshot_on_subscribe;
            // Stamped publications must not disturb the snapshot order.
            c.recovery_enabled = cfg!(feature = "recovery");
        },
        |builder| builder.snapshots(prices.clone()),
    )
    .await;
    prices.engine.set(server.engine.clone()).ok();
    (server, prices)
}

/// Keeps publishing until dropped.
fn keep_publishing(prices: &Prices) -> tokio::task::JoinHandle<()> {
    let prices = prices.clone();
    tokio::spawn(async move {
        loop {
            prices.publish_next().await;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    })
}

fn assert_snapshot_event(event: &Value, topic: &str) -> u64 {
    assert_eq!(event["t"], "prices_snapshot");
    assert_eq!(event["c"], "S");
    assert_eq!(event["p"]["topic"], topic);
    assert_ne!(event["id"], "app-chosen-id", "a fresh id");
    assert!(event["ts"].is_string());
    assert!(event.get("tp").is_none() && event.get("e").is_none() && event.get("o").is_none(), "never stamped");
    event["p"]["n"].as_u64().unwrap()
}

#[tokio::test]
async fn sync_request_sends_the_snapshot_events_then_snapshot_complete() {
    let (server, _prices) = start_prices(false).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.send("sync_request", json!({"topics": ["prices", "news"], "include_snapshots": true})).await.unwrap();
    assert_snapshot_event(&client.recv().await.unwrap(), "prices");
    assert_snapshot_event(&client.recv().await.unwrap(), "news");
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["t"], "snapshot_complete");
    assert_eq!(complete["p"], json!({"topics": ["prices", "news"], "count": 2}));

    client.send("sync_request", json!({"topics": ["prices"], "include_snapshots": false})).await.unwrap();
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["p"], json!({"topics": ["prices"], "count": 0}));
    server.stop().await;
}

#[tokio::test]
async fn snapshot_on_subscribe_follows_the_ack_for_new_topics_only() {
    let (server, _prices) = start_prices(true).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.send("subscription_update", json!({"topics": ["prices"]})).await.unwrap();
    let ack = client.recv().await.unwrap();
    assert_eq!(ack["t"], "subscription_update");
    assert_eq!(ack["p"]["success_topics"], json!(["prices"]));
    assert_snapshot_event(&client.recv().await.unwrap(), "prices");
    let complete = client.recv().await.unwrap();
    assert_eq!(
        (complete["t"].as_str(), &complete["p"]),
        (Some("snapshot_complete"), &json!({"topics": ["prices"], "count": 1}))
    );
    // The three updates the provider published after taking its snapshot come after it.
    for _ in 0..3 {
        assert_eq!(client.recv().await.unwrap()["t"], "price_update");
    }
    // Subscribing again to a subscribed topic sends no snapshot; nor does a pattern.
    client.send("subscription_update", json!({"topics": ["prices", "news.*"]})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "subscription_update");
    let pong = client.ping().await.unwrap();
    assert_eq!(pong["t"], "PONG");
    assert_eq!(client.recv_timeout(Duration::from_millis(100)).await.unwrap(), None);
    server.stop().await;
}

#[tokio::test]
async fn without_the_option_subscribe_sends_no_snapshot() {
    let (server, _prices) = start_prices(false).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.subscribe(&["prices"]).await.unwrap();
    // The provider was not asked, so nothing was published either.
    assert_eq!(client.recv_timeout(Duration::from_millis(100)).await.unwrap(), None);
    server.stop().await;
}

/// Reads until the snapshot event; every live update seen before it must be one the snapshot
/// already covers, and the updates after it continue without a gap.
async fn check_snapshot_order(client: &mut Client) {
    let mut before = Vec::new();
    let snapshot = loop {
        let message = client.recv().await.unwrap();
        match message["t"].as_str() {
            Some("prices_snapshot") => break assert_snapshot_event(&message, "prices"),
            Some("price_update") => before.push(message["p"]["n"].as_u64().unwrap()),
            _ => {}
        }
    };
    assert!(
        before.iter().all(|&n| n <= snapshot),
        "live update newer than the snapshot overtook it: {before:?} vs {snapshot}"
    );
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["t"], "snapshot_complete");
    // Newer updates all follow, in order (older ones may still trail in; they are stale).
    let mut next = snapshot + 1;
    while next < snapshot + 30 {
        let message = client.recv().await.unwrap();
        let n = message["p"]["n"].as_u64().unwrap();
        if n > snapshot {
            assert_eq!(n, next, "no gap after the snapshot");
            next += 1;
        }
    }
}

#[tokio::test]
async fn snapshot_events_precede_live_updates_published_after_the_snapshot() {
    let (server, prices) = start_prices(true).await;
    let publisher = keep_publishing(&prices);
    for _ in 0..5 {
        // On subscribe.
        let mut client = Client::connect(&server.url()).await.unwrap();
        client.send("subscription_update", json!({"topics": ["prices"]})).await.unwrap();
        check_snapshot_order(&mut client).await;
        // On sync_request, while subscribed and receiving.
        for _ in 0..3 {
            client.send("sync_request", json!({"topics": ["prices"], "include_snapshots": true})).await.unwrap();
            check_snapshot_order(&mut client).await;
        }
        client.close().await.unwrap();
    }
    publisher.abort();
    server.stop().await;
}
