//! The `snigress` binary: argument parsing, logging, the descriptor limit,
//! signals, exit codes.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use snigress::cli::{Cli, Command, LogFormat};
use snigress::config::{self, Config, MtlsSource};
use snigress::gateway::Gateway;
use snigress::identity::Principal;
use snigress::observe::access_log::JsonLines;
use snigress::observe::stderr::NonBlockingStderr;
use snigress::state::StartError;
use snigress::tools::{check, devcerts};

/// Exit code for an invalid configuration (EX_USAGE from sysexits.h).
const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;
/// Descriptors beyond two per connection worth having: listeners, the admin
/// endpoint and its clients, DNS sockets, log files, and pipes for the
/// zero-copy relay (without which it copies through user space instead).
const FD_HEADROOM: u64 = 256;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stderr = init_tracing(&cli);
    let code = dispatch(cli);
    if let Some(stderr) = stderr {
        stderr.flush(Duration::from_secs(1));
    }
    code
}

/// The gateway's runtime: `workers` threads (see `run --workers`). One
/// worker is a current-thread runtime: a connection's events are then
/// handled where they arrive, with no work-stealing queues, no wake-ups of
/// another thread and no atomics shared between workers.
fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let from_env = || {
        let value = std::env::var("TOKIO_WORKER_THREADS").ok()?;
        let n = value.trim().parse::<usize>().ok().filter(|&n| n > 0);
        if n.is_none() {
            tracing::warn!(value, "TOKIO_WORKER_THREADS is not a positive number; ignored");
        }
        n
    };
    let cpus = || std::thread::available_parallelism().map_or(1, usize::from);
    let workers = workers.map(usize::from).or_else(from_env).unwrap_or_else(cpus);
    tracing::info!(workers, "starting {workers} worker thread(s)");
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
}

fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config, workers } => run(&config, workers),
        Command::Check { config, sni, principal, source, listener, skip_cert_files } => {
            let at = check::At { source, listener: listener.as_deref() };
            check_cmd(&config, sni.as_deref(), principal.as_deref(), at, !skip_cert_files)
        }
        Command::Certs { out, clients, gateway_id, server_names, force } => {
            certs(&out, &clients, &gateway_id, server_names, force)
        }
        Command::Sidecar(args) => sidecar(args),
        Command::Iptables(args) => iptables(args),
        Command::Policy(command) => policy(command),
    }
}

fn policy(command: snigress::cli::PolicyCommand) -> ExitCode {
    use snigress::cli::PolicyCommand;
    use snigress::tools::rollout;
    match command {
        PolicyCommand::Suggest { access_logs, per_identity, min_connections, wildcard_threshold } => {
            if let Err(e) = rollout::check_paths(&access_logs) {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            let options = rollout::SuggestOptions { per_identity, min_connections, wildcard_threshold };
            match rollout::suggest(&access_logs, &options) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        PolicyCommand::Diff { config, against, access_logs } => {
            if let Err(e) = rollout::check_paths(&access_logs) {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            let new = match load(&config) {
                Ok((_, c)) => c,
                Err(code) => return code,
            };
            let old = match against.as_deref().map(load).transpose() {
                Ok(old) => old.map(|(_, c)| c),
                Err(code) => return code,
            };
            match rollout::diff(&new, old.as_ref(), &access_logs) {
                Ok(d) => {
                    print!("{}", d.report);
                    if d.newly_denied > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn iptables(args: snigress::cli::IptablesArgs) -> ExitCode {
    use snigress::tools::iptables::{Spec, apply, script};
    let spec = Spec {
        mode: args.mode,
        port: args.port,
        ports: args.ports.0,
        uids: args.uids,
        mark: args.mark,
        exclude: args.exclude,
        interfaces: args.interfaces,
        tproxy_mark: args.tproxy_mark,
        table: args.table,
        ipv6: args.ipv6,
    };
    let commands = match spec.commands() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snigress iptables: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print {
        print!("{}", script(&commands));
        return ExitCode::SUCCESS;
    }
    match apply(&commands) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snigress iptables: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Diagnostics go to stderr through a writer that never blocks the caller
/// (see `observe::stderr`); returned so `main` can flush it before exiting.
fn init_tracing(cli: &Cli) -> Option<NonBlockingStderr> {
    // The filter was validated when the arguments were parsed.
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = NonBlockingStderr::spawn().ok();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (cli.log_format, writer.clone()) {
        (LogFormat::Json, Some(w)) => builder.json().with_current_span(false).with_writer(w).init(),
        (LogFormat::Text, Some(w)) => builder.with_writer(w).init(),
        // No thread for the writer: write in place rather than not at all.
        (LogFormat::Json, None) => builder.json().with_current_span(false).with_writer(std::io::stderr).init(),
        (LogFormat::Text, None) => builder.with_writer(std::io::stderr).init(),
    }
    writer
}

/// The config file's text and the config validated from it.
fn load(path: &Path) -> Result<(String, Config), ExitCode> {
    let fail = |e: config::ConfigError| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let text = config::read(path).map_err(fail)?;
    let config = Config::parse(&text, &path.display().to_string(), &config::base_dir(path)).map_err(fail)?;
    Ok((text, config))
}

fn check_cmd(path: &Path, sni: Option<&str>, principal: Option<&str>, at: check::At<'_>, cert_files: bool) -> ExitCode {
    let (text, config) = match load(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    match check::validate(&config, &text, &path.display().to_string(), cert_files) {
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
        print!("{}", check::explain(&config, sni, principal.as_ref(), at));
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
    let settings = snigress::tools::sidecar::Settings {
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
        let sidecar = match snigress::tools::sidecar::Sidecar::bind(settings.clone()).await {
            Ok(s) => s,
            Err(e @ snigress::tools::sidecar::SidecarError::Bind(..)) => {
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

fn certs(out: &Path, clients: &[String], gateway_id: &str, server_names: Vec<String>, force: bool) -> ExitCode {
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

fn run(path: &Path, workers: Option<u16>) -> ExitCode {
    let (text, config) = match load(path) {
        Ok(loaded) => loaded,
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
                eprintln!("{}", config::locate_mtls(&text, &path.display().to_string(), "dev_pki", e.to_string()));
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    raise_fd_limit(config.limits.max_connections);
    let runtime = match runtime(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(serve(path, &text, config)) {
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

async fn serve(path: &Path, text: &str, config: Config) -> Result<(), Failure> {
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
        Err(StartError::Material(e)) => {
            return Err(Failure::Config(config::locate(text, &path.display().to_string(), &e).to_string()));
        }
        Err(e) => return Err(Failure::Runtime(e.into())),
    };
    let reloader = gateway.reloader(path.to_owned(), text);
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
        // A second signal ends the process at once; the exit status says
        // the drain was cut short (128 + the signal, as a shell reports it).
        tokio::spawn(async move {
            let code = tokio::select! {
                _ = term.recv() => 128 + libc::SIGTERM,
                _ = int.recv() => 128 + libc::SIGINT,
            };
            tracing::warn!(exit_code = code, "second signal: exiting now without draining");
            on_exit.flush(Duration::from_secs(1));
            std::process::exit(code);
        });
    };
    gateway.serve(stop).await;
    sink.flush(Duration::from_secs(5));
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

/// Raises the soft descriptor limit to the hard one (as Go programs and
/// HAProxy do): a soft limit of 1 024, common under systemd and in shells,
/// would otherwise stop the gateway at ~500 connections. Warns when even the
/// hard limit cannot hold `max_connections`.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let raised = if soft < hard { setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard) } else { Ok(soft) };
    let limit = raised.unwrap_or(soft);
    if let Err(e) = raised {
        tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit to the hard limit");
    }
    // Warned only when the connections themselves do not fit: the headroom
    // is advice, and a 20 000 limit with the default 10 000 connections is
    // common and works.
    let needed = 2 * max_connections as u64 + FD_HEADROOM;
    if limit < 2 * max_connections as u64 {
        tracing::warn!(
            limit,
            needed,
            max_connections,
            "the open-file limit cannot hold limits.max_connections (2 descriptors per connection plus {FD_HEADROOM}); \
             connections past about {} will be refused by the kernel: raise the hard limit (ulimit -Hn, LimitNOFILE=) \
             or lower limits.max_connections",
            limit.saturating_sub(FD_HEADROOM) / 2
        );
    } else {
        tracing::debug!(limit, needed, "open-file limit");
    }
}
