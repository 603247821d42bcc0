//! Access logs: HCM `access_log[]` (`envoy.access_loggers.file`, `.stdout`, `.stderr`), one
//! line per request, written when the request ends (for a tunnel: when the tunnel ends).
//!
//! Each request task carries a [`RequestRecord`] in a task-local slot. The code that
//! handles the request fills it in with [`note`] (the terminating path notes the upstream,
//! the 2xx and how the tunnel ended; the rejection path notes the refusal; the forwarding
//! path can do the same), and the connection loop formats and queues the line once the
//! request task is done. Nothing here runs per datagram: a tunnel's datagram and byte
//! totals come from its [`TunnelCounters`], which the stat handles update anyway.
//!
//! Lines go through a bounded queue to one writer thread per destination, so a slow disk
//! or a blocked stdout never stalls a tunnel; when the queue is full the line is dropped
//! and counted (`access_log.lines_dropped`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_config::format::{Command, HeaderLookup, Operator, Segment, Template};
use ferry_config::{AccessLog, AccessLogSink, JsonTemplate, LogFormat};
use http::HeaderMap;

use crate::stats::{Counter, Store, TunnelCounters};
use crate::tunnel::End;

/// Lines queued per destination before new lines are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// Envoy's response flags Ferry sets, in Envoy's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// `UH`: no healthy upstream host (no DNS answer, empty cluster).
    NoHealthyUpstream,
    /// `UF`: the upstream socket or connection could not be opened.
    UpstreamConnectionFailure,
    /// `NR`: no route (or no valid CONNECT-UDP target).
    NoRouteFound,
    /// `UC`: the upstream side failed after the tunnel was open (socket error).
    UpstreamConnectionTermination,
    /// `DC`: the client went away (reset the stream or closed the connection).
    DownstreamConnectionTermination,
    /// `SI`: `stream_idle_timeout`.
    StreamIdleTimeout,
    /// `DPE`: a malformed request or capsule from the client.
    DownstreamProtocolError,
    /// `DT`: the tunnel reached `max_stream_duration`.
    DurationTimeout,
    /// `DF`: DNS resolution failed.
    DnsResolutionFailed,
    /// `URX`: a udp_proxy session used all its tunnel attempts (`max_connect_attempts`).
    UpstreamRetryLimitExceeded,
}

impl ResponseFlag {
    const ORDER: [ResponseFlag; 10] = [
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::NoRouteFound,
        ResponseFlag::UpstreamConnectionTermination,
        ResponseFlag::DownstreamConnectionTermination,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::StreamIdleTimeout,
        ResponseFlag::DownstreamProtocolError,
        ResponseFlag::DurationTimeout,
        ResponseFlag::DnsResolutionFailed,
    ];

    pub fn short(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::DurationTimeout => "DT",
            ResponseFlag::DnsResolutionFailed => "DF",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
        }
    }

    pub fn long(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "NoHealthyUpstream",
            ResponseFlag::UpstreamConnectionFailure => "UpstreamConnectionFailure",
            ResponseFlag::NoRouteFound => "NoRouteFound",
            ResponseFlag::UpstreamConnectionTermination => "UpstreamConnectionTermination",
            ResponseFlag::DownstreamConnectionTermination => "DownstreamConnectionTermination",
            ResponseFlag::StreamIdleTimeout => "StreamIdleTimeout",
            ResponseFlag::DownstreamProtocolError => "DownstreamProtocolError",
            ResponseFlag::DurationTimeout => "DurationTimeout",
            ResponseFlag::DnsResolutionFailed => "DnsResolutionFailed",
            ResponseFlag::UpstreamRetryLimitExceeded => "UpstreamRetryLimitExceeded",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The downstream connection a request came on, for its access log line.
#[derive(Debug, Clone, Default)]
pub struct DownstreamConnection {
    /// Envoy's `%PROTOCOL%`: `HTTP/3`, `HTTP/2`, `HTTP/1.1`.
    pub protocol: &'static str,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub id: u64,
    /// SNI.
    pub server_name: Option<String>,
}

/// What is known about one request (for a CONNECT-UDP request: one tunnel), for its access
/// log line and its histograms.
#[derive(Debug)]
pub struct RequestRecord {
    pub start_time: SystemTime,
    pub started: Instant,
    /// `HTTP/3` (Envoy's `%PROTOCOL%`).
    pub protocol: &'static str,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub connection_id: u64,
    pub requested_server_name: Option<String>,
    pub method: String,
    /// `:protocol` of an extended CONNECT.
    pub connect_protocol: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    /// Request headers; kept only when an access log is configured.
    pub request_headers: HeaderMap,
    /// 0 until a response is sent.
    pub response_code: u16,
    pub response_headers: HeaderMap,
    /// When the response headers went out.
    pub responded: Option<Instant>,
    flags: u16,
    /// Envoy's `%RESPONSE_CODE_DETAILS%`: `via_upstream`, or the RFC 9209 error type of a
    /// refusal.
    pub details: Option<String>,
    /// Envoy's `%CONNECTION_TERMINATION_DETAILS%`: how the tunnel ended.
    pub termination: Option<&'static str>,
    pub route_name: Option<String>,
    pub upstream_cluster: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    /// The CONNECT-UDP target (`host:port` from the path).
    pub target: Option<String>,
    /// The tunnel's own datagram and byte totals, once it is open.
    pub tunnel: Option<Arc<TunnelCounters>>,
    pub ended: Option<Instant>,
    /// A udp_proxy session's own fields (a session record, not an HTTP request).
    pub udp: Option<Box<UdpSessionLog>>,
}

/// What a udp_proxy session's access log line shows beyond the common fields (Envoy's
/// `udp.proxy.session` dynamic metadata, filter state and log type).
#[derive(Debug, Clone, Default)]
pub struct UdpSessionLog {
    /// `UdpSessionEnd`, `UdpTunnelUpstreamConnected` or `UdpPeriodic`.
    pub log_type: &'static str,
    pub cluster: String,
    /// From the downstream peer (all its datagrams, buffered or dropped included).
    pub datagrams_received: u64,
    pub bytes_received: u64,
    /// To the downstream peer.
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    /// Failed sends to the downstream peer.
    pub errors_sent: u64,
    /// Tunnel attempts made.
    pub attempts: u32,
    /// The last attempt's response (`propagate_response_headers`): status and headers.
    pub response_headers: Option<(u16, HeaderMap)>,
    /// The trailers that ended it (`propagate_response_trailers`).
    pub response_trailers: Option<HeaderMap>,
}

impl RequestRecord {
    /// A record for a request that just arrived on the HTTP/3 connection `conn`.
    pub fn new(
        req: &http::Request<()>,
        conn: &quinn::Connection,
        listener: SocketAddr,
        keep_headers: bool,
    ) -> Self {
        let server_name = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.server_name);
        let local = conn
            .local_ip()
            .map(|ip| SocketAddr::new(ip, listener.port()))
            .unwrap_or(listener);
        let connection = DownstreamConnection {
            protocol: "HTTP/3",
            remote: Some(conn.remote_address()),
            local: Some(local),
            id: conn.stable_id() as u64,
            server_name,
        };
        Self::from_request(req, connection, keep_headers)
    }

    /// A record for a request that just arrived on any downstream connection (HTTP/2 and
    /// HTTP/1.1 listeners fill `connection` themselves).
    pub fn from_request(
        req: &http::Request<()>,
        connection: DownstreamConnection,
        keep_headers: bool,
    ) -> Self {
        RequestRecord {
            downstream_remote: connection.remote,
            downstream_local: connection.local,
            requested_server_name: connection.server_name,
            method: req.method().as_str().to_owned(),
            connect_protocol: req
                .extensions()
                .get::<h3::ext::Protocol>()
                .map(|p| p.as_str().to_owned()),
            path: req.uri().path_and_query().map(|p| p.as_str().to_owned()),
            authority: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    req.headers()
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                }),
            scheme: req.uri().scheme_str().map(str::to_owned),
            request_headers: if keep_headers {
                req.headers().clone()
            } else {
                HeaderMap::new()
            },
            ..Self::blank(
                SystemTime::now(),
                Instant::now(),
                connection.protocol,
                connection.id,
            )
        }
    }

    /// A record for a udp_proxy session from `peer` to the listener at `local`.
    pub fn udp_session(
        start_time: SystemTime,
        started: Instant,
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        udp: UdpSessionLog,
    ) -> Self {
        RequestRecord {
            downstream_remote: Some(peer),
            downstream_local: Some(local),
            udp: Some(Box::new(udp)),
            ..Self::blank(start_time, started, "", id)
        }
    }

    /// A record with nothing known yet but when it started, its protocol and connection.
    fn blank(start_time: SystemTime, started: Instant, protocol: &'static str, id: u64) -> Self {
        RequestRecord {
            start_time,
            started,
            protocol,
            downstream_remote: None,
            downstream_local: None,
            connection_id: id,
            requested_server_name: None,
            method: String::new(),
            connect_protocol: None,
            path: None,
            authority: None,
            scheme: None,
            request_headers: HeaderMap::new(),
            response_code: 0,
            response_headers: HeaderMap::new(),
            responded: None,
            flags: 0,
            details: None,
            termination: None,
            route_name: None,
            upstream_cluster: None,
            upstream_host: None,
            upstream_local: None,
            target: None,
            tunnel: None,
            ended: None,
            udp: None,
        }
    }

    pub fn set_flag(&mut self, flag: ResponseFlag) {
        self.flags |= flag.bit();
    }

    pub fn has_flag(&self, flag: ResponseFlag) -> bool {
        self.flags & flag.bit() != 0
    }

    /// The response headers went out.
    pub fn responded(&mut self, status: u16, headers: &HeaderMap) {
        self.response_code = status;
        self.response_headers = headers.clone();
        self.responded = Some(Instant::now());
    }

    /// The request was refused with `rejection` (status, `proxy-status`).
    pub fn rejected(&mut self, rejection: &ferry_proto::request::Rejection) {
        let mut headers = HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&rejection.proxy_status()) {
            headers.insert("proxy-status", v);
        }
        self.responded(rejection.status, &headers);
        self.details = Some(rejection.error.unwrap_or("local_reply").to_owned());
        let flag = match (rejection.status, rejection.error) {
            (404, _) => Some(ResponseFlag::NoRouteFound),
            (400, _) => Some(ResponseFlag::DownstreamProtocolError),
            (503, Some("dns_error")) => Some(ResponseFlag::DnsResolutionFailed),
            (503, Some("destination_unavailable")) => Some(ResponseFlag::NoHealthyUpstream),
            (502 | 504, _) => Some(ResponseFlag::UpstreamConnectionFailure),
            _ => None,
        };
        if let Some(f) = flag {
            self.set_flag(f);
        }
    }

    /// A terminating tunnel is open: its upstream socket and its counters.
    pub fn tunnel_opened(
        &mut self,
        cluster: &str,
        host: SocketAddr,
        local: Option<SocketAddr>,
        counters: &Arc<TunnelCounters>,
    ) {
        self.upstream_cluster = Some(cluster.to_owned());
        self.upstream_host = Some(host);
        self.upstream_local = local;
        self.tunnel = Some(counters.clone());
        self.details = Some("via_upstream".into());
    }

    /// How a tunnel ended.
    pub fn tunnel_ended(&mut self, end: End) {
        use crate::stats::ResetReason;
        let (details, flag) = match end {
            End::ClientFinished => ("client_finished", None),
            End::ClientGone => (
                "client_gone",
                Some(ResponseFlag::DownstreamConnectionTermination),
            ),
            End::Shutdown => ("shutdown", None),
            End::NextHopFinished => ("next_hop_finished", None),
            End::NextHopGone => (
                "next_hop_gone",
                Some(ResponseFlag::UpstreamConnectionTermination),
            ),
            End::Reset(r) => (
                r.name(),
                match r {
                    ResetReason::IdleTimeout => Some(ResponseFlag::StreamIdleTimeout),
                    ResetReason::MaxDuration => Some(ResponseFlag::DurationTimeout),
                    ResetReason::SocketError => Some(ResponseFlag::UpstreamConnectionTermination),
                    ResetReason::MalformedCapsule | ResetReason::CapsuleTooLarge => {
                        Some(ResponseFlag::DownstreamProtocolError)
                    }
                },
            ),
        };
        self.termination = Some(details);
        if let Some(f) = flag {
            self.set_flag(f);
        }
    }

    /// Time from the request to its response headers (a tunnel's setup time).
    pub fn setup_time(&self) -> Option<Duration> {
        self.responded
            .map(|r| r.saturating_duration_since(self.started))
    }

    fn duration(&self) -> Duration {
        self.ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.started)
    }

    fn counter(&self, pick: impl Fn(&TunnelCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.tunnel
            .as_deref()
            .map(|t| TunnelCounters::get(pick(t)))
            .unwrap_or(0)
    }

    /// The CONNECT-UDP target, from the path (`host:port`), if the request was one.
    fn connect_udp_target(&self) -> Option<String> {
        if let Some(t) = &self.target {
            return Some(t.clone());
        }
        let head = ferry_proto::request::RequestHead {
            method: &self.method,
            protocol: self.connect_protocol.as_deref(),
            path: self.path.as_deref(),
            authority: self.authority.as_deref(),
            scheme: self.scheme.as_deref(),
            capsule_protocol: None,
        };
        if !ferry_proto::request::is_connect_udp(&head) {
            return None;
        }
        ferry_proto::request::validate_connect_udp(&head)
            .ok()
            .map(|t| t.authority())
    }
}

tokio::task_local! {
    static CURRENT: Arc<Mutex<RequestRecord>>;
}

/// Run `fut` with `record` as the current request's record.
/// A plain `fn` (not `async fn`): an async wrapper would hold the future twice, which cost
/// about 9 KiB per open tunnel (measured with massif by the benchmark work).
pub fn scope<F: std::future::Future>(
    record: Arc<Mutex<RequestRecord>>,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<Arc<Mutex<RequestRecord>>, F> {
    CURRENT.scope(record, fut)
}

/// Update the current request's record; does nothing outside [`scope`].
pub fn note(f: impl FnOnce(&mut RequestRecord)) {
    let _ = CURRENT.try_with(|r| {
        let mut r = r.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut r);
    });
}

/// The request task is done: record the tunnel's histograms and cluster byte totals, and
/// write its access log lines.
pub fn finish(stats: &crate::stats::HttpStats, logs: &AccessLogs, record: &Mutex<RequestRecord>) {
    let mut r = record.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    r.ended = Some(now);
    if let (Some(t), Some(responded)) = (r.tunnel.clone(), r.responded) {
        if (200..300).contains(&r.response_code) {
            let cu = &stats.connect_udp;
            cu.tunnel_setup_time_us
                .record_us(responded.saturating_duration_since(r.started));
            cu.tunnel_duration_ms
                .record_ms(now.saturating_duration_since(responded));
        }
        if let Some(cluster) = &r.upstream_cluster {
            let c = stats.clusters.get(cluster);
            c.upstream_cx_tx_bytes_total
                .add(TunnelCounters::get(&t.rx_bytes));
            c.upstream_cx_rx_bytes_total
                .add(TunnelCounters::get(&t.tx_bytes));
        }
    }
    if !logs.is_empty() {
        logs.log(&r);
    }
}

// ---------------------------------------------------------------------------------------
// Formatting

/// A value a command produced: absent (`-` in text, `null` in JSON), text or a number.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    None,
    Text(String),
    Num(u64),
    Json(serde_json::Value),
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn request_header(r: &RequestRecord, name: &str) -> Option<String> {
    match name {
        ":method" => Some(r.method.clone()),
        ":path" => r.path.clone(),
        // Envoy rewrites the Host of a CONNECT-UDP request to the target.
        ":authority" | "host" => r.connect_udp_target().or_else(|| r.authority.clone()),
        ":scheme" => r.scheme.clone(),
        ":protocol" => r.connect_protocol.clone(),
        other => header(&r.request_headers, other),
    }
}

fn response_header(r: &RequestRecord, name: &str) -> Option<String> {
    match name {
        ":status" if r.response_code != 0 => Some(r.response_code.to_string()),
        other => header(&r.response_headers, other),
    }
}

fn lookup(l: &HeaderLookup, get: impl Fn(&str) -> Option<String>) -> Option<String> {
    get(&l.name).or_else(|| l.alternative.as_deref().and_then(&get))
}

fn hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    })
}

fn metadata(r: &RequestRecord) -> Option<serde_json::Map<String, serde_json::Value>> {
    let target = r.connect_udp_target()?;
    let mut m = serde_json::Map::new();
    m.insert("target".into(), target.into());
    if let Some(t) = r.tunnel.as_deref() {
        let g = TunnelCounters::get;
        m.insert("datagrams_received".into(), g(&t.rx_datagrams).into());
        m.insert("datagrams_sent".into(), g(&t.tx_datagrams).into());
        m.insert("bytes_received".into(), g(&t.rx_bytes).into());
        m.insert("bytes_sent".into(), g(&t.tx_bytes).into());
        m.insert("datagrams_dropped".into(), g(&t.dropped).into());
    }
    if let Some(t) = r.termination {
        m.insert("close_reason".into(), t.into());
    }
    if let (Some(s), Some(_)) = (r.setup_time(), &r.tunnel) {
        m.insert(
            "setup_time_us".into(),
            u64::try_from(s.as_micros()).unwrap_or(u64::MAX).into(),
        );
    }
    if let Some(c) = &r.upstream_cluster {
        m.insert("cluster".into(), c.clone().into());
    }
    Some(m)
}

/// Envoy's `udp.proxy.session` dynamic metadata of a udp_proxy session.
fn udp_metadata(r: &RequestRecord) -> Option<serde_json::Map<String, serde_json::Value>> {
    let u = r.udp.as_deref()?;
    let mut m = serde_json::Map::new();
    m.insert("cluster_name".into(), u.cluster.clone().into());
    m.insert("bytes_sent".into(), u.bytes_sent.into());
    m.insert("bytes_received".into(), u.bytes_received.into());
    m.insert("errors_sent".into(), u.errors_sent.into());
    m.insert("datagrams_sent".into(), u.datagrams_sent.into());
    m.insert("datagrams_received".into(), u.datagrams_received.into());
    Some(m)
}

/// Envoy's `envoy.udp_proxy.propagate_response_headers` filter state, as its typed JSON
/// (an `envoy.config.core.v3.HeaderMap`, `:status` first).
fn response_headers_state(r: &RequestRecord) -> Option<serde_json::Value> {
    let (status, headers) = r.udp.as_deref()?.response_headers.as_ref()?;
    let status = serde_json::json!({"key": ":status", "value": status.to_string()});
    Some(header_map_state(Some(status), headers))
}

/// Envoy's `envoy.udp_proxy.propagate_response_trailers` filter state: the same shape,
/// without a status.
fn response_trailers_state(r: &RequestRecord) -> Option<serde_json::Value> {
    let trailers = r.udp.as_deref()?.response_trailers.as_ref()?;
    Some(header_map_state(None, trailers))
}

/// `{"headers": [{"key": ..., "value": ...}, ...]}` (`first`, then `headers` in order).
fn header_map_state(first: Option<serde_json::Value>, headers: &HeaderMap) -> serde_json::Value {
    let mut list: Vec<serde_json::Value> = first.into_iter().collect();
    for (k, v) in headers {
        list.push(serde_json::json!({
            "key": k.as_str(),
            "value": String::from_utf8_lossy(v.as_bytes()),
        }));
    }
    serde_json::json!({ "headers": list })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn evaluate(op: &Operator, r: &RequestRecord) -> Val {
    let text = |v: Option<String>| v.map_or(Val::None, Val::Text);
    let addr = |a: Option<SocketAddr>| text(a.map(|a| a.to_string()));
    match op {
        Operator::StartTime(fmt) => Val::Text(strftime(
            fmt.as_deref().unwrap_or("%Y-%m-%dT%H:%M:%E3SZ"),
            r.start_time,
        )),
        Operator::Req(l) => text(lookup(l, |n| request_header(r, n))),
        Operator::Resp(l) => text(lookup(l, |n| response_header(r, n))),
        Operator::ResponseCode => Val::Num(u64::from(r.response_code)),
        Operator::ResponseCodeDetails => text(r.details.clone()),
        Operator::ResponseFlags | Operator::ResponseFlagsLong => {
            let long = matches!(op, Operator::ResponseFlagsLong);
            let set: Vec<&str> = ResponseFlag::ORDER
                .iter()
                .filter(|f| r.has_flag(**f))
                .map(|f| if long { f.long() } else { f.short() })
                .collect();
            if set.is_empty() {
                Val::Text("-".into())
            } else {
                Val::Text(set.join(","))
            }
        }
        Operator::ConnectionTerminationDetails => text(r.termination.map(str::to_owned)),
        Operator::Duration => Val::Num(ms(r.duration())),
        Operator::ResponseDuration => r.setup_time().map_or(Val::None, |d| Val::Num(ms(d))),
        Operator::BytesReceived => match r.udp.as_deref() {
            Some(u) => Val::Num(u.bytes_received),
            None => Val::Num(r.counter(|t| &t.rx_bytes)),
        },
        Operator::BytesSent => match r.udp.as_deref() {
            Some(u) => Val::Num(u.bytes_sent),
            None => Val::Num(r.counter(|t| &t.tx_bytes)),
        },
        Operator::Protocol if r.protocol.is_empty() => Val::None,
        Operator::Protocol => Val::Text(r.protocol.into()),
        Operator::DownstreamRemoteAddress => addr(r.downstream_remote),
        Operator::DownstreamRemoteAddressWithoutPort => {
            text(r.downstream_remote.map(|a| a.ip().to_string()))
        }
        Operator::DownstreamRemotePort => r
            .downstream_remote
            .map_or(Val::None, |a| Val::Num(u64::from(a.port()))),
        Operator::DownstreamLocalAddress => addr(r.downstream_local),
        Operator::DownstreamLocalAddressWithoutPort => {
            text(r.downstream_local.map(|a| a.ip().to_string()))
        }
        Operator::DownstreamLocalPort => r
            .downstream_local
            .map_or(Val::None, |a| Val::Num(u64::from(a.port()))),
        Operator::UpstreamHost => addr(r.upstream_host),
        Operator::UpstreamCluster => text(r.upstream_cluster.clone()),
        Operator::UpstreamLocalAddress => addr(r.upstream_local),
        Operator::RouteName => text(r.route_name.clone()),
        Operator::RequestedServerName => text(r.requested_server_name.clone()),
        Operator::ConnectionId => Val::Num(r.connection_id),
        Operator::Hostname => Val::Text(hostname().to_owned()),
        Operator::FilterState { key, .. } => {
            let [headers, trailers] = ferry_config::format::UDP_FILTER_STATE_KEYS;
            let state = if key == headers {
                response_headers_state(r)
            } else if key == trailers {
                response_trailers_state(r)
            } else {
                None
            };
            state.map_or(Val::None, Val::Json)
        }
        Operator::UpstreamRequestAttemptCount => r
            .udp
            .as_deref()
            .map_or(Val::None, |u| Val::Num(u64::from(u.attempts))),
        Operator::AccessLogType => Val::Text(
            r.udp
                .as_deref()
                .map_or("DownstreamEnd", |u| u.log_type)
                .to_owned(),
        ),
        Operator::DynamicMetadata { namespace, path } => {
            let m = if namespace == ferry_config::format::UDP_SESSION_METADATA_NAMESPACE {
                udp_metadata(r)
            } else {
                metadata(r)
            };
            let Some(m) = m else {
                return Val::None;
            };
            match path.first() {
                None => Val::Json(serde_json::Value::Object(m)),
                Some(key) => match m.get(key) {
                    Some(serde_json::Value::String(s)) => Val::Text(s.clone()),
                    Some(serde_json::Value::Number(n)) => n.as_u64().map_or(Val::None, Val::Num),
                    Some(v) => Val::Json(v.clone()),
                    None => Val::None,
                },
            }
        }
    }
}

fn truncate(mut s: String, max: Option<usize>) -> String {
    if let Some(max) = max {
        if s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
    }
    s
}

fn val_text(v: Val) -> Option<String> {
    match v {
        Val::None => None,
        Val::Text(s) => Some(s),
        Val::Num(n) => Some(n.to_string()),
        Val::Json(j) => Some(j.to_string()),
    }
}

/// A text format: unavailable values print as `-` (or nothing with `omit_empty_values`).
pub fn format_text(t: &Template, r: &RequestRecord, omit_empty: bool) -> String {
    let mut out = String::new();
    for seg in &t.segments {
        match seg {
            Segment::Literal(s) => out.push_str(s),
            Segment::Command(Command { operator, max_len }) => {
                match val_text(evaluate(operator, r)) {
                    Some(s) => out.push_str(&truncate(s, *max_len)),
                    None if omit_empty => {}
                    None => out.push('-'),
                }
            }
        }
    }
    out
}

/// A JSON value of a format string: a lone command keeps its type (a number stays a
/// number); anything else is a string; nothing available is `null`.
fn format_json_value(t: &Template, r: &RequestRecord) -> serde_json::Value {
    use serde_json::Value;
    if let [Segment::Command(Command { operator, max_len })] = t.segments.as_slice() {
        return match evaluate(operator, r) {
            Val::None => Value::Null,
            Val::Num(n) if max_len.is_none() => Value::from(n),
            Val::Json(j) if max_len.is_none() => j,
            v => val_text(v).map_or(Value::Null, |s| Value::String(truncate(s, *max_len))),
        };
    }
    Value::String(format_text(t, r, false))
}

fn json_object(
    fields: &[(String, JsonTemplate)],
    r: &RequestRecord,
    omit_empty: bool,
) -> serde_json::Value {
    use serde_json::Value;
    let mut sorted = BTreeMap::new();
    for (k, v) in fields {
        let value = match v {
            JsonTemplate::Format(t) => format_json_value(t, r),
            JsonTemplate::Number(n) => {
                if n.fract() == 0.0 && n.abs() < 9.0e15 {
                    Value::from(*n as i64)
                } else {
                    serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
                }
            }
            JsonTemplate::Bool(b) => Value::Bool(*b),
            JsonTemplate::Null => Value::Null,
            JsonTemplate::Object(inner) => json_object(inner, r, omit_empty),
        };
        let empty = match &value {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        if omit_empty && empty {
            continue;
        }
        sorted.insert(k.clone(), value);
    }
    Value::Object(sorted.into_iter().collect())
}

/// One log line as `format` says (JSON lines end with a newline; text lines as written).
pub fn format_line(format: &LogFormat, r: &RequestRecord) -> String {
    match format {
        LogFormat::Text {
            template,
            omit_empty_values,
        } => format_text(template, r, *omit_empty_values),
        LogFormat::Json {
            fields,
            omit_empty_values,
        } => {
            let mut s = json_object(fields, r, *omit_empty_values).to_string();
            s.push('\n');
            s
        }
    }
}

// ---------------------------------------------------------------------------------------
// strftime, enough of it for Envoy's START_TIME formats

/// Days since 1970-01-01 -> (year, month 1..=12, day 1..=31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Format `t` (UTC) with strftime specifiers, plus Envoy's `%f`/`%Nf` (fraction of a
/// second, N digits, default 9) and `%ENS` (seconds with N fractional digits).
pub fn strftime(fmt: &str, t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let nanos = since.subsec_nanos();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let weekday = days.rem_euclid(7) as usize;
    let yday = days - {
        // days of Jan 1 of year y
        let yy = y - 1;
        let leaps = |x: i64| x.div_euclid(4) - x.div_euclid(100) + x.div_euclid(400);
        365 * (yy - 1969) + leaps(yy) - leaps(1969)
    } + 1;
    let frac = |n: usize| {
        let n = n.clamp(1, 9);
        let v = nanos / 10u32.pow(9 - n as u32);
        format!("{v:0n$}")
    };
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        let e = chars.peek() == Some(&'E');
        if e {
            chars.next();
        }
        while let Some(dc) = chars.peek().filter(|c| c.is_ascii_digit()) {
            digits.push(*dc);
            chars.next();
        }
        let n: Option<usize> = digits.parse().ok();
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match spec {
            'Y' => write!(out, "{y:04}"),
            'y' => write!(out, "{:02}", y.rem_euclid(100)),
            'm' => write!(out, "{mo:02}"),
            'd' => write!(out, "{d:02}"),
            'e' => write!(out, "{d:2}"),
            'H' => write!(out, "{h:02}"),
            'M' => write!(out, "{mi:02}"),
            'S' if e => write!(out, "{s:02}.{}", frac(n.unwrap_or(6))),
            'S' => write!(out, "{s:02}"),
            'f' => write!(out, "{}", frac(n.unwrap_or(9))),
            's' => write!(out, "{secs}"),
            'j' => write!(out, "{yday:03}"),
            'F' => write!(out, "{y:04}-{mo:02}-{d:02}"),
            'T' => write!(out, "{h:02}:{mi:02}:{s:02}"),
            'z' => write!(out, "+0000"),
            'Z' => write!(out, "UTC"),
            'b' | 'h' => write!(out, "{}", &MONTHS[(mo - 1) as usize][..3]),
            'B' => write!(out, "{}", MONTHS[(mo - 1) as usize]),
            'a' => write!(out, "{}", &DAYS[weekday][..3]),
            'A' => write!(out, "{}", DAYS[weekday]),
            'n' => writeln!(out),
            't' => write!(out, "\t"),
            '%' => write!(out, "%"),
            other => write!(out, "%{}{digits}{other}", if e { "E" } else { "" }),
        };
    }
    out
}

// ---------------------------------------------------------------------------------------
// Writers

/// One destination's queue and writer thread.
struct Writer {
    tx: SyncSender<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The open access log destinations of a server, shared by its listeners; one writer
/// thread per file (and one for stdout, one for stderr).
pub struct Destinations {
    writers: Mutex<HashMap<AccessLogSink, Writer>>,
    stop: Arc<AtomicBool>,
    stats: WriterStats,
}

#[derive(Clone)]
struct WriterStats {
    lines_dropped: Counter,
    write_buffered: Counter,
    write_completed: Counter,
    write_failed: Counter,
}

impl Destinations {
    pub fn new(store: &Store) -> Arc<Self> {
        Arc::new(Destinations {
            writers: Mutex::new(HashMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            stats: WriterStats {
                lines_dropped: store.counter("access_log.lines_dropped"),
                write_buffered: store.counter("filesystem.write_buffered"),
                write_completed: store.counter("filesystem.write_completed"),
                write_failed: store.counter("filesystem.write_failed"),
            },
        })
    }

    /// The queue of `sink`, opening it (and starting its writer) the first time.
    fn queue(&self, sink: &AccessLogSink) -> Result<SyncSender<String>, String> {
        let mut w = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(writer) = w.get(sink) {
            return Ok(writer.tx.clone());
        }
        let out: Box<dyn std::io::Write + Send> = match sink {
            AccessLogSink::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("access log `{path}`: {e}"))?,
            ),
            AccessLogSink::Stdout => Box::new(std::io::stdout()),
            AccessLogSink::Stderr => Box::new(std::io::stderr()),
        };
        let (tx, rx) = sync_channel(QUEUE_LINES);
        let stop = self.stop.clone();
        let stats = self.stats.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-access-log".into())
            .spawn(move || write_loop(rx, out, &stop, &stats))
            .map_err(|e| format!("access log writer thread: {e}"))?;
        w.insert(
            sink.clone(),
            Writer {
                tx: tx.clone(),
                thread: Some(thread),
            },
        );
        Ok(tx)
    }

    /// Write out what is queued and stop the writers (at exit). Waits at most `deadline`.
    pub fn close(&self, deadline: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let threads: Vec<_> = self
            .writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
            .filter_map(|w| w.thread.take())
            .collect();
        let until = Instant::now() + deadline;
        for t in threads {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn write_loop(
    rx: Receiver<String>,
    mut out: Box<dyn std::io::Write + Send>,
    stop: &AtomicBool,
    stats: &WriterStats,
) {
    let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let mut ok = buf.write_all(line.as_bytes()).is_ok();
                // Batch what is already queued, then flush: a line is on disk as soon as
                // the queue is empty.
                while let Ok(line) = rx.try_recv() {
                    ok &= buf.write_all(line.as_bytes()).is_ok();
                }
                ok &= buf.flush().is_ok();
                if ok {
                    stats.write_completed.inc();
                } else {
                    stats.write_failed.inc();
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = buf.flush();
}

/// The access logs of one HTTP connection manager.
#[derive(Clone, Default)]
pub struct AccessLogs {
    logs: Arc<Vec<(LogFormat, SyncSender<String>)>>,
    stats: Option<WriterStats>,
}

impl AccessLogs {
    /// Open the destinations of `configs` (at start-up: an unwritable file is an error).
    pub fn open(configs: &[AccessLog], destinations: &Destinations) -> Result<Self, String> {
        let mut logs = Vec::with_capacity(configs.len());
        for c in configs {
            logs.push((c.format.clone(), destinations.queue(&c.sink)?));
        }
        Ok(AccessLogs {
            logs: Arc::new(logs),
            stats: Some(destinations.stats.clone()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }

    /// Format and queue one line per configured log.
    pub fn log(&self, r: &RequestRecord) {
        for (format, tx) in self.logs.iter() {
            let line = format_line(format, r);
            match tx.try_send(line) {
                Ok(()) => {
                    if let Some(s) = &self.stats {
                        s.write_buffered.inc();
                    }
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    if let Some(s) = &self.stats {
                        s.lines_dropped.inc();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_config::format::parse;

    fn record() -> RequestRecord {
        RequestRecord {
            downstream_remote: Some("127.0.0.1:54947".parse().unwrap()),
            downstream_local: Some("127.0.0.1:4433".parse().unwrap()),
            requested_server_name: Some("localhost".into()),
            method: "CONNECT".into(),
            connect_protocol: Some("connect-udp".into()),
            path: Some("/.well-known/masque/udp/foo.lyft.com/80/".into()),
            authority: Some("proxy:4433".into()),
            scheme: Some("https".into()),
            ..RequestRecord::blank(
                UNIX_EPOCH + Duration::from_millis(1_795_883_000_637),
                Instant::now(),
                "HTTP/3",
                7,
            )
        }
    }

    #[test]
    fn start_time_formats() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_883_000_637);
        assert_eq!(
            strftime("%Y-%m-%dT%H:%M:%E3SZ", t),
            "2026-11-28T16:23:20.637Z"
        );
        assert_eq!(strftime("%s.%3f", t), "1795883000.637");
        assert_eq!(
            strftime("%F %T %z %Z %j %a %b %%", t),
            "2026-11-28 16:23:20 +0000 UTC 332 Sat Nov %"
        );
        assert_eq!(strftime("%f", UNIX_EPOCH), "000000000");
        assert_eq!(
            strftime("%Y-%m-%d", UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29"
        );
    }

    #[test]
    fn text_lines() {
        let mut r = record();
        let t = parse("%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:AUTHORITY)% %REQ(USER-AGENT)% %UPSTREAM_HOST% %DYNAMIC_METADATA(ferry.connect_udp:target)% %REQ(:PATH):9%").unwrap();
        assert_eq!(
            format_text(&t, &r, false),
            "0 - foo.lyft.com:80 - - foo.lyft.com:80 /.well-kn"
        );
        let counters = Arc::new(TunnelCounters::default());
        counters.rx_datagrams.store(3, Ordering::Relaxed);
        counters.rx_bytes.store(30, Ordering::Relaxed);
        counters.dropped.store(1, Ordering::Relaxed);
        r.tunnel_opened("target", "127.0.0.1:9000".parse().unwrap(), None, &counters);
        r.responded(200, &HeaderMap::new());
        r.tunnel_ended(End::Reset(crate::stats::ResetReason::IdleTimeout));
        let t = parse("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG% %BYTES_RECEIVED% %BYTES_SENT% %CONNECTION_TERMINATION_DETAILS% %UPSTREAM_HOST% %UPSTREAM_LOCAL_ADDRESS% %DYNAMIC_METADATA(ferry.connect_udp:datagrams_received)%/%DYNAMIC_METADATA(ferry.connect_udp:datagrams_dropped)%").unwrap();
        assert_eq!(
            format_text(&t, &r, false),
            "200 SI StreamIdleTimeout 30 0 idle_timeout 127.0.0.1:9000 - 3/1"
        );
        assert_eq!(
            format_text(&parse("[%UPSTREAM_LOCAL_ADDRESS%]").unwrap(), &r, true),
            "[]"
        );
    }

    #[test]
    fn json_lines_keep_types() {
        let mut r = record();
        r.rejected(&ferry_proto::request::Rejection::new(
            404,
            Some("destination_not_found"),
            "no route",
        ));
        let fields = vec![
            (
                "code".to_string(),
                JsonTemplate::Format(parse("%RESPONSE_CODE%").unwrap()),
            ),
            (
                "mixed".to_string(),
                JsonTemplate::Format(parse("code=%RESPONSE_CODE%").unwrap()),
            ),
            (
                "up".to_string(),
                JsonTemplate::Format(parse("%UPSTREAM_HOST%").unwrap()),
            ),
            (
                "flags".to_string(),
                JsonTemplate::Format(parse("%RESPONSE_FLAGS%").unwrap()),
            ),
            ("n".to_string(), JsonTemplate::Number(5.0)),
            (
                "nested".to_string(),
                JsonTemplate::Object(vec![(
                    "ps".to_string(),
                    JsonTemplate::Format(parse("%RESP(PROXY-STATUS)%").unwrap()),
                )]),
            ),
            (
                "meta".to_string(),
                JsonTemplate::Format(parse("%DYNAMIC_METADATA(ferry.connect_udp)%").unwrap()),
            ),
        ];
        let line = format_line(
            &LogFormat::Json {
                fields: fields.clone(),
                omit_empty_values: false,
            },
            &r,
        );
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["code"], 404);
        assert_eq!(v["mixed"], "code=404");
        assert_eq!(v["up"], serde_json::Value::Null);
        assert_eq!(v["flags"], "NR");
        assert_eq!(v["n"], 5);
        assert!(v["nested"]["ps"]
            .as_str()
            .unwrap()
            .contains("destination_not_found"));
        assert_eq!(v["meta"]["target"], "foo.lyft.com:80");
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let line = format_line(
            &LogFormat::Json {
                fields,
                omit_empty_values: true,
            },
            &r,
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("up").is_none());
    }
}
