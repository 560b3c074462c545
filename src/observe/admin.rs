//! The metrics address: `GET /metrics`, `/healthz` and `/readyz`, apart from
//! the proxy listeners.
//!
//! A deliberately small HTTP/1.x server: one request per connection
//! (`Connection: close`), a request head of at most [`MAX_REQUEST_BYTES`]
//! read within [`REQUEST_TIMEOUT`], at most [`MAX_CLIENTS`] served at once.
//! A slow or hostile client of this port can neither hold resources long
//! nor take them from the proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::observe::access_log::Sink;
use crate::observe::metrics::Metrics;

/// Largest request head accepted (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time allowed to send the request head and take the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once; more are closed without an answer.
pub const MAX_CLIENTS: usize = 32;

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

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, status: Status) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut backoff = crate::net::Backoff::default();
    loop {
        let (tcp, _) = crate::net::accept(&listener, &mut backoff, |e, _| {
            tracing::debug!(error = %e, "metrics endpoint: accept failed");
        })
        .await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let status = status.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(tcp, &status)).await;
            drop(slot);
        });
    }
}

async fn answer(mut tcp: TcpStream, status: &Status) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_end(&head) {
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
