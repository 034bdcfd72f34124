//! `kefu-loadtest`: run one load scenario and print its report (see `--help`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use kefu_loadtest::cli::Args;
use kefu_loadtest::compare;
use kefu_loadtest::engine::{self, EngineConfig, Mode};
use kefu_loadtest::http1::build_request;
use kefu_loadtest::stats::{LatencySummary, Report, Series};
use kefu_loadtest::target::Target;

const USAGE: &str = "\
usage: kefu-loadtest <scenario> [flags]

scenarios:
  http         any HTTP/1.1 server: --url http://127.0.0.1:PORT/PATH [--method GET] [--body S]
               [--header 'K: V']... [--expect-status N] [--compare wrk] [--rounds 3]

generator flags (all scenarios that send HTTP):
  --connections C (64)  --threads T (cores)  --rate R (open loop, total req/s; omit: closed loop)
  --duration-s S (10)  --requests-max N (100000000)  --timeout-ms MS (2000)
  --json PATH  --quiet (no progress line)

Targets are loopback only. Every run is bounded by --duration-s and --requests-max.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match real_main(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kefu-loadtest: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main(args: &[String]) -> anyhow::Result<i32> {
    let Some(scenario) = args.first() else {
        eprintln!("{USAGE}");
        bail!("no scenario given");
    };
    let rest = &args[1..];
    match scenario.as_str() {
        "http" => http(rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => {
            eprintln!("{USAGE}");
            bail!("unknown scenario `{other}`")
        }
    }
}

const SWITCHES: &[&str] = &["quiet"];

/// Apply the generator flags shared by the HTTP scenarios.
fn engine_flags(args: &Args, cfg: &mut EngineConfig) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cfg.connections = args.get("connections", 64usize)?;
    cfg.threads = args.get("threads", cores.min(cfg.connections))?;
    cfg.mode = match args.opt::<f64>("rate")? {
        Some(r) => Mode::Open { rate_per_s: r },
        None => Mode::Closed,
    };
    cfg.duration = Duration::from_secs_f64(args.get("duration-s", 10.0f64)?);
    cfg.requests_max = args.get("requests-max", 100_000_000u64)?;
    cfg.timeout = Duration::from_millis(args.get("timeout-ms", 2000u64)?);
    cfg.progress = !args.flag("quiet");
    Ok(())
}

/// Build the report of one engine run.
pub fn engine_report(
    scenario: &str,
    target: &str,
    cfg: &EngineConfig,
    r: &engine::EngineResult,
) -> Report {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    Report {
        scenario: scenario.to_string(),
        mode: match cfg.mode {
            Mode::Closed => "closed".into(),
            Mode::Open { .. } => "open".into(),
        },
        target: target.to_string(),
        threads: cfg.threads,
        connections: cfg.connections,
        rate_per_s: match cfg.mode {
            Mode::Open { rate_per_s } => Some(rate_per_s),
            Mode::Closed => None,
        },
        elapsed_s: secs,
        ok: r.ok,
        errors_total: r.errors.total(),
        errors: r.errors.to_map(),
        rps: r.ok as f64 / secs,
        series: vec![Series {
            name: "request".into(),
            latency: LatencySummary::of(&r.hist),
        }],
        extra: Default::default(),
    }
}

fn finish_report(args_json: Option<PathBuf>, report: &Report) -> anyhow::Result<()> {
    print!("{}", report.human());
    if let Some(path) = args_json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn http(rest: &[String]) -> anyhow::Result<i32> {
    let args = Args::parse(rest, SWITCHES)?;
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
    engine_flags(&args, &mut cfg)?;
    cfg.expect_status = args.opt("expect-status")?;
    let json: Option<PathBuf> = args.opt("json")?;
    let reference: Option<String> = args.opt("compare")?;
    let rounds: usize = args.get("rounds", 3usize)?;
    args.finish()?;

    let Some(reference) = reference else {
        let r = engine::run(&cfg)?;
        let report = engine_report("http", &url, &cfg, &r);
        finish_report(json, &report)?;
        return Ok(0);
    };
    if reference != "wrk" {
        bail!("--compare supports `wrk` only, got `{reference}`");
    }
    if method != "GET" || !headers.is_empty() || !body.is_empty() {
        bail!("--compare wrk runs plain GETs: drop --method/--header/--body");
    }
    let mut last = None;
    let cmp = compare::compare_wrk(&url, cfg.connections, cfg.duration, rounds, None, || {
        let r = engine::run(&cfg)?;
        let report = engine_report("http", &url, &cfg, &r);
        let rps = report.rps;
        last = Some(report);
        Ok(rps)
    })?;
    let mut report = last.context("no rounds were run (--rounds 0?)")?;
    report
        .extra
        .insert("compare".into(), serde_json::to_value(&cmp)?);
    finish_report(json, &report)?;
    print!("{}", cmp.human());
    Ok(0)
}
