//! Allocations per message on the send path, counted by a global allocator: the engine's `send` and `release` (a visitor message with the auto-reply check, as under load; also to subscribers that give their deliveries back), and the protocol side of a send over HTTP, WebSocket and the binary protocol (parse, token, body, answer).
//!
//! The issue asks that in steady state the data path allocates nothing per message: these tests
//! pin that after a warm-up (pools filled, scratch buffers grown, tables sized). The counter is
//! per thread, so tests running in parallel do not disturb each other.
//!
//! The protocol-side tests make the same calls, in the same order, as `http.rs`, `ws.rs` and
//! `binary.rs` do for a send (the shard's part is the engine test).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use kefu_gateway::access::Access;
use kefu_gateway::auth::VisitorKey;
use kefu_gateway::engine::{
    Actor, DELIVERY_POOL_MAX, DeliveryReturns, Engine, EngineLimits, Outbox, RecordLog,
    give_back_delivery,
};
use kefu_gateway::routing::RouterLimits;
use kefu_gateway::shard::{SendBody, pooled_string, recycle_string};
use kefu_gateway::tenant::{Secret, Tenant, TenantRegistry, demo_tenant_config, load_intents};
use kefu_protocol::binproto::{self, BinLimits, ClientMsg, ServerMsg};
use kefu_protocol::frame::Header;
use kefu_protocol::http::{HttpLimits, parse_request};
use kefu_protocol::model::{
    ClientMessage, ClientMessageRef, ConversationId, ModelLimits, SendMessageRequest,
    SendMessageRequestRef, parse_json_borrowed, write_ack_json,
};
use kefu_protocol::ws::{OpCode, WsConnection, WsEvent, WsLimits, encode_frame};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: a thread being torn down has no counter any more.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator; the counter is a const-initialized thread local
// without a destructor, so touching it never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (and reallocations) made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

/// Allocations per call of `one` in steady state: after 100 calls (pools filled, buffers
/// grown), the mean over [`MEASURED`] calls, printed as `what`.
fn steady_allocations(what: &str, mut one: impl FnMut()) -> f64 {
    for _ in 0..100 {
        one();
    }
    let allocs = allocations(|| {
        for _ in 0..MEASURED {
            one();
        }
    });
    let per_call = allocs as f64 / MEASURED as f64;
    println!("{what}: {allocs} allocations in {MEASURED} calls ({per_call:.2} per call)");
    per_call
}

/// A log that keeps no records (the real one writes into a mapped segment and allocates
/// nothing per record either): offsets only.
#[derive(Default)]
struct CountingLog {
    next: u64,
}

impl RecordLog for CountingLog {
    fn append(&mut self, _header: &Header, _payload: &[u8]) -> Result<u64, String> {
        self.next += 1;
        Ok(self.next - 1)
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

/// The embedded demo tenant (its two auto-reply rules included) with test tokens and a rate
/// limit no test reaches.
fn registry() -> Arc<TenantRegistry> {
    let mut config = demo_tenant_config();
    for (i, a) in config.agent.iter_mut().enumerate() {
        a.token = Some(Secret::new(format!("test-agent-token-{i:04}")));
    }
    for (i, n) in config.integration.iter_mut().enumerate() {
        n.token = Some(Secret::new(format!("test-integration-token-{i:04}")));
    }
    config.visitor_rate_limit.messages_per_s = 10_000;
    config.visitor_rate_limit.burst = 10_000;
    let intents = load_intents(&config, "tenant[0]", std::path::Path::new(".")).unwrap();
    let key = VisitorKey::from_bytes([7; 32]);
    Arc::new(TenantRegistry::new(vec![Tenant::new(config, key, intents)], None).unwrap())
}

const WARM_UP: u64 = 2_000;
const MEASURED: u64 = 1_000;

/// What each measured engine send carries and who receives it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum EngineCase {
    /// No `client_msg_id`, no subscriber (the auto-reply check still runs).
    Plain,
    /// A new `client_msg_id` per send: UUID-sized, or `long` (64 bytes).
    Keyed { long: bool },
    /// A subscriber per conversation takes each delivery, as a socket does; with `give_back`
    /// it hands it back to the shard afterwards (`give_back_delivery`), as the sockets do.
    Subscribed { give_back: bool },
}

/// Allocations per send of the engine's `send` + `release` in steady state.
fn engine_allocations_per_send(case: EngineCase) -> f64 {
    let limits = EngineLimits {
        conversations_max: 100,
        idempotency_keys_per_conversation_max: 4,
        idempotency_keys_per_shard_max: 1_000,
        history_limit_max: 100,
        subscribers_per_conversation_max: 8,
        model: ModelLimits::DEFAULT,
    };
    let mut engine = Engine::new(0, limits, registry(), RouterLimits::DEMO).unwrap();
    let returns = vec![Arc::new(DeliveryReturns::new(DELIVERY_POOL_MAX))];
    engine.use_delivery_returns(returns[0].clone());
    let mut log = CountingLog::default();
    let mut now_us = 1_000_000_000_000u64;
    let ids: Vec<u64> = (0..8)
        .map(|i| {
            let created = engine
                .create(&mut log, 0, &format!("v{i}"), "web", None, None, now_us)
                .unwrap();
            created.conversation_id
        })
        .collect();
    let actors: Vec<Actor> = ids
        .iter()
        .map(|&id| Actor::Visitor {
            tenant: 0,
            conversation_id: id,
        })
        .collect();
    let outboxes: Vec<Arc<Outbox>> = match case {
        EngineCase::Subscribed { .. } => ids
            .iter()
            .zip(&actors)
            .map(|(&id, actor)| {
                let outbox = Outbox::new(64);
                let replay = engine
                    .replay(&mut log, id, actor, u64::MAX >> 1, 1, Some(outbox.clone()))
                    .unwrap();
                assert!(replay.registered);
                outbox
            })
            .collect(),
        _ => Vec::new(),
    };
    // Made before the count: a key per send.
    let keys: Vec<String> = (0..WARM_UP + MEASURED)
        .map(|n| match case {
            EngineCase::Keyed { long: true } => format!("{:064}", n),
            _ => format!("8c0ffee0-0000-4000-8000-{n:012}"),
        })
        .collect();
    // What the committer does per command: run it, sync, release; then what the subscribers'
    // sockets do with their deliveries.
    let mut send = |n: u64| {
        let i = (n % ids.len() as u64) as usize;
        now_us += 1_000;
        let key = matches!(case, EngineCase::Keyed { .. }).then(|| keys[n as usize].as_str());
        let sent = engine
            .send(&mut log, ids[i], &actors[i], "hello from wrk", key, now_us)
            .unwrap();
        assert!(!sent.duplicate);
        engine.release(engine.appended_end());
        if let EngineCase::Subscribed { give_back } = case {
            let mut delivered = 0;
            while let Some(d) = outboxes[i].pop() {
                delivered += 1;
                if give_back {
                    give_back_delivery(&returns, d);
                }
            }
            assert!(delivered >= 1);
        }
    };
    for n in 0..WARM_UP {
        send(n);
    }
    let allocs = allocations(|| {
        for n in WARM_UP..WARM_UP + MEASURED {
            send(n);
        }
    });
    let per_send = allocs as f64 / MEASURED as f64;
    println!(
        "engine send + release ({case:?}): {allocs} allocations in {MEASURED} sends ({per_send:.2} per send)"
    );
    per_send
}

#[test]
fn engine_send_allocates_nothing_per_message_in_steady_state() {
    assert_eq!(engine_allocations_per_send(EngineCase::Plain), 0.0);
}

/// A delivery a socket wrote out goes back to its shard's pool: a send to a subscribed
/// conversation allocates nothing either. Kept by the socket instead (dropped there), every
/// delivery and its buffers were allocated anew.
#[test]
fn engine_send_to_a_subscriber_allocates_nothing_once_deliveries_come_back() {
    assert_eq!(
        engine_allocations_per_send(EngineCase::Subscribed { give_back: true }),
        0.0
    );
    assert!(engine_allocations_per_send(EngineCase::Subscribed { give_back: false }) >= 1.0);
}

/// A send with a `client_msg_id` keeps its key (up to the per-conversation limit, the oldest
/// going first). A key of up to 46 bytes (a UUID is 36) is kept inline in the key's map entry
/// and its place in the eviction order: nothing is allocated. A longer one takes one
/// allocation, shared by both, and nothing else.
#[test]
fn engine_keyed_send_allocates_only_a_long_kept_key() {
    assert_eq!(
        engine_allocations_per_send(EngineCase::Keyed { long: false }),
        0.0
    );
    assert_eq!(
        engine_allocations_per_send(EngineCase::Keyed { long: true }),
        1.0
    );
}

/// What `http.rs` does for a send before and after the shard: parse the request, resolve the
/// bearer token (a cache hit after the first time), parse the body and write the answer. The
/// only allocation left is the message text, which the command to the shard owns.
#[test]
fn http_side_of_a_send_allocates_nothing() {
    let registry = registry();
    let token = registry
        .issue_visitor_token("demo", 0x0000_0000_0000_0001, 1, u64::MAX / 2)
        .unwrap();
    let access = Access::from_registry(registry, 3600);
    let body = r#"{"text":"hello from wrk","client_msg_id":"wrk-0000000000000001"}"#;
    let request = format!(
        "POST /v1/conversations/c0000000000000001/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let limits = HttpLimits::default();
    let mut out = Vec::with_capacity(1024);
    let one = || {
        let req = parse_request(request.as_bytes(), &limits).unwrap();
        let token = req.head.bearer_token().unwrap();
        let actor = access.authenticate(token).unwrap();
        assert!(matches!(actor, Actor::Visitor { .. }));
        let send: SendMessageRequestRef<'_> = parse_json_borrowed::<_, SendMessageRequest>(
            req.body.as_contiguous().unwrap(),
            &ModelLimits::DEFAULT,
        )
        .unwrap();
        assert_eq!(send.text, "hello from wrk");
        // The command's strings: a pooled buffer that comes back with the answer.
        let body = SendBody::pooled(&send.text, send.client_msg_id.as_deref());
        std::hint::black_box(&body).client_msg_id();
        out.clear();
        kefu_gateway::http::write_sent(&mut out, 201, true, 7, 1_700_000_000_000_000);
        assert!(out.starts_with(b"HTTP/1.1 201"));
    };
    let per_request = steady_allocations("http parse + token + body + answer", one);
    assert_eq!(per_request, 0.0);
}

/// What `ws.rs` does for a `send` message: decode the masked frame, copy its text into a pooled
/// string, parse it borrowed, move text and `client_msg_id` into the command's pooled body,
/// and answer with an ack framed from a reused JSON buffer.
#[test]
fn websocket_side_of_a_send_allocates_nothing() {
    let json = r#"{"type":"send","conversation_id":"c0000000000000001","text":"hello from a browser","client_msg_id":"tab-1-0000001"}"#;
    let mut frame = Vec::new();
    encode_frame(
        &mut frame,
        true,
        OpCode::Text,
        json.as_bytes(),
        Some([1, 2, 3, 4]),
    );
    let mut ws = WsConnection::new(WsLimits::default());
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let mut ack = Vec::with_capacity(256);
    let mut texts: Vec<String> = Vec::with_capacity(16);
    let one = || {
        buf.clear();
        buf.extend_from_slice(&frame);
        out.clear();
        let (event, used) = ws.decode(&mut buf, &mut out).unwrap();
        assert_eq!(used, frame.len());
        let Some(WsEvent::Text(t)) = event else {
            panic!("not a text message: {event:?}");
        };
        let mut text = pooled_string();
        text.push_str(t);
        texts.push(text);
        for text in texts.drain(..) {
            let msg = parse_json_borrowed::<ClientMessageRef<'_>, ClientMessage>(
                text.as_bytes(),
                &ModelLimits::DEFAULT,
            )
            .unwrap();
            let ClientMessageRef::Send {
                conversation_id,
                text: body_text,
                client_msg_id,
            } = &msg
            else {
                panic!("not a send: {msg:?}");
            };
            let body = SendBody::pooled(body_text, client_msg_id.as_deref());
            ack.clear();
            write_ack_json(&mut ack, body.client_msg_id(), *conversation_id, 7);
            assert!(ws.send_text(&mut out, std::str::from_utf8(&ack).unwrap()));
            drop(body);
            drop(msg);
            recycle_string(text);
        }
    };
    let per_message = steady_allocations("websocket decode + parse + body + ack", one);
    assert_eq!(per_message, 0.0);
    assert!(out.ends_with(
        br#""client_msg_id":"tab-1-0000001","conversation_id":"c0000000000000001","seq":7}"#
    ));
}

/// What `binary.rs` does for a Send frame: decode it, move text and `client_msg_id` into the
/// command's pooled body, and encode the Ack.
#[test]
fn binary_side_of_a_send_allocates_nothing() {
    let mut frame = Vec::new();
    binproto::encode_client(
        &ClientMsg::Send {
            conversation_id: ConversationId(1),
            client_msg_id: Some("sdk-0000001"),
            text: "hello from an SDK",
        },
        0,
        &mut frame,
    )
    .unwrap();
    let limits = BinLimits::default();
    let mut out = Vec::with_capacity(4096);
    let one = || {
        let (msg, used) = binproto::decode_client(&frame, &limits).unwrap();
        assert_eq!(used, frame.len());
        let ClientMsg::Send {
            conversation_id,
            client_msg_id,
            text,
        } = msg
        else {
            panic!("not a send");
        };
        let body = SendBody::pooled(text, client_msg_id);
        out.clear();
        binproto::encode_server(
            &ServerMsg::Ack {
                conversation_id,
                seq: 7,
                log_offset: 4096,
                timestamp_us: 1_700_000_000_000_000,
                duplicate: false,
                client_msg_id: body.client_msg_id(),
            },
            &mut out,
        )
        .unwrap();
    };
    let per_frame = steady_allocations("binary decode + body + ack", one);
    assert_eq!(per_frame, 0.0);
}
