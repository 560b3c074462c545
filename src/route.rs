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
    /// Through an HTTP proxy: `CONNECT name:port`, a 2xx, then the
    /// client's bytes unchanged.
    HttpProxy { proxy: Hop, authorization: Option<Secret>, allow_cidrs: Vec<IpNet> },
}

/// A `Proxy-Authorization` value: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why an upstream HTTP proxy did not open the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamProxyError {
    #[error("the upstream proxy {proxy} answered {status} to the CONNECT")]
    Refused { proxy: SocketAddr, status: u16 },
    #[error("the upstream proxy {proxy} sent no valid answer to the CONNECT: {why}")]
    Invalid { proxy: SocketAddr, why: String },
    #[error("no answer from the upstream proxy {proxy} within the connect budget")]
    Timeout { proxy: SocketAddr },
}

impl UpstreamProxyError {
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamProxyError::Refused { status: 403 | 407, .. } => "upstream_proxy_denied",
            _ => "upstream_proxy_failed",
        }
    }
}

/// Most bytes an upstream proxy's answer head may take.
const MAX_ANSWER: usize = 8 * 1024;

/// Asks the proxy on `tcp` for a tunnel to `authority` and reads its
/// answer head exactly (what follows it is the destination's, for the
/// client): peeked, then only the head's bytes are consumed.
pub async fn open_tunnel(
    tcp: &mut tokio::net::TcpStream,
    authority: &str,
    authorization: Option<&Secret>,
) -> Result<(), UpstreamProxyError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = tcp.peer_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let invalid = |why: String| UpstreamProxyError::Invalid { proxy, why };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(secret) = authorization {
        request.push_str(&format!("Proxy-Authorization: {}\r\n", secret.0));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.map_err(|e| invalid(e.to_string()))?;
    let mut head = Vec::new();
    let mut peeked = vec![0u8; MAX_ANSWER];
    loop {
        let n = tcp.peek(&mut peeked).await.map_err(|e| invalid(e.to_string()))?;
        if n == 0 {
            return Err(invalid("it closed the connection".into()));
        }
        let mut all = head.clone();
        all.extend_from_slice(&peeked[..n]);
        let end = all.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        let take = match end {
            Some(end) => end - head.len(),
            None if all.len() >= MAX_ANSWER => return Err(invalid(format!("an answer head over {MAX_ANSWER} bytes"))),
            None => n,
        };
        let mut chunk = vec![0u8; take];
        tcp.read_exact(&mut chunk).await.map_err(|e| invalid(e.to_string()))?;
        head.extend_from_slice(&chunk);
        if end.is_some() {
            break;
        }
    }
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(invalid("a malformed answer head".into())),
    }
    match response.code {
        Some(200..=299) => Ok(()),
        Some(status) => Err(UpstreamProxyError::Refused { proxy, status }),
        None => Err(invalid("no status".into())),
    }
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
    /// Some route sends a PROXY header (which names where the client
    /// connected: the accepted socket's own address is then needed).
    pub fn announce(&self) -> bool {
        self.0.iter().any(|r| matches!(r.action, Action::NextHop { proxy_protocol: Some(_), .. }))
    }

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
