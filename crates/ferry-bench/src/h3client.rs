//! A lean HTTP/3 CONNECT-UDP client on quinn + h3: connections, extended CONNECT requests,
//! and HTTP/3 datagram headers. The datagram path itself (sending and reading QUIC DATAGRAM
//! frames) is in `lanes.rs`; this module only sets things up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h3::ext::Protocol;
use http::Method;

pub type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
pub type ClientStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Socket buffers asked for on every socket the bench opens (capped by rmem_max/wmem_max).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// How to reach and trust the proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub proxy: SocketAddr,
    /// TLS server name and the host of `:authority`.
    pub server_name: String,
    /// PEM file of the CA (or self-signed certificate) to trust.
    pub ca_pem: Option<String>,
    pub insecure: bool,
    /// The `{target_host}/{target_port}` put in the request path.
    pub target: SocketAddr,
    /// UDP segmentation offload (GSO) on the client's QUIC socket.
    pub gso: bool,
    /// Path-MTU discovery on the client's QUIC connections.
    pub pmtud: bool,
}

impl ProxyOptions {
    pub fn path(&self) -> String {
        let host = match self.target {
            SocketAddr::V4(a) => a.ip().to_string(),
            // RFC 9298: an IPv6 literal is percent-encoded, colons as %3A.
            SocketAddr::V6(a) => a.ip().to_string().replace(':', "%3A"),
        };
        format!("/.well-known/masque/udp/{host}/{}/", self.target.port())
    }

    pub fn uri(&self) -> String {
        format!(
            "https://{}:{}{}",
            self.server_name,
            self.proxy.port(),
            self.path()
        )
    }
}

/// The same TLS client configuration as Ferry's own client (TLS 1.3, ALPN h3).
pub fn tls_config(opts: &ProxyOptions) -> Result<rustls::ClientConfig, String> {
    if !opts.insecure && opts.ca_pem.is_none() {
        return Err("no CA certificate given (--ca FILE or --insecure)".into());
    }
    ferry::tls::client_config(opts.ca_pem.as_deref(), opts.insecure, &[b"h3"])
}

/// Transport settings: DATAGRAM support with large buffers, path-MTU discovery on (quinn's
/// default), a long idle timeout so a slow run never loses its connections.
pub fn transport_config(opts: &ProxyOptions) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.enable_segmentation_offload(opts.gso);
    if opts.pmtud {
        // A burst that loses packets (10,000 probes at once, say) can make quinn's black-hole
        // detection drop the path MTU back to 1,200 bytes, and by default it waits a minute
        // before probing again: 1,200-byte payloads are refused meanwhile. Probe again after
        // a second, so a run recovers instead of timing out.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.black_hole_cooldown(Duration::from_secs(1));
        t.mtu_discovery_config(Some(mtu));
    } else {
        t.mtu_discovery_config(None);
    }
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(120)) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    t.datagram_receive_buffer_size(Some(SOCKET_BUFFER));
    t.datagram_send_buffer_size(SOCKET_BUFFER);
    t
}

/// A UDP socket with large buffers.
pub fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&bind.into())?;
    Ok(s.into())
}

pub fn loopback_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    }
}

/// A client endpoint (one UDP socket) that can open many connections.
pub fn endpoint(opts: &ProxyOptions) -> Result<quinn::Endpoint, String> {
    let tls = tls_config(opts)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("TLS config unusable for QUIC: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(opts)));
    let socket = udp_socket(loopback_for(opts.proxy)).map_err(|e| format!("bind: {e}"))?;
    let mut ep = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("QUIC endpoint: {e}"))?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// One HTTP/3 connection to the proxy.
pub struct H3Conn {
    pub conn: quinn::Connection,
    pub send_request: SendRequest,
    /// Time of the QUIC handshake and of the HTTP/3 set-up.
    pub handshake: Duration,
}

pub async fn connect(ep: &quinn::Endpoint, opts: &ProxyOptions) -> Result<H3Conn, String> {
    let start = Instant::now();
    let conn = ep
        .connect(opts.proxy, &opts.server_name)
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("QUIC handshake: {e}"))?;
    let (mut driver, send_request) = h3::client::builder()
        .enable_extended_connect(true)
        .enable_datagram(true)
        .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
        .map_err(|e| format!("HTTP/3 set-up: {e}"))?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(H3Conn {
        conn,
        send_request,
        handshake: start.elapsed(),
    })
}

/// Send a CONNECT-UDP request and wait for a 2xx. Returns the open stream.
pub async fn open_tunnel(
    send_request: &mut SendRequest,
    opts: &ProxyOptions,
) -> Result<ClientStream, String> {
    let req = http::Request::builder()
        .method(Method::CONNECT)
        .uri(opts.uri())
        .header("capsule-protocol", "?1")
        .extension(Protocol::CONNECT_UDP)
        .body(())
        .map_err(|e| format!("bad request: {e}"))?;
    let mut stream = send_request
        .send_request(req)
        .await
        .map_err(|e| format!("send_request: {e}"))?;
    let resp = stream
        .recv_response()
        .await
        .map_err(|e| format!("recv_response: {e}"))?;
    if !resp.status().is_success() {
        let ps = resp
            .headers()
            .get("proxy-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        return Err(format!("proxy answered {} {ps}", resp.status()));
    }
    Ok(stream)
}

/// The HTTP/3 datagram header for `stream_id` with context id 0: quarter stream id varint
/// and one zero byte. Returns the bytes and their length.
pub fn h3_header(stream_id: u64) -> ([u8; 9], usize) {
    let mut hdr = [0u8; 9];
    let n = ferry_proto::datagram::write_h3_udp_header(stream_id, &mut hdr);
    (hdr, n)
}
