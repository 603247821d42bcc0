//! Bridging: forwarding CONNECT-UDP from every HTTP version to every HTTP version.
//! client (HTTP/3, HTTP/2 or HTTP/1.1) -> Ferry A (forward) -> Ferry B (terminate) -> echo,
//! with A's cluster speaking HTTP/3, HTTP/2 or HTTP/1.1 (over TLS, or cleartext) to B.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;

use ferry::stats::Encoding;
use support::tcp::{
    listener_addr, multi_bootstrap, open, static_cluster, Version, FORWARD_ROUTES, TERMINATE_ROUTES,
};
use support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Up {
    H3,
    H2Tls,
    H1Tls,
    H2Plain,
    H1Plain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Down {
    H3,
    H2,
    H1,
}

/// B's listener for `up`.
fn listener_for(up: Up) -> &'static str {
    match up {
        Up::H3 => "h3_listener",
        Up::H2Tls | Up::H1Tls => "tcp_listener",
        Up::H2Plain | Up::H1Plain => "plain_listener",
    }
}

/// A's cluster: the next hop at `addr` (trusting `ca_pem`), with the options for `up`.
fn next_hop_cluster(up: Up, addr: SocketAddr, ca_pem: &str) -> String {
    let options = match up {
        Up::H3 => "http3_protocol_options: { allow_extended_connect: true }",
        Up::H2Tls | Up::H2Plain => "http2_protocol_options: {}",
        Up::H1Tls | Up::H1Plain => "http_protocol_options: {}",
    };
    let tls = |socket: &str, ty: &str, nested: bool| {
        let (ctx_open, pad) = if nested {
            ("        upstream_tls_context:\n", 10)
        } else {
            ("", 8)
        };
        let p = " ".repeat(pad);
        format!(
            "    transport_socket:\n      name: {socket}\n      typed_config:\n        \"@type\": {ty}\n{ctx_open}{p}sni: localhost\n{p}common_tls_context:\n{p}  validation_context:\n{p}    trusted_ca:\n{p}      inline_string: |\n{ca}",
            ca = indent(ca_pem, pad + 8),
        )
    };
    let socket = match up {
        Up::H3 => tls(
            "envoy.transport_sockets.quic",
            "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport",
            true,
        ),
        Up::H2Tls | Up::H1Tls => tls(
            "envoy.transport_sockets.tls",
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            false,
        ),
        Up::H2Plain | Up::H1Plain => String::new(),
    };
    format!(
        r#"{cluster}    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          {options}
{socket}"#,
        cluster = static_cluster(addr),
    )
}

async fn terminator() -> (Proxy, EchoTarget) {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = multi_bootstrap(
        &cert,
        "AUTO",
        TERMINATE_ROUTES,
        &static_cluster(target.addr),
    );
    (Proxy::start(&yaml, cert).await, target)
}

async fn forwarder(up: Up, b: &Proxy) -> Proxy {
    forwarder_to(up, listener_addr(b, listener_for(up)), &b.cert.cert_pem).await
}

async fn forwarder_to(up: Up, addr: SocketAddr, ca_pem: &str) -> Proxy {
    let cert = test_cert();
    let yaml = multi_bootstrap(
        &cert,
        "AUTO",
        FORWARD_ROUTES,
        &next_hop_cluster(up, addr, ca_pem),
    );
    Proxy::start(&yaml, cert).await
}

/// Send `n` datagrams of several sizes through A from a `down` client; each echo comes back.
async fn exchange(a: &Proxy, down: Down, n: usize) {
    let payload = |i: usize| vec![i as u8; 1 + (i * 97) % 1100];
    match down {
        Down::H3 => {
            let mut client = H3ClientFor::new(a).await;
            let t = &mut client.tunnel;
            for i in 0..n {
                let (enc, got) = echo_until_received_enc(t, &payload(i)).await;
                assert_eq!(enc, Encoding::QuicDatagram, "{down:?} #{i}");
                assert_eq!(&got[..], &payload(i)[..], "{down:?} #{i}");
            }
        }
        Down::H2 | Down::H1 => {
            let version = if down == Down::H2 {
                Version::H2
            } else {
                Version::H1
            };
            let tcp = listener_addr(a, "tcp_listener");
            let mut t = open(
                tcp,
                &a.cert.cert_pem,
                version,
                PATH,
                &[("capsule-protocol", "?1")],
            )
            .await;
            let ok = if down == Down::H1 { 101 } else { 200 };
            assert_eq!(t.status, ok, "{down:?}: {}", t.proxy_status());
            assert_eq!(t.headers.get("capsule-protocol").unwrap(), "?1");
            // A hop after this one may use QUIC datagrams: resent until echoed.
            for i in 0..n {
                t.echo_until_received(&payload(i)).await;
            }
        }
    }
}

/// An HTTP/3 client with one open tunnel through `proxy`.
struct H3ClientFor {
    _client: ferry::client::H3Client,
    tunnel: ferry::client::ClientTunnel,
}

impl H3ClientFor {
    async fn new(proxy: &Proxy) -> Self {
        let mut client = proxy.client(true).await;
        let tunnel = client
            .open(PATH, &[("capsule-protocol", "?1")], false)
            .await
            .unwrap();
        assert_eq!(tunnel.status, 200, "{}", proxy_status(&tunnel));
        H3ClientFor {
            _client: client,
            tunnel,
        }
    }
}

const N: usize = 12;

/// Every downstream version through a forwarder whose cluster speaks `up`.
async fn matrix_row(up: Up) {
    let (b, target) = terminator().await;
    let a = forwarder(up, &b).await;
    for (k, down) in [Down::H3, Down::H2, Down::H1].into_iter().enumerate() {
        exchange(&a, down, N).await;
        // At least N more (lost QUIC datagrams are resent).
        assert!(target.seen().len() >= (k + 1) * N, "{up:?} <- {down:?}");
    }
    let p = "http.ingress_tcp.connect_udp.";
    let a_h3 = "http.ingress_h3.connect_udp.";
    assert_eq!(a.stat(&format!("{a_h3}tunnels_total")), 1);
    assert_eq!(a.stat(&format!("{p}tunnels_total")), 2);
    assert!(a.stat("cluster.target.upstream_cx_total") >= 1);
    // B saw the three tunnels on the listener for `up`.
    let b_prefix = match up {
        Up::H3 => "http.ingress_h3.connect_udp.",
        Up::H2Tls | Up::H1Tls => "http.ingress_tcp.connect_udp.",
        Up::H2Plain | Up::H1Plain => "http.ingress_plain.connect_udp.",
    };
    assert_eq!(b.stat(&format!("{b_prefix}tunnels_total")), 3);
    // Every datagram the target saw went through B once.
    let all = target.seen().len() as u64;
    match up {
        // Capsules from the HTTP/2 and HTTP/1.1 clients became QUIC datagrams on the HTTP/3
        // hop (RFC 9297 section 3.5): B received every datagram as a QUIC datagram.
        Up::H3 => {
            b.wait_stat(&format!("{b_prefix}downstream_rx_datagrams_quic"), all)
                .await;
            assert_eq!(
                b.stat(&format!("{b_prefix}downstream_rx_datagrams_capsule")),
                0
            );
        }
        // The HTTP/3 client's QUIC datagrams became capsules on the TCP hop.
        _ => {
            b.wait_stat(&format!("{b_prefix}downstream_rx_datagrams_capsule"), all)
                .await;
        }
    }
    // A's tunnels ended when the clients went away; nothing is left open.
    a.wait_stat(&format!("{a_h3}tunnels_active"), 0).await;
    a.wait_stat(&format!("{p}tunnels_active"), 0).await;
    b.wait_stat(&format!("{b_prefix}tunnels_active"), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_http3() {
    matrix_row(Up::H3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_http2_tls() {
    matrix_row(Up::H2Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_http1_tls() {
    matrix_row(Up::H1Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_http2_cleartext() {
    matrix_row(Up::H2Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_http1_cleartext() {
    matrix_row(Up::H1Plain).await;
}

/// The next hop's refusal reaches an HTTP/2 and an HTTP/1.1 client with its status and
/// proxy-status: B forwards to a cluster with no upstream protocol (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_refusal_reaches_tcp_clients() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = multi_bootstrap(&cert, "AUTO", FORWARD_ROUTES, &static_cluster(target.addr));
    let b = Proxy::start(&yaml, cert).await;
    for up in [Up::H2Tls, Up::H1Plain, Up::H3] {
        let a = forwarder(up, &b).await;
        let tcp = listener_addr(&a, "tcp_listener");
        for version in [Version::H2, Version::H1] {
            let t = open(
                tcp,
                &a.cert.cert_pem,
                version,
                PATH,
                &[("capsule-protocol", "?1")],
            )
            .await;
            assert_eq!(t.status, 503, "{up:?} <- {version:?}");
            assert!(
                t.proxy_status().contains("error=proxy_configuration_error"),
                "{}",
                t.proxy_status()
            );
        }
        assert_eq!(a.stat("cluster.target.upstream_rq_total"), 2);
        assert_eq!(a.stat("http.ingress_tcp.downstream_rq_5xx"), 2);
    }
    assert_eq!(target.seen().len(), 0);
}

/// A next hop that is down: 502 connection_refused for TCP clients, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_down_gives_502_to_tcp_clients() {
    // A port nothing listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = forwarder_to(Up::H2Plain, closed, &test_cert().cert_pem).await;
    let tcp = listener_addr(&a, "tcp_listener");
    for version in [Version::H2, Version::H1] {
        let t = open(
            tcp,
            &a.cert.cert_pem,
            version,
            PATH,
            &[("capsule-protocol", "?1")],
        )
        .await;
        assert_eq!(t.status, 502, "{version:?}");
        assert!(
            t.proxy_status().contains("error=connection_refused"),
            "{}",
            t.proxy_status()
        );
    }
    assert!(a.stat("cluster.target.upstream_cx_connect_fail") >= 2);
}
