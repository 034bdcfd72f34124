//! Engine tests against an in-memory log: seqs, idempotency, transitions, replay at the live edge, recovery.

use super::*;

/// An in-memory log: frames in append order.
#[derive(Default)]
pub(crate) struct MemLog {
    pub frames: Vec<(Header, Vec<u8>)>,
}

impl RecordLog for MemLog {
    fn append(&mut self, header: &Header, payload: &[u8]) -> Result<u64, String> {
        let mut h = *header;
        h.log_offset = self.frames.len() as u64;
        h.payload_len = payload.len() as u32;
        self.frames.push((h, payload.to_vec()));
        Ok(h.log_offset)
    }

    fn read_conversation(
        &mut self,
        conv: u64,
        after_seq: u64,
        limit: usize,
        each: &mut dyn FnMut(&Header, &[u8]),
    ) -> Result<(), String> {
        for (h, p) in self
            .frames
            .iter()
            .filter(|(h, _)| h.conversation_id == conv && h.seq > after_seq)
            .take(limit)
        {
            each(h, p);
        }
        Ok(())
    }
}

/// The embedded demo tenant (alice: sales+support, bob: support, carol: sales) with test
/// tokens, a generous rate limit and capacity 2.
fn registry() -> Arc<TenantRegistry> {
    registry_with_rate(1000, 1000)
}

/// [`registry`] with the visitor rate limit `messages_per_s` and `burst`.
fn registry_with_rate(messages_per_s: u32, burst: u32) -> Arc<TenantRegistry> {
    use crate::tenant::{Secret, Tenant, demo_tenant_config, load_intents};
    let mut config = demo_tenant_config();
    for (i, a) in config.agent.iter_mut().enumerate() {
        a.token = Some(Secret::new(format!("test-agent-token-{i:04}")));
        a.capacity = 2;
    }
    for (i, n) in config.integration.iter_mut().enumerate() {
        n.token = Some(Secret::new(format!("test-integration-token-{i:04}")));
    }
    config.visitor_rate_limit.messages_per_s = messages_per_s;
    config.visitor_rate_limit.burst = burst;
    config.auto_close_idle_ms = 1000;
    let intents = load_intents(&config, "tenant[0]", std::path::Path::new(".")).unwrap();
    let key = crate::auth::VisitorKey::from_bytes([7; 32]);
    Arc::new(TenantRegistry::new(vec![Tenant::new(config, key, intents)], None).unwrap())
}

fn engine(shard: u16) -> Engine {
    engine_with_keys(shard, 4, 1_000)
}

fn engine_with_keys(shard: u16, per_conversation: usize, per_shard: usize) -> Engine {
    engine_with(shard, per_conversation, per_shard, registry())
}

fn engine_with(
    shard: u16,
    per_conversation: usize,
    per_shard: usize,
    registry: Arc<TenantRegistry>,
) -> Engine {
    Engine::new(
        shard,
        EngineLimits {
            conversations_max: 100,
            idempotency_keys_per_conversation_max: per_conversation,
            idempotency_keys_per_shard_max: per_shard,
            history_limit_max: 100,
            subscribers_per_conversation_max: 8,
            model: ModelLimits::DEFAULT,
        },
        registry,
        RouterLimits::DEMO,
    )
    .unwrap()
}

fn agent(name: &str) -> Actor {
    Actor::Agent {
        tenant: 0,
        name: name.into(),
    }
}

#[test]
fn create_send_idempotent_and_dense() {
    let mut log = MemLog::default();
    let mut e = engine(3);
    let c = e
        .create(
            &mut log,
            0,
            "Ann",
            "web",
            Some("how much is the pro plan"),
            None,
            10,
        )
        .unwrap();
    assert_eq!(c.conversation_id >> 48, 3);
    assert_eq!(c.group, "sales");
    assert_eq!(c.state, ConversationState::Queued);
    assert_eq!(c.queue_position, Some(1));
    assert_eq!(c.first_message_seq, Some(2));
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: c.conversation_id,
    };
    let s = e
        .send(&mut log, c.conversation_id, &visitor, "hi", Some("k1"), 11)
        .unwrap();
    assert_eq!((s.seq, s.duplicate), (3, false));
    let again = e
        .send(&mut log, c.conversation_id, &visitor, "hi", Some("k1"), 12)
        .unwrap();
    assert_eq!((again.seq, again.ts, again.duplicate), (3, 11, true));
    assert_eq!(log.frames.len(), 3);
    let seqs: Vec<u64> = log.frames.iter().map(|(h, _)| h.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    // Not durable yet: nothing visible.
    assert_eq!(e.view(c.conversation_id, &visitor).unwrap().last_seq, 0);
    e.release(u64::MAX);
    assert_eq!(e.view(c.conversation_id, &visitor).unwrap().last_seq, 3);
}

#[test]
fn transitions_and_conflicts() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let c = e
        .create(
            &mut log,
            0,
            "Ann",
            "web",
            Some("my order never arrived"),
            Some("support"),
            1,
        )
        .unwrap();
    let id = c.conversation_id;
    let err = e
        .transition(&mut log, id, "alice", 0, &Transition::Resolve, 2)
        .unwrap_err();
    assert_eq!(err.status(), 409);
    let state = e
        .transition(&mut log, id, "bob", 0, &Transition::Accept, 3)
        .unwrap();
    assert_eq!(state, ConversationState::Assigned);
    let err = e
        .transition(&mut log, id, "alice", 0, &Transition::Accept, 4)
        .unwrap_err();
    assert_eq!(err.status(), 409);
    // Alice may not write into Bob's conversation.
    let err = e
        .send(&mut log, id, &agent("alice"), "x", None, 5)
        .unwrap_err();
    assert_eq!(err.status(), 403);
    e.send(&mut log, id, &agent("bob"), "hello", None, 6)
        .unwrap();
    let state = e
        .transition(&mut log, id, "bob", 0, &Transition::Resolve, 7)
        .unwrap();
    assert_eq!(state, ConversationState::Resolved);
    // The visitor writing again reopens it.
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    e.send(&mut log, id, &visitor, "one more thing", None, 8)
        .unwrap();
    // Bob is online (accepting took him online) and has room: it goes straight back to him.
    assert_eq!(e.state(id).unwrap().0, ConversationState::Assigned);
    let kinds: Vec<String> = log
        .frames
        .iter()
        .filter(|(h, _)| h.kind == Kind::Event)
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        kinds.iter().any(|p| p.contains("\"reopened\"")),
        "{kinds:?}"
    );
    let other = Actor::Visitor {
        tenant: 0,
        conversation_id: id + 1,
    };
    assert_eq!(
        e.send(&mut log, id, &other, "x", None, 9)
            .unwrap_err()
            .status(),
        403
    );
    assert_eq!(
        e.send(&mut log, id + 1, &other, "x", None, 9)
            .unwrap_err()
            .status(),
        404
    );
}

#[test]
fn online_agent_gets_assigned_and_offline_requeues() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    e.agent_status(&mut log, 0, "bob", true, 1).unwrap();
    let c = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 2)
        .unwrap();
    assert_eq!(c.state, ConversationState::Assigned);
    assert_eq!(
        e.view(c.conversation_id, &agent("bob"))
            .unwrap()
            .agent
            .as_deref(),
        Some("bob")
    );
    e.agent_status(&mut log, 0, "bob", false, 3).unwrap();
    assert_eq!(
        e.state(c.conversation_id).unwrap().0,
        ConversationState::Queued
    );
}

#[test]
fn replay_reaches_live_edge_without_gap_or_duplicate() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let c = e.create(&mut log, 0, "Ann", "web", None, None, 1).unwrap();
    let id = c.conversation_id;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    for i in 0..5 {
        e.send(&mut log, id, &visitor, &format!("m{i}"), None, 2 + i)
            .unwrap();
    }
    e.release(u64::MAX);
    // An unreleased record must not show up in the replay nor be lost for the subscriber.
    e.send(&mut log, id, &visitor, "late", None, 20).unwrap();
    let outbox = Outbox::new(16);
    let small = e
        .replay(&mut log, id, &visitor, 2, 2, Some(outbox.clone()))
        .unwrap();
    assert_eq!(
        small.entries.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [3, 4]
    );
    assert!(!small.registered);
    let rest = e
        .replay(&mut log, id, &visitor, 4, 100, Some(outbox.clone()))
        .unwrap();
    assert_eq!(
        rest.entries.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [5, 6]
    );
    assert!(rest.registered);
    e.release(u64::MAX);
    assert_eq!(outbox.pop().unwrap().seq, 7);
    assert!(outbox.pop().is_none());
}

#[test]
fn a_record_appended_before_anyone_followed_reaches_a_later_subscriber_whole() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let c = e.create(&mut log, 0, "Ann", "web", None, None, 1).unwrap();
    let id = c.conversation_id;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    e.release(u64::MAX);
    // Nobody follows: the delivery is queued without its JSON form.
    e.send(&mut log, id, &visitor, "before \"anyone\"", Some("k1"), 2)
        .unwrap();
    let outbox = Outbox::new(16);
    assert!(
        e.replay(&mut log, id, &visitor, 1, 10, Some(outbox.clone()))
            .unwrap()
            .registered
    );
    // Followed now: rendered at append.
    e.send(&mut log, id, &visitor, "after", None, 3).unwrap();
    e.release(u64::MAX);
    let late = outbox.pop().unwrap();
    let live = outbox.pop().unwrap();
    assert!(outbox.pop().is_none());
    assert_eq!((late.seq, live.seq), (2, 3));
    // Both forms equal what a replay from the log renders, for both paths.
    let replayed = e.replay(&mut log, id, &visitor, 1, 10, None).unwrap();
    assert_eq!(replayed.entries.len(), 2);
    for (got, want) in [&late, &live].into_iter().zip(&replayed.entries) {
        assert_eq!(got.json, want.json, "seq {}", got.seq);
        assert_eq!(got.frame, want.frame, "seq {}", got.seq);
    }
    let json: serde_json::Value = serde_json::from_slice(&late.json).unwrap();
    assert_eq!(json["text"], "before \"anyone\"");
    assert_eq!(json["client_msg_id"], "k1");
}

#[test]
fn slow_subscriber_overflows_instead_of_blocking() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let c = e.create(&mut log, 0, "Ann", "web", None, None, 1).unwrap();
    let id = c.conversation_id;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    e.release(u64::MAX);
    let outbox = Outbox::new(4);
    assert!(
        e.replay(&mut log, id, &visitor, 1, 10, Some(outbox.clone()))
            .unwrap()
            .registered
    );
    for i in 0..6 {
        e.send(&mut log, id, &visitor, "x", None, 2 + i).unwrap();
    }
    e.release(u64::MAX);
    assert!(outbox.is_overflowed());
}

#[test]
fn recovery_rebuilds_state_seqs_and_keys() {
    let mut log = MemLog::default();
    let mut e = engine(1);
    let a = e
        .create(
            &mut log,
            0,
            "Ann",
            "web",
            Some("refund please"),
            Some("support"),
            1,
        )
        .unwrap()
        .conversation_id;
    let b = e
        .create(&mut log, 0, "Bo", "app", None, Some("sales"), 2)
        .unwrap()
        .conversation_id;
    let va = Actor::Visitor {
        tenant: 0,
        conversation_id: a,
    };
    e.send(&mut log, a, &va, "x", Some("key-1"), 3).unwrap();
    e.transition(&mut log, b, "alice", 0, &Transition::Accept, 4)
        .unwrap();
    e.release(u64::MAX);

    let mut r = engine(1);
    for (h, p) in &log.frames {
        r.recover_record(h, p).unwrap();
    }
    r.finish_recovery(5);
    assert_eq!(r.state(a), Some((ConversationState::Queued, 3)));
    assert_eq!(r.state(b), Some((ConversationState::Assigned, 2)));
    let again = r.send(&mut log, a, &va, "x", Some("key-1"), 6).unwrap();
    assert_eq!((again.seq, again.duplicate), (3, true));
    let c = r.create(&mut log, 0, "Cy", "web", None, None, 7).unwrap();
    assert!(c.conversation_id > b, "ids are not reused after recovery");
    // Alice is in her grace period: she keeps b, is offered nothing new.
    assert!(matches!(r.placement(b), Some(Placement::Assigned { .. })));
}

#[test]
fn auto_reply_rate_limit_and_idle_close() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let c = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1_000)
        .unwrap();
    let id = c.conversation_id;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    // A keyword of the demo tenant's auto-replies answers with a system message.
    let sent = e
        .send(
            &mut log,
            id,
            &visitor,
            "what are your opening hours?",
            None,
            2_000,
        )
        .unwrap();
    let (h, p) = log.frames.last().unwrap();
    assert_eq!(h.seq, sent.seq + 1);
    assert!(String::from_utf8_lossy(p).contains("\"role\":\"system\""));
    // Rate limit: a burst beyond the tenant's bucket answers 429.
    let mut limited = None;
    for i in 0..5000u64 {
        if let Err(err) = e.send(&mut log, id, &visitor, "x", None, 3_000 + i) {
            limited = Some(err);
            break;
        }
    }
    assert_eq!(limited.map(|e| e.status()), Some(429));
    // Resolved and idle for auto_close_idle_ms (1 s in this registry): closed.
    e.transition(&mut log, id, "bob", 0, &Transition::Accept, 10_000)
        .unwrap();
    e.transition(&mut log, id, "bob", 0, &Transition::Resolve, 20_000)
        .unwrap();
    e.tick(&mut log, 20 + 500);
    assert_eq!(e.state(id).unwrap().0, ConversationState::Resolved);
    e.tick(&mut log, 20 + 1000);
    assert_eq!(e.state(id).unwrap().0, ConversationState::Closed);
    let err = e
        .send(&mut log, id, &visitor, "hello?", None, 2_000_000)
        .unwrap_err();
    assert_eq!(err.status(), 409);
}

/// The stored event records of `id`, as JSON values, in seq order.
fn stored_events(log: &MemLog, id: u64) -> Vec<serde_json::Value> {
    log.frames
        .iter()
        .filter(|(h, _)| h.conversation_id == id && h.kind == Kind::Event)
        .map(|(_, p)| serde_json::from_slice(p).unwrap())
        .collect()
}

#[test]
fn canned_replies_expand_and_accept_names_its_agent() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let id = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1)
        .unwrap()
        .conversation_id;
    e.transition(&mut log, id, "bob", 0, &Transition::Accept, 2)
        .unwrap();
    let assigned = stored_events(&log, id).pop().unwrap();
    assert_eq!(assigned["event"], "assigned", "{assigned}");
    assert_eq!(assigned["from"]["id"], "bob", "audit: who accepted");
    e.send(&mut log, id, &agent("bob"), "/greeting", None, 3)
        .unwrap();
    e.send(&mut log, id, &agent("bob"), "/unknown", None, 4)
        .unwrap();
    let texts: Vec<String> = log
        .frames
        .iter()
        .filter(|(h, _)| h.kind == Kind::Message)
        .map(|(_, p)| {
            let m: MessageRecord = serde_json::from_slice(p).unwrap();
            m.text
        })
        .collect();
    let greeting = e.registry.tenants()[0]
        .canned_replies
        .get("greeting")
        .unwrap()
        .to_owned();
    assert_eq!(texts, [greeting, "/unknown".to_owned()]);
    // A visitor's `/greeting` is sent as written.
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    e.send(&mut log, id, &visitor, "/greeting", None, 5)
        .unwrap();
    let (_, p) = log.frames.last().unwrap();
    assert!(String::from_utf8_lossy(p).contains("\"/greeting\""));
}

#[test]
fn queue_position_changes_reach_subscribers_live_and_are_not_stored() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            e.create(&mut log, 0, "Ann", "web", None, Some("support"), 1 + i)
                .unwrap()
                .conversation_id
        })
        .collect();
    e.release(u64::MAX);
    let third = ids[2];
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: third,
    };
    let outbox = Outbox::new(16);
    let last = e.state(third).unwrap().1;
    assert!(
        e.replay(&mut log, third, &visitor, last, 10, Some(outbox.clone()))
            .unwrap()
            .registered
    );
    assert_eq!(e.view(third, &visitor).unwrap().queue_position, Some(3));
    let stored_before = log.frames.len();
    e.transition(&mut log, ids[0], "bob", 0, &Transition::Accept, 10)
        .unwrap();
    e.release(u64::MAX);
    let notice = outbox.pop().expect("a position notice");
    assert_eq!(notice.seq, 0);
    let v: serde_json::Value = serde_json::from_slice(&notice.json).unwrap();
    assert_eq!(v["event"], "queued", "{v}");
    assert_eq!(v["queue_position"], 2, "{v}");
    assert!(outbox.pop().is_none());
    // Only conv 1's `assigned` was stored.
    assert_eq!(log.frames.len(), stored_before + 1);
    assert_eq!(e.view(third, &visitor).unwrap().queue_position, Some(2));
}

#[test]
fn a_dropped_agent_socket_requeues_after_the_grace_period_only() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let grace_ms = e.registry.tenants()[0].config.agent_socket_grace_ms;
    assert!(grace_ms > 0);
    let socket = Outbox::new(16);
    e.agent_inbox(0, "bob", socket.clone());
    e.agent_status(&mut log, 0, "bob", true, 1_000).unwrap();
    let ids: Vec<u64> = (0..2)
        .map(|i| {
            e.create(&mut log, 0, "Ann", "web", None, Some("support"), 2_000 + i)
                .unwrap()
                .conversation_id
        })
        .collect();
    for id in &ids {
        assert_eq!(e.state(*id).unwrap().0, ConversationState::Assigned);
    }
    // A socket that closes and comes back within the grace period changes nothing.
    socket.close();
    e.tick(&mut log, 10);
    let back = Outbox::new(16);
    e.agent_inbox(0, "bob", back.clone());
    e.tick(&mut log, 10 + grace_ms * 2);
    for id in &ids {
        assert_eq!(e.state(*id).unwrap().0, ConversationState::Assigned);
    }
    // Gone for good: queued again after the grace period, in their original order.
    back.close();
    let lost_at = 20 + grace_ms * 2;
    e.tick(&mut log, lost_at);
    e.tick(&mut log, lost_at + grace_ms - 1);
    assert_eq!(e.state(ids[0]).unwrap().0, ConversationState::Assigned);
    e.tick(&mut log, lost_at + grace_ms);
    let integration = Actor::Integration { tenant: 0 };
    for (i, id) in ids.iter().enumerate() {
        let v = e.view(*id, &integration).unwrap();
        assert_eq!(v.state, ConversationState::Queued);
        assert_eq!(v.queue_position, Some(i as u32 + 1));
        let last = stored_events(&log, *id).pop().unwrap();
        assert_eq!(last["reason"], "agent_offline", "{last}");
    }
}

#[test]
fn recovery_keeps_the_auto_close_deadline() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let id = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1_000)
        .unwrap()
        .conversation_id;
    e.transition(&mut log, id, "bob", 0, &Transition::Accept, 2_000)
        .unwrap();
    e.transition(&mut log, id, "bob", 0, &Transition::Resolve, 3_000_000)
        .unwrap();
    e.release(u64::MAX);
    let mut r = engine(0);
    for (h, p) in &log.frames {
        r.recover_record(h, p).unwrap();
    }
    r.finish_recovery(3_100);
    r.tick(&mut log, 3_999);
    assert_eq!(r.state(id).unwrap().0, ConversationState::Resolved);
    // Resolved at 3000 ms, idle time 1000 ms: closes at 4000 ms, as before the restart.
    r.tick(&mut log, 4_000);
    assert_eq!(r.state(id).unwrap().0, ConversationState::Closed);
    let closed = stored_events(&log, id).pop().unwrap();
    assert_eq!(closed["event"], "closed", "{closed}");
}

#[test]
fn the_conversation_map_never_grows_on_the_way_to_its_limit() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let capacity = e.conversations.capacity();
    assert!(capacity >= e.limits.conversations_max, "{capacity}");
    for i in 0..e.limits.conversations_max as u64 {
        e.create(&mut log, 0, "Ann", "web", None, None, 1 + i)
            .unwrap();
    }
    // No insert on the way rehashed (a doubling copies every conversation at once).
    assert_eq!(e.conversations.capacity(), capacity);
    assert!(matches!(
        e.create(&mut log, 0, "Ann", "web", None, None, 1_000),
        Err(EngineError::Overloaded(_))
    ));
}

/// Sends `key` as visitor of `id` at `ts`: its seq, and whether it was a retry.
fn send_keyed(e: &mut Engine, log: &mut MemLog, id: u64, key: &str, ts: u64) -> (u64, bool) {
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    let s = e.send(log, id, &visitor, "m", Some(key), ts).unwrap();
    e.release(u64::MAX);
    (s.seq, s.duplicate)
}

#[test]
fn idempotency_keys_are_bounded_per_shard_oldest_first_across_conversations() {
    let mut log = MemLog::default();
    // 4 keys per conversation, 6 per shard.
    let mut e = engine_with_keys(0, 4, 6);
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            e.create(&mut log, 0, &format!("v{i}"), "web", None, Some("sales"), 1)
                .unwrap()
                .conversation_id
        })
        .collect();
    let mut ts = 10;
    let mut stored = Vec::new();
    // a0 b0 c0 a1 b1 c1 a2 b2 c2: nine keys, the shard keeps the last six.
    for round in 0..3 {
        for (i, &id) in ids.iter().enumerate() {
            ts += 1;
            let key = format!("{}{round}", ["a", "b", "c"][i]);
            let (seq, dup) = send_keyed(&mut e, &mut log, id, &key, ts);
            assert!(!dup);
            stored.push((id, key, seq));
        }
    }
    assert_eq!(e.idempotency_keys(), (6, 6));
    for (n, (id, key, seq)) in stored.iter().enumerate() {
        ts += 1;
        let (got, dup) = send_keyed(&mut e, &mut log, *id, key, ts);
        if n >= 3 {
            assert_eq!((got, dup), (*seq, true), "{key} is among the last six");
        } else {
            // Forgotten: a retry this late is a new message. It is stored, and its key
            // pushes the next oldest out.
            assert!(!dup, "{key} was forgotten");
            break;
        }
    }
    // Recovery keeps exactly the same keys (the order is log order).
    let (kept, order) = e.idempotency_keys();
    let mut r = engine_with_keys(0, 4, 6);
    for (h, p) in &log.frames {
        r.recover_record(h, p).unwrap();
    }
    r.finish_recovery(ts);
    assert_eq!(r.idempotency_keys(), (kept, order));
}

#[test]
fn a_busy_conversation_cannot_grow_the_shards_key_order() {
    let mut log = MemLog::default();
    // 2 keys per conversation, 8 per shard: one conversation sends 100 keyed messages, so
    // 98 of its keys are dropped by the per-conversation bound.
    let mut e = engine_with_keys(0, 2, 8);
    let quiet = e
        .create(&mut log, 0, "q", "web", None, Some("sales"), 1)
        .unwrap()
        .conversation_id;
    let busy = e
        .create(&mut log, 0, "b", "web", None, Some("sales"), 1)
        .unwrap()
        .conversation_id;
    let (quiet_seq, _) = send_keyed(&mut e, &mut log, quiet, "q-1", 2);
    for i in 0..5 {
        send_keyed(&mut e, &mut log, busy, &format!("b-{i}"), 3 + i);
    }
    // Within the last 8 keyed sends of the shard: still known.
    assert_eq!(
        send_keyed(&mut e, &mut log, quiet, "q-1", 9),
        (quiet_seq, true)
    );
    for i in 5..100 {
        send_keyed(&mut e, &mut log, busy, &format!("b-{i}"), 10 + i);
        let (kept, order) = e.idempotency_keys();
        assert!(order <= 8, "order {order} after {i}");
        assert_eq!(kept, 3, "the quiet key until it ages out, and the busy two");
        if order == 8 {
            break;
        }
    }
    for i in 100..200 {
        send_keyed(&mut e, &mut log, busy, &format!("b-{i}"), 10 + i);
    }
    let (kept, order) = e.idempotency_keys();
    assert!(order <= 8, "{order}");
    assert_eq!(kept, 2, "only the busy conversation's last two");
    // The busy conversation's last two keys are retries, the one before is new.
    assert!(send_keyed(&mut e, &mut log, busy, "b-199", 300).1);
    assert!(send_keyed(&mut e, &mut log, busy, "b-198", 301).1);
    assert!(!send_keyed(&mut e, &mut log, busy, "b-197", 302).1);
    // The quiet conversation's key aged out of the shard's last 8.
    assert!(!send_keyed(&mut e, &mut log, quiet, "q-1", 303).1);
}

/// Idempotency keys up to 46 bytes are kept inline, longer ones on the heap; both are found by
/// their `str`, hash as it, and differ from a key one byte longer or shorter.
#[test]
fn idempotency_keys_inline_and_long_are_found_by_their_text() {
    use std::hash::BuildHasher;
    let hasher = std::collections::hash_map::RandomState::new();
    let mut map = HashMap::new();
    let texts: Vec<String> = [0, 1, 36, 45, 46, 47, 64, 200]
        .iter()
        .map(|&n| "k".repeat(n))
        .collect();
    for (i, t) in texts.iter().enumerate() {
        let key = super::IdemKey::new(t);
        assert_eq!(key.as_str(), t);
        let inline = matches!(key, super::IdemKey::Inline { .. });
        assert_eq!(inline, t.len() <= 46, "{} bytes", t.len());
        assert_eq!(hasher.hash_one(&key), hasher.hash_one(t.as_str()));
        map.insert(key, i);
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(map.get(t.as_str()), Some(&i), "{} bytes", t.len());
    }
    assert_eq!(map.get("kk kk"), None);
}

/// A shard log (the real one) whose records hold at most `record_bytes_max` bytes, with no
/// syncs, in `dir`.
fn small_record_log(dir: &std::path::Path, record_bytes_max: u32) -> kefu_storage::Log {
    let mut config = kefu_storage::LogConfig::new(dir);
    config.segment_bytes_max = 1 << 20;
    config.record_bytes_max = record_bytes_max;
    config.durability = kefu_storage::Durability::Never;
    kefu_storage::Log::open(config).unwrap().0
}

/// A record larger than the log takes fails its own send with 413 and nothing else: no seq is
/// used up, nothing is stored, the engine is not poisoned and later sends go in, dense.
#[test]
fn an_oversized_record_is_refused_with_413_and_the_shard_keeps_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = small_record_log(dir.path(), 4096);
    let mut e = engine(0);
    let c = e
        .create(&mut log, 0, "Ann", "web", Some("hello"), Some("support"), 1)
        .unwrap();
    let id = c.conversation_id;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    let before = e.send(&mut log, id, &visitor, "short", None, 2).unwrap();
    // Plain bytes over the limit, and a text of 700 bytes that is stored as 4,200: a control
    // character is escaped as `\u00XX`, six bytes.
    for (text, key) in [("x".repeat(5000), "k1"), ("\u{1}".repeat(700), "k2")] {
        let err = e
            .send(&mut log, id, &visitor, &text, Some(key), 3)
            .unwrap_err();
        assert_eq!(err.status(), 413, "{err}");
        assert!(err.to_string().contains("record_bytes_max 4096"), "{err}");
        assert_eq!(e.poisoned(), None);
    }
    let after = e
        .send(&mut log, id, &visitor, "still here", Some("k1"), 4)
        .unwrap();
    assert_eq!(after.seq, before.seq + 1, "the refused records took no seq");
    assert!(!after.duplicate, "a refused send does not keep its key");
    let agent_alice = agent("alice");
    e.transition(&mut log, id, "alice", 0, &Transition::Accept, 5)
        .unwrap();
    e.send(&mut log, id, &agent_alice, "hi Ann", None, 6)
        .unwrap();
    e.release(log.durable_offset());
    let mut seqs = Vec::new();
    log.read_conversation(id, 0, 100, |fr| seqs.push(fr.header.seq))
        .unwrap();
    let last = e.state(id).unwrap().1;
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    assert_eq!(e.view(id, &visitor).unwrap().last_seq, last);
}

/// A log that fails every append the way a disk does.
struct BrokenLog;

impl RecordLog for BrokenLog {
    fn append(&mut self, _header: &Header, _payload: &[u8]) -> Result<u64, String> {
        Err(kefu_storage::Error::Io {
            op: "write",
            path: "shard-0/00000000000000000000.log".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }
        .to_string())
    }

    fn read_conversation(
        &mut self,
        _conv: u64,
        _after_seq: u64,
        _limit: usize,
        _each: &mut dyn FnMut(&Header, &[u8]),
    ) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn a_failing_log_still_poisons_the_engine() {
    let mut log = MemLog::default();
    let mut e = engine(0);
    let c = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1)
        .unwrap();
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: c.conversation_id,
    };
    let err = e
        .send(&mut BrokenLog, c.conversation_id, &visitor, "hi", None, 2)
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    assert!(e.poisoned().is_some_and(|why| why.contains("write")));
    let err = e
        .send(&mut log, c.conversation_id, &visitor, "hi", None, 3)
        .unwrap_err();
    assert_eq!(err.status(), 503, "poisoned until restarted: {err}");
}

/// The text classification (what the engine gets through `RecordLog`'s strings) agrees with the
/// typed one for every kind of storage error, so a reworded storage error fails here instead of
/// poisoning a shard over one large message.
#[test]
fn append_errors_are_classified_alike_from_storage_errors_and_from_their_text() {
    use kefu_storage::Error as E;
    let io = || std::io::Error::from_raw_os_error(libc::EIO);
    let errors = [
        E::Config("x".into()),
        E::Io {
            op: "sync",
            path: "p".into(),
            source: io(),
        },
        E::Poisoned(Arc::new(io())),
        E::Locked("p".into()),
        E::RecordTooLarge {
            len: 70_000,
            max: 65_536,
        },
        E::NotARecord(Kind::Hello),
        E::BadFlags(0x8000),
        E::SeqNotIncreasing {
            conversation_id: 1,
            last: 3,
            got: 3,
        },
        E::LimitExceeded("conversation_index_entries_max 16 reached".into()),
        E::BelowStart {
            requested: 1,
            start: 2,
        },
        E::Corrupt {
            offset: 1,
            segment_base: 0,
            reason: "crc".into(),
        },
    ];
    let mut kinds = std::collections::BTreeMap::new();
    for e in &errors {
        let typed = AppendError::from_storage(e);
        assert_eq!(AppendError::from_message(e.to_string()), typed, "{e}");
        let kind = match typed {
            AppendError::TooLarge(_) => "too large",
            AppendError::Refused(_) => "refused",
            AppendError::Failed(_) => "failed",
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(
        kinds,
        [("failed", 7), ("refused", 3), ("too large", 1)].into()
    );
}

/// The `event` names of the deliveries waiting in `outbox`, and who sent each.
fn drain_notices(outbox: &Outbox) -> Vec<(String, String)> {
    std::iter::from_fn(|| outbox.pop())
        .map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.json).unwrap();
            (
                v["event"].as_str().unwrap_or("").to_owned(),
                v["from"]["id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Typing and read notices are limited per sender, per kind and per conversation, with the
/// tenant's visitor rate limit (here 1/s, burst 3): typing beyond it is dropped without an
/// error, a read is refused with 429. Message sends keep their own bucket.
#[test]
fn typing_and_read_notices_are_rate_limited_per_sender() {
    let mut log = MemLog::default();
    let mut e = engine_with(0, 4, 1_000, registry_with_rate(1, 3));
    let c = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1_000)
        .unwrap();
    let id = c.conversation_id;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    e.transition(&mut log, id, "bob", 0, &Transition::Accept, 1_000)
        .unwrap();
    e.release(u64::MAX);
    let outbox = Outbox::new(64);
    let last = e.state(id).unwrap().1;
    assert!(
        e.replay(&mut log, id, &visitor, last, 10, Some(outbox.clone()))
            .unwrap()
            .registered
    );
    let t = 10_000_000; // us
    // Ten typing notices at once: three go out, seven are dropped, none is an error.
    for _ in 0..10 {
        e.ephemeral(id, &visitor, Event::Typing, t).unwrap();
    }
    assert_eq!(e.notices_dropped(), 7);
    // Reads have their own bucket: three go out, the fourth is 429.
    for seq in 1..=3 {
        e.ephemeral(id, &visitor, Event::Read { seq }, t).unwrap();
    }
    let err = e
        .ephemeral(id, &visitor, Event::Read { seq: 4 }, t)
        .unwrap_err();
    assert_eq!(err, EngineError::RateLimited { retry_after_s: 1 });
    assert_eq!(err.status(), 429);
    // Each agent has its own buckets: bob (assigned) and alice (same group).
    for name in ["bob", "alice"] {
        for _ in 0..4 {
            e.ephemeral(id, &agent(name), Event::Typing, t).unwrap();
        }
    }
    assert_eq!(e.notices_dropped(), 9);
    // Messages are limited apart from notices: the visitor's send bucket is still full.
    for i in 0..3 {
        e.send(&mut log, id, &visitor, "hi", None, t + i).unwrap();
    }
    e.release(u64::MAX);
    let got = drain_notices(&outbox);
    let count = |event: &str, from: &str| {
        got.iter()
            .filter(|(ev, who)| ev == event && who == from)
            .count()
    };
    let visitor_id = format!("v{id:x}");
    assert_eq!(count("typing", &visitor_id), 3, "{got:?}");
    assert_eq!(count("read", &visitor_id), 3, "{got:?}");
    assert_eq!(count("typing", "bob"), 3, "{got:?}");
    assert_eq!(count("typing", "alice"), 3, "{got:?}");
    assert_eq!(got.len(), 12 + 3, "and the three messages: {got:?}");
    // One second later the bucket has one more notice of each kind.
    let t = t + 1_000_000;
    e.ephemeral(id, &visitor, Event::Typing, t).unwrap();
    e.ephemeral(id, &visitor, Event::Read { seq: 4 }, t)
        .unwrap();
    e.ephemeral(id, &visitor, Event::Typing, t).unwrap();
    assert!(
        e.ephemeral(id, &visitor, Event::Read { seq: 5 }, t)
            .is_err()
    );
    assert_eq!(e.notices_dropped(), 10);
    e.release(u64::MAX);
    assert_eq!(drain_notices(&outbox).len(), 2);
}

#[test]
fn notice_keys_are_distinct_per_conversation_sender_and_kind() {
    let mut seen = std::collections::HashSet::new();
    for local in [1, 2, ConversationId::LOCAL_MAX] {
        let id = ConversationId::from_parts(5, local).unwrap().0;
        let senders = [NoticeSender::Visitor, NoticeSender::Integration]
            .into_iter()
            .chain((0..crate::tenant::AGENTS_PER_TENANT_MAX).map(NoticeSender::Agent));
        for sender in senders {
            for typing in [true, false] {
                assert!(seen.insert(notice_key(id, sender, typing)));
            }
        }
    }
}

/// [`MemLog`] with a conversation index: `entries` counts the records with a seq of the
/// conversations not forgotten, against `entries_max`.
struct IndexedLog {
    mem: MemLog,
    forgotten: Vec<u64>,
    entries_max: usize,
}

impl RecordLog for IndexedLog {
    fn append(&mut self, header: &Header, payload: &[u8]) -> Result<u64, String> {
        self.mem.append(header, payload)
    }

    fn read_conversation(
        &mut self,
        conv: u64,
        after_seq: u64,
        limit: usize,
        each: &mut dyn FnMut(&Header, &[u8]),
    ) -> Result<(), String> {
        if self.forgotten.contains(&conv) {
            return Ok(());
        }
        self.mem.read_conversation(conv, after_seq, limit, each)
    }

    fn forget_conversation(&mut self, conv: u64) {
        self.forgotten.push(conv);
    }

    fn conversation_index(&self) -> (usize, usize) {
        let entries = self
            .mem
            .frames
            .iter()
            .filter(|(h, _)| h.seq > 0 && !self.forgotten.contains(&h.conversation_id))
            .count();
        (entries, self.entries_max)
    }
}

fn engine_holding(conversations_max: usize) -> Engine {
    Engine::new(
        0,
        EngineLimits {
            conversations_max,
            idempotency_keys_per_conversation_max: 4,
            idempotency_keys_per_shard_max: 1000,
            history_limit_max: 100,
            subscribers_per_conversation_max: 8,
            model: ModelLimits::DEFAULT,
        },
        registry(),
        RouterLimits::DEMO,
    )
    .unwrap()
}

/// Opens a support conversation, and with `close` has bob accept and resolve it; returns its id.
fn open_one(e: &mut Engine, log: &mut dyn RecordLog, at_ms: u64, close: bool) -> u64 {
    let id = e
        .create(log, 0, "Ann", "web", None, Some("support"), at_ms * 1000)
        .unwrap()
        .conversation_id;
    if close {
        let visitor = Actor::Visitor {
            tenant: 0,
            conversation_id: id,
        };
        // Offered to an online agent at once, or accepted by bob from the queue.
        let agent = match e.view(id, &visitor).unwrap().agent {
            Some(agent) => agent,
            None => {
                e.transition(log, id, "bob", 0, &Transition::Accept, at_ms * 1000 + 1)
                    .unwrap();
                "bob".to_owned()
            }
        };
        e.transition(log, id, &agent, 0, &Transition::Resolve, at_ms * 1000 + 2)
            .unwrap();
    }
    e.release(u64::MAX);
    id
}

/// A shard at `conversations_max` makes room for a new conversation by forgetting its oldest
/// closed ones (state, keys, and the log's index of them; the records stay), and answers 503
/// only when none is closed. Recovery of the same log holds no more and forgets the same ones.
#[test]
fn a_full_shard_forgets_its_oldest_closed_conversations_and_so_does_recovery() {
    let mut log = IndexedLog {
        mem: MemLog::default(),
        forgotten: Vec::new(),
        entries_max: usize::MAX,
    };
    let mut e = engine_holding(4);
    let first = open_one(&mut e, &mut log, 1, true);
    let second = open_one(&mut e, &mut log, 2, true);
    let third = open_one(&mut e, &mut log, 3, false);
    let fourth = open_one(&mut e, &mut log, 4, false);
    // Resolved at ~1-2 ms, idle time 1 s: both close.
    e.tick(&mut log, 5_000);
    e.release(u64::MAX);
    assert_eq!(e.state(first).unwrap().0, ConversationState::Closed);
    assert_eq!(e.state(second).unwrap().0, ConversationState::Closed);
    assert_eq!(e.conversations_forgotten(), 0);
    // Full: the fifth start forgets the closed ones, oldest first.
    let fifth = open_one(&mut e, &mut log, 6, false);
    assert_eq!(e.conversations_forgotten(), 2);
    assert_eq!(log.forgotten, [first, second]);
    assert_eq!(e.conversations_len(), 3);
    let visitor = |id| Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    assert_eq!(e.view(first, &visitor(first)).unwrap_err().status(), 404);
    assert!(e.view(third, &visitor(third)).is_ok());
    let sixth = open_one(&mut e, &mut log, 7, false);
    // Full, and nothing closed: 503.
    let err = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 8_000_000)
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    // Recovery of the same records: the same four conversations, and the log forgets the same
    // two once recovery is done.
    let mut r = engine_holding(4);
    for (h, p) in &log.mem.frames {
        r.recover_record(h, p).unwrap();
    }
    r.finish_recovery(9_000);
    let mut reopened = IndexedLog {
        mem: MemLog::default(),
        forgotten: Vec::new(),
        entries_max: usize::MAX,
    };
    r.forget_in_log_after_recovery(&mut reopened);
    assert_eq!(r.conversations_len(), 4);
    assert_eq!(reopened.forgotten, [first, second]);
    for id in [third, fourth, fifth, sixth] {
        assert!(r.view(id, &visitor(id)).is_ok());
    }
    assert_eq!(r.view(second, &visitor(second)).unwrap_err().status(), 404);
}

/// When the log's conversation index passes 90% of its limit, the shard's tick forgets closed
/// conversations until it is under 80% (or none closed is left), before appends would fail.
#[test]
fn a_filling_conversation_index_makes_the_shard_forget_closed_conversations() {
    let mut log = IndexedLog {
        mem: MemLog::default(),
        forgotten: Vec::new(),
        entries_max: usize::MAX,
    };
    let mut e = engine_holding(100);
    let closed: Vec<u64> = (0..6)
        .map(|i| open_one(&mut e, &mut log, i, true))
        .collect();
    let open = open_one(&mut e, &mut log, 10, false);
    e.tick(&mut log, 5_000);
    e.release(u64::MAX);
    let (entries, _) = log.conversation_index();
    // Under the high-water mark: nothing forgotten.
    log.entries_max = entries * 100 / 89;
    e.tick(&mut log, 5_001);
    assert_eq!(e.conversations_forgotten(), 0);
    // Past it: closed conversations go, oldest first, until the index is under 80%.
    log.entries_max = entries * 100 / 91;
    e.tick(&mut log, 5_002);
    let (after, max) = log.conversation_index();
    assert!(after * 100 < max * 80, "{after} of {max}");
    assert!(e.conversations_forgotten() > 0);
    assert_eq!(log.forgotten[..], closed[..log.forgotten.len()]);
    assert!(!log.forgotten.contains(&open));
}

/// Retention's floor: the first record of every conversation not closed, and the opening of
/// the newest conversation; `forget_below` then forgets the closed ones that began below the
/// log's new start.
#[test]
fn the_retention_floor_is_the_first_open_conversation_s_first_record() {
    let mut log = IndexedLog {
        mem: MemLog::default(),
        forgotten: Vec::new(),
        entries_max: usize::MAX,
    };
    let mut e = engine_holding(100);
    let closed = open_one(&mut e, &mut log, 1, true);
    let pinning = open_one(&mut e, &mut log, 2, false);
    let later = open_one(&mut e, &mut log, 3, false);
    e.tick(&mut log, 5_000);
    e.release(u64::MAX);
    let first_of = |log: &IndexedLog, id: u64| {
        log.mem
            .frames
            .iter()
            .find(|(h, _)| h.conversation_id == id)
            .unwrap()
            .0
            .log_offset
    };
    let pinned_at = first_of(&log, pinning);
    assert!(first_of(&log, closed) < pinned_at && pinned_at < first_of(&log, later));
    let end = log.mem.frames.len() as u64;
    assert_eq!(e.retention_floor(end), pinned_at);
    assert_eq!(e.retention_floor(0), 0);
    // The log now starts at the floor: the closed conversation that began below it goes.
    e.forget_below(&mut log, pinned_at);
    assert_eq!(log.forgotten, [closed]);
    assert_eq!(e.conversations_len(), 2);
}

/// Retention never deletes the opening of the newest conversation, so a recovery of what it
/// kept hands out new ids only: an id given again would let an old visitor token open a
/// stranger's conversation.
#[test]
fn retention_keeps_the_newest_opening_so_ids_are_never_given_twice() {
    let mut log = MemLog::default();
    let mut e = engine_holding(100);
    let a = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1_000)
        .unwrap()
        .conversation_id;
    let b = open_one(&mut e, &mut log, 2, true);
    let visitor_a = Actor::Visitor {
        tenant: 0,
        conversation_id: a,
    };
    for i in 0..5 {
        e.send(&mut log, a, &visitor_a, "more", None, 3_000 + i)
            .unwrap();
    }
    // A closes too: nothing is open, so only the newest opening holds the floor.
    let agent = match e.view(a, &visitor_a).unwrap().agent {
        Some(agent) => agent,
        None => {
            e.transition(&mut log, a, "bob", 0, &Transition::Accept, 4_000)
                .unwrap();
            "bob".to_owned()
        }
    };
    e.transition(&mut log, a, &agent, 0, &Transition::Resolve, 4_001)
        .unwrap();
    e.release(u64::MAX);
    e.tick(&mut log, 10_000);
    e.release(u64::MAX);
    assert_eq!(e.state(a).unwrap().0, ConversationState::Closed);
    assert_eq!(e.state(b).unwrap().0, ConversationState::Closed);
    let end = log.frames.len() as u64;
    let floor = e.retention_floor(end);
    let b_opening = log
        .frames
        .iter()
        .find(|(h, _)| h.conversation_id == b)
        .unwrap()
        .0
        .log_offset;
    assert_eq!(floor, b_opening);
    // A recovery of what retention keeps.
    let mut r = engine_holding(100);
    r.begin_recovery(floor);
    for (h, p) in log.frames.iter().filter(|(h, _)| h.log_offset >= floor) {
        r.recover_record(h, p).unwrap();
    }
    let next = r
        .create(&mut log, 0, "Cy", "web", None, Some("support"), 20_000)
        .unwrap()
        .conversation_id;
    assert!(next != a && next != b, "id {next:#x} given twice");
}

/// Recovery of a log whose head retention deleted skips the records of conversations opened
/// before its start; from a log that starts at 0 such a record is an error, as before.
#[test]
fn recovery_skips_what_is_left_of_conversations_opened_before_the_log_start() {
    let mut log = MemLog::default();
    let mut e = engine_holding(100);
    let gone = open_one(&mut e, &mut log, 1, true);
    e.tick(&mut log, 5_000);
    e.release(u64::MAX);
    let kept = open_one(&mut e, &mut log, 6, false);
    // The log loses the first record of `gone` (its opening).
    let rest: Vec<_> = log.frames[1..].to_vec();
    let mut r = engine_holding(100);
    r.begin_recovery(1);
    for (h, p) in &rest {
        r.recover_record(h, p).unwrap();
    }
    assert!(r.recovery_skipped() > 0);
    assert_eq!(r.conversations_len(), 1);
    assert!(r.state(kept).is_some() && r.state(gone).is_none());
    let mut strict = engine_holding(100);
    let err = rest
        .iter()
        .try_for_each(|(h, p)| strict.recover_record(h, p))
        .unwrap_err();
    assert!(err.contains("before opening"), "{err}");
}

/// A log that refuses every record without writing it (as a full conversation index does).
struct RefusingLog {
    mem: MemLog,
    refuse: bool,
}

impl RecordLog for RefusingLog {
    fn append(&mut self, header: &Header, payload: &[u8]) -> Result<u64, String> {
        self.mem.append(header, payload)
    }

    fn append_record(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: &mut Vec<u8>,
    ) -> Result<u64, AppendError> {
        if self.refuse {
            return Err(AppendError::Refused("conversation index full".into()));
        }
        self.append_framed(header, payload, frame)
            .map_err(AppendError::from_message)
    }

    fn read_conversation(
        &mut self,
        conv: u64,
        after_seq: u64,
        limit: usize,
        each: &mut dyn FnMut(&Header, &[u8]),
    ) -> Result<(), String> {
        self.mem.read_conversation(conv, after_seq, limit, each)
    }
}

/// A start whose opening record the log refuses leaves nothing behind: no conversation, no
/// queue place (the next start is first in its queue), the engine not poisoned, and the log
/// recovers.
#[test]
fn a_start_the_log_refuses_leaves_no_conversation_behind() {
    let mut log = RefusingLog {
        mem: MemLog::default(),
        refuse: false,
    };
    let mut e = engine(0);
    log.refuse = true;
    let err = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 1_000)
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    assert_eq!(e.conversations_len(), 0);
    log.refuse = false;
    let c = e
        .create(&mut log, 0, "Bo", "web", None, Some("support"), 2_000)
        .unwrap();
    assert_eq!(c.queue_position, Some(1));
    assert_eq!(e.conversations_len(), 1);
    e.release(u64::MAX);
    let mut r = engine(0);
    for (h, p) in &log.mem.frames {
        r.recover_record(h, p).unwrap();
    }
    assert_eq!(r.conversations_len(), 1);
}

/// With the log's conversation index within `INDEX_ROOM_MIN` entries of its limit and nothing
/// closed to forget, commands are refused (503) before they change anything; with room again
/// they go on.
#[test]
fn a_full_conversation_index_refuses_commands_before_they_start() {
    let mut log = IndexedLog {
        mem: MemLog::default(),
        forgotten: Vec::new(),
        entries_max: usize::MAX,
    };
    let mut e = engine_holding(100);
    let id = open_one(&mut e, &mut log, 1, false);
    let (entries, _) = log.conversation_index();
    log.entries_max = entries + INDEX_ROOM_MIN - 1;
    let visitor = Actor::Visitor {
        tenant: 0,
        conversation_id: id,
    };
    let err = e
        .create(&mut log, 0, "Ann", "web", None, Some("support"), 2_000)
        .unwrap_err();
    assert_eq!(err.status(), 503);
    assert!(
        err.to_string().contains("conversation index is full"),
        "{err}"
    );
    let err = e
        .send(&mut log, id, &visitor, "hi", None, 2_001)
        .unwrap_err();
    assert_eq!(err.status(), 503);
    assert_eq!(e.conversations_len(), 1);
    assert_eq!(log.conversation_index().0, entries, "nothing written");
    log.entries_max = entries + INDEX_ROOM_MIN;
    e.send(&mut log, id, &visitor, "hi", None, 2_002).unwrap();
}
