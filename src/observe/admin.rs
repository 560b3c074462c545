//! The metrics address: `GET /metrics`, `/healthz` and `/readyz`, apart from
//! the proxy listeners.
//!
//! A deliberately small HTTP/1.x server: one request per connection
//! (`Connection: close`), a request head of at most [`MAX_REQUEST_BYTES`].
//! It must answer the kubelet's probes whatever else connects, so:
//! - a connection that sends no byte within [`FIRST_BYTE_TIMEOUT`], or no
//!   whole head within [`REQUEST_TIMEOUT`], is closed;
//! - up to [`MAX_CLIENTS`] connections are held at once (a task and a small
//!   buffer each); when that many are open, a new connection evicts the
//!   oldest one still waiting for its request head, instead of being
//!   refused: idle and slow clients cannot starve a probe, only each other.
//!   A connection whose head has arrived is never evicted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::observe::access_log::Sink;
use crate::observe::metrics::Metrics;

/// Largest request head accepted (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time allowed for the first byte of a request: a probe sends its request
/// at once.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed to send the whole request head and take the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections held at once: far more than any scraper and probes need,
/// and a bounded share of the descriptors (the proxy keeps the rest).
pub const MAX_CLIENTS: usize = 512;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoints report.
#[derive(Clone)]
pub struct Status {
    pub metrics: Arc<Metrics>,
    /// Every listener is bound and the config (policy, certificates) is
    /// loaded; cleared while draining.
    pub ready: Arc<AtomicBool>,
    /// The access-log sink, whose drops are a metric.
    pub sink: Arc<dyn Sink>,
}

/// The connections waiting for their request head, oldest first: the ones
/// a new connection may evict.
#[derive(Default)]
struct Waiting {
    queue: Mutex<VecDeque<(u64, CancellationToken)>>,
    /// Connections open now, waiting or answered.
    open: AtomicU64,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, CancellationToken)>> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// No longer evictable (its head arrived, or it ended).
    fn forget(&self, id: u64) {
        self.lock().retain(|(waiting, _)| *waiting != id);
    }

    /// Makes room for one more connection: `false` when every one open is
    /// being answered.
    fn make_room(&self) -> bool {
        if self.open.load(Ordering::Relaxed) < MAX_CLIENTS as u64 {
            return true;
        }
        match self.lock().pop_front() {
            Some((_, oldest)) => {
                oldest.cancel();
                true
            }
            None => false,
        }
    }
}

/// One admin connection's place: released when its task ends.
struct Place {
    waiting: Arc<Waiting>,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.waiting.forget(self.id);
        self.waiting.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, status: Status) {
    let waiting = Arc::new(Waiting::default());
    let mut backoff = crate::net::Backoff::default();
    for id in 0.. {
        let (tcp, _) = crate::net::accept(&listener, &mut backoff, |e, _| {
            tracing::debug!(error = %e, "metrics endpoint: accept failed");
        })
        .await;
        if !waiting.make_room() {
            continue; // every connection is being answered: closed at once
        }
        let evicted = CancellationToken::new();
        waiting.lock().push_back((id, evicted.clone()));
        waiting.open.fetch_add(1, Ordering::Relaxed);
        let place = Place { waiting: waiting.clone(), id };
        let status = status.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(tcp, &status, &place)) => {}
                () = evicted.cancelled() => {}
            }
            drop(place);
        });
    }
}

async fn answer(mut tcp: TcpStream, status: &Status, place: &Place) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = if head.is_empty() {
            match tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.read(&mut buf)).await {
                Ok(read) => read?,
                Err(_) => return Ok(()),
            }
        } else {
            tcp.read(&mut buf).await?
        };
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_end(&head) {
            place.waiting.forget(place.id);
            break end;
        }
        if head.len() > MAX_REQUEST_BYTES {
            return respond(
                &mut tcp,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                true,
            )
            .await;
        }
    };
    let head = String::from_utf8_lossy(&head[..end]);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return respond(&mut tcp, "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n", with_body).await;
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    match path {
        "/metrics" if accept.contains("application/openmetrics-text") => {
            let body = status.metrics.openmetrics(status.sink.dropped());
            respond(&mut tcp, "200 OK", OPENMETRICS, body.as_bytes(), with_body).await
        }
        "/metrics" => {
            let body = status.metrics.prometheus_text(status.sink.dropped());
            respond(&mut tcp, "200 OK", PROMETHEUS_TEXT, body.as_bytes(), with_body).await
        }
        "/healthz" => respond(&mut tcp, "200 OK", "text/plain", b"ok\n", with_body).await,
        "/readyz" if status.ready.load(Ordering::Relaxed) => {
            respond(&mut tcp, "200 OK", "text/plain", b"ready\n", with_body).await
        }
        "/readyz" => respond(&mut tcp, "503 Service Unavailable", "text/plain", b"not ready\n", with_body).await,
        _ => respond(&mut tcp, "404 Not Found", "text/plain", b"not found\n", with_body).await,
    }
}

/// End of the request head (after the blank line), if it has arrived.
fn find_end(head: &[u8]) -> Option<usize> {
    head.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

async fn respond(
    tcp: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    if with_body {
        tcp.write_all(body).await?;
    }
    tcp.shutdown().await
}
