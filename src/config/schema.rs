//! The YAML schema as written: `Raw*` structs, every unknown key refused,
//! every missing key defaulted by its struct's one `Default` impl, and scalar
//! fields parsed as they are read (so their errors carry their location).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::{Location, Spanned};

use super::{Mode, OriginalDestination, ProxyIdentity, VerifyDestination, defaults};
use crate::identity::Principal;
use crate::observe::metrics::defaults as metric_defaults;
use crate::policy::Pattern;
use crate::resolve::IpFamily;

/// A default value: it has no place in the file.
fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub listeners: Spanned<Vec<Spanned<RawListener>>>,
    #[serde(default)]
    pub mtls: Option<Spanned<RawMtls>>,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub resolver: RawResolver,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub access_log: RawAccessLog,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub connect: Option<Spanned<RawConnect>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub name: Spanned<String>,
    #[serde(default, rename = "match")]
    pub when: RawRouteMatch,
    #[serde(default)]
    pub bind: Option<Spanned<Parsed<IpAddr>>>,
    #[serde(default)]
    pub freebind: bool,
    #[serde(default)]
    pub mark: Option<Spanned<u32>>,
    #[serde(default)]
    pub next_hop: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    pub proxy_protocol: Option<Spanned<ProxyVersion>>,
    #[serde(default)]
    pub allow_cidrs: Option<Spanned<Vec<Parsed<Cidr>>>>,
    #[serde(default)]
    pub http_proxy: Option<Spanned<String>>,
    #[serde(default)]
    pub proxy_auth_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRouteMatch {
    pub principals: Vec<Parsed<PrincipalSelector>>,
    pub namespaces: Vec<Spanned<String>>,
    pub service_accounts: Vec<Spanned<String>>,
    pub sources: Vec<Parsed<Cidr>>,
    pub names: Vec<Parsed<Pattern>>,
    pub listeners: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub name: Spanned<String>,
    pub address: Spanned<Parsed<Address>>,
    pub mode: Spanned<Mode>,
    #[serde(default)]
    pub protocol: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    pub upstream_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub http_upstream_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub proxy_protocol: Option<Spanned<RawProxyProtocol>>,
    #[serde(default)]
    pub original_destination: Option<Spanned<OriginalDestination>>,
    #[serde(default)]
    pub verify_destination: Option<Spanned<VerifyDestination>>,
    #[serde(default)]
    pub upstream_mark: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyProtocol {
    #[serde(default)]
    pub versions: Option<Spanned<Vec<ProxyVersion>>>,
    #[serde(default)]
    pub trusted_sources: Option<Spanned<Vec<Parsed<Cidr>>>>,
    #[serde(default)]
    pub identity: ProxyIdentity,
    #[serde(default)]
    pub trust_domains: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `v1` or `v2`.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum ProxyVersion {
    V1,
    V2,
}

/// One string or a list of them (`protocol: auto`, `protocol: [tls,
/// http]`; `next_hop: a:1` or a list).
pub(super) struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(OneOrMany(names))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConnect {
    pub allowed_ports: Spanned<Vec<u16>>,
    pub require_sni: bool,
    pub allow_ip_literals: bool,
    pub plaintext_ports: Spanned<Vec<u16>>,
}

impl Default for RawConnect {
    fn default() -> Self {
        let d = super::ConnectSettings::default();
        RawConnect {
            allowed_ports: unspanned(d.allowed_ports),
            require_sni: d.require_sni,
            allow_ip_literals: d.allow_ip_literals,
            plaintext_ports: unspanned(d.plaintext_ports),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMtls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub dev_pki: Option<Spanned<String>>,
    pub trust_domains: Option<Spanned<Vec<Spanned<String>>>>,
    pub alpn: Vec<Spanned<String>>,
    pub min_version: Option<Spanned<TlsVersion>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    pub allow: Vec<Spanned<AllowEntry>>,
    pub deny: Vec<Parsed<Pattern>>,
    pub rules: Vec<Spanned<RawRule>>,
    pub refuse_ech: bool,
    pub mode: crate::policy::Mode,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRule {
    pub name: Option<Spanned<String>>,
    pub principals: Vec<Parsed<PrincipalSelector>>,
    pub namespaces: Vec<Spanned<String>>,
    pub service_accounts: Vec<Spanned<String>>,
    pub allow: Vec<Spanned<AllowEntry>>,
    pub deny: Vec<Parsed<Pattern>>,
    pub mode: Option<crate::policy::Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawResolver {
    pub nameservers: Option<Spanned<Vec<Parsed<Nameserver>>>>,
    pub ip_family: IpFamily,
    pub min_ttl: Spanned<Dur>,
    pub max_ttl: Spanned<Dur>,
    pub cache_size: u64,
    pub allow_cidrs: Vec<Parsed<Cidr>>,
    pub deny_cidrs: Vec<Parsed<Cidr>>,
}

impl Default for RawResolver {
    fn default() -> Self {
        RawResolver {
            nameservers: None,
            ip_family: IpFamily::default(),
            min_ttl: unspanned(Dur(defaults::MIN_TTL)),
            max_ttl: unspanned(Dur(defaults::MAX_TTL)),
            cache_size: defaults::CACHE_SIZE,
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTimeouts {
    pub first_byte: Spanned<Dur>,
    pub handshake: Spanned<Dur>,
    pub client_hello: Spanned<Dur>,
    pub dns: Spanned<Dur>,
    pub connect: Spanned<Dur>,
    pub connect_total: Spanned<Dur>,
    pub idle: Spanned<Dur>,
    pub half_close: Spanned<Dur>,
    pub max_lifetime: Option<Spanned<Dur>>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            first_byte: unspanned(Dur(defaults::FIRST_BYTE)),
            handshake: unspanned(Dur(defaults::HANDSHAKE)),
            client_hello: unspanned(Dur(defaults::CLIENT_HELLO)),
            dns: unspanned(Dur(defaults::DNS)),
            connect: unspanned(Dur(defaults::CONNECT)),
            connect_total: unspanned(Dur(defaults::CONNECT_TOTAL)),
            idle: unspanned(Dur(defaults::IDLE)),
            half_close: unspanned(Dur(defaults::HALF_CLOSE)),
            max_lifetime: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub max_connections: Spanned<usize>,
    pub max_connections_per_source: Spanned<usize>,
    /// Default: a quarter of `max_connections`.
    pub max_pending_connections: Option<Spanned<usize>>,
    pub client_hello_bytes: Spanned<usize>,
    pub max_connections_per_identity: Option<Spanned<usize>>,
    pub connection_rate_per_identity: Option<Spanned<RawRate>>,
}

/// `limits.connection_rate_per_identity`: `{rate: 50/s, burst: 100}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub rate: Spanned<String>,
    #[serde(default)]
    pub burst: Option<Spanned<u32>>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: unspanned(defaults::MAX_CONNECTIONS),
            max_connections_per_source: unspanned(defaults::MAX_CONNECTIONS_PER_SOURCE),
            max_pending_connections: None,
            client_hello_bytes: unspanned(defaults::CLIENT_HELLO_BYTES),
            max_connections_per_identity: None,
            connection_rate_per_identity: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub address: Option<Spanned<Parsed<Address>>>,
    pub max_sni_values: Spanned<usize>,
    pub max_source_values: Spanned<usize>,
    pub max_sni_source_pairs: Spanned<usize>,
    pub istio_compatible: bool,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            address: None,
            max_sni_values: unspanned(metric_defaults::MAX_SNI_VALUES),
            max_source_values: unspanned(metric_defaults::MAX_SOURCE_VALUES),
            max_sni_source_pairs: unspanned(metric_defaults::MAX_SNI_SOURCE_PAIRS),
            istio_compatible: false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccessLog {
    /// A file to append to; absent or "-" for stdout.
    pub path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShutdown {
    pub grace_period: Spanned<Dur>,
    pub drain_timeout: Spanned<Dur>,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown {
            grace_period: unspanned(Dur(defaults::SHUTDOWN_GRACE)),
            drain_timeout: unspanned(Dur(defaults::DRAIN)),
        }
    }
}

// ---------------------------------------------------------------------------
// Scalar fields validated as they are read, so errors carry their location.

/// A string field parsed with `T`'s `FromStr`, whose error is the message.
pub(super) struct Parsed<T>(pub T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(de::Error::custom)
    }
}

/// `ip:port`.
pub(super) struct Address(pub SocketAddr);

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.parse()
            .map(Address)
            .map_err(|_| format!("invalid address {s:?}: expected ip:port, as in 127.0.0.1:8443 or [::]:8443"))
    }
}

/// A nameserver: `ip:port`, or `ip` for port 53.
pub(super) struct Nameserver(pub SocketAddr);

impl FromStr for Nameserver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Nameserver(addr));
        }
        s.parse::<IpAddr>()
            .map(|ip| Nameserver(SocketAddr::new(ip, 53)))
            .map_err(|_| format!("invalid nameserver {s:?}: expected ip or ip:port, as in 10.96.0.10:53"))
    }
}

/// A network in CIDR notation.
pub(super) struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = crate::resolve::vet::CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::resolve::vet::parse_cidr(s).map(Cidr)
    }
}

/// An allow entry: a pattern, or `{pattern: "*.github.io", public_suffix:
/// true}` to allow a wildcard over a public suffix on purpose.
pub(super) struct AllowEntry {
    pub pattern: Pattern,
    pub public_suffix: bool,
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            pattern: String,
            #[serde(default)]
            public_suffix: bool,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AllowEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a pattern, or {pattern: ..., public_suffix: true}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AllowEntry, E> {
                let pattern = v.parse().map_err(de::Error::custom)?;
                Ok(AllowEntry { pattern, public_suffix: false })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<AllowEntry, A::Error> {
                let long = Long::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let pattern = long.pattern.parse().map_err(de::Error::custom)?;
                Ok(AllowEntry { pattern, public_suffix: long.public_suffix })
            }
        }
        d.deserialize_any(V)
    }
}

/// A principal selector: a SPIFFE ID with or without `spiffe://`, stored
/// without it.
pub(super) struct PrincipalSelector(pub String);

impl FromStr for PrincipalSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let full = if s.starts_with("spiffe://") { s.to_owned() } else { format!("spiffe://{s}") };
        Principal::parse(&full)
            .map(|p| PrincipalSelector(p.without_scheme().to_owned()))
            .map_err(|e| format!("invalid principal {s:?}: {e}"))
    }
}

/// `mtls.min_version`: "1.2" or "1.3", quoted or not (YAML reads 1.2 as a
/// number).
pub(super) struct TlsVersion(pub crate::arrive::mtls::MinVersion);

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use crate::arrive::mtls::MinVersion;
        struct V;
        impl Visitor<'_> for V {
            type Value = TlsVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"1.2\" or \"1.3\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TlsVersion, E> {
                match v {
                    "1.2" => Ok(TlsVersion(MinVersion::Tls12)),
                    "1.3" => Ok(TlsVersion(MinVersion::Tls13)),
                    _ => Err(E::custom(format!(
                        "mtls.min_version: {:?} is not \"1.2\" (TLS 1.2 and 1.3, Istio's default) or \"1.3\"",
                        super::error::clip_lines(v)
                    ))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TlsVersion, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration: `250ms`, `10s`, `5m`, `1h`, or a number of seconds.
#[derive(Clone, Copy)]
pub(super) struct Dur(pub Duration);

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
