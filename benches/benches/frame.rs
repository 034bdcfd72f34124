//! Benchmarks of the binary frame codec: encode and decode (with CRC32C) in ns per frame and
//! bytes per second, for small, typical and large payloads.
//!
//! Measured in CPU time of the benchmark thread, not wall time: on a machine shared with other
//! builds, wall time mostly measures how often the thread was descheduled.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kefu_benches::CpuTime;
use kefu_protocol::frame::{self, Header, Kind};
use std::hint::black_box;

const PAYLOAD_LENS: [usize; 4] = [0, 208, 1024, 16 * 1024];

fn header() -> Header {
    let mut h = Header::new(Kind::Message, (3u64 << 48) | 77, 12, 1_700_000_000_000_000);
    h.log_offset = 123_456;
    h
}

fn encode(c: &mut Criterion<CpuTime>) {
    let mut g = c.benchmark_group("frame_encode");
    for len in PAYLOAD_LENS {
        let payload = vec![b'x'; len];
        let h = header();
        let mut out = Vec::with_capacity(frame::HEADER_LEN + len);
        g.throughput(Throughput::Bytes((frame::HEADER_LEN + len) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &payload, |b, p| {
            b.iter(|| {
                out.clear();
                frame::encode_into(black_box(&h), black_box(p), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion<CpuTime>) {
    let mut g = c.benchmark_group("frame_decode");
    for len in PAYLOAD_LENS {
        let bytes = frame::encode(&header(), &vec![b'x'; len]);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &bytes, |b, bytes| {
            b.iter(|| {
                let (f, used) = frame::decode(black_box(bytes), 1 << 20).expect("valid frame");
                black_box((f.header.seq, used))
            })
        });
    }
    g.finish();
}

fn peek(c: &mut Criterion<CpuTime>) {
    let bytes = frame::encode(&header(), &[b'x'; 208]);
    c.bench_function("frame_peek_header", |b| {
        b.iter(|| black_box(frame::peek_header(black_box(&bytes), 1 << 20).expect("valid")))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(CpuTime);
    targets = encode, decode, peek
}
criterion_main!(benches);
