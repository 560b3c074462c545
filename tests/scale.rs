//! 9 000 concurrent established connections through one gateway process,
//! with the memory each idle one costs, and a clean refusal past the limit.
//!
//! The gateway runs as its own process (the built binary): with a process
//! capped at 20 000 open files and two descriptors per proxied connection,
//! the clients and the upstream live here, in the test process.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 9_000;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A plain TCP echo upstream holding every connection it accepts.
async fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_thousand_idle_connections_through_one_process() {
    // This process holds both ends the gateway does not: the clients and the
    // upstream's accepted sockets.
    if let Err(why) = raise_fd_limit(2 * CONNECTIONS as u64 + 256) {
        println!("skipped: {why}");
        return;
    }
    let dns = Dns::start(ZONE).await;
    let upstream = echo_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("scale.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:
  - {{name: pt, address: 127.0.0.1:0, mode: passthrough, upstream_port: {upstream}}}
policy:
  allow: [\"*.allowed.test\"]
resolver:
  nameservers: [\"{dns}\"]
  allow_cidrs: [127.0.0.0/8]
limits:
  max_connections: {CONNECTIONS}
  max_connections_per_source: {CONNECTIONS}
access_log:
  path: access.log
shutdown:
  grace_period: 0s
  drain_timeout: 1s
",
            dns = dns.addr
        ),
    )
    .expect("write config");
    let gateway = Running::start(&config.display().to_string());
    let listening = json(&gateway.diag("\"listening\""));
    let addr: std::net::SocketAddr = listening["fields"]["address"].as_str().expect("address").parse().expect("addr");
    let pid = gateway.child.id();
    let hello = client_hello("a.allowed.test");

    // Warm up (runtime threads, resolver cache), then measure the baseline.
    let connect_one = |hello: Vec<u8>| async move {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(&hello).await?;
        let mut back = vec![0u8; hello.len()];
        tcp.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(tcp)
    };
    for _ in 0..20 {
        drop(within("warm-up", connect_one(hello.clone())).await.expect("warm-up connection"));
    }
    let (rss_before, fds_before) = (rss_bytes(pid), open_fds(pid));

    let mut held = Vec::with_capacity(CONNECTIONS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while held.len() < CONNECTIONS {
        let batch = (CONNECTIONS - held.len()).min(250);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            set.spawn(connect_one(hello.clone()));
        }
        while let Some(done) = set.join_next().await {
            held.push(done.expect("task").expect("connection established end to end"));
        }
        assert!(tokio::time::Instant::now() < deadline, "only {} connections after 5 minutes", held.len());
    }
    let (rss_after, fds_after) = (rss_bytes(pid), open_fds(pid));
    let per_connection = (rss_after.saturating_sub(rss_before)) / CONNECTIONS as u64;
    println!(
        "{CONNECTIONS} idle spliced connections: gateway RSS {} MiB -> {} MiB, {per_connection} bytes per connection; \
         open fds {fds_before} -> {fds_after}",
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(fds_after - fds_before <= 2 * CONNECTIONS + 16, "no extra descriptors per idle connection");
    assert!(per_connection < 64 * 1024, "{per_connection} bytes per idle connection");

    // Past the limit: refused cleanly, the others keep working.
    let mut extra = within("connect", TcpStream::connect(addr)).await.expect("the kernel accepts");
    let _ = extra.write_all(&hello).await;
    let (got, _) = within("refused", read_all(&mut extra)).await;
    assert!(got.is_empty(), "refused without an answer");
    for tcp in held.iter_mut().step_by(1000) {
        within("still served", async {
            tcp.write_all(b"ping").await.expect("write");
            let mut back = [0u8; 4];
            tcp.read_exact(&mut back).await.expect("echo");
            assert_eq!(&back, b"ping");
        })
        .await;
    }
    drop(held);
    let status = gateway.stop();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(dir.path().join("access.log")).expect("access log");
    assert!(log.lines().any(|l| l.contains("\"reason\":\"connection_limit\"")), "the refusal is logged");
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start at ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_pauses_the_accept_loop_without_spinning() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("fds.yaml");
    std::fs::write(
        &config,
        "listeners:\n  - {name: pt, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  allow: [\"*.allowed.test\"]\nshutdown:\n  grace_period: 0s\n  drain_timeout: 1s\n",
    )
    .expect("write config");
    // The gateway gets 64 descriptors: far fewer than the connections below.
    // (Running kills it on drop, whatever happens to the test.)
    let gateway = Running::with_command(std::process::Command::new("sh").args([
        "-c",
        &format!("ulimit -n 64 && exec '{}' run --config '{}'", env!("CARGO_BIN_EXE_snigress"), config.display()),
    ]));
    let listening = json(&gateway.diag("\"listening\""));
    let addr: std::net::SocketAddr = listening["fields"]["address"].as_str().expect("address").parse().expect("addr");
    let pid = gateway.child.id();

    // 100 clients that connect and say nothing hold the gateway's descriptors.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(within("connect", TcpStream::connect(addr)).await.expect("the kernel accepts"));
    }
    gateway.diag("out of resources");
    let before = cpu_ticks(pid);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = cpu_ticks(pid) - before;
    let elapsed_ticks = started.elapsed().as_secs_f64() * 100.0; // USER_HZ
    println!("gateway CPU while out of descriptors: {ticks} ticks in {elapsed_ticks:.0}");
    assert!((ticks as f64) < elapsed_ticks * 0.25, "the accept loop spins: {ticks} ticks in {elapsed_ticks:.0}");

    // Once descriptors are free again, the gateway serves as before.
    drop(idle);
    let hello = client_hello("a.unlisted.test");
    within("recovered", async {
        loop {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            let _ = tcp.write_all(&hello).await;
            let (got, _) = read_all(&mut tcp).await;
            if got == snigress::front::tls::alert::record(snigress::front::tls::alert::ACCESS_DENIED) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}
