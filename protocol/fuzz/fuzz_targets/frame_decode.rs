#![no_main]
//! Fuzz target: `frame::decode` and `frame::peek_header` on arbitrary bytes must never panic,
//! and whatever decodes must re-encode to the same bytes.
use kefu_protocol::frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte picks a payload limit, so the TooLarge path is exercised too.
    let (limit, buf) = match data.split_first() {
        Some((b, rest)) => (u32::from(*b) * 64, rest),
        None => (0, data),
    };
    let _ = frame::peek_header(buf, limit);
    let mut rest = buf;
    // Decode a stream of frames like a reader would; each step consumes at least a header.
    while let Ok((f, used)) = frame::decode(rest, limit) {
        assert!(used >= frame::HEADER_LEN && used <= rest.len());
        assert_eq!(f.bytes.len(), used);
        assert_eq!(frame::encode(&f.header, f.payload), f.bytes);
        let mut copy = f.bytes.to_vec();
        frame::patch_log_offset(&mut copy, f.header.log_offset ^ 1).expect("valid frame patches");
        let (g, _) = frame::decode(&copy, limit).expect("patched frame decodes");
        assert_eq!(g.header.log_offset, f.header.log_offset ^ 1);
        rest = &rest[used..];
    }
});
