//! QUIC variable-length integers (RFC 9000, section 16).
//!
//! Used for capsule types and lengths, quarter stream ids and context ids.

//= https://www.rfc-editor.org/rfc/rfc9000#section-16
//# QUIC packets and frames commonly use a variable-length encoding for
//# non-negative integer values.  This encoding ensures that smaller integer
//# values need fewer bytes to encode.
//#
//# The QUIC variable-length integer encoding reserves the two most
//# significant bits of the first byte to encode the base-2 logarithm of the
//# integer encoding length in bytes.  The integer value is encoded on the
//# remaining bits, in network byte order.

/// The largest value a variable-length integer can hold: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Why a variable-length integer could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarIntError {
    /// The input is shorter than the encoding announces (decode), or the output is too
    /// short for the encoding (encode).
    #[error("incomplete varint")]
    Incomplete,
    /// The value does not fit in 62 bits.
    #[error("value exceeds 2^62-1")]
    Overflow,
}

//= https://www.rfc-editor.org/rfc/rfc9297#section-1.1
//# Integer values do not need to be encoded on the minimum number of bytes
//# necessary.

/// Decode one variable-length integer from the front of `buf`.
///
/// Returns the value and the number of bytes consumed, or [`VarIntError::Incomplete`] when
/// `buf` is shorter than the encoding announced by its first byte. Non-minimal encodings are
/// accepted, as RFC 9000 allows.
pub fn decode(buf: &[u8]) -> Result<(u64, usize), VarIntError> {
    let first = *buf.first().ok_or(VarIntError::Incomplete)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len).ok_or(VarIntError::Incomplete)?;
    let mut value = u64::from(first & 0x3f);
    for b in bytes.iter().skip(1) {
        value = (value << 8) | u64::from(*b);
    }
    Ok((value, len))
}

/// Number of bytes the minimal encoding of `v` takes: 1, 2, 4 or 8.
///
/// Values larger than [`MAX`] cannot be encoded; for them this returns 8.
pub fn encoded_len(v: u64) -> usize {
    if v < (1 << 6) {
        1
    } else if v < (1 << 14) {
        2
    } else if v < (1 << 30) {
        4
    } else {
        8
    }
}

/// Write the minimal encoding of `v` to the front of `out`; returns the bytes written.
///
/// [`VarIntError::Overflow`] if `v > MAX`; [`VarIntError::Incomplete`] if `out` is too short
/// (nothing is written then).
pub fn encode(v: u64, out: &mut [u8]) -> Result<usize, VarIntError> {
    let mut tmp = [0u8; 8];
    let bytes = to_bytes(v, &mut tmp)?;
    let dst = out.get_mut(..bytes.len()).ok_or(VarIntError::Incomplete)?;
    dst.copy_from_slice(bytes);
    Ok(bytes.len())
}

/// Append the minimal encoding of `v` to `out`.
///
/// [`VarIntError::Overflow`] if `v > MAX`; [`VarIntError::Incomplete`] if `out` has less
/// room left than the encoding needs (nothing is written then).
pub fn put(v: u64, out: &mut impl bytes::BufMut) -> Result<(), VarIntError> {
    let mut tmp = [0u8; 8];
    let bytes = to_bytes(v, &mut tmp)?;
    if out.remaining_mut() < bytes.len() {
        return Err(VarIntError::Incomplete);
    }
    out.put_slice(bytes);
    Ok(())
}

/// Minimal encoding of `v` in `tmp`, returned as the used prefix of `tmp`.
fn to_bytes(v: u64, tmp: &mut [u8; 8]) -> Result<&[u8], VarIntError> {
    if v > MAX {
        return Err(VarIntError::Overflow);
    }
    let len = encoded_len(v);
    // The two high bits of the first byte carry log2(len).
    let prefix: u64 = match len {
        1 => 0b00,
        2 => 0b01,
        4 => 0b10,
        _ => 0b11,
    };
    let shift = (len as u32) * 8 - 2;
    let tagged = v | (prefix << shift);
    let be = tagged.to_be_bytes();
    let start = 8 - len;
    let src = be.get(start..).ok_or(VarIntError::Overflow)?;
    let dst = tmp.get_mut(..len).ok_or(VarIntError::Overflow)?;
    dst.copy_from_slice(src);
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Examples from RFC 9000, appendix A.1.
    #[test]
    fn rfc9000_examples() {
        let cases: &[(&[u8], u64)] = &[
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(decode(bytes), Ok((*value, bytes.len())));
            let mut out = [0u8; 8];
            let n = encode(*value, &mut out).unwrap();
            assert_eq!(&out[..n], *bytes);
        }
        // A non-minimal two-byte encoding of 37 decodes too.
        assert_eq!(decode(&[0x40, 0x25]), Ok((37, 2)));
    }

    #[test]
    fn decode_ignores_trailing_bytes() {
        assert_eq!(decode(&[0x25, 0xff, 0xff]), Ok((37, 1)));
    }

    #[test]
    fn decode_incomplete() {
        assert_eq!(decode(&[]), Err(VarIntError::Incomplete));
        assert_eq!(decode(&[0x40]), Err(VarIntError::Incomplete));
        assert_eq!(decode(&[0x80, 0, 0]), Err(VarIntError::Incomplete));
        assert_eq!(
            decode(&[0xc0, 0, 0, 0, 0, 0, 0]),
            Err(VarIntError::Incomplete)
        );
    }

    #[test]
    fn decode_max() {
        assert_eq!(decode(&[0xff; 8]), Ok((MAX, 8)));
    }

    #[test]
    fn encoded_len_boundaries() {
        assert_eq!(encoded_len(0), 1);
        assert_eq!(encoded_len(63), 1);
        assert_eq!(encoded_len(64), 2);
        assert_eq!(encoded_len(16_383), 2);
        assert_eq!(encoded_len(16_384), 4);
        assert_eq!(encoded_len((1 << 30) - 1), 4);
        assert_eq!(encoded_len(1 << 30), 8);
        assert_eq!(encoded_len(MAX), 8);
        assert_eq!(encoded_len(MAX + 1), 8);
        assert_eq!(encoded_len(u64::MAX), 8);
    }

    #[test]
    fn encode_overflow() {
        let mut out = [0u8; 8];
        assert_eq!(encode(MAX + 1, &mut out), Err(VarIntError::Overflow));
        assert_eq!(encode(u64::MAX, &mut out), Err(VarIntError::Overflow));
        assert_eq!(out, [0u8; 8]);
    }

    #[test]
    fn encode_out_too_short() {
        let mut out = [0u8; 3];
        assert_eq!(encode(16_384, &mut out), Err(VarIntError::Incomplete));
        assert_eq!(out, [0u8; 3]);
        assert_eq!(encode(0, &mut []), Err(VarIntError::Incomplete));
        assert_eq!(encode(16_383, &mut out), Ok(2));
    }

    #[test]
    fn put_appends() {
        let mut v = vec![0xaa];
        put(494_878_333, &mut v).unwrap();
        put(0, &mut v).unwrap();
        assert_eq!(v, [0xaa, 0x9d, 0x7f, 0x3e, 0x7d, 0x00]);
    }

    #[test]
    fn put_errors() {
        let mut v = Vec::new();
        assert_eq!(put(MAX + 1, &mut v), Err(VarIntError::Overflow));
        assert!(v.is_empty());
        let mut arr = [0u8; 1];
        let mut slice: &mut [u8] = &mut arr;
        assert_eq!(put(64, &mut slice), Err(VarIntError::Incomplete));
        assert_eq!(put(63, &mut slice), Ok(()));
        assert_eq!(arr, [63]);
    }

    #[test]
    fn error_display() {
        assert_eq!(VarIntError::Incomplete.to_string(), "incomplete varint");
        assert_eq!(VarIntError::Overflow.to_string(), "value exceeds 2^62-1");
    }

    fn any_value() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..64, 0u64..16_384, 0u64..(1 << 30), 0..=MAX]
    }

    proptest! {
        #[test]
        fn round_trip(v in any_value()) {
            let mut out = [0u8; 8];
            let n = encode(v, &mut out).unwrap();
            prop_assert_eq!(n, encoded_len(v));
            prop_assert_eq!(decode(&out[..n]), Ok((v, n)));
            let mut vec = Vec::new();
            put(v, &mut vec).unwrap();
            prop_assert_eq!(&vec[..], &out[..n]);
            // Any shorter prefix is incomplete.
            for cut in 0..n {
                prop_assert_eq!(decode(&out[..cut]), Err(VarIntError::Incomplete));
            }
        }

        #[test]
        fn too_large_rejected(v in (MAX + 1)..=u64::MAX) {
            let mut out = [0u8; 8];
            prop_assert_eq!(encode(v, &mut out), Err(VarIntError::Overflow));
        }

        #[test]
        fn decode_never_exceeds_max(bytes in proptest::collection::vec(any::<u8>(), 0..10)) {
            if let Ok((v, n)) = decode(&bytes) {
                prop_assert!(v <= MAX);
                prop_assert!(n <= bytes.len());
                prop_assert!([1, 2, 4, 8].contains(&n));
            }
        }
    }
}
