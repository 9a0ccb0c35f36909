//! The outbound priority queue: the terminal service of the outbound stack.
//!
//! Encoded frames wait here until the connection driver writes them to the socket. The queue
//! has five levels (PROTOCOL.md §4.1 `pri`): CRITICAL 10, HIGH 8, NORMAL 5, LOW 3 and
//! BACKGROUND 1; any other `pri` counts as the nearest level at or below it
//! ([`priority::level`]), and protocol frames are always CRITICAL.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tower::ServiceExt;
//! use wsengine_core::Frame;
//! use wsengine_services::message::{Order, Outbound, OutboundBody, OutboundKind, priority};
//! use wsengine_services::queue::{OutboundQueue, QueueLimits};
//!
//! let (queue, reader) = OutboundQueue::new(QueueLimits::default());
//! for (pri, text) in [(priority::LOW, "later"), (priority::HIGH, "first")] {
//!     let frame = Outbound { kind: OutboundKind::Event, priority: pri, body: OutboundBody::Frame(Frame::text(text)), order: Order::default() };
//!     queue.clone().oneshot(frame).await.unwrap();
//! }
//! assert_eq!(reader.pop().map(|(f, _)| f), Some(Frame::text("first")));
//! assert_eq!(reader.pop().map(|(f, _)| f), Some(Frame::text("later")));
//! # });
//! ```
//!
//! # Budget and drops (PROTOCOL.md §10.3)
//!
//! Each connection's queue holds at most [`QueueLimits::bytes`] bytes and
//! [`QueueLimits::messages`] messages. A message that does not fit evicts queued messages of
//! strictly lower priority, lowest level first and oldest first within a level, until it fits;
//! if even evicting all of them would not make room, the new message is dropped instead (and
//! nothing is evicted for it). Every dropped or evicted message is counted in the connection's
//! drop counter. CRITICAL messages are never dropped: they evict what they can and are queued
//! even over the budget.
//!
//! # Order (PROTOCOL.md §5.3)
//!
//! The highest level goes first, FIFO within a level, with one exception: a message is never
//! sent while an earlier-queued message sharing one of its ordering keys ([`Order`]) is still
//! queued. A topic's publications share the topic's key, so offsets stay in order on the wire;
//! the messages of one reply share a reply key, so an acknowledgement never overtakes the
//! replays or snapshot events it concludes. When the head of the highest level is held back
//! that way, the message holding it back is sent first (priority inheritance: it has to go
//! before the important message anyway, so it goes now rather than after everything of its own
//! level). A consequence worth knowing: nothing queued after a CRITICAL message leaves before
//! it, so `server_ready` stays first and `server_hello` precedes every `E:` frame.
//!
//! # Cost
//!
//! Levels are `VecDeque`s and each ordering key keeps the queue positions of its waiting
//! messages in order (inline for the first, so a key with one waiting message allocates
//! nothing). Enqueue and dequeue are O(1) when nothing is held back; following a held-back head
//! to what holds it costs a binary search per step, and a chain of steps visits each key at
//! most once (every step goes to a strictly older message that is the oldest of its key), so
//! it is bounded by the number of queued multi-key (reply) messages, not by the number of
//! topics. Evicting a message that is not the oldest of its key costs a binary search and a
//! shift within that key's positions. Messages taken from the middle of a level leave a
//! tombstone that is skipped at the front and compacted away once tombstones outnumber live
//! entries. `cargo bench --bench priority_queue` measures these cases. Buffers are allocated on
//! first use and kept while the connection is busy; [`QueueReader::release_memory_when_empty`]
//! (called by the driver at every heartbeat) frees them, so an idle connection's queue holds no
//! heap memory.
//!
//! [`priority::level`]: crate::message::priority::level

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Ready, ready};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::Service;
use wsengine_core::Frame;

use crate::connection::Connection;
use crate::message::{BoxError, Order, OrderKey, Outbound, OutboundBody, OutboundKind, priority};

/// The size limits and slow-consumer grace of one connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Byte budget (`outbound_queue_bytes`, default 16 MiB).
    pub bytes: usize,
    /// Message cap (`outbound_queue_messages`, default 4096).
    pub messages: usize,
    /// How long a CRITICAL message may wait before the consumer counts as too slow and is
    /// closed with 1013 (`critical_grace`, default 10 s).
    pub critical_grace: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits { bytes: 16 << 20, messages: 4096, critical_grace: Duration::from_secs(10) }
    }
}

/// The size of a connection's queue, readable without the queue (for connection info).
///
/// [`OutboundQueue::for_connection`] keeps it in `Connection::shared::<QueueGauge>()`.
#[derive(Debug, Default)]
pub struct QueueGauge {
    bytes: AtomicUsize,
    messages: AtomicUsize,
}

impl QueueGauge {
    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Messages queued.
    pub fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }
}

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
    limits: QueueLimits,
    state: Mutex<State>,
    dropped: Arc<AtomicU64>,
    gauge: Arc<QueueGauge>,
}

/// Number of levels; index 0 is BACKGROUND, [`CRITICAL_LEVEL`] the top.
const LEVELS: usize = 5;
const CRITICAL_LEVEL: usize = LEVELS - 1;

/// Tombstones tolerated in a level beyond its live entries before it is compacted.
const TOMBSTONE_SLACK: usize = 32;

fn level_index(kind: OutboundKind, pri: u8) -> usize {
    if kind == OutboundKind::Protocol {
        return CRITICAL_LEVEL;
    }
    match priority::level(pri) {
        priority::CRITICAL => CRITICAL_LEVEL,
        priority::HIGH => 3,
        priority::NORMAL => 2,
        priority::LOW => 1,
        _ => 0,
    }
}

/// Ordering keys are already hashes (keyed topic hashes) or counters, so a cheap mixing hasher
/// does for the map.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as u64);
    }
}

type Lines = HashMap<OrderKey, Line, BuildHasherDefault<KeyHasher>>;

#[derive(Debug, Default)]
struct State {
    /// Boxed so that an idle connection's queue is small; `None` until the first message.
    levels: Option<Box<[Level; LEVELS]>>,
    /// Per ordering key, where its waiting messages are, oldest first.
    lines: Lines,
    next_seq: u64,
    bytes: usize,
    len: usize,
    /// Set by a drop (or by CRITICAL messages over the budget); cleared once the queue drains
    /// to half its limits.
    pressure: bool,
    /// Free the buffers the next time the queue is empty.
    release: bool,
}

#[derive(Debug, Default)]
struct Level {
    /// In enqueue order, so sorted by `seq`; the front is always live.
    slots: VecDeque<Slot>,
    live: usize,
    bytes: usize,
}

#[derive(Debug)]
struct Slot {
    seq: u64,
    /// `None` once taken out of the middle of its level (a tombstone).
    message: Option<Queued>,
}

#[derive(Debug)]
struct Queued {
    frame: Frame,
    kind: OutboundKind,
    order: Order,
    /// When a CRITICAL message was queued (the grace period runs from here).
    since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Place {
    seq: u64,
    level: usize,
}

#[derive(Debug)]
struct Line {
    oldest: Place,
    rest: VecDeque<Place>,
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
    /// A queue with these limits, with its own drop counter.
    pub fn new(limits: QueueLimits) -> (OutboundQueue, QueueReader) {
        Self::build(limits, Arc::default(), Arc::default())
    }

    /// The queue of `connection`: drops count in its drop counter and the queue's size shows
    /// in its shared [`QueueGauge`].
    pub fn for_connection(connection: &Connection, limits: QueueLimits) -> (OutboundQueue, QueueReader) {
        Self::build(limits, connection.drop_counter(), connection.shared::<QueueGauge>())
    }

    fn build(limits: QueueLimits, dropped: Arc<AtomicU64>, gauge: Arc<QueueGauge>) -> (OutboundQueue, QueueReader) {
        // A new connection's first frames (`server_ready`) leave no buffers behind either.
        let state = State { release: true, ..State::default() };
        let shared = Arc::new(Shared { limits, state: Mutex::new(state), dropped, gauge });
        (OutboundQueue { shared: Arc::clone(&shared) }, QueueReader { shared })
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauge(&self, state: &State) {
        self.gauge.bytes.store(state.bytes, Ordering::Relaxed);
        self.gauge.messages.store(state.len, Ordering::Relaxed);
    }
}

impl Service<Outbound> for OutboundQueue {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Never pending: the driver both fills and drains this queue from one task, so waiting
        // for room here would wait on itself. A full queue drops by priority instead.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, outbound: Outbound) -> Self::Future {
        let OutboundBody::Frame(frame) = outbound.body else {
            return ready(Err(NotEncoded.into()));
        };
        let level = level_index(outbound.kind, outbound.priority);
        let mut state = self.shared.state();
        let drops = state.push(&self.shared.limits, level, frame, outbound.kind, outbound.order);
        self.shared.update_gauge(&state);
        drop(state);
        if drops > 0 {
            self.shared.dropped.fetch_add(drops, Ordering::Relaxed);
        }
        ready(Ok(()))
    }
}

impl State {
    fn lane(&self, level: usize) -> Option<&Level> {
        self.levels.as_deref().map(|levels| &levels[level])
    }

    fn fits(&self, size: usize, limits: &QueueLimits) -> bool {
        self.bytes.saturating_add(size) <= limits.bytes && self.len < limits.messages
    }

    /// Queues a message, evicting lower levels as needed; returns how many messages were
    /// dropped (evicted ones plus the new one if it did not fit).
    fn push(&mut self, limits: &QueueLimits, level: usize, frame: Frame, kind: OutboundKind, order: Order) -> u64 {
        let size = frame.len();
        let mut drops = 0;
        if !self.fits(size, limits) {
            self.pressure = true;
            let critical = level == CRITICAL_LEVEL;
            let lower = self.levels.as_deref().map_or(&[][..], |levels| &levels[..level]);
            let lower_bytes: usize = lower.iter().map(|l| l.bytes).sum();
            let lower_len: usize = lower.iter().map(|l| l.live).sum();
            let room_after_eviction = (self.bytes - lower_bytes).saturating_add(size) <= limits.bytes
                && self.len - lower_len < limits.messages;
            if critical || room_after_eviction {
                for index in 0..level {
                    while !self.fits(size, limits) && self.lane(index).is_some_and(|lane| lane.live > 0) {
                        self.remove(index, 0);
                        drops += 1;
                    }
                }
            }
            if !critical && !self.fits(size, limits) {
                return drops + 1;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let place = Place { seq, level };
        for key in order.keys() {
            match self.lines.entry(key) {
                Entry::Vacant(vacant) => {
                    vacant.insert(Line { oldest: place, rest: VecDeque::new() });
                }
                Entry::Occupied(occupied) => occupied.into_mut().rest.push_back(place),
            }
        }
        let since = (level == CRITICAL_LEVEL).then(Instant::now);
        let lane = &mut self.levels.get_or_insert_with(Box::default)[level];
        lane.slots.push_back(Slot { seq, message: Some(Queued { frame, kind, order, since }) });
        lane.live += 1;
        lane.bytes += size;
        self.len += 1;
        self.bytes += size;
        if self.bytes > limits.bytes || self.len > limits.messages {
            self.pressure = true;
        }
        drops
    }

    /// The next message to send: the head of the highest level, or what holds it back.
    fn pop(&mut self, limits: &QueueLimits) -> Option<Queued> {
        let top = (0..LEVELS).rev().find(|&level| self.lane(level).is_some_and(|lane| lane.live > 0))?;
        let mut place = Place { seq: self.lane(top)?.slots.front()?.seq, level: top };
        let mut index = 0;
        // Each step goes to a strictly older message (the oldest of one of this message's
        // keys), so this ends, at the latest at the oldest message in the queue.
        while let Some(blocker) = self.blocker(place, index) {
            match self.find(blocker) {
                Some(found) => {
                    place = blocker;
                    index = found;
                }
                None => {
                    debug_assert!(false, "ordering line points at a message that is not queued");
                    break;
                }
            }
        }
        let queued = self.remove(place.level, index);
        if self.bytes <= limits.bytes / 2 && self.len <= limits.messages / 2 {
            self.pressure = false;
        }
        queued
    }

    /// The oldest waiting message that shares a key with the message at `place` and is not it.
    fn blocker(&self, place: Place, index: usize) -> Option<Place> {
        let queued = self.lane(place.level)?.slots.get(index)?.message.as_ref()?;
        queued.order.keys().find_map(|key| {
            let oldest = self.lines.get(&key)?.oldest;
            (oldest.seq != place.seq).then_some(oldest)
        })
    }

    fn find(&self, place: Place) -> Option<usize> {
        let slots = &self.lane(place.level)?.slots;
        if slots.front()?.seq == place.seq {
            return Some(0);
        }
        slots.binary_search_by_key(&place.seq, |slot| slot.seq).ok()
    }

    /// Takes the message at `index` of `level` out of the queue and its ordering lines.
    fn remove(&mut self, level: usize, index: usize) -> Option<Queued> {
        let lane = &mut self.levels.as_deref_mut()?[level];
        let slot = lane.slots.get_mut(index)?;
        let seq = slot.seq;
        let queued = slot.message.take()?;
        let size = queued.frame.len();
        lane.live -= 1;
        lane.bytes -= size;
        if index == 0 {
            // Keep the front live so the head of a level is always a message.
            while lane.slots.front().is_some_and(|slot| slot.message.is_none()) {
                lane.slots.pop_front();
            }
        } else if lane.slots.len() > 2 * lane.live + TOMBSTONE_SLACK {
            lane.slots.retain(|slot| slot.message.is_some());
        }
        self.len -= 1;
        self.bytes -= size;
        for key in queued.order.keys() {
            self.leave_line(key, seq);
        }
        if self.len == 0 && self.release {
            self.free_buffers();
        }
        Some(queued)
    }

    fn free_buffers(&mut self) {
        self.levels = None;
        self.lines = Lines::default();
        self.release = false;
    }

    fn leave_line(&mut self, key: OrderKey, seq: u64) {
        let Entry::Occupied(mut entry) = self.lines.entry(key) else { return };
        let line = entry.get_mut();
        if line.oldest.seq == seq {
            match line.rest.pop_front() {
                Some(next) => line.oldest = next,
                None => {
                    entry.remove();
                }
            }
        } else if let Ok(position) = line.rest.binary_search_by_key(&seq, |place| place.seq) {
            line.rest.remove(position);
        }
    }

    fn critical_since(&self) -> Option<Instant> {
        self.lane(CRITICAL_LEVEL)?.slots.front()?.message.as_ref()?.since
    }
}

impl QueueReader {
    /// Takes the next frame to send (see the module documentation for the order).
    pub fn pop(&self) -> Option<(Frame, OutboundKind)> {
        let mut state = self.shared.state();
        let queued = state.pop(&self.shared.limits)?;
        self.shared.update_gauge(&state);
        Some((queued.frame, queued.kind))
    }

    /// Frees the queue's buffers now if it is empty, or else as soon as it next becomes
    /// empty. Buffers are kept between messages so a busy connection does not allocate per
    /// message; the driver calls this at every heartbeat tick, so an idle connection's queue
    /// holds no heap memory.
    pub fn release_memory_when_empty(&self) {
        let mut state = self.shared.state();
        if state.len == 0 {
            state.free_buffers();
        }
        // Also after what comes next (the heartbeat's own ping).
        state.release = true;
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.shared.state().len == 0
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.shared.state().len
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.shared.state().bytes
    }

    /// The queue's limits.
    pub fn limits(&self) -> QueueLimits {
        self.shared.limits
    }

    /// Whether the consumer is not keeping up: the queue has dropped a message (or holds
    /// CRITICAL messages beyond its limits) and has not drained to half its limits since.
    /// The driver closes a connection that is under pressure at two consecutive heartbeat
    /// ticks with 1013 (PROTOCOL.md §10.3).
    pub fn is_under_pressure(&self) -> bool {
        self.shared.state().pressure
    }

    /// When the oldest waiting CRITICAL message will have waited longer than the grace period;
    /// `None` while no CRITICAL message waits. The driver closes the connection with 1013 then.
    pub fn critical_deadline(&self) -> Option<Instant> {
        let since = self.shared.state().critical_since()?;
        Some(since + self.shared.limits.critical_grace)
    }

    /// Messages dropped so far (by this queue, and anything else sharing its counter).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Reply;
    use tower::ServiceExt;
    use wsengine_core::Envelope;

    fn event(pri: u8, text: &str) -> Outbound {
        Outbound {
            kind: OutboundKind::Event,
            priority: pri,
            body: OutboundBody::Frame(Frame::text(text)),
            order: Order::default(),
        }
    }

    fn publication(topic: &str, pri: u8, text: &str) -> Outbound {
        Outbound {
            kind: OutboundKind::Publication,
            order: Order { stream: Some(OrderKey::topic(topic)), reply: None },
            ..event(pri, text)
        }
    }

    fn protocol(text: &str) -> Outbound {
        Outbound { kind: OutboundKind::Protocol, ..event(priority::CRITICAL, text) }
    }

    fn limits(bytes: usize, messages: usize) -> QueueLimits {
        QueueLimits { bytes, messages, ..QueueLimits::default() }
    }

    async fn push(queue: &OutboundQueue, messages: impl IntoIterator<Item = Outbound>) {
        for message in messages {
            queue.clone().oneshot(message).await.unwrap();
        }
    }

    fn drain(reader: &QueueReader) -> Vec<String> {
        std::iter::from_fn(|| reader.pop()).map(|(frame, _)| String::from_utf8_lossy(frame.as_bytes()).into()).collect()
    }

    fn allocated(reader: &QueueReader) -> usize {
        let state = reader.shared.state();
        let levels = state.levels.as_deref().map_or(0, |l| 1 + l.iter().map(|l| l.slots.capacity()).sum::<usize>());
        levels + state.lines.capacity()
    }

    #[tokio::test]
    async fn higher_levels_go_first() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        push(
            &queue,
            [event(1, "background"), event(3, "low"), event(5, "normal"), event(8, "high"), event(10, "critical")],
        )
        .await;
        assert_eq!(drain(&reader), ["critical", "high", "normal", "low", "background"]);
        assert_eq!((reader.bytes(), reader.len()), (0, 0));
    }

    #[tokio::test]
    async fn other_pri_values_count_as_the_level_at_or_below() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        // 9 is HIGH, 7 NORMAL, 4 LOW, 0 BACKGROUND, 255 CRITICAL; ties keep their order.
        push(&queue, [event(0, "bg"), event(4, "low"), event(3, "low2"), event(7, "normal"), event(9, "high")]).await;
        push(&queue, [event(8, "high2"), event(255, "critical")]).await;
        assert_eq!(drain(&reader), ["critical", "high", "high2", "normal", "low", "low2", "bg"]);
    }

    #[tokio::test]
    async fn protocol_frames_are_critical_whatever_their_priority() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        push(&queue, [event(8, "high"), Outbound { priority: 1, ..protocol("pong") }]).await;
        assert_eq!(drain(&reader), ["pong", "high"]);
    }

    #[tokio::test]
    async fn fifo_within_a_level() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        push(&queue, (0..50).map(|n| event(5, &n.to_string()))).await;
        let expected: Vec<String> = (0..50).map(|n| n.to_string()).collect();
        assert_eq!(drain(&reader), expected);
    }

    #[tokio::test]
    async fn a_full_queue_drops_lowest_priority_oldest_first_and_counts() {
        let (queue, reader) = OutboundQueue::new(limits(1 << 20, 4));
        push(&queue, [event(1, "bg-a"), event(3, "low-b"), event(5, "normal-c"), event(1, "bg-d")]).await;
        assert_eq!(reader.dropped(), 0);
        assert!(!reader.is_under_pressure());
        // Each HIGH message evicts the oldest BACKGROUND one.
        push(&queue, [event(8, "high-e"), event(8, "high-f")]).await;
        assert_eq!(reader.dropped(), 2);
        // Nothing below LOW is left: a LOW message does not fit and is dropped itself,
        // and it never evicts its own level.
        push(&queue, [event(3, "low-g")]).await;
        assert_eq!(reader.dropped(), 3);
        assert!(reader.is_under_pressure());
        // NORMAL evicts LOW before anything of its own level.
        push(&queue, [event(5, "normal-h")]).await;
        assert_eq!(reader.dropped(), 4);
        assert_eq!(drain(&reader), ["high-e", "high-f", "normal-c", "normal-h"]);
        assert!(!reader.is_under_pressure(), "drained below half the limits");
    }

    #[tokio::test]
    async fn the_byte_budget_applies_and_evicts_only_when_that_makes_room() {
        let (queue, reader) = OutboundQueue::new(limits(10, 100));
        push(&queue, [event(1, "aaaa"), event(5, "bbbb")]).await;
        // Too big even if all BACKGROUND went: dropped without evicting anything.
        push(&queue, [event(3, "cccccccc")]).await;
        assert_eq!((reader.dropped(), reader.bytes()), (1, 8));
        // Fits once the BACKGROUND message goes.
        push(&queue, [event(3, "cccccc")]).await;
        assert_eq!((reader.dropped(), reader.bytes()), (2, 10));
        assert_eq!(drain(&reader), ["bbbb", "cccccc"]);
    }

    #[tokio::test]
    async fn critical_messages_are_never_dropped() {
        let (queue, reader) = OutboundQueue::new(limits(1 << 20, 2));
        push(&queue, [event(5, "a"), event(5, "b")]).await;
        push(&queue, [protocol("ping-1"), event(10, "critical-event"), protocol("ping-2")]).await;
        // Two data messages made room for two; the third CRITICAL one is queued over the cap.
        assert_eq!(reader.dropped(), 2);
        assert_eq!(reader.len(), 3);
        assert!(reader.is_under_pressure());
        push(&queue, [event(8, "high")]).await;
        assert_eq!(reader.dropped(), 3, "nothing evicts CRITICAL messages");
        assert_eq!(drain(&reader), ["ping-1", "critical-event", "ping-2"]);
    }

    #[tokio::test]
    async fn a_topic_keeps_its_order_across_priorities() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        push(&queue, [publication("a", 3, "a-1 low"), publication("b", 5, "b-1 normal"), event(5, "event normal")])
            .await;
        push(&queue, [publication("a", 8, "a-2 high"), publication("a", 3, "a-3 low")]).await;
        // a-2 waits for a-1, which goes first because a-2 needs it gone (priority inheritance).
        assert_eq!(drain(&reader), ["a-1 low", "a-2 high", "b-1 normal", "event normal", "a-3 low"]);
    }

    #[tokio::test]
    async fn broadcasts_keep_their_order() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        let broadcast = |pri, text| Outbound {
            kind: OutboundKind::Publication,
            order: Order { stream: Some(OrderKey::broadcast()), reply: None },
            ..event(pri, text)
        };
        push(&queue, [broadcast(1, "first"), event(5, "event"), broadcast(10, "second")]).await;
        assert_eq!(drain(&reader), ["first", "second", "event"]);
    }

    #[tokio::test]
    async fn a_replys_acknowledgement_does_not_overtake_its_replays() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        push(&queue, [event(8, "earlier high event")]).await;
        let mut reply = Reply::none();
        reply.push(publication("a", 3, "replay a-1"));
        reply.push(publication("b", 1, "replay b-1"));
        reply.push(protocol("ack"));
        reply.keep_in_order();
        push(&queue, reply.messages).await;
        push(&queue, [publication("a", 8, "live a-2"), protocol("pong")]).await;
        assert_eq!(
            drain(&reader),
            ["replay a-1", "replay b-1", "ack", "pong", "earlier high event", "live a-2"],
            "the ack and everything CRITICAL after it wait for the replays; live a-2 for replay a-1"
        );
    }

    #[tokio::test]
    async fn snapshot_complete_follows_its_snapshot_events() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        let mut reply = Reply::none();
        for n in 0..3 {
            reply.push(Outbound::event(Envelope::new("snap", serde_json::json!({"n": n}))));
        }
        reply.push(Outbound::protocol(Envelope::new("snapshot_complete", serde_json::json!({}))));
        reply.keep_in_order();
        let encoded = reply.messages.into_iter().map(|mut m| {
            let text = m.message_type().unwrap().to_owned();
            m.body = OutboundBody::Frame(Frame::text(text));
            m
        });
        push(&queue, encoded).await;
        assert_eq!(drain(&reader), ["snap", "snap", "snap", "snapshot_complete"]);
    }

    #[tokio::test]
    async fn an_event_joined_to_a_topic_stream_is_not_overtaken_by_its_publications() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        let snapshot = event(1, "snapshot of a").in_stream(OrderKey::topic("a"));
        push(&queue, [snapshot, publication("b", 8, "live b"), publication("a", 8, "live a")]).await;
        assert_eq!(drain(&reader), ["live b", "snapshot of a", "live a"]);
    }

    #[tokio::test]
    async fn an_evicted_message_no_longer_holds_its_topic_back() {
        let (queue, reader) = OutboundQueue::new(limits(1 << 20, 2));
        push(&queue, [publication("a", 1, "a-1"), publication("a", 8, "a-2")]).await;
        push(&queue, [event(5, "normal")]).await;
        assert_eq!(reader.dropped(), 1);
        assert_eq!(drain(&reader), ["a-2", "normal"]);
    }

    #[tokio::test]
    async fn many_held_back_heads_stay_cheap_and_compact() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        let topics: Vec<String> = (0..1000).map(|n| format!("t{n}")).collect();
        push(&queue, topics.iter().map(|t| publication(t, 1, &format!("{t} old")))).await;
        // Newest topic first, so each HIGH head is held back by a message deep inside BACKGROUND.
        push(&queue, topics.iter().rev().map(|t| publication(t, 8, &format!("{t} new")))).await;
        let mut expected = Vec::new();
        for t in topics.iter().rev() {
            expected.push(format!("{t} old"));
            expected.push(format!("{t} new"));
        }
        for (n, pair) in expected.chunks(2).enumerate() {
            assert_eq!(
                [reader.pop().unwrap().0, reader.pop().unwrap().0],
                [Frame::text(&pair[0]), Frame::text(&pair[1])]
            );
            // Messages taken from the middle of BACKGROUND leave tombstones, compacted as they pile up.
            let state = reader.shared.state();
            if let Some(background) = state.lane(0) {
                assert!(background.slots.len() <= 2 * background.live + TOMBSTONE_SLACK + 1, "at {n}");
            }
        }
        assert!(reader.is_empty());
    }

    #[tokio::test]
    async fn an_idle_queue_holds_no_heap_memory() {
        let (queue, reader) = OutboundQueue::new(QueueLimits::default());
        assert_eq!(allocated(&reader), 0, "nothing allocated before the first message");
        push(&queue, [protocol("server_ready")]).await;
        assert!(allocated(&reader) > 0);
        drain(&reader);
        assert_eq!(allocated(&reader), 0, "a new connection keeps nothing after its first frames");
        push(&queue, [publication("a", 5, "x"), event(10, "y"), publication("a", 3, "z")]).await;
        assert!(allocated(&reader) > 0);
        assert_eq!(drain(&reader).len(), 3);
        assert!(allocated(&reader) > 0, "kept while the connection is busy");
        reader.release_memory_when_empty();
        assert_eq!(allocated(&reader), 0, "freed at once when empty");
        // The heartbeat's ping comes next: freed again once it has gone.
        push(&queue, [protocol("ping")]).await;
        assert!(allocated(&reader) > 0);
        drain(&reader);
        assert_eq!(allocated(&reader), 0, "an idle connection's queue holds nothing");
        // Later traffic keeps its buffers again until the next heartbeat.
        push(&queue, [event(5, "x")]).await;
        drain(&reader);
        assert!(allocated(&reader) > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_critical_grace_period_runs_from_the_oldest_waiting_critical_message() {
        let grace = Duration::from_secs(10);
        let (queue, reader) = OutboundQueue::new(QueueLimits { critical_grace: grace, ..QueueLimits::default() });
        push(&queue, [event(8, "data")]).await;
        assert_eq!(reader.critical_deadline(), None, "only CRITICAL messages start the clock");
        let start = Instant::now();
        push(&queue, [protocol("ping-1")]).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        push(&queue, [protocol("ping-2")]).await;
        assert_eq!(reader.critical_deadline(), Some(start + grace));
        reader.pop();
        assert_eq!(reader.critical_deadline(), Some(start + Duration::from_secs(4) + grace));
        reader.pop();
        assert_eq!(reader.critical_deadline(), None);
    }

    #[tokio::test]
    async fn the_gauge_follows_the_queue() {
        let (tx, _rx) = crate::connection::delivery_channel(1);
        let connection =
            Connection::new(crate::connection::ConnectionId::new(), None, wsengine_core::WireFormat::Json, tx);
        let (queue, reader) = OutboundQueue::for_connection(&connection, limits(1 << 20, 1));
        push(&queue, [event(5, "abc"), event(5, "dropped")]).await;
        let gauge = connection.shared::<QueueGauge>();
        assert_eq!((gauge.bytes(), gauge.messages(), connection.dropped()), (3, 1, 1));
        reader.pop();
        assert_eq!((gauge.bytes(), gauge.messages()), (0, 0));
    }

    #[tokio::test]
    async fn unencoded_messages_are_an_error() {
        let (queue, _reader) = OutboundQueue::new(QueueLimits::default());
        let envelope = Envelope::new("x", serde_json::json!({}));
        assert!(queue.oneshot(Outbound::event(envelope)).await.is_err());
    }
}
