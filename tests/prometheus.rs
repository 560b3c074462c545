//! A real Prometheus scrapes a running gateway: the values it stores match
//! the traffic, `promtool check metrics` accepts the exposition, and every
//! PromQL expression shipped in the Grafana dashboard and the alert rules
//! evaluates without error against it.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool`), which
//! `.ci/run` installs; elsewhere the test skips when it is missing.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::net::TcpStream;

fn on_path(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Whether Prometheus and promtool are installed. `.ci/run` installs them
/// and sets SNIGRESS_REQUIRE_TOOLS, so in CI a missing tool fails the test
/// instead of skipping it.
fn have_prometheus() -> bool {
    if on_path("prometheus") && on_path("promtool") {
        return true;
    }
    assert!(
        std::env::var_os("SNIGRESS_REQUIRE_TOOLS").is_none(),
        "prometheus and promtool are required here (apt-get install prometheus)"
    );
    println!("skipped: this test needs Debian's prometheus package (prometheus, promtool); .ci/run installs it");
    false
}

/// A Prometheus server on loopback scraping one target every second.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: snigress\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        // Prometheus cannot report a kernel-chosen port: take a free one and
        // try again with another if it was taken meanwhile.
        for _ in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start prometheus");
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: the port was probably taken
                }
                if curl(&format!("{base}/-/ready")).is_some() {
                    return Prometheus { child, base, _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("prometheus did not become ready");
    }

    /// Runs an instant query; the JSON response.
    fn query(&self, expr: &str) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "-G", "--data-urlencode", &format!("query={expr}"), &format!("{}/api/v1/query", self.base)])
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{expr}: not JSON ({e})"))
    }

    /// The sum of an instant vector's values (0 when empty).
    fn value(&self, expr: &str) -> f64 {
        let v = self.query(expr);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"]
            .as_array()
            .map(|r| r.iter().filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok()).sum())
            .unwrap_or(0.0)
    }

    /// Polls until `expr` evaluates to `want` (bounded).
    fn wait_for(&self, expr: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.value(expr);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{expr} = {got}, expected {want}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-sf", "--max-time", "5", url]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every `expr` string in a Grafana dashboard, Grafana's variables replaced.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out.into_iter()
        .map(|e| e.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h"))
        .collect()
}

#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    expr: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_what_the_gateway_did() {
    if !have_prometheus() {
        return;
    }
    // With Istio's families too, so promtool and Prometheus see them.
    let mut h = Harness::with(Options { metrics: vec!["istio_compatible: true".into()], ..Options::default() }).await;

    // Traffic: allowed and refused names through both listener kinds.
    within("traffic", async {
        for i in 0..3 {
            let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
            exchange(h.inner(outer, "a.allowed.test").await.expect("inner"), &data(50_000 + i, 1)).await.expect("x");
        }
        for _ in 0..2 {
            let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
            exchange(h.inner(tcp, "b.allowed.test").await.expect("inner"), b"hello").await.expect("x");
        }
        for _ in 0..2 {
            let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
            assert!(h.inner(outer, "blocked.allowed.test").await.is_err());
        }
        let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
        assert!(h.inner(tcp, "a.unlisted.test").await.is_err());
    })
    .await;
    let mut records = Vec::new();
    for _ in 0..8 {
        records.push(h.record().await);
    }
    let bytes = |sni: &str, f: fn(&snigress::observe::access_log::Record) -> u64| -> f64 {
        records.iter().filter(|r| r.sni.as_deref() == Some(sni)).map(f).sum::<u64>() as f64
    };
    let a_from = bytes("a.allowed.test", |r| r.bytes_from_client);
    let a_to = bytes("a.allowed.test", |r| r.bytes_to_client);

    // The exposition passes promtool's checks.
    let text = scrape(h.metrics_addr).await;
    tokio::task::block_in_place(|| {
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        promtool.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules_path = root.join("deploy/prometheus/rules.yaml");
    let metrics_addr = h.metrics_addr;
    tokio::task::block_in_place(|| {
        let prom = Prometheus::start(metrics_addr, &rules_path);

        // Scraped values match the traffic.
        prom.wait_for(
            r#"sum(snigress_connections_total{sni="a.allowed.test",decision="allowed",listener="mtls"})"#,
            3.0,
        );
        prom.wait_for(
            r#"sum(snigress_connections_total{sni="b.allowed.test",decision="allowed",listener="passthrough",source="none"})"#,
            2.0,
        );
        prom.wait_for(r#"sum(snigress_connections_total{decision="denied",reason="policy_denied"})"#, 3.0);
        prom.wait_for(r#"sum(snigress_connections_total{sni="blocked.allowed.test",source="default/sleep"})"#, 2.0);
        prom.wait_for(r#"sum(snigress_bytes_from_client_total{sni="a.allowed.test",source="default/sleep"})"#, a_from);
        prom.wait_for(r#"sum(snigress_bytes_to_client_total{sni="a.allowed.test",source="default/sleep"})"#, a_to);
        // Istio's families, and a query of Istio's standard Grafana
        // dashboards (Istio Service Dashboard, "TCP Received Bytes" with
        // $qrep=destination and $service=a.allowed.test).
        prom.wait_for(
            r#"sum(istio_tcp_received_bytes_total{reporter="destination",destination_service="a.allowed.test"})"#,
            a_from,
        );
        prom.wait_for(r#"sum(istio_tcp_connections_closed_total{destination_service_name="blocked.allowed.test",response_flags="UAEX"})"#, 2.0);
        // Two scrapes of the settled counters, so rate() has points.
        prom.wait_for(r#"count_over_time(snigress_connections_total{sni="a.allowed.test"}[1m]) >= bool 2"#, 1.0);

        // Every dashboard expression evaluates; the main panels show data.
        let dashboard: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("deploy/grafana/snigress-dashboard.json")).expect("dashboard"),
        )
        .expect("dashboard is JSON");
        let exprs = dashboard_exprs(&dashboard);
        assert!(exprs.len() >= 15, "{} expressions", exprs.len());
        for expr in &exprs {
            let v = prom.query(expr);
            assert_eq!(v["status"], "success", "dashboard expression {expr}: {v}");
        }
        let istio = r#"sum(irate(istio_tcp_received_bytes_total{reporter=~"destination", destination_service=~"a.allowed.test"}[1m]))"#;
        let v = prom.query(istio);
        assert_eq!(v["status"], "success", "{istio}: {v}");
        assert!(!v["data"]["result"].as_array().is_none_or(|r| r.is_empty()), "{istio} has no data: {v}");
        for expr in exprs.iter().filter(|e| e.contains("sum by (sni) (rate(snigress_connections_total[")) {
            let v = prom.query(expr);
            assert!(!v["data"]["result"].as_array().is_none_or(|r| r.is_empty()), "{expr} has no data: {v}");
        }

        // The alert rules pass promtool, load into Prometheus, and evaluate.
        let check = Command::new("promtool").args(["check", "rules"]).arg(&rules_path).output().expect("promtool");
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
        let rules: RuleFile =
            serde_saphyr::from_str(&std::fs::read_to_string(&rules_path).expect("rules")).expect("rules YAML");
        for rule in rules.groups.iter().flat_map(|g| &g.rules) {
            let v = prom.query(&rule.expr);
            assert_eq!(v["status"], "success", "rule expression {}: {v}", rule.expr);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let loaded: Value = serde_json::from_str(&curl(&format!("{}/api/v1/rules", prom.base)).expect("rules API"))
                .expect("rules JSON");
            let health: Vec<String> = loaded["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .map(|r| r["health"].as_str().unwrap_or("").to_owned())
                .collect();
            let count = rules.groups.iter().map(|g| g.rules.len()).sum::<usize>();
            if health.len() == count && health.iter().all(|h| h == "ok") {
                break;
            }
            assert!(Instant::now() < deadline, "rules not all healthy: {loaded}");
            std::thread::sleep(Duration::from_millis(250));
        }
    });
}
