//! Default-template path checks and CONNECT-UDP request validation on arbitrary paths.
#![no_main]

use ferry_proto::request::{validate_connect_udp, RequestHead};
use ferry_proto::template::{parse_default_path, TargetHost, UriTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let parsed = parse_default_path(&path);

    let h3 = RequestHead {
        method: "CONNECT",
        protocol: Some("connect-udp"),
        path: Some(&path),
        authority: Some("proxy.example"),
        scheme: Some("https"),
        capsule_protocol: None,
    };
    let validated = validate_connect_udp(&h3);
    match (&parsed, &validated) {
        (_, Err(r)) if path.is_empty() => assert_eq!(r.status, 400),
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(e), Err(r)) => {
            assert_eq!(r.status, 404);
            assert_eq!(r.details, e.to_string());
            let ps = r.proxy_status();
            assert!(ps.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{ps}");
        }
        other => panic!("disagree on {path:?}: {other:?}"),
    }

    // HTTP/1.1 upgrade with the same path (possibly absolute-form).
    let h1 = RequestHead {
        method: "GET",
        protocol: Some("connect-udp"),
        path: Some(&path),
        authority: Some("proxy.example"),
        scheme: None,
        capsule_protocol: Some("?1"),
    };
    let _ = validate_connect_udp(&h1);

    if let Ok(target) = parsed {
        assert!(target.port >= 1);
        assert!(!target.host_text.is_empty());
        assert!(!target.host_text.contains('%'));
        let authority = target.authority();
        assert!(authority.ends_with(&format!(":{}", target.port)));
        if let TargetHost::Ip(std::net::IpAddr::V6(_)) = target.host {
            assert!(authority.starts_with('['));
        }
        // Expanding the default template with the decoded host gives the same target.
        let again = UriTemplate::default_template().expand_path(&target.host_text, target.port);
        assert_eq!(parse_default_path(&again), Ok(target));
    }
});
