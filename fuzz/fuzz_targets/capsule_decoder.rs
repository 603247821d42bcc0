//! Capsule decoder: arbitrary bytes, split into arbitrary chunks, must never panic, must
//! stay bounded, and must decode the same capsules however the stream is split.
#![no_main]

use bytes::Bytes;
use ferry_proto::capsule::{self, Capsule, CapsuleDecoder, CapsuleError};
use libfuzzer_sys::fuzz_target;

// Input: [max_len selector, chunking seed, stream bytes...].
fuzz_target!(|data: &[u8]| {
    let (Some(&sel), Some(&seed)) = (data.first(), data.get(1)) else {
        return;
    };
    let stream = data.get(2..).unwrap_or_default();
    let max_len = u64::from(sel) * 4;

    // Reference: the whole stream in one push.
    let mut whole = CapsuleDecoder::new(max_len);
    whole.push(Bytes::copy_from_slice(stream));
    let mut reference = Vec::new();
    let mut reference_err = None;
    loop {
        match whole.next() {
            Ok(Some(c)) => reference.push(c),
            Ok(None) => break,
            Err(e) => {
                reference_err = Some(e);
                break;
            }
        }
    }

    // The same stream in chunks whose sizes come from the seed.
    let mut d = CapsuleDecoder::new(max_len);
    let mut got = Vec::new();
    let mut err = None;
    let mut rng = u32::from(seed) | 1;
    let mut at = 0;
    let mut buffered_at_error = 0;
    while at < stream.len() {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let len = (rng as usize % 64).min(stream.len() - at);
        let chunk = &stream[at..at + len];
        at += len;
        d.push(Bytes::copy_from_slice(chunk));
        if err.is_some() {
            // Refused: pushed data is no longer buffered.
            assert!(d.buffered() <= buffered_at_error);
            continue;
        }
        loop {
            match d.next() {
                Ok(Some(c)) => {
                    let p = match &c {
                        Capsule::Datagram(p) => p,
                        Capsule::Unknown {
                            capsule_type,
                            payload,
                        } => {
                            assert_ne!(*capsule_type, capsule::DATAGRAM_CAPSULE_TYPE);
                            payload
                        }
                    };
                    assert!(p.len() as u64 <= max_len);
                    got.push(c);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        matches!(e, CapsuleError::TooLarge { length, limit } if length > limit)
                    );
                    err = Some(e);
                    buffered_at_error = d.buffered();
                    break;
                }
            }
        }
        // Bounded: at most one partial capsule (header + max_len) is kept.
        if err.is_none() {
            assert!(
                d.buffered() <= max_len as usize + 16,
                "buffered {}",
                d.buffered()
            );
        }
    }
    assert_eq!(got, reference);
    assert_eq!(err, reference_err);
    match (&err, d.finish(), whole.finish()) {
        (Some(_), Err(CapsuleError::Truncated), Err(CapsuleError::Truncated)) => {}
        (None, a, b) => assert_eq!(a, b),
        other => panic!("unexpected finish: {other:?}"),
    }

    // Skipping oversized capsules instead of failing also never panics and stays bounded.
    let mut s = CapsuleDecoder::new(max_len);
    for chunk in stream.chunks(7) {
        s.push(Bytes::copy_from_slice(chunk));
        loop {
            match s.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => assert!(s.discard_oversized()),
            }
        }
        assert!(s.buffered() <= max_len as usize + 16);
    }
    let _ = s.finish();

    // Header helpers agree with the decoder.
    if let Ok(Some(h)) = capsule::decode_header(stream) {
        let mut out = Vec::new();
        capsule::encode_header(h.capsule_type, h.length, &mut out).expect("decoded values fit");
        assert_eq!(out.len(), capsule::header_len(h.capsule_type, h.length));
        assert!(out.len() <= h.header_len);
    }
});
