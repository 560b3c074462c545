//! Metrics as a scraper sees them on the metrics address: they agree with
//! the access log, bytes advance while a connection is open, label values
//! stay bounded, and the endpoint answers only what it should.

mod common;

use std::collections::HashMap;

use std::time::Duration;

use common::*;
use snigress::observe::access_log::Record;
use snigress::observe::metrics::{NONE, OVERFLOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn allowed_via_mtls(h: &Harness, sni: &str, payload: &[u8]) {
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let inner = h.inner(outer, sni).await.expect("inner");
    exchange(inner, payload).await.expect("exchange");
}

async fn allowed_via_passthrough(h: &Harness, sni: &str, payload: &[u8]) {
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    exchange(h.inner(tcp, sni).await.expect("inner"), payload).await.expect("exchange");
}

async fn refused_via(h: &Harness, listener: &str, sni: &str) {
    let result = if listener == "mtls" {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
        h.inner(outer, sni).await.map(|_| ())
    } else {
        let tcp = TcpStream::connect(h.addr(listener)).await.expect("connect");
        h.inner(tcp, sni).await.map(|_| ())
    };
    assert!(result.is_err(), "{sni} must be refused");
}

/// The `sni` label a record is counted under.
fn sni_label(r: &Record) -> String {
    match (&r.sni, r.reason) {
        (None, _) => NONE.to_owned(),
        (Some(_), "invalid_sni") => "invalid".to_owned(),
        (Some(s), _) => s.clone(),
    }
}

fn source_label(r: &Record) -> String {
    match (&r.namespace, &r.service_account) {
        (Some(ns), Some(sa)) => format!("{ns}/{sa}"),
        _ => NONE.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_agree_with_the_access_log() {
    let mut h = Harness::start().await;
    let mut expected_connections = 0;
    within("traffic", async {
        for i in 0..3 {
            allowed_via_mtls(&h, "a.allowed.test", &data(100_000 + i, 7)).await;
        }
        for _ in 0..2 {
            allowed_via_passthrough(&h, "b.allowed.test", &data(5_000, 8)).await;
        }
        refused_via(&h, "mtls", "blocked.allowed.test").await;
        refused_via(&h, "passthrough", "a.unlisted.test").await;
        refused_via(&h, "passthrough", "127.0.0.1").await; // no SNI
        let mut tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
        let _ = read_all(&mut tcp).await;
        // No client certificate: fails the outer handshake.
        if let Ok(mut outer) = outer_connect(h.addr("mtls"), &h.pki.roots(), None, &[]).await {
            let _ = outer.write_all(b"x").await;
            let _ = read_all(&mut outer).await;
        }
    })
    .await;
    expected_connections += 3 + 2 + 3 + 1 + 1;

    let mut records = Vec::new();
    for _ in 0..expected_connections {
        records.push(h.record().await);
    }
    let text = scrape(h.metrics_addr).await;

    // Every connection counter equals the number of records with its labels.
    let mut by_labels: HashMap<Vec<(String, String)>, f64> = HashMap::new();
    for r in &records {
        let labels = vec![
            ("decision".to_owned(), r.decision.to_owned()),
            ("listener".to_owned(), r.listener.clone()),
            ("protocol".to_owned(), r.protocol.unwrap_or("none").to_owned()),
            ("rule".to_owned(), r.matched_rule.clone().unwrap_or_else(|| "none".to_owned())),
            ("reason".to_owned(), r.reason.to_owned()),
            ("sni".to_owned(), sni_label(r)),
            ("source".to_owned(), source_label(r)),
        ];
        let mut labels = labels;
        labels.sort();
        *by_labels.entry(labels).or_default() += 1.0;
    }
    let mut scraped: HashMap<Vec<(String, String)>, f64> = HashMap::new();
    for (name, mut labels, value) in samples(&text) {
        if name == "snigress_connections_total" {
            labels.sort();
            scraped.insert(labels, value);
        }
    }
    assert_eq!(scraped, by_labels, "\n{text}");

    // Bytes per (sni, source) equal the records' sums.
    let mut bytes: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for r in &records {
        let e = bytes.entry((sni_label(r), source_label(r))).or_default();
        e.0 += r.bytes_from_client;
        e.1 += r.bytes_to_client;
    }
    for ((sni, source), (from, to)) in &bytes {
        let want = [("sni", sni.as_str()), ("source", source.as_str())];
        assert_eq!(sum(&text, "snigress_bytes_from_client_total", &want), *from as f64, "from {sni} {source}");
        assert_eq!(sum(&text, "snigress_bytes_to_client_total", &want), *to as f64, "to {sni} {source}");
    }
    assert!(bytes[&("a.allowed.test".to_owned(), "default/sleep".to_owned())].1 > 300_000);

    assert_eq!(sum(&text, "snigress_active_connections", &[]), 0.0);
    assert_eq!(sum(&text, "snigress_outer_handshake_failures_total", &[("reason", "outer_handshake_failed")]), 1.0);
    assert_eq!(sum(&text, "snigress_upstream_connects_total", &[("result", "ok")]), 5.0);
    assert_eq!(sum(&text, "snigress_dns_lookups_total", &[("result", "ok")]), 5.0);
    assert!(sum(&text, "snigress_dns_cache_hits_total", &[]) >= 3.0, "repeat names come from the cache");
    let hellos = records.iter().filter(|r| r.sni.is_some() || r.reason == "no_sni").count();
    assert_eq!(sum(&text, "snigress_client_hello_size_bytes_count", &[]), hellos as f64);
    assert_eq!(sum(&text, "snigress_connection_duration_seconds_count", &[]), expected_connections as f64);
    assert_eq!(sum(&text, "snigress_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let expiry = sum(&text, "snigress_certificate_expiry_timestamp_seconds", &[]);
    assert!(expiry > now + 86400.0, "the test PKI's gateway certificate is valid for a year: {expiry}");
    assert!(sum(&text, "snigress_process_open_fds", &[]) > 0.0);
    assert!(sum(&text, "snigress_process_resident_memory_bytes", &[]) > 1e6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_advance_while_a_connection_is_open() {
    let h = Harness::start().await;
    let outer = within("outer", h.outer("mtls", SLEEP, &[])).await.expect("outer");
    let mut inner = within("inner", h.inner(outer, "a.allowed.test")).await.expect("inner");
    let chunk = data(256 * 1024, 9);
    within("echo", async {
        inner.write_all(&chunk).await.expect("write");
        let mut back = vec![0u8; chunk.len()];
        inner.read_exact(&mut back).await.expect("echoed");
        assert!(back == chunk);
    })
    .await;
    // The connection is still open: the counters already show its bytes.
    let text = scrape(h.metrics_addr).await;
    let want = [("sni", "a.allowed.test"), ("source", "default/sleep")];
    assert!(sum(&text, "snigress_bytes_from_client_total", &want) >= chunk.len() as f64, "{text}");
    assert!(sum(&text, "snigress_bytes_to_client_total", &want) >= chunk.len() as f64, "{text}");
    assert_eq!(sum(&text, "snigress_active_connections", &[("listener", "mtls")]), 1.0);
    assert_eq!(sum(&text, "snigress_connections_total", &[]), 0.0, "not ended yet");
    drop(inner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_label_values_stay_bounded_and_totals_exact() {
    let options = Options { metrics: vec!["max_sni_values: 6".into()], ..Options::default() };
    let mut h = Harness::with(options).await;
    let refused_names: Vec<String> = (0..40).map(|i| format!("n{i}.unlisted.test")).collect();
    within("many names", async {
        for name in &refused_names {
            refused_via(&h, "passthrough", name).await;
        }
        // Allowed names still get their own series: refused names may only
        // take half of the budget.
        for name in ["a.allowed.test", "b.allowed.test", "deep.x.y.allowed.test"] {
            allowed_via_passthrough(&h, name, b"x").await;
        }
    })
    .await;
    for _ in 0..43 {
        h.record().await;
    }
    let text = scrape(h.metrics_addr).await;
    let mut values: Vec<String> = samples(&text)
        .into_iter()
        .filter(|(n, _, _)| n == "snigress_connections_total")
        .filter_map(|(_, labels, _)| labels.into_iter().find(|(k, _)| k == "sni").map(|(_, v)| v))
        .collect();
    values.sort();
    values.dedup();
    assert!(values.len() <= 7, "6 names plus the overflow value: {values:?}");
    for name in ["a.allowed.test", "b.allowed.test", "deep.x.y.allowed.test", OVERFLOW] {
        assert!(values.iter().any(|v| v == name), "{name} missing from {values:?}");
    }
    assert_eq!(sum(&text, "snigress_connections_total", &[]), 43.0, "totals stay exact");
    assert_eq!(sum(&text, "snigress_connections_total", &[("sni", OVERFLOW)]), 37.0, "40 refused, 3 admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_only_what_it_should() {
    let h = Harness::start().await;
    let addr = h.metrics_addr;
    within("endpoints", async {
        assert_eq!(http(addr, "GET", "/healthz", &[]).await.0, 200);
        assert_eq!(http(addr, "GET", "/readyz", &[]).await.0, 200);
        assert_eq!(http(addr, "GET", "/nope", &[]).await.0, 404);
        assert_eq!(http(addr, "POST", "/metrics", &[]).await.0, 405);

        let (status, head, body) = http(addr, "GET", "/metrics", &[]).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
        assert!(body.contains("# TYPE snigress_dns_cache_hits_total counter"), "{body}");
        assert!(!body.contains("# EOF"));

        let accept = [("Accept", "application/openmetrics-text;version=1.0.0,text/plain;q=0.5")];
        let (status, head, body) = http(addr, "GET", "/metrics", &accept).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
        assert!(body.ends_with("# EOF\n"));

        let (status, _, body) = http(addr, "HEAD", "/metrics", &[]).await;
        assert_eq!((status, body.as_str()), (200, ""));

        // An endless request head is cut off, not buffered.
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.write_all(b"GET /metrics HTTP/1.1\r\n").await;
        let filler = format!("X-Filler: {}\r\n", "a".repeat(1000));
        for _ in 0..20 {
            if tcp.write_all(filler.as_bytes()).await.is_err() {
                break;
            }
        }
        let (reply, _) = read_all(&mut tcp).await;
        assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 431"), "{}", String::from_utf8_lossy(&reply));
    })
    .await;
}

/// 1 000 clients that connect to the admin port and send nothing, or
/// trickle a request a byte at a time, reconnecting whenever they are let
/// go: the probes keep being answered, each within 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_under_a_thousand_idle_and_slow_clients() {
    const HOLDERS: usize = 1000;
    if let Err(why) = raise_fd_limit(4 * HOLDERS as u64) {
        println!("skipped: {why}");
        return;
    }
    let h = Harness::start().await;
    let addr = h.metrics_addr;
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let holders: Vec<_> = (0..HOLDERS)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let hold = async {
                    loop {
                        let Ok(mut tcp) = TcpStream::connect(addr).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        if i % 2 == 1 {
                            // Slow: a byte of a request every 300 ms, never the end.
                            for b in b"GET /metrics HTTP/1.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
                                if tcp.write_all(&[*b]).await.is_err() {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                        } else {
                            // Idle: nothing, until let go.
                            let _ = read_all(&mut tcp).await;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                tokio::select! {
                    () = hold => {}
                    () = stop.notified() => {}
                }
            })
        })
        .collect();
    // Let the holders fill the endpoint, then probe for a few seconds: long
    // enough for idle ones to be dropped at the first-byte timeout and
    // reconnect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        let path = if i % 2 == 0 { "/healthz" } else { "/readyz" };
        let asked = std::time::Instant::now();
        let (status, _, _) = within("probe", http(addr, "GET", path, &[])).await;
        let took = asked.elapsed();
        assert_eq!(status, 200, "{path}");
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = within("scrape", http(addr, "GET", "/metrics", &[])).await;
    assert!(status == 200 && body.contains("snigress_build_info"), "a scrape is answered too");
    println!("slowest of 60 probes under {HOLDERS} holders: {slowest:?}");
    assert!(slowest < Duration::from_millis(100), "slowest probe {slowest:?}");
    for _ in 0..HOLDERS {
        stop.notify_one();
    }
    for holder in holders {
        holder.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_compatible_families_mirror_the_native_counters() {
    // Off by default: no istio_ series at all.
    let h = Harness::start().await;
    allowed_via_passthrough(&h, "b.allowed.test", b"x").await;
    let text = scrape(h.metrics_addr).await;
    assert!(!text.contains("istio_"), "istio_ series without metrics.istio_compatible:\n{text}");
    drop(h);

    let mut h = Harness::with(Options { metrics: vec!["istio_compatible: true".into()], ..Options::default() }).await;
    within("traffic", async {
        allowed_via_mtls(&h, "a.allowed.test", &data(50_000, 3)).await;
        allowed_via_passthrough(&h, "b.allowed.test", &data(7_000, 4)).await;
        refused_via(&h, "mtls", "blocked.allowed.test").await; // policy
        refused_via(&h, "passthrough", "nx.allowed.test").await; // NXDOMAIN
        refused_via(&h, "passthrough", "closed.allowed.test").await; // connect fails
    })
    .await;
    for _ in 0..5 {
        h.record().await;
    }
    let text = scrape(h.metrics_addr).await;
    let native = |name: &str, want: &[(&str, &str)]| sum(&text, name, want);
    // Totals equal the native counters.
    assert_eq!(native("istio_tcp_connections_closed_total", &[]), native("snigress_connections_total", &[]));
    assert_eq!(native("istio_tcp_connections_opened_total", &[]), 5.0);
    assert_eq!(native("istio_tcp_received_bytes_total", &[]), native("snigress_bytes_from_client_total", &[]));
    assert_eq!(native("istio_tcp_sent_bytes_total", &[]), native("snigress_bytes_to_client_total", &[]));
    // Istio's labels, as the destination of the mesh hop sees them.
    let mesh = [
        ("reporter", "destination"),
        ("destination_service", "a.allowed.test"),
        ("destination_service_name", "a.allowed.test"),
        ("destination_service_namespace", "unknown"),
        ("source_principal", SLEEP),
        ("source_workload", "sleep"),
        ("source_workload_namespace", "default"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    assert_eq!(native("istio_tcp_connections_closed_total", &mesh), 1.0, "{text}");
    let want = [("sni", "a.allowed.test"), ("source", "default/sleep")];
    assert_eq!(native("istio_tcp_sent_bytes_total", &mesh), native("snigress_bytes_to_client_total", &want));
    let plain = [
        ("destination_service", "b.allowed.test"),
        ("connection_security_policy", "none"),
        ("source_workload", "unknown"),
        ("source_principal", "unknown"),
    ];
    assert_eq!(native("istio_tcp_connections_closed_total", &plain), 1.0, "{text}");
    for (sni, flags) in [("blocked.allowed.test", "UAEX"), ("nx.allowed.test", "NR"), ("closed.allowed.test", "UF")] {
        let want = [("destination_service", sni), ("response_flags", flags)];
        assert_eq!(native("istio_tcp_connections_closed_total", &want), 1.0, "{sni} {flags}\n{text}");
    }
}
