//! Authentication: Envoy's basic_auth HTTP filter over HTTP/3, HTTP/2 and HTTP/1.1, and
//! mutual TLS (require_client_certificate + validation_context) on TCP and QUIC listeners.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::tcp::{self, listener_addr, multi_bootstrap, static_cluster, Version};
use support::*;

/// `alice:password` (sha1("password") = W6ph5Mm5Pz8GgiULbPgzG37mj9g=).
const USERS: &str = "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=";
const GOOD: &str = "Basic YWxpY2U6cGFzc3dvcmQ=";
/// `alice:wrong`.
const BAD: &str = "Basic YWxpY2U6d3Jvbmc=";

fn basic_auth_filter(users: &str, extra: &str) -> String {
    format!(
        r#"          http_filters:
          - name: envoy.filters.http.basic_auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth
              users: {users}
{extra}"#
    )
}

/// The three-listener bootstrap (TLS TCP, QUIC, cleartext TCP) with a basic_auth filter.
fn auth_bootstrap(cert: &TestCert, target: SocketAddr, users: &str, extra: &str) -> String {
    multi_bootstrap(cert, "AUTO", TERMINATE_ROUTE, &static_cluster(target)).replace(
        "          http_filters:\n",
        &basic_auth_filter(users, extra),
    )
}

fn h3_options(proxy: &Proxy) -> ferry::client::ClientOptions {
    ferry::client::ClientOptions {
        server_name: "localhost".into(),
        ca_pem: Some(proxy.cert.cert_pem.clone()),
        insecure: false,
        datagrams: true,
    }
}

#[tokio::test]
async fn basic_auth_good_bad_missing_over_h3_h2_h1() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let users = format!("{{ inline_string: \"{USERS}\" }}");
    let yaml = auth_bootstrap(&cert, target.addr, &users, "");
    let proxy = Proxy::start(&yaml, cert).await;
    // Registered at zero from the start, as in Envoy.
    assert_eq!(
        proxy
            .state
            .stats
            .value("http.ingress_h3.basic_auth.allowed"),
        Some(0)
    );
    assert_eq!(
        proxy
            .state
            .stats
            .value("http.ingress_tcp.basic_auth.denied"),
        Some(0)
    );

    // HTTP/3.
    let h3 = listener_addr(&proxy, "h3_listener");
    let mut client = ferry::client::H3Client::connect(h3, &h3_options(&proxy))
        .await
        .unwrap();
    let mut t = client
        .open(PATH, &[("authorization", GOOD)], false)
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(
        echo_until_received(&mut t, b"authed h3").await,
        &b"authed h3"[..]
    );
    for (headers, details) in [
        (
            vec![("authorization", BAD)],
            "Invalid username/password combination.",
        ),
        (vec![], "Missing username and password."),
        (
            vec![("authorization", "Bearer x")],
            "Expected 'Basic' authentication scheme.",
        ),
        (
            vec![("authorization", "Basic YWxpY2U=")],
            "Invalid basic credential format.",
        ),
        // The filter reads `authorization` unless told otherwise.
        (
            vec![("proxy-authorization", GOOD)],
            "Missing username and password.",
        ),
    ] {
        let t = client.open(PATH, &headers, false).await.unwrap();
        assert_eq!(t.status, 401, "{headers:?}");
        let ps = proxy_status(&t);
        assert!(ps.contains("error=http_request_denied"), "{ps}");
        assert!(ps.contains(details), "{ps}");
        assert_eq!(
            t.headers.get("www-authenticate").unwrap(),
            "Basic realm=\"https://foo.lyft.com:80/.well-known/masque/udp/foo.lyft.com/80/\""
        );
    }
    proxy
        .wait_stat("http.ingress_h3.basic_auth.allowed", 1)
        .await;
    proxy
        .wait_stat("http.ingress_h3.basic_auth.denied", 5)
        .await;
    proxy
        .wait_stat("http.ingress_h3.connect_udp.tunnels_rejected_401", 5)
        .await;
    // Refused before any socket was opened: only the good tunnel reached the cluster.
    assert_eq!(proxy.stat("cluster.target.upstream_cx_total"), 1);

    // HTTP/2 and HTTP/1.1 over TLS.
    let tcp_addr = listener_addr(&proxy, "tcp_listener");
    let ca = proxy.cert.cert_pem.clone();
    for version in [Version::H2, Version::H1] {
        let mut t = tcp::open(tcp_addr, &ca, version, PATH, &[("authorization", GOOD)]).await;
        assert!(
            t.status == 200 || t.status == 101,
            "{version:?}: {}",
            t.status
        );
        t.send(b"authed tcp").await;
        assert_eq!(t.recv().await.unwrap(), &b"authed tcp"[..]);
        for extra in [vec![("authorization", BAD)], vec![]] {
            let t = tcp::open(tcp_addr, &ca, version, PATH, &extra).await;
            assert_eq!(t.status, 401, "{version:?} {extra:?}");
            assert!(t.proxy_status().contains("http_request_denied"));
            let challenge = t.headers.get("www-authenticate").unwrap().to_str().unwrap();
            assert!(
                challenge.starts_with("Basic realm=\"https://foo.lyft.com:80/"),
                "{challenge}"
            );
        }
    }
    proxy
        .wait_stat("http.ingress_tcp.basic_auth.allowed", 2)
        .await;
    proxy
        .wait_stat("http.ingress_tcp.basic_auth.denied", 4)
        .await;
    assert_eq!(proxy.stat("cluster.target.upstream_cx_total"), 3);
}

#[tokio::test]
async fn basic_auth_from_a_file_and_proxy_authorization() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let dir = std::env::temp_dir().join(format!("ferry-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("htpasswd");
    // Comments, blank lines and CRLF line ends, as htpasswd files have them.
    std::fs::write(
        &file,
        format!("# users\r\n\r\nbob:{{SHA}}qUqP5cyxm6YcTAhz05Hph5gvu9M=\r\n{USERS}\r\n"),
    )
    .unwrap();
    let users = format!("{{ filename: \"{}\" }}", file.display());
    let extra = "              authentication_header: proxy-authorization\n";
    let yaml = auth_bootstrap(&cert, target.addr, &users, extra);
    let proxy = Proxy::start(&yaml, cert).await;
    let h3 = listener_addr(&proxy, "h3_listener");
    let mut client = ferry::client::H3Client::connect(h3, &h3_options(&proxy))
        .await
        .unwrap();
    let mut t = client
        .open(PATH, &[("proxy-authorization", GOOD)], false)
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(echo_until_received(&mut t, b"file").await, &b"file"[..]);
    // bob:test (sha1("test") = qUqP5cyxm6YcTAhz05Hph5gvu9M=)
    let t = client
        .open(
            PATH,
            &[("proxy-authorization", "Basic Ym9iOnRlc3Q=")],
            false,
        )
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    // `authorization` is not read any more.
    let t = client
        .open(PATH, &[("authorization", GOOD)], false)
        .await
        .unwrap();
    assert_eq!(t.status, 401);
    // Cleartext HTTP/1.1: the realm's scheme is http.
    let plain = listener_addr(&proxy, "plain_listener");
    let resp = plain_h1(plain, &[("proxy-authorization", BAD)]).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        challenge.starts_with("Basic realm=\"http://"),
        "{challenge}"
    );
    proxy
        .wait_stat("http.ingress_h3.basic_auth.allowed", 2)
        .await;
    proxy
        .wait_stat("http.ingress_h3.basic_auth.denied", 1)
        .await;
    proxy
        .wait_stat("http.ingress_plain.basic_auth.denied", 1)
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// One HTTP/1.1 CONNECT-UDP upgrade request over cleartext TCP: the response head.
async fn plain_h1(
    addr: SocketAddr,
    extra: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let mut req = http::Request::builder()
        .method(http::Method::GET)
        .uri(PATH)
        .header(http::header::HOST, format!("localhost:{}", addr.port()))
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "connect-udp")
        .header("capsule-protocol", "?1");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(
        DEADLINE,
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap()
}

#[test]
fn bad_htpasswd_lines_are_config_errors_naming_the_line() {
    let cert = test_cert();
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let users =
        "{ inline_string: \"alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\\nbob:$apr1$x$y\\ncarol\" }";
    let yaml = auth_bootstrap(&cert, target, users, "");
    let err = ferry_config::load_str(&yaml, ferry_config::Format::Yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("http_filters[0].typed_config.users.inline_string: line 2: unsupported hash for user `bob`"),
        "{err}"
    );
    assert!(
        err.contains("users.inline_string: line 3: invalid htpasswd format"),
        "{err}"
    );
    assert!(!err.contains("W6ph5"), "hashes must not be printed: {err}");
}

// ---------------------------------------------------------------------------------------
// Mutual TLS

struct Pki {
    /// PEM of the CA that client certificates must chain to.
    ca_pem: String,
    /// A client certificate signed by that CA.
    trusted: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    /// A client certificate signed by another CA.
    untrusted: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

fn client_cert(
    issuer: &rcgen::Certificate,
    issuer_key: &rcgen::KeyPair,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut params = rcgen::CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer, issuer_key).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
}

fn pki() -> Pki {
    let (good_ca, good_key) = ca("ferry test client CA");
    let (other_ca, other_key) = ca("some other CA");
    Pki {
        ca_pem: good_ca.pem(),
        trusted: client_cert(&good_ca, &good_key),
        untrusted: client_cert(&other_ca, &other_key),
    }
}

/// The three-listener bootstrap with client certificate validation on the TLS TCP and the
/// QUIC listener.
fn mtls_bootstrap(cert: &TestCert, target: SocketAddr, ca_pem: &str) -> String {
    let vc = |n: usize| {
        let pad = " ".repeat(n);
        format!(
            "{pad}validation_context:\n{pad}  trusted_ca:\n{pad}    inline_string: |\n{}",
            indent(ca_pem, n + 6)
        )
    };
    multi_bootstrap(cert, "AUTO", TERMINATE_ROUTE, &static_cluster(target))
        .replace(
            "          common_tls_context:\n            alpn_protocols:",
            &format!(
                "          require_client_certificate: true\n          common_tls_context:\n{}            alpn_protocols:",
                vc(12)
            ),
        )
        .replace(
            "          downstream_tls_context:\n            common_tls_context:\n",
            &format!(
                "          downstream_tls_context:\n            require_client_certificate: true\n            common_tls_context:\n{}",
                vc(14)
            ),
        )
}

fn client_tls(
    server_ca_pem: &str,
    client: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in ferry::tls::parse_certs(server_ca_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// An HTTP/2 CONNECT-UDP request over TLS with the given client certificate: the status,
/// or the error that ended the connection.
async fn h2_connect(
    addr: SocketAddr,
    server_ca_pem: &str,
    client: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<u16, String> {
    let config = client_tls(server_ca_pem, client, b"h2");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let io = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut last = String::new();
        for _ in 0..100 {
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(format!("https://localhost:{}{PATH}", addr.port()))
                .extension(hyper::ext::Protocol::from_static("connect-udp"))
                .header("capsule-protocol", "?1")
                .body(Empty::<Bytes>::new())
                .unwrap();
            match sender.send_request(req).await {
                Ok(resp) => return Ok(resp.status().as_u16()),
                // Extended CONNECT waits for the server's SETTINGS; a closed connection
                // fails for good.
                Err(e) if sender.is_closed() => return Err(e.to_string()),
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
        Err(last)
    };
    tokio::time::timeout(DEADLINE, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A QUIC + HTTP/3 CONNECT-UDP request with the given client certificate: the status, or
/// the error that ended the connection.
async fn h3_connect(
    addr: SocketAddr,
    server_ca_pem: &str,
    client: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<u16, String> {
    let config = client_tls(server_ca_pem, client, b"h3");
    let endpoint = ferry::quic::client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let attempt = async {
        let conn = endpoint
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut driver, mut send_request) = h3::client::builder()
            .enable_extended_connect(true)
            .enable_datagram(true)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("https://localhost:{}{PATH}", addr.port()))
            .extension(h3::ext::Protocol::CONNECT_UDP)
            .header("capsule-protocol", "?1")
            .body(())
            .unwrap();
        let mut stream = send_request
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(DEADLINE, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test]
async fn mtls_trusted_untrusted_and_no_client_certificate_tcp_and_quic() {
    let target = EchoTarget::start().await;
    let cert = test_cert();
    let pki = pki();
    let yaml = mtls_bootstrap(&cert, target.addr, &pki.ca_pem);
    let proxy = Proxy::start(&yaml, cert).await;
    let server_ca = proxy.cert.cert_pem.clone();
    let tcp_addr = listener_addr(&proxy, "tcp_listener");
    let h3_addr = listener_addr(&proxy, "h3_listener");
    let tcp_ssl = "listener.127.0.0.1_0.ssl.";
    // Both listeners are configured on port 0, so they share Envoy's stat name
    // `listener.127.0.0.1_0.*`: the counts below add up over TCP and QUIC.
    for f in [
        "connection_error",
        "fail_verify_no_cert",
        "fail_verify_error",
    ] {
        assert_eq!(
            proxy.state.stats.value(&format!("{tcp_ssl}{f}")),
            Some(0),
            "{f}"
        );
    }

    // TCP (HTTP/2 over TLS).
    assert_eq!(
        h2_connect(tcp_addr, &server_ca, Some(&pki.trusted)).await,
        Ok(200)
    );
    let untrusted = h2_connect(tcp_addr, &server_ca, Some(&pki.untrusted)).await;
    assert!(
        untrusted.is_err(),
        "untrusted client certificate: {untrusted:?}"
    );
    proxy
        .wait_stat(&format!("{tcp_ssl}fail_verify_error"), 1)
        .await;
    let none = h2_connect(tcp_addr, &server_ca, None).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    proxy
        .wait_stat(&format!("{tcp_ssl}fail_verify_no_cert"), 1)
        .await;

    // QUIC (HTTP/3).
    assert_eq!(
        h3_connect(h3_addr, &server_ca, Some(&pki.trusted)).await,
        Ok(200)
    );
    let untrusted = h3_connect(h3_addr, &server_ca, Some(&pki.untrusted)).await;
    assert!(
        untrusted.is_err(),
        "untrusted client certificate: {untrusted:?}"
    );
    proxy
        .wait_stat(&format!("{tcp_ssl}fail_verify_error"), 2)
        .await;
    let none = h3_connect(h3_addr, &server_ca, None).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    proxy
        .wait_stat(&format!("{tcp_ssl}fail_verify_no_cert"), 2)
        .await;

    // Only the two trusted clients got tunnels.
    proxy
        .wait_stat("http.ingress_tcp.downstream_rq_2xx", 1)
        .await;
    proxy
        .wait_stat("http.ingress_h3.downstream_rq_2xx", 1)
        .await;
    assert_eq!(proxy.stat("cluster.target.upstream_cx_total"), 2);
    assert_eq!(proxy.stat(&format!("{tcp_ssl}connection_error")), 0);
}

#[test]
fn require_client_certificate_needs_a_validation_context() {
    let cert = test_cert();
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let yaml = multi_bootstrap(&cert, "AUTO", TERMINATE_ROUTE, &static_cluster(target)).replace(
        "          downstream_tls_context:\n",
        "          downstream_tls_context:\n            require_client_certificate: true\n",
    );
    let err = ferry_config::load_str(&yaml, ferry_config::Format::Yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("downstream_tls_context.require_client_certificate: needs common_tls_context.validation_context.trusted_ca"),
        "{err}"
    );
}
