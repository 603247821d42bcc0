//! `ferry client`'s session logic: local UDP peers each get a tunnel through the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use ferry::client::ClientOptions;
use ferry::encap::{self, EncapConfig};
use support::*;
use tokio::net::UdpSocket;

async fn local_client(proxy: &Proxy, datagrams: bool) -> std::net::SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let config = EncapConfig {
        proxy: proxy.addr,
        client: ClientOptions {
            server_name: "localhost".into(),
            ca_pem: Some(proxy.cert.cert_pem.clone()),
            insecure: false,
            datagrams,
        },
        path: PATH.into(),
        target: "foo.lyft.com:80".into(),
        idle_timeout: Duration::from_secs(30),
        http2: false,
    };
    tokio::spawn(encap::run(socket, config));
    addr
}

/// Send `payload` from `app` through the client at `to` and return the reply. With
/// `resend`, for QUIC datagram tunnels (unreliable), the payload is sent again after each
/// second of silence, and late replies to earlier sends are skipped.
async fn exchange_with(
    app: &UdpSocket,
    to: std::net::SocketAddr,
    payload: &[u8],
    resend: bool,
) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let wait = if resend {
        Duration::from_secs(1)
    } else {
        DEADLINE
    };
    let mut buf = vec![0u8; 65536];
    loop {
        app.send_to(payload, to).await.unwrap();
        let got = tokio::time::timeout(wait, async {
            loop {
                let (n, _) = app.recv_from(&mut buf).await.unwrap();
                if !resend || &buf[..n] == payload {
                    return buf[..n].to_vec();
                }
            }
        })
        .await;
        match got {
            Ok(reply) => return reply,
            Err(_) => assert!(
                resend && tokio::time::Instant::now() < deadline,
                "no reply through the tunnel"
            ),
        }
    }
}

/// Capsule tunnels: reliable, one send.
async fn exchange(app: &UdpSocket, to: std::net::SocketAddr, payload: &[u8]) -> Vec<u8> {
    exchange_with(app, to, payload, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_local_peer_gets_its_own_tunnel() {
    let (proxy, target) = start_default().await;
    for datagrams in [true, false] {
        let listen = local_client(&proxy, datagrams).await;
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..5u8 {
            let (pa, pb) = ([b'a', i], [b'b', i]);
            assert_eq!(exchange_with(&a, listen, &pa, datagrams).await, pa);
            assert_eq!(exchange_with(&b, listen, &pb, datagrams).await, pb);
        }
    }
    // Two peers, two clients (datagram and capsule mode): four tunnels, one connection each.
    assert_eq!(proxy.stat("http.ingress_http.connect_udp.tunnels_total"), 4);
    assert_eq!(proxy.stat("http.ingress_http.downstream_cx_total"), 2);
    // At least 20 (a lost QUIC datagram is resent); the capsule client's exactly 10.
    assert!(target.seen().len() >= 20);
    proxy
        .wait_stat(
            "http.ingress_http.connect_udp.downstream_rx_datagrams_capsule",
            10,
        )
        .await;
}

/// `ferry client --http2`: the same sessions over one HTTP/2 connection (TLS, ALPN h2),
/// every datagram a DATAGRAM capsule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_client_tunnels_over_one_tcp_connection() {
    use support::tcp::{listener_addr, multi_bootstrap, static_cluster, TERMINATE_ROUTES};
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = multi_bootstrap(
        &cert,
        "AUTO",
        TERMINATE_ROUTES,
        &static_cluster(target.addr),
    );
    let proxy = Proxy::start(&yaml, cert).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let listen = socket.local_addr().unwrap();
    let config = EncapConfig {
        proxy: listener_addr(&proxy, "tcp_listener"),
        client: ClientOptions {
            server_name: "localhost".into(),
            ca_pem: Some(proxy.cert.cert_pem.clone()),
            insecure: false,
            datagrams: false,
        },
        path: PATH.into(),
        target: "foo.lyft.com:80".into(),
        idle_timeout: Duration::from_secs(30),
        http2: true,
    };
    tokio::spawn(encap::run(socket, config));
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..5u8 {
        assert_eq!(exchange(&a, listen, &[b'a', i]).await, vec![b'a', i]);
        assert_eq!(exchange(&b, listen, &[b'b', i]).await, vec![b'b', i]);
    }
    // 1,200-byte payloads (an inner QUIC packet) cross as capsules too.
    let big = vec![7u8; 1200];
    assert_eq!(exchange(&a, listen, &big).await, big);
    let p = "http.ingress_tcp.";
    assert_eq!(proxy.stat(&format!("{p}connect_udp.tunnels_total")), 2);
    assert_eq!(proxy.stat(&format!("{p}downstream_cx_http2_total")), 1);
    proxy
        .wait_stat(
            &format!("{p}connect_udp.downstream_rx_datagrams_capsule"),
            11,
        )
        .await;
    assert_eq!(target.seen().len(), 11);
}
