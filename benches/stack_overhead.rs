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
    expect_ready: bool,
}

struct Run {
    rate: f64,
    server_cpu: f64,
    loadgen_cpu: f64,
    other: u64,
    message_bytes: u64,
}

fn run(target: &Target, workload: Workload, warmup: f64, seconds: f64) -> Run {
    let mut command = common::pinned_command(0, &target.program);
    command.arg("127.0.0.1:0");
    let server = Server::start(command, target.name);
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
    if target.expect_ready {
        args.push("--expect-ready".into());
    }
    let cpu_before = common::cpu_seconds(&stat);
    let started = Instant::now();
    let mut loadgen = JsonChild::spawn(common::loadgen(1, &args), "loadgen");
    let result = loadgen.expect("result", Duration::from_secs_f64(warmup + seconds + 60.0));
    let wall = started.elapsed().as_secs_f64();
    let cpu_after = common::cpu_seconds(&stat);
    loadgen.finish(Duration::from_secs(5));
    server.stop();
    Run {
        rate: result["rate"].as_f64().unwrap_or(0.0),
        server_cpu: (cpu_after - cpu_before) / wall,
        loadgen_cpu: result["cpu_s"].as_f64().unwrap_or(0.0) / result["seconds"].as_f64().unwrap_or(1.0),
        other: result["other"].as_u64().unwrap_or(0),
        message_bytes: result["message_bytes"].as_u64().unwrap_or(0),
    }
}

fn main() {
    common::raise_fd_limit();
    let reps: usize = common::env_or("WSENGINE_BENCH_REPS", 3).max(1);
    let seconds: f64 = common::env_or("WSENGINE_BENCH_SECS", 4.0);
    let warmup: f64 = common::env_or("WSENGINE_BENCH_WARMUP", 1.0);
    let targets = [
        Target {
            name: "bare echo (examples/echo.rs)",
            program: common::example("echo"),
            reply_type: "echo",
            expect_ready: false,
        },
        Target {
            name: "wsengine (examples/engine_echo.rs)",
            program: common::example("engine_echo"),
            reply_type: "echo_reply",
            expect_ready: true,
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
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut worst_overhead: f64 = 0.0;
    for workload in workloads {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (i, target) in targets.iter().enumerate() {
                runs[i].push(run(target, workload, warmup, seconds));
            }
        }
        let rates: Vec<f64> =
            runs.iter().map(|r| common::median(&mut r.iter().map(|x| x.rate).collect::<Vec<_>>())).collect();
        let overhead = 1.0 - rates[1] / rates[0];
        worst_overhead = worst_overhead.max(overhead);
        for (i, target) in targets.iter().enumerate() {
            let r = &runs[i];
            let min = r.iter().map(|x| x.rate).fold(f64::MAX, f64::min);
            let max = r.iter().map(|x| x.rate).fold(0.0, f64::max);
            rows.push(vec![
                format!("{} conns × window {}, {} B msg", workload.connections, workload.window, r[0].message_bytes),
                target.name.to_owned(),
                common::thousands(rates[i]),
                format!("{}..{}", common::thousands(min), common::thousands(max)),
                format!("{:.0} %", common::median(&mut r.iter().map(|x| x.server_cpu * 100.0).collect::<Vec<_>>())),
                format!("{:.0} %", common::median(&mut r.iter().map(|x| x.loadgen_cpu * 100.0).collect::<Vec<_>>())),
                r.iter().map(|x| x.other).sum::<u64>().to_string(),
                if i == 1 { format!("{:.1} %", overhead * 100.0) } else { "-".into() },
            ]);
        }
        println!(
            "  done: {} B payload: echo {} msg/s, wsengine {} msg/s",
            workload.payload,
            common::thousands(rates[0]),
            common::thousands(rates[1])
        );
    }
    println!();
    common::print_table(
        &["workload", "server", "msgs/s (median)", "min..max", "server CPU", "loadgen CPU", "bad replies", "overhead"],
        &rows,
    );
    println!();
    println!(
        "worst overhead {:.1} % (target <= {:.0} %: {})",
        worst_overhead * 100.0,
        TARGET_OVERHEAD * 100.0,
        if worst_overhead <= TARGET_OVERHEAD { "met" } else { "MISSED" }
    );
    println!("total {:.0} s; reproduce: cargo bench --bench stack_overhead", started.elapsed().as_secs_f64());
}
