//! tower layers for wsengine's per-connection message stacks.
//!
//! One module per layer, each with the same shape: a `…Layer` with `new` and consuming
//! builder methods, the service it produces, and a response future where one is needed.
//! The inbound stack, outermost first, runs error-to-frame → rate limit → decrypt → decode →
//! verify signature → … → dispatch; the outbound stack runs sign → encode → encrypt → rate
//! limit → outbound queue (the facade's `engine` module documents the exact standard order).
//!
//! ```
//! use tower::ServiceBuilder;
//! use wsengine_core::{Limits, WireFormat};
//! use wsengine_layers::{decode::DecodeLayer, error_to_frame::ErrorToFrameLayer};
//!
//! let stack = ServiceBuilder::new()
//!     .layer(ErrorToFrameLayer::new())
//!     .layer(DecodeLayer::new(Limits::default(), WireFormat::Json));
//! # let _ = stack;
//! ```

#[cfg(feature = "admission")]
pub mod admission;
#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "circuit_breaker")]
pub mod circuit_breaker;
pub mod decode;
pub mod encode;
#[cfg(feature = "encryption")]
pub mod encrypt;
pub mod error_to_frame;
#[cfg(feature = "rate_limit")]
pub mod rate_limit;
#[cfg(feature = "signing")]
pub mod sign;
