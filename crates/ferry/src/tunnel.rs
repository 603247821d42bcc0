//! Terminating a CONNECT-UDP tunnel: relaying between the request stream (DATAGRAM capsules),
//! QUIC DATAGRAM frames and one connected UDP socket to the target.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_proto::capsule::{Capsule, CapsuleDecoder, CapsuleError};
use ferry_proto::datagram::{self, MAX_UDP_PAYLOAD};
use h3::error::Code;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::demux::DatagramSink;
use crate::stats::{ConnectUdpStats, DropReason, Encoding, ResetReason};
use crate::stream::{StreamRecv, StreamSend};

/// Socket buffer size asked for on target-side sockets (the kernel caps it at rmem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// The largest DATAGRAM capsule Ferry accepts: a context id (up to 8 bytes) and the largest
/// UDP payload. Anything declared larger is refused as soon as its header is seen.
pub const MAX_CAPSULE_LEN: u64 = (MAX_UDP_PAYLOAD + 8) as u64;

/// Room kept in front of each payload read from the target for the largest header:
/// a DATAGRAM capsule header (type, length, context id) or an HTTP/3 datagram header
/// (quarter stream id, context id).
const HEADROOM: usize = 16;

/// What one receive needs free: headroom and the largest UDP payload.
const RECV_NEED: usize = HEADROOM + MAX_UDP_PAYLOAD + 1;

/// Receive buffers are carved out of blocks of this size: each datagram takes only its own
/// length from the block (then travels on as a `Bytes` slice of it, uncopied), so one
/// allocation serves many datagrams. (Asking `BytesMut::reserve` for 64 KiB after each split
/// would allocate a fresh 64 KiB block per datagram.)
const RECV_BLOCK: usize = 256 * 1024;

/// Open a UDP socket connected to `target`, with large buffers.
pub fn connect_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, it just overflows sooner in bursts.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    let local: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&local.into())?;
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
    //# When using a connected UDP socket, the UDP proxy MUST validate the
    //# IP source address and UDP source port on received packets ...
    // A connected socket makes the kernel do that check for us.
    socket.connect(&target.into())?;
    UdpSocket::from_std(socket.into())
}

/// A target socket opened for a tunnel, with what must live as long as the tunnel.
pub struct Opened {
    pub shared: Arc<TunnelShared>,
    pub addr: SocketAddr,
    /// Counts the socket in `cluster.<name>.upstream_cx_active` until dropped.
    pub upstream: crate::stats::UpstreamGuard,
}

/// Pick a host of `cluster` (for a dynamic forward proxy cluster: resolve `target` and
/// check it against the destination policy) and open a connected UDP socket to it: the
/// part of terminating a tunnel before the response, the same for every HTTP version.
/// Counts cluster stats and notes the tunnel in the request's access-log record.
pub async fn open_target(
    ctx: &crate::h3server::ListenerCtx,
    cluster: &str,
    target: &ferry_proto::template::Target,
) -> Result<Opened, ferry_proto::request::Rejection> {
    use crate::cluster::PickError;
    use crate::decide::reject;
    let clusters = ctx.clusters.load_full();
    let cluster_stats = ctx.stats.clusters.get(cluster);
    let state = clusters.get(cluster);
    if let Some(cache) = state.and_then(|c| c.dns_cache.as_ref()) {
        let hcm = ctx.hcm.load_full();
        let addr =
            crate::dfp::resolve_target(cache, &hcm.destination_policy, &clusters.own_addrs, target)
                .await
                .inspect_err(|r| {
                    if r.error == Some("dns_error") {
                        cluster_stats.upstream_cx_none_healthy.inc();
                    }
                })?;
        return open_socket(ctx, cluster, cluster_stats, addr);
    }
    let picked = match state {
        Some(c) => c.pick(),
        None => Err(PickError::NoSuchCluster),
    };
    let addr = match picked {
        Ok(a) => a,
        Err(e) => {
            cluster_stats.upstream_cx_none_healthy.inc();
            return Err(match e {
                PickError::Dns(e) => {
                    reject(503, Some("dns_error"), format!("cluster {cluster}: {e}"))
                }
                e => reject(
                    503,
                    Some("destination_unavailable"),
                    format!("cluster {cluster}: no healthy upstream ({e:?})"),
                ),
            });
        }
    };
    open_socket(ctx, cluster, cluster_stats, addr)
}

fn open_socket(
    ctx: &crate::h3server::ListenerCtx,
    cluster: &str,
    cluster_stats: crate::stats::ClusterUdpStats,
    addr: SocketAddr,
) -> Result<Opened, ferry_proto::request::Rejection> {
    use crate::decide::reject;
    let udp = connect_udp(addr).map_err(|e| {
        cluster_stats.upstream_cx_connect_fail.inc();
        reject(
            503,
            Some("destination_unavailable"),
            format!("cannot open UDP socket to {addr}: {e}"),
        )
    })?;
    let upstream = cluster_stats.socket_opened();
    let (tunnel_stats, counters) = ctx.stats.connect_udp.for_tunnel();
    crate::accesslog::note(|r| r.tunnel_opened(cluster, addr, udp.local_addr().ok(), &counters));
    let shared = Arc::new(TunnelShared {
        udp,
        active: AtomicBool::new(false),
        failed: Notify::new(),
        stats: tunnel_stats,
    });
    Ok(Opened {
        shared,
        addr,
        upstream,
    })
}

/// What the demux task and the tunnel task share.
pub struct TunnelShared {
    pub udp: UdpSocket,
    /// Set on every datagram either way; the idle timer clears it.
    pub active: AtomicBool,
    /// Woken when the target socket reports an error to the demux task.
    pub failed: Notify,
    pub stats: ConnectUdpStats,
}

impl DatagramSink for TunnelShared {
    #[inline]
    fn deliver(&self, http_datagram_payload: Bytes) -> Result<(), DropReason> {
        //= https://www.rfc-editor.org/rfc/rfc9298#section-4
        //# If an HTTP/3 Datagram is received with an unknown Context ID, the
        //# receiver SHOULD drop it (or buffer it briefly).
        let payload = match datagram::split_context_id(http_datagram_payload) {
            Ok((datagram::CONTEXT_ID_UDP, payload)) => payload,
            Ok(_) => return Err(DropReason::UnknownContextId),
            Err(_) => return Err(DropReason::Malformed),
        };
        self.active.store(true, Ordering::Relaxed);
        self.stats.rx.record(Encoding::QuicDatagram, payload.len());
        match self.udp.try_send(&payload) {
            Ok(_) => {
                self.stats.upstream_datagrams_tx.inc();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(DropReason::BufferFull),
            Err(_) => {
                //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
                //# If the UDP proxy is notified by its operating system that its socket is no
                //# longer usable, it MUST close the request stream.
                self.failed.notify_one();
                Err(DropReason::SocketError)
            }
        }
    }

    fn dropped(&self, _reason: DropReason) {
        self.stats.tunnel_dropped();
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client finished its side of the stream.
    ClientFinished,
    /// The client reset the stream or the connection went away.
    ClientGone,
    /// Ferry resets the stream for this reason.
    Reset(ResetReason),
    /// The server is shutting down.
    Shutdown,
    /// Forwarding: the next hop finished its side of the stream.
    NextHopFinished,
    /// Forwarding: the next hop reset the stream, or its connection went away.
    NextHopGone,
}

/// The QUIC datagram path of an HTTP/3 tunnel (absent over HTTP/2 and HTTP/1.1).
pub struct DatagramOut {
    pub conn: quinn::Connection,
    pub stream_id: u64,
    /// The client connection's HTTP/3 state: whether it sent SETTINGS_H3_DATAGRAM is read
    /// per datagram, because SETTINGS can arrive after the request.
    pub peer: Arc<h3::SharedState>,
}

/// The timers that end a tunnel: the HCM's `stream_idle_timeout` and
/// `common_http_protocol_options.max_stream_duration` (None: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub idle: Option<Duration>,
    pub max_duration: Option<Duration>,
}

impl Timeouts {
    pub fn of(hcm: &ferry_config::HttpConnectionManager) -> Self {
        Timeouts {
            idle: hcm.stream_idle_timeout,
            max_duration: hcm.max_stream_duration,
        }
    }
}

/// Resolves when `max` has passed (never when None).
pub async fn max_duration(max: Option<Duration>) {
    match max {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Relay until one side ends. `initial` holds request body bytes already read.
pub async fn relay<R: StreamRecv, S: StreamSend>(
    recv: &mut R,
    send: &mut S,
    datagrams: Option<&DatagramOut>,
    shared: &TunnelShared,
    initial: Option<Bytes>,
    timeouts: Timeouts,
    mut shutdown: crate::shutdown::Waiter,
) -> End {
    let to_target = client_to_target(recv, shared, initial);
    let to_client = target_to_client(send, datagrams, shared);
    tokio::select! {
        end = to_target => end,
        end = to_client => end,
        end = idle(shared, timeouts.idle) => end,
        _ = max_duration(timeouts.max_duration) => End::Reset(ResetReason::MaxDuration),
        _ = shared.failed.notified() => End::Reset(ResetReason::SocketError),
        _ = shutdown.wait() => End::Shutdown,
    }
}

/// Close the downstream stream the way `end` says.
pub async fn close<S: StreamSend>(send: &mut S, end: End, stats: &ConnectUdpStats) {
    match end {
        End::ClientFinished | End::Shutdown | End::NextHopFinished => send.finish().await,
        End::ClientGone => {}
        End::NextHopGone => send.reset(Code::H3_CONNECT_ERROR),
        End::Reset(reason) => {
            stats.reset(reason);
            let code = match reason {
                //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
                //# Receipt of a malformed capsule ... MUST be treated as a malformed HTTP message
                ResetReason::MalformedCapsule | ResetReason::CapsuleTooLarge => {
                    Code::H3_MESSAGE_ERROR
                }
                ResetReason::SocketError => Code::H3_CONNECT_ERROR,
                ResetReason::IdleTimeout | ResetReason::MaxDuration => Code::H3_NO_ERROR,
            };
            // The receive half is not stopped explicitly: h3-quinn 0.0.10 panics in
            // stop_sending while a read is in flight. Dropping it makes quinn send
            // STOP_SENDING (and over HTTP/2 or HTTP/1.1, dropping resets or closes).
            send.reset(code);
        }
    }
}

async fn idle(shared: &TunnelShared, timeout: Option<Duration>) -> End {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    // Four checks per period: the tunnel closes between 1 and 1.25 timeouts after its last
    // datagram, without reading the clock on the datagram path.
    let tick = (timeout / 4).max(Duration::from_millis(1));
    let mut idle_ticks = 0u32;
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    loop {
        interval.tick().await;
        if shared.active.swap(false, Ordering::Relaxed) {
            idle_ticks = 0;
        } else {
            idle_ticks += 1;
            if idle_ticks >= 4 {
                return End::Reset(ResetReason::IdleTimeout);
            }
        }
    }
}

/// Client to target over the request stream: DATAGRAM capsules become UDP payloads.
async fn client_to_target<R: StreamRecv>(
    recv: &mut R,
    shared: &TunnelShared,
    initial: Option<Bytes>,
) -> End {
    let stats = &shared.stats;
    let mut decoder = CapsuleDecoder::new(MAX_CAPSULE_LEN);
    if let Some(b) = initial {
        decoder.push(b);
    }
    loop {
        loop {
            match decoder.next() {
                Ok(Some(Capsule::Datagram(payload))) => {
                    if let Err(end) = capsule_to_target(payload, shared).await {
                        return end;
                    }
                }
                Ok(Some(Capsule::Unknown { .. })) => {
                    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
                    //# Receivers MUST silently drop unknown Capsule types.
                    // Silently for the peer; Ferry still counts it.
                    stats.drop(DropReason::UnknownCapsule);
                }
                Ok(None) => break,
                Err(CapsuleError::TooLarge { .. }) => {
                    return End::Reset(ResetReason::CapsuleTooLarge);
                }
                Err(_) => return End::Reset(ResetReason::MalformedCapsule),
            }
        }
        match recv.recv().await {
            Ok(Some(bytes)) => decoder.push(bytes),
            Ok(None) => {
                //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
                //# If the receiver detects the end of the stream with an incomplete capsule,
                //# it MUST treat it as malformed.
                return match decoder.finish() {
                    Ok(()) => End::ClientFinished,
                    Err(_) => End::Reset(ResetReason::MalformedCapsule),
                };
            }
            Err(_) => return End::ClientGone,
        }
    }
}

async fn capsule_to_target(payload: Bytes, shared: &TunnelShared) -> Result<(), End> {
    let stats = &shared.stats;
    let (context_id, udp_payload) = match datagram::split_context_id(payload) {
        Ok(v) => v,
        Err(_) => return Err(End::Reset(ResetReason::MalformedCapsule)),
    };
    if context_id != datagram::CONTEXT_ID_UDP {
        stats.drop(DropReason::UnknownContextId);
        return Ok(());
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-5
    //# Endpoints that receive a DATAGRAM capsule with a UDP Proxying Payload field that
    //# is longer than 65527 MUST abort the corresponding stream.
    if udp_payload.len() > MAX_UDP_PAYLOAD {
        return Err(End::Reset(ResetReason::CapsuleTooLarge));
    }
    shared.active.store(true, Ordering::Relaxed);
    stats.rx.record(Encoding::Capsule, udp_payload.len());
    // The stream gives back-pressure, so wait for the socket rather than drop.
    match shared.udp.send(&udp_payload).await {
        Ok(_) => {
            stats.upstream_datagrams_tx.inc();
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            stats.drop(DropReason::BufferFull);
            Ok(())
        }
        Err(_) => {
            stats.drop(DropReason::SocketError);
            Err(End::Reset(ResetReason::SocketError))
        }
    }
}

/// Target to client: each UDP payload becomes an HTTP/3 datagram when the client negotiated
/// them (and it fits), a DATAGRAM capsule on the stream when the client did not.
async fn target_to_client<S: StreamSend>(
    send: &mut S,
    datagrams: Option<&DatagramOut>,
    shared: &TunnelShared,
) -> End {
    use h3::ConnectionState;
    let stats = &shared.stats;
    let mut buf = BytesMut::new();
    let h3_header_len = datagrams.map_or(0, |d| datagram::h3_header_len(d.stream_id));
    loop {
        // Wait first, allocate after: an idle tunnel holds no receive buffer.
        if let Err(_e) = shared.udp.readable().await {
            return End::Reset(ResetReason::SocketError);
        }
        buf.clear();
        if buf.capacity() < RECV_NEED {
            buf = BytesMut::with_capacity(RECV_BLOCK);
        }
        buf.put_bytes(0, HEADROOM);
        match shared.udp.try_recv_buf(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
                //# If the UDP proxy is notified by its operating system that its socket is no
                //# longer usable, it MUST close the request stream.
                return End::Reset(ResetReason::SocketError);
            }
        }
        let len = buf.len() - HEADROOM;
        stats.upstream_datagrams_rx.inc();
        shared.active.store(true, Ordering::Relaxed);

        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
        //# When sending HTTP Datagrams, endpoints ... MAY use QUIC DATAGRAM frames if the
        //# peer has sent SETTINGS_H3_DATAGRAM with a value of 1.
        let quic = datagrams.filter(|d| d.peer.settings().enable_datagram());
        if let Some(DatagramOut {
            conn, stream_id, ..
        }) = quic
        {
            if let Some(max) = conn.max_datagram_size() {
                if h3_header_len + len > max {
                    //= https://www.rfc-editor.org/rfc/rfc9298#section-6.1
                    //# If the UDP proxy does not have enough room to fit the
                    //# UDP payload in a QUIC DATAGRAM frame, the UDP proxy SHOULD drop
                    //# the UDP payload.
                    stats.drop(DropReason::TooLarge);
                    continue;
                }
                let start = HEADROOM - h3_header_len;
                let mut frame = buf.split();
                datagram::write_h3_udp_header(*stream_id, &mut frame[start..HEADROOM]);
                frame.advance(start);
                match conn.send_datagram_wait(frame.freeze()).await {
                    Ok(()) => stats.tx.record(Encoding::QuicDatagram, len),
                    Err(quinn::SendDatagramError::TooLarge) => stats.drop(DropReason::TooLarge),
                    Err(_) => return End::ClientGone,
                }
                continue;
            }
        }
        let hlen = datagram::capsule_header_len(len);
        let start = HEADROOM - hlen;
        let mut capsule = buf.split();
        datagram::write_capsule_udp_header(len, &mut capsule[start..HEADROOM]);
        capsule.advance(start);
        if send.send(capsule.freeze()).await.is_err() {
            return End::ClientGone;
        }
        stats.tx.record(Encoding::Capsule, len);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::stats::{HttpStats, Store};

    async fn shared() -> TunnelShared {
        TunnelShared {
            udp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            active: AtomicBool::new(false),
            failed: Notify::new(),
            stats: HttpStats::new(&Store::new(), "t").connect_udp,
        }
    }

    /// The idle timer fires between 1 and 1.25 timeouts after the last activity, and
    /// activity pushes it back. Time is virtual: no test waits for real seconds.
    #[tokio::test(start_paused = true)]
    async fn idle_timer_controlled_time() {
        let s = shared().await;
        let timeout = Duration::from_secs(120);
        let start = tokio::time::Instant::now();
        assert_eq!(
            idle(&s, Some(timeout)).await,
            End::Reset(ResetReason::IdleTimeout)
        );
        let waited = start.elapsed();
        assert!(waited >= timeout && waited <= timeout * 5 / 4, "{waited:?}");

        // Activity in every period keeps the tunnel open.
        let start = tokio::time::Instant::now();
        let keep_alive = async {
            for _ in 0..10 {
                tokio::time::sleep(timeout / 2).await;
                s.active.store(true, Ordering::Relaxed);
            }
        };
        tokio::select! {
            end = idle(&s, Some(timeout)) => {
                assert!(start.elapsed() >= timeout * 5, "closed early: {end:?}");
            }
            _ = keep_alive => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_idle_timeout_never_fires() {
        let s = shared().await;
        let r = tokio::time::timeout(Duration::from_secs(3600), idle(&s, None)).await;
        assert!(r.is_err());
    }
}
