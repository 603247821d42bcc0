//! The QUIC floor: an HTTP/3 server that answers every CONNECT-UDP request with 200 and
//! sends each QUIC DATAGRAM straight back as it came (quarter stream id and context id
//! included, so the client gets a valid HTTP Datagram on its own tunnel).
//!
//! There is no UDP leg and no proxying: a round trip through it costs what the client's
//! QUIC and HTTP/3 stack costs, plus one server's, on this machine. It is the floor under
//! any RFC 9298 proxy's round trip, which `--direct` (plain UDP) is not; the benchmarks use
//! it to say how much of a proxy's added latency is the proxy's own.
//!
//! With `relay` set it becomes the **minimal relay**: the least a CONNECT-UDP proxy can do
//! on the same stack, done plainly. Each tunnel gets its own connected UDP socket to `relay`
//! (as in Ferry and Envoy: one flow per tunnel), each datagram's payload is sent on it, and
//! what comes back is sent to the client as an HTTP Datagram. No request checks, policy,
//! stats, access log or capsules, and no batching either (one system call per datagram): it
//! shows what the UDP leg itself costs a proxy, without the proxy's logic.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use ferry_config::{CertificateKeyPair, ServerTls};
use ferry_proto::varint;
use tokio::net::UdpSocket;

/// Each connection's tunnels by quarter stream id (minimal relay only). One worker thread:
/// the lock is never contended.
type Tunnels = Arc<Mutex<HashMap<u64, Arc<UdpSocket>>>>;

/// Bind `listen`, print the bound address on stdout, and serve on a one-worker runtime
/// (as a proxy at `--concurrency 1`) until `max_time` has passed.
pub fn run(
    listen: SocketAddr,
    cert: &Path,
    key: &Path,
    max_time: Duration,
    relay: Option<SocketAddr>,
) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "{listen}: the QUIC floor binds loopback addresses only"
        ));
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let tls = ServerTls {
        certificates: vec![CertificateKeyPair {
            certificate_chain_pem: read(cert)?,
            private_key_pem: read(key)?,
        }],
        alpn_protocols: Vec::new(),
        client_ca_pem: None,
        require_client_certificate: false,
    };
    let tls = ferry::tls::server_config(&tls, &[b"h3"])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let endpoint = ferry::quic::server_endpoint(listen, tls, 1000, Default::default())?;
        let bound = endpoint.local_addr().map_err(|e| e.to_string())?;
        println!("{bound}");
        let serve = async {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_connection(conn, relay).await;
                    }
                });
            }
        };
        let _ = tokio::time::timeout(max_time, serve).await;
        Ok(())
    })
}

async fn serve_connection(conn: quinn::Connection, relay: Option<SocketAddr>) {
    let tunnels: Tunnels = Arc::default();
    let echo = {
        let conn = conn.clone();
        let tunnels = tunnels.clone();
        async move {
            while let Ok(datagram) = conn.read_datagram().await {
                if relay.is_some() {
                    to_target(&datagram, &tunnels);
                } else if conn.send_datagram_wait(datagram).await.is_err() {
                    return;
                }
            }
        }
    };
    let requests = async {
        let h3 = h3::server::builder()
            .enable_extended_connect(true)
            .enable_datagram(true)
            .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await;
        let Ok(mut h3) = h3 else { return };
        while let Ok(Some(resolver)) = h3.accept().await {
            let Ok((_request, mut stream)) = resolver.resolve_request().await else {
                continue;
            };
            // The minimal relay: the tunnel's own socket, routed to by quarter stream id.
            let relayed = match relay {
                Some(target) => {
                    let qsid = stream.id().into_inner() / 4;
                    let Ok(udp) = ferry::tunnel::connect_udp(target) else {
                        continue;
                    };
                    let udp = Arc::new(udp);
                    if let Ok(mut t) = tunnels.lock() {
                        t.insert(qsid, udp.clone());
                    }
                    Some((qsid, udp))
                }
                None => None,
            };
            let mut response = http::Response::new(());
            response
                .headers_mut()
                .insert("capsule-protocol", http::HeaderValue::from_static("?1"));
            let answered = stream.send_response(response).await.is_ok();
            let (conn, tunnels) = (conn.clone(), tunnels.clone());
            // The tunnel lasts until the client ends its stream (or the connection ends);
            // anything it sends on the stream (capsules) is read and dropped. Then its
            // socket and route go.
            tokio::spawn(async move {
                let held =
                    async { while answered && matches!(stream.recv_data().await, Ok(Some(_))) {} };
                if let Some((qsid, udp)) = relayed {
                    tokio::select! {
                        _ = held => {}
                        _ = from_target(udp, qsid, conn) => {}
                    }
                    if let Ok(mut t) = tunnels.lock() {
                        t.remove(&qsid);
                    }
                } else {
                    held.await;
                }
            });
        }
    };
    tokio::join!(echo, requests);
}

/// A client datagram to its tunnel's target: the payload after the quarter stream id and a
/// zero context id, sent on the tunnel's socket (dropped when the socket's buffer is full,
/// as a network would).
fn to_target(datagram: &Bytes, tunnels: &Tunnels) {
    let Ok((qsid, n)) = varint::decode(datagram) else {
        return;
    };
    let Some(rest) = datagram.get(n..) else {
        return;
    };
    let Ok((0, m)) = varint::decode(rest) else {
        return;
    };
    let udp = tunnels.lock().ok().and_then(|t| t.get(&qsid).cloned());
    if let (Some(udp), Some(payload)) = (udp, rest.get(m..)) {
        let _ = udp.try_send(payload);
    }
}

/// What the target sends back, to the client as HTTP Datagrams of tunnel `qsid`, until a
/// read or a send fails.
async fn from_target(udp: Arc<UdpSocket>, qsid: u64, conn: quinn::Connection) {
    let mut buf = vec![0u8; 65_536];
    let header = varint::encoded_len(qsid) + 1;
    while let Ok(n) = udp.recv(&mut buf).await {
        let mut out = BytesMut::with_capacity(header + n);
        let _ = varint::put(qsid, &mut out);
        out.put_u8(0);
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
        if conn.send_datagram(out.freeze()).is_err() {
            return;
        }
    }
}
