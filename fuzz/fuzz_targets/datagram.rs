//! HTTP/3 datagram and UDP proxying payload parsing: never panics, the `&[u8]` and `Bytes`
//! variants agree, and re-encoding what was decoded gives it back.
#![no_main]

use bytes::Bytes;
use ferry_proto::capsule::{Capsule, CapsuleDecoder};
use ferry_proto::datagram::{self, UdpProxyingPayload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The input as an HTTP Datagram payload on its own (e.g. from a DATAGRAM capsule).
    let slice = datagram::decode_udp_payload(data);
    let bytes = datagram::split_context_id(Bytes::copy_from_slice(data));
    match (&slice, &bytes) {
        (Ok(UdpProxyingPayload::Udp(p)), Ok((0, b))) => assert_eq!(*p, &b[..]),
        (Ok(UdpProxyingPayload::OtherContext(c)), Ok((c2, _))) => {
            assert_eq!(c, c2);
            assert_ne!(*c, datagram::CONTEXT_ID_UDP);
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        other => panic!("slice and Bytes parsing disagree: {other:?}"),
    }

    // The input as a QUIC DATAGRAM frame payload.
    let Ok((quarter, rest)) = datagram::decode_h3(data) else {
        return;
    };
    assert!(quarter <= datagram::MAX_QUARTER_STREAM_ID);
    let stream_id = quarter * 4;
    let Ok(UdpProxyingPayload::Udp(udp)) = datagram::decode_udp_payload(rest) else {
        return;
    };

    // Re-encode as an HTTP/3 datagram.
    let hl = datagram::h3_header_len(stream_id);
    let mut buf = vec![0u8; hl + udp.len()];
    assert_eq!(datagram::write_h3_udp_header(stream_id, &mut buf), hl);
    buf[hl..].copy_from_slice(udp);
    let (q2, rest2) = datagram::decode_h3(&buf).expect("re-encoded datagram decodes");
    assert_eq!(q2, quarter);
    assert_eq!(
        datagram::decode_udp_payload(rest2),
        Ok(UdpProxyingPayload::Udp(udp))
    );
    // A buffer one byte short is refused without writing.
    if hl > 0 {
        let mut short = vec![0xaa; hl - 1];
        assert_eq!(datagram::write_h3_udp_header(stream_id, &mut short), 0);
        assert!(short.iter().all(|b| *b == 0xaa));
    }

    // Re-encode as a DATAGRAM capsule and decode it with the capsule decoder.
    let chl = datagram::capsule_header_len(udp.len());
    let mut cap = vec![0u8; chl + udp.len()];
    assert_eq!(datagram::write_capsule_udp_header(udp.len(), &mut cap), chl);
    cap[chl..].copy_from_slice(udp);
    let mut d = CapsuleDecoder::new(datagram::MAX_UDP_DATAGRAM_CAPSULE_LEN);
    d.push(Bytes::from(cap));
    match d.next() {
        Ok(Some(Capsule::Datagram(p))) => {
            assert_eq!(
                datagram::split_context_id(p).map(|(c, b)| (c, b.to_vec())),
                Ok((0, udp.to_vec()))
            );
        }
        other => panic!("capsule round trip failed: {other:?}"),
    }
    assert_eq!(d.finish(), Ok(()));
});
