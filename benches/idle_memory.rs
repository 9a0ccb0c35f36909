//! Idle connection cost: server RSS per idle WebSocket connection.
//!
//! Starts the `wsengine` binary as a separate process (pinned to CPU 0), warms it up with a
//! few hundred connections, reads its RSS (`VmRSS` of `/proc/PID/status`), opens N idle
//! connections from `wsengine-loadgen` (pinned to CPU 1) that each complete the handshake and
//! receive `server_ready`, waits for the RSS to settle, reads it again and reports
//! `(RSS_after - RSS_before) / N`. The same is measured for the bare hyper-tungstenite echo
//! (`examples/echo.rs`, which sends nothing, so its connections only complete the handshake),
//! and for the engine with a 1 KiB read buffer, to show where the memory goes.
//!
//! ```text
//! cargo bench --bench idle_memory                 # 10,000 connections
//! cargo bench --bench idle_memory -- 20000        # or WSENGINE_BENCH_CONNECTIONS=20000
//! ```
//!
//! Target: at most 8 KiB per idle connection for the engine with its default configuration.

mod common;

use std::time::{Duration, Instant};

use common::{JsonChild, Server};

/// The per-connection target of the engine, in KiB.
const TARGET_KIB: f64 = 8.0;
/// Connections opened and closed before the baseline reading.
const WARM_UP: usize = 500;

struct Case {
    name: &'static str,
    program: std::path::PathBuf,
    args: Vec<&'static str>,
    env: Vec<(&'static str, &'static str)>,
    /// The server sends `server_ready` (the engine does; the bare echo does not).
    ready: bool,
    health: bool,
}

struct Measured {
    before: common::Memory,
    after: common::Memory,
    connected: u64,
    connect_s: f64,
    health_connections: Option<u64>,
}

fn loadgen_args(addr: &str, connections: usize, ready: bool, hold: bool) -> Vec<String> {
    let mut args = vec![
        "idle-connect".to_owned(),
        "--url".into(),
        format!("ws://{addr}/wse"),
        "--connections".into(),
        connections.to_string(),
        "--timeout".into(),
        "120".into(),
    ];
    if ready {
        args.push("--expect-ready".into());
    }
    if hold {
        args.extend(["--until-stdin-closes".into(), "--hold".into(), "300".into()]);
    } else {
        args.extend(["--hold".into(), "0".into()]);
    }
    args
}

fn measure(case: &Case, connections: usize) -> Measured {
    let mut command = common::pinned_command(0, &case.program);
    command.args(&case.args).envs(case.env.iter().copied());
    let server = Server::start(command, case.name, !case.ready);
    let pid = Some(server.pid());

    // Warm-up: the runtime, the allocator's arenas and the listener's first connections.
    let mut warm =
        JsonChild::spawn(common::loadgen(1, &loadgen_args(&server.addr, WARM_UP, case.ready, false)), "loadgen");
    let ready = warm.expect("ready", Duration::from_secs(60));
    assert_eq!(ready["failed"], 0, "warm-up connections failed: {ready}");
    warm.expect("result", Duration::from_secs(30));
    warm.finish(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let before = common::settled_memory(pid, Duration::from_secs(5));

    let started = Instant::now();
    let mut idle =
        JsonChild::spawn(common::loadgen(1, &loadgen_args(&server.addr, connections, case.ready, true)), "loadgen");
    let ready = idle.expect("ready", Duration::from_secs(150));
    let connect_s = started.elapsed().as_secs_f64();
    let connected = ready["connections"].as_u64().unwrap_or(0);
    if ready["failed"] != 0 {
        eprintln!("warning: {}: {} connections failed: {}", case.name, ready["failed"], ready["first_error"]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = common::settled_memory(pid, Duration::from_secs(10));
    let health_connections = if case.health {
        common::http_get(&server.addr, "/health")
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|health| health["connections"].as_u64())
    } else {
        None
    };
    idle.finish(Duration::from_secs(10));
    server.stop();
    Measured { before, after, connected, connect_s, health_connections }
}

fn main() {
    let args = common::args();
    let mut connections: usize = match args.first() {
        Some(n) => n.parse().unwrap_or_else(|_| panic!("usage: idle_memory [CONNECTIONS], got {n:?}")),
        None => common::env_or("WSENGINE_BENCH_CONNECTIONS", 10_000),
    };
    let limit = common::raise_fd_limit();
    let usable = limit.saturating_sub(200) as usize;
    if connections > usable {
        eprintln!("warning: file descriptor limit {limit}: measuring {usable} connections instead of {connections}");
        connections = usable;
    }
    let wsengine = std::path::PathBuf::from(env!("CARGO_BIN_EXE_wsengine"));
    let echo = common::example("echo");
    let engine_env = vec![("WSENGINE_LOG", "warn"), ("WSENGINE_IDLE_TIMEOUT", "600s")];
    let mut small_buffer = engine_env.clone();
    small_buffer.push(("WSENGINE_READ_BUFFER_SIZE", "1024"));
    let cases = [
        Case {
            name: "wsengine (default config)",
            program: wsengine.clone(),
            args: vec!["serve", "--listen", "127.0.0.1:0"],
            env: engine_env,
            ready: true,
            health: true,
        },
        Case {
            name: "wsengine read_buffer_size=1024",
            program: wsengine,
            args: vec!["serve", "--listen", "127.0.0.1:0"],
            env: small_buffer,
            ready: true,
            health: true,
        },
        Case {
            name: "bare echo (examples/echo.rs)",
            program: echo,
            args: vec!["127.0.0.1:0"],
            env: vec![],
            ready: false,
            health: false,
        },
    ];

    println!(
        "idle_memory: {connections} idle connections per server; server on CPU 0, load generator on CPU 1{}",
        if common::pinning() { "" } else { " (pinning OFF)" }
    );
    common::report_machine_load();
    let mut rows = Vec::new();
    let mut engine_kib = None;
    for case in &cases {
        let m = measure(case, connections);
        let n = m.connected.max(1) as f64;
        let per_conn = (m.after.rss as f64 - m.before.rss as f64) / n;
        let per_conn_anon = (m.after.anon as f64 - m.before.anon as f64) / n;
        if engine_kib.is_none() {
            engine_kib = Some(per_conn);
        }
        let verdict = if case.ready { if per_conn <= TARGET_KIB { "yes" } else { "NO" } } else { "-" };
        rows.push(vec![
            case.name.to_owned(),
            format!("{}", m.connected),
            m.health_connections.map_or("-".into(), |c| c.to_string()),
            format!("{:.1}", m.before.rss as f64 / 1024.0),
            format!("{:.1}", m.after.rss as f64 / 1024.0),
            format!("{per_conn:.2}"),
            format!("{per_conn_anon:.2}"),
            format!("{:.1}", m.connect_s),
            verdict.to_owned(),
        ]);
    }
    println!();
    common::print_table(
        &[
            "server",
            "connections",
            "/health conns",
            "RSS before MiB",
            "RSS after MiB",
            "KiB/conn (VmRSS)",
            "KiB/conn (RssAnon)",
            "connect s",
            "<= 8 KiB",
        ],
        &rows,
    );
    println!();
    if let Some(kib) = engine_kib {
        println!(
            "engine idle connection cost: {kib:.2} KiB (target <= {TARGET_KIB} KiB: {})",
            if kib <= TARGET_KIB { "met" } else { "MISSED" }
        );
    }
    println!("reproduce: cargo bench --bench idle_memory -- {connections}");
}
