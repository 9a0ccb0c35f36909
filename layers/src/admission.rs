//! Admission control of WebSocket upgrades before they are answered (PROTOCOL.md §2.1, §2.6).
//!
//! [`AdmissionLayer`] wraps any `Service<http::Request<B>>` and refuses, with an HTTP status
//! and without touching any other connection:
//!
//! - an upgrade whose `Origin` is not on the allow-list, when one is set: **403**. Entries are
//!   exact origins (`https://app.example.com`, compared case-insensitively) or wildcard
//!   subdomain patterns (`https://*.example.com`, which matches `https://a.example.com` and
//!   `https://a.b.example.com` but not `https://example.com`). A request without an `Origin`
//!   header is let through: browsers always send one, and any other client can send any value
//!   it likes, so refusing a missing header would only lock out non-browser clients (the
//!   Python client sends none);
//! - a peer IP that opens new connections faster than the per-IP rate (a token bucket of
//!   `burst` tokens refilled at `per_second`, keyed by the peer address the server put into the
//!   request extensions as a [`SocketAddr`]): **429** with `Retry-After` in whole seconds.
//!   Requests without a peer address (mounted in an application that does not provide one)
//!   are not rate-limited.
//!
//! The other admission checks live elsewhere: the connection limit (503) in the upgrade service,
//! the pending-handshake cap, the handshake timeout and the header size limit in the engine's
//! accept loop.
//!
//! ```
//! use std::num::NonZeroU32;
//! use wsengine_layers::admission::AdmissionLayer;
//!
//! let layer = AdmissionLayer::new()
//!     .allowed_origins(["https://app.example.com", "https://*.example.org"])
//!     .connect_rate(NonZeroU32::new(5).unwrap(), NonZeroU32::new(20).unwrap());
//! assert!(layer.origin_allowed("https://app.example.com"));
//! assert!(layer.origin_allowed("https://eu.example.org"));
//! assert!(!layer.origin_allowed("https://evil.example.com"));
//! // ServiceBuilder::new().layer(layer).service(engine.websocket_service())
//! ```

use std::fmt;
use std::future::{Ready, ready};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use http::{Request, Response, StatusCode, header};
use tower::{Layer, Service};

/// Checks between two sweeps of idle entries out of the per-IP table.
const SWEEP_EVERY: u64 = 1024;

type IpLimiter = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock>;

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginRule {
    /// The whole origin, lower-cased.
    Exact(String),
    /// `scheme://*.suffix`: the scheme and the `.suffix` (host and optional port), lower-cased.
    Subdomains { scheme: String, suffix: String },
}

impl OriginRule {
    fn parse(entry: &str) -> Self {
        let entry = entry.trim().to_ascii_lowercase();
        match entry.split_once("://*.") {
            Some((scheme, rest)) if !rest.is_empty() => {
                OriginRule::Subdomains { scheme: scheme.to_owned(), suffix: format!(".{rest}") }
            }
            _ => OriginRule::Exact(entry),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginRule::Exact(exact) => exact.eq_ignore_ascii_case(origin),
            OriginRule::Subdomains { scheme, suffix } => {
                let origin = origin.to_ascii_lowercase();
                let Some((given_scheme, host)) = origin.split_once("://") else { return false };
                given_scheme == scheme
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host[..host.len() - suffix.len()].contains(['/', ':'])
            }
        }
    }
}

struct Limits {
    origins: Vec<OriginRule>,
    rate: Option<(IpLimiter, NonZeroU32, NonZeroU32)>,
    checks: AtomicU64,
}

/// The admission layer; see the [module documentation](self).
#[derive(Clone)]
pub struct AdmissionLayer {
    limits: Arc<Limits>,
}

impl fmt::Debug for AdmissionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionLayer")
            .field("origins", &self.limits.origins)
            .field("connect_rate", &self.limits.rate.as_ref().map(|(_, rate, burst)| (rate.get(), burst.get())))
            .finish()
    }
}

impl Default for AdmissionLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl AdmissionLayer {
    /// A layer that admits everything until configured.
    pub fn new() -> Self {
        AdmissionLayer { limits: Arc::new(Limits { origins: Vec::new(), rate: None, checks: AtomicU64::new(0) }) }
    }

    fn limits_mut(&mut self) -> &mut Limits {
        Arc::get_mut(&mut self.limits).expect("AdmissionLayer is configured before it is cloned")
    }

    /// Refuses upgrades whose `Origin` matches none of `origins` (an empty list turns the
    /// check off).
    ///
    /// # Panics
    ///
    /// When called on a layer that has already been cloned.
    pub fn allowed_origins<I, T>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.limits_mut().origins = origins.into_iter().map(|o| OriginRule::parse(o.as_ref())).collect();
        self
    }

    /// Limits new connections per peer IP to `per_second`, with bursts of up to `burst`.
    ///
    /// # Panics
    ///
    /// When called on a layer that has already been cloned.
    pub fn connect_rate(mut self, per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        self.limits_mut().rate = Some((RateLimiter::hashmap(quota), per_second, burst));
        self
    }

    /// Whether `origin` passes the allow-list (always true without one).
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let origins = &self.limits.origins;
        origins.is_empty() || origins.iter().any(|rule| rule.matches(origin))
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission { inner, limits: Arc::clone(&self.limits) }
    }
}

/// The service [`AdmissionLayer`] produces.
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S: fmt::Debug> fmt::Debug for Admission<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission").field("inner", &self.inner).finish_non_exhaustive()
    }
}

fn refusal<ResBody: Default>(status: StatusCode, retry_after: Option<u64>) -> Response<ResBody> {
    let mut response = Response::new(ResBody::default());
    *response.status_mut() = status;
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
}

impl Limits {
    /// `Some(refusal)` when the request must not be upgraded.
    fn check<B>(&self, request: &Request<B>) -> Option<(StatusCode, Option<u64>)> {
        if !self.origins.is_empty() {
            if let Some(origin) = request.headers().get(header::ORIGIN) {
                let allowed = origin.to_str().is_ok_and(|o| self.origins.iter().any(|rule| rule.matches(o)));
                if !allowed {
                    tracing::debug!(origin = ?origin, "upgrade refused: origin not allowed");
                    return Some((StatusCode::FORBIDDEN, None));
                }
            }
        }
        if let (Some((limiter, _, _)), Some(peer)) = (&self.rate, request.extensions().get::<SocketAddr>()) {
            if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                // Forget peers whose bucket has refilled, so the table does not grow forever.
                limiter.retain_recent();
            }
            let ip = peer.ip().to_canonical();
            if let Err(not_until) = limiter.check_key(&ip) {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                tracing::debug!(%ip, "upgrade refused: per-IP connect rate exceeded");
                return Some((StatusCode::TOO_MANY_REQUESTS, Some(seconds.max(1))));
            }
        }
        None
    }
}

impl<S, B, ResBody> Service<Request<B>> for Admission<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<ResBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.limits.check(&request) {
            Some((status, retry_after)) => Either::Left(ready(Ok(refusal(status, retry_after)))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn request(origin: Option<&str>, peer: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri("/wse");
        if let Some(origin) = origin {
            builder = builder.header("origin", origin);
        }
        let mut request = builder.body(()).unwrap();
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer.parse::<SocketAddr>().unwrap());
        }
        request
    }

    fn status(layer: &AdmissionLayer, request: Request<()>) -> (u16, Option<String>) {
        let mut service = layer.layer(tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::from("upgraded")))
        }));
        let response = futures_util::FutureExt::now_or_never(service.call(request)).unwrap().unwrap();
        let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), retry)
    }

    #[test]
    fn origin_rules() {
        let layer = AdmissionLayer::new().allowed_origins(["https://App.example.com", "http://*.example.org:8080"]);
        assert!(layer.origin_allowed("https://app.example.com"));
        assert!(!layer.origin_allowed("https://app.example.com.evil.net"));
        assert!(!layer.origin_allowed("http://app.example.com"));
        assert!(layer.origin_allowed("http://a.example.org:8080"));
        assert!(layer.origin_allowed("http://a.b.example.org:8080"));
        assert!(!layer.origin_allowed("http://example.org:8080"));
        assert!(!layer.origin_allowed("http://a.example.org"));
        assert!(!layer.origin_allowed("http://x/.example.org:8080"));
        assert!(!layer.origin_allowed("null"));
        assert!(AdmissionLayer::new().origin_allowed("anything"));
    }

    #[test]
    fn refusals_carry_their_status() {
        let layer = AdmissionLayer::new().allowed_origins(["https://ok.test"]);
        assert_eq!(status(&layer, request(Some("https://ok.test"), None)).0, 200);
        assert_eq!(status(&layer, request(Some("https://bad.test"), None)).0, 403);
        assert_eq!(status(&layer, request(None, None)).0, 200, "no Origin header: not a browser");

        let layer = AdmissionLayer::new().connect_rate(nz(1), nz(2));
        assert_eq!(status(&layer, request(None, Some("10.0.0.1:1000"))).0, 200);
        assert_eq!(status(&layer, request(None, Some("10.0.0.1:1001"))).0, 200);
        assert_eq!(status(&layer, request(None, Some("10.0.0.1:1002"))), (429, Some("1".into())));
        // Another IP has its own bucket; the IPv4-mapped form of the first IP shares its bucket.
        assert_eq!(status(&layer, request(None, Some("10.0.0.2:1000"))).0, 200);
        assert_eq!(status(&layer, request(None, Some("[::ffff:10.0.0.1]:1000"))).0, 429);
        assert_eq!(status(&layer, request(None, None)).0, 200, "no peer address: not limited");
    }
}
