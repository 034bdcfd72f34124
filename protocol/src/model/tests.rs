//! Tests of the model: golden JSON from API.md, rejections with their exact messages, roundtrip
//! properties.

use proptest::prelude::*;

use super::*;

const L: ModelLimits = ModelLimits::DEFAULT;

fn cid(v: u64) -> ConversationId {
    ConversationId(v)
}

fn json<T: WriteJson>(v: &T) -> String {
    String::from_utf8(v.to_json_vec()).unwrap()
}

fn err<T: serde::de::DeserializeOwned + Validate + std::fmt::Debug>(s: &str) -> String {
    parse_json::<T>(s.as_bytes(), &L).unwrap_err().to_string()
}

// ---- ConversationId ------------------------------------------------------------------------

#[test]
fn id_string_form_and_shard() {
    let id = ConversationId::from_parts(3, 0x2a).unwrap();
    assert_eq!(id.to_string(), "c000300000000002a");
    assert_eq!(id.shard(), 3);
    assert_eq!(id.local(), 0x2a);
    assert_eq!(ConversationId::parse("c000300000000002a"), Ok(id));
    assert_eq!(ConversationId::from_parts(0, 1 << 48), None);
    assert_eq!(ConversationId(u64::MAX).to_string(), "cffffffffffffffff");
}

#[test]
fn id_rejections_are_precise() {
    assert_eq!(
        ConversationId::parse("c12"),
        Err(IdError::Length { len: 3 })
    );
    assert_eq!(
        ConversationId::parse("d000300000000002a"),
        Err(IdError::Prefix)
    );
    // Uppercase is not canonical: ids compare as strings.
    assert_eq!(
        ConversationId::parse("c000300000000002A"),
        Err(IdError::Digit { index: 16 })
    );
    assert_eq!(
        err::<ClientMessage>(r#"{"type":"typing","conversation_id":"c1"}"#),
        "field `conversation_id`: conversation id must be 17 bytes (\"c\" and 16 hex digits), got 2 at line 1 column 39"
    );
    assert_eq!(
        err::<ClientMessage>(r#"{"type":"typing","conversation_id":7}"#),
        "field `conversation_id`: invalid type: integer `7`, expected a conversation id string (\"c\" and 16 lowercase hex digits) at line 1 column 36"
    );
}

// ---- golden JSON (the shapes of API.md) -----------------------------------------------------

#[test]
fn golden_create_conversation() {
    let req: CreateConversationRequest = parse_json(
        br#"{"visitor": {"name": "Ann"}, "channel": "web", "text": "first message"}"#,
        &L,
    )
    .unwrap();
    assert_eq!(
        req,
        CreateConversationRequest {
            visitor: Visitor { name: "Ann".into() },
            channel: "web".into(),
            text: Some("first message".into()),
            group: None,
        }
    );
    let no_text: CreateConversationRequest =
        parse_json(br#"{"visitor":{"name":"Ann"},"channel":"web"}"#, &L).unwrap();
    assert_eq!(no_text.text, None);

    let resp = CreateConversationResponse {
        conversation_id: cid(0x0001_0000_0000_0007),
        visitor_token: "vt_abc".into(),
        state: ConversationState::Queued,
        group: "sales".into(),
        queue_position: Some(2),
    };
    assert_eq!(
        json(&resp),
        r#"{"conversation_id":"c0001000000000007","visitor_token":"vt_abc","state":"queued","group":"sales","queue_position":2}"#
    );
    assert_eq!(
        parse_json::<CreateConversationResponse>(json(&resp).as_bytes(), &L).unwrap(),
        resp
    );
}

#[test]
fn golden_send_and_page() {
    let req: SendMessageRequest =
        parse_json(br#"{"text": "hi", "client_msg_id": "m-1"}"#, &L).unwrap();
    assert_eq!(req.client_msg_id.as_deref(), Some("m-1"));
    assert_eq!(
        json(&SendMessageResponse {
            seq: 5,
            ts: 1700000000000001
        }),
        r#"{"seq":5,"ts":1700000000000001}"#
    );
    let page = MessagesPage {
        messages: vec![
            Entry::Event(EventMessage {
                conversation_id: cid(1),
                seq: 1,
                ts: 10,
                from: None,
                event: Event::Queued {
                    group: "support".into(),
                    queue_position: 1,
                    reason: None,
                },
            }),
            Entry::Message(Message {
                conversation_id: cid(1),
                seq: 2,
                from: Participant::new(Role::Visitor, "v1"),
                text: "hello".into(),
                ts: 11,
                client_msg_id: None,
            }),
        ],
        last_seq: 2,
    };
    let text = json(&page);
    assert_eq!(
        text,
        r#"{"messages":[{"type":"event","conversation_id":"c0000000000000001","seq":1,"ts":10,"event":"queued","group":"support","queue_position":1},{"type":"message","conversation_id":"c0000000000000001","seq":2,"from":{"role":"visitor","id":"v1"},"text":"hello","ts":11}],"last_seq":2}"#
    );
    assert_eq!(
        parse_json::<MessagesPage>(text.as_bytes(), &L).unwrap(),
        page
    );
}

#[test]
fn golden_ws_client_messages() {
    let cases: [(&str, ClientMessage); 4] = [
        (
            r#"{"type": "subscribe", "conversation_id": "c0000000000000001", "after": 7}"#,
            ClientMessage::Subscribe {
                conversation_id: cid(1),
                after: 7,
            },
        ),
        (
            r#"{"type": "send", "conversation_id": "c0000000000000001", "text": "hi", "client_msg_id": "k1"}"#,
            ClientMessage::Send {
                conversation_id: cid(1),
                text: "hi".into(),
                client_msg_id: Some("k1".into()),
            },
        ),
        (
            r#"{"type": "typing", "conversation_id": "c0000000000000001"}"#,
            ClientMessage::Typing {
                conversation_id: cid(1),
            },
        ),
        (
            r#"{"type": "read", "conversation_id": "c0000000000000001", "seq": 4}"#,
            ClientMessage::Read {
                conversation_id: cid(1),
                seq: 4,
            },
        ),
    ];
    for (text, want) in cases {
        assert_eq!(
            parse_json::<ClientMessage>(text.as_bytes(), &L).unwrap(),
            want
        );
        // Written compactly, it reads back the same.
        let back = json(&want);
        assert_eq!(
            parse_json::<ClientMessage>(back.as_bytes(), &L).unwrap(),
            want
        );
    }
    // `after` defaults to 0: replay everything.
    assert_eq!(
        parse_json::<ClientMessage>(
            br#"{"type":"subscribe","conversation_id":"c0000000000000002"}"#,
            &L
        )
        .unwrap(),
        ClientMessage::Subscribe {
            conversation_id: cid(2),
            after: 0
        }
    );
}

#[test]
fn golden_ws_server_messages() {
    let c = "c0000000000000001";
    let cases: Vec<(String, ServerMessage)> = vec![
        (
            format!(
                r#"{{"type":"message","conversation_id":"{c}","seq":3,"from":{{"role":"agent","id":"alice"}},"text":"hello","ts":99}}"#
            ),
            ServerMessage::Message(Message {
                conversation_id: cid(1),
                seq: 3,
                from: Participant::new(Role::Agent, "alice"),
                text: "hello".into(),
                ts: 99,
                client_msg_id: None,
            }),
        ),
        (
            format!(
                r#"{{"type":"event","conversation_id":"{c}","seq":4,"ts":100,"event":"assigned","agent":"alice","group":"sales"}}"#
            ),
            ServerMessage::Event(EventMessage {
                conversation_id: cid(1),
                seq: 4,
                ts: 100,
                from: None,
                event: Event::Assigned {
                    agent: "alice".into(),
                    group: "sales".into(),
                },
            }),
        ),
        (
            format!(
                r#"{{"type":"event","conversation_id":"{c}","seq":5,"ts":101,"from":{{"role":"agent","id":"alice"}},"event":"transferred","from_agent":"alice","to_group":"support"}}"#
            ),
            ServerMessage::Event(EventMessage {
                conversation_id: cid(1),
                seq: 5,
                ts: 101,
                from: Some(Participant::new(Role::Agent, "alice")),
                event: Event::Transferred {
                    from_agent: Some("alice".into()),
                    to: TransferTarget::Group("support".into()),
                },
            }),
        ),
        (
            format!(
                r#"{{"type":"event","conversation_id":"{c}","ts":102,"from":{{"role":"visitor","id":"v1"}},"event":"typing"}}"#
            ),
            ServerMessage::Event(EventMessage {
                conversation_id: cid(1),
                seq: 0,
                ts: 102,
                from: Some(Participant::new(Role::Visitor, "v1")),
                event: Event::Typing,
            }),
        ),
        (
            format!(
                r#"{{"type":"event","conversation_id":"{c}","ts":103,"from":{{"role":"agent","id":"alice"}},"event":"read","seq":3}}"#
            ),
            ServerMessage::Event(EventMessage {
                conversation_id: cid(1),
                seq: 0,
                ts: 103,
                from: Some(Participant::new(Role::Agent, "alice")),
                event: Event::Read { seq: 3 },
            }),
        ),
        (
            format!(
                r#"{{"type":"event","conversation_id":"{c}","seq":9,"ts":104,"from":{{"role":"system","id":"kefu"}},"event":"closed","reason":"idle"}}"#
            ),
            ServerMessage::Event(EventMessage {
                conversation_id: cid(1),
                seq: 9,
                ts: 104,
                from: Some(Participant::new(Role::System, "kefu")),
                event: Event::Closed {
                    reason: "idle".into(),
                },
            }),
        ),
        (
            format!(r#"{{"type":"ack","client_msg_id":"k1","conversation_id":"{c}","seq":6}}"#),
            ServerMessage::Ack(Ack {
                client_msg_id: Some("k1".into()),
                conversation_id: cid(1),
                seq: 6,
            }),
        ),
        (
            r#"{"type":"error","error":"conversation is closed"}"#.to_owned(),
            ServerMessage::Error(WsError {
                error: "conversation is closed".into(),
                conversation_id: None,
                client_msg_id: None,
            }),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(json(&want), text, "serialize {want:?}");
        assert_eq!(
            parse_json::<ServerMessage>(text.as_bytes(), &L).unwrap(),
            want
        );
    }
}

#[test]
fn golden_other_bodies() {
    assert_eq!(
        parse_json::<AgentStatusRequest>(br#"{"status": "offline"}"#, &L).unwrap(),
        AgentStatusRequest {
            status: AgentStatus::Offline
        }
    );
    assert_eq!(
        parse_json::<TransferRequest>(br#"{"to_agent": "bob"}"#, &L).unwrap(),
        TransferRequest::ToAgent("bob".into())
    );
    assert_eq!(
        parse_json::<TransferRequest>(br#"{"to_group": "sales"}"#, &L).unwrap(),
        TransferRequest::ToGroup("sales".into())
    );
    let e = ErrorBody {
        error: "cannot resolve a queued conversation".into(),
        state: Some(ConversationState::Queued),
    };
    assert_eq!(
        json(&e),
        r#"{"error":"cannot resolve a queued conversation","state":"queued"}"#
    );
    assert_eq!(json(&ErrorBody::new("x")), r#"{"error":"x"}"#);
}

#[test]
fn golden_records() {
    let m = MessageRecord {
        tenant: "demo".into(),
        conversation_id: cid(1),
        seq: 2,
        ts: 5,
        from: Participant::new(Role::Visitor, "v1"),
        text: "hi".into(),
        client_msg_id: Some("k".into()),
    };
    let text = json(&m);
    assert_eq!(
        text,
        r#"{"tenant":"demo","conversation_id":"c0000000000000001","seq":2,"ts":5,"from":{"role":"visitor","id":"v1"},"text":"hi","client_msg_id":"k"}"#
    );
    assert_eq!(parse_json::<MessageRecord>(text.as_bytes(), &L).unwrap(), m);
    let mut ws = Vec::new();
    m.write_ws_json(&mut ws);
    assert_eq!(ws, ServerMessage::Message(m.to_message()).to_json_vec());

    let e = EventRecord {
        tenant: "demo".into(),
        conversation_id: cid(1),
        seq: 1,
        ts: 4,
        from: None,
        event: Event::Queued {
            group: "sales".into(),
            queue_position: 3,
            reason: None,
        },
        opened: Some(Opened {
            channel: "web".into(),
            visitor_id: "v1".into(),
            visitor_name: "Ann".into(),
        }),
    };
    let text = json(&e);
    assert_eq!(
        text,
        r#"{"tenant":"demo","conversation_id":"c0000000000000001","seq":1,"ts":4,"event":"queued","group":"sales","queue_position":3,"opened":{"channel":"web","visitor_id":"v1","visitor_name":"Ann"}}"#
    );
    assert_eq!(parse_json::<EventRecord>(text.as_bytes(), &L).unwrap(), e);
    let mut ws = Vec::new();
    e.write_ws_json(&mut ws);
    assert_eq!(ws, ServerMessage::Event(e.to_event_message()).to_json_vec());
}

// ---- rejections ----------------------------------------------------------------------------

#[test]
fn rejects_unknown_fields_everywhere_inbound() {
    let e = err::<SendMessageRequest>(r#"{"text":"hi","extra":1}"#);
    assert!(e.starts_with("unknown field `extra`, expected"), "{e}");
    let e = err::<CreateConversationRequest>(r#"{"visitor":{"name":"a","age":3},"channel":"web"}"#);
    assert!(e.starts_with("field `visitor`: unknown field `age`"), "{e}");
    let e =
        err::<ClientMessage>(r#"{"type":"typing","conversation_id":"c0000000000000001","x":1}"#);
    assert!(e.starts_with("unknown field `x`"), "{e}");
    let e = err::<TransferRequest>(r#"{"to_agent":"a","why":"b"}"#);
    assert!(e.starts_with("unknown field `why`"), "{e}");
    let e = err::<AgentStatusRequest>(r#"{"status":"online","since":0}"#);
    assert!(e.starts_with("unknown field `since`"), "{e}");
    let e = err::<MessageRecord>(
        r#"{"tenant":"t","conversation_id":"c0000000000000001","seq":1,"ts":1,"from":{"role":"agent","id":"a","x":0},"text":"t"}"#,
    );
    assert!(e.starts_with("field `from`: unknown field `x`"), "{e}");
}

#[test]
fn rejects_wrong_types_and_values() {
    assert_eq!(
        err::<SendMessageRequest>(r#"{"text": 5}"#),
        "field `text`: invalid type: integer `5`, expected a string at line 1 column 10"
    );
    let e = err::<AgentStatusRequest>(r#"{"status":"away"}"#);
    assert!(
        e.starts_with("field `status`: unknown variant `away`, expected `online` or `offline`"),
        "{e}"
    );
    let e =
        err::<ClientMessage>(r#"{"type":"read","conversation_id":"c0000000000000001","seq":-1}"#);
    assert!(
        e.starts_with("field `seq`: invalid value: integer `-1`"),
        "{e}"
    );
    assert_eq!(
        err::<SendMessageRequest>(r#"{"text": "a"#),
        "truncated JSON at line 1 column 11"
    );
    assert_eq!(
        err::<SendMessageRequest>(r#"{"text": "a"} x"#),
        "malformed JSON at line 1 column 15: trailing characters"
    );
    // serde's derive would take an array of field values for a struct; the API is objects only.
    assert_eq!(
        err::<SendMessageRequest>(r#"["hi"]"#),
        "invalid type: sequence, expected a JSON object at line 1 column 0"
    );
    assert_eq!(
        err::<CreateConversationRequest>(r#"{"visitor":["Ann"],"channel":"web"}"#),
        "field `visitor`: invalid type: sequence, expected a JSON object at line 1 column 11"
    );
    assert_eq!(
        err::<ClientMessage>(r#"{"type":"read","conversation_id":"c0000000000000001","seq":1.5}"#),
        "field `seq`: invalid type: floating point `1.5`, expected u64 at line 1 column 62"
    );
}

#[test]
fn rejects_fields_a_type_does_not_carry() {
    assert_eq!(
        err::<ClientMessage>(r#"{"type":"send","conversation_id":"c0000000000000001"}"#),
        "`send` message: missing field `text` at line 1 column 53"
    );
    assert_eq!(
        err::<ClientMessage>(
            r#"{"type":"typing","conversation_id":"c0000000000000001","after":3}"#
        ),
        "field `after` is not allowed in a `typing` message at line 1 column 65"
    );
    assert_eq!(
        err::<ClientMessage>(r#"{"type":"read","conversation_id":"c0000000000000001"}"#),
        "`read` message: missing field `seq` at line 1 column 53"
    );
    let e = err::<ClientMessage>(r#"{"type":"shout","conversation_id":"c0000000000000001"}"#);
    assert!(
        e.starts_with("field `type`: unknown variant `shout`"),
        "{e}"
    );
    assert_eq!(
        err::<TransferRequest>(r#"{"to_agent":"a","to_group":"b"}"#),
        "give exactly one of `to_agent` and `to_group`, not both at line 1 column 31"
    );
    assert_eq!(
        err::<TransferRequest>("{}"),
        "give exactly one of `to_agent` and `to_group` at line 1 column 2"
    );
    assert_eq!(
        err::<ServerMessage>(
            r#"{"type":"event","conversation_id":"c0000000000000001","seq":1,"ts":1,"event":"assigned","agent":"a"}"#
        ),
        "`assigned` event: missing field `group` at line 1 column 100"
    );
    assert_eq!(
        err::<ServerMessage>(
            r#"{"type":"event","conversation_id":"c0000000000000001","seq":1,"ts":1,"event":"resolved","agent":"a"}"#
        ),
        "field `agent` is not allowed in a `resolved` event at line 1 column 100"
    );
    assert_eq!(
        err::<ServerMessage>(
            r#"{"type":"ack","conversation_id":"c0000000000000001","seq":1,"event":"closed"}"#
        ),
        "field `event` is not allowed in type `ack` at line 1 column 77"
    );
    assert_eq!(
        err::<EventRecord>(
            r#"{"tenant":"t","conversation_id":"c0000000000000001","seq":1,"ts":1,"event":"typing"}"#
        ),
        "event `typing` is ephemeral and is never stored at line 1 column 84"
    );
    assert_eq!(
        err::<EventRecord>(
            r#"{"tenant":"t","conversation_id":"c0000000000000001","seq":1,"ts":1,"event":"resolved","opened":{"channel":"web","visitor_id":"v","visitor_name":"n"}}"#
        ),
        "field `opened` is only allowed in a `queued` event at line 1 column 149"
    );
}

#[test]
fn rejects_oversized_and_empty_values() {
    let big = "x".repeat(70_000);
    assert_eq!(
        err::<SendMessageRequest>(&format!(r#"{{"text":"{big}"}}"#)),
        "field `text`: 70000 bytes exceeds limit 65536"
    );
    assert_eq!(
        err::<SendMessageRequest>(r#"{"text":""}"#),
        "field `text`: must not be empty"
    );
    let long_id = "k".repeat(65);
    assert_eq!(
        err::<SendMessageRequest>(&format!(r#"{{"text":"a","client_msg_id":"{long_id}"}}"#)),
        "field `client_msg_id`: 65 bytes exceeds limit 64"
    );
    assert_eq!(
        err::<SendMessageRequest>(r#"{"text":"a","client_msg_id":"a b"}"#),
        "field `client_msg_id`: must be printable ASCII without spaces"
    );
    let long_name = "n".repeat(129);
    assert_eq!(
        err::<CreateConversationRequest>(&format!(
            r#"{{"visitor":{{"name":"{long_name}"}},"channel":"web"}}"#
        )),
        "field `visitor.name`: 129 bytes exceeds limit 128"
    );
    assert_eq!(
        err::<CreateConversationRequest>(r#"{"visitor":{"name":"a\u0007"},"channel":"web"}"#),
        "field `visitor.name`: must not contain control characters"
    );
    assert_eq!(
        err::<CreateConversationRequest>(r#"{"visitor":{"name":"a"},"channel":"Web Chat"}"#),
        "field `channel`: must be lowercase ASCII letters, digits, `-` or `_`"
    );
    // Limits come from the caller.
    let tight = ModelLimits {
        text_bytes_max: 3,
        ..L
    };
    assert_eq!(
        parse_json::<ClientMessage>(
            br#"{"type":"send","conversation_id":"c0000000000000001","text":"abcd"}"#,
            &tight
        )
        .unwrap_err(),
        ModelError::TooLong {
            field: "text",
            len: 4,
            max: 3
        }
    );
}

// ---- state machine -------------------------------------------------------------------------

#[test]
fn state_machine_follows_the_api() {
    use ConversationState as S;
    let queued = Event::Queued {
        group: "g".into(),
        queue_position: 1,
        reason: None,
    };
    let assigned = Event::Assigned {
        agent: "a".into(),
        group: "g".into(),
    };
    let closed = Event::Closed {
        reason: "idle".into(),
    };
    let mut s = None;
    for (ev, want) in [
        (&queued, S::Queued),
        (&assigned, S::Assigned),
        (&Event::Typing, S::Assigned),
        (&Event::Resolved, S::Resolved),
        (&Event::Reopened, S::Queued),
        (&queued, S::Queued),
        (&assigned, S::Assigned),
        (&closed, S::Closed),
    ] {
        s = Some(apply_event(s, ev).unwrap());
        assert_eq!(s, Some(want));
    }
    assert_eq!(
        apply_event(Some(S::Queued), &Event::Resolved)
            .unwrap_err()
            .to_string(),
        "event `resolved` is not allowed in state `queued`"
    );
    assert!(apply_event(Some(S::Closed), &Event::Reopened).is_err());
    assert!(apply_event(None, &assigned).is_err());
    assert!(apply_event(Some(S::Closed), &Event::Typing).is_err());
}

// ---- properties ----------------------------------------------------------------------------

fn arb_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.\u{4e00}-\u{4e10}-]{1,20}"
}

fn arb_text() -> impl Strategy<Value = String> {
    // Quotes, backslashes, control characters and non-ASCII exercise the escaping.
    prop_oneof![
        "[a-z]{1,10}",
        ".{1,40}",
        "[\"\\\\\n\t\u{0}\u{1f}\u{7f}\u{1F600}é]{1,10}",
    ]
}

fn arb_participant() -> impl Strategy<Value = Participant> {
    (
        prop_oneof![Just(Role::Visitor), Just(Role::Agent), Just(Role::System)],
        arb_name(),
    )
        .prop_map(|(role, id)| Participant { role, id })
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (arb_name(), any::<u32>(), proptest::option::of(arb_name())).prop_map(
            |(group, queue_position, reason)| Event::Queued {
                group,
                queue_position,
                reason
            }
        ),
        (arb_name(), arb_name()).prop_map(|(agent, group)| Event::Assigned { agent, group }),
        (proptest::option::of(arb_name()), arb_name(), any::<bool>()).prop_map(
            |(from_agent, to, agent)| Event::Transferred {
                from_agent,
                to: if agent {
                    TransferTarget::Agent(to)
                } else {
                    TransferTarget::Group(to)
                }
            }
        ),
        Just(Event::Resolved),
        Just(Event::Reopened),
        arb_name().prop_map(|reason| Event::Closed { reason }),
        Just(Event::Typing),
        any::<u64>().prop_map(|seq| Event::Read { seq }),
    ]
}

fn arb_server() -> impl Strategy<Value = ServerMessage> {
    let id = any::<u64>().prop_map(ConversationId);
    let cmid = proptest::option::of("[!-~]{1,64}");
    prop_oneof![
        (
            id.clone(),
            any::<u64>(),
            arb_participant(),
            arb_text(),
            any::<u64>(),
            cmid.clone()
        )
            .prop_map(|(conversation_id, seq, from, text, ts, client_msg_id)| {
                ServerMessage::Message(Message {
                    conversation_id,
                    seq,
                    from,
                    text,
                    ts,
                    client_msg_id,
                })
            }),
        (
            id.clone(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(arb_participant()),
            arb_event()
        )
            .prop_map(|(conversation_id, seq, ts, from, event)| {
                ServerMessage::Event(EventMessage {
                    conversation_id,
                    // Ephemeral events carry no seq of their own.
                    seq: if event.kind().is_ephemeral() { 0 } else { seq },
                    ts,
                    from,
                    event,
                })
            }),
        (cmid.clone(), id.clone(), any::<u64>()).prop_map(
            |(client_msg_id, conversation_id, seq)| {
                ServerMessage::Ack(Ack {
                    client_msg_id,
                    conversation_id,
                    seq,
                })
            }
        ),
        (arb_text(), proptest::option::of(id), cmid).prop_map(
            |(error, conversation_id, client_msg_id)| ServerMessage::Error(WsError {
                error,
                conversation_id,
                client_msg_id
            })
        ),
    ]
}

fn arb_client() -> impl Strategy<Value = ClientMessage> {
    let id = any::<u64>().prop_map(ConversationId);
    prop_oneof![
        (id.clone(), any::<u64>()).prop_map(|(conversation_id, after)| {
            ClientMessage::Subscribe {
                conversation_id,
                after,
            }
        }),
        (id.clone(), arb_text(), proptest::option::of("[!-~]{1,64}")).prop_map(
            |(conversation_id, text, client_msg_id)| ClientMessage::Send {
                conversation_id,
                text,
                client_msg_id
            }
        ),
        id.clone()
            .prop_map(|conversation_id| ClientMessage::Typing { conversation_id }),
        (id, any::<u64>()).prop_map(|(conversation_id, seq)| ClientMessage::Read {
            conversation_id,
            seq
        }),
    ]
}

proptest! {
    #[test]
    fn id_roundtrips(v in any::<u64>()) {
        let id = ConversationId(v);
        prop_assert_eq!(ConversationId::parse(&id.to_string()), Ok(id));
        prop_assert_eq!(id.shard(), (v >> 48) as u16);
    }

    #[test]
    fn client_messages_roundtrip(m in arb_client()) {
        let back: ClientMessage = parse_json(&m.to_json_vec(), &L).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn server_messages_roundtrip(m in arb_server()) {
        let back: ServerMessage = parse_json(&m.to_json_vec(), &L).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn event_records_roundtrip(
        tenant in arb_name(),
        v in any::<u64>(),
        seq in 1..u64::MAX,
        ts in any::<u64>(),
        from in proptest::option::of(arb_participant()),
        event in arb_event().prop_filter("stored", |e| !e.kind().is_ephemeral()),
    ) {
        let r = EventRecord { tenant, conversation_id: ConversationId(v), seq, ts, from, event, opened: None };
        let back: EventRecord = parse_json(&r.to_json_vec(), &L).unwrap();
        prop_assert_eq!(back, r);
    }

    #[test]
    fn message_records_roundtrip(
        tenant in arb_name(),
        v in any::<u64>(),
        seq in 1..u64::MAX,
        ts in any::<u64>(),
        from in arb_participant(),
        text in arb_text(),
    ) {
        let r = MessageRecord { tenant, conversation_id: ConversationId(v), seq, ts, from, text, client_msg_id: None };
        let back: MessageRecord = parse_json(&r.to_json_vec(), &L).unwrap();
        prop_assert_eq!(back, r);
    }

    /// The borrowed form the send path writes is byte for byte the owned record, stored and
    /// WebSocket form alike.
    #[test]
    fn borrowed_message_records_write_the_same_bytes(
        tenant in arb_name(),
        v in any::<u64>(),
        seq in 1..u64::MAX,
        ts in any::<u64>(),
        from in arb_participant(),
        text in arb_text(),
        client_msg_id in proptest::option::of("[a-zA-Z0-9_-]{1,16}"),
    ) {
        let r = MessageRecord { tenant, conversation_id: ConversationId(v), seq, ts, from, text, client_msg_id };
        let b = r.as_borrowed();
        prop_assert_eq!(b.to_json_vec(), r.to_json_vec());
        let (mut owned, mut borrowed) = (Vec::new(), Vec::new());
        r.write_ws_json(&mut owned);
        b.write_ws_json(&mut borrowed);
        prop_assert_eq!(borrowed, owned);
    }

    /// The borrowed parses of the send paths agree with the owned ones on any input: the same
    /// value, or the same explanation.
    #[test]
    fn borrowed_parses_agree_with_owned_on_any_json(
        text in proptest::option::of(arb_text()),
        id in proptest::option::of(proptest::option::of("[a-z\\\\\"0-9-]{0,12}")),
        extra in proptest::option::of("[a-z_]{1,8}"),
        ty in proptest::sample::select(vec!["send", "typing", "subscribe", "read", "x"]),
    ) {
        let mut fields = Vec::new();
        if let Some(t) = &text {
            fields.push(format!("\"text\":{}", serde_json::to_string(t).unwrap()));
        }
        match &id {
            Some(Some(i)) => fields.push(format!("\"client_msg_id\":\"{i}\"")),
            Some(None) => fields.push("\"client_msg_id\":null".to_owned()),
            None => {}
        }
        if let Some(x) = &extra {
            fields.push(format!("\"{x}\":1"));
        }
        let body = format!("{{{}}}", fields.join(","));
        let owned = parse_json::<SendMessageRequest>(body.as_bytes(), &L);
        let borrowed =
            parse_json_borrowed::<SendMessageRequestRef<'_>, SendMessageRequest>(body.as_bytes(), &L);
        match (&owned, &borrowed) {
            (Ok(o), Ok(b)) => {
                prop_assert_eq!(&o.text, &b.text);
                prop_assert_eq!(o.client_msg_id.as_deref(), b.client_msg_id.as_deref());
            }
            (Err(o), Err(b)) => prop_assert_eq!(o.to_string(), b.to_string()),
            _ => prop_assert!(false, "{}: owned {:?}, borrowed {:?}", body, owned, borrowed),
        }
        fields.push(format!("\"type\":\"{ty}\",\"conversation_id\":\"c0000000000000001\""));
        let msg = format!("{{{}}}", fields.join(","));
        let owned = parse_json::<ClientMessage>(msg.as_bytes(), &L);
        let borrowed = parse_json_borrowed::<ClientMessageRef<'_>, ClientMessage>(msg.as_bytes(), &L);
        match (&owned, borrowed) {
            (Ok(o), Ok(b)) => prop_assert_eq!(o, &b.into_owned()),
            (Err(o), Err(b)) => prop_assert_eq!(o.to_string(), b.to_string()),
            (_, b) => prop_assert!(false, "{}: owned {:?}, borrowed {:?}", msg, owned, b),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_json::<ClientMessage>(&bytes, &L);
        let _ = parse_json::<ServerMessage>(&bytes, &L);
        let _ = parse_json::<CreateConversationRequest>(&bytes, &L);
        let _ = parse_json::<EventRecord>(&bytes, &L);
        let _ = parse_json::<MessagesPage>(&bytes, &L);
    }
}

/// The send path parses borrowed (`SendMessageRequestRef`): it must accept, refuse and explain
/// exactly like the owned `SendMessageRequest`, and borrow unless the text has escapes.
#[test]
fn borrowed_send_request_parses_like_the_owned_one() {
    let long = format!(r#"{{"text":"{}"}}"#, "a".repeat(L.text_bytes_max + 1));
    let bodies = [
        r#"{"text":"hello"}"#,
        r#"{"text":"caf\u00e9 \"q\"","client_msg_id":"k-1"}"#,
        r#"{"text":"hi","extra":1}"#,
        r#"{"text": 5}"#,
        r#"{"text": "a"#,
        r#"{"text": "a"} x"#,
        r#"["hi","k1"]"#,
        r#"{"text":""}"#,
        r#"{"text":"hi","client_msg_id":""}"#,
        r#"{}"#,
        &long,
    ];
    for body in bodies {
        let owned = parse_json::<SendMessageRequest>(body.as_bytes(), &L);
        let borrowed = parse_json_borrowed::<SendMessageRequestRef<'_>, SendMessageRequest>(
            body.as_bytes(),
            &L,
        );
        match (&owned, &borrowed) {
            (Ok(o), Ok(b)) => {
                assert_eq!(o.text, b.text, "{body}");
                assert_eq!(
                    o.client_msg_id.as_deref(),
                    b.client_msg_id.as_deref(),
                    "{body}"
                );
            }
            (Err(o), Err(b)) => assert_eq!(o.to_string(), b.to_string(), "{body}"),
            _ => panic!("{body}: owned {owned:?}, borrowed {borrowed:?}"),
        }
    }
    let plain = parse_json_borrowed::<SendMessageRequestRef<'_>, SendMessageRequest>(
        br#"{"text":"hello","client_msg_id":"k-1"}"#,
        &L,
    )
    .unwrap();
    assert!(matches!(plain.text, std::borrow::Cow::Borrowed("hello")));
    assert!(matches!(
        plain.client_msg_id,
        Some(std::borrow::Cow::Borrowed("k-1"))
    ));
}

/// A WebSocket session parses borrowed (`ClientMessageRef`): it must accept, refuse and
/// explain exactly like the owned `ClientMessage`, and a send's strings are borrowed unless
/// they hold escapes.
#[test]
fn borrowed_client_message_parses_like_the_owned_one() {
    let long = format!(
        r#"{{"type":"send","conversation_id":"c0000000000000001","text":"{}"}}"#,
        "a".repeat(L.text_bytes_max + 1)
    );
    let bodies = [
        r#"{"type":"send","conversation_id":"c0000000000000001","text":"hello"}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001","text":"caf\u00e9","client_msg_id":"k\n1"}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001","text":"hi","client_msg_id":null}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001","text":null}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001"}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001","text":5}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001","text":"hi","client_msg_id":""}"#,
        r#"{"type":"send","conversation_id":"c0000000000000001","text":"hi","extra":1}"#,
        r#"{"type":"typing","conversation_id":"c0000000000000001","text":"hi"}"#,
        r#"{"type":"subscribe","conversation_id":"c0000000000000001","after":3}"#,
        r#"{"type":"read","conversation_id":"c0000000000000001","seq":2}"#,
        r#"{"type":"shout","conversation_id":"c0000000000000001"}"#,
        r#"{"type":"send","conversation_id":"c1","text":"hi"}"#,
        r#"{"type":"send","#,
        &long,
    ];
    for body in bodies {
        let owned = parse_json::<ClientMessage>(body.as_bytes(), &L);
        let borrowed =
            parse_json_borrowed::<ClientMessageRef<'_>, ClientMessage>(body.as_bytes(), &L);
        match (&owned, borrowed) {
            (Ok(o), Ok(b)) => assert_eq!(o, &b.into_owned(), "{body}"),
            (Err(o), Err(b)) => assert_eq!(o.to_string(), b.to_string(), "{body}"),
            (_, b) => panic!("{body}: owned {owned:?}, borrowed {b:?}"),
        }
    }
    let plain = parse_json_borrowed::<ClientMessageRef<'_>, ClientMessage>(
        br#"{"type":"send","conversation_id":"c0000000000000001","text":"hello","client_msg_id":"k-1"}"#,
        &L,
    )
    .unwrap();
    let ClientMessageRef::Send {
        text,
        client_msg_id,
        ..
    } = plain
    else {
        panic!("not a send: {plain:?}");
    };
    assert!(matches!(text, std::borrow::Cow::Borrowed("hello")));
    assert!(matches!(
        client_msg_id,
        Some(std::borrow::Cow::Borrowed("k-1"))
    ));
}
