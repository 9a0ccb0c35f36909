//! Presence over real sockets (PROTOCOL.md §6.3.6): join on a user's first tracked
//! connection, update on changed data, leave on the last unsubscribe or disconnect, member and
//! data size limits, the Rust API, `GET /api/presence/{topic}`, and presence disabled.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wsengine::client::Client;
use wsengine::config::Config;
use wsengine::layers::auth::{Denial, Grant, auth_fn};
use wsengine::services::connection::ConnectionId;
use wsengine::{Envelope, PresenceError};

/// A server whose connections are user `?user=<name>`.
async fn server(configure: impl FnOnce(&mut Config)) -> TestServer {
    let hook = auth_fn(|request| async move {
        let user = request.query.as_deref().and_then(|q| q.strip_prefix("user=")).map(str::to_owned);
        match user {
            Some(user_id) => Ok(Grant::user(user_id)),
            None => Err(Denial::new()),
        }
    });
    start_with(configure, |builder| builder.auth_hook(hook)).await
}

fn enabled(config: &mut Config) {
    config.presence_enabled = true;
}

async fn connect(server: &TestServer, user: &str) -> Client {
    Client::connect(&format!("{}?user={user}", server.url())).await.expect("accepted")
}

async fn subscribe(client: &mut Client, topics: &[&str], presence: Value) -> Value {
    let request = json!({"action": "subscribe", "topics": topics, "presence": presence});
    client.send("subscription_update", request).await.unwrap();
    loop {
        let message = client.recv().await.unwrap();
        if message["t"] == "subscription_update" {
            return message["p"].clone();
        }
    }
}

/// The next presence event, skipping anything else; `None` after a quiet 300 ms.
async fn presence_event(client: &mut Client) -> Option<Value> {
    while let Some(message) = client.recv_timeout(Duration::from_millis(300)).await.unwrap() {
        if message["t"].as_str().is_some_and(|t| t.starts_with("presence_")) {
            return Some(message);
        }
    }
    None
}

fn assert_event(event: Option<Value>, t: &str, user: &str, data: Value) {
    let event = event.unwrap_or_else(|| panic!("expected {t}"));
    assert_eq!(event["t"], t);
    assert_eq!(event["c"], "WSE");
    assert_eq!(event["v"], 1);
    assert!(event["id"].is_string() && event["ts"].is_string(), "{event}");
    assert!(event.get("seq").is_none() && event.get("tp").is_none(), "never stamped: {event}");
    assert_eq!(event["p"], json!({"topic": "room-1", "user_id": user, "data": data}));
}

#[tokio::test]
async fn join_update_and_leave_on_disconnect() {
    let server = server(enabled).await;
    let mut observer = connect(&server, "olga").await;
    assert_eq!(subscribe(&mut observer, &["room-1"], Value::Null).await["success"], true);

    let mut alice = connect(&server, "alice").await;
    let ack = subscribe(&mut alice, &["room-1"], json!({"status": "online", "name": "Alice"})).await;
    assert_eq!(ack["success_topics"], json!(["room-1"]));
    assert_event(
        presence_event(&mut observer).await,
        "presence_join",
        "alice",
        json!({"status": "online", "name": "Alice"}),
    );
    // The joining connection is a subscriber too.
    assert_event(
        presence_event(&mut alice).await,
        "presence_join",
        "alice",
        json!({"status": "online", "name": "Alice"}),
    );

    // A second connection of the same user with the same data: no event.
    let mut alice_phone = connect(&server, "alice").await;
    subscribe(&mut alice_phone, &["room-1"], json!({"name": "Alice", "status": "online"})).await;
    assert!(presence_event(&mut observer).await.is_none(), "no duplicate join");
    assert_eq!(server.engine.presence_stats("room-1").members, 1);
    assert_eq!(server.engine.presence_stats("room-1").connections, 2);

    // Changed data: update.
    subscribe(&mut alice_phone, &["room-1"], json!({"status": "away"})).await;
    assert_event(presence_event(&mut observer).await, "presence_update", "alice", json!({"status": "away"}));
    let members = server.engine.presence("room-1");
    assert_eq!(members.len(), 1);
    assert_eq!(
        (members[0].user_id.as_str(), &members[0].data, members[0].connections),
        ("alice", &json!({"status": "away"}), 2)
    );

    // Publications and presence events interleave on the same path.
    server.engine.publish("room-1", Envelope::new("chat", json!({"text": "hi"}))).await.unwrap();
    assert_eq!(observer.recv().await.unwrap()["t"], "chat");

    // One connection leaving is not the user leaving; the last one is, with the last data.
    alice.close().await.unwrap();
    assert!(presence_event(&mut observer).await.is_none());
    alice_phone.close().await.unwrap();
    assert_event(presence_event(&mut observer).await, "presence_leave", "alice", json!({"status": "away"}));
    assert_eq!(server.engine.presence_stats("room-1").members, 0);
    assert!(server.engine.presence("room-1").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn leave_on_last_unsubscribe_and_untracked_subscriptions() {
    // With recovery on, presence events are still never stamped (assert_event checks).
    let server = server(|c| {
        c.presence_enabled = true;
        c.recovery_enabled = true;
    })
    .await;
    let mut observer = connect(&server, "olga").await;
    subscribe(&mut observer, &["room-1"], Value::Null).await;
    let mut bob = connect(&server, "bob").await;
    subscribe(&mut bob, &["room-1", "room-*"], json!({"mood": "ok"})).await;
    assert_event(presence_event(&mut observer).await, "presence_join", "bob", json!({"mood": "ok"}));
    assert_eq!(server.engine.presence_stats("room-1").connections, 1, "patterns are never tracked");
    assert!(server.engine.presence("room-*").is_empty());

    let ack = bob.unsubscribe(&["room-1"]).await.unwrap();
    assert_eq!(ack["p"]["unsubscribed_topics"], json!(["room-1"]));
    assert_event(presence_event(&mut observer).await, "presence_leave", "bob", json!({"mood": "ok"}));
    // Bob still gets room-1's events through his pattern, like a publication.
    assert_event(presence_event(&mut bob).await, "presence_join", "bob", json!({"mood": "ok"}));
    assert_event(presence_event(&mut bob).await, "presence_leave", "bob", json!({"mood": "ok"}));

    // A subscription without presence data is not tracked; its disconnect sends nothing.
    let mut carol = connect(&server, "carol").await;
    subscribe(&mut carol, &["room-1"], Value::Null).await;
    carol.close().await.unwrap();
    assert!(presence_event(&mut observer).await.is_none());
    assert_eq!(server.engine.presence_stats("room-1").members, 0);
    // Publications are stamped; presence events took no offsets.
    server.engine.publish("room-1", Envelope::new("chat", json!({}))).await.unwrap();
    let chat = observer.recv().await.unwrap();
    assert_eq!((chat["t"].as_str(), chat["o"].as_u64()), (Some("chat"), Some(0)));
    server.stop().await;
}

#[tokio::test]
async fn member_limit_and_data_size_limit() {
    let server = server(|c| {
        c.presence_enabled = true;
        c.presence_max_members = 1;
    })
    .await;
    let mut observer = connect(&server, "olga").await;
    subscribe(&mut observer, &["room-1"], Value::Null).await;
    let mut alice = connect(&server, "alice").await;
    subscribe(&mut alice, &["room-1"], json!({"n": 1})).await;
    assert_event(presence_event(&mut observer).await, "presence_join", "alice", json!({"n": 1}));

    // At the limit: the subscription succeeds, untracked, silently.
    let mut bob = connect(&server, "bob").await;
    let ack = subscribe(&mut bob, &["room-1"], json!({"n": 2})).await;
    assert_eq!(ack["success_topics"], json!(["room-1"]));
    assert!(presence_event(&mut observer).await.is_none());
    assert_eq!(server.engine.presence_stats("room-1").members, 1);
    server.engine.publish("room-1", Envelope::new("chat", json!({}))).await.unwrap();
    assert_eq!(bob.recv().await.unwrap()["t"], "chat");
    // Another connection of a member is still tracked.
    let mut alice_phone = connect(&server, "alice").await;
    subscribe(&mut alice_phone, &["room-1"], json!({"n": 1})).await;
    assert_eq!(server.engine.presence_stats("room-1").connections, 2);

    // Data over 4096 bytes, or not an object: INVALID_PRESENCE for every topic of the request.
    let big = json!({"blob": "x".repeat(4096)});
    for data in [big, json!("online"), json!([1])] {
        let ack = subscribe(&mut bob, &["room-2", "room-3"], data.clone()).await;
        assert_eq!(ack["success"], false, "{data}");
        assert_eq!(ack["failed_topics"], json!(["room-2", "room-3"]));
        assert_eq!(ack["failure_reasons"], json!({"room-2": "INVALID_PRESENCE", "room-3": "INVALID_PRESENCE"}));
        assert!(ack["presence_error"].as_str().unwrap().contains("presence data"), "{ack}");
    }
    // Exactly at the limit is fine.
    let name = "x".repeat(4096 - r#"{"blob":""}"#.len());
    let ack = subscribe(&mut bob, &["room-2"], json!({"blob": name})).await;
    assert_eq!(ack["success_topics"], json!(["room-2"]));
    assert_eq!(server.engine.presence_stats("room-2").members, 1);
    assert!(alice.ping().await.is_ok(), "other connections keep working");
    server.stop().await;
}

#[tokio::test]
async fn presence_disabled_sends_nothing() {
    let server = server(|_| {}).await;
    let mut observer = connect(&server, "olga").await;
    subscribe(&mut observer, &["room-1"], Value::Null).await;
    let mut alice = connect(&server, "alice").await;
    // Ignored when disabled, even when it would be invalid.
    let ack = subscribe(&mut alice, &["room-1"], json!("not an object")).await;
    assert_eq!(ack["success_topics"], json!(["room-1"]));
    assert!(ack.get("presence_error").is_none());
    subscribe(&mut alice, &["room-1"], json!({"status": "online"})).await;
    alice.close().await.unwrap();
    assert!(presence_event(&mut observer).await.is_none());
    assert_eq!(server.engine.presence_stats("room-1").members, 0);
    let id = ConnectionId::parse(observer.connection_id()).unwrap();
    assert_eq!(server.engine.set_presence(id, &json!({})), Err(PresenceError::Disabled));
    let (status, body) = http(server.addr, "GET", "/api/presence/room-1", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"topic": "room-1", "enabled": false, "stats": {"members": 0, "connections": 0}, "members": []})
    );
    server.stop().await;
}

#[tokio::test]
async fn rust_api_assigns_data() {
    let server = server(enabled).await;
    let mut observer = connect(&server, "olga").await;
    subscribe(&mut observer, &["room-1"], Value::Null).await;
    let mut dave = connect(&server, "dave").await;
    dave.subscribe(&["room-1"]).await.unwrap();
    let id = ConnectionId::parse(dave.connection_id()).unwrap();
    server.engine.set_presence(id, &json!({"status": "online"})).unwrap();
    assert_event(presence_event(&mut observer).await, "presence_join", "dave", json!({"status": "online"}));
    server.engine.set_presence(id, &json!({"status": "busy"})).unwrap();
    assert_event(presence_event(&mut observer).await, "presence_update", "dave", json!({"status": "busy"}));
    assert!(matches!(
        server.engine.set_presence(id, &json!({"blob": "x".repeat(5000)})),
        Err(PresenceError::TooLarge(_))
    ));
    assert_eq!(server.engine.set_presence(id, &json!(1)), Err(PresenceError::NotAnObject));
    assert_eq!(server.engine.set_presence(ConnectionId::new(), &json!({})), Err(PresenceError::UnknownConnection));
    // Later subscriptions without p.presence use the assigned data.
    let mut second = connect(&server, "olga").await;
    subscribe(&mut second, &["room-2"], Value::Null).await;
    dave.subscribe(&["room-2"]).await.unwrap();
    let join = presence_event(&mut second).await.unwrap();
    assert_eq!(join["p"], json!({"topic": "room-2", "user_id": "dave", "data": {"status": "busy"}}));
    server.engine.unsubscribe(id, "room-1");
    assert_event(presence_event(&mut observer).await, "presence_leave", "dave", json!({"status": "busy"}));
    server.stop().await;
}

#[tokio::test]
async fn http_endpoint_lists_members_behind_the_api_key() {
    let server = server(|c| {
        c.presence_enabled = true;
        c.api_key = Some("k3y".into());
    })
    .await;
    let mut alice = connect(&server, "alice").await;
    subscribe(&mut alice, &["chat/room 1"], json!({"status": "online"})).await;
    let mut bob = connect(&server, "bob").await;
    subscribe(&mut bob, &["chat/room 1"], json!({"status": "away"})).await;

    let path = "/api/presence/chat%2Froom%201";
    let (status, _) = http(server.addr, "GET", path, None, None).await;
    assert_eq!(status, 401);
    let (status, body) = http(server.addr, "GET", path, None, Some("k3y")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({
            "topic": "chat/room 1",
            "enabled": true,
            "stats": {"members": 2, "connections": 2},
            "members": [
                {"user_id": "alice", "data": {"status": "online"}, "connections": 1},
                {"user_id": "bob", "data": {"status": "away"}, "connections": 1}
            ]
        })
    );
    let (status, _) = http(server.addr, "GET", "/api/presence/%ZZ", None, Some("k3y")).await;
    assert_eq!(status, 400);
    let (status, _) = http(server.addr, "POST", path, Some("{}"), Some("k3y")).await;
    assert_eq!(status, 405);
    server.stop().await;
}

/// Presence events take the publication path: an E2E connection gets them as `E:` frames.
#[cfg(feature = "encryption")]
#[tokio::test]
async fn e2e_connections_get_presence_events_encrypted() {
    use wsengine::layers::encrypt::{EphemeralKeyPair, parse_public_key};

    let server = server(enabled).await;
    let mut socket = RawSocket::connect(server.addr, "/wse?user=eve").await;
    assert_eq!(socket.read_json().await["t"], "server_ready");
    let pair = EphemeralKeyPair::generate().unwrap();
    let hello = json!({"t": "client_hello", "p": {"client_version": "test", "protocol_version": 1, "features": {"encryption": true}, "encryption_public_key": pair.public_key_base64()}, "v": 1});
    socket.send_frame(TEXT, hello.to_string().as_bytes()).await;
    let server_hello = socket.read_json().await;
    assert_eq!(server_hello["t"], "server_hello");
    let key = pair.agree(&parse_public_key(server_hello["p"]["encryption_public_key"].as_str().unwrap()).unwrap());
    let request = json!({"t": "subscription_update", "p": {"topics": ["room-1"]}, "v": 1});
    socket.send_frame(BINARY, &key.seal(request.to_string().as_bytes()).unwrap()).await;

    let mut alice = connect(&server, "alice").await;
    subscribe(&mut alice, &["room-1"], json!({"status": "online"})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (opcode, payload) =
            tokio::time::timeout_at(deadline, socket.read_frame()).await.expect("presence_join").expect("a frame");
        if opcode != BINARY {
            continue;
        }
        assert!(payload.starts_with(b"E:"), "binary frames are E: frames");
        let event: Value = serde_json::from_slice(&key.open(&payload).unwrap()).unwrap();
        if event["t"] == "presence_join" {
            assert_eq!(event["p"], json!({"topic": "room-1", "user_id": "alice", "data": {"status": "online"}}));
            break;
        }
    }
    server.stop().await;
}

#[test]
fn config_keys_default_off_and_parse() {
    let defaults = Config::default();
    assert!(!defaults.presence_enabled);
    assert_eq!(defaults.presence_max_members, 0);
    let file = "presence_enabled = true\npresence_max_members = 50";
    let env = [("WSENGINE_PRESENCE_MAX_MEMBERS".to_string(), "7".to_string())];
    let config = Config::from_sources(Some(file), env).unwrap();
    assert!(config.presence_enabled);
    assert_eq!(config.presence_max_members, 7);
    assert!(config.to_toml_string().contains("presence_enabled = true"));
}
