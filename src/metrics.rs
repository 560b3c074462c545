//! Prometheus metrics: per destination name (`sni`) and per calling workload
//! (`source`), with bounded label cardinality.
//!
//! Every metric lives in one registry with the `snigress_` prefix and is
//! exposed on the metrics address (see `admin.rs`). Handles for the byte
//! counters are resolved once per connection ([`ByteCounters`]) and advanced
//! per chunk as bytes move, so a long transfer shows its bandwidth live.
//!
//! Label values that peers control are capped: past `max_sni_values`
//! distinct names (or `max_source_values` distinct callers), new values are
//! counted under [`OVERFLOW`]. Names of refused connections are chosen by
//! whoever connects, so they may take at most half of the SNI budget; names
//! that were allowed can always use the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::identity::Principal;

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
}

/// Caps the distinct values of one label.
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    /// Most values that refused connections may add.
    max_unprivileged: usize,
    inner: Mutex<CapState>,
    overflow: Arc<str>,
}

#[derive(Debug, Default)]
struct CapState {
    seen: HashMap<Box<str>, Arc<str>>,
    unprivileged: usize,
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
struct ConnectionLabels {
    listener: Arc<str>,
    sni: Arc<str>,
    source: Arc<str>,
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    sni: Arc<str>,
    source: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    listener: Arc<str>,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    // 5 ms .. ~22 min, x4.
    Histogram::new(exponential_buckets(0.005, 4.0, 10))
}

fn latency_buckets() -> Histogram {
    // 0.25 ms .. ~16 s, x4.
    Histogram::new(exponential_buckets(0.00025, 4.0, 9))
}

fn hello_buckets() -> Histogram {
    Histogram::new([256.0, 512.0, 1024.0, 1536.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0])
}

/// Byte counters of one connection's `sni` and `source`.
#[derive(Debug, Clone)]
pub struct ByteCounters {
    from_client: Counter,
    to_client: Counter,
}

impl ByteCounters {
    pub fn add_from_client(&self, n: u64) {
        self.from_client.inc_by(n);
    }

    pub fn add_to_client(&self, n: u64) {
        self.to_client.inc_by(n);
    }
}

/// The labels a connection is counted under, derived once.
#[derive(Debug, Clone)]
pub struct ConnectionKey {
    sni: Arc<str>,
    source: Arc<str>,
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

impl DnsResult {
    fn as_str(self) -> &'static str {
        match self {
            DnsResult::Ok => "ok",
            DnsResult::NxDomain => "nxdomain",
            DnsResult::NoAddresses => "no_addresses",
            DnsResult::Timeout => "timeout",
            DnsResult::Error => "error",
        }
    }
}

/// Every metric snigress exports.
pub struct Metrics {
    registry: Registry,
    connections: Family<ConnectionLabels, Counter>,
    bytes_from_client: Family<FlowLabels, Counter>,
    bytes_to_client: Family<FlowLabels, Counter>,
    active: Family<ListenerLabels, Gauge>,
    duration: HistogramFamily<DurationLabels>,
    hello_size: HistogramFamily<ListenerLabels>,
    dns_lookups: Family<ResultLabels, Counter>,
    dns_cache_hits: Counter,
    dns_duration: Histogram,
    connects: Family<ResultLabels, Counter>,
    connect_duration: Histogram,
    handshake_failures: Family<HandshakeLabels, Counter>,
    cert_expiry: Gauge,
    open_fds: Gauge,
    resident_memory: Gauge,
    reloads: Family<ResultLabels, Counter>,
    last_reload: Gauge,
    draining: Gauge,
    accept_errors: Counter,
    sni_cap: LabelCap,
    source_cap: LabelCap,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("sni_values", &self.sni_cap.len()).finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(max_sni_values: usize, max_source_values: usize) -> Metrics {
        let mut registry = Registry::with_prefix("snigress");
        let connections = Family::default();
        registry.register(
            "connections",
            "Connections ended, by listener, inner SNI, caller, decision and reason",
            connections.clone(),
        );
        let bytes_from_client = Family::default();
        registry.register(
            "bytes_from_client",
            "Bytes received from clients (the ClientHello included), by SNI and caller; advances while connections are open",
            bytes_from_client.clone(),
        );
        let bytes_to_client = Family::default();
        registry.register(
            "bytes_to_client",
            "Bytes sent to clients, by SNI and caller; advances while connections are open",
            bytes_to_client.clone(),
        );
        let active = Family::default();
        registry.register("active_connections", "Connections open now, by listener", active.clone());
        let duration = HistogramFamily::new_with_constructor(duration_buckets as fn() -> Histogram);
        registry.register(
            "connection_duration_seconds",
            "Connection lifetime from accept to close, by listener and decision",
            duration.clone(),
        );
        let hello_size = HistogramFamily::new_with_constructor(hello_buckets as fn() -> Histogram);
        registry.register(
            "client_hello_size_bytes",
            "Size of complete inner ClientHellos as received (records included)",
            hello_size.clone(),
        );
        let dns_lookups = Family::default();
        registry.register("dns_lookups", "DNS lookups by result (cache hits included)", dns_lookups.clone());
        let dns_cache_hits = Counter::default();
        registry.register("dns_cache_hits", "DNS lookups answered from the gateway's cache", dns_cache_hits.clone());
        let dns_duration = latency_buckets();
        registry.register("dns_lookup_duration_seconds", "DNS lookup time (cache hits included)", dns_duration.clone());
        let connects = Family::default();
        registry.register(
            "upstream_connects",
            "Upstream connection attempts per connection by result (ok, failed, timeout)",
            connects.clone(),
        );
        let connect_duration = latency_buckets();
        registry.register(
            "upstream_connect_duration_seconds",
            "Time to an established upstream connection (every address tried)",
            connect_duration.clone(),
        );
        let handshake_failures = Family::default();
        registry.register(
            "outer_handshake_failures",
            "Outer mTLS handshakes that failed, by listener and reason",
            handshake_failures.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Expiry (not after) of the gateway's outer mTLS certificate, Unix time; 0 without one",
            cert_expiry.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "Build information; always 1", build_info);
        let open_fds = Gauge::default();
        registry.register("process_open_fds", "Open file descriptors of the gateway process", open_fds.clone());
        let resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the gateway process",
            resident_memory.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "config_reloads",
            "Config and certificate reloads by result (success, failure); a failure keeps the running config",
            reloads.clone(),
        );
        let last_reload = Gauge::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded, Unix time",
            last_reload.clone(),
        );
        last_reload.set(unix_now());
        let draining = Gauge::default();
        registry.register("draining", "1 while shutting down (readiness is off), else 0", draining.clone());
        let accept_errors = Counter::default();
        registry.register(
            "accept_errors",
            "Accepts that failed for lack of file descriptors or memory (the accept loop pauses and retries)",
            accept_errors.clone(),
        );
        Metrics {
            registry,
            reloads,
            last_reload,
            draining,
            accept_errors,
            connections,
            bytes_from_client,
            bytes_to_client,
            active,
            duration,
            hello_size,
            dns_lookups,
            dns_cache_hits,
            dns_duration,
            connects,
            connect_duration,
            handshake_failures,
            cert_expiry,
            open_fds,
            resident_memory,
            sni_cap: LabelCap::new(max_sni_values),
            source_cap: LabelCap::new(max_source_values),
        }
    }

    /// The labels for a connection: `sni` is the validated name, or
    /// [`NONE`] / [`INVALID`]; `allowed` says whether the policy let the
    /// name through (refused names get the smaller share of the cap).
    pub fn key(&self, sni: Option<&str>, principal: Option<&Principal>, allowed: bool) -> ConnectionKey {
        let sni = match sni {
            None => NONE.into(),
            Some(INVALID) => INVALID.into(),
            Some(name) => self.sni_cap.admit(name, allowed),
        };
        let source = match principal {
            None => NONE.into(),
            // Identities are certified by the mesh CA: all may use the budget.
            Some(_) => self.source_cap.admit(&source_of(principal), true),
        };
        ConnectionKey { sni, source }
    }

    /// Byte counters for a connection, to advance as bytes move.
    pub fn bytes(&self, key: &ConnectionKey) -> ByteCounters {
        let labels = FlowLabels { sni: key.sni.clone(), source: key.source.clone() };
        ByteCounters {
            from_client: self.bytes_from_client.get_or_create_owned(&labels),
            to_client: self.bytes_to_client.get_or_create_owned(&labels),
        }
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn open(&self, listener: &Arc<str>) -> ActiveGuard {
        let gauge = self.active.get_or_create_owned(&ListenerLabels { listener: listener.clone() });
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// Counts a connection that ended.
    pub fn finished(
        &self,
        listener: &Arc<str>,
        key: &ConnectionKey,
        decision: &'static str,
        reason: &'static str,
        lifetime: Duration,
    ) {
        let labels = ConnectionLabels {
            listener: listener.clone(),
            sni: key.sni.clone(),
            source: key.source.clone(),
            decision,
            reason,
        };
        self.connections.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&DurationLabels { listener: listener.clone(), decision })
            .observe(lifetime.as_secs_f64());
    }

    pub fn hello(&self, listener: &Arc<str>, size: usize) {
        self.hello_size.get_or_create(&ListenerLabels { listener: listener.clone() }).observe(size as f64);
    }

    pub fn dns(&self, result: DnsResult, cached: bool, took: Duration) {
        self.dns_lookups.get_or_create(&ResultLabels { result: result.as_str() }).inc();
        if cached {
            self.dns_cache_hits.inc();
        }
        self.dns_duration.observe(took.as_secs_f64());
    }

    /// `result`: `ok`, `failed` or `timeout`.
    pub fn connect(&self, result: &'static str, took: Duration) {
        self.connects.get_or_create(&ResultLabels { result }).inc();
        if result == "ok" {
            self.connect_duration.observe(took.as_secs_f64());
        }
    }

    pub fn handshake_failed(&self, listener: &Arc<str>, reason: &'static str) {
        self.handshake_failures.get_or_create(&HandshakeLabels { listener: listener.clone(), reason }).inc();
    }

    /// A reload attempt: `true` when the new config is in force.
    pub fn reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if success {
            self.last_reload.set(unix_now());
        }
    }

    pub fn draining(&self, on: bool) {
        self.draining.set(i64::from(on));
    }

    pub fn accept_error(&self) {
        self.accept_errors.inc();
    }

    /// The outer certificate's expiry, Unix seconds.
    pub fn certificate_expiry(&self, not_after: i64) {
        self.cert_expiry.set(not_after);
    }

    /// The exposition in OpenMetrics text (`application/openmetrics-text`).
    pub fn openmetrics(&self) -> String {
        self.sample_process();
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The exposition in the Prometheus text format 0.0.4 (`text/plain`):
    /// the OpenMetrics text with counter families named by their `_total`
    /// samples, no `# EOF` and no `# UNIT` lines.
    pub fn prometheus_text(&self) -> String {
        let open = self.openmetrics();
        let mut counters = Vec::new();
        for line in open.lines() {
            if let Some(name) = line.strip_prefix("# TYPE ").and_then(|rest| rest.strip_suffix(" counter")) {
                counters.push(name.to_owned());
            }
        }
        let mut out = String::with_capacity(open.len());
        for line in open.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters.iter().any(|c| c == name).then(|| format!("{prefix}{name}_total {tail}"))
            });
            match renamed {
                Some(l) => out.push_str(&l),
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// Open descriptors and resident memory, read from /proc at scrape time.
    fn sample_process(&self) {
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(entries.count() as i64);
        }
        // VmRSS is in KiB whatever the page size.
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
            if let Some(kib) = kib {
                self.resident_memory.set(kib.saturating_mul(1024));
            }
        }
    }

    /// Distinct `sni` label values in use (for tests and diagnostics).
    pub fn sni_values(&self) -> usize {
        self.sni_cap.len()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Decrements the active-connections gauge when dropped.
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
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

    #[test]
    fn label_derivation() {
        let m = Metrics::new(10, 10);
        let p = Principal::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        let k = m.key(Some("api.example.com"), Some(&p), true);
        assert_eq!((&*k.sni, &*k.source), ("api.example.com", "shop/cart"));
        let k = m.key(None, None, false);
        assert_eq!((&*k.sni, &*k.source), (NONE, NONE));
        let k = m.key(Some(INVALID), None, false);
        assert_eq!(&*k.sni, INVALID);
        let odd = Principal::parse("spiffe://example.org/workload/x").unwrap();
        assert_eq!(source_of(Some(&odd)), "example.org/workload/x");
        assert_eq!(m.sni_values(), 1, "none and invalid are fixed values outside the cap");
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let m = Metrics::new(10, 10);
        let key = m.key(Some("a.example"), None, true);
        m.bytes(&key).add_from_client(5);
        m.finished(&"l".into(), &key, "allowed", "allowed", Duration::from_millis(3));
        let text = m.prometheus_text();
        assert!(text.contains("# TYPE snigress_connections_total counter\n"), "{text}");
        assert!(text.contains("# HELP snigress_connections_total Connections ended"), "{text}");
        assert!(text.contains("snigress_bytes_from_client_total{sni=\"a.example\",source=\"none\"} 5\n"), "{text}");
        assert!(text.contains("# TYPE snigress_connection_duration_seconds histogram\n"), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(m.openmetrics().ends_with("# EOF\n"));
        assert!(text.contains("snigress_build_info{version=\""), "{text}");
    }
}
