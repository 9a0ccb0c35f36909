//! End-to-end encryption over real connections (PROTOCOL.md §7): the key exchange, what is
//! encrypted and what is not, every rejection path, the required mode, and a cross-check
//! against Python's `cryptography` package.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wsengine::client::Client;
use wsengine::layers::encrypt::{EphemeralKeyPair, SessionKey, parse_public_key};
use wsengine::{AppBody, AppMessage, Envelope, Target, handler_fn};

/// A raw client that does the key exchange by hand, so tests see every frame as sent.
struct E2e {
    socket: RawSocket,
    key: Option<SessionKey>,
    connection_id: String,
}

/// One data frame: whether it was an `E:` frame, whether it was text, and its JSON.
#[derive(Debug)]
struct Received {
    encrypted: bool,
    text: bool,
    raw: Vec<u8>,
    json: Value,
}

impl E2e {
    async fn connect(server: &TestServer) -> E2e {
        let mut socket = RawSocket::connect(server.addr, "/wse").await;
        let ready = socket.read_json().await;
        assert_eq!(ready["t"], "server_ready");
        let connection_id = ready["p"]["details"]["connection_id"].as_str().unwrap().to_owned();
        E2e { socket, key: None, connection_id }
    }

    /// Connects and completes the exchange.
    async fn keyed(server: &TestServer) -> E2e {
        let mut client = E2e::connect(server).await;
        let hello = client.hello_with_new_key().await;
        assert_eq!(hello.json["p"]["features"]["encryption"], true);
        assert!(client.key.is_some());
        client
    }

    fn hello(public_key: Option<&str>) -> Value {
        let mut p = json!({"client_version": "test", "protocol_version": 1, "features": {"compression": true, "encryption": public_key.is_some()}});
        if let Some(key) = public_key {
            p["encryption_public_key"] = key.into();
        }
        json!({"c": "WSE", "t": "client_hello", "p": p, "v": 1})
    }

    /// Offers a fresh key in a plaintext client_hello; returns the server_hello frame.
    async fn hello_with_new_key(&mut self) -> Received {
        let pair = EphemeralKeyPair::generate().unwrap();
        self.send_text(&E2e::hello(Some(&pair.public_key_base64()))).await;
        let hello = self.next_of("server_hello").await;
        assert!(hello.text && !hello.encrypted, "server_hello is plaintext text");
        if let Some(public) = hello.json["p"]["encryption_public_key"].as_str() {
            assert_eq!(public.len(), 88);
            self.key = Some(pair.agree(&parse_public_key(public).unwrap()));
        }
        hello
    }

    async fn send_text(&mut self, message: &Value) {
        self.socket.send_frame(TEXT, message.to_string().as_bytes()).await;
    }

    async fn send_encrypted(&mut self, message: &Value) {
        let frame = self.key.as_ref().expect("keyed").seal(message.to_string().as_bytes()).unwrap();
        self.socket.send_frame(BINARY, &frame).await;
    }

    /// The next data frame, decrypted when it is `E:` (server heartbeats skipped).
    async fn next(&mut self) -> Received {
        loop {
            let (opcode, payload) = self.socket.read_frame().await.expect("a frame");
            let (encrypted, plaintext) = match opcode {
                BINARY if payload.starts_with(b"E:") => {
                    (true, self.key.as_ref().expect("E: frame before the key").open(&payload).unwrap())
                }
                TEXT | BINARY => (false, payload.clone()),
                CLOSE => panic!("closed: {:?}", close_code(&payload)),
                _ => continue,
            };
            let json: Value = serde_json::from_slice(&plaintext).expect("JSON inside");
            if json["t"] == "ping" {
                continue;
            }
            return Received { encrypted, text: opcode == TEXT, raw: plaintext, json };
        }
    }

    async fn next_of(&mut self, t: &str) -> Received {
        let received = self.next().await;
        assert_eq!(received.json["t"], t, "{}", received.json);
        received
    }

    /// Nothing arrives within `wait`.
    async fn assert_quiet(&mut self, wait: Duration) {
        let arrived = tokio::time::timeout(wait, self.socket.read_frame()).await;
        assert!(arrived.is_err(), "unexpected frame: {arrived:?}");
    }
}

/// What the application saw: each payload and whether it arrived encrypted.
type Seen = Arc<Mutex<Vec<(Value, bool)>>>;
/// Builds a bad `E:` frame from the connection's own key.
type BadFrame<'a> = Box<dyn Fn(&SessionKey) -> Vec<u8> + 'a>;

/// A handler that records what the application saw and echoes it back.
fn recording_handler() -> (impl wsengine::Handler, Seen) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |message: AppMessage| {
        let sink = Arc::clone(&sink);
        async move {
            let AppBody::Message(m) = message.body else { return Ok(vec![]) };
            let p = m.p().cloned().unwrap_or_default();
            sink.lock().unwrap().push((p.clone(), message.encrypted));
            Ok(vec![Envelope::new("echo_reply", p)])
        }
    });
    (handler, seen)
}

/// A plaintext subscriber that must keep being served whatever the other connection does.
async fn assert_neighbor_served(neighbor: &mut Client, server: &TestServer, n: u64) {
    let report = server.engine.publish("news", Envelope::new("headline", json!({"n": n}))).await.unwrap();
    assert!(report.delivered >= 1);
    assert_eq!(neighbor.recv().await.unwrap()["p"]["n"], n);
    assert_eq!(neighbor.ping().await.unwrap()["t"], "PONG");
}

async fn neighbor(server: &TestServer) -> Client {
    let mut client = Client::connect(&server.url()).await.unwrap();
    client.subscribe(&["news"]).await.unwrap();
    client
}

#[tokio::test]
async fn publications_direct_sends_and_replies_arrive_encrypted_protocol_frames_do_not() {
    let (handler, seen) = recording_handler();
    let server = start_with(|_| {}, |b| b.handler(handler)).await;
    let mut client = E2e::keyed(&server).await;

    client
        .send_encrypted(&json!({"t": "subscription_update", "p": {"action": "subscribe", "topics": ["prices"]}}))
        .await;
    let ack = client.next_of("subscription_update").await;
    assert!(ack.text && !ack.encrypted, "acks stay plaintext text");

    let report = server
        .engine
        .publish("prices", Envelope::new("price_update", json!({"symbol": "AAPL", "price": 187.5})))
        .await
        .unwrap();
    let publication = client.next_of("price_update").await;
    assert!(publication.encrypted);
    assert_eq!(publication.raw, report.publication.json().as_bytes(), "the plaintext is the shared JSON");
    assert_eq!(publication.json["p"], json!({"symbol": "AAPL", "price": 187.5}));

    // Larger than the compression threshold: still JSON inside, never C: (§3.2).
    let big = "x".repeat(4096);
    server.engine.publish("prices", Envelope::new("price_update", json!({"big": big}))).await.unwrap();
    let large = client.next_of("price_update").await;
    assert!(large.encrypted && large.raw.starts_with(b"{"));

    let id = wsengine::services::connection::ConnectionId::parse(&client.connection_id).unwrap();
    assert_eq!(server.engine.send(&Target::Connection(id), Envelope::new("notice", json!({"to": "you"}))).unwrap(), 1);
    let direct = client.next_of("notice").await;
    assert!(direct.encrypted);
    assert_eq!(direct.json["p"]["to"], "you");

    server.engine.broadcast(Envelope::new("announcement", json!({"all": true}))).unwrap();
    assert!(client.next_of("announcement").await.encrypted);

    // An encrypted ping gets a plaintext text PONG (§6.1.3, D5).
    client.send_encrypted(&json!({"c": "WSE", "t": "ping", "p": {"timestamp": 5}, "v": 1})).await;
    let pong = client.next_of("PONG").await;
    assert!(pong.text && !pong.encrypted);
    assert!(pong.raw.starts_with(br#"{"c":"WSE","t":"PONG""#));
    assert_eq!(pong.json["p"]["client_timestamp"], 5);

    // Encrypted application messages reach the handler marked encrypted; replies are E:.
    client.send_encrypted(&json!({"t": "chat", "p": {"text": "hi"}})).await;
    let reply = client.next_of("echo_reply").await;
    assert!(reply.encrypted);
    assert_eq!(*seen.lock().unwrap(), [(json!({"text": "hi"}), true)]);
    server.stop().await;
}

#[tokio::test]
async fn server_hello_precedes_every_encrypted_frame() {
    let server = start(|_| {}).await;
    let mut client = E2e::connect(&server).await;
    client.send_text(&json!({"t": "subscription_update", "p": {"topics": ["ticks"]}})).await;
    assert_eq!(client.next().await.json["t"], "subscription_update");
    // A publisher floods the topic while the client keys its connection.
    let engine = server.engine.clone();
    let publisher = tokio::spawn(async move {
        for n in 0..3000u32 {
            engine.publish("ticks", Envelope::new("tick", json!({"n": n}))).await.unwrap();
            if n % 20 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // A full delivery channel may drop ticks; the end marker goes out once it has drained.
        tokio::time::sleep(Duration::from_millis(300)).await;
        engine.publish("ticks", Envelope::new("done", json!({}))).await.unwrap();
    });
    let pair = EphemeralKeyPair::generate().unwrap();
    client.send_text(&E2e::hello(Some(&pair.public_key_base64()))).await;
    let mut plaintext_ticks = 0;
    let mut encrypted_ticks = 0;
    let mut pair = Some(pair);
    let mut last = None;
    loop {
        let (opcode, payload) = client.socket.read_frame().await.expect("a frame");
        if payload.starts_with(b"E:") {
            let key = client.key.as_ref().expect("an E: frame arrived before server_hello");
            let json: Value = serde_json::from_slice(&key.open(&payload).unwrap()).unwrap();
            if json["t"] == "done" {
                break;
            }
            encrypted_ticks += 1;
            last = json["p"]["n"].as_u64().or(last);
            continue;
        }
        let json: Value = serde_json::from_slice(&payload).unwrap();
        match json["t"].as_str() {
            Some("server_hello") => {
                assert_eq!(opcode, TEXT);
                let public = json["p"]["encryption_public_key"].as_str().unwrap();
                client.key = Some(pair.take().unwrap().agree(&parse_public_key(public).unwrap()));
            }
            Some("tick" | "done") if client.key.is_some() => {
                panic!("plaintext {} after the key was agreed", json["t"])
            }
            Some("tick") => plaintext_ticks += 1,
            _ => {}
        }
    }
    publisher.await.unwrap();
    assert!(encrypted_ticks > 0, "the exchange finished before the flood ended ({plaintext_ticks} plaintext)");
    assert!(last.is_some());
    server.stop().await;
}

#[tokio::test]
async fn bad_encrypted_frames_get_an_error_and_never_reach_the_handler() {
    let (handler, seen) = recording_handler();
    let server = start_with(|_| {}, |b| b.handler(handler)).await;
    let mut other = neighbor(&server).await;
    let victim_key = E2e::keyed(&server).await.key.unwrap();

    let message = json!({"t": "chat", "p": {"text": "should never arrive"}});
    let mut cases: Vec<(&str, BadFrame)> = vec![
        (
            "tampered ciphertext",
            Box::new(|key: &SessionKey| {
                let mut frame = key.seal(message.to_string().as_bytes()).unwrap();
                frame[20] ^= 0x01;
                frame
            }),
        ),
        (
            "truncated frame",
            Box::new(|key: &SessionKey| {
                let frame = key.seal(message.to_string().as_bytes()).unwrap();
                frame[..frame.len() - 1].to_vec()
            }),
        ),
        ("frame under 30 bytes", Box::new(|_: &SessionKey| b"E:0123456789abcdef".to_vec())),
        // Another connection's key.
        ("wrong key", Box::new(|_: &SessionKey| victim_key.seal(message.to_string().as_bytes()).unwrap())),
    ];
    for (n, (case, make)) in cases.drain(..).enumerate() {
        let mut client = E2e::keyed(&server).await;
        let frame = make(client.key.as_ref().unwrap());
        client.socket.send_frame(BINARY, &frame).await;
        let error = client.next_of("error").await;
        assert!(error.text && !error.encrypted, "{case}");
        assert_eq!(error.json["p"]["code"], "INVALID_REQUEST", "{case}");
        assert_eq!(error.json["p"]["recoverable"], true, "{case}");
        // A second bad frame within a second is dropped silently (rate-limited error).
        client.socket.send_frame(BINARY, &frame).await;
        client.assert_quiet(Duration::from_millis(200)).await;
        // The connection stays open and encrypted traffic still works.
        client.send_encrypted(&json!({"t": "ping", "p": {"timestamp": 1}})).await;
        assert_eq!(client.next().await.json["t"], "PONG", "{case}");
        assert_neighbor_served(&mut other, &server, n as u64).await;
    }

    // E: before any key exists.
    let mut plain = E2e::connect(&server).await;
    plain.socket.send_frame(BINARY, &SessionKey::from_bytes(&[9; 32]).seal(b"{\"t\":\"chat\"}").unwrap()).await;
    let error = plain.next_of("error").await;
    assert_eq!(error.json["p"]["code"], "INVALID_REQUEST");
    assert!(error.json["p"]["message"].as_str().unwrap().contains("no key"));
    assert_neighbor_served(&mut other, &server, 100).await;

    assert!(seen.lock().unwrap().is_empty(), "nothing reached the application: {:?}", seen.lock().unwrap());
    server.stop().await;
}

#[tokio::test]
async fn unusable_public_keys_fail_the_exchange_and_the_connection_stays_plaintext() {
    let server = start(|_| {}).await;
    let mut other = neighbor(&server).await;
    let mut off_curve = vec![4u8];
    off_curve.extend([1u8; 64]);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad_keys = [b64.encode(&off_curve), b64.encode([0u8]), "not base64 at all!".to_owned(), b64.encode([4u8; 65])];
    for (n, bad) in bad_keys.iter().enumerate() {
        let mut client = E2e::connect(&server).await;
        client.send_text(&E2e::hello(Some(bad))).await;
        let error = client.next_of("error").await;
        assert_eq!(error.json["p"]["code"], "KEY_EXCHANGE_FAILED", "{bad}");
        assert_eq!(error.json["p"]["recoverable"], true);
        let hello = client.next_of("server_hello").await;
        assert_eq!(hello.json["p"]["features"]["encryption"], false);
        assert!(hello.json["p"].get("encryption_public_key").is_none());
        // Plaintext service continues.
        client.send_text(&json!({"t": "subscription_update", "p": {"topics": ["news"]}})).await;
        client.next_of("subscription_update").await;
        server.engine.publish("news", Envelope::new("headline", json!({"n": n}))).await.unwrap();
        let headline = client.next_of("headline").await;
        assert!(!headline.encrypted);
        other.recv().await.unwrap();
    }
    assert_neighbor_served(&mut other, &server, 99).await;

    // A key without features.encryption:true is ignored (§7.2 step 1).
    let mut client = E2e::connect(&server).await;
    let mut hello = E2e::hello(Some(&EphemeralKeyPair::generate().unwrap().public_key_base64()));
    hello["p"]["features"]["encryption"] = false.into();
    client.send_text(&hello).await;
    let answer = client.next_of("server_hello").await;
    assert_eq!(answer.json["p"]["features"]["encryption"], false);
    server.stop().await;
}

#[tokio::test]
async fn a_repeated_client_hello_never_rekeys() {
    let server = start(|_| {}).await;
    let mut client = E2e::keyed(&server).await;
    let first_key = client.key.clone().unwrap();
    // Plaintext and encrypted repeats alike.
    let second = EphemeralKeyPair::generate().unwrap();
    client.send_text(&E2e::hello(Some(&second.public_key_base64()))).await;
    let again = client.next_of("server_hello").await;
    assert_eq!(again.json["p"]["features"]["encryption"], true, "reports the current state (D15)");
    assert!(again.json["p"].get("encryption_public_key").is_none());
    client.send_encrypted(&E2e::hello(Some(&second.public_key_base64()))).await;
    assert!(client.next_of("server_hello").await.json["p"].get("encryption_public_key").is_none());

    let id = wsengine::services::connection::ConnectionId::parse(&client.connection_id).unwrap();
    server.engine.send(&Target::Connection(id), Envelope::new("notice", json!({}))).unwrap();
    let (_, frame) = client.socket.read_frame().await.unwrap();
    assert!(first_key.open(&frame).is_ok(), "still the first key");
    server.stop().await;
}

#[tokio::test]
async fn encryption_off_ignores_offered_keys() {
    let server = start(|c| c.encryption = "off".into()).await;
    let mut client = E2e::connect(&server).await;
    let hello = client.hello_with_new_key().await;
    assert_eq!(hello.json["p"]["features"]["encryption"], false);
    assert!(client.key.is_none());
    server.stop().await;
}

#[tokio::test]
async fn required_mode_closes_1008_on_violations() {
    let (handler, seen) = recording_handler();
    let server = start_with(|c| c.encryption = "required".into(), |b| b.handler(handler)).await;
    let mut other = E2e::keyed(&server).await;

    // A client_hello without a key.
    let mut client = E2e::connect(&server).await;
    client.send_text(&E2e::hello(None)).await;
    let error = client.next_of("error").await;
    assert_eq!(error.json["p"]["code"], "INVALID_REQUEST");
    assert_eq!(client.socket.read_close().await, Some(1008));

    // A bad key in required mode: KEY_EXCHANGE_FAILED, then 1008.
    let mut client = E2e::connect(&server).await;
    client.send_text(&E2e::hello(Some("AAAA"))).await;
    assert_eq!(client.next_of("error").await.json["p"]["code"], "KEY_EXCHANGE_FAILED");
    assert_eq!(client.socket.read_close().await, Some(1008));

    // A plaintext application message after the exchange; plaintext heartbeats are fine.
    let mut client = E2e::keyed(&server).await;
    client.send_text(&json!({"t": "ping", "p": {"timestamp": 1}})).await;
    assert_eq!(client.next().await.json["t"], "PONG");
    client.send_text(&json!({"t": "chat", "p": {"text": "in the clear"}})).await;
    assert_eq!(client.next_of("error").await.json["p"]["code"], "INVALID_REQUEST");
    assert_eq!(client.socket.read_close().await, Some(1008));

    // A plaintext application message before any exchange.
    let mut client = E2e::connect(&server).await;
    client.send_text(&json!({"t": "chat", "p": {"text": "in the clear"}})).await;
    assert_eq!(client.next_of("error").await.json["p"]["code"], "INVALID_REQUEST");
    assert_eq!(client.socket.read_close().await, Some(1008));

    assert!(seen.lock().unwrap().is_empty(), "no plaintext reached the application");
    // The keyed neighbor is unaffected.
    other.send_encrypted(&json!({"t": "chat", "p": {"text": "secret"}})).await;
    let reply = other.next_of("echo_reply").await;
    assert!(reply.encrypted);
    assert_eq!(*seen.lock().unwrap(), [(json!({"text": "secret"}), true)]);
    server.stop().await;
}

#[cfg(feature = "msgpack")]
#[tokio::test]
async fn msgpack_connections_encrypt_msgpack_frames() {
    let server = start(|_| {}).await;
    let mut socket = RawSocket::connect(server.addr, "/wse?format=msgpack").await;
    assert_eq!(socket.read_json().await["t"], "server_ready");
    let pair = EphemeralKeyPair::generate().unwrap();
    let hello = E2e::hello(Some(&pair.public_key_base64()));
    socket.send_frame(TEXT, hello.to_string().as_bytes()).await;
    let answer = socket.read_json().await;
    let key = pair.agree(&parse_public_key(answer["p"]["encryption_public_key"].as_str().unwrap()).unwrap());
    let subscribe = key.seal(br#"{"t":"subscription_update","p":{"topics":["prices"]}}"#).unwrap();
    socket.send_frame(BINARY, &subscribe).await;
    assert_eq!(socket.read_json().await["t"], "subscription_update");
    server.engine.publish("prices", Envelope::new("price_update", json!({"price": 2}))).await.unwrap();
    let (opcode, frame) = socket.read_frame().await.unwrap();
    assert_eq!(opcode, BINARY);
    let plaintext = key.open(&frame).unwrap();
    let message =
        wsengine::core::decode_msgpack(plaintext.strip_prefix(b"M:").expect("M: inside E:"), &Default::default())
            .unwrap();
    assert_eq!(message["p"]["price"], 2);
    server.stop().await;
}

#[tokio::test]
async fn the_rust_client_speaks_e2e() {
    let server = start(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let hello = client.hello_encrypted().await.unwrap();
    assert_eq!(hello["p"]["features"]["encryption"], true);
    assert!(client.is_encrypted());
    client.subscribe(&["prices"]).await.unwrap();
    server.engine.publish("prices", Envelope::new("price_update", json!({"price": 1}))).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["p"]["price"], 1);
    assert_eq!(client.ping().await.unwrap()["t"], "PONG", "an encrypted ping gets a PONG");
    server.stop().await;
}

/// Python's `cryptography` does the client side of a real exchange: it decrypts a frame the
/// engine produced, and produces a frame the engine decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_check_with_python_cryptography() {
    let (handler, seen) = recording_handler();
    let server = start_with(|_| {}, |b| b.handler(handler)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/e2e_crosscheck.py");
    let mut python = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed for this test (.ci/run installs it): {e}"));
    let mut stdout = BufReader::new(python.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    if line.is_empty() {
        let output = python.wait_with_output().unwrap();
        panic!(
            "the Python cross-check failed to start (needs `python3 -m pip install cryptography==48.0.0`): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let python_public: Value = serde_json::from_str(&line).unwrap();

    // The exchange over a real connection, with Python's public key.
    let mut client = E2e::connect(&server).await;
    client.send_text(&E2e::hello(python_public["public_key"].as_str())).await;
    let hello = client.next_of("server_hello").await;
    let engine_public = hello.json["p"]["encryption_public_key"].as_str().expect("the engine keyed").to_owned();
    client.send_text(&json!({"t": "subscription_update", "p": {"topics": ["prices"]}})).await;
    client.next_of("subscription_update").await;
    let report = server
        .engine
        .publish("prices", Envelope::new("price_update", json!({"symbol": "AAPL", "price": 187.5})))
        .await
        .unwrap();
    let (opcode, engine_frame) = client.socket.read_frame().await.unwrap();
    assert_eq!(opcode, BINARY);
    assert!(engine_frame.starts_with(b"E:"));

    let request = json!({
        "engine_public_key": engine_public,
        "frame": engine_frame.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "reply": {"t": "chat", "p": {"from": "python"}},
    });
    let mut stdin = python.stdin.take().unwrap();
    writeln!(stdin, "{request}").unwrap();
    drop(stdin);
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(output.status.success(), "python: {}", String::from_utf8_lossy(&output.stderr));
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["plaintext"].as_str().unwrap().as_bytes(), report.publication.json().as_bytes());

    let python_frame: Vec<u8> = {
        let hex = answer["frame"].as_str().unwrap();
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    };
    client.socket.send_frame(BINARY, &python_frame).await;
    // The engine decrypted it: the handler saw it (encrypted) and answered with an E: frame.
    let (opcode, reply) = client.socket.read_frame().await.unwrap();
    assert_eq!(opcode, BINARY);
    assert!(reply.starts_with(b"E:"));
    assert_eq!(*seen.lock().unwrap(), [(json!({"from": "python"}), true)]);
    server.stop().await;
}

/// The issue's end-to-end case: a client authenticated by an HS256, RS256 or ES256 token
/// offers a key, subscribes, and receives a publication as an `E:` frame that decrypts to
/// the publication's JSON.
#[cfg(feature = "auth")]
#[tokio::test]
async fn authenticated_clients_receive_encrypted_publications_with_every_jwt_algorithm() {
    use futures_util::{SinkExt, StreamExt};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use tokio_tungstenite::tungstenite::Message;

    let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| std::fs::read(fixture(name)).unwrap();
    let secret = "test-only-secret-0123456789abcdef";
    let cases = [
        ("HS256", None, Algorithm::HS256, EncodingKey::from_secret(secret.as_bytes()).unwrap()),
        (
            "RS256",
            Some(fixture("rsa_public.pem")),
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
        ),
        (
            "ES256",
            Some(fixture("ec_public.pem")),
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
        ),
    ];
    for (name, public_key, algorithm, signing_key) in cases {
        let server = start(|c| {
            c.jwt_algorithm = name.into();
            match public_key {
                Some(path) => c.jwt_public_key = Some(path),
                None => c.jwt_secret = Some(secret.into()),
            }
        })
        .await;
        let claims = json!({"sub": format!("user-{name}"), "exp": jsonwebtoken::get_current_timestamp() + 600});
        let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, &signing_key).unwrap();
        let request = http::Request::builder()
            .uri(format!("ws://{}/wse", server.addr))
            .header("host", server.addr.to_string())
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let Message::Text(ready) = socket.next().await.unwrap().unwrap() else { panic!("{name}: server_ready") };
        let ready: Value = serde_json::from_str(&ready).unwrap();
        assert_eq!(ready["p"]["details"]["user_id"], format!("user-{name}"), "{name}");
        assert_eq!(ready["p"]["details"]["features"]["rust_jwt"], true);
        let pair = EphemeralKeyPair::generate().unwrap();
        socket.send(Message::text(E2e::hello(Some(&pair.public_key_base64())).to_string())).await.unwrap();
        let Message::Text(hello) = socket.next().await.unwrap().unwrap() else { panic!("{name}: server_hello") };
        let hello: Value = serde_json::from_str(&hello).unwrap();
        let key = pair.agree(&parse_public_key(hello["p"]["encryption_public_key"].as_str().unwrap()).unwrap());
        let subscribe = json!({"t": "subscription_update", "p": {"action": "subscribe", "topics": ["prices"]}});
        socket.send(Message::binary(key.seal(subscribe.to_string().as_bytes()).unwrap())).await.unwrap();
        let Message::Text(ack) = socket.next().await.unwrap().unwrap() else { panic!("{name}: ack") };
        assert!(ack.contains("\"success\":true"), "{name}: {ack}");
        let report = server
            .engine
            .publish("prices", Envelope::new("price_update", json!({"symbol": "AAPL", "price": 187.5})))
            .await
            .unwrap();
        let Message::Binary(frame) = socket.next().await.unwrap().unwrap() else { panic!("{name}: E: frame") };
        assert!(frame.starts_with(b"E:"), "{name}");
        let plaintext = key.open(&frame).unwrap();
        assert_eq!(plaintext, report.publication.json().as_bytes(), "{name}");
        let json: Value = serde_json::from_slice(&plaintext).unwrap();
        assert_eq!(json["t"], "price_update");
        assert_eq!(json["p"], json!({"symbol": "AAPL", "price": 187.5}));
        server.stop().await;
    }
}
