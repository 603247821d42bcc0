//! The effective, validated configuration the runtime consumes.
//!
//! This is what an Envoy v3 bootstrap turns into after parsing and validation. It holds no
//! Envoy wire shapes (no `@type`, no `typed_config` wrappers): every field here has been
//! checked, every default applied, every file (certificates, keys) read. The runtime keeps
//! it in shared snapshots (`Arc`) so that routes, clusters and listeners can later be
//! swapped at run time (xDS) without copying them into every task.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// A whole bootstrap, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    /// `admin.address.socket_address`, if an admin section is present.
    pub admin: Option<Admin>,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    /// `overload_manager.resource_monitors[]` `envoy.resource_monitors.global_downstream_max_connections`
    /// `max_active_downstream_connections`: open downstream connections (HTTP/1.1, HTTP/2
    /// and QUIC, all listeners together) past which new ones are refused. None: no limit.
    pub max_downstream_connections: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
}

/// `static_resources.listeners[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `name`; Envoy generates one when it is absent, Ferry uses the address.
    pub name: String,
    /// `address.socket_address` (address must be an IP literal, as in Envoy).
    pub address: SocketAddr,
    pub protocol: SocketProtocol,
    /// Present when `udp_listener_config.quic_options` is set (an HTTP/3 listener).
    pub quic: Option<QuicOptions>,
    /// `filter_chains[]`; Ferry supports exactly one filter chain per listener for now.
    /// Empty (no TLS, an HCM with no routes) on a udp_proxy listener, which has none.
    pub filter_chain: FilterChain,
    /// `listener_filters[]` `envoy.filters.udp_listener.udp_proxy` with `tunneling_config`:
    /// a raw UDP listener whose sessions are tunnelled with CONNECT-UDP.
    pub udp_proxy: Option<UdpProxy>,
    /// `socket_options[]` SO_RCVBUF and SO_SNDBUF.
    pub socket_buffers: SocketBuffers,
}

/// Socket buffer sizes a listener asks the kernel for (`setsockopt` before bind; the kernel
/// caps them at `net.core.rmem_max` / `wmem_max`). None: Ferry's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketBuffers {
    /// SO_RCVBUF (`level: 1`, `name: 8`).
    pub recv: Option<usize>,
    /// SO_SNDBUF (`level: 1`, `name: 7`).
    pub send: Option<usize>,
}

/// `envoy.filters.udp_listener.udp_proxy` (`UdpProxyConfig`) with `tunneling_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpProxy {
    /// `stat_prefix`: stats are `udp.<stat_prefix>.*`.
    pub stat_prefix: String,
    /// `matcher.on_no_match.action` `Route.cluster` (or the deprecated `cluster`): the
    /// CONNECT-UDP proxies the tunnels go to.
    pub cluster: String,
    /// `idle_timeout` (Envoy's default: 60 s); a session without datagrams either way ends.
    pub idle_timeout: Duration,
    /// `tunneling_config`: each session tunnelled with CONNECT-UDP. None: plain UDP to a
    /// host of the cluster (Envoy's default udp_proxy).
    pub tunneling: Option<UdpTunneling>,
    /// `access_log[]`: one line per session, at its end (Envoy's session access log).
    pub access_log: Vec<AccessLog>,
    /// `access_log_options.flush_access_log_on_tunnel_connected`: also a line when the
    /// session's tunnel is up.
    pub flush_access_log_on_tunnel_connected: bool,
    /// `access_log_options.access_log_flush_interval`: also a line this often while the
    /// session's tunnel is up.
    pub access_log_flush_interval: Option<Duration>,
}

/// `UdpProxyConfig.tunneling_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpTunneling {
    /// `proxy_host`: the request's `:authority` host.
    pub proxy_host: String,
    /// `proxy_port`: appended to the `:authority` when set.
    pub proxy_port: Option<u16>,
    /// `target_host` and `default_target_port`: the path
    /// `/.well-known/masque/udp/{target_host}/{default_target_port}/`.
    pub target_host: String,
    pub default_target_port: u16,
    /// `retry_options.max_connect_attempts` (default 1).
    pub max_connect_attempts: u32,
    /// `headers_to_add[].header{key, value}`, added to each CONNECT-UDP request.
    pub headers_to_add: Vec<(String, String)>,
    /// `buffer_options`: None means no buffering: datagrams that arrive before the tunnel
    /// is up are dropped (and counted), as in Envoy.
    pub buffer: Option<BufferOptions>,
    /// `propagate_response_headers`: the proxy's response headers are kept for the access
    /// log (`%FILTER_STATE(envoy.udp_proxy.propagate_response_headers)%`).
    pub propagate_response_headers: bool,
    /// `propagate_response_trailers`: the trailers that end the proxy's response are kept
    /// for the access log (`%FILTER_STATE(envoy.udp_proxy.propagate_response_trailers)%`).
    pub propagate_response_trailers: bool,
    /// `use_post` with `post_path` (default `/`): each tunnel is a `POST` to this path
    /// (HTTP/2 upstreams only), capsules in the request and response bodies, instead of an
    /// extended CONNECT. None: CONNECT-UDP.
    pub post_path: Option<String>,
}

/// `tunneling_config.buffer_options` (Envoy's defaults: 1024 datagrams, 16384 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferOptions {
    pub max_buffered_datagrams: u32,
    pub max_buffered_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProtocol {
    Tcp,
    Udp,
}

/// `udp_listener_config.quic_options`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuicOptions {
    /// `quic_protocol_options.max_concurrent_streams` (Envoy's default: 100): the
    /// bidirectional streams (requests, tunnels) a client may have open per connection.
    pub max_concurrent_streams: u32,
}

impl Default for QuicOptions {
    fn default() -> Self {
        QuicOptions {
            max_concurrent_streams: 100,
        }
    }
}

/// One filter chain: its transport socket and its HTTP connection manager.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    pub tls: Option<ServerTls>,
    pub hcm: HttpConnectionManager,
}

/// `QuicDownstreamTransport.downstream_tls_context.common_tls_context.tls_certificates[]`:
/// PEM text, read from `filename` or taken from `inline_string`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub certificates: Vec<CertificateKeyPair>,
    /// `common_tls_context.alpn_protocols` (TCP listeners): what the server offers, in order.
    /// Empty on a TCP listener means Envoy's default for the codec: `h2` and `http/1.1`.
    pub alpn_protocols: Vec<String>,
    /// `common_tls_context.validation_context.trusted_ca` (PEM): client certificates are
    /// asked for and verified against these CAs (mutual TLS). None: no client certificate
    /// is asked for.
    pub client_ca_pem: Option<String>,
    /// `require_client_certificate`: a client without a certificate is refused in the
    /// handshake (otherwise one is verified only when presented).
    pub require_client_certificate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateKeyPair {
    /// PEM-encoded certificate chain.
    pub certificate_chain_pem: String,
    /// PEM-encoded private key.
    pub private_key_pem: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecType {
    Auto,
    Http1,
    Http2,
    Http3,
}

/// `envoy.filters.network.http_connection_manager`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnectionManager {
    pub codec_type: CodecType,
    pub stat_prefix: String,
    pub route_config: RouteConfiguration,
    /// HCM-level `upgrade_configs[]`.
    pub upgrade_configs: Vec<HcmUpgradeConfig>,
    /// `http3_protocol_options.allow_extended_connect` (default false).
    pub allow_extended_connect: bool,
    /// `http2_protocol_options.allow_connect` (default false): SETTINGS_ENABLE_CONNECT_PROTOCOL
    /// on HTTP/2 (RFC 8441), needed for CONNECT-UDP over HTTP/2.
    pub allow_connect: bool,
    /// `stream_idle_timeout`; Envoy's default is 5 minutes; `0s` disables it (None).
    pub stream_idle_timeout: Option<Duration>,
    /// `http2_protocol_options.max_concurrent_streams` (Ferry's default: 100; Envoy's:
    /// 2147483647): streams (requests, tunnels) per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// `http3_protocol_options.quic_protocol_options.max_concurrent_streams`, when set:
    /// Ferry applies it to the listener's QUIC connections unless the listener's own
    /// `quic_options` sets it (Envoy reads only the listener's).
    pub h3_max_concurrent_streams: Option<u32>,
    /// `common_http_protocol_options.max_stream_duration`: a tunnel (any stream) ends this
    /// long after its request. None (absent or `0s`): no limit.
    pub max_stream_duration: Option<Duration>,
    /// Names of `http_filters[]`, in order (only `envoy.filters.http.router` for now).
    pub http_filters: Vec<String>,
    /// `access_log[]`: one line per request (per tunnel, at its end) to each.
    pub access_log: Vec<AccessLog>,
    /// The `envoy.filters.http.dynamic_forward_proxy` filter's `dns_cache_config`: when
    /// present, routes to a dynamic forward proxy cluster send UDP to the target in the path.
    pub dynamic_forward_proxy: Option<DnsCacheConfig>,
    /// Ferry's `ferry.filters.http.destination_policy` filter: operator rules over the
    /// built-in refusals for dynamic targets. Default: no rules (built-in refusals only).
    pub destination_policy: DestinationPolicy,
    /// The `envoy.filters.http.basic_auth` filter, when configured: every request must
    /// carry credentials of one of its users.
    pub basic_auth: Option<BasicAuth>,
}

/// `envoy.extensions.filters.http.basic_auth.v3.BasicAuth`.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// `users` (htpasswd, `{SHA}` lines only): user name -> SHA-1 digest of the password.
    pub users: std::collections::BTreeMap<String, [u8; 20]>,
    /// `forward_username_header`: a header set to the authenticated user name on requests
    /// forwarded to a next hop (lower-case); None: not set.
    pub forward_username_header: Option<String>,
    /// `authentication_header` (lower-case): where the credentials are read; Envoy's
    /// default is `authorization`.
    pub authentication_header: String,
}

impl std::fmt::Debug for BasicAuth {
    // The password digests are secrets: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("forward_username_header", &self.forward_username_header)
            .field("authentication_header", &self.authentication_header)
            .finish()
    }
}

/// `envoy.extensions.common.dynamic_forward_proxy.v3.DnsCacheConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCacheConfig {
    /// `name`: the cache shared by the filter and the cluster that name it.
    pub name: String,
    /// `dns_lookup_family` (default AUTO).
    pub dns_lookup_family: DnsLookupFamily,
    /// `dns_refresh_rate` (Envoy's default 60 s): how long an answer is used before the
    /// name is resolved again.
    pub dns_refresh_rate: Duration,
    /// `host_ttl` (Envoy's default 300 s): a host unused this long leaves the cache.
    pub host_ttl: Duration,
    /// `max_hosts` (Envoy's default 1024): the bound on cached names.
    pub max_hosts: u32,
    /// `typed_dns_resolver_config` (`envoy.network.dns_resolver.cares`) `resolvers`: the
    /// DNS servers to ask, in order. Empty: the system resolver (which reads /etc/hosts).
    pub resolvers: Vec<SocketAddr>,
}

/// Ferry's destination policy for dynamic targets (`ferry.filters.http.destination_policy`).
///
/// Each resolved address of a target is checked in this order: the proxy's own listener
/// addresses are always refused; then the first matching `deny` rule refuses; then the
/// first matching `allow` rule allows; then the built-in refusals (loopback, link-local,
/// multicast, broadcast, unspecified) apply; anything else is allowed unless
/// `default_deny` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationPolicy {
    pub allow: Vec<AddressRule>,
    pub deny: Vec<AddressRule>,
    /// `default_action: DENY`: refuse what no rule allows (default ALLOW).
    pub default_deny: bool,
}

/// One rule: an address range and a port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRule {
    /// `cidr` (`10.0.0.0/8`, `::1/128`, or a bare address = a single host).
    pub network: IpAddr,
    pub prefix_len: u8,
    /// `ports` (`"9000"`, `"9000-9100"`); default every port.
    pub ports: (u16, u16),
}

impl AddressRule {
    /// Whether `ip:port` falls in this rule. An IPv4-mapped IPv6 address is matched as the
    /// IPv4 address it carries.
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        if port < self.ports.0 || port > self.ports.1 {
            return false;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for AddressRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)?;
        match self.ports {
            (0, 65535) => Ok(()),
            (a, b) if a == b => write!(f, " port {a}"),
            (a, b) => write!(f, " ports {a}-{b}"),
        }
    }
}

/// One HCM `access_log[]` entry: where the lines go and how they look.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    pub sink: AccessLogSink,
    pub format: LogFormat,
}

/// `envoy.access_loggers.file` (`path`), `envoy.access_loggers.stdout`, `.stderr`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccessLogSink {
    File(String),
    Stdout,
    Stderr,
}

/// `log_format` (Envoy's `SubstitutionFormatString`), parsed; Envoy's default text format
/// when absent.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// `text_format_source` (or `text_format`): one line per request, as written (Envoy
    /// adds no newline).
    Text {
        template: crate::format::Template,
        /// `omit_empty_values`: an unavailable value prints as nothing instead of `-`.
        omit_empty_values: bool,
    },
    /// `json_format`: one JSON object per line, keys sorted.
    Json {
        fields: Vec<(String, JsonTemplate)>,
        /// `omit_empty_values`: keys whose value is unavailable are left out (else `null`).
        omit_empty_values: bool,
    },
}

/// A `json_format` value.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonTemplate {
    /// A format string; a lone numeric command (`%RESPONSE_CODE%`) stays a number.
    Format(crate::format::Template),
    Number(f64),
    Bool(bool),
    Null,
    Object(Vec<(String, JsonTemplate)>),
}

/// HCM `upgrade_configs[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct HcmUpgradeConfig {
    /// Lower-cased (`connect-udp`, `websocket`, ...): Envoy matches it case-insensitively.
    pub upgrade_type: String,
    /// `enabled` (default true).
    pub enabled: bool,
}

/// `route_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfiguration {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    pub name: String,
    /// `domains[]` as written (validated: non-empty, at most one wildcard, at an end).
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: Option<String>,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    /// Ferry extension, from the route's
    /// `metadata.filter_metadata["ferry.connect_udp"].pass_through` (Envoy accepts and
    /// ignores it): forward an extended CONNECT-UDP request unchanged, whatever URI template
    /// its path follows, with no path check and no Host rewrite. Default false: Envoy's
    /// behaviour.
    pub pass_through: bool,
}

/// `routes[].match`: exactly one path specifier.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteMatch {
    /// `connect_matcher: {}`: matches CONNECT and extended CONNECT (CONNECT-UDP) requests.
    Connect,
    /// `prefix: "/..."`.
    Prefix(String),
    /// `path: "/..."` (exact).
    Path(String),
}

/// `routes[].route`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteAction {
    pub cluster: String,
    pub upgrade_configs: Vec<RouteUpgradeConfig>,
}

/// `route.upgrade_configs[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteUpgradeConfig {
    /// Lower-cased upgrade type.
    pub upgrade_type: String,
    /// `enabled` (default true).
    pub enabled: bool,
    /// `connect_config` present = terminate; absent = forward.
    pub connect_config: Option<ConnectConfig>,
}

/// `connect_config` (only the empty form is supported for now).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectConfig {}

/// `clusters[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub discovery: DiscoveryType,
    pub dns_lookup_family: DnsLookupFamily,
    /// `dns_refresh_rate` (Envoy's default: 5 s).
    pub dns_refresh_rate: Duration,
    /// `connect_timeout` (Envoy's default: 5 s).
    pub connect_timeout: Duration,
    /// `load_assignment.endpoints[].lb_endpoints[].endpoint.address.socket_address`, flattened.
    pub endpoints: Vec<Endpoint>,
    /// How to speak HTTP to the cluster's hosts when forwarding (the cluster is another
    /// proxy): `typed_extension_protocol_options` + `transport_socket`. None for clusters
    /// that only receive terminated UDP.
    pub upstream: Option<UpstreamHttp>,
    /// `cluster_type` `envoy.clusters.dynamic_forward_proxy`: its `dns_cache_config`. Such a
    /// cluster has no endpoints; tunnels go to the target named in the path.
    pub dns_cache: Option<DnsCacheConfig>,
}

/// A cluster's upstream HTTP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHttp {
    pub protocol: UpstreamProtocol,
    /// From the cluster's `transport_socket` (`QuicUpstreamTransport.upstream_tls_context`,
    /// or for HTTP/2 and HTTP/1.1 `envoy.transport_sockets.tls`'s `UpstreamTlsContext`).
    pub tls: UpstreamTls,
    /// HTTP/2 and HTTP/1.1 without a `transport_socket`: cleartext TCP (h2c with prior
    /// knowledge for HTTP/2). Always false for HTTP/3.
    pub plaintext: bool,
}

/// `HttpProtocolOptions.explicit_http_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// `http3_protocol_options`.
    Http3 { allow_extended_connect: bool },
    /// `http2_protocol_options`: extended CONNECT (RFC 8441), datagrams as capsules.
    Http2,
    /// `http_protocol_options`: `Upgrade: connect-udp`, one TCP connection per tunnel.
    Http1,
}

/// `upstream_tls_context`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamTls {
    /// `sni`: the TLS server name (and certificate name checked); Envoy sends none when unset.
    pub sni: Option<String>,
    /// `common_tls_context.validation_context.trusted_ca` as PEM. None: Envoy does not verify
    /// the upstream's certificate, and neither does Ferry (it warns at start-up).
    pub trusted_ca_pem: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    LogicalDns,
    /// `cluster_type: envoy.clusters.dynamic_forward_proxy` (with `lb_policy:
    /// CLUSTER_PROVIDED`).
    DynamicForwardProxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsLookupFamily {
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

/// One endpoint address as written: an IP literal (STATIC) or a name (the DNS types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub port: u16,
}
