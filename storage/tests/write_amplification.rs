//! Bytes the disk sees per group commit. A sync of a few small records must write a few
//! blocks, not the large page-cache folios that mmap read-around creates (one run of the
//! gateway wrote 1.5 GB/s to disk for 17 MB/s of records that way, before the active
//! segment's mapping was advised `MADV_RANDOM`).
//!
//! Its own test binary: `/proc/self/io` counts the whole process, so no other test may
//! write meanwhile.

use kefu_protocol::frame::{Header, Kind};
use kefu_storage::{Durability, Log, LogConfig};

/// Bytes this process caused to be written to storage so far (`/proc/self/io`).
fn write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_small_sync_writes_a_few_blocks_not_whole_folios() {
    const SYNCS: u64 = 2000;
    const RECORDS_PER_SYNC: u64 = 16;
    // Beyond the appended bytes themselves; large folios made it 64 KiB-2 MiB per sync.
    const TAIL_BYTES_PER_SYNC_MAX: u64 = 12 << 10;

    // A real disk-backed file system (tmpfs has no write-back and counts nothing).
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let mut cfg = LogConfig::new(dir.path());
    cfg.durability = Durability::Always;
    let (mut log, _) = Log::open(cfg).unwrap();
    let payload = vec![b'x'; 200];

    // Warm-up sync so segment creation and directory writes are not counted.
    log.append(&Header::new(Kind::Message, 1, 1, 1), &payload)
        .unwrap();
    log.sync(0).unwrap();
    let Some(before) = write_bytes() else {
        println!("SKIP: /proc/self/io unreadable here, cannot count written bytes");
        return;
    };
    // As the gateway runs it: syncs on another thread while the shard keeps appending.
    let (to_syncer, jobs) = std::sync::mpsc::channel::<kefu_storage::SyncJob>();
    let (to_log, done) = std::sync::mpsc::channel();
    let syncer = std::thread::spawn(move || {
        for job in jobs {
            let result = job.run();
            to_log.send((job, result)).unwrap();
        }
    });
    let mut seq = 1;
    let mut syncs = 0;
    let mut in_flight = false;
    while syncs < SYNCS {
        for _ in 0..RECORDS_PER_SYNC {
            seq += 1;
            log.append(&Header::new(Kind::Message, 1, seq, seq), &payload)
                .unwrap();
        }
        if in_flight && let Ok((job, result)) = done.try_recv() {
            log.complete_sync(job, result).unwrap();
            in_flight = false;
            syncs += 1;
        }
        if !in_flight && let Some(job) = log.prepare_sync(syncs).unwrap() {
            to_syncer.send(job).unwrap();
            in_flight = true;
        }
    }
    drop(to_syncer);
    syncer.join().unwrap();
    let written = write_bytes().unwrap() - before;
    if written == 0 {
        println!("SKIP: {} counts no written bytes (tmpfs?)", base.display());
        return;
    }
    let appended = (seq - 1) * (48 + payload.len() as u64);
    // Each sync may rewrite the partly filled tail blocks (two 4 KiB blocks when a record
    // straddles them) and, later, the checkpoint's block.
    let allowed = appended + SYNCS * TAIL_BYTES_PER_SYNC_MAX;
    println!(
        "{written} bytes written for {appended} appended in {SYNCS} syncs ({} B per sync, allowed {})",
        written / SYNCS,
        allowed / SYNCS
    );
    assert!(
        written <= allowed,
        "{written} bytes written for {appended} bytes appended in {SYNCS} syncs (allowed {allowed})"
    );
}
