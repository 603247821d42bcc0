//! Building and running a server from a validated bootstrap: bind everything first (so
//! errors surface before anything is served and tests can bind port 0), then serve until
//! shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_config::{Bootstrap, CodecType, SocketProtocol};
use tokio::task::JoinSet;

use crate::admin::AdminServer;
use crate::cluster::ClusterManager;
use crate::h3server::{H3Listener, ListenerCtx};
use crate::shutdown::Shutdown;
use crate::stats::{HttpStats, Store};

/// How long start-up waits for the first DNS answers before serving anyway.
const INITIAL_DNS_WAIT: Duration = Duration::from_secs(10);

/// One bound listener, as the admin endpoint reports it.
#[derive(Debug, Clone)]
pub struct BoundListener {
    pub name: String,
    pub local_addr: SocketAddr,
    pub protocol: SocketProtocol,
}

/// State shared by the whole server: what the admin endpoint reads.
pub struct ServerState {
    pub bootstrap: ArcSwap<Bootstrap>,
    pub clusters: Arc<ArcSwap<ClusterManager>>,
    pub stats: Arc<Store>,
    pub listeners: Vec<BoundListener>,
    pub ready: AtomicBool,
    pub shutdown: Shutdown,
    pub started: std::time::SystemTime,
}

pub struct Server {
    pub state: Arc<ServerState>,
    h3: Vec<H3Listener>,
    admin: Option<AdminServer>,
}

impl Server {
    /// Bind every listener and the admin endpoint. Must run inside a tokio runtime.
    pub fn bind(bootstrap: Bootstrap) -> Result<Self, String> {
        let stats = Store::new();
        let clusters = Arc::new(ArcSwap::from_pointee(ClusterManager::new(
            &bootstrap.clusters,
        )));
        let shutdown = Shutdown::default();
        let mut h3 = Vec::new();
        let mut bound = Vec::new();
        for l in &bootstrap.listeners {
            let hcm = &l.filter_chain.hcm;
            match (l.protocol, l.quic.is_some(), hcm.codec_type) {
                (SocketProtocol::Udp, true, CodecType::Http3 | CodecType::Auto) => {}
                _ => {
                    return Err(format!(
                        "listener {}: only HTTP/3 (UDP + quic_options) listeners are implemented so far",
                        l.name
                    ))
                }
            }
            let ctx = Arc::new(ListenerCtx {
                name: l.name.clone(),
                hcm: ArcSwap::from_pointee(hcm.clone()),
                clusters: clusters.clone(),
                stats: HttpStats::new(&stats, &hcm.stat_prefix),
                shutdown: shutdown.clone(),
            });
            let listener = H3Listener::bind(l, ctx)?;
            bound.push(BoundListener {
                name: l.name.clone(),
                local_addr: listener.local_addr,
                protocol: l.protocol,
            });
            h3.push(listener);
        }
        let admin = match &bootstrap.admin {
            Some(a) => Some(AdminServer::bind(a.address)?),
            None => None,
        };
        let state = Arc::new(ServerState {
            bootstrap: ArcSwap::from_pointee(bootstrap),
            clusters,
            stats,
            listeners: bound,
            ready: AtomicBool::new(false),
            shutdown,
            started: std::time::SystemTime::now(),
        });
        Ok(Server { state, h3, admin })
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr)
    }

    /// Serve until the server's shutdown is triggered (by the caller, a signal handler or
    /// the admin's `/quitquitquit`).
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
        for l in self.h3 {
            tasks.spawn(l.serve(shutdown.subscribe()));
        }
        state.ready.store(true, Ordering::Relaxed);
        tracing::info!("ferry is ready");
        shutdown.subscribe().wait().await;
        state.ready.store(false, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
    }
}
