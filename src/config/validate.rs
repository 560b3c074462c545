//! From the raw schema to the validated config, one section at a time; each
//! error names the key and points at the value.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::error::{ConfigError, Pos};
use super::schema::*;
use super::*;
use crate::arrive::mtls::MaterialPaths;
use crate::identity::{DEFAULT_TRUST_DOMAIN, Principal};
use crate::observe::metrics::Caps;
use crate::policy::{Pattern, PolicySpec, RuleSpec, Selector};
use crate::resolve::{ResolverSettings, Vetting};

/// The file being validated: for error positions and relative paths.
pub(super) struct Ctx<'a> {
    pub source_name: &'a str,
    pub text: &'a str,
    pub base: &'a Path,
}

impl Ctx<'_> {
    fn error(&self, pos: Option<Pos>, message: String) -> ConfigError {
        ConfigError::at(self.source_name, self.text, pos, message)
    }

    fn at<T>(&self, spanned: &Spanned<T>, message: String) -> ConfigError {
        self.error(Pos::of(spanned), message)
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_owned() } else { self.base.join(p) }
    }
}

pub(super) fn validate(raw: RawConfig, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
    let listeners = listeners(&raw, ctx)?;
    let mtls = raw.mtls.as_ref().map(|m| mtls(m, ctx)).transpose()?;
    let refuse_ech = raw.policy.refuse_ech;
    let policy = policy(raw.policy, ctx)?;
    let timeouts = timeouts(&raw.timeouts, ctx)?;
    let resolver = resolver(raw.resolver, timeouts.dns, ctx)?;
    let limits = limits(&raw.limits, ctx)?;
    let metrics = metrics(&raw.metrics, &listeners, ctx)?;
    let connect = connect(raw.connect.as_ref(), ctx)?;
    let routes = routes(raw.routes, &listeners, ctx)?;
    let shutdown =
        Shutdown { grace_period: raw.shutdown.grace_period.value.0, drain_timeout: raw.shutdown.drain_timeout.value.0 };
    let access_log = match raw.access_log.path.as_deref() {
        None | Some("-") => None,
        Some(p) => Some(ctx.path(p)),
    };
    Ok(Config {
        listeners,
        mtls,
        policy,
        resolver,
        timeouts,
        limits,
        access_log,
        metrics,
        shutdown,
        refuse_ech,
        connect,
        routes,
    })
}

fn listeners(raw: &RawConfig, ctx: &Ctx<'_>) -> Result<Vec<Listener>, ConfigError> {
    if raw.listeners.value.is_empty() {
        return Err(ctx.at(&raw.listeners, "listeners: at least one listener is needed".into()));
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, l) in raw.listeners.value.iter().enumerate() {
        let l = &l.value;
        let name = l.name.value.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(ctx.at(
                &l.name,
                format!("listeners[{i}].name: {:?} must be non-empty letters, digits, '-', '_' or '.'", l.name.value),
            ));
        }
        if !names.insert(name.to_owned()) {
            return Err(ctx.at(&l.name, format!("listeners[{i}].name: {name:?} is used by another listener")));
        }
        let address = l.address.value.0.0;
        // Port 0 asks the kernel for a free port: never a clash.
        if address.port() != 0 && !addresses.insert(address) {
            return Err(ctx.at(&l.address, format!("listeners[{i}].address: {address} is used by another listener")));
        }
        let key = |k: &str| format!("listeners[{i}].{k}");
        let protocols = match &l.protocol {
            Some(p) => protocols(p, &key("protocol"), ctx)?,
            None => crate::front::Protocols::TLS,
        };
        for port in [&l.upstream_port, &l.http_upstream_port].into_iter().flatten() {
            if port.value == 0 {
                return Err(ctx.at(port, format!("listeners[{i}]: an upstream port must be 1-65535")));
            }
        }
        if let Some(port) = &l.http_upstream_port
            && !protocols.http
        {
            return Err(ctx.at(
                port,
                format!("{}: the listener has no plain-HTTP front (protocol: http or auto)", key("http_upstream_port")),
            ));
        }
        // A listener serving plain HTTP only sends it to upstream_port
        // (80 unless given); beside a TLS front, plain HTTP has a port of
        // its own.
        let http_only = protocols.http && !protocols.tls;
        let upstream_port = l
            .upstream_port
            .as_ref()
            .map_or(if http_only { defaults::HTTP_PORT } else { defaults::UPSTREAM_PORT }, |p| p.value);
        let http_port = match &l.http_upstream_port {
            Some(p) => p.value,
            None if http_only => upstream_port,
            None => defaults::HTTP_PORT,
        };
        if l.mode.value == Mode::Mtls && raw.mtls.is_none() {
            return Err(ctx.at(
                &l.mode,
                format!("listeners[{i}].mode: listener {name:?} is mtls but the config has no mtls: section"),
            ));
        }
        let proxy_protocol = match &l.proxy_protocol {
            Some(p) => Some(proxy_protocol(p, raw, l.mode.value, &key("proxy_protocol"), ctx)?),
            None => None,
        };
        let original_destination = l.original_destination.as_ref().map(|o| o.value);
        if let Some(o) = &l.original_destination {
            if proxy_protocol.is_some() {
                return Err(ctx.at(
                    o,
                    format!("{}: a listener takes either a PROXY header or an intercepted connection's original destination, not both", key("original_destination")),
                ));
            }
            if protocols.connect {
                return Err(ctx.at(
                    o,
                    format!(
                        "{}: an intercepted connection was not sent to a proxy: CONNECT does not apply (protocol: tls or http)",
                        key("original_destination")
                    ),
                ));
            }
            if l.mode.value != Mode::Passthrough {
                return Err(ctx.at(
                    o,
                    format!(
                        "{}: intercepted connections carry the application's own TLS: use mode: passthrough",
                        key("original_destination")
                    ),
                ));
            }
        }
        // Strict by default where the destination is an address the client
        // chose; a PROXY header's destination may be a VIP (Istio ambient's
        // ServiceEntry address), which no name resolves to.
        let verify_destination = match &l.verify_destination {
            Some(v)
                if v.value == VerifyDestination::Strict
                    && original_destination.is_none()
                    && proxy_protocol.is_none() =>
            {
                return Err(ctx.at(
                    v,
                    format!(
                        "{}: strict needs a destination to verify: original_destination or proxy_protocol",
                        key("verify_destination")
                    ),
                ));
            }
            Some(v) => v.value,
            None if original_destination.is_some() => VerifyDestination::Strict,
            None => VerifyDestination::Off,
        };
        listeners.push(Listener {
            name: name.to_owned(),
            address,
            mode: l.mode.value,
            protocols,
            upstream_port,
            http_port,
            proxy_protocol,
            original_destination,
            verify_destination,
            upstream_mark: match &l.upstream_mark {
                Some(m) if m.value == 0 => {
                    return Err(ctx.at(
                        m,
                        format!("{}: 0 means no mark; use 1-4294967295 or leave it out", key("upstream_mark")),
                    ));
                }
                m => m.as_ref().map(|m| m.value),
            },
        });
    }
    Ok(listeners)
}

/// `protocol:`: one front, `auto` (all three), or a list.
fn protocols(p: &Spanned<OneOrMany>, key: &str, ctx: &Ctx<'_>) -> Result<crate::front::Protocols, ConfigError> {
    let mut out = crate::front::Protocols { tls: false, connect: false, http: false };
    if p.value.0.is_empty() {
        return Err(ctx.at(p, format!("{key}: name at least one of tls, connect, http")));
    }
    let single = p.value.0.len() == 1;
    for name in &p.value.0 {
        let seen = match name.as_str() {
            "tls" => std::mem::replace(&mut out.tls, true),
            "connect" => std::mem::replace(&mut out.connect, true),
            "http" => std::mem::replace(&mut out.http, true),
            "auto" if single => {
                out = crate::front::Protocols { tls: true, connect: true, http: true };
                false
            }
            "auto" => return Err(ctx.at(p, format!("{key}: auto stands alone (it means [tls, connect, http])"))),
            other => {
                return Err(ctx.at(
                    p,
                    format!(
                        "{key}: unknown protocol {:?}; use tls, connect, http or auto",
                        super::error::clip_lines(other)
                    ),
                ));
            }
        };
        if seen {
            return Err(ctx.at(p, format!("{key}: {name} is named twice")));
        }
    }
    Ok(out)
}

/// `connect:`: the ports a CONNECT may name and how tunnels are checked.
fn connect(raw: Option<&Spanned<RawConnect>>, ctx: &Ctx<'_>) -> Result<ConnectSettings, ConfigError> {
    let Some(c) = raw else { return Ok(ConnectSettings::default()) };
    let c = &c.value;
    if c.allowed_ports.value.is_empty() {
        return Err(
            ctx.at(&c.allowed_ports, "connect.allowed_ports: at least one port is needed (443 is the default)".into())
        );
    }
    if c.allowed_ports.value.contains(&0) || c.plaintext_ports.value.contains(&0) {
        return Err(ctx.at(&c.allowed_ports, "connect: ports must be 1-65535".into()));
    }
    if let Some(p) = c.plaintext_ports.value.iter().find(|p| !c.allowed_ports.value.contains(p)) {
        return Err(ctx.at(&c.plaintext_ports, format!("connect.plaintext_ports: {p} is not in connect.allowed_ports")));
    }
    Ok(ConnectSettings {
        allowed_ports: c.allowed_ports.value.clone(),
        require_sni: c.require_sni,
        allow_ip_literals: c.allow_ip_literals,
        plaintext_ports: c.plaintext_ports.value.clone(),
    })
}

fn proxy_protocol(
    p: &Spanned<RawProxyProtocol>,
    raw: &RawConfig,
    mode: Mode,
    key: &str,
    ctx: &Ctx<'_>,
) -> Result<ProxyProtocol, ConfigError> {
    use crate::arrive::proxy::Versions;
    let versions = match &p.value.versions {
        None => Versions::ALL,
        Some(list) if list.value.is_empty() => {
            return Err(ctx.at(list, format!("{key}.versions: name at least one of v1, v2")));
        }
        Some(list) => {
            Versions { v1: list.value.contains(&ProxyVersion::V1), v2: list.value.contains(&ProxyVersion::V2) }
        }
    };
    let trusted_sources = match &p.value.trusted_sources {
        None => {
            return Err(ctx.at(
                p,
                format!("{key}.trusted_sources: missing; the header is honoured only from these networks (e.g. [127.0.0.1/32] for a ztunnel in the same pod)"),
            ));
        }
        Some(list) if list.value.is_empty() => {
            return Err(ctx.at(list, format!("{key}.trusted_sources: at least one network is needed")));
        }
        Some(list) => list.value.iter().map(|c| c.0.0).collect(),
    };
    let identity = p.value.identity;
    if identity == ProxyIdentity::IstioTlv && mode == Mode::Mtls {
        return Err(ctx.at(p, format!("{key}.identity: on an mtls listener the caller's identity is its client certificate; use identity: none")));
    }
    if identity == ProxyIdentity::IstioTlv && !versions.v2 {
        return Err(ctx.at(p, format!("{key}.identity: istio_tlv is carried by PROXY v2 only; add v2 to versions")));
    }
    // Absent: the mesh's, as for mTLS identities.
    let trust_domains = match &p.value.trust_domains {
        Some(list) => trust_domains(Some(list), &format!("{key}.trust_domains"), ctx)?,
        None => {
            trust_domains(raw.mtls.as_ref().and_then(|m| m.value.trust_domains.as_ref()), "mtls.trust_domains", ctx)?
        }
    };
    Ok(ProxyProtocol { versions, trusted_sources, identity, trust_domains })
}

/// A list of trust domains (`key` names it in errors); absent: Istio's
/// default.
fn trust_domains(
    list: Option<&Spanned<Vec<Spanned<String>>>>,
    key: &str,
    ctx: &Ctx<'_>,
) -> Result<Vec<String>, ConfigError> {
    let Some(list) = list else { return Ok(vec![DEFAULT_TRUST_DOMAIN.to_owned()]) };
    if list.value.is_empty() {
        return Err(ctx.at(list, format!("{key}: at least one trust domain is needed")));
    }
    let mut out = Vec::new();
    for td in &list.value {
        let ok = Principal::parse(&format!("spiffe://{}", td.value))
            .is_ok_and(|p| p.trust_domain() == td.value && p.namespace().is_none() && !td.value.contains('/'));
        if !ok {
            return Err(ctx.at(
                td,
                format!(
                    "{key}: {:?} is not a valid trust domain (lower-case letters, digits, '.', '-', '_')",
                    super::error::clip_lines(&td.value)
                ),
            ));
        }
        out.push(td.value.clone());
    }
    Ok(out)
}

fn mtls(m: &Spanned<RawMtls>, ctx: &Ctx<'_>) -> Result<Mtls, ConfigError> {
    let raw = &m.value;
    let source = match (&raw.dev_pki, &raw.cert, &raw.key, &raw.client_ca) {
        (Some(dir), None, None, None) => MtlsSource::DevPki(ctx.path(&dir.value)),
        (Some(dir), ..) => {
            return Err(ctx.at(dir, "mtls.dev_pki: use either dev_pki or cert, key and client_ca, not both".into()));
        }
        (None, Some(cert), Some(key), Some(ca)) => MtlsSource::Files(MaterialPaths {
            cert: ctx.path(&cert.value),
            key: ctx.path(&key.value),
            client_ca: ctx.path(&ca.value),
        }),
        (None, cert, key, ca) => {
            let missing: Vec<&str> = [("cert", cert), ("key", key), ("client_ca", ca)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
            return Err(
                ctx.at(m, format!("mtls: missing {} (or set dev_pki: DIR for a development PKI)", missing.join(", ")))
            );
        }
    };
    let trust_domains = trust_domains(raw.trust_domains.as_ref(), "mtls.trust_domains", ctx)?;
    let mut alpn = Vec::new();
    for p in &raw.alpn {
        if p.value == "istio-peer-exchange" {
            return Err(ctx.at(
                p,
                "mtls.alpn: istio-peer-exchange must never be negotiated (the sidecar would write a metadata preamble into the stream); use [] or [istio]".into(),
            ));
        }
        if p.value.is_empty() || p.value.len() > 255 {
            return Err(ctx.at(p, "mtls.alpn: each protocol must be 1-255 bytes".into()));
        }
        alpn.push(p.value.clone());
    }
    Ok(Mtls {
        source,
        trust_domains,
        alpn,
        min_version: raw.min_version.as_ref().map(|v| v.value.0).unwrap_or_default(),
    })
}

fn policy(raw: RawPolicy, ctx: &Ctx<'_>) -> Result<PolicySpec, ConfigError> {
    let mut rules = Vec::new();
    let mut rule_names = HashSet::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let pos = Pos::of(&r);
        let r = r.value;
        let name = match &r.name {
            Some(n) => {
                if !is_label_name(&n.value) {
                    return Err(ctx.at(
                        n,
                        format!("policy.rules[{i}].name: {:?} must be letters, digits, '-', '_', '.' or '/'", n.value),
                    ));
                }
                n.value.clone()
            }
            None => format!("rules[{i}]"),
        };
        if !rule_names.insert(name.clone()) {
            return Err(ctx.error(pos, format!("policy.rules[{i}]: the name {name:?} is used by another rule")));
        }
        let from = selector(r.principals, &r.namespaces, &r.service_accounts, &format!("policy.rules[{i}]"), ctx)?;
        if from.is_empty() {
            return Err(ctx.error(
                pos,
                format!("policy.rules[{i}] ({name}): select callers with principals, namespaces or service_accounts"),
            ));
        }
        if r.allow.is_empty() && r.deny.is_empty() {
            return Err(ctx.error(pos, format!("policy.rules[{i}] ({name}): the rule has no allow or deny patterns")));
        }
        rules.push(RuleSpec {
            name,
            from,
            allow: allow_list(r.allow, &format!("policy.rules[{i}].allow"), ctx)?,
            deny: r.deny.into_iter().map(|p| p.0).collect(),
            mode: r.mode,
        });
    }
    Ok(PolicySpec {
        allow: allow_list(raw.allow, "policy.allow", ctx)?,
        deny: raw.deny.into_iter().map(|p| p.0).collect(),
        rules,
        mode: raw.mode,
    })
}

/// A rule's or a route's name: it appears in logs and metric labels.
fn is_label_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// A Kubernetes object name (RFC 1123 label: lower-case alphanumerics and '-').
fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn resolver(r: RawResolver, timeout: std::time::Duration, ctx: &Ctx<'_>) -> Result<ResolverSettings, ConfigError> {
    if r.min_ttl.value.0 > r.max_ttl.value.0 {
        return Err(ctx.at(&r.min_ttl, "resolver.min_ttl: must not be greater than resolver.max_ttl".into()));
    }
    let nameservers = match r.nameservers {
        Some(list) if list.value.is_empty() => {
            return Err(ctx.at(
                &list,
                "resolver.nameservers: give at least one, or leave the key out to use the system configuration".into(),
            ));
        }
        Some(list) => Some(list.value.into_iter().map(|n| n.0.0).collect()),
        None => None,
    };
    Ok(ResolverSettings {
        nameservers,
        ip_family: r.ip_family,
        min_ttl: r.min_ttl.value.0,
        max_ttl: r.max_ttl.value.0,
        cache_size: r.cache_size,
        timeout,
        vetting: Vetting {
            allow_cidrs: r.allow_cidrs.into_iter().map(|c| c.0.0).collect(),
            deny_cidrs: r.deny_cidrs.into_iter().map(|c| c.0.0).collect(),
        },
    })
}

fn timeouts(t: &RawTimeouts, ctx: &Ctx<'_>) -> Result<Timeouts, ConfigError> {
    for (key, d) in [
        ("first_byte", &t.first_byte),
        ("handshake", &t.handshake),
        ("client_hello", &t.client_hello),
        ("dns", &t.dns),
        ("connect", &t.connect),
        ("connect_total", &t.connect_total),
        ("idle", &t.idle),
        ("half_close", &t.half_close),
    ] {
        if d.value.0.is_zero() {
            return Err(ctx.at(d, format!("timeouts.{key}: must be greater than zero")));
        }
    }
    let max_lifetime = match &t.max_lifetime {
        None => None,
        Some(d) if d.value.0.is_zero() => {
            return Err(
                ctx.at(d, "timeouts.max_lifetime: must be greater than zero (leave it out for no limit)".into())
            );
        }
        Some(d) => Some(d.value.0),
    };
    Ok(Timeouts {
        first_byte: t.first_byte.value.0,
        handshake: t.handshake.value.0,
        client_hello: t.client_hello.value.0,
        dns: t.dns.value.0,
        connect: t.connect.value.0,
        connect_total: t.connect_total.value.0,
        idle: t.idle.value.0,
        half_close: t.half_close.value.0,
        max_lifetime,
    })
}

fn limits(l: &RawLimits, ctx: &Ctx<'_>) -> Result<Limits, ConfigError> {
    for (key, v) in
        [("max_connections", &l.max_connections), ("max_connections_per_source", &l.max_connections_per_source)]
    {
        if v.value == 0 {
            return Err(ctx.at(v, format!("limits.{key}: must be at least 1")));
        }
    }
    let hello = l.client_hello_bytes.value;
    if !(defaults::CLIENT_HELLO_BYTES_MIN..=defaults::CLIENT_HELLO_BYTES_MAX).contains(&hello) {
        return Err(ctx.at(
            &l.client_hello_bytes,
            format!(
                "limits.client_hello_bytes: must be between {} and {}",
                defaults::CLIENT_HELLO_BYTES_MIN,
                defaults::CLIENT_HELLO_BYTES_MAX
            ),
        ));
    }
    let max_pending_connections = match &l.max_pending_connections {
        None => {
            (l.max_connections.value / defaults::PENDING_SHARE).max(l.max_connections.value.min(defaults::PENDING_MIN))
        }
        Some(n) if n.value == 0 || n.value > l.max_connections.value => {
            return Err(ctx.at(
                n,
                format!(
                    "limits.max_pending_connections: must be 1 to limits.max_connections ({})",
                    l.max_connections.value
                ),
            ));
        }
        Some(n) => n.value,
    };
    Ok(Limits {
        max_connections: l.max_connections.value,
        max_connections_per_source: l.max_connections_per_source.value,
        max_pending_connections,
        client_hello_bytes: hello,
        identity: identity_limits(l, ctx)?,
    })
}

/// `limits.max_connections_per_identity` and `connection_rate_per_identity`.
fn identity_limits(l: &RawLimits, ctx: &Ctx<'_>) -> Result<crate::identity_limits::Settings, ConfigError> {
    use crate::identity_limits::{Rate, Settings};
    let max_connections = match &l.max_connections_per_identity {
        Some(n) if n.value == 0 => {
            return Err(
                ctx.at(n, "limits.max_connections_per_identity: must be at least 1 (leave it out for no limit)".into())
            );
        }
        n => n.as_ref().map(|n| n.value),
    };
    let rate = match &l.connection_rate_per_identity {
        None => None,
        Some(r) => {
            let text = r.value.rate.value.trim();
            let per_second = text.split_once('/').and_then(|(n, unit)| {
                let n: f64 = n.trim().parse().ok().filter(|n: &f64| n.is_finite() && *n > 0.0)?;
                match unit.trim() {
                    "s" => Some(n),
                    "m" => Some(n / 60.0),
                    "h" => Some(n / 3600.0),
                    _ => None,
                }
            });
            let Some(per_second) = per_second else {
                return Err(ctx.at(
                    &r.value.rate,
                    format!(
                        "limits.connection_rate_per_identity.rate: {text:?} is not a rate such as 50/s, 600/m or 1000/h"
                    ),
                ));
            };
            let burst = match &r.value.burst {
                Some(b) if b.value == 0 => {
                    return Err(ctx.at(b, "limits.connection_rate_per_identity.burst: must be at least 1".into()));
                }
                Some(b) => f64::from(b.value),
                None => per_second.ceil().max(1.0),
            };
            Some(Rate { per_second, burst })
        }
    };
    Ok(Settings { max_connections, rate })
}

fn metrics(m: &RawMetrics, listeners: &[Listener], ctx: &Ctx<'_>) -> Result<MetricsSettings, ConfigError> {
    for (key, cap) in [
        ("max_sni_values", &m.max_sni_values),
        ("max_source_values", &m.max_source_values),
        ("max_sni_source_pairs", &m.max_sni_source_pairs),
    ] {
        if cap.value == 0 {
            return Err(ctx.at(cap, format!("metrics.{key}: must be at least 1")));
        }
    }
    let address = m.address.as_ref().map(|a| (a, a.value.0.0));
    if let Some((spanned, addr)) = address
        && addr.port() != 0
        && listeners.iter().any(|l| l.address == addr)
    {
        return Err(ctx.at(spanned, format!("metrics.address: {addr} is also a listener's address")));
    }
    Ok(MetricsSettings {
        address: address.map(|(_, addr)| addr),
        caps: Caps {
            sni_values: m.max_sni_values.value,
            source_values: m.max_source_values.value,
            sni_source_pairs: m.max_sni_source_pairs.value,
        },
        istio_compatible: m.istio_compatible,
    })
}

/// An allow list, with the guard against wildcards over a public suffix
/// (`*.com`, `*.co.uk`, `*.github.io`: every site under it, whoever owns
/// it), which an entry lifts with `public_suffix: true`.
fn allow_list(entries: Vec<Spanned<AllowEntry>>, key: &str, ctx: &Ctx<'_>) -> Result<Vec<Pattern>, ConfigError> {
    let mut out = Vec::new();
    for e in entries {
        if let Some(suffix) = e.value.pattern.wildcard_suffix()
            && !e.value.public_suffix
            && is_public_suffix(suffix.as_str())
        {
            return Err(ctx.at(
                &e,
                format!(
                    "{key}: \"{}\" allows every domain under the public suffix {suffix:?}, whoever registers it; \
                     allow the names you mean, or write {{pattern: \"{}\", public_suffix: true}} if you do mean it",
                    e.value.pattern, e.value.pattern
                ),
            ));
        }
        out.push(e.value.pattern);
    }
    Ok(out)
}

/// Whether `name` is on the public suffix list (ICANN or private section),
/// as a whole: `com`, `co.uk`, `github.io`, `s3.amazonaws.com`.
pub(crate) fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes()).is_some_and(|s| s.is_known() && s.as_bytes() == name.as_bytes())
}

/// Callers selected by SPIFFE ID, namespace or `namespace/service-account`
/// (`key` names the rule or route in errors).
fn selector(
    principals: Vec<Parsed<PrincipalSelector>>,
    namespaces: &[Spanned<String>],
    service_accounts: &[Spanned<String>],
    key: &str,
    ctx: &Ctx<'_>,
) -> Result<Selector, ConfigError> {
    let mut from = Selector { principals: principals.into_iter().map(|p| p.0.0).collect(), ..Default::default() };
    for ns in namespaces {
        if !is_k8s_name(&ns.value) {
            return Err(ctx.at(ns, format!("{key}.namespaces: {:?} is not a namespace name", ns.value)));
        }
        from.namespaces.insert(ns.value.clone());
    }
    for sa in service_accounts {
        match sa.value.split_once('/') {
            Some((ns, name)) if is_k8s_name(ns) && is_k8s_name(name) => {
                from.service_accounts.insert((ns.to_owned(), name.to_owned()));
            }
            _ => {
                return Err(ctx.at(
                    sa,
                    format!("{key}.service_accounts: {:?} must be namespace/name, as in payments/checkout", sa.value),
                ));
            }
        }
    }
    Ok(from)
}

/// `routes:`: how allowed connections leave, first match wins.
fn routes(
    raw: Vec<Spanned<RawRoute>>,
    listeners: &[Listener],
    ctx: &Ctx<'_>,
) -> Result<crate::route::Routes, ConfigError> {
    use crate::route::{Action, ProxyOut, Route, RouteMatch, Routes};
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in raw.into_iter().enumerate() {
        let r = r.value;
        let key = format!("routes[{i}]");
        let name = r.name.value.clone();
        if !is_label_name(&name) {
            return Err(ctx.at(&r.name, format!("{key}.name: {name:?} must be letters, digits, '-', '_', '.' or '/'")));
        }
        if !names.insert(name.clone()) {
            return Err(ctx.at(&r.name, format!("{key}.name: {name:?} is used by another route")));
        }
        let m = r.when;
        for l in &m.listeners {
            if !listeners.iter().any(|x| x.name == l.value) {
                return Err(ctx.at(l, format!("{key}.match.listeners: there is no listener {:?}", l.value)));
            }
        }
        let when = RouteMatch {
            from: selector(m.principals, &m.namespaces, &m.service_accounts, &format!("{key}.match"), ctx)?,
            sources: m.sources.into_iter().map(|c| c.0.0).collect(),
            names: m.names.into_iter().map(|p| p.0).collect(),
            listeners: m.listeners.into_iter().map(|l| l.value).collect(),
        };
        let mark = match r.mark {
            Some(m) if m.value == 0 => {
                return Err(ctx.at(&m, format!("{key}.mark: 0 means no mark; use 1-4294967295 or leave it out")));
            }
            m => m.map(|m| m.value),
        };
        let direct = r.next_hop.is_none() && r.http_proxy.is_none();
        if let (Some(b), false) = (&r.bind, direct) {
            return Err(ctx.at(b, format!("{key}.bind: bind is for direct routes, not next_hop or http_proxy ones")));
        }
        if let (Some(p), None) = (&r.proxy_protocol, &r.next_hop) {
            return Err(ctx.at(p, format!("{key}.proxy_protocol: only a next_hop route announces the client")));
        }
        if let (Some(c), true) = (&r.allow_cidrs, direct) {
            return Err(ctx.at(c, format!("{key}.allow_cidrs: exceptions for next hops; this route has none")));
        }
        if let (Some(f), None) = (&r.proxy_auth_file, &r.http_proxy) {
            return Err(ctx.at(f, format!("{key}.proxy_auth_file: credentials for an http_proxy; this route has none")));
        }
        let allow_cidrs = r.allow_cidrs.map(|l| l.value.into_iter().map(|c| c.0.0).collect()).unwrap_or_default();
        let action = match (r.next_hop, r.http_proxy) {
            (Some(_), Some(h)) => {
                return Err(ctx.at(&h, format!("{key}: a route has one way out: next_hop or http_proxy, not both")));
            }
            (None, Some(proxy)) => {
                let hop = hop(&proxy.value).map_err(|e| ctx.at(&proxy, format!("{key}.http_proxy: {e}")))?;
                let authorization = match &r.proxy_auth_file {
                    None => None,
                    Some(f) => Some(
                        proxy_authorization(&ctx.path(&f.value))
                            .map_err(|e| ctx.at(f, format!("{key}.proxy_auth_file: {e}")))?,
                    ),
                };
                Action::HttpProxy { proxy: hop, authorization, allow_cidrs }
            }
            (Some(hops), None) => {
                if hops.value.0.is_empty() {
                    return Err(ctx.at(&hops, format!("{key}.next_hop: name at least one host:port")));
                }
                let mut parsed = Vec::new();
                for h in &hops.value.0 {
                    parsed.push(hop(h).map_err(|e| ctx.at(&hops, format!("{key}.next_hop: {e}")))?);
                }
                let proxy_protocol = r.proxy_protocol.map(|p| match p.value {
                    ProxyVersion::V1 => ProxyOut::V1,
                    ProxyVersion::V2 => ProxyOut::V2,
                });
                Action::NextHop { hops: parsed, proxy_protocol, allow_cidrs }
            }
            (None, None) => Action::Direct { bind: r.bind.map(|b| b.value.0), freebind: r.freebind },
        };
        out.push(Route { name, when, action, mark });
    }
    Ok(Routes(out))
}

/// `proxy_auth_file`: `user:password` (sent as Basic credentials), or a
/// whole `Proxy-Authorization` value (`Basic ...`, `Bearer ...`); one line.
fn proxy_authorization(path: &std::path::Path) -> Result<crate::route::Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.trim_end_matches(['\r', '\n']);
    if line.is_empty() || line.contains(['\r', '\n']) || line.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!("{}: one line, user:password or a Proxy-Authorization value", path.display()));
    }
    let value = match line.split_once(' ') {
        Some((scheme, _)) if !scheme.contains(':') => line.to_owned(),
        _ if line.contains(':') => format!("Basic {}", base64(line.as_bytes())),
        _ => return Err(format!("{}: expected user:password or a Proxy-Authorization value", path.display())),
    };
    Ok(crate::route::Secret(value))
}

/// Standard base64 with padding (RFC 4648), for Basic credentials.
fn base64(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A next hop, `host:port`: an IP literal (`[v6]:port` for IPv6) or a name.
fn hop(text: &str) -> Result<crate::route::Hop, String> {
    use crate::route::{Hop, HopHost};
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return match addr.port() {
            0 => Err(format!("{text:?}: the port must be 1-65535")),
            port => Ok(Hop { host: HopHost::Ip(addr.ip()), port }),
        };
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?} is not host:port"))?;
    let port = match port.parse::<u16>() {
        Ok(p @ 1..) => p,
        _ => return Err(format!("{text:?}: the port must be 1-65535")),
    };
    let name = crate::name::ServerName::from_bytes(host.as_bytes()).map_err(|e| format!("{text:?}: {e}"))?;
    Ok(Hop { host: HopHost::Name(name), port })
}
