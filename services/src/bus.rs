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
use crate::filter::{Filter, Verdicts};
use crate::publication::Publication;
use crate::recovery::{PublishDedup, RecoveryOutcome, RecoverySettings, ReplayLimit, Requested, TopicHistory};

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
    /// A bus without recovery (the default) reports no buffer.
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
    /// nothing, so it accepts only `None`.
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
    /// Subscription (topic or pattern) → connection → its filter; only filtered subscriptions.
    filters: RwLock<HashMap<String, HashMap<ConnectionId, Arc<Filter>>>>,
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
    pub fn history(&self) -> Option<&TopicHistory> {
        self.history.as_ref()
    }

    /// Stamps (when recovery is on), stores and fans out.
    fn publish_now(&self, publication: Publication) -> PublishReport {
        let (publication, (delivered, dropped)) = match &self.history {
            Some(history) => history.publish(publication, |p| self.fan_out(p)),
            None => {
                let publication = Arc::new(publication);
                let counts = self.fan_out(&publication);
                (publication, counts)
            }
        };
        PublishReport { delivered, dropped, publication }
    }

    /// Delivers a shared publication to the local subscribers of its topic whose filter (if
    /// any) accepts it, each connection at most once however many of its subscriptions match
    /// (a connection gets it when any of them accepts it). Each distinct filter is evaluated
    /// once per publication. Used by networked buses for the local half of their fan-out.
    pub fn fan_out(&self, publication: &Arc<Publication>) -> (usize, usize) {
        self.deliver_local(publication, true)
    }

    fn deliver_local(&self, publication: &Arc<Publication>, filtered: bool) -> (usize, usize) {
        let Some(topic) = publication.topic() else { return (0, 0) };
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        let filters = self.filters.read().unwrap_or_else(|e| e.into_inner());
        let mut verdicts = Verdicts::new(publication);
        // Looked up once per subscription string, and only for filtered subscriptions.
        let filters_of = |subscription: &str| if filtered { filters.get(subscription) } else { None };
        let mut accepts = |by_connection: Option<&HashMap<ConnectionId, Arc<Filter>>>, connection: ConnectionId| {
            by_connection.is_none_or(|f| verdicts.accepts(f.get(&connection)))
        };
        let exact_filters = filters_of(topic);
        let (mut delivered, mut dropped) = (0, 0);
        let mut send = |connection: &Connection| {
            if connection.deliver(Delivery::Publication(Arc::clone(publication))) {
                delivered += 1;
            } else {
                dropped += 1;
            }
        };
        let exact = topics.exact.get(topic).map(Vec::as_slice).unwrap_or_default();
        for connection in exact {
            if accepts(exact_filters, connection.id()) {
                send(connection);
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
            let seen = matched
                .get_or_insert_with(|| exact.iter().map(|c| c.id()).filter(|id| accepts(exact_filters, *id)).collect());
            if !seen.contains(&connection.id()) && accepts(filters_of(pattern), connection.id()) {
                seen.insert(connection.id());
                send(connection);
            }
        }
        (delivered, dropped)
    }
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
        match &self.history {
            Some(history) if !is_pattern(topic) => {
                history.subscribe(topic, requested, limit, || self.subscribe(connection, topic))
            }
            _ => {
                self.subscribe(connection, topic);
                RecoveryOutcome::no_buffer()
            }
        }
    }

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

    #[tokio::test]
    async fn publish_without_topic_fails() {
        let bus = MemoryBus::new();
        let result = bus.publish(Publication::broadcast(Envelope::new("x", serde_json::json!({})))).await;
        assert!(result.is_err());
    }
}
