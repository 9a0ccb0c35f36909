//! RFC 8785 JSON canonicalization (JCS): the byte-exact input of message signatures (PROTOCOL.md §8.3).
//!
//! Object keys are sorted by their UTF-16 code units at every level, there is no whitespace,
//! strings use the minimal escaping of ECMAScript `JSON.stringify`, and numbers take the
//! shortest ECMAScript form. Integers beyond ±(2⁵³−1) cannot be represented exactly by a
//! JavaScript peer and are refused, as §8.3 requires.
//!
//! ```
//! use serde_json::json;
//! use wsengine_core::canonical::canonicalize;
//!
//! let value = json!({"t": "x", "p": {"b": 1.50, "a": "é\n"}, "c": "U"});
//! assert_eq!(canonicalize(&value).unwrap(), r#"{"c":"U","p":{"a":"é\n","b":1.5},"t":"x"}"#);
//! assert!(canonicalize(&json!({"n": 9007199254740992u64})).is_err());
//! ```

use std::cmp::Ordering;
use std::fmt::{self, Write};

use serde_json::{Map, Number, Value};

/// The largest integer magnitude an IEEE double holds exactly, 2⁵³−1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A value that has no reliable canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanonicalError {
    /// An integer outside ±(2⁵³−1).
    UnsafeInteger(String),
    /// A number that is not finite (cannot come from JSON, only from hand-built values).
    NonFinite,
}

impl fmt::Display for CanonicalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CanonicalError::UnsafeInteger(n) => write!(f, "integer {n} is outside ±(2^53-1)"),
            CanonicalError::NonFinite => f.write_str("number is not finite"),
        }
    }
}

impl std::error::Error for CanonicalError {}

/// The canonical text of `value`.
pub fn canonicalize(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(128);
    write_value(&mut out, value)?;
    Ok(out)
}

/// The canonical text of a JSON object without its top-level member `skip` (how a signature
/// leaves itself out of its own input).
pub fn canonicalize_object_without(object: &Map<String, Value>, skip: &str) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(128);
    write_object(&mut out, object, Some(skip))?;
    Ok(out)
}

fn write_value(out: &mut String, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n)?,
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item)?;
            }
            out.push(']');
        }
        Value::Object(object) => write_object(out, object, None)?,
    }
    Ok(())
}

fn write_object(out: &mut String, object: &Map<String, Value>, skip: Option<&str>) -> Result<(), CanonicalError> {
    let mut entries: Vec<(&String, &Value)> = object.iter().filter(|(k, _)| Some(k.as_str()) != skip).collect();
    entries.sort_by(|(a, _), (b, _)| utf16_order(a, b));
    out.push('{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value)?;
    }
    out.push('}');
    Ok(())
}

/// Orders strings by UTF-16 code units (RFC 8785 §3.2.3), which differs from UTF-8 byte order
/// for characters above U+FFFF against U+E000–U+FFFF.
fn utf16_order(a: &str, b: &str) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    // Copy runs that need no escaping in one go; only `"`, `\\` and controls are escaped.
    let mut start = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0C => "\\f",
            b'\r' => "\\r",
            0x00..=0x1F => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn write_number(out: &mut String, n: &Number) -> Result<(), CanonicalError> {
    if let Some(u) = n.as_u64() {
        if u > MAX_SAFE_INTEGER {
            return Err(CanonicalError::UnsafeInteger(u.to_string()));
        }
        let _ = write!(out, "{u}");
        return Ok(());
    }
    if let Some(i) = n.as_i64() {
        if i.unsigned_abs() > MAX_SAFE_INTEGER {
            return Err(CanonicalError::UnsafeInteger(i.to_string()));
        }
        let _ = write!(out, "{i}");
        return Ok(());
    }
    let f = n.as_f64().ok_or(CanonicalError::NonFinite)?;
    write_double(out, f)
}

/// ECMAScript `Number::toString` for a double (ECMA-262 §6.1.6.1.20), built on Rust's
/// shortest round-trip digits.
pub fn write_double(out: &mut String, f: f64) -> Result<(), CanonicalError> {
    if !f.is_finite() {
        return Err(CanonicalError::NonFinite);
    }
    if f == 0.0 {
        // Both zeros print as "0".
        out.push('0');
        return Ok(());
    }
    if f < 0.0 {
        out.push('-');
    }
    // `{:e}` gives the shortest digits that round-trip: "d[.ddd]e±x".
    let scientific = format!("{:e}", f.abs());
    let (mantissa, exponent) = scientific.split_once('e').expect("LowerExp always has an exponent");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let exponent: i32 = exponent.parse().expect("LowerExp exponent is an integer");
    let k = digits.len() as i32;
    let n = exponent + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn number(f: f64) -> String {
        let mut out = String::new();
        write_double(&mut out, f).unwrap();
        out
    }

    #[test]
    fn numbers_take_the_ecmascript_form() {
        // Cases from RFC 8785 Appendix B and ECMAScript's formatting boundaries.
        let cases: &[(f64, &str)] = &[
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.5, "-1.5"),
            (187.5, "187.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-6, "0.000001"),
            (1e-7, "1e-7"),
            (4.5e-7, "4.5e-7"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (9007199254740991.0, "9007199254740991"),
            (0.1 + 0.2, "0.30000000000000004"),
            (333333333.3333333, "333333333.3333333"),
            (1e23, "1e+23"),
            (295147905179352830000.0, "295147905179352830000"),
        ];
        for (f, expected) in cases {
            assert_eq!(number(*f), *expected, "{f:e}");
        }
    }

    #[test]
    fn keys_sort_by_utf16_code_units() {
        // RFC 8785 §3.2.3's example: U+1F600 (surrogates D83D DE00) sorts before U+FB33.
        let value: Value = serde_json::from_str(r#"{"\ufb33":1,"\ud83d\ude00":2,"\u0080":3,"1":4,"a":5}"#).unwrap();
        assert_eq!(canonicalize(&value).unwrap(), "{\"1\":4,\"a\":5,\"\u{80}\":3,\"\u{1F600}\":2,\"\u{FB33}\":1}");
    }

    #[test]
    fn strings_use_minimal_escapes() {
        let value = json!({"s": "\u{0}\u{1f}\u{7f}\"\\/\u{2028}\u{8}\u{c}\t\r\n"});
        assert_eq!(canonicalize(&value).unwrap(), "{\"s\":\"\\u0000\\u001f\u{7f}\\\"\\\\/\u{2028}\\b\\f\\t\\r\\n\"}");
    }

    #[test]
    fn unsafe_integers_are_refused_and_sig_is_left_out() {
        assert!(canonicalize(&json!([-9007199254740992i64])).is_err());
        assert!(canonicalize(&json!([9007199254740991u64, -9007199254740991i64])).is_ok());
        let Value::Object(map) = json!({"t": "x", "sig": "abc", "p": {"sig": 1}}) else { unreachable!() };
        assert_eq!(canonicalize_object_without(&map, "sig").unwrap(), r#"{"p":{"sig":1},"t":"x"}"#);
    }

    #[test]
    fn protocol_test_vector_input() {
        let message: Value = serde_json::from_str(
            r#"{"tp":"prices","e":"3c9a61f0","o":42,"c":"U","t":"price_update","id":"01a2281d-51b8-7938-8b8e-db224a6b248a","ts":"2026-11-29T16:22:19.832Z","p":{"symbol":"AAPL","price":187.5},"v":1}"#,
        )
        .unwrap();
        assert_eq!(
            canonicalize(&message).unwrap(),
            r#"{"c":"U","e":"3c9a61f0","id":"01a2281d-51b8-7938-8b8e-db224a6b248a","o":42,"p":{"price":187.5,"symbol":"AAPL"},"t":"price_update","tp":"prices","ts":"2026-11-29T16:22:19.832Z","v":1}"#
        );
    }
}
