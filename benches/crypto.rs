//! Message-security micro benchmarks: AES-256-GCM seal and open of whole `E:` frames
//! (PROTOCOL.md §7.3; seal includes the random IV), and HMAC-SHA256 signing of a message
//! including its RFC 8785 canonicalization (§8.3), at payloads of 100 B, 1 KiB and 64 KiB,
//! single-threaded.
//!
//! Each case runs a warm-up, then `WSENGINE_BENCH_REPS` timed rounds of `WSENGINE_BENCH_SECS`
//! seconds each (defaults 5 and 1); the figure is the median round, as ns per operation and
//! MB/s of payload (1 MB = 10⁶ bytes).
//!
//! ```text
//! cargo bench --bench crypto
//! WSENGINE_BENCH_REPS=9 WSENGINE_BENCH_SECS=2 cargo bench --bench crypto
//! ```

mod common;

use common::{env_number, measure};
use std::hint::black_box;

use serde_json::{Map, Value, json};
use wsengine::layers::encrypt::SessionKey;
use wsengine::layers::sign::Signer;

/// One benchmarked operation.
type Operation<'a> = Box<dyn FnMut() + 'a>;

/// A message whose compact JSON is `size` bytes: an envelope with a text payload.
fn message(size: usize) -> Map<String, Value> {
    let envelope = json!({"c": "U", "t": "chat", "id": "3f98e277-4cbd-47ad", "p": {"text": ""}, "v": 1});
    let overhead = envelope.to_string().len();
    let Value::Object(mut map) = envelope else { unreachable!() };
    map["p"]["text"] = "x".repeat(size.saturating_sub(overhead)).into();
    map
}

fn main() {
    let reps = env_number("WSENGINE_BENCH_REPS", 5.0).max(1.0) as usize;
    let seconds = env_number("WSENGINE_BENCH_SECS", 1.0).max(0.05);
    let key = SessionKey::from_bytes(&[7; 32]);
    let signer = Signer::new(b"benchmark-secret-of-at-least-32-bytes!").expect("secret");
    println!("{:<22} {:>8} {:>12} {:>10}", "operation", "payload", "ns/op", "MB/s");
    for size in [100usize, 1024, 64 * 1024] {
        let message = message(size);
        let plaintext = Value::Object(message.clone()).to_string().into_bytes();
        let frame = key.seal(&plaintext).expect("seal");
        let cases: [(&str, Operation); 3] = [
            ("aes-256-gcm seal", Box::new(|| drop(black_box(key.seal(black_box(&plaintext)).expect("seal"))))),
            ("aes-256-gcm open", Box::new(|| drop(black_box(key.open(black_box(&frame)).expect("open"))))),
            ("hmac-sha256 sign+jcs", Box::new(|| drop(black_box(signer.sign(black_box(&message)).expect("sign"))))),
        ];
        for (name, op) in cases {
            let ns = measure(op, reps, seconds);
            let mbps = plaintext.len() as f64 / ns * 1e3;
            println!("{name:<22} {:>8} {ns:>12.0} {mbps:>10.1}", plaintext.len());
        }
    }
}
