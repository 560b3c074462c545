//! Fronts: how the gateway learns where a client wants to go, from the
//! first bytes it sends. [`tls`]: the server_name of the ClientHello;
//! [`connect`]: an HTTP CONNECT request (and then the tunnelled hello's
//! SNI, which must agree); [`plain`]: a plain-HTTP request's `Host`. Every
//! byte a front reads is kept, to be replayed upstream; [`http`] holds what
//! the two HTTP fronts share.

pub mod connect;
pub mod http;
pub mod plain;
pub mod tls;

/// Why a front got no more bytes.
pub(crate) enum Short {
    Closed,
    Io(std::io::Error),
    Timeout,
}

/// Reads at most `chunk` more bytes onto the end of `buf`, by `deadline`.
pub(crate) async fn read_more<S>(
    client: &mut S,
    buf: &mut Vec<u8>,
    chunk: usize,
    deadline: tokio::time::Instant,
) -> Result<(), Short>
where
    S: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;
    let old = buf.len();
    buf.resize(old + chunk, 0);
    let read = tokio::time::timeout_at(deadline, client.read(&mut buf[old..])).await;
    let n = match read {
        Ok(Ok(n @ 1..)) => n,
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            buf.truncate(old);
            return Err(Short::Io(e));
        }
        Err(_) => {
            buf.truncate(old);
            return Err(Short::Timeout);
        }
    };
    buf.truncate(old + n);
    if n == 0 { Err(Short::Closed) } else { Ok(()) }
}

/// A front a listener may serve (`listeners[].protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tls,
    Connect,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Connect => "connect",
            Protocol::Http => "http",
        }
    }
}

/// The fronts one listener serves; with more than one, the first byte
/// decides (0x16: a TLS record; a letter: an HTTP method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    pub tls: bool,
    pub connect: bool,
    pub http: bool,
}

impl Protocols {
    pub const TLS: Protocols = Protocols { tls: true, connect: false, http: false };

    pub fn has(self, p: Protocol) -> bool {
        match p {
            Protocol::Tls => self.tls,
            Protocol::Connect => self.connect,
            Protocol::Http => self.http,
        }
    }

    /// More than one front: the first byte must choose.
    pub fn detects(self) -> bool {
        u8::from(self.tls) + u8::from(self.connect) + u8::from(self.http) > 1
    }

    /// Which kind of front reads a connection whose first byte is
    /// `first`: [`Protocol::Tls`] for a handshake record, [`Protocol::Http`]
    /// for a method's first letter (its method then chooses between
    /// CONNECT and plain HTTP); `None` when no front of this listener can.
    pub fn for_first_byte(self, first: u8) -> Option<Protocol> {
        if first == 0x16 {
            return self.tls.then_some(Protocol::Tls);
        }
        (first.is_ascii_uppercase() && (self.connect || self.http)).then_some(Protocol::Http)
    }

    /// As written in the config and by `snigress check`.
    pub fn names(self) -> Vec<&'static str> {
        [Protocol::Tls, Protocol::Connect, Protocol::Http]
            .into_iter()
            .filter(|p| self.has(*p))
            .map(Protocol::as_str)
            .collect()
    }
}
