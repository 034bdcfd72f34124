//! Helpers shared by the storage integration tests: small configs, record builders and an
//! I/O layer that fails on command.
#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kefu_protocol::frame::{Header, Kind};
use kefu_storage::{Durability, LogConfig, LogIo, StdIo};

/// A config with tiny segments so tests roll often.
pub fn small_cfg(dir: &Path) -> LogConfig {
    let mut cfg = LogConfig::new(dir);
    cfg.segment_bytes_max = 4096;
    cfg.record_bytes_max = 1024;
    cfg.index_interval_bytes = 256;
    cfg.durability = Durability::Always;
    cfg.mapped_segments_max = 3;
    // Pipelined syncs, so the tests see jobs completing out of order.
    cfg.syncs_in_flight_max = 2;
    cfg
}

pub fn header(conversation_id: u64, seq: u64, ts_us: u64) -> Header {
    Header::new(Kind::Message, conversation_id, seq, ts_us)
}

/// Deterministic payload for record `i`, of varying length.
pub fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i as usize).wrapping_mul(31).wrapping_add(j * 7) as u8)
        .collect()
}

/// Real I/O that fails `sync_data`/`sync_dir`/`allocate` while the matching switch is on.
#[derive(Debug, Default)]
pub struct FaultyIo {
    pub fail_sync: AtomicBool,
    pub fail_allocate: AtomicBool,
    pub syncs: AtomicU64,
}

impl FaultyIo {
    pub fn new() -> Arc<FaultyIo> {
        Arc::new(FaultyIo::default())
    }
}

impl LogIo for FaultyIo {
    fn sync_data(&self, file: &File) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        StdIo.sync_data(file)
    }

    fn sync_dir(&self, dir: &File) -> io::Result<()> {
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        StdIo.sync_dir(dir)
    }

    fn allocate(&self, file: &File, len: u64) -> io::Result<()> {
        if self.fail_allocate.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        StdIo.allocate(file, len)
    }
}

/// EIO, the errno a failing disk gives fsync.
pub fn libc_eio() -> i32 {
    5
}

/// Segment files (`.log` and `.log.zst`) in the directory, sorted.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.ends_with(".log") || n.ends_with(".log.zst")
        })
        .collect();
    v.sort();
    v
}
