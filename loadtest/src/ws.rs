//! Minimal WebSocket client (RFC 6455): the upgrade request and its check, masked frames out,
//! unmasked frames in. Written here rather than taken from the gateway's codec, so the load
//! tester checks kefu against an independent reading of the RFC.

use std::time::Instant;

use base64::Engine as _;
use sha1::{Digest, Sha1};
use thiserror::Error;

use crate::conn::Conn;
use crate::http1::{ParseError, parse_head};
use crate::stats::ErrorKind;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    #[error("incomplete frame")]
    Incomplete,
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

/// The upgrade request for `path` (with its query) and the base64 key it carries.
pub fn handshake_request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A fresh 16-byte key, base64: unique per connection (it only has to differ, not be secret).
pub fn new_key(seed: u64) -> String {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut raw = [0u8; 16];
    for chunk in raw.chunks_mut(8) {
        x = splitmix(x);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `Sec-WebSocket-Accept` for `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Check the server's answer to the upgrade: 101 with the right accept value. Returns the
/// head length, or the HTTP status when the upgrade was refused (e.g. 401, 403).
pub fn check_handshake(
    buf: &[u8],
    key: &str,
    head_bytes_max: usize,
) -> Result<usize, HandshakeFail> {
    let head = match parse_head(buf, head_bytes_max) {
        Ok(h) => h,
        Err(ParseError::Incomplete) => return Err(HandshakeFail::Incomplete),
        Err(ParseError::Invalid(why)) => return Err(HandshakeFail::Invalid(why)),
    };
    if head.status != 101 {
        return Err(HandshakeFail::Status(head.status));
    }
    let want = accept_for(key);
    let text = &buf[..head.head_len];
    let ok = text.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match line.iter().position(|&b| b == b':') {
            Some(i) => {
                line[..i].eq_ignore_ascii_case(b"sec-websocket-accept")
                    && line[i + 1..].trim_ascii() == want.as_bytes()
            }
            None => false,
        }
    });
    if !ok {
        return Err(HandshakeFail::Invalid(
            "missing or wrong Sec-WebSocket-Accept",
        ));
    }
    Ok(head.head_len)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFail {
    Incomplete,
    Invalid(&'static str),
    Status(u16),
}

/// Append one masked client frame.
pub fn encode_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// One server frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Decode one frame from the start of `buf`; returns it and the bytes it used.
pub fn decode_frame(buf: &[u8], payload_bytes_max: usize) -> Result<(Frame<'_>, usize), WsError> {
    if buf.len() < 2 {
        return Err(WsError::Incomplete);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(WsError::Invalid("reserved bits set"));
    }
    let opcode = buf[0] & 0x0F;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::Invalid("unknown opcode"));
    }
    if buf[1] & 0x80 != 0 {
        return Err(WsError::Invalid("server frames must not be masked"));
    }
    let (len, at) = match buf[1] & 0x7F {
        126 => {
            let b = buf.get(2..4).ok_or(WsError::Incomplete)?;
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let b = buf.get(2..10).ok_or(WsError::Incomplete)?;
            (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE && (len > 125 || !fin) {
        return Err(WsError::Invalid("control frame too long or fragmented"));
    }
    if len > payload_bytes_max as u64 {
        return Err(WsError::Invalid("frame longer than payload_bytes_max"));
    }
    let end = at + len as usize;
    if buf.len() < end {
        return Err(WsError::Incomplete);
    }
    Ok((
        Frame {
            fin,
            opcode,
            payload: &buf[at..end],
        },
        end,
    ))
}

/// What `WsClient::read` returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A whole text or binary message, now in `WsClient::message`.
    Message,
    /// A pong (its payload in `WsClient::message`).
    Pong,
}

/// A WebSocket client connection over `Conn`, reusing its buffers message after message.
pub struct WsClient {
    pub conn: Conn,
    /// The last message read.
    pub message: Vec<u8>,
    out: Option<Vec<u8>>,
    mask_state: u64,
    payload_bytes_max: usize,
    /// Close code from the server, if it sent a close frame.
    pub close_code: Option<u16>,
}

impl WsClient {
    /// Upgrade `conn` by requesting `path` (e.g. `/v1/ws?token=...`).
    pub async fn handshake(
        mut conn: Conn,
        host: &str,
        path: &str,
        seed: u64,
        payload_bytes_max: usize,
        deadline: Instant,
    ) -> Result<WsClient, ErrorKind> {
        let key = new_key(seed);
        conn.write_all(handshake_request(host, path, &key), deadline)
            .await?;
        loop {
            match check_handshake(conn.data(), &key, 16 * 1024) {
                Ok(n) => {
                    conn.consume(n);
                    break;
                }
                Err(HandshakeFail::Incomplete) => conn.fill(deadline).await?,
                Err(HandshakeFail::Invalid(_)) => return Err(ErrorKind::Parse),
                Err(HandshakeFail::Status(s)) => return Err(ErrorKind::from_status(s)),
            }
        }
        Ok(WsClient {
            conn,
            message: Vec::with_capacity(4096),
            out: Some(Vec::with_capacity(4096)),
            mask_state: seed | 1,
            payload_bytes_max,
            close_code: None,
        })
    }

    fn next_mask(&mut self) -> [u8; 4] {
        self.mask_state = splitmix(self.mask_state);
        (self.mask_state as u32).to_le_bytes()
    }

    pub async fn send(
        &mut self,
        opcode: u8,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(), ErrorKind> {
        let mask = self.next_mask();
        let mut out = self.out.take().unwrap_or_default();
        out.clear();
        encode_frame(&mut out, true, opcode, payload, mask);
        let (res, buf) = self.conn.write_vec(out, deadline).await;
        self.out = buf;
        res
    }

    pub async fn send_text(&mut self, text: &str, deadline: Instant) -> Result<(), ErrorKind> {
        self.send(OP_TEXT, text.as_bytes(), deadline).await
    }

    /// Read until a whole message or a pong arrives; answers pings on the way. A close frame
    /// (its code kept in `close_code`) or a closed socket is `Closed`.
    pub async fn read(&mut self, deadline: Instant) -> Result<Incoming, ErrorKind> {
        self.message.clear();
        let mut in_fragments = false;
        // Control payloads are at most 125 bytes: a ping's is copied here to echo it.
        let mut ping = [0u8; 125];
        let mut ping_len = 0;
        loop {
            let decoded = decode_frame(self.conn.data(), self.payload_bytes_max);
            let (fin, opcode, used) = match decoded {
                Ok((f, used)) => {
                    match f.opcode {
                        OP_TEXT | OP_BINARY | OP_CONT | OP_PONG => {
                            self.message.extend_from_slice(f.payload)
                        }
                        OP_PING => {
                            ping_len = f.payload.len();
                            ping[..ping_len].copy_from_slice(f.payload);
                        }
                        OP_CLOSE => {
                            self.close_code =
                                f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        }
                        _ => {}
                    }
                    (f.fin, f.opcode, used)
                }
                Err(WsError::Incomplete) => {
                    self.conn.fill(deadline).await?;
                    continue;
                }
                Err(WsError::Invalid(_)) => return Err(ErrorKind::Parse),
            };
            self.conn.consume(used);
            match opcode {
                OP_PING => self.send(OP_PONG, &ping[..ping_len], deadline).await?,
                OP_PONG => return Ok(Incoming::Pong),
                OP_CLOSE => return Err(ErrorKind::Closed),
                OP_TEXT | OP_BINARY if in_fragments => return Err(ErrorKind::Parse),
                OP_CONT if !in_fragments => return Err(ErrorKind::Parse),
                _ => {
                    if self.message.len() > self.payload_bytes_max {
                        return Err(ErrorKind::Parse);
                    }
                    if fin {
                        return Ok(Incoming::Message);
                    }
                    in_fragments = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_accept_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn masked_frame_matches_rfc_example() {
        // RFC 6455 section 5.7: a masked "Hello".
        let mut out = Vec::new();
        encode_frame(&mut out, true, OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
    }

    #[test]
    fn decodes_server_frames() {
        let (f, n) = decode_frame(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o', 0xff], 1024).unwrap();
        assert_eq!(
            (f.fin, f.opcode, f.payload, n),
            (true, OP_TEXT, &b"Hello"[..], 7)
        );
        let mut long = vec![0x82, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        let (f, n) = decode_frame(&long, 1024).unwrap();
        assert_eq!((f.payload.len(), n), (256, 260));
        assert_eq!(
            decode_frame(&long[..100], 1024).unwrap_err(),
            WsError::Incomplete
        );
        assert!(matches!(decode_frame(&long, 100), Err(WsError::Invalid(_))));
        assert!(matches!(
            decode_frame(&[0x81, 0x85, 0, 0, 0, 0, 0], 1024),
            Err(WsError::Invalid(_))
        ));
        assert!(matches!(
            decode_frame(&[0x83, 0x00], 1024),
            Err(WsError::Invalid(_))
        ));
        assert!(matches!(
            decode_frame(&[0x09, 0x00], 1024),
            Err(WsError::Invalid(_))
        ));
    }

    #[test]
    fn handshake_check() {
        let key = new_key(7);
        assert_ne!(key, new_key(8));
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n\x01\x00",
            accept_for(&key)
        );
        assert_eq!(check_handshake(ok.as_bytes(), &key, 4096), Ok(ok.len() - 2));
        let bad = "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: xyz\r\n\r\n";
        assert!(matches!(
            check_handshake(bad.as_bytes(), &key, 4096),
            Err(HandshakeFail::Invalid(_))
        ));
        let refused = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_handshake(refused.as_bytes(), &key, 4096),
            Err(HandshakeFail::Status(401))
        );
    }
}
