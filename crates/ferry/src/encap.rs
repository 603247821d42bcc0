//! Raw UDP in, CONNECT-UDP out: one tunnel per local UDP peer, over one shared HTTP/3
//! connection to the proxy. This is `ferry client` today; the udp_proxy listener's
//! `tunneling_config` will reuse the same session handling.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Mutex};

use crate::client::{ClientOptions, H3Client, Received};

/// Datagrams a session may hold while its tunnel is being set up (Envoy's
/// `buffer_options.max_buffered_datagrams` default is 1024; a person's tool needs fewer).
const SESSION_QUEUE: usize = 256;

/// What `ferry client` needs to open tunnels.
#[derive(Debug, Clone)]
pub struct EncapConfig {
    pub proxy: SocketAddr,
    pub client: ClientOptions,
    /// The request path for the target (default template, or the user's).
    pub path: String,
    pub target: String,
    pub idle_timeout: Duration,
}

/// Drops by reason, printed when a session ends.
#[derive(Debug, Default)]
pub struct EncapStats {
    /// Datagrams that arrived while a session's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Datagrams the tunnel refused (too large for the QUIC path, connection gone).
    pub dropped_send_failed: AtomicU64,
}

/// Serve `socket` until it fails: each new peer gets its own tunnel, ended after
/// `idle_timeout` without traffic.
pub async fn run(socket: UdpSocket, config: EncapConfig) -> Result<(), String> {
    let socket = Arc::new(socket);
    let client: Arc<Mutex<Option<H3Client>>> = Arc::new(Mutex::new(None));
    let stats = Arc::new(EncapStats::default());
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            ended = ended_rx.recv() => {
                if let Some(peer) = ended {
                    sessions.remove(&peer);
                }
            }
            r = socket.recv_from(&mut buf) => {
                let (n, peer) = r.map_err(|e| format!("local socket: {e}"))?;
                let data = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                let tx = sessions.entry(peer).or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    crate::supervise::spawn("client session", session(
                        peer,
                        rx,
                        socket.clone(),
                        client.clone(),
                        config.clone(),
                        stats.clone(),
                        ended_tx.clone(),
                    ));
                    tx
                });
                if tx.try_send(data).is_err() {
                    stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A live connection to the proxy, opening a new one when there is none or it closed.
async fn tunnel_for(
    client: &Mutex<Option<H3Client>>,
    config: &EncapConfig,
) -> Result<crate::client::ClientTunnel, String> {
    let mut guard = client.lock().await;
    let alive = guard
        .as_ref()
        .is_some_and(|c| c.conn.close_reason().is_none());
    if !alive {
        *guard = Some(H3Client::connect(config.proxy, &config.client).await?);
    }
    let c = guard
        .as_mut()
        .ok_or_else(|| "no connection to the proxy".to_string())?;
    c.open(&config.path, &[("capsule-protocol", "?1")], false)
        .await
}

async fn session(
    peer: SocketAddr,
    mut from_peer: mpsc::Receiver<Bytes>,
    socket: Arc<UdpSocket>,
    client: Arc<Mutex<Option<H3Client>>>,
    config: EncapConfig,
    stats: Arc<EncapStats>,
    ended: mpsc::UnboundedSender<SocketAddr>,
) {
    let mut tunnel = match tunnel_for(&client, &config).await {
        Ok(t) if t.status.is_success() => {
            println!(
                "tunnel {peer} -> {} via {}: {}",
                config.target, config.proxy, t.status
            );
            t
        }
        Ok(t) => {
            let ps = t
                .headers
                .get("proxy-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            println!(
                "tunnel {peer} -> {}: refused {} {ps}",
                config.target, t.status
            );
            let _ = ended.send(peer);
            return;
        }
        Err(e) => {
            println!("tunnel {peer} -> {}: failed: {e}", config.target);
            let _ = ended.send(peer);
            return;
        }
    };
    let (mut up, mut down) = (0u64, 0u64);
    let why = loop {
        tokio::select! {
            d = from_peer.recv() => match d {
                Some(d) => {
                    if tunnel.send(&d).await.is_err() {
                        stats.dropped_send_failed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        up += 1;
                    }
                }
                None => break "local side closed",
            },
            r = tunnel.recv() => match r {
                Received::Udp(_, payload) => {
                    if socket.send_to(&payload, peer).await.is_ok() {
                        down += 1;
                    }
                }
                Received::Finished => break "proxy ended the tunnel",
                Received::Reset(_) => break "proxy reset the tunnel",
            },
            _ = tokio::time::sleep(config.idle_timeout) => break "idle",
        }
    };
    let _ = tunnel.finish().await;
    println!(
        "tunnel {peer} closed ({why}): {up} datagrams sent, {down} received, {} dropped (queue full), {} dropped (send failed)",
        stats.dropped_queue_full.load(Ordering::Relaxed),
        stats.dropped_send_failed.load(Ordering::Relaxed),
    );
    let _ = ended.send(peer);
}
