//! `kefu-trace-demo`: a stand-in for the gateway in the tracer's tests.
//!
//! - `kefu-trace-demo markers N`: waits (bounded) until a tracer switches the markers on, then
//!   emits N request records with every stage set in order and prints `emitted N`.
//! - `kefu-trace-demo serve`: a one-thread line server on 127.0.0.1:0 doing its socket reads,
//!   writes and a storage fsync per request through io_uring (like the gateway), stamping stages
//!   and emitting one marker per request. Prints `ready PID PORT`.
//!
//! Commands on stdin in both modes: `sem` prints the semaphore, `quit` exits.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use io_uring::{IoUring, opcode, types};
use kefu_trace_common::{
    KEFU_TRACE_SEMAPHORE, RequestRecord, Stage, emit, now_ns, route, trace_enabled, tracer_attached,
};

/// How long to wait for a tracer before giving up (tests attach within seconds).
const WAIT_FOR_TRACER_MAX: Duration = Duration::from_secs(60);
/// Longer than the tracer needs from opening the uprobe to enabling it: the kernel sets the
/// semaphore when the uprobe is registered, a moment before the program is attached to it.
const ATTACH_SETTLE: Duration = Duration::from_millis(200);
/// Longest request line the server accepts.
const LINE_BYTES_MAX: usize = 4096;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("markers") => {
            let n: u64 = args
                .next()
                .context("markers N")?
                .parse()
                .context("N must be a number")?;
            println!("ready {}", std::process::id());
            // Markers run beside the stdin loop so `sem` can be asked before a tracer attaches.
            std::thread::spawn(move || {
                if let Err(e) = markers(n) {
                    eprintln!("demo markers: {e:#}");
                    std::process::exit(2);
                }
            });
        }
        Some("serve") => {
            let listener = TcpListener::bind("127.0.0.1:0").context("binding")?;
            let port = listener.local_addr()?.port();
            std::thread::spawn(move || {
                if let Err(e) = serve(listener) {
                    eprintln!("demo server: {e:#}");
                    std::process::exit(3);
                }
            });
            println!("ready {} {port}", std::process::id());
        }
        _ => bail!("usage: kefu-trace-demo (markers N | serve)"),
    }
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("sem") => println!("sem {}", KEFU_TRACE_SEMAPHORE.load(Ordering::Relaxed)),
            Ok("quit") | Err(_) => break,
            Ok(_) => println!("?"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

fn markers(n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT_FOR_TRACER_MAX;
    while !tracer_attached() {
        if Instant::now() > deadline {
            bail!("no tracer attached within {WAIT_FOR_TRACER_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
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
    std::io::stdout().flush()?;
    Ok(())
}

/// Submit one SQE and wait for its completion; returns the CQE result.
fn one_op(ring: &mut IoUring, sqe: io_uring::squeue::Entry) -> anyhow::Result<i32> {
    // SAFETY: every buffer an SQE points at outlives this call, which waits for the completion.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow::anyhow!("SQ full"))?;
    ring.submit_and_wait(1).context("io_uring_enter")?;
    let cqe = ring.completion().next().context("no completion")?;
    Ok(cqe.result())
}

fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let mut ring = IoUring::new(8).context("io_uring_setup")?;
    let log_path = std::env::temp_dir().join(format!("kefu-trace-demo-{}.log", std::process::id()));
    let mut log = std::fs::File::create(&log_path).context("creating the demo log")?;
    let _ = std::fs::remove_file(&log_path);
    let mut request_id = 0u64;
    let mut connection_id = 0u64;
    for stream in listener.incoming() {
        let stream = stream.context("accept")?;
        connection_id += 1;
        let fd = stream.as_raw_fd();
        let local_port = stream.local_addr()?.port();
        let peer_port = stream.peer_addr()?.port();
        let mut buf = vec![0u8; LINE_BYTES_MAX];
        loop {
            let n = one_op(
                &mut ring,
                opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build(),
            )?;
            if n <= 0 {
                break;
            }
            request_id += 1;
            let traced = trace_enabled();
            let mut rec = RequestRecord::default();
            if traced {
                rec.request_id = request_id;
                rec.connection_id = connection_id;
                rec.fd = fd;
                rec.local_port = local_port;
                rec.peer_port = peer_port;
                rec.route = route::MESSAGE_SEND;
                rec.conversation_id = 0x0002_0000_0000_0000 | connection_id;
                rec.set(Stage::Accepted, now_ns());
            }
            let line = &buf[..n as usize];
            let complete = line.ends_with(b"\n");
            if traced {
                rec.set(Stage::Parsed, now_ns());
                rec.set(Stage::RoutedToShard, now_ns());
            }
            log.write_all(line).context("appending to the demo log")?;
            if traced {
                rec.set(Stage::Appended, now_ns());
            }
            let synced = one_op(
                &mut ring,
                opcode::Fsync::new(types::Fd(log.as_raw_fd())).build(),
            )?;
            if synced < 0 {
                bail!("fsync failed: {synced}");
            }
            if traced {
                rec.set(Stage::Synced, now_ns());
                rec.set(Stage::Delivered, now_ns());
            }
            let reply: &[u8] = if complete { b"ok\n" } else { b"partial\n" };
            let sent = one_op(
                &mut ring,
                opcode::Send::new(types::Fd(fd), reply.as_ptr(), reply.len() as u32).build(),
            )?;
            if traced {
                rec.status = if sent == reply.len() as i32 { 200 } else { 500 };
                rec.set(Stage::Answered, now_ns());
                emit(&rec);
            }
        }
    }
    Ok(())
}
