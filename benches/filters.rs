//! Subscription filters: in-process `MemoryBus` fan-out of one publication to 10,000 local
//! subscribers, without filters and with filters shared by many subscribers or not at all;
//! plus the cost of compiling a filter and of one evaluation. Single thread, no socket; the
//! subscribers' channels are drained outside the timed section.
//!
//! Cases (10,000 subscribers each, time per publication):
//! - `unfiltered`: no filter;
//! - `1 shared filter`: every subscriber has the same filter (evaluated once per publication);
//! - `100 filters`: 100 distinct filters, 100 subscribers each;
//! - `10000 filters`: a distinct filter per subscriber (the per-subscriber worst case).
//!
//! ```text
//! cargo bench --bench filters
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::json;
use wsengine::services::bus::{Bus, MemoryBus};
use wsengine::services::connection::{Connection, ConnectionId};
use wsengine::services::publication::Publication;
use wsengine::{Envelope, Filter, WireFormat};

const SUBSCRIBERS: usize = 10_000;
const PUBLICATIONS: usize = 200;

fn filter(n: usize) -> Arc<Filter> {
    Filter::intern(
        &json!({"symbol": {"$in": ["AAPL", "MSFT"]}, "price": {"$gt": n as f64 / 1000.0}, "venue": {"$regex": "^X"}}),
    )
    .expect("valid")
}

/// A bus with `SUBSCRIBERS` subscribers of `quotes`, subscriber `i` using filter `i % distinct`.
fn bus(
    distinct: Option<usize>,
) -> (MemoryBus, Vec<Arc<Connection>>, Vec<wsengine::services::connection::DeliveryReceiver>) {
    let bus = MemoryBus::new();
    let filters: Vec<Arc<Filter>> = (0..distinct.unwrap_or(0)).map(filter).collect();
    let (mut connections, mut receivers) = (Vec::new(), Vec::new());
    for i in 0..SUBSCRIBERS {
        let (tx, rx) = wsengine::services::connection::delivery_channel(4);
        let connection = Arc::new(Connection::new(ConnectionId::new(), None, WireFormat::Json, tx));
        if let Some(distinct) = distinct {
            bus.set_filter(connection.id(), "quotes", Some(Arc::clone(&filters[i % distinct])));
        }
        bus.subscribe(&connection, "quotes");
        connections.push(connection);
        receivers.push(rx);
    }
    (bus, connections, receivers)
}

fn run(name: &str, distinct: Option<usize>) {
    let (bus, _connections, mut receivers) = bus(distinct);
    let mut total = Duration::ZERO;
    for n in 0..PUBLICATIONS {
        let payload = json!({"symbol": "AAPL", "price": 187.5, "venue": "XNAS", "n": n});
        let publication = Publication::new("quotes", Envelope::new("quote", payload));
        let started = Instant::now();
        let report =
            bus.publish(publication).now_or_never().expect("the memory bus answers at once").expect("published");
        total += started.elapsed();
        black_box(report.delivered);
        for rx in &mut receivers {
            while rx.try_recv().is_ok() {}
        }
    }
    let micros = total.as_secs_f64() * 1e6 / PUBLICATIONS as f64;
    println!("{name:<16} {micros:>9.1} µs per publication to {SUBSCRIBERS} subscribers");
}

fn main() {
    run("unfiltered", None);
    run("1 shared filter", Some(1));
    run("100 filters", Some(100));
    run("10000 filters", Some(SUBSCRIBERS));

    let expression =
        json!({"$or": [{"symbol": "AAPL", "price": {"$gte": 100}}, {"venue": {"$regex": "^X(NAS|NYS)$"}}]});
    let n = 10_000;
    let started = Instant::now();
    for _ in 0..n {
        black_box(Filter::compile(&expression).expect("valid"));
    }
    println!(
        "{:<16} {:>9.1} µs per filter (with a regex)",
        "compile",
        started.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let compiled = Filter::compile(&expression).expect("valid");
    let payload = json!({"symbol": "MSFT", "price": 187.5, "venue": "XNAS"});
    let n = 1_000_000;
    let started = Instant::now();
    for _ in 0..n {
        black_box(compiled.matches(black_box(&payload)));
    }
    println!("{:<16} {:>9.1} ns per evaluation", "evaluate", started.elapsed().as_secs_f64() * 1e9 / n as f64);
}
