//! Per-identity limits end to end: one caller's open connections and its
//! new-connection rate are bounded while another caller is unaffected; a
//! TLS front refuses with an alert, an HTTP front with 429.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_is_held_to_its_limits_and_others_are_not() {
    let sections = "limits:\n  max_connections_per_identity: 2\n  connection_rate_per_identity: {rate: 1/h, burst: 4}\nconnect:\n  allowed_ports: [{echo}]\n  allow_ip_literals: true\n".to_owned();
    let listeners = "  - {name: mesh-proxy, address: 127.0.0.1:0, mode: mtls, protocol: connect}\n".to_owned();
    let mut h = Harness::with(Options { sections, listeners, ..Options::default() }).await;

    // Two open connections of one caller: the third is refused.
    let mut held = Vec::new();
    for _ in 0..2 {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
        let mut tls = h.inner(outer, "a.allowed.test").await.expect("inner TLS");
        tls.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.expect("echo");
        held.push(tls);
    }
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let e = h.inner(outer, "a.allowed.test").await.expect_err("a third connection");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.reason, r.decision, r.principal.as_deref()), ("identity_limit", "denied", Some(SLEEP)));

    // Another caller is unaffected.
    let outer = h.outer("mtls", OTHER_APP, &[]).await.expect("outer");
    let tls = h.inner(outer, "a.allowed.test").await.expect("another identity");
    exchange(tls, b"o").await.expect("exchange");
    assert_eq!(h.record().await.reason, "allowed");

    // A connection that ends gives its place back (before its record).
    drop(held.pop());
    assert_eq!(h.record().await.reason, "allowed");
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let tls = h.inner(outer, "a.allowed.test").await.expect("a place again");
    exchange(tls, b"y").await.expect("exchange");
    assert_eq!(h.record().await.reason, "allowed");

    // The burst of 4 is spent (2 held, 1 more; the refused one took no
    // token): one more, then rate_limited; on an HTTP front that is a 429.
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let tls = h.inner(outer, "a.allowed.test").await.expect("the last token");
    exchange(tls, b"z").await.expect("exchange");
    assert_eq!(h.record().await.reason, "allowed");
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let e = h.inner(outer, "a.allowed.test").await.expect_err("no token left");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    assert_eq!(h.record().await.reason, "rate_limited");

    let mut outer = h.outer("mesh-proxy", SLEEP, &[]).await.expect("outer");
    let echo = h.echo.port;
    outer.write_all(format!("CONNECT a.allowed.test:{echo} HTTP/1.1\r\n\r\n").as_bytes()).await.expect("send");
    let (answer, _) = within("answer", read_all(&mut outer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{answer}");
    assert!(
        answer.contains("Proxy-Status: snigress; error=connection_limit_reached; details=\"rate_limited\""),
        "{answer}"
    );
    assert_eq!(h.record().await.reason, "rate_limited");

    // A CONNECT to an address is decided after its 200, and held to the
    // same limits.
    let mut outer = h.outer("mesh-proxy", SLEEP, &[]).await.expect("outer");
    outer.write_all(format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n").as_bytes()).await.expect("send");
    let mut established = [0u8; 39];
    outer.read_exact(&mut established).await.expect("200");
    let e = h.inner(outer, "a.allowed.test").await.expect_err("no token left");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    assert_eq!(h.record().await.reason, "rate_limited");
    drop(held);
}

#[test]
fn limit_settings_are_checked() {
    use snigress::config::Config;
    let base = "listeners:\n  - {name: l, address: 127.0.0.1:1, mode: passthrough}\nlimits:\n";
    let parse = |extra: &str| Config::parse(&format!("{base}{extra}"), "t.yaml", std::path::Path::new("."));
    let c = parse("  connection_rate_per_identity: {rate: 120/m}\n").expect("valid");
    let rate = c.limits.identity.rate.expect("a rate");
    assert_eq!((rate.per_second, rate.burst), (2.0, 2.0));
    for (extra, wanted) in [
        ("  connection_rate_per_identity: {rate: fast}\n", "not a rate such as 50/s"),
        ("  connection_rate_per_identity: {rate: 0/s}\n", "not a rate"),
        ("  connection_rate_per_identity: {rate: 5/s, burst: 0}\n", "burst: must be at least 1"),
        ("  max_connections_per_identity: 0\n", "must be at least 1"),
    ] {
        let e = parse(extra).expect_err(extra);
        assert!(e.to_string().contains(wanted), "{extra}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_identity_is_held_to_its_limit_too() {
    use tokio::net::TcpStream;
    let sections = "limits:\n  max_connections_per_identity: 1\n".to_owned();
    let listeners = "  - name: ambient\n    address: 127.0.0.1:0\n    mode: passthrough\n    upstream_port: {echo}\n    proxy_protocol: {versions: [v2], trusted_sources: [127.0.0.0/8], identity: istio_tlv}\n".to_owned();
    let mut h = Harness::with(Options { sections, listeners, ..Options::default() }).await;
    let header = |id: &str| {
        let (app, vip) = ("10.1.2.3:40000".parse().expect("address"), "240.240.0.1:443".parse().expect("address"));
        snigress::arrive::proxy::testing::ztunnel(app, vip, Some(id))
    };
    let mut first = TcpStream::connect(h.addr("ambient")).await.expect("connect");
    first.write_all(&header(SLEEP)).await.expect("header");
    let mut tls = h.inner(first, "a.allowed.test").await.expect("the first connection");
    tls.write_all(b"x").await.expect("write");
    tls.read_exact(&mut [0u8; 1]).await.expect("echo");

    let mut second = TcpStream::connect(h.addr("ambient")).await.expect("connect");
    second.write_all(&header(SLEEP)).await.expect("header");
    let e = h.inner(second, "a.allowed.test").await.expect_err("over the limit");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.reason, r.arrival, r.principal.as_deref()), ("identity_limit", "proxy_v2", Some(SLEEP)));

    let mut other = TcpStream::connect(h.addr("ambient")).await.expect("connect");
    other.write_all(&header(OTHER_APP)).await.expect("header");
    let tls_other = h.inner(other, "a.allowed.test").await.expect("another identity");
    exchange(tls_other, b"o").await.expect("exchange");
    assert_eq!(h.record().await.reason, "allowed");
    drop(tls);
}
