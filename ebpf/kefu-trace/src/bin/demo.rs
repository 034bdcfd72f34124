//! `kefu-trace-demo N`: a stand-in for the gateway in the tracer's tests. It waits (bounded)
//! until a tracer switches its markers on, then emits N request records with every stage set in
//! order and prints `emitted N`. Commands on stdin: `sem` prints the semaphore, `quit` exits.

use std::io::BufRead;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kefu_trace_common::{
    KEFU_TRACE_SEMAPHORE, RequestRecord, Stage, emit, now_ns, route, trace_enabled, tracer_attached,
};

/// How long to wait for a tracer before giving up (tests attach within seconds).
const WAIT_FOR_TRACER_MAX: Duration = Duration::from_secs(60);

/// Longer than the tracer needs from opening the uprobe to enabling it.
const ATTACH_SETTLE: Duration = Duration::from_millis(200);

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!("ready {}", std::process::id());
    let deadline = Instant::now() + WAIT_FOR_TRACER_MAX;
    while !tracer_attached() {
        if Instant::now() > deadline {
            println!("no tracer");
            std::process::exit(2);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The kernel sets the semaphore when the uprobe is registered, a moment before the tracer
    // has attached its program to it: markers in that moment are not recorded. Wait it out.
    std::thread::sleep(ATTACH_SETTLE);
    let mut emitted = 0;
    for i in 1..=n {
        if !trace_enabled() {
            continue;
        }
        let mut rec = RequestRecord {
            request_id: i,
            connection_id: 1,
            conversation_id: 0x0001_0000_0000_0000 | i,
            fd: -1,
            shard: 1,
            route: route::MESSAGE_SEND,
            status: 201,
            ..Default::default()
        };
        for stage in Stage::ALL {
            rec.set(stage, now_ns());
        }
        emit(&rec);
        emitted += 1;
    }
    println!("emitted {emitted}");
    for line in std::io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("sem") => println!("sem {}", KEFU_TRACE_SEMAPHORE.load(Ordering::Relaxed)),
            Ok("quit") | Err(_) => break,
            Ok(_) => println!("?"),
        }
    }
}
