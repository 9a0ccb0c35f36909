//! Recovery state of the in-memory bus: per-topic history buffers with epochs and offsets, and
//! the idempotency window of publishes (PROTOCOL.md §9).
//!
//! [`TopicHistory`] (cargo feature `recovery`) stamps every publication of a topic with `tp` / `e` / `o`, keeps the newest
//! ones in a ring per topic, drops buffers idle for the TTL, keeps all buffers under a memory
//! budget by evicting whole buffers (least recently published first), and answers recovery
//! requests with the exact table of §9.4. [`PublishDedup`] remembers publications that carried a
//! caller-supplied `id`, so a retried publish within the window is delivered once.
//!
//! ```
//! # #[cfg(feature = "recovery")] {
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
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use wsengine_core::envelope::{format_epoch, parse_epoch};

use wsengine_core::topic::is_pattern;

use crate::bus::{Bus, PublishReport};
use crate::connection::Connection;
use crate::publication::Publication;

/// Smallest ring capacity (PROTOCOL.md §9.2).
const MIN_CAPACITY: usize = 16;

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

#[cfg(feature = "recovery")]
mod history;
#[cfg(feature = "recovery")]
pub use history::TopicHistory;

/// The idempotency window of publishes: a publication with a caller-supplied `id` published to
/// the same topic again within the window is not delivered again; the retry gets the first
/// publish's report (and so its stamp).
///
/// The ids are spread over independently locked shards by `(topic, id)`, so publishes with
/// different ids rarely wait for each other, while concurrent retries of one id always meet in
/// the same shard.
#[derive(Debug)]
pub struct PublishDedup {
    window: Duration,
    /// Per shard.
    max_entries: usize,
    shards: Box<[Mutex<DedupState>]>,
    hasher: RandomState,
}

/// Shards of [`PublishDedup`].
const DEDUP_SHARDS: usize = 32;

#[derive(Debug, Default)]
struct DedupState {
    reports: HashMap<(String, String), PublishReport>,
    order: VecDeque<(Instant, (String, String))>,
}

impl PublishDedup {
    /// Ids remembered at most, whatever the window (the oldest is forgotten first).
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

    /// A window of `window`; at most `max_entries` ids are remembered (rounded up to a
    /// multiple of the shard count; each shard forgets its oldest first).
    pub fn new(window: Duration, max_entries: usize) -> Self {
        PublishDedup {
            window,
            max_entries: max_entries.max(1).div_ceil(DEDUP_SHARDS),
            shards: (0..DEDUP_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, topic: &str, id: &str) -> MutexGuard<'_, DedupState> {
        let index = (self.hasher.hash_one((topic, id)) % DEDUP_SHARDS as u64) as usize;
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
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
        let mut state = self.shard(topic, id);
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
        self.shards.iter().map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()).reports.len()).sum()
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

    pub(super) fn publication(topic: &str, n: u64) -> Publication {
        Publication::new(topic, Envelope::new("tick", json!({"n": n})))
    }

    pub(super) fn settings(buffer_size: usize) -> RecoverySettings {
        RecoverySettings { buffer_size, ..RecoverySettings::default() }
    }

    pub(super) fn at(epoch: u32, offset: u64) -> Requested {
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

    #[tokio::test]
    async fn dedup_is_bounded_by_count() {
        let dedup = PublishDedup::new(Duration::from_secs(60), 3 * DEDUP_SHARDS);
        for n in 0..10 * DEDUP_SHARDS {
            let id = n.to_string();
            dedup
                .publish_once::<()>("a", &id, || {
                    Ok(PublishReport { delivered: 0, dropped: 0, publication: Arc::new(publication("a", 0)) })
                })
                .unwrap();
        }
        assert!(dedup.len() <= 3 * DEDUP_SHARDS);
        assert!(dedup.len() >= DEDUP_SHARDS, "{} ids kept", dedup.len());
    }

    #[test]
    fn publishes_with_different_ids_do_not_wait_for_each_other() {
        let dedup = Arc::new(PublishDedup::new(Duration::from_secs(60), 1000));
        let report = || PublishReport { delivered: 0, dropped: 0, publication: Arc::new(publication("a", 0)) };
        // Two ids in different shards (found by trying): one publish blocks until the other is done.
        let (first, second) = (0..)
            .map(|n| n.to_string())
            .map(|id| (id.clone(), format!("{id}-other")))
            .find(|(a, b)| {
                let shard = |id: &str| dedup.hasher.hash_one(("a", id)) % DEDUP_SHARDS as u64;
                shard(a) != shard(b)
            })
            .unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let blocked = std::thread::spawn({
            let dedup = Arc::clone(&dedup);
            move || {
                dedup
                    .publish_once::<()>("a", &first, || {
                        done_rx.recv_timeout(Duration::from_secs(3)).expect("the other publish was not held up");
                        Ok(report())
                    })
                    .unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        dedup.publish_once::<()>("a", &second, || Ok(report())).unwrap();
        done_tx.send(()).unwrap();
        blocked.join().unwrap();
        assert_eq!(dedup.len(), 2);
    }
}
