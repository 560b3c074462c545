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
    ] {
        let e = Config::parse(&format!("{base}{route}"), "t.yaml", std::path::Path::new(".")).expect_err(route);
        assert!(e.to_string().contains(wanted), "{route}: {e}");
    }
    let ok = "  - {name: r, match: {sources: [10.0.0.0/8], names: [\"*.example.com\"]}, next_hop: [\"[2001:db8::1]:8443\", \"gw.example:8443\"], proxy_protocol: v1}\n";
    let c = Config::parse(&format!("{base}{ok}"), "t.yaml", std::path::Path::new(".")).expect("valid");
    assert_eq!(c.routes.0.len(), 1);
}
