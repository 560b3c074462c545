//! The zero-copy relay for passthrough connections: when both sides are
//! plain TCP sockets, bytes move socket → pipe → socket inside the kernel
//! (`splice(2)`), never through user space.
//!
//! # Pipes and the per-user quota
//!
//! Linux charges pipe capacity to the user (`/proc/sys/fs/pipe-user-pages-soft`,
//! 16 384 pages = 64 MiB by default). Past it, every new pipe of an
//! unprivileged user gets one or two pages and `F_SETPIPE_SZ` fails: a relay
//! that sized its pipes at 1 MiB would exhaust the quota at 64 busy
//! directions and then move 4-8 KiB per pair of syscalls. So the pipes in
//! existence are accounted against a budget of three quarters of the quota
//! (the rest is left to other processes of the same user). A new pipe is
//! [`PIPE_SIZE_LARGEST`] while the pipes stay under half the budget (bulk
//! data in the fewest calls), [`PIPE_SIZE_LARGE`] under three quarters of
//! it, the kernel default ([`PIPE_SIZE_DEFAULT`]) up to the budget, and past
//! that a burst moves through user space: with the default quota 24 + 48 +
//! 192 pipes, 264 directions blocked with bytes in flight at once (a
//! direction whose sink keeps up gives its pipe back at once). A process the
//! kernel exempts from the quota (CAP_SYS_RESOURCE or CAP_SYS_ADMIN) budgets
//! against four times it, as memory (at most 192 MiB of pipes).
//!
//! A direction holds a pipe only while its source has bytes (one burst), so
//! an idle connection holds no pipe and no extra descriptors; empty pipes go
//! back to a small per-thread pool, so the per-chunk path takes no lock.
//!
//! Semantics are those of [`super::copy`]: half-close is propagated, an
//! error on either side ends both, the idle timeout counts from the last
//! byte moved either way, bytes are counted as they move.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice as splice2};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Ended, IdleTimeouts, Side, Transfer};

/// Pipe capacity while pipes are few: the largest an unprivileged process
/// may ask for (`/proc/sys/fs/pipe-max-size`), so a bulk transfer takes the
/// fewest splice calls (measured: 0.30 against 0.40 CPU s/GiB with 256 KiB
/// pipes, on one stream).
pub const PIPE_SIZE_LARGEST: usize = 1024 * 1024;
/// Pipe capacity when more directions need pipes: four times the default
/// cuts the splice calls per byte by four.
pub const PIPE_SIZE_LARGE: usize = 256 * 1024;
/// The kernel's default pipe capacity (16 pages of 4 KiB).
pub const PIPE_SIZE_DEFAULT: usize = 64 * 1024;
/// Slots of a pipe made without `F_SETPIPE_SZ` (`PIPE_DEF_BUFFERS`).
const DEFAULT_SLOTS: u64 = 16;
/// Empty pipes kept for reuse on each worker thread.
const POOL_PER_THREAD: usize = 16;
/// Bytes moved through user space per read when no pipe is available.
const FALLBACK_CHUNK: usize = 16 * 1024;

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// What the relay's pipes cost and how often they fell short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PipeStats {
    /// Pipes open now (in use or pooled).
    pub open: u64,
    /// Their capacity in bytes: what the per-user quota is charged.
    pub bytes: u64,
    /// `F_SETPIPE_SZ` refused, or a new pipe smaller than the kernel default
    /// (the per-user quota was reached, by this process or another).
    pub resize_failures: u64,
    /// Bursts moved through user space: no pipe could be had within the
    /// budget, or no descriptors for one.
    pub fallbacks: u64,
}

/// Process-wide accounting: the quota is per user, so it is shared by every
/// connection whatever thread it runs on.
static OPEN: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static RESIZE_FAILURES: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// The relay's pipe figures, for the metrics endpoint.
pub fn stats() -> PipeStats {
    PipeStats {
        open: OPEN.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
        resize_failures: RESIZE_FAILURES.load(Ordering::Relaxed),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
    }
}

/// A process with CAP_SYS_RESOURCE or CAP_SYS_ADMIN is not held to the
/// quota (the kernel's `pipe_is_unprivileged_user`); its pipes are still
/// memory, so it budgets against this many times the quota instead.
const PRIVILEGED_FACTOR: u64 = 4;

/// The per-user soft quota in bytes (times [`PRIVILEGED_FACTOR`] for a
/// process the kernel does not hold to it); `None` when the kernel sets none.
fn quota() -> Option<u64> {
    static QUOTA: OnceLock<Option<u64>> = OnceLock::new();
    *QUOTA.get_or_init(|| {
        let pages: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft").ok()?.trim().parse().ok()?;
        let factor = if exempt_from_quota() { PRIVILEGED_FACTOR } else { 1 };
        (pages > 0).then(|| pages * page_size() * factor)
    })
}

/// Whether this process's effective capabilities include CAP_SYS_RESOURCE
/// (24) or CAP_SYS_ADMIN (21), from /proc (root in a container usually has
/// neither).
fn exempt_from_quota() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps =
        status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    caps.is_some_and(|caps| caps & (1 << 24 | 1 << 21) != 0)
}

/// The page size, from the capacity of a fresh pipe (always 16 pages).
fn page_size() -> u64 {
    let fresh = nix::unistd::pipe2(OFlag::O_CLOEXEC).ok().and_then(|(_, w)| fcntl(&w, FcntlArg::F_GETPIPE_SZ).ok());
    fresh.and_then(|size| u64::try_from(size).ok()).map_or(4096, |size| (size / DEFAULT_SLOTS).max(4096))
}

/// A pipe: the kernel buffer between the two sockets.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Capacity in bytes, as the kernel reports it.
    capacity: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe: the largest in this thread's pool, or a new one sized
    /// to what the budget allows; `None` past the budget or without
    /// descriptors.
    fn take() -> Option<Pipe> {
        let pooled = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let largest = (0..pool.len()).max_by_key(|&i| pool[i].capacity)?;
            Some(pool.swap_remove(largest))
        });
        if pooled.is_some() {
            return pooled;
        }
        let want = size_allowed(BYTES.load(Ordering::Relaxed))?;
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
        if want > PIPE_SIZE_DEFAULT && fcntl(&write, FcntlArg::F_SETPIPE_SZ(want as i32)).is_err() {
            RESIZE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ).ok().and_then(|c| usize::try_from(c).ok())?;
        if capacity < PIPE_SIZE_DEFAULT {
            RESIZE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        OPEN.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(capacity as u64, Ordering::Relaxed);
        Some(Pipe { read, write, capacity })
    }

    /// Back to this thread's pool; only ever called when the pipe is empty.
    /// A pipe smaller than what the budget would grant now is closed
    /// instead, so that the pressure that shrank it does not outlive it.
    fn give(self) {
        let others = BYTES.load(Ordering::Relaxed).saturating_sub(self.capacity as u64);
        if size_allowed(others).is_some_and(|size| size > self.capacity) {
            return;
        }
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_PER_THREAD {
                pool.push(self);
            }
        });
    }
}

/// The capacity a new pipe gets when the pipes in existence hold `in_use`
/// bytes (see the module doc); `None`: past the budget.
fn size_allowed(in_use: u64) -> Option<usize> {
    let fits = |size: usize, share: u64| in_use + size as u64 <= share;
    match quota() {
        None => Some(PIPE_SIZE_LARGEST),
        Some(quota) if fits(PIPE_SIZE_LARGEST, quota / 8 * 3) => Some(PIPE_SIZE_LARGEST),
        Some(quota) if fits(PIPE_SIZE_LARGE, quota / 16 * 9) => Some(PIPE_SIZE_LARGE),
        Some(quota) if fits(PIPE_SIZE_DEFAULT, quota / 4 * 3) => Some(PIPE_SIZE_DEFAULT),
        Some(_) => None,
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        BYTES.fetch_sub(self.capacity as u64, Ordering::Relaxed);
    }
}

/// Shared between the two directions of one connection.
struct Activity<'a> {
    transfer: &'a Transfer,
    started: Instant,
    /// Milliseconds after `started` of the last byte moved.
    last_ms: AtomicU64,
    /// Which side ended its stream first: 0 none, 1 client, 2 upstream.
    first_eof: AtomicU8,
    /// Signalled when a side ends its stream: the idle limit may shorten.
    eof: tokio::sync::Notify,
}

impl Activity<'_> {
    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// `n` bytes read from `source`; counted when it is the client.
    fn read_from(&self, source: Side, n: usize) {
        self.moved();
        if source == Side::Client {
            self.transfer.add_from_client(n);
        }
    }

    /// `n` bytes written to `sink`; counted when it is the client.
    fn wrote_to(&self, sink: Side, n: usize) {
        self.moved();
        if sink == Side::Client {
            self.transfer.add_to_client(n);
        }
    }
}

/// Writes `replay` to the upstream, then moves bytes both ways with
/// `splice(2)` until both directions are finished, one side fails, or
/// nothing moves for the idle timeout that applies.
pub(crate) async fn splice(
    client: &TcpStream,
    upstream: &TcpStream,
    replay: Vec<u8>,
    idle: IdleTimeouts,
    transfer: &Transfer,
) -> Ended {
    // An upstream that never opens its window must not hold this forever.
    match tokio::time::timeout(idle.open, write_all(upstream, &replay)).await {
        Err(_) => return Ended::IdleTimeout,
        Ok(Err(_)) => return Ended::UpstreamError,
        Ok(Ok(())) => {}
    }
    drop(replay);
    let progress = Activity {
        transfer,
        started: Instant::now(),
        last_ms: AtomicU64::new(0),
        first_eof: AtomicU8::new(0),
        eof: tokio::sync::Notify::new(),
    };
    let both = async {
        tokio::try_join!(
            pump(client, upstream, Side::Client, &progress),
            pump(upstream, client, Side::Upstream, &progress)
        )
    };
    let idle_watch = async {
        loop {
            let half_closed = progress.first_eof.load(Ordering::Relaxed) != 0;
            let (limit, ended) = idle.limit(half_closed);
            let last = progress.started + Duration::from_millis(progress.last_ms.load(Ordering::Relaxed));
            if last + limit <= Instant::now() {
                return ended;
            }
            if half_closed {
                tokio::time::sleep_until(last + limit).await;
            } else {
                // A side ending its stream brings the deadline forward.
                tokio::select! {
                    () = tokio::time::sleep_until(last + limit) => {}
                    () = progress.eof.notified() => {}
                }
            }
        }
    };
    tokio::select! {
        result = both => match result {
            Ok(_) if progress.first_eof.load(Ordering::Relaxed) == 2 => Ended::UpstreamClosed,
            Ok(_) => Ended::ClientClosed,
            Err(side) => side.failed(),
        },
        ended = idle_watch => ended,
    }
}

/// How a burst ended.
enum Burst {
    /// The source has nothing more for now; the pipe is empty.
    Drained,
    /// The source ended its stream; the pipe is empty.
    Eof,
}

/// One direction, `from` → `to`, until `from` ends its stream.
async fn pump(from: &TcpStream, to: &TcpStream, source: Side, progress: &Activity<'_>) -> Result<(), Side> {
    loop {
        from.readable().await.map_err(|_| source)?;
        let burst = match Pipe::take() {
            Some(pipe) => {
                // On an error the pipe may hold bytes: it is closed, not reused.
                // Boxed: an idle direction then holds only its readiness wait.
                let burst = Box::pin(burst(from, to, &pipe, source, progress)).await?;
                pipe.give();
                burst
            }
            None => {
                FALLBACKS.fetch_add(1, Ordering::Relaxed);
                copy_chunk(from, to, source, progress).await?
            }
        };
        if let Burst::Eof = burst {
            let code = if source == Side::Client { 1 } else { 2 };
            let _ = progress.first_eof.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
            progress.moved();
            progress.eof.notify_one();
            return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write).map_err(|_| source.other());
        }
    }
}

/// Moves bytes through `pipe` while `from` has them.
async fn burst(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    source: Side,
    progress: &Activity<'_>,
) -> Result<Burst, Side> {
    let sink = source.other();
    loop {
        let read = from.try_io(Interest::READABLE, || {
            splice2(from.as_fd(), None, pipe.write.as_fd(), None, pipe.capacity, FLAGS).map_err(io::Error::from)
        });
        let n = match read {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(_) => return Err(source),
        };
        progress.read_from(source, n);
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(|_| sink)?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice2(pipe.read.as_fd(), None, to.as_fd(), None, left, FLAGS).map_err(io::Error::from)
            });
            match written {
                // Bytes are in the pipe: a ready socket that takes none is broken.
                Ok(0) => return Err(sink),
                Ok(m) => {
                    left -= m;
                    progress.wrote_to(sink, m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(sink),
            }
        }
    }
}

/// Moves one chunk through a buffer, for when no pipe can be had.
async fn copy_chunk(from: &TcpStream, to: &TcpStream, source: Side, progress: &Activity<'_>) -> Result<Burst, Side> {
    let mut buf = vec![0u8; FALLBACK_CHUNK];
    let n = match from.try_read(&mut buf) {
        Ok(0) => return Ok(Burst::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
        Err(_) => return Err(source),
    };
    progress.read_from(source, n);
    write_all(to, &buf[..n]).await.map_err(|_| source.other())?;
    progress.wrote_to(source.other(), n);
    Ok(Burst::Drained)
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The relay's pipe budget seen from outside, for the integration tests
/// (`test-util` feature): not part of the release library.
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing {
    /// Takes `n` pipes at once, as `n` busy directions would, and returns
    /// each one's capacity (0: none could be had within the budget).
    pub fn take_at_once(n: usize) -> Vec<usize> {
        let pipes: Vec<Option<super::Pipe>> = (0..n).map(|_| super::Pipe::take()).collect();
        pipes.iter().map(|p| p.as_ref().map_or(0, |p| p.capacity)).collect()
    }

    /// The per-user quota as this process reads it, in bytes.
    pub fn quota() -> Option<u64> {
        super::quota()
    }
}
