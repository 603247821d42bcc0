//! `/config_dump`: the effective configuration (every default applied, every file read) in
//! Envoy's `ConfigDump` shape: a `BootstrapConfigDump` whose `bootstrap` is a valid Envoy
//! v3 bootstrap (loading it again gives the same configuration, private keys aside), then
//! the listeners, clusters and routes on their own, as Envoy lists them.
//!
//! Private keys are never printed: they read `[redacted]`, as in Envoy.

use std::time::SystemTime;

use ferry_config::{
    AccessLog, AccessLogSink, Bootstrap, Cluster, CodecType, DiscoveryType, DnsLookupFamily,
    HttpConnectionManager, JsonTemplate, Listener, LogFormat, Route, RouteMatch, SocketProtocol,
    UpstreamProtocol,
};
use serde_json::{json, Map, Value};

/// What a private key reads as in the dump.
pub const REDACTED: &str = "[redacted]";

fn duration(d: std::time::Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else {
        let frac = format!("{nanos:09}");
        format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    }
}

fn socket_address(ip: std::net::IpAddr, port: u16, protocol: Option<&str>) -> Value {
    let mut sa = json!({"address": ip.to_string(), "port_value": port});
    if let (Some(p), Some(m)) = (protocol, sa.as_object_mut()) {
        m.insert("protocol".into(), p.into());
    }
    json!({ "socket_address": sa })
}

fn json_template(t: &JsonTemplate) -> Value {
    match t {
        JsonTemplate::Format(t) => Value::String(t.to_string()),
        JsonTemplate::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        JsonTemplate::Bool(b) => Value::Bool(*b),
        JsonTemplate::Null => Value::Null,
        JsonTemplate::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), json_template(v)))
                .collect(),
        ),
    }
}

fn access_log(a: &AccessLog) -> Value {
    let log_format = match &a.format {
        LogFormat::Text {
            template,
            omit_empty_values,
        } => json!({
            "text_format_source": {"inline_string": template.to_string()},
            "omit_empty_values": omit_empty_values,
        }),
        LogFormat::Json {
            fields,
            omit_empty_values,
        } => json!({
            "json_format": Value::Object(
                fields.iter().map(|(k, v)| (k.clone(), json_template(v))).collect()
            ),
            "omit_empty_values": omit_empty_values,
        }),
    };
    let (name, type_url, mut config) = match &a.sink {
        AccessLogSink::File(path) => (
            "envoy.access_loggers.file",
            "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            json!({"path": path}),
        ),
        AccessLogSink::Stdout => (
            "envoy.access_loggers.stdout",
            "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            json!({}),
        ),
        AccessLogSink::Stderr => (
            "envoy.access_loggers.stderr",
            "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
            json!({}),
        ),
    };
    if let Some(m) = config.as_object_mut() {
        m.insert("log_format".into(), log_format);
    }
    let mut typed = Map::new();
    typed.insert("@type".into(), type_url.into());
    if let Value::Object(m) = config {
        typed.extend(m);
    }
    json!({"name": name, "typed_config": typed})
}

fn route(r: &Route) -> Value {
    let matcher = match &r.matcher {
        RouteMatch::Connect => json!({"connect_matcher": {}}),
        RouteMatch::Prefix(p) => json!({"prefix": p}),
        RouteMatch::Path(p) => json!({"path": p}),
    };
    let upgrades: Vec<Value> = r
        .action
        .upgrade_configs
        .iter()
        .map(|u| {
            let mut v = json!({"upgrade_type": u.upgrade_type, "enabled": u.enabled});
            if let (Some(_), Some(m)) = (&u.connect_config, v.as_object_mut()) {
                m.insert("connect_config".into(), json!({}));
            }
            v
        })
        .collect();
    let mut v = json!({
        "match": matcher,
        "route": {"cluster": r.action.cluster, "upgrade_configs": upgrades},
    });
    if let Some(m) = v.as_object_mut() {
        if let Some(name) = &r.name {
            m.insert("name".into(), name.clone().into());
        }
        if r.pass_through {
            m.insert(
                "metadata".into(),
                json!({"filter_metadata": {"ferry.connect_udp": {"pass_through": true}}}),
            );
        }
    }
    v
}

fn route_config(h: &HttpConnectionManager) -> Value {
    let vhosts: Vec<Value> = h
        .route_config
        .virtual_hosts
        .iter()
        .map(|vh| {
            json!({
                "name": vh.name,
                "domains": vh.domains,
                "routes": vh.routes.iter().map(route).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"name": h.route_config.name, "virtual_hosts": vhosts})
}

fn hcm(h: &HttpConnectionManager) -> Value {
    let codec = match h.codec_type {
        CodecType::Auto => "AUTO",
        CodecType::Http1 => "HTTP1",
        CodecType::Http2 => "HTTP2",
        CodecType::Http3 => "HTTP3",
    };
    let filters: Vec<Value> = h
        .http_filters
        .iter()
        .map(|name| match name.as_str() {
            "envoy.filters.http.dynamic_forward_proxy" => json!({"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                "dns_cache_config": h.dynamic_forward_proxy.as_ref().map(dns_cache),
            }}),
            ferry_config::DESTINATION_POLICY_NAME => json!({"name": name, "is_optional": true, "typed_config": {
                "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                "type_url": ferry_config::DESTINATION_POLICY_TYPE_URL,
                "value": destination_policy(&h.destination_policy),
            }}),
            "envoy.filters.http.basic_auth" => {
                let b = h.basic_auth.as_ref();
                json!({"name": name, "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth",
                    // The password hashes are secrets: only the user names are shown.
                    "users": {"inline_string": b.map(|b| b.users.keys().map(|u| format!("{u}:{REDACTED}")).collect::<Vec<_>>().join("\n"))},
                    "forward_username_header": b.and_then(|b| b.forward_username_header.clone()),
                    "authentication_header": b.map(|b| b.authentication_header.clone()),
                }})
            }
            _ => json!({"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            }}),
        })
        .collect();
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "codec_type": codec,
        "stat_prefix": h.stat_prefix,
        "route_config": route_config(h),
        "http_filters": filters,
        "upgrade_configs": h.upgrade_configs.iter()
            .map(|u| json!({"upgrade_type": u.upgrade_type, "enabled": u.enabled}))
            .collect::<Vec<_>>(),
        "http3_protocol_options": {"allow_extended_connect": h.allow_extended_connect},
        "http2_protocol_options": {
            "allow_connect": h.allow_connect,
            "max_concurrent_streams": h.http2_max_concurrent_streams,
        },
        "common_http_protocol_options": {
            "max_stream_duration": duration(h.max_stream_duration.unwrap_or_default()),
        },
        "stream_idle_timeout": duration(h.stream_idle_timeout.unwrap_or_default()),
        "access_log": h.access_log.iter().map(access_log).collect::<Vec<_>>(),
    })
}

/// A udp_proxy listener's `listener_filters[0]`.
fn udp_proxy(u: &ferry_config::UdpProxy) -> Value {
    let Some(t) = &u.tunneling else {
        return json!({
            "name": "envoy.filters.udp_listener.udp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
                "stat_prefix": u.stat_prefix,
                "matcher": {"on_no_match": {"action": {
                    "name": "route",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route",
                        "cluster": u.cluster,
                    },
                }}},
                "idle_timeout": duration(u.idle_timeout),
                "access_log": u.access_log.iter().map(access_log).collect::<Vec<_>>(),
            },
        });
    };
    let mut tunneling = json!({
        "proxy_host": t.proxy_host,
        "target_host": t.target_host,
        "default_target_port": t.default_target_port,
        "retry_options": {"max_connect_attempts": t.max_connect_attempts},
        "headers_to_add": t.headers_to_add.iter()
            .map(|(k, v)| json!({"header": {"key": k, "value": v}}))
            .collect::<Vec<_>>(),
    });
    if let Some(m) = tunneling.as_object_mut() {
        if let Some(p) = t.proxy_port {
            m.insert("proxy_port".into(), json!(p));
        }
        if t.propagate_response_headers {
            m.insert("propagate_response_headers".into(), json!(true));
        }
        if t.propagate_response_trailers {
            m.insert("propagate_response_trailers".into(), json!(true));
        }
        if let Some(path) = &t.post_path {
            m.insert("use_post".into(), json!(true));
            m.insert("post_path".into(), json!(path));
        }
        if let Some(b) = t.buffer {
            m.insert(
                "buffer_options".into(),
                json!({
                    "max_buffered_datagrams": b.max_buffered_datagrams,
                    "max_buffered_bytes": b.max_buffered_bytes.to_string(),
                }),
            );
        }
    }
    let mut options = serde_json::Map::new();
    if u.flush_access_log_on_tunnel_connected {
        options.insert("flush_access_log_on_tunnel_connected".into(), json!(true));
    }
    if let Some(i) = u.access_log_flush_interval {
        options.insert("access_log_flush_interval".into(), json!(duration(i)));
    }
    json!({
        "name": "envoy.filters.udp_listener.udp_proxy",
        "typed_config": {
            "access_log": u.access_log.iter().map(access_log).collect::<Vec<_>>(),
            "access_log_options": options,
            "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
            "stat_prefix": u.stat_prefix,
            "matcher": {"on_no_match": {"action": {
                "name": "route",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route",
                    "cluster": u.cluster,
                },
            }}},
            "idle_timeout": duration(u.idle_timeout),
            "session_filters": [{
                "name": "envoy.filters.udp.session.http_capsule",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig"},
            }],
            "tunneling_config": tunneling,
        },
    })
}

fn listener(l: &Listener) -> Value {
    let protocol = match l.protocol {
        SocketProtocol::Udp => "UDP",
        SocketProtocol::Tcp => "TCP",
    };
    if let Some(u) = &l.udp_proxy {
        return json!({
            "name": l.name,
            "address": socket_address(l.address.ip(), l.address.port(), Some(protocol)),
            "listener_filters": [udp_proxy(u)],
        });
    }
    let mut chain = Map::new();
    if let Some(tls) = &l.filter_chain.tls {
        let certs: Vec<Value> = tls
            .certificates
            .iter()
            .map(|c| {
                json!({
                    "certificate_chain": {"inline_string": c.certificate_chain_pem},
                    "private_key": {"inline_string": REDACTED},
                })
            })
            .collect();
        let (name, type_url) = if l.quic.is_some() {
            (
                "envoy.transport_sockets.quic",
                "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport",
            )
        } else {
            (
                "envoy.transport_sockets.tls",
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            )
        };
        let mut context = json!({"common_tls_context": {"tls_certificates": certs}});
        if let Some(ca) = &tls.client_ca_pem {
            context["common_tls_context"]["validation_context"] =
                json!({"trusted_ca": {"inline_string": ca}});
            context["require_client_certificate"] = tls.require_client_certificate.into();
        }
        let typed = if l.quic.is_some() {
            json!({"@type": type_url, "downstream_tls_context": context})
        } else {
            let mut m = Map::new();
            m.insert("@type".into(), type_url.into());
            if let Value::Object(c) = context {
                m.extend(c);
            }
            Value::Object(m)
        };
        chain.insert(
            "transport_socket".into(),
            json!({"name": name, "typed_config": typed}),
        );
    }
    chain.insert(
        "filters".into(),
        json!([{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm(&l.filter_chain.hcm),
        }]),
    );
    let mut v = json!({
        "name": l.name,
        "address": socket_address(l.address.ip(), l.address.port(), Some(protocol)),
        "filter_chains": [Value::Object(chain)],
    });
    if let (Some(q), Some(m)) = (&l.quic, v.as_object_mut()) {
        m.insert(
            "udp_listener_config".into(),
            json!({"quic_options": {"quic_protocol_options": {
                "max_concurrent_streams": q.max_concurrent_streams,
            }}}),
        );
    }
    v
}

fn family_name(f: DnsLookupFamily) -> &'static str {
    match f {
        DnsLookupFamily::Auto => "AUTO",
        DnsLookupFamily::V4Only => "V4_ONLY",
        DnsLookupFamily::V6Only => "V6_ONLY",
        DnsLookupFamily::V4Preferred => "V4_PREFERRED",
        DnsLookupFamily::All => "ALL",
    }
}

fn dns_cache(d: &ferry_config::DnsCacheConfig) -> Value {
    let mut v = json!({
        "name": d.name,
        "dns_lookup_family": family_name(d.dns_lookup_family),
        "dns_refresh_rate": duration(d.dns_refresh_rate),
        "host_ttl": duration(d.host_ttl),
        "max_hosts": d.max_hosts,
    });
    if let (false, Some(m)) = (d.resolvers.is_empty(), v.as_object_mut()) {
        let resolvers: Vec<Value> = d
            .resolvers
            .iter()
            .map(|r| socket_address(r.ip(), r.port(), None))
            .collect();
        m.insert(
            "typed_dns_resolver_config".into(),
            json!({
                "name": "envoy.network.dns_resolver.cares",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                    "resolvers": resolvers,
                },
            }),
        );
    }
    v
}

fn destination_policy(p: &ferry_config::DestinationPolicy) -> Value {
    let rules = |rules: &[ferry_config::AddressRule]| -> Vec<Value> {
        rules
            .iter()
            .map(|r| {
                json!({
                    "cidr": format!("{}/{}", r.network, r.prefix_len),
                    "ports": format!("{}-{}", r.ports.0.max(1), r.ports.1),
                })
            })
            .collect()
    };
    json!({
        "allow": rules(&p.allow),
        "deny": rules(&p.deny),
        "default_action": if p.default_deny { "DENY" } else { "ALLOW" },
    })
}

fn cluster(c: &Cluster) -> Value {
    let discovery = match c.discovery {
        DiscoveryType::Static => "STATIC",
        DiscoveryType::StrictDns => "STRICT_DNS",
        DiscoveryType::LogicalDns => "LOGICAL_DNS",
        DiscoveryType::DynamicForwardProxy => {
            return json!({
                "name": c.name,
                "connect_timeout": duration(c.connect_timeout),
                "lb_policy": "CLUSTER_PROVIDED",
                "cluster_type": {
                    "name": "envoy.clusters.dynamic_forward_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                        "dns_cache_config": c.dns_cache.as_ref().map(dns_cache),
                    },
                },
            });
        }
    };
    let family = family_name(c.dns_lookup_family);
    let endpoints: Vec<Value> = c
        .endpoints
        .iter()
        .map(|e| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": e.address, "port_value": e.port
            }}}})
        })
        .collect();
    let mut v = json!({
        "name": c.name,
        "type": discovery,
        "dns_lookup_family": family,
        "dns_refresh_rate": duration(c.dns_refresh_rate),
        "connect_timeout": duration(c.connect_timeout),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": c.name,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
    });
    if let (Some(up), Some(m)) = (&c.upstream, v.as_object_mut()) {
        let explicit = match up.protocol {
            UpstreamProtocol::Http3 {
                allow_extended_connect,
            } => json!({"http3_protocol_options": {
                "allow_extended_connect": allow_extended_connect
            }}),
            UpstreamProtocol::Http2 => json!({"http2_protocol_options": {}}),
            UpstreamProtocol::Http1 => json!({"http_protocol_options": {}}),
        };
        m.insert(
            "typed_extension_protocol_options".into(),
            json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": explicit,
            }}),
        );
        let mut tls = Map::new();
        if let Some(sni) = &up.tls.sni {
            tls.insert("sni".into(), sni.clone().into());
        }
        if let Some(ca) = &up.tls.trusted_ca_pem {
            tls.insert(
                "common_tls_context".into(),
                json!({"validation_context": {"trusted_ca": {"inline_string": ca}}}),
            );
        }
        let socket = match up.protocol {
            UpstreamProtocol::Http3 { .. } => Some(
                json!({"name": "envoy.transport_sockets.quic", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport",
                    "upstream_tls_context": Value::Object(tls),
                }}),
            ),
            _ if up.plaintext => None,
            _ => {
                let mut ctx = tls;
                ctx.insert(
                    "@type".into(),
                    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
                        .into(),
                );
                Some(
                    json!({"name": "envoy.transport_sockets.tls", "typed_config": Value::Object(ctx)}),
                )
            }
        };
        if let Some(socket) = socket {
            m.insert("transport_socket".into(), socket);
        }
    }
    v
}

/// The effective bootstrap in Envoy's v3 shape.
pub fn bootstrap(b: &Bootstrap) -> Value {
    let mut v = json!({
        "static_resources": {
            "listeners": b.listeners.iter().map(listener).collect::<Vec<_>>(),
            "clusters": b.clusters.iter().map(cluster).collect::<Vec<_>>(),
        }
    });
    if let (Some(a), Some(m)) = (&b.admin, v.as_object_mut()) {
        m.insert(
            "admin".into(),
            json!({"address": socket_address(a.address.ip(), a.address.port(), None)}),
        );
    }
    if let (Some(max), Some(m)) = (b.max_downstream_connections, v.as_object_mut()) {
        m.insert(
            "overload_manager".into(),
            json!({"resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": max,
                },
            }]}),
        );
    }
    v
}

fn with_type(type_url: &str, inner: Value) -> Value {
    let mut m = Map::new();
    m.insert("@type".into(), type_url.into());
    if let Value::Object(o) = inner {
        m.extend(o);
    }
    Value::Object(m)
}

/// `/config_dump`: Envoy's `ConfigDump`.
pub fn config_dump(b: &Bootstrap, loaded: SystemTime) -> Value {
    let updated = crate::accesslog::strftime("%Y-%m-%dT%H:%M:%E3SZ", loaded);
    // One static entry of a ConfigDump section: `{KEY: {"@type": TYPE, ...}, "last_updated"}`.
    let entry = |key: &str, type_url: &str, inner: Value| {
        let mut m = Map::new();
        m.insert(key.into(), with_type(type_url, inner));
        m.insert("last_updated".into(), updated.clone().into());
        Value::Object(m)
    };
    let listeners: Vec<Value> = b
        .listeners
        .iter()
        .map(|l| {
            entry(
                "listener",
                "type.googleapis.com/envoy.config.listener.v3.Listener",
                listener(l),
            )
        })
        .collect();
    let clusters: Vec<Value> = b
        .clusters
        .iter()
        .map(|c| {
            entry(
                "cluster",
                "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                cluster(c),
            )
        })
        .collect();
    let routes: Vec<Value> = b
        .listeners
        .iter()
        .map(|l| {
            entry(
                "route_config",
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                route_config(&l.filter_chain.hcm),
            )
        })
        .collect();
    json!({"configs": [
        {
            "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "bootstrap": bootstrap(b),
            "last_updated": updated,
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "static_clusters": clusters,
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "static_listeners": listeners,
        },
        {
            "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "static_route_configs": routes,
        },
    ]})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(std::time::Duration::from_secs(300)), "300s");
        assert_eq!(duration(std::time::Duration::from_millis(250)), "0.25s");
        assert_eq!(duration(std::time::Duration::new(1, 1)), "1.000000001s");
    }
}
