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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_config::{UpstreamHttp, UpstreamProtocol};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, OnceCell};

use crate::forward::copy_headers;
use crate::stats::{GaugeGuard, Store};
use crate::stream::{IoRecv, IoSend};
use crate::upstream::{ClusterStats, UpstreamError};

/// The halves of an upgraded upstream stream.
pub type UpgradedIo = TokioIo<Upgraded>;
pub type TcpRecv = IoRecv<tokio::io::ReadHalf<UpgradedIo>>;
pub type TcpSend = IoSend<tokio::io::WriteHalf<UpgradedIo>>;

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
    h2: Mutex<
        Vec<(
            SocketAddr,
            hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        )>,
    >,
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

    /// A live HTTP/2 connection to `addr` that allows extended CONNECT.
    async fn h2_sender(
        &self,
        addr: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, UpstreamError> {
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
        self.stats.upstream_rq_total.inc();
        let resp = if self.is_http2() {
            let mut sender = self.h2_sender(addr).await.map_err(SendError::Connect)?;
            let scheme = if self.config.plaintext {
                "http"
            } else {
                "https"
            };
            let mut req = http::Request::new(Empty::<Bytes>::new());
            *req.method_mut() = http::Method::CONNECT;
            *req.uri_mut() = format!("{scheme}://{authority}{path}")
                .parse()
                .map_err(|e| SendError::Request(format!("request URI: {e}")))?;
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static("connect-udp"));
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
        let accepted = if self.is_http2() {
            status.is_success()
        } else {
            status == http::StatusCode::SWITCHING_PROTOCOLS
        };
        let io = if accepted {
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| SendError::Request(format!("upgrade: {e}")))?;
            let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
            Some((IoRecv::new(rd), IoSend(wr)))
        } else {
            None
        };
        Ok(Answer {
            status,
            headers,
            io,
        })
    }
}
