//! Turns errors of the inbound stack into protocol error frames or close codes.
//!
//! It is the outermost inbound layer, so the connection driver never sees an error: a
//! [`ProtocolError`](wsengine_core::ProtocolError) becomes its `error` frame (and close code,
//! if it carries one), anything else a `SERVER_ERROR` frame (PROTOCOL.md §12.2).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use wsengine_core::{ErrorCode, Frame, ProtocolError};
//! use wsengine_layers::error_to_frame::ErrorToFrameLayer;
//! use wsengine_services::message::{BoxError, Inbound, Reply};
//!
//! let failing = service_fn(|_: Inbound| async {
//!     Err::<Reply, BoxError>(ProtocolError::new(ErrorCode::InvalidRequest, "no").into())
//! });
//! let mut service = ErrorToFrameLayer::new().layer(failing);
//! let reply = service.ready().await.unwrap().call(Inbound::frame(Frame::text("x"))).await.unwrap();
//! assert_eq!(reply.messages.len(), 1);
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::{Layer, Service};
use wsengine_services::message::{BoxError, Reply, error_reply};

/// Applies [`ErrorToFrame`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorToFrameLayer;

impl ErrorToFrameLayer {
    /// The layer.
    pub fn new() -> Self {
        ErrorToFrameLayer
    }
}

impl<S> Layer<S> for ErrorToFrameLayer {
    type Service = ErrorToFrame<S>;

    fn layer(&self, inner: S) -> ErrorToFrame<S> {
        ErrorToFrame { inner }
    }
}

/// Answers errors of the inner service with error frames.
#[derive(Debug, Clone)]
pub struct ErrorToFrame<S> {
    inner: S,
}

impl<S, R> Service<R> for ErrorToFrame<S>
where
    S: Service<R, Response = Reply>,
    S::Error: Into<BoxError>,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = ErrorToFrameFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        ErrorToFrameFuture { inner: self.inner.call(request) }
    }
}

pin_project! {
    /// Response future of [`ErrorToFrame`].
    #[derive(Debug)]
    pub struct ErrorToFrameFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, E> Future for ErrorToFrameFuture<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Reply, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(self.project().inner.poll(cx));
        Poll::Ready(Ok(result.unwrap_or_else(|error| error_reply(&error.into()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_test::mock;
    use wsengine_core::codes::CloseCode;
    use wsengine_core::{ErrorCode, Frame, ProtocolError};
    use wsengine_services::message::{Inbound, OutboundBody};

    fn frame_of(reply: &Reply) -> &wsengine_core::Envelope {
        let OutboundBody::Envelope(envelope) = &reply.messages[0].body else { panic!("expected an envelope") };
        envelope
    }

    /// Runs one request through the layer while the inner mock fails with `error`.
    async fn reply_when_inner_fails(error: impl Into<BoxError>) -> Reply {
        use tower::ServiceExt;
        let (service, mut handle) = mock::pair::<Inbound, Reply>();
        let mut service = ErrorToFrameLayer::new().layer(service);
        handle.allow(1);
        let call = tokio::spawn(async move { service.ready().await?.call(Inbound::frame(Frame::text("{}"))).await });
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_error(error);
        call.await.unwrap().expect("the layer never fails")
    }

    #[tokio::test]
    async fn protocol_errors_become_their_frame_and_close() {
        let error =
            ProtocolError::new(ErrorCode::MessageTooLarge, "Message too large").closing(CloseCode::TOO_BIG, "too big");
        let reply = reply_when_inner_fails(error).await;
        assert_eq!(frame_of(&reply).t, "error");
        assert_eq!(frame_of(&reply).p["code"], "MESSAGE_TOO_LARGE");
        assert_eq!(reply.close, Some((CloseCode::TOO_BIG, "too big".to_owned())));
    }

    #[tokio::test]
    async fn other_errors_become_server_error_without_details() {
        let reply = reply_when_inner_fails(std::io::Error::other("database password is hunter2")).await;
        assert_eq!(frame_of(&reply).p["code"], "SERVER_ERROR");
        assert!(!frame_of(&reply).p.to_string().contains("hunter2"));
        assert!(reply.close.is_none());
    }
}
