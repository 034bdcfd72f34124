//! Behaviour of the log through its public API: append, sync and visibility, reopen, reads
//! by range and conversation, file runs, retention, compression, poisoning and limits.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use kefu_protocol::frame::{self, HEADER_LEN, Kind};
use kefu_storage::{Durability, Error, Log, RunSource};

fn collect_range(log: &mut Log, from: u64, max: usize) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    log.read_range(from, max, |f| {
        out.push((f.header.log_offset, f.payload.to_vec()))
    })
    .unwrap();
    out
}

/// The bytes of a file run, read from its file or copied from memory.
fn run_bytes(run: &kefu_storage::FileRun) -> Vec<u8> {
    match &run.source {
        RunSource::File(f) => {
            let mut b = vec![0u8; run.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&**f, &mut b, run.position).unwrap();
            b
        }
        RunSource::Memory(m) => {
            m[run.position as usize..(run.position + run.len) as usize].to_vec()
        }
    }
}

#[test]
fn append_sync_read_reopen_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, report) = Log::open(small_cfg(dir.path())).unwrap();
    assert_eq!(report.next_offset, 0);
    assert_eq!(report.truncated, None);
    for i in 0..200u64 {
        let off = log
            .append(
                &header(1 + i % 3, i / 3 + 1, 1000 + i),
                &payload(i, (i % 50) as usize),
            )
            .unwrap();
        assert_eq!(off, i);
    }
    assert!(log.segment_count() > 2, "tiny segments roll");
    // Nothing is readable before the sync under `always`.
    assert_eq!(log.durable_offset(), 0);
    assert!(collect_range(&mut log, 0, 10).is_empty());
    assert_eq!(log.sync(0).unwrap(), 200);
    let all = collect_range(&mut log, 0, 1000);
    assert_eq!(all.len(), 200);
    for (i, (off, p)) in all.iter().enumerate() {
        assert_eq!(*off, i as u64);
        assert_eq!(p, &payload(i as u64, i % 50));
    }
    // Mid-range reads through the sparse index.
    let mid = collect_range(&mut log, 137, 5);
    assert_eq!(
        mid.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![137, 138, 139, 140, 141]
    );
    drop(log);

    let (mut log, report) = Log::open(small_cfg(dir.path())).unwrap();
    assert_eq!(report.next_offset, 200);
    assert_eq!(report.records, 200);
    assert_eq!(report.truncated, None);
    assert!(report.sealed_corruption.is_empty());
    assert_eq!(collect_range(&mut log, 0, 1000), all);
    assert_eq!(log.append(&header(1, 68, 1), b"after reopen").unwrap(), 200);
}

#[test]
fn conversation_reads_page_by_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(small_cfg(dir.path())).unwrap();
    for i in 0..90u64 {
        let conv = i % 3;
        log.append(&header(conv, i / 3 + 1, i), &payload(i, 20))
            .unwrap();
    }
    // An event without seq is stored but not in the conversation index.
    let ev = frame::Header::new(Kind::Event, 1, 0, 5);
    log.append(&ev, b"{}").unwrap();
    log.sync(0).unwrap();
    let mut seqs = Vec::new();
    let n = log
        .read_conversation(1, 10, 5, |f| {
            assert_eq!(f.header.conversation_id, 1);
            seqs.push(f.header.seq)
        })
        .unwrap();
    assert_eq!(n, 5);
    assert_eq!(seqs, vec![11, 12, 13, 14, 15]);
    let mut count = 0;
    log.read_conversation(2, 0, 1000, |_| count += 1).unwrap();
    assert_eq!(count, 30);
    assert_eq!(log.read_conversation(2, 30, 10, |_| {}).unwrap(), 0);
    assert_eq!(log.read_conversation(77, 0, 10, |_| {}).unwrap(), 0);
    assert_eq!(log.conversation_last_seq(0), Some(30));
    let mut convs: Vec<_> = log.conversations().collect();
    convs.sort();
    assert_eq!(convs, vec![(0, 30), (1, 30), (2, 30)]);
    // Seq must increase per conversation.
    assert!(matches!(
        log.append(&header(0, 30, 1), b"dup"),
        Err(Error::SeqNotIncreasing {
            last: 30,
            got: 30,
            ..
        })
    ));
    // The index is rebuilt on reopen.
    drop(log);
    let (mut log, _) = Log::open(small_cfg(dir.path())).unwrap();
    let mut seqs = Vec::new();
    log.read_conversation(1, 28, 10, |f| seqs.push(f.header.seq))
        .unwrap();
    assert_eq!(seqs, vec![29, 30]);
}

#[test]
fn file_runs_cover_whole_records_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(small_cfg(dir.path())).unwrap();
    for i in 0..150u64 {
        log.append(&header(9, i + 1, i), &payload(i, 40)).unwrap();
    }
    log.sync(0).unwrap();
    let mut next = 3;
    let mut got = Vec::new();
    while next < 150 {
        let runs = log.file_runs(next, 1000).unwrap();
        assert!(!runs.is_empty());
        for run in runs {
            assert_eq!(run.first_offset, next);
            let bytes = run_bytes(&run);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let (f, used) = frame::decode(rest, 1 << 20).unwrap();
                got.push(f.header.log_offset);
                rest = &rest[used..];
            }
            next = run.end_offset;
        }
    }
    assert_eq!(got, (3..150).collect::<Vec<_>>());
    // A budget below one record still yields that record.
    let runs = log.file_runs(0, 1).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].len as usize, HEADER_LEN + 40);
}

#[test]
fn append_framed_hands_out_the_bytes_the_log_stores() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(small_cfg(dir.path())).unwrap();
    let mut framed = Vec::new();
    let mut ends = Vec::new();
    // Across segment rolls, and after plain appends (which frame nothing).
    for i in 0..120u64 {
        if i % 4 == 3 {
            log.append(&header(5, i + 1, i), &payload(i, (i % 60) as usize))
                .unwrap();
        } else {
            let off = log
                .append_framed(
                    &header(5, i + 1, i),
                    &payload(i, (i % 60) as usize),
                    &mut framed,
                )
                .unwrap();
            assert_eq!(off, i);
            ends.push((i, framed.len()));
        }
    }
    assert!(log.segment_count() > 2, "tiny segments roll");
    log.sync(0).unwrap();
    let mut stored = std::collections::HashMap::new();
    let mut next = 0;
    while next < 120 {
        for run in log.file_runs(next, 1 << 20).unwrap() {
            let bytes = run_bytes(&run);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let (f, used) = frame::decode(rest, 1 << 20).unwrap();
                stored.insert(f.header.log_offset, rest[..used].to_vec());
                rest = &rest[used..];
            }
            next = run.end_offset;
        }
    }
    let mut start = 0;
    for (offset, end) in ends {
        assert_eq!(
            framed[start..end],
            stored[&offset][..],
            "record {offset}: framed copy differs from the stored bytes"
        );
        start = end;
    }
}

#[test]
fn interval_policy_and_group_commit_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.durability = Durability::IntervalMs(5);
    cfg.syncs_in_flight_max = 1;
    let (mut log, _) = Log::open(cfg).unwrap();
    assert!(!log.sync_due(100), "nothing pending");
    log.append(&header(1, 1, 1), b"a").unwrap();
    log.append(&header(1, 2, 1), b"b").unwrap();
    assert!(log.sync_due(100));
    let job = log.prepare_sync(100).unwrap().expect("pending work");
    assert_eq!(job.target_offset(), 2);
    assert_eq!(job.files().len(), 1);
    // While in flight, more appends wait for the next job.
    log.append(&header(1, 3, 1), b"c").unwrap();
    assert!(log.prepare_sync(100).unwrap().is_none());
    let r = job.run();
    assert_eq!(log.complete_sync(job, r).unwrap(), 2);
    assert_eq!(log.durable_offset(), 2);
    assert!(!log.sync_due(104), "interval not elapsed");
    assert_eq!(log.next_sync_due_ms(), Some(105));
    assert!(log.sync_due(105));
    assert_eq!(log.sync(105).unwrap(), 3);
}

#[test]
fn never_policy_counts_appends_durable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.durability = Durability::Never;
    let (mut log, _) = Log::open(cfg).unwrap();
    log.append(&header(1, 1, 1), b"x").unwrap();
    assert_eq!(log.durable_offset(), 1);
    assert!(!log.sync_due(u64::MAX));
    assert_eq!(collect_range(&mut log, 0, 10).len(), 1);
}

#[test]
fn failed_sync_poisons_every_later_append() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let mut cfg = small_cfg(dir.path());
    cfg.io = io.clone();
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    log.append(&header(1, 1, 1), b"durable").unwrap();
    log.sync(0).unwrap();
    log.append(&header(1, 2, 1), b"lost").unwrap();
    io.fail_sync.store(true, Ordering::SeqCst);
    let err = log.sync(0).unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)), "{err}");
    assert_eq!(
        log.durable_offset(),
        1,
        "the failed sync made nothing durable"
    );
    // The fault clears, but the log stays poisoned: no silent retry.
    io.fail_sync.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        match log.append(&header(1, 3, 1), b"more") {
            Err(Error::Poisoned(cause)) => assert_eq!(cause.raw_os_error(), Some(libc_eio())),
            other => panic!("append after a failed sync: {other:?}"),
        }
    }
    assert!(matches!(log.prepare_sync(0), Err(Error::Poisoned(_))));
    assert!(log.poisoned().is_some());
    // Durable records stay readable.
    assert_eq!(collect_range(&mut log, 0, 10).len(), 1);
    // Reopening runs recovery and gives a healthy log.
    drop(log);
    let (mut log, _) = Log::open(cfg).unwrap();
    log.append(&header(1, 3, 1), b"after reopen").unwrap();
    log.sync(0).unwrap();
}

#[test]
fn failed_allocation_fails_the_append_without_poisoning() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let mut cfg = small_cfg(dir.path());
    cfg.io = io.clone();
    let (mut log, _) = Log::open(cfg).unwrap();
    let mut i = 0;
    let segments = log.segment_count();
    io.fail_allocate.store(true, Ordering::SeqCst);
    let err = loop {
        match log.append(&header(1, i + 1, 1), &payload(i, 200)) {
            Ok(_) => i += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Io { op: "allocate", .. }), "{err}");
    assert_eq!(log.segment_count(), segments);
    assert_eq!(
        segment_files(dir.path()).len(),
        segments,
        "no half-made segment left"
    );
    io.fail_allocate.store(false, Ordering::SeqCst);
    assert_eq!(
        log.append(&header(1, i + 1, 1), &payload(i, 200)).unwrap(),
        i
    );
    log.sync(0).unwrap();
}

/// `retention_target` says where retention would start the log; `enforce_retention_below`
/// deletes only segments whose records all lie below the floor it is given, and with the
/// floor at the target it deletes what `enforce_retention` would.
#[test]
fn retention_below_a_floor_keeps_every_record_at_or_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.retention_bytes_max = Some(3 * 4096);
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    for i in 0..300u64 {
        log.append(&header(i % 2, i / 2 + 1, i), &payload(i, 100))
            .unwrap();
    }
    log.sync(0).unwrap();
    let target = log.retention_target(0);
    assert!(target > 0);
    // Nothing deleted yet.
    assert_eq!(log.start_offset(), 0);
    let segments = log.segment_count();
    // Offset 1 is in the first segment: it stays, and so does everything after it.
    let r = log.enforce_retention_below(0, 1).unwrap();
    assert_eq!(r.segments_deleted, 0);
    assert_eq!(log.start_offset(), 0);
    // With the floor at the target, what plain retention would delete goes.
    let r = log.enforce_retention_below(0, target).unwrap();
    assert!(r.segments_deleted > 0);
    assert_eq!(r.start_offset, target);
    assert_eq!(log.start_offset(), target);
    assert!(log.segment_count() < segments);
    assert!(log.disk_bytes() <= 3 * 4096);
    // At the target now: nothing more to delete.
    assert_eq!(log.retention_target(0), target);
    assert_eq!(
        log.enforce_retention_below(0, u64::MAX)
            .unwrap()
            .segments_deleted,
        0
    );
}

#[test]
fn retention_by_size_and_age_deletes_whole_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.retention_bytes_max = Some(3 * 4096);
    cfg.retention_age_ms = Some(60_000);
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    // Timestamps: record i at i seconds.
    for i in 0..300u64 {
        log.append(&header(i % 2, i / 2 + 1, i * 1_000_000), &payload(i, 100))
            .unwrap();
    }
    log.sync(0).unwrap();
    let before = log.segment_count();
    // At t = 0 nothing is too old, so only the size limit applies.
    let r = log.enforce_retention(0).unwrap();
    assert!(r.segments_deleted > 0);
    assert_eq!(log.segment_count(), before - r.segments_deleted);
    assert!(log.disk_bytes() <= 3 * 4096);
    let start = log.start_offset();
    assert_eq!(r.start_offset, start);
    assert!(matches!(
        log.read_range(0, 1, |_| {}),
        Err(Error::BelowStart { requested: 0, .. })
    ));
    assert_eq!(
        collect_range(&mut log, start, 1000).len() as u64,
        300 - start
    );
    // The conversation index forgot deleted records.
    let mut first = None;
    log.read_conversation(0, 0, 1, |f| first = Some(f.header.log_offset))
        .unwrap();
    assert!(first.unwrap() >= start);
    // By age: at t = 1000 s everything sealed is older than 60 s.
    let r = log.enforce_retention(1_000_000).unwrap();
    assert!(r.segments_deleted > 0);
    assert_eq!(log.segment_count(), 1, "only the active segment stays");
    log.sync(0).unwrap();
    drop(log);
    let (log, report) = Log::open(cfg).unwrap();
    assert!(report.sealed_corruption.is_empty());
    assert_eq!(log.next_offset(), 300);
}

#[test]
fn compressed_sealed_segments_read_transparently() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.compress_sealed = true;
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    for i in 0..200u64 {
        log.append(
            &header(5, i + 1, i),
            br#"{"text":"the same words again and again"}"#,
        )
        .unwrap();
    }
    log.sync(0).unwrap();
    let expected = collect_range(&mut log, 0, 1000);
    let mut compressed = 0;
    while log.compress_sealed_once().unwrap().is_some() {
        compressed += 1;
    }
    assert!(compressed >= 2);
    let zst = segment_files(dir.path())
        .iter()
        .filter(|p| p.to_str().unwrap().ends_with(".zst"))
        .count();
    assert_eq!(zst, compressed);
    assert_eq!(collect_range(&mut log, 0, 1000), expected);
    let mut seqs = 0;
    log.read_conversation(5, 0, 1000, |_| seqs += 1).unwrap();
    assert_eq!(seqs, 200);
    let runs = log.file_runs(0, 1 << 20).unwrap();
    assert!(matches!(runs[0].source, RunSource::Memory(_)));
    drop(log);
    let (mut log, report) = Log::open(cfg).unwrap();
    assert!(report.sealed_corruption.is_empty(), "{report:?}");
    assert_eq!(collect_range(&mut log, 0, 1000), expected);
}

/// A forgotten conversation leaves the index (its entries no longer count against
/// `conversation_index_entries_max`, so appends go on) but not the segments; a reopen indexes
/// every record again, even past the limit, instead of refusing to open.
#[test]
fn a_forgotten_conversation_frees_the_index_and_a_reopen_indexes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.conversation_index_entries_max = 4;
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    for s in 1..=3 {
        log.append(&header(1, s, 1), b"one").unwrap();
    }
    log.append(&header(2, 1, 1), b"two").unwrap();
    assert_eq!(log.conversation_index_entries(), 4);
    assert!(matches!(
        log.append(&header(2, 2, 1), b"two"),
        Err(Error::LimitExceeded(_))
    ));
    assert_eq!(log.forget_conversation(1), 3);
    assert_eq!(log.forget_conversation(1), 0);
    assert_eq!(log.conversation_index_entries(), 1);
    assert_eq!(log.conversation_last_seq(1), None);
    for s in 2..=4 {
        log.append(&header(2, s, 1), b"two").unwrap();
    }
    log.sync(0).unwrap();
    let mut seqs = Vec::new();
    log.read_conversation(1, 0, 100, |f| seqs.push(f.header.seq))
        .unwrap();
    assert!(seqs.is_empty());
    log.read_conversation(2, 0, 100, |f| seqs.push(f.header.seq))
        .unwrap();
    assert_eq!(seqs, [1, 2, 3, 4]);
    // The records themselves are all still there.
    assert_eq!(collect_range(&mut log, 0, 100).len(), 7);
    drop(log);
    let (mut log, _) = Log::open(cfg).unwrap();
    assert_eq!(log.conversation_index_entries(), 7);
    let mut seqs = Vec::new();
    log.read_conversation(1, 0, 100, |f| seqs.push(f.header.seq))
        .unwrap();
    assert_eq!(seqs, [1, 2, 3]);
    // Over the limit: appends wait for forgetting.
    assert!(matches!(
        log.append(&header(3, 1, 1), b"three"),
        Err(Error::LimitExceeded(_))
    ));
    log.forget_conversation(2);
    log.append(&header(3, 1, 1), b"three").unwrap();
}

/// Opened without `index_conversations_at_open`, the index starts empty and is built by
/// `read_range_indexing` as the caller reads the log back, forgetting as it goes: it never
/// holds the forgotten conversations' records, and what it holds answers reads and keeps
/// appends' seqs in order as an index built at open would.
#[test]
fn a_log_opened_without_its_index_is_indexed_as_it_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    for s in 1..=3 {
        log.append(&header(1, s, 1), &payload(s, 700)).unwrap();
        log.append(&header(2, s, 1), &payload(s, 700)).unwrap();
    }
    log.append(&frame::Header::new(Kind::Event, 3, 0, 1), b"no seq")
        .unwrap();
    log.sync(0).unwrap();
    assert!(log.segment_count() > 1, "spans segments");
    drop(log);
    cfg.index_conversations_at_open = false;
    let (mut log, _) = Log::open(cfg).unwrap();
    assert_eq!(log.conversation_index_entries(), 0);
    let mut from = log.start_offset();
    let mut seen = Vec::new();
    let mut most = 0;
    loop {
        let (next, unindexed) = log
            .read_range_indexing(from, 2, |fr| {
                seen.push((fr.header.conversation_id, fr.header.seq))
            })
            .unwrap();
        assert_eq!(unindexed, 0);
        most = most.max(log.conversation_index_entries());
        // Conversation 1 is done with once its last record is read.
        if seen.contains(&(1, 3)) {
            log.forget_conversation(1);
        }
        if next == from {
            break;
        }
        from = next;
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(log.conversation_index_entries(), 3);
    assert!(most <= 6, "{most}");
    let mut got = Vec::new();
    log.read_conversation(2, 1, 10, |f| got.push((f.header.seq, f.payload.to_vec())))
        .unwrap();
    assert_eq!(got, [(2, payload(2, 700)), (3, payload(3, 700))]);
    assert!(matches!(
        log.append(&header(2, 3, 1), b"again"),
        Err(Error::SeqNotIncreasing { .. })
    ));
    log.append(&header(2, 4, 1), b"next").unwrap();
}

#[test]
fn limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.conversation_index_entries_max = 3;
    cfg.segments_max = 2;
    let (mut log, _) = Log::open(cfg.clone()).unwrap();
    assert!(matches!(
        log.append(&header(1, 1, 1), &vec![0u8; 1024]),
        Err(Error::RecordTooLarge {
            len: 1072,
            max: 1024
        })
    ));
    let ack = frame::Header::new(Kind::Ack, 1, 1, 1);
    assert!(matches!(
        log.append(&ack, b""),
        Err(Error::NotARecord(Kind::Ack))
    ));
    let mut bad = header(1, 1, 1);
    bad.flags = 4;
    assert!(matches!(log.append(&bad, b""), Err(Error::BadFlags(4))));
    for s in 1..=3 {
        log.append(&header(1, s, 1), b"x").unwrap();
    }
    assert!(matches!(
        log.append(&header(1, 4, 1), b"x"),
        Err(Error::LimitExceeded(_))
    ));
    // seq 0 records are not indexed, so they still fit; then the segment limit bites.
    let err = loop {
        if let Err(e) = log.append(&frame::Header::new(Kind::Event, 1, 0, 1), &[1u8; 500]) {
            break e;
        }
    };
    assert!(matches!(err, Error::LimitExceeded(_)), "{err}");
    assert_eq!(log.segment_count(), 2);
    // A second open of the same directory is refused.
    assert!(matches!(Log::open(cfg.clone()), Err(Error::Locked(_))));
    cfg.segment_bytes_max = 10;
    drop(log);
    assert!(matches!(Log::open(cfg), Err(Error::Config(_))));
}

#[test]
fn directory_is_synced_after_segment_create_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.retention_bytes_max = Some(2 * 4096);
    let (mut log, _) = Log::open(cfg).unwrap();
    log.append(&header(1, 1, 1), b"first").unwrap();
    let job = log.prepare_sync(0).unwrap().unwrap();
    assert!(job.dir().is_none(), "no directory change yet");
    let r = job.run();
    log.complete_sync(job, r).unwrap();
    // Fill past a roll: the next job carries the sealed file, the new one and the directory.
    let segments = log.segment_count();
    let mut seq = 2;
    while log.segment_count() == segments {
        log.append(&header(1, seq, 1), &payload(seq, 300)).unwrap();
        seq += 1;
    }
    let job = log.prepare_sync(0).unwrap().unwrap();
    assert!(job.dir().is_some(), "new segment's entry must be synced");
    assert_eq!(job.files().len(), 2, "sealed and active segment");
    assert_eq!(job.target_offset(), log.next_offset());
    let r = job.run();
    log.complete_sync(job, r).unwrap();
    while log.segment_count() < 4 {
        log.append(&header(1, seq, 1), &payload(seq, 300)).unwrap();
        seq += 1;
    }
    log.sync(0).unwrap();
    assert!(log.enforce_retention(0).unwrap().segments_deleted > 0);
    let job = log
        .prepare_sync(0)
        .unwrap()
        .expect("deletion waits for a sync");
    assert!(job.dir().is_some(), "deleted entries must be synced");
    assert!(job.files().is_empty());
    let r = job.run();
    log.complete_sync(job, r).unwrap();
}

#[test]
fn a_sync_failure_reported_by_the_caller_poisons_too() {
    // The gateway may run the job itself (io_uring fsync); its error poisons the same way.
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(small_cfg(dir.path())).unwrap();
    log.append(&header(1, 1, 1), b"x").unwrap();
    let job = log.prepare_sync(0).unwrap().unwrap();
    let err = log
        .complete_sync(job, Err(std::io::Error::from_raw_os_error(libc_eio())))
        .unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)));
    assert_eq!(log.durable_offset(), 0);
    assert!(!log.sync_due(0), "a poisoned log asks for no more syncs");
    assert!(matches!(
        log.append(&header(1, 2, 1), b"y"),
        Err(Error::Poisoned(_))
    ));
    assert!(matches!(
        log.compress_sealed_once(),
        Ok(None) | Err(Error::Poisoned(_))
    ));
}

#[test]
fn pipelined_syncs_make_records_durable_in_preparation_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.syncs_in_flight_max = 2;
    let (mut log, _) = Log::open(cfg).unwrap();
    log.append(&header(1, 1, 1), b"a").unwrap();
    let first = log.prepare_sync(0).unwrap().expect("pending work");
    // Appends during the first sync start a second one at once.
    log.append(&header(1, 2, 1), b"b").unwrap();
    log.append(&header(1, 3, 1), b"c").unwrap();
    assert!(log.sync_due(0));
    let second = log.prepare_sync(0).unwrap().expect("second in flight");
    assert_eq!((first.target_offset(), second.target_offset()), (1, 3));
    assert_eq!(log.syncs_in_flight(), 2);
    // At the limit: a third waits, whatever is pending.
    log.append(&header(1, 4, 1), b"d").unwrap();
    assert!(!log.sync_due(0));
    assert!(log.prepare_sync(0).unwrap().is_none());

    // The second finishing first proves nothing about what only the first covered.
    let r = second.run();
    assert_eq!(log.complete_sync(second, r).unwrap(), 0);
    assert_eq!(log.durable_offset(), 0);
    assert!(
        collect_range(&mut log, 0, 10).is_empty(),
        "nothing readable yet"
    );
    // The first completes: both apply, in order.
    let r = first.run();
    assert_eq!(log.complete_sync(first, r).unwrap(), 3);
    assert_eq!(collect_range(&mut log, 0, 10).len(), 3);
    assert_eq!(log.syncs_in_flight(), 0);
    assert_eq!(log.sync(0).unwrap(), 4);
}

/// A log with one record in each of two prepared syncs.
fn two_syncs_in_flight(
    dir: &std::path::Path,
) -> (Log, kefu_storage::SyncJob, kefu_storage::SyncJob) {
    let (mut log, _) = Log::open(small_cfg(dir)).unwrap();
    log.append(&header(1, 1, 1), b"a").unwrap();
    let first = log.prepare_sync(0).unwrap().unwrap();
    log.append(&header(1, 2, 1), b"b").unwrap();
    let second = log.prepare_sync(0).unwrap().unwrap();
    (log, first, second)
}

#[test]
fn a_failed_earlier_sync_keeps_a_later_success_from_counting() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, first, second) = two_syncs_in_flight(dir.path());
    let r = second.run();
    assert_eq!(log.complete_sync(second, r).unwrap(), 0);
    // The kernel may have dropped the first job's pages: nothing counts, the log poisons.
    let err = log
        .complete_sync(first, Err(std::io::Error::from_raw_os_error(libc_eio())))
        .unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)));
    assert_eq!(log.durable_offset(), 0);
    assert_eq!(log.syncs_in_flight(), 0);

    // The other order: the first succeeds alone, the second fails; only the first counts.
    let dir = tempfile::tempdir().unwrap();
    let (mut log, first, second) = two_syncs_in_flight(dir.path());
    let r = first.run();
    assert_eq!(log.complete_sync(first, r).unwrap(), 1);
    assert!(
        log.complete_sync(second, Err(std::io::Error::from_raw_os_error(libc_eio())))
            .is_err()
    );
    assert_eq!(log.durable_offset(), 1);
    assert!(!log.sync_due(0));
}

#[test]
fn syncs_in_flight_max_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [0, kefu_storage::SYNCS_IN_FLIGHT_LIMIT + 1] {
        let mut cfg = small_cfg(dir.path());
        cfg.syncs_in_flight_max = bad;
        let err = Log::open(cfg).unwrap_err().to_string();
        assert!(err.contains("syncs_in_flight_max"), "{err}");
    }
}

/// A completed job's file list comes back for the next job: a group commit allocates no list
/// once the first one exists.
#[test]
fn sync_jobs_reuse_the_file_list_of_the_last_completed_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(small_cfg(dir.path())).unwrap();
    log.append(&header(1, 1, 1), b"a").unwrap();
    let job = log.prepare_sync(0).unwrap().expect("pending work");
    let list = job.files().as_ptr();
    let r = job.run();
    log.complete_sync(job, r).unwrap();
    for seq in 2..5 {
        log.append(&header(1, seq, 1), b"b").unwrap();
        let job = log.prepare_sync(0).unwrap().expect("pending work");
        assert_eq!(job.files().len(), 1);
        assert_eq!(job.files().as_ptr(), list, "the same list, seq {seq}");
        let r = job.run();
        log.complete_sync(job, r).unwrap();
    }
}
