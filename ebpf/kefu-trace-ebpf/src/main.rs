//! kefu's kernel-side probes: the request marker uprobe, io_uring submit/complete tracepoints of
//! the traced process, and TCP state/retransmit tracepoints on the gateway's ports. Everything
//! goes to one ring buffer, submitted without wakeup (the tracer polls), and every loss is counted
//! in the per-CPU `COUNTERS` array.
//!
//! Architecture invariant: the programs only copy facts; joining, filtering by request and
//! sampling are userspace's job, so each probe stays a handful of instructions.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_probe_read_user,
    },
    macros::{map, raw_tracepoint, tracepoint, uprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext, TracePointContext},
};
use kefu_trace_common::{
    EventHeader, INFLIGHT_MAX, IoUringEvent, PORTS_MAX, RINGBUF_BYTES, RequestEvent, RequestRecord,
    TcpEvent, config, counter, event_kind,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
static CONFIG: Array<u64> = Array::with_max_entries(config::COUNT, 0);

/// Local ports (host order) of the traced process's listeners: TCP events on other ports are
/// not ours.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(PORTS_MAX, 0);

/// io_uring requests between submit and completion, keyed by `struct io_kiocb *`. A plain
/// preallocated hash, not LRU: it is on every io_uring operation of the gateway, and an LRU
/// update costs noticeably more. An entry whose completion is never seen (e.g. a
/// `IOSQE_CQE_SKIP_SUCCESS` request) is overwritten when the kernel reuses that `io_kiocb` from
/// its request cache, and a full map is counted (`INFLIGHT_FULL`), never silent.
#[map]
static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(INFLIGHT_MAX, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Inflight {
    submit_ns: u64,
    tid: u32,
    fd: i32,
    opcode: u8,
    _pad: [u8; 7],
}

/// `IORING_CQE_F_MORE`: a multishot request stays in flight after this completion.
const IORING_CQE_F_MORE: u32 = 1 << 1;

// Tracepoint field offsets of the TCP tracepoints, from
// /sys/kernel/tracing/events/<group>/<name>/format; the tracer's test checks them against the
// running kernel's format files. The io_uring probes are raw tracepoints instead (see below).
mod tp {
    pub mod set_state {
        pub const SKADDR: usize = 8;
        pub const OLDSTATE: usize = 16;
        pub const NEWSTATE: usize = 20;
        pub const SPORT: usize = 24;
        pub const DPORT: usize = 26;
        pub const FAMILY: usize = 28;
        pub const PROTOCOL: usize = 30;
        pub const SADDR: usize = 32;
        pub const DADDR: usize = 36;
    }
    pub mod retransmit {
        pub const SKADDR: usize = 16;
        pub const STATE: usize = 24;
        pub const SPORT: usize = 28;
        pub const DPORT: usize = 30;
        pub const FAMILY: usize = 32;
        pub const SADDR: usize = 34;
        pub const DADDR: usize = 38;
    }
}

const IPPROTO_TCP: u16 = 6;

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn header(kind: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _pad: 0,
        // SAFETY: no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    }
}

#[inline(always)]
fn config_value(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// Fires on every `kefu_request_marker(record)` call of a traced process: copies the record.
#[uprobe]
pub fn kefu_request(ctx: ProbeContext) -> u32 {
    bump(counter::MARKER_HITS);
    let Some(record) = ctx.arg::<*const RequestRecord>(0) else {
        bump(counter::RECORD_READ_ERRORS);
        return 0;
    };
    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        bump(counter::RINGBUF_DROPS);
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved ring buffer slot of the right size; the user read is
    // checked by the helper, which fails instead of faulting.
    let rc = unsafe {
        (*event).header = header(event_kind::REQUEST);
        bpf_probe_read_user(
            (&raw mut (*event).record).cast::<c_void>(),
            core::mem::size_of::<RequestRecord>() as u32,
            record.cast::<c_void>(),
        )
    };
    if rc != 0 {
        entry.discard(0);
        bump(counter::RECORD_READ_ERRORS);
        return 0;
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    0
}

/// `struct io_uring_cqe` (UAPI, stable): what `io_uring_complete` hands its raw tracepoint.
#[repr(C)]
#[derive(Clone, Copy)]
struct Cqe {
    user_data: u64,
    res: i32,
    flags: u32,
}

/// Read a field of `struct io_kiocb` at an offset the tracer took from the kernel's BTF
/// (`u64::MAX` = unknown).
#[inline(always)]
fn kiocb_field<T: Copy>(req: u64, offset: u64) -> Option<T> {
    if offset == u64::MAX || offset > 4096 {
        return None;
    }
    // SAFETY: `req` is a live `struct io_kiocb *` while its tracepoint runs; the read is checked
    // by the helper and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((req + offset) as *const T) }.ok()
}

/// Raw tracepoint `io_uring_submit_req(struct io_kiocb *req)`: remember submissions of the traced
/// process. Raw tracepoints get the `TP_PROTO` arguments directly, which costs much less per
/// operation than a classic tracepoint (no trace record is formatted), and the gateway's every
/// io_uring operation passes here.
#[raw_tracepoint(tracepoint = "io_uring_submit_req")]
pub fn io_uring_submit_req(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let target = config_value(config::TARGET_TGID);
    if target == 0 || (pid_tgid >> 32) != target {
        return 0;
    }
    let req: u64 = ctx.arg(0);
    if req == 0 {
        return 0;
    }
    let inflight = Inflight {
        // SAFETY: no preconditions.
        submit_ns: unsafe { bpf_ktime_get_ns() },
        tid: pid_tgid as u32,
        fd: kiocb_field::<i32>(req, config_value(config::IO_KIOCB_FD_OFFSET)).unwrap_or(-1),
        opcode: kiocb_field::<u8>(req, config_value(config::IO_KIOCB_OPCODE_OFFSET))
            .unwrap_or(0xff),
        _pad: [0; 7],
    };
    if INFLIGHT.insert(req, inflight, 0).is_err() {
        bump(counter::INFLIGHT_FULL);
    }
    0
}

/// Raw tracepoint `io_uring_complete(struct io_ring_ctx *ctx, void *req, struct io_uring_cqe
/// *cqe)`: pair with the submission and emit one event per completion. Not filtered by pid:
/// completions may run in another context; the in-flight map already holds only the traced
/// process's requests.
#[raw_tracepoint(tracepoint = "io_uring_complete")]
pub fn io_uring_complete(ctx: RawTracePointContext) -> i32 {
    let req: u64 = ctx.arg(1);
    if req == 0 {
        return 0;
    }
    // SAFETY: the value is copied out before any other map operation.
    let Some(inflight) = (unsafe { INFLIGHT.get(req) }).copied() else {
        return 0;
    };
    let ring: u64 = ctx.arg(0);
    let cqe_ptr: u64 = ctx.arg(2);
    // SAFETY: the tracepoint's cqe argument points at a live CQE; checked read.
    let cqe = unsafe { bpf_probe_read_kernel(cqe_ptr as *const Cqe) }.unwrap_or(Cqe {
        user_data: 0,
        res: 0,
        flags: 0,
    });
    if cqe.flags & IORING_CQE_F_MORE == 0 {
        let _ = INFLIGHT.remove(req);
    }
    let Some(mut entry) = EVENTS.reserve::<IoUringEvent>(0) else {
        bump(counter::RINGBUF_DROPS);
        return 0;
    };
    let mut head = header(event_kind::IO_URING);
    head.tid = inflight.tid;
    entry.write(IoUringEvent {
        header: head,
        submit_ns: inflight.submit_ns,
        ring,
        user_data: cqe.user_data,
        fd: inflight.fd,
        res: cqe.res,
        cflags: cqe.flags,
        opcode: inflight.opcode,
        _pad: [0; 3],
    });
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    bump(counter::IO_URING_EVENTS);
    0
}

#[inline(always)]
fn ours(local_port: u16) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { PORTS.get(local_port) }.is_some()
}

#[inline(always)]
fn emit_tcp(event: TcpEvent) {
    let Some(mut entry) = EVENTS.reserve::<TcpEvent>(0) else {
        bump(counter::RINGBUF_DROPS);
        return;
    };
    entry.write(event);
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    bump(counter::TCP_EVENTS);
}

/// `sock:inet_sock_set_state`: TCP state changes of connections on the traced ports.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: documented tracepoint offsets, checked reads.
    unsafe {
        if ctx.read_at::<u16>(tp::set_state::PROTOCOL).unwrap_or(0) != IPPROTO_TCP {
            return 0;
        }
        let sport = ctx.read_at::<u16>(tp::set_state::SPORT).unwrap_or(0);
        if !ours(sport) {
            return 0;
        }
        emit_tcp(TcpEvent {
            header: header(event_kind::TCP_STATE),
            sock: ctx.read_at::<u64>(tp::set_state::SKADDR).unwrap_or(0),
            local_port: sport,
            remote_port: ctx.read_at::<u16>(tp::set_state::DPORT).unwrap_or(0),
            family: ctx.read_at::<u16>(tp::set_state::FAMILY).unwrap_or(0),
            _pad: 0,
            old_state: ctx.read_at::<i32>(tp::set_state::OLDSTATE).unwrap_or(0),
            new_state: ctx.read_at::<i32>(tp::set_state::NEWSTATE).unwrap_or(0),
            local_addr_v4: ctx
                .read_at::<[u8; 4]>(tp::set_state::SADDR)
                .unwrap_or([0; 4]),
            remote_addr_v4: ctx
                .read_at::<[u8; 4]>(tp::set_state::DADDR)
                .unwrap_or([0; 4]),
        });
    }
    0
}

/// `tcp:tcp_retransmit_skb`: retransmits on connections of the traced ports.
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    // SAFETY: documented tracepoint offsets, checked reads.
    unsafe {
        let sport = ctx.read_at::<u16>(tp::retransmit::SPORT).unwrap_or(0);
        if !ours(sport) {
            return 0;
        }
        let state = ctx.read_at::<i32>(tp::retransmit::STATE).unwrap_or(0);
        emit_tcp(TcpEvent {
            header: header(event_kind::TCP_RETRANSMIT),
            sock: ctx.read_at::<u64>(tp::retransmit::SKADDR).unwrap_or(0),
            local_port: sport,
            remote_port: ctx.read_at::<u16>(tp::retransmit::DPORT).unwrap_or(0),
            family: ctx.read_at::<u16>(tp::retransmit::FAMILY).unwrap_or(0),
            _pad: 0,
            old_state: state,
            new_state: state,
            local_addr_v4: ctx
                .read_at::<[u8; 4]>(tp::retransmit::SADDR)
                .unwrap_or([0; 4]),
            remote_addr_v4: ctx
                .read_at::<[u8; 4]>(tp::retransmit::DADDR)
                .unwrap_or([0; 4]),
        });
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects programs that could get here.
    loop {}
}

/// bpf_probe_read_user and bpf_ktime_get_ns need a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
