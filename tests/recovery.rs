//! Recovery over real sockets (PROTOCOL.md §9): stamping, replay on reconnect while publishing
//! continues, every `recovered: false` row of the §9.4 table, byte-identical replays, shared
//! stamps, idempotent publishes and the ACL.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsengine::client::Client;
use wsengine::{Config, Envelope};

fn recovery(config: &mut Config) {
    config.recovery_enabled = true;
}

fn tick(n: u64) -> Envelope {
    Envelope::new("tick", json!({ "n": n }))
}

async fn connect(server: &TestServer) -> Client {
    let client = Client::connect(&server.url()).await.expect("connects");
    assert_eq!(client.server_ready()["p"]["details"]["features"]["recovery"], true);
    client
}

/// Sends a subscribe with `recover: true`; returns the messages before the ack, and the ack.
async fn recover(client: &mut Client, topics: &[&str], positions: Value) -> (Vec<Value>, Value) {
    let p = json!({"action": "subscribe", "topics": topics, "recover": true, "recovery": positions});
    client.send("subscription_update", p).await.unwrap();
    let mut before = Vec::new();
    loop {
        let message = client.recv().await.expect("answer");
        if message["t"] == "subscription_update" {
            return (before, message);
        }
        before.push(message);
    }
}

fn offset(message: &Value) -> u64 {
    message["o"].as_u64().expect("stamped")
}

#[tokio::test]
async fn a_reconnecting_subscriber_gets_every_offset_exactly_once_in_order() {
    let server = start(|c| {
        recovery(c);
        c.recovery_buffer_size = 2048;
        c.recovery_max_replay = 2000;
    })
    .await;
    let engine = server.engine.clone();
    let mut client = connect(&server).await;
    client.subscribe(&["prices"]).await.unwrap();
    for n in 0..10 {
        engine.publish("prices", tick(n)).await.unwrap();
    }
    let mut last = Value::Null;
    for expected in 0..10 {
        last = client.recv().await.unwrap();
        assert_eq!(offset(&last), expected);
    }
    let epoch = last["e"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 8);
    assert!(epoch.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    client.close().await.unwrap();

    for n in 10..510 {
        engine.publish("prices", tick(n)).await.unwrap();
    }
    let mut client = connect(&server).await;
    // Publishing goes on while the subscriber recovers.
    let publisher = tokio::spawn({
        let engine = engine.clone();
        async move {
            for n in 510..1010 {
                engine.publish("prices", tick(n)).await.unwrap();
                if n % 4 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    });
    let (replayed, ack) = recover(&mut client, &["prices"], json!({"prices": {"epoch": epoch, "offset": 9}})).await;
    let entry = &ack["p"]["recovery"]["prices"];
    assert_eq!(ack["p"]["recovered"], true, "{ack}");
    assert_eq!(entry["recovered"], true);
    assert_eq!(entry["epoch"], epoch.as_str());
    let head = entry["offset"].as_u64().unwrap();
    assert!(head >= 509);
    assert_eq!(entry["count"].as_u64().unwrap(), head - 9);
    assert_eq!(replayed.iter().map(offset).collect::<Vec<_>>(), (10..=head).collect::<Vec<_>>());
    publisher.await.unwrap();
    println!("recovered at head {head}: {} replayed, {} live", head - 9, 1009 - head);
    let mut received: Vec<u64> = replayed.iter().map(offset).collect();
    while received.last() != Some(&1009) {
        let message = client.recv().await.unwrap();
        assert_eq!(message["tp"], "prices");
        received.push(offset(&message));
    }
    assert_eq!(received, (10..1010).collect::<Vec<_>>(), "every offset exactly once, in order");
    assert_eq!(client.recv_timeout(Duration::from_millis(200)).await.unwrap(), None, "no duplicates later");
    server.stop().await;
}

#[tokio::test]
async fn every_unrecovered_row_reports_the_current_head() {
    let server = start(|c| {
        recovery(c);
        c.recovery_buffer_size = 16;
        c.recovery_max_replay = 5;
    })
    .await;
    let engine = server.engine.clone();
    let topics = ["old", "wrong", "many", "ahead", "bad", "ok", "unasked", "upper"];
    let mut epochs = std::collections::HashMap::new();
    for topic in topics {
        for n in 0..20 {
            let report = engine.publish(topic, tick(n)).await.unwrap();
            let stamped: Value = serde_json::from_str(report.publication.json().as_str()).unwrap();
            epochs.insert(topic, stamped["e"].as_str().unwrap().to_owned());
        }
    }
    let wrong_epoch = format!("{:08x}", u32::from_str_radix(&epochs["wrong"], 16).unwrap().wrapping_add(1));
    let mut client = connect(&server).await;
    let positions = json!({
        "old": {"epoch": epochs["old"], "offset": 2},          // 3 was evicted from the ring of 16
        "wrong": {"epoch": wrong_epoch, "offset": 18},
        "many": {"epoch": epochs["many"], "offset": 13},       // 6 missed > cap of 5
        "ahead": {"epoch": epochs["ahead"], "offset": 20},     // head is 19
        "bad": {"epoch": "not-hex", "offset": 18},
        "ok": {"epoch": epochs["ok"], "offset": 17},
        "upper": {"epoch": epochs["upper"].to_uppercase(), "offset": 19},
        "never": {"epoch": "00000001", "offset": 0},
        "news.*": {"epoch": "00000001", "offset": 0},
    });
    let mut subscribed: Vec<&str> = topics.to_vec();
    subscribed.extend(["never", "news.*"]);
    let (replayed, ack) = recover(&mut client, &subscribed, positions).await;
    let recovery = &ack["p"]["recovery"];
    for topic in ["old", "wrong", "many", "ahead", "bad", "unasked"] {
        let expected =
            json!({"epoch": epochs[topic], "offset": 19, "recoverable": true, "recovered": false, "count": 0});
        assert_eq!(recovery[topic], expected, "{topic}");
    }
    assert_eq!(
        recovery["ok"],
        json!({"epoch": epochs["ok"], "offset": 19, "recoverable": true, "recovered": true, "count": 2})
    );
    assert_eq!(recovery["upper"]["recovered"], true, "epochs compare numerically");
    assert_eq!(recovery["upper"]["count"], 0);
    for topic in ["never", "news.*"] {
        let expected = json!({"epoch": null, "offset": 0, "recoverable": false, "recovered": false, "count": 0});
        assert_eq!(recovery[topic], expected, "{topic}");
    }
    assert_eq!(ack["p"]["recovered"], false, "not every topic recovered");
    assert_eq!(
        replayed.iter().map(|m| (m["tp"].as_str().unwrap(), offset(m))).collect::<Vec<_>>(),
        [("ok", 18), ("ok", 19)]
    );

    // All topics recovered: the top-level flag is true.
    let (_, ack) = recover(&mut client, &["ok"], json!({"ok": {"epoch": epochs["ok"], "offset": 19}})).await;
    assert_eq!(ack["p"]["recovered"], true);
    // No recover flag: positions, nothing recovered.
    client
        .send(
            "subscription_update",
            json!({"topics": ["ok"], "recovery": {"ok": {"epoch": epochs["ok"], "offset": 17}}}),
        )
        .await
        .unwrap();
    let ack = client.recv().await.unwrap();
    assert_eq!(ack["p"]["recovered"], false);
    assert_eq!(ack["p"]["recovery"]["ok"]["recovered"], false);
    assert_eq!(ack["p"]["recovery"]["ok"]["offset"], 19);
    server.stop().await;
}

#[tokio::test]
async fn idle_and_evicted_buffers_start_a_new_epoch() {
    let server = start(|c| {
        recovery(c);
        c.recovery_ttl = Duration::from_millis(300);
        c.recovery_memory = 1 << 20;
    })
    .await;
    let engine = server.engine.clone();
    let first = engine.publish("idle", tick(0)).await.unwrap();
    let first: Value = serde_json::from_str(first.publication.json().as_str()).unwrap();
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut client = connect(&server).await;
    let (_, ack) = recover(&mut client, &["idle"], json!({"idle": {"epoch": first["e"], "offset": 0}})).await;
    assert_eq!(ack["p"]["recovery"]["idle"]["epoch"], Value::Null, "the idle buffer is gone");
    let again = engine.publish("idle", tick(1)).await.unwrap();
    let again: Value = serde_json::from_str(again.publication.json().as_str()).unwrap();
    assert_ne!(again["e"], first["e"]);
    assert_eq!(again["o"], 0);
    let _ = client.recv().await.unwrap();
    let (_, ack) = recover(&mut client, &["idle"], json!({"idle": {"epoch": first["e"], "offset": 0}})).await;
    assert_eq!(ack["p"]["recovery"]["idle"]["recovered"], false, "old epoch");
    assert_eq!(ack["p"]["recovery"]["idle"]["epoch"], again["e"]);

    // Memory budget of 1 MiB: two 600 KB publications cannot both be kept.
    let big = |n: u64| Envelope::new("blob", json!({"n": n, "data": "x".repeat(600_000)}));
    let a = engine.publish("big-a", big(0)).await.unwrap();
    let a: Value = serde_json::from_str(a.publication.json().as_str()).unwrap();
    engine.publish("big-b", big(1)).await.unwrap();
    let (_, ack) = recover(&mut client, &["big-a"], json!({"big-a": {"epoch": a["e"], "offset": 0}})).await;
    assert_eq!(ack["p"]["recovery"]["big-a"]["epoch"], Value::Null, "evicted by the memory budget");
    server.stop().await;
}

/// A raw WebSocket subscriber that keeps the exact text of every frame.
struct RawSubscriber {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl RawSubscriber {
    async fn connect(server: &TestServer) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(server.url()).await.unwrap();
        let mut subscriber = RawSubscriber { socket };
        assert!(subscriber.next_text().await.contains("server_ready"));
        subscriber
    }

    async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next()).await.unwrap().unwrap();
            match message.unwrap() {
                Message::Text(text) => return text.to_string(),
                Message::Binary(bytes) => panic!("unexpected binary frame {bytes:?}"),
                _ => {}
            }
        }
    }

    async fn send(&mut self, value: Value) {
        self.socket.send(Message::text(value.to_string())).await.unwrap();
    }

    /// Subscribes (with `p` merged in) and returns the frames before the ack, and the ack.
    async fn subscribe(&mut self, p: Value) -> (Vec<String>, Value) {
        self.send(json!({"t": "subscription_update", "p": p})).await;
        let mut before = Vec::new();
        loop {
            let text = self.next_text().await;
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["t"] == "subscription_update" {
                return (before, value);
            }
            before.push(text);
        }
    }
}

#[tokio::test]
async fn replays_are_byte_identical_to_the_live_copies_and_stamps_are_shared() {
    let server = start(recovery).await;
    let engine = server.engine.clone();
    let mut live_a = RawSubscriber::connect(&server).await;
    let mut live_b = RawSubscriber::connect(&server).await;
    live_a.subscribe(json!({"topics": ["t"]})).await;
    live_b.subscribe(json!({"topics": ["t"]})).await;
    for n in 0..5 {
        engine.publish("t", tick(n)).await.unwrap();
    }
    let mut copies = Vec::new();
    for _ in 0..5 {
        let (a, b) = (live_a.next_text().await, live_b.next_text().await);
        assert_eq!(a, b, "every subscriber gets the same bytes, stamp included");
        assert!(a.starts_with(r#"{"tp":"t","e":""#), "stamp keys first: {a}");
        copies.push(a);
    }
    let first: Value = serde_json::from_str(&copies[0]).unwrap();
    let mut late = RawSubscriber::connect(&server).await;
    let (replayed, ack) = late
        .subscribe(json!({"topics": ["t"], "recover": true, "recovery": {"t": {"epoch": first["e"], "offset": 0}}}))
        .await;
    assert_eq!(ack["p"]["recovery"]["t"]["count"], 4);
    assert_eq!(replayed, copies[1..], "replays are the stored bytes");
    server.stop().await;
}

#[tokio::test]
async fn a_publish_retried_with_the_same_id_is_delivered_once() {
    let server = start(recovery).await;
    let engine = server.engine.clone();
    let mut client = connect(&server).await;
    client.subscribe(&["orders"]).await.unwrap();
    let with_id = |n: u64| Envelope { id: Some("order-42".into()), ..tick(n) };
    let first = engine.publish("orders", with_id(1)).await.unwrap();
    let retry = engine.publish("orders", with_id(1)).await.unwrap();
    assert_eq!(first.publication.json(), retry.publication.json(), "the retry reports the original stamp");
    // The same id on another topic is another publication.
    engine.publish("other", with_id(1)).await.unwrap();
    let next = engine.publish("orders", tick(2)).await.unwrap();
    let got = client.recv().await.unwrap();
    assert_eq!((got["id"].as_str(), offset(&got)), (Some("order-42"), 0));
    let got = client.recv().await.unwrap();
    assert_eq!(offset(&got), 1, "delivered once; the next publication follows without a gap");
    assert_ne!(got["id"], "order-42");
    assert!(next.publication.json().as_str().contains(r#""o":1"#));
    server.stop().await;
}

#[cfg(feature = "auth")]
#[tokio::test]
async fn a_denied_topic_is_never_replayed_and_its_position_never_revealed() {
    use wsengine::layers::auth::{Grant, auth_fn};
    use wsengine::services::acl::TopicAcl;
    let hook = auth_fn(|_request| async move {
        Ok(Grant { acl: Some(TopicAcl::new(vec![], vec!["secret*".into()])), ..Grant::user("eve") })
    });
    let server = start_with(recovery, |builder| builder.auth_hook(hook)).await;
    let engine = server.engine.clone();
    let mut epoch = Value::Null;
    for topic in ["secret", "secret.plans", "public.news"] {
        for n in 0..3 {
            let report = engine.publish(topic, tick(n)).await.unwrap();
            epoch = serde_json::from_str::<Value>(report.publication.json().as_str()).unwrap()["e"].clone();
        }
    }
    let mut client = connect(&server).await;
    let (replayed, ack) = recover(
        &mut client,
        &["secret", "public.*"],
        json!({"secret": {"epoch": epoch, "offset": 0}, "public.*": {"epoch": epoch, "offset": 0}}),
    )
    .await;
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(ack["p"]["failed_topics"], json!(["secret"]));
    assert_eq!(ack["p"]["failure_reasons"]["secret"], "FORBIDDEN");
    assert!(ack["p"]["recovery"].get("secret").is_none(), "no position for a denied topic");
    assert_eq!(ack["p"]["recovery"]["public.*"]["epoch"], Value::Null);
    // A pattern that covers denied topics still never delivers them.
    let (_, ack) = recover(&mut client, &["*"], json!({"*": {"epoch": epoch, "offset": 0}})).await;
    assert_eq!(ack["p"]["recovery"]["*"]["recoverable"], false);
    engine.publish("secret.plans", tick(9)).await.unwrap();
    engine.publish("public.news", tick(9)).await.unwrap();
    let got = client.recv().await.unwrap();
    assert_eq!(got["tp"], "public.news");
    server.stop().await;
}

#[tokio::test]
async fn without_recovery_nothing_is_stamped_and_the_ack_has_no_recovery() {
    let server = start(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    assert_eq!(client.server_ready()["p"]["details"]["features"]["recovery"], false);
    let hello = client.hello().await.unwrap();
    assert_eq!(hello["p"]["features"]["recovery"], false);
    let (_, ack) = recover(&mut client, &["t"], json!({"t": {"epoch": "00000001", "offset": 0}})).await;
    assert_eq!(ack["p"]["recovered"], false);
    assert!(ack["p"].get("recovery").is_none());
    server.engine.publish("t", tick(0)).await.unwrap();
    let got = client.recv().await.unwrap();
    assert!(got.get("tp").is_none() && got.get("e").is_none() && got.get("o").is_none());
    server.stop().await;
}

#[tokio::test]
async fn a_replay_that_would_overflow_the_outbound_queue_is_refused() {
    let server = start(|c| {
        recovery(c);
        c.outbound_queue_messages = 64;
    })
    .await;
    let engine = server.engine.clone();
    let mut epoch = Value::Null;
    for n in 0..100 {
        let report = engine.publish("t", tick(n)).await.unwrap();
        epoch = serde_json::from_str::<Value>(report.publication.json().as_str()).unwrap()["e"].clone();
    }
    let mut client = connect(&server).await;
    let (replayed, ack) = recover(&mut client, &["t"], json!({"t": {"epoch": epoch, "offset": 0}})).await;
    assert!(replayed.is_empty());
    assert_eq!(ack["p"]["recovery"]["t"]["recovered"], false, "99 replays do not fit a queue of 64");
    assert_eq!(ack["p"]["recovery"]["t"]["offset"], 99);
    let (replayed, ack) = recover(&mut client, &["t"], json!({"t": {"epoch": epoch, "offset": 50}})).await;
    assert_eq!((replayed.len(), &ack["p"]["recovery"]["t"]["recovered"]), (49, &json!(true)));
    server.stop().await;
}

#[cfg(feature = "signing")]
#[tokio::test]
async fn signed_publications_are_signed_after_stamping_and_replayed_with_their_signature() {
    use wsengine::layers::sign::Signer;
    const SECRET: &str = "test-only-secret-0123456789abcdef";
    let server = start(|c| {
        recovery(c);
        c.signing = "verify".into();
        c.signing_secret = Some(SECRET.into());
    })
    .await;
    let mut live = RawSubscriber::connect(&server).await;
    live.subscribe(json!({"topics": ["t"]})).await;
    for n in 0..2 {
        server.engine.publish("t", tick(n)).await.unwrap();
    }
    let (first, second) = (live.next_text().await, live.next_text().await);
    let signer = Signer::new(SECRET).unwrap();
    let value: Value = serde_json::from_str(&second).unwrap();
    assert!(value["sig"].is_string() && value["o"] == 1);
    assert!(signer.verify_mac(value.as_object().unwrap()), "the signature covers the stamp");
    let epoch = serde_json::from_str::<Value>(&first).unwrap()["e"].clone();
    let mut late = RawSubscriber::connect(&server).await;
    let (replayed, _) = late
        .subscribe(json!({"topics": ["t"], "recover": true, "recovery": {"t": {"epoch": epoch, "offset": 0}}}))
        .await;
    assert_eq!(replayed, [second]);
    server.stop().await;
}

#[cfg(feature = "filters")]
#[tokio::test]
async fn filtered_subscriptions_are_unstamped_and_not_recoverable() {
    let server = start(recovery).await;
    let mut filtered = connect(&server).await;
    let mut plain = connect(&server).await;
    plain.subscribe(&["prices"]).await.unwrap();
    server.engine.publish("prices", tick(0)).await.unwrap();
    let epoch = plain.recv().await.unwrap()["e"].clone();

    // A client running §9.5 gap detection would take the offsets its filter skips for lost ones.
    let p = json!({
        "action": "subscribe", "topics": ["prices"], "filter": {"n": {"$gte": 2}},
        "recover": true, "recovery": {"prices": {"epoch": epoch, "offset": 0}},
    });
    filtered.send("subscription_update", p).await.unwrap();
    let ack = filtered.recv().await.unwrap();
    assert_eq!(ack["t"], "subscription_update", "no replay precedes the ack: {ack}");
    assert_eq!(
        ack["p"]["recovery"]["prices"],
        json!({"epoch": null, "offset": 0, "recoverable": false, "recovered": false, "count": 0})
    );
    for n in 1..4 {
        server.engine.publish("prices", tick(n)).await.unwrap();
    }
    for n in 2..4 {
        let message = filtered.recv().await.unwrap();
        assert_eq!(message["p"]["n"], n);
        for key in ["tp", "e", "o"] {
            assert!(message.get(key).is_none(), "{message}");
        }
    }
    assert_eq!(filtered.recv_timeout(Duration::from_millis(200)).await.unwrap(), None);
    for n in 1..4 {
        assert_eq!(offset(&plain.recv().await.unwrap()), n, "unfiltered subscribers keep their stamps");
    }
    server.stop().await;
}
