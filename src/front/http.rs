//! HTTP/1.x request heads, for the CONNECT and plain-HTTP fronts: reading
//! one within bounds, parsing it strictly, finding the host it names and how
//! its body is framed, and the answers a refused request gets.
//!
//! Strict on purpose (RFC 9112): one `Host`, one `Content-Length` of digits,
//! `Transfer-Encoding` only as `chunked` and never beside a length, no
//! obsolete line folding, no whitespace before a colon. A head that two
//! parsers could read two ways is refused, never guessed at (request
//! smuggling lives in those guesses).

use std::io;
use std::time::Duration;

use tokio::io::AsyncRead;

use crate::name::{NameError, ServerName};

/// Most bytes a request head may take, request line included.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 64;
/// Largest `Content-Length` (and chunk size, see `front::plain`) taken: an
/// upstream that keeps sizes in 32 bits must not read a smaller one than
/// the gateway follows.
pub const MAX_BODY_LENGTH: u64 = u32::MAX as u64;

/// Read size while collecting a head.
const READ_CHUNK: usize = 2048;

/// What a complete request head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes the head takes, its final empty line included.
    pub len: usize,
    pub method: String,
    pub target: String,
    /// The minor version: `HTTP/1.0` or `HTTP/1.1`.
    pub minor: u8,
    /// The one `Host` field's value, when there is one.
    pub host: Option<String>,
    pub body: Body,
    /// The request asks for a protocol upgrade.
    pub upgrade: bool,
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("the request head is larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("the request head has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("unsupported HTTP version (HTTP/1.0 and HTTP/1.1 only)")]
    Version,
    #[error("the request has no Host header")]
    MissingHost,
    #[error("the request has more than one Host header")]
    DuplicateHost,
    #[error("invalid host {0:?}")]
    InvalidHost(String, #[source] Option<NameError>),
    #[error("the request target names {target:?} but Host is {host:?}")]
    HostMismatch { target: String, host: String },
    #[error("ambiguous or unsupported body framing: {0}")]
    Framing(&'static str),
    #[error("method {0} is not served on this listener")]
    Method(String),
    #[error("protocol upgrades are not relayed by the plain-HTTP front")]
    Upgrade,
}

impl HttpError {
    /// The bounded `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            HttpError::TooLarge | HttpError::TooManyHeaders => "http_head_too_large",
            HttpError::Malformed(_) | HttpError::Version => "http_invalid",
            HttpError::MissingHost | HttpError::DuplicateHost | HttpError::HostMismatch { .. } => "http_invalid_host",
            HttpError::InvalidHost(..) => "http_invalid_host",
            HttpError::Framing(_) => "http_bad_framing",
            HttpError::Method(_) => "method_not_allowed",
            HttpError::Upgrade => "http_upgrade_refused",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            HttpError::TooLarge | HttpError::TooManyHeaders => 431,
            HttpError::Version => 505,
            HttpError::Method(_) => 405,
            HttpError::Upgrade => 501,
            _ => 400,
        }
    }
}

/// Why the destination a request names is refused before policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Http(HttpError),
    #[error("port {port} is not allowed ({allowed})")]
    Port { port: u16, allowed: &'static str },
    #[error("{0} is an IP address: policy is by name")]
    IpLiteral(String),
}

impl From<HttpError> for TargetError {
    fn from(e: HttpError) -> TargetError {
        match e {
            HttpError::InvalidHost(text, Some(NameError::IpLiteral)) => TargetError::IpLiteral(text),
            e => TargetError::Http(e),
        }
    }
}

impl TargetError {
    pub fn reason(&self) -> &'static str {
        match self {
            TargetError::Http(e) => e.reason(),
            TargetError::Port { .. } => "port_not_allowed",
            TargetError::IpLiteral(_) => "ip_literal_refused",
        }
    }
}

/// Why no complete request head was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Invalid(#[from] HttpError),
    #[error("no complete request head within {after:?} ({received} bytes received)")]
    Timeout { after: Duration, received: usize },
    #[error("the client closed before its request head was complete ({received} bytes received)")]
    Closed { received: usize },
    #[error("reading the request head failed: {0}")]
    Io(#[source] io::Error),
}

/// Parses `buf` as the start of a request: `Ok(None)` while the head is
/// incomplete (and could still fit), the head once it is complete.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(HttpError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(HttpError::Version),
        Err(e) => return Err(HttpError::Malformed(malformed(e))),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HttpError::TooLarge);
    }
    // Lines end in CRLF: a parser that also ends them at a bare LF (as
    // httparse does) and one that does not would read different fields.
    if buf[..len].iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r')) {
        return Err(HttpError::Malformed("a line ends in a bare LF"));
    }
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version) else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut upgrade = false;
    for field in request.headers.iter() {
        // Only the fields read here must be text; others pass untouched.
        let text = || {
            std::str::from_utf8(field.value)
                .map(|v| v.trim_matches([' ', '\t']))
                .map_err(|_| HttpError::Malformed("a Host or framing field is not ASCII"))
        };
        // Servers that map '_' to '-' (CGI-style) would take these for
        // framing fields the gateway did not follow.
        let dashed = field.name.replace('_', "-");
        if field.name.contains('_')
            && ["content-length", "transfer-encoding", "host"].iter().any(|f| dashed.eq_ignore_ascii_case(f))
        {
            return Err(HttpError::Framing("a field name like Content-Length, Transfer-Encoding or Host with '_'"));
        }
        if field.name.eq_ignore_ascii_case("host") {
            let value = text()?;
            if host.replace(value.to_owned()).is_some() {
                return Err(HttpError::DuplicateHost);
            }
        } else if field.name.eq_ignore_ascii_case("content-length") {
            let value = text()?;
            if length.is_some() {
                return Err(HttpError::Framing("more than one Content-Length"));
            }
            if value.is_empty() || value.len() > 18 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Framing("Content-Length is not a decimal number"));
            }
            length = value.parse().ok().filter(|n| *n <= MAX_BODY_LENGTH);
            if length.is_none() {
                return Err(HttpError::Framing("Content-Length over 4 GiB"));
            }
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = text()?;
            if chunked {
                return Err(HttpError::Framing("more than one Transfer-Encoding"));
            }
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(HttpError::Framing("Transfer-Encoding other than chunked"));
            }
            chunked = true;
        } else if field.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let body = match (length, chunked) {
        (Some(_), true) => return Err(HttpError::Framing("both Content-Length and Transfer-Encoding")),
        (_, true) if minor == 0 => return Err(HttpError::Framing("Transfer-Encoding in an HTTP/1.0 request")),
        (_, true) => Body::Chunked,
        (Some(0) | None, false) => Body::None,
        (Some(n), false) => Body::Length(n),
    };
    Ok(Some(Head { len, method: method.to_owned(), target: target.to_owned(), minor, host, body, upgrade }))
}

fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status | httparse::Error::Token => "invalid request line",
        _ => "invalid request",
    }
}

/// Reads from `client` into `buf` (which may already hold bytes) until a
/// request head is complete, within [`MAX_HEAD_BYTES`] and `timeout`.
/// Everything read stays in `buf`, the bytes after the head included.
pub async fn read<S>(client: &mut S, buf: &mut Vec<u8>, timeout: Duration) -> Result<Head, ReadError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(head) = parse(buf)? {
            return Ok(head);
        }
        let received = buf.len();
        return Err(match super::read_more(client, buf, READ_CHUNK, deadline).await {
            Ok(()) => continue,
            Err(super::Short::Closed) => ReadError::Closed { received },
            Err(super::Short::Io(e)) => ReadError::Io(e),
            Err(super::Short::Timeout) => ReadError::Timeout { after: timeout, received },
        });
    }
}

/// A host and port as a request names them (`Host`, an authority).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub name: ServerName,
    pub port: Option<u16>,
}

/// What an authority (`host[:port]`) names. IP literals (`[::1]`,
/// `192.0.2.1`) are refused as [`NameError::IpLiteral`]: policy is by name.
pub fn authority(text: &str) -> Result<Authority, HttpError> {
    let invalid =
        |e: Option<NameError>| HttpError::InvalidHost(crate::observe::access_log::printable(text.as_bytes()), e);
    if text.starts_with('[') {
        return Err(invalid(Some(NameError::IpLiteral)));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => {
            // A port is 1-65535 in plain decimal digits.
            let valid = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
            match port.parse::<u16>() {
                Ok(p @ 1..) if valid => (host, Some(p)),
                _ => return Err(invalid(None)),
            }
        }
        None => (text, None),
    };
    if host.contains(':') {
        return Err(invalid(Some(NameError::IpLiteral)));
    }
    let name = ServerName::from_bytes(host.as_bytes()).map_err(|e| invalid(Some(e)))?;
    Ok(Authority { name, port })
}

/// The plain-HTTP front's destination: the `Host` field, which an
/// absolute-form target (`http://host/path`, what `HTTP_PROXY` clients send)
/// must agree with.
pub fn request_host(head: &Head) -> Result<Authority, HttpError> {
    let host = match &head.host {
        Some(h) => h,
        None => return Err(HttpError::MissingHost),
    };
    let authority = authority(host)?;
    if head.target.starts_with('/') || head.target == "*" {
        return Ok(authority);
    }
    let lower = head.target.get(..7).map(str::to_ascii_lowercase);
    if lower.as_deref() != Some("http://") {
        return Err(HttpError::Malformed("the request target is neither a path nor an http:// URL"));
    }
    let rest = &head.target[7..];
    let named = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if named.contains('@') {
        return Err(HttpError::Malformed("user information in the request target"));
    }
    let target = crate::front::http::authority(named)?;
    if target != authority {
        return Err(HttpError::HostMismatch {
            target: crate::observe::access_log::printable(named.as_bytes()),
            host: crate::observe::access_log::printable(host.as_bytes()),
        });
    }
    Ok(authority)
}

/// An HTTP answer the gateway writes itself: `status`, a `Proxy-Status`
/// field (RFC 9209) naming what happened, a one-line body with the reason,
/// and `Connection: close` unless `keep` (a CONNECT tunnel's 200).
pub fn answer(status: u16, proxy_status: Option<&str>, body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", phrase(status));
    if let Some(p) = proxy_status {
        out.push_str("Proxy-Status: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    if !body.is_empty() {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// The reason phrases of the statuses the gateway sends.
fn phrase(status: u16) -> &'static str {
    match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        508 => "Loop Detected",
        _ => "Error",
    }
}

/// The answer to an accepted CONNECT.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, HttpError> {
        parse(text.as_bytes())
    }

    #[test]
    fn a_connect_head_and_what_follows_it() {
        let text = "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nUser-Agent: curl\r\n\r\n\x16\x03\x01";
        let h = head(text).unwrap().unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str(), h.minor), ("CONNECT", "a.example:443", 1));
        assert_eq!(h.len, text.len() - 3);
        assert_eq!(h.body, Body::None);
    }

    #[test]
    fn every_prefix_of_a_head_needs_more() {
        let text = b"GET /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\n";
        for end in 0..text.len() {
            assert_eq!(parse(&text[..end]), Ok(None), "{end}");
        }
        assert_eq!(parse(text).unwrap().unwrap().body, Body::Length(5));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for (text, reason) in [
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "http_bad_framing",
            ),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", "http_bad_framing"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", "http_bad_framing"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", "http_bad_framing"),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "http_bad_framing"),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", "http_bad_framing"),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "http_bad_framing",
            ),
            ("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", "http_bad_framing"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "http_invalid_host"),
            ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "http_invalid"),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", "http_invalid"),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", "http_invalid"),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "http_invalid"),
            ("POST / HTTP/1.1\r\nHost: a\r\nX: y\nContent-Length: 36\r\n\r\n", "http_invalid"),
            ("GET / HTTP/1.1\nHost: a\n\n", "http_invalid"),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n", "http_bad_framing"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n", "http_bad_framing"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4294967301\r\n\r\n", "http_bad_framing"),
        ] {
            let e = head(text).expect_err(text);
            assert_eq!(e.reason(), reason, "{text:?}: {e}");
        }
    }

    #[test]
    fn size_caps() {
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "y".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&big), Err(HttpError::TooLarge));
        assert_eq!(head(&big[..MAX_HEAD_BYTES + 10]), Err(HttpError::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(head(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(HttpError::TooManyHeaders));
    }

    #[test]
    fn authorities() {
        let a = authority("A.Example.:8080").unwrap();
        assert_eq!((a.name.as_str(), a.port), ("a.example", Some(8080)));
        assert_eq!(authority("a.example").unwrap().port, None);
        for bad in [
            "a.example:0",
            "a.example:65536",
            "a.example:",
            "a.example:08x",
            "[::1]:443",
            "10.0.0.1:443",
            "::1",
            "a b:1",
            "",
        ] {
            assert!(authority(bad).is_err(), "{bad}");
        }
        assert!(matches!(authority("10.0.0.1:443"), Err(HttpError::InvalidHost(_, Some(NameError::IpLiteral)))));
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        let h = |target: &str, host: &str| Head {
            len: 0,
            method: "GET".into(),
            target: target.into(),
            minor: 1,
            host: Some(host.into()),
            body: Body::None,
            upgrade: false,
        };
        assert_eq!(request_host(&h("/p", "a.example")).unwrap().name.as_str(), "a.example");
        assert_eq!(request_host(&h("http://A.example/p?q", "a.example")).unwrap().name.as_str(), "a.example");
        assert!(matches!(request_host(&h("http://b.example/", "a.example")), Err(HttpError::HostMismatch { .. })));
        assert!(matches!(request_host(&h("http://a.example:81/", "a.example")), Err(HttpError::HostMismatch { .. })));
        assert!(request_host(&h("https://a.example/", "a.example")).is_err());
        assert!(request_host(&h("http://u@a.example/", "a.example")).is_err());
        let mut no_host = h("/", "x");
        no_host.host = None;
        assert_eq!(request_host(&no_host), Err(HttpError::MissingHost));
    }

    #[test]
    fn answers_carry_proxy_status_and_close() {
        let a = String::from_utf8(answer(403, Some("snigress; error=http_request_denied"), "policy_denied\n")).unwrap();
        assert!(a.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{a}");
        assert!(a.contains("\r\nProxy-Status: snigress; error=http_request_denied\r\n"), "{a}");
        assert!(a.contains("\r\nConnection: close\r\n") && a.ends_with("\r\n\r\npolicy_denied\n"), "{a}");
    }
}

/// The fuzz target's check, shared with the corpus replay in `cargo test`.
/// Not part of the release library.
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing {
    use super::*;
    use crate::front::plain::Requests;

    /// On any bytes: the head parser never panics and never claims more
    /// than it was given or than a head may take; the request follower
    /// lets through a prefix of its input (it never rewrites), the same
    /// prefix and the same stop whatever pieces the input comes in.
    pub fn check(data: &[u8]) {
        if let Ok(Some(head)) = parse(data) {
            assert!(head.len <= data.len() && head.len <= MAX_HEAD_BYTES);
            assert_eq!(parse(&data[..head.len]), Ok(Some(head.clone())));
            assert_eq!(parse(&data[..head.len - 1]), Ok(None));
            let _ = request_host(&head);
        }
        let piece = data.first().map_or(1, |b| usize::from(*b % 17) + 1);
        let first = parse(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n").ok().flatten().expect("a valid head");
        let host = crate::name::ServerName::from_bytes(b"a.example").expect("a valid name");
        let mut whole = Requests::after(&first, host.clone(), 80);
        let mut whole_out = Vec::new();
        let whole_stop = whole.feed(data, &mut whole_out).err();
        let mut pieced = Requests::after(&first, host, 80);
        let mut pieced_out = Vec::new();
        let mut pieced_stop = None;
        for chunk in data.chunks(piece) {
            if let Err(stop) = pieced.feed(chunk, &mut pieced_out) {
                pieced_stop = Some(stop);
                break;
            }
        }
        assert!(data.starts_with(&whole_out), "only a prefix of the input goes out");
        assert_eq!(whole_out, pieced_out, "piece size {piece}");
        assert_eq!(whole_stop, pieced_stop, "piece size {piece}");
    }
}
