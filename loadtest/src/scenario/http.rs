//! `http`: any HTTP/1.1 server on loopback (nginx, a reference, kefu's health endpoint), with
//! an optional side-by-side run of `wrk -t1` against the same URL.

use std::path::PathBuf;

use anyhow::{Context, bail};

use super::{Outcome, TargetCheck, engine_flags, engine_report};
use crate::cli::Args;
use crate::compare;
use crate::engine::{self, EngineConfig};
use crate::http1::build_request;
use crate::target::Target;

pub fn run(args: &Args) -> anyhow::Result<i32> {
    let url: String = args.opt("url")?.context("--url is required")?;
    let target = Target::parse(&url)?;
    let method: String = args.get("method", "GET".to_string())?;
    let body: String = args.get("body", String::new())?;
    let headers_raw = args.all("header");
    let mut headers = Vec::new();
    for h in &headers_raw {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header `{h}` needs NAME: VALUE"))?;
        headers.push((k.trim(), v.trim()));
    }
    let req = build_request(
        &method,
        &target.host,
        &target.path,
        &headers,
        body.as_bytes(),
    );
    let mut cfg = EngineConfig::new(target.addr, vec![req]);
    engine_flags(args, &mut cfg)?;
    cfg.expect_status = args.opt("expect-status")?;
    let json: Option<PathBuf> = args.opt("json")?;
    let reference: Option<String> = args.opt("compare")?;
    let rounds: usize = args.get("rounds", 3usize)?;
    let min_rps: Option<f64> = args.opt("min-rps")?;
    let max_p99_ms: Option<f64> = args.opt("max-p99-ms")?;
    let min_ratio: Option<f64> = args.opt("min-ratio")?;
    args.finish()?;

    let mut comparison = None;
    let report = match reference.as_deref() {
        None => engine_report("http", &url, &cfg, &engine::run(&cfg)?),
        Some("wrk") => {
            if method != "GET" || !headers.is_empty() || !body.is_empty() {
                bail!("--compare wrk runs plain GETs: drop --method/--header/--body");
            }
            let mut last = None;
            let cmp =
                compare::compare_wrk(&url, cfg.connections, cfg.duration, rounds, None, || {
                    let report = engine_report("http", &url, &cfg, &engine::run(&cfg)?);
                    let out = (report.rps, report.ok);
                    last = Some(report);
                    Ok(out)
                })?;
            comparison = Some(cmp);
            last.context("no rounds were run (--rounds 0?)")?
        }
        Some(other) => bail!("--compare supports `wrk` only, got `{other}`"),
    };
    let mut targets = Vec::new();
    if let Some(min) = min_rps {
        targets.push(TargetCheck::at_least("rps", report.rps, min));
    }
    if let Some(max) = max_p99_ms {
        targets.push(TargetCheck::at_most(
            "p99_ms",
            report.latency().p99_us as f64 / 1000.0,
            max,
        ));
    }
    let mut outcome = Outcome::new(vec![report], targets);
    if let Some(cmp) = comparison {
        print!("{}", cmp.human());
        if let Some(min) = min_ratio {
            outcome
                .targets
                .push(TargetCheck::at_least("ratio_vs_wrk", cmp.ratio, min));
            outcome.passed = outcome.targets.iter().all(|t| t.passed);
        }
        outcome
            .extra
            .insert("compare".into(), serde_json::to_value(&cmp)?);
    }
    outcome.finish(json)
}
