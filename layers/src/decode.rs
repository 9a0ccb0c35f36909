//! Decodes inbound frames into envelopes: JSON text, binary JSON, `C:` zlib and msgpack.
//!
//! Follows the receiver's decode order of PROTOCOL.md §3.4 with its hard limits: a frame
//! over the message size limit gets `MESSAGE_TOO_LARGE` and close 1009; a `C:` frame that
//! inflates past the cap (a zlib bomb), malformed zlib and msgpack nested deeper than 64 are
//! dropped with an `INVALID_REQUEST` error frame. `E:` frames pass through untouched for the decrypt layer.
//!
//! Without the `compression` cargo feature every `C:` frame, and without `msgpack` every `M:`
//! frame (also inside `E:`), gets that same `INVALID_REQUEST` frame, naming the missing
//! feature; the connection stays open. Raw msgpack is then raw binary, as on a JSON connection.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use wsengine_core::{Frame, Limits, WireFormat};
//! use wsengine_layers::decode::DecodeLayer;
//! use wsengine_services::message::{BoxError, Inbound, InboundBody, Reply};
//!
//! let inner = service_fn(|inbound: Inbound| async move {
//!     assert!(matches!(inbound.body, InboundBody::Message(_)));
//!     Ok::<_, BoxError>(Reply::none())
//! });
//! let mut service = DecodeLayer::new(Limits::default(), WireFormat::Json).layer(inner);
//! service.ready().await.unwrap().call(Inbound::frame(Frame::text(r#"{"t":"hi"}"#))).await.unwrap();
//! # });
//! ```

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tower::{Layer, Service};
use wsengine_core::codes::CloseCode;
use wsengine_core::frame::{decode_frame, decode_plaintext};
use wsengine_core::{DecodeError, ErrorCode, Limits, ProtocolError, WireFormat};
use wsengine_services::message::{BoxError, Inbound, InboundBody, Reply};

/// Applies [`Decode`].
#[derive(Debug, Clone)]
pub struct DecodeLayer {
    limits: Limits,
    format: WireFormat,
}

impl DecodeLayer {
    /// Decoding with `limits` for a connection of `format`.
    pub fn new(limits: Limits, format: WireFormat) -> Self {
        DecodeLayer { limits, format }
    }
}

impl<S> Layer<S> for DecodeLayer {
    type Service = Decode<S>;

    fn layer(&self, inner: S) -> Decode<S> {
        Decode { inner, limits: self.limits.clone(), format: self.format }
    }
}

/// Decodes [`InboundBody::Frame`] bodies (and decrypted plaintext) before the inner service.
#[derive(Debug, Clone)]
pub struct Decode<S> {
    inner: S,
    limits: Limits,
    format: WireFormat,
}

impl<S> Service<Inbound> for Decode<S>
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
        let decoded = match &inbound.body {
            InboundBody::Frame(frame) => decode_frame(frame, self.format, &self.limits),
            // A decrypt layer hands over the plaintext of an `E:` frame as binary.
            InboundBody::RawBinary(plaintext) if inbound.encrypted => decode_plaintext(plaintext, &self.limits),
            _ => return Either::Right(self.inner.call(inbound)),
        };
        match decoded {
            Ok(decoded) => {
                inbound.body = decoded.into();
                Either::Right(self.inner.call(inbound))
            }
            Err(DecodeError::TooLarge { .. }) => {
                Either::Left(ready(Err(ProtocolError::new(ErrorCode::MessageTooLarge, "Message too large")
                    .closing(CloseCode::TOO_BIG, "Message too large")
                    .into())))
            }
            Err(error) => {
                // PROTOCOL.md §3.4 drops undecodable `C:`/`M:` frames; the engine also tells
                // the client why (an error frame, connection kept), which no client minds.
                tracing::debug!(%error, "inbound frame dropped");
                let message = format!("Frame dropped: {error}");
                Either::Left(ready(Err(ProtocolError::new(ErrorCode::InvalidRequest, message).into())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tower::{ServiceExt, service_fn};
    use wsengine_core::Frame;

    type Seen = Arc<Mutex<Vec<InboundBody>>>;

    fn recording(format: WireFormat) -> (impl Service<Inbound, Response = Reply, Error = BoxError>, Seen) {
        let seen: Seen = Arc::default();
        let sink = Arc::clone(&seen);
        let inner = service_fn(move |inbound: Inbound| {
            sink.lock().unwrap().push(inbound.body);
            async { Ok::<_, BoxError>(Reply::none()) }
        });
        (DecodeLayer::new(Limits::default(), format).layer(inner), seen)
    }

    #[tokio::test]
    #[cfg(feature = "compression")]
    async fn json_text_and_compressed_frames_decode_to_messages() {
        let (mut service, seen) = recording(WireFormat::Json);
        let compressed = wsengine_core::frame::compress(br#"{"t":"zipped"}"#, 6);
        for frame in [Frame::text(r#"{"t":"plain"}"#), Frame::Binary(compressed.into())] {
            service.ready().await.unwrap().call(Inbound::frame(frame)).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        let types: Vec<_> = seen
            .iter()
            .map(|b| match b {
                InboundBody::Message(m) => m.t().unwrap().to_owned(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(types, ["plain", "zipped"]);
    }

    #[tokio::test]
    async fn oversized_frames_close_with_1009() {
        let (mut service, seen) = recording(WireFormat::Json);
        let big = Frame::text("x".repeat(Limits::default().max_message_size + 1));
        let error = service.ready().await.unwrap().call(Inbound::frame(big)).await.unwrap_err();
        let error = error.downcast::<ProtocolError>().unwrap();
        assert_eq!(error.code(), ErrorCode::MessageTooLarge);
        assert_eq!(error.close().map(|(c, _)| c), Some(CloseCode::TOO_BIG));
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    #[cfg(all(feature = "compression", feature = "msgpack"))]
    async fn bombs_and_deep_msgpack_are_refused_with_an_error() {
        let (mut service, seen) = recording(WireFormat::MsgPack);
        let bomb = wsengine_core::frame::compress(&vec![b' '; 8 << 20], 9);
        let mut deep = b"M:".to_vec();
        deep.extend(std::iter::repeat_n(0x91u8, 1000));
        deep.push(0xc0);
        for frame in [Frame::Binary(bomb.into()), Frame::Binary(deep.into())] {
            let error = service.ready().await.unwrap().call(Inbound::frame(frame)).await.unwrap_err();
            let error = error.downcast::<ProtocolError>().unwrap();
            assert_eq!(error.code(), ErrorCode::InvalidRequest);
            assert!(error.close().is_none());
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    /// The error the decode layer answers `frame` with.
    #[cfg(any(not(feature = "compression"), not(feature = "msgpack")))]
    async fn refusal(frame: Frame, encrypted: bool) -> ProtocolError {
        let (mut service, seen) = recording(WireFormat::from_query(Some("format=msgpack")));
        let inbound = if encrypted {
            let mut inbound = Inbound::frame(frame.clone());
            inbound.body = InboundBody::RawBinary(bytes::Bytes::copy_from_slice(frame.as_bytes()));
            inbound.encrypted = true;
            inbound
        } else {
            Inbound::frame(frame)
        };
        let error = service.ready().await.unwrap().call(inbound).await.unwrap_err();
        assert!(seen.lock().unwrap().is_empty());
        *error.downcast::<ProtocolError>().unwrap()
    }

    #[tokio::test]
    #[cfg(not(feature = "compression"))]
    async fn compressed_frames_get_invalid_request_without_the_compression_feature() {
        // zlib of {"t":"chat"} in one stored block.
        let valid = b"C:\x78\x01\x01\x0c\x00\xf3\xff{\"t\":\"chat\"}\x17\xb9\x03\xcf";
        for frame in [&valid[..], b"C:garbage"] {
            let error = refusal(Frame::Binary(bytes::Bytes::copy_from_slice(frame)), false).await;
            assert_eq!(error.code(), ErrorCode::InvalidRequest);
            assert!(error.close().is_none(), "the connection is kept");
            assert!(error.message().contains("`compression` feature"), "{}", error.message());
        }
    }

    #[tokio::test]
    #[cfg(not(feature = "msgpack"))]
    async fn msgpack_frames_get_invalid_request_without_the_msgpack_feature() {
        let prefixed = Frame::Binary(bytes::Bytes::from_static(b"M:\x81\xa1t\xa4chat"));
        for encrypted in [false, true] {
            let error = refusal(prefixed.clone(), encrypted).await;
            assert_eq!(error.code(), ErrorCode::InvalidRequest);
            assert!(error.close().is_none(), "the connection is kept");
            assert!(error.message().contains("`msgpack` feature"), "{}", error.message());
        }
        // Raw msgpack on a `format=msgpack` connection is raw binary, for the application.
        let (mut service, seen) = recording(WireFormat::from_query(Some("format=msgpack")));
        let raw = Frame::Binary(bytes::Bytes::from_static(b"\x81\xa1t\xa4chat"));
        service.ready().await.unwrap().call(Inbound::frame(raw)).await.unwrap();
        assert!(matches!(seen.lock().unwrap()[0], InboundBody::RawBinary(_)));
    }

    #[tokio::test]
    async fn encrypted_frames_pass_through() {
        let (mut service, seen) = recording(WireFormat::Json);
        let frame = Frame::Binary(bytes::Bytes::from(vec![b'E', b':', 0, 1, 2]));
        service.ready().await.unwrap().call(Inbound::frame(frame)).await.unwrap();
        assert!(matches!(seen.lock().unwrap()[0], InboundBody::Encrypted(_)));
    }
}
