//! The HTTP generator: one monoio (io_uring) runtime per thread, keep-alive connections, requests
//! pre-built at startup and re-sent by reference count (no allocation per request).
//!
//! Two loops:
//! - closed: each connection sends its next request as soon as the previous answer arrived;
//!   latency is measured from the actual send. This is what wrk does; it cannot see a stall
//!   longer than one request, because a stalled connection simply sends less.
//! - open: a fixed total rate R spread over the connections (wrk2). Request k of connection i
//!   is *intended* at `start + i/R + k*C/R`; latency runs from that intended time, so a request
//!   that had to wait behind a stalled one carries the wait (no coordinated omission). A
//!   connection sleeps until [`conn::TIMER_LATE_MAX`] before its intended time, because the
//!   runtime's timer can fire that much late; a request sent early is measured from its real
//!   send, never from the later intended time. How late each request left against its
//!   intended time is the `send delay` series of the report: near zero unless the server
//!   held the connection (backlog) or the generator itself fell behind.
//!
//! Every run stops at `duration` or `requests_max`, whichever comes first. In open loop, slots
//! whose intended time fell before the end are still sent (the backlog is part of the
//! measurement) until `duration + timeout`; what is left then counts as `timeout` errors.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use crate::conn::{self, CONNECT_BACKOFF, Conn};
use crate::http1::{BodyKind, BodyReader, ParseError, parse_head};
use crate::stats::{self, ErrorCounts, ErrorKind};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed,
    Open { rate_per_s: f64 },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub addr: SocketAddr,
    /// Requests sent round-robin: connection i starts at request i mod len.
    pub requests: Arc<Vec<Vec<u8>>>,
    pub connections: usize,
    pub threads: usize,
    pub mode: Mode,
    pub duration: Duration,
    pub requests_max: u64,
    /// Per request, from its send to the end of its response.
    pub timeout: Duration,
    /// The status that counts as success; `None`: any 2xx.
    pub expect_status: Option<u16>,
    pub read_buf_bytes: usize,
    pub head_bytes_max: usize,
    pub ring_entries: u32,
    /// Print a progress line on stderr each second.
    pub progress: bool,
}

impl EngineConfig {
    pub fn new(addr: SocketAddr, requests: Vec<Vec<u8>>) -> EngineConfig {
        EngineConfig {
            addr,
            requests: Arc::new(requests),
            connections: 64,
            threads: 1,
            mode: Mode::Closed,
            duration: Duration::from_secs(10),
            requests_max: 100_000_000,
            timeout: Duration::from_secs(2),
            expect_status: None,
            read_buf_bytes: 64 * 1024,
            head_bytes_max: 16 * 1024,
            ring_entries: 1024,
            progress: false,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        crate::target::check_loopback(self.addr)?;
        if self.requests.is_empty() {
            bail!("no requests to send");
        }
        if self.connections == 0 || self.threads == 0 {
            bail!("connections and threads must be at least 1");
        }
        if self.threads > self.connections {
            bail!(
                "threads ({}) > connections ({})",
                self.threads,
                self.connections
            );
        }
        if let Mode::Open { rate_per_s } = self.mode
            && !(rate_per_s.is_finite() && rate_per_s > 0.0)
        {
            bail!("open-loop rate must be a positive number, got {rate_per_s}");
        }
        // Heads and chunk lines must fit the read buffer with room to spare.
        if self.read_buf_bytes < self.head_bytes_max + 4096 {
            bail!("read_buf_bytes must exceed head_bytes_max by at least 4096");
        }
        Ok(())
    }
}

/// What the engine measured.
#[derive(Debug, Clone)]
pub struct EngineResult {
    pub hist: Histogram<u64>,
    /// Open loop: how late each request was sent against its intended time (0 when early).
    pub send_delay: Histogram<u64>,
    pub errors: ErrorCounts,
    pub ok: u64,
    pub elapsed: Duration,
}

/// Counters a thread publishes for the progress line (written by one thread only).
#[derive(Default)]
#[repr(align(128))]
struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Largest latency (us) since the progress line last took it: shows when a stall happened.
    max_us: AtomicU64,
}

/// Run the engine to completion on `cfg.threads` threads.
pub fn run(cfg: &EngineConfig) -> anyhow::Result<EngineResult> {
    cfg.check()?;
    let start = Instant::now() + Duration::from_millis(20);
    let progress: Vec<Arc<Progress>> = (0..cfg.threads).map(|_| Arc::default()).collect();
    let mut handles = Vec::with_capacity(cfg.threads);
    for (t, prog) in progress.iter().enumerate() {
        let cfg = cfg.clone();
        let prog = prog.clone();
        let h = std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || thread_main(t, &cfg, start, prog))
            .context("spawning a generator thread")?;
        handles.push(h);
    }
    let mut last_print = start;
    let mut last_ok = 0u64;
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if cfg.progress && now >= last_print + Duration::from_secs(1) {
            let ok: u64 = progress.iter().map(|p| p.ok.load(Ordering::Relaxed)).sum();
            let errors: u64 = progress
                .iter()
                .map(|p| p.errors.load(Ordering::Relaxed))
                .sum();
            let max_us = progress
                .iter()
                .map(|p| p.max_us.swap(0, Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            let secs = now.duration_since(last_print).as_secs_f64();
            eprintln!(
                "[{:5.1}s] {:>9.0} ok/s  ok {:>10}  errors {:>6}  max {:>8.2} ms",
                now.saturating_duration_since(start).as_secs_f64(),
                (ok - last_ok) as f64 / secs,
                ok,
                errors,
                max_us as f64 / 1000.0
            );
            last_print = now;
            last_ok = ok;
        }
    }
    let mut hist = stats::new_histogram();
    let mut send_delay = stats::new_histogram();
    let mut errors = ErrorCounts::default();
    let mut ok = 0;
    let mut end = start;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        hist.add(&r.hist).context("merging histograms")?;
        send_delay
            .add(&r.send_delay)
            .context("merging histograms")?;
        errors.merge(&r.errors);
        ok += r.ok;
        end = end.max(start + r.elapsed);
    }
    Ok(EngineResult {
        hist,
        send_delay,
        errors,
        ok,
        elapsed: end.saturating_duration_since(start),
    })
}

/// Per-thread state shared by the thread's connection tasks (single-threaded: Cell/RefCell).
struct Local {
    hist: RefCell<Histogram<u64>>,
    send_delay: RefCell<Histogram<u64>>,
    errors: RefCell<ErrorCounts>,
    ok: Cell<u64>,
    budget: Cell<u64>,
    last_done: Cell<Instant>,
    progress: Arc<Progress>,
}

impl Local {
    fn take_budget(&self) -> bool {
        let b = self.budget.get();
        if b == 0 {
            return false;
        }
        self.budget.set(b - 1);
        true
    }
    fn error(&self, kind: ErrorKind) {
        self.errors.borrow_mut().add(kind);
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
    }
    fn success(&self, latency: Duration) {
        stats::record(&mut self.hist.borrow_mut(), latency);
        self.ok.set(self.ok.get() + 1);
        self.progress.ok.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // The load skips the locked instruction on the common path (latency below the max).
        if us > self.progress.max_us.load(Ordering::Relaxed) {
            self.progress.max_us.fetch_max(us, Ordering::Relaxed);
        }
    }
}

/// Connections of thread `t` are those with index `i % threads == t`.
fn connections_of(t: usize, cfg: &EngineConfig) -> Vec<usize> {
    (0..cfg.connections)
        .filter(|i| i % cfg.threads == t)
        .collect()
}

fn thread_main(
    t: usize,
    cfg: &EngineConfig,
    start: Instant,
    progress: Arc<Progress>,
) -> anyhow::Result<EngineResult> {
    let mine = connections_of(t, cfg);
    // Budget in proportion to this thread's share of connections; thread 0 takes the remainder.
    let share = cfg.requests_max / cfg.connections as u64 * mine.len() as u64;
    let rest = if t == 0 {
        cfg.requests_max - cfg.requests_max / cfg.connections as u64 * cfg.connections as u64
    } else {
        0
    };
    let local = Rc::new(Local {
        hist: RefCell::new(stats::new_histogram()),
        send_delay: RefCell::new(stats::new_histogram()),
        errors: RefCell::new(ErrorCounts::default()),
        ok: Cell::new(0),
        budget: Cell::new(share + rest),
        last_done: Cell::new(start),
        progress,
    });
    // Each thread holds its own reference-counted copies: a send clones an Rc, nothing else.
    let requests: Rc<Vec<Rc<Vec<u8>>>> =
        Rc::new(cfg.requests.iter().map(|r| Rc::new(r.clone())).collect());
    let mut rt = conn::runtime(cfg.ring_entries).context("building the io_uring runtime")?;
    let cfg = Rc::new(cfg.clone());
    rt.block_on(async {
        conn::sleep_until(start).await;
        let mut tasks = Vec::with_capacity(mine.len());
        for i in mine {
            let task = connection_task(i, cfg.clone(), local.clone(), requests.clone(), start);
            tasks.push(monoio::spawn(task));
        }
        for task in tasks {
            task.await;
        }
    });
    Ok(EngineResult {
        hist: local.hist.borrow().clone(),
        send_delay: local.send_delay.borrow().clone(),
        errors: *local.errors.borrow(),
        ok: local.ok.get(),
        elapsed: local.last_done.get().saturating_duration_since(start),
    })
}

async fn connection_task(
    i: usize,
    cfg: Rc<EngineConfig>,
    local: Rc<Local>,
    requests: Rc<Vec<Rc<Vec<u8>>>>,
    start: Instant,
) {
    let deadline = start + cfg.duration;
    // Open loop: slots keep being served until the backlog is gone or this hard stop.
    let hard_stop = deadline + cfg.timeout;
    let (interval, offset) = match cfg.mode {
        Mode::Closed => (Duration::ZERO, Duration::ZERO),
        Mode::Open { rate_per_s } => (
            Duration::from_secs_f64(cfg.connections as f64 / rate_per_s),
            Duration::from_secs_f64(i as f64 / rate_per_s),
        ),
    };
    let open = matches!(cfg.mode, Mode::Open { .. });
    let mut slot: u32 = 0;
    let mut req_idx = i % requests.len();
    let mut conn: Option<Conn> = None;
    loop {
        let intended = open.then(|| start + offset + interval * slot);
        let now = Instant::now();
        match intended {
            Some(t) if t >= deadline => break,
            Some(_) if now >= hard_stop => {
                // Backlog the server never let us send: each slot is a timeout.
                count_backlog(&local, start + offset, interval, slot, deadline);
                break;
            }
            None if now >= deadline => break,
            _ => {}
        }
        if !local.take_budget() {
            break;
        }
        slot += 1;
        if let Some(t) = intended {
            // Wake up early rather than late (see `conn::TIMER_LATE_MAX`).
            if t > now + conn::TIMER_LATE_MAX {
                conn::sleep_until(t - conn::TIMER_LATE_MAX).await;
            }
        }
        if conn.is_none() {
            let connect_by = (Instant::now() + cfg.timeout).min(hard_stop);
            match Conn::connect(cfg.addr, None, cfg.read_buf_bytes, connect_by).await {
                Ok(c) => conn = Some(c),
                Err(kind) => {
                    local.error(kind);
                    conn::sleep_until((Instant::now() + CONNECT_BACKOFF).min(hard_stop)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let sent_at = Instant::now();
        let measure_from = intended.map_or(sent_at, |t| t.min(sent_at));
        if let Some(t) = intended {
            stats::record(
                &mut local.send_delay.borrow_mut(),
                sent_at.saturating_duration_since(t),
            );
        }
        let req = requests[req_idx].clone();
        req_idx = (req_idx + cfg.connections) % requests.len();
        let response_by = if open {
            (sent_at + cfg.timeout).min(hard_stop)
        } else {
            sent_at + cfg.timeout
        };
        match exchange(c, req, response_by, cfg.head_bytes_max).await {
            Ok((status, close)) => {
                let expected = match cfg.expect_status {
                    Some(s) => status == s,
                    None => (200..300).contains(&status),
                };
                if expected {
                    local.success(Instant::now().duration_since(measure_from));
                } else {
                    local.error(ErrorKind::from_status(status));
                }
                if close {
                    conn = None;
                }
            }
            Err(kind) => {
                local.error(kind);
                conn = None;
            }
        }
    }
    let now = Instant::now();
    if now > local.last_done.get() {
        local.last_done.set(now);
    }
}

/// Slots from `slot` whose intended time is before `deadline`, counted as timeouts.
fn count_backlog(local: &Local, first: Instant, interval: Duration, slot: u32, deadline: Instant) {
    let mut s = slot;
    while first + interval * s < deadline && local.take_budget() {
        local.error(ErrorKind::Timeout);
        s += 1;
    }
}

/// Send one request and read its whole response; returns the status and whether the
/// connection must be closed afterwards.
pub async fn exchange(
    c: &mut Conn,
    req: Rc<Vec<u8>>,
    deadline: Instant,
    head_bytes_max: usize,
) -> Result<(u16, bool), ErrorKind> {
    c.write_all(req, deadline).await?;
    let head = loop {
        match parse_head(c.data(), head_bytes_max) {
            Ok(h) => break h,
            Err(ParseError::Incomplete) => c.fill(deadline).await?,
            Err(ParseError::Invalid(_)) => return Err(ErrorKind::Parse),
        }
    };
    c.consume(head.head_len);
    let mut body = BodyReader::new(head.body);
    loop {
        let n = body.feed(c.data(), |_| {}).map_err(|_| ErrorKind::Parse)?;
        c.consume(n);
        if body.is_done() {
            break;
        }
        match c.fill(deadline).await {
            Ok(()) => {}
            Err(ErrorKind::Closed) if head.body == BodyKind::UntilClose => break,
            Err(e) => return Err(e),
        }
    }
    Ok((head.status, head.close))
}
