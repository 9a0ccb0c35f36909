//! The request and response types of the per-connection message stacks.
//!
//! The inbound stack is a `Service<Inbound, Response = Reply, Error = BoxError>`; the
//! outbound stack is a `Service<Outbound, Response = (), Error = BoxError>`. Layers move a
//! message from one body variant to the next (a frame is decoded into a message, an envelope
//! is encoded into a frame), so a layer only needs to understand the variants it handles.
//!
//! ```
//! use wsengine_services::message::{Inbound, Outbound, Reply};
//! use wsengine_core::{Envelope, Frame};
//!
//! let inbound = Inbound::frame(Frame::text(r#"{"t":"ping","p":{}}"#));
//! assert!(!inbound.encrypted);
//! let reply = Reply::message(Outbound::protocol(Envelope::new("PONG", serde_json::json!({}))));
//! assert_eq!(reply.messages.len(), 1);
//! ```

use std::sync::Arc;

use bytes::Bytes;
use tungstenite::Utf8Bytes;
use wsengine_core::codes::CloseCode;
use wsengine_core::{Decoded, Envelope, Frame, InboundMessage};

use crate::handler::SignatureStatus;
use crate::publication::Publication;

/// The error type between layers, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A message travelling through the inbound stack.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// What arrived, at its current stage of decoding.
    pub body: InboundBody,
    /// Whether the message arrived inside an `E:` frame.
    pub encrypted: bool,
    /// Set by a verify layer: the message's signature status (for a `batch`, the batch's own).
    pub signature: SignatureStatus,
}

/// The stages of an inbound message.
#[derive(Debug, Clone)]
pub enum InboundBody {
    /// A WebSocket data message exactly as read from the socket.
    Frame(Frame),
    /// A decoded envelope.
    Message(InboundMessage),
    /// Text that is not a JSON object.
    RawText(Utf8Bytes),
    /// Binary data of no known form.
    RawBinary(Bytes),
    /// A whole `E:` frame that still needs the session key.
    Encrypted(Bytes),
}

impl Inbound {
    /// A frame as read from the socket.
    pub fn frame(frame: Frame) -> Self {
        Inbound { body: InboundBody::Frame(frame), encrypted: false, signature: SignatureStatus::Unchecked }
    }

    /// A decoded message.
    pub fn message(message: InboundMessage) -> Self {
        Inbound { body: InboundBody::Message(message), encrypted: false, signature: SignatureStatus::Unchecked }
    }
}

impl From<Decoded> for InboundBody {
    fn from(decoded: Decoded) -> Self {
        match decoded {
            Decoded::Message(m) => InboundBody::Message(m),
            Decoded::RawText(t) => InboundBody::RawText(t),
            Decoded::RawBinary(b) => InboundBody::RawBinary(b),
            Decoded::Encrypted(b) => InboundBody::Encrypted(b),
        }
    }
}

/// What the inbound stack answers: messages for this connection, and possibly a close.
#[derive(Debug, Default)]
pub struct Reply {
    /// Messages to send back on this connection, in order.
    pub messages: Vec<Outbound>,
    /// Close the connection with this code and reason after sending `messages`.
    pub close: Option<(CloseCode, String)>,
}

impl Reply {
    /// No answer.
    pub fn none() -> Self {
        Reply::default()
    }

    /// One message.
    pub fn message(message: Outbound) -> Self {
        Reply { messages: vec![message], close: None }
    }

    /// Appends a message.
    pub fn push(&mut self, message: Outbound) {
        self.messages.push(message);
    }

    /// Gives every message of a reply with more than one message the same fresh reply key, so
    /// the outbound queue sends them in this order whatever their priorities (PROTOCOL.md §5.3:
    /// an acknowledgement after the replays it concludes, `snapshot_complete` after the snapshot
    /// events). The driver does this for every reply it queues.
    pub fn keep_in_order(&mut self) {
        if self.messages.len() > 1 {
            let key = OrderKey::unique();
            for message in &mut self.messages {
                message.order.reply = Some(key);
            }
        }
    }

    /// Appends the messages of another reply and takes its close, if any.
    pub fn extend(&mut self, other: Reply) {
        self.messages.extend(other.messages);
        if other.close.is_some() {
            self.close = other.close;
        }
    }
}

/// What kind of message an [`Outbound`] is; it decides encoding, encryption and drop policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundKind {
    /// A frame the engine builds to run the protocol: always plaintext JSON text, never dropped.
    Protocol,
    /// A per-connection application event (direct send, snapshot event, handler reply).
    Event,
    /// A topic publication or broadcast, shared by every subscriber.
    Publication,
}

/// A message travelling through the outbound stack.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Protocol frame, per-connection event or publication.
    pub kind: OutboundKind,
    /// Delivery priority, 1 (background) to 10 (critical).
    pub priority: u8,
    /// The message, at its current stage of encoding.
    pub body: OutboundBody,
    /// What the outbound queue must keep it in line with (PROTOCOL.md §5.3).
    pub order: Order,
}

/// The ordering constraints of an [`Outbound`] message in the outbound queue.
///
/// The queue delivers by priority, but a message never leaves it while an earlier-queued
/// message sharing one of its keys is still waiting. `stream` keeps a topic's publications
/// (and broadcasts) in offset order; `reply` keeps the messages one inbound message produced in
/// order, so an acknowledgement never overtakes the replays or snapshot events it concludes.
///
/// [`Outbound::publication`] sets `stream`, and the driver sets `reply` on every reply with
/// more than one message ([`Reply::keep_in_order`]); so replays and snapshot events belong in
/// the same [`Reply`] as the frame that concludes them. A snapshot event that must also stay
/// ahead of its topic's later publications joins the topic's stream with
/// [`Outbound::in_stream`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Order {
    /// The stream the message belongs to: its topic, or the broadcast stream.
    pub stream: Option<OrderKey>,
    /// The reply the message is part of.
    pub reply: Option<OrderKey>,
}

impl Order {
    /// The distinct keys, stream first.
    pub fn keys(&self) -> impl Iterator<Item = OrderKey> {
        let stream = self.stream;
        self.stream.into_iter().chain(self.reply.filter(move |reply| Some(*reply) != stream))
    }
}

/// An ordering key: messages with the same key leave the outbound queue in the order they
/// entered it.
///
/// Topic keys are a hash of the topic name (keyed per process, so topic names cannot be chosen
/// to collide); two topics whose hashes collide are merely kept in order with each other, which
/// is always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrderKey(KeySpace);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum KeySpace {
    Topic(u64),
    Broadcast,
    Unique(u64),
}

impl OrderKey {
    /// The key of a topic's publications.
    pub fn topic(topic: &str) -> Self {
        use std::hash::BuildHasher;
        static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        OrderKey(KeySpace::Topic(KEYS.get_or_init(std::hash::RandomState::new).hash_one(topic)))
    }

    /// The key of broadcasts to every connection.
    pub fn broadcast() -> Self {
        OrderKey(KeySpace::Broadcast)
    }

    /// A key no other call returns (for grouping the messages of one reply).
    pub fn unique() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        OrderKey(KeySpace::Unique(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)))
    }
}

/// The stages of an outbound message.
#[derive(Debug, Clone)]
pub enum OutboundBody {
    /// A message built for this connection, not yet encoded.
    Envelope(Box<Envelope>),
    /// A publication shared by all subscribers; it memoizes its encodings.
    Publication(Arc<Publication>),
    /// Encoded bytes, ready for the socket.
    Frame(Frame),
}

/// Priority levels of PROTOCOL.md §4.1.
pub mod priority {
    /// Never dropped.
    pub const CRITICAL: u8 = 10;
    /// High.
    pub const HIGH: u8 = 8;
    /// The default.
    pub const NORMAL: u8 = 5;
    /// Low.
    pub const LOW: u8 = 3;
    /// Dropped first.
    pub const BACKGROUND: u8 = 1;

    /// The level a `pri` value belongs to: the nearest level at or below it, so 9 is
    /// [`HIGH`], 4 is [`LOW`], anything above 10 is [`CRITICAL`] and 0 is [`BACKGROUND`].
    ///
    /// ```
    /// use wsengine_services::message::priority;
    /// assert_eq!(priority::level(9), priority::HIGH);
    /// assert_eq!(priority::level(0), priority::BACKGROUND);
    /// assert_eq!(priority::level(200), priority::CRITICAL);
    /// ```
    pub fn level(pri: u8) -> u8 {
        match pri {
            CRITICAL.. => CRITICAL,
            HIGH.. => HIGH,
            NORMAL.. => NORMAL,
            LOW.. => LOW,
            _ => BACKGROUND,
        }
    }
}

impl Outbound {
    /// A protocol frame (critical priority).
    pub fn protocol(envelope: Envelope) -> Self {
        Outbound {
            kind: OutboundKind::Protocol,
            priority: priority::CRITICAL,
            body: OutboundBody::Envelope(Box::new(envelope)),
            order: Order::default(),
        }
    }

    /// A per-connection application event; its priority is the envelope's `pri`, or normal.
    pub fn event(envelope: Envelope) -> Self {
        Outbound {
            kind: OutboundKind::Event,
            priority: envelope.pri.unwrap_or(priority::NORMAL),
            body: OutboundBody::Envelope(Box::new(envelope)),
            order: Order::default(),
        }
    }

    /// A shared publication, kept in order with the other publications of its topic (or with
    /// the other broadcasts).
    pub fn publication(publication: Arc<Publication>) -> Self {
        let stream = publication.order_key();
        Outbound {
            kind: OutboundKind::Publication,
            priority: publication.priority(),
            body: OutboundBody::Publication(publication),
            order: Order { stream: Some(stream), reply: None },
        }
    }

    /// The same message, kept in order with the other messages of `stream` (for example a
    /// snapshot event with its topic's publications: `OrderKey::topic(topic)`).
    pub fn in_stream(mut self, stream: OrderKey) -> Self {
        self.order.stream = Some(stream);
        self
    }

    /// The message type, when it is known without decoding.
    pub fn message_type(&self) -> Option<&str> {
        match &self.body {
            OutboundBody::Envelope(e) => Some(&e.t),
            OutboundBody::Publication(p) => p.message_type(),
            OutboundBody::Frame(_) => None,
        }
    }
}

/// Turns an error from a message stack into what the client is told: a [`ProtocolError`]
/// becomes its `error` frame (and close, if it carries one); any other error becomes a
/// `SERVER_ERROR` frame without details, and the connection stays open.
///
/// [`ProtocolError`]: wsengine_core::ProtocolError
pub fn error_reply(error: &BoxError) -> Reply {
    use wsengine_core::{ErrorCode, ProtocolError};
    let owned;
    let protocol = match error.downcast_ref::<ProtocolError>() {
        Some(protocol) => protocol,
        None => {
            tracing::warn!(%error, "internal error while handling a message");
            owned = ProtocolError::new(ErrorCode::ServerError, "Internal server error");
            &owned
        }
    };
    Reply {
        messages: vec![Outbound::protocol(protocol.to_envelope())],
        close: protocol.close().map(|(code, reason)| (code, reason.to_owned())),
    }
}
