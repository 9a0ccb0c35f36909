//! Authentication of WebSocket upgrade requests (handshake tier, PROTOCOL.md §2.3–§2.5).
//!
//! [`AuthLayer`] wraps any `Service<http::Request<B>>` (normally the engine's upgrade
//! service) and records its verdict in the request extensions: an
//! [`Identity`] (plus a [`TopicAcl`] when the credentials carry one) for an accepted user, or
//! an [`AuthRejection`] that makes the engine complete the upgrade, send the `AUTH_REQUIRED` /
//! `AUTH_FAILED` error frame and close with 4401. With
//! [`AuthLayer::reject_before_upgrade`] it answers HTTP 401 instead (which the TypeScript
//! client cannot tell from a network failure, so its token refresh never runs).
//!
//! Two ways to check credentials:
//!
//! - [`AuthLayer::jwt`] with a [`JwtVerifier`]: HS256, RS256 or ES256 (fixed by
//!   configuration), the token taken from the cookie (default `access_token`) or else
//!   `Authorization: Bearer`; `exp` required, `nbf` honoured, leeway, issuer, audience, key id,
//!   a previous key during rotation, the `wse_topics` ACL claim;
//! - [`AuthLayer::custom`] with an [`AuthHook`] of your own (see [`auth_fn`]).
//!
//! ```
//! use std::time::Duration;
//! use wsengine_layers::auth::{AuthLayer, JwtVerifier};
//!
//! let verifier = JwtVerifier::hs256(b"a-secret-of-at-least-thirty-two-bytes!")
//!     .expect("long enough")
//!     .issuer("https://login.example.com")
//!     .leeway(Duration::from_secs(10));
//! let layer = AuthLayer::jwt(verifier).cookie_name("session");
//! // ServiceBuilder::new().layer(layer).service(engine.websocket_service())
//! # let _ = layer;
//! ```

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, Ready, ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::{HeaderMap, Request, Response, StatusCode, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tower::{Layer, Service};
use wsengine_core::{ErrorCode, ProtocolError};
use wsengine_services::acl::TopicAcl;
use wsengine_services::connection::{AuthRejection, Identity};

/// Tokens longer than this are rejected before any parsing (PROTOCOL.md §2.4).
pub const MAX_TOKEN_LEN: usize = 8192;
/// Shortest accepted HS256 secret, in bytes.
pub const MIN_HS256_SECRET_LEN: usize = 32;
/// The default credentials cookie.
pub const DEFAULT_COOKIE: &str = "access_token";
/// The default clock leeway for `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

const MESSAGE_REQUIRED: &str = "No JWT cookie or Authorization header";
const MESSAGE_FAILED: &str = "Authentication failed";
const MESSAGE_NO_SUBJECT: &str = "Token missing user ID";

/// The signature algorithm tokens must use; any other `alg` (and `none`) is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret of at least 32 bytes.
    #[default]
    Hs256,
    /// RSASSA-PKCS1-v1_5 SHA-256 with an RSA public key (PEM).
    Rs256,
    /// ECDSA P-256 SHA-256 with an EC public key (PEM).
    Es256,
}

impl JwtAlgorithm {
    /// Parses `HS256`, `RS256` or `ES256` (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "HS256" => Some(JwtAlgorithm::Hs256),
            "RS256" => Some(JwtAlgorithm::Rs256),
            "ES256" => Some(JwtAlgorithm::Es256),
            _ => None,
        }
    }

    fn jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
        })
    }
}

/// A key the verifier cannot use: a short HS256 secret or an unreadable PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

fn decoding_key(algorithm: JwtAlgorithm, key: &[u8]) -> Result<DecodingKey, KeyError> {
    match algorithm {
        JwtAlgorithm::Hs256 => {
            if key.len() < MIN_HS256_SECRET_LEN {
                return Err(KeyError(format!(
                    "an HS256 secret must be at least {MIN_HS256_SECRET_LEN} bytes, got {}",
                    key.len()
                )));
            }
            DecodingKey::from_secret(key).map_err(|e| KeyError(format!("unusable HS256 secret: {e}")))
        }
        JwtAlgorithm::Rs256 => {
            DecodingKey::from_rsa_pem(key).map_err(|e| KeyError(format!("not an RSA public key in PEM form ({e})")))
        }
        JwtAlgorithm::Es256 => {
            DecodingKey::from_ec_pem(key).map_err(|e| KeyError(format!("not a P-256 public key in PEM form ({e})")))
        }
    }
}

/// Why a token was refused. Only [`AuthFailure::message`] ever reaches the client; the
/// detail is for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    code: ErrorCode,
    message: Cow<'static, str>,
    detail: Cow<'static, str>,
}

impl AuthFailure {
    fn failed(detail: impl Into<Cow<'static, str>>) -> Self {
        AuthFailure { code: ErrorCode::AuthFailed, message: MESSAGE_FAILED.into(), detail: detail.into() }
    }

    fn required() -> Self {
        AuthFailure { code: ErrorCode::AuthRequired, message: MESSAGE_REQUIRED.into(), detail: "no credentials".into() }
    }

    /// `AUTH_REQUIRED` or `AUTH_FAILED`.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The text of the error frame (PROTOCOL.md §2.5 table).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What exactly failed (expired, bad signature, …), never sent to the client.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The error frame the connection gets before the 4401 close.
    pub fn to_protocol_error(&self) -> ProtocolError {
        ProtocolError::new(self.code, self.message.clone())
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.detail)
    }
}

impl std::error::Error for AuthFailure {}

/// Who the credentials name, and the topic ACL they carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user id (`sub`).
    pub user_id: String,
    /// The topic ACL (`wse_topics`), if any.
    pub acl: Option<TopicAcl>,
    /// When the credentials expire (a JWT's `exp` plus the leeway); with
    /// [`AuthLayer::close_on_expiry`] the connection is closed then.
    pub expires_at: Option<std::time::SystemTime>,
}

impl Grant {
    /// A user without a topic ACL or an expiry.
    pub fn user(user_id: impl Into<String>) -> Self {
        Grant { user_id: user_id.into(), acl: None, expires_at: None }
    }
}

/// Validates JWTs as PROTOCOL.md §2.4 prescribes.
///
/// ```
/// use wsengine_layers::auth::JwtVerifier;
///
/// assert!(JwtVerifier::hs256(b"too short").is_err());
/// let verifier = JwtVerifier::hs256(&[7u8; 32]).unwrap();
/// assert!(verifier.verify("not.a.token").is_err());
/// ```
#[derive(Clone)]
pub struct JwtVerifier {
    algorithm: JwtAlgorithm,
    current: DecodingKey,
    previous: Option<DecodingKey>,
    key_id: Option<String>,
    validation: Validation,
}

impl fmt::Debug for JwtVerifier {
    /// Never shows key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.algorithm)
            .field("previous_key", &self.previous.is_some())
            .field("key_id", &self.key_id)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("leeway", &self.validation.leeway)
            .finish()
    }
}

impl JwtVerifier {
    /// A verifier for `algorithm` with `key`: the shared secret for HS256 (at least 32 bytes),
    /// a PEM public key for RS256 and ES256.
    pub fn new(algorithm: JwtAlgorithm, key: &[u8]) -> Result<Self, KeyError> {
        let current = decoding_key(algorithm, key)?;
        let mut validation = Validation::new(algorithm.jsonwebtoken());
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Audience is checked only when configured (PROTOCOL.md §2.4).
        validation.validate_aud = false;
        validation.leeway = DEFAULT_LEEWAY.as_secs();
        Ok(JwtVerifier { algorithm, current, previous: None, key_id: None, validation })
    }

    /// HS256 with a shared secret of at least 32 bytes.
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        Self::new(JwtAlgorithm::Hs256, secret)
    }

    /// RS256 with an RSA public key in PEM form.
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Self::new(JwtAlgorithm::Rs256, pem)
    }

    /// ES256 with a P-256 public key in PEM form.
    pub fn es256_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Self::new(JwtAlgorithm::Es256, pem)
    }

    /// Also accepts tokens signed with the previous key (same algorithm) during a rotation.
    /// It is tried when the current key fails on the signature or on `kid`; `kid` is not
    /// enforced on that retry.
    pub fn previous_key(mut self, key: &[u8]) -> Result<Self, KeyError> {
        self.previous = Some(decoding_key(self.algorithm, key)?);
        Ok(self)
    }

    /// Requires `iss` to equal `issuer`.
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self
    }

    /// Requires `aud` (a string or an array of strings) to contain `audience`.
    pub fn audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        self
    }

    /// Requires the header's `kid` to equal `key_id`.
    pub fn key_id(mut self, key_id: &str) -> Self {
        self.key_id = Some(key_id.to_owned());
        self
    }

    /// Clock leeway for `exp` and `nbf` (whole seconds; default 30 s).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        self
    }

    /// The configured algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// Validates `token` and returns the user id and topic ACL it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthFailure> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthFailure::failed(format!("token of {} bytes exceeds {MAX_TOKEN_LEN}", token.len())));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthFailure::failed(format!("malformed token: {e}")))?;
        let kid_ok = match &self.key_id {
            Some(expected) => header.kid.as_deref() == Some(expected.as_str()),
            None => true,
        };
        let claims = if kid_ok {
            match jsonwebtoken::decode::<Value>(token, &self.current, &self.validation) {
                Ok(data) => data.claims,
                Err(error) if matches!(error.kind(), ErrorKind::InvalidSignature) => {
                    self.retry(token, "bad signature")?
                }
                Err(error) => return Err(AuthFailure::failed(error.to_string())),
            }
        } else {
            self.retry(token, "key id does not match")?
        };
        let mut grant = grant(&claims)?;
        // `exp` is required and was validated, so it is a number here.
        grant.expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|exp| std::time::UNIX_EPOCH + Duration::from_secs(exp.saturating_add(self.validation.leeway)));
        Ok(grant)
    }

    fn retry(&self, token: &str, why: &'static str) -> Result<Value, AuthFailure> {
        let previous = self.previous.as_ref().ok_or_else(|| AuthFailure::failed(why))?;
        jsonwebtoken::decode::<Value>(token, previous, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| AuthFailure::failed(format!("{why}; previous key: {e}")))
    }
}

/// `sub` and `wse_topics` of validated claims.
fn grant(claims: &Value) -> Result<Grant, AuthFailure> {
    let acl = match claims.get("wse_topics") {
        None => None,
        Some(Value::Object(lists)) => Some(TopicAcl::new(globs(lists.get("allow"))?, globs(lists.get("deny"))?)),
        // Fail closed on a malformed authorization claim (PROTOCOL.md §14 D22).
        Some(_) => return Err(AuthFailure::failed("wse_topics is not an object")),
    };
    match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => Ok(Grant { user_id: sub.clone(), acl, expires_at: None }),
        _ => Err(AuthFailure {
            code: ErrorCode::AuthFailed,
            message: MESSAGE_NO_SUBJECT.into(),
            detail: "sub missing, empty or not a string".into(),
        }),
    }
}

/// A list of `wse_topics`: missing is empty, non-string elements are ignored, anything but an
/// array is refused.
fn globs(list: Option<&Value>) -> Result<Vec<String>, AuthFailure> {
    match list {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()),
        Some(_) => Err(AuthFailure::failed("wse_topics allow/deny is not an array")),
    }
}

/// The token of an upgrade request: the cookie `cookie_name` first, else
/// `Authorization: Bearer` (PROTOCOL.md §2.3). A usable cookie wins even when it is invalid.
///
/// ```
/// use http::HeaderMap;
/// use wsengine_layers::auth::token_from_headers;
///
/// let mut headers = HeaderMap::new();
/// headers.append("cookie", "theme=dark; access_token=\"abc\"".parse().unwrap());
/// headers.append("authorization", "Bearer xyz".parse().unwrap());
/// assert_eq!(token_from_headers(&headers, "access_token"), Some("abc"));
/// headers.remove("cookie");
/// assert_eq!(token_from_headers(&headers, "access_token"), Some("xyz"));
/// ```
pub fn token_from_headers<'h>(headers: &'h HeaderMap, cookie_name: &str) -> Option<&'h str> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for part in value.split(';') {
            let Some((name, token)) = part.trim().split_once('=') else { continue };
            if name.trim() != cookie_name {
                continue;
            }
            let token = token.trim();
            let token = token.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(token);
            if !matches!(token, "" | "undefined" | "null") {
                return Some(token);
            }
        }
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let prefix = value.get(..7)?;
    if !prefix.eq_ignore_ascii_case("bearer ") {
        return None;
    }
    Some(value[7..].trim()).filter(|token| !token.is_empty())
}

/// What a custom [`AuthHook`] sees of the upgrade request.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// Every request header (cookies, `Authorization`, …).
    pub headers: HeaderMap,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The peer address, when the server put one into the request extensions.
    pub peer: Option<SocketAddr>,
}

/// A custom hook's refusal: `AUTH_FAILED` with this message (default `Authentication failed`),
/// then close 4401.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Denial {
    message: Option<String>,
}

impl Denial {
    /// A refusal with the default message.
    pub fn new() -> Self {
        Denial::default()
    }

    /// A refusal whose error frame carries `message`.
    pub fn with_message(message: impl Into<String>) -> Self {
        Denial { message: Some(message.into()) }
    }
}

/// Your own credential check for `custom` mode (PROTOCOL.md §2.3).
pub trait AuthHook: Send + Sync + 'static {
    /// Accepts the request as a user (optionally with a topic ACL) or refuses it.
    fn authenticate(&self, request: AuthRequest) -> BoxFuture<'static, Result<Grant, Denial>>;
}

impl<H: AuthHook + ?Sized> AuthHook for Arc<H> {
    fn authenticate(&self, request: AuthRequest) -> BoxFuture<'static, Result<Grant, Denial>> {
        (**self).authenticate(request)
    }
}

/// An [`AuthHook`] from an async closure.
///
/// ```
/// use wsengine_layers::auth::{AuthLayer, Denial, Grant, auth_fn};
///
/// let hook = auth_fn(|request| async move {
///     match request.headers.get("x-api-user").and_then(|v| v.to_str().ok()) {
///         Some(user) => Ok(Grant::user(user)),
///         None => Err(Denial::with_message("Unknown user")),
///     }
/// });
/// let layer = AuthLayer::custom(hook);
/// # let _ = layer;
/// ```
pub fn auth_fn<F, Fut>(f: F) -> AuthFn<F>
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Grant, Denial>> + Send + 'static,
{
    AuthFn(f)
}

/// An async closure as an [`AuthHook`]; made by [`auth_fn`].
#[derive(Clone, Copy)]
pub struct AuthFn<F>(F);

impl<F> fmt::Debug for AuthFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthFn")
    }
}

impl<F, Fut> AuthHook for AuthFn<F>
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Grant, Denial>> + Send + 'static,
{
    fn authenticate(&self, request: AuthRequest) -> BoxFuture<'static, Result<Grant, Denial>> {
        Box::pin((self.0)(request))
    }
}

#[derive(Clone)]
enum Method {
    Jwt {
        verifier: Box<JwtVerifier>,
        cookie: String,
    },
    Custom(Arc<dyn AuthHook>),
    /// No credential check exists, and anonymous connections are refused.
    Nobody,
}

#[derive(Clone)]
struct Policy {
    method: Method,
    allow_anonymous: bool,
    reject_before_upgrade: bool,
    close_on_expiry: bool,
}

/// The handshake-tier authentication layer; see the [module documentation](self).
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match &self.policy.method {
            Method::Jwt { verifier, cookie } => format!("jwt({:?}, cookie {cookie:?})", verifier.algorithm()),
            Method::Custom(_) => "custom".to_owned(),
            Method::Nobody => "none".to_owned(),
        };
        f.debug_struct("AuthLayer")
            .field("method", &method)
            .field("allow_anonymous", &self.policy.allow_anonymous)
            .field("reject_before_upgrade", &self.policy.reject_before_upgrade)
            .field("close_on_expiry", &self.policy.close_on_expiry)
            .finish()
    }
}

impl AuthLayer {
    fn with(method: Method) -> Self {
        let policy = Policy { method, allow_anonymous: false, reject_before_upgrade: false, close_on_expiry: false };
        AuthLayer { policy: Arc::new(policy) }
    }

    fn policy_mut(&mut self) -> &mut Policy {
        Arc::make_mut(&mut self.policy)
    }

    /// JWT mode: requests without a token are refused with `AUTH_REQUIRED` unless
    /// [`AuthLayer::allow_anonymous`] is set.
    pub fn jwt(verifier: JwtVerifier) -> Self {
        Self::with(Method::Jwt { verifier: Box::new(verifier), cookie: DEFAULT_COOKIE.to_owned() })
    }

    /// Custom mode: `hook` decides every request.
    pub fn custom(hook: impl AuthHook) -> Self {
        Self::with(Method::Custom(Arc::new(hook)))
    }

    /// No credentials can be checked and anonymous connections are not allowed: every upgrade
    /// gets `AUTH_REQUIRED` (a locked server).
    pub fn refuse_all() -> Self {
        Self::with(Method::Nobody)
    }

    /// The cookie holding the token in JWT mode (default `access_token`).
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        if let Method::Jwt { cookie, .. } = &mut self.policy_mut().method {
            *cookie = name.into();
        }
        self
    }

    /// In JWT mode, lets requests without any token in as anonymous connections (their user
    /// id is the connection id). A token that is present but invalid is still refused.
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.policy_mut().allow_anonymous = allow;
        self
    }

    /// Refuses with HTTP 401 before the upgrade instead of the error frame and close 4401.
    /// Not compatible with the TypeScript client's token refresh (PROTOCOL.md §2.5).
    pub fn reject_before_upgrade(mut self, reject: bool) -> Self {
        self.policy_mut().reject_before_upgrade = reject;
        self
    }

    /// Closes a connection when its credentials expire ([`Grant::expires_at`]: a JWT's `exp`
    /// plus the leeway): the client gets `AUTH_FAILED` "Token expired" and close 4401 at the
    /// first heartbeat tick after that moment. The TypeScript client refreshes its token and
    /// reconnects; the Python client stops (PROTOCOL.md §12.1).
    pub fn close_on_expiry(mut self, close: bool) -> Self {
        self.policy_mut().close_on_expiry = close;
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, policy: Arc::clone(&self.policy) }
    }
}

/// The service [`AuthLayer`] produces.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S: fmt::Debug> fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("inner", &self.inner).finish_non_exhaustive()
    }
}

fn unauthorized<ResBody: Default>() -> Response<ResBody> {
    let mut response = Response::new(ResBody::default());
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// Puts the verdict into the request; `Some(response)` when it must be refused right here.
fn record<B, ResBody: Default>(
    request: &mut Request<B>,
    verdict: Result<Option<Grant>, AuthFailure>,
    reject_before_upgrade: bool,
    close_on_expiry: bool,
) -> Option<Response<ResBody>> {
    match verdict {
        Ok(Some(Grant { user_id, acl, expires_at })) => {
            let expires_at = expires_at.filter(|_| close_on_expiry);
            request.extensions_mut().insert(Identity { user_id, expires_at });
            if let Some(acl) = acl {
                request.extensions_mut().insert(acl);
            }
            None
        }
        Ok(None) => None,
        Err(failure) => {
            tracing::debug!(reason = %failure, "upgrade refused by authentication");
            if reject_before_upgrade {
                return Some(unauthorized());
            }
            request.extensions_mut().insert(AuthRejection(failure.to_protocol_error()));
            None
        }
    }
}

type AuthFuture<F, R, E> = Either<Ready<Result<R, E>>, Either<F, BoxFuture<'static, Result<R, E>>>>;

impl<S, B, ResBody> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = AuthFuture<S::Future, Response<ResBody>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let policy = &*self.policy;
        let verdict = match &policy.method {
            Method::Jwt { verifier, cookie } => match token_from_headers(request.headers(), cookie) {
                Some(token) => verifier.verify(token).map(Some),
                None if policy.allow_anonymous => Ok(None),
                None => Err(AuthFailure::required()),
            },
            Method::Nobody => Err(AuthFailure::required()),
            Method::Custom(hook) => {
                let hook = Arc::clone(hook);
                let (reject_before_upgrade, close_on_expiry) = (policy.reject_before_upgrade, policy.close_on_expiry);
                let asked = AuthRequest {
                    headers: request.headers().clone(),
                    query: request.uri().query().map(str::to_owned),
                    peer: request.extensions().get::<SocketAddr>().copied(),
                };
                // The readied service goes into the future; a clone stays for the next call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                return Either::Right(Either::Right(Box::pin(async move {
                    let verdict = match hook.authenticate(asked).await {
                        Ok(grant) if !grant.user_id.is_empty() => Ok(Some(grant)),
                        Ok(_) => Err(AuthFailure::failed("hook returned an empty user id")),
                        Err(denial) => Err(AuthFailure {
                            code: ErrorCode::AuthFailed,
                            message: denial.message.map(Cow::Owned).unwrap_or(Cow::Borrowed(MESSAGE_FAILED)),
                            detail: "refused by the custom hook".into(),
                        }),
                    };
                    if let Some(response) = record(&mut request, verdict, reject_before_upgrade, close_on_expiry) {
                        return Ok(response);
                    }
                    inner.call(request).await
                })));
            }
        };
        match record(&mut request, verdict, policy.reject_before_upgrade, policy.close_on_expiry) {
            Some(response) => Either::Left(ready(Ok(response))),
            None => Either::Right(Either::Left(self.inner.call(request))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    fn token(claims: Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn exp() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    #[test]
    fn cookie_parsing_follows_the_lookup_rules() {
        let t = |pairs: &[(&str, &str)]| token_from_headers(&headers(pairs), "access_token").map(str::to_owned);
        assert_eq!(t(&[("cookie", "a=1; access_token=tok")]), Some("tok".into()));
        assert_eq!(t(&[("cookie", "a=1"), ("cookie", " access_token = tok2 ")]), Some("tok2".into()));
        assert_eq!(t(&[("cookie", "access_token=\"quoted\"")]), Some("quoted".into()));
        for absent in ["access_token=", "access_token=undefined", "access_token=null", "access_token=\"\"", "x=1"] {
            assert_eq!(t(&[("cookie", absent)]), None, "{absent}");
            assert_eq!(t(&[("cookie", absent), ("authorization", "bearer b")]), Some("b".into()), "{absent}");
        }
        assert_eq!(t(&[("cookie", ";;=;access_token")]), None);
        assert_eq!(t(&[("cookie", "access_token=bad"), ("authorization", "Bearer good")]), Some("bad".into()));
        assert_eq!(t(&[("authorization", "BEARER   spaced  ")]), Some("spaced".into()));
        assert_eq!(t(&[("authorization", "Basic abc")]), None);
        assert_eq!(t(&[("authorization", "Bearer ")]), None);
        assert_eq!(t(&[("authorization", "Bear")]), None);
    }

    #[test]
    fn short_secrets_and_bad_pems_are_refused() {
        let error = JwtVerifier::hs256(&SECRET[..31]).unwrap_err();
        assert_eq!(error.to_string(), "an HS256 secret must be at least 32 bytes, got 31");
        assert!(JwtVerifier::rs256_pem(b"not a pem").is_err());
        assert!(JwtVerifier::es256_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
        assert!(JwtVerifier::hs256(SECRET).unwrap().previous_key(b"short").is_err());
    }

    #[test]
    fn claims_become_a_grant() {
        let verifier = JwtVerifier::hs256(SECRET).unwrap();
        let expires = exp();
        let grant = verifier
            .verify(&token(serde_json::json!({
                "sub": "u1", "exp": expires,
                "wse_topics": {"allow": ["news.*", 5, null], "deny": ["news.secret"]}
            })))
            .unwrap();
        assert_eq!(grant.user_id, "u1");
        // The session may last until `exp` plus the leeway.
        let expected = std::time::UNIX_EPOCH + Duration::from_secs(expires) + DEFAULT_LEEWAY;
        assert_eq!(grant.expires_at, Some(expected));
        let acl = grant.acl.unwrap();
        assert_eq!(acl.allow(), ["news.*"]);
        assert_eq!(acl.deny(), ["news.secret"]);

        let no_lists =
            verifier.verify(&token(serde_json::json!({"sub": "u", "exp": exp(), "wse_topics": {}}))).unwrap();
        assert!(no_lists.acl.unwrap().allows("anything"));

        for bad in [serde_json::json!([]), serde_json::json!("x"), serde_json::json!({"allow": "x"})] {
            let failure =
                verifier.verify(&token(serde_json::json!({"sub": "u", "exp": exp(), "wse_topics": bad}))).unwrap_err();
            assert_eq!(failure.message(), "Authentication failed");
        }
        for sub in [serde_json::json!(""), serde_json::json!(5), Value::Null] {
            let failure = verifier.verify(&token(serde_json::json!({"sub": sub, "exp": exp()}))).unwrap_err();
            assert_eq!((failure.code(), failure.message()), (ErrorCode::AuthFailed, "Token missing user ID"));
        }
        let failure = verifier.verify(&token(serde_json::json!({"sub": "u"}))).unwrap_err();
        assert_eq!(failure.message(), "Authentication failed", "exp is required");
    }

    #[test]
    fn oversized_tokens_are_refused_before_parsing() {
        let verifier = JwtVerifier::hs256(SECRET).unwrap();
        let failure = verifier.verify(&"a".repeat(MAX_TOKEN_LEN + 1)).unwrap_err();
        assert!(failure.detail().contains("exceeds"), "{failure}");
    }

    #[test]
    fn debug_never_shows_keys() {
        let verifier = JwtVerifier::hs256(SECRET).unwrap();
        let shown = format!("{:?}", AuthLayer::jwt(verifier));
        assert!(!shown.contains("0123456789"), "{shown}");
    }
}
