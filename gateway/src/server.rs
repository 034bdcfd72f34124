//! Process startup and shutdown: per-shard SO_REUSEPORT listeners, one pinned thread with its own monoio runtime (io_uring, legacy fallback) per shard, log recovery, the `kefu ready` line, and SIGTERM/SIGINT draining.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

use anyhow::Context;
use atomic_waker::AtomicWaker;
use kefu_protocol::http::HttpLimits;
use kefu_storage::{Log, LogConfig};

use crate::access::Access;
use crate::config::{Config, Durability};
use crate::engine::{Engine, EngineLimits};
use crate::metrics::{Disconnect, ShardMetrics};
use crate::routing::RouterLimits;
use crate::shard::{BufferPool, Inbox, SyncWay, committer, now_ms};

/// How long shutdown waits for open connections to finish before closing them.
pub const SHUTDOWN_DRAIN_MS: u64 = 3000;

/// What every shard shares (read-only after start, or atomics).
pub struct Shared {
    pub config: Config,
    pub inboxes: Vec<Arc<Inbox>>,
    /// Every shard's doorbell: cross-shard wake-ups (see [`crate::wake`]).
    pub doorbells: Arc<crate::wake::Doorbells>,
    /// Per shard, the deliveries its subscribers' shards give back for reuse
    /// ([`crate::engine::give_back_delivery`]).
    pub delivery_returns: Vec<Arc<crate::engine::DeliveryReturns>>,
    /// Per shard, the connections other shards move to it ([`crate::migrate`]).
    pub arrivals: Vec<crate::migrate::Arrivals>,
    /// Each shard's end of its doorbell, taken once by the shard at start (so a lock at
    /// start only).
    doorbell_readers: Vec<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>,
    pub access: Access,
    pub http_limits: HttpLimits,
    /// Set by the signal handler: stop accepting, drain.
    pub stopping: AtomicBool,
    /// One waker per shard, woken when `stopping` is set.
    pub stop_wakers: Vec<AtomicWaker>,
    /// Shards whose connections have drained.
    pub drained: AtomicUsize,
    /// Shards that recovered their log and accept connections.
    pub ready: AtomicUsize,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub attachments: crate::attachments::AttachmentStore,
    /// Writes and syncs uploads off the shard threads.
    pub uploads: Arc<crate::attachments::UploadWriter>,
    /// The admin listener (`server.admin`), until shard 0 takes it.
    pub admin_listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    /// Body limit of JSON endpoints; the parser's limit is the larger attachment limit.
    pub json_body_bytes_max: usize,
    /// Client connections of the whole process, within what the open-file limit leaves.
    pub connections: ConnectionBudget,
}

/// Descriptors kept free of client connections for the process (stdio, pipes, its threads):
/// see [`fd_budget`].
pub const FDS_RESERVED: u64 = 32;
/// ... and per shard: its log (the active and spare segments, up to `mapped_segments_max` = 16
/// mapped ones, the directory, lock and checkpoint, the sync descriptors), its ring, doorbell,
/// eventfds and listeners, and files opened for a while (history from older segments, the
/// firehose, attachments).
pub const FDS_RESERVED_PER_SHARD: u64 = 32;

/// How many client connections the open-file limit allows with `shards` shards.
pub fn fd_budget(nofile: u64, shards: usize) -> u64 {
    nofile.saturating_sub(FDS_RESERVED + FDS_RESERVED_PER_SHARD * shards as u64)
}

/// Raises the soft open-file limit to the hard one; returns the soft limit in effect.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// The process-wide count of client connections against its maximum: a connection is taken
/// at accept and given back when it ends (moving between shards keeps it). Above the maximum a
/// new connection is closed at once (`kefu_connections_refused_total`), so sockets never use
/// the descriptors the logs and files need; a log that could not open its next segment, or a
/// sync that could not get a descriptor, would stop the shard's writes.
pub struct ConnectionBudget {
    open: AtomicU64,
    max: u64,
}

impl ConnectionBudget {
    pub fn new(max: u64) -> Self {
        Self {
            open: AtomicU64::new(0),
            max,
        }
    }

    /// Counts a new connection, if there is room.
    pub fn take(&self) -> bool {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub fn give(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) == self.inboxes.len()
            && !self.stopping.load(Ordering::Acquire)
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }
}

/// A shard's local state, shared by its tasks (single thread: `Rc`, cells).
pub struct ShardCtx {
    pub id: u16,
    pub shared: Arc<Shared>,
    pub metrics: Rc<ShardMetrics>,
    pub pool: BufferPool,
    pub log: Rc<RefCell<Log>>,
    /// Local stop flag and the wakers of connections waiting on it, by connection id.
    pub stopping: Cell<bool>,
    /// Waiting connections: their wake-up deadline (ms since `epoch`, [`NO_DEADLINE`]: only
    /// shutdown) and waker. One sweeper per shard wakes those whose deadline passed, so an
    /// idle connection holds no timer of its own (a monoio `Sleep` is 640 bytes). Every idle
    /// connection has an entry: 32 bytes (40 with an `Option<Instant>`), hashed with foldhash.
    stop_waiters: RefCell<HashMap<u64, (u64, Waker), foldhash::fast::RandomState>>,
    /// The clock `stop_waiters` deadlines count from.
    epoch: Instant,
    next_conn_id: Cell<u64>,
    /// Conversation starts per peer address on this shard (`limits.conversation_creates_per_ip_*`;
    /// `None` when turned off). Loopback peers are not limited.
    pub create_limiter: RefCell<Option<crate::ratelimit::RateLimiter>>,
    /// Open connections per peer address on this shard (`limits.connections_per_ip_max`),
    /// and each counted connection's address, by connection id. Only addresses the limit
    /// applies to are counted.
    ip_conns: RefCell<HashMap<u64, u32, foldhash::fast::RandomState>>,
    conn_ips: RefCell<HashMap<u64, u64, foldhash::fast::RandomState>>,
}

/// A `stop_waiters` entry that waits for shutdown only.
const NO_DEADLINE: u64 = u64::MAX;

impl ShardCtx {
    /// Publishes this shard's open-connection count to the other shards (they read it before
    /// they move a connection here, see [`crate::migrate`]).
    pub fn open_changed(&self) {
        self.shared.arrivals[self.id as usize].set_open(self.metrics.connections_open.get());
    }

    pub fn next_conn_id(&self) -> u64 {
        let id = self.next_conn_id.get();
        self.next_conn_id.set(id + 1);
        id
    }

    /// Resolves when the shard starts shutting down. `conn` keys the waker so a connection
    /// that waits many times holds one slot.
    pub async fn stopped(&self, conn: u64) {
        std::future::poll_fn(|cx| {
            if self.stopping.get() {
                return std::task::Poll::Ready(());
            }
            self.stop_waiters
                .borrow_mut()
                .insert(conn, (NO_DEADLINE, cx.waker().clone()));
            std::task::Poll::Pending
        })
        .await
    }

    /// Resolves at `deadline` (to within `SWEEP_MS`) or when the shard starts shutting down.
    pub fn deadline_or_stop(&self, conn: u64, deadline: Instant) -> DeadlineOrStop<'_> {
        DeadlineOrStop {
            ctx: self,
            conn,
            deadline_ms: self.deadline_ms(deadline),
        }
    }

    /// `deadline` in milliseconds since the shard's epoch, rounded up: a wait never ends
    /// before its deadline.
    pub fn deadline_ms(&self, deadline: Instant) -> u64 {
        let after_epoch = deadline.saturating_duration_since(self.epoch).as_nanos();
        after_epoch
            .div_ceil(1_000_000)
            .min(u128::from(NO_DEADLINE - 1)) as u64
    }

    /// The poll of a wait for connection `conn`'s deadline (ms since the epoch) or the
    /// shard's stop. A waiter that polled must [`ShardCtx::leave_deadline`] when it stops
    /// waiting, as [`DeadlineOrStop`] does on drop.
    pub fn poll_deadline_or_stop(
        &self,
        conn: u64,
        deadline_ms: u64,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Woken> {
        if self.stopping.get() {
            return std::task::Poll::Ready(Woken::Stop);
        }
        if self.now_ms() >= deadline_ms {
            return std::task::Poll::Ready(Woken::Deadline);
        }
        self.stop_waiters
            .borrow_mut()
            .insert(conn, (deadline_ms, cx.waker().clone()));
        std::task::Poll::Pending
    }

    /// Removes connection `conn`'s deadline entry, so the sweeper never wakes a connection
    /// that is busy with something else.
    pub fn leave_deadline(&self, conn: u64) {
        self.stop_waiters.borrow_mut().remove(&conn);
    }

    /// Milliseconds since `epoch`, rounded down.
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Wakes the connections whose deadline passed.
    fn sweep(&self) {
        let now = self.now_ms();
        for (deadline, waker) in self.stop_waiters.borrow().values() {
            if *deadline <= now {
                waker.wake_by_ref();
            }
        }
    }

    pub fn forget_conn(&self, conn: u64) {
        self.stop_waiters.borrow_mut().remove(&conn);
        if let Some(ip) = self.conn_ips.borrow_mut().remove(&conn) {
            let mut counts = self.ip_conns.borrow_mut();
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }

    /// The limiter key of `peer` if `limits.connections_per_ip_max` applies to it.
    pub fn ip_limited(&self, peer: Option<SocketAddr>) -> Option<u64> {
        let limits = &self.shared.config.limits;
        let peer = peer?;
        (limits.connections_per_ip_max > 0
            && (!peer.ip().is_loopback() || limits.ip_limits_include_loopback))
            .then(|| crate::ratelimit::ip_key(peer.ip()))
    }

    /// Whether address `ip` has `connections_per_ip_max` connections open on this shard.
    pub fn ip_full(&self, ip: u64) -> bool {
        self.ip_conns
            .borrow()
            .get(&ip)
            .is_some_and(|&n| n as usize >= self.shared.config.limits.connections_per_ip_max)
    }

    /// Counts connection `conn` against address `ip` until [`ShardCtx::forget_conn`].
    pub fn count_ip(&self, conn: u64, ip: Option<u64>) {
        if let Some(ip) = ip {
            *self.ip_conns.borrow_mut().entry(ip).or_insert(0) += 1;
            self.conn_ips.borrow_mut().insert(conn, ip);
        }
    }

    fn stop_all(&self) {
        self.stopping.set(true);
        for (_, (_, w)) in self.stop_waiters.borrow_mut().drain() {
            w.wake();
        }
    }
}

/// What ended a [`ShardCtx::deadline_or_stop`] wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    Deadline,
    Stop,
}

/// The future of [`ShardCtx::deadline_or_stop`]; leaving (done or dropped) removes its entry,
/// so the sweeper never wakes a connection that is busy with something else.
pub struct DeadlineOrStop<'a> {
    ctx: &'a ShardCtx,
    conn: u64,
    /// Milliseconds since the shard's epoch (8 bytes in every waiting connection's future,
    /// where an `Instant` is 16).
    deadline_ms: u64,
}

impl std::future::Future for DeadlineOrStop<'_> {
    type Output = Woken;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Woken> {
        self.ctx
            .poll_deadline_or_stop(self.conn, self.deadline_ms, cx)
    }
}

impl Drop for DeadlineOrStop<'_> {
    fn drop(&mut self) {
        self.ctx.leave_deadline(self.conn);
    }
}

/// Granularity of connection deadlines (idle timeouts, WebSocket pings).
pub const SWEEP_MS: u64 = 100;

/// Binds `count` listeners on `addr` with SO_REUSEPORT; with port 0 the first picks the port
/// and the rest bind to it.
///
/// SO_REUSEPORT would also let this process join the listeners of another process of the same
/// user on that port (a second kefu started by mistake): the kernel would then split the
/// connections between the two, and each would answer 401 for the other's conversations. So
/// a fixed port is first probed with a socket without SO_REUSEPORT, whose bind fails while
/// anything listens there. (A server that binds the port between the probe and the listeners
/// without SO_REUSEPORT makes the listeners' bind fail instead; one with it is not caught.)
fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> anyhow::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    if addr.port() != 0 {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .context("creating a socket")?;
        // Without SO_REUSEADDR the connections of a previous run in TIME_WAIT would fail it.
        probe.set_reuse_address(true)?;
        if let Err(e) = probe.bind(&addr.into()) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow::bail!(
                    "{addr} is already in use (another kefu, or another server, listens there)"
                );
            }
            return Err(e).with_context(|| format!("binding {addr}"));
        }
    }
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let domain = socket2::Domain::for_address(bound);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)
            .context("creating a listening socket")?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_cloexec(true)?;
        socket
            .bind(&bound.into())
            .with_context(|| format!("binding {bound}"))?;
        socket.listen(backlog as i32)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        out.push(listener);
    }
    Ok((out, bound))
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns later), so the main
/// thread can take them synchronously with `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local, initialized signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is a valid signal set; sigwait writes the signal number.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

thread_local! {
    /// The CPUs a pinned shard thread was allowed before it was pinned (for its io_uring
    /// workers, see [`widen_io_workers`]); `None` on unpinned threads.
    static UNPINNED_CPUS: std::cell::Cell<Option<libc::cpu_set_t>> = const { std::cell::Cell::new(None) };
}

/// Pins the calling thread to `cpu`, remembering the CPUs it was allowed before.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity/sched_setaffinity on the calling
    // thread, with its size.
    unsafe {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let mut before: libc::cpu_set_t = std::mem::zeroed();
        let got = libc::sched_getaffinity(0, size, &mut before) == 0;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size, &set) != 0 {
            eprintln!("kefu: could not pin shard thread to cpu {cpu}; running unpinned");
        } else if got {
            UNPINNED_CPUS.with(|c| c.set(Some(before)));
        }
    }
}

/// How often a shard tends its io_uring workers (CPUs and priority, see [`tend_io_workers`]).
/// The kernel lets an idle worker exit after 5 s and starts a new one at the next sync, so
/// after a quiet spell the first syncs run on an untended worker for up to this long. Not
/// shorter: a pass reads `/proc/self/task` with about 15 allocations, and at 200 ms that
/// showed as 0.005 more allocations per HTTP send in `count-allocs.sh`.
const TEND_IO_WORKERS_EVERY_MS: u64 = 1000;

/// Tends the kernel's io_uring workers of this shard thread, the threads that run its fsyncs
/// (`/proc/self/task/*/comm` = `iou-wrk-<shard tid>`); a worker the kernel creates between two
/// passes runs untended until the next one.
///
/// `widen`, on a pinned shard: lets them use every CPU the shard was allowed before it was
/// pinned. A worker inherits the pinned shard's single CPU when it is created, so a finished
/// fsync waited for that CPU (busy with the shard, or with whatever else runs there) before
/// the shard heard of it. `IORING_REGISTER_IOWQ_AFF` should set this once, but on this kernel
/// (6.18) it returned 0 and new workers still came up pinned. Measured (2026-11-26, side by
/// side with the build before): durable POST under wrk 18.1-18.6 us per POST against
/// 20.0-20.1, open loop p99 lower in 4 of 5 pairs.
///
/// `realtime` (`server.sync_realtime`): gives them `SCHED_FIFO`, see
/// [`crate::shard::SYNC_THREAD_FIFO_PRIORITY`]. Returns whether to keep doing so: false once
/// the kernel refused.
fn tend_io_workers(
    shard_tid: libc::pid_t,
    widen: Option<&libc::cpu_set_t>,
    mut realtime: bool,
) -> bool {
    let name = format!("iou-wrk-{shard_tid}");
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return realtime;
    };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let is_ours = std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|comm| comm.trim_end() == name);
        if !is_ours {
            continue;
        }
        if let Some(cpus) = widen {
            // SAFETY: cpu_set_t is plain data; the affinity calls read and write `size` bytes.
            unsafe {
                let mut now: libc::cpu_set_t = std::mem::zeroed();
                if libc::sched_getaffinity(tid, size, &mut now) == 0 && !libc::CPU_EQUAL(&now, cpus)
                {
                    libc::sched_setaffinity(tid, size, cpus);
                }
            }
        }
        realtime = realtime && crate::shard::make_sync_thread_realtime(tid);
    }
    realtime
}

fn storage_durability(d: Durability) -> kefu_storage::Durability {
    match d {
        Durability::Always => kefu_storage::Durability::Always,
        Durability::Interval { ms } => kefu_storage::Durability::IntervalMs(ms),
        Durability::Never => kefu_storage::Durability::Never,
    }
}

/// Runs the gateway until SIGTERM/SIGINT. `demo_lines` are printed before the ready line.
pub fn run(config: Config, demo_lines: Vec<String>) -> anyhow::Result<()> {
    let signals = block_signals();
    let shards = config.shards;
    let nofile = raise_fd_limit();
    let connections_max = fd_budget(nofile, shards);
    let configured = config.limits.connections_per_shard_max as u64 * shards as u64;
    if connections_max < configured {
        eprintln!(
            "kefu: open-file limit {nofile}: at most {connections_max} client connections \
             ({} descriptors kept for logs and files; {shards} x limits.connections_per_shard_max \
             would be {configured})",
            nofile - connections_max
        );
    }
    if connections_max == 0 {
        anyhow::bail!(
            "the open-file limit ({nofile}) leaves no descriptor for connections; raise it (ulimit -n)"
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let (http_listeners, http_addr) = bind_listeners(config.http, shards, config.backlog)?;
    let (tcp_listeners, tcp_addr) = bind_listeners(config.tcp, shards, config.backlog)?;
    let (admin_listener, admin_addr) = match config.admin {
        Some(addr) => {
            let (mut one, bound) = bind_listeners(addr, 1, config.backlog)?;
            (one.pop(), Some(bound))
        }
        None => (None, None),
    };
    let l = &config.limits;
    let http_limits = HttpLimits {
        request_line_bytes_max: l.request_uri_bytes_max,
        headers_count_max: l
            .request_headers_max
            .min(kefu_protocol::http::HEADERS_COUNT_HARD_MAX),
        head_bytes_max: l.request_head_bytes_max.max(l.request_uri_bytes_max),
        body_bytes_max: l.request_body_bytes_max as u64,
        chunk_line_bytes_max: 1024,
        chunked_body_allowed: true,
        host_required: false,
    };
    http_limits
        .validate()
        .map_err(|e| anyhow::anyhow!("limits: {e}"))?;
    let tls = match &config.tls {
        Some(t) => Some(crate::tls::server_config(t)?),
        None => None,
    };
    let access = Access::new(&config)?;
    let (attachments, cleanup) = crate::attachments::AttachmentStore::open(&config.data_dir)
        .context("opening the attachment store")?;
    if cleanup.temp_files_removed + cleanup.orphans_removed > 0 {
        eprintln!("kefu: attachments: removed leftovers of interrupted uploads: {cleanup:?}");
    }
    let (uploads, uploads_thread) =
        crate::attachments::UploadWriter::start().context("starting the upload writer thread")?;
    // Uploads may be larger than JSON bodies: the parser admits the largest attachment limit
    // and the JSON endpoints check their own.
    let attachment_bytes_max = config
        .tenants
        .iter()
        .map(|t| t.attachments.size_bytes_max)
        .max()
        .unwrap_or(0);
    let mut http_limits = http_limits;
    http_limits.body_bytes_max = http_limits.body_bytes_max.max(attachment_bytes_max);
    let json_body_bytes_max = config.limits.request_body_bytes_max;
    crate::conn::set_write_timeout_ms(config.limits.write_timeout_ms);
    let (doorbells, doorbell_readers) =
        crate::wake::Doorbells::new(shards).context("creating the shards' doorbells")?;
    let shared = Arc::new(Shared {
        doorbells,
        delivery_returns: (0..shards)
            .map(|_| {
                Arc::new(crossbeam_queue::ArrayQueue::new(
                    crate::engine::DELIVERY_POOL_MAX,
                ))
            })
            .collect(),
        arrivals: (0..shards)
            .map(|_| crate::migrate::Arrivals::new())
            .collect(),
        doorbell_readers: doorbell_readers
            .into_iter()
            .map(|r| std::sync::Mutex::new(Some(r)))
            .collect(),
        inboxes: (0..shards)
            .map(|_| Arc::new(Inbox::new(config.limits.shard_inbox_depth)))
            .collect(),
        stop_wakers: (0..shards).map(|_| AtomicWaker::new()).collect(),
        access,
        http_limits,
        stopping: AtomicBool::new(false),
        drained: AtomicUsize::new(0),
        ready: AtomicUsize::new(0),
        tls,
        attachments,
        uploads: uploads.clone(),
        admin_listener: std::sync::Mutex::new(admin_listener),
        json_body_bytes_max,
        connections: ConnectionBudget::new(connections_max),
        config,
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin_threads = shared.config.pin_threads;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
    let mut threads = Vec::with_capacity(shards);
    for (id, (http, tcp)) in http_listeners.into_iter().zip(tcp_listeners).enumerate() {
        let shared = shared.clone();
        let ready_tx = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kefu-shard-{id}"))
            .spawn(move || {
                if pin_threads {
                    pin_to_cpu(id % cpus);
                }
                let id = id as u16;
                if let Err(e) = shard_thread(id, shared, http, tcp, ready_tx.clone()) {
                    let _ = ready_tx.send(Err(format!("shard {id}: {e:#}")));
                }
            })
            .context("spawning a shard thread")?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("{e}"),
            Err(_) => anyhow::bail!("a shard thread died during start"),
        }
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in &demo_lines {
            writeln!(out, "{line}")?;
        }
        writeln!(
            out,
            "kefu ready http={http_addr} tcp={tcp_addr} shards={shards} data={}{}",
            shared.config.data_dir.display(),
            admin_addr.map_or(String::new(), |a| format!(" admin={a}"))
        )?;
        out.flush()?;
    }
    // The shard threads run on; a failure after start shows up as a closed channel here.
    std::thread::spawn({
        let shared = shared.clone();
        move || {
            if let Ok(Err(e)) = ready_rx.recv() {
                eprintln!("kefu: {e}");
                shared.stopping.store(true, Ordering::Release);
                // SAFETY: signalling our own process to run the normal shutdown path.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
        }
    });
    let sig = wait_for_signal(&signals);
    eprintln!("kefu: signal {sig}: stop accepting, drain, sync");
    shared.stopping.store(true, Ordering::Release);
    for w in &shared.stop_wakers {
        w.wake();
    }
    for t in threads {
        let _ = t.join();
    }
    // The writer finishes what is queued (stored and counted, even where the shard's bounded
    // drain gave up on the client waiting for it), then stops.
    uploads.stop();
    let _ = uploads_thread.join();
    eprintln!("kefu: stopped");
    Ok(())
}

fn shard_thread(
    id: u16,
    shared: Arc<Shared>,
    http: std::net::TcpListener,
    tcp: std::net::TcpListener,
    ready: std::sync::mpsc::Sender<Result<u16, String>>,
) -> anyhow::Result<()> {
    let entries = shared.config.uring_entries;
    if shared.config.driver == crate::config::DriverChoice::Legacy {
        eprintln!("kefu: shard {id}: using the legacy epoll driver (server.driver = \"legacy\")");
        return legacy_runtime()?.block_on(shard_main(id, shared, http, tcp, ready, true));
    }
    let mut urb = io_uring::IoUring::builder();
    urb.setup_single_issuer().setup_defer_taskrun();
    let tuned = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(entries)
        .uring_builder(urb)
        .enable_timer()
        .build();
    match tuned {
        Ok(mut rt) => return rt.block_on(shard_main(id, shared, http, tcp, ready, false)),
        Err(e) => eprintln!(
            "kefu: shard {id}: io_uring with single_issuer+defer_taskrun refused ({e}); trying plain io_uring"
        ),
    }
    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(entries)
        .enable_timer()
        .build()
    {
        Ok(mut rt) => return rt.block_on(shard_main(id, shared, http, tcp, ready, false)),
        Err(e) => {
            eprintln!("kefu: shard {id}: io_uring unavailable ({e}); using the legacy epoll driver")
        }
    }
    legacy_runtime()?.block_on(shard_main(id, shared, http, tcp, ready, true))
}

fn legacy_runtime()
-> anyhow::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>> {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .context("building the legacy runtime")
}

/// Builds the shard's engine from the config and the tenant registry.
fn build_engine(id: u16, config: &Config, access: &Access) -> anyhow::Result<Engine> {
    let l = &config.limits;
    let limits = EngineLimits {
        conversations_max: l.conversations_per_shard_max,
        idempotency_keys_per_conversation_max: l.idempotency_keys_per_conversation_max,
        idempotency_keys_per_shard_max: l.idempotency_keys_per_shard_max,
        history_limit_max: l.history_limit_max,
        subscribers_per_conversation_max: 1024,
        model: crate::access::model_limits(l),
    };
    let router_limits = RouterLimits {
        conversations_max: l.conversations_per_shard_max,
        queue_len_max: l.conversations_per_shard_max,
        ..RouterLimits::DEMO
    };
    Engine::new(id, limits, access.registry.clone(), router_limits)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn shard_main(
    id: u16,
    shared: Arc<Shared>,
    http: std::net::TcpListener,
    tcp: std::net::TcpListener,
    ready: std::sync::mpsc::Sender<Result<u16, String>>,
    legacy: bool,
) -> anyhow::Result<()> {
    let config = &shared.config;
    crate::wake::enter_shard(id, shared.doorbells.clone());
    let reader = shared.doorbell_readers[id as usize]
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
        .context("the shard's doorbell was taken already")?;
    monoio::spawn(shared.doorbells.clone().serve(id, reader));
    let mut log_config = LogConfig::new(config.data_dir.join(format!("shard-{id}")));
    log_config.durability = storage_durability(config.durability);
    log_config.segment_bytes_max = config.limits.segment_bytes_max;
    log_config.syncs_in_flight_max = config.limits.syncs_in_flight_max;
    log_config.zero_fill_segments = config.limits.zero_fill_segments;
    // Room for the largest message record the limits let through (worst-case escaping).
    log_config.record_bytes_max =
        u32::try_from(config.limits.record_bytes_max()).unwrap_or(u32::MAX);
    // The conversation index is built below as recovery reads the log, and conversations the
    // engine forgets leave it as they go: a long log's index never holds all of it at once.
    log_config.index_conversations_at_open = false;
    log_config.retention_bytes_max = (config.limits.log_retention_bytes_max > 0)
        .then_some(config.limits.log_retention_bytes_max);
    log_config.retention_age_ms =
        (config.limits.log_retention_age_ms > 0).then_some(config.limits.log_retention_age_ms);
    let (mut log, report) = Log::open(log_config).context("opening the shard log")?;
    if let Some(t) = &report.truncated {
        eprintln!("kefu: shard {id}: log tail cut at recovery: {t:?}");
    }
    let mut engine = build_engine(id, config, &shared.access)?;
    engine.use_delivery_returns(shared.delivery_returns[id as usize].clone());
    let mut from = log.start_offset();
    engine.begin_recovery(from);
    let mut failure = None;
    let mut unindexed = 0;
    loop {
        let (next, left_out) = log
            .read_range_indexing(from, 4096, |fr| {
                if failure.is_none()
                    && let Err(e) = engine.recover_record(&fr.header, fr.payload)
                {
                    failure = Some(format!("offset {}: {e}", fr.header.log_offset));
                }
            })
            .context("reading the log for recovery")?;
        if let Some(e) = failure.take() {
            anyhow::bail!("recovery: {e}");
        }
        unindexed += left_out;
        engine.forget_in_log_during_recovery(&mut log);
        if next == from {
            break;
        }
        from = next;
    }
    if engine.recovery_skipped() > 0 {
        eprintln!(
            "kefu: shard {id}: log starts at offset {} (retention): {} records of conversations closed before it skipped",
            log.start_offset(),
            engine.recovery_skipped()
        );
    }
    if unindexed > 0 {
        eprintln!(
            "kefu: shard {id}: {unindexed} records out of seq order left out of the conversation index"
        );
    }
    engine.finish_recovery(now_ms());
    engine.forget_in_log_after_recovery(&mut log);
    engine.set_appended_end(log.next_offset());
    let log = Rc::new(RefCell::new(log));
    let engine = Rc::new(RefCell::new(engine));
    let metrics = Rc::new(ShardMetrics::new());
    let ctx = Rc::new(ShardCtx {
        id,
        shared: shared.clone(),
        metrics: metrics.clone(),
        pool: BufferPool::new(
            config.limits.buffer_bytes,
            config.limits.buffers_per_shard_max,
        ),
        log: log.clone(),
        stopping: Cell::new(false),
        stop_waiters: RefCell::new(HashMap::default()),
        epoch: Instant::now(),
        next_conn_id: Cell::new(1),
        ip_conns: RefCell::new(HashMap::default()),
        conn_ips: RefCell::new(HashMap::default()),
        create_limiter: RefCell::new((config.limits.conversation_creates_per_ip_per_s > 0).then(
            || {
                crate::ratelimit::RateLimiter::new(&crate::tenant::RateLimitConfig {
                    messages_per_s: config.limits.conversation_creates_per_ip_per_s,
                    burst: config.limits.conversation_creates_per_ip_burst,
                    visitors_tracked_max: config.limits.conversation_create_ips_tracked_max,
                })
            },
        )),
    });
    let inbox = shared.inboxes[id as usize].clone();
    // Under the legacy driver, `ring` syncs run on a flusher thread.
    let sync = match config.sync {
        crate::config::SyncMode::Inline => SyncWay::Inline,
        crate::config::SyncMode::Ring if legacy => SyncWay::Thread,
        crate::config::SyncMode::Ring => SyncWay::Ring,
    };
    let committer_task = monoio::spawn(committer(
        inbox.clone(),
        engine,
        log,
        metrics,
        sync,
        config.sync_realtime,
    ));
    if legacy {
        http.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
    }
    let http = monoio::net::TcpListener::from_std(http).context("registering the http listener")?;
    let tcp = monoio::net::TcpListener::from_std(tcp).context("registering the tcp listener")?;
    let sweeper = ctx.clone();
    // The kernel's io_uring workers of this shard run its syncs (`SyncWay::Ring`).
    let unpinned = UNPINNED_CPUS.with(std::cell::Cell::get).filter(|_| !legacy);
    let mut realtime = config.sync_realtime && sync == SyncWay::Ring;
    monoio::spawn(async move {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut since_tend_ms = 0;
        while !sweeper.stopping.get() {
            monoio::time::sleep(Duration::from_millis(SWEEP_MS)).await;
            sweeper.sweep();
            since_tend_ms += SWEEP_MS;
            if (unpinned.is_some() || realtime) && since_tend_ms >= TEND_IO_WORKERS_EVERY_MS {
                since_tend_ms = 0;
                // A refusal stands for the process's life: stop asking.
                realtime = tend_io_workers(tid, unpinned.as_ref(), realtime);
            }
        }
    });
    let http_task = monoio::spawn(accept_loop(ctx.clone(), http, Proto::Http));
    // The first shard to get here serves the admin listener, if there is one.
    let admin = shared
        .admin_listener
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let admin_task = match admin {
        Some(l) => {
            let l =
                monoio::net::TcpListener::from_std(l).context("registering the admin listener")?;
            Some(monoio::spawn(accept_loop(ctx.clone(), l, Proto::Admin)))
        }
        None => None,
    };
    let tcp_task = monoio::spawn(accept_loop(ctx.clone(), tcp, Proto::Binary));
    let adopt_task = monoio::spawn(crate::migrate::adopt(ctx.clone()));
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let _ = ready.send(Ok(id));

    // Wait for the stop signal.
    std::future::poll_fn(|cx| {
        shared.stop_wakers[id as usize].register(cx.waker());
        if shared.stopping.load(Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    ctx.stop_all();
    let _ = http_task.await;
    let _ = tcp_task.await;
    if let Some(t) = admin_task {
        t.await;
    }
    adopt_task.await;
    // Drain: connections finish their current request and close; wait a bounded time.
    let deadline = std::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    while ctx.metrics.connections_open.get() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    // Other shards may still send us commands for their draining connections.
    shared.drained.fetch_add(1, Ordering::AcqRel);
    let deadline = std::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    while shared.drained.load(Ordering::Acquire) < shared.shards()
        && std::time::Instant::now() < deadline
    {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    inbox.stop();
    let _ = committer_task.await;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http,
    Binary,
    /// The admin listener: HTTP, `/metrics` and the health checks only.
    Admin,
}

/// Tells a connection refused for the connection limit why, if it can be done without
/// waiting: a 503 with `Retry-After` on a plain HTTP listener, an error frame (code 503) on a
/// plain binary one (nothing on TLS listeners: that would take a handshake). Whatever the
/// client already sent is read and dropped first, so the close is a FIN after the answer, not
/// a reset that could discard it.
fn answer_refused(ctx: &ShardCtx, stream: &monoio::net::TcpStream, proto: Proto, reason: &str) {
    let tls = ctx.shared.config.tls.as_ref();
    let mut out = Vec::with_capacity(256);
    // The admin listener is always plain.
    let plain = match proto {
        Proto::Admin => true,
        Proto::Http => !tls.is_some_and(|t| t.http),
        Proto::Binary => !tls.is_some_and(|t| t.tcp),
    };
    match proto {
        _ if !plain => return,
        Proto::Admin | Proto::Http => {
            let head = kefu_protocol::http::ResponseHead::new(503)
                .content_type("application/json")
                .keep_alive(false)
                .retry_after_secs(1);
            kefu_protocol::http::write_json_error(&mut out, &head, reason);
        }
        Proto::Binary => crate::binary::error_frame(&mut out, 0, 503, None, reason),
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let mut scratch = [0u8; 4096];
    // Bounded: at most 16 reads of what is already there.
    for _ in 0..16 {
        // SAFETY: reading into a local buffer from a descriptor we own, without waiting.
        let n = unsafe {
            libc::recv(
                fd,
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
    }
    // SAFETY: sending from a local buffer on a descriptor we own, without waiting.
    let _ = unsafe {
        libc::send(
            fd,
            out.as_ptr().cast(),
            out.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

async fn accept_loop(ctx: Rc<ShardCtx>, listener: monoio::net::TcpListener, proto: Proto) {
    let me = ctx.next_conn_id();
    let limit = ctx.shared.config.limits.connections_per_shard_max as u64;
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = ctx.stopped(me) => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("kefu: shard {}: accept: {e}", ctx.id);
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let ip = ctx.ip_limited(Some(peer));
        let refusal = if ip.is_some_and(|ip| ctx.ip_full(ip)) {
            Some("too many connections from this address")
        } else if ctx.metrics.connections_open.get() >= limit || !ctx.shared.connections.take() {
            Some("the gateway has too many connections; retry shortly")
        } else {
            None
        };
        if let Some(reason) = refusal {
            let refused = &ctx.metrics.connections_refused;
            refused.set(refused.get() + 1);
            answer_refused(&ctx, &stream, proto, reason);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        ctx.metrics.connection_opened();
        match proto {
            Proto::Http => serve_http(&ctx, stream, None, 0, false, ip),
            Proto::Admin => serve_http(&ctx, stream, None, 0, true, ip),
            Proto::Binary => {
                ctx.open_changed();
                let ctx = ctx.clone();
                let conn = ctx.next_conn_id();
                ctx.count_ip(conn, ip);
                monoio::spawn(async move {
                    let why = crate::binary::serve(ctx.clone(), stream, conn).await;
                    ended(&ctx, conn, why);
                });
            }
        }
    }
    ctx.forget_conn(me);
}

/// Serves an HTTP connection this shard accepted or took over from another shard (its
/// `connection_opened` or `connection_arrived` is counted already).
/// `moves`: how often it moved between shards before ([`crate::migrate`]).
/// `tls`: the TLS session of a connection another shard moved here (`migrate`).
pub(crate) fn serve_http(
    ctx: &Rc<ShardCtx>,
    stream: monoio::net::TcpStream,
    tls: Option<crate::conn::TlsSession>,
    moves: u8,
    admin: bool,
    ip: Option<u64>,
) {
    ctx.open_changed();
    let ctx = ctx.clone();
    // One spawn per protocol, so each connection's task is sized for its own protocol's
    // future (an idle HTTP connection does not pay for the binary session's state).
    let conn = ctx.next_conn_id();
    ctx.count_ip(conn, ip);
    // The HTTP phase is boxed before the spawn, so the task holds a pointer to it (an idle
    // keep-alive connection's task stays a few words). An upgraded connection's session then
    // runs in a task of its own, sized for it, and this one (with the HTTP state) is freed.
    let http = Box::pin(crate::http::serve(
        ctx.clone(),
        stream,
        tls,
        conn,
        moves,
        admin,
    ));
    monoio::spawn(async move {
        match http.await {
            crate::http::Served::Closed(why) => ended(&ctx, conn, why),
            crate::http::Served::Migrated => {
                ctx.forget_conn(conn);
                ctx.metrics.connection_left();
                ctx.open_changed();
            }
            served => hand_over(&ctx, served, conn),
        }
    });
}

/// Accounts for a connection that ended.
pub(crate) fn ended(ctx: &ShardCtx, conn: u64, why: Disconnect) {
    ctx.shared.connections.give();
    ctx.forget_conn(conn);
    ctx.metrics.connection_closed(why);
    ctx.open_changed();
}

/// Starts the session an HTTP connection handed over to (WebSocket or firehose) in a task of
/// its own.
fn hand_over(ctx: &Rc<ShardCtx>, served: crate::http::Served, conn: u64) {
    match served {
        crate::http::Served::Closed(why) => ended(ctx, conn, why),
        crate::http::Served::Migrated => unreachable!("handled by serve_http"),
        crate::http::Served::WebSocket { conn: c, up, rest } => {
            // The session accounts for itself: no wrapper around it in its task.
            monoio::spawn(crate::ws::serve(ctx.clone(), c, up, rest, conn));
        }
        crate::http::Served::Stream {
            conn: c,
            shard,
            from,
            follow,
        } => {
            // The firehose's future is larger and rare: boxed, so its task stays small.
            let stream = Box::pin(crate::stream::serve(
                ctx.clone(),
                c,
                shard,
                from,
                follow,
                conn,
                true,
            ));
            let ctx = ctx.clone();
            monoio::spawn(async move {
                let why = stream.await;
                ended(&ctx, conn, why);
            });
        }
    }
}

/// Convenience for connection code: the reason a connection ended.
pub type Ended = Disconnect;

#[cfg(test)]
mod tests {
    use super::{ConnectionBudget, fd_budget};

    /// The open-file limit leaves 32 descriptors for the process and 32 per shard; the rest
    /// is the connections' budget, which never goes above its maximum.
    #[test]
    fn connections_stay_within_what_the_open_file_limit_leaves() {
        assert_eq!(fd_budget(20_000, 2), 19_904);
        assert_eq!(fd_budget(104, 1), 40);
        assert_eq!(fd_budget(50, 4), 0);
        let budget = ConnectionBudget::new(3);
        assert!((0..3).all(|_| budget.take()));
        assert!(!budget.take(), "full");
        budget.give();
        assert!(budget.take(), "room again");
        assert!(!budget.take());
    }

    /// An idle WebSocket's memory is one task allocation: monoio's header (state, vtable,
    /// owner thread: 24 bytes), stage tag (8) and join waker (16) around `ws::serve`'s
    /// future. mimalloc rounds it up to its size class (.., 384, 448, 512, 640, ..): this
    /// keeps it in 448 (it was a 184-byte task plus a 1,232-byte box, 1,472 bytes in their
    /// classes).
    #[test]
    fn an_idle_websocket_is_one_small_task() {
        let task = 24 + 8 + crate::future_size(crate::ws::serve) + 16;
        assert!(task <= 448, "an idle WebSocket's task grew to {task} bytes");
    }
}
