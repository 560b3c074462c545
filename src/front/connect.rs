//! The CONNECT front: an HTTP proxy for `HTTPS_PROXY` clients. The request
//! names the destination; policy decides on it before the `200`; then the
//! tunnel's first bytes must be a ClientHello whose SNI is that same name
//! (a client cannot CONNECT to an allowed host and then talk TLS to
//! another one behind it, as domain fronting does).

use super::http::{self, Head, HttpError, TargetError};
use crate::config::ConnectSettings;
use crate::name::ServerName;

/// The destination a CONNECT head names: `host:port` (RFC 9110 §9.3.6), the
/// host a name (never an IP literal), the port among `allowed_ports`. A
/// body is refused: nothing may follow the head but the tunnel.
pub fn target(head: &Head, settings: &ConnectSettings) -> Result<(ServerName, u16), TargetError> {
    if head.body != http::Body::None || head.upgrade {
        return Err(HttpError::Framing("a CONNECT request carries no body and no upgrade").into());
    }
    let authority = http::authority(&head.target).map_err(TargetError::from)?;
    let port = authority.port.ok_or(HttpError::Malformed("a CONNECT target needs a port (host:port)"))?;
    if !settings.allowed_ports.contains(&port) {
        return Err(TargetError::Port { port, allowed: "connect.allowed_ports" });
    }
    Ok((authority.name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_of(text: &str) -> Result<(ServerName, u16), TargetError> {
        let head = http::parse(text.as_bytes()).unwrap().unwrap();
        target(&head, &ConnectSettings::default())
    }

    #[test]
    fn targets() {
        let (name, port) = target_of("CONNECT A.Example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n").unwrap();
        assert_eq!((name.as_str(), port), ("a.example", 443));
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
