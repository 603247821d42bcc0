//! The udp_proxy listener (`envoy.filters.udp_listener.udp_proxy`). With `tunneling_config`:
//! raw UDP in, one CONNECT-UDP tunnel per downstream session out, on the cluster's pooled
//! connections; without it (Envoy's default): plain UDP to a host of the cluster, one
//! socket per session. The sessions themselves are `encap.rs`, shared with `ferry client`.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ferry_config::{Listener, UdpProxy};
use ferry_proto::template::UriTemplate;
use tokio::net::UdpSocket;

use crate::accesslog::{AccessLogs, Destinations};
use crate::cluster::ClusterManager;
use crate::encap::{SessionLogging, SessionSettings, SessionStats, Tunneling, Upstream};
use crate::shutdown::Waiter;
use crate::stats::Store;

pub struct UdpProxyListener {
    pub local_addr: SocketAddr,
    socket: Arc<UdpSocket>,
    tunneling: Arc<Tunneling>,
}

/// `proxy_host[:proxy_port]`, IPv6 literals in brackets.
fn authority(host: &str, port: Option<u16>) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

impl UdpProxyListener {
    /// Bind the listener's UDP socket. Must run inside a tokio runtime.
    pub fn bind(
        listener: &Listener,
        config: &UdpProxy,
        clusters: Arc<ArcSwap<ClusterManager>>,
        store: &Store,
        destinations: &Destinations,
    ) -> Result<Self, String> {
        let std_socket = crate::quic::bind_socket(listener.address, listener.socket_buffers)
            .map_err(|e| {
                format!(
                    "listener {}: cannot bind {}: {e}",
                    listener.name, listener.address
                )
            })?;
        std_socket
            .set_nonblocking(true)
            .map_err(|e| format!("listener {}: {e}", listener.name))?;
        let socket = UdpSocket::from_std(std_socket)
            .map_err(|e| format!("listener {}: {e}", listener.name))?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| format!("listener {}: {e}", listener.name))?;
        let logs = AccessLogs::open(&config.access_log, destinations)
            .map_err(|e| format!("listener {}: {e}", listener.name))?;
        let mut logging = SessionLogging {
            logs,
            on_tunnel_connected: config.flush_access_log_on_tunnel_connected,
            flush_interval: config.access_log_flush_interval,
            propagate_response_headers: false,
            propagate_response_trailers: false,
            local: Some(local_addr),
            cluster: config.cluster.clone(),
        };
        let stats = SessionStats::new(store, &config.stat_prefix, &config.cluster);
        let tunneling = match &config.tunneling {
            Some(t) => {
                logging.propagate_response_headers = t.propagate_response_headers;
                logging.propagate_response_trailers = t.propagate_response_trailers;
                Tunneling {
                    upstream: Upstream::Cluster {
                        clusters,
                        cluster: config.cluster.clone(),
                        authority: authority(&t.proxy_host, t.proxy_port),
                    },
                    path: match &t.post_path {
                        Some(p) => p.clone(),
                        None => UriTemplate::default_template()
                            .expand_path(&t.target_host, t.default_target_port),
                    },
                    post: t.post_path.is_some(),
                    headers: t.headers_to_add.clone(),
                    target: format!("{}:{}", t.target_host, t.default_target_port),
                    settings: SessionSettings {
                        idle_timeout: config.idle_timeout,
                        buffer: t.buffer,
                        max_connect_attempts: t.max_connect_attempts,
                    },
                    stats,
                    print: false,
                    logging,
                }
            }
            // Plain UDP: the session's socket is there at once, so nothing is lost while
            // it opens (a session queue of 1,024 datagrams, as for a tunnel that is up).
            None => Tunneling {
                upstream: Upstream::PlainUdp {
                    clusters,
                    cluster: config.cluster.clone(),
                },
                path: String::new(),
                post: false,
                headers: Vec::new(),
                target: config.cluster.clone(),
                settings: SessionSettings {
                    idle_timeout: config.idle_timeout,
                    buffer: Some(ferry_config::BufferOptions {
                        max_buffered_datagrams: 1024,
                        max_buffered_bytes: 16 << 20,
                    }),
                    max_connect_attempts: 1,
                },
                stats,
                print: false,
                logging,
            },
        };
        Ok(UdpProxyListener {
            local_addr,
            socket: Arc::new(socket),
            tunneling: Arc::new(tunneling),
        })
    }

    /// Serve until shutdown; open sessions end with it.
    pub async fn serve(self, mut shutdown: Waiter) {
        let stop = async move { shutdown.wait().await };
        if let Err(e) = crate::encap::serve(self.socket, self.tunneling, stop).await {
            tracing::error!(addr = %self.local_addr, "udp_proxy listener stopped: {e}");
        }
    }
}
