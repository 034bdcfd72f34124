//! A sans-I/O WebSocket connection (server side by default): turns received bytes into
//! messages and control events, reassembles fragments within size limits, validates UTF-8
//! incrementally, answers pings and closes, and writes outgoing frames.
//!
//! The caller owns both buffers. It reads into `buf`, calls [`WsConnection::decode`] until
//! `Incomplete`, drops the consumed prefix, and writes whatever landed in `out` (pongs, close
//! replies) to the socket. On an `Invalid` error the matching close frame is already in `out`:
//! flush it and close the connection.

use super::frame::{
    CONTROL_PAYLOAD_BYTES_MAX, CloseCode, FrameError, OpCode, Role, WsInvalid, close_code,
    decode_frame, encode_frame, is_valid_close_code,
};

/// Reassembly capacity kept between fragmented messages; more is freed after delivery.
const MESSAGE_CAPACITY_KEPT_MAX: usize = 4 * 1024;

/// Size limits of a connection; chosen from config at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest payload of one frame (1009 above it).
    pub frame_payload_bytes_max: u64,
    /// Largest message after reassembling fragments (1009 above it).
    pub message_bytes_max: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        Self {
            frame_payload_bytes_max: 64 * 1024,
            message_bytes_max: 64 * 1024,
        }
    }
}

/// What a decoded frame meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A complete text message (valid UTF-8).
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping; the pong is already in `out`.
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer closed. If we had not closed yet, the echoing close frame is already in `out`;
    /// either way, flush `out` and close the socket.
    Close {
        code: Option<CloseCode>,
        reason: &'a str,
    },
}

/// Why [`WsConnection::decode`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// Read at least `needed` more bytes.
    #[error("incomplete frame: at least {needed} more bytes needed")]
    Incomplete { needed: usize },
    /// The peer broke the protocol; the close frame with [`WsInvalid::close_code`] is in `out`.
    #[error(transparent)]
    Invalid(#[from] WsInvalid),
    /// The closing handshake is over; nothing more is read.
    #[error("connection closed")]
    Closed,
}

/// What one frame produced, before borrowing the reassembly buffer.
enum Step<'b> {
    Event(WsEvent<'b>),
    /// The last fragment arrived; the message is in `WsConnection::message`.
    Assembled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// We sent a close frame and wait for the peer's.
    CloseSent,
    Closed,
}

/// The receive and send state of one WebSocket connection.
#[derive(Debug)]
pub struct WsConnection {
    limits: WsLimits,
    role: Role,
    state: State,
    /// Opcode of the fragmented message being reassembled, if any.
    fragmented: Option<OpCode>,
    /// Reassembly buffer; never longer than `limits.message_bytes_max`.
    message: Vec<u8>,
    /// Prefix of `message` known to be valid UTF-8; `usize::MAX` while reassembling binary.
    utf8_valid_len: usize,
    /// `message` was handed out by the previous call and must be cleared before reuse.
    message_delivered: bool,
}

impl WsConnection {
    /// A server-side connection (expects masked frames, sends unmasked ones).
    pub fn new(limits: WsLimits) -> Self {
        Self::with_role(limits, Role::Server)
    }

    pub fn with_role(limits: WsLimits, role: Role) -> Self {
        Self {
            limits,
            role,
            state: State::Open,
            fragmented: None,
            message: Vec::new(),
            utf8_valid_len: 0,
            message_delivered: false,
        }
    }

    /// Whether the closing handshake is finished (the socket can be closed).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether we may still send data frames.
    pub fn can_send(&self) -> bool {
        self.state == State::Open
    }

    /// Decodes the next frame at the start of `buf` (unmasking it in place). Returns the event,
    /// if the frame completed one, and the bytes used; a non-final fragment gives `None`.
    pub fn decode<'a>(
        &'a mut self,
        buf: &'a mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<(Option<WsEvent<'a>>, usize), WsError> {
        if self.message_delivered {
            if self.message.capacity() > MESSAGE_CAPACITY_KEPT_MAX {
                // Fragmented messages are rare; an idle socket should not keep a large buffer.
                self.message = Vec::new();
            }
            self.message.clear();
            self.utf8_valid_len = 0;
            self.message_delivered = false;
        }
        if self.state == State::Closed {
            return Err(WsError::Closed);
        }
        let (event, consumed) = match self.decode_inner(buf, out) {
            Ok(step) => step,
            Err(WsError::Invalid(e)) => {
                self.fail(e, out);
                return Err(WsError::Invalid(e));
            }
            Err(e) => return Err(e),
        };
        let event = match event {
            None => None,
            Some(Step::Event(ev)) => Some(ev),
            Some(Step::Assembled) => {
                self.message_delivered = true;
                Some(if self.utf8_valid_len == usize::MAX {
                    WsEvent::Binary(&self.message)
                } else {
                    // check_utf8_so_far(fin = true) proved the whole message valid.
                    WsEvent::Text(
                        std::str::from_utf8(&self.message).map_err(|_| WsInvalid::InvalidUtf8)?,
                    )
                })
            }
        };
        Ok((event, consumed))
    }

    /// Decodes one frame; events borrow only `buf`, reassembled messages stay in `self.message`.
    fn decode_inner<'b>(
        &mut self,
        buf: &'b mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<(Option<Step<'b>>, usize), WsError> {
        // A frame larger than a whole message can never be valid, so refuse it from its
        // header; this also bounds unfragmented messages by message_bytes_max.
        let frame_max = self
            .limits
            .frame_payload_bytes_max
            .min(self.limits.message_bytes_max as u64);
        let (frame, consumed) = match decode_frame(buf, self.role, frame_max) {
            Ok(f) => f,
            Err(FrameError::Incomplete { needed }) => {
                return Err(WsError::Incomplete { needed });
            }
            Err(FrameError::Invalid(e)) => return Err(e.into()),
        };
        let fin = frame.header.fin;
        let payload = frame.payload;
        let event = match frame.header.opcode {
            OpCode::Ping => {
                if self.state == State::Open {
                    encode_frame(out, true, OpCode::Pong, payload, self.send_mask());
                }
                WsEvent::Ping(payload)
            }
            OpCode::Pong => WsEvent::Pong(payload),
            OpCode::Close => self.on_close(payload, out)?,
            // RFC 6455 §5.5.1: after our close, data frames may still arrive; discard them
            // (fragmented or not) until the peer's close.
            _ if self.state == State::CloseSent => return Ok((None, consumed)),
            OpCode::Text | OpCode::Binary if self.fragmented.is_some() => {
                return Err(WsInvalid::ExpectedContinuation.into());
            }
            OpCode::Continuation if self.fragmented.is_none() => {
                return Err(WsInvalid::UnexpectedContinuation.into());
            }
            OpCode::Text if fin => {
                WsEvent::Text(std::str::from_utf8(payload).map_err(|_| WsInvalid::InvalidUtf8)?)
            }
            OpCode::Binary if fin => WsEvent::Binary(payload),
            opcode @ (OpCode::Text | OpCode::Binary | OpCode::Continuation) => {
                if opcode != OpCode::Continuation {
                    self.fragmented = Some(opcode);
                    // usize::MAX marks a binary message: no UTF-8 to track.
                    self.utf8_valid_len = if opcode == OpCode::Text {
                        0
                    } else {
                        usize::MAX
                    };
                }
                if self.message.len() + payload.len() > self.limits.message_bytes_max {
                    return Err(WsInvalid::MessageTooLarge.into());
                }
                self.message.extend_from_slice(payload);
                if self.utf8_valid_len != usize::MAX {
                    self.check_utf8_so_far(fin)?;
                }
                if !fin {
                    return Ok((None, consumed));
                }
                self.fragmented = None;
                return Ok((Some(Step::Assembled), consumed));
            }
        };
        Ok((Some(Step::Event(event)), consumed))
    }

    /// Validates the newly appended bytes of a text message, so a bad fragment fails at once;
    /// a code point cut at a fragment boundary is fine until the last fragment.
    fn check_utf8_so_far(&mut self, fin: bool) -> Result<(), WsInvalid> {
        let tail = &self.message[self.utf8_valid_len..];
        match std::str::from_utf8(tail) {
            Ok(_) => self.utf8_valid_len = self.message.len(),
            Err(e) if e.error_len().is_none() && !fin => self.utf8_valid_len += e.valid_up_to(),
            Err(_) => return Err(WsInvalid::InvalidUtf8),
        }
        Ok(())
    }

    fn on_close<'a>(
        &mut self,
        payload: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<WsEvent<'a>, WsInvalid> {
        let (code, reason) = match payload {
            [] => (None, ""),
            [_] => return Err(WsInvalid::CloseTooShort),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !is_valid_close_code(code) {
                    return Err(WsInvalid::InvalidCloseCode(code));
                }
                let reason =
                    std::str::from_utf8(reason).map_err(|_| WsInvalid::InvalidCloseReason)?;
                (Some(code), reason)
            }
        };
        if self.state == State::Open {
            // Echo the code (RFC 6455 §5.5.1); an empty close is answered with an empty one.
            let body = code.map(u16::to_be_bytes);
            let reply: &[u8] = body.as_ref().map_or(&[], |b| &b[..]);
            encode_frame(out, true, OpCode::Close, reply, self.send_mask());
        }
        self.state = State::Closed;
        Ok(WsEvent::Close { code, reason })
    }

    /// Answers a protocol error: send the close frame and stop reading.
    fn fail(&mut self, e: WsInvalid, out: &mut Vec<u8>) {
        if self.state == State::Open {
            write_close_frame(out, e.close_code(), "", self.send_mask());
        }
        self.state = State::Closed;
        self.fragmented = None;
        self.message.clear();
    }

    fn send_mask(&self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            // A client must mask with an unpredictable key (RFC 6455 §5.3). This codec has no
            // randomness source, so client-role connections (tests, the load tester) use a
            // fixed key; masking there protects no one since we control both ends.
            Role::Client => Some([0x37, 0xfa, 0x21, 0x3d]),
        }
    }

    /// Writes a text message as one frame. Returns false (writing nothing) after close.
    pub fn send_text(&mut self, out: &mut Vec<u8>, text: &str) -> bool {
        self.send(out, OpCode::Text, text.as_bytes())
    }

    /// Writes a binary message as one frame. Returns false (writing nothing) after close.
    pub fn send_binary(&mut self, out: &mut Vec<u8>, data: &[u8]) -> bool {
        self.send(out, OpCode::Binary, data)
    }

    /// Writes a ping (payload cut to 125 bytes). Returns false after close.
    pub fn send_ping(&mut self, out: &mut Vec<u8>, payload: &[u8]) -> bool {
        let payload = &payload[..payload.len().min(CONTROL_PAYLOAD_BYTES_MAX)];
        self.send(out, OpCode::Ping, payload)
    }

    fn send(&mut self, out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) -> bool {
        if self.state != State::Open {
            return false;
        }
        encode_frame(out, true, opcode, payload, self.send_mask());
        true
    }

    /// Starts the closing handshake with `code` (a valid close code; anything else is sent as
    /// 1011) and `reason` (cut to 123 bytes at a character boundary). Returns false if a close
    /// was already sent.
    pub fn send_close(&mut self, out: &mut Vec<u8>, code: CloseCode, reason: &str) -> bool {
        if self.state != State::Open {
            return false;
        }
        let code = if is_valid_close_code(code) {
            code
        } else {
            close_code::INTERNAL_ERROR
        };
        write_close_frame(out, code, reason, self.send_mask());
        self.state = State::CloseSent;
        true
    }
}

/// Writes a close frame with `code` and `reason`, cut to fit the 125-byte control payload.
pub fn write_close_frame(out: &mut Vec<u8>, code: CloseCode, reason: &str, mask: Option<[u8; 4]>) {
    let mut end = reason.len().min(CONTROL_PAYLOAD_BYTES_MAX - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; CONTROL_PAYLOAD_BYTES_MAX];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode_frame(out, true, OpCode::Close, &payload[..2 + end], mask);
}
