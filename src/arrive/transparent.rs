//! Intercepted connections (iptables `REDIRECT` or `TPROXY`, as
//! `istio-iptables` sets up): where the client really meant to go.
//!
//! With `REDIRECT` the kernel's NAT rewrote the destination, and
//! `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST` for IPv6) gives it back; with
//! `TPROXY` the listening socket is `IP_TRANSPARENT` and an accepted
//! socket's local address *is* the original destination.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::config::OriginalDestination;

/// Why an intercepted connection has no usable original destination.
#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    #[error("no original destination (was the connection redirected by iptables?): {0}")]
    Unknown(io::Error),
    #[error(
        "the original destination {0} is this gateway's own listener (a connection made to it directly, or a loop)"
    )]
    Loop(SocketAddr),
    #[error(
        "the connection comes from {0}, one of this gateway's own upstream connections: the interception rules capture the gateway's own traffic (exempt its upstream_mark or its UID)"
    )]
    CameBack(SocketAddr),
}

/// The original destination of `tcp`, accepted on a listener of `kind`;
/// `own` are the gateway's listening addresses, which no intercepted
/// connection may have meant.
pub fn original_destination(
    tcp: &TcpStream,
    kind: OriginalDestination,
    own: &[SocketAddr],
) -> Result<SocketAddr, OriginalDstError> {
    let local = tcp.local_addr().map_err(OriginalDstError::Unknown)?;
    let original = match kind {
        OriginalDestination::Tproxy => local,
        OriginalDestination::Redirect => {
            let socket = SockRef::from(tcp);
            let v4 = match local {
                SocketAddr::V4(_) => true,
                SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
            };
            let addr = if v4 { socket.original_dst_v4() } else { socket.original_dst_v6() };
            let addr = addr.map_err(OriginalDstError::Unknown)?;
            let addr = addr.as_socket().ok_or_else(|| {
                OriginalDstError::Unknown(io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))
            })?;
            // Not rewritten: the client connected to the listener itself.
            if addr == local {
                return Err(OriginalDstError::Loop(addr));
            }
            addr
        }
    };
    let original = crate::net::canonical(original);
    if is_own(original, own) {
        return Err(OriginalDstError::Loop(original));
    }
    Ok(original)
}

/// One of the gateway's own addresses: a listening address, or a loopback
/// address on the port of a listener bound to every address.
fn is_own(addr: SocketAddr, own: &[SocketAddr]) -> bool {
    own.iter().any(|o| {
        let o_ip = o.ip().to_canonical();
        (o_ip == addr.ip() && o.port() == addr.port())
            || (o_ip.is_unspecified() && o.port() == addr.port() && addr.ip().is_loopback())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_own_addresses_are_loops() {
        let own: Vec<SocketAddr> = ["127.0.0.1:15001", "0.0.0.0:15006", "[::]:9901"].map(|a| a.parse().unwrap()).into();
        for addr in ["127.0.0.1:15001", "127.0.0.1:15006", "127.0.0.5:15006", "[::1]:9901", "127.0.0.1:9901"] {
            assert!(is_own(addr.parse().unwrap(), &own), "{addr}");
        }
        for addr in ["198.18.0.10:443", "198.18.0.10:15006", "127.0.0.1:443", "127.0.0.2:15001"] {
            assert!(!is_own(addr.parse().unwrap(), &own), "{addr}");
        }
    }
}
