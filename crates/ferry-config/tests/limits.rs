//! Limits: the overload manager's global downstream connection limit, concurrent streams
//! per connection (HTTP/3 listener and HTTP/2 HCM) and `max_stream_duration`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_config::SocketBuffers;

const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
const QUIC: &str = "static_resources.listeners[0].udp_listener_config.quic_options";
const MONITOR: &str = "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

fn with_overload(body: &str) -> String {
    edit(
        &terminate_h3(),
        "admin:\n",
        &format!("overload_manager:\n{body}admin:\n"),
    )
}

fn monitor(max: &str) -> String {
    format!(
        "  refresh_interval: 0.25s\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config:\n      \"@type\": {MONITOR}\n      max_active_downstream_connections: {max}\n"
    )
}

#[test]
fn defaults() {
    let b = load_yaml(&terminate_h3()).unwrap();
    assert_eq!(b.max_downstream_connections, None);
    assert_eq!(
        b.listeners[0].quic.as_ref().unwrap().max_concurrent_streams,
        100
    );
    let hcm = &b.listeners[0].filter_chain.hcm;
    assert_eq!(hcm.http2_max_concurrent_streams, 100);
    assert_eq!(hcm.max_stream_duration, None);
}

#[test]
fn global_downstream_connection_limit() {
    let b = load_yaml(&with_overload(&monitor("7"))).unwrap();
    assert_eq!(b.max_downstream_connections, Some(7));
    // int64 fields may be JSON strings.
    let b = load_yaml(&with_overload(&monitor("\"9\""))).unwrap();
    assert_eq!(b.max_downstream_connections, Some(9));

    let fp = "overload_manager.resource_monitors[0].typed_config.max_active_downstream_connections";
    for bad in ["0", "-1", "x"] {
        let e = single_error(&with_overload(&monitor(bad)));
        assert_eq!(e.path, fp, "{bad}: {e}");
    }
}

#[test]
fn overload_manager_errors_name_their_field() {
    // Another resource monitor.
    let text = with_overload(
        "  resource_monitors:\n  - name: envoy.resource_monitors.fixed_heap\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig\n      max_heap_size_bytes: 1000\n",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "overload_manager.resource_monitors[0].typed_config.@type"
    );
    assert!(e.message.contains("not supported by Ferry"), "{e}");
    // Overload actions are not supported.
    let text = with_overload(&format!("{}  actions: []\n", monitor("5")));
    let e = single_error(&text);
    assert_eq!(e.path, "overload_manager.actions");
    // The monitor's name must match its type.
    let text = with_overload(&monitor("5").replace(
        "envoy.resource_monitors.global_downstream_max_connections",
        "envoy.resource_monitors.other",
    ));
    let e = single_error(&text);
    assert_eq!(e.path, "overload_manager.resource_monitors[0].name");
    // Missing the limit.
    let text =
        with_overload(&monitor("5").replace("      max_active_downstream_connections: 5\n", ""));
    assert!(errors_of(&text).has_path(
        "overload_manager.resource_monitors[0].typed_config.max_active_downstream_connections"
    ));
    // Two limits.
    let two = format!(
        "{}{}",
        monitor("5"),
        monitor("6").replace("  refresh_interval: 0.25s\n  resource_monitors:\n", "")
    );
    let e = single_error(&with_overload(&two));
    assert_eq!(e.path, "overload_manager.resource_monitors[1]");
}

#[test]
fn quic_max_concurrent_streams() {
    let with = |v: &str| {
        edit(
            &terminate_h3(),
            "      quic_options: {}\n",
            &format!("      quic_options:\n        quic_protocol_options:\n          max_concurrent_streams: {v}\n"),
        )
    };
    let b = load_yaml(&with("3")).unwrap();
    assert_eq!(
        b.listeners[0].quic.as_ref().unwrap().max_concurrent_streams,
        3
    );
    for bad in ["0", "4294967296", "-2"] {
        let e = single_error(&with(bad));
        assert_eq!(
            e.path,
            format!("{QUIC}.quic_protocol_options.max_concurrent_streams"),
            "{bad}: {e}"
        );
    }
    let text = edit(
        &terminate_h3(),
        "      quic_options: {}\n",
        "      quic_options:\n        quic_protocol_options:\n          initial_stream_window_size: 65536\n",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        format!("{QUIC}.quic_protocol_options.initial_stream_window_size")
    );
}

#[test]
fn http2_max_concurrent_streams_and_max_stream_duration() {
    let with = |line: &str| {
        edit(
            &terminate_h3(),
            "          stat_prefix: ingress_http\n",
            &format!("          stat_prefix: ingress_http\n          {line}\n"),
        )
    };
    let b = load_yaml(&with(
        "http2_protocol_options: { max_concurrent_streams: 7 }",
    ))
    .unwrap();
    assert_eq!(
        b.listeners[0].filter_chain.hcm.http2_max_concurrent_streams,
        7
    );
    for bad in ["0", "2147483648"] {
        let e = single_error(&with(&format!(
            "http2_protocol_options: {{ max_concurrent_streams: {bad} }}"
        )));
        assert_eq!(
            e.path,
            format!("{HCM}.http2_protocol_options.max_concurrent_streams")
        );
    }

    let b = load_yaml(&with(
        "common_http_protocol_options: { max_stream_duration: 1.5s }",
    ))
    .unwrap();
    assert_eq!(
        b.listeners[0].filter_chain.hcm.max_stream_duration,
        Some(Duration::from_millis(1500))
    );
    let b = load_yaml(&with(
        "common_http_protocol_options: { max_stream_duration: 0s }",
    ))
    .unwrap();
    assert_eq!(b.listeners[0].filter_chain.hcm.max_stream_duration, None);
    let e = single_error(&with(
        "common_http_protocol_options: { max_stream_duration: 5 }",
    ));
    assert_eq!(
        e.path,
        format!("{HCM}.common_http_protocol_options.max_stream_duration")
    );
    let e = single_error(&with(
        "common_http_protocol_options: { max_connection_duration: 5s }",
    ));
    assert_eq!(
        e.path,
        format!("{HCM}.common_http_protocol_options.max_connection_duration")
    );
}

/// The path, `http3_protocol_options.quic_protocol_options.max_concurrent_streams`
/// on the HCM, applies to the listener's QUIC connections when the listener's own
/// `quic_options` does not set it (Envoy reads only the listener's: a documented
/// difference); the listener's wins when both are set.
#[test]
fn hcm_quic_max_concurrent_streams() {
    let hcm = |v: &str| {
        edit(
            &terminate_h3(),
            "          http3_protocol_options:\n",
            &format!("          http3_protocol_options:\n            quic_protocol_options:\n              max_concurrent_streams: {v}\n"),
        )
    };
    let b = load_yaml(&hcm("7")).unwrap();
    assert_eq!(
        b.listeners[0].quic.as_ref().unwrap().max_concurrent_streams,
        7
    );
    let both = edit(
        &hcm("7"),
        "      quic_options: {}\n",
        "      quic_options:\n        quic_protocol_options:\n          max_concurrent_streams: 3\n",
    );
    let b = load_yaml(&both).unwrap();
    assert_eq!(
        b.listeners[0].quic.as_ref().unwrap().max_concurrent_streams,
        3
    );
    let e = single_error(&hcm("0"));
    assert_eq!(
        e.path,
        format!("{HCM}.http3_protocol_options.quic_protocol_options.max_concurrent_streams")
    );
}

fn with_socket_options(text: &str, options: &str) -> String {
    edit(
        text,
        "    udp_listener_config:\n",
        &format!("    socket_options:\n{options}    udp_listener_config:\n"),
    )
}

#[test]
fn socket_buffers_from_socket_options() {
    assert_eq!(
        load_yaml(&terminate_h3()).unwrap().listeners[0].socket_buffers,
        SocketBuffers::default()
    );
    // SO_RCVBUF and SO_SNDBUF (level SOL_SOCKET), as Envoy writes them; int64 values may be
    // strings, and `state` and `description` are accepted.
    let b = load_yaml(&with_socket_options(
        &terminate_h3(),
        "    - { description: rcvbuf, level: 1, name: 8, int_value: 33554432, state: STATE_PREBIND }\n    - { level: 1, name: 7, int_value: \"1048576\" }\n",
    ))
    .unwrap();
    assert_eq!(
        b.listeners[0].socket_buffers,
        SocketBuffers {
            recv: Some(33_554_432),
            send: Some(1_048_576)
        }
    );
}

#[test]
fn other_socket_options_are_refused_by_path() {
    let p = "static_resources.listeners[0].socket_options[0]";
    let refused = |option: &str| single_error(&with_socket_options(&terminate_h3(), option));
    // SO_KEEPALIVE.
    let e = refused("    - { level: 1, name: 9, int_value: 1 }\n");
    assert_eq!(e.path, format!("{p}.name"));
    assert!(e.message.contains("SO_RCVBUF"), "{e}");
    // Another level (IPPROTO_IP).
    assert_eq!(
        refused("    - { level: 0, name: 8, int_value: 1 }\n").path,
        format!("{p}.name")
    );
    // A buffer size that is not a positive int.
    for bad in ["0", "-1", "x", "4294967296"] {
        let e = refused(&format!(
            "    - {{ level: 1, name: 8, int_value: {bad} }}\n"
        ));
        assert_eq!(e.path, format!("{p}.int_value"), "{bad}: {e}");
    }
    assert_eq!(
        refused("    - { level: 1, name: 8 }\n").path,
        format!("{p}.int_value")
    );
    let e = refused("    - { level: 1, name: 8, int_value: 1, state: STATE_OTHER }\n");
    assert_eq!(e.path, format!("{p}.state"));
    let e = refused("    - { level: 1, name: 8, buf_value: AAAA }\n");
    assert!(e.path.starts_with(p), "{e}");
}

#[test]
fn socket_buffers_on_a_tcp_listener() {
    let (tcp, _, _) = bootstrap("terminate-tcp-h2-h1.yaml.in");
    let tcp = edit(
        &tcp,
        "    filter_chains:\n",
        "    socket_options:\n    - { level: 1, name: 8, int_value: 65536 }\n    filter_chains:\n",
    );
    assert_eq!(
        load_yaml(&tcp).unwrap().listeners[0].socket_buffers,
        SocketBuffers {
            recv: Some(65_536),
            send: None
        }
    );
}
