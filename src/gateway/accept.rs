//! The accept loop of one listener and the connection limits.
//!
//! The loop survives everything but shutdown: a failed accept is counted
//! and retried, after a growing pause unless it concerned only the
//! connection that failed (see [`crate::net::accept`]), and one connection's
//! failure never reaches it because each connection runs in its own task.
//! A connection past a limit is closed at once and recorded; the diagnostic
//! line for it is rate-limited (the access record has every one).
//! Every accepted connection is admitted as pending (see [`crate::admission`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::admission::Pending;
use crate::conn::{self, ListenerInfo};
use crate::error::ConnError;
use crate::state::{Process, Snapshot};

/// Least time between two diagnostic lines about refusals at accept.
const WARN_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the slot of a pending connection evicted to make room
/// at the global limit.
const EVICTION_GRACE: Duration = Duration::from_millis(100);

/// Connections open per client address, against
/// `limits.max_connections_per_source`.
pub(crate) struct SourceLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its source's limit, returned on drop.
struct SourceSlot {
    limit: Arc<SourceLimit>,
    ip: IpAddr,
}

impl SourceLimit {
    pub(crate) fn new(max: usize) -> SourceLimit {
        SourceLimit { max, open: Mutex::default() }
    }

    fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot { limit: self.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Lets one diagnostic line through per [`WARN_EVERY`] and counts the rest.
#[derive(Default)]
struct Throttle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(n)` when a line may be written now, `n` being the lines
    /// suppressed since the last one.
    fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            *suppressed += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(suppressed))
    }
}

/// What every accept loop shares.
pub(crate) struct LoopShared {
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) sources: Arc<SourceLimit>,
    pub(crate) pending: Arc<Pending>,
    pub(crate) process: Process,
    pub(crate) tracker: TaskTracker,
}

/// Accepts on `listener` until the task is aborted.
pub(crate) async fn run(info: Arc<ListenerInfo>, listener: TcpListener, shared: LoopShared) {
    let mut backoff = crate::net::Backoff::default();
    let throttle = Throttle::default();
    for id in 0u64.. {
        let (tcp, client_addr) = crate::net::accept(&listener, &mut backoff, |e, pause| {
            shared.process.metrics.accept_error();
            let pause_ms = pause.map_or(0, |p| p.as_millis() as u64);
            if let Some(suppressed) = throttle.admit() {
                let why = if crate::net::is_resource_exhaustion(e) { "out of resources" } else { "error" };
                tracing::error!(listener = %info.name, error = %e, pause_ms, suppressed, "accept failed ({why}); pausing");
            }
        })
        .await;
        let refuse = |e: ConnError| {
            if let Some(suppressed) = throttle.admit() {
                tracing::warn!(listener = %info.name, client = %client_addr, reason = e.reason(), detail = %e,
                    suppressed, "refusing a connection at accept");
            }
            conn::refused_at_accept(client_addr, info.clone(), e, &shared.process);
        };
        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            // At the limit with connections still pending: one of them
            // makes room (its task ends at its next poll).
            Err(_) if shared.pending.evict_for_room() => {
                tokio::time::timeout(EVICTION_GRACE, shared.permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            drop(tcp);
            refuse(ConnError::ConnectionLimit);
            continue;
        };
        // A trusted proxy carries many clients (one ztunnel, every caller
        // of its node): it is not held to one client's share.
        let slot = if info.trusts_proxy(client_addr.ip()) {
            None
        } else {
            let Some(slot) = shared.sources.try_take(client_addr.ip()) else {
                drop(tcp);
                refuse(ConnError::SourceLimit);
                continue;
            };
            Some(slot)
        };
        crate::net::tune_accepted(&tcp);
        let ticket = shared.pending.admit(id, client_addr.ip());
        let (info, snapshot, process) = (info.clone(), shared.snapshot.load_full(), shared.process.clone());
        shared.tracker.spawn(async move {
            conn::handle(tcp, client_addr, info, snapshot, process, ticket, Box::new((slot, permit))).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_line_through_and_counts_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        // A second later the next line says how many were suppressed.
        t.state.lock().unwrap().0 = Some(Instant::now() - WARN_EVERY);
        assert_eq!(t.admit(), Some(2));
    }
}
