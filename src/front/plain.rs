//! The plain-HTTP front: the destination is the first request's `Host`,
//! and every later request on the connection must name the same host.
//!
//! Requests are forwarded byte for byte; only their framing is followed
//! (RFC 9112 §6: `Content-Length`, chunked bodies and their trailers) so that
//! each head is seen whole before a byte of it goes upstream. A head naming
//! another host is not forwarded: the client's stream ends there (what was
//! already sent is answered first), then the client gets `421 Misdirected
//! Request` and the connection closes. A head that cannot be framed safely
//! ends it the same way with its own status.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::http::{self, Authority, Body, Head, HttpError};
use crate::arrive::ClientStream;
use crate::name::ServerName;

/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 1024;
/// Most hex digits of a chunk size: at most `http::MAX_BODY_LENGTH`.
const MAX_CHUNK_DIGITS: usize = 8;
/// Read size from the client once the connection relays.
const READ_CHUNK: usize = 16 * 1024;

/// Why a later request was not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stop {
    #[error("a later request on the connection names {0}, not the host it was opened for")]
    Misdirected(String),
    #[error(transparent)]
    Invalid(#[from] HttpError),
}

impl Stop {
    pub fn status(&self) -> u16 {
        match self {
            Stop::Misdirected(_) => 421,
            Stop::Invalid(e) => e.status(),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Stop::Misdirected(_) => "misdirected_request",
            Stop::Invalid(e) => e.reason(),
        }
    }
}

/// The checks every request head passes, the first one included: a host,
/// no upgrade, no CONNECT; the destination it names.
pub fn check(head: &Head) -> Result<Authority, HttpError> {
    if head.method == "CONNECT" {
        return Err(HttpError::Method(head.method.clone()));
    }
    if head.upgrade {
        return Err(HttpError::Upgrade);
    }
    http::request_host(head)
}

/// Where the client's byte stream is, request by request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a head.
    Head,
    /// This many body bytes to go.
    Body(u64),
    /// In a chunk-size line: bytes so far, hex digits seen, whether the
    /// digits have ended (an extension follows), whether CR was seen.
    ChunkSize {
        line: usize,
        digits: usize,
        size: u64,
        ext: bool,
        cr: bool,
    },
    ChunkData(u64),
    /// The CRLF after a chunk's data: how many of its bytes were seen.
    ChunkEnd(u8),
    /// The CRLF after the last chunk: trailers are not forwarded (a
    /// trailer line some upstream skips loosely could hide a request).
    LastEnd(u8),
}

/// Follows the requests a client sends after its first one.
#[derive(Debug)]
pub struct Requests {
    /// The host the connection was opened for.
    host: ServerName,
    /// The port it goes to; a `Host` port, when given, must be this one.
    port: u16,
    state: State,
    /// A head being collected.
    head: Vec<u8>,
}

impl Requests {
    /// After the first request's head, whose body comes next.
    pub fn after(first: &Head, host: ServerName, port: u16) -> Requests {
        let mut requests = Requests { host, port, state: State::Head, head: Vec::new() };
        requests.begin(first.body);
        requests
    }

    fn begin(&mut self, body: Body) {
        self.state = match body {
            Body::None => State::Head,
            Body::Length(n) => State::Body(n),
            Body::Chunked => State::ChunkSize { line: 0, digits: 0, size: 0, ext: false, cr: false },
        };
    }

    /// Appends to `out` the bytes of `input` that may go upstream. A head
    /// is only appended once it is complete and names the same host; at the
    /// first one that does not, or that cannot be framed, the stop is
    /// returned and nothing after it is appended.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Stop> {
        while !input.is_empty() {
            match self.state {
                State::Head => {
                    let old = self.head.len();
                    let take = input.len().min(http::MAX_HEAD_BYTES + 1 - old.min(http::MAX_HEAD_BYTES));
                    self.head.extend_from_slice(&input[..take]);
                    let Some(head) = http::parse(&self.head)? else {
                        input = &input[take..];
                        continue;
                    };
                    let authority = check(&head)?;
                    if authority.name != self.host || authority.port.is_some_and(|p| p != self.port) {
                        let named = match authority.port {
                            Some(p) => format!("{}:{p}", authority.name),
                            None => authority.name.to_string(),
                        };
                        return Err(Stop::Misdirected(named));
                    }
                    out.extend_from_slice(&self.head[..head.len]);
                    input = &input[head.len - old..];
                    self.head.clear();
                    self.begin(head.body);
                }
                State::Body(n) => {
                    let take = input.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Head } else { State::Body(left) };
                }
                State::ChunkData(n) => {
                    let take = input.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkEnd(0) } else { State::ChunkData(left) };
                }
                _ => {
                    self.state = self.framing_byte(input[0])?;
                    out.push(input[0]);
                    input = &input[1..];
                }
            }
        }
        Ok(())
    }

    /// One byte of chunk framing (size lines, chunk ends, trailers).
    fn framing_byte(&self, b: u8) -> Result<State, HttpError> {
        let bad = |what| Err(HttpError::Framing(what));
        Ok(match self.state {
            State::ChunkSize { cr: true, .. } if b != b'\n' => return bad("CR without LF in a chunk-size line"),
            State::ChunkSize { cr: true, digits: 0, .. } => return bad("a chunk-size line without a size"),
            State::ChunkSize { cr: true, size: 0, .. } => State::LastEnd(0),
            State::ChunkSize { cr: true, size, .. } => State::ChunkData(size),
            State::ChunkSize { line, .. } if line >= MAX_CHUNK_LINE => return bad("chunk-size line too long"),
            State::ChunkSize { line, digits, size, ext, .. } => match b {
                b'\r' => State::ChunkSize { line: line + 1, digits, size, ext, cr: true },
                b'\n' => return bad("bare LF in a chunk-size line"),
                _ if !ext && b.is_ascii_hexdigit() => {
                    if digits >= MAX_CHUNK_DIGITS {
                        return bad("chunk size over 4 GiB");
                    }
                    let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                    State::ChunkSize { line: line + 1, digits: digits + 1, size: size * 16 + digit, ext, cr: false }
                }
                b';' | b' ' | b'\t' if digits > 0 => {
                    State::ChunkSize { line: line + 1, digits, size, ext: true, cr: false }
                }
                _ if ext && (b == b'\t' || (0x20..0x7f).contains(&b)) => {
                    State::ChunkSize { line: line + 1, digits, size, ext, cr: false }
                }
                _ => return bad("invalid chunk-size line"),
            },
            State::ChunkEnd(0) if b == b'\r' => State::ChunkEnd(1),
            State::ChunkEnd(1) if b == b'\n' => State::ChunkSize { line: 0, digits: 0, size: 0, ext: false, cr: false },
            State::ChunkEnd(_) => return bad("chunk data longer than its size"),
            State::LastEnd(0) if b == b'\r' => State::LastEnd(1),
            // The empty line after the last chunk ends the request.
            State::LastEnd(1) if b == b'\n' => State::Head,
            State::LastEnd(_) => return bad("a trailer section (trailers are not forwarded)"),
            State::Head | State::Body(_) | State::ChunkData(_) => self.state,
        })
    }
}

/// The client's stream, as the relay reads it: only what [`Requests`]
/// lets through, then end of stream at a stop; the stop's answer is written
/// when the relay closes the client's side, after every response the
/// upstream still had to send.
pub struct Guarded<S> {
    inner: S,
    requests: Requests,
    /// The read buffer, while the client sends.
    scratch: Vec<u8>,
    /// Let through, not yet handed to the relay: `out[pos..]`.
    out: Vec<u8>,
    pos: usize,
    stop: Option<Stop>,
    /// The stop's answer, and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
}

impl<S> Guarded<S> {
    /// `stop`: where following what came with the first request stopped.
    pub fn new(inner: S, requests: Requests, stop: Option<Stop>) -> Guarded<S> {
        Guarded { inner, requests, scratch: Vec::new(), out: Vec::new(), pos: 0, stop, answer: None }
    }

    /// Why the client's stream was ended early, and the answer's size once
    /// it has been written.
    pub fn stopped(&self) -> Option<(&Stop, Option<usize>)> {
        let written = self.answer.as_ref().filter(|(a, n)| *n == a.len()).map(|(a, _)| a.len());
        self.stop.as_ref().map(|s| (s, written))
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Feeds `input`; a stop is kept for the answer.
    fn follow(&mut self, input: &[u8]) {
        self.out.clear();
        self.pos = 0;
        if let Err(stop) = self.requests.feed(input, &mut self.out) {
            tracing::debug!(%stop, "plain HTTP request stream stopped");
            self.stop = Some(stop);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.pos);
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.stop.is_some() {
                // End of the client's stream, as far as the upstream knows.
                return Poll::Ready(Ok(()));
            }
            // Held while bytes flow; given back when the client goes quiet.
            let mut scratch = std::mem::take(&mut this.scratch);
            scratch.resize(READ_CHUNK, 0);
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            this.follow(&scratch[..n]);
            this.scratch = scratch;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(stop) = &this.stop {
            let (answer, written) = this.answer.get_or_insert_with(|| {
                let body = format!("{}: {stop}\n", stop.reason());
                let proxy_status = format!("snigress; error=http_request_error; details=\"{}\"", stop.reason());
                (http::answer(stop.status(), Some(&proxy_status), &body), 0)
            });
            while *written < answer.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: ClientStream> ClientStream for Guarded<S> {
    fn plain_tcp(&self) -> Option<&tokio::net::TcpStream> {
        // Every byte from the client is followed: no splicing.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(first: &str) -> (Requests, usize) {
        let head = http::parse(first.as_bytes()).unwrap().unwrap();
        let host = check(&head).unwrap().name;
        (Requests::after(&head, host, 80), head.len)
    }

    /// Feeds `rest` in pieces of `step` bytes; what went out and the stop.
    fn follow(first: &str, rest: &str, step: usize) -> (String, Option<Stop>) {
        let (mut r, len) = requests(first);
        let mut out = Vec::new();
        let mut input = first.as_bytes()[len..].to_vec();
        input.extend_from_slice(rest.as_bytes());
        for piece in input.chunks(step) {
            if let Err(stop) = r.feed(piece, &mut out) {
                return (String::from_utf8(out).unwrap(), Some(stop));
            }
        }
        (String::from_utf8(out).unwrap(), None)
    }

    const FIRST: &str = "POST /a HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn same_host_requests_go_through_whole_in_any_pieces() {
        let rest = "GET /b HTTP/1.1\r\nHost: A.EXAMPLE:80\r\n\r\n\
                    POST /c HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5;ext=1\r\nhello\r\n0000000a\r\n0123456789\r\n0\r\n\r\n\
                    GET http://a.example/d HTTP/1.1\r\nHost: a.example\r\n\r\n";
        for step in [1, 2, 3, 7, 64, 4096] {
            let (out, stop) = follow(FIRST, rest, step);
            assert_eq!(stop, None, "step {step}");
            assert_eq!(out, format!("hello{rest}"), "step {step}");
        }
    }

    #[test]
    fn another_host_is_stopped_before_its_head_goes_out() {
        for step in [1, 5, 4096] {
            let (out, stop) = follow(
                FIRST,
                "GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\nHost: b.example\r\n\r\n",
                step,
            );
            assert_eq!(out, "helloGET / HTTP/1.1\r\nHost: a.example\r\n\r\n");
            assert_eq!(stop, Some(Stop::Misdirected("b.example".into())));
        }
        let (_, stop) = follow(FIRST, "GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n", 9);
        assert_eq!(stop.map(|s| s.status()), Some(421));
    }

    #[test]
    fn a_body_is_never_read_as_a_head() {
        // The body looks like a request for another host: it is body.
        let first = "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 37\r\n\r\n";
        let body = "GET / HTTP/1.1\r\nHost: b.example\r\n\r\n\r\n";
        assert_eq!(body.len(), 37);
        let next = "GET / HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let (out, stop) = follow(first, &format!("{body}{next}"), 3);
        assert_eq!((out, stop), (format!("{body}{next}"), None));
    }

    #[test]
    fn bad_chunk_framing_stops() {
        let first = "POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            "5\nhello\r\n",
            "5\r\nhelloX\r\n",
            "zz\r\n",
            "\r\n",
            "100000005\r\n",
            "5\rx",
            "0\r\nX: y\r\n\r\n",
            "0\r\n\n",
        ] {
            let (_, stop) = follow(first, body, 1);
            assert_eq!(stop.as_ref().map(Stop::reason), Some("http_bad_framing"), "{body:?}");
        }
        let (_, stop) = follow(first, &format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE)), 100);
        assert!(stop.is_some());
    }

    #[test]
    fn a_later_smuggling_shape_or_upgrade_stops() {
        for (rest, status) in [
            ("GET / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n", 501),
            ("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n", 405),
            ("GET / HTTP/1.1\r\n\r\n", 400),
        ] {
            let (out, stop) = follow(FIRST, rest, 4096);
            assert_eq!((out.as_str(), stop.map(|s| s.status())), ("hello", Some(status)), "{rest:?}");
        }
    }
}
