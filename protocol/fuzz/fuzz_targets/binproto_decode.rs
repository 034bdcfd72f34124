#![no_main]
//! Fuzz target: `binproto::decode_client` / `decode_server` on arbitrary bytes must never panic;
//! whatever decodes must re-encode to the same bytes.
use kefu_protocol::binproto::{self, BinLimits};
use kefu_protocol::frame::{self, Header, Kind};

fn check_stream(mut rest: &[u8], limits: &BinLimits) {
    while let Ok((m, used)) = binproto::decode_client(rest, limits) {
        assert!(used >= frame::HEADER_LEN && used <= rest.len());
        let h = frame::peek_header(rest, u32::MAX).expect("decoded frame has a header");
        let mut out = Vec::new();
        binproto::encode_client(&m, h.timestamp_us, &mut out).expect("decoded message encodes");
        assert_eq!(out, &rest[..used]);
        rest = &rest[used..];
    }
    if let Ok((m, used)) = binproto::decode_server(rest, limits) {
        let mut out = Vec::new();
        binproto::encode_server(&m, &mut out).expect("decoded message encodes");
        assert_eq!(out, &rest[..used]);
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = BinLimits {
        payload_len_max: 4096,
        token_bytes_max: 32,
        text_bytes_max: 256,
        client_msg_id_bytes_max: 16,
        id_bytes_max: 16,
        reason_bytes_max: 64,
    };
    // Raw bytes: the fuzzer must find a valid CRC itself (it rarely does).
    check_stream(data, &limits);
    // The same bytes as the payload of a valid frame, so the payload parsers see them: the
    // first byte picks the kind, the next eight the conversation id.
    if let Some((&k, rest)) = data.split_first() {
        let kind = Kind::ALL[usize::from(k) % Kind::ALL.len()];
        let (conv, payload) = if rest.len() >= 8 {
            let (c, p) = rest.split_at(8);
            (u64::from_le_bytes(c.try_into().expect("8 bytes")), p)
        } else {
            (0, rest)
        };
        let f = frame::encode(&Header::new(kind, conv, 0, 0), payload);
        check_stream(&f, &limits);
    }
});
