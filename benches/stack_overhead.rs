//! Stack overhead: echo throughput of the full default wsengine stack against a bare
//! hyper-tungstenite echo server, same machine, same run.
//!
//! Both servers run as separate processes pinned to CPU 0: the bare echo is
//! `examples/echo.rs`, the engine is `examples/engine_echo.rs` (default configuration plus an
//! echo handler answering every application message with an `echo_reply` event). Both use
//! Tokio's multi-threaded runtime, which pinning reduces to one worker. `wsengine-loadgen
//! echo-load`, pinned to CPU 1, opens N connections, keeps a window of requests outstanding
//! on each, sends WSE-shaped JSON text frames (`{"t":"echo","p":{"data":…},"id":…}`) and
//! counts replies (the bare echo returns them verbatim, the engine answers `echo_reply`).
//! Servers alternate run by run so that drift hits both alike; each figure is the median.
//!
//! The engine's default per-connection rate limits (PROTOCOL.md §11: 200 inbound frames/s
//! after a burst of 2,000; 10,000 outbound events/s) would throttle any throughput test, so
//! the harness raises them (`WSENGINE_INBOUND_RATE_*`, `WSENGINE_OUTBOUND_RATE_*` = 10^9)
//! unless the environment sets them: the rate-limit layers still run on every message, they
//! just never refuse one. Any other `WSENGINE_*` variable in the environment is passed on to
//! the engine too (the harness prints them). The 1 KiB workload's replies exceed the default
//! `compression_threshold` (1024), so the engine compresses each one (a `C:` frame); it is
//! also measured with compression off.
//!
//! ```text
//! cargo bench --bench stack_overhead
//! WSENGINE_BENCH_REPS=5 WSENGINE_BENCH_SECS=8 cargo bench --bench stack_overhead
//! ```
//!
//! Target: the engine costs at most 20 % of the bare echo's throughput.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{JsonChild, Server};

/// Largest accepted throughput loss relative to the bare echo.
const TARGET_OVERHEAD: f64 = 0.20;
/// Rate limits raised so they never refuse a message (the layers still run).
const UNTHROTTLED: [&str; 4] = [
    "WSENGINE_INBOUND_RATE_CAPACITY",
    "WSENGINE_INBOUND_RATE_REFILL",
    "WSENGINE_OUTBOUND_RATE_CAPACITY",
    "WSENGINE_OUTBOUND_RATE_REFILL",
];

#[derive(Clone, Copy)]
struct Workload {
    connections: usize,
    window: usize,
    payload: usize,
}

struct Target {
    name: &'static str,
    program: PathBuf,
    reply_type: &'static str,
    /// The engine: waits for `server_ready` and gets the rate-limit overrides.
    engine: bool,
    env: Vec<(&'static str, &'static str)>,
    /// Only measured with payloads above this size.
    min_payload: usize,
}

struct Run {
    rate: f64,
    /// CPUs used by other processes during the run.
    foreign: f64,
    server_cpu: f64,
    loadgen_cpu: f64,
    other: u64,
    message_bytes: u64,
}

fn run(target: &Target, workload: Workload, warmup: f64, seconds: f64) -> Run {
    let mut command = common::pinned_command(0, &target.program);
    command.arg("127.0.0.1:0");
    if target.engine {
        for name in UNTHROTTLED {
            if std::env::var_os(name).is_none() {
                command.env(name, "1000000000");
            }
        }
    }
    command.envs(target.env.iter().copied());
    let server = Server::start(command, target.name, !target.engine);
    let stat = format!("/proc/{}/stat", server.pid());
    let mut args = vec![
        "echo-load".to_owned(),
        "--url".into(),
        format!("ws://{}/wse", server.addr),
        "--connections".into(),
        workload.connections.to_string(),
        "--window".into(),
        workload.window.to_string(),
        "--payload".into(),
        workload.payload.to_string(),
        "--reply-type".into(),
        target.reply_type.into(),
        "--warmup".into(),
        warmup.to_string(),
        "--duration".into(),
        seconds.to_string(),
    ];
    if target.engine {
        args.push("--expect-ready".into());
    }
    let cpu_before = common::cpu_seconds(&stat);
    let machine_before = common::cpu_sample();
    let started = Instant::now();
    let mut loadgen = JsonChild::spawn(common::loadgen(1, &args), "loadgen");
    let result = loadgen.expect("result", Duration::from_secs_f64(warmup + seconds + 60.0));
    let wall = started.elapsed().as_secs_f64();
    let cpu_after = common::cpu_seconds(&stat);
    let machine = common::cpu_sample().busy_cpus_since(&machine_before);
    loadgen.finish(Duration::from_secs(5));
    server.stop();
    let server_cpu = (cpu_after - cpu_before) / wall;
    let loadgen_cpu = result["cpu_s"].as_f64().unwrap_or(0.0) / result["seconds"].as_f64().unwrap_or(1.0);
    Run {
        rate: result["rate"].as_f64().unwrap_or(0.0),
        foreign: (machine - server_cpu - loadgen_cpu).max(0.0),
        server_cpu,
        loadgen_cpu,
        other: result["other"].as_u64().unwrap_or(0),
        message_bytes: result["message_bytes"].as_u64().unwrap_or(0),
    }
}

fn main() {
    common::raise_fd_limit();
    let reps: usize = common::env_or("WSENGINE_BENCH_REPS", 3).max(1);
    let seconds: f64 = common::env_or("WSENGINE_BENCH_SECS", 3.0);
    let warmup: f64 = common::env_or("WSENGINE_BENCH_WARMUP", 1.0);
    let engine = common::example("engine_echo");
    let targets = [
        Target {
            name: "bare echo (examples/echo.rs)",
            program: common::example("echo"),
            reply_type: "echo",
            engine: false,
            env: vec![],
            min_payload: 0,
        },
        Target {
            name: "wsengine (examples/engine_echo.rs)",
            program: engine.clone(),
            reply_type: "echo_reply",
            engine: true,
            env: vec![],
            min_payload: 0,
        },
        Target {
            name: "wsengine, compression off",
            program: engine,
            reply_type: "echo_reply",
            engine: true,
            env: vec![("WSENGINE_COMPRESSION", "false")],
            min_payload: 1000,
        },
    ];
    let workloads = [
        Workload { connections: 100, window: 16, payload: 64 },
        Workload { connections: 100, window: 16, payload: 1024 },
    ];
    println!(
        "stack_overhead: servers on CPU 0, wsengine-loadgen on CPU 1{}; {reps} runs of {warmup} s warm-up + {seconds} s each",
        if common::pinning() { "" } else { " (pinning OFF)" }
    );
    println!("engine rate limits raised to 10^9 (unless set in the environment): {}", UNTHROTTLED.join(", "));
    common::report_machine_load();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut primary_overhead = None;
    for workload in workloads {
        let active: Vec<&Target> =
            targets.iter().filter(|t| workload.payload > t.min_payload || t.min_payload == 0).collect();
        let mut runs: Vec<Vec<Run>> = active.iter().map(|_| Vec::new()).collect();
        for _ in 0..reps {
            for (i, target) in active.iter().enumerate() {
                runs[i].push(run(target, workload, warmup, seconds));
            }
        }
        let rates: Vec<f64> =
            runs.iter().map(|r| common::median(&mut r.iter().map(|x| x.rate).collect::<Vec<_>>())).collect();
        for (i, target) in active.iter().enumerate() {
            let r = &runs[i];
            let min = r.iter().map(|x| x.rate).fold(f64::MAX, f64::min);
            let max = r.iter().map(|x| x.rate).fold(0.0, f64::max);
            let overhead = 1.0 - rates[i] / rates[0];
            if i == 1 && primary_overhead.is_none() {
                primary_overhead = Some(overhead);
            }
            rows.push(vec![
                format!("{} conns × window {}, {} B msg", workload.connections, workload.window, r[0].message_bytes),
                target.name.to_owned(),
                common::thousands(rates[i]),
                format!("{}..{}", common::thousands(min), common::thousands(max)),
                format!("{:.0} %", common::median(&mut r.iter().map(|x| x.server_cpu * 100.0).collect::<Vec<_>>())),
                format!("{:.0} %", common::median(&mut r.iter().map(|x| x.loadgen_cpu * 100.0).collect::<Vec<_>>())),
                r.iter().map(|x| x.other).sum::<u64>().to_string(),
                common::warn_foreign(r.iter().map(|x| x.foreign).fold(0.0, f64::max)),
                if i == 0 { "-".into() } else { format!("{:.1} %", overhead * 100.0) },
            ]);
        }
        let summary: Vec<String> =
            active.iter().zip(&rates).map(|(t, r)| format!("{} {}", t.name, common::thousands(*r))).collect();
        println!("  done: {} B payload: {}", workload.payload, summary.join(", "));
    }
    println!();
    common::print_table(
        &[
            "workload",
            "server",
            "msgs/s (median)",
            "min..max",
            "server CPU",
            "loadgen CPU",
            "bad replies",
            "other CPUs",
            "overhead",
        ],
        &rows,
    );
    println!();
    if let Some(overhead) = primary_overhead {
        println!(
            "small-message overhead of the full stack: {:.1} % (target <= {:.0} %: {})",
            overhead * 100.0,
            TARGET_OVERHEAD * 100.0,
            if overhead <= TARGET_OVERHEAD { "met" } else { "MISSED" }
        );
    }
    println!("total {:.0} s; reproduce: cargo bench --bench stack_overhead", started.elapsed().as_secs_f64());
}
