//! An HTTP/3 CONNECT-UDP client: the end-to-end tests' client today, `ferry client` and the
//! forwarding upstream later.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use ferry_proto::capsule::{self, Capsule, CapsuleDecoder};
use ferry_proto::datagram;
use h3::ext::Protocol;
use http::{HeaderMap, Method, StatusCode};
use tokio::sync::mpsc;

use crate::demux::{self, DatagramSink, RegistrationGuard, Registry};
use crate::stats::{DropReason, Encoding, HttpStats, Store};

/// How to reach and trust the proxy.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The TLS server name (SNI) and the `:authority` used for requests.
    pub server_name: String,
    /// PEM CA certificate(s) to trust; required unless `insecure`.
    pub ca_pem: Option<String>,
    pub insecure: bool,
    /// Send SETTINGS_H3_DATAGRAM and use QUIC DATAGRAM frames; `false` makes a
    /// capsule-only client.
    pub datagrams: bool,
}

pub type SendRequest = h3::client::SendRequest<crate::h3limit::GuardedOpener, Bytes>;
type ClientStream = h3::client::RequestStream<crate::h3limit::GuardedBidi, Bytes>;

pub struct H3Client {
    pub conn: quinn::Connection,
    send_request: SendRequest,
    registry: Registry,
    datagrams: bool,
    authority: String,
    _endpoint: quinn::Endpoint,
}

impl H3Client {
    pub async fn connect(proxy: SocketAddr, opts: &ClientOptions) -> Result<Self, String> {
        let tls = crate::tls::client_config(opts.ca_pem.as_deref(), opts.insecure, &[b"h3"])?;
        let bind: SocketAddr = if proxy.is_ipv4() {
            "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
        } else {
            "[::]:0".parse().map_err(|e| format!("{e}"))?
        };
        let endpoint = crate::quic::client_endpoint(bind, tls)?;
        let conn = endpoint
            .connect(proxy, &opts.server_name)
            .map_err(|e| format!("connect: {e}"))?
            .await
            .map_err(|e| format!("QUIC handshake: {e}"))?;
        let (mut driver, send_request) = h3::client::builder()
            .enable_extended_connect(true)
            .enable_datagram(opts.datagrams)
            // The proxy's response heads and control frames are bounded as a client's
            // requests are (see h3limit): h3 would buffer any frame whole.
            .max_field_section_size(crate::h3limit::MAX_REQUEST_HEADERS_BYTES)
            .build::<_, _, Bytes>(crate::h3limit::GuardedConnection::client(
                conn.clone(),
                crate::stats::Counter::default(),
            ))
            .await
            .map_err(|e| format!("HTTP/3 setup: {e}"))?;
        crate::supervise::spawn("client connection", async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let stats = HttpStats::new(&Store::new(), "client");
        let registry = demux::spawn(conn.clone(), stats.connect_udp);
        Ok(H3Client {
            conn,
            send_request,
            registry,
            datagrams: opts.datagrams,
            authority: format!("{}:{}", opts.server_name, proxy.port()),
            _endpoint: endpoint,
        })
    }

    /// Send a CONNECT-UDP request for `path` and wait for the response head.
    /// `end_stream` sends the request headers with END_STREAM (a header-only request).
    pub async fn open(
        &mut self,
        path: &str,
        extra_headers: &[(&str, &str)],
        end_stream: bool,
    ) -> Result<ClientTunnel, String> {
        open_on(
            &mut self.send_request,
            &self.conn,
            &self.registry,
            self.datagrams,
            &self.authority,
            path,
            extra_headers,
            end_stream,
        )
        .await
    }
}

/// Send a CONNECT-UDP request on an HTTP/3 connection and wait for the response head:
/// the one way `ferry client`, the udp_proxy listener and the tests open tunnels.
/// `datagrams`: use QUIC DATAGRAM frames (the peer's SETTINGS allowing).
#[allow(clippy::too_many_arguments)]
pub async fn open_on(
    send_request: &mut SendRequest,
    conn: &quinn::Connection,
    registry: &Registry,
    datagrams: bool,
    authority: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
    end_stream: bool,
) -> Result<ClientTunnel, String> {
    let mut req = http::Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{authority}{path}"))
        .extension(Protocol::CONNECT_UDP);
    for (k, v) in extra_headers {
        req = req.header(*k, *v);
    }
    let req = req.body(()).map_err(|e| format!("bad request: {e}"))?;
    let mut stream = send_request
        .send_request(req)
        .await
        .map_err(|e| format!("send_request: {e}"))?;
    if end_stream {
        stream.finish().await.map_err(|e| format!("finish: {e}"))?;
    }
    // Register for datagrams before the response can arrive: the proxy may send one right
    // after its 2xx, and QUIC does not order it after the HEADERS frame. (No read is
    // pending yet, so `id()` is safe with h3-quinn.)
    let stream_id = stream.id().into_inner();
    let (tx, rx) = mpsc::channel(4096);
    let sink: Arc<dyn DatagramSink> = Arc::new(ChannelSink(tx));
    let registration = RegistrationGuard::new(registry, stream_id, sink);
    let resp = stream
        .recv_response()
        .await
        .map_err(|e| format!("recv_response: {e}"))?;
    Ok(ClientTunnel {
        status: resp.status(),
        headers: resp.headers().clone(),
        stream_id,
        stream,
        conn: conn.clone(),
        datagrams,
        rx,
        decoder: CapsuleDecoder::new(crate::tunnel::MAX_CAPSULE_LEN),
        stream_done: false,
        _registration: registration,
        _lease: None,
    })
}

struct ChannelSink(mpsc::Sender<Bytes>);

impl DatagramSink for ChannelSink {
    fn deliver(&self, http_datagram_payload: Bytes) -> Result<(), DropReason> {
        match datagram::split_context_id(http_datagram_payload) {
            Ok((datagram::CONTEXT_ID_UDP, payload)) => {
                self.0.try_send(payload).map_err(|_| DropReason::BufferFull)
            }
            Ok(_) => Err(DropReason::UnknownContextId),
            Err(_) => Err(DropReason::Malformed),
        }
    }
}

pub struct ClientTunnel {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub stream_id: u64,
    stream: ClientStream,
    conn: quinn::Connection,
    datagrams: bool,
    rx: mpsc::Receiver<Bytes>,
    decoder: CapsuleDecoder,
    stream_done: bool,
    _registration: RegistrationGuard,
    /// The stream slot on a pooled upstream connection, held while the tunnel lives.
    _lease: Option<crate::upstream::StreamLease>,
}

/// What the client saw arrive.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Udp(Encoding, Bytes),
    /// The proxy ended the stream cleanly.
    Finished,
    /// The stream was reset or broken (the message says how).
    Reset(String),
}

impl ClientTunnel {
    /// Send a UDP payload as an HTTP/3 datagram if datagrams were negotiated, else as a
    /// DATAGRAM capsule.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), String> {
        if self.datagrams {
            self.send_datagram(payload)
        } else {
            self.send_capsule(0, payload).await
        }
    }

    /// Hold `lease` (a pooled connection's stream slot) for as long as the tunnel lives.
    pub fn with_lease(mut self, lease: crate::upstream::StreamLease) -> Self {
        self._lease = Some(lease);
        self
    }

    /// Send a UDP payload as an HTTP/3 datagram when datagrams were negotiated and it fits
    /// the QUIC path, else as a DATAGRAM capsule on the stream (an endpoint may; RFC 9297
    /// section 3.5 asks only intermediaries not to convert). Returns how it went.
    pub async fn send_fitting(&mut self, payload: &[u8]) -> Result<Encoding, String> {
        if self.datagrams {
            let header = ferry_proto::varint::encoded_len(self.stream_id / 4) + 1;
            let fits = self
                .conn
                .max_datagram_size()
                .is_some_and(|max| header + payload.len() <= max);
            if fits {
                match self.send_datagram(payload) {
                    Ok(()) => return Ok(Encoding::QuicDatagram),
                    Err(e) if self.conn.close_reason().is_some() => return Err(e),
                    // Too large after all (the path shrank): the stream takes it.
                    Err(_) => {}
                }
            }
        }
        self.send_capsule(0, payload).await?;
        Ok(Encoding::Capsule)
    }

    /// An HTTP/3 datagram carrying `payload` with context id 0.
    pub fn send_datagram(&self, payload: &[u8]) -> Result<(), String> {
        self.send_datagram_with_context(0, payload)
    }

    pub fn send_datagram_with_context(
        &self,
        context_id: u64,
        payload: &[u8],
    ) -> Result<(), String> {
        let mut b = BytesMut::with_capacity(payload.len() + 16);
        ferry_proto::varint::put(self.stream_id / 4, &mut b).map_err(|e| e.to_string())?;
        ferry_proto::varint::put(context_id, &mut b).map_err(|e| e.to_string())?;
        b.extend_from_slice(payload);
        self.conn
            .send_datagram(b.freeze())
            .map_err(|e| format!("send_datagram: {e}"))
    }

    /// A DATAGRAM capsule with `context_id` and `payload`.
    pub async fn send_capsule(&mut self, context_id: u64, payload: &[u8]) -> Result<(), String> {
        let mut body = BytesMut::new();
        ferry_proto::varint::put(context_id, &mut body).map_err(|e| e.to_string())?;
        body.extend_from_slice(payload);
        self.send_any_capsule(capsule::DATAGRAM_CAPSULE_TYPE, &body)
            .await
    }

    /// Any capsule type with a raw payload.
    pub async fn send_any_capsule(
        &mut self,
        capsule_type: u64,
        payload: &[u8],
    ) -> Result<(), String> {
        let mut b = BytesMut::new();
        capsule::encode_header(capsule_type, payload.len() as u64, &mut b)
            .map_err(|e| e.to_string())?;
        b.extend_from_slice(payload);
        self.send_raw(b.freeze()).await
    }

    /// Raw bytes on the request stream (for malformed-input tests).
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<(), String> {
        self.stream
            .send_data(bytes)
            .await
            .map_err(|e| format!("send_data: {e}"))
    }

    /// End the client's side of the stream.
    pub async fn finish(&mut self) -> Result<(), String> {
        self.stream
            .finish()
            .await
            .map_err(|e| format!("finish: {e}"))
    }

    /// The next thing that arrives: a UDP payload by either path, or the end of the stream.
    pub async fn recv(&mut self) -> Received {
        loop {
            match self.decoder.next() {
                Ok(Some(Capsule::Datagram(p))) => match datagram::split_context_id(p) {
                    Ok((0, udp)) => return Received::Udp(Encoding::Capsule, udp),
                    Ok(_) => continue,
                    Err(e) => return Received::Reset(format!("bad capsule from proxy: {e}")),
                },
                Ok(Some(Capsule::Unknown { .. })) => continue,
                Ok(None) => {}
                Err(e) => return Received::Reset(format!("bad capsule from proxy: {e}")),
            }
            if self.stream_done {
                match self.rx.recv().await {
                    Some(p) => return Received::Udp(Encoding::QuicDatagram, p),
                    None => return Received::Finished,
                }
            }
            tokio::select! {
                Some(p) = self.rx.recv() => return Received::Udp(Encoding::QuicDatagram, p),
                data = self.stream.recv_data() => match data {
                    Ok(Some(mut d)) => {
                        let bytes = d.copy_to_bytes(d.remaining());
                        self.decoder.push(bytes);
                    }
                    Ok(None) => {
                        self.stream_done = true;
                        return Received::Finished;
                    }
                    Err(e) => {
                        self.stream_done = true;
                        return Received::Reset(e.to_string());
                    }
                },
            }
        }
    }
}
