//! A raw UDP listener's `listener_filters[]`: `envoy.filters.udp_listener.udp_proxy` with
//! `tunneling_config` (each downstream UDP session tunnelled with CONNECT-UDP).

use std::time::Duration;

use super::{check_name, name_error, type_error, uint, Ctx, KnownClusters, Slot, P};
use crate::any::{HTTP_CAPSULE_SESSION_FILTER, UDP_PROXY, UDP_PROXY_ROUTE};
use crate::model;
use crate::raw::{self, ListenerFilterConfig, MatchActionConfig, SessionFilterConfig};

const UDP_PROXY_NAME: &str = "envoy.filters.udp_listener.udp_proxy";
const HTTP_CAPSULE_NAME: &str = "envoy.filters.udp.session.http_capsule";

/// Envoy's udp_proxy defaults.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_BUFFERED_DATAGRAMS: u32 = 1024;
const DEFAULT_MAX_BUFFERED_BYTES: u64 = 16384;
/// Ferry's ceiling for `max_buffered_bytes` (per session): every buffer is bounded.
const MAX_BUFFERED_BYTES_LIMIT: u64 = 16 << 20;

const LISTENER_FILTER_SLOT: Slot = Slot {
    what: "UDP listener filter",
    category: "envoy.filters.udp",
    names: &["envoy.filters.udp.udp_proxy"],
    expected: &[UDP_PROXY],
};
const SESSION_FILTER_SLOT: Slot = Slot {
    what: "UDP session filter",
    category: "envoy.filters.udp",
    names: &["envoy.filters.udp.udp_proxy.session.http_capsule"],
    expected: &[HTTP_CAPSULE_SESSION_FILTER],
};
const MATCH_ACTION_SLOT: Slot = Slot {
    what: "udp_proxy match action",
    category: "envoy.filters.udp",
    names: &["envoy.filters.udp.udp_proxy"],
    expected: &[UDP_PROXY_ROUTE],
};

pub(super) fn build_listener_filters(
    ctx: &mut Ctx,
    p: &P,
    filters: &[raw::ListenerFilter],
    clusters: &KnownClusters,
) -> Option<model::UdpProxy> {
    let mut out = None;
    for (i, f) in filters.iter().enumerate() {
        let fp = p.i(i);
        ctx.unsupported(&fp, f.unsupported_fields());
        let name = f.name.as_deref().unwrap_or("");
        match &f.typed_config {
            Some(ListenerFilterConfig::UdpProxy(u)) => {
                check_name(ctx, &fp.f("name"), name, UDP_PROXY_NAME);
                let built = build_udp_proxy(ctx, &fp.f("typed_config"), u, clusters);
                if out.is_some() {
                    ctx.err(
                        &fp,
                        "Ferry supports one udp_proxy filter per listener (found a second one)",
                    );
                } else {
                    out = built;
                }
            }
            Some(ListenerFilterConfig::Other(url)) => {
                type_error(
                    ctx,
                    &fp.f("typed_config").f("@type"),
                    url,
                    &LISTENER_FILTER_SLOT,
                );
            }
            None if name == UDP_PROXY_NAME => ctx.err(
                &fp.f("typed_config"),
                format!(
                    "is required: `{UDP_PROXY}` with stat_prefix, matcher and tunneling_config"
                ),
            ),
            None => {
                name_error(ctx, &fp.f("name"), name, &LISTENER_FILTER_SLOT);
            }
        }
    }
    out
}

fn build_udp_proxy(
    ctx: &mut Ctx,
    p: &P,
    u: &raw::UdpProxyConfig,
    clusters: &KnownClusters,
) -> Option<model::UdpProxy> {
    ctx.unsupported(p, u.unsupported_fields());
    let stat_prefix = ctx
        .required(&p.f("stat_prefix"), u.stat_prefix.as_ref())
        .to_owned();
    let idle_timeout = ctx.duration(
        &p.f("idle_timeout"),
        u.idle_timeout.as_ref(),
        DEFAULT_IDLE_TIMEOUT,
    );

    // Where sessions go: `matcher.on_no_match.action` (a Route), or the deprecated `cluster`.
    let (cluster, cluster_path) = match (&u.cluster, &u.matcher) {
        (Some(_), Some(_)) => {
            ctx.err(
                &p.f("cluster"),
                "only one of cluster and matcher may be set",
            );
            (String::new(), p.f("cluster"))
        }
        (Some(c), None) => (
            ctx.required(&p.f("cluster"), Some(c)).to_owned(),
            p.f("cluster"),
        ),
        (None, Some(m)) => build_matcher(ctx, &p.f("matcher"), m),
        (None, None) => {
            ctx.err(&p.f("matcher"), "is required (or the deprecated `cluster`): the cluster of CONNECT-UDP proxies to tunnel to");
            (String::new(), p.f("matcher"))
        }
    };
    let plain = u.tunneling_config.is_none();
    if !cluster.is_empty() {
        if !clusters.defined.contains(cluster.as_str()) {
            ctx.err(
                &cluster_path,
                format!("unknown cluster `{cluster}`: no static_resources.clusters[] entry has this name"),
            );
        } else if !plain && !clusters.proxies.contains_key(&cluster) {
            ctx.err(
                &cluster_path,
                format!("cluster `{cluster}` is not a CONNECT-UDP proxy Ferry can reach: it needs typed_extension_protocol_options with explicit_http_config (http3_protocol_options with a QUIC transport_socket, or http2_protocol_options / http_protocol_options)"),
            );
        }
    }

    // The http_capsule session filter turns datagrams into DATAGRAM capsules; Ferry always
    // speaks CONNECT-UDP, so it is required (without it Envoy would send raw bytes).
    let sp = p.f("session_filters");
    let mut capsule = false;
    for (i, f) in u.session_filters.iter().enumerate() {
        let fp = sp.i(i);
        ctx.unsupported(&fp, f.unsupported_fields());
        let name = f.name.as_deref().unwrap_or("");
        match &f.typed_config {
            Some(SessionFilterConfig::HttpCapsule(c)) => {
                check_name(ctx, &fp.f("name"), name, HTTP_CAPSULE_NAME);
                ctx.unsupported(&fp.f("typed_config"), c.unsupported_fields());
                capsule = true;
            }
            Some(SessionFilterConfig::Other(url)) => {
                type_error(
                    ctx,
                    &fp.f("typed_config").f("@type"),
                    url,
                    &SESSION_FILTER_SLOT,
                );
            }
            None => {
                name_error(ctx, &fp.f("name"), name, &SESSION_FILTER_SLOT);
            }
        }
    }

    let tp = p.f("tunneling_config");
    let tunneling = match &u.tunneling_config {
        Some(t) => {
            if !capsule && u.session_filters.is_empty() {
                ctx.err(
                    &sp,
                    format!("a `{HTTP_CAPSULE_NAME}` session filter is required with tunneling_config (as in Envoy: it makes the tunnel carry DATAGRAM capsules)"),
                );
            }
            let built = build_tunneling(ctx, &tp, t);
            // POST tunnels: HTTP/2 only, as in Envoy (whose tunnels are all HTTP/2).
            if built.post_path.is_some() {
                match clusters.proxies.get(&cluster) {
                    Some(model::UpstreamProtocol::Http2) | None => {}
                    Some(other) => {
                        let version = match other {
                            model::UpstreamProtocol::Http3 { .. } => "HTTP/3",
                            _ => "HTTP/1.1",
                        };
                        ctx.err(
                            &tp.f("use_post"),
                            format!("POST tunnels need an HTTP/2 upstream (as in Envoy): cluster `{cluster}` is reached over {version}; give it explicit_http_config.http2_protocol_options, or drop use_post for CONNECT-UDP"),
                        );
                    }
                }
            }
            Some(built)
        }
        None => {
            if capsule {
                ctx.err(
                    &sp,
                    format!("the `{HTTP_CAPSULE_NAME}` session filter needs tunneling_config: without it the udp_proxy relays plain UDP, and Ferry does not wrap plain UDP in capsules"),
                );
            }
            None
        }
    };
    let access_log = super::accesslog::build_access_logs(ctx, &p.f("access_log"), &u.access_log);
    let op = p.f("access_log_options");
    let (flush_access_log_on_tunnel_connected, access_log_flush_interval) =
        match &u.access_log_options {
            Some(o) => {
                ctx.unsupported(&op, o.unsupported_fields());
                let ip = op.f("access_log_flush_interval");
                let interval = o.access_log_flush_interval.as_ref().map(|d| {
                    let v = ctx.duration(&ip, Some(d), Duration::ZERO);
                    if v < Duration::from_millis(1) {
                        ctx.err(&ip, "must be at least 1ms (as in Envoy)");
                    }
                    v.max(Duration::from_millis(1))
                });
                (
                    o.flush_access_log_on_tunnel_connected.unwrap_or(false),
                    interval,
                )
            }
            None => (false, None),
        };
    Some(model::UdpProxy {
        stat_prefix,
        cluster,
        idle_timeout,
        tunneling,
        access_log,
        flush_access_log_on_tunnel_connected,
        access_log_flush_interval,
    })
}

fn build_matcher(ctx: &mut Ctx, p: &P, m: &raw::Matcher) -> (String, P) {
    ctx.unsupported(p, m.unsupported_fields());
    let op = p.f("on_no_match");
    let Some(on) = &m.on_no_match else {
        if m.unsupported_fields().is_empty() {
            ctx.err(
                &op,
                "is required: Ferry routes every session to one cluster (on_no_match.action)",
            );
        }
        return (String::new(), op);
    };
    ctx.unsupported(&op, on.unsupported_fields());
    let ap = op.f("action");
    let Some(action) = &on.action else {
        ctx.err(
            &ap,
            format!("is required: a `{UDP_PROXY_ROUTE}` naming the cluster"),
        );
        return (String::new(), ap);
    };
    ctx.unsupported(&ap, action.unsupported_fields());
    let cp = ap.f("typed_config");
    match &action.typed_config {
        Some(MatchActionConfig::Route(r)) => {
            ctx.unsupported(&cp, r.unsupported_fields());
            let clp = cp.f("cluster");
            (ctx.required(&clp, r.cluster.as_ref()).to_owned(), clp)
        }
        Some(MatchActionConfig::Other(url)) => {
            type_error(ctx, &cp.f("@type"), url, &MATCH_ACTION_SLOT);
            (String::new(), cp)
        }
        None => {
            ctx.err(&cp, format!("is required: `{UDP_PROXY_ROUTE}`"));
            (String::new(), cp)
        }
    }
}

fn build_tunneling(ctx: &mut Ctx, p: &P, t: &raw::UdpTunnelingConfig) -> model::UdpTunneling {
    ctx.unsupported(p, t.unsupported_fields());
    let proxy_host = ctx
        .required(&p.f("proxy_host"), t.proxy_host.as_ref())
        .to_owned();
    let target_host = ctx
        .required(&p.f("target_host"), t.target_host.as_ref())
        .to_owned();
    for (field, value) in [("proxy_host", &proxy_host), ("target_host", &target_host)] {
        if value.contains('%') {
            ctx.err(
                &p.f(field),
                "command operators (`%...%`) are not supported by Ferry (yet): write the host literally",
            );
        } else if value.contains(['/', ' ', '?', '#']) {
            ctx.err(
                &p.f(field),
                format!("`{value}` is not a host name or address"),
            );
        }
    }
    let proxy_port = uint(ctx, &p.f("proxy_port"), t.proxy_port.as_ref(), 1, 65535)
        .and_then(|v| u16::try_from(v).ok());
    let dp = p.f("default_target_port");
    let default_target_port = match uint(ctx, &dp, t.default_target_port.as_ref(), 1, 65535) {
        Some(v) => u16::try_from(v).unwrap_or(0),
        None => {
            if t.default_target_port.is_none() {
                ctx.err(&dp, "is required (1..=65535)");
            }
            0
        }
    };

    let rp = p.f("retry_options");
    let max_connect_attempts = match &t.retry_options {
        Some(r) => {
            ctx.unsupported(&rp, r.unsupported_fields());
            uint(
                ctx,
                &rp.f("max_connect_attempts"),
                r.max_connect_attempts.as_ref(),
                1,
                u64::from(u32::MAX),
            )
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(1)
        }
        None => 1,
    };

    let hp = p.f("headers_to_add");
    let mut headers_to_add = Vec::with_capacity(t.headers_to_add.len());
    for (i, h) in t.headers_to_add.iter().enumerate() {
        let ip = hp.i(i);
        ctx.unsupported(&ip, h.unsupported_fields());
        let Some(header) = &h.header else {
            ctx.err(&ip.f("header"), "is required");
            continue;
        };
        let hp = ip.f("header");
        ctx.unsupported(&hp, header.unsupported_fields());
        let key = ctx
            .required(&hp.f("key"), header.key.as_ref())
            .to_ascii_lowercase();
        let value = header.value.clone().unwrap_or_default();
        if key.starts_with(':') || key == "host" {
            ctx.err(
                &hp.f("key"),
                "pseudo-headers and Host cannot be added (as in Envoy)",
            );
            continue;
        }
        if !key.is_empty() && !key.bytes().all(super::is_tchar) {
            ctx.err(&hp.f("key"), format!("`{key}` is not a valid header name"));
            continue;
        }
        if value.contains('%') {
            ctx.err(
                &hp.f("value"),
                "command operators (`%...%`) are not supported by Ferry (yet)",
            );
            continue;
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            ctx.err(&hp.f("value"), "a header value cannot hold CR, LF or NUL");
            continue;
        }
        if !key.is_empty() {
            headers_to_add.push((key, value));
        }
    }

    let bp = p.f("buffer_options");
    let buffer = t.buffer_options.as_ref().map(|b| {
        ctx.unsupported(&bp, b.unsupported_fields());
        model::BufferOptions {
            max_buffered_datagrams: uint(
                ctx,
                &bp.f("max_buffered_datagrams"),
                b.max_buffered_datagrams.as_ref(),
                0,
                u64::from(u32::MAX),
            )
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(DEFAULT_MAX_BUFFERED_DATAGRAMS),
            max_buffered_bytes: uint(
                ctx,
                &bp.f("max_buffered_bytes"),
                b.max_buffered_bytes.as_ref(),
                0,
                MAX_BUFFERED_BYTES_LIMIT,
            )
            .unwrap_or(DEFAULT_MAX_BUFFERED_BYTES),
        }
    });

    // `use_post` / `post_path`: Envoy's checks and default.
    let use_post = t.use_post.unwrap_or(false);
    let pp = p.f("post_path");
    let post_path = match (&t.post_path, use_post) {
        (Some(path), false) if !path.is_empty() => {
            ctx.err(
                &pp,
                "can't set a post path when POST method isn't used (use_post: true), as in Envoy",
            );
            None
        }
        (_, false) => None,
        (None, true) => Some("/".to_owned()),
        (Some(path), true) if path.is_empty() => Some("/".to_owned()),
        (Some(path), true) => {
            if !path.starts_with('/') {
                ctx.err(&pp, "must start with '/' (as in Envoy)");
            } else if path.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
                ctx.err(
                    &pp,
                    format!("`{path}` is not a request path (spaces, control characters or `#`)"),
                );
            }
            Some(path.clone())
        }
    };

    model::UdpTunneling {
        propagate_response_headers: t.propagate_response_headers.unwrap_or(false),
        propagate_response_trailers: t.propagate_response_trailers.unwrap_or(false),
        post_path,
        proxy_host,
        proxy_port,
        target_host,
        default_target_port,
        max_connect_attempts,
        headers_to_add,
        buffer,
    }
}
