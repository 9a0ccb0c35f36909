//! An in-memory WebSocket transport for driving real connection drivers with a paused clock.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::{Sink, Stream};
use tokio::sync::mpsc;
use wsengine::services::tungstenite::{Error as WsError, Message};

/// The server's end of an in-memory WebSocket.
pub struct MemorySocket {
    incoming: mpsc::UnboundedReceiver<Result<Message, WsError>>,
    outgoing: mpsc::UnboundedSender<Message>,
    gate: Arc<ReadGate>,
}

/// Whether the client reads; while it does not, the server's sink has no room, exactly like a
/// full TCP send buffer, until the client reads again.
#[derive(Default)]
pub struct ReadGate {
    stopped: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl ReadGate {
    pub fn set_stopped(&self, stopped: bool) {
        self.stopped.store(stopped, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }
}

/// The client's end: what it sends, what the server wrote, and its read gate.
pub struct MemoryEnds {
    pub to_server: mpsc::UnboundedSender<Result<Message, WsError>>,
    pub from_server: mpsc::UnboundedReceiver<Message>,
    pub gate: Arc<ReadGate>,
}

pub fn memory_socket() -> (MemorySocket, MemoryEnds) {
    let (to_server, incoming) = mpsc::unbounded_channel();
    let (outgoing, from_server) = mpsc::unbounded_channel();
    let gate = Arc::new(ReadGate::default());
    (MemorySocket { incoming, outgoing, gate: Arc::clone(&gate) }, MemoryEnds { to_server, from_server, gate })
}

impl Stream for MemorySocket {
    type Item = Result<Message, WsError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_recv(cx)
    }
}

impl Sink<Message> for MemorySocket {
    type Error = WsError;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
        if self.gate.stopped.load(Ordering::SeqCst) { Poll::Pending } else { Poll::Ready(Ok(())) }
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        self.outgoing.send(item).map_err(|_| WsError::ConnectionClosed)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
}
