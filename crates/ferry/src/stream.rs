//! One shape for a request stream's two directions, whatever HTTP version carries it, so
//! that one relay serves HTTP/3 streams and HTTP/2 or HTTP/1.1 upgraded byte streams alike.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How much one read from a byte stream may take. Bounded, so a client that sends faster
/// than the target takes makes Ferry stop reading (back-pressure), not buffer.
const READ_CHUNK: usize = 16 * 1024;

/// The receiving half of a request stream.
pub trait StreamRecv: Send {
    /// The next body bytes; `Ok(None)` at a clean end, `Err` on a reset or I/O error.
    fn recv(&mut self) -> impl std::future::Future<Output = Result<Option<Bytes>, ()>> + Send;
}

/// The sending half of a request stream.
pub trait StreamSend: Send {
    fn send(&mut self, data: Bytes) -> impl std::future::Future<Output = Result<(), ()>> + Send;
    /// End the stream cleanly (FIN / END_STREAM / TCP half-close).
    fn finish(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// End the stream with an error, where the version can say so (HTTP/3 RESET_STREAM).
    fn reset(&mut self, code: h3::error::Code);
    /// Send the response head, where the stream carries one separately from its body
    /// (HTTP/3 server streams); a byte stream's response went out before it existed.
    fn respond(
        &mut self,
        _head: http::Response<()>,
    ) -> impl std::future::Future<Output = Result<(), ()>> + Send {
        async { Ok(()) }
    }
}

pub type H3ServerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub type H3ServerRecv = h3::server::RequestStream<crate::h3limit::GuardedRecv, Bytes>;
pub type H3ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub type H3ClientRecv = h3::client::RequestStream<crate::h3limit::GuardedRecv, Bytes>;

impl StreamRecv for H3ServerRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        match self.recv_data().await {
            Ok(Some(mut d)) => Ok(Some(d.copy_to_bytes(d.remaining()))),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

impl StreamRecv for H3ClientRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        match self.recv_data().await {
            Ok(Some(mut d)) => Ok(Some(d.copy_to_bytes(d.remaining()))),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

impl StreamSend for H3ServerSend {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        self.send_data(data).await.map_err(|_| ())
    }
    async fn respond(&mut self, head: http::Response<()>) -> Result<(), ()> {
        self.send_response(head).await.map_err(|_| ())
    }
    async fn finish(&mut self) {
        let _ = h3::server::RequestStream::finish(self).await;
    }
    fn reset(&mut self, code: h3::error::Code) {
        self.stop_stream(code);
    }
}

impl StreamSend for H3ClientSend {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        self.send_data(data).await.map_err(|_| ())
    }
    async fn finish(&mut self) {
        let _ = h3::client::RequestStream::finish(self).await;
    }
    fn reset(&mut self, code: h3::error::Code) {
        self.stop_stream(code);
    }
}

/// The read half of a byte stream (an HTTP/1.1 or HTTP/2 upgraded stream).
pub struct IoRecv<R> {
    io: R,
    buf: BytesMut,
}

impl<R> IoRecv<R> {
    pub fn new(io: R) -> Self {
        IoRecv {
            io,
            buf: BytesMut::new(),
        }
    }
}

impl<R: AsyncRead + Unpin + Send> StreamRecv for IoRecv<R> {
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        if self.buf.capacity() < READ_CHUNK / 4 {
            self.buf = BytesMut::with_capacity(READ_CHUNK * 4);
        }
        let mut limited = (&mut self.io).take(READ_CHUNK as u64);
        match limited.read_buf(&mut self.buf).await {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(self.buf.split().freeze())),
            Err(_) => Err(()),
        }
    }
}

/// The write half of a byte stream.
pub struct IoSend<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> StreamSend for IoSend<W> {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        self.0.write_all(&data).await.map_err(|_| ())?;
        self.0.flush().await.map_err(|_| ())
    }
    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
    fn reset(&mut self, _code: h3::error::Code) {
        // A byte stream has no reset of its own: the caller drops it, which resets the
        // HTTP/2 stream or closes the HTTP/1.1 connection.
    }
}
