//! QUIC endpoints: sockets with large buffers and the transport settings Ferry uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Socket buffers asked for on QUIC sockets (the kernel caps them at rmem_max/wmem_max).
/// The default (about 208 KiB) overflows in bursts at tunnel rates.
const SOCKET_BUFFER: usize = 4 << 20;

/// Bind a UDP socket for a QUIC endpoint (or a raw UDP listener), with the buffers a
/// listener's `socket_options` ask for, else [`SOCKET_BUFFER`] each.
pub fn bind_socket(
    addr: SocketAddr,
    buffers: ferry_config::SocketBuffers,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort, as Envoy's socket options: the kernel caps what it grants.
    let _ = socket.set_recv_buffer_size(buffers.recv.unwrap_or(SOCKET_BUFFER));
    let _ = socket.set_send_buffer_size(buffers.send.unwrap_or(SOCKET_BUFFER));
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Flow-control credit a client connection gets for request-stream bytes Ferry has not
/// read yet, all streams together (each stream: quinn's 1.25 MB). Without it quinn grants
/// unlimited connection credit, so a connection could park 100 x 1.25 MB.
pub const SERVER_CONNECTION_RECEIVE_WINDOW: u32 = 8 << 20;

/// Transport settings for both sides: QUIC DATAGRAM support (this advertises the
/// `max_datagram_frame_size` transport parameter), buffers, and Envoy's 300 s QUIC idle
/// timeout.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(300)) {
        t.max_idle_timeout(Some(idle));
    }
    t.datagram_receive_buffer_size(Some(SOCKET_BUFFER));
    t.datagram_send_buffer_size(SOCKET_BUFFER);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(100));
    t
}

/// Keep-alive interval on connections Ferry opens (to next hops, and `ferry client`'s).
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Idle timeout Ferry asks for on connections it opens: with [`CLIENT_KEEP_ALIVE`], a live
/// peer keeps the connection open, and a peer that vanished (killed, unplugged: no
/// CONNECTION_CLOSE) is noticed within this time, so its pooled connection is dropped and
/// the tunnels on it end instead of waiting out the 300 s idle timeout.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`transport_config`] for connections Ferry opens: keep-alive and a short idle timeout.
pub fn client_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    if let Ok(idle) = quinn::IdleTimeout::try_from(CLIENT_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
    t
}

/// A server endpoint. `max_concurrent_streams` (the listener's
/// `quic_protocol_options.max_concurrent_streams`) is the number of bidirectional streams
/// a client may have open at once: QUIC flow control enforces it (the client cannot open
/// more until one closes; a client that tries anyway commits a STREAM_LIMIT_ERROR).
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    max_concurrent_streams: u32,
    buffers: ferry_config::SocketBuffers,
) -> Result<quinn::Endpoint, String> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| format!("TLS config unusable for QUIC: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(max_concurrent_streams));
    transport.receive_window(quinn::VarInt::from_u32(SERVER_CONNECTION_RECEIVE_WINDOW));
    server.transport_config(Arc::new(transport));
    let socket = bind_socket(addr, buffers).map_err(|e| format!("cannot bind {addr}: {e}"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("cannot start QUIC endpoint on {addr}: {e}"))
}

pub fn client_endpoint(
    bind: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Endpoint, String> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("TLS config unusable for QUIC: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(client_transport_config()));
    let socket = bind_socket(bind, ferry_config::SocketBuffers::default())
        .map_err(|e| format!("cannot bind {bind}: {e}"))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("cannot start QUIC endpoint: {e}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A listener's `socket_options` buffer sizes reach the socket (Linux reports twice the
    /// size asked for: the kernel's bookkeeping share).
    #[test]
    fn socket_options_size_the_buffers() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let asked = ferry_config::SocketBuffers {
            recv: Some(65_536),
            send: Some(98_304),
        };
        let socket = bind_socket(addr, asked).unwrap();
        let sock = socket2::SockRef::from(&socket);
        assert_eq!(sock.recv_buffer_size().unwrap(), 2 * 65_536);
        assert_eq!(sock.send_buffer_size().unwrap(), 2 * 98_304);
        // Without them: Ferry's default, as much of 4 MiB as the kernel grants.
        let socket = bind_socket(addr, ferry_config::SocketBuffers::default()).unwrap();
        assert!(socket2::SockRef::from(&socket).recv_buffer_size().unwrap() > 2 * 65_536);
    }
}
