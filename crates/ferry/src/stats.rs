//! Counters, gauges and histograms, kept from the start and published by the admin endpoint.
//!
//! Names follow Envoy where Envoy has the stat (`http.<stat_prefix>.downstream_rq_2xx`,
//! `downstream_cx_total`, `listener.<address>.downstream_cx_total`,
//! `cluster.<name>.upstream_cx_total`, ...). CONNECT-UDP stats, which Envoy lacks, live under
//! `http.<stat_prefix>.connect_udp.`. A handle (`Counter`, `Gauge`, `Histogram`) is resolved
//! once, when a listener is built; the per-datagram path only does relaxed atomic adds.
//! Histograms are recorded per tunnel or per connection, never per datagram.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A monotonically increasing counter.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct GaugeInner {
    value: AtomicI64,
    /// Written at least once (Envoy's `usedonly` shows a gauge that went back to 0).
    used: AtomicBool,
}

/// A value that goes up and down (active connections, active tunnels).
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<GaugeInner>);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.value.fetch_add(1, Ordering::Relaxed);
        self.0.used.store(true, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.value.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.value.store(v, Ordering::Relaxed);
        self.0.used.store(true, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.value.load(Ordering::Relaxed)
    }
    pub fn used(&self) -> bool {
        self.0.used.load(Ordering::Relaxed)
    }
}

/// Decrements a gauge when dropped: an active-count that cannot leak on an early return.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---------------------------------------------------------------------------------------
// Histograms

/// Log-linear buckets with two significant digits, as Envoy's circllhist: a value
/// `m * 10^e` (`m` in 10..=99) falls in `[m * 10^e, (m + 1) * 10^e)`. Values are integers
/// (milliseconds or microseconds), so `e` runs from -1 (values 1..=9, exact) to 18.
const EXPONENTS: usize = 20;
const LOG_BUCKETS: usize = 1 + EXPONENTS * 90;

/// The bucket bounds Envoy's `/stats/prometheus` uses by default.
pub const PROMETHEUS_BOUNDS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The quantiles Envoy's `/stats` prints, in percent.
pub const SUPPORTED_QUANTILES: [f64; 10] =
    [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

fn log_bucket(v: u64) -> usize {
    if v == 0 {
        return 0;
    }
    let digits = v.ilog10() as usize; // 0 for 1..=9
    let (m, e1) = if digits == 0 {
        (v * 10, 0) // e = -1
    } else {
        (v / 10u64.pow(digits as u32 - 1), digits) // e = digits - 1
    };
    1 + e1 * 90 + (m as usize - 10)
}

/// `(lower bound, width)` of a log bucket.
fn log_bucket_range(i: usize) -> (f64, f64) {
    if i == 0 {
        return (0.0, 0.0);
    }
    let e1 = (i - 1) / 90;
    let m = ((i - 1) % 90 + 10) as f64;
    let scale = 10f64.powi(e1 as i32 - 1);
    (m * scale, scale)
}

fn prometheus_slot(v: u64) -> usize {
    PROMETHEUS_BOUNDS
        .iter()
        .position(|&b| v as f64 <= b)
        .unwrap_or(PROMETHEUS_BOUNDS.len())
}

/// Non-empty log buckets: `(bucket index, count)`, by index.
type Sparse = Vec<(usize, u64)>;

#[derive(Debug, Default)]
struct Interval {
    /// The cumulative counts at the last flush.
    at_flush: Sparse,
    /// What was recorded between the last two flushes.
    last: Sparse,
}

#[derive(Debug)]
struct HistogramInner {
    buckets: Box<[AtomicU64]>,
    /// Disjoint counts per Prometheus bound (the last slot is `+Inf`).
    prometheus: [AtomicU64; PROMETHEUS_BOUNDS.len() + 1],
    count: AtomicU64,
    sum: AtomicU64,
    interval: Mutex<Interval>,
}

/// A distribution of integer values (durations in ms or µs). Recording is lock-free.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramInner>);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(Arc::new(HistogramInner {
            buckets: (0..LOG_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            prometheus: Default::default(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            interval: Mutex::new(Interval::default()),
        }))
    }
}

/// Quantiles of one histogram: `None` where nothing was recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSummary {
    pub interval: Option<Vec<f64>>,
    pub cumulative: Option<Vec<f64>>,
    /// Cumulative counts per [`PROMETHEUS_BOUNDS`] entry, then `+Inf`.
    pub prometheus_buckets: Vec<u64>,
    pub count: u64,
    pub sum: u64,
}

impl Histogram {
    pub fn record(&self, v: u64) {
        let h = &self.0;
        if let Some(b) = h.buckets.get(log_bucket(v)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(b) = h.prometheus.get(prometheus_slot(v)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        h.sum.fetch_add(v, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_ms(&self, d: Duration) {
        self.record(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }

    pub fn record_us(&self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    fn sparse(&self) -> Sparse {
        self.0
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let n = b.load(Ordering::Relaxed);
                (n > 0).then_some((i, n))
            })
            .collect()
    }

    /// Start a new interval (Envoy's stats flush): what was recorded since the previous
    /// flush becomes the "interval" distribution.
    pub fn flush(&self) {
        let now = self.sparse();
        let mut iv = self
            .0
            .interval
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before: HashMap<usize, u64> = iv.at_flush.iter().copied().collect();
        iv.last = now
            .iter()
            .filter_map(|&(i, n)| {
                let d = n.saturating_sub(before.get(&i).copied().unwrap_or(0));
                (d > 0).then_some((i, d))
            })
            .collect();
        iv.at_flush = now;
    }

    pub fn summary(&self) -> HistogramSummary {
        let cumulative = self.sparse();
        let interval = self
            .0
            .interval
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last
            .clone();
        let mut running = 0;
        let prometheus_buckets = self
            .0
            .prometheus
            .iter()
            .map(|b| {
                running += b.load(Ordering::Relaxed);
                running
            })
            .collect();
        HistogramSummary {
            interval: quantiles(&interval),
            cumulative: quantiles(&cumulative),
            prometheus_buckets,
            count: self.count(),
            sum: self.0.sum.load(Ordering::Relaxed),
        }
    }
}

/// The [`SUPPORTED_QUANTILES`] of a distribution, or `None` when it is empty. Values in a
/// bucket are taken as spread evenly over it (a single value reads as the bucket's middle,
/// as in Envoy).
fn quantiles(buckets: &[(usize, u64)]) -> Option<Vec<f64>> {
    let total: u64 = buckets.iter().map(|&(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let out = SUPPORTED_QUANTILES
        .iter()
        .map(|q| {
            let rank = q / 100.0 * (total - 1) as f64;
            let mut before = 0u64;
            for &(i, n) in buckets {
                if rank < (before + n) as f64 || before + n == total {
                    let (lower, width) = log_bucket_range(i);
                    let within = (rank - before as f64).clamp(0.0, (n - 1) as f64);
                    return lower + width * (within + 0.5) / n as f64;
                }
                before += n;
            }
            0.0
        })
        .collect();
    Some(out)
}

// ---------------------------------------------------------------------------------------
// The store

/// One stat's handle.
#[derive(Clone, Debug)]
pub enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl Metric {
    /// Written since start (Envoy's `usedonly`).
    pub fn used(&self) -> bool {
        match self {
            Metric::Counter(c) => c.get() > 0,
            Metric::Gauge(g) => g.used(),
            Metric::Histogram(h) => h.count() > 0,
        }
    }
}

/// The process-wide stat store. Creation takes a lock; updates never do.
#[derive(Default, Debug)]
pub struct Store {
    metrics: Mutex<BTreeMap<String, Metric>>,
}

/// One counter's or gauge's name and current value, for rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Store::default())
    }

    fn get_or_insert(
        &self,
        name: &str,
        pick: impl Fn(&Metric) -> Option<Metric>,
        make: impl FnOnce() -> Metric,
    ) -> Metric {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = m.get(name).and_then(&pick) {
            return found;
        }
        let made = make();
        m.insert(name.to_owned(), made.clone());
        made
    }

    /// The counter called `name`, created at zero the first time.
    pub fn counter(&self, name: &str) -> Counter {
        let pick = |m: &Metric| match m {
            Metric::Counter(c) => Some(Metric::Counter(c.clone())),
            _ => None,
        };
        match self.get_or_insert(name, pick, || Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    /// Publish an existing counter (a process-wide one) under `name`.
    pub fn adopt_counter(&self, name: &str, counter: &Counter) {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.insert(name.to_owned(), Metric::Counter(counter.clone()));
    }

    /// The gauge called `name`, created at zero the first time.
    pub fn gauge(&self, name: &str) -> Gauge {
        let pick = |m: &Metric| match m {
            Metric::Gauge(g) => Some(Metric::Gauge(g.clone())),
            _ => None,
        };
        match self.get_or_insert(name, pick, || Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    /// The histogram called `name`, created empty the first time.
    pub fn histogram(&self, name: &str) -> Histogram {
        let pick = |m: &Metric| match m {
            Metric::Histogram(h) => Some(Metric::Histogram(h.clone())),
            _ => None,
        };
        match self.get_or_insert(name, pick, || Metric::Histogram(Histogram::default())) {
            Metric::Histogram(h) => h,
            _ => Histogram::default(),
        }
    }

    /// Every stat's handle, sorted by name.
    pub fn entries(&self) -> Vec<(String, Metric)> {
        let m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every counter and gauge, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Value)> {
        self.entries()
            .into_iter()
            .filter_map(|(k, v)| match v {
                Metric::Counter(c) => Some((k, Value::Counter(c.get()))),
                Metric::Gauge(g) => Some((k, Value::Gauge(g.get()))),
                Metric::Histogram(_) => None,
            })
            .collect()
    }

    /// The current value of one counter or gauge (tests and the admin endpoint); for a
    /// histogram, how many values it holds.
    pub fn value(&self, name: &str) -> Option<u64> {
        let m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(name).map(|v| match v {
            Metric::Counter(c) => c.get(),
            Metric::Gauge(g) => g.get().max(0) as u64,
            Metric::Histogram(h) => h.count(),
        })
    }

    /// Start a new histogram interval everywhere (Envoy flushes every 5 s).
    pub fn flush_histograms(&self) {
        for (_, m) in self.entries() {
            if let Metric::Histogram(h) = m {
                h.flush();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// CONNECT-UDP

/// Why a datagram was dropped. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A UDP payload too large for the QUIC path (or over the target-side limit).
    TooLarge,
    /// An HTTP Datagram with a context id other than 0 (RFC 9298 section 4).
    UnknownContextId,
    /// A capsule of a type Ferry does not know (RFC 9297 section 3.2: skipped).
    UnknownCapsule,
    /// A QUIC DATAGRAM for a stream that has no open tunnel.
    NoSuchStream,
    /// A datagram whose quarter stream id or context id did not parse.
    Malformed,
    /// The target-side socket (or the QUIC datagram queue) was full.
    BufferFull,
    /// The target-side socket reported an error.
    SocketError,
    /// A destination policy refused the datagram.
    Policy,
    /// Read from the target in a batch, but the client side of the tunnel ended before it
    /// could be sent on.
    TunnelClosed,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::TooLarge,
        DropReason::UnknownContextId,
        DropReason::UnknownCapsule,
        DropReason::NoSuchStream,
        DropReason::Malformed,
        DropReason::BufferFull,
        DropReason::SocketError,
        DropReason::Policy,
        DropReason::TunnelClosed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::UnknownContextId => "unknown_context_id",
            DropReason::UnknownCapsule => "unknown_capsule",
            DropReason::NoSuchStream => "no_such_stream",
            DropReason::Malformed => "malformed",
            DropReason::BufferFull => "buffer_full",
            DropReason::SocketError => "socket_error",
            DropReason::Policy => "policy",
            DropReason::TunnelClosed => "tunnel_closed",
        }
    }
}

/// Why a tunnel's stream was reset by Ferry after it had been accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// A malformed capsule, or a capsule cut off by the end of the stream.
    MalformedCapsule,
    /// A capsule (or UDP payload) declared larger than any usable datagram.
    CapsuleTooLarge,
    /// The target-side socket failed (for example ICMP port unreachable).
    SocketError,
    /// No traffic for `stream_idle_timeout`.
    IdleTimeout,
    /// The tunnel reached `common_http_protocol_options.max_stream_duration`.
    MaxDuration,
}

impl ResetReason {
    pub const ALL: [ResetReason; 5] = [
        ResetReason::MalformedCapsule,
        ResetReason::CapsuleTooLarge,
        ResetReason::SocketError,
        ResetReason::IdleTimeout,
        ResetReason::MaxDuration,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResetReason::MalformedCapsule => "malformed_capsule",
            ResetReason::CapsuleTooLarge => "capsule_too_large",
            ResetReason::SocketError => "socket_error",
            ResetReason::IdleTimeout => "idle_timeout",
            ResetReason::MaxDuration => "max_duration",
        }
    }
}

/// Which encoding carried a datagram on the downstream side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A QUIC DATAGRAM frame (RFC 9297 section 2.1).
    QuicDatagram,
    /// A DATAGRAM capsule on the request stream (RFC 9297 section 3.5).
    Capsule,
}

/// One tunnel's own totals, for its access log line. Shared by the tunnel's stat handles;
/// updated with relaxed atomic adds next to the process-wide counters.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// UDP payloads from the client (and their bytes).
    pub rx_datagrams: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// UDP payloads to the client (and their bytes).
    pub tx_datagrams: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Datagrams of this tunnel dropped, whatever the reason.
    pub dropped: AtomicU64,
}

impl TunnelCounters {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Rx,
    Tx,
}

/// Per-direction datagram and byte counters, split by downstream encoding.
#[derive(Debug, Clone)]
pub struct DirectionStats {
    pub datagrams_quic: Counter,
    pub datagrams_capsule: Counter,
    pub bytes: Counter,
    direction: Direction,
    tunnel: Option<Arc<TunnelCounters>>,
}

impl DirectionStats {
    fn new(store: &Store, prefix: &str, dir: &str, direction: Direction) -> Self {
        DirectionStats {
            datagrams_quic: store.counter(&format!("{prefix}{dir}_datagrams_quic")),
            datagrams_capsule: store.counter(&format!("{prefix}{dir}_datagrams_capsule")),
            bytes: store.counter(&format!("{prefix}{dir}_bytes")),
            direction,
            tunnel: None,
        }
    }

    #[inline]
    pub fn record(&self, encoding: Encoding, len: usize) {
        match encoding {
            Encoding::QuicDatagram => self.datagrams_quic.inc(),
            Encoding::Capsule => self.datagrams_capsule.inc(),
        }
        self.bytes.add(len as u64);
        if let Some(t) = &self.tunnel {
            let (d, b) = match self.direction {
                Direction::Rx => (&t.rx_datagrams, &t.rx_bytes),
                Direction::Tx => (&t.tx_datagrams, &t.tx_bytes),
            };
            d.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(len as u64, Ordering::Relaxed);
        }
    }
}

/// The stats of one HTTP connection manager (one `stat_prefix`), as seen from one listener.
#[derive(Debug, Clone)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    /// `downstream_cx_http1_*`, `_http2_*`, `_http3_*`, by [`HttpVersion`].
    cx_by_version: [(Counter, Gauge); 3],
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_drain_close: Counter,
    pub downstream_cx_length_ms: Histogram,
    pub downstream_rq_total: Counter,
    /// `downstream_rq_http1_total`, `_http2_total`, `_http3_total`.
    rq_by_version: [Counter; 3],
    pub downstream_rq_active: Gauge,
    pub downstream_rq_completed: Counter,
    pub downstream_rq_time: Histogram,
    rq_by_class: [Counter; 5],
    pub downstream_cx_upgrades_total: Counter,
    pub downstream_cx_upgrades_active: Gauge,
    /// Requests refused with 431 because their header section was over the limit (HTTP/3:
    /// [`crate::h3server::MAX_REQUEST_HEADERS_BYTES`]).
    pub downstream_rq_headers_too_large: Counter,
    /// HTTP/3 frames from clients the frame guard refused (see `h3limit`): request heads
    /// over the limit (also in `downstream_rq_headers_too_large`), later frames on request
    /// streams (the tunnel ends), control-stream frames (the connection is closed).
    pub downstream_h3_frame_too_large: Counter,
    pub connect_udp: ConnectUdpStats,
    /// `basic_auth.*` and the listener's `ssl.*` (authentication).
    pub auth: AuthStats,
    /// `listener.<address>.*`, when these stats belong to a bound listener.
    pub listener: Option<ListenerStats>,
    /// `cluster.<name>.*` of the clusters tunnels go to.
    pub clusters: Arc<ClusterStatsMap>,
}

/// CONNECT-UDP stats (Envoy has none): `http.<stat_prefix>.connect_udp.*`.
#[derive(Debug, Clone)]
pub struct ConnectUdpStats {
    pub tunnels_total: Counter,
    pub tunnels_active: Gauge,
    pub tunnels_rejected: Counter,
    /// Microseconds from the request's headers to the 2xx response.
    pub tunnel_setup_time_us: Histogram,
    /// Milliseconds from the 2xx response to the end of the tunnel.
    pub tunnel_duration_ms: Histogram,
    /// Client to target: UDP payloads received from the client.
    pub rx: DirectionStats,
    /// Target to client: UDP payloads sent to the client.
    pub tx: DirectionStats,
    /// Datagrams sent to / received from the target sockets.
    pub upstream_datagrams_tx: Counter,
    pub upstream_datagrams_rx: Counter,
    drops: [Counter; DropReason::ALL.len()],
    resets: [Counter; ResetReason::ALL.len()],
    /// Envoy's `http.<stat_prefix>.downstream_rq_max_duration_reached` (listener stats
    /// only), counted with [`ResetReason::MaxDuration`].
    max_duration_reached: Option<Counter>,
    tunnel: Option<Arc<TunnelCounters>>,
    store: Arc<Store>,
    prefix: Arc<str>,
}

/// Status codes and RFC 9209 error types Ferry refuses tunnels with; their
/// `tunnels_rejected_*` counters exist (at zero) from the start.
const KNOWN_REJECTIONS: [&str; 12] = [
    "400",
    "403",
    "404",
    "501",
    "503",
    "http_request_error",
    "http_request_denied",
    "destination_not_found",
    "destination_unavailable",
    "dns_error",
    "destination_ip_prohibited",
    "proxy_configuration_error",
];

impl ConnectUdpStats {
    /// The CONNECT-UDP stats named `<prefix>tunnels_total`, ... (`prefix` ends with a dot:
    /// `http.<stat_prefix>.connect_udp.` for a listener, `cluster.<name>.connect_udp.` for
    /// the datagrams of a forwarding cluster's connections).
    pub fn new(store: &Arc<Store>, prefix: &str) -> Self {
        let cu = prefix;
        ConnectUdpStats {
            tunnels_total: store.counter(&format!("{cu}tunnels_total")),
            tunnels_active: store.gauge(&format!("{cu}tunnels_active")),
            tunnels_rejected: store.counter(&format!("{cu}tunnels_rejected")),
            tunnel_setup_time_us: store.histogram(&format!("{cu}tunnel_setup_time_us")),
            tunnel_duration_ms: store.histogram(&format!("{cu}tunnel_duration_ms")),
            rx: DirectionStats::new(store, cu, "downstream_rx", Direction::Rx),
            tx: DirectionStats::new(store, cu, "downstream_tx", Direction::Tx),
            upstream_datagrams_tx: store.counter(&format!("{cu}upstream_datagrams_tx")),
            upstream_datagrams_rx: store.counter(&format!("{cu}upstream_datagrams_rx")),
            drops: DropReason::ALL
                .map(|r| store.counter(&format!("{cu}datagrams_dropped_{}", r.name()))),
            resets: ResetReason::ALL
                .map(|r| store.counter(&format!("{cu}streams_reset_{}", r.name()))),
            max_duration_reached: None,
            tunnel: None,
            store: store.clone(),
            prefix: cu.into(),
        }
    }

    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drop_n(reason, 1);
    }

    /// Count `n` datagrams dropped for one reason.
    pub fn drop_n(&self, reason: DropReason, n: u64) {
        self.drops[reason as usize].add(n);
        if let Some(t) = &self.tunnel {
            t.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Count a drop in the tunnel's own totals only (the process-wide counter was counted
    /// by whoever dropped it).
    #[inline]
    pub fn tunnel_dropped(&self) {
        if let Some(t) = &self.tunnel {
            t.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn reset(&self, reason: ResetReason) {
        self.resets[reason as usize].inc();
        if reason == ResetReason::MaxDuration {
            if let Some(c) = &self.max_duration_reached {
                c.inc();
            }
        }
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].get()
    }

    /// Count a refused tunnel by its status code (`tunnels_rejected_404`, ...) and in
    /// `tunnels_rejected`.
    pub fn rejected(&self, status: u16) {
        self.tunnels_rejected.inc();
        self.store
            .counter(&format!("{}tunnels_rejected_{status}", self.prefix))
            .inc();
    }

    /// Count a refused tunnel by its RFC 9209 error type (`tunnels_rejected_dns_error`, ...).
    pub fn rejected_because(&self, error: &str) {
        let ok = !error.is_empty()
            && error
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let reason = if ok { error } else { "other" };
        self.store
            .counter(&format!("{}tunnels_rejected_{reason}", self.prefix))
            .inc();
    }

    /// A copy of these stats that also counts into one tunnel's own [`TunnelCounters`].
    pub fn for_tunnel(&self) -> (ConnectUdpStats, Arc<TunnelCounters>) {
        let counters = Arc::new(TunnelCounters::default());
        let mut s = self.clone();
        s.tunnel = Some(counters.clone());
        s.rx.tunnel = Some(counters.clone());
        s.tx.tunnel = Some(counters.clone());
        (s, counters)
    }

    /// The tunnel's own counters, when these are a tunnel's stats.
    pub fn tunnel(&self) -> Option<&Arc<TunnelCounters>> {
        self.tunnel.as_ref()
    }
}

impl HttpStats {
    /// The stats of `stat_prefix`, not tied to a listener.
    pub fn new(store: &Arc<Store>, stat_prefix: &str) -> Self {
        Self::build(
            store,
            stat_prefix,
            None,
            Arc::new(ClusterStatsMap::new(store)),
        )
    }

    /// The stats of `stat_prefix` on the listener whose stat name is `listener`
    /// (see [`listener_stat_name`]).
    pub fn for_listener(
        store: &Arc<Store>,
        stat_prefix: &str,
        listener: &str,
        clusters: Arc<ClusterStatsMap>,
    ) -> Self {
        let l = ListenerStats::new(store, listener, stat_prefix);
        Self::build(store, stat_prefix, Some(l), clusters)
    }

    fn build(
        store: &Arc<Store>,
        stat_prefix: &str,
        listener: Option<ListenerStats>,
        clusters: Arc<ClusterStatsMap>,
    ) -> Self {
        let p = format!("http.{stat_prefix}.");
        let cu = format!("{p}connect_udp.");
        let c = |n: &str| store.counter(&format!("{p}{n}"));
        let g = |n: &str| store.gauge(&format!("{p}{n}"));
        let rq = |class: &str| c(&format!("downstream_rq_{class}"));
        for r in KNOWN_REJECTIONS {
            store.counter(&format!("{cu}tunnels_rejected_{r}"));
        }
        HttpStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            cx_by_version: HttpVersion::ALL.map(|v| {
                let n = v.stat_name();
                (
                    c(&format!("downstream_cx_{n}_total")),
                    g(&format!("downstream_cx_{n}_active")),
                )
            }),
            downstream_cx_destroy: c("downstream_cx_destroy"),
            downstream_cx_drain_close: c("downstream_cx_drain_close"),
            downstream_cx_length_ms: store.histogram(&format!("{p}downstream_cx_length_ms")),
            downstream_rq_total: c("downstream_rq_total"),
            rq_by_version: HttpVersion::ALL
                .map(|v| c(&format!("downstream_rq_{}_total", v.stat_name()))),
            downstream_rq_active: g("downstream_rq_active"),
            downstream_rq_completed: c("downstream_rq_completed"),
            downstream_rq_time: store.histogram(&format!("{p}downstream_rq_time")),
            rq_by_class: [rq("1xx"), rq("2xx"), rq("3xx"), rq("4xx"), rq("5xx")],
            downstream_cx_upgrades_total: c("downstream_cx_upgrades_total"),
            downstream_cx_upgrades_active: g("downstream_cx_upgrades_active"),
            downstream_rq_headers_too_large: c("downstream_rq_headers_too_large"),
            downstream_h3_frame_too_large: c("downstream_h3_frame_too_large"),
            connect_udp: ConnectUdpStats {
                max_duration_reached: Some(c("downstream_rq_max_duration_reached")),
                ..ConnectUdpStats::new(store, &cu)
            },
            auth: AuthStats {
                store: store.clone(),
                http_prefix: p.as_str().into(),
                listener_prefix: listener.as_ref().map(|l| l.prefix.clone()),
            },
            listener,
            clusters,
        }
    }

    /// Count a response by status class (`downstream_rq_2xx`, ...), here and on the
    /// listener (`listener.<address>.http.<stat_prefix>.downstream_rq_2xx`).
    pub fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(c) = self.rq_by_class.get(class) {
            c.inc();
        }
        self.downstream_rq_completed.inc();
        if let Some(l) = &self.listener {
            if let Some(c) = l.rq_by_class.get(class) {
                c.inc();
            }
            l.downstream_rq_completed.inc();
        }
    }

    /// A new downstream HTTP/3 connection: counted now, and as destroyed (with its
    /// length) when the guard drops.
    pub fn connection(&self) -> ConnectionGuard {
        self.connection_with(HttpVersion::Http3)
    }

    /// A new downstream connection of `version` (see [`HttpStats::connection`]).
    pub fn connection_with(&self, version: HttpVersion) -> ConnectionGuard {
        let (total, active) = &self.cx_by_version[version as usize];
        self.downstream_cx_total.inc();
        self.downstream_cx_active.inc();
        total.inc();
        active.inc();
        let listener = self.listener.as_ref().map(|l| {
            l.downstream_cx_total.inc();
            l.downstream_cx_active.inc();
            (
                l.downstream_cx_active.clone(),
                l.downstream_cx_destroy.clone(),
                l.downstream_cx_length_ms.clone(),
            )
        });
        ConnectionGuard {
            active: [self.downstream_cx_active.clone(), active.clone()],
            destroy: self.downstream_cx_destroy.clone(),
            length: self.downstream_cx_length_ms.clone(),
            listener,
            start: Instant::now(),
        }
    }

    /// A new request on a downstream HTTP/3 connection: counted now, and its time recorded
    /// when the guard drops.
    pub fn request(&self) -> RequestGuard {
        self.request_with(HttpVersion::Http3)
    }

    /// A new request over `version` (see [`HttpStats::request`]).
    pub fn request_with(&self, version: HttpVersion) -> RequestGuard {
        self.downstream_rq_total.inc();
        self.rq_by_version[version as usize].inc();
        self.downstream_rq_active.inc();
        RequestGuard {
            active: self.downstream_rq_active.clone(),
            time: self.downstream_rq_time.clone(),
            start: Instant::now(),
        }
    }
}

/// The HTTP version of a downstream connection, for Envoy's per-codec stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
    Http3,
}

impl HttpVersion {
    pub const ALL: [HttpVersion; 3] = [HttpVersion::Http1, HttpVersion::Http2, HttpVersion::Http3];

    fn stat_name(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "http1",
            HttpVersion::Http2 => "http2",
            HttpVersion::Http3 => "http3",
        }
    }
}

/// See [`HttpStats::connection`]. Holds its own handles, so it can outlive any borrow.
#[derive(Debug)]
pub struct ConnectionGuard {
    active: [Gauge; 2],
    destroy: Counter,
    length: Histogram,
    listener: Option<(Gauge, Counter, Histogram)>,
    start: Instant,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let length = self.start.elapsed();
        for g in &self.active {
            g.dec();
        }
        self.destroy.inc();
        self.length.record_ms(length);
        if let Some((active, destroy, hist)) = &self.listener {
            active.dec();
            destroy.inc();
            hist.record_ms(length);
        }
    }
}

/// See [`HttpStats::request`].
#[derive(Debug)]
pub struct RequestGuard {
    active: Gauge,
    time: Histogram,
    start: Instant,
}

impl RequestGuard {
    pub fn start(&self) -> Instant {
        self.start
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.active.dec();
        self.time.record_ms(self.start.elapsed());
    }
}

/// `listener.<address>.*`: Envoy's per-listener stats.
#[derive(Debug, Clone)]
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_length_ms: Histogram,
    /// QUIC connection attempts refused (the listener is draining).
    pub downstream_cx_refused_draining: Counter,
    /// Connections refused because the global downstream connection limit was reached.
    pub downstream_global_cx_overflow: Counter,
    pub downstream_rq_completed: Counter,
    rq_by_class: [Counter; 5],
    /// `listener.<address>.`
    prefix: Arc<str>,
}

/// Authentication stats, registered (at zero) only where authentication is configured,
/// as in Envoy: `http.<p>.basic_auth.allowed` / `.denied` (the basic_auth filter) and
/// `listener.<address>.ssl.connection_error`, `ssl.fail_verify_no_cert`,
/// `ssl.fail_verify_error` (TLS handshakes that failed: no client certificate, a client
/// certificate that did not verify, any other handshake failure).
#[derive(Debug, Clone)]
pub struct AuthStats {
    store: Arc<Store>,
    /// `http.<stat_prefix>.`
    http_prefix: Arc<str>,
    /// `listener.<address>.`, for a bound listener.
    listener_prefix: Option<Arc<str>>,
}

/// Why a downstream TLS (or QUIC) handshake failed, named as Envoy's `ssl.*` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// A client certificate is required and none was sent.
    NoCert,
    /// The client certificate did not verify against the trusted CAs.
    VerifyError,
    /// Any other handshake failure.
    ConnectionError,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 3] = [
        HandshakeFailure::ConnectionError,
        HandshakeFailure::NoCert,
        HandshakeFailure::VerifyError,
    ];

    pub fn stat_name(self) -> &'static str {
        match self {
            HandshakeFailure::NoCert => "fail_verify_no_cert",
            HandshakeFailure::VerifyError => "fail_verify_error",
            HandshakeFailure::ConnectionError => "connection_error",
        }
    }
}

impl AuthStats {
    /// `http.<p>.basic_auth.allowed` or `.denied`.
    pub fn basic_auth(&self, allowed: bool) -> Counter {
        let what = if allowed { "allowed" } else { "denied" };
        self.store
            .counter(&format!("{}basic_auth.{what}", self.http_prefix))
    }

    /// Registers, at zero, the counters of what `listener` configures: basic_auth
    /// counters for a basic_auth filter, `ssl.*` for client certificate validation.
    pub fn register(&self, listener: &ferry_config::Listener) {
        if listener.filter_chain.hcm.basic_auth.is_some() {
            self.basic_auth(true);
            self.basic_auth(false);
        }
        let mtls = listener
            .filter_chain
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some());
        if mtls {
            self.register_ssl();
        }
    }

    /// `listener.<address>.ssl.<failure>`, for a bound listener.
    pub fn handshake_failed(&self, failure: HandshakeFailure) {
        if let Some(p) = &self.listener_prefix {
            self.store
                .counter(&format!("{p}ssl.{}", failure.stat_name()))
                .inc();
        }
    }

    /// Registers the `ssl.*` failure counters at zero (client certificates are verified).
    pub fn register_ssl(&self) {
        if let Some(p) = &self.listener_prefix {
            for f in HandshakeFailure::ALL {
                self.store.counter(&format!("{p}ssl.{}", f.stat_name()));
            }
        }
    }
}

impl ListenerStats {
    fn new(store: &Store, listener: &str, stat_prefix: &str) -> Self {
        let p = format!("listener.{listener}.");
        let h = format!("{p}http.{stat_prefix}.");
        let rq = |class: &str| store.counter(&format!("{h}downstream_rq_{class}"));
        ListenerStats {
            downstream_cx_total: store.counter(&format!("{p}downstream_cx_total")),
            downstream_cx_active: store.gauge(&format!("{p}downstream_cx_active")),
            downstream_cx_destroy: store.counter(&format!("{p}downstream_cx_destroy")),
            downstream_cx_length_ms: store.histogram(&format!("{p}downstream_cx_length_ms")),
            downstream_cx_refused_draining: store
                .counter(&format!("{p}downstream_cx_refused_draining")),
            downstream_global_cx_overflow: store
                .counter(&format!("{p}downstream_global_cx_overflow")),
            downstream_rq_completed: store.counter(&format!("{h}downstream_rq_completed")),
            rq_by_class: [rq("1xx"), rq("2xx"), rq("3xx"), rq("4xx"), rq("5xx")],
            prefix: p.as_str().into(),
        }
    }
}

/// A listener's name in stats, as Envoy writes it: `127.0.0.1_4433`, `[__1]_4433`.
pub fn listener_stat_name(addr: std::net::SocketAddr) -> String {
    match addr {
        std::net::SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => {
            format!("[{}]_{}", a.ip().to_string().replace(':', "_"), a.port())
        }
    }
}

/// `cluster.<name>.*` for clusters that receive terminated UDP: one connected UDP socket
/// per tunnel counts as one upstream connection.
#[derive(Debug, Clone)]
pub struct ClusterUdpStats {
    /// UDP sockets opened.
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    /// A UDP socket could not be opened.
    pub upstream_cx_connect_fail: Counter,
    /// No host to pick (no DNS answer yet, or an empty cluster).
    pub upstream_cx_none_healthy: Counter,
    /// How long each socket stayed open.
    pub upstream_cx_length_ms: Histogram,
    /// Bytes sent to / received from the cluster's hosts, added when each tunnel ends.
    pub upstream_cx_tx_bytes_total: Counter,
    pub upstream_cx_rx_bytes_total: Counter,
}

impl ClusterUdpStats {
    fn new(store: &Store, cluster: &str) -> Self {
        let c = |n: &str| store.counter(&format!("cluster.{cluster}.{n}"));
        ClusterUdpStats {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: store.gauge(&format!("cluster.{cluster}.upstream_cx_active")),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_length_ms: store
                .histogram(&format!("cluster.{cluster}.upstream_cx_length_ms")),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
        }
    }

    /// One UDP socket opened: counted now, closed (with its length) when the guard drops.
    pub fn socket_opened(&self) -> UpstreamGuard {
        self.upstream_cx_total.inc();
        self.upstream_cx_active.inc();
        UpstreamGuard {
            stats: self.clone(),
            start: Instant::now(),
        }
    }
}

/// See [`ClusterUdpStats::socket_opened`].
#[derive(Debug)]
pub struct UpstreamGuard {
    stats: ClusterUdpStats,
    start: Instant,
}

impl Drop for UpstreamGuard {
    fn drop(&mut self) {
        self.stats.upstream_cx_active.dec();
        self.stats
            .upstream_cx_length_ms
            .record_ms(self.start.elapsed());
    }
}

/// The [`ClusterUdpStats`] of every cluster, made on first use.
#[derive(Debug)]
pub struct ClusterStatsMap {
    store: Arc<Store>,
    map: Mutex<HashMap<String, ClusterUdpStats>>,
}

impl ClusterStatsMap {
    pub fn new(store: &Arc<Store>) -> Self {
        ClusterStatsMap {
            store: store.clone(),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The stats of `cluster` (one lock per tunnel, never per datagram).
    pub fn get(&self, cluster: &str) -> ClusterUdpStats {
        let mut m = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = m.get(cluster) {
            return s.clone();
        }
        let s = ClusterUdpStats::new(&self.store, cluster);
        m.insert(cluster.to_owned(), s.clone());
        s
    }
}

/// `server.*` and `listener_manager.*`: the process's own state.
#[derive(Debug, Clone)]
pub struct ServerStats {
    /// 1 while the server is live (not draining, health checks passing).
    pub live: Gauge,
    /// Envoy's values: 0 LIVE, 1 DRAINING, 2 PRE_INITIALIZING, 3 INITIALIZING.
    pub state: Gauge,
    /// Seconds since start, updated when stats are read.
    pub uptime: Gauge,
    pub total_connections: Gauge,
    pub total_listeners_active: Gauge,
    pub total_listeners_draining: Gauge,
    /// Listeners drained by `/drain_listeners` or a signal.
    pub listener_stopped: Counter,
    /// `server.ferry.task_panics`: panics caught in connection, request and tunnel tasks
    /// (process-wide; see [`crate::supervise`]).
    pub task_panics: Counter,
}

impl ServerStats {
    pub fn new(store: &Store) -> Self {
        ServerStats {
            live: store.gauge("server.live"),
            state: store.gauge("server.state"),
            uptime: store.gauge("server.uptime"),
            total_connections: store.gauge("server.total_connections"),
            total_listeners_active: store.gauge("listener_manager.total_listeners_active"),
            total_listeners_draining: store.gauge("listener_manager.total_listeners_draining"),
            listener_stopped: store.counter("listener_manager.listener_stopped"),
            task_panics: {
                let c = crate::supervise::panic_counter();
                store.adopt_counter(crate::supervise::TASK_PANICS_STAT, c);
                c.clone()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counters_are_shared_by_name() {
        let s = Store::new();
        let a = s.counter("x");
        let b = s.counter("x");
        a.inc();
        b.add(2);
        assert_eq!(s.value("x"), Some(3));
    }

    #[test]
    fn http_stats_names() {
        let s = Store::new();
        let h = HttpStats::new(&s, "ingress_http");
        h.response(404);
        h.connect_udp.drop(DropReason::UnknownContextId);
        h.connect_udp.rejected(404);
        h.connect_udp.rejected_because("destination_not_found");
        h.connect_udp.rejected_because("Bad Token");
        assert_eq!(s.value("http.ingress_http.downstream_rq_4xx"), Some(1));
        assert_eq!(
            s.value("http.ingress_http.connect_udp.datagrams_dropped_unknown_context_id"),
            Some(1)
        );
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_rejected_404"),
            Some(1)
        );
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_rejected_destination_not_found"),
            Some(1)
        );
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_rejected_other"),
            Some(1)
        );
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_rejected"),
            Some(1)
        );
        let _g = GaugeGuard::new(&h.connect_udp.tunnels_active);
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_active"),
            Some(1)
        );
    }

    #[test]
    fn tunnel_counters_follow_the_tunnel_only() {
        let s = Store::new();
        let h = HttpStats::new(&s, "p");
        let (t1, c1) = h.connect_udp.for_tunnel();
        let (t2, c2) = h.connect_udp.for_tunnel();
        t1.rx.record(Encoding::QuicDatagram, 10);
        t1.rx.record(Encoding::Capsule, 5);
        t1.tx.record(Encoding::Capsule, 7);
        t1.drop(DropReason::TooLarge);
        t2.tx.record(Encoding::QuicDatagram, 1);
        h.connect_udp.rx.record(Encoding::QuicDatagram, 100);
        let g = TunnelCounters::get;
        assert_eq!((g(&c1.rx_datagrams), g(&c1.rx_bytes)), (2, 15));
        assert_eq!((g(&c1.tx_datagrams), g(&c1.tx_bytes)), (1, 7));
        assert_eq!(g(&c1.dropped), 1);
        assert_eq!((g(&c2.rx_datagrams), g(&c2.tx_datagrams)), (0, 1));
        assert_eq!(
            s.value("http.p.connect_udp.downstream_rx_datagrams_quic"),
            Some(2)
        );
        assert_eq!(s.value("http.p.connect_udp.downstream_rx_bytes"), Some(115));
        assert_eq!(
            s.value("http.p.connect_udp.datagrams_dropped_too_large"),
            Some(1)
        );
    }

    #[test]
    fn log_buckets_have_two_significant_digits() {
        assert_eq!(log_bucket(0), 0);
        for v in [
            1u64,
            4,
            9,
            10,
            29,
            99,
            100,
            101,
            2500,
            2509,
            123_456,
            u64::MAX,
        ] {
            let (lower, width) = log_bucket_range(log_bucket(v));
            assert!(
                lower <= v as f64 && (v as f64) < lower + width * 1.000001,
                "{v}: [{lower}, {})",
                lower + width
            );
        }
        assert_eq!(log_bucket_range(log_bucket(4)), (4.0, 0.1));
        assert_eq!(log_bucket_range(log_bucket(29)), (29.0, 1.0));
        assert!(log_bucket(u64::MAX) < LOG_BUCKETS);
    }

    /// A single value reads as its bucket's middle, as Envoy prints it (4 -> 4.05, 29 -> 29.5).
    #[test]
    fn quantiles_of_one_value() {
        let h = Histogram::default();
        h.record(29);
        let s = h.summary();
        assert_eq!(s.cumulative, Some(vec![29.5; 10]));
        assert_eq!(s.interval, None);
        h.flush();
        assert_eq!(h.summary().interval, Some(vec![29.5; 10]));
        h.flush();
        assert_eq!(
            h.summary().interval,
            None,
            "nothing new since the last flush"
        );
        assert_eq!(h.summary().cumulative, Some(vec![29.5; 10]));
    }

    #[test]
    fn quantiles_are_ordered_and_bounded() {
        let h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let q = h.summary().cumulative.unwrap();
        assert!(q.windows(2).all(|w| w[0] <= w[1]), "{q:?}");
        assert!(q[0] >= 1.0 && q[0] < 1.1, "{q:?}");
        assert!((q[2] - 500.0).abs() < 10.0, "{q:?}");
        // 1000 is alone in [1000, 1100): read as its middle, as Envoy does.
        assert_eq!(q[9], 1050.0, "{q:?}");
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.sum, 500_500);
        // Exact Prometheus buckets: v <= 0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000.
        assert_eq!(
            &s.prometheus_buckets[..11],
            &[0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 1000]
        );
        assert_eq!(*s.prometheus_buckets.last().unwrap(), 1000);
    }

    #[test]
    fn used_only_tracks_writes() {
        let s = Store::new();
        let g = s.gauge("g");
        let c = s.counter("c");
        let h = s.histogram("h");
        let used = |s: &Store| {
            s.entries()
                .into_iter()
                .filter(|(_, m)| m.used())
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        assert!(used(&s).is_empty());
        g.inc();
        g.dec();
        c.inc();
        h.record(0);
        assert_eq!(used(&s), vec!["c", "g", "h"]);
    }

    #[test]
    fn listener_names_follow_envoy() {
        assert_eq!(
            listener_stat_name("127.0.0.1:4433".parse().unwrap()),
            "127.0.0.1_4433"
        );
        assert_eq!(
            listener_stat_name("[::1]:443".parse().unwrap()),
            "[__1]_443"
        );
    }
}
