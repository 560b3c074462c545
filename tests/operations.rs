//! Operating the gateway: live reload of policy and certificates (file
//! change, ConfigMap symlink swap, broken files, restart-only changes),
//! drain on shutdown, connection limits and lifetimes, slow and abusive
//! peers, ECH.

mod common;

use std::time::Duration;

use common::*;
use rustls::AlertDescription;
use snigress::observe::access_log::Record;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Echoes `payload` over an open inner stream and checks it comes back.
async fn ping<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, payload: &[u8]) {
    stream.write_all(payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, payload);
}

async fn through_passthrough(h: &Harness, sni: &str) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(h.addr("passthrough")).await?;
    exchange(h.inner(tcp, sni).await?, b"hi").await
}

async fn refused_alert(h: &Harness, sni: &str) -> Option<AlertDescription> {
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    let e = h.inner(tcp, sni).await.map(|_| ()).expect_err("must be refused");
    alert_of(&e)
}

fn allowing(allow: &str) -> Options {
    Options { allow: Some(allow.to_owned()), ..Options::default() }
}

async fn records(h: &mut Harness, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(h.record().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_applies_to_the_next_connection_and_spares_those_in_flight() {
    let mut h = Harness::start().await;
    let outer = within("outer", h.outer("mtls", SLEEP, &[])).await.expect("outer");
    let mut in_flight = within("inner", h.inner(outer, "a.allowed.test")).await.expect("inner");
    within("ping", ping(&mut in_flight, b"before")).await;

    h.write_config(&h.config_with(&allowing("[\"*.team.test\", b.allowed.test]")));
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;

    assert_eq!(within("now refused", refused_alert(&h, "a.allowed.test")).await, Some(AlertDescription::AccessDenied));
    within("still allowed", through_passthrough(&h, "b.allowed.test")).await.expect("b.allowed.test is allowed");

    // The connection allowed before the reload keeps working to its end.
    within("ping", ping(&mut in_flight, b"after the reload")).await;
    let reply = within("close", exchange(in_flight, b"")).await.expect("close cleanly");
    assert_eq!(reply, b"sni=a.allowed.test\n");

    let rs = records(&mut h, 3).await;
    let find = |sni: &str, reason: &str| rs.iter().any(|r| r.sni.as_deref() == Some(sni) && r.reason == reason);
    assert!(find("a.allowed.test", "policy_denied"), "{rs:?}");
    assert!(find("b.allowed.test", "allowed"), "{rs:?}");
    let kept = rs.iter().find(|r| r.listener == "mtls").expect("the in-flight connection's record");
    assert_eq!(kept.decision, "allowed");
    assert!(kept.bytes_to_client > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_running_config() {
    let h = Harness::start().await;
    h.write_config("listeners: [\n  - name: x\n");
    // The watcher tried it (and keeps trying for a while before counting).
    within("the watcher's attempt", async {
        while h.reloader.attempts() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within("old policy", through_passthrough(&h, "a.allowed.test")).await.expect("old policy in force");

    // Each error names its place in the file.
    let e = h.reloader.reload("test").expect_err("still broken");
    assert!(e.to_string().contains("snigress.yaml:"), "{e}");
    h.write_config(&h.config_with(&allowing("[\"a.*.test\"]")));
    let e = h.reloader.reload("test").expect_err("bad pattern");
    assert!(e.to_string().contains("invalid pattern") && e.to_string().contains("snigress.yaml:"), "{e}");
    h.write_config(&h.config_with(&Options::default()).replace("gateway.pem", "nowhere.pem"));
    let e = h.reloader.reload("test").expect_err("missing certificate");
    assert!(e.to_string().contains("nowhere.pem"), "{e}");
    let empty_ca = h.pki.path("empty-ca.pem");
    std::fs::write(&empty_ca, "no certificates here\n").expect("write");
    h.write_config(&h.config_with(&Options::default()).replace("ca.pem", "empty-ca.pem"));
    let e = h.reloader.reload("test").expect_err("CA bundle without a certificate");
    assert!(e.to_string().contains("client_ca"), "{e}");
    within("old policy", through_passthrough(&h, "a.allowed.test")).await.expect("old policy in force");

    // A listener change is refused as a whole, not half-applied.
    let moved =
        h.config_with(&allowing("[b.allowed.test]")).replacen("address: 127.0.0.1:0", "address: 127.0.0.1:1", 1);
    h.write_config(&moved);
    let e = h.reloader.reload("test").expect_err("restart needed");
    assert!(e.to_string().contains("listeners") && e.to_string().contains("restart"), "{e}");
    within("old policy", through_passthrough(&h, "a.allowed.test")).await.expect("the new policy was not applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_picked_up() {
    let h = Harness::with(Options { configmap: true, ..Options::default() }).await;
    within("before", through_passthrough(&h, "a.allowed.test")).await.expect("allowed");
    let dir = h.config_path.parent().expect("configmap dir").to_owned();
    swap_configmap(&dir, "..v2", &h.config_with(&allowing("[b.allowed.test]")));
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;
    assert_eq!(within("after", refused_alert(&h, "a.allowed.test")).await, Some(AlertDescription::AccessDenied));
}

type Roots = std::sync::Arc<rustls::RootCertStore>;

/// A full mTLS + inner TLS exchange, trusting `roots` for the gateway
/// and presenting `client`'s certificate for SLEEP.
async fn handshake(h: &Harness, roots: &Roots, client: &Pki) -> std::io::Result<Vec<u8>> {
    let outer = outer_connect(h.addr("mtls"), roots, Some(client.client(SLEEP)), &[]).await?;
    let inner = inner_connect(outer, "a.allowed.test", h.internet.roots.clone()).await?;
    exchange(inner, b"x").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_cutting_connections() {
    let h = Harness::start().await;
    let old = &h.pki;
    let new = Pki::mint();
    // Read now: the old directory's files are about to be replaced.
    let (old_roots, new_roots) = (old.roots(), new.roots());
    let outer = within("outer", h.outer("mtls", SLEEP, &[])).await.expect("outer");
    let mut in_flight = within("inner", h.inner(outer, "a.allowed.test")).await.expect("inner");
    within("ping", ping(&mut in_flight, b"old material")).await;

    // Step 1: the new gateway certificate, and both roots for callers.
    let both = [std::fs::read(old.path("ca.pem")).unwrap(), std::fs::read(new.path("ca.pem")).unwrap()].concat();
    replace_file(&old.path("gateway.key"), &std::fs::read(new.path("gateway.key")).unwrap());
    replace_file(&old.path("gateway.pem"), &std::fs::read(new.path("gateway.pem")).unwrap());
    replace_file(&old.path("ca.pem"), &both);
    let reloads = h.reloader.reload("test");
    assert!(reloads.is_ok(), "{reloads:?}");
    // New handshakes present the new certificate: only the new root verifies it.
    assert!(
        within("old root", handshake(&h, &old_roots, old)).await.is_err(),
        "the old certificate is no longer served"
    );
    within("new root, new client", handshake(&h, &new_roots, &new)).await.expect("new client accepted");
    within("new root, old client", handshake(&h, &new_roots, old)).await.expect("old clients accepted during rotation");

    // Step 2: the new root only.
    replace_file(&old.path("ca.pem"), &std::fs::read(new.path("ca.pem")).unwrap());
    let reloads = h.reloader.reload("test");
    assert!(reloads.is_ok(), "{reloads:?}");
    assert!(
        within("old client refused", handshake(&h, &new_roots, old)).await.is_err(),
        "old client certificate refused"
    );
    within("new client", handshake(&h, &new_roots, &new)).await.expect("new client accepted");

    // The connection made with the old material is still alive.
    within("ping", ping(&mut in_flight, b"still here")).await;
    let metrics = scrape(h.metrics_addr).await;
    assert!(sum(&metrics, "snigress_config_reloads_total", &[("result", "success")]) >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_ends_what_is_left() {
    let sections = "shutdown:\n  grace_period: 3s\n  drain_timeout: 1s\n".to_owned();
    let mut h = Harness::with(Options { sections, ..Options::default() }).await;
    let outer = within("outer", h.outer("mtls", SLEEP, &[])).await.expect("outer");
    let mut lingering = within("inner", h.inner(outer, "a.allowed.test")).await.expect("inner");
    within("ping", ping(&mut lingering, b"x")).await;
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    let mut finishing = within("inner", h.inner(tcp, "b.allowed.test")).await.expect("inner");
    within("ping", ping(&mut finishing, b"y")).await;

    let served = h.shutdown();
    // Not ready as soon as the gateway has taken the signal (the signal
    // reaches its task asynchronously), but still accepting during the
    // grace period.
    within("readyz turns 503", async {
        while http(h.metrics_addr, "GET", "/readyz", &[]).await.0 != 503 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("during grace", through_passthrough(&h, "a.allowed.test")).await.expect("accepted during the grace period");
    // A connection that finishes during the drain ends normally.
    let reply = within("finish", exchange(finishing, b"")).await.expect("finish");
    assert_eq!(reply, b"sni=b.allowed.test\n");
    // The one that does not is ended at the drain deadline, and logged so.
    within("drained", served).await.expect("serve returns");
    let (rest, _) = within("cut", read_all(&mut lingering)).await;
    assert!(rest.is_empty());
    let rs = records(&mut h, 3).await;
    let cut = rs.iter().find(|r| r.listener == "mtls").expect("lingering record");
    assert_eq!((cut.decision, cut.termination), ("allowed", "drain_timeout"));
    assert!(rs.iter().filter(|r| r.listener == "passthrough").all(|r| r.termination != "drain_timeout"), "{rs:?}");
    assert!(TcpStream::connect(h.addr("passthrough")).await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_cleanly_and_keep_serving() {
    let sections = "limits:\n  max_connections: 4\n  max_connections_per_source: 2\n".to_owned();
    let mut h = Harness::with(Options { sections, ..Options::default() }).await;
    // Two connections from 127.0.0.1 hold the source's slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
        held.push(within("inner", h.inner(tcp, "a.allowed.test")).await.expect("inner"));
    }
    let mut third = TcpStream::connect(h.addr("passthrough")).await.expect("the kernel accepts");
    let (got, _) = within("refused", read_all(&mut third)).await;
    assert!(got.is_empty());
    let r = h.record().await;
    assert_eq!((r.decision, r.reason), ("denied", "source_limit"));

    // Another client address (127.0.0.3) still gets in, up to the global limit.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.3:0".parse().unwrap()).expect("bind 127.0.0.3");
    let other = socket.connect(h.addr("passthrough")).await.expect("connect");
    let other = within("other source", h.inner(other, "b.allowed.test")).await.expect("another source gets in");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.4:0".parse().unwrap()).expect("bind 127.0.0.4");
    let fourth = socket.connect(h.addr("passthrough")).await.expect("connect");
    let fourth = within("fourth", h.inner(fourth, "b.allowed.test")).await.expect("fourth connection");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.5:0".parse().unwrap()).expect("bind 127.0.0.5");
    let mut fifth = socket.connect(h.addr("passthrough")).await.expect("connect");
    let (got, _) = within("global limit", read_all(&mut fifth)).await;
    assert!(got.is_empty());
    assert_eq!(h.record().await.reason, "connection_limit");

    // Those already in keep working; a freed slot is usable again.
    for stream in &mut held {
        within("held", ping(stream, b"still served")).await;
    }
    drop((other, fourth, held.pop()));
    let _ = records(&mut h, 3).await;
    within("slot reused", through_passthrough(&h, "a.allowed.test")).await.expect("a freed slot is reused");
    let text = scrape(h.metrics_addr).await;
    assert_eq!(sum(&text, "snigress_connections_total", &[("reason", "source_limit")]), 1.0);
    assert_eq!(sum(&text, "snigress_connections_total", &[("reason", "connection_limit")]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_end_idle_slow_and_long_lived_connections() {
    let sections = "timeouts:\n  handshake: 500ms\n  client_hello: 500ms\n  idle: 1s\n  max_lifetime: 2s\n".to_owned();
    let mut h = Harness::with(Options { sections, ..Options::default() }).await;

    // A caller that connects to the mtls listener and sends nothing: let go
    // at the first-byte timeout (here bounded by the 500 ms handshake one).
    let mut silent = TcpStream::connect(h.addr("mtls")).await.expect("connect");
    let _ = within("silent", read_all(&mut silent)).await;
    let r = h.record().await;
    assert_eq!(
        (r.reason, r.termination, r.side),
        ("first_byte_timeout", "first_byte_timeout", Some("client")),
        "{r:?}"
    );

    // One that trickles its outer handshake a byte at a time.
    let hello = client_hello("localhost");
    let mut trickle = TcpStream::connect(h.addr("mtls")).await.expect("connect");
    within("trickle", async {
        for byte in hello.iter() {
            if trickle.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let r = h.record().await;
    assert_eq!(r.reason, "outer_handshake_timeout");

    // Allowed and then silent: the idle timeout.
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    let mut idle = within("inner", h.inner(tcp, "a.allowed.test")).await.expect("inner");
    let _ = within("idle", read_all(&mut idle)).await;
    let r = h.record().await;
    assert_eq!((r.decision, r.termination), ("allowed", "idle_timeout"));

    // Busy but past the maximum lifetime.
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    let mut busy = within("inner", h.inner(tcp, "a.allowed.test")).await.expect("inner");
    within("busy", async {
        loop {
            if busy.write_all(b"keep me busy").await.is_err() {
                break;
            }
            let mut b = [0u8; 12];
            if busy.read_exact(&mut b).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let r = h.record().await;
    assert_eq!((r.decision, r.termination), ("allowed", "max_lifetime"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_declaring_16_mib_is_refused_at_once() {
    let mut h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    // One record of 16 KiB claiming a 16 MiB handshake message.
    let mut hello = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
    hello.extend_from_slice(&[0u8; 64]);
    tcp.write_all(&hello).await.expect("write");
    let (got, _) = within("refused", read_all(&mut tcp)).await;
    assert_eq!(got, snigress::front::tls::alert::record(snigress::front::tls::alert::DECODE_ERROR));
    let r = h.record().await;
    assert_eq!(r.reason, "client_hello_too_large");
    assert!(r.bytes_from_client < 16 * 1024 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ech_is_flagged_and_optionally_refused() {
    let ech = snigress::front::tls::testing::ech_hello_for("capture.allowed.test");
    let mut h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.addr("passthrough-capture")).await.expect("connect");
    tcp.write_all(&ech).await.expect("write");
    tcp.shutdown().await.expect("half-close");
    let _ = within("ech allowed", read_all(&mut tcp)).await;
    assert_eq!(h.capture.next().await, ech);
    let r = h.record().await;
    assert_eq!((r.decision, r.ech), ("allowed", true));

    let text = h.config_with(&Options::default()).replacen("policy:\n", "policy:\n  refuse_ech: true\n", 1);
    h.write_config(&text);
    // The file watcher may apply it first; either way it is applied once.
    assert!(h.reloader.reload("test").is_ok(), "refuse_ech is valid");
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;
    let mut tcp = TcpStream::connect(h.addr("passthrough-capture")).await.expect("connect");
    tcp.write_all(&ech).await.expect("write");
    let (got, _) = within("ech refused", read_all(&mut tcp)).await;
    assert_eq!(got, snigress::front::tls::alert::record(snigress::front::tls::alert::ACCESS_DENIED));
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.ech), ("denied", "ech_refused", true));
}

/// A gateway with one passthrough listener dialling `upstream_port`,
/// resolving through `nameserver`, with `extra` config appended.
async fn small_gateway(
    nameserver: std::net::SocketAddr,
    upstream_port: u16,
    extra: &str,
) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Record>) {
    let text = format!(
        "listeners:\n  - {{name: pt, address: 127.0.0.1:0, mode: passthrough, upstream_port: {upstream_port}}}\npolicy:\n  allow: [\"*.allowed.test\"]\nresolver:\n  nameservers: [\"{nameserver}\"]\n  allow_cidrs: [127.0.0.0/8]\n{extra}"
    );
    let config = snigress::config::Config::parse(&text, "small.yaml", std::path::Path::new(".")).expect("config");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let gateway =
        snigress::gateway::Gateway::bind(&config, std::sync::Arc::new(snigress::observe::access_log::Channel(tx)))
            .await
            .expect("bind");
    let addr = gateway.local_addrs()[0].1;
    tokio::spawn(gateway.serve(std::future::pending()));
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_and_connect_timeouts() {
    let internet = Internet::new();

    // A nameserver that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let (addr, mut records) = small_gateway(silent.local_addr().unwrap(), 443, "timeouts:\n  dns: 500ms\n").await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let e = within("dns timeout", inner_connect(tcp, "a.allowed.test", internet.roots.clone())).await.map(|_| ());
    assert_eq!(alert_of(&e.expect_err("refused")), Some(AlertDescription::InternalError));
    let r = within("record", records.recv()).await.expect("record");
    assert_eq!((r.decision, r.reason, r.termination), ("error", "dns_timeout", "dns_timeout"));

    // An upstream whose accept queue is full: further SYNs go unanswered.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let full = socket.listen(1).expect("listen");
    let port = full.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        // Fill the queue; some of these connects themselves hang: bound them.
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(("127.0.0.1", port))).await
        {
            fillers.push(s);
        }
    }
    let dns = Dns::start(ZONE).await;
    let (addr, mut records) = small_gateway(dns.addr, port, "timeouts:\n  connect: 500ms\n").await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let e = within("connect timeout", inner_connect(tcp, "a.allowed.test", internet.roots.clone())).await.map(|_| ());
    assert_eq!(alert_of(&e.expect_err("refused")), Some(AlertDescription::InternalError));
    let r = within("record", records.recv()).await.expect("record");
    assert_eq!((r.decision, r.reason, r.termination), ("error", "connect_timeout", "connect_timeout"));
    drop((full, fillers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_beside_the_config_cause_no_reload() {
    let h = Harness::start().await;
    let dir = h.config_path.parent().expect("config dir").to_owned();
    // An access log and a scratch file beside the config, written for longer
    // than a debounced burst lasts (MAX_DEBOUNCE + DEBOUNCE).
    let window = snigress::gateway::reload::MAX_DEBOUNCE + snigress::gateway::reload::DEBOUNCE * 2;
    let started = std::time::Instant::now();
    let mut line = 0;
    while started.elapsed() < window {
        use std::io::Write as _;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("access.log")).expect("log");
        writeln!(log, "{{\"line\":{line}}}").expect("append");
        std::fs::write(dir.join("scratch.tmp"), line.to_string()).expect("scratch");
        line += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.reloader.attempts(), 0, "{line} writes beside the config started a reload");
    // The watcher itself works: a change to the config is applied.
    h.write_config(&h.config_with(&allowing("[b.allowed.test]")));
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_before_the_watch_starts_is_not_lost() {
    let dns = Dns::start(ZONE).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.yaml");
    let text = |allow: &str| {
        format!(
            "listeners:\n  - {{name: pt, address: 127.0.0.1:0, mode: passthrough}}\npolicy:\n  allow: [{allow}]\nresolver:\n  nameservers: [\"{}\"]\n",
            dns.addr
        )
    };
    let parsed = text("a.allowed.test");
    std::fs::write(&path, &parsed).expect("write");
    let config = snigress::config::Config::load(&path).expect("config");
    let gateway = snigress::gateway::Gateway::bind(&config, std::sync::Arc::new(Discard)).await.expect("bind");
    // Edited after it was parsed, before the reloader starts.
    std::fs::write(&path, text("b.allowed.test")).expect("edit");
    let reloader = gateway.reloader(path.clone(), &parsed);
    assert!(reloader.reload("test").expect("valid"), "the edit is a change to apply");
    assert!(!reloader.reload("test").expect("valid"), "and once applied, nothing changes");
}

/// Records go nowhere.
struct Discard;

impl snigress::observe::access_log::Sink for Discard {
    fn emit(&self, _: Record) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_dns_cache_unless_the_resolver_changes() {
    let h = Harness::start().await;
    within("first", through_passthrough(&h, "a.allowed.test")).await.expect("allowed");
    let hits = || async { sum(&scrape(h.metrics_addr).await, "snigress_dns_cache_hits_total", &[]) };
    assert_eq!(hits().await, 0.0);

    // A policy change: the resolver and its cache are kept.
    h.write_config(&h.config_with(&allowing("[\"*.allowed.test\", b.team.test]")));
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;
    within("after a policy reload", through_passthrough(&h, "a.allowed.test")).await.expect("allowed");
    assert_eq!(hits().await, 1.0, "answered from the cache kept across the reload");

    // A resolver change: a new resolver, a cold cache.
    let changed = h.config_with(&Options::default()).replace("resolver:\n", "resolver:\n  min_ttl: 1s\n");
    h.write_config(&changed);
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 2.0).await;
    within("after a resolver reload", through_passthrough(&h, "a.allowed.test")).await.expect("allowed");
    assert_eq!(hits().await, 1.0, "a changed resolver starts cold");
}

/// Listeners on `ips` (same port) whose accept queues are full, so further
/// connection attempts to them hang: black holes on loopback.
async fn black_holes(ips: &[std::net::Ipv4Addr]) -> (u16, Vec<tokio::net::TcpListener>, Vec<TcpStream>) {
    let first = tokio::net::TcpSocket::new_v4().expect("socket");
    first.bind(std::net::SocketAddr::new(ips[0].into(), 0)).expect("bind");
    let port = first.local_addr().expect("addr").port();
    let mut listeners = vec![first.listen(1).expect("listen")];
    for ip in &ips[1..] {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(std::net::SocketAddr::new((*ip).into(), port)).expect("bind the same port");
        listeners.push(s.listen(1).expect("listen"));
    }
    let mut fillers = Vec::new();
    for ip in ips {
        for _ in 0..8 {
            // Some of these connects hang themselves: bound them.
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect((*ip, port))).await {
                fillers.push(s);
            }
        }
    }
    (port, listeners, fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_is_bounded_by_a_total_budget_whatever_the_addresses() {
    let ips: Vec<std::net::Ipv4Addr> = (21..25).map(|d| std::net::Ipv4Addr::new(127, 0, 0, d)).collect();
    let (port, _listeners, _fillers) = black_holes(&ips).await;
    let dns = Dns::start(&[("slow.allowed.test", &ips[..])]).await;
    let (addr, mut records) =
        small_gateway(dns.addr, port, "timeouts:\n  connect: 1s\n  connect_total: 1500ms\n").await;
    let internet = Internet::new();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let asked = std::time::Instant::now();
    let e = within("connect budget", inner_connect(tcp, "slow.allowed.test", internet.roots.clone())).await.map(|_| ());
    let took = asked.elapsed();
    assert_eq!(alert_of(&e.expect_err("refused")), Some(AlertDescription::InternalError));
    // Four addresses at 1 s each would be 4 s; the budget ends it at 1.5 s.
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_millis(3000), "{took:?}");
    let r = within("record", records.recv()).await.expect("record");
    assert_eq!(
        (r.decision, r.reason, r.side, r.termination),
        ("error", "connect_timeout", Some("upstream"), "connect_timeout")
    );
    // The first address took 1 s, the second the rest: it is the last tried.
    assert_eq!(r.upstream_addr, Some(std::net::SocketAddr::new(ips[1].into(), port)));
    assert!(r.detail.as_deref().is_some_and(|d| d.contains("connect_total")), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_names_the_last_address_tried_and_counts_the_alert() {
    // Ten addresses where nothing listens: refused at once; eight are tried.
    let ips: Vec<std::net::Ipv4Addr> = (31..41).map(|d| std::net::Ipv4Addr::new(127, 0, 0, d)).collect();
    let dns = Dns::start(&[("closed.allowed.test", &ips[..])]).await;
    let (addr, mut records) = small_gateway(dns.addr, 9, "").await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let hello = client_hello("closed.allowed.test");
    tcp.write_all(&hello).await.expect("write");
    let (got, _) = within("refused", read_all(&mut tcp)).await;
    assert_eq!(got, snigress::front::tls::alert::record(snigress::front::tls::alert::INTERNAL_ERROR));
    let r = within("record", records.recv()).await.expect("record");
    assert_eq!(r.reason, "connect_failed");
    assert_eq!(r.upstream_addr, Some(std::net::SocketAddr::new(ips[7].into(), 9)), "the 8th, not the 10th");
    assert_eq!((r.bytes_from_client, r.bytes_to_client), (hello.len() as u64, got.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_neither_reads_nor_closes_is_cut_after_the_half_close_timeout() {
    // An upstream that accepts and then neither reads nor closes.
    let holder = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((tcp, _)) = holder.accept().await {
            kept.push(tcp);
        }
    });
    let dns = Dns::start(ZONE).await;
    let (addr, mut records) = small_gateway(dns.addr, port, "timeouts:\n  idle: 1h\n  half_close: 500ms\n").await;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&client_hello("a.allowed.test")).await.expect("hello");
    tcp.shutdown().await.expect("the client is done");
    let asked = std::time::Instant::now();
    let _ = within("cut", read_all(&mut tcp)).await;
    let took = asked.elapsed();
    let r = within("record", records.recv()).await.expect("record");
    assert_eq!((r.decision, r.termination), ("allowed", "half_close_timeout"));
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(5), "{took:?}");
    held.abort();
}

/// Idle sockets from four addresses saturate the budget of connections
/// without a destination: working connections and new good ones go on;
/// the oldest idle ones are evicted to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_sockets_cannot_crowd_out_good_connections() {
    // Four addresses whose silent sockets alone would fill max_connections.
    const PER_SOURCE: usize = 100;
    let sections = "limits:\n  max_connections: 400\n  max_connections_per_source: 400\n  max_pending_connections: 100\ntimeouts:\n  first_byte: 30s\n  handshake: 30s\n  client_hello: 30s\n".to_owned();
    let mut h = Harness::with(Options { sections, ..Options::default() }).await;
    let addr = h.addr("passthrough");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut established = within("inner", h.inner(tcp, "a.allowed.test")).await.expect("inner");
    within("ping", ping(&mut established, b"before")).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..4 * PER_SOURCE)
        .map(|i| {
            let stop = stop.clone();
            let source: std::net::IpAddr = std::net::Ipv4Addr::new(127, 0, 0, 11 + (i / PER_SOURCE) as u8).into();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                    socket.bind(std::net::SocketAddr::new(source, 0)).expect("bind source");
                    if let Ok(mut tcp) = socket.connect(addr).await {
                        let _ = read_all(&mut tcp).await; // silent until let go
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    h.wait_metric("snigress_pending_connections", &[], 100.0).await;

    let mut took = Vec::new();
    for i in 0..30 {
        let asked = std::time::Instant::now();
        let sni = if i % 2 == 0 { "a.allowed.test" } else { "b.allowed.test" };
        within("a good connection", through_passthrough(&h, sni)).await.expect("served under the flood");
        took.push(asked.elapsed());
    }
    within("ping", ping(&mut established, b"during the flood")).await;
    took.sort();
    println!("good connections under the flood: p50 {:?}, p99 {:?}", took[took.len() / 2], took[took.len() - 1]);
    let text = scrape(h.metrics_addr).await;
    assert!(sum(&text, "snigress_pending_connections", &[]) <= 100.0, "the budget holds");
    assert!(sum(&text, "snigress_connections_total", &[("reason", "pending_evicted")]) >= 30.0, "idle ones evicted");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.abort();
    }
    drop(established);
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(10), h.records.recv()).await {}
}

/// Copies the gateway's material (certificate, key, CA) from `pki` into `dir`.
fn copy_material(pki: &Pki, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    for file in ["gateway.pem", "gateway.key", "ca.pem"] {
        std::fs::copy(pki.path(file), dir.join(file)).expect("copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_directory_is_still_watched() {
    let h = Harness::start().await;
    // Move the gateway's material into its own directory, as a mounted
    // Secret would be.
    let certs = h.pki.dir.path().join("certs");
    copy_material(&h.pki, &certs);
    let dir = h.pki.dir.path().display().to_string();
    let text = h
        .config_with(&Options::default())
        .replace(&format!("{dir}/gateway"), &format!("{dir}/certs/gateway"))
        .replace(&format!("client_ca: {dir}/ca.pem"), &format!("client_ca: {dir}/certs/ca.pem"));
    assert!(text.contains("/certs/gateway.pem") && text.contains("/certs/ca.pem"), "{text}");
    h.write_config(&text);
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;

    // The directory is replaced whole, with a new PKI's material.
    let new = Pki::mint();
    let staged = h.pki.dir.path().join("certs.new");
    copy_material(&new, &staged);
    std::fs::remove_dir_all(&certs).expect("remove");
    std::fs::rename(&staged, &certs).expect("swap in");
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 2.0).await;
    within("new material", handshake(&h, &new.roots(), &new)).await.expect("the new certificate is served");

    // Swapped by renames only: the old directory moved away (no event names
    // a file), the new one moved in.
    let newer = Pki::mint();
    copy_material(&newer, &staged);
    std::fs::rename(&certs, h.pki.dir.path().join("certs.old")).expect("move away");
    std::fs::rename(&staged, &certs).expect("move in");
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 3.0).await;
    within("newer material", handshake(&h, &newer.roots(), &newer)).await.expect("the newer certificate is served");

    // And the new directory is watched in turn.
    let newest = Pki::mint();
    for file in ["gateway.pem", "gateway.key", "ca.pem"] {
        replace_file(&certs.join(file), &std::fs::read(newest.path(file)).expect("read"));
    }
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 4.0).await;
    within("newest material", handshake(&h, &newest.roots(), &newest)).await.expect("the newest certificate is served");
}

/// A config naming certificate files that are not there yet (a Secret
/// mounted after the ConfigMap) fails to load; the reload is tried again
/// and applied once they appear, though no watched file changed, and the
/// burst is counted once, as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_failed_for_want_of_files_is_tried_again() {
    let h = Harness::start().await;
    let dir = h.pki.dir.path().display().to_string();
    let later = h.pki.dir.path().join("later");
    let text = h.config_with(&Options::default()).replace(&format!("{dir}/gateway"), &format!("{dir}/later/gateway"));
    h.write_config(&text);
    within("the first attempt", async {
        while h.reloader.attempts() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The directory appears: nothing watched changes, only the retry sees it.
    copy_material(&h.pki, &later);
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;
    assert!(h.reloader.attempts() >= 2, "{} attempts", h.reloader.attempts());
    let text = scrape(h.metrics_addr).await;
    assert_eq!(sum(&text, "snigress_config_reloads_total", &[("result", "failure")]), 0.0, "counted once");
}
