//! End to end over real loopback sockets: Ferry terminating CONNECT-UDP over HTTP/3.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use ferry::client::Received;
use ferry::stats::Encoding;
use support::*;

const P: &str = "http.ingress_http.connect_udp.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_mode_round_trip() {
    let (proxy, target) = start_default().await;
    let mut client = proxy.client(true).await;
    let mut t = client
        .open(PATH, &[("capsule-protocol", "?1")], false)
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(t.headers.get("capsule-protocol").unwrap(), "?1");
    for i in 0..20u8 {
        let payload = vec![i; 100 + i as usize];
        // QUIC datagrams are unreliable: a lost one is resent.
        let (enc, got) = echo_until_received_enc(&mut t, &payload).await;
        assert_eq!(enc, Encoding::QuicDatagram);
        assert_eq!(&got[..], &payload[..]);
    }
    // Every datagram the target saw was counted once on each leg (resends included).
    let ok = tokio::time::timeout(DEADLINE, async {
        loop {
            let seen = target.seen().len() as u64;
            let legs = [
                proxy.stat(&format!("{P}downstream_rx_datagrams_quic")),
                proxy.stat(&format!("{P}upstream_datagrams_tx")),
                proxy.stat(&format!("{P}upstream_datagrams_rx")),
                proxy.stat(&format!("{P}downstream_tx_datagrams_quic")),
            ];
            if seen >= 20 && legs.iter().all(|&n| n == seen) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "counters disagree with the target's count");
    assert_eq!(proxy.stat(&format!("{P}tunnels_total")), 1);
    assert_eq!(proxy.stat("http.ingress_http.downstream_rq_2xx"), 1);
}

/// Envoy's own scenario: `00 08 00 a1..a7` in, `a1..a7` at the target, and back as a capsule.
/// A client without SETTINGS_H3_DATAGRAM gets everything as capsules (Envoy 1.40 crashes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capsule_only_client() {
    let (proxy, target) = start_default().await;
    let mut client = proxy.client(false).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    t.send_raw(Bytes::from_static(&[
        0x00, 0x08, 0x00, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
    ]))
    .await
    .unwrap();
    let seen = target.wait_for(1).await;
    assert_eq!(&seen[0][..], &[0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
    let (enc, got) = recv_udp(&mut t).await;
    assert_eq!(enc, Encoding::Capsule);
    assert_eq!(&got[..], &[0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
    // A large payload travels as a capsule too (no QUIC path limit on the stream).
    let big = vec![7u8; 4000];
    t.send(&big).await.unwrap();
    let (_, got) = recv_udp(&mut t).await;
    assert_eq!(got.len(), 4000);
    assert_eq!(
        proxy.stat(&format!("{P}downstream_tx_datagrams_capsule")),
        2
    );
    assert_eq!(proxy.stat(&format!("{P}downstream_tx_datagrams_quic")), 0);
}

/// Several tunnels on one connection, each datagram reaching its own tunnel (the
/// h3-datagram 0.0.2 bug tagged every datagram as stream 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tunnels_share_one_connection() {
    let (proxy, _target) = start_default().await;
    let mut client = proxy.client(true).await;
    let mut tunnels = Vec::new();
    for _ in 0..8 {
        let t = client.open(PATH, &[], false).await.unwrap();
        assert_eq!(t.status, 200);
        tunnels.push(t);
    }
    for round in 0..5u8 {
        for (i, t) in tunnels.iter().enumerate() {
            t.send_datagram(&[i as u8, round]).unwrap();
        }
        for (i, t) in tunnels.iter_mut().enumerate() {
            // A lost datagram is resent; the echo of a resend from an earlier round may
            // arrive late, and is skipped. Another tunnel's datagram is a failure.
            let stale = |b: &[u8]| b.len() == 2 && b[0] == i as u8 && b[1] < round;
            await_echo(t, &[i as u8, round], stale).await;
        }
    }
    assert_eq!(proxy.stat(&format!("{P}tunnels_active")), 8);
    assert_eq!(proxy.stat("http.ingress_http.downstream_cx_total"), 1);
}

/// Unknown capsule types and non-zero context ids produce no UDP packet, and are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_capsules_and_contexts_are_dropped_and_counted() {
    let (proxy, target) = start_default().await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    t.send_any_capsule(0x2a, b"unknown").await.unwrap();
    t.send_capsule(1, b"context one").await.unwrap();
    t.send_datagram_with_context(1, b"context one dgram")
        .unwrap();
    // The capsule is reliable; its echo may come back as a QUIC datagram, which is not.
    let got = echo_capsule_until_received(&mut t, b"good").await;
    assert_eq!(&got[..], b"good");
    proxy
        .wait_stat(&format!("{P}datagrams_dropped_unknown_context_id"), 2)
        .await;
    assert_eq!(
        proxy.stat(&format!("{P}datagrams_dropped_unknown_capsule")),
        1
    );
    // Only the good capsule (perhaps resent) reached the target.
    let seen = target.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|p| &p[..] == b"good"),
        "{seen:?}"
    );
}

/// A capsule cut off by the end of the stream resets that stream only: the connection and
/// its other tunnels keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_capsule_resets_only_its_stream() {
    let (proxy, _target) = start_default().await;
    let mut client = proxy.client(true).await;
    let mut good = client.open(PATH, &[], false).await.unwrap();
    let mut bad = client.open(PATH, &[], false).await.unwrap();
    bad.send_raw(Bytes::from_static(&[0x00, 0x10, 0x00, 1, 2]))
        .await
        .unwrap();
    bad.finish().await.unwrap();
    match recv_end(&mut bad).await {
        Received::Reset(_) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    proxy
        .wait_stat(&format!("{P}streams_reset_malformed_capsule"), 1)
        .await;
    let got = echo_until_received(&mut good, b"still here").await;
    assert_eq!(&got[..], b"still here");
}

/// A capsule declaring a length beyond any datagram is refused on its header alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_capsule_is_refused_without_buffering() {
    let (proxy, target) = start_default().await;
    let mut client = proxy.client(false).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    // Type 0, length 2^30 (varint 0xc0000000_40000000), then a few bytes.
    t.send_raw(Bytes::from_static(&[
        0x00, 0xc0, 0, 0, 0, 0x40, 0, 0, 0, 0x00, 1, 2, 3,
    ]))
    .await
    .unwrap();
    match recv_end(&mut t).await {
        Received::Reset(_) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    proxy
        .wait_stat(&format!("{P}streams_reset_capsule_too_large"), 1)
        .await;
    assert!(target.seen().is_empty());
}

/// When the client ends the stream, the tunnel and its UDP socket are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_end_closes_the_socket() {
    let (proxy, target) = start_default().await;
    let mut client = proxy.client(true).await;
    // The tunnels' sockets are the ones connected to this test's target: counted in
    // /proc/net/udp, not by this process's fds, which other tests change meanwhile.
    assert_eq!(udp_sockets_connected_to(target.addr), 0);
    let mut tunnels = Vec::new();
    for _ in 0..5 {
        let mut t = client.open(PATH, &[], false).await.unwrap();
        // One echo proves the tunnel holds its socket; QUIC datagrams are unreliable, so
        // resend until it comes back (a single one was lost once under CI load).
        echo_until_received(&mut t, b"x").await;
        tunnels.push(t);
    }
    proxy.wait_stat(&format!("{P}tunnels_active"), 5).await;
    assert_eq!(
        udp_sockets_connected_to(target.addr),
        5,
        "each tunnel holds a UDP socket"
    );
    for t in &mut tunnels {
        t.finish().await.unwrap();
    }
    for t in &mut tunnels {
        assert_eq!(recv_end(t).await, Received::Finished);
    }
    proxy.wait_stat(&format!("{P}tunnels_active"), 0).await;
    // The sockets are closed once the tunnels are gone.
    let ok = tokio::time::timeout(DEADLINE, async {
        while udp_sockets_connected_to(target.addr) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "{} sockets still open",
        udp_sockets_connected_to(target.addr)
    );
}

/// `stream_idle_timeout` closes a tunnel with no traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_tunnel() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let spec = BootstrapSpec {
        stream_idle_timeout: Some("0.3s".into()),
        ..Default::default()
    };
    let proxy = Proxy::start(&bootstrap_yaml(&cert, target.addr, &spec), cert).await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo_until_received(&mut t, b"one").await;
    match recv_end(&mut t).await {
        Received::Reset(_) | Received::Finished => {}
        Received::Udp(..) => unreachable!(),
    }
    proxy
        .wait_stat(&format!("{P}streams_reset_idle_timeout"), 1)
        .await;
    proxy.wait_stat(&format!("{P}tunnels_active"), 0).await;
}

/// A target that answers with ICMP port unreachable closes its tunnel (RFC 9298 section 3.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_unreachable_closes_tunnel() {
    let closed = closed_port();
    let cert = test_cert();
    let proxy = Proxy::start(
        &bootstrap_yaml(&cert, closed, &BootstrapSpec::default()),
        cert,
    )
    .await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    // The first datagram to arrive draws the ICMP error; a later send or receive reports it.
    match send_until_end(&mut t, b"anyone?").await {
        Received::Reset(_) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    proxy
        .wait_stat(&format!("{P}streams_reset_socket_error"), 1)
        .await;
}
