//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a
//! trusted proxy in front of the gateway sends before the client's bytes:
//! the client's address, the address it connected to, and in version 2
//! TLVs, among them Istio's `0xD0`, the caller's SPIFFE ID (ztunnel sends it
//! to a waypoint bound with `PROXY/15088`).
//!
//! [`parse`] is strict and incremental: given the bytes read so far it says
//! *more bytes needed*, *a complete header of n bytes*, or *invalid*, and
//! every proper prefix of a valid header is *more bytes needed*, so the
//! reader never waits for bytes a valid header cannot have. Nothing past
//! the header is ever consumed: those bytes are the client's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Version 2's signature, the first 12 bytes of its header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's header starts with this.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Version 1's longest header, CRLF included (the spec's figure).
const V1_MAX: usize = 107;
/// Version 2's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The most bytes of addresses and TLVs a version 2 header may carry here.
/// ztunnel sends 12 or 36 bytes of addresses and one SPIFFE ID (at most
/// 2 048 bytes by the SPIFFE spec), HAProxy a few small TLVs.
pub const V2_MAX_PAYLOAD: usize = 4096;
/// TLV types this gateway reads.
pub const TLV_CRC32C: u8 = 0x03;
/// Istio's peer identity: the caller's SPIFFE ID (ztunnel's
/// `PROXY_PROTOCOL_AUTHORITY_TLV`).
pub const TLV_ISTIO_PEER_IDENTITY: u8 = 0xD0;

/// The protocol versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub v1: bool,
    pub v2: bool,
}

impl Versions {
    pub const ALL: Versions = Versions { v1: true, v2: true };
}

/// Which version a header was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The access record's `arrival`.
    pub fn arrival(self) -> &'static str {
        match self {
            Version::V1 => "proxy_v1",
            Version::V2 => "proxy_v2",
        }
    }
}

impl Header {
    /// A header that names no client (v1 `UNKNOWN`, v2 `LOCAL`).
    fn empty(version: Version) -> Header {
        Header { version, addresses: None, peer_identity: None }
    }
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// The client's address and the address it connected to; `None` for a
    /// connection of the proxy's own (v2 `LOCAL`, v1 `UNKNOWN`) or an
    /// address family without ports (v2 `AF_UNSPEC`, `AF_UNIX`).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The value of the `0xD0` TLV, as sent (v2 `PROXY` command only).
    pub peer_identity: Option<Vec<u8>>,
}

/// Why a header is refused. The messages go to the access record's
/// `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("PROXY protocol {0} is not accepted on this listener (proxy_protocol.versions)")]
    Version(&'static str),
    #[error("invalid PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("invalid PROXY v2 header: {0}")]
    V2(&'static str),
}

/// Parses the header at the start of `buf`: `Ok(None)` while more bytes
/// are needed, `Ok(Some((header, n)))` for a complete header of `n` bytes.
pub fn parse(buf: &[u8], versions: Versions) -> Result<Option<(Header, usize)>, HeaderError> {
    let starts = |sig: &[u8]| buf.iter().zip(sig).all(|(a, b)| a == b);
    if buf.is_empty() {
        return Ok(None);
    }
    // The two signatures differ in their first byte.
    if starts(&V2_SIGNATURE) {
        if !versions.v2 {
            return Err(HeaderError::Version("v2"));
        }
        parse_v2(buf)
    } else if starts(V1_PREFIX) {
        if !versions.v1 {
            return Err(HeaderError::Version("v1"));
        }
        parse_v1(buf)
    } else {
        Err(HeaderError::Missing)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    // Every byte before the CRLF is printable ASCII.
    let end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    let checked = &window[..end.unwrap_or(window.len())];
    if checked.iter().any(|b| !(0x20..0x7f).contains(b)) {
        return Err(HeaderError::V1("a byte that is not printable ASCII"));
    }
    let Some(end) = end else {
        return if buf.len() >= V1_MAX { Err(HeaderError::V1("no CRLF within 107 bytes")) } else { Ok(None) };
    };
    match window.get(end..end + 2) {
        None if window[end] == b'\r' && buf.len() < V1_MAX => return Ok(None),
        Some(b"\r\n") => {}
        _ => return Err(HeaderError::V1("a line that does not end in CRLF")),
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..end]).map_err(|_| HeaderError::V1("not ASCII"))?;
    let len = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        // The rest of an UNKNOWN line is to be ignored.
        ["UNKNOWN", ..] => Header::empty(Version::V1),
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, HeaderError> {
                let ip: IpAddr = s.parse().map_err(|_| HeaderError::V1("an address that is not an IP address"))?;
                match (*family, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => Err(HeaderError::V1("an address of the other family")),
                }
            };
            let src = SocketAddr::new(ip(src)?, v1_port(sport)?);
            let dst = SocketAddr::new(ip(dst)?, v1_port(dport)?);
            Header { version: Version::V1, addresses: Some((src, dst)), peer_identity: None }
        }
        [] | [""] => return Err(HeaderError::V1("no protocol")),
        ["TCP4" | "TCP6", ..] => return Err(HeaderError::V1("not exactly four fields after the protocol")),
        _ => return Err(HeaderError::V1("a protocol other than TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Some((header, len)))
}

/// A v1 port: decimal, 0-65535, no sign, no leading zero.
fn v1_port(s: &str) -> Result<u16, HeaderError> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(HeaderError::V1("a port that is not a decimal number from 0 to 65535"));
    }
    s.parse().map_err(|_| HeaderError::V1("a port that is not a decimal number from 0 to 65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(HeaderError::V2("a version other than 2"));
        }
        if ver_cmd & 0x0f > 1 {
            return Err(HeaderError::V2("a command other than LOCAL or PROXY"));
        }
    }
    if let Some(&family) = buf.get(13) {
        match family {
            0x00 | 0x11 | 0x21 | 0x31 => {}
            0x12 | 0x22 | 0x32 => return Err(HeaderError::V2("a datagram transport, not a stream")),
            _ => return Err(HeaderError::V2("an unknown address family or transport")),
        }
    }
    let Some(fixed) = buf.get(..V2_FIXED) else { return Ok(None) };
    let payload_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if payload_len > V2_MAX_PAYLOAD {
        return Err(HeaderError::V2("more than 4096 bytes of addresses and TLVs"));
    }
    let local = fixed[12] & 0x0f == 0;
    let address_len = match fixed[13] >> 4 {
        0x1 => 12,
        0x2 => 36,
        0x3 => 216,
        _ => 0,
    };
    // A PROXY command must carry the addresses of its family; LOCAL may
    // carry anything, to be ignored.
    if !local && payload_len < address_len {
        return Err(HeaderError::V2("a length too short for the address family"));
    }
    let len = V2_FIXED + payload_len;
    let Some(whole) = buf.get(..len) else { return Ok(None) };
    let payload = &whole[V2_FIXED..];
    let tlvs = &payload[address_len.min(payload.len())..];
    let mut peer_identity = None;
    let mut rest = tlvs;
    while !rest.is_empty() {
        let [kind, hi, lo, ..] = *rest else {
            return Err(HeaderError::V2("a truncated TLV"));
        };
        let value_len = usize::from(u16::from_be_bytes([hi, lo]));
        let value = rest.get(3..3 + value_len).ok_or(HeaderError::V2("a TLV longer than the header"))?;
        match kind {
            TLV_CRC32C => {
                let sent: [u8; 4] = value.try_into().map_err(|_| HeaderError::V2("a CRC32C TLV not 4 bytes long"))?;
                // The checksum covers the whole header with its own value zeroed.
                let at = len - rest.len() + 3;
                if crc32c_zeroed(whole, at) != u32::from_be_bytes(sent) {
                    return Err(HeaderError::V2("a CRC32C checksum that does not match"));
                }
            }
            TLV_ISTIO_PEER_IDENTITY if peer_identity.replace(value.to_vec()).is_some() => {
                return Err(HeaderError::V2("two peer identity (0xD0) TLVs"));
            }
            _ => {}
        }
        rest = &rest[3 + value_len..];
    }
    if local {
        // The proxy's own connection (a health check): no client behind it.
        return Ok(Some((Header::empty(Version::V2), len)));
    }
    let addresses = match fixed[13] {
        0x11 => {
            let ip =
                |at: usize| IpAddr::V4(Ipv4Addr::new(payload[at], payload[at + 1], payload[at + 2], payload[at + 3]));
            let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        0x21 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&payload[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        // AF_UNSPEC and AF_UNIX: no address to use.
        _ => None,
    };
    Ok(Some((Header { version: Version::V2, addresses, peer_identity }, len)))
}

/// CRC32C (Castagnoli) of `data` with the four bytes at `zeroed` taken as 0.
fn crc32c_zeroed(data: &[u8], zeroed: usize) -> u32 {
    let mut crc = !0u32;
    for (i, &byte) in data.iter().enumerate() {
        let byte = if (zeroed..zeroed + 4).contains(&i) { 0 } else { byte };
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// CRC32C of `data`, for building headers in tests.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_zeroed(data, usize::MAX - 4)
}

/// Why reading a header failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Invalid(#[from] HeaderError),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the client closed the connection before its PROXY protocol header was complete")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header off `tcp` within `timeout`, consuming exactly its
/// bytes, so the client's own bytes stay in the socket for what follows
/// (the outer TLS layer, or the front and splice).
///
/// It peeks at what has arrived; when that is a proper prefix of a header,
/// every byte of it belongs to the header, so it is taken and the next
/// peek waits for more.
pub async fn read(tcp: &mut TcpStream, versions: Versions, timeout: Duration) -> Result<Header, ReadError> {
    let read = async {
        let mut have = Vec::new();
        let mut buf = vec![0u8; V2_FIXED + V2_MAX_PAYLOAD];
        loop {
            let room = buf.len() - have.len();
            let n = tcp.peek(&mut buf[..room]).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            let taken = have.len();
            have.extend_from_slice(&buf[..n]);
            match parse(&have, versions)? {
                Some((header, len)) => {
                    tcp.read_exact(&mut buf[..len - taken]).await?;
                    return Ok(header);
                }
                None => {
                    // (Never the whole buffer: a header that long is
                    // complete or refused.)
                    tcp.read_exact(&mut buf[..n]).await?;
                }
            }
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| ReadError::Timeout(timeout))?
}

/// The parser's promises on one input, for the fuzz target and the corpus
/// replay.
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing {
    use std::net::SocketAddrV4;

    /// A v2 header: `command` 0 (LOCAL) or 1 (PROXY), the family and
    /// transport byte, then `payload` (addresses and TLVs).
    pub fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = super::V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    /// One TLV.
    pub fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut t = vec![kind];
        t.extend_from_slice(&(value.len() as u16).to_be_bytes());
        t.extend_from_slice(value);
        t
    }

    /// The header Istio's ztunnel sends a waypoint: PROXY, TCP over IPv4,
    /// the app's address and the destination (a VIP), then the caller's
    /// SPIFFE ID in TLV 0xD0 when there is one.
    pub fn ztunnel(src: SocketAddrV4, dst: SocketAddrV4, identity: Option<&str>) -> Vec<u8> {
        let mut payload = [src.ip().octets(), dst.ip().octets()].concat();
        payload.extend_from_slice(&src.port().to_be_bytes());
        payload.extend_from_slice(&dst.port().to_be_bytes());
        if let Some(id) = identity {
            payload.extend(tlv(super::TLV_ISTIO_PEER_IDENTITY, id.as_bytes()));
        }
        v2(1, 0x11, &payload)
    }

    /// Any bytes: a complete header never claims more bytes than it was
    /// given and every shorter prefix of it asks for more; a complete
    /// header stays the same, and a refusal stays a refusal, as more bytes
    /// come.
    pub fn check(bytes: &[u8]) {
        let verdict = super::parse(bytes, super::Versions::ALL);
        if let Ok(Some((_, len))) = &verdict {
            assert!(*len <= bytes.len());
            for n in 0..*len {
                assert_eq!(super::parse(&bytes[..n], super::Versions::ALL), Ok(None), "prefix of {n}");
            }
        }
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0x16; 8]);
        match (&verdict, super::parse(&longer, super::Versions::ALL)) {
            (Ok(Some(a)), Ok(Some(b))) => assert_eq!(*a, b),
            (Ok(Some(_)), other) => panic!("complete, then {other:?} with more bytes"),
            (Err(a), Err(b)) => assert_eq!(*a, b),
            (Err(_), other) => panic!("refused, then {other:?} with more bytes"),
            (Ok(None), _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testing::{tlv, v2};

    fn ipv4_payload() -> Vec<u8> {
        let mut p = vec![10, 0, 0, 7, 240, 240, 0, 1];
        p.extend_from_slice(&51000u16.to_be_bytes());
        p.extend_from_slice(&443u16.to_be_bytes());
        p
    }

    fn ztunnel_header(id: &[u8]) -> Vec<u8> {
        let mut p = ipv4_payload();
        p.extend(tlv(TLV_ISTIO_PEER_IDENTITY, id));
        v2(1, 0x11, &p)
    }

    fn complete(buf: &[u8]) -> (Header, usize) {
        parse(buf, Versions::ALL).expect("valid").expect("complete")
    }

    /// Every proper prefix needs more bytes, and the whole parses to the
    /// same header with any bytes after it.
    fn every_prefix_waits(h: &[u8]) -> Header {
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n], Versions::ALL), Ok(None), "prefix of {n} bytes of {h:?}");
        }
        let (header, len) = complete(h);
        assert_eq!(len, h.len());
        let mut more = h.to_vec();
        more.extend_from_slice(b"\x16\x03\x01 the client's bytes");
        assert_eq!(complete(&more), (header.clone(), h.len()));
        header
    }

    #[test]
    fn a_ztunnel_header_gives_addresses_and_the_peer_identity() {
        let id = b"spiffe://cluster.local/ns/app/sa/client";
        let header = every_prefix_waits(&ztunnel_header(id));
        assert_eq!(header.addresses, Some(("10.0.0.7:51000".parse().unwrap(), "240.240.0.1:443".parse().unwrap())));
        assert_eq!(header.peer_identity.as_deref(), Some(&id[..]));
    }

    #[test]
    fn v2_ipv6_local_unspec_and_unix() {
        let mut p = vec![0x20, 0x01, 0x0d, 0xb8];
        p.resize(15, 0);
        p.push(1);
        p.extend_from_slice(&[0xfd, 0]);
        p.resize(31, 0);
        p.push(9);
        p.extend_from_slice(&1234u16.to_be_bytes());
        p.extend_from_slice(&443u16.to_be_bytes());
        let h = every_prefix_waits(&v2(1, 0x21, &p));
        assert_eq!(h.addresses, Some(("[2001:db8::1]:1234".parse().unwrap(), "[fd00::9]:443".parse().unwrap())));
        // LOCAL: addresses and TLVs ignored, whatever they say.
        let mut local = ipv4_payload();
        local.extend(tlv(TLV_ISTIO_PEER_IDENTITY, b"spiffe://x/y"));
        assert_eq!(every_prefix_waits(&v2(0, 0x11, &local)), Header::empty(Version::V2));
        assert_eq!(every_prefix_waits(&v2(0, 0x00, &[])), Header::empty(Version::V2));
        assert_eq!(every_prefix_waits(&v2(1, 0x00, &[])), Header::empty(Version::V2));
        assert_eq!(every_prefix_waits(&v2(1, 0x31, &[0; 216])).addresses, None);
    }

    #[test]
    fn v2_crc32c_is_checked() {
        let mut p = ipv4_payload();
        p.extend(tlv(TLV_CRC32C, &[0; 4]));
        let mut h = v2(1, 0x11, &p);
        let sum = crc32c(&h).to_be_bytes();
        let at = h.len() - 4;
        h[at..].copy_from_slice(&sum);
        every_prefix_waits(&h);
        h[at] ^= 1;
        assert_eq!(complete_err(&h), HeaderError::V2("a CRC32C checksum that does not match"));
        // The standard check value of CRC32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    fn complete_err(h: &[u8]) -> HeaderError {
        parse(h, Versions::ALL).expect_err("invalid")
    }

    #[test]
    fn malformed_v2_headers_are_refused_as_soon_as_they_are_seen() {
        let good = ztunnel_header(b"spiffe://cluster.local/ns/a/sa/b");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut h = good.clone();
                    h[12] = 0x11;
                    h
                },
                "a version other than 2",
            ),
            (
                {
                    let mut h = good.clone();
                    h[12] = 0x22;
                    h
                },
                "a command other than LOCAL or PROXY",
            ),
            (
                {
                    let mut h = good.clone();
                    h[13] = 0x12;
                    h
                },
                "a datagram transport, not a stream",
            ),
            (
                {
                    let mut h = good.clone();
                    h[13] = 0x41;
                    h
                },
                "an unknown address family or transport",
            ),
            (v2(1, 0x11, &[0; 11]), "a length too short for the address family"),
            (v2(1, 0x21, &[0; 35]), "a length too short for the address family"),
            (
                {
                    let mut p = ipv4_payload();
                    p.extend([0xD0, 0]);
                    v2(1, 0x11, &p)
                },
                "a truncated TLV",
            ),
            (
                {
                    let mut p = ipv4_payload();
                    p.extend([0xD0, 0, 9, 1]);
                    v2(1, 0x11, &p)
                },
                "a TLV longer than the header",
            ),
            (
                {
                    let mut p = ipv4_payload();
                    p.extend(tlv(3, &[1, 2]));
                    v2(1, 0x11, &p)
                },
                "a CRC32C TLV not 4 bytes long",
            ),
            (
                {
                    let mut p = ipv4_payload();
                    p.extend(tlv(0xD0, b"a"));
                    p.extend(tlv(0xD0, b"b"));
                    v2(1, 0x11, &p)
                },
                "two peer identity (0xD0) TLVs",
            ),
        ];
        for (h, why) in cases {
            assert_eq!(complete_err(&h), HeaderError::V2(why), "{h:?}");
        }
        // Too long a payload is refused from the fixed part alone.
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0x10, 0x01]);
        assert_eq!(complete_err(&h), HeaderError::V2("more than 4096 bytes of addresses and TLVs"));
        // A bad byte in the signature: not a header at all.
        assert_eq!(complete_err(b"\r\n\r\n\0\r\nQUIx"), HeaderError::Missing);
        // Unknown TLVs are walked over.
        let mut p = ipv4_payload();
        p.extend(tlv(0xEE, b"anything"));
        p.extend(tlv(0x01, b"h2"));
        assert!(every_prefix_waits(&v2(1, 0x11, &p)).peer_identity.is_none());
    }

    #[test]
    fn v1_headers() {
        let h = every_prefix_waits(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
        assert_eq!(h.addresses, Some(("192.0.2.1:56324".parse().unwrap(), "198.51.100.2:443".parse().unwrap())));
        let h = every_prefix_waits(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
        assert_eq!(h.addresses, Some(("[2001:db8::1]:1".parse().unwrap(), "[::1]:65535".parse().unwrap())));
        assert_eq!(every_prefix_waits(b"PROXY UNKNOWN\r\n"), Header::empty(Version::V1));
        assert_eq!(every_prefix_waits(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"), Header::empty(Version::V1));
        // The longest headers the spec allows.
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let longest = format!("PROXY TCP6 {ip} {ip} 65535 65535\r\n");
        assert_eq!(longest.len(), 104);
        every_prefix_waits(longest.as_bytes());
        let longest = format!("PROXY UNKNOWN {ip} {ip} 65535 65535\r\n");
        assert_eq!(longest.len(), V1_MAX);
        every_prefix_waits(longest.as_bytes());
    }

    #[test]
    fn malformed_v1_headers_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n", "a line that does not end in CRLF"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\r", "a line that does not end in CRLF"),
            (b"PROXY TCP4 192.0.2.1  198.51.100.2 56324 443\r\n", "not exactly four fields after the protocol"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n", "not exactly four fields after the protocol"),
            (b"PROXY TCP4 192.0.2.1 ::1 56324 443\r\n", "an address of the other family"),
            (b"PROXY TCP6 192.0.2.1 ::1 56324 443\r\n", "an address of the other family"),
            (b"PROXY TCP4 192.0.2.01 198.51.100.2 56324 443\r\n", "an address that is not an IP address"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n", "a port that is not a decimal number from 0 to 65535"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 0443 443\r\n", "a port that is not a decimal number from 0 to 65535"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 +443 443\r\n", "a port that is not a decimal number from 0 to 65535"),
            (b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", "a protocol other than TCP4, TCP6 or UNKNOWN"),
            (b"PROXY \r\n", "no protocol"),
            (b"PROXY TCP4 \x00", "a byte that is not printable ASCII"),
        ];
        for (h, why) in cases {
            assert_eq!(complete_err(h), HeaderError::V1(why), "{}", String::from_utf8_lossy(h));
        }
        let endless = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 100]].concat();
        assert_eq!(complete_err(&endless), HeaderError::V1("no CRLF within 107 bytes"));
        assert_eq!(complete_err(b"PROXX"), HeaderError::Missing);
        assert_eq!(complete_err(b"\x16\x03\x01\x02\x00"), HeaderError::Missing);
        assert_eq!(complete_err(b"GET / HTTP/1.1\r\n"), HeaderError::Missing);
    }

    #[test]
    fn a_listener_refuses_the_version_it_does_not_take() {
        let only_v2 = Versions { v1: false, v2: true };
        assert_eq!(parse(b"PROXY UNKNOWN\r\n", only_v2), Err(HeaderError::Version("v1")));
        let only_v1 = Versions { v1: true, v2: false };
        assert_eq!(parse(&ztunnel_header(b"x"), only_v1), Err(HeaderError::Version("v2")));
    }

    /// Any bytes: the verdict never claims more bytes than it was given, a
    /// complete header is complete in any longer buffer too, and a refusal
    /// stays a refusal as more bytes come.
    #[test]
    fn arbitrary_bytes_keep_the_parsers_promises() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let bases =
            [ztunnel_header(b"spiffe://cluster.local/ns/a/sa/b"), b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec()];
        for i in 0..20_000 {
            let mut bytes = bases[i % 2].clone();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            bytes.truncate((next() as usize) % (bytes.len() + 1));
            super::testing::check(&bytes);
        }
    }
}
