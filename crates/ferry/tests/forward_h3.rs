//! Forwarding CONNECT-UDP to a next hop: client -> Ferry (forward) -> Ferry (terminate) -> target.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;

use ferry::client::Received;
use ferry::stats::Encoding;
use support::*;

const FORWARD_ROUTE: &str = r#"
              - match:
                  connect_matcher: {}
                route:
                  cluster: target
                  upgrade_configs:
                  - upgrade_type: CONNECT-UDP
"#;

const PASS_THROUGH_ROUTE: &str = r#"
              - match:
                  prefix: "/"
                metadata:
                  filter_metadata:
                    ferry.connect_udp: { pass_through: true }
                route:
                  cluster: target
                  upgrade_configs:
                  - upgrade_type: CONNECT-UDP
"#;

/// A cluster that is the next-hop proxy at `next_hop`, over HTTP/3, trusting `ca_pem`.
fn next_hop_cluster(next_hop: SocketAddr, ca_pem: &str, connect_timeout: &str) -> String {
    format!(
        r#"
  - name: target
    type: STATIC
    connect_timeout: {connect_timeout}
    load_assignment:
      cluster_name: target
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {ip}, port_value: {port} }}
    typed_extension_protocol_options:
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
        ip = next_hop.ip(),
        port = next_hop.port(),
        ca = indent(ca_pem, 18),
    )
}

async fn forwarder(next_hop: SocketAddr, next_hop_ca: &str, route: &str) -> Proxy {
    let cert = test_cert();
    let spec = BootstrapSpec {
        routes_yaml: Some(route.into()),
        cluster_yaml: Some(next_hop_cluster(next_hop, next_hop_ca, "1s")),
        ..Default::default()
    };
    // The target address is unused: the cluster is the next hop.
    let yaml = bootstrap_yaml(&cert, next_hop, &spec);
    Proxy::start(&yaml, cert).await
}

/// client -> A (forward) -> B (terminate) -> echo.
async fn chain() -> (Proxy, Proxy, EchoTarget) {
    let (b, target) = start_default().await;
    let a = forwarder(b.addr, &b.cert.cert_pem, FORWARD_ROUTE).await;
    (a, b, target)
}

const P: &str = "http.ingress_http.connect_udp.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_datagram_mode() {
    let (a, b, target) = chain().await;
    let mut client = a.client(true).await;
    let mut t = client
        .open(PATH, &[("capsule-protocol", "?1")], false)
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(t.headers.get("capsule-protocol").unwrap(), "?1");
    for i in 0..20u8 {
        let payload = vec![i; 50 + i as usize];
        // QUIC datagrams on both hops are unreliable: a lost one is resent.
        let (enc, got) = echo_until_received_enc(&mut t, &payload).await;
        assert_eq!(enc, Encoding::QuicDatagram);
        assert_eq!(&got[..], &payload[..]);
    }
    let seen = target.seen().len() as u64;
    assert!(seen >= 20);
    assert_eq!(b.stat(&format!("{P}tunnels_total")), 1);
    b.wait_stat(&format!("{P}downstream_rx_datagrams_quic"), seen)
        .await;
    assert_eq!(a.stat(&format!("{P}tunnels_total")), 1);
    a.wait_stat_at_least(&format!("{P}downstream_rx_datagrams_quic"), 20)
        .await;
    a.wait_stat_at_least(&format!("{P}downstream_tx_datagrams_quic"), 20)
        .await;
    assert_eq!(b.stat(&format!("{P}downstream_rx_datagrams_capsule")), 0);
    assert_eq!(a.stat("cluster.target.upstream_cx_total"), 1);
}

/// A client without HTTP/3 datagrams works through the chain: capsules on its stream,
/// converted to QUIC datagrams where the next hop negotiated them. (Envoy 1.40's chain
/// returns nothing to such a client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_capsule_only_client() {
    let (a, b, target) = chain().await;
    let mut client = a.client(false).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    // Capsules to A, but QUIC datagrams (unreliable) between A and B: resend until echoed.
    for i in 0..5u8 {
        let got = echo_capsule_until_received(&mut t, &[i; 1000]).await;
        assert_eq!(&got[..], &[i; 1000]);
    }
    let sent = target.seen().len();
    assert!(sent >= 5);
    a.wait_stat_at_least(&format!("{P}downstream_tx_datagrams_capsule"), 5)
        .await;
    assert_eq!(a.stat(&format!("{P}downstream_tx_datagrams_quic")), 0);

    // A payload too large for a QUIC datagram on the B -> A hop: B uses QUIC datagrams
    // with A, so it drops the reply and counts it rather than sending a capsule
    // (RFC 9298 section 6.1). The request direction is a capsule all the way.
    t.send(&[9u8; 3000]).await.unwrap();
    let seen = target.wait_for(sent + 1).await;
    assert_eq!(seen[sent].len(), 3000);
    b.wait_stat(&format!("{P}datagrams_dropped_too_large"), 1)
        .await;
}

/// Unknown capsule types travel through the forwarder unchanged (RFC 9297 section 3.2);
/// the terminator drops and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_forwards_unknown_capsules() {
    let (a, b, target) = chain().await;
    let mut client = a.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    t.send_any_capsule(0x2a, b"extension").await.unwrap();
    t.send_capsule(0, b"after").await.unwrap();
    let seen = target.wait_for(1).await;
    assert_eq!(&seen[0][..], b"after");
    b.wait_stat(&format!("{P}datagrams_dropped_unknown_capsule"), 1)
        .await;
    assert_eq!(a.stat(&format!("{P}datagrams_dropped_unknown_capsule")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_share_one_upstream_connection() {
    let (a, b, _target) = chain().await;
    let mut clients = Vec::new();
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut c = a.client(true).await;
        for _ in 0..4 {
            tunnels.push(c.open(PATH, &[], false).await.unwrap());
        }
        clients.push(c);
    }
    for (i, t) in tunnels.iter().enumerate() {
        t.send_datagram(&[i as u8; 10]).unwrap();
    }
    for (i, t) in tunnels.iter_mut().enumerate() {
        // Resent if lost; another tunnel's datagram is a failure.
        await_echo(t, &[i as u8; 10], |_| false).await;
    }
    assert_eq!(a.stat("http.ingress_http.downstream_cx_total"), 3);
    assert_eq!(a.stat("cluster.target.upstream_cx_total"), 1);
    assert_eq!(b.stat("http.ingress_http.downstream_cx_total"), 1);
    assert_eq!(b.stat(&format!("{P}tunnels_active")), 12);
}

/// The next hop is down: a quick 5xx with a proxy-status that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_down_is_a_quick_5xx() {
    let nothing = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cert = test_cert();
    let a = forwarder(nothing, &cert.cert_pem, FORWARD_ROUTE).await;
    let mut client = a.client(true).await;
    let started = std::time::Instant::now();
    let t = client.open(PATH, &[], false).await.unwrap();
    assert!((500..600).contains(&t.status.as_u16()), "{}", t.status);
    let ps = proxy_status(&t);
    assert!(
        ps.contains("connection_timeout") || ps.contains("connection_refused"),
        "{ps}"
    );
    // Bounded by the cluster's connect_timeout (1s), not a transport idle timeout.
    assert!(started.elapsed() < DEADLINE);
    assert_eq!(a.stat("cluster.target.upstream_cx_connect_fail"), 1);
}

/// The next hop resets the stream mid-tunnel: the client's stream is reset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_reset_resets_the_client_stream() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let spec = BootstrapSpec {
        stream_idle_timeout: Some("0.3s".into()),
        ..Default::default()
    };
    let b = Proxy::start(&bootstrap_yaml(&cert, target.addr, &spec), cert).await;
    let a = forwarder(b.addr, &b.cert.cert_pem, FORWARD_ROUTE).await;
    let mut client = a.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo_until_received(&mut t, b"one").await;
    // B's idle timeout resets its stream; A must carry that to the client.
    match recv_end(&mut t).await {
        Received::Reset(_) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    a.wait_stat(&format!("{P}tunnels_active"), 0).await;
}

/// The next hop restarts: the old connection is replaced and new tunnels work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_restart() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let cert_pem = cert.cert_pem.clone();
    let b_yaml = bootstrap_yaml(&cert, target.addr, &BootstrapSpec::default());
    let b = Proxy::start(&b_yaml, cert).await;
    let b_addr = b.addr;
    let a = forwarder(b_addr, &cert_pem, FORWARD_ROUTE).await;
    let mut client = a.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo_until_received(&mut t, b"before").await;

    // Stop B; the forwarded tunnel ends.
    let key = b.cert.key_pem.clone();
    drop(b);
    let end = recv_end(&mut t).await;
    assert!(
        matches!(end, Received::Reset(_) | Received::Finished),
        "{end:?}"
    );

    // B comes back on the same port (same certificate).
    let b_yaml = b_yaml.replace(
        "socket_address: { protocol: UDP, address: 127.0.0.1, port_value: 0 }",
        &format!(
            "socket_address: {{ protocol: UDP, address: 127.0.0.1, port_value: {} }}",
            b_addr.port()
        ),
    );
    let _b2 = Proxy::start_when_port_free(
        &b_yaml,
        TestCert {
            cert_pem: cert_pem.clone(),
            key_pem: key,
        },
    )
    .await;
    let mut t2 = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t2.status, 200, "{}", proxy_status(&t2));
    let got = echo_until_received(&mut t2, b"after").await;
    assert_eq!(&got[..], b"after");
    assert_eq!(a.stat("cluster.target.upstream_cx_total"), 2);
}

/// Pass-through: a path in a template Ferry does not know is forwarded unchanged to the
/// next hop (which answers for itself), instead of being refused with 404 as Envoy does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_forwards_custom_templates_unchanged() {
    let (b, _target) = start_default().await;
    let a = forwarder(b.addr, &b.cert.cert_pem, PASS_THROUGH_ROUTE).await;
    let mut client = a.client(true).await;
    // A default-template request still works end to end.
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    echo_until_received(&mut t, b"x").await;
    // A custom template reaches B unchanged: B (a terminator with the default template)
    // refuses it with its own 404, which reaches the client.
    let t = client
        .open("/masque?h=foo.lyft.com&p=80", &[], false)
        .await
        .unwrap();
    assert_eq!(t.status, 404);
    b.wait_stat(&format!("{P}tunnels_rejected_404"), 1).await;
    assert_eq!(a.stat(&format!("{P}tunnels_rejected_404")), 1);

    // Without pass-through (Envoy's behaviour), A itself refuses the custom path.
    let a2 = forwarder(b.addr, &b.cert.cert_pem, FORWARD_ROUTE).await;
    let mut client = a2.client(true).await;
    let t = client
        .open("/masque?h=foo.lyft.com&p=80", &[], false)
        .await
        .unwrap();
    assert_eq!(t.status, 404);
    assert_eq!(
        b.stat(&format!("{P}tunnels_rejected_404")),
        1,
        "B never saw it"
    );
}

/// Wait until path-MTU discovery has raised a connection's datagram limit to its final
/// value on loopback (quinn's discovery stops at 1,452-byte packets).
async fn settled_max_datagram(conn: &quinn::Connection) -> usize {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(max) = conn.max_datagram_size() {
                if max >= 1400 {
                    return max;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("path MTU discovery did not finish")
}

/// A datagram that fits the first hop but not the second is dropped and counted at the
/// forwarder, never turned into a capsule (RFC 9297 section 3.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_that_fits_first_hop_but_not_second_is_dropped_and_counted() {
    let (a, b, target) = chain().await;
    // 64 tunnels take upstream stream ids 0..=252 on the forwarder's one connection to B,
    // so the next one is stream 256: quarter stream id 64, a 2-byte varint.
    let mut filler = a.client(true).await;
    let mut keep = Vec::new();
    for _ in 0..64 {
        keep.push(filler.open(PATH, &[], false).await.unwrap());
    }
    b.wait_stat(&format!("{P}tunnels_active"), 64).await;
    // A fresh client connection: its first tunnel is stream 0, a 1-byte quarter stream id.
    let mut client = a.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(t.stream_id, 0);
    // Both hops run the same discovery to the same packet size on loopback. Traffic on
    // the new tunnel lets both connections finish it.
    echo_until_received(&mut t, b"warm up").await;
    let max = settled_max_datagram(&client.conn).await;
    let max_first = settled_max_datagram(&filler.conn).await;
    assert_eq!(
        max, max_first,
        "both client connections settled on the same limit"
    );

    // Quarter stream id (1) + context id (1) + payload fills the first hop exactly; on the
    // second hop the quarter stream id takes 2 bytes: one too many.
    let too_big = vec![0xab; max - 2];
    a.send_until_stat(&format!("{P}datagrams_dropped_too_large"), 1, || {
        t.send_datagram(&too_big).unwrap()
    })
    .await;
    // One byte less fits both hops.
    let fits = vec![0xcd; max - 3];
    let got = echo_until_received(&mut t, &fits).await;
    assert_eq!(got.len(), max - 3);
    let seen = target.seen();
    assert!(
        seen.iter().all(|d| d.len() != max - 2),
        "the oversized datagram reached the target"
    );
    assert_eq!(
        b.stat(&format!("{P}downstream_rx_datagrams_capsule")),
        0,
        "never turned into a capsule"
    );
}

/// The client ends or resets its stream: the next hop's stream ends too, and its tunnel
/// (and UDP socket) is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_end_or_reset_ends_the_next_hop_stream() {
    let (a, b, _target) = chain().await;
    let mut client = a.client(true).await;
    // A clean end (FIN).
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo_until_received(&mut t, b"x").await;
    b.wait_stat(&format!("{P}tunnels_active"), 1).await;
    t.finish().await.unwrap();
    assert_eq!(recv_end(&mut t).await, Received::Finished);
    b.wait_stat(&format!("{P}tunnels_active"), 0).await;
    a.wait_stat(&format!("{P}tunnels_active"), 0).await;
    // The client vanishes (connection closed without ending its streams).
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo_until_received(&mut t, b"y").await;
    b.wait_stat(&format!("{P}tunnels_active"), 1).await;
    client.conn.close(0u32.into(), b"bye");
    b.wait_stat(&format!("{P}tunnels_active"), 0).await;
    a.wait_stat(&format!("{P}tunnels_active"), 0).await;
}

/// What a hostile next hop sends, after its SETTINGS.
#[derive(Clone, Copy)]
enum Hostile {
    /// On the request stream: a HEADERS frame announcing 8 MiB, then bytes until stopped.
    HugeResponseHead,
    /// On its control stream: an unknown frame announcing 2^40 bytes, then bytes.
    HugeControlFrame,
}

/// A next hop speaking just enough HTTP/3 to be hostile: it opens its control stream with
/// SETTINGS, then floods as `how` says. Returns its address and what ended the flood: the
/// STOP_SENDING code Ferry sent on the request stream, or the code Ferry closed the
/// connection with.
async fn hostile_next_hop(
    cert: &TestCert,
    how: Hostile,
) -> (SocketAddr, tokio::task::JoinHandle<Result<u64, String>>) {
    let tls = ferry_config::ServerTls {
        certificates: vec![ferry_config::CertificateKeyPair {
            certificate_chain_pem: cert.cert_pem.clone(),
            private_key_pem: cert.key_pem.clone(),
        }],
        alpn_protocols: Vec::new(),
        client_ca_pem: None,
        require_client_certificate: false,
    };
    let tls = ferry::tls::server_config(&tls, &[b"h3"]).unwrap();
    let endpoint =
        ferry::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), tls, 100, Default::default())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let conn = endpoint
            .accept()
            .await
            .ok_or("no connection")?
            .await
            .map_err(|e| e.to_string())?;
        let mut control = conn.open_uni().await.map_err(|e| e.to_string())?;
        // Stream type 0x00 (control), SETTINGS (0x04) with no settings.
        control
            .write_all(&[0x00, 0x04, 0x00])
            .await
            .map_err(|e| e.to_string())?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        match how {
            Hostile::HugeResponseHead => {
                let (mut send, _recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                // HEADERS (0x01), length 8 MiB as a 4-byte varint.
                send.write_all(&[0x01, 0x80, 0x80, 0x00, 0x00])
                    .await
                    .map_err(|e| e.to_string())?;
                while written < 8 << 20 {
                    match send.write_all(&chunk).await {
                        Ok(()) => written += chunk.len(),
                        Err(quinn::WriteError::Stopped(code)) => return Ok(code.into_inner()),
                        Err(e) => return Err(format!("after {written} bytes: {e}")),
                    }
                }
                Err(format!("all {written} bytes of the head were taken"))
            }
            Hostile::HugeControlFrame => {
                // A reserved frame type (0x21) announcing 2^40 bytes (8-byte varint).
                control
                    .write_all(&[0x21, 0xc0, 0, 0, 0x01, 0, 0, 0, 0])
                    .await
                    .map_err(|e| e.to_string())?;
                while written < 8 << 20 {
                    if control.write_all(&chunk).await.is_err() {
                        break;
                    }
                    written += chunk.len();
                }
                match conn.closed().await {
                    quinn::ConnectionError::ApplicationClosed(c) => Ok(c.error_code.into_inner()),
                    other => Err(format!("after {written} bytes: {other}")),
                }
            }
        }
    });
    (addr, task)
}

/// A forwarder to a hostile next hop, and a client of the forwarder.
async fn forwarder_to_hostile(
    how: Hostile,
) -> (
    Proxy,
    ferry::client::H3Client,
    tokio::task::JoinHandle<Result<u64, String>>,
) {
    let cert = test_cert();
    let (hop, hostile) = hostile_next_hop(&cert, how).await;
    let a = forwarder(hop, &cert.cert_pem, FORWARD_ROUTE).await;
    let client = a.client(true).await;
    (a, client, hostile)
}

/// H3_EXCESSIVE_LOAD (RFC 9114 section 8.1).
const H3_EXCESSIVE_LOAD: u64 = 0x107;

/// A next hop whose response head never ends (a HEADERS frame announcing 8 MiB) is refused
/// as soon as its length is read: the request stream gets STOP_SENDING(H3_EXCESSIVE_LOAD),
/// the client a prompt 502, and Ferry buffers none of it (h3 alone would read all 8 MiB
/// and wait for the rest until the response timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_response_head_over_the_limit_is_refused() {
    let (a, mut client, hostile) = forwarder_to_hostile(Hostile::HugeResponseHead).await;
    let t = tokio::time::timeout(DEADLINE, client.open(PATH, &[], false))
        .await
        .expect("an answer before the response timeout")
        .unwrap();
    assert_eq!(t.status.as_u16(), 502);
    assert!(
        proxy_status(&t).contains("http_response_incomplete"),
        "{}",
        proxy_status(&t)
    );
    let code = tokio::time::timeout(DEADLINE, hostile)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, Ok(H3_EXCESSIVE_LOAD));
    assert_eq!(a.stat("cluster.target.upstream_h3_frame_too_large"), 1);
}

/// A next hop that sends a control frame over the limit loses its connection
/// (H3_EXCESSIVE_LOAD), as a client that does so does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_control_frame_over_the_limit_closes_its_connection() {
    let (a, mut client, hostile) = forwarder_to_hostile(Hostile::HugeControlFrame).await;
    // The tunnel's request is what makes A connect; its answer does not matter here.
    let _ = tokio::time::timeout(DEADLINE, client.open(PATH, &[], false)).await;
    let code = tokio::time::timeout(DEADLINE, hostile)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, Ok(H3_EXCESSIVE_LOAD));
    a.wait_stat("cluster.target.upstream_cx_destroy", 1).await;
    assert_eq!(a.stat("cluster.target.upstream_h3_frame_too_large"), 1);
}
