//! The `snigress` binary as a user runs it: help, exit codes, config errors
//! with their position, `check --sni`, `certs`, and `run` from start to
//! SIGTERM on the dev PKI.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use snigress::config::Config;
use tokio::net::TcpStream;

fn snigress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snigress")).args(args).output().expect("run snigress")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write file");
    path.display().to_string()
}

#[test]
fn help_describes_every_command() {
    let out = snigress(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in ["run", "check", "certs", "64"] {
        assert!(help.contains(word), "{word:?} missing from --help:\n{help}");
    }
    for (command, words) in
        [("run", &["--config", "SIGTERM"][..]), ("check", &["--sni", "--principal"]), ("certs", &["--out", "--client"])]
    {
        let out = snigress(&[command, "--help"]);
        assert!(out.status.success(), "{command} --help");
        let help = text(&out.stdout);
        for word in words {
            assert!(help.contains(word), "{word:?} missing from {command} --help:\n{help}");
        }
    }
    let out = snigress(&["run"]);
    assert_eq!(out.status.code(), Some(2), "a missing argument is a usage error");
}

#[test]
fn a_bad_config_exits_64_naming_key_line_and_column_before_binding() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The listener's port is held here: had snigress tried to bind before
    // validating, it would fail with a bind error (exit 1) instead.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let config = write(
        dir.path(),
        "bad.yaml",
        &format!(
            "listeners:\n  - name: pt\n    address: 127.0.0.1:{port}\n    mode: passthrough\npolicy:\n  allow: [ok.example]\n  alow: [typo.example]\n"
        ),
    );
    for command in ["run", "check"] {
        let out = snigress(&[command, "--config", &config]);
        assert_eq!(out.status.code(), Some(64), "{command}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("alow"), "{err}");
        assert!(err.contains("bad.yaml:7:3"), "{err}");
    }

    let missing = dir.path().join("missing.yaml").display().to_string();
    let out = snigress(&["check", "--config", &missing]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("missing.yaml"), "{}", text(&out.stderr));
}

#[test]
fn check_explains_decisions() {
    let out = snigress(&["check", "--config", "config/local.yaml", "--sni", "de.wikipedia.org"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("decision: allowed"), "{stdout}");
    assert!(stdout.contains("matched_rule: *.wikipedia.org"), "{stdout}");

    let out = snigress(&["check", "--config", "config/local.yaml", "--sni", "EN.Wikipedia.org."]);
    assert!(out.status.success(), "a refused name is still a valid config");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("sni: en.wikipedia.org"), "names are normalised: {stdout}");
    assert!(stdout.contains("decision: denied"), "{stdout}");
    assert!(stdout.contains("matched_rule: en.wikipedia.org"), "{stdout}");
    assert!(stdout.contains("deny wins"), "{stdout}");

    let out = snigress(&["check", "--config", "config/local.yaml", "--sni", "10.0.0.1"]);
    assert!(text(&out.stdout).contains("decision: denied"), "{}", text(&out.stdout));

    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "rules.yaml",
        "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  rules:\n    - name: pay\n      service_accounts: [payments/checkout]\n      allow: [api.stripe.com]\n",
    );
    let out = snigress(&[
        "check",
        "--config",
        &config,
        "--sni",
        "api.stripe.com",
        "--principal",
        "spiffe://cluster.local/ns/payments/sa/checkout",
    ]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("decision: allowed") && stdout.contains("pay:api.stripe.com"), "{stdout}");
    let out = snigress(&["check", "--config", &config, "--sni", "api.stripe.com"]);
    assert!(text(&out.stdout).contains("decision: denied"));
    let out = snigress(&["check", "--config", &config, "--sni", "a.example", "--principal", "not-a-spiffe-id"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn every_shipped_config_is_valid() {
    let out = snigress(&["check", "--config", "config/local.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The reference names production certificate paths that do not exist
    // here: everything but the files themselves is checked.
    let reference = Config::load(Path::new("config/snigress.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reference.listeners.len(), 2);
}

#[test]
fn certs_mints_a_mesh_pki_with_spiffe_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_dir = dir.path().join("pki").display().to_string();
    let out = snigress(&[
        "certs",
        "--out",
        &out_dir,
        "--client",
        "spiffe://cluster.local/ns/shop/sa/cart",
        "--client",
        "spiffe://cluster.local/ns/default/sa/sleep",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pki = Path::new(&out_dir);
    for f in ["ca.pem", "ca.key", "gateway.pem", "gateway.key", "client-shop-cart.pem", "client-default-sleep.key"] {
        assert!(pki.join(f).is_file(), "{f} missing; stdout:\n{}", text(&out.stdout));
    }
    let pem = std::fs::read(pki.join("client-shop-cart.pem")).expect("read");
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).map(|c: rustls::pki_types::CertificateDer| c);
    let principal = snigress::arrive::mtls::spiffe_id(&der.expect("PEM")).expect("SPIFFE ID");
    assert_eq!(principal.uri(), "spiffe://cluster.local/ns/shop/sa/cart");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pki.join("ca.key")).expect("meta").permissions().mode();
    assert_eq!(mode & 0o077, 0, "private keys are not readable by others");

    let again = snigress(&["certs", "--out", &out_dir]);
    assert_eq!(again.status.code(), Some(1), "existing files are not overwritten");
    assert!(text(&again.stderr).contains("--force"), "{}", text(&again.stderr));
    assert!(snigress(&["certs", "--out", &out_dir, "--force"]).status.success());
    let bad = snigress(&["certs", "--out", &out_dir, "--client", "https://nope"]);
    assert_eq!(bad.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mints_the_dev_pki_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "local.yaml",
        "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\n  - {name: mesh, address: 127.0.0.1:0, mode: mtls}\nmtls:\n  dev_pki: pki\npolicy:\n  allow: [\"*.allowed.test\"]\nshutdown:\n  grace_period: 0s\n",
    );
    let running = Running::start(&config);
    let warning = json(&running.diag("DEVELOPMENT PKI"));
    assert_eq!(warning["level"], "WARN");
    let client_cert = warning["fields"]["client_cert"].as_str().expect("client cert path").to_owned();
    assert!(Path::new(&client_cert).is_file(), "{client_cert}");

    let mut addrs = Vec::new();
    for _ in 0..2 {
        let line = json(&running.diag("listening"));
        let addr: SocketAddr = line["fields"]["address"].as_str().expect("address").parse().expect("socket address");
        addrs.push((line["fields"]["listener"].as_str().expect("name").to_owned(), addr));
    }
    let addr_of = |name: &str| addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("listener");

    // A refused name on each listener: the alert reaches the client and the
    // access record reaches stdout.
    let pki_dir = dir.path().join("pki");
    let mesh_roots = {
        let mut store = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_file_iter(pki_dir.join("ca.pem")).expect("CA") {
            store.add(c.expect("cert")).expect("root");
        }
        std::sync::Arc::new(store)
    };
    let identity = {
        let certs = rustls::pki_types::pem::PemObject::pem_file_iter(&client_cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("certs");
        let key_path = warning["fields"]["client_key"].as_str().expect("key path");
        (certs, rustls::pki_types::pem::PemObject::from_pem_file(key_path).expect("key"))
    };
    let internet = Internet::new();
    within("refusals through the binary", async {
        let tcp = TcpStream::connect(addr_of("pt")).await.expect("connect");
        let e = inner_connect(tcp, "a.denied.test", internet.roots.clone()).await.expect_err("refused");
        assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");

        let outer = outer_connect(addr_of("mesh"), &mesh_roots, Some(identity), &[]).await.expect("outer mTLS");
        let e = inner_connect(outer, "b.denied.test", internet.roots.clone()).await.expect_err("refused");
        assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    })
    .await;

    let mut records: Vec<serde_json::Value> =
        (0..2).map(|_| json(&running.stdout.recv_timeout(PATIENCE).expect("access record on stdout"))).collect();
    records.sort_by_key(|r| r["sni"].as_str().unwrap_or("").to_owned());
    assert_eq!(records[0]["sni"], "a.denied.test");
    assert_eq!(records[0]["listener"], "pt");
    assert_eq!(records[0]["decision"], "denied");
    assert_eq!(records[1]["sni"], "b.denied.test");
    assert_eq!(records[1]["principal"], "spiffe://cluster.local/ns/default/sa/sleep");

    let status = running.stop();
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
}

#[test]
fn run_reports_a_port_in_use_and_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let config = write(
        dir.path(),
        "c.yaml",
        &format!("listeners:\n  - {{name: pt, address: 127.0.0.1:{port}, mode: passthrough}}\n"),
    );
    let out = snigress(&["run", "--config", &config]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("pt"), "{err}");
}

#[test]
fn sighup_reloads_and_a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = |allow: &str| {
        format!(
            "listeners:\n  - {{name: pt, address: 127.0.0.1:0, mode: passthrough}}\npolicy:\n  allow: [{allow}]\nshutdown:\n  grace_period: 10m\n"
        )
    };
    let path = write(dir.path(), "c.yaml", &config("a.example"));
    let running = Running::start(&path);
    running.diag("listening");
    running.signal("HUP");
    running.diag("SIGHUP: reloading");
    write(dir.path(), "c.yaml", &config("b.example"));
    running.diag("reloaded");
    write(dir.path(), "c.yaml", "listeners: [");
    running.diag("reload refused");

    // The first SIGTERM starts a drain with a long grace period; the second
    // ends the process at once, and its status says the drain was cut.
    running.signal("TERM");
    running.diag("draining");
    running.signal("TERM");
    let status = running.exit_status();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
}

#[test]
fn an_invalid_log_level_is_a_usage_error() {
    let out = snigress(&["--log-level", "snigress=loud", "check", "--config", "config/local.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("invalid log filter"), "{}", text(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_snigress"))
        .args(["check", "--config", "config/local.yaml"])
        .env("SNIGRESS_LOG", "=")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "the environment variable too: {}", text(&out.stderr));
}

/// `Max open files` of a process: (soft, hard).
fn fd_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[test]
fn a_low_soft_descriptor_limit_is_raised_and_a_low_hard_one_is_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(dir.path(), "c.yaml", "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\n");
    let under = |limits: &str| {
        let script = format!("{limits} && exec '{}' run --config '{config}'", env!("CARGO_BIN_EXE_snigress"));
        Running::with_command(Command::new("sh").args(["-c", &script]))
    };

    // A shell's 1 024 (here 256) soft limit under a high hard limit.
    let (_, hard) = fd_limits(std::process::id());
    let running = under("ulimit -Sn 256");
    running.diag("listening");
    assert_eq!(fd_limits(running.child.id()), (hard, hard), "the soft limit is raised to the hard one");
    drop(running);

    // A hard limit too low for limits.max_connections (10 000 by default,
    // two descriptors each).
    let running = under("ulimit -Sn 256 && ulimit -Hn 512");
    let warning = json(&running.diag("open-file limit cannot hold"));
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["fields"]["limit"], 512);
    assert_eq!(warning["fields"]["needed"], 2 * 10_000 + 256);
    running.diag("listening");
    assert_eq!(fd_limits(running.child.id()), (512, 512));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_never_stalls_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "c.yaml",
        "listeners:\n  - {name: mesh, address: 127.0.0.1:0, mode: mtls}\nmtls:\n  dev_pki: pki\nmetrics:\n  address: 127.0.0.1:0\naccess_log:\n  path: access.log\n",
    );
    // Trace level: every outer handshake writes dozens of diagnostic lines.
    let mut child = Command::new(env!("CARGO_BIN_EXE_snigress"))
        .args(["--log-level", "trace", "run", "--config", &config])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let (mut metrics, mut mesh) = (None, None);
    while metrics.is_none() || mesh.is_none() {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).expect("stderr") > 0, "exited early");
        if line.contains("serving /metrics") {
            metrics = json(&line)["fields"]["address"].as_str().map(|a| a.parse::<SocketAddr>().expect("addr"));
        } else if line.contains("\"listening\"") {
            mesh = json(&line)["fields"]["address"].as_str().map(|a| a.parse::<SocketAddr>().expect("addr"));
        }
    }
    let (metrics, mesh) = (metrics.expect("metrics"), mesh.expect("listener"));
    // From here on nobody reads stderr: its pipe fills within a few hundred
    // lines. Handshakes go on until lines are being dropped, and after.
    let pki = dir.path().join("pki");
    let roots = roots_from(&pki.join("ca.pem"));
    let identity = || load_pair(&pki.join("client-default-sleep.pem"), &pki.join("client-default-sleep.key"));
    let mut handshakes = 0;
    let mut dropped = 0.0;
    within("handshakes while stderr is blocked", async {
        while dropped == 0.0 || handshakes < 200 {
            for _ in 0..50 {
                outer_connect(mesh, &roots, Some(identity()), &[]).await.expect("outer handshake");
                handshakes += 1;
            }
            dropped = sum(&scrape(metrics).await, "snigress_log_dropped_lines_total", &[]);
        }
    })
    .await;
    println!("{handshakes} handshakes, {dropped} diagnostic lines dropped");
    assert!(handshakes <= 20_000, "lines are dropped, not queued without bound");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_bare_relative_config_path_is_not_reloaded_for_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = "listeners:\n  - {name: mesh, address: 127.0.0.1:0, mode: mtls}\nmtls:\n  dev_pki: pki\n";
    write(dir.path(), "c.yaml", text);
    let running = Running::with_command(Command::new(env!("CARGO_BIN_EXE_snigress")).current_dir(dir.path()).args([
        "--log-level",
        "snigress=debug",
        "run",
        "--config",
        "c.yaml",
    ]));
    running.diag("listening");
    // The same text written again: an event, and nothing to apply.
    write(dir.path(), "c.yaml", text);
    let line = running.diag("reload");
    assert!(line.contains("nothing changed"), "the first reload line: {line}");
    // A real change still is one.
    write(dir.path(), "c.yaml", &format!("{text}policy:\n  allow: [a.example]\n"));
    let line = running.diag("reload");
    assert!(line.contains("reloaded"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_all_in_the_access_log_and_few_in_the_diagnostics() {
    const REFUSED: usize = 300;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "c.yaml",
        "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\nlimits:\n  max_connections_per_source: 1\ntimeouts:\n  first_byte: 1m\n  client_hello: 1m\n",
    );
    let running = Running::start(&config);
    let addr: SocketAddr =
        json(&running.diag("listening"))["fields"]["address"].as_str().expect("address").parse().expect("addr");
    let _held = TcpStream::connect(addr).await.expect("the one slot");
    let started = std::time::Instant::now();
    for _ in 0..REFUSED {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let _ = read_all(&mut tcp).await;
    }
    for _ in 0..REFUSED {
        let record = json(&running.stdout.recv_timeout(PATIENCE).expect("an access record per refusal"));
        assert_eq!(record["reason"], "source_limit");
    }
    let burst = started.elapsed();
    // One more, a second after the first line: its line counts the rest.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = read_all(&mut tcp).await;
    // Every refusal is a diagnostic line or counted in a later line's
    // summary; there are few lines.
    let (mut lines, mut accounted) = (0u64, 0u64);
    while accounted < REFUSED as u64 + 1 {
        let line = json(&running.diag("refusing a connection at accept"));
        lines += 1;
        accounted += 1 + line["fields"]["suppressed"].as_u64().expect("suppressed");
    }
    assert_eq!(accounted, REFUSED as u64 + 1);
    assert!(lines <= 2 + burst.as_secs(), "{lines} lines for {} refusals in {burst:?}", REFUSED + 1);
}

#[test]
fn check_names_the_route_an_allowed_name_leaves_by() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "routes.yaml",
        "listeners:\n  - {name: l, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  allow: [\"*.example.com\"]\nroutes:\n  - name: split\n    match: {sources: [10.0.0.0/8]}\n    next_hop: [\"gw1.internal:8443\", \"10.9.9.9:8443\"]\n    proxy_protocol: v2\n  - name: partner-ip\n    match: {names: [api.example.com]}\n    bind: 203.0.113.7\n    mark: 7\n",
    );
    let route = |args: &[&str]| {
        let mut all = vec!["check", "--config", &config];
        all.extend_from_slice(args);
        let out = snigress(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).lines().find_map(|l| l.strip_prefix("route: ").map(str::to_owned)).unwrap_or_default()
    };
    assert_eq!(
        route(&["--sni", "api.example.com", "--source", "10.1.2.3"]),
        "split (next hop gw1.internal:8443 then 10.9.9.9:8443, PROXY v2 first)"
    );
    assert_eq!(route(&["--sni", "api.example.com"]), "partner-ip (direct from 203.0.113.7, mark 7)");
    assert_eq!(route(&["--sni", "www.example.com"]), "(none: direct to the name's addresses)");
    assert_eq!(route(&["--sni", "denied.test"]), "", "a denied name leaves by no route");
}

#[test]
fn check_shows_audit_outcomes_as_such() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "audit.yaml",
        "listeners:\n  - {name: l, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  mode: audit\n  allow: [\"*.example.com\"]\n  deny: [bad.example.com]\n",
    );
    let out = snigress(&["check", "--config", &config, "--sni", "bad.example.com"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("decision: allowed (audit mode)\n") && stdout.contains("audit: would_deny\n"), "{stdout}");
    assert!(stdout.contains("audit_reason: policy_denied\nmatched_rule: bad.example.com\n"), "{stdout}");
    let out = snigress(&["check", "--config", &config, "--sni", "www.example.com"]);
    assert!(!text(&out.stdout).contains("audit"), "an allowed name is not an audit outcome");
}

#[test]
fn check_warns_about_patterns_that_cannot_apply() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "warn.yaml",
        "listeners:\n  - {name: l, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  allow: [api.example.com, \"*.cdn.example.com\", ok.example.org, ok.example.org]\n  deny: [\"*.example.com\"]\n  rules:\n    - name: r\n      principals: [\"spiffe://elsewhere.example/ns/a/sa/b\"]\n      allow: [x.example.net]\n",
    );
    let out = snigress(&["check", "--config", &config]);
    assert!(out.status.success(), "warnings do not fail the check: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for wanted in [
        "warning: policy.allow: \"api.example.com\" can never allow anything: deny \"*.example.com\" covers it",
        "warning: policy.allow: \"*.cdn.example.com\" can never allow anything",
        "warning: policy.allow: \"ok.example.org\" is listed twice",
        "warning: rule \"r\": principal \"elsewhere.example/ns/a/sa/b\" is in trust domain \"elsewhere.example\"",
    ] {
        assert!(stdout.contains(wanted), "{wanted}\n{stdout}");
    }
    let clean = snigress(&["check", "--config", "config/local.yaml"]);
    assert!(!text(&clean.stdout).contains("warning:"), "{}", text(&clean.stdout));
}

/// An access log of a few connections, as the gateway writes it.
fn crafted_log() -> String {
    let rec = |time: &str, sni: &str, principal: Option<&str>, decision: &str, reason: &str, audit: Option<&str>| {
        serde_json::json!({
            "start_time": time, "listener": "mesh", "mode": "mtls", "sni": sni, "principal": principal,
            "decision": decision, "reason": reason, "audit": audit, "termination": "client_closed"
        })
        .to_string()
    };
    let sleep = Some("spiffe://cluster.local/ns/default/sa/sleep");
    let mut lines = Vec::new();
    for (i, sni) in
        ["a.example.com", "a.example.com", "b.example.com", "c.example.com", "example.com"].iter().enumerate()
    {
        lines.push(rec(&format!("2026-12-01T10:0{i}:00.000Z"), sni, None, "allowed", "allowed", None));
    }
    for sni in ["x.github.io", "y.github.io", "z.github.io"] {
        lines.push(rec("2026-12-01T11:00:00.000Z", sni, None, "allowed", "allowed", None));
    }
    lines.push(rec("2026-12-01T12:00:00.000Z", "api.stripe.com", sleep, "allowed", "allowed", None));
    lines.push(rec("2026-12-01T12:01:00.000Z", "new.partner.test", sleep, "allowed", "allowed", Some("would_deny")));
    lines.push(rec("2026-12-01T12:02:00.000Z", "evil.example.net", None, "denied", "policy_denied", None));
    lines.push("not a record".to_owned());
    lines.join("\n") + "\n"
}

#[test]
fn policy_suggest_folds_names_but_never_over_a_public_suffix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = write(dir.path(), "access.log", &crafted_log());
    let out = snigress(&["policy", "suggest", "--access-log", &log, "--wildcard-threshold", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.contains("- \"*.example.com\"  # 4 connections, 3 names, first 2026-12-01T10:00:00.000Z, last 2026-12-01T10:03:00.000Z"), "{yaml}");
    assert!(yaml.contains("- \"example.com\"  # 1 connections"), "the domain itself stays exact: {yaml}");
    for exact in ["x.github.io", "y.github.io", "z.github.io", "new.partner.test", "api.stripe.com"] {
        assert!(yaml.contains(&format!("- \"{exact}\"")), "{exact}: {yaml}");
    }
    assert!(!yaml.contains("*.github.io") && !yaml.contains("evil.example.net"), "{yaml}");
    assert!(yaml.contains("from 11 access records (1 other lines skipped)"), "{yaml}");
    // What it prints is a policy snigress accepts.
    let config = format!("listeners:\n  - {{name: l, address: 127.0.0.1:0, mode: passthrough}}\n{yaml}");
    let path = write(dir.path(), "suggested.yaml", &config);
    assert!(snigress(&["check", "--config", &path]).status.success());

    // Per identity, from a gzip file, above a minimum count.
    let gz = dir.path().join("access.log.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).expect("gz"), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, crafted_log().as_bytes()).expect("gzip");
    enc.finish().expect("gzip");
    let gz = gz.display().to_string();
    let out = snigress(&["policy", "suggest", "--access-log", &gz, "--per-identity"]);
    let yaml = text(&out.stdout);
    assert!(yaml.contains("  rules:\n    - name: default-sleep\n      principals: [\"spiffe://cluster.local/ns/default/sa/sleep\"]\n      allow:\n        - \"api.stripe.com\""), "{yaml}");
    let out = snigress(&[
        "policy",
        "suggest",
        "--access-log",
        &gz,
        "--per-identity",
        "--min-connections",
        "2",
        "--wildcard-threshold",
        "0",
    ]);
    let yaml = text(&out.stdout);
    assert!(yaml.contains("    - \"a.example.com\"  # 2 connections") && !yaml.contains("rules:"), "{yaml}");
}

#[test]
fn policy_diff_reports_what_a_change_would_deny_with_its_exit_code() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = write(dir.path(), "access.log", &crafted_log());
    let listener = "listeners:\n  - {name: l, address: 127.0.0.1:0, mode: passthrough}\n";
    let narrow =
        write(dir.path(), "narrow.yaml", &format!("{listener}policy:\n  allow: [\"*.example.com\", example.com]\n"));
    let out = snigress(&["policy", "diff", "--config", &narrow, "--access-log", &log]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("newly denied: 4 connections, 4 names"), "{report}");
    assert!(report.contains("  api.stripe.com  spiffe://cluster.local/ns/default/sa/sleep  1"), "{report}");
    assert!(report.contains("  x.github.io  (no identity)  1"), "{report}");
    assert!(report.contains("newly allowed: 0 connections"), "{report}");

    let wide = write(
        dir.path(),
        "wide.yaml",
        &format!(
            "{listener}policy:\n  allow: [\"*.example.com\", example.com, \"*.example.net\", x.github.io, y.github.io, z.github.io, api.stripe.com, new.partner.test]\n"
        ),
    );
    let out = snigress(&["policy", "diff", "--config", &wide, "--access-log", &log]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let report = text(&out.stdout);
    assert!(report.contains("newly allowed: 2 connections, 2 names"), "{report}");
    // Against another config instead of the recorded decisions.
    let out = snigress(&["policy", "diff", "--config", &narrow, "--against", &wide, "--access-log", &log]);
    assert!(text(&out.stdout).contains("newly denied: 6 connections, 6 names"), "{}", text(&out.stdout));
    let bad = write(dir.path(), "bad.yaml", "listeners: []\n");
    assert_eq!(snigress(&["policy", "diff", "--config", &bad, "--access-log", &log]).status.code(), Some(64));
}

#[test]
fn policy_suggest_keeps_rule_names_unique_across_trust_domains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = write(
        dir.path(),
        "two.log",
        "{\"sni\":\"a.example.com\",\"principal\":\"spiffe://cluster.local/ns/x/sa/y\",\"decision\":\"allowed\",\"reason\":\"allowed\"}\n\
         {\"sni\":\"b.example.com\",\"principal\":\"spiffe://other.td/ns/x/sa/y\",\"decision\":\"allowed\",\"reason\":\"allowed\"}\n",
    );
    let out = snigress(&["policy", "suggest", "--access-log", &log, "--per-identity"]);
    let yaml = text(&out.stdout);
    assert!(yaml.contains("- name: x-y\n") && yaml.contains("- name: x-y-1\n"), "{yaml}");
    let config = write(
        dir.path(),
        "s.yaml",
        &format!("listeners:\n  - {{name: l, address: 127.0.0.1:0, mode: passthrough}}\n{yaml}"),
    );
    let check = snigress(&["check", "--config", &config]);
    assert!(check.status.success(), "{}", text(&check.stderr));
}

/// `--workers 1` serves on one thread (a current-thread runtime) with the
/// same behaviour; 0 is a usage error that names the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_and_zero_workers_is_a_usage_error() {
    let zero = snigress(&["run", "--config", "config/local.yaml", "--workers", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(text(&zero.stderr).contains("--workers"), "{}", text(&zero.stderr));

    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "one.yaml",
        "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  allow: [\"*.allowed.test\"]\nshutdown:\n  grace_period: 0s\n",
    );
    let running = Running::with_args(&["run", "--config", &config, "--workers", "1"]);
    let started = json(&running.diag("worker"));
    assert_eq!(started["fields"]["workers"], 1, "{started}");
    let line = json(&running.diag("listening"));
    let addr: SocketAddr = line["fields"]["address"].as_str().expect("address").parse().expect("socket address");
    let internet = Internet::new();
    within("a refusal on one worker", async {
        for name in ["a.denied.test", "b.denied.test"] {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let e = inner_connect(tcp, name, internet.roots.clone()).await.expect_err("refused");
            assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
        }
    })
    .await;
    for name in ["a.denied.test", "b.denied.test"] {
        let record = json(&running.stdout.recv_timeout(PATIENCE).expect("access record"));
        assert_eq!((record["sni"].as_str(), record["decision"].as_str()), (Some(name), Some("denied")));
    }
    assert!(running.stop().success());
}
