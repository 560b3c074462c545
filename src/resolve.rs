//! Name resolution (hickory) and address vetting (the SSRF guard, [`vet`]).
//!
//! The name is always queried in absolute form, so no search path ever turns
//! an external name into an in-cluster one. Every resolved address is vetted;
//! the dialler gets exactly the addresses that passed, so there is no second
//! lookup to rebind.
//!
//! # Timing
//!
//! `timeouts.dns` is one budget for the whole lookup, and an answer that
//! arrives anywhere inside it is used, whichever query it answers. hickory
//! (0.26) sends a UDP query and, while it has no answer, sends it again
//! from a new socket every 1.2 x the server's smoothed round-trip time (at
//! least 333 ms), at most three sends, listening on all of them: so each
//! lookup's one attempt is given the whole budget and hickory's own retry
//! after a failed attempt is off (a retry would drop the sockets of the
//! first attempt, and with them a late but valid answer). A lost packet
//! then costs about a third of a second, a slow server gets at most three
//! queries per record type, and nothing waits past the budget.
//!
//! The address families are queried one record type at a time (so a failed
//! A query is never mistaken for "no addresses"), each over UDP and, when
//! its answer cannot be read (a server that ignores the EDNS size and sends
//! a cut answer without the truncation bit), once more over TCP; a failure
//! is `dns_error` and is never cached.
//!
//! Vetted answers are cached in front of hickory's own
//! cache (hits are counted, vetting is not repeated), with LRU eviction and
//! each entry's clamped TTL; the resolver, with both caches, is kept across
//! reloads that leave `resolver:` and `timeouts.dns` unchanged.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver as HickoryResolver, TokioResolver};

use crate::name::ServerName;

pub mod vet;

pub use vet::Vetting;

/// Which address families to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpFamily {
    Ipv4Only,
    Ipv6Only,
    /// A records; AAAA only when there are none.
    #[default]
    Ipv4ThenIpv6,
    /// AAAA records; A only when there are none.
    Ipv6ThenIpv4,
    /// Both, IPv4 addresses tried first.
    Both,
}

/// Resolver settings from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverSettings {
    /// `None`: the system configuration (/etc/resolv.conf).
    pub nameservers: Option<Vec<SocketAddr>>,
    pub ip_family: IpFamily,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub cache_size: u64,
    /// The whole lookup (`timeouts.dns`).
    pub timeout: Duration,
    pub vetting: Vetting,
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read the system DNS configuration: {0}")]
    SystemConfig(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot build the DNS resolver: {0}")]
    Build(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Why resolution gave nothing to dial.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the name does not exist (NXDOMAIN)")]
    NxDomain,
    #[error("the name has no address records")]
    NoAddresses,
    #[error("DNS lookup timed out")]
    Timeout,
    #[error("DNS lookup failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("every address was refused by vetting: {}", Refused(.0))]
    AllRefused(Vec<(IpAddr, &'static str)>),
}

/// `ip (why), ...` for the access record's detail.
struct Refused<'a>(&'a [(IpAddr, &'static str)]);

impl fmt::Display for Refused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ip, why)) in self.0.iter().enumerate() {
            write!(f, "{}{ip} ({why})", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

impl ResolveError {
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::NxDomain => "dns_nxdomain",
            ResolveError::NoAddresses => "dns_no_addresses",
            ResolveError::Timeout => "dns_timeout",
            ResolveError::Failed(_) => "dns_error",
            ResolveError::AllRefused(_) => "address_refused",
        }
    }
}

/// Addresses that passed vetting, in the order to try them.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub addrs: Vec<IpAddr>,
    /// Addresses dropped by vetting, for the diagnostic log.
    pub refused: Vec<(IpAddr, &'static str)>,
    /// Answered from the gateway's cache.
    pub cached: bool,
}

/// A cached answer and the instant its clamped TTL runs out.
#[derive(Clone)]
struct Entry {
    until: Instant,
    resolved: Resolved,
}

/// Each entry lives until its own TTL runs out.
struct UntilTtl;

impl moka::Expiry<ServerName, Entry> for UntilTtl {
    fn expire_after_create(&self, _: &ServerName, entry: &Entry, created_at: Instant) -> Option<Duration> {
        Some(entry.until.saturating_duration_since(created_at))
    }
}

pub struct Resolver {
    /// UDP first (TCP for truncated answers).
    inner: TokioResolver,
    /// TCP only: for a UDP answer that could not be read (one larger than
    /// the EDNS size, sent cut and without the truncation bit).
    tcp: TokioResolver,
    settings: ResolverSettings,
    cache: moka::sync::Cache<ServerName, Entry>,
}

impl Resolver {
    pub fn new(settings: &ResolverSettings) -> Result<Resolver, BuildError> {
        let cache =
            moka::sync::Cache::builder().max_capacity(settings.cache_size.max(1)).expire_after(UntilTtl).build();
        Ok(Resolver {
            inner: hickory(settings, Transport::Udp)?,
            tcp: hickory(settings, Transport::Tcp)?,
            settings: settings.clone(),
            cache,
        })
    }

    /// The settings this resolver was built from: a reload with the same
    /// settings keeps this resolver and its caches.
    pub fn settings(&self) -> &ResolverSettings {
        &self.settings
    }

    /// Resolves `name` and vets every address.
    pub async fn resolve(&self, name: &ServerName) -> Result<Resolved, ResolveError> {
        if let Some(hit) = self.cache.get(name).filter(|e| e.until > Instant::now()) {
            return Ok(Resolved { cached: true, ..hit.resolved });
        }
        // hickory's own timeout is the same budget; this bounds the whole
        // lookup whatever it does inside.
        let (ips, until) = tokio::time::timeout(self.settings.timeout, self.lookup(&name.to_absolute()))
            .await
            .map_err(|_| ResolveError::Timeout)??;
        let mut resolved = Resolved { addrs: Vec::new(), refused: Vec::new(), cached: false };
        for ip in ips {
            match self.settings.vetting.vet(ip) {
                Ok(ip) if !resolved.addrs.contains(&ip) => resolved.addrs.push(ip),
                Ok(_) => {}
                Err(why) => resolved.refused.push((ip, why)),
            }
        }
        if resolved.addrs.is_empty() {
            if resolved.refused.is_empty() {
                return Err(ResolveError::NoAddresses);
            }
            return Err(ResolveError::AllRefused(resolved.refused));
        }
        self.cache.insert(name.clone(), Entry { until, resolved: resolved.clone() });
        Ok(resolved)
    }

    /// The addresses of `name` in the configured families, and until when
    /// they may be cached. The families are queried here rather than by
    /// hickory's `lookup_ip`, which takes an A query that failed for an
    /// IPv4-then-IPv6 "no addresses" when AAAA has none: a failure must stay
    /// a failure (`dns_error`, never cached).
    async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Instant), ResolveError> {
        use RecordType::{A, AAAA};
        let then = |first, second| async move {
            match self.family(name, first).await {
                Err(ResolveError::NoAddresses) => self.family(name, second).await,
                found => found,
            }
        };
        match self.settings.ip_family {
            IpFamily::Ipv4Only => self.family(name, A).await,
            IpFamily::Ipv6Only => self.family(name, AAAA).await,
            IpFamily::Ipv4ThenIpv6 => then(A, AAAA).await,
            IpFamily::Ipv6ThenIpv4 => then(AAAA, A).await,
            IpFamily::Both => match tokio::join!(self.family(name, A), self.family(name, AAAA)) {
                (Ok((mut v4, a)), Ok((v6, b))) => {
                    v4.extend(v6);
                    Ok((v4, a.min(b)))
                }
                (Ok(found), Err(ResolveError::NoAddresses)) | (Err(ResolveError::NoAddresses), Ok(found)) => Ok(found),
                (Err(ResolveError::NoAddresses), Err(e)) | (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(e),
            },
        }
    }

    /// One record type: over UDP, then over TCP if the UDP answer could
    /// not be read.
    async fn family(&self, name: &str, family: RecordType) -> Result<(Vec<IpAddr>, Instant), ResolveError> {
        let lookup = match self.inner.lookup(name, family).await.map_err(classify) {
            Err(ResolveError::Failed(_)) => self.tcp.lookup(name, family).await.map_err(classify),
            other => other,
        }?;
        let ips: Vec<IpAddr> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if ips.is_empty() {
            return Err(ResolveError::NoAddresses);
        }
        Ok((ips, lookup.valid_until()))
    }
}

/// Which connections a hickory resolver may use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// UDP, and TCP for truncated answers.
    Udp,
    /// TCP only.
    Tcp,
}

/// A hickory resolver whose one attempt takes the whole budget (see the
/// module doc), over `transport`.
fn hickory(settings: &ResolverSettings, transport: Transport) -> Result<TokioResolver, BuildError> {
    let connections = |port: u16| {
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = port;
        let mut udp = ConnectionConfig::udp();
        udp.port = port;
        if transport == Transport::Tcp { vec![tcp] } else { vec![udp, tcp] }
    };
    let name_servers: Vec<NameServerConfig> = match &settings.nameservers {
        Some(servers) => {
            servers.iter().map(|addr| NameServerConfig::new(addr.ip(), true, connections(addr.port()))).collect()
        }
        None => {
            let (system, _) =
                hickory_resolver::system_conf::read_system_conf().map_err(|e| BuildError::SystemConfig(Box::new(e)))?;
            let port = |server: &NameServerConfig| server.connections.first().map_or(53, |c| c.port);
            system
                .name_servers()
                .iter()
                .map(|server| {
                    NameServerConfig::new(server.ip, server.trust_negative_responses, connections(port(server)))
                })
                .collect()
        }
    };
    // No search domains: names are always absolute.
    let config = ResolverConfig::from_parts(None, vec![], name_servers);
    let mut builder = HickoryResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.positive_min_ttl = Some(settings.min_ttl);
    opts.negative_min_ttl = Some(settings.min_ttl);
    opts.positive_max_ttl = Some(settings.max_ttl);
    opts.negative_max_ttl = Some(settings.max_ttl);
    opts.cache_size = settings.cache_size;
    opts.timeout = settings.timeout;
    opts.attempts = 0;
    // Names are absolute (see `ServerName::to_absolute`); the hosts file
    // would let `localhost`-style entries bypass the operator's DNS.
    opts.ndots = 0;
    opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
    builder.build().map_err(|e| BuildError::Build(Box::new(e)))
}

fn classify(e: NetError) -> ResolveError {
    if e.is_nx_domain() {
        ResolveError::NxDomain
    } else if e.is_no_records_found() {
        ResolveError::NoAddresses
    } else if matches!(e, NetError::Timeout) {
        ResolveError::Timeout
    } else {
        ResolveError::Failed(Box::new(e))
    }
}
