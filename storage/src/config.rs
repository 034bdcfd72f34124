//! Log configuration: every limit of a shard log, checked once at open.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use kefu_protocol::frame::HEADER_LEN;

use crate::io::{LogIo, StdIo};

/// When appended bytes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// An append counts as durable only once a sync covering it completed; the caller groups
    /// many appends under one sync (group commit).
    Always,
    /// The caller syncs at least every this many milliseconds; power loss can lose that window.
    IntervalMs(u64),
    /// Page cache only: a process crash loses nothing, power loss can lose anything unsynced.
    Never,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::IntervalMs(5)
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Always => f.write_str("always"),
            Durability::IntervalMs(ms) => write!(f, "interval:{ms}"),
            Durability::Never => f.write_str("never"),
        }
    }
}

/// `"always"`, `"interval:MS"` (MS >= 1) or `"never"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid durability {0:?}: expected always, interval:MS (MS >= 1) or never")]
pub struct ParseDurabilityError(pub String);

impl FromStr for Durability {
    type Err = ParseDurabilityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => return Ok(Durability::Always),
            "never" => return Ok(Durability::Never),
            _ => {}
        }
        let ms = s
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms >= 1)
            .ok_or_else(|| ParseDurabilityError(s.to_string()))?;
        Ok(Durability::IntervalMs(ms))
    }
}

/// Upper bound of [`LogConfig::syncs_in_flight_max`]: more concurrent syncs of one file only
/// queue in the kernel.
pub const SYNCS_IN_FLIGHT_LIMIT: usize = 8;

/// Every knob and limit of one shard log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The shard's directory; created if missing.
    pub dir: PathBuf,
    /// Size a segment file is pre-allocated to; a segment rolls when the next record does
    /// not fit. Positions inside a segment are `u32`, so at most 4 GiB - 1.
    pub segment_bytes_max: u64,
    /// Largest record (header + payload) an append accepts.
    pub record_bytes_max: u32,
    pub durability: Durability,
    /// Group-commit syncs that may run at once (1, the default: strictly one after the other).
    /// With 2, records appended while a sync runs start their own sync at once instead of
    /// waiting for it to end; durability still advances in order (see
    /// [`crate::Log::complete_sync`]). Worth it where a sync is slow next to its CPU cost
    /// (a busy or remote disk); on a quiet local disk the second sync mostly waits for the
    /// first's write of the shared tail page and only adds CPU.
    pub syncs_in_flight_max: usize,
    /// Delete the oldest segments while the log is larger than this (the active segment is
    /// never deleted).
    pub retention_bytes_max: Option<u64>,
    /// Delete the oldest segments whose newest record is older than this.
    pub retention_age_ms: Option<u64>,
    /// One sparse offset-index entry per this many bytes of records.
    pub index_interval_bytes: u32,
    /// Let [`crate::Log::compress_sealed_once`] rewrite sealed segments with zstd.
    pub compress_sealed: bool,
    /// zstd level for sealed segments (1..=19).
    pub zstd_level: i32,
    /// Sealed segments kept mapped (or decompressed) at once for reads; each holds one file
    /// descriptor and its mapping or decompressed bytes.
    pub mapped_segments_max: usize,
    /// Segments the log may hold; an append that would roll past it fails until retention
    /// deletes some.
    pub segments_max: usize,
    /// Entries (one per record with `seq > 0`) of the in-memory conversation index, 24 bytes
    /// each; an append past it fails until retention or [`crate::Log::forget_conversation`]
    /// frees entries. Not checked when a log opens: the index then holds every record of the
    /// segments, and the caller forgets the conversations it is done with.
    pub conversation_index_entries_max: usize,
    /// Write segments full of zeros ahead of time (the first in [`crate::Log::open`], the
    /// next on a background thread) and append into those (see the crate docs' "Spare
    /// segment"). A `fallocate`d segment holds unwritten extents: each sync that covers a
    /// newly written block must also convert the extent and write the inode, an extra device
    /// round trip. Costs one spare segment of disk, one segment of zero writes at open and
    /// one per `segment_bytes_max` of records.
    pub zero_fill_segments: bool,
    /// Build the conversation index while [`crate::Log::open`] scans the segments (every
    /// record of the log, 24 bytes each). `false`: open leaves it empty, and the caller indexes
    /// as it reads the log back with [`crate::Log::read_range_indexing`], forgetting the
    /// conversations it is done with as it goes, so the index of a long log never holds all
    /// of it at once. Appends must wait until that read is done.
    pub index_conversations_at_open: bool,
    /// The file-system calls that can fail in interesting ways (sync, allocate), replaceable
    /// to inject faults in tests.
    pub io: Arc<dyn LogIo>,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, 1 MiB records, `interval:5`, no retention, an index entry
    /// per 4 KiB, no compression, no zero-filled spare segment.
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            segment_bytes_max: 64 << 20,
            record_bytes_max: 1 << 20,
            durability: Durability::default(),
            syncs_in_flight_max: 1,
            retention_bytes_max: None,
            retention_age_ms: None,
            index_interval_bytes: 4096,
            compress_sealed: false,
            zstd_level: 3,
            mapped_segments_max: 16,
            segments_max: 10_000,
            conversation_index_entries_max: 16 << 20,
            zero_fill_segments: false,
            index_conversations_at_open: true,
            io: Arc::new(StdIo),
        }
    }

    /// Largest payload a record may carry.
    pub fn payload_len_max(&self) -> u32 {
        self.record_bytes_max - HEADER_LEN as u32
    }

    /// Checks every limit and their relationships; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        const SEGMENT_MIN: u64 = 4096;
        if self.segment_bytes_max < SEGMENT_MIN || self.segment_bytes_max > u32::MAX as u64 {
            return Err(format!(
                "segment_bytes_max {} must be in {SEGMENT_MIN}..={}",
                self.segment_bytes_max,
                u32::MAX
            ));
        }
        if (self.record_bytes_max as usize) <= HEADER_LEN
            || self.record_bytes_max as u64 > self.segment_bytes_max
        {
            return Err(format!(
                "record_bytes_max {} must be above the {HEADER_LEN}-byte header and at most segment_bytes_max {}",
                self.record_bytes_max, self.segment_bytes_max
            ));
        }
        if let Durability::IntervalMs(0) = self.durability {
            return Err("durability interval must be at least 1 ms".into());
        }
        if let Some(max) = self.retention_bytes_max
            && max < self.segment_bytes_max
        {
            return Err(format!(
                "retention_bytes_max {max} must be at least segment_bytes_max {}",
                self.segment_bytes_max
            ));
        }
        if self.retention_age_ms == Some(0) {
            return Err("retention_age_ms must be at least 1".into());
        }
        if self.index_interval_bytes == 0
            || self.index_interval_bytes as u64 > self.segment_bytes_max
        {
            return Err(format!(
                "index_interval_bytes {} must be in 1..=segment_bytes_max",
                self.index_interval_bytes
            ));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(format!("zstd_level {} must be in 1..=19", self.zstd_level));
        }
        if !(1..=SYNCS_IN_FLIGHT_LIMIT).contains(&self.syncs_in_flight_max) {
            return Err(format!(
                "syncs_in_flight_max {} must be in 1..={SYNCS_IN_FLIGHT_LIMIT}",
                self.syncs_in_flight_max
            ));
        }
        if self.mapped_segments_max == 0 {
            return Err("mapped_segments_max must be at least 1".into());
        }
        if self.segments_max < 2 {
            return Err("segments_max must be at least 2".into());
        }
        if self.conversation_index_entries_max == 0 {
            return Err("conversation_index_entries_max must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_parses_and_prints() {
        for (s, d) in [
            ("always", Durability::Always),
            ("never", Durability::Never),
            ("interval:5", Durability::IntervalMs(5)),
            ("interval:300", Durability::IntervalMs(300)),
        ] {
            assert_eq!(s.parse::<Durability>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        for bad in [
            "",
            "Always",
            "interval:",
            "interval:0",
            "interval:-1",
            "interval:x",
            "sometimes",
        ] {
            assert!(bad.parse::<Durability>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_validate_and_bad_limits_are_named() {
        let cfg = LogConfig::new("/tmp/x");
        cfg.validate().unwrap();
        let check = |f: &dyn Fn(&mut LogConfig), word: &str| {
            let mut c = LogConfig::new("/tmp/x");
            f(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.contains(word), "{err}");
        };
        check(&|c| c.segment_bytes_max = 100, "segment_bytes_max");
        check(&|c| c.segment_bytes_max = 1 << 33, "segment_bytes_max");
        check(&|c| c.record_bytes_max = 48, "record_bytes_max");
        check(
            &|c| c.record_bytes_max = (c.segment_bytes_max + 1) as u32,
            "record_bytes_max",
        );
        check(&|c| c.retention_bytes_max = Some(10), "retention_bytes_max");
        check(&|c| c.retention_age_ms = Some(0), "retention_age_ms");
        check(&|c| c.index_interval_bytes = 0, "index_interval_bytes");
        check(&|c| c.zstd_level = 30, "zstd_level");
        check(&|c| c.mapped_segments_max = 0, "mapped_segments_max");
        check(&|c| c.segments_max = 1, "segments_max");
        check(
            &|c| c.conversation_index_entries_max = 0,
            "conversation_index_entries_max",
        );
        check(&|c| c.durability = Durability::IntervalMs(0), "interval");
    }
}
