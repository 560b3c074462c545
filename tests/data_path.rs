//! The data path end to end on real sockets: outer mesh mTLS, the inner
//! ClientHello, policy, DNS, vetting, connect, replay and splice, as a
//! client and an upstream see them, and the access record each leaves.

mod common;

use common::*;
use rustls::AlertDescription;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

fn echoed(data: &[u8], sni: &str) -> Vec<u8> {
    let mut expected = data.to_vec();
    expected.extend_from_slice(format!("sni={sni}\n").as_bytes());
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_allowed_name_carries_megabytes_both_ways() {
    let mut h = Harness::start().await;
    let payload = data(4 * MIB, 1);
    let reply = within("mtls exchange", async {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer handshake");
        let inner = h.inner(outer, "a.allowed.test").await.expect("inner handshake");
        exchange(inner, &payload).await.expect("exchange")
    })
    .await;
    assert!(reply == echoed(&payload, "a.allowed.test"), "reply differs ({} bytes)", reply.len());

    let r = h.record().await;
    assert_eq!((r.decision, r.reason), ("allowed", "allowed"));
    assert_eq!(r.listener, "mtls");
    assert_eq!(r.mode, "mtls");
    assert_eq!(r.sni.as_deref(), Some("a.allowed.test"));
    assert_eq!(r.principal.as_deref(), Some(SLEEP));
    assert_eq!(r.namespace.as_deref(), Some("default"));
    assert_eq!(r.service_account.as_deref(), Some("sleep"));
    assert_eq!(r.outer_sni.as_deref(), Some("localhost"));
    assert_eq!(r.matched_rule.as_deref(), Some("*.allowed.test"));
    assert_eq!(r.upstream_addr, Some(format!("127.0.0.1:{}", h.echo.port).parse().unwrap()));
    // Inner TLS framing adds to the payload in both directions.
    assert!(r.bytes_from_client > 4 * MIB as u64, "{}", r.bytes_from_client);
    assert!(r.bytes_to_client > 4 * MIB as u64, "{}", r.bytes_to_client);
    assert!(["client_closed", "upstream_closed"].contains(&r.termination), "{}", r.termination);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_allowed_name_carries_megabytes_both_ways() {
    let mut h = Harness::start().await;
    let payload = data(2 * MIB, 2);
    let reply = within("passthrough exchange", async {
        let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
        let inner = h.inner(tcp, "b.allowed.test").await.expect("inner handshake");
        exchange(inner, &payload).await.expect("exchange")
    })
    .await;
    assert!(reply == echoed(&payload, "b.allowed.test"));
    let r = h.record().await;
    assert_eq!((r.decision, r.mode, r.principal), ("allowed", "passthrough", None));
    assert_eq!(r.sni.as_deref(), Some("b.allowed.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_covers_every_depth_below_it() {
    let mut h = Harness::start().await;
    let reply = within("deep name", async {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
        let inner = h.inner(outer, "deep.x.y.allowed.test").await.expect("inner");
        exchange(inner, b"ping").await.expect("exchange")
    })
    .await;
    assert_eq!(reply, echoed(b"ping", "deep.x.y.allowed.test"));
    assert_eq!(h.record().await.matched_rule.as_deref(), Some("*.allowed.test"));
}

/// Connects through `listener` (as SLEEP for mtls ones) and returns the
/// inner handshake's failure.
async fn refused(h: &Harness, listener: &str, id: &str, sni: &str) -> std::io::Error {
    within("refusal", async {
        let result = if listener.starts_with("mtls") {
            let outer = h.outer(listener, id, &[]).await.expect("outer");
            h.inner(outer, sni).await.map(|_| ())
        } else {
            let tcp = TcpStream::connect(h.addr(listener)).await.expect("connect");
            h.inner(tcp, sni).await.map(|_| ())
        };
        result.expect_err("the inner handshake must fail")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_send_access_denied() {
    let mut h = Harness::start().await;
    // (name, matched pattern): the apex is not under its wildcard; deny wins
    // over allow; an unlisted name matches nothing.
    let cases =
        [("allowed.test", None), ("blocked.allowed.test", Some("blocked.allowed.test")), ("a.unlisted.test", None)];
    for (listener, (sni, matched)) in ["mtls", "passthrough", "mtls"].into_iter().zip(cases) {
        let e = refused(&h, listener, SLEEP, sni).await;
        assert_eq!(alert_of(&e), Some(AlertDescription::AccessDenied), "{sni}: {e}");
        let r = h.record().await;
        assert_eq!((r.decision, r.reason, r.termination), ("denied", "policy_denied", "refused"), "{sni}");
        assert_eq!(r.sni.as_deref(), Some(sni));
        assert_eq!(r.matched_rule.as_deref(), matched, "{sni}");
        assert_eq!(r.upstream_addr, None, "{sni}: refused names are never dialled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_identity_rules_follow_the_caller() {
    let mut h = Harness::start().await;
    let reply = within("team name as default/sleep", async {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
        let inner = h.inner(outer, "a.team.test").await.expect("inner");
        exchange(inner, b"hi").await.expect("exchange")
    })
    .await;
    assert_eq!(reply, echoed(b"hi", "a.team.test"));
    let r = h.record().await;
    assert_eq!(r.matched_rule.as_deref(), Some("default-team:*.team.test"));

    let e = refused(&h, "mtls", OTHER_APP, "a.team.test").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.reason, r.namespace.as_deref()), ("policy_denied", Some("other")));

    // Without an identity (passthrough) no rule applies.
    let e = refused(&h, "passthrough", SLEEP, "a.team.test").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::AccessDenied), "{e}");
    assert_eq!(h.record().await.reason, "policy_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_without_sni_gets_unrecognized_name() {
    let mut h = Harness::start().await;
    // rustls sends no server_name extension for an IP address.
    let e = refused(&h, "mtls", SLEEP, "127.0.0.1").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::UnrecognisedName), "{e}");
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.sni), ("denied", "no_sni", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_failures_and_vetting() {
    let mut h = Harness::start().await;

    // Cloud metadata address: refused, never dialled.
    let e = refused(&h, "mtls", SLEEP, "metadata.allowed.test").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.upstream_addr), ("denied", "address_refused", None));
    assert!(r.detail.as_deref().unwrap_or("").contains("169.254.169.254"), "{:?}", r.detail);

    let e = refused(&h, "passthrough", SLEEP, "missing.allowed.test").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::UnrecognisedName), "{e}");
    let r = h.record().await;
    assert_eq!((r.decision, r.reason), ("error", "dns_nxdomain"));

    let e = refused(&h, "passthrough", SLEEP, "closed.allowed.test").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::InternalError), "{e}");
    let r = h.record().await;
    assert_eq!((r.decision, r.reason), ("error", "connect_failed"));
    assert_eq!(r.upstream_addr, Some(format!("127.0.0.9:{}", h.echo.port).parse().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_address_is_skipped_for_the_next_one() {
    let mut h = Harness::start().await;
    let reply = within("two addresses", async {
        let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
        let inner = h.inner(tcp, "twoaddr.allowed.test").await.expect("inner");
        exchange(inner, b"x").await.expect("exchange")
    })
    .await;
    assert_eq!(reply, echoed(b"x", "twoaddr.allowed.test"));
    let r = h.record().await;
    assert_eq!(r.upstream_addr, Some(format!("127.0.0.1:{}", h.echo.port).parse().unwrap()));
    assert!(h.trap.hits.try_recv().is_err(), "the gateway dialled the denied address 127.0.0.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let mut h = Harness::start().await;
    let h_ref = &h;
    let runs = (0..200).map(|i| {
        Box::pin(async move {
            let payload = data(64 * 1024, i as u8);
            let sni = if i % 2 == 0 { "a.allowed.test" } else { "b.allowed.test" };
            let reply = if i % 2 == 0 {
                let outer = h_ref.outer("mtls", SLEEP, &[]).await.expect("outer");
                exchange(h_ref.inner(outer, sni).await.expect("inner"), &payload).await
            } else {
                let tcp = TcpStream::connect(h_ref.addr("passthrough")).await.expect("connect");
                exchange(h_ref.inner(tcp, sni).await.expect("inner"), &payload).await
            };
            reply.expect("exchange") == echoed(&payload, sni)
        })
    });
    let results = within("200 connections", join_all(runs)).await;
    assert_eq!(results.iter().filter(|ok| **ok).count(), 200);
    for _ in 0..200 {
        assert_eq!(h.record().await.decision, "allowed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_valid_mesh_identity_are_refused() {
    let mut h = Harness::start().await;
    let stranger = Pki::mint();
    let roots = h.pki.roots();
    let cases: [(&str, Option<_>, &str); 3] = [
        ("no client certificate", None, "outer_handshake_failed"),
        ("a certificate from another CA", Some(stranger.client(SLEEP)), "outer_handshake_failed"),
        ("a trust domain not configured", Some(h.pki.client(FOREIGN_DOMAIN)), "identity_refused"),
    ];
    for (what, identity, reason) in cases {
        let outcome = within(what, async {
            // In TLS 1.3 the client finishes its handshake before the server
            // has judged its certificate: the refusal shows on the first read.
            let mut outer = outer_connect(h.addr("mtls"), &roots, identity, &[]).await?;
            let _ = outer.write_all(&client_hello("a.allowed.test")).await;
            let (got, end) = read_all(&mut outer).await;
            assert!(got.is_empty(), "{what}: got {} bytes", got.len());
            end
        })
        .await;
        assert!(outcome.is_err(), "{what}: the connection must fail with an alert");
        let r = h.record().await;
        assert_eq!((r.decision, r.reason, r.termination), ("denied", reason, "handshake_failed"), "{what}");
        assert_eq!(r.sni, None, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outer_alpn_never_yields_istio_peer_exchange() {
    let h = Harness::start().await;
    let outer = within("outer", h.outer("mtls", SLEEP, &["istio-peer-exchange", "istio"])).await.expect("outer");
    assert_eq!(outer.get_ref().1.alpn_protocol(), None);
    let reply = within("inner", async { exchange(h.inner(outer, "a.allowed.test").await?, b"a").await })
        .await
        .expect("traffic still flows");
    assert_eq!(reply, echoed(b"a", "a.allowed.test"));

    let h = Harness::with(Options { mtls: vec!["alpn: [istio]".into()], ..Options::default() }).await;
    let outer = within("outer", h.outer("mtls", SLEEP, &["istio-peer-exchange", "istio"])).await.expect("outer");
    assert_eq!(outer.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
}

/// Sends `bytes` in writes of `chunk` bytes (flushing each, so each is its
/// own TCP segment or outer TLS record), then half-closes.
async fn send_in_pieces<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], chunk: usize) {
    for piece in bytes.chunks(chunk) {
        stream.write_all(piece).await.expect("write");
        stream.flush().await.expect("flush");
    }
    stream.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_hellos_are_read_whole_and_replayed_byte_exact() {
    let mut h = Harness::start().await;
    let hello = client_hello("capture.allowed.test");
    assert!(hello.len() > 1000, "rustls sends a post-quantum key share");
    let layouts = [
        ("one record", hello.clone()),
        ("two records", snigress::front::tls::testing::refragment(&hello, hello.len() / 2)),
        ("64-byte records", snigress::front::tls::testing::refragment(&hello, 64)),
        ("1-byte records", snigress::front::tls::testing::refragment(&hello, 1)),
    ];
    for (layout, bytes) in layouts {
        for (listener, chunk) in [("passthrough-capture", usize::MAX), ("passthrough-capture", 1), ("mtls-capture", 7)]
        {
            let mut sent = bytes.clone();
            sent.extend_from_slice(b"application bytes after the hello");
            let what = format!("{layout}, {listener}, writes of {chunk}");
            within(&what, async {
                if listener.starts_with("mtls") {
                    let mut outer = h.outer(listener, SLEEP, &[]).await.expect("outer");
                    send_in_pieces(&mut outer, &sent, chunk).await;
                    let _ = read_all(&mut outer).await;
                } else {
                    let mut tcp = TcpStream::connect(h.addr(listener)).await.expect("connect");
                    tcp.set_nodelay(true).expect("nodelay");
                    send_in_pieces(&mut tcp, &sent, chunk).await;
                    let _ = read_all(&mut tcp).await;
                }
            })
            .await;
            let got = h.capture.next().await;
            assert!(got == sent, "{what}: upstream got {} bytes, expected {}", got.len(), sent.len());
            let r = h.record().await;
            assert_eq!((r.decision, r.sni.as_deref()), ("allowed", Some("capture.allowed.test")), "{what}");
            assert_eq!(r.bytes_from_client, sent.len() as u64, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_tls_input_is_refused_at_once() {
    let mut h = Harness::start().await;
    let inputs: [(&str, &[u8]); 3] = [
        ("HTTP", b"GET / HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n"),
        ("SSLv2-compatible hello", &[0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10]),
        ("TLS application data first", &[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]),
    ];
    for listener in ["passthrough", "mtls"] {
        for (what, input) in inputs {
            let got = within(what, async {
                // The client does not half-close: the refusal must come from
                // the first bytes, not from a timeout or an EOF.
                if listener == "mtls" {
                    let mut outer = h.outer(listener, SLEEP, &[]).await.expect("outer");
                    outer.write_all(input).await.expect("write");
                    outer.flush().await.expect("flush");
                    read_all(&mut outer).await.0
                } else {
                    let mut tcp = TcpStream::connect(h.addr(listener)).await.expect("connect");
                    tcp.write_all(input).await.expect("write");
                    read_all(&mut tcp).await.0
                }
            })
            .await;
            assert!(got.is_empty(), "{what}: a non-TLS client gets no TLS alert, got {got:?}");
            let r = h.record().await;
            assert_eq!((r.decision, r.reason, r.termination), ("denied", "not_tls", "refused"), "{what} on {listener}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_hello_is_closed_after_the_timeout() {
    let options = Options { sections: "timeouts:\n  client_hello: 300ms\n".into(), ..Options::default() };
    let mut h = Harness::with(options).await;
    let hello = client_hello("a.allowed.test");

    let mut tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    tcp.write_all(&hello[..10]).await.expect("write");
    let (got, _) = within("stalled hello", read_all(&mut tcp)).await;
    assert!(got.is_empty());
    let r = h.record().await;
    assert_eq!((r.decision, r.reason, r.termination), ("error", "client_hello_timeout", "client_hello_timeout"));
    assert_eq!(r.bytes_from_client, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_mid_hello_is_logged_as_such() {
    let mut h = Harness::start().await;
    let hello = client_hello("a.allowed.test");
    let mut tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
    send_in_pieces(&mut tcp, &hello[..hello.len() - 1], usize::MAX).await;
    let _ = within("truncated hello", read_all(&mut tcp)).await;
    let r = h.record().await;
    assert_eq!((r.reason, r.termination), ("client_closed_early", "client_closed"));
    assert_eq!(r.bytes_from_client, hello.len() as u64 - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_hello_is_refused_with_decode_error() {
    let options = Options { sections: "limits:\n  client_hello_bytes: 512\n".into(), ..Options::default() };
    let mut h = Harness::with(options).await;
    let e = refused(&h, "passthrough", SLEEP, "a.allowed.test").await;
    assert_eq!(alert_of(&e), Some(AlertDescription::DecodeError), "{e}");
    let r = h.record().await;
    assert_eq!((r.decision, r.reason), ("denied", "client_hello_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_moves_on_to_the_next_address() {
    let mut h = Harness::start().await;
    // The resolver hands the addresses over in zone order, so the gateway
    // really tries 127.0.0.9 (nothing listens) before 127.0.0.1.
    let settings = snigress::resolve::ResolverSettings {
        nameservers: Some(vec![h.dns.addr]),
        ip_family: Default::default(),
        min_ttl: std::time::Duration::from_secs(1),
        max_ttl: std::time::Duration::from_secs(60),
        cache_size: 16,
        timeout: std::time::Duration::from_secs(10),
        vetting: snigress::resolve::Vetting {
            allow_cidrs: vec![snigress::resolve::vet::parse_cidr("127.0.0.0/8").unwrap()],
            deny_cidrs: Vec::new(),
        },
    };
    let resolver = snigress::resolve::Resolver::new(&settings).expect("resolver");
    let name = snigress::name::ServerName::parse("fallback.allowed.test").unwrap();
    let resolved = within("resolve", resolver.resolve(&name)).await.expect("resolves");
    assert_eq!(resolved.addrs, ["127.0.0.9".parse::<std::net::IpAddr>().unwrap(), "127.0.0.1".parse().unwrap()]);

    let reply = within("fallback", async {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
        exchange(h.inner(outer, "fallback.allowed.test").await.expect("inner"), b"z").await.expect("exchange")
    })
    .await;
    assert_eq!(reply, echoed(b"z", "fallback.allowed.test"));
    let r = h.record().await;
    assert_eq!(r.upstream_addr, Some(format!("127.0.0.1:{}", h.echo.port).parse().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_counted_when_the_client_resets() {
    let mut h = Harness::start().await;
    let mut sent = client_hello("capture.allowed.test");
    sent.extend_from_slice(&data(100_000, 3));
    within("reset", async {
        let mut tcp = TcpStream::connect(h.addr("passthrough-capture")).await.expect("connect");
        tcp.write_all(&sent).await.expect("write");
        // Once the upstream has everything, reset instead of closing.
        h.capture.progress.wait_for(|n| *n >= sent.len()).await.expect("capture running");
        socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO)).expect("linger");
        drop(tcp);
    })
    .await;
    let r = h.record().await;
    assert_eq!((r.decision, r.termination), ("allowed", "client_error"));
    // The upstream received every byte; the record counts every one of them.
    assert_eq!(r.bytes_from_client, sent.len() as u64);
}

#[test]
fn a_real_hello_needs_more_at_every_prefix_then_completes() {
    use snigress::front::tls::{HelloReader, Progress};
    let hello = client_hello("prefix.allowed.test");
    for layout in [hello.clone(), snigress::front::tls::testing::refragment(&hello, 100)] {
        let mut reader = HelloReader::new(16 * 1024);
        for end in 0..layout.len() {
            assert_eq!(reader.advance(&layout[..end]), Ok(Progress::NeedMore), "prefix {end}");
        }
        match reader.advance(&layout) {
            Ok(Progress::Complete(h)) => {
                assert_eq!(h.server_name.as_deref(), Some(&b"prefix.allowed.test"[..]));
                assert_eq!(h.len, layout.len());
            }
            other => panic!("{other:?}"),
        }
    }
}

/// An outer handshake offering only `version`.
async fn outer_with(h: &Harness, version: &'static rustls::SupportedProtocolVersion) -> std::io::Result<OuterStream> {
    let (certs, key) = h.pki.client(SLEEP);
    let config = rustls::ClientConfig::builder_with_provider(snigress::arrive::mtls::provider())
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(h.pki.roots())
        .with_client_auth_cert(certs, key)
        .expect("client cert");
    let tcp = TcpStream::connect(h.addr("mtls")).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outer_layer_takes_tls_1_2_and_1_3_unless_min_version_says_1_3() {
    use rustls::version::{TLS12, TLS13};
    let h = Harness::start().await;
    for version in [&TLS12, &TLS13] {
        let outer = within("outer", outer_with(&h, version)).await.expect("accepted by default");
        assert_eq!(outer.get_ref().1.protocol_version(), Some(version.version));
    }
    drop(h);

    let mut h = Harness::with(Options { mtls: vec!["min_version: \"1.3\"".into()], ..Options::default() }).await;
    within("TLS 1.3", outer_with(&h, &TLS13)).await.expect("TLS 1.3 is accepted");
    let e = within("TLS 1.2", outer_with(&h, &TLS12)).await.map(|_| ()).expect_err("TLS 1.2 is refused");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::ProtocolVersion), "{e}");
    // Two records: the TLS 1.3 caller that left, and the refused one.
    let reasons = [h.record().await.reason, h.record().await.reason];
    assert!(reasons.contains(&"outer_handshake_failed"), "{reasons:?}");
}
