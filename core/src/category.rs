//! Message categories (`c`), derived from the message type by the rule of PROTOCOL.md §4.2.
//!
//! ```
//! use wsengine_core::Category;
//!
//! assert_eq!(Category::for_type("ping"), Category::Wse);
//! assert_eq!(Category::for_type("prices_snapshot"), Category::Snapshot);
//! assert_eq!(Category::for_type("price_update").as_str(), "U");
//! ```

use std::fmt;

/// The category of a message, the envelope's `c` field.
///
/// Informational only: no official client makes decisions on it, but the engine sets it on
/// every message it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// `WSE`: protocol messages.
    Wse,
    /// `S`: snapshots.
    Snapshot,
    /// `U`: updates (everything else).
    Update,
}

/// Types that are always `WSE` (§4.2 rule 1), checked before the snapshot rule.
const WSE_TYPES: [&str; 17] = [
    "server_ready",
    "server_hello",
    "client_hello",
    "client_hello_ack",
    "connection_state_change",
    "subscription_update",
    "snapshot_complete",
    "error",
    "ping",
    "PING",
    "pong",
    "PONG",
    "rate_limit_warning",
    "presence_join",
    "presence_leave",
    "presence_update",
    "batch",
];

impl Category {
    /// The category of a message of type `t`, applying §4.2 in order: the protocol list, then
    /// `_snapshot` anywhere or a `snapshot_` prefix, then `U`.
    pub fn for_type(t: &str) -> Category {
        if WSE_TYPES.contains(&t) {
            Category::Wse
        } else if t.contains("_snapshot") || t.starts_with("snapshot_") {
            Category::Snapshot
        } else {
            Category::Update
        }
    }

    /// The wire form: `"WSE"`, `"S"` or `"U"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Wse => "WSE",
            Category::Snapshot => "S",
            Category::Update => "U",
        }
    }

    /// Parses the wire form; `None` for anything else.
    pub fn parse(s: &str) -> Option<Category> {
        match s {
            "WSE" => Some(Category::Wse),
            "S" => Some(Category::Snapshot),
            "U" => Some(Category::Update),
            _ => None,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_listed_protocol_type_is_wse() {
        for t in WSE_TYPES {
            assert_eq!(Category::for_type(t), Category::Wse, "{t}");
        }
    }

    #[test]
    fn table() {
        let cases = [
            ("snapshot_complete", Category::Wse), // rule 1 wins over the snapshot rule (D18)
            ("prices_snapshot", Category::Snapshot),
            ("a_snapshot_b", Category::Snapshot),
            ("snapshot_prices", Category::Snapshot),
            ("snapshot", Category::Update),
            ("snapshotx", Category::Update),
            ("my_snapshots", Category::Snapshot),
            ("Snapshot_x", Category::Update),
            ("price_update", Category::Update),
            ("sync_request", Category::Update),
            ("Ping", Category::Update),
            ("", Category::Update),
            ("presence_join", Category::Wse),
            ("presence_joined", Category::Update),
        ];
        for (t, want) in cases {
            assert_eq!(Category::for_type(t), want, "{t}");
        }
    }

    #[test]
    fn wire_forms_round_trip() {
        for c in [Category::Wse, Category::Snapshot, Category::Update] {
            assert_eq!(Category::parse(c.as_str()), Some(c));
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!(Category::parse("wse"), None);
    }

    proptest! {
        #[test]
        fn snapshot_markers_win_unless_protocol(a in "[a-z]{0,8}", b in "[a-z_]{0,8}") {
            let infix = format!("{a}_snapshot{b}");
            prop_assert_eq!(Category::for_type(&infix), Category::Snapshot);
            let prefixed = format!("snapshot_{b}");
            let want = if prefixed == "snapshot_complete" { Category::Wse } else { Category::Snapshot };
            prop_assert_eq!(Category::for_type(&prefixed), want);
        }

        #[test]
        fn plain_words_are_updates(t in "[a-z]{1,12}") {
            prop_assume!(!WSE_TYPES.contains(&t.as_str()));
            prop_assert_eq!(Category::for_type(&t), Category::Update);
        }
    }
}
