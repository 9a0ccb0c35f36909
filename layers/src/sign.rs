//! Message signing (PROTOCOL.md §8): [`SignLayer`] signs outbound application events,
//! [`VerifyLayer`] checks inbound `sig` fields, and [`Signer`] holds the shared secret.
//!
//! A signature is HMAC-SHA256 over the RFC 8785 canonical form of the message without its
//! top-level `sig` ([`wsengine_core::canonical`]), sent as standard base64 (or lowercase hex).
//! Verification accepts both encodings, tries the previous secret during a rotation, compares
//! in constant time, and also requires freshness: `ts` within a clock-skew window and an `id`
//! not seen before from the same identity within the replay window. Publications are signed
//! once each, when first encoded ([`Signer`] is a
//! [`PublicationSigner`](wsengine_services::publication::PublicationSigner)).
//!
//! ```
//! use serde_json::json;
//! use wsengine_layers::sign::{SignatureEncoding, Signer};
//!
//! let signer = Signer::new(b"example-shared-secret-for-wse-signing-v1")?;
//! let message = json!({"c":"U","t":"chat_message","id":"3f98e277-4cbd-47ad-9c90-a9587403e430",
//!     "ts":"2026-11-29T16:22:17.832Z","p":{"room":"lobby","text":"hi"},"v":1});
//! let sig = signer.sign(message.as_object().unwrap())?;
//! assert_eq!(sig, "BrS8UiKzfor6fShF1i3i6G4AtOrQCvc23pCc+4oxjIM=");
//!
//! let mut signed = message.as_object().unwrap().clone();
//! signed.insert("sig".into(), sig.into());
//! assert!(signer.verify_mac(&signed));
//! assert_eq!(Signer::new(b"too short").unwrap_err().to_string(), "signing secret must be at least 32 bytes, got 9");
//! # let _ = SignatureEncoding::Hex;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use futures_util::future::{Either, Ready, ready};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tower::{Layer, Service};
use wsengine_core::canonical::{CanonicalError, canonicalize_object_without};
use wsengine_core::{Envelope, ErrorCode, InboundMessage, ProtocolError};
use wsengine_services::handler::SignatureStatus;
use wsengine_services::message::{BoxError, Inbound, InboundBody, Outbound, OutboundBody, OutboundKind, Reply};
use wsengine_services::publication::PublicationSigner;

/// Shortest accepted secret (§8.3).
pub const MIN_SECRET_LEN: usize = 32;
/// Default freshness windows: replay window for ids and clock skew for `ts` (§8.3).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// Message types that never need a signature, even in require mode (§8.2).
const EXEMPT_TYPES: &[&str] = &["ping", "PING", "pong", "PONG", "client_hello"];

/// How signatures are handled (§8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigningMode {
    /// `sig` is ignored inbound and never added outbound.
    #[default]
    Off,
    /// Inbound signatures are checked and reported; outbound application data is signed.
    Verify,
    /// Inbound messages (heartbeats and `client_hello` excepted) must carry a valid signature.
    Require,
}

/// How the engine writes its signatures; verification accepts both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    /// Standard base64 with padding, 44 characters.
    #[default]
    Base64,
    /// Lowercase hex, 64 characters.
    Hex,
}

/// A secret that is too short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeakSecret {
    /// Its length in bytes.
    pub len: usize,
}

impl fmt::Display for WeakSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signing secret must be at least {MIN_SECRET_LEN} bytes, got {}", self.len)
    }
}

impl std::error::Error for WeakSecret {}

/// The signing keys and policy shared by every connection. `Debug` shows no key material.
#[derive(Clone)]
pub struct Signer {
    current: Hmac<Sha256>,
    previous: Option<Hmac<Sha256>>,
    encoding: SignatureEncoding,
    types: Vec<String>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("secret", &"<redacted>")
            .field("previous_secret", &self.previous.as_ref().map(|_| "<redacted>"))
            .field("encoding", &self.encoding)
            .field("types", &self.types)
            .finish()
    }
}

fn keyed(secret: &[u8]) -> Result<Hmac<Sha256>, WeakSecret> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(WeakSecret { len: secret.len() });
    }
    Ok(Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"))
}

/// Decodes a received `sig`: 64 hex digits are hex, anything else base64 (standard or
/// URL-safe, padded or not).
pub fn decode_signature(sig: &str) -> Option<Vec<u8>> {
    if sig.len() == 64 && sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..64).step_by(2).map(|i| u8::from_str_radix(&sig[i..i + 2], 16).ok()).collect();
    }
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD].iter().find_map(|engine| engine.decode(sig).ok())
}

impl Signer {
    /// A signer with `secret` (at least 32 bytes), base64 output, signing every type.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, WeakSecret> {
        Ok(Signer {
            current: keyed(secret.as_ref())?,
            previous: None,
            encoding: SignatureEncoding::Base64,
            types: vec![],
        })
    }

    /// Also accepts signatures made with the previous secret (rotation).
    pub fn previous_secret(mut self, secret: impl AsRef<[u8]>) -> Result<Self, WeakSecret> {
        self.previous = Some(keyed(secret.as_ref())?);
        Ok(self)
    }

    /// How outbound signatures are written.
    pub fn encoding(mut self, encoding: SignatureEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Signs only outbound messages of these types; empty (the default) signs every
    /// application data frame.
    pub fn types(mut self, types: Vec<String>) -> Self {
        self.types = types;
        self
    }

    /// Whether outbound messages of type `t` get signed.
    pub fn selects(&self, t: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|s| s == t)
    }

    fn mac(&self, key: &Hmac<Sha256>, message: &Map<String, Value>) -> Result<Hmac<Sha256>, CanonicalError> {
        let canonical = canonicalize_object_without(message, "sig")?;
        let mut mac = key.clone();
        mac.update(canonical.as_bytes());
        Ok(mac)
    }

    /// The signature of `message` (its top-level `sig`, if any, left out), with the current
    /// secret, in the configured encoding.
    pub fn sign(&self, message: &Map<String, Value>) -> Result<String, CanonicalError> {
        let tag = self.mac(&self.current, message)?.finalize().into_bytes();
        Ok(match self.encoding {
            SignatureEncoding::Base64 => STANDARD.encode(tag),
            SignatureEncoding::Hex => tag.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// The signature of an envelope as it will be serialized.
    pub fn sign_envelope(&self, envelope: &Envelope) -> Result<String, CanonicalError> {
        let Value::Object(mut message) = serde_json::to_value(envelope).expect("envelopes serialize to JSON") else {
            unreachable!("an envelope serializes to an object")
        };
        message.remove("sig");
        self.sign(&message)
    }

    /// Whether `message`'s `sig` is an HMAC of the rest with the current or previous secret,
    /// compared in constant time. Freshness is not checked here (see [`VerifyLayer`]).
    pub fn verify_mac(&self, message: &Map<String, Value>) -> bool {
        let Some(sig) = message.get("sig").and_then(Value::as_str).and_then(decode_signature) else { return false };
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|key| self.mac(key, message).is_ok_and(|mac| mac.verify_slice(&sig).is_ok()))
    }
}

impl PublicationSigner for Signer {
    fn sign(&self, message: &Map<String, Value>) -> Option<String> {
        let t = message.get("t").and_then(Value::as_str).unwrap_or_default();
        if !self.selects(t) {
            return None;
        }
        Signer::sign(self, message).map_err(|error| tracing::warn!(%error, "publication left unsigned")).ok()
    }
}

/// Remembers the ids of valid signed messages per identity, so a captured message cannot be
/// replayed within the window. Shared by every connection of an engine; bounded in size (the
/// oldest entries go first when full).
#[derive(Debug)]
pub struct ReplayGuard {
    window: Duration,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashMap<(String, String), Instant>,
    order: VecDeque<(Instant, (String, String))>,
}

impl ReplayGuard {
    /// A guard remembering ids for `window`, at most `capacity` of them.
    pub fn new(window: Duration, capacity: usize) -> Self {
        ReplayGuard { window, capacity: capacity.max(1), seen: Mutex::default() }
    }

    /// Records `id` for `identity`; `false` if it was already seen within the window.
    pub fn first_use(&self, identity: &str, id: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Seen { ids, order } = &mut *seen;
        while let Some((at, _)) = order.front() {
            if now.duration_since(*at) < self.window && order.len() < self.capacity {
                break;
            }
            let (at, key) = order.pop_front().expect("front exists");
            if ids.get(&key) == Some(&at) {
                ids.remove(&key);
            }
        }
        let key = (identity.to_owned(), id.to_owned());
        if ids.contains_key(&key) {
            return false;
        }
        ids.insert(key.clone(), now);
        order.push_back((now, key));
        true
    }
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::new(DEFAULT_WINDOW, 1_000_000)
    }
}

/// Applies [`Sign`] to a connection's outbound stack.
#[derive(Debug, Clone)]
pub struct SignLayer {
    signer: Arc<Signer>,
}

impl SignLayer {
    /// Signs outbound application events with `signer`.
    pub fn new(signer: Arc<Signer>) -> Self {
        SignLayer { signer }
    }
}

impl<S> Layer<S> for SignLayer {
    type Service = Sign<S>;

    fn layer(&self, inner: S) -> Sign<S> {
        Sign { inner, signer: Arc::clone(&self.signer), seq: 0 }
    }
}

/// Adds `sig` to per-connection application events before the inner (encode) service.
///
/// The signature covers `seq`, so this layer numbers the envelopes passing through it (the
/// same per-connection counter the encode layer would otherwise apply: `server_ready` is 1,
/// heartbeats carry none). Publications pass unchanged: they are signed once each.
#[derive(Debug)]
pub struct Sign<S> {
    inner: S,
    signer: Arc<Signer>,
    seq: u64,
}

impl<S> Service<Outbound> for Sign<S>
where
    S: Service<Outbound, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut outbound: Outbound) -> Self::Future {
        if let OutboundBody::Envelope(envelope) = &mut outbound.body {
            if envelope.seq.is_none() && !matches!(envelope.t.as_str(), "ping" | "PONG") {
                self.seq += 1;
                envelope.seq = Some(self.seq);
            }
            if outbound.kind == OutboundKind::Event && self.signer.selects(&envelope.t) {
                match self.signer.sign_envelope(envelope) {
                    Ok(sig) => envelope.sig = Some(sig),
                    Err(error) => tracing::warn!(%error, t = %envelope.t, "event left unsigned"),
                }
            }
        }
        self.inner.call(outbound)
    }
}

/// Applies [`Verify`] to a connection's inbound stack.
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    signer: Arc<Signer>,
    mode: SigningMode,
    reject_invalid: bool,
    require_types: Vec<String>,
    max_clock_skew: Duration,
    replay: Arc<ReplayGuard>,
    identity: String,
}

impl VerifyLayer {
    /// Verification with `signer` in `mode` for the connection of `identity` (its user id),
    /// with the default 300 s windows and a private replay guard.
    pub fn new(signer: Arc<Signer>, mode: SigningMode, identity: impl Into<String>) -> Self {
        VerifyLayer {
            signer,
            mode,
            reject_invalid: false,
            require_types: Vec::new(),
            max_clock_skew: DEFAULT_WINDOW,
            replay: Arc::new(ReplayGuard::default()),
            identity: identity.into(),
        }
    }

    /// In verify mode, drops invalid messages with `INVALID_SIGNATURE` instead of reporting them.
    pub fn reject_invalid(mut self, reject: bool) -> Self {
        self.reject_invalid = reject;
        self
    }

    /// In require mode, requires valid signatures only on these types (empty: on every type
    /// but heartbeats and `client_hello`).
    pub fn require_types(mut self, types: Vec<String>) -> Self {
        self.require_types = types;
        self
    }

    /// How far `ts` may be from the engine's clock.
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// The replay guard, normally one per engine so that it spans a user's connections.
    pub fn replay_guard(mut self, guard: Arc<ReplayGuard>) -> Self {
        self.replay = guard;
        self
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = Verify<S>;

    fn layer(&self, inner: S) -> Verify<S> {
        Verify { inner, layer: Arc::new(self.clone()) }
    }
}

/// Checks the signature of decoded messages before the inner service.
#[derive(Debug)]
pub struct Verify<S> {
    inner: S,
    layer: Arc<VerifyLayer>,
}

impl VerifyLayer {
    fn fresh(&self, message: &InboundMessage) -> bool {
        let Some(ts) = message.ts().and_then(wsengine_core::time::parse_rfc3339_millis) else { return false };
        let now = i64::try_from(wsengine_core::time::unix_millis()).unwrap_or(i64::MAX);
        let skew = i64::try_from(self.max_clock_skew.as_millis()).unwrap_or(i64::MAX);
        if now.abs_diff(ts) > skew.unsigned_abs() {
            return false;
        }
        message.id().is_some_and(|id| self.replay.first_use(&self.identity, id))
    }

    /// The status of one message.
    pub fn status(&self, message: &InboundMessage) -> SignatureStatus {
        if message.get("sig").is_none() {
            return SignatureStatus::Absent;
        }
        if self.signer.verify_mac(message.fields()) && self.fresh(message) {
            SignatureStatus::Valid
        } else {
            SignatureStatus::Invalid
        }
    }

    fn must_be_valid(&self, t: Option<&str>) -> bool {
        match self.mode {
            SigningMode::Require => {
                self.require_types.is_empty() || t.is_some_and(|t| self.require_types.iter().any(|r| r == t))
            }
            _ => false,
        }
    }
}

fn rejection(id: Option<&str>) -> BoxError {
    ProtocolError::new(ErrorCode::InvalidSignature, "Invalid or missing signature")
        .with_details(json!({ "id": id }))
        .into()
}

impl<S> Service<Inbound> for Verify<S>
where
    S: Service<Inbound, Response = Reply, Error = BoxError>,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = Either<Ready<Result<Reply, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut inbound: Inbound) -> Self::Future {
        let layer = &self.layer;
        if layer.mode == SigningMode::Off {
            return Either::Right(self.inner.call(inbound));
        }
        match &inbound.body {
            InboundBody::Message(message) => {
                let t = message.t();
                if t.is_some_and(|t| EXEMPT_TYPES.contains(&t)) {
                    return Either::Right(self.inner.call(inbound));
                }
                let status = layer.status(message);
                let refuse = match status {
                    SignatureStatus::Valid => false,
                    SignatureStatus::Invalid if layer.reject_invalid => true,
                    _ => layer.must_be_valid(t),
                };
                if refuse {
                    return Either::Left(ready(Err(rejection(message.id()))));
                }
                inbound.signature = status;
            }
            // Raw frames cannot carry a signature.
            InboundBody::RawText(_) | InboundBody::RawBinary(_) if layer.must_be_valid(None) => {
                return Either::Left(ready(Err(rejection(None))));
            }
            _ => {}
        }
        Either::Right(self.inner.call(inbound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use tower::{ServiceExt, service_fn};

    const SECRET: &[u8] = b"example-shared-secret-for-wse-signing-v1";

    fn object(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn protocol_test_vectors() {
        // PROTOCOL.md §8.6, both vectors, both encodings.
        let signer = Signer::new(SECRET).unwrap();
        let hex = signer.clone().encoding(SignatureEncoding::Hex);
        let chat = object(
            r#"{"c":"U","t":"chat_message","id":"3f98e277-4cbd-47ad-9c90-a9587403e430","ts":"2026-11-29T16:22:17.832Z","p":{"room":"lobby","text":"hi"},"v":1}"#,
        );
        assert_eq!(Signer::sign(&signer, &chat).unwrap(), "BrS8UiKzfor6fShF1i3i6G4AtOrQCvc23pCc+4oxjIM=");
        assert_eq!(
            Signer::sign(&hex, &chat).unwrap(),
            "06b4bc5222b37e8afa7d2845d62de2e86e00b4ead00af736de909cfb8a318c83"
        );
        let publication = object(
            r#"{"tp":"prices","e":"3c9a61f0","o":42,"c":"U","t":"price_update","id":"01a2281d-51b8-7938-8b8e-db224a6b248a","ts":"2026-11-29T16:22:19.832Z","p":{"symbol":"AAPL","price":187.5},"v":1,"sig":"hhlDrffJKgMk1OJyATypKONSwLaQgRQJrmeVi+j6cxs="}"#,
        );
        assert_eq!(Signer::sign(&signer, &publication).unwrap(), "hhlDrffJKgMk1OJyATypKONSwLaQgRQJrmeVi+j6cxs=");
        assert_eq!(
            Signer::sign(&hex, &publication).unwrap(),
            "861943adf7c92a0324d4e272013ca928e352c0b690811409ae67958be8fa731b"
        );
        assert!(signer.verify_mac(&publication));
        let mut upper_hex = chat.clone();
        upper_hex.insert("sig".into(), "06B4BC5222B37E8AFA7D2845D62DE2E86E00B4EAD00AF736DE909CFB8A318C83".into());
        assert!(signer.verify_mac(&upper_hex));
    }

    #[test]
    fn rotation_tampering_and_unsafe_numbers() {
        let old = Signer::new([1u8; 32]).unwrap();
        let new = Signer::new([2u8; 32]).unwrap().previous_secret([1u8; 32]).unwrap();
        let mut message = object(r#"{"t":"x","p":{"n":1}}"#);
        message.insert("sig".into(), Signer::sign(&old, &message).unwrap().into());
        assert!(new.verify_mac(&message));
        assert!(!Signer::new([3u8; 32]).unwrap().verify_mac(&message));
        message.insert("p".into(), json!({"n": 2}));
        assert!(!new.verify_mac(&message));
        let huge = object(r#"{"t":"x","p":{"n":9007199254740993},"sig":"AAAA"}"#);
        assert!(!new.verify_mac(&huge));
        assert!(!format!("{new:?}").contains("[2"));
    }

    #[test]
    fn replay_guard_remembers_ids_per_identity() {
        let guard = ReplayGuard::new(Duration::from_secs(300), 2);
        assert!(guard.first_use("alice", "1"));
        assert!(!guard.first_use("alice", "1"));
        assert!(guard.first_use("bob", "1"));
        // Full: the oldest entry goes.
        assert!(guard.first_use("alice", "2"));
        assert!(guard.first_use("alice", "1"));
    }

    fn signed(signer: &Signer, id: &str, ts: &str) -> InboundMessage {
        let mut message = object(&format!(r#"{{"t":"chat","id":"{id}","ts":"{ts}","p":{{}}}}"#));
        message.insert("sig".into(), Signer::sign(signer, &message).unwrap().into());
        InboundMessage::from_map(message)
    }

    type Seen = Arc<StdMutex<Vec<SignatureStatus>>>;

    fn verifying(layer: VerifyLayer) -> (impl Service<Inbound, Response = Reply, Error = BoxError>, Seen) {
        let seen: Seen = Arc::default();
        let sink = Arc::clone(&seen);
        let inner = service_fn(move |inbound: Inbound| {
            sink.lock().unwrap().push(inbound.signature);
            async { Ok::<_, BoxError>(Reply::none()) }
        });
        (layer.layer(inner), seen)
    }

    fn code_of(error: BoxError) -> ErrorCode {
        error.downcast::<ProtocolError>().unwrap().code()
    }

    #[tokio::test]
    async fn verify_mode_reports_and_require_mode_rejects() {
        let signer = Arc::new(Signer::new(SECRET).unwrap());
        let now = wsengine_core::time::now_rfc3339();
        let (mut verify, seen) = verifying(VerifyLayer::new(Arc::clone(&signer), SigningMode::Verify, "u"));
        let unsigned = InboundMessage::from_map(object(r#"{"t":"chat","p":{}}"#));
        let stale = signed(&signer, "a", "2020-01-01T00:00:00Z");
        for message in [signed(&signer, "b", &now), unsigned.clone(), stale.clone(), signed(&signer, "b", &now)] {
            verify.ready().await.unwrap().call(Inbound::message(message)).await.unwrap();
        }
        use SignatureStatus::*;
        assert_eq!(*seen.lock().unwrap(), [Valid, Absent, Invalid, Invalid], "the replayed id is invalid");

        let (mut require, seen) = verifying(VerifyLayer::new(Arc::clone(&signer), SigningMode::Require, "u"));
        let ping = InboundMessage::from_map(object(r#"{"t":"ping","p":{}}"#));
        require.ready().await.unwrap().call(Inbound::message(ping)).await.unwrap();
        for message in [unsigned, stale] {
            let error = require.ready().await.unwrap().call(Inbound::message(message)).await.unwrap_err();
            assert_eq!(code_of(error), ErrorCode::InvalidSignature);
        }
        assert_eq!(seen.lock().unwrap().len(), 1, "only the ping got through");
    }

    #[tokio::test]
    async fn sign_layer_numbers_and_signs_events_only() {
        let signer = Arc::new(Signer::new(SECRET).unwrap().types(vec!["chat".into()]));
        let seen: Arc<StdMutex<Vec<Envelope>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let inner = service_fn(move |outbound: Outbound| {
            let OutboundBody::Envelope(envelope) = outbound.body else { panic!("envelope") };
            sink.lock().unwrap().push(*envelope);
            async { Ok::<_, BoxError>(()) }
        });
        let mut service = SignLayer::new(Arc::clone(&signer)).layer(inner);
        let messages = [
            Outbound::protocol(Envelope::new("server_ready", Value::Null)),
            Outbound::event(Envelope::new("chat", json!({"a": 1})).identified()),
            Outbound::event(Envelope::new("other", Value::Null)),
        ];
        for message in messages {
            service.ready().await.unwrap().call(message).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
        assert!(seen[0].sig.is_none() && seen[2].sig.is_none());
        let Value::Object(wire) = serde_json::to_value(&seen[1]).unwrap() else { unreachable!() };
        assert!(signer.verify_mac(&wire), "the signature covers the wire form, seq included");
    }
}
