//! Configuration: the YAML schema (`Raw*`, unknown keys refused) and its
//! validation into the domain types the gateway runs on.
//!
//! Every error carries the line and column of the offending value and names
//! the key. Parsing works on a `&str`, so tests use inline YAML; paths in the
//! file are relative to the file's directory.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::Spanned;

use crate::identity::Principal;
use crate::mtls::{MaterialError, MaterialPaths, OuterSettings};
use crate::policy::{Pattern, PolicySpec, RuleSpec, Selector};
use crate::resolve::{Cidr, IpFamily, ResolverSettings, Vetting};

/// Defaults, each with the reason for its value.
pub mod defaults {
    use std::time::Duration;

    pub const UPSTREAM_PORT: u16 = 443;
    pub const TRUST_DOMAIN: &str = "cluster.local";
    /// Outer handshake: a mesh sidecar on the same network completes it in
    /// milliseconds; 10 s tolerates a loaded node and still frees a slot held
    /// by a client that connects and sends nothing.
    pub const HANDSHAKE: Duration = Duration::from_secs(10);
    /// Inner ClientHello: clients send it right after connecting; 10 s, as
    /// the outer handshake (nginx uses 30 s, proksi 10 s).
    pub const CLIENT_HELLO: Duration = Duration::from_secs(10);
    /// DNS: the resolver's own default per query, and long enough for one
    /// retry against a second server.
    pub const DNS: Duration = Duration::from_secs(5);
    /// Connect, per address: a reachable host answers within a few round
    /// trips; 5 s leaves time for the next address within a client's patience.
    pub const CONNECT: Duration = Duration::from_secs(5);
    /// Idle: Envoy's tcp_proxy default, so behaviour under Istio does not
    /// change when snigress replaces an Envoy gateway.
    pub const IDLE: Duration = Duration::from_secs(3600);
    /// Floor for cached DNS answers: protects the resolver from 0-TTL records
    /// (Envoy's dynamic forward proxy uses the same 5 s floor).
    pub const MIN_TTL: Duration = Duration::from_secs(5);
    /// Ceiling for cached DNS answers: bounds how long a moved service is
    /// dialled at its old address.
    pub const MAX_TTL: Duration = Duration::from_secs(300);
    /// Cached DNS responses (hickory's default).
    pub const CACHE_SIZE: u64 = 8192;
    /// Concurrent connections: each takes two descriptors and up to ~70 KiB
    /// while data moves; 10 000 stays inside a 20 000-descriptor limit.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// ClientHello size cap: real hellos are 200 B–2 KiB (a post-quantum key
    /// share adds ~1.2 KiB); 16 KiB is one full TLS record, nginx's
    /// `preread_buffer_size` and HAProxy's `tune.bufsize`, so anything a real
    /// client sends fits while a hostile one cannot make us buffer more.
    pub const CLIENT_HELLO_BYTES: usize = 16 * 1024;
    pub const CLIENT_HELLO_BYTES_MIN: usize = 512;
    /// Connections from one client address: a quarter of the global limit,
    /// so one misbehaving caller cannot take every slot while a normal pod
    /// (a few hundred connections at most) never meets it.
    pub const MAX_CONNECTIONS_PER_SOURCE: usize = 2_500;
    /// After SIGTERM, keep accepting this long: Kubernetes takes a few
    /// seconds to take a terminating pod out of its Service's endpoints.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
    /// Then let connections in flight finish for up to this long; grace plus
    /// drain stays under Kubernetes' default 30 s termination grace period.
    pub const DRAIN: Duration = Duration::from_secs(20);
    pub const CLIENT_HELLO_BYTES_MAX: usize = 64 * 1024;
}

// ---------------------------------------------------------------------------
// Domain types.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Mtls,
    Passthrough,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Mtls => "mtls",
            Mode::Passthrough => "passthrough",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub mode: Mode,
    pub upstream_port: u16,
}

#[derive(Debug, Clone)]
pub enum MtlsSource {
    Files(MaterialPaths),
    /// A development PKI in this directory, minted on first start.
    DevPki(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Mtls {
    pub source: MtlsSource,
    pub trust_domains: Vec<String>,
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake: Duration,
    pub client_hello: Duration,
    pub dns: Duration,
    pub connect: Duration,
    pub idle: Duration,
    /// Longest a connection may live, whatever it does; `None`: no limit.
    pub max_lifetime: Option<Duration>,
}

/// The metrics endpoint and label caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSettings {
    /// `None`: no endpoint (metrics are still kept).
    pub address: Option<SocketAddr>,
    pub max_sni_values: usize,
    pub max_source_values: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub client_hello_bytes: usize,
}

/// What happens on SIGTERM/SIGINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// Keep accepting this long after the signal (readiness is already off).
    pub grace_period: Duration,
    /// Then wait this long for connections in flight before closing them.
    pub drain_timeout: Duration,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub mtls: Option<Mtls>,
    pub policy: PolicySpec,
    pub resolver: ResolverSettings,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// `None`: stdout.
    pub access_log: Option<PathBuf>,
    pub metrics: MetricsSettings,
    pub shutdown: Shutdown,
    /// Refuse inner ClientHellos that carry encrypted_client_hello.
    pub refuse_ech: bool,
    /// Where things are in the file, for errors found after parsing.
    origin: Origin,
}

#[derive(Debug, Clone, Default)]
struct Origin {
    source_name: String,
    text: String,
    /// Location of each `mtls.<key>` value.
    mtls_keys: Vec<(&'static str, Pos)>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: path.display().to_string(),
            pos: None,
            message: format!("cannot read the config file {}: {e}", path.display()),
            snippet: String::new(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// Validates config text; relative paths are taken from `base`.
    pub fn parse(text: &str, source_name: &str, base: &Path) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Err(ConfigError {
                source_name: source_name.to_owned(),
                pos: None,
                message:
                    "the config is empty: it needs at least a `listeners:` list (every key is in config/snigress.yaml)"
                        .into(),
                snippet: String::new(),
            });
        }
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| {
            let pos = e.location().map(|l| Pos { line: l.line(), column: l.column() }).filter(|p| p.line > 0);
            let rendered = e.render_with_options(serde_saphyr::render_options! { source_name: Some(source_name) });
            ConfigError { source_name: source_name.to_owned(), pos, message: rendered, snippet: String::new() }
        })?;
        let ctx = Ctx { source_name, text, base };
        validate(raw, &ctx)
    }

    /// Outer-layer settings for mtls listeners (the dev PKI's files when a
    /// dev PKI is configured).
    pub fn outer_settings(&self) -> Option<OuterSettings> {
        let mtls = self.mtls.as_ref()?;
        let paths = match &mtls.source {
            MtlsSource::Files(paths) => paths.clone(),
            MtlsSource::DevPki(dir) => crate::devcerts::material_paths(dir),
        };
        Some(OuterSettings {
            paths,
            trust_domains: mtls.trust_domains.clone(),
            alpn: mtls.alpn.clone(),
            handshake_timeout: self.timeouts.handshake,
        })
    }

    /// What differs from `running` that only a restart can apply (listener
    /// sockets, the metrics endpoint, the access-log file, connection-limit
    /// sizes, shutdown timing). Empty: `self` can replace it live.
    pub fn restart_needed(&self, running: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.listeners != running.listeners {
            keys.push("listeners");
        }
        if self.metrics != running.metrics {
            keys.push("metrics");
        }
        if self.access_log != running.access_log {
            keys.push("access_log");
        }
        if self.limits.max_connections != running.limits.max_connections {
            keys.push("limits.max_connections");
        }
        if self.limits.max_connections_per_source != running.limits.max_connections_per_source {
            keys.push("limits.max_connections_per_source");
        }
        if self.shutdown != running.shutdown {
            keys.push("shutdown");
        }
        keys
    }

    /// A certificate-loading error, pointed at the key it is about.
    pub fn material_error(&self, e: &MaterialError) -> ConfigError {
        let key = match self.mtls.as_ref().map(|m| &m.source) {
            Some(MtlsSource::DevPki(_)) => "dev_pki",
            _ => e.key(),
        };
        self.error_at(key, e.to_string())
    }

    /// An error about `mtls.<key>`, found after parsing.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let pos = self.origin.mtls_keys.iter().find(|(k, _)| *k == key).map(|(_, p)| *p);
        let ctx = Ctx { source_name: &self.origin.source_name, text: &self.origin.text, base: Path::new(".") };
        ctx.error(pos, message)
    }
}

// ---------------------------------------------------------------------------
// Errors.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

/// A config error with its place in the file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source_name: String,
    pub pos: Option<Pos>,
    /// The message (for YAML errors, already rendered with its snippet).
    pub message: String,
    snippet: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.snippet.is_empty() {
            write!(f, "{}\n{}", self.message, self.snippet)
        } else if self.message.contains(&self.source_name) {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.source_name, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

struct Ctx<'a> {
    source_name: &'a str,
    text: &'a str,
    base: &'a Path,
}

impl Ctx<'_> {
    fn error(&self, pos: Option<Pos>, message: String) -> ConfigError {
        let Some(pos) = pos else {
            return ConfigError {
                source_name: self.source_name.to_owned(),
                pos: None,
                message,
                snippet: String::new(),
            };
        };
        let line_text = self.text.lines().nth(pos.line.saturating_sub(1) as usize).unwrap_or("");
        let gutter = " ".repeat(pos.line.to_string().len());
        let caret = " ".repeat(pos.column.saturating_sub(1) as usize);
        ConfigError {
            source_name: self.source_name.to_owned(),
            pos: Some(pos),
            message: format!("error: line {} column {}: {message}", pos.line, pos.column),
            snippet: format!(
                "{gutter}--> {}:{}:{}\n{gutter} |\n{} | {line_text}\n{gutter} | {caret}^ {message}",
                self.source_name, pos.line, pos.column, pos.line
            ),
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, message: String) -> ConfigError {
        self.error(pos_of(spanned), message)
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_owned() } else { self.base.join(p) }
    }
}

fn pos_of<T>(s: &Spanned<T>) -> Option<Pos> {
    let (line, column) = (s.referenced.line(), s.referenced.column());
    (line > 0).then_some(Pos { line, column })
}

// ---------------------------------------------------------------------------
// Raw schema.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listeners: Spanned<Vec<Spanned<RawListener>>>,
    #[serde(default)]
    mtls: Option<Spanned<RawMtls>>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    resolver: RawResolver,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    access_log: RawAccessLog,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    shutdown: RawShutdown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(default = "d_grace")]
    grace_period: Spanned<Dur>,
    #[serde(default = "d_drain")]
    drain_timeout: Spanned<Dur>,
}

fn d_grace() -> Spanned<Dur> {
    unspanned(Dur(defaults::SHUTDOWN_GRACE))
}
fn d_drain() -> Spanned<Dur> {
    unspanned(Dur(defaults::DRAIN))
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown { grace_period: d_grace(), drain_timeout: d_drain() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    address: Spanned<Addr>,
    mode: Spanned<Mode>,
    #[serde(default = "default_upstream_port")]
    upstream_port: Spanned<u16>,
}

fn default_upstream_port() -> Spanned<u16> {
    Spanned::new(defaults::UPSTREAM_PORT, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default)]
    cert: Option<Spanned<String>>,
    #[serde(default)]
    key: Option<Spanned<String>>,
    #[serde(default)]
    client_ca: Option<Spanned<String>>,
    #[serde(default)]
    dev_pki: Option<Spanned<String>>,
    #[serde(default)]
    trust_domains: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    alpn: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    allow: Vec<PatternField>,
    #[serde(default)]
    deny: Vec<PatternField>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    refuse_ech: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    principals: Vec<PrincipalField>,
    #[serde(default)]
    namespaces: Vec<Spanned<String>>,
    #[serde(default)]
    service_accounts: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<PatternField>,
    #[serde(default)]
    deny: Vec<PatternField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResolver {
    #[serde(default)]
    nameservers: Option<Spanned<Vec<NameserverField>>>,
    #[serde(default)]
    ip_family: IpFamily,
    #[serde(default = "d_min_ttl")]
    min_ttl: Spanned<Dur>,
    #[serde(default = "d_max_ttl")]
    max_ttl: Spanned<Dur>,
    #[serde(default = "d_cache_size")]
    cache_size: u64,
    #[serde(default)]
    allow_cidrs: Vec<CidrField>,
    #[serde(default)]
    deny_cidrs: Vec<CidrField>,
}

impl Default for RawResolver {
    fn default() -> Self {
        RawResolver {
            nameservers: None,
            ip_family: IpFamily::default(),
            min_ttl: d_min_ttl(),
            max_ttl: d_max_ttl(),
            cache_size: defaults::CACHE_SIZE,
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
        }
    }
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}
fn d_min_ttl() -> Spanned<Dur> {
    unspanned(Dur(defaults::MIN_TTL))
}
fn d_max_ttl() -> Spanned<Dur> {
    unspanned(Dur(defaults::MAX_TTL))
}
fn d_cache_size() -> u64 {
    defaults::CACHE_SIZE
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default = "d_handshake")]
    handshake: Spanned<Dur>,
    #[serde(default = "d_client_hello")]
    client_hello: Spanned<Dur>,
    #[serde(default = "d_dns")]
    dns: Spanned<Dur>,
    #[serde(default = "d_connect")]
    connect: Spanned<Dur>,
    #[serde(default = "d_idle")]
    idle: Spanned<Dur>,
    #[serde(default)]
    max_lifetime: Option<Spanned<Dur>>,
}

fn d_handshake() -> Spanned<Dur> {
    unspanned(Dur(defaults::HANDSHAKE))
}
fn d_client_hello() -> Spanned<Dur> {
    unspanned(Dur(defaults::CLIENT_HELLO))
}
fn d_dns() -> Spanned<Dur> {
    unspanned(Dur(defaults::DNS))
}
fn d_connect() -> Spanned<Dur> {
    unspanned(Dur(defaults::CONNECT))
}
fn d_idle() -> Spanned<Dur> {
    unspanned(Dur(defaults::IDLE))
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            handshake: d_handshake(),
            client_hello: d_client_hello(),
            dns: d_dns(),
            connect: d_connect(),
            idle: d_idle(),
            max_lifetime: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "d_max_connections")]
    max_connections: Spanned<usize>,
    #[serde(default = "d_max_per_source")]
    max_connections_per_source: Spanned<usize>,
    #[serde(default = "d_client_hello_bytes")]
    client_hello_bytes: Spanned<usize>,
}

fn d_max_connections() -> Spanned<usize> {
    unspanned(defaults::MAX_CONNECTIONS)
}
fn d_max_per_source() -> Spanned<usize> {
    unspanned(defaults::MAX_CONNECTIONS_PER_SOURCE)
}
fn d_client_hello_bytes() -> Spanned<usize> {
    unspanned(defaults::CLIENT_HELLO_BYTES)
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: d_max_connections(),
            max_connections_per_source: d_max_per_source(),
            client_hello_bytes: d_client_hello_bytes(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    address: Option<Spanned<Addr>>,
    #[serde(default = "d_max_sni_values")]
    max_sni_values: Spanned<usize>,
    #[serde(default = "d_max_source_values")]
    max_source_values: Spanned<usize>,
}

fn d_max_sni_values() -> Spanned<usize> {
    unspanned(crate::metrics::defaults::MAX_SNI_VALUES)
}
fn d_max_source_values() -> Spanned<usize> {
    unspanned(crate::metrics::defaults::MAX_SOURCE_VALUES)
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics { address: None, max_sni_values: d_max_sni_values(), max_source_values: d_max_source_values() }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    /// A file to append to; absent or "-" for stdout.
    #[serde(default)]
    path: Option<String>,
}

// ---------------------------------------------------------------------------
// Scalar fields validated as they are read, so errors carry their location.

/// `ip:port`.
struct Addr(SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Addr).map_err(|_| {
            de::Error::custom(format!("invalid address {s:?}: expected ip:port, as in 127.0.0.1:8443 or [::]:8443"))
        })
    }
}

/// A nameserver: `ip:port`, or `ip` for port 53.
struct NameserverField(SocketAddr);

impl<'de> Deserialize<'de> for NameserverField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(NameserverField(addr));
        }
        s.parse::<std::net::IpAddr>().map(|ip| NameserverField(SocketAddr::new(ip, 53))).map_err(|_| {
            de::Error::custom(format!("invalid nameserver {s:?}: expected ip or ip:port, as in 10.96.0.10:53"))
        })
    }
}

struct PatternField(Pattern);

impl<'de> Deserialize<'de> for PatternField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::parse(&s).map(PatternField).map_err(de::Error::custom)
    }
}

struct CidrField(Cidr);

impl<'de> Deserialize<'de> for CidrField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map(CidrField).map_err(de::Error::custom)
    }
}

/// A principal selector: a SPIFFE ID with or without `spiffe://`, stored
/// without it.
struct PrincipalField(String);

impl<'de> Deserialize<'de> for PrincipalField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let full = if s.starts_with("spiffe://") { s.clone() } else { format!("spiffe://{s}") };
        Principal::parse(&full)
            .map(|p| PrincipalField(p.without_scheme().to_owned()))
            .map_err(|e| de::Error::custom(format!("invalid principal {s:?}: {e}")))
    }
}

/// A duration: `250ms`, `10s`, `5m`, `1h`, or a number of seconds.
#[derive(Clone, Copy)]
struct Dur(Duration);

/// Longest duration any setting accepts: far beyond any sensible timeout,
/// and small enough that `Instant + duration` can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    };
    d.filter(|d| *d <= MAX_DURATION)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 250ms, 10s, 5m or 1h")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                let d = Duration::from_secs(v);
                if d > MAX_DURATION {
                    return Err(E::custom("a duration may be at most 366 days"));
                }
                Ok(Dur(d))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                let v = u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
                self.visit_u64(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).ok_or_else(|| {
                    E::custom(format!(
                        "invalid duration {v:?}: expected a number with a unit, as in 250ms, 10s, 5m or 1h (at most 366 days)"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Validation.

fn validate(raw: RawConfig, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
    let mut origin = Origin { source_name: ctx.source_name.to_owned(), text: ctx.text.to_owned(), mtls_keys: vec![] };

    // Listeners.
    if raw.listeners.value.is_empty() {
        return Err(ctx.at(&raw.listeners, "listeners: at least one listener is needed".into()));
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, l) in raw.listeners.value.iter().enumerate() {
        let l = &l.value;
        let name = l.name.value.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(ctx.at(
                &l.name,
                format!("listeners[{i}].name: {:?} must be non-empty letters, digits, '-', '_' or '.'", l.name.value),
            ));
        }
        if !names.insert(name.to_owned()) {
            return Err(ctx.at(&l.name, format!("listeners[{i}].name: {name:?} is used by another listener")));
        }
        // Port 0 asks the kernel for a free port: never a clash.
        if l.address.value.0.port() != 0 && !addresses.insert(l.address.value.0) {
            return Err(ctx
                .at(&l.address, format!("listeners[{i}].address: {} is used by another listener", l.address.value.0)));
        }
        if l.upstream_port.value == 0 {
            return Err(ctx.at(&l.upstream_port, format!("listeners[{i}].upstream_port: must be 1-65535")));
        }
        if l.mode.value == Mode::Mtls && raw.mtls.is_none() {
            return Err(ctx.at(
                &l.mode,
                format!("listeners[{i}].mode: listener {name:?} is mtls but the config has no mtls: section"),
            ));
        }
        listeners.push(Listener {
            name: name.to_owned(),
            address: l.address.value.0,
            mode: l.mode.value,
            upstream_port: l.upstream_port.value,
        });
    }

    // Outer mTLS.
    let mtls = match &raw.mtls {
        None => None,
        Some(m) => Some(validate_mtls(m, ctx, &mut origin)?),
    };

    // Policy.
    let refuse_ech = raw.policy.refuse_ech;
    let policy = validate_policy(raw.policy, ctx)?;

    // Resolver.
    let r = raw.resolver;
    if r.min_ttl.value.0 > r.max_ttl.value.0 {
        return Err(ctx.at(&r.min_ttl, "resolver.min_ttl: must not be greater than resolver.max_ttl".into()));
    }
    let nameservers = match r.nameservers {
        Some(list) if list.value.is_empty() => {
            return Err(ctx.at(
                &list,
                "resolver.nameservers: give at least one, or leave the key out to use the system configuration".into(),
            ));
        }
        Some(list) => Some(list.value.into_iter().map(|n| n.0).collect()),
        None => None,
    };

    // Timeouts and limits.
    let t = raw.timeouts;
    for (key, d) in [
        ("handshake", &t.handshake),
        ("client_hello", &t.client_hello),
        ("dns", &t.dns),
        ("connect", &t.connect),
        ("idle", &t.idle),
    ] {
        if d.value.0.is_zero() {
            return Err(ctx.at(d, format!("timeouts.{key}: must be greater than zero")));
        }
    }
    let timeouts = Timeouts {
        handshake: t.handshake.value.0,
        client_hello: t.client_hello.value.0,
        dns: t.dns.value.0,
        connect: t.connect.value.0,
        idle: t.idle.value.0,
        max_lifetime: match &t.max_lifetime {
            None => None,
            Some(d) if d.value.0.is_zero() => {
                return Err(
                    ctx.at(d, "timeouts.max_lifetime: must be greater than zero (leave it out for no limit)".into())
                );
            }
            Some(d) => Some(d.value.0),
        },
    };
    let l = raw.limits;
    if l.max_connections.value == 0 {
        return Err(ctx.at(&l.max_connections, "limits.max_connections: must be at least 1".into()));
    }
    if l.max_connections_per_source.value == 0 {
        return Err(
            ctx.at(&l.max_connections_per_source, "limits.max_connections_per_source: must be at least 1".into())
        );
    }
    let sd = raw.shutdown;
    let shutdown = Shutdown { grace_period: sd.grace_period.value.0, drain_timeout: sd.drain_timeout.value.0 };
    let hello = l.client_hello_bytes.value;
    if !(defaults::CLIENT_HELLO_BYTES_MIN..=defaults::CLIENT_HELLO_BYTES_MAX).contains(&hello) {
        return Err(ctx.at(
            &l.client_hello_bytes,
            format!(
                "limits.client_hello_bytes: must be between {} and {}",
                defaults::CLIENT_HELLO_BYTES_MIN,
                defaults::CLIENT_HELLO_BYTES_MAX
            ),
        ));
    }

    let m = raw.metrics;
    for (key, cap) in [("max_sni_values", &m.max_sni_values), ("max_source_values", &m.max_source_values)] {
        if cap.value == 0 {
            return Err(ctx.at(cap, format!("metrics.{key}: must be at least 1")));
        }
    }
    if let Some(addr) = &m.address
        && listeners.iter().any(|l: &Listener| l.address == addr.value.0 && addr.value.0.port() != 0)
    {
        return Err(ctx.at(addr, format!("metrics.address: {} is also a listener's address", addr.value.0)));
    }
    let metrics = MetricsSettings {
        address: m.address.map(|a| a.value.0),
        max_sni_values: m.max_sni_values.value,
        max_source_values: m.max_source_values.value,
    };

    let access_log = match raw.access_log.path.as_deref() {
        None | Some("-") => None,
        Some(p) => Some(ctx.path(p)),
    };

    Ok(Config {
        listeners,
        mtls,
        policy,
        resolver: ResolverSettings {
            nameservers,
            ip_family: r.ip_family,
            min_ttl: r.min_ttl.value.0,
            max_ttl: r.max_ttl.value.0,
            cache_size: r.cache_size,
            timeout: timeouts.dns,
            vetting: Vetting {
                allow_cidrs: r.allow_cidrs.into_iter().map(|c| c.0).collect(),
                deny_cidrs: r.deny_cidrs.into_iter().map(|c| c.0).collect(),
            },
        },
        timeouts,
        limits: Limits {
            max_connections: l.max_connections.value,
            max_connections_per_source: l.max_connections_per_source.value,
            client_hello_bytes: hello,
        },
        access_log,
        metrics,
        shutdown,
        refuse_ech,
        origin,
    })
}

fn validate_mtls(m: &Spanned<RawMtls>, ctx: &Ctx<'_>, origin: &mut Origin) -> Result<Mtls, ConfigError> {
    let raw = &m.value;
    for (key, value) in
        [("cert", &raw.cert), ("key", &raw.key), ("client_ca", &raw.client_ca), ("dev_pki", &raw.dev_pki)]
    {
        if let Some(pos) = value.as_ref().and_then(pos_of) {
            origin.mtls_keys.push((key, pos));
        }
    }
    let source = match (&raw.dev_pki, &raw.cert, &raw.key, &raw.client_ca) {
        (Some(dir), None, None, None) => MtlsSource::DevPki(ctx.path(&dir.value)),
        (Some(dir), ..) => {
            return Err(ctx.at(dir, "mtls.dev_pki: use either dev_pki or cert, key and client_ca, not both".into()));
        }
        (None, Some(cert), Some(key), Some(ca)) => MtlsSource::Files(MaterialPaths {
            cert: ctx.path(&cert.value),
            key: ctx.path(&key.value),
            client_ca: ctx.path(&ca.value),
        }),
        (None, cert, key, ca) => {
            let missing: Vec<&str> = [("cert", cert), ("key", key), ("client_ca", ca)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
            return Err(
                ctx.at(m, format!("mtls: missing {} (or set dev_pki: DIR for a development PKI)", missing.join(", ")))
            );
        }
    };
    let trust_domains = match &raw.trust_domains {
        None => vec![defaults::TRUST_DOMAIN.to_owned()],
        Some(list) if list.value.is_empty() => {
            return Err(ctx.at(list, "mtls.trust_domains: at least one trust domain is needed".into()));
        }
        Some(list) => {
            let mut out = Vec::new();
            for td in &list.value {
                let ok = Principal::parse(&format!("spiffe://{}", td.value))
                    .is_ok_and(|p| p.trust_domain() == td.value && p.namespace().is_none() && !td.value.contains('/'));
                if !ok {
                    return Err(ctx.at(td, format!("mtls.trust_domains: {:?} is not a valid trust domain (lower-case letters, digits, '.', '-', '_')", td.value)));
                }
                out.push(td.value.clone());
            }
            out
        }
    };
    let mut alpn = Vec::new();
    for p in &raw.alpn {
        if p.value == "istio-peer-exchange" {
            return Err(ctx.at(
                p,
                "mtls.alpn: istio-peer-exchange must never be negotiated (the sidecar would write a metadata preamble into the stream); use [] or [istio]".into(),
            ));
        }
        if p.value.is_empty() || p.value.len() > 255 {
            return Err(ctx.at(p, "mtls.alpn: each protocol must be 1-255 bytes".into()));
        }
        alpn.push(p.value.clone());
    }
    Ok(Mtls { source, trust_domains, alpn })
}

fn validate_policy(raw: RawPolicy, ctx: &Ctx<'_>) -> Result<PolicySpec, ConfigError> {
    let mut rules = Vec::new();
    let mut rule_names = HashSet::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let pos = pos_of(&r);
        let r = r.value;
        let name = match &r.name {
            Some(n) => {
                let ok =
                    !n.value.is_empty() && n.value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
                if !ok {
                    return Err(ctx.at(
                        n,
                        format!("policy.rules[{i}].name: {:?} must be letters, digits, '-', '_', '.' or '/'", n.value),
                    ));
                }
                n.value.clone()
            }
            None => format!("rules[{i}]"),
        };
        if !rule_names.insert(name.clone()) {
            return Err(ctx.error(pos, format!("policy.rules[{i}]: the name {name:?} is used by another rule")));
        }
        let mut from = Selector { principals: r.principals.into_iter().map(|p| p.0).collect(), ..Default::default() };
        for ns in &r.namespaces {
            if !is_k8s_name(&ns.value) {
                return Err(ctx.at(ns, format!("policy.rules[{i}].namespaces: {:?} is not a namespace name", ns.value)));
            }
            from.namespaces.insert(ns.value.clone());
        }
        for sa in &r.service_accounts {
            match sa.value.split_once('/') {
                Some((ns, name)) if is_k8s_name(ns) && is_k8s_name(name) => {
                    from.service_accounts.insert((ns.to_owned(), name.to_owned()));
                }
                _ => {
                    return Err(ctx.at(
                        sa,
                        format!(
                            "policy.rules[{i}].service_accounts: {:?} must be namespace/name, as in payments/checkout",
                            sa.value
                        ),
                    ));
                }
            }
        }
        if from.is_empty() {
            return Err(ctx.error(
                pos,
                format!("policy.rules[{i}] ({name}): select callers with principals, namespaces or service_accounts"),
            ));
        }
        if r.allow.is_empty() && r.deny.is_empty() {
            return Err(ctx.error(pos, format!("policy.rules[{i}] ({name}): the rule has no allow or deny patterns")));
        }
        rules.push(RuleSpec {
            name,
            from,
            allow: r.allow.into_iter().map(|p| p.0).collect(),
            deny: r.deny.into_iter().map(|p| p.0).collect(),
        });
    }
    Ok(PolicySpec {
        allow: raw.allow.into_iter().map(|p| p.0).collect(),
        deny: raw.deny.into_iter().map(|p| p.0).collect(),
        rules,
    })
}

/// A Kubernetes object name (RFC 1123 label: lower-case alphanumerics and '-').
fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::parse(yaml, "test.yaml", Path::new("/etc/snigress"))
    }

    fn err(yaml: &str) -> ConfigError {
        match parse(yaml) {
            Ok(_) => panic!("expected an error for:\n{yaml}"),
            Err(e) => e,
        }
    }

    const MINIMAL: &str = "listeners:\n  - name: local\n    address: 127.0.0.1:8443\n    mode: passthrough\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].upstream_port, 443);
        assert_eq!(c.timeouts.client_hello, defaults::CLIENT_HELLO);
        assert_eq!(c.timeouts.idle, Duration::from_secs(3600));
        assert_eq!(c.limits.client_hello_bytes, 16384);
        assert!(c.resolver.nameservers.is_none());
        assert!(c.access_log.is_none());
        assert!(c.mtls.is_none());
    }

    #[test]
    fn full_config() {
        let yaml = r#"
listeners:
  - name: mesh
    address: "[::]:15443"
    mode: mtls
    upstream_port: 8443
mtls:
  cert: certs/cert-chain.pem
  key: /abs/key.pem
  client_ca: certs/root-cert.pem
  trust_domains: [cluster.local, old.example]
  alpn: [istio]
policy:
  allow: ["*.wikipedia.org", "Example.COM."]
  deny: [en.wikipedia.org]
  rules:
    - name: payments
      principals: ["cluster.local/ns/pay/sa/checkout", "spiffe://cluster.local/ns/pay/sa/refunds"]
      namespaces: [billing]
      service_accounts: [pay/cron]
      allow: [api.stripe.com]
resolver:
  nameservers: ["10.96.0.10", "127.0.0.1:5353"]
  ip_family: both
  min_ttl: 1s
  max_ttl: 10m
  allow_cidrs: [10.0.0.0/8]
  deny_cidrs: ["10.96.0.0/12"]
timeouts: {handshake: 2s, client_hello: 500ms, dns: 3, connect: 1s, idle: 2h}
limits: {max_connections: 100, client_hello_bytes: 4096}
access_log: {path: access.log}
"#;
        let c = parse(yaml).unwrap();
        assert_eq!(c.listeners[0].address, "[::]:15443".parse().unwrap());
        let MtlsSource::Files(paths) = &c.mtls.as_ref().unwrap().source else { panic!() };
        assert_eq!(paths.cert, Path::new("/etc/snigress/certs/cert-chain.pem"));
        assert_eq!(paths.key, Path::new("/abs/key.pem"));
        assert_eq!(c.mtls.as_ref().unwrap().trust_domains, ["cluster.local", "old.example"]);
        assert_eq!(c.policy.allow[1].to_string(), "example.com");
        let rule = &c.policy.rules[0];
        assert!(rule.from.principals.contains("cluster.local/ns/pay/sa/refunds"));
        assert!(rule.from.service_accounts.contains(&("pay".into(), "cron".into())));
        assert_eq!(
            c.resolver.nameservers.as_deref(),
            Some(&["10.96.0.10:53".parse().unwrap(), "127.0.0.1:5353".parse().unwrap()][..])
        );
        assert_eq!(c.resolver.ip_family, IpFamily::Both);
        assert_eq!(c.resolver.max_ttl, Duration::from_secs(600));
        assert_eq!(c.timeouts.client_hello, Duration::from_millis(500));
        assert_eq!(c.timeouts.dns, Duration::from_secs(3));
        assert_eq!(c.timeouts.idle, Duration::from_secs(7200));
        assert_eq!(c.limits.max_connections, 100);
        assert_eq!(c.access_log.as_deref(), Some(Path::new("/etc/snigress/access.log")));
    }

    #[test]
    fn errors_name_the_key_line_and_column() {
        let cases: &[(&str, u64, u64, &str)] = &[
            (
                "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    mode: passthrough\n    upstream: 1\n",
                5,
                5,
                "unknown field `upstream`",
            ),
            ("listeners:\n  - name: a\n    address: 127.0.0.1\n    mode: passthrough\n", 3, 14, "invalid address"),
            ("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    mode: tcp\n", 4, 11, "unknown variant `tcp`"),
            ("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    mode: mtls\n", 4, 11, "no mtls: section"),
            (&format!("{MINIMAL}policy:\n  allow: [ok.example, \"a.*.example\"]\n"), 6, 23, "invalid pattern"),
            (&format!("{MINIMAL}policy:\n  deny: [\"10.0.0.1\"]\n"), 6, 10, "IP address literal"),
            (&format!("{MINIMAL}timeouts:\n  idle: 10 minutes\n"), 6, 9, "invalid duration"),
            (&format!("{MINIMAL}timeouts:\n  idle: 0s\n"), 6, 9, "timeouts.idle"),
            (&format!("{MINIMAL}resolver:\n  allow_cidrs: [10.0.0.0/33]\n"), 6, 17, "invalid CIDR"),
            (&format!("{MINIMAL}resolver:\n  min_ttl: 1h\n  max_ttl: 1m\n"), 6, 12, "resolver.min_ttl"),
            (&format!("{MINIMAL}limits:\n  client_hello_bytes: 100\n"), 6, 23, "limits.client_hello_bytes"),
            (&format!("{MINIMAL}mtls:\n  dev_pki: pki\n  alpn: [istio-peer-exchange]\n"), 7, 10, "istio-peer-exchange"),
            (&format!("{MINIMAL}mtls:\n  cert: a.pem\n"), 6, 3, "missing key, client_ca"),
            (&format!("{MINIMAL}mtls:\n  dev_pki: pki\n  trust_domains: [Cluster.Local]\n"), 7, 19, "trust_domains"),
            (&format!("{MINIMAL}policy:\n  rules:\n    - name: r\n      allow: [a.example]\n"), 7, 7, "select callers"),
            (
                &format!("{MINIMAL}policy:\n  rules:\n    - service_accounts: [checkout]\n      allow: [a.example]\n"),
                7,
                26,
                "namespace/name",
            ),
            (
                &format!("{MINIMAL}policy:\n  rules:\n    - principals: [\"https://x\"]\n      allow: [a.example]\n"),
                7,
                20,
                "invalid principal",
            ),
            (
                &format!("{MINIMAL}  - name: local\n    address: 127.0.0.1:9\n    mode: passthrough\n"),
                5,
                11,
                "used by another listener",
            ),
        ];
        let mut wrong = Vec::new();
        for (yaml, line, column, needle) in cases {
            let e = err(yaml);
            let text = e.to_string();
            let at = format!("test.yaml:{line}:{column}");
            if e.pos != Some(Pos { line: *line, column: *column }) || !text.contains(needle) || !text.contains(&at) {
                wrong.push(format!("expected {needle:?} at {line}:{column}, got {:?}:\n{text}", e.pos));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    }

    #[test]
    fn yaml_syntax_and_structure_errors() {
        assert!(err("listeners: [\n").pos.is_some());
        assert!(err("").to_string().contains("test.yaml"));
        assert!(err("listeners: []\n").to_string().contains("at least one listener"));
        assert!(err("- a\n").pos.is_some());
        assert!(err(&format!("{MINIMAL}{MINIMAL}")).to_string().contains("duplicate"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("8784h"), Some(MAX_DURATION));
        for bad in ["", "s", "10", "10x", "-1s", "1.5s", "99999999999999999999s", "18446744073709551615h", "8785h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
