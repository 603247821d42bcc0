//! Ferry's CONNECT-UDP protocol core (RFC 9297 HTTP Datagrams and the Capsule Protocol,
//! RFC 9298 Proxying UDP in HTTP).
//!
//! No I/O, no clock, no async runtime: bytes and request heads in, decoded values, encoded
//! bytes and typed rejections out.
//!
//! * [`varint`]: QUIC variable-length integers (RFC 9000, section 16).
//! * [`capsule`]: capsule headers and a bounded streaming capsule decoder.
//! * [`datagram`]: HTTP/3 datagram framing and the UDP proxying payload (context ids).
//! * [`template`]: URI templates and the default-template path check Envoy applies.
//! * [`request`]: CONNECT-UDP request validation -> target or rejection.
//! * [`h3frame`]: a bound on the HTTP/3 frames a peer can make a library buffer.
//!
//! ```
//! use bytes::Bytes;
//! use ferry_proto::capsule::{Capsule, CapsuleDecoder};
//! use ferry_proto::datagram::{self, MAX_UDP_DATAGRAM_CAPSULE_LEN};
//! use ferry_proto::request::{validate_connect_udp, RequestHead};
//!
//! let head = RequestHead {
//!     method: "CONNECT",
//!     protocol: Some("connect-udp"),
//!     path: Some("/.well-known/masque/udp/192.0.2.6/443/"),
//!     authority: Some("proxy.example"),
//!     scheme: Some("https"),
//!     capsule_protocol: Some("?1"),
//! };
//! let target = validate_connect_udp(&head).map_err(|r| r.proxy_status())?;
//! assert_eq!(target.authority(), "192.0.2.6:443");
//!
//! // Request stream bytes -> UDP payloads.
//! let mut decoder = CapsuleDecoder::new(MAX_UDP_DATAGRAM_CAPSULE_LEN);
//! decoder.push(Bytes::from_static(&[0x00, 0x04, 0x00, b'a', b'b', b'c']));
//! while let Some(capsule) = decoder.next()? {
//!     if let Capsule::Datagram(payload) = capsule {
//!         let (context_id, udp) = datagram::split_context_id(payload)?;
//!         assert_eq!((context_id, &udp[..]), (0, &b"abc"[..]));
//!     }
//! }
//! decoder.finish()?;
//!
//! // UDP payload -> HTTP/3 datagram for request stream 4.
//! let mut frame = vec![0u8; datagram::h3_header_len(4) + 3];
//! let n = datagram::write_h3_udp_header(4, &mut frame);
//! frame[n..].copy_from_slice(b"xyz");
//! assert_eq!(frame, [0x01, 0x00, b'x', b'y', b'z']);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod capsule;
pub mod datagram;
pub mod dns;
pub mod h3frame;
pub mod request;
pub mod template;
pub mod varint;
