//! Transparent interception with real iptables rules, inside a network
//! namespace this test creates (root only; it skips, saying why,
//! elsewhere). The namespace's loopback carries the real-looking address
//! 198.18.0.10, where TLS echo upstreams listen on ports 443 and 8443; a
//! client connects there, and the rules `snigress iptables` applies send
//! the connection into the gateway, once with `REDIRECT` and once with
//! `TPROXY`: the SNI decides, the original port is dialled, a name that
//! resolves elsewhere is refused (`destination_mismatch`), a connection
//! made to the listener itself is refused (`destination_loop`), and the
//! gateway's own upstream connections (marked with `upstream_mark`) pass the
//! rules instead of being captured again.
//!
//! Everything but the namespace runs in a child process inside it: this
//! same test binary, run for [`interception_child`].

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use tokio::net::TcpStream;

/// Set in the child's environment: `redirect` or `tproxy`.
const CHILD: &str = "SNIGRESS_INTERCEPTION_CHILD";
/// And the listener's `verify_destination`: `strict` or `off`.
const VERIFY: &str = "SNIGRESS_INTERCEPTION_VERIFY";
/// The interception listener's upstream mark (Istio's UID, by habit).
const MARK: &str = "1337";

fn in_namespace(mode: &str, verify: &str) {
    let why = "set iptables rules in it";
    let ns = match Netns::create(&format!("snigress-{mode}-{verify}"), &["ip", "iptables"], why) {
        Ok(ns) => ns,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    ns.exec(&["ip", "addr", "add", "198.18.0.10/32", "dev", "lo"]).expect("the upstream's address");
    let exe = std::env::current_exe().expect("test binary").display().to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, &exe, "--exact", "interception_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD, mode)
        .env(VERIFY, verify)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("INTERCEPTION OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn iptables_redirect_sends_connections_to_the_gateway_which_dials_their_original_destination() {
    in_namespace("redirect", "strict");
}

#[test]
fn iptables_tproxy_sends_connections_to_the_gateway_which_dials_their_original_destination() {
    in_namespace("tproxy", "strict");
}

/// Rules that forget the gateway's own traffic (they exempt another UID,
/// not its mark): its upstream connection is captured again and comes back
/// to it, which it refuses (`destination_loop`) instead of looping.
#[test]
fn rules_that_capture_the_gateways_own_traffic_cause_one_refusal_not_a_loop() {
    in_namespace("redirect", "loop");
}

/// `verify_destination: off`: the name decides, so a name that resolves
/// elsewhere is dialled where it resolves (here: nowhere reachable).
#[test]
fn with_verify_destination_off_the_name_decides_where_to_dial() {
    in_namespace("redirect", "off");
}

/// The next access record from the gateway's stdout.
fn record(gateway: &Running) -> serde_json::Value {
    json(&gateway.stdout.recv_timeout(PATIENCE).expect("an access record"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside a network namespace by the iptables_* tests"]
async fn interception_child() {
    let Ok(mode) = std::env::var(CHILD) else { return };
    let verify = std::env::var(VERIFY).unwrap_or_else(|_| "strict".into());
    // "loop": strict, with rules that do not exempt the gateway's mark.
    let looping = verify == "loop";
    let verify = if looping { "strict".to_owned() } else { verify };
    let internet = Internet::new();
    let original: SocketAddr = "198.18.0.10:443".parse().unwrap();
    let other_port: SocketAddr = "198.18.0.10:8443".parse().unwrap();
    let _echo = Echo::start_at(internet.server.clone(), original).await;
    let _echo2 = Echo::start_at(internet.server.clone(), other_port).await;
    let dns = Dns::start(ZONE).await;

    // REDIRECT sends locally made connections to 127.0.0.1; TPROXY finds
    // the listener by the packet's own destination, so it listens on all
    // addresses. upstream_port is a port nothing listens on: the original
    // destination's port must be the one dialled.
    let address = if mode == "tproxy" { "0.0.0.0:0" } else { "127.0.0.1:0" };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("intercept.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:
  - name: intercept
    address: {address}
    mode: passthrough
    upstream_port: 9
    original_destination: {mode}
    verify_destination: {verify}
    upstream_mark: {MARK}
policy:
  allow: [\"*.allowed.test\"]
resolver:
  nameservers: [\"{}\"]
  allow_cidrs: [198.18.0.0/15]
",
            dns.addr
        ),
    )
    .expect("write config");
    let gateway = Running::start(&config.display().to_string());
    let listening: SocketAddr =
        json(&gateway.diag("\"listening\""))["fields"]["address"].as_str().expect("address").parse().expect("addr");
    let port = listening.port().to_string();
    let exemption = if looping { ["--uid", "4242"] } else { ["--mark", MARK] };
    let applied = Command::new(env!("CARGO_BIN_EXE_snigress"))
        .args(["iptables", "--mode", &mode, "--port", &port, "--ports", "443,8443"])
        .args(exemption)
        .output()
        .expect("snigress iptables");
    let stderr = String::from_utf8_lossy(&applied.stderr);
    if !applied.status.success()
        && (stderr.contains("No chain/target/match") || stderr.contains("Could not fetch rule set"))
    {
        // The kernel lacks the netfilter module (xt_TPROXY, xt_socket, nat).
        println!("skipped: this kernel cannot apply the {mode} rules: {stderr}");
        println!("INTERCEPTION OK (skipped)");
        return;
    }
    assert!(applied.status.success(), "snigress iptables: {stderr}");

    if looping {
        let tcp = TcpStream::connect(original).await.expect("connect");
        let e = within("looped", inner_connect(tcp, "intercept.allowed.test", internet.roots.clone())).await;
        assert!(e.is_err(), "the client cannot get through a loop");
        // The connection that came back around, and the client's own (in
        // either order: both end at once).
        let (mut inner, mut outer) = (record(&gateway), record(&gateway));
        if inner["reason"] != "destination_loop" {
            std::mem::swap(&mut inner, &mut outer);
        }
        assert_eq!(
            (inner["reason"].as_str(), inner["arrival"].as_str()),
            (Some("destination_loop"), Some("redirect")),
            "{inner}"
        );
        assert_eq!(outer["decision"], "allowed", "{outer}");
        assert_eq!(outer["upstream_addr"], original.to_string(), "{outer}");
        gateway.signal("TERM");
        let extra: Vec<String> = gateway.stdout.iter().collect();
        assert!(extra.is_empty(), "the loop went on: {extra:?}");
        println!("{mode}: a captured upstream connection came back once and was refused");
        println!("INTERCEPTION OK");
        return;
    }

    // Allowed: the client reaches 198.18.0.10 through the gateway, on
    // either captured port.
    for target in [original, other_port] {
        let tcp = TcpStream::connect(target).await.expect("connect");
        let client = tcp.local_addr().expect("client address");
        let tls = within("allowed", inner_connect(tcp, "intercept.allowed.test", internet.roots.clone()))
            .await
            .expect("through the gateway");
        let got = within("echo", exchange(tls, b"intercepted")).await.expect("echo");
        assert_eq!(got, b"interceptedsni=intercept.allowed.test\n");
        let r = record(&gateway);
        assert_eq!(r["decision"], "allowed", "{r}");
        assert_eq!(r["arrival"], mode.as_str(), "{r}");
        assert_eq!(r["original_dst"], target.to_string(), "{r}");
        assert_eq!(r["upstream_addr"], target.to_string(), "the original port is dialled: {r}");
        assert_eq!(r["client_addr"], client.to_string(), "{r}");
        println!("{mode}: {target} allowed, upstream {}", r["upstream_addr"]);
    }

    // A name that resolves elsewhere (SNI spoofing): with strict, refused
    // before dialling; with off, dialled where the name resolves.
    let tcp = TcpStream::connect(original).await.expect("connect");
    let e = within("spoofed", inner_connect(tcp, "elsewhere.allowed.test", internet.roots.clone()))
        .await
        .map(|_| ())
        .expect_err("refused");
    let r = record(&gateway);
    if verify == "strict" {
        assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
        assert_eq!((r["reason"].as_str(), r["side"].as_str()), (Some("destination_mismatch"), Some("policy")), "{r}");
        assert!(r["upstream_addr"].is_null(), "nothing dialled: {r}");
    } else {
        // 198.18.0.20 has no route in the namespace.
        assert_eq!(r["reason"], "connect_failed", "{r}");
        assert_eq!(r["upstream_addr"], "198.18.0.20:443", "{r}");
        println!("{mode}, verify off: elsewhere.allowed.test dialled at {}", r["upstream_addr"]);
    }

    // A name the policy does not allow: the policy still decides.
    let tcp = TcpStream::connect(original).await.expect("connect");
    let e = within("denied", inner_connect(tcp, "intercept.unlisted.test", internet.roots.clone())).await.map(|_| ());
    assert!(e.is_err());
    assert_eq!(record(&gateway)["reason"], "policy_denied");

    // Straight to the listener, not intercepted: a loop, refused.
    let mut direct = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], listening.port()))).await.expect("connect");
    let (got, _) = within("direct", read_all(&mut direct)).await;
    assert!(got.is_empty());
    let r = record(&gateway);
    assert_eq!(r["reason"], "destination_loop", "{r}");

    // The gateway's own upstream connections passed the mark exception.
    let table = if mode == "tproxy" { "mangle" } else { "nat" };
    let rules = run(&["iptables", "-t", table, "-L", "SNIGRESS_CAPTURE", "-v", "-n", "-x"]).expect("list rules");
    let marked = rules
        .lines()
        .find(|l| l.contains("RETURN") && l.contains("mark match 0x539"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no mark rule:\n{rules}"));
    assert!(marked > 0, "the gateway's own connections met the mark exception:\n{rules}");

    // Exactly one record per client connection: no connection came back
    // around through the gateway (its records would follow).
    gateway.signal("TERM");
    let extra: Vec<String> = gateway.stdout.iter().collect();
    assert!(extra.is_empty(), "records of connections no client made: {extra:?}");
    println!("{mode} ({verify}): {marked} packets of the gateway's own passed the mark rule; no loop");
    println!("INTERCEPTION OK");
}
