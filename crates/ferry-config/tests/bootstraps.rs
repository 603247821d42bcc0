//! The reference Envoy bootstraps (`tests/envoy-bootstraps/*.yaml.in`), placeholders
//! substituted: the terminate one loads to the expected model; the others either load or
//! fail only with "not supported by Ferry" errors at known paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ferry_config::*;

fn expected_terminate_h3() -> Bootstrap {
    Bootstrap {
        admin: Some(Admin {
            address: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
        }),
        listeners: vec![Listener {
            name: "h3_listener".into(),
            address: SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
            protocol: SocketProtocol::Udp,
            quic: Some(QuicOptions {
                max_concurrent_streams: 100,
            }),
            filter_chain: FilterChain {
                tls: Some(ServerTls {
                    certificates: vec![CertificateKeyPair {
                        certificate_chain_pem: DUMMY_CERT.into(),
                        private_key_pem: DUMMY_KEY.into(),
                    }],
                    alpn_protocols: vec![],
                    client_ca_pem: None,
                    require_client_certificate: false,
                }),
                hcm: HttpConnectionManager {
                    codec_type: CodecType::Http3,
                    stat_prefix: "ingress_http".into(),
                    route_config: RouteConfiguration {
                        name: "local_route".into(),
                        virtual_hosts: vec![VirtualHost {
                            name: "local_service".into(),
                            domains: vec!["*".into()],
                            routes: vec![Route {
                                name: None,
                                matcher: RouteMatch::Connect,
                                action: RouteAction {
                                    cluster: "service_target".into(),
                                    upgrade_configs: vec![RouteUpgradeConfig {
                                        upgrade_type: "connect-udp".into(),
                                        enabled: true,
                                        connect_config: Some(ConnectConfig {}),
                                    }],
                                },
                                pass_through: false,
                            }],
                        }],
                    },
                    upgrade_configs: vec![],
                    allow_extended_connect: true,
                    allow_connect: false,
                    stream_idle_timeout: Some(Duration::from_secs(300)),
                    http2_max_concurrent_streams: 100,
                    h3_max_concurrent_streams: None,
                    max_stream_duration: None,
                    http_filters: vec!["envoy.filters.http.router".into()],
                    access_log: vec![],
                    dynamic_forward_proxy: None,
                    destination_policy: DestinationPolicy::default(),
                    basic_auth: None,
                },
            },
            udp_proxy: None,
            socket_buffers: SocketBuffers::default(),
        }],
        clusters: vec![Cluster {
            name: "service_target".into(),
            discovery: DiscoveryType::LogicalDns,
            dns_lookup_family: DnsLookupFamily::V4Only,
            dns_refresh_rate: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            endpoints: vec![Endpoint {
                address: "localhost".into(),
                port: ECHO_PORT,
            }],
            upstream: None,
            dns_cache: None,
        }],
        max_downstream_connections: None,
    }
}

#[test]
fn terminate_h3_loads_the_expected_model() {
    let bootstrap = load_yaml(&terminate_h3()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bootstrap, expected_terminate_h3());
    // The same, field by field, for a readable failure where it matters most.
    let hcm = &bootstrap.listeners[0].filter_chain.hcm;
    assert_eq!(hcm.codec_type, CodecType::Http3);
    assert!(hcm.allow_extended_connect);
    let route = &hcm.route_config.virtual_hosts[0].routes[0];
    assert_eq!(route.matcher, RouteMatch::Connect);
    assert_eq!(route.action.upgrade_configs[0].upgrade_type, "connect-udp");
    assert!(route.action.upgrade_configs[0].connect_config.is_some());
}

#[test]
fn terminate_h3_via_load_file_yaml_yml_and_json() {
    let yaml = terminate_h3();
    let dir = temp_dir();
    for name in ["bootstrap.yaml", "bootstrap.yml", "bootstrap.conf"] {
        let path = dir.join(name);
        std::fs::write(&path, &yaml).unwrap();
        assert_eq!(load_file(&path), Ok(expected_terminate_h3()), "{name}");
    }
    // JSON: the same document converted, loaded both from text and from a .json file.
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    let json = serde_json::to_string_pretty(&value).unwrap();
    assert_eq!(load_str(&json, Format::Json), Ok(expected_terminate_h3()));
    let path = dir.join("bootstrap.JSON");
    std::fs::write(&path, &json).unwrap();
    assert_eq!(Format::from_path(&path), Format::Json);
    assert_eq!(load_file(&path), Ok(expected_terminate_h3()));
}

/// Asserts `errs` are exactly at `paths`, each a "not supported by Ferry" error.
fn assert_only_not_supported(errs: &ConfigErrors, paths: &[&str]) {
    let got: BTreeSet<&str> = errs.paths().into_iter().collect();
    let want: BTreeSet<&str> = paths.iter().copied().collect();
    assert_eq!(got, want, "errors:\n{errs}");
    for e in &errs.0 {
        assert!(
            e.message.contains("not supported by Ferry"),
            "not a not-supported error: {e}"
        );
    }
}

#[test]
fn forward_h3_loads_with_an_http3_upstream() {
    let (text, cert, _) = bootstrap("forward-h3.yaml.in");
    let b = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let upstream = b.clusters[0]
        .upstream
        .clone()
        .expect("upstream HTTP settings");
    assert_eq!(
        upstream.protocol,
        ferry_config::UpstreamProtocol::Http3 {
            allow_extended_connect: true
        }
    );
    assert_eq!(upstream.tls.sni.as_deref(), Some("proxy.test"));
    let ca = upstream.tls.trusted_ca_pem.expect("trusted_ca");
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    let _ = cert;
    let route = &b.listeners[0].filter_chain.hcm.route_config.virtual_hosts[0].routes[0];
    assert!(!route.pass_through, "Envoy behaviour is the default");
}

#[test]
fn pass_through_metadata_on_a_route() {
    let (text, _, _) = bootstrap("forward-h3.yaml.in");
    let with_md = text.replacen(
        "                route:\n",
        "                metadata:\n                  filter_metadata:\n                    ferry.connect_udp: { pass_through: true }\n                route:\n",
        1,
    );
    assert_ne!(with_md, text, "the route was found");
    let b = load_yaml(&with_md).unwrap_or_else(|e| panic!("{e}"));
    assert!(b.listeners[0].filter_chain.hcm.route_config.virtual_hosts[0].routes[0].pass_through);

    let bad = text.replacen(
        "                route:\n",
        "                metadata:\n                  filter_metadata:\n                    ferry.connect_udp: { pass_thru: true }\n                route:\n",
        1,
    );
    let errs = load_yaml(&bad).unwrap_err();
    assert!(
        errs.has_path(&format!("{HCM}.route_config.virtual_hosts[0].routes[0].metadata.filter_metadata.ferry.connect_udp.pass_thru")),
        "{errs}"
    );
}

#[test]
fn forward_h3_without_upstream_options_loads_as_forward() {
    let (text, _, _) = bootstrap("forward-h3.yaml.in");
    let cut = text.find("    typed_extension_protocol_options:").unwrap();
    let bootstrap = load_yaml(&text[..cut]).unwrap_or_else(|e| panic!("{e}"));
    let route = &bootstrap.listeners[0]
        .filter_chain
        .hcm
        .route_config
        .virtual_hosts[0]
        .routes[0];
    assert_eq!(route.action.cluster, "next_hop");
    assert_eq!(
        route.action.upgrade_configs,
        vec![RouteUpgradeConfig {
            upgrade_type: "connect-udp".into(),
            enabled: true,
            connect_config: None
        }]
    );
    assert_eq!(bootstrap.clusters[0].discovery, DiscoveryType::Static);
    assert_eq!(
        bootstrap.clusters[0].endpoints,
        vec![Endpoint {
            address: "127.0.0.1".into(),
            port: NEXT_HOP_PORT
        }]
    );
}

#[test]
fn dynamic_targets_h3_builds_a_dynamic_forward_proxy() {
    let (text, _, _) = bootstrap("dynamic-targets-h3.yaml.in");
    let bootstrap = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let cache = DnsCacheConfig {
        name: "dynamic_forward_proxy_cache_config".into(),
        dns_lookup_family: DnsLookupFamily::V4Only,
        dns_refresh_rate: Duration::from_secs(60),
        host_ttl: Duration::from_secs(300),
        max_hosts: 1024,
        resolvers: vec![],
    };
    let cluster = &bootstrap.clusters[0];
    assert_eq!(cluster.discovery, DiscoveryType::DynamicForwardProxy);
    assert_eq!(cluster.dns_cache.as_ref(), Some(&cache));
    assert!(cluster.endpoints.is_empty());
    let hcm = &bootstrap.listeners[0].filter_chain.hcm;
    assert_eq!(hcm.dynamic_forward_proxy.as_ref(), Some(&cache));
    // No Ferry policy filter: the built-in refusals only.
    assert_eq!(hcm.destination_policy, DestinationPolicy::default());
}

const DFP_FILTER_LINE: &str = "          - name: envoy.filters.http.dynamic_forward_proxy\n";
const POLICY_FILTER: &str = r#"          - name: ferry.filters.http.destination_policy
            is_optional: true
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/ferry.filters.http.destination_policy.v1.DestinationPolicy
              value:
                allow:
                - { cidr: 127.0.0.0/8, ports: "9000-9100" }
                - { cidr: "::1" }
                deny:
                - { cidr: 10.0.0.0/8, ports: 53 }
                default_action: DENY
"#;

#[test]
fn destination_policy_filter_builds_its_rules() {
    let (text, _, _) = bootstrap("dynamic-targets-h3.yaml.in");
    let text = edit(
        &text,
        DFP_FILTER_LINE,
        &format!("{POLICY_FILTER}{DFP_FILTER_LINE}"),
    );
    let bootstrap = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let policy = &bootstrap.listeners[0].filter_chain.hcm.destination_policy;
    assert_eq!(
        policy,
        &DestinationPolicy {
            allow: vec![
                AddressRule {
                    network: "127.0.0.0".parse().unwrap(),
                    prefix_len: 8,
                    ports: (9000, 9100)
                },
                AddressRule {
                    network: "::1".parse().unwrap(),
                    prefix_len: 128,
                    ports: (0, 65535)
                },
            ],
            deny: vec![AddressRule {
                network: "10.0.0.0".parse().unwrap(),
                prefix_len: 8,
                ports: (53, 53)
            }],
            default_deny: true,
        }
    );
    assert!(policy.allow[0].matches("127.1.2.3".parse().unwrap(), 9000));
    assert!(!policy.allow[0].matches("127.1.2.3".parse().unwrap(), 9101));
    assert!(policy.allow[0].matches("::ffff:127.0.0.1".parse().unwrap(), 9050));
}

#[test]
fn destination_policy_errors_name_their_fields() {
    let (text, _, _) = bootstrap("dynamic-targets-h3.yaml.in");
    let bad = POLICY_FILTER
        .replace("            is_optional: true\n", "")
        .replace("127.0.0.0/8", "127.0.0.1/8")
        .replace("\"9000-9100\"", "\"9100-9000\"")
        .replace("default_action: DENY", "default_action: MAYBE");
    let text = edit(&text, DFP_FILTER_LINE, &format!("{bad}{DFP_FILTER_LINE}"));
    let errs = load_yaml(&text).unwrap_err();
    let f = format!("{HCM}.http_filters[0]");
    let v = format!("{f}.typed_config.value");
    for path in [
        format!("{f}.is_optional"),
        format!("{v}.allow[0].cidr"),
        format!("{v}.allow[0].ports"),
        format!("{v}.default_action"),
    ] {
        error_at(&errs, &path);
    }
    assert!(error_at(&errs, &format!("{f}.is_optional"))
        .message
        .contains("Envoy refuses"));
    assert_eq!(errs.0.len(), 4, "{errs}");
}

#[test]
fn a_route_to_a_dynamic_cluster_needs_the_filter_with_the_same_cache() {
    let (text, _, _) = bootstrap("dynamic-targets-h3.yaml.in");
    let route = format!("{HCM}.route_config.virtual_hosts[0].routes[0].route.cluster");
    // The filter's cache has another name.
    let renamed = edit(
        &text,
        "                name: dynamic_forward_proxy_cache_config\n",
        "                name: other_cache\n",
    );
    let errs = load_yaml(&renamed).unwrap_err();
    assert!(
        error_at(&errs, &route).message.contains("other_cache"),
        "{errs}"
    );
    // The same name, another setting.
    let different = edit(
        &text,
        "                dns_lookup_family: V4_ONLY\n",
        "                dns_lookup_family: V6_ONLY\n",
    );
    let errs = load_yaml(&different).unwrap_err();
    assert!(
        error_at(&errs, &route).message.contains("identical"),
        "{errs}"
    );
}

#[test]
fn dynamic_cluster_settings_are_checked() {
    let (text, _, _) = bootstrap("dynamic-targets-h3.yaml.in");
    let text = edit(
        &text,
        "    lb_policy: CLUSTER_PROVIDED\n",
        "    lb_policy: ROUND_ROBIN\n",
    );
    let text = edit(
        &text,
        "          name: dynamic_forward_proxy_cache_config\n          dns_lookup_family: V4_ONLY\n",
        "          name: dynamic_forward_proxy_cache_config\n          dns_lookup_family: V4_ONLY\n          max_hosts: 0\n          host_ttl: 0s\n",
    );
    let errs = load_yaml(&text).unwrap_err();
    let c = "static_resources.clusters[0]";
    let d = format!("{c}.cluster_type.typed_config.dns_cache_config");
    error_at(&errs, &format!("{c}.lb_policy"));
    error_at(&errs, &format!("{d}.max_hosts"));
    error_at(&errs, &format!("{d}.host_ttl"));
}

#[test]
fn terminate_tcp_h2_h1_builds_a_tls_tcp_listener() {
    let (text, _, _) = bootstrap("terminate-tcp-h2-h1.yaml.in");
    let bootstrap = load_yaml(&text).unwrap_or_else(|e| panic!("{e}"));
    let listener = &bootstrap.listeners[0];
    assert_eq!(listener.protocol, SocketProtocol::Tcp);
    assert_eq!(listener.quic, None);
    let hcm = &listener.filter_chain.hcm;
    assert_eq!(hcm.codec_type, CodecType::Auto);
    assert!(hcm.allow_connect);
    assert!(!hcm.allow_extended_connect);
    let tls = listener.filter_chain.tls.as_ref().unwrap();
    assert_eq!(tls.certificates.len(), 1);
    assert_eq!(
        tls.alpn_protocols,
        vec!["h2".to_string(), "http/1.1".to_string()]
    );
    assert_eq!(
        hcm.upgrade_configs,
        vec![HcmUpgradeConfig {
            upgrade_type: "connect-udp".into(),
            enabled: true
        }]
    );
    assert_eq!(hcm.stat_prefix, "ingress_tcp");
}

#[test]
fn unknown_alpn_protocol_is_refused() {
    let (text, _, _) = bootstrap("terminate-tcp-h2-h1.yaml.in");
    let text = edit(
        &text,
        "alpn_protocols: [\"h2\", \"http/1.1\"]",
        "alpn_protocols: [\"h2\", \"spdy/3\"]",
    );
    let errs = load_yaml(&text).unwrap_err();
    assert!(
        errs.has_path("static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.common_tls_context.alpn_protocols[1]"),
        "{errs}"
    );
}

#[test]
fn every_reference_bootstrap_is_covered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/envoy-bootstraps");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml.in"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "dynamic-targets-h3.yaml.in",
            "forward-h3.yaml.in",
            "terminate-h3.yaml.in",
            "terminate-tcp-h2-h1.yaml.in"
        ]
    );
}

#[test]
fn unimplemented_dynamic_forward_proxy_fields_are_named() {
    let (text, _, _) = bootstrap("dynamic-targets-h3.yaml.in");
    let text = edit(
        &text,
        "                dns_lookup_family: V4_ONLY\n",
        "                dns_lookup_family: V4_ONLY\n                dns_min_refresh_rate: 5s\n              save_upstream_address: true\n",
    );
    let errs = load_yaml(&text).unwrap_err();
    let f = format!("{HCM}.http_filters[0].typed_config");
    assert_only_not_supported(
        &errs,
        &[
            &format!("{f}.dns_cache_config.dns_min_refresh_rate"),
            &format!("{f}.save_upstream_address"),
        ],
    );
}
