//! WebSocket messages: one JSON object per text frame, tagged by `"type"`.

use std::borrow::Cow;

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::error::{
    ModelError, ModelLimits, Validate, WriteJson, borrowed_str_opt, check_client_msg_id, check_len,
    check_text, object_opt,
};
use super::event::{Event, EventFields, EventKind};
use super::http::validate_send;
use super::{ConversationId, Participant};

// ---- client -> server ----------------------------------------------------------------------

/// What a client sends on `/v1/ws`. Parsed through [`ClientMessageRef`], so both accept and
/// refuse exactly the same messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Receive the conversation's messages and events after `after` (default 0: everything).
    Subscribe {
        conversation_id: ConversationId,
        after: u64,
    },
    Send {
        conversation_id: ConversationId,
        text: String,
        client_msg_id: Option<String>,
    },
    Typing {
        conversation_id: ConversationId,
    },
    Read {
        conversation_id: ConversationId,
        seq: u64,
    },
}

/// [`ClientMessage`] borrowing its strings from the frame (`Cow`s, borrowed unless they hold
/// escapes): a send parses without allocating (see [`crate::model::parse_json_borrowed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessageRef<'a> {
    Subscribe {
        conversation_id: ConversationId,
        after: u64,
    },
    Send {
        conversation_id: ConversationId,
        text: Cow<'a, str>,
        client_msg_id: Option<Cow<'a, str>>,
    },
    Typing {
        conversation_id: ConversationId,
    },
    Read {
        conversation_id: ConversationId,
        seq: u64,
    },
}

impl ClientMessageRef<'_> {
    pub fn into_owned(self) -> ClientMessage {
        match self {
            ClientMessageRef::Subscribe {
                conversation_id,
                after,
            } => ClientMessage::Subscribe {
                conversation_id,
                after,
            },
            ClientMessageRef::Send {
                conversation_id,
                text,
                client_msg_id,
            } => ClientMessage::Send {
                conversation_id,
                text: text.into_owned(),
                client_msg_id: client_msg_id.map(Cow::into_owned),
            },
            ClientMessageRef::Typing { conversation_id } => {
                ClientMessage::Typing { conversation_id }
            }
            ClientMessageRef::Read {
                conversation_id,
                seq,
            } => ClientMessage::Read {
                conversation_id,
                seq,
            },
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ClientMessageRef<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawClient::<'a>::deserialize(d)?;
        ClientMessageRef::try_from(raw).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ClientMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ClientMessageRef::deserialize(d).map(ClientMessageRef::into_owned)
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ClientType {
    Subscribe,
    Send,
    Typing,
    Read,
}

impl ClientType {
    fn as_str(self) -> &'static str {
        match self {
            ClientType::Subscribe => "subscribe",
            ClientType::Send => "send",
            ClientType::Typing => "typing",
            ClientType::Read => "read",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient<'a> {
    #[serde(rename = "type")]
    ty: ClientType,
    conversation_id: ConversationId,
    after: Option<u64>,
    #[serde(default, borrow, deserialize_with = "borrowed_str_opt")]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_str_opt")]
    client_msg_id: Option<Cow<'a, str>>,
    seq: Option<u64>,
}

impl<'a> TryFrom<RawClient<'a>> for ClientMessageRef<'a> {
    type Error = String;
    fn try_from(r: RawClient<'a>) -> Result<Self, String> {
        let allowed: &[&str] = match r.ty {
            ClientType::Subscribe => &["after"],
            ClientType::Send => &["text", "client_msg_id"],
            ClientType::Typing => &[],
            ClientType::Read => &["seq"],
        };
        let present = [
            ("after", r.after.is_some()),
            ("text", r.text.is_some()),
            ("client_msg_id", r.client_msg_id.is_some()),
            ("seq", r.seq.is_some()),
        ];
        for (name, is) in present {
            if is && !allowed.contains(&name) {
                return Err(format!(
                    "field `{name}` is not allowed in a `{}` message",
                    r.ty.as_str()
                ));
            }
        }
        let need = |name: &str| format!("`{}` message: missing field `{name}`", r.ty.as_str());
        let conversation_id = r.conversation_id;
        Ok(match r.ty {
            ClientType::Subscribe => ClientMessageRef::Subscribe {
                conversation_id,
                after: r.after.unwrap_or(0),
            },
            ClientType::Send => ClientMessageRef::Send {
                conversation_id,
                text: r.text.ok_or_else(|| need("text"))?,
                client_msg_id: r.client_msg_id,
            },
            ClientType::Typing => ClientMessageRef::Typing { conversation_id },
            ClientType::Read => ClientMessageRef::Read {
                conversation_id,
                seq: r.seq.ok_or_else(|| need("seq"))?,
            },
        })
    }
}

impl ClientMessage {
    pub fn conversation_id(&self) -> ConversationId {
        match self {
            ClientMessage::Subscribe {
                conversation_id, ..
            }
            | ClientMessage::Send {
                conversation_id, ..
            }
            | ClientMessage::Typing { conversation_id }
            | ClientMessage::Read {
                conversation_id, ..
            } => *conversation_id,
        }
    }
}

impl Serialize for ClientMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            ClientMessage::Subscribe {
                conversation_id,
                after,
            } => {
                m.serialize_entry("type", "subscribe")?;
                m.serialize_entry("conversation_id", conversation_id)?;
                m.serialize_entry("after", after)?;
            }
            ClientMessage::Send {
                conversation_id,
                text,
                client_msg_id,
            } => {
                m.serialize_entry("type", "send")?;
                m.serialize_entry("conversation_id", conversation_id)?;
                m.serialize_entry("text", text)?;
                if let Some(id) = client_msg_id {
                    m.serialize_entry("client_msg_id", id)?;
                }
            }
            ClientMessage::Typing { conversation_id } => {
                m.serialize_entry("type", "typing")?;
                m.serialize_entry("conversation_id", conversation_id)?;
            }
            ClientMessage::Read {
                conversation_id,
                seq,
            } => {
                m.serialize_entry("type", "read")?;
                m.serialize_entry("conversation_id", conversation_id)?;
                m.serialize_entry("seq", seq)?;
            }
        }
        m.end()
    }
}

impl Validate for ClientMessage {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        if let ClientMessage::Send {
            text,
            client_msg_id,
            ..
        } = self
        {
            validate_send(text, client_msg_id.as_deref(), limits)?;
        }
        Ok(())
    }
}

impl Validate for ClientMessageRef<'_> {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        if let ClientMessageRef::Send {
            text,
            client_msg_id,
            ..
        } = self
        {
            validate_send(text, client_msg_id.as_deref(), limits)?;
        }
        Ok(())
    }
}

impl WriteJson for ClientMessage {}

// ---- server -> client ----------------------------------------------------------------------

/// A chat message as clients see it (`"type": "message"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub from: Participant,
    pub text: String,
    /// Unix microseconds when the gateway stored it.
    pub ts: u64,
    /// The sender's idempotency key, echoed so a sender can match its own messages.
    pub client_msg_id: Option<String>,
}

/// An event as clients see it (`"type": "event"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMessage {
    pub conversation_id: ConversationId,
    /// Position of a stored event; 0 for ephemeral events (`typing`, `read`), which have none.
    pub seq: u64,
    pub ts: u64,
    /// Who acted, where someone did.
    pub from: Option<Participant>,
    pub event: Event,
}

/// Acknowledges a `send`: the message is durable at `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_msg_id: Option<String>,
    pub conversation_id: ConversationId,
    pub seq: u64,
}

/// A refused client message. `conversation_id` and `client_msg_id` name what it refers to, when
/// the refused message had them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsError {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub conversation_id: Option<ConversationId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_msg_id: Option<String>,
}

/// What the server sends on `/v1/ws`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawServer")]
pub enum ServerMessage {
    Message(Message),
    Event(EventMessage),
    Ack(Ack),
    Error(WsError),
}

/// Write a message object from borrowed parts, so a stored record can be sent without first
/// being copied into a [`Message`].
pub(crate) fn serialize_message<S: Serializer, P: Serialize + ?Sized>(
    s: S,
    conversation_id: ConversationId,
    seq: u64,
    from: &P,
    text: &str,
    ts: u64,
    client_msg_id: Option<&str>,
) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("type", "message")?;
    m.serialize_entry("conversation_id", &conversation_id)?;
    m.serialize_entry("seq", &seq)?;
    m.serialize_entry("from", from)?;
    m.serialize_entry("text", text)?;
    m.serialize_entry("ts", &ts)?;
    if let Some(id) = client_msg_id {
        m.serialize_entry("client_msg_id", id)?;
    }
    m.end()
}

fn serialize_ack<S: Serializer>(
    s: S,
    client_msg_id: Option<&str>,
    conversation_id: ConversationId,
    seq: u64,
) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("type", "ack")?;
    if let Some(id) = client_msg_id {
        m.serialize_entry("client_msg_id", id)?;
    }
    m.serialize_entry("conversation_id", &conversation_id)?;
    m.serialize_entry("seq", &seq)?;
    m.end()
}

/// Appends the JSON of an ack (`ServerMessage::Ack`) to `out`, from borrowed parts: a send's
/// answer without building an [`Ack`].
pub fn write_ack_json(
    out: &mut Vec<u8>,
    client_msg_id: Option<&str>,
    conversation_id: ConversationId,
    seq: u64,
) {
    let mut ser = serde_json::Serializer::new(&mut *out);
    let res = serialize_ack(&mut ser, client_msg_id, conversation_id, seq);
    // Writing into a Vec never fails.
    assert!(res.is_ok(), "ack serialization failed: {res:?}");
}

pub(crate) fn serialize_event<S: Serializer>(
    s: S,
    conversation_id: ConversationId,
    seq: u64,
    ts: u64,
    from: Option<&Participant>,
    event: &Event,
) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("type", "event")?;
    m.serialize_entry("conversation_id", &conversation_id)?;
    // An ephemeral event has no seq of its own; `read` writes its read position as `seq`.
    if !event.kind().is_ephemeral() {
        m.serialize_entry("seq", &seq)?;
    }
    m.serialize_entry("ts", &ts)?;
    if let Some(p) = from {
        m.serialize_entry("from", p)?;
    }
    event.serialize_fields(&mut m)?;
    m.end()
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_message(
            s,
            self.conversation_id,
            self.seq,
            &self.from,
            &self.text,
            self.ts,
            self.client_msg_id.as_deref(),
        )
    }
}

impl Serialize for EventMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_event(
            s,
            self.conversation_id,
            self.seq,
            self.ts,
            self.from.as_ref(),
            &self.event,
        )
    }
}

impl Serialize for ServerMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ServerMessage::Message(m) => m.serialize(s),
            ServerMessage::Event(e) => e.serialize(s),
            ServerMessage::Ack(a) => {
                serialize_ack(s, a.client_msg_id.as_deref(), a.conversation_id, a.seq)
            }
            ServerMessage::Error(e) => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("type", "error")?;
                m.serialize_entry("error", &e.error)?;
                if let Some(id) = &e.conversation_id {
                    m.serialize_entry("conversation_id", id)?;
                }
                if let Some(id) = &e.client_msg_id {
                    m.serialize_entry("client_msg_id", id)?;
                }
                m.end()
            }
        }
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ServerType {
    Message,
    Event,
    Ack,
    Error,
}

/// Every field any server message can carry; the conversion checks which belong to `type`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    #[serde(rename = "type")]
    ty: ServerType,
    conversation_id: Option<ConversationId>,
    seq: Option<u64>,
    ts: Option<u64>,
    #[serde(default, deserialize_with = "object_opt")]
    from: Option<Participant>,
    text: Option<String>,
    client_msg_id: Option<String>,
    error: Option<String>,
    event: Option<EventKind>,
    group: Option<String>,
    queue_position: Option<u32>,
    reason: Option<String>,
    agent: Option<String>,
    from_agent: Option<String>,
    to_agent: Option<String>,
    to_group: Option<String>,
}

impl RawServer {
    fn event_fields_present(&self) -> Option<&'static str> {
        [
            ("event", self.event.is_some()),
            ("group", self.group.is_some()),
            ("queue_position", self.queue_position.is_some()),
            ("reason", self.reason.is_some()),
            ("agent", self.agent.is_some()),
            ("from_agent", self.from_agent.is_some()),
            ("to_agent", self.to_agent.is_some()),
            ("to_group", self.to_group.is_some()),
        ]
        .into_iter()
        .find(|(_, p)| *p)
        .map(|(n, _)| n)
    }
}

impl TryFrom<RawServer> for ServerMessage {
    type Error = String;
    fn try_from(r: RawServer) -> Result<Self, String> {
        let ty = match r.ty {
            ServerType::Message => "message",
            ServerType::Event => "event",
            ServerType::Ack => "ack",
            ServerType::Error => "error",
        };
        let need = |name: &str| format!("`{ty}` message: missing field `{name}`");
        let forbid = |name: &str| format!("field `{name}` is not allowed in type `{ty}`");
        if r.ty != ServerType::Event
            && let Some(name) = r.event_fields_present()
        {
            return Err(forbid(name));
        }
        match r.ty {
            ServerType::Message => {
                if r.error.is_some() {
                    return Err(forbid("error"));
                }
                Ok(ServerMessage::Message(Message {
                    conversation_id: r.conversation_id.ok_or_else(|| need("conversation_id"))?,
                    seq: r.seq.ok_or_else(|| need("seq"))?,
                    from: r.from.ok_or_else(|| need("from"))?,
                    text: r.text.ok_or_else(|| need("text"))?,
                    ts: r.ts.ok_or_else(|| need("ts"))?,
                    client_msg_id: r.client_msg_id,
                }))
            }
            ServerType::Event => {
                for (name, p) in [
                    ("text", r.text.is_some()),
                    ("client_msg_id", r.client_msg_id.is_some()),
                    ("error", r.error.is_some()),
                ] {
                    if p {
                        return Err(forbid(name));
                    }
                }
                let kind = r.event.ok_or_else(|| need("event"))?;
                let (seq, read_seq) = match kind {
                    EventKind::Read => (0, r.seq),
                    EventKind::Typing => {
                        if r.seq.is_some() {
                            return Err("field `seq` is not allowed in a `typing` event".into());
                        }
                        (0, None)
                    }
                    _ => (r.seq.ok_or_else(|| need("seq"))?, None),
                };
                let fields = EventFields {
                    group: r.group,
                    queue_position: r.queue_position,
                    reason: r.reason,
                    agent: r.agent,
                    from_agent: r.from_agent,
                    to_agent: r.to_agent,
                    to_group: r.to_group,
                    read_seq,
                };
                Ok(ServerMessage::Event(EventMessage {
                    conversation_id: r.conversation_id.ok_or_else(|| need("conversation_id"))?,
                    seq,
                    ts: r.ts.ok_or_else(|| need("ts"))?,
                    from: r.from,
                    event: fields.into_event(kind)?,
                }))
            }
            ServerType::Ack => {
                for (name, p) in [
                    ("ts", r.ts.is_some()),
                    ("from", r.from.is_some()),
                    ("text", r.text.is_some()),
                    ("error", r.error.is_some()),
                ] {
                    if p {
                        return Err(forbid(name));
                    }
                }
                Ok(ServerMessage::Ack(Ack {
                    client_msg_id: r.client_msg_id,
                    conversation_id: r.conversation_id.ok_or_else(|| need("conversation_id"))?,
                    seq: r.seq.ok_or_else(|| need("seq"))?,
                }))
            }
            ServerType::Error => {
                for (name, p) in [
                    ("seq", r.seq.is_some()),
                    ("ts", r.ts.is_some()),
                    ("from", r.from.is_some()),
                    ("text", r.text.is_some()),
                ] {
                    if p {
                        return Err(forbid(name));
                    }
                }
                Ok(ServerMessage::Error(WsError {
                    error: r.error.ok_or_else(|| need("error"))?,
                    conversation_id: r.conversation_id,
                    client_msg_id: r.client_msg_id,
                }))
            }
        }
    }
}

impl Validate for Message {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        self.from.validate(limits)?;
        check_text("text", &self.text, limits.text_bytes_max)?;
        if let Some(id) = &self.client_msg_id {
            check_client_msg_id("client_msg_id", id, limits.client_msg_id_bytes_max)?;
        }
        Ok(())
    }
}

impl Validate for EventMessage {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        self.from.validate(limits)?;
        self.event.validate(limits)
    }
}

impl Validate for ServerMessage {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        match self {
            ServerMessage::Message(m) => m.validate(limits),
            ServerMessage::Event(e) => e.validate(limits),
            ServerMessage::Ack(a) => match &a.client_msg_id {
                Some(id) => {
                    check_client_msg_id("client_msg_id", id, limits.client_msg_id_bytes_max)
                }
                None => Ok(()),
            },
            ServerMessage::Error(e) => check_len("error", &e.error, limits.reason_bytes_max),
        }
    }
}

impl WriteJson for Message {}
impl WriteJson for EventMessage {}
impl WriteJson for ServerMessage {}
