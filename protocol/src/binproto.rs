//! The binary TCP protocol: payloads of handshake, send, subscribe, ack and stream frames.
