//! The connection driver: one task per connection moving messages between the socket, the
//! message stacks and the bus.
//!
//! The driver is generic over any `Stream + Sink` of WebSocket messages, so the same loop
//! serves tungstenite sockets, other transports and in-memory test channels. It polls with a
//! biased select — write queued frames first, then bus deliveries, then inbound reads, then
//! the heartbeat — and coalesces writes: everything queued is fed to the sink, then flushed
//! once.
//!
//! Slow consumers (PROTOCOL.md §10.3) are closed with 1013 `Slow consumer` when either the
//! oldest queued CRITICAL message has waited longer than the queue's grace period, or the
//! queue is under pressure (it had to drop and has not drained to half its limits since) at
//! two consecutive heartbeat ticks. Server pings are CRITICAL, so a consumer that stops
//! reading altogether is closed at most one ping interval plus the grace period after it
//! stopped. The messages of one reply are queued with a shared ordering key, so priorities
//! never reorder them ([`Reply::keep_in_order`]).
//!
//! ```no_run
//! # async fn example(socket: wsengine_services::websocket::Socket, session: wsengine_services::driver::Session) {
//! wsengine_services::driver::run(socket, session).await;
//! # }
//! ```

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tower::util::BoxService;
use tower::{Service, ServiceExt};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use wsengine_core::codes::CloseCode;
use wsengine_core::{ErrorCode, Frame, ProtocolError};

use crate::bus::Bus;
use crate::connection::{Connection, Delivery, DeliveryReceiver, Registry};
use crate::dispatch::DispatchContext;
use crate::message::{BoxError, Inbound, Outbound, Reply, error_reply};
use crate::queue::QueueReader;

/// The inbound stack of one connection.
pub type InboundService = BoxService<Inbound, Reply, BoxError>;
/// The outbound stack of one connection.
pub type OutboundService = BoxService<Outbound, (), BoxError>;

/// Timing of a connection's liveness checks.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// Server `ping` interval; also when idleness and slow consumers are checked.
    pub ping_interval: Duration,
    /// A connection that sent no data frame for this long is closed with 4408.
    pub idle_timeout: Duration,
    /// How long a close handshake may take before the TCP connection is dropped.
    pub close_grace: Duration,
}

impl Default for DriverSettings {
    fn default() -> Self {
        DriverSettings {
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            close_grace: Duration::from_secs(2),
        }
    }
}

/// Engine-wide shutdown state every driver watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    /// Serving.
    Running,
    /// Lame duck: refuse new upgrades and close every connection with this code and reason,
    /// but keep answering HTTP (health checks, API) until shutdown.
    Draining(CloseCode, String),
    /// Close every connection with this code and reason and stop serving.
    Closing(CloseCode, String),
}

impl Shutdown {
    /// The close a connection gets in this state, if any.
    pub fn close(&self) -> Option<(CloseCode, String)> {
        match self {
            Shutdown::Running => None,
            Shutdown::Draining(code, reason) | Shutdown::Closing(code, reason) => Some((*code, reason.clone())),
        }
    }
}

/// Everything a driver needs for one connection.
#[derive(Debug)]
pub struct Session {
    /// The connection's shared state.
    pub connection: Arc<Connection>,
    /// Its inbound stack.
    pub inbound: InboundService,
    /// Its outbound stack.
    pub outbound: OutboundService,
    /// The driver's end of the outbound queue at the bottom of `outbound`.
    pub queue: QueueReader,
    /// Deliveries from the bus, direct sends and broadcasts.
    pub deliveries: DeliveryReceiver,
    /// Engine-wide state (for `server_ready`).
    pub context: Arc<DispatchContext>,
    /// Where the connection registers once `server_ready` is queued.
    pub registry: Arc<Registry>,
    /// Timing.
    pub settings: DriverSettings,
    /// Engine shutdown and drain.
    pub shutdown: watch::Receiver<Shutdown>,
}

/// Inbound frames already buffered that are handled before the replies are written.
const INBOUND_BATCH: usize = 64;

/// Deliveries taken per wake-up before inbound reads get a turn.
const DELIVERY_BATCH: usize = 64;

/// Runs a connection until it closes.
pub async fn run<S, E>(socket: S, session: Session)
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Sink<Message, Error = E> + Unpin,
    E: std::fmt::Display,
{
    let Session {
        connection,
        mut inbound,
        mut outbound,
        queue,
        mut deliveries,
        context,
        registry,
        settings,
        mut shutdown,
    } = session;
    let (mut sink, mut stream) = socket.split();
    let ready = context.server_ready(&connection);
    send(&mut outbound, Outbound::protocol(ready)).await;
    registry.register(Arc::clone(&connection));

    let mut ticker = tokio::time::interval_at(Instant::now() + settings.ping_interval, settings.ping_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_activity = Instant::now();
    let mut pressured_ticks = 0u32;
    let mut needs_flush = false;
    // Fires when the oldest queued CRITICAL message has waited out the grace period; re-armed
    // only when that deadline changes.
    let critical_timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(critical_timer);

    let close: Option<(CloseCode, String)> = loop {
        let critical_deadline = queue.critical_deadline();
        if let Some(deadline) = critical_deadline {
            if critical_timer.deadline() != deadline {
                critical_timer.as_mut().reset(deadline);
            }
        }
        tokio::select! {
            biased;
            written = poll_fn(|cx| poll_write(&mut sink, &queue, &mut needs_flush, cx)),
                if needs_flush || !queue.is_empty() => {
                if let Err(error) = written {
                    tracing::debug!(connection = %connection.id(), %error, "write failed");
                    break None;
                }
            }
            // Ahead of deliveries, so a flood of them cannot postpone the slow-consumer close.
            () = &mut critical_timer, if critical_deadline.is_some() => {
                break Some((CloseCode::TRY_AGAIN_LATER, "Slow consumer".into()));
            }
            delivery = deliveries.recv() => {
                let Some(delivery) = delivery else { break None };
                if let Some(close) = deliver(&mut outbound, delivery).await {
                    break Some(close);
                }
                let mut closing = None;
                for _ in 1..DELIVERY_BATCH {
                    let Ok(delivery) = deliveries.try_recv() else { break };
                    if let Some(close) = deliver(&mut outbound, delivery).await {
                        closing = Some(close);
                        break;
                    }
                }
                if closing.is_some() {
                    break closing;
                }
                // Give inbound one look after a batch so a publisher flood cannot starve reads.
                if let Some(read) = stream.next().now_or_never() {
                    match receive(read, &mut inbound, &mut outbound, &mut last_activity, &mut needs_flush).await {
                        Step::Continue => {}
                        Step::Close(close) => break close,
                    }
                }
            }
            read = stream.next() => {
                let mut step = receive(read, &mut inbound, &mut outbound, &mut last_activity, &mut needs_flush).await;
                // Frames that already arrived are answered before writing, so the replies to a
                // pipelining client share one write instead of one system call each.
                for _ in 1..INBOUND_BATCH {
                    if !matches!(step, Step::Continue) {
                        break;
                    }
                    let Some(read) = stream.next().now_or_never() else { break };
                    step = receive(read, &mut inbound, &mut outbound, &mut last_activity, &mut needs_flush).await;
                }
                if let Step::Close(close) = step {
                    break close;
                }
            }
            _ = ticker.tick() => {
                if last_activity.elapsed() >= settings.idle_timeout {
                    break Some((CloseCode::IDLE_TIMEOUT, "Idle timeout".into()));
                }
                // Expired credentials end the session as failed ones end a handshake (§2.5).
                if connection.expires_at().is_some_and(|at| std::time::SystemTime::now() >= at) {
                    let expired = ProtocolError::new(ErrorCode::AuthFailed, "Token expired");
                    send(&mut outbound, Outbound::protocol(expired.to_envelope())).await;
                    break Some((CloseCode::AUTH_FAILED, "Token expired".into()));
                }
                // PROTOCOL.md §10.3: still not keeping up at two consecutive ticks means 1013.
                if queue.is_under_pressure() {
                    pressured_ticks += 1;
                    if pressured_ticks >= 2 {
                        break Some((CloseCode::TRY_AGAIN_LATER, "Slow consumer".into()));
                    }
                } else {
                    pressured_ticks = 0;
                }
                // Idle or not, the queue's buffers go once it is empty (after this ping).
                queue.release_memory_when_empty();
                let ping = wsengine_core::envelope::server_ping(wsengine_core::time::now_rfc3339());
                send(&mut outbound, Outbound::protocol(ping)).await;
            }
            changed = shutdown.changed() => {
                let close = shutdown.borrow_and_update().close();
                match (changed, close) {
                    (_, Some(close)) => break Some(close),
                    (Err(_), None) => break Some((CloseCode::GOING_AWAY, "server shutting down".into())),
                    (Ok(()), None) => {}
                }
            }
        }
    };

    registry.unregister(connection.id());
    release_subscriptions(&connection, context.bus.as_ref());
    #[cfg(feature = "presence")]
    if let Some(presence) = &context.presence {
        // After the bus unsubscribe: the leave goes to the others, not to this connection.
        presence.release(connection.id());
    }
    if let Some((code, reason)) = close {
        tracing::debug!(connection = %connection.id(), code = code.0, %reason, "closing");
        let goodbye = async {
            // What is already queued still goes out (an error frame before its close, say).
            poll_fn(|cx| poll_write(&mut sink, &queue, &mut needs_flush, cx)).await.ok();
            sink.send(close_message(code, reason)).await.ok();
            // Wait for the client's Close (or anything ending the stream).
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        tokio::time::timeout(settings.close_grace, goodbye).await.ok();
    } else {
        // The peer closed or vanished; answer a Close that tungstenite queued, if any.
        tokio::time::timeout(settings.close_grace, sink.close()).await.ok();
    }
}

/// Sends an authentication failure (PROTOCOL.md §2.5) and closes with 4401 without ever
/// registering the connection or reading its data.
pub async fn reject<S, E>(mut socket: S, error: ProtocolError, close_grace: Duration)
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Sink<Message, Error = E> + Unpin,
{
    let frame = wsengine_core::frame::encode_protocol(&error.to_envelope());
    let goodbye = async {
        socket.feed(Message::from(frame)).await.ok();
        socket.send(close_message(CloseCode::AUTH_FAILED, "Authentication failed".into())).await.ok();
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    tokio::time::timeout(close_grace, goodbye).await.ok();
}

fn close_message(code: CloseCode, reason: String) -> Message {
    Message::Close(Some(CloseFrame { code: WsCloseCode::from(code.0), reason: reason.into() }))
}

enum Step {
    Continue,
    /// End the loop: with a close to send, or `None` when the peer is gone.
    Close(Option<(CloseCode, String)>),
}

async fn receive(
    read: Option<Result<Message, tungstenite::Error>>,
    inbound: &mut InboundService,
    outbound: &mut OutboundService,
    last_activity: &mut Instant,
    needs_flush: &mut bool,
) -> Step {
    let message = match read {
        None => return Step::Close(None),
        Some(Ok(message)) => message,
        Some(Err(error)) => return Step::Close(stream_error_close(error, outbound).await),
    };
    let frame = match message {
        Message::Text(text) => Frame::Text(text),
        Message::Binary(bytes) => Frame::Binary(bytes),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
            // tungstenite queued the Pong; make sure it is flushed promptly.
            *needs_flush = true;
            return Step::Continue;
        }
        Message::Close(_) => {
            *needs_flush = true;
            return Step::Close(None);
        }
    };
    *last_activity = Instant::now();
    let reply = match inbound.ready().await {
        Ok(service) => service.call(Inbound::frame(frame)).await,
        Err(error) => Err(error),
    };
    let mut reply = reply.unwrap_or_else(|error| error_reply(&error));
    reply.keep_in_order();
    for message in reply.messages {
        send(outbound, message).await;
    }
    match reply.close {
        Some(close) => Step::Close(Some(close)),
        None => Step::Continue,
    }
}

/// Maps what the WebSocket layer refused to the close the protocol asks for.
async fn stream_error_close(error: tungstenite::Error, outbound: &mut OutboundService) -> Option<(CloseCode, String)> {
    use tungstenite::Error;
    match error {
        Error::Utf8(_) => Some((CloseCode::INVALID_PAYLOAD, "Invalid UTF-8".into())),
        Error::Capacity(_) => {
            let error = ProtocolError::new(ErrorCode::MessageTooLarge, "Message too large");
            send(outbound, Outbound::protocol(error.to_envelope())).await;
            Some((CloseCode::TOO_BIG, "Message too large".into()))
        }
        Error::Protocol(error) => Some((CloseCode::PROTOCOL, error.to_string())),
        _ => None,
    }
}

async fn deliver(outbound: &mut OutboundService, delivery: Delivery) -> Option<(CloseCode, String)> {
    match delivery {
        Delivery::Publication(publication) => send(outbound, Outbound::publication(publication)).await,
        Delivery::Event(envelope) => send(outbound, Outbound::event(*envelope)).await,
        Delivery::Close(close) => return Some(*close),
    }
    None
}

async fn send(outbound: &mut OutboundService, message: Outbound) {
    let result = match outbound.ready().await {
        Ok(service) => service.call(message).await,
        Err(error) => Err(error),
    };
    if let Err(error) = result {
        tracing::warn!(%error, "outbound message not sent");
    }
}

fn poll_write<K, E>(
    sink: &mut K,
    queue: &QueueReader,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), E>>
where
    K: Sink<Message, Error = E> + Unpin,
{
    // A frame leaves the queue only once the sink has room for it, so dropping this
    // future half way (another select branch won) loses nothing.
    while !queue.is_empty() {
        ready!(Pin::new(&mut *sink).poll_ready(cx))?;
        let Some((frame, _)) = queue.pop() else { break };
        Pin::new(&mut *sink).start_send(Message::from(frame))?;
        *needs_flush = true;
    }
    if *needs_flush {
        ready!(Pin::new(&mut *sink).poll_flush(cx))?;
        *needs_flush = false;
    }
    Poll::Ready(Ok(()))
}

fn release_subscriptions(connection: &Connection, bus: &dyn Bus) {
    let topics = connection.with_subscriptions(std::mem::take);
    for topic in topics {
        bus.unsubscribe(connection.id(), &topic);
    }
}
