//! The world an integration test runs in, all real and all on loopback: a
//! mesh PKI, an authoritative DNS server, a TLS echo upstream standing in for
//! the internet, a raw capture upstream, and a gateway serving in-process.
#![allow(dead_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record as DnsRecord};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use snigress::arrive::mtls::provider;
use snigress::config::Config;
use snigress::gateway::Gateway;
use snigress::identity::Principal;
use snigress::observe::access_log::{Channel, Record};
use snigress::tools::devcerts::{self, Spec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Upper bound for anything a test waits on; far above what any step needs.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Names the test DNS zone serves, and their addresses. Anything else under
/// `test.` is NXDOMAIN.
pub const ZONE: &[(&str, &[Ipv4Addr])] = &[
    ("a.allowed.test", &[Ipv4Addr::LOCALHOST]),
    ("b.allowed.test", &[Ipv4Addr::LOCALHOST]),
    ("capture.allowed.test", &[Ipv4Addr::LOCALHOST]),
    ("deep.x.y.allowed.test", &[Ipv4Addr::LOCALHOST]),
    ("allowed.test", &[Ipv4Addr::LOCALHOST]),
    ("blocked.allowed.test", &[Ipv4Addr::LOCALHOST]),
    ("a.team.test", &[Ipv4Addr::LOCALHOST]),
    ("a.unlisted.test", &[Ipv4Addr::LOCALHOST]),
    ("metadata.allowed.test", &[Ipv4Addr::new(169, 254, 169, 254)]),
    // Transparent interception (tests/interception.rs): a real-looking
    // destination, and a name that resolves elsewhere.
    ("intercept.allowed.test", &[Ipv4Addr::new(198, 18, 0, 10)]),
    ("elsewhere.allowed.test", &[Ipv4Addr::new(198, 18, 0, 20)]),
    // The first address is denied by resolver.deny_cidrs; a trap listens there.
    ("twoaddr.allowed.test", &[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::LOCALHOST]),
    // Nothing listens on 127.0.0.9.
    ("closed.allowed.test", &[Ipv4Addr::new(127, 0, 0, 9)]),
    ("fallback.allowed.test", &[Ipv4Addr::new(127, 0, 0, 9), Ipv4Addr::LOCALHOST]),
    // The echo upstream resets these after its first read.
    ("reset.allowed.test", &[Ipv4Addr::LOCALHOST]),
];

/// The mesh identities the test PKI holds client certificates for.
pub const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
pub const OTHER_APP: &str = "spiffe://cluster.local/ns/other/sa/app";
pub const FOREIGN_DOMAIN: &str = "spiffe://elsewhere.example/ns/default/sa/sleep";

/// A mesh PKI on disk (the gateway's own, or a stranger's).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn mint() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = |s: &str| Principal::parse(s).expect("test SPIFFE ID");
        let spec = Spec {
            gateway_id: p("spiffe://cluster.local/ns/snigress/sa/snigress"),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            clients: vec![p(SLEEP), p(OTHER_APP), p(FOREIGN_DOMAIN)],
        };
        devcerts::mint(dir.path(), &spec, false).expect("mint test PKI");
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Client certificate and key of a SPIFFE ID this PKI minted.
    pub fn client(&self, id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = devcerts::client_files(&Principal::parse(id).expect("SPIFFE ID"));
        load_pair(&self.path(&cert), &self.path(&key))
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        roots_from(&self.path(devcerts::CA_CERT))
    }
}

pub fn load_pair(cert: &Path, key: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_file_iter(cert).expect("cert file").collect::<Result<Vec<_>, _>>().expect("cert");
    (certs, PrivateKeyDer::from_pem_file(key).expect("key"))
}

pub fn roots_from(pem: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pem).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("add root");
    }
    Arc::new(roots)
}

/// An authoritative server for `test.` on 127.0.0.1 (UDP and TCP, one port).
pub struct Dns {
    pub addr: SocketAddr,
    _server: Server<Catalog>,
}

impl Dns {
    pub async fn start(zone: &[(&str, &[Ipv4Addr])]) -> Dns {
        let origin = Name::from_ascii("test.").expect("origin");
        let mut z: InMemoryZoneHandler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            Name::from_ascii("ns.test.").expect("mname"),
            Name::from_ascii("hostmaster.test.").expect("rname"),
            1,
            3600,
            600,
            86400,
            30,
        );
        z.upsert_mut(DnsRecord::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
        for (name, addrs) in zone {
            let name = Name::from_ascii(format!("{name}.")).expect("zone name");
            for ip in *addrs {
                z.upsert_mut(DnsRecord::from_rdata(name.clone(), 60, RData::A(A(*ip))), 1);
            }
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(z) as Arc<dyn ZoneHandler>]);
        let mut server = Server::new(catalog);
        let (udp, tcp, addr) = Self::bind_pair().await;
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 4096);
        Dns { addr, _server: server }
    }

    /// A TCP listener and a UDP socket on the same free port. The kernel
    /// picks the TCP port; the UDP one may be taken, then try another.
    async fn bind_pair() -> (UdpSocket, TcpListener, SocketAddr) {
        for _ in 0..100 {
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind DNS TCP");
            let addr = tcp.local_addr().expect("DNS address");
            if let Ok(udp) = UdpSocket::bind(addr).await {
                return (udp, tcp, addr);
            }
        }
        panic!("no port free for both TCP and UDP on 127.0.0.1");
    }
}

/// Certificates of the pretend internet: one CA, one server certificate for
/// every name in the zone.
#[derive(Clone)]
pub struct Internet {
    pub roots: Arc<RootCertStore>,
    pub server: Arc<ServerConfig>,
    /// The CA certificate in PEM, for clients that read a file (curl).
    pub ca_pem: String,
}

impl Internet {
    pub fn new() -> Internet {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: OpenSSL takes a leaf whose issuer equals its
        // subject for self-signed.
        ca.distinguished_name.push(rcgen::DnType::CommonName, "snigress test internet CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca, ca_key);
        let names: Vec<String> = ZONE.iter().map(|(n, _)| n.to_string()).collect();
        let key = KeyPair::generate().expect("server key");
        let cert = CertificateParams::new(names).expect("names").signed_by(&key, &issuer).expect("server cert");

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("root");
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key");
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        Internet { roots: Arc::new(roots), server: Arc::new(server), ca_pem: ca_cert.pem() }
    }
}

/// A TLS upstream that echoes what it receives and, once the client has
/// finished sending, appends `sni=<name it was asked for>\n` and closes.
/// Asked for `reset.*`, it resets the TCP connection after its first read.
pub struct Echo {
    pub port: u16,
}

impl Echo {
    pub async fn start(config: Arc<ServerConfig>) -> Echo {
        Echo::start_at(config, "127.0.0.1:0".parse().expect("address")).await
    }

    /// An echo upstream on `addr`.
    pub async fn start_at(config: Arc<ServerConfig>, addr: SocketAddr) -> Echo {
        let listener = TcpListener::bind(addr).await.expect("bind echo");
        let port = listener.local_addr().expect("echo address").port();
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                    if sni.starts_with("reset.") {
                        let mut first = [0u8; 1024];
                        let _ = tls.read(&mut first).await;
                        let _ = socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    let (mut r, mut w) = tokio::io::split(tls);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = w.write_all(format!("sni={sni}\n").as_bytes()).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo { port }
    }
}

/// An HTTP/1.1 origin, plain or over TLS: answers every request on a
/// connection (keep-alive, `Content-Length` and chunked bodies) with a
/// one-line body describing what it received, and reports each request.
pub struct Origin {
    pub port: u16,
    pub seen: mpsc::UnboundedReceiver<Seen>,
}

/// One request as the origin received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Which accepted connection (0, 1, ...).
    pub connection: usize,
    /// The head exactly as received.
    pub head: String,
    pub host: String,
    pub body: Vec<u8>,
}

impl Origin {
    pub async fn start(tls: Option<Arc<ServerConfig>>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let port = listener.local_addr().expect("origin address").port();
        let (tx, seen) = mpsc::unbounded_channel();
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                let (tx, acceptor, connection) = (tx.clone(), acceptor.clone(), n);
                n += 1;
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                                serve_http(tls, connection, &sni, tx).await;
                            }
                        }
                        None => serve_http(tcp, connection, "", tx).await,
                    }
                });
            }
        });
        Origin { port, seen }
    }

    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(PATIENCE, self.seen.recv()).await.expect("origin saw nothing").expect("origin")
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    connection: usize,
    sni: &str,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = fill_until(&mut io, &mut buf, b"\r\n\r\n").await else { return };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let field = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let mut body = Vec::new();
        if field("transfer-encoding").is_some() {
            loop {
                let Some(end) = fill_until(&mut io, &mut buf, b"\r\n").await else { return };
                let line = String::from_utf8_lossy(&buf[..end - 2]).into_owned();
                buf.drain(..end);
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
                if size == 0 {
                    let Some(end) = fill_until(&mut io, &mut buf, b"\r\n").await else { return };
                    buf.drain(..end);
                    break;
                }
                if !fill_len(&mut io, &mut buf, size + 2).await {
                    return;
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else if let Some(len) = field("content-length") {
            let len: usize = len.parse().expect("length");
            if !fill_len(&mut io, &mut buf, len).await {
                return;
            }
            body = buf.drain(..len).collect();
        }
        let host = field("host").unwrap_or_default();
        let first = head.lines().next().unwrap_or("").to_owned();
        let answer = format!("{first} host={host} sni={sni} body={} connection={connection}\n", body.len());
        let close = field("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let _ = tx.send(Seen { connection, head, host, body });
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}\r\n{answer}",
            answer.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if io.write_all(response.as_bytes()).await.is_err() || close {
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// Reads until `buf` holds `marker`; the end of the marker's first match.
async fn fill_until<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>, marker: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(marker.len()).position(|w| w == marker) {
            return Some(i + marker.len());
        }
        let mut chunk = [0u8; 8192];
        match io.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

async fn fill_len<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>, len: usize) -> bool {
    while buf.len() < len {
        let mut chunk = [0u8; 8192];
        match io.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    true
}

/// A plain TCP upstream that keeps every byte of each connection and hands
/// them over when the client has finished sending; `progress` counts bytes
/// received so far over all connections.
pub struct Capture {
    pub port: u16,
    pub received: mpsc::UnboundedReceiver<Vec<u8>>,
    pub progress: tokio::sync::watch::Receiver<usize>,
}

impl Capture {
    pub async fn start() -> Capture {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind capture");
        let port = listener.local_addr().expect("capture address").port();
        let (tx, received) = mpsc::unbounded_channel();
        let (count, progress) = tokio::sync::watch::channel(0usize);
        let count = Arc::new(count);
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (tx, count) = (tx.clone(), count.clone());
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        all.extend_from_slice(&buf[..n]);
                        count.send_modify(|c| *c += n);
                    }
                    let _ = tx.send(all);
                });
            }
        });
        Capture { port, received, progress }
    }

    pub async fn next(&mut self) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, self.received.recv()).await.expect("capture timed out").expect("capture closed")
    }
}

/// A listener on an address the gateway must never dial; counts connections.
pub struct Trap {
    pub hits: mpsc::UnboundedReceiver<SocketAddr>,
}

impl Trap {
    pub async fn start(addr: SocketAddr) -> Trap {
        let listener = TcpListener::bind(addr).await.expect("bind trap");
        let (tx, hits) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((_, peer)) = listener.accept().await {
                let _ = tx.send(peer);
            }
        });
        Trap { hits }
    }
}

/// Changes to the standard test config.
#[derive(Default)]
pub struct Options {
    /// Extra lines for the `mtls:` section, each without indentation.
    pub mtls: Vec<String>,
    /// Extra lines for the `metrics:` section, each without indentation.
    pub metrics: Vec<String>,
    /// Extra top-level sections (`timeouts:`, `limits:`), verbatim.
    pub sections: String,
    /// The global allow list, as a YAML flow sequence; default
    /// `["*.allowed.test"]`.
    pub allow: Option<String>,
    /// More listeners, verbatim YAML list items; `{echo}` and `{capture}`
    /// stand for those upstreams' ports (in `sections` too).
    pub listeners: String,
    /// The pretend internet's certificates, when the test made them first
    /// (to start its own upstreams before the gateway's config is written).
    pub internet: Option<Internet>,
    /// Keep the config file as Kubernetes mounts a ConfigMap:
    /// `snigress.yaml -> ..data/snigress.yaml`, `..data -> ..v1`.
    pub configmap: bool,
}

/// Everything running: the gateway and the world around it.
pub struct Harness {
    pub pki: Pki,
    pub internet: Internet,
    pub dns: Dns,
    pub echo: Echo,
    pub capture: Capture,
    pub trap: Trap,
    /// Listener addresses by name: mtls, passthrough, mtls-capture,
    /// passthrough-capture.
    pub addrs: Vec<(String, SocketAddr)>,
    pub metrics_addr: SocketAddr,
    pub records: mpsc::UnboundedReceiver<Record>,
    /// The config file the gateway runs (and reloads) from.
    pub config_path: PathBuf,
    pub reloader: Arc<snigress::gateway::reload::Reloader>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _watch: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Harness {
        let pki = Pki::mint();
        let internet = options.internet.clone().unwrap_or_else(Internet::new);
        let dns = Dns::start(ZONE).await;
        let echo = Echo::start(internet.server.clone()).await;
        let capture = Capture::start().await;
        let trap = Trap::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), echo.port)).await;
        let text = config_text(&pki, dns.addr, echo.port, capture.port, &options);
        let config_path = if options.configmap {
            let dir = pki.dir.path().join("configmap");
            std::fs::create_dir(&dir).expect("configmap dir");
            swap_configmap(&dir, "..v1", &text);
            std::os::unix::fs::symlink("..data/snigress.yaml", dir.join("snigress.yaml")).expect("link");
            dir.join("snigress.yaml")
        } else {
            let path = pki.dir.path().join("snigress.yaml");
            std::fs::write(&path, &text).expect("write config");
            path
        };
        let config = Config::load(&config_path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let (tx, records) = mpsc::unbounded_channel();
        let gateway = Gateway::bind(&config, Arc::new(Channel(tx))).await.expect("gateway binds");
        let addrs = gateway.local_addrs();
        let metrics_addr = gateway.metrics_addr().expect("metrics endpoint");
        let reloader = gateway.reloader(config_path.clone(), &text);
        let watch = reloader.clone().watch().expect("watch the config directory");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(gateway.serve(async move {
            let _ = stopped.await;
        }));
        Harness {
            pki,
            internet,
            dns,
            echo,
            capture,
            trap,
            addrs,
            metrics_addr,
            records,
            config_path,
            reloader,
            stop: Some(stop),
            served: Some(served),
            _watch: watch,
        }
    }

    /// The standard config text with other options, for the same world.
    pub fn config_with(&self, options: &Options) -> String {
        config_text(&self.pki, self.dns.addr, self.echo.port, self.capture.port, options)
    }

    /// Replaces the config file atomically (write aside, rename over), as
    /// an editor or a deploy tool would.
    pub fn write_config(&self, text: &str) {
        replace_file(&self.config_path, text.as_bytes());
    }

    /// Signals shutdown; the returned task ends when the gateway has drained.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.served.take().expect("not shut down yet")
    }

    /// Waits until the metric sample sum reaches `want` (bounded).
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let got = sum(&scrape(self.metrics_addr).await, name, labels);
            if got >= want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}{labels:?} = {got}, waited for {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == listener).map(|(_, a)| *a).expect("listener")
    }

    /// The next access record, in completion order.
    pub async fn record(&mut self) -> Record {
        tokio::time::timeout(PATIENCE, self.records.recv()).await.expect("no access record in time").expect("sink")
    }

    /// Outer mTLS to the `mtls` listener as `id`, offering `alpn`.
    pub async fn outer(&self, listener: &str, id: &str, alpn: &[&str]) -> io::Result<OuterStream> {
        outer_connect(self.addr(listener), &self.pki.roots(), Some(self.pki.client(id)), alpn).await
    }

    /// The application's own TLS, over any stream, to `sni`.
    pub async fn inner<S>(&self, io: S, sni: &str) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        inner_connect(io, sni, self.internet.roots.clone()).await
    }
}

pub type OuterStream = tokio_rustls::client::TlsStream<TcpStream>;

pub fn config_text(pki: &Pki, dns: SocketAddr, echo: u16, capture: u16, options: &Options) -> String {
    let dir = pki.dir.path().display();
    let mtls_extra: String = options.mtls.iter().map(|l| format!("  {l}\n")).collect();
    let metrics_extra: String = options.metrics.iter().map(|l| format!("  {l}\n")).collect();
    let allow = options.allow.as_deref().unwrap_or("[\"*.allowed.test\"]");
    format!(
        "listeners:
  - name: mtls
    address: 127.0.0.1:0
    mode: mtls
    upstream_port: {echo}
  - name: passthrough
    address: 127.0.0.1:0
    mode: passthrough
    upstream_port: {echo}
  - name: mtls-capture
    address: 127.0.0.1:0
    mode: mtls
    upstream_port: {capture}
  - name: passthrough-capture
    address: 127.0.0.1:0
    mode: passthrough
    upstream_port: {capture}
{extra_listeners}mtls:
  cert: {dir}/gateway.pem
  key: {dir}/gateway.key
  client_ca: {dir}/ca.pem
{mtls_extra}policy:
  allow: {allow}
  deny: [blocked.allowed.test]
  rules:
    - name: default-team
      namespaces: [default]
      allow: [\"*.team.test\"]
resolver:
  nameservers: [\"{dns}\"]
  allow_cidrs: [127.0.0.0/8]
  deny_cidrs: [127.0.0.2/32]
metrics:
  address: 127.0.0.1:0
{metrics_extra}{sections}",
        sections = options.sections.replace("{echo}", &echo.to_string()).replace("{capture}", &capture.to_string()),
        extra_listeners =
            options.listeners.replace("{echo}", &echo.to_string()).replace("{capture}", &capture.to_string()),
    )
}

pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&str],
) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config
}

pub async fn outer_connect(
    addr: SocketAddr,
    roots: &Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&str],
) -> io::Result<OuterStream> {
    outer_over(TcpStream::connect(addr).await?, roots, identity, alpn).await
}

/// The outer mTLS layer over a connection already open (after a PROXY
/// header, say).
pub async fn outer_over(
    tcp: TcpStream,
    roots: &Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&str],
) -> io::Result<OuterStream> {
    let config = client_config(roots.clone(), identity, alpn);
    let name = ServerName::try_from("localhost").expect("name");
    TlsConnector::from(Arc::new(config)).connect(name, tcp).await
}

pub async fn inner_connect<S>(
    io: S,
    sni: &str,
    roots: Arc<RootCertStore>,
) -> io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = client_config(roots, None, &[]);
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    TlsConnector::from(Arc::new(config)).connect(name, io).await
}

/// The TLS alert an I/O error carries, if the peer sent one.
pub fn alert_of(e: &io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => Some(*a),
        _ => None,
    }
}

/// Sends `data`, half-closes, and reads everything that comes back, both at
/// once (the echo answers while we send).
pub async fn exchange<S>(stream: S, data: &[u8]) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let receive = async {
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.map(|_| all)
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    received
}

/// Reads until EOF or error; what arrived and how it ended.
pub async fn read_all<S: AsyncRead + Unpin>(stream: &mut S) -> (Vec<u8>, io::Result<()>) {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return (all, Ok(())),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => return (all, Err(e)),
        }
    }
}

/// A real ClientHello for `sni`, as rustls writes it (X25519MLKEM768 key
/// share included, so it is over a kilobyte).
pub fn client_hello(sni: &str) -> Vec<u8> {
    let config = client_config(Arc::new(RootCertStore::empty()), None, &[]);
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write hello");
    }
    out
}

/// Deterministic test data of `len` bytes.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8).collect()
}

/// Bounds a test step.
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(PATIENCE, f).await.unwrap_or_else(|_| panic!("{what}: no result within {PATIENCE:?}"))
}

/// A plain HTTP/1.1 GET (or another method); status code, headers (lower
/// case names) and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect to metrics");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.expect("send request");
    let (raw, _) = read_all(&mut tcp).await;
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("response head");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// The `/metrics` text of a gateway.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, _, body) = within("scrape", http(addr, "GET", "/metrics", &[])).await;
    assert_eq!(status, 200);
    body
}

/// A sample of the text format: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Every sample line of a text exposition.
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value.parse().expect("number");
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let labels = rest
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// Sum of the samples of `name` whose labels include all of `want`.
pub fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, labels, _)| {
            n == name && want.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Writes `content` beside `path` and renames it over `path` (atomic).
pub fn replace_file(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// Publishes `text` as a new ConfigMap version `version` in `dir`: a new
/// directory, then `..data` switched to it by renaming a symlink over it.
pub fn swap_configmap(dir: &Path, version: &str, text: &str) {
    std::fs::create_dir(dir.join(version)).expect("version dir");
    std::fs::write(dir.join(version).join("snigress.yaml"), text).expect("write version");
    let _ = std::fs::remove_file(dir.join("..data_tmp"));
    std::os::unix::fs::symlink(version, dir.join("..data_tmp")).expect("new ..data link");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
}

/// A running `snigress run`, its diagnostic and access-log lines streamed.
pub struct Running {
    pub child: std::process::Child,
    pub stderr: std::sync::mpsc::Receiver<String>,
    pub stdout: std::sync::mpsc::Receiver<String>,
}

impl Running {
    pub fn start(config: &str) -> Running {
        Running::with_args(&["run", "--config", config])
    }

    /// `snigress` with any arguments.
    pub fn with_args(args: &[&str]) -> Running {
        Running::with_command(std::process::Command::new(env!("CARGO_BIN_EXE_snigress")).args(args))
    }

    /// Any command that ends up running `snigress` (a shell setting limits
    /// first, say).
    pub fn with_command(command: &mut std::process::Command) -> Running {
        let mut child =
            command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
        let lines = |pipe: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
        let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
        Running { child, stderr, stdout }
    }

    /// The next stderr line containing `needle`.
    pub fn diag(&self, needle: &str) -> String {
        loop {
            let line = self.stderr.recv_timeout(PATIENCE).unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    pub fn signal(&self, name: &str) {
        let status =
            std::process::Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(status.expect("kill").success());
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.child.wait().expect("wait")
    }

    /// Waits for the process to exit, at most `PATIENCE`.
    pub fn exit_status(mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "still running after {PATIENCE:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Runs futures concurrently on the calling task and collects their outputs
/// in order (the tests' futures borrow the harness, so they are not spawned).
#[allow(unused_imports)] // used by some of the test crates only
pub use futures_util::future::join_all;

/// Raises this process's soft open-file limit to at least `needed` (up to
/// the hard limit; children inherit it). `Err` says why it cannot, for a
/// test to skip with.
pub fn raise_fd_limit(needed: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit: {e}"))?;
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        return Err(format!("needs {needed} open files, the hard limit is {hard} (raise it with ulimit -Hn)"));
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard).map_err(|e| format!("setrlimit to {needed}: {e}"))
}

/// Whether this process runs with effective uid 0 (from /proc, no unsafe).
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1)) == Some("0")
}

/// A nameserver on 127.0.0.1 that answers each A query for one of
/// `names` after `delay` (anything else: NXDOMAIN after the same delay),
/// drops the first `drop_first` UDP queries it receives, and counts them
/// all: a slow or lossy server, to test what the gateway does with late
/// answers. `oversized` makes one whose UDP answers are too big.
pub struct SlowDns {
    pub addr: SocketAddr,
    /// UDP queries received so far (dropped ones included).
    pub queries: Arc<std::sync::atomic::AtomicUsize>,
    /// TCP queries received so far.
    pub tcp_queries: Arc<std::sync::atomic::AtomicUsize>,
}

/// The answer to `request`: `answers` A records (from 127.0.0.1 up) for a known
/// name, NXDOMAIN for any other.
fn dns_answer(request: &hickory_server::proto::op::Message, names: &[Name], answers: usize) -> Option<Vec<u8>> {
    use hickory_server::proto::op::{Message, OpCode, ResponseCode};
    use hickory_server::proto::rr::RecordType;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(request.queries.clone());
    match request.queries.first() {
        Some(q) if names.iter().any(|n| n.eq_case(q.name())) => {
            if q.query_type() == RecordType::A {
                for i in 0..answers {
                    let ip = Ipv4Addr::from(0x7f00_0001 + i as u32);
                    response.add_answer(DnsRecord::from_rdata(q.name().clone(), 60, RData::A(A(ip))));
                }
            }
        }
        _ => response.metadata.response_code = ResponseCode::NXDomain,
    }
    response.to_vec().ok()
}

impl SlowDns {
    pub async fn start(names: &[&str], delay: Duration, drop_first: usize) -> SlowDns {
        SlowDns::serve(names, delay, drop_first, 1, true).await
    }

    /// Answers every A query for `names` with `answers` records: over UDP
    /// whole and without the truncation bit (as a non-conforming server
    /// does), over TCP (when `tcp`) as it should.
    pub async fn oversized(names: &[&str], answers: usize, tcp: bool) -> SlowDns {
        SlowDns::serve(names, Duration::ZERO, 0, answers, tcp).await
    }

    async fn serve(names: &[&str], delay: Duration, drop_first: usize, answers: usize, tcp_too: bool) -> SlowDns {
        use hickory_server::proto::op::Message;
        use std::sync::atomic::Ordering;
        let (udp, tcp, addr) = Dns::bind_pair().await;
        let socket = Arc::new(udp);
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tcp_queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let names: Arc<Vec<Name>> =
            Arc::new(names.iter().map(|n| Name::from_ascii(format!("{n}.")).expect("name")).collect());
        let (count, udp_names) = (queries.clone(), names.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let seen = count.fetch_add(1, Ordering::SeqCst);
                if seen < drop_first {
                    continue;
                }
                let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
                let (socket, names) = (socket.clone(), udp_names.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(bytes) = dns_answer(&request, &names, answers) {
                        let _ = socket.send_to(&bytes, peer).await;
                    }
                });
            }
        });
        let tcp_count = tcp_queries.clone();
        tokio::spawn(async move {
            if !tcp_too {
                return; // the listener is closed: connections are refused
            }
            while let Ok((mut conn, _)) = tcp.accept().await {
                let (names, count) = (names.clone(), tcp_count.clone());
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    while conn.read_exact(&mut len).await.is_ok() {
                        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if conn.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        let Ok(request) = Message::from_vec(&msg) else { return };
                        let Some(bytes) = dns_answer(&request, &names, answers) else { return };
                        let framed = [&(bytes.len() as u16).to_be_bytes()[..], &bytes].concat();
                        if conn.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowDns { addr, queries, tcp_queries }
    }

    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs a command: its stdout, or an error naming it with its stderr.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A network namespace this test created, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// Root and `tools`, then a new namespace named `name` with its
    /// loopback up; `Err` says why the test skips (a missing tool fails
    /// instead under `.ci/run`'s SNIGRESS_REQUIRE_TOOLS). `why` says what the
    /// namespace is for.
    pub fn create(name: &str, tools: &[&str], why: &str) -> Result<Netns, String> {
        if !is_root() {
            return Err(format!("needs root, to create a network namespace and {why}"));
        }
        let required = std::env::var_os("SNIGRESS_REQUIRE_TOOLS").is_some();
        for tool in tools {
            let found = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                assert!(!required, "{tool} is required here");
                return Err(format!("{tool} is not installed (Debian: iproute2, iptables)"));
            }
        }
        let ns = Netns(format!("{name}-{}", std::process::id()));
        run(&["ip", "netns", "add", &ns.0]).expect("create the namespace");
        ns.exec(&["ip", "link", "set", "lo", "up"]).expect("loopback up");
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}
