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
        reads the application's own ClientHello, checks its SNI against the policy, resolves \
        and vets the addresses, connects, and splices both ways. One JSON access record per \
        connection goes to stdout (or access_log.path); diagnostics go to stderr.\n\n\
        Exit codes: 0 success, 1 runtime failure (e.g. cannot bind), 2 bad arguments, \
        64 invalid configuration."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Diagnostic log filter (tracing EnvFilter syntax, e.g. info or snigress=debug).
    #[arg(long, global = true, env = "SNIGRESS_LOG", default_value = "info")]
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
    /// every listener and serves until SIGINT or SIGTERM.
    Run {
        /// The YAML config file (see config/snigress.yaml for every key).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file; optionally show the decision for a name.
    ///
    /// Checks the YAML, every value, and the certificate files. With --sni,
    /// prints the decision for that name, the pattern that decided and why.
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
}
