//! WebSocket frames (RFC 6455 §5): header decoding with every check the RFC asks of a
//! receiver, in-place unmasking, and frame encoding.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! | Masking-key (continued)       |          Payload Data         |
//! +-------------------------------- - - - - - - - - - - - - - - - +
//! ```
//! Lengths are big-endian and must use the shortest form (126 → 16-bit for 126..=65535,
//! 127 → 64-bit with the top bit clear for larger).

/// Frame opcodes (RFC 6455 §5.2); the others are reserved and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }

    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }
}

/// Longest payload of a control frame (RFC 6455 §5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask key.
pub const HEADER_BYTES_MAX: usize = 14;

/// A close code (RFC 6455 §7.4) telling the peer why.
pub type CloseCode = u16;

pub mod close_code {
    //! Close codes kefu sends (RFC 6455 §7.4.1 and the API's 4xxx application codes).
    use super::CloseCode;
    pub const NORMAL: CloseCode = 1000;
    pub const GOING_AWAY: CloseCode = 1001;
    pub const PROTOCOL_ERROR: CloseCode = 1002;
    pub const UNSUPPORTED_DATA: CloseCode = 1003;
    pub const INVALID_PAYLOAD: CloseCode = 1007;
    pub const POLICY_VIOLATION: CloseCode = 1008;
    pub const MESSAGE_TOO_BIG: CloseCode = 1009;
    pub const INTERNAL_ERROR: CloseCode = 1011;
    pub const UNAUTHORIZED: CloseCode = 4001;
    pub const FORBIDDEN: CloseCode = 4003;
    pub const TOO_SLOW: CloseCode = 4008;
}

/// Whether `code` may appear in a close frame (RFC 6455 §7.4; 1012-1014 are registered with
/// IANA since). 1005, 1006 and 1015 are reserved for reporting and never sent.
pub fn is_valid_close_code(code: CloseCode) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Why bytes are not a valid frame or message; each maps to the close code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsInvalid {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("payload length not in its shortest form")]
    NonMinimalLength,
    #[error("64-bit payload length with the top bit set")]
    LengthTopBitSet,
    #[error("client frame not masked")]
    Unmasked,
    #[error("server frame masked")]
    UnexpectedMask,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("frame payload larger than the limit")]
    FrameTooLarge,
    #[error("message larger than the limit")]
    MessageTooLarge,
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame with a 1-byte payload")]
    CloseTooShort,
    #[error("close frame with invalid code {0}")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    #[error("data after the close frame")]
    DataAfterClose,
}

impl WsInvalid {
    /// The close code answering this error (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::FrameTooLarge | Self::MessageTooLarge => close_code::MESSAGE_TOO_BIG,
            Self::InvalidUtf8 | Self::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Why a frame could not be decoded (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The bytes so far are a valid prefix of a frame: read at least `needed` more.
    #[error("incomplete frame: at least {needed} more bytes needed")]
    Incomplete { needed: usize },
    #[error(transparent)]
    Invalid(#[from] WsInvalid),
}

/// Which side is decoding: a server requires masked frames, a client unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes of the header; the payload starts here.
    pub header_len: usize,
}

/// Decodes and checks a frame header at the start of `buf`, without needing the payload.
/// `frame_payload_bytes_max` bounds what the caller is willing to buffer (1009 above it).
pub fn decode_header(
    buf: &[u8],
    role: Role,
    frame_payload_bytes_max: u64,
) -> Result<FrameHeader, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Err(FrameError::Incomplete {
            needed: 2 - buf.len(),
        });
    };
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(WsInvalid::ReservedBits.into());
    }
    let opcode = OpCode::from_bits(b0 & 0x0f).ok_or(WsInvalid::ReservedOpcode(b0 & 0x0f))?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(WsInvalid::FragmentedControl.into());
        }
        if usize::from(len7) > CONTROL_PAYLOAD_BYTES_MAX {
            return Err(WsInvalid::ControlTooLong.into());
        }
    }
    match (role, masked) {
        (Role::Server, false) => return Err(WsInvalid::Unmasked.into()),
        (Role::Client, true) => return Err(WsInvalid::UnexpectedMask.into()),
        _ => {}
    }
    let ext_len = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext_len + if masked { 4 } else { 0 };
    if buf.len() < 2 + ext_len {
        return Err(FrameError::Incomplete {
            needed: header_len - buf.len(),
        });
    }
    let payload_len = match len7 {
        126 => {
            let n = u16::from_be_bytes([buf[2], buf[3]]);
            if n < 126 {
                return Err(WsInvalid::NonMinimalLength.into());
            }
            u64::from(n)
        }
        127 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(be);
            if n >> 63 != 0 {
                return Err(WsInvalid::LengthTopBitSet.into());
            }
            if n <= u64::from(u16::MAX) {
                return Err(WsInvalid::NonMinimalLength.into());
            }
            n
        }
        n => u64::from(n),
    };
    if payload_len > frame_payload_bytes_max {
        return Err(WsInvalid::FrameTooLarge.into());
    }
    if buf.len() < header_len {
        return Err(FrameError::Incomplete {
            needed: header_len - buf.len(),
        });
    }
    let mask = masked.then(|| {
        let m = &buf[header_len - 4..header_len];
        [m[0], m[1], m[2], m[3]]
    });
    Ok(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len,
    })
}

/// A decoded frame whose payload was unmasked in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

/// Decodes one whole frame at the start of `buf`, unmasking its payload in place; returns it
/// and the bytes used. On `Incomplete`, `buf` is unchanged.
pub fn decode_frame(
    buf: &mut [u8],
    role: Role,
    frame_payload_bytes_max: u64,
) -> Result<(Frame<'_>, usize), FrameError> {
    let header = decode_header(buf, role, frame_payload_bytes_max)?;
    let available = (buf.len() - header.header_len) as u64;
    if available < header.payload_len {
        // The shortfall is at most payload_len <= frame_payload_bytes_max, which the caller
        // chose to buffer, so it fits usize.
        let needed = usize::try_from(header.payload_len - available).unwrap_or(usize::MAX);
        return Err(FrameError::Incomplete { needed });
    }
    // payload_len <= available <= buf.len(), so this fits usize.
    let end = header.header_len + header.payload_len as usize;
    let payload = &mut buf[header.header_len..end];
    if let Some(key) = header.mask {
        unmask(payload, key);
    }
    Ok((Frame { header, payload }, end))
}

/// XORs `data` with the repeating 4-byte `key` (masking and unmasking are the same), starting
/// at key position 0. Works a machine word at a time; LLVM vectorizes the inner loop.
pub fn unmask(data: &mut [u8], key: [u8; 4]) {
    let key64 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    // Every chunk starts at a multiple of 32, so the key lines up the same way in each.
    let mut chunks = data.chunks_exact_mut(32);
    for chunk in &mut chunks {
        for word in chunk.chunks_exact_mut(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            word.copy_from_slice(&(u64::from_ne_bytes(w) ^ key64).to_ne_bytes());
        }
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The same as [`unmask`], one byte at a time: the reference the tests and benchmark compare
/// against.
pub fn unmask_bytewise(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Writes a frame header for a `payload_len`-byte payload (the caller appends the payload,
/// masked if `mask` is set).
pub fn encode_header(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) {
    let b0 = if fin { 0x80 } else { 0 } | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if payload_len < 126 {
        out.extend_from_slice(&[b0, mask_bit | payload_len as u8]);
    } else if payload_len <= u64::from(u16::MAX) {
        out.extend_from_slice(&[b0, mask_bit | 126]);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[b0, mask_bit | 127]);
        out.extend_from_slice(&payload_len.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// Writes a whole frame. Servers send unmasked frames (`mask: None`); a client (tests, the
/// load tester) passes its key.
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    encode_header(out, fin, opcode, payload.len() as u64, mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        unmask(&mut out[start..], key);
    }
}
