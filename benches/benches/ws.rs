//! Benchmarks for the WebSocket codec: frame parse + in-place unmask (GB/s) for 64 B, 1 KiB
//! and 64 KiB payloads, the word-wise unmask against a byte-wise reference, frame encode, and
//! message reads side by side with tungstenite's `WebSocket::read` on the same bytes.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kefu_protocol::ws::frame::unmask_bytewise;
use kefu_protocol::ws::{OpCode, Role, WsConnection, WsLimits, decode_frame, encode_frame, unmask};

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

/// An endless stream that replays one frame, so tungstenite reads frames in steady state
/// (writes, which a binary message never causes, are discarded).
struct Replay<'a> {
    frame: &'a [u8],
    pos: usize,
}

impl std::io::Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let chunk = &self.frame[self.pos..];
            let k = chunk.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&chunk[..k]);
            n += k;
            self.pos = (self.pos + k) % self.frame.len();
        }
        Ok(n)
    }
}

impl std::io::Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A whole binary message read (parse, unmask, limits, state machine): kefu's connection over
/// a buffer it owns, against tungstenite's `WebSocket::read` (which copies from the stream into
/// its own buffer and hands out an owned payload). Not quite like for like: tungstenite's time
/// includes copying the bytes out of `Replay`, standing in for the socket read, while kefu's
/// bytes are already in the buffer the socket read into.
fn message_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_message_read");
    for len in SIZES {
        let mut frame = Vec::new();
        encode_frame(&mut frame, true, OpCode::Binary, &payload(len), Some(KEY));
        g.throughput(Throughput::Bytes(frame.len() as u64));
        let limits = WsLimits {
            frame_payload_bytes_max: 1 << 20,
            message_bytes_max: 1 << 20,
        };
        let mut conn = WsConnection::new(limits);
        let mut out = Vec::new();
        let mut buf = frame.clone();
        g.bench_with_input(BenchmarkId::new("kefu", len), &len, |b, _| {
            b.iter(|| {
                let (ev, n) = conn.decode(black_box(&mut buf[..]), &mut out).unwrap();
                black_box((ev.is_some(), n))
            })
        });
        let replay = Replay {
            frame: &frame,
            pos: 0,
        };
        let mut ws = tungstenite::WebSocket::from_raw_socket(
            replay,
            tungstenite::protocol::Role::Server,
            None,
        );
        g.bench_with_input(BenchmarkId::new("tungstenite", len), &len, |b, _| {
            b.iter(|| {
                let msg = ws.read().unwrap();
                black_box(msg.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse_unmask, unmask_only, encode, message_read);
criterion_main!(benches);
