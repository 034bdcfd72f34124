//! Query strings: `key=value` pairs split on `&`, and percent-decoding (`+` is a space, as
//! HTML forms and most clients send it).

use std::borrow::Cow;

/// Why a percent-encoded string could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PercentDecodeError {
    #[error("`%` not followed by two hex digits")]
    BadEscape,
    #[error("decoded bytes are not UTF-8")]
    NotUtf8,
}

/// The raw (still encoded) `(key, value)` pairs of a query, skipping empty segments. A segment
/// without `=` has an empty value.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|s| s.split_once('=').unwrap_or((s, "")))
}

/// The decoded value of the first pair whose decoded key is `key`.
pub fn query_get<'q>(
    query: &'q str,
    key: &str,
) -> Option<Result<Cow<'q, str>, PercentDecodeError>> {
    query_pairs(query)
        .find(|(k, _)| match percent_decode(k) {
            Ok(k) => k == key,
            Err(_) => false,
        })
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+`; borrows when there is nothing to decode.
pub fn percent_decode(raw: &str) -> Result<Cow<'_, str>, PercentDecodeError> {
    let bytes = raw.as_bytes();
    if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).and_then(|&b| hex_value(b)),
                    bytes.get(i + 2).and_then(|&b| hex_value(b)),
                ) else {
                    return Err(PercentDecodeError::BadEscape);
                };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| PercentDecodeError::NotUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
