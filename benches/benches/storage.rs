//! Benchmarks of the storage log: append throughput of 256-byte records under `never`,
//! `interval:5` (syncs on a flusher thread, as the gateway does) and `always` with group
//! commit of N appends per sync (with p50/p99 ack latency, on a `fallocate`d and on a
//! zero-filled segment); replay (read_range) and recovery
//! (open) in bytes per second; and shipping a log range to a socket with `sendfile` against
//! read + write.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use kefu_benches::{CpuTime, thread_cpu};
use kefu_protocol::frame::{HEADER_LEN, Header, Kind};
use kefu_storage::{Durability, Log, LogConfig, RunSource, SyncJob};
use std::hint::black_box;

/// Whole record (header + payload) size.
const RECORD_BYTES: usize = 256;
const PAYLOAD_BYTES: usize = RECORD_BYTES - HEADER_LEN;
/// Appends per criterion iteration in the throughput benches.
const APPEND_BATCH: u64 = 1000;
/// Size of the log built for replay, recovery and sendfile.
const REPLAY_LOG_BYTES: u64 = 256 << 20;

fn cfg(dir: &Path, durability: Durability) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.segment_bytes_max = 64 << 20;
    c.durability = durability;
    // Keep the disk use of long runs bounded.
    c.retention_bytes_max = Some(512 << 20);
    c
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// A flusher thread: runs sync jobs and sends them back with their result.
struct Flusher {
    jobs: mpsc::Sender<SyncJob>,
    done: mpsc::Receiver<(SyncJob, std::io::Result<()>)>,
    in_flight: bool,
}

impl Flusher {
    fn new() -> Flusher {
        let (jobs, rx) = mpsc::channel::<SyncJob>();
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            for job in rx {
                let r = job.run();
                if tx.send((job, r)).is_err() {
                    break;
                }
            }
        });
        Flusher {
            jobs,
            done,
            in_flight: false,
        }
    }

    /// Completes a finished sync and starts the next one if due; never blocks.
    fn poll(&mut self, log: &mut Log, now: u64) {
        if self.in_flight
            && let Ok((job, r)) = self.done.try_recv()
        {
            log.complete_sync(job, r).expect("sync");
            self.in_flight = false;
        }
        if !self.in_flight
            && log.sync_due(now)
            && let Some(job) = log.prepare_sync(now).expect("prepare")
        {
            self.jobs.send(job).expect("flusher alive");
            self.in_flight = true;
        }
    }

    fn drain(&mut self, log: &mut Log) {
        if self.in_flight {
            let (job, r) = self.done.recv().expect("flusher alive");
            log.complete_sync(job, r).expect("sync");
            self.in_flight = false;
        }
    }
}

fn append_throughput(c: &mut Criterion<CpuTime>) {
    let payload = vec![b'm'; PAYLOAD_BYTES];
    let mut g = c.benchmark_group("storage_append_256B_cpu");
    g.throughput(Throughput::Elements(APPEND_BATCH));
    for durability in [Durability::Never, Durability::IntervalMs(5)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(cfg(dir.path(), durability)).expect("open");
        let mut flusher = Flusher::new();
        let start = Instant::now();
        let mut seq = 0u64;
        g.bench_function(BenchmarkId::from_parameter(durability), |b| {
            b.iter(|| {
                for _ in 0..APPEND_BATCH {
                    seq += 1;
                    let h = Header::new(Kind::Message, seq & 1023, seq, seq);
                    let h = Header { seq: 0, ..h };
                    black_box(log.append(&h, &payload).expect("append"));
                    if seq.is_multiple_of(64) {
                        flusher.poll(&mut log, now_ms(start));
                        log.enforce_retention(0).expect("retention");
                    }
                }
            })
        });
        flusher.drain(&mut log);
    }
    g.finish();
}

/// `always` with N appenders that each wait for their ack: one iteration is N appends and
/// the one sync that acknowledges them all.
fn always_group_commit(c: &mut Criterion) {
    let payload = vec![b'm'; PAYLOAD_BYTES];
    let mut g = c.benchmark_group("storage_always_group_commit_256B");
    g.sample_size(20);
    for n in [1u64, 16, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(cfg(dir.path(), Durability::Always)).expect("open");
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                for _ in 0..n {
                    let h = Header::new(Kind::Event, 1, 0, 0);
                    log.append(&h, &payload).expect("append");
                }
                black_box(log.sync(0).expect("sync"))
            })
        });
    }
    g.finish();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU time per append of the appending thread (load-independent, unlike wall time on a
/// shared machine), over 4 segments' worth of records.
fn append_cpu_cost() {
    let payload = vec![b'm'; PAYLOAD_BYTES];
    for durability in [Durability::Never, Durability::IntervalMs(5)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(cfg(dir.path(), durability)).expect("open");
        let mut flusher = Flusher::new();
        let n = 4 * (64 << 20) / RECORD_BYTES as u64;
        let (start, cpu) = (Instant::now(), thread_cpu());
        for seq in 1..=n {
            log.append(&Header::new(Kind::Event, seq & 1023, 0, seq), &payload)
                .expect("append");
            if seq.is_multiple_of(64) {
                flusher.poll(&mut log, now_ms(start));
            }
        }
        let cpu = (thread_cpu() - cpu).as_secs_f64();
        let wall = start.elapsed().as_secs_f64();
        flusher.drain(&mut log);
        println!(
            "append {durability}: {:.0} ns CPU per append = {:.2} M appends/s per CPU-second ({:.2} M/s wall, {:.0} MB/s wall)",
            cpu * 1e9 / n as f64,
            n as f64 / cpu / 1e6,
            n as f64 / wall / 1e6,
            (n * RECORD_BYTES as u64) as f64 / wall / 1e6
        );
    }
}

/// Appends (syncing every 64) until the log has moved into a zero-filled spare segment.
fn move_into_zero_filled_segment(log: &mut Log, payload: &[u8]) {
    let started = Instant::now();
    let mut i = 0u64;
    while !log.active_is_zero_filled() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no zero-filled segment after 60 s"
        );
        log.append(&Header::new(Kind::Event, 1, 0, 0), payload)
            .expect("append");
        i += 1;
        if i.is_multiple_of(64) {
            log.sync(0).expect("sync");
        }
    }
    log.sync(0).expect("sync");
}

/// p50/p99 ack latency under `always`: every appender's record waits for the group's sync.
/// Side by side on a `fallocate`d segment and on a zero-filled one (`zero_fill_segments`),
/// whose syncs skip the unwritten-extent conversion and inode write.
fn always_ack_latency() {
    let payload = vec![b'm'; PAYLOAD_BYTES];
    for (n, zero_fill) in [1u64, 16, 256]
        .into_iter()
        .flat_map(|n| [(n, false), (n, true)])
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = cfg(dir.path(), Durability::Always);
        c.zero_fill_segments = zero_fill;
        let (mut log, _) = Log::open(c).expect("open");
        if zero_fill {
            move_into_zero_filled_segment(&mut log, &payload);
        }
        let segment = if zero_fill {
            "zero-filled"
        } else {
            "fallocated"
        };
        let rounds = 2000 / n as usize + 50;
        let mut lat = Vec::with_capacity(rounds);
        let started = Instant::now();
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..n {
                log.append(&Header::new(Kind::Event, 1, 0, 0), &payload)
                    .expect("append");
            }
            log.sync(0).expect("sync");
            lat.push(t.elapsed());
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort();
        println!(
            "always, {n} appenders, {segment} segment: {:.0} acked appends/s, ack latency p50 {:?} p99 {:?}",
            (rounds as u64 * n) as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
}

fn build_log(dir: &Path) -> u64 {
    let (mut log, _) = Log::open(cfg(dir, Durability::Never)).expect("open");
    let payload = vec![b'r'; PAYLOAD_BYTES];
    let n = REPLAY_LOG_BYTES / RECORD_BYTES as u64;
    for i in 0..n {
        log.append(&Header::new(Kind::Event, i & 1023, 0, i), &payload)
            .expect("append");
    }
    log.sync(0).expect("sync");
    n
}

fn replay(c: &mut Criterion<CpuTime>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = build_log(dir.path());
    let mut g = c.benchmark_group("storage_log_256MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(n * RECORD_BYTES as u64));
    {
        let (mut log, _) = Log::open(cfg(dir.path(), Durability::Never)).expect("open");
        g.bench_function("replay_read_range_cpu", |b| {
            b.iter(|| {
                let mut bytes = 0usize;
                let end = log
                    .read_range(0, usize::MAX, |f| bytes += f.bytes.len())
                    .expect("read");
                assert_eq!(end, n);
                black_box(bytes)
            })
        });
    }
    g.finish();
}

fn recovery(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = build_log(dir.path());
    let mut g = c.benchmark_group("storage_log_256MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(n * RECORD_BYTES as u64));
    g.bench_function("recovery_open_wall", |b| {
        b.iter(|| {
            let (log, report) = Log::open(cfg(dir.path(), Durability::Never)).expect("open");
            assert_eq!(report.next_offset, n);
            black_box(log.next_offset())
        })
    });
    g.finish();
}

/// A loopback TCP connection whose far end a thread drains.
fn sink() -> (TcpStream, thread::JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(k) => total += k as u64,
            }
        }
    });
    (TcpStream::connect(addr).expect("connect"), h)
}

fn sendfile_all(out: &TcpStream, file: &File, mut pos: u64, mut len: u64) {
    while len > 0 {
        let mut off = pos as libc::off_t;
        // SAFETY: valid descriptors and offset pointer.
        let k = unsafe {
            libc::sendfile(
                out.as_raw_fd(),
                file.as_raw_fd(),
                &mut off,
                len.min(1 << 30) as usize,
            )
        };
        assert!(k > 0, "sendfile: {}", std::io::Error::last_os_error());
        pos += k as u64;
        len -= k as u64;
    }
}

/// The firehose path: a whole log range to a socket, sendfile from file runs against
/// read_range + write. Prints GB/s and CPU seconds per GB of the sending thread.
fn to_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = build_log(dir.path());
    let (mut log, _) = Log::open(cfg(dir.path(), Durability::Never)).expect("open");
    let total = n * RECORD_BYTES as u64;
    for method in ["sendfile", "read+write"] {
        let mut best: Option<(f64, f64)> = None;
        for _ in 0..3 {
            let (mut out, h) = sink();
            let (t, cpu) = (Instant::now(), thread_cpu());
            match method {
                "sendfile" => {
                    let mut from = 0;
                    while from < n {
                        for run in log.file_runs(from, 64 << 20).expect("runs") {
                            match &run.source {
                                RunSource::File(f) => sendfile_all(&out, f, run.position, run.len),
                                RunSource::Memory(m) => out
                                    .write_all(
                                        &m[run.position as usize
                                            ..(run.position + run.len) as usize],
                                    )
                                    .expect("write"),
                            }
                            from = run.end_offset;
                        }
                    }
                }
                _ => {
                    let mut buf = Vec::with_capacity(1 << 20);
                    let mut from = 0;
                    while from < n {
                        buf.clear();
                        from = log
                            .read_range(from, 4096, |f| buf.extend_from_slice(f.bytes))
                            .expect("read");
                        out.write_all(&buf).expect("write");
                    }
                }
            }
            let cpu = (thread_cpu() - cpu).as_secs_f64();
            drop(out);
            assert_eq!(h.join().expect("sink"), total);
            let secs = t.elapsed().as_secs_f64();
            let gb = total as f64 / 1e9;
            let r = (gb / secs, cpu / gb);
            if best.is_none_or(|b| r.0 > b.0) {
                best = Some(r);
            }
        }
        let (gbps, cpu_per_gb) = best.expect("ran");
        println!(
            "to socket, {method}: {gbps:.2} GB/s, {cpu_per_gb:.2} CPU s/GB (sender thread, best of 3, 256 MiB)"
        );
    }
}

criterion_group! {
    name = cpu_benches;
    config = Criterion::default().with_measurement(CpuTime);
    targets = append_throughput, replay
}
criterion_group!(wall_benches, always_group_commit, recovery);

fn main() {
    if std::env::var("KEFU_BENCH_ONLY_EXTRA").is_err() {
        cpu_benches();
        wall_benches();
    }
    Criterion::default().configure_from_args().final_summary();
    // Figures criterion does not report: percentiles and CPU cost. Skipped when criterion
    // is only listing or testing (`cargo test --benches`).
    let args: Vec<String> = std::env::args().collect();
    let only = std::env::var("KEFU_BENCH_ONLY_EXTRA").is_ok();
    if only || (args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list")) {
        append_cpu_cost();
        always_ack_latency();
        to_socket();
    }
}
