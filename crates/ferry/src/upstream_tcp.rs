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
//!   2xx accepts; the capsules travel in the request body (fed through a bounded channel,
//!   so a next hop that stops reading makes the sender wait) and in the response body, read
//!   frame by frame, whose trailers are kept (`propagate_response_trailers`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_config::{UpstreamHttp, UpstreamProtocol};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Mutex, OnceCell};

use crate::forward::copy_headers;
use crate::stats::{GaugeGuard, Store};
use crate::stream::{IoRecv, IoSend, StreamRecv, StreamSend};
use crate::upstream::{ClusterStats, UpstreamError};

/// The halves of an upgraded upstream stream.
pub type UpgradedIo = TokioIo<Upgraded>;

/// Body chunks of a POST tunnel's request waiting for the HTTP/2 stream's flow control:
/// a few capsules; past it the sender waits (back-pressure, nothing grows).
const POST_BODY_QUEUE: usize = 32;

/// The body of a request to the next hop: none (CONNECT and Upgrade, whose stream then
/// becomes a byte stream) or a POST tunnel's capsules, fed through a bounded channel.
pub struct ReqBody(Option<mpsc::Receiver<Bytes>>);

impl ReqBody {
    fn empty() -> Self {
        ReqBody(None)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.0 {
            None => Poll::Ready(None),
            Some(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.0 {
            None => SizeHint::with_exact(0),
            Some(_) => SizeHint::default(),
        }
    }
}

/// The receiving half of an upstream tunnel: an upgraded byte stream (CONNECT, Upgrade) or
/// a POST tunnel's response body.
pub enum TcpRecv {
    Upgraded(IoRecv<tokio::io::ReadHalf<UpgradedIo>>),
    Post {
        body: Incoming,
        /// The trailers that ended the body, once they came.
        trailers: Option<http::HeaderMap>,
    },
}

impl TcpRecv {
    /// The trailers that ended a POST tunnel's response (taken once). hyper hides an
    /// upgraded stream's trailers, so a CONNECT tunnel has none.
    pub fn take_trailers(&mut self) -> Option<http::HeaderMap> {
        match self {
            TcpRecv::Upgraded(_) => None,
            TcpRecv::Post { trailers, .. } => trailers.take(),
        }
    }
}

impl StreamRecv for TcpRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        match self {
            TcpRecv::Upgraded(io) => io.recv().await,
            TcpRecv::Post { body, trailers } => loop {
                match body.frame().await {
                    None => return Ok(None),
                    Some(Err(_)) => return Err(()),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) if data.is_empty() => continue,
                        Ok(data) => return Ok(Some(data)),
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                *trailers = Some(t);
                            }
                        }
                    },
                }
            },
        }
    }
}

/// The sending half of an upstream tunnel: an upgraded byte stream, or the channel into a
/// POST tunnel's request body (None once finished).
pub enum TcpSend {
    Upgraded(IoSend<tokio::io::WriteHalf<UpgradedIo>>),
    Post(Option<mpsc::Sender<Bytes>>),
}

impl StreamSend for TcpSend {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        match self {
            TcpSend::Upgraded(io) => io.send(data).await,
            TcpSend::Post(Some(tx)) => tx.send(data).await.map_err(|_| ()),
            TcpSend::Post(None) => Err(()),
        }
    }
    async fn finish(&mut self) {
        match self {
            TcpSend::Upgraded(io) => io.finish().await,
            // The body's end: END_STREAM once what is queued has gone.
            TcpSend::Post(tx) => *tx = None,
        }
    }
    fn reset(&mut self, code: h3::error::Code) {
        match self {
            TcpSend::Upgraded(io) => io.reset(code),
            // Dropping the response body (with the tunnel) resets the stream.
            TcpSend::Post(tx) => *tx = None,
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

/// The HTTP/2 and HTTP/1.1 connections of one cluster.
pub struct TcpPool {
    pub cluster: String,
    config: UpstreamHttp,
    connect_timeout: Duration,
    tls: OnceCell<Option<tokio_rustls::TlsConnector>>,
    h2: Mutex<Vec<(SocketAddr, hyper::client::conn::http2::SendRequest<ReqBody>)>>,
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

    /// A live HTTP/2 connection to `addr`; a new one must allow extended CONNECT when
    /// `need_connect` (POST tunnels do without).
    async fn h2_sender(
        &self,
        addr: SocketAddr,
        need_connect: bool,
    ) -> Result<hyper::client::conn::http2::SendRequest<ReqBody>, UpstreamError> {
        let mut conns = self.h2.lock().await;
        conns.retain(|(_, s)| !s.is_closed());
        if let Some((_, s)) = conns.iter().find(|(a, _)| *a == addr) {
            return Ok(s.clone());
        }
        let io = self.dial(addr).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Refused(format!("HTTP/2 handshake: {e}")))?;
        // The next hop allows extended CONNECT in its first SETTINGS frame, which may still
        // be in flight. hyper reads frames in a task of its own and tells nobody when the
        // SETTINGS arrive, so look every millisecond (once per connection, bounded); the
        // connection future is polled meanwhile so that its end is seen.
        let mut conn = Box::pin(conn);
        if !need_connect {
            self.spawn_connection(conn);
            conns.push((addr, sender.clone()));
            return Ok(sender);
        }
        let settings = async {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tokio::select! {
                    _ = conn.as_mut() => {
                        return Err(UpstreamError::Refused("HTTP/2 connection closed".into()))
                    }
                    _ = tick.tick() => {
                        if conn.is_extended_connect_protocol_enabled() {
                            return Ok(());
                        }
                    }
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
        self.spawn_connection(conn);
        conns.push((addr, sender.clone()));
        Ok(sender)
    }

    fn spawn_connection<F, E>(&self, conn: F)
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
        let mut post_tx = None;
        let resp = if self.is_http2() {
            let mut sender = self
                .h2_sender(addr, method == Method::ConnectUdp)
                .await
                .map_err(SendError::Connect)?;
            let scheme = if self.config.plaintext {
                "http"
            } else {
                "https"
            };
            let body = match method {
                Method::ConnectUdp => ReqBody::empty(),
                Method::Post => {
                    let (tx, rx) = mpsc::channel(POST_BODY_QUEUE);
                    post_tx = Some(tx);
                    ReqBody(Some(rx))
                }
            };
            let mut req = http::Request::new(body);
            *req.uri_mut() = format!("{scheme}://{authority}{path}")
                .parse()
                .map_err(|e| SendError::Request(format!("request URI: {e}")))?;
            match method {
                Method::ConnectUdp => {
                    *req.method_mut() = http::Method::CONNECT;
                    req.extensions_mut()
                        .insert(hyper::ext::Protocol::from_static("connect-udp"));
                }
                Method::Post => *req.method_mut() = http::Method::POST,
            }
            copy_headers(headers, req.headers_mut());
            sender
                .send_request(req)
                .await
                .map_err(|e| SendError::Request(e.to_string()))?
        } else {
            let io = self.dial(addr).await.map_err(SendError::Connect)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| SendError::Request(format!("HTTP/1.1 handshake: {e}")))?;
            self.spawn_connection(conn.with_upgrades());
            let mut req = http::Request::new(ReqBody::empty());
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
        let accepted = if self.is_http2() {
            status.is_success()
        } else {
            status == http::StatusCode::SWITCHING_PROTOCOLS
        };
        let io = match (accepted, post_tx) {
            (false, _) => None,
            (true, Some(tx)) => Some((
                TcpRecv::Post {
                    body: resp.into_body(),
                    trailers: None,
                },
                TcpSend::Post(Some(tx)),
            )),
            (true, None) => {
                let upgraded = hyper::upgrade::on(resp)
                    .await
                    .map_err(|e| SendError::Request(format!("upgrade: {e}")))?;
                let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
                Some((
                    TcpRecv::Upgraded(IoRecv::new(rd)),
                    TcpSend::Upgraded(IoSend(wr)),
                ))
            }
        };
        Ok(Answer {
            status,
            headers,
            io,
        })
    }
}
