//! Benchmarks for the WebSocket codec: frame parse + in-place unmask (GB/s) for 64 B, 1 KiB
//! and 64 KiB payloads, the word-wise unmask against a byte-wise reference, and frame encode.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kefu_protocol::ws::frame::unmask_bytewise;
use kefu_protocol::ws::{OpCode, Role, decode_frame, encode_frame, unmask};

const SIZES: [usize; 3] = [64, 1024, 64 * 1024];
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7) as u8).collect()
}

fn parse_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_parse_unmask");
    for len in SIZES {
        let mut frame = Vec::new();
        encode_frame(&mut frame, true, OpCode::Binary, &payload(len), Some(KEY));
        g.throughput(Throughput::Bytes(frame.len() as u64));
        // Each iteration unmasks the same buffer again (XOR toggles): the same work each time.
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| {
                let (f, n) =
                    decode_frame(black_box(&mut frame[..]), Role::Server, 1 << 20).unwrap();
                black_box((f.payload.len(), n))
            })
        });
    }
    g.finish();
}

fn unmask_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_unmask");
    for len in SIZES {
        let mut data = payload(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("wordwise", len), &len, |b, _| {
            b.iter(|| unmask(black_box(&mut data[..]), KEY))
        });
        g.bench_with_input(BenchmarkId::new("bytewise", len), &len, |b, _| {
            b.iter(|| unmask_bytewise(black_box(&mut data[..]), KEY))
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_encode_server");
    for len in SIZES {
        let data = payload(len);
        let mut out = Vec::with_capacity(len + 16);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| {
                out.clear();
                encode_frame(&mut out, true, OpCode::Text, black_box(&data), None);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse_unmask, unmask_only, encode);
criterion_main!(benches);
