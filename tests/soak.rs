//! A soak with faults: a couple of thousand connections through both
//! listener kinds with random sizes while upstreams reset some, DNS fails
//! for some names, clients vanish mid-transfer, the policy is reloaded and
//! the certificates rotated. Every completed transfer must be exact, every
//! failure logged with its reason, and nothing may leak.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use snigress::observe::access_log::Record;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

const CONNECTIONS: usize = 2_000;
const CONCURRENCY: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Exchange `size` bytes with the echo and expect them back exactly.
    Normal,
    /// The upstream resets after its first read.
    UpstreamReset,
    /// NXDOMAIN.
    DnsFailure,
    /// Not in the policy.
    Denied,
    /// The client sends part of its data, then resets.
    ClientVanishes,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// One connection of the given kind; returns the client's address (what
/// the access record names) and whether the client saw what it should.
async fn one(
    h: &Harness,
    gateway_roots: &Arc<RootCertStore>,
    (i, mtls, kind, size): (usize, bool, Kind, usize),
) -> (SocketAddr, bool) {
    let listener = if mtls { "mtls" } else { "passthrough" };
    // Each connection from its own loopback address, so its access record
    // is found by client address even when ports are reused.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let ip = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
    socket.bind(SocketAddr::new(ip.into(), 0)).expect("bind a loopback address");
    let tcp = socket.connect(h.addr(listener)).await.expect("connect");
    let seed = i as u8;
    let local = tcp.local_addr().expect("local address");
    if kind == Kind::ClientVanishes {
        // Closing will then reset the connection instead of ending it.
        socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).expect("linger");
    }
    let sni = match kind {
        Kind::Normal | Kind::ClientVanishes => {
            if seed.is_multiple_of(2) {
                "a.allowed.test"
            } else {
                "b.allowed.test"
            }
        }
        Kind::UpstreamReset => "reset.allowed.test",
        Kind::DnsFailure => "missing.allowed.test",
        Kind::Denied => "a.unlisted.test",
    };
    let ok = if mtls {
        let config = client_config(gateway_roots.clone(), Some(h.pki.client(SLEEP)), &[]);
        let name = ServerName::try_from("localhost").expect("name");
        match TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
            Ok(outer) => run(h, outer, kind, sni, size, seed).await,
            Err(e) => panic!("outer handshake failed: {e}"),
        }
    } else {
        run(h, tcp, kind, sni, size, seed).await
    };
    (local, ok)
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    h: &Harness,
    io: S,
    kind: Kind,
    sni: &str,
    size: usize,
    seed: u8,
) -> bool {
    let inner = h.inner(io, sni).await;
    match kind {
        Kind::DnsFailure => {
            alert_of(&inner.err().expect("refused")) == Some(rustls::AlertDescription::UnrecognisedName)
        }
        Kind::Denied => alert_of(&inner.err().expect("refused")) == Some(rustls::AlertDescription::AccessDenied),
        Kind::Normal => {
            let payload = data(size, seed);
            let reply = exchange(inner.expect("inner handshake"), &payload).await.expect("exchange");
            let mut expected = payload;
            expected.extend_from_slice(format!("sni={sni}\n").as_bytes());
            reply == expected
        }
        Kind::UpstreamReset => {
            let payload = data(size.max(10), seed);
            // The transfer must fail: never a complete echo with its trailer.
            match exchange(inner.expect("inner handshake"), &payload).await {
                Ok(reply) => !reply.ends_with(format!("sni={sni}\n").as_bytes()),
                Err(_) => true,
            }
        }
        Kind::ClientVanishes => {
            let mut stream = inner.expect("inner handshake");
            let payload = data(size.max(10) / 2, seed);
            let _ = stream.write_all(&payload).await;
            let _ = stream.flush().await;
            drop(stream); // SO_LINGER 0: a reset, mid-transfer
            true
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_with_faults() {
    let mut h = Harness::start().await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let next = Pki::mint();
    // Callers trust the old and the new mesh CA through the rotation.
    let mut both = RootCertStore::empty();
    for pki in [&h.pki, &next] {
        for cert in rustls::pki_types::pem::PemObject::pem_file_iter(pki.path("ca.pem")).expect("CA") {
            both.add(cert.expect("cert")).expect("root");
        }
    }
    let both = Arc::new(both);
    let old_ca = std::fs::read(h.pki.path("ca.pem")).expect("ca");
    let baseline_fds = open_fds();
    let baseline_rss = rss();

    let plan: Vec<(usize, bool, Kind, usize)> = (0..CONNECTIONS)
        .map(|i| {
            let kind = match rng.random_range(0..100) {
                0..70 => Kind::Normal,
                70..80 => Kind::UpstreamReset,
                80..85 => Kind::DnsFailure,
                85..90 => Kind::Denied,
                _ => Kind::ClientVanishes,
            };
            (i, rng.random_bool(0.5), kind, rng.random_range(0..96 * 1024))
        })
        .collect();

    let mut results: Vec<(SocketAddr, bool, Kind, usize)> = Vec::new();
    for (round, chunk) in plan.chunks(CONNECTIONS / 4).enumerate() {
        // Between rounds: reload the policy, then rotate the certificates.
        match round {
            1 => {
                let text = h
                    .config_with(&Options::default())
                    .replace("deny: [blocked.allowed.test]", "deny: [blocked.allowed.test, x.allowed.test]");
                h.write_config(&text);
                assert!(h.reloader.reload("soak").is_ok());
            }
            2 => {
                let bundle = [old_ca.clone(), std::fs::read(next.path("ca.pem")).expect("ca")].concat();
                replace_file(&h.pki.path("gateway.key"), &std::fs::read(next.path("gateway.key")).expect("key"));
                replace_file(&h.pki.path("gateway.pem"), &std::fs::read(next.path("gateway.pem")).expect("cert"));
                replace_file(&h.pki.path("ca.pem"), &bundle);
                assert!(h.reloader.reload("soak").is_ok());
            }
            _ => {}
        }
        for batch in chunk.chunks(CONCURRENCY) {
            let runs = batch.iter().map(|&planned| {
                let (h, both) = (&h, &both);
                Box::pin(async move {
                    let (addr, ok) = one(h, both, planned).await;
                    (addr, ok, planned.2, planned.3)
                })
            });
            results.extend(within(&format!("round {round}"), join_all(runs)).await);
        }
    }

    // Every connection left one record, with the reason its fault implies.
    let mut records: HashMap<SocketAddr, Record> = HashMap::new();
    for _ in 0..CONNECTIONS {
        let r = h.record().await;
        records.insert(r.client_addr, r);
    }
    let mut wrong = Vec::new();
    for (addr, ok, kind, size) in &results {
        if !ok {
            wrong.push(format!("{addr} {kind:?}: the client did not see what it should"));
        }
        let Some(r) = records.get(addr) else {
            wrong.push(format!("{addr} {kind:?}: no access record"));
            continue;
        };
        let fits = match kind {
            Kind::Normal => {
                r.decision == "allowed"
                    && ["client_closed", "upstream_closed"].contains(&r.termination)
                    && r.bytes_from_client >= *size as u64
                    && r.bytes_to_client >= *size as u64
            }
            Kind::UpstreamReset => r.decision == "allowed" && r.termination == "upstream_error",
            Kind::DnsFailure => r.reason == "dns_nxdomain",
            Kind::Denied => r.reason == "policy_denied",
            Kind::ClientVanishes => r.decision == "allowed" && r.termination == "client_error",
        };
        if !fits {
            wrong.push(format!("{kind:?} size {size}: {r:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {CONNECTIONS} wrong:\n{}", wrong.len(), wrong[..wrong.len().min(10)].join("\n"));
    let counts = |k: Kind| results.iter().filter(|r| r.2 == k).count();
    println!(
        "soak: {CONNECTIONS} connections: {} exact transfers, {} upstream resets, {} DNS failures, {} denied, {} vanished clients",
        counts(Kind::Normal),
        counts(Kind::UpstreamReset),
        counts(Kind::DnsFailure),
        counts(Kind::Denied),
        counts(Kind::ClientVanishes)
    );

    // Nothing leaked: no connection left open, descriptors back to where
    // they were, memory bounded.
    let text = scrape(h.metrics_addr).await;
    assert_eq!(sum(&text, "snigress_active_connections", &[]), 0.0);
    assert_eq!(sum(&text, "snigress_connections_total", &[]), CONNECTIONS as f64);
    let fds = open_fds();
    assert!(fds <= baseline_fds + 16, "open descriptors {baseline_fds} -> {fds}");
    let grown = rss().saturating_sub(baseline_rss);
    println!("soak: open fds {baseline_fds} -> {fds}; RSS grew {} MiB", grown >> 20);
    assert!(grown < 256 << 20, "RSS grew {} MiB", grown >> 20);
}
