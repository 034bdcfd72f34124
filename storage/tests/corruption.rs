//! Recovery from damaged files: truncation at every byte of the last records, appended
//! garbage, bit flips in the tail and in sealed (plain and compressed) segments, leftovers
//! of interrupted compression, and no resurrection of records behind a cut.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use kefu_protocol::frame::HEADER_LEN;
use kefu_storage::{Error, Log, LogConfig};

/// Payload without zero bytes, so "last non-zero byte" arithmetic is exact.
fn nz_payload(i: u64, len: usize) -> Vec<u8> {
    vec![b'a' + (i % 26) as u8; len]
}

const PAYLOAD_LEN: usize = 30;
const FRAME_LEN: usize = HEADER_LEN + PAYLOAD_LEN;

/// Writes `n` records and syncs; returns the config.
fn write_log(dir: &Path, n: u64) -> LogConfig {
    let cfg = small_cfg(dir);
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    for i in 0..n {
        log.append(&header(i % 4, i / 4 + 1, i), &nz_payload(i, PAYLOAD_LEN))
            .unwrap();
    }
    log.sync(0).unwrap();
    cfg
}

fn last_segment(dir: &Path) -> PathBuf {
    segment_files(dir).pop().unwrap()
}

fn base_of(p: &Path) -> u64 {
    p.file_name().unwrap().to_str().unwrap()[..20]
        .parse()
        .unwrap()
}

/// Reads every offset in `[from, to)` and checks its payload.
fn check_records(log: &mut Log, from: u64, to: u64) {
    let mut next = from;
    log.read_range(from, usize::MAX, |f| {
        assert_eq!(f.header.log_offset, next);
        assert_eq!(f.payload, &nz_payload(next, PAYLOAD_LEN)[..]);
        next += 1;
    })
    .unwrap();
    assert_eq!(next, to);
}

#[test]
fn truncation_at_every_byte_of_the_last_records() {
    let dir = tempfile::tempdir().unwrap();
    let n = 10;
    let cfg = write_log(dir.path(), n);
    let seg = last_segment(dir.path());
    let base = base_of(&seg);
    let original = fs::read(&seg).unwrap();
    let written = (n - base) as usize * FRAME_LEN;
    // Every cut inside the last three records.
    for cut in written - 3 * FRAME_LEN..=written {
        fs::write(&seg, &original[..cut]).unwrap();
        let (mut log, report) = Log::open(cfg.clone()).unwrap();
        let whole = (cut / FRAME_LEN) as u64;
        let boundary = whole as usize * FRAME_LEN;
        assert_eq!(log.next_offset(), base + whole, "cut at {cut}: {report:?}");
        if cut == boundary {
            assert_eq!(report.truncated, None, "cut at a record boundary");
        } else {
            let t = report.truncated.expect("partial record reported");
            assert_eq!(t.offset, base + whole);
            assert_eq!(t.position, boundary as u64);
            // Bytes up to the last non-zero one: a partial header can end in zero fields.
            let partial = &original[boundary..cut];
            let nonzero = partial.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            assert_eq!(t.bytes_cut, nonzero as u64);
        }
        check_records(&mut log, 0, base + whole);
        // The log continues right after the cut.
        let next = base + whole;
        assert_eq!(
            log.append(&header(99, next + 1, 0), &nz_payload(next, PAYLOAD_LEN))
                .unwrap(),
            next
        );
    }
}

#[test]
fn garbage_after_the_tail_is_cut_and_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let n = 7;
    let cfg = write_log(dir.path(), n);
    let seg = last_segment(dir.path());
    let written = (n - base_of(&seg)) as usize * FRAME_LEN;
    let mut bytes = fs::read(&seg).unwrap();
    for (i, b) in bytes[written..written + 100].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) | 1;
    }
    fs::write(&seg, &bytes).unwrap();
    let (mut log, report) = Log::open(cfg.clone()).unwrap();
    let t = report.truncated.expect("garbage reported");
    assert_eq!((t.offset, t.bytes_cut), (n, 100));
    check_records(&mut log, 0, n);
    drop(log);
    // The garbage was zeroed, so the next open is clean.
    let (_, report) = Log::open(cfg).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(report.next_offset, n);
}

#[test]
fn every_bit_flip_in_the_last_record_cuts_exactly_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6;
    let cfg = write_log(dir.path(), n);
    let seg = last_segment(dir.path());
    let base = base_of(&seg);
    let original = fs::read(&seg).unwrap();
    let last_pos = (n - 1 - base) as usize * FRAME_LEN;
    // The CRC covers every header byte but its own (kind included): no flip escapes.
    for bit in 0..FRAME_LEN * 8 {
        let mut bytes = original.clone();
        bytes[last_pos + bit / 8] ^= 1 << (bit % 8);
        fs::write(&seg, &bytes).unwrap();
        let (mut log, report) = Log::open(cfg.clone()).unwrap();
        assert_eq!(log.next_offset(), n - 1, "flip of bit {bit}");
        let t = report.truncated.expect("flip reported");
        assert_eq!(t.offset, n - 1);
        assert_eq!(t.position, last_pos as u64);
        check_records(&mut log, 0, n - 1);
    }
}

#[test]
fn a_cut_record_is_never_resurrected_behind_a_shorter_append() {
    let dir = tempfile::tempdir().unwrap();
    let n = 5;
    let cfg = write_log(dir.path(), n);
    let seg = last_segment(dir.path());
    let base = base_of(&seg);
    // Damage record n-3; records n-2 and n-1 behind it are intact but must go.
    let mut bytes = fs::read(&seg).unwrap();
    let victim = (n - 3 - base) as usize * FRAME_LEN;
    bytes[victim + HEADER_LEN + 3] ^= 0x40;
    fs::write(&seg, &bytes).unwrap();
    let (mut log, report) = Log::open(cfg.clone()).unwrap();
    let t = report.truncated.unwrap();
    assert_eq!(t.offset, n - 3);
    assert_eq!(t.bytes_cut, 3 * FRAME_LEN as u64);
    // An append of exactly the victim's size lands where it was; the old successor would
    // sit right behind it with the very offset that comes next.
    let off = log
        .append(&header(42, 1, 0), &nz_payload(n - 3, PAYLOAD_LEN))
        .unwrap();
    assert_eq!(off, n - 3);
    log.sync(0).unwrap();
    drop(log);
    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(
        log.next_offset(),
        n - 2,
        "old records behind the cut stay gone"
    );
}

#[test]
fn bit_flip_in_a_sealed_segment_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let cfg = write_log(dir.path(), n);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 4);
    let victim_seg = &segs[1];
    let base = base_of(victim_seg);
    let next_base = base_of(&segs[2]);
    let mut bytes = fs::read(victim_seg).unwrap();
    let rec = 5usize;
    bytes[rec * FRAME_LEN + HEADER_LEN + 1] ^= 0x01;
    fs::write(victim_seg, &bytes).unwrap();

    let (mut log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(report.sealed_corruption.len(), 1, "{report:?}");
    let c = &report.sealed_corruption[0];
    assert_eq!(c.segment_base, base);
    assert_eq!(c.offset, base + rec as u64);
    assert_eq!(c.expected_end, next_base);
    assert_eq!(c.position, (rec * FRAME_LEN) as u64);
    assert!(c.reason.contains("crc"), "{}", c.reason);
    // Everything before the damage and every later segment stays readable.
    check_records(&mut log, 0, base + rec as u64);
    check_records(&mut log, next_base, n);
    // The damaged offsets answer Corrupt instead of being skipped.
    for off in [base + rec as u64, next_base - 1] {
        match log.read_range(off, 1, |_| {}) {
            Err(Error::Corrupt {
                offset,
                segment_base,
                ..
            }) => assert_eq!((offset, segment_base), (off, base)),
            other => panic!("read of damaged offset {off}: {other:?}"),
        }
    }
    // The log itself still accepts appends.
    assert_eq!(
        log.append(&header(7, 1000, 0), &nz_payload(n, PAYLOAD_LEN))
            .unwrap(),
        n
    );
}

#[test]
fn a_sealed_segment_missing_its_tail_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_log(dir.path(), 200);
    let segs = segment_files(dir.path());
    let victim = &segs[0];
    let len = fs::metadata(victim).unwrap().len();
    // Cut at a record boundary: every record left is valid, but offsets are missing.
    let f = fs::OpenOptions::new().write(true).open(victim).unwrap();
    f.set_len(len - 2 * FRAME_LEN as u64).unwrap();
    let (_, report) = Log::open(cfg).unwrap();
    assert_eq!(report.sealed_corruption.len(), 1);
    let c = &report.sealed_corruption[0];
    assert_eq!(c.offset + 2, c.expected_end);
    assert!(c.reason.contains("next segment"), "{}", c.reason);
}

#[test]
fn damaged_compressed_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.compress_sealed = true;
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    for i in 0..200u64 {
        log.append(&header(1, i + 1, 0), &nz_payload(i, PAYLOAD_LEN))
            .unwrap();
    }
    log.sync(0).unwrap();
    let base = log.compress_sealed_once().unwrap().unwrap();
    drop(log);
    let zst = segment_files(dir.path())
        .into_iter()
        .find(|p| p.to_str().unwrap().ends_with(".zst"))
        .unwrap();
    let mut bytes = fs::read(&zst).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&zst, &bytes).unwrap();
    let (mut log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.sealed_corruption.len(), 1, "{report:?}");
    assert_eq!(report.sealed_corruption[0].segment_base, base);
    assert!(matches!(
        log.read_range(base, 1, |_| {}),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn leftovers_of_interrupted_compression_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_log(dir.path(), 200);
    cfg.compress_sealed = true;
    let segs = segment_files(dir.path());
    let first = &segs[0];
    // Crash after writing the temp file, and a crash after the rename before the delete.
    let tmp = PathBuf::from(format!("{}.zst.tmp", first.display()));
    fs::write(&tmp, b"half a zstd frame").unwrap();
    let zst_of_second = PathBuf::from(format!("{}.zst", segs[1].display()));
    fs::write(
        &zst_of_second,
        b"a complete copy that recovery must not prefer",
    )
    .unwrap();
    let (mut log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.removed_files.len(), 2, "{report:?}");
    assert!(!tmp.exists() && !zst_of_second.exists());
    assert!(report.sealed_corruption.is_empty());
    check_records(&mut log, 0, 200);
}

#[test]
fn an_unsynced_sealed_tail_is_cut_with_everything_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    let synced = 30;
    for i in 0..200u64 {
        if i == synced {
            log.sync(0).unwrap();
        }
        log.append(&header(i % 4, i / 4 + 1, i), &nz_payload(i, PAYLOAD_LEN))
            .unwrap();
    }
    // No sync after the first 30: a power loss after several rolls. The first segment's
    // pages behind record 40 never reached the disk, later segments' did.
    drop(log);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3);
    let mut first = fs::read(&segs[0]).unwrap();
    let lost_from = 40usize;
    first[lost_from * FRAME_LEN..].fill(0);
    fs::write(&segs[0], &first).unwrap();
    let later_bytes: u64 = segs[1..]
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();

    let (mut log, report) = Log::open(cfg.clone()).unwrap();
    assert_eq!(report.checkpoint, Some(synced));
    assert!(report.sealed_corruption.is_empty(), "{report:?}");
    let t = report.truncated.expect("cut reported");
    assert_eq!((t.segment_base, t.offset), (0, lost_from as u64));
    assert_eq!(t.bytes_cut, later_bytes);
    assert_eq!(report.removed_files.len(), segs.len() - 1);
    assert_eq!(log.next_offset(), lost_from as u64);
    assert_eq!(log.segment_count(), 1);
    check_records(&mut log, 0, lost_from as u64);
    // The conversation index forgot what was cut; the log continues from the cut.
    assert_eq!(log.conversation_last_seq(3), Some(10));
    let next = lost_from as u64;
    assert_eq!(
        log.append(&header(0, 11, 0), &nz_payload(next, PAYLOAD_LEN))
            .unwrap(),
        next
    );
    log.sync(0).unwrap();
    drop(log);
    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(report.checkpoint, Some(next + 1));
    assert_eq!(log.next_offset(), next + 1);
}

#[test]
fn without_a_checkpoint_sealed_damage_is_only_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_log(dir.path(), 200);
    fs::remove_file(dir.path().join("CHECKPOINT")).unwrap();
    let segs = segment_files(dir.path());
    let mut first = fs::read(&segs[0]).unwrap();
    first[10 * FRAME_LEN..].fill(0);
    fs::write(&segs[0], &first).unwrap();
    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.checkpoint, None);
    assert_eq!(report.truncated, None);
    assert_eq!(report.sealed_corruption.len(), 1);
    assert_eq!(report.sealed_corruption[0].offset, 10);
    assert_eq!(log.next_offset(), 200, "later segments are kept");
}
