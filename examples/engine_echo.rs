//! The full default wsengine stack with an echo handler: the counterpart of `examples/echo.rs`
//! in the stack-overhead benchmark (`benches/stack_overhead.rs`).
//!
//! Run it with `cargo run --release --example engine_echo -- 127.0.0.1:9002` (port `0` picks a
//! free port). Every application message `{"t": …, "p": P}` is answered with an
//! `echo_reply` event carrying the same payload `P`; everything else (`server_ready`,
//! subscriptions, heartbeats) is the engine's standard protocol handling, with the default
//! configuration (`WSENGINE_*` environment variables override it). It prints `listening on ADDR` once it accepts connections, like `echo.rs`,
//! and uses the same runtime (Tokio's multi-threaded one, one worker per available core).

use std::io::Write as _;

use wsengine::{AppBody, AppMessage, Config, Engine, Envelope, handler_fn};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Error> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9002".to_owned());
    // Defaults, overridable with WSENGINE_* environment variables (e.g. WSENGINE_WRITE_BUFFER_SIZE).
    let config = Config { listen: addr.parse()?, ..Config::load(None)? };
    let echo = handler_fn(|message: AppMessage| async move {
        match message.body {
            AppBody::Message(m) => Ok(vec![Envelope::new("echo_reply", m.p().cloned().unwrap_or_default())]),
            AppBody::RawText(_) | AppBody::RawBinary(_) => Ok(vec![]),
        }
    });
    let engine = Engine::builder(config).handler(echo).build()?;
    let listener = tokio::net::TcpListener::bind(engine.config().listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    engine.serve(listener).await?;
    Ok(())
}
