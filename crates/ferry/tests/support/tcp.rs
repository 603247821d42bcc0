//! HTTP/2 (extended CONNECT) and HTTP/1.1 (Upgrade) CONNECT-UDP clients over TLS, for tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_proto::capsule::{self, Capsule, CapsuleDecoder};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{indent, TestCert, DEADLINE};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    H1,
    H2,
}

pub struct TcpTunnel {
    pub status: u16,
    pub headers: http::HeaderMap,
    io: Option<TokioIo<Upgraded>>,
    decoder: CapsuleDecoder,
}

async fn tls(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = ferry::tls::client_config(Some(ca_pem), false, &[alpn]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Open a CONNECT-UDP tunnel for `path` over HTTP/2 or HTTP/1.1.
pub async fn open(
    addr: SocketAddr,
    ca_pem: &str,
    version: Version,
    path: &str,
    extra: &[(&str, &str)],
) -> TcpTunnel {
    tokio::time::timeout(DEADLINE, open_inner(addr, ca_pem, version, path, extra))
        .await
        .expect("tunnel set-up took too long")
}

async fn open_inner(
    addr: SocketAddr,
    ca_pem: &str,
    version: Version,
    path: &str,
    extra: &[(&str, &str)],
) -> TcpTunnel {
    let resp = match version {
        Version::H2 => {
            let io = tls(addr, ca_pem, b"h2").await;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            // Extended CONNECT needs the server's SETTINGS_ENABLE_CONNECT_PROTOCOL, which
            // arrives with its first SETTINGS: retry until the client has seen it.
            let mut tries = 0;
            loop {
                let mut req = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(format!("https://localhost:{}{path}", addr.port()))
                    .extension(hyper::ext::Protocol::from_static("connect-udp"));
                for (k, v) in extra {
                    req = req.header(*k, *v);
                }
                let req = req.body(Empty::<Bytes>::new()).unwrap();
                match sender.send_request(req).await {
                    Ok(resp) => break resp,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => panic!("HTTP/2 request failed: {e}"),
                }
            }
        }
        Version::H1 => {
            let io = tls(addr, ca_pem, b"http/1.1").await;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .unwrap();
            tokio::spawn(conn.with_upgrades());
            let mut req = http::Request::builder()
                .method(http::Method::GET)
                .uri(path)
                .header(http::header::CONNECTION, "Upgrade")
                .header(http::header::UPGRADE, "connect-udp");
            if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
                req = req.header(http::header::HOST, format!("localhost:{}", addr.port()));
            }
            for (k, v) in extra {
                req = req.header(*k, *v);
            }
            sender
                .send_request(req.body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap()
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let io = if status == 200 || status == 101 {
        Some(TokioIo::new(hyper::upgrade::on(resp).await.unwrap()))
    } else {
        None
    };
    TcpTunnel {
        status,
        headers,
        io,
        decoder: CapsuleDecoder::new(70_000),
    }
}

impl TcpTunnel {
    pub fn proxy_status(&self) -> String {
        self.headers
            .get("proxy-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let io = self.io.as_mut().unwrap();
        io.write_all(bytes).await.unwrap();
        io.flush().await.unwrap();
    }

    /// A DATAGRAM capsule with context id 0.
    pub async fn send(&mut self, payload: &[u8]) {
        let mut b = BytesMut::new();
        let mut body = vec![0u8];
        body.extend_from_slice(payload);
        capsule::encode_capsule(capsule::DATAGRAM_CAPSULE_TYPE, &body, &mut b).unwrap();
        self.send_raw(&b).await;
    }

    /// The next UDP payload (context id 0), or None when the stream ends.
    pub async fn recv(&mut self) -> Option<Bytes> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.decoder.next().unwrap() {
                    Some(Capsule::Datagram(p)) => {
                        let (ctx, udp) = ferry_proto::datagram::split_context_id(p).unwrap();
                        if ctx == 0 {
                            return Some(udp);
                        }
                    }
                    Some(Capsule::Unknown { .. }) => {}
                    None => {
                        let mut buf = vec![0u8; 65536];
                        let n = self.io.as_mut()?.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return None;
                        }
                        self.decoder.push(Bytes::copy_from_slice(&buf[..n]));
                    }
                }
            }
        })
        .await
        .expect("nothing arrived within the deadline")
    }

    /// Send `payload` as a capsule until its echo comes back: a hop behind this one may
    /// carry it as an (unreliable) QUIC datagram. Late echoes of resends are skipped.
    pub async fn echo_until_received(&mut self, payload: &[u8]) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            self.send(payload).await;
            let echo = tokio::time::timeout(std::time::Duration::from_millis(200), async {
                loop {
                    match self.recv().await {
                        Some(b) if &b[..] == payload => return,
                        Some(_) => continue,
                        None => panic!("the stream ended"),
                    }
                }
            })
            .await;
            if echo.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no echo within the deadline"
            );
        }
    }
}

/// The route list (YAML, at route level) that terminates every CONNECT-UDP request.
pub const TERMINATE_ROUTES: &str = r#"              - match: { connect_matcher: {} }
                route:
                  cluster: target
                  upgrade_configs:
                  - upgrade_type: CONNECT-UDP
                    connect_config: {}
"#;

/// The route list that forwards every CONNECT-UDP request to the `target` cluster.
pub const FORWARD_ROUTES: &str = r#"              - match: { connect_matcher: {} }
                route:
                  cluster: target
                  upgrade_configs:
                  - upgrade_type: CONNECT-UDP
"#;

/// A STATIC cluster `target` at `addr` (the UDP target when terminating).
pub fn static_cluster(addr: SocketAddr) -> String {
    format!(
        r#"  - name: target
    type: STATIC
    load_assignment:
      cluster_name: target
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {ip}, port_value: {port} }}
"#,
        ip = addr.ip(),
        port = addr.port()
    )
}

/// A bootstrap with three listeners on port 0 sharing `routes`: `tcp_listener` (TLS, ALPN
/// h2 + http/1.1, `codec`), `h3_listener` (QUIC) and `plain_listener` (cleartext TCP,
/// AUTO: HTTP/1.1 or HTTP/2 with prior knowledge); `clusters` is the cluster list.
pub fn multi_bootstrap(cert: &TestCert, codec: &str, routes: &str, clusters: &str) -> String {
    let certs = |n: usize| {
        let pad = " ".repeat(n);
        format!(
            "{pad}- certificate_chain:\n{pad}    inline_string: |\n{}{pad}  private_key:\n{pad}    inline_string: |\n{}",
            indent(&cert.cert_pem, n + 6),
            indent(&cert.key_pem, n + 6)
        )
    };
    let hcm = |prefix: &str, codec: &str| {
        format!(
            r#"      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: {codec}
          stat_prefix: {prefix}
          route_config:
            name: local_route
            virtual_hosts:
            - name: local_service
              domains: ["*"]
              routes:
{routes}          upgrade_configs:
          - upgrade_type: CONNECT-UDP
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          http2_protocol_options:
            allow_connect: true
          http3_protocol_options:
            allow_extended_connect: true
"#
        )
    };
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: tcp_listener
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_certificates:
{tcp_certs}{tcp_hcm}  - name: h3_listener
    address:
      socket_address: {{ protocol: UDP, address: 127.0.0.1, port_value: 0 }}
    udp_listener_config:
      quic_options: {{}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.quic
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport
          downstream_tls_context:
            common_tls_context:
              tls_certificates:
{h3_certs}{h3_hcm}  - name: plain_listener
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - {plain_hcm}  clusters:
{clusters}"#,
        tcp_certs = certs(12),
        h3_certs = certs(14),
        tcp_hcm = hcm("ingress_tcp", codec),
        h3_hcm = hcm("ingress_h3", "HTTP3"),
        plain_hcm = hcm("ingress_plain", "AUTO").trim_start(),
    )
}

/// The local address of the listener called `name`.
pub fn listener_addr(proxy: &super::Proxy, name: &str) -> SocketAddr {
    proxy
        .state
        .listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
        .local_addr
}
