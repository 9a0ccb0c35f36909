//! Engine configuration: one flat [`Config`], built from defaults, then an optional TOML file, then `WSENGINE_*` environment variables, and validated before use.
//!
//! ```
//! use std::time::Duration;
//! use wsengine::config::Config;
//!
//! let file = r#"
//!     listen = "0.0.0.0:8080"
//!     ping_interval = "10s"
//! "#;
//! let env = [("WSENGINE_MAX_CONNECTIONS".to_string(), "5000".to_string())];
//! let config = Config::from_sources(Some(file), env)?;
//!
//! assert_eq!(config.listen.port(), 8080);
//! assert_eq!(config.ping_interval, Duration::from_secs(10));
//! assert_eq!(config.max_connections, 5000);
//! assert_eq!(config.idle_timeout, Duration::from_secs(60)); // default
//! # Ok::<(), wsengine::config::ConfigError>(())
//! ```
//!
//! # Sources and precedence
//!
//! Every key has a default (documented on its field of [`Config`]). A TOML file may set any key
//! at the top level; an unknown key in the file is an error that names it. Then every key can be
//! overridden by an environment variable named [`ENV_PREFIX`] followed by the upper-cased key,
//! e.g. `WSENGINE_PING_INTERVAL=10s` or `WSENGINE_API_KEY=secret`. Environment variables that
//! start with the prefix but name no key are ignored. The result is then checked by
//! [`Config::validate`].
//!
//! An environment value is read as a TOML value when it is one that suits the key (`10`,
//! `true`, `1.5`, `"quoted"`, `[1, 2]`), and otherwise as a plain string, so
//! `WSENGINE_LISTEN=0.0.0.0:5006`, `WSENGINE_LOG=info,wsengine=debug` and
//! `WSENGINE_API_KEY=1234` all work without quotes.
//!
//! # Durations
//!
//! Duration keys accept a number of seconds (`25`, `1.5`) or a string with a unit: `"250ms"`,
//! `"25s"`, `"1.5s"`, `"2m"`, `"1h"`. They are printed as `"25s"` or `"250ms"`.
//!
//! # Adding a key
//!
//! Add a documented field to [`Config`] (with `#[serde(with = "duration_serde")]` for a
//! [`Duration`]), its default to `Default for Config`, and a rule to [`Config::validate`] if
//! it needs one. File loading, the environment override, `Debug` and
//! [`Config::to_toml_string`] pick the key up on their own.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// Prefix of the environment variables that override configuration keys
/// (`WSENGINE_` + upper-cased key).
pub const ENV_PREFIX: &str = "WSENGINE_";

/// Shown instead of the API key by `Debug` and [`Config::to_toml_string`].
const REDACTED: &str = "<redacted>";

/// Smallest accepted `max_message_size`.
const MIN_MESSAGE_SIZE: usize = 1024;
/// Largest accepted `max_message_size` (64 MiB).
const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// Largest accepted `ping_interval` (PROTOCOL.md §10.1).
const MAX_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Smallest accepted `max_header_size` (hyper's minimum read buffer).
const MIN_HEADER_SIZE: usize = 8192;
/// Shortest accepted HS256 secret (PROTOCOL.md §2.4).
const MIN_JWT_SECRET_LEN: usize = 32;
/// Smallest accepted `read_buffer_size`.
const MIN_READ_BUFFER_SIZE: usize = 256;

/// The engine's configuration.
///
/// Build it with [`Config::load`], [`Config::from_sources`], [`Config::from_toml_str`] or
/// [`Config::default`]; the module documentation describes the sources. The fields are public
/// so that Rust users can also fill it in by hand; call [`Config::validate`] afterwards.
///
/// `Debug` and [`Config::to_toml_string`] never show the API key or the JWT secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP/WebSocket listener binds to. Default `127.0.0.1:5006`.
    pub listen: SocketAddr,

    /// The WebSocket endpoint's path, as announced to users. Must start with `/`. Default
    /// `"/wse"`. The standalone server accepts upgrades on any path, as PROTOCOL.md §2.1
    /// recommends, so clients configured with another path keep working.
    pub path: String,

    /// Key that guards the HTTP API. Default: none, and the HTTP API is unguarded. When set it
    /// must not be empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,

    /// A second key the HTTP API accepts while callers move to a new `api_key` (rotation).
    /// Needs `api_key`; must not be empty. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_previous_key: Option<String>,

    /// Interval between server `ping` frames on every connection. Must be greater than zero,
    /// shorter than `idle_timeout` and at most 30 s. Default 25 s.
    #[serde(with = "duration_serde")]
    pub ping_interval: Duration,

    /// A connection that sends no data frame for this long is closed with code 4408.
    /// Must be greater than zero. Default 60 s.
    #[serde(with = "duration_serde")]
    pub idle_timeout: Duration,

    /// Largest inbound message, in bytes, after reassembly and after inflating a compressed
    /// frame; larger messages close the connection with 1009. Accepted range 1024 to 64 MiB.
    /// Default 1,048,576 (1 MiB). The official clients never need more, since they drop
    /// anything above 1 MiB themselves; larger values are only useful for custom clients.
    pub max_message_size: usize,

    /// Maximum number of registered connections; further upgrades are refused with HTTP 503.
    /// Must be greater than zero. Default 100,000.
    pub max_connections: usize,

    /// A client must send its complete HTTP request head (the upgrade request) within this
    /// time after TCP accept, or the connection is dropped (slowloris protection). Must be
    /// greater than zero. Default 10 s.
    #[serde(with = "duration_serde")]
    pub handshake_timeout: Duration,

    /// Accepted TCP connections whose HTTP request has not been answered yet (TLS handshake,
    /// request head, upgrade). Beyond this, new connections get `503` with `Retry-After: 1`
    /// and are closed at once. Must be greater than zero. Default 512 (PROTOCOL.md §2.6).
    pub max_pending_handshakes: usize,

    /// Largest HTTP request head (request line + headers) in bytes; a larger one is answered
    /// with `431 Request Header Fields Too Large` and the connection is closed. At least 8192.
    /// Default 65,536 (room for a maximal 8 KiB JWT sent both as cookie and as Bearer header).
    pub max_header_size: usize,

    /// Kernel send buffer (SO_SNDBUF) of every accepted socket, in bytes; 0 leaves the
    /// kernel's default and its autotuning (on Linux up to `net.ipv4.tcp_wmem`'s maximum,
    /// often 4 MiB per socket). A cap bounds what a stalled client can hold in kernel memory
    /// (the outbound queue then fills and the slow-consumer rules of PROTOCOL.md §10.3 apply
    /// sooner), at the price of throughput on long fat links. 0 or 4096 to 67,108,864.
    /// Default 0.
    pub socket_send_buffer: usize,

    /// New WebSocket upgrades allowed per second from one peer IP; beyond the burst they get
    /// `429` with `Retry-After`. 0 turns the check off. Default 0 (off: clients behind one
    /// NAT or proxy share an IP; set it when clients connect directly).
    pub connect_rate_per_ip: u32,

    /// Upgrades one peer IP may open at once before `connect_rate_per_ip` applies. At least 1.
    /// Default 10.
    pub connect_burst_per_ip: u32,

    /// Proxies (load balancers) in front of the engine, as addresses or CIDR networks, e.g.
    /// `["10.0.0.0/8"]`. For requests from them, the per-IP connect rate keys on the client
    /// address they report: the rightmost `X-Forwarded-For` entry that is not a trusted proxy.
    /// Other peers are keyed by their own address whatever they send. Default empty.
    pub trusted_proxies: Vec<String>,

    /// Origins allowed to open WebSocket connections, e.g. `["https://app.example.com",
    /// "https://*.example.com"]` (`*.` = any subdomain). An upgrade with an `Origin` header
    /// not on the list gets `403`; a request without `Origin` (not a browser) is let through.
    /// Default empty: no Origin check. Recommended with cookie authentication.
    pub allowed_origins: Vec<String>,

    /// JWT algorithm: `"HS256"`, `"RS256"` or `"ES256"`; tokens with any other `alg` (and
    /// `none`) are refused. Default `"HS256"`.
    pub jwt_algorithm: String,

    /// HS256 shared secret (at least 32 bytes). Setting it (or `jwt_public_key`) turns on JWT
    /// authentication. Default: none. Never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,

    /// RS256/ES256 public key: a path to a PEM file, or the PEM text itself. Setting it turns
    /// on JWT authentication. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key: Option<String>,

    /// The previous HS256 secret, still accepted during a key rotation. Default: none. Never
    /// printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_previous_secret: Option<String>,

    /// The previous RS256/ES256 public key (path or PEM), still accepted during a key
    /// rotation. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_previous_public_key: Option<String>,

    /// Required `iss` claim; empty = not checked. Default empty.
    pub jwt_issuer: String,

    /// Required `aud` claim (a token's `aud` string or array must contain it); empty = not
    /// checked. Default empty.
    pub jwt_audience: String,

    /// Required `kid` header (not enforced for the previous key); empty = not checked.
    /// Default empty.
    pub jwt_key_id: String,

    /// Clock leeway for `exp` and `nbf`, whole seconds. Default 30 s.
    #[serde(with = "duration_serde")]
    pub jwt_leeway: Duration,

    /// Cookie that carries the JWT (checked before `Authorization: Bearer`). Must not be
    /// empty. Default `"access_token"`.
    pub jwt_cookie: String,

    /// Whether connections without credentials are let in as anonymous users (user id =
    /// connection id). When unset: `true` if no JWT key is configured (the one-command server
    /// needs no credentials), `false` once `jwt_secret` or `jwt_public_key` is set. With a JWT
    /// key and `allow_anonymous = true`, a request without any token is anonymous but a
    /// request with an invalid token is still refused. Without a key, `false` refuses every
    /// connection with `AUTH_REQUIRED` (unless the application installs a custom auth hook).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,

    /// Refuse failed authentication with HTTP 401 before the upgrade instead of the protocol's
    /// `AUTH_*` error frame and close 4401. Incompatible with the TypeScript client's token
    /// refresh, which only runs on 4401 (PROTOCOL.md §2.5). Default false.
    pub reject_before_upgrade: bool,

    /// Close a connection when its credentials expire (a JWT's `exp` plus `jwt_leeway`, or the
    /// expiry a custom auth hook grants): `AUTH_FAILED` "Token expired" and close 4401, at the
    /// first heartbeat tick (`ping_interval`) after that moment. The TypeScript client then
    /// refreshes its token (with a refresh hook) and reconnects; the Python client stops.
    /// Default false: a session outlives its token.
    pub close_on_token_expiry: bool,

    /// PEM file with the TLS certificate chain. Together with `tls_key` the listener speaks
    /// only TLS (`https://` and `wss://` on the same port). Default: none (plain TCP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,

    /// PEM file with the TLS private key (PKCS#8, PKCS#1 or SEC1). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,

    /// Maximum number of topics one connection may subscribe to; 0 means unlimited.
    /// Default 0.
    pub max_subscriptions_per_connection: usize,

    /// Presence (PROTOCOL.md §6.3.6): track the users of a topic whose subscription carried
    /// `p.presence` (or who got data from `Engine::set_presence`) and send `presence_join` /
    /// `presence_update` / `presence_leave` to its subscribers. When off, `p.presence` is
    /// ignored. Default false. Needs the `presence` cargo feature (on by default).
    pub presence_enabled: bool,

    /// Presence members (distinct users) per topic; 0 means unlimited. At the limit a new
    /// user's subscription still succeeds but is not tracked. Default 0.
    pub presence_max_members: usize,

    /// Per-connection outbound byte budget. A message that does not fit evicts queued
    /// messages of lower priority (lowest first, oldest first) or is dropped; CRITICAL
    /// messages are never dropped. Must be greater than zero. Default 16,777,216 (16 MiB).
    pub outbound_queue_bytes: usize,

    /// Per-connection cap on the number of queued outbound messages, enforced like
    /// `outbound_queue_bytes`. Must be greater than zero. Default 4096.
    pub outbound_queue_messages: usize,

    /// A connection whose oldest queued CRITICAL message (protocol frames, `pri` 10) has waited
    /// this long is closed with 1013 `Slow consumer`. Must be greater than zero. Default 10 s.
    #[serde(with = "duration_serde")]
    pub critical_grace: Duration,

    /// Inbound rate limit per connection (PROTOCOL.md §11.2): bucket capacity in frames. Every
    /// inbound data frame costs one token (a `batch` one per element, `ping` too); a frame
    /// that finds none is dropped and the client gets `RATE_LIMITED`. At least 1. Default 2000.
    pub inbound_rate_capacity: u32,

    /// Inbound rate limit per connection: tokens refilled per second. At least 1. Default 200.
    pub inbound_rate_refill: u32,

    /// Inbound rate limit per user, shared by all connections of an authenticated user:
    /// bucket capacity. At least 1 when `user_rate_refill` is on. Default 20000 (ten
    /// connections' worth).
    pub user_rate_capacity: u32,

    /// Inbound rate limit per user: tokens refilled per second; 0 turns the per-user limit
    /// off. Default 2000.
    pub user_rate_refill: u32,

    /// Outbound rate limit per connection for application events (direct sends, handler
    /// replies; PROTOCOL.md §11.1): bucket capacity. Publications, broadcasts, replays,
    /// snapshots and protocol frames are not limited. At least 1. Default 100000.
    pub outbound_rate_capacity: u32,

    /// Outbound event rate limit: tokens refilled per second. At least 1. Default 10000.
    pub outbound_rate_refill: u32,

    /// A connection whose inbound frames were dropped in each of this many consecutive
    /// one-second windows is closed with 4429 `Rate limit exceeded`; 0 never closes.
    /// Default 10.
    pub rate_limit_close_windows: u32,

    /// `C:` zlib compression of outbound data frames (PROTOCOL.md §3.2). Default `true` when
    /// built with the `compression` cargo feature, `false` without it; `true` without the
    /// feature fails validation. `server_ready` / `server_hello` announce it as
    /// `features.compression`. Inbound `C:` frames are accepted whenever the feature is on.
    pub compression: bool,

    /// Outbound messages strictly larger than this many bytes are compressed. Default 1024.
    pub compression_threshold: usize,

    /// zlib compression level, 1 (fastest) to 9 (smallest). Default 1.
    pub compression_level: u32,

    /// Close code sent to every connection when the engine drains. Must be a code an endpoint
    /// may send: 1000, 1001, 1008, 1011, 1013 or 3000 to 4999. Default 4300.
    pub drain_close_code: u16,

    /// How long a drain may take; connections still open afterwards are dropped. Default 30 s.
    #[serde(with = "duration_serde")]
    pub drain_timeout: Duration,

    /// On shutdown, how long close handshakes may take before connections are dropped.
    /// Default 2 s.
    #[serde(with = "duration_serde")]
    pub shutdown_grace: Duration,

    /// Per-connection WebSocket read buffer, in bytes: allocated for every connection and
    /// the most read from the socket per system call (larger inbound messages still arrive,
    /// in more reads). At least 256. Default 1024, sized for the 8 KiB idle-connection budget.
    pub read_buffer_size: usize,

    /// Outbound bytes a connection gathers before writing them to the socket; the driver also
    /// writes whenever it has drained its queue, so this only batches bursts into fewer system
    /// calls. 0 writes every message at once. Default 16384. The buffer grows on demand and is
    /// not allocated on idle connections.
    pub write_buffer_size: usize,

    /// Guard the application handler, the snapshot provider and the bus publish with circuit
    /// breakers (one engine-wide breaker each). Default true. Needs the `circuit_breaker`
    /// cargo feature (on by default); without it the `circuit_breaker_*` keys have no effect.
    pub circuit_breaker: bool,

    /// Share of failed calls among the recent ones at which a breaker opens, in (0, 1].
    /// Default 0.5.
    pub circuit_breaker_failure_rate: f64,

    /// How many recent calls a breaker's sliding window holds. At least 1. Default 20.
    pub circuit_breaker_window: usize,

    /// Calls older than this leave the window. Must be greater than zero. Default 60 s.
    #[serde(with = "duration_serde")]
    pub circuit_breaker_window_duration: Duration,

    /// A breaker never opens with fewer calls than this in its window. Between 1 and
    /// `circuit_breaker_window`. Default 10.
    pub circuit_breaker_min_calls: usize,

    /// How long an open breaker fails fast before it lets probe calls through. Must be greater
    /// than zero. Default 30 s.
    #[serde(with = "duration_serde")]
    pub circuit_breaker_open_timeout: Duration,

    /// Probe calls a half-open breaker lets through; that many successes close it, one failure
    /// opens it again. At least 1. Default 3.
    pub circuit_breaker_half_open_probes: u32,

    /// Close a connection whose application messages keep failing in the handler with a final
    /// `SERVER_ERROR` and close 1011 (PROTOCOL.md §12.1), through a circuit breaker of its own.
    /// Only handler errors count, not protocol answers (`ProtocolError`s such as
    /// `INVALID_REQUEST` or `CIRCUIT_BREAKER_OPEN`); the breaker is created at the connection's
    /// first failure. Independent of `circuit_breaker`. Default true. Needs the
    /// `circuit_breaker` cargo feature.
    pub connection_breaker: bool,

    /// Share of failed handler calls among a connection's recent ones that closes it, in
    /// (0, 1]. Default 0.5.
    pub connection_breaker_failure_rate: f64,

    /// How many recent handler calls of a connection the window holds. At least 1. Default 20.
    pub connection_breaker_window: usize,

    /// Handler calls older than this leave a connection's window. Must be greater than zero.
    /// Default 60 s.
    #[serde(with = "duration_serde")]
    pub connection_breaker_window_duration: Duration,

    /// A connection is never closed with fewer handler calls than this in its window. Between
    /// 1 and `connection_breaker_window`. Default 10.
    pub connection_breaker_min_calls: usize,

    /// Dead letters kept per topic (handler failures count as one topic); the oldest is evicted
    /// first. Must be greater than zero. Default 1000.
    pub dlq_max_per_topic: usize,

    /// Dead letters kept in all; the oldest is evicted first. Must be greater than zero.
    /// Default 100,000.
    pub dlq_max_entries: usize,

    /// Dead letters older than this are dropped. Must be greater than zero. Default 7 days
    /// (`"168h"`).
    #[serde(with = "duration_serde")]
    pub dlq_ttl: Duration,

    /// Record application messages whose handler failed in the dead-letter queue (this keeps
    /// a copy of each application message while its handler runs). Default true.
    pub dlq_handler_failures: bool,

    /// Recovery (PROTOCOL.md §9): stamp every topic publication with `tp` / `e` / `o`, keep a
    /// per-topic history and answer `recover: true` subscribes from it; announced as
    /// `features.recovery`. Default false. Needs the `recovery` cargo feature (on by default).
    pub recovery_enabled: bool,

    /// Publications kept per topic, rounded up to a power of two, at least 16. At most
    /// 1,048,576. Default 128.
    pub recovery_buffer_size: usize,

    /// A topic's history without publications for this long is dropped (the next publication
    /// starts a new epoch). Must be greater than zero. Default 300 s.
    #[serde(with = "duration_serde")]
    pub recovery_ttl: Duration,

    /// Most publications one recovery may replay; further behind gets `recovered: false`.
    /// At least 1. Default 500.
    pub recovery_max_replay: usize,

    /// Bytes all topic histories may use together; beyond it whole histories are evicted,
    /// least recently published first. At least 1 MiB. Default 256 MiB.
    pub recovery_memory: usize,

    /// A publication with a caller-supplied `id` published to the same topic again within this
    /// window is delivered once (the retry gets the first publish's report); `0` turns this
    /// off. Default 60 s.
    #[serde(with = "duration_serde")]
    pub publish_dedup_window: Duration,

    /// After a successful subscribe, send the snapshot provider's events for the newly
    /// subscribed topics, then `snapshot_complete` (as for `sync_request`). Default false.
    pub snapshot_on_subscribe: bool,

    /// End-to-end encryption (PROTOCOL.md §7): `"off"`, `"optional"` (offered to clients that
    /// send a key in `client_hello`) or `"required"` (a `client_hello` without a usable key, or
    /// a plaintext application message, gets an error and close 1008; application data is
    /// never sent in plaintext). Default `"optional"` (`"off"` in a build without the
    /// `encryption` cargo feature, which every other value needs).
    pub encryption: String,

    /// Message signing (PROTOCOL.md §8): `"off"`, `"verify"` (inbound signatures are checked
    /// and reported to the handler; outbound application data is signed) or `"require"`
    /// (inbound messages other than heartbeats and `client_hello` must carry a valid
    /// signature, else `INVALID_SIGNATURE`). Default `"off"`. Needs `signing_secret` and the
    /// `signing` cargo feature (on by default) unless `"off"`.
    pub signing: String,

    /// HMAC-SHA256 shared secret for signing, at least 32 bytes. Default: none. Never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,

    /// The previous signing secret during a rotation: still accepted when verifying, never
    /// used to sign. At least 32 bytes. Default: none. Never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_previous_secret: Option<String>,

    /// How the engine writes signatures: `"base64"` or `"hex"`; both are accepted inbound.
    /// Default `"base64"`.
    pub signing_encoding: String,

    /// Sign outbound application data (events, snapshots, publications, broadcasts) when
    /// `signing` is on. Default true.
    pub sign_outbound: bool,

    /// Outbound message types to sign; empty signs every application data frame. Default empty.
    pub sign_types: Vec<String>,

    /// In `require` mode, the inbound types that must be signed; empty means every type but
    /// `ping`, `PING`, `pong`, `PONG` and `client_hello`. Default empty.
    pub signing_require_types: Vec<String>,

    /// In `verify` mode, drop messages with an invalid signature (`INVALID_SIGNATURE` error)
    /// instead of handing them over marked invalid. Default false.
    pub signing_reject_invalid: bool,

    /// A signed message's `id` may not repeat within this window for the same user. Must be
    /// greater than zero. Default 300 s.
    #[serde(with = "duration_serde")]
    pub signing_replay_window: Duration,

    /// A signed message's `ts` must be within this much of the engine's clock. Must be greater
    /// than zero. Default 300 s.
    #[serde(with = "duration_serde")]
    pub signing_max_clock_skew: Duration,

    /// `tracing` filter directive, e.g. `"info"` or `"info,wsengine=debug"`. Must not be
    /// empty. Default `"info"`.
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 5006)),
            path: "/wse".to_owned(),
            api_key: None,
            api_previous_key: None,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_message_size: 1024 * 1024,
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 512,
            max_header_size: 64 * 1024,
            socket_send_buffer: 0,
            connect_rate_per_ip: 0,
            connect_burst_per_ip: 10,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            jwt_algorithm: "HS256".to_owned(),
            jwt_secret: None,
            jwt_public_key: None,
            jwt_previous_secret: None,
            jwt_previous_public_key: None,
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwt_key_id: String::new(),
            jwt_leeway: Duration::from_secs(30),
            jwt_cookie: "access_token".to_owned(),
            allow_anonymous: None,
            reject_before_upgrade: false,
            close_on_token_expiry: false,
            tls_cert: None,
            tls_key: None,
            max_subscriptions_per_connection: 0,
            presence_enabled: false,
            presence_max_members: 0,
            outbound_queue_bytes: 16 * 1024 * 1024,
            outbound_queue_messages: 4096,
            critical_grace: Duration::from_secs(10),
            inbound_rate_capacity: 2000,
            inbound_rate_refill: 200,
            user_rate_capacity: 20_000,
            user_rate_refill: 2000,
            outbound_rate_capacity: 100_000,
            outbound_rate_refill: 10_000,
            rate_limit_close_windows: 10,
            // Off without the cargo feature, so that the default configuration stays valid.
            compression: cfg!(feature = "compression"),
            compression_threshold: 1024,
            compression_level: 1,
            drain_close_code: 4300,
            drain_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
            read_buffer_size: 1024,
            write_buffer_size: 16 * 1024,
            circuit_breaker: true,
            circuit_breaker_failure_rate: 0.5,
            circuit_breaker_window: 20,
            circuit_breaker_window_duration: Duration::from_secs(60),
            circuit_breaker_min_calls: 10,
            circuit_breaker_open_timeout: Duration::from_secs(30),
            circuit_breaker_half_open_probes: 3,
            connection_breaker: true,
            connection_breaker_failure_rate: 0.5,
            connection_breaker_window: 20,
            connection_breaker_window_duration: Duration::from_secs(60),
            connection_breaker_min_calls: 10,
            dlq_max_per_topic: 1000,
            dlq_max_entries: 100_000,
            dlq_ttl: Duration::from_secs(7 * 24 * 3600),
            dlq_handler_failures: true,
            recovery_enabled: false,
            recovery_buffer_size: 128,
            recovery_ttl: Duration::from_secs(300),
            recovery_max_replay: 500,
            recovery_memory: 256 << 20,
            publish_dedup_window: Duration::from_secs(60),
            snapshot_on_subscribe: false,
            encryption: if cfg!(feature = "encryption") { "optional" } else { "off" }.to_owned(),
            signing: "off".to_owned(),
            signing_secret: None,
            signing_previous_secret: None,
            signing_encoding: "base64".to_owned(),
            sign_outbound: true,
            sign_types: Vec::new(),
            signing_require_types: Vec::new(),
            signing_reject_invalid: false,
            signing_replay_window: Duration::from_secs(300),
            signing_max_clock_skew: Duration::from_secs(300),
            log: "info".to_owned(),
        }
    }
}

impl Config {
    /// Defaults, then the file at `path` (if any), then `WSENGINE_*` environment variables;
    /// then validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    ConfigError::general(format!("cannot read config file {}: {err}", path.display()))
                })?;
                parse_file(&text, &path.display().to_string())?
            }
            None => Table::new(),
        };
        let mut env = HashMap::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(ENV_PREFIX) {
                continue;
            }
            match value.into_string() {
                Ok(value) => {
                    env.insert(name.to_owned(), value);
                }
                Err(_) => {
                    if let Some(key) = key_of_env_var(name) {
                        return Err(ConfigError::new(key, format!("{name} is not valid UTF-8")));
                    }
                }
            }
        }
        assemble(file, &env)
    }

    /// Same as [`Config::load`], but from TOML text and an explicit list of environment
    /// variables (name, value), e.g. for tests. Entries without the `WSENGINE_` prefix or
    /// naming no key are ignored; if a name repeats, the last value wins.
    pub fn from_sources(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = match toml_text {
            Some(text) => parse_file(text, "the configuration file")?,
            None => Table::new(),
        };
        let env: HashMap<String, String> = env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
        assemble(file, &env)
    }

    /// Defaults overlaid with TOML text, validated. The environment is not consulted.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Config::from_sources(Some(text), std::iter::empty())
    }

    /// Checks the rules documented on each field; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn fail(key: &str, reason: String) -> Result<(), ConfigError> {
            Err(ConfigError::new(key, reason))
        }
        let show = duration_serde::format;

        if !self.path.starts_with('/') {
            return fail("path", format!("must start with '/', got {:?}", self.path));
        }
        for (name, key) in [("api_key", &self.api_key), ("api_previous_key", &self.api_previous_key)] {
            let Some(key) = key else { continue };
            if key.is_empty() {
                return fail(name, "must not be empty when set".to_owned());
            }
            if key == REDACTED {
                return fail(name, format!("{REDACTED:?} is the placeholder printed instead of the key, not a key"));
            }
        }
        if self.api_previous_key.is_some() && self.api_key.is_none() {
            return fail("api_previous_key", "needs api_key (the new key) to be set".to_owned());
        }
        if self.idle_timeout.is_zero() {
            return fail("idle_timeout", "must be greater than zero".to_owned());
        }
        if self.ping_interval.is_zero() {
            return fail("ping_interval", "must be greater than zero".to_owned());
        }
        if self.ping_interval >= self.idle_timeout {
            return fail(
                "ping_interval",
                format!(
                    "must be shorter than idle_timeout ({}), got {}",
                    show(self.idle_timeout),
                    show(self.ping_interval)
                ),
            );
        }
        if self.ping_interval > MAX_PING_INTERVAL {
            return fail(
                "ping_interval",
                format!("must be at most {}, got {}", show(MAX_PING_INTERVAL), show(self.ping_interval)),
            );
        }
        if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&self.max_message_size) {
            return fail(
                "max_message_size",
                format!(
                    "must be between {MIN_MESSAGE_SIZE} and {MAX_MESSAGE_SIZE} bytes, got {}",
                    self.max_message_size
                ),
            );
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("outbound_queue_bytes", self.outbound_queue_bytes),
            ("outbound_queue_messages", self.outbound_queue_messages),
        ] {
            if value == 0 {
                return fail(key, "must be greater than zero".to_owned());
            }
        }
        if self.handshake_timeout.is_zero() {
            return fail("handshake_timeout", "must be greater than zero".to_owned());
        }
        if self.critical_grace.is_zero() {
            return fail("critical_grace", "must be greater than zero".to_owned());
        }
        if self.compression && cfg!(not(feature = "compression")) {
            return fail(
                "compression",
                "needs the `compression` cargo feature; set it to false or enable the feature".to_owned(),
            );
        }
        if !(1..=9).contains(&self.compression_level) {
            return fail("compression_level", format!("must be between 1 and 9, got {}", self.compression_level));
        }
        if !is_sendable_close_code(self.drain_close_code) {
            return fail(
                "drain_close_code",
                format!(
                    "must be a close code an endpoint may send \
                     (1000, 1001, 1008, 1011, 1013 or 3000..=4999), got {}",
                    self.drain_close_code
                ),
            );
        }
        if self.read_buffer_size < MIN_READ_BUFFER_SIZE {
            return fail(
                "read_buffer_size",
                format!("must be at least {MIN_READ_BUFFER_SIZE} bytes, got {}", self.read_buffer_size),
            );
        }
        if !(self.circuit_breaker_failure_rate > 0.0 && self.circuit_breaker_failure_rate <= 1.0) {
            return fail(
                "circuit_breaker_failure_rate",
                format!("must be greater than 0 and at most 1, got {}", self.circuit_breaker_failure_rate),
            );
        }
        for (key, value) in [
            ("inbound_rate_capacity", self.inbound_rate_capacity),
            ("inbound_rate_refill", self.inbound_rate_refill),
            ("outbound_rate_capacity", self.outbound_rate_capacity),
            ("outbound_rate_refill", self.outbound_rate_refill),
        ] {
            if value == 0 {
                return fail(key, "must be at least 1 token".to_owned());
            }
        }
        if self.user_rate_refill != 0 && self.user_rate_capacity == 0 {
            return fail(
                "user_rate_capacity",
                "must be at least 1 token while user_rate_refill is on (set user_rate_refill = 0 to turn the per-user limit off)"
                    .to_owned(),
            );
        }
        if self.circuit_breaker_window == 0 {
            return fail("circuit_breaker_window", "must be at least 1 call".to_owned());
        }
        if !(1..=self.circuit_breaker_window).contains(&self.circuit_breaker_min_calls) {
            return fail(
                "circuit_breaker_min_calls",
                format!(
                    "must be between 1 and circuit_breaker_window ({}), got {}",
                    self.circuit_breaker_window, self.circuit_breaker_min_calls
                ),
            );
        }
        if self.circuit_breaker_half_open_probes == 0 {
            return fail("circuit_breaker_half_open_probes", "must be at least 1".to_owned());
        }
        if !(self.connection_breaker_failure_rate > 0.0 && self.connection_breaker_failure_rate <= 1.0) {
            return fail(
                "connection_breaker_failure_rate",
                format!("must be greater than 0 and at most 1, got {}", self.connection_breaker_failure_rate),
            );
        }
        if self.connection_breaker_window == 0 {
            return fail("connection_breaker_window", "must be at least 1 call".to_owned());
        }
        if !(1..=self.connection_breaker_window).contains(&self.connection_breaker_min_calls) {
            return fail(
                "connection_breaker_min_calls",
                format!(
                    "must be between 1 and connection_breaker_window ({}), got {}",
                    self.connection_breaker_window, self.connection_breaker_min_calls
                ),
            );
        }
        for (key, value) in [
            ("circuit_breaker_window_duration", self.circuit_breaker_window_duration),
            ("circuit_breaker_open_timeout", self.circuit_breaker_open_timeout),
            ("connection_breaker_window_duration", self.connection_breaker_window_duration),
            ("dlq_ttl", self.dlq_ttl),
        ] {
            if value.is_zero() {
                return fail(key, "must be greater than zero".to_owned());
            }
        }
        for (key, value) in [("dlq_max_per_topic", self.dlq_max_per_topic), ("dlq_max_entries", self.dlq_max_entries)] {
            if value == 0 {
                return fail(key, "must be greater than zero".to_owned());
            }
        }
        if self.log.trim().is_empty() {
            return fail("log", "must not be empty (e.g. \"info\")".to_owned());
        }
        if self.recovery_buffer_size > 1 << 20 {
            return fail("recovery_buffer_size", format!("must be at most 1048576, got {}", self.recovery_buffer_size));
        }
        if self.recovery_ttl.is_zero() {
            return fail("recovery_ttl", "must be greater than zero".to_owned());
        }
        if self.recovery_max_replay == 0 {
            return fail("recovery_max_replay", "must be at least 1".to_owned());
        }
        if self.recovery_memory < 1 << 20 {
            return fail("recovery_memory", format!("must be at least 1 MiB (1048576), got {}", self.recovery_memory));
        }
        self.validate_handshake()?;
        self.validate_message_security()?;
        Ok(())
    }

    /// Rules of the handshake-tier keys (admission, JWT, TLS).
    fn validate_handshake(&self) -> Result<(), ConfigError> {
        fn fail(key: &str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::new(key, reason))
        }
        if self.max_pending_handshakes == 0 {
            return fail("max_pending_handshakes", "must be greater than zero");
        }
        if self.max_header_size < MIN_HEADER_SIZE {
            return fail(
                "max_header_size",
                format!("must be at least {MIN_HEADER_SIZE} bytes, got {}", self.max_header_size),
            );
        }
        if self.socket_send_buffer != 0 && !(4096..=64 << 20).contains(&self.socket_send_buffer) {
            return fail(
                "socket_send_buffer",
                format!("must be 0 (kernel default) or 4096 to 67108864 bytes, got {}", self.socket_send_buffer),
            );
        }
        if self.connect_burst_per_ip == 0 {
            return fail("connect_burst_per_ip", "must be at least 1");
        }
        #[cfg(feature = "admission")]
        for proxy in &self.trusted_proxies {
            if let Err(reason) = proxy.parse::<wsengine_layers::admission::IpNetwork>() {
                return fail("trusted_proxies", reason);
            }
        }
        if let Some(origin) = self.allowed_origins.iter().find(|o| !o.contains("://")) {
            return fail(
                "allowed_origins",
                format!("{origin:?} is not an origin (expected e.g. \"https://app.example.com\")"),
            );
        }
        let algorithm = self.jwt_algorithm.to_ascii_uppercase();
        let symmetric = match algorithm.as_str() {
            "HS256" => true,
            "RS256" | "ES256" => false,
            _ => return fail("jwt_algorithm", format!("must be HS256, RS256 or ES256, got {:?}", self.jwt_algorithm)),
        };
        for (key, value) in [("jwt_secret", &self.jwt_secret), ("jwt_previous_secret", &self.jwt_previous_secret)] {
            let Some(secret) = value else { continue };
            if !symmetric {
                return fail(key, format!("is for HS256; {algorithm} verifies with jwt_public_key"));
            }
            if secret == REDACTED {
                return fail(
                    key,
                    format!("{REDACTED:?} is the placeholder printed instead of the secret, not a secret"),
                );
            }
            if secret.len() < MIN_JWT_SECRET_LEN {
                return fail(
                    key,
                    format!("an HS256 secret must be at least {MIN_JWT_SECRET_LEN} bytes, got {}", secret.len()),
                );
            }
        }
        for (key, value) in
            [("jwt_public_key", &self.jwt_public_key), ("jwt_previous_public_key", &self.jwt_previous_public_key)]
        {
            if value.is_some() && symmetric {
                return fail(key, "is for RS256 and ES256; HS256 verifies with jwt_secret");
            }
        }
        if self.jwt_previous_secret.is_some() && self.jwt_secret.is_none() {
            return fail("jwt_previous_secret", "needs jwt_secret (the current secret) as well");
        }
        if self.jwt_previous_public_key.is_some() && self.jwt_public_key.is_none() {
            return fail("jwt_previous_public_key", "needs jwt_public_key (the current key) as well");
        }
        if self.jwt_cookie.trim().is_empty() || self.jwt_cookie.contains([';', '=', ' ']) {
            return fail("jwt_cookie", format!("must be a cookie name, got {:?}", self.jwt_cookie));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            let missing = if self.tls_cert.is_none() { "tls_cert" } else { "tls_key" };
            return fail(missing, "tls_cert and tls_key must be set together");
        }
        Ok(())
    }

    /// Whether a JWT key is configured (`jwt_secret` or `jwt_public_key`), i.e. `jwt` mode.
    pub fn jwt_enabled(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }

    /// Whether connections without credentials are let in: `allow_anonymous` when set,
    /// otherwise only when no JWT key is configured.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(!self.jwt_enabled())
    }

    /// The configuration as TOML, e.g. for `--print-config`. A set API key is shown as
    /// `"<redacted>"`; an unset one is left out.
    pub fn to_toml_string(&self) -> String {
        // Every field is a string, a number or a duration (a string), so this cannot fail.
        toml::to_string(&self.redacted()).expect("Config always serializes to TOML")
    }

    /// A copy that is safe to print.
    fn redacted(&self) -> Config {
        let mut copy = self.clone();
        for key in [&mut copy.api_key, &mut copy.api_previous_key] {
            if key.is_some() {
                *key = Some(REDACTED.to_owned());
            }
        }
        for secret in [
            &mut copy.jwt_secret,
            &mut copy.jwt_previous_secret,
            &mut copy.signing_secret,
            &mut copy.signing_previous_secret,
        ] {
            if secret.is_some() {
                *secret = Some(REDACTED.to_owned());
            }
        }
        copy
    }
}

/// Smallest accepted signing secret (PROTOCOL.md §8.3).
const MIN_SIGNING_SECRET: usize = 32;

impl Config {
    /// Rules of the end-to-end encryption and signing keys.
    fn validate_message_security(&self) -> Result<(), ConfigError> {
        fn fail(key: &str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::new(key, reason))
        }
        if !["off", "optional", "required"].contains(&self.encryption.as_str()) {
            return fail(
                "encryption",
                format!("must be \"off\", \"optional\" or \"required\", got {:?}", self.encryption),
            );
        }
        if cfg!(not(feature = "recovery")) && self.recovery_enabled {
            return fail(
                "recovery_enabled",
                "needs the `recovery` cargo feature; set it to false or enable the feature",
            );
        }
        if cfg!(not(feature = "presence")) && self.presence_enabled {
            return fail(
                "presence_enabled",
                "needs the `presence` cargo feature; set it to false or enable the feature",
            );
        }
        if cfg!(not(feature = "encryption")) && self.encryption != "off" {
            return fail("encryption", "needs the `encryption` cargo feature; set it to \"off\" or enable the feature");
        }
        if !["off", "verify", "require"].contains(&self.signing.as_str()) {
            return fail("signing", format!("must be \"off\", \"verify\" or \"require\", got {:?}", self.signing));
        }
        if !["base64", "hex"].contains(&self.signing_encoding.as_str()) {
            return fail("signing_encoding", format!("must be \"base64\" or \"hex\", got {:?}", self.signing_encoding));
        }
        for (key, secret) in
            [("signing_secret", &self.signing_secret), ("signing_previous_secret", &self.signing_previous_secret)]
        {
            match secret {
                Some(secret) if secret == REDACTED => {
                    return fail(
                        key,
                        format!("{REDACTED:?} is the placeholder printed instead of the secret, not a secret"),
                    );
                }
                Some(secret) if secret.len() < MIN_SIGNING_SECRET => {
                    return fail(key, format!("must be at least {MIN_SIGNING_SECRET} bytes, got {}", secret.len()));
                }
                _ => {}
            }
        }
        if self.signing != "off" {
            if cfg!(not(feature = "signing")) {
                return fail("signing", "needs the `signing` cargo feature; set it to \"off\" or enable the feature");
            }
            if self.signing_secret.is_none() {
                return fail("signing_secret", format!("is required when signing is {:?}", self.signing));
            }
        }
        if self.signing_previous_secret.is_some() && self.signing_secret.is_none() {
            return fail("signing_previous_secret", "needs signing_secret (the current secret) as well");
        }
        for (key, value) in [
            ("signing_replay_window", self.signing_replay_window),
            ("signing_max_clock_skew", self.signing_max_clock_skew),
        ] {
            if value.is_zero() {
                return fail(key, "must be greater than zero");
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Config {
    /// Lists every key in declaration order, with its TOML value; the API key is redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Shows a TOML value as it would be written in the file.
        struct Shown<'a>(&'a Value);
        impl fmt::Debug for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self.0, f)
            }
        }

        let mut out = f.debug_struct("Config");
        let Ok(table) = Table::try_from(self.redacted()) else {
            return out.finish_non_exhaustive();
        };
        for key in known_keys() {
            match table.get(*key) {
                Some(value) => out.field(key, &Shown(value)),
                None => out.field(key, &None::<()>),
            };
        }
        out.finish()
    }
}

/// Why a configuration was refused: names the key (when there is one) and the reason, e.g.
/// `ping_interval: must be shorter than idle_timeout (60s), got 90s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    key: Option<String>,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: &str, reason: impl Into<String>) -> Self {
        ConfigError { key: Some(key.to_owned()), reason: reason.into() }
    }

    fn general(reason: impl Into<String>) -> Self {
        ConfigError { key: None, reason: reason.into() }
    }

    /// The offending key, or `None` when the error concerns the file as a whole (unreadable,
    /// not valid TOML).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// What is wrong, without the key.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{key}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Close codes an endpoint may put in a Close frame and the official clients understand.
fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000 | 1001 | 1008 | 1011 | 1013 | 3000..=4999)
}

/// Parses the file and rejects keys that `Config` does not have.
fn parse_file(text: &str, origin: &str) -> Result<Table, ConfigError> {
    let table: Table =
        toml::from_str(text).map_err(|err| ConfigError::general(format!("{origin} is not valid TOML: {err}")))?;
    let keys = known_keys();
    if let Some(unknown) = table.keys().find(|key| !keys.contains(&key.as_str())) {
        let hint = keys
            .iter()
            .find(|known| edit_distance(known, unknown) <= 2)
            .map(|known| format!(" (did you mean `{known}`?)"))
            .unwrap_or_default();
        return Err(ConfigError::new(unknown, format!("unknown key in {origin}{hint}")));
    }
    Ok(table)
}

/// Overlays the file table and then the environment on the defaults, deserializes and
/// validates. Each override is first tried alone on top of the defaults, so that a type error
/// names its key and where the value came from. An environment value is only echoed in an
/// error when it fits no type the key accepts, so a string key (such as `api_key`) never is.
fn assemble(file: Table, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let defaults = Table::try_from(Config::default()).expect("Config always serializes to TOML");
    let accepts = |key: &str, value: &Value| -> Result<(), String> {
        let mut table = defaults.clone();
        table.insert(key.to_owned(), value.clone());
        table.try_into::<Config>().map(drop).map_err(|err| err.message().trim_end().to_owned())
    };

    let mut merged = defaults.clone();
    for (key, value) in file {
        accepts(&key, &value).map_err(|reason| ConfigError::new(&key, reason))?;
        merged.insert(key, value);
    }
    for key in known_keys() {
        let name = env_var_name(key);
        let Some(raw) = env.get(&name) else { continue };
        let as_string = Value::String(raw.clone());
        let value = match parse_toml_value(raw) {
            Some(parsed) => match accepts(key, &parsed) {
                Ok(()) => parsed,
                Err(reason) => {
                    if accepts(key, &as_string).is_ok() {
                        as_string
                    } else {
                        return Err(ConfigError::new(key, format!("{name}={raw:?}: {reason}")));
                    }
                }
            },
            None => {
                accepts(key, &as_string)
                    .map_err(|reason| ConfigError::new(key, format!("{name}={raw:?}: {reason}")))?;
                as_string
            }
        };
        merged.insert((*key).to_owned(), value);
    }

    let config: Config = merged.try_into().map_err(|err| ConfigError::general(err.message().trim_end().to_owned()))?;
    config.validate()?;
    Ok(config)
}

/// Reads an environment value as a single TOML value, if it is one.
fn parse_toml_value(raw: &str) -> Option<Value> {
    let mut table: Table = toml::from_str(&format!("v = {raw}")).ok()?;
    if table.len() != 1 {
        return None;
    }
    table.remove("v")
}

/// `WSENGINE_` + upper-cased key.
fn env_var_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// The key an environment variable overrides, if any.
fn key_of_env_var(name: &str) -> Option<&'static str> {
    known_keys().iter().copied().find(|key| env_var_name(key) == name)
}

/// Every key of [`Config`], in declaration order, including optional keys that are absent from
/// the serialized defaults.
///
/// The derived `Deserialize` hands its field list to `deserialize_struct`; a deserializer that
/// records that list and stops is enough to read it, so the list never goes out of date.
fn known_keys() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    use std::sync::OnceLock;

    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field list recorded")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<T: fmt::Display>(_msg: T) -> Self {
            Stop
        }
    }

    struct FieldProbe<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    static KEYS: OnceLock<&'static [&'static str]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut fields: &'static [&'static str] = &[];
        let _ = Config::deserialize(FieldProbe(&mut fields));
        fields
    })
}

/// Levenshtein distance, for "did you mean" hints on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Serde adapter for [`Duration`] keys: reads seconds (integer or float) or a string with a
/// unit (`ms`, `s`, `m`, `h`); writes `"25s"`, `"250ms"`, or fractional seconds.
mod duration_serde {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    const NANOS_PER_SEC: u128 = 1_000_000_000;

    pub(super) fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    /// `"25s"` for whole seconds, `"250ms"` for whole milliseconds, else `"0.0000015s"`.
    pub(super) fn format(value: Duration) -> String {
        let nanos = value.subsec_nanos();
        if nanos == 0 {
            format!("{}s", value.as_secs())
        } else if nanos % 1_000_000 == 0 {
            format!("{}ms", value.as_millis())
        } else {
            let fraction = format!("{nanos:09}");
            format!("{}.{}s", value.as_secs(), fraction.trim_end_matches('0'))
        }
    }

    /// Parses `"250ms"`, `"25s"`, `"1.5s"`, `"2m"`, `"1h"` exactly (no floating point).
    pub(super) fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty duration; expected e.g. \"25s\" or \"250ms\"".to_owned());
        }
        if text.starts_with('-') {
            return Err(format!("duration must not be negative, got {text:?}"));
        }
        let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
        let (number, unit) = (&text[..split], text[split..].trim_start());
        let nanos_per_unit: u128 = match unit {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3600 * NANOS_PER_SEC,
            "" => {
                return Err(format!(
                    "duration {text:?} has no unit; write e.g. \"{text}s\" (units: ms, s, m, h) \
                     or a bare number of seconds"
                ));
            }
            _ => {
                return Err(format!("duration {text:?} has an unknown unit {unit:?}; expected ms, s, m or h"));
            }
        };
        let malformed = || format!("malformed duration {text:?}; expected e.g. \"25s\", \"1.5s\" or \"250ms\"");
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(malformed());
        }
        let too_large = || format!("duration {text:?} is too large");
        let mut total: u128 = 0;
        for digit in whole.bytes() {
            total =
                total.checked_mul(10).and_then(|t| t.checked_add(u128::from(digit - b'0'))).ok_or_else(too_large)?;
        }
        total = total.checked_mul(nanos_per_unit).ok_or_else(too_large)?;
        // Digits beyond nanosecond precision for any unit cannot matter; 18 keeps it in range.
        let fraction = &fraction[..fraction.len().min(18)];
        if !fraction.is_empty() {
            let digits: u128 = fraction.parse().map_err(|_| malformed())?;
            let scale = 10u128.pow(fraction.len() as u32);
            total = total.checked_add(digits * nanos_per_unit / scale).ok_or_else(too_large)?;
        }
        let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| too_large())?;
        Ok(Duration::new(secs, (total % NANOS_PER_SEC) as u32))
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration: seconds as a number, or a string such as \"25s\" or \"250ms\"")
        }

        fn visit_u64<E: de::Error>(self, secs: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(secs))
        }

        fn visit_i64<E: de::Error>(self, secs: i64) -> Result<Duration, E> {
            u64::try_from(secs)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("duration must not be negative, got {secs}")))
        }

        fn visit_f64<E: de::Error>(self, secs: f64) -> Result<Duration, E> {
            if secs.is_sign_negative() && secs != 0.0 {
                return Err(E::custom(format!("duration must not be negative, got {secs}")));
            }
            Duration::try_from_secs_f64(secs.abs())
                .map_err(|_| E::custom(format!("duration must be a finite number of seconds, got {secs}")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse(text).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn err_of(text: &str) -> ConfigError {
        Config::from_toml_str(text).expect_err("config should be refused")
    }

    fn env_err(pairs: &[(&str, &str)]) -> ConfigError {
        Config::from_sources(None, env(pairs)).expect_err("config should be refused")
    }

    #[test]
    fn defaults_are_documented_values_and_valid() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:5006".parse::<SocketAddr>().unwrap());
        assert_eq!(c.path, "/wse");
        assert_eq!(c.api_key, None);
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_message_size, 1_048_576);
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_subscriptions_per_connection, 0);
        assert_eq!(c.outbound_queue_bytes, 16_777_216);
        assert_eq!(c.outbound_queue_messages, 4096);
        assert_eq!(c.critical_grace, Duration::from_secs(10));
        assert_eq!((c.inbound_rate_capacity, c.inbound_rate_refill), (2000, 200));
        assert_eq!((c.user_rate_capacity, c.user_rate_refill), (20_000, 2000));
        assert_eq!((c.outbound_rate_capacity, c.outbound_rate_refill), (100_000, 10_000));
        assert_eq!(c.rate_limit_close_windows, 10);
        assert_eq!(c.compression_threshold, 1024);
        assert_eq!(c.compression_level, 1);
        assert_eq!(c.drain_close_code, 4300);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.read_buffer_size, 1024);
        assert_eq!(c.write_buffer_size, 16 * 1024);
        assert_eq!(c.log, "info");
        assert!(c.circuit_breaker);
        assert_eq!(c.circuit_breaker_failure_rate, 0.5);
        assert_eq!((c.circuit_breaker_window, c.circuit_breaker_min_calls), (20, 10));
        assert_eq!(c.circuit_breaker_window_duration, Duration::from_secs(60));
        assert_eq!(c.circuit_breaker_open_timeout, Duration::from_secs(30));
        assert_eq!(c.circuit_breaker_half_open_probes, 3);
        assert!(c.connection_breaker);
        assert_eq!(c.connection_breaker_failure_rate, 0.5);
        assert_eq!((c.connection_breaker_window, c.connection_breaker_min_calls), (20, 10));
        assert_eq!(c.connection_breaker_window_duration, Duration::from_secs(60));
        assert_eq!((c.dlq_max_per_topic, c.dlq_max_entries), (1000, 100_000));
        assert_eq!(c.dlq_ttl, Duration::from_secs(604_800));
        assert!(c.dlq_handler_failures);
        c.validate().unwrap();
        assert_eq!(Config::from_toml_str("").unwrap(), c);
        assert_eq!(Config::from_sources(None, Vec::new()).unwrap(), c);
    }

    #[cfg(all(feature = "encryption", feature = "signing"))]
    #[test]
    fn encryption_and_signing_keys_are_checked() {
        let ok = Config::from_toml_str(
            "encryption = \"required\"\nsigning = \"verify\"\nsigning_secret = \"0123456789abcdef0123456789abcdef\"",
        )
        .unwrap();
        assert_eq!(ok.encryption, "required");
        assert!(!format!("{ok:?}").contains("0123456789abcdef"), "the signing secret is never printed");
        for (text, expected) in [
            ("encryption = \"maybe\"", "encryption: must be \"off\", \"optional\" or \"required\", got \"maybe\""),
            ("signing = \"verify\"", "signing_secret: is required when signing is \"verify\""),
            ("signing_secret = \"short\"", "signing_secret: must be at least 32 bytes, got 5"),
            ("signing_encoding = \"b32\"", "signing_encoding: must be \"base64\" or \"hex\", got \"b32\""),
        ] {
            assert_eq!(Config::from_toml_str(text).unwrap_err().to_string(), expected, "{text}");
        }
    }

    #[test]
    fn compression_key_follows_the_cargo_feature() {
        assert_eq!(Config::default().compression, cfg!(feature = "compression"));
        assert!(!Config::from_toml_str("compression = false").unwrap().compression);
        let on = Config::from_toml_str("compression = true");
        if cfg!(feature = "compression") {
            assert!(on.unwrap().compression);
        } else {
            assert_eq!(
                on.unwrap_err().to_string(),
                "compression: needs the `compression` cargo feature; set it to false or enable the feature"
            );
        }
    }

    #[test]
    fn known_keys_cover_every_field() {
        let keys = known_keys();
        assert_eq!(keys.first(), Some(&"listen"));
        assert!(keys.contains(&"api_key"));
        let defaults = Table::try_from(Config::default()).unwrap();
        for key in defaults.keys() {
            assert!(keys.contains(&key.as_str()), "{key} missing");
        }
        // + the optional keys, absent when unset
        let optional = [
            "api_key",
            "api_previous_key",
            "jwt_secret",
            "jwt_public_key",
            "jwt_previous_secret",
            "jwt_previous_public_key",
            "allow_anonymous",
            "tls_cert",
            "tls_key",
            "signing_secret",
            "signing_previous_secret",
        ];
        assert_eq!(keys.len(), defaults.len() + optional.len());
    }

    #[test]
    fn file_overrides_defaults() {
        let c = Config::from_toml_str(
            r#"
            listen = "[::1]:9000"
            path = "/ws"
            api_key = "k"
            ping_interval = 10
            idle_timeout = "1.5m"
            max_message_size = 2048
            max_subscriptions_per_connection = 7
            compression_level = 6
            drain_close_code = 1001
            shutdown_grace = 0.5
            log = "debug"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen, "[::1]:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(c.path, "/ws");
        assert_eq!(c.api_key.as_deref(), Some("k"));
        assert_eq!(c.ping_interval, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.max_message_size, 2048);
        assert_eq!(c.max_subscriptions_per_connection, 7);
        assert_eq!(c.compression_level, 6);
        assert_eq!(c.drain_close_code, 1001);
        assert_eq!(c.shutdown_grace, Duration::from_millis(500));
        assert_eq!(c.log, "debug");
        // untouched keys keep their defaults
        assert_eq!(c.max_connections, 100_000);
    }

    #[test]
    fn env_beats_file() {
        let c = Config::from_sources(
            Some("ping_interval = \"10s\"\nmax_connections = 10\npath = \"/a\""),
            env(&[("WSENGINE_PING_INTERVAL", "20s"), ("WSENGINE_MAX_CONNECTIONS", "20")]),
        )
        .unwrap();
        assert_eq!(c.ping_interval, Duration::from_secs(20));
        assert_eq!(c.max_connections, 20);
        assert_eq!(c.path, "/a");
    }

    #[test]
    fn env_value_parsing() {
        let c = Config::from_sources(
            None,
            env(&[
                ("WSENGINE_LISTEN", "0.0.0.0:8080"),
                ("WSENGINE_PATH", "/socket"),
                ("WSENGINE_API_KEY", "1234"),
                ("WSENGINE_PING_INTERVAL", "1.5"),
                ("WSENGINE_IDLE_TIMEOUT", "2m"),
                ("WSENGINE_HANDSHAKE_TIMEOUT", "250ms"),
                ("WSENGINE_DRAIN_TIMEOUT", "45"),
                ("WSENGINE_MAX_CONNECTIONS", "77"),
                ("WSENGINE_COMPRESSION_LEVEL", "9"),
                ("WSENGINE_LOG", "info,wsengine=debug"),
                ("WSENGINE_NOT_A_KEY", "ignored"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(c.path, "/socket");
        assert_eq!(c.api_key.as_deref(), Some("1234"));
        assert_eq!(c.ping_interval, Duration::from_millis(1500));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.drain_timeout, Duration::from_secs(45));
        assert_eq!(c.max_connections, 77);
        assert_eq!(c.compression_level, 9);
        assert_eq!(c.log, "info,wsengine=debug");

        let c = Config::from_sources(
            None,
            env(&[
                ("WSENGINE_LISTEN", "[::]:5006"),
                ("WSENGINE_API_KEY", "\"quoted secret\""),
                ("WSENGINE_LOG", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "[::]:5006".parse::<SocketAddr>().unwrap());
        assert_eq!(c.api_key.as_deref(), Some("quoted secret"));
        assert_eq!(c.log, "true");
    }

    #[test]
    fn env_type_errors_name_key_and_variable() {
        let e = env_err(&[("WSENGINE_MAX_CONNECTIONS", "lots")]);
        assert_eq!(e.key(), Some("max_connections"));
        assert!(e.to_string().contains("WSENGINE_MAX_CONNECTIONS"), "{e}");
        assert!(e.to_string().contains("lots"), "{e}");

        let e = env_err(&[("WSENGINE_MAX_CONNECTIONS", "-5")]);
        assert_eq!(e.key(), Some("max_connections"));
        assert!(e.to_string().contains("-5"), "{e}");

        let e = env_err(&[("WSENGINE_PING_INTERVAL", "soon")]);
        assert_eq!(e.key(), Some("ping_interval"));
        assert!(e.reason().contains("unknown unit"), "{e}");

        let e = env_err(&[("WSENGINE_LISTEN", "localhost")]);
        assert_eq!(e.key(), Some("listen"));
    }

    #[test]
    fn file_errors_name_key() {
        let e = err_of("no_such_key = 1");
        assert_eq!(e.key(), Some("no_such_key"));
        assert!(e.to_string().starts_with("no_such_key: unknown key"), "{e}");

        let e = err_of("ping_intervall = \"5s\"");
        assert_eq!(e.key(), Some("ping_intervall"));
        assert!(e.reason().contains("did you mean `ping_interval`"), "{e}");

        let e = err_of("max_connections = \"many\"");
        assert_eq!(e.key(), Some("max_connections"));
        assert!(e.reason().contains("many"), "{e}");

        let e = err_of("[listen]\nport = 1");
        assert_eq!(e.key(), Some("listen"));

        let e = err_of("this is not toml");
        assert_eq!(e.key(), None);
        assert!(e.reason().contains("not valid TOML"), "{e}");
    }

    #[cfg(feature = "admission")]
    #[test]
    fn trusted_proxies_are_networks() {
        let ok = Config::from_toml_str("trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\", \"2001:db8::/32\"]");
        assert_eq!(ok.unwrap().trusted_proxies.len(), 3);
        let error = Config::from_toml_str("trusted_proxies = [\"10.0.0.0/33\"]").unwrap_err().to_string();
        assert_eq!(error, "trusted_proxies: \"10.0.0.0/33\": the prefix length must be a number from 0 to 32");
    }

    #[test]
    fn validation_rules() {
        let cases: &[(&str, &str)] = &[
            ("path = \"wse\"", "path: must start with '/', got \"wse\""),
            ("api_key = \"\"", "api_key: must not be empty when set"),
            ("api_previous_key = \"old\"", "api_previous_key: needs api_key (the new key) to be set"),
            ("api_key = \"k\"\napi_previous_key = \"\"", "api_previous_key: must not be empty when set"),
            (
                "api_key = \"<redacted>\"",
                "api_key: \"<redacted>\" is the placeholder printed instead of the key, not a key",
            ),
            ("ping_interval = 0", "ping_interval: must be greater than zero"),
            ("ping_interval = \"90s\"", "ping_interval: must be shorter than idle_timeout (60s), got 90s"),
            (
                "ping_interval = \"20s\"\nidle_timeout = \"20s\"",
                "ping_interval: must be shorter than idle_timeout (20s), got 20s",
            ),
            ("ping_interval = \"31s\"", "ping_interval: must be at most 30s, got 31s"),
            ("idle_timeout = 0", "idle_timeout: must be greater than zero"),
            ("max_message_size = 1023", "max_message_size: must be between 1024 and 67108864 bytes, got 1023"),
            ("max_message_size = 67108865", "max_message_size: must be between 1024 and 67108864 bytes, got 67108865"),
            ("max_connections = 0", "max_connections: must be greater than zero"),
            ("handshake_timeout = \"0ms\"", "handshake_timeout: must be greater than zero"),
            ("outbound_queue_bytes = 0", "outbound_queue_bytes: must be greater than zero"),
            ("outbound_queue_messages = 0", "outbound_queue_messages: must be greater than zero"),
            ("critical_grace = 0", "critical_grace: must be greater than zero"),
            ("inbound_rate_capacity = 0", "inbound_rate_capacity: must be at least 1 token"),
            ("inbound_rate_refill = 0", "inbound_rate_refill: must be at least 1 token"),
            ("outbound_rate_capacity = 0", "outbound_rate_capacity: must be at least 1 token"),
            ("outbound_rate_refill = 0", "outbound_rate_refill: must be at least 1 token"),
            (
                "user_rate_capacity = 0",
                "user_rate_capacity: must be at least 1 token while user_rate_refill is on \
                 (set user_rate_refill = 0 to turn the per-user limit off)",
            ),
            ("compression_level = 0", "compression_level: must be between 1 and 9, got 0"),
            ("compression_level = 10", "compression_level: must be between 1 and 9, got 10"),
            ("read_buffer_size = 255", "read_buffer_size: must be at least 256 bytes, got 255"),
            (
                "socket_send_buffer = 4095",
                "socket_send_buffer: must be 0 (kernel default) or 4096 to 67108864 bytes, got 4095",
            ),
            ("log = \" \"", "log: must not be empty (e.g. \"info\")"),
            (
                "circuit_breaker_failure_rate = 0.0",
                "circuit_breaker_failure_rate: must be greater than 0 and at most 1, got 0",
            ),
            (
                "circuit_breaker_failure_rate = 1.5",
                "circuit_breaker_failure_rate: must be greater than 0 and at most 1, got 1.5",
            ),
            ("circuit_breaker_window = 0", "circuit_breaker_window: must be at least 1 call"),
            (
                "circuit_breaker_min_calls = 21",
                "circuit_breaker_min_calls: must be between 1 and circuit_breaker_window (20), got 21",
            ),
            ("circuit_breaker_half_open_probes = 0", "circuit_breaker_half_open_probes: must be at least 1"),
            ("circuit_breaker_open_timeout = 0", "circuit_breaker_open_timeout: must be greater than zero"),
            ("circuit_breaker_window_duration = 0", "circuit_breaker_window_duration: must be greater than zero"),
            (
                "connection_breaker_failure_rate = 0.0",
                "connection_breaker_failure_rate: must be greater than 0 and at most 1, got 0",
            ),
            (
                "connection_breaker_failure_rate = 2.0",
                "connection_breaker_failure_rate: must be greater than 0 and at most 1, got 2",
            ),
            ("connection_breaker_window = 0", "connection_breaker_window: must be at least 1 call"),
            (
                "connection_breaker_min_calls = 0",
                "connection_breaker_min_calls: must be between 1 and connection_breaker_window (20), got 0",
            ),
            (
                "connection_breaker_window = 5\nconnection_breaker_min_calls = 6",
                "connection_breaker_min_calls: must be between 1 and connection_breaker_window (5), got 6",
            ),
            ("connection_breaker_window_duration = 0", "connection_breaker_window_duration: must be greater than zero"),
            ("dlq_ttl = 0", "dlq_ttl: must be greater than zero"),
            ("dlq_max_per_topic = 0", "dlq_max_per_topic: must be greater than zero"),
            ("dlq_max_entries = 0", "dlq_max_entries: must be greater than zero"),
        ];
        for (text, message) in cases {
            assert_eq!(err_of(text).to_string(), *message, "for {text:?}");
        }

        for code in [999, 1002, 1005, 1006, 1009, 1015, 2999, 5000] {
            let e = err_of(&format!("drain_close_code = {code}"));
            assert_eq!(e.key(), Some("drain_close_code"));
            assert!(e.reason().ends_with(&format!("got {code}")), "{e}");
        }
        for code in [1000, 1001, 1008, 1011, 1013, 3000, 4300, 4999] {
            Config::from_toml_str(&format!("drain_close_code = {code}")).unwrap();
        }
        // boundaries that are accepted
        Config::from_toml_str("max_message_size = 1024\nread_buffer_size = 256\nping_interval = \"30s\"").unwrap();
        Config::from_toml_str("max_message_size = 67108864").unwrap();
        // validation also runs on values that came from the environment
        let e = env_err(&[("WSENGINE_PATH", "nope")]);
        assert_eq!(e.key(), Some("path"));
    }

    #[test]
    fn validate_by_hand() {
        let c = Config { ping_interval: Duration::from_secs(90), ..Config::default() };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "ping_interval: must be shorter than idle_timeout (60s), got 90s"
        );
    }

    #[test]
    fn duration_table() {
        let good: &[(&str, Duration)] = &[
            ("ping_interval = 25", Duration::from_secs(25)),
            ("ping_interval = 1.5", Duration::from_millis(1500)),
            ("ping_interval = 0.001", Duration::from_millis(1)),
            ("ping_interval = \"250ms\"", Duration::from_millis(250)),
            ("ping_interval = \"25s\"", Duration::from_secs(25)),
            ("ping_interval = \"1.5s\"", Duration::from_millis(1500)),
            ("ping_interval = \".5s\"", Duration::from_millis(500)),
            ("ping_interval = \"2.s\"", Duration::from_secs(2)),
            ("ping_interval = \" 3 s \"", Duration::from_secs(3)),
            ("ping_interval = \"0.5m\"", Duration::from_secs(30)),
            ("ping_interval = \"1.5ms\"", Duration::from_micros(1500)),
            ("idle_timeout = \"2m\"", Duration::from_secs(120)),
            ("idle_timeout = \"1h\"", Duration::from_secs(3600)),
            ("idle_timeout = \"0.001h\"", Duration::from_millis(3600)),
        ];
        for (text, expected) in good {
            let idle = text.starts_with("idle");
            // A short ping interval keeps short idle timeouts valid.
            let file = if idle { format!("{text}\nping_interval = \"1ms\"") } else { (*text).to_owned() };
            let c = Config::from_toml_str(&file).unwrap_or_else(|e| panic!("{text}: {e}"));
            let got = if idle { c.idle_timeout } else { c.ping_interval };
            assert_eq!(got, *expected, "{text}");
        }

        let bad: &[(&str, &str)] = &[
            ("-5", "must not be negative"),
            ("-0.5", "must not be negative"),
            ("\"-5s\"", "must not be negative"),
            ("\"\"", "empty duration"),
            ("\"25\"", "has no unit"),
            ("\"25x\"", "unknown unit"),
            ("\"25 sec\"", "unknown unit"),
            ("\"1.2.3s\"", "malformed"),
            ("\".s\"", "malformed"),
            ("\"s\"", "malformed"),
            ("\"1e3s\"", "unknown unit"),
            ("\"99999999999999999999h\"", "too large"),
            ("nan", "finite"),
            ("inf", "finite"),
            ("true", "a duration"),
        ];
        for (value, needle) in bad {
            let e = err_of(&format!("drain_timeout = {value}"));
            assert_eq!(e.key(), Some("drain_timeout"), "{value}");
            assert!(e.reason().contains(needle), "{value}: {e}");
        }
    }

    #[test]
    fn duration_format() {
        use duration_serde::{format, parse};
        assert_eq!(format(Duration::from_secs(25)), "25s");
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_micros(1500)), "0.0015s");
        assert_eq!(format(Duration::new(2, 1)), "2.000000001s");
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_micros(1500),
            Duration::new(2, 1),
            Duration::from_secs(u64::MAX),
        ] {
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }

    #[test]
    fn toml_round_trip() {
        let c = Config {
            listen: "[::]:7000".parse().unwrap(),
            ping_interval: Duration::from_millis(1500),
            idle_timeout: Duration::new(45, 5),
            log: "warn".to_owned(),
            ..Config::default()
        };
        let text = c.to_toml_string();
        assert!(text.contains("ping_interval = \"1500ms\""), "{text}");
        assert!(text.contains("drain_timeout = \"30s\""), "{text}");
        assert!(!text.contains("api_key"), "{text}");
        assert_eq!(Config::from_toml_str(&text).unwrap(), c);
        assert_eq!(Config::from_toml_str(&Config::default().to_toml_string()).unwrap(), Config::default());
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config { api_key: Some("hunter2".to_owned()), ..Config::default() };
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("api_key: \"<redacted>\""), "{debug}");
        assert!(debug.contains("ping_interval: \"25s\""), "{debug}");
        let pretty = format!("{c:#?}");
        assert!(!pretty.contains("hunter2"), "{pretty}");
        for key in known_keys() {
            assert!(debug.contains(&format!("{key}: ")), "{key} missing in {debug}");
        }

        let text = c.to_toml_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("api_key = \"<redacted>\""), "{text}");
        // printing never changes the value itself
        assert_eq!(c.api_key.as_deref(), Some("hunter2"));

        let unset = format!("{:?}", Config::default());
        assert!(unset.contains("api_key: None"), "{unset}");
    }

    #[test]
    fn load_reads_file() {
        let dir = std::env::temp_dir().join(format!("wsengine-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("wsengine.toml");
        std::fs::write(&file, "max_connections = 42\n").unwrap();
        let c = Config::load(Some(&file));
        let missing = Config::load(Some(&dir.join("missing.toml")));
        std::fs::remove_dir_all(&dir).unwrap();
        // The process environment may hold WSENGINE_* variables, so only check what the file set
        // when nothing overrides it.
        if std::env::var_os("WSENGINE_MAX_CONNECTIONS").is_none() {
            assert_eq!(c.unwrap().max_connections, 42);
        }
        let e = missing.unwrap_err();
        assert_eq!(e.key(), None);
        assert!(e.reason().contains("cannot read config file"), "{e}");
    }

    #[test]
    fn error_display() {
        let e = ConfigError::new("log", "bad");
        assert_eq!(e.to_string(), "log: bad");
        assert_eq!(ConfigError::general("oops").to_string(), "oops");
        let _: &dyn std::error::Error = &e;
    }
}
