//! Every refusal: the status Envoy gives, a `proxy-status` naming Ferry, and a counter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::*;

async fn status_of(proxy: &Proxy, path: &str, end_stream: bool) -> (u16, String) {
    let mut client = proxy.client(true).await;
    let t = client.open(path, &[], end_stream).await.unwrap();
    (t.status.as_u16(), proxy_status(&t))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_path_scenarios() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let spec = BootstrapSpec {
        domains: vec![
            "foo.lyft.com:80".into(),
            "127.0.0.1:80".into(),
            "[2001:0db8:85a3::8a2e:0370:7334]:80".into(),
        ],
        ..Default::default()
    };
    let proxy = Proxy::start(&bootstrap_yaml(&cert, target.addr, &spec), cert).await;
    let ok = [
        "/.well-known/masque/udp/foo.lyft.com/80/",
        "/.well-known/masque/udp/127.0.0.1/80/",
        "/.well-known/masque/udp/2001:0db8:85a3::8a2e:0370:7334/80/",
        "/.well-known/masque/udp/2001%3A0db8%3A85a3%3A%3A8a2e%3A0370%3A7334/80/",
    ];
    for path in ok {
        let (status, ps) = status_of(&proxy, path, false).await;
        assert_eq!(status, 200, "{path}: {ps}");
    }
    let not_found = [
        "/.well-known/masque/udp/bar.lyft.com/80/",   // wrong host
        "/.well-known/masque/udp/foo.lyft.com/81/",   // wrong port
        "/.well-known/masque/udp/fe80::a%25ee1/80/",  // zone id
        "/masque/udp/foo.lyft.com/80/",               // wrong prefix
        "/.well-known/masque/udp//80/",               // empty host
        "/.well-known/masque/udp/foo.lyft.com//",     // empty port
        "/.well-known/masque/udp/foo.lyft.com/80",    // no trailing slash
        "/.well-known/masque/udp/foo.lyft.com/80/x/", // extra segment
    ];
    for path in not_found {
        let (status, ps) = status_of(&proxy, path, false).await;
        assert_eq!(status, 404, "{path}");
        assert!(ps.starts_with("ferry"), "{path}: proxy-status {ps:?}");
    }
    assert_eq!(
        proxy.stat("http.ingress_http.downstream_rq_4xx"),
        not_found.len() as u64
    );
    assert_eq!(
        proxy.stat("http.ingress_http.connect_udp.tunnels_rejected_404"),
        not_found.len() as u64
    );
}

/// Ferry follows RFC 9298 where Envoy does not: target_port must be 1..=65535.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ports_are_refused() {
    let (proxy, _target) = start_default().await;
    for port in ["0", "65536", "70000", "http", "-1", "+80"] {
        let path = format!("/.well-known/masque/udp/foo.lyft.com/{port}/");
        let (status, ps) = status_of(&proxy, &path, false).await;
        assert!((400..500).contains(&status), "port {port}: {status}");
        assert!(ps.starts_with("ferry"), "port {port}: {ps:?}");
    }
    let (status, _) = status_of(&proxy, "/.well-known/masque/udp/foo.lyft.com/65535/", false).await;
    assert_eq!(status, 200);
}

/// A header-only CONNECT-UDP request gets 400 (Envoy 1.40 crashes here) and the proxy
/// lives on. The h3 client sends its FIN after the HEADERS, not on them, so the FIN can
/// arrive after Ferry has decided: then the tunnel opens (200) and ends at once with the
/// stream, nothing relayed. Both are checked here; the strict END_STREAM-on-HEADERS case
/// (always 400) is tests/interop/test_terminate_h3.py::test_header_only_request, whose
/// aioquic client puts END_STREAM on the HEADERS frame itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_only_request_is_400() {
    let (proxy, _target) = start_default().await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], true).await.unwrap();
    match t.status.as_u16() {
        400 => assert!(
            proxy_status(&t).contains("http_request_error"),
            "{}",
            proxy_status(&t)
        ),
        200 => assert_eq!(recv_end(&mut t).await, ferry::client::Received::Finished),
        other => panic!("header-only request got {other}"),
    }
    proxy
        .wait_stat("http.ingress_http.connect_udp.tunnels_active", 0)
        .await;
    let (status, _) = status_of(&proxy, PATH, false).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_without_connect_udp_is_403_and_no_route_is_404() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let routes = r#"
              - match:
                  prefix: "/.well-known/masque/udp/foo.lyft.com/"
                route:
                  cluster: target
              - match:
                  prefix: "/.well-known/masque/udp/disabled/"
                route:
                  cluster: target
                  upgrade_configs:
                  - upgrade_type: CONNECT-UDP
                    enabled: false
                    connect_config: {}
"#;
    let spec = BootstrapSpec {
        routes_yaml: Some(routes.into()),
        ..Default::default()
    };
    let proxy = Proxy::start(&bootstrap_yaml(&cert, target.addr, &spec), cert).await;
    let (status, ps) = status_of(&proxy, PATH, false).await;
    assert_eq!(status, 403, "{ps}");
    assert!(ps.contains("http_request_denied"), "{ps}");
    let (status, _) = status_of(&proxy, "/.well-known/masque/udp/disabled/80/", false).await;
    assert_eq!(status, 403);
    let (status, ps) = status_of(&proxy, "/.well-known/masque/udp/other/80/", false).await;
    assert_eq!(status, 404, "{ps}");
    assert_eq!(
        proxy.stat("http.ingress_http.connect_udp.tunnels_rejected_403"),
        2
    );
}

/// A cluster with no reachable host: 503 with `destination_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_cluster_is_503() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let spec = BootstrapSpec {
        cluster_yaml: Some(
            "\n  - name: target\n    type: STATIC\n    load_assignment:\n      cluster_name: target\n      endpoints: []\n"
                .into(),
        ),
        ..Default::default()
    };
    let proxy = Proxy::start(&bootstrap_yaml(&cert, target.addr, &spec), cert).await;
    let (status, ps) = status_of(&proxy, PATH, false).await;
    assert_eq!(status, 503);
    assert!(ps.contains("destination_unavailable"), "{ps}");
}

/// LOGICAL_DNS resolves `localhost` (through /etc/hosts) before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_dns_cluster() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let cluster = format!(
        "\n  - name: target\n    type: LOGICAL_DNS\n    dns_lookup_family: V4_ONLY\n    load_assignment:\n      cluster_name: target\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: localhost, port_value: {} }}\n",
        target.addr.port()
    );
    let spec = BootstrapSpec {
        cluster_yaml: Some(cluster),
        ..Default::default()
    };
    let proxy = Proxy::start(&bootstrap_yaml(&cert, target.addr, &spec), cert).await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    let got = echo_until_received(&mut t, b"via dns").await;
    assert_eq!(&got[..], b"via dns");
}

/// Open a raw request stream on the client's connection, send `head` (frame bytes h3
/// would buffer whole), then zeros until the proxy stops the stream. Returns the bytes the
/// proxy let the client write, the STOP_SENDING code, and what came back on the stream.
async fn write_until_stopped(
    conn: &quinn::Connection,
    head: &[u8],
    total: usize,
) -> (usize, quinn::VarInt, Vec<u8>) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(head).await.unwrap();
    let (written, code) = flood_until_stopped(&mut send, total - head.len()).await;
    let written = written + head.len();
    let response = tokio::time::timeout(DEADLINE, recv.read_to_end(64 * 1024))
        .await
        .expect("no response")
        .unwrap();
    (written, code, response)
}

/// Write zeros on `send` until the proxy stops the stream (STOP_SENDING) and return how
/// many bytes went out and the code. Fails if the proxy takes `total` bytes, or never
/// stops the stream.
async fn flood_until_stopped(send: &mut quinn::SendStream, total: usize) -> (usize, quinn::VarInt) {
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0;
    let code = tokio::time::timeout(DEADLINE, async {
        loop {
            match send.write(&chunk).await {
                Ok(n) => {
                    written += n;
                    assert!(written < total, "the proxy took all {written} bytes");
                }
                Err(quinn::WriteError::Stopped(code)) => break code,
                Err(e) => panic!("write failed: {e}"),
            }
        }
    })
    .await
    .expect("the proxy never stopped the stream");
    (written, code)
}

/// quinn's default stream receive window: all a client can send on a stream that the
/// proxy has stopped reading.
const STREAM_WINDOW: usize = 1_250_000;
/// RFC 9114 section 8.1.
const H3_NO_ERROR: u32 = 0x100;

/// A HEADERS frame announcing 8 MiB (issue #9): refused as soon as its length is read,
/// not after h3 has buffered it. The client can write no more than one stream window
/// (what QUIC lets it send before the proxy's STOP_SENDING), gets 431 with
/// STOP_SENDING(H3_NO_ERROR) (RFC 9114 section 4.1.1), and is counted. The same
/// connection and a new one keep their service. Also when the bytes before the head are
/// unknown frames (each small, or one huge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_frame_is_refused_before_it_is_buffered() {
    let (proxy, target) = start_default().await;
    let mut client = proxy.client(true).await;
    let eight_mib = 8 << 20;
    // Frame type 0x01 (HEADERS), length 8 MiB as a 4-byte varint.
    let headers = [0x01, 0x80, 0x80, 0x00, 0x00];
    // A reserved frame type (0x21) announcing 8 MiB, then the same HEADERS.
    let unknown_huge = [0x21, 0x80, 0x80, 0x00, 0x00];
    // Many 1,000-byte reserved frames: small each, but more than the head may take.
    let mut unknown_many = Vec::new();
    for _ in 0..70 {
        unknown_many.extend_from_slice(&[0x21, 0x43, 0xe8]);
        unknown_many.extend_from_slice(&[0; 1000]);
    }
    let stat = "http.ingress_http.downstream_rq_headers_too_large";
    for (i, head) in [&headers[..], &unknown_huge, &unknown_many]
        .into_iter()
        .enumerate()
    {
        let (written, code, response) = write_until_stopped(&client.conn, head, eight_mib).await;
        assert!(
            written <= head.len() + STREAM_WINDOW,
            "case {i}: the client wrote {written} bytes"
        );
        assert_eq!(code, quinn::VarInt::from_u32(H3_NO_ERROR), "case {i}");
        // The response: one HEADERS frame (type 0x01) whose QPACK block carries
        // `:status` (a static-table name reference, 0x5f 0x09 = index 24) with "431",
        // Huffman-coded (0x83: Huffman, 3 bytes) or not (0x03, "431").
        assert_eq!(response.first(), Some(&0x01), "case {i}: {response:02x?}");
        let block = &response[2..];
        let huffman_431 = [0x5f, 0x09, 0x83, 0x69, 0x90, 0xff];
        let plain_431 = [0x5f, 0x09, 0x03, b'4', b'3', b'1'];
        assert!(
            block.windows(6).any(|w| w == huffman_431 || w == plain_431),
            "case {i}: not a 431: {response:02x?}"
        );
        proxy.wait_stat(stat, i as u64 + 1).await;
        println!("case {i}: the client could write {written} bytes before STOP_SENDING");
    }
    assert_eq!(proxy.stat("http.ingress_http.downstream_rq_4xx"), 3);
    // Every refusal of the guard is counted there too.
    assert_eq!(
        proxy.stat("http.ingress_http.downstream_h3_frame_too_large"),
        3
    );

    // The same connection and a new one still get tunnels.
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(echo_until_received(&mut t, b"same").await.as_ref(), b"same");
    let mut other = proxy.client(true).await;
    let mut t = other.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(echo_until_received(&mut t, b"new").await.as_ref(), b"new");
    assert!(target.seen().iter().all(|d| d == "same" || d == "new"));
}

/// RFC 9114 section 8.1.
const H3_EXCESSIVE_LOAD: u32 = 0x107;

/// A QPACK prefixed integer (RFC 9204 section 4.1.1): `first` holds the bits above the
/// `prefix`-bit field.
fn qpack_int(out: &mut Vec<u8>, first: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// The HEADERS frame of a CONNECT-UDP request for [`PATH`], QPACK-encoded by hand with
/// literal names and values only (no tables, no Huffman), so the test controls every byte
/// on the stream.
fn connect_udp_headers_frame() -> Vec<u8> {
    let mut block = vec![0x00, 0x00]; // Required Insert Count 0, Base 0
    for (name, value) in [
        (":method", "CONNECT"),
        (":protocol", "connect-udp"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", PATH),
        ("capsule-protocol", "?1"),
    ] {
        // Literal Field Line with Literal Name: 001 N H NameLen(3+), then H ValueLen(7+).
        qpack_int(&mut block, 0x20, 3, name.len());
        block.extend_from_slice(name.as_bytes());
        qpack_int(&mut block, 0x00, 7, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    let mut frame = vec![0x01]; // HEADERS
                                // Its length as a two-byte QUIC varint (RFC 9000 section 16).
    assert!(block.len() < 1 << 14);
    frame.extend_from_slice(&(0x4000 | block.len() as u16).to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}

/// The rest of the 8 MiB the oversized frame announced: the proxy stops the stream
/// (H3_EXCESSIVE_LOAD) within one stream window, and counts the refusal.
async fn stopped_for_excessive_load(send: &mut quinn::SendStream, proxy: &Proxy) {
    let (written, code) = flood_until_stopped(send, 8 << 20).await;
    assert!(written <= STREAM_WINDOW, "wrote {written}");
    assert_eq!(code, quinn::VarInt::from_u32(H3_EXCESSIVE_LOAD));
    proxy
        .wait_stat("http.ingress_http.downstream_h3_frame_too_large", 1)
        .await;
}

/// A reserved frame type (0x21) announcing 8 MiB (4-byte varint length).
const OVERSIZED_FRAME_HEADER: [u8; 5] = [0x21, 0x80, 0x80, 0x00, 0x00];

/// The first frame of a response on a raw request stream, whole (it may arrive in several
/// reads): a HEADERS frame.
async fn read_response_head(recv: &mut quinn::RecvStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        // Type 0x01 (one byte), then the length as a QUIC varint, then the header block.
        if head.len() >= 2 {
            let len_bytes = 1_usize << (head[1] >> 6);
            if head.len() > len_bytes {
                let mut len = u64::from(head[1] & 0x3f);
                for b in &head[2..=len_bytes] {
                    len = (len << 8) | u64::from(*b);
                }
                if head.len() as u64 > len_bytes as u64 + len {
                    break;
                }
            }
        }
        let n = tokio::time::timeout(DEADLINE, recv.read(&mut buf))
            .await
            .expect("no response")
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended after {head:02x?}"));
        head.extend_from_slice(&buf[..n]);
    }
    assert_eq!(head[0], 0x01, "a HEADERS frame: {head:02x?}");
    head
}

/// After a request head that opened a tunnel, a frame over the limit on the request stream
/// (a reserved type announcing 8 MiB) is refused on its length: STOP_SENDING
/// (H3_EXCESSIVE_LOAD), the tunnel ends, the refusal is counted
/// (`downstream_h3_frame_too_large`), and the connection keeps its service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_after_the_request_head_ends_only_that_tunnel() {
    let (proxy, _target) = start_default().await;
    let mut client = proxy.client(true).await;
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    send.write_all(&connect_udp_headers_frame()).await.unwrap();
    // The 2xx response head arrives first: the tunnel is open.
    read_response_head(&mut recv).await;
    // The oversized frame's header, then its bytes.
    send.write_all(&OVERSIZED_FRAME_HEADER).await.unwrap();
    stopped_for_excessive_load(&mut send, &proxy).await;
    let p = "http.ingress_http.";
    proxy
        .wait_stat(&format!("{p}connect_udp.tunnels_total"), 1)
        .await;
    proxy
        .wait_stat(&format!("{p}connect_udp.tunnels_active"), 0)
        .await;
    assert_eq!(
        proxy.stat(&format!("{p}downstream_rq_headers_too_large")),
        0
    );
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(
        echo_until_received(&mut t, b"still").await.as_ref(),
        b"still"
    );
}

/// The same, with the oversized frame's header in the same write (one QUIC STREAM frame)
/// as the request head: the head still gets an answer, 413 with `proxy-status`, and the
/// stream is stopped; no tunnel opens. Before the guard passed on the whole frames ahead
/// of a refused one, such a request was dropped unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_in_the_request_heads_read_still_gets_the_answer() {
    let (proxy, _target) = start_default().await;
    let client = proxy.client(true).await;
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    let mut request = connect_udp_headers_frame();
    request.extend_from_slice(&OVERSIZED_FRAME_HEADER);
    send.write_all(&request).await.unwrap();
    let head = read_response_head(&mut recv).await;
    stopped_for_excessive_load(&mut send, &proxy).await;
    let p = "http.ingress_http.";
    proxy.wait_stat(&format!("{p}downstream_rq_4xx"), 1).await;
    assert_eq!(proxy.stat(&format!("{p}connect_udp.tunnels_total")), 0);
    assert_eq!(
        proxy.stat(&format!("{p}downstream_rq_headers_too_large")),
        0
    );
    // The answer is 413. That is not a QPACK static-table status, so it goes as a literal
    // value: "413" as it is, or Huffman-coded (RFC 7541 appendix B: '4' 011010, '1' 00001,
    // '3' 011001, padded with ones: 68 2c ff).
    assert!(
        head.windows(3)
            .any(|w| w == b"413" || w == [0x68, 0x2c, 0xff]),
        "{head:02x?}"
    );
}

/// A client whose control stream carries a frame over the limit (after its SETTINGS) loses
/// its connection (H3_EXCESSIVE_LOAD) as soon as the length is read; it is counted, and
/// other connections keep their service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_control_frame_closes_that_connection() {
    let (proxy, _target) = start_default().await;
    let tls = ferry::tls::client_config(Some(&proxy.cert.cert_pem), false, &[b"h3"]).unwrap();
    let endpoint = ferry::quic::client_endpoint("127.0.0.1:0".parse().unwrap(), tls).unwrap();
    let conn = endpoint
        .connect(proxy.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let mut control = conn.open_uni().await.unwrap();
    // Control stream (0x00), empty SETTINGS (0x04 0x00), then a reserved frame type (0x21)
    // announcing 2^40 bytes (8-byte varint) and some of them.
    control
        .write_all(&[0x00, 0x04, 0x00, 0x21, 0xc0, 0, 0, 0x01, 0, 0, 0, 0])
        .await
        .unwrap();
    let _ = control.write_all(&[0u8; 64 * 1024]).await;
    let closed = tokio::time::timeout(DEADLINE, conn.closed())
        .await
        .expect("the proxy kept the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(H3_EXCESSIVE_LOAD))
        }
        other => panic!("closed with {other}"),
    }
    proxy
        .wait_stat("http.ingress_http.downstream_h3_frame_too_large", 1)
        .await;
    let mut client = proxy.client(true).await;
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(
        echo_until_received(&mut t, b"others").await.as_ref(),
        b"others"
    );
}
