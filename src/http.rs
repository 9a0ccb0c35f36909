//! The HTTP surface: WebSocket upgrades, the publish/send/broadcast API and `/health`.
//!
//! | Request | Does |
//! |---|---|
//! | any `GET` with `Upgrade: websocket` | opens a WSE connection (any path, PROTOCOL.md §2.1) |
//! | `POST /api/publish` `{"topic", "t", "p", "id"?, "pri"?, "cid"?}` | publishes; answers `{"delivered": n, "id": …}` |
//! | `POST /api/send` `{"connection_id" or "user_id", "t", "p", …}` | direct send; answers `{"delivered": n}` |
//! | `POST /api/broadcast` `{"t", "p", …}` | sends to every connection; answers `{"delivered": n}` |
//! | `GET /api/dlq?topic=&kind=&limit=&cursor=` | dead letters, oldest first: `{"entries": […], "next_cursor": …}` |
//! | `POST /api/dlq/replay` `{"topic"?, "ids"?, "kind"?}` | replays dead letters; answers `{"replayed": n, "failed": n}` |
//! | `GET /api/presence/{topic}` (topic percent-encoded) | presence of a topic: `{"topic", "enabled", "stats": {"members", "connections"}, "members": [{"user_id", "data", "connections"}]}` |
//! | `GET /health` | `{"status", "connections", "subscriptions", "uptime_seconds", "version", "circuit_breakers"}` |
//!
//! With `api_key` configured, `/api/*` needs `Authorization: Bearer <api_key>` (401
//! otherwise). Bad bodies get 400 with `{"error": "…"}`; a publish the bus did not take (bus
//! error, or the publish circuit breaker open) gets 503 and is kept in the dead-letter queue.
//!
//! Upgrades pass the handshake stack first ([`HandshakeService`]): admission control (Origin
//! allow-list → 403, per-IP connect rate → 429) → authentication (JWT or a custom hook; a
//! failure is answered after the upgrade with `AUTH_*` + close 4401) → the upgrade service
//! (connection limit → 503). The standalone accept loop ([`Engine::serve`]) adds what only
//! it can see: the peer address (inserted into every request's extensions as a
//! `std::net::SocketAddr`), the pending-handshake cap (503 `Retry-After: 1`, or a plain close
//! on TLS listeners), the handshake timeout from TCP accept (TLS handshake and request head),
//! the request head size limit (431), and TLS when `tls_cert` / `tls_key` are set.
//!
//! ```no_run
//! # async fn example(engine: wsengine::Engine) {
//! // Mount the whole surface in your own hyper server:
//! let service = engine.http_service();
//! # let _ = service;
//! # }
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
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

use crate::config::ConfigError;
use crate::engine::{Engine, SendError, Target};

mod dlq;
use crate::Config;

/// The engine's HTTP service.
#[derive(Debug, Clone)]
pub struct HttpService {
    engine: Engine,
    websocket: HandshakeService,
}

impl HttpService {
    pub(crate) fn new(engine: Engine) -> Self {
        let websocket = engine.handshake_service();
        HttpService { engine, websocket }
    }
}

/// The handshake-tier layers built from the configuration (each absent when not configured).
#[derive(Debug, Clone, Default)]
pub(crate) struct HandshakeLayers {
    #[cfg(feature = "admission")]
    admission: Option<wsengine_layers::admission::AdmissionLayer>,
    #[cfg(feature = "auth")]
    auth: Option<wsengine_layers::auth::AuthLayer>,
    jwt: bool,
}

/// A PEM key from the configuration: the PEM text itself, or a path to a PEM file.
#[cfg(feature = "auth")]
fn pem_bytes(key: &str, value: &str) -> Result<Vec<u8>, ConfigError> {
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    std::fs::read(value).map_err(|e| ConfigError::new(key, format!("cannot read PEM file {value:?}: {e}")))
}

impl HandshakeLayers {
    /// Whether built-in JWT authentication is on (`server_ready.features.rust_jwt`).
    pub(crate) fn jwt_mode(&self) -> bool {
        self.jwt
    }

    #[cfg(feature = "auth")]
    pub(crate) fn from_config(
        config: &Config,
        hook: Option<std::sync::Arc<dyn wsengine_layers::auth::AuthHook>>,
    ) -> Result<Self, ConfigError> {
        use wsengine_layers::auth::{AuthLayer, JwtAlgorithm, JwtVerifier};
        let mut layers = HandshakeLayers { auth: None, jwt: false, ..Self::admission_from_config(config)? };
        let key_name = if config.jwt_secret.is_some() { "jwt_secret" } else { "jwt_public_key" };
        let auth = match hook {
            Some(_) if config.jwt_enabled() => {
                return Err(ConfigError::new(
                    key_name,
                    "a custom auth hook is installed; use either the hook or JWT authentication",
                ));
            }
            Some(hook) => Some(AuthLayer::custom(hook)),
            None if config.jwt_enabled() => {
                let algorithm = JwtAlgorithm::parse(&config.jwt_algorithm)
                    .ok_or_else(|| ConfigError::new("jwt_algorithm", "must be HS256, RS256 or ES256"))?;
                let (current, previous) = match (&config.jwt_secret, &config.jwt_public_key) {
                    (Some(secret), _) => {
                        (secret.as_bytes().to_vec(), config.jwt_previous_secret.as_ref().map(|s| s.as_bytes().to_vec()))
                    }
                    (None, Some(pem)) => (
                        pem_bytes("jwt_public_key", pem)?,
                        config
                            .jwt_previous_public_key
                            .as_ref()
                            .map(|pem| pem_bytes("jwt_previous_public_key", pem))
                            .transpose()?,
                    ),
                    (None, None) => unreachable!("jwt_enabled"),
                };
                let mut verifier = JwtVerifier::new(algorithm, &current)
                    .map_err(|e| ConfigError::new(key_name, e.to_string()))?
                    .leeway(config.jwt_leeway);
                if let Some(previous) = previous {
                    let previous_name =
                        if config.jwt_secret.is_some() { "jwt_previous_secret" } else { "jwt_previous_public_key" };
                    verifier =
                        verifier.previous_key(&previous).map_err(|e| ConfigError::new(previous_name, e.to_string()))?;
                }
                if !config.jwt_issuer.is_empty() {
                    verifier = verifier.issuer(&config.jwt_issuer);
                }
                if !config.jwt_audience.is_empty() {
                    verifier = verifier.audience(&config.jwt_audience);
                }
                if !config.jwt_key_id.is_empty() {
                    verifier = verifier.key_id(&config.jwt_key_id);
                }
                layers.jwt = true;
                Some(
                    AuthLayer::jwt(verifier)
                        .cookie_name(config.jwt_cookie.clone())
                        .allow_anonymous(config.anonymous_allowed()),
                )
            }
            None if config.anonymous_allowed() => None,
            None => Some(AuthLayer::refuse_all()),
        };
        layers.auth = auth.map(|layer| {
            layer.reject_before_upgrade(config.reject_before_upgrade).close_on_expiry(config.close_on_token_expiry)
        });
        Ok(layers)
    }

    #[cfg(not(feature = "auth"))]
    pub(crate) fn from_config(config: &Config) -> Result<Self, ConfigError> {
        if config.jwt_enabled() || !config.anonymous_allowed() {
            let key = if config.jwt_enabled() { "jwt_secret" } else { "allow_anonymous" };
            return Err(ConfigError::new(key, "this build of wsengine has no `auth` feature"));
        }
        Self::admission_from_config(config)
    }

    fn admission_from_config(config: &Config) -> Result<Self, ConfigError> {
        #[cfg(feature = "admission")]
        {
            use std::num::NonZeroU32;
            let mut layer = None;
            if !config.allowed_origins.is_empty() {
                layer =
                    Some(wsengine_layers::admission::AdmissionLayer::new().allowed_origins(&config.allowed_origins));
            }
            if let (Some(rate), Some(burst)) =
                (NonZeroU32::new(config.connect_rate_per_ip), NonZeroU32::new(config.connect_burst_per_ip))
            {
                // Validated with the rest of the configuration.
                let proxies = config.trusted_proxies.iter().filter_map(|proxy| proxy.parse().ok()).collect();
                layer = Some(layer.unwrap_or_default().connect_rate(rate, burst).trusted_proxies(proxies));
            }
            Ok(HandshakeLayers { admission: layer, ..HandshakeLayers::default() })
        }
        #[cfg(not(feature = "admission"))]
        {
            if !config.allowed_origins.is_empty()
                || config.connect_rate_per_ip > 0
                || !config.trusted_proxies.is_empty()
            {
                let key = if config.connect_rate_per_ip > 0 {
                    "connect_rate_per_ip"
                } else if config.trusted_proxies.is_empty() {
                    "allowed_origins"
                } else {
                    "trusted_proxies"
                };
                return Err(ConfigError::new(key, "this build of wsengine has no `admission` feature"));
            }
            Ok(HandshakeLayers::default())
        }
    }
}

/// The configured handshake stack around the upgrade service; see [`Engine::handshake_service`].
#[derive(Debug, Clone)]
pub struct HandshakeService {
    #[cfg_attr(not(any(feature = "auth", feature = "admission")), allow(dead_code))]
    layers: HandshakeLayers,
    websocket: WebSocketService,
}

impl HandshakeService {
    pub(crate) fn new(layers: HandshakeLayers, websocket: WebSocketService) -> Self {
        HandshakeService { layers, websocket }
    }
}

impl<B: Send + 'static> Service<Request<B>> for HandshakeService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Outermost last: admission → auth → upgrade.
        let service = self.websocket.clone();
        #[cfg(feature = "auth")]
        let service = tower::ServiceBuilder::new().option_layer(self.layers.auth.clone()).service(service);
        #[cfg(feature = "admission")]
        let service = tower::ServiceBuilder::new().option_layer(self.layers.admission.clone()).service(service);
        Box::pin(tower::ServiceExt::oneshot(service, request))
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
                Err(ApiError(status, message)) => error(status, message),
            }
        }
        (&Method::GET, "/api/dlq") => {
            if !authorized(&engine, &request) {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
            }
            dlq::list(&engine, request.uri().query()).await
        }
        (&Method::POST, "/api/dlq/replay") => {
            if !authorized(&engine, &request) {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
            }
            let limit = engine.config().max_message_size;
            match Limited::new(request.into_body(), limit).collect().await {
                Ok(collected) => dlq::replay(&engine, &collected.to_bytes()).await,
                Err(_) => error(StatusCode::PAYLOAD_TOO_LARGE, format!("body must be at most {limit} bytes")),
            }
        }
        #[cfg(feature = "presence")]
        (&Method::GET, presence) if presence.starts_with("/api/presence/") => {
            if !authorized(&engine, &request) {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
            }
            match dlq::percent_decode(&presence["/api/presence/".len()..]) {
                Some(topic) if wsengine_core::topic::validate_topic(&topic) => json_response(
                    StatusCode::OK,
                    &json!({
                        "topic": topic,
                        "enabled": engine.config().presence_enabled,
                        "stats": engine.presence_stats(&topic),
                        "members": engine.presence(&topic),
                    }),
                ),
                _ => error(StatusCode::BAD_REQUEST, "invalid topic"),
            }
        }
        #[cfg(feature = "presence")]
        (_, presence) if presence.starts_with("/api/presence/") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, "/api/dlq" | "/api/dlq/replay") => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        (_, "/health" | "/api/publish" | "/api/send" | "/api/broadcast") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn authorized<B>(engine: &Engine, request: &Request<B>) -> bool {
    let config = engine.config();
    let Some(key) = config.api_key.as_deref() else { return true };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..7).filter(|p| p.eq_ignore_ascii_case("bearer ")).map(|_| v[7..].trim()))
        .unwrap_or("");
    // Both are compared, so the time taken does not tell which key matched.
    let current = constant_time_eq(given.as_bytes(), key.as_bytes());
    let previous =
        config.api_previous_key.as_deref().is_some_and(|old| constant_time_eq(given.as_bytes(), old.as_bytes()));
    current | previous
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

/// Why an API request failed: the status and the message for `{"error": …}`. Plain messages
/// are the caller's mistakes (400).
struct ApiError(StatusCode, String);

impl From<String> for ApiError {
    fn from(message: String) -> Self {
        ApiError(StatusCode::BAD_REQUEST, message)
    }
}

impl From<&str> for ApiError {
    fn from(message: &str) -> Self {
        ApiError(StatusCode::BAD_REQUEST, message.to_owned())
    }
}

impl From<SendError> for ApiError {
    /// The bus failing (or its circuit breaker being open) is the server's problem: 503.
    fn from(error: SendError) -> Self {
        let status = match error {
            SendError::Bus(_) | SendError::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, error.to_string())
    }
}

async fn api(engine: &Engine, path: &str, body: &[u8]) -> Result<Value, ApiError> {
    let mut message: ApiMessage = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    if message.p.as_ref().is_some_and(|p| !p.is_object()) {
        return Err("p must be a JSON object".into());
    }
    let envelope = message.envelope();
    match path {
        "/api/publish" => {
            let topic = message.topic.ok_or("publish needs a topic")?;
            let report = engine.publish(&topic, envelope).await?;
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

/// A place among the connections whose HTTP request has not been answered yet; dropping it
/// frees the place.
struct PendingSlot(Arc<AtomicUsize>);

impl PendingSlot {
    fn take(pending: &Arc<AtomicUsize>, max: usize) -> Option<PendingSlot> {
        pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| PendingSlot(Arc::clone(pending)))
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers 503 without reading the request (plain TCP), or just closes (TLS: a plaintext
/// answer would be garbage to a TLS client).
async fn refuse_busy(mut stream: tokio::net::TcpStream, tls: bool) {
    use tokio::io::AsyncWriteExt;
    if !tls {
        let answer =
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
}

/// Serves HTTP/1.1 on one accepted connection until it upgrades or closes. The request head
/// must arrive within `head_timeout` and fit `max_header_size`; `slot` is held until then.
async fn serve_connection<I>(io: I, peer: SocketAddr, engine: &Engine, head_timeout: Duration, slot: PendingSlot)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = engine.http_service();
    // Admission and the custom auth hook key on the peer address.
    let service =
        TowerToHyperService::new(tower::util::MapRequest::new(http, move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(peer);
            request
        }));
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(engine.config().max_header_size)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "HTTP connection ended with an error");
    }
    drop(slot);
}

/// Per-socket options of an accepted connection: no Nagle delay (frames are coalesced by the
/// driver already), and the configured send buffer.
fn tune_socket(stream: &tokio::net::TcpStream, config: &crate::Config) {
    stream.set_nodelay(true).ok();
    if config.socket_send_buffer != 0 {
        if let Err(error) = socket2::SockRef::from(stream).set_send_buffer_size(config.socket_send_buffer) {
            tracing::debug!(%error, "cannot set the socket send buffer");
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
    let pending = Arc::new(AtomicUsize::new(0));
    let max_pending = engine.config().max_pending_handshakes;
    #[cfg(feature = "tls")]
    let tls = engine.tls_acceptor();
    #[cfg(not(feature = "tls"))]
    let tls: Option<std::convert::Infallible> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                tune_socket(&stream, engine.config());
                let Some(slot) = PendingSlot::take(&pending, max_pending) else {
                    tracing::debug!(%peer, "connection refused: too many pending handshakes");
                    tokio::spawn(refuse_busy(stream, tls.is_some()));
                    continue;
                };
                let engine = engine.clone();
                #[cfg(feature = "tls")]
                let tls = tls.clone();
                tokio::spawn(async move {
                    let timeout = engine.config().handshake_timeout;
                    #[cfg(feature = "tls")]
                    if let Some(acceptor) = tls {
                        let accepted_at = tokio::time::Instant::now();
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                let left = timeout.saturating_sub(accepted_at.elapsed()).max(Duration::from_millis(1));
                                serve_connection(stream, peer, &engine, left, slot).await;
                            }
                            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                        return;
                    }
                    serve_connection(stream, peer, &engine, timeout, slot).await;
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
    use super::{constant_time_eq, tune_socket};

    /// The send buffer of an accepted loopback socket tuned with `socket_send_buffer`.
    async fn send_buffer(listener: &tokio::net::TcpListener, configured: usize) -> usize {
        let config = crate::Config { socket_send_buffer: configured, ..crate::Config::default() };
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_socket(&accepted, &config);
        assert!(accepted.nodelay().unwrap());
        socket2::SockRef::from(&accepted).send_buffer_size().unwrap()
    }

    #[tokio::test]
    async fn the_send_buffer_is_capped_only_when_configured() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let default = send_buffer(&listener, 0).await;
        // Linux doubles the value for its bookkeeping.
        let capped = send_buffer(&listener, 16 * 1024).await;
        assert!((16 * 1024..=2 * 16 * 1024).contains(&capped), "{capped}");
        assert!(default > capped, "the kernel default ({default}) is left alone");
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
