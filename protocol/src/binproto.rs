//! The binary TCP protocol: payloads of handshake, send, subscribe, ack and stream frames.
//!
//! Every message is one [`frame`](crate::frame) (48-byte header, then payload). The header's
//! `conversation_id` names the conversation a message is about (0 where none); client frames
//! carry `flags = 0` (no compression), `seq = 0` and `log_offset = 0`, which the server assigns.
//! `timestamp_us` of a client frame is the client's clock, informational only.
//!
//! ## Session
//! 1. The client sends `Hello`. The server answers `Welcome`, or `Error` (code 401) and closes.
//! 2. The client sends `Send`, `Subscribe`, `Typing`, `Read`, `Ping` in any order; the server
//!    answers `Ack` (a send is durable), `Error`, `Pong`, and pushes the **stored frames** of the
//!    conversations it follows: kinds `Message` (1) and `Event` (2) with their JSON record payloads
//!    (`model::MessageRecord`, `model::EventRecord`), byte for byte as on disk. An agent
//!    session receives its inbox without subscribing.
//! 3. `StreamOpen` (integration tokens only) turns the session into a one-way log stream: the
//!    server sends the shard's raw stored frames from `from_offset` on, the same bytes as
//!    `GET /v1/stream`, and follows the tail when asked to.
//!
//! Ephemeral events (`typing`, `read`) are pushed as `Event` frames with `seq = 0` and
//! `log_offset = 0`, whose payload is the WebSocket `event` JSON (`model::EventMessage`).
//!
//! ## Payload layouts
//! Little-endian. `str16` is a `u16` byte length then that many UTF-8 bytes; `str32` the same
//! with a `u32` length. An optional string is written with length 0 for "none". Every decoded
//! length is checked against [`BinLimits`] and against the bytes left before it is used; a
//! payload must be consumed exactly (trailing bytes are an error).
//!
//! Client to server:
//!
//! | kind | header `conversation_id` | off | size | field |
//! |---|---|---:|---:|---|
//! | `Hello` (16) | 0 | 0 | 2+n | `token` str16: bearer token of an agent, visitor or integration |
//! | `Send` (17) | conversation | 0 | 2+n | `client_msg_id` str16, 0 = none (idempotency key) |
//! | | | 2+n | 4+m | `text` str32 |
//! | `Subscribe` (18) | conversation | 0 | 8 | `after_seq` u64: deliver seq `after_seq + 1` on |
//! | `Typing` (19) | conversation | | 0 | (empty) |
//! | `Read` (20) | conversation | 0 | 8 | `seq` u64: read up to here |
//! | `StreamOpen` (21) | 0 | 0 | 8 | `from_offset` u64: first log offset to send |
//! | | | 8 | 2 | `shard` u16 |
//! | | | 10 | 2 | `flags` u16: bit 0 = follow the tail; other bits 0 |
//! | `Ping` (22) | 0 | 0 | 8 | `nonce` u64, echoed by `Pong` |
//!
//! Server to client:
//!
//! | kind | header | off | size | field |
//! |---|---|---:|---:|---|
//! | `Welcome` (32) | all 0 | 0 | 8 | `session_id` u64 |
//! | | | 8 | 4 | `payload_len_max` u32: largest payload the server accepts |
//! | | | 12 | 4 | `idle_timeout_ms` u32: silence after which the server closes; ping sooner |
//! | | | 16 | 1 | `principal` u8: 1 visitor, 2 agent, 3 integration |
//! | | | 17 | 1 | reserved, 0 |
//! | | | 18 | 2 | `shards` u16: shard count, for `StreamOpen` |
//! | | | 20 | 2+n | `tenant` str16 |
//! | | | .. | 2+m | `principal_id` str16: agent name, visitor id or integration name |
//! | `Ack` (33) | `conversation_id`, `seq`, `log_offset`, `timestamp_us` of the stored message | 0 | 1 | `flags` u8: bit 0 = duplicate (a retry; nothing new stored); other bits 0 |
//! | | | 1 | 2+n | `client_msg_id` str16, 0 = none |
//! | `Error` (34) | `conversation_id` concerned, or 0 | 0 | 2 | `code` u16, HTTP-like: 400, 401, 403, 404, 409, 413, 429, 503 |
//! | | | 2 | 2+n | `client_msg_id` str16 of the refused send, 0 = none |
//! | | | .. | 2+m | `reason` str16, human-readable |
//! | `Pong` (35) | all 0 | 0 | 8 | `nonce` u64 from the `Ping` |
//! | `Message` (1), `Event` (2), `Control` (3) | as stored | | | stored record, passed through as [`ServerMsg::Record`] |
//!
//! Decoding is borrowed and allocation-free: [`decode_client`] / [`decode_server`] take the
//! receive buffer and answer a message plus the bytes it used, [`Error::Incomplete`] when more
//! bytes are needed, or a specific invalid reason (after which the connection should answer an
//! `Error` frame and close: the stream cannot be resynchronized).

use crate::frame::{self, DecodeError, FrameRef, HEADER_LEN, Header, Kind};
use crate::model::{ConversationId, ModelError, ModelLimits};

/// Bounds on decoded frames, chosen from config at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinLimits {
    /// Largest frame payload accepted; checked from the header before the payload is buffered.
    pub payload_len_max: u32,
    pub token_bytes_max: usize,
    pub text_bytes_max: usize,
    pub client_msg_id_bytes_max: usize,
    /// `tenant` and `principal_id` of a `Welcome`.
    pub id_bytes_max: usize,
    /// `reason` of an `Error`.
    pub reason_bytes_max: usize,
}

impl BinLimits {
    /// The string limits of the JSON model, so both protocols accept the same messages.
    pub fn from_model(m: &ModelLimits, payload_len_max: u32) -> BinLimits {
        BinLimits {
            payload_len_max,
            token_bytes_max: m.token_bytes_max,
            text_bytes_max: m.text_bytes_max,
            client_msg_id_bytes_max: m.client_msg_id_bytes_max,
            id_bytes_max: m.id_bytes_max,
            reason_bytes_max: m.reason_bytes_max,
        }
    }
}

impl BinLimits {
    /// Bytes of a `Send` payload around its text: two length prefixes.
    pub const SEND_OVERHEAD_BYTES: usize = 2 + 4;

    /// Check limits read from config at startup: the strings fit their length prefixes, and a
    /// `Send` with the longest text and `client_msg_id` fits `payload_len_max`, so every message
    /// the JSON model accepts is also accepted here.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("token_bytes_max", self.token_bytes_max),
            ("client_msg_id_bytes_max", self.client_msg_id_bytes_max),
            ("id_bytes_max", self.id_bytes_max),
            ("reason_bytes_max", self.reason_bytes_max),
        ] {
            if value == 0 || value > usize::from(u16::MAX) {
                return Err(format!("{name} = {value} must be in 1..={}", u16::MAX));
            }
        }
        let send_max =
            self.text_bytes_max + self.client_msg_id_bytes_max + Self::SEND_OVERHEAD_BYTES;
        if (self.payload_len_max as usize) < send_max {
            return Err(format!(
                "payload_len_max = {} is below the largest send ({send_max} bytes: text_bytes_max + client_msg_id_bytes_max + {})",
                self.payload_len_max,
                Self::SEND_OVERHEAD_BYTES
            ));
        }
        Ok(())
    }
}

impl Default for BinLimits {
    fn default() -> Self {
        // Room for the largest text plus its length prefixes and a client_msg_id.
        BinLimits::from_model(&ModelLimits::DEFAULT, 128 * 1024)
    }
}

/// Who a session speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Principal {
    Visitor = 1,
    Agent = 2,
    Integration = 3,
}

impl TryFrom<u8> for Principal {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            1 => Ok(Principal::Visitor),
            2 => Ok(Principal::Agent),
            3 => Ok(Principal::Integration),
            other => Err(other),
        }
    }
}

/// A client-to-server message, borrowing the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMsg<'a> {
    Hello {
        token: &'a str,
    },
    Send {
        conversation_id: ConversationId,
        client_msg_id: Option<&'a str>,
        text: &'a str,
    },
    Subscribe {
        conversation_id: ConversationId,
        after_seq: u64,
    },
    Typing {
        conversation_id: ConversationId,
    },
    Read {
        conversation_id: ConversationId,
        seq: u64,
    },
    StreamOpen {
        shard: u16,
        from_offset: u64,
        follow: bool,
    },
    Ping {
        nonce: u64,
    },
}

/// The session facts a `Welcome` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome<'a> {
    pub session_id: u64,
    pub payload_len_max: u32,
    pub idle_timeout_ms: u32,
    pub principal: Principal,
    pub shards: u16,
    pub tenant: &'a str,
    pub principal_id: &'a str,
}

/// A server-to-client message, borrowing the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMsg<'a> {
    Welcome(Welcome<'a>),
    Ack {
        conversation_id: ConversationId,
        seq: u64,
        log_offset: u64,
        timestamp_us: u64,
        /// A retry with a known `client_msg_id`: `seq` is the original one.
        duplicate: bool,
        client_msg_id: Option<&'a str>,
    },
    Error {
        /// `ConversationId(0)` when the error concerns no conversation.
        conversation_id: ConversationId,
        code: u16,
        client_msg_id: Option<&'a str>,
        reason: &'a str,
    },
    Pong {
        nonce: u64,
    },
    /// A stored record (`Message`, `Event`, `Control`) exactly as the log holds it.
    Record(FrameRef<'a>),
}

/// Why bytes are not a protocol message. Only [`Error::Incomplete`] means "wait for more".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("incomplete frame: need at least {needed} more bytes")]
    Incomplete { needed: usize },
    /// The frame itself is invalid (magic, version, kind, flags, size, CRC).
    #[error("invalid frame: {0}")]
    Frame(DecodeError),
    #[error("a {kind:?} frame is not expected from the {from}")]
    UnexpectedKind { kind: Kind, from: &'static str },
    #[error("{kind:?} frame: payloads of control frames must not be compressed")]
    Compressed { kind: Kind },
    #[error("{kind:?} frame: header field `{field}` must be 0, got {value}")]
    HeaderField {
        kind: Kind,
        field: &'static str,
        value: u64,
    },
    #[error("{kind:?} frame: payload ends inside field `{field}`")]
    Truncated { kind: Kind, field: &'static str },
    #[error("{kind:?} frame: {extra} bytes after the last field")]
    Trailing { kind: Kind, extra: usize },
    #[error("{kind:?} frame: field `{field}` is not UTF-8")]
    NotUtf8 { kind: Kind, field: &'static str },
    #[error("{kind:?} frame: field `{field}` has unknown value {value}")]
    BadValue {
        kind: Kind,
        field: &'static str,
        value: u64,
    },
    /// A string field breaks a limit or a character rule (same messages as the JSON model).
    #[error("{kind:?} frame: {source}")]
    Field { kind: Kind, source: ModelError },
}

impl Error {
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Error::Incomplete { .. })
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Incomplete { needed } => Error::Incomplete { needed },
            other => Error::Frame(other),
        }
    }
}

/// A string too long for its length prefix: a caller bug, refused instead of truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {len} bytes does not fit its length prefix (max {max})")]
pub struct EncodeError {
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

// ---- encoding ------------------------------------------------------------------------------

/// Appends the payload after a header placeholder, then writes the real header in place, so
/// the payload is built once directly in `out`. On error `out` is left as it was.
fn encode_frame(
    out: &mut Vec<u8>,
    header: Header,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    if let Err(e) = write_payload(out) {
        out.truncate(start);
        return Err(e);
    }
    let payload_len = out.len() - start - HEADER_LEN;
    if payload_len > u32::MAX as usize {
        out.truncate(start);
        return Err(EncodeError {
            field: "payload",
            len: payload_len,
            max: u32::MAX as usize,
        });
    }
    let (head, payload) = out[start..].split_at_mut(HEADER_LEN);
    let head: &mut [u8; HEADER_LEN] = head
        .try_into()
        .expect("split_at_mut(HEADER_LEN) yields HEADER_LEN bytes");
    frame::encode_header(&header, payload, head);
    Ok(())
}

fn put_str16(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError {
        field,
        len: s.len(),
        max: u16::MAX as usize,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_str32(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), EncodeError> {
    let len = u32::try_from(s.len()).map_err(|_| EncodeError {
        field,
        len: s.len(),
        max: u32::MAX as usize,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn header(kind: Kind, conversation_id: ConversationId) -> Header {
    Header::new(kind, conversation_id.0, 0, 0)
}

/// Append the frame of a client message to `out`. `timestamp_us` is the client's clock (0 if
/// it has none); the server does not rely on it.
pub fn encode_client(
    msg: &ClientMsg<'_>,
    timestamp_us: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let none = ConversationId(0);
    let mut h = match *msg {
        ClientMsg::Hello { .. } => header(Kind::Hello, none),
        ClientMsg::Send {
            conversation_id, ..
        } => header(Kind::Send, conversation_id),
        ClientMsg::Subscribe {
            conversation_id, ..
        } => header(Kind::Subscribe, conversation_id),
        ClientMsg::Typing { conversation_id } => header(Kind::Typing, conversation_id),
        ClientMsg::Read {
            conversation_id, ..
        } => header(Kind::Read, conversation_id),
        ClientMsg::StreamOpen { .. } => header(Kind::StreamOpen, none),
        ClientMsg::Ping { .. } => header(Kind::Ping, none),
    };
    h.timestamp_us = timestamp_us;
    encode_frame(out, h, |out| {
        match *msg {
            ClientMsg::Hello { token } => put_str16(out, "token", token)?,
            ClientMsg::Send {
                client_msg_id,
                text,
                ..
            } => {
                put_str16(out, "client_msg_id", client_msg_id.unwrap_or(""))?;
                put_str32(out, "text", text)?;
            }
            ClientMsg::Subscribe { after_seq, .. } => {
                out.extend_from_slice(&after_seq.to_le_bytes())
            }
            ClientMsg::Typing { .. } => {}
            ClientMsg::Read { seq, .. } => out.extend_from_slice(&seq.to_le_bytes()),
            ClientMsg::StreamOpen {
                shard,
                from_offset,
                follow,
            } => {
                out.extend_from_slice(&from_offset.to_le_bytes());
                out.extend_from_slice(&shard.to_le_bytes());
                out.extend_from_slice(&u16::from(follow).to_le_bytes());
            }
            ClientMsg::Ping { nonce } => out.extend_from_slice(&nonce.to_le_bytes()),
        }
        Ok(())
    })
}

/// Append the frame of a server message to `out`. A [`ServerMsg::Record`] is copied as is.
pub fn encode_server(msg: &ServerMsg<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match *msg {
        ServerMsg::Welcome(w) => {
            encode_frame(out, header(Kind::Welcome, ConversationId(0)), |out| {
                out.extend_from_slice(&w.session_id.to_le_bytes());
                out.extend_from_slice(&w.payload_len_max.to_le_bytes());
                out.extend_from_slice(&w.idle_timeout_ms.to_le_bytes());
                out.push(w.principal as u8);
                out.push(0);
                out.extend_from_slice(&w.shards.to_le_bytes());
                put_str16(out, "tenant", w.tenant)?;
                put_str16(out, "principal_id", w.principal_id)
            })
        }
        ServerMsg::Ack {
            conversation_id,
            seq,
            log_offset,
            timestamp_us,
            duplicate,
            client_msg_id,
        } => {
            let mut h = Header::new(Kind::Ack, conversation_id.0, seq, timestamp_us);
            h.log_offset = log_offset;
            encode_frame(out, h, |out| {
                out.push(u8::from(duplicate));
                put_str16(out, "client_msg_id", client_msg_id.unwrap_or(""))
            })
        }
        ServerMsg::Error {
            conversation_id,
            code,
            client_msg_id,
            reason,
        } => encode_frame(out, header(Kind::Error, conversation_id), |out| {
            out.extend_from_slice(&code.to_le_bytes());
            put_str16(out, "client_msg_id", client_msg_id.unwrap_or(""))?;
            put_str16(out, "reason", reason)
        }),
        ServerMsg::Pong { nonce } => {
            encode_frame(out, header(Kind::Pong, ConversationId(0)), |out| {
                out.extend_from_slice(&nonce.to_le_bytes());
                Ok(())
            })
        }
        ServerMsg::Record(f) => {
            out.extend_from_slice(f.bytes);
            Ok(())
        }
    }
}

// ---- decoding ------------------------------------------------------------------------------

/// A cursor over one payload that names the field it fails in.
struct Reader<'a> {
    kind: Kind,
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(kind: Kind, buf: &'a [u8]) -> Self {
        Reader { kind, buf, at: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Error> {
        let rest = &self.buf[self.at..];
        if rest.len() < n {
            return Err(Error::Truncated {
                kind: self.kind,
                field,
            });
        }
        self.at += n;
        Ok(&rest[..n])
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, Error> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, Error> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, Error> {
        let b = self.take(8, field)?;
        let mut v = [0u8; 8];
        v.copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    /// A string with a length prefix of `len` already read; the limit is checked before the
    /// bytes are looked at.
    fn str_body(&mut self, len: usize, field: &'static str, max: usize) -> Result<&'a str, Error> {
        if len > max {
            return Err(Error::Field {
                kind: self.kind,
                source: ModelError::TooLong { field, len, max },
            });
        }
        let b = self.take(len, field)?;
        std::str::from_utf8(b).map_err(|_| Error::NotUtf8 {
            kind: self.kind,
            field,
        })
    }

    fn str16(&mut self, field: &'static str, max: usize) -> Result<&'a str, Error> {
        let len = usize::from(self.u16(field)?);
        self.str_body(len, field, max)
    }

    fn str32(&mut self, field: &'static str, max: usize) -> Result<&'a str, Error> {
        let len = self.u32(field)? as usize;
        self.str_body(len, field, max)
    }

    fn finish(&self) -> Result<(), Error> {
        let extra = self.buf.len() - self.at;
        if extra != 0 {
            return Err(Error::Trailing {
                kind: self.kind,
                extra,
            });
        }
        Ok(())
    }

    fn check(&self, r: Result<(), ModelError>) -> Result<(), Error> {
        r.map_err(|source| Error::Field {
            kind: self.kind,
            source,
        })
    }
}

fn require_zero(kind: Kind, field: &'static str, value: u64) -> Result<(), Error> {
    if value != 0 {
        return Err(Error::HeaderField { kind, field, value });
    }
    Ok(())
}

fn opt(s: &str) -> Option<&str> {
    if s.is_empty() { None } else { Some(s) }
}

/// Decode one client message from the start of `buf`; answers it and the bytes it used.
pub fn decode_client<'a>(
    buf: &'a [u8],
    limits: &BinLimits,
) -> Result<(ClientMsg<'a>, usize), Error> {
    let (f, used) = frame::decode(buf, limits.payload_len_max)?;
    Ok((parse_client(&f, limits)?, used))
}

/// Interpret an already decoded frame as a client message.
pub fn parse_client<'a>(f: &FrameRef<'a>, limits: &BinLimits) -> Result<ClientMsg<'a>, Error> {
    use crate::model::checks as chk;
    let h = &f.header;
    let kind = h.kind;
    if !matches!(
        kind,
        Kind::Hello
            | Kind::Send
            | Kind::Subscribe
            | Kind::Typing
            | Kind::Read
            | Kind::StreamOpen
            | Kind::Ping
    ) {
        return Err(Error::UnexpectedKind {
            kind,
            from: "client",
        });
    }
    if h.flags != 0 {
        return Err(Error::Compressed { kind });
    }
    require_zero(kind, "seq", h.seq)?;
    require_zero(kind, "log_offset", h.log_offset)?;
    if matches!(kind, Kind::Hello | Kind::StreamOpen | Kind::Ping) {
        require_zero(kind, "conversation_id", h.conversation_id)?;
    }
    let conversation_id = ConversationId(h.conversation_id);
    let mut r = Reader::new(kind, f.payload);
    let msg = match kind {
        Kind::Hello => {
            let token = r.str16("token", limits.token_bytes_max)?;
            r.check(chk::client_msg_id("token", token, limits.token_bytes_max))?;
            ClientMsg::Hello { token }
        }
        Kind::Send => {
            let id = r.str16("client_msg_id", limits.client_msg_id_bytes_max)?;
            let text = r.str32("text", limits.text_bytes_max)?;
            let client_msg_id = opt(id);
            if let Some(id) = client_msg_id {
                r.check(chk::client_msg_id(
                    "client_msg_id",
                    id,
                    limits.client_msg_id_bytes_max,
                ))?;
            }
            r.check(chk::text("text", text, limits.text_bytes_max))?;
            ClientMsg::Send {
                conversation_id,
                client_msg_id,
                text,
            }
        }
        Kind::Subscribe => ClientMsg::Subscribe {
            conversation_id,
            after_seq: r.u64("after_seq")?,
        },
        Kind::Typing => ClientMsg::Typing { conversation_id },
        Kind::Read => ClientMsg::Read {
            conversation_id,
            seq: r.u64("seq")?,
        },
        Kind::StreamOpen => {
            let from_offset = r.u64("from_offset")?;
            let shard = r.u16("shard")?;
            let flags = r.u16("flags")?;
            if flags & !1 != 0 {
                return Err(Error::BadValue {
                    kind,
                    field: "flags",
                    value: u64::from(flags),
                });
            }
            ClientMsg::StreamOpen {
                shard,
                from_offset,
                follow: flags & 1 != 0,
            }
        }
        Kind::Ping => ClientMsg::Ping {
            nonce: r.u64("nonce")?,
        },
        _ => {
            return Err(Error::UnexpectedKind {
                kind,
                from: "client",
            });
        }
    };
    r.finish()?;
    Ok(msg)
}

/// Decode one server message from the start of `buf`; answers it and the bytes it used.
pub fn decode_server<'a>(
    buf: &'a [u8],
    limits: &BinLimits,
) -> Result<(ServerMsg<'a>, usize), Error> {
    let (f, used) = frame::decode(buf, limits.payload_len_max)?;
    Ok((parse_server(&f, limits)?, used))
}

/// Interpret an already decoded frame as a server message.
pub fn parse_server<'a>(f: &FrameRef<'a>, limits: &BinLimits) -> Result<ServerMsg<'a>, Error> {
    use crate::model::checks as chk;
    let h = &f.header;
    let kind = h.kind;
    if kind.is_record() {
        // Stored records may be compressed; their payload is the storage's business.
        return Ok(ServerMsg::Record(*f));
    }
    if !matches!(kind, Kind::Welcome | Kind::Ack | Kind::Error | Kind::Pong) {
        return Err(Error::UnexpectedKind {
            kind,
            from: "server",
        });
    }
    if h.flags != 0 {
        return Err(Error::Compressed { kind });
    }
    if matches!(kind, Kind::Welcome | Kind::Pong) {
        require_zero(kind, "conversation_id", h.conversation_id)?;
    }
    if kind != Kind::Ack {
        require_zero(kind, "seq", h.seq)?;
        require_zero(kind, "log_offset", h.log_offset)?;
    }
    let mut r = Reader::new(kind, f.payload);
    let msg = match kind {
        Kind::Welcome => {
            let session_id = r.u64("session_id")?;
            let payload_len_max = r.u32("payload_len_max")?;
            let idle_timeout_ms = r.u32("idle_timeout_ms")?;
            let p = r.u8("principal")?;
            let principal = Principal::try_from(p).map_err(|v| Error::BadValue {
                kind,
                field: "principal",
                value: u64::from(v),
            })?;
            let reserved = r.u8("reserved")?;
            if reserved != 0 {
                return Err(Error::BadValue {
                    kind,
                    field: "reserved",
                    value: u64::from(reserved),
                });
            }
            let shards = r.u16("shards")?;
            let tenant = r.str16("tenant", limits.id_bytes_max)?;
            r.check(chk::name("tenant", tenant, limits.id_bytes_max))?;
            let principal_id = r.str16("principal_id", limits.id_bytes_max)?;
            r.check(chk::name("principal_id", principal_id, limits.id_bytes_max))?;
            ServerMsg::Welcome(Welcome {
                session_id,
                payload_len_max,
                idle_timeout_ms,
                principal,
                shards,
                tenant,
                principal_id,
            })
        }
        Kind::Ack => {
            let flags = r.u8("flags")?;
            if flags & !1 != 0 {
                return Err(Error::BadValue {
                    kind,
                    field: "flags",
                    value: u64::from(flags),
                });
            }
            let id = r.str16("client_msg_id", limits.client_msg_id_bytes_max)?;
            let client_msg_id = opt(id);
            if let Some(id) = client_msg_id {
                r.check(chk::client_msg_id(
                    "client_msg_id",
                    id,
                    limits.client_msg_id_bytes_max,
                ))?;
            }
            ServerMsg::Ack {
                conversation_id: ConversationId(h.conversation_id),
                seq: h.seq,
                log_offset: h.log_offset,
                timestamp_us: h.timestamp_us,
                duplicate: flags & 1 != 0,
                client_msg_id,
            }
        }
        Kind::Error => {
            let code = r.u16("code")?;
            let id = r.str16("client_msg_id", limits.client_msg_id_bytes_max)?;
            let reason = r.str16("reason", limits.reason_bytes_max)?;
            ServerMsg::Error {
                conversation_id: ConversationId(h.conversation_id),
                code,
                client_msg_id: opt(id),
                reason,
            }
        }
        Kind::Pong => ServerMsg::Pong {
            nonce: r.u64("nonce")?,
        },
        _ => {
            return Err(Error::UnexpectedKind {
                kind,
                from: "server",
            });
        }
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests;
