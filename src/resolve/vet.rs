//! Address vetting: the SSRF guard between DNS and the dialler.
//!
//! Every resolved address is judged against the built-in list of internal
//! and special-purpose ranges, the operator's `deny_cidrs` and
//! `allow_cidrs`; IPv4 carried in IPv6 is judged as IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}: expected an address and a prefix length, as in 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(String);

/// A network in CIDR notation (an address alone is its own /32 or /128);
/// host bits are dropped.
pub fn parse_cidr(text: &str) -> Result<IpNet, CidrError> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => text.parse::<IpAddr>().map(IpNet::from).map_err(|_| CidrError(text.to_owned()))?,
    };
    Ok(net.trunc())
}

const fn v4(a: [u8; 4], prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a[0], a[1], a[2], a[3]), prefix))
}

const fn v6(s: [u16; 8], prefix: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]), prefix))
}

/// Ranges a public egress gateway must never dial unless the operator says so
/// (IANA special-purpose registries, RFC 6890 and successors).
const BLOCKED: &[(IpNet, &str)] = &[
    (v4([0, 0, 0, 0], 8), "this network / unspecified"),
    (v4([10, 0, 0, 0], 8), "private (RFC 1918)"),
    (v4([100, 64, 0, 0], 10), "carrier-grade NAT (RFC 6598)"),
    (v4([127, 0, 0, 0], 8), "loopback"),
    (v4([169, 254, 0, 0], 16), "link-local (cloud metadata)"),
    (v4([172, 16, 0, 0], 12), "private (RFC 1918)"),
    (v4([192, 0, 0, 0], 24), "IETF protocol assignments"),
    (v4([192, 0, 2, 0], 24), "documentation"),
    (v4([192, 88, 99, 0], 24), "6to4 relay anycast"),
    (v4([192, 168, 0, 0], 16), "private (RFC 1918)"),
    (v4([198, 18, 0, 0], 15), "benchmarking"),
    (v4([198, 51, 100, 0], 24), "documentation"),
    (v4([203, 0, 113, 0], 24), "documentation"),
    (v4([224, 0, 0, 0], 4), "multicast"),
    (v4([240, 0, 0, 0], 4), "reserved / broadcast"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "unspecified / loopback / IPv4-compatible"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments (Teredo, ORCHID)"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local (ULA)"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (deprecated)"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Which resolved addresses may be dialled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vetting {
    /// Exceptions to the built-in blocked ranges (e.g. a private range the
    /// gateway must reach, or loopback in tests).
    pub allow_cidrs: Vec<IpNet>,
    /// Extra ranges to refuse (pod and service CIDRs); these win over `allow_cidrs`.
    pub deny_cidrs: Vec<IpNet>,
}

impl Vetting {
    /// The address to dial for `ip`, or why it is refused. IPv4 carried in
    /// IPv6 (mapped, NAT64 well-known prefix, 6to4) is judged by its IPv4
    /// address, so `::ffff:127.0.0.1` cannot slip past the loopback rule.
    pub fn vet(&self, ip: IpAddr) -> Result<IpAddr, &'static str> {
        self.vet_excepting(ip, &[])
    }

    /// [`Vetting::vet`] with `extra` exceptions beside `allow_cidrs` (a
    /// route's next hops); `deny_cidrs` still win.
    pub fn vet_excepting(&self, ip: IpAddr, extra: &[IpNet]) -> Result<IpAddr, &'static str> {
        let ip = ip.to_canonical();
        if self.deny_cidrs.iter().any(|c| c.contains(&ip)) {
            return Err("deny_cidrs");
        }
        if self.allow_cidrs.iter().chain(extra).any(|c| c.contains(&ip)) {
            return Ok(ip);
        }
        if let Some((_, why)) = BLOCKED.iter().find(|(c, _)| c.contains(&ip)) {
            return Err(why);
        }
        if let Some(inner) = embedded_ipv4(ip) {
            self.vet(IpAddr::V4(inner))?;
        }
        Ok(ip)
    }
}

/// The IPv4 address inside a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address.
fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(addr) = ip else { return None };
    let bits = u128::from(addr);
    if v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96).contains(&ip) {
        return Some(Ipv4Addr::from(bits as u32));
    }
    if v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16).contains(&ip) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        parse_cidr(s).unwrap()
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c = net("10.0.0.0/8");
        assert!(c.contains(&ip("10.255.1.2")));
        assert!(!c.contains(&ip("11.0.0.1")));
        assert!(!c.contains(&ip("::ffff:10.0.0.1")));
        assert!(net("0.0.0.0/0").contains(&ip("8.8.8.8")));
        assert!(net("::/0").contains(&ip("2001:db8::1")));
        assert!(net("127.0.0.1").contains(&ip("127.0.0.1")));
        assert!(!net("127.0.0.1").contains(&ip("127.0.0.2")));
        assert!(net("fd00::/8").contains(&ip("fdff::1")));
        assert_eq!(net("10.1.2.3/8").to_string(), "10.0.0.0/8", "host bits are dropped");
        for bad in ["10.0.0.0/33", "::/129", "10.0.0.0/", "10.0.0/8", "x/8", "10.0.0.0/+8", "10.0.0.0/-1", ""] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
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
            allow_cidrs: vec![net("127.0.0.0/8"), net("10.0.0.0/8")],
            deny_cidrs: vec![net("10.96.0.0/12"), net("203.0.113.0/24")],
        };
        assert!(v.vet(ip("127.0.0.1")).is_ok());
        assert!(v.vet(ip("::ffff:127.0.0.1")).is_ok());
        assert!(v.vet(ip("10.1.0.1")).is_ok());
        assert_eq!(v.vet(ip("10.96.0.10")), Err("deny_cidrs"));
        assert!(v.vet(ip("169.254.169.254")).is_err());
        assert!(v.vet(ip("203.0.113.5")).is_err());
    }
}
