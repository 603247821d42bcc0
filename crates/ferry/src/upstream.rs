//! Upstream HTTP/3 connections to a next-hop proxy: pooled per host, multiplexed up to a
//! stream limit, replaced when they fail, each attempt bounded by the cluster's
//! `connect_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_config::{UpstreamHttp, UpstreamProtocol};
use tokio::sync::{Mutex, OnceCell};

use crate::demux::{self, Registry};
use crate::stats::{ConnectUdpStats, Counter, Gauge, Store};

/// Tunnels per upstream connection before another is opened (quinn's default stream limit).
pub const STREAMS_PER_CONNECTION: usize = 100;

pub type SendRequest = h3::client::SendRequest<crate::h3limit::GuardedOpener, Bytes>;

/// Why no upstream stream could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// The QUIC handshake or HTTP/3 setup did not finish within `connect_timeout`.
    Timeout,
    /// The peer refused or closed the connection (the message says how).
    Refused(String),
    /// A local problem (TLS config, socket).
    Local(String),
}

/// `cluster.<name>.upstream_cx_*` stats.
#[derive(Debug, Clone)]
pub struct ClusterStats {
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_rq_total: Counter,
    /// Connections that ended (closed by either side, or timed out: a next hop that
    /// vanished is noticed within [`crate::quic::CLIENT_IDLE_TIMEOUT`]).
    pub upstream_cx_destroy: Counter,
    /// HTTP/3 frames from the next hop refused by the frame guard (see `h3limit`): a
    /// response head or other frame over the limit (the request fails), or a control-stream
    /// frame (the connection is closed).
    pub upstream_h3_frame_too_large: Counter,
}

impl ClusterStats {
    pub fn new(store: &Store, cluster: &str) -> Self {
        let c = |n: &str| store.counter(&format!("cluster.{cluster}.{n}"));
        ClusterStats {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: store.gauge(&format!("cluster.{cluster}.upstream_cx_active")),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_cx_destroy: c("upstream_cx_destroy"),
            upstream_h3_frame_too_large: c("upstream_h3_frame_too_large"),
        }
    }
}

/// One HTTP/3 connection to a next hop.
pub struct UpstreamConn {
    pub conn: quinn::Connection,
    pub send_request: SendRequest,
    /// Routes the next hop's QUIC datagrams to our tunnels by their upstream stream id.
    pub registry: Registry,
    pub addr: SocketAddr,
    /// The next hop's HTTP/3 state (its SETTINGS, once they arrive).
    pub peer: Arc<h3::SharedState>,
    streams: AtomicUsize,
}

impl UpstreamConn {
    fn usable(&self) -> bool {
        self.conn.close_reason().is_none()
            && self.streams.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION
    }
}

/// Holds one stream slot on an upstream connection; released on drop.
pub struct StreamLease {
    pub conn: Arc<UpstreamConn>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connections of one cluster.
pub struct UpstreamPool {
    pub cluster: String,
    config: UpstreamHttp,
    connect_timeout: Duration,
    endpoint: OnceCell<quinn::Endpoint>,
    conns: Mutex<Vec<Arc<UpstreamConn>>>,
    pub stats: ClusterStats,
    /// Stats of the client side's datagram demux (drops of the next hop's datagrams).
    demux_stats: ConnectUdpStats,
}

/// Say once, at load, that a cluster's next hops are trusted blindly: a TLS (or QUIC)
/// upstream without `validation_context.trusted_ca`, which Envoy accepts too.
pub fn warn_if_unverified(cluster: &str, config: &UpstreamHttp) {
    if !config.plaintext && config.tls.trusted_ca_pem.is_none() {
        tracing::warn!(
            cluster,
            "no validation_context.trusted_ca: the next hop's certificate is NOT verified (as in Envoy)"
        );
    }
}

impl UpstreamPool {
    pub fn new(
        cluster: &str,
        config: UpstreamHttp,
        connect_timeout: Duration,
        store: &Arc<Store>,
    ) -> Self {
        warn_if_unverified(cluster, &config);
        UpstreamPool {
            cluster: cluster.to_owned(),
            config,
            connect_timeout,
            endpoint: OnceCell::new(),
            conns: Mutex::new(Vec::new()),
            stats: ClusterStats::new(store, cluster),
            demux_stats: ConnectUdpStats::new(store, &format!("cluster.{cluster}.connect_udp.")),
        }
    }

    async fn endpoint(&self) -> Result<&quinn::Endpoint, UpstreamError> {
        self.endpoint
            .get_or_try_init(|| async {
                let tls = crate::tls::client_config(
                    self.config.tls.trusted_ca_pem.as_deref(),
                    self.config.tls.trusted_ca_pem.is_none(),
                    &[b"h3"],
                )
                .map_err(UpstreamError::Local)?;
                // One client endpoint per cluster, on an ephemeral port of either family.
                let bind: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
                crate::quic::client_endpoint(bind, tls).map_err(UpstreamError::Local)
            })
            .await
    }

    /// A stream slot on a live connection to `addr`, opening a connection if needed.
    pub async fn lease(&self, addr: SocketAddr) -> Result<StreamLease, UpstreamError> {
        let mut conns = self.conns.lock().await;
        conns.retain(|c| c.conn.close_reason().is_none());
        if let Some(c) = conns.iter().find(|c| c.addr == addr && c.usable()) {
            c.streams.fetch_add(1, Ordering::Relaxed);
            return Ok(StreamLease { conn: c.clone() });
        }
        let conn = match tokio::time::timeout(self.connect_timeout, self.connect(addr)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.stats.upstream_cx_connect_fail.inc();
                return Err(e);
            }
            Err(_) => {
                self.stats.upstream_cx_connect_fail.inc();
                self.stats.upstream_cx_connect_timeout.inc();
                return Err(UpstreamError::Timeout);
            }
        };
        conn.streams.fetch_add(1, Ordering::Relaxed);
        conns.push(conn.clone());
        Ok(StreamLease { conn })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Arc<UpstreamConn>, UpstreamError> {
        if !matches!(self.config.protocol, UpstreamProtocol::Http3 { .. }) {
            return Err(UpstreamError::Local("not an HTTP/3 cluster".into()));
        }
        let endpoint = self.endpoint().await?;
        // Envoy sends no SNI without `sni`; a QUIC handshake needs a name, so Ferry then
        // uses the host's address (checked against the certificate's IP SANs).
        let server_name = self
            .config
            .tls
            .sni
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let addr = match addr {
            // The endpoint is dual-stack: reach IPv4 hosts through mapped addresses.
            SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            v6 => v6,
        };
        let conn = endpoint
            .connect(addr, &server_name)
            .map_err(|e| UpstreamError::Local(e.to_string()))?
            .await
            .map_err(|e| match e {
                quinn::ConnectionError::TimedOut => UpstreamError::Timeout,
                other => UpstreamError::Refused(other.to_string()),
            })?;
        let (mut driver, send_request) = h3::client::builder()
            .enable_extended_connect(true)
            .enable_datagram(true)
            // The next hop's response heads and control frames are bounded as a client's
            // requests are (see h3limit): h3 would buffer any frame whole.
            .max_field_section_size(crate::h3limit::MAX_REQUEST_HEADERS_BYTES)
            .build::<_, _, Bytes>(crate::h3limit::GuardedConnection::client(
                conn.clone(),
                self.stats.upstream_h3_frame_too_large.clone(),
            ))
            .await
            .map_err(|e| UpstreamError::Refused(format!("HTTP/3 setup: {e}")))?;
        let peer = driver.inner.shared.clone();
        self.stats.upstream_cx_total.inc();
        let active = crate::stats::GaugeGuard::new(&self.stats.upstream_cx_active);
        let cluster = self.cluster.clone();
        let destroyed = self.stats.upstream_cx_destroy.clone();
        crate::supervise::spawn("upstream connection", async move {
            let _active = active;
            let e = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            destroyed.inc();
            tracing::debug!(%cluster, "upstream connection closed: {e}");
        });
        let registry = demux::spawn(conn.clone(), self.demux_stats.clone());
        Ok(Arc::new(UpstreamConn {
            conn,
            send_request,
            registry,
            addr: match addr {
                SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                    None => SocketAddr::V6(v6),
                },
                v4 => v4,
            },
            peer,
            streams: AtomicUsize::new(0),
        }))
    }
}
