//! Envelopes: the outbound messages the engine builds, the protocol frame builders, recovery
//! stamps, and the normalized inbound message (PROTOCOL.md §4, §6.1, §6.3, §9.3).
//!
//! Outbound keys always come in the readable order `tp, e, o, c, t, id, ts, seq, pri, cid, p,
//! v, sig` (§4.3), absent keys left out.
//!
//! ```
//! use wsengine_core::{Envelope, Stamp};
//! use serde_json::json;
//!
//! let mut env = Envelope::new("price_update", json!({"symbol": "AAPL"}));
//! env.stamp = Some(Stamp { topic: "prices".into(), epoch: 0xabcd, offset: 7 });
//! assert_eq!(
//!     env.to_json(),
//!     br#"{"tp":"prices","e":"0000abcd","o":7,"c":"U","t":"price_update","p":{"symbol":"AAPL"},"v":1}"#,
//! );
//! ```

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use std::fmt;

use crate::category::Category;
use crate::frame::DecodeError;
use crate::time::now_rfc3339;

/// Recovery stamp of a publication (§9): topic `tp`, epoch `e`, offset `o`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The concrete topic the publication was published to.
    pub topic: String,
    /// Epoch of the topic buffer; on the wire exactly 8 lowercase hex digits.
    pub epoch: u32,
    /// Offset in the topic buffer, starting at 0 for each epoch.
    pub offset: u64,
}

impl Stamp {
    /// The epoch as it appears on the wire (`e`): always 8 lowercase hex digits, so clients
    /// that compare epochs as strings see the same value every time.
    pub fn epoch_hex(&self) -> String {
        format_epoch(self.epoch)
    }
}

/// Renders an epoch as 8 lowercase hex digits (`0000abcd`).
pub fn format_epoch(epoch: u32) -> String {
    format!("{epoch:08x}")
}

/// Parses an epoch as clients send it back: 1–8 hex digits, either case (§9.4).
pub fn parse_epoch(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// An outbound message the engine builds.
///
/// Serialization (JSON and msgpack alike) writes the keys in the order of §4.3 and leaves
/// out every `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Recovery stamp, written first as `tp`, `e`, `o` (stamped publications only).
    pub stamp: Option<Stamp>,
    /// Category `c`.
    pub c: Category,
    /// Message type `t`.
    pub t: String,
    /// Message id (UUIDv7 for engine-built messages).
    pub id: Option<String>,
    /// Creation time, RFC 3339 with milliseconds.
    pub ts: Option<String>,
    /// Per-connection diagnostic counter; set by the connection, never on publications.
    pub seq: Option<u64>,
    /// Application-assigned priority.
    pub pri: Option<u8>,
    /// Correlation id.
    pub cid: Option<String>,
    /// Payload; always a JSON object.
    pub p: Value,
    /// Protocol version; `Some(1)` everywhere except the server `ping`.
    pub v: Option<u8>,
    /// Signature (§8), the last key.
    pub sig: Option<String>,
}

impl Envelope {
    /// A message of type `t`: `c` from [`Category::for_type`], `v` = 1, everything else
    /// absent.
    ///
    /// The payload is always an object: a non-object `p` is wrapped as `{"data": p}` (as the
    /// clients do), except `null`, which stands for "no payload" and becomes `{}`.
    pub fn new(t: impl Into<String>, p: Value) -> Self {
        let t = t.into();
        let p = match p {
            Value::Object(_) => p,
            Value::Null => Value::Object(Map::new()),
            other => {
                let mut m = Map::with_capacity(1);
                m.insert("data".to_owned(), other);
                Value::Object(m)
            }
        };
        Envelope {
            stamp: None,
            c: Category::for_type(&t),
            t,
            id: None,
            ts: None,
            seq: None,
            pri: None,
            cid: None,
            p,
            v: Some(1),
            sig: None,
        }
    }

    /// Sets `id` to a fresh UUIDv7 and `ts` to now, for messages that need them.
    pub fn identified(mut self) -> Self {
        self.id = Some(new_id());
        self.ts = Some(now_rfc3339());
        self
    }

    /// Compact JSON bytes in the key order of §4.3.
    pub fn to_json(&self) -> Vec<u8> {
        self.to_json_string().into_bytes()
    }

    /// Compact JSON text in the key order of §4.3.
    pub fn to_json_string(&self) -> String {
        // Cannot fail: every map key is a string and no Serialize impl here returns errors.
        serde_json::to_string(self).expect("envelope serializes to JSON")
    }

    /// A msgpack map with string keys, same keys and order as [`to_json`](Self::to_json),
    /// without the `M:` prefix. Only nil, bool, int, float 64, str, array and map are used.
    /// Only with the `msgpack` cargo feature.
    #[cfg(feature = "msgpack")]
    pub fn to_msgpack(&self) -> Vec<u8> {
        // Cannot fail when writing to a Vec: a JSON value has no types msgpack lacks.
        rmp_serde::to_vec(self).expect("envelope serializes to msgpack")
    }
}

/// A fresh message or connection id: a UUIDv7 string.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = 3 * usize::from(self.stamp.is_some())
            + 3 // c, t, p
            + [
                self.id.is_some(),
                self.ts.is_some(),
                self.seq.is_some(),
                self.pri.is_some(),
                self.cid.is_some(),
                self.v.is_some(),
                self.sig.is_some(),
            ]
            .iter()
            .filter(|&&b| b)
            .count();
        let mut map = serializer.serialize_map(Some(len))?;
        if let Some(stamp) = &self.stamp {
            map.serialize_entry("tp", &stamp.topic)?;
            map.serialize_entry("e", &stamp.epoch_hex())?;
            map.serialize_entry("o", &stamp.offset)?;
        }
        map.serialize_entry("c", self.c.as_str())?;
        map.serialize_entry("t", &self.t)?;
        if let Some(id) = &self.id {
            map.serialize_entry("id", id)?;
        }
        if let Some(ts) = &self.ts {
            map.serialize_entry("ts", ts)?;
        }
        if let Some(seq) = self.seq {
            map.serialize_entry("seq", &seq)?;
        }
        if let Some(pri) = self.pri {
            map.serialize_entry("pri", &pri)?;
        }
        if let Some(cid) = &self.cid {
            map.serialize_entry("cid", cid)?;
        }
        map.serialize_entry("p", &self.p)?;
        if let Some(v) = self.v {
            map.serialize_entry("v", &v)?;
        }
        if let Some(sig) = &self.sig {
            map.serialize_entry("sig", sig)?;
        }
        map.end()
    }
}

/// The `PONG` answering a client `ping` (§6.1.3).
///
/// `client_timestamp_value` is the ping's `p.timestamp`: an integer is echoed, a number with a
/// fraction is truncated, anything else gives 0. `latency` is `server − client`, not below 0.
/// No `id`, `ts` or `seq`; the JSON begins with `{"c":"WSE","t":"PONG"`.
pub fn pong(client_timestamp_value: Option<&Value>, server_timestamp_ms: u64) -> Envelope {
    let client: Value = match client_timestamp_value {
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                // `as` truncates toward zero and saturates, which is what "truncated" asks.
                (n.as_f64().unwrap_or(0.0) as i64).into()
            }
        }
        _ => 0.into(),
    };
    let client_i: i128 = client.as_i64().map(i128::from).or_else(|| client.as_u64().map(i128::from)).unwrap_or(0);
    let latency = (i128::from(server_timestamp_ms) - client_i).clamp(0, i128::from(u64::MAX)) as u64;
    let mut p = Map::with_capacity(3);
    p.insert("client_timestamp".to_owned(), client);
    p.insert("server_timestamp".to_owned(), server_timestamp_ms.into());
    p.insert("latency".to_owned(), latency.into());
    Envelope::new("PONG", Value::Object(p))
}

/// The server heartbeat `ping` (§6.1.4): `{"c":"WSE","t":"ping","p":{"server_time":"…"}}`,
/// without `v`, `id`, `ts` or `seq`.
pub fn server_ping(server_time: String) -> Envelope {
    let mut p = Map::with_capacity(1);
    p.insert("server_time".to_owned(), Value::String(server_time));
    let mut env = Envelope::new("ping", Value::Object(p));
    env.v = None;
    env
}

/// What [`prepare_raw_publication`] needs to know about the top level of a JSON object.
#[derive(Default)]
struct TopLevel {
    /// `Some(category)` when there is a top-level `t`; `U` if it is not a string.
    t_category: Option<Category>,
    has_c: bool,
}

impl<'de> DeserializeSeed<'de> for &mut TopLevel {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut TopLevel {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "t" => {
                    let t: Value = map.next_value()?;
                    self.t_category = Some(t.as_str().map_or(Category::Update, Category::for_type));
                }
                "c" => {
                    map.next_value::<IgnoredAny>()?;
                    self.has_c = true;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Prepares a pre-serialized JSON publication (§6.3.3): its bytes are kept unchanged except
/// for two insertions right after the opening brace: the stamp (`"tp":…,"e":…,"o":…`) first
/// when `stamp` is given, then `"c":"X"` when the object has a top-level `t` but no `c` (X by
/// §4.2 from `t`, `U` if `t` is not a string).
///
/// Returns [`DecodeError::NotAnObject`] unless `raw` is exactly one JSON object (surrounding
/// whitespace allowed).
pub fn prepare_raw_publication(raw: &[u8], stamp: Option<&Stamp>) -> Result<Vec<u8>, DecodeError> {
    let mut top = TopLevel::default();
    let mut de = serde_json::Deserializer::from_slice(raw);
    (&mut top).deserialize(&mut de).and_then(|()| de.end()).map_err(|_| DecodeError::NotAnObject)?;

    // The parse succeeded on an object, so the first non-whitespace byte is the brace.
    let brace = raw.iter().position(|&b| b == b'{').ok_or(DecodeError::NotAnObject)?;
    let body = &raw[brace + 1..];
    let empty = body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b == b'}');

    let mut insert = String::new();
    if let Some(stamp) = stamp {
        insert.push_str(&raw_stamp_fields(stamp));
    }
    if let (Some(cat), false) = (top.t_category, top.has_c) {
        if !insert.is_empty() {
            insert.push(',');
        }
        insert.push_str(&format!(r#""c":"{}""#, cat.as_str()));
    }
    if !insert.is_empty() && !empty {
        insert.push(',');
    }

    let mut out = Vec::with_capacity(raw.len() + insert.len());
    out.extend_from_slice(&raw[..=brace]);
    out.extend_from_slice(insert.as_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Undoes the stamp insertion of [`prepare_raw_publication`]: `prepared` without the leading
/// `"tp":…,"e":…,"o":…` of `stamp` (and the comma after it). `None` when `prepared` does not
/// start with exactly that stamp.
pub fn strip_raw_stamp(prepared: &[u8], stamp: &Stamp) -> Option<Vec<u8>> {
    let brace = prepared.iter().position(|&b| b == b'{')?;
    let inserted = raw_stamp_fields(stamp);
    let rest = prepared[brace + 1..].strip_prefix(inserted.as_bytes())?;
    let rest = rest.strip_prefix(b",").unwrap_or(rest);
    let mut out = Vec::with_capacity(prepared.len() - inserted.len());
    out.extend_from_slice(&prepared[..=brace]);
    out.extend_from_slice(rest);
    Some(out)
}

/// The stamp as the first members of a raw publication's object.
fn raw_stamp_fields(stamp: &Stamp) -> String {
    // serde_json escapes the topic exactly as any other string value.
    let topic = Value::String(stamp.topic.clone()).to_string();
    format!(r#""tp":{topic},"e":"{}","o":{}"#, stamp.epoch_hex(), stamp.offset)
}

/// A decoded inbound message: the JSON object after key normalization (§3.4).
///
/// Normalization renames `type` to `t` when `t` is absent, and likewise `payload` to `p`,
/// keeping the key's position. An inbound `c` is kept but means nothing to the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    fields: Map<String, Value>,
}

impl InboundMessage {
    /// Wraps a decoded object, applying the key normalization.
    pub fn from_map(map: Map<String, Value>) -> Self {
        let rename_t = !map.contains_key("t") && map.contains_key("type");
        let rename_p = !map.contains_key("p") && map.contains_key("payload");
        let fields = if rename_t || rename_p {
            // Rebuild rather than remove/insert so the renamed keys keep their place.
            map.into_iter()
                .map(|(k, v)| match k.as_str() {
                    "type" if rename_t => ("t".to_owned(), v),
                    "payload" if rename_p => ("p".to_owned(), v),
                    _ => (k, v),
                })
                .collect()
        } else {
            map
        };
        InboundMessage { fields }
    }

    /// The message type, if `t` is a string.
    pub fn t(&self) -> Option<&str> {
        self.fields.get("t").and_then(Value::as_str)
    }

    /// The payload, whatever its JSON type.
    pub fn p(&self) -> Option<&Value> {
        self.fields.get("p")
    }

    /// The message id, if `id` is a string.
    pub fn id(&self) -> Option<&str> {
        self.fields.get("id").and_then(Value::as_str)
    }

    /// The correlation id, if `cid` is a string.
    pub fn cid(&self) -> Option<&str> {
        self.fields.get("cid").and_then(Value::as_str)
    }

    /// The priority, if `pri` is an integer in 0..=255.
    pub fn pri(&self) -> Option<u8> {
        self.fields.get("pri").and_then(Value::as_u64).and_then(|n| u8::try_from(n).ok())
    }

    /// The creation time as sent, if `ts` is a string.
    pub fn ts(&self) -> Option<&str> {
        self.fields.get("ts").and_then(Value::as_str)
    }

    /// The signature, if `sig` is a string.
    pub fn sig(&self) -> Option<&str> {
        self.fields.get("sig").and_then(Value::as_str)
    }

    /// Any top-level field.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// All top-level fields, in arrival order.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Consumes the message, returning its fields.
    pub fn into_fields(self) -> Map<String, Value> {
        self.fields
    }

    /// Compact JSON of the normalized object.
    pub fn to_json(&self) -> Vec<u8> {
        // Cannot fail: the map has string keys and holds only JSON values.
        serde_json::to_vec(&self.fields).expect("JSON map serializes")
    }
}

impl From<Map<String, Value>> for InboundMessage {
    fn from(map: Map<String, Value>) -> Self {
        InboundMessage::from_map(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "msgpack")]
    use crate::frame::decode_msgpack;
    #[cfg(feature = "msgpack")]
    use crate::limits::Limits;
    use proptest::prelude::*;
    use serde_json::json;

    fn s(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn stamped_publication_matches_the_spec_bytes() {
        // §6.3.2
        let mut env = Envelope::new("price_update", json!({"symbol":"AAPL","price":187.5}));
        env.stamp = Some(Stamp { topic: "prices".into(), epoch: 0x3c9a61f0, offset: 42 });
        env.id = Some("01a2281d-51b8-7938-8b8e-db224a6b248a".into());
        env.ts = Some("2026-11-29T16:22:19.832Z".into());
        assert_eq!(
            s(env.to_json()),
            r#"{"tp":"prices","e":"3c9a61f0","o":42,"c":"U","t":"price_update","id":"01a2281d-51b8-7938-8b8e-db224a6b248a","ts":"2026-11-29T16:22:19.832Z","p":{"symbol":"AAPL","price":187.5},"v":1}"#
        );
        // §6.3.3: the same without the stamp.
        env.stamp = None;
        assert_eq!(
            s(env.to_json()),
            r#"{"c":"U","t":"price_update","id":"01a2281d-51b8-7938-8b8e-db224a6b248a","ts":"2026-11-29T16:22:19.832Z","p":{"symbol":"AAPL","price":187.5},"v":1}"#
        );
    }

    #[test]
    fn full_key_order() {
        let env = Envelope {
            stamp: Some(Stamp { topic: "t\"q".into(), epoch: 0x0000abcd, offset: u64::MAX }),
            c: Category::Snapshot,
            t: "x_snapshot".into(),
            id: Some("i".into()),
            ts: Some("ts".into()),
            seq: Some(5),
            pri: Some(10),
            cid: Some("corr".into()),
            p: json!({}),
            v: Some(1),
            sig: Some("sg".into()),
        };
        assert_eq!(
            s(env.to_json()),
            r#"{"tp":"t\"q","e":"0000abcd","o":18446744073709551615,"c":"S","t":"x_snapshot","id":"i","ts":"ts","seq":5,"pri":10,"cid":"corr","p":{},"v":1,"sig":"sg"}"#
        );
    }

    #[test]
    fn per_connection_event_matches_the_spec_bytes() {
        // §6.3.1
        let mut env = Envelope::new("echo_reply", json!({"hello":"world"}));
        env.id = Some("01a2281d-49e9-7d95-8ee8-813609166f6b".into());
        env.ts = Some("2026-11-29T16:22:17.833Z".into());
        env.seq = Some(7);
        assert_eq!(
            s(env.to_json()),
            r#"{"c":"U","t":"echo_reply","id":"01a2281d-49e9-7d95-8ee8-813609166f6b","ts":"2026-11-29T16:22:17.833Z","seq":7,"p":{"hello":"world"},"v":1}"#
        );
    }

    #[test]
    fn epoch_rendering() {
        let st = |epoch| Stamp { topic: "x".into(), epoch, offset: 0 };
        assert_eq!(st(0x0000abcd).epoch_hex(), "0000abcd");
        assert_eq!(st(0).epoch_hex(), "00000000");
        assert_eq!(st(u32::MAX).epoch_hex(), "ffffffff");
        assert_eq!(st(0x3C9A61F0).epoch_hex(), "3c9a61f0");
        assert_eq!(parse_epoch("3C9A61F0"), Some(0x3c9a61f0));
        assert_eq!(parse_epoch("abcd"), Some(0xabcd));
        assert_eq!(parse_epoch(""), None);
        assert_eq!(parse_epoch("123456789"), None);
        assert_eq!(parse_epoch("+1"), None);
        assert_eq!(parse_epoch("xyz"), None);
    }

    #[test]
    fn new_wraps_non_objects() {
        assert_eq!(Envelope::new("x", json!(5)).p, json!({"data":5}));
        assert_eq!(Envelope::new("x", json!([1])).p, json!({"data":[1]}));
        assert_eq!(Envelope::new("x", json!("s")).p, json!({"data":"s"}));
        assert_eq!(Envelope::new("x", Value::Null).p, json!({}));
        let env = Envelope::new("error", json!({"a":1}));
        assert_eq!(env.c, Category::Wse);
        assert_eq!(env.v, Some(1));
        assert!(env.id.is_none() && env.ts.is_none() && env.seq.is_none());
    }

    #[test]
    fn identified_sets_uuid_v7_and_ts() {
        let env = Envelope::new("x", json!({})).identified();
        let id = uuid::Uuid::parse_str(env.id.as_deref().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(env.ts.as_deref().unwrap().len(), 24);
        let other = Envelope::new("x", json!({})).identified();
        assert_ne!(env.id, other.id);
    }

    #[test]
    fn pong_shape() {
        let env = pong(Some(&json!(1_795_969_337_832u64)), 1_795_969_337_834);
        assert_eq!(
            s(env.to_json()),
            r#"{"c":"WSE","t":"PONG","p":{"client_timestamp":1795969337832,"server_timestamp":1795969337834,"latency":2},"v":1}"#
        );
        assert!(s(env.to_json()).starts_with(r#"{"c":"WSE","t":"PONG""#));
    }

    #[test]
    fn pong_client_timestamp_rules() {
        let p = |v: Option<Value>, server| pong(v.as_ref(), server).p;
        assert_eq!(
            p(Some(json!(1000.9)), 1500),
            json!({"client_timestamp":1000,"server_timestamp":1500,"latency":500})
        );
        assert_eq!(p(Some(json!("1000")), 1500), json!({"client_timestamp":0,"server_timestamp":1500,"latency":1500}));
        assert_eq!(p(None, 7), json!({"client_timestamp":0,"server_timestamp":7,"latency":7}));
        // A client clock ahead of ours: latency floors at 0.
        assert_eq!(p(Some(json!(2000)), 1500), json!({"client_timestamp":2000,"server_timestamp":1500,"latency":0}));
        assert_eq!(p(Some(json!(-5)), 10), json!({"client_timestamp":-5,"server_timestamp":10,"latency":15}));
        assert_eq!(
            p(Some(json!(u64::MAX)), 10),
            json!({"client_timestamp":u64::MAX,"server_timestamp":10,"latency":0})
        );
        assert_eq!(p(Some(json!(1e300)), 10)["client_timestamp"], json!(i64::MAX));
    }

    #[test]
    fn server_ping_shape() {
        let env = server_ping("2026-11-29T16:22:42.832Z".into());
        assert_eq!(s(env.to_json()), r#"{"c":"WSE","t":"ping","p":{"server_time":"2026-11-29T16:22:42.832Z"}}"#);
    }

    #[test]
    #[cfg(feature = "msgpack")]
    fn msgpack_round_trip_of_envelope() {
        let mut env = Envelope::new(
            "price_update",
            json!({"symbol":"AAPL","price":187.5,"n":-3,"big":u64::MAX,"ok":true,"none":null,"l":[1,"a",{"x":[]}]}),
        );
        env.stamp = Some(Stamp { topic: "prices".into(), epoch: 0xabcd, offset: 42 });
        env.pri = Some(8);
        env.cid = Some("c".into());
        env.sig = Some("s".into());
        let env = env.identified();
        let from_mp = decode_msgpack(&env.to_msgpack(), &Limits::default()).unwrap();
        let from_json: Value = serde_json::from_slice(&env.to_json()).unwrap();
        assert_eq!(from_mp, from_json);
        // Same key order too.
        let keys_mp: Vec<_> = from_mp.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys_mp, ["tp", "e", "o", "c", "t", "id", "ts", "pri", "cid", "p", "v", "sig"]);
    }

    #[test]
    #[cfg(feature = "msgpack")]
    fn msgpack_starts_with_a_map_marker_and_uses_no_bin_or_ext() {
        let env = Envelope::new("x", json!({"s":"str"}));
        let mp = env.to_msgpack();
        assert_eq!(mp[0] & 0xf0, 0x80, "fixmap");
        // fixmap(4): "c" "U" "t" "x" "p" {"s":"str"} "v" 1
        assert_eq!(
            mp,
            [
                0x84, 0xa1, b'c', 0xa1, b'U', 0xa1, b't', 0xa1, b'x', 0xa1, b'p', 0x81, 0xa1, b's', 0xa3, b's', b't',
                b'r', 0xa1, b'v', 0x01
            ]
        );
    }

    #[test]
    fn raw_publication_insertions() {
        let stamp = Stamp { topic: "prices".into(), epoch: 0x3c9a61f0, offset: 42 };
        let cases: [(&str, Option<&Stamp>, &str); 8] = [
            (r#"{"t":"price_update","p":{}}"#, None, r#"{"c":"U","t":"price_update","p":{}}"#),
            (r#"{"t":"a_snapshot"}"#, None, r#"{"c":"S","t":"a_snapshot"}"#),
            (r#"{"t":"presence_join"}"#, None, r#"{"c":"WSE","t":"presence_join"}"#),
            (r#"{"t":5}"#, None, r#"{"c":"U","t":5}"#),
            (r#"{"p":{"t":"x"}}"#, None, r#"{"p":{"t":"x"}}"#),
            (r#"{"t":"x","c":"KEEP"}"#, None, r#"{"t":"x","c":"KEEP"}"#),
            (
                r#"{"t":"price_update","id":"i","p":{"symbol":"AAPL"},"v":1}"#,
                Some(&stamp),
                r#"{"tp":"prices","e":"3c9a61f0","o":42,"c":"U","t":"price_update","id":"i","p":{"symbol":"AAPL"},"v":1}"#,
            ),
            (r#"{"c":"X","t":"y"}"#, Some(&stamp), r#"{"tp":"prices","e":"3c9a61f0","o":42,"c":"X","t":"y"}"#),
        ];
        for (raw, st, want) in cases {
            let out = prepare_raw_publication(raw.as_bytes(), st).unwrap();
            assert_eq!(s(out), want, "{raw}");
        }
        // An empty object gets no trailing comma; surrounding whitespace stays.
        let out = prepare_raw_publication(b"  { }\n", Some(&stamp)).unwrap();
        assert_eq!(s(out), "  {\"tp\":\"prices\",\"e\":\"3c9a61f0\",\"o\":42 }\n");
        // Whitespace and formatting of the original are preserved byte for byte.
        let pretty = "{\n  \"t\": \"x\",\n  \"p\": { \"a\" : 1 }\n}";
        let out = s(prepare_raw_publication(pretty.as_bytes(), None).unwrap());
        assert_eq!(out, format!("{{\"c\":\"U\",{}", &pretty[1..]));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["c"], "U");
    }

    #[test]
    fn stripping_the_stamp_restores_the_unstamped_form() {
        let stamp = Stamp { topic: "a\"b".into(), epoch: 0x3c9a61f0, offset: 7 };
        for raw in [r#"{"t":"x","p":{"n":1}}"#, "  { }\n", r#"{"c":"X","t":"y"}"#, "{\n \"t\": \"x\"\n}"] {
            let unstamped = prepare_raw_publication(raw.as_bytes(), None).unwrap();
            let stamped = prepare_raw_publication(raw.as_bytes(), Some(&stamp)).unwrap();
            assert_eq!(strip_raw_stamp(&stamped, &stamp), Some(unstamped), "{raw}");
        }
        // Only the exact stamp is removed.
        let other = Stamp { offset: 8, ..stamp.clone() };
        let stamped = prepare_raw_publication(br#"{"t":"x"}"#, Some(&stamp)).unwrap();
        assert_eq!(strip_raw_stamp(&stamped, &other), None);
        assert_eq!(strip_raw_stamp(br#"{"t":"x"}"#, &stamp), None);
    }

    #[test]
    fn raw_publication_rejects_non_objects() {
        for raw in ["[1]", "5", "\"s\"", "", "{", r#"{"t":"x"} {}"#, r#"{"t":"x",}"#, "null"] {
            assert_eq!(prepare_raw_publication(raw.as_bytes(), None), Err(DecodeError::NotAnObject), "{raw}");
        }
    }

    #[test]
    fn raw_publication_escapes_the_topic() {
        let stamp = Stamp { topic: "a\"b\\c".into(), epoch: 1, offset: 0 };
        let out = prepare_raw_publication(br#"{"t":"x"}"#, Some(&stamp)).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["tp"], "a\"b\\c");
        assert_eq!(v["e"], "00000001");
    }

    #[test]
    fn normalization() {
        let m = |v: Value| InboundMessage::from_map(v.as_object().unwrap().clone());
        let msg = m(json!({"c":"U","type":"chat","payload":{"x":1},"id":"i"}));
        assert_eq!(msg.t(), Some("chat"));
        assert_eq!(msg.p(), Some(&json!({"x":1})));
        assert_eq!(msg.id(), Some("i"));
        assert!(msg.get("type").is_none() && msg.get("payload").is_none());
        // Position kept.
        assert_eq!(s(msg.to_json()), r#"{"c":"U","t":"chat","p":{"x":1},"id":"i"}"#);

        // Existing t/p win; type/payload stay as ordinary fields.
        let msg = m(json!({"t":"a","type":"b","p":{},"payload":2}));
        assert_eq!(msg.t(), Some("a"));
        assert_eq!(msg.get("type"), Some(&json!("b")));
        assert_eq!(msg.get("payload"), Some(&json!(2)));

        let msg = m(json!({"t":5,"pri":300,"cid":"c","ts":"x","sig":"y"}));
        assert_eq!(msg.t(), None);
        assert_eq!(msg.pri(), None);
        assert_eq!(msg.cid(), Some("c"));
        assert_eq!(msg.ts(), Some("x"));
        assert_eq!(msg.sig(), Some("y"));
        assert_eq!(m(json!({"pri":8})).pri(), Some(8));
        assert_eq!(m(json!({"pri":-1})).pri(), None);
        assert_eq!(m(json!({})).into_fields().len(), 0);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e15f64..1e15).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-z]{0,6}", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        (
            "[a-z_]{1,16}",
            arb_json(),
            proptest::option::of(("\\PC{1,10}", any::<u32>(), any::<u64>())),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u8>()),
            proptest::option::of("\\PC{0,10}"),
        )
            .prop_map(|(t, p, stamp, seq, pri, cid)| {
                let mut env = Envelope::new(t, p).identified();
                env.stamp = stamp.map(|(topic, epoch, offset)| Stamp { topic, epoch, offset });
                env.seq = seq;
                env.pri = pri;
                env.cid = cid;
                env
            })
    }

    proptest! {
        #[test]
        #[cfg(feature = "msgpack")]
        fn msgpack_equals_json(env in arb_envelope()) {
            let from_mp = decode_msgpack(&env.to_msgpack(), &Limits::default()).unwrap();
            let from_json: Value = serde_json::from_slice(&env.to_json()).unwrap();
            prop_assert_eq!(from_mp, from_json);
        }

        #[test]
        fn json_key_order_and_epoch(env in arb_envelope()) {
            let v: Value = serde_json::from_slice(&env.to_json()).unwrap();
            let order = ["tp","e","o","c","t","id","ts","seq","pri","cid","p","v","sig"];
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            let mut last = 0;
            for k in &keys {
                let i = order.iter().position(|o| o == k).unwrap();
                prop_assert!(i >= last);
                last = i;
            }
            if let Some(stamp) = &env.stamp {
                let e = v["e"].as_str().unwrap();
                prop_assert_eq!(e.len(), 8);
                prop_assert!(e.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                prop_assert_eq!(parse_epoch(e), Some(stamp.epoch));
            }
        }

        #[test]
        fn raw_publication_equals_envelope_stamping(env in arb_envelope()) {
            // Stamping a pre-serialized unstamped publication gives the same bytes as
            // serializing the stamped envelope.
            let mut plain = env.clone();
            plain.stamp = None;
            let raw = prepare_raw_publication(&plain.to_json(), env.stamp.as_ref()).unwrap();
            prop_assert_eq!(raw, env.to_json());
        }
    }
}
