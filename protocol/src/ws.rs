//! WebSocket (RFC 6455) server side: handshake and frame codec.
