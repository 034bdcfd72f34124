//! Crash test (sled's `test_crash_recovery` pattern): this binary re-runs itself as a child
//! that appends and acknowledges records as fast as it can, SIGKILLs it at a random moment,
//! reopens the log and checks that every acknowledged record is there, intact, and that no
//! partial record is visible. Repeated many times on one log, alternating `always` (acked
//! after a group-commit sync) and `never` (acked when append returns: a process crash keeps
//! the page cache).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::payload;
use kefu_protocol::frame::{Header, Kind};
use kefu_storage::{Durability, Log, LogConfig};

const CHILD_DIR_VAR: &str = "KEFU_STORAGE_CRASH_CHILD_DIR";
const CHILD_MODE_VAR: &str = "KEFU_STORAGE_CRASH_CHILD_MODE";
const ITERATIONS: u32 = 100;
/// Wall-clock bound for the whole test on a slow shared machine; it reports how many
/// iterations ran and fails if too few did.
const TIME_BUDGET: Duration = Duration::from_secs(40);
const ITERATIONS_MIN: u32 = 20;
/// Records one child appends at most, so a child that is never killed still stops.
const CHILD_RECORDS_MAX: u64 = 200_000;
const CONVERSATIONS: u64 = 8;

fn cfg(dir: &Path, durability: Durability) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.segment_bytes_max = 64 << 10;
    c.record_bytes_max = 4096;
    c.index_interval_bytes = 1024;
    c.durability = durability;
    // Keeps each reopen's scan short however many iterations ran.
    c.retention_bytes_max = Some(1 << 20);
    c
}

fn record_len(offset: u64) -> usize {
    20 + (offset.wrapping_mul(7919) % 280) as usize
}

/// xorshift64*: enough randomness for batch sizes and kill delays, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn child(dir: &str, mode: &str) {
    let durability: Durability = mode.parse().expect("child mode");
    let (mut log, _) = Log::open(cfg(Path::new(dir), durability)).expect("child open");
    let mut seqs: Vec<u64> = (0..CONVERSATIONS)
        .map(|c| log.conversation_last_seq(c).unwrap_or(0))
        .collect();
    let mut rng = Rng(std::process::id() as u64 | 1);
    let mut out = std::io::stdout().lock();
    let mut appended = 0;
    while appended < CHILD_RECORDS_MAX {
        let batch = 1 + rng.next() % 16;
        for _ in 0..batch {
            let off = log.next_offset();
            let conv = off % CONVERSATIONS;
            seqs[conv as usize] += 1;
            let h = Header::new(Kind::Message, conv, seqs[conv as usize], off);
            assert_eq!(
                log.append(&h, &payload(off, record_len(off)))
                    .expect("append"),
                off
            );
            appended += 1;
            if durability == Durability::Never {
                writeln!(out, "ack {}", off + 1).expect("stdout");
                out.flush().expect("stdout");
            }
        }
        if durability == Durability::Always {
            let durable = log.sync(0).expect("sync");
            writeln!(out, "ack {durable}").expect("stdout");
            out.flush().expect("stdout");
        }
        if log.segment_count() > 20 {
            log.enforce_retention(0).expect("retention");
        }
    }
}

/// Checks the recovered log: dense, intact, every acked record present. Returns
/// (next offset, whether recovery cut a partial record).
fn verify(dir: &Path, acked: u64) -> (u64, bool) {
    let (mut log, report) = Log::open(cfg(dir, Durability::Always)).expect("reopen");
    assert!(
        report.sealed_corruption.is_empty(),
        "sealed corruption after a crash: {report:?}"
    );
    let next = log.next_offset();
    assert!(
        next >= acked,
        "acked up to {acked} but recovered only up to {next}: {report:?}"
    );
    let start = log.start_offset();
    let mut expect = start;
    let mut last_seq = vec![0u64; CONVERSATIONS as usize];
    let end = log
        .read_range(start, usize::MAX, |f| {
            let off = f.header.log_offset;
            assert_eq!(off, expect, "dense offsets");
            assert_eq!(
                f.payload,
                &payload(off, record_len(off))[..],
                "payload of {off}"
            );
            let conv = f.header.conversation_id as usize;
            assert!(
                f.header.seq > last_seq[conv],
                "seq order of conversation {conv}"
            );
            last_seq[conv] = f.header.seq;
            expect += 1;
        })
        .expect("read back");
    assert_eq!(end, next);
    (next, report.truncated.is_some())
}

fn parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut runs, mut cut_partial, mut max_next) = (0u32, 0u32, 0u64);
    while runs < ITERATIONS && started.elapsed() < TIME_BUDGET {
        let mode = if runs % 4 == 3 { "never" } else { "always" };
        let mut child = Command::new(&exe)
            .env(CHILD_DIR_VAR, dir.path())
            .env(CHILD_MODE_VAR, mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("piped");
        // Read acks while the child runs, so a full pipe never stalls it; the first one
        // tells the parent the child is past its open and appending.
        let (first_ack, first_ack_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ack ") {
                    acked = acked.max(n.parse().expect("ack line"));
                    let _ = first_ack.send(());
                }
            }
            acked
        });
        if runs % 8 == 7 {
            // Now and then kill it early: during its open (recovery) or first appends.
            std::thread::sleep(Duration::from_millis(rng.next() % 10));
        } else {
            // Bounded so a child that died early cannot hang the test; `wait` reports it.
            let _ = first_ack_rx.recv_timeout(Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(rng.next() % 30));
        }
        child.kill().expect("SIGKILL child");
        let status = child.wait().expect("wait child");
        let acked = reader.join().expect("reader thread");
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut err)
            .expect("child stderr");
        assert!(
            status.code().is_none(),
            "child exited by itself ({status}) instead of being killed (seed {seed}): {err}"
        );
        let (next, cut) = verify(dir.path(), acked);
        assert!(next >= max_next.min(acked), "seed {seed}");
        max_next = max_next.max(next);
        cut_partial += cut as u32;
        runs += 1;
    }
    println!(
        "crash test: {runs} SIGKILLs in {:.1} s, {cut_partial} left a partial record, log at offset {max_next}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        runs >= ITERATIONS_MIN,
        "only {runs} iterations fit in {TIME_BUDGET:?}"
    );
    assert!(max_next > 0, "children never appended anything");
}

fn main() {
    match (std::env::var(CHILD_DIR_VAR), std::env::var(CHILD_MODE_VAR)) {
        (Ok(dir), Ok(mode)) => child(&dir, &mode),
        _ => parent(),
    }
}
