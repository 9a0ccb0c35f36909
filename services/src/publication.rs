//! A publication: one message for many subscribers, encoded at most once per wire form.
//!
//! The bus hands every subscriber the same `Arc<Publication>`. The first subscriber that needs
//! a given form (plain JSON, `C:` compressed JSON, `M:` msgpack) encodes it; every other
//! subscriber shares those bytes, so fan-out costs no per-subscriber serialization.
//!
//! The `C:` form needs the `compression` cargo feature and the `M:` form the `msgpack` one
//! (both on by default); without `compression` the `compression` argument of
//! [`Publication::frame`] is ignored and publications always go out as plain JSON.
//!
//! ```
//! use std::sync::Arc;
//! use wsengine_core::{Envelope, Frame, WireFormat};
//! use wsengine_services::publication::Publication;
//!
//! let publication = Arc::new(Publication::new("prices", Envelope::new("price_update", serde_json::json!({"p": 1}))));
//! let a = publication.frame(WireFormat::Json, None);
//! let b = publication.frame(WireFormat::Json, None);
//! // Both subscribers share one buffer.
//! match (a, b) {
//!     (Frame::Text(a), Frame::Text(b)) => assert_eq!(a.as_ptr(), b.as_ptr()),
//!     _ => unreachable!(),
//! }
//! ```

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tungstenite::Utf8Bytes;
#[cfg(feature = "compression")]
use wsengine_core::frame::compress;
use wsengine_core::{Envelope, Frame, Stamp, WireFormat};

use crate::message::{OrderKey, priority};

/// Computes the `sig` of a publication (PROTOCOL.md §8.4). The publication calls it at most
/// once, after stamping and before the first encoding, so every subscriber and every replay
/// carries the same signature.
pub trait PublicationSigner: Send + Sync + fmt::Debug + 'static {
    /// The signature of `message` (the publication as a JSON object, without `sig`), or `None`
    /// to leave this publication unsigned.
    fn sign(&self, message: &serde_json::Map<String, serde_json::Value>) -> Option<String>;
}

/// A message published to a topic (or broadcast to every connection) with its memoized encodings.
#[derive(Debug)]
pub struct Publication {
    topic: Option<String>,
    content: Content,
    priority: u8,
    /// The `id` the caller supplied (none when the engine assigned it): the idempotency key.
    caller_id: Option<String>,
    signer: Option<Arc<dyn PublicationSigner>>,
    signed: OnceLock<Option<Signed>>,
    json: OnceLock<Utf8Bytes>,
    #[cfg(feature = "compression")]
    compressed: OnceLock<Option<Bytes>>,
    #[cfg(feature = "msgpack")]
    msgpack: OnceLock<Bytes>,
    /// The outbound-queue ordering key, computed once rather than once per subscriber.
    order_key: OnceLock<OrderKey>,
    /// The recovery stamp, when the publication carries one.
    stamp: Option<Stamp>,
    /// The same publication without its stamp, built for the first filtered subscriber.
    unstamped: OnceLock<Arc<Publication>>,
}

/// The content with its `sig` in place.
#[derive(Debug)]
enum Signed {
    Envelope(Box<Envelope>),
    Raw(Utf8Bytes),
}

#[derive(Debug)]
enum Content {
    Envelope(Box<Envelope>),
    /// A pre-serialized JSON object, kept byte for byte (PROTOCOL.md §6.3.3).
    Raw {
        json: Utf8Bytes,
        message_type: Option<String>,
    },
}

impl Publication {
    /// A publication to `topic`. It gets an `id` and `ts` now unless the envelope has them,
    /// and loses any per-connection `seq`.
    pub fn new(topic: impl Into<String>, envelope: Envelope) -> Self {
        Self::build(Some(topic.into()), envelope)
    }

    /// A message for every connection (never stamped).
    pub fn broadcast(envelope: Envelope) -> Self {
        Self::build(None, envelope)
    }

    fn build(topic: Option<String>, mut envelope: Envelope) -> Self {
        let caller_id = envelope.id.clone();
        if envelope.id.is_none() {
            envelope.id = Some(uuid::Uuid::now_v7().to_string());
        }
        if envelope.ts.is_none() {
            envelope.ts = Some(wsengine_core::time::now_rfc3339());
        }
        envelope.seq = None;
        let priority = envelope.pri.unwrap_or(priority::NORMAL);
        Self::unencoded(topic, Content::Envelope(Box::new(envelope)), priority, caller_id)
    }

    /// A publication with nothing encoded, signed or stamped yet.
    fn unencoded(topic: Option<String>, content: Content, priority: u8, caller_id: Option<String>) -> Self {
        Publication {
            topic,
            content,
            priority,
            caller_id,
            signer: None,
            signed: OnceLock::new(),
            json: OnceLock::new(),
            #[cfg(feature = "compression")]
            compressed: OnceLock::new(),
            #[cfg(feature = "msgpack")]
            msgpack: OnceLock::new(),
            order_key: OnceLock::new(),
            stamp: None,
            unstamped: OnceLock::new(),
        }
    }

    /// A pre-serialized JSON object published as is, but for the category and stamp insertions
    /// of PROTOCOL.md §6.3.3. Fails if `json` is not a JSON object.
    pub fn raw(
        topic: impl Into<String>,
        json: &[u8],
        stamp: Option<&Stamp>,
    ) -> Result<Self, wsengine_core::DecodeError> {
        let prepared = wsengine_core::envelope::prepare_raw_publication(json, stamp)?;
        let value: serde_json::Value =
            serde_json::from_slice(&prepared).map_err(|_| wsengine_core::DecodeError::NotAnObject)?;
        let message_type = value.get("t").and_then(|t| t.as_str()).map(str::to_owned);
        let caller_id = value.get("id").and_then(|t| t.as_str()).map(str::to_owned);
        let text = Utf8Bytes::try_from(prepared).map_err(|_| wsengine_core::DecodeError::NotUtf8)?;
        Ok(Self::unencoded(Some(topic.into()), Content::Raw { json: text, message_type }, priority::NORMAL, caller_id))
    }

    /// Sets the recovery stamp. Only before the publication is shared (it is part of every encoding).
    pub fn with_stamp(mut self, stamp: Stamp) -> Self {
        match &mut self.content {
            Content::Envelope(envelope) => envelope.stamp = Some(stamp.clone()),
            Content::Raw { json, .. } => {
                // Prepared once already, so only the stamp is inserted this time.
                if let Ok(stamped) = wsengine_core::envelope::prepare_raw_publication(json.as_bytes(), Some(&stamp)) {
                    if let Ok(text) = Utf8Bytes::try_from(stamped) {
                        *json = text;
                    }
                }
            }
        }
        self.stamp = Some(stamp);
        self.forget_encodings();
        self
    }

    /// The recovery stamp (`tp`, `e`, `o`), when recovery is on.
    pub fn stamp(&self) -> Option<&Stamp> {
        self.stamp.as_ref()
    }

    /// The same publication without the recovery stamp (itself when it has none), built once
    /// and shared like any publication. A filtered subscription receives this form: it skips
    /// offsets by design, and a client seeing stamped offsets jump would take the skipped ones
    /// for lost and ask to recover them (PROTOCOL.md §9.5). Same `id`, `ts` and payload; a
    /// signed publication is signed again without the stamp.
    pub fn unstamped(self: &Arc<Self>) -> Arc<Publication> {
        let Some(stamp) = &self.stamp else { return Arc::clone(self) };
        let unstamped = self.unstamped.get_or_init(|| {
            let content = match &self.content {
                Content::Envelope(envelope) => {
                    let mut envelope = envelope.clone();
                    envelope.stamp = None;
                    Content::Envelope(envelope)
                }
                Content::Raw { json, message_type } => {
                    let stripped = wsengine_core::envelope::strip_raw_stamp(json.as_bytes(), stamp)
                        .and_then(|bytes| Utf8Bytes::try_from(bytes).ok())
                        .expect("a stamped raw publication starts with the stamp the engine inserted");
                    Content::Raw { json: stripped, message_type: message_type.clone() }
                }
            };
            let mut unstamped = Self::unencoded(self.topic.clone(), content, self.priority, self.caller_id.clone());
            unstamped.signer = self.signer.clone();
            unstamped.order_key = OnceLock::from(self.order_key());
            Arc::new(unstamped)
        });
        Arc::clone(unstamped)
    }

    /// Signs the publication with `signer` when it is first encoded (after any stamping).
    /// Only before the publication is shared. A raw publication that already has a top-level
    /// `sig` keeps it.
    pub fn with_signer(mut self, signer: Arc<dyn PublicationSigner>) -> Self {
        self.signer = Some(signer);
        self.forget_encodings();
        self
    }

    /// The signature the publication carries, computing it if needed.
    pub fn sig(&self) -> Option<String> {
        match self.signed() {
            Some(Signed::Envelope(e)) => e.sig.clone(),
            Some(Signed::Raw(json)) => serde_json::from_str::<serde_json::Value>(json.as_str())
                .ok()
                .and_then(|v| v.get("sig").and_then(|s| s.as_str()).map(str::to_owned)),
            None => self.envelope().and_then(|e| e.sig.clone()),
        }
    }

    fn forget_encodings(&mut self) {
        self.signed = OnceLock::new();
        self.json = OnceLock::new();
        #[cfg(feature = "compression")]
        {
            self.compressed = OnceLock::new();
        }
        #[cfg(feature = "msgpack")]
        {
            self.msgpack = OnceLock::new();
        }
    }

    /// The content with the signature in place, computed once; `None` when unsigned.
    fn signed(&self) -> Option<&Signed> {
        let signer = self.signer.as_ref()?;
        self.signed
            .get_or_init(|| match &self.content {
                Content::Envelope(envelope) => {
                    let serde_json::Value::Object(mut message) =
                        serde_json::to_value(envelope.as_ref()).expect("envelopes serialize to JSON")
                    else {
                        return None;
                    };
                    message.remove("sig");
                    let sig = signer.sign(&message)?;
                    let mut signed = envelope.clone();
                    signed.sig = Some(sig);
                    Some(Signed::Envelope(signed))
                }
                Content::Raw { json, .. } => {
                    let serde_json::Value::Object(message) = serde_json::from_str(json.as_str()).ok()? else {
                        return None;
                    };
                    if message.contains_key("sig") {
                        return None;
                    }
                    let sig = signer.sign(&message)?;
                    let text = json.as_str().trim_end();
                    let body = text.strip_suffix('}')?.trim_end();
                    let separator = if message.is_empty() { "" } else { "," };
                    let quoted = serde_json::to_string(&sig).expect("strings serialize");
                    Some(Signed::Raw(Utf8Bytes::from(format!("{body}{separator}\"sig\":{quoted}}}"))))
                }
            })
            .as_ref()
    }

    /// The `id` the caller supplied, if any (an engine-assigned id is not one): publishes with
    /// the same caller id are idempotent within the configured window.
    pub fn caller_id(&self) -> Option<&str> {
        self.caller_id.as_deref()
    }

    /// The topic, or `None` for a broadcast to every connection.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// The message type.
    pub fn message_type(&self) -> Option<&str> {
        match &self.content {
            Content::Envelope(e) => Some(&e.t),
            Content::Raw { message_type, .. } => message_type.as_deref(),
        }
    }

    /// The envelope, unless the publication was handed over pre-serialized.
    pub fn envelope(&self) -> Option<&Envelope> {
        match &self.content {
            Content::Envelope(e) => Some(e),
            Content::Raw { .. } => None,
        }
    }

    /// Delivery priority.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The key that keeps this publication in order with the others of its topic (or with
    /// the other broadcasts) in every subscriber's outbound queue.
    pub fn order_key(&self) -> OrderKey {
        *self.order_key.get_or_init(|| match self.topic() {
            Some(topic) => OrderKey::topic(topic),
            None => OrderKey::broadcast(),
        })
    }

    /// The plain JSON text, encoded on first use.
    pub fn json(&self) -> &Utf8Bytes {
        self.json.get_or_init(|| match (self.signed(), &self.content) {
            (Some(Signed::Envelope(e)), _) | (None, Content::Envelope(e)) => {
                Utf8Bytes::try_from(e.to_json()).expect("serde_json emits UTF-8")
            }
            (Some(Signed::Raw(json)), _) | (None, Content::Raw { json, .. }) => json.clone(),
        })
    }

    /// The wire frame for a connection of `format`. With `compression = Some((threshold, level))`
    /// a JSON encoding longer than `threshold` is sent as `C:` when that is smaller.
    /// The compression parameters are engine-wide: the first call memoizes the result.
    /// Without the `compression` cargo feature `compression` is ignored (never `C:`).
    pub fn frame(&self, format: WireFormat, compression: Option<(usize, u32)>) -> Frame {
        // Not a `match`: wsengine-core may have `msgpack` while this crate does not, and then
        // a msgpack connection is served JSON.
        #[cfg(feature = "msgpack")]
        if format == WireFormat::MsgPack {
            return Frame::Binary(self.msgpack().clone());
        }
        #[cfg(not(feature = "msgpack"))]
        let _ = format;
        let json = self.json();
        #[cfg(not(feature = "compression"))]
        let _ = compression;
        #[cfg(feature = "compression")]
        if let Some((threshold, level)) = compression {
            if json.len() > threshold {
                let compressed = self.compressed.get_or_init(|| {
                    let c = compress(json.as_bytes(), level);
                    (c.len() < json.len()).then(|| Bytes::from(c))
                });
                if let Some(c) = compressed {
                    return Frame::Binary(c.clone());
                }
            }
        }
        Frame::Text(json.clone())
    }

    /// The plaintext JSON bytes (what an `E:` frame of a JSON connection carries), or the
    /// `M:` frame on a msgpack connection.
    pub fn plaintext(&self, format: WireFormat) -> Bytes {
        #[cfg(feature = "msgpack")]
        if format == WireFormat::MsgPack {
            return self.msgpack().clone();
        }
        #[cfg(not(feature = "msgpack"))]
        let _ = format;
        Bytes::from(self.json().clone())
    }

    #[cfg(feature = "msgpack")]
    fn msgpack(&self) -> &Bytes {
        self.msgpack.get_or_init(|| {
            let body = match (self.signed(), &self.content) {
                (Some(Signed::Envelope(e)), _) | (None, Content::Envelope(e)) => e.to_msgpack(),
                (Some(Signed::Raw(json)), _) | (None, Content::Raw { json, .. }) => {
                    let value: serde_json::Value =
                        serde_json::from_str(json.as_str()).expect("raw publications are validated JSON");
                    rmp_serde::to_vec_named(&value).expect("JSON values encode as msgpack")
                }
            };
            let mut framed = Vec::with_capacity(body.len() + 2);
            framed.extend_from_slice(b"M:");
            framed.extend_from_slice(&body);
            Bytes::from(framed)
        })
    }

    /// Size of the plain JSON encoding.
    pub fn json_len(&self) -> usize {
        self.json().len()
    }
}
