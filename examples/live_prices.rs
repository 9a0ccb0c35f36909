//! A live price feed with the delivery features on: recovery, snapshots, presence, priorities.
//!
//! Run it with `cargo run --example live_prices` (listens on 127.0.0.1:5006, path `/wse`;
//! `WSENGINE_*` environment variables override the configuration). Every 100 ms it publishes
//! a price for `prices.AAPL`, `prices.MSFT` or `prices.NVDA`; every 50th publication is a HIGH
//! priority `price_alert`. Try it with any WSE client, or by hand (e.g. `websocat`):
//!
//! - subscribe with a filter: `{"t":"subscription_update","p":{"action":"subscribe",
//!   "topics":["prices.*"],"filter":{"price":{"$gt":150}}}}`;
//! - subscribe to `prices.AAPL`, note the `e`/`o` of the last price, reconnect later and
//!   recover: `{"t":"subscription_update","p":{"action":"subscribe","topics":["prices.AAPL"],
//!   "recover":true,"recovery":{"prices.AAPL":{"epoch":"<e>","offset":<o>}}}}` — the missed
//!   prices come back in order before the ack;
//! - `{"t":"sync_request","p":{"topics":["prices.AAPL"]}}` returns the latest price as a
//!   snapshot event (category `S`), then `snapshot_complete`;
//! - subscribe with `"presence":{"name":"ada"}` and watch `presence_join` / `presence_leave`
//!   from a second connection; `GET /api/presence/prices.AAPL` lists the members.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use serde_json::json;
use wsengine::services::message::BoxError;
use wsengine::{Config, Engine, Envelope, SnapshotProvider};

const SYMBOLS: [&str; 3] = ["AAPL", "MSFT", "NVDA"];

/// The latest price per topic, for snapshots.
#[derive(Debug, Default, Clone)]
struct LatestPrices(Arc<Mutex<HashMap<String, f64>>>);

impl SnapshotProvider for LatestPrices {
    fn snapshot(&self, _user_id: &str, topics: &[String]) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        let latest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let events = topics
            .iter()
            .filter_map(|topic| latest.get(topic).map(|price| (topic, price)))
            .map(|(topic, price)| Envelope::new("price_snapshot", json!({"topic": topic, "price": price})))
            .collect();
        std::future::ready(Ok(events)).boxed()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = Config { recovery_enabled: true, presence_enabled: true, ..Config::load(None)? };
    let latest = LatestPrices::default();
    let engine = Engine::builder(config).snapshots(latest.clone()).build()?;
    let listener = tokio::net::TcpListener::bind(engine.config().listen).await?;
    println!("listening on ws://{}{}", listener.local_addr()?, engine.config().path);

    let publisher = engine.clone();
    tokio::spawn(async move {
        let mut prices = [180.0_f64, 410.0, 120.0];
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        for n in 0u64.. {
            ticker.tick().await;
            let i = (n % 3) as usize;
            // A deterministic wiggle: no random-number dependency for an example.
            prices[i] = (prices[i] * (1.0 + 0.002 * ((n * 7919 % 11) as f64 - 5.0) / 5.0) * 100.0).round() / 100.0;
            let topic = format!("prices.{}", SYMBOLS[i]);
            latest.0.lock().unwrap_or_else(|e| e.into_inner()).insert(topic.clone(), prices[i]);
            let mut envelope = Envelope::new("price_update", json!({"symbol": SYMBOLS[i], "price": prices[i]}));
            if n % 50 == 49 {
                envelope = Envelope::new("price_alert", json!({"symbol": SYMBOLS[i], "price": prices[i]}));
                envelope.pri = Some(8);
            }
            if let Err(error) = publisher.publish(&topic, envelope).await {
                eprintln!("publish to {topic} failed: {error}");
            }
        }
    });
    engine.serve(listener).await?;
    Ok(())
}
