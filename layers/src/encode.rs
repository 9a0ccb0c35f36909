//! Encodes outbound messages for one connection: JSON or msgpack, `C:` compression, `seq`.
//!
//! Protocol frames go out as plaintext JSON text; per-connection events as binary JSON (or
//! `C:` above the compression threshold, when that is smaller); publications use their
//! shared, memoized encodings, so fan-out never serializes per subscriber. On msgpack
//! connections every data frame is `M:`. Messages the engine builds for this connection get
//! the per-connection `seq` counter (PROTOCOL.md §4.1); publications, `ping` and `PONG` do
//! not. A frame over 1 MiB is refused (§3.5).
//!
//! `C:` needs the `compression` cargo feature and `M:` the `msgpack` one (both on by default):
//! without `compression`, [`EncodeLayer::compression`] is ignored and nothing is compressed;
//! without `msgpack` there are no msgpack connections (`WireFormat::MsgPack` does not exist).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use wsengine_core::{Envelope, Frame, WireFormat};
//! use wsengine_layers::encode::EncodeLayer;
//! use wsengine_services::message::{BoxError, Outbound, OutboundBody};
//!
//! let inner = service_fn(|outbound: Outbound| async move {
//!     assert!(matches!(outbound.body, OutboundBody::Frame(Frame::Binary(_))));
//!     Ok::<_, BoxError>(())
//! });
//! let mut service = EncodeLayer::new(WireFormat::Json).layer(inner);
//! let event = Outbound::event(Envelope::new("echo_reply", serde_json::json!({"hello": "world"})));
//! service.ready().await.unwrap().call(event).await.unwrap();
//! # });
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};
use wsengine_core::WireFormat;
use wsengine_core::frame::{encode_data, encode_protocol};
use wsengine_core::limits::MAX_OUTBOUND_MESSAGE_SIZE;
use wsengine_services::message::{BoxError, Outbound, OutboundBody, OutboundKind};

/// Applies [`Encode`].
#[derive(Debug, Clone)]
pub struct EncodeLayer {
    format: WireFormat,
    compression: Option<(usize, u32)>,
    compression_enabled: Option<Arc<AtomicBool>>,
}

impl EncodeLayer {
    /// Encoding for a connection of `format`, without compression.
    pub fn new(format: WireFormat) -> Self {
        EncodeLayer { format, compression: None, compression_enabled: None }
    }

    /// Compresses JSON data frames longer than `threshold` bytes at zlib `level` (1–9).
    /// Ignored without the `compression` cargo feature: nothing is compressed then.
    pub fn compression(mut self, threshold: usize, level: u32) -> Self {
        self.compression = Some((threshold, level.clamp(1, 9)));
        self
    }

    /// A switch the connection flips when its client refuses compression in `client_hello`.
    pub fn compression_switch(mut self, enabled: Arc<AtomicBool>) -> Self {
        self.compression_enabled = Some(enabled);
        self
    }
}

impl<S> Layer<S> for EncodeLayer {
    type Service = Encode<S>;

    fn layer(&self, inner: S) -> Encode<S> {
        Encode { inner, layer: self.clone(), seq: 0 }
    }
}

/// Turns envelopes and publications into frames before the inner service.
#[derive(Debug, Clone)]
pub struct Encode<S> {
    inner: S,
    layer: EncodeLayer,
    seq: u64,
}

/// An outbound message larger than the protocol allows (1 MiB) was refused.
#[derive(Debug)]
pub struct TooLarge {
    /// The encoded size.
    pub size: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outbound message of {} bytes exceeds {MAX_OUTBOUND_MESSAGE_SIZE}; not sent", self.size)
    }
}

impl std::error::Error for TooLarge {}

impl<S> Encode<S> {
    fn compression(&self) -> Option<(usize, u32)> {
        if cfg!(not(feature = "compression")) {
            return None;
        }
        let enabled = self.layer.compression_enabled.as_ref().is_none_or(|switch| switch.load(Ordering::Relaxed));
        self.layer.compression.filter(|_| enabled)
    }
}

impl<S> Service<Outbound> for Encode<S>
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
        let frame = match outbound.body {
            OutboundBody::Frame(frame) => frame,
            OutboundBody::Publication(ref publication) => publication.frame(self.layer.format, self.compression()),
            OutboundBody::Envelope(ref mut envelope) => {
                if envelope.seq.is_none() && !matches!(envelope.t.as_str(), "ping" | "PONG") {
                    self.seq += 1;
                    envelope.seq = Some(self.seq);
                }
                match outbound.kind {
                    OutboundKind::Protocol => encode_protocol(envelope),
                    _ => encode_data(envelope, self.layer.format, false, self.compression()),
                }
            }
        };
        if frame.len() > MAX_OUTBOUND_MESSAGE_SIZE {
            return Either::Left(ready(Err(TooLarge { size: frame.len() }.into())));
        }
        outbound.body = OutboundBody::Frame(frame);
        Either::Right(self.inner.call(outbound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tower::{ServiceExt, service_fn};
    use wsengine_core::{Envelope, Frame};
    use wsengine_services::publication::Publication;

    type Seen = Arc<Mutex<Vec<Frame>>>;

    fn recording(layer: EncodeLayer) -> (impl Service<Outbound, Response = (), Error = BoxError>, Seen) {
        let seen: Seen = Arc::default();
        let sink = Arc::clone(&seen);
        let inner = service_fn(move |outbound: Outbound| {
            let OutboundBody::Frame(frame) = outbound.body else { panic!("unencoded") };
            sink.lock().unwrap().push(frame);
            async { Ok::<_, BoxError>(()) }
        });
        (layer.layer(inner), seen)
    }

    fn json_of(frame: &Frame) -> serde_json::Value {
        match frame {
            Frame::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Frame::Binary(b) => serde_json::from_slice(b).unwrap(),
        }
    }

    #[tokio::test]
    async fn protocol_frames_are_text_with_seq_except_heartbeats() {
        // A msgpack connection (JSON without the `msgpack` feature).
        let (mut service, seen) = recording(EncodeLayer::new(WireFormat::from_query(Some("format=msgpack"))));
        let ready = Envelope::new("server_ready", serde_json::json!({}));
        let pong = wsengine_core::envelope::pong(None, 1);
        let hello = Envelope::new("server_hello", serde_json::json!({}));
        for envelope in [ready, pong, hello] {
            service.ready().await.unwrap().call(Outbound::protocol(envelope)).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter().all(|f| matches!(f, Frame::Text(_))),
            "protocol frames stay JSON text on msgpack connections"
        );
        assert_eq!(json_of(&seen[0])["seq"], 1);
        assert!(json_of(&seen[1]).get("seq").is_none());
        assert_eq!(json_of(&seen[2])["seq"], 2);
    }

    #[tokio::test]
    #[cfg(feature = "compression")]
    async fn large_events_are_compressed_small_ones_are_not() {
        let (mut service, seen) = recording(EncodeLayer::new(WireFormat::Json).compression(1024, 1));
        let big = Envelope::new("report", serde_json::json!({"text": "abc".repeat(1000)}));
        let small = Envelope::new("report", serde_json::json!({"text": "abc"}));
        for envelope in [big, small] {
            service.ready().await.unwrap().call(Outbound::event(envelope)).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        assert!(matches!(&seen[0], Frame::Binary(b) if b.starts_with(b"C:")));
        assert!(matches!(&seen[1], Frame::Binary(b) if b.starts_with(b"{")));
    }

    #[tokio::test]
    #[cfg(not(feature = "compression"))]
    async fn nothing_is_compressed_without_the_compression_feature() {
        let (mut service, seen) = recording(EncodeLayer::new(WireFormat::Json).compression(0, 1));
        let big = Envelope::new("report", serde_json::json!({"text": "abc".repeat(1000)}));
        service.ready().await.unwrap().call(Outbound::event(big.clone())).await.unwrap();
        let publication = Arc::new(Publication::new("t", big));
        service.ready().await.unwrap().call(Outbound::publication(publication)).await.unwrap();
        let seen = seen.lock().unwrap();
        assert!(matches!(&seen[0], Frame::Binary(b) if b.starts_with(b"{")));
        assert!(matches!(&seen[1], Frame::Text(_)));
    }

    #[tokio::test]
    async fn compression_switch_turns_it_off() {
        let switch = Arc::new(AtomicBool::new(false));
        let (mut service, seen) =
            recording(EncodeLayer::new(WireFormat::Json).compression(10, 1).compression_switch(switch));
        let big = Envelope::new("report", serde_json::json!({"text": "abc".repeat(1000)}));
        service.ready().await.unwrap().call(Outbound::event(big)).await.unwrap();
        assert!(matches!(&seen.lock().unwrap()[0], Frame::Binary(b) if b.starts_with(b"{")));
    }

    #[tokio::test]
    async fn publications_share_one_encoding() {
        let (mut a, seen_a) = recording(EncodeLayer::new(WireFormat::Json));
        let (mut b, seen_b) = recording(EncodeLayer::new(WireFormat::Json));
        let publication = Arc::new(Publication::new("t", Envelope::new("tick", serde_json::json!({}))));
        a.ready().await.unwrap().call(Outbound::publication(Arc::clone(&publication))).await.unwrap();
        b.ready().await.unwrap().call(Outbound::publication(publication)).await.unwrap();
        let (Frame::Text(x), Frame::Text(y)) = (&seen_a.lock().unwrap()[0], &seen_b.lock().unwrap()[0]) else {
            panic!("publications are text")
        };
        assert_eq!(x.as_ptr(), y.as_ptr());
        assert!(json_of(&Frame::Text(x.clone())).get("seq").is_none());
    }

    #[tokio::test]
    async fn oversized_messages_are_refused() {
        let (mut service, seen) = recording(EncodeLayer::new(WireFormat::Json));
        let huge = Envelope::new("blob", serde_json::json!({"data": "x".repeat(MAX_OUTBOUND_MESSAGE_SIZE)}));
        let error = service.ready().await.unwrap().call(Outbound::event(huge)).await.unwrap_err();
        assert!(error.is::<TooLarge>());
        assert!(seen.lock().unwrap().is_empty());
    }
}
