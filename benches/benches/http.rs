//! Benchmarks for the HTTP/1.1 codec: request parsing (ns per request and bytes per second)
//! and response writing.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kefu_protocol::http::{
    HttpLimits, ResponseHead, parse_request, write_json_error, write_response,
};

/// A typical API call: ~300 bytes, 8 headers, small JSON body.
const POST: &[u8] = b"POST /v1/conversations/c0001000000000001/messages HTTP/1.1\r\n\
Host: 127.0.0.1:8080\r\n\
User-Agent: kefu-sdk/0.1\r\n\
Accept: application/json\r\n\
Accept-Encoding: identity\r\n\
Content-Type: application/json\r\n\
Authorization: Bearer 4f1c2a9be0d7c3a5\r\n\
X-Request-Id: 9b8e5a11\r\n\
Content-Length: 46\r\n\
\r\n\
{\"text\": \"I need help\", \"client_msg_id\": \"m1\"}";

fn parse(c: &mut Criterion) {
    let limits = HttpLimits::default();
    let req = parse_request(POST, &limits).expect("bench request parses");
    assert_eq!(req.consumed, POST.len());
    assert_eq!(req.head.headers().len(), 8);

    let mut g = c.benchmark_group("http_parse");
    g.throughput(Throughput::Bytes(POST.len() as u64));
    g.bench_function(format!("post_{}B_8_headers", POST.len()), |b| {
        b.iter(|| {
            let req = parse_request(black_box(POST), &limits).unwrap();
            black_box((req.consumed, req.body.len()))
        })
    });

    // Reference: httparse alone on the same bytes (no framing, limits or header semantics).
    g.bench_function("httparse_only_reference", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let n = req.parse(black_box(POST)).unwrap().unwrap();
            black_box((n, req.headers.len()))
        })
    });

    // 16 pipelined requests in one buffer, parsed one after another.
    let pipelined: Vec<u8> = POST.repeat(16);
    g.throughput(Throughput::Bytes(pipelined.len() as u64));
    g.bench_function("pipelined_16_posts", |b| {
        b.iter(|| {
            let buf = black_box(&pipelined[..]);
            let mut at = 0;
            while at < buf.len() {
                at += parse_request(&buf[at..], &limits).unwrap().consumed;
            }
            black_box(at)
        })
    });
    g.finish();
}

fn write(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_write");
    let body = br#"{"seq": 42, "ts": 1732579200000000}"#;
    let mut out = Vec::with_capacity(512);
    g.bench_function("response_201_json", |b| {
        b.iter(|| {
            out.clear();
            let head = ResponseHead::new(201).content_type("application/json");
            write_response(&mut out, black_box(&head), black_box(body));
            black_box(out.len())
        })
    });
    g.bench_function("json_error_503_retry_after", |b| {
        b.iter(|| {
            out.clear();
            let head = ResponseHead::new(503).retry_after_secs(1);
            write_json_error(&mut out, black_box(&head), black_box("shard overloaded"));
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, parse, write);
criterion_main!(benches);
