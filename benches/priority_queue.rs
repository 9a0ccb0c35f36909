//! Outbound priority queue: cost per message of `call` (enqueue) plus `pop` (dequeue), in
//! process, single thread, no socket.
//!
//! Cases:
//! - `one at a time`: queue one frame, pop it (the common case of a reader that keeps up; it
//!   includes allocating and freeing the queue's buffers, since an empty queue holds none);
//! - `backlog`: 1,000 frames over 100 topics and all five levels stay queued while frames are
//!   queued and popped one for one;
//! - `held back`: 1,000 BACKGROUND frames of 1,000 topics, then one HIGH frame per topic in
//!   the opposite order, drained: every HIGH head is held back by a frame deep inside
//!   BACKGROUND (priority inheritance, tombstones, compaction);
//! - `full`: a full queue (message cap 1,000) where every new HIGH frame evicts the oldest
//!   BACKGROUND one.
//!
//! ```text
//! cargo bench --bench priority_queue
//! ```

use std::hint::black_box;
use std::time::Instant;

use futures_util::FutureExt;
use tower::Service;
use wsengine::core::Frame;
use wsengine::services::message::{Order, OrderKey, Outbound, OutboundBody, OutboundKind};
use wsengine::services::queue::{OutboundQueue, QueueLimits, QueueReader};

const LEVELS: [u8; 5] = [1, 3, 5, 8, 10];

fn message(frame: &Frame, topic: &OrderKey, pri: u8) -> Outbound {
    Outbound {
        kind: OutboundKind::Publication,
        priority: pri,
        body: OutboundBody::Frame(frame.clone()),
        order: Order { stream: Some(*topic), reply: None },
    }
}

fn push(queue: &mut OutboundQueue, message: Outbound) {
    queue.call(message).now_or_never().expect("the queue answers at once").expect("encoded");
}

fn report(name: &str, operations: usize, started: Instant) {
    let nanos = started.elapsed().as_nanos() as f64 / operations as f64;
    println!("{name:<14} {nanos:>8.1} ns per message ({operations} messages)");
}

fn best_of<F: FnMut() -> f64>(runs: usize, mut run: F) -> f64 {
    (0..runs).map(|_| run()).fold(f64::INFINITY, f64::min)
}

fn main() {
    let frame = Frame::text("x".repeat(200));
    let topics: Vec<OrderKey> = (0..1000).map(|n| OrderKey::topic(&format!("topic-{n}"))).collect();
    let limits = QueueLimits::default();

    // One at a time.
    let (mut queue, reader) = OutboundQueue::new(limits);
    let n = 1_000_000;
    let started = Instant::now();
    for i in 0..n {
        push(&mut queue, message(&frame, &topics[i % 100], 5));
        black_box(reader.pop());
    }
    report("one at a time", n, started);

    // Backlog.
    let (mut queue, reader) = OutboundQueue::new(limits);
    for i in 0..1000 {
        push(&mut queue, message(&frame, &topics[i % 100], LEVELS[i % 5]));
    }
    let started = Instant::now();
    for i in 0..n {
        push(&mut queue, message(&frame, &topics[i % 100], LEVELS[i % 5]));
        black_box(reader.pop());
    }
    report("backlog", n, started);

    // Held back.
    let per_message = best_of(20, || {
        let (mut queue, reader): (OutboundQueue, QueueReader) = OutboundQueue::new(limits);
        let started = Instant::now();
        for topic in &topics {
            push(&mut queue, message(&frame, topic, 1));
        }
        for topic in topics.iter().rev() {
            push(&mut queue, message(&frame, topic, 8));
        }
        while black_box(reader.pop()).is_some() {}
        started.elapsed().as_nanos() as f64 / (2 * topics.len()) as f64
    });
    println!("{:<14} {per_message:>8.1} ns per message ({} messages, best of 20)", "held back", 2 * topics.len());

    // Full: 100,000 BACKGROUND frames fill the message cap; each HIGH frame evicts one.
    let per_message = best_of(5, || {
        let full = 100_000;
        let (mut queue, reader) = OutboundQueue::new(QueueLimits { messages: full, bytes: usize::MAX, ..limits });
        for i in 0..full {
            push(&mut queue, message(&frame, &topics[i % 1000], 1));
        }
        let started = Instant::now();
        for i in 0..full {
            push(&mut queue, message(&frame, &topics[i % 1000], 8));
        }
        let elapsed = started.elapsed().as_nanos() as f64 / full as f64;
        assert_eq!(reader.dropped(), full as u64);
        elapsed
    });
    println!("{:<14} {per_message:>8.1} ns per message (100000 evicting messages, best of 5)", "full");
}
