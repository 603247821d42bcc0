//! The udp_proxy listener (`tunneling_config`): raw UDP -> Ferry (udp_proxy) -> CONNECT-UDP
//! over HTTP/3 -> Ferry (terminate) -> UDP target. Envoy's udp_proxy tunneling scenarios.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::net::UdpSocket;

const U: &str = "udp.tunnel.";
const C: &str = "cluster.proxy.";

/// What a udp_proxy bootstrap varies.
struct Spec<'a> {
    /// The CONNECT-UDP proxies (the cluster's hosts, in order).
    proxies: Vec<SocketAddr>,
    ca_pem: &'a str,
    /// Extra `tunneling_config` lines (indented 10 spaces), e.g. `buffer_options: {}`.
    tunneling_extra: &'a str,
    idle_timeout: &'a str,
    connect_timeout: &'a str,
}

fn udp_proxy_yaml(s: &Spec) -> String {
    let endpoints: String = s
        .proxies
        .iter()
        .map(|a| {
            format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {} }}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: udp_in
    address:
      socket_address: {{ protocol: UDP, address: 127.0.0.1, port_value: 0 }}
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
        stat_prefix: tunnel
        idle_timeout: {idle}
        matcher:
          on_no_match:
            action:
              name: route
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route
                cluster: proxy
        session_filters:
        - name: envoy.filters.udp.session.http_capsule
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig
        tunneling_config:
          proxy_host: localhost
          target_host: foo.lyft.com
          default_target_port: 80
{extra}  clusters:
  - name: proxy
    type: STATIC
    connect_timeout: {connect_timeout}
    load_assignment:
      cluster_name: proxy
      endpoints:
      - lb_endpoints:
{endpoints}    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http3_protocol_options:
            allow_extended_connect: true
    transport_socket:
      name: envoy.transport_sockets.quic
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport
        upstream_tls_context:
          sni: localhost
          common_tls_context:
            validation_context:
              trusted_ca:
                inline_string: |
{ca}"#,
        idle = s.idle_timeout,
        extra = s.tunneling_extra,
        connect_timeout = s.connect_timeout,
        ca = indent(s.ca_pem, 18),
    )
}

async fn udp_proxy(s: &Spec<'_>) -> Proxy {
    Proxy::start(&udp_proxy_yaml(s), test_cert()).await
}

fn spec<'a>(terminator: &'a Proxy, extra: &'a str) -> Spec<'a> {
    Spec {
        proxies: vec![terminator.addr],
        ca_pem: &terminator.cert.cert_pem,
        tunneling_extra: extra,
        idle_timeout: "60s",
        connect_timeout: "5s",
    }
}

const BUFFERED: &str = "          buffer_options: {}\n";

async fn recv(app: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(DEADLINE, app.recv_from(&mut buf))
        .await
        .expect("no reply through the tunnel")
        .unwrap();
    buf.truncate(n);
    buf
}

async fn app() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// A UDP socket that never answers: a QUIC handshake to it runs into connect_timeout.
fn black_hole() -> std::net::UdpSocket {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
}

/// Flow with buffering: datagrams sent before the tunnel is up are delivered; two sessions
/// (two local peers) get a tunnel each, on one upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_one_upstream_connection_and_buffer_until_up() {
    let (terminator, target) = start_default().await;
    let proxy = udp_proxy(&spec(&terminator, BUFFERED)).await;
    let (a, b) = (app().await, app().await);
    // Three datagrams at once: the first ones wait in the session's buffer.
    for i in 0..3u8 {
        a.send_to(&[b'a', i], proxy.addr).await.unwrap();
    }
    let mut got: Vec<Vec<u8>> = Vec::new();
    for _ in 0..3 {
        got.push(recv(&a).await);
    }
    got.sort();
    assert_eq!(got, vec![vec![b'a', 0], vec![b'a', 1], vec![b'a', 2]]);
    for i in 0..3u8 {
        b.send_to(&[b'b', i], proxy.addr).await.unwrap();
        assert_eq!(recv(&b).await, vec![b'b', i]);
    }
    assert_eq!(target.seen().len(), 6);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_total")), 2);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_active")), 2);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_rx_datagrams")), 6);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_rx_bytes")), 12);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_tx_datagrams")), 6);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tunnel_success")), 2);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tx_datagrams")), 6);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_rx_datagrams")), 6);
    assert_eq!(
        proxy.stat(&format!("{C}udp.sess_tunnel_buffer_overflow")),
        0
    );
    // One pooled HTTP/3 connection carries both tunnels.
    assert_eq!(proxy.stat(&format!("{C}upstream_cx_total")), 1);
    assert_eq!(terminator.stat("http.ingress_http.downstream_cx_total"), 1);
    assert_eq!(
        terminator.stat("http.ingress_http.connect_udp.tunnels_total"),
        2
    );
}

/// Without buffer_options, what arrives before the tunnel is up is dropped and counted
/// (Envoy: "unbuffered loses the first datagram").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_buffering_the_first_datagram_is_dropped_and_counted() {
    let (terminator, target) = start_default().await;
    let proxy = udp_proxy(&spec(&terminator, "")).await;
    let a = app().await;
    a.send_to(b"first", proxy.addr).await.unwrap();
    proxy
        .wait_stat(&format!("{C}udp.sess_tunnel_success"), 1)
        .await;
    a.send_to(b"second", proxy.addr).await.unwrap();
    assert_eq!(recv(&a).await, b"second");
    assert_eq!(target.seen(), vec![bytes::Bytes::from_static(b"second")]);
    assert_eq!(
        proxy.stat(&format!("{C}udp.sess_tunnel_buffer_overflow")),
        1
    );
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_rx_datagrams")), 2);
}

/// Buffer overflow by count and by bytes while the proxy does not answer; then the
/// attempt fails and the session with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_overflow_by_count_and_by_bytes() {
    let hole = black_hole();
    let cert = test_cert();
    for (options, sent, overflow) in [
        ("{ max_buffered_datagrams: 2 }", 5u64, 3u64),
        ("{ max_buffered_bytes: 25 }", 5, 3),
    ] {
        let extra = format!("          buffer_options: {options}\n");
        let proxy = udp_proxy(&Spec {
            proxies: vec![hole.local_addr().unwrap()],
            ca_pem: &cert.cert_pem,
            tunneling_extra: &extra,
            idle_timeout: "60s",
            connect_timeout: "2s",
        })
        .await;
        let a = app().await;
        for _ in 0..sent {
            a.send_to(&[7u8; 10], proxy.addr).await.unwrap();
        }
        proxy
            .wait_stat(&format!("{U}downstream_sess_rx_datagrams"), sent)
            .await;
        assert_eq!(
            proxy.stat(&format!("{C}udp.sess_tunnel_buffer_overflow")),
            overflow,
            "{options}"
        );
        proxy
            .wait_stat(&format!("{C}udp.sess_tunnel_failure"), 1)
            .await;
        proxy
            .wait_stat(&format!("{U}downstream_sess_active"), 0)
            .await;
        assert_eq!(proxy.stat(&format!("{C}upstream_cx_connect_timeout")), 1);
        assert_eq!(proxy.stat(&format!("{C}udp.sess_tx_datagrams")), 0);
    }
}

/// A refusal from the proxy (404: no virtual host for the target) fails the session; the
/// next datagram from that peer starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_from_the_proxy_fails_the_session() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = bootstrap_yaml(
        &cert,
        target.addr,
        &BootstrapSpec {
            domains: vec!["other.example".into()],
            ..Default::default()
        },
    );
    let terminator = Proxy::start(&yaml, cert).await;
    let proxy = udp_proxy(&spec(&terminator, BUFFERED)).await;
    let a = app().await;
    a.send_to(b"x", proxy.addr).await.unwrap();
    proxy
        .wait_stat(&format!("{C}udp.sess_tunnel_failure"), 1)
        .await;
    proxy
        .wait_stat(&format!("{U}downstream_sess_active"), 0)
        .await;
    a.send_to(b"y", proxy.addr).await.unwrap();
    proxy
        .wait_stat(&format!("{C}udp.sess_tunnel_failure"), 2)
        .await;
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_total")), 2);
    assert_eq!(terminator.stat("http.ingress_http.downstream_rq_4xx"), 2);
    assert!(target.seen().is_empty());
}

/// retry_options.max_connect_attempts: the first host does not answer, the second
/// attempt (round robin: the next host) opens the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried() {
    let (terminator, _target) = start_default().await;
    let hole = black_hole();
    let extra = format!("{BUFFERED}          retry_options: {{ max_connect_attempts: 2 }}\n");
    let proxy = udp_proxy(&Spec {
        proxies: vec![hole.local_addr().unwrap(), terminator.addr],
        ca_pem: &terminator.cert.cert_pem,
        tunneling_extra: &extra,
        idle_timeout: "60s",
        connect_timeout: "1s",
    })
    .await;
    let a = app().await;
    a.send_to(b"retry", proxy.addr).await.unwrap();
    assert_eq!(recv(&a).await, b"retry");
    assert_eq!(proxy.stat(&format!("{C}upstream_cx_connect_fail")), 1);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tunnel_success")), 1);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tunnel_failure")), 0);
}

/// idle_timeout ends a quiet session (counted); the peer's next datagram opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_after_idle_timeout() {
    let (terminator, _target) = start_default().await;
    let mut s = spec(&terminator, BUFFERED);
    s.idle_timeout = "0.3s";
    let proxy = udp_proxy(&s).await;
    let a = app().await;
    a.send_to(b"one", proxy.addr).await.unwrap();
    assert_eq!(recv(&a).await, b"one");
    proxy.wait_stat(&format!("{U}idle_timeout"), 1).await;
    proxy
        .wait_stat(&format!("{U}downstream_sess_active"), 0)
        .await;
    // The terminator sees the tunnel end.
    terminator
        .wait_stat("http.ingress_http.connect_udp.tunnels_active", 0)
        .await;
    a.send_to(b"two", proxy.addr).await.unwrap();
    assert_eq!(recv(&a).await, b"two");
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_total")), 2);
}

/// Datagram sizes: a 1,200-byte inner QUIC packet (and larger ones) reaches the target
/// from the first datagram on, before path-MTU discovery has raised the QUIC datagram size
/// (about 1,160 bytes at first): what does not fit a QUIC datagram goes as a DATAGRAM
/// capsule, counted. The way back is the terminator's choice: Ferry sends a reply as a
/// QUIC datagram when it fits the path and otherwise drops and counts it, so 1,200-byte
/// replies cross once discovery has run (a few round trips; an inner QUIC stack
/// retransmits meanwhile) and 9,000-byte ones never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_quic_sized_datagrams_cross_the_tunnel() {
    let (terminator, target) = start_default().await;
    let proxy = udp_proxy(&spec(&terminator, BUFFERED)).await;
    let a = app().await;
    for (i, len) in [1200usize, 1350, 1500, 9000].into_iter().enumerate() {
        a.send_to(&vec![7u8; len], proxy.addr).await.unwrap();
        let seen = target.wait_for(i + 1).await;
        assert_eq!(seen[i].len(), len);
    }
    assert!(proxy.stat(&format!("{C}udp.sess_tx_datagrams_capsule")) >= 1);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tx_errors")), 0);
    let too_large = "http.ingress_http.connect_udp.datagrams_dropped_too_large";
    // Each of the four replies either came back or was dropped and counted; the 9,000-byte
    // one cannot come back.
    let mut replies = 0;
    tokio::time::timeout(DEADLINE, async {
        while terminator.stat(too_large) + replies != 4 {
            replies += drain(&a).await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every reply is delivered or counted");
    assert!(terminator.stat(too_large) >= 1);

    // A 1,200-byte exchange, as an inner QUIC stack would retry it: each lost reply is
    // counted by the terminator.
    let payload = vec![0x5au8; 1200];
    let echoed = tokio::time::timeout(DEADLINE, async {
        loop {
            a.send_to(&payload, proxy.addr).await.unwrap();
            let mut buf = vec![0u8; 65536];
            let wait = std::time::Duration::from_millis(200);
            if let Ok(Ok((n, _))) = tokio::time::timeout(wait, a.recv_from(&mut buf)).await {
                buf.truncate(n);
                return buf;
            }
        }
    })
    .await
    .expect("a 1,200-byte reply never came back");
    assert_eq!(echoed, payload);
}

/// Replies already waiting on `app` (without blocking), counted.
async fn drain(app: &UdpSocket) -> u64 {
    let mut n = 0;
    let mut buf = vec![0u8; 65536];
    while let Ok((_, _)) = app.try_recv_from(&mut buf) {
        n += 1;
    }
    n
}
