//! Assembling a connection's message stacks by hand with `tower::ServiceBuilder`.
//!
//! `Engine::builder(..).stacks(..)` replaces the standard assembly with your own. This one
//! rebuilds the standard order (error-to-frame → decode → dispatch; encode → queue) and adds
//! tower's `Timeout` around dispatch, showing that a stack built by hand has the same shape
//! as the one built from configuration.
//!
//! ```text
//! cargo run --example hand_built_stack -- 127.0.0.1:5006
//! ```

use std::sync::Arc;
use std::time::Duration;

use tower::util::BoxService;
use tower::{ServiceBuilder, ServiceExt};
use wsengine::core::{Limits, WireFormat};
use wsengine::layers::{decode::DecodeLayer, encode::EncodeLayer, error_to_frame::ErrorToFrameLayer};
use wsengine::services::connection::Connection;
use wsengine::services::dispatch::Dispatch;
use wsengine::services::driver::{InboundService, OutboundService};
use wsengine::services::queue::OutboundQueue;
use wsengine::services::websocket::StackBuilder;
use wsengine::{Config, Engine};

/// The standard stacks plus a 5 s timeout on every inbound message.
#[derive(Debug)]
struct MyStacks;

impl StackBuilder for MyStacks {
    fn inbound(&self, connection: &Arc<Connection>, dispatch: Dispatch) -> InboundService {
        let format: WireFormat = connection.format();
        BoxService::new(
            ServiceBuilder::new()
                .layer(ErrorToFrameLayer::new())
                .layer(DecodeLayer::new(Limits::default(), format))
                // Any tower layer works here; a timed-out message becomes a SERVER_ERROR frame.
                .timeout(Duration::from_secs(5))
                .service(dispatch)
                .map_err(Into::into),
        )
    }

    fn outbound(&self, connection: &Arc<Connection>, queue: OutboundQueue) -> OutboundService {
        BoxService::new(
            ServiceBuilder::new().layer(EncodeLayer::new(connection.format()).compression(1024, 1)).service(queue),
        )
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:5006".into());
    let engine = Engine::builder(Config::default()).stacks(MyStacks).build()?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    engine.serve(listener).await?;
    Ok(())
}
