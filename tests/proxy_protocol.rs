//! PROXY protocol arrivals, as Istio ambient's ztunnel sends them to a
//! waypoint bound with `PROXY/15088`: a v2 header with the app's address,
//! the ServiceEntry VIP and the caller's SPIFFE ID (TLV 0xD0), then the
//! application's own TLS. A client shaped like ztunnel drives a real
//! gateway on loopback: per-identity policy, a missing TLV, untrusted
//! peers, malformed and slow headers, byte-exact replay, half-close, v1.

mod common;

use std::net::SocketAddr;

use common::*;
use rustls::AlertDescription;
use snigress::observe::access_log::Record;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The app behind ztunnel, and the VIP it connected to.
const APP: &str = "10.1.2.3:40000";
const VIP: &str = "240.240.0.5:443";

/// A PROXY v2 header as ztunnel writes it.
fn ztunnel_header(identity: Option<&str>) -> Vec<u8> {
    snigress::arrive::proxy::testing::ztunnel(APP.parse().unwrap(), VIP.parse().unwrap(), identity)
}

/// Listeners: `ambient` trusts loopback and takes the identity TLV (echo
/// upstream); `ambient-capture` the same to the capture upstream; `remote`
/// trusts only an address the tests never connect from.
fn options() -> Options {
    let ambient = |name: &str, upstream: &str, trusted: &str| {
        format!(
            "  - name: {name}\n    address: 127.0.0.1:0\n    mode: passthrough\n    upstream_port: {upstream}\n    proxy_protocol:\n      trusted_sources: [{trusted}]\n      identity: istio_tlv\n"
        )
    };
    let listeners = [
        ambient("ambient", "{echo}", "127.0.0.0/8"),
        ambient("ambient-capture", "{capture}", "127.0.0.0/8"),
        ambient("remote", "{echo}", "192.0.2.0/24"),
    ]
    .concat();
    Options { listeners, sections: "timeouts:\n  client_hello: 1s\n".into(), ..Options::default() }
}

/// Connects to `listener`, sends `header`, then speaks TLS for `sni`
/// and echoes `payload` through the gateway.
async fn ambient_exchange(h: &Harness, header: &[u8], sni: &str, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(h.addr("ambient")).await?;
    tcp.write_all(header).await?;
    exchange(h.inner(tcp, sni).await?, payload).await
}

async fn refused(h: &Harness, header: &[u8], sni: &str) -> Option<AlertDescription> {
    let e = ambient_exchange(h, header, sni, b"x").await.expect_err("must be refused");
    alert_of(&e)
}

fn addr(r: &Record) -> (SocketAddr, Option<SocketAddr>, Option<SocketAddr>) {
    (r.client_addr, r.proxy_addr, r.original_dst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_header_carries_the_callers_address_and_identity_into_policy() {
    let mut h = Harness::with(options()).await;
    let (app, vip) = (APP.parse().unwrap(), VIP.parse().unwrap());

    // ns/default may reach *.team.test (the rule `default-team`).
    let payload = data(300_000, 3);
    let got = within("allowed", ambient_exchange(&h, &ztunnel_header(Some(SLEEP)), "a.team.test", &payload))
        .await
        .expect("allowed for ns/default");
    // The echo upstream appends the name it was asked for.
    let expected = [payload.as_slice(), b"sni=a.team.test\n"].concat();
    assert!(got == expected, "echo altered: {} bytes", got.len());
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.arrival), ("allowed", "allowed", "proxy_v2"));
    assert_eq!((r.client_addr, r.original_dst), (app, Some(vip)));
    assert!(r.proxy_addr.is_some_and(|p| p.ip().is_loopback()), "{r:?}");
    assert_eq!(r.principal.as_deref(), Some(SLEEP));
    assert_eq!(
        (r.namespace.as_deref(), r.matched_rule.as_deref()),
        (Some("default"), Some("default-team:*.team.test"))
    );

    // Another namespace may not.
    let other = "spiffe://cluster.local/ns/other/sa/app";
    let alert = within("denied", refused(&h, &ztunnel_header(Some(other)), "a.team.test")).await;
    assert_eq!(alert, Some(AlertDescription::AccessDenied));
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.principal.as_deref()), ("denied", "policy_denied", Some(other)));
    assert_eq!(addr(&r).0, app);

    // No TLV: no identity, so only the global allow list applies.
    let alert = within("no identity", refused(&h, &ztunnel_header(None), "a.team.test")).await;
    assert_eq!(alert, Some(AlertDescription::AccessDenied));
    let r = h.record().await;
    assert_eq!((r.reason, r.principal.as_deref(), r.arrival), ("policy_denied", None, "proxy_v2"));
    within("global allow", ambient_exchange(&h, &ztunnel_header(None), "a.allowed.test", b"hi"))
        .await
        .expect("allowed");
    assert_eq!(h.record().await.decision, "allowed");

    // An identity outside the trust domain, or not a SPIFFE ID: refused
    // before the hello is read.
    for bad in ["spiffe://evil.example/ns/default/sa/sleep", "default/sleep"] {
        let mut tcp = TcpStream::connect(h.addr("ambient")).await.expect("connect");
        tcp.write_all(&ztunnel_header(Some(bad))).await.expect("header");
        tcp.write_all(&client_hello("a.team.test")).await.expect("hello");
        let (got, _) = within("bad identity", read_all(&mut tcp)).await;
        assert!(got.is_empty(), "{bad}: {got:?}");
        let r = h.record().await;
        assert_eq!((r.decision, r.reason, r.side), ("denied", "proxy_identity_invalid", Some("client")), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_the_header_reach_the_upstream_exactly_and_half_close_passes() {
    let mut h = Harness::with(options()).await;
    let mut sent = client_hello("capture.allowed.test");
    sent.extend_from_slice(&data(200_000, 5));
    for split in ["one write", "header alone first", "header in pieces"] {
        let mut tcp = TcpStream::connect(h.addr("ambient-capture")).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let header = ztunnel_header(Some(SLEEP));
        match split {
            "one write" => tcp.write_all(&[header.as_slice(), &sent].concat()).await.expect("write"),
            "header alone first" => {
                tcp.write_all(&header).await.expect("header");
                tcp.write_all(&sent).await.expect("rest");
            }
            _ => {
                for piece in header.chunks(5) {
                    tcp.write_all(piece).await.expect("piece");
                    tokio::task::yield_now().await;
                }
                tcp.write_all(&sent).await.expect("rest");
            }
        }
        // Half-close: the upstream sees the end of the stream and answers
        // by closing, which reaches the client.
        tcp.shutdown().await.expect("half-close");
        let (back, _) = within(split, read_all(&mut tcp)).await;
        assert!(back.is_empty());
        let got = h.capture.next().await;
        assert!(got == sent, "{split}: upstream got {} bytes, expected {} (no header bytes)", got.len(), sent.len());
        let r = h.record().await;
        assert_eq!((r.decision, r.arrival, r.bytes_from_client), ("allowed", "proxy_v2", sent.len() as u64), "{split}");
        assert_eq!(r.termination, "client_closed", "{split}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_missing_malformed_and_slow_headers_are_refused_with_their_reason() {
    let mut h = Harness::with(options()).await;

    // From a peer the listener does not trust: closed at once, nothing
    // parsed, whatever it sends.
    let mut tcp = TcpStream::connect(h.addr("remote")).await.expect("connect");
    let _ = tcp.write_all(&ztunnel_header(Some(SLEEP))).await;
    let (got, _) = within("untrusted", read_all(&mut tcp)).await;
    assert!(got.is_empty());
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.side, r.principal), ("denied", "untrusted_proxy", Some("policy"), None));

    let good = ztunnel_header(Some(SLEEP));
    let mut bad_version = good.clone();
    bad_version[12] = 0x31;
    let mut udp = good.clone();
    udp[13] = 0x12;
    let mut short = good.clone();
    short[15] = 4;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a bare ClientHello", client_hello("a.allowed.test"), "proxy_header_missing"),
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), "proxy_header_missing"),
        ("version 3", bad_version, "proxy_header_invalid"),
        ("UDP", udp, "proxy_header_invalid"),
        ("a length shorter than the addresses", short, "proxy_header_invalid"),
        ("v1 with a bad port", b"PROXY TCP4 10.0.0.1 10.0.0.2 99999 443\r\n".to_vec(), "proxy_header_invalid"),
        ("v1 without CRLF", [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 120]].concat(), "proxy_header_invalid"),
    ];
    for (what, bytes, reason) in cases {
        let mut tcp = TcpStream::connect(h.addr("ambient")).await.expect("connect");
        let _ = tcp.write_all(&bytes).await;
        let (got, _) = within(what, read_all(&mut tcp)).await;
        assert!(got.is_empty(), "{what}: no byte is answered");
        let r = h.record().await;
        assert_eq!((r.decision, r.reason, r.side), ("denied", reason, Some("client")), "{what}: {:?}", r.detail);
    }

    // Half a header, then silence: refused at the header timeout (here the
    // ClientHello timeout of 1 s).
    let mut tcp = TcpStream::connect(h.addr("ambient")).await.expect("connect");
    tcp.write_all(&good[..20]).await.expect("half a header");
    let started = std::time::Instant::now();
    let (got, _) = within("slow header", read_all(&mut tcp)).await;
    assert!(got.is_empty());
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.termination), ("error", "proxy_header_timeout", "proxy_header_timeout"));
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());

    // Closed in the middle of the header.
    let mut tcp = TcpStream::connect(h.addr("ambient")).await.expect("connect");
    tcp.write_all(&good[..10]).await.expect("part");
    drop(tcp);
    assert_eq!(h.record().await.reason, "client_closed_early");

    let text = scrape(h.metrics_addr).await;
    for reason in ["untrusted_proxy", "proxy_header_missing", "proxy_header_invalid", "proxy_header_timeout"] {
        assert!(sum(&text, "snigress_connections_total", &[("reason", reason)]) >= 1.0, "{reason} counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_local_and_ipv6_headers_and_no_per_source_limit_for_the_proxy() {
    let options = Options { sections: "limits:\n  max_connections_per_source: 2\n".into(), ..options() };
    let mut h = Harness::with(options).await;

    // v1 from an HAProxy-like proxy: addresses, no identity.
    let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.9 51000 443\r\n";
    within("v1", ambient_exchange(&h, v1, "a.allowed.test", b"hi")).await.expect("v1");
    let r = h.record().await;
    assert_eq!(
        (r.arrival, r.client_addr, r.original_dst),
        ("proxy_v1", "192.0.2.7:51000".parse().unwrap(), Some("198.51.100.9:443".parse().unwrap()))
    );

    // v2 LOCAL (a proxy's own health check): the proxy is the client.
    let local = snigress::arrive::proxy::testing::v2(0, 0x00, &[]);
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.7:0".parse().unwrap()).expect("bind");
    let tcp = socket.connect(h.addr("ambient")).await.expect("connect");
    let peer = tcp.local_addr().expect("addr");
    let mut tcp = tcp;
    tcp.write_all(&local).await.expect("header");
    within("local", exchange(h.inner(tcp, "a.allowed.test").await.expect("tls"), b"hi")).await.expect("local");
    let r = h.record().await;
    assert_eq!((r.arrival, r.client_addr, r.proxy_addr, r.original_dst), ("proxy_v2", peer, Some(peer), None));

    // IPv6 addresses in a v2 header.
    let (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        ("2001:db8::7".parse().unwrap(), "fd00::1".parse().unwrap());
    let payload = [&src.octets()[..], &dst.octets(), &4444u16.to_be_bytes(), &443u16.to_be_bytes()].concat();
    let v6 = snigress::arrive::proxy::testing::v2(1, 0x21, &payload);
    within("v6", ambient_exchange(&h, &v6, "a.allowed.test", b"hi")).await.expect("v6");
    let r = h.record().await;
    assert_eq!(r.client_addr, "[2001:db8::7]:4444".parse().unwrap());

    // One ztunnel carries many callers: five connections at once from the
    // same proxy address, against a per-source limit of two.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(h.addr("ambient")).await.expect("connect");
        tcp.write_all(&ztunnel_header(Some(SLEEP))).await.expect("header");
        held.push(within("held", h.inner(tcp, "a.allowed.test")).await.expect("not limited per source"));
    }
    for stream in &mut held {
        stream.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.expect("echo");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_in_front_of_the_outer_mtls_layer_keeps_the_certificates_identity() {
    // An L4 load balancer in front of an mtls listener: the header first,
    // then the mesh's outer mTLS, whose client certificate is the caller.
    let mut options = options();
    options.listeners.push_str(
        "  - name: mtls-behind-lb\n    address: 127.0.0.1:0\n    mode: mtls\n    upstream_port: {echo}\n    proxy_protocol:\n      trusted_sources: [127.0.0.0/8]\n",
    );
    let mut h = Harness::with(options).await;
    let mut tcp = TcpStream::connect(h.addr("mtls-behind-lb")).await.expect("connect");
    tcp.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.9 51000 8443\r\n").await.expect("header");
    let outer = within("outer", outer_over(tcp, &h.pki.roots(), Some(h.pki.client(SLEEP)), &[])).await.expect("outer");
    let inner = within("inner", h.inner(outer, "a.team.test")).await.expect("inner");
    let got = within("echo", exchange(inner, b"behind a balancer")).await.expect("echo");
    assert_eq!(got, b"behind a balancersni=a.team.test\n");
    let r = h.record().await;
    assert_eq!((r.mode, r.arrival, r.decision), ("mtls", "proxy_v1", "allowed"));
    assert_eq!(r.client_addr, "192.0.2.7:51000".parse().unwrap());
    assert_eq!((r.principal.as_deref(), r.matched_rule.as_deref()), (Some(SLEEP), Some("default-team:*.team.test")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_destination_strict_checks_the_headers_destination_against_the_name() {
    // Off (the ambient listeners above): a VIP no name resolves to is fine.
    // Strict: the name must resolve to the header's destination address.
    let mut options = options();
    options.listeners.push_str(
        "  - name: strict\n    address: 127.0.0.1:0\n    mode: passthrough\n    upstream_port: {echo}\n    verify_destination: strict\n    proxy_protocol:\n      trusted_sources: [127.0.0.0/8]\n",
    );
    let mut h = Harness::with(options).await;
    async fn through(h: &Harness, header: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut tcp = TcpStream::connect(h.addr("strict")).await?;
        tcp.write_all(header).await?;
        exchange(h.inner(tcp, "a.allowed.test").await?, b"x").await
    }
    // a.allowed.test resolves to 127.0.0.1.
    within("matching", through(&h, b"PROXY TCP4 10.0.0.1 127.0.0.1 5000 443\r\n")).await.expect("allowed");
    let r = h.record().await;
    assert_eq!((r.decision, r.upstream_addr.map(|a| a.ip())), ("allowed", Some([127, 0, 0, 1].into())));
    let e = within("mismatch", through(&h, b"PROXY TCP4 10.0.0.1 192.0.2.1 5000 443\r\n")).await.expect_err("refused");
    assert_eq!(alert_of(&e), Some(AlertDescription::AccessDenied));
    let r = h.record().await;
    assert_eq!((r.reason, r.upstream_addr), ("destination_mismatch", None), "{:?}", r.detail);
    // No address in the header: nothing to verify against, refused too.
    within("unknown", through(&h, b"PROXY UNKNOWN\r\n")).await.expect_err("refused");
    assert_eq!(h.record().await.reason, "destination_mismatch");
}
