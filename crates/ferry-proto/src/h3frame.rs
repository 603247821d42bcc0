//! Bounding what an HTTP/3 stack buffers for a peer, without buffering anything here: a
//! [`FrameGuard`] follows the frame structure of one received stream (RFC 9114 section 7.1:
//! type and length varints, then the payload) as its bytes go by, and refuses a frame
//! before its payload is read when a library that decodes non-DATA frames whole would
//! have to hold more than the limits below.
//!
//! - On a request stream, the bytes up to the end of the first HEADERS frame (the request
//!   head, and any unknown frames before it) may not exceed [`MAX_REQUEST_HEAD_BYTES`], and
//!   a HEADERS frame announcing more than [`MAX_REQUEST_HEADERS_BYTES`] is refused on its
//!   length alone.
//! - Every later non-DATA frame on a request stream, and every frame on the control stream,
//!   may carry at most [`MAX_BUFFERED_FRAME_BYTES`].
//! - DATA payloads pass unbounded; so do unidirectional streams other than the control
//!   stream (their contents are not frames).
//!
//! The runtime side (`ferry::h3limit`) wraps h3's streams with it and turns a refusal into
//! 431, STOP_SENDING or a connection error.

/// The largest encoded request header block accepted (HTTP/3 `max_field_section_size` too).
pub const MAX_REQUEST_HEADERS_BYTES: u64 = 60 * 1024;

/// The most a request stream may carry before its request head is complete (the HEADERS
/// frame and any unknown frames before it, frame headers included): the header limit plus
/// room for frame headers and reserved (grease) frames.
pub const MAX_REQUEST_HEAD_BYTES: u64 = MAX_REQUEST_HEADERS_BYTES + 4096;

/// The largest payload of any frame h3 would buffer whole (every type but DATA).
pub const MAX_BUFFERED_FRAME_BYTES: u64 = MAX_REQUEST_HEADERS_BYTES;

/// RFC 9114 section 7.2: frame types.
pub const FRAME_DATA: u64 = 0x0;
/// RFC 9114 section 7.2.2.
pub const FRAME_HEADERS: u64 = 0x1;
/// WebTransport's bidirectional stream signal: a session id follows, then unframed bytes.
const FRAME_WEBTRANSPORT_BI: u64 = 0x41;
/// RFC 9114 section 6.2.1: the control stream's type.
pub const STREAM_TYPE_CONTROL: u64 = 0x0;

/// Why a stream was refused. It travels to the reader inside h3's
/// `StreamErrorIncoming::Unknown`; [`FrameTooLarge::is_request_head`] picks out requests
/// whose head was too large (answered 431).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge {
    /// The refused bytes were part of a request head.
    pub request_head: bool,
    pub frame_type: u64,
    /// The frame's announced payload length, or the request head's bytes so far.
    pub len: u64,
    /// How many bytes of the chunk given to [`FrameGuard::inspect`] come before the refused
    /// frame: whole frames, which the reader may still pass on (0 when the refused frame
    /// began in an earlier chunk). A request head and an oversized frame after it can
    /// arrive in one read; the head is then answered like any other.
    pub accepted: usize,
}

impl std::fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.request_head {
            write!(
                f,
                "request head too large: {} bytes (frame type {:#x}), limit {}",
                self.len, self.frame_type, MAX_REQUEST_HEAD_BYTES
            )
        } else {
            write!(
                f,
                "HTTP/3 frame type {:#x} of {} bytes, over the {} byte limit",
                self.frame_type, self.len, MAX_BUFFERED_FRAME_BYTES
            )
        }
    }
}

impl std::error::Error for FrameTooLarge {}

impl FrameTooLarge {
    /// Whether `err` (an error h3 returned from a request stream's first frame) is the
    /// guard refusing a request head.
    pub fn is_request_head(err: &(dyn std::error::Error + 'static)) -> bool {
        err.downcast_ref::<FrameTooLarge>()
            .is_some_and(|e| e.request_head)
    }
}

/// A QUIC varint being read a byte at a time.
#[derive(Debug, Default, Clone, Copy)]
struct VarInt {
    value: u64,
    /// Bytes still to read; 0 before the first byte.
    left: u8,
    started: bool,
}

impl VarInt {
    /// Take one byte; the value once complete.
    fn push(&mut self, b: u8) -> Option<u64> {
        if !self.started {
            self.started = true;
            self.left = (1u8 << (b >> 6)) - 1;
            self.value = u64::from(b & 0x3f);
        } else {
            self.value = (self.value << 8) | u64::from(b);
            self.left -= 1;
        }
        (self.left == 0).then_some(self.value)
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A unidirectional stream's type.
    StreamType(VarInt),
    FrameType(VarInt),
    FrameLen {
        ty: u64,
        len: VarInt,
    },
    Payload {
        ty: u64,
        left: u64,
    },
    /// Bytes with no frames to follow (a unidirectional stream other than control; a
    /// WebTransport stream, which h3 refuses anyway): passed through.
    Unframed,
}

/// Where a stream stands with its request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Request stream, head not complete: bytes seen so far.
    Pending(u64),
    Done,
    /// Not a request stream.
    None,
}

/// Tracks the frame structure of one received stream, refusing frames h3 would buffer
/// past the limits. Holds no data.
#[derive(Debug, Clone, Copy)]
pub struct FrameGuard {
    phase: Phase,
    head: Head,
}

impl FrameGuard {
    /// For a client-initiated bidirectional (request) stream.
    pub fn request() -> Self {
        FrameGuard {
            phase: Phase::FrameType(VarInt::default()),
            head: Head::Pending(0),
        }
    }

    /// For a unidirectional stream: its type decides (only the control stream has
    /// frames h3 buffers).
    pub fn unidirectional() -> Self {
        FrameGuard {
            phase: Phase::StreamType(VarInt::default()),
            head: Head::None,
        }
    }

    /// Look at the next bytes of the stream.
    pub fn inspect(&mut self, data: &[u8]) -> Result<(), FrameTooLarge> {
        let mut boundary = 0;
        self.inspect_from(data, &mut boundary)
            .map_err(|e| FrameTooLarge {
                accepted: boundary,
                ..e
            })
    }

    /// `inspect`, noting in `boundary` where in `data` the latest frame began.
    fn inspect_from(&mut self, data: &[u8], boundary: &mut usize) -> Result<(), FrameTooLarge> {
        let mut i = 0;
        while i < data.len() {
            let before = i;
            if let Phase::FrameType(v) = &self.phase {
                if !v.started {
                    *boundary = i;
                }
            }
            match &mut self.phase {
                Phase::Unframed => return Ok(()),
                Phase::Payload { ty, left } => {
                    let take = (data.len() - i).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    i += take;
                    *left -= take as u64;
                    if *left == 0 {
                        let ty = *ty;
                        self.count(take)?;
                        self.frame_done(ty);
                        continue;
                    }
                }
                Phase::StreamType(v) => {
                    i += 1;
                    if let Some(ty) = v.push(data[before]) {
                        self.phase = if ty == STREAM_TYPE_CONTROL {
                            Phase::FrameType(VarInt::default())
                        } else {
                            Phase::Unframed
                        };
                    }
                }
                Phase::FrameType(v) => {
                    i += 1;
                    if let Some(ty) = v.push(data[before]) {
                        self.phase = Phase::FrameLen {
                            ty,
                            len: VarInt::default(),
                        };
                    }
                }
                Phase::FrameLen { ty, len } => {
                    i += 1;
                    if let Some(len) = len.push(data[before]) {
                        let ty = *ty;
                        self.count(i - before)?;
                        self.frame_start(ty, len)?;
                        continue;
                    }
                }
            }
            self.count(i - before)?;
        }
        Ok(())
    }

    /// Count bytes against the request head's budget while it is pending.
    fn count(&mut self, n: usize) -> Result<(), FrameTooLarge> {
        if let Head::Pending(seen) = &mut self.head {
            *seen += n as u64;
            if *seen > MAX_REQUEST_HEAD_BYTES {
                let ty = match self.phase {
                    Phase::Payload { ty, .. } | Phase::FrameLen { ty, .. } => ty,
                    _ => FRAME_HEADERS,
                };
                return Err(FrameTooLarge {
                    request_head: true,
                    frame_type: ty,
                    len: *seen,
                    accepted: 0,
                });
            }
        }
        Ok(())
    }

    fn frame_start(&mut self, ty: u64, len: u64) -> Result<(), FrameTooLarge> {
        let request = self.head != Head::None;
        if request && ty == FRAME_WEBTRANSPORT_BI {
            self.phase = Phase::Unframed;
            return Ok(());
        }
        // DATA is streamed by h3, never buffered whole (on the control stream it is a
        // connection error h3 raises without reading the payload).
        if ty != FRAME_DATA {
            let pending = matches!(self.head, Head::Pending(_));
            if pending && ty == FRAME_HEADERS && len > MAX_REQUEST_HEADERS_BYTES {
                return Err(FrameTooLarge {
                    request_head: true,
                    frame_type: ty,
                    len,
                    accepted: 0,
                });
            }
            if len > MAX_BUFFERED_FRAME_BYTES {
                return Err(FrameTooLarge {
                    request_head: pending,
                    frame_type: ty,
                    len,
                    accepted: 0,
                });
            }
        }
        if len == 0 {
            self.frame_done(ty);
        } else {
            self.phase = Phase::Payload { ty, left: len };
        }
        Ok(())
    }

    fn frame_done(&mut self, ty: u64) {
        if ty == FRAME_HEADERS && matches!(self.head, Head::Pending(_)) {
            self.head = Head::Done;
        }
        self.phase = Phase::FrameType(VarInt::default());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn varint(v: u64) -> Vec<u8> {
        match v {
            0..=63 => vec![v as u8],
            64..=16383 => (0x4000 | v as u16).to_be_bytes().to_vec(),
            16384..=1_073_741_823 => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
            _ => (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec(),
        }
    }

    fn frame_header(ty: u64, len: u64) -> Vec<u8> {
        let mut b = varint(ty);
        b.extend(varint(len));
        b
    }

    /// Feed `data` one byte at a time and in one piece; both must agree.
    fn feed(guard: FrameGuard, data: &[u8]) -> Result<(), FrameTooLarge> {
        let mut whole = guard;
        let a = whole.inspect(data);
        let mut bytewise = guard;
        let b = data.iter().try_for_each(|b| bytewise.inspect(&[*b]));
        // The same verdict; a head's byte count may differ (a chunk is counted whole).
        let verdict = |r: &Result<(), FrameTooLarge>| r.map_err(|e| (e.request_head, e.frame_type));
        assert_eq!(verdict(&a), verdict(&b));
        a
    }

    #[test]
    fn headers_at_the_limit_then_unbounded_data_pass() {
        let limit = MAX_REQUEST_HEADERS_BYTES;
        let mut s = frame_header(0x21, 5); // reserved (grease) frame first
        s.extend([0; 5]);
        s.extend(frame_header(FRAME_HEADERS, limit));
        s.extend(vec![0; limit as usize]);
        s.extend(frame_header(FRAME_DATA, 1 << 20));
        s.extend(vec![0; 1 << 20]);
        s.extend(frame_header(FRAME_HEADERS, 100)); // trailers
        s.extend([0; 100]);
        feed(FrameGuard::request(), &s).unwrap();
    }

    #[test]
    fn oversized_headers_are_refused_on_their_length() {
        let s = frame_header(FRAME_HEADERS, 8 << 20);
        let e = feed(FrameGuard::request(), &s).unwrap_err();
        assert!(e.request_head);
        assert_eq!((e.frame_type, e.len), (FRAME_HEADERS, 8 << 20));
        let e = feed(
            FrameGuard::request(),
            &frame_header(FRAME_HEADERS, MAX_REQUEST_HEADERS_BYTES + 1),
        )
        .unwrap_err();
        assert!(FrameTooLarge::is_request_head(&e));
    }

    #[test]
    fn many_small_frames_before_the_head_are_bounded() {
        let mut s = Vec::new();
        while s.len() as u64 <= MAX_REQUEST_HEAD_BYTES {
            s.extend(frame_header(0x21, 1000));
            s.extend([0; 1000]);
        }
        let e = feed(FrameGuard::request(), &s).unwrap_err();
        assert!(e.request_head);
        assert!(e.len > MAX_REQUEST_HEAD_BYTES);
    }

    #[test]
    fn oversized_frames_after_the_head_are_refused() {
        let mut s = frame_header(FRAME_HEADERS, 10);
        s.extend([0; 10]);
        let mut unknown = s.clone();
        unknown.extend(frame_header(0x21, 1 << 40));
        let e = feed(FrameGuard::request(), &unknown).unwrap_err();
        assert!(!e.request_head);
        assert_eq!((e.frame_type, e.len), (0x21, 1 << 40));
        s.extend(frame_header(FRAME_HEADERS, MAX_BUFFERED_FRAME_BYTES + 1));
        assert!(!feed(FrameGuard::request(), &s).unwrap_err().request_head);
    }

    #[test]
    fn control_stream_frames_are_bounded_other_streams_pass() {
        let mut control = varint(STREAM_TYPE_CONTROL);
        control.extend(frame_header(0x4, 6)); // SETTINGS
        control.extend([0; 6]);
        feed(FrameGuard::unidirectional(), &control).unwrap();
        control.extend(frame_header(0x21, 1 << 30));
        let e = feed(FrameGuard::unidirectional(), &control).unwrap_err();
        assert!(!e.request_head);
        let mut encoder = varint(0x2);
        encoder.extend(frame_header(FRAME_HEADERS, 1 << 30));
        feed(FrameGuard::unidirectional(), &encoder).unwrap();
    }

    #[test]
    fn a_refusal_says_which_whole_frames_of_the_chunk_came_before_it() {
        let mut head = frame_header(FRAME_HEADERS, 10);
        head.extend([0; 10]);
        let mut grease = frame_header(0x21, 2);
        grease.extend([0; 2]);
        let oversized = frame_header(0x21, 8 << 20);
        // Head, a small frame and the oversized one in one read: the first two may pass.
        let chunk = [head.clone(), grease.clone(), oversized.clone()].concat();
        let e = FrameGuard::request().inspect(&chunk).unwrap_err();
        assert!(!e.request_head);
        assert_eq!(e.accepted, head.len() + grease.len());
        // The oversized frame's first byte in the head's read, the rest in the next one:
        // nothing of the second read comes before it.
        let mut g = FrameGuard::request();
        let mut first = head.clone();
        first.push(oversized[0]);
        g.inspect(&first).unwrap();
        assert_eq!(g.inspect(&oversized[1..]).unwrap_err().accepted, 0);
        // On the control stream, the stream type and SETTINGS come before it.
        let mut control = varint(STREAM_TYPE_CONTROL);
        control.extend(frame_header(0x4, 0));
        let n = control.len();
        control.extend(&oversized);
        let e = FrameGuard::unidirectional().inspect(&control).unwrap_err();
        assert_eq!(e.accepted, n);
    }
}
