//! The JSON payloads of stored frames: one [`MessageRecord`] per `Message` frame, one
//! [`EventRecord`] per `Event` frame.
//!
//! A record repeats the conversation id, seq and timestamp of its frame header so that it can be
//! read on its own (firehose consumers, debugging dumps); replay checks that the two agree. Each
//! record names its tenant, because shards are shared between tenants.
//!
//! Replay rebuilds a conversation by folding its event records through
//! [`apply_event`](super::apply_event); the first record of every conversation is a `queued`
//! event carrying [`Opened`], the facts that never change afterwards.

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::error::{
    ModelError, ModelLimits, Validate, WriteJson, check_client_msg_id, check_name, check_text,
    check_token_word, object, object_opt,
};
use super::event::{Event, EventFields, EventKind};
use super::ws::{serialize_event, serialize_message};
use super::{ConversationId, Participant, ParticipantRef};

/// A stored chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRecord {
    pub tenant: String,
    pub conversation_id: ConversationId,
    pub seq: u64,
    /// Unix microseconds, equal to the frame's `timestamp_us`.
    pub ts: u64,
    #[serde(deserialize_with = "object")]
    pub from: Participant,
    pub text: String,
    /// Kept so that a retry after a restart still finds its original seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

impl MessageRecord {
    /// Append the WebSocket `message` form of this record to `out`, without copying it into a
    /// [`Message`](super::Message) first.
    pub fn write_ws_json(&self, out: &mut Vec<u8>) {
        self.as_borrowed().write_ws_json(out);
    }

    pub fn to_message(&self) -> super::Message {
        super::Message {
            conversation_id: self.conversation_id,
            seq: self.seq,
            from: self.from.clone(),
            text: self.text.clone(),
            ts: self.ts,
            client_msg_id: self.client_msg_id.clone(),
        }
    }
}

impl Validate for MessageRecord {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_name("tenant", &self.tenant, limits.id_bytes_max)?;
        if self.seq == 0 {
            return Err(ModelError::Invalid {
                field: "seq",
                reason: "must be at least 1",
            });
        }
        self.from.validate(limits)?;
        check_text("text", &self.text, limits.text_bytes_max)?;
        if let Some(id) = &self.client_msg_id {
            check_client_msg_id("client_msg_id", id, limits.client_msg_id_bytes_max)?;
        }
        Ok(())
    }
}

/// A [`MessageRecord`] borrowed from its parts, for writing one without copying the tenant, the
/// sender's id and the text into owned strings first (the send path writes one per message).
/// Serializes to exactly the bytes [`MessageRecord`] does (a test holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MessageRecordRef<'a> {
    pub tenant: &'a str,
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub ts: u64,
    pub from: ParticipantRef<'a>,
    pub text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<&'a str>,
}

impl MessageRecordRef<'_> {
    /// Append the WebSocket `message` form of this record to `out` (as
    /// [`MessageRecord::write_ws_json`] does).
    pub fn write_ws_json(&self, out: &mut Vec<u8>) {
        let mut ser = serde_json::Serializer::new(&mut *out);
        let res = serialize_message(
            &mut ser,
            self.conversation_id,
            self.seq,
            &self.from,
            self.text,
            self.ts,
            self.client_msg_id,
        );
        // Writing into a Vec cannot fail; the serializer returns no custom errors.
        assert!(res.is_ok(), "message serialization failed: {res:?}");
    }
}

impl MessageRecord {
    pub fn as_borrowed(&self) -> MessageRecordRef<'_> {
        MessageRecordRef {
            tenant: &self.tenant,
            conversation_id: self.conversation_id,
            seq: self.seq,
            ts: self.ts,
            from: self.from.as_borrowed(),
            text: &self.text,
            client_msg_id: self.client_msg_id.as_deref(),
        }
    }
}

/// What a conversation was opened with; carried by its first record only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opened {
    pub channel: String,
    /// The visitor's participant id.
    pub visitor_id: String,
    pub visitor_name: String,
}

/// A stored event. Ephemeral events (`typing`, `read`) are never stored, so they are refused here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub tenant: String,
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub ts: u64,
    /// Who caused it: the agent who resolved, the visitor who reopened, the system on idle close.
    pub from: Option<Participant>,
    pub event: Event,
    /// Present exactly on the conversation's first record (a `queued` event).
    pub opened: Option<Opened>,
}

impl EventRecord {
    /// Append the WebSocket `event` form of this record to `out`.
    pub fn write_ws_json(&self, out: &mut Vec<u8>) {
        let mut ser = serde_json::Serializer::new(&mut *out);
        let res = serialize_event(
            &mut ser,
            self.conversation_id,
            self.seq,
            self.ts,
            self.from.as_ref(),
            &self.event,
        );
        assert!(res.is_ok(), "event serialization failed: {res:?}");
    }

    pub fn to_event_message(&self) -> super::EventMessage {
        super::EventMessage {
            conversation_id: self.conversation_id,
            seq: self.seq,
            ts: self.ts,
            from: self.from.clone(),
            event: self.event.clone(),
        }
    }
}

impl Serialize for EventRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("tenant", &self.tenant)?;
        m.serialize_entry("conversation_id", &self.conversation_id)?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("ts", &self.ts)?;
        if let Some(p) = &self.from {
            m.serialize_entry("from", p)?;
        }
        self.event.serialize_fields(&mut m)?;
        if let Some(o) = &self.opened {
            m.serialize_entry("opened", o)?;
        }
        m.end()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventRecord {
    tenant: String,
    conversation_id: ConversationId,
    seq: u64,
    ts: u64,
    #[serde(default, deserialize_with = "object_opt")]
    from: Option<Participant>,
    event: EventKind,
    group: Option<String>,
    queue_position: Option<u32>,
    reason: Option<String>,
    agent: Option<String>,
    from_agent: Option<String>,
    to_agent: Option<String>,
    to_group: Option<String>,
    #[serde(default, deserialize_with = "object_opt")]
    opened: Option<Opened>,
}

impl<'de> Deserialize<'de> for EventRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let r = RawEventRecord::deserialize(d)?;
        if r.event.is_ephemeral() {
            return Err(D::Error::custom(format!(
                "event `{}` is ephemeral and is never stored",
                r.event.as_str()
            )));
        }
        if r.opened.is_some() && r.event != EventKind::Queued {
            return Err(D::Error::custom(
                "field `opened` is only allowed in a `queued` event",
            ));
        }
        let fields = EventFields {
            group: r.group,
            queue_position: r.queue_position,
            reason: r.reason,
            agent: r.agent,
            from_agent: r.from_agent,
            to_agent: r.to_agent,
            to_group: r.to_group,
            read_seq: None,
        };
        Ok(EventRecord {
            tenant: r.tenant,
            conversation_id: r.conversation_id,
            seq: r.seq,
            ts: r.ts,
            from: r.from,
            event: fields.into_event(r.event).map_err(D::Error::custom)?,
            opened: r.opened,
        })
    }
}

impl Validate for EventRecord {
    fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        check_name("tenant", &self.tenant, limits.id_bytes_max)?;
        if self.seq == 0 {
            return Err(ModelError::Invalid {
                field: "seq",
                reason: "must be at least 1",
            });
        }
        if self.event.kind().is_ephemeral() {
            return Err(ModelError::Invalid {
                field: "event",
                reason: "ephemeral events are never stored",
            });
        }
        self.from.validate(limits)?;
        self.event.validate(limits)?;
        if let Some(o) = &self.opened {
            if self.event.kind() != EventKind::Queued {
                return Err(ModelError::Invalid {
                    field: "opened",
                    reason: "only allowed in a `queued` event",
                });
            }
            check_token_word("opened.channel", &o.channel, limits.channel_bytes_max)?;
            check_name("opened.visitor_id", &o.visitor_id, limits.id_bytes_max)?;
            check_name(
                "opened.visitor_name",
                &o.visitor_name,
                limits.name_bytes_max,
            )?;
        }
        Ok(())
    }
}

impl WriteJson for MessageRecord {}
impl WriteJson for MessageRecordRef<'_> {}
impl WriteJson for EventRecord {}
