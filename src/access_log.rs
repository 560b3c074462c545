//! The access record: one JSON object per connection, produced in one place
//! (`conn::handle`) on every path and written when the connection ends.
//!
//! Records go to stdout by default or to `access_log.path`, never mixed with
//! the diagnostic log (stderr). Writing happens on a dedicated thread so a
//! slow stdout never stalls a connection task.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;

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
    pub client_addr: SocketAddr,
    /// SNI of the outer mTLS layer (mtls listeners; never used for routing).
    pub outer_sni: Option<String>,
    /// SPIFFE ID of the caller (mtls listeners).
    pub principal: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// The inner SNI, normalised; for an invalid name, the raw value with
    /// non-printable bytes escaped (so a refused name is still visible).
    pub sni: Option<String>,
    /// The inner ClientHello carried an encrypted_client_hello extension.
    pub ech: bool,
    /// `allowed`, `denied` or `error`.
    pub decision: &'static str,
    /// Why (bounded vocabulary, see the README).
    pub reason: &'static str,
    /// The pattern that decided (`rule-name:pattern` for per-identity rules).
    pub matched_rule: Option<String>,
    /// The address dialled (or last tried).
    pub upstream_addr: Option<SocketAddr>,
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
}

/// JSON lines on a writer thread.
pub struct JsonLines {
    tx: mpsc::Sender<Message>,
}

enum Message {
    Record(Box<Record>),
    /// Answered once everything sent before it is written and flushed.
    Flush(mpsc::Sender<()>),
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
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the access-log thread"));
        JsonLines { tx }
    }

    /// Waits (at most `timeout`) until every record emitted so far is written.
    pub fn flush(&self, timeout: std::time::Duration) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

/// Writes each record as one line; flushes whenever the queue is empty, so a
/// burst costs one flush and a lone record is visible at once.
fn write_loop(rx: mpsc::Receiver<Message>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::new(out);
    let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
    let handle = |out: &mut BufWriter<_>, message: Message, waiting: &mut Vec<mpsc::Sender<()>>| match message {
        Message::Record(record) => {
            if let Err(e) =
                serde_json::to_writer(&mut *out, &record).map_err(io::Error::from).and_then(|()| out.write_all(b"\n"))
            {
                tracing::error!(error = %e, "cannot write the access log");
            }
        }
        Message::Flush(done) => waiting.push(done),
    };
    while let Ok(message) = rx.recv() {
        handle(&mut out, message, &mut waiting);
        while let Ok(message) = rx.try_recv() {
            handle(&mut out, message, &mut waiting);
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "cannot flush the access log");
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

impl Sink for JsonLines {
    fn emit(&self, record: Record) {
        // The writer thread lives as long as the process; if it died, the
        // record is lost and the diagnostic log says so.
        if self.tx.send(Message::Record(Box::new(record))).is_err() {
            tracing::error!("access-log writer is gone; record dropped");
        }
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
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&format).unwrap_or_default()
}

/// A name from the wire as printable text: ASCII graphic characters kept,
/// anything else escaped as `\xNN`, cut at 300 bytes.
pub fn printable(raw: &[u8]) -> String {
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
}
