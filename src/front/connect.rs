//! The CONNECT front: an HTTP proxy for `HTTPS_PROXY` clients. The request
//! names the destination; policy decides on it before the `200`; then the
//! tunnel's first bytes must be a ClientHello whose SNI is that same name
//! (a client cannot CONNECT to an allowed host and then talk TLS to
//! another one behind it, as domain fronting does).

use std::net::SocketAddr;

use super::http::{self, Head, HttpError, TargetError};
use crate::config::ConnectSettings;
use crate::name::ServerName;

/// What a CONNECT names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A host name and port: policy decides on the name before the 200.
    Name(ServerName, u16),
    /// An IP literal (`connect.allow_ip_literals`): the tunnelled SNI is
    /// the name policy decides on, and it must resolve to this address.
    Address(SocketAddr),
}

/// The destination a CONNECT head names: `host:port` (RFC 9110 §9.3.6), the
/// host a name (an IP literal only with `allow_ip_literals`), the port
/// among `allowed_ports`. A body is refused: nothing may follow the head
/// but the tunnel.
pub fn target(head: &Head, settings: &ConnectSettings) -> Result<Target, TargetError> {
    if head.body != http::Body::None || head.upgrade {
        return Err(HttpError::Framing("a CONNECT request carries no body and no upgrade").into());
    }
    let authority = match http::authority(&head.target).map_err(TargetError::from) {
        Err(TargetError::IpLiteral(text)) if settings.allow_ip_literals => {
            let addr: SocketAddr = head.target.parse().map_err(|_| TargetError::IpLiteral(text))?;
            if !settings.allowed_ports.contains(&addr.port()) {
                return Err(TargetError::Port { port: addr.port(), allowed: "connect.allowed_ports" });
            }
            return Ok(Target::Address(addr));
        }
        other => other?,
    };
    let port = authority.port.ok_or(HttpError::Malformed("a CONNECT target needs a port (host:port)"))?;
    if !settings.allowed_ports.contains(&port) {
        return Err(TargetError::Port { port, allowed: "connect.allowed_ports" });
    }
    Ok(Target::Name(authority.name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_with(text: &str, settings: &ConnectSettings) -> Result<Target, TargetError> {
        let head = http::parse(text.as_bytes()).unwrap().unwrap();
        target(&head, settings)
    }

    fn target_of(text: &str) -> Result<Target, TargetError> {
        target_with(text, &ConnectSettings::default())
    }

    #[test]
    fn targets() {
        let t = target_of("CONNECT A.Example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n").unwrap();
        assert_eq!(t, Target::Name(ServerName::from_bytes(b"a.example").unwrap(), 443));
        let literals = ConnectSettings { allow_ip_literals: true, ..ConnectSettings::default() };
        let t = target_with("CONNECT [::1]:443 HTTP/1.1\r\n\r\n", &literals).unwrap();
        assert_eq!(t, Target::Address("[::1]:443".parse().unwrap()));
        let e = target_with("CONNECT 10.0.0.1:22 HTTP/1.1\r\n\r\n", &literals).unwrap_err();
        assert_eq!(e.reason(), "port_not_allowed");
        let e = target_with("CONNECT [::1] HTTP/1.1\r\n\r\n", &literals).unwrap_err();
        assert_eq!(e.reason(), "ip_literal_refused");
        for (text, reason) in [
            ("CONNECT a.example:22 HTTP/1.1\r\n\r\n", "port_not_allowed"),
            ("CONNECT a.example HTTP/1.1\r\n\r\n", "http_invalid"),
            ("CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n", "ip_literal_refused"),
            ("CONNECT [::1]:443 HTTP/1.1\r\n\r\n", "ip_literal_refused"),
            ("CONNECT a_b.example:443 HTTP/1.1\r\n\r\n", "http_invalid_host"),
            ("CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\n", "http_bad_framing"),
            ("CONNECT a.example:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "http_bad_framing"),
        ] {
            assert_eq!(target_of(text).expect_err(text).reason(), reason, "{text:?}");
        }
    }
}
