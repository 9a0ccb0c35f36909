//! tower layers for wsengine's per-connection message stacks.
//!
//! One module per layer, each with the same shape: a `…Layer` with `new` and consuming
//! builder methods, the service it produces, and a response future where one is needed.
//! The inbound stack, outermost first, is error-to-frame → decode → dispatch; the outbound
//! stack is encode → outbound queue (see ARCHITECTURE.md for the full order as more layers
//! arrive).
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

pub mod decode;
pub mod encode;
pub mod error_to_frame;
