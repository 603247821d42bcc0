//! The HTTP/3 frame guard: never panics, its verdict does not depend on how the stream is
//! cut into reads (whole, byte by byte, or at the chunk sizes the input seeds), and the
//! part of a read a refusal lets through passes on its own.
#![no_main]

use ferry_proto::h3frame::{
    FrameGuard, FrameTooLarge, MAX_BUFFERED_FRAME_BYTES, MAX_REQUEST_HEADERS_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// Feed `data` in chunks whose sizes come from `cuts` (cycled; 0 means 1 byte).
fn feed(mut guard: FrameGuard, data: &[u8], cuts: &[u8]) -> Result<(), FrameTooLarge> {
    let mut rest = data;
    let mut k = 0;
    while !rest.is_empty() {
        let n = cuts
            .get(k % cuts.len().max(1))
            .map_or(rest.len(), |c| usize::from(*c).max(1));
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        let before = guard;
        if let Err(e) = guard.inspect(chunk) {
            // What the refusal lets through of this read passes on its own.
            let mut prefix = before;
            let accepted = chunk.get(..e.accepted).expect("accepted within the read");
            assert!(prefix.inspect(accepted).is_ok(), "{e}");
            return Err(e);
        }
        rest = tail;
        k += 1;
    }
    Ok(())
}

fuzz_target!(|input: &[u8]| {
    // [kind, ncuts, cuts..., stream...]
    let Some((&kind, input)) = input.split_first() else {
        return;
    };
    let Some((&ncuts, input)) = input.split_first() else {
        return;
    };
    let (cuts, data) = input.split_at(usize::from(ncuts % 16).min(input.len()));
    let guard = if kind & 1 == 0 {
        FrameGuard::request()
    } else {
        FrameGuard::unidirectional()
    };
    let whole = feed(guard, data, &[]);
    let bytewise = feed(guard, data, &[1]);
    let chunked = feed(guard, data, cuts);
    // The same verdict whatever the reads (a head's byte count may differ: a read is
    // counted whole).
    let verdict = |r: &Result<(), FrameTooLarge>| r.map_err(|e| (e.request_head, e.frame_type));
    assert_eq!(verdict(&whole), verdict(&bytewise));
    assert_eq!(verdict(&whole), verdict(&chunked));
    if let Err(e) = whole {
        // A refusal names a frame, or a request head, over its limit.
        let limit = if e.request_head {
            MAX_REQUEST_HEADERS_BYTES
        } else {
            MAX_BUFFERED_FRAME_BYTES
        };
        assert!(e.len > limit, "{e}");
    }
    // Fewer than two bytes cannot hold a frame header, so nothing can be refused yet.
    if data.len() < 2 {
        assert!(whole.is_ok());
    }
});
