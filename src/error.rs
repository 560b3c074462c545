//! How a connection ends when it is not relayed to its end: one error type
//! for every stage, each variant with a bounded `reason` label (the access
//! record's and the metrics' vocabulary), the `side` at fault, the
//! `decision`, the `termination`, and how the front tells the client (a TLS
//! alert; an HTTP status for HTTP fronts).
//!
//! Behaviour is chosen by matching on these variants, never by comparing
//! labels.

use std::net::{IpAddr, SocketAddr};

use crate::arrive::ArrivalError;
use crate::arrive::mtls::HandshakeError;
use crate::arrive::proxy::ReadError as HeaderReadError;
use crate::arrive::transparent::OriginalDstError;
use crate::connect::ConnectError;
use crate::front::http::{ReadError as HeadReadError, TargetError};
use crate::front::tls::{HelloError, ReadError, alert};
use crate::name::NameError;
use crate::policy::Match;
use crate::relay::Ended;
use crate::resolve::ResolveError;

/// Who caused a connection to end without being relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong, too much, too little or too late.
    Client,
    /// DNS or the destination failed.
    Upstream,
    /// The policy (names, addresses, ECH) refused it.
    Policy,
    /// The gateway itself: its limits, its shutdown, a bug.
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Policy => "policy",
            Side::Internal => "internal",
        }
    }
}

/// The access record's `decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Allowed,
    Denied,
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Error => "error",
        }
    }
}

/// The access record's `termination`: how the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// A relayed connection ended by itself.
    Relayed(Ended),
    /// Cut by `timeouts.max_lifetime`.
    MaxLifetime,
    /// No first byte within `timeouts.first_byte`.
    FirstByteTimeout,
    /// Cut at the end of the drain.
    DrainTimeout,
    /// Refused (with an alert where the client speaks TLS) and closed.
    Refused,
    HandshakeFailed,
    HandshakeTimeout,
    ClientHelloTimeout,
    /// No complete HTTP request head within `timeouts.client_hello`.
    RequestTimeout,
    /// A later plain-HTTP request named another host: answered 421.
    Misdirected,
    /// A later plain-HTTP request could not be framed safely: answered.
    RequestRefused,
    ProxyHeaderTimeout,
    DnsTimeout,
    ConnectTimeout,
    /// The connection's task failed (a bug); its record says so.
    Internal,
}

impl Termination {
    pub fn as_str(self) -> &'static str {
        match self {
            Termination::Relayed(ended) => ended.as_str(),
            Termination::MaxLifetime => "max_lifetime",
            Termination::FirstByteTimeout => "first_byte_timeout",
            Termination::DrainTimeout => "drain_timeout",
            Termination::Refused => "refused",
            Termination::HandshakeFailed => "handshake_failed",
            Termination::HandshakeTimeout => "handshake_timeout",
            Termination::ClientHelloTimeout => "client_hello_timeout",
            Termination::RequestTimeout => "request_timeout",
            Termination::Misdirected => "misdirected_request",
            Termination::RequestRefused => "request_refused",
            Termination::ProxyHeaderTimeout => "proxy_header_timeout",
            Termination::DnsTimeout => "dns_timeout",
            Termination::ConnectTimeout => "connect_timeout",
            Termination::Internal => "internal_error",
        }
    }
}

impl From<Ended> for Termination {
    fn from(ended: Ended) -> Termination {
        Termination::Relayed(ended)
    }
}

/// Why a connection ended before (or instead of) being relayed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("limits.max_connections reached")]
    ConnectionLimit,
    #[error("limits.max_connections_per_source reached for this client address")]
    SourceLimit,
    #[error("limits.max_connections_per_identity ({0}) reached for this caller")]
    IdentityLimit(usize),
    #[error("limits.connection_rate_per_identity exceeded by this caller")]
    RateLimited,
    #[error("no byte within timeouts.first_byte")]
    FirstByteTimeout,
    #[error("evicted: limits.max_pending_connections reached and this was the oldest connection without a destination")]
    Evicted,
    #[error(transparent)]
    Arrival(#[from] ArrivalError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Hello(#[from] ReadError),
    #[error("the first byte {0:#04x} starts no protocol this listener serves")]
    UnknownProtocol(u8),
    #[error(transparent)]
    Request(#[from] HeadReadError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("the tunnelled ClientHello names {sni:?}, not {authority:?} as the CONNECT did")]
    SniMismatch { authority: String, sni: String },
    #[error("the tunnel's first bytes are not a TLS ClientHello (connect.plaintext_ports does not name this port)")]
    TunnelNotTls,
    #[error("the ClientHello has no server_name")]
    NoSni,
    #[error("invalid server_name: {0}")]
    InvalidSni(#[from] NameError),
    #[error("{}", match .0 { Some(m) => format!("deny pattern {} matched", m.label()), None => "no allow pattern matched".to_owned() })]
    Denied(Option<Match>),
    #[error("encrypted_client_hello present and policy.refuse_ech is on")]
    Ech,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("{name} resolves to {resolved:?}, not to the original destination {}",
        original.map_or_else(|| "(none: the PROXY header named no address)".to_owned(), |o| o.to_string()))]
    DestinationMismatch { name: String, original: Option<SocketAddr>, resolved: Vec<IpAddr> },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    UpstreamProxy(#[from] crate::route::UpstreamProxyError),
    #[error("ended by timeouts.max_lifetime before its data path was set up")]
    MaxLifetime,
    #[error("ended by the drain before its data path was set up")]
    Shutdown,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ConnError {
    /// The bounded label of the access record's `reason` and of metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnError::ConnectionLimit => "connection_limit",
            ConnError::SourceLimit => "source_limit",
            ConnError::IdentityLimit(_) => "identity_limit",
            ConnError::RateLimited => "rate_limited",
            ConnError::FirstByteTimeout => "first_byte_timeout",
            ConnError::Evicted => "pending_evicted",
            ConnError::Arrival(e) => e.reason(),
            ConnError::Handshake(e) => e.reason(),
            ConnError::Hello(ReadError::Hello(e)) => e.reason(),
            ConnError::Hello(ReadError::Timeout { .. }) => "client_hello_timeout",
            ConnError::Hello(ReadError::Closed { .. }) => "client_closed_early",
            ConnError::Hello(ReadError::Io(_)) => "client_error",
            ConnError::UnknownProtocol(_) => "unknown_protocol",
            ConnError::Request(HeadReadError::Invalid(e)) => e.reason(),
            ConnError::Request(HeadReadError::Timeout { .. }) => "http_request_timeout",
            ConnError::Request(HeadReadError::Closed { .. }) => "client_closed_early",
            ConnError::Request(HeadReadError::Io(_)) => "client_error",
            ConnError::Target(e) => e.reason(),
            ConnError::SniMismatch { .. } => "sni_mismatch",
            ConnError::TunnelNotTls => "tunnel_not_tls",
            ConnError::NoSni => "no_sni",
            ConnError::InvalidSni(_) => "invalid_sni",
            ConnError::Denied(_) => "policy_denied",
            ConnError::Ech => "ech_refused",
            ConnError::Resolve(e) => e.reason(),
            ConnError::DestinationMismatch { .. } => "destination_mismatch",
            ConnError::Connect(e) => e.reason(),
            ConnError::UpstreamProxy(e) => e.reason(),
            ConnError::MaxLifetime => "max_lifetime",
            ConnError::Shutdown => "shutdown",
            ConnError::Internal(_) => "internal_error",
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ConnError::Handshake(_) | ConnError::Hello(_) | ConnError::NoSni | ConnError::InvalidSni(_) => Side::Client,
            ConnError::UnknownProtocol(_) | ConnError::Request(_) | ConnError::TunnelNotTls => Side::Client,
            ConnError::Target(TargetError::Http(_)) => Side::Client,
            ConnError::Target(_) | ConnError::SniMismatch { .. } => Side::Policy,
            ConnError::SourceLimit | ConnError::FirstByteTimeout => Side::Client,
            ConnError::IdentityLimit(_) | ConnError::RateLimited => Side::Client,
            ConnError::Evicted => Side::Internal,
            ConnError::Arrival(
                ArrivalError::UntrustedProxy(_)
                | ArrivalError::OriginalDestination(OriginalDstError::Loop(_) | OriginalDstError::CameBack(_)),
            ) => Side::Policy,
            ConnError::Arrival(_) => Side::Client,
            ConnError::Denied(_)
            | ConnError::Ech
            | ConnError::Resolve(ResolveError::AllRefused(_))
            | ConnError::DestinationMismatch { .. } => Side::Policy,
            ConnError::Resolve(_) | ConnError::Connect(_) | ConnError::UpstreamProxy(_) => Side::Upstream,
            ConnError::ConnectionLimit | ConnError::MaxLifetime | ConnError::Shutdown | ConnError::Internal(_) => {
                Side::Internal
            }
        }
    }

    /// Refusals are `denied`: the gateway chose not to serve. What failed
    /// on the way (a client that stalled, DNS, the destination, the
    /// gateway) is an `error`.
    pub fn decision(&self) -> Decision {
        match self {
            ConnError::ConnectionLimit
            | ConnError::SourceLimit
            | ConnError::IdentityLimit(_)
            | ConnError::RateLimited
            | ConnError::Evicted
            | ConnError::Arrival(
                ArrivalError::UntrustedProxy(_)
                | ArrivalError::Header(HeaderReadError::Invalid(_))
                | ArrivalError::Identity(_)
                | ArrivalError::OriginalDestination(_),
            )
            | ConnError::DestinationMismatch { .. }
            | ConnError::Handshake(_)
            | ConnError::Hello(ReadError::Hello(_))
            | ConnError::NoSni
            | ConnError::InvalidSni(_)
            | ConnError::UnknownProtocol(_)
            | ConnError::Request(HeadReadError::Invalid(_))
            | ConnError::Target(_)
            | ConnError::SniMismatch { .. }
            | ConnError::TunnelNotTls
            | ConnError::Denied(_)
            | ConnError::Ech
            | ConnError::Resolve(ResolveError::AllRefused(_)) => Decision::Denied,
            ConnError::Request(_)
            | ConnError::Hello(_)
            | ConnError::Arrival(ArrivalError::Header(_))
            | ConnError::FirstByteTimeout
            | ConnError::Resolve(_)
            | ConnError::Connect(_)
            | ConnError::UpstreamProxy(_)
            | ConnError::MaxLifetime
            | ConnError::Shutdown
            | ConnError::Internal(_) => Decision::Error,
        }
    }

    pub fn termination(&self) -> Termination {
        match self {
            ConnError::Handshake(HandshakeError::Timeout) => Termination::HandshakeTimeout,
            ConnError::Handshake(_) => Termination::HandshakeFailed,
            ConnError::Hello(ReadError::Timeout { .. }) => Termination::ClientHelloTimeout,
            ConnError::Request(HeadReadError::Timeout { .. }) => Termination::RequestTimeout,
            ConnError::Request(HeadReadError::Closed { .. }) => Termination::Relayed(Ended::ClientClosed),
            ConnError::Request(HeadReadError::Io(_)) => Termination::Relayed(Ended::ClientError),
            ConnError::Arrival(ArrivalError::Header(HeaderReadError::Timeout(_))) => Termination::ProxyHeaderTimeout,
            ConnError::Arrival(ArrivalError::Header(HeaderReadError::Closed)) => {
                Termination::Relayed(Ended::ClientClosed)
            }
            ConnError::Arrival(ArrivalError::Header(HeaderReadError::Io(_))) => {
                Termination::Relayed(Ended::ClientError)
            }
            ConnError::Hello(ReadError::Closed { .. }) => Termination::Relayed(Ended::ClientClosed),
            ConnError::Hello(ReadError::Io(_)) => Termination::Relayed(Ended::ClientError),
            ConnError::Resolve(ResolveError::Timeout) => Termination::DnsTimeout,
            ConnError::Connect(e) if e.timed_out() => Termination::ConnectTimeout,
            ConnError::MaxLifetime => Termination::MaxLifetime,
            ConnError::FirstByteTimeout => Termination::FirstByteTimeout,
            ConnError::Shutdown => Termination::DrainTimeout,
            ConnError::Internal(_) => Termination::Internal,
            _ => Termination::Refused,
        }
    }

    /// The fatal TLS alert a TLS front sends before closing; `None` when the
    /// peer does not speak TLS, has gone, or the outer layer already told it.
    pub fn alert(&self) -> Option<u8> {
        match self {
            ConnError::Denied(_)
            | ConnError::Ech
            | ConnError::Resolve(ResolveError::AllRefused(_))
            | ConnError::DestinationMismatch { .. }
            | ConnError::IdentityLimit(_)
            | ConnError::RateLimited
            | ConnError::SniMismatch { .. } => Some(alert::ACCESS_DENIED),
            ConnError::NoSni
            | ConnError::InvalidSni(_)
            | ConnError::Resolve(ResolveError::NxDomain | ResolveError::NoAddresses) => Some(alert::UNRECOGNIZED_NAME),
            ConnError::Hello(ReadError::Hello(HelloError::TooLarge(_) | HelloError::Invalid(_))) => {
                Some(alert::DECODE_ERROR)
            }
            ConnError::UpstreamProxy(crate::route::UpstreamProxyError::Refused { status: 403 | 407, .. }) => {
                Some(alert::ACCESS_DENIED)
            }
            ConnError::Resolve(ResolveError::Timeout | ResolveError::Failed(_))
            | ConnError::Connect(_)
            | ConnError::UpstreamProxy(_) => Some(alert::INTERNAL_ERROR),
            ConnError::Internal(_) => Some(alert::INTERNAL_ERROR),
            ConnError::Hello(ReadError::Hello(HelloError::NotTls) | ReadError::Timeout { .. })
            | ConnError::Hello(ReadError::Closed { .. } | ReadError::Io(_))
            | ConnError::ConnectionLimit
            | ConnError::SourceLimit
            | ConnError::FirstByteTimeout
            | ConnError::Evicted
            // The arrival stage reads no TLS: what follows may not be.
            | ConnError::Arrival(_)
            | ConnError::Handshake(_)
            // Not TLS: the HTTP fronts answer in HTTP.
            | ConnError::UnknownProtocol(_)
            | ConnError::Request(_)
            | ConnError::Target(_)
            | ConnError::TunnelNotTls
            | ConnError::MaxLifetime
            | ConnError::Shutdown => None,
        }
    }

    /// The status an HTTP front answers with (RFC 9110; RFC 9209 names the
    /// matching `Proxy-Status` error types in the comments).
    pub fn http_status(&self) -> u16 {
        match self {
            // destination_not_found / dns_error
            ConnError::Resolve(ResolveError::NxDomain | ResolveError::NoAddresses | ResolveError::Failed(_)) => 502,
            // dns_timeout
            ConnError::Resolve(ResolveError::Timeout) => 504,
            ConnError::Denied(_) | ConnError::Ech | ConnError::Resolve(ResolveError::AllRefused(_)) => 403,
            // destination_ip_prohibited
            ConnError::DestinationMismatch { .. } | ConnError::Arrival(ArrivalError::UntrustedProxy(_)) => 403,
            // 508 Loop Detected (RFC 5842)
            ConnError::Arrival(ArrivalError::OriginalDestination(
                OriginalDstError::Loop(_) | OriginalDstError::CameBack(_),
            )) => 508,
            ConnError::Arrival(ArrivalError::Header(HeaderReadError::Timeout(_) | HeaderReadError::Closed)) => 408,
            ConnError::Arrival(_) => 400,
            // connection_timeout / connection_refused
            ConnError::Connect(e) if e.timed_out() => 504,
            ConnError::Connect(_) => 502,
            ConnError::UpstreamProxy(crate::route::UpstreamProxyError::Timeout { .. }) => 504,
            ConnError::UpstreamProxy(_) => 502,
            ConnError::NoSni | ConnError::InvalidSni(_) | ConnError::Hello(ReadError::Hello(_)) => 400,
            ConnError::UnknownProtocol(_) => 400,
            ConnError::Request(HeadReadError::Invalid(e)) | ConnError::Target(TargetError::Http(e)) => e.status(),
            ConnError::Request(HeadReadError::Timeout { .. }) => 408,
            ConnError::Request(_) => 400,
            // http_request_denied
            ConnError::Target(_) | ConnError::SniMismatch { .. } | ConnError::TunnelNotTls => 403,
            ConnError::Hello(_) | ConnError::FirstByteTimeout => 408,
            ConnError::Handshake(_) => 400,
            ConnError::SourceLimit | ConnError::IdentityLimit(_) | ConnError::RateLimited => 429,
            ConnError::ConnectionLimit | ConnError::Evicted | ConnError::MaxLifetime | ConnError::Shutdown => 503,
            ConnError::Internal(_) => 500,
        }
    }
}

impl ConnError {
    /// The `Proxy-Status` field (RFC 9209) of the HTTP answer to a refusal:
    /// the error type the RFC registers for what happened, and the reason.
    pub fn proxy_status(&self) -> String {
        let error = match self {
            ConnError::Denied(_)
            | ConnError::Ech
            | ConnError::Target(TargetError::Port { .. } | TargetError::IpLiteral(_)) => "http_request_denied",
            ConnError::Resolve(ResolveError::AllRefused(_)) | ConnError::DestinationMismatch { .. } => {
                "destination_ip_prohibited"
            }
            ConnError::Resolve(ResolveError::NxDomain) => "dns_error; rcode=NXDOMAIN",
            ConnError::Resolve(ResolveError::NoAddresses) => "destination_not_found",
            ConnError::Resolve(ResolveError::Failed(_)) => "dns_error",
            ConnError::Resolve(ResolveError::Timeout) => "dns_timeout",
            ConnError::Connect(e) if e.timed_out() => "connection_timeout",
            ConnError::Connect(e) if e.refused() => "connection_refused",
            ConnError::Connect(_) => "destination_unavailable",
            ConnError::UpstreamProxy(crate::route::UpstreamProxyError::Timeout { .. }) => "connection_timeout",
            ConnError::UpstreamProxy(_) => "destination_unavailable",
            ConnError::Arrival(ArrivalError::OriginalDestination(
                OriginalDstError::Loop(_) | OriginalDstError::CameBack(_),
            )) => "proxy_loop_detected",
            ConnError::ConnectionLimit
            | ConnError::SourceLimit
            | ConnError::IdentityLimit(_)
            | ConnError::RateLimited
            | ConnError::Evicted => "connection_limit_reached",
            ConnError::Internal(_) | ConnError::MaxLifetime | ConnError::Shutdown => "proxy_internal_error",
            _ => "http_request_error",
        };
        format!("snigress; error={error}; details=\"{}\"", self.reason())
    }
}

impl Termination {
    /// Istio's `response_flags` (Envoy's names) for how a connection ended,
    /// on the `istio_tcp_*` series: `-` when it ended normally.
    pub fn response_flags(self) -> &'static str {
        match self {
            Termination::Relayed(Ended::ClientError) => "DC",
            Termination::Relayed(Ended::UpstreamError) => "UC",
            Termination::Relayed(Ended::IdleTimeout | Ended::HalfCloseTimeout) => "SI",
            Termination::MaxLifetime => "DT",
            _ => "-",
        }
    }
}

impl ConnError {
    /// Istio's `response_flags` for a refusal (Envoy's names): `UAEX`
    /// policy (names, addresses, ECH, untrusted proxies, loops), `NR` no
    /// such name, `DF` DNS failed, `UF` upstream connect failed, `UO` the
    /// gateway's limits, `DPE` the client spoke wrongly (not TLS, bad hello,
    /// SNI, PROXY header, identity, outer handshake), `DC` the client timed
    /// out or went away, `DT` a lifetime or drain cut, `-` a bug.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ConnError::Denied(_)
            | ConnError::Ech
            | ConnError::Resolve(ResolveError::AllRefused(_))
            | ConnError::DestinationMismatch { .. }
            | ConnError::Target(TargetError::Port { .. } | TargetError::IpLiteral(_))
            | ConnError::SniMismatch { .. }
            | ConnError::Arrival(ArrivalError::UntrustedProxy(_) | ArrivalError::OriginalDestination(_)) => "UAEX",
            ConnError::Resolve(ResolveError::NxDomain | ResolveError::NoAddresses) => "NR",
            ConnError::Resolve(ResolveError::Timeout | ResolveError::Failed(_)) => "DF",
            ConnError::Connect(_) | ConnError::UpstreamProxy(_) => "UF",
            ConnError::ConnectionLimit
            | ConnError::SourceLimit
            | ConnError::IdentityLimit(_)
            | ConnError::RateLimited
            | ConnError::Evicted => "UO",
            ConnError::NoSni
            | ConnError::InvalidSni(_)
            | ConnError::Hello(ReadError::Hello(_))
            | ConnError::UnknownProtocol(_)
            | ConnError::Request(HeadReadError::Invalid(_))
            | ConnError::Target(TargetError::Http(_))
            | ConnError::TunnelNotTls
            | ConnError::Arrival(ArrivalError::Header(HeaderReadError::Invalid(_)) | ArrivalError::Identity(_))
            | ConnError::Handshake(HandshakeError::Failed(_) | HandshakeError::Identity(_)) => "DPE",
            ConnError::Hello(_)
            | ConnError::Request(_)
            | ConnError::Arrival(ArrivalError::Header(_))
            | ConnError::FirstByteTimeout
            | ConnError::Handshake(_) => "DC",
            ConnError::MaxLifetime | ConnError::Shutdown => "DT",
            ConnError::Internal(_) => "-",
        }
    }
}

/// The name of a TLS alert description, for the metrics label.
pub fn alert_name(description: u8) -> &'static str {
    match description {
        alert::ACCESS_DENIED => "access_denied",
        alert::DECODE_ERROR => "decode_error",
        alert::INTERNAL_ERROR => "internal_error",
        alert::UNRECOGNIZED_NAME => "unrecognized_name",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(timed_out: bool) -> ConnectError {
        let addr = "192.0.2.1:443".parse().unwrap();
        let error = (!timed_out).then(|| std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        ConnectError { attempts: vec![crate::connect::Attempt { addr, error }], budget_spent: false }
    }

    /// One of every kind of end, with what the README documents for it.
    #[test]
    fn every_end_has_its_documented_labels() {
        use std::time::Duration;
        // error, reason, decision, side, termination, alert, HTTP status
        type Case = (ConnError, &'static str, &'static str, &'static str, &'static str, Option<u8>, u16);
        let cases: Vec<Case> = vec![
            (ConnError::ConnectionLimit, "connection_limit", "denied", "internal", "refused", None, 503),
            (ConnError::SourceLimit, "source_limit", "denied", "client", "refused", None, 429),
            (
                ConnError::IdentityLimit(2),
                "identity_limit",
                "denied",
                "client",
                "refused",
                Some(alert::ACCESS_DENIED),
                429,
            ),
            (ConnError::RateLimited, "rate_limited", "denied", "client", "refused", Some(alert::ACCESS_DENIED), 429),
            (ConnError::FirstByteTimeout, "first_byte_timeout", "error", "client", "first_byte_timeout", None, 408),
            (ConnError::UnknownProtocol(0), "unknown_protocol", "denied", "client", "refused", None, 400),
            (
                HeadReadError::Invalid(crate::front::http::HttpError::MissingHost).into(),
                "http_invalid_host",
                "denied",
                "client",
                "refused",
                None,
                400,
            ),
            (
                HeadReadError::Timeout { after: Duration::from_secs(1), received: 3 }.into(),
                "http_request_timeout",
                "error",
                "client",
                "request_timeout",
                None,
                408,
            ),
            (
                TargetError::Port { port: 22, allowed: "connect.allowed_ports" }.into(),
                "port_not_allowed",
                "denied",
                "policy",
                "refused",
                None,
                403,
            ),
            (
                TargetError::IpLiteral("10.0.0.1".into()).into(),
                "ip_literal_refused",
                "denied",
                "policy",
                "refused",
                None,
                403,
            ),
            (
                ConnError::SniMismatch { authority: "a".into(), sni: "b".into() },
                "sni_mismatch",
                "denied",
                "policy",
                "refused",
                Some(alert::ACCESS_DENIED),
                403,
            ),
            (ConnError::TunnelNotTls, "tunnel_not_tls", "denied", "client", "refused", None, 403),
            (
                crate::route::UpstreamProxyError::Refused { proxy: "192.0.2.9:3128".parse().unwrap(), status: 407 }
                    .into(),
                "upstream_proxy_denied",
                "error",
                "upstream",
                "refused",
                Some(alert::ACCESS_DENIED),
                502,
            ),
            (
                crate::route::UpstreamProxyError::Refused { proxy: "192.0.2.9:3128".parse().unwrap(), status: 503 }
                    .into(),
                "upstream_proxy_failed",
                "error",
                "upstream",
                "refused",
                Some(alert::INTERNAL_ERROR),
                502,
            ),
            (ConnError::Evicted, "pending_evicted", "denied", "internal", "refused", None, 503),
            (
                ArrivalError::UntrustedProxy([192, 0, 2, 1].into()).into(),
                "untrusted_proxy",
                "denied",
                "policy",
                "refused",
                None,
                403,
            ),
            (
                ArrivalError::Header(crate::arrive::proxy::HeaderError::Missing.into()).into(),
                "proxy_header_missing",
                "denied",
                "client",
                "refused",
                None,
                400,
            ),
            (
                ArrivalError::Header(crate::arrive::proxy::HeaderError::V2("x").into()).into(),
                "proxy_header_invalid",
                "denied",
                "client",
                "refused",
                None,
                400,
            ),
            (
                ArrivalError::Header(HeaderReadError::Timeout(Duration::from_secs(1))).into(),
                "proxy_header_timeout",
                "error",
                "client",
                "proxy_header_timeout",
                None,
                408,
            ),
            (
                ArrivalError::Header(HeaderReadError::Closed).into(),
                "client_closed_early",
                "error",
                "client",
                "client_closed",
                None,
                408,
            ),
            (
                ArrivalError::Identity("x".into()).into(),
                "proxy_identity_invalid",
                "denied",
                "client",
                "refused",
                None,
                400,
            ),
            (
                ArrivalError::OriginalDestination(OriginalDstError::Unknown(std::io::ErrorKind::NotFound.into()))
                    .into(),
                "no_original_destination",
                "denied",
                "client",
                "refused",
                None,
                400,
            ),
            (
                ArrivalError::OriginalDestination(OriginalDstError::Loop("127.0.0.1:1".parse().unwrap())).into(),
                "destination_loop",
                "denied",
                "policy",
                "refused",
                None,
                508,
            ),
            (
                ConnError::DestinationMismatch {
                    name: "a.example".into(),
                    original: Some("198.18.0.10:443".parse().unwrap()),
                    resolved: vec![[192, 0, 2, 1].into()],
                },
                "destination_mismatch",
                "denied",
                "policy",
                "refused",
                Some(alert::ACCESS_DENIED),
                403,
            ),
            (
                HandshakeError::Timeout.into(),
                "outer_handshake_timeout",
                "denied",
                "client",
                "handshake_timeout",
                None,
                400,
            ),
            (
                HandshakeError::Identity(crate::arrive::mtls::IdentityError::NoSpiffeId).into(),
                "identity_refused",
                "denied",
                "client",
                "handshake_failed",
                None,
                400,
            ),
            (ReadError::Hello(HelloError::NotTls).into(), "not_tls", "denied", "client", "refused", None, 400),
            (
                ReadError::Hello(HelloError::Invalid("x")).into(),
                "client_hello_invalid",
                "denied",
                "client",
                "refused",
                Some(alert::DECODE_ERROR),
                400,
            ),
            (
                ReadError::Hello(HelloError::TooLarge(1)).into(),
                "client_hello_too_large",
                "denied",
                "client",
                "refused",
                Some(alert::DECODE_ERROR),
                400,
            ),
            (
                ReadError::Timeout { after: Duration::from_secs(1), received: 0 }.into(),
                "client_hello_timeout",
                "error",
                "client",
                "client_hello_timeout",
                None,
                408,
            ),
            (
                ReadError::Closed { received: 3 }.into(),
                "client_closed_early",
                "error",
                "client",
                "client_closed",
                None,
                408,
            ),
            (ConnError::NoSni, "no_sni", "denied", "client", "refused", Some(alert::UNRECOGNIZED_NAME), 400),
            (
                NameError::IpLiteral.into(),
                "invalid_sni",
                "denied",
                "client",
                "refused",
                Some(alert::UNRECOGNIZED_NAME),
                400,
            ),
            (ConnError::Denied(None), "policy_denied", "denied", "policy", "refused", Some(alert::ACCESS_DENIED), 403),
            (ConnError::Ech, "ech_refused", "denied", "policy", "refused", Some(alert::ACCESS_DENIED), 403),
            (
                ResolveError::AllRefused(vec![]).into(),
                "address_refused",
                "denied",
                "policy",
                "refused",
                Some(alert::ACCESS_DENIED),
                403,
            ),
            (
                ResolveError::NxDomain.into(),
                "dns_nxdomain",
                "error",
                "upstream",
                "refused",
                Some(alert::UNRECOGNIZED_NAME),
                502,
            ),
            (
                ResolveError::Timeout.into(),
                "dns_timeout",
                "error",
                "upstream",
                "dns_timeout",
                Some(alert::INTERNAL_ERROR),
                504,
            ),
            (
                connect_error(true).into(),
                "connect_timeout",
                "error",
                "upstream",
                "connect_timeout",
                Some(alert::INTERNAL_ERROR),
                504,
            ),
            (
                connect_error(false).into(),
                "connect_failed",
                "error",
                "upstream",
                "refused",
                Some(alert::INTERNAL_ERROR),
                502,
            ),
            (ConnError::MaxLifetime, "max_lifetime", "error", "internal", "max_lifetime", None, 503),
            (ConnError::Shutdown, "shutdown", "error", "internal", "drain_timeout", None, 503),
            (
                ConnError::Internal("bug"),
                "internal_error",
                "error",
                "internal",
                "internal_error",
                Some(alert::INTERNAL_ERROR),
                500,
            ),
        ];
        for (e, reason, decision, side, termination, alert, status) in cases {
            let got = (
                e.reason(),
                e.decision().as_str(),
                e.side().as_str(),
                e.termination().as_str(),
                e.alert(),
                e.http_status(),
            );
            assert_eq!(got, (reason, decision, side, termination, alert, status), "{e:?}");
            let proxy_status = e.proxy_status();
            assert!(
                proxy_status.starts_with("snigress; error=")
                    && proxy_status.ends_with(&format!("; details=\"{reason}\""))
            );
        }
    }

    #[test]
    fn proxy_status_names_the_rfc_9209_error_type() {
        let cases: Vec<(ConnError, &str)> = vec![
            (ConnError::Denied(None), "snigress; error=http_request_denied; details=\"policy_denied\""),
            (ResolveError::NxDomain.into(), "snigress; error=dns_error; rcode=NXDOMAIN; details=\"dns_nxdomain\""),
            (ResolveError::Timeout.into(), "snigress; error=dns_timeout; details=\"dns_timeout\""),
            (connect_error(true).into(), "snigress; error=connection_timeout; details=\"connect_timeout\""),
            (connect_error(false).into(), "snigress; error=connection_refused; details=\"connect_failed\""),
            (ConnError::ConnectionLimit, "snigress; error=connection_limit_reached; details=\"connection_limit\""),
        ];
        for (e, want) in cases {
            assert_eq!(e.proxy_status(), want);
        }
    }
}
