//! HTTP/1.1 response writing into a caller-owned `Vec<u8>`: fixed-length and chunked
//! (streaming) responses and JSON error bodies. Nothing is allocated beyond growing `out`.
//!
//! Header names and values come from the gateway, not from peers, but a CR or LF in them would
//! still split the response, so they are written with CR and LF replaced by spaces.

/// The status line and headers of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    pub status: u16,
    pub content_type: Option<&'a str>,
    /// `Connection: keep-alive` when true, else `Connection: close`.
    pub keep_alive: bool,
    /// `Retry-After: N` (seconds), sent with 503 and 429.
    pub retry_after_secs: Option<u32>,
    /// Further `(name, value)` headers, written in order.
    pub extra_headers: &'a [(&'a str, &'a str)],
}

impl<'a> ResponseHead<'a> {
    /// A keep-alive response with no content type and no extra headers.
    pub const fn new(status: u16) -> Self {
        Self {
            status,
            content_type: None,
            keep_alive: true,
            retry_after_secs: None,
            extra_headers: &[],
        }
    }

    pub const fn content_type(mut self, content_type: &'a str) -> Self {
        self.content_type = Some(content_type);
        self
    }

    pub const fn keep_alive(mut self, keep_alive: bool) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    pub const fn retry_after_secs(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub const fn extra_headers(mut self, headers: &'a [(&'a str, &'a str)]) -> Self {
        self.extra_headers = headers;
        self
    }
}

/// The reason phrase for the status codes kefu answers with (`""` for others, which is valid).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes a complete response with `body` and its `Content-Length`.
pub fn write_response(out: &mut Vec<u8>, head: &ResponseHead<'_>, body: &[u8]) {
    write_response_head(out, head, body.len() as u64);
    out.extend_from_slice(body);
}

/// Writes the head of a response whose `content_length` body bytes the caller sends next (for
/// instance with sendfile), or none for a HEAD request. 1xx, 204 and 304 get no
/// `Content-Length`, as RFC 9110 §8.6 requires.
pub fn write_response_head(out: &mut Vec<u8>, head: &ResponseHead<'_>, content_length: u64) {
    write_common_head(out, head);
    if !matches!(head.status, 100..=199 | 204 | 304) {
        out.extend_from_slice(b"Content-Length: ");
        write_u64(out, content_length);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head rendered once, for answers sent over and over (the JSON answer to a send):
/// writing one is a copy and the length, not a header-by-header render. Writes exactly the
/// bytes [`write_response`] does for the same head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedHead {
    /// Everything up to and including `Content-Length: `.
    prefix: Vec<u8>,
}

impl PreparedHead {
    /// `None` for heads without a `Content-Length` (1xx, 204, 304).
    pub fn new(head: &ResponseHead<'_>) -> Option<Self> {
        if matches!(head.status, 100..=199 | 204 | 304) {
            return None;
        }
        let mut prefix = Vec::with_capacity(256);
        write_common_head(&mut prefix, head);
        prefix.extend_from_slice(b"Content-Length: ");
        Some(Self { prefix })
    }

    /// Writes a complete response with `body`, as [`write_response`] would.
    pub fn write_response(&self, out: &mut Vec<u8>, body: &[u8]) {
        out.reserve(self.prefix.len() + 24 + body.len());
        out.extend_from_slice(&self.prefix);
        write_u64(out, body.len() as u64);
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    }
}

/// Writes the head of a streamed response (`Transfer-Encoding: chunked`); follow with
/// [`write_chunk`] per piece and [`write_last_chunk`] at the end.
pub fn write_chunked_head(out: &mut Vec<u8>, head: &ResponseHead<'_>) {
    write_common_head(out, head);
    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
}

/// Writes one chunk. An empty `data` writes nothing: an empty chunk would end the body.
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    write_hex(out, data.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Ends a chunked body (no trailers).
pub fn write_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

/// Writes a complete `application/json` response whose body is `{"error": "<message>"}`.
/// `head.content_type` is ignored.
pub fn write_json_error(out: &mut Vec<u8>, head: &ResponseHead<'_>, message: &str) {
    const PREFIX: &[u8] = b"{\"error\": ";
    const SUFFIX: &[u8] = b"}";
    let head = head.content_type("application/json");
    let body_len = PREFIX.len() + json_string_len(message) + SUFFIX.len();
    write_response_head(out, &head, body_len as u64);
    let start = out.len();
    out.extend_from_slice(PREFIX);
    write_json_string(out, message);
    out.extend_from_slice(SUFFIX);
    debug_assert_eq!(out.len() - start, body_len);
}

/// Writes `s` as a JSON string literal, quotes included.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain_from..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX_LOWER[usize::from(b >> 4)]);
            out.push(HEX_LOWER[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        plain_from = i + 1;
    }
    out.extend_from_slice(&bytes[plain_from..]);
    out.push(b'"');
}

/// The length [`write_json_string`] writes for `s`.
fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn write_common_head(out: &mut Vec<u8>, head: &ResponseHead<'_>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    // A status outside 100..=999 cannot be written as three digits; that is a caller bug,
    // answered as 500 rather than a malformed status line.
    let status = if (100..=999).contains(&head.status) {
        head.status
    } else {
        500
    };
    write_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(ct) = head.content_type {
        write_header(out, "Content-Type", ct);
    }
    if let Some(secs) = head.retry_after_secs {
        out.extend_from_slice(b"Retry-After: ");
        write_u64(out, u64::from(secs));
        out.extend_from_slice(b"\r\n");
    }
    if status != 101 {
        out.extend_from_slice(if head.keep_alive {
            b"Connection: keep-alive\r\n"
        } else {
            b"Connection: close\r\n"
        });
    }
    for (name, value) in head.extra_headers {
        write_header(out, name, value);
    }
}

/// Writes `name: value\r\n` with CR and LF replaced by spaces.
pub(crate) fn write_header(out: &mut Vec<u8>, name: &str, value: &str) {
    write_sanitized(out, name.as_bytes());
    out.extend_from_slice(b": ");
    write_sanitized(out, value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_sanitized(out: &mut Vec<u8>, bytes: &[u8]) {
    if !bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend_from_slice(bytes);
        return;
    }
    out.extend(
        bytes
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// `n` in decimal ASCII, written at the end of `digits` (20 digits hold any `u64`): for
/// writers that render numbers without allocating.
pub fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

fn write_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX_LOWER[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `100 Continue`, for a request that sent `Expect: 100-continue`.
pub fn write_continue(out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
}
