//! Zero-copy splice for passthrough connections: when both sides are plain
//! TCP sockets, bytes move socket → pipe → socket inside the kernel
//! (`splice(2)`), never through user space.
//!
//! Pipes are taken from a small pool only while a direction has bytes in
//! flight and are returned empty, so an idle connection holds no pipe (and
//! no extra descriptors). If no pipe can be made (descriptors exhausted) the
//! direction falls back to an ordinary buffered copy for that chunk.
//!
//! Semantics are those of [`crate::splice::splice`]: half-close is
//! propagated, an error on either side ends both, the idle timeout counts
//! from the last byte moved either way, bytes are counted as they move.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::splice::{Termination, Transfer};

/// Pipe capacity asked for (the default Linux maximum for unprivileged
/// processes); bigger pipes mean fewer splice calls per byte on bulk
/// transfers. If the kernel refuses, the default 64 KiB is used.
const PIPE_SIZE: usize = 1024 * 1024;
/// Bytes moved per splice call.
const CHUNK: usize = PIPE_SIZE;
/// Empty pipes kept for reuse; more are closed when returned.
const POOL_MAX: usize = 128;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A pipe: the kernel buffer between the two sockets.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn take() -> Option<Pipe> {
        if let Some(pipe) = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop() {
            return Some(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
        let _ = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Some(Pipe { read, write })
    }

    /// Back to the pool; only ever called when the pipe is empty.
    fn give(self) {
        let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Which side a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// Shared between the two directions of one connection.
struct Progress<'a> {
    transfer: &'a Transfer,
    started: Instant,
    /// Milliseconds after `started` of the last byte moved.
    last_ms: AtomicU64,
    /// Which side ended its stream first: 0 none, 1 client, 2 upstream.
    first_eof: AtomicU8,
}

impl Progress<'_> {
    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// Writes `replay` to the upstream, then moves bytes both ways with
/// `splice(2)` until both directions are finished, one side fails, or
/// nothing moves for `idle`.
pub async fn splice_tcp(
    client: &TcpStream,
    upstream: &TcpStream,
    replay: Vec<u8>,
    idle: Duration,
    transfer: &Transfer,
) -> Termination {
    // An upstream that never opens its window must not hold this forever.
    match tokio::time::timeout(idle, write_all(upstream, &replay)).await {
        Err(_) => return Termination::IdleTimeout,
        Ok(Err(_)) => return Termination::UpstreamError,
        Ok(Ok(())) => {}
    }
    drop(replay);
    let progress =
        Progress { transfer, started: Instant::now(), last_ms: AtomicU64::new(0), first_eof: AtomicU8::new(0) };
    let both = async {
        tokio::try_join!(
            pump(client, upstream, Side::Client, &progress),
            pump(upstream, client, Side::Upstream, &progress)
        )
    };
    let idle_watch = async {
        loop {
            let last = progress.started + Duration::from_millis(progress.last_ms.load(Ordering::Relaxed));
            tokio::time::sleep_until(last + idle).await;
            let last = progress.started + Duration::from_millis(progress.last_ms.load(Ordering::Relaxed));
            if last + idle <= Instant::now() {
                return;
            }
        }
    };
    tokio::select! {
        result = both => match result {
            Ok(_) if progress.first_eof.load(Ordering::Relaxed) == 2 => Termination::UpstreamClosed,
            Ok(_) => Termination::ClientClosed,
            Err(Side::Client) => Termination::ClientError,
            Err(Side::Upstream) => Termination::UpstreamError,
        },
        () = idle_watch => Termination::IdleTimeout,
    }
}

/// One direction, `from` → `to`, until `from` ends its stream.
async fn pump(from: &TcpStream, to: &TcpStream, source: Side, progress: &Progress<'_>) -> Result<(), Side> {
    let sink = match source {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    loop {
        from.readable().await.map_err(|_| source)?;
        let Some(pipe) = Pipe::take() else {
            // No descriptors for a pipe: move this chunk through memory.
            match copy_chunk(from, to, source, progress).await? {
                true => continue,
                false => return finish(to, source, sink, progress),
            }
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, FLAGS).map_err(io::Error::from)
        }) {
            Ok(0) => {
                pipe.give();
                return finish(to, source, sink, progress);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give();
                continue;
            }
            Err(_) => return Err(source),
        };
        progress.moved();
        if source == Side::Client {
            progress.transfer.add_from_client(n);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(|_| sink)?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, FLAGS).map_err(io::Error::from)
            }) {
                Ok(m) => {
                    left -= m;
                    progress.moved();
                    if sink == Side::Client {
                        progress.transfer.add_to_client(m);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The pipe may hold bytes: close it rather than reuse it.
                Err(_) => return Err(sink),
            }
        }
        pipe.give();
    }
}

/// `from` ended its stream: shut down the write side towards the other peer.
fn finish(to: &TcpStream, source: Side, sink: Side, progress: &Progress<'_>) -> Result<(), Side> {
    let code = if source == Side::Client { 1 } else { 2 };
    let _ = progress.first_eof.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    progress.moved();
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write).map_err(|_| sink)
}

/// Moves one chunk through a buffer; `false` when `from` has ended.
async fn copy_chunk(from: &TcpStream, to: &TcpStream, source: Side, progress: &Progress<'_>) -> Result<bool, Side> {
    let mut buf = vec![0u8; 16 * 1024];
    let n = match from.try_read(&mut buf) {
        Ok(0) => return Ok(false),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
        Err(_) => return Err(source),
    };
    progress.moved();
    if source == Side::Client {
        progress.transfer.add_from_client(n);
    }
    write_all(to, &buf[..n]).await.map_err(|_| if source == Side::Client { Side::Upstream } else { Side::Client })?;
    if source == Side::Upstream {
        progress.transfer.add_to_client(n);
    }
    Ok(true)
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
