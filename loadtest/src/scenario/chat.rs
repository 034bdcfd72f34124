//! `chat`: V visitors and A agents talking over WebSocket. Each visitor starts a conversation,
//! follows it, waits until an agent is assigned, then sends `--messages` messages, one per
//! `--interval-ms`, each answered by its agent. Latency runs from the sender's send (a
//! timestamp inside the text) to the receiver's receipt, for both directions. Checked: every
//! message arrives exactly once at the other side, and each receiver sees every conversation's
//! stored records in seq order with no gap.
//!
//! Agents go online over HTTP, open one socket each (their inbox), and subscribe to each
//! conversation when its `assigned` event reaches them. All sockets run on one io_uring
//! thread: this scenario measures the gateway's delivery path, not the generator's rate.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::wsutil::{self, SeqChecker, parse_server, parse_stamp, since_ns, stamp};
use super::{Outcome, TargetCheck};
use crate::cli::Args;
use crate::conn;
use crate::kefu;
use crate::stats::{self, ErrorCounts, ErrorKind, Report, Series};
use crate::ws::{Incoming, WsClient};

struct Shared {
    to_agent: stats::Histogram,
    to_visitor: stats::Histogram,
    errors: ErrorCounts,
    /// (conversation, k) of visitor messages agents received.
    agent_seen: HashSet<(String, u64)>,
    /// Visitor messages received by agents, and agent replies received by visitors.
    delivered: u64,
    visitors_done: usize,
    duplicates: u64,
    gaps: u64,
}

impl Shared {
    fn fault(&mut self, what: &str, conv: &str, detail: impl std::fmt::Display) {
        self.errors.add(ErrorKind::Check);
        if self.errors.get(ErrorKind::Check) <= 10 {
            eprintln!("chat: {what} in {conv}: {detail}");
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<i32> {
    let addr: SocketAddr = args
        .opt("http")?
        .context("--http ADDR of kefu is required")?;
    crate::target::check_loopback(addr)?;
    let agent_tokens = args.all("agent-token");
    let visitors: usize = args.get("visitors", 16usize)?;
    let messages: u64 = args.get("messages", 20u64)?;
    // 4 messages/s per visitor: under kefu's default per-visitor limit (5/s).
    let interval = Duration::from_millis(args.get("interval-ms", 250u64)?);
    let duration = Duration::from_secs_f64(args.get("duration-s", 30.0f64)?);
    let max_p99_ms: Option<f64> = args.opt("max-p99-ms")?;
    let json: Option<PathBuf> = args.opt("json")?;
    let progress = !args.flag("quiet");
    args.finish()?;
    if agent_tokens.is_empty() {
        bail!("chat needs at least one --agent-token (kefu prints its demo agents' tokens)");
    }
    if visitors == 0 || visitors > 10_000 || messages == 0 {
        bail!("--visitors must be in 1..=10000 and --messages at least 1");
    }

    for t in &agent_tokens {
        kefu::set_agent_status(addr, t, true).context("setting a demo agent online")?;
    }
    let shared = Rc::new(RefCell::new(Shared {
        to_agent: stats::new_histogram(),
        to_visitor: stats::new_histogram(),
        errors: ErrorCounts::default(),
        agent_seen: HashSet::new(),
        delivered: 0,
        visitors_done: 0,
        duplicates: 0,
        gaps: 0,
    }));
    let began = Instant::now();
    let deadline = began + duration;
    let mut rt = conn::runtime(4096).context("building the io_uring runtime")?;
    let setup: anyhow::Result<()> = rt.block_on(async {
        if progress {
            let shared = shared.clone();
            monoio::spawn(async move {
                loop {
                    monoio::time::sleep(Duration::from_secs(1)).await;
                    let s = shared.borrow();
                    eprintln!(
                        "[{:5.1}s] delivered {:>8}  visitors done {:>5}  errors {:>5}",
                        began.elapsed().as_secs_f64(),
                        s.delivered,
                        s.visitors_done,
                        s.errors.total()
                    );
                }
            });
        }
        // Agents first, so their inboxes are open before conversations are assigned.
        let mut agents = Vec::new();
        for (a, token) in agent_tokens.iter().enumerate() {
            let ws = wsutil::connect(addr, None, token, 1 << 40 | a as u64, deadline)
                .await
                .map_err(|e| anyhow::anyhow!("agent socket: {}", e.name()))?;
            agents.push(monoio::spawn(agent(ws, shared.clone(), deadline)));
        }
        // Conversations are created over blocking HTTP inside the runtime: setup, not measured.
        let mut tasks = Vec::new();
        for v in 0..visitors {
            let conv = kefu::create_conversation(
                addr,
                &format!("chat-{v}"),
                Some("hello, I need help with my order"),
            )?;
            tasks.push(monoio::spawn(visitor(
                v,
                addr,
                conv,
                messages,
                interval,
                shared.clone(),
                deadline,
            )));
        }
        for t in tasks {
            t.await;
        }
        // Agent tasks wait in reads; they end with the runtime.
        drop(agents);
        Ok(())
    });
    setup?;
    let elapsed = began.elapsed();
    for t in &agent_tokens {
        let _ = kefu::set_agent_status(addr, t, false);
    }

    let s = shared.borrow();
    let expected = 2 * messages * visitors as u64;
    let mut extra = serde_json::Map::new();
    extra.insert("visitors".into(), visitors.into());
    extra.insert("agents".into(), agent_tokens.len().into());
    extra.insert("visitors_done".into(), s.visitors_done.into());
    extra.insert("duplicates".into(), s.duplicates.into());
    extra.insert("gaps".into(), s.gaps.into());
    let report = Report {
        scenario: "chat".into(),
        mode: "websocket".into(),
        target: format!("ws://{addr}/v1/ws"),
        threads: 1,
        connections: visitors + agent_tokens.len(),
        rate_per_s: None,
        elapsed_s: elapsed.as_secs_f64(),
        ok: s.delivered,
        errors_total: s.errors.total(),
        errors: s.errors.to_map(),
        rps: s.delivered as f64 / elapsed.as_secs_f64().max(1e-9),
        series: vec![
            Series::of("visitor->agent", &s.to_agent),
            Series::of("agent->visitor", &s.to_visitor),
        ],
        extra,
    };
    let mut targets = vec![
        TargetCheck::at_least("delivered", s.delivered as f64, expected as f64),
        TargetCheck::at_most("duplicates_and_gaps", (s.duplicates + s.gaps) as f64, 0.0),
        TargetCheck::at_most("errors", s.errors.total() as f64, 0.0),
    ];
    if let Some(max) = max_p99_ms {
        let worst = report
            .series
            .iter()
            .map(|x| x.latency.p99_us)
            .max()
            .unwrap_or(0);
        targets.push(TargetCheck::at_most(
            "p99_ms_both_directions",
            worst as f64 / 1000.0,
            max,
        ));
    }
    drop(s);
    Outcome::new(vec![report], targets).finish(json)
}

fn observe(checker: &mut SeqChecker, shared: &mut Shared, conv: &str, seq: u64) {
    match checker.observe(conv, seq) {
        Ok(()) => {}
        Err(wsutil::SeqFault::Duplicate) => {
            shared.duplicates += 1;
            shared.fault("duplicate or out-of-order seq", conv, seq);
        }
        Err(wsutil::SeqFault::Gap) => {
            shared.gaps += 1;
            shared.fault("gap before seq", conv, seq);
        }
    }
}

async fn agent(mut ws: WsClient, shared: Rc<RefCell<Shared>>, deadline: Instant) {
    let mut checker = SeqChecker::default();
    let mut subscribed: HashMap<String, ()> = HashMap::new();
    let mut replies = 0u64;
    loop {
        match ws.read(deadline).await {
            Ok(Incoming::Message) => {}
            Ok(Incoming::Pong) => continue,
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
        if m.kind == "error" {
            shared
                .borrow_mut()
                .fault("agent got an error", &m.conversation_id, &m.error);
            continue;
        }
        if !subscribed.contains_key(&m.conversation_id) {
            // Inbox notices: subscribe to conversations assigned to us.
            if m.kind == "event" && m.event == "assigned" {
                let sub = serde_json::json!({"type": "subscribe", "conversation_id": m.conversation_id, "after": 0});
                if let Err(e) = ws.send_text(&sub.to_string(), deadline).await {
                    shared.borrow_mut().errors.add(e);
                    return;
                }
                checker.resume(&m.conversation_id, 0);
                subscribed.insert(m.conversation_id.clone(), ());
            }
            continue;
        }
        if m.kind != "message" && m.kind != "event" {
            continue;
        }
        let reply = {
            let mut s = shared.borrow_mut();
            observe(&mut checker, &mut s, &m.conversation_id, m.seq);
            match (m.kind.as_str(), m.from_role.as_str(), parse_stamp(&m.text)) {
                ("message", "visitor", Some(("v", k, sent))) => {
                    stats::record(&mut s.to_agent, since_ns(sent));
                    if s.agent_seen.insert((m.conversation_id.clone(), k)) {
                        s.delivered += 1;
                        Some(k)
                    } else {
                        s.fault("visitor message twice at the agent", &m.conversation_id, k);
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(k) = reply {
            replies += 1;
            let send = serde_json::json!({
                "type": "send",
                "conversation_id": m.conversation_id,
                "text": stamp("a", k),
                "client_msg_id": format!("a-{replies}"),
            });
            if let Err(e) = ws.send_text(&send.to_string(), deadline).await {
                shared.borrow_mut().errors.add(e);
                return;
            }
        }
    }
}

async fn visitor(
    v: usize,
    addr: SocketAddr,
    conv: kefu::Conversation,
    messages: u64,
    interval: Duration,
    shared: Rc<RefCell<Shared>>,
    deadline: Instant,
) {
    let fail = |e: ErrorKind| shared.borrow_mut().errors.add(e);
    let mut ws = match wsutil::connect(addr, None, &conv.visitor_token, v as u64, deadline).await {
        Ok(ws) => ws,
        Err(e) => return fail(e),
    };
    let sub = serde_json::json!({"type": "subscribe", "conversation_id": conv.id, "after": 0});
    if let Err(e) = ws.send_text(&sub.to_string(), deadline).await {
        return fail(e);
    }
    let mut checker = SeqChecker::default();
    checker.resume(&conv.id, 0);
    let mut assigned = false;
    // A ping-pong paced by `interval`: message k+1 goes out once reply k is in and the
    // interval since message k has passed; never while a reply is due, so a reply's receipt
    // time is never delayed by our own sleep.
    let mut sent = 0u64;
    let mut replied = 0u64;
    let mut next_send = Instant::now();
    loop {
        if assigned && sent == replied && sent < messages {
            conn::sleep_until(next_send.min(deadline)).await;
            let send = serde_json::json!({
                "type": "send",
                "conversation_id": conv.id,
                "text": stamp("v", sent),
                "client_msg_id": format!("v-{sent}"),
            });
            if let Err(e) = ws.send_text(&send.to_string(), deadline).await {
                return fail(e);
            }
            sent += 1;
            next_send = Instant::now() + interval;
        }
        match ws.read(deadline).await {
            Ok(Incoming::Message) => {}
            Ok(Incoming::Pong) => continue,
            Err(e) => {
                shared
                    .borrow_mut()
                    .fault("visitor socket ended", &conv.id, e.name());
                return;
            }
        }
        let Some(m) = parse_server(&ws.message) else {
            fail(ErrorKind::Parse);
            continue;
        };
        let mut s = shared.borrow_mut();
        match m.kind.as_str() {
            "error" => s.fault("visitor got an error", &conv.id, &m.error),
            "message" | "event" if m.conversation_id == conv.id => {
                observe(&mut checker, &mut s, &conv.id, m.seq);
                if m.kind == "event" && m.event == "assigned" && !assigned {
                    assigned = true;
                    next_send = Instant::now();
                }
                if let ("message", "agent", Some(("a", k, sent_ns))) =
                    (m.kind.as_str(), m.from_role.as_str(), parse_stamp(&m.text))
                {
                    stats::record(&mut s.to_visitor, since_ns(sent_ns));
                    if k != replied {
                        s.fault("agent reply out of order or twice", &conv.id, k);
                        continue;
                    }
                    s.delivered += 1;
                    replied += 1;
                    if replied == messages {
                        s.visitors_done += 1;
                        return;
                    }
                }
            }
            _ => {}
        }
        drop(s);
    }
}
