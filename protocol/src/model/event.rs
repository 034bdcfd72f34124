//! Conversation events, their JSON fields, and the state machine they drive.
//!
//! An event is written flat into its envelope (`{"type": "event", ..., "event": "assigned",
//! "agent": "alice", "group": "sales"}`); the fields each kind carries:
//!
//! | event | fields | stored |
//! |---|---|---|
//! | `queued` | `group`, `queue_position`, `reason`? | yes |
//! | `assigned` | `agent`, `group` | yes |
//! | `transferred` | `from_agent`?, exactly one of `to_agent` / `to_group` | yes |
//! | `resolved` | (who: envelope `from`) | yes |
//! | `reopened` | (who: envelope `from`) | yes |
//! | `closed` | `reason` | yes |
//! | `typing` | (who: envelope `from`) | no |
//! | `read` | `seq` = position read up to | no |

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use super::ConversationState;
use super::error::{ModelError, ModelLimits, check_len, check_name};

/// The name of an event, the value of the `event` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Queued,
    Assigned,
    Transferred,
    Resolved,
    Reopened,
    Closed,
    Typing,
    Read,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Assigned => "assigned",
            EventKind::Transferred => "transferred",
            EventKind::Resolved => "resolved",
            EventKind::Reopened => "reopened",
            EventKind::Closed => "closed",
            EventKind::Typing => "typing",
            EventKind::Read => "read",
        }
    }

    /// Ephemeral events are delivered live only: not stored, not replayed, no `seq` of their own.
    pub fn is_ephemeral(self) -> bool {
        matches!(self, EventKind::Typing | EventKind::Read)
    }
}

/// Where a transfer sends a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TransferTarget {
    Agent(String),
    Group(String),
}

/// What happened in a conversation, with the details a replay needs to rebuild its state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// Waiting in `group` at 1-based `queue_position`. `reason` says why it (re-)entered the
    /// queue when that is not a new conversation: `reopened`, `agent_offline`, `transferred`.
    Queued {
        group: String,
        queue_position: u32,
        reason: Option<String>,
    },
    Assigned {
        agent: String,
        group: String,
    },
    /// Moved away from `from_agent` (none when it was still queued). A transfer to a group is
    /// followed by `queued`; to an agent, by `assigned`.
    Transferred {
        from_agent: Option<String>,
        to: TransferTarget,
    },
    Resolved,
    Reopened,
    /// Closed for good; `reason` is e.g. `idle`.
    Closed {
        reason: String,
    },
    Typing,
    /// The participant has read up to `seq`.
    Read {
        seq: u64,
    },
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Queued { .. } => EventKind::Queued,
            Event::Assigned { .. } => EventKind::Assigned,
            Event::Transferred { .. } => EventKind::Transferred,
            Event::Resolved => EventKind::Resolved,
            Event::Reopened => EventKind::Reopened,
            Event::Closed { .. } => EventKind::Closed,
            Event::Typing => EventKind::Typing,
            Event::Read { .. } => EventKind::Read,
        }
    }

    pub(crate) fn validate(&self, limits: &ModelLimits) -> Result<(), ModelError> {
        match self {
            Event::Queued { group, reason, .. } => {
                check_name("group", group, limits.id_bytes_max)?;
                if let Some(r) = reason {
                    check_name("reason", r, limits.reason_bytes_max)?;
                }
            }
            Event::Assigned { agent, group } => {
                check_name("agent", agent, limits.id_bytes_max)?;
                check_name("group", group, limits.id_bytes_max)?;
            }
            Event::Transferred { from_agent, to } => {
                if let Some(a) = from_agent {
                    check_name("from_agent", a, limits.id_bytes_max)?;
                }
                match to {
                    TransferTarget::Agent(a) => check_name("to_agent", a, limits.id_bytes_max)?,
                    TransferTarget::Group(g) => check_name("to_group", g, limits.id_bytes_max)?,
                }
            }
            Event::Closed { reason } => check_len("reason", reason, limits.reason_bytes_max)?,
            Event::Resolved | Event::Reopened | Event::Typing | Event::Read { .. } => {}
        }
        Ok(())
    }

    /// Write `"event": kind` and the kind's fields into an open JSON object. A `read` event's
    /// `seq` is written here, so the envelope must not write its own `seq` for it.
    pub(crate) fn serialize_fields<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_entry("event", self.kind().as_str())?;
        match self {
            Event::Queued {
                group,
                queue_position,
                reason,
            } => {
                map.serialize_entry("group", group)?;
                map.serialize_entry("queue_position", queue_position)?;
                if let Some(r) = reason {
                    map.serialize_entry("reason", r)?;
                }
            }
            Event::Assigned { agent, group } => {
                map.serialize_entry("agent", agent)?;
                map.serialize_entry("group", group)?;
            }
            Event::Transferred { from_agent, to } => {
                if let Some(a) = from_agent {
                    map.serialize_entry("from_agent", a)?;
                }
                match to {
                    TransferTarget::Agent(a) => map.serialize_entry("to_agent", a)?,
                    TransferTarget::Group(g) => map.serialize_entry("to_group", g)?,
                }
            }
            Event::Closed { reason } => map.serialize_entry("reason", reason)?,
            Event::Read { seq } => map.serialize_entry("seq", seq)?,
            Event::Resolved | Event::Reopened | Event::Typing => {}
        }
        Ok(())
    }
}

/// The optional per-kind fields of a flat event object, gathered by the envelope's raw struct.
#[derive(Default)]
pub(crate) struct EventFields {
    pub group: Option<String>,
    pub queue_position: Option<u32>,
    pub reason: Option<String>,
    pub agent: Option<String>,
    pub from_agent: Option<String>,
    pub to_agent: Option<String>,
    pub to_group: Option<String>,
    /// Only for `read`: the envelope's `seq`.
    pub read_seq: Option<u64>,
}

impl EventFields {
    fn present(&self) -> [(&'static str, bool); 8] {
        [
            ("group", self.group.is_some()),
            ("queue_position", self.queue_position.is_some()),
            ("reason", self.reason.is_some()),
            ("agent", self.agent.is_some()),
            ("from_agent", self.from_agent.is_some()),
            ("to_agent", self.to_agent.is_some()),
            ("to_group", self.to_group.is_some()),
            ("seq", self.read_seq.is_some()),
        ]
    }

    /// Build the typed event, or say which field `kind` lacks or must not carry.
    pub fn into_event(self, kind: EventKind) -> Result<Event, String> {
        let allowed: &[&str] = match kind {
            EventKind::Queued => &["group", "queue_position", "reason"],
            EventKind::Assigned => &["agent", "group"],
            EventKind::Transferred => &["from_agent", "to_agent", "to_group"],
            EventKind::Closed => &["reason"],
            EventKind::Read => &["seq"],
            EventKind::Resolved | EventKind::Reopened | EventKind::Typing => &[],
        };
        for (name, present) in self.present() {
            if present && !allowed.contains(&name) {
                return Err(format!(
                    "field `{name}` is not allowed in a `{}` event",
                    kind.as_str()
                ));
            }
        }
        let need = |name: &str| format!("`{}` event: missing field `{name}`", kind.as_str());
        Ok(match kind {
            EventKind::Queued => Event::Queued {
                group: self.group.ok_or_else(|| need("group"))?,
                queue_position: self.queue_position.ok_or_else(|| need("queue_position"))?,
                reason: self.reason,
            },
            EventKind::Assigned => Event::Assigned {
                agent: self.agent.ok_or_else(|| need("agent"))?,
                group: self.group.ok_or_else(|| need("group"))?,
            },
            EventKind::Transferred => {
                let to = match (self.to_agent, self.to_group) {
                    (Some(a), None) => TransferTarget::Agent(a),
                    (None, Some(g)) => TransferTarget::Group(g),
                    _ => {
                        return Err(
                            "`transferred` event: exactly one of `to_agent` and `to_group`"
                                .to_owned(),
                        );
                    }
                };
                Event::Transferred {
                    from_agent: self.from_agent,
                    to,
                }
            }
            EventKind::Resolved => Event::Resolved,
            EventKind::Reopened => Event::Reopened,
            EventKind::Closed => Event::Closed {
                reason: self.reason.ok_or_else(|| need("reason"))?,
            },
            EventKind::Typing => Event::Typing,
            EventKind::Read => Event::Read {
                seq: self.read_seq.ok_or_else(|| need("seq"))?,
            },
        })
    }
}

/// A stored event that does not fit the state the conversation is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event `{}` is not allowed in state `{}`", event.as_str(), state.map_or("none", ConversationState::as_str))]
pub struct IllegalTransition {
    pub state: Option<ConversationState>,
    pub event: EventKind,
}

/// The state after `event`, starting from `state` (`None` = the conversation does not exist yet).
/// Replay folds the stored events of a conversation through this; the gateway checks a command
/// against it before it writes the event, and answers 409 on `Err`.
///
/// `queued` opens a conversation and also re-queues an assigned one; `transferred` keeps the
/// state (the following `queued` or `assigned` moves it); `closed` is final; ephemeral events
/// change nothing but need an open conversation.
pub fn apply_event(
    state: Option<ConversationState>,
    event: &Event,
) -> Result<ConversationState, IllegalTransition> {
    use ConversationState as S;
    let next = match (state, event.kind()) {
        (None | Some(S::Queued | S::Assigned), EventKind::Queued) => Some(S::Queued),
        (Some(S::Queued | S::Assigned), EventKind::Assigned) => Some(S::Assigned),
        (Some(s @ (S::Queued | S::Assigned)), EventKind::Transferred) => Some(s),
        (Some(S::Assigned), EventKind::Resolved) => Some(S::Resolved),
        (Some(S::Resolved), EventKind::Reopened) => Some(S::Queued),
        (Some(S::Queued | S::Assigned | S::Resolved), EventKind::Closed) => Some(S::Closed),
        (
            Some(s @ (S::Queued | S::Assigned | S::Resolved)),
            EventKind::Typing | EventKind::Read,
        ) => Some(s),
        _ => None,
    };
    next.ok_or(IllegalTransition {
        state,
        event: event.kind(),
    })
}
