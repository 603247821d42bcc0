//! The command line, mirroring Envoy's flags.

use std::path::PathBuf;
use std::process::ExitCode;

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
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_level);
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
