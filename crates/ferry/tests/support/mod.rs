//! In-process end-to-end harness: Ferry on port 0, a UDP echo target, a real HTTP/3 client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

pub mod dns;
pub mod tcp;
use ferry::client::{ClientOptions, ClientTunnel, H3Client, Received};
use ferry::server::{Server, ServerState};
use tokio::net::UdpSocket;
use tokio::sync::Notify;

/// Every wait in these tests is for an event, bounded by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn test_cert() -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
    }
}

/// PEM text indented for a YAML block scalar.
pub fn indent(pem: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    pem.lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect::<String>()
}

/// The seed's "terminate" bootstrap with inline test certificates, port 0 everywhere and a
/// STATIC cluster pointing at `target`. `routes` replaces the route list when given.
pub struct BootstrapSpec {
    pub domains: Vec<String>,
    pub routes_yaml: Option<String>,
    pub cluster_yaml: Option<String>,
    pub stream_idle_timeout: Option<String>,
}

impl Default for BootstrapSpec {
    fn default() -> Self {
        BootstrapSpec {
            domains: vec!["*".into()],
            routes_yaml: None,
            cluster_yaml: None,
            stream_idle_timeout: None,
        }
    }
}

pub const TERMINATE_ROUTE: &str = r#"
              - match:
                  connect_matcher: {}
                route:
                  cluster: target
                  upgrade_configs:
                  - upgrade_type: CONNECT-UDP
                    connect_config: {}
"#;

pub fn bootstrap_yaml(cert: &TestCert, target: SocketAddr, spec: &BootstrapSpec) -> String {
    let domains: String = spec
        .domains
        .iter()
        .map(|d| format!("              - \"{d}\"\n"))
        .collect();
    let routes = spec.routes_yaml.as_deref().unwrap_or(TERMINATE_ROUTE);
    let idle = spec
        .stream_idle_timeout
        .as_ref()
        .map(|t| format!("          stream_idle_timeout: {t}\n"))
        .unwrap_or_default();
    let cluster = spec.cluster_yaml.clone().unwrap_or_else(|| {
        format!(
            r#"
  - name: target
    type: STATIC
    load_assignment:
      cluster_name: target
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {}, port_value: {} }}
"#,
            target.ip(),
            target.port()
        )
    });
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: h3_listener
    address:
      socket_address: {{ protocol: UDP, address: 127.0.0.1, port_value: 0 }}
    udp_listener_config:
      quic_options: {{}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.quic
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport
          downstream_tls_context:
            common_tls_context:
              tls_certificates:
              - certificate_chain:
                  inline_string: |
{cert_pem}                private_key:
                  inline_string: |
{key_pem}      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: HTTP3
          stat_prefix: ingress_http
{idle}          route_config:
            name: local_route
            virtual_hosts:
            - name: local_service
              domains:
{domains}              routes:
{routes}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          http3_protocol_options:
            allow_extended_connect: true
  clusters:
{cluster}"#,
        cert_pem = indent(&cert.cert_pem, 20),
        key_pem = indent(&cert.key_pem, 20),
    )
}

/// A UDP target that echoes every datagram and remembers what it saw.
pub struct EchoTarget {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Bytes>>>,
    pub notify: Arc<Notify>,
}

impl EchoTarget {
    pub async fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let (s, n) = (seen.clone(), notify.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((len, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let data = Bytes::copy_from_slice(&buf[..len]);
                s.lock().unwrap().push(data.clone());
                n.notify_waiters();
                let _ = sock.send_to(&data, from).await;
            }
        });
        EchoTarget { addr, seen, notify }
    }

    pub fn seen(&self) -> Vec<Bytes> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait until the target has seen `n` datagrams.
    pub async fn wait_for(&self, n: usize) -> Vec<Bytes> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.notify.notified();
                if self.seen.lock().unwrap().len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("target saw {} datagrams, wanted {n}", self.seen().len()));
        self.seen()
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<ServerState>,
    pub cert: TestCert,
}

impl Proxy {
    pub async fn start(yaml: &str, cert: TestCert) -> Proxy {
        let bootstrap = ferry_config::load_str(yaml, ferry_config::Format::Yaml)
            .unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
        let server = Server::bind(bootstrap).unwrap();
        Self::run(server, cert).await
    }

    /// Start on a fixed port that a stopped proxy may still hold for a moment: retry the
    /// bind until the port is free (bounded by the deadline).
    pub async fn start_when_port_free(yaml: &str, cert: TestCert) -> Proxy {
        let bootstrap = ferry_config::load_str(yaml, ferry_config::Format::Yaml)
            .unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
        let server = tokio::time::timeout(DEADLINE, async {
            loop {
                match Server::bind(bootstrap.clone()) {
                    Ok(s) => return s,
                    Err(e) if e.contains("in use") => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .expect("port never became free");
        Self::run(server, cert).await
    }

    async fn run(server: Server, cert: TestCert) -> Proxy {
        let addr = server.state.listeners[0].local_addr;
        let admin = server.admin_addr().unwrap();
        let state = server.state.clone();
        tokio::spawn(server.run());
        // Wait for readiness (clusters resolved), an event, not a sleep.
        tokio::time::timeout(DEADLINE, async {
            while !state.ready.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("proxy never became ready");
        Proxy {
            addr,
            admin,
            state,
            cert,
        }
    }

    pub async fn client(&self, datagrams: bool) -> H3Client {
        H3Client::connect(
            self.addr,
            &ClientOptions {
                server_name: "localhost".into(),
                ca_pem: Some(self.cert.cert_pem.clone()),
                insecure: false,
                datagrams,
            },
        )
        .await
        .unwrap()
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.state.stats.value(name).unwrap_or(0)
    }

    /// Call `send` (a QUIC datagram the proxy must count) until the stat reaches `value`.
    /// QUIC datagrams may be lost; on loopback one arrives within milliseconds or never, so
    /// a resend after a second of silence does not double-count.
    pub async fn send_until_stat(&self, name: &str, value: u64, mut send: impl FnMut()) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.stat(name) < value {
            send();
            let wait = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.stat(name) < value && tokio::time::Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} = {}, wanted {value}",
                self.stat(name)
            );
        }
        assert_eq!(self.stat(name), value, "{name}");
    }

    /// Wait until a stat reaches at least `value` (where resends may add to it).
    pub async fn wait_stat_at_least(&self, name: &str, value: u64) -> u64 {
        let ok = tokio::time::timeout(DEADLINE, async {
            while self.stat(name) < value {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "{name} = {}, wanted {value}+", self.stat(name));
        self.stat(name)
    }

    /// Wait until a stat reaches `value`.
    pub async fn wait_stat(&self, name: &str, value: u64) {
        let ok = tokio::time::timeout(DEADLINE, async {
            while self.stat(name) != value {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "{name} = {}, wanted {value}", self.stat(name));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.shutdown.trigger();
    }
}

pub async fn start_default() -> (Proxy, EchoTarget) {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let yaml = bootstrap_yaml(&cert, target.addr, &BootstrapSpec::default());
    (Proxy::start(&yaml, cert).await, target)
}

pub const PATH: &str = "/.well-known/masque/udp/foo.lyft.com/80/";

/// Send `payload` as a QUIC datagram until one datagram comes back (datagrams are
/// unreliable: a lost one is resent every 100 ms), bounded by the deadline.
pub async fn echo_until_received(t: &mut ClientTunnel, payload: &[u8]) -> Bytes {
    echo_until_received_enc(t, payload).await.1
}

/// As `echo_until_received`, with the encoding the echo came back in.
pub async fn echo_until_received_enc(
    t: &mut ClientTunnel,
    payload: &[u8],
) -> (ferry::stats::Encoding, Bytes) {
    t.send_datagram(payload).unwrap();
    // Any other payload is the late echo of an earlier resend.
    await_echo(t, payload, |_| true).await
}

/// Wait for the echo of `payload` (already sent as a QUIC datagram), resending it after
/// each 100 ms of silence, bounded by the deadline. Other payloads for which `is_stale`
/// holds (late echoes of earlier resends) are skipped; any other is a panic.
pub async fn await_echo(
    t: &mut ClientTunnel,
    payload: &[u8],
    is_stale: impl Fn(&[u8]) -> bool,
) -> (ferry::stats::Encoding, Bytes) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let echo = tokio::time::timeout(Duration::from_millis(100), async {
            loop {
                match t.recv().await {
                    Received::Udp(enc, b) if &b[..] == payload => return (enc, b),
                    Received::Udp(_, b) if is_stale(&b) => continue,
                    Received::Udp(_, b) => panic!("sent {payload:?}, got {b:?}"),
                    end => panic!("expected a datagram, got {end:?}"),
                }
            }
        })
        .await;
        match echo {
            Ok(got) => return got,
            Err(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no echo within the deadline"
                );
                t.send_datagram(payload).unwrap();
            }
        }
    }
}

/// Send `payload` as a DATAGRAM capsule until one UDP payload comes back (the capsule is
/// reliable, but the echo may return as a QUIC datagram, which is not), bounded by the
/// deadline. The target may see the payload more than once.
pub async fn echo_capsule_until_received(t: &mut ClientTunnel, payload: &[u8]) -> Bytes {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut other = None;
    loop {
        t.send_capsule(0, payload).await.unwrap();
        // Wait for this payload's echo; a late echo of an earlier resend is skipped.
        let echo = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                match t.recv().await {
                    Received::Udp(_, b) if &b[..] == payload => return b,
                    Received::Udp(_, b) => other = Some(b),
                    end => panic!("expected a datagram, got {end:?}"),
                }
            }
        })
        .await;
        match echo {
            Ok(got) => return got,
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "no echo within the deadline (last other payload: {other:?})"
            ),
        }
    }
}

/// Send `payload` as a QUIC datagram every 100 ms until the stream ends (for a target whose
/// ICMP error must end the tunnel; one datagram may be lost), and return how it ended.
pub async fn send_until_end(t: &mut ClientTunnel, payload: &[u8]) -> Received {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let _ = t.send_datagram(payload);
        match tokio::time::timeout(Duration::from_millis(100), t.recv()).await {
            Ok(Received::Udp(..)) => continue,
            Ok(end) => return end,
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "stream did not end within the deadline"
            ),
        }
    }
}

/// A loopback address (UDP or TCP) where nothing listens. The port is below the ephemeral
/// range (32768+ on Linux), so no test socket bound to port 0 can take it in the meantime
/// and swallow what should draw ICMP port unreachable or a refused connection.
pub fn closed_port() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    // Spread concurrent test processes over the range by pid.
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    for _ in 0..1000 {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10_000;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let free =
            std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok();
        if free {
            return addr;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// The next UDP payload, or a panic naming what came instead.
pub async fn recv_udp(t: &mut ClientTunnel) -> (ferry::stats::Encoding, Bytes) {
    match tokio::time::timeout(DEADLINE, t.recv()).await {
        Ok(Received::Udp(enc, b)) => (enc, b),
        Ok(other) => panic!("expected a datagram, got {other:?}"),
        Err(_) => panic!("no datagram within the deadline"),
    }
}

pub async fn recv_end(t: &mut ClientTunnel) -> Received {
    loop {
        match tokio::time::timeout(DEADLINE, t.recv()).await {
            Ok(Received::Udp(..)) => continue,
            Ok(other) => return other,
            Err(_) => panic!("stream did not end within the deadline"),
        }
    }
}

pub fn proxy_status(t: &ClientTunnel) -> String {
    t.headers
        .get("proxy-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// How many IPv4 UDP sockets on this machine are connected to `peer` (from
/// `/proc/net/udp`): the tunnels' sockets to a test's own target, unaffected by the file
/// descriptors other tests in this process open and close meanwhile.
pub fn udp_sockets_connected_to(peer: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = peer else {
        panic!("IPv4 only")
    };
    // The kernel prints the address as the in-memory u32 in hex, and the port in hex.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some(want.as_str()))
        .count()
}
