//! The connection driver over in-memory channels with a paused clock: the same stacks and
//! loop as a real socket, with time under the test's control.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use wsengine::services::tungstenite::{Error as WsError, Message};
use wsengine::{Admission, Config, Engine, Envelope};

/// One end of an in-memory WebSocket: the test holds the other end.
struct MemorySocket {
    incoming: mpsc::UnboundedReceiver<Result<Message, WsError>>,
    outgoing: mpsc::UnboundedSender<Message>,
    /// While set, the sink reports no room (a client that stopped reading).
    stall: Arc<Stall>,
}

#[derive(Default)]
struct Stall {
    stalled: AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Stall {
    fn set(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }
}

struct Peer {
    to_server: mpsc::UnboundedSender<Result<Message, WsError>>,
    from_server: mpsc::UnboundedReceiver<Message>,
    stall: Arc<Stall>,
}

fn pair() -> (MemorySocket, Peer) {
    let (to_server, incoming) = mpsc::unbounded_channel();
    let (outgoing, from_server) = mpsc::unbounded_channel();
    let stall = Arc::new(Stall::default());
    (MemorySocket { incoming, outgoing, stall: Arc::clone(&stall) }, Peer { to_server, from_server, stall })
}

impl Stream for MemorySocket {
    type Item = Result<Message, WsError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_recv(cx)
    }
}

impl Sink<Message> for MemorySocket {
    type Error = WsError;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        // Like a full TCP send buffer: pending until the peer reads again.
        *self.stall.waker.lock().unwrap() = Some(cx.waker().clone());
        if self.stall.stalled.load(Ordering::SeqCst) { Poll::Pending } else { Poll::Ready(Ok(())) }
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        self.outgoing.send(item).map_err(|_| WsError::ConnectionClosed)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
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
    peer.stall.set(true);
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
    peer.stall.set(false);
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
