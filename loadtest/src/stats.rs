//! What a run measured: latency histograms (HdrHistogram, microseconds), error counts by kind,
//! and the report built from them (human table and JSON).
//!
//! Each generator thread owns its own histogram and counters; they are merged once at the end,
//! so recording costs no cross-core traffic.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Largest latency the histograms hold; larger values are clamped (and show as this max).
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Three significant figures: 0.1% resolution at any magnitude.
const SIGFIG: u8 = 3;

/// The histogram type every series uses: microseconds.
pub type Histogram = hdrhistogram::Histogram<u64>;

pub fn new_histogram() -> Histogram {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGFIG)
        .expect("static histogram bounds are valid")
}

/// Record a latency, clamped into the histogram's range.
pub fn record(hist: &mut Histogram, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    hist.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

/// Why a request did not count as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The TCP connect (or the WebSocket handshake) failed.
    Connect,
    /// No complete response within the request timeout.
    Timeout,
    /// 429: the server's rate limit refused the request.
    Status429,
    /// A 4xx status other than 429.
    Status4xx,
    /// A 5xx status.
    Status5xx,
    /// A 1xx/2xx/3xx status other than the expected one.
    StatusUnexpected,
    /// The peer closed or reset the connection before the response was complete.
    Closed,
    /// The response was not valid HTTP (or WebSocket) framing.
    Parse,
    /// Any other socket error.
    Io,
    /// A scenario check failed (missing, duplicate or out-of-order message).
    Check,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Status429,
        ErrorKind::Status4xx,
        ErrorKind::Status5xx,
        ErrorKind::StatusUnexpected,
        ErrorKind::Closed,
        ErrorKind::Parse,
        ErrorKind::Io,
        ErrorKind::Check,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status429 => "status_429",
            ErrorKind::Status4xx => "status_4xx",
            ErrorKind::Status5xx => "status_5xx",
            ErrorKind::StatusUnexpected => "status_unexpected",
            ErrorKind::Closed => "closed",
            ErrorKind::Parse => "parse",
            ErrorKind::Io => "io",
            ErrorKind::Check => "check",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Classify a socket error: a reset or broken pipe is the peer closing on us.
    pub fn from_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                ErrorKind::Closed
            }
            K::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Io,
        }
    }

    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            429 => ErrorKind::Status429,
            400..=499 => ErrorKind::Status4xx,
            500..=599 => ErrorKind::Status5xx,
            _ => ErrorKind::StatusUnexpected,
        }
    }
}

/// Error counts indexed by `ErrorKind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts(pub [u64; ErrorKind::ALL.len()]);

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        self.0[kind.index()] += 1;
    }
    pub fn get(&self, kind: ErrorKind) -> u64 {
        self.0[kind.index()]
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    pub fn merge(&mut self, other: &ErrorCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        ErrorKind::ALL
            .iter()
            .filter(|k| self.get(**k) > 0)
            .map(|k| (k.name().to_string(), self.get(*k).into()))
            .collect()
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn of(hist: &Histogram) -> LatencySummary {
        if hist.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: hist.len(),
            p50_us: hist.value_at_quantile(0.50),
            p90_us: hist.value_at_quantile(0.90),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            mean_us: hist.mean(),
        }
    }
}

/// One named latency series of a report (a scenario may have several, e.g. both chat directions).
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub latency: LatencySummary,
}

impl Series {
    /// The series `name` summarising `hist`.
    pub fn of(name: &str, hist: &Histogram) -> Series {
        Series {
            name: name.into(),
            latency: LatencySummary::of(hist),
        }
    }
}

/// The result of one run, printed as a table and written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// `closed` or `open`.
    pub mode: String,
    pub target: String,
    pub threads: usize,
    pub connections: usize,
    /// Open loop only: the requested total rate.
    pub rate_per_s: Option<f64>,
    pub elapsed_s: f64,
    /// Successful requests (or messages).
    pub ok: u64,
    pub errors_total: u64,
    pub errors: serde_json::Map<String, serde_json::Value>,
    /// Successful requests per second of elapsed time.
    pub rps: f64,
    pub series: Vec<Series>,
    /// Scenario-specific figures (connect rate, memory per connection, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// The first latency series (the one targets apply to).
    pub fn latency(&self) -> LatencySummary {
        self.series.first().map(|s| s.latency).unwrap_or_default()
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let rate = match self.rate_per_s {
            Some(r) => format!(", target rate {r:.0}/s"),
            None => String::new(),
        };
        let mode = match self.mode.as_str() {
            "closed" => "closed loop",
            "open" => "open loop",
            other => other,
        };
        let _ = writeln!(
            s,
            "scenario {} ({mode}{rate}) -> {}, {} threads, {} connections, {:.2} s",
            self.scenario, self.target, self.threads, self.connections, self.elapsed_s
        );
        let _ = writeln!(
            s,
            "  {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "mean", "count"
        );
        for series in &self.series {
            let l = &series.latency;
            let ms = |us: u64| us as f64 / 1000.0;
            let _ = writeln!(
                s,
                "  {:<18} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10}",
                series.name,
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                l.mean_us / 1000.0,
                l.count
            );
        }
        let _ = writeln!(
            s,
            "  throughput         {:.0} ok/s ({} ok)",
            self.rps, self.ok
        );
        if self.errors_total == 0 {
            let _ = writeln!(s, "  errors             0");
        } else {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(
                s,
                "  errors             {} ({})",
                self.errors_total,
                kinds.join(" ")
            );
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "  {k:<18} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_errors() {
        let mut h = new_histogram();
        for ms in 1..=100u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        record(&mut h, Duration::from_secs(1000));
        let l = LatencySummary::of(&h);
        assert_eq!(l.count, 101);
        assert!((49_000..=51_500).contains(&l.p50_us), "{l:?}");
        assert!(
            l.max_us >= LATENCY_US_MAX * 999 / 1000,
            "clamped to the max: {l:?}"
        );
        let mut e = ErrorCounts::default();
        e.add(ErrorKind::Closed);
        e.add(ErrorKind::from_status(503));
        assert_eq!(e.total(), 2);
        assert_eq!(e.to_map().len(), 2);
        assert_eq!(ErrorKind::from_status(404), ErrorKind::Status4xx);
        assert_eq!(ErrorKind::from_status(429), ErrorKind::Status429);
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
