//! `connections`: hold N idle WebSocket connections on kefu with keep-alive pings, spread over
//! child processes (20,000 open files per process here) and source addresses 127.0.0.x (about
//! 28,000 ephemeral ports per source address). Reports the connect rate, connect+handshake and
//! ping round-trip percentiles, and the gateway's memory per connection: the VmRSS growth of
//! the gateway process (from /proc) between before the first connect and when all are open.
//!
//! The parent re-runs its own binary as `connections-child` processes; each child prints
//! `established N` once its connections are open, then one JSON line with its measurements.

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::wsutil::{self, now_ns};
use super::{Outcome, TargetCheck};
use crate::cli::Args;
use crate::conn;
use crate::kefu;
use crate::stats::{self, ErrorCounts, ErrorKind, Report, Series};
use crate::ws::{Incoming, OP_PING};

/// Connections one child holds at most: under the 20,000 open files per process, with room
/// for the runtime's own descriptors.
pub const CONNECTIONS_PER_PROCESS_MAX: usize = 19_000;

/// What a child reports.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ChildResult {
    connected: u64,
    errors: Vec<u64>,
    connect_elapsed_s: f64,
    pings: u64,
    /// (value_us, count) pairs of the connect+handshake histogram.
    connect_us: Vec<(u64, u64)>,
    ping_us: Vec<(u64, u64)>,
}

fn hist_pairs(h: &stats::Histogram) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn add_pairs(h: &mut stats::Histogram, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        h.saturating_record_n(v.clamp(1, stats::LATENCY_US_MAX), n);
    }
}

pub fn run(args: &Args) -> anyhow::Result<i32> {
    let addr: SocketAddr = args
        .opt("http")?
        .context("--http ADDR of kefu is required")?;
    crate::target::check_loopback(addr)?;
    let count: usize = args.get("count", 10_000usize)?;
    let processes: usize = args.get("processes", 2usize)?;
    let sources: u8 = args.get("sources", 4u8)?;
    let hold_s: f64 = args.get("hold-s", 10.0f64)?;
    let ping_interval_ms: u64 = args.get("ping-interval-ms", 1000u64)?;
    let concurrency: usize = args.get("connect-concurrency", 256usize)?;
    let gateway_pid: Option<u32> = args.opt("gateway-pid")?;
    let token: Option<String> = args.opt("token")?;
    let max_ping_p99_ms: Option<f64> = args.opt("max-p99-ms")?;
    let json: Option<PathBuf> = args.opt("json")?;
    let progress = !args.flag("quiet");
    args.finish()?;
    if count == 0 || count > 200_000 {
        bail!("--count must be in 1..=200000");
    }
    if sources == 0 || sources > 254 {
        bail!("--sources must be in 1..=254 (127.0.0.1 ..= 127.0.0.N)");
    }
    if !(0.0..=600.0).contains(&hold_s) || ping_interval_ms == 0 {
        bail!("--hold-s must be in 0..=600 and --ping-interval-ms at least 1");
    }
    let processes = processes
        .max(count.div_ceil(CONNECTIONS_PER_PROCESS_MAX))
        .min(count);

    let token = match token {
        Some(t) => t,
        None => kefu::create_conversation(addr, "connections", None)?.visitor_token,
    };
    let rss_before = gateway_pid.map(kefu::vm_rss_kib).transpose()?;
    let exe = std::env::current_exe().context("locating our own binary")?;
    let began = Instant::now();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for p in 0..processes {
        let n = count / processes + usize::from(p < count % processes);
        let mut child = Command::new(&exe)
            .args(["connections-child", "--http", &addr.to_string()])
            .args(["--count", &n.to_string(), "--sources", &sources.to_string()])
            .args(["--hold-s", &hold_s.to_string()])
            .args(["--ping-interval-ms", &ping_interval_ms.to_string()])
            .args(["--connect-concurrency", &concurrency.to_string()])
            .args([
                "--seed",
                &(p as u64 * 1_000_000).to_string(),
                "--token",
                &token,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a connections child")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((p, line)).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(tx);

    // Wait for every child's `established` line, then sample the gateway's memory.
    let limit = began + Duration::from_secs_f64(hold_s + 120.0);
    let mut established = vec![false; processes];
    let mut results: Vec<Option<ChildResult>> = (0..processes).map(|_| None).collect();
    let mut rss_after = None;
    while results.iter().any(Option::is_none) {
        let left = limit.saturating_duration_since(Instant::now());
        let (p, line) = match rx.recv_timeout(left) {
            Ok(x) => x,
            Err(_) => break,
        };
        if let Some(n) = line.strip_prefix("established ") {
            if progress {
                eprintln!(
                    "[{:5.1}s] child {p}: {n} connections open, holding them",
                    began.elapsed().as_secs_f64()
                );
            }
            established[p] = true;
            if established.iter().all(|e| *e) {
                rss_after = gateway_pid.map(kefu::vm_rss_kib).transpose()?;
            }
        } else if let Ok(r) = serde_json::from_str::<ChildResult>(&line) {
            results[p] = Some(r);
        }
    }
    for mut c in children {
        // Children end on their own after the hold; one that did not is stopped here.
        if c.try_wait()?.is_none() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }

    let mut connect = stats::new_histogram();
    let mut ping = stats::new_histogram();
    let mut errors = ErrorCounts::default();
    let mut connected = 0u64;
    let mut pings = 0u64;
    let mut connect_elapsed = 0f64;
    let mut missing_children = 0;
    for r in &results {
        let Some(r) = r else {
            missing_children += 1;
            continue;
        };
        connected += r.connected;
        pings += r.pings;
        connect_elapsed = connect_elapsed.max(r.connect_elapsed_s);
        for (kind, n) in ErrorKind::ALL.iter().zip(&r.errors) {
            for _ in 0..*n {
                errors.add(*kind);
            }
        }
        add_pairs(&mut connect, &r.connect_us);
        add_pairs(&mut ping, &r.ping_us);
    }
    if missing_children > 0 {
        bail!("{missing_children} of {processes} connection children reported nothing");
    }
    let connect_rate = connected as f64 / connect_elapsed.max(1e-9);
    let mut extra = serde_json::Map::new();
    extra.insert("processes".into(), processes.into());
    extra.insert("source_addresses".into(), sources.into());
    extra.insert("connected".into(), connected.into());
    extra.insert(
        "connect_rate_per_s".into(),
        (connect_rate.round() as u64).into(),
    );
    extra.insert("pings".into(), pings.into());
    let mut memory_per_conn_kib = None;
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = (after.saturating_sub(before)) as f64 / connected.max(1) as f64;
        memory_per_conn_kib = Some(per);
        extra.insert("gateway_rss_before_kib".into(), before.into());
        extra.insert("gateway_rss_after_kib".into(), after.into());
        extra.insert(
            "gateway_kib_per_connection".into(),
            ((per * 100.0).round() / 100.0).into(),
        );
    }
    let report = Report {
        scenario: "connections".into(),
        mode: "idle websockets".into(),
        target: format!("ws://{addr}/v1/ws"),
        threads: processes,
        connections: count,
        rate_per_s: None,
        elapsed_s: began.elapsed().as_secs_f64(),
        // The successes counted are pings answered; `connected` is in the extras.
        ok: pings,
        errors_total: errors.total(),
        errors: errors.to_map(),
        rps: pings as f64 / hold_s.max(1e-9),
        series: vec![
            Series::of("ping rtt", &ping),
            Series::of("connect+upgrade", &connect),
        ],
        extra,
    };
    let mut targets = vec![TargetCheck::at_least(
        "connected",
        connected as f64,
        count as f64,
    )];
    if let Some(max) = max_ping_p99_ms {
        targets.push(TargetCheck::at_most(
            "ping_p99_ms",
            report.latency().p99_us as f64 / 1000.0,
            max,
        ));
    }
    if memory_per_conn_kib.is_none() {
        eprintln!("connections: no --gateway-pid, so no memory per connection");
    }
    Outcome::new(vec![report], targets).finish(json)
}

/// Raise the soft open-files limit to the hard one.
fn raise_nofile() -> anyhow::Result<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
        Ok(lim.rlim_cur)
    }
}

struct ChildState {
    connect: stats::Histogram,
    ping: stats::Histogram,
    errors: ErrorCounts,
    connected: Cell<u64>,
    pings: Cell<u64>,
    next: Cell<usize>,
}

/// The child side: open `--count` sockets, report `established`, ping for `--hold-s`, report.
pub fn child(args: &Args) -> anyhow::Result<i32> {
    let addr: SocketAddr = args.opt("http")?.context("--http")?;
    crate::target::check_loopback(addr)?;
    let count: usize = args.get("count", 1usize)?;
    let sources: u8 = args.get("sources", 1u8)?;
    let hold = Duration::from_secs_f64(args.get("hold-s", 10.0f64)?);
    let interval = Duration::from_millis(args.get("ping-interval-ms", 1000u64)?);
    let concurrency: usize = args.get("connect-concurrency", 256usize)?;
    let seed: u64 = args.get("seed", 0u64)?;
    let token: String = args.opt("token")?.context("--token")?;
    args.finish()?;
    let nofile = raise_nofile()?;
    if count as u64 + 64 > nofile {
        bail!("{count} connections do not fit the open-files limit of {nofile}");
    }
    let state = Rc::new(RefCell::new(ChildState {
        connect: stats::new_histogram(),
        ping: stats::new_histogram(),
        errors: ErrorCounts::default(),
        connected: Cell::new(0),
        pings: Cell::new(0),
        next: Cell::new(0),
    }));
    let token = Rc::new(token);
    let mut rt = conn::runtime(4096).context("building the io_uring runtime")?;
    let connect_elapsed = rt.block_on(async {
        let began = Instant::now();
        // Connections may take at most this long to open, whatever the count.
        let connect_deadline = began + Duration::from_secs(60);
        let holders = Rc::new(RefCell::new(Vec::new()));
        let mut workers = Vec::new();
        for _ in 0..concurrency.min(count) {
            let (state, token, holders) = (state.clone(), token.clone(), holders.clone());
            workers.push(monoio::spawn(async move {
                loop {
                    let j = {
                        let s = state.borrow();
                        let j = s.next.get();
                        if j >= count {
                            return;
                        }
                        s.next.set(j + 1);
                        j
                    };
                    let src =
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (j % sources as usize) as u8));
                    let t0 = Instant::now();
                    match wsutil::connect(
                        addr,
                        Some(src),
                        &token,
                        seed + j as u64,
                        connect_deadline,
                    )
                    .await
                    {
                        Ok(ws) => {
                            let mut s = state.borrow_mut();
                            stats::record(&mut s.connect, t0.elapsed());
                            s.connected.set(s.connected.get() + 1);
                            holders.borrow_mut().push(ws);
                        }
                        Err(e) => state.borrow_mut().errors.add(e),
                    }
                }
            }));
        }
        for w in workers {
            w.await;
        }
        let connect_elapsed = began.elapsed();
        println!("established {}", state.borrow().connected.get());
        let _ = std::io::stdout().flush();

        // Hold: every socket pings once per interval, spread evenly over the interval.
        let hold_end = Instant::now() + hold;
        let all: Vec<_> = std::mem::take(&mut *holders.borrow_mut());
        let n = all.len().max(1);
        let mut tasks = Vec::new();
        for (i, mut ws) in all.into_iter().enumerate() {
            let state = state.clone();
            let first = Instant::now() + interval.mul_f64(i as f64 / n as f64);
            tasks.push(monoio::spawn(async move {
                let mut next = first;
                while next < hold_end {
                    conn::sleep_until(next).await;
                    next += interval;
                    let sent = now_ns();
                    let by = Instant::now() + Duration::from_secs(5);
                    if let Err(e) = ws.send(OP_PING, &sent.to_le_bytes(), by).await {
                        state.borrow_mut().errors.add(e);
                        return;
                    }
                    loop {
                        match ws.read(by).await {
                            Ok(Incoming::Pong) if ws.message.len() == 8 => {
                                let echoed = u64::from_le_bytes(
                                    ws.message[..8].try_into().expect("8 bytes"),
                                );
                                let mut s = state.borrow_mut();
                                stats::record(&mut s.ping, wsutil::since_ns(echoed));
                                s.pings.set(s.pings.get() + 1);
                                break;
                            }
                            Ok(_) => continue,
                            Err(e) => {
                                state.borrow_mut().errors.add(e);
                                return;
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        connect_elapsed
    });
    let s = state.borrow();
    let result = ChildResult {
        connected: s.connected.get(),
        errors: s.errors.0.to_vec(),
        connect_elapsed_s: connect_elapsed.as_secs_f64(),
        pings: s.pings.get(),
        connect_us: hist_pairs(&s.connect),
        ping_us: hist_pairs(&s.ping),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(0)
}
