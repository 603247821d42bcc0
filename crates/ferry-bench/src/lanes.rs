//! The datagram path of the load generator.
//!
//! A *lane* is one QUIC connection to the proxy (or, with `--direct`, one UDP socket to the
//! target) carrying one or more *tunnels*. Every payload starts with a 24-byte header:
//!
//! ```text
//! lane u16 | tunnel u16 | epoch u32 | sequence u64 | send time u64 (ns)   (little endian)
//! ```
//!
//! padded with zeros to the payload size. Epoch 0 marks probes (set-up, not measured); each
//! measured trial has its own epoch, so a straggler of an earlier trial is never counted in
//! a later one. The echo sends the payload back; the reader checks that it came back on the
//! right lane and tunnel (quarter stream id), and records its round-trip time.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;

/// Bytes of the bench header at the front of every payload; the smallest payload size.
pub const HEADER_LEN: usize = 24;

/// Datagrams are built in blocks of this size, so a send allocates once per ~200 datagrams.
const BLOCK: usize = 256 * 1024;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on a process-wide monotonic clock.
pub fn now_ns() -> u64 {
    let base = BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A histogram of nanoseconds from 1 ns to 100 s with 3 significant digits.
pub fn new_histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).map_err(|e| format!("histogram: {e}"))
}

pub struct Tunnel {
    /// HTTP/3 datagram header (quarter stream id + context id 0); empty when direct.
    pub hdr: [u8; 9],
    pub hdr_len: usize,
    pub quarter_stream_id: u64,
    /// Datagrams sent and received in the current epoch.
    pub sent: AtomicU64,
    pub recv: AtomicU64,
    /// A probe (epoch 0) came back.
    pub probed: AtomicBool,
    /// Closed loop: datagrams given up as lost, and the time of the last progress.
    pub written_off: AtomicU64,
    pub last_progress: AtomicU64,
}

impl Tunnel {
    pub fn new(stream_id: Option<u64>) -> Tunnel {
        let (hdr, hdr_len) = match stream_id {
            Some(id) => crate::h3client::h3_header(id),
            None => ([0u8; 9], 0),
        };
        Tunnel {
            hdr,
            hdr_len,
            quarter_stream_id: stream_id.map(|s| s / 4).unwrap_or(0),
            sent: AtomicU64::new(0),
            recv: AtomicU64::new(0),
            probed: AtomicBool::new(false),
            written_off: AtomicU64::new(0),
            last_progress: AtomicU64::new(0),
        }
    }
}

pub enum Io {
    Quic(quinn::Connection),
    /// `--direct`: a UDP socket connected to the target, read with recvmmsg/GRO and written
    /// with GSO batches (quinn-udp), as efficient as quinn's own socket handling.
    Udp {
        /// A second handle on the same socket, for the pacer thread.
        sync: std::net::UdpSocket,
        socket: tokio::net::UdpSocket,
        state: quinn_udp::UdpSocketState,
        target: std::net::SocketAddr,
        /// Send bursts as GSO batches (else one system call per datagram).
        gso: bool,
    },
}

pub struct Lane {
    pub id: u16,
    pub io: Io,
    pub tunnels: Vec<Tunnel>,
    pub payload_len: usize,
    pub epoch: AtomicU32,
    /// Closed loop: datagrams in flight per tunnel; 0 in open loop (or when stopping).
    pub window: AtomicU32,
    pub hist: Mutex<Histogram<u64>>,
    /// Echoes of an earlier epoch, malformed ones, and ones on the wrong lane or tunnel.
    pub late: AtomicU64,
    pub malformed: AtomicU64,
    pub misrouted: AtomicU64,
    /// Sends refused locally (socket buffer full, datagram too large, connection lost).
    pub send_errors: AtomicU64,
    /// The first send error, for diagnostics.
    pub first_error: Mutex<Option<String>>,
}

/// Counters of one lane at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct LaneCounts {
    pub sent: u64,
    pub recv: u64,
    pub late: u64,
    pub malformed: u64,
    pub misrouted: u64,
    pub send_errors: u64,
    /// QUIC DATAGRAM frames quinn actually transmitted (QUIC lanes only).
    pub frames_tx: Option<u64>,
}

impl Lane {
    pub fn new(id: u16, io: Io, tunnels: Vec<Tunnel>, payload_len: usize) -> Result<Lane, String> {
        Ok(Lane {
            id,
            io,
            tunnels,
            payload_len,
            epoch: AtomicU32::new(0),
            window: AtomicU32::new(0),
            hist: Mutex::new(new_histogram()?),
            late: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    /// Start a new epoch: counters and the histogram start from zero.
    pub fn begin_epoch(&self, epoch: u32) {
        self.epoch.store(epoch, Ordering::Release);
        for t in &self.tunnels {
            t.sent.store(0, Ordering::Relaxed);
            t.recv.store(0, Ordering::Relaxed);
            t.written_off.store(0, Ordering::Relaxed);
            t.last_progress.store(now_ns(), Ordering::Relaxed);
        }
        if let Ok(mut h) = self.hist.lock() {
            h.reset();
        }
        self.late.store(0, Ordering::Relaxed);
        self.malformed.store(0, Ordering::Relaxed);
        self.misrouted.store(0, Ordering::Relaxed);
        self.send_errors.store(0, Ordering::Relaxed);
        if let Ok(mut e) = self.first_error.lock() {
            *e = None;
        }
    }

    pub fn counts(&self) -> LaneCounts {
        let mut c = LaneCounts {
            late: self.late.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            misrouted: self.misrouted.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
            frames_tx: match &self.io {
                Io::Quic(conn) => Some(conn.stats().frame_tx.datagram),
                Io::Udp { .. } => None,
            },
            ..Default::default()
        };
        for t in &self.tunnels {
            c.sent += t.sent.load(Ordering::Relaxed);
            c.recv += t.recv.load(Ordering::Relaxed);
        }
        c
    }

    /// Send the next measured datagram of tunnel `local`.
    #[inline]
    pub fn send(&self, local: usize, epoch: u32, scratch: &mut Scratch) -> bool {
        let Some(t) = self.tunnels.get(local) else {
            return false;
        };
        let seq = t.sent.fetch_add(1, Ordering::Relaxed);
        self.send_one(t, local, epoch, seq, scratch)
    }

    /// Send a probe (epoch 0) on tunnel `local`.
    pub fn send_probe(&self, local: usize, scratch: &mut Scratch) -> bool {
        match self.tunnels.get(local) {
            Some(t) => self.send_one(t, local, 0, 0, scratch),
            None => false,
        }
    }

    fn send_one(&self, t: &Tunnel, local: usize, epoch: u32, seq: u64, s: &mut Scratch) -> bool {
        let fields = Fields {
            lane: self.id,
            tunnel: local as u16,
            epoch,
            seq,
            sent_ns: now_ns(),
        };
        let r = match &self.io {
            Io::Quic(conn) => {
                let frame = s.frame(&t.hdr[..t.hdr_len], &fields, self.payload_len);
                conn.send_datagram(frame).map_err(|e| e.to_string())
            }
            Io::Udp { sync, .. } => sync
                .send(s.payload(&fields, self.payload_len))
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        self.note_result(r, 1)
    }

    /// `--direct`, open loop: send the next datagram of each tunnel in `locals` (all on this
    /// lane) as GSO batches, one system call per batch.
    pub fn send_batch(&self, locals: &[usize], epoch: u32, s: &mut Scratch) {
        let Io::Udp {
            sync,
            state,
            target,
            gso: true,
            ..
        } = &self.io
        else {
            for &l in locals {
                self.send(l, epoch, s);
            }
            return;
        };
        let size = self.payload_len.max(HEADER_LEN);
        // A GSO batch is one IP packet to the kernel: at most 64 KiB in all.
        let max_segments = state.max_gso_segments().min(65_000 / size).clamp(1, 64);
        for chunk in locals.chunks(max_segments) {
            s.payload.clear();
            for &local in chunk {
                let Some(t) = self.tunnels.get(local) else {
                    continue;
                };
                let seq = t.sent.fetch_add(1, Ordering::Relaxed);
                let fields = Fields {
                    lane: self.id,
                    tunnel: local as u16,
                    epoch,
                    seq,
                    sent_ns: now_ns(),
                };
                let start = s.payload.len();
                fields.put(&mut s.payload);
                s.payload.resize(start + size, 0);
            }
            let n = s.payload.len() / size;
            let t = quinn_udp::Transmit {
                destination: *target,
                ecn: None,
                contents: &s.payload,
                segment_size: (n > 1).then_some(size),
                src_ip: None,
            };
            let r = state.try_send(sync.into(), &t).map_err(|e| e.to_string());
            self.note_result(r, n as u64);
        }
    }

    fn note_result(&self, r: Result<(), String>, n: u64) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                if self.send_errors.fetch_add(n, Ordering::Relaxed) == 0 {
                    if let Ok(mut f) = self.first_error.lock() {
                        f.get_or_insert(e);
                    }
                }
                false
            }
        }
    }

    /// Read echoes until the connection closes (QUIC) or the task is aborted (UDP).
    pub async fn read_loop(self: Arc<Self>) {
        let mut scratch = Scratch::default();
        match &self.io {
            Io::Quic(conn) => {
                while let Ok(dg) = conn.read_datagram().await {
                    self.on_h3_datagram(&dg, &mut scratch);
                }
            }
            Io::Udp { socket, state, .. } => {
                use std::io::IoSliceMut;
                let mut bufs: Vec<Vec<u8>> = (0..quinn_udp::BATCH_SIZE)
                    .map(|_| vec![0u8; 65536])
                    .collect();
                let mut meta = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
                loop {
                    let r = socket
                        .async_io(tokio::io::Interest::READABLE, || {
                            let mut slices: Vec<IoSliceMut<'_>> =
                                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                            state.recv(socket.into(), &mut slices, &mut meta)
                        })
                        .await;
                    let Ok(n) = r else { break };
                    for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                        let Some(data) = buf.get(..m.len) else {
                            continue;
                        };
                        for p in data.chunks(m.stride.max(1)) {
                            self.on_payload(p, None, &mut scratch);
                        }
                    }
                }
            }
        }
    }

    fn on_h3_datagram(&self, dg: &[u8], scratch: &mut Scratch) {
        let Ok((qsid, rest)) = ferry_proto::datagram::decode_h3(dg) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match ferry_proto::datagram::decode_udp_payload(rest) {
            Ok(ferry_proto::datagram::UdpProxyingPayload::Udp(p)) => {
                self.on_payload(p, Some(qsid), scratch)
            }
            _ => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_payload(&self, p: &[u8], qsid: Option<u64>, scratch: &mut Scratch) {
        let Some(f) = Fields::parse(p) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let local = usize::from(f.tunnel);
        let tunnel = self.tunnels.get(local);
        let Some(t) =
            tunnel.filter(|t| f.lane == self.id && qsid.is_none_or(|q| q == t.quarter_stream_id))
        else {
            self.misrouted.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if f.epoch == 0 {
            t.probed.store(true, Ordering::Relaxed);
            return;
        }
        if f.epoch != self.epoch.load(Ordering::Acquire) {
            self.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = now_ns();
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record(now.saturating_sub(f.sent_ns).max(1));
        }
        t.recv.fetch_add(1, Ordering::Relaxed);
        if self.window.load(Ordering::Relaxed) > 0 {
            t.last_progress.store(now, Ordering::Relaxed);
            self.send(local, f.epoch, scratch);
        }
    }

    /// Closed loop: top up every tunnel whose window has been stuck for `stall`: datagrams
    /// still outstanding then are written off as lost (they still count as lost).
    pub fn refill_stalled(&self, epoch: u32, stall: Duration, scratch: &mut Scratch) {
        let window = u64::from(self.window.load(Ordering::Relaxed));
        if window == 0 {
            return;
        }
        let now = now_ns();
        let stall_ns = u64::try_from(stall.as_nanos()).unwrap_or(u64::MAX);
        for (i, t) in self.tunnels.iter().enumerate() {
            let last = t.last_progress.load(Ordering::Relaxed);
            let sent = t.sent.load(Ordering::Relaxed);
            let done = t.recv.load(Ordering::Relaxed) + t.written_off.load(Ordering::Relaxed);
            let in_flight = sent.saturating_sub(done);
            if in_flight == 0 || now.saturating_sub(last) > stall_ns {
                t.written_off.fetch_add(in_flight, Ordering::Relaxed);
                t.last_progress.store(now, Ordering::Relaxed);
                for _ in 0..window {
                    self.send(i, epoch, scratch);
                }
            }
        }
    }
}

/// The bench header of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    pub lane: u16,
    pub tunnel: u16,
    pub epoch: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

impl Fields {
    pub fn parse(p: &[u8]) -> Option<Fields> {
        let h: &[u8; HEADER_LEN] = p.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Fields {
            lane: u16::from_le_bytes([h[0], h[1]]),
            tunnel: u16::from_le_bytes([h[2], h[3]]),
            epoch: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            seq: u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
            sent_ns: u64::from_le_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
        })
    }

    fn put(&self, out: &mut impl BufMut) {
        out.put_u16_le(self.lane);
        out.put_u16_le(self.tunnel);
        out.put_u32_le(self.epoch);
        out.put_u64_le(self.seq);
        out.put_u64_le(self.sent_ns);
    }
}

/// Per-sender buffers: QUIC datagrams are carved out of shared blocks (one allocation per
/// ~200 datagrams), UDP payloads are written into one reused buffer.
#[derive(Default)]
pub struct Scratch {
    block: BytesMut,
    payload: Vec<u8>,
}

impl Scratch {
    fn frame(&mut self, hdr: &[u8], f: &Fields, payload_len: usize) -> Bytes {
        let need = hdr.len() + payload_len;
        if self.block.capacity() < need {
            self.block = BytesMut::with_capacity(BLOCK.max(need));
        }
        self.block.put_slice(hdr);
        f.put(&mut self.block);
        self.block
            .put_bytes(0, payload_len.saturating_sub(HEADER_LEN));
        self.block.split().freeze()
    }

    fn payload(&mut self, f: &Fields, payload_len: usize) -> &[u8] {
        self.payload.clear();
        f.put(&mut self.payload);
        self.payload.resize(payload_len.max(HEADER_LEN), 0);
        &self.payload
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fields_round_trip() {
        let f = Fields {
            lane: 7,
            tunnel: 999,
            epoch: 3,
            seq: 1 << 40,
            sent_ns: 123_456_789,
        };
        let mut s = Scratch::default();
        let p = s.payload(&f, 1200).to_vec();
        assert_eq!(p.len(), 1200);
        assert_eq!(Fields::parse(&p), Some(f));
        let frame = s.frame(&[0x01, 0x00], &f, 100);
        assert_eq!(frame.len(), 102);
        assert_eq!(Fields::parse(&frame[2..]), Some(f));
        assert_eq!(Fields::parse(&p[..23]), None);
    }
}
