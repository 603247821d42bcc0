//! CONNECT-UDP over HTTP/2 (extended CONNECT) and HTTP/1.1 (Upgrade), over TLS on TCP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;

use support::tcp::{multi_bootstrap, open, static_cluster, Version, TERMINATE_ROUTES};
use support::*;

/// The reference terminate-tcp-h2-h1 bootstrap (TLS, ALPN h2 + http/1.1, `codec`,
/// allow_connect), plus an HTTP/3 listener for Alt-Svc and a cleartext one.
fn tcp_bootstrap(cert: &TestCert, target: SocketAddr, codec: &str) -> String {
    multi_bootstrap(cert, codec, TERMINATE_ROUTES, &static_cluster(target))
        .replace(r#"domains: ["*"]"#, r#"domains: ["foo.lyft.com:80"]"#)
}

async fn start(codec: &str) -> (Proxy, EchoTarget, SocketAddr) {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = tcp_bootstrap(&cert, target.addr, codec);
    let proxy = Proxy::start(&yaml, cert).await;
    let tcp = proxy
        .state
        .listeners
        .iter()
        .find(|l| l.name == "tcp_listener")
        .unwrap()
        .local_addr;
    (proxy, target, tcp)
}

const P: &str = "http.ingress_tcp.connect_udp.";
const A: [u8; 7] = [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];

/// Envoy's scenario on each TCP version: `00 08 00 a1..a7` in, `a1..a7` at the target,
/// and the reply back as a DATAGRAM capsule. (Envoy 1.40 answers HTTP/1.1 with 200 and
/// relays nothing; #40229 reports HTTP/2 termination relaying nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capsules_both_ways_over_h2_and_h1() {
    let (proxy, target, tcp) = start("AUTO").await;
    for (i, version) in [Version::H2, Version::H1].into_iter().enumerate() {
        let mut t = open(
            tcp,
            &proxy.cert.cert_pem,
            version,
            PATH,
            &[("capsule-protocol", "?1")],
        )
        .await;
        let expected = if version == Version::H1 { 101 } else { 200 };
        assert_eq!(t.status, expected, "{version:?}: {}", t.proxy_status());
        assert_eq!(t.headers.get("capsule-protocol").unwrap(), "?1");
        if version == Version::H1 {
            assert_eq!(t.headers.get("upgrade").unwrap(), "connect-udp");
        }
        t.send_raw(&[0x00, 0x08, 0x00, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7])
            .await;
        let seen = target.wait_for(i * 11 + 1).await;
        assert_eq!(&seen[i * 11][..], &A);
        assert_eq!(&t.recv().await.unwrap()[..], &A);
        // Ten more, of several sizes, in order.
        for n in 0..10usize {
            let payload = vec![n as u8; 1 + n * 500];
            t.send(&payload).await;
            assert_eq!(
                &t.recv().await.unwrap()[..],
                &payload[..],
                "{version:?} #{n}"
            );
        }
    }
    proxy
        .wait_stat(&format!("{P}downstream_rx_datagrams_capsule"), 22)
        .await;
    proxy
        .wait_stat(&format!("{P}downstream_tx_datagrams_capsule"), 22)
        .await;
    assert_eq!(proxy.stat(&format!("{P}tunnels_total")), 2);
    assert_eq!(proxy.stat("http.ingress_tcp.downstream_rq_2xx"), 1);
    assert_eq!(proxy.stat("http.ingress_tcp.downstream_rq_1xx"), 1);
}

/// A TCP listener advertises the bootstrap's HTTP/3 listener with Alt-Svc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_names_the_http3_listener() {
    let (proxy, _target, tcp) = start("AUTO").await;
    let h3 = proxy
        .state
        .listeners
        .iter()
        .find(|l| l.name == "h3_listener")
        .unwrap()
        .local_addr;
    let t = open(tcp, &proxy.cert.cert_pem, Version::H2, PATH, &[]).await;
    let alt = t
        .headers
        .get("alt-svc")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(alt, format!("h3=\":{}\"; ma=86400", h3.port()));
}

/// The same refusals as over HTTP/3, each with a proxy-status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_h2_and_h1() {
    let (proxy, _target, tcp) = start("AUTO").await;
    for version in [Version::H2, Version::H1] {
        for (path, status) in [
            ("/.well-known/masque/udp/bar.lyft.com/80/", 404),
            ("/.well-known/masque/udp/foo.lyft.com/81/", 404),
            ("/masque/udp/foo.lyft.com/80/", 404),
            ("/.well-known/masque/udp/foo.lyft.com/70000/", 404),
            ("/.well-known/masque/udp/fe80::a%25ee1/80/", 404),
        ] {
            let t = open(tcp, &proxy.cert.cert_pem, version, path, &[]).await;
            assert_eq!(t.status, status, "{version:?} {path}");
            assert!(
                t.proxy_status().starts_with("ferry"),
                "{version:?} {path}: {}",
                t.proxy_status()
            );
        }
    }
    assert_eq!(proxy.stat(&format!("{P}tunnels_rejected_404")), 10);
}

/// RFC 9298 section 3.2: an HTTP/1.1 request needs exactly one Host header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_needs_exactly_one_host() {
    let (proxy, _target, tcp) = start("AUTO").await;
    let t = open(
        tcp,
        &proxy.cert.cert_pem,
        Version::H1,
        PATH,
        &[("host", "foo.lyft.com:80"), ("host", "bar.lyft.com:80")],
    )
    .await;
    assert_eq!(t.status, 400, "{}", t.proxy_status());
    assert!(t.proxy_status().contains("http_request_error"));
}

/// Closing the tunnel's stream closes the UDP socket: nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_end_ends_the_tunnel() {
    let (proxy, _target, tcp) = start("AUTO").await;
    for version in [Version::H2, Version::H1] {
        let mut t = open(tcp, &proxy.cert.cert_pem, version, PATH, &[]).await;
        t.send(b"x").await;
        t.recv().await.unwrap();
        proxy.wait_stat(&format!("{P}tunnels_active"), 1).await;
        drop(t);
        proxy.wait_stat(&format!("{P}tunnels_active"), 0).await;
    }
}

/// codec_type HTTP1 serves only HTTP/1.1 (an HTTP/2 client fails), HTTP2 only HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_type_http1_only() {
    let (proxy, _target, tcp) = start("HTTP1").await;
    let mut t = open(tcp, &proxy.cert.cert_pem, Version::H1, PATH, &[]).await;
    assert_eq!(t.status, 101);
    t.send(b"one").await;
    assert_eq!(&t.recv().await.unwrap()[..], b"one");
}
