//! The TCP listener: HTTP/2 (extended CONNECT, RFC 8441 + RFC 9298 section 3.4) and
//! HTTP/1.1 (`Upgrade: connect-udp`, RFC 9298 section 3.2) on one socket, plaintext or TLS
//! with ALPN. Datagrams travel as DATAGRAM capsules on the upgraded stream (RFC 9297
//! section 3.5); the relay is the same as for HTTP/3 streams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use ferry_config::{CodecType, Listener};
use ferry_proto::request::{Rejection, RequestHead};
use http::{HeaderValue, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::accesslog::{self, DownstreamConnection, RequestRecord};
use crate::decide::{self, Plan};
use crate::h3server::ListenerCtx;
use crate::shutdown::Waiter;
use crate::stats::{GaugeGuard, HttpVersion};
use crate::stream::{IoRecv, IoSend};
use crate::tunnel;

pub struct TcpListener {
    listener: tokio::net::TcpListener,
    pub local_addr: SocketAddr,
    ctx: Arc<ListenerCtx>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    codec: CodecType,
    /// `Alt-Svc` advertising the bootstrap's HTTP/3 listener, when there is one.
    alt_svc: Option<HeaderValue>,
}

/// Any accepted byte stream: TCP or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The backlog of a TCP listener bound with socket options (what std's `bind` uses too).
const TCP_BACKLOG: i32 = 128;

/// Bind a TCP listener. With `socket_options` buffer sizes, they are set before bind (the
/// accepted connections inherit them; setting SO_RCVBUF turns the kernel's receive
/// autotuning off for them, as it does in Envoy); without, std's plain bind.
pub fn bind_tcp(
    addr: std::net::SocketAddr,
    buffers: ferry_config::SocketBuffers,
) -> std::io::Result<std::net::TcpListener> {
    if buffers == ferry_config::SocketBuffers::default() {
        return std::net::TcpListener::bind(addr);
    }
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if let Some(n) = buffers.recv {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(n) = buffers.send {
        socket.set_send_buffer_size(n)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(TCP_BACKLOG)?;
    Ok(socket.into())
}

impl TcpListener {
    /// Bind the listener's socket. Nothing is served until [`TcpListener::serve`].
    pub fn bind(
        listener: &Listener,
        ctx: Arc<ListenerCtx>,
        alt_svc: Option<String>,
    ) -> Result<Self, String> {
        let name = &listener.name;
        ctx.stats.auth.register(listener);
        let tls = match &listener.filter_chain.tls {
            Some(tls) => {
                let alpn: Vec<&[u8]> = if tls.alpn_protocols.is_empty() {
                    vec![b"h2", b"http/1.1"]
                } else {
                    tls.alpn_protocols.iter().map(|p| p.as_bytes()).collect()
                };
                let config = crate::tls::tcp_server_config(tls, &alpn)
                    .map_err(|e| format!("listener {name}: {e}"))?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let std = bind_tcp(listener.address, listener.socket_buffers)
            .map_err(|e| format!("listener {name}: cannot bind {}: {e}", listener.address))?;
        std.set_nonblocking(true)
            .map_err(|e| format!("listener {name}: {e}"))?;
        let listener_sock =
            tokio::net::TcpListener::from_std(std).map_err(|e| format!("listener {name}: {e}"))?;
        let local_addr = listener_sock
            .local_addr()
            .map_err(|e| format!("listener {name}: {e}"))?;
        let alt_svc = alt_svc.and_then(|v| HeaderValue::from_str(&v).ok());
        Ok(TcpListener {
            listener: listener_sock,
            local_addr,
            codec: listener.filter_chain.hcm.codec_type,
            ctx,
            tls,
            alt_svc,
        })
    }

    /// Accept connections until shutdown. Once draining, new connections are closed at once.
    pub async fn serve(self, mut shutdown: Waiter) {
        let mut conns = JoinSet::new();
        let mut drain = self.ctx.drain.subscribe();
        let mut draining = false;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let Ok((tcp, peer)) = accepted else { continue };
                    if draining {
                        if let Some(l) = &self.ctx.stats.listener {
                            l.downstream_cx_refused_draining.inc();
                        }
                        drop(tcp);
                        continue;
                    }
                    let Some(admitted) = self.ctx.connection_limit.try_admit() else {
                        // Over the global downstream connection limit: closed at once.
                        if let Some(l) = &self.ctx.stats.listener {
                            l.downstream_global_cx_overflow.inc();
                        }
                        drop(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let ctx = self.ctx.clone();
                    let tls = self.tls.clone();
                    let alt_svc = self.alt_svc.clone();
                    let codec = self.codec;
                    let open = ctx.connections.open();
                    let shutdown = ctx.shutdown.subscribe();
                    conns.spawn(async move {
                        crate::supervise::guard("tcp connection", handle_connection(tcp, peer, ctx, tls, codec, alt_svc, shutdown)).await;
                        drop(open);
                        drop(admitted);
                    });
                }
                _ = drain.wait(), if !draining => draining = true,
                Some(res) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = res {
                        if e.is_panic() {
                            tracing::error!(listener = %self.ctx.name, "connection task panicked: {e}");
                        }
                    }
                }
                _ = shutdown.wait() => break,
            }
        }
        conns.shutdown().await;
    }
}

static CONNECTION_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

async fn handle_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    codec: CodecType,
    alt_svc: Option<HeaderValue>,
    shutdown: Waiter,
) {
    let local = tcp.local_addr().ok();
    let is_tls = tls.is_some();
    let (io, alpn_h2, server_name): (Box<dyn Io>, bool, Option<String>) = match tls {
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(s) => {
                let (_, session) = s.get_ref();
                let h2 = session.alpn_protocol() == Some(b"h2");
                let sni = session.server_name().map(str::to_owned);
                (Box::new(s), h2, sni)
            }
            Err(e) => {
                tracing::debug!(%peer, "TLS handshake failed: {e}");
                let rustls_error = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>());
                ctx.stats
                    .auth
                    .handshake_failed(crate::tls::classify_failure(rustls_error));
                return;
            }
        },
        None => (Box::new(tcp), codec == CodecType::Http2, None),
    };
    let version = if alpn_h2 || codec == CodecType::Http2 {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    let conn_info = DownstreamConnection {
        protocol: if version == HttpVersion::Http2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        remote: Some(peer),
        local,
        id: CONNECTION_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        server_name,
    };
    let cx_stats = ctx.clone();
    let _cx = cx_stats.stats.connection_with(version);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder = match codec {
        CodecType::Http1 => builder.http1_only(),
        CodecType::Http2 => builder.http2_only(),
        _ => builder,
    };
    // SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 section 6.5.2) from
    // http2_protocol_options.max_concurrent_streams: hyper refuses a stream past it with
    // RST_STREAM(REFUSED_STREAM).
    builder
        .http2()
        .max_concurrent_streams(ctx.hcm.load().http2_max_concurrent_streams);
    if ctx.hcm.load().allow_connect {
        //= https://www.rfc-editor.org/rfc/rfc8441#section-3
        //# SETTINGS_ENABLE_CONNECT_PROTOCOL ... Ferry sends it only when
        //# http2_protocol_options.allow_connect is true, as Envoy does.
        builder.http2().enable_connect_protocol();
    }
    let mut drain = ctx.drain.subscribe();
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let alt_svc = alt_svc.clone();
        let shutdown = shutdown.clone();
        let conn_info = conn_info.clone();
        let mut req = req;
        if is_tls {
            req.extensions_mut().insert(OverTls);
        }
        async move { Ok::<_, Infallible>(handle_request(req, ctx, alt_svc, shutdown, conn_info).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = drain.wait(), if !draining => {
                // HTTP/2: GOAWAY, open streams (tunnels) go on; HTTP/1.1: close when idle.
                draining = true;
                ctx.stats.downstream_cx_drain_close.inc();
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn header_str<'a>(req: &'a hyper::Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// HTTP/1.1: the `Upgrade` token, when `Connection` names `upgrade`.
fn upgrade_token(req: &hyper::Request<Incoming>) -> Option<&str> {
    let connection_upgrade = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if connection_upgrade {
        header_str(req, "upgrade")
    } else {
        None
    }
}

fn error_response(rejection: &Rejection, ctx: &ListenerCtx, alt_svc: &Option<HeaderValue>) -> Resp {
    ctx.stats.response(rejection.status);
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Ok(v) = HeaderValue::from_str(&rejection.proxy_status()) {
        resp.headers_mut().insert("proxy-status", v);
    }
    if let Some(v) = rejection.challenge.as_deref() {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
    }
    if let Some(v) = alt_svc {
        resp.headers_mut().insert(http::header::ALT_SVC, v.clone());
    }
    resp
}

async fn handle_request(
    req: hyper::Request<Incoming>,
    ctx: Arc<ListenerCtx>,
    alt_svc: Option<HeaderValue>,
    shutdown: Waiter,
    conn_info: DownstreamConnection,
) -> Resp {
    let version = if req.version() < Version::HTTP_2 {
        HttpVersion::Http1
    } else {
        HttpVersion::Http2
    };
    let rq = ctx.stats.request_with(version);
    let mut head_only = http::Request::new(());
    *head_only.method_mut() = req.method().clone();
    *head_only.uri_mut() = req.uri().clone();
    *head_only.version_mut() = req.version();
    *head_only.headers_mut() = req.headers().clone();
    let keep_headers = !ctx.access_logs.is_empty();
    let record = Arc::new(std::sync::Mutex::new(RequestRecord::from_request(
        &head_only,
        conn_info,
        keep_headers,
    )));
    let (resp, tunnel) =
        accesslog::scope(record.clone(), respond(req, &ctx, alt_svc, shutdown)).await;
    match tunnel {
        // The tunnel's task finishes the record (one log line per tunnel, at its end).
        Some(task) => {
            let ctx = ctx.clone();
            let open = ctx.connections.open();
            crate::supervise::spawn("tcp tunnel", async move {
                let _open = open;
                accesslog::scope(record.clone(), task).await;
                accesslog::finish(&ctx.stats, &ctx.access_logs, &record);
                drop(rq);
            });
        }
        None => {
            accesslog::finish(&ctx.stats, &ctx.access_logs, &record);
            drop(rq);
        }
    }
    resp
}

/// Marks a request that came over TLS (the `https` scheme of a basic auth realm).
#[derive(Debug, Clone, Copy)]
struct OverTls;

type TunnelTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Decide the request: a refusal, or the response plus the tunnel to run after it.
async fn respond(
    mut req: hyper::Request<Incoming>,
    ctx: &ListenerCtx,
    alt_svc: Option<HeaderValue>,
    shutdown: Waiter,
) -> (Resp, Option<TunnelTask>) {
    let hcm = ctx.hcm.load_full();
    let tls = req.extensions().get::<OverTls>().is_some();
    let h1 = req.version() < Version::HTTP_2;
    let protocol = if h1 {
        upgrade_token(&req)
    } else {
        req.extensions()
            .get::<hyper::ext::Protocol>()
            .map(|p| p.as_str())
    };
    let hosts = req.headers().get_all(http::header::HOST).iter().count();
    let head = RequestHead {
        method: req.method().as_str(),
        protocol,
        path: req.uri().path_and_query().map(|p| p.as_str()),
        authority: if h1 {
            header_str(&req, "host")
        } else {
            req.uri().authority().map(|a| a.as_str())
        },
        scheme: req.uri().scheme_str(),
        capsule_protocol: header_str(&req, "capsule-protocol"),
    };
    let is_connect_udp = ferry_proto::request::is_connect_udp(&head);
    let mut plan = decide::decide(&hcm, &head);
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.2
    //# the request SHALL include a single Host header field containing the host and
    //# optional port of the UDP proxy.
    if h1 && is_connect_udp && hosts != 1 {
        plan = Err(decide::reject(
            400,
            Some("http_request_error"),
            format!(
                "an HTTP/1.1 CONNECT-UDP request needs exactly one Host header ({hosts} found)"
            ),
        ));
    }
    let (plan, forward_user) =
        crate::auth::authorize(&hcm, plan, &head, req.headers(), tls, &ctx.stats.auth);
    tracing::debug!(method = head.method, path = ?head.path, h1, ?plan, "request");
    let refuse = |r: Rejection| {
        if is_connect_udp {
            ctx.stats.connect_udp.rejected(r.status);
        }
        accesslog::note(|rec| rec.rejected(&r));
        (error_response(&r, ctx, &alt_svc), None)
    };
    let (cluster, target) = match plan {
        Ok(Plan::Terminate { cluster, target }) => (cluster, target),
        Ok(Plan::Forward { cluster, authority }) => {
            let mut head = http::Request::new(());
            *head.method_mut() = req.method().clone();
            *head.uri_mut() = req.uri().clone();
            *head.headers_mut() = req.headers().clone();
            if let Some((name, value)) = forward_user {
                head.headers_mut().insert(name, value);
            }
            let opened = crate::forward::open_next_hop(&head, &cluster, authority.as_deref(), ctx);
            let crate::forward::Opened { next, stats } = match Box::pin(opened).await {
                Ok(o) => o,
                Err(r) => return refuse(r),
            };
            let Some(tunnel) = next.tunnel else {
                // The next hop's refusal, as it gave it.
                let status = next.status.as_u16();
                ctx.stats.connect_udp.rejected(status);
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = next.status;
                *resp.headers_mut() = next.headers;
                if let Some(v) = alt_svc {
                    resp.headers_mut().insert(http::header::ALT_SVC, v);
                }
                ctx.stats.response(status);
                accesslog::note(|r| r.responded(status, resp.headers()));
                return (resp, None);
            };
            let resp = accepted(h1, next.status, next.headers, alt_svc);
            let addr = next.addr;
            let max_duration = hcm.max_stream_duration;
            let (task_ctx, on_upgrade) =
                (TunnelStart::new(ctx, &resp), hyper::upgrade::on(&mut req));
            let task: TunnelTask = Box::pin(async move {
                let _active = task_ctx;
                let Some((recv, send)) = upgraded(on_upgrade).await else {
                    return;
                };
                tracing::debug!(%addr, h1, "forwarded tunnel open");
                let down = crate::forward::Side {
                    recv,
                    send,
                    quic: None,
                    respond: None,
                };
                let end =
                    crate::forward::relay_next_hop(down, tunnel, &stats, max_duration, shutdown)
                        .await;
                tracing::debug!(%addr, ?end, "forwarded tunnel closed");
                accesslog::note(|r| r.tunnel_ended(end));
            });
            return (resp, Some(task));
        }
        Err(r) => return refuse(r),
    };
    // Over HTTP/2, hyper moves a CONNECT stream into the upgrade and shows an empty body
    // whatever the client sent, so END_STREAM on the HEADERS (Envoy: 400) cannot be seen
    // here: such a tunnel opens and ends at once with the stream (see the README).
    let tunnel::Opened {
        shared,
        addr,
        upstream,
    } = match tunnel::open_target(ctx, &cluster, &target).await {
        Ok(o) => o,
        Err(r) => return refuse(r),
    };

    let resp = accepted(h1, StatusCode::OK, http::HeaderMap::new(), alt_svc);
    let task_ctx = TunnelStart::new(ctx, &resp);
    let stats = ctx.stats.connect_udp.clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let timeouts = tunnel::Timeouts::of(&hcm);
    let task: TunnelTask = Box::pin(async move {
        let _active = (task_ctx, upstream);
        let Some((mut recv, mut send)) = upgraded(on_upgrade).await else {
            return;
        };
        tracing::debug!(%addr, h1, "tunnel open");
        let end = tunnel::relay(
            &mut recv, &mut send, None, &shared, None, timeouts, shutdown,
        )
        .await;
        tracing::debug!(%addr, ?end, "tunnel closed");
        accesslog::note(|r| r.tunnel_ended(end));
        tunnel::close(&mut send, end, &stats).await;
    });
    (resp, Some(task))
}

/// The response accepting a tunnel, from a 2xx `status` and end-to-end `headers`.
fn accepted(
    h1: bool,
    status: StatusCode,
    headers: http::HeaderMap,
    alt_svc: Option<HeaderValue>,
) -> Resp {
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.3
    //# Upon receiving a UDP proxying request that it can fulfil, the UDP proxy ... responds
    //# with a 101 (Switching Protocols) status code, with the "Upgrade" header field set to
    //# "connect-udp" (HTTP/1.1); a 2xx status code (HTTP/2, section 3.5).
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    let headers = resp.headers_mut();
    // Datagrams travel as capsules on this hop, whatever the next hop said.
    headers.insert("capsule-protocol", HeaderValue::from_static("?1"));
    if let Some(v) = alt_svc {
        headers.insert(http::header::ALT_SVC, v);
    }
    if h1 {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        headers.insert(
            http::header::UPGRADE,
            HeaderValue::from_static("connect-udp"),
        );
    }
    resp
}

/// A tunnel about to start: counted before its response leaves (whoever has seen the
/// response sees the counters too); the gauges fall when the tunnel's task ends.
struct TunnelStart {
    _tunnel_active: GaugeGuard,
    _upgrade_active: GaugeGuard,
}

impl TunnelStart {
    fn new(ctx: &ListenerCtx, resp: &Resp) -> Self {
        let status = resp.status().as_u16();
        let stats = &ctx.stats.connect_udp;
        ctx.stats.response(status);
        stats.tunnels_total.inc();
        ctx.stats.downstream_cx_upgrades_total.inc();
        accesslog::note(|r| r.responded(status, resp.headers()));
        TunnelStart {
            _tunnel_active: GaugeGuard::new(&stats.tunnels_active),
            _upgrade_active: GaugeGuard::new(&ctx.stats.downstream_cx_upgrades_active),
        }
    }
}

type UpgradedHalves = (
    IoRecv<tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>>,
    IoSend<tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>>,
);

/// The client's upgraded stream, once hyper hands it over.
async fn upgraded(on_upgrade: hyper::upgrade::OnUpgrade) -> Option<UpgradedHalves> {
    match on_upgrade.await {
        Ok(u) => {
            let (rd, wr) = tokio::io::split(TokioIo::new(u));
            Some((IoRecv::new(rd), IoSend(wr)))
        }
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            accesslog::note(|r| r.tunnel_ended(tunnel::End::ClientGone));
            None
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A TCP listener's `socket_options` buffer sizes reach its socket, and so the
    /// connections it accepts (Linux reports twice the size asked for).
    #[test]
    fn socket_options_size_the_listener_and_its_connections() {
        let asked = ferry_config::SocketBuffers {
            recv: Some(65_536),
            send: Some(98_304),
        };
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), asked).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert_eq!(sock.recv_buffer_size().unwrap(), 2 * 65_536);
        assert_eq!(sock.send_buffer_size().unwrap(), 2 * 98_304);
        // Without them, std's bind: the kernel's defaults.
        let plain = bind_tcp("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
        assert!(plain.local_addr().is_ok());
    }
}
