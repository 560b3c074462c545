//! Configuration: the YAML schema ([`schema`], unknown keys refused), its
//! validation into the domain types the gateway runs on ([`validate`]), and
//! errors with their place in the file ([`error`]).
//!
//! Every error carries the line and column of the offending value and names
//! the key. Parsing works on a `&str`, so tests use inline YAML; paths in the
//! file are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::arrive::mtls::{MaterialError, MaterialPaths, MinVersion, OuterSettings};
use crate::observe::metrics::Caps;
use crate::policy::PolicySpec;
use crate::resolve::ResolverSettings;

mod error;
mod schema;
mod validate;

pub use error::{ConfigError, Pos};
pub use schema::{MAX_DURATION, parse_duration};
pub(crate) use validate::is_public_suffix;

/// Defaults, each with the reason for its value.
pub mod defaults {
    use std::time::Duration;

    pub const UPSTREAM_PORT: u16 = 443;
    /// The plain-HTTP front's upstream port.
    pub const HTTP_PORT: u16 = 80;
    /// Outer handshake: a mesh sidecar on the same network completes it in
    /// milliseconds; 10 s tolerates a loaded node and still frees a slot held
    /// by a client that connects and sends nothing.
    pub const HANDSHAKE: Duration = Duration::from_secs(10);
    /// Inner ClientHello: clients send it right after connecting; 10 s, as
    /// the outer handshake (nginx uses 30 s, proksi 10 s).
    pub const CLIENT_HELLO: Duration = Duration::from_secs(10);
    /// DNS, the whole lookup: what glibc and hickory allow one query (5 s),
    /// with its resends inside it.
    pub const DNS: Duration = Duration::from_secs(5);
    /// Connect, per address: a reachable host answers within a few round
    /// trips; 5 s leaves time for the next address within a client's patience.
    pub const CONNECT: Duration = Duration::from_secs(5);
    /// Connect, all addresses together: two full attempts, and well inside
    /// the patience of common clients (curl and browsers wait far longer,
    /// but a caller behind a sidecar sees nothing until the alert).
    pub const CONNECT_TOTAL: Duration = Duration::from_secs(10);
    /// Idle: Envoy's tcp_proxy default, so behaviour under Istio does not
    /// change when snigress replaces an Envoy gateway.
    pub const IDLE: Duration = Duration::from_secs(3600);
    /// Idle once one side has finished its stream: as HAProxy's `timeout
    /// client-fin`/`server-fin`; a minute is long for a response still to
    /// come after the request has ended, short for a peer that neither reads
    /// nor closes.
    pub const HALF_CLOSE: Duration = Duration::from_secs(60);
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
    /// Connections still before their destination is known, as a share of
    /// `max_connections`: a quarter, so sockets that connect and say
    /// nothing can never take the slots of working connections.
    pub const PENDING_SHARE: usize = 4;
    /// ...but at least this many (or all, when fewer are allowed): a small
    /// gateway must still take a burst of new connections at once.
    pub const PENDING_MIN: usize = 64;
    /// The first byte of a connection: a real client sends its ClientHello
    /// (or outer handshake) right after connecting; 2 s frees a slot held by
    /// one that never does long before the handshake timeout would.
    pub const FIRST_BYTE: Duration = Duration::from_secs(2);
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
    /// The fronts served: TLS (the default), CONNECT, plain HTTP.
    pub protocols: crate::front::Protocols,
    /// Where the TLS front's connections go (and the plain-HTTP front's on
    /// a listener without a TLS front).
    pub upstream_port: u16,
    /// Where the plain-HTTP front's connections go.
    pub http_port: u16,
    /// A PROXY protocol header comes first, from trusted sources only.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Connections intercepted by iptables: where the client really went.
    pub original_destination: Option<OriginalDestination>,
    /// Whether the name must resolve to the original destination.
    pub verify_destination: VerifyDestination,
    /// `SO_MARK` on this listener's upstream sockets.
    pub upstream_mark: Option<u32>,
}

/// `connect:`: what the CONNECT front lets clients ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSettings {
    /// Ports a CONNECT may name.
    pub allowed_ports: Vec<u16>,
    /// A tunnelled ClientHello must carry an SNI.
    pub require_sni: bool,
    /// `CONNECT ip:port` is served: the tunnelled SNI is then the name
    /// policy decides on, and it must resolve to that address.
    pub allow_ip_literals: bool,
    /// Ports whose tunnels are not inspected (they may carry anything).
    pub plaintext_ports: Vec<u16>,
}

impl Default for ConnectSettings {
    fn default() -> ConnectSettings {
        ConnectSettings {
            allowed_ports: vec![443],
            require_sni: true,
            allow_ip_literals: false,
            plaintext_ports: Vec::new(),
        }
    }
}

/// `listeners[].proxy_protocol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    pub versions: crate::arrive::proxy::Versions,
    /// Peers whose header is honoured; any other peer is refused.
    pub trusted_sources: Vec<ipnet::IpNet>,
    pub identity: ProxyIdentity,
    /// What a `0xD0` identity's trust domain must be.
    pub trust_domains: Vec<String>,
}

/// Where a PROXY header's caller identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyIdentity {
    /// None: the caller has no identity.
    #[default]
    None,
    /// Istio's `0xD0` TLV (ztunnel): the caller's SPIFFE ID.
    IstioTlv,
}

/// How an intercepted connection's original destination is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OriginalDestination {
    /// iptables `REDIRECT` (nat): `SO_ORIGINAL_DST`.
    Redirect,
    /// iptables `TPROXY` (mangle): the accepted socket's local address.
    Tproxy,
}

impl OriginalDestination {
    pub fn as_str(self) -> &'static str {
        match self {
            OriginalDestination::Redirect => "redirect",
            OriginalDestination::Tproxy => "tproxy",
        }
    }
}

/// `listeners[].verify_destination`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyDestination {
    /// The name must resolve to the original destination's address, which
    /// is the one dialled.
    Strict,
    /// The name decides; the original destination is only recorded.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub min_version: MinVersion,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The first byte after connecting.
    pub first_byte: Duration,
    pub handshake: Duration,
    pub client_hello: Duration,
    pub dns: Duration,
    /// Each upstream address.
    pub connect: Duration,
    /// Every upstream address together.
    pub connect_total: Duration,
    pub idle: Duration,
    /// Idle, once one direction has finished.
    pub half_close: Duration,
    /// Longest a connection may live, whatever it does; `None`: no limit.
    pub max_lifetime: Option<Duration>,
}

/// The metrics endpoint and label caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSettings {
    /// `None`: no endpoint (metrics are still kept).
    pub address: Option<SocketAddr>,
    pub caps: Caps,
    /// Also Istio's `istio_tcp_*` families.
    pub istio_compatible: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// Connections whose destination is not known yet (outer handshake or
    /// ClientHello still to come); past it the oldest such one is evicted.
    pub max_pending_connections: usize,
    pub client_hello_bytes: usize,
    /// Per caller identity: open connections and the new-connection rate.
    pub identity: crate::identity_limits::Settings,
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
    pub connect: ConnectSettings,
    /// Refuse inner ClientHellos that carry encrypted_client_hello.
    pub refuse_ech: bool,
    /// How allowed connections leave (none: all direct).
    pub routes: crate::route::Routes,
}

/// Largest config accepted: far above any real one (10 000 patterns are
/// about 300 KiB), small enough that a wrong file or a runaway generator is
/// refused before it costs memory.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// Reads a config file's text.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let name = path.display().to_string();
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::plain(&name, format!("cannot read the config file {name}: {e}")))
}

/// The directory relative paths in the config file at `path` are taken
/// from (`.` for a bare file name).
pub fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// An error about the certificate files, pointed at the `mtls.<key>` it is
/// about in `text` (the file's own text, which the domain config does not
/// keep); with a dev PKI, at `mtls.dev_pki`.
pub fn locate_mtls(text: &str, source_name: &str, key: &str, message: String) -> ConfigError {
    let raw: Option<schema::RawConfig> = serde_saphyr::from_str(text).ok();
    let pos = raw.as_ref().and_then(|r| r.mtls.as_ref()).and_then(|m| {
        let m = &m.value;
        let value = match (&m.dev_pki, key) {
            (Some(dir), _) => Some(dir),
            (None, "cert") => m.cert.as_ref(),
            (None, "key") => m.key.as_ref(),
            (None, "client_ca") => m.client_ca.as_ref(),
            _ => None,
        };
        value.and_then(Pos::of)
    });
    ConfigError::at(source_name, text, pos, message)
}

/// A certificate-loading error, pointed at its key (see [`locate_mtls`]).
pub fn locate(text: &str, source_name: &str, e: &MaterialError) -> ConfigError {
    locate_mtls(text, source_name, e.key(), e.to_string())
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read(path)?, &path.display().to_string(), &base_dir(path))
    }

    /// Validates config text; relative paths are taken from `base`.
    pub fn parse(text: &str, source_name: &str, base: &Path) -> Result<Config, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::plain(
                source_name,
                format!(
                    "the config is {} bytes, more than the {} a config may be (10 000 patterns take about 300 KiB): \
                     is this the right file?",
                    text.len(),
                    "4 MiB"
                ),
            ));
        }
        if text.trim().is_empty() {
            return Err(ConfigError::plain(
                source_name,
                "the config is empty: it needs at least a `listeners:` list (every key is in config/snigress.yaml)"
                    .into(),
            ));
        }
        let raw: schema::RawConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::parse(source_name, &e))?;
        validate::validate(raw, &validate::Ctx { source_name, text, base })
    }

    /// Whether any listener terminates the outer mTLS layer.
    pub fn needs_mesh_tls(&self) -> bool {
        self.listeners.iter().any(|l| l.mode == Mode::Mtls)
    }

    /// The certificate files the outer layer reads (the dev PKI's files
    /// when a dev PKI is configured).
    pub fn material_paths(&self) -> Option<MaterialPaths> {
        match &self.mtls.as_ref()?.source {
            MtlsSource::Files(paths) => Some(paths.clone()),
            MtlsSource::DevPki(dir) => Some(MaterialPaths::dev_pki(dir)),
        }
    }

    /// The same, as a list: what a reload reads and watches.
    pub fn material_files(&self) -> Vec<PathBuf> {
        self.material_paths().map(|p| p.files().map(Path::to_owned).to_vec()).unwrap_or_default()
    }

    /// Outer-layer settings for mtls listeners.
    pub fn outer_settings(&self) -> Option<OuterSettings> {
        let mtls = self.mtls.as_ref()?;
        Some(OuterSettings {
            paths: self.material_paths()?,
            trust_domains: mtls.trust_domains.clone(),
            alpn: mtls.alpn.clone(),
            min_version: mtls.min_version,
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
        if self.limits.max_pending_connections != running.limits.max_pending_connections {
            keys.push("limits.max_pending_connections");
        }
        if self.shutdown != running.shutdown {
            keys.push("shutdown");
        }
        keys
    }
}

/// The config fuzz target's check, also run on every corpus file by `cargo
/// test` (`test-util` feature): parsing ends in a config or an error, never
/// a panic, and an error stays small whatever the text.
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing {
    pub fn check_parse(text: &str) {
        if let Err(e) = super::Config::parse(text, "fuzz.yaml", std::path::Path::new(".")) {
            let shown = e.to_string();
            // Cut lines, plus the renderer's gutter and the "more bytes" note.
            let longest = shown.lines().map(|l| l.chars().count()).max().unwrap_or(0);
            assert!(longest <= super::error::MAX_LINE + 64, "an error line of {longest} characters");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::IpFamily;

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
            (&format!("{MINIMAL}mtls:\n  dev_pki: pki\n  min_version: \"1.1\"\n"), 7, 16, "mtls.min_version"),
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
    fn arrival_keys_default_and_refuse_what_cannot_work() {
        let c = parse(MINIMAL).unwrap();
        let l = &c.listeners[0];
        assert_eq!(
            (&l.proxy_protocol, l.original_destination, l.verify_destination),
            (&None, None, VerifyDestination::Off)
        );
        let ambient = "listeners:\n  - name: ambient\n    address: 127.0.0.1:15088\n    mode: passthrough\n    proxy_protocol:\n      trusted_sources: [127.0.0.1/32]\n      identity: istio_tlv\n";
        let p = parse(ambient).unwrap().listeners[0].proxy_protocol.clone().unwrap();
        assert_eq!(p.versions, crate::arrive::proxy::Versions::ALL);
        assert_eq!(
            (p.identity, p.trust_domains.as_slice()),
            (ProxyIdentity::IstioTlv, &["cluster.local".to_owned()][..])
        );
        let transparent = "listeners:\n  - name: t\n    address: 127.0.0.1:15001\n    mode: passthrough\n    original_destination: redirect\n    upstream_mark: 1337\n";
        let l = parse(transparent).unwrap().listeners[0].clone();
        assert_eq!(
            (l.original_destination, l.verify_destination, l.upstream_mark),
            (Some(OriginalDestination::Redirect), VerifyDestination::Strict, Some(1337))
        );

        let head = "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    mode: passthrough\n";
        let cases: &[(&str, u64, u64, &str)] = &[
            ("    proxy_protocol: {versions: [v2]}\n", 5, 21, "trusted_sources: missing"),
            ("    proxy_protocol: {trusted_sources: []}\n", 5, 39, "at least one network"),
            ("    proxy_protocol: {trusted_sources: [10.0.0.0/8], versions: [v3]}\n", 5, 64, "unknown variant `v3`"),
            (
                "    proxy_protocol: {trusted_sources: [10.0.0.0/8], versions: [v1], identity: istio_tlv}\n",
                5,
                21,
                "PROXY v2 only",
            ),
            (
                "    proxy_protocol: {trusted_sources: [10.0.0.0/8], identity: spiffe}\n",
                5,
                63,
                "unknown variant `spiffe`",
            ),
            (
                "    proxy_protocol: {trusted_sources: [10.0.0.0/8], trust_domains: [\"A B\"]}\n",
                5,
                69,
                "not a valid trust domain",
            ),
            (
                "    proxy_protocol: {trusted_sources: [10.0.0.0/8]}\n    original_destination: redirect\n",
                6,
                27,
                "not both",
            ),
            ("    original_destination: nat\n", 5, 27, "unknown variant `nat`"),
            ("    verify_destination: strict\n", 5, 25, "strict needs a destination"),
            ("    original_destination: tproxy\n    upstream_mark: 0\n", 6, 20, "0 means no mark"),
        ];
        let mut wrong = Vec::new();
        for (tail, line, column, needle) in cases {
            let e = err(&format!("{head}{tail}"));
            let text = e.to_string();
            if e.pos != Some(Pos { line: *line, column: *column }) || !text.contains(needle) {
                wrong.push(format!("expected {needle:?} at {line}:{column}, got {:?}:\n{text}", e.pos));
            }
        }
        let mtls = "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    mode: mtls\n    original_destination: redirect\nmtls:\n  dev_pki: pki\n";
        assert!(err(mtls).to_string().contains("use mode: passthrough"));
        let mtls = "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    mode: mtls\n    proxy_protocol: {trusted_sources: [10.0.0.0/8], identity: istio_tlv}\nmtls:\n  dev_pki: pki\n";
        assert!(err(mtls).to_string().contains("client certificate"));
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
    fn certificate_errors_point_at_their_key() {
        let text = format!("{MINIMAL}mtls:\n  cert: a.pem\n  key: b.pem\n  client_ca: c.pem\n");
        let e = MaterialError::Key("b.pem".into(), "cannot read".into());
        let located = locate(&text, "test.yaml", &e);
        assert_eq!(located.pos, Some(Pos { line: 7, column: 8 }));
        assert!(located.to_string().contains("test.yaml:7:8"), "{located}");
    }

    #[test]
    fn huge_values_and_files_give_small_errors() {
        let pattern = format!("a.*.{}", "x".repeat(3_000_000));
        let e = err(&format!("{MINIMAL}policy:\n  allow: [\"{pattern}\"]\n"));
        let text = e.to_string();
        assert!(text.len() < 4096, "{} bytes", text.len());
        assert!(text.contains("invalid pattern") && text.contains("more bytes"), "{text}");
        assert_eq!(e.pos.map(|p| p.line), Some(6));

        let big = format!("{MINIMAL}# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        let text = err(&big).to_string();
        assert!(text.contains("more than the 4 MiB") && text.len() < 1024, "{text}");

        // Past the YAML reader's node budget: said in words.
        let nodes = format!("{MINIMAL}policy:\n  allow: [{}]\n", vec!["a.example"; 300_000].join(","));
        let text = err(&nodes).to_string();
        assert!(text.contains("too large or too deeply nested"), "{}", &text[..text.len().min(500)]);
        assert!(text.len() < 1024, "{} bytes", text.len());
    }

    #[test]
    fn fronts_and_their_ports() {
        let listener = |extra: &str| {
            let c =
                parse(&format!("listeners:\n  - name: l\n    address: 127.0.0.1:1\n    mode: passthrough\n{extra}"));
            c.expect("valid").listeners[0].clone()
        };
        let l = listener("");
        assert_eq!((l.protocols, l.upstream_port, l.http_port), (crate::front::Protocols::TLS, 443, 80));
        let l = listener("    protocol: http\n");
        assert_eq!((l.protocols.names(), l.upstream_port, l.http_port), (vec!["http"], 80, 80));
        let l = listener("    protocol: http\n    upstream_port: 8080\n");
        assert_eq!((l.upstream_port, l.http_port), (8080, 8080));
        let l = listener("    protocol: auto\n    http_upstream_port: 8080\n");
        assert_eq!((l.protocols.names(), l.upstream_port, l.http_port), (vec!["tls", "connect", "http"], 443, 8080));
        let l = listener("    protocol: [connect, http]\n");
        assert_eq!((l.protocols.names(), l.http_port), (vec!["connect", "http"], 80));
        assert_eq!(parse(MINIMAL).expect("valid").connect, ConnectSettings::default());
        let c = parse(&format!(
            "{MINIMAL}connect:\n  allowed_ports: [443, 25]\n  plaintext_ports: [25]\n  require_sni: false\n"
        ))
        .expect("valid");
        assert_eq!(
            c.connect,
            ConnectSettings {
                allowed_ports: vec![443, 25],
                require_sni: false,
                allow_ip_literals: false,
                plaintext_ports: vec![25]
            }
        );

        let base = "listeners:\n  - name: l\n    address: 127.0.0.1:1\n    mode: passthrough\n";
        for (extra, line, wanted) in [
            ("    protocol: quic\n", 5, "unknown protocol \"quic\""),
            ("    protocol: [tls, auto]\n", 5, "auto stands alone"),
            ("    protocol: [tls, tls]\n", 5, "tls is named twice"),
            ("    protocol: []\n", 5, "at least one of tls, connect, http"),
            ("    http_upstream_port: 81\n", 5, "no plain-HTTP front"),
            ("    protocol: connect\n    original_destination: redirect\n", 6, "CONNECT does not apply"),
            ("connect:\n  allowed_ports: []\n", 6, "connect.allowed_ports: at least one port"),
            ("connect:\n  plaintext_ports: [25]\n", 6, "25 is not in connect.allowed_ports"),
            ("connect:\n  allowed_ports: [0]\n", 6, "1-65535"),
            ("connect:\n  ports: [443]\n", 6, "unknown field `ports`"),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert!(e.to_string().contains(wanted), "{extra:?}: {e}");
            assert_eq!(e.pos.map(|p| p.line), Some(line), "{extra:?}: {e}");
        }
    }

    #[test]
    fn wildcards_over_a_public_suffix_are_refused_unless_meant() {
        for (allow, column) in [
            ("[\"*.com\"]", 11),
            ("[a.example, \"*.co.uk\"]", 22),
            ("[\"*.github.io\"]", 11),
            ("[\"*.s3.amazonaws.com\"]", 11),
        ] {
            let e = err(&format!("{MINIMAL}policy:\n  allow: {allow}\n"));
            assert!(e.to_string().contains("public suffix"), "{allow}: {e}");
            assert_eq!(e.pos.map(|p| (p.line, p.column)), Some((6, column)), "{allow}: {e}");
        }
        let e = err(&format!("{MINIMAL}policy:\n  rules:\n    - namespaces: [a]\n      allow: [\"*.com\"]\n"));
        assert!(e.to_string().contains("policy.rules[0].allow"), "{e}");
        let c = parse(&format!("{MINIMAL}policy:\n  allow: [{{pattern: \"*.github.io\", public_suffix: true}}, \"*.github.com\", \"*.svc.cluster.local\"]\n"))
            .expect("meant, or not a public suffix");
        assert_eq!(c.policy.allow.len(), 3);
        let e = err(&format!("{MINIMAL}policy:\n  allow: [{{pattern: \"*.com\", public: true}}]\n"));
        assert!(e.to_string().contains("unknown field"), "{e}");
        // Deny lists may cover a public suffix: that only refuses more.
        assert!(parse(&format!("{MINIMAL}policy:\n  allow: [a.example]\n  deny: [\"*.zip\"]\n")).is_ok());
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
