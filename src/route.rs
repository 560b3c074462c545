//! Where an allowed connection leaves: the first route whose match fits
//! the connection says how (dialled directly, optionally from a source
//! address or with a mark; or through a next hop that receives the bytes
//! unchanged). A route allows nothing: policy has decided before.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::identity::Principal;
use crate::name::ServerName;
use crate::policy::{Pattern, Selector};

/// What a route matches; every condition given must hold, and a route
/// with none matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Callers (as policy rules select them); empty: any caller, with or
    /// without an identity.
    pub from: Selector,
    /// The client's source address (a PROXY header's source where there is one).
    pub sources: Vec<IpNet>,
    /// The destination name.
    pub names: Vec<Pattern>,
    /// The listener's name.
    pub listeners: Vec<String>,
}

/// Where a next hop is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HopHost {
    Ip(IpAddr),
    /// Resolved and vetted like a destination name.
    Name(ServerName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub host: HopHost,
    pub port: u16,
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            HopHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            HopHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            HopHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// A PROXY protocol header sent to a next hop first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyOut {
    V1,
    V2,
}

/// How a routed connection leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Dial the destination's own (resolved, vetted) address.
    Direct {
        /// The upstream socket's source address.
        bind: Option<IpAddr>,
        /// `IP_FREEBIND`: bind even when the address is not (yet) local.
        freebind: bool,
    },
    /// Dial these instead, in order, and replay the client's bytes
    /// unchanged (the SNI travels inside).
    NextHop { hops: Vec<Hop>, proxy_protocol: Option<ProxyOut>, allow_cidrs: Vec<IpNet> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub when: RouteMatch,
    pub action: Action,
    /// `SO_MARK` on this route's upstream sockets (else the listener's).
    pub mark: Option<u32>,
}

/// What a connection is routed by.
pub struct Facts<'a> {
    pub name: &'a ServerName,
    pub principal: Option<&'a Principal>,
    pub source: IpAddr,
    pub listener: &'a str,
}

impl RouteMatch {
    fn fits(&self, c: &Facts<'_>) -> bool {
        let source = c.source.to_canonical();
        (self.from.is_empty() || c.principal.is_some_and(|p| self.from.selects(p)))
            && (self.sources.is_empty() || self.sources.iter().any(|n| n.contains(&source)))
            && (self.names.is_empty() || self.names.iter().any(|p| p.matches(c.name)))
            && (self.listeners.is_empty() || self.listeners.iter().any(|l| l == c.listener))
    }
}

/// The ordered routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes(pub Vec<Route>);

impl Routes {
    /// The first route that fits; `None`: direct, as without routes.
    pub fn pick(&self, c: &Facts<'_>) -> Option<&Route> {
        self.0.iter().find(|r| r.when.fits(c))
    }
}

/// The PROXY header announcing `source` -> `destination` to a next hop.
pub fn proxy_header(version: ProxyOut, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = (canonical(source), canonical(destination));
    match version {
        ProxyOut::V1 => {
            let family = match (source, destination) {
                (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
                (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
                _ => return b"PROXY UNKNOWN\r\n".to_vec(),
            };
            format!("PROXY {family} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
                .into_bytes()
        }
        ProxyOut::V2 => {
            let mut out = crate::arrive::proxy::V2_SIGNATURE.to_vec();
            // Version 2, PROXY; TCP over IPv4 or IPv6.
            out.push(0x21);
            let addresses: Vec<u8> = match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    out.push(0x11);
                    [&s.ip().octets()[..], &d.ip().octets()[..], &s.port().to_be_bytes(), &d.port().to_be_bytes()]
                        .concat()
                }
                (s, d) => {
                    out.push(0x21);
                    let v6 = |a: SocketAddr| match a.ip() {
                        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                        IpAddr::V6(ip) => ip.octets(),
                    };
                    [&v6(s)[..], &v6(d)[..], &s.port().to_be_bytes(), &d.port().to_be_bytes()].concat()
                }
            };
            out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
            out.extend_from_slice(&addresses);
            out
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arrive::proxy::{Versions, parse};

    #[test]
    fn headers_out_parse_as_headers_in() {
        let (s, d): (SocketAddr, SocketAddr) =
            ("192.0.2.7:40000".parse().unwrap(), "198.51.100.1:443".parse().unwrap());
        for v in [ProxyOut::V1, ProxyOut::V2] {
            let h = proxy_header(v, s, d);
            let (header, len) = parse(&h, Versions::ALL).unwrap().unwrap();
            assert_eq!((header.addresses, len), (Some((s, d)), h.len()), "{v:?}");
        }
        let (s6, d6): (SocketAddr, SocketAddr) =
            ("[2001:db8::7]:1".parse().unwrap(), "[2001:db8::1]:2".parse().unwrap());
        let (header, _) = parse(&proxy_header(ProxyOut::V2, s6, d6), Versions::ALL).unwrap().unwrap();
        assert_eq!(header.addresses, Some((s6, d6)));
        let (header, _) = parse(&proxy_header(ProxyOut::V1, s6, d), Versions::ALL).unwrap().unwrap();
        assert_eq!(header.addresses, None);
    }

    #[test]
    fn the_first_fitting_route_wins() {
        let name = ServerName::from_bytes(b"api.example.com").unwrap();
        let route = |n: &str, when: RouteMatch| Route {
            name: n.into(),
            when,
            action: Action::Direct { bind: None, freebind: false },
            mark: None,
        };
        let routes = Routes(vec![
            route("by-source", RouteMatch { sources: vec!["10.0.0.0/8".parse().unwrap()], ..Default::default() }),
            route(
                "by-name",
                RouteMatch { names: vec![Pattern::parse("*.example.com").unwrap()], ..Default::default() },
            ),
        ]);
        let facts =
            |source: &str| Facts { name: &name, principal: None, source: source.parse().unwrap(), listener: "l" };
        assert_eq!(routes.pick(&facts("10.1.2.3")).map(|r| r.name.as_str()), Some("by-source"));
        assert_eq!(routes.pick(&facts("::ffff:10.1.2.3")).map(|r| r.name.as_str()), Some("by-source"));
        assert_eq!(routes.pick(&facts("192.0.2.1")).map(|r| r.name.as_str()), Some("by-name"));
        let other = ServerName::from_bytes(b"other.test").unwrap();
        let f = Facts { name: &other, principal: None, source: "192.0.2.1".parse().unwrap(), listener: "l" };
        assert!(routes.pick(&f).is_none());
    }
}
