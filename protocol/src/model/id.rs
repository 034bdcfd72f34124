//! `ConversationId`: a `u64` whose top 16 bits name the shard, written `"c"` + 16 lowercase hex.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A conversation id. The shard that owns the conversation is `id >> 48`, so any thread can
/// route a request by id alone; the low 48 bits are the shard-local number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(pub u64);

/// Why a string is not a conversation id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("conversation id must be 17 bytes (\"c\" and 16 hex digits), got {len}")]
    Length { len: usize },
    #[error("conversation id must start with \"c\"")]
    Prefix,
    #[error(
        "conversation id byte {index} is not a lowercase hex digit (ids are \"c\" and 16 of [0-9a-f])"
    )]
    Digit { index: usize },
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl ConversationId {
    /// Length of the string form.
    pub const STR_LEN: usize = 17;
    /// Largest shard-local number: the low 48 bits.
    pub const LOCAL_MAX: u64 = (1 << 48) - 1;

    /// The id of shard-local conversation `local` on `shard`; `None` if `local` needs more than
    /// 48 bits.
    pub fn from_parts(shard: u16, local: u64) -> Option<Self> {
        if local > Self::LOCAL_MAX {
            return None;
        }
        Some(ConversationId((u64::from(shard) << 48) | local))
    }

    pub fn shard(self) -> u16 {
        (self.0 >> 48) as u16
    }

    pub fn local(self) -> u64 {
        self.0 & Self::LOCAL_MAX
    }

    /// The string form on the stack, without allocating.
    pub fn to_bytes(self) -> [u8; Self::STR_LEN] {
        let mut out = [0u8; Self::STR_LEN];
        out[0] = b'c';
        for (i, slot) in out[1..].iter_mut().enumerate() {
            let nibble = (self.0 >> (60 - 4 * i)) & 0xf;
            *slot = HEX[nibble as usize];
        }
        out
    }

    /// Parse the canonical string form only (lowercase), so two ids are equal exactly when their
    /// strings are.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Self::parse_bytes(s.as_bytes())
    }

    pub fn parse_bytes(b: &[u8]) -> Result<Self, IdError> {
        if b.len() != Self::STR_LEN {
            return Err(IdError::Length { len: b.len() });
        }
        if b[0] != b'c' {
            return Err(IdError::Prefix);
        }
        let mut v: u64 = 0;
        for (i, &c) in b[1..].iter().enumerate() {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return Err(IdError::Digit { index: i + 1 }),
            };
            v = (v << 4) | u64::from(d);
        }
        Ok(ConversationId(v))
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.to_bytes();
        // The bytes are ASCII by construction.
        f.write_str(std::str::from_utf8(&b).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for ConversationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl Serialize for ConversationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.to_bytes();
        match std::str::from_utf8(&b) {
            Ok(text) => s.serialize_str(text),
            Err(_) => Err(serde::ser::Error::custom("conversation id is not ASCII")),
        }
    }
}

struct IdVisitor;

impl Visitor<'_> for IdVisitor {
    type Value = ConversationId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a conversation id string (\"c\" and 16 lowercase hex digits)")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ConversationId, E> {
        ConversationId::parse(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ConversationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(IdVisitor)
    }
}
