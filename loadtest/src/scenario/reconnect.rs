//! `reconnect`: K visitors follow their conversations over WebSocket while a writer posts
//! messages into each over HTTP; every `--drop-every` records a subscriber drops its socket
//! (no close frame), reconnects and resubscribes with `after` = the last seq it saw. Checked:
//! each stored record arrives exactly once and in seq order across the drops (no gap, no
//! duplicate), every written message arrives, and at the end the subscriber's last seq equals
//! the conversation's `last_seq` from the history endpoint.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::wsutil::{self, SeqChecker, parse_server, parse_stamp, since_ns};
use super::{Outcome, TargetCheck};
use crate::cli::Args;
use crate::conn::{self, Conn};
use crate::engine::exchange;
use crate::kefu;
use crate::stats::{self, ErrorCounts, ErrorKind, Report, Series};

struct Shared {
    delivery: stats::Histogram,
    resume: stats::Histogram,
    errors: ErrorCounts,
    checker: SeqChecker,
    drops: u64,
    delivered: u64,
    /// Per conversation: message numbers seen (exactly-once check).
    seen: Vec<HashSet<u64>>,
    /// Per conversation: the last seq its subscriber saw.
    last_seq: Vec<u64>,
    written: u64,
    /// 429 answers the writer waited out and retried (not errors: the limit is kefu's policy).
    rate_limited: u64,
}

pub fn run(args: &Args) -> anyhow::Result<i32> {
    let addr: SocketAddr = args
        .opt("http")?
        .context("--http ADDR of kefu is required")?;
    crate::target::check_loopback(addr)?;
    let subscribers: usize = args.get("subscribers", 32usize)?;
    let messages: u64 = args.get("messages", 30u64)?;
    let drop_every: u64 = args.get("drop-every", 5u64)?;
    // 4 messages/s per conversation: under kefu's default per-visitor limit (5/s).
    let interval = Duration::from_millis(args.get("interval-ms", 250u64)?);
    let duration = Duration::from_secs_f64(args.get("duration-s", 30.0f64)?);
    let max_p99_ms: Option<f64> = args.opt("max-p99-ms")?;
    let json: Option<PathBuf> = args.opt("json")?;
    let progress = !args.flag("quiet");
    args.finish()?;
    if subscribers == 0 || subscribers > 10_000 || messages == 0 || drop_every == 0 {
        bail!("--subscribers must be in 1..=10000, --messages and --drop-every at least 1");
    }

    let convs: Vec<kefu::Conversation> = (0..subscribers)
        .map(|i| kefu::create_conversation(addr, &format!("reconnect-{i}"), None))
        .collect::<anyhow::Result<_>>()
        .context("creating conversations")?;

    let shared = Rc::new(RefCell::new(Shared {
        delivery: stats::new_histogram(),
        resume: stats::new_histogram(),
        errors: ErrorCounts::default(),
        checker: SeqChecker::default(),
        drops: 0,
        delivered: 0,
        seen: vec![HashSet::new(); subscribers],
        last_seq: vec![0; subscribers],
        written: 0,
        rate_limited: 0,
    }));
    let began = Instant::now();
    let deadline = began + duration;
    let mut rt = conn::runtime(4096).context("building the io_uring runtime")?;
    rt.block_on(async {
        if progress {
            let shared = shared.clone();
            monoio::spawn(async move {
                loop {
                    monoio::time::sleep(Duration::from_secs(1)).await;
                    let s = shared.borrow();
                    eprintln!(
                        "[{:5.1}s] written {:>7}  delivered {:>7}  drops {:>6}  errors {:>5}",
                        began.elapsed().as_secs_f64(),
                        s.written,
                        s.delivered,
                        s.drops,
                        s.errors.total()
                    );
                }
            });
        }
        let mut tasks = Vec::new();
        for (i, c) in convs.iter().enumerate() {
            let sub = subscriber(
                i,
                addr,
                c.clone(),
                messages,
                drop_every,
                shared.clone(),
                deadline,
            );
            tasks.push(monoio::spawn(sub));
            let w = writer(
                i,
                addr,
                c.clone(),
                messages,
                interval,
                shared.clone(),
                deadline,
            );
            tasks.push(monoio::spawn(w));
        }
        for t in tasks {
            t.await;
        }
    });
    let elapsed = began.elapsed();

    // The history endpoint says where each conversation ends: nothing may be missing at the tail.
    let mut s = shared.borrow_mut();
    for (i, c) in convs.iter().enumerate() {
        let path = format!("/v1/conversations/{}/messages?after=0&limit=1000", c.id);
        let v = kefu::call_json(addr, "GET", &path, Some(&c.visitor_token), None, &[200])?;
        let last = v["last_seq"].as_u64().context("history without last_seq")?;
        if s.last_seq[i] != last {
            eprintln!(
                "reconnect: conversation {} ends at seq {last}, its subscriber saw up to {}",
                c.id, s.last_seq[i]
            );
            s.errors.add(ErrorKind::Check);
        }
        let missing = messages - s.seen[i].len() as u64;
        for _ in 0..missing {
            s.errors.add(ErrorKind::Check);
        }
    }
    let expected = messages * subscribers as u64;
    let mut extra = serde_json::Map::new();
    extra.insert("drops".into(), s.drops.into());
    extra.insert("written".into(), s.written.into());
    extra.insert("rate_limited_retries".into(), s.rate_limited.into());
    extra.insert("duplicates".into(), s.checker.duplicates.into());
    extra.insert("gaps".into(), s.checker.gaps.into());
    let report = Report {
        scenario: "reconnect".into(),
        mode: "websocket".into(),
        target: format!("ws://{addr}/v1/ws"),
        threads: 1,
        connections: subscribers * 2,
        rate_per_s: None,
        elapsed_s: elapsed.as_secs_f64(),
        ok: s.delivered,
        errors_total: s.errors.total(),
        errors: s.errors.to_map(),
        rps: s.delivered as f64 / elapsed.as_secs_f64().max(1e-9),
        series: vec![
            Series::of("delivery", &s.delivery),
            Series::of("reconnect", &s.resume),
        ],
        extra,
    };
    let mut targets = vec![
        TargetCheck::at_most(
            "duplicates_and_gaps",
            (s.checker.duplicates + s.checker.gaps) as f64,
            0.0,
        ),
        TargetCheck::at_least("delivered", s.delivered as f64, expected as f64),
        TargetCheck::at_most("errors", s.errors.total() as f64, 0.0),
    ];
    if let Some(max) = max_p99_ms {
        targets.push(TargetCheck::at_most(
            "delivery_p99_ms",
            report.latency().p99_us as f64 / 1000.0,
            max,
        ));
    }
    drop(s);
    Outcome::new(vec![report], targets).finish(json)
}

/// Wait before retrying a send refused with 429.
const RETRY_AFTER_429: Duration = Duration::from_millis(250);

/// Posts `messages` stamped messages into the conversation, one per `interval`.
async fn writer(
    i: usize,
    addr: SocketAddr,
    conv: kefu::Conversation,
    messages: u64,
    interval: Duration,
    shared: Rc<RefCell<Shared>>,
    deadline: Instant,
) {
    let host = addr.to_string();
    let mut c: Option<Conn> = None;
    // Stagger the writers so their sends do not all land in the same millisecond.
    let mut next = Instant::now() + interval.mul_f64(i as f64 / 64.0 % 1.0);
    for k in 0..messages {
        conn::sleep_until(next).await;
        next += interval;
        if Instant::now() >= deadline {
            return;
        }
        if c.is_none() {
            match Conn::connect(addr, None, 16 * 1024, deadline).await {
                Ok(x) => c = Some(x),
                Err(e) => {
                    shared.borrow_mut().errors.add(e);
                    return;
                }
            }
        }
        // A 429 is waited out and the same message retried, until the deadline.
        loop {
            let body = serde_json::json!({ "text": wsutil::stamp("w", k) }).to_string();
            let req = conv.send_request(&host, &body);
            let cx = c.as_mut().expect("connected above");
            let by = (Instant::now() + Duration::from_secs(5)).min(deadline);
            match exchange(cx, Rc::new(req), by, 16 * 1024).await {
                Ok((201, close)) => {
                    shared.borrow_mut().written += 1;
                    if close {
                        c = None;
                    }
                    break;
                }
                Ok((429, close)) if Instant::now() + RETRY_AFTER_429 < deadline => {
                    shared.borrow_mut().rate_limited += 1;
                    if close {
                        return;
                    }
                    conn::sleep_until(Instant::now() + RETRY_AFTER_429).await;
                }
                Ok((status, _)) => {
                    shared
                        .borrow_mut()
                        .errors
                        .add(ErrorKind::from_status(status));
                    return;
                }
                Err(e) => {
                    shared.borrow_mut().errors.add(e);
                    return;
                }
            }
        }
    }
}

/// Follows the conversation, dropping and resuming its socket every `drop_every` records.
async fn subscriber(
    i: usize,
    addr: SocketAddr,
    conv: kefu::Conversation,
    messages: u64,
    drop_every: u64,
    shared: Rc<RefCell<Shared>>,
    deadline: Instant,
) {
    let mut after = 0u64;
    // When the socket was dropped, to time the reconnect.
    let mut dropped_at: Option<Instant> = None;
    shared.borrow_mut().checker.resume(&conv.id, 0);
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let seed = (i as u64) << 32 | attempt;
        let mut ws = match wsutil::connect(addr, None, &conv.visitor_token, seed, deadline).await {
            Ok(ws) => ws,
            Err(e) => {
                shared.borrow_mut().errors.add(e);
                return;
            }
        };
        let sub =
            serde_json::json!({"type": "subscribe", "conversation_id": conv.id, "after": after})
                .to_string();
        if let Err(e) = ws.send_text(&sub, deadline).await {
            shared.borrow_mut().errors.add(e);
            return;
        }
        if let Some(at) = dropped_at.take() {
            // Drop to resubscribed: connect, handshake, subscribe written.
            stats::record(&mut shared.borrow_mut().resume, at.elapsed());
        }
        let mut since_connect = 0u64;
        loop {
            match ws.read(deadline).await {
                Ok(crate::ws::Incoming::Message) => {}
                Ok(crate::ws::Incoming::Pong) => continue,
                Err(e) => {
                    if Instant::now() < deadline {
                        shared.borrow_mut().errors.add(e);
                    }
                    return;
                }
            }
            let Some(m) = parse_server(&ws.message) else {
                shared.borrow_mut().errors.add(ErrorKind::Parse);
                continue;
            };
            let mut s = shared.borrow_mut();
            if m.kind == "error" {
                eprintln!("reconnect: server error on {}: {}", conv.id, m.error);
                s.errors.add(ErrorKind::Check);
                continue;
            }
            if m.conversation_id != conv.id || m.seq == 0 {
                continue;
            }
            if s.checker.observe(&conv.id, m.seq).is_err() {
                s.errors.add(ErrorKind::Check);
            }
            after = after.max(m.seq);
            s.last_seq[i] = after;
            if m.kind == "message"
                && let Some(("w", k, sent)) = parse_stamp(&m.text)
            {
                if !s.seen[i].insert(k) {
                    s.errors.add(ErrorKind::Check);
                }
                stats::record(&mut s.delivery, since_ns(sent));
                s.delivered += 1;
                if s.seen[i].len() as u64 == messages {
                    return;
                }
            }
            since_connect += 1;
            if since_connect >= drop_every {
                s.drops += 1;
                dropped_at = Some(Instant::now());
                break;
            }
        }
        // Dropping the client closes the socket without a close frame: an abrupt loss.
        drop(ws);
    }
}
