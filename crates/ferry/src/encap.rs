//! Raw UDP in, CONNECT-UDP out: one tunnel per downstream UDP peer (4-tuple session).
//!
//! One session engine serves both the udp_proxy listener (`tunneling_config`, tunnels on a
//! cluster's pooled HTTP/3 connections) and `ferry client` (one HTTP/3 connection of its
//! own). A session:
//! 1. starts with the first datagram from a new peer;
//! 2. opens its tunnel (up to `max_connect_attempts` attempts; a failed connection or a
//!    non-2xx response is a failed attempt);
//! 3. meanwhile buffers the peer's datagrams only as `buffer_options` allows (none without
//!    it, as in Envoy); what does not fit is dropped and counted;
//! 4. relays both ways: a datagram goes as a QUIC DATAGRAM frame when it fits the QUIC
//!    path, else as a DATAGRAM capsule on the stream, so a 1,200-byte inner QUIC packet
//!    always crosses;
//! 5. ends after `idle_timeout` without datagrams either way, or when the proxy ends or
//!    resets the tunnel.
//!
//! The upstream tunnel is opened in one place, [`Tunneling::open`], which returns an
//! [`Opened`]; the relay only needs [`UpstreamTunnel`] from it. An HTTP/2 or HTTP/1.1
//! upstream plugs in as another `Opened` variant (capsules over `stream.rs`'s
//! `StreamRecv`/`StreamSend`, see [`CapsuleTunnel`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use ferry_config::BufferOptions;
use ferry_proto::capsule::{self, Capsule, CapsuleDecoder};
use ferry_proto::datagram;
use http::{HeaderMap, StatusCode};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;

use crate::accesslog::{AccessLogs, RequestRecord, ResponseFlag, UdpSessionLog};
use crate::client::{ClientOptions, ClientTunnel, H3Client, Received};
use crate::cluster::ClusterManager;
use crate::stats::{Counter, Encoding, Gauge, GaugeGuard, Store};
use crate::stream::{StreamRecv, StreamSend};

/// Queue between the listener socket and a session whose tunnel is up: a datagram that
/// finds it full is dropped and counted (`sess_tunnel_buffer_overflow`).
const SESSION_QUEUE: usize = 1024;

/// What `ferry client` needs to open tunnels.
#[derive(Debug, Clone)]
pub struct EncapConfig {
    pub proxy: SocketAddr,
    pub client: ClientOptions,
    /// The request path for the target (default template, or the user's).
    pub path: String,
    pub target: String,
    pub idle_timeout: Duration,
    /// HTTP/2 over TLS (datagrams as capsules) instead of HTTP/3.
    pub http2: bool,
}

/// How sessions behave (udp_proxy's `idle_timeout`, `buffer_options`, `retry_options`).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub idle_timeout: Duration,
    /// None: no buffering before the tunnel is up (Envoy's default).
    pub buffer: Option<BufferOptions>,
    pub max_connect_attempts: u32,
}

/// The udp_proxy's session access log (`access_log`, `access_log_options`) and what its
/// lines need.
#[derive(Clone, Default)]
pub struct SessionLogging {
    pub logs: AccessLogs,
    /// `flush_access_log_on_tunnel_connected`.
    pub on_tunnel_connected: bool,
    /// `access_log_flush_interval`.
    pub flush_interval: Option<Duration>,
    /// `propagate_response_headers`: keep the proxy's response headers for the log.
    pub propagate_response_headers: bool,
    /// `propagate_response_trailers`: keep the trailers that end the proxy's response
    /// (POST tunnels; see `upstream_tcp.rs`).
    pub propagate_response_trailers: bool,
    /// The listener's address (`%DOWNSTREAM_LOCAL_ADDRESS%`).
    pub local: Option<SocketAddr>,
    /// The cluster (`udp.proxy.session:cluster_name`).
    pub cluster: String,
}

/// Envoy's udp_proxy stats (`udp.<stat_prefix>.*`, `cluster.<cluster>.udp.*`) and Ferry's
/// additions.
#[derive(Debug, Clone)]
pub struct SessionStats {
    pub downstream_sess_total: Counter,
    pub downstream_sess_active: Gauge,
    pub downstream_sess_rx_datagrams: Counter,
    pub downstream_sess_rx_bytes: Counter,
    pub downstream_sess_tx_datagrams: Counter,
    pub downstream_sess_tx_bytes: Counter,
    pub downstream_sess_tx_errors: Counter,
    pub idle_timeout: Counter,
    pub sess_tx_datagrams: Counter,
    pub sess_rx_datagrams: Counter,
    pub sess_tx_errors: Counter,
    /// Plain UDP: receive errors on a session's upstream socket (ICMP errors).
    pub sess_rx_errors: Counter,
    pub sess_tunnel_success: Counter,
    pub sess_tunnel_failure: Counter,
    pub sess_tunnel_buffer_overflow: Counter,
    /// Ferry: datagrams sent to the proxy as DATAGRAM capsules because they did not fit
    /// the QUIC path (or the proxy has no HTTP/3 datagrams).
    pub sess_tx_datagrams_capsule: Counter,
}

impl SessionStats {
    pub fn new(store: &Store, stat_prefix: &str, cluster: &str) -> Self {
        let d = |n: &str| store.counter(&format!("udp.{stat_prefix}.{n}"));
        let c = |n: &str| store.counter(&format!("cluster.{cluster}.udp.{n}"));
        SessionStats {
            downstream_sess_total: d("downstream_sess_total"),
            downstream_sess_active: store
                .gauge(&format!("udp.{stat_prefix}.downstream_sess_active")),
            downstream_sess_rx_datagrams: d("downstream_sess_rx_datagrams"),
            downstream_sess_rx_bytes: d("downstream_sess_rx_bytes"),
            downstream_sess_tx_datagrams: d("downstream_sess_tx_datagrams"),
            downstream_sess_tx_bytes: d("downstream_sess_tx_bytes"),
            downstream_sess_tx_errors: d("downstream_sess_tx_errors"),
            idle_timeout: d("idle_timeout"),
            sess_tx_datagrams: c("sess_tx_datagrams"),
            sess_rx_datagrams: c("sess_rx_datagrams"),
            sess_tx_errors: c("sess_tx_errors"),
            sess_rx_errors: c("sess_rx_errors"),
            sess_tunnel_success: c("sess_tunnel_success"),
            sess_tunnel_failure: c("sess_tunnel_failure"),
            sess_tunnel_buffer_overflow: c("sess_tunnel_buffer_overflow"),
            sess_tx_datagrams_capsule: c("sess_tx_datagrams_capsule"),
        }
    }
}

/// Where tunnels are opened.
pub enum Upstream {
    /// `ferry client`: its own HTTP/3 connection, reopened when it closes.
    Client {
        proxy: SocketAddr,
        options: ClientOptions,
        conn: Box<Mutex<Option<H3Client>>>,
    },
    /// `ferry client --http2`: HTTP/2 to the proxy (one connection, reopened when it
    /// closes); `authority` is the proxy's `host:port`.
    ClientTcp {
        proxy: SocketAddr,
        authority: String,
        pool: Box<crate::upstream_tcp::TcpPool>,
    },
    /// The udp_proxy listener without `tunneling_config`: plain UDP to a host of
    /// `cluster` (round robin), one connected socket per session.
    PlainUdp {
        clusters: Arc<ArcSwap<ClusterManager>>,
        cluster: String,
    },
    /// The udp_proxy listener: a host of `cluster` (round robin), on the cluster's pooled
    /// HTTP/3 or HTTP/2 connections (HTTP/1.1: one per tunnel); `authority` is
    /// `proxy_host[:proxy_port]`.
    Cluster {
        clusters: Arc<ArcSwap<ClusterManager>>,
        cluster: String,
        authority: String,
    },
}

/// Everything a listener's sessions share.
pub struct Tunneling {
    pub upstream: Upstream,
    /// `/.well-known/masque/udp/{target_host}/{target_port}/` (or a user's template); with
    /// `post`, the `post_path`.
    pub path: String,
    /// `use_post`: each tunnel is an HTTP/2 `POST` to `path` (Envoy's), not CONNECT-UDP.
    pub post: bool,
    /// Extra request headers (`headers_to_add`); `capsule-protocol: ?1` is sent with every
    /// CONNECT-UDP request (not with a POST, as in Envoy).
    pub headers: Vec<(String, String)>,
    /// The target as people read it, for log lines.
    pub target: String,
    pub settings: SessionSettings,
    pub stats: SessionStats,
    /// Print one line per tunnel on stdout (`ferry client`).
    pub print: bool,
    /// Session access log lines (udp_proxy `access_log`; none for `ferry client`).
    pub logging: SessionLogging,
}

/// An upstream tunnel as the relay sees it.
pub trait UpstreamTunnel: Send {
    /// Send one UDP payload; says how it went out.
    fn send_udp(
        &mut self,
        payload: Bytes,
    ) -> impl std::future::Future<Output = Result<Encoding, String>> + Send;
    /// The next UDP payload from the proxy, or the end of the tunnel.
    fn recv_udp(&mut self) -> impl std::future::Future<Output = Received> + Send;
    /// End the tunnel cleanly.
    fn finish(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// The trailers that ended the proxy's response, where the tunnel carries them.
    fn take_trailers(&mut self) -> Option<HeaderMap> {
        None
    }
}

/// A stream half that may have received trailers.
pub trait ResponseTrailers {
    fn take_trailers(&mut self) -> Option<HeaderMap>;
}

impl ResponseTrailers for crate::upstream_tcp::TcpRecv {
    fn take_trailers(&mut self) -> Option<HeaderMap> {
        crate::upstream_tcp::TcpRecv::take_trailers(self)
    }
}

impl UpstreamTunnel for ClientTunnel {
    async fn send_udp(&mut self, payload: Bytes) -> Result<Encoding, String> {
        self.send_fitting(&payload).await
    }
    async fn recv_udp(&mut self) -> Received {
        self.recv().await
    }
    async fn finish(&mut self) {
        let _ = ClientTunnel::finish(self).await;
    }
}

/// A tunnel over a byte stream or an HTTP/2 / HTTP/1.1 request stream: every datagram is a
/// DATAGRAM capsule. For the HTTP/2 and HTTP/1.1 upstream client to plug in.
pub struct CapsuleTunnel<R, S> {
    recv: R,
    send: S,
    decoder: CapsuleDecoder,
    done: bool,
}

impl<R: StreamRecv, S: StreamSend> CapsuleTunnel<R, S> {
    pub fn new(recv: R, send: S) -> Self {
        CapsuleTunnel {
            recv,
            send,
            decoder: CapsuleDecoder::new(crate::tunnel::MAX_CAPSULE_LEN),
            done: false,
        }
    }
}

impl<R: StreamRecv + ResponseTrailers, S: StreamSend> UpstreamTunnel for CapsuleTunnel<R, S> {
    async fn send_udp(&mut self, payload: Bytes) -> Result<Encoding, String> {
        let mut out = BytesMut::with_capacity(capsule::MAX_HEADER_LEN + 1 + payload.len());
        let mut body = BytesMut::with_capacity(1 + payload.len());
        ferry_proto::varint::put(datagram::CONTEXT_ID_UDP, &mut body).map_err(|e| e.to_string())?;
        body.extend_from_slice(&payload);
        capsule::encode_capsule(capsule::DATAGRAM_CAPSULE_TYPE, &body, &mut out)
            .map_err(|e| e.to_string())?;
        self.send
            .send(out.freeze())
            .await
            .map_err(|()| "stream closed".to_string())?;
        Ok(Encoding::Capsule)
    }

    async fn recv_udp(&mut self) -> Received {
        loop {
            match self.decoder.next() {
                Ok(Some(Capsule::Datagram(p))) => match datagram::split_context_id(p) {
                    Ok((datagram::CONTEXT_ID_UDP, udp)) => {
                        return Received::Udp(Encoding::Capsule, udp)
                    }
                    Ok(_) => continue,
                    Err(e) => return Received::Reset(format!("bad capsule from proxy: {e}")),
                },
                Ok(Some(Capsule::Unknown { .. })) => continue,
                Ok(None) => {}
                Err(e) => return Received::Reset(format!("bad capsule from proxy: {e}")),
            }
            if self.done {
                return Received::Finished;
            }
            match self.recv.recv().await {
                Ok(Some(b)) => self.decoder.push(b),
                Ok(None) => {
                    self.done = true;
                    if self.decoder.finish().is_err() {
                        return Received::Reset("truncated capsule at end of stream".into());
                    }
                }
                Err(()) => {
                    self.done = true;
                    return Received::Reset("stream reset".into());
                }
            }
        }
    }

    async fn finish(&mut self) {
        self.send.finish().await;
    }

    fn take_trailers(&mut self) -> Option<HeaderMap> {
        self.recv.take_trailers()
    }
}

/// Plain UDP to one host (udp_proxy without `tunneling_config`): a connected socket.
pub struct PlainUdpTunnel {
    socket: UdpSocket,
    buf: Vec<u8>,
    headers: HeaderMap,
    rx_errors: Counter,
}

impl UpstreamTunnel for PlainUdpTunnel {
    async fn send_udp(&mut self, payload: Bytes) -> Result<Encoding, String> {
        self.socket
            .send(&payload)
            .await
            .map_err(|e| e.to_string())?;
        // Not a CONNECT-UDP encoding: counted with the datagram sends.
        Ok(Encoding::QuicDatagram)
    }

    async fn recv_udp(&mut self) -> Received {
        loop {
            match self.socket.recv(&mut self.buf).await {
                Ok(n) => {
                    let data = Bytes::copy_from_slice(self.buf.get(..n).unwrap_or_default());
                    return Received::Udp(Encoding::QuicDatagram, data);
                }
                // An ICMP error for an earlier send (port unreachable, ...): counted, the
                // session goes on (as in Envoy, `sess_rx_errors`).
                Err(_) => self.rx_errors.inc(),
            }
        }
    }

    async fn finish(&mut self) {}
}

/// An HTTP/2 or HTTP/1.1 tunnel's byte stream.
pub type TcpTunnel = CapsuleTunnel<crate::upstream_tcp::TcpRecv, crate::upstream_tcp::TcpSend>;

/// An opened tunnel (any status): what [`Tunneling::open`] returns.
pub enum Opened {
    /// HTTP/3: datagrams as QUIC DATAGRAM frames where they fit, else capsules.
    H3(Box<ClientTunnel>),
    /// Plain UDP (no tunnel): always "accepted".
    Plain(Box<PlainUdpTunnel>),
    /// HTTP/2 or HTTP/1.1: every datagram a DATAGRAM capsule. `status` is the client's
    /// view (an HTTP/1.1 `101` is a `200`); `tunnel` is there when the proxy accepted.
    Tcp {
        status: StatusCode,
        headers: HeaderMap,
        tunnel: Option<Box<TcpTunnel>>,
    },
}

impl Opened {
    pub fn status(&self) -> StatusCode {
        match self {
            Opened::H3(t) => t.status,
            Opened::Plain(_) => StatusCode::OK,
            Opened::Tcp { status, .. } => *status,
        }
    }
    pub fn headers(&self) -> &HeaderMap {
        match self {
            Opened::H3(t) => &t.headers,
            Opened::Plain(t) => &t.headers,
            Opened::Tcp { headers, .. } => headers,
        }
    }
}

/// One CONNECT-UDP request over HTTP/2 or HTTP/1.1 through `pool` to `addr`.
async fn open_tcp(
    pool: &crate::upstream_tcp::TcpPool,
    addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    post: bool,
) -> Result<Opened, String> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = http::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| format!("header {k}: {e}"))?;
        let value = http::HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?;
        map.append(name, value);
    }
    let answer = async {
        if post {
            pool.open_post(addr, authority, path, &map).await
        } else {
            pool.open(addr, authority, path, &map).await
        }
    };
    let answer = tokio::time::timeout(
        pool.connect_timeout() + crate::forward::RESPONSE_TIMEOUT,
        answer,
    )
    .await
    .map_err(|_| format!("proxy {addr} sent no response"))?
    .map_err(|e| format!("proxy {addr}: {e:?}"))?;
    let mut status = answer.status;
    let tunnel = match answer.io {
        Some((recv, send)) => {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                status = StatusCode::OK;
            }
            Some(Box::new(CapsuleTunnel::new(recv, send)))
        }
        // An HTTP/1.1 proxy's 2xx that is not 101 opens no tunnel.
        None if status.is_success() => {
            return Err(format!(
                "proxy {addr} answered {status} to an HTTP/1.1 Upgrade (expected 101)"
            ))
        }
        None => None,
    };
    Ok(Opened::Tcp {
        status,
        headers: answer.headers,
        tunnel,
    })
}

impl Tunneling {
    /// The request headers: `capsule-protocol: ?1` (CONNECT-UDP only) and `headers_to_add`.
    fn request_headers(&self) -> Vec<(&str, &str)> {
        let mut h = Vec::with_capacity(1 + self.headers.len());
        if !self.post {
            h.push(("capsule-protocol", "?1"));
        }
        h.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        h
    }

    /// One attempt: a tunnel through the proxy (whatever status it answered), and where.
    pub async fn open(&self) -> Result<(Opened, SocketAddr), String> {
        let headers = self.request_headers();
        match &self.upstream {
            Upstream::Client {
                proxy,
                options,
                conn,
            } => {
                let mut guard = conn.lock().await;
                let alive = guard
                    .as_ref()
                    .is_some_and(|c| c.conn.close_reason().is_none());
                if !alive {
                    *guard = Some(H3Client::connect(*proxy, options).await?);
                }
                let c = guard
                    .as_mut()
                    .ok_or_else(|| "no connection to the proxy".to_string())?;
                let t = c.open(&self.path, &headers, false).await?;
                Ok((Opened::H3(Box::new(t)), *proxy))
            }
            Upstream::ClientTcp {
                proxy,
                authority,
                pool,
            } => Ok((
                open_tcp(pool, *proxy, authority, &self.path, &headers, self.post).await?,
                *proxy,
            )),
            Upstream::PlainUdp { clusters, cluster } => {
                let clusters = clusters.load_full();
                let state = clusters
                    .get(cluster)
                    .ok_or_else(|| format!("no cluster {cluster}"))?;
                let addr = state
                    .pick()
                    .map_err(|e| format!("cluster {cluster}: no host ({e:?})"))?;
                let bind: SocketAddr = if addr.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(bind)
                    .await
                    .map_err(|e| format!("upstream socket: {e}"))?;
                socket
                    .connect(addr)
                    .await
                    .map_err(|e| format!("upstream socket to {addr}: {e}"))?;
                let tunnel = PlainUdpTunnel {
                    socket,
                    buf: vec![0u8; 65536],
                    headers: HeaderMap::new(),
                    rx_errors: self.stats.sess_rx_errors.clone(),
                };
                Ok((Opened::Plain(Box::new(tunnel)), addr))
            }
            Upstream::Cluster {
                clusters,
                cluster,
                authority,
            } => {
                let clusters = clusters.load_full();
                let state = clusters
                    .get(cluster)
                    .ok_or_else(|| format!("no cluster {cluster}"))?;
                if let (None, Some(pool)) = (&state.upstream, &state.tcp_upstream) {
                    let addr = state
                        .pick()
                        .map_err(|e| format!("cluster {cluster}: no host ({e:?})"))?;
                    let opened =
                        open_tcp(pool, addr, authority, &self.path, &headers, self.post).await?;
                    return Ok((opened, addr));
                }
                if self.post {
                    // Refused at load: POST tunnels are HTTP/2 only.
                    return Err(format!(
                        "cluster {cluster}: POST tunnels need an HTTP/2 upstream"
                    ));
                }
                let pool = state.upstream.as_ref().ok_or_else(|| {
                    format!("cluster {cluster} has no HTTP/3 upstream (typed_extension_protocol_options)")
                })?;
                let addr = state
                    .pick()
                    .map_err(|e| format!("cluster {cluster}: no host ({e:?})"))?;
                let lease = pool
                    .lease(addr)
                    .await
                    .map_err(|e| format!("proxy {addr}: {e:?}"))?;
                pool.stats.upstream_rq_total.inc();
                let conn = lease.conn.clone();
                let datagrams = {
                    use h3::ConnectionState;
                    conn.peer.settings().enable_datagram()
                };
                let mut send_request = conn.send_request.clone();
                let t = tokio::time::timeout(
                    crate::forward::RESPONSE_TIMEOUT,
                    crate::client::open_on(
                        &mut send_request,
                        &conn.conn,
                        &conn.registry,
                        datagrams,
                        authority,
                        &self.path,
                        &headers,
                        false,
                    ),
                )
                .await
                .map_err(|_| format!("proxy {addr} sent no response"))??;
                Ok((Opened::H3(Box::new(t.with_lease(lease))), addr))
            }
        }
    }
}

/// A session as the listener loop sees it.
struct SessionHandle {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    shared: Arc<SessionShared>,
}

/// State the listener loop and the session share.
#[derive(Default)]
struct SessionShared {
    /// The tunnel is up: datagrams go straight to it.
    up: AtomicBool,
    /// What waits in the queue before that (bounded by `buffer_options`).
    buffered_datagrams: AtomicUsize,
    buffered_bytes: AtomicU64,
    /// This session's totals, for its access log line: from the peer (all of them) ...
    rx_datagrams: AtomicU64,
    rx_bytes: AtomicU64,
    /// ... and to the peer.
    tx_datagrams: AtomicU64,
    tx_bytes: AtomicU64,
    tx_errors: AtomicU64,
}

/// What a session's access log line knows besides its counters.
struct SessionInfo {
    id: u64,
    peer: SocketAddr,
    start_time: std::time::SystemTime,
    started: std::time::Instant,
    attempts: u32,
    /// `UF` after a failed attempt, `URX` once all attempts failed.
    failed_attempt: bool,
    exhausted: bool,
    upstream_host: Option<SocketAddr>,
    response_headers: Option<(u16, HeaderMap)>,
    /// The trailers that ended the proxy's response (`propagate_response_trailers`).
    response_trailers: Option<HeaderMap>,
    /// Ended by `idle_timeout` (Envoy's flag `SI`).
    idle_timeout: bool,
}

impl SessionInfo {
    /// Queue one access log line of type `log_type` (nothing without `access_log`).
    fn log(&self, t: &Tunneling, shared: &SessionShared, log_type: &'static str) {
        let l = &t.logging;
        if l.logs.is_empty() {
            return;
        }
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let udp = UdpSessionLog {
            log_type,
            cluster: l.cluster.clone(),
            datagrams_received: g(&shared.rx_datagrams),
            bytes_received: g(&shared.rx_bytes),
            datagrams_sent: g(&shared.tx_datagrams),
            bytes_sent: g(&shared.tx_bytes),
            errors_sent: g(&shared.tx_errors),
            attempts: self.attempts,
            response_headers: self.response_headers.clone(),
            response_trailers: self.response_trailers.clone(),
        };
        let local = l.local.unwrap_or(self.peer);
        let mut r = RequestRecord::udp_session(
            self.start_time,
            self.started,
            self.id,
            self.peer,
            local,
            udp,
        );
        r.upstream_host = self.upstream_host;
        if self.failed_attempt {
            r.set_flag(ResponseFlag::UpstreamConnectionFailure);
        }
        if self.exhausted {
            r.set_flag(ResponseFlag::UpstreamRetryLimitExceeded);
        }
        if self.idle_timeout {
            r.set_flag(ResponseFlag::StreamIdleTimeout);
        }
        r.ended = Some(std::time::Instant::now());
        l.logs.log(&r);
    }
}

/// How long `ferry client` waits for a TCP+TLS connection to the proxy.
const CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `ferry client`: serve `socket` with its own connection to the proxy until the socket
/// fails.
pub async fn run(socket: UdpSocket, config: EncapConfig) -> Result<(), String> {
    let store = Store::new();
    let upstream = if config.http2 {
        let host = &config.client.server_name;
        let authority = if host.contains(':') {
            format!("[{host}]:{}", config.proxy.port())
        } else {
            format!("{host}:{}", config.proxy.port())
        };
        let http = ferry_config::UpstreamHttp {
            protocol: ferry_config::UpstreamProtocol::Http2,
            tls: ferry_config::UpstreamTls {
                sni: Some(host.clone()),
                trusted_ca_pem: config.client.ca_pem.clone(),
            },
            plaintext: false,
        };
        Upstream::ClientTcp {
            proxy: config.proxy,
            authority,
            pool: Box::new(crate::upstream_tcp::TcpPool::new(
                "proxy",
                http,
                CLIENT_CONNECT_TIMEOUT,
                &store,
            )),
        }
    } else {
        Upstream::Client {
            proxy: config.proxy,
            options: config.client,
            conn: Box::new(Mutex::new(None)),
        }
    };
    let tunneling = Arc::new(Tunneling {
        upstream,
        path: config.path,
        post: false,
        headers: Vec::new(),
        target: config.target,
        settings: SessionSettings {
            idle_timeout: config.idle_timeout,
            buffer: Some(BufferOptions {
                max_buffered_datagrams: 256,
                max_buffered_bytes: 1 << 20,
            }),
            max_connect_attempts: 1,
        },
        stats: SessionStats::new(&store, "client", "proxy"),
        print: true,
        logging: SessionLogging::default(),
    });
    serve(Arc::new(socket), tunneling, std::future::pending()).await
}

/// Serve `socket` until `stop` resolves (or the socket fails): each new peer gets its own
/// session and tunnel.
pub async fn serve(
    socket: Arc<UdpSocket>,
    tunneling: Arc<Tunneling>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mut sessions: HashMap<SocketAddr, SessionHandle> = HashMap::new();
    let mut tasks: JoinSet<(SocketAddr, u64)> = JoinSet::new();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 65536];
    let stats = &tunneling.stats;
    let queue = match tunneling.settings.buffer {
        Some(b) => (b.max_buffered_datagrams as usize).clamp(SESSION_QUEUE, 1 << 16),
        None => SESSION_QUEUE,
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            Some(done) = tasks.join_next() => {
                if let Ok((peer, id)) = done {
                    if sessions.get(&peer).is_some_and(|s| s.id == id) {
                        sessions.remove(&peer);
                    }
                }
            }
            r = socket.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    // ICMP errors from earlier sends surface here on some systems: not fatal.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                        || e.kind() == std::io::ErrorKind::ConnectionReset => continue,
                    Err(e) => return Err(format!("local socket: {e}")),
                };
                let data = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                stats.downstream_sess_rx_datagrams.inc();
                stats.downstream_sess_rx_bytes.add(n as u64);
                let closed = sessions.get(&peer).is_some_and(|s| s.tx.is_closed());
                if closed {
                    sessions.remove(&peer);
                }
                let session = sessions.entry(peer).or_insert_with(|| {
                    next_id += 1;
                    let id = next_id;
                    let (tx, rx) = mpsc::channel(queue);
                    let shared = Arc::new(SessionShared::default());
                    let t = tunneling.clone();
                    let s = shared.clone();
                    let sock = socket.clone();
                    tasks.spawn(async move {
                        session(id, peer, rx, sock, t, s).await;
                        (peer, id)
                    });
                    SessionHandle { id, tx, shared }
                });
                session.shared.rx_datagrams.fetch_add(1, Ordering::Relaxed);
                session.shared.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                if !admit(session, &tunneling.settings, n) || session.tx.try_send(data).is_err() {
                    stats.sess_tunnel_buffer_overflow.inc();
                }
            }
        }
    }
}

/// Whether a datagram of `len` bytes may be queued for `session` (buffer_options).
fn admit(session: &SessionHandle, settings: &SessionSettings, len: usize) -> bool {
    let s = &session.shared;
    if s.up.load(Ordering::Acquire) {
        return true;
    }
    let Some(b) = settings.buffer else {
        return false;
    };
    let datagrams = s.buffered_datagrams.load(Ordering::Relaxed);
    let bytes = s.buffered_bytes.load(Ordering::Relaxed);
    if datagrams >= b.max_buffered_datagrams as usize
        || bytes.saturating_add(len as u64) > b.max_buffered_bytes
    {
        return false;
    }
    s.buffered_datagrams.fetch_add(1, Ordering::Relaxed);
    s.buffered_bytes.fetch_add(len as u64, Ordering::Relaxed);
    true
}

/// Open the tunnel, trying up to `max_connect_attempts` times.
async fn connect(
    peer: SocketAddr,
    t: &Tunneling,
    info: &mut SessionInfo,
) -> Option<(Opened, SocketAddr)> {
    let attempts = t.settings.max_connect_attempts.max(1);
    for attempt in 1..=attempts {
        info.attempts = attempt;
        let result = t.open().await;
        if let Ok((o, addr)) = &result {
            info.upstream_host = Some(*addr);
            if t.logging.propagate_response_headers {
                info.response_headers = Some((o.status().as_u16(), o.headers().clone()));
            }
        }
        let why = match result {
            Ok((o, addr)) if o.status().is_success() => return Some((o, addr)),
            Ok((o, addr)) => {
                let ps = o
                    .headers()
                    .get("proxy-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                format!("refused by {addr}: {} {ps}", o.status())
            }
            Err(e) => format!("failed: {e}"),
        };
        info.failed_attempt = true;
        tracing::debug!(%peer, attempt, attempts, "tunnel attempt {why}");
        if t.print {
            println!("tunnel {peer} -> {}: {why}", t.target);
        }
    }
    info.exhausted = true;
    None
}

async fn session(
    id: u64,
    peer: SocketAddr,
    mut from_peer: mpsc::Receiver<Bytes>,
    socket: Arc<UdpSocket>,
    t: Arc<Tunneling>,
    shared: Arc<SessionShared>,
) {
    let stats = &t.stats;
    stats.downstream_sess_total.inc();
    let _active = GaugeGuard::new(&stats.downstream_sess_active);
    let mut info = SessionInfo {
        id,
        peer,
        start_time: std::time::SystemTime::now(),
        started: std::time::Instant::now(),
        attempts: 0,
        failed_attempt: false,
        exhausted: false,
        upstream_host: None,
        response_headers: None,
        response_trailers: None,
        idle_timeout: false,
    };
    let Some((opened, via)) = connect(peer, &t, &mut info).await else {
        if !matches!(t.upstream, Upstream::PlainUdp { .. }) {
            stats.sess_tunnel_failure.inc();
        }
        info.log(&t, &shared, "UdpSessionEnd");
        return;
    };
    let plain = matches!(opened, Opened::Plain(_));
    if plain {
        // As in Envoy: a plain session makes no tunnel attempts.
        info.attempts = 0;
    } else {
        stats.sess_tunnel_success.inc();
    }
    if t.print {
        println!(
            "tunnel {peer} -> {} via {via}: {}",
            t.target,
            opened.status()
        );
    }
    shared.up.store(true, Ordering::Release);
    if t.logging.on_tunnel_connected && !plain {
        info.log(&t, &shared, "UdpTunnelUpstreamConnected");
    }
    let ctx = Relay {
        peer,
        socket: &socket,
        t: &t,
        shared: &shared,
        info: &info,
    };
    let (why, summary, trailers) = match opened {
        Opened::H3(tunnel) => relay(&ctx, *tunnel, &mut from_peer).await,
        Opened::Plain(tunnel) => relay(&ctx, *tunnel, &mut from_peer).await,
        Opened::Tcp {
            tunnel: Some(tunnel),
            ..
        } => relay(&ctx, *tunnel, &mut from_peer).await,
        Opened::Tcp { tunnel: None, .. } => ("no tunnel", "no tunnel".to_string(), None),
    };
    if t.logging.propagate_response_trailers {
        info.response_trailers = trailers;
    }
    // Envoy flags `SI` on tunnelled sessions only.
    info.idle_timeout = why == IDLE && !plain;
    tracing::debug!(%peer, "{summary}");
    if t.print {
        println!("tunnel {peer} closed ({summary})");
    }
    info.log(&t, &shared, "UdpSessionEnd");
}

/// How a relay ends when the session was idle for `idle_timeout`.
const IDLE: &str = "idle";

/// What the relay of one session needs.
struct Relay<'a> {
    peer: SocketAddr,
    socket: &'a UdpSocket,
    t: &'a Tunneling,
    shared: &'a SessionShared,
    info: &'a SessionInfo,
}

/// Relay until the tunnel ends or the session is idle; returns why, a one-line summary
/// and the trailers that ended the proxy's response (if any).
async fn relay(
    ctx: &Relay<'_>,
    mut tunnel: impl UpstreamTunnel,
    from_peer: &mut mpsc::Receiver<Bytes>,
) -> (&'static str, String, Option<HeaderMap>) {
    let (peer, socket, t, shared) = (ctx.peer, ctx.socket, ctx.t, ctx.shared);
    let stats = &t.stats;
    let (mut sent, mut received, mut dropped) = (0u64, 0u64, 0u64);
    let idle = tokio::time::sleep(t.settings.idle_timeout);
    tokio::pin!(idle);
    // `access_log_flush_interval`: a line this often while the tunnel is up.
    let flush_every = t
        .logging
        .flush_interval
        .filter(|_| !t.logging.logs.is_empty());
    let mut flush = tokio::time::interval(flush_every.unwrap_or(Duration::from_secs(3600)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.reset();
    let why = loop {
        tokio::select! {
            _ = flush.tick(), if flush_every.is_some() => {
                ctx.info.log(t, shared, "UdpPeriodic");
            }
            d = from_peer.recv() => match d {
                Some(d) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + t.settings.idle_timeout);
                    match tunnel.send_udp(d).await {
                        Ok(encoding) => {
                            sent += 1;
                            stats.sess_tx_datagrams.inc();
                            if encoding == Encoding::Capsule {
                                stats.sess_tx_datagrams_capsule.inc();
                            }
                        }
                        Err(_) => {
                            dropped += 1;
                            stats.sess_tx_errors.inc();
                        }
                    }
                }
                None => break "local side closed",
            },
            r = tunnel.recv_udp() => match r {
                Received::Udp(_, payload) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + t.settings.idle_timeout);
                    stats.sess_rx_datagrams.inc();
                    match socket.send_to(&payload, peer).await {
                        Ok(_) => {
                            received += 1;
                            stats.downstream_sess_tx_datagrams.inc();
                            stats.downstream_sess_tx_bytes.add(payload.len() as u64);
                            shared.tx_datagrams.fetch_add(1, Ordering::Relaxed);
                            shared.tx_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            dropped += 1;
                            stats.downstream_sess_tx_errors.inc();
                            shared.tx_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Received::Finished => break "proxy ended the tunnel",
                Received::Reset(_) => break "proxy reset the tunnel",
            },
            _ = &mut idle => {
                stats.idle_timeout.inc();
                break IDLE;
            }
        }
    };
    tunnel.finish().await;
    let trailers = tunnel.take_trailers();
    let summary = format!(
        "{why}: {sent} datagrams sent, {received} received, {dropped} dropped; listener totals: {} dropped (buffer full), {} dropped (send failed)",
        stats.sess_tunnel_buffer_overflow.get(),
        stats.sess_tx_errors.get(),
    );
    (why, summary, trailers)
}
