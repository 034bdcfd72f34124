//! Per-shard conversation engine without I/O: conversation states, dense seqs, idempotency keys, subscribers and routing, writing every record to the shard log before anything about it leaves the shard.
//!
//! The shard's committer feeds commands in batches. Each command may append records to the log
//! (through [`RecordLog`]) and queue deliveries; the committer then makes the log durable (one sync
//! for the whole batch: group commit) and only then calls [`Engine::release`], which hands the
//! deliveries to subscribers and lets the caller send the replies. So no client sees a record
//! that a crash could still take back.
//!
//! Replay (`subscribe`/`history` with `after = n`) reads from the log, never past
//! `released_seq`, and a subscriber is registered in the same step, so a resuming client gets
//! `n+1..released` from the log and everything after from the live path: no gap, no duplicate.
//!
//! Recovery folds the whole log through [`Engine::recover_record`]: states (via the model's
//! `apply_event`), last seqs, idempotency keys and queue order come back as they were.
//!
//! Routing: one [`Router`] per tenant per shard. A conversation is routed by the shard that owns
//! it; agent status is broadcast to every shard. Limitation (documented in the README): an
//! agent's capacity applies per shard, so with N shards an agent may hold up to N times its
//! configured capacity.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::wake::ShardWaker;
use crossbeam_queue::ArrayQueue;
use kefu_protocol::frame::{self, Header, Kind};
use kefu_protocol::model::{
    ConversationId, ConversationState, ConversationView, Event, EventRecord, MessageRecord,
    MessageRecordRef, ModelLimits, Opened, Participant, ParticipantRef, Role, TransferTarget,
    apply_event,
};

use crate::lifecycle::AutoClose;
use crate::ratelimit::RateLimiter;
use crate::routing::{AgentId, Effect, GroupId, Placement, RouteError, Router, RouterLimits};
use crate::tenant::TenantRegistry;

/// What the engine needs from the shard log. The real one is `kefu_storage::Log`; tests use a
/// vector.
pub trait RecordLog {
    /// Appends one record and returns its log offset. The record is not durable until the
    /// committer syncs.
    fn append(&mut self, header: &Header, payload: &[u8]) -> Result<u64, String>;
    /// [`append`](Self::append), and appends the record's frame as stored (header with
    /// `log_offset` and CRC, then `payload`) to `frame`.
    fn append_framed(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: &mut Vec<u8>,
    ) -> Result<u64, String> {
        let offset = self.append(header, payload)?;
        let mut stored = *header;
        stored.log_offset = offset;
        frame::encode_into(&stored, payload, frame);
        Ok(offset)
    }
    /// [`append_framed`](Self::append_framed), telling a record the log refused without
    /// writing any of it from a failure of the log (see [`AppendError`]): the engine poisons
    /// itself on the second kind only. The default reads the error's text
    /// ([`AppendError::from_message`]); a log with typed errors should classify those instead
    /// (for `kefu_storage::Log`: [`AppendError::from_storage`]).
    fn append_record(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: &mut Vec<u8>,
    ) -> Result<u64, AppendError> {
        self.append_framed(header, payload, frame)
            .map_err(AppendError::from_message)
    }
    /// Calls `each` with the records of `conv` whose seq is above `after_seq`, oldest first, at
    /// most `limit` of them.
    fn read_conversation(
        &mut self,
        conv: u64,
        after_seq: u64,
        limit: usize,
        each: &mut dyn FnMut(&Header, &[u8]),
    ) -> Result<(), String>;
    /// Drops a conversation the engine forgot from the log's conversation index (its records
    /// stay in the log). The default keeps it.
    fn forget_conversation(&mut self, _conv: u64) {}
    /// Entries of the log's conversation index and the most it takes (appends fail there), for
    /// the engine to forget closed conversations before that. The default: no such index.
    fn conversation_index(&self) -> (usize, usize) {
        (0, usize::MAX)
    }
}

/// Entries of the log's conversation index a command needs free before it starts (see
/// `Engine::check_room`): more than any one command appends.
pub const INDEX_ROOM_MIN: usize = 256;

/// Closed conversations forgotten at once when room is needed (a create on a full shard, the
/// log's conversation index filling up).
pub const FORGET_BATCH: usize = 64;

/// The log's conversation index counts as filling up past this share of its limit (percent):
/// the engine then forgets closed conversations until it is back under
/// [`INDEX_LOW_WATER_PERCENT`].
pub const INDEX_HIGH_WATER_PERCENT: usize = 90;
pub const INDEX_LOW_WATER_PERCENT: usize = 80;

/// Why the log did not take a record, as far as the shard is concerned: can it go on?
///
/// Only a failure of the log itself poisons the engine (fjall-style: after a failed write or
/// sync nothing appended since may be promised durable). A record the log refuses before
/// writing any byte of it is the problem of the one command that made it: API.md, "a bad
/// request never takes a shard down".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// The record is larger than the log's `record_bytes_max`; nothing was written. Answered
    /// 413 ([`EngineError::TooLarge`]).
    TooLarge(String),
    /// Refused before anything was written, the log sound: a shard-wide storage limit (the
    /// conversation index is full, offsets ran out) or a header the log does not store.
    /// This command fails with 503; later ones may succeed.
    Refused(String),
    /// The log failed (I/O, or poisoned by a failed sync) or disagrees with the engine's seqs:
    /// the engine poisons itself and refuses writes until a restart recovers from the log.
    Failed(String),
}

impl AppendError {
    /// The classification of a `kefu_storage` append error.
    pub fn from_storage(e: &kefu_storage::Error) -> Self {
        use kefu_storage::Error as E;
        let message = e.to_string();
        match e {
            E::RecordTooLarge { .. } => Self::TooLarge(message),
            E::LimitExceeded(_) | E::NotARecord(_) | E::BadFlags(_) => Self::Refused(message),
            // `SeqNotIncreasing` wrote nothing either, but it says the engine's seqs and the
            // log's are out of step: only recovery from the log (a restart) puts them back.
            _ => Self::Failed(message),
        }
    }

    /// [`from_storage`](Self::from_storage) from the error's text, for a log that hands the
    /// engine strings (the texts are `kefu_storage::Error`'s; a test holds the two
    /// classifications together). Anything not recognized is a failure: poisoning when in
    /// doubt is safe, taking a record as not written when part of it was is not.
    pub fn from_message(message: String) -> Self {
        let too_large =
            message.starts_with("record of ") && message.contains(" exceeds record_bytes_max ");
        let refused = message.starts_with("limit reached: ")
            || message.starts_with("unknown frame flags ")
            || (message.starts_with("frame kind ")
                && message.ends_with(" is not a stored record kind"));
        if too_large {
            Self::TooLarge(message)
        } else if refused {
            Self::Refused(message)
        } else {
            Self::Failed(message)
        }
    }
}

/// A record (or an ephemeral event) on its way to subscribers, rendered once and shared.
///
/// The engine pools them (see [`DELIVERY_POOL_MAX`]): one that no subscriber kept is cleared and
/// reused for a later record, so its buffers are `Vec`s that keep their capacity.
#[derive(Debug, Default)]
pub struct Delivery {
    pub conversation_id: u64,
    /// 0 for ephemeral events (typing, read).
    pub seq: u64,
    /// The frame as stored (header + JSON payload), for binary-protocol subscribers.
    pub frame: Vec<u8>,
    /// The WebSocket/HTTP JSON form (`{"type":"message",...}` or `{"type":"event",...}`).
    pub json: Vec<u8>,
}

/// Released deliveries kept for reuse per shard: enough for a group-commit batch of records
/// (one per in-flight send), so in steady state a send allocates no delivery.
pub const DELIVERY_POOL_MAX: usize = 1024;
/// A delivery whose buffers grew beyond this (a long message) is freed rather than pooled, so
/// the pool and the queue of given-back deliveries ([`DeliveryReturns`]) hold at most
/// `2 * DELIVERY_POOL_MAX * 2 * DELIVERY_POOLED_BYTES_MAX` (16 MiB) per shard.
pub const DELIVERY_POOLED_BYTES_MAX: usize = 4096;

/// Deliveries given back to the shard that made them, by the subscribers' shards once the last
/// of them wrote one out (see [`give_back_delivery`]). Bounded by [`DELIVERY_POOL_MAX`].
pub type DeliveryReturns = ArrayQueue<Arc<Delivery>>;

/// Clears `delivery` for reuse when no one else holds it and its buffers are small enough to
/// keep pooled; `false` when it should simply be dropped.
fn clear_for_reuse(delivery: &mut Arc<Delivery>) -> bool {
    let Some(d) = Arc::get_mut(delivery) else {
        return false;
    };
    if d.frame.capacity() > DELIVERY_POOLED_BYTES_MAX
        || d.json.capacity() > DELIVERY_POOLED_BYTES_MAX
    {
        return false;
    }
    d.frame.clear();
    d.json.clear();
    true
}

/// Hands a delivery a subscriber has written out back to its conversation's shard for reuse,
/// when no one else holds it and its buffers are small (`returns` indexed by shard). Deliveries
/// to subscribers are kept by their sockets, so without this the engine's pool never saw them
/// again and each delivered message allocated its delivery and buffers anew.
pub fn give_back_delivery(returns: &[Arc<DeliveryReturns>], mut delivery: Arc<Delivery>) {
    // Unique: the engine and the other subscribers have let go (if two let go at once, both may
    // see the other's reference and neither returns it: a miss, not an error).
    if !clear_for_reuse(&mut delivery) {
        return;
    }
    if let Some(queue) = returns.get(frame::shard_of(delivery.conversation_id) as usize) {
        let _ = queue.push(delivery);
    }
}

/// Maps keyed by ids the gateway hands out (conversation ids): foldhash instead of SipHash,
/// seeded per process, since a peer cannot choose the keys that get inserted.
pub type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The bounded delivery queue of one socket (or one long-poll). Filled by the owning shard of
/// a conversation (any thread), drained by the socket's task. Lock-free; overflow marks the
/// socket too slow instead of blocking or growing.
#[derive(Debug)]
pub struct Outbox {
    queue: ArrayQueue<Arc<Delivery>>,
    waker: ShardWaker,
    overflowed: AtomicBool,
    closed: AtomicBool,
    /// Deliveries dropped by overflow, for metrics.
    pub dropped: AtomicU64,
}

impl Outbox {
    pub fn new(depth: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: ArrayQueue::new(depth.max(1)),
            waker: ShardWaker::new(),
            overflowed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues a delivery; on a full queue marks the outbox overflowed (the socket is then closed
    /// with 4008 and resumes with `after`).
    pub fn push(&self, delivery: Arc<Delivery>) {
        if self.queue.push(delivery).is_err() {
            self.overflowed.store(true, Ordering::Release);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.waker.wake();
    }

    pub fn pop(&self) -> Option<Arc<Delivery>> {
        self.queue.pop()
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Marks the outbox overflowed without a delivery: its socket closes with 4008 and
    /// resumes from the log with `after`.
    pub fn give_up(&self) {
        self.overflowed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The socket is gone: the engine drops the outbox on its next delivery.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The outbox of a socket that is gone, cleared for a new subscriber: only its last
    /// holder may do this (`&mut`: no engine still has it), so nothing stale reaches the new
    /// one. Deliveries still queued go back to their shard's pool.
    pub fn clear_for_reuse(&mut self, returns: &[Arc<DeliveryReturns>]) {
        while let Some(d) = self.queue.pop() {
            give_back_delivery(returns, d);
        }
        *self.overflowed.get_mut() = false;
        *self.closed.get_mut() = false;
        *self.dropped.get_mut() = 0;
        self.waker = ShardWaker::new();
    }

    /// How many deliveries it holds at most.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Registers the current task to be woken on the next push.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Waits until a delivery is queued, the outbox overflowed, or it was closed.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if !self.queue.is_empty() || self.is_overflowed() || self.is_closed() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// Who asks. Tokens are checked before a command reaches the engine; the engine checks what
/// depends on conversation state (is this the assigned agent?).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// Holds a visitor token for exactly this conversation.
    Visitor {
        tenant: u16,
        conversation_id: u64,
    },
    Agent {
        tenant: u16,
        name: Arc<str>,
    },
    /// Integration token: reads everything of its tenant.
    Integration {
        tenant: u16,
    },
}

/// A refused command, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("conversation not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("{reason}")]
    Conflict {
        reason: String,
        state: ConversationState,
    },
    #[error("{0}")]
    BadRequest(String),
    /// The command's record is larger than the shard log stores (see [`AppendError`]):
    /// nothing was written, and the shard goes on.
    #[error("too large to store: {0}")]
    TooLarge(String),
    /// The visitor sends faster than the tenant's rate limit.
    #[error("rate limit exceeded: retry after {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    /// Limits reached (conversations, queue): the client should retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The log failed; the shard refuses writes until restarted.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl EngineError {
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::Forbidden(_) => 403,
            Self::Conflict { .. } => 409,
            Self::BadRequest(_) => 400,
            Self::TooLarge(_) => 413,
            Self::RateLimited { .. } => 429,
            Self::Overloaded(_) | Self::Storage(_) => 503,
        }
    }
}

/// Bounds of one shard's engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub conversations_max: usize,
    pub idempotency_keys_per_conversation_max: usize,
    /// Keys kept across the shard's conversations: with only the per-conversation bound, a
    /// shard at both limits would hold conversations x keys (10^8 by default, ~12 GB).
    pub idempotency_keys_per_shard_max: usize,
    pub history_limit_max: usize,
    pub subscribers_per_conversation_max: usize,
    pub model: ModelLimits,
}

/// One tenant as a shard sees it: its router, rate limiter and agent inboxes. The tenant's
/// configuration (intents, auto-replies, limits) is read from the shared registry.
struct Tenant {
    name: Arc<str>,
    router: Router,
    /// Visitor messages per conversation (the owning shard sees all of them: exact).
    rate: RateLimiter,
    /// Typing and read notices per conversation, sender and kind ([`notice_key`]), with the
    /// same settings: each notice fans out to every subscriber of the conversation.
    notices: RateLimiter,
    /// Idle-close timers of its resolved conversations on this shard.
    auto_close: AutoClose,
    /// Groups of each agent, by `AgentId::index`.
    agent_groups: Vec<Vec<GroupId>>,
    /// Agent sockets on any shard that want this tenant's offers and assignments.
    inboxes: HashMap<AgentId, Vec<Arc<Outbox>>>,
}

struct Conversation {
    tenant: u16,
    state: ConversationState,
    group: Arc<str>,
    agent: Option<Arc<str>>,
    channel: Arc<str>,
    visitor_id: Arc<str>,
    last_seq: u64,
    /// Highest seq handed to subscribers (durable).
    released_seq: u64,
    order_key: u64,
    /// Keys and their order share one allocation per key (the only allocation of a keyed
    /// send: the key is kept).
    idempotency: HashMap<IdemKey, (u64, u64)>,
    idempotency_order: VecDeque<IdemKey>,
    subscribers: Vec<Arc<Outbox>>,
    /// System auto-replies sent so far (bounded per conversation by the tenant).
    auto_replies_sent: u32,
    /// Log offset of its first record: log retention keeps everything from the oldest held
    /// conversation's on ([`Engine::retention_floor`]).
    first_offset: u64,
}

/// Answer to a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub conversation_id: u64,
    pub visitor_id: String,
    pub state: ConversationState,
    pub group: String,
    pub queue_position: Option<u32>,
    pub first_message_seq: Option<u64>,
}

/// Answer to a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    pub ts: u64,
    /// An idempotent retry: nothing was stored.
    pub duplicate: bool,
    /// Where the record is in the shard log (0 on a retry).
    pub log_offset: u64,
}

/// Agent commands on a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Accept,
    Resolve,
    Reopen,
    TransferToAgent(String),
    TransferToGroup(String),
}

/// Answer to a replay request (history, subscribe, poll).
#[derive(Debug, Default)]
pub struct Replay {
    pub entries: Vec<Arc<Delivery>>,
    pub last_seq: u64,
    /// Whether the subscriber was registered (the replay reached the live edge).
    pub registered: bool,
}

pub struct Engine {
    shard: u16,
    limits: EngineLimits,
    tenants: Vec<Tenant>,
    /// Boxed, and sized for `conversations_max` at start (16-byte slots, 2 MiB for 100,000;
    /// at most [`crate::routing::PRESIZED_CONVERSATIONS_MAX`]), so no create rehashes it. Unboxed and growing, a doubling allocated, copied
    /// and zero-faulted a table of 208-byte slots (27 MB at 131,072) inside one create: during
    /// a create burst `perf sched` showed shard 0 on the CPU for 61 ms at a time, half of it
    /// clearing fresh huge pages under hashbrown's table allocation.
    conversations: IdMap<u64, Box<Conversation>>,
    /// The shard's kept idempotency keys in the order they were stored (see [`ShardKeys`]).
    keys: ShardKeys,
    /// Released deliveries no subscriber kept, cleared for reuse (bounded by
    /// [`DELIVERY_POOL_MAX`]).
    delivery_pool: Vec<Arc<Delivery>>,
    /// Deliveries the subscribers' shards gave back (see [`give_back_delivery`]).
    delivery_returns: Arc<DeliveryReturns>,
    next_local: u64,
    /// Queue order of the next new arrival (a created or reopened conversation): waiting ones
    /// are served by this key, and recovery hands out the same keys in log order.
    next_order: u64,
    /// Records and ephemeral events waiting for the log's durable offset to pass
    /// `release_at`, in append order.
    pending: VecDeque<(u64, Arc<Delivery>)>,
    /// Agent-inbox deliveries, same rule.
    pending_inbox: VecDeque<(u64, u16, AgentId, Arc<Delivery>)>,
    /// The log offset after the last record this engine appended: a reply to a command is
    /// released once the durable offset reaches it.
    appended_end: u64,
    effects: Vec<Effect>,
    scratch: Vec<u8>,
    fold_scratch: String,
    poisoned: Option<String>,
    /// Typing notices over their sender's rate limit, dropped (see [`Engine::ephemeral`]).
    notices_dropped: u64,
    /// Closed conversations in the order they closed (live or in recovery): the oldest are
    /// forgotten first when room is needed ([`Engine::forget_closed`]). An id whose
    /// conversation is gone is skipped. At most one entry per conversation.
    closed: VecDeque<u64>,
    /// Conversations forgotten so far (`kefu_conversations_forgotten_total`).
    forgotten_total: u64,
    /// Conversations forgotten during recovery, which the log has not forgotten yet
    /// ([`Engine::forget_in_log_after_recovery`]).
    forgotten_in_recovery: Vec<u64>,
    /// Where the log being recovered starts: above 0, retention deleted its head, and records
    /// of conversations opened before it are skipped ([`Engine::begin_recovery`]).
    recovery_log_start: u64,
    /// Records recovery skipped for that reason.
    recovery_skipped: u64,
    /// Log offset of the opening record of the newest conversation (the highest local id) the
    /// shard opened. Retention keeps it: recovery takes the next id from the records it reads,
    /// and an id must never be handed out twice (an old visitor token would open the new
    /// conversation).
    newest_opening: u64,
    registry: Arc<TenantRegistry>,
    /// The agent accepting a conversation, so its `assigned` event names who did it (audit).
    accepted_by: Option<(u64, Participant)>,
    /// The reason the running command puts a conversation (back) into a queue.
    queue_reason: Option<(u64, &'static str)>,
}

impl Engine {
    pub fn new(
        shard: u16,
        limits: EngineLimits,
        registry: Arc<TenantRegistry>,
        router_limits: RouterLimits,
    ) -> Result<Self, String> {
        let mut out = Vec::with_capacity(registry.tenants().len());
        for tenant in registry.tenants() {
            let setup = &tenant.config;
            let limits = RouterLimits {
                socket_grace_ms: setup.agent_socket_grace_ms,
                ..router_limits
            };
            let mut router = Router::new(limits).map_err(|e| e.to_string())?;
            for group in &setup.groups {
                router.add_group(group).map_err(|e| e.to_string())?;
            }
            let mut agent_groups = Vec::with_capacity(setup.agent.len());
            for a in &setup.agent {
                let (name, groups, capacity) = (&a.name, &a.groups, &a.capacity);
                let ids: Vec<GroupId> = groups
                    .iter()
                    .map(|g| router.group_id(g).ok_or(format!("unknown group {g}")))
                    .collect::<Result<_, _>>()?;
                let agent = router
                    .add_agent(name, &ids, *capacity)
                    .map_err(|e| e.to_string())?;
                assert_eq!(agent.index(), agent_groups.len());
                agent_groups.push(ids);
            }
            out.push(Tenant {
                name: setup.name.as_str().into(),
                router,
                rate: RateLimiter::new(&setup.visitor_rate_limit),
                notices: RateLimiter::new(&setup.visitor_rate_limit),
                auto_close: AutoClose::new(setup.auto_close_idle_ms),
                agent_groups,
                inboxes: HashMap::new(),
            });
        }
        Ok(Self {
            shard,
            limits,
            tenants: out,
            conversations: IdMap::with_capacity_and_hasher(
                limits
                    .conversations_max
                    .min(crate::routing::PRESIZED_CONVERSATIONS_MAX),
                Default::default(),
            ),
            keys: ShardKeys::default(),
            delivery_pool: Vec::new(),
            delivery_returns: Arc::new(ArrayQueue::new(DELIVERY_POOL_MAX)),
            next_local: 1,
            next_order: 1,
            pending: VecDeque::new(),
            pending_inbox: VecDeque::new(),
            appended_end: 0,
            effects: Vec::new(),
            scratch: Vec::new(),
            fold_scratch: String::new(),
            poisoned: None,
            notices_dropped: 0,
            closed: VecDeque::new(),
            forgotten_total: 0,
            forgotten_in_recovery: Vec::new(),
            recovery_log_start: 0,
            recovery_skipped: 0,
            newest_opening: 0,
            registry,
            accepted_by: None,
            queue_reason: None,
        })
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    pub fn conversations_len(&self) -> usize {
        self.conversations.len()
    }

    /// Conversations forgotten so far ([`Engine::forget_closed`]).
    pub fn conversations_forgotten(&self) -> u64 {
        self.forgotten_total
    }

    /// Forgets up to `n` closed conversations, oldest closed first: their state, idempotency
    /// keys and subscribers leave the engine, and (with `log`) their entries leave the log's
    /// conversation index. Their records stay in the log: the firehose still carries them,
    /// and a restart rebuilds them and forgets them again. To the API a forgotten conversation
    /// is unknown (404). Only conversations whose every record is released go; returns how
    /// many went.
    ///
    /// Without this a shard took `conversations_max` conversations over its whole life, and
    /// its log `conversation_index_entries_max` messages, and then refused every new one.
    pub fn forget_closed(&mut self, mut log: Option<&mut dyn RecordLog>, n: usize) -> usize {
        let mut forgotten = 0;
        while forgotten < n {
            let Some(&id) = self.closed.front() else {
                break;
            };
            let Some(conv) = self.conversations.get(&id) else {
                self.closed.pop_front();
                continue;
            };
            if conv.state != ConversationState::Closed {
                self.closed.pop_front();
                continue;
            }
            if conv.released_seq < conv.last_seq {
                // Its close is not durable yet: the next call.
                break;
            }
            self.closed.pop_front();
            match &mut log {
                Some(l) => self.forget_one(Some(&mut **l), id),
                None => self.forget_one(None, id),
            }
            forgotten += 1;
        }
        forgotten
    }

    /// Forgets conversation `id` (see [`Engine::forget_closed`]); its entry in `closed` is
    /// skipped when it comes up.
    fn forget_one(&mut self, log: Option<&mut dyn RecordLog>, id: u64) {
        let Some(conv) = self.conversations.remove(&id) else {
            return;
        };
        self.keys.kept = self.keys.kept.saturating_sub(conv.idempotency.len());
        self.tenants[conv.tenant as usize].auto_close.cancel(id);
        match log {
            Some(log) => log.forget_conversation(id),
            None => self.forgotten_in_recovery.push(id),
        }
        self.forgotten_total += 1;
    }

    /// Before recovery: the log starts at `log_start` (above 0 when retention deleted its
    /// head). Retention keeps every record from the first record of each conversation the
    /// engine held on ([`Engine::retention_floor`]), so a record whose conversation opened
    /// before `log_start` belongs to one that was closed and forgotten before its head went:
    /// recovery skips it instead of failing on it.
    pub fn begin_recovery(&mut self, log_start: u64) {
        self.recovery_log_start = log_start;
    }

    /// Records recovery skipped as belonging to conversations forgotten before retention.
    pub fn recovery_skipped(&self) -> u64 {
        self.recovery_skipped
    }

    /// In recovery: `id` is unknown and the log lost its head, so it opened before the log's
    /// start (see [`Engine::begin_recovery`]); counted, and left out of the log's index.
    fn opened_before_log_start(&mut self, id: u64) -> bool {
        if self.recovery_log_start == 0 || self.conversations.contains_key(&id) {
            return false;
        }
        self.recovery_skipped += 1;
        // A conversation's skipped records mostly come in a row: one entry for them.
        if self.forgotten_in_recovery.last() != Some(&id) {
            self.forgotten_in_recovery.push(id);
        }
        true
    }

    /// The offset log retention may delete records below: at most `cut` (where retention
    /// would start the log by its own rules), never past the first record of a conversation
    /// the shard still needs (every one but those closed with all their records released),
    /// nor past the opening record of the newest conversation (see `newest_opening`).
    pub fn retention_floor(&self, cut: u64) -> u64 {
        let needed = self
            .conversations
            .values()
            .filter(|c| !(c.state == ConversationState::Closed && c.released_seq == c.last_seq))
            .map(|c| c.first_offset)
            .min()
            .unwrap_or(u64::MAX);
        cut.min(needed).min(self.newest_opening)
    }

    /// After retention moved the log's start to `start`: forgets the closed conversations that
    /// began below it (their first records are gone; what is left of them is skipped by a
    /// later recovery), and drops the stale entries of `closed`.
    pub fn forget_below(&mut self, log: &mut dyn RecordLog, start: u64) {
        let doomed: Vec<u64> = self
            .closed
            .iter()
            .copied()
            .filter(|id| {
                self.conversations
                    .get(id)
                    .is_some_and(|c| c.first_offset < start)
            })
            .collect();
        for id in doomed {
            self.forget_one(Some(&mut *log), id);
        }
        let conversations = &self.conversations;
        self.closed.retain(|id| conversations.contains_key(id));
    }

    /// During recovery, between reads of the log: drops the conversations recovery forgot so
    /// far from the log's index (which the read builds), so it never holds them all.
    pub fn forget_in_log_during_recovery(&mut self, log: &mut dyn RecordLog) {
        for id in self.forgotten_in_recovery.drain(..) {
            log.forget_conversation(id);
        }
        // As live: closed conversations go while the index is past its high-water mark.
        self.relieve_index(log);
    }

    /// After recovery: drops the conversations recovery forgot from the log's index too, then
    /// forgets closed conversations while the index is past its high-water mark (the log
    /// indexes every record when it opens, forgotten conversations' too).
    pub fn forget_in_log_after_recovery(&mut self, log: &mut dyn RecordLog) {
        for id in std::mem::take(&mut self.forgotten_in_recovery) {
            log.forget_conversation(id);
        }
        self.relieve_index(log);
    }

    /// Forgets closed conversations while the log's conversation index is past
    /// [`INDEX_HIGH_WATER_PERCENT`] of its limit, down to [`INDEX_LOW_WATER_PERCENT`] (or
    /// until no closed conversation is left to forget).
    fn relieve_index(&mut self, log: &mut dyn RecordLog) {
        let (entries, max) = log.conversation_index();
        if entries.saturating_mul(100) < max.saturating_mul(INDEX_HIGH_WATER_PERCENT) {
            return;
        }
        loop {
            let (entries, max) = log.conversation_index();
            if entries.saturating_mul(100) < max.saturating_mul(INDEX_LOW_WATER_PERCENT) {
                return;
            }
            if self.forget_closed(Some(log), FORGET_BATCH) == 0 {
                return;
            }
        }
    }

    /// The log offset a reply must wait for: everything this engine appended so far.
    pub fn appended_end(&self) -> u64 {
        self.appended_end
    }

    /// Sets where the log stands after recovery.
    pub fn set_appended_end(&mut self, next_offset: u64) {
        self.appended_end = next_offset;
    }

    /// Deliveries waiting for durability.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// A failed append or sync: refuse writes from now on (fjall-style poisoning).
    pub fn poison(&mut self, why: String) {
        self.poisoned.get_or_insert(why);
        // Nothing of this batch may be delivered: it may not be durable.
        self.pending.clear();
        self.pending_inbox.clear();
    }

    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    pub fn tenant_index(&self, name: &str) -> Option<u16> {
        self.tenants
            .iter()
            .position(|t| &*t.name == name)
            .map(|i| i as u16)
    }

    pub fn tenant_name(&self, tenant: u16) -> Option<&str> {
        self.tenants.get(tenant as usize).map(|t| &*t.name)
    }

    /// Hands deliveries whose records are durable (below `durable_offset`) to subscribers.
    pub fn release(&mut self, durable_offset: u64) {
        while let Some((at, _)) = self.pending.front()
            && *at <= durable_offset
        {
            let (_, mut delivery) = self.pending.pop_front().expect("front exists");
            if let Some(conv) = self.conversations.get_mut(&delivery.conversation_id) {
                if delivery.seq > 0 {
                    assert_eq!(delivery.seq, conv.released_seq + 1, "dense release order");
                    conv.released_seq = delivery.seq;
                }
                conv.subscribers
                    .retain(|s| !s.is_closed() && !s.is_overflowed());
                if delivery.json.is_empty()
                    && !conv.subscribers.is_empty()
                    && !render_late(&mut delivery)
                {
                    // Cannot happen for a record this engine wrote; should it, the
                    // subscribers resume from the log rather than miss the record.
                    debug_assert!(false, "a stored record failed to render");
                    for sub in conv.subscribers.drain(..) {
                        sub.give_up();
                    }
                }
                for sub in &conv.subscribers {
                    sub.push(delivery.clone());
                }
            }
            self.recycle(delivery);
        }
        while let Some((at, ..)) = self.pending_inbox.front()
            && *at <= durable_offset
        {
            let (_, tenant, agent, delivery) =
                self.pending_inbox.pop_front().expect("front exists");
            if let Some(list) = self.tenants[tenant as usize].inboxes.get_mut(&agent) {
                list.retain(|s| !s.is_closed() && !s.is_overflowed());
                for sub in list.iter() {
                    sub.push(delivery.clone());
                }
            }
        }
    }

    /// A cleared delivery from the pool (unshared, so the caller may fill it), or a new one.
    fn fresh_delivery(&mut self) -> Arc<Delivery> {
        self.delivery_pool
            .pop()
            .or_else(|| self.delivery_returns.pop())
            .unwrap_or_default()
    }

    /// The queue other shards give this engine's deliveries back through (the gateway makes
    /// one per shard up front; an engine has its own until then).
    pub fn use_delivery_returns(&mut self, returns: Arc<DeliveryReturns>) {
        self.delivery_returns = returns;
    }

    /// Keeps a released delivery for reuse when nobody else holds it and its buffers are small.
    fn recycle(&mut self, mut delivery: Arc<Delivery>) {
        if self.delivery_pool.len() >= DELIVERY_POOL_MAX {
            return;
        }
        if clear_for_reuse(&mut delivery) {
            self.delivery_pool.push(delivery);
        }
    }

    fn conv(&self, id: u64) -> Result<&Conversation, EngineError> {
        self.conversations
            .get(&id)
            .map(|c| &**c)
            .ok_or(EngineError::NotFound)
    }

    /// May `actor` see this conversation? Its visitor, the tenant's integration, the assigned
    /// agent, and (extension) the agents of its group, so they can look before accepting.
    fn check_read(&self, id: u64, actor: &Actor) -> Result<(), EngineError> {
        let conv = self.conv(id)?;
        match actor {
            Actor::Visitor {
                conversation_id, ..
            } if *conversation_id == id => Ok(()),
            Actor::Visitor { .. } => Err(EngineError::Forbidden(
                "the visitor token is for another conversation".into(),
            )),
            Actor::Integration { tenant } if *tenant == conv.tenant => Ok(()),
            Actor::Agent { tenant, name } if *tenant == conv.tenant => {
                if conv.agent.as_deref() == Some(&**name) || self.agent_in_group(conv, name) {
                    Ok(())
                } else {
                    Err(EngineError::Forbidden(
                        "the conversation is neither assigned to you nor in your groups".into(),
                    ))
                }
            }
            _ => Err(EngineError::Forbidden(
                "the conversation belongs to another tenant".into(),
            )),
        }
    }

    fn agent_in_group(&self, conv: &Conversation, agent: &str) -> bool {
        let tenant = &self.tenants[conv.tenant as usize];
        let router = &tenant.router;
        let (Some(agent), Some(group)) = (router.agent_id(agent), router.group_id(&conv.group))
        else {
            return false;
        };
        tenant.agent_groups[agent.index()].contains(&group)
    }

    fn check_writable(&self) -> Result<(), EngineError> {
        match &self.poisoned {
            Some(why) => Err(EngineError::Storage(why.clone())),
            None => Ok(()),
        }
    }

    /// Refuses a command (503) while the log's conversation index is within
    /// [`INDEX_ROOM_MIN`] entries of its limit (only when none of the shard's conversations is
    /// closed: the tick forgets those first). Checked before the command changes anything, so
    /// the index's own refusal does not come halfway through it, after the router moved.
    fn check_room(&self, log: &dyn RecordLog) -> Result<(), EngineError> {
        let (entries, max) = log.conversation_index();
        if entries.saturating_add(INDEX_ROOM_MIN) > max {
            return Err(EngineError::Overloaded(format!(
                "the shard log's conversation index is full ({entries} of {max} entries) and \
                 none of its conversations is closed"
            )));
        }
        Ok(())
    }

    /// Opens a conversation owned by this shard.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        log: &mut dyn RecordLog,
        tenant: u16,
        visitor_name: &str,
        channel: &str,
        text: Option<&str>,
        group_hint: Option<&str>,
        now_us: u64,
    ) -> Result<Created, EngineError> {
        self.check_writable()?;
        self.check_room(log)?;
        if self.conversations.len() >= self.limits.conversations_max {
            self.forget_closed(Some(log), FORGET_BATCH);
        }
        let t = self
            .tenants
            .get(tenant as usize)
            .ok_or_else(|| EngineError::BadRequest("unknown tenant".into()))?;
        if self.conversations.len() >= self.limits.conversations_max {
            return Err(EngineError::Overloaded(format!(
                "this shard holds conversations_max = {} conversations, none of them closed",
                self.limits.conversations_max
            )));
        }
        let group_name: String = match group_hint {
            Some(g) => g.to_owned(),
            None => self.registry.tenants()[tenant as usize]
                .classify_group(text)
                .to_owned(),
        };
        let group = t.router.group_id(&group_name).ok_or_else(|| {
            EngineError::BadRequest(format!("group {group_name:?} does not exist"))
        })?;
        let id = ConversationId::from_parts(self.shard, self.next_local)
            .ok_or_else(|| EngineError::Overloaded("conversation ids exhausted".into()))?
            .0;
        let order_key = self.next_order;
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let routed =
            self.tenants[tenant as usize]
                .router
                .enqueue(id, group, order_key, &mut effects);
        if let Err(e) = routed {
            self.effects = effects;
            return Err(EngineError::Overloaded(e.to_string()));
        }
        self.next_local += 1;
        self.next_order += 1;
        let visitor_id = format!("v{:x}", id);
        self.conversations.insert(
            id,
            Box::new(Conversation {
                tenant,
                state: ConversationState::Queued,
                group: group_name.as_str().into(),
                agent: None,
                channel: channel.into(),
                visitor_id: visitor_id.as_str().into(),
                last_seq: 0,
                released_seq: 0,
                order_key,
                idempotency: HashMap::new(),
                idempotency_order: VecDeque::new(),
                subscribers: Vec::new(),
                auto_replies_sent: 0,
                first_offset: self.appended_end,
            }),
        );
        self.newest_opening = self.appended_end;
        let position = self.tenants[tenant as usize]
            .router
            .position(id)
            .unwrap_or(1);
        let opened = Opened {
            channel: channel.to_owned(),
            visitor_id: visitor_id.clone(),
            visitor_name: visitor_name.to_owned(),
        };
        let queued = Event::Queued {
            group: group_name.clone(),
            queue_position: position,
            reason: None,
        };
        let appended = self.append_event(log, id, None, queued, Some(opened), now_us);
        if let Err(e) = appended {
            // Its opening record was not stored (a refusal of the log, e.g. its conversation
            // index is full, does not poison the engine): the conversation must not exist
            // either, or later records of it would have no opening and recovery would fail.
            self.conversations.remove(&id);
            let _ = self.tenants[tenant as usize]
                .router
                .resolve(id, &mut effects);
            effects.clear();
            self.effects = effects;
            return Err(e);
        }
        // The opening `queued` is written above with its `opened` facts; skip its effect.
        effects.retain(|e| !matches!(e, Effect::Queued { conv, .. } if *conv == id));
        let mut first_message_seq = None;
        if let Some(text) = text {
            let from = ParticipantRef {
                role: Role::Visitor,
                id: &visitor_id,
            };
            match self
                .append_message(log, id, from, text, None, now_us)
                .and_then(|sent| self.auto_reply(log, id, text, now_us).map(|()| sent))
            {
                Ok(sent) => first_message_seq = Some(sent.seq),
                Err(e) => {
                    self.effects = effects;
                    return Err(e);
                }
            }
        }
        self.tenants[tenant as usize].router.dispatch(&mut effects);
        let result = self.apply_effects(log, tenant, &effects, now_us);
        self.effects = effects;
        result?;
        let conv = self.conv(id)?;
        Ok(Created {
            conversation_id: id,
            visitor_id,
            state: conv.state,
            group: group_name,
            queue_position: self.tenants[tenant as usize].router.position(id),
            first_message_seq,
        })
    }

    /// Turns routing effects into stored events and inbox notices.
    fn apply_effects(
        &mut self,
        log: &mut dyn RecordLog,
        tenant: u16,
        effects: &[Effect],
        now_us: u64,
    ) -> Result<(), EngineError> {
        for effect in effects {
            match *effect {
                Effect::Queued { conv, group } => {
                    let router = &self.tenants[tenant as usize].router;
                    let group_name = router.group_name(group).unwrap_or("").to_owned();
                    let position = router.position(conv).unwrap_or(1);
                    let Some(c) = self.conversations.get(&conv) else {
                        continue;
                    };
                    // Why it (re-)entered the queue: the command's own reason (transfer,
                    // reopen), else an assigned one lost its agent; a new one has none.
                    let reason = match self.queue_reason {
                        Some((c2, why)) if c2 == conv => Some(why.to_owned()),
                        _ if c.state == ConversationState::Assigned => {
                            Some("agent_offline".to_owned())
                        }
                        _ => None,
                    };
                    let event = Event::Queued {
                        group: group_name,
                        queue_position: position,
                        reason,
                    };
                    self.append_event(log, conv, None, event, None, now_us)?;
                    self.offer(tenant, group, conv);
                }
                Effect::Assigned { conv, agent, group } => {
                    let router = &self.tenants[tenant as usize].router;
                    let event = Event::Assigned {
                        agent: router.agent_name(agent).unwrap_or("").to_owned(),
                        group: router.group_name(group).unwrap_or("").to_owned(),
                    };
                    let by = match self.accepted_by.take() {
                        Some((c, who)) if c == conv => Some(who),
                        other => {
                            self.accepted_by = other;
                            None
                        }
                    };
                    self.append_event(log, conv, by, event, None, now_us)?;
                    self.notify_agent(tenant, agent, conv);
                }
                Effect::QueuePositionChanged { conv, position } => {
                    // A conversation that (re)entered the queue in this batch announced its
                    // position in its stored `queued` event already.
                    let entered = effects
                        .iter()
                        .any(|e| matches!(e, Effect::Queued { conv: c, .. } if *c == conv));
                    if !entered {
                        self.announce_position(conv, position, now_us);
                    }
                }
                Effect::Unassigned { .. } | Effect::AgentOffline { .. } => {}
            }
        }
        Ok(())
    }

    /// Tells the conversation's subscribers its new queue position: a `queued` event with
    /// `seq` 0 and reason `position`, delivered live like typing and never stored (a queue of n
    /// moves n-1 positions per assignment; the view and the stored `queued` event give the
    /// position to anyone who was not listening).
    fn announce_position(&mut self, id: u64, position: u32, now_us: u64) {
        let Some(conv) = self.conversations.get(&id) else {
            return;
        };
        if conv.subscribers.is_empty() || conv.state != ConversationState::Queued {
            return;
        }
        let message = kefu_protocol::model::EventMessage {
            conversation_id: ConversationId(id),
            seq: 0,
            ts: now_us,
            from: Some(Participant::new(Role::System, "kefu")),
            event: Event::Queued {
                group: conv.group.to_string(),
                queue_position: position,
                reason: Some("position".to_owned()),
            },
        };
        // An event that cannot be encoded only costs the listeners this notice.
        let _ = self.push_unstored(message);
    }

    /// Queues a live-only event (typing, read, queue position) for the conversation's
    /// subscribers, in a pooled delivery: released with the records appended before it, so it
    /// never overtakes them; never stored, so its `seq` is 0.
    fn push_unstored(
        &mut self,
        message: kefu_protocol::model::EventMessage,
    ) -> Result<(), serde_json::Error> {
        let (id, ts) = (message.conversation_id.0, message.ts);
        let mut delivery = self.fresh_delivery();
        let d = Arc::get_mut(&mut delivery).expect("a fresh delivery is unshared");
        serde_json::to_writer(
            &mut d.json,
            &kefu_protocol::model::ServerMessage::Event(message),
        )?;
        d.conversation_id = id;
        d.seq = 0;
        frame::encode_into(&Header::new(Kind::Event, id, 0, ts), &d.json, &mut d.frame);
        self.pending.push_back((self.appended_end, delivery));
        Ok(())
    }

    /// Sends the conversation's latest record to the agents of `group` (an offer).
    fn offer(&mut self, tenant: u16, group: GroupId, conv: u64) {
        let Some((at, delivery)) = self.pending.back().cloned() else {
            return;
        };
        assert_eq!(delivery.conversation_id, conv);
        let t = &self.tenants[tenant as usize];
        for (&agent, _) in t.inboxes.iter() {
            if t.agent_groups[agent.index()].contains(&group) {
                self.pending_inbox
                    .push_back((at, tenant, agent, delivery.clone()));
            }
        }
    }

    fn notify_agent(&mut self, tenant: u16, agent: AgentId, conv: u64) {
        let Some((at, delivery)) = self.pending.back().cloned() else {
            return;
        };
        assert_eq!(delivery.conversation_id, conv);
        if self.tenants[tenant as usize].inboxes.contains_key(&agent) {
            self.pending_inbox.push_back((at, tenant, agent, delivery));
        }
    }

    fn next_seq(&mut self, id: u64) -> Result<u64, EngineError> {
        let conv = self
            .conversations
            .get_mut(&id)
            .ok_or(EngineError::NotFound)?;
        Ok(conv.last_seq + 1)
    }

    fn append_event(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        from: Option<Participant>,
        event: Event,
        opened: Option<Opened>,
        now_us: u64,
    ) -> Result<u64, EngineError> {
        let seq = self.next_seq(id)?;
        let conv = &self.conversations[&id];
        let next_state = apply_event(Some(conv.state), &event)
            .or_else(|e| {
                // The opening `queued` starts from no state.
                if opened.is_some() {
                    apply_event(None, &event)
                } else {
                    Err(e)
                }
            })
            .map_err(|e| EngineError::Conflict {
                reason: e.to_string(),
                state: conv.state,
            })?;
        let record = EventRecord {
            tenant: self.tenants[conv.tenant as usize].name.to_string(),
            conversation_id: ConversationId(id),
            seq,
            ts: now_us,
            from,
            event,
            opened,
        };
        self.scratch.clear();
        serde_json::to_writer(&mut self.scratch, &record)
            .map_err(|e| EngineError::Storage(e.to_string()))?;
        let mut delivery = self.fresh_delivery();
        let d = Arc::get_mut(&mut delivery).expect("a fresh delivery is unshared");
        record.write_ws_json(&mut d.json);
        self.write(log, Kind::Event, id, seq, now_us, delivery)?;
        let conv = self.conversations.get_mut(&id).expect("checked");
        fold_event(conv, &record.event, next_state);
        if next_state == ConversationState::Closed {
            self.closed.push_back(id);
        }
        self.schedule_close(id, now_us);
        Ok(seq)
    }

    /// Stores a message. Written from borrowed parts into reused buffers: no allocation in
    /// steady state (see `tests/alloc_send.rs`).
    fn append_message(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        from: ParticipantRef<'_>,
        text: &str,
        client_msg_id: Option<&str>,
        now_us: u64,
    ) -> Result<Sent, EngineError> {
        let seq = self.next_seq(id)?;
        let mut delivery = self.fresh_delivery();
        let conv = &self.conversations[&id];
        let record = MessageRecordRef {
            tenant: &self.tenants[conv.tenant as usize].name,
            conversation_id: ConversationId(id),
            seq,
            ts: now_us,
            from,
            text,
            client_msg_id,
        };
        self.scratch.clear();
        serde_json::to_writer(&mut self.scratch, &record)
            .map_err(|e| EngineError::Storage(e.to_string()))?;
        // The JSON form only for a conversation someone follows; if a subscriber comes in
        // before the record is released, `release` renders it then, from the frame.
        if !conv.subscribers.is_empty() {
            let d = Arc::get_mut(&mut delivery).expect("a fresh delivery is unshared");
            record.write_ws_json(&mut d.json);
        }
        let log_offset = self.write(log, Kind::Message, id, seq, now_us, delivery)?;
        let conv = self.conversations.get_mut(&id).expect("checked");
        conv.last_seq = seq;
        if let Some(key) = client_msg_id {
            self.remember_key(id, key, seq, now_us);
        }
        Ok(Sent {
            seq,
            ts: now_us,
            duplicate: false,
            log_offset,
        })
    }

    /// Appends `self.scratch` as the payload of a record and queues its delivery (`delivery`:
    /// unshared, its `json` already rendered; the frame and ids are filled in here).
    ///
    /// A record the log refuses without writing it fails this command only (413 when too
    /// large, see [`AppendError`]); callers change no state before their record is written, so
    /// the conversation stays as it was. Records the same command wrote before stay: a visitor
    /// send that reopened a conversation keeps the reopen. (A create's first message cannot be
    /// too large: it comes in an HTTP body, and the record limit is above the body limit.)
    fn write(
        &mut self,
        log: &mut dyn RecordLog,
        kind: Kind,
        id: u64,
        seq: u64,
        now_us: u64,
        mut delivery: Arc<Delivery>,
    ) -> Result<u64, EngineError> {
        let header = Header::new(kind, id, seq, now_us);
        let d = Arc::get_mut(&mut delivery).expect("a delivery is shared only once queued");
        d.frame.clear();
        let offset = log
            .append_record(&header, &self.scratch, &mut d.frame)
            .map_err(|e| match e {
                AppendError::TooLarge(why) => EngineError::TooLarge(why),
                AppendError::Refused(why) => {
                    EngineError::Overloaded(format!("the shard log refused the record: {why}"))
                }
                AppendError::Failed(why) => {
                    self.poison(why.clone());
                    EngineError::Storage(why)
                }
            })?;
        d.conversation_id = id;
        d.seq = seq;
        self.appended_end = offset + 1;
        self.pending.push_back((offset + 1, delivery));
        Ok(offset)
    }

    /// (Re)schedules the idle close of a conversation after its state changed.
    fn schedule_close(&mut self, id: u64, now_us: u64) {
        let Some(conv) = self.conversations.get(&id) else {
            return;
        };
        let timers = &mut self.tenants[conv.tenant as usize].auto_close;
        if conv.state == ConversationState::Resolved {
            timers.resolved(id, now_us / 1000);
        } else {
            timers.cancel(id);
        }
    }

    /// Closes resolved conversations whose idle time ran out by `now_ms`.
    fn close_idle(&mut self, log: &mut dyn RecordLog, now_ms: u64) {
        for tenant in 0..self.tenants.len() {
            while self.poisoned.is_none()
                && self.check_room(log).is_ok()
                && let Some(id) = self.tenants[tenant].auto_close.pop_due(now_ms)
            {
                self.close_one_idle(log, id, now_ms);
            }
        }
    }

    fn close_one_idle(&mut self, log: &mut dyn RecordLog, id: u64, now_ms: u64) {
        let event = Event::Closed {
            reason: "idle".into(),
        };
        let from = Some(Participant::new(Role::System, "kefu"));
        // A failure poisons the engine; nothing more to do here.
        let _ = self.append_event(log, id, from, event, None, now_ms * 1000);
    }

    /// The tenant's keyword auto-reply to a visitor message, stored as a system message.
    fn auto_reply(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        text: &str,
        now_us: u64,
    ) -> Result<(), EngineError> {
        let conv = self.conv(id)?;
        let registry = self.registry.clone();
        let tenant = &registry.tenants()[conv.tenant as usize];
        let sent = conv.auto_replies_sent;
        let Some(reply) = tenant.auto_replies.find(text, sent, &mut self.fold_scratch) else {
            return Ok(());
        };
        let from = ParticipantRef {
            role: Role::System,
            id: "kefu",
        };
        self.append_message(log, id, from, reply.text, None, now_us)?;
        if let Some(conv) = self.conversations.get_mut(&id) {
            conv.auto_replies_sent += 1;
        }
        Ok(())
    }

    /// Stores a message from a participant. A retry with a known `client_msg_id` returns the
    /// original seq and stores nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        actor: &Actor,
        text: &str,
        client_msg_id: Option<&str>,
        now_us: u64,
    ) -> Result<Sent, EngineError> {
        let conv = self.conv(id)?;
        // The sender's id as a shared string: no copy per message.
        let (role, from_id): (Role, Arc<str>) = match actor {
            Actor::Visitor {
                conversation_id, ..
            } if *conversation_id == id => (Role::Visitor, conv.visitor_id.clone()),
            Actor::Agent { tenant, name }
                if *tenant == conv.tenant && conv.agent.as_deref() == Some(&**name) =>
            {
                (Role::Agent, name.clone())
            }
            Actor::Agent { tenant, .. } if *tenant == conv.tenant => {
                return Err(EngineError::Forbidden(
                    "only the assigned agent can write here; accept it first".into(),
                ));
            }
            _ => {
                return Err(EngineError::Forbidden(
                    "not a participant of this conversation".into(),
                ));
            }
        };
        if let Some(key) = client_msg_id
            && let Some(&(seq, ts)) = conv.idempotency.get(key)
        {
            return Ok(Sent {
                seq,
                ts,
                duplicate: true,
                log_offset: 0,
            });
        }
        self.check_writable()?;
        self.check_room(log)?;
        match conv.state {
            ConversationState::Closed => {
                return Err(EngineError::Conflict {
                    reason: "the conversation is closed".into(),
                    state: ConversationState::Closed,
                });
            }
            ConversationState::Resolved if role == Role::Visitor => {
                // The visitor writing again reopens the conversation.
                self.reopen(log, id, Some(Participant::new(role, &*from_id)), now_us)?;
            }
            ConversationState::Resolved => {
                return Err(EngineError::Conflict {
                    reason: "the conversation is resolved; reopen it first".into(),
                    state: ConversationState::Resolved,
                });
            }
            _ => {}
        }
        let visitor = role == Role::Visitor;
        if visitor {
            let tenant = self.conv(id)?.tenant;
            self.tenants[tenant as usize]
                .rate
                .check(id, now_us / 1000)
                .map_err(|l| EngineError::RateLimited {
                    retry_after_s: l.retry_after_s(),
                })?;
        }
        // An agent's `/name` is the tenant's canned reply `name`.
        let registry = self.registry.clone();
        let text = match role {
            Role::Agent => {
                let tenant = self.conv(id)?.tenant;
                registry.tenants()[tenant as usize]
                    .canned_replies
                    .expand(text)
                    .unwrap_or(text)
            }
            _ => text,
        };
        let from = ParticipantRef { role, id: &from_id };
        let sent = self.append_message(log, id, from, text, client_msg_id, now_us)?;
        if visitor {
            self.auto_reply(log, id, text, now_us)?;
        }
        Ok(sent)
    }

    fn reopen(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        from: Option<Participant>,
        now_us: u64,
    ) -> Result<(), EngineError> {
        let conv = self.conv(id)?;
        // A reopened conversation is a new request: it queues behind those already waiting.
        let (tenant, order_key) = (conv.tenant, self.next_order);
        let group = self.tenants[tenant as usize]
            .router
            .group_id(&conv.group)
            .ok_or(EngineError::NotFound)?;
        if conv.state != ConversationState::Resolved {
            return Err(EngineError::Conflict {
                reason: format!("cannot reopen a {} conversation", conv.state.as_str()),
                state: conv.state,
            });
        }
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let result = (|| {
            self.tenants[tenant as usize]
                .router
                .enqueue(id, group, order_key, &mut effects)
                .map_err(|e| EngineError::Overloaded(e.to_string()))?;
            self.next_order += 1;
            if let Some(c) = self.conversations.get_mut(&id) {
                c.order_key = order_key;
            }
            self.append_event(log, id, from, Event::Reopened, None, now_us)?;
            self.tenants[tenant as usize].router.dispatch(&mut effects);
            self.queue_reason = Some((id, "reopened"));
            let applied = self.apply_effects(log, tenant, &effects, now_us);
            self.queue_reason = None;
            applied
        })();
        self.effects = effects;
        result
    }

    /// Agent commands (accept, resolve, reopen, transfer). Illegal ones answer 409 with the
    /// conversation's state.
    pub fn transition(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        agent_name: &str,
        tenant: u16,
        what: &Transition,
        now_us: u64,
    ) -> Result<ConversationState, EngineError> {
        self.check_writable()?;
        self.check_room(log)?;
        let conv = self.conv(id)?;
        if conv.tenant != tenant {
            return Err(EngineError::Forbidden(
                "the conversation belongs to another tenant".into(),
            ));
        }
        let state = conv.state;
        let assigned_to_me = conv.agent.as_deref() == Some(agent_name);
        let router = &self.tenants[tenant as usize].router;
        let agent = router
            .agent_id(agent_name)
            .ok_or_else(|| EngineError::Forbidden("unknown agent".into()))?;
        let conflict = |reason: String| EngineError::Conflict { reason, state };
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let me = Participant::new(Role::Agent, agent_name);
        let result = (|| -> Result<(), EngineError> {
            match what {
                Transition::Accept => {
                    if state != ConversationState::Queued {
                        return Err(conflict(format!(
                            "only a queued conversation can be accepted, this one is {}",
                            state.as_str()
                        )));
                    }
                    let router = &mut self.tenants[tenant as usize].router;
                    if !router.is_online(agent) {
                        router.agent_online(agent).map_err(route_error(state))?;
                    }
                    router
                        .accept(agent, id, &mut effects)
                        .map_err(route_error(state))?;
                    self.accepted_by = Some((id, me));
                    let applied = self.apply_effects(log, tenant, &effects, now_us);
                    self.accepted_by = None;
                    applied
                }
                Transition::Resolve => {
                    if state != ConversationState::Assigned {
                        return Err(conflict(format!(
                            "only an assigned conversation can be resolved, this one is {}",
                            state.as_str()
                        )));
                    }
                    if !assigned_to_me {
                        return Err(EngineError::Forbidden(
                            "the conversation is assigned to another agent".into(),
                        ));
                    }
                    self.append_event(log, id, Some(me), Event::Resolved, None, now_us)?;
                    let router = &mut self.tenants[tenant as usize].router;
                    router
                        .resolve(id, &mut effects)
                        .map_err(route_error(state))?;
                    router.dispatch(&mut effects);
                    self.apply_effects(log, tenant, &effects, now_us)
                }
                Transition::Reopen => self.reopen(log, id, Some(me), now_us),
                Transition::TransferToAgent(to) | Transition::TransferToGroup(to) => {
                    if !matches!(
                        state,
                        ConversationState::Queued | ConversationState::Assigned
                    ) {
                        return Err(conflict(format!(
                            "cannot transfer a {} conversation",
                            state.as_str()
                        )));
                    }
                    if state == ConversationState::Assigned && !assigned_to_me {
                        return Err(EngineError::Forbidden(
                            "the conversation is assigned to another agent".into(),
                        ));
                    }
                    let router = &mut self.tenants[tenant as usize].router;
                    let target = match what {
                        Transition::TransferToAgent(_) => {
                            let to_id = router.agent_id(to).ok_or_else(|| {
                                EngineError::BadRequest(format!("no agent {to:?}"))
                            })?;
                            router
                                .transfer_to_agent(id, to_id, &mut effects)
                                .map_err(route_error(state))?;
                            TransferTarget::Agent(to.clone())
                        }
                        _ => {
                            let group = router.group_id(to).ok_or_else(|| {
                                EngineError::BadRequest(format!("no group {to:?}"))
                            })?;
                            router
                                .transfer_to_group(id, group, &mut effects)
                                .map_err(route_error(state))?;
                            router.dispatch(&mut effects);
                            TransferTarget::Group(to.clone())
                        }
                    };
                    let from_agent = self.conv(id)?.agent.as_deref().map(str::to_owned);
                    let event = Event::Transferred {
                        from_agent,
                        to: target,
                    };
                    self.append_event(log, id, Some(me), event, None, now_us)?;
                    if let Transition::TransferToGroup(group) = what {
                        // A group transfer re-queues even where the router reports no change
                        // of queue (it was already waiting elsewhere): the state follows the
                        // effects below.
                        let c = self.conversations.get_mut(&id).expect("checked");
                        c.group = group.as_str().into();
                    }
                    self.queue_reason = Some((id, "transferred"));
                    let applied = self.apply_effects(log, tenant, &effects, now_us);
                    self.queue_reason = None;
                    applied
                }
            }
        })();
        self.effects = effects;
        result?;
        Ok(self.conv(id)?.state)
    }

    /// An agent went online or offline (broadcast to every shard). Offline re-queues its
    /// conversations on this shard.
    pub fn agent_status(
        &mut self,
        log: &mut dyn RecordLog,
        tenant: u16,
        agent_name: &str,
        online: bool,
        now_us: u64,
    ) -> Result<(), EngineError> {
        self.check_room(log)?;
        let Some(t) = self.tenants.get_mut(tenant as usize) else {
            return Err(EngineError::BadRequest("unknown tenant".into()));
        };
        let agent = t
            .router
            .agent_id(agent_name)
            .ok_or_else(|| EngineError::Forbidden("unknown agent".into()))?;
        let mut effects = std::mem::take(&mut self.effects);
        effects.clear();
        let t = &mut self.tenants[tenant as usize];
        if online {
            let _ = t.router.agent_online(agent);
        } else {
            let _ = t.router.agent_offline(agent, &mut effects);
        }
        t.router.dispatch(&mut effects);
        let result = if self.poisoned.is_some() {
            Ok(())
        } else {
            // Conversations leaving this agent go back to queued in the engine's state too.
            for effect in &effects {
                if let Effect::Unassigned { conv, .. } = *effect
                    && let Some(c) = self.conversations.get_mut(&conv)
                {
                    c.agent = None;
                }
            }
            self.apply_effects(log, tenant, &effects, now_us)
        };
        self.effects = effects;
        result
    }

    /// Registers (or drops, with `None`) an agent socket's inbox on this shard.
    pub fn agent_inbox(&mut self, tenant: u16, agent_name: &str, outbox: Arc<Outbox>) {
        let Some(t) = self.tenants.get_mut(tenant as usize) else {
            return;
        };
        if let Some(agent) = t.router.agent_id(agent_name) {
            let list = t.inboxes.entry(agent).or_default();
            list.retain(|s| !s.is_closed());
            list.push(outbox);
            // Back within the grace period: it keeps its conversations.
            let _ = t.router.agent_socket_restored(agent);
        }
    }

    /// Typing and read notices: delivered live in order with the batch, never stored.
    ///
    /// Each one fans out to every subscriber of the conversation (up to
    /// `subscribers_per_conversation_max`), so each sender is rate-limited like a visitor's
    /// messages: the tenant's `visitor_rate_limit`, in a bucket per conversation, sender (the
    /// visitor, each agent, the integrations) and kind, so typing cannot use up the reads.
    /// Over the limit:
    /// - `typing` is dropped silently (answered `Ok`, counted in [`Self::notices_dropped`]): a
    ///   typing indicator is a hint that the other side lets expire and the next keystroke
    ///   renews, and a client sending one per keystroke should not get an error for each;
    /// - `read` is refused with 429 ([`EngineError::RateLimited`]; a WebSocket `error`, a binary
    ///   `Error` frame with code 429): it says how far the sender has read, which a silent drop
    ///   would lose, so the client sends its latest position again after `retry_after_s`.
    pub fn ephemeral(
        &mut self,
        id: u64,
        actor: &Actor,
        event: Event,
        now_us: u64,
    ) -> Result<(), EngineError> {
        self.check_read(id, actor)?;
        let conv = self.conv(id)?;
        let tenant = &self.tenants[conv.tenant as usize];
        let (from, sender) = match actor {
            Actor::Visitor { .. } => (
                Participant::new(Role::Visitor, &*conv.visitor_id),
                NoticeSender::Visitor,
            ),
            Actor::Agent { name, .. } => {
                let agent = tenant
                    .router
                    .agent_id(name)
                    .ok_or_else(|| EngineError::Forbidden("unknown agent".into()))?;
                (
                    Participant::new(Role::Agent, &**name),
                    NoticeSender::Agent(agent.index()),
                )
            }
            Actor::Integration { .. } => (
                Participant::new(Role::System, "kefu"),
                NoticeSender::Integration,
            ),
        };
        apply_event(Some(conv.state), &event).map_err(|e| EngineError::Conflict {
            reason: e.to_string(),
            state: conv.state,
        })?;
        let typing = matches!(event, Event::Typing);
        let tenant = conv.tenant as usize;
        let allowed = self.tenants[tenant]
            .notices
            .check(notice_key(id, sender, typing), now_us / 1000);
        match allowed {
            Ok(()) => {}
            Err(_) if typing => {
                self.notices_dropped += 1;
                return Ok(());
            }
            Err(limited) => {
                return Err(EngineError::RateLimited {
                    retry_after_s: limited.retry_after_s(),
                });
            }
        }
        let message = kefu_protocol::model::EventMessage {
            conversation_id: ConversationId(id),
            seq: 0,
            ts: now_us,
            from: Some(from),
            event,
        };
        self.push_unstored(message)
            .map_err(|e| EngineError::BadRequest(e.to_string()))
    }

    /// Typing notices dropped by the rate limit so far (see [`Self::ephemeral`]).
    pub fn notices_dropped(&self) -> u64 {
        self.notices_dropped
    }

    /// The conversation as `GET /v1/conversations/{id}` shows it.
    pub fn view(&self, id: u64, actor: &Actor) -> Result<ConversationView, EngineError> {
        self.check_read(id, actor)?;
        let conv = self.conv(id)?;
        Ok(ConversationView {
            conversation_id: ConversationId(id),
            state: conv.state,
            channel: conv.channel.to_string(),
            group: conv.group.to_string(),
            agent: conv.agent.as_deref().map(str::to_owned),
            queue_position: self.tenants[conv.tenant as usize].router.position(id),
            last_seq: conv.released_seq,
        })
    }

    /// Records after `after` (up to `limit` and never past what is durable), and, when the
    /// replay reaches the live edge and `subscriber` is given, registers it in the same step.
    pub fn replay(
        &mut self,
        log: &mut dyn RecordLog,
        id: u64,
        actor: &Actor,
        after: u64,
        limit: usize,
        subscriber: Option<Arc<Outbox>>,
    ) -> Result<Replay, EngineError> {
        self.check_read(id, actor)?;
        let conv = self.conv(id)?;
        let released = conv.released_seq;
        let limit = limit.clamp(1, self.limits.history_limit_max);
        let mut entries = Vec::new();
        if after < released {
            let want = limit.min((released - after) as usize);
            let mut failure = None;
            log.read_conversation(id, after, want, &mut |header, payload| {
                if header.seq > released {
                    return;
                }
                match render_stored(header, payload) {
                    Ok(json) => entries.push(Arc::new(Delivery {
                        conversation_id: id,
                        seq: header.seq,
                        frame: frame::encode(header, payload),
                        json,
                    })),
                    Err(e) => failure = Some(e),
                }
            })
            .map_err(EngineError::Storage)?;
            if let Some(e) = failure {
                return Err(EngineError::Storage(e));
            }
        }
        let reached = entries.last().map_or(after, |d| d.seq) >= released;
        let mut registered = false;
        if reached && let Some(sub) = subscriber {
            let conv = self.conversations.get_mut(&id).expect("checked");
            conv.subscribers
                .retain(|s| !s.is_closed() && !s.is_overflowed());
            if conv.subscribers.len() >= self.limits.subscribers_per_conversation_max {
                return Err(EngineError::Overloaded(format!(
                    "{} subscribers on this conversation",
                    conv.subscribers.len()
                )));
            }
            conv.subscribers.push(sub);
            registered = true;
        }
        Ok(Replay {
            entries,
            last_seq: released,
            registered,
        })
    }

    /// Rebuilds state from one stored record (recovery, in log order).
    pub fn recover_record(&mut self, header: &Header, payload: &[u8]) -> Result<(), String> {
        let id = header.conversation_id;
        if frame::shard_of(id) != self.shard {
            return Err(format!(
                "record of conversation {id:#x} in shard {}",
                self.shard
            ));
        }
        let local = ConversationId(id).local();
        self.next_local = self.next_local.max(local + 1);
        match header.kind {
            Kind::Message => {
                let record: MessageRecord =
                    serde_json::from_slice(payload).map_err(|e| e.to_string())?;
                if self.opened_before_log_start(id) {
                    return Ok(());
                }
                let conv = self
                    .conversations
                    .get_mut(&id)
                    .ok_or_else(|| format!("message before opening in {id:#x}"))?;
                check_dense(conv.last_seq, header.seq, id)?;
                conv.last_seq = header.seq;
                conv.released_seq = header.seq;
                if record.from.role == Role::System {
                    conv.auto_replies_sent += 1;
                }
                if let Some(key) = &record.client_msg_id {
                    self.remember_key(id, key, header.seq, record.ts);
                }
            }
            Kind::Event => {
                let record: EventRecord =
                    serde_json::from_slice(payload).map_err(|e| e.to_string())?;
                let tenant = self
                    .tenant_index(&record.tenant)
                    .ok_or_else(|| format!("record of unknown tenant {:?}", record.tenant))?;
                if let Some(opened) = &record.opened {
                    let Event::Queued { group, .. } = &record.event else {
                        return Err("opening record is not queued".into());
                    };
                    self.conversations.insert(
                        id,
                        Box::new(Conversation {
                            tenant,
                            state: ConversationState::Queued,
                            group: group.as_str().into(),
                            agent: None,
                            channel: opened.channel.as_str().into(),
                            visitor_id: opened.visitor_id.as_str().into(),
                            last_seq: 0,
                            released_seq: 0,
                            order_key: self.next_order,
                            idempotency: HashMap::new(),
                            idempotency_order: VecDeque::new(),
                            subscribers: Vec::new(),
                            auto_replies_sent: 0,
                            first_offset: header.log_offset,
                        }),
                    );
                    self.next_order += 1;
                    if local + 1 >= self.next_local {
                        self.newest_opening = header.log_offset;
                    }
                } else if self.opened_before_log_start(id) {
                    return Ok(());
                }
                let conv = self
                    .conversations
                    .get_mut(&id)
                    .ok_or_else(|| format!("event before opening in {id:#x}"))?;
                check_dense(conv.last_seq, header.seq, id)?;
                let next = if record.opened.is_some() {
                    apply_event(None, &record.event)
                } else {
                    apply_event(Some(conv.state), &record.event)
                }
                .map_err(|e| e.to_string())?;
                fold_event(conv, &record.event, next);
                if record.event == Event::Reopened {
                    conv.order_key = self.next_order;
                    self.next_order += 1;
                }
                conv.last_seq = header.seq;
                conv.released_seq = header.seq;
                self.schedule_close(id, record.ts);
                if next == ConversationState::Closed {
                    self.closed.push_back(id);
                }
                // Recovery holds no more than the shard does live: the oldest closed
                // conversations are forgotten as newer ones come (the log forgets them after
                // recovery, `forget_in_log_after_recovery`).
                if self.conversations.len() > self.limits.conversations_max {
                    self.forget_closed(None, FORGET_BATCH);
                }
            }
            other => return Err(format!("unexpected record kind {other:?}")),
        }
        Ok(())
    }

    /// After recovery: puts open conversations back into the routers. Assigned ones go back to
    /// their agent, who counts as online with a lost socket, so it keeps them for the grace
    /// period and loses them to the queue if it does not come back.
    pub fn finish_recovery(&mut self, now_ms: u64) {
        let mut ids: Vec<(u64, u64)> = self
            .conversations
            .iter()
            .filter(|(_, c)| {
                matches!(
                    c.state,
                    ConversationState::Queued | ConversationState::Assigned
                )
            })
            .map(|(id, c)| (c.order_key, *id))
            .collect();
        ids.sort_unstable();
        let mut effects = Vec::new();
        for (order_key, id) in ids {
            let conv = self.conversations.get_mut(&id).expect("listed");
            let router = &mut self.tenants[conv.tenant as usize].router;
            let Some(group) = router.group_id(&conv.group) else {
                continue;
            };
            if router.enqueue(id, group, order_key, &mut effects).is_err() {
                continue;
            }
            if let (ConversationState::Assigned, Some(agent)) = (conv.state, conv.agent.clone())
                && let Some(agent) = router.agent_id(&agent)
            {
                let _ = router.agent_online(agent);
                let placed = router.transfer_to_agent(id, agent, &mut effects).is_ok();
                let _ = router.agent_socket_lost(agent, now_ms);
                if !placed {
                    conv.state = ConversationState::Queued;
                    conv.agent = None;
                }
            }
        }
    }

    /// Time-driven routing work (agents whose socket grace ran out).
    pub fn tick(&mut self, log: &mut dyn RecordLog, now_ms: u64) {
        self.relieve_index(log);
        // The timers' work writes records: it waits (its timers stay due) while the log's
        // index has no room, like commands do (`check_room`), rather than being cut off
        // halfway with the router moved and the records refused.
        if self.check_room(log).is_err() {
            return;
        }
        self.close_idle(log, now_ms);
        self.notice_lost_sockets(now_ms);
        for tenant in 0..self.tenants.len() {
            let mut effects = std::mem::take(&mut self.effects);
            effects.clear();
            self.tenants[tenant].router.tick(now_ms, &mut effects);
            if !effects.is_empty() {
                self.tenants[tenant].router.dispatch(&mut effects);
                for effect in &effects {
                    if let Effect::Unassigned { conv, .. } = *effect
                        && let Some(c) = self.conversations.get_mut(&conv)
                    {
                        c.agent = None;
                    }
                }
                if self.poisoned.is_none() {
                    let _ = self.apply_effects(log, tenant as u16, &effects, now_ms * 1000);
                }
            }
            self.effects = effects;
        }
    }

    /// Agents whose last socket closed start their grace period: the router takes them offline
    /// (re-queueing their conversations) in `tick` unless a socket comes back in time.
    fn notice_lost_sockets(&mut self, now_ms: u64) {
        for t in &mut self.tenants {
            let router = &mut t.router;
            t.inboxes.retain(|&agent, list| {
                list.retain(|s| !s.is_closed());
                if list.is_empty() {
                    let _ = router.agent_socket_lost(agent, now_ms);
                    return false;
                }
                true
            });
        }
    }

    /// Placement of a conversation in routing, for views and tests.
    pub fn placement(&self, id: u64) -> Option<Placement> {
        let conv = self.conversations.get(&id)?;
        self.tenants[conv.tenant as usize].router.placement(id)
    }

    /// The conversation's state and highest durable seq.
    pub fn state(&self, id: u64) -> Option<(ConversationState, u64)> {
        self.conversations
            .get(&id)
            .map(|c| (c.state, c.released_seq))
    }
}

/// Who sends a typing or read notice, for its rate-limit bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoticeSender {
    Visitor,
    Integration,
    /// By `AgentId::index`.
    Agent(usize),
}

/// Senders of one conversation: the visitor, the integrations, and each agent.
const NOTICE_SENDERS_MAX: usize = 2 + crate::tenant::AGENTS_PER_TENANT_MAX;
const _: () = assert!(NOTICE_SENDERS_MAX <= 1 << 15);

/// The notice rate-limit key of a sender in conversation `id`: the conversation's local part
/// (48 bits; the shard is this engine's), 15 bits of sender, 1 bit of kind. Distinct for
/// distinct notices, so no two senders share a bucket.
fn notice_key(id: u64, sender: NoticeSender, typing: bool) -> u64 {
    let sender = match sender {
        NoticeSender::Visitor => 0,
        NoticeSender::Integration => 1,
        NoticeSender::Agent(index) => {
            assert!(2 + index < NOTICE_SENDERS_MAX, "agent index {index}");
            2 + index as u64
        }
    };
    (ConversationId(id).local() << 16) | (sender << 1) | u64::from(!typing)
}

fn route_error(state: ConversationState) -> impl Fn(RouteError) -> EngineError {
    move |e| match e {
        RouteError::NotInGroup { .. } => EngineError::Forbidden(e.to_string()),
        RouteError::QueueFull { .. } | RouteError::TooManyConversations { .. } => {
            EngineError::Overloaded(e.to_string())
        }
        _ => EngineError::Conflict {
            reason: e.to_string(),
            state,
        },
    }
}

fn check_dense(last: u64, seq: u64, id: u64) -> Result<(), String> {
    if seq != last + 1 {
        return Err(format!(
            "conversation {id:#x}: seq {seq} follows {last} (not dense)"
        ));
    }
    Ok(())
}

fn fold_event(conv: &mut Conversation, event: &Event, next: ConversationState) {
    conv.state = next;
    conv.last_seq += 1;
    match event {
        Event::Queued { group, .. } => {
            conv.group = group.as_str().into();
            conv.agent = None;
        }
        Event::Assigned { agent, group } => {
            conv.agent = Some(agent.as_str().into());
            conv.group = group.as_str().into();
        }
        Event::Transferred {
            to: TransferTarget::Group(group),
            ..
        } => conv.group = group.as_str().into(),
        Event::Resolved | Event::Closed { .. } => conv.agent = None,
        _ => {}
    }
}

/// The idempotency keys a shard keeps, across its conversations: one entry per stored key, in
/// the order they were stored (which is log order, so recovery keeps the same keys). A key is
/// kept while it is among the last `idempotency_keys_per_conversation_max` keys of its
/// conversation and the last `idempotency_keys_per_shard_max` of its shard.
#[derive(Default)]
struct ShardKeys {
    /// (conversation, seq) of each stored key, oldest first. An entry whose key its
    /// conversation already dropped is skipped when it reaches the front; the queue never
    /// holds more than the shard's limit, so such entries cannot pile up.
    order: VecDeque<(u64, u64)>,
    /// Keys held by the conversations' maps.
    kept: usize,
}

/// Keys up to this many bytes are kept inline (UUIDs are 36, ULIDs 26).
const IDEM_KEY_INLINE_MAX: usize = 46;

/// A kept idempotency key: inline when short, so keeping one allocates nothing; a longer one
/// (up to the API's limit) on the heap. Hashes and compares as its `str`, so the maps are
/// looked up by `&str`.
#[derive(Clone)]
enum IdemKey {
    Inline {
        len: u8,
        bytes: [u8; IDEM_KEY_INLINE_MAX],
    },
    Heap(Arc<str>),
}

impl IdemKey {
    fn new(key: &str) -> Self {
        if key.len() <= IDEM_KEY_INLINE_MAX {
            let mut bytes = [0; IDEM_KEY_INLINE_MAX];
            bytes[..key.len()].copy_from_slice(key.as_bytes());
            IdemKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            IdemKey::Heap(key.into())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            IdemKey::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).expect("made from a str")
            }
            IdemKey::Heap(s) => s,
        }
    }
}

impl std::borrow::Borrow<str> for IdemKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::hash::Hash for IdemKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq for IdemKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdemKey {}

/// Stores `key` in conversation `conv` and drops its oldest keys beyond the per-conversation
/// limit; returns how many it dropped.
fn remember_key(conv: &mut Conversation, key: &str, seq: u64, ts: u64, keys_max: usize) -> usize {
    let key = IdemKey::new(key);
    let mut dropped = 0;
    if conv.idempotency.insert(key.clone(), (seq, ts)).is_none() {
        conv.idempotency_order.push_back(key);
        // The oldest keys go first: a retry long after is a new message.
        while conv.idempotency_order.len() > keys_max {
            if let Some(old) = conv.idempotency_order.pop_front() {
                conv.idempotency.remove(&old);
                dropped += 1;
            }
        }
    } else {
        // A key stored again (not through `send`, which answers a retry first): one entry.
        dropped = 1;
    }
    dropped
}

impl Engine {
    /// Stores an idempotency key of conversation `id` within both limits.
    fn remember_key(&mut self, id: u64, key: &str, seq: u64, ts: u64) {
        let per_conversation = self.limits.idempotency_keys_per_conversation_max;
        let per_shard = self.limits.idempotency_keys_per_shard_max;
        let Some(conv) = self.conversations.get_mut(&id) else {
            return;
        };
        let dropped = remember_key(conv, key, seq, ts, per_conversation);
        self.keys.kept = (self.keys.kept + 1).saturating_sub(dropped);
        self.keys.order.push_back((id, seq));
        while self.keys.kept > per_shard || self.keys.order.len() > per_shard {
            let Some((old_id, old_seq)) = self.keys.order.pop_front() else {
                break;
            };
            let Some(old) = self.conversations.get_mut(&old_id) else {
                continue;
            };
            // Only if that conversation still keeps this very key (its oldest).
            let front_seq = old
                .idempotency_order
                .front()
                .and_then(|k| old.idempotency.get(k))
                .map(|&(seq, _)| seq);
            if front_seq == Some(old_seq)
                && let Some(k) = old.idempotency_order.pop_front()
            {
                old.idempotency.remove(&k);
                self.keys.kept -= 1;
            }
        }
    }

    /// Idempotency keys kept by this shard, and the length of their shard-wide order (for
    /// tests and metrics).
    pub fn idempotency_keys(&self) -> (usize, usize) {
        (self.keys.kept, self.keys.order.len())
    }
}

/// Fills in the JSON form of a message delivery that was queued without one (nobody followed
/// its conversation when it was appended), from its frame. False if that fails.
fn render_late(delivery: &mut Arc<Delivery>) -> bool {
    let json = match frame::decode(&delivery.frame, u32::MAX) {
        Ok((fr, _)) => match render_stored(&fr.header, fr.payload) {
            Ok(json) => json,
            Err(_) => return false,
        },
        Err(_) => return false,
    };
    match Arc::get_mut(delivery) {
        Some(d) => d.json = json,
        // Only the pending queue holds a delivery before its release; if not, a copy.
        None => {
            *delivery = Arc::new(Delivery {
                conversation_id: delivery.conversation_id,
                seq: delivery.seq,
                frame: delivery.frame.clone(),
                json,
            })
        }
    }
    true
}

/// The WebSocket/HTTP JSON form of a stored record.
pub fn render_stored(header: &Header, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(payload.len() + 32);
    match header.kind {
        Kind::Message => {
            let record: MessageRecord =
                serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            record.write_ws_json(&mut out);
        }
        Kind::Event => {
            let record: EventRecord = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
            record.write_ws_json(&mut out);
        }
        other => return Err(format!("unexpected record kind {other:?}")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
