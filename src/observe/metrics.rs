//! Prometheus metrics: per destination name (`sni`) and per calling workload
//! (`source`), with a bounded number of series.
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
//! that were allowed can always use the rest. Series are products of labels,
//! so the (sni, source) pairs are capped too (`max_sni_source_pairs`): past
//! it, a new pair keeps its `sni` and is counted under `source="__overflow__"`.
//! Each per-SNI family then holds at most `max_sni_source_pairs +
//! max_sni_values + 3` (sni, source) combinations, whatever the traffic.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Decision;
use crate::identity::Principal;

mod labels;

use labels::*;
pub use labels::{
    ByteCounters, Caps, ConnectResult, ConnectionKey, DnsResult, INVALID, LabelCap, NONE, OVERFLOW, defaults, source_of,
};

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
    alerts: Family<AlertLabels, Counter>,
    routed: Family<RouteLabels, Counter>,
    audited: Family<AuditLabels, Counter>,
    entries: Family<EntryLabels, Gauge>,
    /// [`NO_RULE`], shared by every connection no pattern decided.
    no_rule: Arc<str>,
    cert_expiry: Gauge,
    open_fds: Gauge,
    resident_memory: Gauge,
    reloads: Family<ResultLabels, Counter>,
    last_reload: Gauge,
    draining: Gauge,
    accept_errors: Counter,
    pending: Gauge,
    access_log_dropped: Counter,
    log_lines_dropped: Counter,
    pipes_open: Gauge,
    pipe_bytes: Gauge,
    pipe_resize_failures: Counter,
    splice_fallbacks: Counter,
    sni_cap: LabelCap,
    source_cap: LabelCap,
    pairs: PairCap,
    /// `istio_tcp_*` (metrics.istio_compatible), in a registry of their own
    /// (no `snigress_` prefix).
    istio: Option<Istio>,
    /// Held while sampling, so concurrent scrapes do not advance a counter twice.
    sampling: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("sni_values", &self.sni_cap.len()).finish_non_exhaustive()
    }
}

/// Istio's four standard TCP families, labelled as Istio's dashboards and
/// Kiali query them.
struct Istio {
    registry: Registry,
    opened: Family<IstioLabels, Counter>,
    closed: Family<IstioLabels, Counter>,
    received: Family<IstioLabels, Counter>,
    sent: Family<IstioLabels, Counter>,
}

impl Istio {
    fn new() -> Istio {
        let mut registry = Registry::default();
        let r = &mut registry;
        Istio {
            opened: register(
                r,
                "istio_tcp_connections_opened",
                "TCP connections opened (Istio standard)",
                Family::default(),
            ),
            closed: register(
                r,
                "istio_tcp_connections_closed",
                "TCP connections closed (Istio standard)",
                Family::default(),
            ),
            received: register(
                r,
                "istio_tcp_received_bytes",
                "Bytes received from the client (Istio standard)",
                Family::default(),
            ),
            sent: register(r, "istio_tcp_sent_bytes", "Bytes sent to the client (Istio standard)", Family::default()),
            registry,
        }
    }
}

fn histograms<L: Clone + std::hash::Hash + Eq>(buckets: fn() -> Histogram) -> HistogramFamily<L> {
    HistogramFamily::new_with_constructor(buckets)
}

/// Registers `metric` under `name` and returns the handle to update it by.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// How a connection ended, as its counters are labelled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub decision: Decision,
    pub reason: &'static str,
    /// The front (`tls`, `connect`, `http`), or `none`.
    pub protocol: &'static str,
    /// Istio's response flags (the `istio_tcp_*` families).
    pub response_flags: &'static str,
}

/// The `none` value of the `rule` label: no pattern decided.
pub(crate) const NO_RULE: &str = "none";

impl Metrics {
    #[cfg(test)]
    pub(crate) fn new(caps: Caps) -> Metrics {
        Metrics::with_istio(caps, false)
    }

    /// `istio`: also the `istio_tcp_*` families (metrics.istio_compatible).
    pub(crate) fn with_istio(caps: Caps, istio: bool) -> Metrics {
        let mut registry = Registry::with_prefix("snigress");
        let r = &mut registry;
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        register(r, "build_info", "Build information; always 1", build_info);
        let metrics = Metrics {
            connections: register(
                r,
                "connections",
                "Connections ended, by listener, destination name, caller, decision, reason and front protocol",
                Family::default(),
            ),
            bytes_from_client: register(
                r,
                "bytes_from_client",
                "Bytes received from clients (the ClientHello included), by SNI and caller; advances while connections are open",
                Family::default(),
            ),
            bytes_to_client: register(
                r,
                "bytes_to_client",
                "Bytes sent to clients, by SNI and caller; advances while connections are open",
                Family::default(),
            ),
            active: register(r, "active_connections", "Connections open now, by listener", Family::default()),
            duration: register(
                r,
                "connection_duration_seconds",
                "Connection lifetime from accept to close, by listener and decision",
                histograms(duration_buckets),
            ),
            hello_size: register(
                r,
                "client_hello_size_bytes",
                "Size of complete inner ClientHellos as received (records included)",
                histograms(hello_buckets),
            ),
            dns_lookups: register(r, "dns_lookups", "DNS lookups by result (cache hits included)", Family::default()),
            dns_cache_hits: register(
                r,
                "dns_cache_hits",
                "DNS lookups answered from the gateway's cache",
                Counter::default(),
            ),
            dns_duration: register(
                r,
                "dns_lookup_duration_seconds",
                "DNS lookup time (cache hits included)",
                latency_buckets(),
            ),
            connects: register(
                r,
                "upstream_connects",
                "Upstream connection attempts per connection by result (ok, failed, timeout)",
                Family::default(),
            ),
            connect_duration: register(
                r,
                "upstream_connect_duration_seconds",
                "Time to an established upstream connection (every address tried)",
                latency_buckets(),
            ),
            handshake_failures: register(
                r,
                "outer_handshake_failures",
                "Outer mTLS handshakes that failed, by listener and reason",
                Family::default(),
            ),
            routed: register(
                r,
                "routed_connections",
                "Upstream connections opened by a route, by route (connections no route fitted are not counted)",
                Family::default(),
            ),
            entries: register(
                r,
                "policy_allow_entry",
                "1 for every allow entry of the policy in force, by the rule label the connection counter gives it",
                Family::default(),
            ),
            no_rule: NO_RULE.into(),
            audited: register(
                r,
                "policy_audit",
                "Connections policy would have refused but let through (audit mode), by listener, name and caller",
                Family::default(),
            ),
            alerts: register(
                r,
                "alerts_sent",
                "Fatal TLS alerts sent to refused clients on the inner layer, by alert",
                Family::default(),
            ),
            cert_expiry: register(
                r,
                "certificate_expiry_timestamp_seconds",
                "Expiry (not after) of the gateway's outer mTLS certificate, Unix time; 0 without one",
                Gauge::default(),
            ),
            open_fds: register(r, "process_open_fds", "Open file descriptors of the gateway process", Gauge::default()),
            resident_memory: register(
                r,
                "process_resident_memory_bytes",
                "Resident memory of the gateway process",
                Gauge::default(),
            ),
            reloads: register(
                r,
                "config_reloads",
                "Config and certificate reloads by result (success, failure); a failure keeps the running config",
                Family::default(),
            ),
            last_reload: register(
                r,
                "config_last_reload_success_timestamp_seconds",
                "When the config in force was loaded, Unix time",
                Gauge::default(),
            ),
            draining: register(r, "draining", "1 while shutting down (readiness is off), else 0", Gauge::default()),
            accept_errors: register(
                r,
                "accept_errors",
                "Accepts that failed (the accept loop pauses and retries)",
                Counter::default(),
            ),
            pending: register(
                r,
                "pending_connections",
                "Connections whose destination is not known yet (outer handshake or ClientHello to come)",
                Gauge::default(),
            ),
            access_log_dropped: register(
                r,
                "access_log_dropped",
                "Access records dropped because the access-log output stalled",
                Counter::default(),
            ),
            log_lines_dropped: register(
                r,
                "log_dropped_lines",
                "Diagnostic log lines dropped because stderr could not keep up",
                Counter::default(),
            ),
            pipes_open: register(
                r,
                "splice_pipes",
                "Pipes held by the zero-copy relay (in use or pooled)",
                Gauge::default(),
            ),
            pipe_bytes: register(
                r,
                "splice_pipe_capacity_bytes",
                "Capacity of those pipes: what the per-user pipe quota is charged",
                Gauge::default(),
            ),
            pipe_resize_failures: register(
                r,
                "splice_pipe_resize_failures",
                "Pipes the kernel made smaller than asked (the per-user pipe quota was reached)",
                Counter::default(),
            ),
            splice_fallbacks: register(
                r,
                "splice_fallbacks",
                "Bursts of passthrough bytes copied through user space because no pipe fitted the pipe quota",
                Counter::default(),
            ),
            sni_cap: LabelCap::new(caps.sni_values),
            source_cap: LabelCap::new(caps.source_values),
            pairs: PairCap { max: caps.sni_source_pairs, seen: Mutex::default() },
            istio: istio.then(Istio::new),
            sampling: Mutex::default(),
            registry,
        };
        metrics.last_reload.set(unix_now());
        metrics
    }

    /// The labels for a connection: `sni` is the validated name, or
    /// [`NONE`] / [`INVALID`]; `allowed` says whether the policy let the
    /// name through (refused names get the smaller share of the cap).
    /// `mutual_tls`: the caller came over the outer mTLS layer.
    pub(crate) fn key(
        &self,
        sni: Option<&str>,
        principal: Option<&Principal>,
        allowed: bool,
        mutual_tls: bool,
    ) -> ConnectionKey {
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
        // A series is a pair: past the pair cap a new pair keeps its name
        // (the per-destination view) and loses its caller.
        let admitted = self.pairs.admit(&sni, &source);
        // (Only the Istio families use it: no allocation otherwise.)
        let named = self.istio.is_some() && admitted && principal.is_some() && source != self.source_cap.overflow;
        let principal = principal.filter(|_| named).map(|p| Arc::from(p.uri()));
        let source = if admitted { source } else { self.source_cap.overflow.clone() };
        ConnectionKey { sni, source, principal, mutual_tls }
    }

    /// Byte counters for a connection, to advance as bytes move. Called
    /// once per connection: with the Istio families on, the connection is
    /// counted as opened here (its bytes and opening carry
    /// `response_flags="-"`: the outcome is not known yet).
    pub(crate) fn bytes(&self, key: &ConnectionKey) -> Box<ByteCounters> {
        let labels = FlowLabels { sni: key.sni.clone(), source: key.source.clone() };
        let istio = self.istio.as_ref().map(|istio| {
            let labels = IstioLabels::of(key, "-");
            istio.opened.get_or_create(&labels).inc();
            (istio.received.get_or_create_owned(&labels), istio.sent.get_or_create_owned(&labels))
        });
        Box::new(ByteCounters {
            from_client: self.bytes_from_client.get_or_create_owned(&labels),
            to_client: self.bytes_to_client.get_or_create_owned(&labels),
            istio,
        })
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn open(&self, listener: &Arc<str>) -> ActiveGuard {
        let gauge = self.active.get_or_create_owned(&ListenerLabels { listener: listener.clone() });
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// Counts a connection that ended.
    pub(crate) fn finished(
        &self,
        listener: &Arc<str>,
        key: &ConnectionKey,
        outcome: Outcome,
        rule: Option<&Arc<str>>,
        lifetime: Duration,
    ) {
        let Outcome { decision, reason, protocol, response_flags } = outcome;
        if let Some(istio) = &self.istio {
            istio.closed.get_or_create(&IstioLabels::of(key, response_flags)).inc();
        }
        let decision = decision.as_str();
        let labels = ConnectionLabels {
            listener: listener.clone(),
            sni: key.sni.clone(),
            source: key.source.clone(),
            decision,
            reason,
            protocol,
            rule: rule.unwrap_or(&self.no_rule).clone(),
        };
        self.connections.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&DurationLabels { listener: listener.clone(), decision })
            .observe(lifetime.as_secs_f64());
    }

    pub(crate) fn hello(&self, listener: &Arc<str>, size: usize) {
        self.hello_size.get_or_create(&ListenerLabels { listener: listener.clone() }).observe(size as f64);
    }

    pub(crate) fn dns(&self, result: DnsResult, cached: bool, took: Duration) {
        self.dns_lookups.get_or_create(&ResultLabels { result: result.as_str() }).inc();
        if cached {
            self.dns_cache_hits.inc();
        }
        self.dns_duration.observe(took.as_secs_f64());
    }

    pub(crate) fn connect(&self, result: ConnectResult, took: Duration) {
        self.connects.get_or_create(&ResultLabels { result: result.as_str() }).inc();
        if result == ConnectResult::Ok {
            self.connect_duration.observe(took.as_secs_f64());
        }
    }

    pub(crate) fn handshake_failed(&self, listener: &Arc<str>, reason: &'static str) {
        self.handshake_failures.get_or_create(&HandshakeLabels { listener: listener.clone(), reason }).inc();
    }

    /// A reload attempt: `true` when the new config is in force.
    pub(crate) fn reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if success {
            self.last_reload.set(unix_now());
        }
    }

    pub(crate) fn draining(&self, on: bool) {
        self.draining.set(i64::from(on));
    }

    pub(crate) fn accept_error(&self) {
        self.accept_errors.inc();
    }

    pub(crate) fn pending_connections(&self, n: usize) {
        self.pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A fatal alert sent to a refused client; `name` is its description.
    /// A route opened an upstream connection. (Route names come from the
    /// config: bounded.)
    pub(crate) fn routed(&self, route: &str) {
        self.routed.get_or_create(&RouteLabels { route: route.to_owned() }).inc();
    }

    /// The allow entries of the policy in force (replacing the last set):
    /// with the connection counter's `rule` label, the entries no
    /// connection used.
    pub(crate) fn policy_entries(&self, entries: impl IntoIterator<Item = String>) {
        self.entries.clear();
        for rule in entries {
            self.entries.get_or_create(&EntryLabels { rule: rule.into() }).set(1);
        }
    }

    /// A connection policy would have refused, let through in audit mode.
    pub(crate) fn audited(&self, listener: &Arc<str>, key: &ConnectionKey) {
        let labels = AuditLabels { listener: listener.clone(), sni: key.sni.clone(), source: key.source.clone() };
        self.audited.get_or_create(&labels).inc();
    }

    pub(crate) fn alert_sent(&self, name: &'static str) {
        self.alerts.get_or_create(&AlertLabels { alert: name }).inc();
    }

    /// The outer certificate's expiry, Unix seconds.
    pub(crate) fn certificate_expiry(&self, not_after: i64) {
        self.cert_expiry.set(not_after);
    }

    /// The exposition in OpenMetrics text (`application/openmetrics-text`);
    /// `access_log_dropped` is the access-log writer's count so far.
    pub(crate) fn openmetrics(&self, access_log_dropped: u64) -> String {
        self.sample(access_log_dropped);
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(istio) = &self.istio {
            let _ = encode_registry(&mut out, &istio.registry);
        }
        let _ = encode_eof(&mut out);
        out
    }

    /// The exposition in the Prometheus text format 0.0.4 (`text/plain`):
    /// the OpenMetrics text with counter families named by their `_total`
    /// samples, no `# EOF` and no `# UNIT` lines.
    pub(crate) fn prometheus_text(&self, access_log_dropped: u64) -> String {
        let open = self.openmetrics(access_log_dropped);
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

    /// What is counted elsewhere, read at scrape time: the relay's pipes,
    /// the writers' drops, and the process's descriptors and memory (/proc).
    fn sample(&self, access_log_dropped: u64) {
        let _one_at_a_time = self.sampling.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let pipes = crate::relay::splice::stats();
        self.pipes_open.set(i64::try_from(pipes.open).unwrap_or(i64::MAX));
        self.pipe_bytes.set(i64::try_from(pipes.bytes).unwrap_or(i64::MAX));
        catch_up(&self.pipe_resize_failures, pipes.resize_failures);
        catch_up(&self.splice_fallbacks, pipes.fallbacks);
        catch_up(&self.access_log_dropped, access_log_dropped);
        catch_up(&self.log_lines_dropped, super::stderr::dropped());
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
}

/// Advances `counter` to `total`, a count kept elsewhere that only grows.
fn catch_up(counter: &Counter, total: u64) {
    let behind = total.saturating_sub(counter.get());
    if behind > 0 {
        counter.inc_by(behind);
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
    use crate::relay::Meter;

    #[test]
    fn label_derivation() {
        let m = Metrics::new(Caps { sni_values: 10, source_values: 10, sni_source_pairs: 100 });
        let p = Principal::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        let k = m.key(Some("api.example.com"), Some(&p), true, true);
        assert_eq!((&*k.sni, &*k.source), ("api.example.com", "shop/cart"));
        let k = m.key(None, None, false, false);
        assert_eq!((&*k.sni, &*k.source), (NONE, NONE));
        let k = m.key(Some(INVALID), None, false, false);
        assert_eq!(&*k.sni, INVALID);
        let odd = Principal::parse("spiffe://example.org/workload/x").unwrap();
        assert_eq!(source_of(Some(&odd)), "example.org/workload/x");
        assert_eq!(m.sni_cap.len(), 1, "none and invalid are fixed values outside the cap");
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let m = Metrics::new(Caps { sni_values: 10, source_values: 10, sni_source_pairs: 100 });
        let key = m.key(Some("a.example"), None, true, false);
        m.bytes(&key).add_from_client(5);
        let outcome = Outcome { decision: Decision::Allowed, reason: "allowed", protocol: "tls", response_flags: "-" };
        m.finished(&"l".into(), &key, outcome, None, Duration::from_millis(3));
        let text = m.prometheus_text(0);
        assert!(text.contains("# TYPE snigress_connections_total counter\n"), "{text}");
        assert!(text.contains("# HELP snigress_connections_total Connections ended"), "{text}");
        assert!(text.contains("snigress_bytes_from_client_total{sni=\"a.example\",source=\"none\"} 5\n"), "{text}");
        assert!(text.contains("# TYPE snigress_connection_duration_seconds histogram\n"), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(m.openmetrics(0).ends_with("# EOF\n"));
        assert!(text.contains("snigress_build_info{version=\""), "{text}");
    }

    /// Series of a family in an exposition: its sample lines.
    fn series(text: &str, family: &str) -> usize {
        text.lines().filter(|l| l.starts_with(family) && l.as_bytes().get(family.len()) == Some(&b'{')).count()
    }

    #[test]
    fn every_family_holds_a_bounded_number_of_series() {
        let caps = Caps { sni_values: 40, source_values: 30, sni_source_pairs: 200 };
        let m = Metrics::with_istio(caps, true);
        let listener: Arc<str> = "l".into();
        // 60 callers each reaching 60 names, allowed and refused: 3 600
        // pairs, far past every cap.
        for caller in 0..60 {
            let p = Principal::parse(&format!("spiffe://cluster.local/ns/ns{caller}/sa/app")).unwrap();
            for name in 0..60 {
                let allowed = name % 2 == 0;
                let key = m.key(Some(&format!("host{name}.example")), Some(&p), allowed, true);
                m.bytes(&key).add_from_client(1);
                let (decision, reason) =
                    if allowed { (Decision::Allowed, "allowed") } else { (Decision::Denied, "policy_denied") };
                let outcome = Outcome { decision, reason, protocol: "tls", response_flags: "-" };
                m.finished(&listener, &key, outcome, None, Duration::from_millis(1));
            }
        }
        let text = m.prometheus_text(0);
        // Pairs within the cap, plus at most one overflow pair per name
        // value (the capped names, and __overflow__ itself).
        let bound = caps.sni_source_pairs + caps.sni_values + 1;
        for family in [
            "snigress_bytes_from_client_total",
            "snigress_bytes_to_client_total",
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_connections_opened_total",
        ] {
            let n = series(&text, family);
            assert!(n <= bound, "{family}: {n} series > {bound}");
        }
        assert!(series(&text, "istio_tcp_connections_closed_total") <= 2 * bound);
        // And each pair once per (decision, reason) it met: two kinds here
        // (names past the cap share __overflow__, allowed and refused).
        let n = series(&text, "snigress_connections_total");
        assert!(n <= 2 * bound, "connections: {n} series > {}", 2 * bound);
        assert!(n > caps.sni_source_pairs, "the cap is reached, not undershot: {n}");
        // Totals stay exact.
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("snigress_bytes_from_client_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 3600.0);
    }
}
