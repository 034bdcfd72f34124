//! HTTP/1.1 request parsing (keep-alive and pipelining aware) and response writing, sans-I/O.
//!
//! The caller owns the bytes: [`parse_request`] reads from a `&[u8]` (for instance a monoio
//! owned read buffer) and reports how many bytes the request used, so a pipelined request that
//! follows in the same buffer is parsed by calling it again on `&buf[consumed..]`. Responses are
//! written into a caller-owned `Vec<u8>` (see [`response`]).
//!
//! What the parser guarantees:
//! - `Err(ParseError::Incomplete { .. })` only while the bytes seen so far are a valid prefix of
//!   a request within the limits, so a request split at any byte boundary parses the same once
//!   its last byte arrives.
//! - Every other error names one specific reason ([`InvalidRequest`]) with the status code to
//!   answer. After any invalid request the connection's framing is unknown: answer and close.
//! - Work per call is bounded by [`HttpLimits`]: at most `head_bytes_max` bytes are scanned for
//!   the head, at most `body_bytes_max` body bytes are accepted.
//! - Message framing follows RFC 9112 §6: `Transfer-Encoding` together with `Content-Length`,
//!   differing `Content-Length` values, or `Transfer-Encoding` in HTTP/1.0 are refused with 400
//!   (request smuggling); `chunked` bodies are decoded, or refused with 411 when the limits say
//!   so; any other transfer coding is refused with 501. A body is never misread.

mod chunked;
pub mod query;
pub mod response;

pub use chunked::{CHUNKS_COUNT_MAX, ChunkedBody, Chunks};
pub use query::{PercentDecodeError, percent_decode, query_get, query_pairs};
pub use response::{
    PreparedHead, ResponseHead, reason_phrase, write_chunk, write_chunked_head, write_continue,
    write_json_error, write_json_string, write_last_chunk, write_response, write_response_head,
};

/// The most header lines any request may carry, whatever the limits say: the parser keeps them
/// in a fixed array so parsing never allocates.
pub const HEADERS_COUNT_HARD_MAX: usize = 64;

/// Every bound the parser enforces. Chosen from config at startup; check with [`HttpLimits::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest request line (method, target, version; without CRLF). Above it: 414.
    pub request_line_bytes_max: usize,
    /// Most header lines. Above it: 431. At most [`HEADERS_COUNT_HARD_MAX`].
    pub headers_count_max: usize,
    /// Most bytes of the whole head (request line, headers, blank line), and of chunked
    /// trailers. Above it: 431.
    pub head_bytes_max: usize,
    /// Largest body (after chunked decoding). Above it: 413.
    pub body_bytes_max: u64,
    /// Longest chunk-size line of a chunked body (size and extensions). Above it: 400.
    pub chunk_line_bytes_max: usize,
    /// Whether `Transfer-Encoding: chunked` request bodies are accepted (else 411).
    pub chunked_body_allowed: bool,
    /// Whether an HTTP/1.1 request must carry exactly one `Host` header (RFC 9112 §3.2).
    pub host_required: bool,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            request_line_bytes_max: 8 * 1024,
            headers_count_max: 48,
            head_bytes_max: 16 * 1024,
            body_bytes_max: 1024 * 1024,
            chunk_line_bytes_max: 1024,
            chunked_body_allowed: true,
            host_required: true,
        }
    }
}

impl HttpLimits {
    /// Checks the limits are usable; call once at startup with the configured values.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.headers_count_max > HEADERS_COUNT_HARD_MAX {
            return Err("headers_count_max is above HEADERS_COUNT_HARD_MAX (64)");
        }
        if self.request_line_bytes_max < 16 {
            return Err("request_line_bytes_max must be at least 16");
        }
        if self.head_bytes_max < self.request_line_bytes_max {
            return Err("head_bytes_max must be at least request_line_bytes_max");
        }
        if self.chunk_line_bytes_max < 3 {
            return Err("chunk_line_bytes_max must be at least 3");
        }
        Ok(())
    }
}

/// Why a request could not be parsed (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes so far are a valid prefix: read at least `needed` more bytes and call again.
    #[error("incomplete request: at least {needed} more bytes needed")]
    Incomplete { needed: usize },
    /// The request is invalid; answer with [`InvalidRequest::status`] and close.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
}

/// A specific reason a request is refused, each with its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("malformed request line or header: {0}")]
    Syntax(&'static str),
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    #[error("request target is not origin-form, absolute-form or `*`")]
    BadTarget,
    #[error("request line longer than the limit")]
    UriTooLong,
    #[error("more header lines than the limit")]
    TooManyHeaders,
    #[error("request head larger than the limit")]
    HeadTooLarge,
    #[error("body larger than the limit")]
    BodyTooLarge,
    #[error("missing Host header")]
    MissingHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("Content-Length is not a decimal number")]
    BadContentLength,
    #[error("differing Content-Length values")]
    ConflictingContentLength,
    #[error("both Transfer-Encoding and Content-Length")]
    TransferEncodingWithContentLength,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("Transfer-Encoding must end with a single `chunked`")]
    BadTransferEncoding,
    #[error("transfer coding not implemented (only `chunked`)")]
    UnsupportedTransferEncoding,
    #[error("chunked body not accepted; send Content-Length")]
    LengthRequired,
    #[error("chunked body with more chunks than the limit")]
    TooManyChunks,
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
}

impl InvalidRequest {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnsupportedVersion => 505,
            Self::UriTooLong => 414,
            Self::TooManyHeaders | Self::HeadTooLarge => 431,
            Self::BodyTooLarge | Self::TooManyChunks => 413,
            Self::UnsupportedTransferEncoding => 501,
            Self::LengthRequired => 411,
            Self::Syntax(_)
            | Self::BadTarget
            | Self::MissingHost
            | Self::DuplicateHost
            | Self::BadContentLength
            | Self::ConflictingContentLength
            | Self::TransferEncodingWithContentLength
            | Self::TransferEncodingInHttp10
            | Self::BadTransferEncoding
            | Self::BadChunk(_) => 400,
        }
    }
}

/// The request method; `Other` keeps the token in [`RequestHead::method_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "PATCH" => Self::Patch,
            "OPTIONS" => Self::Options,
            _ => Self::Other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No `Content-Length` and no `Transfer-Encoding`: the body is empty.
    None,
    /// `Content-Length: n` (already checked against `body_bytes_max`).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// One header line, borrowed from the request buffer.
pub type Header<'b> = httparse::Header<'b>;

/// The parsed request line and headers, borrowed from the request buffer.
#[derive(Debug, Clone)]
pub struct RequestHead<'b> {
    pub method: Method,
    /// The method token as sent (case-sensitive, RFC 9110 §9.1).
    pub method_str: &'b str,
    /// The request target as sent.
    pub target: &'b str,
    /// The path part of the target (still percent-encoded); `*` for `OPTIONS *`.
    pub path: &'b str,
    /// The raw query after `?`, if any (still percent-encoded; see [`query_get`]).
    pub query: Option<&'b str>,
    pub version: Version,
    pub body: BodyFraming,
    /// Whether the connection stays open after this exchange: HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Connection` lists the `upgrade` token.
    pub connection_upgrade: bool,
    /// `Expect: 100-continue` was sent: answer `100 Continue` before reading the body.
    pub expect_continue: bool,
    /// Bytes of the head, including the blank line; the body starts here.
    pub head_len: usize,
    /// The head's bytes; `headers` are positions in it.
    head_bytes: &'b [u8],
    /// Positions, not slices: 16 bytes a header instead of 32, and nothing to initialize for
    /// the unused ones, so a parsed head is small to build and to move (it is parsed per
    /// request and lives in the connection's future while the request runs).
    headers: [HeaderAt; HEADERS_COUNT_HARD_MAX],
    headers_len: usize,
}

/// Where one header line's name and value are in [`RequestHead::head_bytes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HeaderAt {
    name_at: u32,
    name_len: u32,
    value_at: u32,
    value_len: u32,
}

impl<'b> RequestHead<'b> {
    /// All header lines in order.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = Header<'b>> + '_ {
        self.headers[..self.headers_len].iter().map(|h| Header {
            // httparse checked names are tokens (ASCII): never empty by conversion.
            name: std::str::from_utf8(self.name_bytes(h)).unwrap_or(""),
            value: self.value_bytes(h),
        })
    }

    fn name_bytes(&self, h: &HeaderAt) -> &'b [u8] {
        let at = h.name_at as usize;
        &self.head_bytes[at..at + h.name_len as usize]
    }

    fn value_bytes(&self, h: &HeaderAt) -> &'b [u8] {
        let at = h.value_at as usize;
        &self.head_bytes[at..at + h.value_len as usize]
    }

    /// The value of the first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers[..self.headers_len]
            .iter()
            .find(|h| self.name_bytes(h).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| self.value_bytes(h))
    }

    /// Like [`Self::header`], for values that are valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&'b str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether any header named `name` lists `token` (comma-separated, ASCII case-insensitive),
    /// as `Connection`, `Upgrade` and `Transfer-Encoding` do.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .any(|h| tokens(h.value).any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
    }

    /// The `Authorization: Bearer TOKEN` credential, if sent.
    pub fn bearer_token(&self) -> Option<&'b str> {
        let value = self.header_str("authorization")?;
        let (scheme, rest) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim_matches([' ', '\t']))
            .filter(|t| !t.is_empty())
    }
}

/// The body of a complete request, borrowed from the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'b> {
    /// The exact body bytes (empty when there is none).
    Bytes(&'b [u8]),
    /// A validated chunked body; iterate its data or copy it out.
    Chunked(ChunkedBody<'b>),
}

impl<'b> Body<'b> {
    /// Body length after chunked decoding.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Chunked(c) => c.decoded_len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body as one slice when it already is contiguous (not chunked, or a single chunk).
    pub fn as_contiguous(&self) -> Option<&'b [u8]> {
        match self {
            Self::Bytes(b) => Some(b),
            Self::Chunked(c) => c.as_single_chunk(),
        }
    }

    /// Appends the decoded body to `out`.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        match self {
            Self::Bytes(b) => out.extend_from_slice(b),
            Self::Chunked(c) => c.copy_into(out),
        }
    }
}

/// A complete request: head, body, and how many buffer bytes it used.
#[derive(Debug, Clone)]
pub struct Request<'b> {
    pub head: RequestHead<'b>,
    pub body: Body<'b>,
    /// Bytes used by this request; a pipelined request starts at `buf[consumed..]`.
    pub consumed: usize,
}

/// Parses one complete request (head and body) from the start of `buf`.
#[inline]
pub fn parse_request<'b>(buf: &'b [u8], limits: &HttpLimits) -> Result<Request<'b>, ParseError> {
    let head = parse_head(buf, limits)?;
    let rest = &buf[head.head_len..];
    let (body, body_len) = match head.body {
        BodyFraming::None => (Body::Bytes(&[]), 0),
        BodyFraming::Length(n) => {
            // n <= body_bytes_max was checked in parse_head; a length that does not fit
            // usize can never be complete in memory.
            let n = usize::try_from(n).map_err(|_| InvalidRequest::BodyTooLarge)?;
            if rest.len() < n {
                return Err(ParseError::Incomplete {
                    needed: n - rest.len(),
                });
            }
            (Body::Bytes(&rest[..n]), n)
        }
        BodyFraming::Chunked => {
            let (chunked, used) = chunked::parse(rest, limits)?;
            (Body::Chunked(chunked), used)
        }
    };
    let consumed = head.head_len + body_len;
    Ok(Request {
        head,
        body,
        consumed,
    })
}

/// Parses the request line and headers only, for callers that stream a large body themselves
/// (the body starts at `head.head_len`, framed as `head.body` says) or answer
/// `Expect: 100-continue` before it arrives.
pub fn parse_head<'b>(buf: &'b [u8], limits: &HttpLimits) -> Result<RequestHead<'b>, ParseError> {
    // Scan at most head_bytes_max bytes, so a peer that never ends its head costs bounded work.
    let scan = &buf[..buf.len().min(limits.head_bytes_max)];
    // Uninitialized: httparse writes the ones it fills, so the unused ones cost nothing.
    let mut headers =
        [const { std::mem::MaybeUninit::<Header<'b>>::uninit() }; HEADERS_COUNT_HARD_MAX];
    let count_max = limits.headers_count_max.min(HEADERS_COUNT_HARD_MAX);
    let mut req = httparse::Request::new(&mut []);
    let status = req.parse_with_uninit_headers(scan, &mut headers[..count_max]);
    // The request line limit comes first, in every path, so a split request answers the same.
    check_request_line(scan, limits)?;
    let head_len = match status {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if scan.len() < buf.len() => {
            return Err(InvalidRequest::HeadTooLarge.into());
        }
        Ok(httparse::Status::Partial) if scan.len() == limits.head_bytes_max => {
            // Exactly at the limit and still no end: one more byte cannot make it fit.
            return Err(InvalidRequest::HeadTooLarge.into());
        }
        Ok(httparse::Status::Partial) => return Err(ParseError::Incomplete { needed: 1 }),
        Err(httparse::Error::Version) => return Err(version_error(scan).into()),
        Err(e) => return Err(map_httparse_error(e).into()),
    };
    let (Some(method_str), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        // httparse fills all three on Complete; refuse rather than panic if it ever does not.
        return Err(InvalidRequest::Syntax("incomplete request line").into());
    };
    let head_bytes = &scan[..head_len];
    // Offsets of the parsed headers in the head (they are slices of it).
    let base = scan.as_ptr() as usize;
    // Where `part` is in the head, checked (never trusted): an empty part needs no position.
    let offset = |part: &[u8]| -> Option<u32> {
        if part.is_empty() {
            return Some(0);
        }
        let at = (part.as_ptr() as usize).checked_sub(base)?;
        if at + part.len() > head_bytes.len() {
            return None;
        }
        u32::try_from(at).ok()
    };
    let mut at = [HeaderAt::default(); HEADERS_COUNT_HARD_MAX];
    let headers_len = req.headers.len();
    for (slot, h) in at.iter_mut().zip(req.headers.iter()) {
        let (Some(name_at), Some(value_at)) = (offset(h.name.as_bytes()), offset(h.value)) else {
            // httparse hands out slices of the head; anything else is refused, not trusted.
            return Err(InvalidRequest::Syntax("header outside the head").into());
        };
        *slot = HeaderAt {
            name_at,
            name_len: h.name.len() as u32,
            value_at,
            value_len: h.value.len() as u32,
        };
    }
    let version = match minor {
        0 => Version::Http10,
        1 => Version::Http11,
        _ => return Err(InvalidRequest::UnsupportedVersion.into()),
    };
    let method = Method::from_token(method_str);
    let (path, query) = split_target(method, target)?;

    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_count = 0u32;
    let mut te_last_is_chunked = false;
    let mut te_other = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut connection_upgrade = false;
    let mut expect_continue = false;
    let mut host_count = 0u32;
    for h in req.headers.iter() {
        // Dispatch on length first: most headers match none of these names.
        let name = h.name;
        let is = |want: &str| name.eq_ignore_ascii_case(want);
        match name.len() {
            14 if is("content-length") => {
                let n = parse_content_length(h.value)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(InvalidRequest::ConflictingContentLength.into());
                }
                content_length = Some(n);
            }
            17 if is("transfer-encoding") => {
                te_seen = true;
                for coding in tokens(h.value) {
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        te_chunked_count += 1;
                        te_last_is_chunked = true;
                    } else {
                        te_other = true;
                        te_last_is_chunked = false;
                    }
                }
            }
            10 if is("connection") => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep_alive = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    }
                }
            }
            4 if is("host") => host_count += 1,
            6 if is("expect") => {
                expect_continue = trim_ows(h.value).eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
    }

    if host_count > 1 {
        return Err(InvalidRequest::DuplicateHost.into());
    }
    if host_count == 0 && version == Version::Http11 && limits.host_required {
        return Err(InvalidRequest::MissingHost.into());
    }
    let body = if te_seen {
        // RFC 9112 §6.1: TE in HTTP/1.0 and TE with CL are framing faults, not choices.
        if version == Version::Http10 {
            return Err(InvalidRequest::TransferEncodingInHttp10.into());
        }
        if content_length.is_some() {
            return Err(InvalidRequest::TransferEncodingWithContentLength.into());
        }
        if !te_last_is_chunked || te_chunked_count != 1 {
            return Err(InvalidRequest::BadTransferEncoding.into());
        }
        if te_other {
            return Err(InvalidRequest::UnsupportedTransferEncoding.into());
        }
        if !limits.chunked_body_allowed {
            return Err(InvalidRequest::LengthRequired.into());
        }
        BodyFraming::Chunked
    } else if let Some(n) = content_length {
        if n > limits.body_bytes_max {
            return Err(InvalidRequest::BodyTooLarge.into());
        }
        if n == 0 {
            BodyFraming::None
        } else {
            BodyFraming::Length(n)
        }
    } else {
        BodyFraming::None
    };
    let keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };

    Ok(RequestHead {
        method,
        method_str,
        target,
        path,
        query,
        version,
        body,
        keep_alive,
        connection_upgrade,
        expect_continue,
        head_len,
        head_bytes,
        headers: at,
        headers_len,
    })
}

/// Refuses a request line longer than the limit, whether or not it is complete yet.
fn check_request_line(scan: &[u8], limits: &HttpLimits) -> Result<(), InvalidRequest> {
    if scan.len() <= limits.request_line_bytes_max {
        return Ok(());
    }
    // httparse skips empty lines before the request line (RFC 9112 §2.2); so do we.
    let start = scan
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(scan.len());
    let line = &scan[start..];
    let window = &line[..line.len().min(limits.request_line_bytes_max + 2)];
    let line_len = match window.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && window[i - 1] == b'\r' => i - 1,
        Some(i) => i,
        // A CR at the end may be the first half of the CRLF: not part of the line.
        None => window.len() - usize::from(window.last() == Some(&b'\r')),
    };
    if line_len > limits.request_line_bytes_max {
        return Err(InvalidRequest::UriTooLong);
    }
    Ok(())
}

/// 505 only for a well-formed `HTTP/x.y` that is not 1.0 or 1.1; any other bytes where the
/// version belongs (for instance a space inside the target) are a 400.
fn version_error(scan: &[u8]) -> InvalidRequest {
    let start = scan
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(scan.len());
    let line = &scan[start..];
    let line = &line[..line
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(line.len())];
    let mut parts = line.split(|&b| b == b' ');
    let version = (parts.next(), parts.next(), parts.next(), parts.next());
    match version {
        (Some(_), Some(_), Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]), None)
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            InvalidRequest::UnsupportedVersion
        }
        _ => InvalidRequest::Syntax("invalid request line or HTTP version"),
    }
}

fn map_httparse_error(e: httparse::Error) -> InvalidRequest {
    match e {
        httparse::Error::TooManyHeaders => InvalidRequest::TooManyHeaders,
        httparse::Error::Version => InvalidRequest::UnsupportedVersion,
        httparse::Error::HeaderName => InvalidRequest::Syntax("invalid header name"),
        httparse::Error::HeaderValue => InvalidRequest::Syntax("invalid header value"),
        httparse::Error::NewLine => InvalidRequest::Syntax("invalid line ending"),
        httparse::Error::Token => InvalidRequest::Syntax("invalid token in request line"),
        httparse::Error::Status => InvalidRequest::Syntax("invalid status"),
    }
}

/// Splits the target into path and query; accepts origin-form, absolute-form (RFC 9112 §3.2.2)
/// and `*` for OPTIONS.
fn split_target(method: Method, target: &str) -> Result<(&str, Option<&str>), InvalidRequest> {
    if target.contains('#') {
        return Err(InvalidRequest::BadTarget);
    }
    let path_and_query = if target.starts_with('/') {
        target
    } else if target == "*" {
        if method != Method::Options {
            return Err(InvalidRequest::BadTarget);
        }
        return Ok(("*", None));
    } else if let Some(rest) = strip_prefix_ignore_case(target, "http://")
        .or_else(|| strip_prefix_ignore_case(target, "https://"))
    {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if authority_end == 0 {
            return Err(InvalidRequest::BadTarget);
        }
        &rest[authority_end..]
    } else {
        return Err(InvalidRequest::BadTarget);
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    Ok((if path.is_empty() { "/" } else { path }, query))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `Content-Length = 1*DIGIT`; anything else (sign, spaces inside, lists) is refused.
fn parse_content_length(value: &[u8]) -> Result<u64, InvalidRequest> {
    let digits = trim_ows(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(InvalidRequest::BadContentLength);
    }
    let mut n: u64 = 0;
    for &d in digits {
        // A length that overflows u64 is over any body limit.
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(InvalidRequest::BodyTooLarge)?;
    }
    Ok(n)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The non-empty elements of a comma-separated header list, OWS trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests;
