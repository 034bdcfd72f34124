//! `Transfer-Encoding: chunked` request bodies (RFC 9112 §7.1): validation and zero-copy reading.
//!
//! [`parse`] validates the whole chunked body in one pass (strict CRLF, hex sizes without
//! overflow, bounded size lines and trailers, total within `body_bytes_max`) and reports the
//! bytes used. Only then is the body handed out as a [`ChunkedBody`], whose data can be
//! iterated chunk by chunk without copying. Trailer fields are checked for shape and skipped:
//! kefu gives them no meaning.
//!
//! Each call re-validates from the first chunk, so a body arriving in `k` reads costs
//! `O(k * chunk_count)` size-line scans (the data itself is skipped, not scanned). That is why
//! the chunk count has a hard bound, [`CHUNKS_COUNT_MAX`]: a peer sending tiny chunks a byte at
//! a time cannot make the work per read grow with the body.

use super::{HttpLimits, InvalidRequest, ParseError};

/// Most data chunks one request body may have (413 above it). Real clients send few, large
/// chunks (curl: one per 64 KiB read); this bounds the re-validation work per read.
pub const CHUNKS_COUNT_MAX: u32 = 4096;

/// A validated chunked body borrowed from the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedBody<'b> {
    /// The encoded chunks up to and including the last-chunk line `0\r\n` (trailers excluded).
    raw: &'b [u8],
    decoded_len: u64,
    chunk_count: u32,
}

impl<'b> ChunkedBody<'b> {
    /// Length of the decoded data.
    pub fn decoded_len(&self) -> u64 {
        self.decoded_len
    }

    /// The data slices in order, without copying.
    pub fn chunks(&self) -> Chunks<'b> {
        Chunks { rest: self.raw }
    }

    /// The data as one slice when the body has at most one data chunk.
    pub fn as_single_chunk(&self) -> Option<&'b [u8]> {
        match self.chunk_count {
            0 => Some(&[]),
            1 => self.chunks().next(),
            _ => None,
        }
    }

    /// Appends the decoded data to `out`.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        // decoded_len <= body_bytes_max, which the caller chose to hold in memory.
        out.reserve(usize::try_from(self.decoded_len).unwrap_or(0));
        for chunk in self.chunks() {
            out.extend_from_slice(chunk);
        }
    }
}

/// Iterator over the data slices of a [`ChunkedBody`].
#[derive(Debug, Clone)]
pub struct Chunks<'b> {
    rest: &'b [u8],
}

impl<'b> Iterator for Chunks<'b> {
    type Item = &'b [u8];

    fn next(&mut self) -> Option<&'b [u8]> {
        // `rest` was validated by `parse`; every `?` below is only a guard against panics.
        let nl = self.rest.iter().position(|&b| b == b'\n')?;
        // The line ends in CRLF; parse_size wants the content without the CR.
        let (size, _) = parse_size(&self.rest[..nl.saturating_sub(1)]).ok()?;
        let size = usize::try_from(size).ok()?;
        if size == 0 {
            self.rest = &[];
            return None;
        }
        let data_start = nl + 1;
        let data_end = data_start.checked_add(size)?;
        let data = self.rest.get(data_start..data_end)?;
        self.rest = self.rest.get(data_end + 2..).unwrap_or(&[]);
        Some(data)
    }
}

/// Validates a chunked body at the start of `buf`; returns it and the bytes used (through the
/// blank line after the trailers).
pub(super) fn parse<'b>(
    buf: &'b [u8],
    limits: &HttpLimits,
) -> Result<(ChunkedBody<'b>, usize), ParseError> {
    let mut pos = 0usize;
    let mut total: u64 = 0;
    let mut chunk_count: u32 = 0;
    loop {
        let line = read_line(&buf[pos..], limits.chunk_line_bytes_max, "chunk-size line")?;
        let (size, _ext) = parse_size(line.content).map_err(InvalidRequest::BadChunk)?;
        total = total
            .checked_add(size)
            .filter(|&t| t <= limits.body_bytes_max)
            .ok_or(InvalidRequest::BodyTooLarge)?;
        pos += line.len_with_crlf;
        if size == 0 {
            break;
        }
        chunk_count += 1;
        if chunk_count > CHUNKS_COUNT_MAX {
            return Err(InvalidRequest::TooManyChunks.into());
        }
        // size <= body_bytes_max, which fits in memory, so usize arithmetic below cannot wrap.
        let size = usize::try_from(size).map_err(|_| InvalidRequest::BodyTooLarge)?;
        let available = buf.len() - pos;
        if available < size + 2 {
            return Err(ParseError::Incomplete {
                needed: size + 2 - available,
            });
        }
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(InvalidRequest::BadChunk("chunk data not followed by CRLF").into());
        }
        pos += size + 2;
    }
    let raw_end = pos;
    // Trailer section: field lines, then an empty line. Bounded like a head.
    let mut trailer_bytes = 0usize;
    loop {
        let line = read_line(&buf[pos..], limits.head_bytes_max, "trailer line")?;
        pos += line.len_with_crlf;
        if line.content.is_empty() {
            break;
        }
        trailer_bytes += line.len_with_crlf;
        if trailer_bytes > limits.head_bytes_max {
            return Err(InvalidRequest::HeadTooLarge.into());
        }
        check_trailer_field(line.content)?;
    }
    Ok((
        ChunkedBody {
            raw: &buf[..raw_end],
            decoded_len: total,
            chunk_count,
        },
        pos,
    ))
}

struct Line<'b> {
    content: &'b [u8],
    len_with_crlf: usize,
}

/// One CRLF-terminated line of at most `max` content bytes; bare LF is refused.
fn read_line<'b>(buf: &'b [u8], max: usize, what: &'static str) -> Result<Line<'b>, ParseError> {
    let window = &buf[..buf.len().min(max + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(InvalidRequest::BadChunk("bare LF").into()),
        Some(i) if window[i - 1] != b'\r' => Err(InvalidRequest::BadChunk("bare LF").into()),
        Some(i) if i - 1 > max => Err(too_long(what)),
        Some(i) => Ok(Line {
            content: &window[..i - 1],
            len_with_crlf: i + 1,
        }),
        // A CR must only come right before the LF.
        None if window.len() >= 2 && window[..window.len() - 1].contains(&b'\r') => {
            Err(InvalidRequest::BadChunk("CR not followed by LF").into())
        }
        None if window.len() > max + 1 => Err(too_long(what)),
        None => Err(ParseError::Incomplete { needed: 1 }),
    }
}

fn too_long(what: &'static str) -> ParseError {
    if what == "trailer line" {
        InvalidRequest::HeadTooLarge.into()
    } else {
        InvalidRequest::BadChunk("chunk-size line longer than the limit").into()
    }
}

/// `chunk-size [ BWS ";" chunk-ext ]`: returns the size and the raw extensions.
fn parse_size(line: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits_end == 0 {
        return Err("chunk size is not hexadecimal");
    }
    let mut size: u64 = 0;
    for &d in &line[..digits_end] {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        size = size
            .checked_mul(16)
            .map(|s| s | u64::from(v))
            .ok_or("chunk size overflows")?;
    }
    let mut rest = &line[digits_end..];
    while let [b' ' | b'\t', r @ ..] = rest {
        rest = r;
    }
    match rest {
        [] => Ok((size, rest)),
        [b';', ext @ ..] => {
            // Extensions are ignored, but must be visible characters (no control bytes).
            if ext
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
            {
                Ok((size, ext))
            } else {
                Err("control byte in chunk extension")
            }
        }
        _ => Err("junk after chunk size"),
    }
}

fn check_trailer_field(line: &[u8]) -> Result<(), InvalidRequest> {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(InvalidRequest::BadChunk("trailer line without a colon"));
    };
    let name = &line[..colon];
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return Err(InvalidRequest::BadChunk("invalid trailer field name"));
    }
    if line[colon + 1..]
        .iter()
        .any(|&b| b != b'\t' && (b < b' ' || b == 0x7f))
    {
        return Err(InvalidRequest::BadChunk("control byte in trailer value"));
    }
    Ok(())
}
