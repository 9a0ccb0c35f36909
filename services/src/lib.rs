//! wsengine's terminal services: the WebSocket upgrade and connection driver, the bus,
//! dispatch of system messages, and the outbound queue.
//!
//! The message stacks of a connection end in two services from this crate: [`dispatch::Dispatch`]
//! (inbound) and [`queue::OutboundQueue`] (outbound). The layers of `wsengine-layers` wrap them;
//! the facade crate `wsengine` assembles both from configuration.
//!
//! ```
//! use wsengine_services::bus::{Bus, MemoryBus};
//! let bus = MemoryBus::new();
//! assert_eq!(bus.subscription_count(), 0);
//! ```

pub mod acl;
pub mod bus;
pub mod connection;
pub mod dispatch;
pub mod dlq;
pub mod driver;
#[cfg(feature = "filters")]
pub mod filter;
pub mod handler;
pub mod message;
#[cfg(feature = "presence")]
pub mod presence;
pub mod publication;
pub mod queue;
pub mod recovery;
pub mod websocket;

pub use tungstenite;
