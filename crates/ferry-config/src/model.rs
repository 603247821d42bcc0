//! The effective, validated configuration the runtime consumes.
//!
//! This is what an Envoy v3 bootstrap turns into after parsing and validation. It holds no
//! Envoy wire shapes (no `@type`, no `typed_config` wrappers): every field here has been
//! checked, every default applied, every file (certificates, keys) read. The runtime keeps
//! it in shared snapshots (`Arc`) so that routes, clusters and listeners can later be
//! swapped at run time (xDS) without copying them into every task.

use std::net::SocketAddr;
use std::time::Duration;

/// A whole bootstrap, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    /// `admin.address.socket_address`, if an admin section is present.
    pub admin: Option<Admin>,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
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
    pub filter_chain: FilterChain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProtocol {
    Tcp,
    Udp,
}

/// `udp_listener_config.quic_options` (only the empty form is supported for now).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuicOptions {}

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
    /// `stream_idle_timeout`; Envoy's default is 5 minutes; `0s` disables it (None).
    pub stream_idle_timeout: Option<Duration>,
    /// Names of `http_filters[]`, in order (only `envoy.filters.http.router` for now).
    pub http_filters: Vec<String>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    LogicalDns,
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
