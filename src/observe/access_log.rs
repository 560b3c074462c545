//! The access record: one JSON object per connection, produced in one place
//! (the connection's recorder in `conn.rs`) on every path, a panic included,
//! and written when the connection ends.
//!
//! Records go to stdout by default or to `access_log.path`, never mixed with
//! the diagnostic log (stderr). Writing happens on a dedicated thread so a
//! slow stdout never stalls a connection task.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;

/// What happened to one connection. Field names are the public log schema
/// (documented in the README); keep them stable.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    /// When the connection was accepted, RFC 3339 UTC.
    pub start_time: String,
    pub duration_ms: u64,
    pub listener: String,
    /// `mtls` or `passthrough`.
    pub mode: &'static str,
    /// How the connection's addresses were learned: `tcp`, `proxy_v1`,
    /// `proxy_v2`, `redirect` or `tproxy`.
    pub arrival: &'static str,
    /// The front that read the destination: `tls`, `connect` or `http`;
    /// absent when the connection ended before one was chosen.
    pub protocol: Option<&'static str>,
    /// The client: the TCP peer, or the source a trusted PROXY header named.
    pub client_addr: SocketAddr,
    /// The TCP peer when it was a proxy that sent a PROXY header.
    pub proxy_addr: Option<SocketAddr>,
    /// Where the client connected to: a PROXY header's destination or an
    /// intercepted connection's original destination.
    pub original_dst: Option<SocketAddr>,
    /// SNI of the outer mTLS layer (mtls listeners; never used for routing).
    pub outer_sni: Option<String>,
    /// SPIFFE ID of the caller (mtls listeners).
    pub principal: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// The inner SNI, normalised; for an invalid name, the raw value with
    /// non-printable bytes escaped (so a refused name is still visible).
    pub sni: Option<String>,
    /// The CONNECT request's target as sent (CONNECT front).
    pub connect_authority: Option<String>,
    /// The SNI of the ClientHello tunnelled through a CONNECT, as sent.
    pub tunnel_sni: Option<String>,
    /// The inner ClientHello carried an encrypted_client_hello extension.
    pub ech: bool,
    /// `allowed`, `denied` or `error`.
    pub decision: &'static str,
    /// Why (bounded vocabulary, see the README).
    pub reason: &'static str,
    /// For refusals and errors, who caused the end: `client`, `upstream`,
    /// `policy` or `internal`; absent when allowed.
    pub side: Option<&'static str>,
    /// The pattern that decided (`rule-name:pattern` for per-identity rules).
    pub matched_rule: Option<String>,
    /// The address dialled (or last tried): a next hop's on a next-hop route.
    pub upstream_addr: Option<SocketAddr>,
    /// The route that said how the connection left (`routes[].name`).
    pub route: Option<String>,
    /// `would_deny` when policy is in audit mode for this caller and would
    /// have refused the connection, which was let through.
    pub audit: Option<&'static str>,
    /// The reason enforcing would have given (`policy_denied`).
    pub audit_reason: Option<&'static str>,
    /// The status of the HTTP answer the gateway itself sent (HTTP fronts:
    /// a CONNECT's 200, a refusal, a 421); absent when it sent none.
    pub http_status: Option<u16>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// How the connection ended (who closed, or which timeout).
    pub termination: &'static str,
    /// Free-text detail for errors and refusals (not a metric label).
    pub detail: Option<String>,
}

/// Where finished records go.
pub trait Sink: Send + Sync {
    fn emit(&self, record: Record);

    /// Records dropped so far because the output could not keep up.
    fn dropped(&self) -> u64 {
        0
    }
}

/// JSON lines, written by a thread of their own in batches: records queue
/// up and the writer takes them every [`BATCH_INTERVAL`] (or sooner when
/// [`BATCH_SIZE`] are waiting), so a connection costs no thread wake-up and
/// a busy gateway one write per batch.
pub struct JsonLines {
    shared: Arc<Handoff>,
}

/// Longest a record waits before it is written.
pub const BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// Records that wake the writer before the interval is up.
pub const BATCH_SIZE: usize = 1024;
/// Most records waiting to be written; if the output stalls (a blocked
/// stdout pipe), newer records are dropped and counted instead of growing
/// memory without bound.
pub const MAX_QUEUED: usize = 100_000;

struct Handoff {
    queue: Mutex<Queue>,
    /// Records dropped since the start (the metric), beside the count not
    /// yet reported in the diagnostic log.
    dropped_total: AtomicU64,
    /// Signalled when a batch is full or a flush is asked for.
    wake: Condvar,
    /// Signalled after each written batch.
    written: Condvar,
}

#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    /// Records dropped because the queue was full, not yet reported.
    dropped: u64,
    /// Flushes asked for, and the last one completed.
    flush_asked: u64,
    flush_done: u64,
}

impl JsonLines {
    /// Opens `path` for appending, or stdout when `None`.
    pub fn open(path: Option<&Path>) -> io::Result<JsonLines> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(OpenOptions::new().create(true).append(true).open(p)?),
            None => Box::new(io::stdout()),
        };
        Ok(JsonLines::spawn(out))
    }

    pub fn spawn(out: Box<dyn Write + Send>) -> JsonLines {
        let shared = Arc::new(Handoff {
            queue: Mutex::default(),
            dropped_total: AtomicU64::new(0),
            wake: Condvar::new(),
            written: Condvar::new(),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&writer, out))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the access-log thread"));
        JsonLines { shared }
    }

    /// Waits (at most `timeout`) until every record emitted so far is written.
    pub fn flush(&self, timeout: std::time::Duration) {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        queue.flush_asked += 1;
        let want = queue.flush_asked;
        self.shared.wake.notify_one();
        let _ = self
            .shared
            .written
            .wait_timeout_while(queue, timeout, |q| q.flush_done < want)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

fn write_loop(shared: &Handoff, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut batch = Vec::new();
    loop {
        let flush_asked = {
            let queue = shared.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let (mut queue, _) = shared
                .wake
                .wait_timeout_while(queue, BATCH_INTERVAL, |q| {
                    q.records.len() < BATCH_SIZE && q.flush_asked == q.flush_done
                })
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::swap(&mut batch, &mut queue.records);
            if queue.dropped > 0 {
                tracing::error!(dropped = queue.dropped, "access log output stalled: records dropped");
                queue.dropped = 0;
            }
            queue.flush_asked
        };
        for record in batch.drain(..) {
            if let Err(e) =
                serde_json::to_writer(&mut out, &record).map_err(io::Error::from).and_then(|()| out.write_all(b"\n"))
            {
                tracing::error!(error = %e, "cannot write the access log");
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "cannot flush the access log");
        }
        let mut queue = shared.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        queue.flush_done = flush_asked;
        shared.written.notify_all();
    }
}

impl Sink for JsonLines {
    fn emit(&self, record: Record) {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if queue.records.len() >= MAX_QUEUED {
            queue.dropped += 1;
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.records.push(record);
        if queue.records.len() == BATCH_SIZE {
            self.shared.wake.notify_one();
        }
    }

    fn dropped(&self) -> u64 {
        self.shared.dropped_total.load(Ordering::Relaxed)
    }
}

/// Records into a channel: for embedding and tests.
pub struct Channel(pub tokio::sync::mpsc::UnboundedSender<Record>);

impl Sink for Channel {
    fn emit(&self, record: Record) {
        let _ = self.0.send(record);
    }
}

/// RFC 3339 UTC timestamp with millisecond precision.
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&format).unwrap_or_default()
}

/// A name from the wire as printable text: ASCII graphic characters kept,
/// anything else escaped as `\xNN`, cut at 300 bytes.
pub(crate) fn printable(raw: &[u8]) -> String {
    let mut out = String::new();
    for &b in raw.iter().take(300) {
        if b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn printable_escapes() {
        assert_eq!(printable(b"a.example"), "a.example");
        assert_eq!(printable(b"a b\0\xff"), "a\\x20b\\x00\\xff");
        assert_eq!(printable(&[b'a'; 400]).len(), 300);
    }

    /// An output that never takes a byte: a stalled stdout pipe.
    struct Stalled;

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            loop {
                std::thread::park();
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_and_counts_records_instead_of_growing() {
        let log = JsonLines::spawn(Box::new(Stalled));
        let record = Record {
            start_time: rfc3339(std::time::UNIX_EPOCH),
            duration_ms: 0,
            listener: "l".into(),
            mode: "passthrough",
            arrival: "tcp",
            protocol: None,
            client_addr: "127.0.0.1:1".parse().unwrap(),
            proxy_addr: None,
            original_dst: None,
            outer_sni: None,
            principal: None,
            namespace: None,
            service_account: None,
            sni: None,
            connect_authority: None,
            tunnel_sni: None,
            ech: false,
            decision: "denied",
            reason: "not_tls",
            side: Some("client"),
            matched_rule: None,
            upstream_addr: None,
            route: None,
            audit: None,
            audit_reason: None,
            http_status: None,
            bytes_from_client: 0,
            bytes_to_client: 0,
            termination: "refused",
            detail: None,
        };
        // The writer holds at most one batch while it is stuck, the queue at
        // most MAX_QUEUED: everything past both is dropped and counted.
        for _ in 0..2 * MAX_QUEUED + 10 {
            log.emit(record.clone());
        }
        assert!(log.dropped() >= 10, "{}", log.dropped());
    }
}
