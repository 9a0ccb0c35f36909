//! End-to-end behaviour over real sockets: handshake, system messages, subscriptions,
//! publishing through the HTTP API and the Rust API, direct sends, broadcasts, shutdown.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wsengine::client::Client;
use wsengine::services::connection::ConnectionId;
use wsengine::{AppBody, AppMessage, Envelope, Target, handler_fn};

#[tokio::test]
async fn ready_hello_subscribe_and_receive_from_http_and_rust_api() {
    let server = start(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let ready = client.server_ready().clone();
    assert_eq!(ready["c"], "WSE");
    assert_eq!(ready["seq"], 1);
    assert_eq!(ready["p"]["details"]["features"]["recovery"], false);
    assert_eq!(ready["p"]["details"]["user_id"], client.connection_id());
    assert!(ConnectionId::parse(client.connection_id()).is_some());

    let hello = client.hello().await.unwrap();
    assert_eq!(hello["p"]["protocol_version"], 1);
    assert_eq!(hello["p"]["ping_interval"], 25_000);
    assert_eq!(hello["p"]["limits"]["max_message_size"], 1_048_576);
    assert_eq!(hello["p"]["features"]["msgpack"], cfg!(feature = "msgpack"));
    assert_eq!(hello["p"]["connection_id"], client.connection_id());

    let ack = client.subscribe(&["prices"]).await.unwrap();
    assert_eq!(ack["p"]["success"], true);
    assert_eq!(ack["p"]["success_topics"], json!(["prices"]));
    assert_eq!(ack["p"]["failed_topics"], json!([]));
    assert_eq!(ack["p"]["recovered"], false);

    let (status, answer) =
        post(server.addr, "/api/publish", &json!({"topic": "prices", "t": "price_update", "p": {"AAPL": 187.5}})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], 1);
    let message = client.recv().await.unwrap();
    assert_eq!(message["t"], "price_update");
    assert_eq!(message["c"], "U");
    assert_eq!(message["p"]["AAPL"], 187.5);
    assert_eq!(message["id"], answer["id"]);
    assert!(message.get("seq").is_none(), "publications carry no seq");

    let report = server.engine.publish("prices", Envelope::new("price_update", json!({"AAPL": 188.0}))).await.unwrap();
    assert_eq!(report.delivered, 1);
    let message = client.recv().await.unwrap();
    assert_eq!(message["p"]["AAPL"], 188.0);
    server.stop().await;
}

#[tokio::test]
async fn a_thousand_subscribers_each_receive_a_publication_once() {
    let server = start(|_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..1000 {
        let mut client = Client::connect(&server.url()).await.unwrap();
        client.subscribe(&["prices"]).await.unwrap();
        clients.push(client);
    }
    let report = server.engine.publish("prices", Envelope::new("price_update", json!({"n": 1}))).await.unwrap();
    assert_eq!(report.delivered, 1000);
    let (status, answer) =
        post(server.addr, "/api/publish", &json!({"topic": "prices", "t": "price_update", "p": {"n": 2}})).await;
    assert_eq!((status, answer["delivered"].as_u64()), (200, Some(1000)));
    for client in &mut clients {
        assert_eq!(client.recv().await.unwrap()["p"]["n"], 1);
        assert_eq!(client.recv().await.unwrap()["p"]["n"], 2);
        assert!(client.recv_timeout(Duration::from_millis(1)).await.unwrap().is_none(), "no duplicates");
    }
    server.stop().await;
}

#[tokio::test]
async fn ping_gets_pong_with_client_timestamp_and_exact_prefix() {
    let server = start(|_| {}).await;
    let mut raw = RawSocket::connect(server.addr, "/wse?client_version=2.0.7&protocol_version=1").await;
    let ready = raw.read_json().await;
    assert_eq!(ready["t"], "server_ready");
    raw.send_frame(TEXT, br#"{"c":"WSE","t":"ping","p":{"timestamp":1795969337832},"v":1}"#).await;
    let (opcode, payload) = raw.read_frame().await.unwrap();
    assert_eq!(opcode, TEXT);
    assert!(payload.starts_with(br#"{"c":"WSE","t":"PONG""#), "{}", String::from_utf8_lossy(&payload));
    let pong: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(pong["p"]["client_timestamp"], 1795969337832u64);
    assert!(pong.get("id").is_none() && pong.get("seq").is_none());
    // A client PONG is swallowed; a WebSocket Ping control frame is answered with a Pong.
    raw.send_frame(TEXT, br#"{"c":"WSE","t":"PONG","p":{"server_timestamp":"x"},"v":1}"#).await;
    raw.send_frame(PING, b"hi").await;
    let (opcode, payload) = raw.read_frame().await.unwrap();
    assert_eq!((opcode, payload.as_slice()), (PONG, b"hi".as_slice()));
    server.stop().await;
}

#[tokio::test]
async fn server_heartbeat_and_idle_timeout() {
    let server = start(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let mut raw = RawSocket::connect(server.addr, "/wse").await;
    raw.read_json().await;
    let (opcode, payload) = raw.read_frame().await.unwrap();
    assert_eq!(opcode, TEXT);
    assert!(payload.starts_with(br#"{"c":"WSE","t":"ping""#));
    let ping: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(ping["p"]["server_time"].as_str().unwrap().ends_with('Z'));
    assert!(ping.get("v").is_none());
    assert_eq!(raw.read_close().await, Some(4408));
    server.stop().await;
}

#[tokio::test]
async fn unsubscribe_ack_and_patterns() {
    let server = start(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let ack = client.subscribe(&["news.*", "news.*", "sport"]).await.unwrap();
    assert_eq!(ack["p"]["success_topics"], json!(["news.*", "sport"]));
    server.engine.publish("news.eu", Envelope::new("headline", json!({"n": 1}))).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["n"], 1);

    let ack = client.unsubscribe(&["news.*", "never"]).await.unwrap();
    assert_eq!(ack["p"]["success"], true);
    assert_eq!(ack["p"]["success_topics"], json!([]));
    assert_eq!(ack["p"]["unsubscribed_topics"], json!(["news.*", "never"]));
    let report = server.engine.publish("news.eu", Envelope::new("headline", json!({"n": 2}))).await.unwrap();
    assert_eq!(report.delivered, 0);
    server.stop().await;
}

#[tokio::test]
async fn subscription_limit_and_invalid_requests() {
    let server = start(|c| c.max_subscriptions_per_connection = 2).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let ack = client.subscribe(&["a", "b", "c", ""]).await.unwrap();
    assert_eq!(ack["p"]["success_topics"], json!(["a", "b"]));
    assert_eq!(ack["p"]["failed_topics"], json!(["c", ""]));
    assert_eq!(ack["p"]["failure_reasons"], json!({"c": "LIMIT_EXCEEDED", "": "INVALID_TOPIC"}));

    client.send("subscription_update", json!({"action": "subscribe", "topics": []})).await.unwrap();
    let error = client.recv().await.unwrap();
    assert_eq!(error["t"], "error");
    assert_eq!(error["p"]["code"], "INVALID_SUBSCRIPTION");
    assert_eq!(error["p"]["recoverable"], true);
    client.send("subscription_update", json!({"action": "jump", "topics": ["a"]})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["code"], "INVALID_ACTION");
    server.stop().await;
}

#[tokio::test]
async fn sync_request_always_ends_with_snapshot_complete() {
    struct Prices;
    impl wsengine::SnapshotProvider for Prices {
        fn snapshot(
            &self,
            _user: &str,
            topics: &[String],
        ) -> futures_util::future::BoxFuture<'static, Result<Vec<Envelope>, wsengine::services::message::BoxError>>
        {
            let events = topics.iter().map(|t| Envelope::new("prices_snapshot", json!({"topic": t}))).collect();
            Box::pin(async move { Ok(events) })
        }
    }
    let plain = start(|_| {}).await;
    let mut client = Client::connect(&plain.url()).await.unwrap();
    client.send("sync_request", json!({"topics": ["prices"], "include_snapshots": true})).await.unwrap();
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["t"], "snapshot_complete");
    assert_eq!(complete["c"], "WSE");
    assert_eq!(complete["p"], json!({"topics": ["prices"], "count": 0}));
    plain.stop().await;

    let server = start_with(|_| {}, |b| b.snapshots(Prices)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.subscribe(&["prices", "news"]).await.unwrap();
    client.send("sync_request", json!({"include_snapshots": true})).await.unwrap();
    let first = client.recv().await.unwrap();
    assert_eq!((first["c"].as_str(), first["t"].as_str()), (Some("S"), Some("prices_snapshot")));
    assert_eq!(first["p"]["topic"], "news");
    assert_eq!(client.recv().await.unwrap()["p"]["topic"], "prices");
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["p"], json!({"topics": ["news", "prices"], "count": 2}));
    server.stop().await;
}

#[tokio::test]
async fn batches_are_unpacked_and_handler_replies_come_back() {
    let echo = handler_fn(|message: AppMessage| async move {
        let AppBody::Message(m) = message.body else { return Ok(vec![]) };
        Ok(vec![Envelope::new("echo_reply", m.p().cloned().unwrap_or_default())])
    });
    let server = start_with(|_| {}, |b| b.handler(echo)).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let batch = json!({"messages": [
        {"t": "chat_message", "p": {"text": "a"}},
        "not an object",
        {"t": "ping", "p": {"timestamp": 7}},
        {"type": "chat_message", "payload": {"text": "b"}},
    ], "count": 4});
    client.send("batch", batch).await.unwrap();
    let first = client.recv().await.unwrap();
    assert_eq!((first["t"].as_str(), first["p"]["text"].as_str()), (Some("echo_reply"), Some("a")));
    assert_eq!(client.recv().await.unwrap()["t"], "PONG");
    assert_eq!(client.recv().await.unwrap()["p"]["text"], "b");
    server.stop().await;
}

#[tokio::test]
async fn direct_sends_broadcasts_and_the_api_key() {
    let server = start(|c| c.api_key = Some("test-api-key".into())).await;
    let mut a = Client::connect(&server.url()).await.unwrap();
    let mut b = Client::connect(&server.url()).await.unwrap();
    let body = json!({"connection_id": a.connection_id(), "t": "notice", "p": {"to": "a"}});
    let (status, _) = post(server.addr, "/api/send", &body).await;
    assert_eq!(status, 401);
    let (status, answer) = http(server.addr, "POST", "/api/send", Some(&body.to_string()), Some("test-api-key")).await;
    assert_eq!((status, answer["delivered"].as_u64()), (200, Some(1)));
    let notice = a.recv().await.unwrap();
    assert_eq!((notice["t"].as_str(), notice["p"]["to"].as_str()), (Some("notice"), Some("a")));
    assert!(notice["seq"].as_u64().unwrap() >= 2, "per-connection events carry seq");

    let user = b.server_ready()["p"]["details"]["user_id"].as_str().unwrap().to_owned();
    assert_eq!(server.engine.send(&Target::User(user), Envelope::new("notice", json!({"to": "b"}))).unwrap(), 1);
    assert_eq!(b.recv().await.unwrap()["p"]["to"], "b");

    let broadcast = json!({"t": "maintenance", "p": {"in": 5}});
    let (status, answer) =
        http(server.addr, "POST", "/api/broadcast", Some(&broadcast.to_string()), Some("test-api-key")).await;
    assert_eq!((status, answer["delivered"].as_u64()), (200, Some(2)));
    assert_eq!(a.recv().await.unwrap()["t"], "maintenance");
    assert_eq!(b.recv().await.unwrap()["t"], "maintenance");

    for bad in
        ["{", r#"{"t": "ping", "topic": "x"}"#, r#"{"topic": "x", "t": "ok", "p": 5}"#, r#"{"t": "x", "extra": 1}"#]
    {
        let (status, answer) = http(server.addr, "POST", "/api/publish", Some(bad), Some("test-api-key")).await;
        assert_eq!(status, 400, "{bad}");
        assert!(answer["error"].is_string());
    }
    let (status, health) = http(server.addr, "GET", "/health", None, None).await;
    assert_eq!(status, 200);
    assert_eq!((health["status"].as_str(), health["connections"].as_u64()), (Some("ok"), Some(2)));
    server.stop().await;
}

#[tokio::test]
async fn during_a_key_rotation_both_api_keys_are_accepted() {
    let server = start(|c| {
        c.api_key = Some("new-api-key".into());
        c.api_previous_key = Some("old-api-key".into());
    })
    .await;
    let body = json!({"topic": "news", "t": "headline", "p": {}}).to_string();
    for (key, expected) in
        [(Some("new-api-key"), 200), (Some("old-api-key"), 200), (Some("old-api-keY"), 401), (None, 401)]
    {
        let (status, _) = http(server.addr, "POST", "/api/publish", Some(&body), key).await;
        assert_eq!(status, expected, "{key:?}");
    }
    let printed = server.engine.config().to_toml_string();
    assert!(!printed.contains("old-api-key") && !printed.contains("new-api-key"), "keys are never printed");
    server.stop().await;
}

#[cfg(all(feature = "compression", feature = "msgpack"))]
#[tokio::test]
async fn msgpack_connections_and_compressed_publications() {
    let server = start(|_| {}).await;
    let mut packed = Client::connect(&format!("ws://{}/wse?format=msgpack", server.addr)).await.unwrap();
    let mut plain = Client::connect(&server.url()).await.unwrap();
    packed.subscribe(&["big"]).await.unwrap();
    plain.subscribe(&["big"]).await.unwrap();
    let text = "market data ".repeat(500);
    server.engine.publish("big", Envelope::new("report", json!({"text": text}))).await.unwrap();
    assert_eq!(packed.recv().await.unwrap()["p"]["text"], text);
    assert_eq!(plain.recv().await.unwrap()["p"]["text"], text);

    let mut raw_packed = RawSocket::connect(server.addr, "/wse?format=msgpack").await;
    let mut raw_plain = RawSocket::connect(server.addr, "/wse").await;
    for raw in [&mut raw_packed, &mut raw_plain] {
        raw.read_json().await;
        raw.send_frame(TEXT, br#"{"t":"subscription_update","p":{"topics":["big"]}}"#).await;
        raw.read_json().await;
    }
    server.engine.publish("big", Envelope::new("report", json!({"text": text}))).await.unwrap();
    let (opcode, payload) = raw_packed.read_frame().await.unwrap();
    assert!(opcode == BINARY && payload.starts_with(b"M:"));
    let (opcode, payload) = raw_plain.read_frame().await.unwrap();
    assert!(opcode == BINARY && payload.starts_with(b"C:\x78\x01"), "large publications are zlib level 1");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_with_1001_and_drain_with_4300() {
    let server = start(|_| {}).await;
    let mut raw = RawSocket::connect(server.addr, "/wse").await;
    raw.read_json().await;
    server.engine.drain();
    assert_eq!(raw.read_close().await, Some(4300));
    let (status, health) = http(server.addr, "GET", "/health", None, None).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("draining")));
    server.stop().await;

    let server = start(|_| {}).await;
    let mut raw = RawSocket::connect(server.addr, "/wse").await;
    raw.read_json().await;
    let addr = server.addr;
    server.stop().await;
    assert_eq!(raw.read_close().await, Some(1001));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[tokio::test]
async fn connection_limit_answers_503_before_the_upgrade() {
    let server = start(|c| c.max_connections = 2).await;
    let _a = Client::connect(&server.url()).await.unwrap();
    let _b = Client::connect(&server.url()).await.unwrap();
    match Client::connect(&server.url()).await {
        Err(wsengine::client::ClientError::WebSocket(tungstenite_error)) => {
            assert!(tungstenite_error.to_string().contains("503"), "{tungstenite_error}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(_a);
    // The slot frees once the server notices the closed socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if Client::connect(&server.url()).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn reserved_types_and_bad_topics_are_refused_by_the_rust_api() {
    let server = start(|_| {}).await;
    assert!(server.engine.publish("t", Envelope::new("server_ready", json!({}))).await.is_err());
    assert!(server.engine.publish("", Envelope::new("x", json!({}))).await.is_err());
    assert!(server.engine.broadcast(Envelope::new("ping", json!({}))).is_err());
    let huge = Envelope::new("blob", json!({"data": "x".repeat(1 << 20)}));
    let target = Target::User("anyone".into());
    assert!(matches!(server.engine.send(&target, huge.clone()), Err(wsengine::SendError::TooLarge(_))));
    assert!(matches!(server.engine.publish("t", huge.clone()).await, Err(wsengine::SendError::TooLarge(_))));
    assert!(matches!(server.engine.broadcast(huge), Err(wsengine::SendError::TooLarge(_))));
    server.stop().await;
}
