//! A publication: one message for many subscribers, encoded at most once per wire form.
//!
//! The bus hands every subscriber the same `Arc<Publication>`. The first subscriber that needs
//! a given form (plain JSON, `C:` compressed JSON, `M:` msgpack) encodes it; every other
//! subscriber shares those bytes, so fan-out costs no per-subscriber serialization.
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

use std::sync::OnceLock;

use bytes::Bytes;
use tungstenite::Utf8Bytes;
use wsengine_core::frame::compress;
use wsengine_core::{Envelope, Frame, Stamp, WireFormat};

use crate::message::priority;

/// A message published to a topic (or broadcast to every connection) with its memoized encodings.
#[derive(Debug)]
pub struct Publication {
    topic: Option<String>,
    content: Content,
    priority: u8,
    json: OnceLock<Utf8Bytes>,
    compressed: OnceLock<Option<Bytes>>,
    msgpack: OnceLock<Bytes>,
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
        if envelope.id.is_none() {
            envelope.id = Some(uuid::Uuid::now_v7().to_string());
        }
        if envelope.ts.is_none() {
            envelope.ts = Some(wsengine_core::time::now_rfc3339());
        }
        envelope.seq = None;
        let priority = envelope.pri.unwrap_or(priority::NORMAL);
        Publication {
            topic,
            content: Content::Envelope(Box::new(envelope)),
            priority,
            json: OnceLock::new(),
            compressed: OnceLock::new(),
            msgpack: OnceLock::new(),
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
        let text = Utf8Bytes::try_from(prepared).map_err(|_| wsengine_core::DecodeError::NotUtf8)?;
        Ok(Publication {
            topic: Some(topic.into()),
            content: Content::Raw { json: text, message_type },
            priority: priority::NORMAL,
            json: OnceLock::new(),
            compressed: OnceLock::new(),
            msgpack: OnceLock::new(),
        })
    }

    /// Sets the recovery stamp. Only before the publication is shared (it is part of every encoding).
    pub fn with_stamp(mut self, stamp: Stamp) -> Self {
        if let Content::Envelope(envelope) = &mut self.content {
            envelope.stamp = Some(stamp);
        }
        self
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

    /// The plain JSON text, encoded on first use.
    pub fn json(&self) -> &Utf8Bytes {
        self.json.get_or_init(|| match &self.content {
            Content::Envelope(e) => Utf8Bytes::try_from(e.to_json()).expect("serde_json emits UTF-8"),
            Content::Raw { json, .. } => json.clone(),
        })
    }

    /// The wire frame for a connection of `format`. With `compression = Some((threshold, level))`
    /// a JSON encoding longer than `threshold` is sent as `C:` when that is smaller.
    /// The compression parameters are engine-wide: the first call memoizes the result.
    pub fn frame(&self, format: WireFormat, compression: Option<(usize, u32)>) -> Frame {
        match format {
            WireFormat::MsgPack => Frame::Binary(self.msgpack().clone()),
            WireFormat::Json => {
                let json = self.json();
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
        }
    }

    /// The plaintext JSON bytes (what an `E:` frame of a JSON connection carries).
    pub fn plaintext(&self, format: WireFormat) -> Bytes {
        match format {
            WireFormat::Json => Bytes::from(self.json().clone()),
            WireFormat::MsgPack => self.msgpack().clone(),
        }
    }

    fn msgpack(&self) -> &Bytes {
        self.msgpack.get_or_init(|| {
            let body = match &self.content {
                Content::Envelope(e) => e.to_msgpack(),
                Content::Raw { json, .. } => {
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
