//! Building and running a server from a validated bootstrap: bind everything first (so
//! errors surface before anything is served and tests can bind port 0), then serve until
//! shutdown.
//!
//! Drain (SIGTERM, or the admin's `POST /drain_listeners`): every listener refuses new
//! QUIC connections and sends GOAWAY on each open one; open tunnels keep working. After a
//! SIGTERM the server exits once the last connection has closed, or when `--drain-time-s`
//! has passed (then the remaining tunnels are closed), whichever comes first.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_config::{Bootstrap, CodecType, SocketProtocol};
use tokio::task::JoinSet;

use crate::accesslog::{AccessLogs, Destinations};
use crate::admin::AdminServer;
use crate::cluster::ClusterManager;
use crate::h3server::{H3Listener, ListenerCtx};
use crate::shutdown::{ConnectionCount, Drain, Shutdown, Signal};
use crate::stats::{listener_stat_name, ClusterStatsMap, HttpStats, ServerStats, Store};
use crate::tcpserver::TcpListener;

/// How long start-up waits for the first DNS answers before serving anyway.
const INITIAL_DNS_WAIT: Duration = Duration::from_secs(10);

/// Envoy's stats flush interval: histograms start a new "interval" this often.
const STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How long exit waits for the access log writers to write out what is queued.
const ACCESS_LOG_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// One bound listener, as the admin endpoint reports it.
#[derive(Debug, Clone)]
pub struct BoundListener {
    pub name: String,
    pub local_addr: SocketAddr,
    pub protocol: SocketProtocol,
}

/// Process options that are not in the bootstrap (the command line).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `--drain-time-s`: how long a drain waits for open tunnels (Envoy's default: 600 s).
    pub drain_time: Duration,
    /// For `/server_info`.
    pub concurrency: Option<usize>,
    pub config_path: Option<String>,
    pub log_level: String,
    pub admin_address_path: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            drain_time: Duration::from_secs(600),
            concurrency: None,
            config_path: None,
            log_level: "info".into(),
            admin_address_path: None,
        }
    }
}

/// State shared by the whole server: what the admin endpoint reads.
pub struct ServerState {
    pub bootstrap: ArcSwap<Bootstrap>,
    pub clusters: Arc<ArcSwap<ClusterManager>>,
    pub stats: Arc<Store>,
    pub server_stats: ServerStats,
    pub listeners: Vec<BoundListener>,
    pub ready: AtomicBool,
    /// `POST /healthcheck/fail` (cleared by `/healthcheck/ok`).
    pub health_check_failed: AtomicBool,
    pub shutdown: Shutdown,
    pub drain: Drain,
    /// Set with a drain that ends the process (SIGTERM).
    pub exit_after_drain: Signal,
    /// Open downstream connections, all listeners together.
    pub connections: ConnectionCount,
    pub options: ServerOptions,
    pub started: std::time::SystemTime,
    pub access_logs: Arc<Destinations>,
}

impl ServerState {
    /// Envoy's server state: `LIVE`, `DRAINING` (draining or failing health checks) or
    /// `PRE_INITIALIZING` (clusters not resolved yet).
    pub fn state_name(&self) -> &'static str {
        if self.drain.is_triggered() || self.health_check_failed.load(Ordering::Relaxed) {
            "DRAINING"
        } else if self.ready.load(Ordering::Relaxed) {
            "LIVE"
        } else {
            "PRE_INITIALIZING"
        }
    }

    /// Stop accepting on every listener and send GOAWAY on every connection; open
    /// tunnels keep working. Idempotent.
    pub fn start_drain(&self, why: &str) {
        if self.drain.is_triggered() {
            return;
        }
        tracing::info!(
            reason = why,
            connections = self.connections.get(),
            "draining listeners: new connections are refused, open tunnels continue"
        );
        let n = self.listeners.len() as i64;
        self.server_stats.listener_stopped.add(n as u64);
        self.server_stats.total_listeners_draining.set(n);
        self.server_stats.total_listeners_active.set(0);
        self.drain.trigger();
    }

    /// Drain, then exit once the last connection is gone or the drain time is over.
    pub fn drain_and_exit(&self, why: &str) {
        self.start_drain(why);
        self.exit_after_drain.trigger();
    }

    /// Bring the gauges computed from state up to date (before stats are read).
    pub fn refresh_gauges(&self) {
        let s = &self.server_stats;
        let uptime = self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        s.uptime.set(i64::try_from(uptime).unwrap_or(i64::MAX));
        let state = match self.state_name() {
            "LIVE" => 0,
            "DRAINING" => 1,
            _ => 2,
        };
        s.state.set(state);
        s.live.set(i64::from(state == 0));
        s.total_connections
            .set(i64::try_from(self.connections.get()).unwrap_or(i64::MAX));
        let clusters = self.clusters.load();
        for c in clusters.iter() {
            let hosts = c.hosts().addrs.len() as i64;
            let name = &c.config.name;
            self.stats
                .gauge(&format!("cluster.{name}.membership_total"))
                .set(hosts);
            self.stats
                .gauge(&format!("cluster.{name}.membership_healthy"))
                .set(hosts);
        }
    }
}

pub struct Server {
    pub state: Arc<ServerState>,
    h3: Vec<H3Listener>,
    tcp: Vec<TcpListener>,
    udp_proxy: Vec<crate::udpproxy::UdpProxyListener>,
    admin: Option<AdminServer>,
}

/// `Alt-Svc` for a TCP listener: the first HTTP/3 listener on the same IP (or on an
/// unspecified one), as `h3=":PORT"`, so clients that start on TCP can move to HTTP/3.
fn alt_svc_for(tcp: &ferry_config::Listener, h3: &[H3Listener]) -> Option<String> {
    h3.iter()
        .map(|l| l.local_addr)
        .find(|a| a.ip() == tcp.address.ip() || a.ip().is_unspecified())
        .map(|a| format!("h3=\":{}\"; ma=86400", a.port()))
}

impl Server {
    /// Bind every listener and the admin endpoint, with default options. Must run inside
    /// a tokio runtime.
    pub fn bind(bootstrap: Bootstrap) -> Result<Self, String> {
        Self::bind_with(bootstrap, ServerOptions::default())
    }

    /// Bind every listener and the admin endpoint, and open the access logs.
    pub fn bind_with(bootstrap: Bootstrap, options: ServerOptions) -> Result<Self, String> {
        let stats = Store::new();
        let clusters = Arc::new(ArcSwap::from_pointee(ClusterManager::new(
            &bootstrap.clusters,
            &stats,
        )));
        let shutdown = Shutdown::default();
        let drain = Drain::default();
        let connections = ConnectionCount::default();
        let connection_limit =
            crate::limits::ConnectionLimit::new(bootstrap.max_downstream_connections);
        let destinations = Destinations::new(&stats);
        let cluster_stats = Arc::new(ClusterStatsMap::new(&stats));
        let mut h3 = Vec::new();
        let mut tcp_pending = Vec::new();
        let mut bound = Vec::new();
        let mut udp_proxy = Vec::new();
        for l in &bootstrap.listeners {
            if let Some(config) = &l.udp_proxy {
                let listener = crate::udpproxy::UdpProxyListener::bind(
                    l,
                    config,
                    clusters.clone(),
                    &stats,
                    &destinations,
                )?;
                bound.push(BoundListener {
                    name: l.name.clone(),
                    local_addr: listener.local_addr,
                    protocol: l.protocol,
                });
                udp_proxy.push(listener);
                continue;
            }
            let hcm = &l.filter_chain.hcm;
            let is_h3 = match (l.protocol, l.quic.is_some(), hcm.codec_type) {
                (SocketProtocol::Udp, true, CodecType::Http3 | CodecType::Auto) => true,
                (SocketProtocol::Tcp, false, CodecType::Auto | CodecType::Http1 | CodecType::Http2) => {
                    false
                }
                _ => {
                    return Err(format!(
                        "listener {}: a UDP listener needs quic_options and codec HTTP3; a TCP listener takes AUTO, HTTP1 or HTTP2",
                        l.name
                    ))
                }
            };
            let access_logs = AccessLogs::open(&hcm.access_log, &destinations)
                .map_err(|e| format!("listener {}: {e}", l.name))?;
            let ctx = Arc::new(ListenerCtx {
                name: l.name.clone(),
                hcm: ArcSwap::from_pointee(hcm.clone()),
                clusters: clusters.clone(),
                stats: HttpStats::for_listener(
                    &stats,
                    &hcm.stat_prefix,
                    // Envoy names a listener's stats after its configured address.
                    &listener_stat_name(l.address),
                    cluster_stats.clone(),
                ),
                shutdown: shutdown.clone(),
                drain: drain.clone(),
                connections: connections.clone(),
                connection_limit: connection_limit.clone(),
                access_logs,
                local_addr: Default::default(),
            });
            if !is_h3 {
                // Bound after the HTTP/3 listeners, whose ports Alt-Svc advertises.
                tcp_pending.push((l, ctx));
                continue;
            }
            let listener = H3Listener::bind(l, ctx.clone())?;
            let _ = ctx.local_addr.set(listener.local_addr);
            bound.push(BoundListener {
                name: l.name.clone(),
                local_addr: listener.local_addr,
                protocol: l.protocol,
            });
            h3.push(listener);
        }
        let mut tcp = Vec::new();
        for (l, ctx) in tcp_pending {
            let listener = TcpListener::bind(l, ctx.clone(), alt_svc_for(l, &h3))?;
            let _ = ctx.local_addr.set(listener.local_addr);
            bound.push(BoundListener {
                name: l.name.clone(),
                local_addr: listener.local_addr,
                protocol: l.protocol,
            });
            tcp.push(listener);
        }
        let admin = match &bootstrap.admin {
            Some(a) => Some(AdminServer::bind(a.address)?),
            None => None,
        };
        // Dynamic targets may never be the proxy itself.
        let mut own: Vec<SocketAddr> = bound.iter().map(|b| b.local_addr).collect();
        own.extend(admin.as_ref().map(|a| a.local_addr));
        clusters.load().own_addrs.set(own);
        let server_stats = ServerStats::new(&stats);
        server_stats.state.set(2);
        let state = Arc::new(ServerState {
            bootstrap: ArcSwap::from_pointee(bootstrap),
            clusters,
            stats,
            server_stats,
            listeners: bound,
            ready: AtomicBool::new(false),
            health_check_failed: AtomicBool::new(false),
            shutdown,
            drain,
            exit_after_drain: Signal::default(),
            connections,
            options,
            started: std::time::SystemTime::now(),
            access_logs: destinations,
        });
        Ok(Server {
            state,
            h3,
            tcp,
            udp_proxy,
            admin,
        })
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr)
    }

    /// Serve until the server's shutdown is triggered (by the caller, `/quitquitquit`, or
    /// the end of a drain that was asked to exit).
    pub async fn run(self) {
        let state = self.state;
        let shutdown = state.shutdown.clone();
        let mut tasks = JoinSet::new();
        if let Some(admin) = self.admin {
            tasks.spawn(admin.serve(state.clone()));
        }
        let clusters = state.clusters.load_full();
        clusters.start(&shutdown);
        // Like Envoy's cluster warming: serve once the first DNS answers are in.
        let _ = tokio::time::timeout(INITIAL_DNS_WAIT, clusters.initialized()).await;
        let listeners = self.h3.len() + self.tcp.len() + self.udp_proxy.len();
        for l in self.udp_proxy {
            tasks.spawn(l.serve(shutdown.subscribe()));
        }
        for l in self.h3 {
            tasks.spawn(l.serve(shutdown.subscribe()));
        }
        for l in self.tcp {
            tasks.spawn(l.serve(shutdown.subscribe()));
        }
        if !state.drain.is_triggered() {
            state
                .server_stats
                .total_listeners_active
                .set(listeners as i64);
        }
        state.ready.store(true, Ordering::Relaxed);
        state.refresh_gauges();
        tracing::info!("ferry is ready");

        let mut stop = shutdown.subscribe();
        let mut exit = state.exit_after_drain.subscribe();
        let mut exiting = false;
        let mut flush = tokio::time::interval_at(
            tokio::time::Instant::now() + STATS_FLUSH_INTERVAL,
            STATS_FLUSH_INTERVAL,
        );
        loop {
            tokio::select! {
                _ = stop.wait() => break,
                _ = exit.wait(), if !exiting => {
                    exiting = true;
                    tokio::spawn(finish_drain(state.clone()));
                }
                _ = flush.tick() => state.stats.flush_histograms(),
            }
        }
        state.ready.store(false, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
        let logs = state.access_logs.clone();
        let _ = tokio::task::spawn_blocking(move || logs.close(ACCESS_LOG_CLOSE_WAIT)).await;
        tracing::info!("ferry stopped");
    }
}

/// The end of a drain that exits: wait for the last connection (or the drain time), then
/// shut down.
async fn finish_drain(state: Arc<ServerState>) {
    let drain_time = state.options.drain_time;
    tokio::select! {
        _ = state.connections.wait_zero() => {
            tracing::info!("drain complete: every connection has closed");
        }
        _ = tokio::time::sleep(drain_time) => {
            tracing::warn!(
                connections = state.connections.get(),
                "drain time ({}s) is over: closing the remaining connections",
                drain_time.as_secs_f64()
            );
        }
    }
    state.shutdown.trigger();
}
