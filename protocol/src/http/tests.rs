//! Tests of the HTTP/1.1 request parser and response writer.

use super::*;
use proptest::prelude::*;

fn limits() -> HttpLimits {
    HttpLimits::default()
}

fn parse(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    parse_request(buf, &limits())
}

fn invalid(buf: &[u8]) -> InvalidRequest {
    match parse(buf) {
        Err(ParseError::Invalid(e)) => e,
        other => panic!("expected invalid, got {other:?}"),
    }
}

const POST: &[u8] =
    b"POST /v1/conversations/c0001000000000001/messages?after=5&x=a%20b HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: kefu-test/1.0\r\n\
Accept: */*\r\n\
Content-Type: application/json\r\n\
Authorization: Bearer tok-123\r\n\
Content-Length: 45\r\n\
\r\n\
{\"text\": \"hello there\", \"client_msg_id\": \"m\"}";

/// The head keeps header positions, not slices: every line comes back as httparse parsed it,
/// in order, from a buffer that holds a pipelined request after it.
#[test]
fn headers_come_back_in_order_as_parsed() {
    let first = b"GET /a HTTP/1.1\r\nHost: h\r\nX-One:  padded value \r\nx-empty:\r\n\
                  X-Dup: 1\r\nx-dup: 2\r\n\r\n";
    let mut buf = first.to_vec();
    buf.extend_from_slice(b"GET /b HTTP/1.1\r\nHost: other\r\n\r\n");
    let req = parse(&buf).unwrap();
    assert_eq!(req.consumed, first.len());
    let mut raw = [httparse::EMPTY_HEADER; 8];
    let mut want = httparse::Request::new(&mut raw);
    assert!(want.parse(first).unwrap().is_complete());
    let got: Vec<_> = req.head.headers().collect();
    assert_eq!(got, want.headers.to_vec());
    assert_eq!(got.len(), 5);
    assert_eq!(req.head.header("x-one"), Some(&b"padded value"[..]));
    assert_eq!(req.head.header("X-EMPTY"), Some(&b""[..]));
    assert_eq!(req.head.header("x-dup"), Some(&b"1"[..]));
    assert_eq!(req.head.header("host"), Some(&b"h"[..]));
}

#[test]
fn parses_post_with_body_query_and_headers() {
    let buf = POST;
    let req = parse(buf).unwrap();
    assert_eq!(req.head.method, Method::Post);
    assert_eq!(req.head.method_str, "POST");
    assert_eq!(
        req.head.path,
        "/v1/conversations/c0001000000000001/messages"
    );
    assert_eq!(req.head.query, Some("after=5&x=a%20b"));
    assert_eq!(req.head.version, Version::Http11);
    assert!(req.head.keep_alive);
    assert_eq!(req.head.headers().len(), 6);
    assert_eq!(
        req.head.header("content-type"),
        Some(&b"application/json"[..])
    );
    assert_eq!(
        req.head.header("CONTENT-TYPE"),
        Some(&b"application/json"[..])
    );
    assert_eq!(req.head.header("x-missing"), None);
    assert_eq!(req.head.bearer_token(), Some("tok-123"));
    assert_eq!(req.body.len(), 45);
    assert_eq!(req.body.as_contiguous().unwrap(), &buf[buf.len() - 45..]);
    assert_eq!(req.consumed, buf.len());
    let q = req.head.query.unwrap();
    assert_eq!(query_get(q, "after").unwrap().unwrap(), "5");
    assert_eq!(query_get(q, "x").unwrap().unwrap(), "a b");
    assert!(query_get(q, "y").is_none());
}

#[test]
fn every_split_is_incomplete_until_the_last_byte() {
    let full = POST;
    let whole = parse(full).unwrap();
    for cut in 0..full.len() {
        match parse(&full[..cut]) {
            Err(ParseError::Incomplete { needed }) => {
                assert!(needed >= 1 && needed <= full.len() - cut, "cut {cut}")
            }
            other => panic!("cut {cut}: expected Incomplete, got {other:?}"),
        }
    }
    let again = parse(full).unwrap();
    assert_eq!(again.consumed, whole.consumed);
    assert_eq!(
        again.head.headers().collect::<Vec<_>>(),
        whole.head.headers().collect::<Vec<_>>()
    );
}

#[test]
fn every_split_is_incomplete_when_the_request_sits_exactly_at_the_limits() {
    let line = b"GET /abcdefghijklmnopqrstu HTTP/1.1"; // 35 bytes
    let mut req = line.to_vec();
    req.extend_from_slice(b"\r\nHost: h\r\nX: 0123456789\r\n\r\n");
    let limits = HttpLimits {
        request_line_bytes_max: line.len(),
        head_bytes_max: req.len(),
        headers_count_max: 2,
        ..HttpLimits::default()
    };
    assert_eq!(parse_request(&req, &limits).unwrap().consumed, req.len());
    for cut in 0..req.len() {
        assert!(
            matches!(
                parse_request(&req[..cut], &limits),
                Err(ParseError::Incomplete { .. })
            ),
            "cut {cut}: {:?}",
            parse_request(&req[..cut], &limits)
        );
    }
    // One byte over each limit is refused.
    let tighter = |f: fn(&mut HttpLimits)| {
        let mut l = limits;
        f(&mut l);
        parse_request(&req, &l).unwrap_err()
    };
    assert_eq!(
        tighter(|l| l.request_line_bytes_max -= 1),
        ParseError::Invalid(InvalidRequest::UriTooLong)
    );
    assert_eq!(
        tighter(|l| l.head_bytes_max -= 1),
        ParseError::Invalid(InvalidRequest::HeadTooLarge)
    );
    assert_eq!(
        tighter(|l| l.headers_count_max -= 1),
        ParseError::Invalid(InvalidRequest::TooManyHeaders)
    );
}

#[test]
fn every_split_of_a_chunked_request_is_incomplete_until_the_last_byte() {
    let full: &[u8] = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
5;name=val\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: yes\r\n\r\n";
    let req = parse(full).unwrap();
    assert_eq!(req.consumed, full.len());
    let mut body = Vec::new();
    req.body.copy_into(&mut body);
    assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
    assert_eq!(req.body.len(), 31);
    assert_eq!(req.body.as_contiguous(), None);
    for cut in 0..full.len() {
        assert!(
            matches!(parse(&full[..cut]), Err(ParseError::Incomplete { .. })),
            "cut {cut}: {:?}",
            parse(&full[..cut])
        );
    }
}

#[test]
fn pipelined_requests_parse_one_after_another() {
    let buf: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz\
GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n\
GET /d HT";
    let mut at = 0;
    let mut seen = Vec::new();
    loop {
        match parse(&buf[at..]) {
            Ok(req) => {
                seen.push((
                    req.head.path.to_string(),
                    req.body.as_contiguous().unwrap().to_vec(),
                    req.head.keep_alive,
                ));
                at += req.consumed;
            }
            Err(ParseError::Incomplete { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            ("/a".to_string(), vec![], true),
            ("/b".to_string(), b"xyz".to_vec(), true),
            ("/c".to_string(), vec![], false),
        ]
    );
    assert_eq!(&buf[at..], b"GET /d HT");
}

#[test]
fn keep_alive_semantics() {
    let ka = |b: &[u8]| parse(b).unwrap().head.keep_alive;
    assert!(ka(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
    assert!(!ka(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    ));
    assert!(!ka(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: foo, Close\r\n\r\n"
    ));
    assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    assert!(!ka(
        b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
    ));
}

#[test]
fn smuggling_attempts_are_refused() {
    use InvalidRequest::*;
    let cases: &[(&[u8], InvalidRequest)] = &[
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            TransferEncodingWithContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            TransferEncodingWithContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            ConflictingContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n",
            BadContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n",
            BadContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x3\r\n\r\n",
            BadContentLength,
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            TransferEncodingInHttp10,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            BadTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            BadTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            UnsupportedTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n",
            BadTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
            Syntax("invalid header name"),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            DuplicateHost,
        ),
        (b"GET / HTTP/1.1\r\n\r\n", MissingHost),
    ];
    for (req, want) in cases {
        let got = invalid(req);
        assert_eq!(got, *want, "{}", String::from_utf8_lossy(req));
        assert!(matches!(got.status(), 400 | 501), "{got:?}");
    }
}

#[test]
fn obsolete_line_folding_and_control_bytes_are_refused() {
    for req in [
        &b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n  folded\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n Leading: space\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
    ] {
        assert_eq!(
            invalid(req).status(),
            400,
            "{}",
            String::from_utf8_lossy(req)
        );
    }
}

#[test]
fn header_token_lists() {
    let req = parse(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nconnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
    )
    .unwrap();
    assert!(req.head.connection_upgrade);
    assert!(req.head.header_has_token("connection", "upgrade"));
    assert!(req.head.header_has_token("Upgrade", "websocket"));
    assert!(!req.head.header_has_token("Upgrade", "h2c"));
    assert_eq!(req.head.header_str("host"), Some("h"));
}

#[test]
fn http10_body_with_content_length() {
    let req = parse(b"POST /x HTTP/1.0\r\nContent-Length: 3\r\n\r\nabcGET").unwrap();
    assert_eq!(req.head.version, Version::Http10);
    assert!(!req.head.keep_alive);
    assert_eq!(req.body.as_contiguous(), Some(&b"abc"[..]));
    assert_eq!(
        req.consumed,
        b"POST /x HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc".len()
    );
}

#[test]
fn identical_duplicate_content_length_is_accepted() {
    let req =
        parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
            .unwrap();
    assert_eq!(req.body.as_contiguous(), Some(&b"ok"[..]));
}

#[test]
fn chunked_can_be_refused_with_411() {
    let limits = HttpLimits {
        chunked_body_allowed: false,
        ..HttpLimits::default()
    };
    let err = parse_request(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        &limits,
    )
    .unwrap_err();
    assert_eq!(err, ParseError::Invalid(InvalidRequest::LengthRequired));
    assert_eq!(InvalidRequest::LengthRequired.status(), 411);
}

#[test]
fn malformed_chunked_bodies_are_refused() {
    let head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bad: &[&[u8]] = &[
        b"5\r\nhelloX\r\n0\r\n\r\n",       // data longer than the size
        b"5\nhello\r\n0\r\n\r\n",          // bare LF
        b"z\r\n",                          // not hex
        b"-1\r\n",                         // sign
        b"5 x\r\n",                        // junk
        b"11111111111111111\r\n",          // overflow (17 hex digits)
        b"0\r\nbad trailer\r\n\r\n",       // trailer without colon
        b"5\rhello\r\n",                   // CR without LF
        b"5;a=\x01\r\nhello\r\n0\r\n\r\n", // control byte in extension
    ];
    for body in bad {
        let mut req = head.to_vec();
        req.extend_from_slice(body);
        let err = invalid(&req);
        assert!(
            matches!(err.status(), 400 | 413),
            "{}: {err:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn chunk_count_is_bounded() {
    let head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let body = |chunks: u32| {
        let mut req = head.to_vec();
        for _ in 0..chunks {
            write_chunk(&mut req, b"x");
        }
        write_last_chunk(&mut req);
        req
    };
    let ok = body(CHUNKS_COUNT_MAX);
    assert_eq!(parse(&ok).unwrap().body.len(), u64::from(CHUNKS_COUNT_MAX));
    assert_eq!(
        invalid(&body(CHUNKS_COUNT_MAX + 1)),
        InvalidRequest::TooManyChunks
    );
    assert_eq!(InvalidRequest::TooManyChunks.status(), 413);
}

#[test]
fn chunked_body_limit_is_413() {
    let limits = HttpLimits {
        body_bytes_max: 8,
        ..HttpLimits::default()
    };
    let req =
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\n";
    assert_eq!(
        parse_request(req, &limits).unwrap_err(),
        ParseError::Invalid(InvalidRequest::BodyTooLarge)
    );
}

#[test]
fn size_limits_map_to_their_status_codes() {
    let limits = HttpLimits {
        request_line_bytes_max: 32,
        headers_count_max: 3,
        head_bytes_max: 128,
        body_bytes_max: 10,
        ..HttpLimits::default()
    };
    let status = |buf: &[u8]| match parse_request(buf, &limits) {
        Err(ParseError::Invalid(e)) => e.status(),
        other => panic!("{other:?}"),
    };
    // 414, complete or not.
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(40));
    assert_eq!(status(long_uri.as_bytes()), 414);
    assert_eq!(status(&long_uri.as_bytes()[..36]), 414);
    // 431 for count and for bytes.
    assert_eq!(
        status(b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"),
        431
    );
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
        "v".repeat(120)
    );
    assert_eq!(status(big_header.as_bytes()), 431);
    assert_eq!(status(&big_header.as_bytes()[..129]), 431);
    assert!(matches!(
        parse_request(&big_header.as_bytes()[..127], &limits),
        Err(ParseError::Incomplete { .. })
    ));
    // 413.
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"),
        413
    );
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
        413
    );
    // Exactly at the limit is fine.
    assert!(
        parse_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789",
            &limits
        )
        .is_ok()
    );
}

#[test]
fn request_targets() {
    fn head(b: &[u8]) -> Result<(&str, Option<&str>), ParseError> {
        parse(b).map(|r| (r.head.path, r.head.query))
    }
    assert_eq!(
        head(b"GET http://example.com/x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap(),
        ("/x", Some("y=1"))
    );
    assert_eq!(
        head(b"GET HTTP://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n").unwrap(),
        ("/", None)
    );
    assert_eq!(
        head(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").unwrap(),
        ("*", None)
    );
    assert_eq!(
        invalid(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n"),
        InvalidRequest::BadTarget
    );
    assert_eq!(
        invalid(b"GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n"),
        InvalidRequest::BadTarget
    );
    assert_eq!(
        invalid(b"CONNECT example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n"),
        InvalidRequest::BadTarget
    );
    assert_eq!(invalid(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n").status(), 505);
    assert_eq!(invalid(b"GET / HTTP/1.1x\r\nHost: h\r\n\r\n").status(), 400);
    assert_eq!(invalid(b"GET / FTP/1.1\r\nHost: h\r\n\r\n").status(), 400);
}

#[test]
fn expect_continue_and_parse_head() {
    let buf = b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    let head = parse_head(buf, &limits()).unwrap();
    assert!(head.expect_continue);
    assert_eq!(head.body, BodyFraming::Length(5));
    assert_eq!(head.head_len, buf.len());
    assert_eq!(
        parse(buf).unwrap_err(),
        ParseError::Incomplete { needed: 5 }
    );
}

#[test]
fn leading_empty_lines_are_skipped() {
    let req = parse(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(req.head.path, "/");
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("plain").unwrap(), "plain");
    assert!(matches!(
        percent_decode("plain").unwrap(),
        std::borrow::Cow::Borrowed(_)
    ));
    assert_eq!(percent_decode("a%2Fb+c%e4%bd%a0").unwrap(), "a/b c你");
    assert_eq!(percent_decode("%"), Err(PercentDecodeError::BadEscape));
    assert_eq!(percent_decode("%4"), Err(PercentDecodeError::BadEscape));
    assert_eq!(percent_decode("%zz"), Err(PercentDecodeError::BadEscape));
    assert_eq!(percent_decode("%ff"), Err(PercentDecodeError::NotUtf8));
    let pairs: Vec<_> = query_pairs("a=1&&b&c=&d=x=y").collect();
    assert_eq!(pairs, vec![("a", "1"), ("b", ""), ("c", ""), ("d", "x=y")]);
    assert_eq!(query_get("tok%65n=abc", "token").unwrap().unwrap(), "abc");
}

#[test]
fn response_writer() {
    let mut out = Vec::new();
    let head = ResponseHead::new(201)
        .content_type("application/json")
        .extra_headers(&[("X-Request-Id", "r1\r\nInjected: 1")]);
    write_response(&mut out, &head, b"{}");
    assert_eq!(
        out,
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n\
X-Request-Id: r1  Injected: 1\r\nContent-Length: 2\r\n\r\n{}"
    );

    out.clear();
    let head = ResponseHead::new(503).keep_alive(false).retry_after_secs(2);
    write_json_error(&mut out, &head, "overloaded \"now\"\n");
    let text = String::from_utf8(out.clone()).unwrap();
    let (head_text, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head_text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    assert!(head_text.contains("\r\nRetry-After: 2\r\n"));
    assert!(head_text.contains("\r\nConnection: close\r\n"));
    assert!(head_text.contains("\r\nContent-Type: application/json\r\n"));
    assert!(head_text.contains(&format!("\r\nContent-Length: {}", body.len())));
    assert_eq!(body, r#"{"error": "overloaded \"now\"\n"}"#);

    out.clear();
    write_response_head(&mut out, &ResponseHead::new(204), 0);
    assert_eq!(
        out,
        b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
    );

    out.clear();
    write_json_string(&mut out, "a\u{1}\\b");
    assert_eq!(out, br#""a\u0001\\b""#);
}

#[test]
fn chunked_response_roundtrips_through_the_request_decoder() {
    let mut out = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let pieces: [&[u8]; 4] = [b"first", b"", &[7u8; 300], b"last"];
    for p in pieces {
        write_chunk(&mut out, p);
    }
    write_last_chunk(&mut out);
    let req = parse(&out).unwrap();
    let chunks: Vec<&[u8]> = match req.body {
        Body::Chunked(c) => c.chunks().collect(),
        Body::Bytes(_) => panic!("expected chunked"),
    };
    assert_eq!(chunks, vec![&b"first"[..], &[7u8; 300][..], &b"last"[..]]);

    let mut head = Vec::new();
    write_chunked_head(
        &mut head,
        &ResponseHead::new(200).content_type("application/x-kefu-frames"),
    );
    assert!(head.ends_with(b"Transfer-Encoding: chunked\r\n\r\n"));
}

#[test]
fn default_limits_are_valid() {
    assert_eq!(HttpLimits::default().validate(), Ok(()));
    let bad = HttpLimits {
        headers_count_max: HEADERS_COUNT_HARD_MAX + 1,
        ..HttpLimits::default()
    };
    assert!(bad.validate().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&buf);
        let small = HttpLimits {
            request_line_bytes_max: 20,
            headers_count_max: 2,
            head_bytes_max: 40,
            body_bytes_max: 5,
            chunk_line_bytes_max: 4,
            ..HttpLimits::default()
        };
        let _ = parse_request(&buf, &small);
    }

    #[test]
    fn mutated_requests_never_panic_and_consume_within_bounds(
        pos in 0usize..200, byte in any::<u8>(), cut in 0usize..250
    ) {
        let mut buf = b"POST /x?a=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
3\r\nabc\r\n0\r\nT: v\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi".to_vec();
        let pos = pos % buf.len();
        buf[pos] = byte;
        buf.truncate(cut.min(buf.len()));
        if let Ok(req) = parse(&buf) {
            prop_assert!(req.consumed <= buf.len());
            prop_assert!(req.consumed >= req.head.head_len);
            let mut body = Vec::new();
            req.body.copy_into(&mut body);
            prop_assert_eq!(body.len() as u64, req.body.len());
        }
    }

    #[test]
    fn written_chunked_bodies_decode_to_the_same_bytes(
        pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70), 0..8),
        split in any::<prop::sample::Index>()
    ) {
        let mut buf = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for p in &pieces {
            write_chunk(&mut buf, p);
        }
        write_last_chunk(&mut buf);
        let req = parse(&buf).unwrap();
        prop_assert_eq!(req.consumed, buf.len());
        let mut body = Vec::new();
        req.body.copy_into(&mut body);
        prop_assert_eq!(body, pieces.concat());
        let cut = split.index(buf.len());
        let incomplete = matches!(parse(&buf[..cut]), Err(ParseError::Incomplete { .. }));
        prop_assert!(incomplete, "cut {}", cut);
    }
}

/// A prepared head writes the bytes `write_response` writes, for every kind of head.
#[test]
fn prepared_heads_write_what_write_response_writes() {
    let extra = [("X-Request-Id", "r1"), ("Bad", "a\r\nb")];
    for status in [100, 101, 200, 201, 204, 304, 400, 429, 503, 1000] {
        for keep_alive in [true, false] {
            for content_type in [None, Some("application/json")] {
                for retry in [None, Some(3)] {
                    for extra in [&extra[..0], &extra[..]] {
                        let mut head = ResponseHead::new(status)
                            .keep_alive(keep_alive)
                            .extra_headers(extra);
                        head.content_type = content_type;
                        head.retry_after_secs = retry;
                        let Some(prepared) = PreparedHead::new(&head) else {
                            assert!(matches!(status, 100..=199 | 204 | 304));
                            continue;
                        };
                        for body in [&b""[..], b"{\"seq\":1,\"ts\":2}"] {
                            let (mut want, mut got) = (b"x".to_vec(), b"x".to_vec());
                            write_response(&mut want, &head, body);
                            prepared.write_response(&mut got, body);
                            assert_eq!(got, want, "{head:?}");
                        }
                    }
                }
            }
        }
    }
}
