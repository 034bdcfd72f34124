//! Binary frame format: the TCP protocol frame and the storage record are the same bytes.
//!
//! A frame is a fixed 48-byte little-endian header followed by `payload_len` payload bytes.
//! The same bytes are written to the shard log, sent to binary clients and streamed to
//! integrations with `sendfile`, so a replay needs no re-encoding.
//!
//! | off | size | field | notes |
//! |----:|-----:|-------|-------|
//! |   0 |    2 | magic | `b"KF"` |
//! |   2 |    1 | version | `1` |
//! |   3 |    1 | kind | [`Kind`] as `u8` |
//! |   4 |    4 | crc32c | CRC32C (Castagnoli) over header bytes `0..4`, then `8..48`, then the payload |
//! |   8 |    4 | payload_len | `u32`, bytes after the header |
//! |  12 |    2 | flags | `u16`; bit 0 = payload is zstd-compressed ([`FLAG_ZSTD`]); other bits must be 0 |
//! |  14 |    2 | reserved | `u16`, must be 0 |
//! |  16 |    8 | conversation_id | `u64`; the owning shard is `id >> 48` |
//! |  24 |    8 | seq | `u64`, per conversation, dense from 1; `0` = none |
//! |  32 |    8 | log_offset | `u64`, dense per shard log; filled in by storage on append |
//! |  40 |    8 | timestamp_us | `u64`, unix microseconds |
//! |  48 |    n | payload | `payload_len` bytes |
//!
//! The CRC covers every header byte except its own four (bytes `0..4`, then `8..48`) and
//! the payload, so a corruption that turns one valid kind into another (a single bit flip
//! from Message = 1 to Control = 3) is caught like any other. Storage patches `log_offset` in
//! place and re-computes the CRC ([`patch_log_offset`]).
//!
//! Decoding never panics and never allocates: [`decode`] answers a borrowed [`FrameRef`],
//! [`DecodeError::Incomplete`] when more bytes are needed, or a specific invalid reason.
//! The payload length is checked against the caller's `payload_len_max` before the caller
//! is told to wait for (and buffer) the payload, so a hostile length cannot make a reader
//! reserve memory without bound.

use thiserror::Error;

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 48;
/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"KF";
/// The only frame version this code reads and writes.
pub const VERSION: u8 = 1;
/// Flag bit 0: the payload is zstd-compressed.
pub const FLAG_ZSTD: u16 = 1;
/// Every flag bit this version knows; any other set bit is invalid.
pub const FLAGS_KNOWN: u16 = FLAG_ZSTD;

// Field offsets inside the header (see the byte table above).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 2;
const OFF_KIND: usize = 3;
const OFF_CRC: usize = 4;
const OFF_PAYLOAD_LEN: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_RESERVED: usize = 14;
const OFF_CONVERSATION: usize = 16;
const OFF_SEQ: usize = 24;
const OFF_LOG_OFFSET: usize = 32;
const OFF_TIMESTAMP: usize = 40;
/// The CRC covers the header before its own field (magic, version, kind), then the header
/// from here on, then the payload.
const CRC_START: usize = OFF_PAYLOAD_LEN;

const _: () = assert!(OFF_TIMESTAMP + 8 == HEADER_LEN);
const _: () = assert!(OFF_CRC + 4 == CRC_START);

/// What a frame carries. Values 1..=3 are stored records; 16.. are client to server,
/// 32.. server to client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A conversation message (stored record).
    Message = 1,
    /// A conversation event: queued, assigned, transferred, ... (stored record).
    Event = 2,
    /// A control record of the log itself (stored record).
    Control = 3,
    /// Client handshake with a token.
    Hello = 16,
    /// Client sends a message.
    Send = 17,
    /// Client subscribes to a conversation or stream.
    Subscribe = 18,
    /// Client typing indicator.
    Typing = 19,
    /// Client read receipt.
    Read = 20,
    /// Client opens a raw log stream.
    StreamOpen = 21,
    /// Client keep-alive.
    Ping = 22,
    /// Server handshake answer.
    Welcome = 32,
    /// Server acknowledges a send once it is durable.
    Ack = 33,
    /// Server reports an error.
    Error = 34,
    /// Server keep-alive answer.
    Pong = 35,
}

impl Kind {
    /// Every kind, in numeric order.
    pub const ALL: [Kind; 14] = [
        Kind::Message,
        Kind::Event,
        Kind::Control,
        Kind::Hello,
        Kind::Send,
        Kind::Subscribe,
        Kind::Typing,
        Kind::Read,
        Kind::StreamOpen,
        Kind::Ping,
        Kind::Welcome,
        Kind::Ack,
        Kind::Error,
        Kind::Pong,
    ];

    /// Whether this kind is a record that the shard log stores.
    pub fn is_record(self) -> bool {
        matches!(self, Kind::Message | Kind::Event | Kind::Control)
    }
}

impl TryFrom<u8> for Kind {
    /// The unknown byte.
    type Error = u8;

    fn try_from(value: u8) -> Result<Self, u8> {
        Ok(match value {
            1 => Kind::Message,
            2 => Kind::Event,
            3 => Kind::Control,
            16 => Kind::Hello,
            17 => Kind::Send,
            18 => Kind::Subscribe,
            19 => Kind::Typing,
            20 => Kind::Read,
            21 => Kind::StreamOpen,
            22 => Kind::Ping,
            32 => Kind::Welcome,
            33 => Kind::Ack,
            34 => Kind::Error,
            35 => Kind::Pong,
            other => return Err(other),
        })
    }
}

/// The decoded header fields (magic, version and CRC are checked, not stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    /// Set by [`encode_into`] from the payload; on decode, the length read from the wire.
    pub payload_len: u32,
    pub conversation_id: u64,
    pub seq: u64,
    pub log_offset: u64,
    pub timestamp_us: u64,
}

impl Header {
    /// A header with no flags, no log offset yet and the payload length left to `encode_into`.
    pub fn new(kind: Kind, conversation_id: u64, seq: u64, timestamp_us: u64) -> Header {
        Header {
            kind,
            flags: 0,
            payload_len: 0,
            conversation_id,
            seq,
            log_offset: 0,
            timestamp_us,
        }
    }

    /// The shard that owns this frame's conversation (`conversation_id >> 48`).
    pub fn shard(&self) -> u16 {
        shard_of(self.conversation_id)
    }

    /// Length of the whole frame, header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Whether the payload is zstd-compressed.
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_ZSTD != 0
    }
}

/// The shard that owns a conversation id: its top 16 bits.
pub fn shard_of(conversation_id: u64) -> u16 {
    (conversation_id >> 48) as u16
}

/// A decoded frame borrowing the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub header: Header,
    pub payload: &'a [u8],
    /// The whole frame, header and payload, exactly as received.
    pub bytes: &'a [u8],
}

impl FrameRef<'_> {
    /// The CRC stored in the frame (already verified by [`decode`]).
    pub fn crc(&self) -> u32 {
        read_u32(self.bytes, OFF_CRC)
    }
}

/// Why bytes are not (yet) a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The bytes so far are a valid prefix; at least `needed` more bytes are required.
    #[error("incomplete frame: need at least {needed} more bytes")]
    Incomplete { needed: usize },
    #[error("bad magic {0:02x?}, expected \"KF\"")]
    BadMagic([u8; 2]),
    #[error("unsupported frame version {0}, expected {VERSION}")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown frame flags {0:#06x}")]
    BadFlags(u16),
    #[error("reserved header field is {0:#06x}, must be 0")]
    BadReserved(u16),
    #[error("payload of {payload_len} bytes exceeds the limit of {max} bytes")]
    TooLarge { payload_len: u32, max: u32 },
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
}

impl DecodeError {
    /// Whether more bytes could make the input valid (as opposed to it being invalid).
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// Writes the 48 header bytes with the CRC field zeroed.
fn write_header(h: &Header, payload_len: u32, out: &mut [u8; HEADER_LEN]) {
    out[OFF_MAGIC..OFF_MAGIC + 2].copy_from_slice(&MAGIC);
    out[OFF_VERSION] = VERSION;
    out[OFF_KIND] = h.kind as u8;
    out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&[0; 4]);
    out[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[OFF_FLAGS..OFF_FLAGS + 2].copy_from_slice(&h.flags.to_le_bytes());
    out[OFF_RESERVED..OFF_RESERVED + 2].copy_from_slice(&0u16.to_le_bytes());
    out[OFF_CONVERSATION..OFF_CONVERSATION + 8].copy_from_slice(&h.conversation_id.to_le_bytes());
    out[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&h.seq.to_le_bytes());
    out[OFF_LOG_OFFSET..OFF_LOG_OFFSET + 8].copy_from_slice(&h.log_offset.to_le_bytes());
    out[OFF_TIMESTAMP..OFF_TIMESTAMP + 8].copy_from_slice(&h.timestamp_us.to_le_bytes());
}

/// The CRC of a frame: header bytes `0..4`, then `8..48`, then the payload.
fn compute_crc(header: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[OFF_MAGIC..OFF_CRC]);
    let crc = crc32c::crc32c_append(crc, &header[CRC_START..HEADER_LEN]);
    crc32c::crc32c_append(crc, payload)
}

/// Encodes the 48-byte header for `payload` (CRC included) into `out`.
///
/// `payload_len` is taken from `payload`, not from `h`. Useful to write header and payload
/// to separate places (e.g. straight into a mapped segment) without an intermediate copy.
///
/// # Panics
/// If `payload` is longer than `u32::MAX` bytes or `h.flags` has unknown bits: both are
/// caller bugs, not input.
pub fn encode_header(h: &Header, payload: &[u8], out: &mut [u8; HEADER_LEN]) {
    assert!(
        payload.len() <= u32::MAX as usize,
        "frame payload over 4 GiB"
    );
    assert!(
        h.flags & !FLAGS_KNOWN == 0,
        "unknown frame flags {:#x}",
        h.flags
    );
    write_header(h, payload.len() as u32, out);
    let crc = compute_crc(out, payload);
    out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Appends the frame for `h` and `payload` to `out`, computing the CRC and `payload_len`.
///
/// # Panics
/// As [`encode_header`].
pub fn encode_into(h: &Header, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; HEADER_LEN];
    encode_header(h, payload, &mut header);
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// The frame for `h` and `payload` as a new vector.
pub fn encode(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    encode_into(h, payload, &mut out);
    out
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Checks the fixed fields present in a possibly partial header, so garbage is rejected as
/// soon as its first bytes arrive instead of after a full header.
fn check_prefix(buf: &[u8], payload_len_max: u32) -> Result<(), DecodeError> {
    let n = buf.len();
    if n >= 1 && buf[0] != MAGIC[0] {
        return Err(DecodeError::BadMagic([
            buf[0],
            buf.get(1).copied().unwrap_or(0),
        ]));
    }
    if n >= 2 && buf[1] != MAGIC[1] {
        return Err(DecodeError::BadMagic([buf[0], buf[1]]));
    }
    if n > OFF_VERSION && buf[OFF_VERSION] != VERSION {
        return Err(DecodeError::BadVersion(buf[OFF_VERSION]));
    }
    if n > OFF_KIND {
        Kind::try_from(buf[OFF_KIND]).map_err(DecodeError::UnknownKind)?;
    }
    if n >= OFF_PAYLOAD_LEN + 4 {
        let payload_len = read_u32(buf, OFF_PAYLOAD_LEN);
        if payload_len > payload_len_max {
            return Err(DecodeError::TooLarge {
                payload_len,
                max: payload_len_max,
            });
        }
    }
    if n >= OFF_FLAGS + 2 {
        let flags = read_u16(buf, OFF_FLAGS);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(DecodeError::BadFlags(flags));
        }
    }
    if n >= OFF_RESERVED + 2 {
        let reserved = read_u16(buf, OFF_RESERVED);
        if reserved != 0 {
            return Err(DecodeError::BadReserved(reserved));
        }
    }
    Ok(())
}

/// Reads and validates a header without needing (or checking the CRC of) the payload.
///
/// Everything but the CRC is validated, including `payload_len <= payload_len_max`, so a
/// reader can size its buffer from `header.frame_len()` safely.
pub fn peek_header(buf: &[u8], payload_len_max: u32) -> Result<Header, DecodeError> {
    check_prefix(buf, payload_len_max)?;
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    }
    let kind = match Kind::try_from(buf[OFF_KIND]) {
        Ok(kind) => kind,
        Err(b) => return Err(DecodeError::UnknownKind(b)),
    };
    Ok(Header {
        kind,
        flags: read_u16(buf, OFF_FLAGS),
        payload_len: read_u32(buf, OFF_PAYLOAD_LEN),
        conversation_id: read_u64(buf, OFF_CONVERSATION),
        seq: read_u64(buf, OFF_SEQ),
        log_offset: read_u64(buf, OFF_LOG_OFFSET),
        timestamp_us: read_u64(buf, OFF_TIMESTAMP),
    })
}

/// Decodes one frame from the start of `buf`.
///
/// Returns the frame and the number of bytes it used; the rest of `buf` is untouched.
/// Payloads longer than `payload_len_max` are refused from the header alone.
pub fn decode(buf: &[u8], payload_len_max: u32) -> Result<(FrameRef<'_>, usize), DecodeError> {
    let header = peek_header(buf, payload_len_max)?;
    let frame_len = header.frame_len();
    if buf.len() < frame_len {
        return Err(DecodeError::Incomplete {
            needed: frame_len - buf.len(),
        });
    }
    let bytes = &buf[..frame_len];
    let payload = &bytes[HEADER_LEN..];
    let stored = read_u32(bytes, OFF_CRC);
    let computed = compute_crc(bytes, payload);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    Ok((
        FrameRef {
            header,
            payload,
            bytes,
        },
        frame_len,
    ))
}

/// Sets `log_offset` of the encoded frame in `frame` (header and whole payload) and
/// re-computes its CRC. The frame is validated first, so a damaged frame is never given a
/// fresh, valid-looking CRC.
pub fn patch_log_offset(frame: &mut [u8], log_offset: u64) -> Result<(), DecodeError> {
    let (_, len) = decode(frame, u32::MAX)?;
    let frame = &mut frame[..len];
    frame[OFF_LOG_OFFSET..OFF_LOG_OFFSET + 8].copy_from_slice(&log_offset.to_le_bytes());
    let (header, payload) = frame.split_at_mut(HEADER_LEN);
    let crc = compute_crc(header, payload);
    header[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: u32 = 1 << 20;

    fn sample() -> (Header, Vec<u8>) {
        let mut h = Header::new(Kind::Message, (7u64 << 48) | 42, 3, 1_700_000_000_000_000);
        h.log_offset = 99;
        (h, br#"{"text":"hello"}"#.to_vec())
    }

    #[test]
    fn known_bytes() {
        let (h, payload) = sample();
        let f = encode(&h, &payload);
        assert_eq!(f.len(), HEADER_LEN + payload.len());
        assert_eq!(&f[0..2], b"KF");
        assert_eq!(f[2], 1);
        assert_eq!(f[3], 1);
        assert_eq!(&f[8..12], &(payload.len() as u32).to_le_bytes());
        assert_eq!(&f[12..16], &[0, 0, 0, 0]);
        assert_eq!(&f[16..24], &((7u64 << 48) | 42).to_le_bytes());
        assert_eq!(&f[24..32], &3u64.to_le_bytes());
        assert_eq!(&f[32..40], &99u64.to_le_bytes());
        assert_eq!(&f[40..48], &1_700_000_000_000_000u64.to_le_bytes());
        let mut crc_input = f[0..4].to_vec();
        crc_input.extend_from_slice(&f[8..48]);
        crc_input.extend_from_slice(&payload);
        assert_eq!(&f[4..8], &crc32c::crc32c(&crc_input).to_le_bytes());
        assert_eq!(h.shard(), 7);
    }

    #[test]
    fn roundtrip_and_consumed_with_trailing_bytes() {
        let (h, payload) = sample();
        let mut buf = encode(&h, &payload);
        let len = buf.len();
        buf.extend_from_slice(b"KF trailing");
        let (f, used) = decode(&buf, MAX).unwrap();
        assert_eq!(used, len);
        assert_eq!(f.payload, &payload[..]);
        assert_eq!(f.bytes.len(), len);
        assert_eq!(
            f.header,
            Header {
                payload_len: payload.len() as u32,
                ..h
            }
        );
    }

    #[test]
    fn kind_numbers_roundtrip() {
        for k in Kind::ALL {
            assert_eq!(Kind::try_from(k as u8), Ok(k));
        }
        assert_eq!(Kind::try_from(0), Err(0));
        assert_eq!(Kind::try_from(4), Err(4));
        assert!(Kind::Message.is_record() && !Kind::Ack.is_record());
    }

    #[test]
    fn invalid_reasons() {
        let (h, payload) = sample();
        let good = encode(&h, &payload);
        let with = |at: usize, b: u8| {
            let mut f = good.clone();
            f[at] = b;
            decode(&f, MAX).map(|_| ()).unwrap_err()
        };
        assert_eq!(with(0, b'X'), DecodeError::BadMagic([b'X', b'F']));
        assert_eq!(with(1, b'X'), DecodeError::BadMagic([b'K', b'X']));
        assert_eq!(with(2, 2), DecodeError::BadVersion(2));
        assert_eq!(with(3, 9), DecodeError::UnknownKind(9));
        assert_eq!(with(12, 2), DecodeError::BadFlags(2));
        assert_eq!(with(14, 1), DecodeError::BadReserved(1));
        assert!(matches!(with(60, b'!'), DecodeError::BadCrc { .. }));
        assert!(matches!(with(20, 1), DecodeError::BadCrc { .. }));
        // Garbage is refused on its first byte, without waiting for a header.
        assert_eq!(
            decode(b"G", MAX).unwrap_err(),
            DecodeError::BadMagic([b'G', 0])
        );
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        let (h, payload) = sample();
        let f = encode(&h, &payload);
        let err = decode(&f[..12], 4).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                payload_len: payload.len() as u32,
                max: 4
            }
        );
        // Exactly at the limit is fine.
        assert!(decode(&f, payload.len() as u32).is_ok());
    }

    #[test]
    fn compressed_flag_is_allowed() {
        let (mut h, payload) = sample();
        h.flags = FLAG_ZSTD;
        let f = encode(&h, &payload);
        let (fr, _) = decode(&f, MAX).unwrap();
        assert!(fr.header.is_compressed());
    }

    #[test]
    fn patch_log_offset_recomputes_crc() {
        let (h, payload) = sample();
        let mut f = encode(&h, &payload);
        patch_log_offset(&mut f, 123_456).unwrap();
        let (fr, _) = decode(&f, MAX).unwrap();
        assert_eq!(fr.header.log_offset, 123_456);
        assert_eq!(
            f,
            encode(
                &Header {
                    log_offset: 123_456,
                    ..h
                },
                &payload
            )
        );
        // A damaged frame is not blessed with a fresh CRC.
        f[50] ^= 1;
        assert!(matches!(
            patch_log_offset(&mut f, 1),
            Err(DecodeError::BadCrc { .. })
        ));
    }

    #[test]
    fn peek_header_needs_no_payload() {
        let (h, payload) = sample();
        let f = encode(&h, &payload);
        let got = peek_header(&f[..HEADER_LEN], MAX).unwrap();
        assert_eq!(got.log_offset, 99);
        assert_eq!(got.frame_len(), f.len());
        assert_eq!(
            peek_header(&f[..10], MAX),
            Err(DecodeError::Incomplete { needed: 38 })
        );
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            proptest::sample::select(Kind::ALL.to_vec()),
            prop_oneof![Just(0u16), Just(FLAG_ZSTD)],
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(kind, flags, conversation_id, seq, log_offset, timestamp_us)| Header {
                    kind,
                    flags,
                    payload_len: 0,
                    conversation_id,
                    seq,
                    log_offset,
                    timestamp_us,
                },
            )
    }

    proptest! {
        #[test]
        fn prop_roundtrip(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let f = encode(&h, &payload);
            let (fr, used) = decode(&f, MAX).unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(fr.header, Header { payload_len: payload.len() as u32, ..h });
            prop_assert_eq!(fr.payload, &payload[..]);
            prop_assert_eq!(fr.bytes, &f[..]);
        }

        #[test]
        fn prop_every_truncation_is_incomplete(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let f = encode(&h, &payload);
            for cut in 0..f.len() {
                let got = decode(&f[..cut], MAX).map(|_| ());
                prop_assert_eq!(got, Err(DecodeError::Incomplete { needed: if cut < HEADER_LEN { HEADER_LEN - cut } else { f.len() - cut } }));
            }
        }

        #[test]
        fn prop_single_bit_flip_never_decodes(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..200), bit in any::<usize>()) {
            let mut f = encode(&h, &payload);
            let bit = bit % (f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            // A flip either breaks a checked field, the CRC, or grows payload_len (Incomplete);
            // the CRC covers the kind byte too, so no flip ever decodes.
            prop_assert!(decode(&f, MAX).is_err());
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..256), max in any::<u32>()) {
            match decode(&buf, max) {
                Ok((fr, used)) => {
                    prop_assert!(used <= buf.len());
                    prop_assert_eq!(fr.bytes.len(), used);
                }
                Err(DecodeError::Incomplete { needed }) => prop_assert!(needed > 0),
                Err(_) => {}
            }
            let _ = peek_header(&buf, max);
        }

        #[test]
        fn prop_arbitrary_bytes_behind_valid_prefix_never_panic(h in arb_header(), tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Random bytes after a valid header exercise the CRC and length paths, which purely
            // random input almost never reaches.
            let mut f = encode(&h, &[]);
            f.truncate(HEADER_LEN);
            f[8..12].copy_from_slice(&(tail.len() as u32 / 2).to_le_bytes());
            f.extend_from_slice(&tail);
            let _ = decode(&f, MAX);
        }
    }
}
