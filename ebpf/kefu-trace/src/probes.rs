//! Loads the embedded eBPF object, attaches its programs to one gateway (by pid or binary) and
//! reads their ring buffer and counters. Dropping the [`Tracer`] detaches everything, which
//! also switches the gateway's markers off again (the kernel decrements the semaphore).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use kefu_trace_common::{
    EventHeader, IoUringEvent, PORTS_MAX, RequestEvent, TcpEvent, config, counter, event_kind,
};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use crate::elf::{Hooks, find_hooks};
use crate::perf::{Scope, UprobeEvent};
use crate::procfs;

/// The probe object built by build.rs (empty when bpf-linker was missing at build time).
static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kefu-trace-ebpf"));

/// True if this build embeds the eBPF probes.
pub fn probes_built() -> bool {
    !PROBES.is_empty()
}

/// Why tracing cannot work here, if it cannot (not root, no probes, no BPF): tests print it and skip.
pub fn unavailable_reason() -> Option<String> {
    if !probes_built() {
        return Some(
            "the eBPF probes were not built (bpf-linker missing at build time; `cargo xtask test` installs it)"
                .to_string(),
        );
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loading eBPF programs needs root (CAP_BPF and CAP_PERFMON)".to_string());
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        return Some("this kernel has no uprobe PMU".to_string());
    }
    None
}

/// One event from the ring buffer.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    Request(RequestEvent),
    IoUring(IoUringEvent),
    Tcp(TcpEvent),
}

impl Event {
    /// Decode one ring buffer record; `None` for records of unknown kind or wrong size.
    pub fn decode(bytes: &[u8]) -> Option<Event> {
        fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
            if bytes.len() < std::mem::size_of::<T>() {
                return None;
            }
            // SAFETY: length checked; T is a plain-old-data repr(C) event type.
            Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
        }
        let header: EventHeader = read(bytes)?;
        match header.kind {
            event_kind::REQUEST => read(bytes).map(Event::Request),
            event_kind::IO_URING => read(bytes).map(Event::IoUring),
            event_kind::TCP_STATE | event_kind::TCP_RETRANSMIT => read(bytes).map(Event::Tcp),
            _ => None,
        }
    }
}

/// Sums of the probes' per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub ringbuf_drops: u64,
    pub record_read_errors: u64,
    pub inflight_full: u64,
    pub marker_hits: u64,
    pub io_uring_events: u64,
    pub tcp_events: u64,
}

/// What to attach to.
#[derive(Clone, Debug, Default)]
pub struct TraceTarget {
    /// The gateway process; with only `binary`, every process running it (now or later).
    pub pid: Option<u32>,
    /// The gateway binary; defaults to `/proc/PID/exe`.
    pub binary: Option<PathBuf>,
    /// Trace one request in this many (written into the gateway's sampling knob); 0/1 = all.
    pub sample_every: u32,
    /// Record only the request markers (and TCP events), not the gateway's io_uring operations:
    /// those tracepoints fire on every operation of the process, sampled or not, and are most of
    /// the tracing cost under load.
    pub markers_only: bool,
}

/// Attached probes. Drop to detach.
pub struct Tracer {
    // Field order is drop order: the uprobe goes first so the semaphore drops before the maps
    // and programs (owned by `ebpf_owner`) go.
    uprobe: Option<UprobeEvent>,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, u64>,
    ports: BpfHashMap<MapData, u16, u8>,
    ebpf_owner: Ebpf,
    binary: PathBuf,
    hooks: Hooks,
    target_tgid: Option<u32>,
    sample_every: u32,
    /// Processes whose sampling knob we set, to reset on detach.
    sampled_pids: Vec<u32>,
    ports_known: Vec<u16>,
}

impl Tracer {
    pub fn attach(target: &TraceTarget) -> anyhow::Result<Tracer> {
        if let Some(reason) = unavailable_reason() {
            bail!("cannot trace: {reason}");
        }
        let binary = match (&target.binary, target.pid) {
            (Some(b), _) => b.clone(),
            (None, Some(pid)) => procfs::exe_path(pid),
            (None, None) => bail!("give --pid or --binary"),
        };
        if let Some(pid) = target.pid
            && !procfs::alive(pid)
        {
            bail!("no process {pid}");
        }
        let hooks = find_hooks(&binary)?;
        if !hooks.marker_nop_led {
            eprintln!(
                "kefu-trace: warning: the marker does not start with a 5-byte NOP; each traced request will cost a single-step trap"
            );
        }
        procfs::ensure_tracefs()?;
        // MEMLOCK cannot be raised without CAP_SYS_RESOURCE here; the kernel charges BPF memory to
        // the cgroup anyway, so failing to raise it is not an error.
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid rlimit struct.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };

        let mut ebpf = EbpfLoader::new()
            .load(PROBES)
            .context("loading the eBPF object")?;
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("COUNTERS map")?)?;
        let mut config: Array<MapData, u64> =
            Array::try_from(ebpf.take_map("CONFIG").context("CONFIG map")?)?;
        let ports = BpfHashMap::try_from(ebpf.take_map("PORTS").context("PORTS map")?)?;

        // The io_uring probes read `struct io_kiocb` fields at offsets from the kernel's BTF.
        let (fd_offset, opcode_offset) = crate::btf::Btf::from_kernel()
            .and_then(|btf| {
                Ok((
                    crate::btf::io_kiocb_fd_offset(&btf)?,
                    btf.member_offset("io_kiocb", "opcode")?,
                ))
            })
            .unwrap_or_else(|e| {
                eprintln!("kefu-trace: warning: io_uring events will carry no fd or opcode: {e:#}");
                (u64::MAX, u64::MAX)
            });
        config.set(config::IO_KIOCB_FD_OFFSET, fd_offset, 0)?;
        config.set(config::IO_KIOCB_OPCODE_OFFSET, opcode_offset, 0)?;

        if !target.markers_only {
            for name in ["io_uring_submit_req", "io_uring_complete"] {
                let prog: &mut RawTracePoint = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name}"))?
                    .try_into()?;
                prog.load().with_context(|| format!("loading {name}"))?;
                prog.attach(name)
                    .with_context(|| format!("attaching raw tracepoint {name}"))?;
            }
        }
        for (name, category, event) in [
            ("inet_sock_set_state", "sock", "inet_sock_set_state"),
            ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
        ] {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(category, event)
                .with_context(|| format!("attaching {category}:{event}"))?;
        }

        let mut tracer = Tracer {
            uprobe: None,
            ring,
            counters,
            config,
            ports,
            ebpf_owner: ebpf,
            binary,
            hooks,
            target_tgid: None,
            sample_every: target.sample_every,
            sampled_pids: Vec::new(),
            ports_known: Vec::new(),
        };
        // Point the io_uring and TCP filters at the gateway and set its sampling before the
        // markers switch on, so the first traced request already has its kernel events.
        match target.pid {
            Some(pid) => tracer.set_target(pid)?,
            None => tracer.refresh()?,
        }
        let prog: &mut UProbe = tracer
            .ebpf_owner
            .program_mut("kefu_request")
            .context("program kefu_request")?
            .try_into()?;
        prog.load().context("loading the request uprobe")?;
        let prog_raw_fd = prog.fd()?.as_fd().as_raw_fd();
        // SAFETY: the program fd is owned by `tracer.ebpf_owner`, which outlives the uprobe event
        // (the event is dropped first, see the field order).
        let prog_fd = unsafe { BorrowedFd::borrow_raw(prog_raw_fd) };
        let scope = match target.pid {
            Some(pid) => Scope::Pid(pid),
            None => Scope::AllProcesses,
        };
        tracer.uprobe = Some(UprobeEvent::attach(
            &tracer.binary,
            tracer.hooks.marker_offset,
            tracer.hooks.semaphore_offset,
            scope,
            prog_fd,
        )?);
        Ok(tracer)
    }

    /// The process whose io_uring and TCP events are recorded.
    pub fn target_tgid(&self) -> Option<u32> {
        self.target_tgid
    }

    /// Record io_uring/TCP events of `pid` and set its sampling.
    fn set_target(&mut self, pid: u32) -> anyhow::Result<()> {
        self.config.set(config::TARGET_TGID, u64::from(pid), 0)?;
        self.target_tgid = Some(pid);
        if self.sample_every > 1 {
            let Some(offset) = self.hooks.sample_every_offset else {
                bail!(
                    "this gateway binary has no `{}`: it cannot sample",
                    kefu_trace_common::SAMPLE_EVERY_SYMBOL
                );
            };
            procfs::write_mem(pid, offset, &self.sample_every.to_le_bytes())
                .context("setting the gateway's sampling rate")?;
            self.sampled_pids.push(pid);
        }
        self.refresh_ports()
    }

    /// Pick up changes: a gateway that started (binary mode) or new listening ports. Call about
    /// once a second.
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.target_tgid
            && !procfs::alive(pid)
        {
            self.target_tgid = None;
            self.config.set(config::TARGET_TGID, 0, 0)?;
        }
        if self.target_tgid.is_none() {
            if let Some(pid) = procfs::pids_running(&self.binary).into_iter().next() {
                self.set_target(pid)?;
            }
            return Ok(());
        }
        self.refresh_ports()
    }

    fn refresh_ports(&mut self) -> anyhow::Result<()> {
        let Some(pid) = self.target_tgid else {
            return Ok(());
        };
        let ports = procfs::listen_ports(pid);
        for port in &ports {
            if self.ports_known.contains(port) || self.ports_known.len() >= PORTS_MAX as usize {
                continue;
            }
            self.ports.insert(port, 1, 0)?;
            self.ports_known.push(*port);
        }
        Ok(())
    }

    /// Drain the ring buffer into `out` (at most `max` events per call, so a flood cannot starve
    /// the caller's loop). Returns how many were read.
    pub fn poll(&mut self, out: &mut Vec<Event>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else {
                break;
            };
            if let Some(event) = Event::decode(&item) {
                out.push(event);
            }
            n += 1;
        }
        n
    }

    pub fn counters(&self) -> anyhow::Result<Counters> {
        let sum =
            |index: u32| -> anyhow::Result<u64> { Ok(self.counters.get(&index, 0)?.iter().sum()) };
        Ok(Counters {
            ringbuf_drops: sum(counter::RINGBUF_DROPS)?,
            record_read_errors: sum(counter::RECORD_READ_ERRORS)?,
            inflight_full: sum(counter::INFLIGHT_FULL)?,
            marker_hits: sum(counter::MARKER_HITS)?,
            io_uring_events: sum(counter::IO_URING_EVENTS)?,
            tcp_events: sum(counter::TCP_EVENTS)?,
        })
    }

    /// Detach the request uprobe (markers off) and reset sampling; the tracepoints go with the
    /// rest of the tracer when it is dropped.
    pub fn detach(&mut self) {
        self.uprobe = None;
        if let Some(offset) = self.hooks.sample_every_offset {
            for pid in self.sampled_pids.drain(..) {
                let _ = procfs::write_mem(pid, offset, &0u32.to_le_bytes());
            }
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.detach();
    }
}
