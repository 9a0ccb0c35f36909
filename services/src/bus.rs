//! The bus: how publications reach the subscribers of a topic.
//!
//! [`Bus`] is the seam between the engine and its fan-out transport. [`MemoryBus`] is the
//! embedded default: publications go straight to the local subscribers of the topic, every
//! subscriber sharing one `Arc<Publication>`.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use wsengine_core::{Envelope, WireFormat};
//! use wsengine_services::bus::{Bus, MemoryBus};
//! use wsengine_services::connection::{Connection, ConnectionId, Delivery};
//! use wsengine_services::publication::Publication;
//!
//! let bus = MemoryBus::new();
//! let (tx, mut rx) = wsengine_services::connection::delivery_channel(8);
//! let connection = Arc::new(Connection::new(ConnectionId::new(), None, WireFormat::Json, tx));
//! bus.subscribe(&connection, "prices.*");
//! let report = bus.publish(Publication::new("prices.aapl", Envelope::new("tick", serde_json::json!({})))).await.unwrap();
//! assert_eq!(report.delivered, 1);
//! assert!(matches!(rx.recv().await, Some(Delivery::Publication(_))));
//! # });
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;
use wsengine_core::topic::{glob_match, is_pattern};

use crate::connection::{Connection, ConnectionId, Delivery};
#[cfg(feature = "filters")]
use crate::filter::{Filter, Verdicts};
use crate::publication::Publication;
use crate::recovery::{PublishDedup, RecoveryOutcome, ReplayLimit, Requested};
#[cfg(feature = "recovery")]
use crate::recovery::{RecoverySettings, TopicHistory};

/// What a publish did.
#[derive(Debug, Clone)]
pub struct PublishReport {
    /// Local subscribers the publication was queued for.
    pub delivered: usize,
    /// Local subscribers that matched but could not take it (their queue was full).
    pub dropped: usize,
    /// The publication as delivered (stamped when recovery is on).
    pub publication: Arc<Publication>,
}

/// Why a publish failed.
#[derive(Debug)]
pub struct BusError(pub String);

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bus error: {}", self.0)
    }
}

impl std::error::Error for BusError {}

/// A fan-out transport. Subscribing is synchronous and cheap; a networked bus does its remote
/// work in the background.
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    /// Publishes to the publication's topic (a publication without a topic is refused).
    fn publish(&self, publication: Publication) -> BoxFuture<'static, Result<PublishReport, BusError>>;

    /// Subscribes a connection to an exact topic or a pattern (`*`, `?`).
    fn subscribe(&self, connection: &Arc<Connection>, topic: &str);

    /// Subscribes like [`Bus::subscribe`] and evaluates a recovery request for the topic
    /// (PROTOCOL.md §9.4) atomically with the topic's publications: publications stamped after
    /// the returned head reach the subscription live, the replay holds exactly the missed ones.
    /// A bus without recovery (the default) reports no buffer, and so does a bus with recovery
    /// for a pattern or for a subscription with a filter (its deliveries are unstamped).
    fn subscribe_recovering(
        &self,
        connection: &Arc<Connection>,
        topic: &str,
        requested: Requested,
        limit: ReplayLimit,
    ) -> RecoveryOutcome {
        let _ = (requested, limit);
        self.subscribe(connection, topic);
        RecoveryOutcome::no_buffer()
    }

    /// Sets (or with `None` clears) the payload filter of a connection's subscription to
    /// `topic` (an exact topic or a pattern), before or after subscribing; unsubscribing
    /// clears it. Returns whether the bus applied it: the default implementation filters
    /// nothing, so it accepts only `None`. A bus that applies filters delivers to a filtered
    /// subscription without the recovery stamp ([`Publication::unstamped`]).
    #[cfg(feature = "filters")]
    fn set_filter(&self, connection: ConnectionId, topic: &str, filter: Option<Arc<Filter>>) -> bool {
        let _ = (connection, topic);
        filter.is_none()
    }

    /// Delivers a transient message (presence events) to the local subscribers of its topic:
    /// never stamped, never stored for recovery, never filtered. Returns how many took it.
    /// The default implementation delivers nothing.
    fn publish_transient(&self, publication: Arc<Publication>) -> usize {
        let _ = publication;
        0
    }

    /// Removes one subscription of a connection; unknown subscriptions are ignored.
    fn unsubscribe(&self, connection: ConnectionId, topic: &str);

    /// Local subscriptions (exact topics and patterns), for metrics.
    fn subscription_count(&self) -> usize;
}

/// The in-process bus.
///
/// With [`MemoryBus::recovery`] it stamps every topic publication (`tp`, `e`, `o`) once, at
/// publish time, and keeps the topic's history for recovery; with [`MemoryBus::dedup_window`]
/// a publication with a caller-supplied `id` published again to the same topic within the
/// window is delivered once (the retry gets the first report, stamp included).
#[derive(Debug, Default)]
pub struct MemoryBus {
    topics: RwLock<Topics>,
    #[cfg(feature = "filters")]
    filters: RwLock<FilterTable>,
    #[cfg(feature = "recovery")]
    history: Option<TopicHistory>,
    dedup: Option<PublishDedup>,
}

#[derive(Debug, Default)]
struct Topics {
    exact: HashMap<String, Vec<Arc<Connection>>>,
    patterns: Vec<(String, Arc<Connection>)>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stamps and stores topic publications for recovery (PROTOCOL.md §9).
    #[cfg(feature = "recovery")]
    pub fn recovery(mut self, settings: RecoverySettings) -> Self {
        self.history = Some(TopicHistory::new(settings));
        self
    }

    /// Delivers a publication with a caller-supplied `id` once per topic within `window`;
    /// a zero window turns this off.
    pub fn dedup_window(mut self, window: std::time::Duration) -> Self {
        self.dedup = (!window.is_zero()).then(|| PublishDedup::new(window, PublishDedup::DEFAULT_MAX_ENTRIES));
        self
    }

    /// The topic history, when recovery is on.
    #[cfg(feature = "recovery")]
    pub fn history(&self) -> Option<&TopicHistory> {
        self.history.as_ref()
    }

    /// Stamps (when recovery is on), stores and fans out.
    fn publish_now(&self, publication: Publication) -> PublishReport {
        #[cfg(feature = "recovery")]
        if let Some(history) = &self.history {
            let (publication, (delivered, dropped)) = history.publish(publication, |p| self.fan_out(p));
            return PublishReport { delivered, dropped, publication };
        }
        let publication = Arc::new(publication);
        let (delivered, dropped) = self.fan_out(&publication);
        PublishReport { delivered, dropped, publication }
    }

    /// Delivers a shared publication to the local subscribers of its topic whose filter (if
    /// any) accepts it, each connection at most once however many of its subscriptions match
    /// (a connection gets it when any of them accepts it). Each distinct filter is evaluated
    /// once per publication. A filtered subscription gets the publication without its recovery
    /// stamp ([`Publication::unstamped`]): the offsets it skips must not look lost. Used by
    /// networked buses for the local half of their fan-out.
    pub fn fan_out(&self, publication: &Arc<Publication>) -> (usize, usize) {
        self.deliver_local(publication, true)
    }

    fn deliver_local(&self, publication: &Arc<Publication>, filtered: bool) -> (usize, usize) {
        let Some(topic) = publication.topic() else { return (0, 0) };
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        let screen = self.screen(publication, filtered);
        let mut unstamped: Option<Arc<Publication>> = None;
        let (mut delivered, mut dropped) = (0, 0);
        let mut send = |connection: &Connection, form: Form| {
            let copy = match form {
                Form::Stamped => Arc::clone(publication),
                Form::Unstamped => Arc::clone(unstamped.get_or_insert_with(|| publication.unstamped())),
            };
            if connection.deliver(Delivery::Publication(copy)) {
                delivered += 1;
            } else {
                dropped += 1;
            }
        };
        let exact_filters = screen.subscription(topic);
        let exact = topics.exact.get(topic).map(Vec::as_slice).unwrap_or_default();
        for connection in exact {
            if let Some(form) = screen.form(exact_filters, connection.id()) {
                send(connection, form);
            }
        }
        let mut matched: Option<HashSet<ConnectionId>> = None;
        for (pattern, connection) in &topics.patterns {
            // A pattern subscription passed the ACL as a string; each concrete topic is checked
            // again here (PROTOCOL.md §6.2.4 step 3).
            if !glob_match(pattern, topic) || !connection.may_access(topic) {
                continue;
            }
            // Verdicts are memoized, so asking again for the exact subscribers costs no evaluation.
            let seen = matched.get_or_insert_with(|| {
                exact.iter().map(|c| c.id()).filter(|id| screen.form(exact_filters, *id).is_some()).collect()
            });
            if seen.contains(&connection.id()) {
                continue;
            }
            if let Some(form) = screen.form(screen.subscription(pattern), connection.id()) {
                seen.insert(connection.id());
                send(connection, form);
            }
        }
        (delivered, dropped)
    }

    #[cfg(feature = "filters")]
    fn screen<'a>(&'a self, publication: &'a Publication, filtered: bool) -> Screen<'a> {
        Screen {
            filters: filtered.then(|| self.filters.read().unwrap_or_else(|e| e.into_inner())),
            verdicts: std::cell::RefCell::new(Verdicts::new(publication)),
        }
    }

    #[cfg(not(feature = "filters"))]
    fn screen<'a>(&'a self, _: &'a Publication, _: bool) -> Screen<'a> {
        Screen { _bus: std::marker::PhantomData }
    }

    /// Whether the connection's subscription to `topic` has a filter.
    #[cfg(feature = "recovery")]
    fn is_filtered(&self, connection: ConnectionId, topic: &str) -> bool {
        #[cfg(feature = "filters")]
        {
            let filters = self.filters.read().unwrap_or_else(|e| e.into_inner());
            filters.get(topic).is_some_and(|by_connection| by_connection.contains_key(&connection))
        }
        #[cfg(not(feature = "filters"))]
        {
            let _ = (connection, topic);
            false
        }
    }
}

/// Subscription (topic or pattern) → connection → its filter; only filtered subscriptions.
#[cfg(feature = "filters")]
type FilterTable = HashMap<String, HashMap<ConnectionId, Arc<Filter>>>;

/// The filters of one subscription string, by connection.
#[cfg(feature = "filters")]
type SubscriptionFilters<'a> = Option<&'a HashMap<ConnectionId, Arc<Filter>>>;
#[cfg(not(feature = "filters"))]
type SubscriptionFilters<'a> = Option<&'a std::convert::Infallible>;

/// Decides, subscription by subscription, whether one publication goes out and in which form:
/// a filtered subscription takes it only when its filter accepts it, and without the stamp.
struct Screen<'a> {
    /// `None` when nothing is filtered (transient messages).
    #[cfg(feature = "filters")]
    filters: Option<std::sync::RwLockReadGuard<'a, FilterTable>>,
    #[cfg(feature = "filters")]
    verdicts: std::cell::RefCell<Verdicts<'a>>,
    #[cfg(not(feature = "filters"))]
    _bus: std::marker::PhantomData<&'a ()>,
}

impl Screen<'_> {
    /// Looked up once per subscription string, then asked per connection.
    fn subscription(&self, subscription: &str) -> SubscriptionFilters<'_> {
        #[cfg(feature = "filters")]
        return self.filters.as_ref().and_then(|filters| filters.get(subscription));
        #[cfg(not(feature = "filters"))]
        {
            let _ = subscription;
            None
        }
    }

    fn form(&self, filters: SubscriptionFilters<'_>, connection: ConnectionId) -> Option<Form> {
        #[cfg(feature = "filters")]
        if let Some(filter) = filters.and_then(|by_connection| by_connection.get(&connection)) {
            return self.verdicts.borrow_mut().accepts(Some(filter)).then_some(Form::Unstamped);
        }
        #[cfg(not(feature = "filters"))]
        let _ = (filters, connection);
        Some(Form::Stamped)
    }
}

/// Which copy of a publication a subscription receives.
#[derive(Debug, Clone, Copy)]
enum Form {
    Stamped,
    /// Filtered subscriptions: without the recovery stamp.
    #[cfg_attr(not(feature = "filters"), allow(dead_code))]
    Unstamped,
}

impl Bus for MemoryBus {
    fn publish(&self, publication: Publication) -> BoxFuture<'static, Result<PublishReport, BusError>> {
        let result = match (publication.topic(), publication.caller_id(), &self.dedup) {
            (None, _, _) => Err(BusError("a publication needs a topic".into())),
            (Some(topic), Some(id), Some(dedup)) => {
                let (topic, id) = (topic.to_owned(), id.to_owned());
                dedup.publish_once(&topic, &id, || Ok(self.publish_now(publication)))
            }
            _ => Ok(self.publish_now(publication)),
        };
        Box::pin(std::future::ready(result))
    }

    fn subscribe(&self, connection: &Arc<Connection>, topic: &str) {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if is_pattern(topic) {
            if !topics.patterns.iter().any(|(p, c)| p == topic && c.id() == connection.id()) {
                topics.patterns.push((topic.to_owned(), Arc::clone(connection)));
            }
        } else {
            let subscribers = topics.exact.entry(topic.to_owned()).or_default();
            if !subscribers.iter().any(|c| c.id() == connection.id()) {
                subscribers.push(Arc::clone(connection));
            }
        }
    }

    fn subscribe_recovering(
        &self,
        connection: &Arc<Connection>,
        topic: &str,
        requested: Requested,
        limit: ReplayLimit,
    ) -> RecoveryOutcome {
        // A filtered subscription skips offsets, so it is not recoverable (PROTOCOL.md §9.4
        // first row, as for patterns) and receives unstamped copies.
        #[cfg(feature = "recovery")]
        if let Some(history) = &self.history {
            if !is_pattern(topic) && !self.is_filtered(connection.id(), topic) {
                return history.subscribe(topic, requested, limit, || self.subscribe(connection, topic));
            }
        }
        let _ = (requested, limit);
        self.subscribe(connection, topic);
        RecoveryOutcome::no_buffer()
    }

    #[cfg(feature = "filters")]
    fn set_filter(&self, connection: ConnectionId, topic: &str, filter: Option<Arc<Filter>>) -> bool {
        let mut filters = self.filters.write().unwrap_or_else(|e| e.into_inner());
        match filter {
            Some(filter) => {
                filters.entry(topic.to_owned()).or_default().insert(connection, filter);
            }
            None => {
                if let Some(by_connection) = filters.get_mut(topic) {
                    by_connection.remove(&connection);
                    if by_connection.is_empty() {
                        filters.remove(topic);
                    }
                }
            }
        }
        true
    }

    fn publish_transient(&self, publication: Arc<Publication>) -> usize {
        self.deliver_local(&publication, false).0
    }

    fn unsubscribe(&self, connection: ConnectionId, topic: &str) {
        #[cfg(feature = "filters")]
        self.set_filter(connection, topic, None);
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if is_pattern(topic) {
            topics.patterns.retain(|(p, c)| !(p == topic && c.id() == connection));
        } else if let Some(subscribers) = topics.exact.get_mut(topic) {
            subscribers.retain(|c| c.id() != connection);
            if subscribers.is_empty() {
                topics.exact.remove(topic);
            }
        }
    }

    fn subscription_count(&self) -> usize {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.exact.values().map(Vec::len).sum::<usize>() + topics.patterns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsengine_core::{Envelope, WireFormat};

    fn connection(capacity: usize) -> (Arc<Connection>, crate::connection::DeliveryReceiver) {
        let (tx, rx) = crate::connection::delivery_channel(capacity);
        (Arc::new(Connection::new(ConnectionId::new(), None, WireFormat::Json, tx)), rx)
    }

    fn publication(topic: &str) -> Publication {
        Publication::new(topic, Envelope::new("tick", serde_json::json!({"n": 1})))
    }

    #[tokio::test]
    async fn exact_and_pattern_subscribers_get_one_copy_each() {
        let bus = MemoryBus::new();
        let (a, mut rx_a) = connection(8);
        let (b, mut rx_b) = connection(8);
        bus.subscribe(&a, "prices");
        bus.subscribe(&a, "pri*");
        bus.subscribe(&b, "p?ices");
        let report = bus.publish(publication("prices")).await.unwrap();
        assert_eq!(report.delivered, 2);
        assert!(rx_a.try_recv().is_ok());
        assert!(rx_a.try_recv().is_err(), "a connection gets a publication once");
        assert!(rx_b.try_recv().is_ok());
    }

    #[tokio::test]
    async fn every_subscriber_shares_one_publication() {
        let bus = MemoryBus::new();
        let (a, mut rx_a) = connection(8);
        let (b, mut rx_b) = connection(8);
        bus.subscribe(&a, "t");
        bus.subscribe(&b, "t");
        bus.publish(publication("t")).await.unwrap();
        let (Some(Delivery::Publication(x)), Some(Delivery::Publication(y))) = (rx_a.recv().await, rx_b.recv().await)
        else {
            panic!("expected publications")
        };
        assert!(Arc::ptr_eq(&x, &y));
    }

    #[tokio::test]
    async fn unsubscribe_and_non_matching_topics() {
        let bus = MemoryBus::new();
        let (a, mut rx) = connection(8);
        bus.subscribe(&a, "news");
        bus.subscribe(&a, "sport.*");
        assert_eq!(bus.subscription_count(), 2);
        bus.unsubscribe(a.id(), "news");
        bus.unsubscribe(a.id(), "sport.*");
        bus.unsubscribe(a.id(), "never-subscribed");
        assert_eq!(bus.subscription_count(), 0);
        let report = bus.publish(publication("news")).await.unwrap();
        assert_eq!(report.delivered, 0);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_full_subscriber_is_counted_not_waited_for() {
        let bus = MemoryBus::new();
        let (slow, _rx_slow) = connection(1);
        let (fast, mut rx_fast) = connection(16);
        bus.subscribe(&slow, "t");
        bus.subscribe(&fast, "t");
        for _ in 0..3 {
            bus.publish(publication("t")).await.unwrap();
        }
        assert_eq!(slow.dropped(), 2);
        let mut received = 0;
        while rx_fast.try_recv().is_ok() {
            received += 1;
        }
        assert_eq!(received, 3);
    }

    #[cfg(all(feature = "filters", feature = "recovery"))]
    #[tokio::test]
    async fn filtered_subscriptions_get_unstamped_copies_and_no_recovery_position() {
        use crate::recovery::{RecoverySettings, ReplayLimit, Requested};
        let bus = MemoryBus::new().recovery(RecoverySettings::default());
        let (plain, mut rx_plain) = connection(8);
        let (filtered, mut rx_filtered) = connection(8);
        let (by_pattern, mut rx_pattern) = connection(8);
        bus.subscribe(&plain, "t");
        let even = Filter::intern(&serde_json::json!({"n": {"$in": [0, 2]}})).unwrap();
        assert!(bus.set_filter(filtered.id(), "t", Some(Arc::clone(&even))));
        let outcome = bus.subscribe_recovering(&filtered, "t", Requested::NotAsked, ReplayLimit::unlimited());
        assert_eq!(outcome.epoch, None, "a filtered subscription has no position");
        assert!(bus.set_filter(by_pattern.id(), "t*", Some(even)));
        bus.subscribe(&by_pattern, "t*");
        for n in 0..3 {
            bus.publish(Publication::new("t", Envelope::new("tick", serde_json::json!({"n": n})))).await.unwrap();
        }
        let offsets = |rx: &mut crate::connection::DeliveryReceiver| {
            let mut seen = Vec::new();
            while let Ok(Delivery::Publication(p)) = rx.try_recv() {
                let json: serde_json::Value = serde_json::from_str(p.json().as_str()).unwrap();
                seen.push((json["p"]["n"].as_u64().unwrap(), json.get("o").and_then(|o| o.as_u64())));
            }
            seen
        };
        assert_eq!(offsets(&mut rx_plain), [(0, Some(0)), (1, Some(1)), (2, Some(2))]);
        assert_eq!(offsets(&mut rx_filtered), [(0, None), (2, None)]);
        assert_eq!(offsets(&mut rx_pattern), [(0, None), (2, None)]);
        // Without its filter the subscription is recoverable again and gets stamped copies.
        assert!(bus.set_filter(filtered.id(), "t", None));
        let outcome = bus.subscribe_recovering(&filtered, "t", Requested::NotAsked, ReplayLimit::unlimited());
        assert_eq!(outcome.offset, 2);
        assert!(outcome.epoch.is_some());
        bus.publish(Publication::new("t", Envelope::new("tick", serde_json::json!({"n": 4})))).await.unwrap();
        assert_eq!(offsets(&mut rx_filtered), [(4, Some(3))]);
    }

    #[test]
    fn the_unstamped_copy_of_a_raw_publication_is_the_raw_json_without_the_stamp() {
        let stamp = wsengine_core::Stamp { topic: "t".into(), epoch: 5, offset: 9 };
        let raw = br#"{"t":"tick","id":"x","p":{"n":1}}"#;
        let stamped = Arc::new(Publication::raw("t", raw, None).unwrap().with_stamp(stamp));
        assert!(stamped.json().as_str().starts_with(r#"{"tp":"t","e":"00000005","o":9,"#));
        let unstamped = stamped.unstamped();
        assert_eq!(unstamped.json().as_str(), r#"{"c":"U","t":"tick","id":"x","p":{"n":1}}"#);
        assert!(Arc::ptr_eq(&unstamped, &stamped.unstamped()), "built once");
        assert!(Arc::ptr_eq(&unstamped.unstamped(), &unstamped));
    }

    #[tokio::test]
    async fn publish_without_topic_fails() {
        let bus = MemoryBus::new();
        let result = bus.publish(Publication::broadcast(Envelope::new("x", serde_json::json!({})))).await;
        assert!(result.is_err());
    }
}
