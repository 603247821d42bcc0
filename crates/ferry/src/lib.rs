//! Ferry: a CONNECT-UDP (RFC 9298) proxy configured with Envoy v3 bootstraps.
//!
//! Layout: `ferry-proto` holds the protocol core (no I/O, no clock); `ferry-config` turns a
//! bootstrap into a validated model; this crate is the tokio runtime: listeners, routing,
//! tunnels, clusters, stats and the admin endpoint.

pub mod accesslog;
pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config_dump;
pub mod decide;
pub mod demux;
pub mod dfp;
pub mod dns_client;
pub mod encap;
pub mod forward;
pub mod h3limit;
pub mod h3server;
pub mod limits;
pub mod policy;
pub mod quic;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod stats_render;
pub mod stream;
pub mod supervise;
pub mod tcpserver;
pub mod tls;
pub mod tunnel;
pub mod udpproxy;
pub mod upstream;
pub mod upstream_tcp;

/// Ferry's version string.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
