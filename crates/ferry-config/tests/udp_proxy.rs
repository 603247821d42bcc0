//! The udp_proxy listener filter (`UdpProxyConfig` with `tunneling_config`): what loads,
//! what each mistake or unsupported field reports, by path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use ferry_config::*;

fn example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/udp-proxy-h3.yaml");
    std::fs::read_to_string(path)
        .unwrap()
        // No files needed: the CA is only read, never used here.
        .replace(
            "trusted_ca: { filename: examples/certs/cert.pem }",
            "trusted_ca: { inline_string: \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\" }",
        )
}

fn load(text: &str) -> Result<Bootstrap, ConfigErrors> {
    load_str(text, Format::Yaml)
}

fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in the text");
    text.replacen(from, to, 1)
}

const F: &str = "static_resources.listeners[0].listener_filters[0].typed_config";

fn first_error(text: &str) -> ConfigError {
    let errors = load(text).expect_err("should fail");
    errors.0[0].clone()
}

#[test]
fn the_example_loads_with_every_field() {
    let b = load(&example()).unwrap_or_else(|e| panic!("{e}"));
    let u = b.listeners[0].udp_proxy.as_ref().unwrap();
    assert_eq!(u.stat_prefix, "udp_tunnel");
    assert_eq!(u.cluster, "masque_proxy");
    assert_eq!(u.idle_timeout, Duration::from_secs(60));
    let t = u.tunneling.as_ref().unwrap();
    assert_eq!(t.proxy_host, "localhost");
    assert_eq!(t.proxy_port, Some(4433));
    assert_eq!(t.target_host, "localhost");
    assert_eq!(t.default_target_port, 9000);
    assert_eq!(t.max_connect_attempts, 2);
    assert_eq!(
        t.headers_to_add,
        vec![("x-tunnel-from".to_string(), "udp-proxy-example".to_string())]
    );
    assert_eq!(
        t.buffer,
        Some(BufferOptions {
            max_buffered_datagrams: 1024,
            max_buffered_bytes: 16384
        })
    );
    assert_eq!(b.listeners[0].protocol, SocketProtocol::Udp);
    assert_eq!(b.listeners[0].quic, None);
}

#[test]
fn defaults_are_envoys() {
    let text = edit(&example(), "        idle_timeout: 60s\n", "");
    let text = edit(
        &text,
        "          buffer_options:\n            max_buffered_datagrams: 1024\n            max_buffered_bytes: 16384\n",
        "          buffer_options: {}\n",
    );
    let text = edit(
        &text,
        "          retry_options:\n            max_connect_attempts: 2\n",
        "",
    );
    let b = load(&text).unwrap();
    let u = b.listeners[0].udp_proxy.as_ref().unwrap();
    assert_eq!(u.idle_timeout, Duration::from_secs(60));
    assert_eq!(u.tunneling.as_ref().unwrap().max_connect_attempts, 1);
    assert_eq!(
        u.tunneling.as_ref().unwrap().buffer,
        Some(BufferOptions {
            max_buffered_datagrams: 1024,
            max_buffered_bytes: 16384
        })
    );
    // No buffer_options: no buffering.
    let text = edit(&text, "          buffer_options: {}\n", "");
    let b = load(&text).unwrap();
    assert_eq!(
        b.listeners[0]
            .udp_proxy
            .as_ref()
            .unwrap()
            .tunneling
            .as_ref()
            .unwrap()
            .buffer,
        None
    );
}

/// The example with `add` (tunneling_config lines) and its cluster reached over
/// `protocol` (`http2_protocol_options: {}` or `http_protocol_options: {}`), cleartext.
fn example_over(protocol: &str, add: &str) -> String {
    let text = edit(
        &example(),
        "          proxy_port: 4433\n",
        &format!("          proxy_port: 4433\n{add}"),
    );
    let cut = text.find("          http3_protocol_options:").unwrap();
    format!("{}          {protocol}\n", &text[..cut])
}

fn tunneling(text: &str) -> UdpTunneling {
    let b = load(text).unwrap_or_else(|e| panic!("{e}"));
    b.listeners[0].udp_proxy.clone().unwrap().tunneling.unwrap()
}

/// `use_post` (HTTP/2 only, as in Envoy), `post_path` (default `/`, Envoy's checks) and
/// `propagate_response_trailers`.
#[test]
fn use_post_post_path_and_trailers() {
    let h2 = "http2_protocol_options: {}";
    let t = tunneling(&example_over(h2, "          use_post: true\n"));
    assert_eq!(t.post_path.as_deref(), Some("/"));
    assert!(!t.propagate_response_trailers);
    let t = tunneling(&example_over(
        h2,
        "          use_post: true\n          post_path: /tunnel\n          propagate_response_trailers: true\n",
    ));
    assert_eq!(t.post_path.as_deref(), Some("/tunnel"));
    assert!(t.propagate_response_trailers);
    // Without use_post: CONNECT-UDP; trailers accepted (only POST tunnels carry them).
    let t = tunneling(&example_over(
        h2,
        "          use_post: false\n          propagate_response_trailers: true\n",
    ));
    assert_eq!(t.post_path, None);
    assert!(t.propagate_response_trailers);
    let t = tunneling(&edit(
        &example(),
        "          proxy_port: 4433\n",
        "          proxy_port: 4433\n          propagate_response_trailers: true\n",
    ));
    assert!(t.propagate_response_trailers);

    // Envoy's own refusals (the same messages as `envoy --mode validate`).
    let e = first_error(&example_over(h2, "          post_path: /tunnel\n"));
    assert_eq!(e.path, format!("{F}.tunneling_config.post_path"));
    assert!(e.message.contains("can't set a post path"), "{e}");
    let e = first_error(&example_over(
        h2,
        "          use_post: true\n          post_path: tunnel\n",
    ));
    assert_eq!(e.path, format!("{F}.tunneling_config.post_path"));
    assert!(e.message.contains("must start with '/'"), "{e}");
    let e = first_error(&example_over(
        h2,
        "          use_post: true\n          post_path: \"/a b\"\n",
    ));
    assert_eq!(e.path, format!("{F}.tunneling_config.post_path"));

    // POST tunnels over HTTP/3 or HTTP/1.1: refused, naming the field and the version.
    for (text, version) in [
        (
            edit(
                &example(),
                "          proxy_port: 4433\n",
                "          proxy_port: 4433\n          use_post: true\n",
            ),
            "HTTP/3",
        ),
        (
            example_over("http_protocol_options: {}", "          use_post: true\n"),
            "HTTP/1.1",
        ),
    ] {
        let e = first_error(&text);
        assert_eq!(e.path, format!("{F}.tunneling_config.use_post"), "{e}");
        assert!(e.message.contains(version), "{e}");
        assert!(e.message.contains("HTTP/2 upstream"), "{e}");
    }
}

#[test]
fn unsupported_fields_are_named() {
    let text = edit(
        &example(),
        "        stat_prefix: udp_tunnel\n",
        "        stat_prefix: udp_tunnel\n        use_per_packet_load_balancing: true\n",
    );
    assert_eq!(
        first_error(&text).path,
        format!("{F}.use_per_packet_load_balancing")
    );
}

#[test]
fn mistakes_are_reported_by_path() {
    // No http_capsule session filter.
    let text = edit(
        &example(),
        "        session_filters:\n        - name: envoy.filters.udp.session.http_capsule\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.session.http_capsule.v3.FilterConfig\n",
        "",
    );
    assert_eq!(first_error(&text).path, format!("{F}.session_filters"));
    // An unknown cluster, and a cluster that is not a CONNECT-UDP proxy.
    let text = edit(&example(), "cluster: masque_proxy", "cluster: nope");
    let e = first_error(&text);
    assert_eq!(
        e.path,
        format!("{F}.matcher.on_no_match.action.typed_config.cluster")
    );
    assert!(e.message.contains("unknown cluster"), "{e}");
    let start = example()
        .find("    typed_extension_protocol_options:")
        .unwrap();
    let plain = example()[..start].to_string();
    let e = first_error(&plain);
    assert_eq!(
        e.path,
        format!("{F}.matcher.on_no_match.action.typed_config.cluster")
    );
    assert!(e.message.contains("not a CONNECT-UDP proxy"), "{e}");
    // Ports.
    let text = edit(
        &example(),
        "default_target_port: 9000",
        "default_target_port: 0",
    );
    assert_eq!(
        first_error(&text).path,
        format!("{F}.tunneling_config.default_target_port")
    );
    // Command operators are not evaluated (yet).
    let text = edit(
        &example(),
        "target_host: localhost",
        "target_host: \"%FILTER_STATE(x:PLAIN)%\"",
    );
    assert_eq!(
        first_error(&text).path,
        format!("{F}.tunneling_config.target_host")
    );
    // No tunneling_config: plain UDP proxying, where the http_capsule filter has no place.
    let start = example().find("        tunneling_config:").unwrap();
    let end = example().find("  clusters:").unwrap();
    let text = format!("{}{}", &example()[..start], &example()[end..]);
    assert_eq!(first_error(&text).path, format!("{F}.session_filters"));
    let start = text.find("        session_filters:").unwrap();
    let end = text.find("  clusters:").unwrap();
    let plain = format!("{}{}", &text[..start], &text[end..]);
    let b = load(&plain).unwrap_or_else(|e| panic!("{e}"));
    let u = b.listeners[0].udp_proxy.as_ref().unwrap();
    assert!(u.tunneling.is_none());
    assert_eq!(u.cluster, "masque_proxy");
    // A udp_proxy on a QUIC listener.
    let text = edit(
        &example(),
        "    listener_filters:\n",
        "    udp_listener_config:\n      quic_options: {}\n    listener_filters:\n",
    );
    assert!(load(&text)
        .unwrap_err()
        .has_path("static_resources.listeners[0].listener_filters"));
    // An unknown listener filter type.
    let text = edit(
        &example(),
        "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
        "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
    );
    let e = first_error(&text);
    assert_eq!(e.path, format!("{F}.@type"));
    assert!(e.message.contains("not supported by Ferry (yet)"), "{e}");
}

#[test]
fn session_access_log_and_options_load() {
    let log = "        access_log:\n        - name: envoy.access_loggers.stdout\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n            log_format:\n              text_format_source:\n                inline_string: \"%DYNAMIC_METADATA(udp.proxy.session:datagrams_sent)% %FILTER_STATE(envoy.udp_proxy.propagate_response_headers:TYPED)% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %ACCESS_LOG_TYPE%\\n\"\n        access_log_options:\n          flush_access_log_on_tunnel_connected: true\n          access_log_flush_interval: 0.5s\n";
    let text = edit(
        &example(),
        "        tunneling_config:\n",
        &format!("{log}        tunneling_config:\n          propagate_response_headers: true\n"),
    );
    let b = load(&text).unwrap_or_else(|e| panic!("{e}"));
    let u = b.listeners[0].udp_proxy.as_ref().unwrap();
    assert_eq!(u.access_log.len(), 1);
    assert!(u.flush_access_log_on_tunnel_connected);
    assert_eq!(
        u.access_log_flush_interval,
        Some(Duration::from_millis(500))
    );
    assert!(u.tunneling.as_ref().unwrap().propagate_response_headers);

    // Mistakes name their path.
    for (from, to, path) in [
        (
            "udp.proxy.session:datagrams_sent",
            "udp.proxy.session:nope",
            "access_log[0].typed_config.log_format.text_format_source",
        ),
        (
            "propagate_response_headers:TYPED",
            "other.state",
            "access_log[0].typed_config.log_format.text_format_source",
        ),
        (
            "access_log_flush_interval: 0.5s",
            "access_log_flush_interval: 0s",
            "access_log_options.access_log_flush_interval",
        ),
    ] {
        let e = first_error(&edit(&text, from, to));
        assert_eq!(e.path, format!("{F}.{path}"), "{e}");
    }
    let e = first_error(&edit(
        &text,
        "        access_log_options:\n",
        "        proxy_access_log: []\n        access_log_options:\n",
    ));
    assert_eq!(e.path, format!("{F}.proxy_access_log"));
}
