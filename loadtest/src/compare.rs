//! Side-by-side ceiling check: run `wrk -t1` against the same target, interleaved round by round
//! with our generator (alternating which goes first), so both see the same machine load, and
//! report the throughput ratio.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub reference: String,
    pub generator_rps: Vec<f64>,
    pub reference_rps: Vec<f64>,
    pub generator_median_rps: f64,
    pub reference_median_rps: f64,
    /// generator median / reference median: >= 1 means we drive at least as much load.
    pub ratio: f64,
    /// CPU time (user + system) per successful request, medians: on a shared machine this is
    /// the steadier measure of the generator's own cost.
    pub generator_cpu_us_per_request: f64,
    pub reference_cpu_us_per_request: f64,
}

impl Comparison {
    pub fn human(&self) -> String {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "compare: generator rounds [{}] median {:.0} req/s; {} rounds [{}] median {:.0} req/s; ratio {:.3}\n\
             compare: CPU per request: generator {:.2} us, {} {:.2} us\n",
            fmt(&self.generator_rps),
            self.generator_median_rps,
            self.reference,
            fmt(&self.reference_rps),
            self.reference_median_rps,
            self.ratio,
            self.generator_cpu_us_per_request,
            self.reference,
            self.reference_cpu_us_per_request,
        )
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// CPU seconds (user + system) used so far by this process (`RUSAGE_SELF`) or its waited-for
/// children (`RUSAGE_CHILDREN`).
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Run `rounds` rounds of (generator, wrk); `generator` returns its successful req/s and count.
pub fn compare_wrk(
    url: &str,
    connections: usize,
    duration: Duration,
    rounds: usize,
    lua_script: Option<&Path>,
    mut generator: impl FnMut() -> anyhow::Result<(f64, u64)>,
) -> anyhow::Result<Comparison> {
    let mut gen_rps = Vec::with_capacity(rounds);
    let mut wrk_rps = Vec::with_capacity(rounds);
    let mut gen_cpu = Vec::with_capacity(rounds);
    let mut wrk_cpu = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Alternate who goes first, so a drift in machine load does not favour one side.
        let mut g = (0.0, 0);
        let mut w = (0.0, 0);
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
                g = generator().with_context(|| format!("generator, round {}", round + 1))?;
                gen_cpu.push((cpu_seconds(libc::RUSAGE_SELF) - cpu0) * 1e6 / g.1.max(1) as f64);
            } else {
                let cpu0 = cpu_seconds(libc::RUSAGE_CHILDREN);
                w = run_wrk(url, connections, duration, lua_script)
                    .with_context(|| format!("wrk, round {}", round + 1))?;
                wrk_cpu.push((cpu_seconds(libc::RUSAGE_CHILDREN) - cpu0) * 1e6 / w.1.max(1) as f64);
            }
        }
        eprintln!(
            "compare round {}: generator {:.0} req/s, wrk -t1 {:.0} req/s",
            round + 1,
            g.0,
            w.0
        );
        gen_rps.push(g.0);
        wrk_rps.push(w.0);
    }
    let gm = median(&gen_rps);
    let wm = median(&wrk_rps);
    Ok(Comparison {
        reference: "wrk -t1".to_string(),
        generator_rps: gen_rps,
        reference_rps: wrk_rps,
        generator_median_rps: gm,
        reference_median_rps: wm,
        ratio: if wm > 0.0 { gm / wm } else { f64::INFINITY },
        generator_cpu_us_per_request: median(&gen_cpu),
        reference_cpu_us_per_request: median(&wrk_cpu),
    })
}

/// One `wrk -t1 -c C -d D` run; returns its req/s and request count, counting only 2xx/3xx
/// responses.
pub fn run_wrk(
    url: &str,
    connections: usize,
    duration: Duration,
    lua_script: Option<&Path>,
) -> anyhow::Result<(f64, u64)> {
    let secs = duration.as_secs().max(1);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s")]);
    if let Some(s) = lua_script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .context("running wrk (install it with `apt-get install -y wrk`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text)
}

/// Requests/sec and good requests from wrk's summary, minus its non-2xx/3xx (wrk counts those
/// as requests; we count them as errors).
pub fn parse_wrk(text: &str) -> anyhow::Result<(f64, u64)> {
    let mut rps = None;
    let mut requests = None;
    let mut bad = 0u64;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            bad += v.trim().parse::<u64>().unwrap_or(0);
        } else if l.contains("requests in") {
            requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    let rps = rps.with_context(|| format!("no Requests/sec line in wrk output:\n{text}"))?;
    Ok(match requests {
        Some(n) if n > 0 => (
            rps * (n.saturating_sub(bad)) as f64 / n as f64,
            n.saturating_sub(bad),
        ),
        _ => (rps, 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_summary() {
        let out = "Running 3s test @ http://127.0.0.1:8080/\n  1 threads and 64 connections\n  \
                   390000 requests in 3.00s, 50.00MB read\n  Non-2xx or 3xx responses: 39000\n\
                   Requests/sec: 130000.00\nTransfer/sec:     16.67MB\n";
        let (r, n) = parse_wrk(out).unwrap();
        assert!((r - 117_000.0).abs() < 1.0, "{r}");
        assert_eq!(n, 351_000);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
