//! Envoy's CONNECT-UDP test scenarios that live at the protocol layer, written against the
//! public API the way the runtime uses it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::{Bytes, BytesMut};
use ferry_proto::capsule::{Capsule, CapsuleDecoder, CapsuleError};
use ferry_proto::datagram::{self, UdpProxyingPayload, MAX_UDP_DATAGRAM_CAPSULE_LEN};
use ferry_proto::request::{validate_connect_udp, RequestHead};
use ferry_proto::template::TargetHost;

/// What a terminating proxy does with the client's request stream: every DATAGRAM capsule
/// with context id 0 becomes one UDP payload; anything else is dropped; a malformed context
/// id is a stream error.
fn client_to_target(stream: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
    let mut decoder = CapsuleDecoder::new(MAX_UDP_DATAGRAM_CAPSULE_LEN);
    let mut udp = Vec::new();
    for chunk in stream {
        decoder.push(Bytes::copy_from_slice(chunk));
        while let Some(capsule) = decoder.next().map_err(|e| e.to_string())? {
            match capsule {
                Capsule::Datagram(payload) => {
                    let (context_id, p) =
                        datagram::split_context_id(payload).map_err(|e| e.to_string())?;
                    if context_id == datagram::CONTEXT_ID_UDP {
                        udp.push(p.to_vec());
                    }
                }
                Capsule::Unknown { .. } => {}
            }
        }
    }
    decoder.finish().map_err(|e| e.to_string())?;
    Ok(udp)
}

/// What the proxy sends back for one UDP payload from the target, as a capsule.
fn target_to_client_capsule(udp: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; datagram::capsule_header_len(udp.len()) + udp.len()];
    let n = datagram::write_capsule_udp_header(udp.len(), &mut buf);
    buf[n..].copy_from_slice(udp);
    buf
}

const A: [u8; 7] = [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];
const B: [u8; 7] = [0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7];

#[test]
fn exchange_capsules_both_ways() {
    let mut capsule_in = vec![0x00, 0x08, 0x00];
    capsule_in.extend_from_slice(&A);
    assert_eq!(client_to_target(&[&capsule_in]).unwrap(), vec![A.to_vec()]);
    // Byte by byte, too.
    let bytes: Vec<&[u8]> = capsule_in.chunks(1).collect();
    assert_eq!(client_to_target(&bytes).unwrap(), vec![A.to_vec()]);

    let mut capsule_out = vec![0x00, 0x08, 0x00];
    capsule_out.extend_from_slice(&B);
    assert_eq!(target_to_client_capsule(&B), capsule_out);
}

#[test]
fn exchange_over_h3_datagrams() {
    // Client -> proxy on request stream 8: quarter stream id 2, context 0.
    let mut frame = vec![0x02, 0x00];
    frame.extend_from_slice(&A);
    let (quarter, payload) = datagram::decode_h3(&frame).unwrap();
    assert_eq!(quarter * 4, 8);
    assert_eq!(
        datagram::decode_udp_payload(payload).unwrap(),
        UdpProxyingPayload::Udp(&A)
    );
    // Proxy -> client: header written in front of the payload, no allocation per datagram.
    let mut out = BytesMut::zeroed(datagram::h3_header_len(8) + B.len());
    let n = datagram::write_h3_udp_header(8, &mut out);
    out[n..].copy_from_slice(&B);
    assert_eq!(
        &out[..],
        &[0x02, 0x00, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7]
    );
}

#[test]
fn unknown_capsule_type_and_context_id_1_produce_no_udp() {
    let unknown_type = [0x17, 0x03, 0x00, 0xaa, 0xbb];
    let context_1 = [0x00, 0x03, 0x01, 0xaa, 0xbb];
    assert_eq!(
        client_to_target(&[&unknown_type]).unwrap(),
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(
        client_to_target(&[&context_1]).unwrap(),
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(
        datagram::decode_udp_payload(&[0x01, 0xaa]).unwrap(),
        UdpProxyingPayload::OtherContext(1)
    );
}

#[test]
fn malformed_capsule_or_leftover_bytes_reset_the_stream() {
    // A DATAGRAM capsule with a truncated context id varint.
    assert_eq!(
        client_to_target(&[&[0x00, 0x01, 0x40]]),
        Err("malformed context id".to_string())
    );
    // Leftover bytes when the stream ends.
    assert_eq!(
        client_to_target(&[&[0x00, 0x08, 0x00, 0xa1]]),
        Err(CapsuleError::Truncated.to_string())
    );
    // A capsule too large to be a UDP payload is refused after its header.
    let mut decoder = CapsuleDecoder::new(MAX_UDP_DATAGRAM_CAPSULE_LEN);
    decoder.push(Bytes::from_static(&[0x00, 0xc0, 0, 0, 0, 0x40, 0, 0, 0]));
    assert!(matches!(decoder.next(), Err(CapsuleError::TooLarge { .. })));
    assert_eq!(decoder.buffered(), 0);
}

fn head(path: &str) -> RequestHead<'_> {
    RequestHead {
        method: "CONNECT",
        protocol: Some("connect-udp"),
        path: Some(path),
        authority: Some("proxy.example"),
        scheme: Some("https"),
        capsule_protocol: None, // Envoy: works without capsule-protocol.
    }
}

#[test]
fn request_scenarios() {
    let ok = |p: &str| validate_connect_udp(&head(p)).unwrap();
    let status = |p: &str| validate_connect_udp(&head(p)).unwrap_err().status;

    let t = ok("/.well-known/masque/udp/foo.lyft.com/80/");
    assert_eq!(t.authority(), "foo.lyft.com:80"); // the virtual host domain Envoy matches
    let t = ok("/.well-known/masque/udp/10.0.0.1/80/");
    assert_eq!(t.host, TargetHost::Ip("10.0.0.1".parse().unwrap()));
    let t = ok("/.well-known/masque/udp/2001:0db8:85a3::8a2e:0370:7334/80/");
    assert_eq!(t.authority(), "[2001:0db8:85a3::8a2e:0370:7334]:80");

    assert_eq!(status("/.well-known/masque/udp/fe80::a%25ee1/80/"), 404);
    assert_eq!(status("/masque/udp/foo.lyft.com/80/"), 404);
    assert_eq!(status("/.well-known/masque/udp//80/"), 404);
    assert_eq!(status("/.well-known/masque/udp/foo.lyft.com//"), 404);

    let r = validate_connect_udp(&head("/.well-known/masque/udp/foo.lyft.com/0/")).unwrap_err();
    assert_eq!(
        r.proxy_status(),
        r#"ferry; error=http_request_error; details="bad target_port \"0\"""#
    );
}
