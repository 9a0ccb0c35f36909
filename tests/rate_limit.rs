//! Rate limiting over real sockets (PROTOCOL.md §11): a flooding client is told
//! `RATE_LIMITED` and finally closed with 4429 while its neighbours are served; a user's
//! connections share the per-user bucket; a batch costs a token per element; outbound events
//! get `rate_limit_warning`, then `RATE_LIMITED`, and the connection stays open.
#![cfg(all(feature = "rate_limit", feature = "auth"))]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wsengine::client::Client;
use wsengine::layers::auth::{Denial, Grant, auth_fn};
use wsengine::services::connection::ConnectionId;
use wsengine::{Envelope, Target};

/// A subscriber on another connection that must keep working whatever the flooder does.
struct Neighbor {
    client: Client,
    received: u64,
}

impl Neighbor {
    async fn new(server: &TestServer, url: &str) -> Neighbor {
        let mut client = Client::connect(url).await.unwrap();
        client.subscribe(&["prices"]).await.unwrap();
        let _ = server;
        Neighbor { client, received: 0 }
    }

    async fn assert_served(&mut self, server: &TestServer) {
        self.received += 1;
        let n = self.received;
        let report = server.engine.publish("prices", Envelope::new("price_update", json!({"n": n}))).await.unwrap();
        assert!(report.delivered >= 1);
        assert_eq!(self.client.recv().await.unwrap()["p"]["n"], n);
        assert_eq!(self.client.ping().await.unwrap()["t"], "PONG");
    }
}

/// Reads every frame that arrives within `wait`; `Err(code)` once a Close arrived.
async fn drain(raw: &mut RawSocket, wait: Duration) -> Result<Vec<Value>, (Option<u16>, String)> {
    let mut frames = Vec::new();
    while let Ok(frame) = tokio::time::timeout(wait, raw.read_frame()).await {
        match frame {
            Some((TEXT | BINARY, payload)) => frames.push(serde_json::from_slice(&payload).expect("JSON")),
            Some((CLOSE, payload)) => {
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
                return Err((close_code(&payload), reason));
            }
            Some(_) => {}
            None => return Err((None, String::new())),
        }
    }
    Ok(frames)
}

fn assert_rate_limited(error: &Value, direction: &str) {
    assert_eq!(error["t"], "error", "{error}");
    assert_eq!(error["p"]["code"], "RATE_LIMITED", "{error}");
    assert_eq!(error["p"]["direction"], direction, "{error}");
    assert_eq!(error["p"]["recoverable"], true);
    let retry_after = error["p"]["retry_after"].as_f64().expect("retry_after is a number");
    assert!(retry_after > 0.0 && retry_after <= 1.0, "{error}");
}

#[tokio::test]
async fn a_flooding_client_is_rate_limited_then_closed_with_4429_while_others_are_served() {
    let server = start(|config| {
        config.inbound_rate_capacity = 20;
        config.inbound_rate_refill = 10;
        config.rate_limit_close_windows = 3;
    })
    .await;
    let url = server.url();
    let mut neighbor = Neighbor::new(&server, &url).await;
    let mut flooder = RawSocket::connect(server.addr, "/wse").await;
    assert_eq!(flooder.read_json().await["t"], "server_ready");

    let started = Instant::now();
    let mut pongs = 0;
    let mut notices = Vec::new();
    let mut last_check = Instant::now();
    let close = loop {
        assert!(started.elapsed() < Duration::from_secs(15), "no 4429 after 15 s of flooding");
        for _ in 0..20 {
            flooder.send_frame(TEXT, br#"{"t":"ping","p":{"timestamp":1}}"#).await;
        }
        match drain(&mut flooder, Duration::from_millis(30)).await {
            Ok(frames) => {
                for frame in frames {
                    match frame["t"].as_str() {
                        Some("PONG") => pongs += 1,
                        Some("error") => {
                            assert_rate_limited(&frame, "inbound");
                            notices.push(started.elapsed());
                        }
                        _ => {}
                    }
                }
            }
            Err(close) => break close,
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            neighbor.assert_served(&server).await;
            last_check = Instant::now();
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(close, (Some(4429), "Rate limit exceeded".to_owned()));
    // The first 20 frames had tokens; the rest of the flood mostly did not.
    assert!((20..200).contains(&pongs), "{pongs} PONGs");
    // Dropped frames in three consecutive windows: at least two seconds of flooding.
    assert!(elapsed >= Duration::from_secs(2), "closed after {elapsed:?}");
    assert!(!notices.is_empty());
    // At most one notice per second.
    for pair in notices.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(700), "notices too close: {notices:?}");
    }
    neighbor.assert_served(&server).await;
    assert_eq!(server.engine.connection_count(), 1);
    server.stop().await;
}

/// Names the user from `?user=…` (a stand-in for JWT, which has tests of its own).
fn user_from_query() -> impl wsengine::layers::auth::AuthHook {
    auth_fn(|request| async move {
        let query = request.query.unwrap_or_default();
        match query.split('&').find_map(|pair| pair.strip_prefix("user=")) {
            Some(user) => Ok(Grant::user(user)),
            None => Err(Denial::new()),
        }
    })
}

async fn ping(raw: &mut RawSocket) -> Value {
    raw.send_frame(TEXT, br#"{"t":"ping","p":{"timestamp":7}}"#).await;
    raw.read_json().await
}

async fn connect_as(server: &TestServer, user: &str) -> RawSocket {
    let mut raw = RawSocket::connect(server.addr, &format!("/wse?user={user}")).await;
    let ready = raw.read_json().await;
    assert_eq!(ready["p"]["details"]["user_id"], user, "{ready}");
    raw
}

#[tokio::test]
async fn the_connections_of_one_user_share_the_user_bucket() {
    let server = start_with(
        |config| {
            config.user_rate_capacity = 6;
            config.user_rate_refill = 1;
        },
        |builder| builder.auth_hook(user_from_query()),
    )
    .await;
    let mut first = connect_as(&server, "alice").await;
    let mut second = connect_as(&server, "alice").await;
    let mut other = connect_as(&server, "bob").await;
    for _ in 0..3 {
        assert_eq!(ping(&mut first).await["t"], "PONG");
        assert_eq!(ping(&mut second).await["t"], "PONG");
    }
    // Alice's six tokens are spent, whichever connection asks: no PONG, RATE_LIMITED instead.
    assert_rate_limited(&ping(&mut second).await, "inbound");
    assert_rate_limited(&ping(&mut first).await, "inbound");
    // Bob has a bucket of his own.
    assert_eq!(ping(&mut other).await["t"], "PONG");
    // Alice is limited, not closed: a second later she has a token again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ping(&mut first).await["t"], "PONG");
    server.stop().await;
}

#[tokio::test]
async fn a_batch_costs_one_token_per_element() {
    let server = start(|config| {
        config.inbound_rate_capacity = 5;
        config.inbound_rate_refill = 1;
    })
    .await;
    let mut raw = RawSocket::connect(server.addr, "/wse").await;
    let ready = raw.read_json().await;
    let id = ConnectionId::parse(ready["p"]["details"]["connection_id"].as_str().unwrap()).unwrap();
    let pings: Vec<Value> = (0..7).map(|n| json!({"t": "ping", "p": {"timestamp": n}})).collect();
    let batch = json!({"t": "batch", "p": {"messages": pings, "count": 7}});
    raw.send_frame(TEXT, batch.to_string().as_bytes()).await;
    for n in 0..5 {
        let pong = raw.read_json().await;
        assert_eq!((pong["t"].as_str(), pong["p"]["client_timestamp"].as_i64()), (Some("PONG"), Some(n)));
    }
    // Elements six and seven found no token: one notice, no PONG.
    assert_rate_limited(&raw.read_json().await, "inbound");
    let rest = drain(&mut raw, Duration::from_millis(300)).await.expect("still open");
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(server.engine.connection_info(id).unwrap().rate_limited_inbound, 2);
    server.stop().await;
}

#[tokio::test]
async fn outbound_events_get_a_warning_then_rate_limited_and_the_connection_stays_open() {
    let server = start(|config| {
        config.outbound_rate_capacity = 10;
        config.outbound_rate_refill = 1;
    })
    .await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.subscribe(&["prices"]).await.unwrap();
    let target = Target::Connection(ConnectionId::parse(client.connection_id()).unwrap());
    for n in 0..12 {
        // The engine takes every event; the limit applies later, per connection.
        assert_eq!(server.engine.send(&target, Envelope::new("tick", json!({ "n": n }))).unwrap(), 1);
    }
    let mut seen = Vec::new();
    for _ in 0..12 {
        seen.push(client.recv().await.unwrap());
    }
    let types: Vec<&str> = seen.iter().map(|m| m["t"].as_str().unwrap()).collect();
    let ticks: Vec<i64> = seen.iter().filter_map(|m| m["p"]["n"].as_i64()).collect();
    assert_eq!(ticks, (0..10).collect::<Vec<_>>());
    // Below 20 % (one token left after the ninth event) the warning goes out. Protocol frames
    // are critical and may overtake queued events, so only their presence is checked.
    let warning = seen.iter().position(|m| m["t"] == "rate_limit_warning").expect("a warning");
    assert_eq!(types.iter().filter(|t| **t == "tick").count(), 10);
    assert_eq!(seen[warning]["p"], json!({"current_rate": 9, "limit": 10, "remaining": 1, "retry_after": 1.0}));
    assert_eq!(seen[warning]["c"], "WSE");
    let error = seen.iter().find(|m| m["t"] == "error").expect("RATE_LIMITED");
    assert_rate_limited(error, "outbound");
    // The eleventh and twelfth events were dropped; publications and PONGs are not limited.
    server.engine.publish("prices", Envelope::new("price_update", json!({"p": 1}))).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "price_update");
    assert_eq!(client.ping().await.unwrap()["t"], "PONG");
    let Target::Connection(id) = target else { unreachable!() };
    assert_eq!(server.engine.connection_info(id).unwrap().rate_limited_outbound, 2);
    // The announced limits are the configured ones.
    let hello = client.hello().await.unwrap();
    assert_eq!(hello["p"]["limits"]["rate_limit_capacity"], 10);
    assert_eq!(hello["p"]["limits"]["rate_limit_refill"], 1);
    assert_eq!(hello["p"]["limits"]["inbound_rate_limit_capacity"], 2000);
    assert_eq!(hello["p"]["limits"]["inbound_rate_limit_refill"], 200);
    server.stop().await;
}
