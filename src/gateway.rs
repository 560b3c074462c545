//! The gateway process: binding, serving, reloading, draining.
//!
//! [`Gateway::bind`] builds the first snapshot and binds every socket;
//! [`Gateway::serve`] runs the accept loops ([`accept`]) and the admin
//! endpoint until shutdown, then drains: readiness off at once, keep
//! accepting for `shutdown.grace_period`, stop accepting, let connections
//! finish for up to `shutdown.drain_timeout`, then end the rest, each with
//! its record. [`reload`] replaces the snapshot live.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Pending;
use crate::config::{Config, OriginalDestination, Shutdown};
use crate::conn::ListenerInfo;
use crate::observe::access_log::Sink;
use crate::observe::admin;
use crate::observe::metrics::Metrics;
use crate::state::{Process, Snapshot, StartError};

mod accept;
pub mod reload;

use reload::Reloader;

/// Longest wait, after the drain deadline, for the connections just cut to
/// hand over their records.
const AFTER_CUT: Duration = Duration::from_secs(5);

/// A bound gateway, ready to serve.
pub struct Gateway {
    listeners: Vec<(Arc<ListenerInfo>, TcpListener)>,
    /// What new connections use; swapped as a whole on reload.
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// The config `snapshot` was built from (the reloader's starting point).
    config: Config,
    process: Process,
    /// Global connection limit: a permit per live connection.
    permits: Arc<Semaphore>,
    /// Per-client-address limit.
    sources: Arc<accept::SourceLimit>,
    /// Connections whose destination is not known yet.
    pending: Arc<Pending>,
    /// The metrics endpoint, when configured.
    admin: Option<TcpListener>,
    /// What /readyz reports.
    ready: Arc<AtomicBool>,
}

impl Gateway {
    /// Builds the snapshot and binds every listener; nothing is accepted yet.
    pub async fn bind(config: &Config, sink: Arc<dyn Sink>) -> Result<Gateway, StartError> {
        let snapshot = Snapshot::build(config, None)?;
        let mut sockets = Vec::new();
        for l in &config.listeners {
            let transparent = l.original_destination == Some(OriginalDestination::Tproxy);
            let socket = crate::net::listen(l.address, transparent).map_err(|error| StartError::Bind {
                name: l.name.clone(),
                addr: l.address,
                error,
            })?;
            if let Some(mark) = l.upstream_mark {
                // Refused at start, not at each connection.
                crate::net::check_mark(mark).map_err(|error| StartError::Mark { name: l.name.clone(), mark, error })?;
            }
            sockets.push(socket);
        }
        let admin = match config.metrics.address {
            None => None,
            Some(addr) => {
                Some(crate::net::listen(addr, false).map_err(|error| StartError::BindMetrics { addr, error })?)
            }
        };
        // Kept only where a loop through interception rules is possible.
        let upstream_ends = config
            .listeners
            .iter()
            .any(|l| l.original_destination.is_some())
            .then(|| Arc::new(crate::net::LocalEnds::default()));
        // What no intercepted connection may have meant: the gateway itself.
        let own: Arc<[SocketAddr]> =
            sockets.iter().chain(admin.as_ref()).filter_map(|s| s.local_addr().ok()).collect::<Vec<_>>().into();
        let listeners = config
            .listeners
            .iter()
            .zip(sockets)
            .map(|(l, socket)| (Arc::new(ListenerInfo::new(l, own.clone(), upstream_ends.clone())), socket))
            .collect();
        let metrics = Arc::new(Metrics::with_istio(config.metrics.caps, config.metrics.istio_compatible));
        let pending = Arc::new(Pending::new(config.limits.max_pending_connections, metrics.clone()));
        if let Some(not_after) = snapshot.certificate_expiry() {
            metrics.certificate_expiry(not_after);
        }
        metrics.policy_entries(crate::policy::Policy::allow_labels(&config.policy));
        // A semaphore holds at most usize::MAX >> 3 permits; far above any fd limit.
        let max_connections = config.limits.max_connections.min(usize::MAX >> 3);
        Ok(Gateway {
            listeners,
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            config: config.clone(),
            process: Process { metrics, sink, cut: CancellationToken::new(), identities: Default::default() },
            permits: Arc::new(Semaphore::new(max_connections)),
            sources: Arc::new(accept::SourceLimit::new(config.limits.max_connections_per_source)),
            pending,
            admin,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The bound address of each listener, by name (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.iter().filter_map(|(info, l)| l.local_addr().ok().map(|a| (info.name.to_string(), a))).collect()
    }

    /// The bound metrics address, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Reloads `path` into this gateway on demand (SIGHUP) or on file
    /// change; `text` is what the running config was parsed from, so an edit
    /// made since is seen as a change.
    pub fn reloader(&self, path: PathBuf, text: &str) -> Arc<Reloader> {
        Arc::new(Reloader::new(path, self.config.clone(), text, self.snapshot.clone(), self.process.metrics.clone()))
    }

    /// Accepts on every listener until `shutdown` completes, then drains
    /// (see the module doc). Returns when every connection has ended and
    /// its record has been handed to the sink.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let admin_task = self.admin.map(|admin| {
            let address = admin.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%address, "serving /metrics, /healthz and /readyz");
            let status = admin::Status {
                metrics: self.process.metrics.clone(),
                ready: self.ready.clone(),
                sink: self.process.sink.clone(),
            };
            tokio::spawn(admin::serve(admin, status))
        });
        let tracker = TaskTracker::new();
        let mut loops = tokio::task::JoinSet::new();
        for (info, listener) in self.listeners {
            let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(listener = %info.name, mode = info.config.mode.as_str(), %address, "listening");
            let shared = accept::LoopShared {
                snapshot: self.snapshot.clone(),
                permits: self.permits.clone(),
                sources: self.sources.clone(),
                pending: self.pending.clone(),
                process: self.process.clone(),
                tracker: tracker.clone(),
            };
            loops.spawn(accept::run(info, listener, shared));
        }
        // Every listener is bound and the config is loaded.
        self.ready.store(true, Ordering::Relaxed);
        shutdown.await;

        self.ready.store(false, Ordering::Relaxed);
        self.process.metrics.draining(true);
        let Shutdown { grace_period, drain_timeout } = self.config.shutdown;
        tracing::info!(
            grace_ms = grace_period.as_millis() as u64,
            drain_ms = drain_timeout.as_millis() as u64,
            "shutting down: not ready; accepting during the grace period, then draining"
        );
        tokio::time::sleep(grace_period).await;
        loops.shutdown().await;
        tracker.close();
        tracing::info!(open = tracker.len(), "stopped accepting; waiting for connections in flight");
        if tokio::time::timeout(drain_timeout, tracker.wait()).await.is_err() {
            tracing::warn!(open = tracker.len(), "drain timeout: ending the connections still open");
            // Each ends at its next poll and hands its record over.
            self.process.cut.cancel();
            let _ = tokio::time::timeout(AFTER_CUT, tracker.wait()).await;
        }
        if let Some(task) = admin_task {
            task.abort();
        }
    }
}
