//! Subscription filters: MongoDB-like expressions over a publication's payload, compiled once.
//!
//! A filter is a JSON object. Each key is either a *path* into the payload `p` with a
//! condition, or `$and` / `$or` with an array of sub-expressions; several keys must all hold.
//!
//! ```
//! use serde_json::json;
//! use wsengine_services::filter::Filter;
//!
//! let filter = Filter::compile(&json!({
//!     "symbol": "AAPL",
//!     "price": {"$gt": 100, "$lte": 200},
//!     "$or": [{"venue": {"$in": ["XNAS", "XNYS"]}}, {"tags": {"$contains": "block"}}]
//! }))?;
//! assert!(filter.matches(&json!({"symbol": "AAPL", "price": 187.5, "venue": "XNAS"})));
//! assert!(!filter.matches(&json!({"symbol": "AAPL", "price": 250, "venue": "XNAS"})));
//! assert!(Filter::compile(&json!({"price": {"$near": 1}})).is_err());
//! # Ok::<(), wsengine_services::filter::FilterError>(())
//! ```
//!
//! # Conditions
//!
//! | Operator | Operand | Holds when the field… |
//! |---|---|---|
//! | `$eq` (or a plain value) | any JSON | equals the operand (numbers compare numerically: `1 == 1.0`; objects ignore key order) |
//! | `$ne` | any JSON | is missing or differs |
//! | `$gt` `$gte` `$lt` `$lte` | number or string | is a number (numeric order) or a string (byte-wise lexicographic order) on the operand's side |
//! | `$in` | array | equals one of the elements |
//! | `$nin` | array | is missing or equals none of them |
//! | `$regex` | string (at most [`MAX_REGEX_LENGTH`] bytes, `regex` crate syntax, inline flags like `(?i)`) | is a string the pattern finds a match in |
//! | `$exists` | boolean | is present (even as `null`) for `true`, missing for `false` |
//! | `$contains` | string, number or boolean | is a string containing the operand (a string), or an array with an element equal to it |
//! | `$startswith` `$endswith` | string | is a string with that prefix / suffix |
//!
//! Several operators on one path must all hold (`{"$gt": 1, "$lt": 5}`). An object value with
//! no `$` keys is an implicit `$eq`; an object mixing `$` keys with other keys is invalid.
//! `{}` matches everything. Evaluation never fails: a type mismatch (say `$gt` on a string
//! field with a numeric operand) is simply false, and a missing field satisfies only `$ne`,
//! `$nin` and `$exists: false` (MongoDB's choice for `$ne`/`$nin`; unlike MongoDB,
//! `{"$eq": null}` does not match a missing field).
//!
//! # Paths
//!
//! Paths are relative to the payload `p`: `price`, `quote.bid`, `legs.0.price` (a numeric
//! segment indexes an array). A leading `payload.` or `p.` segment names the payload itself,
//! so `payload.price`, `p.price` and `price` are the same path; a payload field literally
//! named `payload` or `p` is therefore reached as `payload.payload` / `p.p`, while a path of
//! the single segment `p` or `payload` is that field.
//!
//! # Limits
//!
//! Filters come from clients, so compiling refuses hostile ones with a [`FilterError`]:
//! nesting deeper than [`MAX_DEPTH`] levels of `$and`/`$or`, more than [`MAX_NODES`]
//! conditions and `$in`/`$nin` elements in total, a serialized filter over
//! [`MAX_FILTER_BYTES`], a path of more than [`MAX_PATH_SEGMENTS`] segments, or a regular
//! expression longer than [`MAX_REGEX_LENGTH`] or compiling to more than
//! [`REGEX_SIZE_LIMIT`] bytes.
//!
//! # Sharing
//!
//! [`Filter::intern`] returns one shared `Arc<Filter>` per distinct filter (by canonical JSON:
//! key order does not matter) while any subscription holds it, so the bus can evaluate a
//! publication once per distinct filter ([`Verdicts`]) rather than once per subscriber, and
//! a regular expression is compiled once however many subscriptions use it.
//!
//! Filters apply to live fan-out; presence events are not filtered. A filtered subscription
//! skips offsets by design, so with recovery on it receives publications without their
//! recovery stamp ([`Publication::unstamped`](crate::publication::Publication::unstamped)) and
//! is not recoverable: a client running the gap detection of PROTOCOL.md §9.5 would otherwise
//! ask to recover every offset the filter skipped.

use std::borrow::Cow;
use std::cmp::Ordering as Order;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use regex::{Regex, RegexBuilder};
use serde_json::{Map, Number, Value};

use crate::publication::Publication;

/// Deepest nesting of `$and` / `$or` (the top-level expression is level 1).
pub const MAX_DEPTH: usize = 8;
/// Most conditions, `$and`/`$or` nodes and `$in`/`$nin` elements in one filter.
pub const MAX_NODES: usize = 256;
/// Largest filter, as canonical JSON.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// Most segments in a path.
pub const MAX_PATH_SEGMENTS: usize = 16;
/// Longest `$regex` pattern, in bytes.
pub const MAX_REGEX_LENGTH: usize = 256;
/// Largest compiled `$regex` program (and lazy DFA cache), in bytes.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Deepest JSON nesting of an operand (`{"$eq": [[[…]]]}`) and of the filter document.
const MAX_VALUE_DEPTH: usize = 32;

/// Why a filter was refused; the message is meant for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    message: String,
}

impl FilterError {
    fn new(message: impl Into<String>) -> Self {
        FilterError { message: message.into() }
    }

    /// The human-readable reason.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FilterError {}

/// A compiled filter.
pub struct Filter {
    root: Node,
    canonical: String,
    evaluations: AtomicU64,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter").field("canonical", &self.canonical).finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Field { path: Arc<[String]>, condition: Condition },
}

#[derive(Debug)]
enum Condition {
    Eq(Value),
    Ne(Value),
    Compare(Order, bool, Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Regex(Regex),
    Exists(bool),
    Contains(Value),
    StartsWith(String),
    EndsWith(String),
}

impl Filter {
    /// Compiles a filter expression (see the module documentation).
    pub fn compile(expression: &Value) -> Result<Filter, FilterError> {
        let canonical = canonical_json(expression)?;
        Self::compile_canonical(expression, canonical)
    }

    fn compile_canonical(expression: &Value, canonical: String) -> Result<Filter, FilterError> {
        if canonical.len() > MAX_FILTER_BYTES {
            return Err(FilterError::new(format!("filter is larger than {MAX_FILTER_BYTES} bytes")));
        }
        let root = Compiler { nodes: 0 }.expression(expression, 1)?;
        Ok(Filter { root, canonical, evaluations: AtomicU64::new(0) })
    }

    /// Compiles a filter, or returns the already compiled one when an equal filter (same
    /// canonical JSON) is still in use somewhere.
    pub fn intern(expression: &Value) -> Result<Arc<Filter>, FilterError> {
        static INTERNED: OnceLock<Mutex<Interned>> = OnceLock::new();
        let canonical = canonical_json(expression)?;
        let interned = INTERNED.get_or_init(Mutex::default);
        if let Some(found) = interned.lock().unwrap_or_else(|e| e.into_inner()).get(&canonical) {
            return Ok(found);
        }
        // Compiled outside the lock: a regex may take a while.
        let compiled = Arc::new(Self::compile_canonical(expression, canonical)?);
        Ok(interned.lock().unwrap_or_else(|e| e.into_inner()).insert(compiled))
    }

    /// Whether `payload` (a publication's `p`) satisfies the filter. Never fails.
    pub fn matches(&self, payload: &Value) -> bool {
        self.evaluations.fetch_add(1, Ordering::Relaxed);
        self.root.matches(payload)
    }

    /// The filter as canonical JSON (object keys sorted), its identity for sharing.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// How many times [`Filter::matches`] ran on this filter (diagnostics and tests).
    pub fn evaluations(&self) -> u64 {
        self.evaluations.load(Ordering::Relaxed)
    }
}

/// Filters in use, by canonical JSON; dead entries are swept as the map grows.
#[derive(Default)]
struct Interned {
    filters: HashMap<String, Weak<Filter>>,
    sweep_at: usize,
}

impl Interned {
    fn get(&self, canonical: &str) -> Option<Arc<Filter>> {
        self.filters.get(canonical).and_then(Weak::upgrade)
    }

    fn insert(&mut self, filter: Arc<Filter>) -> Arc<Filter> {
        if let Some(found) = self.get(&filter.canonical) {
            return found;
        }
        if self.filters.len() >= self.sweep_at {
            self.filters.retain(|_, f| f.strong_count() > 0);
            self.sweep_at = (self.filters.len() * 2).max(64);
        }
        self.filters.insert(filter.canonical.clone(), Arc::downgrade(&filter));
        filter
    }
}

struct Compiler {
    nodes: usize,
}

impl Compiler {
    fn count(&mut self, n: usize) -> Result<(), FilterError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(FilterError::new(format!("filter has more than {MAX_NODES} conditions")));
        }
        Ok(())
    }

    fn expression(&mut self, expression: &Value, depth: usize) -> Result<Node, FilterError> {
        if depth > MAX_DEPTH {
            return Err(FilterError::new(format!("filter is nested deeper than {MAX_DEPTH} levels")));
        }
        let Value::Object(fields) = expression else {
            return Err(FilterError::new("a filter expression must be a JSON object"));
        };
        let mut parts = Vec::with_capacity(fields.len());
        for (key, value) in fields {
            match key.as_str() {
                "$and" | "$or" => {
                    let Value::Array(items) = value else {
                        return Err(FilterError::new(format!("{key} needs an array of expressions")));
                    };
                    if items.is_empty() {
                        return Err(FilterError::new(format!("{key} needs at least one expression")));
                    }
                    self.count(1)?;
                    let children =
                        items.iter().map(|item| self.expression(item, depth + 1)).collect::<Result<Vec<_>, _>>()?;
                    parts.push(if key == "$and" { Node::All(children) } else { Node::Any(children) });
                }
                operator if operator.starts_with('$') => {
                    return Err(FilterError::new(format!(
                        "unknown operator {operator} at expression level (only $and and $or go here)"
                    )));
                }
                path => self.field(parse_path(path)?, value, &mut parts)?,
            }
        }
        Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Node::All(parts) })
    }

    fn field(&mut self, path: Arc<[String]>, value: &Value, parts: &mut Vec<Node>) -> Result<(), FilterError> {
        match value {
            Value::Object(operators) if operators.keys().any(|k| k.starts_with('$')) => {
                if let Some(plain) = operators.keys().find(|k| !k.starts_with('$')) {
                    return Err(FilterError::new(format!(
                        "condition on {} mixes operators with the plain key {plain:?}",
                        path.join(".")
                    )));
                }
                for (operator, operand) in operators {
                    self.count(1)?;
                    let condition = self.condition(operator, operand)?;
                    parts.push(Node::Field { path: Arc::clone(&path), condition });
                }
            }
            plain => {
                self.count(1)?;
                parts.push(Node::Field { path, condition: Condition::Eq(plain.clone()) });
            }
        }
        Ok(())
    }

    fn condition(&mut self, operator: &str, operand: &Value) -> Result<Condition, FilterError> {
        let wrong = |expected: &str| FilterError::new(format!("{operator} needs {expected}"));
        Ok(match operator {
            "$eq" => Condition::Eq(operand.clone()),
            "$ne" => Condition::Ne(operand.clone()),
            "$gt" | "$gte" | "$lt" | "$lte" => {
                if !(operand.is_number() || operand.is_string()) {
                    return Err(wrong("a number or a string"));
                }
                let order = if operator.starts_with("$gt") { Order::Greater } else { Order::Less };
                Condition::Compare(order, operator.ends_with('e'), operand.clone())
            }
            "$in" | "$nin" => {
                let Value::Array(items) = operand else { return Err(wrong("an array")) };
                self.count(items.len())?;
                if operator == "$in" { Condition::In(items.clone()) } else { Condition::Nin(items.clone()) }
            }
            "$regex" => {
                let Value::String(pattern) = operand else { return Err(wrong("a string")) };
                if pattern.len() > MAX_REGEX_LENGTH {
                    return Err(FilterError::new(format!("$regex pattern is longer than {MAX_REGEX_LENGTH} bytes")));
                }
                let regex = RegexBuilder::new(pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .nest_limit(32)
                    .build()
                    .map_err(|e| {
                        let detail = e.to_string();
                        let detail = detail.lines().last().unwrap_or("invalid pattern").trim().to_owned();
                        FilterError::new(format!("$regex pattern is invalid: {detail}"))
                    })?;
                Condition::Regex(regex)
            }
            "$exists" => Condition::Exists(operand.as_bool().ok_or_else(|| wrong("a boolean"))?),
            "$contains" => {
                if !(operand.is_string() || operand.is_number() || operand.is_boolean()) {
                    return Err(wrong("a string, a number or a boolean"));
                }
                Condition::Contains(operand.clone())
            }
            "$startswith" | "$endswith" => {
                let Value::String(affix) = operand else { return Err(wrong("a string")) };
                if operator == "$startswith" {
                    Condition::StartsWith(affix.clone())
                } else {
                    Condition::EndsWith(affix.clone())
                }
            }
            "$and" | "$or" => {
                return Err(FilterError::new(format!("{operator} goes at expression level, not inside a field")));
            }
            unknown => return Err(FilterError::new(format!("unknown operator {unknown}"))),
        })
    }
}

fn parse_path(text: &str) -> Result<Arc<[String]>, FilterError> {
    let mut segments: Vec<&str> = text.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(FilterError::new(format!("invalid path {text:?}: empty segment")));
    }
    if segments.len() > 1 && matches!(segments[0], "payload" | "p") {
        segments.remove(0);
    }
    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(FilterError::new(format!("path {text:?} has more than {MAX_PATH_SEGMENTS} segments")));
    }
    Ok(segments.into_iter().map(str::to_owned).collect())
}

impl Node {
    fn matches(&self, payload: &Value) -> bool {
        match self {
            Node::All(children) => children.iter().all(|c| c.matches(payload)),
            Node::Any(children) => children.iter().any(|c| c.matches(payload)),
            Node::Field { path, condition } => condition.holds(resolve(payload, path)),
        }
    }
}

fn resolve<'a>(payload: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(payload, |value, segment| match value {
        Value::Object(fields) => fields.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

impl Condition {
    fn holds(&self, field: Option<&Value>) -> bool {
        let Some(value) = field else {
            return matches!(self, Condition::Ne(_) | Condition::Nin(_) | Condition::Exists(false));
        };
        match self {
            Condition::Eq(operand) => equal(value, operand),
            Condition::Ne(operand) => !equal(value, operand),
            Condition::Compare(order, or_equal, operand) => {
                compare(value, operand).is_some_and(|found| found == *order || (*or_equal && found == Order::Equal))
            }
            Condition::In(items) => items.iter().any(|item| equal(value, item)),
            Condition::Nin(items) => !items.iter().any(|item| equal(value, item)),
            Condition::Regex(regex) => value.as_str().is_some_and(|s| regex.is_match(s)),
            Condition::Exists(wanted) => *wanted,
            Condition::Contains(operand) => match value {
                Value::String(text) => operand.as_str().is_some_and(|needle| text.contains(needle)),
                Value::Array(items) => items.iter().any(|item| equal(item, operand)),
                _ => false,
            },
            Condition::StartsWith(prefix) => value.as_str().is_some_and(|s| s.starts_with(prefix.as_str())),
            Condition::EndsWith(suffix) => value.as_str().is_some_and(|s| s.ends_with(suffix.as_str())),
        }
    }
}

fn compare_numbers(a: &Number, b: &Number) -> Option<Order> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

/// The order of two values of the same comparable kind; `None` for a type mismatch.
fn compare(a: &Value, b: &Value) -> Option<Order> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y),
        (Value::String(x), Value::String(y)) => Some(x.as_str().cmp(y.as_str())),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y) == Some(Order::Equal),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| equal(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(key, value)| y.get(key).is_some_and(|other| equal(value, other)))
        }
        _ => a == b,
    }
}

/// JSON with object keys sorted at every level, refusing documents nested deeper than
/// [`MAX_VALUE_DEPTH`] (before recursing into them).
fn canonical_json(value: &Value) -> Result<String, FilterError> {
    fn write(value: &Value, depth: usize, out: &mut String) -> Result<(), FilterError> {
        if depth > MAX_VALUE_DEPTH {
            return Err(FilterError::new(format!("filter JSON is nested deeper than {MAX_VALUE_DEPTH} levels")));
        }
        if out.len() > MAX_FILTER_BYTES {
            return Err(FilterError::new(format!("filter is larger than {MAX_FILTER_BYTES} bytes")));
        }
        match value {
            Value::Object(fields) => {
                let mut keys: Vec<&String> = fields.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write(&fields[key], depth + 1, out)?;
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, depth + 1, out)?;
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
        Ok(())
    }
    let mut out = String::new();
    write(value, 1, &mut out)?;
    Ok(out)
}

/// The verdicts of the filters met while fanning out one publication: each distinct filter
/// is evaluated at most once, and the payload of a pre-serialized publication is parsed at
/// most once, when the first filter needs it.
pub struct Verdicts<'a> {
    publication: &'a Publication,
    payload: Option<Cow<'a, Value>>,
    /// The latest verdict: neighbouring subscribers often share a filter.
    last: Option<(usize, bool)>,
    verdicts: HashMap<usize, bool, BuildHasherDefault<AddressHasher>>,
}

/// Hashes a filter's address: already unique, it needs mixing, not SipHash.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.0 = (value as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

impl fmt::Debug for Verdicts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verdicts").field("evaluated", &self.verdicts.len()).finish_non_exhaustive()
    }
}

impl<'a> Verdicts<'a> {
    /// No verdict yet for `publication`.
    pub fn new(publication: &'a Publication) -> Self {
        Verdicts { publication, payload: None, last: None, verdicts: HashMap::default() }
    }

    /// Whether a subscription with `filter` takes the publication (no filter: yes).
    pub fn accepts(&mut self, filter: Option<&Arc<Filter>>) -> bool {
        let Some(filter) = filter else { return true };
        // The address identifies the filter: the Arc keeps it alive for the whole fan-out.
        let key = Arc::as_ptr(filter) as usize;
        if let Some((last, verdict)) = self.last {
            if last == key {
                return verdict;
            }
        }
        if let Some(verdict) = self.verdicts.get(&key) {
            self.last = Some((key, *verdict));
            return *verdict;
        }
        let publication = self.publication;
        let payload = self.payload.get_or_insert_with(|| payload_of(publication));
        let verdict = filter.matches(payload);
        self.verdicts.insert(key, verdict);
        self.last = Some((key, verdict));
        verdict
    }
}

fn payload_of(publication: &Publication) -> Cow<'_, Value> {
    if let Some(envelope) = publication.envelope() {
        return Cow::Borrowed(&envelope.p);
    }
    match serde_json::from_str::<Map<String, Value>>(publication.json().as_str()) {
        Ok(mut message) => Cow::Owned(message.remove("p").unwrap_or(Value::Null)),
        Err(_) => Cow::Owned(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn interning_ignores_key_order_and_shares_the_filter() {
        let a = Filter::intern(&json!({"a": 1, "b": {"$gt": 2}})).unwrap();
        let b = Filter::intern(&json!({"b": {"$gt": 2}, "a": 1})).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.canonical(), r#"{"a":1,"b":{"$gt":2}}"#);
    }

    #[test]
    fn hostile_depth_is_refused_before_recursing() {
        let mut deep = json!(1);
        // Deep enough to matter, shallow enough for serde_json's recursive drop.
        for _ in 0..1_000 {
            deep = json!([deep]);
        }
        assert!(Filter::compile(&json!({"a": {"$eq": deep}})).is_err());
    }

    #[test]
    fn raw_publications_are_parsed_for_filters() {
        let publication = Publication::raw("t", br#"{"t":"x","p":{"n":5}}"#, None).unwrap();
        let filter = Filter::intern(&json!({"n": {"$gte": 5}})).unwrap();
        let mut verdicts = Verdicts::new(&publication);
        assert!(verdicts.accepts(Some(&filter)));
        assert!(verdicts.accepts(Some(&filter)));
        assert_eq!(filter.evaluations(), 1);
    }
}
