//! Limits reached, end to end over real loopback sockets: concurrent streams per HTTP/3
//! and HTTP/2 connection, the global downstream connection limit (overload manager) and
//! `max_stream_duration`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry::client::Received;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::tcp::{listener_addr, multi_bootstrap, static_cluster, Version};
use support::*;

const P: &str = "http.ingress_http.connect_udp.";

/// How long a test checks that something held back stays held back. Not a performance
/// bound: the check passes however slow the machine is; a broken limit fails it.
const HELD_BACK: Duration = Duration::from_millis(300);

const MONITOR: &str = r#"overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: 1
"#;

fn with_hcm_line(yaml: &str, line: &str) -> String {
    yaml.replacen(
        "          stat_prefix: ingress_http\n",
        &format!("          stat_prefix: ingress_http\n          {line}\n"),
        1,
    )
}

/// `quic_protocol_options.max_concurrent_streams: 2`: a client cannot open a third
/// tunnel on the connection (QUIC stream credit) until one of the two ends; Ferry never
/// sees the third request meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_max_concurrent_streams_holds_back_the_extra_tunnel() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = bootstrap_yaml(&cert, target.addr, &BootstrapSpec::default()).replacen(
        "      quic_options: {}\n",
        "      quic_options:\n        quic_protocol_options:\n          max_concurrent_streams: 2\n",
        1,
    );
    let proxy = Proxy::start(&yaml, cert).await;
    let mut client = proxy.client(true).await;
    let mut t1 = client.open(PATH, &[], false).await.unwrap();
    let mut t2 = client.open(PATH, &[], false).await.unwrap();
    assert_eq!((t1.status.as_u16(), t2.status.as_u16()), (200, 200));
    echo_until_received(&mut t2, b"two").await;
    proxy.wait_stat(&format!("{P}tunnels_active"), 2).await;

    let third = tokio::time::timeout(HELD_BACK, client.open(PATH, &[], false)).await;
    assert!(third.is_err(), "a third stream opened past the limit");
    assert_eq!(proxy.stat("http.ingress_http.downstream_rq_total"), 2);

    // One ends: its credit comes back and the next tunnel opens.
    t1.finish().await.unwrap();
    assert!(matches!(recv_end(&mut t1).await, Received::Finished));
    proxy.wait_stat(&format!("{P}tunnels_active"), 1).await;
    let mut t3 = tokio::time::timeout(DEADLINE, client.open(PATH, &[], false))
        .await
        .expect("the third tunnel never opened after one ended")
        .unwrap();
    assert_eq!(t3.status, 200);
    assert_eq!(&echo_until_received(&mut t3, b"three").await[..], b"three");
    assert_eq!(proxy.stat(&format!("{P}tunnels_total")), 3);
}

async fn tls_h2(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = ferry::tls::client_config(Some(ca_pem), false, &[b"h2"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

fn h2_connect(port: u16) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost:{port}{PATH}"))
        .extension(hyper::ext::Protocol::from_static("connect-udp"))
        .body(Empty::new())
        .unwrap()
}

/// `http2_protocol_options.max_concurrent_streams: 2`: Ferry's SETTINGS hold a third
/// tunnel on the same HTTP/2 connection back until one of the two ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_concurrent_streams_holds_back_the_extra_tunnel() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = multi_bootstrap(&cert, "HTTP2", TERMINATE_ROUTE, &static_cluster(target.addr))
        .replacen(
            "          http2_protocol_options:\n            allow_connect: true\n",
            "          http2_protocol_options:\n            allow_connect: true\n            max_concurrent_streams: 2\n",
            3,
        );
    let proxy = Proxy::start(&yaml, cert).await;
    let addr = listener_addr(&proxy, "tcp_listener");
    let io = tls_h2(addr, &proxy.cert.cert_pem).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    // SETTINGS_ENABLE_CONNECT_PROTOCOL arrives with the server's first SETTINGS.
    let first = tokio::time::timeout(DEADLINE, async {
        loop {
            match sender.send_request(h2_connect(addr.port())).await {
                Ok(resp) => return resp,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .unwrap();
    let second = sender.send_request(h2_connect(addr.port())).await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let up1 = hyper::upgrade::on(first).await.unwrap();
    let _up2 = hyper::upgrade::on(second).await.unwrap();
    proxy
        .wait_stat("http.ingress_tcp.connect_udp.tunnels_active", 2)
        .await;

    let mut third_sender = sender.clone();
    let third = tokio::spawn(async move {
        third_sender
            .send_request(h2_connect(addr.port()))
            .await
            .map(|r| r.status())
    });
    let held = tokio::time::timeout(HELD_BACK, async {
        while !third.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(held.is_err(), "a third stream opened past the limit");
    assert_eq!(proxy.stat("http.ingress_tcp.downstream_rq_total"), 2);

    // One ends (the client drops its stream: RST_STREAM): the third goes through.
    drop(up1);
    let status = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the third tunnel never opened after one ended")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    proxy
        .wait_stat("http.ingress_tcp.connect_udp.tunnels_total", 3)
        .await;
}

/// The overload manager's global downstream connection limit: with one connection open,
/// the next QUIC connection is refused (CONNECTION_REFUSED) and the next TCP connection
/// closed at once, each counted in `downstream_global_cx_overflow`; once the first is
/// gone, connections are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_connection_limit_refuses_quic_and_tcp() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = format!(
        "{MONITOR}{}",
        multi_bootstrap(&cert, "AUTO", TERMINATE_ROUTE, &static_cluster(target.addr))
    );
    let proxy = Proxy::start(&yaml, cert).await;
    let h3 = listener_addr(&proxy, "h3_listener");
    let tcp = listener_addr(&proxy, "tcp_listener");
    let overflow = "listener.127.0.0.1_0.downstream_global_cx_overflow";
    let options = ferry::client::ClientOptions {
        server_name: "localhost".into(),
        ca_pem: Some(proxy.cert.cert_pem.clone()),
        insecure: false,
        datagrams: true,
    };

    let mut first = ferry::client::H3Client::connect(h3, &options)
        .await
        .unwrap();
    let mut t = first.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    echo_until_received(&mut t, b"admitted").await;

    let refused = ferry::client::H3Client::connect(h3, &options).await;
    let err = refused
        .err()
        .expect("a second QUIC connection was admitted");
    assert!(err.contains("refused"), "{err}");
    proxy.wait_stat(overflow, 1).await;

    // TCP: accepted by the kernel, closed by Ferry before any byte: the TLS handshake fails.
    let config = ferry::tls::client_config(Some(&proxy.cert.cert_pem), false, &[b"h2"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let handshake = tokio::time::timeout(DEADLINE, connector.connect(name, stream))
        .await
        .expect("the refused TCP connection was never closed");
    assert!(
        handshake.is_err(),
        "a TCP connection was admitted past the limit"
    );
    proxy.wait_stat(overflow, 2).await;

    // The first connection goes: the next one is admitted.
    drop(t);
    first.conn.close(0u32.into(), b"bye");
    drop(first);
    let mut second = tokio::time::timeout(DEADLINE, async {
        loop {
            proxy.state.refresh_gauges();
            if proxy.state.connections.get() == 0 {
                if let Ok(c) = ferry::client::H3Client::connect(h3, &options).await {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no connection admitted after the first closed");
    let mut t = second.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    echo_until_received(&mut t, b"again").await;
}

/// `common_http_protocol_options.max_stream_duration` ends an HTTP/3 tunnel that is still
/// busy, and counts it as Envoy does (`downstream_rq_max_duration_reached`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_ends_an_h3_tunnel() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = with_hcm_line(
        &bootstrap_yaml(&cert, target.addr, &BootstrapSpec::default()),
        "common_http_protocol_options: { max_stream_duration: 0.5s }",
    );
    let proxy = Proxy::start(&yaml, cert).await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    // Traffic keeps flowing (so no idle timeout) until the duration ends the tunnel.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            let _ = t.send_datagram(b"busy");
            match tokio::time::timeout(Duration::from_millis(20), t.recv()).await {
                Ok(Received::Udp(..)) | Err(_) => continue,
                Ok(other) => return other,
            }
        }
    })
    .await
    .expect("the tunnel outlived max_stream_duration");
    assert!(
        matches!(ended, Received::Reset(_) | Received::Finished),
        "{ended:?}"
    );
    proxy
        .wait_stat(&format!("{P}streams_reset_max_duration"), 1)
        .await;
    proxy
        .wait_stat("http.ingress_http.downstream_rq_max_duration_reached", 1)
        .await;
    proxy.wait_stat(&format!("{P}tunnels_active"), 0).await;
    assert_eq!(proxy.stat(&format!("{P}streams_reset_idle_timeout")), 0);
}

/// The same over HTTP/2 and HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_ends_tcp_tunnels() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = multi_bootstrap(&cert, "AUTO", TERMINATE_ROUTE, &static_cluster(target.addr))
        .replace(
            "          stat_prefix: ingress_tcp\n",
            "          stat_prefix: ingress_tcp\n          common_http_protocol_options: { max_stream_duration: 0.5s }\n",
        );
    let proxy = Proxy::start(&yaml, cert).await;
    let addr = listener_addr(&proxy, "tcp_listener");
    for (i, version) in [Version::H2, Version::H1].into_iter().enumerate() {
        let mut t = support::tcp::open(addr, &proxy.cert.cert_pem, version, PATH, &[]).await;
        assert!(t.status == 200 || t.status == 101, "{version:?}");
        t.send(b"hello").await;
        assert_eq!(&t.recv().await.unwrap()[..], b"hello");
        let end = tokio::time::timeout(DEADLINE, async { while t.recv().await.is_some() {} }).await;
        assert!(
            end.is_ok(),
            "{version:?}: the tunnel outlived max_stream_duration"
        );
        proxy
            .wait_stat(
                "http.ingress_tcp.downstream_rq_max_duration_reached",
                i as u64 + 1,
            )
            .await;
    }
}
