//! The inner ClientHello: reassembled across TLS records and reads, checked
//! for ambiguity, parsed with tls-parser, and its SNI taken out.
//!
//! `HelloReader::advance` is called with everything read from the client so
//! far. It returns "need more bytes" as a state of its own, distinct from "not
//! TLS" and from a malformed hello, and it never looks past the records that
//! carry the hello: whatever follows (early data) is only replayed.
//!
//! Checks, in the order the bytes arrive:
//! - the first byte must be 22 (handshake) and the second 3 (TLS major
//!   version), so plain HTTP, SSLv2 and garbage are refused on their first
//!   bytes instead of making the gateway wait for a record that never ends;
//!   the record version must be 0x0301-0x0303 (TLS 1.0-1.2; TLS 1.3 keeps
//!   0x0301/0x0303 on the wire, RFC 8446 §5.1), so SSL 3.0 is refused;
//! - each record is 1..=2^14 bytes (RFC 8446 §5.1) and of type handshake;
//! - the first handshake message is a ClientHello whose declared length fits
//!   the cap, and its records carry nothing after it;
//! - inside, every length must add up exactly, there is at least one cipher
//!   suite and one compression method (RFC 8446 §4.1.2), at most one
//!   server_name extension and at most one host_name in it (RFC 6066 §3).
//!
//! A hello that fails any of these is refused before any lookup is made.

use std::io;
use std::time::Duration;

use tls_parser::{
    SNIType, TlsExtension, parse_tls_extension_sni_content, parse_tls_extension_unknown,
    parse_tls_handshake_client_hello, parse_tls_raw_record, parse_tls_record_header,
};
use tokio::io::AsyncRead;

/// TLS alert descriptions the gateway sends on the inner layer (RFC 8446 §6).
pub mod alert {
    pub const ACCESS_DENIED: u8 = 49;
    pub const DECODE_ERROR: u8 = 50;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const UNRECOGNIZED_NAME: u8 = 112;

    /// A fatal alert record in the clear, as a server sends before its
    /// ServerHello. The record version 3,3 is what TLS 1.2 and 1.3 peers
    /// expect (TLS 1.3's legacy_record_version).
    pub fn record(description: u8) -> [u8; 7] {
        [21, 3, 3, 0, 2, 2, description]
    }
}

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
const MAX_FRAGMENT_LEN: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// What the inner ClientHello told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The host_name from the server_name extension, unvalidated; `None` when
    /// the client sent no server_name (or one without a host_name).
    pub server_name: Option<Box<[u8]>>,
    /// The hello carries an encrypted_client_hello extension: its SNI is the
    /// public (outer) name, not the real destination.
    pub ech: bool,
    /// Bytes of the records that carried the hello, headers included.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The bytes so far are a valid prefix; read more.
    NeedMore,
    Complete(Hello),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("the client did not start a TLS handshake")]
    NotTls,
    #[error("the ClientHello is larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("invalid ClientHello: {0}")]
    Invalid(&'static str),
}

impl HelloError {
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::TooLarge(_) => "client_hello_too_large",
            HelloError::Invalid(_) => "client_hello_invalid",
        }
    }
}

/// Read size while collecting the ClientHello.
const READ_CHUNK: usize = 4096;

/// Why no complete ClientHello was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("no complete ClientHello within {after:?} ({received} bytes received)")]
    Timeout { after: Duration, received: usize },
    #[error("the client closed before its ClientHello was complete ({received} bytes received)")]
    Closed { received: usize },
    #[error("reading the ClientHello failed: {0}")]
    Io(#[source] io::Error),
}

/// Reads from `client` into `buf` until the ClientHello is complete, at most
/// `cap` bytes of records within `timeout`. Everything read stays in `buf`
/// (the hello and whatever followed it in the same reads), whatever the
/// result, so it can be replayed and counted.
pub async fn read<S>(client: &mut S, buf: &mut Vec<u8>, cap: usize, timeout: Duration) -> Result<Hello, ReadError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reader = HelloReader::new(cap);
    loop {
        match reader.advance(buf)? {
            Progress::Complete(hello) => return Ok(hello),
            Progress::NeedMore if buf.len() < cap => {}
            Progress::NeedMore => return Err(HelloError::TooLarge(cap).into()),
        }
        let received = buf.len();
        let chunk = READ_CHUNK.min(cap - received);
        return Err(match super::read_more(client, buf, chunk, deadline).await {
            Ok(()) => continue,
            Err(super::Short::Closed) => ReadError::Closed { received },
            Err(super::Short::Io(e)) => ReadError::Io(e),
            Err(super::Short::Timeout) => ReadError::Timeout { after: timeout, received },
        });
    }
}

/// Incremental ClientHello reassembly. One per connection; feed it the whole
/// buffer each time more bytes arrive.
#[derive(Debug)]
pub struct HelloReader {
    /// Most bytes the hello's records may take, headers included.
    cap: usize,
    /// Bytes of complete records already taken into `handshake`.
    consumed: usize,
    /// The handshake bytes of the records so far (only when the hello spans
    /// several records; a single-record hello is parsed in place).
    handshake: Vec<u8>,
}

impl HelloReader {
    pub fn new(cap: usize) -> HelloReader {
        HelloReader { cap, consumed: 0, handshake: Vec::new() }
    }

    pub fn advance(&mut self, buf: &[u8]) -> Result<Progress, HelloError> {
        loop {
            let rest = buf.get(self.consumed..).unwrap_or_default();
            self.check_header_prefix(rest)?;
            if rest.len() < RECORD_HEADER_LEN {
                return Ok(Progress::NeedMore);
            }
            let header = match parse_tls_record_header(rest) {
                Ok((_, h)) => h,
                Err(_) => return Err(HelloError::Invalid("unreadable record header")),
            };
            let len = usize::from(header.len);
            if len == 0 {
                return Err(HelloError::Invalid("empty handshake record"));
            }
            if len > MAX_FRAGMENT_LEN {
                return Err(HelloError::Invalid("record longer than 2^14 bytes"));
            }
            if self.consumed + RECORD_HEADER_LEN + len > self.cap {
                return Err(HelloError::TooLarge(self.cap));
            }
            let record = match parse_tls_raw_record(rest) {
                Ok((_, r)) => r,
                Err(tls_parser::Err::Incomplete(_)) => return Ok(Progress::NeedMore),
                Err(_) => return Err(HelloError::Invalid("unreadable record")),
            };
            self.consumed += RECORD_HEADER_LEN + len;
            let whole_in_one = self.handshake.is_empty() && complete_message(record.data).is_some();
            let message: &[u8] = if whole_in_one {
                record.data
            } else {
                self.handshake.extend_from_slice(record.data);
                &self.handshake
            };
            let Some(header) = message.get(..HANDSHAKE_HEADER_LEN) else { continue };
            if header[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Invalid("the first handshake message is not a ClientHello"));
            }
            let body_len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + body_len > self.cap {
                return Err(HelloError::TooLarge(self.cap));
            }
            let total = HANDSHAKE_HEADER_LEN + body_len;
            if message.len() < total {
                continue;
            }
            if message.len() > total {
                return Err(HelloError::Invalid("more data after the ClientHello in its records"));
            }
            let mut hello = parse_body(&message[HANDSHAKE_HEADER_LEN..])?;
            hello.len = self.consumed;
            return Ok(Progress::Complete(hello));
        }
    }

    /// Refuses a record whose first bytes already show it is not a handshake
    /// record, before waiting for the rest of it.
    fn check_header_prefix(&self, rest: &[u8]) -> Result<(), HelloError> {
        let bad = match rest {
            [] => false,
            [t, ..] if *t != CONTENT_HANDSHAKE => true,
            [_, major, ..] => *major != 3,
            [_] => false,
        };
        if bad && self.consumed == 0 {
            return Err(HelloError::NotTls);
        }
        if bad {
            return Err(HelloError::Invalid("a non-handshake record inside the ClientHello"));
        }
        match rest {
            [_, _, minor, ..] if !(1..=3).contains(minor) => {
                Err(HelloError::Invalid("record version outside TLS 1.0-1.2 (0x0301-0x0303)"))
            }
            _ => Ok(()),
        }
    }
}

/// The length of the handshake message at the start of `data` if `data`
/// holds exactly that message.
fn complete_message(data: &[u8]) -> Option<usize> {
    let h = data.get(..HANDSHAKE_HEADER_LEN)?;
    let total = HANDSHAKE_HEADER_LEN + (usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]));
    (data.len() == total).then_some(total)
}

/// Parses a ClientHello body (after the 4-byte handshake header).
fn parse_body(body: &[u8]) -> Result<Hello, HelloError> {
    let (rest, ch) =
        parse_tls_handshake_client_hello(body).map_err(|_| HelloError::Invalid("malformed ClientHello fields"))?;
    if !rest.is_empty() {
        return Err(HelloError::Invalid("trailing bytes after the extensions"));
    }
    if ch.ciphers.is_empty() {
        return Err(HelloError::Invalid("no cipher suites"));
    }
    if ch.comp.is_empty() {
        return Err(HelloError::Invalid("no compression methods"));
    }
    let mut hello = Hello { server_name: None, ech: false, len: 0 };
    let mut seen_server_name = false;
    let mut exts = ch.ext.unwrap_or_default();
    while !exts.is_empty() {
        let (next, ext) = parse_tls_extension_unknown(exts).map_err(|_| HelloError::Invalid("truncated extension"))?;
        exts = next;
        let TlsExtension::Unknown(ext_type, data) = ext else {
            return Err(HelloError::Invalid("unexpected extension framing"));
        };
        match ext_type.0 {
            EXT_SERVER_NAME => {
                if seen_server_name {
                    return Err(HelloError::Invalid("two server_name extensions"));
                }
                seen_server_name = true;
                hello.server_name = parse_server_name(data)?;
            }
            EXT_ENCRYPTED_CLIENT_HELLO => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// The host_name of a server_name extension; every length must add up.
fn parse_server_name(data: &[u8]) -> Result<Option<Box<[u8]>>, HelloError> {
    if data.is_empty() {
        return Ok(None);
    }
    let bad = HelloError::Invalid("malformed server_name extension");
    let (rest, ext) = parse_tls_extension_sni_content(data).map_err(|_| bad.clone())?;
    let TlsExtension::SNI(entries) = ext else { return Err(bad) };
    let list_len = usize::from(u16::from_be_bytes([data[0], data.get(1).copied().unwrap_or(0)]));
    let parsed_len: usize = entries.iter().map(|(_, name)| 3 + name.len()).sum();
    if !rest.is_empty() || data.len() != 2 + list_len || parsed_len != list_len {
        return Err(bad);
    }
    let mut host_names = entries.iter().filter(|(t, _)| *t == SNIType::HostName);
    let first = host_names.next().map(|(_, name)| Box::<[u8]>::from(*name));
    if host_names.next().is_some() {
        return Err(HelloError::Invalid("more than one host_name in server_name"));
    }
    Ok(first)
}

/// Builders of ClientHello bytes for tests (here and in `tests/`, with the
/// `test-util` feature): minimal hellos, and the re-framing of a real one
/// into other record layouts. Not part of the release library.
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing {
    /// Splits the handshake payload of `hello` (records of type 22) into
    /// records of at most `fragment` bytes each.
    pub fn refragment(hello: &[u8], fragment: usize) -> Vec<u8> {
        let mut payload = Vec::new();
        let mut rest = hello;
        while rest.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            payload.extend_from_slice(&rest[5..5 + len]);
            rest = &rest[5 + len..];
        }
        let mut out = Vec::new();
        for chunk in payload.chunks(fragment.max(1)) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A minimal but complete ClientHello with the given extensions.
    pub fn hello_with_extensions(exts: &[u8]) -> Vec<u8> {
        hello_parts(&[0x13, 0x01], &[0], exts)
    }

    /// A ClientHello with these cipher suites (2 bytes each), compression
    /// methods and extensions, in one record.
    pub fn hello_parts(cipher_suites: &[u8], compression: &[u8], exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&(cipher_suites.len() as u16).to_be_bytes());
        body.extend_from_slice(cipher_suites);
        body.push(compression.len() as u8);
        body.extend_from_slice(compression);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    /// A server_name extension with these (type, name) entries.
    pub fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    /// A minimal ClientHello naming `name`.
    pub fn hello_for(name: &str) -> Vec<u8> {
        hello_with_extensions(&sni_ext(&[(0, name.as_bytes())]))
    }

    /// The fuzz target's check, also run on every corpus file by `cargo
    /// test`: the reader ends in a result, never claims more bytes than it
    /// was given or its cap allows, and reaches the same verdict whether
    /// the bytes come whole or in pieces (the piece size is taken from the
    /// first byte, so the fuzzer explores it too).
    pub fn check_reader(data: &[u8]) {
        use super::{HelloReader, Progress};
        const CAP: usize = 16 * 1024;
        let whole = HelloReader::new(CAP).advance(data);
        if let Ok(Progress::Complete(hello)) = &whole {
            assert!(hello.len <= data.len() && hello.len <= CAP, "a hello of {} from {} bytes", hello.len, data.len());
        }
        let step = usize::from(data.first().copied().unwrap_or(0) % 64) + 1;
        let mut reader = HelloReader::new(CAP);
        let mut end = 0;
        let pieces = loop {
            end = (end + step).min(data.len());
            match reader.advance(&data[..end]) {
                Ok(Progress::NeedMore) if end < data.len() => continue,
                verdict => break verdict,
            }
        };
        assert_eq!(whole, pieces, "whole and in pieces of {step} bytes disagree");
    }

    /// A minimal ClientHello naming `name` that also carries an
    /// encrypted_client_hello extension (as Chrome's ECH GREASE does).
    pub fn ech_hello_for(name: &str) -> Vec<u8> {
        let mut exts = sni_ext(&[(0, name.as_bytes())]);
        exts.extend_from_slice(&[0xfe, 0x0d, 0, 4, 0, 0, 1, 0]);
        hello_with_extensions(&exts)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{hello_for, hello_parts, hello_with_extensions, refragment, sni_ext};
    use super::*;

    const CAP: usize = 16 * 1024;

    fn read_all(bytes: &[u8]) -> Result<Progress, HelloError> {
        HelloReader::new(CAP).advance(bytes)
    }

    fn sni_of(bytes: &[u8]) -> Option<Vec<u8>> {
        match read_all(bytes) {
            Ok(Progress::Complete(h)) => h.server_name.map(|n| n.to_vec()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn single_record() {
        let h = hello_for("api.example.com");
        assert_eq!(sni_of(&h).as_deref(), Some(&b"api.example.com"[..]));
        match read_all(&h) {
            Ok(Progress::Complete(hello)) => assert_eq!(hello.len, h.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_prefix_needs_more_then_completes() {
        for fragment in [usize::MAX, 1, 2, 7, 40] {
            let h = refragment(&hello_for("split.example.org"), fragment);
            let mut reader = HelloReader::new(CAP);
            for end in 0..h.len() {
                assert_eq!(reader.advance(&h[..end]), Ok(Progress::NeedMore), "fragment {fragment} prefix {end}");
            }
            match reader.advance(&h) {
                Ok(Progress::Complete(hello)) => {
                    assert_eq!(hello.server_name.as_deref(), Some(&b"split.example.org"[..]));
                    assert_eq!(hello.len, h.len());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bytes_after_the_hello_are_left_alone() {
        let mut h = hello_for("a.example");
        let hello_len = h.len();
        h.extend_from_slice(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]); // early data record
        match read_all(&h) {
            Ok(Progress::Complete(hello)) => assert_eq!(hello.len, hello_len),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_tls_is_refused_on_the_first_bytes() {
        assert_eq!(read_all(b"G"), Err(HelloError::NotTls));
        assert_eq!(read_all(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        assert_eq!(read_all(&[0x80, 0x2e, 0x01, 0x00, 0x02]), Err(HelloError::NotTls)); // SSLv2
        assert_eq!(read_all(&[22, 2]), Err(HelloError::NotTls));
        assert_eq!(read_all(&[23, 3, 3, 0, 1, 0]), Err(HelloError::NotTls));
        assert_eq!(read_all(&[22]), Ok(Progress::NeedMore));
        assert_eq!(read_all(&[22, 3, 1, 0]), Ok(Progress::NeedMore));
    }

    #[test]
    fn size_caps() {
        // A record that would pass the cap is refused at its header.
        assert_eq!(HelloReader::new(100).advance(&[22, 3, 1, 0, 200]), Err(HelloError::TooLarge(100)));
        // A declared 16 MiB handshake is refused as soon as its header is seen.
        assert_eq!(read_all(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]), Err(HelloError::TooLarge(CAP)));
        // Many small records adding up past the cap.
        let h = refragment(&hello_for(&format!("{}.example", "a".repeat(60))), 1);
        assert!(h.len() > 400);
        let mut reader = HelloReader::new(400);
        let result = (1..=h.len()).map(|end| reader.advance(&h[..end])).find(|r| r != &Ok(Progress::NeedMore));
        assert_eq!(result, Some(Err(HelloError::TooLarge(400))));
    }

    #[test]
    fn ambiguity_is_refused() {
        // A non-handshake record between fragments.
        let h = refragment(&hello_for("a.example"), 20);
        let mut mixed = h[..25].to_vec();
        mixed.extend_from_slice(&[21, 3, 3, 0, 2, 1, 0]);
        mixed.extend_from_slice(&h[25..]);
        assert!(matches!(read_all(&mixed), Err(HelloError::Invalid(_))));
        // A second handshake message in the same record.
        let mut two = hello_for("a.example");
        let extra = [1, 0, 0, 0];
        let rec_len = u16::from_be_bytes([two[3], two[4]]) + 4;
        two[3..5].copy_from_slice(&rec_len.to_be_bytes());
        two.extend_from_slice(&extra);
        assert!(matches!(read_all(&two), Err(HelloError::Invalid(_))));
        // Two host names.
        let h = hello_with_extensions(&sni_ext(&[(0, b"a.example"), (0, b"b.example")]));
        assert!(matches!(read_all(&h), Err(HelloError::Invalid(_))));
        // Two server_name extensions.
        let mut exts = sni_ext(&[(0, b"a.example")]);
        exts.extend(sni_ext(&[(0, b"b.example")]));
        assert!(matches!(read_all(&hello_with_extensions(&exts)), Err(HelloError::Invalid(_))));
        // Not a ClientHello.
        let mut server_hello = hello_for("a.example");
        server_hello[5] = 2;
        assert!(matches!(read_all(&server_hello), Err(HelloError::Invalid(_))));
        // Empty record.
        assert!(matches!(read_all(&[22, 3, 1, 0, 0]), Err(HelloError::Invalid(_))));
    }

    #[test]
    fn inner_lengths_must_fit_their_outer_length() {
        // host_name length overruns the list.
        let mut exts = sni_ext(&[(0, b"a.example")]);
        exts[8] = 40; // name length low byte
        assert!(matches!(read_all(&hello_with_extensions(&exts)), Err(HelloError::Invalid(_))));
        // list length shorter than its entries.
        let mut exts = sni_ext(&[(0, b"a.example")]);
        exts[5] -= 1;
        assert!(matches!(read_all(&hello_with_extensions(&exts)), Err(HelloError::Invalid(_))));
        // extension length overruns the extension block.
        let mut exts = sni_ext(&[(0, b"a.example")]);
        exts[3] += 10;
        assert!(matches!(read_all(&hello_with_extensions(&exts)), Err(HelloError::Invalid(_))));
        // ClientHello body shorter than its fields say.
        let mut h = hello_for("a.example");
        h[9 + 2 + 32 + 1 + 1] = 200; // cipher-suites length
        assert!(matches!(read_all(&h), Err(HelloError::Invalid(_))));
    }

    #[test]
    fn missing_sni_ech_and_other_name_types() {
        assert_eq!(sni_of(&hello_with_extensions(&[])), None);
        assert_eq!(sni_of(&hello_with_extensions(&sni_ext(&[]))), None);
        assert_eq!(sni_of(&hello_with_extensions(&[0, 0, 0, 0])), None);
        assert_eq!(sni_of(&hello_with_extensions(&sni_ext(&[(1, b"x")]))).as_deref(), None);
        let mut exts = sni_ext(&[(0, b"public.example")]);
        exts.extend_from_slice(&[0xfe, 0x0d, 0, 2, 0xaa, 0xbb]);
        exts.extend_from_slice(&[0x0a, 0x0a, 0, 0]); // GREASE
        match read_all(&hello_with_extensions(&exts)) {
            Ok(Progress::Complete(h)) => {
                assert!(h.ech);
                assert_eq!(h.server_name.as_deref(), Some(&b"public.example"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn alert_record_shape() {
        assert_eq!(alert::record(alert::ACCESS_DENIED), [21, 3, 3, 0, 2, 2, 49]);
    }

    #[test]
    fn rfc_invalid_hellos_are_refused() {
        let good = hello_for("a.example");
        assert!(matches!(read_all(&good), Ok(Progress::Complete(_))));
        // Record versions other than 0x0301-0x0303, on the first record or a later one.
        for minor in [0u8, 4, 0xff] {
            let mut bad = good.clone();
            bad[2] = minor;
            assert!(matches!(read_all(&bad), Err(HelloError::Invalid(_))), "record version 3.{minor}");
            let mut split = refragment(&good, 40);
            let second = 5 + usize::from(u16::from_be_bytes([split[3], split[4]]));
            split[second + 2] = minor;
            assert!(matches!(read_all(&split), Err(HelloError::Invalid(_))), "second record 3.{minor}");
        }
        let sni = sni_ext(&[(0, b"a.example")]);
        assert_eq!(read_all(&hello_parts(&[], &[0], &sni)), Err(HelloError::Invalid("no cipher suites")));
        assert_eq!(
            read_all(&hello_parts(&[0x13, 0x01], &[], &sni)),
            Err(HelloError::Invalid("no compression methods"))
        );
    }
}
