//! What the tracer's integration tests share: waiting for a known number of request traces.

use std::time::{Duration, Instant};

use kefu_trace::join::{Joiner, Trace};
use kefu_trace::probes::{Event, Tracer};
use kefu_trace_common::now_ns;

/// How long a test waits for the traces it expects.
pub const WAIT_MAX: Duration = Duration::from_secs(60);

/// Poll the tracer until `want` requests are finished (plus a settle period to catch extras).
pub fn collect(tracer: &mut Tracer, joiner: &mut Joiner, want: usize) -> Vec<Trace> {
    let deadline = Instant::now() + WAIT_MAX;
    let mut traces = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    let mut settle_until: Option<Instant> = None;
    loop {
        events.clear();
        tracer.poll(&mut events, 65_536);
        for e in events.drain(..) {
            joiner.push(e);
        }
        joiner.ready(now_ns(), &mut traces);
        if traces.len() >= want && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_millis(300));
        }
        if settle_until.is_some_and(|t| Instant::now() >= t) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    joiner.flush(&mut traces);
    traces
}
