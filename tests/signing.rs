//! Message signing over real connections (PROTOCOL.md §8): statuses handed to the
//! application, require mode, freshness, both encodings, outbound signatures, and that
//! unsigned clients keep working when signing is not required.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Map, Value, json};
use wsengine::client::Client;
use wsengine::layers::sign::{SignatureEncoding, Signer};
use wsengine::{AppBody, AppMessage, Engine, Envelope, SignatureStatus, handler_fn};

const SECRET: &str = "example-shared-secret-for-wse-signing-v1";

fn signing(mode: &str) -> impl FnOnce(&mut wsengine::Config) {
    let mode = mode.to_owned();
    move |config| {
        config.signing = mode;
        config.signing_secret = Some(SECRET.into());
    }
}

type Seen = Arc<Mutex<Vec<(String, SignatureStatus)>>>;

/// Records (text, signature status) of every application message and echoes it back.
fn recording_handler() -> (impl wsengine::Handler, Seen) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |message: AppMessage| {
        let sink = Arc::clone(&sink);
        async move {
            let AppBody::Message(m) = message.body else { return Ok(vec![]) };
            let text = m.p().and_then(|p| p["text"].as_str()).unwrap_or_default().to_owned();
            sink.lock().unwrap().push((text.clone(), message.signature));
            Ok(vec![Envelope::new("echo_reply", json!({"text": text}))])
        }
    });
    (handler, seen)
}

struct Signing {
    socket: RawSocket,
    signer: Signer,
    next_id: u32,
}

impl Signing {
    async fn connect(server: &TestServer) -> Signing {
        let mut socket = RawSocket::connect(server.addr, "/wse").await;
        assert_eq!(socket.read_json().await["t"], "server_ready");
        Signing { socket, signer: Signer::new(SECRET).unwrap(), next_id: 0 }
    }

    fn message(&mut self, t: &str, text: &str) -> Map<String, Value> {
        self.next_id += 1;
        let id = format!("{:p}-{}", self, self.next_id);
        let Value::Object(map) =
            json!({"c": "U", "t": t, "id": id, "ts": wsengine::core::time::now_rfc3339(), "p": {"text": text}, "v": 1})
        else {
            unreachable!()
        };
        map
    }

    fn signed(&mut self, t: &str, text: &str, encoding: SignatureEncoding) -> Map<String, Value> {
        let message = self.message(t, text);
        self.sign(message, encoding)
    }

    fn sign(&self, mut message: Map<String, Value>, encoding: SignatureEncoding) -> Map<String, Value> {
        let sig = self.signer.clone().encoding(encoding).sign(&message).unwrap();
        message.insert("sig".into(), sig.into());
        message
    }

    async fn send(&mut self, message: &Map<String, Value>) {
        self.socket.send_frame(TEXT, Value::Object(message.clone()).to_string().as_bytes()).await;
    }

    async fn next(&mut self) -> Value {
        loop {
            let message = self.socket.read_json().await;
            if message["t"] != "ping" {
                return message;
            }
        }
    }

    async fn expect_rejection(&mut self, message: &Map<String, Value>, case: &str) {
        self.send(message).await;
        let error = self.next().await;
        assert_eq!(error["t"], "error", "{case}: {error}");
        assert_eq!(error["p"]["code"], "INVALID_SIGNATURE", "{case}");
        assert_eq!(error["p"]["recoverable"], true, "{case}");
        assert_eq!(error["p"]["details"]["id"], message["id"], "{case}");
    }
}

/// A signed message whose `ts` is outside the ±300 s window.
fn stale(client: &mut Signing) -> Map<String, Value> {
    let mut message = client.message("chat", "stale");
    message.insert("ts".into(), "2020-01-01T00:00:00.000Z".into());
    client.sign(message, SignatureEncoding::Base64)
}

#[tokio::test]
async fn verify_mode_reports_statuses_and_signs_what_it_sends() {
    let (handler, seen) = recording_handler();
    let server = start_with(signing("verify"), |b| b.handler(handler)).await;
    let mut client = Signing::connect(&server).await;

    let base64 = client.message("chat", "base64");
    let base64 = client.sign(base64, SignatureEncoding::Base64);
    let hex = client.message("chat", "hex");
    let hex = client.sign(hex, SignatureEncoding::Hex);
    let absent = client.message("chat", "absent");
    let mut forged = client.message("chat", "forged");
    forged.insert("sig".into(), "BrS8UiKzfor6fShF1i3i6G4AtOrQCvc23pCc+4oxjIM=".into());
    let replayed = base64.clone();
    let stale = stale(&mut client);
    for message in [&base64, &hex, &absent, &forged, &replayed, &stale] {
        client.send(message).await;
        let reply = client.next().await;
        assert_eq!(reply["t"], "echo_reply");
        // The reply is signed, over its wire form (seq included).
        assert!(client.signer.verify_mac(reply.as_object().unwrap()), "{reply}");
        assert!(reply["seq"].is_u64());
    }
    use SignatureStatus::*;
    let statuses: Vec<_> = seen.lock().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [Valid, Valid, Absent, Invalid, Invalid, Invalid]);

    // Publications carry one signature, shared by every subscriber.
    let mut plain = Client::connect(&server.url()).await.unwrap();
    plain.subscribe(&["prices"]).await.unwrap();
    let mut subscribe = client.message("subscription_update", "");
    subscribe.insert("p".into(), json!({"topics": ["prices"]}));
    client.send(&subscribe).await;
    while client.next().await["t"] != "subscription_update" {}
    let report = server.engine.publish("prices", Envelope::new("price_update", json!({"price": 187.5}))).await.unwrap();
    let received = client.next().await;
    assert_eq!(received["sig"].as_str(), report.publication.sig().as_deref());
    assert!(client.signer.verify_mac(received.as_object().unwrap()));
    // An unsigned client keeps working and ignores the field.
    assert_eq!(plain.recv().await.unwrap()["sig"], received["sig"]);
    assert_eq!(plain.ping().await.unwrap()["t"], "PONG");
    server.stop().await;
}

#[tokio::test]
async fn require_mode_rejects_unsigned_forged_replayed_and_stale_messages() {
    let (handler, seen) = recording_handler();
    let server = start_with(signing("require"), |b| b.handler(handler)).await;
    let mut neighbor = Signing::connect(&server).await;
    let mut client = Signing::connect(&server).await;

    let valid = client.message("chat", "valid");
    let valid = client.sign(valid, SignatureEncoding::Base64);
    client.send(&valid).await;
    assert_eq!(client.next().await["t"], "echo_reply");

    let unsigned = client.message("chat", "unsigned");
    client.expect_rejection(&unsigned, "missing signature").await;
    let mut forged = client.message("chat", "forged");
    forged.insert("sig".into(), "0000000000000000000000000000000000000000000000000000000000000000".into());
    client.expect_rejection(&forged, "bad signature").await;
    let mut tampered = client.signed("chat", "tampered", SignatureEncoding::Hex);
    tampered["p"]["text"] = "changed".into();
    client.expect_rejection(&tampered, "tampered payload").await;
    client.expect_rejection(&valid, "replayed id").await;
    let stale = stale(&mut client);
    client.expect_rejection(&stale, "stale ts").await;
    let subscribe = client.message("subscription_update", "");
    client.expect_rejection(&subscribe, "unsigned protocol message").await;

    // The connection stays open: heartbeats need no signature, hex signatures are accepted.
    client.socket.send_frame(TEXT, br#"{"t":"ping","p":{"timestamp":3}}"#).await;
    assert_eq!(client.next().await["t"], "PONG");
    let hex = client.message("chat", "hex");
    let hex = client.sign(hex, SignatureEncoding::Hex);
    client.send(&hex).await;
    assert_eq!(client.next().await["p"]["text"], "hex");

    // Another connection is unaffected.
    let other = neighbor.signed("chat", "neighbor", SignatureEncoding::Base64);
    neighbor.send(&other).await;
    assert_eq!(neighbor.next().await["p"]["text"], "neighbor");

    let texts: Vec<_> = seen.lock().unwrap().iter().map(|(t, s)| (t.clone(), *s)).collect();
    assert_eq!(
        texts,
        [
            ("valid".to_owned(), SignatureStatus::Valid),
            ("hex".to_owned(), SignatureStatus::Valid),
            ("neighbor".to_owned(), SignatureStatus::Valid)
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn reject_invalid_drops_bad_signatures_in_verify_mode() {
    let (handler, seen) = recording_handler();
    let server = start_with(
        |c| {
            signing("verify")(c);
            c.signing_reject_invalid = true;
        },
        |b| b.handler(handler),
    )
    .await;
    let mut client = Signing::connect(&server).await;
    let mut forged = client.message("chat", "forged");
    forged.insert("sig".into(), "not a signature".into());
    client.expect_rejection(&forged, "invalid in verify mode with reject_invalid").await;
    // Unsigned is still fine in verify mode.
    let unsigned = client.message("chat", "unsigned");
    client.send(&unsigned).await;
    assert_eq!(client.next().await["t"], "echo_reply");
    assert_eq!(*seen.lock().unwrap(), [("unsigned".to_owned(), SignatureStatus::Absent)]);
    server.stop().await;
}

#[tokio::test]
async fn previous_secret_verifies_during_rotation() {
    let (handler, seen) = recording_handler();
    let server = start_with(
        |c| {
            c.signing = "require".into();
            c.signing_secret = Some("a-brand-new-secret-of-at-least-32-bytes".into());
            c.signing_previous_secret = Some(SECRET.into());
        },
        |b| b.handler(handler),
    )
    .await;
    let mut client = Signing::connect(&server).await;
    let old = client.signed("chat", "old", SignatureEncoding::Base64);
    client.send(&old).await;
    let reply = client.next().await;
    assert_eq!(reply["t"], "echo_reply");
    // Replies are signed with the current secret only.
    assert!(!client.signer.verify_mac(reply.as_object().unwrap()));
    assert!(Signer::new("a-brand-new-secret-of-at-least-32-bytes").unwrap().verify_mac(reply.as_object().unwrap()));
    assert_eq!(seen.lock().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    server.stop().await;
}

#[test]
fn short_or_missing_secrets_are_refused_at_startup() {
    let short = wsengine::Config {
        signing: "verify".into(),
        signing_secret: Some("only-31-bytes-long-secret-value".into()),
        ..test_config()
    };
    let error = Engine::builder(short).build().unwrap_err().to_string();
    assert_eq!(error, "signing_secret: must be at least 32 bytes, got 31");
    let missing = wsengine::Config { signing: "require".into(), ..test_config() };
    let error = Engine::builder(missing).build().unwrap_err().to_string();
    assert_eq!(error, "signing_secret: is required when signing is \"require\"");
}
