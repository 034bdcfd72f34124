//! The WebSocket opening handshake (RFC 6455 §4.2): checking the client's upgrade request and
//! writing the `101 Switching Protocols` answer with `Sec-WebSocket-Accept`.
//!
//! No extension is negotiated (a `Sec-WebSocket-Extensions` offer is ignored, which declines
//! it), so every frame must have RSV1-3 clear.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest as _, Sha1};

use crate::http::{BodyFraming, Method, RequestHead, ResponseHead, Version, write_json_error};

/// The GUID RFC 6455 §1.3 appends to the client's key.
pub const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The only protocol version RFC 6455 defines.
pub const WEBSOCKET_VERSION: &str = "13";

/// Why an upgrade request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a WebSocket upgrade must be a GET")]
    NotGet,
    #[error("a WebSocket upgrade needs HTTP/1.1")]
    NotHttp11,
    #[error("this endpoint needs `Upgrade: websocket`")]
    NotUpgrade,
    #[error("`Connection` must list `upgrade`")]
    MissingConnectionUpgrade,
    #[error("unsupported Sec-WebSocket-Version (only 13)")]
    BadVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    #[error("Sec-WebSocket-Key is not 16 bytes in base64")]
    BadKey,
    #[error("a WebSocket upgrade request must not have a body")]
    HasBody,
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            Self::NotGet => 405,
            Self::NotUpgrade | Self::BadVersion => 426,
            Self::NotHttp11
            | Self::MissingConnectionUpgrade
            | Self::MissingKey
            | Self::BadKey
            | Self::HasBody => 400,
        }
    }
}

/// A valid upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsUpgrade<'b> {
    /// The client's `Sec-WebSocket-Key` as sent.
    pub key: &'b str,
    /// The raw `Sec-WebSocket-Protocol` offer, if any.
    pub protocols: Option<&'b str>,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept: [u8; 28],
}

impl WsUpgrade<'_> {
    pub fn accept_str(&self) -> &str {
        // base64 output is ASCII.
        std::str::from_utf8(&self.accept).unwrap_or("")
    }
}

/// Whether the request asks for a WebSocket (`Upgrade` lists `websocket`).
pub fn is_upgrade_request(head: &RequestHead<'_>) -> bool {
    head.header_has_token("upgrade", "websocket")
}

/// Checks an upgrade request per RFC 6455 §4.2.1.
pub fn check_upgrade<'b>(head: &RequestHead<'b>) -> Result<WsUpgrade<'b>, HandshakeError> {
    if head.method != Method::Get {
        return Err(HandshakeError::NotGet);
    }
    if head.version != Version::Http11 {
        return Err(HandshakeError::NotHttp11);
    }
    if !is_upgrade_request(head) {
        return Err(HandshakeError::NotUpgrade);
    }
    if !head.connection_upgrade {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    if head.body != BodyFraming::None {
        return Err(HandshakeError::HasBody);
    }
    match head.header("sec-websocket-version") {
        Some(v) if v.trim_ascii() == WEBSOCKET_VERSION.as_bytes() => {}
        _ => return Err(HandshakeError::BadVersion),
    }
    let key = head
        .header_str("sec-websocket-key")
        .ok_or(HandshakeError::MissingKey)?
        .trim_matches([' ', '\t']);
    // 16 random bytes in base64 are 24 characters; decode to check, into room for 18.
    let mut raw = [0u8; 18];
    match STANDARD.decode_slice(key.as_bytes(), &mut raw) {
        Ok(16) if key.len() == 24 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    Ok(WsUpgrade {
        key,
        protocols: head.header_str("sec-websocket-protocol"),
        accept: accept_key(key.as_bytes()),
    })
}

/// `base64(SHA-1(key ++ GUID))`, the `Sec-WebSocket-Accept` value for `key`.
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let digest = Sha1::new()
        .chain_update(key)
        .chain_update(WEBSOCKET_GUID)
        .finalize();
    let mut out = [0u8; 28];
    // 20 bytes are exactly 28 base64 characters (with one `=`), so this cannot fail.
    let written = STANDARD.encode_slice(digest, &mut out).unwrap_or(0);
    assert_eq!(written, 28);
    out
}

/// Writes the `101 Switching Protocols` answer; `protocol` is the subprotocol chosen from
/// [`WsUpgrade::protocols`], if any.
pub fn write_accept(out: &mut Vec<u8>, upgrade: &WsUpgrade<'_>, protocol: Option<&str>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&upgrade.accept);
    out.extend_from_slice(b"\r\n");
    if let Some(p) = protocol {
        crate::http::response::write_header(out, "Sec-WebSocket-Protocol", p);
    }
    out.extend_from_slice(b"\r\n");
}

/// The headers a 426 answer to an upgrade request carries: the version this server speaks
/// (RFC 6455 §4.4: a server refusing the client's version lists the versions it supports) and
/// the protocol to upgrade to (RFC 9110 §15.5.22: a 426 sends `Upgrade`). For a caller that
/// writes its own error answers: `ResponseHead::extra_headers(UPGRADE_REQUIRED_HEADERS)`.
pub const UPGRADE_REQUIRED_HEADERS: &[(&str, &str)] = &[
    ("Sec-WebSocket-Version", WEBSOCKET_VERSION),
    ("Upgrade", "websocket"),
];

/// Writes the JSON error answering a refused upgrade (with [`UPGRADE_REQUIRED_HEADERS`] on
/// 426) and closes the connection.
pub fn write_handshake_error(out: &mut Vec<u8>, err: &HandshakeError) {
    let mut head = ResponseHead::new(err.status()).keep_alive(false);
    if err.status() == 426 {
        head = head.extra_headers(UPGRADE_REQUIRED_HEADERS);
    }
    // A fixed-size message; no allocation.
    let mut msg = [0u8; 96];
    let mut cursor = std::io::Cursor::new(&mut msg[..]);
    let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{err}"));
    let n = cursor.position() as usize;
    write_json_error(
        out,
        &head,
        std::str::from_utf8(&msg[..n]).unwrap_or("bad upgrade"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpLimits, parse_head};

    const UPGRADE: &[u8] = b"GET /v1/ws?token=abc HTTP/1.1\r\nHost: server.example.com\r\n\
Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc6455_section_1_3_accept_vector() {
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn accepts_a_valid_upgrade_and_writes_101() {
        let head = parse_head(UPGRADE, &HttpLimits::default()).unwrap();
        assert!(is_upgrade_request(&head));
        let up = check_upgrade(&head).unwrap();
        assert_eq!(up.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(up.protocols, Some("chat, superchat"));
        assert_eq!(up.accept_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut out = Vec::new();
        write_accept(&mut out, &up, Some("chat"));
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
        );
    }

    #[test]
    fn refuses_bad_upgrades_with_specific_reasons() {
        let text = std::str::from_utf8(UPGRADE).unwrap();
        let cases = [
            (text.replace("GET", "POST"), HandshakeError::NotGet, 405),
            (
                text.replace("HTTP/1.1", "HTTP/1.0"),
                HandshakeError::NotHttp11,
                400,
            ),
            (
                text.replace("Upgrade: websocket", "Upgrade: h2c"),
                HandshakeError::NotUpgrade,
                426,
            ),
            (
                text.replace("keep-alive, Upgrade", "keep-alive"),
                HandshakeError::MissingConnectionUpgrade,
                400,
            ),
            (
                text.replace("Version: 13", "Version: 8"),
                HandshakeError::BadVersion,
                426,
            ),
            (
                text.replace("Sec-WebSocket-Key", "X-Key"),
                HandshakeError::MissingKey,
                400,
            ),
            (
                text.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="),
                HandshakeError::BadKey,
                400,
            ),
            (
                text.replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!!!"),
                HandshakeError::BadKey,
                400,
            ),
        ];
        for (req, want, status) in cases {
            let head = parse_head(req.as_bytes(), &HttpLimits::default()).unwrap();
            let err = check_upgrade(&head).unwrap_err();
            assert_eq!(err, want, "{req}");
            assert_eq!(err.status(), status);
            let mut out = Vec::new();
            write_handshake_error(&mut out, &err);
            let out = String::from_utf8(out).unwrap();
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            assert!(out.ends_with(&format!("{{\"error\": \"{err}\"}}")), "{out}");
            assert_eq!(
                out.contains("\r\nSec-WebSocket-Version: 13\r\n"),
                status == 426
            );
            assert_eq!(out.contains("\r\nUpgrade: websocket\r\n"), status == 426);
        }
    }
}
