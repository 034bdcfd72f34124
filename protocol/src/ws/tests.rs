//! Tests of the WebSocket frame codec and connection state machine, with the RFC 6455 §5.7
//! examples as vectors.

use super::frame::unmask_bytewise;
use super::*;
use proptest::prelude::*;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const MAX: u64 = 1 << 20;

fn masked(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, fin, opcode, payload, Some(KEY));
    out
}

fn server() -> WsConnection {
    WsConnection::new(WsLimits::default())
}

/// Feeds `bytes` to `conn`, collecting owned copies of the events.
fn feed(conn: &mut WsConnection, bytes: &[u8], out: &mut Vec<u8>) -> Result<Vec<String>, WsError> {
    let mut buf = bytes.to_vec();
    let mut at = 0;
    let mut events = Vec::new();
    while at < buf.len() {
        let (ev, n) = conn.decode(&mut buf[at..], out)?;
        assert!(n > 0);
        at += n;
        if let Some(ev) = ev {
            events.push(format!("{ev:?}"));
        }
    }
    Ok(events)
}

#[test]
fn rfc6455_5_7_single_frame_unmasked_text() {
    let mut buf = vec![0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    let (frame, n) = decode_frame(&mut buf, Role::Client, MAX).unwrap();
    assert_eq!(n, 7);
    assert!(frame.header.fin);
    assert_eq!(frame.header.opcode, OpCode::Text);
    assert_eq!(frame.payload, b"Hello");
    let mut out = Vec::new();
    encode_frame(&mut out, true, OpCode::Text, b"Hello", None);
    assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    // A server refuses it: client frames must be masked.
    let mut buf = out.clone();
    assert_eq!(
        decode_frame(&mut buf, Role::Server, MAX).unwrap_err(),
        FrameError::Invalid(WsInvalid::Unmasked)
    );
}

#[test]
fn rfc6455_5_7_single_frame_masked_text() {
    let vector = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(masked(true, OpCode::Text, b"Hello"), vector);
    let mut buf = vector.to_vec();
    let (frame, n) = decode_frame(&mut buf, Role::Server, MAX).unwrap();
    assert_eq!(n, 11);
    assert_eq!(frame.header.mask, Some(KEY));
    assert_eq!(frame.payload, b"Hello");
    let mut conn = server();
    let mut out = Vec::new();
    assert_eq!(
        feed(&mut conn, &vector, &mut out).unwrap(),
        vec![r#"Text("Hello")"#]
    );
    assert!(out.is_empty());
}

#[test]
fn rfc6455_5_7_fragmented_unmasked_text() {
    let vector = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
    let mut client = WsConnection::with_role(WsLimits::default(), Role::Client);
    let mut out = Vec::new();
    assert_eq!(
        feed(&mut client, &vector, &mut out).unwrap(),
        vec![r#"Text("Hello")"#]
    );
    // The same message masked, to a server, with a ping between the fragments.
    let mut bytes = masked(false, OpCode::Text, b"Hel");
    bytes.extend(masked(true, OpCode::Ping, b"Hello"));
    bytes.extend(masked(true, OpCode::Continuation, b"lo"));
    let mut conn = server();
    let mut out = Vec::new();
    assert_eq!(
        feed(&mut conn, &bytes, &mut out).unwrap(),
        vec![r#"Ping([72, 101, 108, 108, 111])"#, r#"Text("Hello")"#]
    );
    // RFC 6455 §5.7 unmasked pong "Hello" is what a server answers.
    assert_eq!(out, [0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
}

#[test]
fn rfc6455_5_7_ping_and_masked_pong() {
    let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    let mut buf = ping.to_vec();
    let (frame, _) = decode_frame(&mut buf, Role::Client, MAX).unwrap();
    assert_eq!(
        (frame.header.opcode, frame.payload),
        (OpCode::Ping, &b"Hello"[..])
    );
    let pong = [
        0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(masked(true, OpCode::Pong, b"Hello"), pong);
    let mut out = Vec::new();
    assert_eq!(
        feed(&mut server(), &pong, &mut out).unwrap(),
        vec![r#"Pong([72, 101, 108, 108, 111])"#]
    );
    assert!(out.is_empty(), "a pong is not answered");
}

#[test]
fn rfc6455_5_7_256_bytes_and_64_kib_lengths() {
    let mut out = Vec::new();
    encode_frame(&mut out, true, OpCode::Binary, &[0xab; 256], None);
    assert_eq!(&out[..4], [0x82, 0x7e, 0x01, 0x00]);
    assert_eq!(out.len(), 4 + 256);
    let (frame, n) = decode_frame(&mut out, Role::Client, MAX).unwrap();
    assert_eq!((frame.payload.len(), n), (256, 260));

    let mut out = Vec::new();
    encode_frame(&mut out, true, OpCode::Binary, &[0xcd; 65536], None);
    assert_eq!(
        &out[..10],
        [0x82, 0x7f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
    );
    let (frame, n) = decode_frame(&mut out, Role::Client, MAX).unwrap();
    assert_eq!((frame.payload.len(), n), (65536, 65546));
    assert!(frame.payload.iter().all(|&b| b == 0xcd));
}

#[test]
fn every_split_is_incomplete_and_leaves_the_buffer_alone() {
    for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let frame = masked(true, OpCode::Binary, &payload);
        // Every cut in the header, and a spread of cuts in the payload.
        let cuts = (0..frame.len().min(20)).chain((20..frame.len()).step_by(997));
        for cut in cuts {
            let mut part = frame[..cut].to_vec();
            match decode_frame(&mut part, Role::Server, MAX) {
                Err(FrameError::Incomplete { needed }) => {
                    assert!(
                        needed >= 1 && needed <= frame.len() - cut,
                        "len {len} cut {cut}"
                    )
                }
                other => panic!("len {len} cut {cut}: {other:?}"),
            }
            assert_eq!(part, frame[..cut], "buffer changed on Incomplete");
        }
        let mut whole = frame.clone();
        let (f, n) = decode_frame(&mut whole, Role::Server, MAX).unwrap();
        assert_eq!((f.payload, n), (&payload[..], frame.len()));
    }
}

#[test]
fn header_violations_map_to_1002() {
    let cases: &[(&[u8], WsInvalid)] = &[
        (&[0xc1, 0x80, 0, 0, 0, 0], WsInvalid::ReservedBits),
        (&[0x83, 0x80, 0, 0, 0, 0], WsInvalid::ReservedOpcode(3)),
        (&[0x8b, 0x80, 0, 0, 0, 0], WsInvalid::ReservedOpcode(0xb)),
        (&[0x81, 0x00], WsInvalid::Unmasked),
        (&[0x09, 0x80, 0, 0, 0, 0], WsInvalid::FragmentedControl),
        (&[0x89, 0xfe, 0, 126], WsInvalid::ControlTooLong),
        (&[0x82, 0xfe, 0, 125], WsInvalid::NonMinimalLength),
        (
            &[0x82, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
            WsInvalid::NonMinimalLength,
        ),
        (
            &[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0],
            WsInvalid::LengthTopBitSet,
        ),
    ];
    for (bytes, want) in cases {
        let mut buf = bytes.to_vec();
        assert_eq!(
            decode_frame(&mut buf, Role::Server, MAX).unwrap_err(),
            FrameError::Invalid(*want),
            "{bytes:x?}"
        );
        assert_eq!(want.close_code(), close_code::PROTOCOL_ERROR);
        // The connection answers with a 1002 close frame and stops.
        let mut conn = server();
        let mut out = Vec::new();
        let mut buf = bytes.to_vec();
        assert_eq!(
            conn.decode(&mut buf, &mut out).unwrap_err(),
            WsError::Invalid(*want)
        );
        assert_eq!(out, [0x88, 0x02, 0x03, 0xea]);
        assert!(conn.is_closed());
        assert_eq!(
            conn.decode(&mut buf, &mut out).unwrap_err(),
            WsError::Closed
        );
    }
}

#[test]
fn oversized_frames_are_refused_from_the_header_alone() {
    let mut conn = WsConnection::new(WsLimits {
        frame_payload_bytes_max: 1000,
        message_bytes_max: 1500,
    });
    let frame = masked(true, OpCode::Binary, &[0; 1001]);
    let mut head_only = frame[..8].to_vec();
    let mut out = Vec::new();
    assert_eq!(
        conn.decode(&mut head_only, &mut out).unwrap_err(),
        WsError::Invalid(WsInvalid::FrameTooLarge)
    );
    assert_eq!(out, [0x88, 0x02, 0x03, 0xf1]); // 1009
}

#[test]
fn unfragmented_messages_are_bounded_by_the_message_limit_too() {
    let mut conn = WsConnection::new(WsLimits {
        frame_payload_bytes_max: 4096,
        message_bytes_max: 100,
    });
    let mut out = Vec::new();
    let mut buf = masked(true, OpCode::Text, &[b'a'; 101]);
    assert_eq!(
        conn.decode(&mut buf, &mut out).unwrap_err(),
        WsError::Invalid(WsInvalid::FrameTooLarge)
    );
    assert_eq!(out, [0x88, 0x02, 0x03, 0xf1]); // 1009
    let mut buf = masked(true, OpCode::Text, &[b'a'; 100]);
    assert!(server().decode(&mut buf, &mut out).is_ok());
}

#[test]
fn oversized_fragmented_messages_are_refused() {
    let mut conn = WsConnection::new(WsLimits {
        frame_payload_bytes_max: 1000,
        message_bytes_max: 1500,
    });
    let mut bytes = masked(false, OpCode::Binary, &[1; 1000]);
    bytes.extend(masked(true, OpCode::Continuation, &[2; 500]));
    let mut out = Vec::new();
    let events = feed(&mut conn, &bytes, &mut out).unwrap();
    assert_eq!(events.len(), 1);
    assert!(events[0].starts_with("Binary([1, 1"));

    let mut bytes = masked(false, OpCode::Binary, &[1; 1000]);
    bytes.extend(masked(true, OpCode::Continuation, &[2; 501]));
    assert_eq!(
        feed(&mut conn, &bytes, &mut out).unwrap_err(),
        WsError::Invalid(WsInvalid::MessageTooLarge)
    );
    assert!(out.ends_with(&[0x88, 0x02, 0x03, 0xf1]));
}

#[test]
fn fragmentation_errors() {
    let mut out = Vec::new();
    assert_eq!(
        feed(
            &mut server(),
            &masked(true, OpCode::Continuation, b"x"),
            &mut out
        )
        .unwrap_err(),
        WsError::Invalid(WsInvalid::UnexpectedContinuation)
    );
    let mut bytes = masked(false, OpCode::Text, b"a");
    bytes.extend(masked(true, OpCode::Text, b"b"));
    assert_eq!(
        feed(&mut server(), &bytes, &mut out).unwrap_err(),
        WsError::Invalid(WsInvalid::ExpectedContinuation)
    );
}

#[test]
fn utf8_is_checked_per_message_and_incrementally_across_fragments() {
    let mut out = Vec::new();
    // Invalid in a single frame: 1007.
    assert_eq!(
        feed(
            &mut server(),
            &masked(true, OpCode::Text, b"\xff"),
            &mut out
        )
        .unwrap_err(),
        WsError::Invalid(WsInvalid::InvalidUtf8)
    );
    assert_eq!(out, [0x88, 0x02, 0x03, 0xef]);
    // A code point split across fragments is fine.
    let ni = "你".as_bytes();
    let mut bytes = masked(false, OpCode::Text, &ni[..1]);
    bytes.extend(masked(false, OpCode::Continuation, &ni[1..2]));
    bytes.extend(masked(true, OpCode::Continuation, &ni[2..]));
    assert_eq!(
        feed(&mut server(), &bytes, &mut out).unwrap(),
        vec![r#"Text("你")"#]
    );
    // An invalid first fragment fails before the message ends.
    let mut conn = server();
    let mut buf = masked(false, OpCode::Text, b"ok\xc0\xafmore");
    assert_eq!(
        conn.decode(&mut buf, &mut out).unwrap_err(),
        WsError::Invalid(WsInvalid::InvalidUtf8)
    );
    // A truncated code point at the end of the message fails.
    let mut bytes = masked(false, OpCode::Text, &ni[..1]);
    bytes.extend(masked(true, OpCode::Continuation, &ni[1..2]));
    assert_eq!(
        feed(&mut server(), &bytes, &mut out).unwrap_err(),
        WsError::Invalid(WsInvalid::InvalidUtf8)
    );
    // Binary messages are not checked.
    let mut bytes = masked(false, OpCode::Binary, b"\xff");
    bytes.extend(masked(true, OpCode::Continuation, b"\xfe"));
    assert_eq!(
        feed(&mut server(), &bytes, &mut out).unwrap(),
        vec!["Binary([255, 254])"]
    );
}

#[test]
fn close_handshake_initiated_by_the_peer() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    let mut conn = server();
    let mut out = Vec::new();
    assert_eq!(
        feed(&mut conn, &masked(true, OpCode::Close, &payload), &mut out).unwrap(),
        vec![r#"Close { code: Some(1000), reason: "bye" }"#]
    );
    assert_eq!(out, [0x88, 0x02, 0x03, 0xe8]);
    assert!(conn.is_closed());
    assert!(!conn.send_text(&mut out, "late"));

    // An empty close is answered with an empty close.
    let mut out = Vec::new();
    assert_eq!(
        feed(&mut server(), &masked(true, OpCode::Close, b""), &mut out).unwrap(),
        vec!["Close { code: None, reason: \"\" }"]
    );
    assert_eq!(out, [0x88, 0x00]);
}

#[test]
fn close_handshake_initiated_by_us() {
    let mut conn = server();
    let mut out = Vec::new();
    assert!(conn.send_close(&mut out, close_code::TOO_SLOW, "queue overflowed"));
    assert_eq!(&out[..4], [0x88, 18, 0x0f, 0xa8]);
    assert_eq!(&out[4..], b"queue overflowed");
    assert!(!conn.send_close(&mut out, 1000, ""));
    out.clear();
    // Data still in flight is discarded (fragmented too); pings are not answered; the peer's
    // close ends it.
    let mut bytes = masked(false, OpCode::Text, b"in ");
    bytes.extend(masked(true, OpCode::Continuation, b"flight"));
    bytes.extend(masked(true, OpCode::Binary, b"more"));
    bytes.extend(masked(true, OpCode::Ping, b""));
    bytes.extend(masked(true, OpCode::Close, &4008u16.to_be_bytes()));
    let events = feed(&mut conn, &bytes, &mut out).unwrap();
    assert_eq!(
        events,
        vec!["Ping([])", "Close { code: Some(4008), reason: \"\" }"]
    );
    assert!(out.is_empty());
    assert!(conn.is_closed());
}

#[test]
fn close_code_validation() {
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        let mut out = Vec::new();
        assert!(
            feed(
                &mut server(),
                &masked(true, OpCode::Close, &u16::to_be_bytes(code)),
                &mut out
            )
            .is_ok(),
            "{code}"
        );
    }
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let mut out = Vec::new();
        assert_eq!(
            feed(
                &mut server(),
                &masked(true, OpCode::Close, &u16::to_be_bytes(code)),
                &mut out
            )
            .unwrap_err(),
            WsError::Invalid(WsInvalid::InvalidCloseCode(code))
        );
        assert_eq!(out, [0x88, 0x02, 0x03, 0xea]);
    }
    let mut out = Vec::new();
    assert_eq!(
        feed(
            &mut server(),
            &masked(true, OpCode::Close, &[0x03]),
            &mut out
        )
        .unwrap_err(),
        WsError::Invalid(WsInvalid::CloseTooShort)
    );
    assert_eq!(
        feed(
            &mut server(),
            &masked(true, OpCode::Close, &[0x03, 0xe8, 0xff]),
            &mut out
        )
        .unwrap_err(),
        WsError::Invalid(WsInvalid::InvalidCloseReason)
    );
    // Our own close reasons are cut to fit a control frame, at a character boundary.
    let mut out = Vec::new();
    write_close_frame(&mut out, 1000, &"你".repeat(60), None);
    assert_eq!(out[1], 2 + 123);
    let mut buf = out.clone();
    assert!(decode_frame(&mut buf, Role::Client, MAX).is_ok());
}

#[test]
fn server_sends_unmasked_frames() {
    let mut conn = server();
    let mut out = Vec::new();
    assert!(conn.send_text(&mut out, "hi"));
    assert!(conn.send_binary(&mut out, &[1, 2]));
    assert!(conn.send_ping(&mut out, &[7; 200]));
    assert_eq!(&out[..8], [0x81, 2, b'h', b'i', 0x82, 2, 1, 2]);
    assert_eq!(&out[8..10], [0x89, 125]);
    let mut client = WsConnection::with_role(WsLimits::default(), Role::Client);
    let mut replies = Vec::new();
    let events = feed(&mut client, &out, &mut replies).unwrap();
    assert_eq!(events.len(), 3);
    // The client's pong is masked.
    assert_eq!(replies[0..2], [0x8a, 0x80 | 125]);
}

#[test]
fn fast_unmask_matches_bytewise_for_every_length_and_offset() {
    let data: Vec<u8> = (0..300u32).map(|i| (i * 31 + 7) as u8).collect();
    for start in 0..8 {
        for len in 0..(300 - start) {
            let mut a = data[start..start + len].to_vec();
            let mut b = a.clone();
            unmask(&mut a, KEY);
            unmask_bytewise(&mut b, KEY);
            assert_eq!(a, b, "start {start} len {len}");
        }
    }
}

fn opcode_strategy() -> impl Strategy<Value = OpCode> {
    prop_oneof![
        Just(OpCode::Continuation),
        Just(OpCode::Text),
        Just(OpCode::Binary),
        Just(OpCode::Close),
        Just(OpCode::Ping),
        Just(OpCode::Pong),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_roundtrips(
        fin in any::<bool>(),
        opcode in opcode_strategy(),
        payload in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..130),
            // Large payloads built from a seed: generating 64 KiB byte by byte is slow in debug.
            (65530usize..65540, any::<u8>())
                .prop_map(|(n, seed)| (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()),
        ],
        mask in proptest::option::of(any::<[u8; 4]>()),
        trailing in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let control = opcode.is_control();
        let fin = fin || control;
        let payload = if control { &payload[..payload.len().min(125)] } else { &payload[..] };
        let mut buf = Vec::new();
        encode_frame(&mut buf, fin, opcode, payload, mask);
        let frame_len = buf.len();
        buf.extend_from_slice(&trailing);
        let role = if mask.is_some() { Role::Server } else { Role::Client };
        let (frame, n) = decode_frame(&mut buf, role, MAX).unwrap();
        prop_assert_eq!(n, frame_len);
        prop_assert_eq!(frame.header.fin, fin);
        prop_assert_eq!(frame.header.opcode, opcode);
        prop_assert_eq!(frame.header.mask, mask);
        prop_assert_eq!(frame.payload, payload);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        for role in [Role::Server, Role::Client] {
            let mut buf = bytes.clone();
            if let Ok((_, n)) = decode_frame(&mut buf, role, 200) {
                prop_assert!(n <= bytes.len());
            }
            let mut conn = WsConnection::with_role(
                WsLimits { frame_payload_bytes_max: 200, message_bytes_max: 300 },
                role,
            );
            let mut buf = bytes.clone();
            let mut out = Vec::new();
            let mut at = 0;
            // Every Ok consumes at least 2 bytes, so this ends.
            while let Ok((_, n)) = conn.decode(&mut buf[at..], &mut out) {
                prop_assert!(n >= 2);
                at += n;
            }
            // Replies are pongs (a masked pong is at most 3x an empty unmasked ping) and one close.
            prop_assert!(out.len() <= 3 * bytes.len() + 2 + 4 + 125);
        }
    }

    #[test]
    fn fast_unmask_matches_bytewise(data in proptest::collection::vec(any::<u8>(), 0..600), key in any::<[u8; 4]>()) {
        let mut a = data.clone();
        let mut b = data;
        unmask(&mut a, key);
        unmask_bytewise(&mut b, key);
        prop_assert_eq!(a, b);
    }
}
