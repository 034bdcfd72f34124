//! One shard's machinery around its engine: the bounded cross-shard command inbox with its wake-up, one-shot replies, the committer task (batch, group-commit syncs as io_uring fsyncs, up to the log's `syncs_in_flight_max` at once, release in log order), and the per-shard buffer pool.
//!
//! Every command for a conversation goes to the inbox of the shard that owns it (`id >> 48`),
//! whichever shard the client's connection lives on, so the engine stays single-threaded and
//! lock-free. Inboxes are `crossbeam_queue::ArrayQueue`s: a full inbox refuses the command
//! (503 with `Retry-After`) instead of growing. The wake-up is a [`ShardWaker`] registered by
//! the committer: woken from another shard, it goes through this shard's doorbell
//! ([`crate::wake`]), without monoio's cross-thread path and its lock.
//!
//! Pipelined group commit (`limits.syncs_in_flight_max` above 1): records appended while a
//! sync runs start the next sync at once instead of waiting for the running one to end.
//! Replies are released only as the log's durable offset passes them, which advances in
//! preparation order. Default 1: on this machine's quiet disk a second sync mostly waited for
//! the first's write of the shared tail page and cost CPU (wrk: 38-41K vs 48-55K req/s).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use crate::wake::ShardWaker;
use crossbeam_queue::ArrayQueue;
use kefu_protocol::frame::Header;
use kefu_protocol::model::{ConversationState, ConversationView, Event};
use kefu_storage::{Log, SyncJob};

use crate::engine::{
    Actor, Created, Engine, EngineError, Outbox, RecordLog, Replay, Sent, Transition,
};
use crate::metrics::ShardMetrics;
use std::rc::Rc;

impl RecordLog for Log {
    fn append(&mut self, header: &Header, payload: &[u8]) -> Result<u64, String> {
        Log::append(self, header, payload).map_err(|e| e.to_string())
    }

    fn append_framed(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: &mut Vec<u8>,
    ) -> Result<u64, String> {
        Log::append_framed(self, header, payload, frame).map_err(|e| e.to_string())
    }

    fn forget_conversation(&mut self, conv: u64) {
        Log::forget_conversation(self, conv);
    }

    fn conversation_index(&self) -> (usize, usize) {
        (
            Log::conversation_index_entries(self),
            self.config().conversation_index_entries_max,
        )
    }

    /// Classified by the storage error's type, not its text.
    fn append_record(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: &mut Vec<u8>,
    ) -> Result<u64, crate::engine::AppendError> {
        Log::append_framed(self, header, payload, frame)
            .map_err(|e| crate::engine::AppendError::from_storage(&e))
    }

    fn read_conversation(
        &mut self,
        conv: u64,
        after_seq: u64,
        limit: usize,
        each: &mut dyn FnMut(&Header, &[u8]),
    ) -> Result<(), String> {
        Log::read_conversation(self, conv, after_seq, limit, |fr| {
            each(&fr.header, fr.payload)
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

/// A one-shot reply slot that a shard fills and another shard's task awaits. Lock-free: a
/// one-element `ArrayQueue` plus a [`ShardWaker`].
pub struct ReplySlot<T> {
    value: ArrayQueue<T>,
    waker: ShardWaker,
    /// Monotonic ns when the owning shard appended the command's records and when they became
    /// durable; filled only while a tracer is attached (for the eBPF request marker).
    pub appended_ns: AtomicU64,
    pub synced_ns: AtomicU64,
}

impl<T> ReplySlot<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            value: ArrayQueue::new(1),
            waker: ShardWaker::new(),
            appended_ns: AtomicU64::new(0),
            synced_ns: AtomicU64::new(0),
        })
    }

    pub fn put(&self, value: T) {
        // A slot is filled once; a second fill would be a bug in the committer.
        assert!(self.value.push(value).is_ok(), "reply slot filled twice");
        self.waker.wake();
    }

    pub async fn wait(&self) -> T {
        crate::wake::pop_or_wait(&self.value, &self.waker).await
    }
}

/// What a command answers.
#[derive(Debug)]
pub enum Outcome {
    Created(Result<Created, EngineError>),
    /// With the command's text and id, handed back for the answer and for reuse (see
    /// [`SendBody`]).
    Sent(Result<Sent, EngineError>, SendBody),
    View(Result<ConversationView, EngineError>),
    Replay(Result<Replay, EngineError>),
    State(Result<ConversationState, EngineError>),
    Done(Result<(), EngineError>),
    Text(String),
    Runs(Result<Vec<kefu_storage::FileRun>, String>),
}

pub type Reply = Arc<ReplySlot<Outcome>>;

/// Reply slots kept per thread for reuse (a slot is one allocation with its one-element queue).
const REPLY_POOL_MAX: usize = 1024;
/// Text buffers of sends kept per thread for reuse, and the largest capacity kept (a rare
/// long message does not stay pinned in a pool).
const TEXT_POOL_MAX: usize = 1024;
const TEXT_POOL_CAPACITY_MAX: usize = 4096;

thread_local! {
    static REPLY_POOL: RefCell<Vec<Reply>> = const { RefCell::new(Vec::new()) };
    static TEXT_POOL: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// A send's text and `client_msg_id` in one buffer from this thread's pool. It travels in the
/// [`Command::Send`] to the owning shard and comes back in [`Outcome::Sent`] (the session then
/// reads the `client_msg_id` for its answer from it); dropped, it goes back to the pool of the
/// thread that drops it, so a send allocates nothing for its strings in steady state.
#[derive(Debug)]
pub struct SendBody {
    /// The text, then the `client_msg_id` (if any).
    buf: String,
    text_len: usize,
    has_client_msg_id: bool,
}

impl SendBody {
    /// Copies `text` and `client_msg_id` into a pooled buffer.
    pub fn pooled(text: &str, client_msg_id: Option<&str>) -> SendBody {
        let mut buf = pooled_string();
        buf.push_str(text);
        if let Some(id) = client_msg_id {
            buf.push_str(id);
        }
        SendBody {
            buf,
            text_len: text.len(),
            has_client_msg_id: client_msg_id.is_some(),
        }
    }

    pub fn text(&self) -> &str {
        &self.buf[..self.text_len]
    }

    pub fn client_msg_id(&self) -> Option<&str> {
        self.has_client_msg_id.then(|| &self.buf[self.text_len..])
    }
}

impl Drop for SendBody {
    fn drop(&mut self) {
        recycle_string(std::mem::take(&mut self.buf));
    }
}

/// An empty string from this thread's pool: for a send's strings ([`SendBody`]) and a
/// WebSocket message between its frame and its parse. Give it back with [`recycle_string`].
pub fn pooled_string() -> String {
    TEXT_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

/// Returns a string to this thread's pool (bounded; see [`TEXT_POOL_MAX`]).
pub fn recycle_string(mut s: String) {
    if s.capacity() == 0 || s.capacity() > TEXT_POOL_CAPACITY_MAX {
        return;
    }
    s.clear();
    pool_put(&TEXT_POOL, s, TEXT_POOL_MAX);
}

/// Puts `item` into a per-thread pool that holds fewer than `max` (else drops it). `try_with`:
/// a thread being torn down has no pool any more.
fn pool_put<T: 'static>(pool: &'static LocalKey<RefCell<Vec<T>>>, item: T, max: usize) {
    let _ = pool.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < max {
            p.push(item);
        }
    });
}

/// Lists kept per thread for reuse by [`take_vec`], and the largest capacity kept.
const SCRATCH_POOL_MAX: usize = 64;
const SCRATCH_CAPACITY_MAX: usize = 256;

/// An empty list from a per-thread pool: per-step scratch of a session (the messages a read
/// brought, the sends awaiting their answers) that crosses awaits, so it cannot be one
/// borrowed thread-local. Give it back with [`give_vec`].
pub fn take_vec<T: 'static>(pool: &'static LocalKey<RefCell<Vec<Vec<T>>>>) -> Vec<T> {
    pool.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

/// Returns a list to its pool (bounded; a list that grew large is freed).
pub fn give_vec<T: 'static>(pool: &'static LocalKey<RefCell<Vec<Vec<T>>>>, mut v: Vec<T>) {
    if v.capacity() == 0 || v.capacity() > SCRATCH_CAPACITY_MAX {
        return;
    }
    v.clear();
    pool_put(pool, v, SCRATCH_POOL_MAX);
}

impl ReplySlot<Outcome> {
    /// An empty slot, from this thread's pool when it has one: no allocation per command in
    /// steady state.
    pub fn pooled() -> Reply {
        REPLY_POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(ReplySlot::new)
    }

    /// Returns a slot whose reply was taken to this thread's pool, unless another holder
    /// (the committer, about to drop its clone) still has it: then it is simply freed.
    pub fn recycle(mut reply: Reply) {
        let Some(slot) = Arc::get_mut(&mut reply) else {
            return;
        };
        if !slot.value.is_empty() {
            return;
        }
        *slot.appended_ns.get_mut() = 0;
        *slot.synced_ns.get_mut() = 0;
        // Forget the last waiter's waker (a later wake must not reach that task).
        slot.waker = ShardWaker::new();
        pool_put(&REPLY_POOL, reply, REPLY_POOL_MAX);
    }
}

/// A request to the shard that owns a conversation.
pub enum Command {
    Create {
        tenant: u16,
        visitor_name: String,
        channel: String,
        text: Option<String>,
        group: Option<String>,
        reply: Reply,
    },
    Send {
        conv: u64,
        actor: Actor,
        body: SendBody,
        reply: Reply,
    },
    View {
        conv: u64,
        actor: Actor,
        reply: Reply,
    },
    Replay {
        conv: u64,
        actor: Actor,
        after: u64,
        limit: usize,
        subscriber: Option<Arc<Outbox>>,
        reply: Reply,
    },
    Transition {
        conv: u64,
        tenant: u16,
        agent: Arc<str>,
        what: Transition,
        reply: Reply,
    },
    AgentStatus {
        tenant: u16,
        agent: Arc<str>,
        online: bool,
        reply: Option<Reply>,
    },
    AgentInbox {
        tenant: u16,
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        reply: Reply,
    },
    Ephemeral {
        conv: u64,
        actor: Actor,
        event: Event,
        reply: Option<Reply>,
    },
    /// Renders this shard's metrics (Prometheus text) into the reply.
    Metrics { reply: Reply },
    /// Byte runs of durable records from `from`, for the firehose.
    FileRuns {
        from: u64,
        max_bytes: u64,
        reply: Reply,
    },
}

/// A shard's command queue and the waker of its committer.
pub struct Inbox {
    queue: ArrayQueue<Command>,
    waker: ShardWaker,
    /// Set when the committer should finish (after draining).
    stop: AtomicBool,
}

impl Inbox {
    pub fn new(depth: usize) -> Self {
        Self {
            queue: ArrayQueue::new(depth),
            waker: ShardWaker::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// Queues a command; a full inbox hands it back (the caller answers 503).
    pub fn push(&self, cmd: Command) -> Result<(), Command> {
        self.queue.push(cmd)?;
        self.waker.wake();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn wake(&self) {
        self.waker.wake();
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// A reply held until the log is durable up to `release_at`.
struct Held {
    release_at: u64,
    reply: Reply,
    outcome: Outcome,
}

/// `SCHED_FIFO` priority of the threads that run the logs' syncs (`server.sync_realtime`): the
/// lowest real-time one, which still runs before every normal thread. Those threads sleep
/// through the device's write and flush and need the CPU only briefly after each (about 50 us
/// per sync); as normal threads on a core the shard and a client keep busy, each of those
/// moments waited its turn, which measured as most of a sync's time under wrk.
pub const SYNC_THREAD_FIFO_PRIORITY: i32 = 1;

/// Gives thread `tid` of this process `SCHED_FIFO` [`SYNC_THREAD_FIFO_PRIORITY`]. False if the
/// kernel refused (no root, `CAP_SYS_NICE` or `RLIMIT_RTPRIO`), which is said once per process
/// on stderr; the thread then keeps its normal priority. A thread that is gone counts as done.
pub fn make_sync_thread_realtime(tid: libc::pid_t) -> bool {
    static REFUSAL_SAID: AtomicBool = AtomicBool::new(false);
    // SAFETY: plain syscalls on a thread id; `param` outlives the call.
    let err = unsafe {
        if libc::sched_getscheduler(tid) == libc::SCHED_FIFO {
            return true;
        }
        let param = libc::sched_param {
            sched_priority: SYNC_THREAD_FIFO_PRIORITY,
        };
        if libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) == 0 {
            return true;
        }
        std::io::Error::last_os_error()
    };
    if err.raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    if !REFUSAL_SAID.swap(true, Ordering::Relaxed) {
        eprintln!(
            "kefu: the logs' sync threads run at normal priority ({err}): server.sync_realtime \
             needs root, CAP_SYS_NICE or RLIMIT_RTPRIO >= 1 (set it to false to silence this)"
        );
    }
    false
}

/// Sync jobs run on a plain thread so the shard's ring keeps serving while `fdatasync` runs.
struct Flusher {
    jobs: ArrayQueue<(SyncJob, Instant)>,
    done: ArrayQueue<(FinishedSync, Instant)>,
    stop: AtomicBool,
    thread: std::thread::Thread,
}

impl Flusher {
    /// Starts the flusher thread of shard `shard`; it wakes the committer through `inbox`
    /// when a job is done. `realtime`: the thread runs `SCHED_FIFO` (`server.sync_realtime`).
    fn spawn(
        inbox: &Arc<Inbox>,
        shard: u16,
        realtime: bool,
    ) -> (Arc<Flusher>, std::thread::JoinHandle<()>) {
        let slot: Arc<std::sync::OnceLock<Arc<Flusher>>> = Arc::new(std::sync::OnceLock::new());
        let inbox = inbox.clone();
        let slot_for_thread = slot.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kefu-flush-{shard}"))
            .spawn(move || {
                if realtime {
                    // SAFETY: gettid has no preconditions.
                    make_sync_thread_realtime(unsafe { libc::gettid() });
                }
                let me = Arc::new(Flusher {
                    jobs: ArrayQueue::new(1),
                    done: ArrayQueue::new(1),
                    stop: AtomicBool::new(false),
                    thread: std::thread::current(),
                });
                let _ = slot_for_thread.set(me.clone());
                loop {
                    match me.jobs.pop() {
                        Some((job, started)) => {
                            let result = job.run();
                            let _ = me.done.push(((job, result), started));
                            inbox.wake();
                        }
                        None if me.stop.load(Ordering::Acquire) => return,
                        None => std::thread::park_timeout(Duration::from_millis(100)),
                    }
                }
            })
            .expect("spawn flusher thread");
        let flusher = loop {
            if let Some(f) = slot.get() {
                break f.clone();
            }
            std::thread::yield_now();
        };
        (flusher, thread)
    }
}

/// A sync job and how it ended (with when it started, for the sync latency metric).
type FinishedSync = (SyncJob, std::io::Result<()>);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Commands handled per round before the committer syncs and releases: bounds the latency a
/// long queue adds to the first command's reply.
const BATCH_COMMANDS_MAX: usize = 512;

/// Waits for the runtime's next pass through its ring: a poll on a socket that always has a
/// byte to read completes at the next submission.
struct NextTick {
    ready: monoio::net::UnixStream,
    _writer: std::os::unix::net::UnixStream,
}

impl NextTick {
    fn new() -> std::io::Result<Self> {
        use std::io::Write;
        let (ready, mut writer) = std::os::unix::net::UnixStream::pair()?;
        writer.write_all(&[1])?;
        ready.set_nonblocking(true)?;
        Ok(Self {
            ready: monoio::net::UnixStream::from_std(ready)?,
            _writer: writer,
        })
    }

    async fn wait(&self) {
        // The byte is never read, so the socket stays readable; an error only means no wait.
        let _ = self.ready.readable(false).await;
    }
}

/// Where the committer runs a group commit's sync (see [`crate::config::SyncMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncWay {
    /// `fdatasync` on the shard thread, between rounds.
    Inline,
    /// fsync ops on the shard's io_uring ring, up to the log's `syncs_in_flight_max` at once.
    Ring,
    /// One at a time on a flusher thread (the legacy driver has no fsync op).
    Thread,
}

/// Runs the shard's engine until `inbox.stop()` and the inbox is drained; then syncs.
pub async fn committer(
    inbox: Arc<Inbox>,
    engine: Rc<RefCell<Engine>>,
    log: Rc<RefCell<Log>>,
    metrics: Rc<ShardMetrics>,
    sync: SyncWay,
    sync_realtime: bool,
) {
    // With io_uring the syncs are fsync ops on the shard's own ring (the kernel's workers run
    // them; the completion lands in the ring): no user-space hand-off. The legacy driver
    // syncs on a flusher thread instead.
    let ring = RingSyncs::new(inbox.clone());
    // Only the legacy driver needs the thread: an idle one would still wake 10 times a second.
    let flusher = (sync == SyncWay::Thread)
        .then(|| Flusher::spawn(&inbox, engine.borrow().shard(), sync_realtime));

    let mut held: VecDeque<Held> = VecDeque::new();
    // Log retention, when the config asks for it: checked every RETENTION_CHECK_MS.
    let retention = {
        let cfg = log.borrow().config().clone();
        cfg.retention_bytes_max.is_some() || cfg.retention_age_ms.is_some()
    };
    let mut next_retention_ms = 0;
    let next_tick = match sync {
        SyncWay::Inline => Some(NextTick::new().expect("a socketpair for the committer")),
        SyncWay::Ring | SyncWay::Thread => None,
    };
    // The flusher thread runs one job at a time; on the ring, the log's
    // `syncs_in_flight_max` run at once.
    let may_start_sync = |log: &Log| sync == SyncWay::Ring || log.syncs_in_flight() == 0;
    loop {
        // Wait for commands, a finished sync, or the next timer (interval sync, routing grace).
        let timeout_ms = {
            let log = log.borrow();
            let now = now_ms();
            let mut t = 1000u64;
            if let Some(due) = log.next_sync_due_ms()
                && may_start_sync(&log)
            {
                t = t.min(due.saturating_sub(now));
            }
            t
        };
        let has_work = || {
            !inbox.queue.is_empty()
                || flusher.as_ref().is_some_and(|(f, _)| !f.done.is_empty())
                || !ring.done.borrow().is_empty()
                || inbox.stop.load(Ordering::Acquire)
        };
        if !has_work() {
            let wait = poll_fn(|cx| {
                inbox.waker.register(cx.waker());
                if has_work() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            monoio::select! {
                _ = wait => {}
                _ = monoio::time::sleep(Duration::from_millis(timeout_ms.max(1))) => {}
            }
        }

        let now = now_ms();
        loop {
            let finished = flusher
                .as_ref()
                .and_then(|(f, _)| f.done.pop())
                .or_else(|| ring.done.borrow_mut().pop_front());
            let Some(((job, result), started)) = finished else {
                break;
            };
            metrics.sync_latency_us(started.elapsed().as_micros() as u64);
            if let Err(e) = log.borrow_mut().complete_sync(job, result) {
                engine.borrow_mut().poison(format!("log sync failed: {e}"));
            }
        }
        let mut handled = 0;
        {
            let mut engine = engine.borrow_mut();
            let mut log = log.borrow_mut();
            while handled < BATCH_COMMANDS_MAX {
                let Some(cmd) = inbox.queue.pop() else {
                    break;
                };
                handled += 1;
                handle(&mut engine, &mut log, cmd, &mut held, &metrics);
            }
            engine.tick(&mut *log, now);
            if retention && now >= next_retention_ms {
                next_retention_ms = now + RETENTION_CHECK_MS;
                enforce_retention(&mut engine, &mut log, now);
            }
        }
        metrics.commands(handled as u64);
        let mut synced_inline = false;
        {
            let mut log = log.borrow_mut();
            if may_start_sync(&log) && log.sync_due(now) {
                match log.prepare_sync(now) {
                    Ok(Some(job)) => {
                        let started = Instant::now();
                        if sync == SyncWay::Inline {
                            let result = job.run();
                            metrics.sync_latency_us(started.elapsed().as_micros() as u64);
                            if let Err(e) = log.complete_sync(job, result) {
                                engine.borrow_mut().poison(format!("log sync failed: {e}"));
                            }
                            synced_inline = true;
                        } else if sync == SyncWay::Ring {
                            ring.submit(job, started);
                        } else if let Some((flusher, _)) = &flusher {
                            let pushed = flusher.jobs.push((job, started));
                            assert!(pushed.is_ok(), "one sync at a time");
                            flusher.thread.unpark();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => engine.borrow_mut().poison(format!("log sync failed: {e}")),
                }
            }
        }
        let durable = log.borrow().durable_offset();
        let poisoned = engine.borrow().poisoned().map(str::to_owned);
        engine.borrow_mut().release(durable);
        while let Some(h) = held.front() {
            if h.release_at > durable && poisoned.is_none() {
                break;
            }
            let h = held.pop_front().expect("front exists");
            if h.release_at > 0 && kefu_trace_common::tracer_attached() {
                h.reply
                    .synced_ns
                    .store(kefu_trace_common::now_ns(), Ordering::Relaxed);
            }
            let outcome = match (&poisoned, h.release_at > durable) {
                // Not durable and never will be: the write failed.
                (Some(why), true) => Outcome::Done(Err(EngineError::Storage(why.clone()))),
                _ => h.outcome,
            };
            h.reply.put(outcome);
        }
        metrics.set_pending(engine.borrow().pending_len() as u64, held.len() as u64);
        // After a sync on this thread, let the runtime pass through its ring before the next
        // round: the shard's own connections (answers to write, requests that arrived during
        // the sync) run first, so commands from other shards cannot keep the committer busy
        // round after round while this shard's sockets wait.
        if synced_inline && let Some(tick) = &next_tick {
            tick.wait().await;
        }
        if inbox.stop.load(Ordering::Acquire) && inbox.queue.is_empty() {
            if log.borrow().syncs_in_flight() > 0 {
                continue;
            }
            // Drain: one last blocking sync, answer what it covers.
            let mut log = log.borrow_mut();
            let _ = log.sync(now_ms());
            let durable = log.durable_offset();
            engine.borrow_mut().release(durable);
            for h in held.drain(..) {
                let outcome = if h.release_at <= durable {
                    h.outcome
                } else {
                    Outcome::Done(Err(EngineError::Storage("shutting down".into())))
                };
                h.reply.put(outcome);
            }
            break;
        }
    }
    ring.finish();
    if let Some((flusher, thread)) = flusher {
        flusher.stop.store(true, Ordering::Release);
        flusher.thread.unpark();
        let _ = thread.join();
    }
}

/// How often a shard applies log retention (when configured).
const RETENTION_CHECK_MS: u64 = 10_000;

/// Deletes the log's oldest segments that retention allows and the engine no longer needs
/// ([`Engine::retention_floor`]: the first record of every conversation not closed, and the
/// newest conversation's opening, stay), then forgets the closed conversations that began in
/// them ([`Engine::forget_below`]). A failure is
/// said on stderr and tried again at the next check; the log is not poisoned by it.
fn enforce_retention(engine: &mut Engine, log: &mut Log, now_ms: u64) {
    let cut = log.retention_target(now_ms);
    if cut <= log.start_offset() {
        return;
    }
    let floor = engine.retention_floor(cut);
    match log.enforce_retention_below(now_ms, floor) {
        Ok(r) if r.segments_deleted > 0 => engine.forget_below(log, r.start_offset),
        Ok(_) => {}
        Err(e) => eprintln!("kefu: shard {}: log retention: {e}", engine.shard()),
    }
}

/// Files whose descriptors the ring syncs keep open (the active segment, a sealed one, the
/// directory; a few more around a roll).
const RING_SYNC_FILES_MAX: usize = 8;

/// Group-commit syncs as io_uring fsync ops on the shard's own ring. They run in tasks that
/// live as long as the committer (as many as syncs ran at once, at most
/// `limits.syncs_in_flight_max`), on a descriptor kept per file, so a sync spawns no task,
/// duplicates and closes no descriptor and allocates nothing.
struct RingSyncs {
    jobs: RefCell<VecDeque<(SyncJob, Instant)>>,
    /// Finished syncs, for the committer.
    done: RefCell<VecDeque<(FinishedSync, Instant)>>,
    /// Wakers of syncer tasks waiting for a job.
    idle: RefCell<Vec<std::task::Waker>>,
    tasks: std::cell::Cell<usize>,
    busy: std::cell::Cell<usize>,
    /// The log's files, each with a duplicate descriptor the ring's ops own. A file the log
    /// no longer holds is dropped at the next miss.
    files: RefCell<Vec<(Arc<std::fs::File>, Rc<monoio::fs::File>)>>,
    inbox: Arc<Inbox>,
    stop: std::cell::Cell<bool>,
}

impl RingSyncs {
    fn new(inbox: Arc<Inbox>) -> Rc<Self> {
        Rc::new(Self {
            jobs: RefCell::default(),
            done: RefCell::default(),
            idle: RefCell::default(),
            tasks: std::cell::Cell::new(0),
            busy: std::cell::Cell::new(0),
            files: RefCell::default(),
            inbox,
            stop: std::cell::Cell::new(false),
        })
    }

    /// Queues a prepared sync; a new syncer task starts only when every one is taken.
    fn submit(self: &Rc<Self>, job: SyncJob, started: Instant) {
        self.jobs.borrow_mut().push_back((job, started));
        let free = self.tasks.get() - self.busy.get();
        if self.jobs.borrow().len() > free {
            self.tasks.set(self.tasks.get() + 1);
            monoio::spawn(self.clone().syncer());
        }
        for w in self.idle.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn finish(&self) {
        self.stop.set(true);
        for w in self.idle.borrow_mut().drain(..) {
            w.wake();
        }
    }

    async fn syncer(self: Rc<Self>) {
        loop {
            let next = poll_fn(|cx| {
                if let Some(job) = self.jobs.borrow_mut().pop_front() {
                    return Poll::Ready(Some(job));
                }
                if self.stop.get() {
                    return Poll::Ready(None);
                }
                self.idle.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            })
            .await;
            let Some((job, started)) = next else {
                break;
            };
            self.busy.set(self.busy.get() + 1);
            let result = self.run(&job).await;
            self.busy.set(self.busy.get() - 1);
            self.done.borrow_mut().push_back(((job, result), started));
            self.inbox.wake();
        }
        self.tasks.set(self.tasks.get() - 1);
    }

    /// fdatasync of the segment files, fsync of the directory when its entries changed.
    async fn run(&self, job: &SyncJob) -> std::io::Result<()> {
        // Without a descriptor for the ring (none left: the process is at its open-file
        // limit), the shard thread syncs the log's own descriptor itself: a sync never fails
        // for want of a descriptor.
        for f in job.files() {
            match self.file(f) {
                Ok(file) => file.sync_data().await?,
                Err(_) => f.sync_data()?,
            }
        }
        if let Some(dir) = job.dir() {
            match self.file(dir) {
                Ok(file) => file.sync_all().await?,
                Err(_) => dir.sync_all()?,
            }
        }
        Ok(())
    }

    fn file(&self, f: &Arc<std::fs::File>) -> std::io::Result<Rc<monoio::fs::File>> {
        let mut files = self.files.borrow_mut();
        if let Some((_, kept)) = files.iter().find(|(a, _)| Arc::ptr_eq(a, f)) {
            return Ok(kept.clone());
        }
        // Only this list holds it: the log let the file go.
        files.retain(|(a, _)| Arc::strong_count(a) > 1);
        if files.len() >= RING_SYNC_FILES_MAX {
            files.remove(0);
        }
        let kept = Rc::new(monoio::fs::File::from_std(f.try_clone()?)?);
        files.push((f.clone(), kept.clone()));
        Ok(kept)
    }
}

fn handle(
    engine: &mut Engine,
    log: &mut Log,
    cmd: Command,
    held: &mut VecDeque<Held>,
    metrics: &ShardMetrics,
) {
    let now = now_us();
    // Replies that report writes wait for durability; reads answer at once (release_at 0).
    let mut hold = |reply: Reply, outcome: Outcome, write: bool, engine: &Engine| {
        if !write {
            // Reads only show released (durable) state: answer at once, not behind the
            // writes that wait for the current sync.
            reply.put(outcome);
            return;
        }
        let release_at = engine.appended_end();
        if kefu_trace_common::tracer_attached() {
            reply
                .appended_ns
                .store(kefu_trace_common::now_ns(), Ordering::Relaxed);
        }
        held.push_back(Held {
            release_at,
            reply,
            outcome,
        });
    };
    match cmd {
        Command::Create {
            tenant,
            visitor_name,
            channel,
            text,
            group,
            reply,
        } => {
            let r = engine.create(
                log,
                tenant,
                &visitor_name,
                &channel,
                text.as_deref(),
                group.as_deref(),
                now,
            );
            if r.is_ok() {
                metrics.conversation_created();
            }
            hold(reply, Outcome::Created(r), true, engine);
        }
        Command::Send {
            conv,
            actor,
            body,
            reply,
        } => {
            let r = engine.send(log, conv, &actor, body.text(), body.client_msg_id(), now);
            if matches!(
                r,
                Ok(Sent {
                    duplicate: false,
                    ..
                })
            ) {
                metrics.message_in();
            }
            hold(reply, Outcome::Sent(r, body), true, engine);
        }
        Command::View { conv, actor, reply } => {
            let r = engine.view(conv, &actor);
            hold(reply, Outcome::View(r), false, engine);
        }
        Command::Replay {
            conv,
            actor,
            after,
            limit,
            subscriber,
            reply,
        } => {
            let r = engine.replay(log, conv, &actor, after, limit, subscriber);
            hold(reply, Outcome::Replay(r), false, engine);
        }
        Command::Transition {
            conv,
            tenant,
            agent,
            what,
            reply,
        } => {
            let r = engine.transition(log, conv, &agent, tenant, &what, now);
            hold(reply, Outcome::State(r), true, engine);
        }
        Command::AgentStatus {
            tenant,
            agent,
            online,
            reply,
        } => {
            let r = engine.agent_status(log, tenant, &agent, online, now);
            if let Some(reply) = reply {
                hold(reply, Outcome::Done(r), true, engine);
            }
        }
        Command::AgentInbox {
            tenant,
            agent,
            outbox,
            reply,
        } => {
            engine.agent_inbox(tenant, &agent, outbox);
            reply.put(Outcome::Done(Ok(())));
        }
        Command::Ephemeral {
            conv,
            actor,
            event,
            reply,
        } => {
            let r = engine.ephemeral(conv, &actor, event, now);
            if let Some(reply) = reply {
                hold(reply, Outcome::Done(r), true, engine);
            }
        }
        Command::FileRuns {
            from,
            max_bytes,
            reply,
        } => {
            let runs = log.file_runs(from, max_bytes).map_err(|e| e.to_string());
            hold(reply, Outcome::Runs(runs), false, engine);
        }
        Command::Metrics { reply } => {
            let figures = crate::metrics::EngineFigures {
                conversations: engine.conversations_len(),
                forgotten: engine.conversations_forgotten(),
                idempotency_keys: engine.idempotency_keys().0,
                notices_dropped: engine.notices_dropped(),
            };
            let mut text = metrics.render(engine.shard(), figures, log);
            crate::wake::render_metrics(&mut text);
            hold(reply, Outcome::Text(text), false, engine);
        }
    }
}

/// Pooled I/O buffers of one shard: an idle connection holds none; a connection takes one when
/// data arrives and gives it back when it has nothing buffered. Bounded: beyond
/// `buffers_max` returned buffers are freed.
pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
    buffer_bytes: usize,
    buffers_max: usize,
    pub taken: AtomicU64,
}

impl BufferPool {
    pub fn new(buffer_bytes: usize, buffers_max: usize) -> Self {
        Self {
            free: RefCell::new(Vec::with_capacity(buffers_max.min(1024))),
            buffer_bytes,
            buffers_max,
            taken: AtomicU64::new(0),
        }
    }

    pub fn take(&self) -> Vec<u8> {
        self.taken.fetch_add(1, Ordering::Relaxed);
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.buffer_bytes))
    }

    pub fn give(&self, mut buf: Vec<u8>) {
        // Buffers that grew for a large body are not kept: the pool's memory stays bounded.
        if buf.capacity() != self.buffer_bytes {
            return;
        }
        buf.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < self.buffers_max {
            free.push(buf);
        }
    }

    pub fn free_len(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered() -> Reply {
        let slot = ReplySlot::pooled();
        slot.put(Outcome::Done(Ok(())));
        assert!(matches!(slot.value.pop(), Some(Outcome::Done(Ok(())))));
        slot
    }

    #[test]
    fn reply_slots_are_reused_once_nobody_else_holds_them() {
        let slot = answered();
        slot.synced_ns.store(5, Ordering::Relaxed);
        let first = Arc::as_ptr(&slot);
        ReplySlot::recycle(slot);
        let again = ReplySlot::pooled();
        assert_eq!(
            Arc::as_ptr(&again),
            first,
            "the slot came back from the pool"
        );
        assert_eq!(
            again.synced_ns.load(Ordering::Relaxed),
            0,
            "reset for its next command"
        );
        assert!(again.value.is_empty());

        // The committer may still hold its clone when the waiter is done: not pooled.
        let slot = answered();
        let committer = slot.clone();
        let held = Arc::as_ptr(&slot);
        ReplySlot::recycle(slot);
        let next = ReplySlot::pooled();
        assert_ne!(Arc::as_ptr(&next), held);
        drop(committer);

        // A slot whose reply was never taken is not pooled either.
        let pooled = || REPLY_POOL.with(|p| p.borrow().len());
        let unread = ReplySlot::pooled();
        unread.put(Outcome::Done(Ok(())));
        let before = pooled();
        ReplySlot::recycle(unread);
        assert_eq!(pooled(), before);
        ReplySlot::recycle(answered());
        assert_eq!(pooled(), before + 1);
    }
}
