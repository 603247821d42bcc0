//! HTTP/3 datagram framing (RFC 9297, section 2.1) and the UDP proxying payload format
//! (RFC 9298, section 5).
//!
//! Everything here is allocation-free: decoding returns slices of the input, encoding
//! writes headers into caller-provided buffers.

use bytes::{Buf, Bytes};

use crate::capsule::DATAGRAM_CAPSULE_TYPE;
use crate::varint;

//= https://www.rfc-editor.org/rfc/rfc9298#section-5
//# UDP packets are encoded using HTTP Datagrams with the Context ID field set to
//# zero.
/// Context ID of UDP payloads.
pub const CONTEXT_ID_UDP: u64 = 0;

//= https://www.rfc-editor.org/rfc/rfc9298#section-5
//# By virtue of the definition of the UDP header {{UDP}}, it is not possible to
//# encode UDP payloads longer than 65527 bytes.
/// Largest UDP payload (RFC 9298, section 5).
pub const MAX_UDP_PAYLOAD: usize = 65527;

/// Largest DATAGRAM capsule value that can carry a legal UDP payload: the payload plus a
/// context id varint of up to 8 bytes. A suitable `max_len` for
/// [`crate::capsule::CapsuleDecoder`] when only UDP payloads are expected.
pub const MAX_UDP_DATAGRAM_CAPSULE_LEN: u64 = MAX_UDP_PAYLOAD as u64 + 8;

//= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
//# The largest legal QUIC stream ID value is 2<sup>62</sup>-1,
//# so the largest legal value of Quarter Stream ID is 2<sup>60</sup>-1.
/// Largest legal Quarter Stream ID.
pub const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// Why an HTTP/3 datagram or HTTP Datagram payload could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The datagram is too short to hold the Quarter Stream ID varint
    /// (an H3_DATAGRAM_ERROR connection error).
    #[error("malformed quarter stream id")]
    MalformedQuarterStreamId,
    /// The HTTP Datagram payload is too short to hold the Context ID varint.
    #[error("malformed context id")]
    MalformedContextId,
    /// The Quarter Stream ID is over 2^60-1 (an H3_DATAGRAM_ERROR connection error).
    #[error("quarter stream id beyond 2^60-1")]
    QuarterStreamIdTooLarge,
}

//= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
//# HTTP/3 Datagram {
//#   Quarter Stream ID (i),
//#   HTTP Datagram Payload (..),
//# }
/// Split an HTTP/3 datagram (the payload of a QUIC DATAGRAM frame) into its Quarter Stream
/// ID and HTTP Datagram payload. The stream id is `quarter_stream_id * 4`.
pub fn decode_h3(buf: &[u8]) -> Result<(u64, &[u8]), DatagramError> {
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# Receipt of a QUIC DATAGRAM frame whose payload is too short to allow parsing the
    //# Quarter Stream ID field MUST be treated as an HTTP/3 connection error of type
    //# H3_DATAGRAM_ERROR (0x33).
    let (quarter_stream_id, n) =
        varint::decode(buf).map_err(|_| DatagramError::MalformedQuarterStreamId)?;
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# Receipt of
    //# an HTTP/3 Datagram that includes a larger value MUST be treated as an HTTP/3
    //# connection error of type H3_DATAGRAM_ERROR (0x33).
    if quarter_stream_id > MAX_QUARTER_STREAM_ID {
        return Err(DatagramError::QuarterStreamIdTooLarge);
    }
    let payload = buf
        .get(n..)
        .ok_or(DatagramError::MalformedQuarterStreamId)?;
    Ok((quarter_stream_id, payload))
}

/// What an HTTP Datagram payload of a CONNECT-UDP stream carries.
#[derive(Debug, PartialEq, Eq)]
pub enum UdpProxyingPayload<'a> {
    /// Context ID 0: a UDP payload (possibly empty).
    Udp(&'a [u8]),
    //= https://www.rfc-editor.org/rfc/rfc9298#section-5
    //# If an HTTP/3 Datagram that carries an unknown Context ID is
    //# received, the receiver SHALL either drop that datagram silently or buffer it
    //# temporarily (on the order of a round trip) while awaiting the registration of
    //# the corresponding Context ID.
    /// Any other Context ID; Ferry registers none, so these are dropped.
    OtherContext(u64),
}

//= https://www.rfc-editor.org/rfc/rfc9298#section-5
//# UDP Proxying HTTP Datagram Payload {
//#   Context ID (i),
//#   UDP Proxying Payload (..),
//# }
/// Parse the Context ID of an HTTP Datagram payload; context 0 carries a UDP payload.
///
/// The UDP payload length is not checked here; RFC 9298 requires aborting the stream when a
/// context-0 payload exceeds [`MAX_UDP_PAYLOAD`], which the caller does.
pub fn decode_udp_payload(
    http_datagram_payload: &[u8],
) -> Result<UdpProxyingPayload<'_>, DatagramError> {
    let (context_id, n) =
        varint::decode(http_datagram_payload).map_err(|_| DatagramError::MalformedContextId)?;
    if context_id != CONTEXT_ID_UDP {
        return Ok(UdpProxyingPayload::OtherContext(context_id));
    }
    let udp = http_datagram_payload
        .get(n..)
        .ok_or(DatagramError::MalformedContextId)?;
    Ok(UdpProxyingPayload::Udp(udp))
}

/// [`decode_udp_payload`] on `Bytes`, zero-copy: `(context_id, rest)`.
pub fn split_context_id(mut payload: Bytes) -> Result<(u64, Bytes), DatagramError> {
    let (context_id, n) =
        varint::decode(&payload).map_err(|_| DatagramError::MalformedContextId)?;
    if n > payload.len() {
        return Err(DatagramError::MalformedContextId);
    }
    payload.advance(n);
    Ok((context_id, payload))
}

/// Bytes needed in front of a UDP payload to make an HTTP/3 datagram for `stream_id`:
/// the Quarter Stream ID varint plus Context ID 0 (one byte).
pub fn h3_header_len(stream_id: u64) -> usize {
    varint::encoded_len(stream_id / 4) + 1
}

/// Write the Quarter Stream ID (`stream_id / 4`) and Context ID 0 into the front of `out`,
/// which must be at least [`h3_header_len`] long; returns the bytes written.
///
/// Returns 0 and writes nothing if `out` is too short.
pub fn write_h3_udp_header(stream_id: u64, out: &mut [u8]) -> usize {
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# A variable-length integer that contains the value of the client-initiated
    //# bidirectional stream that this datagram is associated with, divided by four
    let quarter_stream_id = stream_id / 4;
    if out.len() < h3_header_len(stream_id) {
        return 0;
    }
    // u64::MAX / 4 == varint::MAX, so this cannot overflow; the length was checked above.
    let Ok(n) = varint::encode(quarter_stream_id, out) else {
        return 0;
    };
    match out.get_mut(n) {
        Some(b) => {
            *b = 0; // Context ID 0, one byte.
            n + 1
        }
        None => 0,
    }
}

/// Bytes needed in front of a `payload_len`-byte UDP payload for a DATAGRAM capsule:
/// capsule type 0, the length varint (of `payload_len + 1`) and Context ID 0.
pub fn capsule_header_len(payload_len: usize) -> usize {
    let value_len = (payload_len as u64).saturating_add(1);
    varint::encoded_len(DATAGRAM_CAPSULE_TYPE) + varint::encoded_len(value_len) + 1
}

/// Write the DATAGRAM capsule header for a `payload_len`-byte UDP payload into the front of
/// `out`; returns the bytes written ([`capsule_header_len`]).
///
/// Returns 0 and writes nothing if `out` is too short or the length cannot be encoded.
pub fn write_capsule_udp_header(payload_len: usize, out: &mut [u8]) -> usize {
    let value_len = (payload_len as u64).saturating_add(1);
    let total = capsule_header_len(payload_len);
    if value_len > varint::MAX || out.len() < total {
        return 0;
    }
    let mut written = 0;
    for v in [DATAGRAM_CAPSULE_TYPE, value_len, CONTEXT_ID_UDP] {
        let Some(dst) = out.get_mut(written..) else {
            return 0;
        };
        match varint::encode(v, dst) {
            Ok(n) => written += n,
            Err(_) => return 0,
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decode_h3_examples() {
        assert_eq!(decode_h3(&[0x00, 0x00, 0xa1]), Ok((0, &[0x00, 0xa1][..])));
        assert_eq!(decode_h3(&[0x01]), Ok((1, &[][..])));
        assert_eq!(decode_h3(&[0x40, 0x40, 7]), Ok((64, &[7][..])));
        assert_eq!(decode_h3(&[]), Err(DatagramError::MalformedQuarterStreamId));
        assert_eq!(
            decode_h3(&[0x40]),
            Err(DatagramError::MalformedQuarterStreamId)
        );
        assert_eq!(
            decode_h3(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok((MAX_QUARTER_STREAM_ID, &[][..]))
        );
        assert_eq!(
            decode_h3(&[0xd0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DatagramError::QuarterStreamIdTooLarge)
        );
        assert_eq!(
            decode_h3(&[0xff; 8]),
            Err(DatagramError::QuarterStreamIdTooLarge)
        );
    }

    #[test]
    fn udp_payload_contexts() {
        assert_eq!(
            decode_udp_payload(&[0x00, 1, 2, 3]),
            Ok(UdpProxyingPayload::Udp(&[1, 2, 3]))
        );
        assert_eq!(
            decode_udp_payload(&[0x00]),
            Ok(UdpProxyingPayload::Udp(&[]))
        );
        // Non-minimal encoding of context 0.
        assert_eq!(
            decode_udp_payload(&[0x40, 0x00, 9]),
            Ok(UdpProxyingPayload::Udp(&[9]))
        );
        assert_eq!(
            decode_udp_payload(&[0x01, 1, 2]),
            Ok(UdpProxyingPayload::OtherContext(1))
        );
        assert_eq!(
            decode_udp_payload(&[0x80, 0, 0x10, 0]),
            Ok(UdpProxyingPayload::OtherContext(0x1000))
        );
        assert_eq!(
            decode_udp_payload(&[]),
            Err(DatagramError::MalformedContextId)
        );
        assert_eq!(
            decode_udp_payload(&[0xc0, 0]),
            Err(DatagramError::MalformedContextId)
        );
    }

    #[test]
    fn split_context_id_zero_copy() {
        let b = Bytes::from_static(&[0x00, 0xa1, 0xa2]);
        let base = b.as_ptr() as usize;
        let (ctx, rest) = split_context_id(b).unwrap();
        assert_eq!(ctx, 0);
        assert_eq!(&rest[..], &[0xa1, 0xa2]);
        assert_eq!(rest.as_ptr() as usize, base + 1);
        assert_eq!(
            split_context_id(Bytes::from_static(&[0x41, 0x00])),
            Ok((0x100, Bytes::new()))
        );
        assert_eq!(
            split_context_id(Bytes::new()),
            Err(DatagramError::MalformedContextId)
        );
        assert_eq!(
            split_context_id(Bytes::from_static(&[0x80, 1])),
            Err(DatagramError::MalformedContextId)
        );
    }

    #[test]
    fn h3_header() {
        assert_eq!(h3_header_len(0), 2);
        assert_eq!(h3_header_len(4 * 63), 2);
        assert_eq!(h3_header_len(4 * 64), 3);
        let mut out = [0xffu8; 10];
        assert_eq!(write_h3_udp_header(0, &mut out), 2);
        assert_eq!(&out[..2], &[0, 0]);
        assert_eq!(write_h3_udp_header(4 * 64, &mut out), 3);
        assert_eq!(&out[..3], &[0x40, 0x40, 0]);
        // Too short: nothing written.
        let mut short = [0xffu8; 2];
        assert_eq!(write_h3_udp_header(4 * 64, &mut short), 0);
        assert_eq!(short, [0xff, 0xff]);
        assert_eq!(write_h3_udp_header(0, &mut []), 0);
        // Any u64 stream id fits: u64::MAX / 4 == varint::MAX.
        let mut out = [0u8; 9];
        assert_eq!(write_h3_udp_header(u64::MAX, &mut out), 9);
        assert_eq!(varint::decode(&out), Ok((varint::MAX, 8)));
        // ... but a receiver refuses it: such stream ids are not legal.
        assert_eq!(decode_h3(&out), Err(DatagramError::QuarterStreamIdTooLarge));
    }

    #[test]
    fn capsule_header() {
        assert_eq!(capsule_header_len(7), 3);
        assert_eq!(capsule_header_len(62), 3);
        assert_eq!(capsule_header_len(63), 4);
        assert_eq!(capsule_header_len(MAX_UDP_PAYLOAD), 6);
        let mut out = [0xffu8; 8];
        // Envoy's scenario: 7-byte payload -> 00 08 00.
        assert_eq!(write_capsule_udp_header(7, &mut out), 3);
        assert_eq!(&out[..3], &[0x00, 0x08, 0x00]);
        assert_eq!(write_capsule_udp_header(63, &mut out), 4);
        assert_eq!(&out[..4], &[0x00, 0x40, 0x40, 0x00]);
        let mut short = [0xffu8; 3];
        assert_eq!(write_capsule_udp_header(63, &mut short), 0);
        assert_eq!(short, [0xff; 3]);
        assert_eq!(write_capsule_udp_header(usize::MAX, &mut out), 0);
    }

    #[test]
    fn constants() {
        assert_eq!(CONTEXT_ID_UDP, 0);
        assert_eq!(MAX_UDP_PAYLOAD, 65_527);
        assert_eq!(MAX_QUARTER_STREAM_ID, (1u64 << 60) - 1);
    }

    #[test]
    fn error_display() {
        assert_eq!(
            DatagramError::MalformedQuarterStreamId.to_string(),
            "malformed quarter stream id"
        );
        assert_eq!(
            DatagramError::MalformedContextId.to_string(),
            "malformed context id"
        );
        assert_eq!(
            DatagramError::QuarterStreamIdTooLarge.to_string(),
            "quarter stream id beyond 2^60-1"
        );
    }

    proptest! {
        #[test]
        fn h3_round_trip(
            quarter in prop_oneof![0u64..100, 0..=MAX_QUARTER_STREAM_ID],
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let stream_id = quarter * 4; // up to 2^62 - 4
            let hl = h3_header_len(stream_id);
            let mut buf = vec![0u8; hl + payload.len()];
            prop_assert_eq!(write_h3_udp_header(stream_id, &mut buf), hl);
            buf[hl..].copy_from_slice(&payload);
            let (q, rest) = decode_h3(&buf).unwrap();
            prop_assert_eq!(q * 4, stream_id);
            prop_assert_eq!(decode_udp_payload(rest), Ok(UdpProxyingPayload::Udp(&payload[..])));
            let (ctx, udp) = split_context_id(Bytes::copy_from_slice(rest)).unwrap();
            prop_assert_eq!(ctx, CONTEXT_ID_UDP);
            prop_assert_eq!(&udp[..], &payload[..]);
        }

        #[test]
        fn capsule_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let hl = capsule_header_len(payload.len());
            let mut buf = vec![0u8; hl + payload.len()];
            prop_assert_eq!(write_capsule_udp_header(payload.len(), &mut buf), hl);
            buf[hl..].copy_from_slice(&payload);
            let mut d = crate::capsule::CapsuleDecoder::new(MAX_UDP_DATAGRAM_CAPSULE_LEN);
            d.push(Bytes::from(buf));
            let Some(crate::capsule::Capsule::Datagram(p)) = d.next().unwrap() else {
                panic!("expected a datagram capsule");
            };
            prop_assert_eq!(decode_udp_payload(&p), Ok(UdpProxyingPayload::Udp(&payload[..])));
            prop_assert_eq!(d.finish(), Ok(()));
        }

        #[test]
        fn arbitrary_input_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok((q, rest)) = decode_h3(&buf) {
                prop_assert!(q <= MAX_QUARTER_STREAM_ID);
                let _ = decode_udp_payload(rest);
            }
            let _ = split_context_id(Bytes::from(buf));
        }
    }
}
