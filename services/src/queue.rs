//! The outbound queue: the terminal service of the outbound stack.
//!
//! Encoded frames wait here until the connection driver writes them to the socket. The queue
//! is bounded in bytes and in messages. When it is full, new application data frames are
//! dropped and counted (PROTOCOL.md §10.3) while protocol frames are still accepted, so a slow
//! client costs bounded memory and never stops the heartbeat or error frames.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tower::{Service, ServiceExt};
//! use wsengine_core::Frame;
//! use wsengine_services::message::{Outbound, OutboundBody, OutboundKind};
//! use wsengine_services::queue::OutboundQueue;
//!
//! let (mut queue, reader) = OutboundQueue::new(1024, 16);
//! let frame = Outbound { kind: OutboundKind::Event, priority: 5, body: OutboundBody::Frame(Frame::text("{}")) };
//! queue.ready().await.unwrap().call(frame).await.unwrap();
//! assert_eq!(reader.pop().map(|(f, _)| f), Some(Frame::text("{}")));
//! # });
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower::Service;
use wsengine_core::Frame;

use crate::message::{BoxError, Outbound, OutboundBody, OutboundKind};

/// The outbound stack's terminal service; its [`QueueReader`] is held by the driver.
#[derive(Debug, Clone)]
pub struct OutboundQueue {
    shared: Arc<Shared>,
}

/// The driver's end of an [`OutboundQueue`].
#[derive(Debug, Clone)]
pub struct QueueReader {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    byte_limit: usize,
    message_limit: usize,
    state: Mutex<State>,
    dropped: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<(Frame, OutboundKind)>,
    bytes: usize,
}

/// A message reached the queue without being encoded: a layer that should encode it is missing.
#[derive(Debug)]
pub struct NotEncoded;

impl fmt::Display for NotEncoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("outbound message reached the queue unencoded (is the encode layer missing?)")
    }
}

impl std::error::Error for NotEncoded {}

impl OutboundQueue {
    /// A queue holding at most `byte_limit` bytes and `message_limit` application frames.
    pub fn new(byte_limit: usize, message_limit: usize) -> (OutboundQueue, QueueReader) {
        Self::counting_drops(byte_limit, message_limit, Arc::default())
    }

    /// Like [`OutboundQueue::new`], counting drops in `dropped` (the connection's counter).
    pub fn counting_drops(
        byte_limit: usize,
        message_limit: usize,
        dropped: Arc<AtomicU64>,
    ) -> (OutboundQueue, QueueReader) {
        let shared = Arc::new(Shared { byte_limit, message_limit, state: Mutex::new(State::default()), dropped });
        (OutboundQueue { shared: Arc::clone(&shared) }, QueueReader { shared })
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Service<Outbound> for OutboundQueue {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Never pending: a full queue drops data frames instead, so the driver that both fills
        // and drains this queue can never wait on itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, outbound: Outbound) -> Self::Future {
        let OutboundBody::Frame(frame) = outbound.body else {
            return ready(Err(NotEncoded.into()));
        };
        let mut state = self.shared.state();
        let full = state.bytes >= self.shared.byte_limit || state.frames.len() >= self.shared.message_limit;
        if full && outbound.kind != OutboundKind::Protocol {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return ready(Ok(()));
        }
        state.bytes += frame.len();
        state.frames.push_back((frame, outbound.kind));
        ready(Ok(()))
    }
}

impl QueueReader {
    /// Takes the oldest frame.
    pub fn pop(&self) -> Option<(Frame, OutboundKind)> {
        let mut state = self.shared.state();
        let (frame, kind) = state.frames.pop_front()?;
        state.bytes -= frame.len();
        Some((frame, kind))
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.shared.state().frames.is_empty()
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.shared.state().bytes
    }

    /// Whether the queue is at or above its byte budget.
    pub fn is_over_budget(&self) -> bool {
        self.bytes() >= self.shared.byte_limit
    }

    /// Data frames dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn frame(kind: OutboundKind, text: &str) -> Outbound {
        Outbound { kind, priority: 5, body: OutboundBody::Frame(Frame::text(text)) }
    }

    #[tokio::test]
    async fn fifo_order() {
        let (mut queue, reader) = OutboundQueue::new(1 << 20, 100);
        for text in ["1", "2", "3"] {
            queue.ready().await.unwrap().call(frame(OutboundKind::Event, text)).await.unwrap();
        }
        let order: Vec<_> = std::iter::from_fn(|| reader.pop()).map(|(f, _)| f).collect();
        assert_eq!(order, vec![Frame::text("1"), Frame::text("2"), Frame::text("3")]);
        assert_eq!(reader.bytes(), 0);
    }

    #[tokio::test]
    async fn full_queue_drops_data_but_keeps_protocol_frames() {
        let (mut queue, reader) = OutboundQueue::new(10, 100);
        queue.call(frame(OutboundKind::Publication, "0123456789")).await.unwrap();
        assert!(reader.is_over_budget());
        queue.call(frame(OutboundKind::Event, "dropped")).await.unwrap();
        queue.call(frame(OutboundKind::Publication, "dropped")).await.unwrap();
        queue.call(frame(OutboundKind::Protocol, "kept")).await.unwrap();
        assert_eq!(reader.dropped(), 2);
        let kept: Vec<_> = std::iter::from_fn(|| reader.pop()).map(|(f, _)| f).collect();
        assert_eq!(kept, vec![Frame::text("0123456789"), Frame::text("kept")]);
    }

    #[tokio::test]
    async fn message_cap_applies() {
        let (mut queue, reader) = OutboundQueue::new(1 << 20, 2);
        for _ in 0..5 {
            queue.call(frame(OutboundKind::Event, "x")).await.unwrap();
        }
        assert_eq!(reader.dropped(), 3);
    }

    #[tokio::test]
    async fn unencoded_messages_are_an_error() {
        let (mut queue, _reader) = OutboundQueue::new(10, 10);
        let envelope = wsengine_core::Envelope::new("x", serde_json::json!({}));
        assert!(queue.call(Outbound::event(envelope)).await.is_err());
    }
}
