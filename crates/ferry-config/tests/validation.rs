//! Parse and validation errors: each names its field path; all are reported at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use ferry_config::*;

const ROUTE: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route";

// ---------------------------------------------------------------------------------------
// Layer 1: unknown fields, types, syntax

#[test]
fn unknown_field_names_its_full_path() {
    let text = edit(
        &terminate_h3(),
        "                  upgrade_configs:\n",
        "                  upgrade_config:\n",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route.upgrade_config"
    );
    assert!(
        e.message.starts_with("unknown field `upgrade_config`"),
        "{e}"
    );
    assert!(e.message.contains("did you mean `upgrade_configs`?"), "{e}");
    assert!(e.message.contains("(line "), "no location: {e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{ROUTE}.upgrade_config: unknown field ")),
        "{e}"
    );
}

#[test]
fn unknown_field_at_the_top_and_in_the_middle() {
    let e = single_error(&format!("{}\nstatic_resourcez: {{}}\n", terminate_h3()));
    assert_eq!(e.path, "static_resourcez");
    assert!(
        e.message.contains("did you mean `static_resources`?"),
        "{e}"
    );

    let text = edit(
        &terminate_h3(),
        "    udp_listener_config:\n",
        "    udp_listener_confg:\n",
    );
    let e = single_error(&text);
    assert_eq!(e.path, "static_resources.listeners[0].udp_listener_confg");
    assert!(e.message.starts_with("unknown field"), "{e}");
}

#[test]
fn known_envoy_field_is_not_supported_not_unknown() {
    let text = edit(
        &terminate_h3(),
        "  - name: h3_listener\n",
        "  - name: h3_listener\n    per_connection_buffer_limit_bytes: 32768\n",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].per_connection_buffer_limit_bytes"
    );
    assert_eq!(e.message, "Envoy field not supported by Ferry (yet)");
    assert_eq!(e.message, NOT_SUPPORTED);
}

#[test]
fn many_unsupported_fields_are_all_reported() {
    let text = edit(
        &terminate_h3(),
        "          stat_prefix: ingress_http\n",
        "          stat_prefix: ingress_http\n          use_remote_address: true\n          access_log_flush_interval: 1s\n          common_http_protocol_options: { idle_timeout: 1s }\n",
    );
    let text = edit(&text, "                  cluster: service_target\n", "                  cluster: service_target\n                  timeout: 0s\n                  prefix_rewrite: /x\n");
    let text = edit(
        &text,
        "    dns_lookup_family: V4_ONLY\n",
        "    dns_lookup_family: V4_ONLY\n    lb_policy: ROUND_ROBIN\n    health_checks: []\n    circuit_breakers: {}\n",
    );
    let text = edit(&text, "admin:\n", "node: { id: a, cluster: b }\nadmin:\n  access_log_path: /dev/null\n  profile_path: /tmp/p\n");
    let text = edit(
        &text,
        "      quic_options: {}\n",
        "      quic_options: { idle_timeout: 5s }\n",
    );
    let errs = errors_of(&text);
    let want = [
        "node".to_owned(),
        "admin.access_log_path".to_owned(),
        "admin.profile_path".to_owned(),
        "static_resources.listeners[0].udp_listener_config.quic_options.idle_timeout".to_owned(),
        format!("{HCM}.access_log_flush_interval"),
        format!("{HCM}.use_remote_address"),
        format!("{ROUTE}.prefix_rewrite"),
        format!("{ROUTE}.timeout"),
        format!("{HCM}.common_http_protocol_options.idle_timeout"),
        "static_resources.clusters[0].health_checks".to_owned(),
        "static_resources.clusters[0].circuit_breakers".to_owned(),
    ];
    assert_eq!(
        errs.paths(),
        want.iter().map(String::as_str).collect::<Vec<_>>(),
        "{errs}"
    );
    assert!(errs.0.iter().all(|e| e.message == NOT_SUPPORTED));
}

#[test]
fn type_errors_name_the_path() {
    let text = edit(&terminate_h3(), "port_value: 9901", "port_value: http");
    let e = single_error(&text);
    assert_eq!(e.path, "admin.address.socket_address.port_value");
    assert!(e.message.contains("`http` is not a port number"), "{e}");

    let text = edit(
        &terminate_h3(),
        "            allow_extended_connect: true",
        "            allow_extended_connect: yes",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        format!("{HCM}.http3_protocol_options.allow_extended_connect")
    );
    assert!(e.message.contains("invalid type"), "{e}");
}

#[test]
fn yaml_syntax_error_has_a_location() {
    // A placeholder left in: YAML cannot scan it; the error says where.
    let text = edit(
        &terminate_h3(),
        "port_value: 9901",
        "port_value: @ADMIN_PORT@",
    );
    let e = single_error(&text);
    assert_eq!(e.path, "admin.address.socket_address.port_value");
    assert!(e.message.contains("line 4 column 55"), "{e}");
    // Broken structure before any field.
    let e = single_error("admin: {\n  address: [\n");
    assert!(e.message.contains("line"), "{e}");
}

#[test]
fn empty_and_non_mapping_documents() {
    assert_eq!(single_error("").message, "the configuration is empty");
    assert_eq!(
        single_error("# nothing\n").message,
        "the configuration is empty"
    );
    let e = single_error("- a\n- b\n");
    assert_eq!(e.path, "(document)");
    let e = load_str("[1]", Format::Json).unwrap_err();
    assert_eq!(e.0.len(), 1);
}

#[test]
fn json_errors_have_paths_and_locations() {
    let json = r#"{"static_resources": {"clusters": [{"name": "a", "typo": 1}]}}"#;
    let e = load_str(json, Format::Json).unwrap_err();
    assert_eq!(e.paths(), vec!["static_resources.clusters[0].typo"]);
    assert!(e.0[0].message.contains("(line 1, column"), "{e}");
    let e = load_str(r#"{"admin": {}} trailing"#, Format::Json).unwrap_err();
    assert_eq!(e.paths(), vec!["(document)"]);
}

#[test]
fn at_type_not_first_still_tracks_paths() {
    // "@type" after the fields: accepted (buffered), and errors keep their full path.
    let text = edit(
        &terminate_h3(),
        "        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport\n          downstream_tls_context:\n",
        "        typed_config:\n          downstream_tls_context:\n",
    );
    let text = edit(
        &text,
        "                private_key: { filename: ",
        "                private_key: { filenam: ",
    );
    let text = text.replace(
        "      filters:\n",
        "          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport\n      filters:\n",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{TLS_CERT}.private_key.filenam"));
    assert!(e.message.starts_with("unknown field `filenam`"), "{e}");

    // And with the typo fixed it loads like the original.
    let fixed = text.replace("filenam:", "filename:");
    let loaded = load_yaml(&fixed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        loaded.listeners[0]
            .filter_chain
            .tls
            .as_ref()
            .unwrap()
            .certificates
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------
// @type and extension names

#[test]
fn wrong_type_url_names_the_expected_type() {
    let text = edit(
        &terminate_h3(),
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{HCM}.http_filters[0].typed_config.@type"));
    assert!(e.message.contains("unknown or misplaced @type"), "{e}");
    assert!(e.message.contains(ROUTER), "{e}");

    // The HCM in the transport socket slot.
    let text = edit(
        &terminate_h3(),
        "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport",
        HTTP_CONNECTION_MANAGER,
    );
    let errs = errors_of(&text);
    let e = error_at(
        &errs,
        "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.@type",
    );
    assert!(e.message.contains(QUIC_DOWNSTREAM_TRANSPORT), "{e}");

    // An upstream TLS context where a downstream one belongs.
    let text = edit(
        &terminate_h3(),
        "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport",
        "type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.@type"
    );

    // Another Envoy network filter.
    let text = edit(
        &terminate_h3(),
        HTTP_CONNECTION_MANAGER,
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{HCM}.@type"));
    assert!(e.message.contains("envoy.filters.network.tcp_proxy"), "{e}");
    assert!(e.message.contains("not supported by Ferry"), "{e}");
}

#[test]
fn extension_names_are_checked() {
    let text = edit(
        &terminate_h3(),
        "      - name: envoy.filters.network.http_connection_manager\n",
        "      - name: envoy.filters.network.tcp_proxy\n",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].filter_chains[0].filters[0].name"
    );
    assert!(
        e.message
            .contains("expected `envoy.filters.network.http_connection_manager`"),
        "{e}"
    );

    let text = edit(
        &terminate_h3(),
        "        name: envoy.transport_sockets.quic\n",
        "        name: envoy.transport_sockets.tls\n",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].filter_chains[0].transport_socket.name"
    );

    let text = edit(
        &terminate_h3(),
        "          - name: envoy.filters.http.router\n",
        "          - name: router\n",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{HCM}.http_filters[0].name"));
}

#[test]
fn router_without_typed_config_is_found_by_name() {
    let text = edit(
        &terminate_h3(),
        "            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
        "",
    );
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        b.listeners[0].filter_chain.hcm.http_filters,
        vec!["envoy.filters.http.router".to_owned()]
    );

    let text = edit(
        &text,
        "          - name: envoy.filters.http.router\n",
        "          - name: envoy.filters.http.cors\n",
    );
    let errs = errors_of(&text);
    assert!(error_at(&errs, &format!("{HCM}.http_filters[0].name"))
        .message
        .contains("not supported by Ferry"));
    assert!(errs.has_path(&format!("{HCM}.http_filters")), "{errs}");
}

#[test]
fn router_must_be_present_and_last() {
    let cors = "          - name: envoy.filters.http.cors\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors\n";
    let text = edit(
        &terminate_h3(),
        "          http3_protocol_options:\n",
        &format!("{cors}          http3_protocol_options:\n"),
    );
    let errs = errors_of(&text);
    assert_eq!(
        errs.paths(),
        vec![
            format!("{HCM}.http_filters[1].typed_config.@type").as_str(),
            format!("{HCM}.http_filters[0]").as_str()
        ],
        "{errs}"
    );
    assert!(error_at(&errs, &format!("{HCM}.http_filters[0]"))
        .message
        .contains("must be the last HTTP filter"));

    let text = edit(
        &terminate_h3(),
        "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
        "",
    );
    let text = edit(
        &text,
        "          http_filters:\n",
        "          http_filters: []\n",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{HCM}.http_filters"));
    assert!(e.message.contains("router"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Routes, clusters, names

#[test]
fn missing_cluster() {
    let text = edit(
        &terminate_h3(),
        "                  cluster: service_target\n",
        "                  cluster: nowhere\n",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{ROUTE}.cluster"));
    assert!(e.message.contains("unknown cluster `nowhere`"), "{e}");
}

#[test]
fn duplicate_cluster_and_listener_names() {
    let text = terminate_h3();
    let listeners_at = text.find("  - name: h3_listener").unwrap();
    let clusters_at = text.find("  clusters:\n").unwrap();
    let listener = &text[listeners_at..clusters_at];
    let cluster = &text[text.find("  - name: service_target").unwrap()..];
    // A second listener (same name, another port) and a second cluster (same name).
    let doubled = format!(
        "{}{}{}{}{}",
        &text[..clusters_at],
        listener.replace(&format!("port_value: {PROXY_PORT}"), "port_value: 4443"),
        "  clusters:\n",
        cluster,
        cluster
    );
    let errs = errors_of(&doubled);
    assert_eq!(
        errs.paths(),
        vec![
            "static_resources.listeners[1].name",
            "static_resources.clusters[1].name"
        ],
        "{errs}"
    );
    assert!(errs.0[0]
        .message
        .contains("duplicate listener name `h3_listener`"));
    assert!(errs.0[1]
        .message
        .contains("duplicate cluster name `service_target`"));

    // Same address twice.
    let same = format!(
        "{}{}{}",
        &text[..clusters_at],
        listener.replace("name: h3_listener", "name: other"),
        &text[clusters_at..]
    );
    let e = single_error(&same);
    assert_eq!(e.path, "static_resources.listeners[1].address");
}

#[test]
fn unnamed_listener_is_named_after_its_address() {
    let text = edit(
        &terminate_h3(),
        "  - name: h3_listener\n    address:\n",
        "  - address:\n",
    );
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.listeners[0].name, format!("127.0.0.1:{PROXY_PORT}"));
}

#[test]
fn domain_wildcards() {
    for (domain, ok) in [
        ("\"*\"", true),
        ("\"*.example.com\"", true),
        ("\"*-bar.example.com\"", true),
        ("\"example.*\"", true),
        ("foo.lyft.com:80", true),
        ("\"foo.*.com\"", false),
        ("\"*.example.*\"", false),
        ("\"**\"", false),
        ("\"\"", false),
    ] {
        let text = edit(
            &terminate_h3(),
            "              - \"*\"\n",
            &format!("              - {domain}\n"),
        );
        let result = load_yaml(&text);
        assert_eq!(result.is_ok(), ok, "{domain}: {result:?}");
        if !ok {
            let errs = result.unwrap_err();
            assert_eq!(
                errs.paths(),
                vec![format!("{HCM}.route_config.virtual_hosts[0].domains[0]").as_str()]
            );
        }
    }
    let text = edit(
        &terminate_h3(),
        "              domains:\n              - \"*\"\n",
        "              domains: []\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{HCM}.route_config.virtual_hosts[0].domains")
    );
}

#[test]
fn duplicate_domains_across_virtual_hosts() {
    let vhost = "            - name: second\n              domains: [\"a.example\", \"*\"]\n              routes:\n              - match: { prefix: / }\n                route: { cluster: service_target }\n";
    let text = edit(
        &terminate_h3(),
        "          http_filters:\n",
        &format!("{vhost}          http_filters:\n"),
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        format!("{HCM}.route_config.virtual_hosts[1].domains[1]")
    );
    assert!(
        e.message.contains("also virtual_hosts[0].domains[0]"),
        "{e}"
    );

    let text = edit(
        &terminate_h3(),
        "              - \"*\"\n",
        "              - A.example\n              - a.EXAMPLE\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{HCM}.route_config.virtual_hosts[0].domains[1]")
    );
}

#[test]
fn route_match_and_upgrades() {
    let text = edit(
        &terminate_h3(),
        "                  connect_matcher:\n                    {}\n",
        "                  prefix: /\n",
    );
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let route = &b.listeners[0].filter_chain.hcm.route_config.virtual_hosts[0].routes[0];
    assert_eq!(route.matcher, RouteMatch::Prefix("/".into()));

    let text = edit(
        &terminate_h3(),
        "                  connect_matcher:\n                    {}\n",
        "                  connect_matcher: {}\n                  path: /x\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{HCM}.route_config.virtual_hosts[0].routes[0].match")
    );

    let text = edit(
        &terminate_h3(),
        "                  connect_matcher:\n",
        "                  headers: []\n                  connect_matcher:\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{HCM}.route_config.virtual_hosts[0].routes[0].match.headers")
    );
    // An unsupported path specifier alone: only that is reported.
    let text = edit(
        &terminate_h3(),
        "                  connect_matcher:\n                    {}\n",
        "                  safe_regex: { regex: \".*\" }\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{HCM}.route_config.virtual_hosts[0].routes[0].match.safe_regex")
    );
    // No specifier at all.
    let text = edit(
        &terminate_h3(),
        "                  connect_matcher:\n                    {}\n",
        "                  {}\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{HCM}.route_config.virtual_hosts[0].routes[0].match")
    );

    // Case-insensitive, stored lower-case; `enabled` kept.
    let text = edit(
        &terminate_h3(),
        "upgrade_type: CONNECT-UDP",
        "upgrade_type: Connect-Udp\n                    enabled: false",
    );
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let u = &b.listeners[0].filter_chain.hcm.route_config.virtual_hosts[0].routes[0]
        .action
        .upgrade_configs[0];
    assert_eq!((u.upgrade_type.as_str(), u.enabled), ("connect-udp", false));

    // connect_config only for CONNECT / CONNECT-UDP.
    let text = edit(
        &terminate_h3(),
        "upgrade_type: CONNECT-UDP",
        "upgrade_type: websocket",
    );
    let e = single_error(&text);
    assert_eq!(e.path, format!("{ROUTE}.upgrade_configs[0].connect_config"));

    let text = edit(
        &terminate_h3(),
        "upgrade_type: CONNECT-UDP",
        "upgrade_type: CONNECT",
    );
    assert!(load_yaml(&text).is_ok());

    // The same upgrade type twice.
    let text = edit(
        &terminate_h3(),
        "                  - upgrade_type: CONNECT-UDP\n",
        "                  - upgrade_type: connect-udp\n                  - upgrade_type: CONNECT-UDP\n",
    );
    assert_eq!(
        single_error(&text).path,
        format!("{ROUTE}.upgrade_configs[1].upgrade_type")
    );
}

#[test]
fn hcm_upgrade_configs() {
    let text = edit(
        &terminate_h3(),
        "          http_filters:\n",
        "          upgrade_configs:\n          - upgrade_type: CONNECT-UDP\n          - { upgrade_type: websocket, enabled: false }\n          http_filters:\n",
    );
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        b.listeners[0].filter_chain.hcm.upgrade_configs,
        vec![
            HcmUpgradeConfig {
                upgrade_type: "connect-udp".into(),
                enabled: true
            },
            HcmUpgradeConfig {
                upgrade_type: "websocket".into(),
                enabled: false
            },
        ]
    );
    let bad = edit(
        &text,
        "          upgrade_configs:\n          - upgrade_type: CONNECT-UDP\n",
        "          upgrade_configs:\n          - upgrade_type: CONNECT-UDP\n            filters: []\n",
    );
    assert_eq!(
        single_error(&bad).path,
        format!("{HCM}.upgrade_configs[0].filters")
    );
}

// ---------------------------------------------------------------------------------------
// Durations

#[test]
fn durations() {
    let with = |field_line: &str| {
        edit(
            &terminate_h3(),
            "          stat_prefix: ingress_http\n",
            &format!("          stat_prefix: ingress_http\n          {field_line}\n"),
        )
    };
    let b = load_yaml(&with("stream_idle_timeout: 0s")).unwrap();
    assert_eq!(b.listeners[0].filter_chain.hcm.stream_idle_timeout, None);
    let b = load_yaml(&with("stream_idle_timeout: 0.25s")).unwrap();
    assert_eq!(
        b.listeners[0].filter_chain.hcm.stream_idle_timeout,
        Some(Duration::from_millis(250))
    );
    let b = load_yaml(&with(
        "stream_idle_timeout: { seconds: 10, nanos: 500000000 }",
    ))
    .unwrap();
    assert_eq!(
        b.listeners[0].filter_chain.hcm.stream_idle_timeout,
        Some(Duration::from_millis(10_500))
    );

    for bad in ["5", "\"5\"", "5m", "-1s", "1.5", "{ seconds: -1 }"] {
        let errs = errors_of(&with(&format!("stream_idle_timeout: {bad}")));
        assert_eq!(
            errs.paths(),
            vec![format!("{HCM}.stream_idle_timeout").as_str()],
            "{bad}: {errs}"
        );
    }
    let e = single_error(&with("stream_idle_timeout: { seconds: 1, nanoz: 1 }"));
    assert_eq!(e.path, format!("{HCM}.stream_idle_timeout.nanoz"));

    let text = edit(
        &terminate_h3(),
        "    dns_lookup_family: V4_ONLY\n",
        "    dns_lookup_family: V4_ONLY\n    connect_timeout: 0.5s\n    dns_refresh_rate: 30s\n",
    );
    let b = load_yaml(&text).unwrap();
    assert_eq!(b.clusters[0].connect_timeout, Duration::from_millis(500));
    assert_eq!(b.clusters[0].dns_refresh_rate, Duration::from_secs(30));

    let text = edit(
        &terminate_h3(),
        "    dns_lookup_family: V4_ONLY\n",
        "    dns_lookup_family: V4_ONLY\n    connect_timeout: 0s\n    dns_refresh_rate: 0.001s\n",
    );
    let errs = errors_of(&text);
    assert_eq!(
        errs.paths(),
        vec![
            "static_resources.clusters[0].dns_refresh_rate",
            "static_resources.clusters[0].connect_timeout"
        ],
        "{errs}"
    );
}

// ---------------------------------------------------------------------------------------
// Listeners and codecs

#[test]
fn listener_address_and_ports() {
    let text = edit(
        &terminate_h3(),
        "address: 127.0.0.1, port_value: 4433",
        "address: localhost, port_value: 4433",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].address.socket_address.address"
    );
    assert!(e.message.contains("not an IP address"), "{e}");

    let text = edit(&terminate_h3(), "port_value: 4433", "port_value: 70000");
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].address.socket_address.port_value"
    );
    assert!(e.message.contains("70000 is out of range"), "{e}");

    let text = edit(&terminate_h3(), "port_value: 4433", "port_value: 0");
    assert_eq!(load_yaml(&text).unwrap().listeners[0].address.port(), 0);
    let text = edit(&terminate_h3(), "port_value: 4433", "port_value: \"4433\"");
    assert_eq!(load_yaml(&text).unwrap().listeners[0].address.port(), 4433);
    let text = edit(
        &terminate_h3(),
        "address: 127.0.0.1, port_value: 4433",
        "address: \"::\", port_value: 4433",
    );
    assert_eq!(
        load_yaml(&text).unwrap().listeners[0].address.to_string(),
        "[::]:4433"
    );

    let text = edit(&terminate_h3(), "protocol: UDP", "protocol: SCTP");
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].address.socket_address.protocol"
    );
}

#[test]
fn udp_listener_needs_quic_and_a_certificate() {
    let text = edit(
        &terminate_h3(),
        "    udp_listener_config:\n      quic_options: {}\n",
        "",
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].udp_listener_config.quic_options"
    );
    assert!(e.message.contains("udp_proxy"), "{e}");

    let text = edit(
        &terminate_h3(),
        "              tls_certificates:\n",
        "              tls_certificates: []\n",
    );
    let cut_from = text.find("              - certificate_chain").unwrap();
    let cut_to = text.find("      filters:").unwrap();
    let text = format!("{}{}", &text[..cut_from], &text[cut_to..]);
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.downstream_tls_context.common_tls_context.tls_certificates"
    );

    let start = terminate_h3().find("    - transport_socket:").unwrap();
    let end = terminate_h3().find("      filters:").unwrap();
    let text = format!(
        "{}    - filters:{}",
        &terminate_h3()[..start],
        &terminate_h3()[end + "      filters:".len()..]
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        "static_resources.listeners[0].filter_chains[0].transport_socket"
    );
}

#[test]
fn codecs() {
    // AUTO on a QUIC listener is HTTP/3.
    let text = edit(&terminate_h3(), "codec_type: HTTP3", "codec_type: AUTO");
    assert_eq!(
        load_yaml(&text).unwrap().listeners[0]
            .filter_chain
            .hcm
            .codec_type,
        CodecType::Http3
    );
    let text = edit(&terminate_h3(), "          codec_type: HTTP3\n", "");
    assert_eq!(
        load_yaml(&text).unwrap().listeners[0]
            .filter_chain
            .hcm
            .codec_type,
        CodecType::Http3
    );
    // HTTP/2 on a QUIC listener: Envoy refuses it too.
    let text = edit(&terminate_h3(), "codec_type: HTTP3", "codec_type: HTTP2");
    assert_eq!(single_error(&text).path, format!("{HCM}.codec_type"));
    let text = edit(&terminate_h3(), "codec_type: HTTP3", "codec_type: HTTP4");
    assert_eq!(single_error(&text).path, format!("{HCM}.codec_type"));

    // HTTP3 on a TCP listener.
    let (tcp, _, _) = bootstrap("terminate-tcp-h2-h1.yaml.in");
    let tcp = edit(
        &tcp,
        "            alpn_protocols: [\"h2\", \"http/1.1\"]\n",
        "",
    );
    let tcp = edit(
        &tcp,
        "          http2_protocol_options:\n            allow_connect: true\n",
        "",
    );
    for (codec, want) in [
        ("HTTP1", CodecType::Http1),
        ("HTTP2", CodecType::Http2),
        ("AUTO", CodecType::Auto),
    ] {
        let text = edit(&tcp, "codec_type: AUTO", &format!("codec_type: {codec}"));
        assert_eq!(
            load_yaml(&text).unwrap().listeners[0]
                .filter_chain
                .hcm
                .codec_type,
            want
        );
    }
    let text = edit(&tcp, "codec_type: AUTO", "codec_type: HTTP3");
    assert_eq!(single_error(&text).path, format!("{HCM}.codec_type"));
    // quic_options on a TCP listener.
    let text = edit(
        &tcp,
        "    filter_chains:\n",
        "    udp_listener_config:\n      quic_options: {}\n    filter_chains:\n",
    );
    assert!(
        errors_of(&text).has_path("static_resources.listeners[0].udp_listener_config.quic_options")
    );
    // No transport socket on TCP: plain text, allowed.
    let start = tcp.find("    - transport_socket:").unwrap();
    let end = tcp.find("      filters:").unwrap();
    let plain = format!(
        "{}    - filters:{}",
        &tcp[..start],
        &tcp[end + "      filters:".len()..]
    );
    assert_eq!(
        load_yaml(&plain).unwrap().listeners[0].filter_chain.tls,
        None
    );
}

#[test]
fn filter_chains_and_filters() {
    let text = terminate_h3();
    let start = text.find("    - transport_socket:").unwrap();
    let end = text.find("  clusters:").unwrap();
    let chain = &text[start..end];
    let two = format!("{}{}{}", &text[..end], chain, &text[end..]);
    let e = single_error(&two);
    assert_eq!(e.path, "static_resources.listeners[0].filter_chains[1]");
    assert!(e.message.contains("not supported by Ferry"));

    let text = edit(
        &terminate_h3(),
        "    - transport_socket:\n",
        "    - filter_chain_match: { server_names: [a] }\n      transport_socket:\n",
    );
    assert_eq!(
        single_error(&text).path,
        "static_resources.listeners[0].filter_chains[0].filter_chain_match"
    );

    let text = edit(
        &terminate_h3(),
        "    filter_chains:\n    - transport_socket:\n",
        "    filter_chains: []\n    ignored:\n    - transport_socket:\n",
    );
    // `ignored` is not an Envoy field: parse error first.
    assert_eq!(
        single_error(&text).path,
        "static_resources.listeners[0].ignored"
    );
}

// ---------------------------------------------------------------------------------------
// Clusters

#[test]
fn clusters() {
    let base = terminate_h3();
    // LOGICAL_DNS: exactly one endpoint.
    let endpoint = "        - endpoint:\n            address:\n              socket_address: { address: localhost, port_value: 5300 }\n";
    let text = edit(&base, endpoint, &format!("{endpoint}{endpoint}"));
    let e = single_error(&text);
    assert_eq!(e.path, "static_resources.clusters[0].load_assignment");
    assert!(e.message.contains("exactly one endpoint"), "{e}");
    // STRICT_DNS: several are fine.
    let text = edit(&text, "type: LOGICAL_DNS", "type: STRICT_DNS");
    assert_eq!(load_yaml(&text).unwrap().clusters[0].endpoints.len(), 2);
    // STATIC: IP literals only (and STATIC is the default).
    let text = edit(&base, "    type: LOGICAL_DNS\n", "");
    let e = single_error(&text);
    assert_eq!(e.path, "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address");
    // DNS types need a valid name or IP.
    let text = edit(&base, "address: localhost", "address: \"bad name\"");
    assert_eq!(
        single_error(&text).path,
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
    );
    let text = edit(&base, "address: localhost", "address: 127.0.0.1");
    assert_eq!(
        load_yaml(&text).unwrap().clusters[0].endpoints[0].address,
        "127.0.0.1"
    );
    // Endpoint port 0 is no target.
    let text = edit(&base, "port_value: 5300", "port_value: 0");
    assert!(single_error(&text)
        .path
        .ends_with("socket_address.port_value"));
    // Enumerations.
    for (family, want) in [
        ("AUTO", DnsLookupFamily::Auto),
        ("V4_ONLY", DnsLookupFamily::V4Only),
        ("V6_ONLY", DnsLookupFamily::V6Only),
        ("V4_PREFERRED", DnsLookupFamily::V4Preferred),
        ("ALL", DnsLookupFamily::All),
    ] {
        let text = edit(
            &base,
            "dns_lookup_family: V4_ONLY",
            &format!("dns_lookup_family: {family}"),
        );
        assert_eq!(
            load_yaml(&text).unwrap().clusters[0].dns_lookup_family,
            want
        );
    }
    let text = edit(
        &base,
        "dns_lookup_family: V4_ONLY",
        "dns_lookup_family: V5_ONLY",
    );
    assert_eq!(
        single_error(&text).path,
        "static_resources.clusters[0].dns_lookup_family"
    );
    let text = edit(&base, "type: LOGICAL_DNS", "type: EDS");
    let e = single_error(&text);
    assert_eq!(e.path, "static_resources.clusters[0].type");
    assert!(e.message.contains("not supported by Ferry"), "{e}");
    let text = edit(
        &base,
        "    dns_lookup_family: V4_ONLY\n",
        "    dns_lookup_family: V4_ONLY\n    lb_policy: LEAST_REQUEST\n",
    );
    assert_eq!(
        single_error(&text).path,
        "static_resources.clusters[0].lb_policy"
    );
    let text = edit(&base, "      cluster_name: service_target\n", "");
    assert_eq!(
        single_error(&text).path,
        "static_resources.clusters[0].load_assignment.cluster_name"
    );
    // A cluster without load_assignment (no hosts) is valid in Envoy.
    let text = format!("{base}  - name: empty\n");
    assert_eq!(load_yaml(&text).unwrap().clusters[1].endpoints, vec![]);
}

// ---------------------------------------------------------------------------------------
// Certificates

#[test]
fn unreadable_certificate_file() {
    let (text, cert, _) = bootstrap("terminate-h3.yaml.in");
    std::fs::remove_file(&cert).unwrap();
    let e = single_error(&text);
    assert_eq!(e.path, format!("{TLS_CERT}.certificate_chain.filename"));
    assert!(
        e.message
            .contains(&format!("cannot read `{}`", cert.display())),
        "{e}"
    );
    assert!(e.message.contains("os error"), "{e}");
}

#[test]
fn pem_contents_are_checked() {
    let (text, cert, key) = bootstrap("terminate-h3.yaml.in");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, DUMMY_CERT).unwrap();
    let errs = errors_of(&text);
    assert_eq!(
        errs.paths(),
        vec![
            format!("{TLS_CERT}.certificate_chain.filename").as_str(),
            format!("{TLS_CERT}.private_key.filename").as_str()
        ]
    );
    assert!(
        errs.0[0]
            .message
            .contains("does not contain a PEM certificate"),
        "{errs}"
    );
    assert!(
        errs.0[1]
            .message
            .contains("does not contain a PEM private key"),
        "{errs}"
    );
}

#[test]
fn inline_certificates_and_relative_paths() {
    let (text, cert, key) = bootstrap("terminate-h3.yaml.in");
    let inline_cert = format!("{{ inline_string: {:?} }}", DUMMY_CERT);
    let b64_key = base64(DUMMY_KEY.as_bytes());
    let text = edit(
        &text,
        &format!("{{ filename: {} }}", cert.display()),
        &inline_cert,
    );
    let text = edit(
        &text,
        &format!("{{ filename: {} }}", key.display()),
        &format!("{{ inline_bytes: {b64_key} }}"),
    );
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let pair = &b.listeners[0]
        .filter_chain
        .tls
        .as_ref()
        .unwrap()
        .certificates[0];
    assert_eq!(pair.certificate_chain_pem, DUMMY_CERT);
    assert_eq!(pair.private_key_pem, DUMMY_KEY);

    let bad = edit(
        &text,
        &format!("inline_bytes: {b64_key}"),
        "inline_bytes: \"*notbase64*\"",
    );
    assert_eq!(
        single_error(&bad).path,
        format!("{TLS_CERT}.private_key.inline_bytes")
    );
    let both = edit(
        &text,
        "{ inline_string: ",
        &format!("{{ filename: {}, inline_string: ", cert.display()),
    );
    assert_eq!(
        single_error(&both).path,
        format!("{TLS_CERT}.certificate_chain")
    );
    let env = edit(
        &text,
        &format!("{{ inline_bytes: {b64_key} }}"),
        "{ environment_variable: KEY }",
    );
    assert_eq!(
        single_error(&env).path,
        format!("{TLS_CERT}.private_key.environment_variable")
    );

    // A relative filename is resolved against the current directory: a name that does not
    // exist there fails with exactly that name.
    let rel = edit(&text, &inline_cert, "{ filename: no-such-dir/cert.pem }");
    let e = single_error(&rel);
    assert!(
        e.message.contains("cannot read `no-such-dir/cert.pem`"),
        "{e}"
    );
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Everything at once

#[test]
fn multiple_errors_are_all_reported() {
    let text = edit(
        &terminate_h3(),
        "                  cluster: service_target\n",
        "                  cluster: nowhere\n",
    );
    let text = edit(
        &text,
        "              - \"*\"\n",
        "              - \"a*b\"\n",
    );
    let text = edit(
        &text,
        "          stat_prefix: ingress_http\n",
        "          stat_prefix: \"\"\n          stream_idle_timeout: 5\n",
    );
    let text = edit(&text, "port_value: 4433", "port_value: 65536");
    let text = edit(
        &text,
        "    dns_lookup_family: V4_ONLY\n",
        "    dns_lookup_family: V4_ONLY\n    connect_timeout: -1s\n    health_checks: []\n",
    );
    let text = format!("{text}  - name: service_target\n");
    let errs = errors_of(&text);
    assert_eq!(
        errs.paths(),
        vec![
            "static_resources.listeners[0].address.socket_address.port_value".to_owned(),
            format!("{HCM}.stat_prefix"),
            format!("{HCM}.route_config.virtual_hosts[0].domains[0]"),
            format!("{ROUTE}.cluster"),
            format!("{HCM}.stream_idle_timeout"),
            "static_resources.clusters[0].health_checks".to_owned(),
            "static_resources.clusters[0].connect_timeout".to_owned(),
            "static_resources.clusters[1].name".to_owned(),
        ],
        "{errs}"
    );
    // Display: one per line, `path: message`.
    let shown = errs.to_string();
    assert_eq!(shown.lines().count(), errs.0.len());
    for (line, e) in shown.lines().zip(&errs.0) {
        assert_eq!(line, format!("{}: {}", e.path, e.message));
    }
}

#[test]
fn minimal_and_admin_only_bootstraps() {
    let b =
        load_yaml("admin:\n  address:\n    socket_address: { address: \"::1\", port_value: 0 }\n")
            .unwrap();
    assert_eq!(b.admin.unwrap().address.to_string(), "[::1]:0");
    assert!(b.listeners.is_empty() && b.clusters.is_empty());
    let b = load_yaml("admin: {}\n").unwrap();
    assert_eq!(b.admin, None);
    let e = single_error(
        "admin:\n  address:\n    socket_address: { address: localhost, port_value: 9901 }\n",
    );
    assert_eq!(e.path, "admin.address.socket_address.address");
    let e = single_error("admin:\n  address:\n    pipe: { path: /tmp/admin.sock }\n");
    assert_eq!(e.path, "admin.address.pipe");
}

#[test]
fn load_file_reports_unreadable_config() {
    let path = temp_dir().join("missing.yaml");
    let errs = load_file(&path).unwrap_err();
    assert_eq!(errs.paths(), vec![path.display().to_string().as_str()]);
    assert!(errs.0[0]
        .message
        .contains("cannot read the configuration file"));
}
