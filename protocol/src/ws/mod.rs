//! WebSocket (RFC 6455) server side, sans-I/O: the opening handshake and the frame codec.

pub mod handshake;

pub use handshake::{
    HandshakeError, WsUpgrade, accept_key, check_upgrade, is_upgrade_request, write_accept,
    write_handshake_error,
};
