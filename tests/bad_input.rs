//! Bad input on one connection gets an error frame or a documented close code, and every
//! other connection keeps being served (PROTOCOL.md §3.4, §3.5, §12).

mod common;

use common::*;
use serde_json::{Value, json};
use wsengine::Envelope;
use wsengine::client::Client;

/// A subscriber on another connection that must keep working whatever the attacker does.
struct Neighbor {
    client: Client,
    received: u64,
}

impl Neighbor {
    async fn new(server: &TestServer) -> Neighbor {
        let mut client = Client::connect(&server.url()).await.unwrap();
        client.subscribe(&["prices"]).await.unwrap();
        Neighbor { client, received: 0 }
    }

    async fn assert_served(&mut self, server: &TestServer) {
        self.received += 1;
        let n = self.received;
        let report = server.engine.publish("prices", Envelope::new("price_update", json!({"n": n}))).await.unwrap();
        assert_eq!(report.delivered, 1);
        assert_eq!(self.client.recv().await.unwrap()["p"]["n"], n);
        assert_eq!(self.client.ping().await.unwrap()["t"], "PONG");
    }
}

async fn attacker(server: &TestServer, path: &str) -> RawSocket {
    let mut raw = RawSocket::connect(server.addr, path).await;
    assert_eq!(raw.read_json().await["t"], "server_ready");
    raw
}

async fn expect_error(raw: &mut RawSocket, code: &str) -> Value {
    let error = raw.read_json().await;
    assert_eq!(error["t"], "error", "{error}");
    assert_eq!(error["p"]["code"], code, "{error}");
    assert_eq!(error["p"]["recoverable"], true);
    assert!(error["p"]["message"].is_string() && error["p"]["timestamp"].is_string());
    error
}

/// The attacker's connection is still open and answers pings.
async fn expect_open(raw: &mut RawSocket) {
    raw.send_frame(TEXT, br#"{"t":"ping","p":{"timestamp":1}}"#).await;
    assert_eq!(raw.read_json().await["t"], "PONG");
}

#[tokio::test]
async fn non_json_text_gets_invalid_request_and_stays_open() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    raw.send_frame(TEXT, b"hello, is this JSON?").await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    expect_open(&mut raw).await;
    // Further junk within the same second is dropped without another error (no amplification).
    raw.send_frame(TEXT, b"[1,2,3]").await;
    expect_open(&mut raw).await;
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_type_without_a_handler_gets_invalid_request() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    raw.send_frame(TEXT, br#"{"t":"launch_missiles","p":{}}"#).await;
    let error = expect_error(&mut raw, "INVALID_REQUEST").await;
    assert!(error["p"]["message"].as_str().unwrap().contains("launch_missiles"));
    raw.send_frame(TEXT, br#"{"p":{"no":"type"}}"#).await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    expect_open(&mut raw).await;
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    raw.send_frame(TEXT, b"{\"t\":\"x\",\"p\":\"\xff\xfe\"}").await;
    assert_eq!(raw.read_close().await, Some(1007));
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_2_mib_frame_gets_message_too_large_and_1009() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    // The header announces 2 MiB; the engine refuses before reading (or buffering) the payload.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(2u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_bytes(&header).await;
    expect_error(&mut raw, "MESSAGE_TOO_LARGE").await;
    assert_eq!(raw.read_close().await, Some(1009));
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_zlib_bomb_is_refused_without_inflating_it() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    // 64 MiB of spaces compress to about 64 KiB; the cap is 1 MiB.
    let bomb = wsengine_core_compress(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 1 << 20);
    raw.send_frame(BINARY, &bomb).await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    // Garbage after C: is refused the same way.
    raw.send_frame(BINARY, b"C:this is not zlib").await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    expect_open(&mut raw).await;
    neighbor.assert_served(&server).await;
    server.stop().await;
}

fn wsengine_core_compress(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::ZlibEncoder::new(b"C:".to_vec(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn msgpack_nested_1000_deep_is_refused() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut deep = Vec::new();
    for _ in 0..1000 {
        deep.push(0x81); // map of one entry
        deep.extend_from_slice(&[0xa1, b'k']); // key "k"
    }
    deep.push(0xc0);
    let mut prefixed = b"M:".to_vec();
    prefixed.extend_from_slice(&deep);

    let mut raw = attacker(&server, "/wse").await;
    raw.send_frame(BINARY, &prefixed).await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    expect_open(&mut raw).await;

    let mut packed = attacker(&server, "/wse?format=msgpack").await;
    packed.send_frame(BINARY, &deep).await;
    expect_error(&mut packed, "INVALID_REQUEST").await;
    expect_open(&mut packed).await;
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn json_nested_beyond_128_is_unparsable() {
    let server = start(|_| {}).await;
    let mut raw = attacker(&server, "/wse").await;
    let deep = format!("{{\"t\":\"x\",\"p\":{}{}}}", "[".repeat(200), "]".repeat(200));
    raw.send_frame(TEXT, deep.as_bytes()).await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    expect_open(&mut raw).await;
    server.stop().await;
}

#[tokio::test]
async fn a_100_kib_topic_fails_with_invalid_topic() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    let topic = "t".repeat(100 * 1024);
    let request =
        json!({"t": "subscription_update", "p": {"action": "subscribe", "topics": [topic, "ok", "bad\u{1}"]}});
    raw.send_frame(TEXT, request.to_string().as_bytes()).await;
    let ack = raw.read_json().await;
    assert_eq!(ack["t"], "subscription_update");
    assert_eq!(ack["p"]["success_topics"], json!(["ok"]));
    assert_eq!(ack["p"]["failed_topics"].as_array().unwrap().len(), 2);
    assert_eq!(ack["p"]["failure_reasons"]["bad\u{1}"], "INVALID_TOPIC");
    assert_eq!(ack["p"]["failure_reasons"][&topic], "INVALID_TOPIC");
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_binary_and_keyless_encrypted_frames() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut raw = attacker(&server, "/wse").await;
    // E: without a key exchange is dropped and counted (PROTOCOL.md §7.4); the decrypt layer
    // tells the client why (INVALID_REQUEST, at most once a second) and keeps it open.
    raw.send_frame(BINARY, &[b'E', b':', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9]).await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    expect_open(&mut raw).await;
    // INVALID_REQUEST goes out at most once a second per connection.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    raw.send_frame(BINARY, &[0x00, 0xff, 0x10]).await;
    expect_error(&mut raw, "INVALID_REQUEST").await;
    neighbor.assert_served(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn many_misbehaving_connections_at_once_do_not_disturb_a_subscriber() {
    let server = start(|_| {}).await;
    let mut neighbor = Neighbor::new(&server).await;
    let mut attackers = Vec::new();
    for _ in 0..50 {
        let mut raw = attacker(&server, "/wse").await;
        raw.send_frame(TEXT, b"\xff").await;
        attackers.push(raw);
    }
    for raw in &mut attackers {
        assert_eq!(raw.read_close().await, Some(1007));
    }
    neighbor.assert_served(&server).await;
    server.stop().await;
}
