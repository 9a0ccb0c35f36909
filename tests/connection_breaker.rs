//! The per-connection circuit breaker (PROTOCOL.md §12.1): a connection whose application
//! messages keep failing in the handler gets a final `SERVER_ERROR` and close 1011, while its
//! neighbours, occasional failures, protocol answers and the engine-wide breaker's refusals
//! leave connections open.
#![cfg(feature = "circuit_breaker")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wsengine::client::{Client, ClientError};
use wsengine::core::{ErrorCode, ProtocolError};
use wsengine::services::message::BoxError;
use wsengine::{AppBody, AppMessage, Config, Envelope, handler_fn};

/// A handler that fails with an internal error when `p.fail` is true, answers with a protocol
/// error (`INVALID_REQUEST`) when `p.refuse` is true, and echoes otherwise; counts its calls.
fn handler(calls: Arc<AtomicUsize>) -> impl wsengine::Handler {
    handler_fn(move |message: AppMessage| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let AppBody::Message(m) = message.body else { return Ok(vec![]) };
            let p = m.p().cloned().unwrap_or_default();
            if p["fail"] == true {
                return Err::<Vec<Envelope>, BoxError>(std::io::Error::other("database unreachable").into());
            }
            if p["refuse"] == true {
                return Err(ProtocolError::new(ErrorCode::InvalidRequest, "not like that").into());
            }
            Ok(vec![Envelope::new("echo_reply", p)])
        }
    })
}

async fn server(configure: impl FnOnce(&mut Config)) -> (TestServer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let server = start_with(configure, |b| b.handler(handler(calls.clone()))).await;
    (server, calls)
}

/// Sends a failing message and returns the answer.
async fn fail(client: &mut Client) -> Result<Value, ClientError> {
    client.send("work", json!({"fail": true})).await?;
    client.recv().await
}

/// Sends a succeeding message and checks the echo.
async fn succeed(client: &mut Client, n: usize) {
    client.send("work", json!({"n": n})).await.unwrap();
    let reply = client.recv().await.unwrap();
    assert_eq!(reply["t"], "echo_reply", "{reply}");
    assert_eq!(reply["p"]["n"], n);
}

fn assert_server_error(answer: &Value) {
    assert_eq!(answer["t"], "error", "{answer}");
    assert_eq!(answer["p"]["code"], "SERVER_ERROR", "{answer}");
    assert_eq!(answer["p"]["message"], "Internal server error", "{answer}");
}

/// The final frame of a tripped connection, then its close 1011.
async fn assert_closed_for_failures(client: &mut Client) {
    let last = client.recv().await.expect("the final error frame");
    assert_eq!(last["t"], "error", "{last}");
    assert_eq!(last["p"]["code"], "SERVER_ERROR", "{last}");
    assert_eq!(last["p"]["message"], "Too many handler failures", "{last}");
    match client.recv().await {
        Err(ClientError::Closed(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 1011);
            assert_eq!(frame.reason.as_str(), "too many handler failures");
        }
        other => panic!("expected close 1011, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_whose_handler_calls_keep_failing_is_closed_with_1011() {
    // Default settings throughout: at least 10 calls in the window, half of them failed.
    let (server, calls) = server(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..9 {
        assert_server_error(&fail(&mut client).await.unwrap());
        // Protocol traffic is not a handler call and counts for nothing.
        assert_eq!(client.ping().await.unwrap()["t"], "PONG");
    }
    client.send("work", json!({"fail": true})).await.unwrap();
    assert_closed_for_failures(&mut client).await;
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    // Another connection of the same client is a fresh start.
    let mut again = Client::connect(&server.url()).await.unwrap();
    assert_eq!(again.ping().await.unwrap()["t"], "PONG");
    server.stop().await;
}

#[tokio::test]
async fn a_neighbour_whose_messages_succeed_stays_open_and_answered() {
    // The engine-wide handler breaker would see the failures too and refuse everyone for a
    // while; it is off so that only the per-connection breaker acts.
    let (server, _calls) = server(|c| c.circuit_breaker = false).await;
    let mut failing = Client::connect(&server.url()).await.unwrap();
    let mut neighbour = Client::connect(&server.url()).await.unwrap();
    neighbour.subscribe(&["prices"]).await.unwrap();
    for n in 0..9 {
        assert_server_error(&fail(&mut failing).await.unwrap());
        succeed(&mut neighbour, n).await;
    }
    failing.send("work", json!({"fail": true})).await.unwrap();
    assert_closed_for_failures(&mut failing).await;
    for n in 9..30 {
        succeed(&mut neighbour, n).await;
    }
    server.engine.publish("prices", Envelope::new("price_update", json!({"AAPL": 1}))).await.unwrap();
    assert_eq!(neighbour.recv().await.unwrap()["t"], "price_update");
    assert_eq!(neighbour.ping().await.unwrap()["t"], "PONG");
    // The closed connection leaves the registry once its driver has finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.engine.connection_count() != 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.engine.connection_count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn occasional_failures_below_the_threshold_never_close() {
    let (server, calls) = server(|_| {}).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    // One call in three fails: about a third of the window, below the default half.
    for n in 0..90 {
        if n % 3 == 0 {
            assert_server_error(&fail(&mut client).await.unwrap());
        } else {
            succeed(&mut client, n).await;
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 90);
    assert_eq!(client.ping().await.unwrap()["t"], "PONG");
    assert_eq!(server.engine.health().circuit_breakers["handler"].state, "closed");
    server.stop().await;
}

#[tokio::test]
async fn with_the_breaker_off_a_failing_connection_is_never_closed() {
    let (server, calls) = server(|c| {
        c.connection_breaker = false;
        c.circuit_breaker = false;
    })
    .await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..50 {
        assert_server_error(&fail(&mut client).await.unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 50);
    assert_eq!(client.ping().await.unwrap()["t"], "PONG");
    succeed(&mut client, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn engine_wide_refusals_and_protocol_answers_do_not_count() {
    let (server, calls) = server(|c| {
        // The engine-wide breaker opens after three failures and stays open for the test.
        c.circuit_breaker_window = 3;
        c.circuit_breaker_min_calls = 3;
        c.circuit_breaker_failure_rate = 1.0;
        c.circuit_breaker_open_timeout = Duration::from_secs(600);
    })
    .await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..30 {
        client.send("work", json!({"refuse": true})).await.unwrap();
        assert_eq!(client.recv().await.unwrap()["p"]["code"], "INVALID_REQUEST");
    }
    for _ in 0..3 {
        assert_server_error(&fail(&mut client).await.unwrap());
    }
    // The engine is backing off: refusals, however many, are not this connection's failures.
    for _ in 0..30 {
        let answer = fail(&mut client).await.unwrap();
        assert_eq!(answer["p"]["code"], "CIRCUIT_BREAKER_OPEN", "{answer}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 33);
    assert_eq!(client.ping().await.unwrap()["t"], "PONG");
    server.stop().await;
}

#[tokio::test]
async fn a_failing_batch_stops_at_the_final_error() {
    let (server, calls) = server(|c| c.circuit_breaker = false).await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    let elements: Vec<Value> = (0..15).map(|n| json!({"t": "work", "p": {"fail": true, "n": n}})).collect();
    let batch = json!({"t": "batch", "p": {"messages": elements}});
    client.send_raw(wsengine::services::tungstenite::Message::text(batch.to_string())).await.unwrap();
    for _ in 0..9 {
        assert_server_error(&client.recv().await.unwrap());
    }
    assert_closed_for_failures(&mut client).await;
    assert_eq!(calls.load(Ordering::SeqCst), 10, "no element runs after the close");
    server.stop().await;
}

#[tokio::test]
async fn failures_older_than_the_window_are_forgotten() {
    let window = Duration::from_millis(400);
    let (server, _calls) = server(|c| {
        c.circuit_breaker = false;
        c.connection_breaker_window = 5;
        c.connection_breaker_min_calls = 3;
        c.connection_breaker_failure_rate = 1.0;
        c.connection_breaker_window_duration = window;
    })
    .await;
    let mut client = Client::connect(&server.url()).await.unwrap();
    for _ in 0..3 {
        assert_server_error(&fail(&mut client).await.unwrap());
        assert_server_error(&fail(&mut client).await.unwrap());
        tokio::time::sleep(window + Duration::from_millis(100)).await;
    }
    assert_server_error(&fail(&mut client).await.unwrap());
    assert_server_error(&fail(&mut client).await.unwrap());
    client.send("work", json!({"fail": true})).await.unwrap();
    assert_closed_for_failures(&mut client).await;
    server.stop().await;
}
