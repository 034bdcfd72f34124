//! HTTP request and response bodies of `/v1/...`.
//!
//! Request bodies (what clients send) reject unknown fields. Response bodies tolerate unknown
//! fields when a client parses them, so a client built against this version keeps working when
//! the server adds a field (the documented way the API grows).

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::error::{
    ModelError, ModelLimits, Validate, WriteJson, check_client_msg_id, check_len, check_name,
    check_text, check_token_word, object,
};
use super::ws::{EventMessage, Message, RawServer, ServerMessage};
use super::{ConversationId, ConversationState};

/// The visitor who opens a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Visitor {
    pub name: String,
}

/// `POST /v1/conversations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConversationRequest {
    #[serde(deserialize_with = "object")]
    pub visitor: Visitor,
    /// Where the visitor writes from: `web`, `app`, `api`, ... (lowercase word).
    pub channel: String,
    /// An optional first message, stored like any later send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Extension: ask for a skill group instead of letting the gateway choose from the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Validate for CreateConversationRequest {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_name("visitor.name", &self.visitor.name, limits.name_bytes_max)?;
        check_token_word("channel", &self.channel, limits.channel_bytes_max)?;
        if let Some(t) = &self.text {
            check_text("text", t, limits.text_bytes_max)?;
        }
        if let Some(g) = &self.group {
            check_name("group", g, limits.id_bytes_max)?;
        }
        Ok(())
    }
}

/// 201 answer to `POST /v1/conversations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateConversationResponse {
    pub conversation_id: ConversationId,
    /// Grants this conversation and nothing else.
    pub visitor_token: String,
    pub state: ConversationState,
    pub group: String,
    /// 1-based; `null` once assigned.
    pub queue_position: Option<u32>,
}

impl Validate for CreateConversationResponse {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_name("visitor_token", &self.visitor_token, limits.token_bytes_max)?;
        check_name("group", &self.group, limits.id_bytes_max)
    }
}

/// `GET /v1/conversations/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationView {
    pub conversation_id: ConversationId,
    pub state: ConversationState,
    pub channel: String,
    pub group: String,
    /// The assigned agent; `null` when none.
    pub agent: Option<String>,
    /// 1-based; `null` unless queued.
    pub queue_position: Option<u32>,
    /// The highest seq in the conversation (0 if empty).
    pub last_seq: u64,
}

impl Validate for ConversationView {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_token_word("channel", &self.channel, limits.channel_bytes_max)?;
        check_name("group", &self.group, limits.id_bytes_max)?;
        if let Some(a) = &self.agent {
            check_name("agent", a, limits.id_bytes_max)?;
        }
        Ok(())
    }
}

/// `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequest {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

impl Validate for SendMessageRequest {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        validate_send(&self.text, self.client_msg_id.as_deref(), limits)
    }
}

/// The checks of a send, owned or borrowed, over HTTP or WebSocket.
pub(crate) fn validate_send(
    text: &str,
    client_msg_id: Option<&str>,
    limits: &ModelLimits,
) -> Result<(), ModelError> {
    check_text("text", text, limits.text_bytes_max)?;
    if let Some(id) = client_msg_id {
        check_client_msg_id("client_msg_id", id, limits.client_msg_id_bytes_max)?;
    }
    Ok(())
}

/// [`SendMessageRequest`] borrowed from the request body (see
/// [`crate::model::parse_json_borrowed`]): the send path's parse, without allocating.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequestRef<'a> {
    #[serde(borrow)]
    pub text: std::borrow::Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "super::error::borrowed_str_opt")]
    pub client_msg_id: Option<std::borrow::Cow<'a, str>>,
}

impl Validate for SendMessageRequestRef<'_> {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        validate_send(&self.text, self.client_msg_id.as_deref(), limits)
    }
}

/// 201 (or 200 on an idempotent retry) answer to a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessageResponse {
    pub seq: u64,
    /// Unix microseconds of the stored message (the original one on a retry).
    pub ts: u64,
}

impl Validate for SendMessageResponse {
    fn validate(&self, _: &ModelLimits) -> Result<(), ModelError> {
        Ok(())
    }
}

/// One entry of a [`MessagesPage`]: a message or a stored event, in the WebSocket form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Message(Message),
    Event(EventMessage),
}

impl Entry {
    pub fn seq(&self) -> u64 {
        match self {
            Entry::Message(m) => m.seq,
            Entry::Event(e) => e.seq,
        }
    }
}

impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Entry::Message(m) => m.serialize(s),
            Entry::Event(e) => e.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawServer::deserialize(d)?;
        match ServerMessage::try_from(raw).map_err(serde::de::Error::custom)? {
            ServerMessage::Message(m) => Ok(Entry::Message(m)),
            ServerMessage::Event(e) => Ok(Entry::Event(e)),
            ServerMessage::Ack(_) | ServerMessage::Error(_) => Err(serde::de::Error::custom(
                "a page entry must be a `message` or an `event`",
            )),
        }
    }
}

/// `GET /v1/conversations/{id}/messages` and `/poll`: entries oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesPage {
    pub messages: Vec<Entry>,
    /// The highest seq in the conversation when the page was cut (not only of this page), so a
    /// client knows whether to ask again.
    pub last_seq: u64,
}

impl Validate for MessagesPage {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        if self.messages.len() > limits.page_entries_max {
            return Err(ModelError::TooMany {
                field: "messages",
                len: self.messages.len(),
                max: limits.page_entries_max,
            });
        }
        for e in &self.messages {
            match e {
                Entry::Message(m) => m.validate(limits)?,
                Entry::Event(ev) => ev.validate(limits)?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Online,
    Offline,
}

/// `POST /v1/agents/me/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStatusRequest {
    pub status: AgentStatus,
}

impl Validate for AgentStatusRequest {
    fn validate(&self, _: &ModelLimits) -> Result<(), ModelError> {
        Ok(())
    }
}

/// `POST /v1/conversations/{id}/transfer`: `{"to_agent": "..."}` or `{"to_group": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawTransfer")]
pub enum TransferRequest {
    ToAgent(String),
    ToGroup(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransfer {
    to_agent: Option<String>,
    to_group: Option<String>,
}

impl TryFrom<RawTransfer> for TransferRequest {
    type Error = &'static str;
    fn try_from(r: RawTransfer) -> Result<Self, &'static str> {
        match (r.to_agent, r.to_group) {
            (Some(a), None) => Ok(TransferRequest::ToAgent(a)),
            (None, Some(g)) => Ok(TransferRequest::ToGroup(g)),
            (Some(_), Some(_)) => Err("give exactly one of `to_agent` and `to_group`, not both"),
            (None, None) => Err("give exactly one of `to_agent` and `to_group`"),
        }
    }
}

impl Serialize for TransferRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        match self {
            TransferRequest::ToAgent(a) => m.serialize_entry("to_agent", a)?,
            TransferRequest::ToGroup(g) => m.serialize_entry("to_group", g)?,
        }
        m.end()
    }
}

impl Validate for TransferRequest {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        match self {
            TransferRequest::ToAgent(a) => check_name("to_agent", a, limits.id_bytes_max),
            TransferRequest::ToGroup(g) => check_name("to_group", g, limits.id_bytes_max),
        }
    }
}

/// 201 answer to an attachment upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentResponse {
    pub attachment_id: String,
    /// Bytes stored.
    pub size: u64,
}

impl Validate for AttachmentResponse {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_name("attachment_id", &self.attachment_id, limits.id_bytes_max)
    }
}

/// Every HTTP error answer: `{"error": "..."}`, plus the current `state` on a 409.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ConversationState>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            state: None,
        }
    }
}

impl Validate for ErrorBody {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_len("error", &self.error, limits.reason_bytes_max)
    }
}

impl WriteJson for Visitor {}
impl WriteJson for CreateConversationRequest {}
impl WriteJson for CreateConversationResponse {}
impl WriteJson for ConversationView {}
impl WriteJson for SendMessageRequest {}
impl WriteJson for SendMessageResponse {}
impl WriteJson for Entry {}
impl WriteJson for MessagesPage {}
impl WriteJson for AgentStatusRequest {}
impl WriteJson for TransferRequest {}
impl WriteJson for AttachmentResponse {}
impl WriteJson for ErrorBody {}
