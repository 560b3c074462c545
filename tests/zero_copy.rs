//! The zero-copy relay under many concurrent bulk transfers, run as an
//! unprivileged user so that the kernel's per-user pipe quota applies
//! (`/proc/sys/fs/pipe-user-pages-soft`): every transfer byte-exact both
//! ways, no pipe made smaller than asked, no burst pushed to user space.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const STREAMS: usize = 200;
const DOWNLOAD: usize = 2 * 1024 * 1024;
const UPLOAD: usize = 256 * 1024;
/// Unprivileged users (no CAP_SYS_RESOURCE, so the pipe quota applies),
/// one per test: the quota is per user, and the two tests of this file run
/// at the same time, one of them spending its user's whole quota on
/// purpose. Numbers no system account uses, so nothing else shares them.
const BULK_USER: u32 = 64_101;
const BUDGET_USER: u32 = 64_102;

/// An upstream that takes each connection's ClientHello, waits until all
/// `STREAMS` connections are there, then sends `download` while reading the
/// client's upload, and reports what it read.
async fn upstream(hello_len: usize, download: Arc<Vec<u8>>) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let all_here = Arc::new(tokio::sync::Barrier::new(STREAMS));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tx, all_here, download) = (tx.clone(), all_here.clone(), download.clone());
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let mut hello = vec![0u8; hello_len];
                if r.read_exact(&mut hello).await.is_err() {
                    return;
                }
                all_here.wait().await;
                let send = async {
                    let _ = w.write_all(&download).await;
                    let _ = w.shutdown().await;
                };
                let receive = async {
                    let mut got = Vec::with_capacity(UPLOAD);
                    let _ = r.read_to_end(&mut got).await;
                    got
                };
                let ((), got) = tokio::join!(send, receive);
                let _ = tx.send(got);
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_bulk_transfers_stay_zero_copy_within_the_pipe_quota() {
    let root = is_root();
    if let Err(why) = raise_fd_limit(4 * STREAMS as u64 + 256) {
        println!("skipped: {why}");
        return;
    }
    let dns = Dns::start(&[("bulk.allowed.test", &[std::net::Ipv4Addr::LOCALHOST])]).await;
    let hello = client_hello("bulk.allowed.test");
    let download = Arc::new(data(DOWNLOAD, 7));
    let upload = Arc::new(data(UPLOAD, 9));
    let (port, mut uploads) = upstream(hello.len(), download.clone()).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("bulk.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{name: pt, address: 127.0.0.1:0, mode: passthrough, upstream_port: {port}}}\npolicy:\n  allow: [bulk.allowed.test]\nresolver:\n  nameservers: [\"{}\"]\n  allow_cidrs: [127.0.0.0/8]\nmetrics:\n  address: 127.0.0.1:0\n",
            dns.addr
        ),
    )
    .expect("write config");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_snigress"));
    command.args(["run", "--config", &config.display().to_string()]);
    if root {
        // The gateway runs as an unprivileged user, who must read its config.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod config");
        command.uid(BULK_USER).gid(BULK_USER);
    }
    let gateway = Running::with_command(&mut command);
    let metrics: SocketAddr = json(&gateway.diag("serving /metrics"))["fields"]["address"]
        .as_str()
        .expect("metrics address")
        .parse()
        .expect("addr");
    let addr: SocketAddr =
        json(&gateway.diag("\"listening\""))["fields"]["address"].as_str().expect("address").parse().expect("addr");

    let clients: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (hello, upload) = (hello.clone(), upload.clone());
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let (mut r, mut w) = tcp.into_split();
                let send = async {
                    w.write_all(&hello).await.expect("hello");
                    w.write_all(&upload).await.expect("upload");
                    w.shutdown().await.expect("half-close");
                };
                let receive = async {
                    let mut got = Vec::with_capacity(DOWNLOAD);
                    r.read_to_end(&mut got).await.expect("download");
                    got
                };
                tokio::join!(send, receive).1
            })
        })
        .collect();
    within("200 concurrent transfers", async {
        for client in clients {
            let got = client.await.expect("client task");
            assert!(got.len() == DOWNLOAD && got == *download, "download altered: {} bytes", got.len());
        }
        for _ in 0..STREAMS {
            let got = uploads.recv().await.expect("upload");
            assert!(got.len() == UPLOAD && got == *upload, "upload altered: {} bytes", got.len());
        }
    })
    .await;

    let text = scrape(metrics).await;
    let value = |name: &str| sum(&text, name, &[]);
    println!(
        "as {}: pipes now {}, capacity {} bytes",
        if root { "an unprivileged user" } else { "this user" },
        value("snigress_splice_pipes"),
        value("snigress_splice_pipe_capacity_bytes")
    );
    assert_eq!(value("snigress_splice_pipe_resize_failures_total"), 0.0, "a pipe came out smaller than asked");
    assert_eq!(value("snigress_splice_fallbacks_total"), 0.0, "bursts went through user space");
    assert_eq!(value("snigress_bytes_to_client_total"), (STREAMS * DOWNLOAD) as f64);
    assert_eq!(value("snigress_bytes_from_client_total"), (STREAMS * (hello.len() + UPLOAD)) as f64);
}

/// Set in the environment of the child run of [`pipe_budget_child`].
const CHILD: &str = "SNIGRESS_PIPE_BUDGET_CHILD";

/// Runs in a child process as an unprivileged user (see the test below): takes pipes
/// as 700 busy directions would, then exhausts what is left of the quota
/// with pipes of its own (as other processes of the same user would) and
/// takes one more. Prints what it saw as JSON.
#[test]
#[ignore = "run in a child process by the_pipe_budget_stays_inside_the_users_quota_and_counts_a_shrunk_pipe"]
fn pipe_budget_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    use snigress::relay::splice::{stats, testing};
    let sizes = testing::take_at_once(700);
    let after_budget = stats();
    // Other pipes of the same user take the whole quota: the kernel makes
    // new pipes small once it is spent.
    let mut others = Vec::new();
    while let Ok((r, w)) = nix::unistd::pipe() {
        let size = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
        others.push((r, w));
        if size < snigress::relay::splice::PIPE_SIZE_DEFAULT as i32 || others.len() > 5_000 {
            break;
        }
    }
    let late = testing::take_at_once(1);
    let report = serde_json::json!({
        "quota": testing::quota(),
        "sizes": sizes,
        "resize_failures_within_budget": after_budget.resize_failures,
        "others": others.len(),
        "late": late,
        "resize_failures_after": stats().resize_failures,
    });
    println!("REPORT {report}");
}

#[test]
fn the_pipe_budget_stays_inside_the_users_quota_and_counts_a_shrunk_pipe() {
    if !is_root() {
        println!("skipped: needs root to run a child as an unprivileged user, for whom the pipe quota applies");
        return;
    }
    if let Err(why) = raise_fd_limit(20_000) {
        println!("skipped: {why}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "pipe_budget_child", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .uid(BUDGET_USER)
        .gid(BUDGET_USER)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .find_map(|l| l.split_once("REPORT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no report: {stdout}"));
    let report = json(report);
    let quota = report["quota"].as_u64().expect("a quota is set");
    let sizes: Vec<u64> =
        report["sizes"].as_array().expect("sizes").iter().map(|v| v.as_u64().expect("size")).collect();
    use snigress::relay::splice::{PIPE_SIZE_DEFAULT, PIPE_SIZE_LARGE, PIPE_SIZE_LARGEST};
    let (largest, large, default) = (PIPE_SIZE_LARGEST as u64, PIPE_SIZE_LARGE as u64, PIPE_SIZE_DEFAULT as u64);
    let total: u64 = sizes.iter().sum();
    let given = sizes.iter().filter(|s| **s > 0).count();
    println!("quota {quota} bytes: {given} pipes, {total} bytes; others {}, late {}", report["others"], report["late"]);
    // The largest pipes up to 3/8 of the quota, large ones up to 9/16,
    // default ones up to 3/4, then none: never past what the kernel allows.
    assert!(sizes.iter().all(|s| [0, default, large, largest].contains(s)), "{sizes:?}");
    let count = |size: u64| sizes.iter().filter(|s| **s == size).count() as u64;
    assert_eq!(count(largest), quota / 8 * 3 / largest);
    assert_eq!(count(large), (quota / 16 * 9 - count(largest) * largest) / large);
    assert!(total <= quota / 4 * 3, "{total} > 3/4 of {quota}");
    assert!(
        given >= STREAMS + STREAMS / 4,
        "{given} pipes: 200 blocked downloads and 50 blocked uploads at once must fit"
    );
    assert_eq!(report["resize_failures_within_budget"], 0, "{report}");
    // With the quota spent by others, a new pipe comes out small: counted.
    assert!(report["late"][0].as_u64().is_some_and(|s| s < default), "{report}");
    assert!(report["resize_failures_after"].as_u64().is_some_and(|n| n >= 1), "{report}");
}
