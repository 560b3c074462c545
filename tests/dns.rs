//! DNS timing against a slow and lossy nameserver: an answer that arrives
//! within `timeouts.dns` is used, whichever query it answers; a lost first
//! packet is recovered by the second query; nothing waits past the budget;
//! and a lookup sends a bounded number of queries.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use snigress::name::ServerName;
use snigress::resolve::{ResolveError, Resolver, ResolverSettings, Vetting};
use tokio::net::TcpStream;

/// `timeouts.dns` in these tests.
const BUDGET: Duration = Duration::from_secs(1);
/// Slack for scheduling on a loaded machine, on top of the budget.
const SLACK: Duration = Duration::from_millis(400);
/// Queries one lookup may send for one record type: the first and two
/// resends.
const MAX_QUERIES: usize = 3;

fn resolver(nameserver: SocketAddr) -> Resolver {
    Resolver::new(&ResolverSettings {
        nameservers: Some(vec![nameserver]),
        ip_family: Default::default(),
        min_ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(300),
        cache_size: 64,
        timeout: BUDGET,
        vetting: Vetting { allow_cidrs: vec!["127.0.0.0/8".parse().expect("cidr")], deny_cidrs: vec![] },
    })
    .expect("resolver")
}

fn name(n: &str) -> ServerName {
    ServerName::parse(n).expect("name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_anywhere_inside_the_budget_is_used() {
    for fraction in [0.2, 0.5, 0.9] {
        let names: Vec<String> = (0..4).map(|i| format!("r{i}.slow.test")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let dns = SlowDns::start(&refs, BUDGET.mul_f64(fraction), 0).await;
        let resolver = resolver(dns.addr);
        // Several lookups, each of a name not seen before (nothing cached).
        for n in &names {
            let asked = Instant::now();
            let resolved = resolver.resolve(&name(n)).await;
            let took = asked.elapsed();
            assert!(resolved.is_ok(), "answer at {fraction} of the budget: {resolved:?} after {took:?}");
            assert!(took < BUDGET + SLACK, "{took:?}");
        }
        assert!(dns.queries() <= MAX_QUERIES * names.len(), "{} queries for {} lookups", dns.queries(), names.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_the_budget_is_a_timeout_within_the_budget() {
    let dns = SlowDns::start(&["late.slow.test"], BUDGET.mul_f64(1.5), 0).await;
    let resolver = resolver(dns.addr);
    let asked = Instant::now();
    let resolved = resolver.resolve(&name("late.slow.test")).await;
    let took = asked.elapsed();
    assert!(matches!(resolved, Err(ResolveError::Timeout)), "{resolved:?}");
    assert!(took >= BUDGET && took < BUDGET + SLACK, "{took:?}");
    assert!(dns.queries() <= MAX_QUERIES, "{} queries", dns.queries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_first_packet_is_recovered_by_the_second_query() {
    let dns = SlowDns::start(&["lossy.slow.test"], Duration::ZERO, 1).await;
    let resolver = resolver(dns.addr);
    let asked = Instant::now();
    let resolved = resolver.resolve(&name("lossy.slow.test")).await;
    assert!(resolved.is_ok(), "{resolved:?}");
    assert!(asked.elapsed() < BUDGET, "recovered inside the budget: {:?}", asked.elapsed());
    assert_eq!(dns.queries(), 2, "the first, lost, and the one that recovered it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_gets_a_bounded_number_of_queries() {
    let dns = SlowDns::start(&["silent.slow.test"], Duration::ZERO, usize::MAX).await;
    let resolver = resolver(dns.addr);
    let resolved = resolver.resolve(&name("silent.slow.test")).await;
    assert!(matches!(resolved, Err(ResolveError::Timeout)), "{resolved:?}");
    // Nothing is still being retried behind the lookup's back.
    tokio::time::sleep(BUDGET).await;
    assert_eq!(dns.queries(), MAX_QUERIES);
}

/// Through a gateway: a slow answer inside the budget lets the connection
/// through; one past it is refused with internal_error at the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_follow_the_budget_end_to_end() {
    let internet = Internet::new();
    let echo = Echo::start(internet.server.clone()).await;
    for (delay, allowed) in [(BUDGET.mul_f64(0.9), true), (BUDGET.mul_f64(1.5), false)] {
        let dns = SlowDns::start(&["a.allowed.test"], delay, 0).await;
        let text = format!(
            "listeners:\n  - {{name: pt, address: 127.0.0.1:0, mode: passthrough, upstream_port: {}}}\npolicy:\n  allow: [\"*.allowed.test\"]\nresolver:\n  nameservers: [\"{}\"]\n  allow_cidrs: [127.0.0.0/8]\ntimeouts:\n  dns: 1s\n",
            echo.port, dns.addr
        );
        let config = snigress::config::Config::parse(&text, "dns.yaml", std::path::Path::new(".")).expect("config");
        let (tx, mut records) = tokio::sync::mpsc::unbounded_channel();
        let gateway =
            snigress::gateway::Gateway::bind(&config, std::sync::Arc::new(snigress::observe::access_log::Channel(tx)))
                .await
                .expect("bind");
        let addr = gateway.local_addrs()[0].1;
        tokio::spawn(gateway.serve(std::future::pending()));

        let asked = Instant::now();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let result = within("connection", async {
            let tls = inner_connect(tcp, "a.allowed.test", internet.roots.clone()).await?;
            exchange(tls, b"hi").await
        })
        .await;
        let took = asked.elapsed();
        let r = within("record", records.recv()).await.expect("record");
        if allowed {
            assert_eq!(result.expect("allowed"), b"hisni=a.allowed.test\n");
            assert_eq!(r.decision, "allowed");
        } else {
            let e = result.expect_err("refused");
            assert_eq!(alert_of(&e), Some(rustls::AlertDescription::InternalError), "{e}");
            assert_eq!((r.reason, r.termination, r.side), ("dns_timeout", "dns_timeout", Some("upstream")));
            assert!(took < BUDGET + SLACK, "the client hears back at the budget: {took:?}");
        }
    }
}

/// Hellos that break the RFC are refused before any lookup: the nameserver
/// sees no query, the client gets decode_error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_invalid_hellos_cost_no_lookup() {
    use snigress::front::tls::testing::{hello_for, hello_parts, sni_ext};
    use tokio::io::AsyncWriteExt;
    let dns = SlowDns::start(&["a.allowed.test"], Duration::ZERO, 0).await;
    let text = format!(
        "listeners:\n  - {{name: pt, address: 127.0.0.1:0, mode: passthrough}}\npolicy:\n  allow: [\"*.allowed.test\"]\nresolver:\n  nameservers: [\"{}\"]\n",
        dns.addr
    );
    let config = snigress::config::Config::parse(&text, "dns.yaml", std::path::Path::new(".")).expect("config");
    let (tx, mut records) = tokio::sync::mpsc::unbounded_channel();
    let gateway =
        snigress::gateway::Gateway::bind(&config, std::sync::Arc::new(snigress::observe::access_log::Channel(tx)))
            .await
            .expect("bind");
    let addr = gateway.local_addrs()[0].1;
    tokio::spawn(gateway.serve(std::future::pending()));
    let sni = sni_ext(&[(0, b"a.allowed.test")]);
    let mut ssl3 = hello_for("a.allowed.test");
    ssl3[2] = 0;
    for hello in [hello_parts(&[], &[0], &sni), hello_parts(&[0x13, 0x01], &[], &sni), ssl3] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&hello).await.expect("write");
        let (got, _) = within("refused", read_all(&mut tcp)).await;
        assert_eq!(got, snigress::front::tls::alert::record(snigress::front::tls::alert::DECODE_ERROR));
        drop(tcp); // the gateway lingers for the client's close
        let r = within("record", records.recv()).await.expect("record");
        assert_eq!((r.decision, r.reason), ("denied", "client_hello_invalid"), "{r:?}");
    }
    assert_eq!(dns.queries(), 0, "no lookup for an invalid hello");
}

/// A UDP answer of about 2.4 KB without the truncation bit, from a server
/// that ignores the EDNS size it was given: never a cacheable "no
/// addresses"; the answer is had over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_udp_answer_is_retried_over_tcp() {
    let dns = SlowDns::oversized(&["big.slow.test"], 150, true).await;
    let resolver = resolver(dns.addr);
    let resolved = resolver.resolve(&name("big.slow.test")).await.expect("resolved over TCP");
    assert_eq!(resolved.addrs.len(), 150);
    assert!(dns.tcp_queries.load(std::sync::atomic::Ordering::SeqCst) >= 1, "asked over TCP");

    // Without TCP: a DNS error (dns_error), not "no addresses".
    let dns = SlowDns::oversized(&["big.slow.test"], 150, false).await;
    let resolver = self::resolver(dns.addr);
    let resolved = resolver.resolve(&name("big.slow.test")).await;
    assert!(matches!(resolved, Err(ResolveError::Failed(_))), "{resolved:?}");
    assert_eq!(resolved.map(|_| ()).unwrap_err().reason(), "dns_error");
}
