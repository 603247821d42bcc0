//! `ferry-bench`: drives any RFC 9298 (CONNECT-UDP) proxy over HTTP/3, or a UDP target
//! directly (`--direct`, the machine's limit), and reports delivered rate, loss, round-trip
//! percentiles, fairness, set-up rates and the proxy's CPU and memory.
//!
//! ```text
//! ferry-bench echo --listen 127.0.0.1:0                        # prints the bound address
//! ferry-bench load   --proxy 127.0.0.1:4433 --target 127.0.0.1:9000 --rate 20000 --duration 5
//! ferry-bench search --proxy 127.0.0.1:4433 --target 127.0.0.1:9000 --max-loss 0.001
//! ferry-bench search --direct --target 127.0.0.1:9000
//! ferry-bench tunnels --proxy ... --target ... --connections 100 --tunnels 10000 --ping
//! ferry-bench connections --proxy ... --target ... --count 1000
//! ```
//!
//! Progress lines go to stderr; the result goes to stdout (JSON with `--json`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

mod conns;
mod echo;
mod h3client;
mod lanes;
mod procstat;
mod quicecho;
mod report;
mod run;
mod setup;
mod udpcost;

#[derive(Parser)]
#[command(
    name = "ferry-bench",
    version,
    about = "Load generator for CONNECT-UDP proxies"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A UDP echo target: prints its bound address, echoes until --max-secs.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Threads (SO_REUSEPORT sockets on one port).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 3600.0)]
        max_secs: f64,
    },
    /// The QUIC floor: an HTTP/3 server that accepts every CONNECT-UDP and sends each
    /// datagram straight back (no UDP leg). Prints its bound address; serves until
    /// --max-secs. Point `load --proxy` at it to measure what QUIC and HTTP/3 alone cost.
    QuicEcho {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value = "examples/certs/cert.pem")]
        cert: std::path::PathBuf,
        #[arg(long, default_value = "examples/certs/key.pem")]
        key: std::path::PathBuf,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 3600.0)]
        max_secs: f64,
        /// The minimal relay: instead of echoing, relay each tunnel's datagrams to this UDP
        /// target over a socket of its own, with nothing else a proxy does.
        #[arg(long)]
        relay: Option<SocketAddr>,
    },
    /// The UDP leg's cost per datagram when every datagram is its own flow (one connected
    /// socket per tunnel, as a proxy must): one thread, loopback socket pairs, nothing that
    /// sleeps. Prints nanoseconds per datagram for each side.
    UdpCost {
        /// Flows (socket pairs); each round sends one datagram on each.
        #[arg(long, default_value_t = 1000)]
        flows: usize,
        /// UDP payload bytes.
        #[arg(long, default_value_t = 1200)]
        size: usize,
        /// Datagrams to time (rounded up to whole rounds).
        #[arg(long, default_value_t = 400_000)]
        datagrams: u64,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// One trial: a fixed rate (open loop) or a fixed window per tunnel (closed loop).
    Load(LoadArgs),
    /// The highest rate with loss at or under --max-loss.
    Search(SearchArgs),
    /// Tunnel set-up rate on existing connections, and the proxy's RSS per idle tunnel.
    Tunnels(TunnelsArgs),
    /// New connections with one tunnel each, per second.
    Connections(ConnectionsArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// The proxy's HTTP/3 address.
    #[arg(long, required_unless_present = "direct")]
    proxy: Option<SocketAddr>,
    /// Send straight to --target over UDP, no proxy: the machine's limit.
    #[arg(long, conflicts_with = "proxy")]
    direct: bool,
    /// The UDP target (echo): named in the CONNECT-UDP path, or the destination with --direct.
    #[arg(long)]
    target: SocketAddr,
    /// TLS server name and :authority host.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// PEM certificate to trust.
    #[arg(long, default_value = "examples/certs/cert.pem")]
    ca: PathBuf,
    /// Do not verify the proxy's certificate.
    #[arg(long)]
    insecure: bool,
    /// The proxy's pid: report its CPU seconds and peak RSS.
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// The UDP target's (echo's) pid: report its CPU seconds too (for a CPU budget of the
    /// whole path: client, proxy and target).
    #[arg(long)]
    target_pid: Option<u32>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Client runtime threads (1 = a single-threaded runtime; the open-loop pacer always has
    /// its own thread).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A name for progress lines and the JSON.
    #[arg(long)]
    label: Option<String>,
    /// Turn off UDP segmentation offload (GSO) on the client's sockets (with --direct: one
    /// system call per datagram sent).
    #[arg(long)]
    no_gso: bool,
    /// Turn off path-MTU discovery on the client's QUIC connections (packets stay at 1,200
    /// bytes: payloads over about 1,160 bytes then cannot be sent).
    #[arg(long)]
    no_pmtud: bool,
}

#[derive(Args, Clone)]
struct Traffic {
    /// Tunnels, spread evenly over the connections.
    #[arg(long, default_value_t = 1)]
    tunnels: usize,
    /// QUIC connections (UDP sockets with --direct).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// UDP payload bytes (at least 24).
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// CONNECT requests in flight per connection while the tunnels open.
    #[arg(long, default_value_t = 100)]
    open_concurrency: usize,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: Traffic,
    /// Open loop: datagrams per second over all tunnels.
    #[arg(long, conflicts_with = "window", required_unless_present = "window")]
    rate: Option<f64>,
    /// Closed loop: datagrams in flight per tunnel.
    #[arg(long)]
    window: Option<u32>,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of the same load first, not reported.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
}

#[derive(Args)]
struct SearchArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: Traffic,
    /// Highest loss fraction a rate may have (0.001 = 0.1%).
    #[arg(long, default_value_t = 0.001)]
    max_loss: f64,
    #[arg(long, default_value_t = 4000.0)]
    start_rate: f64,
    #[arg(long, default_value_t = 100.0)]
    min_rate: f64,
    #[arg(long, default_value_t = 1_000_000.0)]
    max_rate: f64,
    /// Seconds per trial.
    #[arg(long, default_value_t = 1.0)]
    trial_secs: f64,
    /// Stop bisecting when the bracket is narrower than this fraction.
    #[arg(long, default_value_t = 0.05)]
    precision: f64,
    #[arg(long, default_value_t = 16)]
    max_trials: usize,
}

#[derive(Args)]
struct TunnelsArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    #[arg(long, default_value_t = 10_000)]
    tunnels: usize,
    /// CONNECT requests in flight per connection.
    #[arg(long, default_value_t = 100)]
    open_concurrency: usize,
    /// Seconds to hold before each RSS reading.
    #[arg(long, default_value_t = 1.0)]
    hold_secs: f64,
    /// Also send one payload through every tunnel, then measure RSS again.
    #[arg(long)]
    ping: bool,
    #[arg(long, default_value_t = 1200)]
    size: usize,
}

#[derive(Args)]
struct ConnectionsArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open (one tunnel each).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Stop after this many seconds in any case.
    #[arg(long, default_value_t = 60.0)]
    max_secs: f64,
}

/// Every load stops by itself: durations and counts are capped.
const MAX_SECS: f64 = 3600.0;
const MAX_RATE: f64 = 10_000_000.0;

fn secs(v: f64, what: &str) -> Result<Duration, String> {
    if !(0.0..=MAX_SECS).contains(&v) {
        return Err(format!("{what} must be between 0 and {MAX_SECS} seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn proxy_options(c: &Common) -> Result<Option<h3client::ProxyOptions>, String> {
    if !c.target.ip().is_loopback() {
        return Err(format!(
            "--target {}: only loopback targets are allowed",
            c.target
        ));
    }
    let Some(proxy) = c.proxy else {
        return Ok(None);
    };
    if !proxy.ip().is_loopback() {
        return Err(format!(
            "--proxy {proxy}: only loopback proxies are allowed"
        ));
    }
    let ca_pem = if c.insecure {
        None
    } else {
        Some(std::fs::read_to_string(&c.ca).map_err(|e| format!("--ca {}: {e}", c.ca.display()))?)
    };
    Ok(Some(h3client::ProxyOptions {
        proxy,
        server_name: c.server_name.clone(),
        ca_pem,
        insecure: c.insecure,
        target: c.target,
        gso: !c.no_gso,
        pmtud: !c.no_pmtud,
    }))
}

fn mode(c: &Common) -> Result<setup::Mode, String> {
    match proxy_options(c)? {
        Some(o) if !c.direct => Ok(setup::Mode::Proxy(o)),
        _ => Ok(setup::Mode::Direct {
            target: c.target,
            gso: !c.no_gso,
        }),
    }
}

fn ports(c: &Common) -> (u16, Option<u16>) {
    (
        c.target.port(),
        c.proxy.filter(|_| !c.direct).map(|p| p.port()),
    )
}

fn label(c: &Common, m: &setup::Mode) -> String {
    c.label.clone().unwrap_or_else(|| m.name().to_string())
}

async fn ready(m: &setup::Mode, t: &Traffic, quiet: bool) -> Result<setup::Ready, String> {
    if t.size < lanes::HEADER_LEN || t.size > 65_527 {
        return Err(format!(
            "--size must be between {} and 65527",
            lanes::HEADER_LEN
        ));
    }
    if t.tunnels == 0 || t.connections == 0 || t.tunnels < t.connections {
        return Err("need at least one tunnel per connection".into());
    }
    let r = match m {
        setup::Mode::Proxy(o) => {
            let opened = setup::open_proxy(o, t.connections, t.tunnels, t.open_concurrency).await?;
            setup::ready_proxy(opened, t.size).await?
        }
        setup::Mode::Direct { target, gso } => {
            setup::ready_direct(*target, t.connections, t.tunnels, t.size, *gso).await?
        }
    };
    if !quiet {
        let i = &r.info;
        eprintln!(
            "  ready: {} {} connection(s), {} tunnel(s), {}-byte payloads, \
             max_datagram_size {:?} (MTU wait {:.0} ms, probes {:.0} ms)",
            i.mode,
            i.connections,
            i.tunnels,
            i.payload_bytes,
            i.max_datagram_size,
            i.mtu_wait_ms,
            i.probe_ms
        );
    }
    Ok(r)
}

#[derive(Serialize)]
struct Output<'a, T: Serialize> {
    command: &'static str,
    label: &'a str,
    setup: Option<&'a setup::SetupInfo>,
    result: &'a T,
}

fn emit<T: Serialize>(
    json: bool,
    command: &'static str,
    label: &str,
    setup: Option<&setup::SetupInfo>,
    result: &T,
    human: impl FnOnce() -> String,
) -> Result<(), String> {
    if json {
        let out = Output {
            command,
            label,
            setup,
            result,
        };
        println!(
            "{}",
            serde_json::to_string(&out).map_err(|e| e.to_string())?
        );
    } else {
        println!("{}", human());
    }
    Ok(())
}

async fn load(a: LoadArgs) -> Result<(), String> {
    let m = mode(&a.common)?;
    let label = label(&a.common, &m);
    let load = match (a.rate, a.window) {
        (Some(r), _) if r > 0.0 && r <= MAX_RATE => run::Load::Rate(r),
        (_, Some(w)) if (1..=10_000).contains(&w) => run::Load::Window(w),
        _ => {
            return Err(format!(
                "--rate must be in (0, {MAX_RATE}], --window in 1..=10000"
            ))
        }
    };
    let r = ready(&m, &a.traffic, a.common.quiet).await?;
    let mut ctx = run::Ctx::new(
        label.clone(),
        a.common.proxy_pid,
        a.common.quiet,
        ports(&a.common),
    );
    ctx.target_pid = a.common.target_pid;
    if a.warmup > 0.0 {
        let w = run::trial(&r, &mut ctx, load, secs(a.warmup, "--warmup")?).await;
        if !ctx.quiet {
            eprintln!("{}", w.line(&format!("[{label} warm-up]")));
        }
    }
    let t = run::trial(&r, &mut ctx, load, secs(a.duration, "--duration")?).await;
    let out = emit(a.common.json, "load", &label, Some(&r.info), &t, || {
        t.line(&format!("[{label}]"))
    });
    r.shutdown().await;
    out
}

async fn search(a: SearchArgs) -> Result<(), String> {
    let m = mode(&a.common)?;
    let label = label(&a.common, &m);
    if !(a.min_rate > 0.0 && a.min_rate <= a.start_rate && a.start_rate <= a.max_rate)
        || a.max_rate > MAX_RATE
    {
        return Err("need 0 < --min-rate <= --start-rate <= --max-rate <= 1e7".into());
    }
    let r = ready(&m, &a.traffic, a.common.quiet).await?;
    let mut ctx = run::Ctx::new(
        label.clone(),
        a.common.proxy_pid,
        a.common.quiet,
        ports(&a.common),
    );
    ctx.target_pid = a.common.target_pid;
    let p = run::SearchParams {
        max_loss: a.max_loss,
        start_dps: a.start_rate,
        min_dps: a.min_rate,
        max_dps: a.max_rate,
        precision: a.precision,
        max_trials: a.max_trials.min(100),
        trial: secs(a.trial_secs, "--trial-secs")?,
        pause: Duration::from_millis(200),
    };
    let s = run::search(&r, &mut ctx, &p).await;
    let out = emit(
        a.common.json,
        "search",
        &label,
        Some(&r.info),
        &s,
        || match &s.best {
            Some(b) => format!(
                "[{label}] highest rate with loss <= {}%: {}\n{}",
                s.max_loss * 100.0,
                report::si(b.delivered_dps),
                b.line(&format!("[{label} best]"))
            ),
            None => format!(
                "[{label}] no rate down to {} had loss <= {}%",
                a.min_rate,
                s.max_loss * 100.0
            ),
        },
    );
    r.shutdown().await;
    out
}

async fn tunnels(a: TunnelsArgs) -> Result<(), String> {
    let opts = proxy_options(&a.common)?.ok_or("tunnels needs --proxy")?;
    let label = a.common.label.clone().unwrap_or_else(|| "proxy".into());
    if a.tunnels > 1_000_000 || a.connections == 0 || a.connections > 10_000 {
        return Err("--tunnels at most 1,000,000 over 1..=10,000 connections".into());
    }
    let r = conns::tunnels(
        &opts,
        a.connections,
        a.tunnels,
        a.open_concurrency,
        secs(a.hold_secs, "--hold-secs")?,
        a.ping,
        a.size.max(lanes::HEADER_LEN),
        a.common.proxy_pid,
        a.common.quiet,
    )
    .await?;
    emit(a.common.json, "tunnels", &label, None, &r, || {
        format!(
            "[{label}] {} tunnels over {} connections: {}/s, set-up p50 {:.0}us p99 {:.0}us; \
             RSS per idle tunnel {:?} KiB, after one datagram {:?} KiB",
            r.open.tunnels,
            r.connections,
            report::si(r.open.per_second),
            r.open.latency_us.p50,
            r.open.latency_us.p99,
            r.idle.as_ref().and_then(|s| s.growth_per_tunnel_kib),
            r.after_one_datagram
                .as_ref()
                .and_then(|s| s.growth_per_tunnel_kib),
        )
    })
}

async fn connections(a: ConnectionsArgs) -> Result<(), String> {
    let opts = proxy_options(&a.common)?.ok_or("connections needs --proxy")?;
    let label = a.common.label.clone().unwrap_or_else(|| "proxy".into());
    if a.count > 1_000_000 {
        return Err("--count at most 1,000,000".into());
    }
    let r = conns::connections(
        &opts,
        a.count,
        a.concurrency.clamp(1, 1000),
        secs(a.max_secs, "--max-secs")?,
        a.common.proxy_pid,
        a.common.quiet,
    )
    .await?;
    emit(a.common.json, "connections", &label, None, &r, || {
        format!(
            "[{label}] {} of {} connections with one tunnel in {:.2}s: {}/s; \
             handshake p50 {:.0}us, connection+tunnel p50 {:.0}us p99 {:.0}us{}",
            r.succeeded,
            r.attempted,
            r.seconds,
            report::si(r.per_second),
            r.handshake_us.p50,
            r.connection_and_tunnel_us.p50,
            r.connection_and_tunnel_us.p99,
            r.first_error
                .as_deref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        )
    })
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lanes::now_ns();
    let result = match cli.cmd {
        Cmd::Echo {
            listen,
            threads,
            max_secs,
        } => secs(max_secs, "--max-secs").and_then(|d| echo::run(listen, threads, d)),
        Cmd::QuicEcho {
            listen,
            cert,
            key,
            max_secs,
            relay,
        } => {
            secs(max_secs, "--max-secs").and_then(|d| quicecho::run(listen, &cert, &key, d, relay))
        }
        Cmd::UdpCost {
            flows,
            size,
            datagrams,
            json,
        } => udpcost::run(flows, size, datagrams).and_then(|c| {
            if json {
                let line = serde_json::to_string(&c).map_err(|e| e.to_string())?;
                println!("{line}");
            } else {
                let n = &c.ns_per_datagram;
                println!(
                    "{} flows, {} B, {} datagrams: proxy {:.0} ns (send {:.0} + recv {:.0}), \
                     target {:.0} ns (recv {:.0} + send {:.0}) per datagram; {:.2} s wall, \
                     {} s CPU",
                    c.flows,
                    c.payload_bytes,
                    c.datagrams,
                    c.proxy_ns,
                    n.proxy_send,
                    n.proxy_recv,
                    c.target_ns,
                    n.target_recv,
                    n.target_send,
                    c.wall_s,
                    c.cpu_s.map_or("?".into(), |s| format!("{s:.2}")),
                );
            }
            Ok(())
        }),
        Cmd::Load(a) => runtime(a.common.threads).and_then(|rt| rt.block_on(load(a))),
        Cmd::Search(a) => runtime(a.common.threads).and_then(|rt| rt.block_on(search(a))),
        Cmd::Tunnels(a) => runtime(a.common.threads).and_then(|rt| rt.block_on(tunnels(a))),
        Cmd::Connections(a) => runtime(a.common.threads).and_then(|rt| rt.block_on(connections(a))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
