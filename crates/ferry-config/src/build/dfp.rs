//! The dynamic forward proxy (`dns_cache_config`, shared by the HTTP filter and the
//! cluster) and Ferry's destination policy filter.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{Ctx, P};
use crate::any::CARES_DNS_RESOLVER;
use crate::model;
use crate::raw::{self, DnsResolverConfig, PortValue};

/// The name of Ferry's destination policy HTTP filter.
pub const DESTINATION_POLICY_NAME: &str = "ferry.filters.http.destination_policy";
/// The `type_url` of its `xds.type.v3.TypedStruct` config.
pub const DESTINATION_POLICY_TYPE_URL: &str =
    "type.googleapis.com/ferry.filters.http.destination_policy.v1.DestinationPolicy";

/// Envoy's `DnsCacheConfig` defaults.
const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
const DEFAULT_HOST_TTL: Duration = Duration::from_secs(300);
const DEFAULT_MAX_HOSTS: u32 = 1024;

pub(super) fn build_dns_cache(
    ctx: &mut Ctx,
    p: &P,
    c: &raw::DnsCacheConfig,
) -> Option<model::DnsCacheConfig> {
    ctx.unsupported(p, c.unsupported_fields());
    let name = ctx.required(&p.f("name"), c.name.as_ref()).to_owned();
    let dns_lookup_family = super::lookup_family(
        ctx,
        &p.f("dns_lookup_family"),
        c.dns_lookup_family.as_deref(),
    );
    let rp = p.f("dns_refresh_rate");
    let dns_refresh_rate = ctx.duration(&rp, c.dns_refresh_rate.as_ref(), DEFAULT_REFRESH);
    if dns_refresh_rate < Duration::from_millis(1) {
        ctx.err(&rp, "must be at least 1ms");
    }
    let tp = p.f("host_ttl");
    let host_ttl = ctx.duration(&tp, c.host_ttl.as_ref(), DEFAULT_HOST_TTL);
    if host_ttl.is_zero() {
        ctx.err(&tp, "must be greater than 0s");
    }
    let mp = p.f("max_hosts");
    let max_hosts = match &c.max_hosts {
        None => DEFAULT_MAX_HOSTS,
        Some(PortValue::Number(n)) if (1..=u64::from(u32::MAX)).contains(n) => *n as u32,
        Some(PortValue::Number(n)) => {
            ctx.err(&mp, format!("`{n}`: must be 1..=4294967295"));
            DEFAULT_MAX_HOSTS
        }
        Some(PortValue::Invalid(v)) => {
            ctx.err(&mp, format!("`{v}` is not a positive integer"));
            DEFAULT_MAX_HOSTS
        }
    };
    let resolvers = match &c.typed_dns_resolver_config {
        Some(r) => dns_resolvers(ctx, &p.f("typed_dns_resolver_config"), r),
        None => Vec::new(),
    };
    Some(model::DnsCacheConfig {
        name,
        dns_lookup_family,
        dns_refresh_rate,
        host_ttl,
        max_hosts,
        resolvers,
    })
}

const CARES_NAME: &str = "envoy.network.dns_resolver.cares";

/// `typed_dns_resolver_config`: c-ares with its `resolvers` (IP literal addresses).
fn dns_resolvers(ctx: &mut Ctx, p: &P, r: &raw::TypedDnsResolverConfig) -> Vec<SocketAddr> {
    ctx.unsupported(p, r.unsupported_fields());
    let cp = p.f("typed_config");
    let cares = match &r.typed_config {
        Some(DnsResolverConfig::Cares(c)) => c,
        Some(DnsResolverConfig::Other(url)) => {
            ctx.err(
                &cp.f("@type"),
                format!("DNS resolver `{url}` is not supported by Ferry (yet); supported: `{CARES_DNS_RESOLVER}`"),
            );
            return Vec::new();
        }
        None => {
            ctx.err(&cp, format!("is required: `{CARES_DNS_RESOLVER}`"));
            return Vec::new();
        }
    };
    super::check_name(
        ctx,
        &p.f("name"),
        r.name.as_deref().unwrap_or(""),
        CARES_NAME,
    );
    ctx.unsupported(&cp, cares.unsupported_fields());
    let rp = cp.f("resolvers");
    if cares.resolvers.is_empty() {
        ctx.err(&rp, "is required: the DNS servers to ask (without them, leave typed_dns_resolver_config out to use the system resolver)");
    }
    let mut out = Vec::new();
    for (i, a) in cares.resolvers.iter().enumerate() {
        let ap = rp.i(i);
        ctx.unsupported(&ap, a.unsupported_fields());
        let Some(sa) = &a.socket_address else {
            ctx.err(&ap.f("socket_address"), "is required");
            continue;
        };
        let sp = ap.f("socket_address");
        ctx.unsupported(&sp, sa.unsupported_fields());
        let ip = match sa.address.as_deref().map(str::parse::<IpAddr>) {
            Some(Ok(ip)) => ip,
            _ => {
                ctx.err(&sp.f("address"), "must be an IP address (a DNS server)");
                continue;
            }
        };
        let port = match &sa.port_value {
            None => 53,
            Some(PortValue::Number(n)) if (1..=65535).contains(n) => *n as u16,
            Some(_) => {
                ctx.err(&sp.f("port_value"), "must be 1..=65535");
                continue;
            }
        };
        out.push(SocketAddr::new(ip, port));
    }
    out
}

/// A route to a dynamic forward proxy cluster needs the HCM's dynamic forward proxy
/// filter, with the same DNS cache (Envoy shares the cache between the two by name).
pub(super) fn check_routes(
    ctx: &mut Ctx,
    p: &P,
    routes: &model::RouteConfiguration,
    filter: Option<&model::DnsCacheConfig>,
) {
    let mut problems = Vec::new();
    for (v, vh) in routes.virtual_hosts.iter().enumerate() {
        for (r, route) in vh.routes.iter().enumerate() {
            let cluster = &route.action.cluster;
            let Some(cache) = ctx.dfp_clusters.get(cluster) else {
                continue;
            };
            let rp = p
                .f("route_config")
                .f("virtual_hosts")
                .i(v)
                .f("routes")
                .i(r)
                .f("route")
                .f("cluster");
            let message = match filter {
                None => format!(
                    "`{cluster}` is a dynamic forward proxy cluster: the HCM needs the `envoy.filters.http.dynamic_forward_proxy` HTTP filter (before the router) with dns_cache_config name `{}`",
                    cache.name
                ),
                Some(f) if f.name != cache.name => format!(
                    "`{cluster}` uses DNS cache `{}` but the dynamic forward proxy filter uses `{}`; they must name the same cache",
                    cache.name, f.name
                ),
                Some(f) if f != cache => format!(
                    "the DNS cache `{}` is configured differently in the dynamic forward proxy filter and in cluster `{cluster}`; Envoy shares one cache per name, so the two configs must be identical",
                    cache.name
                ),
                Some(_) => continue,
            };
            problems.push((rp, message));
        }
    }
    for (rp, message) in problems {
        ctx.err(&rp, message);
    }
}

/// `ferry.filters.http.destination_policy`: an optional HTTP filter (Envoy skips it) whose
/// `typed_config` is an `xds.type.v3.TypedStruct`:
///
/// ```yaml
/// - name: ferry.filters.http.destination_policy
///   is_optional: true
///   typed_config:
///     "@type": type.googleapis.com/xds.type.v3.TypedStruct
///     type_url: type.googleapis.com/ferry.filters.http.destination_policy.v1.DestinationPolicy
///     value:
///       allow: [{ cidr: 127.0.0.0/8, ports: "9000-9100" }]
///       deny: [{ cidr: 10.0.0.0/8 }]
///       default_action: ALLOW
/// ```
pub(super) fn build_destination_policy(
    ctx: &mut Ctx,
    fp: &P,
    f: &raw::HttpFilter,
    t: &raw::TypedStruct,
) -> Option<model::DestinationPolicy> {
    let cp = fp.f("typed_config");
    let name = f.name.as_deref().unwrap_or("");
    match t.type_url.as_deref() {
        Some(DESTINATION_POLICY_TYPE_URL) => {}
        Some(other) => {
            ctx.err(
                &cp.f("type_url"),
                format!("unknown TypedStruct type_url `{other}`; Ferry's only TypedStruct filter is `{DESTINATION_POLICY_TYPE_URL}`"),
            );
            return None;
        }
        None => {
            ctx.err(
                &cp.f("type_url"),
                format!("is required: `{DESTINATION_POLICY_TYPE_URL}`"),
            );
            return None;
        }
    }
    super::check_name(ctx, &fp.f("name"), name, DESTINATION_POLICY_NAME);
    if f.is_optional != Some(true) {
        ctx.err(
            &fp.f("is_optional"),
            format!("must be true: `{DESTINATION_POLICY_NAME}` is a Ferry extension, and Envoy refuses a bootstrap with an unknown filter unless it is optional"),
        );
    }
    let vp = cp.f("value");
    let mut policy = model::DestinationPolicy::default();
    let Some(value) = &t.value else {
        return Some(policy);
    };
    let Some(map) = value.as_object() else {
        ctx.err(
            &vp,
            "must be a mapping: {allow: [...], deny: [...], default_action: ALLOW|DENY}",
        );
        return None;
    };
    for (key, v) in map {
        let kp = vp.f(key);
        match key.as_str() {
            "allow" => policy.allow = rules(ctx, &kp, v),
            "deny" => policy.deny = rules(ctx, &kp, v),
            "default_action" => match v.as_str() {
                Some("ALLOW") => policy.default_deny = false,
                Some("DENY") => policy.default_deny = true,
                _ => ctx.err(&kp, "must be ALLOW or DENY"),
            },
            _ => ctx.err(
                &kp,
                "unknown field; a destination policy has `allow`, `deny` and `default_action`",
            ),
        }
    }
    Some(policy)
}

fn rules(ctx: &mut Ctx, p: &P, v: &serde_json::Value) -> Vec<model::AddressRule> {
    let Some(list) = v.as_array() else {
        ctx.err(
            p,
            "must be a list of rules: [{cidr: 10.0.0.0/8, ports: \"1-65535\"}]",
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let rp = p.i(i);
        let Some(map) = r.as_object() else {
            ctx.err(&rp, "must be a mapping: {cidr: ..., ports: ...}");
            continue;
        };
        let mut cidr = None;
        let mut ports = (0u16, 65535u16);
        for (key, v) in map {
            let kp = rp.f(key);
            match key.as_str() {
                "cidr" => match v.as_str().map(parse_cidr) {
                    Some(Ok(c)) => cidr = Some(c),
                    Some(Err(e)) => ctx.err(&kp, e),
                    None => ctx.err(
                        &kp,
                        "must be a string such as \"10.0.0.0/8\" or \"::1/128\"",
                    ),
                },
                "ports" => {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        _ => String::new(),
                    };
                    match parse_ports(&text) {
                        Some(p) => ports = p,
                        None => ctx.err(
                            &kp,
                            format!("`{text}`: must be a port (\"53\") or a range (\"9000-9100\") within 1..=65535"),
                        ),
                    }
                }
                _ => ctx.err(&kp, "unknown field; a rule has `cidr` and `ports`"),
            }
        }
        match cidr {
            Some((network, prefix_len)) => out.push(model::AddressRule {
                network,
                prefix_len,
                ports,
            }),
            None if map.contains_key("cidr") => {}
            None => ctx.err(&rp.f("cidr"), "is required"),
        }
    }
    out
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host). Host bits must be zero.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{text}`: `{addr}` is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("`{text}`: the prefix length must be 0..={max}")),
        },
    };
    let rule = model::AddressRule {
        network: ip,
        prefix_len: len,
        ports: (0, 65535),
    };
    let zeroed = match ip {
        IpAddr::V4(v4) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    if zeroed != ip {
        return Err(format!(
            "`{text}` has host bits set; the network is {zeroed}/{len}"
        ));
    }
    debug_assert!(rule.matches(ip, 1));
    Ok((ip, len))
}

/// `"53"` or `"9000-9100"`, within 1..=65535.
fn parse_ports(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?),
        None => {
            let p = text.trim().parse::<u16>().ok()?;
            (p, p)
        }
    };
    (lo >= 1 && lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok(("10.0.0.0".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), 8))
        );
        assert!(parse_cidr("10.0.0.1/8").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("x/8").is_err());
        assert_eq!(parse_cidr("::1").map(|c| c.1), Ok(128));
        assert_eq!(parse_cidr("0.0.0.0/0").map(|c| c.1), Ok(0));
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("53"), Some((53, 53)));
        assert_eq!(parse_ports("9000-9100"), Some((9000, 9100)));
        assert_eq!(parse_ports("0"), None);
        assert_eq!(parse_ports("9-1"), None);
        assert_eq!(parse_ports("x"), None);
        assert_eq!(parse_ports("70000"), None);
    }
}
