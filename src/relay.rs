//! Replay and relay: the bytes a front read go upstream first, then bytes
//! move both ways until both directions are finished.
//!
//! Two relays with the same semantics: [`copy`] through user-space buffers
//! (any stream, e.g. the decrypted mTLS stream), and [`splice`] with
//! `splice(2)` through a pipe when both sides are plain TCP sockets.
//! Half-close is propagated, an error on either side ends both, the idle
//! timeout counts from the last byte moved either way (the shorter
//! half-close timeout once one direction has finished, see
//! [`IdleTimeouts`]), and bytes are counted as they move (see [`Transfer`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub mod copy;
pub mod splice;

/// How long a relayed connection may go without a byte moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeouts {
    /// While both directions are open (`timeouts.idle`).
    pub open: Duration,
    /// Once one direction has finished (`timeouts.half_close`): a peer that
    /// neither reads nor closes must not hold the connection for `open`.
    pub half_closed: Duration,
}

impl IdleTimeouts {
    /// The limit that applies, and how a connection that reaches it ends.
    fn limit(&self, half_closed: bool) -> (Duration, Ended) {
        if half_closed && self.half_closed < self.open {
            (self.half_closed, Ended::HalfCloseTimeout)
        } else {
            (self.open, Ended::IdleTimeout)
        }
    }
}

/// Where byte counts go live, once a connection's metric labels are known.
pub(crate) trait Meter: Send + Sync {
    fn add_from_client(&self, n: u64);
    fn add_to_client(&self, n: u64);
}

/// Bytes moved, readable while the connection is open, and forwarded to
/// the connection's [`Meter`] once it is attached.
#[derive(Default)]
pub(crate) struct Transfer {
    from_client: AtomicU64,
    to_client: AtomicU64,
    live: OnceLock<Box<dyn Meter>>,
}

impl Transfer {
    pub fn add_from_client(&self, n: usize) {
        self.from_client.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(live) = self.live.get() {
            live.add_from_client(n as u64);
        }
    }

    pub fn add_to_client(&self, n: usize) {
        self.to_client.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(live) = self.live.get() {
            live.add_to_client(n as u64);
        }
    }

    /// Starts forwarding to `meter`, after adding what moved so far. Once
    /// only: later calls are ignored. Called from the connection's own task,
    /// like the adds, so nothing is counted twice or lost.
    pub fn attach(&self, meter: Box<dyn Meter>) {
        if self.live.get().is_some() {
            return;
        }
        meter.add_from_client(self.bytes_from_client());
        meter.add_to_client(self.bytes_to_client());
        let _ = self.live.set(meter);
    }

    /// Bytes received from the client (everything the front read included).
    pub fn bytes_from_client(&self) -> u64 {
        self.from_client.load(Ordering::Relaxed)
    }

    /// Bytes written to the client.
    pub fn bytes_to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("from_client", &self.bytes_from_client())
            .field("to_client", &self.bytes_to_client())
            .finish_non_exhaustive()
    }
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished; the client ended its stream first.
    ClientClosed,
    /// Both sides finished; the upstream ended its stream first.
    UpstreamClosed,
    /// Reading from or writing to the client failed (reset, broken pipe).
    ClientError,
    /// Reading from or writing to the upstream failed.
    UpstreamError,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// One direction had finished and no byte moved for the half-close
    /// timeout.
    HalfCloseTimeout,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::ClientClosed => "client_closed",
            Ended::UpstreamClosed => "upstream_closed",
            Ended::ClientError => "client_error",
            Ended::UpstreamError => "upstream_error",
            Ended::IdleTimeout => "idle_timeout",
            Ended::HalfCloseTimeout => "half_close_timeout",
        }
    }
}

/// Which peer a direction reads from, or an I/O failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// How the connection ends when I/O with this side fails.
    fn failed(self) -> Ended {
        match self {
            Side::Client => Ended::ClientError,
            Side::Upstream => Ended::UpstreamError,
        }
    }
}
