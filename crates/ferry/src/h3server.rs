//! The HTTP/3 listener: QUIC connections, request streams, and CONNECT-UDP termination.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use ferry_config::{HttpConnectionManager, Listener};
use ferry_proto::request::{Rejection, RequestHead};
use futures_util::FutureExt;
use h3::ext::Protocol;
use h3::server::RequestStream;
use http::{Response, StatusCode};
use tokio::task::JoinSet;

use crate::accesslog::{self, AccessLogs, RequestRecord};
use crate::cluster::ClusterManager;
use crate::decide::{self, Plan};
use crate::demux::{self, RegistrationGuard};
use crate::shutdown::{ConnectionCount, Drain, Shutdown, Waiter};
use crate::stats::{GaugeGuard, HttpStats};
use crate::tunnel::{self, DatagramOut};

/// What every connection of a listener reads: the current config snapshot, clusters, stats.
pub struct ListenerCtx {
    pub name: String,
    /// The listener's HTTP connection manager, swappable at run time.
    pub hcm: ArcSwap<HttpConnectionManager>,
    pub clusters: Arc<ArcSwap<ClusterManager>>,
    pub stats: HttpStats,
    pub shutdown: Shutdown,
    /// Draining: refuse new connections, GOAWAY on open ones.
    pub drain: Drain,
    /// Open connections of the whole server (a drain waits for the last one).
    pub connections: ConnectionCount,
    /// The global downstream connection limit (shared by every listener).
    pub connection_limit: crate::limits::ConnectionLimit,
    /// The HCM's `access_log[]`.
    pub access_logs: AccessLogs,
    /// The bound address (set once bound).
    pub local_addr: std::sync::OnceLock<SocketAddr>,
}

pub struct H3Listener {
    endpoint: quinn::Endpoint,
    pub local_addr: SocketAddr,
    ctx: Arc<ListenerCtx>,
}

type H3Stream = RequestStream<crate::h3limit::GuardedBidi, Bytes>;

impl H3Listener {
    /// Bind the listener's socket. Nothing is served until [`H3Listener::serve`].
    pub fn bind(listener: &Listener, ctx: Arc<ListenerCtx>) -> Result<Self, String> {
        let tls =
            listener.filter_chain.tls.as_ref().ok_or_else(|| {
                format!("listener {}: HTTP/3 needs a TLS certificate", listener.name)
            })?;
        ctx.stats.auth.register(listener);
        let tls = crate::tls::server_config(tls, &[b"h3"])
            .map_err(|e| format!("listener {}: {e}", listener.name))?;
        let max_streams = listener
            .quic
            .as_ref()
            .map_or(100, |q| q.max_concurrent_streams);
        let endpoint = crate::quic::server_endpoint(
            listener.address,
            tls,
            max_streams,
            listener.socket_buffers,
        )
        .map_err(|e| format!("listener {}: {e}", listener.name))?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| format!("listener {}: {e}", listener.name))?;
        Ok(H3Listener {
            endpoint,
            local_addr,
            ctx,
        })
    }

    /// Accept connections until shutdown, then close the endpoint. Once draining, new
    /// connections are refused (QUIC CONNECTION_REFUSED) while open ones are served.
    pub async fn serve(self, mut shutdown: Waiter) {
        let mut conns = JoinSet::new();
        let mut drain = self.ctx.drain.subscribe();
        let mut draining = false;
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) if draining => {
                        if let Some(l) = &self.ctx.stats.listener {
                            l.downstream_cx_refused_draining.inc();
                        }
                        incoming.refuse();
                    }
                    Some(incoming) => {
                        let Some(admitted) = self.ctx.connection_limit.try_admit() else {
                            // Over the global downstream connection limit: CONNECTION_REFUSED.
                            if let Some(l) = &self.ctx.stats.listener {
                                l.downstream_global_cx_overflow.inc();
                            }
                            incoming.refuse();
                            continue;
                        };
                        let ctx = self.ctx.clone();
                        let open = ctx.connections.open();
                        conns.spawn(async move {
                            crate::supervise::guard("h3 connection", handle_connection(incoming, ctx)).await;
                            drop(open);
                            drop(admitted);
                        });
                    }
                    None => break,
                },
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
        self.endpoint
            .close(quinn::VarInt::from_u32(0x100), b"shutting down");
        conns.shutdown().await;
    }
}

/// The largest request header section Ferry accepts on HTTP/3 (QPACK-decoded size, as RFC
/// 9114 section 4.2.2 counts it; advertised as SETTINGS_MAX_FIELD_SECTION_SIZE): Envoy's
/// default `max_request_headers_kb`, 60 KiB. A larger one gets 431 and is counted
/// (`downstream_rq_headers_too_large`); the connection goes on. The encoded HEADERS frame
/// is bounded by the same figure before it is buffered ([`crate::h3limit`]).
pub const MAX_REQUEST_HEADERS_BYTES: u64 = ferry_proto::h3frame::MAX_REQUEST_HEADERS_BYTES;

async fn handle_connection(incoming: quinn::Incoming, ctx: Arc<ListenerCtx>) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("QUIC handshake failed: {e}");
            if let Some(failure) = crate::tls::classify_quic_failure(&e) {
                ctx.stats.auth.handshake_failed(failure);
            }
            return;
        }
    };
    let stats = &ctx.stats;
    let _cx = stats.connection();
    let allow_extended_connect = ctx.hcm.load().allow_extended_connect;
    let h3_conn = h3::server::builder()
        //= https://www.rfc-editor.org/rfc/rfc9220#section-3
        //# SETTINGS_ENABLE_CONNECT_PROTOCOL ... Ferry sends it only when
        //# http3_protocol_options.allow_extended_connect is true, as Envoy does.
        .enable_extended_connect(allow_extended_connect)
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1.1
        //# Endpoints indicate that HTTP Datagrams are supported by sending the
        //# SETTINGS_H3_DATAGRAM setting with a value of 1.
        .enable_datagram(true)
        .max_field_section_size(MAX_REQUEST_HEADERS_BYTES)
        // Every stream the client opens is read through a frame guard: h3 buffers a
        // non-DATA frame whole before looking at it, the guard refuses one over the limit
        // as soon as its length is known (see h3limit).
        .build::<_, Bytes>(crate::h3limit::GuardedConnection::new(
            conn.clone(),
            stats.downstream_h3_frame_too_large.clone(),
        ))
        .await;
    let mut h3_conn = match h3_conn {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("HTTP/3 connection setup failed: {e}");
            return;
        }
    };
    let registry = demux::spawn(conn.clone(), stats.connect_udp.clone());
    let peer = h3_conn.inner.shared.clone();
    let mut requests = JoinSet::new();
    let shutdown = ctx.shutdown.subscribe();
    let mut drain = ctx.drain.subscribe();
    let mut draining = false;
    let local = ctx
        .local_addr
        .get()
        .copied()
        .unwrap_or(([0, 0, 0, 0], 0).into());
    loop {
        tokio::select! {
            accepted = h3_conn.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let ctx = ctx.clone();
                    let conn = conn.clone();
                    let registry = registry.clone();
                    let shutdown = shutdown.clone();
                    let peer = peer.clone();
                    // A tunnel's task lives as long as the tunnel, and a future's size is
                    // that of its largest state: so the request task only holds boxes, and
                    // each phase's state is freed when the phase ends (the request head's
                    // parsing before the tunnel starts, forwarding's larger state only when
                    // forwarding). This took an idle tunnel from 20.5 to about 12 KiB.
                    let resolver = Box::new(resolver);
                    requests.spawn(crate::supervise::guard("h3 request", async move {
                        match Box::pin(resolve_request(*resolver)).await {
                            Ok((req, stream)) => {
                                let rq = ctx.stats.request();
                                let keep_headers = !ctx.access_logs.is_empty();
                                let record = RequestRecord::new(&req, &conn, local, keep_headers);
                                let record = Arc::new(std::sync::Mutex::new(record));
                                let down = crate::forward::Downstream { stream, conn, registry, peer };
                                Box::pin(accesslog::scope(record.clone(), handle_request(req, down, &ctx, shutdown))).await;
                                accesslog::finish(&ctx.stats, &ctx.access_logs, &record);
                                drop(rq);
                            }
                            Err(e) => {
                                if let h3::error::StreamError::HeaderTooBig { .. } = e {
                                    // h3 has answered 431 already.
                                    ctx.stats.downstream_rq_headers_too_large.inc();
                                    ctx.stats.response(431);
                                }
                                tracing::debug!("bad request: {e}");
                            }
                        }
                    }));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("HTTP/3 connection ended: {e}");
                    break;
                }
            },
            Some(res) = requests.join_next(), if !requests.is_empty() => {
                if let Err(e) = res {
                    if e.is_panic() {
                        tracing::error!("request task panicked: {e}");
                    }
                }
                if draining && requests.is_empty() {
                    break;
                }
            }
            _ = drain.wait(), if !draining => {
                draining = true;
                stats.downstream_cx_drain_close.inc();
                //= https://www.rfc-editor.org/rfc/rfc9114#section-5.2
                //# An endpoint that is attempting to gracefully shut down a connection can
                //# send a GOAWAY frame.
                // Requests already accepted (tunnels) go on; later ones are refused with
                // H3_REQUEST_REJECTED.
                let _ = h3_conn.shutdown(0).await;
                if requests.is_empty() {
                    break;
                }
            }
        }
    }
    // Let running tunnels finish; the connection is kept while they run.
    while requests.join_next().await.is_some() {}
    if draining {
        conn.close(quinn::VarInt::from_u32(0x100), b"drained");
    }
}

/// h3's `resolve_request`, except that a request head the frame guard refused (a HEADERS
/// frame announcing more than the limit, or too many bytes before it) is answered the way
/// h3 answers a header section that decodes over the limit: h3 is handed a small block
/// that decodes over it, sends 431 and returns `HeaderTooBig`. The oversized bytes are
/// never buffered: the guard has already stopped the stream (STOP_SENDING H3_NO_ERROR).
async fn resolve_request(
    mut resolver: h3::server::RequestResolver<crate::h3limit::GuardedConnection, Bytes>,
) -> Result<(http::Request<()>, H3Stream), h3::error::StreamError> {
    use h3::frame::FrameStreamError;
    use h3::quic::StreamErrorIncoming;
    let frame = std::future::poll_fn(|cx| resolver.frame_stream.poll_next(cx)).await;
    let frame = match frame {
        Err(FrameStreamError::Quic(StreamErrorIncoming::Unknown(e)))
            if crate::h3limit::FrameTooLarge::is_request_head(e.as_ref()) =>
        {
            tracing::debug!("{e}");
            Ok(Some(h3::proto::frame::Frame::Headers(
                crate::h3limit::over_limit_header_block(MAX_REQUEST_HEADERS_BYTES),
            )))
        }
        other => other,
    };
    resolver.accept_with_frame(frame)?.resolve().await
}

fn header_str<'a>(req: &'a http::Request<()>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle_request(
    mut req: http::Request<()>,
    down: crate::forward::Downstream,
    ctx: &ListenerCtx,
    shutdown: Waiter,
) {
    let hcm = ctx.hcm.load_full();
    let protocol = req.extensions().get::<Protocol>();
    let head = RequestHead {
        method: req.method().as_str(),
        protocol: protocol.map(|p| p.as_str()),
        path: req.uri().path_and_query().map(|p| p.as_str()),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| header_str(&req, "host")),
        scheme: req.uri().scheme_str(),
        capsule_protocol: header_str(&req, "capsule-protocol"),
    };
    let is_connect_udp = ferry_proto::request::is_connect_udp(&head);
    let (plan, forward_user) = crate::auth::authorize(
        &hcm,
        decide::decide(&hcm, &head),
        &head,
        req.headers(),
        true,
        &ctx.stats.auth,
    );
    tracing::debug!(method = head.method, path = ?head.path, authority = ?head.authority, ?plan, "request");
    let result = match plan {
        Ok(Plan::Terminate { cluster, target }) => {
            Box::pin(terminate(down, &hcm, ctx, &cluster, &target, shutdown)).await
        }
        Ok(Plan::Forward { cluster, authority }) => {
            if let Some((name, value)) = forward_user {
                req.headers_mut().insert(name, value);
            }
            // Boxed, as termination is: each request then holds only the state of the
            // path it takes.
            Box::pin(crate::forward::forward_h3(
                down,
                &req,
                &cluster,
                authority.as_deref(),
                ctx,
                shutdown,
            ))
            .await
        }
        Err(rejection) => Err((down.stream, rejection)),
    };
    if let Err((mut stream, rejection)) = result {
        if is_connect_udp {
            ctx.stats.connect_udp.rejected(rejection.status);
            ctx.stats
                .connect_udp
                .rejected_because(rejection.error.unwrap_or("other"));
        }
        accesslog::note(|r| r.rejected(&rejection));
        respond_error(&mut stream, &rejection, &ctx.stats).await;
    }
}

/// Send an error response with its `proxy-status` and end the stream.
async fn respond_error(stream: &mut H3Stream, rejection: &Rejection, stats: &HttpStats) {
    stats.response(rejection.status);
    let status = StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(&rejection.proxy_status()) {
        resp.headers_mut().insert("proxy-status", v);
    }
    if let Some(v) = rejection.challenge.as_deref() {
        if let Ok(v) = http::HeaderValue::from_str(v) {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
    }
    if stream.send_response(resp).await.is_ok() {
        let _ = stream.finish().await;
    }
    // No stop_sending here: h3-quinn 0.0.10 panics in stop_sending while a read is in
    // flight. Dropping the stream makes quinn send STOP_SENDING for what is left unread.
}

#[allow(clippy::too_many_arguments)]
async fn terminate(
    down: crate::forward::Downstream,
    hcm: &HttpConnectionManager,
    ctx: &ListenerCtx,
    cluster: &str,
    target: &ferry_proto::template::Target,
    shutdown: Waiter,
) -> Result<(), (H3Stream, Rejection)> {
    let crate::forward::Downstream {
        mut stream,
        conn,
        registry,
        peer,
    } = down;
    // Envoy answers 400 to a CONNECT-UDP request that ends with its headers (END_STREAM):
    // there is no stream left to carry the tunnel. Whatever body bytes already arrived are
    // kept for the relay.
    let mut initial = None;
    match stream.recv_data().now_or_never() {
        Some(Ok(None)) => {
            return Err((
                stream,
                decide::reject(
                    400,
                    Some("http_request_error"),
                    "CONNECT-UDP request ended with its headers",
                ),
            ))
        }
        Some(Ok(Some(mut data))) => initial = Some(data.copy_to_bytes(data.remaining())),
        // The frame guard refused a frame that came in the same read as the request head
        // (it has stopped the stream, H3_EXCESSIVE_LOAD): the request is answered, 413,
        // rather than dropped. Any other error (the client reset its side) leaves nobody
        // to answer.
        Some(Err(e)) => {
            return match crate::h3limit::refused_frame(&e) {
                Some(refused) => Err((
                    stream,
                    decide::reject(413, Some("http_request_error"), refused.to_string()),
                )),
                None => Ok(()),
            }
        }
        None => {}
    }

    let tunnel::Opened {
        shared,
        addr,
        upstream: _upstream,
    } = match tunnel::open_target(ctx, cluster, target).await {
        Ok(o) => o,
        Err(rejection) => return Err((stream, rejection)),
    };
    let stats = &ctx.stats.connect_udp;
    let stream_id = stream.send_id().into_inner();
    // Registered before the 200 goes out, so no datagram sent right after it is lost.
    let _registration = RegistrationGuard::new(&registry, stream_id, shared.clone());

    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.5
    //# the UDP proxy ... MUST respond with a 2xx (Successful) status code ... and
    //# ... include the Capsule-Protocol header field.
    let mut resp = Response::new(());
    resp.headers_mut()
        .insert("capsule-protocol", http::HeaderValue::from_static("?1"));
    // Counted before the 200 leaves: whoever has seen the 200 sees the counters too.
    ctx.stats.response(200);
    stats.tunnels_total.inc();
    ctx.stats.downstream_cx_upgrades_total.inc();
    let _tunnel_active = GaugeGuard::new(&stats.tunnels_active);
    let _upgrade_active = GaugeGuard::new(&ctx.stats.downstream_cx_upgrades_active);
    let resp_headers = resp.headers().clone();
    if stream.send_response(resp).await.is_err() {
        accesslog::note(|r| r.tunnel_ended(tunnel::End::ClientGone));
        return Ok(());
    }
    accesslog::note(|r| r.responded(200, &resp_headers));
    tracing::debug!(stream_id, %addr, "tunnel open");

    let (mut send, mut recv) = stream.split();
    let datagrams = DatagramOut {
        conn,
        stream_id,
        peer,
    };
    let end = tunnel::relay(
        &mut recv,
        &mut send,
        Some(&datagrams),
        &shared,
        initial,
        tunnel::Timeouts::of(hcm),
        shutdown,
    )
    .await;
    tracing::debug!(stream_id, ?end, "tunnel closed");
    accesslog::note(|r| r.tunnel_ended(end));
    tunnel::close(&mut send, end, stats).await;
    Ok(())
}
