//! Name resolution (hickory) and address vetting (the SSRF guard).
//!
//! The name is always queried in absolute form, so no search path ever turns
//! an external name into an in-cluster one. Every resolved address is vetted
//! against the built-in list of internal and special-purpose ranges, the
//! operator's `deny_cidrs` and `allow_cidrs`; the dialler gets exactly the
//! addresses that passed, so there is no second lookup to rebind.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver as HickoryResolver, TokioResolver};

use crate::name::ServerName;

/// An IP network in CIDR notation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}: expected an address and a prefix length, as in 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(String);

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().map_err(|_| err())?, Some(p)),
            None => (text.parse::<IpAddr>().map_err(|_| err())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().map_err(|_| err())?
            }
            Some(_) => return Err(err()),
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }

    const fn v4(a: [u8; 4], prefix: u8) -> Cidr {
        Cidr { addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])), prefix }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let s = segments;
        Cidr { addr: IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])), prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cidr({self})")
    }
}

/// Ranges a public egress gateway must never dial unless the operator says so
/// (IANA special-purpose registries, RFC 6890 and successors).
const BLOCKED: &[(Cidr, &str)] = &[
    (Cidr::v4([0, 0, 0, 0], 8), "this network / unspecified"),
    (Cidr::v4([10, 0, 0, 0], 8), "private (RFC 1918)"),
    (Cidr::v4([100, 64, 0, 0], 10), "carrier-grade NAT (RFC 6598)"),
    (Cidr::v4([127, 0, 0, 0], 8), "loopback"),
    (Cidr::v4([169, 254, 0, 0], 16), "link-local (cloud metadata)"),
    (Cidr::v4([172, 16, 0, 0], 12), "private (RFC 1918)"),
    (Cidr::v4([192, 0, 0, 0], 24), "IETF protocol assignments"),
    (Cidr::v4([192, 0, 2, 0], 24), "documentation"),
    (Cidr::v4([192, 88, 99, 0], 24), "6to4 relay anycast"),
    (Cidr::v4([192, 168, 0, 0], 16), "private (RFC 1918)"),
    (Cidr::v4([198, 18, 0, 0], 15), "benchmarking"),
    (Cidr::v4([198, 51, 100, 0], 24), "documentation"),
    (Cidr::v4([203, 0, 113, 0], 24), "documentation"),
    (Cidr::v4([224, 0, 0, 0], 4), "multicast"),
    (Cidr::v4([240, 0, 0, 0], 4), "reserved / broadcast"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "unspecified / loopback / IPv4-compatible"),
    (Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments (Teredo, ORCHID)"),
    (Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (Cidr::v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local (ULA)"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (deprecated)"),
    (Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Which resolved addresses may be dialled.
#[derive(Debug, Clone, Default)]
pub struct Vetting {
    /// Exceptions to the built-in blocked ranges (e.g. a private range the
    /// gateway must reach, or loopback in tests).
    pub allow_cidrs: Vec<Cidr>,
    /// Extra ranges to refuse (pod and service CIDRs); these win over `allow_cidrs`.
    pub deny_cidrs: Vec<Cidr>,
}

impl Vetting {
    /// The address to dial for `ip`, or why it is refused. IPv4 carried in
    /// IPv6 (mapped, NAT64 well-known prefix, 6to4) is judged by its IPv4
    /// address, so `::ffff:127.0.0.1` cannot slip past the loopback rule.
    pub fn vet(&self, ip: IpAddr) -> Result<IpAddr, &'static str> {
        let ip = ip.to_canonical();
        if self.deny_cidrs.iter().any(|c| c.contains(ip)) {
            return Err("deny_cidrs");
        }
        if self.allow_cidrs.iter().any(|c| c.contains(ip)) {
            return Ok(ip);
        }
        if let Some((_, why)) = BLOCKED.iter().find(|(c, _)| c.contains(ip)) {
            return Err(why);
        }
        if let Some(v4) = embedded_ipv4(ip) {
            self.vet(IpAddr::V4(v4))?;
        }
        Ok(ip)
    }
}

/// The IPv4 address inside a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address.
fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let bits = u128::from(v6);
    if Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96).contains(ip) {
        return Some(Ipv4Addr::from(bits as u32));
    }
    if Cidr::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16).contains(ip) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

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
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// `None`: the system configuration (/etc/resolv.conf).
    pub nameservers: Option<Vec<SocketAddr>>,
    pub ip_family: IpFamily,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub cache_size: u64,
    pub timeout: Duration,
    pub vetting: Vetting,
}

/// Why resolution gave nothing to dial. `label` is the access-log reason.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the name does not exist (NXDOMAIN)")]
    NxDomain,
    #[error("the name has no address records")]
    NoAddresses,
    #[error("DNS lookup timed out")]
    Timeout,
    #[error("DNS lookup failed: {0}")]
    Failed(String),
    #[error("every address was refused by vetting: {0}")]
    AllRefused(String),
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

/// Vetted answers by name, until their (clamped) TTL runs out. In front of
/// hickory's own cache so that hits are known (and counted) and vetting is
/// not repeated; hickory keeps caching negative answers.
struct Cache {
    entries: Mutex<HashMap<ServerName, (Instant, Resolved)>>,
    capacity: usize,
}

impl Cache {
    fn get(&self, name: &ServerName) -> Option<Resolved> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (until, resolved) = entries.get(name)?;
        (*until > Instant::now()).then(|| Resolved { cached: true, ..resolved.clone() })
    }

    fn put(&self, name: &ServerName, until: Instant, resolved: &Resolved) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= self.capacity {
            let now = Instant::now();
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(name.clone(), (until, resolved.clone()));
    }
}

pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
    vetting: Vetting,
    cache: Cache,
}

impl Resolver {
    pub fn new(settings: &ResolverSettings) -> Result<Resolver, String> {
        let mut builder = match &settings.nameservers {
            Some(servers) => {
                let name_servers = servers
                    .iter()
                    .map(|addr| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = addr.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = addr.port();
                        NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                    })
                    .collect();
                let config = ResolverConfig::from_parts(None, vec![], name_servers);
                HickoryResolver::builder_with_config(config, TokioRuntimeProvider::default())
            }
            None => {
                TokioResolver::builder_tokio().map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
            }
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.ip_strategy = match settings.ip_family {
            IpFamily::Ipv4Only => LookupIpStrategy::Ipv4Only,
            IpFamily::Ipv6Only => LookupIpStrategy::Ipv6Only,
            IpFamily::Ipv4ThenIpv6 => LookupIpStrategy::Ipv4thenIpv6,
            IpFamily::Ipv6ThenIpv4 => LookupIpStrategy::Ipv6thenIpv4,
            IpFamily::Both => LookupIpStrategy::Ipv4AndIpv6,
        };
        opts.positive_min_ttl = Some(settings.min_ttl);
        opts.negative_min_ttl = Some(settings.min_ttl);
        opts.positive_max_ttl = Some(settings.max_ttl);
        opts.negative_max_ttl = Some(settings.max_ttl);
        opts.cache_size = settings.cache_size;
        // Two tries per query within the overall budget: one lost UDP
        // packet must not use it all.
        opts.timeout = (settings.timeout / 2).max(Duration::from_millis(100));
        opts.attempts = 2;
        // Names are absolute (see `ServerName::to_absolute`); the hosts file
        // would let `localhost`-style entries bypass the operator's DNS.
        opts.ndots = 0;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let inner = builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        let cache = Cache {
            entries: Mutex::default(),
            capacity: usize::try_from(settings.cache_size).unwrap_or(usize::MAX).max(1),
        };
        Ok(Resolver { inner, timeout: settings.timeout, vetting: settings.vetting.clone(), cache })
    }

    /// Resolves `name` and vets every address.
    pub async fn resolve(&self, name: &ServerName) -> Result<Resolved, ResolveError> {
        if let Some(hit) = self.cache.get(name) {
            return Ok(hit);
        }
        // The resolver has its own per-query timeout and retries; this bounds
        // the whole lookup, whatever it does inside.
        let lookup = tokio::time::timeout(self.timeout, self.inner.lookup_ip(name.to_absolute()))
            .await
            .map_err(|_| ResolveError::Timeout)?
            .map_err(classify)?;
        let mut resolved = Resolved { addrs: Vec::new(), refused: Vec::new(), cached: false };
        for ip in lookup.iter() {
            match self.vetting.vet(ip) {
                Ok(ip) if !resolved.addrs.contains(&ip) => resolved.addrs.push(ip),
                Ok(_) => {}
                Err(why) => resolved.refused.push((ip, why)),
            }
        }
        if resolved.addrs.is_empty() {
            if resolved.refused.is_empty() {
                return Err(ResolveError::NoAddresses);
            }
            let list: Vec<String> = resolved.refused.iter().map(|(ip, why)| format!("{ip} ({why})")).collect();
            return Err(ResolveError::AllRefused(list.join(", ")));
        }
        self.cache.put(name, lookup.valid_until(), &resolved);
        Ok(resolved)
    }
}

fn classify(e: NetError) -> ResolveError {
    if e.is_nx_domain() {
        ResolveError::NxDomain
    } else if e.is_no_records_found() {
        ResolveError::NoAddresses
    } else if matches!(e, NetError::Timeout) {
        ResolveError::Timeout
    } else {
        ResolveError::Failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.255.1.2")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::ffff:10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fdff::1")));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/", "10.0.0/8", "x/8", "10.0.0.0/+8", "10.0.0.0/-1", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vetting_blocks_internal_ranges() {
        let v = Vetting::default();
        for blocked in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "::127.0.0.1",
        ] {
            assert!(v.vet(ip(blocked)).is_err(), "{blocked} should be refused");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "185.15.59.224",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(v.vet(ip(public)).is_ok(), "{public} should pass");
        }
        // Mapped addresses are dialled as IPv4.
        assert_eq!(v.vet(ip("::ffff:8.8.8.8")), Ok(ip("8.8.8.8")));
    }

    #[test]
    fn allow_and_deny_cidrs() {
        let v = Vetting {
            allow_cidrs: vec![Cidr::parse("127.0.0.0/8").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()],
            deny_cidrs: vec![Cidr::parse("10.96.0.0/12").unwrap(), Cidr::parse("203.0.113.0/24").unwrap()],
        };
        assert!(v.vet(ip("127.0.0.1")).is_ok());
        assert!(v.vet(ip("::ffff:127.0.0.1")).is_ok());
        assert!(v.vet(ip("10.1.0.1")).is_ok());
        assert_eq!(v.vet(ip("10.96.0.10")), Err("deny_cidrs"));
        assert!(v.vet(ip("169.254.169.254")).is_err());
        assert!(v.vet(ip("203.0.113.5")).is_err());
    }
}
