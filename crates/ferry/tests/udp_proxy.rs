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
        r#"{head}        session_filters:
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
        head = udp_listener_head("tunnel", s.idle_timeout, "proxy"),
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

/// What an app socket sent through the udp_proxy and got back, for exact counters
/// derived from it: QUIC datagrams inside the tunnel are unreliable, so a payload is
/// resent until it comes back, and everything received (late echoes of resends too) is
/// counted.
#[derive(Default)]
struct Exchange {
    sent: u64,
    received: u64,
    received_bytes: u64,
}

impl Exchange {
    /// Send `payload` from `app` to `to` until it comes back, resending after 200 ms of
    /// silence, bounded by the deadline. Other payloads received meanwhile (late echoes)
    /// are counted and skipped.
    async fn echo(&mut self, app: &UdpSocket, to: SocketAddr, payload: &[u8]) {
        self.send(app, to, payload).await;
        self.await_echo(app, to, payload).await;
    }

    async fn send(&mut self, app: &UdpSocket, to: SocketAddr, payload: &[u8]) {
        app.send_to(payload, to).await.unwrap();
        self.sent += 1;
    }

    /// Wait for `payload` (already sent), resending it after each 200 ms of silence.
    async fn await_echo(&mut self, app: &UdpSocket, to: SocketAddr, payload: &[u8]) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut buf = vec![0u8; 65536];
        loop {
            let wait = std::time::Duration::from_millis(200);
            match tokio::time::timeout(wait, app.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    self.received += 1;
                    self.received_bytes += n as u64;
                    if &buf[..n] == payload {
                        return;
                    }
                }
                Ok(Err(e)) => panic!("recv: {e}"),
                Err(_) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{} bytes never came back",
                        payload.len()
                    );
                    self.send(app, to, payload).await;
                }
            }
        }
    }

    /// Count what is already waiting on `app` (late echoes), without blocking.
    fn drain(&mut self, app: &UdpSocket) {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = app.try_recv_from(&mut buf) {
            self.received += 1;
            self.received_bytes += n as u64;
        }
    }
}

/// Wait until `settled` holds (counters on both proxies agree with what the apps and the
/// target saw: it returns `Err(what it saw)` until then), draining late echoes into
/// `exchanges` meanwhile; at the deadline, panic with the last observation.
async fn settle(
    apps: &[&UdpSocket],
    exchanges: &mut [&mut Exchange],
    mut settled: impl FnMut(&[&mut Exchange]) -> Result<(), String>,
) {
    let mut last = String::new();
    let ok = tokio::time::timeout(DEADLINE, async {
        loop {
            for (app, ex) in apps.iter().zip(exchanges.iter_mut()) {
                ex.drain(app);
            }
            match settled(exchanges) {
                Ok(()) => return,
                Err(seen) => last = seen,
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "counters never agreed: {last}");
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
    let (mut ea, mut eb) = (Exchange::default(), Exchange::default());
    // Three datagrams at once: the first ones wait in the session's buffer. Each must come
    // back (a reply lost on the QUIC hop is asked for again).
    for i in 0..3u8 {
        ea.send(&a, proxy.addr, &[b'a', i]).await;
    }
    for i in 0..3u8 {
        ea.await_echo(&a, proxy.addr, &[b'a', i]).await;
    }
    for i in 0..3u8 {
        eb.echo(&b, proxy.addr, &[b'b', i]).await;
    }
    let sent = ea.sent + eb.sent;
    // Everything the apps sent went into the tunnels (nothing overflowed the buffer);
    // every datagram the target saw was relayed back by the terminator, and every reply
    // that crossed the QUIC hop reached its app, each counted once.
    let t = |name: &str| terminator.stat(&format!("http.ingress_http.connect_udp.{name}"));
    let legs = || {
        [
            t("downstream_rx_datagrams_quic") + t("downstream_rx_datagrams_capsule"),
            t("upstream_datagrams_tx"),
            t("upstream_datagrams_rx"),
            t("downstream_tx_datagrams_quic") + t("downstream_tx_datagrams_capsule"),
        ]
    };
    let counts = |ex: &[&mut Exchange]| {
        (
            target.seen().len() as u64,
            legs(),
            ex[0].received + ex[1].received,
            proxy.stat(&format!("{C}udp.sess_rx_datagrams")),
            proxy.stat(&format!("{U}downstream_sess_tx_datagrams")),
        )
    };
    settle(&[&a, &b], &mut [&mut ea, &mut eb], |ex| {
        let (seen, legs, received, sess_rx, sess_tx) = counts(ex);
        let ok = (6..=sent).contains(&seen)
            && legs.iter().all(|&n| n == seen)
            && sess_rx == received
            && sess_tx == received;
        match ok {
            true => Ok(()),
            false => Err(format!(
                "sent {sent}; (target saw, terminator legs, apps received, \
                 sess_rx_datagrams, downstream_sess_tx_datagrams) = {:?}",
                counts(ex)
            )),
        }
    })
    .await;
    assert_eq!(
        proxy.stat(&format!("{U}downstream_sess_rx_datagrams")),
        sent
    );
    assert_eq!(
        proxy.stat(&format!("{U}downstream_sess_rx_bytes")),
        2 * sent
    );
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tx_datagrams")), sent);
    assert!(ea.received >= 3 && eb.received >= 3);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_total")), 2);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_active")), 2);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tunnel_success")), 2);
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
    let mut ex = Exchange::default();
    ex.echo(&a, proxy.addr, b"second").await;
    // Only "second" (perhaps more than once, if resent) reached the target.
    let seen = target.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|d| d == "second"),
        "{seen:?}"
    );
    assert_eq!(
        proxy.stat(&format!("{C}udp.sess_tunnel_buffer_overflow")),
        1
    );
    assert_eq!(
        proxy.stat(&format!("{U}downstream_sess_rx_datagrams")),
        1 + ex.sent
    );
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
    Exchange::default().echo(&a, proxy.addr, b"retry").await;
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
    Exchange::default().echo(&a, proxy.addr, b"one").await;
    proxy.wait_stat(&format!("{U}idle_timeout"), 1).await;
    proxy
        .wait_stat(&format!("{U}downstream_sess_active"), 0)
        .await;
    // The terminator sees the tunnel end.
    terminator
        .wait_stat("http.ingress_http.connect_udp.tunnels_active", 0)
        .await;
    // A late echo of a resent "one" is skipped.
    Exchange::default().echo(&a, proxy.addr, b"two").await;
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
    let mut ex = Exchange::default();
    for len in [1200usize, 1350, 1500, 9000] {
        // Resent until the target has it: once path-MTU discovery has run, a 1,200-byte
        // datagram may go as a QUIC datagram, which may be lost.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        'sent: loop {
            ex.send(&a, proxy.addr, &vec![7u8; len]).await;
            let wait = tokio::time::Instant::now() + std::time::Duration::from_millis(200);
            while tokio::time::Instant::now() < wait {
                if target.seen().iter().any(|d| d.len() == len) {
                    break 'sent;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{len} bytes never arrived"
            );
        }
    }
    assert!(proxy.stat(&format!("{C}udp.sess_tx_datagrams_capsule")) >= 1);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tx_errors")), 0);
    let too_large = "http.ingress_http.connect_udp.datagrams_dropped_too_large";
    let quic = "http.ingress_http.connect_udp.downstream_tx_datagrams_quic";
    // Each reply to what the target saw was sent as a QUIC datagram or dropped and
    // counted; each one that crossed reached the app.
    settle(&[&a], &mut [&mut ex], |ex| {
        let seen = target.seen().len() as u64;
        let (dropped, sent_back) = (terminator.stat(too_large), terminator.stat(quic));
        let relayed = proxy.stat(&format!("{C}udp.sess_rx_datagrams"));
        match seen >= 4 && dropped + sent_back == seen && relayed == ex[0].received {
            true => Ok(()),
            false => Err(format!(
                "target saw {seen}, terminator dropped {dropped} and sent {sent_back}, \
                 udp_proxy relayed {relayed}, app received {}",
                ex[0].received
            )),
        }
    })
    .await;
    // The 9,000-byte one cannot come back.
    assert!(terminator.stat(too_large) >= 1);

    // A 1,200-byte exchange, as an inner QUIC stack would retry it: each lost reply is
    // counted by the terminator.
    ex.echo(&a, proxy.addr, &[0x5au8; 1200]).await;
}

/// `access_log` lines at the UdpProxyConfig level (after `tunneling_config`, 8 spaces),
/// to `path`, in `format`, with `options` (`access_log_options` lines, 10 spaces).
fn session_log(path: &std::path::Path, format: &str, options: &str) -> String {
    let mut s = format!(
        "        access_log:\n        - name: envoy.access_loggers.file\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n            path: {}\n            log_format:\n              text_format_source:\n                inline_string: \"{format}\\n\"\n",
        path.display()
    );
    if !options.is_empty() {
        s.push_str("        access_log_options:\n");
        s.push_str(options);
    }
    s
}

/// A fresh path in the temp directory for a log file.
fn temp_log(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("ferry-{}-{nanos}-{name}", std::process::id()))
}

/// The log file's lines, once one contains `needle` (or the deadline passes).
async fn log_lines_once(path: &std::path::Path, needle: &str) -> Vec<String> {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || tokio::time::Instant::now() > until {
            return text.lines().map(str::to_owned).collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

const SESSION_FORMAT: &str = "%ACCESS_LOG_TYPE% %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %DYNAMIC_METADATA(udp.proxy.session:cluster_name)% %DYNAMIC_METADATA(udp.proxy.session:datagrams_received)% %DYNAMIC_METADATA(udp.proxy.session:datagrams_sent)% %DYNAMIC_METADATA(udp.proxy.session:errors_sent)% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESPONSE_FLAGS% %PROTOCOL% %FILTER_STATE(envoy.udp_proxy.propagate_response_headers:TYPED)%";

/// The session access log: one line when the tunnel is up
/// (`flush_access_log_on_tunnel_connected`), lines every `access_log_flush_interval`, and
/// one at the session's end with Envoy's `udp.proxy.session` fields and the proxy's
/// response headers (`propagate_response_headers`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_access_log_lines() {
    let (terminator, _target) = start_default().await;
    let path = temp_log("sessions.log");
    let extra = format!(
        "{BUFFERED}          propagate_response_headers: true\n{}",
        session_log(
            &path,
            SESSION_FORMAT,
            "          flush_access_log_on_tunnel_connected: true\n          access_log_flush_interval: 0.2s\n"
        )
    );
    let mut s = spec(&terminator, &extra);
    s.idle_timeout = "1s";
    let proxy = udp_proxy(&s).await;
    let a = app().await;
    // Two exchanges (a lost one is resent); the session's totals are what really crossed.
    let mut ex = Exchange::default();
    ex.echo(&a, proxy.addr, b"hello").await;
    ex.echo(&a, proxy.addr, b"hello").await;
    let lines = log_lines_once(&path, "UdpSessionEnd").await;
    // The session has ended: every reply it relayed is on the socket.
    ex.drain(&a);
    let peer = a.local_addr().unwrap();
    let first = &lines[0];
    assert!(
        first.starts_with(&format!(
            "UdpTunnelUpstreamConnected {peer} {} {} ",
            proxy.addr, terminator.addr
        )),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("UdpPeriodic ")),
        "{lines:#?}"
    );
    let last = lines.last().unwrap();
    let want = format!(
        "UdpSessionEnd {peer} {} {} {} {} proxy {} {} 0 1 SI - ",
        proxy.addr,
        terminator.addr,
        5 * ex.sent,
        ex.received_bytes,
        ex.sent,
        ex.received
    );
    assert!(last.starts_with(&want), "{last}\nwant {want}");
    let state: serde_json::Value = serde_json::from_str(&last[want.len()..]).unwrap();
    let headers = state["headers"].as_array().unwrap();
    assert_eq!(
        headers[0],
        serde_json::json!({"key": ":status", "value": "200"})
    );
    assert!(
        headers
            .iter()
            .any(|h| h == &serde_json::json!({"key": "capsule-protocol", "value": "?1"})),
        "{state}"
    );
    assert_eq!(proxy.stat("access_log.lines_dropped"), 0);
}

/// A session whose tunnel is refused is logged with Envoy's flags `UF,URX` (all attempts
/// failed), the attempt count and the refusal's headers; a session that needed a second
/// attempt with `UF` and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_retried_sessions_are_logged_with_flags() {
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
    let refusing = Proxy::start(&yaml, cert).await;
    let path = temp_log("refused.log");
    let format = "%UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESPONSE_FLAGS% %FILTER_STATE(envoy.udp_proxy.propagate_response_headers)%";
    let extra = format!(
        "{BUFFERED}          propagate_response_headers: true\n{}",
        session_log(&path, format, "")
    );
    let proxy = udp_proxy(&spec(&refusing, &extra)).await;
    let a = app().await;
    a.send_to(b"x", proxy.addr).await.unwrap();
    let lines = log_lines_once(&path, "UF").await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("1 UF,URX {"), "{}", lines[0]);
    assert!(
        lines[0].contains(r#"{"key":":status","value":"404"}"#),
        "{}",
        lines[0]
    );

    // First host does not answer, the second opens the tunnel.
    let (terminator, _target) = start_default().await;
    let hole = black_hole();
    let path = temp_log("retried.log");
    let extra = format!(
        "{BUFFERED}          retry_options: {{ max_connect_attempts: 2 }}\n{}",
        session_log(
            &path,
            "%UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESPONSE_FLAGS% %UPSTREAM_HOST%",
            ""
        )
    );
    let proxy = udp_proxy(&Spec {
        proxies: vec![hole.local_addr().unwrap(), terminator.addr],
        ca_pem: &terminator.cert.cert_pem,
        tunneling_extra: &extra,
        idle_timeout: "0.5s",
        connect_timeout: "1s",
    })
    .await;
    Exchange::default().echo(&a, proxy.addr, b"retry").await;
    let lines = log_lines_once(&path, "UF").await;
    assert_eq!(lines, vec![format!("2 UF,SI {}", terminator.addr)]);
}

/// Without `tunneling_config` (Envoy's default udp_proxy): plain UDP to a host of the
/// cluster, one socket per session, nothing lost while it opens; Envoy's stats and the
/// session access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_udp_proxying_without_tunneling_config() {
    let target = EchoTarget::start().await;
    let path = temp_log("plain.log");
    let yaml = format!(
        r#"{head}{log}  clusters:
  - name: service
    type: STATIC
    load_assignment:
      cluster_name: service
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#,
        head = udp_listener_head("plain", "0.5s", "service"),
        log = session_log(
            &path,
            "%ACCESS_LOG_TYPE% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS%",
            ""
        ),
        port = target.addr.port(),
    );
    let proxy = Proxy::start(&yaml, test_cert()).await;
    let a = app().await;
    // Three at once: none is lost while the session's socket opens.
    for i in 0..3u8 {
        a.send_to(&[b'p', i], proxy.addr).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(recv(&a).await);
    }
    got.sort();
    assert_eq!(got, vec![vec![b'p', 0], vec![b'p', 1], vec![b'p', 2]]);
    assert_eq!(target.seen().len(), 3);
    assert_eq!(proxy.stat("udp.plain.downstream_sess_total"), 1);
    assert_eq!(proxy.stat("udp.plain.downstream_sess_rx_datagrams"), 3);
    assert_eq!(proxy.stat("udp.plain.downstream_sess_tx_datagrams"), 3);
    assert_eq!(proxy.stat("cluster.service.udp.sess_tx_datagrams"), 3);
    assert_eq!(proxy.stat("cluster.service.udp.sess_rx_datagrams"), 3);
    assert_eq!(proxy.stat("cluster.service.udp.sess_tunnel_success"), 0);
    assert_eq!(
        proxy.stat("cluster.service.udp.sess_tunnel_buffer_overflow"),
        0
    );
    let lines = log_lines_once(&path, "UdpSessionEnd").await;
    assert_eq!(lines, vec![format!("UdpSessionEnd {} 6 6 -", target.addr)]);
    proxy.wait_stat("udp.plain.idle_timeout", 1).await;
    assert_eq!(proxy.stat("udp.plain.downstream_sess_active"), 0);
}

/// A cleartext HTTP/2 server (hyper) for `use_post` tunnels: records each request's method,
/// URI and headers, answers `status` (`x-post-server: yes`), and when it accepts, echoes
/// the request body (DATAGRAM capsules) into the response body; after the UDP payload
/// `end` it ends the response with trailers.
struct PostTunnelServer {
    addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(http::Method, http::Uri, http::HeaderMap)>>>,
}

const POST_END: &[u8] = b"end";

/// A response body fed frame by frame (data, then trailers) through a channel.
struct FrameBody(tokio::sync::mpsc::Receiver<hyper::body::Frame<bytes::Bytes>>);

impl hyper::body::Body for FrameBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn post_trailers() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("x-tunnel-end", "bye".parse().unwrap());
    t.insert("x-tunnel-count", "2".parse().unwrap());
    t
}

impl PostTunnelServer {
    async fn start(status: u16) -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            s.lock().unwrap().push((
                                req.method().clone(),
                                req.uri().clone(),
                                req.headers().clone(),
                            ));
                            let (tx, rx) = tokio::sync::mpsc::channel(8);
                            let body = FrameBody(rx);
                            if status == 200 {
                                tokio::spawn(async move {
                                    let mut body = req.into_body();
                                    let mut decoder =
                                        ferry_proto::capsule::CapsuleDecoder::new(1 << 16);
                                    while let Some(Ok(frame)) = body.frame().await {
                                        let Ok(data) = frame.into_data() else {
                                            continue;
                                        };
                                        decoder.push(data.clone());
                                        if tx.send(hyper::body::Frame::data(data)).await.is_err() {
                                            return;
                                        }
                                        while let Ok(Some(c)) = decoder.next() {
                                            let ferry_proto::capsule::Capsule::Datagram(p) = c
                                            else {
                                                continue;
                                            };
                                            if p.get(1..) == Some(POST_END) {
                                                let trailers =
                                                    hyper::body::Frame::trailers(post_trailers());
                                                let _ = tx.send(trailers).await;
                                                return;
                                            }
                                        }
                                    }
                                });
                            }
                            let resp = http::Response::builder()
                                .status(status)
                                .header("x-post-server", "yes")
                                .body(body)
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
                );
            }
        });
        PostTunnelServer { addr, seen }
    }

    fn seen(&self) -> Vec<(http::Method, http::Uri, http::HeaderMap)> {
        self.seen.lock().unwrap().clone()
    }
}

/// A udp_proxy with `use_post: true`, `post_path: /tunnel` to `server` (HTTP/2, cleartext),
/// `propagate_response_headers` and `propagate_response_trailers`, a session log at `log`.
fn post_udp_proxy_yaml(server: SocketAddr, log: &std::path::Path) -> String {
    format!(
        r#"{head}        session_filters:
        - name: envoy.filters.udp.session.http_capsule
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig
        tunneling_config:
          proxy_host: tunnel.example
          proxy_port: 8443
          target_host: foo.lyft.com
          default_target_port: 80
          use_post: true
          post_path: /tunnel
          headers_to_add:
          - header: {{ key: x-tunnel-from, value: udp-proxy }}
          buffer_options: {{}}
          propagate_response_headers: true
          propagate_response_trailers: true
{log}  clusters:
  - name: proxy
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: proxy
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
"#,
        head = udp_listener_head("tunnel", "10s", "proxy"),
        log = session_log(
            log,
            "%ACCESS_LOG_TYPE%|%RESPONSE_FLAGS%|%FILTER_STATE(envoy.udp_proxy.propagate_response_headers:TYPED)%|%FILTER_STATE(envoy.udp_proxy.propagate_response_trailers:TYPED)%",
            ""
        ),
        port = server.port(),
    )
}

/// Envoy's POST variant (`use_post`): the proxy sees `POST /tunnel` with the configured
/// authority and headers, no `:protocol` and no `capsule-protocol`; the capsules cross both
/// bodies (a burst in order); the trailers that end the response end the session and reach
/// its access log line (`propagate_response_trailers`), with the response headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_post_tunnel_with_trailers() {
    let server = PostTunnelServer::start(200).await;
    let path = temp_log("post.log");
    let proxy = Proxy::start(&post_udp_proxy_yaml(server.addr, &path), test_cert()).await;
    let a = app().await;
    a.send_to(b"first!", proxy.addr).await.unwrap();
    assert_eq!(recv(&a).await, b"first!");
    for i in 0..20u8 {
        a.send_to(&[b'b', i], proxy.addr).await.unwrap();
    }
    for i in 0..20u8 {
        assert_eq!(recv(&a).await, [b'b', i]);
    }
    a.send_to(POST_END, proxy.addr).await.unwrap();
    assert_eq!(recv(&a).await, POST_END);

    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (method, uri, headers) = &seen[0];
    assert_eq!(method, http::Method::POST);
    assert_eq!(uri.path(), "/tunnel");
    assert_eq!(uri.authority().unwrap().as_str(), "tunnel.example:8443");
    assert_eq!(uri.scheme_str(), Some("http"));
    assert_eq!(headers.get("x-tunnel-from").unwrap(), "udp-proxy");
    assert!(headers.get("capsule-protocol").is_none(), "{headers:?}");

    // The trailers end the tunnel and with it the session.
    let lines = log_lines_once(&path, "UdpSessionEnd").await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let parts: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(parts[..2], ["UdpSessionEnd", "-"], "{lines:#?}");
    let response: serde_json::Value = serde_json::from_str(parts[2]).unwrap();
    let response = response["headers"].as_array().unwrap();
    assert_eq!(
        response[0],
        serde_json::json!({"key": ":status", "value": "200"})
    );
    assert!(
        response.contains(&serde_json::json!({"key": "x-post-server", "value": "yes"})),
        "{response:?}"
    );
    let trailers: serde_json::Value = serde_json::from_str(parts[3]).unwrap();
    assert_eq!(
        trailers,
        serde_json::json!({"headers": [
            {"key": "x-tunnel-end", "value": "bye"},
            {"key": "x-tunnel-count", "value": "2"},
        ]})
    );
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tunnel_success")), 1);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tx_datagrams")), 22);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_rx_datagrams")), 22);
    assert_eq!(proxy.stat(&format!("{U}idle_timeout")), 0);
    assert_eq!(proxy.stat(&format!("{U}downstream_sess_active")), 0);
}

/// A POST tunnel answered with a non-2xx fails the session (any 2xx accepts, as in Envoy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_post_refusal_fails_the_session() {
    let server = PostTunnelServer::start(403).await;
    let path = temp_log("post-refused.log");
    let proxy = Proxy::start(&post_udp_proxy_yaml(server.addr, &path), test_cert()).await;
    let a = app().await;
    a.send_to(b"x", proxy.addr).await.unwrap();
    let lines = log_lines_once(&path, "UdpSessionEnd").await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with(r#"UdpSessionEnd|UF,URX|{"headers":[{"key":":status","value":"403"}"#),
        "{lines:#?}"
    );
    assert!(lines[0].ends_with("|-"), "no trailers: {lines:#?}");
    assert_eq!(server.seen().len(), 1);
    assert_eq!(server.seen()[0].0, http::Method::POST);
    assert_eq!(proxy.stat(&format!("{C}udp.sess_tunnel_failure")), 1);
}

/// The admin block and a UDP listener with Envoy's udp_proxy filter (`stat_prefix`,
/// `idle_timeout`, every datagram routed to `cluster`), up to the filter's further fields.
fn udp_listener_head(stat_prefix: &str, idle: impl std::fmt::Display, cluster: &str) -> String {
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
        stat_prefix: {stat_prefix}
        idle_timeout: {idle}
        matcher:
          on_no_match:
            action:
              name: route
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route
                cluster: {cluster}
"#
    )
}
