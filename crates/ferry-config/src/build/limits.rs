//! Limits: the overload manager's global downstream connection limit, concurrent streams
//! per connection (HTTP/3 and HTTP/2) and the HCM's `max_stream_duration`.

use std::time::Duration;

use super::{check_name, name_error, type_error, uint, Ctx, Slot, P};
use crate::any::{ResourceMonitorConfig, DOWNSTREAM_CONNECTIONS_CONFIG};
use crate::raw;

const DOWNSTREAM_CONNECTIONS_NAME: &str =
    "envoy.resource_monitors.global_downstream_max_connections";

const RESOURCE_MONITOR_SLOT: Slot = Slot {
    what: "resource monitor",
    category: "envoy.resource_monitors.",
    names: &[DOWNSTREAM_CONNECTIONS_NAME],
    expected: &[DOWNSTREAM_CONNECTIONS_CONFIG],
};

/// Envoy's default `max_concurrent_streams` for QUIC (HTTP/3) connections.
pub(crate) const DEFAULT_H3_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Ferry's default `max_concurrent_streams` for HTTP/2 connections: the same as HTTP/3
/// (Envoy's is 2147483647, no limit in practice).
pub(crate) const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// The largest HTTP/2 `max_concurrent_streams` Envoy accepts.
const H2_MAX_CONCURRENT_STREAMS_LIMIT: u64 = 2_147_483_647;

/// `overload_manager`: the `envoy.resource_monitors.global_downstream_max_connections`
/// monitor's `max_active_downstream_connections`, if configured.
pub(super) fn build_overload_manager(
    ctx: &mut Ctx,
    p: &P,
    o: Option<&raw::OverloadManager>,
) -> Option<u64> {
    let o = o?;
    ctx.unsupported(p, o.unsupported_fields());
    ctx.duration(
        &p.f("refresh_interval"),
        o.refresh_interval.as_ref(),
        Duration::from_secs(1),
    );
    let mp = p.f("resource_monitors");
    let mut limit = None;
    let mut first: Option<usize> = None;
    for (i, m) in o.resource_monitors.iter().enumerate() {
        let p = mp.i(i);
        ctx.unsupported(&p, m.unsupported_fields());
        let name = m.name.as_deref().unwrap_or("");
        match &m.typed_config {
            Some(ResourceMonitorConfig::DownstreamConnections(c)) => {
                check_name(ctx, &p.f("name"), name, DOWNSTREAM_CONNECTIONS_NAME);
                let tp = p.f("typed_config");
                ctx.unsupported(&tp, c.unsupported_fields());
                let fp = tp.f("max_active_downstream_connections");
                if c.max_active_downstream_connections.is_none() {
                    ctx.err(&fp, "is required (a number of connections, at least 1)");
                }
                let max = uint(
                    ctx,
                    &fp,
                    c.max_active_downstream_connections.as_ref(),
                    1,
                    i64::MAX as u64,
                );
                if let Some(f) = first {
                    ctx.err(
                        &p,
                        format!("a second global downstream connection limit (the first is overload_manager.resource_monitors[{f}]); Envoy allows one"),
                    );
                } else {
                    first = Some(i);
                    limit = max;
                }
            }
            Some(ResourceMonitorConfig::Other(url)) => {
                type_error(
                    ctx,
                    &p.f("typed_config").f("@type"),
                    url.as_str(),
                    &RESOURCE_MONITOR_SLOT,
                );
            }
            None => {
                name_error(ctx, &p.f("name"), name, &RESOURCE_MONITOR_SLOT);
            }
        }
    }
    limit
}

/// `udp_listener_config.quic_options.quic_protocol_options.max_concurrent_streams`, when
/// set.
pub(super) fn quic_max_concurrent_streams(
    ctx: &mut Ctx,
    p: &P,
    q: &raw::QuicProtocolOptions,
) -> Option<u32> {
    core_quic_max_concurrent_streams(
        ctx,
        &p.f("quic_protocol_options"),
        q.quic_protocol_options.as_ref(),
    )
}

/// `max_concurrent_streams` of a `config.core.v3.QuicProtocolOptions` at `p`, when set (the
/// listener's, or the HCM's `http3_protocol_options.quic_protocol_options`).
pub(super) fn core_quic_max_concurrent_streams(
    ctx: &mut Ctx,
    p: &P,
    o: Option<&raw::CoreQuicProtocolOptions>,
) -> Option<u32> {
    let o = o?;
    ctx.unsupported(p, o.unsupported_fields());
    uint(
        ctx,
        &p.f("max_concurrent_streams"),
        o.max_concurrent_streams.as_ref(),
        1,
        u64::from(u32::MAX),
    )
    .and_then(|n| u32::try_from(n).ok())
}

/// `http2_protocol_options.max_concurrent_streams`.
pub(super) fn h2_max_concurrent_streams(
    ctx: &mut Ctx,
    p: &P,
    o: Option<&raw::Http2ProtocolOptions>,
) -> u32 {
    uint(
        ctx,
        &p.f("max_concurrent_streams"),
        o.and_then(|o| o.max_concurrent_streams.as_ref()),
        1,
        H2_MAX_CONCURRENT_STREAMS_LIMIT,
    )
    .and_then(|n| u32::try_from(n).ok())
    .unwrap_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS)
}

/// `common_http_protocol_options.max_stream_duration` (absent or `0s`: no limit).
pub(super) fn max_stream_duration(
    ctx: &mut Ctx,
    p: &P,
    o: Option<&raw::CommonHttpProtocolOptions>,
) -> Option<Duration> {
    let o = o?;
    ctx.unsupported(p, o.unsupported_fields());
    let d = ctx.duration(
        &p.f("max_stream_duration"),
        o.max_stream_duration.as_ref(),
        Duration::ZERO,
    );
    (!d.is_zero()).then_some(d)
}
