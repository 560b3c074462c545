//! `snigress iptables`: the interception rules an init container (or a
//! node's boot script) runs so that applications' TCP connections reach a
//! listener with `original_destination`, as `istio-iptables` does for
//! Istio's sidecar.
//!
//! - `redirect`: nat `OUTPUT` (connections made on this host or in this
//!   pod) and, with `--interface`, nat `PREROUTING` (connections routed
//!   through it) are `REDIRECT`ed to the listener's port.
//! - `tproxy`: mangle `PREROUTING` sends connections routed through this
//!   host to the listener with `TPROXY`, marked `--tproxy-mark`; an
//!   `ip rule` sends marked packets to a routing table whose only route is
//!   `local 0.0.0.0/0 dev lo`, so they are delivered here. Packets of
//!   established connections find their socket through the `socket` match.
//!
//! Either way the gateway's own upstream connections must pass untouched:
//! every rule set starts with `RETURN` for the gateway's UID (`--uid`, the
//! owner exception Istio makes for UID 1337; redirect only, as the owner
//! match exists only in OUTPUT) and/or its `upstream_mark` (`--mark`;
//! required for tproxy), and at least one of them is required. Loopback destinations
//! and `--exclude` networks are never captured. IPv4 (`iptables`), and with
//! `--ipv6` the same for IPv6 (`ip6tables`, `ip -6`).

use std::fmt::Write as _;

/// What to capture and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub mode: Mode,
    /// The listener's port.
    pub port: u16,
    /// Destination ports to capture; empty: every TCP port.
    pub ports: Vec<u16>,
    /// The gateway's UIDs, left alone.
    pub uids: Vec<u32>,
    /// The gateway's upstream_mark, left alone.
    pub mark: Option<u32>,
    /// Networks never captured (besides loopback), of either family.
    pub exclude: Vec<ipnet::IpNet>,
    /// Incoming interfaces whose routed connections are captured (redirect:
    /// optional; tproxy: every interface when empty).
    pub interfaces: Vec<String>,
    /// tproxy: the mark TPROXY sets and the routing table it selects.
    pub tproxy_mark: u32,
    pub table: u32,
    /// The same rules for IPv6 too (`ip6tables`, `ip -6`).
    pub ipv6: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Redirect,
    Tproxy,
}

/// Chain names, all ours (`SNIGRESS_*`), so removal is one flush.
const CAPTURE: &str = "SNIGRESS_CAPTURE";
const DIVERT: &str = "SNIGRESS_DIVERT";

impl Spec {
    /// The commands, in order, each as its arguments; an error when the
    /// spec would capture the gateway's own traffic.
    pub fn commands(&self) -> Result<Vec<Vec<String>>, String> {
        if self.uids.is_empty() && self.mark.is_none() {
            return Err("give --uid (the gateway's user) or --mark (its listener's upstream_mark), or both: \
                        without them the gateway's own upstream connections would be captured again"
                .into());
        }
        if self.port == 0 {
            return Err("--port must be the listener's port (1-65535)".into());
        }
        if self.mode == Mode::Tproxy && self.mark.is_none() {
            return Err("tproxy rules sit in PREROUTING, where the owner match (--uid) cannot apply: \
                        give --mark (the listener's upstream_mark)"
                .into());
        }
        let mut out = self.family(false);
        if self.ipv6 {
            out.extend(self.family(true));
        } else if let Some(net) = self.exclude.iter().find(|n| matches!(n, ipnet::IpNet::V6(_))) {
            return Err(format!("--exclude {net} is IPv6: add --ipv6 to write IPv6 rules"));
        }
        Ok(out)
    }

    /// The rules of one address family.
    fn family(&self, v6: bool) -> Vec<Vec<String>> {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut rule = |table: &str, args: &[&str]| {
            let mut cmd = vec![tool.to_owned(), "-t".to_owned(), table.to_owned()];
            cmd.extend(args.iter().map(|a| (*a).to_owned()));
            out.push(cmd);
        };
        let table = match self.mode {
            Mode::Redirect => "nat",
            Mode::Tproxy => "mangle",
        };
        rule(table, &["-N", CAPTURE]);
        // The gateway's own traffic first, then what is never captured.
        // (The owner match exists only for locally made packets: OUTPUT.)
        for uid in self.uids.iter().filter(|_| self.mode == Mode::Redirect) {
            rule(table, &["-A", CAPTURE, "-m", "owner", "--uid-owner", &uid.to_string(), "-j", "RETURN"]);
        }
        if let Some(mark) = self.mark {
            rule(table, &["-A", CAPTURE, "-m", "mark", "--mark", &mark.to_string(), "-j", "RETURN"]);
        }
        rule(table, &["-A", CAPTURE, "-d", if v6 { "::1/128" } else { "127.0.0.0/8" }, "-j", "RETURN"]);
        for net in self.exclude.iter().filter(|n| matches!(n, ipnet::IpNet::V6(_)) == v6) {
            rule(table, &["-A", CAPTURE, "-d", &net.to_string(), "-j", "RETURN"]);
        }
        let target: Vec<String> = match self.mode {
            Mode::Redirect => {
                ["-j", "REDIRECT", "--to-ports"].iter().map(|s| s.to_string()).chain([self.port.to_string()]).collect()
            }
            Mode::Tproxy => {
                let mark = format!("{:#x}/{:#x}", self.tproxy_mark, self.tproxy_mark);
                ["-j", "TPROXY", "--on-port"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([self.port.to_string(), "--tproxy-mark".into(), mark])
                    .collect()
            }
        };
        let target: Vec<&str> = target.iter().map(String::as_str).collect();
        if self.ports.is_empty() {
            rule(table, &[&["-A", CAPTURE, "-p", "tcp"][..], &target].concat());
        } else {
            for port in &self.ports {
                let port = port.to_string();
                rule(table, &[&["-A", CAPTURE, "-p", "tcp", "--dport", &port][..], &target].concat());
            }
        }
        match self.mode {
            Mode::Redirect => {
                rule("nat", &["-A", "OUTPUT", "-p", "tcp", "-j", CAPTURE]);
                for interface in &self.interfaces {
                    rule("nat", &["-A", "PREROUTING", "-i", interface, "-p", "tcp", "-j", CAPTURE]);
                }
            }
            Mode::Tproxy => {
                let mark = format!("{:#x}", self.tproxy_mark);
                // Established connections: to their (transparent) socket.
                rule("mangle", &["-N", DIVERT]);
                rule("mangle", &["-A", DIVERT, "-j", "MARK", "--set-mark", &mark]);
                rule("mangle", &["-A", DIVERT, "-j", "ACCEPT"]);
                rule("mangle", &["-A", "PREROUTING", "-p", "tcp", "-m", "socket", "--transparent", "-j", DIVERT]);
                if self.interfaces.is_empty() {
                    rule("mangle", &["-A", "PREROUTING", "-p", "tcp", "-j", CAPTURE]);
                }
                for interface in &self.interfaces {
                    rule("mangle", &["-A", "PREROUTING", "-i", interface, "-p", "tcp", "-j", CAPTURE]);
                }
                let table = self.table.to_string();
                let ip = |args: &[&str]| {
                    let family: &[&str] = if v6 { &["ip", "-6"] } else { &["ip"] };
                    family.iter().chain(args).map(|w| (*w).to_owned()).collect::<Vec<_>>()
                };
                let everything = if v6 { "::/0" } else { "0.0.0.0/0" };
                out.push(ip(&["rule", "add", "fwmark", &format!("{mark}/{mark}"), "lookup", &table]));
                out.push(ip(&["route", "add", "local", everything, "dev", "lo", "table", &table]));
            }
        }
        out
    }
}

/// The commands as a shell script.
pub fn script(commands: &[Vec<String>]) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by snigress iptables.\nset -e\n");
    for cmd in commands {
        let _ = writeln!(s, "{}", cmd.join(" "));
    }
    s
}

/// Runs each command; stops at the first that fails, saying which.
pub fn apply(commands: &[Vec<String>]) -> Result<(), String> {
    for cmd in commands {
        let out = std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .output()
            .map_err(|e| format!("{}: {e} (is it installed?)", cmd[0]))?;
        if !out.status.success() {
            return Err(format!("{}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: Mode) -> Spec {
        Spec {
            mode,
            port: 15001,
            ports: vec![443],
            uids: vec![1337],
            mark: Some(1337),
            exclude: vec!["10.96.0.0/12".parse().unwrap()],
            interfaces: vec![],
            tproxy_mark: 1,
            table: 133,
            ipv6: false,
        }
    }

    #[test]
    fn redirect_rules_let_the_gateway_pass_before_capturing() {
        let text = script(&spec(Mode::Redirect).commands().unwrap());
        let expected = "\
iptables -t nat -N SNIGRESS_CAPTURE
iptables -t nat -A SNIGRESS_CAPTURE -m owner --uid-owner 1337 -j RETURN
iptables -t nat -A SNIGRESS_CAPTURE -m mark --mark 1337 -j RETURN
iptables -t nat -A SNIGRESS_CAPTURE -d 127.0.0.0/8 -j RETURN
iptables -t nat -A SNIGRESS_CAPTURE -d 10.96.0.0/12 -j RETURN
iptables -t nat -A SNIGRESS_CAPTURE -p tcp --dport 443 -j REDIRECT --to-ports 15001
iptables -t nat -A OUTPUT -p tcp -j SNIGRESS_CAPTURE
";
        assert!(text.ends_with(expected), "{text}");
    }

    #[test]
    fn tproxy_rules_mark_route_and_divert() {
        let mut s = spec(Mode::Tproxy);
        s.ports.clear();
        s.interfaces = vec!["eth0".into()];
        let text = script(&s.commands().unwrap());
        for line in [
            "iptables -t mangle -A SNIGRESS_CAPTURE -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x1/0x1",
            "iptables -t mangle -A PREROUTING -p tcp -m socket --transparent -j SNIGRESS_DIVERT",
            "iptables -t mangle -A PREROUTING -i eth0 -p tcp -j SNIGRESS_CAPTURE",
            "ip rule add fwmark 0x1/0x1 lookup 133",
            "ip route add local 0.0.0.0/0 dev lo table 133",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }

    #[test]
    fn ipv6_rules_are_the_same_for_ip6tables() {
        let mut s = spec(Mode::Tproxy);
        s.ipv6 = true;
        s.exclude.push("fd00:10:96::/112".parse().unwrap());
        let text = script(&s.commands().unwrap());
        for line in [
            "iptables -t mangle -A SNIGRESS_CAPTURE -d 10.96.0.0/12 -j RETURN",
            "ip6tables -t mangle -A SNIGRESS_CAPTURE -d ::1/128 -j RETURN",
            "ip6tables -t mangle -A SNIGRESS_CAPTURE -d fd00:10:96::/112 -j RETURN",
            "ip6tables -t mangle -A SNIGRESS_CAPTURE -m mark --mark 1337 -j RETURN",
            "ip -6 rule add fwmark 0x1/0x1 lookup 133",
            "ip -6 route add local ::/0 dev lo table 133",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(!text.contains("ip6tables -t mangle -A SNIGRESS_CAPTURE -d 10.96.0.0/12"), "{text}");
        s.ipv6 = false;
        assert!(s.commands().unwrap_err().contains("--ipv6"));
    }

    #[test]
    fn rules_that_would_capture_the_gateway_itself_are_refused() {
        let mut s = spec(Mode::Redirect);
        s.uids.clear();
        s.mark = None;
        assert!(s.commands().unwrap_err().contains("--uid"));
        // TPROXY works in PREROUTING, where only the mark can exempt.
        let mut s = spec(Mode::Tproxy);
        assert!(!script(&s.commands().unwrap()).contains("--uid-owner"));
        s.mark = None;
        assert!(s.commands().unwrap_err().contains("--mark"));
    }
}
