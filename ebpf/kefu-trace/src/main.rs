//! `kefu-trace`: attach kefu's eBPF probes to a gateway and show each request's path.
//!
//! ```text
//! kefu-trace --pid PID [--binary PATH] [--duration-s N] [--json] [--chrome-trace FILE]
//!            [--conversation ID] [--route NAME|ID] [--min-latency-us N] [--sample RATE]
//!            [--markers-only] [--window-s N] [--top N] [--max-requests N]
//! kefu-trace --binary PATH ...   # every process of that binary, also ones started later
//! ```
//! Without `--json` it shows the live view on stderr once a second. Ctrl-C, SIGTERM,
//! `--duration-s` or `--max-requests` end it; the probes are detached (markers off again) and
//! the Chrome trace written on the way out.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kefu_trace::join::{JoinConfig, Joiner, Trace};
use kefu_trace::output::{
    ChromeTrace, Filter, LiveView, drops_json, parse_conversation, parse_route, trace_json,
};
use kefu_trace::probes::{Event, TraceTarget, Tracer};
use kefu_trace::procfs;
use kefu_trace_common::now_ns;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Limits of one run.
const CHROME_TRACES_MAX: usize = 200_000;
const POLL_EVENTS_MAX: usize = 65_536;
/// The probes submit without wakeups, so the ring buffer is polled on this period.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

#[derive(Debug)]
struct Args {
    target: TraceTarget,
    duration: Option<Duration>,
    json: bool,
    chrome_trace: Option<PathBuf>,
    filter: Filter,
    window_s: u64,
    top: usize,
    max_requests: Option<u64>,
}

const USAGE: &str =
    "usage: kefu-trace (--pid PID [--binary PATH] | --binary PATH) [--duration-s N] [--json]
       [--chrome-trace FILE] [--conversation ID] [--route NAME|ID] [--min-latency-us N]
       [--sample RATE (0 < RATE <= 1, e.g. 0.1)] [--markers-only (no io_uring events: cheaper)]
       [--window-s N] [--top N] [--max-requests N]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        target: TraceTarget::default(),
        duration: None,
        json: false,
        chrome_trace: None,
        filter: Filter::default(),
        window_s: 10,
        top: 5,
        max_requests: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--pid" => args.target.pid = Some(value("--pid")?.parse().context("--pid")?),
            "--binary" => args.target.binary = Some(PathBuf::from(value("--binary")?)),
            "--duration-s" => {
                args.duration = Some(Duration::from_secs(
                    value("--duration-s")?.parse().context("--duration-s")?,
                ))
            }
            "--json" => args.json = true,
            "--markers-only" => args.target.markers_only = true,
            "--chrome-trace" => args.chrome_trace = Some(PathBuf::from(value("--chrome-trace")?)),
            "--conversation" => {
                let v = value("--conversation")?;
                args.filter.conversation = Some(parse_conversation(&v).with_context(|| {
                    format!("--conversation: `{v}` is not c<16 hex> or a number")
                })?);
            }
            "--route" => {
                let v = value("--route")?;
                args.filter.route =
                    Some(parse_route(&v).with_context(|| format!("--route: unknown route `{v}`"))?);
            }
            "--min-latency-us" => {
                let us: u64 = value("--min-latency-us")?
                    .parse()
                    .context("--min-latency-us")?;
                args.filter.min_latency_ns = us.saturating_mul(1000);
            }
            "--sample" => {
                let rate: f64 = value("--sample")?.parse().context("--sample")?;
                if !(rate > 0.0 && rate <= 1.0) {
                    bail!("--sample must be in (0, 1]");
                }
                args.target.sample_every = (1.0 / rate).round() as u32;
            }
            "--window-s" => args.window_s = value("--window-s")?.parse().context("--window-s")?,
            "--top" => args.top = value("--top")?.parse().context("--top")?,
            "--max-requests" => {
                args.max_requests =
                    Some(value("--max-requests")?.parse().context("--max-requests")?)
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if args.target.pid.is_none() && args.target.binary.is_none() {
        bail!("give --pid or --binary\n{USAGE}");
    }
    if args.window_s == 0 || args.window_s > 3600 {
        bail!("--window-s must be between 1 and 3600");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            // A usage error: the message and the usage, exit 2; no backtrace, which anyhow
            // prints after `main` returns an error when RUST_BACKTRACE is set.
            eprintln!("kefu-trace: {e:#}");
            std::process::exit(2);
        }
    };
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut tracer = Tracer::attach(&args.target).context("attaching the probes")?;
    eprintln!(
        "kefu-trace: attached to {} (pid {}); markers on{}",
        args.target
            .binary
            .as_ref()
            .map_or_else(|| "the gateway".to_string(), |b| b.display().to_string()),
        tracer
            .target_tgid()
            .map_or("not yet running".to_string(), |p| p.to_string()),
        if args.target.sample_every > 1 {
            format!(", sampling 1 in {}", args.target.sample_every)
        } else {
            String::new()
        }
    );
    let result = run(&args, &mut tracer);
    tracer.detach();
    eprintln!("kefu-trace: detached; markers off");
    result
}

fn run(args: &Args, tracer: &mut Tracer) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut joiner = Joiner::new(JoinConfig::default());
    let mut chrome = args
        .chrome_trace
        .as_ref()
        .map(|_| ChromeTrace::new(CHROME_TRACES_MAX));
    let mut live = LiveView::new(args.window_s, args.top);
    let live_enabled = !args.json;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut events: Vec<Event> = Vec::new();
    let mut traces: Vec<Trace> = Vec::new();
    let mut shown: u64 = 0;
    let mut last_tick = Instant::now();
    loop {
        let target_gone = args.target.pid.is_some_and(|pid| !procfs::alive(pid));
        if target_gone {
            eprintln!("kefu-trace: the traced process exited");
        }
        let stop = STOP.load(Ordering::Relaxed)
            || target_gone
            || args.duration.is_some_and(|d| started.elapsed() >= d)
            || args.max_requests.is_some_and(|m| shown >= m);
        events.clear();
        tracer.poll(&mut events, POLL_EVENTS_MAX);
        let busy = !events.is_empty();
        for e in events.drain(..) {
            joiner.push(e);
        }
        traces.clear();
        if stop {
            // Let late kernel events of the last requests arrive, then finish everything.
            std::thread::sleep(Duration::from_millis(30));
            tracer.poll(&mut events, POLL_EVENTS_MAX);
            for e in events.drain(..) {
                joiner.push(e);
            }
            joiner.flush(&mut traces);
        } else {
            joiner.ready(now_ns(), &mut traces);
        }
        for t in &traces {
            if !args.filter.matches(t) || args.max_requests.is_some_and(|m| shown >= m) {
                continue;
            }
            shown += 1;
            if args.json {
                serde_json::to_writer(&mut out, &trace_json(t))?;
                out.write_all(b"\n")?;
            }
            if let Some(c) = chrome.as_mut() {
                c.add(t);
            }
            if live_enabled {
                live.add(t);
            }
        }
        if !traces.is_empty() {
            out.flush()?;
        }
        if last_tick.elapsed() >= Duration::from_secs(1) || stop {
            last_tick = Instant::now();
            tracer.refresh()?;
            let counters = tracer.counters()?;
            if live_enabled {
                let screen =
                    live.render(now_ns(), tracer.target_tgid(), &counters, &joiner.drops());
                eprint!("\x1b[2J\x1b[H{screen}");
            }
        }
        if stop {
            break;
        }
        if !busy {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
    let counters = tracer.counters()?;
    let skipped = chrome.as_ref().map_or(0, |c| c.skipped);
    let drops = drops_json(&counters, &joiner.drops(), skipped);
    if let (Some(c), Some(path)) = (chrome.as_ref(), args.chrome_trace.as_ref()) {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        c.write_to(&mut std::io::BufWriter::new(file), drops.clone())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // The summary goes to stderr so stdout stays pure JSON lines.
    eprintln!(
        "kefu-trace: {shown} requests shown, {} marker hits; drops {drops}",
        counters.marker_hits
    );
    Ok(())
}
