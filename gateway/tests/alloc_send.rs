//! Allocations per message on the send path, counted by a global allocator: the engine's `send` and `release` (a visitor message with the auto-reply check, as under load), and the HTTP side of a send (parse, token, body, answer).
//!
//! The issue asks that in steady state the data path allocates nothing per message: these tests
//! pin that after a warm-up (pools filled, scratch buffers grown, tables sized). The counter is
//! per thread, so tests running in parallel do not disturb each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use kefu_gateway::access::Access;
use kefu_gateway::auth::VisitorKey;
use kefu_gateway::engine::{Actor, Engine, EngineLimits, RecordLog};
use kefu_gateway::routing::RouterLimits;
use kefu_gateway::tenant::{Secret, Tenant, TenantRegistry, demo_tenant_config, load_intents};
use kefu_protocol::frame::Header;
use kefu_protocol::http::{HttpLimits, parse_request};
use kefu_protocol::model::{
    ModelLimits, SendMessageRequest, SendMessageRequestRef, parse_json_borrowed,
};

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

#[test]
fn engine_send_allocates_nothing_per_message_in_steady_state() {
    let limits = EngineLimits {
        conversations_max: 100,
        idempotency_keys_per_conversation_max: 4,
        history_limit_max: 100,
        subscribers_per_conversation_max: 8,
        model: ModelLimits::DEFAULT,
    };
    let mut engine = Engine::new(0, limits, registry(), RouterLimits::DEMO).unwrap();
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
    // What the committer does per command: run it, sync, release.
    let mut send = |n: u64| {
        let i = (n % ids.len() as u64) as usize;
        now_us += 1_000;
        let sent = engine
            .send(&mut log, ids[i], &actors[i], "hello from wrk", None, now_us)
            .unwrap();
        assert!(!sent.duplicate);
        engine.release(engine.appended_end());
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
        "engine send + release: {allocs} allocations in {MEASURED} sends ({per_send:.2} per send)"
    );
    assert_eq!(allocs, 0, "{per_send:.2} allocations per send");
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
    let body = r#"{"text":"hello from wrk"}"#;
    let request = format!(
        "POST /v1/conversations/c0000000000000001/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let limits = HttpLimits::default();
    let mut out = Vec::with_capacity(1024);
    let mut one = || {
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
        // The command's text: a pooled buffer that comes back with the answer.
        let mut text = kefu_gateway::shard::text_buffer();
        text.push_str(&send.text);
        kefu_gateway::shard::recycle_text(std::hint::black_box(text));
        out.clear();
        kefu_gateway::http::write_sent(&mut out, 201, true, 7, 1_700_000_000_000_000);
        assert!(out.starts_with(b"HTTP/1.1 201"));
    };
    for _ in 0..100 {
        one();
    }
    let allocs = allocations(|| {
        for _ in 0..MEASURED {
            one();
        }
    });
    let per_request = allocs as f64 / MEASURED as f64;
    println!(
        "http parse + token + body + answer: {allocs} allocations in {MEASURED} requests ({per_request:.2} per request)"
    );
    assert_eq!(allocs, 0, "{per_request:.2} allocations per request");
}
