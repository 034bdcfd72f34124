//! Zero-filled segments (`zero_fill_segments`): a new log starts in one, a recovered
//! `fallocate`d segment is left at the first append, rolls use the spare, nothing is lost
//! across a switch or a reopen, no segment holds unwritten extents, a failed spare only falls
//! back to `fallocate`, and no spare file outlives the log.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{FaultyIo, header, payload};
use kefu_storage::{Durability, Log, LogConfig, LogIo, SpareStatus};

/// A spare while it is written.
const SPARE: &str = "next-segment.tmp";
/// A finished spare.
const READY: &str = "next-segment.spare";
const RECORD_PAYLOAD_BYTES: usize = 500;
/// Every wait for the background thread gives up after this (a failure, not a slow pass).
const WAIT_LIMIT: Duration = Duration::from_secs(30);

fn cfg(dir: &Path) -> LogConfig {
    let mut cfg = LogConfig::new(dir);
    // 1 MiB segments: the next spare starts once the active segment holds 512 KiB.
    cfg.segment_bytes_max = 1 << 20;
    cfg.record_bytes_max = 4096;
    cfg.durability = Durability::Always;
    cfg.zero_fill_segments = true;
    cfg
}

fn append_synced(log: &mut Log, i: u64) -> u64 {
    let off = log
        .append(&header(1 + i % 7, 0, i), &payload(i, RECORD_PAYLOAD_BYTES))
        .expect("append");
    log.sync(0).expect("sync");
    off
}

/// Appends (syncing each) until `done(log)` or [`WAIT_LIMIT`]; returns the records written.
fn append_until(log: &mut Log, mut next: u64, done: impl Fn(&Log) -> bool) -> u64 {
    let start = Instant::now();
    while !done(log) {
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "gave up waiting: {:?}",
            log.spare_status()
        );
        append_synced(log, next);
        next += 1;
        if log.spare_status() == SpareStatus::Filling {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    next
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Whether any extent of `file` is unwritten (`FIEMAP_EXTENT_UNWRITTEN`); `None` where the
/// file system cannot say (no FIEMAP).
fn has_unwritten_extent(file: &File) -> Option<bool> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
    const EXTENTS: usize = 64;
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
        extents: [Extent; EXTENTS],
    }
    let mut m = Fiemap {
        start: 0,
        length: u64::MAX,
        flags: FIEMAP_FLAG_SYNC,
        mapped_extents: 0,
        extent_count: EXTENTS as u32,
        reserved: 0,
        extents: [Extent::default(); EXTENTS],
    };
    // SAFETY: FS_IOC_FIEMAP fills at most `extent_count` extents of the struct we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut m as *mut Fiemap) };
    if rc != 0 {
        return None;
    }
    let n = (m.mapped_extents as usize).min(EXTENTS);
    Some(
        m.extents[..n]
            .iter()
            .any(|e| e.flags & FIEMAP_EXTENT_UNWRITTEN != 0),
    )
}

/// Asserts `file` has no unwritten extent, after checking with a `fallocate`d control file
/// in `dir` that the file system shows them at all (else says so and skips).
fn assert_zero_filled(dir: &Path, file: &Path) {
    let control_path = dir.join("control");
    let control = File::create(&control_path).unwrap();
    kefu_storage::StdIo.allocate(&control, 1 << 20).unwrap();
    match has_unwritten_extent(&control) {
        Some(true) => {
            let f = File::open(file).unwrap();
            assert_eq!(has_unwritten_extent(&f), Some(false), "{}", file.display());
        }
        other => eprintln!("file system shows no unwritten extents ({other:?}); not checked"),
    }
    fs::remove_file(control_path).unwrap();
}

fn read_back(log: &mut Log, records: u64) {
    let mut i = 0;
    log.read_range(0, usize::MAX, |r| {
        assert_eq!(
            r.payload,
            &payload(i, RECORD_PAYLOAD_BYTES)[..],
            "record {i}"
        );
        i += 1;
    })
    .unwrap();
    assert_eq!(i, records);
}

#[test]
fn a_new_log_starts_in_a_zero_filled_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    assert!(log.active_is_zero_filled());
    assert_eq!(log.spare_status(), SpareStatus::None);
    assert!(!dir.path().join(SPARE).exists());
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    assert_zero_filled(dir.path(), &files[0]);
    // No background spare before the segment is half full.
    let n = append_until(&mut log, 0, |l| l.next_offset() >= 100);
    assert_eq!(log.spare_status(), SpareStatus::None);
    read_back(&mut log, n);
}

#[test]
fn a_recovered_fallocated_segment_is_left_at_the_first_append_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut plain = cfg(dir.path());
    plain.zero_fill_segments = false;
    let (mut log, _) = Log::open(plain).unwrap();
    assert!(!log.active_is_zero_filled());
    let n = append_until(&mut log, 0, |l| l.next_offset() >= 40);
    drop(log);

    let (mut log, report) = Log::open(cfg(dir.path())).unwrap();
    assert_eq!(report.records, n);
    assert!(
        !log.active_is_zero_filled(),
        "the recovered segment stays active"
    );
    assert_eq!(
        log.spare_status(),
        SpareStatus::Ready,
        "open made the first spare"
    );
    let n = append_until(&mut log, n, |l| l.active_is_zero_filled());
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        fs::metadata(&files[0]).unwrap().len() < 64 << 10,
        "sealed early"
    );
    assert_zero_filled(dir.path(), &files[1]);
    let n = append_until(&mut log, n, |l| l.next_offset() >= n + 50);
    read_back(&mut log, n);
    drop(log);
    assert!(
        !dir.path().join(SPARE).exists(),
        "no spare outlives the log"
    );
    let (mut log, report) = Log::open(cfg(dir.path())).unwrap();
    assert_eq!(report.records, n);
    assert!(report.truncated.is_none(), "{report:?}");
    read_back(&mut log, n);
}

#[test]
fn rolls_at_capacity_use_the_spare_and_the_log_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    // About 4.5 segments of records: every roll after the first finds a spare (each is ready
    // long before its segment fills at this pace) or falls back; both must read back.
    let records = (9 << 20) / 2 / (RECORD_PAYLOAD_BYTES as u64 + 48);
    let mut zero_filled_segments = 0;
    let mut last_base_count = 1;
    for i in 0..records {
        append_synced(&mut log, i);
        if log.segment_count() != last_base_count {
            last_base_count = log.segment_count();
            zero_filled_segments += usize::from(log.active_is_zero_filled());
        }
        if i % 64 == 0 {
            // Let the background thread run on a loaded machine.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(log.segment_count() >= 5, "{}", log.segment_count());
    assert!(zero_filled_segments >= 1, "no roll used a spare");
    read_back(&mut log, records);
}

#[test]
fn a_failed_spare_falls_back_to_fallocate_and_is_tried_again_after_the_next_roll() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let mut c = cfg(dir.path());
    c.io = io.clone();
    let (mut log, _) = Log::open(c).unwrap();
    io.fail_allocate.store(true, Ordering::SeqCst);
    let n = append_until(&mut log, 0, |l| l.spare_status() == SpareStatus::Failed);
    assert!(
        !dir.path().join(SPARE).exists(),
        "a failed spare is deleted"
    );
    io.fail_allocate.store(false, Ordering::SeqCst);
    // No new attempt in this segment: it fills and rolls the fallocate way.
    let n = append_until(&mut log, n, |l| l.segment_count() == 2);
    assert!(!log.active_is_zero_filled());
    assert_eq!(
        log.spare_status(),
        SpareStatus::None,
        "a roll allows a new try"
    );
    let files = segment_files(dir.path());
    assert!(
        fs::metadata(&files[0]).unwrap().len() > 1_000_000,
        "rolled at capacity"
    );
    // The next attempt works, and appends move into it.
    let n = append_until(&mut log, n, |l| l.active_is_zero_filled());
    let mut i = 0;
    log.read_range(0, usize::MAX, |_| i += 1).unwrap();
    assert_eq!(i, n);
}

#[test]
fn a_log_closed_while_its_spare_fills_leaves_no_half_written_spare() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    // 64 MiB: the spare takes about half a second to fill, so the log closes mid-way.
    c.segment_bytes_max = 64 << 20;
    c.durability = Durability::Never;
    let (mut log, _) = Log::open(c).unwrap();
    let mut i = 0;
    while log.spare_status() != SpareStatus::Filling {
        log.append(&header(1, 0, i), &payload(i, 4000)).unwrap();
        i += 1;
        assert!(i < 100_000, "the spare never started");
    }
    let start = Instant::now();
    while !dir.path().join(SPARE).exists() {
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "the spare file never appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(log);
    assert!(!dir.path().join(SPARE).exists());
}

#[test]
fn open_deletes_a_spare_that_a_crash_left() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    append_synced(&mut log, 0);
    drop(log);
    fs::write(dir.path().join(SPARE), vec![0xAB; 8192]).unwrap();
    let (mut log, report) = Log::open(cfg(dir.path())).unwrap();
    assert_eq!(report.removed_files, vec![dir.path().join(SPARE)]);
    // Open made a fresh spare: all zeros, a whole segment long.
    let spare = fs::read(dir.path().join(READY)).unwrap();
    assert_eq!(spare.len() as u64, log.config().segment_bytes_max);
    assert!(spare.iter().all(|&b| b == 0));
    assert_eq!(report.records, 1);
    let mut got = 0;
    log.read_range(0, 10, |_| got += 1).unwrap();
    assert_eq!(got, 1);
}

/// Inode and last modification (ns): unchanged only if nobody rewrote the file.
fn identity(path: &Path) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

#[test]
fn a_finished_spare_outlives_the_log_and_the_next_open_takes_it_unless_it_was_used() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    let n = append_until(&mut log, 0, |l| l.spare_status() == SpareStatus::Ready);
    let ready = dir.path().join(READY);
    let id = identity(&ready);
    drop(log);
    assert_eq!(identity(&ready), id, "kept at close");

    // Adopted as it is: no second fill.
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    assert_eq!(log.spare_status(), SpareStatus::Ready);
    assert_eq!(identity(&ready), id, "not rewritten");
    read_back(&mut log, n);
    drop(log);

    // A spare with bytes at its start (it became a segment, but a crash undid the rename) is
    // replaced, never reused.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&ready).unwrap();
        f.write_all_at(b"stale record", 0).unwrap();
    }
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    assert_eq!(log.spare_status(), SpareStatus::Ready);
    assert!(
        fs::read(&ready).unwrap().iter().all(|&b| b == 0),
        "a new spare was written"
    );
    read_back(&mut log, n);
    drop(log);

    // With the option off, open deletes a spare.
    let mut plain = cfg(dir.path());
    plain.zero_fill_segments = false;
    let (mut log, _) = Log::open(plain).unwrap();
    assert!(!ready.exists());
    assert_eq!(log.spare_status(), SpareStatus::None);
    read_back(&mut log, n);
}
