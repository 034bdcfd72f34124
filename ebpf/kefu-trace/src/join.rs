//! Joins request records with the kernel events of the same connection: io_uring operations on
//! the request's fd inside its time window, storage syncs of the same process between its
//! `appended` and `synced` stages, and TCP events on its (local port, peer port).
//!
//! Windows: an io_uring operation on the request's fd belongs to it if it was submitted between
//! `accepted` and `answered`, or is the first one submitted in the `io_after_ns` after
//! `answered` (the response write); reads if they completed between `accepted` and `answered`,
//! plus the last read completing in the `io_before_ns` before `accepted` (the one that carried
//! the request); TCP events if they happened between `accepted - tcp_before_ns` and
//! `answered + grace_ns`.
//!
//! A request's record arrives when it is answered, but the write completion (and a retransmit)
//! can come later, so each request waits `grace_ns` before it is finished. Every buffer here is
//! bounded; what falls out is counted, never silently lost.

use std::collections::{HashMap, VecDeque};

use kefu_trace_common::{IoUringEvent, RequestEvent, RequestRecord, STAGE_COUNT, Stage, TcpEvent};

use crate::probes::Event;

/// Limits and windows of the joiner.
#[derive(Clone, Copy, Debug)]
pub struct JoinConfig {
    /// How long a finished request waits for late kernel events.
    pub grace_ns: u64,
    /// How far before `accepted` an io_uring completion still belongs to the request (the read
    /// that carried its bytes completes just before the gateway stamps `accepted`).
    pub io_before_ns: u64,
    /// How long after `answered` the response write may still be submitted.
    pub io_after_ns: u64,
    /// How far before `accepted` TCP events still belong to the request (connection setup).
    pub tcp_before_ns: u64,
    /// Kernel events older than this are dropped.
    pub keep_ns: u64,
    /// Maximum buffered kernel events (io_uring + TCP).
    pub kernel_events_max: usize,
    /// Maximum requests waiting for their grace period.
    pub pending_max: usize,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self {
            grace_ns: 20_000_000,
            io_before_ns: 2_000_000,
            io_after_ns: 5_000_000,
            tcp_before_ns: 1_000_000_000,
            keep_ns: 5_000_000_000,
            kernel_events_max: 500_000,
            pending_max: 200_000,
        }
    }
}

/// One request with the kernel events joined to it.
#[derive(Clone, Debug)]
pub struct Trace {
    pub tgid: u32,
    pub tid: u32,
    /// When the marker fired (kernel clock, same as the stages').
    pub marker_ns: u64,
    pub record: RequestRecord,
    pub io: Vec<IoUringEvent>,
    pub tcp: Vec<TcpEvent>,
}

/// First and last set stage of a record, falling back to `fallback` when none is set.
pub fn span(record: &RequestRecord, fallback: u64) -> (u64, u64) {
    let set = record.stage_ns.iter().copied().filter(|&ns| ns != 0);
    let start = set.clone().min().unwrap_or(fallback);
    let end = set.max().unwrap_or(fallback);
    (start, end)
}

impl Trace {
    /// From the first to the last stage, in ns.
    pub fn total_ns(&self) -> u64 {
        let (start, end) = span(&self.record, self.marker_ns);
        end - start
    }

    /// For each stage the request passed: the time since the previous stage it passed (the
    /// first stage gets 0).
    pub fn stage_durations(&self) -> [Option<u64>; STAGE_COUNT] {
        let mut out = [None; STAGE_COUNT];
        let mut prev: Option<u64> = None;
        for stage in Stage::ALL {
            if let Some(ns) = self.record.get(stage) {
                out[stage as usize] = Some(prev.map_or(0, |p| ns.saturating_sub(p)));
                prev = Some(ns);
            }
        }
        out
    }
}

/// Counts of what the joiner had to throw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinDrops {
    /// Kernel events evicted because `kernel_events_max` was reached.
    pub kernel_events_evicted: u64,
    /// Requests finished early (without their grace period) because `pending_max` was reached.
    pub requests_rushed: u64,
}

pub struct Joiner {
    cfg: JoinConfig,
    io_by_fd: HashMap<(u32, i32), VecDeque<IoUringEvent>>,
    syncs: VecDeque<IoUringEvent>,
    tcp_by_ports: HashMap<(u16, u16), VecDeque<TcpEvent>>,
    kernel_events: usize,
    /// Newest kernel event time seen, the reference for eviction under pressure.
    newest_ns: u64,
    last_expire_ns: u64,
    pending: VecDeque<RequestEvent>,
    drops: JoinDrops,
}

/// How often buffered kernel events are checked for age.
const EXPIRE_INTERVAL_NS: u64 = 100_000_000;

/// `IORING_OP_*` numbers the joiner treats specially.
pub mod opcode {
    pub const FSYNC: u8 = 3;
    pub const SYNC_FILE_RANGE: u8 = 8;

    /// True for operations that complete when the peer sends: reads, and poll-adds (a runtime
    /// may wait for readability and then read with a plain syscall). They belong to the request
    /// whose bytes they carried, so they must complete before it is answered.
    pub fn is_read(op: u8) -> bool {
        matches!(op, 1 | 4 | 6 | 10 | 22 | 27 | 49 | 58 | 60)
    }

    pub fn name(op: u8) -> &'static str {
        const NAMES: [&str; 63] = [
            "nop",
            "readv",
            "writev",
            "fsync",
            "read_fixed",
            "write_fixed",
            "poll_add",
            "poll_remove",
            "sync_file_range",
            "sendmsg",
            "recvmsg",
            "timeout",
            "timeout_remove",
            "accept",
            "async_cancel",
            "link_timeout",
            "connect",
            "fallocate",
            "openat",
            "close",
            "files_update",
            "statx",
            "read",
            "write",
            "fadvise",
            "madvise",
            "send",
            "recv",
            "openat2",
            "epoll_ctl",
            "splice",
            "provide_buffers",
            "remove_buffers",
            "tee",
            "shutdown",
            "renameat",
            "unlinkat",
            "mkdirat",
            "symlinkat",
            "linkat",
            "msg_ring",
            "fsetxattr",
            "setxattr",
            "fgetxattr",
            "getxattr",
            "socket",
            "uring_cmd",
            "send_zc",
            "sendmsg_zc",
            "read_multishot",
            "waitid",
            "futex_wait",
            "futex_wake",
            "futex_waitv",
            "fixed_fd_install",
            "ftruncate",
            "bind",
            "listen",
            "recv_zc",
            "epoll_wait",
            "readv_fixed",
            "writev_fixed",
            "pipe",
        ];
        NAMES.get(op as usize).copied().unwrap_or("unknown")
    }
}

impl Joiner {
    pub fn new(cfg: JoinConfig) -> Self {
        Self {
            cfg,
            io_by_fd: HashMap::new(),
            syncs: VecDeque::new(),
            tcp_by_ports: HashMap::new(),
            kernel_events: 0,
            newest_ns: 0,
            last_expire_ns: 0,
            pending: VecDeque::new(),
            drops: JoinDrops::default(),
        }
    }

    pub fn drops(&self) -> JoinDrops {
        self.drops
    }

    /// Requests waiting for their grace period.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Kernel events buffered for joining.
    pub fn kernel_events(&self) -> usize {
        self.kernel_events
    }

    pub fn push(&mut self, event: Event) {
        match event {
            Event::Request(r) => {
                self.pending.push_back(r);
                return;
            }
            Event::IoUring(io) => {
                self.newest_ns = self.newest_ns.max(io.header.ktime_ns);
                if matches!(io.opcode, opcode::FSYNC | opcode::SYNC_FILE_RANGE) {
                    self.syncs.push_back(io);
                } else {
                    let key = (io.header.tgid, io.fd);
                    self.io_by_fd.entry(key).or_default().push_back(io);
                }
            }
            Event::Tcp(t) => {
                self.newest_ns = self.newest_ns.max(t.header.ktime_ns);
                let key = (t.local_port, t.remote_port);
                self.tcp_by_ports.entry(key).or_default().push_back(t);
            }
        }
        self.kernel_events += 1;
        if self.kernel_events > self.cfg.kernel_events_max {
            // Under pressure, forget the older half of the kept window; what goes before its
            // time is counted.
            let mut keep_ns = self.cfg.keep_ns / 2;
            while self.kernel_events > self.cfg.kernel_events_max * 3 / 4 && keep_ns > 0 {
                let evicted = self.expire_before(self.newest_ns.saturating_sub(keep_ns));
                self.drops.kernel_events_evicted += evicted as u64;
                keep_ns /= 2;
            }
            if self.kernel_events > self.cfg.kernel_events_max {
                let evicted = self.expire_before(u64::MAX);
                self.drops.kernel_events_evicted += evicted as u64;
            }
        }
    }

    /// Drop kernel events older than `horizon_ns` (events queue in about time order, so each
    /// queue is trimmed from the front). Returns how many went.
    fn expire_before(&mut self, horizon_ns: u64) -> usize {
        fn trim<T>(q: &mut VecDeque<T>, horizon_ns: u64, at: impl Fn(&T) -> u64) -> usize {
            let before = q.len();
            while q.front().is_some_and(|e| at(e) < horizon_ns) {
                q.pop_front();
            }
            before - q.len()
        }
        let mut gone = 0;
        self.io_by_fd.retain(|_, q| {
            gone += trim(q, horizon_ns, |e| e.header.ktime_ns);
            !q.is_empty()
        });
        gone += trim(&mut self.syncs, horizon_ns, |e| e.header.ktime_ns);
        self.tcp_by_ports.retain(|_, q| {
            gone += trim(q, horizon_ns, |e| e.header.ktime_ns);
            !q.is_empty()
        });
        self.kernel_events -= gone;
        gone
    }

    /// Finish the requests whose grace period is over at `now_ns` (kernel clock), appending
    /// them to `out` in arrival order; then forget kernel events older than `keep_ns`.
    pub fn ready(&mut self, now_ns: u64, out: &mut Vec<Trace>) {
        while let Some(front) = self.pending.front() {
            let (_, end) = span(&front.record, front.header.ktime_ns);
            let due = end.max(front.header.ktime_ns) + self.cfg.grace_ns <= now_ns;
            let rushed = self.pending.len() > self.cfg.pending_max;
            if !due && !rushed {
                break;
            }
            if rushed && !due {
                self.drops.requests_rushed += 1;
            }
            let Some(req) = self.pending.pop_front() else {
                break;
            };
            out.push(self.assemble(&req));
            self.prune_connection(&req);
        }
        if now_ns.saturating_sub(self.last_expire_ns) >= EXPIRE_INTERVAL_NS {
            self.last_expire_ns = now_ns;
            self.expire_before(now_ns.saturating_sub(self.cfg.keep_ns));
        }
    }

    /// Finish every waiting request now (on shutdown).
    pub fn flush(&mut self, out: &mut Vec<Trace>) {
        while let Some(req) = self.pending.pop_front() {
            out.push(self.assemble(&req));
            self.prune_connection(&req);
        }
    }

    /// A connection's requests are finished in order, so its io_uring events from before this
    /// request's window can belong to no later request: drop them, which keeps each join
    /// proportional to one request's operations instead of the connection's whole history.
    fn prune_connection(&mut self, req: &RequestEvent) {
        let rec = &req.record;
        if rec.fd < 0 {
            return;
        }
        let key = (req.header.tgid, rec.fd);
        let (start, _) = span(rec, req.header.ktime_ns);
        let horizon = start.saturating_sub(self.cfg.io_before_ns);
        if let Some(q) = self.io_by_fd.get_mut(&key) {
            let before = q.len();
            while q.front().is_some_and(|e| e.header.ktime_ns < horizon) {
                q.pop_front();
            }
            self.kernel_events -= before - q.len();
            if q.is_empty() {
                self.io_by_fd.remove(&key);
            }
        }
    }

    fn assemble(&self, req: &RequestEvent) -> Trace {
        let rec = &req.record;
        let (start, end) = span(rec, req.header.ktime_ns);
        let window_start = start.saturating_sub(self.cfg.io_before_ns);
        let window_end = end + self.cfg.grace_ns;
        let tgid = req.header.tgid;
        let mut io: Vec<IoUringEvent> = Vec::new();
        if rec.fd >= 0
            && let Some(q) = self.io_by_fd.get(&(tgid, rec.fd))
        {
            // Operations a request started are submitted between `accepted` and `answered`,
            // and its response may be written right after `answered` (the gateway stamps it
            // when the response is complete in its write buffer): the first operation submitted
            // in the `io_after_ns` after `answered` is that write. Reads are the exception: the
            // one that carried the request completed just before `accepted` (only the latest
            // such read is ours; earlier ones carried earlier requests), and reads of the rest
            // of its body complete before `answered`. That write must come before the read that
            // brought the next request.
            let mut carrying_read: Option<&IoUringEvent> = None;
            let mut response_write: Option<&IoUringEvent> = None;
            for e in q {
                let complete = e.header.ktime_ns;
                if opcode::is_read(e.opcode) {
                    if complete >= window_start && complete < start {
                        if carrying_read.is_none_or(|c| c.header.ktime_ns <= complete) {
                            carrying_read = Some(e);
                        }
                    } else if complete >= start && complete <= end {
                        io.push(*e);
                    }
                } else if e.submit_ns >= start && e.submit_ns <= end {
                    io.push(*e);
                } else if e.submit_ns > end
                    && e.submit_ns <= end + self.cfg.io_after_ns
                    && response_write.is_none_or(|w| w.submit_ns > e.submit_ns)
                {
                    response_write = Some(e);
                }
            }
            io.extend(carrying_read.copied());
            // A write after a read that brought the next request belongs to that request.
            let next_read = q
                .iter()
                .filter(|e| opcode::is_read(e.opcode) && e.header.ktime_ns > end)
                .map(|e| e.header.ktime_ns)
                .min();
            io.extend(
                response_write
                    .filter(|w| next_read.is_none_or(|r| w.submit_ns < r))
                    .copied(),
            );
        }
        if let (Some(appended), Some(synced)) = (rec.get(Stage::Appended), rec.get(Stage::Synced)) {
            for e in &self.syncs {
                if e.header.tgid == tgid && e.header.ktime_ns >= appended && e.submit_ns <= synced {
                    io.push(*e);
                }
            }
        }
        io.sort_by_key(|e| (e.submit_ns, e.header.ktime_ns));
        let mut tcp = Vec::new();
        if rec.local_port != 0
            && rec.peer_port != 0
            && let Some(q) = self.tcp_by_ports.get(&(rec.local_port, rec.peer_port))
        {
            let tcp_start = start.saturating_sub(self.cfg.tcp_before_ns);
            tcp.extend(
                q.iter()
                    .filter(|e| e.header.ktime_ns >= tcp_start && e.header.ktime_ns <= window_end)
                    .copied(),
            );
        }
        Trace {
            tgid,
            tid: req.header.tid,
            marker_ns: req.header.ktime_ns,
            record: *rec,
            io,
            tcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kefu_trace_common::{EventHeader, event_kind};

    fn header(kind: u32, ns: u64) -> EventHeader {
        EventHeader {
            kind,
            tgid: 7,
            tid: 8,
            _pad: 0,
            ktime_ns: ns,
        }
    }

    fn request(fd: i32, stages: [u64; STAGE_COUNT]) -> Event {
        let mut record = RequestRecord {
            fd,
            local_port: 80,
            peer_port: 5000,
            ..Default::default()
        };
        record.stage_ns = stages;
        Event::Request(RequestEvent {
            header: header(event_kind::REQUEST, stages[6]),
            record,
        })
    }

    fn io(fd: i32, op: u8, submit: u64, complete: u64) -> Event {
        Event::IoUring(IoUringEvent {
            header: header(event_kind::IO_URING, complete),
            submit_ns: submit,
            fd,
            opcode: op,
            ..Default::default()
        })
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn joins_by_fd_window_and_sync_stages() {
        let mut j = Joiner::new(JoinConfig::default());
        let base = 10_000 * MS;
        // The previous request's read and response on the same connection.
        j.push(io(5, 27, base - 600 * MS, base - MS));
        j.push(io(5, 26, base - MS, base - MS / 2));
        // Read carrying the request, completing just before `accepted`.
        j.push(io(5, 27, base - 500 * MS, base - MS / 2));
        // Response write, completing after the marker fired.
        // The gateway stamps `answered` when the response is buffered and writes right after.
        j.push(io(5, 26, base + 4 * MS + MS / 2, base + 5 * MS));
        // The next request's read, after the answer: not ours.
        j.push(io(5, 27, base + 4 * MS, base + 6 * MS));
        // The next request's response on the same fd, submitted after this one was answered.
        j.push(io(5, 26, base + 7 * MS, base + 9 * MS));
        // Another connection.
        j.push(io(6, 26, base + MS, base + 2 * MS));
        // Storage sync between appended and synced.
        j.push(io(3, opcode::FSYNC, base + 2 * MS, base + 3 * MS));
        // Retransmit on our connection.
        j.push(Event::Tcp(TcpEvent {
            header: header(event_kind::TCP_RETRANSMIT, base + 4 * MS),
            local_port: 80,
            remote_port: 5000,
            ..Default::default()
        }));
        let stages = [
            base,
            base + MS,
            base + MS,
            base + 2 * MS,
            base + 3 * MS,
            0,
            base + 4 * MS,
        ];
        j.push(request(5, stages));
        let mut out = Vec::new();
        j.ready(base + 5 * MS, &mut out);
        assert!(out.is_empty(), "still in its grace period");
        j.ready(base + 30 * MS, &mut out);
        assert_eq!(out.len(), 1);
        let t = &out[0];
        let ops: Vec<(i32, u8)> = t.io.iter().map(|e| (e.fd, e.opcode)).collect();
        assert_eq!(ops, vec![(5, 27), (3, opcode::FSYNC), (5, 26)]);
        assert_eq!(t.tcp.len(), 1);
        assert_eq!(t.total_ns(), 4 * MS);
        let d = t.stage_durations();
        assert_eq!(d[0], Some(0));
        assert_eq!(d[5], None);
        assert_eq!(d[6], Some(MS));
    }

    #[test]
    fn buffers_are_bounded_and_evictions_counted() {
        let cfg = JoinConfig {
            kernel_events_max: 10,
            pending_max: 2,
            ..Default::default()
        };
        let mut j = Joiner::new(cfg);
        for i in 0..25 {
            j.push(io(5, 26, i, i + 1));
        }
        assert!(j.kernel_events() <= 10);
        assert_eq!(
            j.drops().kernel_events_evicted as usize,
            25 - j.kernel_events()
        );
        for i in 0..5 {
            j.push(request(5, [i + 1; STAGE_COUNT]));
        }
        let mut out = Vec::new();
        j.ready(0, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(j.drops().requests_rushed, 3);
        j.flush(&mut out);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn finished_requests_prune_their_connection_history() {
        let mut j = Joiner::new(JoinConfig::default());
        let base = 10_000 * MS;
        for i in 0..100 {
            j.push(io(5, 26, base + i * MS, base + i * MS + 1));
        }
        let at = base + 90 * MS;
        j.push(request(5, [at; STAGE_COUNT]));
        let mut out = Vec::new();
        j.ready(at + 100 * MS, &mut out);
        assert_eq!(out.len(), 1);
        // Events completing before `accepted - io_before_ns` are gone; later ones stay.
        assert_eq!(j.kernel_events(), 12);
        assert_eq!(j.drops().kernel_events_evicted, 0);
    }

    #[test]
    fn old_kernel_events_expire() {
        let mut j = Joiner::new(JoinConfig::default());
        j.push(io(5, 26, 1, 2));
        j.ready(10_000 * MS, &mut Vec::new());
        assert_eq!(j.kernel_events, 0);
        assert!(j.io_by_fd.is_empty());
    }
}
