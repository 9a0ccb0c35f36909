//! Recovery state of the in-memory bus: per-topic history buffers with epochs and offsets, and
//! the idempotency window of publishes (PROTOCOL.md §9).
//!
//! [`TopicHistory`] stamps every publication of a topic with `tp` / `e` / `o`, keeps the newest
//! ones in a ring per topic, drops buffers idle for the TTL, keeps all buffers under a memory
//! budget by evicting whole buffers (least recently published first), and answers recovery
//! requests with the exact table of §9.4. [`PublishDedup`] remembers publications that carried a
//! caller-supplied `id`, so a retried publish within the window is delivered once.
//!
//! ```
//! use std::sync::Arc;
//! use wsengine_core::Envelope;
//! use wsengine_services::publication::Publication;
//! use wsengine_services::recovery::{RecoverySettings, ReplayLimit, Requested, TopicHistory};
//!
//! let history = TopicHistory::new(RecoverySettings::default());
//! for n in 0..3 {
//!     let publication = Publication::new("prices", Envelope::new("tick", serde_json::json!({"n": n})));
//!     let (stamped, ()) = history.publish(publication, |_| ());
//!     assert_eq!(stamped.envelope().unwrap().stamp.as_ref().unwrap().offset, n);
//! }
//! let epoch = history.position("prices").unwrap().0;
//! // A client that processed offset 0 gets 1 and 2 back.
//! let outcome = history.subscribe("prices", Requested::At { epoch, offset: 0 }, ReplayLimit::unlimited(), || {});
//! assert!(outcome.recovered);
//! assert_eq!(outcome.replay.len(), 2);
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use wsengine_core::Stamp;
use wsengine_core::envelope::{format_epoch, parse_epoch};

use wsengine_core::topic::is_pattern;

use crate::bus::{Bus, PublishReport};
use crate::connection::Connection;
use crate::publication::Publication;

/// Smallest ring capacity (PROTOCOL.md §9.2).
const MIN_CAPACITY: usize = 16;

/// Per-entry bookkeeping charged to the memory budget on top of the JSON size.
const ENTRY_OVERHEAD: usize = 64;

/// Limits of the topic history (the `recovery_*` configuration keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoverySettings {
    /// Publications kept per topic: rounded up to a power of two, at least 16. Default 128.
    pub buffer_size: usize,
    /// A buffer without publications for this long is dropped. Default 300 s.
    pub ttl: Duration,
    /// A replay never exceeds this many publications. Default 500.
    pub max_replay: usize,
    /// All buffers together stay under this many bytes. Default 256 MiB.
    pub memory_budget: usize,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        RecoverySettings { buffer_size: 128, ttl: Duration::from_secs(300), max_replay: 500, memory_budget: 256 << 20 }
    }
}

impl RecoverySettings {
    /// The ring capacity `buffer_size` gives: the next power of two, at least 16.
    pub fn capacity(&self) -> usize {
        self.buffer_size.max(MIN_CAPACITY).checked_next_power_of_two().unwrap_or(usize::MAX / 2 + 1)
    }
}

/// What a subscriber asked for one topic (PROTOCOL.md §9.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// No recovery for this topic (`recover` not `true`, or no entry for it).
    NotAsked,
    /// An entry that is not `{"epoch": <1–8 hex digits>, "offset": <u64>}`.
    Malformed,
    /// The last position the client processed.
    At {
        /// The epoch, parsed from hex.
        epoch: u32,
        /// The last processed offset.
        offset: u64,
    },
}

impl Requested {
    /// Reads one entry of a request's `recovery` object; `None` (no entry) is [`Requested::NotAsked`].
    pub fn from_entry(entry: Option<&Value>) -> Self {
        let Some(entry) = entry else { return Requested::NotAsked };
        let epoch = entry.get("epoch").and_then(Value::as_str).and_then(parse_epoch);
        let offset = entry.get("offset").and_then(Value::as_u64);
        match (epoch, offset) {
            (Some(epoch), Some(offset)) => Requested::At { epoch, offset },
            _ => Requested::Malformed,
        }
    }
}

/// How much a replay may add to the connection's outbound queue (PROTOCOL.md §9.4 row 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimit {
    /// Messages that still fit.
    pub messages: usize,
    /// Bytes that still fit.
    pub bytes: usize,
}

impl ReplayLimit {
    /// No limit beyond the replay cap.
    pub fn unlimited() -> Self {
        ReplayLimit { messages: usize::MAX, bytes: usize::MAX }
    }

    /// Takes a replay's share out of the limit.
    pub fn consume(&mut self, replay: &[Arc<Publication>]) {
        self.messages = self.messages.saturating_sub(replay.len());
        self.bytes = self.bytes.saturating_sub(replay.iter().map(|p| p.json_len()).sum());
    }
}

/// The answer for one topic of a subscribe: its entry in the ack's `recovery` object and the
/// publications to replay before the ack.
#[derive(Debug, Clone, Default)]
pub struct RecoveryOutcome {
    /// The buffer's epoch; `None` when the topic has no buffer (or is a pattern).
    pub epoch: Option<u32>,
    /// The head offset (0 without a buffer).
    pub offset: u64,
    /// Whether the replay below is the complete range the client asked for.
    pub recovered: bool,
    /// Publications `offset + 1 ..= head`, oldest first (empty unless recovered).
    pub replay: Vec<Arc<Publication>>,
}

impl RecoveryOutcome {
    /// The entry for a pattern subscription or a topic without a buffer.
    pub fn no_buffer() -> Self {
        RecoveryOutcome::default()
    }

    /// The ack's entry: `{"epoch", "offset", "recoverable", "recovered", "count"}`.
    pub fn entry(&self) -> Value {
        json!({
            "epoch": self.epoch.map(format_epoch),
            "offset": self.offset,
            "recoverable": self.epoch.is_some(),
            "recovered": self.recovered,
            "count": self.replay.len(),
        })
    }
}

/// Epochs as a keyed pseudo-random permutation of a counter: each looks random (the keys come
/// from the OS CSPRNG), and no two buffers of one engine ever share an epoch, so a recreated
/// buffer always differs from the topic's previous one without remembering it (PROTOCOL.md §9.2).
struct EpochSource {
    keys: [u16; 4],
    next: AtomicU32,
}

impl fmt::Debug for EpochSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochSource").finish_non_exhaustive()
    }
}

impl EpochSource {
    fn new() -> Self {
        let mut seed = [0u8; 12];
        if getrandom::fill(&mut seed).is_err() {
            // No OS randomness: fall back to the std hasher's per-process random keys.
            use std::hash::BuildHasher;
            let mixed = std::hash::RandomState::new().hash_one(Instant::now());
            seed[..8].copy_from_slice(&mixed.to_le_bytes());
            seed[8..].copy_from_slice(&std::process::id().to_le_bytes());
        }
        let keys = [
            u16::from_le_bytes([seed[0], seed[1]]),
            u16::from_le_bytes([seed[2], seed[3]]),
            u16::from_le_bytes([seed[4], seed[5]]),
            u16::from_le_bytes([seed[6], seed[7]]),
        ];
        let start = u32::from_le_bytes([seed[8], seed[9], seed[10], seed[11]]);
        EpochSource { keys, next: AtomicU32::new(start) }
    }

    fn next(&self) -> u32 {
        permute(self.keys, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// A four-round Feistel network on 32 bits: a bijection for any keys.
fn permute(keys: [u16; 4], value: u32) -> u32 {
    let (mut left, mut right) = ((value >> 16) as u16, value as u16);
    for key in keys {
        let mixed = u32::from(right ^ key).wrapping_mul(0x9E37_79B1);
        let round = ((mixed >> 16) ^ mixed) as u16;
        (left, right) = (right, left ^ round);
    }
    (u32::from(left) << 16) | u32::from(right)
}

#[derive(Debug)]
struct TopicBuffer {
    epoch: u32,
    next_offset: u64,
    entries: VecDeque<(Arc<Publication>, usize)>,
    bytes: usize,
    last_publish: Instant,
    /// Position in the publish order (key of `State::order`).
    tick: u64,
}

impl TopicBuffer {
    fn head(&self) -> u64 {
        // A buffer exists only once something was published to it.
        self.next_offset.saturating_sub(1)
    }

    fn oldest(&self) -> u64 {
        self.next_offset - self.entries.len() as u64
    }
}

#[derive(Debug, Default)]
struct State {
    buffers: HashMap<String, TopicBuffer>,
    /// Topics by last publication, oldest first: both the idle order and the LRU order.
    order: BTreeMap<u64, String>,
    next_tick: u64,
    bytes: usize,
}

impl State {
    fn remove(&mut self, topic: &str) {
        if let Some(buffer) = self.buffers.remove(topic) {
            self.order.remove(&buffer.tick);
            self.bytes -= buffer.bytes;
        }
    }

    /// Drops buffers idle for `ttl` (they are at the front of the order).
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((_, topic)) = self.order.first_key_value() {
            let idle = self.buffers.get(topic).is_some_and(|b| now.duration_since(b.last_publish) >= ttl);
            if !idle {
                break;
            }
            let topic = topic.clone();
            self.remove(&topic);
        }
    }
}

/// Per-topic history buffers, shared by the bus (which stamps and stores) and dispatch (which
/// replays).
///
/// One lock covers stamping, storing and handing a publication to the subscribers, and the
/// same lock covers registering a subscription and reading the topic's position; so every
/// subscriber sees a topic's offsets in order, and a subscription registered together with a
/// position receives exactly the live publications after that position.
#[derive(Debug)]
pub struct TopicHistory {
    settings: RecoverySettings,
    capacity: usize,
    epochs: EpochSource,
    state: Mutex<State>,
}

impl TopicHistory {
    /// An empty history.
    pub fn new(settings: RecoverySettings) -> Self {
        TopicHistory {
            capacity: settings.capacity(),
            settings,
            epochs: EpochSource::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RecoverySettings {
        &self.settings
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stamps `publication` with the next offset of its topic (creating the buffer, with a new
    /// epoch, if there is none), stores it, and calls `fan_out` with it while the topic's
    /// order is still held. A publication without a topic is only shared and fanned out.
    pub fn publish<R>(
        &self,
        publication: Publication,
        fan_out: impl FnOnce(&Arc<Publication>) -> R,
    ) -> (Arc<Publication>, R) {
        let Some(topic) = publication.topic().map(str::to_owned) else {
            let publication = Arc::new(publication);
            let result = fan_out(&publication);
            return (publication, result);
        };
        let now = Instant::now();
        let mut state = self.state();
        state.expire(now, self.settings.ttl);
        let tick = state.next_tick;
        state.next_tick += 1;
        let buffer = match state.buffers.remove(&topic) {
            Some(mut buffer) => {
                state.order.remove(&buffer.tick);
                state.bytes -= buffer.bytes;
                buffer.tick = tick;
                buffer.last_publish = now;
                buffer
            }
            None => TopicBuffer {
                epoch: self.epochs.next(),
                next_offset: 0,
                entries: VecDeque::new(),
                bytes: 0,
                last_publish: now,
                tick,
            },
        };
        let stamp = Stamp { topic: topic.clone(), epoch: buffer.epoch, offset: buffer.next_offset };
        let publication = Arc::new(publication.with_stamp(stamp));
        let mut buffer = buffer;
        buffer.next_offset += 1;
        let size = publication.json_len() + ENTRY_OVERHEAD;
        if buffer.entries.len() == self.capacity {
            if let Some((_, evicted)) = buffer.entries.pop_front() {
                buffer.bytes -= evicted;
            }
        }
        buffer.entries.push_back((Arc::clone(&publication), size));
        buffer.bytes += size;
        let result = fan_out(&publication);

        // The budget: other buffers go first, least recently published first; a buffer that
        // alone exceeds the budget sheds its own oldest entries.
        while state.bytes + buffer.bytes > self.settings.memory_budget {
            let Some((_, victim)) = state.order.pop_first() else { break };
            if let Some(evicted) = state.buffers.remove(&victim) {
                state.bytes -= evicted.bytes;
            }
        }
        while buffer.bytes > self.settings.memory_budget && buffer.entries.len() > 1 {
            if let Some((_, evicted)) = buffer.entries.pop_front() {
                buffer.bytes -= evicted;
            }
        }
        state.bytes += buffer.bytes;
        state.order.insert(tick, topic.clone());
        state.buffers.insert(topic, buffer);
        (publication, result)
    }

    /// Registers a subscription (`register`) and evaluates the recovery request for `topic`
    /// under the topic's publish order (PROTOCOL.md §9.4): publications stamped after this
    /// call reach the new subscription live, and exactly those up to the reported head are in
    /// the replay (when recovered).
    pub fn subscribe(
        &self,
        topic: &str,
        requested: Requested,
        limit: ReplayLimit,
        register: impl FnOnce(),
    ) -> RecoveryOutcome {
        let mut state = self.state();
        state.expire(Instant::now(), self.settings.ttl);
        register();
        let Some(buffer) = state.buffers.get(topic) else { return RecoveryOutcome::no_buffer() };
        let head = buffer.head();
        let unrecovered =
            RecoveryOutcome { epoch: Some(buffer.epoch), offset: head, recovered: false, replay: Vec::new() };
        let Requested::At { epoch, offset } = requested else { return unrecovered };
        if epoch != buffer.epoch || offset > head || offset + 1 < buffer.oldest() {
            return unrecovered;
        }
        let missed = head - offset;
        if missed > self.settings.max_replay as u64 || missed > limit.messages as u64 {
            return unrecovered;
        }
        let skip = (offset + 1 - buffer.oldest()) as usize;
        let replay: Vec<Arc<Publication>> = buffer.entries.iter().skip(skip).map(|(p, _)| Arc::clone(p)).collect();
        let bytes: usize = replay.iter().map(|p| p.json_len()).sum();
        if bytes > limit.bytes {
            return unrecovered;
        }
        RecoveryOutcome { recovered: true, replay, ..unrecovered }
    }

    /// The topic's `(epoch, head)`, if it has a buffer.
    pub fn position(&self, topic: &str) -> Option<(u32, u64)> {
        let mut state = self.state();
        state.expire(Instant::now(), self.settings.ttl);
        state.buffers.get(topic).map(|b| (b.epoch, b.head()))
    }

    /// Buffers currently kept.
    pub fn buffer_count(&self) -> usize {
        self.state().buffers.len()
    }

    /// Bytes charged to the memory budget.
    pub fn memory(&self) -> usize {
        self.state().bytes
    }

    /// Drops idle buffers now (publishes and subscribes also do it as they go).
    pub fn expire_idle(&self) {
        self.state().expire(Instant::now(), self.settings.ttl);
    }
}

/// The idempotency window of publishes: a publication with a caller-supplied `id` published to
/// the same topic again within the window is not delivered again; the retry gets the first
/// publish's report (and so its stamp).
#[derive(Debug)]
pub struct PublishDedup {
    window: Duration,
    max_entries: usize,
    state: Mutex<DedupState>,
}

#[derive(Debug, Default)]
struct DedupState {
    reports: HashMap<(String, String), PublishReport>,
    order: VecDeque<(Instant, (String, String))>,
}

impl PublishDedup {
    /// Ids remembered at most, whatever the window (the oldest is forgotten first).
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

    /// A window of `window`; at most `max_entries` ids are remembered.
    pub fn new(window: Duration, max_entries: usize) -> Self {
        PublishDedup { window, max_entries: max_entries.max(1), state: Mutex::new(DedupState::default()) }
    }

    /// Runs `publish` unless `(topic, id)` was published within the window, in which case the
    /// earlier report is returned and `publish` is not called. Concurrent publishes of the same
    /// id are serialized, so exactly one of them is delivered.
    pub fn publish_once<E>(
        &self,
        topic: &str,
        id: &str,
        publish: impl FnOnce() -> Result<PublishReport, E>,
    ) -> Result<PublishReport, E> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, key)) = state.order.front() {
            if now.duration_since(*at) < self.window && state.order.len() < self.max_entries {
                break;
            }
            let key = key.clone();
            state.order.pop_front();
            state.reports.remove(&key);
        }
        let key = (topic.to_owned(), id.to_owned());
        if let Some(report) = state.reports.get(&key) {
            return Ok(report.clone());
        }
        let report = publish()?;
        state.reports.insert(key.clone(), report.clone());
        state.order.push_back((now, key));
        Ok(report)
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reports.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The recovery side of one `subscribe` request (PROTOCOL.md §6.2.4 step 6, §9.4): it registers
/// the subscriptions with the bus together with their positions and builds the ack's
/// `recovered` / `recovery` fields and the replay that precedes the ack.
#[derive(Debug)]
pub struct SubscribeRecovery {
    enabled: bool,
    asked: bool,
    entries: Option<serde_json::Map<String, Value>>,
    limit: ReplayLimit,
    outcomes: HashMap<String, RecoveryOutcome>,
    new_topics: Vec<String>,
}

impl SubscribeRecovery {
    /// For a request with payload `p`; `enabled` is the engine's recovery switch and `limit` what
    /// the connection's outbound queue can still take besides the ack.
    pub fn new(enabled: bool, p: Option<&Value>, limit: ReplayLimit) -> Self {
        let asked = enabled && matches!(p.and_then(|p| p.get("recover")), Some(Value::Bool(true)));
        let entries = match p.and_then(|p| p.get("recovery")) {
            Some(Value::Object(entries)) if asked => Some(entries.clone()),
            _ => None,
        };
        SubscribeRecovery { enabled, asked, entries, limit, outcomes: HashMap::new(), new_topics: Vec::new() }
    }

    /// Subscribes `connection` to a topic it was not subscribed to, reading the topic's
    /// position in the same step.
    pub fn register(&mut self, bus: &dyn Bus, connection: &Arc<Connection>, topic: &str) {
        self.new_topics.push(topic.to_owned());
        if !self.enabled {
            bus.subscribe(connection, topic);
            return;
        }
        let outcome = self.evaluate(bus, connection, topic);
        self.outcomes.insert(topic.to_owned(), outcome);
    }

    fn evaluate(&mut self, bus: &dyn Bus, connection: &Arc<Connection>, topic: &str) -> RecoveryOutcome {
        if is_pattern(topic) || !connection.may_access(topic) {
            // Dispatch refuses denied topics before this; the check keeps positions of denied
            // topics from ever leaving, whatever the caller.
            bus.subscribe(connection, topic);
            return RecoveryOutcome::no_buffer();
        }
        let requested = if self.asked {
            Requested::from_entry(self.entries.as_ref().and_then(|entries| entries.get(topic)))
        } else {
            Requested::NotAsked
        };
        let outcome = bus.subscribe_recovering(connection, topic, requested, self.limit);
        self.limit.consume(&outcome.replay);
        outcome
    }

    /// Topics this request subscribed anew, in request order.
    pub fn new_topics(&self) -> &[String] {
        &self.new_topics
    }

    /// Completes the ack (`recovered`, and `recovery` when recovery is on) for the topics in its
    /// `success_topics`, evaluating those that were already subscribed, and returns the
    /// publications to replay before the ack, topic by topic in offset order.
    pub fn finish(mut self, bus: &dyn Bus, connection: &Arc<Connection>, ack: &mut Value) -> Vec<Arc<Publication>> {
        if !self.enabled {
            return Vec::new();
        }
        let success: Vec<String> = match ack.get("success_topics") {
            Some(Value::Array(topics)) => topics.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        };
        let mut entries = serde_json::Map::new();
        let mut replay = Vec::new();
        let mut all_recovered = !success.is_empty();
        for topic in success {
            let outcome = match self.outcomes.remove(&topic) {
                Some(outcome) => outcome,
                None => self.evaluate(bus, connection, &topic),
            };
            all_recovered &= outcome.recovered;
            entries.insert(topic, outcome.entry());
            replay.extend(outcome.replay);
        }
        ack["recovered"] = (self.asked && all_recovered).into();
        ack["recovery"] = Value::Object(entries);
        replay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsengine_core::Envelope;

    fn publication(topic: &str, n: u64) -> Publication {
        Publication::new(topic, Envelope::new("tick", json!({"n": n})))
    }

    fn settings(buffer_size: usize) -> RecoverySettings {
        RecoverySettings { buffer_size, ..RecoverySettings::default() }
    }

    fn stamp(p: &Publication) -> Stamp {
        p.envelope().unwrap().stamp.clone().unwrap()
    }

    fn publish(history: &TopicHistory, topic: &str, n: u64) -> Arc<Publication> {
        history.publish(publication(topic, n), |_| ()).0
    }

    fn at(epoch: u32, offset: u64) -> Requested {
        Requested::At { epoch, offset }
    }

    #[test]
    fn capacity_is_a_power_of_two_of_at_least_16() {
        assert_eq!(settings(0).capacity(), 16);
        assert_eq!(settings(16).capacity(), 16);
        assert_eq!(settings(17).capacity(), 32);
        assert_eq!(settings(128).capacity(), 128);
        assert_eq!(settings(1000).capacity(), 1024);
    }

    #[tokio::test]
    async fn offsets_are_contiguous_from_zero_per_topic() {
        let history = TopicHistory::new(settings(16));
        for n in 0..40 {
            assert_eq!(stamp(&publish(&history, "a", n)).offset, n);
        }
        assert_eq!(stamp(&publish(&history, "b", 0)).offset, 0);
        let (epoch, head) = history.position("a").unwrap();
        assert_eq!(head, 39);
        assert_ne!(Some(epoch), history.position("b").map(|p| p.0));
        let json = publish(&history, "a", 40).json().to_string();
        assert!(json.starts_with(&format!(r#"{{"tp":"a","e":"{epoch:08x}","o":40,"c":"U""#)), "{json}");
    }

    #[tokio::test]
    async fn the_ring_keeps_the_newest_capacity_entries() {
        let history = TopicHistory::new(settings(16));
        for n in 0..20 {
            publish(&history, "a", n);
        }
        let (epoch, head) = history.position("a").unwrap();
        assert_eq!(head, 19);
        // Oldest kept is 4: a client at 3 needs 4.. and gets them; a client at 2 needs 3, gone.
        let ok = history.subscribe("a", at(epoch, 3), ReplayLimit::unlimited(), || {});
        assert!(ok.recovered);
        assert_eq!(ok.replay.iter().map(|p| stamp(p).offset).collect::<Vec<_>>(), (4..20).collect::<Vec<_>>());
        let too_old = history.subscribe("a", at(epoch, 2), ReplayLimit::unlimited(), || {});
        assert!(!too_old.recovered);
        assert_eq!((too_old.offset, too_old.replay.len()), (19, 0));
    }

    #[tokio::test]
    async fn the_table_of_section_9_4() {
        let history = TopicHistory::new(RecoverySettings { max_replay: 5, ..settings(64) });
        let none = history.subscribe("a", at(1, 0), ReplayLimit::unlimited(), || {});
        assert_eq!(
            none.entry(),
            json!({"epoch": null, "offset": 0, "recoverable": false, "recovered": false, "count": 0})
        );
        for n in 0..10 {
            publish(&history, "a", n);
        }
        let (epoch, _) = history.position("a").unwrap();
        let current = |o: &RecoveryOutcome| (o.epoch, o.offset, o.recovered, o.replay.len());
        let cases = [
            (Requested::NotAsked, false, 0),
            (Requested::Malformed, false, 0),
            (at(epoch.wrapping_add(1), 8), false, 0),
            (at(epoch, 10), false, 0),
            (at(epoch, 3), false, 0),
            (at(epoch, 4), true, 5),
            (at(epoch, 9), true, 0),
        ];
        for (requested, recovered, count) in cases {
            let outcome = history.subscribe("a", requested, ReplayLimit::unlimited(), || {});
            assert_eq!(current(&outcome), (Some(epoch), 9, recovered, count), "{requested:?}");
        }
        let tight = ReplayLimit { messages: 2, bytes: usize::MAX };
        assert!(!history.subscribe("a", at(epoch, 6), tight, || {}).recovered);
        assert!(history.subscribe("a", at(epoch, 7), tight, || {}).recovered);
        let no_bytes = ReplayLimit { messages: 100, bytes: 10 };
        assert!(!history.subscribe("a", at(epoch, 7), no_bytes, || {}).recovered);
    }

    #[test]
    fn malformed_entries() {
        for entry in [
            json!({"epoch": "", "offset": 1}),
            json!({"epoch": "123456789", "offset": 1}),
            json!({"epoch": "xyz", "offset": 1}),
            json!({"epoch": "ab", "offset": -1}),
            json!({"epoch": "ab", "offset": 1.5}),
            json!({"epoch": 12, "offset": 1}),
            json!({"offset": 1}),
            json!("ab"),
        ] {
            assert_eq!(Requested::from_entry(Some(&entry)), Requested::Malformed, "{entry}");
        }
        assert_eq!(Requested::from_entry(Some(&json!({"epoch": "00AbCd", "offset": 7}))), at(0xabcd, 7));
        assert_eq!(Requested::from_entry(None), Requested::NotAsked);
    }

    #[test]
    fn epochs_never_repeat_and_render_as_eight_hex_digits() {
        let source = EpochSource::new();
        let epochs: std::collections::HashSet<u32> = (0..100_000).map(|_| source.next()).collect();
        assert_eq!(epochs.len(), 100_000);
        assert_eq!(format_epoch(0xabcd), "0000abcd");
        // The permutation is a bijection on a small sample of the domain too.
        let keys = [1, 2, 3, 4];
        let image: std::collections::HashSet<u32> = (0..1 << 16).map(|v| permute(keys, v)).collect();
        assert_eq!(image.len(), 1 << 16);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_buffer_expires_and_comes_back_with_a_new_epoch() {
        let history = TopicHistory::new(RecoverySettings { ttl: Duration::from_secs(300), ..settings(16) });
        publish(&history, "a", 0);
        publish(&history, "b", 0);
        let (first, _) = history.position("a").unwrap();
        tokio::time::advance(Duration::from_secs(200)).await;
        publish(&history, "b", 1);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(history.position("a"), None, "idle for the TTL");
        assert!(history.position("b").is_some(), "published 100 s ago");
        history.expire_idle();
        assert_eq!(history.buffer_count(), 1);
        let again = publish(&history, "a", 1);
        assert_ne!(stamp(&again).epoch, first);
        assert_eq!(stamp(&again).offset, 0);
        let stale = history.subscribe("a", at(first, 0), ReplayLimit::unlimited(), || {});
        assert!(!stale.recovered);
    }

    #[tokio::test]
    async fn the_memory_budget_evicts_whole_buffers_least_recently_published_first() {
        let one = publication("x", 0).json_len() + ENTRY_OVERHEAD + 40;
        let history = TopicHistory::new(RecoverySettings { memory_budget: one * 3, ..settings(16) });
        publish(&history, "a", 0);
        publish(&history, "b", 0);
        publish(&history, "c", 0);
        assert_eq!(history.buffer_count(), 3);
        publish(&history, "a", 1); // a is now the most recent; b is the LRU
        publish(&history, "d", 0);
        assert!(history.position("b").is_none(), "least recently published goes first");
        assert!(history.position("a").is_some() && history.position("d").is_some());
        assert!(history.memory() <= one * 3);
        // A single buffer beyond the budget sheds its oldest entries, never the newest.
        for n in 2..20 {
            publish(&history, "a", n);
        }
        assert!(history.memory() <= one * 3);
        assert_eq!(history.position("a").unwrap().1, 19);
    }

    #[test]
    fn the_subscription_is_registered_under_the_lock() {
        let history = TopicHistory::new(settings(16));
        let mut registered = false;
        history.subscribe("a", Requested::NotAsked, ReplayLimit::unlimited(), || registered = true);
        assert!(registered);
    }

    #[tokio::test(start_paused = true)]
    async fn dedup_delivers_an_id_once_within_the_window() {
        let dedup = PublishDedup::new(Duration::from_secs(60), 1000);
        let history = TopicHistory::new(settings(16));
        let mut calls = 0;
        let mut run = |n| {
            dedup
                .publish_once::<()>("a", "id-1", || {
                    calls += 1;
                    let publication = publish(&history, "a", n);
                    Ok(PublishReport { delivered: 1, dropped: 0, publication })
                })
                .unwrap()
        };
        let first = run(0);
        let retry = run(1);
        assert!(Arc::ptr_eq(&first.publication, &retry.publication));
        tokio::time::advance(Duration::from_secs(61)).await;
        let later = run(2);
        assert_eq!(stamp(&later.publication).offset, 1);
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn dedup_is_bounded_by_count() {
        let dedup = PublishDedup::new(Duration::from_secs(60), 3);
        for n in 0..10 {
            let id = n.to_string();
            dedup
                .publish_once::<()>("a", &id, || {
                    Ok(PublishReport { delivered: 0, dropped: 0, publication: Arc::new(publication("a", 0)) })
                })
                .unwrap();
        }
        assert!(dedup.len() <= 3);
    }
}
