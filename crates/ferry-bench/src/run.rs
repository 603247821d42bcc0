//! Trials (open loop at a fixed rate, or closed loop with a window) and the rate search.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lanes::{Lane, LaneCounts, Scratch};
use crate::procstat;
use crate::report::{self, Trial};
use crate::setup::Ready;

/// Largest burst the pacer sends before it looks at the clock again.
const MAX_BURST: u64 = 64;

#[derive(Debug, Clone)]
pub struct Ctx {
    pub label: String,
    pub proxy_pid: Option<u32>,
    /// The target's pid, for its CPU seconds (`Trial::target`).
    pub target_pid: Option<u32>,
    pub quiet: bool,
    /// How long the pacer sleeps at most between bursts.
    pub pace_tick: Duration,
    /// After sending stops, how long to wait for the last echoes.
    pub drain: Duration,
    /// The target's UDP port and the proxy's (for kernel drop counts).
    pub ports: (u16, Option<u16>),
    epoch: u32,
}

impl Ctx {
    pub fn new(
        label: String,
        proxy_pid: Option<u32>,
        quiet: bool,
        ports: (u16, Option<u16>),
    ) -> Ctx {
        Ctx {
            label,
            proxy_pid,
            target_pid: None,
            quiet,
            ports,
            pace_tick: Duration::from_micros(200),
            drain: Duration::from_millis(500),
            epoch: 0,
        }
    }

    fn progress(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Datagrams per second over all tunnels, spread round robin.
    Rate(f64),
    /// Datagrams in flight per tunnel.
    Window(u32),
}

fn totals(lanes: &[Arc<Lane>]) -> Vec<LaneCounts> {
    lanes.iter().map(|l| l.counts()).collect()
}

fn sum(c: &[LaneCounts]) -> LaneCounts {
    let mut t = LaneCounts::default();
    for x in c {
        t.sent += x.sent;
        t.recv += x.recv;
        t.late += x.late;
        t.malformed += x.malformed;
        t.misrouted += x.misrouted;
        t.send_errors += x.send_errors;
    }
    t
}

/// Run one trial of `load` for `duration` on `ready`'s lanes.
pub async fn trial(ready: &Ready, ctx: &mut Ctx, load: Load, duration: Duration) -> Trial {
    ctx.epoch = ctx.epoch.wrapping_add(1).max(1);
    let epoch = ctx.epoch;
    let lanes = &ready.lanes;
    for l in lanes {
        l.begin_epoch(epoch);
    }
    let frames_before: Vec<Option<u64>> = lanes.iter().map(|l| l.counts().frames_tx).collect();
    let quic_before = quic_path(lanes, None);
    let (target_port, proxy_port) = ctx.ports;
    let drops_before = (
        procstat::udp_drops(target_port),
        proxy_port.and_then(procstat::udp_drops),
    );
    if let Some(pid) = ctx.proxy_pid {
        procstat::reset_peak(pid);
    }
    let proxy_before = ctx.proxy_pid.and_then(|p| procstat::read(Some(p)));
    let client_before = procstat::read(None);
    let target_before = ctx.target_pid.and_then(|p| procstat::read(Some(p)));
    let start = Instant::now();

    let sending = match load {
        Load::Rate(rate) => {
            let lanes = lanes.clone();
            let tick = ctx.pace_tick;
            tokio::task::spawn_blocking(move || pace(&lanes, epoch, rate, duration, tick))
        }
        Load::Window(w) => {
            let lanes = lanes.clone();
            tokio::spawn(async move { closed_loop(&lanes, epoch, w, duration).await })
        }
    };
    tokio::pin!(sending);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last = (Instant::now(), LaneCounts::default());
    let send_secs = loop {
        tokio::select! {
            r = &mut sending => break r.unwrap_or(0.0),
            _ = tick.tick() => {
                let now = sum(&totals(lanes));
                let dt = last.0.elapsed().as_secs_f64().max(1e-9);
                let p99 = lanes
                    .iter()
                    .filter_map(|l| l.hist.lock().ok().map(|h| h.value_at_quantile(0.99)))
                    .max()
                    .unwrap_or(0);
                let proxy = ctx
                    .proxy_pid
                    .and_then(|p| procstat::read(Some(p)))
                    .map(|s| format!(" proxy rss {} MiB", s.rss_kib / 1024))
                    .unwrap_or_default();
                ctx.progress(&format!(
                    "  [{} {:>5.1}s] sent {}/s recv {}/s unanswered {:.3}% p99 {:.0}us{proxy}",
                    ctx.label,
                    start.elapsed().as_secs_f64(),
                    report::si((now.sent - last.1.sent) as f64 / dt),
                    report::si((now.recv - last.1.recv) as f64 / dt),
                    100.0 * now.sent.saturating_sub(now.recv) as f64 / now.sent.max(1) as f64,
                    p99 as f64 / 1e3,
                ));
                last = (Instant::now(), now);
            }
        }
    };
    for l in lanes {
        l.window.store(0, Ordering::Relaxed);
    }
    // Drain: wait for the last echoes (bounded).
    let drain_start = Instant::now();
    loop {
        let c = sum(&totals(lanes));
        if c.recv + c.send_errors >= c.sent || drain_start.elapsed() >= ctx.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let proxy_after = ctx.proxy_pid.and_then(|p| procstat::read(Some(p)));
    let client_after = procstat::read(None);
    let target_after = ctx.target_pid.and_then(|p| procstat::read(Some(p)));
    // Stop counting: whatever arrives from now on is late.
    for l in lanes {
        l.epoch.store(0, Ordering::Release);
    }

    let quic = quic_path(lanes, quic_before);
    let drops = |before: Option<u64>, after: Option<u64>| Some(after?.saturating_sub(before?));
    let kernel_drops_target = drops(drops_before.0, procstat::udp_drops(target_port));
    let kernel_drops_proxy_listener =
        drops(drops_before.1, proxy_port.and_then(procstat::udp_drops));
    let per_lane = totals(lanes);
    let c = sum(&per_lane);
    let mut client_dropped = None;
    for (l, before) in per_lane.iter().zip(frames_before.iter()) {
        if let (Some(a), Some(b)) = (l.frames_tx, before) {
            let transmitted = a.saturating_sub(*b);
            let handed = l.sent.saturating_sub(l.send_errors);
            *client_dropped.get_or_insert(0) += handed.saturating_sub(transmitted);
        }
    }
    let mut hist: Option<hdrhistogram::Histogram<u64>> = None;
    for l in lanes {
        if let Ok(h) = l.hist.lock() {
            match &mut hist {
                Some(all) => {
                    let _ = all.add(&*h);
                }
                None => hist = Some(h.clone()),
            }
        }
    }
    let per_tunnel: Vec<u64> = lanes
        .iter()
        .flat_map(|l| l.tunnels.iter().map(|t| t.recv.load(Ordering::Relaxed)))
        .collect();
    let secs = send_secs.max(1e-9);
    let lost = c.sent.saturating_sub(c.recv);
    let payload_bits = (ready.info.payload_bytes * 8) as f64;
    let offered = c.sent as f64 / secs;
    let (target_dps, window) = match load {
        Load::Rate(r) => (Some(r), None),
        Load::Window(w) => (None, Some(w)),
    };
    Trial {
        loop_kind: match load {
            Load::Rate(_) => "open",
            Load::Window(_) => "closed",
        },
        target_dps,
        window,
        seconds: send_secs,
        sent: c.sent,
        received: c.recv,
        lost,
        loss: if c.sent > 0 {
            lost as f64 / c.sent as f64
        } else {
            0.0
        },
        offered_dps: offered,
        delivered_dps: c.recv as f64 / secs,
        delivered_mbps: c.recv as f64 * payload_bits / secs / 1e6,
        rtt_us: hist.as_ref().map(report::percentiles).unwrap_or_default(),
        fairness: report::fairness(&per_tunnel, secs),
        late: c.late,
        malformed: c.malformed,
        misrouted: c.misrouted,
        send_errors: c.send_errors,
        first_send_error: lanes
            .iter()
            .find_map(|l| l.first_error.lock().ok().and_then(|mut e| e.take())),
        client_dropped,
        client_limited: target_dps.is_some_and(|t| offered < 0.97 * t),
        ok: None,
        proxy: procstat::usage(proxy_before, proxy_after, wall),
        client: procstat::usage(client_before, client_after, wall),
        target: procstat::usage(target_before, target_after, wall),
        quic,
        kernel_drops_target,
        kernel_drops_proxy_listener,
    }
}

/// The QUIC connections' own counters, as a difference from `before` when given.
fn quic_path(lanes: &[Arc<Lane>], before: Option<report::QuicPath>) -> Option<report::QuicPath> {
    let mut p: Option<report::QuicPath> = None;
    for l in lanes {
        let crate::lanes::Io::Quic(conn) = &l.io else {
            continue;
        };
        let s = conn.stats();
        let q = p.get_or_insert(report::QuicPath {
            cwnd_bytes: u64::MAX,
            ..Default::default()
        });
        q.lost_packets += s.path.lost_packets;
        q.congestion_events += s.path.congestion_events;
        q.sent_packets += s.path.sent_packets;
        q.udp_tx_datagrams += s.udp_tx.datagrams;
        q.udp_rx_datagrams += s.udp_rx.datagrams;
        q.rtt_us = q.rtt_us.max(s.path.rtt.as_secs_f64() * 1e6);
        q.cwnd_bytes = q.cwnd_bytes.min(s.path.cwnd);
    }
    if let (Some(q), Some(b)) = (p.as_mut(), before) {
        q.lost_packets -= b.lost_packets.min(q.lost_packets);
        q.congestion_events -= b.congestion_events.min(q.congestion_events);
        q.sent_packets -= b.sent_packets.min(q.sent_packets);
        q.udp_tx_datagrams -= b.udp_tx_datagrams.min(q.udp_tx_datagrams);
        q.udp_rx_datagrams -= b.udp_rx_datagrams.min(q.udp_rx_datagrams);
    }
    p
}

/// Open loop: send `rate` datagrams/s round robin over every tunnel of every lane for
/// `duration`, on a dedicated thread with sub-millisecond pacing. Returns the seconds spent.
fn pace(lanes: &[Arc<Lane>], epoch: u32, rate: f64, duration: Duration, tick: Duration) -> f64 {
    // Interleave lanes so consecutive datagrams go to different connections.
    let most = lanes.iter().map(|l| l.tunnels.len()).max().unwrap_or(0);
    let mut order = Vec::new();
    for t in 0..most {
        for (li, l) in lanes.iter().enumerate() {
            if t < l.tunnels.len() {
                order.push((li, t));
            }
        }
    }
    if order.is_empty() || rate <= 0.0 {
        return 0.0;
    }
    let mut scratch = Scratch::default();
    // Direct lanes send a burst as GSO batches; QUIC lanes hand each datagram to quinn,
    // which batches on its own.
    let direct: Vec<bool> = lanes
        .iter()
        .map(|l| matches!(l.io, crate::lanes::Io::Udp { .. }))
        .collect();
    let mut pending: Vec<Vec<usize>> = lanes.iter().map(|_| Vec::new()).collect();
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut i = 0usize;
    loop {
        let el = start.elapsed();
        if el >= duration {
            break;
        }
        // Datagram k is due at k / rate seconds.
        let due = (el.as_secs_f64() * rate) as u64 + 1;
        let mut burst = 0;
        while sent < due && burst < MAX_BURST {
            if let Some(&(li, t)) = order.get(i) {
                match (lanes.get(li), direct.get(li), pending.get_mut(li)) {
                    (Some(_), Some(true), Some(p)) => p.push(t),
                    (Some(l), _, _) => {
                        l.send(t, epoch, &mut scratch);
                    }
                    _ => {}
                }
            }
            i += 1;
            if i == order.len() {
                i = 0;
            }
            sent += 1;
            burst += 1;
        }
        for (l, p) in lanes.iter().zip(pending.iter_mut()) {
            if !p.is_empty() {
                l.send_batch(p, epoch, &mut scratch);
                p.clear();
            }
        }
        if sent >= due {
            let next = Duration::from_secs_f64(sent as f64 / rate);
            let wait = next.saturating_sub(start.elapsed()).min(tick);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
    }
    start.elapsed().as_secs_f64()
}

/// Closed loop: every tunnel keeps `window` datagrams in flight (the reader sends the next
/// one as each echo arrives); a tunnel stuck for 50 ms has its window refilled.
async fn closed_loop(lanes: &[Arc<Lane>], epoch: u32, window: u32, duration: Duration) -> f64 {
    let mut scratch = Scratch::default();
    for l in lanes {
        l.window.store(window, Ordering::Relaxed);
    }
    let start = Instant::now();
    while start.elapsed() < duration {
        for l in lanes {
            l.refill_stalled(epoch, Duration::from_millis(50), &mut scratch);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for l in lanes {
        l.window.store(0, Ordering::Relaxed);
    }
    start.elapsed().as_secs_f64()
}

#[derive(Debug, Clone)]
pub struct SearchParams {
    /// Highest loss (fraction) a rate may have to count.
    pub max_loss: f64,
    pub start_dps: f64,
    pub min_dps: f64,
    pub max_dps: f64,
    /// Stop when the bracket is narrower than this fraction of its low end.
    pub precision: f64,
    pub max_trials: usize,
    pub trial: Duration,
    pub pause: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Search {
    pub max_loss: f64,
    /// The highest target rate that passed, and that trial.
    pub best_target_dps: Option<f64>,
    pub best: Option<Trial>,
    /// The lowest rate that failed.
    pub first_fail_dps: Option<f64>,
    pub trials: Vec<Trial>,
}

/// Find the highest rate with loss at or under `max_loss`: double from `start_dps` until a
/// rate fails (or halve until one passes), then bisect.
pub async fn search(ready: &Ready, ctx: &mut Ctx, p: &SearchParams) -> Search {
    let mut trials: Vec<Trial> = Vec::new();
    let mut lo: Option<f64> = None;
    let mut hi: Option<f64> = None;
    let mut best: Option<Trial> = None;

    let mut rate = p.start_dps;
    loop {
        if trials.len() >= p.max_trials {
            break;
        }
        let mut t = trial(ready, ctx, Load::Rate(rate), p.trial).await;
        let ok = t.loss <= p.max_loss && !t.client_limited && t.sent > 0;
        t.ok = Some(ok);
        ctx.progress(&t.line(&format!("[{}]", ctx.label)));
        if ok {
            if lo.is_none_or(|l| rate > l) {
                lo = Some(rate);
                best = Some(t.clone());
            }
        } else if hi.is_none_or(|h| rate < h) {
            hi = Some(rate);
        }
        trials.push(t);
        tokio::time::sleep(p.pause).await;
        ready.quiesce(Duration::from_secs(5)).await;
        rate = match (lo, hi) {
            (Some(l), None) => {
                if l >= p.max_dps {
                    break;
                }
                (l * 2.0).min(p.max_dps)
            }
            (None, Some(h)) => {
                let next = h / 2.0;
                if next < p.min_dps {
                    break;
                }
                next
            }
            (Some(l), Some(h)) => {
                if h <= l || (h - l) / l <= p.precision {
                    break;
                }
                (l + h) / 2.0
            }
            (None, None) => break,
        };
    }
    Search {
        max_loss: p.max_loss,
        best_target_dps: lo,
        best,
        first_fail_dps: hi,
        trials,
    }
}
