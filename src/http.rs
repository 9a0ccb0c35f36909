//! The HTTP surface: WebSocket upgrades, the publish/send/broadcast API and `/health`.
//!
//! | Request | Does |
//! |---|---|
//! | any `GET` with `Upgrade: websocket` | opens a WSE connection (any path, PROTOCOL.md §2.1) |
//! | `POST /api/publish` `{"topic", "t", "p", "id"?, "pri"?, "cid"?}` | publishes; answers `{"delivered": n, "id": …}` |
//! | `POST /api/send` `{"connection_id" or "user_id", "t", "p", …}` | direct send; answers `{"delivered": n}` |
//! | `POST /api/broadcast` `{"t", "p", …}` | sends to every connection; answers `{"delivered": n}` |
//! | `GET /health` | `{"status", "connections", "subscriptions", "uptime_seconds", "version"}` |
//!
//! With `api_key` configured, `/api/*` needs `Authorization: Bearer <api_key>` (401
//! otherwise). Bad bodies get 400 with `{"error": "…"}`.
//!
//! ```no_run
//! # async fn example(engine: wsengine::Engine) {
//! // Mount the whole surface in your own hyper server:
//! let service = engine.http_service();
//! # let _ = service;
//! # }
//! ```

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower::Service;
use wsengine_core::Envelope;
use wsengine_services::connection::ConnectionId;
use wsengine_services::driver::Shutdown;
use wsengine_services::message::BoxError;
use wsengine_services::websocket::WebSocketService;

use crate::engine::{Engine, Target};

/// The engine's HTTP service.
#[derive(Debug, Clone)]
pub struct HttpService {
    engine: Engine,
    websocket: WebSocketService,
}

impl HttpService {
    pub(crate) fn new(engine: Engine) -> Self {
        let websocket = engine.websocket_service();
        HttpService { engine, websocket }
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    json_response(status, &json!({ "error": message.to_string() }))
}

impl<B> Service<Request<B>> for HttpService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if hyper_tungstenite::is_upgrade_request(&request) {
            return Box::pin(self.websocket.call(request));
        }
        let engine = self.engine.clone();
        Box::pin(async move { Ok(route(engine, request).await) })
    }
}

async fn route<B>(engine: Engine, request: Request<B>) -> HttpResponse
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/health") => json_response(StatusCode::OK, &json!(engine.health())),
        (&Method::POST, "/api/publish" | "/api/send" | "/api/broadcast") => {
            if !authorized(&engine, &request) {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
            }
            let limit = engine.config().max_message_size;
            let body = match Limited::new(request.into_body(), limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("body must be at most {limit} bytes")),
            };
            match api(&engine, &path, &body).await {
                Ok(answer) => json_response(StatusCode::OK, &answer),
                Err(message) => error(StatusCode::BAD_REQUEST, message),
            }
        }
        (_, "/health" | "/api/publish" | "/api/send" | "/api/broadcast") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn authorized<B>(engine: &Engine, request: &Request<B>) -> bool {
    let Some(key) = engine.config().api_key.as_deref() else { return true };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..7).filter(|p| p.eq_ignore_ascii_case("bearer ")).map(|_| v[7..].trim()))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), key.as_bytes())
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The message part shared by every API body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiMessage {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    connection_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    t: String,
    #[serde(default)]
    p: Option<Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    pri: Option<u8>,
    #[serde(default)]
    cid: Option<String>,
}

impl ApiMessage {
    fn envelope(&mut self) -> Envelope {
        let mut envelope = Envelope::new(std::mem::take(&mut self.t), self.p.take().unwrap_or_else(|| json!({})));
        envelope.id = self.id.take();
        envelope.pri = self.pri;
        envelope.cid = self.cid.take();
        envelope
    }
}

async fn api(engine: &Engine, path: &str, body: &[u8]) -> Result<Value, String> {
    let mut message: ApiMessage = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    if message.p.as_ref().is_some_and(|p| !p.is_object()) {
        return Err("p must be a JSON object".into());
    }
    let envelope = message.envelope();
    match path {
        "/api/publish" => {
            let topic = message.topic.ok_or("publish needs a topic")?;
            let report = engine.publish(&topic, envelope).await.map_err(|e| e.to_string())?;
            let id = report.publication.envelope().and_then(|e| e.id.clone());
            Ok(json!({ "delivered": report.delivered, "dropped": report.dropped, "id": id }))
        }
        "/api/send" => {
            let target = match (message.connection_id, message.user_id) {
                (Some(id), None) => Target::Connection(ConnectionId::parse(&id).ok_or("connection_id is not a UUID")?),
                (None, Some(user)) => Target::User(user),
                _ => return Err("send needs exactly one of connection_id and user_id".into()),
            };
            let delivered = engine.send(&target, envelope).map_err(|e| e.to_string())?;
            Ok(json!({ "delivered": delivered }))
        }
        _ => {
            let delivered = engine.broadcast(envelope).map_err(|e| e.to_string())?;
            Ok(json!({ "delivered": delivered }))
        }
    }
}

pub(crate) async fn serve(engine: Engine, listener: TcpListener) -> std::io::Result<()> {
    let mut shutdown = engine.shutdown_signal();
    // Checks the current state first, so a shutdown before this task ran is not missed.
    let closing = async move {
        let _ = shutdown.wait_for(|state| matches!(state, Shutdown::Closing(..))).await.is_ok();
    };
    tokio::pin!(closing);
    let handshake_timeout = engine.config().handshake_timeout;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                stream.set_nodelay(true).ok();
                let service = TowerToHyperService::new(engine.http_service());
                tokio::spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(handshake_timeout)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "HTTP connection ended with an error");
                    }
                });
            }
            () = &mut closing => break,
        }
    }
    drop(listener);
    let grace = engine.config().drain_timeout.max(engine.config().shutdown_grace);
    engine.wait_for_connections(grace).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
