//! `snigress sidecar`: a caller without a mesh reaches the gateway through
//! it, verified by name or by SPIFFE ID, in-process and as the binary.

mod common;

use std::time::Duration;

use common::*;
use snigress::identity::Principal;
use snigress::tools::sidecar::{ISTIO_ALPN, Settings, Sidecar};
use tokio::net::TcpStream;

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/snigress/sa/snigress";

fn settings(h: &Harness, server_name: &str, gateway_id: Option<&str>) -> Settings {
    let (cert, key) = snigress::tools::devcerts::client_files(&Principal::parse(SLEEP).unwrap());
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        gateway: h.addr("mtls").to_string(),
        server_name: server_name.into(),
        gateway_id: gateway_id.map(|id| Principal::parse(id).unwrap()),
        cert: h.pki.path(&cert),
        key: h.pki.path(&key),
        ca: h.pki.path("ca.pem"),
        alpn: ISTIO_ALPN.iter().map(|p| p.to_string()).collect(),
        connect_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    }
}

async fn start(settings: Settings) -> std::net::SocketAddr {
    let sidecar = Sidecar::bind(settings).await.expect("sidecar binds");
    let addr = sidecar.local_addr().expect("address");
    tokio::spawn(sidecar.serve());
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_a_mesh_goes_through_the_sidecar() {
    let mut h = Harness::start().await;
    let sidecar = start(settings(&h, "localhost", None)).await;
    let payload = data(300_000, 4);
    let reply = within("through the sidecar", async {
        let tcp = TcpStream::connect(sidecar).await.expect("connect to the sidecar");
        exchange(h.inner(tcp, "a.allowed.test").await.expect("inner TLS end to end"), &payload).await.expect("x")
    })
    .await;
    let mut expected = payload.clone();
    expected.extend_from_slice(b"sni=a.allowed.test\n");
    assert!(reply == expected);
    let r = h.record().await;
    assert_eq!((r.listener.as_str(), r.decision), ("mtls", "allowed"));
    assert_eq!(r.principal.as_deref(), Some(SLEEP));
    assert_eq!(r.outer_sni.as_deref(), Some("localhost"));

    // A refusal reaches the application as the gateway sent it.
    let e = within("refused", async {
        let tcp = TcpStream::connect(sidecar).await.expect("connect");
        h.inner(tcp, "a.unlisted.test").await.map(|_| ()).expect_err("refused")
    })
    .await;
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_can_be_verified_by_spiffe_id() {
    let h = Harness::start().await;
    // The outer SNI is an Istio-style cluster name the certificate does not carry.
    let istio_sni = "outbound_.443_._.snigress.snigress.svc.cluster.local";
    let by_id = start(settings(&h, istio_sni, Some(GATEWAY_ID))).await;
    let reply = within("by id", async {
        let tcp = TcpStream::connect(by_id).await.expect("connect");
        exchange(h.inner(tcp, "b.allowed.test").await.expect("inner"), b"x").await.expect("x")
    })
    .await;
    assert_eq!(reply, b"xsni=b.allowed.test\n");

    // The wrong identity, or the wrong name without an identity: no connection.
    for (name, id) in [(istio_sni, Some("spiffe://cluster.local/ns/other/sa/impostor")), (istio_sni, None)] {
        let wrong = start(settings(&h, name, id)).await;
        let result = within("wrong gateway", async {
            let tcp = TcpStream::connect(wrong).await.expect("connect");
            h.inner(tcp, "b.allowed.test").await.map(|_| ())
        })
        .await;
        assert!(result.is_err(), "{id:?}: the sidecar must not carry traffic to an unverified gateway");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sidecar_carries_traffic() {
    let mut h = Harness::start().await;
    let s = settings(&h, "localhost", None);
    let gateway = s.gateway.clone();
    let (cert, key, ca) = (s.cert.display().to_string(), s.key.display().to_string(), s.ca.display().to_string());
    let running = Running::with_args(&[
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--gateway",
        &gateway,
        "--server-name",
        "localhost",
        "--cert",
        &cert,
        "--key",
        &key,
        "--ca",
        &ca,
    ]);
    let line = json(&running.diag("sidecar listening"));
    let addr: std::net::SocketAddr = line["fields"]["address"].as_str().expect("address").parse().expect("addr");
    let reply = within("binary sidecar", async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        exchange(h.inner(tcp, "a.allowed.test").await.expect("inner"), b"hello").await.expect("x")
    })
    .await;
    assert_eq!(reply, b"hellosni=a.allowed.test\n");
    assert_eq!(h.record().await.principal.as_deref(), Some(SLEEP));
    let status = running.stop();
    assert!(status.success(), "{status:?}");
}
