//! The Capsule Protocol (RFC 9297, section 3.2): type-length-value capsules on the
//! request stream, and a bounded streaming decoder for them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::varint::{self, VarIntError};

//= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
//# This document defines the DATAGRAM (0x00) capsule type.
/// Capsule type of the DATAGRAM capsule.
pub const DATAGRAM_CAPSULE_TYPE: u64 = 0x00;

/// Max size of a DATAGRAM capsule header: type (1 byte) + length (up to 8 bytes) = 9 bytes.
///
/// Capsules of other types can have headers of up to 16 bytes.
pub const MAX_HEADER_LEN: usize = 9;

/// A decoded capsule header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsuleHeader {
    /// The Capsule Type field.
    pub capsule_type: u64,
    /// The Capsule Length field: length of the Capsule Value that follows the header.
    pub length: u64,
    /// Bytes taken by the header itself (type + length varints).
    pub header_len: usize,
}

/// Why a capsule stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsuleError {
    /// A capsule declared a length over the decoder's limit. Its payload is not buffered.
    #[error("capsule length {length} exceeds the limit {limit}")]
    TooLarge {
        /// The declared Capsule Length.
        length: u64,
        /// The decoder's limit.
        limit: u64,
    },
    /// The stream ended with a partial capsule.
    #[error("stream ended inside a capsule")]
    Truncated,
}

//= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
//# Capsule {
//#   Capsule Type (i),
//#   Capsule Length (i),
//#   Capsule Value (..),
//# }
/// Decode a capsule header from the front of `buf`; `Ok(None)` means more bytes are needed.
///
/// Any byte sequence long enough forms a valid header (both fields are varints, which cannot
/// be malformed, only incomplete), so this never returns an error today; limits are applied
/// by [`CapsuleDecoder`].
pub fn decode_header(buf: &[u8]) -> Result<Option<CapsuleHeader>, CapsuleError> {
    let Ok((capsule_type, type_len)) = varint::decode(buf) else {
        return Ok(None);
    };
    let rest = buf.get(type_len..).unwrap_or_default();
    let Ok((length, length_len)) = varint::decode(rest) else {
        return Ok(None);
    };
    Ok(Some(CapsuleHeader {
        capsule_type,
        length,
        header_len: type_len + length_len,
    }))
}

/// Bytes taken by the header of a capsule of type `capsule_type` with a `len`-byte value.
pub fn header_len(capsule_type: u64, len: u64) -> usize {
    varint::encoded_len(capsule_type) + varint::encoded_len(len)
}

/// Write a capsule header (type and length varints) for a value of `len` bytes.
///
/// Nothing is written on error: [`VarIntError::Overflow`] if a field exceeds 2^62-1,
/// [`VarIntError::Incomplete`] if `out` has no room for the whole header.
pub fn encode_header(
    capsule_type: u64,
    len: u64,
    out: &mut impl BufMut,
) -> Result<(), VarIntError> {
    if capsule_type > varint::MAX || len > varint::MAX {
        return Err(VarIntError::Overflow);
    }
    if out.remaining_mut() < header_len(capsule_type, len) {
        return Err(VarIntError::Incomplete);
    }
    varint::put(capsule_type, out)?;
    varint::put(len, out)
}

/// Write a whole capsule: header followed by `payload`.
///
/// Nothing is written on error (see [`encode_header`]).
pub fn encode_capsule(
    capsule_type: u64,
    payload: &[u8],
    out: &mut impl BufMut,
) -> Result<(), VarIntError> {
    let len = u64::try_from(payload.len()).map_err(|_| VarIntError::Overflow)?;
    let total = header_len(capsule_type, len).saturating_add(payload.len());
    if capsule_type <= varint::MAX && len <= varint::MAX && out.remaining_mut() < total {
        return Err(VarIntError::Incomplete);
    }
    encode_header(capsule_type, len, out)?;
    out.put_slice(payload);
    Ok(())
}

/// A decoded capsule; its payload is a zero-copy slice of the bytes pushed into the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Capsule {
    /// A DATAGRAM capsule (type 0x00); the payload is an HTTP Datagram payload.
    Datagram(Bytes),
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
    //# Endpoints which receive a Capsule with an unknown Capsule Type MUST silently
    //# drop that Capsule and skip over it to parse the next Capsule.
    /// Any other capsule type. Endpoints drop these; intermediaries may forward them.
    Unknown {
        /// The Capsule Type field.
        capsule_type: u64,
        /// The Capsule Value.
        payload: Bytes,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Decoding capsules.
    Normal,
    /// A capsule over the limit was seen; its header (and any of its payload that had been
    /// buffered) was dropped and `remaining` payload bytes are still to come. Pushed data is
    /// dropped; `desynced` records that this happened.
    Refused {
        length: u64,
        remaining: u64,
        desynced: bool,
    },
    /// Discarding the rest of an oversized capsule as it arrives, without buffering it.
    Skipping { remaining: u64 },
}

/// Streaming capsule decoder over the bytes of a request stream's data stream.
///
/// Bounded: a capsule whose declared length exceeds `max_len` is refused as soon as its
/// header has been seen, without buffering its payload (RFC 9298, section 5). After
/// [`CapsuleError::TooLarge`] the stream is normally aborted; a caller that prefers to skip
/// the capsule and go on can call [`CapsuleDecoder::discard_oversized`].
#[derive(Debug)]
pub struct CapsuleDecoder {
    max_len: u64,
    /// Received bytes when they arrived in one piece (zero-copy); empty when `acc` is used.
    frozen: Bytes,
    /// Received bytes accumulated from several pushes; empty when `frozen` is used.
    acc: BytesMut,
    state: State,
}

impl CapsuleDecoder {
    /// A decoder that refuses capsules whose Capsule Length exceeds `max_len`.
    pub fn new(max_len: u64) -> Self {
        Self {
            max_len,
            frozen: Bytes::new(),
            acc: BytesMut::new(),
            state: State::Normal,
        }
    }

    /// The limit on the Capsule Length this decoder accepts.
    pub fn max_len(&self) -> u64 {
        self.max_len
    }

    /// Append received stream bytes.
    ///
    /// When nothing is buffered, `data` is kept as it is (no copy), so capsules decoded from
    /// it share its memory. After [`CapsuleError::TooLarge`] pushed data is dropped.
    pub fn push(&mut self, mut data: Bytes) {
        match self.state {
            State::Normal => {}
            State::Refused {
                length, remaining, ..
            } => {
                if !data.is_empty() {
                    self.state = State::Refused {
                        length,
                        remaining,
                        desynced: true,
                    };
                }
                return;
            }
            State::Skipping { remaining } => {
                let skip = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                data.advance(skip);
                let left = remaining.saturating_sub(skip as u64);
                if left > 0 {
                    self.state = State::Skipping { remaining: left };
                    return;
                }
                self.state = State::Normal;
            }
        }
        if data.is_empty() {
            return;
        }
        if self.frozen.is_empty() && self.acc.is_empty() {
            self.frozen = data;
        } else if !self.frozen.is_empty() {
            let frozen = std::mem::take(&mut self.frozen);
            self.acc.reserve(frozen.len().saturating_add(data.len()));
            self.acc.extend_from_slice(&frozen);
            self.acc.extend_from_slice(&data);
        } else {
            self.acc.extend_from_slice(&data);
        }
    }

    /// The buffered bytes, wherever they are.
    fn view(&self) -> &[u8] {
        if self.frozen.is_empty() {
            &self.acc
        } else {
            &self.frozen
        }
    }

    /// Drop `n` buffered bytes (at most what is buffered).
    fn consume(&mut self, n: usize) {
        if self.frozen.is_empty() {
            let n = n.min(self.acc.len());
            self.acc.advance(n);
        } else {
            let n = n.min(self.frozen.len());
            self.frozen.advance(n);
        }
    }

    /// Take the first `n` buffered bytes (at most what is buffered) without copying.
    fn take(&mut self, n: usize) -> Bytes {
        if self.frozen.is_empty() {
            let n = n.min(self.acc.len());
            self.acc.split_to(n).freeze()
        } else {
            let n = n.min(self.frozen.len());
            self.frozen.split_to(n)
        }
    }

    /// The next complete capsule: `Ok(None)` if more bytes are needed,
    /// `Err(TooLarge)` (repeatedly) once a capsule over the limit has been seen.
    ///
    /// Allocation-free: the payload is a slice of the pushed bytes.
    #[allow(clippy::should_implement_trait)] // fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<Capsule>, CapsuleError> {
        match self.state {
            State::Normal => {}
            State::Refused { length, .. } => {
                return Err(CapsuleError::TooLarge {
                    length,
                    limit: self.max_len,
                })
            }
            State::Skipping { .. } => return Ok(None),
        }
        let available = self.view().len();
        let Some(header) = decode_header(self.view())? else {
            return Ok(None);
        };
        let too_large = CapsuleError::TooLarge {
            length: header.length,
            limit: self.max_len,
        };
        //= https://www.rfc-editor.org/rfc/rfc9298#section-5
        //# If the discarded HTTP Datagram was transported by a DATAGRAM
        //# capsule, the receiver SHOULD discard that capsule without buffering the
        //# capsule contents.
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
        //# if an incoming
        //# DATAGRAM capsule has a length that is known to be so large as to not be usable,
        //# the implementation SHOULD discard the capsule without buffering its contents
        //# into memory.
        let total = usize::try_from(header.length)
            .ok()
            .and_then(|len| len.checked_add(header.header_len));
        let total = match total {
            Some(total) if header.length <= self.max_len => total,
            _ => {
                // Drop the header and whatever part of the payload is already here.
                let payload_here = available.saturating_sub(header.header_len);
                let dropped = usize::try_from(header.length)
                    .unwrap_or(usize::MAX)
                    .min(payload_here);
                self.consume(header.header_len.saturating_add(dropped));
                self.state = State::Refused {
                    length: header.length,
                    remaining: header.length.saturating_sub(dropped as u64),
                    desynced: false,
                };
                return Err(too_large);
            }
        };
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
        //# When processing capsules, a receiver might be tempted to accumulate the full
        //# length of the capsule value in the data stream before handling it.
        // Ferry does accumulate one capsule (bounded by `max_len`), because a DATAGRAM
        // capsule is one UDP payload that must be sent as a whole.
        if available < total {
            return Ok(None);
        }
        let mut capsule = self.take(total);
        capsule.advance(header.header_len.min(capsule.len()));
        Ok(Some(if header.capsule_type == DATAGRAM_CAPSULE_TYPE {
            Capsule::Datagram(capsule)
        } else {
            Capsule::Unknown {
                capsule_type: header.capsule_type,
                payload: capsule,
            }
        }))
    }

    /// After [`CapsuleError::TooLarge`]: skip the oversized capsule instead of failing, and
    /// go on decoding after it. Its remaining payload is discarded as it arrives, never
    /// buffered.
    ///
    /// Returns false (and changes nothing) if there is no refused capsule, or if data was
    /// pushed after the refusal (those bytes were dropped, so the stream cannot be resynced).
    pub fn discard_oversized(&mut self) -> bool {
        match self.state {
            State::Refused {
                remaining,
                desynced: false,
                ..
            } => {
                self.state = if remaining == 0 {
                    State::Normal
                } else {
                    State::Skipping { remaining }
                };
                true
            }
            _ => false,
        }
    }

    /// Call at the end of the stream: `Err(Truncated)` if part of a capsule remains.
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
    //# If the receive side of a stream carrying capsules is terminated cleanly (for
    //# example, in HTTP/3 this is defined as receiving a QUIC STREAM frame with the FIN
    //# bit set) and the last capsule on the stream was truncated, this MUST be treated
    //# as if it were a malformed or incomplete message.
    pub fn finish(&self) -> Result<(), CapsuleError> {
        match self.state {
            State::Normal if self.buffered() == 0 => Ok(()),
            _ => Err(CapsuleError::Truncated),
        }
    }

    /// Bytes currently buffered (for bounding memory).
    pub fn buffered(&self) -> usize {
        self.frozen.len().saturating_add(self.acc.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn capsule_bytes(capsule_type: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_capsule(capsule_type, payload, &mut v).unwrap();
        v
    }

    #[test]
    fn decode_header_complete_and_incomplete() {
        assert_eq!(decode_header(&[]), Ok(None));
        assert_eq!(decode_header(&[0x00]), Ok(None));
        assert_eq!(decode_header(&[0x00, 0x40]), Ok(None));
        assert_eq!(
            decode_header(&[0x00, 0x08, 0x00]),
            Ok(Some(CapsuleHeader {
                capsule_type: 0,
                length: 8,
                header_len: 2
            }))
        );
        assert_eq!(
            decode_header(&[0x80, 0, 0x01, 0x00, 0x41, 0x00]),
            Ok(Some(CapsuleHeader {
                capsule_type: 0x0100,
                length: 0x100,
                header_len: 6
            }))
        );
        // Non-minimal encodings are fine.
        assert_eq!(
            decode_header(&[0x40, 0x00, 0x40, 0x01]),
            Ok(Some(CapsuleHeader {
                capsule_type: 0,
                length: 1,
                header_len: 4
            }))
        );
    }

    #[test]
    fn header_encoding() {
        let mut v = Vec::new();
        encode_header(0, 8, &mut v).unwrap();
        assert_eq!(v, [0x00, 0x08]);
        assert_eq!(header_len(0, 8), 2);
        assert_eq!(header_len(0, varint::MAX), MAX_HEADER_LEN);
        assert_eq!(header_len(0x17, 64), 3);
        let mut v = Vec::new();
        assert_eq!(
            encode_header(varint::MAX + 1, 0, &mut v),
            Err(VarIntError::Overflow)
        );
        assert_eq!(
            encode_header(0, varint::MAX + 1, &mut v),
            Err(VarIntError::Overflow)
        );
        assert!(v.is_empty());
        let mut arr = [0u8; 2];
        let mut slice: &mut [u8] = &mut arr;
        assert_eq!(
            encode_header(0, 64, &mut slice),
            Err(VarIntError::Incomplete)
        );
        assert_eq!(arr, [0, 0], "nothing written on error");
    }

    #[test]
    fn encode_capsule_errors() {
        let mut arr = [0u8; 4];
        let mut slice: &mut [u8] = &mut arr;
        assert_eq!(
            encode_capsule(0, &[1, 2, 3], &mut slice),
            Err(VarIntError::Incomplete)
        );
        assert_eq!(arr, [0; 4]);
        let mut v = Vec::new();
        assert_eq!(
            encode_capsule(varint::MAX + 1, &[1], &mut v),
            Err(VarIntError::Overflow)
        );
        assert!(v.is_empty());
    }

    // Envoy's scenario: `00 08 00 a1..a7` is one DATAGRAM capsule carrying context 0 and
    // seven bytes of UDP payload.
    #[test]
    fn envoy_capsule() {
        let mut d = CapsuleDecoder::new(65_535);
        d.push(Bytes::from_static(&[
            0x00, 0x08, 0x00, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
        ]));
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(&[
                0x00, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7
            ]))))
        );
        assert_eq!(d.next(), Ok(None));
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(d.max_len(), 65_535);
    }

    #[test]
    fn zero_copy_when_pushed_whole() {
        let data = Bytes::from(capsule_bytes(0, b"hello"));
        let base = data.as_ptr() as usize;
        let mut d = CapsuleDecoder::new(100);
        d.push(data);
        let Ok(Some(Capsule::Datagram(p))) = d.next() else {
            panic!("expected a datagram")
        };
        assert_eq!(&p[..], b"hello");
        assert_eq!(
            p.as_ptr() as usize,
            base + 2,
            "payload shares the pushed memory"
        );
    }

    #[test]
    fn incomplete_then_complete() {
        let bytes = capsule_bytes(0, b"abc");
        let mut d = CapsuleDecoder::new(100);
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(d.next(), Ok(None), "after {i} bytes");
            assert_eq!(
                d.finish(),
                if i == 0 {
                    Ok(())
                } else {
                    Err(CapsuleError::Truncated)
                }
            );
            d.push(Bytes::copy_from_slice(&[*b]));
        }
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(b"abc"))))
        );
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn zero_length_capsules() {
        let mut d = CapsuleDecoder::new(0);
        d.push(Bytes::from_static(&[0x00, 0x00, 0x17, 0x00, 0x00, 0x00]));
        assert_eq!(d.next(), Ok(Some(Capsule::Datagram(Bytes::new()))));
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Unknown {
                capsule_type: 0x17,
                payload: Bytes::new()
            }))
        );
        assert_eq!(d.next(), Ok(Some(Capsule::Datagram(Bytes::new()))));
        assert_eq!(d.next(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn unknown_types_returned_as_unknown() {
        // 0x29 * N + 0x17 are reserved "grease" types; 0x3f00 a two-byte type.
        let mut stream = capsule_bytes(0x29 * 3 + 0x17, b"grease");
        stream.extend(capsule_bytes(0x3f00, b"x"));
        stream.extend(capsule_bytes(0, b"d"));
        let mut d = CapsuleDecoder::new(100);
        d.push(Bytes::from(stream));
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Unknown {
                capsule_type: 0x29 * 3 + 0x17,
                payload: Bytes::from_static(b"grease")
            }))
        );
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Unknown {
                capsule_type: 0x3f00,
                payload: Bytes::from_static(b"x")
            }))
        );
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(b"d"))))
        );
        assert_eq!(d.next(), Ok(None));
    }

    // "Malformed" lives one layer up: the capsule framing itself cannot be malformed, but
    // a DATAGRAM capsule whose payload has no complete context id is.
    #[test]
    fn malformed_datagram_payload_is_visible() {
        let mut d = CapsuleDecoder::new(100);
        d.push(Bytes::from_static(&[0x00, 0x00, 0x00, 0x01, 0x40]));
        let Ok(Some(Capsule::Datagram(p))) = d.next() else {
            panic!("expected a datagram")
        };
        assert_eq!(
            crate::datagram::split_context_id(p),
            Err(crate::datagram::DatagramError::MalformedContextId)
        );
        let Ok(Some(Capsule::Datagram(p))) = d.next() else {
            panic!("expected a datagram")
        };
        assert_eq!(
            crate::datagram::split_context_id(p),
            Err(crate::datagram::DatagramError::MalformedContextId)
        );
    }

    #[test]
    fn too_large_refused_after_header_only() {
        let mut d = CapsuleDecoder::new(65_535);
        let mut header = Vec::new();
        encode_header(0, 1 << 30, &mut header).unwrap();
        assert_eq!(header.len(), 9);
        d.push(Bytes::from(header));
        let err = CapsuleError::TooLarge {
            length: 1 << 30,
            limit: 65_535,
        };
        assert_eq!(d.next(), Err(err.clone()));
        assert_eq!(d.buffered(), 0);
        // Further data is not buffered, the error sticks.
        d.push(Bytes::from(vec![0u8; 1 << 20]));
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.next(), Err(err.clone()));
        assert_eq!(d.finish(), Err(CapsuleError::Truncated));
        assert!(!d.discard_oversized(), "desynced: data was dropped");
        assert_eq!(
            err.to_string(),
            "capsule length 1073741824 exceeds the limit 65535"
        );
        assert_eq!(
            CapsuleError::Truncated.to_string(),
            "stream ended inside a capsule"
        );
    }

    #[test]
    fn too_large_with_payload_already_pushed() {
        let mut d = CapsuleDecoder::new(4);
        let mut stream = capsule_bytes(0, b"0123456789");
        stream.extend(capsule_bytes(0, b"ok"));
        d.push(Bytes::from(stream));
        assert_eq!(
            d.next(),
            Err(CapsuleError::TooLarge {
                length: 10,
                limit: 4
            })
        );
        // The oversized capsule is gone; the next one is still buffered.
        assert_eq!(d.buffered(), 4);
        assert!(d.discard_oversized());
        assert!(!d.discard_oversized());
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(b"ok"))))
        );
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn discard_oversized_skips_without_buffering() {
        let mut d = CapsuleDecoder::new(16);
        let mut header = Vec::new();
        encode_header(0x17, 1000, &mut header).unwrap();
        d.push(Bytes::from(header));
        assert!(matches!(d.next(), Err(CapsuleError::TooLarge { .. })));
        assert!(d.discard_oversized());
        for _ in 0..9 {
            d.push(Bytes::from(vec![0xee; 100]));
            assert_eq!(d.buffered(), 0);
            assert_eq!(d.next(), Ok(None));
            assert_eq!(d.finish(), Err(CapsuleError::Truncated));
        }
        // The last 100 bytes of the skipped capsule arrive with the next capsule.
        let mut tail = vec![0xee; 100];
        tail.extend(capsule_bytes(0, b"after"));
        d.push(Bytes::from(tail));
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(b"after"))))
        );
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn discard_oversized_without_refusal() {
        let mut d = CapsuleDecoder::new(16);
        assert!(!d.discard_oversized());
        d.push(Bytes::from_static(&[0x00, 0x01, 0xaa]));
        assert!(!d.discard_oversized());
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(&[0xaa]))))
        );
    }

    #[test]
    fn limit_is_inclusive() {
        let mut d = CapsuleDecoder::new(3);
        d.push(Bytes::from(capsule_bytes(0, b"abc")));
        assert_eq!(
            d.next(),
            Ok(Some(Capsule::Datagram(Bytes::from_static(b"abc"))))
        );
        d.push(Bytes::from(capsule_bytes(0, b"abcd")));
        assert_eq!(
            d.next(),
            Err(CapsuleError::TooLarge {
                length: 4,
                limit: 3
            })
        );
    }

    #[test]
    fn finish_truncated_variants() {
        let mut d = CapsuleDecoder::new(100);
        assert_eq!(d.finish(), Ok(()));
        d.push(Bytes::from_static(&[0x00]));
        assert_eq!(d.finish(), Err(CapsuleError::Truncated));
        d.push(Bytes::from_static(&[0x05, 1, 2]));
        assert_eq!(d.next(), Ok(None));
        assert_eq!(d.buffered(), 4);
        assert_eq!(d.finish(), Err(CapsuleError::Truncated));
        d.push(Bytes::from_static(&[3, 4, 5]));
        assert!(d.next().unwrap().is_some());
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn empty_push_is_noop() {
        let mut d = CapsuleDecoder::new(100);
        d.push(Bytes::new());
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.next(), Ok(None));
        d.push(Bytes::from_static(&[0x00]));
        d.push(Bytes::new());
        assert_eq!(d.buffered(), 1);
    }

    fn any_capsule() -> impl Strategy<Value = (u64, Vec<u8>)> {
        (
            prop_oneof![Just(0u64), 0..=varint::MAX, 1u64..100],
            proptest::collection::vec(any::<u8>(), 0..300),
        )
    }

    proptest! {
        #[test]
        fn round_trip_split_anywhere(
            capsules in proptest::collection::vec(any_capsule(), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut stream = Vec::new();
            for (t, p) in &capsules {
                let before = stream.len();
                encode_header(*t, p.len() as u64, &mut stream).unwrap();
                prop_assert_eq!(stream.len() - before, header_len(*t, p.len() as u64));
                stream.extend_from_slice(p);
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut d = CapsuleDecoder::new(300);
            let mut got = Vec::new();
            for w in points.windows(2) {
                d.push(Bytes::copy_from_slice(&stream[w[0]..w[1]]));
                while let Some(c) = d.next().unwrap() {
                    got.push(c);
                }
                prop_assert!(d.buffered() <= 300 + 16 + (w[1] - w[0]));
            }
            d.finish().unwrap();
            prop_assert_eq!(got.len(), capsules.len());
            for (c, (t, p)) in got.into_iter().zip(capsules) {
                match c {
                    Capsule::Datagram(b) => {
                        prop_assert_eq!(t, 0);
                        prop_assert_eq!(&b[..], &p[..]);
                    }
                    Capsule::Unknown { capsule_type, payload } => {
                        prop_assert_eq!(capsule_type, t);
                        prop_assert_ne!(t, 0);
                        prop_assert_eq!(&payload[..], &p[..]);
                    }
                }
            }
        }

        #[test]
        fn truncated_stream_detected(
            (t, p) in any_capsule(),
            cut in any::<prop::sample::Index>(),
        ) {
            let stream = capsule_bytes(t, &p);
            let cut = cut.index(stream.len()); // strictly shorter
            prop_assume!(cut > 0);
            let mut d = CapsuleDecoder::new(300);
            d.push(Bytes::copy_from_slice(&stream[..cut]));
            prop_assert_eq!(d.next(), Ok(None));
            prop_assert_eq!(d.finish(), Err(CapsuleError::Truncated));
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
            max_len in 0u64..64,
        ) {
            let mut d = CapsuleDecoder::new(max_len);
            for c in chunks {
                d.push(Bytes::from(c));
                loop {
                    match d.next() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => {
                            d.discard_oversized();
                            if d.next().is_err() { break; }
                        }
                    }
                }
                prop_assert!(d.buffered() <= 40 + max_len as usize + 16);
            }
            let _ = d.finish();
        }
    }
}
