//! The official Python client (`wse-client` 2.5.1, unchanged) against a real engine with
//! recovery on: handshake, a plain and a filtered subscription, publications from Rust, and two
//! reconnects (the client drops the connection, then the engine does) during which publishing
//! goes on and after which the client's own recovery (PROTOCOL.md §9.5) hands every
//! publication to the application exactly once, in order.
//!
//! The client runs in tests/python/official_client.py; `.ci/run` installs it. Without
//! `python3` or the package the test fails (like the E2E cross-check in tests/encryption.rs).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::{Service, ServiceExt, layer::layer_fn, service_fn};
use wsengine::services::connection::ConnectionId;
use wsengine::services::driver::InboundService;
use wsengine::services::message::{Inbound, InboundBody};
use wsengine::{CloseCode, Engine, Envelope};

const TOPIC: &str = "prices";
const FILTERED_TOPIC: &str = "quotes";
/// Ticks published before the client drops its connection.
const BEFORE: u64 = 20;
/// Quotes published before the drop (AAPL for even numbers, MSFT for odd ones).
const QUOTES: u64 = 20;
/// Ticks published while the client is away.
const WHILE_AWAY: u64 = 30;
/// Ticks published once the client has asked for recovery (live ones after the replay).
const AFTER_RECOVERY: u64 = 20;
/// Each wait for the script; the whole test stays well under a minute.
const STEP: Duration = Duration::from_secs(20);

fn tick(n: u64) -> Envelope {
    Envelope::new("tick", json!({ "n": n }))
}

/// The Python process: stdout lines arrive on a channel (read on a thread); killed on drop.
struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Script {
    fn start(url: &str) -> Script {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/official_client.py");
        let mut child = Command::new("python3")
            .arg(path)
            .args([url, TOPIC, FILTERED_TOPIC, &BEFORE.to_string(), &QUOTES.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is needed for this test (.ci/run installs it): {e}"));
        let (sender, lines) = mpsc::unbounded_channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Script { child, stdin, lines, seen: Vec::new() }
    }

    /// The next line, which must start with `word`; panics with the script's output otherwise.
    async fn expect(&mut self, word: &str) -> String {
        let line = tokio::time::timeout(STEP, self.lines.recv()).await.ok().flatten();
        match line {
            Some(line) if line.split_whitespace().next() == Some(word) => {
                self.seen.push(line.clone());
                line[word.len()..].trim().to_owned()
            }
            other => {
                if let Some(line) = other {
                    self.seen.push(line);
                }
                self.fail(&format!("expected `{word}`"))
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").and_then(|_| stdin.flush()).expect("the script reads its stdin");
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        let missing = stderr.contains("wse-client` is missing");
        panic!(
            "{what}; the script printed {:?}{}\nstderr:\n{stderr}",
            self.seen,
            if missing { " (install it: python3 -m pip install wse-client==2.5.1)" } else { "" }
        );
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Payloads of the `subscription_update`s the engine received, in order.
type Recorded = Arc<Mutex<Vec<Value>>>;

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Once the client's connection is gone, publishes ticks from `next` on: a batch while the
/// client is away (only a replay can bring those), then one every 10 ms through its reconnect
/// until the engine has received its `requests`-th `subscription_update`, then some
/// that reach it live. Returns the number of ticks published in all.
async fn publish_through_reconnect(engine: &Engine, recorded: &Recorded, mut next: u64, requests: usize) -> u64 {
    wait_for("the engine to see the connection go", || engine.connection_count() == 0).await;
    for _ in 0..WHILE_AWAY {
        engine.publish(TOPIC, tick(next)).await.unwrap();
        next += 1;
    }
    assert_eq!(engine.connection_count(), 0, "these ticks must be published while the client is away");
    let deadline = Instant::now() + STEP;
    while recorded.lock().unwrap().len() < requests {
        assert!(Instant::now() < deadline, "the client never asked for recovery: {:?}", recorded.lock().unwrap());
        engine.publish(TOPIC, tick(next)).await.unwrap();
        next += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..AFTER_RECOVERY {
        engine.publish(TOPIC, tick(next)).await.unwrap();
        next += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    next
}

fn subscriptions(engine: &Engine, id: ConnectionId) -> Vec<String> {
    engine.connection_info(id).map(|info| info.subscriptions).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_client_subscribes_filters_and_recovers_across_reconnects() {
    let started = Instant::now();
    // An inbound user layer records the payload of every `subscription_update` the engine
    // receives, so the test sees which recovery requests the client sent.
    let recorded = Recorded::default();
    let record = Arc::clone(&recorded);
    let recorder = layer_fn(move |inner: InboundService| {
        let record = Arc::clone(&record);
        let inner = Arc::new(tokio::sync::Mutex::new(inner));
        service_fn(move |inbound: Inbound| {
            if let InboundBody::Message(m) = &inbound.body
                && m.t() == Some("subscription_update")
            {
                record.lock().unwrap().push(m.p().cloned().unwrap_or_default());
            }
            let inner = Arc::clone(&inner);
            async move { inner.lock().await.ready().await?.call(inbound).await }
        })
    });
    let server = start_with(
        |c| {
            c.recovery_enabled = true;
            c.recovery_buffer_size = 1024;
        },
        |b| b.inbound_layer(recorder),
    )
    .await;
    let engine = server.engine.clone();
    let mut script = Script::start(&server.url());

    // Connected (server_ready handled), subscribed to both topics.
    let id = script.expect("READY").await;
    let id = ConnectionId::parse(&id).expect("the client reports the connection_id of server_ready");
    wait_for("both subscriptions", || subscriptions(&engine, id).len() == 2).await;
    assert_eq!(subscriptions(&engine, id), [TOPIC, FILTERED_TOPIC]);
    for n in 0..BEFORE.max(QUOTES) {
        if n < BEFORE {
            engine.publish(TOPIC, tick(n)).await.unwrap();
        }
        if n < QUOTES {
            let symbol = if n % 2 == 0 { "AAPL" } else { "MSFT" };
            engine.publish(FILTERED_TOPIC, Envelope::new("quote", json!({"n": n, "symbol": symbol}))).await.unwrap();
        }
    }

    // The client dropped its connection itself (`force_reconnect`).
    script.expect("RECONNECTING").await;
    let next = publish_through_reconnect(&engine, &recorded, BEFORE, 3).await;
    script.send(&format!("TOTAL {next}"));

    // The engine drops it (1013, as for a slow consumer); the client reconnects by itself.
    let id = script.expect("RECOVERED").await;
    let id = ConnectionId::parse(&id).expect("the connection_id of the new server_ready");
    assert!(engine.disconnect(id, CloseCode(1013), "Slow consumer"), "the new connection is registered");
    let total = publish_through_reconnect(&engine, &recorded, next, 4).await;
    script.send(&format!("TOTAL {total}"));

    let result = script.expect("RESULT").await;
    let result: Value = serde_json::from_str(&result).expect("RESULT is JSON");
    println!("official client: {result}");
    if result["ok"] != true {
        script.fail(&format!("the official client failed: {result}"));
    }
    assert_eq!(result["total"], total);

    // What the client asked the engine for: the two subscriptions, then exactly one recovery
    // request per reconnect (from the position it had saved), and never one for the filtered
    // topic (its deliveries are unstamped, so its gap detector stays quiet) nor a gap-triggered
    // one (the replay left no gap).
    let requests = recorded.lock().unwrap().clone();
    assert_eq!(requests.len(), 4, "subscription requests: {requests:?}");
    assert_eq!(requests[0]["topics"], json!([TOPIC]));
    assert!(requests[0].get("recover").is_none(), "{requests:?}");
    assert_eq!(requests[1]["topics"], json!([FILTERED_TOPIC]));
    assert_eq!(requests[1]["filter"], json!({"symbol": "AAPL"}));
    let epoch = &result["position_before_drop"][0];
    for (recovery, offset) in [(&requests[2], BEFORE - 1), (&requests[3], next - 1)] {
        assert_eq!(recovery["action"], "subscribe");
        assert_eq!(recovery["topics"], json!([TOPIC]));
        assert_eq!(recovery["recover"], true);
        assert_eq!(recovery["recovery"], json!({TOPIC: {"epoch": epoch, "offset": offset}}));
    }

    drop(script);
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(45), "took {:?}", started.elapsed());
}
