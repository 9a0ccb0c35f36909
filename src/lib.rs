//! wsengine: a real-time WebSocket engine speaking WSE protocol v1, built as a tower
//! middleware stack.
//!
//! The facade puts the pieces together: [`Config`] (TOML file + `WSENGINE_*` environment
//! variables), the [`Engine`] that assembles every connection's inbound and outbound message
//! stacks in one fixed order, the HTTP surface (`/wse`, `/api/*`, `/health`), and a Rust
//! [`client`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use wsengine::{Config, Engine, Envelope};
//!
//! let engine = Engine::builder(Config::default()).build()?;
//! let listener = tokio::net::TcpListener::bind(engine.config().listen).await?;
//! tokio::spawn(engine.clone().serve(listener));
//! engine.publish("prices", Envelope::new("price_update", serde_json::json!({"AAPL": 187.5}))).await?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod config;
pub mod engine;
pub mod http;
#[cfg(feature = "tls")]
pub mod tls;

pub use config::Config;
pub use engine::{Engine, EngineBuilder, Refused, SendError, Target};
pub use wsengine_core as core;
pub use wsengine_core::codes::CloseCode;
pub use wsengine_core::{Envelope, WireFormat};
pub use wsengine_layers as layers;
pub use wsengine_services as services;
#[cfg(feature = "filters")]
pub use wsengine_services::filter::{Filter, FilterError};
pub use wsengine_services::handler::{AppBody, AppMessage, Handler, SignatureStatus, SnapshotProvider, handler_fn};
#[cfg(feature = "presence")]
pub use wsengine_services::presence::{PresenceError, PresenceMember, PresenceStats};
pub use wsengine_services::websocket::Admission;

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
