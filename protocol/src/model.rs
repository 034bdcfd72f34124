//! The conversation model of the public API (`shared/API.md`) as strict serde types: ids, states,
//! participants, HTTP bodies, WebSocket messages, events, and the JSON records stored in frames.
//!
//! Inbound types (everything a client or a stored frame hands us) reject unknown fields, wrong
//! types and oversized values with a precise [`ModelError`]: parse them with [`parse_json`], which
//! also runs [`Validate`] against the [`ModelLimits`] chosen at startup. Outbound types are written
//! into a caller-owned `Vec<u8>` with [`WriteJson::write_json`], so a hot path can reuse one buffer.
//!
//! Conventions that hold for every type here:
//! - a conversation id is `"c"` + 16 lowercase hex digits of its `u64` ([`ConversationId`]);
//! - `seq` is the dense per-conversation position (1, 2, 3, ...); `ts` is unix **microseconds**,
//!   the same clock as the frame header's `timestamp_us`;
//! - messages and the stored events (`queued`, `assigned`, `transferred`, `resolved`,
//!   `reopened`, `closed`) each take one `seq`. `typing` and `read` are ephemeral: never stored,
//!   never replayed, they take no `seq` (a `read` event's `seq` is the position read up to);
//! - a message, an event and a transfer name who acted with `from: {"role", "id"}`.
//!
//! Why the tagged enums are hand-converted from flat "raw" structs instead of serde's internally
//! tagged derive: the derive buffers the whole object into an intermediate tree first (slow, and it
//! loses `deny_unknown_fields`), while a flat struct parses in one pass and lets the conversion
//! name exactly which field a given `type` lacks or must not carry.

mod error;
mod event;
mod http;
mod id;
mod record;
#[cfg(test)]
mod tests;
mod ws;

pub use error::{ModelError, ModelLimits, Validate, WriteJson, parse_json, parse_json_borrowed};
pub use event::{Event, EventKind, IllegalTransition, TransferTarget, apply_event};
pub use http::{
    AgentStatus, AgentStatusRequest, AttachmentResponse, ConversationView,
    CreateConversationRequest, CreateConversationResponse, Entry, ErrorBody, MessagesPage,
    SendMessageRequest, SendMessageRequestRef, SendMessageResponse, TransferRequest, Visitor,
};
pub use id::{ConversationId, IdError};
pub use record::{EventRecord, MessageRecord, MessageRecordRef, Opened};
pub use ws::{
    Ack, ClientMessage, ClientMessageRef, EventMessage, Message, ServerMessage, WsError,
    write_ack_json,
};

use serde::{Deserialize, Serialize};

/// The field checks behind [`Validate`], for the other codecs that carry the same fields (the
/// binary protocol), so both protocols accept exactly the same strings.
pub(crate) mod checks {
    pub(crate) use super::error::{
        check_client_msg_id as client_msg_id, check_name as name, check_text as text,
    };
}

/// Where a conversation stands. `reopened` is an event, not a state: it moves `resolved` back to
/// `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationState {
    Queued,
    Assigned,
    Resolved,
    Closed,
}

impl ConversationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationState::Queued => "queued",
            ConversationState::Assigned => "assigned",
            ConversationState::Resolved => "resolved",
            ConversationState::Closed => "closed",
        }
    }
}

/// Who a participant is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Visitor,
    Agent,
    /// The gateway itself (routing, idle close).
    System,
}

/// One side of a conversation: `{"role": "agent", "id": "alice"}`. For an agent the id is its
/// configured name; for a visitor, the id the gateway gave it; for the system, `"kefu"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    pub role: Role,
    pub id: String,
}

impl Participant {
    pub fn new(role: Role, id: impl Into<String>) -> Self {
        Participant {
            role,
            id: id.into(),
        }
    }
}

/// A [`Participant`] borrowed from wherever its id lives, for writing one without copying the
/// id first (the send path writes one per message). Serializes exactly like [`Participant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParticipantRef<'a> {
    pub role: Role,
    pub id: &'a str,
}

impl Participant {
    pub fn as_borrowed(&self) -> ParticipantRef<'_> {
        ParticipantRef {
            role: self.role,
            id: &self.id,
        }
    }
}

impl Validate for Participant {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        error::check_name("from.id", &self.id, limits.id_bytes_max)
    }
}
