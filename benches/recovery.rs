//! Recovery history: publishes/s through `TopicHistory::publish` (stamp, store, fan-out under
//! the topic's order) with a fan-out that does a fixed amount of work, for 1 and 2 publishing
//! threads, to one topic or to distinct topics. In process, no socket, no subscribers: the
//! fan-out closure stands in for the local delivery loop (a spin of about 1 µs, "small", or
//! about 20 µs, "large", as for a few subscribers or about a thousand).
//!
//! Same topic: publishes stay totally ordered, so only the work before the topic's lock
//! (building the publication) overlaps. Distinct topics: the topics' orders are independent, so
//! two threads should approach twice one thread's rate on a machine with two free cores.
//!
//! Columns: "fan-outs in parallel" is publishes/s × the fan-out's own time, the average number
//! of fan-outs running at once (above 1 only when they overlap); "bench CPUs" the CPUs this
//! process kept busy; "other CPUs" what the rest of the machine used meanwhile (figures taken
//! while it is above 0.15 are skewed).
//!
//! Each case runs a warm-up, then `WSENGINE_BENCH_REPS` timed rounds of `WSENGINE_BENCH_SECS`
//! seconds each (defaults 3 and 1); the figure is the median round.
//!
//! ```text
//! cargo bench --bench recovery
//! WSENGINE_BENCH_REPS=5 WSENGINE_BENCH_SECS=2 cargo bench --bench recovery
//! ```

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{cpu_sample, cpu_seconds, env_number, median, print_table, report_machine_load, thousands, warn_foreign};
use serde_json::json;
use wsengine::Envelope;
use wsengine::services::publication::Publication;
use wsengine::services::recovery::{RecoverySettings, TopicHistory};

/// Spin iterations of the small fan-out; the large one does 20 times as many.
const SMALL_SPIN: u64 = 1_000;

/// Work standing in for a fan-out: a dependent multiply-add chain the optimizer cannot drop.
fn spin(iterations: u64) -> u64 {
    let mut acc = black_box(1u64);
    for i in 0..iterations {
        acc = acc.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(black_box(i));
    }
    acc
}

fn publication(topic: &str, n: u64) -> Publication {
    Publication::new(topic, Envelope::new("tick", json!({"symbol": "AAPL", "price": 187.5, "n": n})))
}

/// One timed round.
struct Round {
    /// Publishes per second.
    rate: f64,
    /// CPUs this process kept busy on average.
    cpus: f64,
    /// CPUs other processes kept busy on average.
    foreign: f64,
}

/// A round of `seconds`, thread `i` publishing to `topics[i]`.
fn round(history: &Arc<TopicHistory>, topics: &[String], spin_iterations: u64, seconds: f64) -> Round {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(topics.len() + 1));
    let workers: Vec<_> = topics
        .iter()
        .cloned()
        .map(|topic| {
            let (history, stop, start) = (Arc::clone(history), Arc::clone(&stop), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                let mut published = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (stamped, work) = history.publish(publication(&topic, published), |_| spin(spin_iterations));
                    black_box((stamped, work));
                    published += 1;
                }
                published
            })
        })
        .collect();
    start.wait();
    let (started, cpu_before, machine_before) = (Instant::now(), cpu_seconds("/proc/self/stat"), cpu_sample());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let published: u64 = workers.into_iter().map(|w| w.join().expect("publisher")).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let cpus = (cpu_seconds("/proc/self/stat") - cpu_before) / elapsed;
    let foreign = (cpu_sample().busy_cpus_since(&machine_before) - cpus).max(0.0);
    Round { rate: published as f64 / elapsed, cpus, foreign }
}

/// Seconds per call of the fan-out work: the fastest of several batches (preemption only
/// ever makes a batch slower).
fn work_seconds(spin_iterations: u64) -> f64 {
    (0..20)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..100 {
                black_box(spin(spin_iterations));
            }
            started.elapsed().as_secs_f64() / 100.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let reps = env_number("WSENGINE_BENCH_REPS", 3.0).max(1.0) as usize;
    let seconds = env_number("WSENGINE_BENCH_SECS", 1.0);
    report_machine_load();
    println!("available parallelism: {:?}", std::thread::available_parallelism().map(|n| n.get()));

    let mut rows = Vec::new();
    for (fan_out, spin_iterations) in [("small", SMALL_SPIN), ("large", SMALL_SPIN * 20)] {
        let work = work_seconds(spin_iterations);
        for (case, topics) in [
            ("1 thread", vec!["a".to_owned()]),
            ("2 threads, same topic", vec!["a".to_owned(), "a".to_owned()]),
            ("2 threads, distinct topics", vec!["a".to_owned(), "b".to_owned()]),
        ] {
            let history = Arc::new(TopicHistory::new(RecoverySettings::default()));
            round(&history, &topics, spin_iterations, seconds / 2.0);
            let rounds: Vec<Round> = (0..reps).map(|_| round(&history, &topics, spin_iterations, seconds)).collect();
            let median_of = |field: fn(&Round) -> f64| median(&mut rounds.iter().map(field).collect::<Vec<_>>());
            let rate = median_of(|r| r.rate);
            rows.push(vec![
                format!("{fan_out} ({:.1} µs)", work * 1e6),
                case.to_owned(),
                thousands(rate),
                format!("{:.2}", rate * work),
                format!("{:.2}", median_of(|r| r.cpus)),
                warn_foreign(median_of(|r| r.foreign)),
            ]);
        }
    }
    print_table(
        &["fan-out work", "publishers", "publishes/s", "fan-outs in parallel", "bench CPUs", "other CPUs"],
        &rows,
    );
}
