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
/// Smallest accepted `read_buffer_size`.
const MIN_READ_BUFFER_SIZE: usize = 256;

/// The engine's configuration.
///
/// Build it with [`Config::load`], [`Config::from_sources`], [`Config::from_toml_str`] or
/// [`Config::default`]; the module documentation describes the sources. The fields are public
/// so that Rust users can also fill it in by hand; call [`Config::validate`] afterwards.
///
/// `Debug` and [`Config::to_toml_string`] never show the API key.
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

    /// Maximum number of topics one connection may subscribe to; 0 means unlimited.
    /// Default 0.
    pub max_subscriptions_per_connection: usize,

    /// Per-connection outbound byte budget: while this many bytes or more are queued for a
    /// connection, new application data frames for it are dropped (slow consumer). Must be
    /// greater than zero. Default 16,777,216 (16 MiB).
    pub outbound_queue_bytes: usize,

    /// Per-connection cap on the number of queued outbound messages. Must be greater than
    /// zero. Default 4096.
    pub outbound_queue_messages: usize,

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

    /// Per-connection WebSocket read buffer, in bytes. At least 256. Default 4096.
    pub read_buffer_size: usize,

    /// Outbound bytes a connection gathers before writing them to the socket; the driver also
    /// writes whenever it has drained its queue, so this only batches bursts into fewer system
    /// calls. 0 writes every message at once. Default 16384. The buffer grows on demand and is
    /// not allocated on idle connections.
    pub write_buffer_size: usize,

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
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_message_size: 1024 * 1024,
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            max_subscriptions_per_connection: 0,
            outbound_queue_bytes: 16 * 1024 * 1024,
            outbound_queue_messages: 4096,
            compression_threshold: 1024,
            compression_level: 1,
            drain_close_code: 4300,
            drain_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
            read_buffer_size: 4096,
            write_buffer_size: 16 * 1024,
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
        if let Some(key) = &self.api_key {
            if key.is_empty() {
                return fail("api_key", "must not be empty when set".to_owned());
            }
            if key == REDACTED {
                return fail(
                    "api_key",
                    format!("{REDACTED:?} is the placeholder printed instead of the key, not a key"),
                );
            }
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
        if self.log.trim().is_empty() {
            return fail("log", "must not be empty (e.g. \"info\")".to_owned());
        }
        Ok(())
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
        if copy.api_key.is_some() {
            copy.api_key = Some(REDACTED.to_owned());
        }
        copy
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
    fn new(key: &str, reason: impl Into<String>) -> Self {
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
        assert_eq!(c.compression_threshold, 1024);
        assert_eq!(c.compression_level, 1);
        assert_eq!(c.drain_close_code, 4300);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.read_buffer_size, 4096);
        assert_eq!(c.write_buffer_size, 16 * 1024);
        assert_eq!(c.log, "info");
        c.validate().unwrap();
        assert_eq!(Config::from_toml_str("").unwrap(), c);
        assert_eq!(Config::from_sources(None, Vec::new()).unwrap(), c);
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
        assert_eq!(keys.len(), defaults.len() + 1); // + api_key, absent when unset
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

    #[test]
    fn validation_rules() {
        let cases: &[(&str, &str)] = &[
            ("path = \"wse\"", "path: must start with '/', got \"wse\""),
            ("api_key = \"\"", "api_key: must not be empty when set"),
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
            ("compression_level = 0", "compression_level: must be between 1 and 9, got 0"),
            ("compression_level = 10", "compression_level: must be between 1 and 9, got 10"),
            ("read_buffer_size = 255", "read_buffer_size: must be at least 256 bytes, got 255"),
            ("log = \" \"", "log: must not be empty (e.g. \"info\")"),
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
