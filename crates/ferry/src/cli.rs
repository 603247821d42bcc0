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
    let server = match crate::server::Server::bind(bootstrap) {
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
    let shutdown = server.state.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        shutdown.trigger();
    });
    server.run().await;
    tracing::info!("ferry exited cleanly");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
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
