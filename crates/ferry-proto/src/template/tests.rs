use super::*;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn default_path(host: &str, port: &str) -> String {
    format!("{DEFAULT_TEMPLATE_PREFIX}{host}/{port}/")
}

// ---- parse_default_path: Envoy's scenarios -------------------------------------------

#[test]
fn envoy_name_target() {
    let t = parse_default_path("/.well-known/masque/udp/foo.lyft.com/80/").unwrap();
    assert_eq!(t.host, TargetHost::Name("foo.lyft.com".into()));
    assert_eq!(t.port, 80);
    assert_eq!(t.host_text, "foo.lyft.com");
    assert_eq!(t.authority(), "foo.lyft.com:80");
    assert_eq!(t.to_string(), "foo.lyft.com:80");
    assert_eq!(t.socket_addr(), None);
}

#[test]
fn envoy_wrong_prefix() {
    assert_eq!(
        parse_default_path("/masque/udp/foo.lyft.com/80/"),
        Err(PathError::WrongPrefix)
    );
    assert_eq!(
        parse_default_path("/.well-known/masque/UDP/foo.lyft.com/80/"),
        Err(PathError::WrongPrefix)
    );
    assert_eq!(parse_default_path(""), Err(PathError::WrongPrefix));
}

#[test]
fn envoy_empty_host_and_port() {
    assert_eq!(
        parse_default_path("/.well-known/masque/udp//80/"),
        Err(PathError::EmptyHost)
    );
    assert_eq!(
        parse_default_path("/.well-known/masque/udp/foo.lyft.com//"),
        Err(PathError::EmptyPort)
    );
    assert_eq!(
        parse_default_path("/.well-known/masque/udp///"),
        Err(PathError::EmptyHost)
    );
}

#[test]
fn envoy_ipv4_literal() {
    let t = parse_default_path(&default_path("192.0.2.6", "443")).unwrap();
    assert_eq!(
        t.host,
        TargetHost::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 6)))
    );
    assert_eq!(t.authority(), "192.0.2.6:443");
    assert_eq!(t.socket_addr(), Some("192.0.2.6:443".parse().unwrap()));
}

#[test]
fn envoy_ipv6_literal_as_written() {
    let want_ip: Ipv6Addr = "2001:db8:85a3::8a2e:370:7334".parse().unwrap();
    for encoded in [
        "2001:0db8:85a3::8a2e:0370:7334",
        "2001%3A0db8%3A85a3%3A%3A8a2e%3A0370%3A7334",
        "2001%3a0db8%3a85a3%3a%3a8a2e%3a0370%3a7334",
    ] {
        let t = parse_default_path(&default_path(encoded, "80")).unwrap();
        assert_eq!(t.host, TargetHost::Ip(IpAddr::V6(want_ip)), "{encoded}");
        assert_eq!(t.host_text, "2001:0db8:85a3::8a2e:0370:7334");
        // Envoy brackets the decoded text as written, leading zeros and all.
        assert_eq!(t.authority(), "[2001:0db8:85a3::8a2e:0370:7334]:80");
    }
    let t = parse_default_path(&default_path("2001%3Adb8%3A%3A42", "443")).unwrap();
    assert_eq!(t.authority(), "[2001:db8::42]:443");
    assert_eq!(t.socket_addr(), Some("[2001:db8::42]:443".parse().unwrap()));
}

#[test]
fn envoy_zone_id_refused() {
    assert_eq!(
        parse_default_path(&default_path("fe80::a%25ee1", "80")),
        Err(PathError::ZoneId)
    );
    assert_eq!(
        parse_default_path(&default_path("fe80%3A%3Aa%25ee1", "80")),
        Err(PathError::ZoneId)
    );
}

#[test]
fn segment_count() {
    for path in [
        "/.well-known/masque/udp/foo.lyft.com/80",
        "/.well-known/masque/udp/foo.lyft.com/80/extra/",
        "/.well-known/masque/udp/foo.lyft.com/80/extra",
        "/.well-known/masque/udp/foo.lyft.com/80/?q=1",
        "/.well-known/masque/udp/foo.lyft.com/",
        "/.well-known/masque/udp/foo.lyft.com",
        "/.well-known/masque/udp/",
    ] {
        assert_eq!(
            parse_default_path(path),
            Err(PathError::WrongSegmentCount),
            "{path}"
        );
    }
}

#[test]
fn bad_characters() {
    for (path, byte) in [
        ("/.well-known/masque/udp/foo bar/80/", 0x20),
        ("/.well-known/masque/udp/foo\x7f/80/", 0x7f),
        ("/.well-known/masque/udp/foo/80/\t", 0x09),
        ("/.well-known/masque/udp/\u{e9}/80/", 0xc3),
    ] {
        assert_eq!(
            parse_default_path(path),
            Err(PathError::BadCharacter(byte)),
            "{path:?}"
        );
    }
    // 0x21 and 0x7e are fine.
    let t = parse_default_path(&default_path("a!~", "80")).unwrap();
    assert_eq!(t.host, TargetHost::Name("a!~".into()));
}

#[test]
fn ports() {
    for ok in ["1", "80", "65535", "080", "%38%30"] {
        assert!(
            parse_default_path(&default_path("h.example", ok)).is_ok(),
            "{ok}"
        );
    }
    assert_eq!(
        parse_default_path(&default_path("h.example", "%38%30"))
            .unwrap()
            .port,
        80
    );
    assert_eq!(
        parse_default_path(&default_path("h.example", "65535"))
            .unwrap()
            .port,
        65535
    );
    for bad in [
        "0",
        "00",
        "65536",
        "70000",
        "99999999999999999999999",
        "http",
        "-1",
        "+80",
        "8o",
        "80%20",
        "0x50",
    ] {
        assert_eq!(
            parse_default_path(&default_path("h.example", bad)),
            Err(PathError::BadPort(
                String::from_utf8(percent_decode(bad).unwrap()).unwrap()
            )),
            "{bad}"
        );
    }
    assert_eq!(
        parse_default_path(&default_path("h.example", "")),
        Err(PathError::EmptyPort)
    );
}

#[test]
fn bad_percent_encoding() {
    for (host, port) in [
        ("%zz", "80"),
        ("a%2", "80"),
        ("a%", "80"),
        ("a", "%zz"),
        ("a", "8%"),
    ] {
        assert_eq!(
            parse_default_path(&default_path(host, port)),
            Err(PathError::BadPercentEncoding),
            "{host} {port}"
        );
    }
}

#[test]
fn bad_hosts() {
    for (encoded, decoded) in [
        ("a%2Fb", "a/b"),
        ("%5B%3A%3A1%5D", "[::1]"),
        ("[::1]", "[::1]"),
        ("x:y", "x:y"),
        ("1:2:3", "1:2:3"),
        ("a@b", "a@b"),
        ("a%3Fb", "a?b"),
        ("a%23b", "a#b"),
        ("a%20b", "a b"),
        ("a%00b", "a\0b"),
        ("127.1", "127.1"),
        ("0x7f.1", "0x7f.1"),
        ("2130706433", "2130706433"),
        ("010.0.0.1", "010.0.0.1"),
        ("1.2.3.4.5", "1.2.3.4.5"),
        ("256.0.0.1", "256.0.0.1"),
        ("foo.0X1f", "foo.0X1f"),
        ("0x", "0x"),
    ] {
        assert_eq!(
            parse_default_path(&default_path(encoded, "80")),
            Err(PathError::BadHost(decoded.into())),
            "{encoded}"
        );
    }
    // Non-UTF-8 after decoding.
    assert!(matches!(
        parse_default_path(&default_path("%ff", "80")),
        Err(PathError::BadHost(_))
    ));
    // Names that merely contain digits are fine.
    for ok in [
        "1.example",
        "a1",
        "x.y1",
        "0xg",
        "foo.lyft.com.",
        "FOO.Lyft.COM",
        "a_b-c",
    ] {
        let t = parse_default_path(&default_path(ok, "80")).unwrap();
        assert_eq!(t.host, TargetHost::Name(ok.into()), "{ok}");
        assert_eq!(t.host_text, ok);
    }
}

#[test]
fn path_error_display() {
    let cases = [
        (
            PathError::BadCharacter(0x20),
            "byte 0x20 is not allowed in the path",
        ),
        (
            PathError::WrongPrefix,
            "path does not start with /.well-known/masque/udp/",
        ),
        (
            PathError::WrongSegmentCount,
            "path is not /.well-known/masque/udp/{target_host}/{target_port}/",
        ),
        (PathError::EmptyHost, "empty target_host"),
        (PathError::EmptyPort, "empty target_port"),
        (PathError::BadPercentEncoding, "bad percent-encoding"),
        (PathError::ZoneId, "IPv6 zone id in target_host"),
        (
            PathError::BadPort("http".into()),
            "bad target_port \"http\"",
        ),
        (PathError::BadHost("a/b".into()), "bad target_host \"a/b\""),
        (PathError::NoMatch, "path does not match the URI template"),
    ];
    for (e, s) in cases {
        assert_eq!(e.to_string(), s);
    }
}

// ---- Target --------------------------------------------------------------------------

#[test]
fn target_new_and_authority() {
    let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let t = Target::new(TargetHost::Ip(IpAddr::V6(v6)), 80);
    assert_eq!(t.host_text, "2001:db8::1");
    assert_eq!(t.authority(), "[2001:db8::1]:80");
    let t = Target::new(TargetHost::Name("example.org".into()), 443);
    assert_eq!(t.to_string(), "example.org:443");
    let t = Target::new(TargetHost::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), 53);
    assert_eq!(t.authority(), "127.0.0.1:53");
    // An empty host_text falls back to the parsed host.
    let t = Target {
        host: TargetHost::Ip(IpAddr::V6(v6)),
        port: 1,
        host_text: String::new(),
    };
    assert_eq!(t.authority(), "[2001:db8::1]:1");
    assert_eq!(TargetHost::Name("x".into()).to_string(), "x");
}

// ---- UriTemplate ---------------------------------------------------------------------

#[test]
fn default_template_matches_its_text() {
    let parsed = UriTemplate::parse(DEFAULT_TEMPLATE).unwrap();
    let built = UriTemplate::default_template();
    assert_eq!(parsed, built);
    assert!(built.is_default());
    assert_eq!(built.as_str(), DEFAULT_TEMPLATE);
    assert_eq!(built.to_string(), DEFAULT_TEMPLATE);
    assert_eq!(built.scheme(), None);
    assert_eq!(built.authority(), None);
    let abs = UriTemplate::parse(
        "https://proxy.example:443/.well-known/masque/udp/{target_host}/{target_port}/",
    )
    .unwrap();
    assert!(abs.is_default());
    assert_eq!(abs.scheme(), Some("https"));
    assert_eq!(abs.authority(), Some("proxy.example:443"));
}

#[test]
fn is_default_is_exact() {
    for t in [
        "/.well-known/masque/udp/{target_port}/{target_host}/",
        "/.well-known/masque/udp/{target_host}/{target_port}",
        "/.well-known/masque/udp/{target_host}/{target_port}/x",
        "/.well-known/masque/udp/{target_host,a}/{target_port}/",
        "/.well-known/masque/udp/{target_host}/{?target_port}/",
        "/.well-known/masque/UDP/{target_host}/{target_port}/",
        "/.well-known/masque/udp/{target_host}.{target_port}/",
    ] {
        assert!(!UriTemplate::parse(t).unwrap().is_default(), "{t}");
    }
}

#[test]
fn rfc9298_examples() {
    let t = UriTemplate::parse(
        "https://example.org/.well-known/masque/udp/{target_host}/{target_port}/",
    )
    .unwrap();
    assert_eq!(
        t.expand_path("192.0.2.6", 443),
        "/.well-known/masque/udp/192.0.2.6/443/"
    );
    assert_eq!(
        t.expand("192.0.2.6", 443),
        "https://example.org/.well-known/masque/udp/192.0.2.6/443/"
    );
    assert_eq!(
        t.expand_path("2001:db8::42", 443),
        "/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/"
    );

    let t =
        UriTemplate::parse("https://proxy.example.org:4443/masque?h={target_host}&p={target_port}")
            .unwrap();
    assert_eq!(
        t.expand_path("example.com", 53),
        "/masque?h=example.com&p=53"
    );
    assert_eq!(
        t.match_path("/masque?h=example.com&p=53"),
        Some(("example.com".into(), "53".into()))
    );

    let t = UriTemplate::parse("https://proxy.example.org:4443/masque{?target_host,target_port}")
        .unwrap();
    assert_eq!(
        t.expand_path("2001:db8::42", 8443),
        "/masque?target_host=2001%3Adb8%3A%3A42&target_port=8443"
    );
    assert_eq!(
        t.match_path("/masque?target_host=2001%3Adb8%3A%3A42&target_port=8443"),
        Some(("2001:db8::42".into(), "8443".into()))
    );
    // Query parameters in either order.
    assert_eq!(
        t.match_path("/masque?target_port=1&target_host=h"),
        Some(("h".into(), "1".into()))
    );
    assert_eq!(t.match_path("/masque?target_host=h"), None);
    assert_eq!(t.match_path("/masque"), None);
    assert_eq!(
        t.match_path("/masque?target_host=h&target_port=1&x=2"),
        None
    );
    assert_eq!(
        t.expand("h", 1),
        "https://proxy.example.org:4443/masque?target_host=h&target_port=1"
    );
}

#[test]
fn brief_example_path_template() {
    let t = UriTemplate::parse("/masque{?target_host,target_port}").unwrap();
    assert_eq!(t.expand("a.b", 9), "/masque?target_host=a.b&target_port=9");
    assert_eq!(t.scheme(), None);
    assert!(!t.is_default());
}

#[test]
fn match_default_template() {
    let t = UriTemplate::default_template();
    assert_eq!(
        t.match_path("/.well-known/masque/udp/foo.lyft.com/80/"),
        Some(("foo.lyft.com".into(), "80".into()))
    );
    assert_eq!(
        t.match_path("/.well-known/masque/udp/2001%3Adb8%3A%3A1/80/"),
        Some(("2001:db8::1".into(), "80".into()))
    );
    // Unencoded colons are tolerated.
    assert_eq!(
        t.match_path("/.well-known/masque/udp/2001:db8::1/80/"),
        Some(("2001:db8::1".into(), "80".into()))
    );
    assert_eq!(t.match_path("/.well-known/masque/udp/foo/80"), None);
    assert_eq!(t.match_path("/.well-known/masque/udp/foo/80/x"), None);
    assert_eq!(t.match_path("/.well-known/masque/udp/f%zz/80/"), None);
    assert_eq!(t.match_path("/.well-known/masque/udp/f%ff/80/"), None);
    assert_eq!(
        t.match_path("/.well-known/masque/udp//80/"),
        Some((String::new(), "80".into()))
    );
}

#[test]
fn match_target_custom_and_default() {
    let d = UriTemplate::default_template();
    assert_eq!(
        d.match_target("/.well-known/masque/udp/foo/0/"),
        Err(PathError::BadPort("0".into()))
    );
    assert_eq!(d.match_target("/x"), Err(PathError::WrongPrefix));

    let t = UriTemplate::parse("/m/{target_host}/{target_port}").unwrap();
    let target = t.match_target("/m/2001%3Adb8%3A%3A1/443").unwrap();
    assert_eq!(target.authority(), "[2001:db8::1]:443");
    assert_eq!(t.match_target("/m//443"), Err(PathError::EmptyHost));
    assert_eq!(t.match_target("/m/h/"), Err(PathError::EmptyPort));
    assert_eq!(
        t.match_target("/m/h/70000"),
        Err(PathError::BadPort("70000".into()))
    );
    assert_eq!(
        t.match_target("/m/fe80::1%25eth0/1"),
        Err(PathError::ZoneId)
    );
    assert_eq!(t.match_target("/m/h/1/"), Err(PathError::NoMatch));
    assert_eq!(
        t.match_target("/m/h h/1"),
        Err(PathError::BadCharacter(b' '))
    );
    assert_eq!(
        t.match_target("/m/h%zz/1"),
        Err(PathError::BadPercentEncoding)
    );
}

#[test]
fn multi_variable_simple_expression() {
    let t = UriTemplate::parse("/p/{target_host,target_port}/").unwrap();
    assert_eq!(t.expand_path("a.b", 5), "/p/a.b,5/");
    assert_eq!(t.match_path("/p/a.b,5/"), Some(("a.b".into(), "5".into())));
    assert_eq!(t.match_path("/p/a.b/"), None);
    // Another variable: undefined when expanding (skipped), optional when matching.
    let t = UriTemplate::parse("/p/{target_host,other,target_port}/").unwrap();
    assert_eq!(t.expand_path("a.b", 5), "/p/a.b,5/");
    assert_eq!(t.match_path("/p/a.b,5/"), Some(("a.b".into(), "5".into())));
    assert_eq!(
        t.match_path("/p/a.b,zzz,5/"),
        Some(("a.b".into(), "5".into()))
    );
}

#[test]
fn other_variables() {
    let t = UriTemplate::parse("/m/{id}/{target_host}/{target_port}{?x,y}").unwrap();
    assert_eq!(t.expand_path("h", 1), "/m//h/1");
    assert_eq!(t.match_path("/m//h/1"), Some(("h".into(), "1".into())));
    assert_eq!(t.match_path("/m/abc/h/1"), Some(("h".into(), "1".into())));
    assert_eq!(
        t.match_path("/m/abc/h/1?x=1&y=2"),
        Some(("h".into(), "1".into()))
    );
    assert_eq!(
        t.match_path("/m/abc/h/1?y=2"),
        Some(("h".into(), "1".into()))
    );
    assert_eq!(t.match_path("/m/abc/h/1?z=2"), None);
}

#[test]
fn query_continuation() {
    let t = UriTemplate::parse("/m?v=1{&target_host}{&target_port}").unwrap();
    assert_eq!(t.expand_path("h", 2), "/m?v=1&target_host=h&target_port=2");
    assert_eq!(
        t.match_path("/m?v=1&target_host=h&target_port=2"),
        Some(("h".into(), "2".into()))
    );
    assert_eq!(t.match_path("/m?v=1&target_port=2&target_host=h"), None);
}

#[test]
fn adjacent_and_ambiguous_expressions() {
    // Ambiguous but legal: the matcher backtracks.
    let t = UriTemplate::parse("/{target_host}.{target_port}").unwrap();
    assert_eq!(t.expand_path("a.b", 7), "/a.b.7");
    assert_eq!(t.match_path("/a.b.7"), Some(("a.b".into(), "7".into())));
    let t = UriTemplate::parse("/{target_host}{target_port}").unwrap();
    assert!(t.match_path("/ab12").is_some());
    let t = UriTemplate::parse("/x{?target_host}{&target_port}").unwrap();
    assert_eq!(
        t.match_path("/x?target_host=a&target_port=1"),
        Some(("a".into(), "1".into()))
    );
}

#[test]
fn pathological_match_is_bounded() {
    // Adjacent expressions make matching ambiguous; a long path must not make it slow.
    let t = UriTemplate::parse("/{target_host}{target_port}").unwrap();
    let path = format!("/{}!", "a,".repeat(100_000));
    let start = std::time::Instant::now();
    assert_eq!(t.match_path(&path), None);
    let t = UriTemplate::parse("/{target_host}{x}{target_port}/").unwrap();
    assert_eq!(t.match_path(&path), None);
    let t = UriTemplate::parse("/x{?target_host,target_port}{&a,b}").unwrap();
    let path = format!("/x?target_host={}", "a".repeat(200_000));
    assert_eq!(t.match_path(&path), None);
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
    // A long but sane path still matches with literal separators.
    let t = UriTemplate::default_template();
    let host = "a".repeat(100_000);
    let path = t.expand_path(&host, 80);
    assert_eq!(t.match_path(&path), Some((host, "80".into())));
}

#[test]
fn pathological_match_terminates() {
    let template = format!("/{}{{target_host}}{{target_port}}", "{a}".repeat(14));
    let t = UriTemplate::parse(&template).unwrap();
    let path = format!("/{}!", "a".repeat(3000));
    assert_eq!(t.match_path(&path), None);
}

#[test]
fn template_errors() {
    use TemplateError as E;
    let cases: &[(&str, E)] = &[
        (
            "/a b{target_host}{target_port}",
            E::BadCharacter {
                index: 2,
                byte: b' ',
            },
        ),
        (
            "/\u{e9}{target_host}{target_port}",
            E::BadCharacter {
                index: 1,
                byte: 0xc3,
            },
        ),
        (
            "/a\"{target_host}{target_port}",
            E::DisallowedLiteral { index: 2, ch: '"' },
        ),
        (
            "/a|{target_host}{target_port}",
            E::DisallowedLiteral { index: 2, ch: '|' },
        ),
        (
            "/%zz{target_host}{target_port}",
            E::BadPercentEncoding { index: 1 },
        ),
        (
            "/%2{target_host}{target_port}",
            E::BadPercentEncoding { index: 1 },
        ),
        (
            "/{target_host}{target_port",
            E::UnclosedExpression { index: 14 },
        ),
        (
            "/{target_host{target_port}",
            E::UnclosedExpression { index: 1 },
        ),
        (
            "/}{target_host}{target_port}",
            E::UnexpectedCloseBrace { index: 1 },
        ),
        (
            "/{}{target_host}{target_port}",
            E::EmptyExpression { index: 1 },
        ),
        (
            "/{target_host,}{target_port}",
            E::EmptyExpression { index: 1 },
        ),
        (
            "/{?}{target_host}{target_port}",
            E::EmptyExpression { index: 1 },
        ),
        ("/{+target_host}{target_port}", E::ForbiddenOperator('+')),
        ("/{#target_host}{target_port}", E::ForbiddenOperator('#')),
        ("/{.target_host}{target_port}", E::ForbiddenOperator('.')),
        ("/{/target_host}{target_port}", E::ForbiddenOperator('/')),
        ("/{;target_host}{target_port}", E::ForbiddenOperator(';')),
        ("/{=target_host}{target_port}", E::ReservedOperator('=')),
        ("/{,target_host}{target_port}", E::ReservedOperator(',')),
        ("/{!target_host}{target_port}", E::ReservedOperator('!')),
        ("/{@target_host}{target_port}", E::ReservedOperator('@')),
        ("/{|target_host}{target_port}", E::ReservedOperator('|')),
        (
            "/{target_host:3}{target_port}",
            E::Level4Modifier("target_host:3".into()),
        ),
        (
            "/{target_host*}{target_port}",
            E::Level4Modifier("target_host*".into()),
        ),
        (
            "/{target-host}{target_port}",
            E::BadVariableName("target-host".into()),
        ),
        (
            "/{a..b}{target_host}{target_port}",
            E::BadVariableName("a..b".into()),
        ),
        ("/{.a}", E::ForbiddenOperator('.')),
        (
            "/{a.}{target_host}{target_port}",
            E::BadVariableName("a.".into()),
        ),
        (
            "/{a%2}{target_host}{target_port}",
            E::BadVariableName("a%2".into()),
        ),
        ("/{target_port}", E::MissingVariable("target_host")),
        ("/{target_host}", E::MissingVariable("target_port")),
        (
            "/{target_host}/{target_port}/{target_host}",
            E::DuplicateVariable("target_host"),
        ),
        (
            "/{target_host}/{target_port}{?target_port}",
            E::DuplicateVariable("target_port"),
        ),
        (
            "https://{target_host}/{target_port}",
            E::VariableOutsidePathOrQuery,
        ),
        (
            "{x}://h/{target_host}/{target_port}",
            E::VariableOutsidePathOrQuery,
        ),
        (
            "https://h:{p}/{target_host}/{target_port}",
            E::VariableOutsidePathOrQuery,
        ),
        ("{target_host}/{target_port}", E::PathMustStartWithSlash),
        (
            "masque/{target_host}/{target_port}",
            E::PathMustStartWithSlash,
        ),
        (
            "https://h?{target_host}{target_port}",
            E::PathMustStartWithSlash,
        ),
        ("https://h", E::PathMustStartWithSlash),
        (
            "1https://h/{target_host}/{target_port}",
            E::PathMustStartWithSlash,
        ),
        ("", E::PathMustStartWithSlash),
        ("https", E::PathMustStartWithSlash),
        ("https:///{target_host}/{target_port}", E::EmptyAuthority),
        ("/{target_host}/{target_port}#frag", E::Fragment),
    ];
    for (template, err) in cases {
        assert_eq!(
            UriTemplate::parse(template).as_ref(),
            Err(err),
            "{template}"
        );
    }
    let long = format!(
        "/{{target_host}}/{{target_port}}/{}",
        "a".repeat(MAX_TEMPLATE_LEN)
    );
    assert_eq!(UriTemplate::parse(&long), Err(E::TooLong));
    let many = format!(
        "/{{target_host}}/{{target_port}}{}",
        "{a}".repeat(MAX_EXPRESSIONS)
    );
    assert_eq!(UriTemplate::parse(&many), Err(E::TooManyExpressions));
    assert!("/{target_host}/{target_port}"
        .parse::<UriTemplate>()
        .is_ok());
}

#[test]
fn template_accepts() {
    for ok in [
        "/{target_host}/{target_port}",
        "/a%20b/{target_host}/{target_port}",
        "/{var.name,target_host}/{target_port}",
        "/{v%41r}/{target_host}/{target_port}",
        "http://h/{target_host}/{target_port}",
        "coap+tcp://[::1]:5683/{target_host}/{target_port}",
        "https://h:443/x?a=b{&target_host,target_port}",
    ] {
        assert!(UriTemplate::parse(ok).is_ok(), "{ok}");
    }
}

#[test]
fn template_error_display() {
    use TemplateError as E;
    let cases = [
        (
            E::BadCharacter {
                index: 3,
                byte: 0x20,
            },
            "byte 0x20 at offset 3 is not allowed in a URI template",
        ),
        (
            E::DisallowedLiteral { index: 1, ch: '|' },
            "character '|' at offset 1 is not allowed in a URI template literal",
        ),
        (
            E::BadPercentEncoding { index: 2 },
            "bad percent-encoding at offset 2",
        ),
        (
            E::UnclosedExpression { index: 4 },
            "unclosed expression starting at offset 4",
        ),
        (
            E::UnexpectedCloseBrace { index: 5 },
            "unexpected '}' at offset 5",
        ),
        (
            E::EmptyExpression { index: 6 },
            "empty expression or variable at offset 6",
        ),
        (
            E::ForbiddenOperator('+'),
            "operator '+' is not allowed in a UDP proxying template",
        ),
        (E::ReservedOperator('!'), "reserved operator '!'"),
        (
            E::Level4Modifier("x*".into()),
            "variable \"x*\" uses a level 4 modifier",
        ),
        (
            E::BadVariableName("a-b".into()),
            "bad variable name \"a-b\"",
        ),
        (
            E::MissingVariable("target_host"),
            "the template has no target_host variable",
        ),
        (
            E::DuplicateVariable("target_port"),
            "variable target_port appears more than once",
        ),
        (
            E::VariableOutsidePathOrQuery,
            "template variables must be in the path or query",
        ),
        (
            E::PathMustStartWithSlash,
            "the template path must start with '/'",
        ),
        (E::EmptyAuthority, "the template has an empty authority"),
        (E::Fragment, "the template has a fragment"),
        (
            E::TooManyExpressions,
            "the template has more than 16 expressions",
        ),
        (E::TooLong, "the template is longer than 4096 bytes"),
    ];
    for (e, s) in cases {
        assert_eq!(e.to_string(), s);
    }
}

#[test]
fn expand_percent_encodes() {
    let t = UriTemplate::default_template();
    assert_eq!(
        t.expand_path("a b/c%d", 1),
        "/.well-known/masque/udp/a%20b%2Fc%25d/1/"
    );
    assert_eq!(
        t.expand_path("\u{e9}", 1),
        "/.well-known/masque/udp/%C3%A9/1/"
    );
    assert_eq!(
        t.expand_path("fe80::1%eth0", 1),
        "/.well-known/masque/udp/fe80%3A%3A1%25eth0/1/"
    );
    assert_eq!(
        parse_default_path(&t.expand_path("fe80::1%eth0", 1)),
        Err(PathError::ZoneId)
    );
}

// ---- Round trips ---------------------------------------------------------------------

fn host_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){0,3}",
        any::<Ipv4Addr>().prop_map(|a| a.to_string()),
        any::<Ipv6Addr>().prop_map(|a| a.to_string()),
        // Arbitrary text: match_path must give it back even if it is not a valid host.
        "\\PC{1,20}",
    ]
}

fn template_strategy() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        DEFAULT_TEMPLATE,
        "https://proxy.example:443/.well-known/masque/udp/{target_host}/{target_port}/",
        "https://proxy.example.org:4443/masque?h={target_host}&p={target_port}",
        "https://proxy.example.org:4443/masque{?target_host,target_port}",
        "/masque{?target_port,other,target_host}",
        "/m/{target_host,target_port}/x",
        "/m/{target_host}.{target_port}",
        "/m/{a}/{target_port}/{target_host}{?b}",
        "/m?v=1{&target_host}{&target_port}",
    ])
}

proptest! {
    #[test]
    fn expand_then_match(
        template in template_strategy(),
        host in host_strategy(),
        port in any::<u16>(),
    ) {
        let t = UriTemplate::parse(template).unwrap();
        let path = t.expand_path(&host, port);
        prop_assert!(path.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        prop_assert_eq!(t.match_path(&path), Some((host.clone(), port.to_string())));
    }

    #[test]
    fn expand_then_parse_default_path(
        host in prop_oneof![
            "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){0,3}",
            any::<Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<Ipv6Addr>().prop_map(|a| a.to_string()),
        ],
        port in 1u16..,
    ) {
        let t = UriTemplate::default_template();
        let path = t.expand_path(&host, port);
        let target = parse_default_path(&path).unwrap();
        prop_assert_eq!(&target.host_text, &host);
        prop_assert_eq!(target.port, port);
        match target.host {
            TargetHost::Ip(IpAddr::V6(ip)) => {
                prop_assert_eq!(ip.to_string(), host.clone());
                prop_assert_eq!(target.authority(), format!("[{host}]:{port}"));
            }
            TargetHost::Ip(IpAddr::V4(ip)) => prop_assert_eq!(ip.to_string(), host),
            TargetHost::Name(name) => prop_assert_eq!(name, host),
        }
        prop_assert_eq!(t.match_target(&path), parse_default_path(&path));
    }

    #[test]
    fn arbitrary_paths_never_panic(path in "\\PC{0,60}", template in template_strategy()) {
        let _ = parse_default_path(&path);
        let t = UriTemplate::parse(template).unwrap();
        let _ = t.match_path(&path);
        let _ = t.match_target(&path);
    }

    #[test]
    fn arbitrary_templates_never_panic(s in "[ -~]{0,60}") {
        if let Ok(t) = UriTemplate::parse(&s) {
            let p = t.expand_path("h.example", 1);
            prop_assert!(t.match_path(&p).is_some(), "{} -> {}", s, p);
        }
    }
}
