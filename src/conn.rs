//! One connection, start to end: the stages in data-path order, and the one
//! access record every connection leaves, whatever path it takes.
//!
//! ```text
//! arrival (trusted proxy's PROXY header, intercepted connection's original
//!   destination, outer mTLS on mtls listeners) -> front (the ClientHello's SNI)
//!   -> Destination -> policy -> resolve + vet -> connect -> replay + relay
//! ```
//! Any stage may end the connection with a [`ConnError`]; there is one
//! refusal exit, which sends the error's TLS alert when the client speaks
//! TLS. The record is kept by a [`Recorder`] that emits it exactly once: at
//! the end, or, if the task panics, while it unwinds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admission::PendingTicket;
use crate::arrive::proxy;
use crate::arrive::transparent::original_destination;
use crate::arrive::{ArrivalError, ClientStream};
use crate::config::{Listener, Mode, ProxyIdentity, VerifyDestination};
use crate::connect::{Budget, Dial, connect};
use crate::destination::Destination;
use crate::error::{ConnError, Decision, Termination, alert_name};
use crate::front::http::ReadError as HeadReadError;
use crate::front::http::{self, HttpError, TargetError};
use crate::front::plain::{self, Guarded, Requests};
use crate::front::tls::{self, HelloError, alert};
use crate::front::{Protocol, Short, connect as connect_front};
use crate::identity::Principal;
use crate::name::ServerName;
use crate::observe::access_log::{Record, printable, rfc3339};
use crate::observe::metrics::{ActiveGuard, ConnectResult, ConnectionKey, DnsResult, INVALID, Metrics, Outcome};
use crate::policy::Decision as Verdict;
use crate::relay::{IdleTimeouts, Transfer, copy, splice};
use crate::resolve::ResolveError;
use crate::route;
use crate::state::{Process, Snapshot};

/// Bounds the wait for a refused client to take its alert: the alert is a
/// few bytes, so only a client that stopped reading takes this long.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and discarded from a refused client while lingering.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// The listener a connection arrived on.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Its name, shared by every connection's labels.
    pub name: Arc<str>,
    /// Its validated settings.
    pub config: Listener,
    /// Every address the gateway listens on (no intercepted connection
    /// may have meant one).
    pub own: Arc<[SocketAddr]>,
    /// The gateway's open upstream connections' local addresses, kept when
    /// any listener intercepts (a connection from one came back around).
    pub upstream_ends: Option<Arc<crate::net::LocalEnds>>,
}

impl ListenerInfo {
    pub fn new(
        l: &Listener,
        own: Arc<[SocketAddr]>,
        upstream_ends: Option<Arc<crate::net::LocalEnds>>,
    ) -> ListenerInfo {
        ListenerInfo { name: l.name.as_str().into(), config: l.clone(), own, upstream_ends }
    }

    /// Whether `peer` is a proxy whose PROXY header this listener honours.
    pub fn trusts_proxy(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.config.proxy_protocol.as_ref().is_some_and(|p| p.trusted_sources.iter().any(|net| net.contains(&peer)))
    }
}

/// What has been learned about the connection so far: its record in the
/// making.
#[derive(Default)]
struct Facts {
    /// How the addresses were learned: `tcp`, `proxy_v1`, `proxy_v2`,
    /// `redirect`, `tproxy`.
    arrival: &'static str,
    /// The client's address from a PROXY header (the TCP peer is then the
    /// proxy).
    client_addr: Option<SocketAddr>,
    /// The TCP peer, when it was a proxy.
    proxy_addr: Option<SocketAddr>,
    /// Where the client connected to: a PROXY header's destination, or an
    /// intercepted connection's original destination.
    original_dst: Option<SocketAddr>,
    principal: Option<Principal>,
    outer_sni: Option<String>,
    /// The front that read the destination.
    protocol: Option<Protocol>,
    /// A refusal is answered in HTTP (an HTTP front, before a CONNECT's 200).
    http_answer: bool,
    http_status: Option<u16>,
    connect_authority: Option<String>,
    tunnel_sni: Option<String>,
    sni: Option<String>,
    ech: bool,
    /// Detail of how an allowed connection ended, when it says more than
    /// the termination (a plain-HTTP request that was not forwarded).
    note: Option<String>,
    matched_rule: Option<Arc<str>>,
    upstream_addr: Option<SocketAddr>,
    /// The route taken, when one fitted.
    route: Option<String>,
    /// Policy is in audit for this caller and would have refused: why.
    audit: Option<&'static str>,
    /// The connection's place in its caller's count, given back with the
    /// other limit slots before the record.
    identity_slot: Option<crate::identity_limits::Held>,
    /// The local address the client connected to (a PROXY header out names
    /// it when there is no original destination).
    local_addr: Option<SocketAddr>,
    /// Metric labels, once the name and the decision are known.
    key: Option<ConnectionKey>,
    /// Bytes are being relayed (the connection was allowed and connected).
    relaying: bool,
    /// Why it was refused, once decided; kept if a cut arrives while the
    /// refusal lingers.
    refusal: Option<ConnError>,
}

impl Facts {
    /// Records the refusal; returns how the connection ends.
    fn refuse(&mut self, e: ConnError) -> Termination {
        let termination = e.termination();
        self.refusal = Some(e);
        termination
    }
}

/// What a connection holds against the connection limits. It is given back
/// just before the record is written, so that a client that has seen a
/// connection end can count on its slot being free.
pub(crate) type Slots = Box<dyn std::any::Any + Send>;

/// Runs one accepted connection to its end and emits its access record.
/// `pending` is its place among the connections without a destination yet.
pub(crate) async fn handle(
    tcp: TcpStream,
    client_addr: SocketAddr,
    listener: Arc<ListenerInfo>,
    snapshot: Arc<Snapshot>,
    process: Process,
    pending: PendingTicket,
    slots: Slots,
) {
    let mut recorder = Recorder::start(client_addr, listener, &process);
    recorder.slots = Some(slots);
    let pipeline = Pipeline {
        listener: &recorder.listener,
        snapshot: &snapshot,
        metrics: &process.metrics,
        transfer: &recorder.transfer,
        pending: &pending,
        peer: client_addr,
        identities: &process.identities,
    };
    // The stages run until they end by themselves, or are cut short by the
    // connection's maximum lifetime, the end of a drain, or an eviction
    // while it has no destination yet.
    // (Boxed, and only when there is a limit: most connections have none.)
    let lifetime = async {
        match snapshot.timeouts.max_lifetime {
            Some(limit) => Box::pin(tokio::time::sleep(limit)).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        termination = pipeline.run(tcp, &mut recorder.facts) => Ok(termination),
        () = lifetime => Err(ConnError::MaxLifetime),
        () = process.cut.cancelled() => Err(ConnError::Shutdown),
        () = pending.evicted() => Err(ConnError::Evicted),
    };
    let termination = ended.unwrap_or_else(|by| cut(&mut recorder.facts, by));
    recorder.finish(termination);
}

/// A cut: relayed and refused connections keep their decision, the cut is
/// how they ended; a connection still being set up ends with `cut`.
fn cut(facts: &mut Facts, cut: ConnError) -> Termination {
    let termination = cut.termination();
    if !facts.relaying && facts.refusal.is_none() {
        facts.refusal = Some(cut);
    }
    termination
}

/// The record for a connection refused before its task started (the
/// connection limits).
pub(crate) fn refused_at_accept(client_addr: SocketAddr, listener: Arc<ListenerInfo>, e: ConnError, process: &Process) {
    let mut recorder = Recorder::start(client_addr, listener, process);
    let termination = recorder.facts.refuse(e);
    recorder.finish(termination);
}

/// Keeps a connection's facts and emits its record exactly once: by
/// [`Recorder::finish`], or on drop (a panicking task) as an internal error.
struct Recorder {
    started: (SystemTime, Instant),
    client_addr: SocketAddr,
    listener: Arc<ListenerInfo>,
    process: Process,
    facts: Facts,
    transfer: Transfer,
    /// Counts the connection as active while the record is open.
    active: Option<ActiveGuard>,
    /// Its share of the connection limits, given back before the record.
    slots: Option<Slots>,
    emitted: bool,
}

impl Recorder {
    fn start(client_addr: SocketAddr, listener: Arc<ListenerInfo>, process: &Process) -> Recorder {
        Recorder {
            started: (SystemTime::now(), Instant::now()),
            client_addr,
            active: Some(process.metrics.open(&listener.name)),
            listener,
            process: process.clone(),
            facts: Facts::default(),
            transfer: Transfer::default(),
            slots: None,
            emitted: false,
        }
    }

    /// Counts the connection and hands its record to the sink.
    fn finish(&mut self, termination: Termination) {
        if std::mem::replace(&mut self.emitted, true) {
            return;
        }
        let metrics = &*self.process.metrics;
        let facts = &mut self.facts;
        // Connections that ended before their name was judged are counted now.
        let key = match facts.key.take() {
            Some(key) => key,
            None => {
                let sni = facts.sni.as_ref().map(|_| INVALID);
                let key = metrics.key(sni, facts.principal.as_ref(), false, self.listener.config.mode == Mode::Mtls);
                self.transfer.attach(metrics.bytes(&key));
                key
            }
        };
        let (decision, reason, side, detail, flags) = match &facts.refusal {
            None => (Decision::Allowed, "allowed", None, facts.note.take(), termination.response_flags()),
            Some(e) => (e.decision(), e.reason(), Some(e.side().as_str()), Some(e.to_string()), e.response_flags()),
        };
        let elapsed = self.started.1.elapsed();
        let protocol = facts.protocol.map_or("none", Protocol::as_str);
        let outcome = Outcome { decision, reason, protocol, response_flags: flags };
        metrics.finished(&self.listener.name, &key, outcome, facts.matched_rule.as_ref(), elapsed);
        let principal = facts.principal.as_ref();
        let record = Record {
            start_time: rfc3339(self.started.0),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            listener: self.listener.name.to_string(),
            mode: self.listener.config.mode.as_str(),
            arrival: if facts.arrival.is_empty() { "tcp" } else { facts.arrival },
            protocol: facts.protocol.map(Protocol::as_str),
            client_addr: facts.client_addr.unwrap_or(self.client_addr),
            proxy_addr: facts.proxy_addr,
            original_dst: facts.original_dst,
            outer_sni: facts.outer_sni.take(),
            principal: principal.map(|p| p.uri().to_owned()),
            namespace: principal.and_then(|p| p.namespace()).map(str::to_owned),
            service_account: principal.and_then(|p| p.service_account()).map(str::to_owned),
            sni: facts.sni.take(),
            connect_authority: facts.connect_authority.take(),
            tunnel_sni: facts.tunnel_sni.take(),
            ech: facts.ech,
            decision: decision.as_str(),
            reason,
            side,
            matched_rule: facts.matched_rule.take().map(|m| m.to_string()),
            upstream_addr: facts.upstream_addr,
            route: facts.route.take(),
            audit: facts.audit.map(|_| "would_deny"),
            audit_reason: facts.audit,
            http_status: facts.http_status,
            bytes_from_client: self.transfer.bytes_from_client(),
            bytes_to_client: self.transfer.bytes_to_client(),
            termination: termination.as_str(),
            detail,
        };
        self.active.take();
        self.slots.take();
        self.facts.identity_slot.take();
        self.process.sink.emit(record);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.emitted {
            self.facts.relaying = false;
            self.facts.refusal = Some(ConnError::Internal("the connection's task ended abnormally"));
            self.finish(Termination::Internal);
        }
    }
}

/// A connection ready to relay: its upstream, the bytes to replay, and,
/// on the plain-HTTP front, the request stream to follow (and where
/// following the bytes read with the first head stopped, if it did).
struct Ready {
    upstream: TcpStream,
    replay: Vec<u8>,
    http: Option<(Requests, Option<plain::Stop>)>,
}

/// What the stages of one connection work with.
struct Pipeline<'a> {
    listener: &'a ListenerInfo,
    snapshot: &'a Snapshot,
    metrics: &'a Metrics,
    transfer: &'a Transfer,
    pending: &'a PendingTicket,
    /// The TCP peer.
    peer: SocketAddr,
    /// Per-identity connection counts and rates.
    identities: &'a Arc<crate::identity_limits::IdentityLimits>,
}

impl Pipeline<'_> {
    /// The whole data path for one accepted socket: the arrival, then the
    /// front and what follows on the client's stream.
    async fn run(&self, mut tcp: TcpStream, facts: &mut Facts) -> Termination {
        // Boxed like the paths below: its state (timers, a PROXY header
        // reader) is freed before the connection relays.
        if let Err(e) = Box::pin(self.arrive_tcp(&mut tcp, facts)).await {
            return facts.refuse(e);
        }
        // Each path is boxed on its own: a connection's task then holds only
        // the state of its own kind (a passthrough connection does not pay
        // for the size of the TLS stream).
        match self.listener.config.mode {
            Mode::Passthrough => Box::pin(self.serve(tcp, facts)).await,
            Mode::Mtls => Box::pin(self.mesh(tcp, facts)).await,
        }
    }

    /// The TCP-level arrival: who the peer may be, where an intercepted
    /// connection was going, the first byte, a trusted proxy's header.
    /// Returns with the client's own bytes next on the socket.
    async fn arrive_tcp(&self, tcp: &mut TcpStream, facts: &mut Facts) -> Result<(), ConnError> {
        let listener = self.listener;
        if self.snapshot.routes.announce() {
            facts.local_addr = tcp.local_addr().ok();
        }
        if listener.config.proxy_protocol.is_some() && !listener.trusts_proxy(self.peer.ip()) {
            // Never parsed: a header from anyone else would be a lie.
            return Err(ArrivalError::UntrustedProxy(self.peer.ip()).into());
        }
        if let Some(kind) = listener.config.original_destination {
            let original = original_destination(tcp, kind, &listener.own).map_err(ArrivalError::from)?;
            facts.arrival = kind.as_str();
            facts.original_dst = Some(original);
        }
        // A client sends its first flight at once; one that sends nothing
        // gives its slot back long before a handshake timeout would (and
        // never later than one).
        let timeouts = &self.snapshot.timeouts;
        let stage = if listener.config.mode == Mode::Mtls { timeouts.handshake } else { timeouts.client_hello };
        // (A fresh socket counts as readable at first: peek waits for a byte.)
        if tokio::time::timeout(timeouts.first_byte.min(stage), tcp.peek(&mut [0u8; 1])).await.is_err() {
            return Err(ConnError::FirstByteTimeout);
        }
        // A connection from one of the gateway's own upstream connections
        // came back around. (Checked after the first byte: the upstream end
        // is registered before the gateway writes to it.)
        if listener.config.original_destination.is_some()
            && listener.upstream_ends.as_ref().is_some_and(|ends| ends.contains(self.peer))
        {
            return Err(ArrivalError::from(crate::arrive::transparent::OriginalDstError::CameBack(self.peer)).into());
        }
        if let Some(settings) = &listener.config.proxy_protocol {
            let header =
                proxy::read(tcp, settings.versions, timeouts.client_hello).await.map_err(ArrivalError::from)?;
            facts.arrival = header.version.arrival();
            facts.proxy_addr = Some(self.peer);
            if let Some((source, destination)) = header.addresses {
                facts.client_addr = Some(source);
                facts.original_dst = Some(destination);
            }
            if settings.identity == ProxyIdentity::IstioTlv {
                facts.principal = crate::arrive::peer_identity(&header, &settings.trust_domains)?;
            }
        }
        Ok(())
    }

    /// An mtls listener's connection: the outer layer, then the rest on the
    /// decrypted stream. (Its own function, boxed by the caller: the TLS
    /// stream is large, and a passthrough connection must not pay for it.)
    async fn mesh(&self, tcp: TcpStream, facts: &mut Facts) -> Termination {
        // The handshake boxed on its own: its state (the handshake future,
        // larger than the stream it yields) is freed when it completes,
        // instead of staying in every established connection.
        match Box::pin(self.arrive_mesh(tcp, facts)).await {
            Ok(client) => self.serve(client, facts).await,
            // The outer layer told the client already (or it has gone).
            Err(e) => facts.refuse(e),
        }
    }

    /// The outer mTLS layer: the caller's identity and the decrypted stream.
    async fn arrive_mesh(
        &self,
        tcp: TcpStream,
        facts: &mut Facts,
    ) -> Result<crate::arrive::mtls::MeshStream, ConnError> {
        let mesh =
            self.snapshot.mesh.as_ref().ok_or(ConnError::Internal("mtls listener without outer TLS settings"))?;
        match mesh.accept(tcp).await {
            Ok((stream, peer)) => {
                facts.principal = Some(peer.principal);
                facts.outer_sni = peer.outer_sni;
                Ok(stream)
            }
            Err(e) => {
                self.metrics.handshake_failed(&self.listener.name, e.reason());
                Err(e.into())
            }
        }
    }

    /// The front and the way to the target on the client's stream, then the
    /// relay; the one exit for every refusal.
    async fn serve<S: ClientStream>(&self, mut client: S, facts: &mut Facts) -> Termination {
        // Boxed: the setup state is freed before a connection relays for hours.
        match Box::pin(self.setup(&mut client, facts)).await {
            Ok(Ready { mut upstream, replay, http }) => {
                facts.relaying = true;
                // Registered before the first byte is written upstream.
                let _end =
                    self.listener.upstream_ends.as_ref().and_then(|ends| Some(ends.hold(upstream.local_addr().ok()?)));
                let timeouts = &self.snapshot.timeouts;
                let idle = IdleTimeouts { open: timeouts.idle, half_closed: timeouts.half_close };
                // Each relay boxed: a connection holds the state of the one it
                // uses, not the largest of the three.
                if let Some((requests, stop)) = http {
                    let guarded = Guarded::new(client, requests, stop);
                    return Box::pin(self.relay_requests(guarded, upstream, replay, idle, facts)).await;
                }
                let ended = match client.plain_tcp() {
                    Some(tcp) => Box::pin(splice::splice(tcp, &upstream, replay, idle, self.transfer)).await,
                    None => Box::pin(copy::copy(&mut client, &mut upstream, replay, idle, self.transfer)).await,
                };
                ended.into()
            }
            Err(e) => {
                let reply = if facts.http_answer {
                    let status = e.http_status();
                    facts.http_status = Some(status);
                    Some(http::answer(status, Some(&e.proxy_status()), &format!("{}: {e}\n", e.reason())))
                } else {
                    e.alert().map(|description| {
                        self.metrics.alert_sent(alert_name(description));
                        alert::record(description).to_vec()
                    })
                };
                let termination = facts.refuse(e);
                if let Some(reply) = reply {
                    Box::pin(refuse(client, &reply, self.transfer)).await;
                }
                termination
            }
        }
    }

    /// The plain-HTTP relay: the client's requests are followed, and one
    /// that names another host (or cannot be framed) is not forwarded but
    /// answered, after the responses before it.
    async fn relay_requests<S: ClientStream>(
        &self,
        mut guarded: Guarded<S>,
        mut upstream: TcpStream,
        replay: Vec<u8>,
        idle: IdleTimeouts,
        facts: &mut Facts,
    ) -> Termination {
        let ended = copy::copy(&mut guarded, &mut upstream, replay, idle, self.transfer).await;
        let Some((stop, written)) = guarded.stopped() else { return ended.into() };
        let answered = written.is_some();
        // Answered only if the relay got as far as closing the client's
        // side (an upstream error ends it before).
        if let Some(n) = written {
            self.transfer.add_to_client(n);
            facts.http_status = Some(stop.status());
        }
        facts.note = Some(stop.to_string());
        let termination = match stop {
            plain::Stop::Misdirected(_) => Termination::Misdirected,
            plain::Stop::Invalid(_) => Termination::RequestRefused,
        };
        if answered {
            // What the client sent after the stop is read and dropped, so
            // that closing does not reset the answer away.
            Box::pin(linger(guarded.inner_mut(), self.transfer)).await;
        }
        termination
    }

    /// Everything before the first relayed byte: the front, the
    /// destination, the policy, resolution and the upstream connection.
    /// Returns the upstream and every byte read from the client, to replay.
    async fn setup<S: ClientStream>(&self, client: &mut S, facts: &mut Facts) -> Result<Ready, ConnError> {
        let mut read = Vec::new();
        match self.front(client, &mut read).await? {
            Protocol::Tls => self.setup_tls(client, read, facts).await,
            _ => self.setup_http(client, read, facts).await,
        }
    }

    /// Which front reads this connection: the listener's only one, or, on
    /// a listener with several, the one the first byte names.
    async fn front<S: ClientStream>(&self, client: &mut S, read: &mut Vec<u8>) -> Result<Protocol, ConnError> {
        let protocols = self.listener.config.protocols;
        if !protocols.detects() {
            return Ok(if protocols.tls { Protocol::Tls } else { Protocol::Http });
        }
        let timeout = self.snapshot.timeouts.client_hello;
        let deadline = tokio::time::Instant::now() + timeout;
        crate::front::read_more(client, read, 2048, deadline).await.map_err(|short| {
            ConnError::Hello(match short {
                Short::Closed => tls::ReadError::Closed { received: 0 },
                Short::Io(e) => tls::ReadError::Io(e),
                Short::Timeout => tls::ReadError::Timeout { after: timeout, received: 0 },
            })
        })?;
        self.transfer.add_from_client(read.len());
        protocols.for_first_byte(read[0]).ok_or(ConnError::UnknownProtocol(read[0]))
    }

    /// The TLS front: the ClientHello's SNI names the destination.
    async fn setup_tls<S: ClientStream>(
        &self,
        client: &mut S,
        mut read: Vec<u8>,
        facts: &mut Facts,
    ) -> Result<Ready, ConnError> {
        let Snapshot { timeouts, limits, .. } = self.snapshot;
        facts.protocol = Some(Protocol::Tls);
        let before = read.len();
        let hello = tls::read(client, &mut read, limits.client_hello_bytes, timeouts.client_hello).await;
        self.transfer.add_from_client(read.len() - before);
        let hello = hello?;
        facts.ech = hello.ech;
        self.metrics.hello(&self.listener.name, hello.len);

        let raw = hello.server_name.as_deref().ok_or(ConnError::NoSni)?;
        let name = ServerName::from_bytes(raw).inspect_err(|_| facts.sni = Some(printable(raw)))?;
        facts.sni = Some(name.to_string());
        let destination = self.destination(name, self.listener.config.upstream_port, facts);
        let upstream = self.reach(&destination, hello.ech, facts).await?;
        Ok(Ready { upstream, replay: read, http: None })
    }

    /// The HTTP fronts: a CONNECT request, or a plain-HTTP request.
    async fn setup_http<S: ClientStream>(
        &self,
        client: &mut S,
        mut read: Vec<u8>,
        facts: &mut Facts,
    ) -> Result<Ready, ConnError> {
        let protocols = self.listener.config.protocols;
        facts.http_answer = true;
        if protocols.connect != protocols.http {
            facts.protocol = Some(if protocols.connect { Protocol::Connect } else { Protocol::Http });
        }
        let before = read.len();
        let head = http::read(client, &mut read, self.snapshot.timeouts.client_hello).await;
        self.transfer.add_from_client(read.len() - before);
        let head = head?;
        let connect = head.method == "CONNECT";
        let served = if connect { protocols.connect } else { protocols.http };
        if !served {
            return Err(HeadReadError::from(HttpError::Method(head.method)).into());
        }
        if connect {
            return self.tunnel(client, read, head, facts).await;
        }
        facts.protocol = Some(Protocol::Http);
        let authority = plain::check(&head).map_err(TargetError::from)?;
        facts.sni = Some(authority.name.to_string());
        let destination = self.destination(authority.name, self.listener.config.http_port, facts);
        if let Some(port) = authority.port.filter(|p| *p != destination.port) {
            return Err(TargetError::Port { port, allowed: "not the listener's plain-HTTP upstream port" }.into());
        }
        let upstream = self.reach(&destination, false, facts).await?;
        // What came after the first head is followed now, and what may go
        // upstream is replayed with it.
        let leftover = read.split_off(head.len);
        let mut requests = Requests::after(&head, destination.name, destination.port);
        let stop = requests.feed(&leftover, &mut read).err();
        Ok(Ready { upstream, replay: read, http: Some((requests, stop)) })
    }

    /// The CONNECT front: policy on the request's target, the `200`, then
    /// the tunnel's ClientHello must name the same host.
    async fn tunnel<S: ClientStream>(
        &self,
        client: &mut S,
        mut read: Vec<u8>,
        head: http::Head,
        facts: &mut Facts,
    ) -> Result<Ready, ConnError> {
        let settings = &self.snapshot.connect;
        facts.protocol = Some(Protocol::Connect);
        facts.connect_authority = Some(printable(head.target.as_bytes()));
        let (name, port) = match connect_front::target(&head, settings)? {
            connect_front::Target::Name(name, port) => (name, port),
            connect_front::Target::Address(addr) => {
                return self.tunnel_to_address(client, read, head, addr, facts).await;
            }
        };
        facts.sni = Some(name.to_string());
        let destination = self.destination(name, port, facts);
        let upstream = self.reach(&destination, false, facts).await?;
        self.established(client, facts).await?;

        let mut replay = read.split_off(head.len);
        if settings.plaintext_ports.contains(&port) {
            return Ok(Ready { upstream, replay, http: None });
        }
        let hello = self.tunnel_hello(client, &mut replay, facts).await?;
        match hello.server_name.as_deref() {
            None if settings.require_sni => return Err(ConnError::NoSni),
            Some(raw) if ServerName::from_bytes(raw).ok().as_ref() != Some(&destination.name) => {
                return Err(ConnError::SniMismatch { authority: destination.name.to_string(), sni: printable(raw) });
            }
            _ => {}
        }
        if hello.ech && self.snapshot.refuse_ech {
            return Err(ConnError::Ech);
        }
        Ok(Ready { upstream, replay, http: None })
    }

    /// `CONNECT ip:port` (`connect.allow_ip_literals`): the address is
    /// vetted before the 200; then the tunnelled SNI is the name policy
    /// decides on, and it must resolve to that address, the only one
    /// dialled (as `verify_destination: strict` on an intercepted
    /// connection).
    async fn tunnel_to_address<S: ClientStream>(
        &self,
        client: &mut S,
        mut read: Vec<u8>,
        head: http::Head,
        addr: SocketAddr,
        facts: &mut Facts,
    ) -> Result<Ready, ConnError> {
        let ip = self
            .snapshot
            .resolver
            .settings()
            .vetting
            .vet(addr.ip())
            .map_err(|why| ConnError::Resolve(ResolveError::AllRefused(vec![(addr.ip(), why)])))?;
        let addr = SocketAddr::new(ip, addr.port());
        facts.original_dst = Some(addr);
        self.established(client, facts).await?;
        let mut replay = read.split_off(head.len);
        let hello = self.tunnel_hello(client, &mut replay, facts).await?;
        let raw = hello.server_name.as_deref().ok_or(ConnError::NoSni)?;
        let name = ServerName::from_bytes(raw).inspect_err(|_| facts.sni = Some(printable(raw)))?;
        facts.sni = Some(name.to_string());
        let identity = facts.principal.clone();
        let destination = Destination { name, port: addr.port(), identity, original: Some(addr), strict: true };
        let upstream = self.reach(&destination, hello.ech, facts).await?;
        Ok(Ready { upstream, replay, http: None })
    }

    /// Sends a CONNECT's `200`; from here on the client speaks (or should
    /// speak) TLS, and a refusal is an alert.
    async fn established<S: ClientStream>(&self, client: &mut S, facts: &mut Facts) -> Result<(), ConnError> {
        let sent = async {
            client.write_all(http::ESTABLISHED).await?;
            client.flush().await
        };
        sent.await.map_err(HeadReadError::Io)?;
        self.transfer.add_to_client(http::ESTABLISHED.len());
        facts.http_status = Some(200);
        facts.http_answer = false;
        Ok(())
    }

    /// The ClientHello at the start of a CONNECT tunnel (after what came
    /// with the head, in `replay`).
    async fn tunnel_hello<S: ClientStream>(
        &self,
        client: &mut S,
        replay: &mut Vec<u8>,
        facts: &mut Facts,
    ) -> Result<tls::Hello, ConnError> {
        let Snapshot { timeouts, limits, .. } = self.snapshot;
        let before = replay.len();
        let hello = tls::read(client, replay, limits.client_hello_bytes, timeouts.client_hello).await;
        self.transfer.add_from_client(replay.len() - before);
        let hello = match hello {
            Err(tls::ReadError::Hello(HelloError::NotTls)) => return Err(ConnError::TunnelNotTls),
            other => other?,
        };
        facts.ech = hello.ech;
        facts.tunnel_sni = hello.server_name.as_deref().map(printable);
        self.metrics.hello(&self.listener.name, hello.len);
        Ok(hello)
    }

    /// Where a front's name leads: an intercepted connection goes where it
    /// was going; anything else to `port`.
    fn destination(&self, name: ServerName, port: u16, facts: &Facts) -> Destination {
        let port = match (self.listener.config.original_destination, facts.original_dst) {
            (Some(_), Some(original)) => original.port(),
            _ => port,
        };
        let strict = self.listener.config.verify_destination == VerifyDestination::Strict;
        Destination { name, port, identity: facts.principal.clone(), original: facts.original_dst, strict }
    }

    /// From a destination to an open upstream connection: policy, then
    /// the way out.
    async fn reach(&self, destination: &Destination, ech: bool, facts: &mut Facts) -> Result<TcpStream, ConnError> {
        self.admit_identity(destination, facts)?;
        self.authorize(destination, ech, facts)?;
        self.pending.settle();
        self.leave(destination, facts).await
    }

    /// The route stage: the first route that fits says how an allowed
    /// connection leaves; without one, or on a direct route, the
    /// destination's resolved, vetted (and, when strict, verified)
    /// addresses are dialled. A next hop or an upstream proxy is handed the
    /// name, and dials it itself.
    async fn leave(&self, destination: &Destination, facts: &mut Facts) -> Result<TcpStream, ConnError> {
        let source = facts.client_addr.unwrap_or(self.peer);
        let by = route::Facts {
            name: &destination.name,
            principal: destination.identity.as_ref(),
            source: source.ip(),
            listener: &self.listener.name,
        };
        let route = self.snapshot.routes.pick(&by);
        facts.route = route.map(|r| r.name.clone());
        let mark = route.and_then(|r| r.mark).or(self.listener.config.upstream_mark);
        let upstream = match route.map(|r| &r.action) {
            Some(route::Action::NextHop { hops, proxy_protocol, allow_cidrs }) => {
                let addrs = self.hops(hops, allow_cidrs).await?;
                let mut upstream = self.connect(&addrs, Dial { mark, ..Dial::default() }, facts).await?;
                if let Some(version) = proxy_protocol {
                    let to = facts.original_dst.or(facts.local_addr).unwrap_or(source);
                    let header = route::proxy_header(*version, source, to);
                    if let Err(e) = upstream.write_all(&header).await {
                        let addr = facts.upstream_addr.unwrap_or(source);
                        let attempts = vec![crate::connect::Attempt { addr, error: Some(e) }];
                        return Err(crate::connect::ConnectError { attempts, budget_spent: false }.into());
                    }
                }
                upstream
            }
            Some(route::Action::HttpProxy { proxy, authorization, allow_cidrs }) => {
                let addrs = self.hops(std::slice::from_ref(proxy), allow_cidrs).await?;
                let mut upstream = self.connect(&addrs, Dial { mark, ..Dial::default() }, facts).await?;
                let authority = format!("{}:{}", destination.name, destination.port);
                let asked = route::open_tunnel(&mut upstream, &authority, authorization.as_ref());
                let budget = self.snapshot.timeouts.connect_total;
                match tokio::time::timeout(budget, asked).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        let proxy = facts.upstream_addr.unwrap_or(source);
                        return Err(route::UpstreamProxyError::Timeout { proxy }.into());
                    }
                }
                upstream
            }
            Some(route::Action::Direct { bind, freebind }) => {
                self.direct(destination, Dial { mark, bind: *bind, freebind: *freebind }, facts).await?
            }
            None => self.direct(destination, Dial { mark, ..Dial::default() }, facts).await?,
        };
        if let Some(route) = route {
            self.metrics.routed(&route.name);
        }
        Ok(upstream)
    }

    /// Dials the destination's own addresses.
    async fn direct(&self, destination: &Destination, dial: Dial, facts: &mut Facts) -> Result<TcpStream, ConnError> {
        let addrs = self.resolve(&destination.name).await?;
        let addrs = self.verify(destination, addrs)?;
        let addrs: Vec<SocketAddr> = addrs.into_iter().map(|ip| SocketAddr::new(ip, destination.port)).collect();
        self.connect(&addrs, dial, facts).await
    }

    /// A route's next hops, in order: IP literals as written, names
    /// resolved; every address vetted as a destination's is, except for the
    /// route's own `allow_cidrs` (a next hop is often inside).
    async fn hops(&self, hops: &[route::Hop], allow_cidrs: &[ipnet::IpNet]) -> Result<Vec<SocketAddr>, ConnError> {
        let vetting = &self.snapshot.resolver.settings().vetting;
        // Addresses vetting refused that the route's exceptions admit.
        let excepted = |refused: &[(std::net::IpAddr, &str)]| -> Vec<std::net::IpAddr> {
            refused.iter().filter_map(|(ip, _)| vetting.vet_excepting(*ip, allow_cidrs).ok()).collect()
        };
        let mut addrs = Vec::new();
        let mut failed = None;
        for hop in hops {
            let ips = match &hop.host {
                route::HopHost::Ip(ip) => match vetting.vet_excepting(*ip, allow_cidrs) {
                    Ok(ip) => vec![ip],
                    Err(why) => {
                        failed = Some(ResolveError::AllRefused(vec![(*ip, why)]));
                        continue;
                    }
                },
                route::HopHost::Name(name) => match self.snapshot.resolver.resolve(name).await {
                    Ok(r) => {
                        let mut ips = r.addrs.clone();
                        ips.extend(excepted(&r.refused));
                        ips
                    }
                    Err(ResolveError::AllRefused(refused)) => {
                        let ips = excepted(&refused);
                        if ips.is_empty() {
                            failed = Some(ResolveError::AllRefused(refused));
                        }
                        ips
                    }
                    Err(e) => {
                        failed = Some(e);
                        continue;
                    }
                },
            };
            addrs.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, hop.port)));
        }
        match (addrs.is_empty(), failed) {
            (true, Some(e)) => Err(e.into()),
            (true, None) => Err(ResolveError::NoAddresses.into()),
            _ => Ok(addrs),
        }
    }

    /// The caller's own limits: its open connections and its rate.
    fn admit_identity(&self, destination: &Destination, facts: &mut Facts) -> Result<(), ConnError> {
        let Some(principal) = &destination.identity else { return Ok(()) };
        match self.identities.admit(principal.uri(), self.snapshot.limits.identity) {
            Ok(held) => {
                facts.identity_slot = held;
                Ok(())
            }
            Err(crate::identity_limits::Refusal::Connections(max)) => Err(ConnError::IdentityLimit(max)),
            Err(crate::identity_limits::Refusal::Rate) => Err(ConnError::RateLimited),
        }
    }

    /// Policy: whether this caller may reach this name. From here on the
    /// connection's bytes are counted under its name, live.
    fn authorize(&self, destination: &Destination, ech: bool, facts: &mut Facts) -> Result<(), ConnError> {
        let Destination { name, identity, .. } = destination;
        let verdict = self.snapshot.policy.decide(name, identity.as_ref());
        let allowed = matches!(verdict, Verdict::Allowed(_));
        let key =
            self.metrics.key(Some(name.as_str()), identity.as_ref(), allowed, self.listener.config.mode == Mode::Mtls);
        self.transfer.attach(self.metrics.bytes(&key));
        facts.key = Some(key);
        let refusal = match verdict {
            Verdict::Allowed(m) => {
                facts.matched_rule = Some(m.label.clone());
                None
            }
            Verdict::Denied(m) => {
                facts.matched_rule = Some(m.label.clone());
                Some(ConnError::Denied(Some(m)))
            }
            Verdict::NotAllowed => Some(ConnError::Denied(None)),
        };
        if let Some(refusal) = refusal {
            if !self.snapshot.policy.audits(identity.as_ref()) {
                return Err(refusal);
            }
            // Audit: let through, and say what enforcing would have done.
            facts.audit = Some(refusal.reason());
            if let Some(key) = &facts.key {
                self.metrics.audited(&self.listener.name, key);
            }
        }
        // The SNI of a hello with ECH is the public name of the ECH
        // provider, not the real destination.
        if ech && self.snapshot.refuse_ech {
            return Err(ConnError::Ech);
        }
        Ok(())
    }

    /// Resolution and vetting: the addresses that may be dialled.
    async fn resolve(&self, name: &ServerName) -> Result<Vec<std::net::IpAddr>, ConnError> {
        let asked = Instant::now();
        let resolved = self.snapshot.resolver.resolve(name).await;
        let result = match &resolved {
            Ok(_) | Err(ResolveError::AllRefused(_)) => DnsResult::Ok,
            Err(ResolveError::NxDomain) => DnsResult::NxDomain,
            Err(ResolveError::NoAddresses) => DnsResult::NoAddresses,
            Err(ResolveError::Timeout) => DnsResult::Timeout,
            Err(ResolveError::Failed(_)) => DnsResult::Error,
        };
        self.metrics.dns(result, resolved.as_ref().is_ok_and(|r| r.cached), asked.elapsed());
        let resolved = resolved?;
        if !resolved.refused.is_empty() && !resolved.cached {
            tracing::debug!(sni = %name, refused = ?resolved.refused, "some addresses refused by vetting");
        }
        Ok(resolved.addrs)
    }

    /// `verify_destination: strict`: the name must resolve to the address
    /// the client connected to, and only that address is dialled (a client
    /// cannot reach one address while naming another).
    fn verify(
        &self,
        destination: &Destination,
        addrs: Vec<std::net::IpAddr>,
    ) -> Result<Vec<std::net::IpAddr>, ConnError> {
        if !destination.strict {
            return Ok(addrs);
        }
        match destination.original {
            Some(original) if addrs.contains(&original.ip()) => Ok(vec![original.ip()]),
            original => {
                Err(ConnError::DestinationMismatch { name: destination.name.to_string(), original, resolved: addrs })
            }
        }
    }

    /// The upstream connection, within the connect budget.
    async fn connect(&self, addrs: &[SocketAddr], dial: Dial, facts: &mut Facts) -> Result<TcpStream, ConnError> {
        let timeouts = &self.snapshot.timeouts;
        let budget = Budget { per_attempt: timeouts.connect, total: timeouts.connect_total };
        let dialled = Instant::now();
        match connect(addrs, budget, dial).await {
            Ok((upstream, addr)) => {
                self.metrics.connect(ConnectResult::Ok, dialled.elapsed());
                facts.upstream_addr = Some(addr);
                Ok(upstream)
            }
            Err(e) => {
                let result = if e.timed_out() { ConnectResult::Timeout } else { ConnectResult::Failed };
                self.metrics.connect(result, dialled.elapsed());
                facts.upstream_addr = e.last_tried();
                Err(e.into())
            }
        }
    }
}

/// Sends the refusal (a fatal TLS alert on the inner layer, or an HTTP
/// answer), closes our side (close_notify on the outer TLS layer, FIN on
/// TCP) and lingers briefly so it is read before the socket goes away
/// instead of being lost to a reset. Every byte written and drained is
/// counted.
async fn refuse<S>(mut client: S, record: &[u8], transfer: &Transfer)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let send = async {
        client.write_all(record).await?;
        transfer.add_to_client(record.len());
        client.shutdown().await
    };
    if tokio::time::timeout(REFUSAL_LINGER, send).await.is_ok_and(|r| r.is_ok()) {
        linger(&mut client, transfer).await;
    }
}

/// After our side is closed: reads and drops what the client still sends,
/// briefly and boundedly, so that closing the socket does not reset what
/// was just written before the client read it. The bytes are counted.
async fn linger<S: AsyncRead + Unpin>(client: &mut S, transfer: &Transfer) {
    let drain = async {
        let mut sink = [0u8; 1024];
        let mut total = 0;
        while total < REFUSAL_DRAIN_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    transfer.add_from_client(n);
                }
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::access_log::Channel;
    use crate::observe::metrics::Caps;

    fn process() -> (Process, tokio::sync::mpsc::UnboundedReceiver<Record>, Arc<Metrics>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new(Caps::default()));
        let process = Process {
            metrics: metrics.clone(),
            sink: Arc::new(Channel(tx)),
            cut: Default::default(),
            identities: Default::default(),
        };
        (process, rx, metrics)
    }

    fn listener() -> Arc<ListenerInfo> {
        let l = Listener {
            name: "l".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            mode: Mode::Passthrough,
            protocols: crate::front::Protocols::TLS,
            upstream_port: 443,
            http_port: 80,
            proxy_protocol: None,
            original_destination: None,
            verify_destination: VerifyDestination::Off,
            upstream_mark: None,
        };
        Arc::new(ListenerInfo::new(&l, Arc::new([]), None))
    }

    #[tokio::test]
    async fn a_task_that_panics_still_leaves_one_record_and_its_count() {
        let (process, mut records, metrics) = process();
        let addr: SocketAddr = "127.0.0.1:1234".parse().unwrap();
        let task = tokio::spawn({
            let process = process.clone();
            async move {
                let mut recorder = Recorder::start(addr, listener(), &process);
                recorder.facts.sni = Some("a.example".into());
                recorder.transfer.add_from_client(7);
                panic!("a bug in a stage");
            }
        });
        assert!(task.await.is_err_and(|e| e.is_panic()));
        let r = records.recv().await.expect("a record");
        assert_eq!(
            (r.decision, r.reason, r.side, r.termination),
            ("error", "internal_error", Some("internal"), "internal_error")
        );
        assert_eq!((r.sni.as_deref(), r.bytes_from_client), (Some("a.example"), 7));
        assert!(records.try_recv().is_err(), "exactly one record");
        let text = metrics.prometheus_text(0);
        assert!(text.contains("reason=\"internal_error\",protocol=\"none\",rule=\"none\"} 1"), "{text}");
        assert!(text.contains("snigress_active_connections{listener=\"l\"} 0"), "{text}");
    }

    #[tokio::test]
    async fn a_finished_record_is_not_emitted_again_on_drop() {
        let (process, mut records, _) = process();
        let mut recorder = Recorder::start("127.0.0.1:1".parse().unwrap(), listener(), &process);
        let t = recorder.facts.refuse(ConnError::NoSni);
        recorder.finish(t);
        drop(recorder);
        let r = records.recv().await.expect("a record");
        assert_eq!((r.decision, r.reason, r.side), ("denied", "no_sni", Some("client")));
        assert!(records.try_recv().is_err());
    }

    #[test]
    fn a_cut_keeps_a_decided_refusal_and_names_itself_otherwise() {
        let mut refused = Facts::default();
        refused.refuse(ConnError::Denied(None));
        assert_eq!(cut(&mut refused, ConnError::Shutdown), Termination::DrainTimeout);
        assert_eq!(refused.refusal.as_ref().map(ConnError::reason), Some("policy_denied"));

        let mut relaying = Facts { relaying: true, ..Facts::default() };
        assert_eq!(cut(&mut relaying, ConnError::MaxLifetime), Termination::MaxLifetime);
        assert!(relaying.refusal.is_none(), "an allowed connection stays allowed");

        let mut setting_up = Facts::default();
        cut(&mut setting_up, ConnError::MaxLifetime);
        assert_eq!(setting_up.refusal.as_ref().map(ConnError::reason), Some("max_lifetime"));
    }

    /// What an idle connection holds in its task and its boxed stages: a
    /// guard against a change that makes every connection pay for the state
    /// of a stage it is not in (docs/performance.md, idle memory).
    #[tokio::test]
    async fn an_idle_connection_holds_only_the_state_of_its_own_stage() {
        let config = crate::config::Config::parse(
            "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\npolicy: {allow: [\"*.a.test\"]}\n",
            "sizes.yaml",
            std::path::Path::new("."),
        )
        .expect("config");
        let snapshot = Arc::new(Snapshot::build(&config, None).expect("snapshot"));
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut accepted = Vec::new();
        for _ in 0..3 {
            let client = TcpStream::connect(server.local_addr().expect("address")).await.expect("connect");
            accepted.push((client, server.accept().await.expect("accept")));
        }
        let mut sockets = accepted.into_iter().map(|(_, (socket, peer))| (socket, peer));
        let (process, _records, metrics) = process();
        let pending = Arc::new(crate::admission::Pending::new(10, metrics));
        let info = listener();
        let (tcp, peer) = sockets.next().expect("socket");
        let task = handle(
            tcp,
            peer,
            info.clone(),
            snapshot.clone(),
            process.clone(),
            pending.admit(1, peer.ip()),
            Box::new(()),
        );
        let transfer = Transfer::default();
        let ticket = pending.admit(2, peer.ip());
        let pipeline = Pipeline {
            listener: &info,
            snapshot: &snapshot,
            metrics: &process.metrics,
            transfer: &transfer,
            pending: &ticket,
            peer,
            identities: &process.identities,
        };
        let (mut passthrough_facts, mut mesh_facts) = (Facts::default(), Facts::default());
        let passthrough = pipeline.serve(sockets.next().expect("socket").0, &mut passthrough_facts);
        let mesh = pipeline.mesh(sockets.next().expect("socket").0, &mut mesh_facts);
        let sizes = (size_of_val(&task), size_of_val(&passthrough), size_of_val(&mesh));
        // When written: 1 368, 664 and 760 bytes (debug), 1 344, 632 and 736
        // (release); before the stages were boxed the task alone was 2 192
        // and the mesh stage 4 288 (release).
        assert!(sizes.0 <= 1536 && sizes.1 <= 768 && sizes.2 <= 1024, "task, passthrough, mesh: {sizes:?}");
        assert!(size_of::<crate::arrive::mtls::MeshStream>() <= 8, "the TLS stream is boxed");
    }
}
