//! The outbound priority queue behind real connection drivers: slow consumers are dropped or
//! closed per policy while everyone else keeps receiving, and what a stalled client finally
//! reads comes in priority order without reordering a topic.
//!
//! Connections run over in-memory sockets with a paused clock (the same stacks and driver as a
//! TCP connection), so "the client stopped reading" is exact and timing is deterministic.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::memory::{MemoryEnds, ReadGate, memory_socket};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use wsengine::services::connection::ConnectionId;
use wsengine::services::tungstenite::{Error as WsError, Message};
use wsengine::{Admission, Config, Engine, Envelope};

/// The client's end.
struct Client {
    id: ConnectionId,
    to_server: mpsc::UnboundedSender<Result<Message, WsError>>,
    from_server: mpsc::UnboundedReceiver<Message>,
    reading: Arc<ReadGate>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn connect(engine: &Engine) -> Client {
        let (socket, MemoryEnds { to_server, from_server, gate: reading }) = memory_socket();
        let engine_ = engine.clone();
        let task = tokio::spawn(async move { engine_.run_connection(socket, Admission::default()).await.unwrap() });
        let mut client = Client { id: ConnectionId::new(), to_server, from_server, reading, task };
        let ready = client.recv().await;
        assert_eq!(ready["t"], "server_ready");
        client.id = ConnectionId::parse(ready["p"]["details"]["connection_id"].as_str().unwrap()).unwrap();
        client
    }

    fn send(&self, value: Value) {
        self.to_server.send(Ok(Message::text(value.to_string()))).unwrap();
    }

    async fn subscribe(&mut self, topic: &str) {
        self.send(json!({"t": "subscription_update", "p": {"topics": [topic]}}));
        assert_eq!(self.recv().await["t"], "subscription_update");
    }

    /// The next data frame, decoded, skipping server pings.
    async fn recv(&mut self) -> Value {
        loop {
            let value: Value = match self.from_server.recv().await.expect("connection open") {
                Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
                Message::Binary(bytes) => serde_json::from_slice(&bytes).unwrap(),
                other => panic!("expected a data frame, got {other:?}"),
            };
            if value["t"] != "ping" {
                return value;
            }
        }
    }

    /// Stops reading. The driver's sink holds one frame beyond the queue (like a socket
    /// buffer), so a direct event is sent to fill it: everything after it stays queued.
    async fn stop_reading(&self, engine: &Engine) {
        self.reading.set_stopped(true);
        let target = wsengine::Target::Connection(self.id);
        assert_eq!(engine.send(&target, Envelope::new("plug", json!({}))).unwrap(), 1);
        settle().await;
        assert_eq!(engine.connection_info(self.id).unwrap().queued_messages, 0, "the plug left the queue");
    }

    /// Reads again; the first frame is the plug.
    async fn resume_reading(&mut self) {
        self.reading.set_stopped(false);
        assert_eq!(self.recv().await["t"], "plug");
    }

    /// The close code, after whatever data frames were still queued.
    async fn recv_close(&mut self) -> u16 {
        loop {
            if let Message::Close(Some(frame)) = self.from_server.recv().await.expect("a close frame") {
                return frame.code.into();
            }
        }
    }
}

fn engine(configure: impl FnOnce(&mut Config)) -> Engine {
    let mut config = Config { log: "warn".into(), ..Config::default() };
    configure(&mut config);
    Engine::builder(config).build().unwrap()
}

fn tick(n: u64, pri: u8) -> Envelope {
    let mut envelope = Envelope::new("tick", json!({"n": n, "pad": "x".repeat(400)}));
    envelope.pri = Some(pri);
    envelope
}

/// Lets the drivers move what the bus handed them into their queues.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_subscriber_is_closed_while_100_others_receive_everything() {
    const BUDGET: usize = 32 * 1024;
    let engine = engine(|c| {
        c.ping_interval = Duration::from_secs(1);
        c.outbound_queue_bytes = BUDGET;
    });
    let mut stalled = Client::connect(&engine).await;
    stalled.subscribe("flood").await;
    let mut healthy = Vec::new();
    for _ in 0..100 {
        let mut client = Client::connect(&engine).await;
        client.subscribe("flood").await;
        healthy.push(client);
    }
    stalled.stop_reading(&engine).await;

    let mut peak_queued = 0;
    for n in 0..400u64 {
        let pri = [1, 3, 5, 8][n as usize % 4];
        let report = engine.publish("flood", tick(n, pri)).await.unwrap();
        assert_eq!((report.delivered, report.dropped), (101, 0));
        for client in &mut healthy {
            assert_eq!(client.recv().await["p"]["n"], n, "every healthy subscriber gets everything, in order");
        }
        let info = engine.connection_info(stalled.id).expect("still open while publishing");
        peak_queued = peak_queued.max(info.queued_bytes);
    }
    let info = engine.connection_info(stalled.id).unwrap();
    // ~180 KB were published to it; the 32 KiB budget held at most ~70 frames of it.
    assert!(info.queued_bytes <= BUDGET && peak_queued <= BUDGET, "queued {} (peak {peak_queued})", info.queued_bytes);
    assert!(info.queued_messages < 80, "{} queued", info.queued_messages);
    assert!(info.dropped >= 400 - 80, "dropped only {}", info.dropped);
    for client in &healthy {
        assert_eq!(engine.connection_info(client.id).unwrap().dropped, 0);
    }

    // Under pressure at two consecutive heartbeat ticks: closed with 1013.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(engine.connection_info(stalled.id).is_none(), "closed as a slow consumer");
    stalled.resume_reading().await;
    // What was kept is the most important part: the higher levels, each in publish order.
    let mut kept = Vec::new();
    loop {
        match stalled.from_server.recv().await.expect("close frame") {
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1013));
                break;
            }
            Message::Text(text) => {
                let value: Value = serde_json::from_str(text.as_str()).unwrap();
                if value["t"] == "tick" {
                    kept.push((value["pri"].as_u64().unwrap(), value["p"]["n"].as_u64().unwrap()));
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!kept.is_empty());
    assert!(kept.iter().all(|(pri, _)| *pri == 8), "only HIGH survives a flood of mixed priorities: {kept:?}");
    assert!(kept.windows(2).all(|w| w[0].1 < w[1].1), "one topic stays in publish order");
    tokio::time::timeout(Duration::from_secs(10), stalled.task).await.expect("driver ended").unwrap();

    // Everyone else is unaffected.
    engine.publish("flood", tick(1000, 5)).await.unwrap();
    for client in &mut healthy {
        assert_eq!(client.recv().await["p"]["n"], 1000);
    }
    assert_eq!(engine.connection_count(), 100);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_closed_once_a_critical_frame_waits_out_the_grace() {
    let engine = engine(|c| {
        c.ping_interval = Duration::from_secs(5);
        c.critical_grace = Duration::from_secs(3);
    });
    let mut client = Client::connect(&engine).await;
    let mut other = Client::connect(&engine).await;
    let start = tokio::time::Instant::now();
    client.stop_reading(&engine).await;
    // Nothing is over budget; the ping queued at 5 s cannot be written.
    tokio::time::sleep(Duration::from_millis(7900)).await;
    let info = engine.connection_info(client.id).expect("open until the grace has passed");
    assert_eq!((info.dropped, info.queued_messages), (0, 1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(engine.connection_info(client.id).is_none(), "closed 3 s after the ping was queued");
    assert!(start.elapsed() >= Duration::from_secs(8));
    // Reading again during the close grace, it gets the ping, then the close.
    client.resume_reading().await;
    assert_eq!(client.recv_close().await, 1013);
    // The other connection answers as usual.
    other.send(json!({"t": "ping", "p": {"timestamp": 1}}));
    assert_eq!(other.recv().await["t"], "PONG");
}

#[tokio::test(start_paused = true)]
async fn a_resumed_client_reads_by_priority_with_each_topic_in_order() {
    let engine = engine(|_| {});
    let mut client = Client::connect(&engine).await;
    client.subscribe("a").await;
    client.subscribe("b").await;
    client.stop_reading(&engine).await;
    engine.publish("a", tick(1, 3)).await.unwrap();
    engine.publish("b", tick(2, 8)).await.unwrap();
    engine.publish("a", tick(3, 8)).await.unwrap();
    engine.publish("b", tick(4, 1)).await.unwrap();
    let target = wsengine::Target::Connection(client.id);
    engine.send(&target, tick(5, 10)).unwrap();
    settle().await;
    assert_eq!(engine.connection_info(client.id).unwrap().queued_messages, 5);
    client.resume_reading().await;
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(client.recv().await["p"]["n"].as_u64().unwrap());
    }
    // CRITICAL first; then HIGH b-2; HIGH a-3 needs LOW a-1 out first; BACKGROUND b-4 last.
    assert_eq!(order, [5, 2, 1, 3, 4]);
}

struct LowPrioritySnapshots;

impl wsengine::services::handler::SnapshotProvider for LowPrioritySnapshots {
    fn snapshot(
        &self,
        _user_id: &str,
        topics: &[String],
    ) -> futures_util::future::BoxFuture<'static, Result<Vec<Envelope>, wsengine::services::message::BoxError>> {
        let events = topics
            .iter()
            .flat_map(|topic| {
                (0..3).map(move |n| {
                    let mut event = Envelope::new("snap", json!({"topic": topic, "n": n}));
                    event.pri = Some(1);
                    event
                })
            })
            .collect();
        Box::pin(async move { Ok(events) })
    }
}

#[tokio::test(start_paused = true)]
async fn snapshot_complete_does_not_overtake_its_background_snapshot_events() {
    let engine = Engine::builder(Config { log: "warn".into(), ..Config::default() })
        .snapshots(LowPrioritySnapshots)
        .build()
        .unwrap();
    let mut client = Client::connect(&engine).await;
    client.stop_reading(&engine).await;
    client.send(json!({"t": "sync_request", "p": {"topics": ["a"]}}));
    client.send(json!({"t": "ping", "p": {"timestamp": 1}}));
    settle().await;
    assert_eq!(engine.connection_info(client.id).unwrap().queued_messages, 5);
    client.resume_reading().await;
    let mut order = Vec::new();
    for _ in 0..5 {
        let value = client.recv().await;
        order.push(format!(
            "{}{}",
            value["t"].as_str().unwrap(),
            value["p"]["n"].as_u64().map(|n| n.to_string()).unwrap_or_default()
        ));
    }
    // The BACKGROUND snapshot events go before the CRITICAL snapshot_complete of the same
    // reply; the PONG of the next message queues behind that.
    assert_eq!(order, ["snap0", "snap1", "snap2", "snapshot_complete", "PONG"]);
}
