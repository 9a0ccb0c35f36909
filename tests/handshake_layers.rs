//! The upgrade is an ordinary `tower::Service<http::Request<_>>`: handshake layers wrap it
//! and it mounts in a plain hyper server. A layer names the user (an `Identity` in the
//! request extensions) or rejects it (an `AuthRejection`: error frame, then close 4401).

mod common;

use std::time::Duration;

use common::*;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tower::ServiceBuilder;
use wsengine::client::Client;
use wsengine::core::{ErrorCode, ProtocolError};
use wsengine::services::connection::{AuthRejection, Identity};
use wsengine::{Config, Engine, Envelope};

/// Trusts an `x-user` header (a stand-in for a real auth layer).
fn identify<B>(mut request: http::Request<B>) -> http::Request<B> {
    match request.headers().get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned) {
        Some(user) => {
            request.extensions_mut().insert(Identity::new(user));
        }
        None => {
            let error = ProtocolError::new(ErrorCode::AuthRequired, "No JWT cookie or Authorization header");
            request.extensions_mut().insert(AuthRejection(error));
        }
    }
    request
}

#[tokio::test]
async fn a_handshake_layer_names_or_rejects_the_user() {
    let engine = Engine::builder(Config { log: "warn".into(), ..Config::default() }).build().unwrap();
    let service = ServiceBuilder::new().map_request(identify).service(engine.websocket_service());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });

    let request = http::Request::builder()
        .uri(format!("ws://{addr}/wse"))
        .header("x-user", "alice")
        .header("host", addr.to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(())
        .unwrap();
    let mut alice = Client::connect_request(request).await.unwrap();
    assert_eq!(alice.server_ready()["p"]["details"]["user_id"], "alice");
    alice.subscribe(&["news"]).await.unwrap();

    let mut raw = RawSocket::connect(addr, "/wse").await;
    let error = raw.read_json().await;
    assert_eq!(error["t"], "error");
    assert_eq!(error["p"]["code"], "AUTH_REQUIRED");
    assert!(error["p"].get("recoverable").is_none(), "auth errors carry no recoverable flag");
    assert_eq!(raw.read_close().await, Some(4401));

    // The rejected connection was never registered; alice is still served.
    assert_eq!(engine.connection_count(), 1);
    engine.publish("news", Envelope::new("headline", json!({"x": 1}))).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), alice.recv()).await.unwrap().unwrap();
    assert_eq!(message["t"], "headline");
}
