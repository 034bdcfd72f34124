#![no_main]
//! Fuzz target: the WebSocket frame decoder and connection state machine on arbitrary bytes.
//!
//! Checks beyond "no panic": a decoded frame re-encodes to exactly the bytes it came from
//! (lengths must be minimal, so the encoding is canonical), every strict prefix of it is
//! `Incomplete`, and the connection consumes at least one frame header per event.

use kefu_protocol::ws::{FrameError, Role, WsConnection, WsLimits, decode_frame, encode_frame};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for role in [Role::Server, Role::Client] {
        let mut buf = data.to_vec();
        if let Ok((frame, n)) = decode_frame(&mut buf, role, 1 << 16) {
            let mut again = Vec::new();
            encode_frame(
                &mut again,
                frame.header.fin,
                frame.header.opcode,
                frame.payload,
                frame.header.mask,
            );
            assert_eq!(again, data[..n], "re-encoding differs");
            for cut in [0, 1, frame.header.header_len - 1, n - 1] {
                let mut part = data[..cut.min(n - 1)].to_vec();
                assert!(matches!(
                    decode_frame(&mut part, role, 1 << 16),
                    Err(FrameError::Incomplete { .. })
                ));
            }
        }

        let mut conn = WsConnection::with_role(
            WsLimits {
                frame_payload_bytes_max: 512,
                message_bytes_max: 1024,
            },
            role,
        );
        let mut buf = data.to_vec();
        let mut out = Vec::new();
        let mut at = 0;
        while let Ok((_, n)) = conn.decode(&mut buf[at..], &mut out) {
            assert!(n >= 2);
            at += n;
        }
    }
});
