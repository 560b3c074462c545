//! The user-space relay: the replayed bytes go upstream first, then bytes
//! are copied both ways until both directions are finished.
//!
//! When one side ends its stream (TCP FIN, or close_notify on the outer TLS
//! layer), the gateway flushes what it holds and shuts down its write side
//! towards the other peer, which may go on sending; a client that
//! half-closes still receives the whole response.
//!
//! Both directions are driven from one task with one buffer each; nothing is
//! spawned per connection beyond the connection's own task.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::{Ended, IdleTimeouts, Side, Transfer};

/// Size of each direction's copy buffer: four full TLS records of payload.
/// Plaintext read from the upstream in one read becomes four full-size
/// records of the outer layer (a buffer of one record plus its framing made
/// a full record and a 512-byte one of every read), and bulk transfers take
/// a quarter of the reads and writes.
/// Allocated when a read is attempted and released when the source has
/// nothing more for now, so idle connections cost no buffer memory.
pub const BUF_SIZE: usize = 4 * 16 * 1024;

/// One direction of the copy.
struct Half {
    buf: Vec<u8>,
    /// `buf[pos..cap]` is read but not yet written.
    pos: usize,
    cap: usize,
    /// The source ended its stream; finish writing, then shut down the sink.
    eof: bool,
    /// Written since the last flush.
    need_flush: bool,
    /// The sink has been shut down: this direction is over.
    done: bool,
    /// Which side this half reads from.
    source: Side,
}

impl Half {
    fn new(source: Side, pending: Vec<u8>) -> Half {
        Half { cap: pending.len(), buf: pending, pos: 0, eof: false, need_flush: false, done: false, source }
    }

    /// Moves bytes until the source or the sink would block. `moved` is set
    /// when anything happened, for the idle timer; `Ready(Ok)` means done.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        transfer: &Transfer,
        moved: &mut bool,
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let (source, sink) = (self.source, self.source.other());
        loop {
            while self.pos < self.cap {
                let n = match ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..self.cap])) {
                    Ok(0) | Err(_) => return Poll::Ready(Err(sink)),
                    Ok(n) => n,
                };
                self.pos += n;
                self.need_flush = true;
                *moved = true;
                if sink == Side::Client {
                    transfer.add_to_client(n);
                }
            }
            if self.eof {
                if ready!(writer.as_mut().poll_shutdown(cx)).is_err() {
                    return Poll::Ready(Err(sink));
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // The buffer exists only while bytes move: an idle connection
            // holds none (see `BUF_SIZE`).
            if self.buf.len() < BUF_SIZE {
                self.buf = vec![0; BUF_SIZE];
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match reader.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.buf = Vec::new();
                    (self.pos, self.cap) = (0, 0);
                    if self.need_flush {
                        if ready!(writer.as_mut().poll_flush(cx)).is_err() {
                            return Poll::Ready(Err(sink));
                        }
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    *moved = true;
                    if n == 0 {
                        self.eof = true;
                    } else {
                        (self.pos, self.cap) = (0, n);
                        if source == Side::Client {
                            transfer.add_from_client(n);
                        }
                    }
                }
                // A TLS peer that closes TCP without close_notify: the inner
                // TLS layer has its own integrity, so this is an ordinary end.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    *moved = true;
                    self.eof = true;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Err(source)),
            }
        }
    }
}

/// Writes `replay` to the upstream, then copies both ways until both
/// directions are finished, one side fails, or nothing moves for the idle
/// timeout that applies.
pub(crate) async fn copy<C, U>(
    client: &mut C,
    upstream: &mut U,
    replay: Vec<u8>,
    idle: IdleTimeouts,
    transfer: &Transfer,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::new(Side::Client, replay);
    let mut down = Half::new(Side::Upstream, Vec::new());
    let mut first_eof: Option<Side> = None;
    let mut last_moved = Instant::now();
    let mut half_closed = false;
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(idle.open));

    poll_fn(|cx| {
        let mut moved = false;
        for half in [&mut up, &mut down] {
            if half.done {
                continue;
            }
            let result = match half.source {
                Side::Client => half.poll(cx, Pin::new(&mut *client), Pin::new(&mut *upstream), transfer, &mut moved),
                Side::Upstream => half.poll(cx, Pin::new(&mut *upstream), Pin::new(&mut *client), transfer, &mut moved),
            };
            if half.eof && first_eof.is_none() {
                first_eof = Some(half.source);
            }
            if let Poll::Ready(Err(side)) = result {
                return Poll::Ready(side.failed());
            }
        }
        if up.done && down.done {
            return Poll::Ready(match first_eof {
                Some(Side::Upstream) => Ended::UpstreamClosed,
                _ => Ended::ClientClosed,
            });
        }
        if moved {
            last_moved = Instant::now();
        }
        if !half_closed && (up.done || down.done) {
            // The limit may have just become shorter: bring the timer forward.
            half_closed = true;
            timer.as_mut().reset(last_moved + idle.limit(true).0);
        }
        // The timer is re-armed lazily: it fires at most once per idle period
        // and is then moved to the real deadline if bytes moved meanwhile.
        loop {
            ready!(timer.as_mut().poll(cx));
            let (limit, ended) = idle.limit(half_closed);
            let deadline = last_moved + limit;
            if deadline <= Instant::now() {
                return Poll::Ready(ended);
            }
            timer.as_mut().reset(deadline);
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// The same timeout open and half-closed.
    fn idle(secs: u64) -> IdleTimeouts {
        IdleTimeouts { open: Duration::from_secs(secs), half_closed: Duration::from_secs(secs) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_neither_reads_nor_closes_is_cut_after_the_half_close_timeout() {
        let (mut client, mut gw_client) = duplex(64);
        // An upstream that never reads (its end is kept, not read) nor closes.
        let (mut gw_upstream, _upstream) = duplex(64);
        let transfer = Transfer::default();
        let timeouts = IdleTimeouts { open: Duration::from_secs(3600), half_closed: Duration::from_secs(60) };
        let started = Instant::now();
        client.shutdown().await.unwrap();
        let ended = copy(&mut gw_client, &mut gw_upstream, b"hi".to_vec(), timeouts, &transfer).await;
        assert_eq!(ended, Ended::HalfCloseTimeout);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(60) && took < Duration::from_secs(61), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_still_moving_after_a_half_close_keep_the_connection() {
        let (mut client, mut gw_client) = duplex(64);
        let (mut gw_upstream, mut upstream) = duplex(64);
        let transfer = Transfer::default();
        let timeouts = IdleTimeouts { open: Duration::from_secs(3600), half_closed: Duration::from_secs(5) };
        let gateway = copy(&mut gw_client, &mut gw_upstream, Vec::new(), timeouts, &transfer);
        let peers = async {
            client.shutdown().await.unwrap();
            // A slow download: a byte every 3 s, for 30 s.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                upstream.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                client.read_exact(&mut b).await.unwrap();
            }
            upstream.shutdown().await.unwrap();
        };
        let (ended, ()) = tokio::join!(gateway, peers);
        assert_eq!(ended, Ended::ClientClosed);
        assert_eq!(transfer.bytes_to_client(), 10);
    }

    #[tokio::test]
    async fn replays_then_copies_both_ways_with_half_close() {
        let (mut client, mut gw_client) = duplex(64);
        let (mut gw_upstream, mut upstream) = duplex(64);
        let transfer = Transfer::default();
        transfer.add_from_client(5);
        let gateway = async { copy(&mut gw_client, &mut gw_upstream, b"hello".to_vec(), idle(30), &transfer).await };
        // Both peers run at once: the pipes hold 64 bytes, so neither may wait
        // for the other to finish first.
        let client_side = async {
            client.write_all(&[1u8; 1000]).await.unwrap();
            client.shutdown().await.unwrap();
            // The client half-closed; the response still reaches it.
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, vec![2u8; 3000]);
        };
        let upstream_side = async {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            assert_eq!(&got[..5], b"hello");
            assert_eq!(got.len(), 1005);
            upstream.write_all(&[2u8; 3000]).await.unwrap();
            upstream.shutdown().await.unwrap();
        };
        let (termination, (), ()) = tokio::join!(gateway, client_side, upstream_side);
        assert_eq!(termination, Ended::ClientClosed);
        assert_eq!(transfer.bytes_from_client(), 1005);
        assert_eq!(transfer.bytes_to_client(), 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_connection() {
        let (_client, mut gw_client) = duplex(64);
        let (mut gw_upstream, _upstream) = duplex(64);
        let transfer = Transfer::default();
        let started = Instant::now();
        let t = copy(&mut gw_client, &mut gw_upstream, Vec::new(), idle(5), &transfer).await;
        assert_eq!(t, Ended::IdleTimeout);
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_the_idle_timer_away() {
        let (mut client, mut gw_client) = duplex(64);
        let (mut gw_upstream, mut upstream) = duplex(64);
        let transfer = Transfer::default();
        let gateway = copy(&mut gw_client, &mut gw_upstream, Vec::new(), idle(5), &transfer);
        let peers = async {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                client.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                upstream.read_exact(&mut b).await.unwrap();
            }
            client.shutdown().await.unwrap();
            upstream.shutdown().await.unwrap();
        };
        let (t, ()) = tokio::join!(gateway, peers);
        assert_eq!(t, Ended::ClientClosed);
        assert_eq!(transfer.bytes_from_client(), 4);
    }

    #[tokio::test]
    async fn upstream_failure_ends_both() {
        let (mut client, mut gw_client) = duplex(64);
        let (mut gw_upstream, upstream) = duplex(64);
        drop(upstream);
        let transfer = Transfer::default();
        let gateway = copy(&mut gw_client, &mut gw_upstream, b"hello".to_vec(), idle(30), &transfer);
        let t = gateway.await;
        assert_eq!(t, Ended::UpstreamError);
        let mut rest = Vec::new();
        drop(gw_client);
        client.read_to_end(&mut rest).await.unwrap();
    }
}
