//! One segment: file naming, the record scan that recovery and index rebuilds share, and the
//! sparse offset index.

use std::path::{Path, PathBuf};

use kefu_protocol::frame::{self, DecodeError, HEADER_LEN, Header};

/// Digits of the zero-padded base offset in a segment's file name (fits any u64).
pub const NAME_DIGITS: usize = 20;
/// Largest offset a log uses (2^63 - 1).
pub const OFFSET_MAX: u64 = i64::MAX as u64;
/// Suffix of a plain segment.
pub const LOG_SUFFIX: &str = ".log";
/// Suffix of a zstd-compressed sealed segment.
pub const ZST_SUFFIX: &str = ".log.zst";
/// Suffix of a file being written (compression); deleted by recovery.
pub const TMP_SUFFIX: &str = ".tmp";

pub fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:0NAME_DIGITS$}{LOG_SUFFIX}"))
}

pub fn zst_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:0NAME_DIGITS$}{ZST_SUFFIX}"))
}

/// What a directory entry is, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Log(u64),
    Zst(u64),
    Tmp,
    Other,
}

pub fn classify(name: &str) -> EntryKind {
    if name.ends_with(TMP_SUFFIX) {
        return EntryKind::Tmp;
    }
    let (stem, zst) = if let Some(stem) = name.strip_suffix(ZST_SUFFIX) {
        (stem, true)
    } else if let Some(stem) = name.strip_suffix(LOG_SUFFIX) {
        (stem, false)
    } else {
        return EntryKind::Other;
    };
    if stem.len() != NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return EntryKind::Other;
    }
    match stem.parse::<u64>() {
        // Offsets stay below 2^63 so `end` arithmetic can never overflow; a larger base is
        // not a file this log wrote.
        Ok(base) if base > OFFSET_MAX => EntryKind::Other,
        Ok(base) if zst => EntryKind::Zst(base),
        Ok(base) => EntryKind::Log(base),
        Err(_) => EntryKind::Other,
    }
}

/// One sparse index entry: the record `base + rel_offset` starts at byte `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub rel_offset: u32,
    pub pos: u32,
}

/// Sparse offset -> position index of one segment; an entry for the first record and then
/// one whenever `interval_bytes` have passed since the previous entry.
#[derive(Debug, Clone, Default)]
pub struct SparseIndex {
    entries: Vec<IndexEntry>,
}

impl SparseIndex {
    pub fn note(&mut self, rel_offset: u32, pos: u32, interval_bytes: u32) {
        let due = match self.entries.last() {
            None => true,
            Some(last) => pos - last.pos >= interval_bytes,
        };
        if due {
            self.entries.push(IndexEntry { rel_offset, pos });
        }
    }

    /// The last entry at or before `rel_offset`.
    pub fn floor(&self, rel_offset: u32) -> Option<IndexEntry> {
        let i = self.entries.partition_point(|e| e.rel_offset <= rel_offset);
        i.checked_sub(1).map(|i| self.entries[i])
    }
}

/// Why a scan stopped before the end of the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// End of data, or only zero bytes (pre-allocated, never written) follow.
    Clean,
    /// Bytes that are not a valid next record follow; `garbage_bytes` counts from the stop
    /// position to the last non-zero byte.
    Damaged { reason: String, garbage_bytes: u64 },
}

/// Result of scanning a segment's bytes from position 0.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Offset after the last valid record.
    pub end: u64,
    /// Bytes of valid records.
    pub valid_len: u64,
    pub index: SparseIndex,
    pub max_timestamp_us: u64,
    pub stop: Stop,
}

/// Walks the records of a segment, checking each CRC and that log offsets are dense from
/// `base`; stops at `end_max` (the next segment's base) or the first bad record.
/// `on_record` sees every valid record with its position.
pub fn scan(
    data: &[u8],
    base: u64,
    end_max: u64,
    interval_bytes: u32,
    mut on_record: impl FnMut(&Header, u32),
) -> Scan {
    let payload_len_max = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut pos = 0usize;
    let mut next = base;
    let mut index = SparseIndex::default();
    let mut max_timestamp_us = 0;
    let stop = loop {
        if pos == data.len() {
            break Stop::Clean;
        }
        let rest = &data[pos..];
        let reason = if next >= end_max.min(OFFSET_MAX) {
            format!("records continue past offset {end_max}, the next segment's base")
        } else {
            match frame::decode(rest, payload_len_max) {
                Ok((f, used)) if f.header.log_offset == next && f.header.kind.is_record() => {
                    let p = pos as u32;
                    index.note((next - base) as u32, p, interval_bytes);
                    max_timestamp_us = max_timestamp_us.max(f.header.timestamp_us);
                    on_record(&f.header, p);
                    pos += used;
                    next += 1;
                    continue;
                }
                Ok((f, _)) if f.header.log_offset != next => format!(
                    "record carries log offset {}, expected {next}",
                    f.header.log_offset
                ),
                Ok((f, _)) => format!("frame kind {:?} is not a record kind", f.header.kind),
                Err(DecodeError::Incomplete { needed }) => {
                    format!("torn record: {needed} bytes missing")
                }
                Err(e) => e.to_string(),
            }
        };
        match last_nonzero(rest) {
            None => break Stop::Clean,
            Some(last) => {
                break Stop::Damaged {
                    reason,
                    garbage_bytes: last as u64 + 1,
                };
            }
        }
    };
    Scan {
        end: next,
        valid_len: pos as u64,
        index,
        max_timestamp_us,
        stop,
    }
}

/// Index of the last non-zero byte, word at a time because pre-allocated tails are long.
pub fn last_nonzero(data: &[u8]) -> Option<usize> {
    let words = data.len() / 8;
    let tail_start = words * 8;
    if let Some(i) = data[tail_start..].iter().rposition(|&b| b != 0) {
        return Some(tail_start + i);
    }
    let mut w = words;
    while w > 0 {
        w -= 1;
        let chunk = &data[w * 8..w * 8 + 8];
        if u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk")) != 0 {
            let i = chunk.iter().rposition(|&b| b != 0).expect("non-zero word");
            return Some(w * 8 + i);
        }
    }
    None
}

/// Position of record `offset` in a segment's bytes, from the sparse index then a walk over
/// headers. `end` is the segment's end offset.
pub fn locate(
    data: &[u8],
    index: &SparseIndex,
    base: u64,
    end: u64,
    offset: u64,
) -> Result<usize, String> {
    if offset < base || offset >= end {
        return Err(format!("offset {offset} outside segment [{base}, {end})"));
    }
    let entry = index
        .floor((offset - base) as u32)
        .ok_or_else(|| "segment has no index".to_string())?;
    let mut pos = entry.pos as usize;
    let mut cur = base + entry.rel_offset as u64;
    while cur < offset {
        let h = frame::peek_header(data.get(pos..).unwrap_or(&[]), u32::MAX)
            .map_err(|e| format!("walking to offset {offset}: {e}"))?;
        pos += h.frame_len();
        cur += 1;
    }
    if pos + HEADER_LEN > data.len() {
        return Err(format!("offset {offset} lies past the segment's bytes"));
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kefu_protocol::frame::Kind;

    fn records(base: u64, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            let mut h = Header::new(Kind::Message, 1, i + 1, 1000 + i);
            h.log_offset = base + i;
            frame::encode_into(&h, &vec![b'x'; (i % 7) as usize * 10], &mut out);
        }
        out
    }

    #[test]
    fn names_roundtrip() {
        let p = log_path(Path::new("/d"), 42);
        assert_eq!(p, Path::new("/d/00000000000000000042.log"));
        assert_eq!(classify("00000000000000000042.log"), EntryKind::Log(42));
        assert_eq!(classify("00000000000000000042.log.zst"), EntryKind::Zst(42));
        assert_eq!(classify("00000000000000000042.log.zst.tmp"), EntryKind::Tmp);
        assert_eq!(classify("42.log"), EntryKind::Other);
        assert_eq!(classify("LOCK"), EntryKind::Other);
        assert_eq!(classify("99999999999999999999.log"), EntryKind::Other);
        assert_eq!(classify("18446744073709551615.log"), EntryKind::Other);
    }

    #[test]
    fn last_nonzero_finds_every_position() {
        for len in 0..40 {
            for at in 0..len {
                let mut v = vec![0u8; len];
                v[at] = 1;
                assert_eq!(last_nonzero(&v), Some(at));
            }
            assert_eq!(last_nonzero(&vec![0u8; len]), None);
        }
    }

    #[test]
    fn scan_stops_cleanly_at_zero_tail_and_reports_garbage() {
        let mut data = records(10, 20);
        let len = data.len();
        data.resize(len + 500, 0);
        let s = scan(&data, 10, u64::MAX, 64, |_, _| {});
        assert_eq!(
            (s.end, s.valid_len, s.stop.clone()),
            (30, len as u64, Stop::Clean)
        );
        assert_eq!(s.max_timestamp_us, 1019);
        data[len + 100] = 7;
        let s = scan(&data, 10, u64::MAX, 64, |_, _| {});
        assert_eq!(s.end, 30);
        assert!(matches!(
            s.stop,
            Stop::Damaged {
                garbage_bytes: 101,
                ..
            }
        ));
        // Every record can be located through the sparse index.
        for off in 10..30 {
            let pos = locate(&data, &s.index, 10, 30, off).unwrap();
            let (f, _) = frame::decode(&data[pos..], u32::MAX).unwrap();
            assert_eq!(f.header.log_offset, off);
        }
    }

    #[test]
    fn scan_rejects_offset_gaps_and_the_next_base() {
        let mut data = records(0, 3);
        data.extend_from_slice(&records(4, 1));
        let s = scan(&data, 0, u64::MAX, 64, |_, _| {});
        assert_eq!(s.end, 3);
        assert!(matches!(s.stop, Stop::Damaged { .. }));
        let data = records(0, 5);
        let s = scan(&data, 0, 3, 64, |_, _| {});
        assert_eq!(s.end, 3);
        assert!(matches!(s.stop, Stop::Damaged { .. }));
    }
}
