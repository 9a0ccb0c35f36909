//! Admission control before the upgrade (PROTOCOL.md §2.1, §2.6): each refusal with its HTTP
//! status (or close), and an existing connection unaffected by all of them.
#![cfg(feature = "admission")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsengine::Envelope;
use wsengine::client::Client;

fn upgrade_head(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET /wse HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends an upgrade request with extra header lines; returns the response head, or an empty
/// string when the server closed without answering.
async fn upgrade(addr: SocketAddr, extra: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(upgrade_head(addr, extra).as_bytes()).await;
    read_head(&mut stream).await
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                buffer.truncate(end + 4);
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("server answered or closed");
    String::from_utf8_lossy(&buffer).into_owned()
}

fn status(head: &str) -> u16 {
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An established connection that must keep working through every refusal.
async fn survivor(server: &TestServer) -> Client {
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.subscribe(&["t"]).await.unwrap();
    client
}

async fn still_served(server: &TestServer, client: &mut Client) {
    server.engine.publish("t", Envelope::new("tick", json!({}))).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "tick");
}

#[tokio::test]
async fn too_many_connections_get_503_before_the_upgrade() {
    let server = start(|c| c.max_connections = 1).await;
    let mut first = survivor(&server).await;
    let head = upgrade(server.addr, "").await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"));
    still_served(&server, &mut first).await;
    server.stop().await;
}

#[tokio::test]
async fn pending_handshakes_beyond_the_cap_get_503() {
    let server = start(|c| c.max_pending_handshakes = 2).await;
    let mut first = survivor(&server).await;
    // Two connections that never send their request hold both places.
    let idle_a = TcpStream::connect(server.addr).await.unwrap();
    let idle_b = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let head = upgrade(server.addr, "").await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"));
    still_served(&server, &mut first).await;
    // Their places free up once they go away.
    drop((idle_a, idle_b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status(&upgrade(server.addr, "").await), 101);
    server.stop().await;
}

#[tokio::test]
async fn a_slowloris_trickling_headers_is_cut_at_the_handshake_timeout() {
    let server = start(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    let mut first = survivor(&server).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let request = upgrade_head(server.addr, "");
    let mut cut = false;
    // One byte every 50 ms would take far longer than the timeout to finish the head.
    for byte in request.as_bytes() {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        let mut probe = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(50), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing.
                let text = String::from_utf8_lossy(&probe[..n]).into_owned();
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            }
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(cut, "the trickling connection was never cut");
    assert!(elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(2), "cut after {elapsed:?}");
    still_served(&server, &mut first).await;
    server.stop().await;
}

#[tokio::test]
async fn a_foreign_origin_gets_403() {
    let server =
        start(|c| c.allowed_origins = vec!["https://app.example.com".into(), "https://*.example.org".into()]).await;
    let mut first = survivor(&server).await;
    assert_eq!(status(&upgrade(server.addr, "Origin: https://evil.example.net\r\n").await), 403);
    assert_eq!(status(&upgrade(server.addr, "Origin: null\r\n").await), 403);
    assert_eq!(status(&upgrade(server.addr, "Origin: https://app.example.com\r\n").await), 101);
    assert_eq!(status(&upgrade(server.addr, "Origin: https://eu.example.org\r\n").await), 101);
    assert_eq!(status(&upgrade(server.addr, "").await), 101, "no Origin: not a browser");
    still_served(&server, &mut first).await;
    server.stop().await;
}

#[tokio::test]
async fn per_ip_connect_rate_gets_429_with_retry_after() {
    let server = start(|c| {
        c.connect_rate_per_ip = 1;
        c.connect_burst_per_ip = 3;
    })
    .await;
    let mut first = survivor(&server).await; // uses one token
    assert_eq!(status(&upgrade(server.addr, "").await), 101);
    assert_eq!(status(&upgrade(server.addr, "").await), 101);
    let head = upgrade(server.addr, "").await;
    assert_eq!(status(&head), 429, "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"));
    // Plain HTTP requests are not upgrades and are not counted.
    let (code, _) = http(server.addr, "GET", "/health", None, None).await;
    assert_eq!(code, 200);
    still_served(&server, &mut first).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(&upgrade(server.addr, "").await), 101, "the bucket refills");
    server.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_rate() {
    // The test client plays the load balancer at 127.0.0.1.
    let server = start(|c| {
        c.connect_rate_per_ip = 1;
        c.connect_burst_per_ip = 1;
        c.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let from = |client: &str| format!("X-Forwarded-For: 203.0.113.99, {client}\r\n");
    assert_eq!(status(&upgrade(server.addr, &from("198.51.100.1")).await), 101);
    assert_eq!(status(&upgrade(server.addr, &from("198.51.100.2")).await), 101, "another client");
    assert_eq!(status(&upgrade(server.addr, &from("198.51.100.1")).await), 429, "the first one again");
    // Without the header the proxy itself is the client: its own bucket.
    assert_eq!(status(&upgrade(server.addr, "").await), 101);
    server.stop().await;

    // Not a trusted proxy: the header is ignored and the peer address is the key.
    let server = start(|c| {
        c.connect_rate_per_ip = 1;
        c.connect_burst_per_ip = 1;
    })
    .await;
    assert_eq!(status(&upgrade(server.addr, &from("198.51.100.1")).await), 101);
    assert_eq!(status(&upgrade(server.addr, &from("198.51.100.2")).await), 429, "a forged header changes nothing");
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let server = start(|c| c.max_header_size = 8192).await;
    let mut first = survivor(&server).await;
    let big = format!("Cookie: access_token={}\r\n", "x".repeat(20_000));
    let head = upgrade(server.addr, &big).await;
    assert_eq!(status(&head), 431, "{head}");
    // Just under the limit is fine.
    let fits = format!("X-Padding: {}\r\n", "x".repeat(6000));
    assert_eq!(status(&upgrade(server.addr, &fits).await), 101);
    still_served(&server, &mut first).await;
    server.stop().await;
}

#[tokio::test]
async fn admission_keys_are_validated() {
    let error = |text: &str| wsengine::Config::from_toml_str(text).unwrap_err().to_string();
    assert_eq!(error("max_pending_handshakes = 0"), "max_pending_handshakes: must be greater than zero");
    assert_eq!(error("max_header_size = 8191"), "max_header_size: must be at least 8192 bytes, got 8191");
    assert_eq!(error("connect_burst_per_ip = 0"), "connect_burst_per_ip: must be at least 1");
    assert_eq!(
        error("allowed_origins = [\"example.com\"]"),
        "allowed_origins: \"example.com\" is not an origin (expected e.g. \"https://app.example.com\")"
    );
    assert_eq!(error("tls_cert = \"cert.pem\""), "tls_key: tls_cert and tls_key must be set together");

    let defaults = wsengine::Config::default();
    assert_eq!(defaults.max_pending_handshakes, 512);
    assert_eq!(defaults.max_header_size, 65_536);
    assert_eq!((defaults.connect_rate_per_ip, defaults.connect_burst_per_ip), (0, 10));
    assert!(defaults.allowed_origins.is_empty());
    assert_eq!(defaults.handshake_timeout, Duration::from_secs(10));
    assert_eq!((defaults.jwt_algorithm.as_str(), defaults.jwt_cookie.as_str()), ("HS256", "access_token"));
    assert_eq!(defaults.jwt_leeway, Duration::from_secs(30));
    assert!(defaults.anonymous_allowed() && !defaults.jwt_enabled());
    let keyed = wsengine::Config::from_sources(
        None,
        [
            ("WSENGINE_JWT_SECRET".to_owned(), "x".repeat(32)),
            ("WSENGINE_ALLOWED_ORIGINS".to_owned(), "[\"https://a.test\"]".to_owned()),
        ],
    )
    .unwrap();
    assert!(keyed.jwt_enabled() && !keyed.anonymous_allowed(), "a key turns anonymous access off");
    assert_eq!(keyed.allowed_origins, ["https://a.test"]);
}
