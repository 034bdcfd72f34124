//! Pieces the WebSocket scenarios share: connecting a kefu socket, reading kefu's server
//! messages, checking per-conversation seq order, and timestamps that travel inside texts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::conn::Conn;
use crate::stats::ErrorKind;
use crate::ws::WsClient;

/// Largest WebSocket message the scenarios accept (kefu's default frame limit).
pub const WS_PAYLOAD_BYTES_MAX: usize = 64 * 1024;
const READ_BUF_BYTES: usize = 64 * 1024;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since this process's epoch: what senders put in their texts, so the receiver
/// (in the same process) measures send-to-receipt latency.
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Time since the `now_ns()` value `sent_ns`.
pub fn since_ns(sent_ns: u64) -> Duration {
    Duration::from_nanos(now_ns().saturating_sub(sent_ns))
}

/// Open `/v1/ws?token=TOKEN` on kefu.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    token: &str,
    seed: u64,
    deadline: Instant,
) -> Result<WsClient, ErrorKind> {
    let conn = Conn::connect(addr, source, READ_BUF_BYTES, deadline).await?;
    let path = format!("/v1/ws?token={token}");
    WsClient::handshake(
        conn,
        &addr.to_string(),
        &path,
        seed,
        WS_PAYLOAD_BYTES_MAX,
        deadline,
    )
    .await
}

/// The fields of a kefu server message the scenarios look at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMsg {
    /// `message`, `event`, `ack`, `error`, ...
    pub kind: String,
    pub conversation_id: String,
    pub seq: u64,
    /// `from.role` of messages and events.
    pub from_role: String,
    pub text: String,
    /// The event's name (`assigned`, `queued`, ...), for events.
    pub event: String,
    /// For `assigned` events: the agent's name.
    pub agent: String,
    /// For errors: the reason.
    pub error: String,
}

/// Parse one server message; `None` if it is not a JSON object with a `type`.
pub fn parse_server(bytes: &[u8]) -> Option<ServerMsg> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let s = |x: &Value| x.as_str().unwrap_or("").to_string();
    let kind = v.get("type")?.as_str()?.to_string();
    // The event name may be a plain string or an object tagged by a field or a single key.
    let (event, agent) = match v.get("event") {
        Some(Value::String(name)) => (name.clone(), s(&v["agent"])),
        Some(Value::Object(o)) => {
            let name = ["type", "kind", "name"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Value::as_str))
                .map(str::to_string)
                .or_else(|| (o.len() == 1).then(|| o.keys().next().cloned()).flatten())
                .unwrap_or_default();
            let agent = o
                .get("agent")
                .or_else(|| o.get(&name).and_then(|inner| inner.get("agent")))
                .map(s)
                .unwrap_or_else(|| s(&v["agent"]));
            (name, agent)
        }
        _ => (String::new(), String::new()),
    };
    Some(ServerMsg {
        kind,
        conversation_id: s(&v["conversation_id"]),
        seq: v["seq"].as_u64().unwrap_or(0),
        from_role: s(&v["from"]["role"]),
        text: s(&v["text"]),
        event,
        agent,
        error: s(&v["error"]),
    })
}

/// Why a record broke the order contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqFault {
    /// A seq at or below one already seen.
    Duplicate,
    /// A seq past the next one: something was skipped.
    Gap,
}

/// Per-conversation order check of one receiver: stored records (seq > 0) must arrive as
/// exactly `last + 1` each time.
#[derive(Debug, Default)]
pub struct SeqChecker {
    last: HashMap<String, u64>,
    pub duplicates: u64,
    pub gaps: u64,
}

impl SeqChecker {
    /// Start (or resume) a conversation at `after` (the subscription's `after`).
    pub fn resume(&mut self, conv: &str, after: u64) {
        self.last.insert(conv.to_string(), after);
    }

    pub fn last(&self, conv: &str) -> Option<u64> {
        self.last.get(conv).copied()
    }

    /// Observe a record; ephemeral ones (seq 0) are not ordered.
    pub fn observe(&mut self, conv: &str, seq: u64) -> Result<(), SeqFault> {
        if seq == 0 {
            return Ok(());
        }
        let last = self.last.entry(conv.to_string()).or_insert(0);
        if seq <= *last {
            self.duplicates += 1;
            return Err(SeqFault::Duplicate);
        }
        let fault = (seq != *last + 1).then_some(SeqFault::Gap);
        *last = seq;
        match fault {
            Some(f) => {
                self.gaps += 1;
                Err(f)
            }
            None => Ok(()),
        }
    }
}

/// Text of a load-test message: who, which, and when it was sent.
pub fn stamp(tag: &str, k: u64) -> String {
    format!("lt {tag} k={k} t={}", now_ns())
}

/// Parse `lt TAG k=K t=NS` back into (tag, k, sent_ns).
pub fn parse_stamp(text: &str) -> Option<(&str, u64, u64)> {
    let mut parts = text.strip_prefix("lt ")?.split(' ');
    let tag = parts.next()?;
    let k = parts.next()?.strip_prefix("k=")?.parse().ok()?;
    let t = parts.next()?.strip_prefix("t=")?.parse().ok()?;
    Some((tag, k, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_checker_finds_gaps_and_duplicates() {
        let mut c = SeqChecker::default();
        c.resume("a", 0);
        assert_eq!(c.observe("a", 1), Ok(()));
        assert_eq!(c.observe("a", 0), Ok(()));
        assert_eq!(c.observe("a", 2), Ok(()));
        assert_eq!(c.observe("a", 2), Err(SeqFault::Duplicate));
        assert_eq!(c.observe("a", 4), Err(SeqFault::Gap));
        c.resume("b", 7);
        assert_eq!(c.observe("b", 8), Ok(()));
        assert_eq!((c.duplicates, c.gaps), (1, 1));
    }

    #[test]
    fn server_messages_and_stamps() {
        let m = parse_server(
            br#"{"type":"message","conversation_id":"c1","seq":3,"from":{"role":"agent","id":"bob"},"text":"hi","ts":1}"#,
        )
        .unwrap();
        assert_eq!(
            (
                m.kind.as_str(),
                m.seq,
                m.from_role.as_str(),
                m.text.as_str()
            ),
            ("message", 3, "agent", "hi")
        );
        let e = parse_server(
            br#"{"type":"event","conversation_id":"c1","seq":2,"event":"assigned","agent":"bob"}"#,
        )
        .unwrap();
        assert_eq!((e.event.as_str(), e.agent.as_str()), ("assigned", "bob"));
        let e =
            parse_server(br#"{"type":"event","seq":2,"event":{"type":"assigned","agent":"al"}}"#)
                .unwrap();
        assert_eq!((e.event.as_str(), e.agent.as_str()), ("assigned", "al"));
        assert!(parse_server(b"[1]").is_none());
        let s = stamp("v", 5);
        let (tag, k, t) = parse_stamp(&s).unwrap();
        assert_eq!((tag, k), ("v", 5));
        assert!(t <= now_ns());
        assert!(parse_stamp("hello").is_none());
    }
}
