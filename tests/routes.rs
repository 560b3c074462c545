//! Routes end to end: seed 004's split of clients between two egress points
//! by source address, the same by caller identity, a source address bound
//! for the upstream socket, a PROXY v2 header to a next hop, and a next hop
//! that refuses, after which the next one is used.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use snigress::arrive::proxy::{self, Versions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// A TCP client of `addr` from source address `from`.
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((from, 0))).expect("bind the client's source");
    socket.connect(addr).await.expect("connect")
}

/// Accepts connections and reports each peer's address.
async fn peer_reporter() -> (u16, mpsc::UnboundedReceiver<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((_, peer)) = listener.accept().await {
            let _ = tx.send(peer);
        }
    });
    (port, rx)
}

/// A next hop that reads a PROXY header and reports what it announced.
async fn proxy_reader() -> (u16, mpsc::UnboundedReceiver<proxy::Header>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            if let Ok(header) = proxy::read(&mut tcp, Versions::ALL, Duration::from_secs(10)).await {
                let _ = tx.send(header);
            }
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_clients_where_their_source_identity_and_name_say() {
    let internet = Internet::new();
    let egress1 = Echo::start(internet.server.clone()).await;
    let egress2 = Echo::start(internet.server.clone()).await;
    let (seen_port, mut seen) = peer_reporter().await;
    let (hop_port, mut announced) = proxy_reader().await;
    let sections = format!(
        "routes:
  - name: egress1
    match: {{sources: [127.0.1.10/32]}}
    next_hop: \"127.0.0.1:{e1}\"
  - name: egress2
    match: {{sources: [127.0.1.11/32]}}
    # Nothing listens on the first: the second is used.
    next_hop: [\"127.0.0.9:1\", \"127.0.0.1:{e2}\"]
  - name: team-other
    match: {{namespaces: [other]}}
    next_hop: \"127.0.0.1:{e2}\"
  - name: bound
    match: {{listeners: [seen]}}
    bind: 127.0.1.77
  - name: bound-direct
    match: {{names: [capture.allowed.test], listeners: [passthrough]}}
    bind: 127.0.1.78
  - name: announced
    match: {{names: [b.allowed.test], listeners: [passthrough]}}
    next_hop: \"127.0.0.1:{hop_port}\"
    proxy_protocol: v2
",
        e1 = egress1.port,
        e2 = egress2.port
    );
    let listeners =
        format!("  - name: seen\n    address: 127.0.0.1:0\n    mode: passthrough\n    upstream_port: {seen_port}\n");
    let mut h = Harness::with(Options { sections, listeners, internet: Some(internet), ..Options::default() }).await;
    let passthrough = h.addr("passthrough");

    // Seed 004: the last octet of the client's address picks the egress.
    for (octet, route, port) in [(10, "egress1", egress1.port), (11, "egress2", egress2.port)] {
        let tcp = connect_from([127, 0, 1, octet], passthrough).await;
        let tls = h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
        let data = data(1 << 20, octet);
        let back = within("exchange", exchange(tls, &data)).await.expect("exchange");
        assert!(back.len() == data.len() + 19 && back[..data.len()] == data[..], "byte-exact, half-close passed on");
        let r = h.record().await;
        assert_eq!((r.route.as_deref(), r.reason, r.sni.as_deref()), (Some(route), "allowed", Some("a.allowed.test")));
        assert_eq!(r.upstream_addr, Some(SocketAddr::from(([127, 0, 0, 1], port))), "the next hop is what was dialled");
    }
    // Another source: no route fits, direct.
    let tcp = connect_from([127, 0, 1, 12], passthrough).await;
    let tls = h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
    exchange(tls, b"x").await.expect("exchange");
    let r = h.record().await;
    assert_eq!((r.route, r.upstream_addr), (None, Some(SocketAddr::from(([127, 0, 0, 1], h.echo.port)))));

    // By identity on the mtls listener.
    let outer = h.outer("mtls", OTHER_APP, &[]).await.expect("outer");
    let tls = h.inner(outer, "a.allowed.test").await.expect("inner TLS");
    exchange(tls, b"y").await.expect("exchange");
    let r = h.record().await;
    assert_eq!((r.route.as_deref(), r.upstream_addr.map(|a| a.port())), (Some("team-other"), Some(egress2.port)));
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let tls = h.inner(outer, "a.allowed.test").await.expect("inner TLS");
    exchange(tls, b"z").await.expect("exchange");
    assert_eq!(h.record().await.route, None);

    // A bound source address, as the upstream sees it.
    let mut tcp = TcpStream::connect(h.addr("seen")).await.expect("connect");
    tcp.write_all(&client_hello("a.allowed.test")).await.expect("hello");
    let peer = within("upstream sees the connection", seen.recv()).await.expect("a peer");
    assert_eq!(peer.ip(), std::net::Ipv4Addr::new(127, 0, 1, 77));
    drop(tcp);
    assert_eq!(h.record().await.route.as_deref(), Some("bound"));

    // A bound direct route carries bytes exactly and passes half-close on.
    let tcp = TcpStream::connect(passthrough).await.expect("connect");
    let tls = h.inner(tcp, "capture.allowed.test").await.expect("inner TLS");
    let data = data(1 << 20, 9);
    let back = within("exchange", exchange(tls, &data)).await.expect("exchange");
    assert!(back[..data.len()] == data[..] && &back[data.len()..] == b"sni=capture.allowed.test\n");
    assert_eq!(h.record().await.route.as_deref(), Some("bound-direct"));

    // PROXY v2 to a next hop: the client's address and where it connected.
    let mut tcp = connect_from([127, 0, 1, 20], passthrough).await;
    let client = tcp.local_addr().expect("client address");
    tcp.write_all(&client_hello("b.allowed.test")).await.expect("hello");
    let header = within("the next hop's header", announced.recv()).await.expect("a header");
    assert_eq!(header.addresses, Some((client, passthrough)));
    let _ = tcp.read(&mut [0u8; 1]).await;
    drop(tcp);
    assert_eq!(h.record().await.route.as_deref(), Some("announced"));

    h.wait_metric("snigress_routed_connections_total", &[("route", "egress2")], 1.0).await;
    h.wait_metric("snigress_routed_connections_total", &[("route", "announced")], 1.0).await;

    // A reload applies to routes as to policy: egress1 now takes .11 too.
    let reloaded = Options {
        sections: format!(
            "routes:\n  - name: egress1\n    match: {{sources: [127.0.1.10/31]}}\n    next_hop: \"127.0.0.1:{}\"\n",
            egress1.port
        ),
        listeners: format!(
            "  - name: seen\n    address: 127.0.0.1:0\n    mode: passthrough\n    upstream_port: {seen_port}\n"
        ),
        ..Options::default()
    };
    h.write_config(&h.config_with(&reloaded));
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;
    let tcp = connect_from([127, 0, 1, 11], passthrough).await;
    let tls = h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
    exchange(tls, b"r").await.expect("exchange");
    let r = h.record().await;
    assert_eq!((r.route.as_deref(), r.upstream_addr.map(|a| a.port())), (Some("egress1"), Some(egress1.port)));
}

#[tokio::test]
async fn a_route_names_a_listener_that_exists_and_one_action() {
    use snigress::config::Config;
    let base = "listeners:\n  - {name: l, address: 127.0.0.1:1, mode: passthrough}\nroutes:\n";
    for (route, wanted) in [
        ("  - {name: r, match: {listeners: [nope]}}\n", "no listener \"nope\""),
        ("  - {name: r, next_hop: \"gw.example:443\", bind: 10.0.0.1}\n", "bind is for direct routes"),
        ("  - {name: r, proxy_protocol: v2}\n", "only a next_hop route"),
        ("  - {name: r, next_hop: \"gw.example\"}\n", "not host:port"),
        ("  - {name: r, next_hop: []}\n", "at least one host:port"),
        ("  - {name: r}\n  - {name: r}\n", "used by another route"),
        ("  - {name: r, mark: 0}\n", "0 means no mark"),
        ("  - {name: r, http_proxy: \"p.example:3128\", next_hop: \"gw.example:443\"}\n", "not both"),
        ("  - {name: r, proxy_auth_file: /nonexistent}\n", "this route has none"),
        (
            "  - {name: r, http_proxy: \"p.example:3128\", proxy_auth_file: /nonexistent/auth}\n",
            "cannot read /nonexistent/auth",
        ),
        ("  - {name: r, http_proxy: \"p.example\"}\n", "not host:port"),
    ] {
        let e = Config::parse(&format!("{base}{route}"), "t.yaml", std::path::Path::new(".")).expect_err(route);
        assert!(e.to_string().contains(wanted), "{route}: {e}");
    }
    let ok = "  - {name: r, match: {sources: [10.0.0.0/8], names: [\"*.example.com\"]}, next_hop: [\"[2001:db8::1]:8443\", \"gw.example:8443\"], proxy_protocol: v1}\n";
    let c = Config::parse(&format!("{base}{ok}"), "t.yaml", std::path::Path::new(".")).expect("valid");
    assert_eq!(c.routes.0.len(), 1);
}

/// A real Squid on loopback, for chaining: CONNECT to names under
/// `.allowed.test` (from a hosts file) except `b.allowed.test`, with Basic
/// credentials `alice:s3cret-pw` required.
struct Squid {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Squid {
    async fn start() -> Option<Squid> {
        use std::os::unix::fs::PermissionsExt;
        use std::process::{Command, Stdio};
        if Command::new("squid").arg("-v").output().is_err() {
            assert!(std::env::var_os("SNIGRESS_REQUIRE_TOOLS").is_none(), "squid is required here");
            eprintln!("skipped: squid is not installed");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // Squid's workers drop to the proxy user when started as root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let d = dir.path().display();
        let hash = Command::new("openssl").args(["passwd", "-1", "s3cret-pw"]).output().expect("openssl passwd");
        let hash = String::from_utf8(hash.stdout).expect("hash");
        std::fs::write(dir.path().join("passwd"), format!("alice:{}", hash.trim())).expect("passwd");
        std::fs::write(dir.path().join("hosts"), "127.0.0.1 a.allowed.test b.allowed.test\n").expect("hosts");
        let port = TcpListener::bind("127.0.0.1:0").await.expect("probe").local_addr().expect("port").port();
        let user = if is_root() { "cache_effective_user proxy\n" } else { "" };
        let config = format!(
            "http_port 127.0.0.1:{port}
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log {d}/access.log
coredump_dir {d}
cache deny all
cache_mem 0 MB
hosts_file {d}/hosts
dns_nameservers 127.0.0.1
shutdown_lifetime 0 seconds
{user}auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd
acl CONNECT method CONNECT
acl allowed dstdomain .allowed.test
acl refused dstdomain b.allowed.test
acl authed proxy_auth REQUIRED
http_access deny !CONNECT
http_access deny !authed
http_access deny refused
http_access allow allowed
http_access deny all
"
        );
        std::fs::write(dir.path().join("squid.conf"), config).expect("squid.conf");
        let child = Command::new("squid")
            .args(["-N", "-f"])
            .arg(dir.path().join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start squid");
        let squid = Squid { port, child, _dir: dir };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "squid never listened on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(squid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_chain_through_a_real_squid_with_credentials() {
    let Some(squid) = Squid::start().await else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("good"), "alice:s3cret-pw\n").expect("credentials");
    std::fs::write(dir.path().join("bad"), "alice:wrong-pw\n").expect("credentials");
    let d = dir.path().display();
    let sections = format!(
        "routes:
  - name: corp
    match: {{listeners: [passthrough]}}
    http_proxy: \"127.0.0.1:{p}\"
    proxy_auth_file: {d}/good
  - name: corp-for-connect
    match: {{listeners: [proxy]}}
    http_proxy: \"127.0.0.1:{p}\"
    proxy_auth_file: {d}/good
  - name: corp-bad-credentials
    match: {{listeners: [mtls]}}
    http_proxy: \"127.0.0.1:{p}\"
    proxy_auth_file: {d}/bad
",
        p = squid.port
    );
    let sections = format!("{sections}connect:\n  allowed_ports: [{{echo}}]\n");
    let listeners = "  - {name: proxy, address: 127.0.0.1:0, mode: passthrough, protocol: connect}\n".to_owned();
    let mut h = Harness::with(Options { sections, listeners, ..Options::default() }).await;
    let squid_addr = SocketAddr::from(([127, 0, 0, 1], squid.port));

    // Through Squid, byte-exact both ways. (Squid closes a tunnel when one
    // side half-closes, so the echo is read back before closing.)
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    let tls = h.inner(tcp, "a.allowed.test").await.expect("inner TLS through squid");
    let data = data(1 << 20, 5);
    let (mut r, mut w) = tokio::io::split(tls);
    let mut back = vec![0u8; data.len()];
    let (sent, got) = tokio::join!(w.write_all(&data), within("echo", r.read_exact(&mut back)));
    sent.expect("send");
    got.expect("read back");
    assert!(back == data, "byte-exact through squid");
    drop((r, w));
    let r = h.record().await;
    assert_eq!((r.route.as_deref(), r.reason, r.upstream_addr), (Some("corp"), "allowed", Some(squid_addr)));
    let mut logged = serde_json::to_string(&r).expect("json");

    // Squid refuses a name: the client hears access_denied.
    let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    let e = h.inner(tcp, "b.allowed.test").await.expect_err("refused by squid");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.reason, r.decision, r.side), ("upstream_proxy_denied", "error", Some("upstream")));
    assert!(r.detail.as_deref().is_some_and(|d| d.contains("403")), "{:?}", r.detail);
    logged.push_str(&serde_json::to_string(&r).expect("json"));

    // Wrong credentials: 407.
    let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
    let e = h.inner(outer, "a.allowed.test").await.expect_err("refused by squid");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!(r.reason, "upstream_proxy_denied");
    assert!(r.detail.as_deref().is_some_and(|d| d.contains("407")), "{:?}", r.detail);
    logged.push_str(&serde_json::to_string(&r).expect("json"));

    // The CONNECT front through Squid: a tunnel, and Squid's refusal as a 502.
    let mut tcp = TcpStream::connect(h.addr("proxy")).await.expect("connect");
    let echo = h.echo.port;
    tcp.write_all(format!("CONNECT b.allowed.test:{echo} HTTP/1.1\r\n\r\n").as_bytes()).await.expect("send");
    let mut answer = String::new();
    within("answer", tcp.read_to_string(&mut answer)).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert!(
        answer.contains("Proxy-Status: snigress; error=destination_unavailable; details=\"upstream_proxy_denied\""),
        "{answer}"
    );
    drop(tcp);
    let r = h.record().await;
    assert_eq!(
        (r.reason, r.http_status, r.route.as_deref()),
        ("upstream_proxy_denied", Some(502), Some("corp-for-connect"))
    );
    logged.push_str(&serde_json::to_string(&r).expect("json"));

    // The credentials were sent (Squid let the first through) and never logged.
    for secret in ["s3cret-pw", "wrong-pw", "YWxpY2U6czNjcmV0LXB3"] {
        assert!(!logged.contains(secret), "{secret} in the access log");
    }
}
