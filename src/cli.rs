//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "snigress",
    version,
    about = "SNI-routing egress gateway for service meshes",
    long_about = "SNI-routing egress gateway for service meshes.\n\n\
        Terminates the mesh's outer mTLS (or takes TLS directly on passthrough listeners), \
        reads the application's own ClientHello (or an HTTP CONNECT or plain-HTTP request: \
        listeners[].protocol), checks the name against the policy, resolves and vets the \
        addresses, connects (directly, or as a route says), and splices both ways. One JSON \
        access record per connection goes to stdout (or access_log.path); diagnostics go to \
        stderr.\n\n\
        Exit codes: 0 success, 1 runtime failure (e.g. cannot bind), 2 bad arguments, \
        64 invalid configuration, 130/143 when a second SIGINT/SIGTERM cut the drain short."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Diagnostic log filter (tracing EnvFilter syntax, e.g. info or snigress=debug).
    #[arg(long, global = true, env = "SNIGRESS_LOG", default_value = "info", value_parser = log_filter)]
    pub log_level: String,

    /// Diagnostic log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    ///
    /// Validates the config (exit 64 on error, before any socket is bound),
    /// mints the dev PKI if `mtls.dev_pki` names an empty directory, binds
    /// every listener and serves until SIGINT or SIGTERM, then drains
    /// (shutdown.grace_period, shutdown.drain_timeout; a second signal exits
    /// at once). SIGHUP, or a change to the config or certificate files,
    /// reloads them; an invalid new config is refused and the running one
    /// stays in force.
    Run {
        /// The YAML config file (see config/snigress.yaml for every key).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Threads that serve connections. Default: TOKIO_WORKER_THREADS if
        /// set, else the CPUs this process may use (its affinity mask and
        /// cgroup CPU quota). With 1, every connection is served on one
        /// thread with no cross-thread hand-offs (the cheapest per
        /// connection when the pod has one CPU).
        #[arg(long, env = "SNIGRESS_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
        workers: Option<u16>,
    },
    /// Validate a config file; optionally show the decision for a name.
    ///
    /// Checks the YAML, every value, and the certificate files. With --sni,
    /// prints the decision for that name, the pattern that decided and why,
    /// and the route an allowed connection would leave by.
    /// Exits 0 when the config is valid (whatever the decision), 64 when not.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// A server name to decide for, as a client would send it in SNI.
        #[arg(long, value_name = "NAME")]
        sni: Option<String>,
        /// The caller's SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>), for per-identity rules.
        #[arg(long, value_name = "SPIFFE_ID", requires = "sni")]
        principal: Option<String>,
        /// The client's address, for routes that match on sources.
        #[arg(long, value_name = "IP", requires = "sni")]
        source: Option<std::net::IpAddr>,
        /// The listener the connection arrives on, for routes that match on listeners.
        #[arg(long, value_name = "NAME", requires = "sni")]
        listener: Option<String>,
        /// Check everything but the certificate files themselves (for a
        /// config whose files exist only where it is deployed, e.g. in CI).
        #[arg(long)]
        skip_cert_files: bool,
    },
    /// Mint a development mesh PKI: CA, gateway certificate, client certificates.
    ///
    /// Writes ca.pem/ca.key, gateway.pem/gateway.key and, per client,
    /// client-<ns>-<sa>.pem/.key with the SPIFFE ID as URI SAN. For local use
    /// and tests only.
    Certs {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Client SPIFFE IDs (repeatable).
        #[arg(long = "client", value_name = "SPIFFE_ID", default_value = "spiffe://cluster.local/ns/default/sa/sleep")]
        clients: Vec<String>,
        /// The gateway's own SPIFFE ID (its certificate's URI SAN).
        #[arg(long, value_name = "SPIFFE_ID", default_value = "spiffe://cluster.local/ns/snigress/sa/snigress")]
        gateway_id: String,
        /// DNS names or IP addresses for the gateway certificate (repeatable).
        #[arg(long = "server-name", value_name = "NAME", default_values = ["localhost", "127.0.0.1", "::1"])]
        server_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Wrap local TCP connections in the mesh's outer mTLS to a gateway.
    ///
    /// For callers without a mesh (a VM, a CI runner, a laptop): point the
    /// application's TLS at --listen (e.g. curl --connect-to NAME:443:LISTEN)
    /// and each connection is carried to the gateway inside mTLS with this
    /// client certificate, as an Istio sidecar would. The application's own
    /// TLS is untouched, end to end with the destination.
    Sidecar(SidecarArgs),
    /// Apply (or print) the iptables rules that send applications'
    /// connections to a listener with original_destination.
    ///
    /// redirect: nat OUTPUT (and PREROUTING on --interface) REDIRECT to
    /// --port. tproxy: mangle PREROUTING TPROXY to --port, with the ip
    /// rule/route for its mark. The gateway's own traffic (--uid, --mark)
    /// and loopback are never captured. Needs root (CAP_NET_ADMIN); IPv4, and
    /// IPv6 too with --ipv6.
    Iptables(IptablesArgs),
    /// Roll a policy out safely, from the access records of real traffic.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print a commented policy that allows what the access records show
    /// was let through (allowed, and would-deny in audit mode).
    ///
    /// Names under one registrable domain (the public suffix list decides)
    /// are folded into *.domain from --wildcard-threshold distinct names; a
    /// wildcard is never formed over a public suffix.
    Suggest {
        /// Access-log files (JSON lines as snigress writes them; gzip accepted).
        #[arg(long = "access-log", value_name = "FILE", required = true, num_args = 1..)]
        access_logs: Vec<PathBuf>,
        /// One rule per caller identity instead of one global list.
        #[arg(long)]
        per_identity: bool,
        /// Leave out entries seen fewer times.
        #[arg(long, value_name = "N", default_value_t = 1)]
        min_connections: u64,
        /// Fold a registrable domain's names into *.domain from this many
        /// distinct names (0: never).
        #[arg(long, value_name = "K", default_value_t = 3)]
        wildcard_threshold: usize,
    },
    /// Replay recorded connections through a new policy and print what it
    /// would newly deny and newly allow. Exit 0 when nothing would be newly
    /// denied, 1 when something would, 64 on a bad config.
    Diff {
        /// The policy to try.
        #[arg(long, value_name = "NEW.yaml")]
        config: PathBuf,
        /// The policy to compare with; default: the decisions in the records.
        #[arg(long, value_name = "OLD.yaml")]
        against: Option<PathBuf>,
        /// Access-log files (JSON lines; gzip accepted).
        #[arg(long = "access-log", value_name = "FILE", required = true, num_args = 1..)]
        access_logs: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct IptablesArgs {
    /// The interception listener's port.
    #[arg(long, value_name = "PORT")]
    pub port: u16,
    /// redirect (iptables nat REDIRECT) or tproxy (mangle TPROXY).
    #[arg(long, value_enum, default_value = "redirect")]
    pub mode: crate::tools::iptables::Mode,
    /// The gateway's UID, whose connections pass (repeatable; redirect only:
    /// the owner match exists only in OUTPUT); Istio uses 1337.
    #[arg(long = "uid", value_name = "UID")]
    pub uids: Vec<u32>,
    /// The listener's upstream_mark, whose connections pass (required for tproxy).
    #[arg(long, value_name = "MARK")]
    pub mark: Option<u32>,
    /// Destination ports to capture (comma-separated); "all" for every TCP port.
    #[arg(long, value_name = "PORTS", default_value = "443", value_parser = ports)]
    pub ports: Ports,
    /// Destination networks never captured (repeatable), e.g. the cluster's service CIDR.
    #[arg(long, value_name = "CIDR")]
    pub exclude: Vec<ipnet::IpNet>,
    /// Capture connections routed in through this interface (repeatable).
    /// tproxy without it: every interface.
    #[arg(long = "interface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// tproxy: the mark TPROXY sets, selecting the routing table below.
    #[arg(long, value_name = "MARK", default_value_t = 0x1)]
    pub tproxy_mark: u32,
    /// tproxy: the routing table that delivers marked packets locally.
    #[arg(long, value_name = "TABLE", default_value_t = 133)]
    pub table: u32,
    /// The same rules for IPv6 too (ip6tables, ip -6).
    #[arg(long)]
    pub ipv6: bool,
    /// Print the rules as a shell script instead of applying them.
    #[arg(long)]
    pub print: bool,
}

/// `--ports`: a list, or every port.
#[derive(Debug, Clone)]
pub struct Ports(pub Vec<u16>);

fn ports(s: &str) -> Result<Ports, String> {
    if s == "all" {
        return Ok(Ports(Vec::new()));
    }
    s.split(',')
        .map(|p| {
            p.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        })
        .collect::<Result<_, _>>()
        .map(Ports)
}

#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// Local address to accept the application's connections on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10443")]
    pub listen: std::net::SocketAddr,
    /// The gateway's mtls listener, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub gateway: String,
    /// Client certificate chain (PEM) with the caller's SPIFFE ID.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Mesh root certificates (PEM) the gateway's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Outer SNI, and the name the gateway certificate must carry unless
    /// --gateway-id is given. Default: the host part of --gateway.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Verify the gateway by its SPIFFE ID (URI SAN) instead of by name, as
    /// Istio does (DestinationRule subjectAltNames).
    #[arg(long, value_name = "SPIFFE_ID")]
    pub gateway_id: Option<String>,
    /// ALPN protocols to offer on the outer layer (repeatable); Istio's
    /// sidecar offers istio-peer-exchange and istio.
    #[arg(long = "alpn", value_name = "PROTOCOL", default_values = crate::tools::sidecar::ISTIO_ALPN)]
    pub alpn: Vec<String>,
    /// Time allowed to reach the gateway and complete the outer handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub connect_timeout: std::time::Duration,
    /// Close a connection when no byte moved for this long.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
    pub idle_timeout: std::time::Duration,
}

/// A filter tracing accepts; anything else is a usage error (exit 2), not
/// a silent `info`.
fn log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("invalid log filter {s:?}: {e} (use e.g. info, debug or snigress=debug,warn)"))
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s).ok_or_else(|| format!("invalid duration {s:?}: use 250ms, 10s, 5m or 1h"))
}
