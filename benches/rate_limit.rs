//! Rate-limit micro benchmarks (PROTOCOL.md §11): the cost the inbound and outbound limiters
//! add to one message, with a no-op inner service, and the per-user bucket under two threads.
//!
//! Cases: an inbound frame admitted by the per-connection bucket; admitted by the connection
//! and the per-user bucket (10,000 users, so the shared map is not trivially small); refused
//! (empty bucket, no notice due: the flood path); an outbound event admitted; and the per-user
//! check alone from 1 and 2 threads at once (the shard locks are the only shared state).
//!
//! Each case runs a warm-up, then `WSENGINE_BENCH_REPS` timed rounds of `WSENGINE_BENCH_SECS`
//! seconds each (defaults 5 and 1); the figure is the median round in ns per message. Bench
//! builds include the dev-dependency `tokio/test-util`, whose clock lookup makes each time
//! reading a little dearer than in a release build of the engine.
//!
//! ```text
//! cargo bench --bench rate_limit
//! ```

mod common;

use common::{env_number, measure};
use std::hint::black_box;

use futures_util::FutureExt;
use serde_json::json;
use tower::{Layer, Service, service_fn};
use wsengine::Envelope;
use wsengine::core::{Frame, WireFormat};
use wsengine::layers::rate_limit::{InboundRateLimitLayer, OutboundRateLimitLayer, Rate, UserRateLimiter};
use wsengine::services::connection::{Connection, ConnectionId, Identity};
use wsengine::services::message::{BoxError, Inbound, Outbound, Reply};

fn connection(user: &str) -> std::sync::Arc<Connection> {
    let (tx, _) = wsengine::services::connection::delivery_channel(1);
    let identity = Some(Identity::new(user));
    std::sync::Arc::new(Connection::new(ConnectionId::new(), identity, WireFormat::Json, tx))
}

fn inbound_case(layer: InboundRateLimitLayer, reps: usize, seconds: f64) -> f64 {
    let inner = service_fn(|_: Inbound| std::future::ready(Ok::<_, BoxError>(Reply::none())));
    let mut service = layer.layer(inner);
    let frame = Inbound::frame(Frame::text(r#"{"t":"ping","p":{}}"#));
    measure(
        || {
            let reply = service.call(black_box(frame.clone())).now_or_never().expect("ready").expect("no error");
            black_box(reply);
        },
        reps,
        seconds,
    )
}

fn main() {
    let reps = env_number("WSENGINE_BENCH_REPS", 5.0).max(1.0) as usize;
    let seconds = env_number("WSENGINE_BENCH_SECS", 1.0).max(0.01);
    let plenty = Rate::new(u32::MAX, u32::MAX).expect("non-zero");
    println!("rate_limit: median of {reps} rounds of {seconds} s, ns per message");

    let admitted = inbound_case(InboundRateLimitLayer::new(plenty), reps, seconds);
    println!("inbound frame admitted (connection bucket)            {admitted:8.1} ns");

    let users = UserRateLimiter::new(plenty);
    for n in 0..10_000 {
        let layer =
            InboundRateLimitLayer::new(plenty).per_user(users.clone()).connection(&connection(&format!("u{n}")));
        let mut service = layer.layer(service_fn(|_: Inbound| std::future::ready(Ok::<_, BoxError>(Reply::none()))));
        let _ = service.call(Inbound::frame(Frame::text("{}"))).now_or_never();
    }
    let per_user = InboundRateLimitLayer::new(plenty).per_user(users.clone()).connection(&connection("bench-user"));
    let with_user = inbound_case(per_user, reps, seconds);
    println!("inbound frame admitted (connection + user bucket)     {with_user:8.1} ns");

    let scarce = Rate::new(1, 1).expect("non-zero");
    let refused = inbound_case(InboundRateLimitLayer::new(scarce).close_after_windows(0), reps, seconds);
    println!("inbound frame refused (flood path)                    {refused:8.1} ns");

    let inner = service_fn(|_: Outbound| std::future::ready(Ok::<_, BoxError>(())));
    let mut outbound = OutboundRateLimitLayer::new(plenty).layer(inner);
    let event = Outbound::event(Envelope::new("tick", json!({"n": 1})));
    let out = measure(
        || {
            std::future::poll_fn(|cx| outbound.poll_ready(cx)).now_or_never().expect("ready").expect("no error");
            outbound.call(black_box(event.clone())).now_or_never().expect("ready").expect("no error");
        },
        reps,
        seconds,
    );
    println!("outbound event admitted                               {out:8.1} ns");

    for threads in [1, 2] {
        let results: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let users = users.clone();
                    scope.spawn(move || {
                        let layer = InboundRateLimitLayer::new(plenty)
                            .per_user(users)
                            .connection(&connection(&format!("thread-{t}")));
                        inbound_case(layer, reps, seconds)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("bench thread")).collect()
        });
        let mean = results.iter().sum::<f64>() / results.len() as f64;
        println!("inbound frame admitted with user bucket, {threads} thread(s)  {mean:8.1} ns per thread");
    }
}
