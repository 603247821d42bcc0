//! A bound on what the HTTP/3 library buffers for a peer: the frames of every stream a
//! client opens pass through a [`FrameGuard`] before h3 sees them. On the connections Ferry
//! opens (to next hops, and `ferry client`'s), the peer's control stream and the response
//! side of every request stream pass through one too ([`GuardedConnection::client`]).
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
//! The guard (`ferry_proto::h3frame::FrameGuard`, which has no I/O and is fuzzed) parses
//! just the frame headers (type and length varints) as the bytes go by, without copying or
//! holding anything:
//! - on a request stream, the bytes up to the end of the first HEADERS frame (the request
//!   head, and any unknown frames before it) may not exceed [`MAX_REQUEST_HEAD_BYTES`],
//!   and a HEADERS frame announcing more than the limit is refused as soon as its length
//!   is read. The request gets 431 (see `h3server`) and STOP_SENDING(H3_NO_ERROR)
//!   (RFC 9114 section 4.1.1: a complete response before the whole request);
//! - every later non-DATA frame on a request stream (trailers, unknown frames) may carry
//!   at most the limit: past it the stream fails with STOP_SENDING(H3_EXCESSIVE_LOAD) and
//!   h3 returns an error to whoever reads it (the tunnel ends). Whole frames that came in
//!   the same read before it (the request head itself, say) still reach h3 first;
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

use crate::stats::Counter;

pub use ferry_proto::h3frame::{
    FrameGuard, FrameTooLarge, MAX_BUFFERED_FRAME_BYTES, MAX_REQUEST_HEADERS_BYTES,
    MAX_REQUEST_HEAD_BYTES,
};

/// RFC 9114 section 8.1.
const H3_NO_ERROR: u32 = 0x100;
const H3_EXCESSIVE_LOAD: u32 = 0x107;

/// An h3 receive stream whose bytes pass through a [`FrameGuard`] first.
pub struct Guarded<S> {
    inner: S,
    guard: FrameGuard,
    /// Set once refused: every later read fails the same way, without reading.
    refused: Option<FrameTooLarge>,
    /// For the control stream: the connection to close when it is refused.
    conn: Option<quinn::Connection>,
    /// STOP_SENDING code for a refused head: H3_NO_ERROR on a server's request stream (the
    /// 431 response is complete without the rest of the request), H3_EXCESSIVE_LOAD on a
    /// client's (a response head over the limit is the peer's fault).
    head_code: u32,
    /// Counts every refusal (`downstream_h3_frame_too_large`, or the cluster's
    /// `upstream_h3_frame_too_large`).
    refusals: Counter,
}

impl<S> Guarded<S> {
    fn new(inner: S, guard: FrameGuard, conn: Option<quinn::Connection>, role: &Role) -> Self {
        Guarded {
            inner,
            guard,
            refused: None,
            conn,
            head_code: role.head_code,
            refusals: role.refusals.clone(),
        }
    }
}

/// Which side of the connection Ferry is, and where refusals are counted.
#[derive(Clone)]
struct Role {
    head_code: u32,
    refusals: Counter,
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
                self.refusals.inc();
                // A request stream whose head is complete: the whole frames this read
                // brought before the refused one (the request head itself, when both came
                // in one read) still go to h3, so the request is read and answered (413
                // from `h3server::terminate`, which sees the refusal on its first read of
                // the body). The next read fails.
                let passed = (self.conn.is_none() && !e.request_head && e.accepted > 0)
                    .then(|| data.slice(..e.accepted.min(data.len())));
                match &self.conn {
                    Some(conn) => conn.close(
                        quinn::VarInt::from_u32(H3_EXCESSIVE_LOAD),
                        b"control frame too large",
                    ),
                    // No read is in flight here (it has just completed), so h3-quinn's
                    // stop_sending does not panic. Unread bytes are then discarded by
                    // quinn instead of waiting in the stream's window.
                    None => self.inner.stop_sending(u64::from(if e.request_head {
                        self.head_code
                    } else {
                        H3_EXCESSIVE_LOAD
                    })),
                }
                match passed {
                    Some(whole_frames) => Poll::Ready(Ok(Some(whole_frames))),
                    None => Poll::Ready(Err(refusal(e))),
                }
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
            head_code: self.head_code,
            refusals: self.refusals,
        };
        (send, recv)
    }
}

/// The guard's refusal, when that is what `err` (from reading a request stream) is.
pub fn refused_frame(err: &h3::error::StreamError) -> Option<FrameTooLarge> {
    match err {
        h3::error::StreamError::Undefined(e) => e.downcast_ref::<FrameTooLarge>().copied(),
        _ => None,
    }
}

/// A request stream (both directions): a server's, or one a client opened.
pub type GuardedBidi = Guarded<h3_quinn::BidiStream<Bytes>>;
/// Its receiving half.
pub type GuardedRecv = Guarded<h3_quinn::RecvStream>;

/// h3-quinn's connection with every stream guarded that carries frames from the peer: the
/// streams the peer opens (its control stream, a client's requests) and, on a client, the
/// request streams it opens (the peer's responses).
pub struct GuardedConnection {
    inner: h3_quinn::Connection,
    conn: quinn::Connection,
    role: Role,
}

impl GuardedConnection {
    /// A server's connection: request heads over the limit get 431. Every refusal is
    /// counted in `refusals`.
    pub fn new(conn: quinn::Connection, refusals: Counter) -> Self {
        Self::with_role(conn, H3_NO_ERROR, refusals)
    }

    /// A client's connection (to a next hop, or `ferry client`'s): a response head over
    /// the limit fails its request with STOP_SENDING(H3_EXCESSIVE_LOAD), and the peer's
    /// control stream is held to the same bounds as a client's.
    pub fn client(conn: quinn::Connection, refusals: Counter) -> Self {
        Self::with_role(conn, H3_EXCESSIVE_LOAD, refusals)
    }

    fn with_role(conn: quinn::Connection, head_code: u32, refusals: Counter) -> Self {
        GuardedConnection {
            inner: h3_quinn::Connection::new(conn.clone()),
            conn,
            role: Role {
                head_code,
                refusals,
            },
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
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, cx).map_ok(|s| {
            Guarded::new(
                s,
                FrameGuard::unidirectional(),
                Some(self.conn.clone()),
                &self.role,
            )
        })
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::request(), None, &self.role))
    }

    fn opener(&self) -> Self::OpenStreams {
        GuardedOpener(
            quic::Connection::<Bytes>::opener(&self.inner),
            self.role.clone(),
        )
    }
}

impl quic::OpenStreams<Bytes> for GuardedConnection {
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.inner, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::request(), None, &self.role))
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

/// The stream opener of a [`GuardedConnection`]: on a client, the request streams it opens
/// are guarded (the peer's response comes on them); a server opens only unidirectional
/// streams.
#[derive(Clone)]
pub struct GuardedOpener(h3_quinn::OpenStreams, Role);

impl quic::OpenStreams<Bytes> for GuardedOpener {
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.0, cx)
            .map_ok(|s| Guarded::new(s, FrameGuard::request(), None, &self.1))
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

    #[test]
    fn the_synthesized_block_decodes_over_the_limit() {
        let block = over_limit_header_block(MAX_REQUEST_HEADERS_BYTES);
        assert!(block.len() < 2048);
        assert!((block.len() as u64 - 2) * 42 > MAX_REQUEST_HEADERS_BYTES);
    }
}
