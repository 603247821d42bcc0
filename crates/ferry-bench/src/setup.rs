//! Building lanes: QUIC connections with their CONNECT-UDP tunnels, or plain UDP sockets for
//! `--direct`; waiting until every tunnel carries a full-size payload both ways.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::h3client::{self, ClientStream, H3Conn, ProxyOptions};
use crate::lanes::{self, Io, Lane, Scratch, Tunnel};
use crate::report::{self, Percentiles};

/// How long to wait for path-MTU discovery and for the first echo of every tunnel.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the lanes are made of.
#[derive(Debug, Clone)]
pub enum Mode {
    Proxy(ProxyOptions),
    Direct { target: SocketAddr, gso: bool },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Proxy(_) => "proxy",
            Mode::Direct { .. } => "direct",
        }
    }
}

/// Connections with their open tunnels, before any datagram flows.
pub struct Opened {
    pub conns: Vec<(quinn::Endpoint, H3Conn, Vec<ClientStream>)>,
    pub connect_s: f64,
    pub open: OpenStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenStats {
    pub tunnels: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Tunnels opened per second on connections that already existed.
    pub per_second: f64,
    /// From sending the CONNECT request to its 2xx response.
    pub latency_us: Percentiles,
}

/// Lanes ready to carry traffic, with readers running.
pub struct Ready {
    pub lanes: Vec<Arc<Lane>>,
    pub info: SetupInfo,
    readers: Vec<tokio::task::JoinHandle<()>>,
    // Kept so the tunnels and connections stay open while the lanes are in use.
    _streams: Vec<ClientStream>,
    _endpoints: Vec<quinn::Endpoint>,
    // h3 closes a connection when its last SendRequest is dropped.
    _send_requests: Vec<h3client::SendRequest>,
}

impl Ready {
    /// Close every connection and wait (bounded) until the proxy has been told, so no
    /// tunnel is left open on the proxy after the bench exits.
    pub async fn shutdown(mut self) {
        for r in &self.readers {
            r.abort();
        }
        for l in &self.lanes {
            if let Io::Quic(c) = &l.io {
                c.close(quinn::VarInt::from_u32(0), b"bench done");
            }
        }
        wait_idle(std::mem::take(&mut self._endpoints)).await;
    }

    /// Wait until echoes stop arriving (at most `max`): after an overload, the proxy's
    /// queues may hold seconds of datagrams that would otherwise spill into the next trial.
    pub async fn quiesce(&self, max: Duration) -> Duration {
        let start = Instant::now();
        let late = || -> u64 {
            self.lanes
                .iter()
                .map(|l| l.late.load(Ordering::Relaxed))
                .sum()
        };
        let mut last = late();
        while start.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = late();
            if now == last {
                break;
            }
            last = now;
        }
        start.elapsed()
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        for l in &self.lanes {
            if let Io::Quic(c) = &l.io {
                c.close(quinn::VarInt::from_u32(0), b"bench done");
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupInfo {
    pub mode: &'static str,
    pub connections: usize,
    pub tunnels: usize,
    pub payload_bytes: usize,
    /// The smallest `max_datagram_size` over the QUIC connections once path-MTU discovery
    /// allowed the payload (QUIC DATAGRAM frame payload bytes); `None` when direct.
    pub max_datagram_size: Option<usize>,
    pub mtu_wait_ms: f64,
    /// Until every tunnel had echoed a full-size probe.
    pub probe_ms: f64,
    pub connect_s: f64,
    pub open: Option<OpenStats>,
}

/// Open `connections` QUIC connections (each its own endpoint and socket) and spread
/// `tunnels` CONNECT-UDP tunnels over them, at most `concurrency` requests in flight per
/// connection.
pub async fn open_proxy(
    opts: &ProxyOptions,
    connections: usize,
    tunnels: usize,
    concurrency: usize,
) -> Result<Opened, String> {
    let start = Instant::now();
    let mut set = JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    for i in 0..connections {
        let opts = opts.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let ep = h3client::endpoint(&opts)?;
            let c = h3client::connect(&ep, &opts).await?;
            Ok::<_, String>((i, ep, c))
        });
    }
    let mut conns = Vec::new();
    while let Some(r) = set.join_next().await {
        conns.push(r.map_err(|e| e.to_string())??);
    }
    conns.sort_by_key(|(i, _, _)| *i);
    let connect_s = start.elapsed().as_secs_f64();

    let refs: Vec<&H3Conn> = conns.iter().map(|(_, _, c)| c).collect();
    let (open, streams) = open_tunnels(&refs, opts, tunnels, concurrency).await?;
    let mut streams = streams.into_iter();
    let conns = conns
        .into_iter()
        .map(|(_, ep, c)| (ep, c, streams.next().unwrap_or_default()))
        .collect();
    Ok(Opened {
        conns,
        connect_s,
        open,
    })
}

/// Open `tunnels` tunnels spread over `conns`; returns the streams per connection.
pub async fn open_tunnels(
    conns: &[&H3Conn],
    opts: &ProxyOptions,
    tunnels: usize,
    concurrency: usize,
) -> Result<(OpenStats, Vec<Vec<ClientStream>>), String> {
    let n = conns.len().max(1);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (ci, c) in conns.iter().enumerate() {
        let count = tunnels / n + usize::from(ci < tunnels % n);
        let workers = concurrency.clamp(1, count.max(1));
        for w in 0..workers {
            let mine = count / workers + usize::from(w < count % workers);
            let mut send_request = c.send_request.clone();
            let opts = opts.clone();
            set.spawn(async move {
                // Latencies are kept as a list: one histogram per worker would cost
                // ~230 KiB each, and there can be 10,000 workers.
                let mut latencies = Vec::with_capacity(mine);
                let mut streams = Vec::with_capacity(mine);
                let mut errors = Vec::new();
                for _ in 0..mine {
                    let t0 = Instant::now();
                    match h3client::open_tunnel(&mut send_request, &opts).await {
                        Ok(s) => {
                            latencies.push(t0.elapsed());
                            streams.push(s);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                (ci, streams, latencies, errors)
            });
        }
    }
    let mut per_conn: Vec<Vec<ClientStream>> = (0..conns.len()).map(|_| Vec::new()).collect();
    let mut hist = lanes::new_histogram()?;
    let mut failed = 0;
    let mut first_error = None;
    while let Some(r) = set.join_next().await {
        let (ci, streams, latencies, errors) = r.map_err(|e| e.to_string())?;
        for d in latencies {
            record(&mut hist, d);
        }
        failed += errors.len();
        if first_error.is_none() {
            first_error = errors.into_iter().next();
        }
        if let Some(v) = per_conn.get_mut(ci) {
            v.extend(streams);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let opened: usize = per_conn.iter().map(Vec::len).sum();
    Ok((
        OpenStats {
            tunnels: opened,
            failed,
            first_error,
            seconds,
            per_second: if seconds > 0.0 {
                opened as f64 / seconds
            } else {
                0.0
            },
            latency_us: report::percentiles(&hist),
        },
        per_conn,
    ))
}

/// Wait (at most 2 s in all) until every endpoint has told its peers it is closing.
pub async fn wait_idle(endpoints: Vec<quinn::Endpoint>) {
    let mut set = JoinSet::new();
    for ep in endpoints {
        set.spawn(async move { ep.wait_idle().await });
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while set.join_next().await.is_some() {}
    })
    .await;
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

/// Turn opened connections into lanes: wait for path-MTU discovery to allow the payload,
/// start the readers, and probe every tunnel until it echoes.
pub async fn ready_proxy(opened: Opened, payload_len: usize) -> Result<Ready, String> {
    if opened.open.failed > 0 {
        return Err(format!(
            "{} of {} tunnels failed to open: {}",
            opened.open.failed,
            opened.open.failed + opened.open.tunnels,
            opened.open.first_error.as_deref().unwrap_or("")
        ));
    }
    let mut lanes = Vec::new();
    let mut all_streams = Vec::new();
    let mut endpoints = Vec::new();
    let mut send_requests = Vec::new();
    for (i, (ep, c, streams)) in opened.conns.into_iter().enumerate() {
        let id = u16::try_from(i).map_err(|_| "at most 65,536 connections")?;
        if streams.len() > usize::from(u16::MAX) {
            return Err("at most 65,535 tunnels per connection".into());
        }
        let tunnels = streams
            .iter()
            .map(|s| Tunnel::new(Some(s.id().into_inner())))
            .collect();
        lanes.push(Arc::new(Lane::new(
            id,
            Io::Quic(c.conn),
            tunnels,
            payload_len,
        )?));
        all_streams.extend(streams);
        endpoints.push(ep);
        send_requests.push(c.send_request);
    }
    let mut ready = Ready {
        lanes,
        info: SetupInfo {
            mode: "proxy",
            connections: endpoints.len(),
            tunnels: all_streams.len(),
            payload_bytes: payload_len,
            max_datagram_size: None,
            mtu_wait_ms: 0.0,
            probe_ms: 0.0,
            connect_s: opened.connect_s,
            open: Some(opened.open),
        },
        readers: Vec::new(),
        _streams: all_streams,
        _endpoints: endpoints,
        _send_requests: send_requests,
    };
    // quinn starts at 1,200-byte packets (1,162-byte DATAGRAM frames at most); path-MTU
    // discovery raises that within a few round trips on loopback.
    let start = Instant::now();
    let mut min_size = usize::MAX;
    for lane in &ready.lanes {
        let Io::Quic(conn) = &lane.io else { continue };
        let need = lane.tunnels.iter().map(|t| t.hdr_len).max().unwrap_or(0) + payload_len;
        loop {
            let size = conn.max_datagram_size().unwrap_or(0);
            if size >= need {
                min_size = min_size.min(size);
                break;
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "the connection's max_datagram_size stayed at {size} bytes; {need} needed \
                     for {payload_len}-byte payloads (path-MTU discovery did not raise it)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    ready.info.max_datagram_size = (min_size != usize::MAX).then_some(min_size);
    ready.info.mtu_wait_ms = start.elapsed().as_secs_f64() * 1e3;
    start_and_probe(&mut ready).await?;
    Ok(ready)
}

/// `connections` UDP sockets connected to the target, `tunnels` logical tunnels over them.
pub async fn ready_direct(
    target: SocketAddr,
    connections: usize,
    tunnels: usize,
    payload_len: usize,
    gso: bool,
) -> Result<Ready, String> {
    let n = connections.max(1);
    let mut lanes = Vec::new();
    for i in 0..n {
        let id = u16::try_from(i).map_err(|_| "at most 65,536 sockets")?;
        let count = tunnels / n + usize::from(i < tunnels % n);
        if count > usize::from(u16::MAX) {
            return Err("at most 65,535 tunnels per socket".into());
        }
        let s = h3client::udp_socket(h3client::loopback_for(target))
            .map_err(|e| format!("bind: {e}"))?;
        s.connect(target).map_err(|e| format!("connect: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let state = quinn_udp::UdpSocketState::new((&s).into()).map_err(|e| e.to_string())?;
        let sync = s.try_clone().map_err(|e| e.to_string())?;
        let socket = tokio::net::UdpSocket::from_std(s).map_err(|e| e.to_string())?;
        let tunnels = (0..count).map(|_| Tunnel::new(None)).collect();
        lanes.push(Arc::new(Lane::new(
            id,
            Io::Udp {
                sync,
                socket,
                state,
                target,
                gso,
            },
            tunnels,
            payload_len,
        )?));
    }
    let mut ready = Ready {
        lanes,
        info: SetupInfo {
            mode: "direct",
            connections: n,
            tunnels,
            payload_bytes: payload_len,
            max_datagram_size: None,
            mtu_wait_ms: 0.0,
            probe_ms: 0.0,
            connect_s: 0.0,
            open: None,
        },
        readers: Vec::new(),
        _streams: Vec::new(),
        _endpoints: Vec::new(),
        _send_requests: Vec::new(),
    };
    start_and_probe(&mut ready).await?;
    Ok(ready)
}

async fn start_and_probe(ready: &mut Ready) -> Result<(), String> {
    for lane in &ready.lanes {
        ready.readers.push(tokio::spawn(lane.clone().read_loop()));
    }
    let start = Instant::now();
    let mut scratch = Scratch::default();
    loop {
        let mut missing = 0usize;
        for lane in &ready.lanes {
            for (i, t) in lane.tunnels.iter().enumerate() {
                if !t.probed.load(Ordering::Relaxed) {
                    missing += 1;
                    lane.send_probe(i, &mut scratch);
                }
            }
        }
        if missing == 0 {
            break;
        }
        if start.elapsed() > READY_TIMEOUT {
            let c: Vec<_> = ready.lanes.iter().map(|l| l.counts()).collect();
            let frames: u64 = c.iter().filter_map(|c| c.frames_tx).sum();
            let errors: u64 = c.iter().map(|c| c.send_errors).sum();
            let odd: u64 = c.iter().map(|c| c.malformed + c.misrouted + c.late).sum();
            let first = ready
                .lanes
                .iter()
                .find_map(|l| l.first_error.lock().ok().and_then(|e| e.clone()))
                .unwrap_or_default();
            return Err(format!(
                "{missing} of {} tunnels never echoed a {}-byte probe within {:?} \
                 (max_datagram_size {:?}; {frames} DATAGRAM frames sent, {errors} sends \
                 refused {first}, {odd} unexpected echoes)",
                ready.info.tunnels,
                ready.info.payload_bytes,
                READY_TIMEOUT,
                ready.info.max_datagram_size
            ));
        }
        // Probes are cheap, but a thousand tunnels re-probed every few ms add up; wait
        // longer as the wait goes on.
        let wait = if start.elapsed() < Duration::from_millis(200) {
            20
        } else {
            100
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    ready.info.probe_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(())
}
