//! End-to-end encryption (PROTOCOL.md §7): the ECDH P-256 key exchange, [`DecryptLayer`] for
//! the inbound stack and [`EncryptLayer`] for the outbound stack.
//!
//! A client offers its public key in `client_hello`; the engine answers in `server_hello`
//! with its own, both sides derive one AES-256-GCM key per connection (HKDF-SHA256, no salt,
//! info `wse-encryption/aes-gcm-key`), and from then on every application data frame to that
//! client travels as `E:` ‖ IV(12) ‖ ciphertext ‖ tag(16). Protocol frames stay plaintext.
//!
//! The decrypt layer sits outside the decode layer: it opens `E:` frames and hands the
//! plaintext on, and it completes the key exchange on the way back, when the reply to a
//! `client_hello` passes through it. The key lives in the connection's shared
//! [`E2eSession`], which the encrypt layer reads. Key material is never logged: no type here
//! prints it.
//!
//! ```
//! use wsengine_layers::encrypt::{EphemeralKeyPair, SessionKey, parse_public_key};
//!
//! // Both ends of an exchange derive the same key.
//! let client = EphemeralKeyPair::generate()?;
//! let engine = EphemeralKeyPair::generate()?;
//! let client_public = client.public_key_base64();
//! let engine_public = engine.public_key_base64();
//! assert_eq!(engine_public.len(), 88);
//! let engine_key = engine.agree(&parse_public_key(&client_public)?);
//! let client_key = client.agree(&parse_public_key(&engine_public)?);
//!
//! let frame = engine_key.seal(br#"{"t":"hello"}"#)?;
//! assert!(frame.starts_with(b"E:"));
//! assert_eq!(client_key.open(&frame)?, br#"{"t":"hello"}"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use p256::elliptic_curve::Generate;
use p256::{PublicKey, SecretKey};
use pin_project_lite::pin_project;
use serde_json::Value;
use sha2::Sha256;
use tower::{Layer, Service};
use wsengine_core::codes::CloseCode;
use wsengine_core::frame::{decode_frame, decode_plaintext};
use wsengine_core::limits::MAX_OUTBOUND_MESSAGE_SIZE;
use wsengine_core::{Decoded, ErrorCode, Frame, InboundMessage, Limits, ProtocolError};
use wsengine_services::connection::{Connection, Delivery};
use wsengine_services::message::{BoxError, Inbound, InboundBody, Outbound, OutboundBody, OutboundKind, Reply};

use crate::encode::TooLarge;

/// HKDF `info` of the AES key derivation (§7.1).
pub const KEY_INFO: &[u8] = b"wse-encryption/aes-gcm-key";
/// Prefix of an encrypted frame.
pub const PREFIX: &[u8] = b"E:";
/// IV length.
pub const IV_LEN: usize = 12;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Shortest possible `E:` frame: prefix, IV and tag around an empty plaintext (§3.5).
pub const MIN_FRAME_LEN: usize = PREFIX.len() + IV_LEN + TAG_LEN;
/// The engine closes a connection with 1011 before encrypting this many frames under one key
/// (§7.5).
pub const KEY_USAGE_LIMIT: u64 = 1 << 31;

/// Whether the engine offers, requires or refuses end-to-end encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncryptionMode {
    /// Never: `client_hello` keys are ignored and `server_hello` says `encryption: false`.
    Off,
    /// Offered: a client that sends a key gets an E2E connection, others stay plaintext.
    #[default]
    Optional,
    /// Required: a `client_hello` without a usable key, or a plaintext application message,
    /// gets an error and close 1008; application data is never sent in plaintext.
    Required,
}

/// Why a key exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExchangeError {
    /// `encryption_public_key` is not base64.
    NotBase64,
    /// The bytes are not a valid, non-identity P-256 point.
    InvalidPoint,
    /// The system random number generator failed.
    Random,
}

impl fmt::Display for KeyExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyExchangeError::NotBase64 => f.write_str("public key is not base64"),
            KeyExchangeError::InvalidPoint => f.write_str("invalid public key"),
            KeyExchangeError::Random => f.write_str("random number generator failed"),
        }
    }
}

impl std::error::Error for KeyExchangeError {}

/// Why an `E:` frame could not be opened or sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptoError {
    /// The frame does not start with `E:`.
    NotEncrypted,
    /// The frame is shorter than 30 bytes.
    TooShort,
    /// GCM tag verification failed: tampered, truncated or under another key.
    Tag,
    /// The system random number generator failed (sealing).
    Random,
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoError::NotEncrypted => f.write_str("not an E: frame"),
            CryptoError::TooShort => write!(f, "E: frame shorter than {MIN_FRAME_LEN} bytes"),
            CryptoError::Tag => f.write_str("authentication tag does not verify"),
            CryptoError::Random => f.write_str("random number generator failed"),
        }
    }
}

impl std::error::Error for CryptoError {}

/// Decodes a public key as clients send it: standard base64 with or without padding of a
/// 65-byte uncompressed (or 33-byte compressed) SEC1 point. Off-curve points and the identity
/// are refused.
pub fn parse_public_key(text: &str) -> Result<PublicKey, KeyExchangeError> {
    let text = text.trim();
    let bytes = STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text.trim_end_matches('=')))
        .map_err(|_| KeyExchangeError::NotBase64)?;
    match (bytes.len(), bytes.first()) {
        (65, Some(0x04)) | (33, Some(0x02 | 0x03)) => {}
        _ => return Err(KeyExchangeError::InvalidPoint),
    }
    PublicKey::from_sec1_bytes(&bytes).map_err(|_| KeyExchangeError::InvalidPoint)
}

/// The 88-character base64 of a public key's uncompressed point (§7.1).
pub fn public_key_base64(key: &PublicKey) -> String {
    use p256::elliptic_curve::sec1::ToSec1Point;
    STANDARD.encode(key.to_sec1_point(false).as_bytes())
}

/// One side's ephemeral P-256 key pair. [`agree`](Self::agree) consumes it, so the private
/// key is gone (and zeroized) once the session key exists.
pub struct EphemeralKeyPair {
    secret: SecretKey,
}

impl fmt::Debug for EphemeralKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKeyPair").field("public", &self.public_key_base64()).finish_non_exhaustive()
    }
}

impl EphemeralKeyPair {
    /// A fresh key pair from the system CSPRNG.
    pub fn generate() -> Result<Self, KeyExchangeError> {
        let secret = SecretKey::try_generate().map_err(|_| KeyExchangeError::Random)?;
        Ok(EphemeralKeyPair { secret })
    }

    /// A key pair from a fixed private scalar (big-endian). For test vectors only: real keys
    /// must be random.
    pub fn from_private_bytes(scalar: &[u8]) -> Result<Self, KeyExchangeError> {
        let secret = SecretKey::from_slice(scalar).map_err(|_| KeyExchangeError::InvalidPoint)?;
        Ok(EphemeralKeyPair { secret })
    }

    /// The public key as `encryption_public_key` carries it.
    pub fn public_key_base64(&self) -> String {
        public_key_base64(&self.secret.public_key())
    }

    /// The ECDH shared secret with `peer`: the 32-byte X coordinate (§7.1).
    pub fn shared_secret(&self, peer: &PublicKey) -> [u8; 32] {
        let shared = self.secret.diffie_hellman(peer);
        let mut x = [0u8; 32];
        x.copy_from_slice(shared.raw_secret_bytes());
        x
    }

    /// Completes the exchange with the peer's public key.
    pub fn agree(self, peer: &PublicKey) -> SessionKey {
        let mut x = self.shared_secret(peer);
        let key = SessionKey::derive(&x);
        x.fill(0);
        key
    }
}

/// The AES-256-GCM key of one connection. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct SessionKey {
    cipher: Aes256Gcm,
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    /// The key HKDF-SHA256 derives from an ECDH shared secret (no salt, info [`KEY_INFO`]).
    pub fn derive(shared_secret: &[u8]) -> Self {
        let mut key = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, shared_secret)
            .expand(KEY_INFO, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let session = Self::from_bytes(&key);
        key.fill(0);
        session
    }

    /// A session key from raw AES-256 key bytes.
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        SessionKey { cipher: Aes256Gcm::new(key.into()) }
    }

    /// Encrypts `plaintext` into a whole `E:` frame with a fresh random IV.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut iv = [0u8; IV_LEN];
        getrandom::fill(&mut iv).map_err(|_| CryptoError::Random)?;
        Ok(self.seal_with_iv(&iv, plaintext))
    }

    /// Encrypts with a given IV. Reusing an IV under one key breaks GCM: only test vectors
    /// and benchmarks call this directly.
    pub fn seal_with_iv(&self, iv: &[u8; IV_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(MIN_FRAME_LEN + plaintext.len());
        frame.extend_from_slice(PREFIX);
        frame.extend_from_slice(iv);
        frame.extend_from_slice(plaintext);
        let nonce = aes_gcm::Nonce::from(*iv);
        let body = &mut frame[PREFIX.len() + IV_LEN..];
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce, &[], body.into())
            .expect("AES-GCM encrypts any message under 64 GiB");
        frame.extend_from_slice(&tag);
        frame
    }

    /// Decrypts a whole `E:` frame.
    pub fn open(&self, frame: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let rest = frame.strip_prefix(PREFIX).ok_or(CryptoError::NotEncrypted)?;
        if frame.len() < MIN_FRAME_LEN {
            return Err(CryptoError::TooShort);
        }
        let (iv, rest) = rest.split_at(IV_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = aes_gcm::Nonce::try_from(iv).map_err(|_| CryptoError::TooShort)?;
        let tag = aes_gcm::Tag::try_from(tag).map_err(|_| CryptoError::TooShort)?;
        let mut plaintext = ciphertext.to_vec();
        self.cipher
            .decrypt_inout_detached(&nonce, &[], plaintext.as_mut_slice().into(), &tag)
            .map_err(|_| CryptoError::Tag)?;
        Ok(plaintext)
    }
}

/// The end-to-end state of one connection, shared by its decrypt and encrypt layers through
/// [`Connection::shared`].
#[derive(Debug, Default)]
pub struct E2eSession {
    // Boxed: the expanded AES key schedule is most of this struct, and most connections
    // never exchange a key (the idle-connection memory budget is 8 KiB).
    key: OnceLock<Box<SessionKey>>,
    dropped: AtomicU64,
    last_error: Mutex<Option<Instant>>,
}

impl E2eSession {
    /// The session key, once the exchange has completed.
    pub fn key(&self) -> Option<&SessionKey> {
        self.key.get().map(|key| &**key)
    }

    /// Whether the exchange has completed.
    pub fn is_keyed(&self) -> bool {
        self.key.get().is_some()
    }

    /// Installs the key; `false` if the connection already had one (it never re-keys).
    pub fn install(&self, key: SessionKey) -> bool {
        self.key.set(Box::new(key)).is_ok()
    }

    /// Inbound `E:` frames dropped so far (no key, too short, tag failure).
    pub fn dropped_frames(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts a dropped frame; `true` when an error frame may be sent (at most one a second).
    fn count_drop(&self) -> bool {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Applies [`Decrypt`] to a connection's inbound stack.
#[derive(Debug, Clone)]
pub struct DecryptLayer {
    connection: Arc<Connection>,
    mode: EncryptionMode,
    limits: Limits,
}

impl DecryptLayer {
    /// Decryption and key exchange for `connection`, in [`EncryptionMode::Optional`].
    pub fn new(connection: &Arc<Connection>) -> Self {
        DecryptLayer { connection: Arc::clone(connection), mode: EncryptionMode::Optional, limits: Limits::default() }
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: EncryptionMode) -> Self {
        self.mode = mode;
        self
    }

    /// The decode limits, used when this layer has to look inside a frame (to read a
    /// `client_hello`, or to police plaintext in required mode).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

impl<S> Layer<S> for DecryptLayer {
    type Service = Decrypt<S>;

    fn layer(&self, inner: S) -> Decrypt<S> {
        Decrypt { inner, shared: Arc::new(self.clone()), session: self.connection.shared::<E2eSession>() }
    }
}

/// Opens `E:` frames before the inner service and completes key exchanges on the way back.
#[derive(Debug)]
pub struct Decrypt<S> {
    inner: S,
    shared: Arc<DecryptLayer>,
    session: Arc<E2eSession>,
}

/// Message types a required-mode connection may send in plaintext before the exchange.
const PLAINTEXT_BEFORE_KEY: &[&str] =
    &["ping", "PING", "pong", "PONG", "client_hello", "subscription_update", "subscription", "sync_request"];
/// Message types a required-mode connection may send in plaintext after the exchange.
const PLAINTEXT_AFTER_KEY: &[&str] = &["ping", "PING", "pong", "PONG", "client_hello"];

impl<S> Decrypt<S> {
    /// A dropped `E:` frame: counted, answered with a rate-limited error, never passed on.
    fn drop_frame(&self, why: &str) -> Reply {
        tracing::debug!(connection = %self.shared.connection.id(), why, "encrypted frame dropped");
        if self.session.count_drop() {
            let error = ProtocolError::new(ErrorCode::InvalidRequest, format!("Encrypted frame dropped: {why}"));
            Reply::message(Outbound::protocol(error.to_envelope()))
        } else {
            Reply::none()
        }
    }

    /// In required mode, whether a plaintext frame is one the client may send unencrypted.
    fn plaintext_allowed(&self, frame: &Frame) -> bool {
        let allowed = if self.session.is_keyed() { PLAINTEXT_AFTER_KEY } else { PLAINTEXT_BEFORE_KEY };
        match decode_frame(frame, self.shared.connection.format(), &self.shared.limits) {
            Ok(Decoded::Message(message)) => message.t().is_some_and(|t| allowed.contains(&t)),
            // The decode layer answers what it cannot decode; `E:` is handled elsewhere.
            Err(_) | Ok(Decoded::Encrypted(_)) => true,
            Ok(Decoded::RawText(_) | Decoded::RawBinary(_)) => false,
        }
    }
}

fn required_violation(message: &'static str) -> Reply {
    let error = ProtocolError::new(ErrorCode::InvalidRequest, message);
    Reply { messages: vec![Outbound::protocol(error.to_envelope())], close: Some((CloseCode::POLICY, message.into())) }
}

impl<S> Service<Inbound> for Decrypt<S>
where
    S: Service<Inbound, Response = Reply, Error = BoxError>,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = DecryptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut inbound: Inbound) -> Self::Future {
        let request = match &inbound.body {
            InboundBody::Frame(Frame::Binary(bytes)) if bytes.starts_with(PREFIX) => {
                let Some(key) = self.session.key() else {
                    return DecryptFuture::immediate(self.drop_frame("no key has been agreed"));
                };
                if bytes.len() < MIN_FRAME_LEN {
                    return DecryptFuture::immediate(self.drop_frame("frame too short"));
                }
                match key.open(bytes) {
                    Ok(plaintext) => {
                        let plaintext = Bytes::from(plaintext);
                        inbound.body = InboundBody::RawBinary(plaintext.clone());
                        inbound.encrypted = true;
                        Request::Plaintext(plaintext)
                    }
                    Err(_) => return DecryptFuture::immediate(self.drop_frame("authentication failed")),
                }
            }
            InboundBody::Frame(frame) => {
                if self.shared.mode == EncryptionMode::Required && !self.plaintext_allowed(frame) {
                    return DecryptFuture::immediate(required_violation(
                        "End-to-end encryption is required: application messages must be encrypted",
                    ));
                }
                Request::Frame(frame.clone())
            }
            _ => Request::Other,
        };
        let exchange = (self.shared.mode != EncryptionMode::Off).then(|| Exchange {
            layer: Arc::clone(&self.shared),
            session: Arc::clone(&self.session),
            request,
        });
        DecryptFuture { inner: Some(self.inner.call(inbound)), immediate: None, exchange }
    }
}

/// What arrived, kept so the key exchange can read a `client_hello` after dispatch answered it.
#[derive(Debug)]
enum Request {
    Frame(Frame),
    Plaintext(Bytes),
    Other,
}

/// Completes a key exchange when the reply carries a `server_hello`.
#[derive(Debug)]
struct Exchange {
    layer: Arc<DecryptLayer>,
    session: Arc<E2eSession>,
    request: Request,
}

/// What a `client_hello` offered.
enum Offer {
    Key(String),
    Nothing,
}

fn is_server_hello(outbound: &Outbound) -> bool {
    outbound.kind == OutboundKind::Protocol
        && matches!(&outbound.body, OutboundBody::Envelope(e) if e.t == "server_hello")
}

fn hello_payload(outbound: &mut Outbound) -> Option<&mut serde_json::Map<String, Value>> {
    match &mut outbound.body {
        OutboundBody::Envelope(envelope) => envelope.p.as_object_mut(),
        _ => None,
    }
}

fn set_encryption_feature(outbound: &mut Outbound, on: bool) {
    if let Some(features) = hello_payload(outbound).and_then(|p| p.get_mut("features")).and_then(Value::as_object_mut) {
        features.insert("encryption".to_owned(), Value::Bool(on));
    }
}

fn offer_of(message: &InboundMessage) -> Option<Offer> {
    if message.t() != Some("client_hello") {
        return None;
    }
    let p = message.p();
    let wants = p.and_then(|p| p.get("features")).and_then(|f| f.get("encryption")) == Some(&Value::Bool(true));
    Some(match p.and_then(|p| p.get("encryption_public_key")) {
        Some(Value::String(key)) if wants => Offer::Key(key.clone()),
        _ => Offer::Nothing,
    })
}

impl Exchange {
    /// The first `client_hello` in the request (alone or inside a `batch`).
    fn offer(&self) -> Offer {
        let limits = &self.layer.limits;
        let decoded = match &self.request {
            Request::Frame(frame) => decode_frame(frame, self.layer.connection.format(), limits),
            Request::Plaintext(plaintext) => decode_plaintext(plaintext, limits),
            Request::Other => return Offer::Nothing,
        };
        let Ok(Decoded::Message(message)) = decoded else { return Offer::Nothing };
        if let Some(offer) = offer_of(&message) {
            return offer;
        }
        if message.t() == Some("batch") {
            let elements = message.p().and_then(|p| p.get("messages")).and_then(Value::as_array);
            for element in elements.into_iter().flatten() {
                if let Value::Object(fields) = element {
                    if let Some(offer) = offer_of(&InboundMessage::from_map(fields.clone())) {
                        return offer;
                    }
                }
            }
        }
        Offer::Nothing
    }

    fn finish(self, mut reply: Reply) -> Reply {
        let Some(first) = reply.messages.iter().position(is_server_hello) else { return reply };
        let connection = &self.layer.connection;
        if self.session.is_keyed() {
            // A repeated hello never re-keys; it reports the current state (§7.2, D15).
            for outbound in reply.messages.iter_mut().filter(|m| is_server_hello(m)) {
                set_encryption_feature(outbound, true);
            }
            connection.set_compression(false);
            return reply;
        }
        let required = self.layer.mode == EncryptionMode::Required;
        let offered = match self.offer() {
            Offer::Key(key) => key,
            Offer::Nothing if required => {
                let violation = required_violation(
                    "End-to-end encryption is required: offer encryption_public_key in client_hello",
                );
                reply.messages.insert(first, violation.messages.into_iter().next().expect("one error"));
                reply.close = violation.close;
                return reply;
            }
            Offer::Nothing => return reply,
        };
        let agreed = parse_public_key(&offered)
            .and_then(|peer| Ok((EphemeralKeyPair::generate()?, peer)))
            .map(|(ours, peer)| (ours.public_key_base64(), ours.agree(&peer)));
        match agreed {
            Ok((public, key)) => {
                // Installing the key and putting server_hello first in this reply is atomic
                // for the outbound queue: the driver sends the reply before any delivery, so
                // server_hello precedes every E: frame (§7.2).
                self.session.install(key);
                connection.set_compression(false);
                let mut hello = reply.messages.remove(first);
                set_encryption_feature(&mut hello, true);
                if let Some(p) = hello_payload(&mut hello) {
                    p.insert("encryption_public_key".to_owned(), Value::String(public));
                }
                for outbound in reply.messages.iter_mut().filter(|m| is_server_hello(m)) {
                    set_encryption_feature(outbound, true);
                }
                reply.messages.insert(0, hello);
            }
            Err(error) => {
                tracing::debug!(connection = %connection.id(), %error, "key exchange failed");
                let failure =
                    ProtocolError::new(ErrorCode::KeyExchangeFailed, format!("ECDH key exchange failed: {error}"));
                reply.messages.insert(first, Outbound::protocol(failure.to_envelope()));
                if required {
                    reply.close = Some((CloseCode::POLICY, "End-to-end encryption is required".into()));
                }
            }
        }
        reply
    }
}

pin_project! {
    /// Response future of [`Decrypt`].
    #[derive(Debug)]
    pub struct DecryptFuture<F> {
        #[pin]
        inner: Option<F>,
        immediate: Option<Reply>,
        exchange: Option<Exchange>,
    }
}

impl<F> DecryptFuture<F> {
    fn immediate(reply: Reply) -> Self {
        DecryptFuture { inner: None, immediate: Some(reply), exchange: None }
    }
}

impl<F> Future for DecryptFuture<F>
where
    F: Future<Output = Result<Reply, BoxError>>,
{
    type Output = Result<Reply, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(reply) = this.immediate.take() {
            return Poll::Ready(Ok(reply));
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err("decrypt future polled after completion".into()));
        };
        let reply = std::task::ready!(inner.poll(cx))?;
        Poll::Ready(Ok(match this.exchange.take() {
            Some(exchange) => exchange.finish(reply),
            None => reply,
        }))
    }
}

/// Applies [`Encrypt`] to a connection's outbound stack.
#[derive(Debug, Clone)]
pub struct EncryptLayer {
    connection: Arc<Connection>,
    required: bool,
    key_usage_limit: u64,
}

impl EncryptLayer {
    /// Encryption of `connection`'s application data frames once its key exists.
    pub fn new(connection: &Arc<Connection>) -> Self {
        EncryptLayer { connection: Arc::clone(connection), required: false, key_usage_limit: KEY_USAGE_LIMIT }
    }

    /// In required mode application data is never sent in plaintext: without a key it is
    /// dropped.
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// Closes the connection with 1011 instead of encrypting this many frames under one key
    /// (default [`KEY_USAGE_LIMIT`], 2³¹).
    pub fn key_usage_limit(mut self, frames: u64) -> Self {
        self.key_usage_limit = frames;
        self
    }
}

impl<S> Layer<S> for EncryptLayer {
    type Service = Encrypt<S>;

    fn layer(&self, inner: S) -> Encrypt<S> {
        Encrypt { inner, layer: self.clone(), session: self.connection.shared::<E2eSession>(), sealed: 0 }
    }
}

/// Encrypts encoded application data frames of an E2E connection before the inner service.
#[derive(Debug)]
pub struct Encrypt<S> {
    inner: S,
    layer: EncryptLayer,
    session: Arc<E2eSession>,
    sealed: u64,
}

impl<S> Encrypt<S> {
    fn plaintext_of(frame: &Frame) -> Result<std::borrow::Cow<'_, [u8]>, BoxError> {
        match frame {
            // Never compress inside E: (§3.2); a C: frame that slipped through is inflated.
            // Without the `compression` feature the encode layer never makes one.
            #[cfg(feature = "compression")]
            Frame::Binary(bytes) if bytes.starts_with(b"C:") => {
                Ok(wsengine_core::frame::inflate_capped(&bytes[2..], MAX_OUTBOUND_MESSAGE_SIZE)?.into())
            }
            other => Ok(other.as_bytes().into()),
        }
    }
}

impl<S> Service<Outbound> for Encrypt<S>
where
    S: Service<Outbound, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Ready<Result<(), BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut outbound: Outbound) -> Self::Future {
        let OutboundBody::Frame(frame) = &outbound.body else {
            return Either::Right(self.inner.call(outbound));
        };
        if outbound.kind == OutboundKind::Protocol {
            return Either::Right(self.inner.call(outbound));
        }
        let Some(key) = self.session.key() else {
            if self.layer.required {
                tracing::debug!(connection = %self.layer.connection.id(), "plaintext application data withheld");
                return Either::Left(ready(Ok(())));
            }
            return Either::Right(self.inner.call(outbound));
        };
        if self.sealed >= self.layer.key_usage_limit {
            if self.sealed == self.layer.key_usage_limit {
                self.sealed += 1;
                let reason = "Encryption key usage limit reached".to_owned();
                self.layer.connection.deliver(Delivery::Close(Box::new((CloseCode::INTERNAL, reason))));
            }
            return Either::Left(ready(Err("encryption key usage limit reached; frame not sent".into())));
        }
        let sealed = match Self::plaintext_of(frame).and_then(|p| key.seal(&p).map_err(Into::into)) {
            Ok(sealed) => sealed,
            Err(error) => return Either::Left(ready(Err(error))),
        };
        if sealed.len() > MAX_OUTBOUND_MESSAGE_SIZE {
            return Either::Left(ready(Err(TooLarge { size: sealed.len() }.into())));
        }
        self.sealed += 1;
        outbound.body = OutboundBody::Frame(Frame::Binary(sealed.into()));
        Either::Right(self.inner.call(outbound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use tower::{ServiceExt, service_fn};
    use wsengine_core::{Envelope, WireFormat};
    use wsengine_services::connection::ConnectionId;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn protocol_test_vector() {
        // PROTOCOL.md §7.6.
        let client = EphemeralKeyPair::from_private_bytes(&unhex(
            "09369a3a6ac386c9afc387b76d72dfccdef9e9dd91d610e6563eebbdeefde022",
        ))
        .unwrap();
        let engine = EphemeralKeyPair::from_private_bytes(&unhex(
            "5e1fc6318b5763ad9c00103349898462705cb9f8e781dd65b25ef938c29f110e",
        ))
        .unwrap();
        let client_public = "BFzrGjPOMCTN3Tacj1Biqx59BhUalqxLp6ohl5kAJ2wQ2kxene4prWLxdOaaY35J/qBH1+tJUrTjXqES+rp3OUI=";
        let engine_public = "BAeN+xvM6SBzrEwfGSOjoYNfv+PDUBMyMJXQ1/NHXpjoj524HB7vLRoQ3nhGjW9TZY26Qc1K1d0GsZNeFEga608=";
        assert_eq!(client.public_key_base64(), client_public);
        assert_eq!(engine.public_key_base64(), engine_public);
        let shared = engine.shared_secret(&parse_public_key(client_public).unwrap());
        assert_eq!(hex(&shared), "708a9c26ee0bd432d2c479bd850470145c3e7c31c74cf5a81a818d7bd7364317");
        assert_eq!(shared, client.shared_secret(&parse_public_key(engine_public).unwrap()));
        let (prk, _) = hkdf::Hkdf::<Sha256>::extract(None, &shared);
        assert_eq!(hex(&prk), "a835845e9fd75434fb917478ca954268018b4573e75bca27ebe9fa5175327342");
        let mut okm = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, &shared).expand(KEY_INFO, &mut okm).unwrap();
        assert_eq!(hex(&okm), "6b7b11f58951291d71d602cfc4cf1e275b8b25814fe1290fb8555e7166a841dd");

        let key = engine.agree(&parse_public_key(client_public).unwrap());
        let plaintext = br#"{"c":"U","t":"echo_reply","p":{"hello":"world"},"v":1}"#;
        assert_eq!(plaintext.len(), 54);
        let iv: [u8; 12] = unhex("000102030405060708090a0b").try_into().unwrap();
        let frame = key.seal_with_iv(&iv, plaintext);
        let expected = concat!(
            "453a",
            "000102030405060708090a0b",
            "5c451927fab74bf256c9df3f56e94c33e84cdec6480d2d6f0187a91e236382283622a746679975e6565c7ddaa5a482ff558b65f9d188",
            "5276fad8837fc7d126b7a5dfcb954e8a"
        );
        assert_eq!(frame.len(), 84);
        assert_eq!(hex(&frame), expected);
        let client_key = client.agree(&parse_public_key(engine_public).unwrap());
        assert_eq!(client_key.open(&frame).unwrap(), plaintext);
    }

    #[test]
    fn bad_frames_and_keys_are_refused() {
        let key = SessionKey::from_bytes(&[7; 32]);
        let other = SessionKey::from_bytes(&[8; 32]);
        let frame = key.seal(b"{}").unwrap();
        assert_eq!(other.open(&frame), Err(CryptoError::Tag));
        let mut tampered = frame.clone();
        tampered[16] ^= 1;
        assert_eq!(key.open(&tampered), Err(CryptoError::Tag));
        assert_eq!(key.open(&frame[..frame.len() - 1]), Err(CryptoError::Tag));
        assert_eq!(key.open(&frame[..29]), Err(CryptoError::TooShort));
        assert_eq!(key.open(b"C:xx"), Err(CryptoError::NotEncrypted));
        assert_eq!(key.open(&frame).unwrap(), b"{}");

        // Missing padding is accepted; garbage, off-curve points and the identity are not.
        let public = EphemeralKeyPair::generate().unwrap().public_key_base64();
        assert!(parse_public_key(public.trim_end_matches('=')).is_ok());
        assert_eq!(parse_public_key("not base64!").unwrap_err(), KeyExchangeError::NotBase64);
        let mut off_curve = vec![4u8];
        off_curve.extend([1u8; 64]);
        assert_eq!(parse_public_key(&STANDARD.encode(&off_curve)).unwrap_err(), KeyExchangeError::InvalidPoint);
        assert_eq!(parse_public_key(&STANDARD.encode([0u8])).unwrap_err(), KeyExchangeError::InvalidPoint);
        assert_eq!(parse_public_key(&STANDARD.encode([4u8; 65])).unwrap_err(), KeyExchangeError::InvalidPoint);
        assert!(!format!("{key:?}").contains('7'));
    }

    fn connection() -> (Arc<Connection>, wsengine_services::connection::DeliveryReceiver) {
        let (tx, rx) = wsengine_services::connection::delivery_channel(4);
        (Arc::new(Connection::new(ConnectionId::new(), None, WireFormat::Json, tx)), rx)
    }

    type Seen = Arc<StdMutex<Vec<Frame>>>;

    fn encrypting(layer: EncryptLayer) -> (impl Service<Outbound, Response = (), Error = BoxError>, Seen) {
        let seen: Seen = Arc::default();
        let sink = Arc::clone(&seen);
        let inner = service_fn(move |outbound: Outbound| {
            let OutboundBody::Frame(frame) = outbound.body else { panic!("unencoded") };
            sink.lock().unwrap().push(frame);
            async { Ok::<_, BoxError>(()) }
        });
        (layer.layer(inner), seen)
    }

    fn event_frame(kind: OutboundKind, text: &str) -> Outbound {
        let mut outbound = Outbound::event(Envelope::new("x", Value::Null));
        outbound.kind = kind;
        outbound.body = OutboundBody::Frame(Frame::text(text));
        outbound
    }

    #[tokio::test]
    async fn only_application_data_is_encrypted_once_keyed() {
        let (connection, _rx) = connection();
        let (mut service, seen) = encrypting(EncryptLayer::new(&connection));
        service.ready().await.unwrap().call(event_frame(OutboundKind::Event, "{\"a\":1}")).await.unwrap();
        connection.shared::<E2eSession>().install(SessionKey::from_bytes(&[1; 32]));
        for kind in [OutboundKind::Protocol, OutboundKind::Event, OutboundKind::Publication] {
            service.ready().await.unwrap().call(event_frame(kind, "{\"a\":1}")).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        assert!(matches!(&seen[0], Frame::Text(_)), "before the key: plaintext");
        assert!(matches!(&seen[1], Frame::Text(_)), "protocol frames stay plaintext");
        let key = SessionKey::from_bytes(&[1; 32]);
        for frame in &seen[2..] {
            let Frame::Binary(bytes) = frame else { panic!("E: frames are binary") };
            assert_eq!(key.open(bytes).unwrap(), b"{\"a\":1}");
        }
    }

    #[tokio::test]
    async fn required_mode_withholds_plaintext_data_and_the_usage_limit_closes_1011() {
        let (connection, mut rx) = connection();
        let (mut service, seen) = encrypting(EncryptLayer::new(&connection).required(true).key_usage_limit(2));
        service.ready().await.unwrap().call(event_frame(OutboundKind::Event, "{}")).await.unwrap();
        assert!(seen.lock().unwrap().is_empty());
        connection.shared::<E2eSession>().install(SessionKey::from_bytes(&[1; 32]));
        for _ in 0..2 {
            service.ready().await.unwrap().call(event_frame(OutboundKind::Event, "{}")).await.unwrap();
        }
        let refused = service.ready().await.unwrap().call(event_frame(OutboundKind::Event, "{}")).await;
        assert!(refused.is_err());
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(matches!(rx.try_recv(), Ok(Delivery::Close(close)) if close.0 == CloseCode::INTERNAL));
    }
}
