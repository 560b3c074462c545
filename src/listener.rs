//! Listeners: binding, the accept loop, the connection limits, and the
//! shutdown sequence.
//!
//! The accept loop survives everything but shutdown: a failed accept is
//! logged and retried, with a growing pause when the process is out of file
//! descriptors (retrying at once would spin), and one connection's failure
//! never reaches it because each connection runs in its own task.
//!
//! Shutdown (see [`Gateway::serve`]): readiness off at once, keep accepting
//! for `shutdown.grace_period`, stop accepting, let connections finish for
//! up to `shutdown.drain_timeout`, then end the rest, each with its record.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::access_log::Sink;
use crate::admin;
use crate::config::{Config, ConfigError, Mode, Shutdown};
use crate::conn::{self, Env, ListenerInfo, State};
use crate::metrics::Metrics;
use crate::mtls::Outer;
use crate::policy::Policy;
use crate::reload::Reloader;
use crate::resolve::Resolver;

/// First pause after an accept error caused by resource exhaustion; doubled
/// up to `ACCEPT_BACKOFF_MAX` while the condition lasts.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("{0}")]
    Resolver(String),
    #[error("cannot listen on {addr} (listener {name:?}): {error}")]
    Bind { name: String, addr: SocketAddr, error: io::Error },
    #[error("cannot listen on {addr} (metrics.address): {error}")]
    BindMetrics { addr: SocketAddr, error: io::Error },
}

impl State {
    /// Builds everything new connections need from a validated config:
    /// reads the certificates, compiles the policy, creates the resolver.
    pub fn build(config: &Config) -> Result<State, StartError> {
        let needs_outer = config.listeners.iter().any(|l| l.mode == Mode::Mtls);
        let outer = match config.outer_settings() {
            Some(settings) if needs_outer => {
                Some(Outer::new(&settings).map_err(|e| StartError::Config(config.material_error(&e)))?)
            }
            _ => None,
        };
        Ok(State {
            policy: Policy::compile(&config.policy),
            resolver: Resolver::new(&config.resolver).map_err(StartError::Resolver)?,
            outer,
            timeouts: config.timeouts,
            limits: config.limits,
            refuse_ech: config.refuse_ech,
        })
    }
}

/// Connections open per client address, against
/// `limits.max_connections_per_source`.
struct SourceLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its source's limit, returned on drop.
struct SourceSlot {
    limit: Arc<SourceLimit>,
    ip: IpAddr,
}

impl SourceLimit {
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

/// A bound gateway, ready to serve.
pub struct Gateway {
    listeners: Vec<(ListenerInfo, TcpListener)>,
    /// What new connections use; swapped as a whole on reload.
    state: Arc<ArcSwap<State>>,
    /// The config `state` was built from.
    config: Config,
    /// Global connection limit: a permit per live connection, released when
    /// the connection's task ends.
    permits: Arc<Semaphore>,
    max_connections: u32,
    sources: Arc<SourceLimit>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    /// The metrics endpoint, when configured.
    admin: Option<TcpListener>,
    /// What /readyz reports.
    ready: Arc<AtomicBool>,
}

impl Gateway {
    /// Builds the state and binds every listener; nothing is accepted yet.
    pub async fn bind(config: &Config, sink: Arc<dyn Sink>) -> Result<Gateway, StartError> {
        let state = State::build(config)?;
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let socket = TcpListener::bind(l.address).await.map_err(|error| StartError::Bind {
                name: l.name.clone(),
                addr: l.address,
                error,
            })?;
            let info = ListenerInfo { name: l.name.as_str().into(), mode: l.mode, upstream_port: l.upstream_port };
            listeners.push((info, socket));
        }
        let admin = match config.metrics.address {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|error| StartError::BindMetrics { addr, error })?),
        };
        let metrics = Arc::new(Metrics::new(config.metrics.max_sni_values, config.metrics.max_source_values));
        if let Some(not_after) = state.outer.as_ref().and_then(|o| o.not_after) {
            metrics.certificate_expiry(not_after);
        }
        // A semaphore holds at most u32::MAX >> 3 permits; far above any fd limit.
        let max_connections = u32::try_from(config.limits.max_connections).unwrap_or(u32::MAX).min(u32::MAX >> 3);
        Ok(Gateway {
            listeners,
            state: Arc::new(ArcSwap::from_pointee(state)),
            config: config.clone(),
            permits: Arc::new(Semaphore::new(max_connections as usize)),
            max_connections,
            sources: Arc::new(SourceLimit { max: config.limits.max_connections_per_source, open: Mutex::default() }),
            sink,
            metrics,
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

    /// Reloads `path` into this gateway on demand (SIGHUP) or on file change.
    pub fn reloader(&self, path: PathBuf) -> Arc<Reloader> {
        Arc::new(Reloader::new(path, self.config.clone(), self.state.clone(), self.metrics.clone()))
    }

    /// Accepts on every listener until `shutdown` completes, then drains:
    /// readiness off at once, accepting on for the grace period, then
    /// connections in flight get the drain timeout; what is left is ended
    /// (its record says `drain_timeout`). Returns when every connection has
    /// ended and its record has been handed to the sink.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let admin_task = self.admin.map(|admin| {
            let address = admin.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%address, "serving /metrics, /healthz and /readyz");
            let status = admin::Status { metrics: self.metrics.clone(), ready: self.ready.clone() };
            tokio::spawn(admin::serve(admin, status))
        });
        let (stop, stop_rx) = watch::channel(false);
        let env = Env { metrics: self.metrics.clone(), stop: stop_rx };
        let mut loops = tokio::task::JoinSet::new();
        for (info, listener) in self.listeners {
            let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(listener = %info.name, mode = info.mode.as_str(), %address, "listening");
            let shared = Shared {
                state: self.state.clone(),
                permits: self.permits.clone(),
                sources: self.sources.clone(),
                sink: self.sink.clone(),
                env: env.clone(),
            };
            loops.spawn(accept_loop(info, listener, shared));
        }
        // Every listener is bound and the config is loaded.
        self.ready.store(true, Ordering::Relaxed);
        shutdown.await;

        self.ready.store(false, Ordering::Relaxed);
        self.metrics.draining(true);
        let Shutdown { grace_period, drain_timeout } = self.config.shutdown;
        tracing::info!(
            grace_ms = grace_period.as_millis() as u64,
            drain_ms = drain_timeout.as_millis() as u64,
            "shutting down: not ready; accepting during the grace period, then draining"
        );
        tokio::time::sleep(grace_period).await;
        loops.shutdown().await;
        let open = self.max_connections as usize - self.permits.available_permits();
        tracing::info!(open, "stopped accepting; waiting for connections in flight");
        let all = self.permits.acquire_many(self.max_connections);
        if tokio::time::timeout(drain_timeout, all).await.is_err() {
            let open = self.max_connections as usize - self.permits.available_permits();
            tracing::warn!(open, "drain timeout: ending the connections still open");
            let _ = stop.send(true);
            // Each ends at its next poll and hands its record over.
            let all = self.permits.acquire_many(self.max_connections);
            let _ = tokio::time::timeout(Duration::from_secs(5), all).await;
        }
        if let Some(task) = admin_task {
            task.abort();
        }
    }
}

/// What every accept loop shares.
struct Shared {
    state: Arc<ArcSwap<State>>,
    permits: Arc<Semaphore>,
    sources: Arc<SourceLimit>,
    sink: Arc<dyn Sink>,
    env: Env,
}

async fn accept_loop(info: ListenerInfo, listener: TcpListener, shared: Shared) {
    let info = Arc::new(info);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (tcp, client_addr) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::error!(listener = %info.name, error = %e, pause_ms = backoff.as_millis() as u64,
                    "accept failed: out of resources; pausing");
                shared.env.metrics.accept_error();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
            Err(e) => {
                tracing::debug!(listener = %info.name, error = %e, "accept failed");
                continue;
            }
        };
        let refuse = |reason: &'static str, detail: &str| {
            tracing::warn!(listener = %info.name, client = %client_addr, reason, "{detail}; refusing");
            let record = conn::refused_at_accept(client_addr, &info, reason, detail, &shared.env.metrics);
            shared.sink.emit(record);
        };
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            drop(tcp);
            refuse("connection_limit", "limits.max_connections reached");
            continue;
        };
        let Some(slot) = shared.sources.try_take(client_addr.ip()) else {
            drop(tcp);
            refuse("source_limit", "limits.max_connections_per_source reached for this client address");
            continue;
        };
        crate::connect::tune(&tcp);
        let (info, state, sink, env) =
            (info.clone(), shared.state.load_full(), shared.sink.clone(), shared.env.clone());
        tokio::spawn(async move {
            let record = conn::handle(tcp, client_addr, &info, state, &env).await;
            sink.emit(record);
            drop(slot);
            drop(permit);
        });
    }
}

/// Errors that mean "no descriptors or memory right now": retrying at once
/// would spin on the same error.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
