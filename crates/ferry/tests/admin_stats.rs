//! The admin endpoint, stats, access logs and drain, end to end over loopback: Ferry on
//! port 0, a UDP echo target, a real HTTP/3 client, and the admin endpoint read over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry::client::Received;
use ferry::server::{Server, ServerOptions, ServerState};
use ferry::stats::Encoding;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const P: &str = "http.ingress_http.connect_udp.";

/// One admin request over HTTP/1.1: (status, body).
async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    tokio::time::timeout(DEADLINE, async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
            "{head}"
        );
        (status, body.to_string())
    })
    .await
    .expect("admin request timed out")
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = admin(addr, "GET", path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// `/stats` counters and gauges as a map; histograms as their text.
fn parse_stats(text: &str) -> (BTreeMap<String, i64>, BTreeMap<String, String>) {
    let line_re = regex::Regex::new(
        r"^([A-Za-z0-9_.\[\]:-]+): (-?\d+|No recorded values|(P[0-9.]+\((nan|[0-9.e+-]+),(nan|[0-9.e+-]+)\) ?){10})$",
    )
    .unwrap();
    let mut values = BTreeMap::new();
    let mut histograms = BTreeMap::new();
    let mut seen_histogram = false;
    for line in text.lines() {
        assert!(
            line_re.is_match(line),
            "not Envoy's /stats format: {line:?}"
        );
        let (name, value) = line.split_once(": ").unwrap();
        match value.parse::<i64>() {
            Ok(v) => {
                assert!(
                    !seen_histogram,
                    "counters and gauges come before histograms: {line}"
                );
                values.insert(name.to_string(), v);
            }
            Err(_) => {
                seen_histogram = true;
                histograms.insert(name.to_string(), value.to_string());
            }
        }
    }
    (values, histograms)
}

fn h3_datagram(quarter_stream_id: u64, context_id: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    ferry_proto::varint::put(quarter_stream_id, &mut b).unwrap();
    ferry_proto::varint::put(context_id, &mut b).unwrap();
    b.extend_from_slice(payload);
    b.freeze()
}

/// After a scripted run, every counter equals what was sent, received and dropped, and
/// `/stats` prints it in Envoy's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_equal_what_was_sent_received_and_dropped() {
    let (proxy, target) = start_default().await;

    // Client 1 negotiates HTTP/3 datagrams.
    let mut c1 = proxy.client(true).await;
    let mut a = c1.open(PATH, &[], false).await.unwrap();
    assert_eq!(a.status, 200);
    // QUIC datagrams are unreliable: each is resent until its echo comes back, and the
    // expected counters are derived from what the target saw (sizes tell the phases apart).
    for i in 0..10u8 {
        let payload = vec![i; 100 + i as usize];
        let (enc, got) = echo_until_received_enc(&mut a, &payload).await;
        assert_eq!((enc, got.len()), (Encoding::QuicDatagram, payload.len()));
    }
    // Two capsules on the stream: relayed, echoed back as QUIC datagrams.
    for len in [30usize, 31] {
        let got = echo_capsule_until_received(&mut a, &vec![7; len]).await;
        assert_eq!(got.len(), len);
    }
    // Three drops: an unknown context id, an unknown capsule type, a datagram for a stream
    // that has no tunnel.
    proxy
        .send_until_stat(
            &format!("{P}datagrams_dropped_unknown_context_id"),
            1,
            || a.send_datagram_with_context(1, b"ctx1").unwrap(),
        )
        .await;
    a.send_any_capsule(0x1234, b"unknown").await.unwrap();
    proxy
        .send_until_stat(&format!("{P}datagrams_dropped_no_such_stream"), 1, || {
            c1.conn
                .send_datagram(h3_datagram(999, 0, b"nobody"))
                .unwrap()
        })
        .await;
    proxy
        .wait_stat(&format!("{P}datagrams_dropped_unknown_capsule"), 1)
        .await;

    // Client 2 has no HTTP/3 datagrams: capsules both ways.
    let mut c2 = proxy.client(false).await;
    let mut b = c2.open(PATH, &[], false).await.unwrap();
    assert_eq!(b.status, 200);
    for len in 50..55usize {
        b.send(&vec![1; len]).await.unwrap();
        let (enc, got) = recv_udp(&mut b).await;
        assert_eq!((enc, got.len()), (Encoding::Capsule, len));
    }
    // A refused request.
    let refused = c1
        .open("/.well-known/masque/udp/foo.lyft.com/0/", &[], false)
        .await
        .unwrap();
    assert_eq!(refused.status, 404);

    a.finish().await.unwrap();
    b.finish().await.unwrap();
    assert_eq!(recv_end(&mut a).await, Received::Finished);
    assert_eq!(recv_end(&mut b).await, Received::Finished);
    proxy.wait_stat(&format!("{P}tunnels_active"), 0).await;
    proxy
        .wait_stat("http.ingress_http.downstream_rq_active", 0)
        .await;
    drop((a, b, refused));
    drop((c1, c2));
    proxy
        .wait_stat("http.ingress_http.downstream_cx_active", 0)
        .await;
    let seen = target.seen();
    let count = |f: &dyn Fn(usize) -> bool| seen.iter().filter(|p| f(p.len())).count() as i64;
    let quic_in = count(&|n| (100..110).contains(&n));
    let capsules_in = count(&|n| n < 100);
    let to_a = count(&|n| !(50..100).contains(&n));
    let total = seen.len() as i64;
    let rx_bytes: usize = seen.iter().map(|p| p.len()).sum();
    assert!(quic_in >= 10 && capsules_in >= 7 && total >= 17, "{total}");

    let (v, h) = parse_stats(&get(proxy.admin, "/stats").await);
    let want: &[(&str, i64)] = &[
        ("connect_udp.downstream_rx_datagrams_quic", quic_in),
        ("connect_udp.downstream_rx_datagrams_capsule", capsules_in),
        ("connect_udp.downstream_rx_bytes", rx_bytes as i64),
        ("connect_udp.downstream_tx_datagrams_quic", to_a),
        ("connect_udp.downstream_tx_datagrams_capsule", 5),
        ("connect_udp.downstream_tx_bytes", rx_bytes as i64),
        ("connect_udp.upstream_datagrams_tx", total),
        ("connect_udp.upstream_datagrams_rx", total),
        ("connect_udp.datagrams_dropped_unknown_context_id", 1),
        ("connect_udp.datagrams_dropped_unknown_capsule", 1),
        ("connect_udp.datagrams_dropped_no_such_stream", 1),
        ("connect_udp.datagrams_dropped_too_large", 0),
        ("connect_udp.datagrams_dropped_buffer_full", 0),
        ("connect_udp.datagrams_dropped_socket_error", 0),
        ("connect_udp.datagrams_dropped_malformed", 0),
        ("connect_udp.datagrams_dropped_policy", 0),
        ("connect_udp.datagrams_dropped_tunnel_closed", 0),
        ("connect_udp.tunnels_total", 2),
        ("connect_udp.tunnels_active", 0),
        ("connect_udp.tunnels_rejected", 1),
        ("connect_udp.tunnels_rejected_404", 1),
        ("connect_udp.tunnels_rejected_http_request_error", 1),
        ("connect_udp.tunnels_rejected_503", 0),
        ("downstream_cx_total", 2),
        ("downstream_cx_active", 0),
        ("downstream_cx_http3_total", 2),
        ("downstream_cx_destroy", 2),
        ("downstream_cx_upgrades_total", 2),
        ("downstream_cx_upgrades_active", 0),
        ("downstream_rq_total", 3),
        ("downstream_rq_http3_total", 3),
        ("downstream_rq_completed", 3),
        ("downstream_rq_active", 0),
        ("downstream_rq_2xx", 2),
        ("downstream_rq_4xx", 1),
        ("downstream_rq_5xx", 0),
    ];
    for (name, value) in want {
        let full = format!("http.ingress_http.{name}");
        assert_eq!(v.get(&full), Some(value), "{full}");
    }
    // Envoy names listener stats after the configured address (port 0 here).
    let l = "listener.127.0.0.1_0";
    assert_eq!(v[&format!("{l}.downstream_cx_total")], 2);
    assert_eq!(v[&format!("{l}.downstream_cx_active")], 0);
    assert_eq!(v[&format!("{l}.http.ingress_http.downstream_rq_2xx")], 2);
    assert_eq!(v[&format!("{l}.http.ingress_http.downstream_rq_4xx")], 1);
    // One connected UDP socket per tunnel.
    assert_eq!(v["cluster.target.upstream_cx_total"], 2);
    assert_eq!(v["cluster.target.upstream_cx_active"], 0);
    assert_eq!(
        v["cluster.target.upstream_cx_tx_bytes_total"],
        rx_bytes as i64
    );
    assert_eq!(
        v["cluster.target.upstream_cx_rx_bytes_total"],
        rx_bytes as i64
    );
    assert_eq!(v["cluster.target.membership_total"], 1);
    assert_eq!(v["server.live"], 1);
    assert_eq!(v["server.state"], 0);
    assert_eq!(v["listener_manager.total_listeners_active"], 1);
    // Histograms: one value per tunnel, per request, per connection.
    assert_eq!(proxy.stat(&format!("{P}tunnel_duration_ms")), 2);
    assert_eq!(proxy.stat(&format!("{P}tunnel_setup_time_us")), 2);
    assert_eq!(proxy.stat("http.ingress_http.downstream_rq_time"), 3);
    assert_eq!(proxy.stat("http.ingress_http.downstream_cx_length_ms"), 2);
    assert_eq!(proxy.stat("cluster.target.upstream_cx_length_ms"), 2);
    for name in [
        "http.ingress_http.connect_udp.tunnel_duration_ms",
        "http.ingress_http.connect_udp.tunnel_setup_time_us",
    ] {
        assert!(h[name].starts_with("P0(nan,"), "{name}: {}", h[name]);
    }

    // usedonly, filter, type, JSON.
    let (used, _) = parse_stats(&get(proxy.admin, "/stats?usedonly").await);
    assert!(used.contains_key(&format!("{P}tunnels_total")));
    assert!(!used.contains_key(&format!("{P}datagrams_dropped_policy")));
    let (filtered, fh) = parse_stats(
        &get(
            proxy.admin,
            "/stats?filter=connect_udp%5C.tunnels_(total%7Cactive)$",
        )
        .await,
    );
    assert_eq!(
        filtered.keys().cloned().collect::<Vec<_>>(),
        vec![format!("{P}tunnels_active"), format!("{P}tunnels_total")]
    );
    assert!(fh.is_empty());
    let (_, only_h) = parse_stats(&get(proxy.admin, "/stats?type=Histograms&filter=tunnel_").await);
    assert_eq!(only_h.len(), 2);
    let j: serde_json::Value =
        serde_json::from_str(&get(proxy.admin, "/stats?format=json&filter=tunnel").await).unwrap();
    let stats = j["stats"].as_array().unwrap();
    assert!(stats
        .iter()
        .any(|s| s["name"] == format!("{P}tunnels_total") && s["value"] == 2));
    let hist = &stats.last().unwrap()["histograms"];
    assert_eq!(hist["supported_quantiles"].as_array().unwrap().len(), 10);
    let q = hist["computed_quantiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == format!("{P}tunnel_duration_ms"))
        .unwrap();
    assert_eq!(q["values"].as_array().unwrap().len(), 10);
    assert!(q["values"][0]["cumulative"].is_number());
    assert!(q["values"][0]["interval"].is_null());

    // Prometheus (fully parsed by tests/interop/test_admin.py): families once, tagged.
    let prom = get(proxy.admin, "/stats/prometheus").await;
    assert!(prom.contains(
        "envoy_http_connect_udp_tunnels_total{envoy_http_conn_manager_prefix=\"ingress_http\"} 2\n"
    ));
    assert!(prom.contains("envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",envoy_http_conn_manager_prefix=\"ingress_http\"} 2\n"));
    assert!(prom.contains("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"target\"} 2\n"));
    assert!(prom.contains(
        "envoy_http_connect_udp_tunnel_duration_ms_count{envoy_http_conn_manager_prefix=\"ingress_http\"} 2\n"
    ));
    let types: Vec<&str> = prom.lines().filter(|l| l.starts_with("# TYPE")).collect();
    let mut unique = types.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        types.len(),
        unique.len(),
        "a family's TYPE line appears once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let (proxy, _target) = start_default().await;
    let a = proxy.admin;
    assert_eq!(admin(a, "GET", "/ready").await, (200, "LIVE\n".into()));
    let info: serde_json::Value = serde_json::from_str(&get(a, "/server_info").await).unwrap();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["command_line_options"]["drain_time"], "600s");
    assert!(info["version"].as_str().unwrap().starts_with("ferry/"));

    // POST-only endpoints refuse GET, as Envoy does.
    for path in ["/healthcheck/fail", "/drain_listeners", "/quitquitquit"] {
        let (status, body) = admin(a, "GET", path).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(body, "Method GET not allowed, POST required.");
    }
    let (status, body) = admin(a, "GET", "/nope").await;
    assert_eq!(status, 404);
    assert!(
        body.starts_with("invalid path. admin commands are:"),
        "{body}"
    );
    assert!(get(a, "/help").await.contains("/stats/prometheus"));
    assert_eq!(admin(a, "GET", "/stats?filter=(").await.0, 400);

    // Health checks: failing makes /ready 503 DRAINING without draining anything.
    assert_eq!(
        admin(a, "POST", "/healthcheck/fail").await,
        (200, "OK\n".into())
    );
    assert_eq!(admin(a, "GET", "/ready").await, (503, "DRAINING\n".into()));
    let (v, _) = parse_stats(&get(a, "/stats?filter=%5Eserver%5C.").await);
    assert_eq!((v["server.live"], v["server.state"]), (0, 1));
    let mut client = proxy.client(true).await;
    assert_eq!(client.open(PATH, &[], false).await.unwrap().status, 200);
    assert_eq!(
        admin(a, "POST", "/healthcheck/ok").await,
        (200, "OK\n".into())
    );
    assert_eq!(admin(a, "GET", "/ready").await, (200, "LIVE\n".into()));

    // Clusters, text and JSON.
    let clusters = get(a, "/clusters").await;
    assert!(
        clusters.contains(&format!("target::{}::health_flags::healthy", _target.addr)),
        "{clusters}"
    );
    let cj: serde_json::Value =
        serde_json::from_str(&get(a, "/clusters?format=json").await).unwrap();
    assert_eq!(cj["cluster_statuses"][0]["name"], "target");
    assert_eq!(
        cj["cluster_statuses"][0]["host_statuses"][0]["address"]["socket_address"]["port_value"],
        _target.addr.port()
    );
}

/// `/config_dump` holds the effective bootstrap: loading it again gives the same model
/// (once the redacted private key is put back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_round_trips() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let key = cert.key_pem.clone();
    let yaml = with_access_logs(
        &bootstrap_yaml(&cert, target.addr, &BootstrapSpec::default()),
        "/dev/null",
        "/dev/null",
    );
    let proxy = Proxy::start(&yaml, cert).await;
    let dump: serde_json::Value =
        serde_json::from_str(&get(proxy.admin, "/config_dump").await).unwrap();
    let types: Vec<&str> = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["@type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        ]
    );
    let text = dump["configs"][0]["bootstrap"].to_string();
    assert!(
        !text.contains("PRIVATE KEY"),
        "the private key must not be dumped"
    );
    let text = text.replace(
        &serde_json::to_string(ferry::config_dump::REDACTED).unwrap(),
        &serde_json::to_string(&key).unwrap(),
    );
    let reloaded = ferry_config::load_str(&text, ferry_config::Format::Json)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(reloaded, **proxy.state.bootstrap.load());
    assert_eq!(
        dump["configs"][1]["static_clusters"][0]["cluster"]["name"],
        "target"
    );
}

// ---------------------------------------------------------------------------------------
// Access logs

fn temp_path(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("ferry-{}-{nanos}-{name}", std::process::id()))
}

/// The bootstrap with two access logs on the HCM: Envoy's default text format to
/// `text_path`, and a JSON format with the tunnel fields to `json_path`.
fn with_access_logs(yaml: &str, text_path: &str, json_path: &str) -> String {
    let logs = format!(
        r#"          stat_prefix: ingress_http
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {text_path}
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {json_path}
              log_format:
                json_format:
                  start_time: "%START_TIME%"
                  method: "%REQ(:METHOD)%"
                  authority: "%REQ(:AUTHORITY)%"
                  path: "%REQ(:PATH)%"
                  protocol: "%PROTOCOL%"
                  code: "%RESPONSE_CODE%"
                  flags: "%RESPONSE_FLAGS%"
                  details: "%RESPONSE_CODE_DETAILS%"
                  proxy_status: "%RESP(PROXY-STATUS)%"
                  duration: "%DURATION%"
                  bytes_received: "%BYTES_RECEIVED%"
                  bytes_sent: "%BYTES_SENT%"
                  client: "%DOWNSTREAM_REMOTE_ADDRESS%"
                  upstream: "%UPSTREAM_HOST%"
                  cluster: "%UPSTREAM_CLUSTER%"
                  target: "%DYNAMIC_METADATA(ferry.connect_udp:target)%"
                  datagrams_received: "%DYNAMIC_METADATA(ferry.connect_udp:datagrams_received)%"
                  datagrams_sent: "%DYNAMIC_METADATA(ferry.connect_udp:datagrams_sent)%"
                  datagrams_dropped: "%DYNAMIC_METADATA(ferry.connect_udp:datagrams_dropped)%"
                  close: "%CONNECTION_TERMINATION_DETAILS%"
"#
    );
    let out = yaml.replacen("          stat_prefix: ingress_http\n", &logs, 1);
    assert_ne!(out, yaml);
    out
}

/// Wait until `path` holds `n` lines.
async fn wait_lines(path: &PathBuf, n: usize) -> Vec<String> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} never had {n} lines", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_for_success_rejection_drop_and_idle() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let (text_path, json_path) = (temp_path("text.log"), temp_path("json.log"));
    let spec = BootstrapSpec {
        stream_idle_timeout: Some("0.3s".into()),
        ..Default::default()
    };
    let yaml = with_access_logs(
        &bootstrap_yaml(&cert, target.addr, &spec),
        text_path.to_str().unwrap(),
        json_path.to_str().unwrap(),
    );
    let proxy = Proxy::start(&yaml, cert).await;
    // Capsules only: reliable both ways, so the logged counts are exact.
    let mut client = proxy.client(false).await;

    // 1. A tunnel that relays 3 datagrams each way and drops 2 (unknown context id,
    //    unknown capsule), then ends cleanly.
    let mut t = client
        .open(PATH, &[("user-agent", "ferry-test")], false)
        .await
        .unwrap();
    for i in 0..3u8 {
        t.send(&[i; 10]).await.unwrap();
        recv_udp(&mut t).await;
    }
    t.send_capsule(5, b"x").await.unwrap();
    t.send_any_capsule(0x2a, b"y").await.unwrap();
    proxy
        .wait_stat(&format!("{P}datagrams_dropped_unknown_context_id"), 1)
        .await;
    proxy
        .wait_stat(&format!("{P}datagrams_dropped_unknown_capsule"), 1)
        .await;
    t.finish().await.unwrap();
    assert_eq!(recv_end(&mut t).await, Received::Finished);
    let lines = wait_lines(&json_path, 1).await;
    let ok: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(ok["code"], 200);
    assert_eq!(ok["flags"], "-");
    assert_eq!(ok["details"], "via_upstream");
    assert_eq!(ok["method"], "CONNECT");
    assert_eq!(ok["protocol"], "HTTP/3");
    assert_eq!(
        ok["authority"], "foo.lyft.com:80",
        "Envoy logs the rewritten authority"
    );
    assert_eq!(ok["target"], "foo.lyft.com:80");
    assert_eq!(ok["path"], PATH);
    assert_eq!(ok["upstream"], target.addr.to_string());
    assert_eq!(ok["cluster"], "target");
    assert_eq!(ok["bytes_received"], 30);
    assert_eq!(ok["bytes_sent"], 30);
    assert_eq!(ok["datagrams_received"], 3);
    assert_eq!(ok["datagrams_sent"], 3);
    assert_eq!(ok["datagrams_dropped"], 2);
    assert_eq!(ok["close"], "client_finished");
    assert_eq!(ok["proxy_status"], serde_json::Value::Null);
    assert!(ok["duration"].is_u64());
    assert!(ok["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            .unwrap()
            .is_match(ok["start_time"].as_str().unwrap()),
        "{}",
        ok["start_time"]
    );

    // 2. A refused request (port 0): 404, NR, the proxy-status in the line.
    let r = client
        .open("/.well-known/masque/udp/foo.lyft.com/0/", &[], false)
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let lines = wait_lines(&json_path, 2).await;
    let no: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(no["code"], 404);
    assert_eq!(no["flags"], "NR");
    assert_eq!(no["details"], "http_request_error");
    assert!(no["proxy_status"]
        .as_str()
        .unwrap()
        .contains("error=http_request_error"));
    assert_eq!(no["upstream"], serde_json::Value::Null);
    assert_eq!(no["bytes_received"], 0);
    assert_eq!(no["target"], serde_json::Value::Null);

    // 3. A tunnel left idle: reset by stream_idle_timeout, flagged SI.
    let mut idle = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(idle.status, 200);
    assert!(matches!(
        recv_end(&mut idle).await,
        Received::Reset(_) | Received::Finished
    ));
    let lines = wait_lines(&json_path, 3).await;
    let si: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(si["code"], 200);
    assert_eq!(si["flags"], "SI");
    assert_eq!(si["close"], "idle_timeout");
    assert_eq!(si["datagrams_received"], 0);

    // The same three requests in Envoy's default text format.
    let text = wait_lines(&text_path, 3).await;
    let re = regex::Regex::new(
        r#"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "CONNECT /\.well-known/masque/udp/foo\.lyft\.com/(80|0)/ HTTP/3" (\d{3}) (\S+) (\d+) (\d+) (\d+) - "-" "([^"]*)" "-" "([^"]*)" "([^"]*)"$"#,
    )
    .unwrap();
    let caps: Vec<_> = text
        .iter()
        .map(|l| re.captures(l).unwrap_or_else(|| panic!("{l:?}")))
        .collect();
    assert_eq!(
        (&caps[0][2], &caps[0][3], &caps[0][4], &caps[0][5]),
        ("200", "-", "30", "30")
    );
    assert_eq!(&caps[0][7], "ferry-test");
    assert_eq!(&caps[0][8], "foo.lyft.com:80");
    assert_eq!(caps[0][9], target.addr.to_string());
    assert_eq!((&caps[1][2], &caps[1][3], &caps[1][9]), ("404", "NR", "-"));
    assert_eq!((&caps[2][2], &caps[2][3]), ("200", "SI"));
    let _ = std::fs::remove_file(&text_path);
    let _ = std::fs::remove_file(&json_path);
}

// ---------------------------------------------------------------------------------------
// Drain

struct Running {
    state: Arc<ServerState>,
    addr: SocketAddr,
    admin: SocketAddr,
    cert_pem: String,
    done: tokio::task::JoinHandle<()>,
}

async fn start_with(drain_time: Duration) -> (Running, EchoTarget) {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = bootstrap_yaml(&cert, target.addr, &BootstrapSpec::default());
    let bootstrap = ferry_config::load_str(&yaml, ferry_config::Format::Yaml).unwrap();
    let server = Server::bind_with(
        bootstrap,
        ServerOptions {
            drain_time,
            ..Default::default()
        },
    )
    .unwrap();
    let state = server.state.clone();
    let addr = state.listeners[0].local_addr;
    let admin = server.admin_addr().unwrap();
    let done = tokio::spawn(server.run());
    tokio::time::timeout(DEADLINE, async {
        while !state.ready.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("never ready");
    let r = Running {
        state,
        addr,
        admin,
        cert_pem: cert.cert_pem,
        done,
    };
    (r, target)
}

impl Running {
    async fn client(&self) -> Result<ferry::client::H3Client, String> {
        ferry::client::H3Client::connect(
            self.addr,
            &ferry::client::ClientOptions {
                server_name: "localhost".into(),
                ca_pem: Some(self.cert_pem.clone()),
                insecure: false,
                datagrams: true,
            },
        )
        .await
    }

    fn stat(&self, name: &str) -> u64 {
        self.state.stats.value(name).unwrap_or(0)
    }

    async fn wait_exit(self) {
        tokio::time::timeout(DEADLINE, self.done)
            .await
            .expect("the server did not exit")
            .unwrap();
    }
}

async fn echo(t: &mut ferry::client::ClientTunnel, payload: &[u8]) {
    let got = echo_until_received(t, payload).await;
    assert_eq!(&got[..], payload);
}

/// `POST /drain_listeners`: new connections are refused, new requests on an open
/// connection are refused (GOAWAY), the open tunnel keeps working; once it ends the
/// connection is closed. The process keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_listeners_keeps_open_tunnels_and_refuses_new_work() {
    let (ferry, _target) = start_with(Duration::from_secs(600)).await;
    let mut client = ferry.client().await.unwrap();
    let mut t = client.open(PATH, &[], false).await.unwrap();
    assert_eq!(t.status, 200);
    echo(&mut t, b"before").await;

    assert_eq!(
        admin(ferry.admin, "POST", "/drain_listeners").await,
        (200, "OK\n".into())
    );
    assert_eq!(
        admin(ferry.admin, "GET", "/ready").await,
        (503, "DRAINING\n".into())
    );
    // Wait for the GOAWAY to have been sent on the open connection.
    tokio::time::timeout(DEADLINE, async {
        while ferry.stat("http.ingress_http.downstream_cx_drain_close") < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();

    // The open tunnel still relays.
    echo(&mut t, b"during drain").await;
    // A new connection is refused.
    let refused = ferry.client().await;
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );
    assert_eq!(
        ferry.stat("listener.127.0.0.1_0.downstream_cx_refused_draining"),
        1
    );
    // A new request on the open connection is refused.
    match tokio::time::timeout(DEADLINE, client.open(PATH, &[], false)).await {
        Ok(Ok(t2)) => panic!("a request was accepted after GOAWAY: {}", t2.status),
        Ok(Err(_)) => {}
        Err(_) => panic!("the refused request never completed"),
    }
    echo(&mut t, b"still").await;
    assert_eq!(ferry.stat("listener_manager.total_listeners_draining"), 1);

    // The tunnel ends; the drained connection is closed by the server.
    t.finish().await.unwrap();
    assert_eq!(recv_end(&mut t).await, Received::Finished);
    tokio::time::timeout(DEADLINE, client.conn.closed())
        .await
        .expect("the drained connection was not closed");
    tokio::time::timeout(DEADLINE, ferry.state.connections.wait_zero())
        .await
        .unwrap();
    // /drain_listeners does not exit.
    assert!(!ferry.done.is_finished());
    assert_eq!(admin(ferry.admin, "POST", "/quitquitquit").await.0, 200);
    ferry.wait_exit().await;
}

/// A drain that exits (SIGTERM): the server exits as soon as the last tunnel ends, well
/// before the drain time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_exit_waits_for_the_last_tunnel() {
    let (ferry, _target) = start_with(Duration::from_secs(600)).await;
    let mut client = ferry.client().await.unwrap();
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo(&mut t, b"a").await;
    ferry.state.drain_and_exit("test");
    echo(&mut t, b"b").await;
    assert!(ferry.client().await.is_err());
    assert!(!ferry.done.is_finished());
    t.finish().await.unwrap();
    assert_eq!(recv_end(&mut t).await, Received::Finished);
    ferry.wait_exit().await;
}

/// A drain that exits, with a tunnel that never ends: closed when the drain time is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_time_closes_what_is_left() {
    // The drain time must leave room for one echo during the drain even on a loaded
    // machine (300 ms did not, in CI); the assertions below do not depend on its length.
    let drain_time = Duration::from_secs(2);
    let (ferry, _target) = start_with(drain_time).await;
    let mut client = ferry.client().await.unwrap();
    let mut t = client.open(PATH, &[], false).await.unwrap();
    echo(&mut t, b"a").await;
    let started = std::time::Instant::now();
    ferry.state.drain_and_exit("test");
    echo(&mut t, b"b").await;
    // The tunnel is ended by the server (stream finished, or the connection closed).
    let end = recv_end(&mut t).await;
    assert!(
        matches!(end, Received::Finished | Received::Reset(_)),
        "{end:?}"
    );
    assert!(started.elapsed() >= drain_time);
    ferry.wait_exit().await;
}
