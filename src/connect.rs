//! Dialling the target: each vetted address in order, one attempt each under
//! its own timeout, moving on when one fails.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP keepalive on upstream sockets: long-lived egress connections often
/// cross NATs and firewalls that forget idle flows after a few minutes.
const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
#[error("could not connect to any address: {}", .attempts.join(", "))]
pub struct ConnectError {
    /// One line per address tried, for the diagnostic log.
    pub attempts: Vec<String>,
    /// Every attempt ended in its timeout.
    pub all_timed_out: bool,
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        if self.all_timed_out { "connect_timeout" } else { "connect_failed" }
    }
}

/// Most addresses tried for one connection: a DNS answer with dozens of
/// unreachable addresses must not keep a client waiting for minutes.
pub const MAX_ATTEMPTS: usize = 8;

/// Connects to the first address that accepts (of the first `MAX_ATTEMPTS`).
pub async fn connect(addrs: &[IpAddr], port: u16, timeout: Duration) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let mut attempts = Vec::new();
    let mut all_timed_out = !addrs.is_empty();
    for ip in addrs.iter().take(MAX_ATTEMPTS) {
        let addr = SocketAddr::new(*ip, port);
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                tune(&stream);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => {
                all_timed_out = false;
                attempts.push(format!("{addr}: {e}"));
            }
            Err(_) => attempts.push(format!("{addr}: timed out after {timeout:?}")),
        }
    }
    Err(ConnectError { attempts, all_timed_out })
}

/// TCP_NODELAY (the gateway relays whole TLS records; Nagle would only add
/// latency) and keepalive. Failures are harmless and ignored.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_TIME).with_interval(KEEPALIVE_INTERVAL);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
