//! Circuit breaker overhead: the cost per call of `CircuitBreakerLayer` around a service that
//! answers at once, against the bare service, in a closed breaker (the normal case: every
//! call is admitted and its outcome recorded) and in an open one (every call refused).
//!
//! One breaker is shared by every caller (as the engine shares one per resource), so the
//! contended run has two threads calling through the same breaker at once.
//!
//! ```text
//! cargo bench --bench circuit_breaker
//! WSENGINE_BENCH_CALLS=5000000 cargo bench --bench circuit_breaker
//! ```
//!
//! Figures (2026-11-29, 2-core VM shared with other builds, load average ≈ 4.6, so noisy;
//! the clock read costs ≈ 43 ns here): bare 4 ns/call, closed breaker 79–83 ns/call (one
//! clock read, two uncontended lock round trips), open breaker 75–137 ns/call (includes
//! boxing the `CircuitOpen` error), two threads through one shared breaker 250–300 ns/call
//! per thread.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tower::{Layer, Service, ServiceExt, service_fn};
use wsengine::layers::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, CircuitBreakerSettings};
use wsengine::services::message::BoxError;

fn calls() -> u64 {
    std::env::var("WSENGINE_BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000)
}

/// Nanoseconds per call of `service`, driven `n` times on a current-thread runtime.
fn per_call<S>(mut service: S, n: u64) -> f64
where
    S: Service<u64, Response = u64, Error = BoxError>,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async move {
        let started = Instant::now();
        for i in 0..n {
            let _ = black_box(service.ready().await.unwrap().call(i).await);
        }
        started.elapsed().as_nanos() as f64 / n as f64
    })
}

fn echo() -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|i: u64| std::future::ready(Ok::<u64, BoxError>(i)))
}

fn failing() -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|_: u64| std::future::ready(Err::<u64, BoxError>("down".into())))
}

fn main() {
    let n = calls();
    let settings = CircuitBreakerSettings::default();

    let bare = per_call(echo(), n);
    let closed = CircuitBreaker::new("bench", settings.clone());
    let guarded = per_call(CircuitBreakerLayer::new(closed.clone()).layer(echo()), n);
    assert_eq!(closed.stats().failures, 0);

    let open = CircuitBreaker::new(
        "bench",
        CircuitBreakerSettings { open_timeout: Duration::from_secs(3600), ..settings.clone() },
    );
    let layer = CircuitBreakerLayer::new(open.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        for i in 0..settings.minimum_calls as u64 {
            let _ = layer.layer(failing()).oneshot(i).await;
        }
    });
    let refused = per_call(layer.layer(echo()), n);

    // Two threads through one shared closed breaker.
    let shared = CircuitBreaker::new("bench", settings);
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let service = CircuitBreakerLayer::new(shared.clone()).layer(echo());
            std::thread::spawn(move || per_call(service, n))
        })
        .collect();
    let per_thread: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let wall = started.elapsed().as_nanos() as f64 / (2 * n) as f64;

    println!("circuit breaker, {n} calls per run");
    println!("  bare service                 {bare:7.1} ns/call");
    println!("  closed breaker               {guarded:7.1} ns/call  (+{:.1} ns)", guarded - bare);
    println!("  open breaker (fail fast)     {refused:7.1} ns/call");
    println!(
        "  closed, 2 threads, shared    {:7.1} / {:7.1} ns/call per thread, {wall:.1} ns/call overall",
        per_thread[0], per_thread[1]
    );
}
