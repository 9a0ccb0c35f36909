//! `wsengine-loadgen`: the load generator of the wsengine benchmarks.
//!
//! It speaks just enough WebSocket over raw TCP (the HTTP/1.1 upgrade, masked client text
//! frames, and a frame scanner that reads only the first bytes of each server frame) to keep
//! up with one server core from one client core. Only loopback targets are accepted.
//!
//! ```text
//! wsengine-loadgen MODE --url ws://127.0.0.1:PORT/wse [OPTIONS]
//! ```
//!
//! Modes:
//!
//! - `idle-connect`: opens `--connections` connections (optionally waiting for `server_ready`
//!   on each, `--expect-ready`), prints a `ready` line and holds them open.
//! - `subscribe-count`: every connection waits for `server_ready`, subscribes to `--topic`,
//!   and counts publications of type `--message-type` (and every binary `C:` frame) until it
//!   has `--messages` of them. Prints `ready` once all are subscribed, `progress` lines
//!   (`--progress-every`) with the count every connection has reached, and a `result` line.
//! - `subscribe-stall`: like `subscribe-count`, but never reads after the subscription
//!   acknowledgement (small receive buffer), so the server has to queue or drop.
//! - `echo-load`: every connection sends `{"t":"echo","p":{"data":…},"id":…}` text frames
//!   with `--window` requests outstanding and counts replies of type `--reply-type` (and
//!   binary `C:` frames: the engine compresses large replies); after `--warmup` it measures
//!   for `--duration` and prints the reply rate.
//!
//! Every line on stdout is one JSON object with an `event` field (`ready`, `progress`,
//! `result`, `error`). Holding modes (`idle-connect`, `subscribe-stall`) hold for `--hold`
//! seconds, or until stdin closes with `--until-stdin-closes`.
//!
//! The process needs one file descriptor per connection: raise `ulimit -n` for large counts
//! (the benchmarks do it for their children).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

const USAGE: &str = "\
wsengine-loadgen - load generator for the wsengine benchmarks (loopback only)

USAGE:
    wsengine-loadgen MODE --url ws://127.0.0.1:PORT/PATH [OPTIONS]

MODES:
    idle-connect       open connections and hold them
    subscribe-count    subscribe and count publications until --messages each
    subscribe-stall    subscribe and never read again
    echo-load          windowed echo requests; reports replies per second

OPTIONS:
    --url URL              target, ws://HOST:PORT/PATH with a loopback HOST (required)
    --connections N        connections (default 1)
    --concurrency N        handshakes in flight at once (default 256)
    --expect-ready         wait for server_ready on each connection (idle-connect, echo-load)
    --topic T              topic to subscribe to (default bench)
    --message-type T       publication type to count (default bench)
    --messages N           publications each connection must receive (default 1)
    --progress-every N     print progress each time every connection has N more (0 = never)
    --reply-type T         echo reply type to count (default echo_reply)
    --window N             outstanding echo requests per connection (default 8)
    --payload N            bytes of echo payload data (default 64)
    --warmup SECS          echo warm-up before measuring (default 1)
    --duration SECS        echo measurement time (default 5)
    --timeout SECS         bound for connecting and for subscribe-count (default 60)
    --hold SECS            how long holding modes hold (default 30)
    --until-stdin-closes   holding modes stop early when stdin reaches EOF
    --recv-buffer BYTES    SO_RCVBUF for every connection (subscribe-stall default 4096)
";

/// The `Sec-WebSocket-Key` of every handshake (a load generator needs no fresh nonce).
const KEY: &str = "d3NlbmdpbmUtbG9hZGdlbg==";
/// Mask key of every client frame.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Bytes of a frame's payload the scanner looks at (enough to find `"t":"…"`).
const PREFIX: usize = 96;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    IdleConnect,
    SubscribeCount,
    SubscribeStall,
    EchoLoad,
}

#[derive(Debug, Clone)]
struct Options {
    mode: Mode,
    addr: SocketAddr,
    host: String,
    path: String,
    connections: usize,
    concurrency: usize,
    expect_ready: bool,
    topic: String,
    message_type: String,
    messages: u64,
    progress_every: u64,
    reply_type: String,
    window: usize,
    payload: usize,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
    hold: Duration,
    until_stdin_closes: bool,
    recv_buffer: Option<u32>,
}

fn seconds(value: &str, name: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{name} needs a number of seconds, got {value:?}"))
}

fn number<T: std::str::FromStr>(value: &str, name: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("{name} needs a number, got {value:?}"))
}

/// Splits `ws://host:port/path` and refuses anything but loopback addresses.
fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| format!("only ws:// URLs are supported, got {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let authority = authority.replace("localhost", "127.0.0.1");
    let addr: SocketAddr =
        authority.parse().map_err(|_| format!("{authority:?} is not an IP:PORT address (use 127.0.0.1:PORT)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address; the load generator only targets this machine"));
    }
    Ok((addr, authority, path))
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mode = match args.next().as_deref() {
        Some("idle-connect") => Mode::IdleConnect,
        Some("subscribe-count") => Mode::SubscribeCount,
        Some("subscribe-stall") => Mode::SubscribeStall,
        Some("echo-load") => Mode::EchoLoad,
        Some(other) => return Err(format!("unknown mode {other:?}")),
        None => return Err("a mode is required".into()),
    };
    let mut url = None;
    let mut options = Options {
        mode,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        host: String::new(),
        path: String::new(),
        connections: 1,
        concurrency: 256,
        expect_ready: false,
        topic: "bench".into(),
        message_type: "bench".into(),
        messages: 1,
        progress_every: 0,
        reply_type: "echo_reply".into(),
        window: 8,
        payload: 64,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
        hold: Duration::from_secs(30),
        until_stdin_closes: false,
        recv_buffer: (mode == Mode::SubscribeStall).then_some(4096),
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--connections" => options.connections = number(&value()?, &flag)?,
            "--concurrency" => options.concurrency = number::<usize>(&value()?, &flag)?.max(1),
            "--expect-ready" => options.expect_ready = true,
            "--topic" => options.topic = value()?,
            "--message-type" => options.message_type = value()?,
            "--messages" => options.messages = number(&value()?, &flag)?,
            "--progress-every" => options.progress_every = number(&value()?, &flag)?,
            "--reply-type" => options.reply_type = value()?,
            "--window" => options.window = number::<usize>(&value()?, &flag)?.max(1),
            "--payload" => options.payload = number(&value()?, &flag)?,
            "--warmup" => options.warmup = seconds(&value()?, &flag)?,
            "--duration" => options.duration = seconds(&value()?, &flag)?,
            "--timeout" => options.timeout = seconds(&value()?, &flag)?,
            "--hold" => options.hold = seconds(&value()?, &flag)?,
            "--until-stdin-closes" => options.until_stdin_closes = true,
            "--recv-buffer" => options.recv_buffer = Some(number(&value()?, &flag)?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    (options.addr, options.host, options.path) = parse_url(&url)?;
    if options.topic.contains('"') || options.topic.contains('\\') {
        return Err("--topic must not contain quotes or backslashes".into());
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("wsengine-loadgen: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wsengine-loadgen: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async move {
        match options.mode {
            Mode::IdleConnect => idle_connect(options).await,
            Mode::SubscribeCount | Mode::SubscribeStall => subscribe(options).await,
            Mode::EchoLoad => echo_load(options).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            emit(json!({"event": "error", "message": message}));
            ExitCode::FAILURE
        }
    }
}

/// Prints one JSON line (stdout is line-buffered, so each line goes out at once).
fn emit(value: Value) {
    println!("{value}");
}

fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `t` of a JSON envelope, from the first bytes of its text.
fn message_type(prefix: &[u8]) -> Option<&[u8]> {
    let start = find(prefix, b"\"t\":\"")? + 5;
    let rest = &prefix[start..];
    let end = rest.iter().position(|&b| b == b'"')?;
    Some(&rest[..end])
}

/// Appends a masked text frame carrying `payload`.
fn encode_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, byte) in out[start..].iter_mut().enumerate() {
        *byte ^= MASK[i & 3];
    }
}

/// A client connection with a frame scanner over its receive buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload bytes of the current frame still to be skipped.
    skip: usize,
    /// Set once a Close frame arrived.
    closed: bool,
}

/// What the scanner saw of one frame: its opcode and the first bytes of its payload.
struct Seen<'a> {
    opcode: u8,
    prefix: &'a [u8],
}

impl Conn {
    /// TCP connect and WebSocket upgrade.
    async fn open(options: &Options, buffer: usize) -> Result<Conn, String> {
        let socket = if options.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
            .map_err(|e| format!("socket: {e}"))?;
        if let Some(size) = options.recv_buffer {
            socket.set_recv_buffer_size(size).map_err(|e| format!("SO_RCVBUF: {e}"))?;
        }
        let stream = socket.connect(options.addr).await.map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let mut conn = Conn { stream, buf: vec![0; buffer.max(1024)], start: 0, end: 0, skip: 0, closed: false };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            options.path, options.host
        );
        conn.stream.write_all(request.as_bytes()).await.map_err(|e| format!("handshake write: {e}"))?;
        loop {
            if conn.fill().await.map_err(|e| format!("handshake read: {e}"))? == 0 {
                return Err("connection closed during the handshake".into());
            }
            if let Some(pos) = find(&conn.buf[..conn.end], b"\r\n\r\n") {
                if !conn.buf.starts_with(b"HTTP/1.1 101") {
                    let line = conn.buf[..pos].split(|&b| b == b'\r').next().unwrap_or_default();
                    return Err(format!("upgrade refused: {}", String::from_utf8_lossy(line)));
                }
                conn.start = pos + 4;
                conn.compact();
                return Ok(conn);
            }
            if conn.end == conn.buf.len() {
                return Err("handshake response too large".into());
            }
        }
    }

    /// Reads once into the free part of the buffer; 0 means the peer closed.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.end == self.buf.len() {
            self.compact();
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Calls `on_frame` for every frame whose header and first bytes are buffered, until it
    /// returns `false`.
    fn scan(&mut self, mut on_frame: impl FnMut(Seen<'_>) -> bool) {
        loop {
            if self.skip > 0 {
                let take = self.skip.min(self.end - self.start);
                self.start += take;
                self.skip -= take;
                if self.skip > 0 {
                    break;
                }
            }
            let avail = &self.buf[self.start..self.end];
            if avail.len() < 2 {
                break;
            }
            let (len, mut header) = match avail[1] & 0x7f {
                126 if avail.len() >= 4 => (usize::from(u16::from_be_bytes([avail[2], avail[3]])), 4),
                127 if avail.len() >= 10 => {
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(&avail[2..10]);
                    (u64::from_be_bytes(bytes) as usize, 10)
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if avail[1] & 0x80 != 0 {
                header += 4;
            }
            if avail.len() < header + len.min(PREFIX) {
                break;
            }
            let have = (avail.len() - header).min(len);
            let opcode = avail[0] & 0x0f;
            if opcode == 0x8 {
                self.closed = true;
            }
            let more = on_frame(Seen { opcode, prefix: &avail[header..header + have] });
            self.start += header + have;
            self.skip = len - have;
            if !more {
                break;
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < PREFIX + 16 {
            self.compact();
        }
    }

    /// Reads until a text frame of type `wanted` arrives.
    async fn wait_for(&mut self, wanted: &[u8]) -> Result<(), String> {
        loop {
            let mut found = false;
            self.scan(|seen| {
                found = seen.opcode == 0x1 && message_type(seen.prefix) == Some(wanted);
                !found
            });
            if found {
                return Ok(());
            }
            if self.closed {
                return Err(format!("closed by the server while waiting for {}", String::from_utf8_lossy(wanted)));
            }
            match self.fill().await {
                Ok(0) => {
                    return Err(format!("EOF while waiting for {}", String::from_utf8_lossy(wanted)));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        let mut frame = Vec::with_capacity(text.len() + 14);
        encode_text_frame(&mut frame, text.as_bytes());
        self.stream.write_all(&frame).await.map_err(|e| format!("write: {e}"))
    }
}

/// Runs `count` connection set-ups, at most `concurrency` at a time, within `timeout`.
/// Returns the successful results and the number (and first message) of failures.
async fn open_all<T: 'static>(
    options: &Options,
    setup: impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>>>>,
) -> (Vec<T>, usize, Option<String>) {
    let semaphore = Rc::new(Semaphore::new(options.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..options.connections {
        let semaphore = Rc::clone(&semaphore);
        let future = setup(index);
        tasks.spawn_local(async move {
            let _permit = semaphore.acquire().await.map_err(|e| e.to_string())?;
            future.await
        });
    }
    let mut done = Vec::with_capacity(options.connections);
    let (mut failed, mut first_error) = (0, None);
    let deadline = tokio::time::Instant::now() + options.timeout;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(value)))) => done.push(value),
            Ok(Some(Ok(Err(error)))) => {
                failed += 1;
                first_error.get_or_insert(error);
            }
            Ok(Some(Err(join))) => {
                failed += 1;
                first_error.get_or_insert(join.to_string());
            }
            Ok(None) => break,
            Err(_) => {
                failed += tasks.len();
                first_error.get_or_insert(format!("timed out after {:?} while connecting", options.timeout));
                tasks.abort_all();
                break;
            }
        }
    }
    (done, failed, first_error)
}

/// Waits for the end of a holding mode: `--hold`, or stdin EOF with `--until-stdin-closes`.
async fn hold(options: &Options) {
    let stdin_closed = async {
        if !options.until_stdin_closes {
            return std::future::pending().await;
        }
        // A plain thread watches stdin (tokio's stdin needs a feature the package does not enable).
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut sink = [0u8; 64];
            while let Ok(n) = std::io::stdin().read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
            closed_tx.send(()).ok();
        });
        closed_rx.await.ok();
    };
    tokio::select! {
        () = stdin_closed => {}
        () = tokio::time::sleep(options.hold) => {}
    }
}

async fn idle_connect(options: Options) -> Result<(), String> {
    let started = Instant::now();
    let shared = Rc::new(options.clone());
    let (held, failed, first_error) = open_all(&options, |_| {
        let options = Rc::clone(&shared);
        Box::pin(async move {
            let mut conn = Conn::open(&options, 2048).await?;
            if options.expect_ready {
                conn.wait_for(b"server_ready").await?;
            }
            // Only the socket is kept: the held connections cost the load generator little.
            Ok(conn.stream)
        })
    })
    .await;
    emit(json!({
        "event": "ready",
        "mode": "idle-connect",
        "connections": held.len(),
        "failed": failed,
        "first_error": first_error,
        "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
    }));
    hold(&options).await;
    emit(json!({"event": "result", "mode": "idle-connect", "connections": held.len(), "failed": failed}));
    drop(held);
    Ok(())
}

/// Shared counting state of `subscribe-count`.
struct Tally {
    active: usize,
    /// `reached[k]`: connections that have at least `(k + 1) * progress_every` publications.
    reached: Vec<usize>,
    done: usize,
    received: u64,
    other: u64,
    closed: usize,
    first_unix_ns: Option<u128>,
    done_unix_ns: Option<u128>,
}

async fn subscribe(options: Options) -> Result<(), String> {
    let started = Instant::now();
    let shared = Rc::new(options.clone());
    let (mut conns, failed, first_error) = open_all(&options, |index| {
        let options = Rc::clone(&shared);
        Box::pin(async move {
            let buffer = if options.mode == Mode::SubscribeStall { 2048 } else { 64 * 1024 };
            let mut conn = Conn::open(&options, buffer).await?;
            conn.wait_for(b"server_ready").await?;
            let request = format!(
                r#"{{"t":"subscription_update","p":{{"action":"subscribe","topics":["{}"]}},"id":"sub-{index}"}}"#,
                options.topic
            );
            conn.send_text(&request).await?;
            conn.wait_for(b"subscription_update").await?;
            Ok(conn)
        })
    })
    .await;
    emit(json!({
        "event": "ready",
        "mode": if options.mode == Mode::SubscribeStall { "subscribe-stall" } else { "subscribe-count" },
        "connections": conns.len(),
        "failed": failed,
        "first_error": first_error,
        "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
    }));
    if options.mode == Mode::SubscribeStall {
        hold(&options).await;
        emit(json!({"event": "result", "mode": "subscribe-stall", "connections": conns.len(), "failed": failed}));
        return Ok(());
    }

    let every = options.progress_every;
    let buckets = options.messages.checked_div(every).unwrap_or(0) as usize;
    let tally = Rc::new(RefCell::new(Tally {
        active: conns.len(),
        reached: vec![0; buckets],
        done: 0,
        received: 0,
        other: 0,
        closed: 0,
        first_unix_ns: None,
        done_unix_ns: None,
    }));
    let all_done = Rc::new(Notify::new());
    let counted = options.message_type.clone().into_bytes();
    let cpu_before = cpu_seconds();
    if conns.is_empty() {
        all_done.notify_one();
    }
    for mut conn in conns.drain(..) {
        let tally = Rc::clone(&tally);
        let all_done = Rc::clone(&all_done);
        let counted = counted.clone();
        let target = options.messages;
        tokio::task::spawn_local(async move {
            let mut count = 0u64;
            let mut other = 0u64;
            loop {
                let before = count;
                conn.scan(|seen| {
                    let publication = match seen.opcode {
                        0x2 if seen.prefix.starts_with(b"C:") => true,
                        0x1 | 0x2 => match message_type(seen.prefix) {
                            Some(t) if t == counted.as_slice() => true,
                            Some(b"ping" | b"server_ready" | b"PONG") => false,
                            _ => {
                                other += 1;
                                false
                            }
                        },
                        _ => false,
                    };
                    if publication {
                        count += 1;
                    }
                    true
                });
                if count != before {
                    let mut t = tally.borrow_mut();
                    if before == 0 && t.first_unix_ns.is_none() {
                        t.first_unix_ns = Some(unix_ns());
                    }
                    t.received += count - before;
                    if let (Some(from), Some(to)) = (before.checked_div(every), count.min(target).checked_div(every)) {
                        for k in from..to {
                            let k = k as usize;
                            t.reached[k] += 1;
                            if t.reached[k] == t.active {
                                emit(json!({"event": "progress", "min": (k as u64 + 1) * every}));
                            }
                        }
                    }
                    if before < target && count >= target {
                        t.done += 1;
                        if t.done == t.active {
                            t.done_unix_ns = Some(unix_ns());
                            all_done.notify_one();
                        }
                    }
                }
                if conn.closed {
                    break;
                }
                match conn.fill().await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let mut t = tally.borrow_mut();
            t.other += other;
            t.closed += 1;
        });
    }
    let complete = tokio::time::timeout(options.timeout, all_done.notified()).await.is_ok();
    let t = tally.borrow();
    emit(json!({
        "event": "result",
        "mode": "subscribe-count",
        "complete": complete,
        "connections": t.active,
        "failed": failed,
        "messages": options.messages,
        "received": t.received,
        "expected": options.messages * t.active as u64,
        "other": t.other,
        "closed_early": t.closed,
        "first_unix_ns": t.first_unix_ns.map(|n| n.to_string()),
        "done_unix_ns": t.done_unix_ns.map(|n| n.to_string()),
        "cpu_s": cpu_seconds() - cpu_before,
    }));
    // Exit without waiting for the counting tasks (their sockets close with the process).
    std::process::exit(if complete { 0 } else { 1 });
}

async fn echo_load(options: Options) -> Result<(), String> {
    let shared = Rc::new(options.clone());
    let (conns, failed, first_error) = open_all(&options, |_| {
        let options = Rc::clone(&shared);
        Box::pin(async move {
            let mut conn = Conn::open(&options, 64 * 1024).await?;
            if options.expect_ready {
                conn.wait_for(b"server_ready").await?;
            }
            Ok(conn)
        })
    })
    .await;
    if failed > 0 {
        return Err(format!("{failed} connections failed: {}", first_error.unwrap_or_default()));
    }
    let replies = Rc::new(Cell::new(0u64));
    let other = Rc::new(Cell::new(0u64));
    let (stop_tx, stop_rx) = watch::channel(false);
    let data: String = (0..options.payload).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let template = format!(r#"{{"t":"echo","p":{{"data":"{data}"}},"id":"0000000000000000"}}"#);
    let id_at = template.len() - 18;
    for (index, mut conn) in conns.into_iter().enumerate() {
        let replies = Rc::clone(&replies);
        let other = Rc::clone(&other);
        let mut stop = stop_rx.clone();
        let mut message = template.clone().into_bytes();
        let reply_type = options.reply_type.clone().into_bytes();
        let window = options.window;
        tokio::task::spawn_local(async move {
            let mut outgoing = Vec::with_capacity(window * (message.len() + 14));
            let mut outstanding = 0usize;
            let mut seq = (index as u64) << 40;
            loop {
                let stopping = *stop.borrow();
                if !stopping {
                    while outstanding < window {
                        seq += 1;
                        for (i, digit) in message[id_at..id_at + 16].iter_mut().enumerate() {
                            *digit = b"0123456789abcdef"[((seq >> (60 - 4 * i)) & 0xf) as usize];
                        }
                        encode_text_frame(&mut outgoing, &message);
                        outstanding += 1;
                    }
                    if !outgoing.is_empty() {
                        if conn.stream.write_all(&outgoing).await.is_err() {
                            break;
                        }
                        outgoing.clear();
                    }
                }
                let mut got = 0usize;
                let mut unexpected = 0u64;
                conn.scan(|seen| {
                    if seen.opcode == 0x2 && seen.prefix.starts_with(b"C:") {
                        // A compressed reply (the engine compresses events above its threshold).
                        got += 1;
                    } else if seen.opcode == 0x1 || seen.opcode == 0x2 {
                        match message_type(seen.prefix) {
                            Some(t) if t == reply_type.as_slice() => got += 1,
                            Some(b"ping" | b"server_ready") => {}
                            _ => unexpected += 1,
                        }
                    }
                    true
                });
                outstanding = outstanding.saturating_sub(got);
                replies.set(replies.get() + got as u64);
                other.set(other.get() + unexpected);
                if conn.closed || (stopping && outstanding == 0) {
                    break;
                }
                if got > 0 && !stopping {
                    continue;
                }
                tokio::select! {
                    read = conn.fill() => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = stop.changed(), if !stopping => {}
                }
            }
        });
    }
    tokio::time::sleep(options.warmup).await;
    let (start_count, start, cpu_start) = (replies.get(), Instant::now(), cpu_seconds());
    tokio::time::sleep(options.duration).await;
    let (end_count, elapsed, cpu_end) = (replies.get(), start.elapsed(), cpu_seconds());
    stop_tx.send_replace(true);
    let measured = end_count - start_count;
    emit(json!({
        "event": "result",
        "mode": "echo-load",
        "connections": options.connections,
        "window": options.window,
        "payload": options.payload,
        "message_bytes": template.len(),
        "replies": measured,
        "seconds": elapsed.as_secs_f64(),
        "rate": measured as f64 / elapsed.as_secs_f64(),
        "other": other.get(),
        "cpu_s": cpu_end - cpu_start,
    }));
    std::process::exit(0);
}
