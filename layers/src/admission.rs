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
//!   are not rate-limited. Behind a load balancer, [`AdmissionLayer::trusted_proxies`] names
//!   the proxies whose `X-Forwarded-For` is believed: the key is then the rightmost address in
//!   that header that is not itself a trusted proxy (anyone can prepend forged entries, but
//!   only the trusted proxies append). A peer that is not trusted is keyed by its own address,
//!   whatever headers it sends.
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
//! let behind_proxies = layer.trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()]);
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

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
///
/// ```
/// use wsengine_layers::admission::IpNetwork;
///
/// let network: IpNetwork = "10.1.0.0/16".parse().unwrap();
/// assert!(network.contains("10.1.2.3".parse().unwrap()));
/// assert!(network.contains("::ffff:10.1.2.3".parse().unwrap()));
/// assert!(!network.contains("10.2.0.1".parse().unwrap()));
/// assert!("10.0.0.0/33".parse::<IpNetwork>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    address: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Whether `ip` is in the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.trim().split_once('/').map_or((text.trim(), None), |(a, p)| (a, Some(p)));
        let address = address.parse::<IpAddr>().map_err(|_| format!("{text:?} is not an IP address or network"))?;
        let address = address.to_canonical();
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be a number from 0 to {bits}"))?,
        };
        Ok(IpNetwork { address, prefix })
    }
}

struct Limits {
    origins: Vec<OriginRule>,
    rate: Option<(IpLimiter, NonZeroU32, NonZeroU32)>,
    /// Proxies whose `X-Forwarded-For` names the client.
    proxies: Vec<IpNetwork>,
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
        let limits = Limits { origins: Vec::new(), rate: None, proxies: Vec::new(), checks: AtomicU64::new(0) };
        AdmissionLayer { limits: Arc::new(limits) }
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

    /// Keys the per-IP connect rate of requests from these proxies (load balancers, reverse
    /// proxies) by the client address they report in `X-Forwarded-For`; see the
    /// [module documentation](self).
    ///
    /// # Panics
    ///
    /// When called on a layer that has already been cloned.
    pub fn trusted_proxies(mut self, proxies: Vec<IpNetwork>) -> Self {
        self.limits_mut().proxies = proxies;
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
    /// The address the per-IP limit keys on: the peer's, or behind trusted proxies the
    /// rightmost `X-Forwarded-For` entry that is not a trusted proxy. An unreadable entry
    /// stops the walk at the last trusted hop.
    fn client_ip<B>(&self, request: &Request<B>) -> Option<IpAddr> {
        let mut ip = request.extensions().get::<SocketAddr>()?.ip().to_canonical();
        let trusted = |ip: IpAddr| self.proxies.iter().any(|network| network.contains(ip));
        let mut hops = request.headers().get_all("x-forwarded-for").iter().rev();
        while trusted(ip) {
            let Some(header) = hops.next() else { break };
            let Ok(text) = header.to_str() else { break };
            for entry in text.rsplit(',') {
                let Ok(hop) = entry.trim().parse::<IpAddr>() else { return Some(ip) };
                ip = hop.to_canonical();
                if !trusted(ip) {
                    return Some(ip);
                }
            }
        }
        Some(ip)
    }

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
        if let (Some((limiter, _, _)), Some(ip)) = (&self.rate, self.client_ip(request)) {
            if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                // Forget peers whose bucket has refilled, so the table does not grow forever.
                limiter.retain_recent();
            }
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

    fn forwarded(peer: &str, forwarded_for: &[&str]) -> Request<()> {
        let mut request = request(None, Some(peer));
        for value in forwarded_for {
            request.headers_mut().append("x-forwarded-for", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn networks_parse_and_contain() {
        let net = |text: &str| text.parse::<IpNetwork>();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").unwrap().contains(ip("10.255.0.1")));
        assert!(!net("10.0.0.0/8").unwrap().contains(ip("11.0.0.1")));
        assert!(net("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        assert!(!net("0.0.0.0/0").unwrap().contains(ip("2001:db8::1")), "families never mix");
        assert!(net("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
        assert!(net("2001:db8::/32").unwrap().contains(ip("2001:db8:1::5")));
        assert!(net("::ffff:10.0.0.0/104").is_err(), "mapped networks are IPv4: prefix at most 32");
        assert!(net("::ffff:10.0.0.1").unwrap().contains(ip("10.0.0.1")));
        for bad in ["", "10.0.0.0/", "10.0.0.0/x", "10.0.0.0/33", "2001:db8::/129", "example.com", "10.0.0/8"] {
            assert!(net(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn behind_trusted_proxies_the_forwarded_client_is_limited() {
        let proxies = vec!["10.0.0.0/8".parse().unwrap(), "192.168.1.1".parse().unwrap()];
        let layer = AdmissionLayer::new().connect_rate(nz(1), nz(1)).trusted_proxies(proxies);
        let limits = &layer.limits;
        let client = |request: Request<()>| limits.client_ip(&request).map(|ip| ip.to_string());
        // The rightmost untrusted entry, across several headers and proxies.
        assert_eq!(client(forwarded("10.0.0.5:1", &["198.51.100.7"])).as_deref(), Some("198.51.100.7"));
        assert_eq!(
            client(forwarded("10.0.0.5:1", &["1.1.1.1, 198.51.100.7", "192.168.1.1"])).as_deref(),
            Some("198.51.100.7"),
            "a forged leftmost entry is ignored"
        );
        // An untrusted peer's header is not believed; a garbled entry stops at the last proxy.
        assert_eq!(client(forwarded("203.0.113.1:1", &["198.51.100.7"])).as_deref(), Some("203.0.113.1"));
        assert_eq!(client(forwarded("10.0.0.5:1", &["1.1.1.1, nonsense"])).as_deref(), Some("10.0.0.5"));
        assert_eq!(client(forwarded("10.0.0.5:1", &[])).as_deref(), Some("10.0.0.5"));

        // Two clients behind one proxy get a bucket each.
        assert_eq!(status(&layer, forwarded("10.0.0.5:1", &["198.51.100.7"])).0, 200);
        assert_eq!(status(&layer, forwarded("10.0.0.5:2", &["198.51.100.8"])).0, 200);
        assert_eq!(status(&layer, forwarded("10.0.0.6:3", &["198.51.100.7"])).0, 429);
    }
}
