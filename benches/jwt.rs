//! JWT validation throughput: `JwtVerifier::verify` (the handshake auth layer's whole token
//! check: size, header, `kid`, signature, `exp`/`nbf`/`iss`/`aud`, `sub`, the `wse_topics`
//! ACL) for HS256, RS256 (2048-bit key) and ES256 (P-256), single-threaded.
//!
//! Each algorithm runs a warm-up, then `WSENGINE_BENCH_REPS` timed rounds of
//! `WSENGINE_BENCH_SECS` seconds each (defaults 5 and 1); the figure is the median round.
//! The keys are the test-only fixtures of `tests/fixtures/`.
//!
//! ```text
//! cargo bench --bench jwt
//! WSENGINE_BENCH_REPS=9 WSENGINE_BENCH_SECS=2 cargo bench --bench jwt
//! ```

mod common;

use common::env_number;
use std::hint::black_box;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use wsengine::layers::auth::{JwtAlgorithm, JwtVerifier};

const SECRET: &[u8] = b"test-only-secret-0123456789abcdef";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn claims() -> serde_json::Value {
    json!({
        "sub": "user-1",
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "iss": "https://login.example.com",
        "aud": ["wse", "api"],
        "wse_topics": {"allow": ["prices.*", "news"], "deny": ["prices.secret"]}
    })
}

fn token(algorithm: Algorithm, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims(), key).expect("sign")
}

/// Median ns per verification over `reps` rounds of `seconds` each.
fn measure(verifier: &JwtVerifier, token: &str, reps: usize, seconds: f64) -> f64 {
    let round = Duration::from_secs_f64(seconds);
    let warmup = Instant::now();
    while warmup.elapsed() < round / 2 {
        verifier.verify(black_box(token)).expect("valid token");
    }
    let mut rounds = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < round {
            for _ in 0..16 {
                black_box(verifier.verify(black_box(token)).expect("valid token"));
            }
            done += 16;
        }
        rounds.push(started.elapsed().as_nanos() as f64 / done as f64);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

fn main() {
    let reps = env_number("WSENGINE_BENCH_REPS", 5.0).max(1.0) as usize;
    let seconds = env_number("WSENGINE_BENCH_SECS", 1.0).max(0.05);
    let cases = [
        (
            JwtAlgorithm::Hs256,
            SECRET.to_vec(),
            token(Algorithm::HS256, &EncodingKey::from_secret(SECRET).expect("secret")),
        ),
        (
            JwtAlgorithm::Rs256,
            fixture("rsa_public.pem"),
            token(Algorithm::RS256, &EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("RSA key")),
        ),
        (
            JwtAlgorithm::Es256,
            fixture("ec_public.pem"),
            token(Algorithm::ES256, &EncodingKey::from_ec_pem(&fixture("ec_private.pem")).expect("EC key")),
        ),
    ];
    println!("JWT validation, 1 thread, median of {reps} rounds x {seconds} s");
    println!("{:<8} {:>12} {:>14} {:>8}", "alg", "ns/op", "ops/s", "bytes");
    for (algorithm, key, token) in cases {
        let verifier = JwtVerifier::new(algorithm, &key)
            .expect("key")
            .issuer("https://login.example.com")
            .audience("wse")
            .key_id("k1");
        let grant = verifier.verify(&token).expect("valid token");
        assert_eq!(grant.user_id, "user-1");
        let ns = measure(&verifier, &token, reps, seconds);
        println!("{:<8} {:>12.0} {:>14.0} {:>8}", algorithm.to_string(), ns, 1e9 / ns, token.len());
    }
}
