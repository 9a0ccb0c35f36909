//! User layers inserted through `EngineBuilder` run in every connection's stacks, in the
//! documented places: inbound just outside dispatch (decoded messages), outbound outside
//! encoding (envelopes and publications).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;
use tower::{Service, ServiceExt, layer::layer_fn, service_fn};
use wsengine::client::Client;
use wsengine::services::driver::{InboundService, OutboundService};
use wsengine::services::message::{Inbound, InboundBody, Outbound, OutboundBody};
use wsengine::{AppBody, AppMessage, Envelope, handler_fn};

#[tokio::test]
async fn inbound_and_outbound_user_layers_see_messages_in_order() {
    let seen_in: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen_out: Arc<Mutex<Vec<String>>> = Arc::default();
    let (record_in, record_out) = (Arc::clone(&seen_in), Arc::clone(&seen_out));

    let inbound = layer_fn(move |inner: InboundService| {
        let record = Arc::clone(&record_in);
        let inner = Arc::new(tokio::sync::Mutex::new(inner));
        service_fn(move |inbound: Inbound| {
            if let InboundBody::Message(m) = &inbound.body {
                record.lock().unwrap().push(m.t().unwrap_or("?").to_owned());
            }
            let inner = Arc::clone(&inner);
            async move { inner.lock().await.ready().await?.call(inbound).await }
        })
    });
    let outbound = layer_fn(move |inner: OutboundService| {
        let record = Arc::clone(&record_out);
        let inner = Arc::new(tokio::sync::Mutex::new(inner));
        service_fn(move |outbound: Outbound| {
            let described = match &outbound.body {
                OutboundBody::Envelope(e) => format!("envelope:{}", e.t),
                OutboundBody::Publication(p) => format!("publication:{}", p.message_type().unwrap_or("?")),
                OutboundBody::Frame(_) => "frame".to_owned(),
            };
            record.lock().unwrap().push(described);
            let inner = Arc::clone(&inner);
            async move { inner.lock().await.ready().await?.call(outbound).await }
        })
    });
    let echo = handler_fn(|message: AppMessage| async move {
        let AppBody::Message(m) = message.body else { return Ok(vec![]) };
        Ok(vec![Envelope::new("chat_echo", m.p().cloned().unwrap_or_default())])
    });
    let server = start_with(|_| {}, |b| b.handler(echo).inbound_layer(inbound).outbound_layer(outbound)).await;

    let mut client = Client::connect(&server.url()).await.unwrap();
    client.subscribe(&["room"]).await.unwrap();
    client.send("chat_message", json!({"text": "hi"})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "chat_echo");
    server.engine.publish("room", Envelope::new("chat_line", json!({}))).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["t"], "chat_line");

    assert_eq!(*seen_in.lock().unwrap(), ["subscription_update", "chat_message"]);
    assert_eq!(
        *seen_out.lock().unwrap(),
        ["envelope:server_ready", "envelope:subscription_update", "envelope:chat_echo", "publication:chat_line"]
    );
    server.stop().await;
}
