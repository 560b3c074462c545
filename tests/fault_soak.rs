//! Network faults under load: inside a network namespace this test creates
//! (root only), the loopback is made lossy and slow, and many concurrent
//! byte-exact transfers go both ways through both listener kinds: no byte
//! lost or altered, and every access record counts exactly the bytes that
//! moved.
//!
//! Impairments: `tc netem` (1 % loss, 20 ms ± 10 ms delay, 0.5 %
//! reordering, 200 Mbit/s) where the kernel has it; otherwise 1 % random
//! loss with iptables' `statistic` match and 200 Mbit/s with `tc tbf` (no
//! delay or reordering: the kernel has no netem; the test says which it
//! applied). The gateway, DNS, upstream and clients run in a child process
//! inside the namespace: this same test binary, run for [`soak_child`].

mod common;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use common::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Set in the environment of the child run.
const CHILD: &str = "SNIGRESS_SOAK_CHILD";
/// Transfers per listener kind, all at once.
const TRANSFERS: usize = 24;
/// Bytes each transfer sends (and gets back from the echo upstream).
const PAYLOAD: usize = 256 * 1024;

#[test]
fn byte_exact_transfers_through_a_lossy_rate_limited_network() {
    let ns = match Netns::create("snigress-soak", &["ip", "tc", "iptables"], "impair its loopback") {
        Ok(ns) => ns,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let exec = |args: &[&str]| ns.exec(args).map(|_| ());
    let netem = exec(&[
        "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "20ms", "10ms", "loss", "1%", "reorder", "0.5%",
        "rate", "200mbit",
    ]);
    let applied = match netem {
        Ok(()) => "netem: 1% loss, 20ms +-10ms delay, 0.5% reordering, 200 Mbit/s".to_owned(),
        Err(why) => {
            exec(&[
                "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "200mbit", "burst", "256kb", "latency",
                "500ms",
            ])
            .expect("rate limit");
            exec(&[
                "iptables",
                "-A",
                "INPUT",
                "-i",
                "lo",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.01",
                "-j",
                "DROP",
            ])
            .expect("loss");
            format!("1% loss (iptables statistic), 200 Mbit/s (tbf); no delay or reordering: {why}")
        }
    };
    println!("impairments: {applied}");
    let exe = std::env::current_exe().expect("test binary");
    let exe = exe.display().to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            &exe,
            "--exact",
            "soak_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success() && stdout.contains("SOAK OK"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Counts the bytes that cross it, at the layer the gateway relays.
struct Counting<S> {
    inner: S,
    written: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// TCP segments this namespace has retransmitted so far: the proof that
/// packets were lost.
fn retransmitted() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// One transfer: `payload` out through the listener, the echo back; the
/// bytes counted at the gateway's client side.
async fn transfer(h: &Harness, listener: &str, payload: Vec<u8>) -> (SocketAddr, u64, u64) {
    let (written, read) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let echoed = if listener == "mtls" {
        let outer = h.outer("mtls", SLEEP, &[]).await.expect("outer");
        let local = outer.get_ref().0.local_addr().expect("local");
        let io = Counting { inner: outer, written: written.clone(), read: read.clone() };
        (local, exchange(h.inner(io, "a.allowed.test").await.expect("inner"), &payload).await)
    } else {
        let tcp = TcpStream::connect(h.addr("passthrough")).await.expect("connect");
        let local = tcp.local_addr().expect("local");
        let io = Counting { inner: tcp, written: written.clone(), read: read.clone() };
        (local, exchange(h.inner(io, "b.allowed.test").await.expect("inner"), &payload).await)
    };
    let (local, echoed) = echoed;
    let echoed = echoed.expect("exchange");
    assert!(echoed.starts_with(&payload) && echoed.len() == payload.len() + "sni=a.allowed.test\n".len(), "altered");
    (local, written.load(Ordering::Relaxed), read.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside its network namespace by byte_exact_transfers_through_a_lossy_rate_limited_network"]
async fn soak_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let mut h = Harness::start().await;
    let retransmits = retransmitted();
    let started = std::time::Instant::now();
    let runs: Vec<_> = (0..2 * TRANSFERS)
        .map(|i| {
            let listener = if i % 2 == 0 { "mtls" } else { "passthrough" };
            Box::pin(transfer(&h, listener, data(PAYLOAD, i as u8)))
        })
        .collect();
    let counted = within("transfers", join_all(runs)).await;
    let took = started.elapsed();
    let mut records = Vec::new();
    for _ in 0..counted.len() {
        records.push(h.record().await);
    }
    for (local, written, read) in &counted {
        let r = records.iter().find(|r| r.client_addr == *local).unwrap_or_else(|| panic!("no record for {local}"));
        assert_eq!((r.decision, r.bytes_from_client, r.bytes_to_client), ("allowed", *written, *read), "{r:?}");
    }
    let moved: u64 = counted.iter().map(|(_, w, r)| w + r).sum();
    let retransmits = retransmitted() - retransmits;
    println!(
        "SOAK OK: {} transfers, {moved} bytes through the gateway in {took:?}, {retransmits} TCP retransmissions",
        counted.len()
    );
    assert!(retransmits > 0, "the impairments lost no packet: nothing was tested");
}
