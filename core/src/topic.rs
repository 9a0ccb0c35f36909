//! Topic validation and the glob patterns of pattern subscriptions and ACLs (PROTOCOL.md §6.2.4).
//!
//! `*` matches any sequence of characters (including none and including `.`), `?` matches
//! exactly one character. There is no escaping: a topic containing `*` or `?` is a pattern.
//!
//! ```
//! use wsengine_core::topic::{glob_match, is_pattern, validate_topic};
//!
//! assert!(validate_topic("prices.AAPL"));
//! assert!(is_pattern("prices.*"));
//! assert!(glob_match("prices.*", "prices.AAPL"));
//! assert!(glob_match("room-?", "room-1"));
//! assert!(!glob_match("room-?", "room-12"));
//! ```

/// Longest topic accepted, in UTF-8 bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// True if `topic` is a valid topic or pattern: non-empty, at most [`MAX_TOPIC_LEN`] bytes,
/// and free of ASCII control characters (U+0000–U+001F, U+007F).
pub fn validate_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// True if `topic` is a pattern subscription (contains `*` or `?`).
pub fn is_pattern(topic: &str) -> bool {
    topic.bytes().any(|b| b == b'*' || b == b'?')
}

/// Length in bytes of the UTF-8 character starting at `s[i]` (`i` on a char boundary).
fn char_len(s: &[u8], i: usize) -> usize {
    match s[i] {
        0x00..=0x7f => 1,
        0x80..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Matches `topic` against a glob `pattern`.
///
/// Runs in O(len(pattern) × len(topic)) at worst: only the most recent `*` is ever retried
/// (an earlier star can never do better than a later one), so no input makes it exponential.
pub fn glob_match(pattern: &str, topic: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), topic.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Pattern position just after the last `*`, and the topic position it is now tried from.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                star = Some((pi, ti));
                continue;
            }
            Some(b'?') => {
                pi += 1;
                ti += char_len(t, ti);
                continue;
            }
            // Byte-wise literal comparison is exact for UTF-8: both sides are on character
            // boundaries whenever a literal character starts.
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                // Let the star swallow one more character and retry from just after it.
                let next = st + char_len(t, st);
                star = Some((sp, next));
                pi = sp;
                ti = next;
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    #[test]
    fn validate_table() {
        assert!(!validate_topic(""));
        assert!(validate_topic("a"));
        assert!(validate_topic(&"a".repeat(256)));
        assert!(!validate_topic(&"a".repeat(257)));
        // 128 two-byte characters are 256 bytes; one more is over.
        assert!(validate_topic(&"é".repeat(128)));
        assert!(!validate_topic(&format!("{}a", "é".repeat(128))));
        for bad in ["a\0b", "a\nb", "\t", "x\u{1f}", "del\u{7f}"] {
            assert!(!validate_topic(bad), "{bad:?}");
        }
        // U+0080..U+009F are C1 controls, not ASCII: allowed by the rule.
        assert!(validate_topic("a\u{85}b"));
        assert!(validate_topic("prices.*"));
        assert!(validate_topic("ü ber space"));
    }

    #[test]
    fn pattern_detection() {
        assert!(is_pattern("*"));
        assert!(is_pattern("a?"));
        assert!(!is_pattern("prices.AAPL"));
    }

    #[test]
    fn glob_table() {
        let table = [
            ("*", "", true),
            ("*", "anything.at.all", true),
            ("", "", true),
            ("", "a", false),
            ("a", "", false),
            ("?", "", false),
            ("?", "a", true),
            ("?", "ab", false),
            ("prices.*", "prices.AAPL", true),
            ("prices.*", "prices.", true),
            ("prices.*", "prices", false),
            ("prices.*", "prices.a.b.c", true),
            ("*.AAPL", "prices.AAPL", true),
            ("*.AAPL", "prices.AAPLX", false),
            ("p*s.*L", "prices.AAPL", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("a*b", "abab", true),
            ("a*ab", "aab", true),
            ("**", "x", true),
            ("*?", "", false),
            ("*?", "x", true),
            ("room-?", "room-1", true),
            ("room-?", "room-12", false),
            ("room-??", "room-12", true),
            // `?` is one character, not one byte.
            ("?", "é", true),
            ("??", "é", false),
            ("caf?", "café", true),
            ("*é", "café", true),
            ("*€*", "price€eur", true),
            ("?€", "x€", true),
            ("日本*", "日本語", true),
            ("日?語", "日本語", true),
            ("*本", "日本語", false),
            ("é", "e", false),
            ("*ab", "aé", false),
        ];
        for (p, t, want) in table {
            assert_eq!(glob_match(p, t), want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let topic = "a".repeat(10_000);
        let start = Instant::now();
        assert!(!glob_match("a*a*a*a*a*a*b", &topic));
        assert!(!glob_match("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", &topic));
        assert!(glob_match("a*a*a*a*a*a*a", &topic));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// Reference matcher over characters (exponential in general; fine for short inputs).
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && reference(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in "[ab*?é.]{0,8}", t in "[abé.]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(glob_match(&p, &t), reference(&pc, &tc));
        }

        #[test]
        fn literal_matches_itself(t in "[^*?]{0,30}") {
            prop_assert!(glob_match(&t, &t));
            prop_assert!(glob_match("*", &t));
        }
    }
}
