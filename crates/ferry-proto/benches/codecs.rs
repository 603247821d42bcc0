//! Micro-benchmarks of the per-datagram codecs and the per-request checks.
//!
//! `cargo bench -p ferry-proto` (add `-- --quick` for a short run). Throughput is reported
//! per element (one varint, one datagram, one capsule, one request).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry_proto::capsule::{self, Capsule, CapsuleDecoder};
use ferry_proto::datagram::{self, MAX_UDP_DATAGRAM_CAPSULE_LEN};
use ferry_proto::request::{validate_connect_udp, RequestHead};
use ferry_proto::varint;

const PAYLOAD: usize = 1200;

fn varints(c: &mut Criterion) {
    let mut g = c.benchmark_group("varint");
    let values = [37u64, 15_293, 494_878_333, 151_288_809_941_952_652];
    let mut encoded = Vec::new();
    for v in values {
        let mut b = [0u8; 8];
        let n = varint::encode(v, &mut b).unwrap_or(0);
        encoded.extend_from_slice(&b[..n]);
    }
    g.throughput(Throughput::Elements(values.len() as u64));
    g.bench_function("decode_1_2_4_8_bytes", |b| {
        b.iter(|| {
            let mut buf = black_box(&encoded[..]);
            let mut sum = 0u64;
            while let Ok((v, n)) = varint::decode(buf) {
                sum = sum.wrapping_add(v);
                buf = &buf[n..];
            }
            sum
        })
    });
    g.bench_function("encode_1_2_4_8_bytes", |b| {
        let mut out = [0u8; 32];
        b.iter(|| {
            let mut at = 0;
            for v in black_box(values) {
                at += varint::encode(v, &mut out[at..]).unwrap_or(0);
            }
            at
        })
    });
    g.finish();
}

/// The demux path: QUIC DATAGRAM frame -> quarter stream id, context id, UDP payload.
fn h3_datagrams(c: &mut Criterion) {
    let mut g = c.benchmark_group("h3_datagram");
    g.throughput(Throughput::Elements(1));
    let stream_id = 4 * 1000; // a two-byte quarter stream id
    let mut frame = vec![0u8; datagram::h3_header_len(stream_id) + PAYLOAD];
    let n = datagram::write_h3_udp_header(stream_id, &mut frame);
    let frame = Bytes::from(frame);
    g.bench_function("decode_1200B", |b| {
        b.iter(|| {
            let dg = black_box(&frame);
            let (qsid, payload) = datagram::decode_h3(dg).unwrap_or((0, &[]));
            let header_len = dg.len() - payload.len();
            let (ctx, udp) =
                datagram::split_context_id(dg.slice(header_len..)).unwrap_or((1, Bytes::new()));
            (qsid, ctx, udp.len())
        })
    });
    g.bench_function("write_header_in_place", |b| {
        let mut buf = [0u8; 16];
        b.iter(|| datagram::write_h3_udp_header(black_box(stream_id), &mut buf))
    });
    assert_eq!(n, 3);
    g.finish();
}

fn capsule_stream(count: usize) -> Bytes {
    let mut body = vec![0u8; PAYLOAD + 1]; // context id 0 + payload
    body[1] = 0xab;
    let mut out = BytesMut::new();
    for _ in 0..count {
        let _ = capsule::encode_capsule(capsule::DATAGRAM_CAPSULE_TYPE, &body, &mut out);
    }
    out.freeze()
}

/// The capsule path: request-stream bytes -> DATAGRAM capsules -> UDP payloads.
fn capsules(c: &mut Criterion) {
    let mut g = c.benchmark_group("capsule");
    const COUNT: usize = 64;
    let stream = capsule_stream(COUNT);
    g.throughput(Throughput::Elements(COUNT as u64));
    // Whole capsules in one chunk, as when a QUIC packet's worth of stream data arrives.
    g.bench_function("decode_64x1200B_one_chunk", |b| {
        b.iter_batched(
            || stream.clone(),
            |s| {
                let mut d = CapsuleDecoder::new(MAX_UDP_DATAGRAM_CAPSULE_LEN);
                d.push(s);
                let mut n = 0;
                while let Ok(Some(Capsule::Datagram(p))) = d.next() {
                    if let Ok((0, udp)) = datagram::split_context_id(p) {
                        n += udp.len();
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    // Chunks that split capsules (and their headers) at arbitrary points.
    let chunks: Vec<Bytes> = {
        let mut v = Vec::new();
        let mut at = 0;
        let sizes = [1000usize, 7, 1350, 1, 2];
        let mut i = 0;
        while at < stream.len() {
            let n = sizes[i % sizes.len()].min(stream.len() - at);
            v.push(stream.slice(at..at + n));
            at += n;
            i += 1;
        }
        v
    };
    g.bench_function("decode_64x1200B_split_chunks", |b| {
        b.iter_batched(
            || chunks.clone(),
            |chunks| {
                let mut d = CapsuleDecoder::new(MAX_UDP_DATAGRAM_CAPSULE_LEN);
                let mut n = 0;
                for c in chunks {
                    d.push(c);
                    while let Ok(Some(Capsule::Datagram(p))) = d.next() {
                        n += p.len();
                    }
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("write_udp_header_in_place", |b| {
        let mut buf = [0u8; 16];
        b.iter(|| datagram::write_capsule_udp_header(black_box(PAYLOAD), &mut buf))
    });
    g.finish();
}

/// Once per tunnel: the CONNECT-UDP request check and the path's target.
fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    for (name, path) in [
        ("ipv4", "/.well-known/masque/udp/192.0.2.6/443/"),
        ("ipv6", "/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/"),
        (
            "hostname",
            "/.well-known/masque/udp/target.example.com/5353/",
        ),
    ] {
        g.bench_function(format!("validate_{name}"), |b| {
            b.iter(|| {
                let head = RequestHead {
                    method: "CONNECT",
                    protocol: Some("connect-udp"),
                    path: Some(black_box(path)),
                    authority: Some("proxy.example:443"),
                    scheme: Some("https"),
                    capsule_protocol: Some("?1"),
                };
                validate_connect_udp(&head).map(|t| t.port).unwrap_or(0)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, varints, h3_datagrams, capsules, requests);
criterion_main!(benches);
