//! One connection, start to end: the stages in data-path order, and the one
//! access record every connection leaves, whatever path it takes.
//!
//! ```text
//! outer mTLS (mtls listeners) -> inner ClientHello -> name -> policy
//!   -> resolve + vet -> connect -> replay + splice
//! ```
//! Any stage may end the connection; a refusal on the inner layer sends a
//! fatal TLS alert first, so the client sees why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::access_log::{Record, printable, rfc3339};
use crate::config::{Limits, Mode, Timeouts};
use crate::connect::connect;
use crate::identity::Principal;
use crate::metrics::{ConnectionKey, DnsResult, INVALID, Metrics};
use crate::mtls::Outer;
use crate::name::ServerName;
use crate::policy::{Decision, Policy};
use crate::resolve::{ResolveError, Resolver};
use crate::sni::{HelloReader, Progress, alert};
use crate::splice::{Transfer, splice};

/// Bounds the wait for a refused client to take its alert: the alert is a
/// few bytes, so only a client that stopped reading takes this long.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and discarded from a refused client while lingering.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
/// Read size while collecting the ClientHello.
const HELLO_READ_CHUNK: usize = 4096;

/// Everything a new connection needs, built from one config; replaced as a
/// whole when the config changes, so a connection sees one consistent set.
pub struct State {
    pub policy: Policy,
    pub resolver: Resolver,
    /// The outer layer, when any listener is in mtls mode.
    pub outer: Option<Outer>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Refuse inner hellos carrying encrypted_client_hello.
    pub refuse_ech: bool,
}

/// What outlives config reloads: metrics, and the signal that the drain
/// deadline has passed and connections still open must end.
#[derive(Clone)]
pub struct Env {
    pub metrics: Arc<Metrics>,
    pub stop: watch::Receiver<bool>,
}

/// The listener a connection arrived on.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub mode: Mode,
    pub upstream_port: u16,
}

/// The end of a connection: decision, reason, how it ended.
struct Outcome {
    decision: &'static str,
    reason: &'static str,
    termination: &'static str,
    detail: Option<String>,
}

impl Outcome {
    fn refused(reason: &'static str, detail: impl Into<String>) -> Outcome {
        Outcome { decision: "denied", reason, termination: "refused", detail: Some(detail.into()) }
    }

    fn error(reason: &'static str, termination: &'static str, detail: impl Into<String>) -> Outcome {
        Outcome { decision: "error", reason, termination, detail: Some(detail.into()) }
    }
}

/// What has been learned about the connection so far.
#[derive(Default)]
struct Facts {
    principal: Option<Principal>,
    outer_sni: Option<String>,
    sni: Option<String>,
    ech: bool,
    matched_rule: Option<String>,
    upstream_addr: Option<SocketAddr>,
    /// Metric labels, once the name and the decision are known.
    key: Option<ConnectionKey>,
    /// Bytes are being spliced (the connection was allowed and connected).
    splicing: bool,
}

/// Runs one accepted connection to its end and returns its access record.
pub async fn handle(
    tcp: TcpStream,
    client_addr: SocketAddr,
    listener: &ListenerInfo,
    state: Arc<State>,
    env: &Env,
) -> Record {
    let started = (SystemTime::now(), Instant::now());
    let metrics = &*env.metrics;
    let _active = metrics.open(&listener.name);
    let transfer = Transfer::default();
    let mut facts = Facts::default();
    let stage = Stage { listener, state: &state, metrics, transfer: &transfer };

    // The stages run until they end by themselves, or are cut short by the
    // connection's maximum lifetime or the end of a drain.
    let lifetime = async {
        match state.timeouts.max_lifetime {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let mut stop = env.stop.clone();
    let drained = async {
        // A closed channel (no gateway serving any more) is not a drain.
        if stop.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let ended = tokio::select! {
        outcome = stage.run(tcp, &mut facts) => Ok(outcome),
        () = lifetime => Err("max_lifetime"),
        () = drained => Err("drain_timeout"),
    };
    let outcome = match ended {
        Ok(outcome) => outcome,
        Err(cut) if facts.splicing => {
            Outcome { decision: "allowed", reason: "allowed", termination: cut, detail: None }
        }
        Err(cut) => Outcome::error("shutdown", cut, "ended before its data path was set up"),
    };

    // Connections that ended before their name was judged are counted now.
    let key = match facts.key.take() {
        Some(key) => key,
        None => {
            let sni = facts.sni.as_ref().map(|_| INVALID);
            let key = metrics.key(sni, facts.principal.as_ref(), false);
            transfer.attach(metrics.bytes(&key));
            key
        }
    };
    metrics.finished(&listener.name, &key, outcome.decision, outcome.reason, started.1.elapsed());
    record(started, client_addr, listener, facts, outcome, &transfer)
}

/// The record for a connection refused before its task started (the
/// connection limit).
pub fn refused_at_accept(
    client_addr: SocketAddr,
    listener: &ListenerInfo,
    reason: &'static str,
    detail: &str,
    metrics: &Metrics,
) -> Record {
    let started = (SystemTime::now(), Instant::now());
    let outcome = Outcome::refused(reason, detail);
    let key = metrics.key(None, None, false);
    metrics.finished(&listener.name, &key, outcome.decision, outcome.reason, Duration::ZERO);
    record(started, client_addr, listener, Facts::default(), outcome, &Transfer::default())
}

fn record(
    (start, t0): (SystemTime, Instant),
    client_addr: SocketAddr,
    listener: &ListenerInfo,
    facts: Facts,
    outcome: Outcome,
    transfer: &Transfer,
) -> Record {
    let principal = facts.principal.as_ref();
    Record {
        start_time: rfc3339(start),
        duration_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        listener: listener.name.to_string(),
        mode: listener.mode.as_str(),
        client_addr,
        outer_sni: facts.outer_sni,
        principal: principal.map(|p| p.uri().to_owned()),
        namespace: principal.and_then(|p| p.namespace()).map(str::to_owned),
        service_account: principal.and_then(|p| p.service_account()).map(str::to_owned),
        sni: facts.sni,
        ech: facts.ech,
        decision: outcome.decision,
        reason: outcome.reason,
        matched_rule: facts.matched_rule,
        upstream_addr: facts.upstream_addr,
        bytes_from_client: transfer.from_client(),
        bytes_to_client: transfer.to_client(),
        termination: outcome.termination,
        detail: outcome.detail,
    }
}

/// The plain TCP socket of a client stream, when no TLS layer sits in
/// between (passthrough): then bytes can move with `splice(2)`.
trait PlainTcp {
    fn plain_tcp(&self) -> Option<&TcpStream>;
}

impl PlainTcp for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl PlainTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// What the inner stages work with.
struct Stage<'a> {
    listener: &'a ListenerInfo,
    state: &'a State,
    metrics: &'a Metrics,
    transfer: &'a Transfer,
}

impl Stage<'_> {
    /// The whole data path for one accepted socket.
    async fn run(&self, tcp: TcpStream, facts: &mut Facts) -> Outcome {
        // Each path is boxed on its own: a connection's task then holds only
        // the state of its own kind (a passthrough connection does not pay
        // for the size of the TLS stream), and setup state is freed before a
        // connection idles for hours.
        match self.listener.mode {
            Mode::Passthrough => Box::pin(self.inner(tcp, facts)).await,
            Mode::Mtls => Box::pin(self.mtls(tcp, facts)).await,
        }
    }

    /// The outer mTLS layer, then the inner stages on the decrypted stream.
    async fn mtls(&self, tcp: TcpStream, facts: &mut Facts) -> Outcome {
        let Some(outer) = self.state.outer.as_ref() else {
            return Outcome::error("internal_error", "refused", "mtls listener without outer TLS settings");
        };
        match Box::pin(outer.accept(tcp)).await {
            Ok((tls, peer)) => {
                facts.principal = Some(peer.principal);
                facts.outer_sni = peer.outer_sni;
                Box::pin(self.inner(tls, facts)).await
            }
            Err(e) => {
                self.metrics.handshake_failed(&self.listener.name, e.reason());
                let termination =
                    if e.reason() == "outer_handshake_timeout" { "handshake_timeout" } else { "handshake_failed" };
                Outcome { decision: "denied", reason: e.reason(), termination, detail: Some(e.to_string()) }
            }
        }
    }

    /// The inner stages, on the decrypted stream (mtls) or the raw socket
    /// (passthrough).
    async fn inner<S>(&self, mut client: S, facts: &mut Facts) -> Outcome
    where
        S: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    {
        let Stage { listener, state, metrics, transfer } = *self;

        // Inner ClientHello.
        let (buf, hello) = match Box::pin(read_hello(&mut client, state, transfer)).await {
            Ok(found) => found,
            Err(HelloFailure { outcome, alert: Some(a) }) => return Box::pin(refuse(client, a, outcome)).await,
            Err(HelloFailure { outcome, alert: None }) => return outcome,
        };
        facts.ech = hello.ech;
        metrics.hello(&listener.name, hello.len);

        // Name.
        let name = match hello.server_name.as_deref() {
            None => {
                let outcome = Outcome::refused("no_sni", "the ClientHello has no server_name");
                return Box::pin(refuse(client, alert::UNRECOGNIZED_NAME, outcome)).await;
            }
            Some(raw) => match ServerName::from_bytes(raw) {
                Ok(name) => name,
                Err(e) => {
                    facts.sni = Some(printable(raw));
                    let outcome = Outcome::refused("invalid_sni", e.to_string());
                    return Box::pin(refuse(client, alert::UNRECOGNIZED_NAME, outcome)).await;
                }
            },
        };
        facts.sni = Some(name.to_string());

        // Policy. From here on the connection's bytes are counted under its
        // name, live.
        let decision = state.policy.decide(&name, facts.principal.as_ref());
        let allowed = matches!(decision, Decision::Allowed(_));
        let key = metrics.key(Some(name.as_str()), facts.principal.as_ref(), allowed);
        transfer.attach(metrics.bytes(&key));
        facts.key = Some(key);
        match decision {
            Decision::Allowed(m) => facts.matched_rule = Some(m.label()),
            Decision::Denied(m) => {
                facts.matched_rule = Some(m.label());
                let outcome = Outcome::refused("policy_denied", format!("deny pattern {} matched", m.label()));
                return Box::pin(refuse(client, alert::ACCESS_DENIED, outcome)).await;
            }
            Decision::NotAllowed => {
                let outcome = Outcome::refused("policy_denied", "no allow pattern matched");
                return Box::pin(refuse(client, alert::ACCESS_DENIED, outcome)).await;
            }
        }
        // The SNI of a hello with ECH is the public name of the ECH
        // provider, not the real destination.
        if hello.ech && state.refuse_ech {
            let outcome = Outcome::refused("ech_refused", "encrypted_client_hello present and policy.refuse_ech is on");
            return Box::pin(refuse(client, alert::ACCESS_DENIED, outcome)).await;
        }

        // Resolve and vet.
        let asked = Instant::now();
        let resolved = Box::pin(state.resolver.resolve(&name)).await;
        let dns_result = match &resolved {
            Ok(_) | Err(ResolveError::AllRefused(_)) => DnsResult::Ok,
            Err(ResolveError::NxDomain) => DnsResult::NxDomain,
            Err(ResolveError::NoAddresses) => DnsResult::NoAddresses,
            Err(ResolveError::Timeout) => DnsResult::Timeout,
            Err(ResolveError::Failed(_)) => DnsResult::Error,
        };
        metrics.dns(dns_result, resolved.as_ref().is_ok_and(|r| r.cached), asked.elapsed());
        let resolved = match resolved {
            Ok(r) => r,
            Err(e) => {
                let (alert, termination) = match &e {
                    ResolveError::AllRefused(_) => (alert::ACCESS_DENIED, "refused"),
                    ResolveError::NxDomain | ResolveError::NoAddresses => (alert::UNRECOGNIZED_NAME, "refused"),
                    ResolveError::Timeout => (alert::INTERNAL_ERROR, "dns_timeout"),
                    ResolveError::Failed(_) => (alert::INTERNAL_ERROR, "refused"),
                };
                let decision = if matches!(e, ResolveError::AllRefused(_)) { "denied" } else { "error" };
                let outcome = Outcome { decision, reason: e.reason(), termination, detail: Some(e.to_string()) };
                return Box::pin(refuse(client, alert, outcome)).await;
            }
        };
        if !resolved.refused.is_empty() {
            tracing::info!(sni = %name, refused = ?resolved.refused, "some addresses refused by vetting");
        }

        // Connect.
        let dialled = Instant::now();
        let connected = Box::pin(connect(&resolved.addrs, listener.upstream_port, state.timeouts.connect)).await;
        let (mut upstream, addr) = match connected {
            Ok(found) => {
                metrics.connect("ok", dialled.elapsed());
                found
            }
            Err(e) => {
                metrics.connect(if e.all_timed_out { "timeout" } else { "failed" }, dialled.elapsed());
                facts.upstream_addr = resolved.addrs.last().map(|ip| SocketAddr::new(*ip, listener.upstream_port));
                let termination = if e.all_timed_out { "connect_timeout" } else { "refused" };
                let outcome = Outcome::error(e.reason(), termination, e.to_string());
                return Box::pin(refuse(client, alert::INTERNAL_ERROR, outcome)).await;
            }
        };
        facts.upstream_addr = Some(addr);
        facts.splicing = true;

        // Replay and splice.
        // Everything read so far is replayed: the hello and whatever followed it.
        let idle = state.timeouts.idle;
        let termination = match client.plain_tcp() {
            Some(tcp) => Box::pin(crate::zerocopy::splice_tcp(tcp, &upstream, buf, idle, transfer)).await,
            None => splice(&mut client, &mut upstream, buf, idle, transfer).await,
        };
        Outcome { decision: "allowed", reason: "allowed", termination: termination.as_str(), detail: None }
    }
}

struct HelloFailure {
    outcome: Outcome,
    /// The alert to send, when the peer speaks TLS at all.
    alert: Option<u8>,
}

/// Reads until the ClientHello is complete; returns every byte read.
async fn read_hello<S>(
    client: &mut S,
    state: &State,
    transfer: &Transfer,
) -> Result<(Vec<u8>, crate::sni::Hello), HelloFailure>
where
    S: AsyncRead + Unpin,
{
    let cap = state.limits.client_hello_bytes;
    let timeout = state.timeouts.client_hello;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reader = HelloReader::new(cap);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match reader.advance(&buf) {
            Ok(Progress::Complete(hello)) => return Ok((buf, hello)),
            Ok(Progress::NeedMore) if buf.len() < cap => {}
            Ok(Progress::NeedMore) => {
                let e = crate::sni::HelloError::TooLarge(cap);
                return Err(HelloFailure {
                    outcome: Outcome::refused(e.reason(), e.to_string()),
                    alert: Some(alert::DECODE_ERROR),
                });
            }
            Err(e) => {
                let alert = (e != crate::sni::HelloError::NotTls).then_some(alert::DECODE_ERROR);
                return Err(HelloFailure { outcome: Outcome::refused(e.reason(), e.to_string()), alert });
            }
        }
        let old = buf.len();
        buf.resize((old + HELLO_READ_CHUNK).min(cap), 0);
        let read = tokio::time::timeout_at(deadline, client.read(&mut buf[old..])).await;
        let n = match read {
            Err(_) => {
                let detail = format!("no complete ClientHello within {timeout:?} ({old} bytes received)");
                let outcome = Outcome::error("client_hello_timeout", "client_hello_timeout", detail);
                return Err(HelloFailure { outcome, alert: None });
            }
            Ok(Err(e)) => {
                return Err(HelloFailure {
                    outcome: Outcome::error("client_error", "client_error", e.to_string()),
                    alert: None,
                });
            }
            Ok(Ok(0)) => {
                let detail = format!("the client closed before its ClientHello was complete ({old} bytes received)");
                return Err(HelloFailure {
                    outcome: Outcome::error("client_closed_early", "client_closed", detail),
                    alert: None,
                });
            }
            Ok(Ok(n)) => n,
        };
        buf.truncate(old + n);
        transfer.add_from_client(n);
    }
}

/// Sends a fatal alert on the inner layer, closes our side (close_notify on
/// the outer TLS layer, FIN on TCP) and lingers briefly so the alert is read
/// before the socket goes away instead of being lost to a reset. Callers box
/// it: it holds the stream and a drain buffer, and would otherwise widen the
/// state of every connection that is allowed.
async fn refuse<S>(mut client: S, description: u8, outcome: Outcome) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let send = async {
        client.write_all(&alert::record(description)).await?;
        client.shutdown().await
    };
    if tokio::time::timeout(REFUSAL_LINGER, send).await.is_ok_and(|r| r.is_ok()) {
        let drain = async {
            let mut sink = [0u8; 1024];
            let mut total = 0;
            while total < REFUSAL_DRAIN_BYTES {
                match client.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
    }
    outcome
}
