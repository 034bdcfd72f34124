//! Tests of the binary protocol: golden bytes, every byte boundary, rejections, properties.

use proptest::prelude::*;

use super::*;

fn lim() -> BinLimits {
    BinLimits::default()
}

fn client_bytes(m: &ClientMsg<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_client(m, 0, &mut out).unwrap();
    out
}

fn server_bytes(m: &ServerMsg<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_server(m, &mut out).unwrap();
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Re-frame `payload` under a header, for hand-made invalid payloads with a valid CRC.
fn frame_with(kind: Kind, conversation_id: u64, payload: &[u8]) -> Vec<u8> {
    frame::encode(&Header::new(kind, conversation_id, 0, 0), payload)
}

#[test]
fn golden_send() {
    let m = ClientMsg::Send {
        conversation_id: ConversationId(0x0001_0000_0000_002a),
        client_msg_id: Some("k1"),
        text: "hi",
    };
    let b = client_bytes(&m);
    // Header: magic, version, kind 17, crc, payload_len 10, flags, reserved, conversation_id,
    // seq 0, log_offset 0, timestamp 0; payload: str16 "k1", str32 "hi".
    assert_eq!(
        hex(&b),
        concat!(
            "4b460111",
            "064346d3", // crc32c over bytes 0..4, 8..48, payload; checked with an independent bitwise implementation
            "0a000000",
            "0000",
            "0000",
            "2a00000000000100",
            "0000000000000000",
            "0000000000000000",
            "0000000000000000",
            "02006b31",
            "020000006869",
        )
    );
    assert_eq!(decode_client(&b, &lim()), Ok((m, b.len())));
}

#[test]
fn golden_payloads() {
    let cases: Vec<(ClientMsg<'_>, &str)> = vec![
        (ClientMsg::Hello { token: "tok" }, "0300746f6b"),
        (
            ClientMsg::Send {
                conversation_id: ConversationId(1),
                client_msg_id: None,
                text: "é",
            },
            "000002000000c3a9",
        ),
        (
            ClientMsg::Subscribe {
                conversation_id: ConversationId(1),
                after_seq: 0x0102,
            },
            "0201000000000000",
        ),
        (
            ClientMsg::Typing {
                conversation_id: ConversationId(1),
            },
            "",
        ),
        (
            ClientMsg::Read {
                conversation_id: ConversationId(1),
                seq: 7,
            },
            "0700000000000000",
        ),
        (
            ClientMsg::StreamOpen {
                shard: 3,
                from_offset: 0x10,
                follow: true,
            },
            "100000000000000003000100",
        ),
        (ClientMsg::Ping { nonce: 0xff }, "ff00000000000000"),
    ];
    for (m, payload) in cases {
        let b = client_bytes(&m);
        assert_eq!(hex(&b[HEADER_LEN..]), payload, "{m:?}");
        assert_eq!(decode_client(&b, &lim()).unwrap().0, m);
    }

    let server: Vec<(ServerMsg<'_>, &str)> = vec![
        (
            ServerMsg::Welcome(Welcome {
                session_id: 5,
                payload_len_max: 0x2_0000,
                idle_timeout_ms: 30_000,
                principal: Principal::Agent,
                shards: 2,
                tenant: "demo",
                principal_id: "alice",
            }),
            concat!(
                "0500000000000000",
                "00000200",
                "30750000",
                "02",
                "00",
                "0200",
                "040064656d6f",
                "0500616c696365"
            ),
        ),
        (
            ServerMsg::Ack {
                conversation_id: ConversationId(9),
                seq: 4,
                log_offset: 77,
                timestamp_us: 1,
                duplicate: true,
                client_msg_id: Some("k"),
            },
            "0101006b",
        ),
        (
            ServerMsg::Error {
                conversation_id: ConversationId(0),
                code: 401,
                client_msg_id: None,
                reason: "bad token",
            },
            "91010000090062616420746f6b656e",
        ),
        (ServerMsg::Pong { nonce: 1 }, "0100000000000000"),
    ];
    for (m, payload) in server {
        let b = server_bytes(&m);
        assert_eq!(hex(&b[HEADER_LEN..]), payload, "{m:?}");
        assert_eq!(decode_server(&b, &lim()).unwrap().0, m);
    }
}

#[test]
fn ack_carries_stored_position_in_header() {
    let b = server_bytes(&ServerMsg::Ack {
        conversation_id: ConversationId(9),
        seq: 4,
        log_offset: 77,
        timestamp_us: 1,
        duplicate: false,
        client_msg_id: None,
    });
    let h = frame::peek_header(&b, u32::MAX).unwrap();
    assert_eq!(
        (
            h.kind,
            h.conversation_id,
            h.seq,
            h.log_offset,
            h.timestamp_us
        ),
        (Kind::Ack, 9, 4, 77, 1)
    );
}

#[test]
fn every_prefix_is_incomplete() {
    let mut stream = Vec::new();
    let msgs = [
        ClientMsg::Hello { token: "secret" },
        ClientMsg::Send {
            conversation_id: ConversationId(3),
            client_msg_id: Some("id-1"),
            text: "hello there",
        },
        ClientMsg::Ping { nonce: 1 },
    ];
    for m in &msgs {
        encode_client(m, 0, &mut stream).unwrap();
    }
    // Every cut inside the first frame asks for more; the full buffer yields all three in order.
    let first_len = client_bytes(&msgs[0]).len();
    for cut in 0..first_len {
        let e = decode_client(&stream[..cut], &lim()).unwrap_err();
        assert!(e.is_incomplete(), "cut {cut}: {e}");
    }
    let mut at = 0;
    for m in &msgs {
        let (got, used) = decode_client(&stream[at..], &lim()).unwrap();
        assert_eq!(&got, m);
        at += used;
    }
    assert_eq!(at, stream.len());
}

#[test]
fn records_pass_through_unchanged() {
    let rec = frame::encode(&Header::new(Kind::Message, 1, 2, 3), br#"{"tenant":"t"}"#);
    let (m, used) = decode_server(&rec, &lim()).unwrap();
    assert_eq!(used, rec.len());
    let ServerMsg::Record(f) = m else {
        panic!("expected a record, got {m:?}")
    };
    assert_eq!(f.bytes, &rec[..]);
    assert_eq!(server_bytes(&m), rec);
}

#[test]
fn rejections_are_specific() {
    let l = lim();
    let err = |b: &[u8]| decode_client(b, &l).unwrap_err().to_string();

    // Kinds from the wrong side.
    let pong = server_bytes(&ServerMsg::Pong { nonce: 1 });
    assert_eq!(err(&pong), "a Pong frame is not expected from the client");
    let rec = frame::encode(&Header::new(Kind::Event, 1, 1, 1), b"{}");
    assert_eq!(err(&rec), "a Event frame is not expected from the client");
    let ping = client_bytes(&ClientMsg::Ping { nonce: 1 });
    assert_eq!(
        decode_server(&ping, &l).unwrap_err().to_string(),
        "a Ping frame is not expected from the server"
    );

    // Header fields the server assigns.
    let mut h = Header::new(Kind::Typing, 1, 5, 0);
    assert_eq!(
        err(&frame::encode(&h, b"")),
        "Typing frame: header field `seq` must be 0, got 5"
    );
    h.seq = 0;
    h.flags = frame::FLAG_ZSTD;
    assert_eq!(
        err(&frame::encode(&h, b"")),
        "Typing frame: payloads of control frames must not be compressed"
    );
    assert_eq!(
        err(&frame_with(Kind::Ping, 4, &[0; 8])),
        "Ping frame: header field `conversation_id` must be 0, got 4"
    );

    // Payload shape.
    assert_eq!(
        err(&frame_with(Kind::Read, 1, &[1, 2, 3])),
        "Read frame: payload ends inside field `seq`"
    );
    assert_eq!(
        err(&frame_with(Kind::Typing, 1, &[0])),
        "Typing frame: 1 bytes after the last field"
    );
    assert_eq!(
        err(&frame_with(Kind::Send, 1, &[0, 0, 5, 0, 0, 0, b'a'])),
        "Send frame: payload ends inside field `text`"
    );
    assert_eq!(
        err(&frame_with(Kind::Send, 1, &[0, 0, 1, 0, 0, 0, 0xff])),
        "Send frame: field `text` is not UTF-8"
    );
    assert_eq!(
        err(&frame_with(Kind::Send, 1, &[0, 0, 0, 0, 0, 0])),
        "Send frame: field `text`: must not be empty"
    );
    assert_eq!(
        err(&frame_with(
            Kind::Send,
            1,
            &[2, 0, b'a', b' ', 1, 0, 0, 0, b'x']
        )),
        "Send frame: field `client_msg_id`: must be printable ASCII without spaces"
    );
    // A hostile length is refused against the limit before the bytes are looked at.
    assert_eq!(
        err(&frame_with(Kind::Send, 1, &[0, 0, 0xff, 0xff, 0xff, 0xff])),
        "Send frame: field `text`: 4294967295 bytes exceeds limit 65536"
    );
    assert_eq!(
        err(&frame_with(Kind::Hello, 0, &[0, 0])),
        "Hello frame: field `token`: must not be empty"
    );
    assert_eq!(
        err(&frame_with(
            Kind::StreamOpen,
            0,
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0]
        )),
        "StreamOpen frame: field `flags` has unknown value 2"
    );
    // Frame-level reasons come through as such.
    let mut bad = ping.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        decode_client(&bad, &l),
        Err(Error::Frame(DecodeError::BadCrc { .. }))
    ));
    let mut big = ping;
    big[8..12].copy_from_slice(&(l.payload_len_max + 1).to_le_bytes());
    assert!(matches!(
        decode_client(&big[..HEADER_LEN], &l),
        Err(Error::Frame(DecodeError::TooLarge { .. }))
    ));
}

#[test]
fn text_limit_follows_config() {
    let l = BinLimits {
        text_bytes_max: 4,
        ..lim()
    };
    let b = client_bytes(&ClientMsg::Send {
        conversation_id: ConversationId(1),
        client_msg_id: None,
        text: "hello",
    });
    assert_eq!(
        decode_client(&b, &l).unwrap_err(),
        Error::Field {
            kind: Kind::Send,
            source: ModelError::TooLong {
                field: "text",
                len: 5,
                max: 4
            }
        }
    );
}

#[test]
fn limits_are_checked_at_startup() {
    assert_eq!(BinLimits::default().check(), Ok(()));
    assert_eq!(ModelLimits::DEFAULT.check(), Ok(()));
    let small = BinLimits {
        payload_len_max: 1000,
        ..lim()
    };
    assert_eq!(
        small.check().unwrap_err(),
        "payload_len_max = 1000 is below the largest send (65606 bytes: text_bytes_max + client_msg_id_bytes_max + 6)"
    );
    let wide = BinLimits {
        reason_bytes_max: 70_000,
        ..lim()
    };
    assert_eq!(
        wide.check().unwrap_err(),
        "reason_bytes_max = 70000 must be in 1..=65535"
    );
    let zero = ModelLimits {
        name_bytes_max: 0,
        ..ModelLimits::DEFAULT
    };
    assert_eq!(
        zero.check().unwrap_err(),
        "name_bytes_max must be at least 1"
    );
}

#[test]
fn encoder_refuses_what_its_prefix_cannot_hold() {
    let long = "x".repeat(70_000);
    let mut out = vec![1, 2, 3];
    let e = encode_client(&ClientMsg::Hello { token: &long }, 0, &mut out).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field `token`: 70000 bytes does not fit its length prefix (max 65535)"
    );
    assert_eq!(
        out,
        [1, 2, 3],
        "a failed encode leaves the buffer as it was"
    );
}

// ---- properties ----------------------------------------------------------------------------

fn arb_client() -> impl Strategy<Value = (String, String, u64, u64, u16, bool, u8)> {
    (
        "[!-~]{1,64}",
        "\\PC{1,200}",
        any::<u64>(),
        any::<u64>(),
        any::<u16>(),
        any::<bool>(),
        0u8..7,
    )
}

fn make_client<'a>(
    (id, text, a, b, shard, flag, which): &'a (String, String, u64, u64, u16, bool, u8),
) -> ClientMsg<'a> {
    let cid = ConversationId(*a);
    match which {
        0 => ClientMsg::Hello { token: id },
        1 => ClientMsg::Send {
            conversation_id: cid,
            client_msg_id: if *flag { Some(id) } else { None },
            text,
        },
        2 => ClientMsg::Subscribe {
            conversation_id: cid,
            after_seq: *b,
        },
        3 => ClientMsg::Typing {
            conversation_id: cid,
        },
        4 => ClientMsg::Read {
            conversation_id: cid,
            seq: *b,
        },
        5 => ClientMsg::StreamOpen {
            shard: *shard,
            from_offset: *b,
            follow: *flag,
        },
        _ => ClientMsg::Ping { nonce: *b },
    }
}

fn make_server<'a>(
    (id, text, a, b, shard, flag, which): &'a (String, String, u64, u64, u16, bool, u8),
) -> ServerMsg<'a> {
    match which % 4 {
        0 => ServerMsg::Welcome(Welcome {
            session_id: *a,
            payload_len_max: *b as u32,
            idle_timeout_ms: (*b >> 32) as u32,
            principal: [Principal::Visitor, Principal::Agent, Principal::Integration]
                [usize::from(*shard % 3)],
            shards: *shard,
            tenant: id,
            principal_id: id,
        }),
        1 => ServerMsg::Ack {
            conversation_id: ConversationId(*a),
            seq: *b,
            log_offset: b.rotate_left(7),
            timestamp_us: a.rotate_left(3),
            duplicate: *flag,
            client_msg_id: if *flag { Some(id) } else { None },
        },
        2 => ServerMsg::Error {
            conversation_id: ConversationId(*a),
            code: *shard,
            client_msg_id: if *flag { Some(id) } else { None },
            reason: text,
        },
        _ => ServerMsg::Pong { nonce: *a },
    }
}

proptest! {
    #[test]
    fn client_roundtrip(parts in arb_client(), ts in any::<u64>()) {
        let m = make_client(&parts);
        let mut out = Vec::new();
        encode_client(&m, ts, &mut out).unwrap();
        let (back, used) = decode_client(&out, &lim()).unwrap();
        prop_assert_eq!(back, m);
        prop_assert_eq!(used, out.len());
    }

    #[test]
    fn server_roundtrip(parts in arb_client()) {
        let m = make_server(&parts);
        let out = server_bytes(&m);
        let (back, used) = decode_server(&out, &lim()).unwrap();
        prop_assert_eq!(back, m);
        prop_assert_eq!(used, out.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let l = lim();
        let _ = decode_client(&bytes, &l);
        let _ = decode_server(&bytes, &l);
    }

    /// Arbitrary payloads under a valid header reach the payload parsers instead of being
    /// stopped by the CRC; they must answer, never panic, and never claim `Incomplete`.
    #[test]
    fn arbitrary_payloads_never_panic(kind in 0usize..14, conv in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        let l = lim();
        let b = frame_with(Kind::ALL[kind], conv, &payload);
        if let Err(e) = decode_client(&b, &l) { prop_assert!(!e.is_incomplete()); }
        if let Err(e) = decode_server(&b, &l) { prop_assert!(!e.is_incomplete()); }
    }
}
