//! Dynamic targets (dynamic forward proxy filter + cluster): the UDP goes to the target in
//! the path, resolved through the DNS cache and checked by the destination policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;

use support::*;

const CACHE: &str = "dns_cache.dfp_cache.";
const CU: &str = "http.ingress_http.connect_udp.";

/// The test bootstrap with a dynamic forward proxy cluster named `target`, the filter,
/// and, when given, a destination policy `value` (YAML, indented 16).
fn dfp_yaml(cert: &TestCert, policy: Option<&str>, cache_extra: &str) -> String {
    let cache = format!(
        "dns_cache_config:\n                name: dfp_cache\n                dns_lookup_family: ALL\n{cache_extra}"
    );
    let cluster = format!(
        r#"
  - name: target
    lb_policy: CLUSTER_PROVIDED
    cluster_type:
      name: envoy.clusters.dynamic_forward_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig
        {}
"#,
        cache.replace("\n                ", "\n          ")
    );
    let spec = BootstrapSpec {
        cluster_yaml: Some(cluster),
        ..Default::default()
    };
    // Any target: a dummy address for the unused static cluster argument.
    let yaml = bootstrap_yaml(cert, "127.0.0.1:9".parse().unwrap(), &spec);
    let policy = policy
        .map(|value| {
            format!(
                r#"          - name: ferry.filters.http.destination_policy
            is_optional: true
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/ferry.filters.http.destination_policy.v1.DestinationPolicy
              value:
{value}"#
            )
        })
        .unwrap_or_default();
    let filters = format!(
        r#"          http_filters:
          - name: envoy.filters.http.dynamic_forward_proxy
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig
              {cache}
{policy}"#
    );
    assert_eq!(yaml.matches("          http_filters:\n").count(), 1);
    yaml.replacen("          http_filters:\n", &filters, 1)
}

fn path(host: &str, port: u16) -> String {
    format!("/.well-known/masque/udp/{host}/{port}/")
}

/// Open a tunnel and return (status, proxy-status).
async fn status_of(proxy: &Proxy, host: &str, port: u16) -> (u16, String) {
    let mut client = proxy.client(true).await;
    let t = client.open(&path(host, port), &[], false).await.unwrap();
    (t.status.as_u16(), proxy_status(&t))
}

/// Open a tunnel to `host:port`, send one datagram and expect it echoed.
async fn echo_through(proxy: &Proxy, host: &str, target: &EchoTarget, n: usize) {
    let mut client = proxy.client(true).await;
    let mut t = client
        .open(&path(host, target.addr.port()), &[], false)
        .await
        .unwrap();
    assert_eq!(t.status.as_u16(), 200, "{host}: {}", proxy_status(&t));
    let reply = echo_until_received(&mut t, b"ping").await;
    assert_eq!(&reply[..], b"ping");
    target.wait_for(n).await;
}

/// A UDP echo on [::1].
async fn echo_v6() -> Option<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let sock = tokio::net::UdpSocket::bind("[::1]:0").await.ok()?;
    let addr = sock.local_addr().ok()?;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    Some((addr, task))
}

const ALLOW_LOOPBACK: &str = "                allow:\n                - { cidr: 127.0.0.0/8 }\n                - { cidr: \"::1\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_by_ipv4_ipv6_and_hosts_file_name() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let proxy = Proxy::start(&dfp_yaml(&cert, Some(ALLOW_LOOPBACK), ""), cert).await;

    // An IPv4 literal: no DNS.
    echo_through(&proxy, "127.0.0.1", &target, 1).await;
    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_attempt")), 0);

    // A name from /etc/hosts (localhost), resolved once, then from the cache.
    echo_through(&proxy, "localhost", &target, 2).await;
    echo_through(&proxy, "LOCALHOST", &target, 3).await;
    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_attempt")), 1);
    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_success")), 1);
    assert_eq!(proxy.stat(&format!("{CACHE}num_hosts")), 1);

    // An IPv6 literal (the loopback is required by this test, not optional).
    let (v6, _task) = echo_v6().await.expect("this test needs [::1]");
    let mut client = proxy.client(true).await;
    let mut t = client
        .open(&path("::1", v6.port()), &[], false)
        .await
        .unwrap();
    assert_eq!(t.status.as_u16(), 200, "{}", proxy_status(&t));
    assert_eq!(&echo_until_received(&mut t, b"six").await[..], b"six");
    assert_eq!(proxy.stat(&format!("{CU}tunnels_total")), 4);
    assert_eq!(proxy.stat("cluster.target.upstream_cx_total"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_refusals_apply_after_resolution() {
    let cert = test_cert();
    let proxy = Proxy::start(&dfp_yaml(&cert, None, ""), cert).await;
    let refused = [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
    ];
    for (host, why) in refused {
        let (status, ps) = status_of(&proxy, host, 9000).await;
        assert_eq!(status, 403, "{host}");
        assert!(
            ps.contains("error=destination_ip_prohibited"),
            "{host}: {ps}"
        );
        assert!(ps.contains(why), "{host}: {ps}");
    }
    // A name that resolves to a refused address is refused too.
    let (status, ps) = status_of(&proxy, "localhost", 9000).await;
    assert_eq!(status, 403);
    assert!(ps.contains("localhost resolves to 127.0.0.1:9000"), "{ps}");
    let n = refused.len() as u64 + 1;
    assert_eq!(proxy.stat(&format!("{CU}tunnels_rejected_403")), n);
    assert_eq!(
        proxy.stat(&format!("{CU}tunnels_rejected_destination_ip_prohibited")),
        n
    );
    assert_eq!(proxy.stat(&format!("{CU}tunnels_total")), 0);
    assert_eq!(proxy.stat("cluster.target.upstream_cx_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_beat_allow_rules() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let port = target.addr.port();
    let policy = format!(
        "                allow:\n                - {{ cidr: 127.0.0.0/8 }}\n                deny:\n                - {{ cidr: 127.0.0.2/32, ports: \"{port}\" }}\n"
    );
    let proxy = Proxy::start(&dfp_yaml(&cert, Some(&policy), ""), cert).await;
    echo_through(&proxy, "127.0.0.1", &target, 1).await;
    let (status, ps) = status_of(&proxy, "127.0.0.2", port).await;
    assert_eq!(status, 403);
    assert!(ps.contains("denied by rule 127.0.0.2/32 port"), "{ps}");
    // Another port of the denied host is allowed by the allow rule.
    let (status, _) = status_of(&proxy, "127.0.0.2", port.wrapping_add(1).max(1)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_action_deny_allows_only_listed_destinations() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let policy = format!(
        "                allow:\n                - {{ cidr: 127.0.0.1/32, ports: \"{}\" }}\n                default_action: DENY\n",
        target.addr.port()
    );
    let proxy = Proxy::start(&dfp_yaml(&cert, Some(&policy), ""), cert).await;
    echo_through(&proxy, "127.0.0.1", &target, 1).await;
    // A public address that the built-in rules would allow: refused by default_action.
    let (status, ps) = status_of(&proxy, "192.0.2.1", 53).await;
    assert_eq!(status, 403);
    assert!(ps.contains("default_action DENY"), "{ps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_addresses_are_refused_even_when_allowed() {
    let cert = test_cert();
    let policy = "                allow:\n                - { cidr: 0.0.0.0/0 }\n";
    let proxy = Proxy::start(&dfp_yaml(&cert, Some(policy), ""), cert).await;
    for own in [proxy.addr, proxy.admin] {
        let (status, ps) = status_of(&proxy, &own.ip().to_string(), own.port()).await;
        assert_eq!(status, 403, "{own}");
        assert!(
            ps.contains("one of the proxy's own addresses"),
            "{own}: {ps}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_is_503_dns_error() {
    let cert = test_cert();
    let proxy = Proxy::start(&dfp_yaml(&cert, Some(ALLOW_LOOPBACK), ""), cert).await;
    let (status, ps) = status_of(&proxy, "no-such-host.invalid", 9000).await;
    assert_eq!(status, 503);
    assert!(ps.starts_with("ferry; error=dns_error"), "{ps}");
    assert!(ps.contains("no-such-host.invalid"), "{ps}");
    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_failure")), 1);
    assert_eq!(proxy.stat(&format!("{CU}tunnels_rejected_dns_error")), 1);
    // Failures are not cached: asked again, resolved again.
    let (status, _) = status_of(&proxy, "no-such-host.invalid", 9000).await;
    assert_eq!(status, 503);
    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_attempt")), 2);
    assert_eq!(proxy.stat(&format!("{CACHE}num_hosts")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_cache_is_bounded_by_max_hosts() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let proxy = Proxy::start(
        &dfp_yaml(
            &cert,
            Some(ALLOW_LOOPBACK),
            "                max_hosts: 1\n",
        ),
        cert,
    )
    .await;
    echo_through(&proxy, "localhost", &target, 1).await;
    // The cache holds one live name: a second name is refused, not cached.
    let (status, ps) = status_of(&proxy, "second-name.invalid", target.addr.port()).await;
    assert_eq!(status, 503);
    assert!(ps.contains("max_hosts"), "{ps}");
    assert_eq!(proxy.stat(&format!("{CACHE}host_overflow")), 1);
    assert_eq!(proxy.stat(&format!("{CACHE}num_hosts")), 1);
    // The cached name still works, and IP literals never touch the cache.
    echo_through(&proxy, "localhost", &target, 2).await;
    echo_through(&proxy, "127.0.0.1", &target, 3).await;
    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_attempt")), 1);
}

/// The DNS cache asks a given DNS server (`typed_dns_resolver_config`, c-ares `resolvers`).
fn resolver_config(server: SocketAddr) -> String {
    format!(
        r#"                typed_dns_resolver_config:
                  name: envoy.network.dns_resolver.cares
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
                    resolvers:
                    - socket_address: {{ address: {}, port_value: {} }}
"#,
        server.ip(),
        server.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_served_by_a_dns_server_with_rcodes_and_ttls() {
    let target = EchoTarget::start().await;
    let dns = support::dns::DnsServer::start(vec![
        ("echo.test", vec!["127.0.0.1".parse().unwrap()], 300),
        ("short.test", vec!["127.0.0.1".parse().unwrap()], 0),
        ("rebind.test", vec!["169.254.169.254".parse().unwrap()], 300),
        ("v6only.test", vec!["2001:db8::1".parse().unwrap()], 300),
    ])
    .await;
    let cert = test_cert();
    let policy = format!(
        "                allow:\n                - {{ cidr: 127.0.0.1/32, ports: \"{}\" }}\n",
        target.addr.port()
    );
    let proxy = Proxy::start(
        &dfp_yaml(&cert, Some(&policy), &resolver_config(dns.addr)),
        cert,
    )
    .await;

    // Resolved by the server (A and AAAA asked, family ALL), then from the cache (TTL 300).
    echo_through(&proxy, "echo.test", &target, 1).await;
    echo_through(&proxy, "echo.test", &target, 2).await;
    assert_eq!(dns.queries("echo.test"), 2, "one A and one AAAA query");
    // TTL 0: every request asks again.
    echo_through(&proxy, "short.test", &target, 3).await;
    echo_through(&proxy, "short.test", &target, 4).await;
    assert_eq!(dns.queries("short.test"), 4);

    // NXDOMAIN and SERVFAIL: 503 dns_error with the rcode.
    let (status, ps) = status_of(&proxy, "missing.test", 9000).await;
    assert_eq!(status, 503);
    assert!(
        ps.starts_with("ferry; error=dns_error; rcode=\"NXDOMAIN\""),
        "{ps}"
    );
    let (status, ps) = status_of(&proxy, "servfail.test", 9000).await;
    assert_eq!(status, 503);
    assert!(ps.contains("rcode=\"SERVFAIL\""), "{ps}");

    // A name that resolves to a refused address.
    let (status, ps) = status_of(&proxy, "rebind.test", 9000).await;
    assert_eq!(status, 403);
    assert!(
        ps.contains("rebind.test resolves to 169.254.169.254:9000"),
        "{ps}"
    );
    // An IPv6 answer (documentation prefix: allowed by policy; the socket connects).
    let (status, ps) = status_of(&proxy, "v6only.test", 9000).await;
    // (200, or 503 destination_unavailable where this host has no IPv6 route: either way
    // the name resolved.)
    assert!(
        status == 200 || (status == 503 && ps.contains("destination_unavailable")),
        "{status} {ps}"
    );
    assert_eq!(dns.queries("v6only.test"), 2);

    assert_eq!(proxy.stat(&format!("{CACHE}dns_query_failure")), 2);
    assert_eq!(proxy.stat(&format!("{CU}tunnels_rejected_dns_error")), 2);
}
