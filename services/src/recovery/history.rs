//! The topic history behind recovery (feature `recovery`): per-topic ring buffers with epochs
//! and offsets, idle expiry and a global memory budget, each topic ordered by its own lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::time::Instant;
use wsengine_core::Stamp;

use super::{RecoveryOutcome, RecoverySettings, ReplayLimit, Requested};
use crate::publication::Publication;

/// Per-entry bookkeeping charged to the memory budget on top of the JSON size.
const ENTRY_OVERHEAD: usize = 64;

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
    /// Charged to the budget: the entries' sizes (counted in `Books::bytes` once stored).
    bytes: usize,
    last_publish: Instant,
    /// Key of this buffer in `Books::order`; `None` until its first publication is stored.
    tick: Option<u64>,
    /// Expired or evicted: gone from the map and from the books. Whoever locks a retired buffer
    /// looks the topic up again, so nothing is stamped into a buffer subscribers cannot see.
    retired: bool,
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

/// One topic's buffer behind its own lock: the lock is the topic's publish order.
#[derive(Debug)]
struct Slot {
    topic: String,
    buffer: Mutex<TopicBuffer>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, TopicBuffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer's place in the publish order.
#[derive(Debug)]
struct Published {
    at: Instant,
    slot: Arc<Slot>,
}

/// Bookkeeping across topics, touched briefly by every publish.
#[derive(Debug, Default)]
struct Books {
    /// Buffers by last publication, oldest first: both the idle order and the LRU order. Holds
    /// exactly the buffers that are not retired and have a stored publication.
    order: BTreeMap<u64, Published>,
    next_tick: u64,
    /// The sum of `bytes` of the buffers in `order`.
    bytes: usize,
}

/// Gates that order a buffer's creation against subscriptions registered while the topic has
/// no buffer (topics share gates by hash; only creations and such subscribes take one).
const GATES: usize = 64;

/// Per-topic history buffers, shared by the bus (which stamps and stores) and dispatch (which
/// replays).
///
/// Each topic has its own lock: it covers stamping, storing and handing a publication to the
/// subscribers, and registering a subscription together with reading the topic's position. So
/// every subscriber sees a topic's offsets in order, a subscription registered together with a
/// position receives exactly the live publications after that position, and publishes to
/// different topics run in parallel. The callbacks (`fan_out`, `register`) run under that lock
/// and must not call back into the same history.
#[derive(Debug)]
pub struct TopicHistory {
    settings: RecoverySettings,
    capacity: usize,
    epochs: EpochSource,
    // Lock order, never taken the other way round: creation gate → topic buffer → `topics` →
    // `books`. No thread holds two topic buffers: eviction and expiry let go of their own
    // before they lock a victim. `topics` and `books` are held only briefly and never while a
    // callback runs; `fan_out` runs under the topic's buffer, `register` under the buffer or,
    // when the topic has none, under the topic's gate (which its creation takes).
    topics: RwLock<HashMap<String, Arc<Slot>>>,
    gates: Box<[Mutex<()>]>,
    gate_hasher: RandomState,
    books: Mutex<Books>,
}

impl TopicHistory {
    /// An empty history.
    pub fn new(settings: RecoverySettings) -> Self {
        TopicHistory {
            capacity: settings.capacity(),
            settings,
            epochs: EpochSource::new(),
            topics: RwLock::new(HashMap::new()),
            gates: (0..GATES).map(|_| Mutex::new(())).collect(),
            gate_hasher: RandomState::new(),
            books: Mutex::new(Books::default()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RecoverySettings {
        &self.settings
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, topic: &str) -> Option<Arc<Slot>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner()).get(topic).cloned()
    }

    fn gate(&self, topic: &str) -> MutexGuard<'_, ()> {
        let index = (self.gate_hasher.hash_one(topic) % GATES as u64) as usize;
        self.gates[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks `slot` if it still holds the topic's live buffer. `None` for a retired buffer, or
    /// one idle for the TTL (retired now): the caller looks the topic up again.
    fn lock_live<'a>(&self, slot: &'a Arc<Slot>) -> Option<MutexGuard<'a, TopicBuffer>> {
        let mut buffer = slot.lock();
        if buffer.retired {
            return None;
        }
        if self.is_idle(buffer.last_publish, Instant::now()) {
            self.retire_if(slot, &mut buffer, |_| true);
            return None;
        }
        Some(buffer)
    }

    fn is_idle(&self, last_publish: Instant, now: Instant) -> bool {
        now.duration_since(last_publish) >= self.settings.ttl
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
        let (slot, (publication, result, crowded)) = loop {
            let Some(slot) = self.lookup(&topic) else {
                let _gate = self.gate(&topic);
                let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
                if topics.contains_key(&topic) {
                    continue; // created meanwhile
                }
                let slot = Arc::new(Slot {
                    topic: topic.clone(),
                    buffer: Mutex::new(TopicBuffer {
                        epoch: self.epochs.next(),
                        next_offset: 0,
                        entries: VecDeque::new(),
                        bytes: 0,
                        last_publish: Instant::now(),
                        tick: None,
                        retired: false,
                    }),
                });
                // Locked before anyone can find it: nobody sees the buffer without its first
                // publication, and a subscriber waiting at the gate registers before it exists.
                let outcome = {
                    let mut buffer = slot.lock();
                    topics.insert(topic.clone(), Arc::clone(&slot));
                    drop(topics);
                    drop(_gate);
                    self.store_and_fan_out(&slot, &mut buffer, publication, fan_out)
                };
                break (slot, outcome);
            };
            let outcome = {
                let Some(mut buffer) = self.lock_live(&slot) else { continue };
                self.store_and_fan_out(&slot, &mut buffer, publication, fan_out)
            };
            break (slot, outcome);
        };
        if crowded {
            self.maintain(Some(&slot));
        }
        (publication, result)
    }

    /// The part of a publish under the topic's lock. Also reports whether the books need
    /// maintenance (over budget, or an idle buffer to drop).
    fn store_and_fan_out<R>(
        &self,
        slot: &Arc<Slot>,
        buffer: &mut TopicBuffer,
        publication: Publication,
        fan_out: impl FnOnce(&Arc<Publication>) -> R,
    ) -> (Arc<Publication>, R, bool) {
        let stamp = Stamp { topic: slot.topic.clone(), epoch: buffer.epoch, offset: buffer.next_offset };
        let publication = Arc::new(publication.with_stamp(stamp));
        buffer.next_offset += 1;
        let size = publication.json_len() + ENTRY_OVERHEAD;
        let charged = buffer.bytes;
        if buffer.entries.len() == self.capacity {
            if let Some((_, evicted)) = buffer.entries.pop_front() {
                buffer.bytes -= evicted;
            }
        }
        buffer.entries.push_back((Arc::clone(&publication), size));
        buffer.bytes += size;
        let crowded = {
            let mut books = self.books();
            // Read under the books lock, so the order is also the order of these instants.
            let now = Instant::now();
            if let Some(tick) = buffer.tick {
                books.order.remove(&tick);
            }
            let tick = books.next_tick;
            books.next_tick += 1;
            books.order.insert(tick, Published { at: now, slot: Arc::clone(slot) });
            books.bytes = books.bytes - charged + buffer.bytes;
            buffer.tick = Some(tick);
            buffer.last_publish = now;
            books.bytes > self.settings.memory_budget
                || books.order.first_key_value().is_some_and(|(_, p)| self.is_idle(p.at, now))
        };
        let result = fan_out(&publication);
        (publication, result, crowded)
    }

    /// Drops idle buffers, then keeps the budget: other buffers go first, least recently
    /// published first; `own` (the buffer just published to) sheds its own oldest entries only
    /// when it alone exceeds the budget. Holds no topic lock on entry.
    fn maintain(&self, own: Option<&Arc<Slot>>) {
        let budget = self.settings.memory_budget;
        loop {
            let now = Instant::now();
            let (victim, tick, idle) = {
                let books = self.books();
                match books.order.first_key_value() {
                    Some((tick, p)) if self.is_idle(p.at, now) => (Arc::clone(&p.slot), *tick, true),
                    _ if books.bytes > budget => {
                        let other = books.order.iter().find(|(_, p)| !own.is_some_and(|own| Arc::ptr_eq(&p.slot, own)));
                        match other {
                            Some((tick, p)) => (Arc::clone(&p.slot), *tick, false),
                            None => {
                                drop(books);
                                match own {
                                    Some(own) if self.shed(own) => continue,
                                    _ => return,
                                }
                            }
                        }
                    }
                    _ => return,
                }
            };
            let mut buffer = victim.lock();
            // Published (or retired) since it was picked: look again.
            if buffer.retired || buffer.tick != Some(tick) {
                continue;
            }
            // Another thread may have made room meanwhile.
            self.retire_if(&victim, &mut buffer, |books| idle || books.bytes > budget);
        }
    }

    /// Sheds `own`'s oldest entries while it is the only buffer and the budget is exceeded
    /// (always keeping its newest). Returns whether other buffers have to go first.
    fn shed(&self, own: &Arc<Slot>) -> bool {
        let budget = self.settings.memory_budget;
        let mut buffer = own.lock();
        if buffer.retired {
            return false;
        }
        let mut books = self.books();
        if books.bytes > budget && books.order.len() > 1 {
            return true;
        }
        while books.bytes > budget && buffer.entries.len() > 1 {
            if let Some((_, evicted)) = buffer.entries.pop_front() {
                buffer.bytes -= evicted;
                books.bytes -= evicted;
            }
        }
        false
    }

    /// Retires a locked buffer if `condition` holds for the books: out of the books, out of
    /// the map, entries freed. Returns whether it did.
    fn retire_if(&self, slot: &Arc<Slot>, buffer: &mut TopicBuffer, condition: impl FnOnce(&Books) -> bool) -> bool {
        {
            let mut books = self.books();
            if !condition(&books) {
                return false;
            }
            if let Some(tick) = buffer.tick.take() {
                books.order.remove(&tick);
                books.bytes -= buffer.bytes;
            }
        }
        buffer.retired = true;
        buffer.bytes = 0;
        buffer.entries = VecDeque::new();
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if topics.get(&slot.topic).is_some_and(|current| Arc::ptr_eq(current, slot)) {
            topics.remove(&slot.topic);
        }
        true
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
        loop {
            let Some(slot) = self.lookup(topic) else {
                // No buffer: registered under the gate its creation takes, so the new buffer's
                // first publication reaches this subscription.
                let _gate = self.gate(topic);
                if self.lookup(topic).is_some() {
                    continue;
                }
                register();
                return RecoveryOutcome::no_buffer();
            };
            let Some(buffer) = self.lock_live(&slot) else { continue };
            register();
            return self.evaluate(&buffer, requested, limit);
        }
    }

    /// The §9.4 table for a locked buffer.
    fn evaluate(&self, buffer: &TopicBuffer, requested: Requested, limit: ReplayLimit) -> RecoveryOutcome {
        if buffer.next_offset == 0 {
            return RecoveryOutcome::no_buffer();
        }
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
        loop {
            let slot = self.lookup(topic)?;
            let Some(buffer) = self.lock_live(&slot) else { continue };
            return (buffer.next_offset > 0).then(|| (buffer.epoch, buffer.head()));
        }
    }

    /// Buffers currently kept.
    pub fn buffer_count(&self) -> usize {
        self.books().order.len()
    }

    /// Bytes charged to the memory budget.
    pub fn memory(&self) -> usize {
        self.books().bytes
    }

    /// Drops idle buffers now (publishes, and subscribes to an idle topic, also do it as they go).
    pub fn expire_idle(&self) {
        self.maintain(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PublishReport;
    use crate::recovery::PublishDedup;
    use crate::recovery::tests::{at, publication, settings};
    use serde_json::json;
    use std::time::Duration;
    use wsengine_core::envelope::format_epoch;

    fn stamp(p: &Publication) -> Stamp {
        p.envelope().unwrap().stamp.clone().unwrap()
    }

    fn publish(history: &TopicHistory, topic: &str, n: u64) -> Arc<Publication> {
        history.publish(publication(topic, n), |_| ()).0
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

    /// A stand-in for the bus's subscriber registry: live subscriptions per topic, each taking
    /// the next `wanted` publications of its topic, plus a log of every publication fanned out.
    #[derive(Default)]
    struct Registry {
        live: Mutex<HashMap<String, Vec<LiveSubscription>>>,
        /// Every fan-out in the order it happened, per topic (one topic's fan-outs are ordered).
        log: Mutex<HashMap<String, Vec<Stamp>>>,
        /// Every stored publication by `(epoch, offset)`: a stamp given twice fails the test.
        stored: Mutex<HashMap<(u32, u64), Arc<Publication>>>,
    }

    /// A registered subscription and how many more publications it takes.
    struct LiveSubscription {
        sender: std::sync::mpsc::Sender<Stamp>,
        wanted: usize,
    }

    /// A subscription made by a test subscriber: what the history reported, what came live.
    struct Subscription {
        topic: String,
        reported: Option<(u32, u64)>,
        live: std::sync::mpsc::Receiver<Stamp>,
    }

    impl Registry {
        fn register(&self, topic: &str, wanted: usize) -> std::sync::mpsc::Receiver<Stamp> {
            let (sender, receiver) = std::sync::mpsc::channel();
            self.live.lock().unwrap().entry(topic.to_owned()).or_default().push(LiveSubscription { sender, wanted });
            receiver
        }

        fn fan_out(&self, publication: &Arc<Publication>) {
            let stamp = stamp(publication);
            let earlier = self.stored.lock().unwrap().insert((stamp.epoch, stamp.offset), Arc::clone(publication));
            assert!(earlier.is_none(), "stamp given twice: {stamp:?}");
            self.log.lock().unwrap().entry(stamp.topic.clone()).or_default().push(stamp.clone());
            let mut live = self.live.lock().unwrap();
            if let Some(subscriptions) = live.get_mut(&stamp.topic) {
                subscriptions.retain_mut(|subscription| {
                    let _ = subscription.sender.send(stamp.clone());
                    subscription.wanted -= 1;
                    subscription.wanted > 0
                });
            }
        }
    }

    /// Live stamps of one subscription: runs of one epoch, each contiguous; the first continues
    /// the reported position when it is of the reported epoch, every other run starts at 0, and
    /// no epoch comes back (nothing is stamped into a buffer that was already replaced).
    fn check_live(topic: &str, reported: Option<(u32, u64)>, live: &[Stamp]) {
        let mut seen_epochs = std::collections::HashSet::new();
        let mut previous: Option<&Stamp> = None;
        for stamp in live {
            assert_eq!(stamp.topic, topic);
            match previous {
                Some(p) if p.epoch == stamp.epoch => {
                    assert_eq!(stamp.offset, p.offset + 1, "gap or reorder in {topic}: {live:?}")
                }
                _ => {
                    assert!(seen_epochs.insert(stamp.epoch), "epoch {} came back in {topic}: {live:?}", stamp.epoch);
                    let first = match reported {
                        Some((epoch, head)) if previous.is_none() && epoch == stamp.epoch => head + 1,
                        _ => 0,
                    };
                    assert_eq!(stamp.offset, first, "run of {topic} starts wrong: {reported:?} {live:?}");
                }
            }
            previous = Some(stamp);
        }
    }

    /// What `memory()` should say: the entries of every buffer still in the map.
    fn audited_memory(history: &TopicHistory) -> usize {
        let slots: Vec<Arc<Slot>> = history.topics.read().unwrap().values().cloned().collect();
        slots
            .iter()
            .map(|slot| {
                let buffer = slot.lock();
                assert!(!buffer.retired);
                let bytes: usize = buffer.entries.iter().map(|(_, size)| size).sum();
                assert_eq!(bytes, buffer.bytes);
                bytes
            })
            .sum()
    }

    /// One subscriber's loop: subscribes again and again to the topics, asking to recover from
    /// positions at and behind the head (some beyond the ring), and checks each replay.
    fn subscribe_repeatedly(
        history: &TopicHistory,
        registry: &Registry,
        topics: &[String],
        rounds: usize,
    ) -> Vec<Subscription> {
        let mut subscriptions = Vec::new();
        for round in 0..rounds {
            let topic = &topics[round % topics.len()];
            let requested = match history.position(topic) {
                Some((epoch, head)) => at(epoch, head.saturating_sub((round % 24) as u64)),
                None => Requested::NotAsked,
            };
            let mut receiver = None;
            let outcome = history.subscribe(topic, requested, ReplayLimit::unlimited(), || {
                receiver = Some(registry.register(topic, 20));
            });
            let reported = outcome.epoch.map(|epoch| (epoch, outcome.offset));
            if outcome.recovered {
                let (Requested::At { offset, .. }, Some((epoch, head))) = (requested, reported) else {
                    panic!("recovered without a position")
                };
                let offsets: Vec<u64> = outcome.replay.iter().map(|p| stamp(p).offset).collect();
                assert_eq!(offsets, (offset + 1..=head).collect::<Vec<_>>());
                let stored = registry.stored.lock().unwrap();
                for publication in &outcome.replay {
                    assert_eq!(stamp(publication).epoch, epoch);
                    assert!(Arc::ptr_eq(publication, &stored[&(epoch, stamp(publication).offset)]));
                }
            }
            subscriptions.push(Subscription { topic: topic.clone(), reported, live: receiver.expect("registered") });
            std::thread::yield_now();
        }
        subscriptions
    }

    /// Runs `test` on its own thread and fails if it does not finish within `limit`: a
    /// deadlock or livelock fails the test instead of hanging it.
    fn within<T: Send + 'static>(limit: Duration, test: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = std::thread::spawn(move || tx.send(test()).unwrap());
        match rx.recv_timeout(limit) {
            Ok(value) => value,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("did not finish within {limit:?}"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(runner.join().expect_err("the test panicked"))
            }
        }
    }

    #[test]
    fn publishes_to_different_topics_do_not_wait_for_each_other() {
        let history = TopicHistory::new(settings(16));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let history = &history;
            let blocked = scope.spawn(move || {
                // Fans out only once "b" has been published: with a lock shared by all topics
                // the other publish could not finish, and this times out instead of hanging.
                history
                    .publish(publication("a", 0), |_| {
                        entered_tx.send(()).unwrap();
                        done_rx.recv_timeout(Duration::from_secs(3)).is_ok()
                    })
                    .1
            });
            entered_rx.recv_timeout(Duration::from_secs(3)).expect("the first publish fans out");
            let other = publish(history, "b", 0);
            done_tx.send(()).unwrap();
            assert_eq!(stamp(&other).offset, 0);
            assert!(blocked.join().unwrap(), "the publish to b waited for the fan-out of a");
        });
        assert_eq!(history.buffer_count(), 2);
    }

    #[test]
    fn publishes_to_one_topic_wait_for_the_fan_out_before_them() {
        let history = TopicHistory::new(settings(16));
        let released = std::sync::atomic::AtomicBool::new(false);
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                history.publish(publication("a", 0), |_| {
                    entered_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    released.store(true, Ordering::SeqCst);
                })
            });
            entered_rx.recv_timeout(Duration::from_secs(3)).unwrap();
            let second = history.publish(publication("a", 1), |_| released.load(Ordering::SeqCst));
            assert!(second.1, "the second fan-out ran during the first");
            assert_eq!(stamp(&second.0).offset, 1);
        });
    }

    #[test]
    fn concurrent_publishes_and_recovering_subscribes_keep_each_topic_in_order() {
        within(Duration::from_secs(30), || {
            let history = TopicHistory::new(settings(16));
            let registry = Registry::default();
            let topics: Vec<String> = (0..3).map(|n| format!("t{n}")).collect();
            let per_thread = 2_000;
            let subscriptions = std::thread::scope(|scope| {
                for thread in 0..4 {
                    let (history, registry, topics) = (&history, &registry, &topics);
                    scope.spawn(move || {
                        for n in 0..per_thread {
                            let topic = &topics[(n + thread) % topics.len()];
                            history.publish(publication(topic, n as u64), |p| registry.fan_out(p));
                            if n % 64 == 0 {
                                std::thread::yield_now();
                            }
                        }
                    });
                }
                let subscribers: Vec<_> =
                    (0..2).map(|_| scope.spawn(|| subscribe_repeatedly(&history, &registry, &topics, 300))).collect();
                subscribers.into_iter().flat_map(|s| s.join().unwrap()).collect::<Vec<_>>()
            });
            let log = registry.log.lock().unwrap();
            let mut total = 0;
            for topic in &topics {
                // No eviction, no expiry: one epoch per topic, every offset once, in order.
                let stamps = &log[topic];
                check_live(topic, None, stamps);
                assert!(stamps.iter().all(|s| s.epoch == stamps[0].epoch));
                assert_eq!(history.position(topic), Some((stamps[0].epoch, stamps.len() as u64 - 1)));
                total += stamps.len();
            }
            assert_eq!(total, 4 * per_thread);
            for subscription in &subscriptions {
                let live: Vec<Stamp> = subscription.live.try_iter().collect();
                check_live(&subscription.topic, subscription.reported, &live);
            }
            assert_eq!(history.memory(), audited_memory(&history));
        });
    }

    #[test]
    fn eviction_and_expiry_racing_with_publishes_keep_memory_exact_and_epochs_fresh() {
        within(Duration::from_secs(30), || {
            let one = publication("t0", 1000).json_len() + ENTRY_OVERHEAD;
            let ttl = Duration::from_millis(3);
            // Room for about two full rings: most publishes to a fresh topic evict another one.
            let history = TopicHistory::new(RecoverySettings { ttl, memory_budget: one * 40, ..settings(16) });
            let registry = Registry::default();
            let topics: Vec<String> = (0..8).map(|n| format!("t{n}")).collect();
            let running = std::sync::atomic::AtomicBool::new(true);
            let subscriptions = std::thread::scope(|scope| {
                let publishers: Vec<_> = (0..4)
                    .map(|thread| {
                        let (history, registry, topics) = (&history, &registry, &topics);
                        scope.spawn(move || {
                            for n in 0..2_000usize {
                                let topic = &topics[(n / 7 + thread * 3) % topics.len()];
                                history.publish(publication(topic, n as u64), |p| registry.fan_out(p));
                                if n % 250 == 0 {
                                    // Long enough for other topics to go idle.
                                    std::thread::sleep(ttl + Duration::from_millis(1));
                                }
                            }
                        })
                    })
                    .collect();
                scope.spawn(|| {
                    while running.load(Ordering::Relaxed) {
                        history.expire_idle();
                        // Each publisher stores one entry before it makes room.
                        assert!(history.memory() <= one * 44);
                        std::thread::yield_now();
                    }
                });
                let subscribers: Vec<_> =
                    (0..2).map(|_| scope.spawn(|| subscribe_repeatedly(&history, &registry, &topics, 300))).collect();
                let published: Vec<_> = publishers.into_iter().map(|publisher| publisher.join()).collect();
                let subscriptions: Vec<_> = subscribers.into_iter().map(|subscriber| subscriber.join()).collect();
                // Stopped before anything can fail, so a failure ends the test instead of hanging it.
                running.store(false, Ordering::Relaxed);
                published.into_iter().for_each(|result| result.unwrap());
                subscriptions.into_iter().flat_map(|result| result.unwrap()).collect::<Vec<_>>()
            });
            let log = registry.log.lock().unwrap();
            let epochs: Vec<u32> = log.values().flatten().filter(|s| s.offset == 0).map(|s| s.epoch).collect();
            assert!(epochs.len() > topics.len(), "buffers were evicted or expired and recreated");
            assert_eq!(
                epochs.len(),
                epochs.iter().collect::<std::collections::HashSet<_>>().len(),
                "an epoch came back"
            );
            for (topic, stamps) in log.iter() {
                check_live(topic, None, stamps);
            }
            for subscription in &subscriptions {
                let live: Vec<Stamp> = subscription.live.try_iter().collect();
                check_live(&subscription.topic, subscription.reported, &live);
            }
            assert_eq!(history.memory(), audited_memory(&history));
            assert!(history.memory() <= one * 40);
            assert_eq!(history.buffer_count(), history.topics.read().unwrap().len());
            std::thread::sleep(ttl);
            history.expire_idle();
            assert_eq!((history.memory(), history.buffer_count()), (0, 0));
            assert!(history.topics.read().unwrap().is_empty());
        });
    }
}
