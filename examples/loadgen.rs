//! Load generator and fixtures for `bench/compare.sh`: the side-by-side
//! comparison of snigress with HAProxy, nginx and sniproxy.
//!
//!     loadgen pki DIR                         certificates for everything
//!     loadgen dns PORTFILE                    authoritative DNS for bench.allowed.test
//!     loadgen upstream DIR PORTFILE           TLS server: sends as many bytes as asked
//!     loadgen rate ADDR SECONDS CONCURRENCY [--mtls DIR]
//!     loadgen bulk ADDR BYTES [STREAMS] [--mtls DIR]   STREAMS connections at once, BYTES in all
//!     loadgen latency ADDR SECONDS RATE [--mtls DIR]
//!     loadgen idle ADDR COUNT [--mtls DIR]    holds COUNT connections until stdin closes
//!
//! `--proxy-v2` sends a PROXY protocol v2 header first, as Istio's ztunnel
//! does to an ambient waypoint (addresses and the caller's SPIFFE ID in
//! TLV 0xD0). `--connect PORT` goes through an HTTP proxy as an
//! `HTTPS_PROXY` client does: `CONNECT bench.allowed.test:PORT`, the 200,
//! then the TLS inside the tunnel.
//!
//! Every client connection is what a mesh application does: (outer mTLS to
//! the proxy when --mtls), then its own TLS to bench.allowed.test through it,
//! an 8-byte request (the number of bytes wanted), the response, close.
//! Results are printed as one JSON object.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use snigress::arrive::mtls::provider;
use snigress::identity::Principal;
use snigress::tools::devcerts::{self, Spec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const NAME: &str = "bench.allowed.test";
const SMALL_RESPONSE: u64 = 100;
const CALLER: &str = "spiffe://cluster.local/ns/default/sa/sleep";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().ok_or_else(|| format!("missing argument {i}; see the module doc"));
    let mtls = args.iter().position(|a| a == "--mtls").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let proxy_v2 = args.iter().any(|a| a == "--proxy-v2");
    let connect_port =
        args.iter().position(|a| a == "--connect").and_then(|i| args.get(i + 1)).map(|p| p.parse::<u16>());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match arg(0)?.as_str() {
        "pki" => pki(Path::new(&arg(1)?)),
        "dns" => runtime.block_on(dns(Path::new(&arg(1)?))),
        "upstream" => runtime.block_on(upstream(Path::new(&arg(1)?), Path::new(&arg(2)?))),
        mode => {
            let target: SocketAddr = arg(1)?.parse()?;
            let mut client = Client::new(target, mtls.as_deref())?;
            if proxy_v2 {
                client.header = ztunnel_header();
            }
            if let Some(port) = connect_port {
                client.header = format!("CONNECT {NAME}:{} HTTP/1.1\r\nHost: {NAME}\r\n\r\n", port?).into_bytes();
                client.connect = true;
            }
            let client = Arc::new(client);
            runtime.block_on(async {
                match mode {
                    "rate" => rate(client, arg(2)?.parse()?, arg(3)?.parse()?).await,
                    "bulk" => {
                        let streams = args.get(3).filter(|a| !a.starts_with("--")).map_or(Ok(1), |a| a.parse())?;
                        bulk(client, arg(2)?.parse()?, streams).await
                    }
                    "latency" => latency(client, arg(2)?.parse()?, arg(3)?.parse()?).await,
                    "idle" => idle(client, arg(2)?.parse()?).await,
                    other => Err(format!("unknown mode {other}").into()),
                }
            })
        }
    }
}

/// The mesh PKI (gateway and caller) and the pretend internet's CA and
/// server certificate for bench.allowed.test.
fn pki(dir: &Path) -> Result<()> {
    let spec = Spec {
        gateway_id: Principal::parse("spiffe://cluster.local/ns/snigress/sa/snigress")?,
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        clients: vec![Principal::parse(CALLER)?],
    };
    devcerts::mint(dir, &spec, true)?;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec![NAME.into()])?.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("upstream-ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("upstream.pem"), cert.pem())?;
    std::fs::write(dir.join("upstream.key"), key.serialize_pem())?;
    // HAProxy wants the certificate and its key in one file.
    let gateway =
        [std::fs::read_to_string(dir.join("gateway.pem"))?, std::fs::read_to_string(dir.join("gateway.key"))?];
    std::fs::write(dir.join("gateway-with-key.pem"), gateway.concat())?;
    Ok(())
}

fn write_port(file: &Path, port: u16) -> Result<()> {
    std::fs::write(file, port.to_string())?;
    Ok(())
}

async fn dns(port_file: &Path) -> Result<()> {
    use hickory_server::Server;
    use hickory_server::proto::rr::rdata::{A, SOA};
    use hickory_server::proto::rr::{LowerName, Name, RData, Record};
    use hickory_server::store::in_memory::InMemoryZoneHandler;
    use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
    let origin = Name::from_ascii("test.")?;
    let mut zone: InMemoryZoneHandler = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(Name::from_ascii("ns.test.")?, Name::from_ascii("h.test.")?, 1, 3600, 600, 86400, 30);
    zone.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
    zone.upsert_mut(
        Record::from_rdata(Name::from_ascii(format!("{NAME}."))?, 300, RData::A(A(Ipv4Addr::LOCALHOST))),
        1,
    );
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone) as Arc<dyn ZoneHandler>]);
    let mut server = Server::new(catalog);
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    write_port(port_file, addr.port())?;
    std::future::pending::<()>().await;
    Ok(())
}

/// Reads 8 bytes (a big-endian count), sends that many bytes, closes.
async fn upstream(dir: &Path, port_file: &Path) -> Result<()> {
    let certs = CertificateDer::pem_file_iter(dir.join("upstream.pem"))?.collect::<std::result::Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("upstream.key"))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    write_port(port_file, listener.local_addr()?.port())?;
    let chunk: Arc<[u8]> = vec![0x5a; 64 * 1024].into();
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, chunk) = (acceptor.clone(), chunk.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut want = [0u8; 8];
            if tls.read_exact(&mut want).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(want);
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if tls.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = tls.shutdown().await;
        });
    }
}

struct Client {
    target: SocketAddr,
    inner: TlsConnector,
    /// The outer mesh layer, when going through an mTLS listener.
    outer: Option<TlsConnector>,
    /// Sent first on every connection (a PROXY header, a CONNECT), or nothing.
    header: Vec<u8>,
    /// The header is a CONNECT: its 200 comes before the tunnel.
    connect: bool,
}

/// A PROXY v2 header as ztunnel writes it: the app's address, a VIP, and
/// the caller's SPIFFE ID.
fn ztunnel_header() -> Vec<u8> {
    let (app, vip) = ("10.1.2.3:40000".parse().expect("address"), "240.240.0.1:443".parse().expect("address"));
    snigress::arrive::proxy::testing::ztunnel(app, vip, Some(CALLER))
}

impl Client {
    fn new(target: SocketAddr, mtls: Option<&Path>) -> Result<Client> {
        let dir =
            mtls.map(Path::to_owned).unwrap_or_else(|| PathBuf::from(std::env::var("LOADGEN_PKI").unwrap_or_default()));
        let roots = |file: &Path| -> Result<Arc<RootCertStore>> {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(file)? {
                roots.add(cert?)?;
            }
            Ok(Arc::new(roots))
        };
        // Every handshake is a full one, as a Go client without a session
        // cache does: resumption would let each proxy skip the costly part
        // of its handshake on most connections (and the rate row measure
        // the session caches rather than the handshakes).
        let mut inner = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&dir.join("upstream-ca.pem"))?)
            .with_no_client_auth();
        inner.resumption = rustls::client::Resumption::disabled();
        let outer = match mtls {
            None => None,
            Some(dir) => {
                let (cert, key) = devcerts::client_files(&Principal::parse(CALLER)?);
                let certs =
                    CertificateDer::pem_file_iter(dir.join(cert))?.collect::<std::result::Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_file(dir.join(key))?;
                let mut config = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots(&dir.join(devcerts::CA_CERT))?)
                    .with_client_auth_cert(certs, key)?;
                config.alpn_protocols = vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()];
                config.resumption = rustls::client::Resumption::disabled();
                Some(TlsConnector::from(Arc::new(config)))
            }
        };
        Ok(Client { target, inner: TlsConnector::from(Arc::new(inner)), outer, header: Vec::new(), connect: false })
    }

    /// What goes before the client's TLS: a PROXY header, or a CONNECT and
    /// its answer (read to its end, not a byte more).
    async fn preamble(&self, tcp: &mut TcpStream) -> Result<()> {
        if self.header.is_empty() {
            return Ok(());
        }
        tcp.write_all(&self.header).await?;
        if self.connect {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if tcp.read(&mut byte).await? == 0 || head.len() > 4096 {
                    return Err("the proxy closed before answering the CONNECT".into());
                }
                head.push(byte[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
                return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)).into());
            }
        }
        Ok(())
    }

    /// One full connection asking for `bytes`; returns the bytes received.
    async fn fetch(&self, bytes: u64) -> Result<u64> {
        let mut tcp = TcpStream::connect(self.target).await?;
        tcp.set_nodelay(true)?;
        self.preamble(&mut tcp).await?;
        match &self.outer {
            None => self.inner_fetch(tcp, bytes).await,
            Some(outer) => {
                let outer = outer.connect(ServerName::try_from("localhost")?, tcp).await?;
                self.inner_fetch(outer, bytes).await
            }
        }
    }

    async fn inner_fetch<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S, bytes: u64) -> Result<u64> {
        let mut tls = self.inner.connect(ServerName::try_from(NAME)?, io).await?;
        tls.write_all(&bytes.to_be_bytes()).await?;
        tls.flush().await?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && got == bytes => break,
                Err(e) => return Err(e.into()),
            }
        }
        if got != bytes {
            return Err(format!("got {got} of {bytes} bytes").into());
        }
        Ok(got)
    }

    /// Connects and sends the first flight, then holds the connection.
    async fn hold(&self) -> Result<Box<dyn std::any::Any + Send>> {
        let mut tcp = TcpStream::connect(self.target).await?;
        self.preamble(&mut tcp).await?;
        let hello = |server: &str| -> Result<Vec<u8>> {
            let config = Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            );
            let mut conn = rustls::ClientConnection::new(config, ServerName::try_from(server.to_owned())?)?;
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
            Ok(out)
        };
        let first = hello(NAME)?;
        let mut byte = [0u8; 1];
        match &self.outer {
            None => {
                let mut tcp = tcp;
                tcp.write_all(&first).await?;
                // The upstream's ServerHello proves the path is established.
                tcp.read_exact(&mut byte).await?;
                Ok(Box::new(tcp))
            }
            Some(outer) => {
                let mut outer = outer.connect(ServerName::try_from("localhost")?, tcp).await?;
                outer.write_all(&first).await?;
                outer.flush().await?;
                outer.read_exact(&mut byte).await?;
                Ok(Box::new(outer))
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Closed loop: CONCURRENCY clients each doing full connections back to back.
async fn rate(client: Arc<Client>, seconds: f64, concurrency: usize) -> Result<()> {
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, ok, errors) = (client.clone(), ok.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match client.fetch(SMALL_RESPONSE).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "{{\"connections\":{ok},\"errors\":{},\"seconds\":{elapsed:.3},\"per_second\":{:.1}}}",
        errors.load(Ordering::Relaxed),
        ok as f64 / elapsed
    );
    Ok(())
}

/// `streams` connections at once downloading `bytes` between them.
async fn bulk(client: Arc<Client>, bytes: u64, streams: u64) -> Result<()> {
    let started = Instant::now();
    let each = bytes / streams.max(1);
    let tasks: Vec<_> = (0..streams.max(1))
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.fetch(each).await })
        })
        .collect();
    let mut got = 0;
    for t in tasks {
        got += t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\":{got},\"streams\":{streams},\"seconds\":{elapsed:.3},\"mib_per_second\":{:.1}}}",
        got as f64 / elapsed / 1048576.0
    );
    Ok(())
}

/// Open loop at RATE connections per second; latency of each full fetch.
async fn latency(client: Arc<Client>, seconds: f64, per_second: f64) -> Result<()> {
    let count = (seconds * per_second) as usize;
    let gap = Duration::from_secs_f64(1.0 / per_second);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        tokio::time::sleep_until(start + gap * i as u32).await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            client.fetch(SMALL_RESPONSE).await.map(|_| t0.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut ms = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await? {
            Ok(v) => ms.push(v),
            Err(_) => errors += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{{\"connections\":{},\"errors\":{errors},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3}}}",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        percentile(&ms, 0.99)
    );
    Ok(())
}

/// Holds COUNT established connections; prints when ready, ends when stdin closes.
async fn idle(client: Arc<Client>, count: usize) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    let mut errors = 0;
    while held.len() + errors < count {
        let batch = (count - held.len() - errors).min(200);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let client = client.clone();
            set.spawn(async move { client.hold().await });
        }
        while let Some(done) = set.join_next().await {
            match done? {
                Ok(conn) => held.push(conn),
                Err(_) => errors += 1,
            }
        }
    }
    println!("{{\"held\":{},\"errors\":{errors}}}", held.len());
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while std::io::Read::read(&mut std::io::stdin(), &mut sink).unwrap_or(0) > 0 {}
    })
    .await?;
    drop(held);
    Ok(())
}
