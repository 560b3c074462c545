//! What a connection runs on: a [`Snapshot`] built from one config and
//! replaced as a whole on reload, and the [`Process`] services that outlive
//! every reload.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::arrive::mtls::{MaterialError, MeshTls};
use crate::config::{Config, Limits, Timeouts};
use crate::observe::access_log::Sink;
use crate::observe::metrics::Metrics;
use crate::policy::Policy;
use crate::resolve::{BuildError, Resolver};

/// Everything a new connection needs, built from one config. A connection
/// takes the snapshot current when it is accepted and keeps it to its end,
/// so it sees one consistent set whatever reloads happen meanwhile.
pub struct Snapshot {
    /// The compiled allow/deny patterns and per-identity rules.
    pub(crate) policy: Policy,
    /// Shared with the next snapshot when `resolver:` and `timeouts.dns`
    /// did not change, so a reload keeps the DNS caches warm.
    pub(crate) resolver: Arc<Resolver>,
    /// The outer layer, when any listener is in mtls mode.
    pub(crate) mesh: Option<MeshTls>,
    /// Every wait on a peer, and the connection's lifetime.
    pub(crate) timeouts: Timeouts,
    /// The ClientHello size cap (the connection limits are the gateway's).
    pub(crate) limits: Limits,
    /// Refuse inner hellos carrying encrypted_client_hello.
    pub(crate) refuse_ech: bool,
    /// What CONNECT clients may ask for.
    pub(crate) connect: crate::config::ConnectSettings,
    /// How allowed connections leave.
    pub(crate) routes: crate::route::Routes,
}

/// Why a gateway could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A certificate file is missing or unusable; the key is
    /// `mtls.<cert|key|client_ca>` (or `mtls.dev_pki`).
    #[error(transparent)]
    Material(#[from] MaterialError),
    #[error(transparent)]
    Resolver(#[from] BuildError),
    #[error("cannot listen on {addr} (listener {name:?}): {error}")]
    Bind { name: String, addr: SocketAddr, error: std::io::Error },
    #[error("cannot listen on {addr} (metrics.address): {error}")]
    BindMetrics { addr: SocketAddr, error: std::io::Error },
    #[error("listener {name:?}: cannot set upstream_mark {mark} on a socket: {error} (SO_MARK needs CAP_NET_ADMIN)")]
    Mark { name: String, mark: u32, error: std::io::Error },
}

impl Snapshot {
    /// Builds everything new connections need from a validated config:
    /// reads the certificates, compiles the policy, and creates the resolver
    /// (or keeps `previous`'s, when its settings are the same).
    pub fn build(config: &Config, previous: Option<&Snapshot>) -> Result<Snapshot, StartError> {
        let mesh = match config.outer_settings() {
            Some(settings) if config.needs_mesh_tls() => Some(MeshTls::new(&settings)?),
            _ => None,
        };
        let resolver = match previous.map(|p| &p.resolver) {
            Some(kept) if *kept.settings() == config.resolver => kept.clone(),
            _ => Arc::new(Resolver::new(&config.resolver)?),
        };
        Ok(Snapshot {
            policy: Policy::compile(&config.policy),
            resolver,
            mesh,
            timeouts: config.timeouts,
            limits: config.limits,
            refuse_ech: config.refuse_ech,
            connect: config.connect.clone(),
            routes: config.routes.clone(),
        })
    }

    /// Expiry of the outer certificate, Unix seconds.
    pub fn certificate_expiry(&self) -> Option<i64> {
        self.mesh.as_ref().and_then(|m| m.not_after)
    }
}

/// What outlives config reloads: metrics, where records go, and the signal
/// that the drain is over and connections still open must end.
#[derive(Clone)]
pub struct Process {
    pub metrics: Arc<Metrics>,
    pub sink: Arc<dyn Sink>,
    /// Cancelled at the end of the drain.
    pub cut: CancellationToken,
    /// Every caller identity's open connections and rate bucket.
    pub identities: Arc<crate::identity_limits::IdentityLimits>,
}
