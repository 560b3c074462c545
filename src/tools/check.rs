//! `snigress check`: validate a config, and explain the decision for a name.

use std::fmt::Write;

use crate::arrive::mtls::dev_pki;
use crate::config::{self, Config, ConfigError, MtlsSource};
use crate::identity::Principal;
use crate::name::ServerName;
use crate::policy::{Action, Decision, Match, Pattern, Policy};

/// Loads what `run` would load short of binding: the certificate files (or
/// an existing dev PKI) unless `cert_files` is false (for a config whose
/// files exist only where it is deployed). `text` and `source_name` place
/// certificate errors in the file. Returns a one-paragraph summary.
pub fn validate(config: &Config, text: &str, source_name: &str, cert_files: bool) -> Result<String, ConfigError> {
    let mut notes = String::new();
    if let (Some(settings), true) = (config.outer_settings(), config.needs_mesh_tls()) {
        let dev_pki_pending = match config.mtls.as_ref().map(|m| &m.source) {
            Some(MtlsSource::DevPki(dir)) => !dir.join(dev_pki::GATEWAY_CERT).exists(),
            _ => false,
        };
        if dev_pki_pending {
            notes.push_str("; the dev PKI will be minted on first run");
        } else if !cert_files {
            notes.push_str("; certificate files not read (--skip-cert-files)");
        } else {
            crate::arrive::mtls::server_config(&settings).map_err(|e| config::locate(text, source_name, &e))?;
        }
    }
    let listeners: Vec<String> = config.listeners.iter().map(describe_listener).collect();
    if config.listeners.iter().any(|l| l.protocols.connect) {
        let c = &config.connect;
        let _ = write!(
            notes,
            "; CONNECT to ports {:?}, tunnelled SNI {}, uninspected ports {:?}",
            c.allowed_ports,
            if c.require_sni { "required" } else { "optional" },
            c.plaintext_ports
        );
    }
    let mut summary = format!(
        "config OK: listeners {}; policy: {} allow, {} deny, {} rules{notes}",
        listeners.join(", "),
        config.policy.allow.len(),
        config.policy.deny.len(),
        config.policy.rules.len()
    );
    for w in warnings(config) {
        let _ = write!(summary, "\nwarning: {w}");
    }
    Ok(summary)
}

/// What is valid but probably not meant: allow patterns a deny shadows,
/// patterns listed twice, rules that can never apply.
pub fn warnings(config: &Config) -> Vec<String> {
    let policy = &config.policy;
    let mut out = Vec::new();
    let covers = |deny: &Pattern, allow: &Pattern| match (deny.wildcard_suffix(), allow.wildcard_suffix()) {
        (None, None) => deny == allow,
        (Some(s), None) => allow.to_string().ends_with(&format!(".{s}")),
        (Some(s), Some(t)) => t == s || t.as_str().ends_with(&format!(".{s}")),
        (None, Some(_)) => false,
    };
    let mut lists: Vec<(String, &[Pattern], Vec<&Pattern>)> =
        vec![("policy.allow".into(), &policy.allow, policy.deny.iter().collect())];
    for r in &policy.rules {
        lists.push((format!("rule {:?} allow", r.name), &r.allow, policy.deny.iter().chain(&r.deny).collect()));
    }
    for (key, allow, denies) in &lists {
        for a in allow.iter() {
            if let Some(d) = denies.iter().find(|d| covers(d, a)) {
                out.push(format!("{key}: \"{a}\" can never allow anything: deny \"{d}\" covers it"));
            }
        }
    }
    let mut named: Vec<(String, &[Pattern])> =
        vec![("policy.allow".into(), &policy.allow), ("policy.deny".into(), &policy.deny)];
    for r in &policy.rules {
        named.push((format!("rule {:?} allow", r.name), &r.allow));
        named.push((format!("rule {:?} deny", r.name), &r.deny));
    }
    for (key, list) in &named {
        let mut seen = std::collections::HashSet::new();
        for p in list.iter() {
            if !seen.insert(p) {
                out.push(format!("{key}: \"{p}\" is listed twice"));
            }
        }
    }
    let domains: Vec<&str> = config
        .mtls
        .iter()
        .flat_map(|m| m.trust_domains.iter())
        .chain(config.listeners.iter().filter_map(|l| l.proxy_protocol.as_ref()).flat_map(|p| p.trust_domains.iter()))
        .map(String::as_str)
        .collect();
    for r in &policy.rules {
        for p in &r.from.principals {
            let domain = p.split('/').next().unwrap_or("");
            if !domains.contains(&domain) {
                out.push(format!(
                    "rule {:?}: principal {p:?} is in trust domain {domain:?}, which no caller can have \
                     (accepted: {domains:?}); the rule never applies to it",
                    r.name
                ));
            }
        }
    }
    out
}

/// The route `name` would leave by, and how.
fn describe_route(config: &Config, name: &ServerName, principal: Option<&Principal>, at: At<'_>) -> String {
    use crate::route::{Action, Facts};
    let source = at.source.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let facts = Facts { name, principal, source, listener: at.listener.unwrap_or("") };
    let Some(route) = config.routes.pick(&facts) else {
        return "(none: direct to the name's addresses)".to_owned();
    };
    let how = match &route.action {
        Action::Direct { bind: Some(ip), .. } => format!("direct from {ip}"),
        Action::Direct { .. } => "direct".to_owned(),
        Action::NextHop { hops, proxy_protocol, .. } => {
            let hops: Vec<String> = hops.iter().map(ToString::to_string).collect();
            let header = match proxy_protocol {
                Some(crate::route::ProxyOut::V1) => ", PROXY v1 first",
                Some(crate::route::ProxyOut::V2) => ", PROXY v2 first",
                None => "",
            };
            format!("next hop {}{header}", hops.join(" then "))
        }
        Action::HttpProxy { proxy, authorization, .. } => {
            format!("through the HTTP proxy {proxy}{}", if authorization.is_some() { " with credentials" } else { "" })
        }
    };
    let mark = route.mark.map(|m| format!(", mark {m}")).unwrap_or_default();
    format!("{} ({how}{mark})", route.name)
}

/// A listener as `check` lists it: its fronts and where each goes.
fn describe_listener(l: &config::Listener) -> String {
    let p = l.protocols;
    let mut ports = Vec::new();
    if p.tls {
        ports.push(format!("tls to port {}", l.upstream_port));
    }
    if p.connect {
        ports.push("connect".to_owned());
    }
    if p.http {
        ports.push(format!("http to port {}", l.http_port));
    }
    format!("{} ({} on {}: {})", l.name, l.mode.as_str(), l.address, ports.join(", "))
}

fn describe(m: &Match) -> String {
    let scope = match &m.rule {
        None => format!("policy.{}", m.action.as_str()),
        Some(rule) => format!("rule {rule:?}"),
    };
    format!("{} {:?} ({scope})", m.action.as_str(), &*m.pattern)
}

/// Where a connection comes from, for routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct At<'a> {
    pub source: Option<std::net::IpAddr>,
    pub listener: Option<&'a str>,
}

/// The decision for `sni` (and `principal`), as lines of `key: value`,
/// and the route it would leave by when allowed.
pub fn explain(config: &Config, sni: &str, principal: Option<&Principal>, at: At<'_>) -> String {
    let mut out = String::new();
    let who = principal.map_or("(none)".to_owned(), |p| p.uri().to_owned());
    let name = match ServerName::parse(sni) {
        Ok(n) => n,
        Err(e) => {
            let _ = writeln!(out, "sni: {sni:?}\nprincipal: {who}");
            let _ = writeln!(out, "decision: denied\nreason: invalid_sni\nwhy: {e}; refused before matching");
            return out;
        }
    };
    let _ = writeln!(out, "sni: {name}\nprincipal: {who}");
    let policy = Policy::compile(&config.policy);
    let matches = policy.explain(&name, principal);
    let (decision, matched, why) = match policy.decide(&name, principal) {
        Decision::Allowed(m) => ("allowed", m.label(), format!("{} matches and no deny pattern does", describe(&m))),
        Decision::Denied(m) => {
            let overridden: Vec<String> = matches.iter().filter(|x| x.action == Action::Allow).map(describe).collect();
            let mut why = format!("{} matches; deny wins", describe(&m));
            if !overridden.is_empty() {
                let _ = write!(why, " over {}", overridden.join(", "));
            }
            ("denied", m.label(), why)
        }
        Decision::NotAllowed => {
            ("denied", "(none)".to_owned(), "no allow pattern matches; a name nothing matches is denied".to_owned())
        }
    };
    let reason = if decision == "allowed" { "allowed" } else { "policy_denied" };
    if decision == "denied" && policy.audits(principal) {
        // Audit mode: let through, recorded as what enforcing would do.
        let _ = writeln!(out, "decision: allowed (audit mode)\nreason: allowed\naudit: would_deny");
        let _ =
            writeln!(out, "audit_reason: {reason}\nmatched_rule: {matched}\nwhy: {why}; audit mode lets it through");
        let _ = writeln!(out, "route: {}", describe_route(config, &name, principal, at));
        return out;
    }
    let _ = writeln!(out, "decision: {decision}\nreason: {reason}\nmatched_rule: {matched}\nwhy: {why}");
    if decision == "allowed" {
        let _ = writeln!(out, "route: {}", describe_route(config, &name, principal, at));
    }
    if name.as_str() != sni {
        let _ = writeln!(out, "note: sent as {sni:?}; compared lower-case, trailing dot removed");
    }
    out
}
