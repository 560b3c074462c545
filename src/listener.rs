//! Listeners: binding, the accept loop, and the global connection limit.
//!
//! The accept loop survives everything but shutdown: a failed accept is
//! logged and retried, with a growing pause when the process is out of file
//! descriptors (retrying at once would spin), and one connection's failure
//! never reaches it because each connection runs in its own task.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::access_log::Sink;
use crate::admin;
use crate::config::{Config, ConfigError, Mode};
use crate::conn::{self, ListenerInfo, State};
use crate::metrics::Metrics;
use crate::mtls::Outer;
use crate::policy::Policy;
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
        })
    }
}

/// A bound gateway, ready to serve.
pub struct Gateway {
    listeners: Vec<(ListenerInfo, TcpListener)>,
    /// What new connections use; swapped as a whole on reload.
    state: Arc<ArcSwap<State>>,
    /// Global connection limit: a permit per live connection, released when
    /// the connection's task ends.
    permits: Arc<Semaphore>,
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
        Ok(Gateway {
            listeners,
            state: Arc::new(ArcSwap::from_pointee(state)),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
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

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Accepts on every listener until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut loops = tokio::task::JoinSet::new();
        if let Some(admin) = self.admin {
            let address = admin.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%address, "serving /metrics, /healthz and /readyz");
            let status = admin::Status { metrics: self.metrics.clone(), ready: self.ready.clone() };
            loops.spawn(admin::serve(admin, status));
        }
        for (info, listener) in self.listeners {
            let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(listener = %info.name, mode = info.mode.as_str(), %address, "listening");
            let shared = Shared {
                state: self.state.clone(),
                permits: self.permits.clone(),
                sink: self.sink.clone(),
                metrics: self.metrics.clone(),
            };
            loops.spawn(accept_loop(info, listener, shared));
        }
        // Every listener is bound and the config is loaded.
        self.ready.store(true, Ordering::Relaxed);
        shutdown.await;
        self.ready.store(false, Ordering::Relaxed);
        loops.shutdown().await;
    }
}

/// What every accept loop shares.
struct Shared {
    state: Arc<ArcSwap<State>>,
    permits: Arc<Semaphore>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
            Err(e) => {
                tracing::debug!(listener = %info.name, error = %e, "accept failed");
                continue;
            }
        };
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            tracing::warn!(listener = %info.name, client = %client_addr, "connection limit reached; refusing");
            drop(tcp);
            let detail = "limits.max_connections reached";
            let record = conn::refused_at_accept(client_addr, &info, "connection_limit", detail, &shared.metrics);
            shared.sink.emit(record);
            continue;
        };
        crate::connect::tune(&tcp);
        let (info, state, sink, metrics) =
            (info.clone(), shared.state.load_full(), shared.sink.clone(), shared.metrics.clone());
        tokio::spawn(async move {
            let record = conn::handle(tcp, client_addr, &info, state, &metrics).await;
            sink.emit(record);
            drop(permit);
        });
    }
}

/// Errors that mean "no descriptors or memory right now": retrying at once
/// would spin on the same error.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
