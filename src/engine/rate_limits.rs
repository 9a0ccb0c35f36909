//! Rate limiting in the standard stacks (PROTOCOL.md §11): the inbound limiter (per
//! connection, plus the per-user bucket shared by an authenticated user's connections) and the
//! outbound event limiter, built from [`Config`].

use std::sync::Arc;

use wsengine_services::connection::Connection;

use crate::config::Config;

/// The rate-limit part of the standard stacks, shared by every connection.
#[derive(Debug, Clone, Default)]
pub(super) struct RateLimits {
    #[cfg(feature = "rate_limit")]
    layers: Option<Layers>,
}

#[cfg(feature = "rate_limit")]
#[derive(Debug, Clone)]
struct Layers {
    inbound: wsengine_layers::rate_limit::InboundRateLimitLayer,
    outbound: wsengine_layers::rate_limit::OutboundRateLimitLayer,
}

impl RateLimits {
    /// The limits of a validated configuration.
    pub(super) fn from_config(config: &Config) -> Self {
        let _ = config;
        #[cfg(feature = "rate_limit")]
        {
            use wsengine_layers::rate_limit::{InboundRateLimitLayer, OutboundRateLimitLayer, Rate, UserRateLimiter};
            // Validation guarantees non-zero values; a zero that slipped through leaves that
            // limit off rather than panicking.
            let inbound = Rate::new(config.inbound_rate_capacity, config.inbound_rate_refill);
            let outbound = Rate::new(config.outbound_rate_capacity, config.outbound_rate_refill);
            let users = Rate::new(config.user_rate_capacity, config.user_rate_refill).map(UserRateLimiter::new);
            let layers = inbound.zip(outbound).map(|(inbound, outbound)| {
                let mut inbound =
                    InboundRateLimitLayer::new(inbound).close_after_windows(config.rate_limit_close_windows);
                if let Some(users) = users {
                    inbound = inbound.per_user(users);
                }
                Layers { inbound, outbound: OutboundRateLimitLayer::new(outbound) }
            });
            RateLimits { layers }
        }
        #[cfg(not(feature = "rate_limit"))]
        RateLimits {}
    }

    /// The inbound limiter for `connection`, placed right inside error-to-frame.
    #[cfg(feature = "rate_limit")]
    pub(super) fn inbound(
        &self,
        connection: &Arc<Connection>,
    ) -> Option<wsengine_layers::rate_limit::InboundRateLimitLayer> {
        Some(self.layers.as_ref()?.inbound.clone().connection(connection))
    }

    /// Without the `rate_limit` feature there is no limiter.
    #[cfg(not(feature = "rate_limit"))]
    pub(super) fn inbound(&self, connection: &Arc<Connection>) -> Option<tower::layer::util::Identity> {
        let _ = connection;
        None
    }

    /// The outbound event limiter for `connection`, placed just below the user outbound layers.
    #[cfg(feature = "rate_limit")]
    pub(super) fn outbound(
        &self,
        connection: &Arc<Connection>,
    ) -> Option<wsengine_layers::rate_limit::OutboundRateLimitLayer> {
        Some(self.layers.as_ref()?.outbound.clone().connection(connection))
    }

    /// Without the `rate_limit` feature there is no limiter.
    #[cfg(not(feature = "rate_limit"))]
    pub(super) fn outbound(&self, connection: &Arc<Connection>) -> Option<tower::layer::util::Identity> {
        let _ = connection;
        None
    }

    /// Inbound frames and outbound events `connection` lost to rate limiting so far.
    pub(super) fn drops(connection: &Connection) -> (u64, u64) {
        #[cfg(feature = "rate_limit")]
        {
            let drops = connection.shared::<wsengine_layers::rate_limit::RateLimitDrops>();
            (drops.inbound(), drops.outbound())
        }
        #[cfg(not(feature = "rate_limit"))]
        {
            let _ = connection;
            (0, 0)
        }
    }
}
