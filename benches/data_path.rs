//! Micro-benchmarks of the per-connection work that is not I/O: reading the
//! ClientHello (real clients, whole and fragmented), validating the name,
//! deciding the policy (its cost must not grow with the pattern count), and
//! serialising the access record.
//!
//!     cargo bench --bench data_path

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use snigress::front::tls::testing::refragment;
use snigress::front::tls::{HelloReader, Progress};
use snigress::name::ServerName;
use snigress::observe::access_log::Record;
use snigress::policy::{Pattern, Policy, PolicySpec};

const CLIENTS: &[&str] = &["curl", "openssl-tls12", "go", "chromium", "rustls"];

fn fixture(client: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/corpus/{client}.bin"));
    std::fs::read(path).expect("corpus fixture")
}

fn client_hello(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_hello");
    for client in CLIENTS {
        let whole = fixture(client);
        let fragmented = refragment(&whole, 100);
        group.throughput(Throughput::Bytes(whole.len() as u64));
        for (layout, bytes) in [("whole", &whole), ("100-byte records", &fragmented)] {
            group.bench_with_input(BenchmarkId::new(*client, layout), bytes, |b, bytes| {
                b.iter(|| match HelloReader::new(16 * 1024).advance(black_box(bytes)) {
                    Ok(Progress::Complete(hello)) => hello.len,
                    other => panic!("{other:?}"),
                })
            });
        }
    }
    group.finish();
}

fn name_validation(c: &mut Criterion) {
    let mut group = c.benchmark_group("name");
    for name in ["api.github.com", "A-Very.Long.Subdomain.Name.Of.Some.Service.Example.Com.", "xn--bcher-kva.example"] {
        group.bench_with_input(BenchmarkId::from_parameter(name), name.as_bytes(), |b, raw| {
            b.iter(|| ServerName::from_bytes(black_box(raw)).map(|n| n.as_str().len()))
        });
    }
    group.finish();
}

/// `n` patterns: half exact names, half wildcards, all distinct.
fn policy_of(n: usize) -> Policy {
    let allow = (0..n)
        .map(|i| {
            let text = if i % 2 == 0 { format!("host{i}.example.org") } else { format!("*.svc{i}.example.com") };
            Pattern::parse(&text).expect("pattern")
        })
        .collect();
    let deny = vec![Pattern::parse("blocked.svc1.example.com").expect("pattern")];
    Policy::compile(&PolicySpec { allow, deny, ..Default::default() })
}

fn policy_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    let allowed = ServerName::parse("api.v2.svc1.example.com").expect("name");
    let unlisted = ServerName::parse("www.unlisted.example.net").expect("name");
    for n in [10, 1_000, 10_000] {
        let policy = policy_of(n);
        group.bench_with_input(BenchmarkId::new("allowed", n), &policy, |b, p| {
            b.iter(|| p.decide(black_box(&allowed), None))
        });
        group.bench_with_input(BenchmarkId::new("unlisted", n), &policy, |b, p| {
            b.iter(|| p.decide(black_box(&unlisted), None))
        });
    }
    group.finish();
}

fn access_record(c: &mut Criterion) {
    let record = Record {
        start_time: "2026-11-24T17:28:46.575Z".into(),
        duration_ms: 412,
        listener: "mesh".into(),
        mode: "mtls",
        arrival: "tcp",
        protocol: Some("tls"),
        client_addr: "10.1.2.3:51234".parse().expect("addr"),
        proxy_addr: None,
        original_dst: None,
        outer_sni: Some("outbound_.443_._.snigress.snigress.svc.cluster.local".into()),
        principal: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
        namespace: Some("default".into()),
        service_account: Some("sleep".into()),
        sni: Some("de.wikipedia.org".into()),
        connect_authority: None,
        tunnel_sni: None,
        ech: false,
        decision: "allowed",
        reason: "allowed",
        side: None,
        matched_rule: Some("*.wikipedia.org".into()),
        upstream_addr: Some("185.15.59.224:443".parse().expect("addr")),
        route: None,
        audit: None,
        audit_reason: None,
        http_status: None,
        bytes_from_client: 1790,
        bytes_to_client: 84211,
        termination: "client_closed",
        detail: None,
    };
    let mut buf = Vec::with_capacity(1024);
    c.bench_function("access_record/json", |b| {
        b.iter(|| {
            buf.clear();
            serde_json::to_writer(&mut buf, black_box(&record)).expect("serialise");
            buf.len()
        })
    });
}

criterion_group!(benches, client_hello, name_validation, policy_decision, access_record);
criterion_main!(benches);
