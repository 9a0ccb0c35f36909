//! TLS on the standalone listener: `wss://` and `https://` on one port with a self-signed
//! certificate made at test time, trusted by the test client.
#![cfg(feature = "tls")]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use wsengine::Envelope;

struct Certificate {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Drop for Certificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_certificate(name: &str) -> Certificate {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("wsengine-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
    Certificate { dir, der: made.cert.der().clone() }
}

fn connector(trusted: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(server: &TestServer, trusted: &CertificateDer<'static>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(server.addr).await?;
    connector(trusted).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

async fn tls_server(certificate: &Certificate) -> TestServer {
    let cert = certificate.dir.join("cert.pem").display().to_string();
    let key = certificate.dir.join("key.pem").display().to_string();
    start(move |c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.handshake_timeout = Duration::from_secs(2);
    })
    .await
}

async fn next_json<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Binary(bytes) => return serde_json::from_slice(&bytes).unwrap(),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn wss_subscribes_and_receives_over_tls() {
    let certificate = make_certificate("wss");
    let server = tls_server(&certificate).await;
    let stream = tls_connect(&server, &certificate.der).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async("wss://localhost/wse", stream).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(next_json(&mut socket).await["t"], "server_ready");
    let subscribe = json!({"t": "subscription_update", "p": {"action": "subscribe", "topics": ["secure"]}});
    socket.send(Message::text(subscribe.to_string())).await.unwrap();
    assert_eq!(next_json(&mut socket).await["p"]["success_topics"], json!(["secure"]));
    server.engine.publish("secure", Envelope::new("tick", json!({"n": 1}))).await.unwrap();
    let message = next_json(&mut socket).await;
    assert_eq!((message["t"].as_str(), &message["p"]), (Some("tick"), &json!({"n": 1})));
    socket.close(None).await.ok();
    server.stop().await;
}

#[tokio::test]
async fn https_api_shares_the_tls_port() {
    let certificate = make_certificate("https");
    let server = tls_server(&certificate).await;
    let mut stream = tls_connect(&server, &certificate.der).await.unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await.unwrap().ok();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"status\":\"ok\""), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn plaintext_and_untrusted_clients_are_refused_without_harm() {
    let certificate = make_certificate("refuse");
    let server = tls_server(&certificate).await;
    // A TLS client that keeps working throughout.
    let stream = tls_connect(&server, &certificate.der).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async("wss://localhost/wse", stream).await.unwrap();
    assert_eq!(next_json(&mut socket).await["t"], "server_ready");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await.unwrap().ok();
    assert!(!answer.starts_with(b"HTTP/"), "plaintext must not be served");

    // A client that does not trust the certificate fails its handshake.
    let stranger = make_certificate("stranger");
    assert!(tls_connect(&server, &stranger.der).await.is_err());

    // A TCP connection that never starts TLS is dropped at the handshake timeout.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let ended = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await.unwrap();
    assert!(matches!(ended, Ok(0) | Err(_)));

    socket.send(Message::text(json!({"t": "ping", "p": {"timestamp": 1}}).to_string())).await.unwrap();
    assert_eq!(next_json(&mut socket).await["t"], "PONG");
    server.stop().await;
}

#[tokio::test]
async fn broken_tls_files_refuse_to_start() {
    let certificate = make_certificate("broken");
    let cert = certificate.dir.join("cert.pem").display().to_string();
    let build = |cert: &str, key: &str| {
        let config =
            wsengine::Config { tls_cert: Some(cert.to_owned()), tls_key: Some(key.to_owned()), ..test_config() };
        wsengine::Engine::builder(config).build().map(drop).unwrap_err()
    };
    let missing = build("/nonexistent/cert.pem", &cert);
    assert_eq!(missing.key(), Some("tls_cert"));
    let not_a_key = build(&cert, &cert);
    assert_eq!(not_a_key.key(), Some("tls_key"));
    let other = make_certificate("other");
    let mismatch = build(&cert, &other.dir.join("key.pem").display().to_string());
    assert_eq!(mismatch.key(), Some("tls_key"), "{mismatch}");
}
