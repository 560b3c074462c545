//! The `snigress` binary: argument parsing, logging, exit codes.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use snigress::access_log::JsonLines;
use snigress::cli::{Cli, Command, LogFormat};
use snigress::config::{Config, MtlsSource};
use snigress::identity::Principal;
use snigress::listener::{Gateway, StartError};
use snigress::{check, devcerts};

/// Exit code for an invalid configuration (EX_USAGE from sysexits.h).
const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config, sni, principal, skip_cert_files } => {
            check_cmd(&config, sni.as_deref(), principal.as_deref(), !skip_cert_files)
        }
        Command::Certs { out, clients, gateway_id, server_names, force } => {
            certs(&out, &clients, &gateway_id, server_names, force)
        }
        Command::Sidecar(args) => sidecar(args),
    }
}

fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check_cmd(path: &std::path::Path, sni: Option<&str>, principal: Option<&str>, cert_files: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match check::validate(&config, cert_files) {
        Ok(summary) => println!("{summary}"),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if let Some(sni) = sni {
        let principal = match principal.map(Principal::parse).transpose() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("--principal: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        print!("{}", check::explain(&config, sni, principal.as_ref()));
    }
    ExitCode::SUCCESS
}

fn sidecar(args: snigress::cli::SidecarArgs) -> ExitCode {
    let gateway_id = match args.gateway_id.as_deref().map(Principal::parse).transpose() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("--gateway-id: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let server_name = args.server_name.unwrap_or_else(|| {
        let host = args.gateway.rsplit_once(':').map_or(args.gateway.as_str(), |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']').to_owned()
    });
    let settings = snigress::sidecar::Settings {
        listen: args.listen,
        gateway: args.gateway,
        server_name,
        gateway_id,
        cert: args.cert,
        key: args.key,
        ca: args.ca,
        alpn: args.alpn,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async {
        let sidecar = match snigress::sidecar::Sidecar::bind(settings.clone()).await {
            Ok(s) => s,
            Err(e @ snigress::sidecar::SidecarError::Bind(..)) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_FAILURE);
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let address = sidecar.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(%address, gateway = %settings.gateway, server_name = %settings.server_name, "sidecar listening");
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sidecar.serve() => {}
            () = stop => tracing::info!("sidecar stopped"),
        }
        ExitCode::SUCCESS
    })
}

fn certs(
    out: &std::path::Path,
    clients: &[String],
    gateway_id: &str,
    server_names: Vec<String>,
    force: bool,
) -> ExitCode {
    let parse = |s: &str| Principal::parse(s).map_err(|e| format!("{s}: {e}"));
    let spec = (|| -> Result<devcerts::Spec, String> {
        Ok(devcerts::Spec {
            gateway_id: parse(gateway_id)?,
            server_names,
            clients: clients.iter().map(|c| parse(c)).collect::<Result<_, _>>()?,
        })
    })();
    let spec = match spec {
        Ok(s) => s,
        Err(e) => {
            eprintln!("invalid SPIFFE ID {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match devcerts::mint(out, &spec, force) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(MtlsSource::DevPki(dir)) = config.mtls.as_ref().map(|m| &m.source) {
        match devcerts::ensure(dir) {
            Ok(minted) => {
                let (client_cert, client_key) = devcerts::client_files(&devcerts::Spec::local().clients[0]);
                tracing::warn!(
                    dir = %dir.display(),
                    minted,
                    ca = %dir.join(devcerts::CA_CERT).display(),
                    client_cert = %dir.join(client_cert).display(),
                    client_key = %dir.join(client_key).display(),
                    "DEVELOPMENT PKI in use (mtls.dev_pki): for local trials only, never in production"
                );
            }
            Err(e) => {
                eprintln!("{}", config.error_at("dev_pki", e.to_string()));
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(serve(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("{e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

enum Failure {
    Config(String),
    Runtime(anyhow::Error),
}

async fn serve(path: &Path, config: Config) -> Result<(), Failure> {
    // Installed first: a signal that arrives while starting must not kill
    // the process with the default action.
    let signals =
        Signals::install().map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot install signal handlers: {e}")))?;
    let sink = Arc::new(
        JsonLines::open(config.access_log.as_deref())
            .with_context(|| format!("cannot open the access log {:?}", config.access_log))
            .map_err(Failure::Runtime)?,
    );
    let gateway = match Gateway::bind(&config, sink.clone()).await {
        Ok(g) => g,
        Err(StartError::Config(e)) => return Err(Failure::Config(e.to_string())),
        Err(e) => return Err(Failure::Runtime(e.into())),
    };
    let reloader = gateway.reloader(path.to_owned());
    let _watch = match reloader.clone().watch() {
        Ok(task) => Some(task),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config and certificate directories; reload with SIGHUP");
            None
        }
    };
    let Signals { mut term, mut int, mut hup } = signals;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config and certificates");
            let reloader = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
        }
    });
    let on_exit = sink.clone();
    let stop = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        // A second signal ends the process at once.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now without draining");
            on_exit.flush(std::time::Duration::from_secs(1));
            std::process::exit(0);
        });
    };
    gateway.serve(stop).await;
    sink.flush(std::time::Duration::from_secs(5));
    tracing::info!("stopped");
    Ok(())
}

/// The signals `run` handles: SIGTERM and SIGINT drain and stop, SIGHUP
/// reloads.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}
