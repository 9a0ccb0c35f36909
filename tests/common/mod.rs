//! Helpers shared by the integration tests: a real engine on 127.0.0.1:0, a tiny HTTP
//! client, and a raw WebSocket socket for frames no well-behaved client would send.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod memory;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsengine::{Config, Engine, EngineBuilder};

pub struct TestServer {
    pub engine: Engine,
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("ws://{}/wse", self.addr)
    }

    pub async fn stop(self) {
        self.engine.shutdown();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("server stops").unwrap().unwrap();
    }
}

pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        log: "warn".into(),
        drain_timeout: Duration::from_secs(3),
        shutdown_grace: Duration::from_millis(500),
        ..Config::default()
    }
}

pub async fn start(configure: impl FnOnce(&mut Config)) -> TestServer {
    start_with(configure, |builder| builder).await
}

pub async fn start_with(
    configure: impl FnOnce(&mut Config),
    build: impl FnOnce(EngineBuilder) -> EngineBuilder,
) -> TestServer {
    raise_fd_limit();
    let mut config = test_config();
    configure(&mut config);
    let engine = build(Engine::builder(config)).build().expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(engine.clone().serve(listener));
    TestServer { engine, addr, task }
}

/// Tests open thousands of loopback sockets; lift the soft descriptor limit to the hard one.
pub fn raise_fd_limit() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

/// One HTTP/1.1 request over a fresh connection; returns the status and the JSON body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let auth = bearer.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    (status, json)
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    http(addr, "POST", path, Some(&body.to_string()), None).await
}

/// A WebSocket client that writes frames by hand (masked, as a client must).
pub struct RawSocket {
    stream: TcpStream,
    buffer: Vec<u8>,
}

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

impl RawSocket {
    pub async fn connect(addr: SocketAddr, path: &str) -> RawSocket {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed during the handshake");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        buffer.drain(..head_end);
        RawSocket { stream, buffer }
    }

    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut frame = vec![0x80 | opcode];
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.send_bytes(&frame).await;
    }

    /// Writes bytes as they are (a frame header without its payload, say).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may close before reading everything: ignore write errors, never block long.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.stream.write_all(bytes)).await;
    }

    async fn fill(&mut self, want: usize) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        while self.buffer.len() < want {
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The next frame (opcode, payload), or None when the connection ended.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(Duration::from_secs(10), async {
            if !self.fill(2).await {
                return None;
            }
            let opcode = self.buffer[0] & 0x0f;
            let (len, header) = match self.buffer[1] & 0x7f {
                126 => {
                    if !self.fill(4).await {
                        return None;
                    }
                    (u16::from_be_bytes([self.buffer[2], self.buffer[3]]) as usize, 4)
                }
                127 => {
                    if !self.fill(10).await {
                        return None;
                    }
                    (u64::from_be_bytes(self.buffer[2..10].try_into().unwrap()) as usize, 10)
                }
                n => (n as usize, 2),
            };
            if !self.fill(header + len).await {
                return None;
            }
            let payload = self.buffer[header..header + len].to_vec();
            self.buffer.drain(..header + len);
            Some((opcode, payload))
        })
        .await
        .expect("server answered within 10 s")
    }

    /// The next data frame decoded as JSON (control frames skipped).
    pub async fn read_json(&mut self) -> Value {
        loop {
            let (opcode, payload) = self.read_frame().await.expect("a frame");
            match opcode {
                TEXT | BINARY => return serde_json::from_slice(&payload).expect("JSON"),
                CLOSE => panic!("closed: {:?}", close_code(&payload)),
                _ => continue,
            }
        }
    }

    /// Reads until a Close frame; returns its code.
    pub async fn read_close(&mut self) -> Option<u16> {
        while let Some((opcode, payload)) = self.read_frame().await {
            if opcode == CLOSE {
                return close_code(&payload);
            }
        }
        None
    }
}

pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}
