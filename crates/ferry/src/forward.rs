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

use crate::demux::{DatagramSink, H3Datagram, RegistrationGuard, Registry};
use crate::stats::{ConnectUdpStats, DropReason, Encoding};
use crate::stream::{StreamRecv, StreamSend};
use crate::tunnel::MAX_CAPSULE_LEN;
use crate::upstream::StreamLease;
use ferry_proto::request::Rejection;

/// Datagrams waiting to be sent as capsules on a stream, per direction.
const CAPSULE_QUEUE: usize = 256;

/// How long to wait for the next hop's response head.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// The QUIC side of an HTTP/3 hop: its connection, its stream, and its peer's SETTINGS.
pub struct QuicSide {
    pub conn: quinn::Connection,
    /// The hop's datagram demux, where this tunnel registers its stream.
    pub registry: Registry,
    /// This hop's stream id (its quarter stream id tags datagrams there).
    pub stream_id: u64,
    /// The hop's HTTP/3 state: whether it sent SETTINGS_H3_DATAGRAM is read per datagram
    /// (a `OnceLock` read), because the SETTINGS frame can arrive after the tunnel is set up.
    pub peer: Arc<h3::SharedState>,
    /// Datagrams that arrived (next hop side) before the relay was ready for them.
    pub early: Option<crate::demux::EarlyDatagrams>,
}

/// One hop of a forwarded tunnel: its request stream's halves and, over HTTP/3, its QUIC
/// datagrams. HTTP/2 and HTTP/1.1 hops have only the stream (the Capsule Protocol).
pub struct Side<R, S> {
    pub recv: R,
    pub send: S,
    pub quic: Option<QuicSide>,
    /// The response head still to send on `send` (HTTP/3 client hops): it goes out only
    /// once the tunnel's datagram routes are registered, so that a datagram the client
    /// sends as soon as it sees the 2xx is never taken for one of an unknown stream.
    pub respond: Option<http::Response<()>>,
}

/// Sends datagrams to one hop.
struct HopSink {
    /// The hop's QUIC datagrams, when it speaks HTTP/3: (connection, stream id, SETTINGS).
    quic: Option<(quinn::Connection, u64, Arc<h3::SharedState>)>,
    /// DATAGRAM capsules on the hop's stream: for hops without HTTP/3 datagrams.
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
            self.stats.rx.record(encoding, len);
            self.stats.upstream_datagrams_tx.inc();
        }
    }

    /// Whether the hop takes QUIC datagrams (HTTP/3 with SETTINGS_H3_DATAGRAM).
    fn quic_datagrams(&self) -> Option<(&quinn::Connection, u64)> {
        use h3::ConnectionState;
        let (conn, id, peer) = self.quic.as_ref()?;
        peer.settings().enable_datagram().then_some((conn, *id))
    }

    /// Send one HTTP/3 datagram as a QUIC datagram on the hop, re-tagged with the hop's
    /// quarter stream id (in place when it can be: [`retag`]).
    fn send_quic(
        &self,
        conn: &quinn::Connection,
        stream_id: u64,
        datagram: H3Datagram,
    ) -> Result<(), DropReason> {
        let qsid = stream_id / 4;
        let payload_len = datagram.bytes.len().saturating_sub(datagram.header_len);
        let header = if fits_varint(qsid, datagram.header_len) {
            datagram.header_len
        } else {
            ferry_proto::varint::encoded_len(qsid)
        };
        let Some(max) = conn.max_datagram_size() else {
            return Err(DropReason::TooLarge);
        };
        if header + payload_len > max {
            return Err(DropReason::TooLarge);
        }
        if conn.datagram_send_buffer_space() < header + payload_len {
            return Err(DropReason::BufferFull);
        }
        match conn.send_datagram(retag(datagram, qsid)?) {
            Ok(()) => {
                self.record(Encoding::QuicDatagram, payload_len);
                Ok(())
            }
            Err(quinn::SendDatagramError::TooLarge) => Err(DropReason::TooLarge),
            Err(_) => Err(DropReason::SocketError),
        }
    }
}

/// Whether `v` can be written as a varint of exactly `len` bytes (varints need not be
/// minimal: RFC 9000 section 16).
fn fits_varint(v: u64, len: usize) -> bool {
    match len {
        1 => v < 1 << 6,
        2 => v < 1 << 14,
        4 => v < 1 << 30,
        8 => v <= ferry_proto::varint::MAX,
        _ => false,
    }
}

/// Write `v` as a varint filling `out` (1, 2, 4 or 8 bytes; checked by [`fits_varint`]).
fn write_varint_exact(v: u64, out: &mut [u8]) {
    let n = out.len();
    for (i, b) in out.iter_mut().enumerate() {
        *b = (v >> (8 * (n - 1 - i))) as u8;
    }
    let prefix = match n {
        1 => 0x00,
        2 => 0x40,
        4 => 0x80,
        _ => 0xc0,
    };
    if let Some(first) = out.first_mut() {
        *first |= prefix;
    }
}

/// `datagram` re-tagged with quarter stream id `qsid` for the other hop. The quarter stream
/// id is overwritten in place when the old one's bytes can hold the new one and the buffer
/// is not shared (`Bytes::try_into_mut`): no allocation, no copy. Otherwise (a buffer shared
/// with other datagrams of the same receive batch, or an id of another length) the payload
/// is copied behind the new id.
pub(crate) fn retag(datagram: H3Datagram, qsid: u64) -> Result<Bytes, DropReason> {
    let H3Datagram {
        mut bytes,
        header_len,
    } = datagram;
    if fits_varint(qsid, header_len) && bytes.len() >= header_len {
        match bytes.try_into_mut() {
            Ok(mut unique) => {
                write_varint_exact(qsid, &mut unique[..header_len]);
                return Ok(unique.freeze());
            }
            Err(shared) => bytes = shared,
        }
    }
    let payload = bytes.get(header_len..).ok_or(DropReason::Malformed)?;
    let mut out = BytesMut::with_capacity(ferry_proto::varint::encoded_len(qsid) + payload.len());
    ferry_proto::varint::put(qsid, &mut out).map_err(|_| DropReason::Malformed)?;
    out.extend_from_slice(payload);
    Ok(out.freeze())
}

impl DatagramSink for HopSink {
    /// A datagram from the early queue (payload only): as [`Self::deliver_h3`].
    fn deliver(&self, payload: Bytes) -> Result<(), DropReason> {
        self.deliver_h3(H3Datagram {
            bytes: payload,
            header_len: 0,
        })
    }

    /// A QUIC datagram from the other hop.
    fn deliver_h3(&self, datagram: H3Datagram) -> Result<(), DropReason> {
        match self.quic_datagrams() {
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
            //# intermediaries ... SHOULD NOT convert ... a DATAGRAM frame ... too large
            // An intermediary drops it rather than turning it into a capsule.
            Some((conn, id)) => self.send_quic(conn, id, datagram),
            None => {
                let payload = datagram.payload();
                let len = payload.len();
                self.capsules
                    .try_send(payload)
                    .map_err(|_| DropReason::BufferFull)?;
                self.record(Encoding::Capsule, len);
                Ok(())
            }
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
/// datagrams (as DATAGRAM capsules) go out on `send`. `convert`: the sending hop speaks
/// only the Capsule Protocol (HTTP/2, HTTP/1.1) and the receiving hop is HTTP/3, so its
/// DATAGRAM capsules become QUIC datagrams where the receiving hop takes them and they fit
/// (RFC 9297 section 3.5); otherwise they stay capsules, never lost.
async fn pump(
    recv: &mut impl StreamRecv,
    send: &mut impl StreamSend,
    mut queued: mpsc::Receiver<Bytes>,
    stats: &ConnectUdpStats,
    toward_client: bool,
    convert: Option<&HopSink>,
) -> Half {
    let mut decoder = CapsuleDecoder::new(MAX_CAPSULE_LEN);
    loop {
        loop {
            match decoder.next() {
                Ok(Some(c)) => {
                    if let Capsule::Datagram(p) = &c {
                        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
                        //# an intermediary MAY send a DATAGRAM capsule to forward an HTTP
                        //# Datagram that was received in a QUIC DATAGRAM frame and vice versa.
                        if let Some((sink, (conn, id))) =
                            convert.and_then(|s| s.quic_datagrams().map(|q| (s, q)))
                        {
                            let datagram = H3Datagram {
                                bytes: p.clone(),
                                header_len: 0,
                            };
                            if sink.send_quic(conn, id, datagram).is_ok() {
                                continue;
                            }
                        }
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
pub type DownRecv = h3::server::RequestStream<crate::h3limit::GuardedRecv, Bytes>;
pub type UpStream = h3::client::RequestStream<crate::h3limit::GuardedBidi, Bytes>;

/// Relay between the client's hop (`down`) and the next hop (`up`) until either side
/// ends, or `max_duration` (the HCM's `max_stream_duration`) has passed; then end the
/// other. Returns how it ended.
pub async fn relay<DR, DS, UR, US>(
    down: Side<DR, DS>,
    up: Side<UR, US>,
    stats: &ConnectUdpStats,
    max_duration: Option<std::time::Duration>,
    mut shutdown: crate::shutdown::Waiter,
) -> crate::tunnel::End
where
    DR: StreamRecv,
    DS: StreamSend,
    UR: StreamRecv,
    US: StreamSend,
{
    use crate::tunnel::End;
    let Side {
        recv: mut down_recv,
        send: mut down_send,
        quic: down_quic,
        respond,
    } = down;
    let Side {
        recv: mut up_recv,
        send: mut up_send,
        quic: mut up_quic,
        respond: _,
    } = up;

    let (to_up_tx, to_up_rx) = mpsc::channel(CAPSULE_QUEUE);
    let (to_down_tx, to_down_rx) = mpsc::channel(CAPSULE_QUEUE);
    let quic_of = |q: &Option<QuicSide>| {
        q.as_ref()
            .map(|q| (q.conn.clone(), q.stream_id, q.peer.clone()))
    };
    let toward_up = Arc::new(HopSink {
        quic: quic_of(&up_quic),
        capsules: to_up_tx,
        stats: stats.clone(),
        toward_client: false,
    });
    let toward_down = Arc::new(HopSink {
        quic: quic_of(&down_quic),
        capsules: to_down_tx,
        stats: stats.clone(),
        toward_client: true,
    });
    // Each HTTP/3 hop's QUIC datagrams go to the other hop.
    let _down_reg = down_quic.as_ref().map(|q| {
        RegistrationGuard::new(
            &q.registry,
            q.stream_id,
            toward_up.clone() as Arc<dyn DatagramSink>,
        )
    });
    let _up_reg = match up_quic.as_mut() {
        Some(q) => {
            let sink = toward_down.clone() as Arc<dyn DatagramSink>;
            Some(match q.early.take() {
                Some(early) => early.hand_over(sink, stats).await,
                None => RegistrationGuard::new(&q.registry, q.stream_id, sink),
            })
        }
        None => None,
    };
    // Capsule-only hop -> HTTP/3 hop: convert DATAGRAM capsules.
    let convert_up = (down_quic.is_none() && up_quic.is_some()).then_some(&*toward_up);
    let convert_down = (up_quic.is_none() && down_quic.is_some()).then_some(&*toward_down);

    if let Some(head) = respond {
        if down_send.respond(head).await.is_err() {
            up_send.reset(Code::H3_REQUEST_CANCELLED);
            return End::ClientGone;
        }
    }

    let client_to_next = pump(
        &mut down_recv,
        &mut up_send,
        to_up_rx,
        stats,
        false,
        convert_up,
    );
    let next_to_client = pump(
        &mut up_recv,
        &mut down_send,
        to_down_rx,
        stats,
        true,
        convert_down,
    );
    enum Ended {
        Client(Half),
        NextHop(Half),
        Shutdown,
        MaxDuration,
    }
    let ended = tokio::select! {
        h = client_to_next => Ended::Client(h),
        h = next_to_client => Ended::NextHop(h),
        _ = crate::tunnel::max_duration(max_duration) => Ended::MaxDuration,
        _ = shutdown.wait() => Ended::Shutdown,
    };
    let end = match ended {
        Ended::Client(Half::Finished) => End::ClientFinished,
        Ended::Shutdown => End::Shutdown,
        Ended::MaxDuration => End::Reset(crate::stats::ResetReason::MaxDuration),
        Ended::NextHop(Half::Finished) => End::NextHopFinished,
        Ended::Client(Half::Broken) => End::ClientGone,
        Ended::NextHop(Half::Broken) => End::NextHopGone,
    };
    match end {
        End::ClientFinished | End::Shutdown => {
            up_send.finish().await;
            down_send.finish().await;
        }
        End::NextHopFinished => {
            down_send.finish().await;
            up_send.finish().await;
        }
        End::ClientGone => {
            up_send.reset(Code::H3_REQUEST_CANCELLED);
            down_send.reset(Code::H3_MESSAGE_ERROR);
        }
        End::Reset(reason @ crate::stats::ResetReason::MaxDuration) => {
            stats.reset(reason);
            down_send.reset(Code::H3_NO_ERROR);
            up_send.reset(Code::H3_REQUEST_CANCELLED);
        }
        _ => {
            down_send.reset(Code::H3_CONNECT_ERROR);
            up_send.reset(Code::H3_REQUEST_CANCELLED);
        }
    }
    end
}

/// The next hop's side of a tunnel it accepted.
pub enum NextHopTunnel {
    /// An HTTP/3 stream, holding its slot on the pooled connection.
    H3 {
        stream: Box<UpStream>,
        lease: StreamLease,
        early: crate::demux::EarlyDatagrams,
    },
    /// An HTTP/2 or HTTP/1.1 upgraded stream.
    Tcp {
        recv: crate::upstream_tcp::TcpRecv,
        send: crate::upstream_tcp::TcpSend,
    },
}

/// The next hop's answer to a forwarded request.
pub struct NextHop {
    /// Its status as the client's HTTP version would say it: an HTTP/1.1 next hop's
    /// 101 is a 200 here (the client's hop turns it back into 101 for HTTP/1.1).
    pub status: http::StatusCode,
    /// Its end-to-end response headers.
    pub headers: http::HeaderMap,
    /// The tunnel, when it accepted.
    pub tunnel: Option<NextHopTunnel>,
    pub addr: std::net::SocketAddr,
}

/// Relay between the client's hop and whichever kind of next hop accepted.
pub async fn relay_next_hop<DR: StreamRecv, DS: StreamSend>(
    down: Side<DR, DS>,
    up: NextHopTunnel,
    stats: &ConnectUdpStats,
    max_duration: Option<std::time::Duration>,
    shutdown: crate::shutdown::Waiter,
) -> crate::tunnel::End {
    match up {
        NextHopTunnel::H3 {
            stream,
            lease,
            early,
        } => {
            let stream_id = stream.id().into_inner();
            let (send, recv) = (*stream).split();
            let up = Side {
                recv,
                send,
                quic: Some(QuicSide {
                    conn: lease.conn.conn.clone(),
                    registry: lease.conn.registry.clone(),
                    stream_id,
                    peer: lease.conn.peer.clone(),
                    early: Some(early),
                }),
                respond: None,
            };
            let end = relay(down, up, stats, max_duration, shutdown).await;
            drop(lease);
            end
        }
        NextHopTunnel::Tcp { recv, send } => {
            relay(
                down,
                Side {
                    recv,
                    send,
                    quic: None,
                    respond: None,
                },
                stats,
                max_duration,
                shutdown,
            )
            .await
        }
    }
}

/// Request and response headers that belong to one hop and are not forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "host",
    "content-length",
];

/// Copy end-to-end headers from one hop's message to the other's.
pub fn copy_headers(from: &http::HeaderMap, to: &mut http::HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

pub type H3Stream = h3::server::RequestStream<crate::h3limit::GuardedBidi, Bytes>;

/// Everything the forwarder needs from the downstream side.
pub struct Downstream {
    pub stream: H3Stream,
    pub conn: quinn::Connection,
    pub registry: Registry,
    /// The client connection's HTTP/3 state (its SETTINGS).
    pub peer: Arc<h3::SharedState>,
}

/// An accepted next hop, with the tunnel's own stats (for its access-log counters).
pub struct Opened {
    pub next: NextHop,
    pub stats: ConnectUdpStats,
}

/// Send a CONNECT-UDP request on to a host of `cluster`, over the cluster's HTTP version,
/// and wait for its answer. `authority`: the `:authority` to send (None: the client's own).
/// A refusal here is Ferry's (no next hop answered); the next hop's own refusals come
/// back as a [`NextHop`] without a tunnel.
pub async fn open_next_hop(
    req: &http::Request<()>,
    cluster: &str,
    authority: Option<&str>,
    ctx: &crate::h3server::ListenerCtx,
) -> Result<Opened, Rejection> {
    use crate::cluster::PickError;
    use crate::decide::reject;

    let clusters = ctx.clusters.load();
    let Some(state) = clusters.get(cluster) else {
        return Err(reject(
            503,
            Some("destination_unavailable"),
            format!("no cluster {cluster}"),
        ));
    };
    if state.upstream.is_none() && state.tcp_upstream.is_none() {
        return Err(reject(
            503,
            Some("proxy_configuration_error"),
            format!("cluster {cluster} has no upstream HTTP protocol (typed_extension_protocol_options)"),
        ));
    }
    let addr = match state.pick() {
        Ok(a) => a,
        Err(PickError::Dns(e)) => {
            return Err(reject(
                503,
                Some("dns_error"),
                format!("cluster {cluster}: {e}"),
            ))
        }
        Err(e) => {
            return Err(reject(
                503,
                Some("destination_unavailable"),
                format!("cluster {cluster}: no healthy upstream ({e:?})"),
            ))
        }
    };
    let (tunnel_stats, counters) = ctx.stats.connect_udp.for_tunnel();
    crate::accesslog::note(|r| r.tunnel_opened(cluster, addr, None, &counters));

    // The request as the next hop sees it: Envoy's rewritten authority, or (pass-through)
    // the client's own.
    let authority = match authority {
        Some(a) => a.to_owned(),
        None => req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let next = match (&state.upstream, &state.tcp_upstream) {
        (Some(pool), _) => open_h3(pool, addr, &authority, path, req.headers()).await?,
        (None, Some(pool)) => open_tcp(pool, addr, &authority, path, req.headers()).await?,
        (None, None) => return Err(reject(503, Some("proxy_internal_error"), "no pool")),
    };
    Ok(Opened {
        next,
        stats: tunnel_stats,
    })
}

fn connect_rejection(addr: std::net::SocketAddr, e: crate::upstream::UpstreamError) -> Rejection {
    use crate::decide::reject;
    use crate::upstream::UpstreamError;
    match e {
        UpstreamError::Timeout => reject(
            503,
            Some("connection_timeout"),
            format!("next hop {addr} did not answer in time"),
        ),
        UpstreamError::Refused(e) => reject(
            502,
            Some("connection_refused"),
            format!("next hop {addr}: {e}"),
        ),
        UpstreamError::Local(e) => reject(503, Some("proxy_internal_error"), e),
    }
}

fn no_response(addr: std::net::SocketAddr) -> Rejection {
    crate::decide::reject(
        504,
        Some("connection_read_timeout"),
        format!("next hop {addr} sent no response"),
    )
}

async fn open_h3(
    pool: &crate::upstream::UpstreamPool,
    addr: std::net::SocketAddr,
    authority: &str,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<NextHop, Rejection> {
    use crate::decide::reject;
    let lease = pool
        .lease(addr)
        .await
        .map_err(|e| connect_rejection(addr, e))?;
    let mut up_req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{authority}{path}"))
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .body(());
    if let Ok(r) = up_req.as_mut() {
        copy_headers(headers, r.headers_mut());
    }
    let up_req = up_req.map_err(|_| {
        reject(
            400,
            Some("http_request_error"),
            "request cannot be forwarded",
        )
    })?;
    pool.stats.upstream_rq_total.inc();
    let mut send_request = lease.conn.send_request.clone();
    let mut up = send_request.send_request(up_req).await.map_err(|e| {
        reject(
            502,
            Some("connection_terminated"),
            format!("next hop {addr}: {e}"),
        )
    })?;
    // The next hop may send a datagram right after its 2xx: take it from now on. (No read
    // is pending yet, so `id()` is safe with h3-quinn.)
    let early = crate::demux::EarlyDatagrams::register(&lease.conn.registry, up.id().into_inner());
    let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, up.recv_response()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(reject(
                502,
                Some("http_response_incomplete"),
                format!("next hop {addr}: {e}"),
            ))
        }
        Err(_) => return Err(no_response(addr)),
    };
    let status = resp.status();
    let mut headers = http::HeaderMap::new();
    copy_headers(resp.headers(), &mut headers);
    Ok(NextHop {
        status,
        headers,
        tunnel: status.is_success().then_some(NextHopTunnel::H3 {
            stream: Box::new(up),
            lease,
            early,
        }),
        addr,
    })
}

async fn open_tcp(
    pool: &crate::upstream_tcp::TcpPool,
    addr: std::net::SocketAddr,
    authority: &str,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<NextHop, Rejection> {
    use crate::decide::reject;
    use crate::upstream_tcp::SendError;
    // Connecting is bounded by connect_timeout inside; the answer by RESPONSE_TIMEOUT.
    let answer = pool.open(addr, authority, path, headers);
    let answer = match tokio::time::timeout(pool.connect_timeout() + RESPONSE_TIMEOUT, answer).await
    {
        Ok(Ok(a)) => a,
        Ok(Err(SendError::Connect(e))) => return Err(connect_rejection(addr, e)),
        Ok(Err(SendError::Request(e))) => {
            return Err(reject(
                502,
                Some("http_response_incomplete"),
                format!("next hop {addr}: {e}"),
            ))
        }
        Err(_) => return Err(no_response(addr)),
    };
    let mut headers = http::HeaderMap::new();
    copy_headers(&answer.headers, &mut headers);
    let (status, tunnel) = match answer.io {
        // An HTTP/1.1 next hop's 101 Switching Protocols is a 2xx for the client's hop.
        Some((recv, send)) => {
            let status = if answer.status == http::StatusCode::SWITCHING_PROTOCOLS {
                http::StatusCode::OK
            } else {
                answer.status
            };
            (status, Some(NextHopTunnel::Tcp { recv, send }))
        }
        //= https://www.rfc-editor.org/rfc/rfc9298#section-3.3
        //# ... the UDP proxy ... responds with a 101 (Switching Protocols) status code
        // Anything else 2xx from an HTTP/1.1 next hop is no tunnel (Envoy 1.40 answers 200
        // and streams a chunked body): a protocol error, not a success to pass on.
        None if answer.status.is_success() => {
            return Err(reject(
                502,
                Some("http_protocol_error"),
                format!(
                "next hop {addr} answered {} to an HTTP/1.1 Upgrade: connect-udp (expected 101)",
                answer.status.as_u16()
            ),
            ))
        }
        None => (answer.status, None),
    };
    Ok(NextHop {
        status,
        headers,
        tunnel,
        addr,
    })
}

/// Forward one CONNECT-UDP request from an HTTP/3 client to a host of `cluster`. On a
/// refusal before anything was sent to the client, the stream comes back with the
/// rejection to send.
pub async fn forward_h3(
    down: Downstream,
    req: &http::Request<()>,
    cluster: &str,
    authority: Option<&str>,
    ctx: &crate::h3server::ListenerCtx,
    shutdown: crate::shutdown::Waiter,
) -> Result<(), (H3Stream, Rejection)> {
    let Downstream {
        mut stream,
        conn,
        registry,
        peer,
    } = down;
    let Opened {
        next,
        stats: tunnel_stats,
    } = match open_next_hop(req, cluster, authority, ctx).await {
        Ok(o) => o,
        Err(r) => return Err((stream, r)),
    };

    // The next hop's status and headers reach the client.
    let status = next.status;
    let mut down_resp = http::Response::new(());
    *down_resp.status_mut() = status;
    *down_resp.headers_mut() = next.headers;
    // Counted before the response leaves: whoever has seen it sees the counters too.
    ctx.stats.response(status.as_u16());
    let stats = &ctx.stats.connect_udp;
    crate::accesslog::note(|r| r.responded(status.as_u16(), down_resp.headers()));
    let Some(tunnel) = next.tunnel else {
        stats.rejected(status.as_u16());
        if stream.send_response(down_resp).await.is_ok() {
            let _ = stream.finish().await;
        }
        return Ok(());
    };
    stats.tunnels_total.inc();
    ctx.stats.downstream_cx_upgrades_total.inc();
    let _tunnel_active = crate::stats::GaugeGuard::new(&stats.tunnels_active);
    let _upgrade_active = crate::stats::GaugeGuard::new(&ctx.stats.downstream_cx_upgrades_active);

    let down_stream_id = stream.send_id().into_inner();
    let (down_send, down_recv) = stream.split();
    let addr = next.addr;
    tracing::debug!(down_stream_id, %addr, "forwarded tunnel open");
    let down = Side {
        recv: down_recv,
        send: down_send,
        quic: Some(QuicSide {
            conn,
            registry,
            stream_id: down_stream_id,
            peer,
            early: None,
        }),
        respond: Some(down_resp),
    };
    let max_duration = ctx.hcm.load().max_stream_duration;
    let end = relay_next_hop(down, tunnel, &tunnel_stats, max_duration, shutdown).await;
    crate::accesslog::note(|r| r.tunnel_ended(end));
    tracing::debug!(down_stream_id, ?end, "forwarded tunnel closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_proto::datagram;

    fn h3(qsid: u64, payload: &[u8]) -> H3Datagram {
        let mut b = BytesMut::new();
        ferry_proto::varint::put(qsid, &mut b).unwrap();
        b.extend_from_slice(payload);
        H3Datagram {
            header_len: ferry_proto::varint::encoded_len(qsid),
            bytes: b.freeze(),
        }
    }

    /// Same id length and an unshared buffer: the id is overwritten where it is, the
    /// buffer reused (no allocation, no copy).
    #[test]
    fn retag_in_place_when_unique_and_same_length() {
        let dg = h3(5, b"\x00payload");
        let before = dg.bytes.as_ptr();
        let out = retag(dg, 60).unwrap();
        assert_eq!(out.as_ptr(), before, "rewritten in place");
        assert_eq!(
            datagram::decode_h3(&out).unwrap(),
            (60, &b"\x00payload"[..])
        );
    }

    /// A shorter new id fits a longer old one, written non-minimally (RFC 9000 allows it).
    #[test]
    fn retag_in_place_non_minimal() {
        let dg = h3(1000, b"\x00x");
        let before = dg.bytes.as_ptr();
        let out = retag(dg, 2).unwrap();
        assert_eq!(out.as_ptr(), before);
        assert_eq!(out.len(), 4);
        assert_eq!(datagram::decode_h3(&out).unwrap(), (2, &b"\x00x"[..]));
    }

    /// A shared buffer, or a new id longer than the old one: copied, the original intact.
    #[test]
    fn retag_copies_when_shared_or_longer() {
        let dg = h3(5, b"\x00abc");
        let keep = dg.bytes.clone();
        let out = retag(dg, 7).unwrap();
        assert_ne!(out.as_ptr(), keep.as_ptr());
        assert_eq!(datagram::decode_h3(&out).unwrap(), (7, &b"\x00abc"[..]));
        assert_eq!(datagram::decode_h3(&keep).unwrap(), (5, &b"\x00abc"[..]));

        let out = retag(h3(5, b"\x00abc"), 100_000).unwrap();
        assert_eq!(
            datagram::decode_h3(&out).unwrap(),
            (100_000, &b"\x00abc"[..])
        );

        // A payload without a quarter stream id (a capsule's, header_len 0) gets one.
        let out = retag(
            H3Datagram {
                bytes: Bytes::from_static(b"\x00abc"),
                header_len: 0,
            },
            9,
        )
        .unwrap();
        assert_eq!(datagram::decode_h3(&out).unwrap(), (9, &b"\x00abc"[..]));
    }

    #[test]
    fn varint_exact_lengths() {
        for (v, len) in [(0u64, 1usize), (63, 1), (63, 8), (16383, 2), (1 << 29, 4)] {
            assert!(fits_varint(v, len));
            let mut buf = vec![0u8; len];
            write_varint_exact(v, &mut buf);
            assert_eq!(ferry_proto::varint::decode(&buf).unwrap(), (v, len));
        }
        assert!(!fits_varint(64, 1));
        assert!(!fits_varint(1 << 14, 2));
        assert!(!fits_varint(1, 3));
    }
}
