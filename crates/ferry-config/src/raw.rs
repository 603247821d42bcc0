//! Layer 1: the Envoy v3 wire shapes, exactly as written in a bootstrap.
//!
//! Every struct mirrors one Envoy proto message, with the proto field names, and denies
//! unknown fields, so a typo is reported with its full path. Each message also lists the
//! Envoy fields Ferry does not implement (yet): they are accepted by the parser (any
//! value) and reported by validation as "Envoy field not supported by Ferry (yet)", so
//! nothing in a bootstrap is ever silently ignored.
//!
//! Nothing here applies defaults or checks values: scalars stay `Option`s and enums stay
//! strings, so that validation (layer 2, `build.rs`) can report every problem at once,
//! each with its path.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

pub(crate) use crate::any::{
    AccessLoggerConfig, ClusterTypeConfig, DnsResolverConfig, DownstreamTransportConfig,
    HttpFilterConfig, ListenerFilterConfig, MatchActionConfig, NetworkFilterConfig,
    ProtocolOptionsConfig, ResourceMonitorConfig, SessionFilterConfig, UpstreamTransportConfig,
};

/// Any value at all: the value of an Envoy field Ferry does not implement. Only its
/// presence is kept, so that validation can name it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Ok(Unsupported)
    }
}

/// Declares one Envoy message: the fields Ferry implements (with their raw types), then
/// the Envoy fields it knows but does not implement. Generates the struct (with
/// `deny_unknown_fields`) and `unsupported_fields()`, which lists the latter when present.
macro_rules! envoy_message {
    (
        $(#[$meta:meta])*
        struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
        unsupported [ $($un:ident),* $(,)? ]
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub(crate) struct $name {
            $( $(#[$fmeta])* pub(crate) $field: $ty, )*
            $( pub(crate) $un: Option<Unsupported>, )*
        }

        impl $name {
            /// The Envoy fields present here that Ferry does not implement, in
            /// declaration order.
            #[allow(unused_mut)]
            pub(crate) fn unsupported_fields(&self) -> Vec<&'static str> {
                let mut present = Vec::new();
                $( if self.$un.is_some() { present.push(stringify!($un)); } )*
                present
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// envoy.config.bootstrap.v3

envoy_message! {
    /// `envoy.config.bootstrap.v3.Bootstrap`.
    struct Bootstrap {
        admin: Option<Admin>,
        static_resources: Option<StaticResources>,
        overload_manager: Option<OverloadManager>,
    }
    unsupported [
        node, node_context_params, dynamic_resources, cluster_manager, hds_config, flags_path,
        stats_sinks, deferred_stat_options, stats_config, stats_flush_interval,
        stats_flush_on_admin, stats_eviction_interval, watchdog, watchdogs, tracing,
        layered_runtime, enable_dispatcher_stats, header_prefix,
        stats_server_version_override, use_tcp_for_dns_lookups, dns_resolution_config,
        typed_dns_resolver_config, bootstrap_extensions, fatal_actions, config_sources,
        default_config_source, default_socket_interface, certificate_provider_instances,
        inline_headers, perf_tracing_file_path, default_regex_engine, xds_delegate_extension,
        xds_config_tracker_extension, listener_manager, application_log_config,
        grpc_async_client_manager_config, memory_allocator_manager,
    ]
}

envoy_message! {
    /// `envoy.config.overload.v3.OverloadManager`: only the global downstream connection
    /// limit resource monitor.
    struct OverloadManager {
        /// Accepted and unused: the connection limit monitor is checked on every accept.
        refresh_interval: Option<RawDuration>,
        resource_monitors: Vec<ResourceMonitor>,
    }
    unsupported [actions, buffer_factory_config, loadshed_points]
}

envoy_message! {
    /// `envoy.config.overload.v3.ResourceMonitor`.
    struct ResourceMonitor {
        name: Option<String>,
        typed_config: Option<ResourceMonitorConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig`.
    struct DownstreamConnectionsConfig {
        max_active_downstream_connections: Option<PortValue>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.config.bootstrap.v3.Admin`.
    struct Admin {
        address: Option<Address>,
    }
    unsupported [access_log, access_log_path, profile_path, socket_options, ignore_global_conn_limit]
}

envoy_message! {
    /// `envoy.config.bootstrap.v3.Bootstrap.StaticResources`.
    struct StaticResources {
        listeners: Vec<Listener>,
        clusters: Vec<Cluster>,
    }
    unsupported [secrets]
}

// ---------------------------------------------------------------------------------------
// envoy.config.core.v3: addresses, data sources

envoy_message! {
    /// `envoy.config.core.v3.Address`.
    struct Address {
        socket_address: Option<SocketAddress>,
    }
    unsupported [pipe, envoy_internal_address]
}

envoy_message! {
    /// `envoy.config.core.v3.SocketAddress`.
    struct SocketAddress {
        protocol: Option<String>,
        address: Option<String>,
        port_value: Option<PortValue>,
    }
    unsupported [named_port, resolver_name, ipv4_compat, network_namespace_filepath]
}

envoy_message! {
    /// `envoy.config.core.v3.DataSource`.
    struct DataSource {
        filename: Option<String>,
        inline_string: Option<String>,
        inline_bytes: Option<String>,
    }
    unsupported [environment_variable, watched_directory]
}

/// A `uint32` as protobuf JSON writes it: a number, or a decimal string. Anything else is
/// kept as written so that validation reports it (with every other problem) by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortValue {
    Number(u64),
    Invalid(String),
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number (0..=65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortValue, E> {
                Ok(PortValue::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortValue, E> {
                Ok(u64::try_from(v)
                    .map_or_else(|_| PortValue::Invalid(v.to_string()), PortValue::Number))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PortValue, E> {
                Ok(PortValue::Invalid(format!("{v:?}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PortValue, E> {
                Ok(PortValue::Invalid(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortValue, E> {
                Ok(v.parse::<u64>()
                    .map_or_else(|_| PortValue::Invalid(v.to_owned()), PortValue::Number))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A `google.protobuf.Duration` as written: the protobuf JSON string form (`"5s"`,
/// `"0.25s"`) or the object form (`{seconds: 5, nanos: 0}`). Checked by validation, which
/// also reports a bare number (`5`) as such.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawDuration {
    Text(String),
    Object { seconds: i64, nanos: i64 },
    Number(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DurationObject {
    #[serde(default)]
    seconds: Option<i64>,
    #[serde(default)]
    nanos: Option<i64>,
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string such as \"5s\" or \"0.25s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(format!("{v:?}")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawDuration, A::Error> {
                let o = DurationObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawDuration::Object {
                    seconds: o.seconds.unwrap_or(0),
                    nanos: o.nanos.unwrap_or(0),
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------
// envoy.config.listener.v3

envoy_message! {
    /// `envoy.config.listener.v3.Listener`.
    struct Listener {
        name: Option<String>,
        address: Option<Address>,
        udp_listener_config: Option<UdpListenerConfig>,
        filter_chains: Vec<FilterChain>,
        listener_filters: Vec<ListenerFilter>,
        socket_options: Vec<SocketOption>,
    }
    unsupported [
        additional_addresses, stat_prefix, filter_chain_matcher, use_original_dst,
        default_filter_chain, per_connection_buffer_limit_bytes, metadata, deprecated_v1,
        drain_type, listener_filters_timeout,
        continue_on_listener_filters_timeout, transparent, freebind,
        tcp_fast_open_queue_length, traffic_direction, api_listener, connection_balance_config,
        reuse_port, enable_reuse_port, access_log, tcp_backlog_size,
        max_connections_to_accept_per_socket_event, bind_to_port, internal_listener,
        enable_mptcp, ignore_global_conn_limit, bypass_overload_manager, fcds_config,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.SocketOption`.
    struct SocketOption {
        description: Option<String>,
        level: Option<PortValue>,
        name: Option<PortValue>,
        int_value: Option<PortValue>,
        state: Option<String>,
        /// `type` (which sockets the option applies to; Ferry's listeners have one).
        #[serde(rename = "type")]
        socket_type: Option<Unsupported>,
    }
    unsupported [buf_value]
}

envoy_message! {
    /// `envoy.config.listener.v3.UdpListenerConfig`.
    struct UdpListenerConfig {
        quic_options: Option<QuicProtocolOptions>,
    }
    unsupported [downstream_socket_config, udp_packet_packet_writer_config]
}

envoy_message! {
    /// `envoy.config.listener.v3.QuicProtocolOptions`.
    struct QuicProtocolOptions {
        quic_protocol_options: Option<CoreQuicProtocolOptions>,
    }
    unsupported [
        idle_timeout, crypto_handshake_timeout, enabled,
        packets_to_read_to_connection_count_ratio, crypto_stream_config, proof_source_config,
        connection_id_generator_config, server_preferred_address_config,
        send_disable_active_migration, connection_debug_visitor_config, save_cmsg_config,
        reject_new_connections, max_sessions_per_event_loop,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.QuicProtocolOptions` (on a listener's `quic_options`).
    struct CoreQuicProtocolOptions {
        max_concurrent_streams: Option<PortValue>,
    }
    unsupported [
        initial_stream_window_size, initial_connection_window_size,
        num_timeouts_to_trigger_port_migration, connection_keepalive, connection_options,
        client_connection_options, idle_network_timeout, max_packet_length,
    ]
}

envoy_message! {
    /// `envoy.config.listener.v3.FilterChain`.
    struct FilterChain {
        /// A label only (used by Envoy's filter chain matcher, which Ferry does not have).
        name: Option<String>,
        filters: Vec<Filter>,
        transport_socket: Option<DownstreamTransportSocket>,
    }
    unsupported [
        filter_chain_match, use_proxy_proto, metadata, transport_socket_connect_timeout,
        on_demand_configuration,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.TransportSocket` on a listener's filter chain.
    struct DownstreamTransportSocket {
        name: Option<String>,
        typed_config: Option<DownstreamTransportConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.config.listener.v3.Filter` (a network filter).
    struct Filter {
        name: Option<String>,
        typed_config: Option<NetworkFilterConfig>,
    }
    unsupported [config_discovery]
}

envoy_message! {
    /// `envoy.config.listener.v3.ListenerFilter` (on a UDP listener: a UDP listener filter).
    struct ListenerFilter {
        name: Option<String>,
        typed_config: Option<ListenerFilterConfig>,
    }
    unsupported [config_discovery, filter_disabled]
}

// ---------------------------------------------------------------------------------------
// envoy.extensions.filters.udp.udp_proxy.v3

envoy_message! {
    /// `envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig`.
    struct UdpProxyConfig {
        stat_prefix: Option<String>,
        cluster: Option<String>,
        matcher: Option<Matcher>,
        idle_timeout: Option<RawDuration>,
        session_filters: Vec<SessionFilter>,
        tunneling_config: Option<UdpTunnelingConfig>,
        access_log: Vec<AccessLog>,
        access_log_options: Option<UdpAccessLogOptions>,
    }
    unsupported [
        use_original_src_ip, hash_policies, upstream_socket_config,
        use_per_packet_load_balancing, proxy_access_log,
    ]
}

envoy_message! {
    /// `UdpProxyConfig.UdpAccessLogOptions`.
    struct UdpAccessLogOptions {
        access_log_flush_interval: Option<RawDuration>,
        flush_access_log_on_tunnel_connected: Option<bool>,
    }
    unsupported []
}

envoy_message! {
    /// `xds.type.matcher.v3.Matcher`: only `on_no_match` (every session to one cluster).
    struct Matcher {
        on_no_match: Option<OnMatch>,
    }
    unsupported [matcher_list, matcher_tree]
}

envoy_message! {
    /// `xds.type.matcher.v3.Matcher.OnMatch`.
    struct OnMatch {
        action: Option<TypedExtensionConfig>,
    }
    unsupported [matcher, keep_matching]
}

envoy_message! {
    /// `envoy.config.core.v3.TypedExtensionConfig` holding a udp_proxy route action.
    struct TypedExtensionConfig {
        name: Option<String>,
        typed_config: Option<MatchActionConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.filters.udp.udp_proxy.v3.Route`.
    struct UdpRoute {
        cluster: Option<String>,
    }
    unsupported []
}

envoy_message! {
    /// `UdpProxyConfig.SessionFilter`.
    struct SessionFilter {
        name: Option<String>,
        typed_config: Option<SessionFilterConfig>,
    }
    unsupported [config_discovery]
}

envoy_message! {
    /// `envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig`.
    struct HttpCapsuleFilterConfig {}
    unsupported []
}

envoy_message! {
    /// `UdpProxyConfig.UdpTunnelingConfig`.
    struct UdpTunnelingConfig {
        proxy_host: Option<String>,
        proxy_port: Option<PortValue>,
        target_host: Option<String>,
        default_target_port: Option<PortValue>,
        retry_options: Option<RetryOptions>,
        headers_to_add: Vec<HeaderValueOption>,
        buffer_options: Option<BufferOptions>,
        propagate_response_headers: Option<bool>,
        propagate_response_trailers: Option<bool>,
        use_post: Option<bool>,
        post_path: Option<String>,
    }
    unsupported []
}

envoy_message! {
    /// `UdpTunnelingConfig.RetryOptions`.
    struct RetryOptions {
        max_connect_attempts: Option<PortValue>,
    }
    unsupported [backoff_options]
}

envoy_message! {
    /// `UdpTunnelingConfig.BufferOptions`.
    struct BufferOptions {
        max_buffered_datagrams: Option<PortValue>,
        max_buffered_bytes: Option<PortValue>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.config.core.v3.HeaderValueOption`.
    struct HeaderValueOption {
        header: Option<HeaderValue>,
    }
    unsupported [append, append_action, keep_empty_value]
}

envoy_message! {
    /// `envoy.config.core.v3.HeaderValue`.
    struct HeaderValue {
        key: Option<String>,
        value: Option<String>,
    }
    unsupported [raw_value]
}

// ---------------------------------------------------------------------------------------
// envoy.extensions.transport_sockets.{quic,tls}.v3

envoy_message! {
    /// `envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport`.
    struct QuicDownstreamTransport {
        downstream_tls_context: Option<DownstreamTlsContext>,
    }
    unsupported [enable_early_data]
}

envoy_message! {
    /// `envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext`.
    struct DownstreamTlsContext {
        common_tls_context: Option<CommonTlsContext>,
        require_client_certificate: Option<bool>,
    }
    unsupported [
        require_sni, session_ticket_keys,
        session_ticket_keys_sds_secret_config, disable_stateless_session_resumption,
        disable_stateful_session_resumption, session_timeout, ocsp_staple_policy,
        full_scan_certs_on_sni_mismatch, prefer_client_ciphers,
    ]
}

envoy_message! {
    /// `envoy.extensions.transport_sockets.tls.v3.CommonTlsContext`.
    struct CommonTlsContext {
        tls_certificates: Vec<TlsCertificate>,
        validation_context: Option<CertificateValidationContext>,
        alpn_protocols: Vec<String>,
    }
    unsupported [
        tls_params, tls_certificate_sds_secret_configs, tls_certificate_provider_instance,
        custom_tls_certificate_selector, tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance, validation_context_sds_secret_config, combined_validation_context,
        validation_context_certificate_provider, validation_context_certificate_provider_instance,
        custom_handshaker, key_log,
    ]
}

envoy_message! {
    /// `envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext`.
    struct CertificateValidationContext {
        trusted_ca: Option<DataSource>,
    }
    unsupported [
        ca_certificate_provider_instance, system_root_certs, watched_directory,
        verify_certificate_spki, verify_certificate_hash, match_typed_subject_alt_names,
        match_subject_alt_names, require_signed_certificate_timestamp, crl,
        allow_expired_certificate, trust_chain_verification, custom_validator_config,
        only_verify_leaf_cert_crl, max_verify_depth,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.TransportSocket` on a cluster.
    struct UpstreamTransportSocket {
        name: Option<String>,
        typed_config: Option<UpstreamTransportConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport`.
    struct QuicUpstreamTransport {
        upstream_tls_context: Option<UpstreamTlsContext>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext`.
    struct UpstreamTlsContext {
        sni: Option<String>,
        common_tls_context: Option<CommonTlsContext>,
    }
    unsupported [
        auto_host_sni, auto_sni_san_validation, allow_renegotiation, max_session_keys,
        enforce_rsa_key_usage,
    ]
}

envoy_message! {
    /// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
    struct HttpProtocolOptions {
        explicit_http_config: Option<ExplicitHttpConfig>,
    }
    unsupported [
        common_http_protocol_options, upstream_http_protocol_options,
        use_downstream_protocol_config, auto_config, http_filters, header_validation_config,
        outlier_detection,
    ]
}

envoy_message! {
    /// `HttpProtocolOptions.ExplicitHttpConfig`.
    struct ExplicitHttpConfig {
        http3_protocol_options: Option<Http3ProtocolOptions>,
        http2_protocol_options: Option<Http2ProtocolOptions>,
        http_protocol_options: Option<Http1ProtocolOptions>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.config.core.v3.Http1ProtocolOptions` (on a cluster: HTTP/1.1 upstreams).
    struct Http1ProtocolOptions {
    }
    unsupported [
        allow_absolute_url, accept_http_10, default_host_for_http_10, header_key_format,
        enable_trailers, allow_chunked_length, override_stream_error_on_invalid_http_message,
        send_fully_qualified_url, use_balsa_parser, allow_custom_methods,
        ignore_http_11_upgrade,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.Metadata`.
    struct Metadata {
        filter_metadata: std::collections::BTreeMap<String, serde_json::Value>,
    }
    unsupported [typed_filter_metadata]
}

envoy_message! {
    /// `envoy.extensions.transport_sockets.tls.v3.TlsCertificate`.
    struct TlsCertificate {
        certificate_chain: Option<DataSource>,
        private_key: Option<DataSource>,
    }
    unsupported [
        pkcs12, watched_directory, private_key_provider, password, ocsp_staple,
        signed_certificate_timestamp,
    ]
}

// ---------------------------------------------------------------------------------------
// envoy.extensions.filters.network.http_connection_manager.v3

envoy_message! {
    /// `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`.
    struct HttpConnectionManager {
        codec_type: Option<String>,
        stat_prefix: Option<String>,
        route_config: Option<RouteConfiguration>,
        http_filters: Vec<HttpFilter>,
        upgrade_configs: Vec<HcmUpgradeConfig>,
        http3_protocol_options: Option<Http3ProtocolOptions>,
        http2_protocol_options: Option<Http2ProtocolOptions>,
        stream_idle_timeout: Option<RawDuration>,
        access_log: Vec<AccessLog>,
        common_http_protocol_options: Option<CommonHttpProtocolOptions>,
    }
    unsupported [
        rds, scoped_routes, add_user_agent, tracing,
        http_protocol_options, server_name, server_header_transformation,
        scheme_header_transformation, max_request_headers_kb, max_request_headers_count,
        request_timeout, request_headers_timeout, drain_timeout, delayed_close_timeout,
        access_log_flush_interval, flush_access_log_on_new_request,
        access_log_options, use_remote_address, xff_num_trusted_hops,
        original_ip_detection_extensions, early_header_mutation_extensions,
        internal_address_config, skip_xff_append, via, generate_request_id,
        preserve_external_request_id, always_set_request_id_in_response,
        forward_client_cert_details, set_current_client_cert_details, proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6, normalize_path, merge_slashes,
        path_with_escaped_slashes_action, request_id_extension, local_reply_config,
        strip_matching_host_port, strip_any_host_port, stream_error_on_invalid_http_message,
        path_normalization_options, strip_trailing_host_dot, proxy_status_config,
        typed_header_validation_config, append_x_forwarded_port, append_local_overload,
        add_proxy_protocol_connection_state, http1_safe_max_connection_duration,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.HttpProtocolOptions` (an HCM's `common_http_protocol_options`).
    struct CommonHttpProtocolOptions {
        max_stream_duration: Option<RawDuration>,
    }
    unsupported [
        idle_timeout, max_connection_duration, max_headers_count, max_response_headers_kb,
        headers_with_underscores_action, max_requests_per_connection,
    ]
}

envoy_message! {
    /// `HttpConnectionManager.UpgradeConfig`.
    struct HcmUpgradeConfig {
        upgrade_type: Option<String>,
        enabled: Option<bool>,
    }
    unsupported [filters]
}

envoy_message! {
    /// `envoy.config.accesslog.v3.AccessLog`.
    struct AccessLog {
        name: Option<String>,
        typed_config: Option<AccessLoggerConfig>,
    }
    unsupported [filter]
}

envoy_message! {
    /// `envoy.extensions.access_loggers.file.v3.FileAccessLog`.
    struct FileAccessLog {
        path: Option<String>,
        log_format: Option<SubstitutionFormatString>,
    }
    unsupported [format, json_format, typed_json_format]
}

envoy_message! {
    /// `envoy.extensions.access_loggers.stream.v3.StdoutAccessLog` and `StderrAccessLog`.
    struct StreamAccessLog {
        log_format: Option<SubstitutionFormatString>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.config.core.v3.SubstitutionFormatString`.
    struct SubstitutionFormatString {
        text_format: Option<String>,
        text_format_source: Option<DataSource>,
        json_format: Option<serde_json::Value>,
        omit_empty_values: Option<bool>,
    }
    unsupported [content_type, formatters, json_format_options]
}

envoy_message! {
    /// `envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter`.
    struct HttpFilter {
        name: Option<String>,
        typed_config: Option<HttpFilterConfig>,
        is_optional: Option<bool>,
    }
    unsupported [config_discovery, disabled]
}

envoy_message! {
    /// `envoy.extensions.filters.http.basic_auth.v3.BasicAuth`.
    struct BasicAuth {
        users: Option<DataSource>,
        forward_username_header: Option<String>,
        authentication_header: Option<String>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig`.
    struct DfpFilterConfig {
        dns_cache_config: Option<DnsCacheConfig>,
    }
    unsupported [sub_cluster_config, save_upstream_address, allow_dynamic_host_from_filter_state]
}

envoy_message! {
    /// `envoy.extensions.common.dynamic_forward_proxy.v3.DnsCacheConfig`.
    struct DnsCacheConfig {
        name: Option<String>,
        dns_lookup_family: Option<String>,
        dns_refresh_rate: Option<RawDuration>,
        host_ttl: Option<RawDuration>,
        max_hosts: Option<PortValue>,
        typed_dns_resolver_config: Option<TypedDnsResolverConfig>,
    }
    unsupported [
        dns_min_refresh_rate, dns_failure_refresh_rate, dns_cache_circuit_breaker,
        use_tcp_for_dns_lookups, dns_resolution_config,
        preresolve_hostnames, dns_query_timeout, key_value_config, disable_dns_refresh_on_failure,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.TypedExtensionConfig` as a DNS resolver.
    struct TypedDnsResolverConfig {
        name: Option<String>,
        typed_config: Option<DnsResolverConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig`.
    struct CaresDnsResolverConfig {
        resolvers: Vec<Address>,
    }
    unsupported [
        use_resolvers_as_fallback, filter_unroutable_families, dns_resolver_options,
        udp_max_queries, query_timeout_seconds, query_tries, rotate_nameservers,
        edns0_max_payload_size, max_udp_channel_duration, reinit_channel_on_timeout,
    ]
}

/// `xds.type.v3.TypedStruct` (or `udpa.type.v1.TypedStruct`): an extension's config as a
/// free-form struct with its own `type_url`; how Ferry's own filters are configured so
/// that Envoy still accepts the bootstrap.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TypedStruct {
    pub(crate) type_url: Option<String>,
    pub(crate) value: Option<serde_json::Value>,
}

envoy_message! {
    /// `envoy.config.core.v3.TypedExtensionConfig` as a cluster's `cluster_type`.
    struct CustomClusterType {
        name: Option<String>,
        typed_config: Option<ClusterTypeConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig`.
    struct DfpClusterConfig {
        dns_cache_config: Option<DnsCacheConfig>,
    }
    unsupported [sub_clusters_config, allow_insecure_cluster_options, allow_coalesced_connections]
}

envoy_message! {
    /// `envoy.extensions.filters.http.router.v3.Router`: only the empty form for now.
    struct Router {}
    unsupported [
        dynamic_stats, start_child_span, upstream_log, upstream_log_options,
        suppress_envoy_headers, strict_check_headers, respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats, upstream_http_filters,
        reject_connect_request_early_data,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.Http2ProtocolOptions`.
    struct Http2ProtocolOptions {
        allow_connect: Option<bool>,
        max_concurrent_streams: Option<PortValue>,
    }
    unsupported [
        hpack_table_size, initial_stream_window_size,
        initial_connection_window_size, allow_metadata, max_outbound_frames,
        max_outbound_control_frames, max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream, max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging, override_stream_error_on_invalid_http_message,
        custom_settings_parameters, connection_keepalive, use_oghttp2_codec,
        max_metadata_size, enable_huffman_encoding,
    ]
}

envoy_message! {
    /// `envoy.config.core.v3.Http3ProtocolOptions`.
    struct Http3ProtocolOptions {
        allow_extended_connect: Option<bool>,
        quic_protocol_options: Option<CoreQuicProtocolOptions>,
    }
    unsupported [
        override_stream_error_on_invalid_http_message, allow_metadata,
        disable_qpack, disable_connection_flow_control_for_streams,
    ]
}

// ---------------------------------------------------------------------------------------
// envoy.config.route.v3

envoy_message! {
    /// `envoy.config.route.v3.RouteConfiguration`.
    struct RouteConfiguration {
        name: Option<String>,
        virtual_hosts: Vec<VirtualHost>,
    }
    unsupported [
        vhds, internal_only_headers, response_headers_to_add, response_headers_to_remove,
        request_headers_to_add, request_headers_to_remove, most_specific_header_mutations_wins,
        validate_clusters, max_direct_response_body_size_bytes, cluster_specifier_plugins,
        request_mirror_policies, ignore_port_in_host_matching,
        ignore_path_parameters_in_path_matching, typed_per_filter_config, metadata,
    ]
}

envoy_message! {
    /// `envoy.config.route.v3.VirtualHost`.
    struct VirtualHost {
        name: Option<String>,
        domains: Vec<String>,
        routes: Vec<Route>,
    }
    unsupported [
        matcher, require_tls, virtual_clusters, rate_limits, request_headers_to_add,
        request_headers_to_remove, response_headers_to_add, response_headers_to_remove, cors,
        typed_per_filter_config, include_request_attempt_count,
        include_attempt_count_in_response, retry_policy, retry_policy_typed_config,
        hedge_policy, include_is_timeout_retry_header, per_request_buffer_limit_bytes,
        request_body_buffer_limit, request_mirror_policies, metadata,
    ]
}

envoy_message! {
    /// `envoy.config.route.v3.Route`.
    struct Route {
        name: Option<String>,
        #[serde(rename = "match")]
        matcher: Option<RouteMatch>,
        route: Option<RouteAction>,
        metadata: Option<Metadata>,
    }
    unsupported [
        redirect, direct_response, filter_action, non_forwarding_action, decorator,
        typed_per_filter_config, request_headers_to_add, request_headers_to_remove,
        response_headers_to_add, response_headers_to_remove, tracing,
        per_request_buffer_limit_bytes, request_body_buffer_limit, stat_prefix,
    ]
}

envoy_message! {
    /// `envoy.config.route.v3.RouteMatch`.
    struct RouteMatch {
        prefix: Option<String>,
        path: Option<String>,
        connect_matcher: Option<ConnectMatcher>,
    }
    unsupported [
        safe_regex, path_separated_prefix, path_match_policy, case_sensitive, runtime_fraction,
        headers, query_parameters, grpc, tls_context, dynamic_metadata, filter_state,
    ]
}

envoy_message! {
    /// `RouteMatch.ConnectMatcher` (no fields).
    struct ConnectMatcher {}
    unsupported []
}

envoy_message! {
    /// `envoy.config.route.v3.RouteAction`.
    struct RouteAction {
        cluster: Option<String>,
        upgrade_configs: Vec<RouteUpgradeConfig>,
    }
    unsupported [
        cluster_header, weighted_clusters, cluster_specifier_plugin,
        inline_cluster_specifier_plugin, cluster_not_found_response_code, metadata_match,
        prefix_rewrite, regex_rewrite, path_rewrite_policy, path_rewrite, host_rewrite_literal,
        auto_host_rewrite, host_rewrite_header, host_rewrite_path_regex,
        append_x_forwarded_host, timeout, idle_timeout, flush_timeout, early_data_policy,
        retry_policy, retry_policy_typed_config, request_mirror_policies, priority, rate_limits,
        include_vh_rate_limits, hash_policy, cors, max_grpc_timeout, grpc_timeout_offset,
        internal_redirect_policy, internal_redirect_action, max_internal_redirects,
        hedge_policy, max_stream_duration,
    ]
}

envoy_message! {
    /// `RouteAction.UpgradeConfig`.
    struct RouteUpgradeConfig {
        upgrade_type: Option<String>,
        enabled: Option<bool>,
        connect_config: Option<ConnectConfig>,
    }
    unsupported []
}

envoy_message! {
    /// `RouteAction.UpgradeConfig.ConnectConfig`: only the empty form for now.
    struct ConnectConfig {}
    unsupported [proxy_protocol_config, allow_post]
}

// ---------------------------------------------------------------------------------------
// envoy.config.cluster.v3, envoy.config.endpoint.v3

envoy_message! {
    /// `envoy.config.cluster.v3.Cluster`.
    struct Cluster {
        name: Option<String>,
        #[serde(rename = "type")]
        discovery_type: Option<String>,
        dns_lookup_family: Option<String>,
        dns_refresh_rate: Option<RawDuration>,
        connect_timeout: Option<RawDuration>,
        lb_policy: Option<String>,
        load_assignment: Option<ClusterLoadAssignment>,
        typed_extension_protocol_options: std::collections::BTreeMap<String, ProtocolOptionsConfig>,
        transport_socket: Option<UpstreamTransportSocket>,
        cluster_type: Option<CustomClusterType>,
    }
    unsupported [
        transport_socket_matches, alt_stat_name, eds_cluster_config,
        per_connection_buffer_limit_bytes, health_checks, max_requests_per_connection,
        circuit_breakers, upstream_http_protocol_options, common_http_protocol_options,
        http_protocol_options, http2_protocol_options,
        dns_jitter, dns_failure_refresh_rate, respect_dns_ttl, dns_resolvers,
        use_tcp_for_dns_lookups, dns_resolution_config, typed_dns_resolver_config,
        wait_for_warm_on_init, outlier_detection, cleanup_interval, upstream_bind_config,
        lb_subset_config, ring_hash_lb_config, maglev_lb_config, original_dst_lb_config,
        least_request_lb_config, round_robin_lb_config, common_lb_config,
        metadata, protocol_selection, upstream_connection_options,
        close_connections_on_host_health_failure, ignore_health_on_host_removal, filters,
        load_balancing_policy, lrs_server, lrs_report_endpoint_metrics, track_timeout_budgets,
        upstream_config, track_cluster_stats, preconnect_policy,
        connection_pool_per_downstream_connection,
    ]
}

envoy_message! {
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    struct ClusterLoadAssignment {
        cluster_name: Option<String>,
        endpoints: Vec<LocalityLbEndpoints>,
    }
    unsupported [named_endpoints, policy]
}

envoy_message! {
    /// `envoy.config.endpoint.v3.LocalityLbEndpoints`.
    struct LocalityLbEndpoints {
        lb_endpoints: Vec<LbEndpoint>,
    }
    unsupported [
        locality, metadata, leds_cluster_locality_config, load_balancing_weight, priority,
        proximity,
    ]
}

envoy_message! {
    /// `envoy.config.endpoint.v3.LbEndpoint`.
    struct LbEndpoint {
        endpoint: Option<Endpoint>,
    }
    unsupported [endpoint_name, health_status, metadata, load_balancing_weight]
}

envoy_message! {
    /// `envoy.config.endpoint.v3.Endpoint`.
    struct Endpoint {
        address: Option<Address>,
    }
    unsupported [health_check_config, hostname, additional_addresses]
}
