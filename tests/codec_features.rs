//! The `compression` and `msgpack` cargo features: the hello frames announce what the build
//! has, and with a feature off the engine never sends that form and answers inbound `C:` /
//! `M:` frames with `INVALID_REQUEST`, keeping the connection (PROTOCOL.md §3.4, §6.1).
//!
//! The "off" tests run under `cargo test --no-default-features --test codec_features`.

mod common;

use common::*;
use serde_json::{Value, json};
use wsengine::Envelope;

/// A raw connection past `server_ready`, which it returns.
async fn connect(server: &TestServer, path: &str) -> (RawSocket, Value) {
    let mut raw = RawSocket::connect(server.addr, path).await;
    let ready = raw.read_json().await;
    assert_eq!(ready["t"], "server_ready");
    (raw, ready)
}

/// Subscribes `raw` to `topic` and reads the acknowledgement.
async fn subscribe(raw: &mut RawSocket, topic: &str) {
    let request = json!({"t": "subscription_update", "p": {"action": "subscribe", "topics": [topic]}});
    raw.send_frame(TEXT, request.to_string().as_bytes()).await;
    let ack = raw.read_json().await;
    assert_eq!(ack["p"]["success"], true, "{ack}");
}

/// The next data frame, which must be an `INVALID_REQUEST` error; returns its message.
#[cfg(any(not(feature = "compression"), not(feature = "msgpack")))]
async fn expect_invalid_request(raw: &mut RawSocket) -> String {
    let error = raw.read_json().await;
    assert_eq!(error["t"], "error", "{error}");
    assert_eq!(error["p"]["code"], "INVALID_REQUEST", "{error}");
    error["p"]["message"].as_str().unwrap().to_owned()
}

/// The connection is still open and answers pings.
#[cfg(any(not(feature = "compression"), not(feature = "msgpack")))]
async fn expect_open(raw: &mut RawSocket) {
    raw.send_frame(TEXT, br#"{"t":"ping","p":{"timestamp":1}}"#).await;
    assert_eq!(raw.read_json().await["t"], "PONG");
}

/// A publication far above the default compression threshold.
fn large_publication() -> Envelope {
    Envelope::new("report", json!({"text": "abc".repeat(2000)}))
}

#[tokio::test]
async fn hello_frames_announce_the_built_features() {
    let server = start(|_| {}).await;
    let (mut raw, ready) = connect(&server, "/wse?format=msgpack").await;
    assert_eq!(ready["p"]["details"]["features"]["compression"], cfg!(feature = "compression"));
    raw.send_frame(TEXT, br#"{"t":"client_hello","p":{"features":{"compression":true}}}"#).await;
    let hello = raw.read_json().await;
    assert_eq!(hello["t"], "server_hello");
    assert_eq!(hello["p"]["features"]["compression"], cfg!(feature = "compression"));
    assert_eq!(hello["p"]["features"]["msgpack"], cfg!(feature = "msgpack"));
    server.stop().await;
}

#[tokio::test]
async fn the_compression_key_off_announces_and_sends_no_compression() {
    let server = start(|config| config.compression = false).await;
    let (mut raw, ready) = connect(&server, "/wse").await;
    assert_eq!(ready["p"]["details"]["features"]["compression"], false);
    subscribe(&mut raw, "reports").await;
    server.engine.publish("reports", large_publication()).await.unwrap();
    let (opcode, payload) = raw.read_frame().await.unwrap();
    assert_eq!(opcode, TEXT, "plain JSON text, not C:");
    assert!(payload.starts_with(b"{"));
    server.stop().await;
}

#[cfg(not(feature = "compression"))]
#[tokio::test]
async fn without_compression_c_frames_get_invalid_request_and_nothing_is_compressed() {
    let server = start(|_| {}).await;
    let (mut raw, _) = connect(&server, "/wse").await;
    let (mut neighbor, _) = connect(&server, "/wse").await;
    // A valid zlib stream (one stored block) of a ping, and garbage: both refused alike.
    let ping = br#"{"t":"ping","p":{"timestamp":1}}"#;
    let mut valid = b"C:\x78\x01\x01".to_vec();
    valid.extend_from_slice(&u16::try_from(ping.len()).unwrap().to_le_bytes());
    valid.extend_from_slice(&(!u16::try_from(ping.len()).unwrap()).to_le_bytes());
    valid.extend_from_slice(ping);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in ping {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    valid.extend_from_slice(&((b << 16) | a).to_be_bytes());
    for frame in [valid.as_slice(), b"C:this is not zlib"] {
        raw.send_frame(BINARY, frame).await;
        let message = expect_invalid_request(&mut raw).await;
        assert!(message.contains("`compression` feature"), "{message}");
        expect_open(&mut raw).await;
    }
    // Outbound: a large publication goes out as plain JSON text.
    subscribe(&mut neighbor, "reports").await;
    server.engine.publish("reports", large_publication()).await.unwrap();
    let (opcode, payload) = neighbor.read_frame().await.unwrap();
    assert_eq!(opcode, TEXT);
    assert!(payload.starts_with(b"{"));
    expect_open(&mut neighbor).await;
    server.stop().await;
}

#[cfg(not(feature = "msgpack"))]
#[tokio::test]
async fn without_msgpack_format_msgpack_gets_json_and_m_frames_get_invalid_request() {
    let server = start(|_| {}).await;
    let (mut raw, _) = connect(&server, "/wse?format=msgpack").await;
    subscribe(&mut raw, "small").await;
    server.engine.publish("small", Envelope::new("tick", json!({"n": 1}))).await.unwrap();
    let (opcode, payload) = raw.read_frame().await.unwrap();
    assert_eq!(opcode, TEXT, "JSON text, not M:");
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap()["p"]["n"], 1);
    // fixmap {"t": "ping"}: with the prefix refused by name, raw like any unknown binary.
    let map = [0x81, 0xa1, b't', 0xa4, b'p', b'i', b'n', b'g'];
    raw.send_frame(BINARY, &[b"M:".as_slice(), &map].concat()).await;
    let message = expect_invalid_request(&mut raw).await;
    assert!(message.contains("`msgpack` feature"), "{message}");
    expect_open(&mut raw).await;
    raw.send_frame(BINARY, &map).await;
    expect_invalid_request(&mut raw).await;
    expect_open(&mut raw).await;
    server.stop().await;
}
