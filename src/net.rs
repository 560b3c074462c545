//! Socket helpers every part of the gateway shares: TCP tuning, and an
//! accept that survives its errors without spinning.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

/// TCP keepalive: long-lived egress connections often cross NATs and
/// firewalls that forget idle flows after a few minutes.
const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// First pause after a failed accept; doubled up to [`BACKOFF_MAX`] while
/// accepts keep failing.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// TCP_NODELAY (the gateway relays whole TLS records; Nagle would only add
/// latency) and keepalive. Failures are harmless and ignored.
pub fn tune(stream: &TcpStream) {
    tune_socket(SockRef::from(stream));
}

fn tune_socket(socket: SockRef<'_>) {
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_TIME).with_interval(KEEPALIVE_INTERVAL);
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// [`tune`] for a socket from [`listen`]'s listener. Linux copies a
/// listener's TCP_NODELAY and keepalive settings to the sockets it accepts,
/// which then need no call of their own (four system calls fewer per
/// connection); the first accepted socket is checked once, and if the
/// kernel did not copy them every socket is tuned by itself.
pub fn tune_accepted(stream: &TcpStream) {
    static INHERITED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let inherited = *INHERITED.get_or_init(|| {
        let socket = SockRef::from(stream);
        socket.tcp_nodelay().unwrap_or(false)
            && socket.keepalive().unwrap_or(false)
            && socket.tcp_keepalive_time().is_ok_and(|t| t == KEEPALIVE_TIME)
    });
    if !inherited {
        tune(stream);
    }
}

/// The local addresses of the gateway's own upstream connections while they
/// are open. A connection arriving *from* one of them came back around:
/// interception rules that capture the gateway's own traffic would
/// otherwise loop it through the gateway until descriptors run out.
#[derive(Debug, Default)]
pub struct LocalEnds(std::sync::Mutex<std::collections::HashSet<SocketAddr>>);

/// One upstream connection's place in [`LocalEnds`], removed on drop.
#[derive(Debug)]
pub struct LocalEnd {
    ends: std::sync::Arc<LocalEnds>,
    addr: SocketAddr,
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl LocalEnds {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<SocketAddr>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds `addr` (an upstream socket's local address) until the guard drops.
    pub fn hold(self: &std::sync::Arc<Self>, addr: SocketAddr) -> LocalEnd {
        let addr = canonical(addr);
        self.set().insert(addr);
        LocalEnd { ends: self.clone(), addr }
    }

    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.set().contains(&canonical(addr))
    }
}

impl Drop for LocalEnd {
    fn drop(&mut self) {
        self.ends.set().remove(&self.addr);
    }
}

/// A listening socket on `addr`; `transparent` makes it `IP_TRANSPARENT`
/// (TPROXY), which needs CAP_NET_ADMIN and says so when refused.
pub fn listen(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if transparent {
        let set = if addr.is_ipv4() { socket.set_ip_transparent_v4(true) } else { socket.set_ip_transparent_v6(true) };
        set.map_err(|e| {
            io::Error::new(e.kind(), format!("IP_TRANSPARENT (original_destination: tproxy needs CAP_NET_ADMIN): {e}"))
        })?;
    }
    // Copied to every accepted socket (see `tune_accepted`).
    tune_socket(SockRef::from(&socket));
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Whether this process may set `mark` on its sockets (`SO_MARK` needs
/// CAP_NET_ADMIN).
pub fn check_mark(mark: u32) -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_mark(mark)
}

/// Listen backlog: above the default 1024 of tokio and std so that a burst of
/// connections (a flood of idle clients reconnecting as they are evicted)
/// cannot fill the accept queue and make the kernel drop a probe's SYN, which
/// would cost it a 1 s retransmission. The kernel caps it at
/// `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: i32 = 4096;

/// Errors that concern one pending connection only (it was reset or
/// aborted before we took it): the next accept is for another one, so
/// retrying at once cannot spin.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EINTR | libc::EPERM))
}

/// Errors that mean "no descriptors or memory right now".
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// The pause before the next accept, across a run of failures.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// How long to wait after `e`: nothing for a per-connection error, a
    /// growing pause for anything else (descriptors exhausted, or an error
    /// that may well repeat and must not spin the loop).
    pub fn after(&mut self, e: &io::Error) -> Option<Duration> {
        if is_per_connection(e) {
            return None;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(pause)
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Accepts the next connection. A failure is reported to `failed` (with the
/// pause that follows, if any), then retried after that pause; only a
/// success returns.
pub async fn accept(
    listener: &TcpListener,
    backoff: &mut Backoff,
    mut failed: impl FnMut(&io::Error, Option<Duration>),
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                backoff.reset();
                return accepted;
            }
            Err(e) => {
                let pause = backoff.after(&e);
                failed(&e, pause);
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_that_may_repeat_back_off_and_per_connection_ones_do_not() {
        let mut b = Backoff::default();
        let os = io::Error::from_raw_os_error;
        assert_eq!(b.after(&os(libc::ECONNABORTED)), None);
        assert_eq!(b.after(&os(libc::EMFILE)), Some(BACKOFF_MIN));
        assert_eq!(b.after(&os(libc::EMFILE)), Some(BACKOFF_MIN * 2));
        // Not exhaustion, not per connection: backs off as well.
        assert_eq!(b.after(&os(libc::EINVAL)), Some(BACKOFF_MIN * 4));
        for _ in 0..20 {
            b.after(&os(libc::EBADF));
        }
        assert_eq!(b.after(&os(libc::EBADF)), Some(BACKOFF_MAX));
        b.reset();
        assert_eq!(b.after(&io::Error::other("unknown")), Some(BACKOFF_MIN));
    }

    /// What `tune_accepted` counts on: an accepted socket has the
    /// listener's TCP_NODELAY and keepalive settings without a call of its own.
    #[tokio::test]
    async fn accepted_sockets_carry_the_listeners_tuning() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, (accepted, _)) = (client.unwrap(), accepted.unwrap());
        let socket = SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        tune_accepted(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
    }
}
