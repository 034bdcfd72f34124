//! The generator's accounting against deliberately misbehaving in-process servers: a stall must
//! show in the open-loop percentiles (and only as a few samples in the closed loop), and
//! dropped connections, error statuses and silence must be errors, never fast responses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kefu_loadtest::engine::{self, EngineConfig, EngineResult, Mode};
use kefu_loadtest::http1::build_request;
use kefu_loadtest::stats::{ErrorKind, LatencySummary};

#[derive(Clone, Copy)]
enum Behavior {
    /// Answer 200 to every request, except inside the stall window.
    Normal,
    /// Answer this many requests per connection, then close it.
    DropAfter(usize),
    /// Answer with this status.
    Status(u16),
    /// Read requests, never answer.
    Silent,
}

struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stall: Arc<Mutex<Option<(Instant, Instant)>>>,
}

impl TestServer {
    fn start(behavior: Behavior) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stall: Arc<Mutex<Option<(Instant, Instant)>>> = Arc::default();
        let (stop2, stall2) = (stop.clone(), stall.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(s) = s else { continue };
                let (stop3, stall3) = (stop2.clone(), stall2.clone());
                std::thread::spawn(move || serve(s, behavior, &stop3, &stall3));
            }
        });
        TestServer { addr, stop, stall }
    }

    /// Every response whose turn falls in [at, at + len) waits until the window ends.
    fn stall_at(&self, at: Instant, len: Duration) {
        *self.stall.lock().unwrap() = Some((at, at + len));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    mut s: TcpStream,
    behavior: Behavior,
    stop: &AtomicBool,
    stall: &Mutex<Option<(Instant, Instant)>>,
) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut answered = 0usize;
    loop {
        // Requests are bodyless GETs: one per blank line.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let window = *stall.lock().unwrap();
            if let Some((from, until)) = window {
                let now = Instant::now();
                if now >= from && now < until {
                    std::thread::sleep(until - now);
                }
            }
            let response: &[u8] = match behavior {
                Behavior::Normal => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                Behavior::DropAfter(n) if answered >= n => return,
                Behavior::DropAfter(_) => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                Behavior::Status(503) => b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
                Behavior::Status(_) => b"HTTP/1.1 404 Nope\r\nContent-Length: 0\r\n\r\n",
                Behavior::Silent => continue,
            };
            if s.write_all(response).is_err() {
                return;
            }
            answered += 1;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn config(addr: SocketAddr, connections: usize, mode: Mode, duration: Duration) -> EngineConfig {
    let req = build_request("GET", &addr.to_string(), "/", &[], b"");
    let mut cfg = EngineConfig::new(addr, vec![req]);
    cfg.connections = connections;
    cfg.threads = 1;
    cfg.mode = mode;
    cfg.duration = duration;
    cfg.timeout = Duration::from_secs(2);
    cfg
}

fn samples_at_least(r: &EngineResult, us: u64) -> u64 {
    r.hist
        .count_between(us, kefu_loadtest::stats::LATENCY_US_MAX)
}

/// Run with a 100 ms stall starting `stall_after` into the run.
fn run_with_stall(mode: Mode, duration: Duration, stall_after: Duration) -> EngineResult {
    let server = TestServer::start(Behavior::Normal);
    let connections = 8;
    let cfg = config(server.addr, connections, mode, duration);
    // The engine starts its clock 20 ms after `run` is called.
    server.stall_at(
        Instant::now() + Duration::from_millis(20) + stall_after,
        Duration::from_millis(100),
    );
    engine::run(&cfg).unwrap()
}

#[test]
fn stall_shows_in_open_loop_p99_but_closed_loop_hides_it() {
    // Open loop, 2000 req/s for 1 s: the 100 ms stall holds back ~200 intended sends, whose
    // latencies spread from 100 ms down to ~0 as the connections catch up. The slowest 1% of
    // all 2000 (20 samples) then lies in the top 10% of that spread: p99 ~= 90 ms.
    let open = run_with_stall(
        Mode::Open { rate_per_s: 2000.0 },
        Duration::from_secs(1),
        Duration::from_millis(300),
    );
    let lo = LatencySummary::of(&open.hist);
    eprintln!("open: {lo:?} errors {:?}", open.errors);
    assert_eq!(open.errors.total(), 0, "{:?}", open.errors);
    assert!(
        lo.p99_us >= 80_000,
        "open-loop p99 must carry the stall: {lo:?}"
    );
    assert!(
        samples_at_least(&open, 50_000) >= 60,
        "about 100 sends waited >= 50 ms: {lo:?}"
    );

    // Closed loop over the same stall: each of the 8 connections has one request in flight and
    // simply sends nothing during the stall, so only those few requests record it; with
    // thousands of fast requests around them, p99 stays far below the stall.
    let closed = run_with_stall(
        Mode::Closed,
        Duration::from_secs(2),
        Duration::from_millis(500),
    );
    let lc = LatencySummary::of(&closed.hist);
    eprintln!("closed: {lc:?} errors {:?}", closed.errors);
    assert_eq!(closed.errors.total(), 0, "{:?}", closed.errors);
    assert!(
        lc.max_us >= 80_000,
        "the closed run hit the stall too: {lc:?}"
    );
    // The 8 requests in flight when the stall began each waited nearly all of its 100 ms;
    // counting from 90 ms keeps the scheduler hiccups of a loaded 2-core machine (seen: 36
    // samples over 50 ms in one such run) out of the count. Slack for a few of those remains.
    let stalled = samples_at_least(&closed, 90_000);
    assert!(
        stalled <= 3 * 8,
        "only the in-flight requests see the stall: {stalled} {lc:?}"
    );
    if lc.count >= 100 * 8 {
        assert!(
            lc.p99_us < 50_000,
            "closed-loop p99 hides the stall: {lc:?}"
        );
    } else {
        eprintln!(
            "closed loop too slow on this machine ({} samples) to check its p99",
            lc.count
        );
    }
}

#[test]
fn dropped_connections_are_errors_not_fast_responses() {
    // Each connection answers one request, then closes: every other attempt fails.
    let server = TestServer::start(Behavior::DropAfter(1));
    let mut cfg = config(server.addr, 4, Mode::Closed, Duration::from_secs(10));
    cfg.requests_max = 400;
    let r = engine::run(&cfg).unwrap();
    eprintln!("drop-after-1: ok {} errors {:?}", r.ok, r.errors);
    assert_eq!(
        r.ok + r.errors.total(),
        400,
        "every attempt is counted exactly once"
    );
    assert_eq!(r.hist.len(), r.ok, "only successes are in the histogram");
    let closed = r.errors.get(ErrorKind::Closed);
    assert!(closed >= 150, "drops counted as closed: {:?}", r.errors);
    assert!(r.ok >= 150 && r.ok <= 250, "about half succeed: {}", r.ok);

    // A server that answers nothing before closing: no success at all.
    let server = TestServer::start(Behavior::DropAfter(0));
    let mut cfg = config(server.addr, 4, Mode::Closed, Duration::from_secs(10));
    cfg.requests_max = 100;
    let r = engine::run(&cfg).unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.hist.is_empty());
    assert_eq!(r.errors.get(ErrorKind::Closed), 100, "{:?}", r.errors);
}

#[test]
fn statuses_silence_and_refused_connects_are_errors() {
    let server = TestServer::start(Behavior::Status(503));
    let mut cfg = config(server.addr, 2, Mode::Closed, Duration::from_secs(10));
    cfg.requests_max = 50;
    let r = engine::run(&cfg).unwrap();
    assert_eq!(
        (r.ok, r.errors.get(ErrorKind::Status5xx)),
        (0, 50),
        "{:?}",
        r.errors
    );

    let server = TestServer::start(Behavior::Status(404));
    let mut cfg = config(server.addr, 2, Mode::Closed, Duration::from_secs(10));
    cfg.requests_max = 50;
    let r = engine::run(&cfg).unwrap();
    assert_eq!(
        (r.ok, r.errors.get(ErrorKind::Status4xx)),
        (0, 50),
        "{:?}",
        r.errors
    );

    // An expected status that differs from the 2xx received.
    let server = TestServer::start(Behavior::Normal);
    let mut cfg = config(server.addr, 2, Mode::Closed, Duration::from_secs(10));
    cfg.requests_max = 20;
    cfg.expect_status = Some(201);
    let r = engine::run(&cfg).unwrap();
    assert_eq!(
        (r.ok, r.errors.get(ErrorKind::StatusUnexpected)),
        (0, 20),
        "{:?}",
        r.errors
    );

    // Silence: each attempt times out; the run still ends by its duration.
    let server = TestServer::start(Behavior::Silent);
    let mut cfg = config(server.addr, 2, Mode::Closed, Duration::from_millis(600));
    cfg.timeout = Duration::from_millis(200);
    let began = Instant::now();
    let r = engine::run(&cfg).unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.errors.get(ErrorKind::Timeout) >= 4, "{:?}", r.errors);
    assert!(began.elapsed() < Duration::from_secs(5));

    // Refused: a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(port, 2, Mode::Closed, Duration::from_millis(300));
    cfg.requests_max = 1000;
    let r = engine::run(&cfg).unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.errors.get(ErrorKind::Connect) >= 2, "{:?}", r.errors);
}

#[test]
fn open_loop_keeps_its_rate_and_bounds() {
    let server = TestServer::start(Behavior::Normal);
    let mut cfg = config(
        server.addr,
        4,
        Mode::Open { rate_per_s: 500.0 },
        Duration::from_secs(1),
    );
    let r = engine::run(&cfg).unwrap();
    // 500 slots in the second; the schedule, not the server, sets the count.
    assert!(
        (490..=500).contains(&r.ok),
        "ok {} errors {:?}",
        r.ok,
        r.errors
    );
    cfg.requests_max = 100;
    let r = engine::run(&cfg).unwrap();
    assert_eq!(r.ok, 100);
}

#[test]
fn open_loop_counts_every_slot_of_a_silent_server() {
    // 100 req/s for 0.5 s over 2 connections: 50 slots. Each send times out after 300 ms, so
    // most slots are never sent before `duration + timeout`; they must still be counted (as
    // timeouts), not vanish from the run.
    let server = TestServer::start(Behavior::Silent);
    let mut cfg = config(
        server.addr,
        2,
        Mode::Open { rate_per_s: 100.0 },
        Duration::from_millis(500),
    );
    cfg.timeout = Duration::from_millis(300);
    let r = engine::run(&cfg).unwrap();
    assert_eq!(r.ok, 0);
    assert_eq!(r.errors.get(ErrorKind::Timeout), 50, "{:?}", r.errors);
    assert_eq!(r.errors.total(), 50, "{:?}", r.errors);
}

#[test]
fn threads_split_the_budget_and_merge_their_counts() {
    let server = TestServer::start(Behavior::Normal);
    let mut cfg = config(server.addr, 5, Mode::Closed, Duration::from_secs(20));
    cfg.threads = 2;
    cfg.requests_max = 1001;
    let r = engine::run(&cfg).unwrap();
    assert_eq!(
        (r.ok, r.hist.len(), r.errors.total()),
        (1001, 1001, 0),
        "{:?}",
        r.errors
    );
}

#[test]
fn non_loopback_targets_are_refused() {
    let cfg = config(
        "192.0.2.1:80".parse().unwrap(),
        1,
        Mode::Closed,
        Duration::from_millis(100),
    );
    let e = engine::run(&cfg).unwrap_err();
    assert!(format!("{e}").contains("not a loopback address"), "{e}");
}
