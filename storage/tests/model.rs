//! Property test against an in-memory model: random appends, syncs, reads, reopens,
//! simulated power losses (the unsynced tail of the active segment zeroed, garbled,
//! bit-flipped or its file lost), retention and compression. After every step the log
//! equals the model: everything durable is there, nothing partial is visible, and a crash
//! keeps a prefix at least as long as the durable one.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use kefu_protocol::frame::{self, Header, Kind};
use kefu_storage::{Error, Log, LogConfig, RunSource};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append {
        conv: u64,
        len: usize,
        event: bool,
    },
    Sync,
    /// Start a group-commit sync without running it (pipelined: up to two in flight).
    Prepare,
    /// Run and complete one of the syncs in flight, in any order.
    Complete {
        pick: usize,
    },
    ReadRange {
        from: u64,
        max: usize,
    },
    ReadConv {
        conv: u64,
        after: u64,
        limit: usize,
    },
    FileRuns {
        from: u64,
        max_bytes: u64,
    },
    Reopen,
    Crash {
        seed: u64,
        mode: u8,
    },
    Retention,
    Compress,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0u64..4, 0usize..300, proptest::bool::weighted(0.2))
            .prop_map(|(conv, len, event)| Op::Append { conv, len, event }),
        3 => Just(Op::Sync),
        2 => Just(Op::Prepare),
        2 => any::<usize>().prop_map(|pick| Op::Complete { pick }),
        2 => (0u64..400, 1usize..50).prop_map(|(from, max)| Op::ReadRange { from, max }),
        2 => (0u64..4, 0u64..60, 1usize..20)
            .prop_map(|(conv, after, limit)| Op::ReadConv { conv, after, limit }),
        1 => (0u64..400, 1u64..3000).prop_map(|(from, max_bytes)| Op::FileRuns { from, max_bytes }),
        1 => Just(Op::Reopen),
        2 => (any::<u64>(), 0u8..5).prop_map(|(seed, mode)| Op::Crash { seed, mode }),
        1 => Just(Op::Retention),
        1 => Just(Op::Compress),
    ]
}

#[derive(Debug, Clone)]
struct Rec {
    conv: u64,
    seq: u64,
    len: usize,
}

struct Model {
    recs: Vec<Rec>,
    durable: u64,
    start: u64,
}

impl Model {
    fn next_seq(&self, conv: u64) -> u64 {
        self.recs
            .iter()
            .rev()
            .find(|r| r.conv == conv && r.seq != 0)
            .map_or(1, |r| r.seq + 1)
    }

    fn payload(off: u64, len: usize) -> Vec<u8> {
        payload(off, len)
    }
}

fn cfg(dir: &Path) -> LogConfig {
    let mut c = small_cfg(dir);
    c.retention_bytes_max = Some(4 * 4096);
    c.compress_sealed = true;
    c.mapped_segments_max = 2;
    // Spare segments too: rolls into a zero-filled spare, and early rolls out of a fallocated
    // segment, whenever the background thread happens to be done.
    c.zero_fill_segments = true;
    c
}

/// Power loss after a roll: the first sealed segment holding unsynced records loses them
/// (its pages never reached the disk), while later segments survive.
fn lose_sealed_unsynced_tail(dir: &Path, durable: u64) {
    let files = segment_files(dir);
    for f in &files[..files.len().saturating_sub(1)] {
        if !f.to_str().unwrap().ends_with(".log") {
            continue;
        }
        let mut bytes = fs::read(f).unwrap();
        let mut pos = 0;
        while let Ok((fr, used)) = frame::decode(&bytes[pos..], u32::MAX) {
            if fr.header.log_offset >= durable {
                bytes[pos..].fill(0);
                fs::write(f, &bytes).unwrap();
                return;
            }
            pos += used;
        }
    }
}

/// Power loss: damages what lies at or after the durable offset in the active segment.
fn lose_unsynced_tail(dir: &Path, durable: u64, seed: u64, mode: u8) {
    if mode == 4 {
        lose_sealed_unsynced_tail(dir, durable);
        return;
    }
    let files = segment_files(dir);
    let last = files.last().unwrap();
    if !last.to_str().unwrap().ends_with(".log") {
        return;
    }
    let base: u64 = last.file_name().unwrap().to_str().unwrap()[..20]
        .parse()
        .unwrap();
    if mode == 3 {
        // The newest segment was created after the last sync: its directory entry is lost.
        if base >= durable && files.len() > 1 {
            fs::remove_file(last).unwrap();
        }
        return;
    }
    let mut bytes = fs::read(last).unwrap();
    // Position of the first record that is not durable, and the end of the records.
    let mut pos = 0;
    let mut first_unsynced = None;
    while let Ok((f, used)) = frame::decode(&bytes[pos..], u32::MAX) {
        if f.header.log_offset >= durable && first_unsynced.is_none() {
            first_unsynced = Some(pos);
        }
        pos += used;
    }
    let end = pos;
    let Some(from) = first_unsynced else { return };
    let span = (end - from) as u64;
    let cut = from + (seed % (span + 1)) as usize;
    match mode {
        0 => bytes[cut..end].fill(0),
        1 => {
            bytes[cut..end].fill(0);
            let garbage = ((seed >> 8) % 64) as usize;
            let stop = (cut + garbage).min(bytes.len());
            for (i, b) in bytes[cut..stop].iter_mut().enumerate() {
                *b = (seed >> (i % 7)) as u8 | 0x80;
            }
        }
        _ => {
            if cut < end {
                bytes[cut] ^= 1 << ((seed >> 16) % 8);
            }
        }
    }
    fs::write(last, &bytes).unwrap();
}

fn check_all(log: &mut Log, m: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.next_offset(), m.recs.len() as u64);
    prop_assert_eq!(log.durable_offset(), m.durable);
    prop_assert_eq!(log.start_offset(), m.start);
    let mut next = m.start;
    let end = log.read_range(m.start, usize::MAX, |f| {
        assert_eq!(f.header.log_offset, next);
        let r = &m.recs[next as usize];
        assert_eq!((f.header.conversation_id, f.header.seq), (r.conv, r.seq));
        assert_eq!(f.payload, &Model::payload(next, r.len)[..]);
        next += 1;
    });
    match end {
        Ok(end) => prop_assert_eq!(end, m.durable.max(m.start)),
        // Retention may have deleted records that were never synced.
        Err(Error::BelowStart { .. }) => prop_assert!(m.start > m.durable),
        Err(e) => return Err(TestCaseError::fail(format!("read_range: {e}"))),
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(cfg(dir.path())).unwrap();
    let mut m = Model {
        recs: Vec::new(),
        durable: 0,
        start: 0,
    };
    // Syncs in flight, oldest first: the job (None once completed) and its target.
    let mut in_flight: Vec<(Option<kefu_storage::SyncJob>, u64)> = Vec::new();
    // Durability advances over the completed prefix only.
    let apply = |in_flight: &mut Vec<(Option<kefu_storage::SyncJob>, u64)>, m: &mut Model| {
        while in_flight.first().is_some_and(|(job, _)| job.is_none()) {
            let (_, target) = in_flight.remove(0);
            m.durable = m.durable.max(target);
        }
    };
    for op in ops {
        match op {
            Op::Prepare => {
                if let Some(job) = log.prepare_sync(0).unwrap() {
                    prop_assert!(in_flight.len() < 2, "at most syncs_in_flight_max");
                    prop_assert_eq!(job.target_offset(), m.recs.len() as u64);
                    let target = job.target_offset();
                    in_flight.push((Some(job), target));
                }
            }
            Op::Complete { pick } => {
                let open: Vec<usize> = (0..in_flight.len())
                    .filter(|&i| in_flight[i].0.is_some())
                    .collect();
                if !open.is_empty() {
                    let i = open[pick % open.len()];
                    let job = in_flight[i].0.take().unwrap();
                    let r = job.run();
                    let durable = log.complete_sync(job, r).unwrap();
                    apply(&mut in_flight, &mut m);
                    prop_assert_eq!(durable, m.durable);
                }
            }
            Op::Append { conv, len, event } => {
                let seq = if event { 0 } else { m.next_seq(conv) };
                let kind = if event { Kind::Event } else { Kind::Message };
                let off = m.recs.len() as u64;
                let h = Header::new(kind, conv, seq, off);
                prop_assert_eq!(log.append(&h, &Model::payload(off, len)).unwrap(), off);
                m.recs.push(Rec { conv, seq, len });
            }
            Op::Sync => {
                // The caller's syncs in flight end first (in order), then one covers the rest.
                for (slot, _) in in_flight.iter_mut() {
                    if let Some(job) = slot.take() {
                        let r = job.run();
                        log.complete_sync(job, r).unwrap();
                    }
                }
                apply(&mut in_flight, &mut m);
                m.durable = log.sync(0).unwrap();
                prop_assert_eq!(m.durable, m.recs.len() as u64);
            }
            Op::ReadRange { from, max } => {
                let mut got = Vec::new();
                let r = log.read_range(from, max, |f| got.push(f.header.log_offset));
                if from < m.start {
                    prop_assert!(matches!(r, Err(Error::BelowStart { .. })), "{:?}", r);
                } else {
                    let want: Vec<u64> = (from..m.durable).take(max).collect();
                    prop_assert_eq!(r.unwrap(), from.max(want.last().map_or(from, |l| l + 1)));
                    prop_assert_eq!(got, want);
                }
            }
            Op::ReadConv { conv, after, limit } => {
                let mut got = Vec::new();
                let n = log
                    .read_conversation(conv, after, limit, |f| {
                        got.push((f.header.seq, f.header.log_offset))
                    })
                    .unwrap();
                let want: Vec<(u64, u64)> = m
                    .recs
                    .iter()
                    .enumerate()
                    .map(|(o, r)| (o as u64, r))
                    .filter(|(o, r)| {
                        r.conv == conv && r.seq > after && *o >= m.start && *o < m.durable
                    })
                    .map(|(o, r)| (r.seq, o))
                    .take(limit)
                    .collect();
                prop_assert_eq!(n, want.len());
                prop_assert_eq!(got, want);
            }
            Op::FileRuns { from, max_bytes } => {
                let r = log.file_runs(from, max_bytes);
                if from < m.start {
                    prop_assert!(matches!(r, Err(Error::BelowStart { .. })), "{:?}", r);
                    continue;
                }
                let mut offsets = Vec::new();
                let mut total = 0;
                for run in r.unwrap() {
                    let bytes = match &run.source {
                        RunSource::File(f) => {
                            let mut b = vec![0u8; run.len as usize];
                            std::os::unix::fs::FileExt::read_exact_at(&**f, &mut b, run.position)
                                .unwrap();
                            b
                        }
                        RunSource::Memory(v) => {
                            v[run.position as usize..(run.position + run.len) as usize].to_vec()
                        }
                    };
                    total += run.len;
                    let mut rest = &bytes[..];
                    while !rest.is_empty() {
                        let (f, used) = frame::decode(rest, u32::MAX).unwrap();
                        offsets.push(f.header.log_offset);
                        rest = &rest[used..];
                    }
                    prop_assert_eq!(offsets.last().copied(), Some(run.end_offset - 1));
                }
                let want: Vec<u64> = (from..m.durable).take(offsets.len()).collect();
                prop_assert_eq!(&offsets, &want);
                if from < m.durable {
                    prop_assert!(!offsets.is_empty());
                    prop_assert!(total <= max_bytes || offsets.len() == 1);
                }
            }
            Op::Reopen => {
                // A process crash: the page cache keeps every appended byte.
                in_flight.clear();
                drop(log);
                let (l, report) = Log::open(cfg(dir.path())).unwrap();
                log = l;
                prop_assert_eq!(report.truncated, None);
                m.durable = m.recs.len() as u64;
            }
            Op::Crash { seed, mode } => {
                // Syncs in flight never ran: their records may be lost like any unsynced tail.
                in_flight.clear();
                drop(log);
                lose_unsynced_tail(dir.path(), m.durable, seed, mode);
                let (l, report) = Log::open(cfg(dir.path())).unwrap();
                log = l;
                prop_assert!(report.sealed_corruption.is_empty(), "{:?}", report);
                let recovered = log.next_offset();
                prop_assert!(
                    recovered >= m.durable && recovered <= m.recs.len() as u64,
                    "recovered {} of {} with {} durable",
                    recovered,
                    m.recs.len(),
                    m.durable
                );
                m.recs.truncate(recovered as usize);
                m.durable = recovered;
                m.start = m.start.min(recovered);
                prop_assert_eq!(log.start_offset(), m.start);
            }
            Op::Retention => {
                let r = log.enforce_retention(0).unwrap();
                prop_assert!(r.start_offset >= m.start);
                m.start = r.start_offset;
                prop_assert!(log.disk_bytes() <= 4 * 4096 || log.segment_count() == 1);
            }
            Op::Compress => {
                log.compress_sealed_once().unwrap();
            }
        }
        check_all(&mut log, &m)?;
        for conv in 0..4 {
            let want = m.next_seq(conv) - 1;
            prop_assert_eq!(log.conversation_last_seq(conv).unwrap_or(0), want);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}
