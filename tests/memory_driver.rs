//! The connection driver over in-memory channels with a paused clock: the same stacks and
//! loop as a real socket, with time under the test's control.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::memory::{MemorySocket, ReadGate, memory_socket};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use wsengine::services::tungstenite::{Error as WsError, Message};
use wsengine::{Admission, Config, Engine, Envelope};

struct Peer {
    to_server: mpsc::UnboundedSender<Result<Message, WsError>>,
    from_server: mpsc::UnboundedReceiver<Message>,
    stall: Arc<ReadGate>,
}

fn pair() -> (MemorySocket, Peer) {
    let (socket, ends) = memory_socket();
    (socket, Peer { to_server: ends.to_server, from_server: ends.from_server, stall: ends.gate })
}

impl Peer {
    fn send(&self, value: Value) {
        self.to_server.send(Ok(Message::text(value.to_string()))).unwrap();
    }

    async fn recv(&mut self) -> Message {
        self.from_server.recv().await.expect("driver still running")
    }

    async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
            Message::Binary(bytes) => serde_json::from_slice(&bytes).unwrap(),
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    async fn recv_close(&mut self) -> u16 {
        loop {
            if let Message::Close(Some(frame)) = self.recv().await {
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

fn spawn(engine: &Engine, socket: MemorySocket) -> tokio::task::JoinHandle<()> {
    let engine = engine.clone();
    tokio::spawn(async move { engine.run_connection(socket, Admission::default()).await.unwrap() })
}

#[tokio::test(start_paused = true)]
async fn server_ready_first_then_answers_in_order() {
    let engine = engine(|_| {});
    let (socket, mut peer) = pair();
    let task = spawn(&engine, socket);
    let ready = peer.recv_json().await;
    assert_eq!((ready["t"].as_str(), ready["seq"].as_u64()), (Some("server_ready"), Some(1)));
    peer.send(json!({"t": "subscription_update", "p": {"topics": ["a"]}}));
    peer.send(json!({"t": "sync_request", "p": {}}));
    peer.send(json!({"t": "ping", "p": {"timestamp": 3}}));
    assert_eq!(peer.recv_json().await["t"], "subscription_update");
    let complete = peer.recv_json().await;
    assert_eq!(complete["p"]["topics"], json!(["a"]), "sync_request sees the subscription sent before it");
    assert_eq!(peer.recv_json().await["p"]["client_timestamp"], 3);
    drop(peer);
    task.await.unwrap();
    assert_eq!(engine.connection_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_every_interval_and_idle_close_4408() {
    let engine = engine(|c| {
        c.ping_interval = Duration::from_secs(25);
        c.idle_timeout = Duration::from_secs(60);
    });
    let (socket, mut peer) = pair();
    let task = spawn(&engine, socket);
    peer.recv_json().await;
    let start = tokio::time::Instant::now();
    for n in 1..=2 {
        let ping = peer.recv_json().await;
        assert_eq!(ping["t"], "ping");
        assert_eq!(start.elapsed().as_secs(), 25 * n);
    }
    // Idle since the start: the tick at 75 s sees more than 60 s without a data frame.
    assert_eq!(peer.recv_close().await, 4408);
    assert_eq!(start.elapsed().as_secs(), 75);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn activity_keeps_a_connection_open() {
    let engine = engine(|c| {
        c.ping_interval = Duration::from_secs(10);
        c.idle_timeout = Duration::from_secs(15);
    });
    let (socket, mut peer) = pair();
    let _task = spawn(&engine, socket);
    peer.recv_json().await;
    for _ in 0..6 {
        let ping = peer.recv_json().await;
        assert_eq!(ping["t"], "ping");
        peer.send(json!({"c": "WSE", "t": "PONG", "p": {"server_timestamp": ping["p"]["server_time"]}}));
    }
    assert_eq!(engine.connection_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_consumer_is_closed_with_1013_and_memory_stays_bounded() {
    let engine = engine(|c| {
        c.ping_interval = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(60);
        c.outbound_queue_bytes = 64 * 1024;
    });
    let (socket, mut peer) = pair();
    let (healthy_socket, mut healthy) = pair();
    let task = spawn(&engine, socket);
    let _healthy_task = spawn(&engine, healthy_socket);
    let ready = peer.recv_json().await;
    let stalled_id =
        wsengine::services::connection::ConnectionId::parse(ready["p"]["details"]["connection_id"].as_str().unwrap())
            .unwrap();
    healthy.recv_json().await;
    for p in [&mut peer, &mut healthy] {
        p.send(json!({"t": "subscription_update", "p": {"topics": ["flood"]}}));
        assert_eq!(p.recv_json().await["t"], "subscription_update");
    }
    peer.stall.set_stopped(true);
    let payload = "x".repeat(500);
    for n in 0..2000 {
        engine.publish("flood", Envelope::new("tick", json!({"n": n, "pad": payload}))).await.unwrap();
        assert_eq!(healthy.recv_json().await["p"]["n"], n, "the healthy subscriber gets everything in order");
        tokio::task::yield_now().await;
    }
    // About 1.1 MB was published; the 64 KiB budget kept at most ~120 frames of it.
    let info = engine.connection_info(stalled_id).expect("still registered until the next ticks");
    assert!(info.dropped > 1800, "dropped only {}: buffered without bound?", info.dropped);
    // Over budget at two consecutive heartbeat ticks: the driver decides to close with 1013.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(engine.connection_info(stalled_id).is_none(), "unregistered once the close was decided");
    // The peer reads again during the close grace period: it sees the queued frames, then the close.
    peer.stall.set_stopped(false);
    assert_eq!(peer.recv_close().await, 1013);
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("driver ended").unwrap();
    assert_eq!(engine.connection_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn direct_sends_and_disconnect() {
    let engine = engine(|_| {});
    let (socket, mut peer) = pair();
    let task = spawn(&engine, socket);
    let ready = peer.recv_json().await;
    let id =
        wsengine::services::connection::ConnectionId::parse(ready["p"]["details"]["connection_id"].as_str().unwrap())
            .unwrap();
    let target = wsengine::Target::Connection(id);
    assert_eq!(engine.send(&target, Envelope::new("notice", json!({"n": 1}))).unwrap(), 1);
    let notice = peer.recv_json().await;
    assert_eq!((notice["t"].as_str(), notice["seq"].as_u64()), (Some("notice"), Some(2)));
    assert!(engine.disconnect(id, wsengine::CloseCode(4403), "Forbidden"));
    assert_eq!(peer.recv_close().await, 4403);
    task.await.unwrap();
}
