//! WebSocket (RFC 6455) server side, sans-I/O: the opening handshake, the frame codec and a
//! connection state machine (fragments, UTF-8, ping/pong, closing handshake, size limits).
//!
//! Written here rather than taken from a crate: the well-kept codecs (tungstenite and
//! friends) own their buffers or their stream, while the gateway reads into monoio's owned
//! buffers and wants to unmask and hand out payloads in place.

pub mod connection;
pub mod frame;
pub mod handshake;

pub use connection::{WsConnection, WsError, WsEvent, WsLimits, write_close_frame};
pub use frame::{
    CloseCode, Frame, FrameError, FrameHeader, OpCode, Role, WsInvalid, close_code, decode_frame,
    decode_header, encode_frame, encode_header, is_valid_close_code, unmask,
};
pub use handshake::{
    HandshakeError, UPGRADE_REQUIRED_HEADERS, WsUpgrade, accept_key, check_upgrade,
    is_upgrade_request, write_accept, write_handshake_error,
};

#[cfg(test)]
mod tests;
