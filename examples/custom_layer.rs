//! Inserting your own `tower::Layer` into the engine's message stacks.
//!
//! Two small layers: an inbound one that rewrites `chat_message` payloads (here: masks a
//! banned word) before the application handler sees them, and an outbound one that counts
//! every message the engine sends. Both are ordinary tower layers over the engine's
//! `Inbound`/`Outbound` request types.
//!
//! ```text
//! cargo run --example custom_layer -- 127.0.0.1:5006
//! # then, with any WebSocket client (e.g. `python3 -m websockets ws://127.0.0.1:5006/wse`):
//! {"t":"chat_message","p":{"text":"what a darn shame"}}
//! # the reply is {"c":"U","t":"chat_echo",...,"p":{"text":"what a **** shame"},...}
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use serde_json::Value;
use tower::{Layer, Service};
use wsengine::services::message::{BoxError, Inbound, InboundBody, Outbound, Reply};
use wsengine::{AppBody, AppMessage, Config, Engine, Envelope, handler_fn};

/// Masks `word` in the `text` of every inbound `chat_message`.
#[derive(Debug, Clone)]
struct MaskWordLayer {
    word: Arc<str>,
}

impl MaskWordLayer {
    fn new(word: &str) -> Self {
        MaskWordLayer { word: word.into() }
    }
}

impl<S> Layer<S> for MaskWordLayer {
    type Service = MaskWord<S>;

    fn layer(&self, inner: S) -> MaskWord<S> {
        MaskWord { inner, word: Arc::clone(&self.word) }
    }
}

#[derive(Debug, Clone)]
struct MaskWord<S> {
    inner: S,
    word: Arc<str>,
}

impl<S> Service<Inbound> for MaskWord<S>
where
    S: Service<Inbound, Response = Reply, Error = BoxError>,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut inbound: Inbound) -> S::Future {
        // User inbound layers sit just outside dispatch, so messages arrive decoded.
        if let InboundBody::Message(message) = &inbound.body {
            if message.t() == Some("chat_message") {
                let mut fields = message.clone().into_fields();
                if let Some(Value::String(text)) = fields.get_mut("p").and_then(|p| p.get_mut("text")) {
                    *text = text.replace(&*self.word, &"*".repeat(self.word.len()));
                }
                inbound.body = InboundBody::Message(wsengine::core::InboundMessage::from_map(fields));
            }
        }
        self.inner.call(inbound)
    }
}

/// Counts every outbound message.
#[derive(Debug, Clone, Default)]
struct CountLayer {
    sent: Arc<AtomicU64>,
}

impl<S> Layer<S> for CountLayer {
    type Service = Count<S>;

    fn layer(&self, inner: S) -> Count<S> {
        Count { inner, sent: Arc::clone(&self.sent) }
    }
}

#[derive(Debug, Clone)]
struct Count<S> {
    inner: S,
    sent: Arc<AtomicU64>,
}

impl<S: Service<Outbound>> Service<Outbound> for Count<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, outbound: Outbound) -> S::Future {
        let total = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(t) = outbound.message_type() {
            println!("outbound #{total}: {t}");
        }
        self.inner.call(outbound)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:5006".into());
    let echo = handler_fn(|message: AppMessage| async move {
        let AppBody::Message(m) = message.body else { return Ok(vec![]) };
        Ok(vec![Envelope::new("chat_echo", m.p().cloned().unwrap_or_default())])
    });
    let engine = Engine::builder(Config::default())
        .handler(echo)
        .inbound_layer(MaskWordLayer::new("darn"))
        .outbound_layer(CountLayer::default())
        .build()?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    engine.serve(listener).await?;
    Ok(())
}
