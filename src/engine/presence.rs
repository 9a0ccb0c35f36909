//! Presence from the Rust API (feature `presence`): members, stats and a connection's data.
//!
//! ```no_run
//! # fn example(engine: wsengine::Engine, id: wsengine::services::connection::ConnectionId) {
//! engine.set_presence(id, &serde_json::json!({"name": "Ada", "status": "online"})).unwrap();
//! for member in engine.presence("room.1") {
//!     println!("{} {:?}", member.user_id, member.data);
//! }
//! println!("{:?}", engine.presence_stats("room.1"));
//! # }
//! ```

use wsengine_services::connection::ConnectionId;
use wsengine_services::presence::{PresenceError, PresenceMember, PresenceStats};

use super::Engine;

impl Engine {
    /// The presence members of `topic` with their data, sorted by user id (PROTOCOL.md
    /// §6.3.6); empty when presence is disabled.
    pub fn presence(&self, topic: &str) -> Vec<PresenceMember> {
        self.inner.presence.as_ref().map(|p| p.members(topic)).unwrap_or_default()
    }

    /// Member and connection counts of `topic`'s presence; zero when presence is disabled.
    pub fn presence_stats(&self, topic: &str) -> PresenceStats {
        self.inner.presence.as_ref().map(|p| p.stats(topic)).unwrap_or_default()
    }

    /// Assigns presence data (a JSON object of at most 4096 bytes) to a connection: it is
    /// tracked with it on every topic it subscribed to (exact topics; `presence_join` or
    /// `presence_update` go out), and on later subscriptions that carry no `p.presence`.
    pub fn set_presence(&self, id: ConnectionId, data: &serde_json::Value) -> Result<(), PresenceError> {
        let presence = self.inner.presence.as_ref().ok_or(PresenceError::Disabled)?;
        let connection = self.inner.registry.get(id).ok_or(PresenceError::UnknownConnection)?;
        let mut topics: Vec<String> = connection.with_subscriptions(|s| s.iter().cloned().collect());
        topics.sort();
        presence.assign(&connection, data, &topics)?;
        // The connection may have closed meanwhile, after its driver released its presence.
        if self.inner.registry.get(id).is_none() {
            presence.release(id);
        }
        Ok(())
    }
}
