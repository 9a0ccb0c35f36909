//! The dead-letter queue: messages the engine could not deliver or handle, kept for inspection
//! and replay.
//!
//! Two kinds of failures land here: publications the bus refused (or that a circuit breaker
//! kept from the bus), and application messages whose handler failed. Each [`DeadLetter`]
//! keeps the message, where it was going (the topic) or where it came from (connection and
//! user), why it failed, when, and how many attempts it has had.
//!
//! [`DeadLetterStore`] is the storage seam; its methods return futures so that a networked
//! store (Redis) can implement it. [`MemoryDeadLetters`] is the in-process store: bounded per
//! topic (oldest evicted first), globally, and by age. [`replay`] runs a replay over any store:
//! it takes the matching letters, tries each once, removes the ones that succeed and puts the
//! others back with one more attempt.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use wsengine_services::dlq::{
//!     replay, DeadLetterFilter, DeadLetterLimits, DeadLetterQuery, DeadLetterSource, DeadLetterStore,
//!     MemoryDeadLetters, NewDeadLetter,
//! };
//!
//! let store = MemoryDeadLetters::new(DeadLetterLimits::default());
//! let source = DeadLetterSource::Publish { topic: "prices".into() };
//! let message = serde_json::json!({"t": "price_update", "p": {"AAPL": 187.5}});
//! store.push(NewDeadLetter::new(source, message, "bus error: connection refused")).await?;
//!
//! let page = store.list(DeadLetterQuery::new(DeadLetterFilter::topic("prices"))).await?;
//! assert_eq!(page.entries.len(), 1);
//! assert_eq!(page.entries[0].attempts, 1);
//!
//! // The bus is back: the replay succeeds and the letter is gone.
//! let report = replay(&store, DeadLetterFilter::default(), |_letter| async { Ok(()) }).await?;
//! assert_eq!((report.replayed, report.failed), (1, 0));
//! assert_eq!(store.count().await?, 0);
//! # Ok::<(), wsengine_services::dlq::DlqError>(())
//! # }).unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;
use wsengine_core::{Envelope, ProtocolError};

use crate::handler::{AppBody, AppMessage, Handler};
use crate::message::BoxError;

/// Where a dead letter was going, or where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeadLetterSource {
    /// A publication to `topic` that did not reach the bus.
    Publish {
        /// The topic.
        topic: String,
    },
    /// An application message whose handler failed.
    Handler {
        /// The sending connection.
        connection_id: String,
        /// The sending user.
        user_id: String,
    },
}

impl DeadLetterSource {
    /// The topic of a publish failure.
    pub fn topic(&self) -> Option<&str> {
        match self {
            DeadLetterSource::Publish { topic } => Some(topic),
            DeadLetterSource::Handler { .. } => None,
        }
    }

    fn kind(&self) -> DeadLetterKind {
        match self {
            DeadLetterSource::Publish { .. } => DeadLetterKind::Publish,
            DeadLetterSource::Handler { .. } => DeadLetterKind::Handler,
        }
    }
}

/// The two kinds of dead letters, for filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// Failed publications.
    Publish,
    /// Failed application messages.
    Handler,
}

impl DeadLetterKind {
    /// Parses `publish` or `handler`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "publish" => Some(DeadLetterKind::Publish),
            "handler" => Some(DeadLetterKind::Handler),
            _ => None,
        }
    }
}

/// A failure to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// Where the message was going or came from.
    pub source: DeadLetterSource,
    /// The message as JSON: the publication's envelope, or the inbound message (a string for
    /// raw text).
    pub message: Value,
    /// Why it failed.
    pub reason: String,
}

impl NewDeadLetter {
    /// A failure of `message` for `reason`.
    pub fn new(source: DeadLetterSource, message: Value, reason: impl Into<String>) -> Self {
        NewDeadLetter { source, message, reason: reason.into() }
    }
}

/// A stored failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// Store-assigned id; ids of one store sort in insertion order as the store defines it.
    pub id: String,
    /// Where the message was going or came from (serialized flat, with `kind`).
    #[serde(flatten)]
    pub source: DeadLetterSource,
    /// The message.
    pub message: Value,
    /// Why the last attempt failed.
    pub reason: String,
    /// When it first failed (RFC 3339).
    pub failed_at: String,
    /// When the last attempt failed (RFC 3339).
    pub last_failed_at: String,
    /// Attempts so far, the original one included.
    pub attempts: u32,
}

/// Which dead letters a listing or replay is about. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only publish failures to this topic.
    pub topic: Option<String>,
    /// Only this kind.
    pub kind: Option<DeadLetterKind>,
    /// Only these ids.
    pub ids: Option<Vec<String>>,
}

impl DeadLetterFilter {
    /// Publish failures to `topic`.
    pub fn topic(topic: impl Into<String>) -> Self {
        DeadLetterFilter { topic: Some(topic.into()), ..DeadLetterFilter::default() }
    }

    /// The letters with these ids.
    pub fn ids(ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        DeadLetterFilter { ids: Some(ids.into_iter().map(Into::into).collect()), ..DeadLetterFilter::default() }
    }

    /// Whether `letter` matches.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.topic.as_deref().is_none_or(|t| letter.source.topic() == Some(t))
            && self.kind.is_none_or(|k| letter.source.kind() == k)
            && self.ids.as_ref().is_none_or(|ids| ids.contains(&letter.id))
    }
}

/// A page request: a filter, a page size and where the previous page ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterQuery {
    /// Which letters.
    pub filter: DeadLetterFilter,
    /// At most this many (default 100).
    pub limit: usize,
    /// Only letters after this cursor (the previous page's `next_cursor`).
    pub after: Option<String>,
}

impl DeadLetterQuery {
    /// The first page of up to 100 letters matching `filter`, oldest first.
    pub fn new(filter: DeadLetterFilter) -> Self {
        DeadLetterQuery { filter, limit: 100, after: None }
    }

    /// Sets the page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Continues after `cursor`.
    pub fn after(mut self, cursor: impl Into<String>) -> Self {
        self.after = Some(cursor.into());
        self
    }
}

/// One page of dead letters, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterPage {
    /// The letters.
    pub entries: Vec<DeadLetter>,
    /// Pass as [`DeadLetterQuery::after`] for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A store failed (a networked store's connection, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqError(pub String);

impl fmt::Display for DlqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dead-letter store: {}", self.0)
    }
}

impl std::error::Error for DlqError {}

/// Storage for dead letters. Letters are ordered oldest first.
///
/// A replay claims letters with [`take`](Self::take) (they disappear from listings and other
/// takes), then either [`remove`](Self::remove)s each one or [`restore`](Self::restore)s it with
/// its attempt count and reason updated. A store may evict or expire letters at any time,
/// claimed ones included; removing or restoring a letter that is gone does nothing.
pub trait DeadLetterStore: Send + Sync + fmt::Debug + 'static {
    /// Records a failure; returns the new letter's id.
    fn push(&self, letter: NewDeadLetter) -> BoxFuture<'static, Result<String, DlqError>>;

    /// Lists letters without claiming them.
    fn list(&self, query: DeadLetterQuery) -> BoxFuture<'static, Result<DeadLetterPage, DlqError>>;

    /// Claims up to `query.limit` matching letters for a replay.
    fn take(&self, query: DeadLetterQuery) -> BoxFuture<'static, Result<DeadLetterPage, DlqError>>;

    /// Puts a claimed letter back in its place, with its `attempts`, `reason` and
    /// `last_failed_at` as given.
    fn restore(&self, letter: DeadLetter) -> BoxFuture<'static, Result<(), DlqError>>;

    /// Deletes letters (claimed or not); returns how many existed.
    fn remove(&self, ids: Vec<String>) -> BoxFuture<'static, Result<usize, DlqError>>;

    /// Letters stored, claimed ones included.
    fn count(&self) -> BoxFuture<'static, Result<usize, DlqError>>;
}

/// Bounds of a [`MemoryDeadLetters`] store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// Letters kept per topic (handler failures count as one topic); the oldest is evicted
    /// first. Default 1000.
    pub max_per_topic: usize,
    /// Letters kept in all; the oldest is evicted first. Default 100,000.
    pub max_entries: usize,
    /// Letters older than this (since their first failure) are dropped. Default 7 days.
    pub ttl: Duration,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        DeadLetterLimits { max_per_topic: 1000, max_entries: 100_000, ttl: Duration::from_secs(7 * 24 * 3600) }
    }
}

/// Counters of a [`MemoryDeadLetters`] store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetterStats {
    /// Letters stored now.
    pub entries: usize,
    /// Letters evicted by a cap since the store was created.
    pub evicted: u64,
    /// Letters dropped for age since the store was created.
    pub expired: u64,
}

/// The in-process dead-letter store.
#[derive(Debug, Clone)]
pub struct MemoryDeadLetters {
    inner: Arc<Mutex<Letters>>,
}

#[derive(Debug)]
struct Letters {
    limits: DeadLetterLimits,
    next_id: u64,
    entries: BTreeMap<u64, Stored>,
    /// Ids per topic; `None` holds the handler failures.
    partitions: HashMap<Option<String>, BTreeSet<u64>>,
    evicted: u64,
    expired: u64,
}

#[derive(Debug)]
struct Stored {
    letter: DeadLetter,
    created: Instant,
    claimed: bool,
}

impl MemoryDeadLetters {
    /// An empty store with these bounds (each cap at least 1).
    pub fn new(mut limits: DeadLetterLimits) -> Self {
        limits.max_per_topic = limits.max_per_topic.max(1);
        limits.max_entries = limits.max_entries.max(1);
        let letters = Letters {
            limits,
            next_id: 1,
            entries: BTreeMap::new(),
            partitions: HashMap::new(),
            evicted: 0,
            expired: 0,
        };
        MemoryDeadLetters { inner: Arc::new(Mutex::new(letters)) }
    }

    /// Counters, after dropping expired letters.
    pub fn stats(&self) -> DeadLetterStats {
        let mut letters = self.lock();
        letters.expire(Instant::now());
        DeadLetterStats { entries: letters.entries.len(), evicted: letters.evicted, expired: letters.expired }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Letters> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn page(&self, query: &DeadLetterQuery, claim: bool) -> DeadLetterPage {
        let mut letters = self.lock();
        letters.expire(Instant::now());
        let after = query.after.as_deref().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        let candidates: Vec<u64> = match (&query.filter.ids, &query.filter.topic) {
            (Some(ids), _) => {
                let mut ids: Vec<u64> = ids.iter().filter_map(|id| id.parse().ok()).filter(|&id| id > after).collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
            (None, Some(topic)) => letters
                .partitions
                .get(&Some(topic.clone()))
                .map(|ids| ids.range(after + 1..).copied().collect())
                .unwrap_or_default(),
            (None, None) => letters.entries.range(after + 1..).map(|(&id, _)| id).collect(),
        };
        let mut entries = Vec::new();
        let mut next_cursor = None;
        for id in candidates {
            let Some(stored) = letters.entries.get_mut(&id) else { continue };
            if stored.claimed || !query.filter.matches(&stored.letter) {
                continue;
            }
            if entries.len() == query.limit {
                next_cursor = entries.last().map(|l: &DeadLetter| l.id.clone());
                break;
            }
            stored.claimed = claim;
            entries.push(stored.letter.clone());
        }
        DeadLetterPage { entries, next_cursor }
    }
}

impl Letters {
    fn expire(&mut self, now: Instant) {
        let ttl = self.limits.ttl;
        while let Some((&id, stored)) = self.entries.first_key_value() {
            if now.saturating_duration_since(stored.created) < ttl {
                break;
            }
            self.delete(id);
            self.expired += 1;
        }
    }

    fn delete(&mut self, id: u64) -> Option<Stored> {
        let stored = self.entries.remove(&id)?;
        let partition = stored.letter.source.topic().map(str::to_owned);
        if let Some(ids) = self.partitions.get_mut(&partition) {
            ids.remove(&id);
            if ids.is_empty() {
                self.partitions.remove(&partition);
            }
        }
        Some(stored)
    }

    fn insert(&mut self, id: u64, stored: Stored) {
        let partition = stored.letter.source.topic().map(str::to_owned);
        self.entries.insert(id, stored);
        let ids = self.partitions.entry(partition.clone()).or_default();
        ids.insert(id);
        if ids.len() > self.limits.max_per_topic {
            if let Some(oldest) = ids.first().copied() {
                self.delete(oldest);
                self.evicted += 1;
            }
        }
        if self.entries.len() > self.limits.max_entries {
            if let Some(oldest) = self.entries.first_key_value().map(|(&id, _)| id) {
                self.delete(oldest);
                self.evicted += 1;
            }
        }
    }
}

impl DeadLetterStore for MemoryDeadLetters {
    fn push(&self, new: NewDeadLetter) -> BoxFuture<'static, Result<String, DlqError>> {
        let now = Instant::now();
        let mut letters = self.lock();
        letters.expire(now);
        let id = letters.next_id;
        letters.next_id += 1;
        let at = wsengine_core::time::now_rfc3339();
        let letter = DeadLetter {
            id: id.to_string(),
            source: new.source,
            message: new.message,
            reason: new.reason,
            failed_at: at.clone(),
            last_failed_at: at,
            attempts: 1,
        };
        letters.insert(id, Stored { letter, created: now, claimed: false });
        Box::pin(std::future::ready(Ok(id.to_string())))
    }

    fn list(&self, query: DeadLetterQuery) -> BoxFuture<'static, Result<DeadLetterPage, DlqError>> {
        Box::pin(std::future::ready(Ok(self.page(&query, false))))
    }

    fn take(&self, query: DeadLetterQuery) -> BoxFuture<'static, Result<DeadLetterPage, DlqError>> {
        Box::pin(std::future::ready(Ok(self.page(&query, true))))
    }

    fn restore(&self, letter: DeadLetter) -> BoxFuture<'static, Result<(), DlqError>> {
        let mut letters = self.lock();
        if let Some(stored) = letter.id.parse::<u64>().ok().and_then(|id| letters.entries.get_mut(&id)) {
            stored.letter = letter;
            stored.claimed = false;
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn remove(&self, ids: Vec<String>) -> BoxFuture<'static, Result<usize, DlqError>> {
        let mut letters = self.lock();
        let removed =
            ids.iter().filter_map(|id| id.parse::<u64>().ok()).filter(|&id| letters.delete(id).is_some()).count();
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn count(&self) -> BoxFuture<'static, Result<usize, DlqError>> {
        Box::pin(std::future::ready(Ok(self.stats().entries)))
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Letters that went through and were removed.
    pub replayed: usize,
    /// Letters that failed again and stay, with one more attempt.
    pub failed: usize,
}

/// Letters claimed per round trip to the store during a replay.
const REPLAY_BATCH: usize = 100;

/// Replays every letter matching `filter`, oldest first, each exactly once: `attempt` gets the
/// letter and says whether it went through (or why not). Successes are removed; failures are
/// put back with `attempts + 1`, the new reason and time.
pub async fn replay<F, Fut>(
    store: &dyn DeadLetterStore,
    filter: DeadLetterFilter,
    mut attempt: F,
) -> Result<ReplayReport, DlqError>
where
    F: FnMut(&DeadLetter) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut report = ReplayReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let query = DeadLetterQuery { filter: filter.clone(), limit: REPLAY_BATCH, after: cursor.take() };
        let page = store.take(query).await?;
        let last = page.entries.last().map(|l| l.id.clone());
        let mut succeeded = Vec::new();
        let mut outcome = Ok(());
        let mut letters = page.entries.into_iter();
        for mut letter in letters.by_ref() {
            match attempt(&letter).await {
                Ok(()) => {
                    succeeded.push(letter.id);
                    report.replayed += 1;
                }
                Err(reason) => {
                    letter.attempts = letter.attempts.saturating_add(1);
                    letter.reason = reason;
                    letter.last_failed_at = wsengine_core::time::now_rfc3339();
                    report.failed += 1;
                    if let Err(error) = store.restore(letter).await {
                        outcome = Err(error);
                        break;
                    }
                }
            }
        }
        // A store failure mid-batch: hand back what was claimed but not tried, then report it.
        for letter in letters {
            store.restore(letter).await.ok();
        }
        if !succeeded.is_empty() {
            store.remove(succeeded).await?;
        }
        outcome?;
        match (page.next_cursor, last) {
            (Some(_), Some(last)) => cursor = Some(last),
            _ => return Ok(report),
        }
    }
}

/// A [`Handler`] that records the failures of another one in a dead-letter store.
///
/// Errors that are [`ProtocolError`]s are answers for the client (a refused message, an open
/// circuit breaker), not failures, and are not recorded. Raw binary messages are not recorded
/// (the letter would not be JSON). Either way the error still reaches the client.
#[derive(Clone)]
pub struct DeadLetterOnFailure {
    handler: Arc<dyn Handler>,
    store: Arc<dyn DeadLetterStore>,
}

impl fmt::Debug for DeadLetterOnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterOnFailure").field("store", &self.store).finish_non_exhaustive()
    }
}

impl DeadLetterOnFailure {
    /// Wraps `handler`.
    pub fn new(handler: Arc<dyn Handler>, store: Arc<dyn DeadLetterStore>) -> Self {
        DeadLetterOnFailure { handler, store }
    }
}

impl Handler for DeadLetterOnFailure {
    fn handle(&self, message: AppMessage) -> BoxFuture<'static, Result<Vec<Envelope>, BoxError>> {
        let copy = match &message.body {
            AppBody::Message(m) => Some(Value::Object(m.fields().clone())),
            AppBody::RawText(text) => Some(Value::String(text.as_str().to_owned())),
            AppBody::RawBinary(_) => None,
        };
        let source = DeadLetterSource::Handler {
            connection_id: message.connection_id.to_string(),
            user_id: message.user_id.clone(),
        };
        let handled = self.handler.handle(message);
        let store = Arc::clone(&self.store);
        Box::pin(async move {
            let result = handled.await;
            if let (Err(error), Some(copy)) = (&result, copy) {
                if !error.is::<ProtocolError>() {
                    if let Err(store_error) = store.push(NewDeadLetter::new(source, copy, error.to_string())).await {
                        tracing::warn!(%store_error, "could not record a handler failure");
                    }
                }
            }
            result
        })
    }

    fn accepts_raw(&self) -> bool {
        self.handler.accepts_raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn publish(topic: &str, n: u64) -> NewDeadLetter {
        NewDeadLetter::new(
            DeadLetterSource::Publish { topic: topic.into() },
            json!({"t": "tick", "p": {"n": n}}),
            "bus down",
        )
    }

    fn handler_failure(n: u64) -> NewDeadLetter {
        let source = DeadLetterSource::Handler { connection_id: "c".into(), user_id: "u".into() };
        NewDeadLetter::new(source, json!({"t": "chat", "p": {"n": n}}), "db down")
    }

    fn numbers(page: &DeadLetterPage) -> Vec<u64> {
        page.entries.iter().map(|l| l.message["p"]["n"].as_u64().unwrap()).collect()
    }

    async fn all(store: &MemoryDeadLetters, filter: DeadLetterFilter) -> DeadLetterPage {
        store.list(DeadLetterQuery::new(filter).limit(usize::MAX)).await.unwrap()
    }

    #[tokio::test]
    async fn the_per_topic_cap_evicts_the_oldest_of_that_topic() {
        let store = MemoryDeadLetters::new(DeadLetterLimits { max_per_topic: 3, ..DeadLetterLimits::default() });
        for n in 0..5 {
            store.push(publish("a", n)).await.unwrap();
        }
        store.push(publish("b", 100)).await.unwrap();
        assert_eq!(numbers(&all(&store, DeadLetterFilter::topic("a")).await), [2, 3, 4]);
        assert_eq!(numbers(&all(&store, DeadLetterFilter::topic("b")).await), [100]);
        for n in 0..4 {
            store.push(handler_failure(n)).await.unwrap();
        }
        let handler = DeadLetterFilter { kind: Some(DeadLetterKind::Handler), ..DeadLetterFilter::default() };
        assert_eq!(numbers(&all(&store, handler).await), [1, 2, 3], "handler failures share one cap");
        assert_eq!(store.stats(), DeadLetterStats { entries: 7, evicted: 3, expired: 0 });
    }

    #[tokio::test]
    async fn the_global_cap_evicts_the_oldest_of_all() {
        let store = MemoryDeadLetters::new(DeadLetterLimits { max_entries: 3, ..DeadLetterLimits::default() });
        store.push(publish("a", 1)).await.unwrap();
        store.push(publish("b", 2)).await.unwrap();
        store.push(publish("a", 3)).await.unwrap();
        store.push(publish("c", 4)).await.unwrap();
        assert_eq!(numbers(&all(&store, DeadLetterFilter::default()).await), [2, 3, 4]);
        assert_eq!(store.count().await.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn letters_expire_after_the_ttl() {
        let store =
            MemoryDeadLetters::new(DeadLetterLimits { ttl: Duration::from_secs(100), ..DeadLetterLimits::default() });
        store.push(publish("a", 1)).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        store.push(publish("a", 2)).await.unwrap();
        tokio::time::advance(Duration::from_secs(39)).await;
        assert_eq!(numbers(&all(&store, DeadLetterFilter::default()).await), [1, 2]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(numbers(&all(&store, DeadLetterFilter::default()).await), [2]);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(store.stats(), DeadLetterStats { entries: 0, evicted: 0, expired: 2 });
    }

    #[tokio::test]
    async fn default_limits_are_the_documented_ones() {
        let limits = DeadLetterLimits::default();
        assert_eq!((limits.max_per_topic, limits.max_entries), (1000, 100_000));
        assert_eq!(limits.ttl, Duration::from_secs(604_800));
    }

    #[tokio::test]
    async fn listing_pages_with_a_cursor_and_filters() {
        let store = MemoryDeadLetters::new(DeadLetterLimits::default());
        for n in 0..5 {
            store.push(publish(if n % 2 == 0 { "even" } else { "odd" }, n)).await.unwrap();
        }
        let first = store.list(DeadLetterQuery::new(DeadLetterFilter::default()).limit(2)).await.unwrap();
        assert_eq!(numbers(&first), [0, 1]);
        let cursor = first.next_cursor.clone().expect("more pages");
        let second =
            store.list(DeadLetterQuery::new(DeadLetterFilter::default()).limit(2).after(cursor)).await.unwrap();
        assert_eq!(numbers(&second), [2, 3]);
        let third = store
            .list(DeadLetterQuery::new(DeadLetterFilter::default()).limit(2).after(second.next_cursor.unwrap()))
            .await
            .unwrap();
        assert_eq!((numbers(&third), third.next_cursor), (vec![4], None));
        assert_eq!(numbers(&all(&store, DeadLetterFilter::topic("even")).await), [0, 2, 4]);
        let ids = vec![first.entries[1].id.clone(), "999".into(), "not-a-number".into()];
        assert_eq!(numbers(&all(&store, DeadLetterFilter::ids(ids)).await), [1]);
        assert_eq!(all(&store, DeadLetterFilter::topic("none")).await.entries.len(), 0);
    }

    #[tokio::test]
    async fn replay_removes_successes_and_keeps_failures_with_one_more_attempt() {
        let store = MemoryDeadLetters::new(DeadLetterLimits::default());
        for n in 0..250 {
            store.push(publish("t", n)).await.unwrap();
        }
        let report = replay(&store, DeadLetterFilter::default(), |letter| {
            let odd = letter.message["p"]["n"].as_u64().unwrap() % 2 == 1;
            async move { if odd { Err("still down".to_owned()) } else { Ok(()) } }
        })
        .await
        .unwrap();
        assert_eq!(report, ReplayReport { replayed: 125, failed: 125 });
        let left = all(&store, DeadLetterFilter::default()).await;
        assert_eq!(left.entries.len(), 125);
        assert!(left.entries.iter().all(|l| l.attempts == 2 && l.reason == "still down"));
        assert_eq!(numbers(&left)[..3], [1, 3, 5], "failures keep their place");
        // The cause is fixed: everything goes through.
        let report = replay(&store, DeadLetterFilter::default(), |_| async { Ok(()) }).await.unwrap();
        assert_eq!(report, ReplayReport { replayed: 125, failed: 0 });
        assert_eq!(store.count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn replay_by_topic_and_ids_touches_only_those() {
        let store = MemoryDeadLetters::new(DeadLetterLimits::default());
        let a = store.push(publish("a", 1)).await.unwrap();
        store.push(publish("b", 2)).await.unwrap();
        store.push(publish("a", 3)).await.unwrap();
        let report = replay(&store, DeadLetterFilter::ids([a]), |_| async { Ok(()) }).await.unwrap();
        assert_eq!(report.replayed, 1);
        let report = replay(&store, DeadLetterFilter::topic("b"), |_| async { Ok(()) }).await.unwrap();
        assert_eq!(report.replayed, 1);
        assert_eq!(numbers(&all(&store, DeadLetterFilter::default()).await), [3]);
    }

    #[tokio::test]
    async fn claimed_letters_are_hidden_until_restored() {
        let store = MemoryDeadLetters::new(DeadLetterLimits::default());
        store.push(publish("a", 1)).await.unwrap();
        let mut taken = store.take(DeadLetterQuery::new(DeadLetterFilter::default())).await.unwrap();
        assert_eq!(all(&store, DeadLetterFilter::default()).await.entries.len(), 0);
        assert_eq!(store.take(DeadLetterQuery::new(DeadLetterFilter::default())).await.unwrap().entries.len(), 0);
        assert_eq!(store.count().await.unwrap(), 1);
        store.restore(taken.entries.remove(0)).await.unwrap();
        assert_eq!(all(&store, DeadLetterFilter::default()).await.entries.len(), 1);
    }

    #[test]
    fn letters_serialize_flat_with_their_kind() {
        let letter = DeadLetter {
            id: "7".into(),
            source: DeadLetterSource::Publish { topic: "prices".into() },
            message: json!({"t": "x"}),
            reason: "bus".into(),
            failed_at: "2026-11-29T16:22:17.840Z".into(),
            last_failed_at: "2026-11-29T16:22:17.840Z".into(),
            attempts: 1,
        };
        let value = serde_json::to_value(&letter).unwrap();
        assert_eq!(value["kind"], "publish");
        assert_eq!(value["topic"], "prices");
        assert_eq!(DeadLetterKind::parse("handler"), Some(DeadLetterKind::Handler));
        assert_eq!(DeadLetterKind::parse("other"), None);
    }

    #[tokio::test]
    async fn handler_failures_are_recorded_but_protocol_errors_are_not() {
        use crate::connection::ConnectionId;
        use crate::handler::handler_fn;
        let store = Arc::new(MemoryDeadLetters::new(DeadLetterLimits::default()));
        let handler = handler_fn(|message: AppMessage| async move {
            let AppBody::Message(m) = &message.body else { return Ok(vec![]) };
            match m.t() {
                Some("fail") => Err::<Vec<Envelope>, BoxError>("database down".into()),
                Some("refuse") => Err(ProtocolError::invalid_request("no").into()),
                _ => Ok(vec![]),
            }
        });
        let recorded = DeadLetterOnFailure::new(Arc::new(handler), store.clone());
        for t in ["fail", "refuse", "ok"] {
            let fields = json!({"t": t, "p": {}}).as_object().unwrap().clone();
            let message = AppMessage {
                connection_id: ConnectionId::new(),
                user_id: "alice".into(),
                body: AppBody::Message(wsengine_core::InboundMessage::from_map(fields)),
                encrypted: false,
                signature: crate::handler::SignatureStatus::default(),
            };
            let result = recorded.handle(message).await;
            assert_eq!(result.is_ok(), t == "ok");
        }
        let letters = all(&store, DeadLetterFilter::default()).await;
        assert_eq!(letters.entries.len(), 1);
        let letter = &letters.entries[0];
        assert_eq!(letter.message["t"], "fail");
        assert_eq!(letter.reason, "database down");
        assert!(matches!(&letter.source, DeadLetterSource::Handler { user_id, .. } if user_id == "alice"));
    }
}
