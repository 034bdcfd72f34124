//! `send`: visitors' message sends into many conversations over keep-alive HTTP, each one
//! persisted and acknowledged (201). The load is spread over `--conversations` (8192) so each
//! conversation stays under kefu's per-visitor rate limit (5 messages/s, burst 20 by default),
//! as real traffic from many visitors would; a 429 counts as an error (`status_429`).
//! Two phases:
//! - latency: open loop at `--rate-open` (default: the `--min-rps` target) for `--open-s`,
//!   latency from each send's intended time (p99 checked against `--max-p99-ms`). A
//!   closed-loop p99 would hide stalls, so the latency target is only checked on the open loop.
//!   It runs first, so it measures the target load on a gateway that has not just been
//!   saturated;
//! - capacity: closed loop for `--closed-s`, the most the gateway sustains (checked against
//!   `--min-rps`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Outcome, TargetCheck, engine_flags, engine_report};
use crate::cli::Args;
use crate::compare;
use crate::engine::{self, EngineConfig, Mode};
use crate::kefu;

/// The message every send carries (fixed size, so every request costs the same).
const TEXT: &str = "load test message: hello, I need help with my order 0123456789";

pub fn run(args: &Args) -> anyhow::Result<i32> {
    let addr: SocketAddr = args
        .opt("http")?
        .context("--http ADDR of kefu is required")?;
    crate::target::check_loopback(addr)?;
    let conversations: usize = args.get("conversations", 8192usize)?;
    let closed_s: f64 = args.get("closed-s", 5.0f64)?;
    let open_s: f64 = args.get("open-s", 10.0f64)?;
    let min_rps: f64 = args.get("min-rps", 8900.0f64)?;
    let max_p99_ms: f64 = args.get("max-p99-ms", 11.0f64)?;
    let rate: f64 = args.get("rate-open", min_rps)?;
    let json: Option<PathBuf> = args.opt("json")?;
    let reference: Option<String> = args.opt("compare")?;
    let rounds: usize = args.get("rounds", 3usize)?;
    if args.opt::<f64>("duration-s")?.is_some() {
        bail!("send has two phases: bound them with --closed-s and --open-s, not --duration-s");
    }
    let mut cfg = EngineConfig::new(addr, vec![Vec::new()]);
    engine_flags(args, &mut cfg)?;
    if cfg.mode != Mode::Closed {
        bail!("send runs its own phases: use --rate-open R for the open-loop rate, not --rate");
    }
    args.finish()?;
    if conversations == 0 || conversations > 100_000 {
        bail!("--conversations must be in 1..=100000");
    }
    if reference.as_deref().is_some_and(|r| r != "wrk") {
        bail!("--compare supports `wrk` only");
    }

    let began = Instant::now();
    let convs = create_conversations(addr, conversations)?;
    eprintln!(
        "send: created {} conversations in {:.2} s",
        convs.len(),
        began.elapsed().as_secs_f64()
    );
    let host = addr.to_string();
    let body = serde_json::json!({ "text": TEXT }).to_string();
    let requests: Vec<Vec<u8>> = convs.iter().map(|c| c.send_request(&host, &body)).collect();
    cfg.requests = std::sync::Arc::new(requests);
    cfg.expect_status = Some(201);
    let target = format!("http://{addr}/v1/conversations/{{id}}/messages");

    let mut reports = Vec::new();
    let mut targets = Vec::new();
    let mut extra = serde_json::Map::new();
    if open_s > 0.0 {
        let mut o = cfg.clone();
        o.mode = Mode::Open { rate_per_s: rate };
        o.duration = Duration::from_secs_f64(open_s);
        let r = engine_report("send (latency)", &target, &o, &engine::run(&o)?);
        targets.push(TargetCheck::at_most(
            "open_loop_p99_ms",
            r.latency().p99_us as f64 / 1000.0,
            max_p99_ms,
        ));
        // In open loop every slot is either answered or an error: errors are missed sends.
        let slots = r.ok + r.errors_total;
        targets.push(TargetCheck::at_least(
            "open_loop_ok_fraction",
            r.ok as f64 / slots.max(1) as f64,
            0.999,
        ));
        reports.push(r);
    }
    if closed_s > 0.0 {
        let mut c = cfg.clone();
        c.mode = Mode::Closed;
        c.duration = Duration::from_secs_f64(closed_s);
        if let Some("wrk") = reference.as_deref() {
            let dir = std::env::temp_dir().join(format!("kefu-loadtest-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let script = dir.join("send.lua");
            std::fs::write(&script, wrk_script(&convs, &body)).context("writing the wrk script")?;
            let url = format!("http://{addr}/");
            let mut last = None;
            let cmp = compare::compare_wrk(
                &url,
                c.connections,
                c.duration,
                rounds,
                Some(&script),
                || {
                    let r = engine_report("send (capacity)", &target, &c, &engine::run(&c)?);
                    let out = (r.rps, r.ok);
                    last = Some(r);
                    Ok(out)
                },
            );
            let _ = std::fs::remove_dir_all(&dir);
            let cmp = cmp?;
            print!("{}", cmp.human());
            extra.insert("compare".into(), serde_json::to_value(&cmp)?);
            reports.push(last.context("no compare rounds were run")?);
        } else {
            reports.push(engine_report(
                "send (capacity)",
                &target,
                &c,
                &engine::run(&c)?,
            ));
        }
        let r = reports.last().expect("pushed above");
        targets.push(TargetCheck::at_least("capacity_rps", r.rps, min_rps));
    }
    if reports.is_empty() {
        bail!("both phases disabled (--closed-s 0 --open-s 0)");
    }
    let mut outcome = Outcome::new(reports, targets);
    outcome.extra = extra;
    outcome.finish(json)
}

/// Create `n` conversations with parallel setup threads (setup is not measured).
fn create_conversations(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<kefu::Conversation>> {
    let workers = 32.min(n);
    let results: Vec<anyhow::Result<Vec<kefu::Conversation>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    (w..n)
                        .step_by(workers)
                        .map(|i| kefu::create_conversation(addr, &format!("loadtest-{i}"), None))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("setup thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for r in results {
        out.extend(r.context("creating conversations")?);
    }
    Ok(out)
}

/// A wrk script sending the same requests as the generator, round-robin.
fn wrk_script(convs: &[kefu::Conversation], body: &str) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut s = String::from("local reqs = {}\nlocal n = 0\ninit = function(args)\n");
    for c in convs {
        s.push_str(&format!(
            "  n = n + 1\n  reqs[n] = wrk.format(\"POST\", {}, {{[\"Authorization\"] = {}, [\"Content-Type\"] = \"application/json\"}}, {})\n",
            q(&format!("/v1/conversations/{}/messages", c.id)),
            q(&format!("Bearer {}", c.visitor_token)),
            q(body)
        ));
    }
    s.push_str("end\nlocal i = 0\nrequest = function()\n  i = i % n + 1\n  return reqs[i]\nend\n");
    s
}
