//! A bound on what the HTTP/3 library buffers for a peer: the frames of every stream a
//! client opens pass through a [`FrameGuard`] before h3 sees them.
//!
//! Why: h3 0.0.8 decodes every frame other than DATA only once its whole payload is in
//! its own buffer (`h3::frame::FrameDecoder` asks for `2 + len` bytes and keeps reading
//! from QUIC until it has them), and it reads QUIC as fast as the peer sends, handing the
//! flow-control credit straight back. Its `max_field_section_size` is checked only after
//! that, on the decoded header block. So a HEADERS frame announcing 8 MiB (or an unknown
//! frame announcing 2^60 bytes, on a request stream or the control stream) made Ferry
//! buffer everything the peer cared to send. QUIC flow control does not help: quinn's
//! per-stream window (1.25 MB) bounds only bytes not yet *read*, and h3 reads them.
//! Shrinking that window would bound it, but for every stream, tunnels included, whose
//! capsules then could not fill a high-latency path.
//!
//! The guard parses just the frame headers (type and length varints) as the bytes go by,
//! without copying or holding anything:
//! - on a request stream, the bytes up to the end of the first HEADERS frame (the request
//!   head, and any unknown frames before it) may not exceed [`MAX_REQUEST_HEAD_BYTES`],
//!   and a HEADERS frame announcing more than the limit is refused as soon as its length
//!   is read. The request gets 431 (see `h3server`) and STOP_SENDING(H3_NO_ERROR)
//!   (RFC 9114 section 4.1.1: a complete response before the whole request);
//! - every later non-DATA frame on a request stream (trailers, unknown frames) may carry
//!   at most the limit: past it the stream fails with STOP_SENDING(H3_EXCESSIVE_LOAD) and
//!   h3 returns an error to whoever reads it (the tunnel ends);
//! - on the peer's control stream every frame may carry at most the limit: past it the
//!   connection is closed with H3_EXCESSIVE_LOAD.
//!
//! DATA payloads pass unbounded (h3 streams them out as they come). The QPACK encoder and
//! decoder streams are not read by h3 past their type byte (it uses no dynamic table), so
//! quinn's stream window bounds them; unknown unidirectional streams are stopped by h3.
//!
//! The limit applies to the *encoded* header block, while SETTINGS_MAX_FIELD_SECTION_SIZE
//! (RFC 9114 section 4.2.2) counts the decoded size (names + values + 32 per field). An
//! encoded field line never takes more than its decoded size (at most 9 bytes of prefixes
//! against 32 of overhead) unless the encoder Huffman-codes a string into something longer
//! than the string itself, which encoders do not do; so a header section that would pass
//! the decoded check is not refused here.

use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

use crate::h3server::MAX_REQUEST_HEADERS_BYTES;

/// The most a request stream may carry before its request head is complete (the HEADERS
/// frame and any unknown frames before it, frame headers included): the header limit plus
/// room for frame headers and reserved (grease) frames.
pub const MAX_REQUEST_HEAD_BYTES: u64 = MAX_REQUEST_HEADERS_BYTES + 4096;

/// The largest payload of any frame h3 would buffer whole (every type but DATA).
pub const MAX_BUFFERED_FRAME_BYTES: u64 = MAX_REQUEST_HEADERS_BYTES;

const FRAME_DATA: u64 = 0x0;
const FRAME_HEADERS: u64 = 0x1;
/// WebTransport's bidirectional stream signal: a session id follows, then unframed bytes.
const FRAME_WEBTRANSPORT_BI: u64 = 0x41;
const STREAM_TYPE_CONTROL: u64 = 0x0;
/// RFC 9114 section 8.1.
const H3_NO_ERROR: u32 = 0x100;
const H3_EXCESSIVE_LOAD: u32 = 0x107;

/// Why a stream was refused. It travels to the reader inside h3's
/// `StreamErrorIncoming::Unknown`; [`FrameTooLarge::is_request_head`] picks out requests
/// whose head was too large (answered 431).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge {
    /// The refused bytes were part of a request head.
    pub request_head: bool,
    pub frame_type: u64,
    /// The frame's announced payload length, or the request head's bytes so far.
    pub len: u64,
}

impl std::fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.request_head {
            write!(
                f,
                "request head too large: {} bytes (frame type {:#x}), limit {}",
                self.len, self.frame_type, MAX_REQUEST_HEAD_BYTES
            )
        } else {
            write!(
                f,
                "HTTP/3 frame type {:#x} of {} bytes, over the {} byte limit",
                self.frame_type, self.len, MAX_BUFFERED_FRAME_BYTES
            )
        }
    }
}

impl std::error::Error for FrameTooLarge {}

impl FrameTooLarge {
    /// Whether `err` (an error h3 returned from a request stream's first frame) is the
    /// guard refusing a request head.
    pub fn is_request_head(err: &(dyn std::error::Error + 'static)) -> bool {
        err.downcast_ref::<FrameTooLarge>()
            .is_some_and(|e| e.request_head)
    }
}

/// A QUIC varint being read a byte at a time.
#[derive(Debug, Default, Clone, Copy)]
struct VarInt {
    value: u64,
    /// Bytes still to read; 0 before the first byte.
    left: u8,
    started: bool,
}

impl VarInt {
    /// Take one byte; the value once complete.
    fn push(&mut self, b: u8) -> Option<u64> {
        if !self.started {
            self.started = true;
            self.left = (1u8 << (b >> 6)) - 1;
            self.value = u64::from(b & 0x3f);
        } else {
            self.value = (self.value << 8) | u64::from(b);
            self.left -= 1;
        }
        (self.left == 0).then_some(self.value)
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A unidirectional stream's type.
    StreamType(VarInt),
    FrameType(VarInt),
    FrameLen {
        ty: u64,
        len: VarInt,
    },
    Payload {
        ty: u64,
        left: u64,
    },
    /// Bytes with no frames to follow (a unidirectional stream other than control; a
    /// WebTransport stream, which h3 refuses anyway): passed through.
    Unframed,
}

/// Where a stream stands with its request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Request stream, head not complete: bytes seen so far.
    Pending(u64),
    Done,
    /// Not a request stream.
    None,
}

/// Tracks the frame structure of one received stream, refusing frames h3 would buffer
/// past the limits. Holds no data.
#[derive(Debug, Clone, Copy)]
pub struct FrameGuard {
    phase: Phase,
    head: Head,
}

impl FrameGuard {
    /// For a client-initiated bidirectional (request) stream.
    pub fn request() -> Self {
        FrameGuard {
            phase: Phase::FrameType(VarInt::default()),
            head: Head::Pending(0),
        }
    }

    /// For a unidirectional stream: its type decides (only the control stream has
    /// frames h3 buffers).
    pub fn unidirectional() -> Self {
        FrameGuard {
            phase: Phase::StreamType(VarInt::default()),
            head: Head::None,
        }
    }

    /// Look at the next bytes of the stream.
    pub fn inspect(&mut self, data: &[u8]) -> Result<(), FrameTooLarge> {
        let mut i = 0;
        while i < data.len() {
            let before = i;
            match &mut self.phase {
                Phase::Unframed => return Ok(()),
                Phase::Payload { ty, left } => {
                    let take = (data.len() - i).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    i += take;
                    *left -= take as u64;
                    if *left == 0 {
                        let ty = *ty;
                        self.count(take)?;
                        self.frame_done(ty);
                        continue;
                    }
                }
                Phase::StreamType(v) => {
                    i += 1;
                    if let Some(ty) = v.push(data[before]) {
                        self.phase = if ty == STREAM_TYPE_CONTROL {
                            Phase::FrameType(VarInt::default())
                        } else {
                            Phase::Unframed
                        };
                    }
                }
                Phase::FrameType(v) => {
                    i += 1;
                    if let Some(ty) = v.push(data[before]) {
                        self.phase = Phase::FrameLen {
                            ty,
                            len: VarInt::default(),
                        };
                    }
                }
                Phase::FrameLen { ty, len } => {
                    i += 1;
                    if let Some(len) = len.push(data[before]) {
                        let ty = *ty;
                        self.count(i - before)?;
                        self.frame_start(ty, len)?;
                        continue;
                    }
                }
            }
            self.count(i - before)?;
        }
        Ok(())
    }

    /// Count bytes against the request head's budget while it is pending.
    fn count(&mut self, n: usize) -> Result<(), FrameTooLarge> {
        if let Head::Pending(seen) = &mut self.head {
            *seen += n as u64;
            if *seen > MAX_REQUEST_HEAD_BYTES {
                let ty = match self.phase {
                    Phase::Payload { ty, .. } | Phase::FrameLen { ty, .. } => ty,
                    _ => FRAME_HEADERS,
                };
                return Err(FrameTooLarge {
                    request_head: true,
                    frame_type: ty,
                    len: *seen,
                });
            }
        }
        Ok(())
    }

    fn frame_start(&mut self, ty: u64, len: u64) -> Result<(), FrameTooLarge> {
        let request = self.head != Head::None;
        if request && ty == FRAME_WEBTRANSPORT_BI {
            self.phase = Phase::Unframed;
            return Ok(());
        }
        // DATA is streamed by h3, never buffered whole (on the control stream it is a
        // connection error h3 raises without reading the payload).
        if ty != FRAME_DATA {
            let pending = matches!(self.head, Head::Pending(_));
            if pending && ty == FRAME_HEADERS && len > MAX_REQUEST_HEADERS_BYTES {
                return Err(FrameTooLarge {
                    request_head: true,
                    frame_type: ty,
                    len,
                });
            }
            if len > MAX_BUFFERED_FRAME_BYTES {
                return Err(FrameTooLarge {
                    request_head: pending,
                    frame_type: ty,
                    len,
                });
            }
        }
        if len == 0 {
            self.frame_done(ty);
        } else {
            self.phase = Phase::Payload { ty, left: len };
        }
        Ok(())
    }

    fn frame_done(&mut self, ty: u64) {
        if ty == FRAME_HEADERS && matches!(self.head, Head::Pending(_)) {
            self.head = Head::Done;
        }
        self.phase = Phase::FrameType(VarInt::default());
    }
}

/// An h3 receive stream whose bytes pass through a [`FrameGuard`] first.
pub struct Guarded<S> {
    inner: S,
    guard: FrameGuard,
    /// Set once refused: every later read fails the same way, without reading.
    refused: Option<FrameTooLarge>,
    /// For the control stream: the connection to close when it is refused.
    conn: Option<quinn::Connection>,
}

impl<S> Guarded<S> {
    fn new(inner: S, guard: FrameGuard, conn: Option<quinn::Connection>) -> Self {
        Guarded {
            inner,
            guard,
            refused: None,
            conn,
        }
    }
}

fn refusal(e: FrameTooLarge) -> StreamErrorIncoming {
    StreamErrorIncoming::Unknown(Box::new(e))
}

impl<S: quic::RecvStream<Buf = Bytes>> quic::RecvStream for Guarded<S> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some(e) = self.refused {
            return Poll::Ready(Err(refusal(e)));
        }
        let data = match self.inner.poll_data(cx) {
            Poll::Ready(Ok(Some(data))) => data,
            other => return other,
        };
        match self.guard.inspect(data.chunk()) {
            Ok(()) => Poll::Ready(Ok(Some(data))),
            Err(e) => {
                tracing::debug!("refusing stream: {e}");
                self.refused = Some(e);
                match &self.conn {
                    Some(conn) => conn.close(
                        quinn::VarInt::from_u32(H3_EXCESSIVE_LOAD),
                        b"control frame too large",
                    ),
                    // No read is in flight here (it has just completed), so h3-quinn's
                    // stop_sending does not panic. Unread bytes are then discarded by
                    // quinn instead of waiting in the stream's window.
                    None => self.inner.stop_sending(u64::from(if e.request_head {
                        H3_NO_ERROR
                    } else {
                        H3_EXCESSIVE_LOAD
                    })),
                }
                Poll::Ready(Err(refusal(e)))
            }
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<B: Buf, S: quic::SendStream<B>> quic::SendStream<B> for Guarded<S> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

impl<B: Buf, S: quic::BidiStream<B>> quic::BidiStream<B> for Guarded<S>
where
    S::RecvStream: quic::RecvStream<Buf = Bytes>,
    S: quic::RecvStream<Buf = Bytes>,
{
    type SendStream = S::SendStream;
    type RecvStream = Guarded<S::RecvStream>;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        let (send, recv) = self.inner.split();
        let recv = Guarded {
            inner: recv,
            guard: self.guard,
            refused: self.refused,
            conn: self.conn,
        };
        (send, recv)
    }
}

/// A server-side request stream (both directions).
pub type ServerBidi = Guarded<h3_quinn::BidiStream<Bytes>>;
/// Its receiving half.
pub type ServerRecv = Guarded<h3_quinn::RecvStream>;

/// h3-quinn's connection with every stream the peer opens guarded.
pub struct GuardedConnection {
    inner: h3_quinn::Connection,
    conn: quinn::Connection,
}

impl GuardedConnection {
    pub fn new(conn: quinn::Connection) -> Self {
        GuardedConnection {
            inner: h3_quinn::Connection::new(conn.clone()),
            conn,
        }
    }
}

impl quic::Connection<Bytes> for GuardedConnection {
    type RecvStream = Guarded<h3_quinn::RecvStream>;
    type OpenStreams = GuardedOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::unidirectional(), Some(self.conn.clone())))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::request(), None))
    }

    fn opener(&self) -> Self::OpenStreams {
        GuardedOpener(quic::Connection::<Bytes>::opener(&self.inner))
    }
}

impl quic::OpenStreams<Bytes> for GuardedConnection {
    type BidiStream = ServerBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.inner, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::request(), None))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason)
    }
}

/// The stream opener of a [`GuardedConnection`] (h3 opens only unidirectional streams on
/// a server; a bidirectional one would be guarded like a request stream).
pub struct GuardedOpener(h3_quinn::OpenStreams);

impl quic::OpenStreams<Bytes> for GuardedOpener {
    type BidiStream = ServerBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.0, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::request(), None))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_send(&mut self.0, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.0, code, reason)
    }
}

/// A QPACK header block whose decoded size is over `max` (h3 stops decoding as soon as the
/// sum passes it): static-table references to `:authority` with an empty value, each 1
/// byte encoded and 42 (10 + 0 + 32) decoded. h3 answers such a block with 431 and
/// returns `StreamError::HeaderTooBig`; Ferry hands it to h3 in place of a request head
/// the guard refused, so the refusal takes h3's own 431 path (response, stream end,
/// request accounting) without the oversized bytes ever being buffered.
pub fn over_limit_header_block(max: u64) -> Bytes {
    let fields = usize::try_from(max / 42 + 1).unwrap_or(usize::MAX / 2);
    let mut block = Vec::with_capacity(2 + fields);
    block.extend_from_slice(&[0x00, 0x00]); // Required Insert Count 0, Base 0
    block.resize(2 + fields, 0xc0); // indexed field line, static table, index 0
    Bytes::from(block)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn varint(v: u64) -> Vec<u8> {
        match v {
            0..=63 => vec![v as u8],
            64..=16383 => (0x4000 | v as u16).to_be_bytes().to_vec(),
            16384..=1_073_741_823 => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
            _ => (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec(),
        }
    }

    fn frame_header(ty: u64, len: u64) -> Vec<u8> {
        let mut b = varint(ty);
        b.extend(varint(len));
        b
    }

    /// Feed `data` one byte at a time and in one piece; both must agree.
    fn feed(guard: FrameGuard, data: &[u8]) -> Result<(), FrameTooLarge> {
        let mut whole = guard;
        let a = whole.inspect(data);
        let mut bytewise = guard;
        let b = data.iter().try_for_each(|b| bytewise.inspect(&[*b]));
        // The same verdict; a head's byte count may differ (a chunk is counted whole).
        let verdict = |r: &Result<(), FrameTooLarge>| r.map_err(|e| (e.request_head, e.frame_type));
        assert_eq!(verdict(&a), verdict(&b));
        a
    }

    #[test]
    fn headers_at_the_limit_then_unbounded_data_pass() {
        let limit = MAX_REQUEST_HEADERS_BYTES;
        let mut s = frame_header(0x21, 5); // reserved (grease) frame first
        s.extend([0; 5]);
        s.extend(frame_header(FRAME_HEADERS, limit));
        s.extend(vec![0; limit as usize]);
        s.extend(frame_header(FRAME_DATA, 1 << 20));
        s.extend(vec![0; 1 << 20]);
        s.extend(frame_header(FRAME_HEADERS, 100)); // trailers
        s.extend([0; 100]);
        feed(FrameGuard::request(), &s).unwrap();
    }

    #[test]
    fn oversized_headers_are_refused_on_their_length() {
        let s = frame_header(FRAME_HEADERS, 8 << 20);
        let e = feed(FrameGuard::request(), &s).unwrap_err();
        assert!(e.request_head);
        assert_eq!((e.frame_type, e.len), (FRAME_HEADERS, 8 << 20));
        let e = feed(
            FrameGuard::request(),
            &frame_header(FRAME_HEADERS, MAX_REQUEST_HEADERS_BYTES + 1),
        )
        .unwrap_err();
        assert!(FrameTooLarge::is_request_head(&e));
    }

    #[test]
    fn many_small_frames_before_the_head_are_bounded() {
        let mut s = Vec::new();
        while s.len() as u64 <= MAX_REQUEST_HEAD_BYTES {
            s.extend(frame_header(0x21, 1000));
            s.extend([0; 1000]);
        }
        let e = feed(FrameGuard::request(), &s).unwrap_err();
        assert!(e.request_head);
        assert!(e.len > MAX_REQUEST_HEAD_BYTES);
    }

    #[test]
    fn oversized_frames_after_the_head_are_refused() {
        let mut s = frame_header(FRAME_HEADERS, 10);
        s.extend([0; 10]);
        let mut unknown = s.clone();
        unknown.extend(frame_header(0x21, 1 << 40));
        let e = feed(FrameGuard::request(), &unknown).unwrap_err();
        assert!(!e.request_head);
        assert_eq!((e.frame_type, e.len), (0x21, 1 << 40));
        s.extend(frame_header(FRAME_HEADERS, MAX_BUFFERED_FRAME_BYTES + 1));
        assert!(!feed(FrameGuard::request(), &s).unwrap_err().request_head);
    }

    #[test]
    fn control_stream_frames_are_bounded_other_streams_pass() {
        let mut control = varint(STREAM_TYPE_CONTROL);
        control.extend(frame_header(0x4, 6)); // SETTINGS
        control.extend([0; 6]);
        feed(FrameGuard::unidirectional(), &control).unwrap();
        control.extend(frame_header(0x21, 1 << 30));
        let e = feed(FrameGuard::unidirectional(), &control).unwrap_err();
        assert!(!e.request_head);
        let mut encoder = varint(0x2);
        encoder.extend(frame_header(FRAME_HEADERS, 1 << 30));
        feed(FrameGuard::unidirectional(), &encoder).unwrap();
    }

    #[test]
    fn the_synthesized_block_decodes_over_the_limit() {
        let block = over_limit_header_block(MAX_REQUEST_HEADERS_BYTES);
        assert!(block.len() < 2048);
        assert!((block.len() as u64 - 2) * 42 > MAX_REQUEST_HEADERS_BYTES);
    }
}
