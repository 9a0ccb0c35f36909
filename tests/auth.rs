//! JWT and custom-hook authentication of upgrades over real sockets (PROTOCOL.md §2.3–§2.5,
//! §6.2.4 step 3): every rejection path gets its exact error frame and close 4401, never
//! registers the connection and leaves other connections working; valid tokens of every
//! algorithm subscribe and receive, and the `wse_topics` ACL puts denied topics into
//! `failed_topics` with `FORBIDDEN`.
#![cfg(feature = "auth")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsengine::client::Client;
use wsengine::layers::auth::{Denial, Grant, auth_fn};
use wsengine::services::acl::TopicAcl;
use wsengine::{Config, Engine, Envelope};

const SECRET: &str = "test-only-secret-0123456789abcdef";
const OTHER_SECRET: &str = "test-only-other-secret-0123456789";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(), None, claims)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read_fixture("rsa_private.pem")).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&read_fixture("ec_private.pem")).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600})
}

fn upgrade_request(addr: SocketAddr, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut builder = http::Request::builder()
        .uri(format!("ws://{addr}/wse?client_version=2.0.7"))
        .header("host", addr.to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap()
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

async fn connect(addr: SocketAddr, headers: &[(&str, &str)]) -> Client {
    Client::connect_request(upgrade_request(addr, headers)).await.expect("accepted")
}

/// Connects expecting a refusal: returns the error frame's `p` and the close code and reason.
async fn rejected(addr: SocketAddr, headers: &[(&str, &str)]) -> (Value, u16, String) {
    let (mut socket, response) = tokio_tungstenite::connect_async(upgrade_request(addr, headers)).await.unwrap();
    assert_eq!(response.status(), 101, "auth failures are reported after the upgrade");
    let error = match tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap() {
        Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).unwrap(),
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert_eq!(error["t"], "error");
    assert!(error["p"].get("recoverable").is_none());
    let (code, reason) = match tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => (u16::from(frame.code), frame.reason.to_string()),
        other => panic!("expected a close frame, got {other:?}"),
    };
    (error["p"].clone(), code, reason)
}

async fn assert_rejected(addr: SocketAddr, headers: &[(&str, &str)], code: &str, message: &str) {
    let (p, close, reason) = rejected(addr, headers).await;
    assert_eq!((p["code"].as_str(), p["message"].as_str()), (Some(code), Some(message)), "{headers:?}");
    assert_eq!((close, reason.as_str()), (4401, "Authentication failed"), "{headers:?}");
}

fn failed_reasons(ack: &Value) -> Value {
    ack["p"]["failure_reasons"].clone()
}

/// A valid token subscribes, the ACL refuses a denied topic, a publication arrives.
async fn subscribe_and_receive(server: &TestServer, headers: &[(&str, &str)], user: &str) {
    let mut client = connect(server.addr, headers).await;
    let details = &client.server_ready()["p"]["details"];
    assert_eq!(details["user_id"], user);
    assert_eq!(details["features"]["rust_jwt"], true);
    let ack = client.subscribe(&["news.world", "news.secret", "admin.audit"]).await.unwrap();
    assert_eq!(ack["p"]["success"], true);
    assert_eq!(ack["p"]["success_topics"], json!(["news.world"]));
    assert_eq!(ack["p"]["failed_topics"], json!(["news.secret", "admin.audit"]));
    assert_eq!(failed_reasons(&ack), json!({"news.secret": "FORBIDDEN", "admin.audit": "FORBIDDEN"}));
    server.engine.publish("news.secret", Envelope::new("headline", json!({"n": 0}))).await.unwrap();
    server.engine.publish("news.world", Envelope::new("headline", json!({"n": 1}))).await.unwrap();
    let message = client.recv().await.unwrap();
    assert_eq!((message["t"].as_str(), &message["p"]), (Some("headline"), &json!({"n": 1})));
}

fn acl_claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "wse_topics": {"allow": ["news.*"], "deny": ["news.secret"]}})
}

#[tokio::test]
async fn hs256_token_subscribes_and_receives_with_its_acl() {
    let server = start(|c| c.jwt_secret = Some(SECRET.into())).await;
    let token = hs(&acl_claims("alice"));
    let (name, value) = bearer(&token);
    subscribe_and_receive(&server, &[(name, &value)], "alice").await;
    server.stop().await;
}

#[tokio::test]
async fn rs256_token_subscribes_and_receives_with_its_acl() {
    let server = start(|c| {
        c.jwt_algorithm = "RS256".into();
        c.jwt_public_key = Some(fixture("rsa_public.pem"));
    })
    .await;
    let token = sign(Algorithm::RS256, &rsa_key(), None, &acl_claims("bob"));
    let cookie = format!("theme=dark; access_token={token}");
    subscribe_and_receive(&server, &[("cookie", &cookie)], "bob").await;
    server.stop().await;
}

#[tokio::test]
async fn es256_token_subscribes_and_receives_with_its_acl() {
    // The key given inline as PEM text rather than as a path.
    let pem = String::from_utf8(read_fixture("ec_public.pem")).unwrap();
    let server = start(|c| {
        c.jwt_algorithm = "ES256".into();
        c.jwt_public_key = Some(pem);
    })
    .await;
    let token = sign(Algorithm::ES256, &ec_key(), None, &acl_claims("carol"));
    let (name, value) = bearer(&token);
    subscribe_and_receive(&server, &[(name, &value)], "carol").await;
    server.stop().await;
}

#[tokio::test]
async fn every_rejection_path_gets_its_error_and_4401() {
    let server = start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_issuer = "https://login.test".into();
        c.jwt_audience = "wse".into();
        c.jwt_key_id = "k1".into();
    })
    .await;
    let addr = server.addr;
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let good = |extra: Value| {
        let mut claims = json!({"sub": "u", "exp": now() + 600, "iss": "https://login.test", "aud": "wse"});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let valid = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({})));

    // A working connection that must survive every refusal below.
    let (name, value) = bearer(&valid);
    let mut survivor = connect(addr, &[(name, &value)]).await;
    survivor.subscribe(&["prices"]).await.unwrap();

    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(OTHER_SECRET.as_bytes()).unwrap(),
        Some("k1"),
        &good(json!({})),
    );
    let expired = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"exp": now() - 120})));
    let not_yet = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"nbf": now() + 120})));
    let no_exp = {
        let mut claims = good(json!({}));
        claims.as_object_mut().unwrap().remove("exp");
        sign(Algorithm::HS256, &key, Some("k1"), &claims)
    };
    let wrong_issuer = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"iss": "https://evil.test"})));
    let wrong_audience = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"aud": ["other", "x"]})));
    let wrong_kid = sign(Algorithm::HS256, &key, Some("k2"), &good(json!({})));
    let no_kid = sign(Algorithm::HS256, &key, None, &good(json!({})));
    let oversized = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"pad": "x".repeat(9000)})));
    assert!(oversized.len() > 8192);
    let bad_acl = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"wse_topics": ["news"]})));
    let no_sub = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"sub": ""})));
    // `alg: none`, unsigned (header {"alg":"none","typ":"JWT"}).
    let payload = {
        use std::fmt::Write;
        let json = good(json!({})).to_string();
        // base64url without padding, by hand to keep the test free of another dependency.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in json.as_bytes().chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.write_char(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char).unwrap();
            }
        }
        out
    };
    let alg_none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");

    let failed = "Authentication failed";
    for (token, why) in [
        (&forged, "forged signature"),
        (&expired, "expired beyond the leeway"),
        (&not_yet, "not yet valid beyond the leeway"),
        (&no_exp, "exp missing"),
        (&wrong_issuer, "wrong issuer"),
        (&wrong_audience, "wrong audience"),
        (&wrong_kid, "wrong kid"),
        (&no_kid, "kid missing"),
        (&oversized, "over 8192 bytes"),
        (&bad_acl, "wse_topics not an object"),
        (&alg_none, "alg none"),
        (&"not-a-jwt".to_owned(), "malformed"),
    ] {
        let (name, value) = bearer(token);
        let (p, close, reason) = rejected(addr, &[(name, &value)]).await;
        assert_eq!((p["code"].as_str(), p["message"].as_str()), (Some("AUTH_FAILED"), Some(failed)), "{why}");
        assert_eq!((close, reason.as_str()), (4401, failed), "{why}");
    }
    assert_rejected(addr, &[("cookie", &format!("access_token={no_sub}"))], "AUTH_FAILED", "Token missing user ID")
        .await;
    let required = "No JWT cookie or Authorization header";
    assert_rejected(addr, &[], "AUTH_REQUIRED", required).await;
    // Malformed or empty cookies count as absent.
    for cookie in ["access_token=undefined", "access_token=null", "access_token=", "access_token", ";;; =x"] {
        assert_rejected(addr, &[("cookie", cookie)], "AUTH_REQUIRED", required).await;
    }
    assert_rejected(addr, &[("authorization", "Basic dXNlcjpwYXNz")], "AUTH_REQUIRED", required).await;
    // A usable cookie is the one validated, even when invalid and a good Bearer is present.
    let (name, value) = bearer(&valid);
    assert_rejected(addr, &[("cookie", "access_token=garbage"), (name, &value)], "AUTH_FAILED", failed).await;
    // …and an absent cookie falls back to Bearer; a quoted cookie is unquoted.
    connect(addr, &[("cookie", "access_token=undefined"), (name, &value)]).await.close().await.unwrap();
    connect(addr, &[("cookie", &format!("access_token=\"{valid}\""))]).await.close().await.unwrap();
    // Audience as an array containing the configured one, and a token inside the leeway.
    let in_leeway = sign(Algorithm::HS256, &key, Some("k1"), &good(json!({"exp": now() - 10, "aud": ["x", "wse"]})));
    connect(addr, &[("cookie", &format!("access_token={in_leeway}"))]).await.close().await.unwrap();

    // No refused connection was ever registered; the survivor still gets its publications.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.engine.connection_count(), 1);
    server.engine.publish("prices", Envelope::new("tick", json!({"p": 1}))).await.unwrap();
    assert_eq!(survivor.recv().await.unwrap()["t"], "tick");
    server.stop().await;
}

#[tokio::test]
async fn rs256_public_key_used_as_hs256_secret_is_rejected() {
    let server = start(|c| {
        c.jwt_algorithm = "RS256".into();
        c.jwt_public_key = Some(fixture("rsa_public.pem"));
    })
    .await;
    let public_pem = read_fixture("rsa_public.pem");
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&public_pem).unwrap(), None, &claims("mallory"));
    let wrong_key = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&read_fixture("rsa_other_private.pem")).unwrap(),
        None,
        &claims("mallory"),
    );
    let other_alg = sign(Algorithm::ES256, &ec_key(), None, &claims("mallory"));
    let rs384 = sign(Algorithm::RS384, &rsa_key(), None, &claims("mallory"));
    for token in [&confused, &wrong_key, &other_alg, &rs384] {
        let (name, value) = bearer(token);
        assert_rejected(server.addr, &[(name, &value)], "AUTH_FAILED", "Authentication failed").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn previous_key_is_accepted_during_rotation() {
    let server = start(|c| {
        c.jwt_algorithm = "RS256".into();
        c.jwt_public_key = Some(fixture("rsa_public.pem"));
        c.jwt_previous_public_key = Some(fixture("rsa_other_public.pem"));
        c.jwt_key_id = "2026-11".into();
    })
    .await;
    let addr = server.addr;
    let previous = EncodingKey::from_rsa_pem(&read_fixture("rsa_other_private.pem")).unwrap();
    // Current key with the right kid; previous key with an old kid (not enforced on the retry).
    for token in [
        sign(Algorithm::RS256, &rsa_key(), Some("2026-11"), &claims("a")),
        sign(Algorithm::RS256, &previous, Some("2026-10"), &claims("a")),
        sign(Algorithm::RS256, &previous, None, &claims("a")),
    ] {
        let (name, value) = bearer(&token);
        connect(addr, &[(name, &value)]).await.close().await.unwrap();
    }
    // The current key with a wrong kid falls back to the previous key, whose signature fails.
    let token = sign(Algorithm::RS256, &rsa_key(), Some("2026-10"), &claims("a"));
    let (name, value) = bearer(&token);
    assert_rejected(addr, &[(name, &value)], "AUTH_FAILED", "Authentication failed").await;
    // A third key is refused.
    let (name, value) = bearer(&sign(Algorithm::ES256, &ec_key(), None, &claims("a")));
    assert_rejected(addr, &[(name, &value)], "AUTH_FAILED", "Authentication failed").await;
    server.stop().await;
}

#[tokio::test]
async fn acl_is_checked_again_per_topic_for_pattern_subscriptions() {
    let server = start(|c| c.jwt_secret = Some(SECRET.into())).await;
    let token = hs(&json!({"sub": "p", "exp": now() + 600, "wse_topics": {"deny": ["news.secret*"]}}));
    let cookie = format!("access_token={token}");
    let mut client = connect(server.addr, &[("cookie", &cookie)]).await;
    let ack = client.subscribe(&["news.*", "news.secret*"]).await.unwrap();
    assert_eq!(ack["p"]["success_topics"], json!(["news.*"]));
    assert_eq!(failed_reasons(&ack), json!({"news.secret*": "FORBIDDEN"}));
    server.engine.publish("news.secret.plans", Envelope::new("leak", json!({}))).await.unwrap();
    server.engine.publish("news.public", Envelope::new("headline", json!({}))).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "headline", "the denied topic never arrives");
    // sync_request silently drops denied topics.
    client.send("sync_request", json!({"topics": ["news.secret.plans", "news.public"]})).await.unwrap();
    let complete = client.recv().await.unwrap();
    assert_eq!(complete["t"], "snapshot_complete");
    assert_eq!(complete["p"]["topics"], json!(["news.public"]));
    server.stop().await;
}

#[tokio::test]
async fn anonymous_access_follows_allow_anonymous() {
    // Default without a key: anonymous allowed, rust_jwt false.
    let open = start(|_| {}).await;
    let client = connect(open.addr, &[]).await;
    let details = &client.server_ready()["p"]["details"];
    assert_eq!(details["user_id"], details["connection_id"]);
    assert_eq!(details["features"]["rust_jwt"], false);
    open.stop().await;

    // A key configured: anonymous refused unless allowed explicitly.
    let jwt = start(|c| c.jwt_secret = Some(SECRET.into())).await;
    assert_rejected(jwt.addr, &[], "AUTH_REQUIRED", "No JWT cookie or Authorization header").await;
    jwt.stop().await;
    let jwt_open = start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.allow_anonymous = Some(true);
    })
    .await;
    connect(jwt_open.addr, &[]).await.close().await.unwrap();
    let (name, value) = bearer("invalid");
    assert_rejected(jwt_open.addr, &[(name, &value)], "AUTH_FAILED", "Authentication failed").await;
    jwt_open.stop().await;

    // No key and anonymous refused: a locked server.
    let locked = start(|c| c.allow_anonymous = Some(false)).await;
    assert_rejected(locked.addr, &[], "AUTH_REQUIRED", "No JWT cookie or Authorization header").await;
    locked.stop().await;
}

#[tokio::test]
async fn reject_before_upgrade_answers_401() {
    let server = start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.reject_before_upgrade = true;
    })
    .await;
    let error = tokio_tungstenite::connect_async(upgrade_request(server.addr, &[])).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else { panic!("expected HTTP error: {error}") };
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let token = hs(&claims("ok"));
    let (name, value) = bearer(&token);
    connect(server.addr, &[(name, &value)]).await.close().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn weak_or_unreadable_keys_refuse_to_start() {
    let build = |configure: &dyn Fn(&mut Config)| {
        let mut config = test_config();
        configure(&mut config);
        Engine::builder(config).build().map(drop).unwrap_err().to_string()
    };
    assert_eq!(
        build(&|c| c.jwt_secret = Some("short".into())),
        "jwt_secret: an HS256 secret must be at least 32 bytes, got 5"
    );
    assert_eq!(
        build(&|c| {
            c.jwt_secret = Some(SECRET.into());
            c.jwt_previous_secret = Some("x".repeat(31));
        }),
        "jwt_previous_secret: an HS256 secret must be at least 32 bytes, got 31"
    );
    let missing = build(&|c| {
        c.jwt_algorithm = "RS256".into();
        c.jwt_public_key = Some("/nonexistent/key.pem".into());
    });
    assert!(missing.starts_with("jwt_public_key: cannot read PEM file"), "{missing}");
    let wrong_kind = build(&|c| {
        c.jwt_algorithm = "ES256".into();
        c.jwt_public_key = Some(fixture("rsa_public.pem"));
    });
    assert!(wrong_kind.starts_with("jwt_public_key: not a P-256 public key"), "{wrong_kind}");
    assert_eq!(
        build(&|c| c.jwt_algorithm = "none".into()),
        "jwt_algorithm: must be HS256, RS256 or ES256, got \"none\""
    );
    assert_eq!(
        build(&|c| c.jwt_public_key = Some(fixture("rsa_public.pem"))),
        "jwt_public_key: is for RS256 and ES256; HS256 verifies with jwt_secret"
    );
    // Secrets never show in Debug or the printed TOML.
    let config = Config { jwt_secret: Some(SECRET.into()), ..test_config() };
    assert!(!format!("{config:?}").contains(SECRET));
    assert!(!config.to_toml_string().contains(SECRET));
}

#[tokio::test]
async fn custom_hook_decides_and_sees_the_peer() {
    let hook = auth_fn(|request| async move {
        assert!(request.peer.is_some_and(|peer: SocketAddr| peer.ip().is_loopback()));
        assert_eq!(request.query.as_deref(), Some("client_version=2.0.7"));
        match request.headers.get("x-user").and_then(|v| v.to_str().ok()) {
            Some("") | None => Err(Denial::new()),
            Some("banned") => Err(Denial::with_message("User is banned")),
            Some(user) => Ok(Grant { acl: Some(TopicAcl::new(vec![], vec!["vip".into()])), ..Grant::user(user) }),
        }
    });
    let server = start_with(|_| {}, |builder| builder.auth_hook(hook)).await;
    let mut dave = connect(server.addr, &[("x-user", "dave")]).await;
    assert_eq!(dave.server_ready()["p"]["details"]["user_id"], "dave");
    assert_eq!(dave.server_ready()["p"]["details"]["features"]["rust_jwt"], false);
    let ack = dave.subscribe(&["vip", "news"]).await.unwrap();
    assert_eq!(failed_reasons(&ack), json!({"vip": "FORBIDDEN"}));
    assert_rejected(server.addr, &[("x-user", "banned")], "AUTH_FAILED", "User is banned").await;
    assert_rejected(server.addr, &[], "AUTH_FAILED", "Authentication failed").await;
    server.engine.publish("news", Envelope::new("headline", json!({}))).await.unwrap();
    assert_eq!(dave.recv().await.unwrap()["t"], "headline");

    // A hook and a JWT key at once is a configuration error.
    let hook = auth_fn(|_| async { Err(Denial::new()) });
    let config = Config { jwt_secret: Some(SECRET.into()), ..test_config() };
    let error = Engine::builder(config).auth_hook(hook).build().unwrap_err();
    assert_eq!(error.key(), Some("jwt_secret"));
    server.stop().await;
}

#[tokio::test]
async fn an_expired_token_ends_the_session_only_with_close_on_token_expiry() {
    let configure = |close: bool| {
        move |c: &mut Config| {
            c.jwt_secret = Some(SECRET.into());
            c.jwt_leeway = Duration::ZERO;
            c.ping_interval = Duration::from_millis(200);
            c.close_on_token_expiry = close;
        }
    };
    let closing = start(configure(true)).await;
    let keeping = start(configure(false)).await;
    let short = hs(&json!({"sub": "brief", "exp": now() + 2}));
    let (name, value) = bearer(&short);
    let mut expiring = connect(closing.addr, &[(name, &value)]).await;
    let mut outliving = connect(keeping.addr, &[(name, &value)]).await;
    let long = hs(&claims("steady"));
    let (name, value) = bearer(&long);
    let mut neighbour = connect(closing.addr, &[(name, &value)]).await;

    let error = tokio::time::timeout(Duration::from_secs(5), expiring.recv()).await.expect("closed in time").unwrap();
    assert_eq!((error["t"].as_str(), error["p"]["code"].as_str()), (Some("error"), Some("AUTH_FAILED")), "{error}");
    assert_eq!(error["p"]["message"], "Token expired");
    assert_eq!(expiring.recv().await.expect_err("closed").close_code(), Some(4401));

    // Without the setting the session outlives its token (two more ticks); other sessions are
    // untouched.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(outliving.ping().await.is_ok());
    assert!(neighbour.ping().await.is_ok());
    closing.stop().await;
    keeping.stop().await;
}
