//! Label values and the caps on them: what a connection is counted under.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::identity::Principal;
use crate::relay::Meter;

/// Label value that stands for every value past a cap.
pub const OVERFLOW: &str = "__overflow__";
/// `source` of a connection without a caller identity (passthrough
/// listeners, or a failed outer handshake); `sni` of one without a name.
pub const NONE: &str = "none";
/// `sni` of a connection whose server_name was not a valid host name (the
/// raw bytes are in the access log, never in a label).
pub const INVALID: &str = "invalid";

pub mod defaults {
    /// Distinct `sni` label values: a cluster's egress rarely reaches a
    /// thousand names; past this they share one series.
    pub const MAX_SNI_VALUES: usize = 1000;
    /// Distinct `source` label values (mesh workloads).
    pub const MAX_SOURCE_VALUES: usize = 500;
    /// Distinct (sni, source) pairs: most callers reach a handful of names,
    /// so 5 000 pairs cover a large cluster, while the product of the two
    /// caps above (500 000) would not fit a Prometheus server's budget.
    pub const MAX_SNI_SOURCE_PAIRS: usize = 5000;
}

/// The caps on label values and series, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub sni_values: usize,
    pub source_values: usize,
    pub sni_source_pairs: usize,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            sni_values: defaults::MAX_SNI_VALUES,
            source_values: defaults::MAX_SOURCE_VALUES,
            sni_source_pairs: defaults::MAX_SNI_SOURCE_PAIRS,
        }
    }
}

/// Caps the distinct values of one label.
#[derive(Debug)]
pub struct LabelCap {
    pub(super) max: usize,
    /// Most values that refused connections may add.
    pub(super) max_unprivileged: usize,
    pub(super) inner: Mutex<CapState>,
    pub(super) overflow: Arc<str>,
}

#[derive(Debug, Default)]
pub(super) struct CapState {
    pub(super) seen: HashMap<Box<str>, Arc<str>>,
    pub(super) unprivileged: usize,
}

impl LabelCap {
    pub fn new(max: usize) -> LabelCap {
        LabelCap { max, max_unprivileged: max / 2, inner: Mutex::default(), overflow: OVERFLOW.into() }
    }

    /// The label value to use for `value`: itself while there is room (or
    /// once admitted), [`OVERFLOW`] after. `privileged` values (names the
    /// policy allowed) may use the whole budget, others half of it.
    pub fn admit(&self, value: &str, privileged: bool) -> Arc<str> {
        let mut state = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(v) = state.seen.get(value) {
            return v.clone();
        }
        let room = state.seen.len() < self.max && (privileged || state.unprivileged < self.max_unprivileged);
        if !room {
            return self.overflow.clone();
        }
        if !privileged {
            state.unprivileged += 1;
        }
        let v: Arc<str> = value.into();
        state.seen.insert(value.into(), v.clone());
        v
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Caps the distinct (sni, source) pairs; pairs are admitted for good.
#[derive(Debug)]
pub(super) struct PairCap {
    pub(super) max: usize,
    pub(super) seen: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
}

impl PairCap {
    pub(super) fn admit(&self, sni: &Arc<str>, source: &Arc<str>) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let pair = (sni.clone(), source.clone());
        if seen.contains(&pair) {
            return true;
        }
        if seen.len() >= self.max {
            return false;
        }
        seen.insert(pair);
        true
    }
}

/// The `source` label of a caller: `namespace/service_account` for Istio
/// identities, the SPIFFE ID without its scheme otherwise, [`NONE`] without.
pub fn source_of(principal: Option<&Principal>) -> String {
    match principal {
        None => NONE.to_owned(),
        Some(p) => match (p.namespace(), p.service_account()) {
            (Some(ns), Some(sa)) => format!("{ns}/{sa}"),
            _ => p.without_scheme().to_owned(),
        },
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ConnectionLabels {
    pub(super) listener: Arc<str>,
    pub(super) sni: Arc<str>,
    pub(super) source: Arc<str>,
    pub(super) decision: &'static str,
    pub(super) reason: &'static str,
    /// The front: `tls`, `connect`, `http`, or `none` before one was chosen.
    pub(super) protocol: &'static str,
    /// The pattern that decided (`rule-name:pattern` for a rule's), or
    /// `none`: bounded by the patterns in the config.
    pub(super) rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct EntryLabels {
    pub(super) rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FlowLabels {
    pub(super) sni: Arc<str>,
    pub(super) source: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ListenerLabels {
    pub(super) listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DurationLabels {
    pub(super) listener: Arc<str>,
    pub(super) decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabels {
    pub(super) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HandshakeLabels {
    pub(super) listener: Arc<str>,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct VersionLabels {
    pub(super) version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AuditLabels {
    pub(super) listener: Arc<str>,
    pub(super) sni: Arc<str>,
    pub(super) source: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RouteLabels {
    pub(super) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AlertLabels {
    pub(super) alert: &'static str,
}

pub(super) type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub(super) fn duration_buckets() -> Histogram {
    // 5 ms .. ~22 min, x4.
    Histogram::new(exponential_buckets(0.005, 4.0, 10))
}

pub(super) fn latency_buckets() -> Histogram {
    // 0.25 ms .. ~16 s, x4.
    Histogram::new(exponential_buckets(0.00025, 4.0, 9))
}

pub(super) fn hello_buckets() -> Histogram {
    Histogram::new([256.0, 512.0, 1024.0, 1536.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0])
}

/// Byte counters of one connection's `sni` and `source` (and their
/// `istio_tcp_*` twins when those are on).
#[derive(Debug, Clone)]
pub struct ByteCounters {
    pub(super) from_client: Counter,
    pub(super) to_client: Counter,
    /// Istio's received (from the client) and sent (to it).
    pub(super) istio: Option<(Counter, Counter)>,
}

impl Meter for ByteCounters {
    fn add_from_client(&self, n: u64) {
        self.from_client.inc_by(n);
        if let Some((received, _)) = &self.istio {
            received.inc_by(n);
        }
    }

    fn add_to_client(&self, n: u64) {
        self.to_client.inc_by(n);
        if let Some((_, sent)) = &self.istio {
            sent.inc_by(n);
        }
    }
}

/// The labels a connection is counted under, derived once.
#[derive(Debug, Clone)]
pub struct ConnectionKey {
    pub(super) sni: Arc<str>,
    pub(super) source: Arc<str>,
    /// The caller's SPIFFE ID when `source` names it (not capped away).
    pub(super) principal: Option<Arc<str>>,
    /// The caller came over the mesh's mutual TLS.
    pub(super) mutual_tls: bool,
}

/// Istio's standard labels on the `istio_tcp_*` families, as the gateway
/// sees a connection (`reporter="destination"`: it is the destination of
/// the mesh hop).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct IstioLabels {
    pub(super) reporter: &'static str,
    pub(super) source_principal: Arc<str>,
    pub(super) source_workload: Arc<str>,
    pub(super) source_workload_namespace: Arc<str>,
    pub(super) destination_service: Arc<str>,
    pub(super) destination_service_name: Arc<str>,
    pub(super) destination_service_namespace: &'static str,
    pub(super) destination_workload: &'static str,
    pub(super) destination_workload_namespace: &'static str,
    pub(super) request_protocol: &'static str,
    pub(super) connection_security_policy: &'static str,
    pub(super) response_flags: &'static str,
}

/// Istio's value for what is not known.
pub(super) const UNKNOWN: &str = "unknown";

impl IstioLabels {
    pub(super) fn of(key: &ConnectionKey, response_flags: &'static str) -> IstioLabels {
        let unknown = || Arc::<str>::from(UNKNOWN);
        // `source` is `ns/sa` for Istio identities, else capped or absent.
        let (namespace, workload) = match (key.principal.as_ref(), key.source.split_once('/')) {
            (Some(_), Some((ns, sa))) if !sa.contains('/') => (Arc::from(ns), Arc::from(sa)),
            (Some(_), _) => (unknown(), key.source.clone()),
            (None, _) => (unknown(), unknown()),
        };
        IstioLabels {
            reporter: "destination",
            source_principal: key.principal.clone().unwrap_or_else(unknown),
            source_workload: workload,
            source_workload_namespace: namespace,
            destination_service: key.sni.clone(),
            destination_service_name: key.sni.clone(),
            destination_service_namespace: UNKNOWN,
            destination_workload: "snigress",
            destination_workload_namespace: UNKNOWN,
            request_protocol: "tcp",
            connection_security_policy: if key.mutual_tls { "mutual_tls" } else { "none" },
            response_flags,
        }
    }
}

/// The result of one DNS lookup, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsResult {
    Ok,
    NxDomain,
    NoAddresses,
    Timeout,
    Error,
}

/// The result of dialling an allowed destination, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectResult {
    Ok,
    Failed,
    Timeout,
}

impl ConnectResult {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ConnectResult::Ok => "ok",
            ConnectResult::Failed => "failed",
            ConnectResult::Timeout => "timeout",
        }
    }
}

impl DnsResult {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            DnsResult::Ok => "ok",
            DnsResult::NxDomain => "nxdomain",
            DnsResult::NoAddresses => "no_addresses",
            DnsResult::Timeout => "timeout",
            DnsResult::Error => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_cap_share_the_overflow_value() {
        let cap = LabelCap::new(3);
        assert_eq!(&*cap.admit("a", true), "a");
        assert_eq!(&*cap.admit("b", true), "b");
        assert_eq!(&*cap.admit("c", true), "c");
        assert_eq!(&*cap.admit("d", true), OVERFLOW);
        assert_eq!(&*cap.admit("a", true), "a", "admitted values stay");
        assert_eq!(cap.len(), 3);
    }

    #[test]
    fn refused_names_get_half_the_budget() {
        let cap = LabelCap::new(4);
        assert_eq!(&*cap.admit("x.evil", false), "x.evil");
        assert_eq!(&*cap.admit("y.evil", false), "y.evil");
        assert_eq!(&*cap.admit("z.evil", false), OVERFLOW, "refused names stop at half");
        assert_eq!(&*cap.admit("api.good", true), "api.good", "allowed names still fit");
        assert_eq!(&*cap.admit("cdn.good", true), "cdn.good");
        assert_eq!(&*cap.admit("more.good", true), OVERFLOW);
        assert_eq!(&*cap.admit("x.evil", true), "x.evil");
    }
}
