//! Set-up benchmarks: tunnels opened on existing connections (and what an idle tunnel costs
//! the proxy in memory), and new connections with one tunnel each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use crate::h3client::{self, ProxyOptions};
use crate::lanes;
use crate::procstat::{self, Usage};
use crate::report::{self, Percentiles};
use crate::setup::{self, OpenStats};

#[derive(Debug, Clone, Serialize)]
pub struct RssStep {
    pub tunnels_open: usize,
    pub proxy_rss_kib: u64,
    /// (this RSS - RSS with the connections alone) / tunnels, KiB.
    pub growth_per_tunnel_kib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelsResult {
    pub connections: usize,
    pub connect_s: f64,
    pub open: OpenStats,
    /// Proxy RSS with the connections open and no tunnel.
    pub baseline_rss_kib: Option<u64>,
    /// After every tunnel opened and sat idle for `hold` seconds.
    pub idle: Option<RssStep>,
    /// After one payload went through every tunnel and they sat idle again.
    pub after_one_datagram: Option<RssStep>,
    /// Why `after_one_datagram` is missing, when the payloads did not all come back.
    pub ping_error: Option<String>,
    pub proxy: Option<Usage>,
}

fn rss(pid: Option<u32>) -> Option<u64> {
    pid.and_then(|p| procstat::read(Some(p))).map(|s| s.rss_kib)
}

fn step(pid: Option<u32>, base: Option<u64>, tunnels: usize) -> Option<RssStep> {
    let now = rss(pid)?;
    Some(RssStep {
        tunnels_open: tunnels,
        proxy_rss_kib: now,
        growth_per_tunnel_kib: base.map(|b| (now as f64 - b as f64) / tunnels.max(1) as f64),
    })
}

/// Open `connections` connections, measure the proxy's RSS, open `tunnels` tunnels over them
/// (at most `concurrency` requests in flight per connection), hold them idle and measure
/// again; then send one `payload`-byte datagram through each, hold, and measure again.
#[allow(clippy::too_many_arguments)]
pub async fn tunnels(
    opts: &ProxyOptions,
    connections: usize,
    tunnels: usize,
    concurrency: usize,
    hold: Duration,
    ping: bool,
    payload: usize,
    proxy_pid: Option<u32>,
    quiet: bool,
) -> Result<TunnelsResult, String> {
    let say = |m: String| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    let before = proxy_pid.and_then(|p| procstat::read(Some(p)));
    let wall = Instant::now();
    let opened = setup::open_proxy(opts, connections, 0, 1).await?;
    say(format!(
        "  {} connections in {:.2}s",
        opened.conns.len(),
        opened.connect_s
    ));
    tokio::time::sleep(hold).await;
    let base = rss(proxy_pid);
    let refs: Vec<&h3client::H3Conn> = opened.conns.iter().map(|(_, c, _)| c).collect();
    let (open, streams) = setup::open_tunnels(&refs, opts, tunnels, concurrency).await?;
    say(format!(
        "  {} tunnels opened in {:.2}s: {}/s, latency p50 {:.0}us p99 {:.0}us ({} failed{})",
        open.tunnels,
        open.seconds,
        report::si(open.per_second),
        open.latency_us.p50,
        open.latency_us.p99,
        open.failed,
        open.first_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    ));
    tokio::time::sleep(hold).await;
    let idle = step(proxy_pid, base, open.tunnels);
    if let Some(s) = &idle {
        say(format!(
            "  idle: proxy RSS {} MiB, {:.1} KiB per tunnel",
            s.proxy_rss_kib / 1024,
            s.growth_per_tunnel_kib.unwrap_or(0.0)
        ));
    }
    let connect_s = opened.connect_s;
    let conns: Vec<_> = opened
        .conns
        .into_iter()
        .zip(streams)
        .map(|((ep, c, _), s)| (ep, c, s))
        .collect();
    let n_conns = conns.len();
    let mut after_one = None;
    let mut ping_error = None;
    if ping && open.failed == 0 {
        let ready = setup::ready_proxy(
            setup::Opened {
                conns,
                connect_s,
                open: open.clone(),
            },
            payload,
        )
        .await;
        let ready = match ready {
            Ok(r) => r,
            Err(e) => {
                say(format!("  one datagram through each tunnel failed: {e}"));
                ping_error = Some(e);
                let after = proxy_pid.and_then(|p| procstat::read(Some(p)));
                return Ok(TunnelsResult {
                    connections: n_conns,
                    connect_s,
                    open,
                    baseline_rss_kib: base,
                    idle,
                    after_one_datagram: None,
                    ping_error,
                    proxy: procstat::usage(before, after, wall.elapsed().as_secs_f64()),
                });
            }
        };
        tokio::time::sleep(hold).await;
        after_one = step(proxy_pid, base, ready.info.tunnels);
        if let Some(s) = &after_one {
            say(format!(
                "  after one datagram each: proxy RSS {} MiB, {:.1} KiB per tunnel",
                s.proxy_rss_kib / 1024,
                s.growth_per_tunnel_kib.unwrap_or(0.0)
            ));
        }
        ready.shutdown().await;
    } else {
        for (_, c, _) in &conns {
            c.conn.close(quinn::VarInt::from_u32(0), b"bench done");
        }
        setup::wait_idle(conns.into_iter().map(|(ep, _, _)| ep).collect()).await;
    }
    let after = proxy_pid.and_then(|p| procstat::read(Some(p)));
    Ok(TunnelsResult {
        connections: n_conns,
        connect_s,
        open,
        baseline_rss_kib: base,
        idle,
        after_one_datagram: after_one,
        ping_error,
        proxy: procstat::usage(before, after, wall.elapsed().as_secs_f64()),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsResult {
    pub attempted: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub concurrency: usize,
    pub seconds: f64,
    /// New connections, each with one open tunnel, per second.
    pub per_second: f64,
    /// QUIC handshake and HTTP/3 set-up.
    pub handshake_us: Percentiles,
    /// From the start of the connection to the tunnel's 2xx.
    pub connection_and_tunnel_us: Percentiles,
    pub proxy: Option<Usage>,
    pub client: Option<Usage>,
}

/// Open `count` new connections, each with one tunnel, `concurrency` at a time; each is
/// closed as soon as its tunnel is open. Stops after `max_time` in any case.
pub async fn connections(
    opts: &ProxyOptions,
    count: usize,
    concurrency: usize,
    max_time: Duration,
    proxy_pid: Option<u32>,
    quiet: bool,
) -> Result<ConnectionsResult, String> {
    let ep = h3client::endpoint(opts)?;
    let next = Arc::new(AtomicUsize::new(0));
    let proxy_before = proxy_pid.and_then(|p| procstat::read(Some(p)));
    let client_before = procstat::read(None);
    let start = Instant::now();
    let deadline = start + max_time;
    let mut set = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let ep = ep.clone();
        let opts = opts.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut hs = lanes::new_histogram()?;
            let mut total = lanes::new_histogram()?;
            let mut ok = 0usize;
            let mut errors = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                let t0 = Instant::now();
                let r = async {
                    let mut c = h3client::connect(&ep, &opts).await?;
                    let hs_time = c.handshake;
                    let stream = h3client::open_tunnel(&mut c.send_request, &opts).await?;
                    let all = t0.elapsed();
                    drop(stream);
                    c.conn.close(quinn::VarInt::from_u32(0), b"done");
                    Ok::<_, String>((hs_time, all))
                };
                match tokio::time::timeout(Duration::from_secs(10), r).await {
                    Ok(Ok((h, all))) => {
                        setup::record(&mut hs, h);
                        setup::record(&mut total, all);
                        ok += 1;
                    }
                    Ok(Err(e)) => errors.push(e),
                    Err(_) => errors.push("timed out after 10s".into()),
                }
            }
            Ok::<_, String>((ok, errors, hs, total))
        });
    }
    let progress = (!quiet).then(|| {
        let next = next.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let started = next.load(Ordering::Relaxed).min(count);
                eprintln!(
                    "  [{:>5.1}s] {started} connections started",
                    start.elapsed().as_secs_f64()
                );
            }
        })
    });
    let mut hs = lanes::new_histogram()?;
    let mut total = lanes::new_histogram()?;
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    while let Some(r) = set.join_next().await {
        let (o, errors, h, t) = r.map_err(|e| e.to_string())??;
        ok += o;
        failed += errors.len();
        if first_error.is_none() {
            first_error = errors.into_iter().next();
        }
        let _ = hs.add(&h);
        let _ = total.add(&t);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let seconds = start.elapsed().as_secs_f64();
    let proxy_after = proxy_pid.and_then(|p| procstat::read(Some(p)));
    let client_after = procstat::read(None);
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    Ok(ConnectionsResult {
        attempted: ok + failed,
        succeeded: ok,
        failed,
        first_error,
        concurrency,
        seconds,
        per_second: ok as f64 / seconds.max(1e-9),
        handshake_us: report::percentiles(&hs),
        connection_and_tunnel_us: report::percentiles(&total),
        proxy: procstat::usage(proxy_before, proxy_after, seconds),
        client: procstat::usage(client_before, client_after, seconds),
    })
}
