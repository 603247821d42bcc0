//! The command line, mirroring Envoy's flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Load the config, bind and serve (the default).
    Serve,
    /// Check the config and exit: 0 and `configuration 'FILE' OK`, or 1 and every error.
    Validate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    #[value(alias = "warn")]
    Warning,
    Error,
    Critical,
    Off,
}

impl LogLevel {
    fn filter(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
            LogLevel::Off => "off",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "ferry", version = crate::version(), about = "A CONNECT-UDP (RFC 9298) proxy configured with Envoy bootstraps")]
pub struct Args {
    /// Path to the bootstrap (YAML or JSON), as Envoy's -c.
    #[arg(short = 'c', long = "config-path")]
    pub config_path: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "serve")]
    pub mode: Mode,
    #[arg(short = 'l', long = "log-level", value_enum, default_value = "info")]
    pub log_level: LogLevel,
    /// Worker threads (Envoy: worker threads; default: the number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Write the admin endpoint's bound address (`IP:PORT`) to this file once bound.
    #[arg(long = "admin-address-path")]
    pub admin_address_path: Option<PathBuf>,
    /// Accepted for compatibility with Envoy's command line; Ferry has no hot restart.
    #[arg(long = "disable-hot-restart")]
    pub disable_hot_restart: bool,
    /// Accepted for compatibility with Envoy's command line; Ferry has no shared memory.
    #[arg(long = "base-id")]
    pub base_id: Option<u32>,
    /// After SIGTERM, how long open tunnels may run before they are closed and Ferry exits,
    /// in seconds (Envoy's flag and default).
    #[arg(long = "drain-time-s", default_value_t = 600)]
    pub drain_time_s: u64,
    /// Accepted for compatibility with Envoy's command line: Ferry always drains gradually
    /// (every connection gets GOAWAY at once; each tunnel runs until it ends).
    #[arg(long = "drain-strategy", value_parser = ["gradual", "immediate"])]
    pub drain_strategy: Option<String>,
    /// Accepted for compatibility with Envoy's command line (hot restart only).
    #[arg(long = "parent-shutdown-time-s")]
    pub parent_shutdown_time_s: Option<u64>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Tunnel local UDP through a CONNECT-UDP proxy: every local peer that sends to
    /// --listen gets its own tunnel to --target.
    Client(ClientArgs),
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The proxy, `https://HOST:PORT` (HTTP/3 over UDP).
    #[arg(long)]
    pub proxy: String,
    /// Where the tunnels go: `HOST:PORT` (an IPv6 literal in brackets).
    #[arg(long)]
    pub target: String,
    /// The local UDP address to listen on (port 0 picks one; it is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// PEM file with the CA certificate(s) that sign the proxy's certificate.
    #[arg(long, conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Do not verify the proxy's certificate (tests only).
    #[arg(long)]
    pub insecure: bool,
    /// A URI template other than the default
    /// `https://HOST:PORT/.well-known/masque/udp/{target_host}/{target_port}/`.
    #[arg(long)]
    pub template: Option<String>,
    /// Use HTTP/2 over TLS (extended CONNECT, datagrams as capsules) instead of HTTP/3.
    #[arg(long)]
    pub http2: bool,
    /// Send datagrams as DATAGRAM capsules on the stream, never as QUIC datagrams.
    #[arg(long)]
    pub capsules: bool,
    /// Close a tunnel after this many seconds without traffic.
    #[arg(long, default_value_t = 120)]
    pub idle_timeout_s: u64,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_level);
    if let Some(Command::Client(c)) = args.command {
        return client_main(c, args.concurrency);
    }
    let Some(path) = args.config_path.clone() else {
        eprintln!("ferry: a config is required: -c/--config-path FILE");
        return ExitCode::from(1);
    };
    let bootstrap = match ferry_config::load_file(&path) {
        Ok(b) => b,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("configuration '{}' is invalid", path.display());
            return ExitCode::from(1);
        }
    };
    if args.mode == Mode::Validate {
        println!("configuration '{}' OK", path.display());
        // Ferry's extension, explained: what dynamic targets may reach.
        for l in &bootstrap.listeners {
            let hcm = &l.filter_chain.hcm;
            if let Some(cache) = &hcm.dynamic_forward_proxy {
                println!(
                    "listener {}: dynamic targets (DNS cache `{}`); destination policy ({}): {}",
                    l.name,
                    cache.name,
                    ferry_config::DESTINATION_POLICY_NAME,
                    crate::policy::describe(&hcm.destination_policy)
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.concurrency {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(serve(bootstrap, args))
}

async fn serve(bootstrap: ferry_config::Bootstrap, args: Args) -> ExitCode {
    let options = crate::server::ServerOptions {
        drain_time: std::time::Duration::from_secs(args.drain_time_s),
        concurrency: args.concurrency,
        config_path: args.config_path.as_ref().map(|p| p.display().to_string()),
        log_level: format!("{:?}", args.log_level).to_ascii_lowercase(),
        admin_address_path: args
            .admin_address_path
            .as_ref()
            .map(|p| p.display().to_string()),
    };
    let server = match crate::server::Server::bind_with(bootstrap, options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(1);
        }
    };
    if let (Some(path), Some(addr)) = (&args.admin_address_path, server.admin_addr()) {
        if let Err(e) = std::fs::write(path, addr.to_string()) {
            eprintln!("ferry: --admin-address-path {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    for l in &server.state.listeners {
        tracing::info!(listener = %l.name, address = %l.local_addr, "listening");
    }
    // SIGTERM or SIGINT: drain (refuse new connections, GOAWAY, let open tunnels finish
    // within --drain-time-s), then exit 0. A second signal exits at once.
    let state = server.state.clone();
    let signals = Signals::new();
    tokio::spawn(async move {
        let Some(mut signals) = signals else {
            tracing::warn!("cannot install SIGTERM/SIGINT handlers");
            return;
        };
        let sig = signals.next().await;
        tracing::info!(
            signal = sig,
            drain_time_s = state.options.drain_time.as_secs(),
            "signal received: draining (send it again to exit at once)"
        );
        state.drain_and_exit(sig);
        let sig = signals.next().await;
        tracing::info!(signal = sig, "second signal: shutting down now");
        state.shutdown.trigger();
    });
    server.run().await;
    tracing::info!("ferry exited cleanly");
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT, installed once (before serving, so none is missed).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

fn init_logging(level: LogLevel) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.filter()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// `ferry client`: resolve the arguments, bind, print the local address, tunnel.
fn client_main(args: ClientArgs, concurrency: Option<usize>) -> ExitCode {
    match client_config(&args) {
        Ok(config) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all();
            if let Some(n) = concurrency {
                rt.worker_threads(n.max(1));
            }
            let rt = match rt.build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ferry client: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(async move {
                let socket = match tokio::net::UdpSocket::bind(args.listen).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("ferry client: cannot bind {}: {e}", args.listen);
                        return ExitCode::from(1);
                    }
                };
                match socket.local_addr() {
                    Ok(a) => println!("listening on {a}"),
                    Err(e) => {
                        eprintln!("ferry client: {e}");
                        return ExitCode::from(1);
                    }
                }
                match crate::encap::run(socket, config).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("ferry client: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Err(e) => {
            eprintln!("ferry client: {e}");
            ExitCode::from(2)
        }
    }
}

fn client_config(args: &ClientArgs) -> Result<crate::encap::EncapConfig, String> {
    use ferry_proto::template::UriTemplate;
    let rest = args
        .proxy
        .strip_prefix("https://")
        .ok_or("--proxy must be https://HOST:PORT")?
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or("--proxy must name a port: https://HOST:PORT")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad proxy port `{port}`"))?;
    let proxy = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("cannot resolve proxy {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("proxy {host} has no address"))?;
    let (thost, tport) = args
        .target
        .rsplit_once(':')
        .ok_or("--target must be HOST:PORT")?;
    let thost = thost.trim_start_matches('[').trim_end_matches(']');
    let tport: u16 = tport
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad target port `{tport}` (1..=65535)"))?;
    let template = match &args.template {
        Some(t) => UriTemplate::parse(t).map_err(|e| format!("--template: {e}"))?,
        None => UriTemplate::default_template(),
    };
    let ca_pem = match &args.ca {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|e| format!("--ca {}: {e}", path.display()))?,
        ),
        None if args.insecure => None,
        None => return Err("give --ca FILE to verify the proxy, or --insecure".into()),
    };
    Ok(crate::encap::EncapConfig {
        proxy,
        client: crate::client::ClientOptions {
            server_name: host.to_string(),
            ca_pem,
            insecure: args.insecure,
            datagrams: !args.capsules,
        },
        path: template.expand_path(thost, tport),
        target: args.target.clone(),
        idle_timeout: Duration::from_secs(args.idle_timeout_s.max(1)),
        http2: args.http2,
    })
}
