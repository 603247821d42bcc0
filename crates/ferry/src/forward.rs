//! Forwarding CONNECT-UDP to a next-hop proxy over HTTP/3, hop by hop.
//!
//! The request goes on to the next hop as an extended CONNECT; its response head comes
//! back to the client. Then:
//! - a QUIC datagram from either side becomes a QUIC datagram on the other, re-tagged with
//!   the other hop's quarter stream id, whatever its context id; one that does not fit the
//!   other hop's datagram size is dropped and counted, not turned into a capsule
//!   (RFC 9297 section 3.5, RFC 9298 section 6.1);
//! - capsules on either stream are re-sent on the other one as they are, unknown types
//!   included (RFC 9297 section 3.2);
//! - only where the other hop did not negotiate HTTP/3 datagrams are datagrams carried as
//!   DATAGRAM capsules (so a capsule-only client works through a chain);
//! - the end or reset of either stream ends the other.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_proto::capsule::{self, Capsule, CapsuleDecoder};
use h3::error::Code;
use tokio::sync::mpsc;

use crate::demux::{DatagramSink, RegistrationGuard, Registry};
use crate::stats::{ConnectUdpStats, DropReason, Encoding};
use crate::stream::{StreamRecv, StreamSend};
use crate::tunnel::MAX_CAPSULE_LEN;
use crate::upstream::StreamLease;

/// Datagrams waiting to be sent as capsules on a stream, per direction.
const CAPSULE_QUEUE: usize = 256;

/// How long to wait for the next hop's response head.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends one hop's datagrams to the other hop.
struct HopSink {
    conn: quinn::Connection,
    /// The other hop's stream id (its quarter stream id tags our datagrams there).
    stream_id: u64,
    /// The other hop's HTTP/3 state: whether it sent SETTINGS_H3_DATAGRAM is read per
    /// datagram (a `OnceLock` read), because the SETTINGS frame can arrive after the
    /// tunnel is set up.
    peer: Arc<h3::SharedState>,
    /// Capsule fallback when it did not.
    capsules: mpsc::Sender<Bytes>,
    stats: ConnectUdpStats,
    /// Which way this sink carries, for the stats.
    toward_client: bool,
}

impl HopSink {
    fn record(&self, encoding: Encoding, len: usize) {
        if self.toward_client {
            self.stats.tx.record(encoding, len);
        } else {
            self.stats.rx.record(Encoding::QuicDatagram, len);
            self.stats.upstream_datagrams_tx.inc();
        }
    }
}

impl DatagramSink for HopSink {
    fn deliver(&self, payload: Bytes) -> Result<(), DropReason> {
        use h3::ConnectionState;
        if !self.peer.settings().enable_datagram() {
            let len = payload.len();
            self.capsules
                .try_send(payload)
                .map_err(|_| DropReason::BufferFull)?;
            self.record(Encoding::Capsule, len);
            return Ok(());
        }
        let header = ferry_proto::varint::encoded_len(self.stream_id / 4);
        let Some(max) = self.conn.max_datagram_size() else {
            return Err(DropReason::TooLarge);
        };
        if header + payload.len() > max {
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
            //# intermediaries ... SHOULD NOT convert ... a DATAGRAM frame ... too large
            // An intermediary drops it rather than turning it into a capsule.
            return Err(DropReason::TooLarge);
        }
        if self.conn.datagram_send_buffer_space() < header + payload.len() {
            return Err(DropReason::BufferFull);
        }
        let mut out = BytesMut::with_capacity(header + payload.len());
        ferry_proto::varint::put(self.stream_id / 4, &mut out)
            .map_err(|_| DropReason::Malformed)?;
        out.extend_from_slice(&payload);
        let len = payload.len();
        match self.conn.send_datagram(out.freeze()) {
            Ok(()) => {
                self.record(Encoding::QuicDatagram, len);
                Ok(())
            }
            Err(quinn::SendDatagramError::TooLarge) => Err(DropReason::TooLarge),
            Err(_) => Err(DropReason::SocketError),
        }
    }
}

/// Re-encode one capsule for the other stream.
fn encode(c: &Capsule) -> Bytes {
    let (t, payload) = match c {
        Capsule::Datagram(p) => (capsule::DATAGRAM_CAPSULE_TYPE, p),
        Capsule::Unknown {
            capsule_type,
            payload,
        } => (*capsule_type, payload),
    };
    let mut out = BytesMut::with_capacity(capsule::MAX_HEADER_LEN + payload.len());
    // Types and lengths came from a decoded varint: they re-encode.
    let _ = capsule::encode_capsule(t, payload, &mut out);
    out.freeze()
}

/// A DATAGRAM capsule carrying an HTTP Datagram payload (context id included).
fn datagram_capsule(http_payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(capsule::MAX_HEADER_LEN + http_payload.len());
    let _ = capsule::encode_capsule(capsule::DATAGRAM_CAPSULE_TYPE, http_payload, &mut out);
    out.freeze()
}

/// How one direction ended.
enum Half {
    /// Its sender finished the stream cleanly.
    Finished,
    /// Its sender reset the stream, or sent a malformed capsule stream.
    Broken,
}

/// Pump one stream direction: capsules from `recv` (re-encoded as they are) and queued
/// datagrams (as DATAGRAM capsules) go out on `send`.
async fn pump(
    recv: &mut impl StreamRecv,
    send: &mut impl StreamSend,
    mut queued: mpsc::Receiver<Bytes>,
    stats: &ConnectUdpStats,
    toward_client: bool,
) -> Half {
    let mut decoder = CapsuleDecoder::new(MAX_CAPSULE_LEN);
    loop {
        loop {
            match decoder.next() {
                Ok(Some(c)) => {
                    if let Capsule::Datagram(p) = &c {
                        if toward_client {
                            stats.tx.record(Encoding::Capsule, p.len());
                        } else {
                            stats.rx.record(Encoding::Capsule, p.len());
                            stats.upstream_datagrams_tx.inc();
                        }
                    }
                    if send.send(encode(&c)).await.is_err() {
                        return Half::Broken;
                    }
                }
                Ok(None) => break,
                Err(_) => return Half::Broken,
            }
        }
        tokio::select! {
            data = recv.recv() => match data {
                Ok(Some(b)) => decoder.push(b),
                Ok(None) => {
                    return if decoder.finish().is_ok() { Half::Finished } else { Half::Broken };
                }
                Err(()) => return Half::Broken,
            },
            Some(dg) = queued.recv() => {
                if send.send(datagram_capsule(&dg)).await.is_err() {
                    return Half::Broken;
                }
            }
        }
    }
}

pub type DownSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub type DownRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
pub type UpStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Both hops of a forwarded tunnel, after the next hop answered 2xx.
pub struct Hops {
    pub down_send: DownSend,
    pub down_recv: DownRecv,
    pub down_conn: quinn::Connection,
    pub down_registry: Registry,
    pub down_stream_id: u64,
    pub down_peer: Arc<h3::SharedState>,
    pub up: UpStream,
    pub lease: StreamLease,
}

/// Relay until either side ends; then end the other. Returns how it ended.
pub async fn relay(
    hops: Hops,
    stats: &ConnectUdpStats,
    mut shutdown: crate::shutdown::Waiter,
) -> crate::tunnel::End {
    use crate::tunnel::End;
    let Hops {
        mut down_send,
        mut down_recv,
        down_conn,
        down_registry,
        down_stream_id,
        down_peer,
        up,
        lease,
    } = hops;
    let up_stream_id = up.id().into_inner();
    let (mut up_send, mut up_recv) = up.split();

    let (to_up_tx, to_up_rx) = mpsc::channel(CAPSULE_QUEUE);
    let (to_down_tx, to_down_rx) = mpsc::channel(CAPSULE_QUEUE);
    let from_client: Arc<dyn DatagramSink> = Arc::new(HopSink {
        conn: lease.conn.conn.clone(),
        stream_id: up_stream_id,
        peer: lease.conn.peer.clone(),
        capsules: to_up_tx,
        stats: stats.clone(),
        toward_client: false,
    });
    let from_next_hop: Arc<dyn DatagramSink> = Arc::new(HopSink {
        conn: down_conn.clone(),
        stream_id: down_stream_id,
        peer: down_peer,
        capsules: to_down_tx,
        stats: stats.clone(),
        toward_client: true,
    });
    let _down_reg = RegistrationGuard::new(&down_registry, down_stream_id, from_client);
    let _up_reg = RegistrationGuard::new(&lease.conn.registry, up_stream_id, from_next_hop);

    let client_to_next = pump(&mut down_recv, &mut up_send, to_up_rx, stats, false);
    let next_to_client = pump(&mut up_recv, &mut down_send, to_down_rx, stats, true);
    enum Ended {
        Client(Half),
        NextHop(Half),
        Shutdown,
    }
    let ended = tokio::select! {
        h = client_to_next => Ended::Client(h),
        h = next_to_client => Ended::NextHop(h),
        _ = shutdown.wait() => Ended::Shutdown,
    };
    let end = match ended {
        Ended::Client(Half::Finished) => End::ClientFinished,
        Ended::Shutdown => End::Shutdown,
        Ended::NextHop(Half::Finished) => End::NextHopFinished,
        Ended::Client(Half::Broken) => End::ClientGone,
        Ended::NextHop(Half::Broken) => End::NextHopGone,
    };
    match end {
        End::ClientFinished | End::Shutdown => {
            let _ = up_send.finish().await;
            let _ = down_send.finish().await;
        }
        End::NextHopFinished => {
            let _ = down_send.finish().await;
            let _ = up_send.finish().await;
        }
        End::ClientGone => {
            up_send.stop_stream(Code::H3_REQUEST_CANCELLED);
            down_send.stop_stream(Code::H3_MESSAGE_ERROR);
        }
        _ => {
            down_send.stop_stream(Code::H3_CONNECT_ERROR);
            up_send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
    }
    drop(lease);
    end
}

/// Request headers that belong to one hop and are not forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "host",
];

fn copy_headers(from: &http::HeaderMap, to: &mut http::HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

pub type H3Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Everything the forwarder needs from the downstream side.
pub struct Downstream {
    pub stream: H3Stream,
    pub conn: quinn::Connection,
    pub registry: Registry,
    /// The client connection's HTTP/3 state (its SETTINGS).
    pub peer: Arc<h3::SharedState>,
}

/// Forward one CONNECT-UDP request to a host of `cluster`. On a refusal before anything
/// was sent to the client, the stream comes back with the rejection to send.
pub async fn forward_h3(
    down: Downstream,
    req: &http::Request<()>,
    cluster: &str,
    authority: Option<&str>,
    ctx: &crate::h3server::ListenerCtx,
    shutdown: crate::shutdown::Waiter,
) -> Result<(), (H3Stream, ferry_proto::request::Rejection)> {
    use crate::cluster::PickError;
    use crate::decide::reject;
    use crate::upstream::UpstreamError;

    let Downstream {
        mut stream,
        conn,
        registry,
        peer,
    } = down;
    let clusters = ctx.clusters.load();
    let Some(state) = clusters.get(cluster) else {
        return Err((
            stream,
            reject(
                503,
                Some("destination_unavailable"),
                format!("no cluster {cluster}"),
            ),
        ));
    };
    let Some(pool) = state.upstream.as_ref() else {
        return Err((
            stream,
            reject(
                503,
                Some("proxy_configuration_error"),
                format!(
                    "cluster {cluster} has no HTTP/3 upstream (typed_extension_protocol_options)"
                ),
            ),
        ));
    };
    let addr = match state.pick() {
        Ok(a) => a,
        Err(PickError::Dns(e)) => {
            return Err((
                stream,
                reject(503, Some("dns_error"), format!("cluster {cluster}: {e}")),
            ))
        }
        Err(e) => {
            return Err((
                stream,
                reject(
                    503,
                    Some("destination_unavailable"),
                    format!("cluster {cluster}: no healthy upstream ({e:?})"),
                ),
            ))
        }
    };
    let (tunnel_stats, counters) = ctx.stats.connect_udp.for_tunnel();
    crate::accesslog::note(|r| r.tunnel_opened(cluster, addr, None, &counters));
    let lease = match pool.lease(addr).await {
        Ok(l) => l,
        Err(UpstreamError::Timeout) => {
            return Err((
                stream,
                reject(
                    503,
                    Some("connection_timeout"),
                    format!("next hop {addr} did not answer in time"),
                ),
            ))
        }
        Err(UpstreamError::Refused(e)) => {
            return Err((
                stream,
                reject(
                    502,
                    Some("connection_refused"),
                    format!("next hop {addr}: {e}"),
                ),
            ))
        }
        Err(UpstreamError::Local(e)) => {
            return Err((stream, reject(503, Some("proxy_internal_error"), e)))
        }
    };

    // The request as the next hop sees it: Envoy's rewritten authority, or (pass-through)
    // the client's own.
    let authority = match authority {
        Some(a) => a.to_owned(),
        None => req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut up_req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{authority}{path}"))
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .body(());
    let up_req = match up_req.as_mut() {
        Ok(r) => {
            copy_headers(req.headers(), r.headers_mut());
            up_req
        }
        Err(_) => up_req,
    };
    let Ok(up_req) = up_req else {
        return Err((
            stream,
            reject(
                400,
                Some("http_request_error"),
                "request cannot be forwarded",
            ),
        ));
    };
    pool.stats.upstream_rq_total.inc();
    let mut send_request = lease.conn.send_request.clone();
    let mut up = match send_request.send_request(up_req).await {
        Ok(s) => s,
        Err(e) => {
            return Err((
                stream,
                reject(
                    502,
                    Some("connection_terminated"),
                    format!("next hop {addr}: {e}"),
                ),
            ))
        }
    };
    let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, up.recv_response()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err((
                stream,
                reject(
                    502,
                    Some("http_response_incomplete"),
                    format!("next hop {addr}: {e}"),
                ),
            ))
        }
        Err(_) => {
            return Err((
                stream,
                reject(
                    504,
                    Some("connection_read_timeout"),
                    format!("next hop {addr} sent no response"),
                ),
            ))
        }
    };

    // The next hop's status and headers reach the client.
    let status = resp.status();
    let mut down_resp = http::Response::new(());
    *down_resp.status_mut() = status;
    copy_headers(resp.headers(), down_resp.headers_mut());
    // Counted before the response leaves: whoever has seen it sees the counters too.
    ctx.stats.response(status.as_u16());
    let stats = &ctx.stats.connect_udp;
    crate::accesslog::note(|r| r.responded(status.as_u16(), down_resp.headers()));
    if !status.is_success() {
        stats.rejected(status.as_u16());
        if stream.send_response(down_resp).await.is_ok() {
            let _ = stream.finish().await;
        }
        return Ok(());
    }
    stats.tunnels_total.inc();
    ctx.stats.downstream_cx_upgrades_total.inc();
    let _tunnel_active = crate::stats::GaugeGuard::new(&stats.tunnels_active);
    let _upgrade_active = crate::stats::GaugeGuard::new(&ctx.stats.downstream_cx_upgrades_active);
    if stream.send_response(down_resp).await.is_err() {
        crate::accesslog::note(|r| r.tunnel_ended(crate::tunnel::End::ClientGone));
        return Ok(());
    }

    let down_stream_id = stream.send_id().into_inner();
    let (down_send, down_recv) = stream.split();
    tracing::debug!(down_stream_id, %addr, "forwarded tunnel open");
    let end = relay(
        Hops {
            down_send,
            down_recv,
            down_conn: conn,
            down_registry: registry,
            down_stream_id,
            down_peer: peer,
            up,
            lease,
        },
        &tunnel_stats,
        shutdown,
    )
    .await;
    crate::accesslog::note(|r| r.tunnel_ended(end));
    tracing::debug!(down_stream_id, ?end, "forwarded tunnel closed");
    Ok(())
}
