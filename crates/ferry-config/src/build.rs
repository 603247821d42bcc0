//! Layer 2: validation of the raw Envoy shapes and construction of the effective model.
//!
//! Every check records a [`ConfigError`] with the path of the field it is about and carries
//! on, so one run reports every problem. Builders always return a value (placeholders where
//! the input was wrong); the model is only handed out when no error was recorded.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

pub(crate) use crate::any::BASIC_AUTH;
use crate::any::{
    DFP_CLUSTER, DFP_FILTER, DOWNSTREAM_TLS_CONTEXT, HTTP_CONNECTION_MANAGER,
    HTTP_PROTOCOL_OPTIONS, QUIC_DOWNSTREAM_TRANSPORT, QUIC_UPSTREAM_TRANSPORT, ROUTER,
    UPSTREAM_TLS_CONTEXT,
};
use crate::datasource::{decode_base64, PemKind};
use crate::duration::{duration_from_parts, parse_duration};
use crate::error::ConfigError;
use crate::model;
use crate::raw::{
    self, ClusterTypeConfig, DownstreamTransportConfig, HttpFilterConfig, NetworkFilterConfig,
    ProtocolOptionsConfig, RawDuration, UpstreamTransportConfig,
};

mod accesslog;
mod basic_auth;
mod dfp;
mod limits;
mod udp_proxy;

pub use dfp::{DESTINATION_POLICY_NAME, DESTINATION_POLICY_TYPE_URL};

/// The message for a known Envoy field that Ferry does not implement.
pub const NOT_SUPPORTED: &str = "Envoy field not supported by Ferry (yet)";

const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
const ROUTER_NAME: &str = "envoy.filters.http.router";
const DFP_FILTER_NAME: &str = "envoy.filters.http.dynamic_forward_proxy";
const BASIC_AUTH_NAME: &str = "envoy.filters.http.basic_auth";
const DFP_CLUSTER_NAME: &str = "envoy.clusters.dynamic_forward_proxy";
const QUIC_NAME: &str = "envoy.transport_sockets.quic";
const TLS_NAME: &str = "envoy.transport_sockets.tls";

/// Envoy's default `stream_idle_timeout`.
const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Envoy's default cluster `connect_timeout` and `dns_refresh_rate`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DNS_REFRESH_RATE: Duration = Duration::from_secs(5);

/// A field path under construction, in Envoy field names.
#[derive(Debug, Clone)]
struct P(String);

impl P {
    fn root() -> P {
        P(String::new())
    }
    /// `self.name`
    fn f(&self, name: &str) -> P {
        if self.0.is_empty() {
            P(name.to_owned())
        } else {
            P(format!("{}.{name}", self.0))
        }
    }
    /// `self[index]`
    fn i(&self, index: usize) -> P {
        P(format!("{}[{index}]", self.0))
    }
}

#[derive(Default)]
struct Ctx {
    errors: Vec<ConfigError>,
    /// The dynamic forward proxy clusters' DNS caches, by cluster name (known once the
    /// clusters are built, before the listeners).
    dfp_clusters: HashMap<String, model::DnsCacheConfig>,
}

impl Ctx {
    fn err(&mut self, path: &P, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path.0.clone(), message));
    }

    fn unsupported(&mut self, path: &P, fields: Vec<&'static str>) {
        for field in fields {
            self.err(&path.f(field), NOT_SUPPORTED);
        }
    }

    /// A required, non-empty string.
    fn required<'a>(&mut self, path: &P, value: Option<&'a String>) -> &'a str {
        match value {
            Some(v) if !v.is_empty() => v,
            _ => {
                self.err(path, "is required (must not be empty)");
                ""
            }
        }
    }

    fn duration(&mut self, path: &P, value: Option<&RawDuration>, default: Duration) -> Duration {
        let parsed = match value {
            None => return default,
            Some(RawDuration::Text(text)) => parse_duration(text),
            Some(RawDuration::Object { seconds, nanos }) => duration_from_parts(*seconds, *nanos),
            Some(RawDuration::Number(n)) => Err(format!(
                "`{n}` is a bare number: an Envoy duration is a string of seconds ending in `s`, like \"{n}s\""
            )),
        };
        parsed.unwrap_or_else(|message| {
            self.err(path, message);
            default
        })
    }
}

/// Validates `raw` and builds the model, or returns every error found.
pub(crate) fn build(raw: &raw::Bootstrap) -> Result<model::Bootstrap, Vec<ConfigError>> {
    let mut ctx = Ctx::default();
    let root = P::root();
    ctx.unsupported(&root, raw.unsupported_fields());

    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| build_admin(&mut ctx, &root.f("admin"), a));
    let max_downstream_connections = limits::build_overload_manager(
        &mut ctx,
        &root.f("overload_manager"),
        raw.overload_manager.as_ref(),
    );

    let srp = root.f("static_resources");
    let empty = raw::StaticResources::default();
    let sr = raw.static_resources.as_ref().unwrap_or(&empty);
    ctx.unsupported(&srp, sr.unsupported_fields());

    // Clusters first: routes refer to them by name. A cluster that fails validation still
    // counts as defined, so one mistake is not reported twice. Their errors are reported
    // after the listeners' (document order).
    let mut cluster_ctx = Ctx::default();
    let defined: HashSet<&str> = sr
        .clusters
        .iter()
        .filter_map(|c| c.name.as_deref())
        .collect();
    let mut clusters = Vec::with_capacity(sr.clusters.len());
    let mut cluster_names: HashMap<String, usize> = HashMap::new();
    for (i, c) in sr.clusters.iter().enumerate() {
        let p = srp.f("clusters").i(i);
        let cluster = build_cluster(&mut cluster_ctx, &p, c);
        if !cluster.name.is_empty() {
            if let Some(first) = cluster_names.get(&cluster.name) {
                cluster_ctx.err(
                    &p.f("name"),
                    format!(
                        "duplicate cluster name `{}` (also static_resources.clusters[{first}].name); cluster names must be unique",
                        cluster.name
                    ),
                );
            } else {
                cluster_names.insert(cluster.name.clone(), i);
            }
        }
        clusters.push(cluster);
    }

    ctx.dfp_clusters = clusters
        .iter()
        .filter_map(|c: &model::Cluster| Some((c.name.clone(), c.dns_cache.clone()?)))
        .collect();
    let known = KnownClusters {
        defined,
        proxies: clusters
            .iter()
            .filter_map(|c: &model::Cluster| Some((c.name.clone(), c.upstream.as_ref()?.protocol)))
            .collect(),
    };
    let mut listeners = Vec::with_capacity(sr.listeners.len());
    let mut listener_names: HashMap<String, usize> = HashMap::new();
    let mut listener_addresses: HashMap<(SocketAddr, bool), usize> = HashMap::new();
    for (i, l) in sr.listeners.iter().enumerate() {
        let p = srp.f("listeners").i(i);
        let listener = build_listener(&mut ctx, &p, l, &known);
        if l.name.as_deref().is_some_and(|n| !n.is_empty()) {
            if let Some(first) = listener_names.get(&listener.name) {
                ctx.err(
                    &p.f("name"),
                    format!(
                        "duplicate listener name `{}` (also static_resources.listeners[{first}].name); listener names must be unique",
                        listener.name
                    ),
                );
            } else {
                listener_names.insert(listener.name.clone(), i);
            }
        }
        if listener.address.port() != 0 {
            let key = (
                listener.address,
                listener.protocol == model::SocketProtocol::Udp,
            );
            if let Some(first) = listener_addresses.get(&key) {
                ctx.err(
                    &p.f("address"),
                    format!(
                        "{} is already the address of static_resources.listeners[{first}]; two listeners cannot bind the same address",
                        listener.address
                    ),
                );
            } else {
                listener_addresses.insert(key, i);
            }
        }
        listeners.push(listener);
    }

    ctx.errors.append(&mut cluster_ctx.errors);
    if ctx.errors.is_empty() {
        Ok(model::Bootstrap {
            admin,
            listeners,
            clusters,
            max_downstream_connections,
        })
    } else {
        Err(ctx.errors)
    }
}

// ---------------------------------------------------------------------------------------
// Addresses

/// `address.socket_address` as written: (host, port, protocol, path of socket_address).
/// None when absent or unusable; the port and protocol are None when invalid (reported).
fn socket_address<'a>(
    ctx: &mut Ctx,
    p: &P,
    address: Option<&'a raw::Address>,
) -> Option<(&'a str, Option<u16>, Option<model::SocketProtocol>, P)> {
    let Some(address) = address else {
        ctx.err(p, "is required");
        return None;
    };
    let unsupported = address.unsupported_fields();
    let others = !unsupported.is_empty();
    ctx.unsupported(p, unsupported);
    let sp = p.f("socket_address");
    let Some(sa) = &address.socket_address else {
        if !others {
            ctx.err(&sp, "is required");
        }
        return None;
    };
    ctx.unsupported(&sp, sa.unsupported_fields());
    let protocol = match sa.protocol.as_deref() {
        None | Some("TCP") => Some(model::SocketProtocol::Tcp),
        Some("UDP") => Some(model::SocketProtocol::Udp),
        Some(other) => {
            ctx.err(
                &sp.f("protocol"),
                format!("unknown protocol `{other}`; expected TCP or UDP"),
            );
            None
        }
    };
    let port = match &sa.port_value {
        None => Some(0),
        Some(raw::PortValue::Number(v)) => u16::try_from(*v).ok().or_else(|| {
            ctx.err(
                &sp.f("port_value"),
                format!("{v} is out of range: a port is 0..=65535"),
            );
            None
        }),
        Some(raw::PortValue::Invalid(v)) => {
            ctx.err(
                &sp.f("port_value"),
                format!("`{v}` is not a port number (0..=65535)"),
            );
            None
        }
    };
    let host = ctx.required(&sp.f("address"), sa.address.as_ref());
    Some((host, port, protocol, sp))
}

/// An IP literal (listeners and the admin bind addresses, as in Envoy).
fn ip_literal(ctx: &mut Ctx, p: &P, host: &str, what: &str) -> IpAddr {
    if host.is_empty() {
        return IpAddr::V4(Ipv4Addr::UNSPECIFIED); // already reported
    }
    host.parse().unwrap_or_else(|_| {
        ctx.err(
            p,
            format!("`{host}` is not an IP address: {what} must be an IP literal (as in Envoy), e.g. 127.0.0.1, 0.0.0.0 or ::"),
        );
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    })
}

fn build_admin(ctx: &mut Ctx, p: &P, admin: &raw::Admin) -> Option<model::Admin> {
    ctx.unsupported(p, admin.unsupported_fields());
    // No address: Envoy starts no admin server.
    let address = admin.address.as_ref()?;
    let (host, port, protocol, sp) = socket_address(ctx, &p.f("address"), Some(address))?;
    if protocol == Some(model::SocketProtocol::Udp) {
        ctx.err(&sp.f("protocol"), "the admin interface listens on TCP");
    }
    let ip = ip_literal(ctx, &sp.f("address"), host, "the admin address");
    Some(model::Admin {
        address: SocketAddr::new(ip, port.unwrap_or(0)),
    })
}

// ---------------------------------------------------------------------------------------
// Listeners

/// The clusters listeners may refer to.
struct KnownClusters<'a> {
    /// Every cluster name (a cluster that failed validation still counts as defined).
    defined: HashSet<&'a str>,
    /// Clusters that are CONNECT-UDP proxies (HTTP/3, HTTP/2 or HTTP/1.1 protocol options),
    /// with the HTTP version they are reached with.
    proxies: HashMap<String, model::UpstreamProtocol>,
}

fn build_listener(
    ctx: &mut Ctx,
    p: &P,
    l: &raw::Listener,
    clusters: &KnownClusters,
) -> model::Listener {
    ctx.unsupported(p, l.unsupported_fields());
    let (address, protocol) = match socket_address(ctx, &p.f("address"), l.address.as_ref()) {
        Some((host, port, protocol, sp)) => (
            SocketAddr::new(
                ip_literal(ctx, &sp.f("address"), host, "a listener address"),
                port.unwrap_or(0),
            ),
            protocol,
        ),
        None => (SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), None),
    };
    let name = match &l.name {
        Some(n) if !n.is_empty() => n.clone(),
        _ => address.to_string(),
    };

    let socket_buffers = socket_buffers(ctx, &p.f("socket_options"), &l.socket_options);
    let up = p.f("udp_listener_config");
    // The listener's own max_concurrent_streams, when set (else the HCM's, below).
    let mut quic_streams = None;
    let quic = l.udp_listener_config.as_ref().and_then(|u| {
        ctx.unsupported(&up, u.unsupported_fields());
        u.quic_options.as_ref().map(|q| {
            let qp = up.f("quic_options");
            ctx.unsupported(&qp, q.unsupported_fields());
            quic_streams = limits::quic_max_concurrent_streams(ctx, &qp, q);
            model::QuicOptions::default()
        })
    });
    // An unusable protocol (already reported): assume what the rest of the listener says.
    let protocol = protocol.unwrap_or(if quic.is_some() {
        model::SocketProtocol::Udp
    } else {
        model::SocketProtocol::Tcp
    });
    let udp = protocol == model::SocketProtocol::Udp;
    if !udp && quic.is_some() {
        ctx.err(
            &up.f("quic_options"),
            "needs a UDP listener: set address.socket_address.protocol: UDP",
        );
    }

    let lfp = p.f("listener_filters");
    let udp_proxy = if l.listener_filters.is_empty() {
        None
    } else if !udp || quic.is_some() {
        ctx.err(
            &lfp,
            "listener filters are supported on raw UDP listeners only (the udp_proxy filter: protocol UDP, no quic_options) by Ferry (yet)",
        );
        None
    } else {
        udp_proxy::build_listener_filters(ctx, &lfp, &l.listener_filters, clusters)
    };
    if udp && quic.is_none() && l.listener_filters.is_empty() {
        ctx.err(
            &up.f("quic_options"),
            "is required on a UDP listener with filter_chains (quic_options: {} makes it an HTTP/3 listener); a raw UDP listener takes the `envoy.filters.udp_listener.udp_proxy` listener filter instead",
        );
    }

    let fcp = p.f("filter_chains");
    let raw_udp = udp && quic.is_none() && !l.listener_filters.is_empty();
    if raw_udp {
        if !l.filter_chains.is_empty() {
            ctx.err(&fcp, "a raw UDP listener (udp_proxy) has no filter chains");
        }
        return model::Listener {
            name,
            address,
            protocol,
            quic,
            filter_chain: model::FilterChain {
                tls: None,
                hcm: placeholder_hcm(),
            },
            udp_proxy,
            socket_buffers,
        };
    }
    if l.filter_chains.is_empty() {
        ctx.err(&fcp, "exactly one filter chain is required (found none)");
    }
    for i in 1..l.filter_chains.len() {
        ctx.err(
            &fcp.i(i),
            "more than one filter chain is not supported by Ferry (yet)",
        );
    }
    let filter_chain = match l.filter_chains.first() {
        Some(fc) => build_filter_chain(ctx, &fcp.i(0), fc, udp, &clusters.defined),
        None => model::FilterChain {
            tls: None,
            hcm: placeholder_hcm(),
        },
    };

    // Streams per QUIC connection: the listener's setting (where Envoy reads it), else the
    // HCM's `http3_protocol_options.quic_protocol_options` (which Envoy ignores downstream),
    // else 100.
    let quic = quic.map(|_| model::QuicOptions {
        max_concurrent_streams: quic_streams
            .or(filter_chain.hcm.h3_max_concurrent_streams)
            .unwrap_or(limits::DEFAULT_H3_MAX_CONCURRENT_STREAMS),
    });
    model::Listener {
        name,
        address,
        protocol,
        quic,
        filter_chain,
        udp_proxy,
        socket_buffers,
    }
}

/// SOL_SOCKET, SO_SNDBUF and SO_RCVBUF on Linux, the numbers Envoy's `socket_options` take.
const SOL_SOCKET: u64 = 1;
const SO_SNDBUF: u64 = 7;
const SO_RCVBUF: u64 = 8;

/// `socket_options[]`: SO_RCVBUF and SO_SNDBUF with an `int_value` are applied before bind
/// (whatever `state` says: they only matter before traffic); any other option is refused.
fn socket_buffers(ctx: &mut Ctx, p: &P, options: &[raw::SocketOption]) -> model::SocketBuffers {
    let mut b = model::SocketBuffers::default();
    for (i, o) in options.iter().enumerate() {
        let op = p.i(i);
        ctx.unsupported(&op, o.unsupported_fields());
        if o.socket_type.is_some() {
            ctx.unsupported(&op, vec!["type"]);
        }
        match o.state.as_deref() {
            None | Some("STATE_PREBIND" | "STATE_BOUND" | "STATE_LISTENING") => {}
            Some(other) => ctx.err(
                &op.f("state"),
                format!("`{other}`: expected STATE_PREBIND, STATE_BOUND or STATE_LISTENING"),
            ),
        }
        let level = uint(
            ctx,
            &op.f("level"),
            o.level.as_ref(),
            0,
            u64::from(u32::MAX),
        );
        let name = uint(ctx, &op.f("name"), o.name.as_ref(), 0, u64::from(u32::MAX));
        let value = match &o.int_value {
            Some(v) => uint(ctx, &op.f("int_value"), Some(v), 1, i32::MAX as u64)
                .and_then(|v| usize::try_from(v).ok()),
            // A `buf_value` instead has been reported as unsupported already.
            None if o.buf_value.is_some() => None,
            None => {
                ctx.err(
                    &op.f("int_value"),
                    "is required (Ferry supports integer options only)",
                );
                None
            }
        };
        match (level.unwrap_or(0), name.unwrap_or(0)) {
            (SOL_SOCKET, SO_RCVBUF) => b.recv = value.or(b.recv),
            (SOL_SOCKET, SO_SNDBUF) => b.send = value.or(b.send),
            (level, name) => ctx.err(
                &op.f("name"),
                format!(
                    "level {level} name {name}: Ferry supports SO_RCVBUF (level 1, name 8) and SO_SNDBUF (level 1, name 7) only (yet)"
                ),
            ),
        }
    }
    b
}

/// `quic`: the listener is UDP (so QUIC: raw UDP listeners have been rejected already).
fn build_filter_chain(
    ctx: &mut Ctx,
    p: &P,
    fc: &raw::FilterChain,
    quic: bool,
    clusters: &HashSet<&str>,
) -> model::FilterChain {
    ctx.unsupported(p, fc.unsupported_fields());
    let tp = p.f("transport_socket");
    let tls = match &fc.transport_socket {
        Some(ts) => build_transport_socket(ctx, &tp, ts, quic),
        None => {
            if quic {
                ctx.err(
                    &tp,
                    format!("is required on a QUIC listener: `{QUIC_NAME}` with a QuicDownstreamTransport holding the server certificate"),
                );
            }
            None
        }
    };

    let fp = p.f("filters");
    if fc.filters.is_empty() {
        ctx.err(&fp, format!("the `{HCM_NAME}` filter is required"));
    }
    let mut hcm = None;
    for (i, f) in fc.filters.iter().enumerate() {
        let p = fp.i(i);
        ctx.unsupported(&p, f.unsupported_fields());
        let name = f.name.as_deref().unwrap_or("");
        match &f.typed_config {
            Some(NetworkFilterConfig::Hcm(h)) => {
                check_name(ctx, &p.f("name"), name, HCM_NAME);
                if hcm.is_some() {
                    ctx.err(&p, "Ferry supports exactly one network filter, the HTTP connection manager (found a second one)");
                } else {
                    hcm = Some(build_hcm(ctx, &p.f("typed_config"), h, quic, clusters));
                }
            }
            Some(NetworkFilterConfig::Other(url)) => {
                type_error(ctx, &p.f("typed_config").f("@type"), url, &NETWORK_FILTER_SLOT);
            }
            None if name == HCM_NAME => ctx.err(
                &p.f("typed_config"),
                format!("is required: `{HTTP_CONNECTION_MANAGER}` with stat_prefix, route_config and http_filters"),
            ),
            None => {
                name_error(ctx, &p.f("name"), name, &NETWORK_FILTER_SLOT);
            }
        }
    }
    model::FilterChain {
        tls,
        hcm: hcm.unwrap_or_else(placeholder_hcm),
    }
}

fn build_transport_socket(
    ctx: &mut Ctx,
    p: &P,
    ts: &raw::DownstreamTransportSocket,
    quic: bool,
) -> Option<model::ServerTls> {
    ctx.unsupported(p, ts.unsupported_fields());
    let name = ts.name.as_deref().unwrap_or("");
    let tp = p.f("typed_config");
    match &ts.typed_config {
        Some(DownstreamTransportConfig::Quic(q)) => {
            check_name(ctx, &p.f("name"), name, QUIC_NAME);
            if !quic {
                ctx.err(
                    &tp.f("@type"),
                    format!("QuicDownstreamTransport needs a UDP listener with udp_listener_config.quic_options; a TCP listener takes `{DOWNSTREAM_TLS_CONTEXT}`"),
                );
            }
            ctx.unsupported(&tp, q.unsupported_fields());
            let dp = tp.f("downstream_tls_context");
            match &q.downstream_tls_context {
                Some(d) => Some(build_tls_context(ctx, &dp, d)),
                None => {
                    ctx.err(&dp, "is required (it holds the server certificate)");
                    None
                }
            }
        }
        Some(DownstreamTransportConfig::Tls(d)) => {
            check_name(ctx, &p.f("name"), name, TLS_NAME);
            if quic {
                ctx.err(
                    &tp.f("@type"),
                    format!("DownstreamTlsContext is for TCP listeners; a QUIC listener takes `{QUIC_DOWNSTREAM_TRANSPORT}`"),
                );
            }
            Some(build_tls_context(ctx, &tp, d))
        }
        Some(DownstreamTransportConfig::Other(url)) => {
            let slot = if quic {
                &QUIC_TRANSPORT_SLOT
            } else {
                &TLS_TRANSPORT_SLOT
            };
            type_error(ctx, &tp.f("@type"), url, slot);
            None
        }
        None => {
            let expected = if quic {
                QUIC_DOWNSTREAM_TRANSPORT
            } else {
                DOWNSTREAM_TLS_CONTEXT
            };
            ctx.err(
                &tp,
                format!("is required: `{expected}` with the server certificate"),
            );
            None
        }
    }
}

fn build_tls_context(ctx: &mut Ctx, p: &P, d: &raw::DownstreamTlsContext) -> model::ServerTls {
    ctx.unsupported(p, d.unsupported_fields());
    let cp = p.f("common_tls_context");
    let Some(c) = &d.common_tls_context else {
        ctx.err(
            &cp,
            "is required: its tls_certificates hold the server certificate",
        );
        return model::ServerTls {
            certificates: Vec::new(),
            alpn_protocols: Vec::new(),
            client_ca_pem: None,
            require_client_certificate: false,
        };
    };
    let unsupported = c.unsupported_fields();
    let other_source = unsupported
        .iter()
        .any(|f| f.starts_with("tls_certificate") || f.starts_with("custom_tls"));
    ctx.unsupported(&cp, unsupported);
    let require = d.require_client_certificate.unwrap_or(false);
    let client_ca_pem = match &c.validation_context {
        Some(vc) => {
            let vp = cp.f("validation_context");
            ctx.unsupported(&vp, vc.unsupported_fields());
            let pem = data_source(
                ctx,
                &vp.f("trusted_ca"),
                vc.trusted_ca.as_ref(),
                PemKind::CertificateChain,
                false,
            );
            Some(pem)
        }
        None => {
            if require {
                // Envoy refuses this on a QUIC listener; on a TCP listener it then asks
                // for any certificate and checks none, which Ferry does not do.
                ctx.err(
                    &p.f("require_client_certificate"),
                    "needs common_tls_context.validation_context.trusted_ca: the CAs that client certificates are verified against",
                );
            }
            None
        }
    };
    let lp = cp.f("tls_certificates");
    if c.tls_certificates.is_empty() && !other_source {
        ctx.err(
            &lp,
            "at least one certificate (certificate_chain + private_key) is required",
        );
    }
    let certificates = c
        .tls_certificates
        .iter()
        .enumerate()
        .map(|(i, cert)| {
            let p = lp.i(i);
            let unsupported = cert.unsupported_fields();
            let other_key = unsupported
                .iter()
                .any(|f| *f == "pkcs12" || *f == "private_key_provider");
            ctx.unsupported(&p, unsupported);
            model::CertificateKeyPair {
                certificate_chain_pem: data_source(
                    ctx,
                    &p.f("certificate_chain"),
                    cert.certificate_chain.as_ref(),
                    PemKind::CertificateChain,
                    other_key,
                ),
                private_key_pem: data_source(
                    ctx,
                    &p.f("private_key"),
                    cert.private_key.as_ref(),
                    PemKind::PrivateKey,
                    other_key,
                ),
            }
        })
        .collect();
    for (i, proto) in c.alpn_protocols.iter().enumerate() {
        if !matches!(proto.as_str(), "h2" | "http/1.1") {
            ctx.err(
                &cp.f("alpn_protocols").i(i),
                format!("`{proto}`: Ferry's TCP listeners speak `h2` and `http/1.1`"),
            );
        }
    }
    model::ServerTls {
        certificates,
        alpn_protocols: c.alpn_protocols.clone(),
        client_ca_pem,
        require_client_certificate: require,
    }
}

/// Reads a PEM DataSource (`filename` relative to the current directory, as in Envoy).
fn data_source(
    ctx: &mut Ctx,
    p: &P,
    ds: Option<&raw::DataSource>,
    kind: PemKind,
    may_be_absent: bool,
) -> String {
    let Some(ds) = ds else {
        if !may_be_absent {
            ctx.err(p, "is required");
        }
        return String::new();
    };
    let unsupported = ds.unsupported_fields();
    let other_source = !unsupported.is_empty();
    ctx.unsupported(p, unsupported);
    let set = [
        ds.filename.is_some(),
        ds.inline_string.is_some(),
        ds.inline_bytes.is_some(),
    ];
    if set.iter().filter(|s| **s).count() > 1 {
        ctx.err(
            p,
            "only one of filename, inline_string and inline_bytes may be set",
        );
        return String::new();
    }
    let (text, at, what) = if let Some(file) = &ds.filename {
        let fp = p.f("filename");
        if file.is_empty() {
            ctx.err(&fp, "must not be empty");
            return String::new();
        }
        match std::fs::read(file) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => (text, fp, format!("`{file}`")),
                Err(_) => {
                    ctx.err(&fp, format!("`{file}` is not text: PEM expected"));
                    return String::new();
                }
            },
            Err(e) => {
                ctx.err(&fp, format!("cannot read `{file}`: {e}"));
                return String::new();
            }
        }
    } else if let Some(text) = &ds.inline_string {
        (
            text.clone(),
            p.f("inline_string"),
            "the inline string".to_owned(),
        )
    } else if let Some(b64) = &ds.inline_bytes {
        let bp = p.f("inline_bytes");
        match decode_base64(b64).map(String::from_utf8) {
            Some(Ok(text)) => (text, bp, "the inline bytes".to_owned()),
            Some(Err(_)) => {
                ctx.err(&bp, "decodes to binary data: PEM text expected");
                return String::new();
            }
            None => {
                ctx.err(&bp, "is not valid base64");
                return String::new();
            }
        }
    } else {
        if !other_source {
            ctx.err(
                p,
                "one of filename, inline_string or inline_bytes is required",
            );
        }
        return String::new();
    };
    if let Err(problem) = kind.check(&text) {
        ctx.err(&at, format!("{what} {problem}"));
    }
    text
}

// ---------------------------------------------------------------------------------------
// HTTP connection manager

fn placeholder_hcm() -> model::HttpConnectionManager {
    model::HttpConnectionManager {
        codec_type: model::CodecType::Auto,
        stat_prefix: String::new(),
        route_config: model::RouteConfiguration {
            name: String::new(),
            virtual_hosts: Vec::new(),
        },
        upgrade_configs: Vec::new(),
        allow_extended_connect: false,
        allow_connect: false,
        stream_idle_timeout: None,
        http2_max_concurrent_streams: limits::DEFAULT_H2_MAX_CONCURRENT_STREAMS,
        h3_max_concurrent_streams: None,
        max_stream_duration: None,
        http_filters: Vec::new(),
        access_log: Vec::new(),
        dynamic_forward_proxy: None,
        destination_policy: Default::default(),
        basic_auth: None,
    }
}

fn build_hcm(
    ctx: &mut Ctx,
    p: &P,
    h: &raw::HttpConnectionManager,
    quic: bool,
    clusters: &HashSet<&str>,
) -> model::HttpConnectionManager {
    ctx.unsupported(p, h.unsupported_fields());

    let cp = p.f("codec_type");
    let written = match h.codec_type.as_deref() {
        None | Some("AUTO") => model::CodecType::Auto,
        Some("HTTP1") => model::CodecType::Http1,
        Some("HTTP2") => model::CodecType::Http2,
        Some("HTTP3") => model::CodecType::Http3,
        Some(other) => {
            ctx.err(
                &cp,
                format!("unknown codec_type `{other}`; expected AUTO, HTTP1, HTTP2 or HTTP3"),
            );
            model::CodecType::Auto
        }
    };
    let codec_type = match (written, quic) {
        (model::CodecType::Auto, true) => model::CodecType::Http3,
        (model::CodecType::Http3, false) => {
            ctx.err(&cp, "HTTP3 needs a UDP listener with udp_listener_config.quic_options (Envoy: HTTP/3 codec configured on non-QUIC listener)");
            written
        }
        (model::CodecType::Http1 | model::CodecType::Http2, true) => {
            ctx.err(&cp, "a QUIC (UDP) listener speaks HTTP/3 only: use HTTP3 or AUTO (Envoy: Non-HTTP/3 codec configured on QUIC listener)");
            written
        }
        (c, _) => c,
    };

    let stat_prefix = ctx
        .required(&p.f("stat_prefix"), h.stat_prefix.as_ref())
        .to_owned();

    let rp = p.f("route_config");
    let route_config = match &h.route_config {
        Some(rc) => build_route_config(ctx, &rp, rc, clusters),
        None => {
            if h.rds.is_none() && h.scoped_routes.is_none() {
                ctx.err(&rp, "is required (an inline route configuration)");
            }
            model::RouteConfiguration {
                name: String::new(),
                virtual_hosts: Vec::new(),
            }
        }
    };

    let HttpFilters {
        names: http_filters,
        dynamic_forward_proxy,
        destination_policy,
        basic_auth,
    } = build_http_filters(ctx, &p.f("http_filters"), &h.http_filters);

    let up = p.f("upgrade_configs");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let upgrade_configs = h
        .upgrade_configs
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let p = up.i(i);
            ctx.unsupported(&p, u.unsupported_fields());
            let upgrade_type = upgrade_type(
                ctx,
                &p.f("upgrade_type"),
                u.upgrade_type.as_ref(),
                &mut seen,
                i,
            );
            model::HcmUpgradeConfig {
                upgrade_type,
                enabled: u.enabled.unwrap_or(true),
            }
        })
        .collect();

    let allow_extended_connect = match &h.http3_protocol_options {
        Some(o) => {
            ctx.unsupported(&p.f("http3_protocol_options"), o.unsupported_fields());
            o.allow_extended_connect.unwrap_or(false)
        }
        None => false,
    };
    let h3_max_concurrent_streams = limits::core_quic_max_concurrent_streams(
        ctx,
        &p.f("http3_protocol_options").f("quic_protocol_options"),
        h.http3_protocol_options
            .as_ref()
            .and_then(|o| o.quic_protocol_options.as_ref()),
    );
    let allow_connect = match &h.http2_protocol_options {
        Some(o) => {
            ctx.unsupported(&p.f("http2_protocol_options"), o.unsupported_fields());
            o.allow_connect.unwrap_or(false)
        }
        None => false,
    };
    let http2_max_concurrent_streams = limits::h2_max_concurrent_streams(
        ctx,
        &p.f("http2_protocol_options"),
        h.http2_protocol_options.as_ref(),
    );
    let max_stream_duration = limits::max_stream_duration(
        ctx,
        &p.f("common_http_protocol_options"),
        h.common_http_protocol_options.as_ref(),
    );

    let timeout = ctx.duration(
        &p.f("stream_idle_timeout"),
        h.stream_idle_timeout.as_ref(),
        DEFAULT_STREAM_IDLE_TIMEOUT,
    );
    let stream_idle_timeout = (!timeout.is_zero()).then_some(timeout);

    let access_log = accesslog::build_access_logs(ctx, &p.f("access_log"), &h.access_log);
    dfp::check_routes(ctx, p, &route_config, dynamic_forward_proxy.as_ref());

    model::HttpConnectionManager {
        codec_type,
        stat_prefix,
        route_config,
        upgrade_configs,
        allow_extended_connect,
        allow_connect,
        stream_idle_timeout,
        http2_max_concurrent_streams,
        h3_max_concurrent_streams,
        max_stream_duration,
        http_filters,
        access_log,
        dynamic_forward_proxy,
        destination_policy,
        basic_auth,
    }
}

/// What the HCM's `http_filters[]` configure.
struct HttpFilters {
    names: Vec<String>,
    dynamic_forward_proxy: Option<model::DnsCacheConfig>,
    destination_policy: model::DestinationPolicy,
    basic_auth: Option<model::BasicAuth>,
}

fn build_http_filters(ctx: &mut Ctx, p: &P, filters: &[raw::HttpFilter]) -> HttpFilters {
    let mut names = Vec::with_capacity(filters.len());
    let mut dynamic_forward_proxy = None;
    let mut destination_policy = None;
    let mut basic_auth = None;
    let mut routers = Vec::new();
    // A filter that could not be identified may be a mistyped router: then do not also
    // report the router as missing.
    let mut unidentified = false;
    for (i, f) in filters.iter().enumerate() {
        let fp = p.i(i);
        ctx.unsupported(&fp, f.unsupported_fields());
        let name = f.name.as_deref().unwrap_or("");
        match &f.typed_config {
            Some(HttpFilterConfig::Router(r)) => {
                check_name(ctx, &fp.f("name"), name, ROUTER_NAME);
                ctx.unsupported(&fp.f("typed_config"), r.unsupported_fields());
                routers.push(i);
            }
            Some(HttpFilterConfig::DynamicForwardProxy(d)) => {
                check_name(ctx, &fp.f("name"), name, DFP_FILTER_NAME);
                let cp = fp.f("typed_config");
                ctx.unsupported(&cp, d.unsupported_fields());
                let dp = cp.f("dns_cache_config");
                let cache = match &d.dns_cache_config {
                    Some(c) => dfp::build_dns_cache(ctx, &dp, c),
                    None => {
                        ctx.err(&dp, "is required");
                        None
                    }
                };
                if dynamic_forward_proxy.is_some() {
                    ctx.err(
                        &fp,
                        format!("a second `{DFP_FILTER_NAME}` filter; one is enough"),
                    );
                }
                dynamic_forward_proxy = cache;
            }
            Some(HttpFilterConfig::BasicAuth(b)) => {
                check_name(ctx, &fp.f("name"), name, BASIC_AUTH_NAME);
                let built = basic_auth::build(ctx, &fp.f("typed_config"), b);
                if basic_auth.is_some() {
                    ctx.err(
                        &fp,
                        format!("a second `{BASIC_AUTH_NAME}` filter; Ferry takes one"),
                    );
                }
                basic_auth = Some(built);
            }
            Some(HttpFilterConfig::TypedStruct(t)) => {
                let policy = dfp::build_destination_policy(ctx, &fp, f, t);
                if destination_policy.is_some() {
                    ctx.err(
                        &fp,
                        format!(
                            "a second `{DESTINATION_POLICY_NAME}` filter; put every rule in one"
                        ),
                    );
                }
                destination_policy = policy;
            }
            Some(HttpFilterConfig::Other(url)) => {
                let at = fp.f("typed_config").f("@type");
                unidentified |= !type_error(ctx, &at, url, &HTTP_FILTER_SLOT);
            }
            // Envoy finds a filter without typed_config by its name.
            None if name == ROUTER_NAME => routers.push(i),
            None => unidentified |= !name_error(ctx, &fp.f("name"), name, &HTTP_FILTER_SLOT),
        }
        names.push(name.to_owned());
    }
    match routers.as_slice() {
        [] if unidentified => {}
        [] => ctx.err(
            p,
            format!("the router filter (`{ROUTER_NAME}`) is required, as the last HTTP filter"),
        ),
        found => {
            for &i in found.iter().filter(|&&i| i + 1 != filters.len()) {
                ctx.err(
                    &p.i(i),
                    format!("`{ROUTER_NAME}` must be the last HTTP filter (it is terminal)"),
                );
            }
        }
    }
    HttpFilters {
        names,
        dynamic_forward_proxy,
        destination_policy: destination_policy.unwrap_or_default(),
        basic_auth,
    }
}

/// `upgrade_type`: a required HTTP token, matched case-insensitively (stored lower-case),
/// not repeated within one list.
fn upgrade_type(
    ctx: &mut Ctx,
    p: &P,
    value: Option<&String>,
    seen: &mut HashMap<String, usize>,
    index: usize,
) -> String {
    let written = ctx.required(p, value);
    if written.is_empty() {
        return String::new();
    }
    if !written.bytes().all(is_tchar) {
        ctx.err(p, format!("`{written}` is not a valid upgrade token (an HTTP token such as CONNECT-UDP or websocket)"));
    }
    let lower = written.to_ascii_lowercase();
    if let Some(first) = seen.get(&lower) {
        ctx.err(p, format!("duplicate upgrade_type `{written}` (also upgrade_configs[{first}]); upgrade types are compared case-insensitively"));
    } else {
        seen.insert(lower.clone(), index);
    }
    lower
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// ---------------------------------------------------------------------------------------
// Routes

fn build_route_config(
    ctx: &mut Ctx,
    p: &P,
    rc: &raw::RouteConfiguration,
    clusters: &HashSet<&str>,
) -> model::RouteConfiguration {
    ctx.unsupported(p, rc.unsupported_fields());
    let mut domains_seen: HashMap<String, String> = HashMap::new();
    let vp = p.f("virtual_hosts");
    let virtual_hosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| build_virtual_host(ctx, &vp.i(i), i, vh, clusters, &mut domains_seen))
        .collect();
    model::RouteConfiguration {
        name: rc.name.clone().unwrap_or_default(),
        virtual_hosts,
    }
}

fn build_virtual_host(
    ctx: &mut Ctx,
    p: &P,
    index: usize,
    vh: &raw::VirtualHost,
    clusters: &HashSet<&str>,
    domains_seen: &mut HashMap<String, String>,
) -> model::VirtualHost {
    ctx.unsupported(p, vh.unsupported_fields());
    let name = ctx.required(&p.f("name"), vh.name.as_ref()).to_owned();
    let dp = p.f("domains");
    if vh.domains.is_empty() {
        ctx.err(
            &dp,
            "at least one domain is required (\"*\" matches any host)",
        );
    }
    for (j, domain) in vh.domains.iter().enumerate() {
        let here = dp.i(j);
        if let Err(problem) = check_domain(domain) {
            ctx.err(&here, problem);
            continue;
        }
        let key = domain.to_ascii_lowercase();
        let short = format!("virtual_hosts[{index}].domains[{j}]");
        if let Some(first) = domains_seen.get(&key) {
            ctx.err(
                &here,
                format!("duplicate domain `{domain}` (also {first}); Envoy rejects a domain listed twice in one route configuration"),
            );
        } else {
            domains_seen.insert(key, short);
        }
    }
    let rp = p.f("routes");
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| build_route(ctx, &rp.i(i), r, clusters))
        .collect();
    model::VirtualHost {
        name,
        domains: vh.domains.clone(),
        routes,
    }
}

/// Envoy's domain forms: exact, `*` alone, a wildcard prefix (`*.example.com`,
/// `*-bar.example.com`) or a wildcard suffix (`example.*`). The wildcard never matches the
/// empty string.
fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("a domain must not be empty".to_owned());
    }
    if domain.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{domain}` contains whitespace or control characters"
        ));
    }
    let stars = domain.matches('*').count();
    if stars > 1 {
        return Err(format!(
            "`{domain}` has {stars} wildcards: only one `*` is allowed, alone or at the start (`*.example.com`) or end (`example.*`)"
        ));
    }
    if stars == 1 && !domain.starts_with('*') && !domain.ends_with('*') {
        return Err(format!(
            "`{domain}`: the wildcard `*` must be the whole domain, its first character (`*.example.com`) or its last (`example.*`)"
        ));
    }
    Ok(())
}

fn build_route(ctx: &mut Ctx, p: &P, r: &raw::Route, clusters: &HashSet<&str>) -> model::Route {
    let unsupported = r.unsupported_fields();
    let other_action = unsupported.iter().any(|f| {
        matches!(
            *f,
            "redirect" | "direct_response" | "filter_action" | "non_forwarding_action"
        )
    });
    ctx.unsupported(p, unsupported);

    let mp = p.f("match");
    let matcher = match &r.matcher {
        Some(m) => build_route_match(ctx, &mp, m),
        None => {
            ctx.err(&mp, "is required");
            model::RouteMatch::Prefix("/".to_owned())
        }
    };

    let ap = p.f("route");
    let action = match &r.route {
        Some(a) => build_route_action(ctx, &ap, a, clusters),
        None => {
            if !other_action {
                ctx.err(
                    &ap,
                    "is required (the route action: cluster and upgrade_configs)",
                );
            }
            model::RouteAction {
                cluster: String::new(),
                upgrade_configs: Vec::new(),
            }
        }
    };

    let pass_through = match &r.metadata {
        Some(md) => route_pass_through(ctx, &p.f("metadata"), md),
        None => false,
    };

    model::Route {
        name: r.name.clone().filter(|n| !n.is_empty()),
        matcher,
        action,
        pass_through,
    }
}

/// The metadata namespace Ferry reads on a route (Envoy accepts any namespace and ignores
/// those no filter reads, so a bootstrap using it still validates under Envoy).
pub const FERRY_CONNECT_UDP_METADATA: &str = "ferry.connect_udp";

/// `metadata.filter_metadata["ferry.connect_udp"]`: `{pass_through: bool}`. Other
/// namespaces belong to other filters and mean nothing to Ferry's router.
fn route_pass_through(ctx: &mut Ctx, p: &P, md: &raw::Metadata) -> bool {
    ctx.unsupported(p, md.unsupported_fields());
    let fp = p.f("filter_metadata");
    let Some(value) = md.filter_metadata.get(FERRY_CONNECT_UDP_METADATA) else {
        return false;
    };
    let np = fp.f(FERRY_CONNECT_UDP_METADATA);
    let Some(obj) = value.as_object() else {
        ctx.err(&np, "must be a mapping: {pass_through: true|false}");
        return false;
    };
    let mut pass_through = false;
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("pass_through", serde_json::Value::Bool(b)) => pass_through = *b,
            ("pass_through", _) => ctx.err(&np.f("pass_through"), "must be true or false"),
            (other, _) => ctx.err(
                &np.f(other),
                "unknown field; the ferry.connect_udp namespace has only `pass_through`",
            ),
        }
    }
    pass_through
}

fn build_route_match(ctx: &mut Ctx, p: &P, m: &raw::RouteMatch) -> model::RouteMatch {
    let unsupported = m.unsupported_fields();
    let other_specifier = unsupported.iter().any(|f| {
        matches!(
            *f,
            "safe_regex" | "path_separated_prefix" | "path_match_policy"
        )
    });
    ctx.unsupported(p, unsupported);
    let mut found = Vec::new();
    if let Some(prefix) = &m.prefix {
        found.push(model::RouteMatch::Prefix(prefix.clone()));
    }
    if let Some(path) = &m.path {
        found.push(model::RouteMatch::Path(path.clone()));
    }
    if let Some(cm) = &m.connect_matcher {
        ctx.unsupported(&p.f("connect_matcher"), cm.unsupported_fields());
        found.push(model::RouteMatch::Connect);
    }
    if found.len() > 1 {
        ctx.err(p, "only one of prefix, path and connect_matcher may be set");
    }
    match found.into_iter().next() {
        Some(matcher) => matcher,
        None => {
            if !other_specifier {
                ctx.err(p, "one of prefix, path or connect_matcher is required");
            }
            model::RouteMatch::Prefix("/".to_owned())
        }
    }
}

fn build_route_action(
    ctx: &mut Ctx,
    p: &P,
    a: &raw::RouteAction,
    clusters: &HashSet<&str>,
) -> model::RouteAction {
    let unsupported = a.unsupported_fields();
    let other_cluster = unsupported.iter().any(|f| {
        matches!(
            *f,
            "cluster_header"
                | "weighted_clusters"
                | "cluster_specifier_plugin"
                | "inline_cluster_specifier_plugin"
        )
    });
    ctx.unsupported(p, unsupported);

    let cp = p.f("cluster");
    let cluster = match a.cluster.as_deref() {
        Some(c) if !c.is_empty() => {
            if !clusters.contains(c) {
                ctx.err(
                    &cp,
                    format!(
                        "unknown cluster `{c}`: no static_resources.clusters[] entry has this name"
                    ),
                );
            }
            c.to_owned()
        }
        _ => {
            if !other_cluster {
                ctx.err(
                    &cp,
                    "is required (the name of a cluster in static_resources.clusters)",
                );
            }
            String::new()
        }
    };

    let up = p.f("upgrade_configs");
    let mut seen = HashMap::new();
    let upgrade_configs = a
        .upgrade_configs
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let p = up.i(i);
            ctx.unsupported(&p, u.unsupported_fields());
            let upgrade_type = upgrade_type(
                ctx,
                &p.f("upgrade_type"),
                u.upgrade_type.as_ref(),
                &mut seen,
                i,
            );
            let connect_config = u.connect_config.as_ref().map(|cc| {
                let ccp = p.f("connect_config");
                ctx.unsupported(&ccp, cc.unsupported_fields());
                if !upgrade_type.is_empty()
                    && upgrade_type != "connect"
                    && upgrade_type != "connect-udp"
                {
                    ctx.err(
                        &ccp,
                        format!(
                            "only applies to CONNECT and CONNECT-UDP upgrades, not `{}`",
                            u.upgrade_type.as_deref().unwrap_or("")
                        ),
                    );
                }
                model::ConnectConfig {}
            });
            model::RouteUpgradeConfig {
                upgrade_type,
                enabled: u.enabled.unwrap_or(true),
                connect_config,
            }
        })
        .collect();

    model::RouteAction {
        cluster,
        upgrade_configs,
    }
}

// ---------------------------------------------------------------------------------------
// Clusters

fn build_cluster(ctx: &mut Ctx, p: &P, c: &raw::Cluster) -> model::Cluster {
    let custom = c.cluster_type.is_some();
    ctx.unsupported(p, c.unsupported_fields());
    let name = ctx.required(&p.f("name"), c.name.as_ref()).to_owned();

    let tp = p.f("type");
    let dns_cache = c
        .cluster_type
        .as_ref()
        .and_then(|t| build_cluster_type(ctx, &p.f("cluster_type"), t));
    if custom && c.discovery_type.is_some() {
        ctx.err(
            &tp,
            "`type` and `cluster_type` are alternatives (a oneof in Envoy): keep one",
        );
    }
    // None: not a type Ferry implements (reported); endpoint checks are then skipped.
    let discovery = match c.discovery_type.as_deref() {
        _ if dns_cache.is_some() => Some(model::DiscoveryType::DynamicForwardProxy),
        _ if custom => None,
        None | Some("STATIC") => Some(model::DiscoveryType::Static),
        Some("STRICT_DNS") => Some(model::DiscoveryType::StrictDns),
        Some("LOGICAL_DNS") => Some(model::DiscoveryType::LogicalDns),
        Some(t @ ("EDS" | "ORIGINAL_DST")) => {
            ctx.err(
                &tp,
                format!("cluster type {t} is not supported by Ferry (yet); use STATIC, STRICT_DNS or LOGICAL_DNS"),
            );
            None
        }
        Some(t) => {
            ctx.err(
                &tp,
                format!("unknown cluster type `{t}`; expected STATIC, STRICT_DNS or LOGICAL_DNS"),
            );
            None
        }
    };

    let dns_lookup_family = lookup_family(
        ctx,
        &p.f("dns_lookup_family"),
        c.dns_lookup_family.as_deref(),
    );

    let rp = p.f("dns_refresh_rate");
    let dns_refresh_rate = ctx.duration(&rp, c.dns_refresh_rate.as_ref(), DEFAULT_DNS_REFRESH_RATE);
    if dns_refresh_rate <= Duration::from_millis(1) {
        ctx.err(&rp, "must be greater than 1ms");
    }
    let tp = p.f("connect_timeout");
    let connect_timeout = ctx.duration(&tp, c.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        ctx.err(&tp, "must be greater than 0s");
    }

    let dfp = discovery == Some(model::DiscoveryType::DynamicForwardProxy);
    match c.lb_policy.as_deref() {
        Some("CLUSTER_PROVIDED") if custom => {}
        None if dfp => ctx.err(
            &p.f("lb_policy"),
            "must be CLUSTER_PROVIDED for a dynamic forward proxy cluster (as in Envoy)",
        ),
        Some(other) if dfp => ctx.err(
            &p.f("lb_policy"),
            format!(
                "`{other}`: a dynamic forward proxy cluster takes CLUSTER_PROVIDED (as in Envoy)"
            ),
        ),
        None | Some("ROUND_ROBIN") => {}
        Some(
            other @ ("LEAST_REQUEST"
            | "RING_HASH"
            | "RANDOM"
            | "MAGLEV"
            | "CLUSTER_PROVIDED"
            | "LOAD_BALANCING_POLICY_CONFIG"),
        ) => ctx.err(
            &p.f("lb_policy"),
            format!("lb_policy {other} is not supported by Ferry (yet); only ROUND_ROBIN is"),
        ),
        Some(other) => ctx.err(
            &p.f("lb_policy"),
            format!("unknown lb_policy `{other}`; Ferry supports ROUND_ROBIN"),
        ),
    }

    let lp = p.f("load_assignment");
    let endpoints = match &c.load_assignment {
        Some(la) => build_load_assignment(ctx, &lp, la, discovery),
        None => Vec::new(),
    };
    if discovery == Some(model::DiscoveryType::LogicalDns) && !custom && endpoints.len() != 1 {
        ctx.err(
            &lp,
            format!(
                "a LOGICAL_DNS cluster must have exactly one endpoint (found {}), as in Envoy",
                endpoints.len()
            ),
        );
    }

    if dfp && c.load_assignment.is_some() {
        ctx.err(
            &lp,
            "a dynamic forward proxy cluster has no endpoints: its hosts are the targets named in requests",
        );
    }
    let upstream = build_upstream(ctx, p, c);
    if dfp && upstream.is_some() {
        ctx.err(
            &p.f("transport_socket"),
            "forwarding through a dynamic forward proxy cluster is not supported by Ferry (yet); it terminates CONNECT-UDP to the target",
        );
    }

    model::Cluster {
        name,
        discovery: discovery.unwrap_or(model::DiscoveryType::Static),
        dns_lookup_family,
        dns_refresh_rate,
        connect_timeout,
        endpoints,
        upstream,
        dns_cache,
    }
}

/// `dns_lookup_family` of a cluster or a DNS cache.
fn lookup_family(ctx: &mut Ctx, p: &P, value: Option<&str>) -> model::DnsLookupFamily {
    match value {
        None | Some("AUTO") => model::DnsLookupFamily::Auto,
        Some("V4_ONLY") => model::DnsLookupFamily::V4Only,
        Some("V6_ONLY") => model::DnsLookupFamily::V6Only,
        Some("V4_PREFERRED") => model::DnsLookupFamily::V4Preferred,
        Some("ALL") => model::DnsLookupFamily::All,
        Some(other) => {
            ctx.err(
                p,
                format!("unknown dns_lookup_family `{other}`; expected AUTO, V4_ONLY, V6_ONLY, V4_PREFERRED or ALL"),
            );
            model::DnsLookupFamily::Auto
        }
    }
}

/// `cluster_type`: only `envoy.clusters.dynamic_forward_proxy`.
fn build_cluster_type(
    ctx: &mut Ctx,
    p: &P,
    t: &raw::CustomClusterType,
) -> Option<model::DnsCacheConfig> {
    ctx.unsupported(p, t.unsupported_fields());
    let cp = p.f("typed_config");
    match &t.typed_config {
        Some(ClusterTypeConfig::DynamicForwardProxy(d)) => {
            check_name(
                ctx,
                &p.f("name"),
                t.name.as_deref().unwrap_or(""),
                DFP_CLUSTER_NAME,
            );
            ctx.unsupported(&cp, d.unsupported_fields());
            let dp = cp.f("dns_cache_config");
            match &d.dns_cache_config {
                Some(c) => dfp::build_dns_cache(ctx, &dp, c),
                None => {
                    ctx.err(&dp, "is required");
                    None
                }
            }
        }
        Some(ClusterTypeConfig::Other(url)) => {
            ctx.err(
                &cp.f("@type"),
                format!("custom cluster type `{url}` is not supported by Ferry (yet); supported: `{DFP_CLUSTER}`"),
            );
            None
        }
        None => {
            ctx.err(&cp, format!("is required: `{DFP_CLUSTER}`"));
            None
        }
    }
}

/// The key Envoy files HTTP protocol options under in `typed_extension_protocol_options`.
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// A cluster's upstream HTTP settings: `typed_extension_protocol_options` (HTTP/3 only for
/// now) and the `transport_socket` (QUIC). Both or neither.
fn build_upstream(ctx: &mut Ctx, p: &P, c: &raw::Cluster) -> Option<model::UpstreamHttp> {
    let op = p.f("typed_extension_protocol_options");
    let mut protocol = None;
    for (key, value) in &c.typed_extension_protocol_options {
        let kp = op.f(key);
        if key != HTTP_PROTOCOL_OPTIONS_KEY {
            ctx.err(
                &kp,
                format!("unknown protocol options key; Ferry reads `{HTTP_PROTOCOL_OPTIONS_KEY}`"),
            );
            continue;
        }
        match value {
            ProtocolOptionsConfig::Http(h) => {
                ctx.unsupported(&kp, h.unsupported_fields());
                let ep = kp.f("explicit_http_config");
                let Some(explicit) = &h.explicit_http_config else {
                    if h.unsupported_fields().is_empty() {
                        ctx.err(&ep, "is required: Ferry needs http3_protocol_options here");
                    }
                    continue;
                };
                ctx.unsupported(&ep, explicit.unsupported_fields());
                let mut chosen = Vec::new();
                if let Some(h3) = &explicit.http3_protocol_options {
                    ctx.unsupported(&ep.f("http3_protocol_options"), h3.unsupported_fields());
                    chosen.push(model::UpstreamProtocol::Http3 {
                        allow_extended_connect: h3.allow_extended_connect.unwrap_or(false),
                    });
                }
                if let Some(h2) = &explicit.http2_protocol_options {
                    ctx.unsupported(&ep.f("http2_protocol_options"), h2.unsupported_fields());
                    chosen.push(model::UpstreamProtocol::Http2);
                }
                if let Some(h1) = &explicit.http_protocol_options {
                    ctx.unsupported(&ep.f("http_protocol_options"), h1.unsupported_fields());
                    chosen.push(model::UpstreamProtocol::Http1);
                }
                match chosen.as_slice() {
                    [one] => protocol = Some(*one),
                    [] => ctx.err(&ep, "one of http3_protocol_options, http2_protocol_options or http_protocol_options is required"),
                    _ => ctx.err(&ep, "only one of http3_protocol_options, http2_protocol_options and http_protocol_options may be set (a oneof in Envoy)"),
                }
            }
            ProtocolOptionsConfig::Other(url) => {
                ctx.err(
                    &kp.f("@type"),
                    format!("unknown @type `{url}`; expected `{HTTP_PROTOCOL_OPTIONS}`"),
                );
            }
        }
    }

    let tp = p.f("transport_socket");
    let quic = matches!(protocol, Some(model::UpstreamProtocol::Http3 { .. }));
    let tls = c.transport_socket.as_ref().map(|ts| {
        ctx.unsupported(&tp, ts.unsupported_fields());
        let cp = tp.f("typed_config");
        let name = ts.name.as_deref().unwrap_or("");
        match &ts.typed_config {
            Some(UpstreamTransportConfig::Quic(q)) => {
                check_name(ctx, &tp.f("name"), name, QUIC_NAME);
                ctx.unsupported(&cp, q.unsupported_fields());
                if protocol.is_some() && !quic {
                    ctx.err(&cp, "a QUIC transport socket needs http3_protocol_options; HTTP/2 and HTTP/1.1 upstreams use `envoy.transport_sockets.tls`");
                }
                let up = cp.f("upstream_tls_context");
                match &q.upstream_tls_context {
                    Some(u) => build_upstream_tls(ctx, &up, u),
                    None => model::UpstreamTls::default(),
                }
            }
            Some(UpstreamTransportConfig::Tls(u)) => {
                check_name(ctx, &tp.f("name"), name, TLS_NAME);
                if quic {
                    ctx.err(&cp, format!("HTTP/3 upstreams need `{QUIC_NAME}` with `{QUIC_UPSTREAM_TRANSPORT}`"));
                }
                build_upstream_tls(ctx, &cp, u)
            }
            Some(UpstreamTransportConfig::Other(url)) => {
                ctx.err(
                    &cp.f("@type"),
                    format!("`{url}` is not supported by Ferry (yet) on a cluster; expected `{QUIC_UPSTREAM_TRANSPORT}` or `{UPSTREAM_TLS_CONTEXT}`"),
                );
                model::UpstreamTls::default()
            }
            None => {
                ctx.err(&cp, format!("is required: `{QUIC_UPSTREAM_TRANSPORT}` or `{UPSTREAM_TLS_CONTEXT}`"));
                model::UpstreamTls::default()
            }
        }
    });

    match (protocol, tls) {
        (Some(protocol), Some(tls)) => Some(model::UpstreamHttp {
            protocol,
            tls,
            plaintext: false,
        }),
        (Some(model::UpstreamProtocol::Http3 { .. }), None) => {
            ctx.err(
                &tp,
                format!("is required with http3_protocol_options: `{QUIC_NAME}` with `{QUIC_UPSTREAM_TRANSPORT}`"),
            );
            None
        }
        // HTTP/2 and HTTP/1.1 without a transport socket: cleartext, as in Envoy.
        (Some(protocol), None) => Some(model::UpstreamHttp {
            protocol,
            tls: model::UpstreamTls::default(),
            plaintext: true,
        }),
        (None, Some(_)) if c.typed_extension_protocol_options.is_empty() => {
            ctx.err(
                &op,
                "a transport_socket on a forwarding cluster needs typed_extension_protocol_options (HttpProtocolOptions with http3_protocol_options, http2_protocol_options or http_protocol_options)",
            );
            None
        }
        _ => None,
    }
}

fn build_upstream_tls(ctx: &mut Ctx, p: &P, u: &raw::UpstreamTlsContext) -> model::UpstreamTls {
    ctx.unsupported(p, u.unsupported_fields());
    let mut tls = model::UpstreamTls {
        sni: u.sni.clone().filter(|s| !s.is_empty()),
        trusted_ca_pem: None,
    };
    let Some(common) = &u.common_tls_context else {
        return tls;
    };
    let cp = p.f("common_tls_context");
    ctx.unsupported(&cp, common.unsupported_fields());
    if !common.tls_certificates.is_empty() {
        ctx.err(
            &cp.f("tls_certificates"),
            format!("{NOT_SUPPORTED}: client certificates to upstreams"),
        );
    }
    if let Some(vc) = &common.validation_context {
        let vp = cp.f("validation_context");
        ctx.unsupported(&vp, vc.unsupported_fields());
        if vc.trusted_ca.is_some() {
            tls.trusted_ca_pem = Some(data_source(
                ctx,
                &vp.f("trusted_ca"),
                vc.trusted_ca.as_ref(),
                PemKind::CertificateChain,
                false,
            ));
        }
    }
    tls
}

fn build_load_assignment(
    ctx: &mut Ctx,
    p: &P,
    la: &raw::ClusterLoadAssignment,
    discovery: Option<model::DiscoveryType>,
) -> Vec<model::Endpoint> {
    ctx.unsupported(p, la.unsupported_fields());
    ctx.required(&p.f("cluster_name"), la.cluster_name.as_ref());
    let mut endpoints = Vec::new();
    for (i, locality) in la.endpoints.iter().enumerate() {
        let lp = p.f("endpoints").i(i);
        ctx.unsupported(&lp, locality.unsupported_fields());
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let bp = lp.f("lb_endpoints").i(j);
            ctx.unsupported(&bp, lb.unsupported_fields());
            let ep = bp.f("endpoint");
            let Some(endpoint) = &lb.endpoint else {
                ctx.err(&ep, "is required");
                continue;
            };
            ctx.unsupported(&ep, endpoint.unsupported_fields());
            let Some((host, port, _protocol, sp)) =
                socket_address(ctx, &ep.f("address"), endpoint.address.as_ref())
            else {
                continue;
            };
            if port == Some(0) {
                ctx.err(&sp.f("port_value"), "an endpoint needs a port (1..=65535)");
            }
            if !host.is_empty() {
                let ap = sp.f("address");
                match discovery {
                    None => {}
                    Some(model::DiscoveryType::Static) => {
                        ip_literal(ctx, &ap, host, "a STATIC cluster's endpoint");
                    }
                    Some(model::DiscoveryType::StrictDns | model::DiscoveryType::LogicalDns)
                        if host.parse::<IpAddr>().is_err() && !is_host_name(host) =>
                    {
                        ctx.err(
                            &ap,
                            format!("`{host}` is neither an IP address nor a valid DNS name"),
                        );
                    }
                    Some(_) => {}
                }
            }
            endpoints.push(model::Endpoint {
                address: host.to_owned(),
                port: port.unwrap_or(0),
            });
        }
    }
    endpoints
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_` (1..=63 bytes each),
/// at most 253 bytes, an optional trailing dot.
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

// ---------------------------------------------------------------------------------------
// Extension identification: `name` and `@type`

/// One kind of extension slot: what it is called and the `@type`s it accepts.
struct Slot {
    what: &'static str,
    /// `envoy.<category>.` prefix of the extension names of this kind.
    category: &'static str,
    /// Canonical names Ferry implements for this kind.
    names: &'static [&'static str],
    /// The `@type`s accepted here.
    expected: &'static [&'static str],
}

const NETWORK_FILTER_SLOT: Slot = Slot {
    what: "network filter",
    category: "envoy.filters.network.",
    names: &[HCM_NAME],
    expected: &[HTTP_CONNECTION_MANAGER],
};
const HTTP_FILTER_SLOT: Slot = Slot {
    what: "HTTP filter",
    category: "envoy.filters.http.",
    names: &[ROUTER_NAME, DFP_FILTER_NAME, BASIC_AUTH_NAME],
    expected: &[ROUTER, DFP_FILTER, BASIC_AUTH],
};
const QUIC_TRANSPORT_SLOT: Slot = Slot {
    what: "QUIC listener transport socket",
    category: "envoy.transport_sockets.",
    names: &[QUIC_NAME, TLS_NAME],
    expected: &[QUIC_DOWNSTREAM_TRANSPORT],
};
const TLS_TRANSPORT_SLOT: Slot = Slot {
    what: "TCP listener transport socket",
    category: "envoy.transport_sockets.",
    names: &[QUIC_NAME, TLS_NAME],
    expected: &[DOWNSTREAM_TLS_CONTEXT],
};

fn expected_list(slot: &Slot) -> String {
    slot.expected
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// A `@type` this slot does not implement: an Envoy extension Ferry lacks, or a wrong URL.
/// Returns whether the URL was identified as another Envoy extension of this kind.
fn type_error(ctx: &mut Ctx, p: &P, url: &str, slot: &Slot) -> bool {
    let expected = expected_list(slot);
    match envoy_extension_name(url) {
        Some(ext) if ext.starts_with(slot.category) && !slot.names.contains(&ext.as_str()) => {
            ctx.err(
                p,
                format!(
                    "`{url}` is the Envoy {} `{ext}`, not supported by Ferry (yet); supported here: {expected}",
                    slot.what
                ),
            );
            true
        }
        _ => {
            ctx.err(
                p,
                format!(
                    "unknown or misplaced @type `{url}` for this {}; expected {expected}",
                    slot.what
                ),
            );
            false
        }
    }
}

/// A filter without `typed_config` is looked up by name (as Envoy does). Returns whether
/// the name was identified as another Envoy extension of this kind.
fn name_error(ctx: &mut Ctx, p: &P, name: &str, slot: &Slot) -> bool {
    let expected = expected_list(slot);
    if name.is_empty() {
        ctx.err(p, format!("is required (and a typed_config: {expected})"));
        false
    } else if name.starts_with(slot.category) {
        ctx.err(
            p,
            format!(
                "the Envoy {} `{name}` is not supported by Ferry (yet); supported: {expected}",
                slot.what
            ),
        );
        true
    } else {
        ctx.err(
            p,
            format!(
                "unknown {} `{name}` without a typed_config; expected {expected}",
                slot.what
            ),
        );
        false
    }
}

/// A `uint32`/`UInt32Value`/`int64` field within `min..=max`.
fn uint(ctx: &mut Ctx, p: &P, v: Option<&raw::PortValue>, min: u64, max: u64) -> Option<u64> {
    match v? {
        raw::PortValue::Number(n) if (min..=max).contains(n) => Some(*n),
        raw::PortValue::Number(n) => {
            ctx.err(p, format!("{n} is out of range: expected {min}..={max}"));
            None
        }
        raw::PortValue::Invalid(s) => {
            ctx.err(p, format!("`{s}` is not an unsigned integer"));
            None
        }
    }
}

/// The extension `name` must be the canonical name of the extension its `@type` selects.
fn check_name(ctx: &mut Ctx, p: &P, name: &str, expected: &str) {
    if name.is_empty() {
        ctx.err(p, format!("is required (`{expected}`)"));
    } else if name != expected {
        ctx.err(p, format!("`{name}` does not name the extension its typed_config holds; expected `{expected}`"));
    }
}

/// `type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig`
/// -> `envoy.filters.http.dynamic_forward_proxy`.
fn envoy_extension_name(url: &str) -> Option<String> {
    let rest = url.strip_prefix("type.googleapis.com/envoy.extensions.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    let version = parts.iter().position(|p| {
        p.len() >= 2 && p.starts_with('v') && p[1..].bytes().all(|b| b.is_ascii_digit())
    })?;
    let message = parts.get(version + 1)?;
    if version == 0
        || version + 2 != parts.len()
        || !message.starts_with(|c: char| c.is_ascii_uppercase())
    {
        return None;
    }
    Some(format!("envoy.{}", parts[..version].join(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        for ok in [
            "*",
            "example.com",
            "*.example.com",
            "*-bar.example.com",
            "example.*",
            "foo-*",
            "foo.lyft.com:80",
            "[::1]:80",
        ] {
            assert_eq!(check_domain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a*b", "*.*", "**", "*a*", "ex ample.com", "a.*.b"] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names() {
        for ok in [
            "localhost",
            "example.com",
            "example.com.",
            "a-b.c_d.e",
            "xn--bcher-kva.example",
        ] {
            assert!(is_host_name(ok), "{ok}");
        }
        for bad in ["", ".", "a..b", "-a.b", "a-.b", "a b", "a/b", "a:80"] {
            assert!(!is_host_name(bad), "{bad}");
        }
    }

    #[test]
    fn extension_names() {
        assert_eq!(
            envoy_extension_name("type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig")
                .as_deref(),
            Some("envoy.filters.http.dynamic_forward_proxy")
        );
        assert_eq!(
            envoy_extension_name(
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
            )
            .as_deref(),
            Some("envoy.transport_sockets.tls")
        );
        assert_eq!(
            envoy_extension_name("type.googleapis.com/udpa.type.v1.TypedStruct"),
            None
        );
        assert_eq!(
            envoy_extension_name("type.googleapis.com/envoy.extensions.filters.http.router.v3"),
            None
        );
    }

    #[test]
    fn tchar() {
        assert!("CONNECT-UDP".bytes().all(is_tchar));
        assert!(!"CONNECT UDP".bytes().all(is_tchar));
    }
}
