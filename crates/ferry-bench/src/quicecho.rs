//! The QUIC floor: an HTTP/3 server that answers every CONNECT-UDP request with 200 and
//! sends each QUIC DATAGRAM straight back as it came (quarter stream id and context id
//! included, so the client gets a valid HTTP Datagram on its own tunnel).
//!
//! There is no UDP leg and no proxying: a round trip through it costs what the client's
//! QUIC and HTTP/3 stack costs, plus one server's, on this machine. It is the floor under
//! any RFC 9298 proxy's round trip, which `--direct` (plain UDP) is not; the benchmarks use
//! it to say how much of a proxy's added latency is the proxy's own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ferry_config::{CertificateKeyPair, ServerTls};

/// Bind `listen`, print the bound address on stdout, and serve on a one-worker runtime
/// (as a proxy at `--concurrency 1`) until `max_time` has passed.
pub fn run(listen: SocketAddr, cert: &Path, key: &Path, max_time: Duration) -> Result<(), String> {
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
        let endpoint = ferry::quic::server_endpoint(listen, tls, 1000)?;
        let bound = endpoint.local_addr().map_err(|e| e.to_string())?;
        println!("{bound}");
        let serve = async {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_connection(conn).await;
                    }
                });
            }
        };
        let _ = tokio::time::timeout(max_time, serve).await;
        Ok(())
    })
}

async fn serve_connection(conn: quinn::Connection) {
    let echo = {
        let conn = conn.clone();
        async move {
            while let Ok(datagram) = conn.read_datagram().await {
                if conn.send_datagram_wait(datagram).await.is_err() {
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
            let mut response = http::Response::new(());
            response
                .headers_mut()
                .insert("capsule-protocol", http::HeaderValue::from_static("?1"));
            if stream.send_response(response).await.is_ok() {
                // The tunnel stays open until the client ends its stream; anything it
                // sends on the stream (capsules) is read and dropped.
                tokio::spawn(async move { while let Ok(Some(_)) = stream.recv_data().await {} });
            }
        }
    };
    tokio::join!(echo, requests);
}
