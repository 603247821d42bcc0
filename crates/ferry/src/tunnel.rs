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

use crate::demux::{DatagramSink, H3Datagram};
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

/// Datagrams read from a target socket with one `recvmmsg`.
const RECV_BATCH: usize = 8;

/// Datagrams from a target are copied, each behind its headroom, out of the receive area into
/// blocks of this size, and travel on as `Bytes` slices of a block: one allocation serves many
/// datagrams, of every tunnel the thread runs. A block is freed when quinn (or the stream) has
/// sent the last datagram carved from it, so an idle tunnel holds no receive memory at all.
const RECV_BLOCK: usize = 256 * 1024;

/// Where `recvmmsg` writes: `RECV_BATCH` slots of the largest UDP payload, and the block the
/// datagrams are copied into. One per thread, shared by every tunnel the thread runs (a read
/// is copied out before its task can yield). The slots are allocated zeroed, so only the
/// pages datagrams touch become resident.
struct RecvArea {
    slots: Vec<u8>,
    meta: [quinn_udp::RecvMeta; RECV_BATCH],
    block: BytesMut,
}

impl RecvArea {
    fn new() -> Self {
        RecvArea {
            slots: vec![0; RECV_BATCH * MAX_UDP_PAYLOAD],
            meta: [quinn_udp::RecvMeta::default(); RECV_BATCH],
            block: BytesMut::new(),
        }
    }

    /// Headroom then `payload`, carved from the current block.
    fn carve(block: &mut BytesMut, payload: &[u8]) -> BytesMut {
        if block.capacity() - block.len() < HEADROOM + payload.len() {
            *block = BytesMut::with_capacity(RECV_BLOCK.max(HEADROOM + payload.len()));
        }
        block.put_bytes(0, HEADROOM);
        block.extend_from_slice(payload);
        block.split()
    }

    /// One `recvmmsg`; `WouldBlock` when the batch came back short (the socket is drained).
    fn read(
        &mut self,
        state: &quinn_udp::UdpSocketState,
        udp: &UdpSocket,
        out: &mut Vec<BytesMut>,
    ) -> io::Result<()> {
        let RecvArea { slots, meta, block } = self;
        let mut bufs: [io::IoSliceMut<'_>; RECV_BATCH] = {
            let mut chunks = slots.chunks_exact_mut(MAX_UDP_PAYLOAD);
            std::array::from_fn(|_| io::IoSliceMut::new(chunks.next().unwrap_or(&mut [])))
        };
        let n = state.recv(udp.into(), &mut bufs, meta)?;
        for (buf, m) in bufs.iter().zip(meta.iter()).take(n) {
            // Target sockets have no GRO: one datagram per message.
            out.push(Self::carve(block, buf.get(..m.len).unwrap_or_default()));
        }
        if n < RECV_BATCH {
            // Drained: let tokio clear the readiness now instead of after another call.
            // (An error that ends a batch early is kept by the kernel for the next read,
            // which the next datagram or error from the target wakes.)
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    }
}

thread_local! {
    static RECV_AREA: std::cell::RefCell<Option<RecvArea>> = const { std::cell::RefCell::new(None) };
}

/// Read up to `RECV_BATCH` datagrams from the target with one system call, and append each
/// to `out` as headroom plus payload.
///
/// A plain `recv` loop spends a second system call per wake-up to learn the socket is empty
/// (`EAGAIN`). A batch that comes back short already says so: tokio's readiness is then
/// cleared at once (`try_io` clears it when the closure reports `WouldBlock`, and keeps it if
/// the socket became readable again meanwhile). Returns `Err` only when the socket failed.
fn recv_batch(udp: &UdpSocket, out: &mut Vec<BytesMut>) -> io::Result<()> {
    let res = RECV_AREA.with(|area| {
        let mut area = area.borrow_mut();
        let area = area.get_or_insert_with(RecvArea::new);
        match udp_state() {
            Some(state) => udp.try_io(tokio::io::Interest::READABLE, || area.read(state, udp, out)),
            // No quinn-udp on this platform: one datagram per call.
            None => {
                let len = udp.try_recv(&mut area.slots)?;
                out.push(RecvArea::carve(
                    &mut area.block,
                    area.slots.get(..len).unwrap_or_default(),
                ));
                Ok(())
            }
        }
    });
    res.or_else(ignore_would_block)
}

fn ignore_would_block(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(e)
    }
}

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
        target: addr,
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
    /// The address `udp` is connected to.
    pub target: SocketAddr,
    /// Set on every datagram either way; the idle timer clears it.
    pub active: AtomicBool,
    /// Woken when the target socket reports an error to the demux task.
    pub failed: Notify,
    pub stats: ConnectUdpStats,
}

/// The most bytes one UDP GSO send carries (the kernel's limit is one IP packet's
/// payload, 65,507 bytes over IPv4).
const GSO_MAX_BYTES: usize = 65_000;

/// UDP GSO (`UDP_SEGMENT`) through quinn-udp, for batches of same-sized datagrams to a
/// target. The state holds only what quinn-udp learned about the kernel (how many segments
/// it takes); it is probed once, on a socket of its own, so that target sockets keep their
/// plain options (quinn-udp's probe turns UDP GRO on, which plain receives must not see).
/// None where the platform has no GSO.
fn gso() -> Option<&'static quinn_udp::UdpSocketState> {
    udp_state().filter(|state| state.max_gso_segments() > 1)
}

/// quinn-udp's view of the kernel, probed once on a socket of its own; also what batched
/// reads (`recvmmsg`) go through. None where quinn-udp cannot work with this platform.
fn udp_state() -> Option<&'static quinn_udp::UdpSocketState> {
    static STATE: std::sync::OnceLock<Option<quinn_udp::UdpSocketState>> =
        std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            let probe = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).ok()?;
            quinn_udp::UdpSocketState::new((&probe).into()).ok()
        })
        .as_ref()
}

impl TunnelShared {
    /// Send one UDP payload to the target; `Err` is why it was dropped.
    #[inline]
    fn send_one(&self, payload: &[u8]) -> Result<(), DropReason> {
        match self.udp.try_send(payload) {
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

    /// Send `count` UDP payloads laid end to end in `data`, each `segment` bytes but the
    /// last (which may be shorter): one system call with UDP GSO, one per payload without.
    /// Drops are counted in `stats` (the demux's) and the tunnel's totals.
    fn send_segments(&self, data: &[u8], segment: usize, count: usize, stats: &ConnectUdpStats) {
        if count > 1 {
            if let Some(state) = gso() {
                let transmit = quinn_udp::Transmit {
                    destination: self.target,
                    ecn: None,
                    contents: data,
                    segment_size: Some(segment),
                    src_ip: None,
                };
                let sent = self.udp.try_io(tokio::io::Interest::WRITABLE, || {
                    state.try_send((&self.udp).into(), &transmit)
                });
                match sent {
                    Ok(()) => {
                        self.stats.upstream_datagrams_tx.add(count as u64);
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        for _ in 0..count {
                            stats.drop(DropReason::BufferFull);
                            self.dropped(DropReason::BufferFull);
                        }
                        return;
                    }
                    // Anything else (GSO refused on this path, or the socket's own error):
                    // one by one, which reports the socket's state exactly.
                    Err(_) => {}
                }
            }
        }
        for payload in data.chunks(segment.max(1)) {
            if let Err(reason) = self.send_one(payload) {
                stats.drop(reason);
                self.dropped(reason);
            }
        }
    }
}

/// The UDP payload of an HTTP/3 datagram, or why it is dropped.
#[inline]
fn udp_payload(datagram: &H3Datagram) -> Result<&[u8], DropReason> {
    //= https://www.rfc-editor.org/rfc/rfc9298#section-4
    //# If an HTTP/3 Datagram is received with an unknown Context ID, the
    //# receiver SHOULD drop it (or buffer it briefly).
    let http_payload = datagram
        .bytes
        .get(datagram.header_len..)
        .ok_or(DropReason::Malformed)?;
    match datagram::decode_udp_payload(http_payload) {
        Ok(datagram::UdpProxyingPayload::Udp(p)) => Ok(p),
        Ok(_) => Err(DropReason::UnknownContextId),
        Err(_) => Err(DropReason::Malformed),
    }
}

impl DatagramSink for TunnelShared {
    #[inline]
    fn deliver(&self, http_datagram_payload: Bytes) -> Result<(), DropReason> {
        self.deliver_h3(H3Datagram {
            bytes: http_datagram_payload,
            header_len: 0,
        })
    }

    #[inline]
    fn deliver_h3(&self, datagram: H3Datagram) -> Result<(), DropReason> {
        let payload = udp_payload(&datagram)?;
        self.active.store(true, Ordering::Relaxed);
        self.stats.rx.record(Encoding::QuicDatagram, payload.len());
        self.send_one(payload)
    }

    /// Consecutive datagrams for this tunnel: runs of same-sized payloads (the last of a
    /// run may be shorter) are copied end to end into `scratch` and go to the target in one
    /// UDP GSO send; the datagrams stay separate on the wire.
    fn deliver_batch(
        &self,
        batch: &mut Vec<H3Datagram>,
        scratch: &mut Vec<u8>,
        stats: &ConnectUdpStats,
    ) {
        let max_segments = gso().map_or(1, |s| s.max_gso_segments().min(64));
        if max_segments <= 1 {
            for datagram in batch.drain(..) {
                if let Err(reason) = self.deliver_h3(datagram) {
                    stats.drop(reason);
                    self.dropped(reason);
                }
            }
            return;
        }
        self.active.store(true, Ordering::Relaxed);
        scratch.clear();
        let (mut segment, mut count, mut closed) = (0usize, 0usize, false);
        for datagram in batch.iter() {
            let payload = match udp_payload(datagram) {
                Ok(p) => p,
                Err(reason) => {
                    stats.drop(reason);
                    self.dropped(reason);
                    continue;
                }
            };
            self.stats.rx.record(Encoding::QuicDatagram, payload.len());
            if payload.is_empty() || payload.len() > GSO_MAX_BYTES {
                // Alone: an empty payload cannot be a segment, a huge one fills a send.
                if count > 0 {
                    self.send_segments(scratch, segment, count, stats);
                    scratch.clear();
                    count = 0;
                }
                if let Err(reason) = self.send_one(payload) {
                    stats.drop(reason);
                    self.dropped(reason);
                }
                continue;
            }
            let joins = count > 0
                && !closed
                && count < max_segments
                && payload.len() <= segment
                && scratch.len() + payload.len() <= GSO_MAX_BYTES;
            if !joins {
                if count > 0 {
                    self.send_segments(scratch, segment, count, stats);
                }
                scratch.clear();
                (segment, count) = (payload.len(), 0);
            }
            scratch.extend_from_slice(payload);
            count += 1;
            closed = payload.len() < segment;
        }
        if count > 0 {
            self.send_segments(scratch, segment, count, stats);
        }
        scratch.clear();
        batch.clear();
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
    // The futures are built inside `select!`: built as locals first, each would be stored
    // twice in this future's state (about 1 KiB more per tunnel).
    tokio::select! {
        end = client_to_target(recv, shared, initial) => end,
        end = target_to_client(send, datagrams, shared) => end,
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
    // Empty until the first datagram: an idle tunnel holds no receive buffer.
    let mut batch: Vec<BytesMut> = Vec::new();
    let h3_header_len = datagrams.map_or(0, |d| datagram::h3_header_len(d.stream_id));
    loop {
        if let Err(_e) = shared.udp.readable().await {
            return End::Reset(ResetReason::SocketError);
        }
        if recv_batch(&shared.udp, &mut batch).is_err() {
            //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
            //# If the UDP proxy is notified by its operating system that its socket is no
            //# longer usable, it MUST close the request stream.
            return End::Reset(ResetReason::SocketError);
        }
        if !batch.is_empty() {
            shared.active.store(true, Ordering::Relaxed);
        }
        stats.upstream_datagrams_rx.add(batch.len() as u64);
        let mut pending = batch.drain(..);
        while let Some(mut buf) = pending.next() {
            let len = buf.len() - HEADROOM;
            // Every datagram of the batch is accounted for: if the client side ends here,
            // this one and the rest already read are counted as dropped.
            let gone = |left: usize| {
                stats.drop_n(DropReason::TunnelClosed, left as u64 + 1);
                End::ClientGone
            };

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
                    datagram::write_h3_udp_header(*stream_id, &mut buf[start..HEADROOM]);
                    buf.advance(start);
                    match conn.send_datagram_wait(buf.freeze()).await {
                        Ok(()) => stats.tx.record(Encoding::QuicDatagram, len),
                        Err(quinn::SendDatagramError::TooLarge) => stats.drop(DropReason::TooLarge),
                        Err(_) => return gone(pending.len()),
                    }
                    continue;
                }
            }
            let hlen = datagram::capsule_header_len(len);
            let start = HEADROOM - hlen;
            datagram::write_capsule_udp_header(len, &mut buf[start..HEADROOM]);
            buf.advance(start);
            if send.send(buf.freeze()).await.is_err() {
                return gone(pending.len());
            }
            stats.tx.record(Encoding::Capsule, len);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::stats::{HttpStats, Store};

    async fn shared() -> TunnelShared {
        TunnelShared {
            udp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            target: "127.0.0.1:9".parse().unwrap(),
            active: AtomicBool::new(false),
            failed: Notify::new(),
            stats: HttpStats::new(&Store::new(), "t").connect_udp,
        }
    }

    /// Batched reads from a target: every datagram arrives once, in order, whole (up to the
    /// largest UDP payload), behind its headroom; a short batch clears the socket's
    /// readiness, so the next wait blocks until the target sends again.
    #[tokio::test]
    async fn recv_batch_reads_everything_in_order_and_clears_readiness() {
        use futures_util::FutureExt;
        let s = shared().await;
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.connect(s.udp.local_addr().unwrap()).unwrap();
        let mut sent: Vec<Vec<u8>> = (0..20u8)
            .map(|i| vec![i; 1 + usize::from(i) * 50])
            .collect();
        sent.push(vec![0xab; 65_507]); // the largest UDP payload over IPv4
        sent.push(b"after the big one".to_vec());
        for d in &sent {
            peer.send(d).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < sent.len() {
            s.udp.readable().await.unwrap();
            recv_batch(&s.udp, &mut out).unwrap();
        }
        assert_eq!(out.len(), sent.len());
        for (got, want) in out.iter().zip(&sent) {
            assert_eq!(&got[HEADROOM..], &want[..]);
        }
        // Drained by a short batch: not readable until the target sends again.
        assert!(s.udp.readable().now_or_never().is_none());
        peer.send(b"again").unwrap();
        s.udp.readable().await.unwrap();
        out.clear();
        recv_batch(&s.udp, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0][HEADROOM..], b"again");
    }

    /// A client side that accepts `ok` sends, then fails.
    struct FailingAfter {
        ok: usize,
        sent: Vec<Bytes>,
    }

    impl StreamSend for FailingAfter {
        async fn send(&mut self, data: Bytes) -> Result<(), ()> {
            if self.sent.len() == self.ok {
                return Err(());
            }
            self.sent.push(data);
            Ok(())
        }
        async fn finish(&mut self) {}
        fn reset(&mut self, _code: h3::error::Code) {}
    }

    /// Datagrams already read from the target in one batch when the client side ends are
    /// counted: received, then dropped as `tunnel_closed`; none vanishes uncounted.
    #[tokio::test]
    async fn client_gone_mid_batch_counts_the_rest_of_the_batch() {
        let s = shared().await;
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.connect(s.udp.local_addr().unwrap()).unwrap();
        for i in 0..5u8 {
            peer.send(&[i; 10]).unwrap();
        }
        let mut client = FailingAfter {
            ok: 2,
            sent: Vec::new(),
        };
        assert_eq!(
            target_to_client(&mut client, None, &s).await,
            End::ClientGone
        );
        assert_eq!(client.sent.len(), 2);
        let st = &s.stats;
        assert_eq!(st.upstream_datagrams_rx.get(), 5);
        assert_eq!(st.tx.datagrams_capsule.get(), 2);
        assert_eq!(st.drops(DropReason::TunnelClosed), 3);
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

    fn h3(qsid: u64, context_id: u8, payload: &[u8]) -> H3Datagram {
        let mut b = BytesMut::new();
        ferry_proto::varint::put(qsid, &mut b).unwrap();
        b.put_u8(context_id);
        b.extend_from_slice(payload);
        H3Datagram {
            header_len: ferry_proto::varint::encoded_len(qsid),
            bytes: b.freeze(),
        }
    }

    /// A batch goes to the target as separate datagrams, in order, whatever the mix of
    /// sizes (same-sized runs share one GSO send); a datagram with another context id is
    /// dropped and counted, the rest still delivered.
    #[tokio::test]
    async fn batch_reaches_target_as_separate_datagrams_in_order() {
        let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = target.local_addr().unwrap();
        let s = TunnelShared {
            udp: connect_udp(addr).unwrap(),
            target: addr,
            active: AtomicBool::new(false),
            failed: Notify::new(),
            stats: HttpStats::new(&Store::new(), "t").connect_udp,
        };
        let demux_stats = HttpStats::new(&Store::new(), "d").connect_udp;
        let sizes = [
            1200usize, 1200, 1200, 1200, 700, 1200, 1200, 0, 1300, 1300, 5,
        ];
        let mut batch: Vec<H3Datagram> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| h3(2, 0, &vec![i as u8; *n]))
            .collect();
        batch.insert(3, h3(2, 7, b"other context"));
        // As on a tunnel's socket in use: the reactor has seen it writable (a send before
        // that is refused by tokio and counted as buffer_full).
        s.udp.writable().await.unwrap();
        let mut scratch = Vec::new();
        s.deliver_batch(&mut batch, &mut scratch, &demux_stats);
        assert!(batch.is_empty());
        let mut buf = vec![0u8; 2000];
        for (i, n) in sizes.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(10), target.recv(&mut buf))
                .await
                .expect("datagram reached the target")
                .unwrap();
            assert_eq!(got, *n, "datagram {i}");
            assert!(buf[..got].iter().all(|b| *b == i as u8), "datagram {i}");
        }
        assert_eq!(s.stats.upstream_datagrams_tx.get(), sizes.len() as u64);
        assert_eq!(demux_stats.drops(DropReason::UnknownContextId), 1);
        assert_eq!(demux_stats.drops(DropReason::BufferFull), 0);
        assert!(s.active.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn no_idle_timeout_never_fires() {
        let s = shared().await;
        let r = tokio::time::timeout(Duration::from_secs(3600), idle(&s, None)).await;
        assert!(r.is_err());
    }
}
