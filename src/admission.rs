//! Admission control: a connection is *pending* until its destination is
//! known (outer handshake and ClientHello read, policy decided). At most
//! `limits.max_pending_connections` are pending at once; past that, a new
//! connection evicts a pending one instead of being refused: the oldest of
//! the client address that holds the most pending connections. So sockets
//! that connect and say nothing can never take the slots of working
//! connections, and a flood from a few addresses evicts its own sockets,
//! not a well-behaved client's handshake (`timeouts.first_byte` lets the
//! silent ones go even without pressure).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::observe::metrics::Metrics;

/// The connections whose destination is not known yet, oldest first.
pub(crate) struct Pending {
    max: usize,
    queue: Mutex<Queue>,
    /// Where the count is shown (`snigress_pending_connections`).
    metrics: Arc<Metrics>,
}

impl Pending {
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Pending {
        Pending { max, queue: Mutex::default(), metrics }
    }

    fn counted(&self, n: usize) {
        self.metrics.pending_connections(n);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits connection `id` from `source` as pending, evicting one when
    /// full (see the module doc).
    pub(crate) fn admit(self: &Arc<Self>, id: u64, source: IpAddr) -> PendingTicket {
        let evicted = CancellationToken::new();
        let mut queue = self.lock();
        if queue.entries.len() >= self.max {
            queue.evict_one();
        }
        queue.entries.push_back(Entry { id, source, evicted: evicted.clone() });
        *queue.per_source.entry(source).or_default() += 1;
        self.counted(queue.entries.len());
        PendingTicket { pending: self.clone(), id, evicted }
    }

    /// Evicts one pending connection (the busiest address's oldest) to free
    /// its slot for a new one; `false` when none is pending.
    pub(crate) fn evict_for_room(&self) -> bool {
        let mut queue = self.lock();
        let before = queue.entries.len();
        queue.evict_one();
        self.counted(queue.entries.len());
        queue.entries.len() < before
    }

    fn remove(&self, id: u64) {
        let mut queue = self.lock();
        if let Some(i) = queue.entries.iter().position(|e| e.id == id) {
            queue.take(i);
            self.counted(queue.entries.len());
        }
    }
}

/// Pending connections in arrival order, and how many each address holds.
#[derive(Default)]
struct Queue {
    entries: VecDeque<Entry>,
    per_source: HashMap<IpAddr, usize>,
}

struct Entry {
    id: u64,
    source: IpAddr,
    evicted: CancellationToken,
}

impl Queue {
    /// Removes the entry at `i`; returns it.
    fn take(&mut self, i: usize) -> Option<Entry> {
        let entry = self.entries.remove(i)?;
        if let Some(n) = self.per_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.source);
            }
        }
        Some(entry)
    }

    /// Evicts the oldest pending connection of the address with the most.
    fn evict_one(&mut self) {
        let Some(busiest) = self.per_source.iter().max_by_key(|(_, n)| **n).map(|(ip, _)| *ip) else { return };
        if let Some(i) = self.entries.iter().position(|e| e.source == busiest)
            && let Some(entry) = self.take(i)
        {
            entry.evicted.cancel();
        }
    }
}

/// A connection's place among the pending ones: given up when its
/// destination is known, or when it ends.
pub(crate) struct PendingTicket {
    pending: Arc<Pending>,
    id: u64,
    evicted: CancellationToken,
}

impl PendingTicket {
    /// The destination is known: no longer pending, never evicted.
    pub(crate) fn settle(&self) {
        self.pending.remove(self.id);
    }

    /// Resolves if this connection is evicted while pending.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await
    }
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        self.pending.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn past_the_pending_budget_the_oldest_pending_is_evicted() {
        let pending = Arc::new(Pending::new(2, Arc::new(Metrics::new(Default::default()))));
        let ip = |d: u8| IpAddr::from([10, 0, 0, d]);
        let (a, b) = (pending.admit(1, ip(1)), pending.admit(2, ip(1)));
        b.settle();
        let c = pending.admit(3, ip(1));
        assert_eq!(pending.lock().entries.len(), 2, "a and c; b is settled");
        let d = pending.admit(4, ip(1));
        // a, the oldest pending, is evicted; b (settled) never is.
        tokio::time::timeout(Duration::from_secs(1), a.evicted()).await.expect("a evicted");
        assert!(tokio::time::timeout(Duration::from_millis(10), b.evicted()).await.is_err());
        assert_eq!(pending.lock().entries.len(), 2, "c and d");
        drop((c, d));
        assert_eq!(pending.lock().entries.len(), 0);
        assert!(pending.lock().per_source.is_empty());
    }

    #[tokio::test]
    async fn the_address_holding_the_most_pending_loses_one_first() {
        let pending = Arc::new(Pending::new(3, Arc::new(Metrics::new(Default::default()))));
        let ip = |d: u8| IpAddr::from([10, 0, 0, d]);
        let good = pending.admit(1, ip(1));
        let flood: Vec<_> = (2..4).map(|id| pending.admit(id, ip(9))).collect();
        // Full: the next arrival evicts the flooder's oldest, not the older good one.
        let _more = pending.admit(4, ip(9));
        tokio::time::timeout(Duration::from_secs(1), flood[0].evicted()).await.expect("the flood's oldest");
        assert!(tokio::time::timeout(Duration::from_millis(10), good.evicted()).await.is_err());
    }
}
