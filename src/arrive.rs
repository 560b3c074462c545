//! Arrival: how a client's bytes reach the gateway, before any front reads
//! them. Plain TCP needs no stage; [`proxy`] reads the PROXY protocol
//! header a trusted proxy sends first (the client's address and, from
//! Istio's ztunnel, its identity); [`transparent`] finds where an
//! intercepted connection was going; [`mtls`] terminates the mesh's outer
//! mTLS layer and establishes the caller's identity.
//!
//! Whatever the arrival, the front and the relay see one [`ClientStream`].

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::identity::Principal;

pub mod mtls;
pub mod proxy;
pub mod transparent;

/// A client's stream after its arrival stage.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The plain TCP socket, when no layer sits between the client and the
    /// gateway: then bytes can move with `splice(2)`.
    fn plain_tcp(&self) -> Option<&TcpStream>;
}

impl ClientStream for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// Why a connection was refused on arrival, before any front read it.
#[derive(Debug, thiserror::Error)]
pub enum ArrivalError {
    #[error("{0} is not among this listener's proxy_protocol.trusted_sources")]
    UntrustedProxy(std::net::IpAddr),
    #[error(transparent)]
    Header(#[from] proxy::ReadError),
    #[error("invalid peer identity in the PROXY header: {0}")]
    Identity(String),
    #[error(transparent)]
    OriginalDestination(#[from] transparent::OriginalDstError),
}

impl ArrivalError {
    pub fn reason(&self) -> &'static str {
        use proxy::{HeaderError, ReadError};
        match self {
            ArrivalError::UntrustedProxy(_) => "untrusted_proxy",
            ArrivalError::Header(ReadError::Invalid(HeaderError::Missing)) => "proxy_header_missing",
            ArrivalError::Header(ReadError::Invalid(_)) => "proxy_header_invalid",
            ArrivalError::Header(ReadError::Timeout(_)) => "proxy_header_timeout",
            ArrivalError::Header(ReadError::Closed) => "client_closed_early",
            ArrivalError::Header(ReadError::Io(_)) => "client_error",
            ArrivalError::Identity(_) => "proxy_identity_invalid",
            ArrivalError::OriginalDestination(transparent::OriginalDstError::Unknown(_)) => "no_original_destination",
            ArrivalError::OriginalDestination(
                transparent::OriginalDstError::Loop(_) | transparent::OriginalDstError::CameBack(_),
            ) => "destination_loop",
        }
    }
}

/// The caller's identity from a PROXY header's `0xD0` TLV (Istio's peer
/// identity), parsed and checked as an mTLS identity is: a valid SPIFFE ID
/// in one of `trust_domains`. No TLV: no identity.
pub fn peer_identity(header: &proxy::Header, trust_domains: &[String]) -> Result<Option<Principal>, ArrivalError> {
    let Some(raw) = header.peer_identity.as_deref() else { return Ok(None) };
    let text = std::str::from_utf8(raw).map_err(|_| ArrivalError::Identity("not UTF-8".into()))?;
    let principal = Principal::parse(text).map_err(|e| ArrivalError::Identity(e.to_string()))?;
    if !trust_domains.iter().any(|td| td == principal.trust_domain()) {
        return Err(ArrivalError::Identity(format!(
            "trust domain {:?} is not accepted (proxy_protocol.trust_domains)",
            principal.trust_domain()
        )));
    }
    Ok(Some(principal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: Option<&[u8]>) -> proxy::Header {
        proxy::Header { version: proxy::Version::V2, addresses: None, peer_identity: id.map(<[u8]>::to_vec) }
    }

    #[test]
    fn a_peer_identity_is_checked_as_an_mtls_identity_is() {
        let domains = ["cluster.local".to_owned()];
        let p = peer_identity(&header(Some(b"spiffe://cluster.local/ns/app/sa/web")), &domains).unwrap().unwrap();
        assert_eq!((p.namespace(), p.service_account()), (Some("app"), Some("web")));
        assert_eq!(peer_identity(&header(None), &domains).unwrap(), None);
        for bad in [
            &b"spiffe://other.domain/ns/a/sa/b"[..],
            b"http://cluster.local/ns/a",
            b"\xff\xfe",
            b"spiffe://cluster.local/ns/../sa/b",
        ] {
            let e = peer_identity(&header(Some(bad)), &domains).expect_err("refused");
            assert_eq!(e.reason(), "proxy_identity_invalid", "{bad:?}: {e}");
        }
    }
}
