//! The admin endpoint's stat formats, as Envoy prints them: `/stats` (text),
//! `/stats?format=json` and `/stats/prometheus` (Prometheus text exposition 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use regex::Regex;

use crate::stats::{HistogramSummary, Metric, PROMETHEUS_BOUNDS, SUPPORTED_QUANTILES};

/// Which stats a query selects: Envoy's `filter`, `invert_filter`, `usedonly` and `type`.
#[derive(Debug, Default)]
pub struct StatsQuery {
    pub filter: Option<Regex>,
    pub invert_filter: bool,
    pub used_only: bool,
    pub kind: Kind,
    pub json: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    #[default]
    All,
    Counters,
    Gauges,
    Histograms,
}

/// Decode one `application/x-www-form-urlencoded` query component.
pub fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query's `key=value` pairs, decoded (a bare `key` has an empty value).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode_component(k), decode_component(v)),
            None => (decode_component(kv), String::new()),
        })
        .collect()
}

impl StatsQuery {
    /// Parse `/stats` or `/stats/prometheus` parameters; `Err` is the 400 body.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut q = StatsQuery::default();
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "filter" if !v.is_empty() => {
                    q.filter = Some(
                        Regex::new(&v).map_err(|e| format!("Invalid re2 regex: {e}"))?,
                    );
                }
                "filter" => {}
                "invert_filter" => q.invert_filter = true,
                "usedonly" => q.used_only = true,
                "format" => match v.as_str() {
                    "json" => q.json = true,
                    "text" | "" => q.json = false,
                    other => {
                        return Err(format!(
                            "usage: /stats?format=(text|json): format={other} is not supported by Ferry"
                        ))
                    }
                },
                "type" => {
                    q.kind = match v.as_str() {
                        "All" | "" => Kind::All,
                        "Counters" => Kind::Counters,
                        "Gauges" => Kind::Gauges,
                        "Histograms" => Kind::Histograms,
                        other => return Err(format!("invalid type={other}")),
                    }
                }
                // Accepted as in Envoy; Ferry has one bucket layout for each format.
                "histogram_buckets" | "text_readouts" => {}
                other => return Err(format!("unknown query parameter `{other}`")),
            }
        }
        Ok(q)
    }

    fn selects(&self, name: &str, m: &Metric) -> bool {
        let kind_ok = matches!(
            (self.kind, m),
            (Kind::All, _)
                | (Kind::Counters, Metric::Counter(_))
                | (Kind::Gauges, Metric::Gauge(_))
                | (Kind::Histograms, Metric::Histogram(_))
        );
        let filter_ok = match &self.filter {
            Some(re) => re.is_match(name) != self.invert_filter,
            None => true,
        };
        kind_ok && filter_ok && (!self.used_only || m.used())
    }

    pub fn select(&self, entries: Vec<(String, Metric)>) -> Vec<(String, Metric)> {
        entries
            .into_iter()
            .filter(|(n, m)| self.selects(n, m))
            .collect()
    }
}

/// A quantile as Envoy prints it (`{fmt}`'s shortest form; `nan` when empty).
fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "nan".into(),
    }
}

/// `/stats`: `name: value` lines, counters and gauges by name, then histograms by name
/// (`name: P0(interval,cumulative) P25(...) ...`, or `No recorded values`).
pub fn text(selected: &[(String, Metric)]) -> String {
    let mut out = String::new();
    for (name, m) in selected {
        match m {
            Metric::Counter(c) => {
                let _ = writeln!(out, "{name}: {}", c.get());
            }
            Metric::Gauge(g) => {
                let _ = writeln!(out, "{name}: {}", g.get());
            }
            Metric::Histogram(_) => {}
        }
    }
    for (name, m) in selected {
        let Metric::Histogram(h) = m else { continue };
        let s = h.summary();
        if s.interval.is_none() && s.cumulative.is_none() {
            let _ = writeln!(out, "{name}: No recorded values");
            continue;
        }
        let parts: Vec<String> = SUPPORTED_QUANTILES
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let pick = |v: &Option<Vec<f64>>| v.as_ref().and_then(|v| v.get(i).copied());
                format!(
                    "P{q}({},{})",
                    num(pick(&s.interval)),
                    num(pick(&s.cumulative))
                )
            })
            .collect();
        let _ = writeln!(out, "{name}: {}", parts.join(" "));
    }
    out
}

/// `/stats?format=json`: Envoy's shape, `{"stats": [{"name", "value"}..., {"histograms":
/// {"supported_quantiles", "computed_quantiles": [{"name", "values": [{"cumulative",
/// "interval"}]}]}}]}`.
pub fn json(selected: &[(String, Metric)]) -> serde_json::Value {
    use serde_json::json;
    let mut stats: Vec<serde_json::Value> = selected
        .iter()
        .filter_map(|(name, m)| match m {
            Metric::Counter(c) => Some(json!({"name": name, "value": c.get()})),
            Metric::Gauge(g) => Some(json!({"name": name, "value": g.get()})),
            Metric::Histogram(_) => None,
        })
        .collect();
    let computed: Vec<serde_json::Value> = selected
        .iter()
        .filter_map(|(name, m)| match m {
            Metric::Histogram(h) => Some((name, h.summary())),
            _ => None,
        })
        .map(|(name, s)| {
            let values: Vec<serde_json::Value> = (0..SUPPORTED_QUANTILES.len())
                .map(|i| {
                    let pick = |v: &Option<Vec<f64>>| v.as_ref().and_then(|v| v.get(i).copied());
                    json!({"cumulative": pick(&s.cumulative), "interval": pick(&s.interval)})
                })
                .collect();
            json!({"name": name, "values": values})
        })
        .collect();
    if !computed.is_empty() {
        stats.push(json!({"histograms": {
            "supported_quantiles": SUPPORTED_QUANTILES,
            "computed_quantiles": computed,
        }}));
    }
    json!({ "stats": stats })
}

/// Envoy's tag extraction for the stats Ferry has: the Prometheus family name and labels
/// of a dotted stat name.
///
/// `http.<prefix>.X` -> `envoy_http_X{envoy_http_conn_manager_prefix="<prefix>"}`,
/// `cluster.<name>.X` -> `envoy_cluster_X{envoy_cluster_name="<name>"}`,
/// `listener.<address>.X` -> `envoy_listener_X{envoy_listener_address="<address>"}`,
/// `..._rq_2xx` -> `..._rq_xx{envoy_response_code_class="2"}`.
pub fn prometheus_series(name: &str) -> (String, Vec<(&'static str, String)>) {
    let mut family = String::from("envoy_");
    let mut rest = name;
    let mut listener = None;
    let mut http = None;
    let mut cluster = None;
    if let Some(r) = rest.strip_prefix("listener.") {
        if let Some((addr, after)) = split_listener_address(r) {
            listener = Some(addr.to_owned());
            family.push_str("listener_");
            rest = after;
        }
    }
    if let Some(r) = rest.strip_prefix("http.") {
        if let Some((prefix, after)) = r.split_once('.') {
            http = Some(prefix.to_owned());
            family.push_str("http_");
            rest = after;
        }
    } else if listener.is_none() {
        if let Some(r) = rest.strip_prefix("cluster.") {
            if let Some((c, after)) = r.split_once('.') {
                cluster = Some(c.to_owned());
                family.push_str("cluster_");
                rest = after;
            }
        }
    }
    let mut class = None;
    let mut tail = rest.to_owned();
    if let Some(base) = rest.strip_suffix("xx") {
        if let Some(digit) = base.chars().last().filter(|c| ('1'..='5').contains(c)) {
            let stem = &base[..base.len() - 1];
            if stem.ends_with("_rq_") {
                class = Some(digit.to_string());
                tail = format!("{stem}xx");
            }
        }
    }
    family.extend(tail.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            c
        } else {
            '_'
        }
    }));
    let mut labels = Vec::new();
    if let Some(c) = class {
        labels.push(("envoy_response_code_class", c));
    }
    if let Some(h) = http {
        labels.push(("envoy_http_conn_manager_prefix", h));
    }
    if let Some(l) = listener {
        labels.push(("envoy_listener_address", l));
    }
    if let Some(c) = cluster {
        labels.push(("envoy_cluster_name", c));
    }
    (family, labels)
}

/// `127.0.0.1_4433.rest` or `[__1]_4433.rest` -> (address, rest).
fn split_listener_address(r: &str) -> Option<(&str, &str)> {
    let port_start = if r.starts_with('[') {
        r.find("]_")? + 2
    } else {
        let us = r.find('_')?;
        if !r[..us].bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return None;
        }
        us + 1
    };
    let digits = r[port_start..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    let end = port_start + digits;
    if digits == 0 || r.as_bytes().get(end) != Some(&b'.') {
        return None;
    }
    Some((&r[..end], &r[end + 1..]))
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_set(labels: &[(&str, String)], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn prometheus_number(v: f64) -> String {
    if v.is_infinite() {
        "+Inf".into()
    } else {
        format!("{v}")
    }
}

/// `/stats/prometheus`: counters, then gauges, then histograms, each family once with its
/// `# TYPE` line, as Envoy does.
pub fn prometheus(selected: &[(String, Metric)]) -> String {
    enum Sample {
        Int(i128),
        Hist(HistogramSummary),
    }
    type Labels = Vec<(&'static str, String)>;
    // (kind order, family) -> series
    let mut families: BTreeMap<(u8, String), Vec<(Labels, Sample)>> = BTreeMap::new();
    for (name, m) in selected {
        let (family, labels) = prometheus_series(name);
        let (order, sample) = match m {
            Metric::Counter(c) => (0, Sample::Int(i128::from(c.get()))),
            Metric::Gauge(g) => (1, Sample::Int(i128::from(g.get()))),
            Metric::Histogram(h) => (2, Sample::Hist(h.summary())),
        };
        families
            .entry((order, family))
            .or_default()
            .push((labels, sample));
    }
    let mut out = String::new();
    for ((order, family), series) in families {
        let kind = ["counter", "gauge", "histogram"][usize::from(order)];
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for (labels, sample) in series {
            match sample {
                Sample::Int(v) => {
                    let _ = writeln!(out, "{family}{} {v}", label_set(&labels, None));
                }
                Sample::Hist(s) => {
                    let bounds = PROMETHEUS_BOUNDS.iter().copied().chain([f64::INFINITY]);
                    for (le, count) in bounds.zip(s.prometheus_buckets.iter()) {
                        let le = prometheus_number(le);
                        let _ = writeln!(
                            out,
                            "{family}_bucket{} {count}",
                            label_set(&labels, Some(("le", &le)))
                        );
                    }
                    let ls = label_set(&labels, None);
                    let _ = writeln!(out, "{family}_sum{ls} {}", s.sum);
                    let _ = writeln!(out, "{family}_count{ls} {}", s.count);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::stats::Store;

    #[test]
    fn tag_extraction_follows_envoy() {
        let cases = [
            (
                "http.ingress_http.downstream_rq_2xx",
                "envoy_http_downstream_rq_xx",
                vec![
                    ("envoy_response_code_class", "2"),
                    ("envoy_http_conn_manager_prefix", "ingress_http"),
                ],
            ),
            (
                "listener.127.0.0.1_4433.http.ingress_http.downstream_rq_5xx",
                "envoy_listener_http_downstream_rq_xx",
                vec![
                    ("envoy_response_code_class", "5"),
                    ("envoy_http_conn_manager_prefix", "ingress_http"),
                    ("envoy_listener_address", "127.0.0.1_4433"),
                ],
            ),
            (
                "listener.[__1]_443.downstream_cx_total",
                "envoy_listener_downstream_cx_total",
                vec![("envoy_listener_address", "[__1]_443")],
            ),
            (
                "cluster.service_target.upstream_cx_total",
                "envoy_cluster_upstream_cx_total",
                vec![("envoy_cluster_name", "service_target")],
            ),
            (
                "http.p.connect_udp.datagrams_dropped_too_large",
                "envoy_http_connect_udp_datagrams_dropped_too_large",
                vec![("envoy_http_conn_manager_prefix", "p")],
            ),
            ("server.live", "envoy_server_live", vec![]),
            (
                "listener_manager.total_listeners_active",
                "envoy_listener_manager_total_listeners_active",
                vec![],
            ),
        ];
        for (name, family, labels) in cases {
            let (f, l) = prometheus_series(name);
            assert_eq!(f, family, "{name}");
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(l, labels, "{name}");
        }
    }

    #[test]
    fn text_and_prometheus_shapes() {
        let s = Store::new();
        s.counter("http.a.downstream_rq_2xx").add(3);
        s.counter("http.b.downstream_rq_2xx").inc();
        s.gauge("server.live").set(1);
        s.histogram("http.a.downstream_rq_time").record(29);
        s.histogram("http.b.downstream_rq_time");
        let all = StatsQuery::default().select(s.entries());
        let t = text(&all);
        assert_eq!(
            t,
            "http.a.downstream_rq_2xx: 3\nhttp.b.downstream_rq_2xx: 1\nserver.live: 1\n\
             http.a.downstream_rq_time: P0(nan,29.5) P25(nan,29.5) P50(nan,29.5) P75(nan,29.5) \
             P90(nan,29.5) P95(nan,29.5) P99(nan,29.5) P99.5(nan,29.5) P99.9(nan,29.5) \
             P100(nan,29.5)\nhttp.b.downstream_rq_time: No recorded values\n"
        );
        let p = prometheus(&all);
        assert!(p.starts_with(
            "# TYPE envoy_http_downstream_rq_xx counter\n\
             envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",envoy_http_conn_manager_prefix=\"a\"} 3\n\
             envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",envoy_http_conn_manager_prefix=\"b\"} 1\n\
             # TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n\
             # TYPE envoy_http_downstream_rq_time histogram\n"
        ), "{p}");
        assert!(p.contains(
            "envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix=\"a\",le=\"25\"} 0\n\
             envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix=\"a\",le=\"50\"} 1\n"
        ), "{p}");
        assert!(p.contains("envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix=\"a\",le=\"+Inf\"} 1\n"));
        assert!(p.contains(
            "envoy_http_downstream_rq_time_sum{envoy_http_conn_manager_prefix=\"a\"} 29\n"
        ));
        assert!(p.contains(
            "envoy_http_downstream_rq_time_count{envoy_http_conn_manager_prefix=\"b\"} 0\n"
        ));
    }

    #[test]
    fn queries() {
        let s = Store::new();
        s.counter("http.a.downstream_rq_2xx").add(3);
        s.counter("http.a.downstream_rq_4xx");
        s.gauge("http.a.downstream_cx_active");
        let names = |q: &str| {
            StatsQuery::parse(q)
                .unwrap()
                .select(s.entries())
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("usedonly"), vec!["http.a.downstream_rq_2xx"]);
        assert_eq!(
            names("filter=rq_%5B24%5Dxx"),
            vec!["http.a.downstream_rq_2xx", "http.a.downstream_rq_4xx"]
        );
        assert_eq!(
            names("filter=rq&invert_filter"),
            vec!["http.a.downstream_cx_active"]
        );
        assert_eq!(names("type=Gauges"), vec!["http.a.downstream_cx_active"]);
        assert!(StatsQuery::parse("filter=(").is_err());
        assert!(StatsQuery::parse("bogus=1").is_err());
        assert_eq!(decode_component("a%2Fb+c%zz%4"), "a/b c%zz%4");
    }
}
