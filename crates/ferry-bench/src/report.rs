//! Result types (serialized as JSON for scripts) and their one-line human forms.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procstat::Usage;

/// Percentiles of a histogram of nanoseconds, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let us = |ns: u64| ns as f64 / 1e3;
    Percentiles {
        count: h.len(),
        p50: us(h.value_at_quantile(0.50)),
        p90: us(h.value_at_quantile(0.90)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
        mean: h.mean() / 1e3,
    }
}

/// How evenly the tunnels were served.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fairness {
    pub tunnels: usize,
    /// Delivered datagrams per second per tunnel.
    pub min_dps: f64,
    pub mean_dps: f64,
    pub max_dps: f64,
    /// min / mean: 1.0 is perfectly even.
    pub min_over_mean: f64,
    /// Jain's fairness index (1.0 = perfectly even, 1/n = one tunnel gets everything).
    pub jain: f64,
    /// Tunnels below half the mean.
    pub below_half_mean: usize,
}

pub fn fairness(per_tunnel: &[u64], seconds: f64) -> Fairness {
    let n = per_tunnel.len();
    if n == 0 || seconds <= 0.0 {
        return Fairness::default();
    }
    let rates: Vec<f64> = per_tunnel.iter().map(|&r| r as f64 / seconds).collect();
    let sum: f64 = rates.iter().sum();
    let sum_sq: f64 = rates.iter().map(|r| r * r).sum();
    let mean = sum / n as f64;
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    Fairness {
        tunnels: n,
        min_dps: min,
        mean_dps: mean,
        max_dps: max,
        min_over_mean: if mean > 0.0 { min / mean } else { 0.0 },
        jain: if sum_sq > 0.0 {
            sum * sum / (n as f64 * sum_sq)
        } else {
            0.0
        },
        below_half_mean: rates.iter().filter(|&&r| r < mean / 2.0).count(),
    }
}

/// One measured interval of traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trial {
    /// `open` (fixed rate) or `closed` (fixed window).
    pub loop_kind: &'static str,
    /// Open loop: the rate asked for, datagrams/s over all tunnels.
    pub target_dps: Option<f64>,
    /// Closed loop: datagrams in flight per tunnel.
    pub window: Option<u32>,
    /// How long datagrams were sent.
    pub seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    /// lost / sent.
    pub loss: f64,
    /// Datagrams/s actually sent (the pacer may fall behind the target).
    pub offered_dps: f64,
    /// Echoes received per second of sending.
    pub delivered_dps: f64,
    /// UDP payload bits delivered per second (one way), in Mbit/s.
    pub delivered_mbps: f64,
    pub rtt_us: Percentiles,
    pub fairness: Fairness,
    /// Echoes from an earlier trial, malformed echoes, echoes on the wrong lane or tunnel.
    pub late: u64,
    pub malformed: u64,
    pub misrouted: u64,
    /// Sends the client's own socket or QUIC stack refused.
    pub send_errors: u64,
    /// The first error a send met (for example `connection lost: ...`).
    pub first_send_error: Option<String>,
    /// Datagrams the client's QUIC stack accepted but never transmitted (its datagram send
    /// buffer dropped them): client-side loss, included in `lost`.
    pub client_dropped: Option<u64>,
    /// Open loop: the pacer reached less than 97% of the target rate.
    pub client_limited: bool,
    /// Rate search: loss at or under the threshold and the rate reached.
    pub ok: Option<bool>,
    pub proxy: Option<Usage>,
    pub client: Option<Usage>,
    /// The UDP target's CPU (with `--target-pid`).
    pub target: Option<Usage>,
    /// The client's QUIC view of its connections (client -> proxy direction), summed over
    /// connections during the trial; `None` when direct.
    pub quic: Option<QuicPath>,
    /// Datagrams the kernel dropped during the trial on the target's socket and on the
    /// proxy's listening socket (receive buffer overflows): where loss happened.
    pub kernel_drops_target: Option<u64>,
    pub kernel_drops_proxy_listener: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QuicPath {
    /// Packets the client declared lost, and congestion events (loss or ECN) it reacted to.
    pub lost_packets: u64,
    pub congestion_events: u64,
    pub sent_packets: u64,
    /// UDP datagrams (GSO batches count as one) the client sent and received.
    pub udp_tx_datagrams: u64,
    pub udp_rx_datagrams: u64,
    /// At the end of the trial: the largest smoothed RTT and the smallest congestion window
    /// over the connections.
    pub rtt_us: f64,
    pub cwnd_bytes: u64,
}

impl Trial {
    pub fn line(&self, label: &str) -> String {
        let target = match (self.target_dps, self.window) {
            (Some(r), _) => format!("rate {}", si(r)),
            (_, Some(w)) => format!("window {w}"),
            _ => String::new(),
        };
        let proxy = self
            .proxy
            .map(|p| {
                format!(
                    " proxy {:.0}% cpu {} MiB",
                    p.cpu_cores * 100.0,
                    p.peak_rss_kib / 1024
                )
            })
            .unwrap_or_default();
        let client = self
            .client
            .map(|c| format!(" client {:.0}% cpu", c.cpu_cores * 100.0))
            .unwrap_or_default();
        let ok = match self.ok {
            Some(true) => " ok",
            Some(false) if self.client_limited => " FAIL (client-limited)",
            Some(false) => " FAIL",
            None => "",
        };
        format!(
            "{label} {target}: offered {}/s delivered {}/s ({:.0} Mbit/s) loss {:.3}% \
             rtt p50 {:.0}us p99 {:.0}us p99.9 {:.0}us{proxy}{client}{ok}",
            si(self.offered_dps),
            si(self.delivered_dps),
            self.delivered_mbps,
            self.loss * 100.0,
            self.rtt_us.p50,
            self.rtt_us.p99,
            self.rtt_us.p999,
        )
    }
}

/// 12345.6 -> "12.3k".
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness_of_even_and_skewed() {
        let even = fairness(&[10, 10, 10, 10], 1.0);
        assert!((even.jain - 1.0).abs() < 1e-9);
        assert!((even.min_over_mean - 1.0).abs() < 1e-9);
        assert_eq!(even.below_half_mean, 0);
        let skewed = fairness(&[40, 0, 0, 0], 2.0);
        assert!((skewed.jain - 0.25).abs() < 1e-9);
        assert_eq!(skewed.below_half_mean, 3);
        assert!((skewed.mean_dps - 5.0).abs() < 1e-9);
    }

    #[test]
    fn si_units() {
        assert_eq!(si(999.0), "999");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(2_500_000.0), "2.50M");
    }
}
