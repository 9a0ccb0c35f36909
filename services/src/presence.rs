//! Presence: which users are on a topic, with their data (PROTOCOL.md §6.3.6).
//!
//! [`Presence`] tracks, per topic, the users whose connections subscribed with presence data
//! (`p.presence` in `subscription_update`, or data the application assigned to the
//! connection). The first tracked connection of a user on a topic sends `presence_join` to the
//! topic's subscribers, a change of data sends `presence_update`, and the user's last tracked
//! connection leaving (unsubscribe or disconnect) sends `presence_leave` with the last known
//! data. The events go out through [`Bus::publish_transient`]: like publications (so E2E
//! connections get them encrypted), never stamped, never stored for recovery, never filtered.
//!
//! ```
//! use std::sync::Arc;
//! use serde_json::json;
//! use wsengine_core::WireFormat;
//! use wsengine_services::bus::{Bus, MemoryBus};
//! use wsengine_services::connection::{Connection, ConnectionId, Delivery, Identity};
//! use wsengine_services::presence::{Presence, PresenceSettings, Tracking};
//!
//! let bus = Arc::new(MemoryBus::new());
//! let presence = Presence::new(bus.clone(), PresenceSettings::default());
//! let (tx, mut rx) = wsengine_services::connection::delivery_channel(8);
//! let identity = Identity::new("alice");
//! let alice = Arc::new(Connection::new(ConnectionId::new(), Some(identity), WireFormat::Json, tx));
//! bus.subscribe(&alice, "room-1");
//! let data = Presence::validate(&json!({"status": "online"})).unwrap();
//! assert_eq!(presence.track("room-1", &alice, Some(data)), Tracking::Joined);
//! assert_eq!(presence.stats("room-1").members, 1);
//! let Ok(Delivery::Publication(join)) = rx.try_recv() else { panic!("expected presence_join") };
//! assert_eq!(join.message_type(), Some("presence_join"));
//! presence.release(alice.id());
//! assert_eq!(presence.stats("room-1").members, 0);
//! ```
//!
//! Only exact topics are tracked: a pattern subscription (`room-*`) is never a presence on
//! the topics it matches, though it receives their presence events like any subscriber.
//! Subscribing again without data leaves a connection's tracking as it is. The state is per
//! engine instance: a networked bus does not share it between nodes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value, json};
use wsengine_core::Envelope;
use wsengine_core::topic::is_pattern;

use crate::bus::Bus;
use crate::connection::{Connection, ConnectionId};
use crate::publication::Publication;

/// Largest presence data, serialized (PROTOCOL.md §6.3.6).
pub const MAX_PRESENCE_DATA_BYTES: usize = 4096;

/// Presence limits.
#[derive(Debug, Clone, Default)]
pub struct PresenceSettings {
    /// Members (distinct users) per topic; 0 means unlimited. At the limit a new user's
    /// subscription still succeeds but is not tracked.
    pub max_members: usize,
}

/// Why presence data was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceError {
    /// The data is not a JSON object.
    NotAnObject,
    /// The data serializes to more than [`MAX_PRESENCE_DATA_BYTES`] bytes (the size is given).
    TooLarge(usize),
    /// Presence is disabled (`presence_enabled = false`).
    Disabled,
    /// No such connection.
    UnknownConnection,
}

impl fmt::Display for PresenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PresenceError::NotAnObject => f.write_str("presence data must be a JSON object"),
            PresenceError::TooLarge(size) => {
                write!(f, "presence data is {size} bytes, more than {MAX_PRESENCE_DATA_BYTES}")
            }
            PresenceError::Disabled => f.write_str("presence is disabled"),
            PresenceError::UnknownConnection => f.write_str("no such connection"),
        }
    }
}

impl std::error::Error for PresenceError {}

/// What [`Presence::track`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// The user's first tracked connection on the topic: `presence_join` went out.
    Joined,
    /// The user's data changed: `presence_update` went out.
    Updated,
    /// Already tracked with the same data, or another connection of a tracked user: no event.
    Unchanged,
    /// Not tracked: no presence data, or a pattern subscription.
    Untracked,
    /// Not tracked: the topic is at its member limit.
    LimitReached,
}

/// One user on a topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceMember {
    /// The user id.
    pub user_id: String,
    /// The user's current presence data.
    pub data: Value,
    /// The user's tracked connections on the topic.
    pub connections: usize,
}

/// Counts for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PresenceStats {
    /// Distinct users.
    pub members: usize,
    /// Tracked connections of those users.
    pub connections: usize,
}

/// The engine-wide presence tracker.
pub struct Presence {
    bus: Arc<dyn Bus>,
    settings: PresenceSettings,
    state: Mutex<State>,
}

impl fmt::Debug for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence").field("settings", &self.settings).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<String, HashMap<String, Member>>,
    connections: HashMap<ConnectionId, Tracked>,
}

struct Member {
    data: Map<String, Value>,
    connections: HashSet<ConnectionId>,
}

#[derive(Default)]
struct Tracked {
    user_id: String,
    topics: HashSet<String>,
    assigned: Option<Map<String, Value>>,
}

impl Presence {
    /// A tracker sending its events through `bus`.
    pub fn new(bus: Arc<dyn Bus>, settings: PresenceSettings) -> Self {
        Presence { bus, settings, state: Mutex::default() }
    }

    /// Checks presence data: a JSON object of at most [`MAX_PRESENCE_DATA_BYTES`] bytes.
    pub fn validate(data: &Value) -> Result<Map<String, Value>, PresenceError> {
        let Value::Object(fields) = data else { return Err(PresenceError::NotAnObject) };
        let size = data.to_string().len();
        if size > MAX_PRESENCE_DATA_BYTES {
            return Err(PresenceError::TooLarge(size));
        }
        Ok(fields.clone())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracks `connection` on `topic` with `data`, or with the data the application assigned
    /// to the connection when `data` is `None`, and sends the resulting event.
    pub fn track(&self, topic: &str, connection: &Connection, data: Option<Map<String, Value>>) -> Tracking {
        let mut state = self.state();
        self.track_locked(&mut state, topic, connection.id(), connection.user_id(), data)
    }

    fn track_locked(
        &self,
        state: &mut State,
        topic: &str,
        id: ConnectionId,
        user_id: &str,
        data: Option<Map<String, Value>>,
    ) -> Tracking {
        if is_pattern(topic) {
            return Tracking::Untracked;
        }
        let assigned = state.connections.get(&id).and_then(|t| t.assigned.clone());
        let Some(data) = data.or(assigned) else { return Tracking::Untracked };
        let members = state.topics.entry(topic.to_owned()).or_default();
        let limit = self.settings.max_members;
        if limit != 0 && members.len() >= limit && !members.contains_key(user_id) {
            return Tracking::LimitReached;
        }
        let tracking = match members.get_mut(user_id) {
            Some(member) => {
                member.connections.insert(id);
                if member.data == data {
                    Tracking::Unchanged
                } else {
                    member.data = data;
                    self.emit("presence_update", topic, user_id, &member.data);
                    Tracking::Updated
                }
            }
            None => {
                self.emit("presence_join", topic, user_id, &data);
                members.insert(user_id.to_owned(), Member { data, connections: HashSet::from([id]) });
                Tracking::Joined
            }
        };
        let tracked = state.connections.entry(id).or_default();
        tracked.user_id = user_id.to_owned();
        tracked.topics.insert(topic.to_owned());
        tracking
    }

    /// Stops tracking `connection` on `topic` (it unsubscribed); the user's last connection
    /// there sends `presence_leave`. Returns whether the user left.
    pub fn untrack(&self, topic: &str, connection: ConnectionId) -> bool {
        let mut state = self.state();
        let Some(tracked) = state.connections.get_mut(&connection) else { return false };
        if !tracked.topics.remove(topic) {
            return false;
        }
        let user_id = tracked.user_id.clone();
        if tracked.topics.is_empty() && tracked.assigned.is_none() {
            state.connections.remove(&connection);
        }
        self.leave_locked(&mut state, topic, connection, &user_id)
    }

    fn leave_locked(&self, state: &mut State, topic: &str, connection: ConnectionId, user_id: &str) -> bool {
        let Some(members) = state.topics.get_mut(topic) else { return false };
        let Some(member) = members.get_mut(user_id) else { return false };
        member.connections.remove(&connection);
        if !member.connections.is_empty() {
            return false;
        }
        let member = members.remove(user_id).expect("member present");
        if members.is_empty() {
            state.topics.remove(topic);
        }
        self.emit("presence_leave", topic, user_id, &member.data);
        true
    }

    /// Forgets a connection (it closed): every topic where it was its user's last tracked
    /// connection sends `presence_leave`.
    pub fn release(&self, connection: ConnectionId) {
        let mut state = self.state();
        let Some(tracked) = state.connections.remove(&connection) else { return };
        let mut topics: Vec<String> = tracked.topics.into_iter().collect();
        topics.sort();
        for topic in topics {
            self.leave_locked(&mut state, &topic, connection, &tracked.user_id);
        }
    }

    /// Assigns presence data to a connection: it is tracked with it on every exact topic in
    /// `subscribed` now, and on later subscriptions that carry no `p.presence`.
    pub fn assign(&self, connection: &Connection, data: &Value, subscribed: &[String]) -> Result<(), PresenceError> {
        let data = Self::validate(data)?;
        let mut state = self.state();
        let tracked = state.connections.entry(connection.id()).or_default();
        tracked.user_id = connection.user_id().to_owned();
        tracked.assigned = Some(data.clone());
        for topic in subscribed {
            self.track_locked(&mut state, topic, connection.id(), connection.user_id(), Some(data.clone()));
        }
        Ok(())
    }

    /// The members of a topic with their data, sorted by user id.
    pub fn members(&self, topic: &str) -> Vec<PresenceMember> {
        let state = self.state();
        let mut members: Vec<PresenceMember> = state
            .topics
            .get(topic)
            .map(|members| {
                members
                    .iter()
                    .map(|(user_id, member)| PresenceMember {
                        user_id: user_id.clone(),
                        data: Value::Object(member.data.clone()),
                        connections: member.connections.len(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        members
    }

    /// Member and connection counts of a topic.
    pub fn stats(&self, topic: &str) -> PresenceStats {
        let state = self.state();
        state.topics.get(topic).map_or_else(PresenceStats::default, |members| PresenceStats {
            members: members.len(),
            connections: members.values().map(|m| m.connections.len()).sum(),
        })
    }

    /// Sends a presence event to the topic's subscribers. Called with the state locked, so
    /// that the events of one topic go out in the order the state changed.
    fn emit(&self, t: &str, topic: &str, user_id: &str, data: &Map<String, Value>) {
        let envelope = Envelope::new(t, json!({"topic": topic, "user_id": user_id, "data": data}));
        self.bus.publish_transient(Arc::new(Publication::new(topic, envelope)));
    }
}
