//! The HTTP fronts end to end: CONNECT (HTTPS_PROXY clients, the tunnelled
//! SNI bound to the CONNECT host), plain HTTP routed by Host, and one port
//! that detects which; with real clients (curl, Python) and hostile heads.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The gateway with a CONNECT listener (plain and over mTLS), a plain-HTTP
/// listener and an `auto` one, and the origins they lead to.
struct World {
    h: Harness,
    /// HTTPS origin (an HTTP server behind TLS, certificate for the zone).
    https: Origin,
    /// Plain-HTTP origin.
    web: Origin,
    /// The internet CA as a file, for curl and Python.
    ca: std::path::PathBuf,
}

async fn world(sections: &str) -> World {
    let internet = Internet::new();
    let https = Origin::start(Some(internet.server.clone())).await;
    let web = Origin::start(None).await;
    let listeners = format!(
        "  - name: proxy
    address: 127.0.0.1:0
    mode: passthrough
    protocol: connect
  - name: mesh-proxy
    address: 127.0.0.1:0
    mode: mtls
    protocol: connect
  - name: web
    address: 127.0.0.1:0
    mode: passthrough
    protocol: http
    upstream_port: {web}
  - name: proxy-and-web
    address: 127.0.0.1:0
    mode: passthrough
    protocol: [connect, http]
    http_upstream_port: {web}
  - name: proxied
    address: 127.0.0.1:0
    mode: passthrough
    protocol: connect
    proxy_protocol: {{versions: [v1], trusted_sources: [127.0.0.0/8]}}
  - name: any
    address: 127.0.0.1:0
    mode: passthrough
    protocol: auto
    upstream_port: {{echo}}
    http_upstream_port: {web}
",
        web = web.port
    );
    let sections = format!(
        "connect:\n  allowed_ports: [{https}, {{echo}}, {{capture}}]\n  plaintext_ports: [{{capture}}]\n{sections}",
        https = https.port
    );
    let h = Harness::with(Options { listeners, sections, internet: Some(internet), ..Options::default() }).await;
    let ca = h.pki.path("internet-ca.pem");
    std::fs::write(&ca, &h.internet.ca_pem).expect("write CA");
    World { h, https, web, ca }
}

/// A tool from the system, or a skip (a failure where CI installed it).
fn tool(name: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("SNIGRESS_REQUIRE_TOOLS").is_none(), "{name} is required here");
        eprintln!("skipped: {name} is not installed");
    }
    found
}

/// Runs curl off the async threads; its stdout, stderr and exit code.
async fn curl(args: Vec<String>, env: &[(&str, String)]) -> (String, String, i32) {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--noproxy", ""])
            .args(&args)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .envs(env)
            .output()
            .expect("run curl")
    })
    .await
    .expect("curl task");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// Sends `request` as is and reads the whole answer (the gateway closes).
async fn ask(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request).await.expect("send");
    let (raw, _) = within("answer", read_all(&mut tcp)).await;
    String::from_utf8_lossy(&raw).into_owned()
}

/// Status line code, the `Proxy-Status` field, and the body of an answer.
fn parts(answer: &str) -> (u16, String, String) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {answer:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{answer:?}"));
    let proxy_status =
        head.lines().find_map(|l| l.strip_prefix("Proxy-Status: ")).map(str::to_owned).unwrap_or_default();
    assert!(head.contains("\r\nConnection: close"), "{answer}");
    (status, proxy_status, body.to_owned())
}

/// A CONNECT through `addr`; the stream once its 200 has been read (and
/// not a byte more).
async fn tunnel(addr: SocketAddr, authority: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(within("200", tcp.read(&mut b)).await.expect("read 200"), 1, "closed after {head:?}");
        head.push(b[0]);
    }
    assert_eq!(head, b"HTTP/1.1 200 Connection established\r\n\r\n");
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_python_reach_https_through_the_connect_front() {
    if !tool("curl") {
        return;
    }
    let mut w = world("").await;
    let proxy = format!("http://{}", w.h.addr("proxy"));
    let url = format!("https://a.allowed.test:{}/hello?x=1", w.https.port);
    let ca = w.ca.display().to_string();

    // --proxy, and HTTPS_PROXY as CI runners and build containers set it.
    let (out, err, code) =
        curl(vec!["--proxy".into(), proxy.clone(), "--cacert".into(), ca.clone(), url.clone()], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "GET /hello?x=1 HTTP/1.1 host=a.allowed.test:".to_owned()
            + &format!("{} sni=a.allowed.test body=0 connection=0\n", w.https.port)
    );
    let r = w.h.record().await;
    assert_eq!((r.protocol, r.decision, r.reason, r.http_status), (Some("connect"), "allowed", "allowed", Some(200)));
    assert_eq!(r.connect_authority, Some(format!("a.allowed.test:{}", w.https.port)));
    assert_eq!((r.sni.as_deref(), r.tunnel_sni.as_deref()), (Some("a.allowed.test"), Some("a.allowed.test")));
    assert_eq!(r.upstream_addr, Some(SocketAddr::from(([127, 0, 0, 1], w.https.port))));

    let (out, err, code) =
        curl(vec!["--cacert".into(), ca.clone(), url.clone()], &[("HTTPS_PROXY", proxy.clone())]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sni=a.allowed.test"), "{out}");
    w.h.record().await;

    // A denied name: curl reports the proxy's 403.
    let denied = format!("https://blocked.allowed.test:{}/", w.https.port);
    let (_, err, code) = curl(vec!["--proxy".into(), proxy.clone(), "--cacert".into(), ca.clone(), denied], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let r = w.h.record().await;
    assert_eq!((r.reason, r.http_status, r.protocol), ("policy_denied", Some(403), Some("connect")));

    // Python's urllib with a proxy handler, as package managers do.
    if tool("python3") {
        let script = format!(
            "import ssl, urllib.request\n\
             ctx = ssl.create_default_context(cafile={ca:?})\n\
             opener = urllib.request.build_opener(urllib.request.ProxyHandler({{'https': {proxy:?}}}), urllib.request.HTTPSHandler(context=ctx))\n\
             print(opener.open({url:?}, timeout=20).read().decode(), end='')\n"
        );
        let out = tokio::task::spawn_blocking(move || Command::new("python3").args(["-c", &script]).output())
            .await
            .expect("task")
            .expect("python3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("sni=a.allowed.test"));
        let r = w.h.record().await;
        assert_eq!((r.protocol, r.reason), (Some("connect"), "allowed"));
    }
    w.h.wait_metric("snigress_connections_total", &[("protocol", "connect"), ("decision", "allowed")], 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_uses_an_https_proxy_with_its_mesh_client_certificate() {
    if !tool("curl") {
        return;
    }
    let mut w = world("").await;
    let proxy = format!("https://{}", w.h.addr("mesh-proxy"));
    let ca = w.ca.display().to_string();
    let mesh_ca = w.h.pki.path(snigress::tools::devcerts::CA_CERT).display().to_string();
    let client = |id: &str| {
        let (cert, key) = snigress::tools::devcerts::client_files(&snigress::identity::Principal::parse(id).unwrap());
        (w.h.pki.path(&cert).display().to_string(), w.h.pki.path(&key).display().to_string())
    };
    let run = |id: &str, host: &str| {
        let (cert, key) = client(id);
        vec![
            "--proxy".into(),
            proxy.clone(),
            "--proxy-cacert".into(),
            mesh_ca.clone(),
            "--proxy-cert".into(),
            cert,
            "--proxy-key".into(),
            key,
            "--cacert".into(),
            ca.clone(),
            format!("https://{host}:{}/", w.https.port),
        ]
    };
    let (sleep, other) = (run(SLEEP, "a.team.test"), run(OTHER_APP, "a.team.test"));
    // The per-identity rule: namespace default may reach *.team.test.
    let (out, err, code) = curl(sleep, &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sni=a.team.test"), "{out}");
    let r = w.h.record().await;
    assert_eq!((r.protocol, r.reason, r.principal.as_deref()), (Some("connect"), "allowed", Some(SLEEP)));
    assert_eq!(r.matched_rule.as_deref(), Some("default-team:*.team.test"));

    let (_, err, code) = curl(other, &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let r = w.h.record().await;
    assert_eq!((r.reason, r.http_status, r.principal.as_deref()), ("policy_denied", Some(403), Some(OTHER_APP)));
}

#[tokio::test]
async fn refusals_are_http_answers_with_proxy_status() {
    let mut w = world("timeouts:\n  client_hello: 1s\n").await;
    let proxy = w.h.addr("proxy");
    let echo = w.h.echo.port;
    let connect = |target: &str| format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (connect(&format!("blocked.allowed.test:{echo}")), 403, "error=http_request_denied", "policy_denied"),
        (connect(&format!("a.unlisted.test:{echo}")), 403, "error=http_request_denied", "policy_denied"),
        (connect(&format!("nx.allowed.test:{echo}")), 502, "error=dns_error; rcode=NXDOMAIN", "dns_nxdomain"),
        (connect(&format!("metadata.allowed.test:{echo}")), 403, "error=destination_ip_prohibited", "address_refused"),
        (connect(&format!("closed.allowed.test:{echo}")), 502, "error=connection_refused", "connect_failed"),
        (connect("a.allowed.test:22"), 403, "error=http_request_denied", "port_not_allowed"),
        (connect(&format!("127.0.0.1:{echo}")), 403, "error=http_request_denied", "ip_literal_refused"),
        (connect(&format!("[::1]:{echo}")), 403, "error=http_request_denied", "ip_literal_refused"),
        (connect("a.allowed.test"), 400, "error=http_request_error", "http_invalid"),
        (connect(&format!("bad_name.allowed.test:{echo}")), 400, "error=http_request_error", "http_invalid_host"),
        (
            format!("CONNECT a.allowed.test:{echo} HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"),
            400,
            "error=http_request_error",
            "http_bad_framing",
        ),
        (
            format!("CONNECT a.allowed.test:{echo} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400,
            "error=http_request_error",
            "http_bad_framing",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n".into(),
            405,
            "error=http_request_error",
            "method_not_allowed",
        ),
        ("GARBAGE\r\n\r\n".into(), 400, "error=http_request_error", "http_invalid"),
        (
            format!("CONNECT a.allowed.test:{echo} HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(9000)),
            431,
            "error=http_request_error",
            "http_head_too_large",
        ),
        (
            format!("CONNECT a.allowed.test:{echo} HTTP/1.1\r\nX: y\r\n"),
            408,
            "error=http_request_error",
            "http_request_timeout",
        ),
    ];
    for (request, status, proxy_status, reason) in cases {
        let answer = ask(proxy, request.as_bytes()).await;
        let (got, ps, body) = parts(&answer);
        assert_eq!(got, status, "{request:?} -> {answer}");
        assert!(ps.starts_with("snigress; ") && ps.contains(proxy_status), "{request:?} -> {ps}");
        assert!(ps.contains(&format!("details=\"{reason}\"")), "{ps}");
        assert!(
            body.starts_with(&format!("{reason}: ")) && body.ends_with('\n') && body.lines().count() == 1,
            "{body:?}"
        );
        let r = w.h.record().await;
        assert_eq!((r.reason, r.http_status), (reason, Some(status)), "{request:?}");
        assert_eq!(r.bytes_to_client, answer.len() as u64);
    }
}

#[tokio::test]
async fn the_tunnelled_hello_must_name_the_connect_host() {
    let mut w = world("").await;
    let proxy = w.h.addr("proxy");
    let echo = w.h.echo.port;

    // Domain fronting: CONNECT to an allowed host, TLS to another.
    let tcp = tunnel(proxy, &format!("a.allowed.test:{echo}")).await;
    let e = w.h.inner(tcp, "b.allowed.test").await.expect_err("refused");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = w.h.record().await;
    assert_eq!((r.decision, r.reason, r.http_status), ("denied", "sni_mismatch", Some(200)));
    assert_eq!((r.sni.as_deref(), r.tunnel_sni.as_deref()), (Some("a.allowed.test"), Some("b.allowed.test")));

    // Not TLS in the tunnel, on a port not listed as plaintext.
    let mut tcp = tunnel(proxy, &format!("a.allowed.test:{echo}")).await;
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("send");
    let (_, _) = within("close", read_all(&mut tcp)).await;
    assert_eq!(w.h.record().await.reason, "tunnel_not_tls");

    // A hello without SNI while connect.require_sni is on.
    let mut tcp = tunnel(proxy, &format!("a.allowed.test:{echo}")).await;
    let config = client_config(w.h.internet.roots.clone(), None, &[]);
    let ip = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let e = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ip, &mut tcp).await.expect_err("no SNI");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::UnrecognisedName), "{e}");
    assert_eq!(w.h.record().await.reason, "no_sni");

    // A plaintext port is not inspected: bytes go through as sent.
    let mut tcp = tunnel(proxy, &format!("capture.allowed.test:{}", w.h.capture.port)).await;
    tcp.write_all(b"SMTP-ish plaintext").await.expect("send");
    tcp.shutdown().await.expect("half-close");
    assert_eq!(w.h.capture.next().await, b"SMTP-ish plaintext");
    let _ = within("close", read_all(&mut tcp)).await;
    let r = w.h.record().await;
    assert_eq!((r.reason, r.tunnel_sni), ("allowed", None));
}

#[tokio::test]
async fn a_connect_behind_a_proxy_header_keeps_the_client_address() {
    let mut w = world("").await;
    let echo = w.h.echo.port;
    let mut tcp = TcpStream::connect(w.h.addr("proxied")).await.expect("connect");
    let request =
        format!("PROXY TCP4 192.0.2.7 198.51.100.1 40000 3128\r\nCONNECT a.allowed.test:{echo} HTTP/1.1\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("send");
    let mut got = vec![0u8; 39];
    within("200", tcp.read_exact(&mut got)).await.expect("200");
    assert_eq!(got, b"HTTP/1.1 200 Connection established\r\n\r\n");
    let tls = w.h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
    assert_eq!(exchange(tls, b"hi").await.expect("echo"), b"hisni=a.allowed.test\n");
    let r = w.h.record().await;
    assert_eq!((r.arrival, r.protocol, r.reason), ("proxy_v1", Some("connect"), "allowed"));
    assert_eq!(r.client_addr, "192.0.2.7:40000".parse().unwrap());
}

#[tokio::test]
async fn an_ip_literal_connect_is_decided_on_the_tunnelled_sni_when_allowed() {
    // (Continues the connect: section.)
    let mut w = world("  allow_ip_literals: true\n").await;
    let proxy = w.h.addr("proxy");
    let echo = w.h.echo.port;

    // The SNI is the name; it resolves to the address asked for.
    let tcp = tunnel(proxy, &format!("127.0.0.1:{echo}")).await;
    let tls = w.h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
    assert_eq!(exchange(tls, b"ip").await.expect("echo"), b"ipsni=a.allowed.test\n");
    let r = w.h.record().await;
    assert_eq!((r.reason, r.sni.as_deref(), r.http_status), ("allowed", Some("a.allowed.test"), Some(200)));
    assert_eq!(r.original_dst, Some(SocketAddr::from(([127, 0, 0, 1], echo))));

    // A denied name behind an allowed address: refused after the 200.
    let tcp = tunnel(proxy, &format!("127.0.0.1:{echo}")).await;
    let e = w.h.inner(tcp, "blocked.allowed.test").await.expect_err("denied");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    assert_eq!(w.h.record().await.reason, "policy_denied");

    // An allowed name that does not resolve to that address.
    let tcp = tunnel(proxy, &format!("127.0.0.1:{echo}")).await;
    let e = w.h.inner(tcp, "closed.allowed.test").await.expect_err("mismatch");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    assert_eq!(w.h.record().await.reason, "destination_mismatch");

    // The address itself is vetted before the 200.
    let answer = ask(proxy, format!("CONNECT 169.254.169.254:{echo} HTTP/1.1\r\n\r\n").as_bytes()).await;
    let (status, ps, _) = parts(&answer);
    assert_eq!((status, ps.contains("error=destination_ip_prohibited")), (403, true), "{answer}");
    assert_eq!(w.h.record().await.reason, "address_refused");
}

#[tokio::test]
async fn bytes_after_the_connect_head_are_replayed() {
    let mut w = world("").await;
    let echo = w.h.echo.port;
    let mut request = format!("CONNECT a.allowed.test:{echo} HTTP/1.1\r\n\r\n").into_bytes();
    request.extend_from_slice(&client_hello("a.allowed.test"));
    let mut tcp = TcpStream::connect(w.h.addr("proxy")).await.expect("connect");
    // Head and hello in one write: the hello must not be lost.
    tcp.write_all(&request).await.expect("send");
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let mut got = vec![0u8; established.len() + 3];
    within("answer", tcp.read_exact(&mut got)).await.expect("200 and the ServerHello");
    assert_eq!(&got[..established.len()], established);
    assert_eq!(&got[established.len()..], &[0x16, 0x03, 0x03], "the echo answered the replayed hello");
    drop(tcp);
    assert_eq!(w.h.record().await.tunnel_sni.as_deref(), Some("a.allowed.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_carry_bytes_exactly_both_ways_and_half_close() {
    let mut w = world("").await;
    let proxy = w.h.addr("proxy");
    let echo = w.h.echo.port;
    // 200 tunnels at once, each 64 KiB each way, then one of 4 MiB.
    let roots = w.h.internet.roots.clone();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let roots = roots.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tunnel(proxy, &format!("a.allowed.test:{echo}")).await;
            let tls = inner_connect(tcp, "a.allowed.test", roots).await.expect("inner TLS");
            let data = data(64 * 1024, i as u8);
            let back = exchange(tls, &data).await.expect("exchange");
            assert_eq!(&back[..data.len()], &data[..]);
            assert_eq!(&back[data.len()..], b"sni=a.allowed.test\n", "half-close reached the echo");
        }));
    }
    for t in tasks {
        within("tunnel", t).await.expect("tunnel task");
    }
    let tcp = tunnel(proxy, &format!("a.allowed.test:{echo}")).await;
    let tls = inner_connect(tcp, "a.allowed.test", roots).await.expect("inner TLS");
    let data = data(4 << 20, 7);
    let back = within("bulk", exchange(tls, &data)).await.expect("bulk");
    assert!(back.len() == data.len() + 19 && back[..data.len()] == data[..]);
    for _ in 0..201 {
        let r = w.h.record().await;
        assert_eq!((r.protocol, r.reason), (Some("connect"), "allowed"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_routed_by_host_and_held_to_it() {
    if !tool("curl") {
        return;
    }
    let mut w = world("").await;
    let web = w.h.addr("web");

    // A direct request (Host from the URL's name, resolved by curl to the
    // gateway), then the same through HTTP_PROXY (absolute form).
    let (out, err, code) = curl(
        vec![
            "--resolve".into(),
            format!("a.allowed.test:{}:127.0.0.1", web.port()),
            format!("http://a.allowed.test:{}/p", web.port()),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // curl names the port in Host; the listener's upstream port differs.
    assert!(out.starts_with("port_not_allowed: port "), "{out}");
    let r = w.h.record().await;
    assert_eq!((r.reason, r.http_status), ("port_not_allowed", Some(403)));

    let (out, err, code) = curl(vec!["-H".into(), "Host: a.allowed.test".into(), format!("http://{web}/p")], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "GET /p HTTP/1.1 host=a.allowed.test sni= body=0 connection=0\n");
    let seen = w.web.next().await;
    // Forwarded as curl sent it.
    assert!(seen.head.starts_with("GET /p HTTP/1.1\r\nHost: a.allowed.test\r\nUser-Agent: curl/"), "{}", seen.head);
    assert!(seen.head.ends_with("\r\nAccept: */*\r\n\r\n"), "{}", seen.head);
    let r = w.h.record().await;
    assert_eq!(
        (r.protocol, r.sni.as_deref(), r.reason, r.http_status),
        (Some("http"), Some("a.allowed.test"), "allowed", None)
    );
    assert_eq!(r.upstream_addr, Some(SocketAddr::from(([127, 0, 0, 1], w.web.port))));

    // HTTP_PROXY: absolute-form targets, forwarded byte for byte; two
    // requests on one connection reach the origin on one connection.
    let proxy = format!("http://{}", w.h.addr("proxy-and-web"));
    let (out, err, code) = curl(
        vec!["http://a.allowed.test/1".into(), "http://a.allowed.test/2".into()],
        &[("http_proxy", proxy.clone())],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "GET http://a.allowed.test/1 HTTP/1.1 host=a.allowed.test sni= body=0 connection=1\n\
         GET http://a.allowed.test/2 HTTP/1.1 host=a.allowed.test sni= body=0 connection=1\n"
    );
    let r = w.h.record().await;
    assert_eq!((r.protocol, r.reason, r.listener.as_str()), (Some("http"), "allowed", "proxy-and-web"));
    w.web.next().await;
    w.web.next().await;

    // A chunked upload goes through byte for byte.
    let body = w.h.pki.path("upload.bin");
    std::fs::write(&body, data(300_000, 3)).expect("write body");
    let (out, err, code) = curl(
        vec![
            "-H".into(),
            "Host: a.allowed.test".into(),
            "-H".into(),
            "Transfer-Encoding: chunked".into(),
            "--data-binary".into(),
            format!("@{}", body.display()),
            format!("http://{web}/up"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("POST /up HTTP/1.1 host=a.allowed.test sni= body=300000"), "{out}");
    assert_eq!(w.web.next().await.body, data(300_000, 3));
    w.h.record().await;
}

#[tokio::test]
async fn plain_http_refusals_and_another_host_on_the_same_connection() {
    let mut w = world("").await;
    let web = w.h.addr("web");
    for (request, status, reason) in [
        ("GET / HTTP/1.1\r\n\r\n", 400, "http_invalid_host"),
        ("GET / HTTP/1.0\r\n\r\n", 400, "http_invalid_host"),
        ("GET / HTTP/1.1\r\nHost: a.allowed.test\r\nHost: b.allowed.test\r\n\r\n", 400, "http_invalid_host"),
        ("GET http://b.allowed.test/ HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n", 400, "http_invalid_host"),
        (
            "POST / HTTP/1.1\r\nHost: a.allowed.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "http_bad_framing",
        ),
        ("GET / HTTP/1.1\r\nHost: blocked.allowed.test\r\n\r\n", 403, "policy_denied"),
        ("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 403, "ip_literal_refused"),
        (
            "GET / HTTP/1.1\r\nHost: a.allowed.test\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            501,
            "http_upgrade_refused",
        ),
        ("CONNECT a.allowed.test:443 HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ] {
        let answer = ask(web, request.as_bytes()).await;
        let (got, ps, _) = parts(&answer);
        assert_eq!(got, status, "{request:?} -> {answer}");
        assert!(ps.contains(&format!("details=\"{reason}\"")), "{ps}");
        let r = w.h.record().await;
        assert_eq!((r.reason, r.http_status, r.protocol), (reason, Some(status), Some("http")), "{request:?}");
    }

    // Keep-alive: the same host continues on the same upstream connection;
    // another host is not forwarded, but answered 421 after what came before.
    let mut tcp = TcpStream::connect(web).await.expect("connect");
    let pipelined = "GET /1 HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n\
                     POST /2 HTTP/1.1\r\nHost: A.Allowed.Test\r\nContent-Length: 5\r\n\r\nhello\
                     GET /3 HTTP/1.1\r\nHost: b.allowed.test\r\n\r\n\
                     GET /4 HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n";
    tcp.write_all(pipelined.as_bytes()).await.expect("send");
    let (raw, _) = within("answers", read_all(&mut tcp)).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let starts: Vec<usize> =
        raw.match_indices("HTTP/1.1 ").map(|(i, _)| i).filter(|&i| i == 0 || raw[..i].ends_with('\n')).collect();
    let answers: Vec<&str> =
        starts.iter().enumerate().map(|(k, &i)| &raw[i + 9..starts.get(k + 1).copied().unwrap_or(raw.len())]).collect();
    assert_eq!(answers.len(), 3, "{raw}");
    assert!(answers[0].starts_with("200") && answers[0].contains("GET /1"), "{raw}");
    assert!(answers[1].starts_with("200") && answers[1].contains("POST /2") && answers[1].contains("body=5"), "{raw}");
    assert!(answers[2].starts_with("421 Misdirected Request"), "{raw}");
    assert!(answers[2].contains("misdirected_request: ") && answers[2].contains("b.allowed.test"), "{raw}");
    let (first, second) = (w.web.next().await, w.web.next().await);
    assert_eq!((first.connection, second.connection), (first.connection, first.connection));
    assert!(w.web.seen.try_recv().is_err(), "the request for another host never reached the origin");
    let r = w.h.record().await;
    assert_eq!((r.reason, r.http_status, r.termination), ("allowed", Some(421), "misdirected_request"));
    assert_eq!(r.bytes_to_client, raw.len() as u64);
    assert_eq!(r.bytes_from_client, pipelined.len() as u64, "every byte counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_auto_port_serves_tls_connect_and_plain_http() {
    let mut w = world("").await;
    let any = w.h.addr("any");

    // TLS passthrough, as on any tls listener.
    let tcp = TcpStream::connect(any).await.expect("connect");
    let tls = w.h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
    let back = exchange(tls, b"ping").await.expect("echo");
    assert_eq!(back, b"pingsni=a.allowed.test\n");
    let r = w.h.record().await;
    assert_eq!((r.protocol, r.reason), (Some("tls"), "allowed"));

    // CONNECT.
    let tcp = tunnel(any, &format!("a.allowed.test:{}", w.h.echo.port)).await;
    let tls = w.h.inner(tcp, "a.allowed.test").await.expect("inner TLS");
    assert_eq!(exchange(tls, b"x").await.expect("echo"), b"xsni=a.allowed.test\n");
    assert_eq!(w.h.record().await.protocol, Some("connect"));

    // Plain HTTP to the http upstream port.
    let answer = ask(any, b"GET /a HTTP/1.1\r\nHost: a.allowed.test\r\nConnection: close\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 200 OK") && answer.contains("GET /a HTTP/1.1 host=a.allowed.test"),
        "{answer}"
    );
    assert_eq!(w.h.record().await.protocol, Some("http"));

    // Anything else is refused without a word.
    let answer = ask(any, b"\x00\x01binary").await;
    assert_eq!(answer, "");
    let r = w.h.record().await;
    assert_eq!((r.reason, r.protocol, r.http_status), ("unknown_protocol", None, None));
}
