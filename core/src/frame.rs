//! Frame encodings (PROTOCOL.md §3): plain JSON, `C:` zlib, `M:` msgpack and `E:` passthrough,
//! with the inbound decoding order of §3.4 and the limits of §3.5.
//!
//! ```
//! use wsengine_core::{decode_frame, Decoded, Frame, Limits, WireFormat};
//!
//! # #[cfg(feature = "compression")] {
//! let json = br#"{"t":"chat","p":{"text":"hi"}}"#;
//! let frame = Frame::Binary(wsengine_core::compress(json, 1).into());
//! let Decoded::Message(msg) = decode_frame(&frame, WireFormat::Json, &Limits::default()).unwrap()
//! else { panic!() };
//! assert_eq!(msg.t(), Some("chat"));
//! # }
//!
//! // Text that is not a JSON object is left to the application.
//! let raw = decode_frame(&Frame::text("hello"), WireFormat::Json, &Limits::default()).unwrap();
//! assert!(matches!(raw, Decoded::RawText(_)));
//! ```
//!
//! # Cargo features
//!
//! Two forms each need a cargo feature of this crate (both on by default):
//!
//! - `compression` (flate2): `compress`, `inflate_capped`, and inbound `C:` frames. Without
//!   it nothing is ever compressed (the `compression` argument of [`encode_data`] and
//!   [`encode_json`] is ignored) and an inbound `C:` frame fails with
//!   [`DecodeError::CompressionNotSupported`].
//! - `msgpack` (rmp-serde): `WireFormat::MsgPack`, `decode_msgpack`,
//!   `check_msgpack_depth` and inbound `M:` frames. Without it [`WireFormat::from_query`]
//!   always answers [`WireFormat::Json`] (a `format=msgpack` connection is served JSON), an
//!   inbound `M:` frame (also inside `E:`) fails with [`DecodeError::MsgpackNotSupported`],
//!   and other binary frames follow the JSON-connection rules.
//!
//! Both failures are answered with `INVALID_REQUEST` and keep the connection, like an
//! undecodable `C:` or `M:` frame when the feature is on.

use bytes::Bytes;
#[cfg(feature = "compression")]
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;
use tungstenite::{Message, Utf8Bytes};

use crate::envelope::{Envelope, InboundMessage};
use crate::limits::Limits;

/// Prefix of a compressed frame: `"C:"` ‖ zlib (RFC 1950).
pub const PREFIX_COMPRESSED: &[u8; 2] = b"C:";
/// Prefix of a msgpack frame: `"M:"` ‖ msgpack map.
pub const PREFIX_MSGPACK: &[u8; 2] = b"M:";
/// Prefix of an encrypted frame: `"E:"` ‖ IV ‖ ciphertext ‖ tag.
pub const PREFIX_ENCRYPTED: &[u8; 2] = b"E:";

/// One complete WebSocket data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text message (always valid UTF-8).
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
}

impl Frame {
    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// True if the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload bytes, whatever the opcode.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Frame::Text(t) => t.as_ref(),
            Frame::Binary(b) => b,
        }
    }

    /// True for text frames.
    pub fn is_text(&self) -> bool {
        matches!(self, Frame::Text(_))
    }

    /// A text frame.
    pub fn text(s: impl Into<String>) -> Frame {
        Frame::Text(Utf8Bytes::from(s.into()))
    }

    /// The data frame in `m`; `None` for Ping, Pong, Close and raw frames.
    pub fn from_message(m: Message) -> Option<Frame> {
        match m {
            Message::Text(t) => Some(Frame::Text(t)),
            Message::Binary(b) => Some(Frame::Binary(b)),
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => None,
        }
    }
}

impl From<Frame> for Message {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Text(t) => Message::Text(t),
            Frame::Binary(b) => Message::Binary(b),
        }
    }
}

/// The wire format of a connection, chosen by the `format` query parameter (§2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WireFormat {
    /// JSON (the default; what the official clients use).
    #[default]
    Json,
    /// msgpack: per-connection events go out as `M:` frames, inbound binary is msgpack.
    /// Only with the `msgpack` cargo feature.
    #[cfg(feature = "msgpack")]
    MsgPack,
}

impl WireFormat {
    /// `MsgPack` if the query string (with or without a leading `?`) has a parameter
    /// `format=msgpack` anywhere; `Json` for any other value or none. Always `Json` without
    /// the `msgpack` cargo feature: such a connection is served JSON.
    pub fn from_query(query: Option<&str>) -> WireFormat {
        #[cfg(feature = "msgpack")]
        {
            let query = query.unwrap_or("");
            let query = query.strip_prefix('?').unwrap_or(query);
            if query.split('&').any(|pair| pair == "format=msgpack") {
                return WireFormat::MsgPack;
            }
        }
        #[cfg(not(feature = "msgpack"))]
        let _ = query;
        WireFormat::Json
    }
}

/// Result of decoding an inbound frame (§3.4).
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A JSON object (from any encoding), keys normalized: dispatch it.
    Message(InboundMessage),
    /// Text (from a text frame, or inflated/decrypted text) that is not a JSON object: the
    /// application may accept it raw; otherwise the engine answers `INVALID_REQUEST`.
    RawText(Utf8Bytes),
    /// A binary frame that is none of the known forms (§3.4 steps 6 and 7).
    RawBinary(Bytes),
    /// An `E:` frame, whole (prefix included), left for the decrypt layer, which holds the
    /// session key and continues with [`decode_plaintext`].
    Encrypted(Bytes),
}

/// Why an inbound frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame exceeds `max_message_size`: send `MESSAGE_TOO_LARGE` and close with 1009.
    TooLarge {
        /// The frame's size in bytes.
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// A `C:` frame that is not a valid zlib stream (corrupt, truncated or wrong checksum).
    InflateFailed,
    /// A `C:` frame whose inflated content would exceed `max_inflated_size` (zlib bomb).
    InflateTooLarge,
    /// msgpack nesting deeper than `max_msgpack_depth`.
    MsgpackTooDeep,
    /// Undecodable msgpack, a value with no JSON equivalent, or not a map where one is needed.
    MsgpackInvalid,
    /// Inflated or decrypted bytes that are not UTF-8.
    NotUtf8,
    /// Input that had to be a JSON object is not one.
    NotAnObject,
    /// A `C:` frame, and this build has no `compression` cargo feature.
    CompressionNotSupported,
    /// An `M:` frame, and this build has no `msgpack` cargo feature.
    MsgpackNotSupported,
}

impl DecodeError {
    /// True if the connection must be closed (only [`DecodeError::TooLarge`], with 1009);
    /// every other failure drops the frame and keeps the connection.
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::TooLarge { .. })
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { size, limit } => {
                write!(f, "message of {size} bytes exceeds the limit of {limit} bytes")
            }
            DecodeError::InflateFailed => f.write_str("compressed frame is not a valid zlib stream"),
            DecodeError::InflateTooLarge => f.write_str("inflated content exceeds the size limit"),
            DecodeError::MsgpackTooDeep => f.write_str("msgpack nesting exceeds the depth limit"),
            DecodeError::MsgpackInvalid => f.write_str("invalid msgpack message"),
            DecodeError::NotUtf8 => f.write_str("message text is not valid UTF-8"),
            DecodeError::NotAnObject => f.write_str("not a JSON object"),
            DecodeError::CompressionNotSupported => {
                f.write_str("compressed (C:) frames are not supported by this server (no `compression` feature)")
            }
            DecodeError::MsgpackNotSupported => {
                f.write_str("msgpack (M:) frames are not supported by this server (no `msgpack` feature)")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one inbound frame following §3.4.
///
/// Order: size check; text → text rules; binary `E:` → [`Decoded::Encrypted`]; `C:` →
/// inflate (capped) → UTF-8 → text rules; `M:` → msgpack map; other binary: raw msgpack on a
/// msgpack connection, then plain JSON, else [`Decoded::RawBinary`]. Without the
/// `compression` (`msgpack`) cargo feature, `C:` (`M:`) fails with
/// [`DecodeError::CompressionNotSupported`] ([`DecodeError::MsgpackNotSupported`]).
pub fn decode_frame(frame: &Frame, format: WireFormat, limits: &Limits) -> Result<Decoded, DecodeError> {
    let size = frame.len();
    if size > limits.max_message_size {
        return Err(DecodeError::TooLarge { size, limit: limits.max_message_size });
    }
    match frame {
        Frame::Text(text) => Ok(match parse_text(text.as_str(), limits) {
            Some(map) => Decoded::Message(InboundMessage::from_map(map)),
            None => Decoded::RawText(text.clone()),
        }),
        Frame::Binary(bytes) => {
            if bytes.starts_with(PREFIX_ENCRYPTED) {
                return Ok(Decoded::Encrypted(bytes.clone()));
            }
            if let Some(zlib) = bytes.strip_prefix(PREFIX_COMPRESSED) {
                return compressed_message(zlib, limits);
            }
            if let Some(mp) = bytes.strip_prefix(PREFIX_MSGPACK) {
                return msgpack_message(mp, limits);
            }
            #[cfg(feature = "msgpack")]
            if format == WireFormat::MsgPack {
                match decode_msgpack(bytes, limits) {
                    Ok(Value::Object(map)) => {
                        return Ok(Decoded::Message(InboundMessage::from_map(map)));
                    }
                    // A hostile nesting depth is dropped, not handed on (§3.5).
                    Err(DecodeError::MsgpackTooDeep) => return Err(DecodeError::MsgpackTooDeep),
                    // Not a msgpack map: fall through to the JSON and raw rules.
                    _ => {}
                }
            }
            #[cfg(not(feature = "msgpack"))]
            let _ = format;
            // §3.1 lists plain JSON in a binary frame as a form and the Python client sends
            // binary JSON on some paths, so a binary (optionally legacy-prefixed) UTF-8 JSON
            // object is dispatched like text instead of going raw as §3.4 step 7 says. It is
            // unambiguous: none of these first bytes starts a prefixed form or a msgpack map.
            if matches!(bytes.first(), Some(b'{' | b'W' | b'S' | b'U')) {
                if let Some(map) = std::str::from_utf8(bytes).ok().and_then(|t| parse_text(t, limits)) {
                    return Ok(Decoded::Message(InboundMessage::from_map(map)));
                }
            }
            Ok(Decoded::RawBinary(bytes.clone()))
        }
    }
}

/// Continues §3.4 step 3 after decryption: `M:` → msgpack (step 5); otherwise the plaintext
/// must be UTF-8 and follows the text rules (step 2).
pub fn decode_plaintext(plaintext: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    if let Some(mp) = plaintext.strip_prefix(PREFIX_MSGPACK) {
        return msgpack_message(mp, limits);
    }
    let text = std::str::from_utf8(plaintext).map_err(|_| DecodeError::NotUtf8)?;
    Ok(decode_owned_text(text.to_owned(), limits))
}

/// Step 4: inflate (capped), then the text rules.
#[cfg(feature = "compression")]
fn compressed_message(zlib: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    let inflated = inflate_capped(zlib, limits.max_inflated_size)?;
    let text = String::from_utf8(inflated).map_err(|_| DecodeError::NotUtf8)?;
    Ok(decode_owned_text(text, limits))
}

/// Step 4 without the `compression` feature: refused, never taken for raw binary.
#[cfg(not(feature = "compression"))]
fn compressed_message(_zlib: &[u8], _limits: &Limits) -> Result<Decoded, DecodeError> {
    Err(DecodeError::CompressionNotSupported)
}

/// Step 5: one msgpack value that must be a map.
#[cfg(feature = "msgpack")]
fn msgpack_message(data: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    match decode_msgpack(data, limits)? {
        Value::Object(map) => Ok(Decoded::Message(InboundMessage::from_map(map))),
        _ => Err(DecodeError::MsgpackInvalid),
    }
}

/// Step 5 without the `msgpack` feature: refused, never taken for raw binary.
#[cfg(not(feature = "msgpack"))]
fn msgpack_message(_data: &[u8], _limits: &Limits) -> Result<Decoded, DecodeError> {
    Err(DecodeError::MsgpackNotSupported)
}

fn decode_owned_text(text: String, limits: &Limits) -> Decoded {
    match parse_text(&text, limits) {
        Some(map) => Decoded::Message(InboundMessage::from_map(map)),
        None => Decoded::RawText(Utf8Bytes::from(text)),
    }
}

/// Strips a legacy category prefix (`WSE{`, `S{`, `U{`), keeping the brace.
fn strip_legacy_prefix(text: &str) -> &str {
    if text.starts_with("WSE{") {
        &text[3..]
    } else if text.starts_with("S{") || text.starts_with("U{") {
        &text[1..]
    } else {
        text
    }
}

/// The text rules of §3.4 step 2: the JSON object, or `None` if the text is not one.
fn parse_text(text: &str, limits: &Limits) -> Option<Map<String, Value>> {
    let body = strip_legacy_prefix(text);
    if !body.starts_with('{') || json_depth_exceeds(body.as_bytes(), limits.max_json_depth) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(body);
    // serde_json's own limit would stop at 127 levels; the pre-scan above has already bounded
    // the nesting (and so the parser's recursion) to max_json_depth.
    de.disable_recursion_limit();
    let map = Map::<String, Value>::deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(map)
}

/// True if brackets outside strings nest deeper than `max_depth`. A cheap linear pre-scan:
/// the parser only ever recurses on brackets this scan also counts, so it bounds recursion.
fn json_depth_exceeds(json: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `"C:"` ‖ zlib (RFC 1950) of `json` at `level`, clamped to 1–9 (1 is the protocol's
/// recommendation: stream header `78 01`). Only with the `compression` cargo feature.
#[cfg(feature = "compression")]
pub fn compress(json: &[u8], level: u32) -> Vec<u8> {
    thread_local! {
        // A zlib compressor carries a few hundred KB of tables; building one per frame cost
        // far more than compressing a small frame, so each thread keeps one and resets it.
        static COMPRESSOR: std::cell::RefCell<Option<(u32, Compress)>> = const { std::cell::RefCell::new(None) };
    }
    let level = level.clamp(1, 9);
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(kept, _)| *kept != level) {
            *slot = Some((level, Compress::new(Compression::new(level), true)));
        }
        let (_, compressor) = slot.as_mut().expect("set just above");
        compressor.reset();
        let mut out = Vec::with_capacity(json.len() / 2 + 64);
        out.extend_from_slice(PREFIX_COMPRESSED);
        let mut input = json;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity());
            }
            let before = compressor.total_in();
            // Compressing into memory cannot fail.
            let status = compressor.compress_vec(input, &mut out, FlushCompress::Finish).expect("zlib into memory");
            input = &input[usize::try_from(compressor.total_in() - before).expect("bounded by input")..];
            if status == Status::StreamEnd {
                return out;
            }
        }
    })
}

/// Inflates a zlib stream, refusing with [`DecodeError::InflateTooLarge`] as soon as the
/// output would exceed `cap` bytes. The output buffer never grows beyond `cap + 1` bytes.
///
/// Bytes after the end of the zlib stream are ignored. Only with the `compression` cargo feature.
#[cfg(feature = "compression")]
pub fn inflate_capped(zlib: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
    // One byte past the cap is enough to tell "exactly cap" from "more than cap".
    let limit = cap.saturating_add(1);
    let mut out: Vec<u8> = Vec::with_capacity(limit.min(zlib.len().saturating_mul(4).max(256)));
    let mut d = Decompress::new(true);
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(DecodeError::InflateTooLarge);
            }
            let grow_to = limit.min(out.capacity().saturating_mul(2));
            out.reserve_exact(grow_to - out.len());
        }
        let consumed = usize::try_from(d.total_in()).unwrap_or(usize::MAX).min(zlib.len());
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(&zlib[consumed..], &mut out, FlushDecompress::None)
            .map_err(|_| DecodeError::InflateFailed)?;
        if out.len() > cap {
            return Err(DecodeError::InflateTooLarge);
        }
        match status {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError => {
                let progressed = d.total_in() != in_before || d.total_out() != out_before;
                // No progress with room left in the buffer: the input ended mid-stream.
                if !progressed && out.len() < out.capacity() {
                    return Err(DecodeError::InflateFailed);
                }
            }
        }
    }
}

/// One msgpack item header, as far as structure is concerned.
#[cfg(feature = "msgpack")]
enum Item<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'a [u8]),
    /// bin or ext: valid msgpack with no JSON equivalent.
    Opaque,
    Array(u32),
    Map(u32),
}

/// A bounds-checked reader over msgpack bytes.
#[cfg(feature = "msgpack")]
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

#[cfg(feature = "msgpack")]
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::MsgpackInvalid)?;
        let s = self.data.get(self.pos..end).ok_or(DecodeError::MsgpackInvalid)?;
        self.pos = end;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn len(&mut self, width: usize) -> Result<usize, DecodeError> {
        Ok(match width {
            1 => usize::from(self.be::<1>()?[0]),
            2 => usize::from(u16::from_be_bytes(self.be()?)),
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn skip(&mut self, n: usize) -> Result<Item<'a>, DecodeError> {
        self.take(n)?;
        Ok(Item::Opaque)
    }

    fn str(&mut self, n: usize) -> Result<Item<'a>, DecodeError> {
        Ok(Item::Str(self.take(n)?))
    }

    /// Reads one header and, for scalars, the value; containers report their element count.
    fn item(&mut self) -> Result<Item<'a>, DecodeError> {
        let b = self.be::<1>()?[0];
        Ok(match b {
            0x00..=0x7f => Item::UInt(u64::from(b)),
            0x80..=0x8f => Item::Map(u32::from(b & 0x0f)),
            0x90..=0x9f => Item::Array(u32::from(b & 0x0f)),
            0xa0..=0xbf => return self.str(usize::from(b & 0x1f)),
            0xc0 => Item::Nil,
            0xc1 => return Err(DecodeError::MsgpackInvalid), // never used
            0xc2 => Item::Bool(false),
            0xc3 => Item::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (b - 0xc4))?;
                return self.skip(n);
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (b - 0xc7))?;
                return self.skip(n + 1); // + ext type byte
            }
            0xca => Item::Float(f64::from(f32::from_be_bytes(self.be()?))),
            0xcb => Item::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Item::UInt(u64::from(self.be::<1>()?[0])),
            0xcd => Item::UInt(u64::from(u16::from_be_bytes(self.be()?))),
            0xce => Item::UInt(u64::from(u32::from_be_bytes(self.be()?))),
            0xcf => Item::UInt(u64::from_be_bytes(self.be()?)),
            0xd0 => Item::Int(i64::from(i8::from_be_bytes(self.be()?))),
            0xd1 => Item::Int(i64::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Item::Int(i64::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Item::Int(i64::from_be_bytes(self.be()?)),
            0xd4..=0xd8 => return self.skip(1 + (1 << (b - 0xd4))), // fixext: type + data
            0xd9..=0xdb => {
                let n = self.len(1 << (b - 0xd9))?;
                return self.str(n);
            }
            0xdc => Item::Array(u32::from(u16::from_be_bytes(self.be()?))),
            0xdd => Item::Array(u32::from_be_bytes(self.be()?)),
            0xde => Item::Map(u32::from(u16::from_be_bytes(self.be()?))),
            0xdf => Item::Map(u32::from_be_bytes(self.be()?)),
            0xe0..=0xff => Item::Int(i64::from(b as i8)),
        })
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
}

/// Checks that `data` is exactly one complete msgpack value nested at most `max_depth` deep
/// (containers count; a top-level map is depth 1), without recursion: a stack of pending
/// element counts that never grows past `max_depth + 1` entries.
///
/// Run it before decoding. Errors: [`DecodeError::MsgpackTooDeep`] as soon as a container
/// would open below the limit, [`DecodeError::MsgpackInvalid`] for truncated, malformed or
/// trailing bytes. Only with the `msgpack` cargo feature.
#[cfg(feature = "msgpack")]
pub fn check_msgpack_depth(data: &[u8], max_depth: usize) -> Result<(), DecodeError> {
    let mut r = Reader { data, pos: 0 };
    // Remaining element counts of the open containers; the base entry is the single root value.
    let mut pending: Vec<u64> = vec![1];
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let count = match r.item()? {
            Item::Array(n) => u64::from(n),
            Item::Map(n) => 2 * u64::from(n),
            _ => continue,
        };
        // The new container's depth is the number of containers already open, plus one.
        if pending.len() > max_depth {
            return Err(DecodeError::MsgpackTooDeep);
        }
        pending.push(count);
    }
    if r.remaining() != 0 {
        return Err(DecodeError::MsgpackInvalid);
    }
    Ok(())
}

/// A container being filled by [`decode_msgpack`].
#[cfg(feature = "msgpack")]
enum Open {
    Array(Vec<Value>, u32),
    Map(Map<String, Value>, u32, Option<String>),
}

/// Decodes one msgpack value to JSON, after [`check_msgpack_depth`] with
/// `limits.max_msgpack_depth`.
///
/// nil, bool, int, float, str, array and maps with string keys convert; bin, ext, non-string
/// keys, invalid UTF-8 and non-finite floats (no JSON equivalent) give
/// [`DecodeError::MsgpackInvalid`]. Iterative, like the depth check. Only with the `msgpack`
/// cargo feature.
#[cfg(feature = "msgpack")]
pub fn decode_msgpack(data: &[u8], limits: &Limits) -> Result<Value, DecodeError> {
    check_msgpack_depth(data, limits.max_msgpack_depth)?;
    let invalid = DecodeError::MsgpackInvalid;
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Open> = Vec::new();
    loop {
        let expecting_key = matches!(stack.last(), Some(Open::Map(_, _, None)));
        let item = r.item()?;
        let mut value = match item {
            Item::Str(bytes) => {
                let s = std::str::from_utf8(bytes).map_err(|_| invalid.clone())?.to_owned();
                if expecting_key {
                    if let Some(Open::Map(_, _, key)) = stack.last_mut() {
                        *key = Some(s);
                    }
                    continue;
                }
                Value::String(s)
            }
            _ if expecting_key => return Err(invalid),
            Item::Nil => Value::Null,
            Item::Bool(b) => Value::Bool(b),
            Item::Int(i) => Value::from(i),
            Item::UInt(u) => Value::from(u),
            Item::Float(f) => serde_json::Number::from_f64(f).map(Value::Number).ok_or(invalid.clone())?,
            Item::Opaque => return Err(invalid),
            Item::Array(0) => Value::Array(Vec::new()),
            Item::Map(0) => Value::Object(Map::new()),
            Item::Array(n) => {
                // Every element takes at least one byte: never reserve more than the input.
                let cap = (n as usize).min(r.remaining());
                stack.push(Open::Array(Vec::with_capacity(cap), n));
                continue;
            }
            Item::Map(n) => {
                // Each pair takes at least two bytes.
                let cap = (n as usize).min(r.remaining() / 2);
                stack.push(Open::Map(Map::with_capacity(cap), n, None));
                continue;
            }
        };
        // Attach the finished value, closing every container it completes.
        loop {
            match stack.last_mut() {
                None => return Ok(value),
                Some(Open::Array(items, left)) => {
                    items.push(value);
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    let Some(Open::Array(items, _)) = stack.pop() else { unreachable!() };
                    value = Value::Array(items);
                }
                Some(Open::Map(map, left, key)) => {
                    let k = key.take().ok_or(invalid.clone())?;
                    map.insert(k, value);
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    let Some(Open::Map(map, _, _)) = stack.pop() else { unreachable!() };
                    value = Value::Object(map);
                }
            }
        }
    }
}

/// Encodes an application data frame (per-connection event, snapshot event or publication)
/// for one wire form (§3.2).
///
/// - `Json`: the JSON, as a text frame if `text` (publications) or a binary frame otherwise
///   (per-connection events); with `compression = Some((threshold, level))`, JSON strictly
///   longer than `threshold` becomes a binary `C:` frame if that is smaller (never without
///   the `compression` cargo feature, which makes `compression` meaningless).
/// - `MsgPack`: binary `"M:"` ‖ msgpack, never compressed.
pub fn encode_data(env: &Envelope, format: WireFormat, text: bool, compression: Option<(usize, u32)>) -> Frame {
    match format {
        WireFormat::Json => encode_json(env.to_json_string(), text, compression),
        #[cfg(feature = "msgpack")]
        WireFormat::MsgPack => {
            let mut out = Vec::with_capacity(128);
            out.extend_from_slice(PREFIX_MSGPACK);
            out.extend_from_slice(&env.to_msgpack());
            Frame::Binary(out.into())
        }
    }
}

/// The JSON branch of [`encode_data`], for already serialized JSON (e.g. a raw publication).
/// Without the `compression` cargo feature `compression` is ignored: nothing is compressed.
pub fn encode_json(json: String, text: bool, compression: Option<(usize, u32)>) -> Frame {
    #[cfg(not(feature = "compression"))]
    let _ = compression;
    #[cfg(feature = "compression")]
    if let Some((threshold, level)) = compression {
        if json.len() > threshold {
            let compressed = compress(json.as_bytes(), level);
            if compressed.len() < json.len() {
                return Frame::Binary(compressed.into());
            }
        }
    }
    if text { Frame::text(json) } else { Frame::Binary(json.into_bytes().into()) }
}

/// Encodes a protocol frame: always a text frame of plain JSON (§3.2), on every connection.
pub fn encode_protocol(env: &Envelope) -> Frame {
    Frame::text(env.to_json_string())
}

#[cfg(test)]
mod tests;
