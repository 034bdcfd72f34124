//! Minimal HTTP/1.1 client codec for the generator: pre-built requests, and a response parser
//! that finds the status and the body's framing (Content-Length, chunked, until close) without
//! allocating, so the hot loop can check and skip a response in place.
//!
//! It knows nothing about sockets: the connection loop feeds it bytes and reads back how many
//! it consumed. `parse_head` needs the whole head in one slice (heads are small and bounded);
//! bodies are consumed incrementally so a large body never has to fit the read buffer.

use thiserror::Error;

/// A response the parser could not read; the hot loop counts it under `parse` and drops the
/// connection, because its framing can no longer be trusted.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// More bytes are needed; nothing is wrong yet.
    #[error("incomplete response")]
    Incomplete,
    /// The bytes are not a valid HTTP/1.x response (the reason names the part).
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

/// How the body of a response is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: 1xx, 204, 304, or a response to HEAD.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither header: the body runs until the server closes the connection.
    UntilClose,
}

/// The part of a response head the generator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub body: BodyKind,
    /// The server will close after this response (`Connection: close` or HTTP/1.0 without
    /// keep-alive): the next request needs a new connection.
    pub close: bool,
    /// Bytes of the head including the blank line.
    pub head_len: usize,
}

/// Parse a response head from the start of `buf`.
///
/// `Incomplete` while the blank line that ends the head is missing and `buf` is shorter than
/// `head_bytes_max`; `Invalid` past that bound, so a server that never ends its head cannot
/// make the reader buffer forever.
pub fn parse_head(buf: &[u8], head_bytes_max: usize) -> Result<ResponseHead, ParseError> {
    let Some(end) = find_head_end(buf) else {
        if buf.len() >= head_bytes_max {
            return Err(ParseError::Invalid("head longer than head_bytes_max"));
        }
        return Err(ParseError::Incomplete);
    };
    if end > head_bytes_max {
        return Err(ParseError::Invalid("head longer than head_bytes_max"));
    }
    let head = &buf[..end];
    let mut lines = head.split(|&b| b == b'\n').map(trim_cr);
    let status_line = lines.next().ok_or(ParseError::Invalid("empty head"))?;
    let (http10, status) = parse_status_line(status_line)?;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(ParseError::Invalid("header line without colon"))?;
        let name = &line[..colon];
        let value = trim_ows(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_decimal(value).ok_or(ParseError::Invalid("bad content-length"))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(ParseError::Invalid("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only the final coding decides the framing; `chunked` must be last when present.
            let last = value
                .rsplit(|&b| b == b',')
                .next()
                .map(trim_ows)
                .unwrap_or(b"");
            chunked = last.eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(ParseError::Invalid(
                    "transfer-encoding without final chunked",
                ));
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyKind::Empty
    } else if chunked {
        // RFC 9112 6.3: Transfer-Encoding overrides Content-Length.
        BodyKind::Chunked
    } else if let Some(n) = content_length {
        if n == 0 {
            BodyKind::Empty
        } else {
            BodyKind::Length(n)
        }
    } else {
        BodyKind::UntilClose
    };
    if body == BodyKind::UntilClose {
        close = true;
    }
    Ok(ResponseHead {
        status,
        body,
        close,
        head_len: end,
    })
}

/// Index just past the `\r\n\r\n` (or bare `\n\n`) that ends the head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let rest = &buf[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        if rest.is_empty() || rest == b"\r" {
            return None;
        }
        i = nl + 1;
    }
    None
}

fn parse_status_line(line: &[u8]) -> Result<(bool, u16), ParseError> {
    // "HTTP/1.1 200 OK": version, one space, three digits, then anything.
    if line.len() < 12 || !line.starts_with(b"HTTP/1.") || line[8] != b' ' {
        return Err(ParseError::Invalid("bad status line"));
    }
    let http10 = match line[7] {
        b'0' => true,
        b'1' => false,
        _ => return Err(ParseError::Invalid("unsupported HTTP version")),
    };
    let digits = &line[9..12];
    if !digits.iter().all(u8::is_ascii_digit) || line.get(12).is_some_and(|&b| b != b' ') {
        return Err(ParseError::Invalid("bad status code"));
    }
    let status = digits
        .iter()
        .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(ParseError::Invalid("status code out of range"));
    }
    Ok((http10, status))
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Longest chunk-size line (size, extensions, CRLF) the chunked reader accepts.
pub const CHUNK_LINE_BYTES_MAX: usize = 1024;

/// Incremental body reader: feed it whatever bytes arrived, it says how many belong to the
/// body and whether the body is complete. Body bytes are handed to `sink` (a no-op in the hot
/// loop, a `Vec` in setup code that needs the JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyReader {
    Length { remaining: u64 },
    Chunked(ChunkState),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data.
    Data { remaining: u64 },
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last (zero) chunk: trailer lines until an empty one.
    Trailer,
}

impl BodyReader {
    pub fn new(kind: BodyKind) -> Self {
        match kind {
            BodyKind::Empty => BodyReader::Done,
            BodyKind::Length(n) => BodyReader::Length { remaining: n },
            BodyKind::Chunked => BodyReader::Chunked(ChunkState::Size),
            BodyKind::UntilClose => BodyReader::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == BodyReader::Done
    }

    /// Consume body bytes from `buf`; returns how many were consumed. Stops early (with
    /// bytes left) when a chunk line is not complete yet, or when the body is done.
    pub fn feed(&mut self, buf: &[u8], mut sink: impl FnMut(&[u8])) -> Result<usize, ParseError> {
        let mut pos = 0;
        loop {
            match self {
                BodyReader::Done => return Ok(pos),
                BodyReader::UntilClose => {
                    sink(&buf[pos..]);
                    return Ok(buf.len());
                }
                BodyReader::Length { remaining } => {
                    let take = (*remaining).min((buf.len() - pos) as u64) as usize;
                    sink(&buf[pos..pos + take]);
                    pos += take;
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        *self = BodyReader::Done;
                    }
                    return Ok(pos);
                }
                BodyReader::Chunked(state) => {
                    let rest = &buf[pos..];
                    match *state {
                        ChunkState::Size => {
                            let Some(line) = take_line(rest)? else {
                                return Ok(pos);
                            };
                            let text = trim_cr(&rest[..line - 1]);
                            let size_part = text.split(|&b| b == b';').next().unwrap_or(b"");
                            let size = parse_hex(trim_ows(size_part))
                                .ok_or(ParseError::Invalid("bad chunk size"))?;
                            pos += line;
                            *state = if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data { remaining: size }
                            };
                        }
                        ChunkState::Data { remaining } => {
                            if rest.is_empty() {
                                return Ok(pos);
                            }
                            let take = remaining.min(rest.len() as u64) as usize;
                            sink(&rest[..take]);
                            pos += take;
                            let left = remaining - take as u64;
                            *state = if left == 0 {
                                ChunkState::DataEnd
                            } else {
                                ChunkState::Data { remaining: left }
                            };
                        }
                        ChunkState::DataEnd => {
                            let Some(line) = take_line(rest)? else {
                                return Ok(pos);
                            };
                            if !trim_cr(&rest[..line - 1]).is_empty() {
                                return Err(ParseError::Invalid("chunk data longer than its size"));
                            }
                            pos += line;
                            *state = ChunkState::Size;
                        }
                        ChunkState::Trailer => {
                            let Some(line) = take_line(rest)? else {
                                return Ok(pos);
                            };
                            pos += line;
                            if trim_cr(&rest[..line - 1]).is_empty() {
                                *self = BodyReader::Done;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Length of the first line including its `\n`, `None` if it is not complete yet.
fn take_line(buf: &[u8]) -> Result<Option<usize>, ParseError> {
    match buf
        .iter()
        .take(CHUNK_LINE_BYTES_MAX)
        .position(|&b| b == b'\n')
    {
        Some(i) => Ok(Some(i + 1)),
        None if buf.len() >= CHUNK_LINE_BYTES_MAX => Err(ParseError::Invalid(
            "chunk line longer than CHUNK_LINE_BYTES_MAX",
        )),
        None => Ok(None),
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 15 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some(acc * 16 + u64::from(v))
    })
}

/// Build one request's bytes: built once at startup and re-sent as is.
pub fn build_request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + path.len() + body.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(kind: BodyKind, bytes: &[u8]) -> (Vec<u8>, usize, bool) {
        let mut r = BodyReader::new(kind);
        let mut out = Vec::new();
        let n = r.feed(bytes, |b| out.extend_from_slice(b)).unwrap();
        (out, n, r.is_done())
    }

    #[test]
    fn content_length_response() {
        let raw = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\ncontent-length: 5\r\n\r\nhello";
        let h = parse_head(raw, 8192).unwrap();
        assert_eq!(h.status, 201);
        assert_eq!(h.body, BodyKind::Length(5));
        assert!(!h.close);
        let (body, n, done) = body_of(h.body, &raw[h.head_len..]);
        assert_eq!((body.as_slice(), n, done), (&b"hello"[..], 5, true));
    }

    #[test]
    fn incomplete_head_then_too_long() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n", 64),
            Err(ParseError::Incomplete)
        );
        let long = vec![b'a'; 64];
        assert!(matches!(parse_head(&long, 64), Err(ParseError::Invalid(_))));
    }

    #[test]
    fn invalid_status_lines() {
        for raw in [
            &b"HTTP/2.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTX/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(raw, 8192), Err(ParseError::Invalid(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn connection_close_and_http10() {
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            8192,
        )
        .unwrap();
        assert!(h.close);
        assert_eq!(h.body, BodyKind::Empty);
        let h = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", 8192).unwrap();
        assert!(h.close);
        let h = parse_head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            8192,
        )
        .unwrap();
        assert!(!h.close);
        let h = parse_head(b"HTTP/1.1 200 OK\r\n\r\n", 8192).unwrap();
        assert_eq!(h.body, BodyKind::UntilClose);
        assert!(h.close);
        let h = parse_head(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
            8192,
        )
        .unwrap();
        assert_eq!(h.body, BodyKind::Empty);
    }

    #[test]
    fn chunked_whole_and_byte_by_byte() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        let h = parse_head(raw, 8192).unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
        let body = &raw[h.head_len..];
        let (out, n, done) = body_of(h.body, body);
        assert_eq!(
            (out.as_slice(), n, done),
            (&b"hello world"[..], body.len(), true)
        );

        // Same body arriving one byte at a time: the caller keeps unconsumed bytes.
        let mut r = BodyReader::new(h.body);
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for &b in body {
            pending.push(b);
            let n = r.feed(&pending, |d| out.extend_from_slice(d)).unwrap();
            pending.drain(..n);
        }
        assert!(r.is_done());
        assert!(pending.is_empty());
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn chunked_errors() {
        let mut r = BodyReader::new(BodyKind::Chunked);
        assert!(r.feed(b"zz\r\n", |_| {}).is_err());
        let mut r = BodyReader::new(BodyKind::Chunked);
        assert!(r.feed(b"2\r\nabc\r\n", |_| {}).is_err());
        let mut r = BodyReader::new(BodyKind::Chunked);
        let long = vec![b'1'; CHUNK_LINE_BYTES_MAX + 1];
        assert!(r.feed(&long, |_| {}).is_err());
    }

    #[test]
    fn length_body_leaves_next_response() {
        let (out, n, done) = body_of(BodyKind::Length(3), b"abcHTTP/1.1");
        assert_eq!((out.as_slice(), n, done), (&b"abc"[..], 3, true));
    }

    #[test]
    fn request_bytes() {
        let r = build_request("POST", "127.0.0.1:80", "/x", &[("A", "b")], b"{}");
        assert_eq!(
            r,
            b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:80\r\nA: b\r\nContent-Length: 2\r\n\r\n{}"
        );
    }
}
