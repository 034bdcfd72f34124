//! The scenarios: each parses its flags, runs, prints its reports and checks its targets.
//! Exit codes: 0 all targets met, 1 a target missed, 2 the run itself failed.

pub mod chat;
pub mod connections;
pub mod http;
pub mod reconnect;
pub mod send;
pub mod wsutil;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::cli::Args;
use crate::engine::{EngineConfig, EngineResult, Mode};
use crate::stats::{Report, Series};

/// Flags that take no value.
pub const SWITCHES: &[&str] = &["quiet"];

/// Apply the generator flags shared by the HTTP scenarios.
pub fn engine_flags(args: &Args, cfg: &mut EngineConfig) -> anyhow::Result<()> {
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
pub fn engine_report(scenario: &str, target: &str, cfg: &EngineConfig, r: &EngineResult) -> Report {
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
        series: match cfg.mode {
            // How late the generator sent against the schedule: if this is not near zero, the
            // request latencies include the generator's own delay (or the server's backlog).
            Mode::Open { .. } => vec![
                Series::of("request", &r.hist),
                Series::of("send delay", &r.send_delay),
            ],
            Mode::Closed => vec![Series::of("request", &r.hist)],
        },
        extra: Default::default(),
    }
}

/// One checked target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub name: String,
    pub want: String,
    pub got: f64,
    pub passed: bool,
}

impl TargetCheck {
    pub fn at_least(name: &str, got: f64, min: f64) -> TargetCheck {
        TargetCheck {
            name: name.into(),
            want: format!(">= {min}"),
            got,
            passed: got >= min,
        }
    }
    pub fn at_most(name: &str, got: f64, max: f64) -> TargetCheck {
        TargetCheck {
            name: name.into(),
            want: format!("<= {max}"),
            got,
            passed: got <= max,
        }
    }
}

/// Everything a scenario produced.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub reports: Vec<Report>,
    pub targets: Vec<TargetCheck>,
    pub passed: bool,
    /// Anything else worth keeping in the JSON (e.g. a comparison).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Outcome {
    pub fn new(reports: Vec<Report>, targets: Vec<TargetCheck>) -> Outcome {
        let passed = targets.iter().all(|t| t.passed);
        Outcome {
            reports,
            targets,
            passed,
            extra: Default::default(),
        }
    }

    /// Print the reports and targets, write the JSON file; returns the exit code.
    pub fn finish(&self, json: Option<PathBuf>) -> anyhow::Result<i32> {
        for r in &self.reports {
            print!("{}", r.human());
        }
        for t in &self.targets {
            println!(
                "target {:<24} {:<12} got {:>12.3}  {}",
                t.name,
                t.want,
                t.got,
                if t.passed { "PASS" } else { "MISS" }
            );
        }
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self)?;
            std::fs::write(&path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(if self.passed { 0 } else { 1 })
    }
}

/// Run the scenario `name` with its flags.
pub fn run(name: &str, rest: &[String]) -> anyhow::Result<i32> {
    let args = Args::parse(rest, SWITCHES)?;
    match name {
        "http" => http::run(&args),
        "send" => send::run(&args),
        "chat" => chat::run(&args),
        "connections" => connections::run(&args),
        "connections-child" => connections::child(&args),
        "reconnect" => reconnect::run(&args),
        other => anyhow::bail!("unknown scenario `{other}`"),
    }
}
