//! HTTP/2 and HTTP/1.1 upstreams: CONNECT-UDP to a next-hop proxy over TCP (cleartext or
//! TLS), for clusters whose `explicit_http_config` is `http2_protocol_options` or
//! `http_protocol_options`.
//!
//! - HTTP/2: one multiplexed connection per host (replaced when it closes), extended CONNECT
//!   with `:protocol connect-udp` (RFC 8441, RFC 9298 section 3.4).
//! - HTTP/1.1: one connection per tunnel, `GET` with `Upgrade: connect-udp` (RFC 9298
//!   section 3.2); the upgrade consumes the connection, so there is nothing to pool.
//!
//! Either way the tunnel is a byte stream carrying capsules (RFC 9297 section 3.5).
//!
//! - HTTP/2 `POST` tunnels (udp_proxy `use_post`, as Envoy's): a `POST` to `post_path`, any
//!   2xx accepts; the capsules travel in the request body and in the response body.
//!
//! HTTP/2 is spoken with the `h2` crate directly (hyper's client turns an accepted CONNECT
//! into a byte stream and drops the trailers that end it): a tunnel is the request's
//! `SendStream` and the response's `RecvStream`, so the trailers that end either kind of
//! tunnel are kept (`propagate_response_trailers`), and HTTP/2 flow control carries the
//! back-pressure both ways (Ferry sends only what the peer's window allows, and returns
//! receive credit only for what it has read).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_config::{UpstreamHttp, UpstreamProtocol};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, OnceCell};

use crate::forward::copy_headers;
use crate::stats::{GaugeGuard, Store};
use crate::stream::{IoRecv, IoSend, StreamRecv, StreamSend};
use crate::upstream::{ClusterStats, UpstreamError};

/// The halves of an upgraded upstream stream.
pub type UpgradedIo = TokioIo<Upgraded>;

/// HTTP/2 windows toward next hops (hyper's client defaults, which Ferry used before): what
/// a next hop may send on one tunnel, and on one connection, before Ferry reads it.
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The most one HTTP/2 stream queues toward a next hop beyond its window.
const H2_MAX_SEND_BUFFER: usize = 400 * 1024;

/// The receiving half of an upstream tunnel: an HTTP/1.1 upgraded byte stream, or an
/// HTTP/2 response body (CONNECT-UDP or POST).
pub enum TcpRecv {
    Upgraded(IoRecv<tokio::io::ReadHalf<UpgradedIo>>),
    H2 {
        body: h2::RecvStream,
        /// The trailers that ended the body, once they came.
        trailers: Option<http::HeaderMap>,
    },
}

impl TcpRecv {
    /// The trailers that ended an HTTP/2 tunnel's response (taken once). An HTTP/1.1
    /// tunnel is a bare byte stream after the upgrade: it has none.
    pub fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        match self {
            TcpRecv::Upgraded(_) => None,
            TcpRecv::H2 { trailers, .. } => trailers.take(),
        }
    }
}

impl StreamRecv for TcpRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        match self {
            TcpRecv::Upgraded(io) => io.recv().await,
            TcpRecv::H2 { body, trailers } => loop {
                match poll_fn(|cx| body.poll_data(cx)).await {
                    Some(Ok(data)) => {
                        // Credit back what was read: the window bounds only unread bytes.
                        let _ = body.flow_control().release_capacity(data.len());
                        if data.is_empty() {
                            continue;
                        }
                        return Ok(Some(data));
                    }
                    Some(Err(_)) => return Err(()),
                    None => {
                        return match poll_fn(|cx| body.poll_trailers(cx)).await {
                            Ok(t) => {
                                *trailers = t;
                                Ok(None)
                            }
                            Err(_) => Err(()),
                        }
                    }
                }
            },
        }
    }
}

/// The sending half of an upstream tunnel: an HTTP/1.1 upgraded byte stream, or an HTTP/2
/// request body.
pub enum TcpSend {
    Upgraded(IoSend<tokio::io::WriteHalf<UpgradedIo>>),
    H2(h2::SendStream<Bytes>),
}

impl StreamSend for TcpSend {
    async fn send(&mut self, mut data: Bytes) -> Result<(), ()> {
        match self {
            TcpSend::Upgraded(io) => io.send(data).await,
            TcpSend::H2(stream) => {
                // Send only what the next hop's flow-control window allows; wait for more.
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    match poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(0)) => continue,
                        Some(Ok(n)) => {
                            let chunk = data.split_to(n.min(data.len()));
                            stream.send_data(chunk, false).map_err(|_| ())?;
                        }
                        Some(Err(_)) | None => return Err(()),
                    }
                }
                Ok(())
            }
        }
    }
    async fn finish(&mut self) {
        match self {
            TcpSend::Upgraded(io) => io.finish().await,
            // END_STREAM after what is queued.
            TcpSend::H2(stream) => {
                let _ = stream.send_data(Bytes::new(), true);
            }
        }
    }
    fn reset(&mut self, code: h3::error::Code) {
        match self {
            TcpSend::Upgraded(io) => io.reset(code),
            TcpSend::H2(stream) => stream.send_reset(h2::Reason::CANCEL),
        }
    }
}

/// What a request to the next hop is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    /// CONNECT-UDP: extended CONNECT (HTTP/2) or `Upgrade: connect-udp` (HTTP/1.1).
    ConnectUdp,
    /// A POST tunnel (HTTP/2 only).
    Post,
}

/// How long to wait for an HTTP/2 next hop's SETTINGS_ENABLE_CONNECT_PROTOCOL after the
/// handshake (it comes in the peer's first SETTINGS frame).
const SETTINGS_WAIT: Duration = Duration::from_secs(5);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a request could not be answered by the next hop.
#[derive(Debug)]
pub enum SendError {
    /// No connection (timeout, refused, local).
    Connect(UpstreamError),
    /// The connection broke before a response head came back.
    Request(String),
}

/// The next hop's answer: its status and headers, and the byte stream when it accepted.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub io: Option<(TcpRecv, TcpSend)>,
}

/// A pooled HTTP/2 connection to a next hop.
struct H2Conn {
    addr: SocketAddr,
    sender: h2::client::SendRequest<Bytes>,
    /// Set when the connection's task ends.
    closed: Arc<AtomicBool>,
}

/// The HTTP/2 and HTTP/1.1 connections of one cluster.
pub struct TcpPool {
    pub cluster: String,
    config: UpstreamHttp,
    connect_timeout: Duration,
    tls: OnceCell<Option<tokio_rustls::TlsConnector>>,
    h2: Mutex<Vec<H2Conn>>,
    pub stats: ClusterStats,
}

impl TcpPool {
    pub fn new(
        cluster: &str,
        config: UpstreamHttp,
        connect_timeout: Duration,
        store: &Arc<Store>,
    ) -> Self {
        crate::upstream::warn_if_unverified(cluster, &config);
        TcpPool {
            cluster: cluster.to_owned(),
            config,
            connect_timeout,
            tls: OnceCell::new(),
            h2: Mutex::new(Vec::new()),
            stats: ClusterStats::new(store, cluster),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    pub fn is_http2(&self) -> bool {
        self.config.protocol == UpstreamProtocol::Http2
    }

    async fn connector(&self) -> Result<Option<tokio_rustls::TlsConnector>, UpstreamError> {
        self.tls
            .get_or_try_init(|| async {
                if self.config.plaintext {
                    return Ok(None);
                }
                let alpn: &[u8] = if self.is_http2() { b"h2" } else { b"http/1.1" };
                let config = crate::tls::client_config(
                    self.config.tls.trusted_ca_pem.as_deref(),
                    self.config.tls.trusted_ca_pem.is_none(),
                    &[alpn],
                )
                .map_err(UpstreamError::Local)?;
                Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
            })
            .await
            .cloned()
    }

    /// A TCP (and TLS) connection to `addr`, bounded by `connect_timeout`.
    async fn dial(&self, addr: SocketAddr) -> Result<Box<dyn Io>, UpstreamError> {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| UpstreamError::Refused(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let Some(connector) = self.connector().await? else {
                return Ok(Box::new(tcp) as Box<dyn Io>);
            };
            // Envoy sends no SNI without `sni`; Ferry then names the host by its address.
            let name = self
                .config
                .tls
                .sni
                .clone()
                .unwrap_or_else(|| addr.ip().to_string());
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| UpstreamError::Local(format!("sni: {e}")))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| UpstreamError::Refused(format!("TLS: {e}")))?;
            Ok(Box::new(tls) as Box<dyn Io>)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(e)) => {
                self.stats.upstream_cx_connect_fail.inc();
                Err(e)
            }
            Err(_) => {
                self.stats.upstream_cx_connect_fail.inc();
                self.stats.upstream_cx_connect_timeout.inc();
                Err(UpstreamError::Timeout)
            }
        }
    }

    /// A live HTTP/2 connection to `addr`; it must allow extended CONNECT when
    /// `need_connect` (POST tunnels do without).
    async fn h2_sender(
        &self,
        addr: SocketAddr,
        need_connect: bool,
    ) -> Result<h2::client::SendRequest<Bytes>, UpstreamError> {
        let mut conns = self.h2.lock().await;
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        if let Some(c) = conns.iter().find(|c| {
            c.addr == addr && (!need_connect || c.sender.is_extended_connect_protocol_enabled())
        }) {
            return Ok(c.sender.clone());
        }
        let io = self.dial(addr).await?;
        let (sender, conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buffer_size(H2_MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| UpstreamError::Refused(format!("HTTP/2 handshake: {e}")))?;
        let closed = Arc::new(AtomicBool::new(false));
        self.spawn_connection(conn, Some(closed.clone()));
        if need_connect {
            // The next hop allows extended CONNECT in its first SETTINGS frame, which may
            // still be in flight; the connection's task reads it and tells nobody, so look
            // every millisecond (once per connection, bounded).
            let settings = async {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                loop {
                    tick.tick().await;
                    if sender.is_extended_connect_protocol_enabled() {
                        return Ok(());
                    }
                    if closed.load(Ordering::Relaxed) {
                        return Err(UpstreamError::Refused("HTTP/2 connection closed".into()));
                    }
                }
            };
            match tokio::time::timeout(SETTINGS_WAIT.min(self.connect_timeout), settings).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(UpstreamError::Refused(
                        "the next hop does not allow extended CONNECT (no SETTINGS_ENABLE_CONNECT_PROTOCOL)".into(),
                    ))
                }
            }
        }
        conns.push(H2Conn {
            addr,
            sender: sender.clone(),
            closed,
        });
        Ok(sender)
    }

    fn spawn_connection<F, E>(&self, conn: F, closed: Option<Arc<AtomicBool>>)
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.stats.upstream_cx_total.inc();
        let active = GaugeGuard::new(&self.stats.upstream_cx_active);
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let _active = active;
            if let Err(e) = conn.await {
                tracing::debug!(%cluster, "upstream connection ended: {e}");
            }
            if let Some(closed) = closed {
                closed.store(true, Ordering::Relaxed);
            }
        });
    }

    /// Send a CONNECT-UDP request for `authority` and `path` (with `headers`) to `addr`.
    pub async fn open(
        &self,
        addr: SocketAddr,
        authority: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Answer, SendError> {
        self.request(addr, authority, path, headers, Method::ConnectUdp)
            .await
    }

    /// Open a POST tunnel (Envoy's udp_proxy `use_post`): `POST` to `path` on `authority`
    /// over HTTP/2, capsules in both bodies; any 2xx accepts.
    pub async fn open_post(
        &self,
        addr: SocketAddr,
        authority: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Answer, SendError> {
        if !self.is_http2() {
            // Refused at load; kept as an error rather than a panic.
            return Err(SendError::Request(
                "POST tunnels need an HTTP/2 next hop".into(),
            ));
        }
        self.request(addr, authority, path, headers, Method::Post)
            .await
    }

    async fn request(
        &self,
        addr: SocketAddr,
        authority: &str,
        path: &str,
        headers: &http::HeaderMap,
        method: Method,
    ) -> Result<Answer, SendError> {
        self.stats.upstream_rq_total.inc();
        if self.is_http2() {
            return self
                .h2_request(addr, authority, path, headers, method)
                .await;
        }
        let resp = {
            let io = self.dial(addr).await.map_err(SendError::Connect)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| SendError::Request(format!("HTTP/1.1 handshake: {e}")))?;
            self.spawn_connection(conn.with_upgrades(), None);
            let mut req = http::Request::new(Empty::<Bytes>::new());
            *req.uri_mut() = path
                .parse()
                .map_err(|e| SendError::Request(format!("request path: {e}")))?;
            copy_headers(headers, req.headers_mut());
            let h = req.headers_mut();
            //= https://www.rfc-editor.org/rfc/rfc9298#section-3.2
            //# the request SHALL include a single Host header field containing the host
            //# and optional port of the UDP proxy.
            h.insert(
                http::header::HOST,
                http::HeaderValue::from_str(authority)
                    .map_err(|e| SendError::Request(format!("host: {e}")))?,
            );
            h.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("Upgrade"),
            );
            h.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("connect-udp"),
            );
            sender
                .send_request(req)
                .await
                .map_err(|e| SendError::Request(e.to_string()))?
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let io = if status == http::StatusCode::SWITCHING_PROTOCOLS {
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| SendError::Request(format!("upgrade: {e}")))?;
            let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
            Some((
                TcpRecv::Upgraded(IoRecv::new(rd)),
                TcpSend::Upgraded(IoSend(wr)),
            ))
        } else {
            None
        };
        Ok(Answer {
            status,
            headers,
            io,
        })
    }

    /// An extended CONNECT (`:protocol connect-udp`) or a POST over HTTP/2; any 2xx
    /// accepts, and the tunnel is the request's and the response's bodies.
    async fn h2_request(
        &self,
        addr: SocketAddr,
        authority: &str,
        path: &str,
        headers: &http::HeaderMap,
        method: Method,
    ) -> Result<Answer, SendError> {
        let sender = self
            .h2_sender(addr, method == Method::ConnectUdp)
            .await
            .map_err(SendError::Connect)?;
        let scheme = if self.config.plaintext {
            "http"
        } else {
            "https"
        };
        let mut req = http::Request::new(());
        *req.uri_mut() = format!("{scheme}://{authority}{path}")
            .parse()
            .map_err(|e| SendError::Request(format!("request URI: {e}")))?;
        match method {
            Method::ConnectUdp => {
                *req.method_mut() = http::Method::CONNECT;
                //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
                //# The :protocol pseudo-header field SHALL be "connect-udp".
                req.extensions_mut()
                    .insert(h2::ext::Protocol::from_static("connect-udp"));
            }
            Method::Post => *req.method_mut() = http::Method::POST,
        }
        copy_headers(headers, req.headers_mut());
        let mut sender = sender
            .ready()
            .await
            .map_err(|e| SendError::Request(e.to_string()))?;
        let (response, send) = sender
            .send_request(req, false)
            .map_err(|e| SendError::Request(e.to_string()))?;
        let resp = response
            .await
            .map_err(|e| SendError::Request(e.to_string()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        // A refused request's stream is reset when both of its halves are dropped.
        let io = status.is_success().then(|| {
            (
                TcpRecv::H2 {
                    body: resp.into_body(),
                    trailers: None,
                },
                TcpSend::H2(send),
            )
        });
        Ok(Answer {
            status,
            headers,
            io,
        })
    }
}
