//! A Rust client for WSE protocol v1: connect, hello, subscribe, receive, ping.
//!
//! It decodes every frame form the engine sends (text JSON, binary JSON, `C:` zlib, `M:`
//! msgpack, and `E:` once [`Client::hello_encrypted`] has agreed a key), answers the server's
//! heartbeat `ping` by itself, and keeps messages that arrive while it waits for an answer, so
//! nothing is lost between calls. `C:` needs the `compression` cargo feature and `M:` the
//! `msgpack` one; without them such frames are [`ClientError::Undecodable`], and the client
//! tells the server it takes no compression.
//!
//! ```no_run
//! # async fn example() -> Result<(), wsengine::client::ClientError> {
//! use wsengine::client::Client;
//!
//! let mut client = Client::connect("ws://127.0.0.1:5006/wse").await?;
//! client.hello().await?;
//! client.subscribe(&["prices"]).await?;
//! let message = client.recv().await?;
//! println!("{} {}", message["t"], message["p"]);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsengine_core::Limits;
#[cfg(feature = "msgpack")]
use wsengine_core::frame::decode_msgpack;
#[cfg(feature = "compression")]
use wsengine_core::frame::inflate_capped;

/// How long the client waits for `server_ready` and for answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The WebSocket layer failed.
    WebSocket(tungstenite::Error),
    /// The server closed the connection (with its close frame, if any).
    Closed(Option<CloseFrame>),
    /// No answer in time.
    Timeout,
    /// The server sent something this client cannot decode.
    Undecodable(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::WebSocket(e) => write!(f, "websocket: {e}"),
            ClientError::Closed(Some(frame)) => {
                write!(f, "closed by server: {} {}", u16::from(frame.code), frame.reason)
            }
            ClientError::Closed(None) => f.write_str("closed by server"),
            ClientError::Timeout => f.write_str("timed out waiting for the server"),
            ClientError::Undecodable(why) => write!(f, "undecodable frame: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<tungstenite::Error> for ClientError {
    fn from(error: tungstenite::Error) -> Self {
        match error {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => ClientError::Closed(None),
            other => ClientError::WebSocket(other),
        }
    }
}

impl ClientError {
    /// The close code, when the server closed the connection with one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::Closed(Some(frame)) => Some(frame.code.into()),
            _ => None,
        }
    }
}

/// A connected WSE client.
#[derive(Debug)]
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    server_ready: Value,
    pending: VecDeque<Value>,
    /// Caps for inflating `C:` and decoding `M:` frames (unused when both features are off).
    #[cfg_attr(not(any(feature = "compression", feature = "msgpack")), allow(dead_code))]
    limits: Limits,
    seq: u64,
    /// The end-to-end session key, once `hello_encrypted` agreed one; from then on every
    /// message this client sends is encrypted.
    #[cfg(feature = "encryption")]
    key: Option<wsengine_layers::encrypt::SessionKey>,
}

impl Client {
    /// Connects to `url` and waits for `server_ready`.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Self::connect_request(url).await
    }

    /// Connects with a prepared request (extra headers such as `Authorization` or `Cookie`)
    /// and waits for `server_ready`.
    pub async fn connect_request(request: impl IntoClientRequest + Unpin) -> Result<Client, ClientError> {
        let (socket, _response) = tokio_tungstenite::connect_async(request).await?;
        let mut client = Client {
            socket,
            server_ready: Value::Null,
            pending: VecDeque::new(),
            limits: Limits::default(),
            seq: 0,
            #[cfg(feature = "encryption")]
            key: None,
        };
        let first = client.next_message().await?;
        if first["t"] != "server_ready" {
            return Err(ClientError::Undecodable(format!("expected server_ready first, got {first}")));
        }
        client.server_ready = first;
        Ok(client)
    }

    /// The `server_ready` message.
    pub fn server_ready(&self) -> &Value {
        &self.server_ready
    }

    /// This connection's id, from `server_ready`.
    pub fn connection_id(&self) -> &str {
        self.server_ready["p"]["details"]["connection_id"].as_str().unwrap_or_default()
    }

    /// Sends `client_hello` and returns the `server_hello`.
    pub async fn hello(&mut self) -> Result<Value, ClientError> {
        let features = json!({"compression": cfg!(feature = "compression"), "encryption": false, "batching": true});
        self.send(
            "client_hello",
            json!({"client_version": env!("CARGO_PKG_VERSION"), "protocol_version": 1, "features": features}),
        )
        .await?;
        self.answer(|m| m["t"] == "server_hello").await
    }

    /// Sends `client_hello` offering end-to-end encryption (PROTOCOL.md §7) and returns the
    /// `server_hello`. When the server answers with its key, every later message is encrypted
    /// both ways ([`Client::is_encrypted`]); otherwise the connection stays plaintext.
    #[cfg(feature = "encryption")]
    pub async fn hello_encrypted(&mut self) -> Result<Value, ClientError> {
        use wsengine_layers::encrypt::{EphemeralKeyPair, parse_public_key};
        let pair = EphemeralKeyPair::generate().map_err(|e| ClientError::Undecodable(e.to_string()))?;
        let features = json!({"compression": cfg!(feature = "compression"), "encryption": true, "batching": true});
        let hello = json!({
            "client_version": env!("CARGO_PKG_VERSION"),
            "protocol_version": 1,
            "features": features,
            "encryption_public_key": pair.public_key_base64(),
        });
        self.send("client_hello", hello).await?;
        let answer = self.answer(|m| m["t"] == "server_hello").await?;
        if let Some(public) = answer["p"]["encryption_public_key"].as_str() {
            let peer = parse_public_key(public).map_err(|e| ClientError::Undecodable(format!("server key: {e}")))?;
            self.key = Some(pair.agree(&peer));
        }
        Ok(answer)
    }

    /// Whether an end-to-end key is in use.
    pub fn is_encrypted(&self) -> bool {
        #[cfg(feature = "encryption")]
        return self.key.is_some();
        #[cfg(not(feature = "encryption"))]
        false
    }

    /// The end-to-end session key, once agreed.
    #[cfg(feature = "encryption")]
    pub fn session_key(&self) -> Option<&wsengine_layers::encrypt::SessionKey> {
        self.key.as_ref()
    }

    /// Subscribes and returns the `subscription_update` acknowledgement.
    pub async fn subscribe(&mut self, topics: &[&str]) -> Result<Value, ClientError> {
        self.send("subscription_update", json!({"action": "subscribe", "topics": topics})).await?;
        self.answer(|m| m["t"] == "subscription_update" && m["p"]["action"] == "subscribe").await
    }

    /// Unsubscribes and returns the acknowledgement.
    pub async fn unsubscribe(&mut self, topics: &[&str]) -> Result<Value, ClientError> {
        self.send("subscription_update", json!({"action": "unsubscribe", "topics": topics})).await?;
        self.answer(|m| m["t"] == "subscription_update" && m["p"]["action"] == "unsubscribe").await
    }

    /// Sends `ping` and returns the `PONG`.
    pub async fn ping(&mut self) -> Result<Value, ClientError> {
        self.send("ping", json!({"timestamp": wsengine_core::time::unix_millis()})).await?;
        self.answer(|m| m["t"] == "PONG").await
    }

    /// Sends a message of type `t` with payload `p`: a text frame, or an `E:` frame once a key
    /// has been agreed.
    pub async fn send(&mut self, t: &str, p: Value) -> Result<(), ClientError> {
        self.seq += 1;
        let message = json!({"t": t, "p": p, "id": uuid_v4ish(self.seq), "seq": self.seq, "v": 1});
        #[cfg(feature = "encryption")]
        if let Some(key) = &self.key {
            let frame =
                key.seal(message.to_string().as_bytes()).map_err(|e| ClientError::Undecodable(e.to_string()))?;
            return self.send_raw(Message::binary(frame)).await;
        }
        self.send_raw(Message::text(message.to_string())).await
    }

    /// Sends any WebSocket message as is.
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        self.socket.send(message).await.map_err(Into::into)
    }

    /// The next message from the server (heartbeat `ping`s are answered and skipped).
    pub async fn recv(&mut self) -> Result<Value, ClientError> {
        match self.pending.pop_front() {
            Some(message) => Ok(message),
            None => self.next_message().await,
        }
    }

    /// Like [`Client::recv`], but `Ok(None)` when nothing arrives within `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Value>, ClientError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.socket.close(None).await.map_err(Into::into)
    }

    /// Waits for the first message matching `is_answer`, keeping the others for `recv`.
    async fn answer(&mut self, is_answer: impl Fn(&Value) -> bool) -> Result<Value, ClientError> {
        if let Some(index) = self.pending.iter().position(&is_answer) {
            return Ok(self.pending.remove(index).expect("index from position"));
        }
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let message =
                tokio::time::timeout_at(deadline, self.next_message()).await.map_err(|_| ClientError::Timeout)??;
            if is_answer(&message) {
                return Ok(message);
            }
            self.pending.push_back(message);
        }
    }

    async fn next_message(&mut self) -> Result<Value, ClientError> {
        loop {
            let message = match self.socket.next().await {
                Some(message) => message?,
                None => return Err(ClientError::Closed(None)),
            };
            let value = match message {
                Message::Text(text) => parse_json(text.as_bytes())?,
                Message::Binary(bytes) => self.decode_binary(&bytes)?,
                Message::Close(frame) => return Err(ClientError::Closed(frame)),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            if value["t"] == "ping" && value["c"] == "WSE" {
                let answer = json!({"c": "WSE", "t": "PONG", "p": {"server_timestamp": value["p"]["server_time"], "client_timestamp": wsengine_core::time::unix_millis()}, "v": 1});
                self.socket.send(Message::text(answer.to_string())).await?;
                continue;
            }
            return Ok(value);
        }
    }

    fn decode_binary(&self, bytes: &[u8]) -> Result<Value, ClientError> {
        if let Some(zlib) = bytes.strip_prefix(b"C:") {
            self.decode_compressed(zlib)
        } else if let Some(msgpack) = bytes.strip_prefix(b"M:") {
            self.decode_msgpack(msgpack)
        } else if bytes.starts_with(b"E:") {
            #[cfg(feature = "encryption")]
            if let Some(key) = &self.key {
                let plaintext = key.open(bytes).map_err(|e| ClientError::Undecodable(e.to_string()))?;
                return match plaintext.strip_prefix(b"M:") {
                    Some(msgpack) => self.decode_msgpack(msgpack),
                    None => parse_json(&plaintext),
                };
            }
            Err(ClientError::Undecodable("encrypted frame, but this client has no key".into()))
        } else {
            parse_json(bytes)
        }
    }
}

impl Client {
    #[cfg(feature = "compression")]
    fn decode_compressed(&self, zlib: &[u8]) -> Result<Value, ClientError> {
        let json =
            inflate_capped(zlib, self.limits.max_inflated_size).map_err(|e| ClientError::Undecodable(e.to_string()))?;
        parse_json(&json)
    }

    #[cfg(not(feature = "compression"))]
    fn decode_compressed(&self, _zlib: &[u8]) -> Result<Value, ClientError> {
        Err(ClientError::Undecodable("C: frame, but this client is built without the `compression` feature".into()))
    }

    #[cfg(feature = "msgpack")]
    fn decode_msgpack(&self, msgpack: &[u8]) -> Result<Value, ClientError> {
        decode_msgpack(msgpack, &self.limits).map_err(|e| ClientError::Undecodable(e.to_string()))
    }

    #[cfg(not(feature = "msgpack"))]
    fn decode_msgpack(&self, _msgpack: &[u8]) -> Result<Value, ClientError> {
        Err(ClientError::Undecodable("M: frame, but this client is built without the `msgpack` feature".into()))
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Undecodable(e.to_string()))
}

/// A unique message id for this client (clients send UUIDv4; any unique string works).
fn uuid_v4ish(seq: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:016x}-{:08x}-{seq:08x}", now.as_nanos() as u64, std::process::id())
}
