//! Counters and gauges, kept from the start and published by the admin endpoint.
//!
//! Names follow Envoy where Envoy has the stat (`http.<stat_prefix>.downstream_rq_2xx`,
//! `downstream_cx_total`, ...). CONNECT-UDP stats, which Envoy lacks, live under
//! `http.<stat_prefix>.connect_udp.`. A handle (`Counter`, `Gauge`) is resolved once, when a
//! listener is built; the per-datagram path only does a relaxed atomic add.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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

/// A value that goes up and down (active connections, active tunnels).
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
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

#[derive(Clone, Debug)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
}

/// The process-wide stat store. Creation takes a lock; updates never do.
#[derive(Default, Debug)]
pub struct Store {
    metrics: Mutex<BTreeMap<String, Metric>>,
}

/// One stat's name and current value, for rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Store::default())
    }

    /// The counter called `name`, created at zero the first time.
    pub fn counter(&self, name: &str) -> Counter {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        match m.get(name) {
            Some(Metric::Counter(c)) => c.clone(),
            _ => {
                let c = Counter::default();
                m.insert(name.to_owned(), Metric::Counter(c.clone()));
                c
            }
        }
    }

    /// The gauge called `name`, created at zero the first time.
    pub fn gauge(&self, name: &str) -> Gauge {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        match m.get(name) {
            Some(Metric::Gauge(g)) => g.clone(),
            _ => {
                let g = Gauge::default();
                m.insert(name.to_owned(), Metric::Gauge(g.clone()));
                g
            }
        }
    }

    /// Every stat, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Value)> {
        let m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.iter()
            .map(|(k, v)| {
                let v = match v {
                    Metric::Counter(c) => Value::Counter(c.get()),
                    Metric::Gauge(g) => Value::Gauge(g.get()),
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// The current value of one stat (tests and the admin endpoint).
    pub fn value(&self, name: &str) -> Option<u64> {
        let m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(name).map(|v| match v {
            Metric::Counter(c) => c.get(),
            Metric::Gauge(g) => g.get().max(0) as u64,
        })
    }
}

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
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::TooLarge,
        DropReason::UnknownContextId,
        DropReason::UnknownCapsule,
        DropReason::NoSuchStream,
        DropReason::Malformed,
        DropReason::BufferFull,
        DropReason::SocketError,
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
}

impl ResetReason {
    pub const ALL: [ResetReason; 4] = [
        ResetReason::MalformedCapsule,
        ResetReason::CapsuleTooLarge,
        ResetReason::SocketError,
        ResetReason::IdleTimeout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResetReason::MalformedCapsule => "malformed_capsule",
            ResetReason::CapsuleTooLarge => "capsule_too_large",
            ResetReason::SocketError => "socket_error",
            ResetReason::IdleTimeout => "idle_timeout",
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

/// Per-direction datagram and byte counters, split by downstream encoding.
#[derive(Debug, Clone)]
pub struct DirectionStats {
    pub datagrams_quic: Counter,
    pub datagrams_capsule: Counter,
    pub bytes: Counter,
}

impl DirectionStats {
    fn new(store: &Store, prefix: &str, dir: &str) -> Self {
        DirectionStats {
            datagrams_quic: store.counter(&format!("{prefix}{dir}_datagrams_quic")),
            datagrams_capsule: store.counter(&format!("{prefix}{dir}_datagrams_capsule")),
            bytes: store.counter(&format!("{prefix}{dir}_bytes")),
        }
    }

    #[inline]
    pub fn record(&self, encoding: Encoding, len: usize) {
        match encoding {
            Encoding::QuicDatagram => self.datagrams_quic.inc(),
            Encoding::Capsule => self.datagrams_capsule.inc(),
        }
        self.bytes.add(len as u64);
    }
}

/// The stats of one HTTP connection manager (one `stat_prefix`).
#[derive(Debug, Clone)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_rq_total: Counter,
    rq_by_class: [Counter; 5],
    pub downstream_cx_upgrades_total: Counter,
    pub downstream_cx_upgrades_active: Gauge,
    pub connect_udp: ConnectUdpStats,
}

/// CONNECT-UDP stats (Envoy has none): `http.<stat_prefix>.connect_udp.*`.
#[derive(Debug, Clone)]
pub struct ConnectUdpStats {
    pub tunnels_total: Counter,
    pub tunnels_active: Gauge,
    /// Client to target: UDP payloads received from the client.
    pub rx: DirectionStats,
    /// Target to client: UDP payloads sent to the client.
    pub tx: DirectionStats,
    /// Datagrams sent to / received from the target sockets.
    pub upstream_datagrams_tx: Counter,
    pub upstream_datagrams_rx: Counter,
    drops: [Counter; DropReason::ALL.len()],
    resets: [Counter; ResetReason::ALL.len()],
    store: Arc<Store>,
    prefix: String,
}

impl ConnectUdpStats {
    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drops[reason as usize].inc();
    }

    pub fn reset(&self, reason: ResetReason) {
        self.resets[reason as usize].inc();
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].get()
    }

    /// Count a refused tunnel by its status code (`tunnels_rejected_404`, ...).
    pub fn rejected(&self, status: u16) {
        self.store
            .counter(&format!("{}tunnels_rejected_{status}", self.prefix))
            .inc();
    }
}

impl HttpStats {
    pub fn new(store: &Arc<Store>, stat_prefix: &str) -> Self {
        let p = format!("http.{stat_prefix}.");
        let cu = format!("{p}connect_udp.");
        let rq = |c: &str| store.counter(&format!("{p}downstream_rq_{c}"));
        HttpStats {
            downstream_cx_total: store.counter(&format!("{p}downstream_cx_total")),
            downstream_cx_active: store.gauge(&format!("{p}downstream_cx_active")),
            downstream_rq_total: store.counter(&format!("{p}downstream_rq_total")),
            rq_by_class: [rq("1xx"), rq("2xx"), rq("3xx"), rq("4xx"), rq("5xx")],
            downstream_cx_upgrades_total: store
                .counter(&format!("{p}downstream_cx_upgrades_total")),
            downstream_cx_upgrades_active: store
                .gauge(&format!("{p}downstream_cx_upgrades_active")),
            connect_udp: ConnectUdpStats {
                tunnels_total: store.counter(&format!("{cu}tunnels_total")),
                tunnels_active: store.gauge(&format!("{cu}tunnels_active")),
                rx: DirectionStats::new(store, &cu, "downstream_rx"),
                tx: DirectionStats::new(store, &cu, "downstream_tx"),
                upstream_datagrams_tx: store.counter(&format!("{cu}upstream_datagrams_tx")),
                upstream_datagrams_rx: store.counter(&format!("{cu}upstream_datagrams_rx")),
                drops: DropReason::ALL
                    .map(|r| store.counter(&format!("{cu}datagrams_dropped_{}", r.name()))),
                resets: ResetReason::ALL
                    .map(|r| store.counter(&format!("{cu}streams_reset_{}", r.name()))),
                store: store.clone(),
                prefix: cu,
            },
        }
    }

    /// Count a response by status class (`downstream_rq_2xx`, ...).
    pub fn response(&self, status: u16) {
        self.downstream_rq_total.inc();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(c) = self.rq_by_class.get(class) {
            c.inc();
        }
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(s.value("http.ingress_http.downstream_rq_4xx"), Some(1));
        assert_eq!(
            s.value("http.ingress_http.connect_udp.datagrams_dropped_unknown_context_id"),
            Some(1)
        );
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_rejected_404"),
            Some(1)
        );
        let _g = GaugeGuard::new(&h.connect_udp.tunnels_active);
        assert_eq!(
            s.value("http.ingress_http.connect_udp.tunnels_active"),
            Some(1)
        );
    }
}
