//! URI templates: parse, expand and match arbitrary strings; never panics, and a path
//! expanded from a known template matches back to the same values.
#![no_main]

use ferry_proto::template::{parse_default_path, UriTemplate};
use libfuzzer_sys::fuzz_target;

const KNOWN: &[&str] = &[
    "/.well-known/masque/udp/{target_host}/{target_port}/",
    "https://proxy.example.org:4443/masque?h={target_host}&p={target_port}",
    "https://proxy.example.org:4443/masque{?target_host,target_port}",
    "/m/{target_host,target_port}/x",
    "/m/{a}/{target_port}/{target_host}{?b}",
];

// Input: "template \n host \n path" (missing parts are empty).
fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let mut it = s.splitn(3, '\n');
    let template = it.next().unwrap_or_default();
    let host = it.next().unwrap_or_default();
    let path = it.next().unwrap_or_default();
    let port = (data.len() as u16).wrapping_mul(257);

    if let Ok(t) = UriTemplate::parse(template) {
        assert!(template.contains("target_host") && template.contains("target_port"));
        let expanded = t.expand_path(host, port);
        assert!(expanded.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        let _ = t.expand(host, port);
        let _ = t.match_path(&expanded);
        let _ = t.match_path(path);
        let _ = t.match_target(path);
        let _ = t.match_target(&expanded);
        assert_eq!(t.to_string(), template);
    }

    // Known templates must give the values back.
    for known in KNOWN {
        let t = UriTemplate::parse(known).expect("known template parses");
        let expanded = t.expand_path(host, port);
        assert_eq!(
            t.match_path(&expanded),
            Some((host.to_string(), port.to_string())),
            "{known} {expanded}"
        );
        if t.is_default() {
            assert_eq!(t.match_target(&expanded), parse_default_path(&expanded));
        }
    }
});
