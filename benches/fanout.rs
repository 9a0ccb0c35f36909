//! Fan-out throughput and memory under a publisher flood.
//!
//! The engine runs inside this process on a Tokio current-thread runtime on one dedicated
//! thread, and the whole process is pinned to CPU 0 (it re-executes itself under
//! `taskset -c 0`), so "one server core" is literal: the publisher, every connection driver
//! and the kernel's send path all share it. Subscribers live in a separate
//! `wsengine-loadgen` process pinned to CPU 1.
//!
//! 1. Throughput: S subscribers subscribe to a topic; the server thread publishes P
//!    publications with `Engine::publish`, at most a window of 256 ahead of the slowest
//!    subscriber (the load generator reports progress), so nothing is dropped. The rate is
//!    P × S / (time from the first publish until every subscriber has all P).
//! 2. Flood: 100 subscribers that never read; the server publishes as fast as it can for a
//!    few seconds while this harness samples its own RSS. The per-connection delivery
//!    channel cap and the outbound queue limits must make the RSS plateau.
//!
//! Both with the default configuration (`compression_threshold` 1024: a 2 KiB payload goes out
//! as a shared `C:` frame, a 100 B one as plain text) and with compression off.
//!
//! ```text
//! cargo bench --bench fanout
//! WSENGINE_BENCH_REPS=5 WSENGINE_BENCH_FLOOD_SECS=8 cargo bench --bench fanout
//! cargo bench --bench fanout -- throughput    # or: flood
//! ```
//!
//! Target: at least 1,000,000 deliveries per second on one server core.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::JsonChild;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use wsengine::services::publication::Publication;
use wsengine::{Config, Engine, Envelope, WireFormat};

/// Publications the publisher may be ahead of the slowest subscriber (below the delivery
/// channel capacity of 1024, so no delivery is dropped).
const WINDOW: u64 = 256;
/// Progress granularity of the load generator.
const PROGRESS_EVERY: u64 = 16;
/// Throughput target in deliveries per second.
const TARGET: f64 = 1_000_000.0;
/// Subscribers of the flood test. Few enough that their kernel send buffers (autotuned up to
/// about 1 MiB each on loopback) fill within a second, so the engine's own queues are reached.
const FLOOD_SUBSCRIBERS: usize = 100;

/// Work for the server thread.
enum Job {
    /// Publish `count` publications, staying `WINDOW` ahead of `acked`.
    Paced { topic: String, count: u64, payload: Value, acked: watch::Receiver<u64>, reply: std_mpsc::Sender<Published> },
    /// Publish as fast as possible for `duration`.
    Flood { topic: String, duration: Duration, payload: Value, reply: std_mpsc::Sender<Published> },
}

/// What the publisher did.
#[derive(Debug, Default)]
struct Published {
    start_unix_ns: u128,
    seconds: f64,
    publications: u64,
    delivered: u64,
    dropped: u64,
}

/// The engine on its own thread and current-thread runtime.
struct ServerThread {
    addr: SocketAddr,
    jobs: mpsc::UnboundedSender<Job>,
    /// `/proc` stat file of the server thread, for its CPU time.
    stat: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    fn start(config: Config) -> ServerThread {
        let (init_tx, init_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wsengine-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async move {
                    let engine = Engine::builder(config).build().expect("engine");
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    let (jobs, mut queue) = mpsc::unbounded_channel();
                    let addr = listener.local_addr().expect("local_addr");
                    init_tx.send((addr, jobs, common::current_thread_stat())).expect("init");
                    tokio::spawn(engine.clone().serve(listener));
                    while let Some(job) = queue.recv().await {
                        match job {
                            Job::Paced { topic, count, payload, acked, reply } => {
                                reply.send(paced(&engine, &topic, count, &payload, acked).await).ok();
                            }
                            Job::Flood { topic, duration, payload, reply } => {
                                reply.send(flood(&engine, &topic, duration, &payload).await).ok();
                            }
                        }
                    }
                    engine.shutdown();
                });
            })
            .expect("server thread");
        let (addr, jobs, stat) = init_rx.recv().expect("server start");
        ServerThread { addr, jobs, stat, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("ws://{}/wse", self.addr)
    }

    fn cpu(&self) -> f64 {
        common::cpu_seconds(&self.stat)
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        // Closing the job channel ends the runtime (and every connection with it).
        let (closed, _) = mpsc::unbounded_channel();
        self.jobs = closed;
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

async fn paced(
    engine: &Engine,
    topic: &str,
    count: u64,
    payload: &Value,
    mut acked: watch::Receiver<u64>,
) -> Published {
    let mut report = Published { start_unix_ns: common::unix_ns(), ..Published::default() };
    let started = Instant::now();
    for i in 0..count {
        while i >= *acked.borrow_and_update() + WINDOW {
            if acked.changed().await.is_err() {
                break;
            }
        }
        let published = engine.publish(topic, Envelope::new("bench", payload.clone())).await.expect("publish");
        report.delivered += published.delivered as u64;
        report.dropped += published.dropped as u64;
        report.publications += 1;
        if i % 16 == 15 {
            tokio::task::yield_now().await;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

async fn flood(engine: &Engine, topic: &str, duration: Duration, payload: &Value) -> Published {
    let mut report = Published { start_unix_ns: common::unix_ns(), ..Published::default() };
    let started = Instant::now();
    while started.elapsed() < duration {
        for _ in 0..32 {
            let published = engine.publish(topic, Envelope::new("bench", payload.clone())).await.expect("publish");
            report.delivered += published.delivered as u64;
            report.dropped += published.dropped as u64;
            report.publications += 1;
        }
        tokio::task::yield_now().await;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// A market-data-like payload of about `bytes` bytes of JSON (zlib shrinks it 3-4x).
fn payload(bytes: usize) -> Value {
    let mut state = 0x2545_f491_u32;
    let mut rows = Vec::new();
    while serde_json::to_string(&json!({ "rows": rows })).map_or(0, |s| s.len()) < bytes {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let r = state >> 8;
        rows.push(json!({"s": format!("S{:03}", r % 500), "px": f64::from(r % 100_000) / 100.0, "q": r % 5000}));
    }
    json!({ "rows": rows })
}

/// Sizes of the frame a subscriber gets: plain JSON, and on the wire under `config`.
fn frame_sizes(payload: &Value, config: &Config) -> (usize, usize, bool) {
    let publication = Publication::new("t", Envelope::new("bench", payload.clone()));
    let plain = publication.json_len();
    let compression = config.compression.then_some((config.compression_threshold, config.compression_level));
    let frame = publication.frame(WireFormat::Json, compression);
    (plain, frame.len(), !frame.is_text())
}

struct Variant {
    name: &'static str,
    config: Config,
}

fn variants() -> Vec<Variant> {
    // Defaults, or WSENGINE_* environment overrides (for experiments; the harness prints them).
    let defaults = Config::load(None).expect("WSENGINE_* configuration");
    let base = Config { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..defaults };
    vec![
        Variant { name: "default (compression_threshold 1024)", config: base.clone() },
        Variant { name: "compression off", config: Config { compression: false, ..base } },
    ]
}

fn throughput(reps: usize) -> Vec<f64> {
    // (variant, subscribers, payload bytes, publications)
    let cases: &[(usize, usize, usize, u64)] = &[
        (0, 1, 100, 100_000),
        (0, 100, 100, 20_000),
        (0, 1000, 100, 2_000),
        (0, 10_000, 100, 200),
        (0, 1, 2048, 50_000),
        (0, 100, 2048, 5_000),
        (0, 1000, 2048, 500),
        (0, 10_000, 2048, 50),
        (1, 1, 2048, 50_000),
        (1, 100, 2048, 5_000),
        (1, 1000, 2048, 500),
        (1, 10_000, 2048, 50),
    ];
    let variants = variants();
    let mut rows = Vec::new();
    let mut small_rates = Vec::new();
    let mut case_number = 0;
    for (v, variant) in variants.iter().enumerate() {
        let server = ServerThread::start(variant.config.clone());
        for &(_, subscribers, bytes, publications) in cases.iter().filter(|c| c.0 == v) {
            case_number += 1;
            let payload = payload(bytes);
            let (plain, wire, compressed) = frame_sizes(&payload, &variant.config);
            let mut rates = Vec::new();
            let mut cpu_shares = Vec::new();
            let mut loadgen_cpu = Vec::new();
            let mut latency = Vec::new();
            let mut foreign: f64 = 0.0;
            for rep in 0..reps {
                let topic = format!("fanout.{case_number}.{rep}");
                let run = run_paced(&server, &topic, subscribers, publications, &payload);
                rates.push(run.rate);
                cpu_shares.push(run.server_cpu);
                loadgen_cpu.push(run.loadgen_cpu);
                latency.push(run.first_ms);
                foreign = foreign.max(run.foreign);
            }
            let rate = common::median(&mut rates.clone());
            if bytes <= 100 {
                small_rates.push(rate);
            }
            rows.push(vec![
                variant.name.to_owned(),
                subscribers.to_string(),
                format!("{bytes} B"),
                if compressed { format!("{plain} → C: {wire}") } else { format!("{plain} text") },
                publications.to_string(),
                common::thousands(publications as f64 * subscribers as f64),
                common::thousands(rate),
                format!(
                    "{}..{}",
                    common::thousands(rates.iter().copied().fold(f64::MAX, f64::min)),
                    common::thousands(rates.iter().copied().fold(0.0, f64::max))
                ),
                format!("{:.0} %", common::median(&mut cpu_shares) * 100.0),
                format!("{:.0} %", common::median(&mut loadgen_cpu) * 100.0),
                format!("{:.1}", common::median(&mut latency)),
                common::warn_foreign(foreign),
            ]);
            println!(
                "  done: {} subscribers, {bytes} B, {}: {} deliveries/s",
                subscribers,
                variant.name,
                common::thousands(rate)
            );
        }
    }
    println!();
    println!("Fan-out throughput (median of {reps}; window {WINDOW} publications; server = 1 core):");
    common::print_table(
        &[
            "config",
            "subscribers",
            "payload",
            "frame bytes",
            "publications",
            "deliveries",
            "deliveries/s",
            "min..max",
            "server CPU",
            "loadgen CPU",
            "first ms",
            "other CPUs",
        ],
        &rows,
    );
    small_rates
}

struct PacedRun {
    rate: f64,
    foreign: f64,
    server_cpu: f64,
    loadgen_cpu: f64,
    first_ms: f64,
}

fn run_paced(server: &ServerThread, topic: &str, subscribers: usize, publications: u64, payload: &Value) -> PacedRun {
    let args: Vec<String> = [
        "subscribe-count",
        "--url",
        &server.url(),
        "--connections",
        &subscribers.to_string(),
        "--topic",
        topic,
        "--message-type",
        "bench",
        "--messages",
        &publications.to_string(),
        "--progress-every",
        &PROGRESS_EVERY.to_string(),
        "--timeout",
        "120",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut loadgen = JsonChild::spawn(common::loadgen(1, &args), "loadgen");
    let ready = loadgen.expect("ready", Duration::from_secs(60));
    assert_eq!(ready["failed"], 0, "subscribers failed: {ready}");
    let (acked_tx, acked) = watch::channel(0u64);
    let (reply, published) = std_mpsc::channel();
    let cpu_before = server.cpu();
    let machine_before = common::cpu_sample();
    let measured = Instant::now();
    server
        .jobs
        .send(Job::Paced { topic: topic.to_owned(), count: publications, payload: payload.clone(), acked, reply })
        .unwrap_or_else(|_| panic!("server thread gone"));
    let result = loop {
        let line = loadgen.next(Duration::from_secs(120));
        match line["event"].as_str() {
            Some("progress") => {
                acked_tx.send_replace(line["min"].as_u64().unwrap_or(0));
            }
            Some("result") => break line,
            Some("error") => panic!("loadgen: {}", line["message"]),
            _ => {}
        }
    };
    let published = published.recv_timeout(Duration::from_secs(60)).expect("publisher report");
    let cpu_after = server.cpu();
    let machine = common::cpu_sample().busy_cpus_since(&machine_before);
    let wall = measured.elapsed().as_secs_f64();
    loadgen.finish(Duration::from_secs(5));
    assert_eq!(result["complete"], true, "not every subscriber got every publication: {result}");
    assert_eq!(published.dropped, 0, "the publisher saw dropped deliveries");
    let done: u128 = result["done_unix_ns"].as_str().and_then(|s| s.parse().ok()).expect("done_unix_ns");
    let first: u128 = result["first_unix_ns"].as_str().and_then(|s| s.parse().ok()).unwrap_or(done);
    let seconds = done.saturating_sub(published.start_unix_ns) as f64 / 1e9;
    let loadgen_cpu_s = result["cpu_s"].as_f64().unwrap_or(0.0);
    PacedRun {
        rate: publications as f64 * subscribers as f64 / seconds,
        foreign: (machine - (cpu_after - cpu_before + loadgen_cpu_s) / wall).max(0.0),
        server_cpu: (cpu_after - cpu_before) / seconds,
        loadgen_cpu: loadgen_cpu_s / seconds,
        first_ms: first.saturating_sub(published.start_unix_ns) as f64 / 1e6,
    }
}

fn flood_all(seconds: f64) {
    let variants = variants();
    // (variant, payload bytes)
    let cases = [(0usize, 100usize), (0, 2048), (1, 2048)];
    let mut rows = Vec::new();
    let mut plateaued = true;
    for (n, &(v, bytes)) in cases.iter().enumerate() {
        let variant = &variants[v];
        let payload = payload(bytes);
        let (plain, wire, compressed) = frame_sizes(&payload, &variant.config);
        let server = ServerThread::start(variant.config.clone());
        let idle = common::memory(None);
        let topic = format!("flood.{n}");
        let args: Vec<String> = [
            "subscribe-stall",
            "--url",
            &server.url(),
            "--connections",
            &FLOOD_SUBSCRIBERS.to_string(),
            "--topic",
            &topic,
            "--until-stdin-closes",
            "--hold",
            "120",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut loadgen = JsonChild::spawn(common::loadgen(1, &args), "loadgen");
        let ready = loadgen.expect("ready", Duration::from_secs(60));
        assert_eq!(ready["failed"], 0, "subscribers failed: {ready}");
        std::thread::sleep(Duration::from_millis(300));
        let subscribed = common::memory(None);
        let (reply, published) = std_mpsc::channel();
        let duration = Duration::from_secs_f64(seconds);
        server
            .jobs
            .send(Job::Flood { topic, duration, payload: payload.clone(), reply })
            .unwrap_or_else(|_| panic!("server thread gone"));
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut kernel_tcp_mib = Vec::new();
        while started.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(250));
            samples.push((started.elapsed().as_secs_f64(), common::memory(None).rss));
            kernel_tcp_mib.push(common::kernel_tcp_mib());
        }
        let published = published.recv_timeout(Duration::from_secs(30)).expect("publisher report");
        loadgen.finish(Duration::from_secs(5));
        std::thread::sleep(Duration::from_secs(1));
        let closed = common::memory(None);
        drop(server);
        let kernel = kernel_tcp_mib.iter().copied().fold(0.0, f64::max);

        let mib = |kib: u64| format!("{:.0}", kib as f64 / 1024.0);
        let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
        // Plateau: the last half of the flood adds less than 5 % (of the flood's growth) plus 4 MiB.
        let half = samples.iter().find(|s| s.0 >= seconds / 2.0).map_or(0, |s| s.1);
        let last = samples.last().map_or(0, |s| s.1);
        let growth = peak.saturating_sub(subscribed.rss);
        let flat = last.saturating_sub(half) <= growth / 20 + 4096;
        plateaued &= flat;
        let at = |t: f64| samples.iter().find(|s| s.0 >= t).map_or("-".into(), |s| mib(s.1));
        let offered = published.publications * FLOOD_SUBSCRIBERS as u64;
        rows.push(vec![
            variant.name.to_owned(),
            if compressed { format!("{bytes} B (C: {wire})") } else { format!("{bytes} B ({plain})") },
            mib(idle.rss),
            mib(subscribed.rss),
            at(0.5),
            at(1.0),
            at(seconds / 2.0),
            mib(last),
            mib(peak),
            mib(closed.rss),
            format!("{kernel:.0}"),
            common::thousands(published.publications as f64 / published.seconds),
            format!("{:.1} %", published.dropped as f64 * 100.0 / offered.max(1) as f64),
            if flat { "yes".into() } else { "NO".into() },
        ]);
        println!("  done: flood {} B, {}", bytes, variant.name);
    }
    println!();
    println!(
        "Publisher flood: {FLOOD_SUBSCRIBERS} subscribers that never read, {seconds} s, server RSS in MiB \
         (samples every 250 ms; 'chan dropped' = refused by full delivery channels, the rest is dropped at the \
         outbound queue; 'kernel TCP MiB' = peak socket buffer memory of the whole machine, not in any RSS):"
    );
    let half_label = format!("{:.1} s", seconds / 2.0);
    let end_label = format!("{seconds:.1} s");
    common::print_table(
        &[
            "config",
            "payload",
            "idle",
            "subscribed",
            "0.5 s",
            "1 s",
            &half_label,
            &end_label,
            "peak",
            "after close",
            "kernel TCP MiB",
            "publications/s",
            "chan dropped",
            "plateau",
        ],
        &rows,
    );
    println!("memory bounded under flood: {}", if plateaued { "yes" } else { "NO" });
}

fn main() {
    common::pin_self(0);
    common::raise_fd_limit();
    let args = common::args();
    let which = args.first().map(String::as_str).unwrap_or("all");
    let reps: usize = common::env_or("WSENGINE_BENCH_REPS", 3).max(1);
    let flood_seconds: f64 = common::env_or("WSENGINE_BENCH_FLOOD_SECS", 5.0);
    println!(
        "fanout: engine on a current-thread runtime, process on CPU 0; subscribers in wsengine-loadgen on CPU 1{}",
        if common::pinning() { "" } else { " (pinning OFF)" }
    );
    common::report_machine_load();
    let started = Instant::now();
    if which == "all" || which == "throughput" {
        let small = throughput(reps);
        let best = small.iter().copied().fold(0.0, f64::max);
        println!(
            "small-payload fan-out: {} deliveries/s at best (target >= {}: {})",
            common::thousands(best),
            common::thousands(TARGET),
            if best >= TARGET { "met" } else { "MISSED" }
        );
        println!();
    }
    if which == "all" || which == "flood" {
        flood_all(flood_seconds);
    }
    println!();
    println!(
        "total {:.0} s; reproduce: cargo bench --bench fanout{}",
        started.elapsed().as_secs_f64(),
        match which {
            "all" => String::new(),
            other => format!(" -- {other}"),
        }
    );
}
