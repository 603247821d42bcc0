//! `typed_config` slots: protobuf `Any` messages, `{"@type": URL, ...fields of that type}`.
//!
//! The `@type` decides which message the other fields belong to. When `@type` comes first
//! (as in every Envoy example) the remaining fields are deserialized straight from the
//! input, so unknown-field errors keep their full path and line/column. When it does not,
//! the object is buffered first; errors then still carry the full path (spliced in by
//! [`crate::error`]) but no line/column.
//!
//! A `@type` this slot does not implement is kept as `Other(url)` (its fields skipped) so
//! that validation can report it with its path and the expected type.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::raw::{
    BasicAuth, CaresDnsResolverConfig, DfpClusterConfig, DfpFilterConfig,
    DownstreamConnectionsConfig, DownstreamTlsContext, FileAccessLog, HttpCapsuleFilterConfig,
    HttpConnectionManager, HttpProtocolOptions, QuicDownstreamTransport, QuicUpstreamTransport,
    Router, StreamAccessLog, TypedStruct, UdpProxyConfig, UdpRoute, UpstreamTlsContext,
};

/// `@type` of the QUIC downstream transport socket.
pub const QUIC_DOWNSTREAM_TRANSPORT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport";
/// `@type` of the TLS (TCP) downstream transport socket.
pub const DOWNSTREAM_TLS_CONTEXT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// `@type` of the HTTP connection manager network filter.
pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// `@type` of the QUIC upstream transport socket (a cluster's `transport_socket`).
pub const QUIC_UPSTREAM_TRANSPORT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport";
/// `@type` of a cluster's upstream HTTP protocol options.
pub const UPSTREAM_TLS_CONTEXT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const HTTP_PROTOCOL_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// `@type` of the router HTTP filter.
pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
/// `@type` of the basic auth HTTP filter.
pub const BASIC_AUTH: &str =
    "type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth";
/// `@type` of the dynamic forward proxy HTTP filter.
pub const DFP_FILTER: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig";
/// `@type` of the dynamic forward proxy cluster (a cluster's `cluster_type.typed_config`).
pub const DFP_CLUSTER: &str =
    "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig";
/// `@type` of the c-ares DNS resolver (a DNS cache's `typed_dns_resolver_config`).
pub const CARES_DNS_RESOLVER: &str =
    "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig";
/// `@type` of a TypedStruct (how Ferry's own extensions are configured).
pub const TYPED_STRUCT: &str = "type.googleapis.com/xds.type.v3.TypedStruct";
/// The older name of [`TYPED_STRUCT`], also accepted by Envoy.
pub const UDPA_TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
/// `@type` of the file access logger.
pub const FILE_ACCESS_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
/// `@type` of the stdout access logger.
pub const STDOUT_ACCESS_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
/// `@type` of the stderr access logger.
pub const STDERR_ACCESS_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// `@type` of the UDP proxy listener filter.
pub const UDP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig";
/// `@type` of a UDP proxy route action (in its `matcher`).
pub const UDP_PROXY_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route";
/// `@type` of the HTTP capsule UDP session filter.
pub const HTTP_CAPSULE_SESSION_FILTER: &str = "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig";

/// `@type` of the global downstream connection limit resource monitor.
pub const DOWNSTREAM_CONNECTIONS_CONFIG: &str = "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// Marks a message carrying a nested path (see [`crate::error`]): `MARK path MARK message`.
pub(crate) const PATH_MARK: char = '\u{1}';

/// A `typed_config` slot: how to read the fields once `@type` is known.
pub(crate) trait AnySlot: Sized {
    /// What this slot holds, for "invalid type" messages.
    const WHAT: &'static str;
    fn from_type<'de, D: Deserializer<'de>>(type_url: String, rest: D) -> Result<Self, D::Error>;
}

fn skip<'de, D: Deserializer<'de>>(rest: D) -> Result<(), D::Error> {
    IgnoredAny::deserialize(rest).map(|_| ())
}

/// `filter_chains[].transport_socket.typed_config` of a listener.
#[derive(Debug)]
pub(crate) enum DownstreamTransportConfig {
    Quic(QuicDownstreamTransport),
    Tls(DownstreamTlsContext),
    Other(String),
}

impl AnySlot for DownstreamTransportConfig {
    const WHAT: &'static str = "a transport socket typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            QUIC_DOWNSTREAM_TRANSPORT => Self::Quic(QuicDownstreamTransport::deserialize(rest)?),
            DOWNSTREAM_TLS_CONTEXT => Self::Tls(DownstreamTlsContext::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// `filter_chains[].filters[].typed_config` (network filters).
#[derive(Debug)]
pub(crate) enum NetworkFilterConfig {
    Hcm(Box<HttpConnectionManager>),
    Other(String),
}

impl AnySlot for NetworkFilterConfig {
    const WHAT: &'static str = "a network filter typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            HTTP_CONNECTION_MANAGER => {
                Self::Hcm(Box::new(HttpConnectionManager::deserialize(rest)?))
            }
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// HCM `http_filters[].typed_config`.
#[derive(Debug)]
pub(crate) enum HttpFilterConfig {
    Router(Router),
    DynamicForwardProxy(DfpFilterConfig),
    BasicAuth(BasicAuth),
    TypedStruct(TypedStruct),
    Other(String),
}

impl AnySlot for HttpFilterConfig {
    const WHAT: &'static str = "an HTTP filter typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            ROUTER => Self::Router(Router::deserialize(rest)?),
            DFP_FILTER => Self::DynamicForwardProxy(DfpFilterConfig::deserialize(rest)?),
            BASIC_AUTH => Self::BasicAuth(BasicAuth::deserialize(rest)?),
            TYPED_STRUCT | UDPA_TYPED_STRUCT => Self::TypedStruct(TypedStruct::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// A cluster's `transport_socket.typed_config`.
#[derive(Debug)]
pub(crate) enum UpstreamTransportConfig {
    Quic(QuicUpstreamTransport),
    Tls(UpstreamTlsContext),
    Other(String),
}

impl AnySlot for UpstreamTransportConfig {
    const WHAT: &'static str = "an upstream transport socket typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            QUIC_UPSTREAM_TRANSPORT => Self::Quic(QuicUpstreamTransport::deserialize(rest)?),
            UPSTREAM_TLS_CONTEXT => Self::Tls(UpstreamTlsContext::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// A cluster's `cluster_type.typed_config` (a custom cluster type).
#[derive(Debug)]
pub(crate) enum ClusterTypeConfig {
    DynamicForwardProxy(DfpClusterConfig),
    Other(String),
}

impl AnySlot for ClusterTypeConfig {
    const WHAT: &'static str = "a custom cluster type typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            DFP_CLUSTER => Self::DynamicForwardProxy(DfpClusterConfig::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// A DNS cache's `typed_dns_resolver_config.typed_config`.
#[derive(Debug)]
pub(crate) enum DnsResolverConfig {
    Cares(CaresDnsResolverConfig),
    Other(String),
}

impl AnySlot for DnsResolverConfig {
    const WHAT: &'static str = "a DNS resolver typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            CARES_DNS_RESOLVER => Self::Cares(CaresDnsResolverConfig::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// A cluster's `typed_extension_protocol_options` value.
#[derive(Debug)]
pub(crate) enum ProtocolOptionsConfig {
    Http(HttpProtocolOptions),
    Other(String),
}

impl AnySlot for ProtocolOptionsConfig {
    const WHAT: &'static str = "cluster protocol options";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            HTTP_PROTOCOL_OPTIONS => Self::Http(HttpProtocolOptions::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// HCM `access_log[].typed_config`.
#[derive(Debug)]
pub(crate) enum AccessLoggerConfig {
    File(FileAccessLog),
    Stdout(StreamAccessLog),
    Stderr(StreamAccessLog),
    Other(String),
}

impl AnySlot for AccessLoggerConfig {
    const WHAT: &'static str = "an access logger typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            FILE_ACCESS_LOG => Self::File(FileAccessLog::deserialize(rest)?),
            STDOUT_ACCESS_LOG => Self::Stdout(StreamAccessLog::deserialize(rest)?),
            STDERR_ACCESS_LOG => Self::Stderr(StreamAccessLog::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// `listener_filters[].typed_config` (UDP listener filters).
#[derive(Debug)]
pub(crate) enum ListenerFilterConfig {
    UdpProxy(Box<UdpProxyConfig>),
    Other(String),
}

impl AnySlot for ListenerFilterConfig {
    const WHAT: &'static str = "a listener filter typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            UDP_PROXY => Self::UdpProxy(Box::new(UdpProxyConfig::deserialize(rest)?)),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// udp_proxy `matcher.on_no_match.action.typed_config`.
#[derive(Debug)]
pub(crate) enum MatchActionConfig {
    Route(UdpRoute),
    Other(String),
}

impl AnySlot for MatchActionConfig {
    const WHAT: &'static str = "a match action typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            UDP_PROXY_ROUTE => Self::Route(UdpRoute::deserialize(rest)?),
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// udp_proxy `session_filters[].typed_config`.
#[derive(Debug)]
pub(crate) enum SessionFilterConfig {
    HttpCapsule(HttpCapsuleFilterConfig),
    Other(String),
}

impl AnySlot for SessionFilterConfig {
    const WHAT: &'static str = "a UDP session filter typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            HTTP_CAPSULE_SESSION_FILTER => {
                Self::HttpCapsule(HttpCapsuleFilterConfig::deserialize(rest)?)
            }
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

/// `overload_manager.resource_monitors[].typed_config`.
#[derive(Debug)]
pub(crate) enum ResourceMonitorConfig {
    DownstreamConnections(DownstreamConnectionsConfig),
    Other(String),
}

impl AnySlot for ResourceMonitorConfig {
    const WHAT: &'static str = "a resource monitor typed_config";
    fn from_type<'de, D: Deserializer<'de>>(url: String, rest: D) -> Result<Self, D::Error> {
        Ok(match url.as_str() {
            DOWNSTREAM_CONNECTIONS_CONFIG => {
                Self::DownstreamConnections(DownstreamConnectionsConfig::deserialize(rest)?)
            }
            _ => {
                skip(rest)?;
                Self::Other(url)
            }
        })
    }
}

macro_rules! deserialize_via_any_slot {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_map(AnyVisitor::<$t>(PhantomData))
            }
        }
    )*};
}
deserialize_via_any_slot!(
    AccessLoggerConfig,
    DownstreamTransportConfig,
    NetworkFilterConfig,
    HttpFilterConfig,
    UpstreamTransportConfig,
    ProtocolOptionsConfig,
    ListenerFilterConfig,
    MatchActionConfig,
    SessionFilterConfig,
    ClusterTypeConfig,
    DnsResolverConfig,
    ResourceMonitorConfig
);

struct AnyVisitor<T>(PhantomData<T>);

impl<'de, T: AnySlot> Visitor<'de> for AnyVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} (a mapping with \"@type\" and the fields of that type)",
            T::WHAT
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Err(de::Error::custom("missing \"@type\""));
        };
        if first == "@type" {
            let url: String = map.next_value()?;
            return T::from_type(url, de::value::MapAccessDeserializer::new(map));
        }
        // `@type` is not first: buffer the object, then read it with its own path tracking.
        let mut object = serde_json::Map::new();
        let value: serde_json::Value = map.next_value()?;
        object.insert(first, value);
        while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
            object.insert(key, value);
        }
        let url = match object.remove("@type") {
            Some(serde_json::Value::String(url)) => url,
            Some(_) => return Err(de::Error::custom("\"@type\" must be a string")),
            None => return Err(de::Error::custom("missing \"@type\"")),
        };
        let mut track = serde_path_to_error::Track::new();
        let tracked =
            serde_path_to_error::Deserializer::new(serde_json::Value::Object(object), &mut track);
        match T::from_type(url, tracked) {
            Ok(slot) => Ok(slot),
            Err(e) => {
                let inner = track.path().to_string();
                Err(de::Error::custom(format!(
                    "{PATH_MARK}{inner}{PATH_MARK}{e}"
                )))
            }
        }
    }
}
