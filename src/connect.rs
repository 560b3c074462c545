//! Dialling the target: each vetted address in order, one attempt each under
//! its own timeout, moving on when one fails, and all of them within one
//! total budget so the client hears back in bounded time whatever the
//! number of addresses.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Most addresses tried for one connection: a DNS answer with dozens of
/// unreachable addresses must not keep a client waiting for minutes.
pub const MAX_ATTEMPTS: usize = 8;

/// How long a connection may spend dialling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Each address.
    pub per_attempt: Duration,
    /// All of them together.
    pub total: Duration,
}

/// One address that did not connect.
#[derive(Debug)]
pub struct Attempt {
    pub addr: SocketAddr,
    /// `None`: it timed out (its own timeout, or the end of the budget).
    pub error: Option<io::Error>,
}

#[derive(Debug, thiserror::Error)]
pub struct ConnectError {
    /// Every address tried, in order.
    pub attempts: Vec<Attempt>,
    /// The total budget ran out before every address was tried.
    pub budget_spent: bool,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not connect to any address: ")?;
        for (i, a) in self.attempts.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match &a.error {
                Some(e) => write!(f, "{sep}{}: {e}", a.addr)?,
                None => write!(f, "{sep}{}: timed out", a.addr)?,
            }
        }
        if self.budget_spent {
            f.write_str("; timeouts.connect_total spent")?;
        }
        Ok(())
    }
}

impl ConnectError {
    /// Every attempt ended in a timeout (none was refused outright).
    pub fn timed_out(&self) -> bool {
        !self.attempts.is_empty() && self.attempts.iter().all(|a| a.error.is_none())
    }

    /// The last attempt was refused (RST): nothing listens there.
    pub fn refused(&self) -> bool {
        self.attempts
            .last()
            .and_then(|a| a.error.as_ref())
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    pub fn reason(&self) -> &'static str {
        if self.timed_out() { "connect_timeout" } else { "connect_failed" }
    }

    /// The last address tried (what the access record names).
    pub fn last_tried(&self) -> Option<SocketAddr> {
        self.attempts.last().map(|a| a.addr)
    }
}

/// How the upstream sockets are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dial {
    /// `SO_MARK` (so interception rules can let them pass).
    pub mark: Option<u32>,
    /// The source address (a route's `bind`).
    pub bind: Option<IpAddr>,
    /// `IP_FREEBIND` with `bind`.
    pub freebind: bool,
}

/// Connects to the first address that accepts (of the first
/// [`MAX_ATTEMPTS`]), within `budget`, with sockets made as `dial` says.
pub async fn connect(
    addrs: &[SocketAddr],
    budget: Budget,
    dial: Dial,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let deadline = Instant::now() + budget.total;
    let mut attempts = Vec::new();
    for addr in addrs.iter().copied().take(MAX_ATTEMPTS) {
        let until = deadline.min(Instant::now() + budget.per_attempt);
        match tokio::time::timeout_at(until, open(addr, dial)).await {
            Ok(Ok(stream)) => {
                crate::net::tune(&stream);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => attempts.push(Attempt { addr, error: Some(e) }),
            Err(_) => attempts.push(Attempt { addr, error: None }),
        }
        if Instant::now() >= deadline {
            let budget_spent = attempts.len() < addrs.len().min(MAX_ATTEMPTS);
            return Err(ConnectError { attempts, budget_spent });
        }
    }
    Err(ConnectError { attempts, budget_spent: false })
}

async fn open(addr: SocketAddr, dial: Dial) -> io::Result<TcpStream> {
    if dial == Dial::default() {
        return TcpStream::connect(addr).await;
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    if let Some(mark) = dial.mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    if let Some(ip) = dial.bind {
        if ip.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("the route binds {ip}, which cannot reach {addr} (another address family)"),
            ));
        }
        if dial.freebind {
            socket2::SockRef::from(&socket).set_freebind_v4(true)?;
            if ip.is_ipv6() {
                socket2::SockRef::from(&socket).set_freebind_v6(true)?;
            }
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}
