#![no_main]
//! Fuzz target: the HTTP/1.1 request parser on arbitrary bytes, as a pipelined stream.
//!
//! Checks beyond "no panic": every parsed request consumes bytes within the buffer, its body
//! copies out at its stated length, and any strict prefix of a parsed request is `Incomplete`
//! (so a request split across reads parses the same).

use kefu_protocol::http::{HttpLimits, ParseError, parse_request, percent_decode, query_pairs};

fn check(data: &[u8], limits: &HttpLimits) {
    let mut at = 0;
    // Each parsed request consumes at least one byte, so this ends.
    while at < data.len() {
        let buf = &data[at..];
        let req = match parse_request(buf, limits) {
            Ok(req) => req,
            Err(ParseError::Incomplete { needed }) => {
                assert!(needed >= 1);
                return;
            }
            Err(ParseError::Invalid(e)) => {
                assert!(matches!(
                    e.status(),
                    400 | 411 | 413 | 414 | 431 | 501 | 505
                ));
                return;
            }
        };
        assert!(req.consumed > 0 && req.consumed <= buf.len());
        assert!(req.head.head_len <= req.consumed);
        let mut body = Vec::new();
        req.body.copy_into(&mut body);
        assert_eq!(body.len() as u64, req.body.len());
        // Cuts at the ends of the request, of the head, of the first line (just after its CR,
        // where a limit check once misfired) and in the middle.
        let first_lf = buf[..req.consumed]
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(0);
        for cut in [
            req.consumed - 1,
            req.head.head_len.saturating_sub(1),
            req.consumed / 2,
            first_lf,
            first_lf.saturating_sub(1),
        ] {
            assert!(
                matches!(
                    parse_request(&buf[..cut], limits),
                    Err(ParseError::Incomplete { .. })
                ),
                "prefix of {cut} bytes is not Incomplete"
            );
        }
        if let Some(q) = req.head.query {
            for (k, v) in query_pairs(q) {
                let _ = percent_decode(k);
                let _ = percent_decode(v);
            }
        }
        at += req.consumed;
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check(data, &HttpLimits::default());
    check(
        data,
        &HttpLimits {
            request_line_bytes_max: 24,
            headers_count_max: 4,
            head_bytes_max: 96,
            body_bytes_max: 32,
            chunk_line_bytes_max: 8,
            chunked_body_allowed: true,
            host_required: false,
        },
    );
});
