//! What SREs see: JSON lines (one per request), a Chrome trace event file (opens in Perfetto and
//! chrome://tracing), and a live terminal view with per-stage percentiles, the slowest requests
//! and every drop counter. Plus the filters that choose which requests are shown.

use std::collections::VecDeque;
use std::io::Write;

use kefu_trace_common::{STAGE_COUNT, Stage, event_kind, route};
use serde_json::{Value, json};

use crate::join::{JoinDrops, Trace, opcode, span};
use crate::probes::Counters;

/// `"c"` + 16 lowercase hex digits, the conversation id's string form.
pub fn conversation_str(id: u64) -> String {
    format!("c{id:016x}")
}

/// Parse a conversation id as `c<16 hex>` or a plain decimal number.
pub fn parse_conversation(s: &str) -> Option<u64> {
    match s.strip_prefix('c') {
        Some(hex) if hex.len() == 16 => u64::from_str_radix(hex, 16).ok(),
        _ => s.parse().ok(),
    }
}

/// Parse a route as a name from [`kefu_trace_common::route`] or its number.
pub fn parse_route(s: &str) -> Option<u16> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    (0..=u16::from(u8::MAX)).find(|&id| route::name(id) == s && id != route::UNKNOWN)
}

fn tcp_state(state: i32) -> &'static str {
    const NAMES: [&str; 13] = [
        "?",
        "established",
        "syn_sent",
        "syn_recv",
        "fin_wait1",
        "fin_wait2",
        "time_wait",
        "close",
        "close_wait",
        "last_ack",
        "listen",
        "closing",
        "new_syn_recv",
    ];
    usize::try_from(state)
        .ok()
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("?")
}

/// Which requests to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub conversation: Option<u64>,
    pub route: Option<u16>,
    pub min_latency_ns: u64,
}

impl Filter {
    pub fn matches(&self, t: &Trace) -> bool {
        self.conversation
            .is_none_or(|c| t.record.conversation_id == c)
            && self.route.is_none_or(|r| t.record.route == r)
            && t.total_ns() >= self.min_latency_ns
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// One request as a JSON object: ids, stages (µs since `accepted`), per-stage durations, and
/// the joined kernel events (µs relative to the request's start).
pub fn trace_json(t: &Trace) -> Value {
    let r = &t.record;
    let (start, _) = span(r, t.marker_ns);
    let rel = |ns: u64| (i128::from(ns) - i128::from(start)) as f64 / 1000.0;
    let mut stages = serde_json::Map::new();
    let mut durations = serde_json::Map::new();
    let d = t.stage_durations();
    for stage in Stage::ALL {
        if let Some(ns) = r.get(stage) {
            stages.insert(stage.name().into(), json!(rel(ns)));
            if let Some(dur) = d[stage as usize] {
                durations.insert(stage.name().into(), json!(us(dur)));
            }
        }
    }
    let io: Vec<Value> =
        t.io.iter()
            .map(|e| {
                json!({
                    "op": opcode::name(e.opcode),
                    "fd": e.fd,
                    "res": e.res,
                    "submit_us": rel(e.submit_ns),
                    "complete_us": rel(e.header.ktime_ns),
                    "latency_us": us(e.header.ktime_ns.saturating_sub(e.submit_ns)),
                    "tid": e.header.tid,
                })
            })
            .collect();
    let tcp: Vec<Value> = t
        .tcp
        .iter()
        .map(|e| {
            let kind = if e.header.kind == event_kind::TCP_RETRANSMIT {
                "retransmit"
            } else {
                "state"
            };
            json!({
                "event": kind,
                "at_us": rel(e.header.ktime_ns),
                "old_state": tcp_state(e.old_state),
                "new_state": tcp_state(e.new_state),
                "local_port": e.local_port,
                "remote_port": e.remote_port,
            })
        })
        .collect();
    json!({
        "request_id": r.request_id,
        "pid": t.tgid,
        "tid": t.tid,
        "connection_id": r.connection_id,
        "fd": r.fd,
        "shard": r.shard,
        "route": route::name(r.route),
        "route_id": r.route,
        "status": r.status,
        "conversation_id": if r.conversation_id == 0 { Value::Null } else { json!(conversation_str(r.conversation_id)) },
        "local_port": r.local_port,
        "peer_port": r.peer_port,
        "start_ns": start,
        "total_us": us(t.total_ns()),
        "stages_us": stages,
        "stage_durations_us": durations,
        "io_uring": io,
        "tcp": tcp,
    })
}

/// Collects traces into a Chrome trace event file: one track per gateway thread with a slice
/// per request and nested slices per stage, and one track per connection with its io_uring
/// operations and TCP events.
pub struct ChromeTrace {
    events: Vec<Value>,
    traces_max: usize,
    traces: usize,
    /// Traces not written because `traces_max` was reached.
    pub skipped: u64,
    named_tracks: std::collections::HashSet<(u32, u64)>,
}

/// Connection tracks get tids above this so they never collide with thread ids.
const CONN_TRACK_BASE: u64 = 1 << 32;

impl ChromeTrace {
    pub fn new(traces_max: usize) -> Self {
        Self {
            events: Vec::new(),
            traces_max,
            traces: 0,
            skipped: 0,
            named_tracks: Default::default(),
        }
    }

    fn name_track(&mut self, pid: u32, tid: u64, name: String) {
        if self.named_tracks.insert((pid, tid)) {
            self.events.push(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}));
        }
    }

    pub fn add(&mut self, t: &Trace) {
        if self.traces >= self.traces_max {
            self.skipped += 1;
            return;
        }
        self.traces += 1;
        let r = &t.record;
        let pid = t.tgid;
        let tid = u64::from(t.tid);
        self.name_track(pid, tid, format!("gateway thread {}", t.tid));
        let (start, end) = span(r, t.marker_ns);
        let label = format!("{} #{}", route::name(r.route), r.request_id);
        self.events.push(json!({
            "ph": "X", "name": label, "cat": "request", "pid": pid, "tid": tid,
            "ts": us(start), "dur": us(end - start),
            "args": trace_json(t),
        }));
        let mut prev: Option<u64> = None;
        for stage in Stage::ALL {
            if let Some(ns) = r.get(stage) {
                if let Some(p) = prev {
                    self.events.push(json!({
                        "ph": "X", "name": stage.name(), "cat": "stage", "pid": pid, "tid": tid,
                        "ts": us(p), "dur": us(ns.saturating_sub(p)),
                    }));
                }
                prev = Some(ns);
            }
        }
        let conn_tid = CONN_TRACK_BASE + u64::from(r.fd.max(0) as u32);
        self.name_track(pid, conn_tid, format!("fd {}", r.fd));
        for e in &t.io {
            let track = if e.fd == r.fd {
                conn_tid
            } else {
                CONN_TRACK_BASE + u64::from(e.fd.max(0) as u32)
            };
            self.name_track(pid, track, format!("fd {}", e.fd));
            self.events.push(json!({
                "ph": "X", "name": opcode::name(e.opcode), "cat": "io_uring", "pid": pid, "tid": track,
                "ts": us(e.submit_ns), "dur": us(e.header.ktime_ns.saturating_sub(e.submit_ns)),
                "args": {"res": e.res, "request_id": r.request_id},
            }));
        }
        for e in &t.tcp {
            let name = if e.header.kind == event_kind::TCP_RETRANSMIT {
                "tcp retransmit".to_string()
            } else {
                format!(
                    "tcp {} -> {}",
                    tcp_state(e.old_state),
                    tcp_state(e.new_state)
                )
            };
            self.events.push(json!({
                "ph": "i", "s": "t", "name": name, "cat": "tcp", "pid": pid, "tid": conn_tid,
                "ts": us(e.header.ktime_ns),
            }));
        }
    }

    pub fn write_to(&self, w: &mut impl Write, drops: Value) -> std::io::Result<()> {
        let doc = json!({
            "traceEvents": self.events,
            "displayTimeUnit": "ms",
            "otherData": {"producer": "kefu-trace", "clock": "CLOCK_MONOTONIC", "drops": drops},
        });
        serde_json::to_writer(&mut *w, &doc)?;
        w.flush()
    }
}

/// All drop counters in one JSON object (shown everywhere; drops are never hidden).
pub fn drops_json(c: &Counters, j: &JoinDrops, chrome_skipped: u64) -> Value {
    json!({
        "ringbuf_drops": c.ringbuf_drops,
        "record_read_errors": c.record_read_errors,
        "io_uring_inflight_full": c.inflight_full,
        "join_kernel_events_evicted": j.kernel_events_evicted,
        "join_requests_rushed": j.requests_rushed,
        "chrome_trace_skipped": chrome_skipped,
    })
}

/// Rows of the live view: every stage after `accepted`, then the total.
const ROWS: usize = STAGE_COUNT;
/// Latencies above this (ns) are clamped: a minute is far beyond any request.
const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// One second of the live view's window: a histogram per row and the count of requests.
struct Slot {
    second: u64,
    rows: Vec<hdrhistogram::Histogram<u64>>,
}

impl Slot {
    fn new(second: u64) -> Slot {
        let rows = (0..ROWS)
            .map(|_| {
                hdrhistogram::Histogram::new_with_bounds(1, LATENCY_NS_MAX, 2)
                    .expect("constant histogram bounds are valid")
            })
            .collect();
        Slot { second, rows }
    }
}

/// The live terminal view: per-stage p50/p99/max over the last `window_s` seconds (one HDR
/// histogram per stage per second, so each request costs a few counter increments and the
/// screen a merge of `window_s` histograms), the slowest requests with their breakdown, and the
/// drop counters.
pub struct LiveView {
    window_s: u64,
    slots: VecDeque<Slot>,
    slowest: Vec<Trace>,
    top: usize,
    seen: u64,
}

impl LiveView {
    pub fn new(window_s: u64, top: usize) -> Self {
        assert!(window_s > 0);
        Self {
            window_s,
            slots: VecDeque::new(),
            slowest: Vec::new(),
            top,
            seen: 0,
        }
    }

    pub fn add(&mut self, t: &Trace) {
        self.seen += 1;
        let second = t.marker_ns / 1_000_000_000;
        if self.slots.back().is_none_or(|s| s.second < second) {
            self.slots.push_back(Slot::new(second));
            while self.slots.len() as u64 > self.window_s {
                self.slots.pop_front();
            }
        }
        // Marker times from several CPUs can be slightly out of order: a late one goes into the
        // newest slot, which is at most a second off.
        let slot = self.slots.back_mut().expect("pushed above");
        let d = t.stage_durations();
        for (row, stage) in Stage::ALL.iter().skip(1).enumerate() {
            if let Some(ns) = d[*stage as usize] {
                let _ = slot.rows[row].record(ns.clamp(1, LATENCY_NS_MAX));
            }
        }
        let _ = slot.rows[ROWS - 1].record(t.total_ns().clamp(1, LATENCY_NS_MAX));
        let total = t.total_ns();
        let slower_than_shown = self.slowest.len() < self.top
            || self.slowest.last().is_some_and(|s| s.total_ns() < total);
        if slower_than_shown {
            self.slowest.push(t.clone());
            self.slowest
                .sort_by_key(|t| std::cmp::Reverse(t.total_ns()));
            self.slowest.truncate(self.top);
        }
    }

    fn expire(&mut self, now_ns: u64) {
        let now_s = now_ns / 1_000_000_000;
        let horizon_s = now_s.saturating_sub(self.window_s - 1);
        while self.slots.front().is_some_and(|s| s.second < horizon_s) {
            self.slots.pop_front();
        }
        let horizon_ns = horizon_s * 1_000_000_000;
        self.slowest.retain(|t| t.marker_ns >= horizon_ns);
    }

    /// The screen as text (the caller clears the terminal and prints it).
    pub fn render(
        &mut self,
        now_ns: u64,
        target: Option<u32>,
        counters: &Counters,
        drops: &JoinDrops,
    ) -> String {
        use std::fmt::Write as _;
        self.expire(now_ns);
        let mut merged: Vec<hdrhistogram::Histogram<u64>> = Slot::new(0).rows;
        for slot in &self.slots {
            for (m, h) in merged.iter_mut().zip(&slot.rows) {
                let _ = m.add(h);
            }
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "kefu-trace  pid {}  requests in window {} (total seen {})  window {} s",
            target.map_or("-".to_string(), |p| p.to_string()),
            merged[ROWS - 1].len(),
            self.seen,
            self.window_s
        );
        let _ = writeln!(
            s,
            "\n{:<16} {:>10} {:>10} {:>10} {:>8}",
            "stage (µs)", "p50", "p99", "max", "count"
        );
        let names = Stage::ALL
            .iter()
            .skip(1)
            .map(|st| st.name())
            .chain(["total"]);
        for (name, h) in names.zip(&merged) {
            let (p50, p99, max) = if h.is_empty() {
                (0, 0, 0)
            } else {
                (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
            };
            let _ = writeln!(
                s,
                "{:<16} {:>10.1} {:>10.1} {:>10.1} {:>8}",
                name,
                us(p50),
                us(p99),
                us(max),
                h.len()
            );
        }
        let _ = writeln!(s, "\nslowest requests (µs from previous stage):");
        for t in &self.slowest {
            let d = t.stage_durations();
            let parts: Vec<String> = Stage::ALL
                .iter()
                .filter_map(|st| d[*st as usize].map(|ns| format!("{}={:.0}", st.name(), us(ns))))
                .collect();
            let _ = writeln!(
                s,
                "  #{:<10} {:<20} {:>9.1} µs  fd {:<5} io {:<3} tcp {:<2} {}",
                t.record.request_id,
                route::name(t.record.route),
                us(t.total_ns()),
                t.record.fd,
                t.io.len(),
                t.tcp.len(),
                parts.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "\ndrops: ringbuf {}  record-read-errors {}  io_uring-inflight-full {}  join-evicted {}  join-rushed {}",
            counters.ringbuf_drops,
            counters.record_read_errors,
            counters.inflight_full,
            drops.kernel_events_evicted,
            drops.requests_rushed
        );
        let _ = writeln!(
            s,
            "probe hits: markers {}  io_uring {}  tcp {}",
            counters.marker_hits, counters.io_uring_events, counters.tcp_events
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kefu_trace_common::{IoUringEvent, RequestRecord};

    fn trace(id: u64, total_us: u64) -> Trace {
        let mut record = RequestRecord {
            request_id: id,
            fd: 9,
            route: route::MESSAGE_SEND,
            conversation_id: 0xabc,
            ..Default::default()
        };
        record.set(Stage::Accepted, 1_000_000);
        record.set(Stage::Parsed, 1_000_000 + 1_000);
        record.set(Stage::Answered, 1_000_000 + total_us * 1000);
        Trace {
            tgid: 1,
            tid: 2,
            marker_ns: 1_000_000 + total_us * 1000,
            record,
            io: vec![IoUringEvent {
                fd: 9,
                opcode: 26,
                submit_ns: 1_000_500,
                ..Default::default()
            }],
            tcp: vec![],
        }
    }

    #[test]
    fn json_has_stages_durations_and_io() {
        let v = trace_json(&trace(3, 50));
        assert_eq!(v["route"], "message_send");
        assert_eq!(v["conversation_id"], "c0000000000000abc");
        assert_eq!(v["stages_us"]["parsed"], 1.0);
        assert_eq!(v["stage_durations_us"]["answered"], 49.0);
        assert_eq!(v["io_uring"][0]["op"], "send");
        assert_eq!(v["total_us"], 50.0);
    }

    #[test]
    fn filters_and_parsers() {
        assert_eq!(parse_conversation("c0000000000000abc"), Some(0xabc));
        assert_eq!(parse_conversation("12"), Some(12));
        assert_eq!(parse_route("message_send"), Some(route::MESSAGE_SEND));
        assert_eq!(parse_route("7"), Some(7));
        assert_eq!(parse_route("nope"), None);
        let f = Filter {
            min_latency_ns: 100_000,
            ..Default::default()
        };
        assert!(!f.matches(&trace(1, 50)));
        assert!(f.matches(&trace(1, 150)));
        let f = Filter {
            conversation: Some(1),
            ..Default::default()
        };
        assert!(!f.matches(&trace(1, 50)));
    }

    #[test]
    fn chrome_trace_is_valid_json_with_slices() {
        let mut c = ChromeTrace::new(1);
        c.add(&trace(1, 50));
        c.add(&trace(2, 60));
        assert_eq!(c.skipped, 1);
        let mut buf = Vec::new();
        c.write_to(&mut buf, json!({})).unwrap();
        let v: Value = serde_json::from_slice(&buf).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        assert!(
            events
                .iter()
                .any(|e| e["cat"] == "request" && e["dur"] == 50.0)
        );
        assert!(
            events
                .iter()
                .any(|e| e["cat"] == "stage" && e["name"] == "parsed")
        );
        assert!(
            events
                .iter()
                .any(|e| e["cat"] == "io_uring" && e["name"] == "send")
        );
    }

    #[test]
    fn live_view_shows_percentiles_slowest_and_drops() {
        let mut v = LiveView::new(10, 2);
        for i in 0..10 {
            v.add(&trace(i, 10 + i * 10));
        }
        let text = v.render(
            2_000_000,
            Some(5),
            &Counters {
                ringbuf_drops: 4,
                ..Default::default()
            },
            &JoinDrops::default(),
        );
        assert!(text.contains("ringbuf 4"), "{text}");
        assert!(text.contains("#9"), "{text}");
        assert!(text.contains("total"), "{text}");
    }
}
