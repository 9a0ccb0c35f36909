use super::*;
#[cfg(feature = "compression")]
use flate2::write::ZlibEncoder;
use proptest::prelude::*;
use serde_json::json;
#[cfg(feature = "compression")]
use std::io::Write;
#[cfg(feature = "compression")]
use std::time::{Duration, Instant};

/// What a `format=msgpack` connection gets: msgpack, or JSON without the `msgpack` feature.
#[cfg(feature = "msgpack")]
const PACKED: WireFormat = WireFormat::MsgPack;
#[cfg(not(feature = "msgpack"))]
const PACKED: WireFormat = WireFormat::Json;

fn limits() -> Limits {
    Limits::default()
}

fn text(s: &str) -> Frame {
    Frame::text(s)
}

fn binary(b: impl Into<Vec<u8>>) -> Frame {
    Frame::Binary(Bytes::from(b.into()))
}

fn decode(frame: &Frame) -> Result<Decoded, DecodeError> {
    decode_frame(frame, WireFormat::Json, &limits())
}

fn message(d: Result<Decoded, DecodeError>) -> InboundMessage {
    match d {
        Ok(Decoded::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// `n` arrays nested inside each other around `null`: `[[[null]]]`.
fn nested_json(n: usize) -> String {
    format!("{}null{}", "[".repeat(n), "]".repeat(n))
}

/// A JSON object whose total nesting (the object included) is `n`.
fn nested_object(n: usize) -> String {
    format!("{{\"a\":{}}}", nested_json(n - 1))
}

/// msgpack: `n` one-element arrays nested around nil.
#[cfg(feature = "msgpack")]
fn nested_msgpack_arrays(n: usize) -> Vec<u8> {
    let mut v = vec![0x91; n];
    v.push(0xc0);
    v
}

/// msgpack: `n` maps nested as {"a": {"a": … {}}}.
#[cfg(feature = "msgpack")]
fn nested_msgpack_maps(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..n - 1 {
        v.extend_from_slice(&[0x81, 0xa1, b'a']);
    }
    v.push(0x80);
    v
}

// ---- frame and format basics ----

#[test]
fn frame_conversions() {
    let t = Frame::text("hi");
    assert_eq!(t.len(), 2);
    assert!(!t.is_empty() && t.is_text());
    assert_eq!(Frame::from_message(Message::from(t.clone())), Some(t));
    let b = binary(*b"\x00\x01");
    assert_eq!(b.as_bytes(), b"\x00\x01");
    assert_eq!(Frame::from_message(Message::from(b.clone())), Some(b));
    assert!(binary(Vec::new()).is_empty());
    assert_eq!(Frame::from_message(Message::Ping(Bytes::new())), None);
    assert_eq!(Frame::from_message(Message::Pong(Bytes::new())), None);
    assert_eq!(Frame::from_message(Message::Close(None)), None);
}

#[test]
fn wire_format_from_query() {
    let table = [
        (None, WireFormat::Json),
        (Some(""), WireFormat::Json),
        (Some("format=msgpack"), PACKED),
        (Some("?format=msgpack"), PACKED),
        (Some("client_version=2.0.7&format=msgpack&topics=a"), PACKED),
        (Some("a=1&format=msgpack"), PACKED),
        (Some("format=json"), WireFormat::Json),
        (Some("format=msgpackx"), WireFormat::Json),
        (Some("xformat=msgpack"), WireFormat::Json),
        (Some("topics=format=msgpack"), WireFormat::Json),
        (Some("format=MSGPACK"), WireFormat::Json),
    ];
    for (q, want) in table {
        assert_eq!(WireFormat::from_query(q), want, "{q:?}");
    }
    assert_eq!(WireFormat::default(), WireFormat::Json);
}

// ---- text rules ----

#[test]
fn text_object_is_a_message() {
    let m = message(decode(&text(r#"{"c":"U","t":"chat","p":{"a":1}}"#)));
    assert_eq!(m.t(), Some("chat"));
    assert_eq!(m.p(), Some(&json!({"a":1})));
}

#[test]
fn legacy_prefixes_are_stripped() {
    for s in [r#"WSE{"t":"ping","p":{}}"#, r#"S{"t":"ping","p":{}}"#, r#"U{"t":"ping","p":{}}"#] {
        let m = message(decode(&text(s)));
        assert_eq!(m.t(), Some("ping"), "{s}");
        assert_eq!(m.get("c"), None);
    }
    // Only those three prefixes, and only immediately before the brace.
    for s in [r#"X{"t":"a"}"#, r#"WS{"t":"a"}"#, r#"WSE {"t":"a"}"#, r#"SU{"t":"a"}"#, "WSE", "S", "U{"] {
        assert_eq!(decode(&text(s)), Ok(Decoded::RawText(s.into())), "{s}");
    }
}

#[test]
fn non_objects_are_raw_text() {
    for s in ["", "hello", "[1,2]", "5", "\"s\"", "null", "{", "{\"t\":}", " {\"t\":\"x\"}", "{\"t\":\"x\"} x"] {
        assert_eq!(decode(&text(s)), Ok(Decoded::RawText(s.into())), "{s:?}");
    }
    // Trailing whitespace is fine.
    message(decode(&text("{\"t\":\"x\"} \n")));
}

#[test]
fn type_and_payload_are_normalized() {
    let m = message(decode(&text(r#"{"type":"chat","payload":{"x":1}}"#)));
    assert_eq!(m.t(), Some("chat"));
    assert_eq!(m.p(), Some(&json!({"x":1})));
    assert_eq!(m.to_json(), br#"{"t":"chat","p":{"x":1}}"#);
}

#[test]
fn json_depth_limit_is_exactly_128() {
    message(decode(&text(&nested_object(128))));
    let deep = nested_object(129);
    assert_eq!(decode(&text(&deep)), Ok(Decoded::RawText(deep.as_str().into())));
    // Brackets inside strings do not count.
    let in_string = format!("{{\"a\":\"{}\"}}", "[".repeat(1000));
    message(decode(&text(&in_string)));
    let escaped = format!("{{\"a\":\"\\\"{}\"}}", "[".repeat(1000));
    message(decode(&text(&escaped)));
    // Very deep input is rejected by the pre-scan without touching the parser's stack.
    let huge = format!("{{\"a\":{}}}", nested_json(500_000));
    assert!(matches!(decode(&text(&huge)), Ok(Decoded::RawText(_))));
    // A lower configured limit is honoured.
    let strict = Limits { max_json_depth: 2, ..Limits::default() };
    assert!(matches!(decode_frame(&text(r#"{"a":[1]}"#), WireFormat::Json, &strict), Ok(Decoded::Message(_))));
    assert!(matches!(decode_frame(&text(r#"{"a":[[1]]}"#), WireFormat::Json, &strict), Ok(Decoded::RawText(_))));
}

#[test]
fn serde_json_default_limit_is_127() {
    // Documents why parse_text disables serde_json's own limit: left on, it rejects 128.
    let ok: Result<Value, _> = serde_json::from_str(&nested_json(127));
    let too_deep: Result<Value, _> = serde_json::from_str(&nested_json(128));
    assert!(ok.is_ok() && too_deep.is_err());
}

// ---- size limit ----

#[test]
fn size_limit() {
    let limit = limits().max_message_size;
    let at_limit = format!("{{\"t\":\"x\",\"p\":\"{}\"}}", "a".repeat(limit - 16));
    assert_eq!(at_limit.len(), limit);
    message(decode(&text(&at_limit)));
    let over = format!("{at_limit} ");
    let err = decode(&text(&over)).unwrap_err();
    assert_eq!(err, DecodeError::TooLarge { size: limit + 1, limit });
    assert!(err.is_fatal());
    for f in [binary(vec![0u8; limit + 1]), binary([b"E:".as_slice(), &vec![0; limit - 1]].concat())] {
        assert_eq!(decode(&f), Err(DecodeError::TooLarge { size: limit + 1, limit }));
        assert_eq!(decode_frame(&f, PACKED, &limits()), Err(DecodeError::TooLarge { size: limit + 1, limit }));
    }
}

#[test]
fn only_too_large_is_fatal() {
    for e in [
        DecodeError::InflateFailed,
        DecodeError::InflateTooLarge,
        DecodeError::MsgpackTooDeep,
        DecodeError::MsgpackInvalid,
        DecodeError::NotUtf8,
        DecodeError::NotAnObject,
        DecodeError::CompressionNotSupported,
        DecodeError::MsgpackNotSupported,
    ] {
        assert!(!e.is_fatal(), "{e}");
        assert!(!e.to_string().is_empty());
    }
}

// ---- binary forms ----

#[test]
fn encrypted_frames_are_passed_whole() {
    let f = binary([b"E:".as_slice(), &[7u8; 40]].concat());
    let Frame::Binary(bytes) = &f else { unreachable!() };
    assert_eq!(decode(&f), Ok(Decoded::Encrypted(bytes.clone())));
    assert_eq!(decode_frame(&f, PACKED, &limits()), Ok(Decoded::Encrypted(bytes.clone())));
    // Even too short ones: the decrypt layer counts and drops them.
    assert_eq!(decode(&binary(*b"E:")), Ok(Decoded::Encrypted(Bytes::from_static(b"E:"))));
}

#[test]
#[cfg(feature = "compression")]
fn compressed_frames() {
    let json = br#"{"t":"chat","p":{"text":"hi"}}"#;
    let m = message(decode(&binary(compress(json, 6))));
    assert_eq!(m.t(), Some("chat"));
    // Legacy prefix inside compression.
    let m = message(decode(&binary(compress(br#"WSE{"t":"ping"}"#, 1))));
    assert_eq!(m.t(), Some("ping"));
    // Inflated non-object text follows the raw-text rule.
    assert_eq!(decode(&binary(compress(b"hello", 1))), Ok(Decoded::RawText("hello".into())));
    // Inflated bytes must be UTF-8.
    assert_eq!(decode(&binary(compress(&[0xff, 0xfe], 1))), Err(DecodeError::NotUtf8));
    // Corrupt stream.
    assert_eq!(decode(&binary(*b"C:garbage")), Err(DecodeError::InflateFailed));
    assert_eq!(decode(&binary(*b"C:")), Err(DecodeError::InflateFailed));
}

#[test]
#[cfg(feature = "msgpack")]
fn msgpack_prefixed_frames_on_any_connection() {
    let env = Envelope::new("chat", json!({"text":"hi"}));
    let frame = binary([b"M:".as_slice(), &env.to_msgpack()].concat());
    for format in [WireFormat::Json, PACKED] {
        let m = message(decode_frame(&frame, format, &limits()));
        assert_eq!(m.t(), Some("chat"));
        assert_eq!(m.p(), Some(&json!({"text":"hi"})));
    }
    // A non-map after M: is dropped.
    assert_eq!(decode(&binary(*b"M:\x01")), Err(DecodeError::MsgpackInvalid));
    assert_eq!(decode(&binary(*b"M:")), Err(DecodeError::MsgpackInvalid));
    // Normalization applies to msgpack too.
    let mp = rmp_serde::to_vec(&json!({"type":"a","payload":1})).unwrap();
    let m = message(decode(&binary([b"M:".as_slice(), &mp].concat())));
    assert_eq!(m.t(), Some("a"));
    assert_eq!(m.p(), Some(&json!(1)));
}

#[test]
#[cfg(feature = "msgpack")]
fn raw_msgpack_on_msgpack_connections() {
    let mp = Envelope::new("chat", json!({})).to_msgpack();
    let m = message(decode_frame(&binary(mp.clone()), PACKED, &limits()));
    assert_eq!(m.t(), Some("chat"));
    // On a JSON connection the same bytes are raw binary.
    assert_eq!(decode(&binary(mp.clone())), Ok(Decoded::RawBinary(mp.into())));
    // Valid msgpack that is not a map, and undecodable bytes, are raw binary.
    for b in [vec![0x01], vec![0x92, 0x01, 0x02], vec![0xc1], vec![0x85]] {
        assert_eq!(decode_frame(&binary(b.clone()), PACKED, &limits()), Ok(Decoded::RawBinary(b.into())));
    }
    // Too deep is dropped rather than handed on.
    assert_eq!(decode_frame(&binary(nested_msgpack_maps(65)), PACKED, &limits()), Err(DecodeError::MsgpackTooDeep));
}

#[test]
fn binary_plain_json_is_accepted() {
    for format in [WireFormat::Json, PACKED] {
        let m = message(decode_frame(&binary(*br#"{"t":"chat"}"#), format, &limits()));
        assert_eq!(m.t(), Some("chat"));
        let m = message(decode_frame(&binary(*br#"U{"t":"chat"}"#), format, &limits()));
        assert_eq!(m.t(), Some("chat"));
    }
    // Anything else binary is raw.
    for b in [b"hello".to_vec(), b"[1]".to_vec(), vec![0xff, 0x00], b"{not json".to_vec(), b"{\xff}".to_vec()] {
        assert_eq!(decode(&binary(b.clone())), Ok(Decoded::RawBinary(b.into())));
    }
}

// ---- decode_plaintext ----

#[test]
fn plaintext_paths() {
    let l = limits();
    let m = message(decode_plaintext(br#"{"t":"ping","p":{"timestamp":1}}"#, &l));
    assert_eq!(m.t(), Some("ping"));
    let m = message(decode_plaintext(br#"WSE{"t":"ping"}"#, &l));
    assert_eq!(m.t(), Some("ping"));
    assert_eq!(decode_plaintext(b"plain words", &l), Ok(Decoded::RawText("plain words".into())));
    assert_eq!(decode_plaintext(b"", &l), Ok(Decoded::RawText("".into())));
    assert_eq!(decode_plaintext(&[0x80, 0x81], &l), Err(DecodeError::NotUtf8));
    #[cfg(feature = "msgpack")]
    {
        let mp = Envelope::new("chat", json!({})).to_msgpack();
        let m = message(decode_plaintext(&[b"M:".as_slice(), &mp].concat(), &l));
        assert_eq!(m.t(), Some("chat"));
        assert_eq!(decode_plaintext(b"M:\x90", &l), Err(DecodeError::MsgpackInvalid));
        assert_eq!(
            decode_plaintext(&[b"M:".as_slice(), &nested_msgpack_arrays(100)].concat(), &l),
            Err(DecodeError::MsgpackTooDeep)
        );
        // Raw msgpack is not accepted as plaintext (the Python client sends JSON text).
        assert_eq!(decode_plaintext(&mp, &l), Err(DecodeError::NotUtf8));
    }
}

// ---- compression ----

#[test]
#[cfg(feature = "compression")]
fn compress_header_and_levels() {
    let data = br#"{"t":"x","p":{"a":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}}"#;
    for level in [0, 1, 2, 5, 6, 9, 42] {
        let c = compress(data, level);
        assert_eq!(&c[..2], b"C:");
        assert_eq!(c[2], 0x78, "level {level}");
        assert_eq!((u16::from(c[2]) << 8 | u16::from(c[3])) % 31, 0, "FCHECK");
        assert_eq!(inflate_capped(&c[2..], 1 << 20).unwrap(), data);
    }
    assert_eq!(&compress(data, 1)[2..4], [0x78, 0x01]);
}

#[test]
#[cfg(feature = "compression")]
fn inflate_exact_cap_and_one_over() {
    let data = vec![b'a'; 1000];
    let c = compress(&data, 9);
    let out = inflate_capped(&c[2..], 1000).unwrap();
    assert_eq!(out, data);
    // The buffer never grew past cap + 1.
    assert!(out.capacity() <= 1001, "{}", out.capacity());
    assert_eq!(inflate_capped(&c[2..], 999), Err(DecodeError::InflateTooLarge));
    assert_eq!(inflate_capped(&compress(b"", 1)[2..], 0), Ok(Vec::new()));
    assert_eq!(inflate_capped(&compress(b"x", 1)[2..], 0), Err(DecodeError::InflateTooLarge));
}

#[test]
#[cfg(feature = "compression")]
fn inflate_rejects_corrupt_and_truncated_streams() {
    let data: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
    let c = compress(&data, 6);
    let z = &c[2..];
    for cut in [0, 1, 2, 3, z.len() / 2, z.len() - 4, z.len() - 1] {
        assert_eq!(inflate_capped(&z[..cut], 1 << 20), Err(DecodeError::InflateFailed), "cut {cut}");
    }
    // Wrong checksum.
    let mut bad = z.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert_eq!(inflate_capped(&bad, 1 << 20), Err(DecodeError::InflateFailed));
    // Raw deflate and gzip are not zlib.
    let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
    raw.write_all(&data).unwrap();
    assert_eq!(inflate_capped(&raw.finish().unwrap(), 1 << 20), Err(DecodeError::InflateFailed));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&data).unwrap();
    assert_eq!(inflate_capped(&gz.finish().unwrap(), 1 << 20), Err(DecodeError::InflateFailed));
    for garbage in [&b"\x78\x01\xff\xff\xff"[..], b"\x00\x00", b"\x78"] {
        assert_eq!(inflate_capped(garbage, 1 << 20), Err(DecodeError::InflateFailed));
    }
}

/// A valid zlib stream of `1 + 258 * matches` zero bytes, written by hand with one fixed
/// Huffman block: a literal 0 and then `matches` copies of (length 258, distance 1), 13 bits
/// each. This makes a 100 MiB bomb in a few hundred KiB without running a compressor.
#[cfg(feature = "compression")]
fn zero_bomb(matches: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        /// Header fields: least significant bit first.
        fn lsb(&mut self, value: u32, n: u32) {
            for i in 0..n {
                self.bit((value >> i) & 1);
            }
        }
        /// Huffman codes: most significant bit first.
        fn code(&mut self, code: u32, n: u32) {
            for i in (0..n).rev() {
                self.bit((code >> i) & 1);
            }
        }
        fn bit(&mut self, b: u32) {
            self.acc |= b << self.n;
            self.n += 1;
            if self.n == 8 {
                self.out.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }
    let mut w = Bits { out: vec![0x78, 0x01], acc: 0, n: 0 };
    w.lsb(1, 1); // BFINAL
    w.lsb(1, 2); // BTYPE = fixed Huffman
    w.code(0x30, 8); // literal 0
    for _ in 0..matches {
        w.code(0xc5, 8); // length code 285 = 258
        w.code(0, 5); // distance code 0 = 1
    }
    w.code(0, 7); // end of block (256)
    while w.n != 0 {
        w.bit(0);
    }
    let total = 1 + 258 * matches as u64;
    let adler = ((total % 65_521) << 16) as u32 | 1; // a = 1, b = n·1 for all-zero input
    w.out.extend_from_slice(&adler.to_be_bytes());
    w.out
}

#[test]
#[cfg(feature = "compression")]
fn zero_bomb_generator_is_valid() {
    let z = zero_bomb(1000);
    let out = inflate_capped(&z, 1 << 20).unwrap();
    assert_eq!(out.len(), 1 + 258 * 1000);
    assert!(out.iter().all(|&b| b == 0));
}

#[test]
#[cfg(feature = "compression")]
fn zlib_bomb_is_refused_quickly() {
    let matches = (100 << 20) / 258; // ~100 MiB of zeros
    let z = zero_bomb(matches);
    assert!(z.len() < 1 << 20, "bomb fits in one frame: {}", z.len());
    let start = Instant::now();
    assert_eq!(inflate_capped(&z, 1 << 20), Err(DecodeError::InflateTooLarge));
    let frame = binary([b"C:".as_slice(), &z].concat());
    assert_eq!(decode(&frame), Err(DecodeError::InflateTooLarge));
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    // The same content compressed by flate2 is refused too.
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::fast());
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..4 {
        enc.write_all(&chunk).unwrap();
    }
    let z = enc.finish().unwrap();
    assert_eq!(inflate_capped(&z, 1 << 20), Err(DecodeError::InflateTooLarge));
}

// ---- msgpack ----

#[test]
#[cfg(feature = "msgpack")]
fn msgpack_depth_limit_is_exactly_64() {
    for build in [nested_msgpack_arrays, nested_msgpack_maps] {
        let ok = build(64);
        assert_eq!(check_msgpack_depth(&ok, 64), Ok(()));
        assert!(decode_msgpack(&ok, &limits()).is_ok());
        let deep = build(65);
        assert_eq!(check_msgpack_depth(&deep, 64), Err(DecodeError::MsgpackTooDeep));
        assert_eq!(decode_msgpack(&deep, &limits()), Err(DecodeError::MsgpackTooDeep));
    }
    // Scalars are depth 0; an empty container is depth 1.
    assert_eq!(check_msgpack_depth(&[0x01], 0), Ok(()));
    assert_eq!(check_msgpack_depth(&[0x90], 0), Err(DecodeError::MsgpackTooDeep));
    assert_eq!(check_msgpack_depth(&[0x90], 1), Ok(()));
    assert_eq!(check_msgpack_depth(&[0x91, 0x80], 1), Err(DecodeError::MsgpackTooDeep));
    // Siblings do not add up: [[], [], []] is depth 2.
    assert_eq!(check_msgpack_depth(&[0x93, 0x90, 0x90, 0x90], 2), Ok(()));
}

#[test]
#[cfg(feature = "msgpack")]
fn very_deep_msgpack_does_not_overflow() {
    for n in [1_000, 100_000, 1_000_000] {
        for build in [nested_msgpack_arrays, nested_msgpack_maps] {
            let deep = build(n);
            assert_eq!(check_msgpack_depth(&deep, 64), Err(DecodeError::MsgpackTooDeep));
            let frame = binary([b"M:".as_slice(), &deep].concat());
            if frame.len() <= limits().max_message_size {
                assert_eq!(decode(&frame), Err(DecodeError::MsgpackTooDeep));
            }
        }
    }
    // A generous limit still decodes iteratively, without recursion.
    let deep = nested_msgpack_arrays(100_000);
    let lax = Limits { max_msgpack_depth: 200_000, ..Limits::default() };
    let v = decode_msgpack(&deep, &lax).unwrap();
    // Dropping a deeply nested Value recurses in serde_json; unwrap it level by level.
    let mut cur = v;
    let mut depth = 0;
    while let Value::Array(mut a) = cur {
        depth += 1;
        cur = a.pop().unwrap();
    }
    assert_eq!(depth, 100_000);
}

#[test]
#[cfg(feature = "msgpack")]
fn truncated_and_trailing_msgpack_is_invalid() {
    let mut env = Envelope::new("chat", json!({"text":"hi","n":[1,2.5,-3,null,true]})).identified();
    env.seq = Some(70_000);
    let mp = env.to_msgpack();
    for cut in 0..mp.len() {
        assert_eq!(check_msgpack_depth(&mp[..cut], 64), Err(DecodeError::MsgpackInvalid), "cut {cut}");
        assert_eq!(decode_msgpack(&mp[..cut], &limits()), Err(DecodeError::MsgpackInvalid));
    }
    let mut trailing = mp.clone();
    trailing.push(0xc0);
    assert_eq!(decode_msgpack(&trailing, &limits()), Err(DecodeError::MsgpackInvalid));
    assert!(decode_msgpack(&mp, &limits()).is_ok());
    // Huge declared lengths with no data.
    for b in [&[0xdd, 0xff, 0xff, 0xff, 0xff][..], &[0xdf, 0xff, 0xff, 0xff, 0xff], &[0xdb, 0xff, 0xff, 0xff, 0xff]] {
        assert_eq!(decode_msgpack(b, &limits()), Err(DecodeError::MsgpackInvalid));
    }
}

#[test]
#[cfg(feature = "msgpack")]
fn msgpack_without_json_equivalent_is_invalid() {
    let l = limits();
    let cases: [&[u8]; 9] = [
        &[0xc4, 0x01, 0x00],                   // bin 8
        &[0xc7, 0x01, 0x05, 0x00],             // ext 8
        &[0xd4, 0x05, 0x00],                   // fixext 1
        &[0xd6, 0xff, 0, 0, 0, 0],             // timestamp ext
        &[0x81, 0x01, 0x02],                   // integer key
        &[0x81, 0x90, 0x02],                   // array key
        &[0xa2, 0xff, 0xfe],                   // invalid UTF-8 string
        &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0], // NaN
        &[0xc1],                               // never-used marker
    ];
    for b in cases {
        assert_eq!(decode_msgpack(b, &l), Err(DecodeError::MsgpackInvalid), "{b:02x?}");
    }
    // bin and ext are structurally valid for the depth check.
    assert_eq!(check_msgpack_depth(&[0x92, 0xc4, 0x01, 0x00, 0xd4, 0x05, 0x00], 64), Ok(()));
}

#[test]
#[cfg(feature = "msgpack")]
fn msgpack_scalar_table() {
    let l = limits();
    let table: [(&[u8], Value); 16] = [
        (&[0xc0], Value::Null),
        (&[0xc2], json!(false)),
        (&[0xc3], json!(true)),
        (&[0x7f], json!(127)),
        (&[0xe0], json!(-32)),
        (&[0xcc, 0xff], json!(255)),
        (&[0xcd, 0x01, 0x00], json!(256)),
        (&[0xce, 0xff, 0xff, 0xff, 0xff], json!(u32::MAX)),
        (&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], json!(u64::MAX)),
        (&[0xd0, 0x80], json!(-128)),
        (&[0xd1, 0x80, 0x00], json!(-32768)),
        (&[0xd2, 0x80, 0, 0, 0], json!(i32::MIN)),
        (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], json!(i64::MIN)),
        (&[0xca, 0x3f, 0xc0, 0, 0], json!(1.5)),
        (&[0xd9, 0x02, b'h', b'i'], json!("hi")),
        (&[0x82, 0xa1, b'a', 0x01, 0xa1, b'a', 0x02], json!({"a":2})), // duplicate key: last wins
    ];
    for (b, want) in table {
        assert_eq!(decode_msgpack(b, &l), Ok(want), "{b:02x?}");
    }
}

// ---- builds without the compression or msgpack feature ----

/// `"C:"` ‖ a zlib stream of `data` in one stored (uncompressed) block, written by hand so the
/// test needs no compressor.
#[cfg(not(feature = "compression"))]
fn stored_zlib_frame(data: &[u8]) -> Frame {
    let len = u16::try_from(data.len()).unwrap();
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    let mut out = b"C:\x78\x01\x01".to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    binary(out)
}

#[test]
#[cfg(not(feature = "compression"))]
fn compressed_frames_are_refused_without_the_compression_feature() {
    // Valid and corrupt `C:` frames alike: an error (INVALID_REQUEST, connection kept), never
    // raw binary handed to the application.
    for frame in [stored_zlib_frame(br#"{"t":"chat"}"#), binary(*b"C:garbage"), binary(*b"C:")] {
        assert_eq!(decode(&frame), Err(DecodeError::CompressionNotSupported));
        assert_eq!(decode_frame(&frame, PACKED, &limits()), Err(DecodeError::CompressionNotSupported));
    }
    let error = crate::ProtocolError::from(DecodeError::CompressionNotSupported);
    assert_eq!(error.code(), crate::ErrorCode::InvalidRequest);
    assert_eq!(error.close(), None);
    assert!(error.message().contains("`compression` feature"), "{}", error.message());
    // Outbound: never compressed, whatever the threshold.
    let env = Envelope::new("x", json!({"a": "b".repeat(3000)}));
    assert_eq!(encode_data(&env, WireFormat::Json, true, Some((0, 1))), Frame::text(env.to_json_string()));
    assert_eq!(encode_data(&env, WireFormat::Json, false, Some((0, 1))), Frame::Binary(env.to_json().into()));
}

#[test]
#[cfg(not(feature = "msgpack"))]
fn msgpack_frames_are_refused_without_the_msgpack_feature() {
    // `format=msgpack` connections are served JSON.
    assert_eq!(WireFormat::from_query(Some("format=msgpack")), WireFormat::Json);
    // fixmap {"t": "chat"}
    let map = [0x81, 0xa1, b't', 0xa4, b'c', b'h', b'a', b't'];
    let prefixed = [b"M:".as_slice(), &map].concat();
    assert_eq!(decode(&binary(prefixed.clone())), Err(DecodeError::MsgpackNotSupported));
    assert_eq!(decode(&binary(*b"M:")), Err(DecodeError::MsgpackNotSupported));
    assert_eq!(decode_plaintext(&prefixed, &limits()), Err(DecodeError::MsgpackNotSupported));
    // Raw msgpack is raw binary, as on any JSON connection (INVALID_REQUEST unless the
    // application accepts raw messages).
    assert_eq!(decode(&binary(map.to_vec())), Ok(Decoded::RawBinary(Bytes::copy_from_slice(&map))));
    let error = crate::ProtocolError::from(DecodeError::MsgpackNotSupported);
    assert_eq!(error.code(), crate::ErrorCode::InvalidRequest);
    assert_eq!(error.close(), None);
    assert!(error.message().contains("`msgpack` feature"), "{}", error.message());
}

// ---- encoding ----

#[test]
fn encode_data_forms() {
    let small = Envelope::new("echo_reply", json!({"hello":"world"}));
    let json_bytes = small.to_json();
    assert_eq!(encode_data(&small, WireFormat::Json, false, Some((1024, 1))), Frame::Binary(json_bytes.clone().into()));
    assert_eq!(
        encode_data(&small, WireFormat::Json, true, None),
        Frame::Text(String::from_utf8(json_bytes).unwrap().into())
    );
    #[cfg(feature = "msgpack")]
    {
        let mp = encode_data(&small, PACKED, true, Some((0, 1)));
        assert_eq!(mp, Frame::Binary([b"M:".as_slice(), &small.to_msgpack()].concat().into()));
    }
}

#[test]
#[cfg(feature = "compression")]
fn compression_threshold_is_strict() {
    let env = Envelope::new("x", json!({"a": "b".repeat(200)}));
    let len = env.to_json().len();
    let at = encode_data(&env, WireFormat::Json, true, Some((len, 1)));
    assert!(at.is_text(), "equal to the threshold: not compressed");
    let over = encode_data(&env, WireFormat::Json, true, Some((len - 1, 1)));
    assert!(over.as_bytes().starts_with(b"C:\x78\x01"));
    assert!(over.len() < len);
    let back = message(decode(&over));
    assert_eq!(back.p(), Some(&env.p));
}

#[test]
fn incompressible_data_is_sent_plain() {
    // Pseudo-random hex digits barely compress; with the "C:" prefix and zlib overhead on a
    // short message the compressed form is not smaller.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: String = (0..24)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 36) as u32, 36).unwrap()
        })
        .collect();
    let env = Envelope::new("x", json!({ "n": noise }));
    let f = encode_data(&env, WireFormat::Json, false, Some((0, 1)));
    assert_eq!(f, Frame::Binary(env.to_json().into()));
}

#[test]
fn protocol_frames_are_text() {
    let env = crate::envelope::server_ping("2026-11-29T16:22:42.832Z".into());
    let f = encode_protocol(&env);
    assert_eq!(f, Frame::text(r#"{"c":"WSE","t":"ping","p":{"server_time":"2026-11-29T16:22:42.832Z"}}"#));
    let pong = encode_protocol(&crate::envelope::pong(Some(&json!(1)), 2));
    assert!(pong.is_text());
    assert!(pong.as_bytes().starts_with(br#"{"c":"WSE","t":"PONG""#));
}

#[test]
fn outbound_frames_never_start_like_raw_zlib() {
    // §3.2: a binary frame that is not a zlib stream must not begin 78 01/5E/9C/DA.
    let env = Envelope::new("x", json!({"a":"b".repeat(3000)}));
    for f in [
        encode_data(&env, WireFormat::Json, false, None),
        encode_data(&env, WireFormat::Json, false, Some((10, 1))),
        encode_data(&env, PACKED, false, None),
    ] {
        assert_ne!(f.as_bytes()[0], 0x78);
    }
}

// ---- properties ----

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("\\PC{0,6}", inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_prefix() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"C:".to_vec()),
        Just(b"M:".to_vec()),
        Just(b"E:".to_vec()),
        Just(b"WSE{".to_vec()),
        Just(b"{".to_vec()),
        Just(b"C:\x78\x01".to_vec()),
    ]
}

proptest! {
    #[test]
    #[cfg(feature = "compression")]
    fn compress_round_trip(data in prop::collection::vec(any::<u8>(), 0..4096), level in 1u32..=9) {
        let c = compress(&data, level);
        prop_assert_eq!(&c[..3], b"C:\x78");
        prop_assert_eq!(inflate_capped(&c[2..], data.len()), Ok(data.clone()));
        if !data.is_empty() {
            prop_assert_eq!(inflate_capped(&c[2..], data.len() - 1), Err(DecodeError::InflateTooLarge));
        }
    }

    #[test]
    #[cfg(feature = "compression")]
    fn compressed_json_round_trip(v in arb_json()) {
        let map = match v { Value::Object(m) => m, other => [("v".to_owned(), other)].into_iter().collect() };
        let json = serde_json::to_vec(&map).unwrap();
        let m = message(decode(&binary(compress(&json, 1))));
        prop_assert_eq!(m.into_fields(), InboundMessage::from_map(map).into_fields());
    }

    #[test]
    #[cfg(feature = "msgpack")]
    fn msgpack_round_trip(v in arb_json()) {
        let mp = rmp_serde::to_vec(&v).unwrap();
        prop_assert_eq!(decode_msgpack(&mp, &limits()), Ok(v));
    }

    #[test]
    fn decode_frame_never_panics_on_bytes(
        prefix in arb_prefix(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        msgpack in any::<bool>(),
    ) {
        let format = if msgpack { PACKED } else { WireFormat::Json };
        let bytes = [prefix, body].concat();
        let _ = decode_frame(&binary(bytes.clone()), format, &limits());
        let _ = decode_plaintext(&bytes, &limits());
        #[cfg(feature = "msgpack")]
        let _ = check_msgpack_depth(&bytes, 64);
        let _ = prepare_raw_publication_bytes(&bytes);
    }

    #[test]
    fn decode_frame_never_panics_on_text(s in "\\PC{0,256}", msgpack in any::<bool>()) {
        let format = if msgpack { PACKED } else { WireFormat::Json };
        for candidate in [s.clone(), format!("{{{s}"), format!("WSE{{{s}}}")] {
            let f = text(&candidate);
            let _ = decode_frame(&f, format, &limits());
            let _ = decode_frame(&binary(candidate.into_bytes()), format, &limits());
        }
    }

    #[test]
    #[cfg(feature = "msgpack")]
    fn decode_frame_never_panics_on_structured_msgpack(v in arb_json(), cut in any::<prop::sample::Index>()) {
        let mp = rmp_serde::to_vec(&v).unwrap();
        let cut = cut.index(mp.len() + 1);
        for format in [WireFormat::Json, PACKED] {
            let _ = decode_frame(&binary([b"M:".as_slice(), &mp[..cut]].concat()), format, &limits());
            let _ = decode_frame(&binary(mp[..cut].to_vec()), format, &limits());
        }
    }

    #[test]
    fn text_object_round_trip(v in arb_json()) {
        let map = match v { Value::Object(m) => m, other => [("v".to_owned(), other)].into_iter().collect() };
        let s = serde_json::to_string(&map).unwrap();
        let m = message(decode(&text(&s)));
        prop_assert_eq!(m.into_fields(), InboundMessage::from_map(map).into_fields());
    }
}

fn prepare_raw_publication_bytes(bytes: &[u8]) -> Option<Vec<u8>> {
    crate::envelope::prepare_raw_publication(bytes, None).ok()
}
