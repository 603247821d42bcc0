//! DNS response decoding: never panics, whatever the bytes; every address it returns is
//! of the family asked for.
#![no_main]

use ferry_proto::dns::{self, TYPE_A, TYPE_AAAA};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = match data {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    for qtype in [TYPE_A, TYPE_AAAA] {
        if let Ok(r) = dns::decode_response(data, id, qtype) {
            assert!(r.rcode < 16);
            assert!(r.addrs.len() <= data.len() / 4);
            for (ip, ttl) in r.addrs {
                assert_eq!(ip.is_ipv4(), qtype == TYPE_A);
                assert!(ttl <= i32::MAX as u32);
            }
        }
    }
});
