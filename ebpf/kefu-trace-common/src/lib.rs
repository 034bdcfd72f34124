//! The `#[repr(C)]` types that cross the kernel boundary between kefu's eBPF probes, the tracer
//! and the gateway's request marker, and the marker itself.
//!
//! Architecture invariant: this crate knows no runtime, does no I/O and allocates nothing; it is
//! `no_std` so the kernel-side eBPF crate can share the exact same layouts. Only the types here
//! cross the kernel boundary.
//!
//! # How the gateway uses it (one marker call per request, not one per stage)
//!
//! ```
//! use kefu_trace_common::{RequestRecord, Stage, emit, now_ns, route, trace_enabled};
//!
//! // Once when a request starts: one relaxed atomic load, false while no tracer is attached
//! // (and, with sampling, for the requests it skips).
//! let traced = trace_enabled();
//! let mut rec = RequestRecord::default();
//! if traced {
//!     rec.request_id = 1;
//!     rec.fd = 7;
//!     rec.route = route::MESSAGE_SEND;
//!     rec.set(Stage::Accepted, now_ns());
//! }
//! // ... at each stage below: `if traced { rec.set(Stage::X, now_ns()) }`
//! // When the response has been handed to the socket:
//! if traced {
//!     rec.set(Stage::Answered, now_ns());
//!     emit(&rec);
//! }
//! ```
//!
//! Where each stage timestamp is taken (all `CLOCK_MONOTONIC` nanoseconds from [`now_ns`], the
//! same clock as the kernel's `bpf_ktime_get_ns`, so kernel events line up with stages):
//!
//! | stage | set it when |
//! |---|---|
//! | `Accepted` | the request's first byte was read from the connection (for the first request of a connection: the accept completed) |
//! | `Parsed` | the request (HTTP head + body, WebSocket frame, or binary frame) is fully decoded and validated |
//! | `RoutedToShard` | the request has been handed to (or arrived on) the shard that owns the conversation |
//! | `Appended` | the storage append returned its log offset (skip for requests that write nothing) |
//! | `Synced` | the sync (fsync / group commit) covering that append finished (skip when durability is `never` or nothing was written) |
//! | `Delivered` | the message was pushed to the other participants' connections/queues (skip when none) |
//! | `Answered` | the response bytes were submitted to the socket (the write completed if that is cheaper to know) |
//!
//! Stages that a request does not pass through stay 0; the tracer shows them as skipped. A
//! stage, once set, must not be earlier than any stage set before it (the tracer checks order).
//!
//! Ids: `request_id` is unique per gateway process (e.g. a per-shard counter with the shard in
//! the top 16 bits); `connection_id` is the gateway's id for the connection and `fd` its file
//! descriptor (the tracer joins `io_uring` events on it); `local_port`/`peer_port` are the TCP
//! ports of that connection (the tracer joins TCP state changes and retransmits on them);
//! `route` is one of the [`route`] ids; `status` is the HTTP status (or the binary protocol's
//! reply kind).
//!
//! # How tracing is switched on: a USDT-style semaphore
//!
//! [`KEFU_TRACE_SEMAPHORE`] is a 16-bit counter in the `.probes` section, a file-backed writable
//! mapping, exactly like a SystemTap/USDT semaphore. The tracer attaches its uprobe with the
//! semaphore's file offset as the kernel's `ref_ctr_offset`, so the kernel itself increments it in
//! every traced process when the probe is attached (also in processes started later) and
//! decrements it when the probe goes away, even if the tracer is killed. [`trace_enabled`] reads
//! it; with no tracer it is 0 and the gateway skips both the timestamps and the marker call.

#![no_std]

#[cfg(not(target_arch = "bpf"))]
use core::sync::atomic::{AtomicU16, AtomicU32, Ordering};

/// The version of the [`RequestRecord`] layout; the tracer refuses records of another version.
pub const RECORD_VERSION: u16 = 1;

/// The stages of a request inside the gateway, in the order a request passes them.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Accepted = 0,
    Parsed = 1,
    RoutedToShard = 2,
    Appended = 3,
    Synced = 4,
    Delivered = 5,
    Answered = 6,
}

/// Number of [`Stage`]s, the length of [`RequestRecord::stage_ns`].
pub const STAGE_COUNT: usize = 7;

impl Stage {
    pub const ALL: [Stage; STAGE_COUNT] = [
        Stage::Accepted,
        Stage::Parsed,
        Stage::RoutedToShard,
        Stage::Appended,
        Stage::Synced,
        Stage::Delivered,
        Stage::Answered,
    ];

    /// The snake_case name used in the tracer's JSON and trace exports.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Accepted => "accepted",
            Stage::Parsed => "parsed",
            Stage::RoutedToShard => "routed_to_shard",
            Stage::Appended => "appended",
            Stage::Synced => "synced",
            Stage::Delivered => "delivered",
            Stage::Answered => "answered",
        }
    }
}

/// Route ids for [`RequestRecord::route`]: small integers so the record stays fixed-size.
pub mod route {
    pub const UNKNOWN: u16 = 0;
    pub const HEALTH: u16 = 1;
    pub const METRICS: u16 = 2;
    pub const CONVERSATION_CREATE: u16 = 3;
    pub const CONVERSATION_GET: u16 = 4;
    pub const MESSAGE_SEND: u16 = 5;
    pub const MESSAGES_LIST: u16 = 6;
    pub const POLL: u16 = 7;
    pub const AGENT_STATUS: u16 = 8;
    pub const CONVERSATION_ACTION: u16 = 9;
    pub const ATTACHMENT_UPLOAD: u16 = 10;
    pub const ATTACHMENT_GET: u16 = 11;
    pub const STREAM: u16 = 12;
    pub const WS_FRAME: u16 = 13;
    pub const BINARY_FRAME: u16 = 14;

    /// A readable name for a route id (`"unknown"` for ids this build does not know).
    pub const fn name(route: u16) -> &'static str {
        match route {
            HEALTH => "health",
            METRICS => "metrics",
            CONVERSATION_CREATE => "conversation_create",
            CONVERSATION_GET => "conversation_get",
            MESSAGE_SEND => "message_send",
            MESSAGES_LIST => "messages_list",
            POLL => "poll",
            AGENT_STATUS => "agent_status",
            CONVERSATION_ACTION => "conversation_action",
            ATTACHMENT_UPLOAD => "attachment_upload",
            ATTACHMENT_GET => "attachment_get",
            STREAM => "stream",
            WS_FRAME => "ws_frame",
            BINARY_FRAME => "binary_frame",
            _ => "unknown",
        }
    }
}

/// One request's record, filled by the gateway and read by the uprobe on [`kefu_request_marker`].
///
/// Layout (little-endian, 96 bytes; the eBPF probe copies it byte for byte):
///
/// | off | size | field |
/// |---|---|---|
/// | 0 | 8 | request_id |
/// | 8 | 8 | connection_id |
/// | 16 | 8 | conversation_id (0 = none) |
/// | 24 | 4 | fd (i32, -1 = unknown) |
/// | 28 | 2 | shard |
/// | 30 | 2 | route ([`route`]) |
/// | 32 | 2 | status |
/// | 34 | 2 | local_port |
/// | 36 | 2 | peer_port |
/// | 38 | 2 | version = [`RECORD_VERSION`] |
/// | 40 | 56 | stage_ns: 7 x u64 CLOCK_MONOTONIC ns, indexed by [`Stage`], 0 = stage skipped |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub request_id: u64,
    pub connection_id: u64,
    pub conversation_id: u64,
    pub fd: i32,
    pub shard: u16,
    pub route: u16,
    pub status: u16,
    pub local_port: u16,
    pub peer_port: u16,
    pub version: u16,
    pub stage_ns: [u64; STAGE_COUNT],
}

/// The size the eBPF probe copies; checked at compile time so a field change cannot go unnoticed.
pub const REQUEST_RECORD_LEN: usize = 96;
const _: () = assert!(core::mem::size_of::<RequestRecord>() == REQUEST_RECORD_LEN);

impl Default for RequestRecord {
    fn default() -> Self {
        Self {
            request_id: 0,
            connection_id: 0,
            conversation_id: 0,
            fd: -1,
            shard: 0,
            route: route::UNKNOWN,
            status: 0,
            local_port: 0,
            peer_port: 0,
            version: RECORD_VERSION,
            stage_ns: [0; STAGE_COUNT],
        }
    }
}

impl RequestRecord {
    /// Set one stage's timestamp (ns from [`now_ns`]).
    #[inline]
    pub fn set(&mut self, stage: Stage, ns: u64) {
        self.stage_ns[stage as usize] = ns;
    }

    /// One stage's timestamp, `None` if the request skipped it.
    #[inline]
    pub fn get(&self, stage: Stage) -> Option<u64> {
        match self.stage_ns[stage as usize] {
            0 => None,
            ns => Some(ns),
        }
    }

    /// True if every stage that was set is no earlier than the stages set before it.
    pub fn stages_in_order(&self) -> bool {
        let mut last = 0;
        for &ns in &self.stage_ns {
            if ns == 0 {
                continue;
            }
            if ns < last {
                return false;
            }
            last = ns;
        }
        true
    }
}

/// Kinds of events on the probes' ring buffer; every event starts with [`EventHeader`].
pub mod event_kind {
    /// [`super::RequestEvent`]: a request marker fired.
    pub const REQUEST: u32 = 1;
    /// [`super::IoUringEvent`]: an io_uring operation of the traced process completed.
    pub const IO_URING: u32 = 2;
    /// [`super::TcpEvent`] from `sock:inet_sock_set_state`.
    pub const TCP_STATE: u32 = 3;
    /// [`super::TcpEvent`] from `tcp:tcp_retransmit_skb`.
    pub const TCP_RETRANSMIT: u32 = 4;
}

/// The first 24 bytes of every ring buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`event_kind`].
    pub kind: u32,
    /// Process id (tgid) the event belongs to (0 for TCP events in softirq context).
    pub tgid: u32,
    /// Thread id that was running.
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when the probe ran.
    pub ktime_ns: u64,
}

/// A request marker hit: the header plus the gateway's record as the probe read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    pub header: EventHeader,
    pub record: RequestRecord,
}

/// One io_uring operation of the traced process, from submit (raw tracepoint
/// `io_uring_submit_req`) to completion (raw tracepoint `io_uring_complete`). Multishot operations produce one event per
/// completion, all with the same `submit_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoUringEvent {
    /// `ktime_ns` is the completion time; `tid` the thread that submitted.
    pub header: EventHeader,
    pub submit_ns: u64,
    /// The ring (`struct io_ring_ctx *`), to tell the gateway's per-core rings apart.
    pub ring: u64,
    pub user_data: u64,
    /// The file descriptor of the operation, -1 if the probe could not read it.
    pub fd: i32,
    /// The completion result: bytes transferred, or a negative errno.
    pub res: i32,
    pub cflags: u32,
    /// `IORING_OP_*`.
    pub opcode: u8,
    pub _pad: [u8; 3],
}

/// A TCP state change or retransmit on one of the traced process's ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpEvent {
    pub header: EventHeader,
    /// The socket (`struct sock *`), stable for the connection's life.
    pub sock: u64,
    /// Local and remote port in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
    /// For state changes: old and new `TCP_*` state; for retransmits: state and 0.
    pub old_state: i32,
    pub new_state: i32,
    pub local_addr_v4: [u8; 4],
    pub remote_addr_v4: [u8; 4],
}

/// Indexes of the per-CPU `COUNTERS` array the probes keep; the tracer sums them over CPUs.
pub mod counter {
    /// Events that did not fit in the ring buffer (`bpf_ringbuf_reserve` failed).
    pub const RINGBUF_DROPS: u32 = 0;
    /// Marker hits whose record could not be read from user memory.
    pub const RECORD_READ_ERRORS: u32 = 1;
    /// io_uring submissions not tracked because the in-flight map was full.
    pub const INFLIGHT_FULL: u32 = 2;
    /// Marker hits seen (before sampling and drops).
    pub const MARKER_HITS: u32 = 3;
    /// io_uring completions emitted.
    pub const IO_URING_EVENTS: u32 = 4;
    /// TCP events emitted.
    pub const TCP_EVENTS: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Indexes of the `CONFIG` array the tracer fills before attaching.
pub mod config {
    /// tgid whose io_uring operations are recorded (0 = none).
    pub const TARGET_TGID: u32 = 0;
    /// Byte offset of the file descriptor inside `struct io_kiocb`, from the kernel's BTF
    /// (`u64::MAX` = unknown; events then carry fd -1).
    pub const IO_KIOCB_FD_OFFSET: u32 = 1;
    /// Byte offset of the opcode inside `struct io_kiocb`, from the kernel's BTF
    /// (`u64::MAX` = unknown; events then carry opcode 255).
    pub const IO_KIOCB_OPCODE_OFFSET: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Maximum number of local ports whose TCP events are recorded (`PORTS` map).
pub const PORTS_MAX: u32 = 64;
/// Maximum io_uring operations in flight tracked between submit and completion.
pub const INFLIGHT_MAX: u32 = 65_536;
/// Ring buffer size in bytes (a power of two, as the kernel requires): about half a second of
/// events at 50,000 fully traced requests per second, so a busy tracer can fall behind briefly.
pub const RINGBUF_BYTES: u32 = 16 << 20;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these are `#[repr(C)]`, `Copy`, made of integers only, with explicit padding,
    // so every bit pattern is valid.
    unsafe impl aya::Pod for super::RequestRecord {}
    unsafe impl aya::Pod for super::RequestEvent {}
    unsafe impl aya::Pod for super::IoUringEvent {}
    unsafe impl aya::Pod for super::TcpEvent {}
}

/// The USDT-style semaphore: non-zero while a tracer has the request probe attached.
///
/// It lives in `.probes`, a file-backed writable section, because the kernel's `ref_ctr_offset`
/// mechanism only updates counters in file-backed mappings (`.bss` would not do). The tracer
/// passes its file offset when it attaches and the kernel adds 1 per attached probe and
/// subtracts it again on detach. Never write it from the gateway.
#[cfg(not(target_arch = "bpf"))]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probes")]
#[used]
pub static KEFU_TRACE_SEMAPHORE: AtomicU16 = AtomicU16::new(0);

/// Sampling: trace one request in this many (0 and 1 = every request). The tracer writes it in
/// the traced process (through `/proc/PID/mem`) before it attaches; like the semaphore it lives
/// in `.probes` so the tracer finds it by symbol at a fixed file offset.
#[cfg(not(target_arch = "bpf"))]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probes")]
#[used]
pub static KEFU_TRACE_SAMPLE_EVERY: AtomicU32 = AtomicU32::new(0);

/// Requests seen while tracing, for [`KEFU_TRACE_SAMPLE_EVERY`]; only touched while traced.
#[cfg(all(not(target_arch = "bpf"), not(feature = "disabled")))]
static SAMPLE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The symbol names the tracer looks up in the gateway binary.
pub const MARKER_SYMBOL: &str = "kefu_request_marker";
pub const SEMAPHORE_SYMBOL: &str = "KEFU_TRACE_SEMAPHORE";
pub const SAMPLE_EVERY_SYMBOL: &str = "KEFU_TRACE_SAMPLE_EVERY";

/// Should this request be traced? Call it once when a request starts: false (one relaxed load)
/// while no tracer is attached; while one is, true for every request or, with sampling, for one
/// request in [`KEFU_TRACE_SAMPLE_EVERY`]. Only traced requests need timestamps and [`emit`].
#[cfg(all(not(target_arch = "bpf"), not(feature = "disabled")))]
#[inline(always)]
pub fn trace_enabled() -> bool {
    KEFU_TRACE_SEMAPHORE.load(Ordering::Relaxed) != 0 && sampled()
}

/// With the `disabled` feature the markers are compiled out: never trace.
#[cfg(all(not(target_arch = "bpf"), feature = "disabled"))]
#[inline(always)]
pub fn trace_enabled() -> bool {
    false
}

/// True while a tracer has the request probe attached (no sampling).
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn tracer_attached() -> bool {
    KEFU_TRACE_SEMAPHORE.load(Ordering::Relaxed) != 0
}

#[cfg(all(not(target_arch = "bpf"), not(feature = "disabled")))]
#[inline(never)]
fn sampled() -> bool {
    let every = KEFU_TRACE_SAMPLE_EVERY.load(Ordering::Relaxed);
    every <= 1
        || SAMPLE_COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(every)
}

/// Hand a finished request record to the tracer (a no-op costing one branch when untraced).
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn emit(record: &RequestRecord) {
    if tracer_attached() {
        // SAFETY: the marker only returns; the uprobe reads the record through the pointer while
        // `record` is borrowed for the whole call.
        unsafe { kefu_request_marker(record) }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns` (vDSO, about 20 ns).
#[cfg(not(target_arch = "bpf"))]
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// The request marker the uprobe attaches to: a 5-byte NOP then `ret`.
///
/// Why naked and NOP-led: a uprobe on an ordinary function single-steps its first instruction
/// (10-20 µs per hit in this VM); on a 5-byte NOP the kernel instead patches in a call to its
/// uprobe trampoline (about 1 µs). Untraced, the call costs about 1.5 ns, and [`emit`] skips it
/// entirely unless the semaphore is set.
///
/// # Safety
/// `record` must point to a valid [`RequestRecord`] for the duration of the call (the function
/// itself does not touch it).
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kefu_request_marker(record: *const RequestRecord) {
    core::arch::naked_asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "ret");
}

/// The request marker on architectures without the NOP-led variant: an ordinary function the
/// uprobe can still attach to (slower per hit: the kernel single-steps its first instruction).
///
/// # Safety
/// `record` must point to a valid [`RequestRecord`] for the duration of the call.
#[cfg(all(not(target_arch = "x86_64"), not(target_arch = "bpf")))]
#[inline(never)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kefu_request_marker(record: *const RequestRecord) {
    core::hint::black_box(record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_matches_the_table() {
        assert_eq!(core::mem::offset_of!(RequestRecord, fd), 24);
        assert_eq!(core::mem::offset_of!(RequestRecord, version), 38);
        assert_eq!(core::mem::offset_of!(RequestRecord, stage_ns), 40);
        assert_eq!(core::mem::size_of::<EventHeader>(), 24);
    }

    #[test]
    fn stage_order_check_skips_unset_stages() {
        let mut rec = RequestRecord::default();
        rec.set(Stage::Accepted, 10);
        rec.set(Stage::Parsed, 20);
        rec.set(Stage::Answered, 30);
        assert!(rec.stages_in_order());
        assert_eq!(rec.get(Stage::Synced), None);
        rec.set(Stage::Delivered, 40);
        assert!(!rec.stages_in_order());
    }

    #[test]
    fn untraced_emit_is_a_no_op_and_marker_is_callable() {
        assert!(!trace_enabled());
        let rec = RequestRecord::default();
        emit(&rec);
        // SAFETY: `rec` is valid for the call; the marker only returns.
        unsafe { kefu_request_marker(&rec) };
        assert!(now_ns() > 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn marker_starts_with_the_five_byte_nop() {
        let f: unsafe extern "C" fn(*const RequestRecord) = kefu_request_marker;
        // SAFETY: reading the first 6 bytes of a function's code, which is mapped readable.
        let code = unsafe { core::slice::from_raw_parts(f as *const u8, 6) };
        assert_eq!(code, &[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]);
    }
}
