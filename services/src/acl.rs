//! Per-connection topic ACLs (PROTOCOL.md §6.2.4 step 3).
//!
//! A [`TopicAcl`] has `allow` and `deny` glob lists (`*` any run of characters, `?` one
//! character). A topic is allowed when it matches no `deny` pattern and either `allow` is empty
//! or it matches an `allow` pattern: deny wins. A handshake layer (the JWT claim `wse_topics`,
//! a custom auth hook) puts a `TopicAcl` into the upgrade request's extensions; the connection
//! keeps it, dispatch checks every subscription string against it, and the bus checks each
//! concrete topic again before delivering a publication through a pattern subscription.
//!
//! ```
//! use wsengine_services::acl::TopicAcl;
//!
//! let acl = TopicAcl::new(vec!["prices.*".into(), "news".into()], vec!["prices.secret*".into()]);
//! assert!(acl.allows("prices.aapl"));
//! assert!(acl.allows("news"));
//! assert!(!acl.allows("prices.secret.x")); // deny wins
//! assert!(!acl.allows("admin.audit")); // not on the allow list
//! assert!(TopicAcl::default().allows("anything")); // empty lists allow everything
//! ```

use std::sync::Arc;

use wsengine_core::topic::glob_match;

/// Allow and deny glob lists; cheap to clone (shared).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicAcl {
    lists: Arc<Lists>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Lists {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl TopicAcl {
    /// An ACL from its allow and deny globs. An empty `allow` list allows every topic not denied.
    pub fn new(allow: Vec<String>, deny: Vec<String>) -> Self {
        TopicAcl { lists: Arc::new(Lists { allow, deny }) }
    }

    /// The allow globs.
    pub fn allow(&self) -> &[String] {
        &self.lists.allow
    }

    /// The deny globs.
    pub fn deny(&self) -> &[String] {
        &self.lists.deny
    }

    /// Whether `topic` (a concrete topic, or a subscription string taken literally) may be
    /// subscribed or delivered.
    pub fn allows(&self, topic: &str) -> bool {
        let Lists { allow, deny } = &*self.lists;
        !deny.iter().any(|pattern| glob_match(pattern, topic))
            && (allow.is_empty() || allow.iter().any(|pattern| glob_match(pattern, topic)))
    }
}

#[cfg(test)]
mod tests {
    use super::TopicAcl;

    fn acl(allow: &[&str], deny: &[&str]) -> TopicAcl {
        TopicAcl::new(allow.iter().map(|s| (*s).to_owned()).collect(), deny.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn deny_wins_over_allow() {
        let acl = acl(&["*"], &["admin.*"]);
        assert!(acl.allows("news"));
        assert!(!acl.allows("admin.audit"));
    }

    #[test]
    fn subscription_strings_are_matched_literally() {
        let acl = acl(&["prices.*"], &[]);
        assert!(acl.allows("prices.*"), "a pattern inside the allowed space");
        assert!(!acl.allows("*"), "a pattern wider than the allowed space");
        assert!(acl.allows("prices.?"));
        let deny_only = acl_deny_only();
        assert!(deny_only.allows("*"), "checked again per topic at delivery");
        assert!(!deny_only.allows("admin.audit"));
    }

    fn acl_deny_only() -> TopicAcl {
        acl(&[], &["admin.*"])
    }

    #[test]
    fn question_mark_matches_one_character() {
        let acl = acl(&["room.?"], &[]);
        assert!(acl.allows("room.1"));
        assert!(!acl.allows("room.12"));
    }
}
