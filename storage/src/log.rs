//! The shard log: append, group-committed sync, recovery, reads, retention and compression.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kefu_protocol::frame::{self, FLAGS_KNOWN, FrameRef, HEADER_LEN, Header};
use memmap2::{Mmap, MmapMut};

use crate::config::{Durability, LogConfig};
use crate::error::{Error, Result};
use crate::io::SharedIo;
use crate::segment::{self, EntryKind, SparseIndex, Stop};

/// Name of the lock file that keeps a second process from opening the same log.
const LOCK_NAME: &str = "LOCK";
/// Name of the checkpoint file: a lower bound of the durable offset (see [`Checkpoint`]).
const CHECKPOINT_NAME: &str = "CHECKPOINT";
const CHECKPOINT_LEN: usize = 16;
/// Name of the spare segment while it is being zero-filled. It ends in `.tmp`, so
/// [`Log::open`] deletes one that a crash or a close left half-written.
const SPARE_FILLING_NAME: &str = "next-segment.tmp";
/// Name of a finished spare (renamed from [`SPARE_FILLING_NAME`] after its `fdatasync`). It
/// outlives the log, and the next [`Log::open`] adopts it instead of writing another.
const SPARE_NAME: &str = "next-segment.spare";
/// The spare is zeroed in chunks of this size, each written back before the next, so the
/// device never has more than one chunk of it queued ahead of a group-commit sync.
const ZERO_FILL_CHUNK_BYTES: u64 = 256 << 10;
/// Pace of zero-filling: at most this many bytes per second (one 64 MiB segment in half a
/// second), so it takes little of the device from the syncs that acknowledgements wait for.
const ZERO_FILL_BYTES_PER_S: u64 = 128 << 20;
/// Start preparing the next spare once the active segment is this fraction (1/n) full: late
/// enough that a burst of traffic right after a roll does not share the device with the
/// zeros, early enough that the spare is ready (it takes half a second) unless records arrive
/// at over 64 MiB/s. The first spare is made by [`Log::open`] before it returns.
const SPARE_START_DIVISOR: u64 = 2;

/// The durable offset, recorded after each completed sync without a sync of its own, so it
/// is a lower bound: every record below it was acknowledged. Recovery uses it to tell a torn
/// unsynced tail (cut it, even inside a sealed segment) from damage to acknowledged records
/// (report it). Layout: offset u64 LE, crc32c of those 8 bytes u32 LE, 4 zero bytes.
///
/// It is written through a shared mapping of the file, a 16-byte store after each sync: the
/// `pwrite` it replaced cost about 10 us per sync (with its inode time update), 2% of a busy
/// shard. The kernel writes the page back in its own time, as it did the `pwrite`'s.
struct Checkpoint {
    map: MmapMut,
}

impl Checkpoint {
    fn open(dir: &Path) -> Result<(Checkpoint, Option<u64>)> {
        let path = dir.join(CHECKPOINT_NAME);
        let file = open_or_create(&path)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        // A new file (or one a crash left short) reads as zeros: no valid checkpoint.
        if len < CHECKPOINT_LEN as u64 {
            file.set_len(CHECKPOINT_LEN as u64)
                .map_err(|e| Error::io("extend", &path, e))?;
        }
        // SAFETY: the log's directory lock keeps other kefu processes out of this file; a
        // foreign writer can only make the checkpoint invalid, which its CRC catches.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(CHECKPOINT_LEN)
                .map_mut(&file)
        }
        .map_err(|e| Error::io("mmap", &path, e))?;
        let offset = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(map[8..12].try_into().expect("4 bytes"));
        // A torn, zero or foreign checkpoint counts as none: recovery then only reports.
        let value = (crc == crc32c::crc32c(&map[..8])).then_some(offset);
        Ok((Checkpoint { map }, value))
    }

    /// Best effort: a lost write leaves an older, lower value, which only makes recovery
    /// report instead of cut.
    fn record(&mut self, offset: u64) {
        let mut buf = [0u8; CHECKPOINT_LEN];
        buf[..8].copy_from_slice(&offset.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..8]);
        buf[8..12].copy_from_slice(&crc.to_le_bytes());
        self.map.copy_from_slice(&buf);
    }
}

/// One record of a conversation in the conversation index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConvEntry {
    seq: u64,
    offset: u64,
    pos: u32,
}

/// The conversation index: conversation id -> its records with `seq > 0`, in seq (and
/// offset) order.
#[derive(Debug, Default)]
struct ConvIndex {
    map: HashMap<u64, Vec<ConvEntry>>,
    entries: usize,
}

impl ConvIndex {
    fn last_seq(&self, conversation_id: u64) -> Option<u64> {
        self.map
            .get(&conversation_id)
            .and_then(|v| v.last())
            .map(|e| e.seq)
    }

    /// Adds a record; false if its seq does not follow the conversation's last one.
    fn push(&mut self, conversation_id: u64, e: ConvEntry) -> bool {
        let v = self.map.entry(conversation_id).or_default();
        if v.last().is_some_and(|last| last.seq >= e.seq) {
            return false;
        }
        v.push(e);
        self.entries += 1;
        true
    }

    /// Drops entries of records at or above `end` (cut by recovery).
    fn truncate_from(&mut self, end: u64) {
        let mut removed = 0;
        self.map.retain(|_, v| {
            let keep = v.partition_point(|e| e.offset < end);
            removed += v.len() - keep;
            v.truncate(keep);
            !v.is_empty()
        });
        self.entries -= removed;
    }

    /// Drops a conversation's entries; how many there were.
    fn forget(&mut self, conversation_id: u64) -> usize {
        let removed = self.map.remove(&conversation_id).map_or(0, |v| v.len());
        self.entries -= removed;
        removed
    }

    /// Drops entries of records below `start` (deleted by retention).
    fn prune_below(&mut self, start: u64) {
        let mut removed = 0;
        self.map.retain(|_, v| {
            let cut = v.partition_point(|e| e.offset < start);
            removed += cut;
            v.drain(..cut);
            !v.is_empty()
        });
        self.entries -= removed;
    }
}

/// Where a segment's bytes are, if they are loaded.
enum SegState {
    /// The segment appends go to: pre-allocated, mapped writable, always loaded.
    /// `zero_filled`: it was a spare whose blocks are all written (no unwritten extents).
    Active {
        file: Arc<File>,
        map: MmapMut,
        zero_filled: bool,
    },
    /// A sealed plain segment; mapped on demand, bounded by `mapped_segments_max`.
    Plain { cache: Option<PlainCache> },
    /// A sealed zstd segment; decompressed on demand, bounded like `Plain`.
    Compressed { cache: Option<Arc<Vec<u8>>> },
}

struct PlainCache {
    file: Arc<File>,
    /// `None` when the segment holds no bytes (a zero-length mapping is an error).
    map: Option<Mmap>,
}

struct Segment {
    base: u64,
    /// Offset after the segment's last readable record.
    end: u64,
    /// Bytes of readable records from position 0.
    len: u64,
    index: SparseIndex,
    max_timestamp_us: u64,
    /// Bytes the segment occupies on disk, for retention by size.
    disk_bytes: u64,
    state: SegState,
}

impl Segment {
    fn is_loaded(&self) -> bool {
        match &self.state {
            SegState::Active { .. } => true,
            SegState::Plain { cache } => cache.is_some(),
            SegState::Compressed { cache } => cache.is_some(),
        }
    }

    /// The readable bytes; empty if not loaded (callers load first).
    fn data(&self) -> &[u8] {
        let len = self.len as usize;
        match &self.state {
            SegState::Active { map, .. } => &map[..len],
            SegState::Plain {
                cache: Some(PlainCache { map: Some(m), .. }),
            } => &m[..len],
            SegState::Compressed { cache: Some(v) } => &v[..len],
            _ => &[],
        }
    }

    fn drop_cache(&mut self) {
        match &mut self.state {
            SegState::Active { .. } => {}
            SegState::Plain { cache } => *cache = None,
            SegState::Compressed { cache } => *cache = None,
        }
    }
}

/// A torn or corrupt tail that recovery cut off the active segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub segment_base: u64,
    /// First offset that was not recovered (the new next offset).
    pub offset: u64,
    /// Byte position of the cut inside the segment.
    pub position: u64,
    /// Non-zero bytes removed after the cut.
    pub bytes_cut: u64,
    pub reason: String,
}

/// Damage inside a sealed segment: records `[offset, expected_end)` are unreadable.
/// Recovery keeps the segment (and everything after it) and reports instead of skipping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedCorruption {
    pub segment_base: u64,
    pub offset: u64,
    pub expected_end: u64,
    pub position: u64,
    pub reason: String,
}

/// What [`Log::open`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub record_bytes: u64,
    pub start_offset: u64,
    pub next_offset: u64,
    pub truncated: Option<Truncation>,
    pub sealed_corruption: Vec<SealedCorruption>,
    /// Leftovers of interrupted operations that recovery deleted.
    pub removed_files: Vec<PathBuf>,
    /// The durable offset the previous run recorded (a lower bound). If `next_offset` ended
    /// below it, acknowledged records were lost. `None`: no valid checkpoint, so damage in
    /// sealed segments is only reported, never cut.
    pub checkpoint: Option<u64>,
    /// Records whose seq did not follow their conversation's last seq; readable by offset,
    /// left out of the conversation index.
    pub unindexed_records: u64,
}

/// What [`Log::enforce_retention`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    pub start_offset: u64,
}

/// Where the bytes of a [`FileRun`] live.
#[derive(Debug, Clone)]
pub enum RunSource {
    /// A segment file: hand `(fd, position, len)` to `sendfile`.
    File(Arc<File>),
    /// A compressed segment's decompressed bytes: write `bytes[position..position+len]`.
    Memory(Arc<Vec<u8>>),
}

/// A run of whole, CRC-checked-on-write records `[first_offset, end_offset)`, raw frame bytes.
#[derive(Debug, Clone)]
pub struct FileRun {
    pub source: RunSource,
    pub position: u64,
    pub len: u64,
    pub first_offset: u64,
    pub end_offset: u64,
}

/// One group-commit sync: the files written since the previous one (and the directory when
/// a segment was created or deleted). Run it anywhere (a flusher thread, an io_uring fsync
/// per fd), then hand the result to [`Log::complete_sync`]. It owns its descriptors, so it
/// stays valid even if segments are deleted meanwhile.
#[derive(Debug)]
#[must_use = "a prepared sync must be completed, or the log never syncs again"]
pub struct SyncJob {
    /// Order of preparation: completions are applied in this order.
    id: u64,
    files: Vec<Arc<File>>,
    dir: Option<Arc<File>>,
    target_offset: u64,
    io: SharedIo,
}

impl SyncJob {
    /// Records below this offset are durable once the job succeeds.
    pub fn target_offset(&self) -> u64 {
        self.target_offset
    }

    /// Files to `fdatasync`.
    pub fn files(&self) -> &[Arc<File>] {
        &self.files
    }

    /// Directory to `fsync`, if its entries changed.
    pub fn dir(&self) -> Option<&Arc<File>> {
        self.dir.as_ref()
    }

    /// Runs the syncs through the log's I/O layer (blocking).
    pub fn run(&self) -> io::Result<()> {
        for f in &self.files {
            self.io.sync_data(f)?;
        }
        if let Some(d) = &self.dir {
            self.io.sync_dir(d)?;
        }
        Ok(())
    }
}

/// A prepared sync, until it and every earlier one completed.
#[derive(Debug)]
struct InFlightSync {
    id: u64,
    target_offset: u64,
    done: bool,
}

/// `MADV_RANDOM` on an active segment's mapping: no read-around on its page faults, so the
/// page cache holds the segment in 4 KiB folios. Read-around builds large folios, and a write
/// fault marks a whole folio dirty, so every group commit wrote the entire folio again
/// (measured: 1.5 GB/s to disk for 17 MB/s of records, 30 KB per acknowledged message; with
/// the advice 22 MB/s). Advice only: failure changes speed, never correctness.
fn advise_active(map: &MmapMut) {
    let _ = map.advise(memmap2::Advice::Random);
}

/// `rename` that fails instead of replacing an existing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Decompresses a `.log.zst` segment into exactly its recorded size (which compression
/// always writes), refusing anything over the 4 GiB a segment can hold.
fn decompress_segment(raw: &[u8]) -> io::Result<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(raw)
        .ok()
        .flatten()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "zstd frame without a content size",
            )
        })?;
    if size > u32::MAX as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("zstd segment claims {size} bytes, over the 4 GiB segment limit"),
        ));
    }
    zstd::bulk::decompress(raw, size as usize)
}

/// Positions inside a segment are `u32`; a longer file is not one this log wrote.
fn check_segment_len(base: u64, len: u64) -> Result<()> {
    if len > u32::MAX as u64 {
        return Err(Error::Corrupt {
            offset: base,
            segment_base: base,
            reason: format!("segment file of {len} bytes exceeds the 4 GiB segment limit"),
        });
    }
    Ok(())
}

/// Opens a small bookkeeping file of the log for reading and writing, creating it empty if
/// missing (never truncating it).
fn open_or_create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// Takes an exclusive `flock` on the log's lock file, so two processes never write one log.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_NAME);
    let f = open_or_create(&path)?;
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Locked(dir.to_path_buf()));
        }
        return Err(Error::io("flock", &path, e));
    }
    Ok(f)
}

/// A durable append-only log of one shard. Single-threaded: the shard thread owns it.
pub struct Log {
    cfg: LogConfig,
    dir: Arc<File>,
    _lock: File,
    checkpoint: Checkpoint,
    segments: BTreeMap<u64, Segment>,
    conv: ConvIndex,
    next_offset: u64,
    durable_offset: u64,
    /// Sealed files written since the last prepared sync.
    dirty_files: Vec<Arc<File>>,
    /// The file list of the last completed sync job, emptied, for the next job (a sync
    /// allocates no list).
    spare_files: Vec<Arc<File>>,
    active_dirty: bool,
    dir_dirty: bool,
    /// Prepared syncs not yet completed or not yet applied, oldest first (at most
    /// `syncs_in_flight_max`).
    syncs: VecDeque<InFlightSync>,
    next_sync_id: u64,
    last_sync_ms: u64,
    poisoned: Option<Arc<io::Error>>,
    /// Bases of loaded sealed segments, least recently used first.
    loaded: VecDeque<u64>,
    /// The next segment, zero-filled ahead of time (`zero_fill_segments`).
    spare: Spare,
}

/// See [`Log::spare_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpareStatus {
    /// None prepared: the feature is off, or the last spare became the active segment and
    /// that is not yet half full.
    None,
    /// A background thread is writing zeros into it.
    Filling,
    /// Zero-filled and synced; the next roll moves appends into it.
    Ready,
    /// The last attempt failed (for example a full disk); none until the next roll.
    Failed,
}

/// The spare segment's life: written full of zeros (by [`Log::open`], or later by a background
/// thread), then it waits until a roll renames it to the new active segment.
enum Spare {
    None,
    /// A spare failed; no new attempt until the next roll (a full disk would otherwise
    /// start a thread per append).
    Failed,
    Filling {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<io::Result<File>>,
    },
    Ready(File),
}

/// Makes a spare: create [`SPARE_FILLING_NAME`], reserve `len` bytes, write zeros over all of them in
/// 4 KiB writes (so the page cache holds 4 KiB folios, see [`advise_active`], and the pages
/// stay cached for the appender's faults), each chunk written back before the next, then
/// `fdatasync` (the extent conversions). In the `background` (the spare thread) at nice 10
/// and paced to [`ZERO_FILL_BYTES_PER_S`]; at open, as fast as the device goes.
fn fill_spare(
    path: &Path,
    len: u64,
    io: &SharedIo,
    stop: &AtomicBool,
    background: bool,
) -> io::Result<File> {
    use std::os::unix::fs::FileExt;
    if background {
        // Give way to the shards. Best effort.
        // SAFETY: plain syscall on the calling thread.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    io.allocate(&file, len)?;
    let zeros = [0u8; 4096];
    let started = Instant::now();
    let mut pos = 0u64;
    while pos < len {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "log closed"));
        }
        let chunk_end = (pos + ZERO_FILL_CHUNK_BYTES).min(len);
        let chunk_start = pos;
        while pos < chunk_end {
            let n = (chunk_end - pos).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        // SAFETY: plain syscall on a valid descriptor; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                chunk_start as libc::off64_t,
                (chunk_end - chunk_start) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let due = Duration::from_secs_f64(pos as f64 / ZERO_FILL_BYTES_PER_S as f64);
        if background && let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    io.sync_data(&file)?;
    fs::rename(path, path.with_file_name(SPARE_NAME))?;
    Ok(file)
}

/// A finished spare left by an earlier run, if it is whole and unused: `len` bytes, and a
/// first page of zeros. A spare that became a segment but whose rename a crash undid holds
/// records from byte 0; taking it again would leave stale records behind new ones.
fn adopt_spare(path: &Path, len: u64) -> Option<File> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
    if file.metadata().ok()?.len() != len {
        return None;
    }
    let mut head = vec![0u8; (len as usize).min(4096)];
    file.read_exact_at(&mut head, 0).ok()?;
    head.iter().all(|&b| b == 0).then_some(file)
}

impl Drop for Log {
    fn drop(&mut self) {
        // Stop and join a spare thread (it checks between chunks), so no thread writes in
        // this directory once the log is gone, and delete what it left half-written (best
        // effort: the next open deletes a leftover `.tmp`). A finished spare stays for the
        // next open.
        if let Spare::Filling { stop, thread } = std::mem::replace(&mut self.spare, Spare::None) {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
            let _ = fs::remove_file(self.cfg.dir.join(SPARE_FILLING_NAME));
        }
    }
}

impl Log {
    /// Opens (or creates) the log in `cfg.dir`, recovering from whatever a crash left.
    ///
    /// Every segment is scanned and CRC-checked to rebuild the in-memory indexes. The active
    /// (last) segment is cut at its first torn or corrupt record. Damage in a sealed segment
    /// at or above the checkpoint (the last recorded sync) is an unsynced tail lost to power
    /// loss: the log is cut there too and later segments are deleted. Damage below it hits
    /// acknowledged records: it is reported, and those records answer [`Error::Corrupt`].
    /// Everything recovered is synced before `open` returns, so it all counts as durable.
    pub fn open(cfg: LogConfig) -> Result<(Log, RecoveryReport)> {
        cfg.validate().map_err(Error::Config)?;
        fs::create_dir_all(&cfg.dir).map_err(|e| Error::io("create dir", &cfg.dir, e))?;
        let lock = lock_dir(&cfg.dir)?;
        let dir = Arc::new(File::open(&cfg.dir).map_err(|e| Error::io("open dir", &cfg.dir, e))?);
        let (checkpoint, checkpoint_offset) = Checkpoint::open(&cfg.dir)?;
        let mut report = RecoveryReport {
            checkpoint: checkpoint_offset,
            ..RecoveryReport::default()
        };

        // Which bases exist, as plain and/or compressed files.
        let mut found: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
        let entries = fs::read_dir(&cfg.dir).map_err(|e| Error::io("read dir", &cfg.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read dir", &cfg.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            match segment::classify(name) {
                EntryKind::Log(base) => found.entry(base).or_default().0 = true,
                EntryKind::Zst(base) => found.entry(base).or_default().1 = true,
                EntryKind::Tmp => {
                    // An interrupted compression; the plain segment is still there.
                    let p = entry.path();
                    fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                    report.removed_files.push(p);
                }
                EntryKind::Other => {}
            }
        }
        for (&base, &(plain, zst)) in &found {
            if plain && zst {
                // Compression renamed its output but crashed before deleting the input:
                // keep the original.
                let p = segment::zst_path(&cfg.dir, base);
                fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                report.removed_files.push(p);
            }
        }
        if found.len() > cfg.segments_max {
            return Err(Error::Config(format!(
                "{} segments on disk exceed segments_max {}",
                found.len(),
                cfg.segments_max
            )));
        }

        let mut log = Log {
            dir,
            _lock: lock,
            checkpoint,
            segments: BTreeMap::new(),
            conv: ConvIndex::default(),
            next_offset: 0,
            durable_offset: 0,
            dirty_files: Vec::new(),
            spare_files: Vec::new(),
            active_dirty: false,
            dir_dirty: !report.removed_files.is_empty(),
            syncs: VecDeque::new(),
            next_sync_id: 0,
            last_sync_ms: 0,
            poisoned: None,
            loaded: VecDeque::new(),
            spare: Spare::None,
            cfg,
        };
        let bases: Vec<(u64, bool)> = found.iter().map(|(&b, &(plain, _))| (b, plain)).collect();
        for (i, &(base, plain)) in bases.iter().enumerate() {
            let next_base = bases.get(i + 1).map(|&(b, _)| b);
            if base < log.next_offset {
                return Err(Error::Config(format!(
                    "segment {base} overlaps the previous segment, which ends at {}",
                    log.next_offset
                )));
            }
            let is_last = next_base.is_none();
            let mut seg = if is_last && plain {
                log.recover_active(base, &mut report)?
            } else {
                log.recover_sealed(base, plain, next_base, &mut report)?
            };
            let unsynced_damage = plain
                && report.sealed_corruption.last().is_some_and(|c| {
                    c.segment_base == base && checkpoint_offset.is_some_and(|cp| c.offset >= cp)
                });
            let mut cut_here = false;
            if unsynced_damage {
                // A sealed segment torn above the last recorded sync: power loss took its
                // unsynced tail. Nothing from here on was acknowledged, so cut the log here
                // like a torn active tail: later segments go, this one becomes active.
                let damage = report.sealed_corruption.pop().expect("checked above");
                let mut bytes_cut = 0;
                for &(later, later_plain) in &bases[i + 1..] {
                    let p = if later_plain {
                        segment::log_path(&log.cfg.dir, later)
                    } else {
                        segment::zst_path(&log.cfg.dir, later)
                    };
                    bytes_cut += fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                    report.removed_files.push(p);
                }
                log.dir_dirty = true;
                drop(seg);
                log.conv.truncate_from(base);
                seg = log.recover_active(base, &mut report)?;
                let in_segment = report.truncated.take().map_or(0, |t| t.bytes_cut);
                report.truncated = Some(Truncation {
                    segment_base: base,
                    offset: seg.end,
                    position: seg.len,
                    bytes_cut: bytes_cut + in_segment,
                    reason: damage.reason,
                });
                cut_here = true;
            }
            report.records += seg.end - seg.base;
            report.record_bytes += seg.len;
            log.next_offset = seg.end;
            log.segments.insert(base, seg);
            if cut_here {
                break;
            }
        }
        let active_is_plain_last = log
            .segments
            .values()
            .next_back()
            .is_some_and(|s| matches!(s.state, SegState::Active { .. }));
        let spare_path = log.cfg.dir.join(SPARE_NAME);
        let kept = adopt_spare(&spare_path, log.cfg.segment_bytes_max)
            .filter(|_| log.cfg.zero_fill_segments);
        if kept.is_none() && spare_path.exists() {
            // Used, torn, of another segment size, or the option is off now.
            fs::remove_file(&spare_path).map_err(|e| Error::io("remove", &spare_path, e))?;
        }
        if log.cfg.zero_fill_segments {
            // The first spare, before traffic (the last run's, if it left one): it becomes
            // the new active segment below, or (after recovery) takes over from the
            // recovered one at the first append.
            log.spare = match kept {
                Some(file) => Spare::Ready(file),
                None => {
                    let filling = log.cfg.dir.join(SPARE_FILLING_NAME);
                    match fill_spare(
                        &filling,
                        log.cfg.segment_bytes_max,
                        &log.cfg.io,
                        &AtomicBool::new(false),
                        false,
                    ) {
                        Ok(file) => Spare::Ready(file),
                        Err(_) => {
                            let _ = fs::remove_file(&filling);
                            Spare::Failed
                        }
                    }
                }
            };
        }
        if !active_is_plain_last {
            // Empty directory, or the newest segment is compressed (sealed): start a new one.
            if log.segments.contains_key(&log.next_offset) {
                // Only when the newest, compressed segment yielded no record at all.
                return Err(Error::Corrupt {
                    offset: log.next_offset,
                    segment_base: log.next_offset,
                    reason: "the newest segment is compressed and unreadable; move it away to open the log".into(),
                });
            }
            log.create_active(log.next_offset)?;
        }
        log.durable_offset = log.next_offset;
        report.segments = log.segments.len();
        report.start_offset = log.start_offset();
        report.next_offset = log.next_offset;

        // Make what recovery decided durable: the cut tail and any directory changes.
        let active = log.active_file().clone();
        log.cfg
            .io
            .sync_data(&active)
            .map_err(|e| Error::io("sync", log.active_path(), e))?;
        log.cfg
            .io
            .sync_dir(&log.dir)
            .map_err(|e| Error::io("sync dir", &log.cfg.dir, e))?;
        log.dir_dirty = false;
        log.checkpoint.record(log.durable_offset);
        Ok((log, report))
    }

    fn index_conv(conv: &mut ConvIndex, unindexed: &mut u64, h: &Header, pos: u32) {
        if h.seq == 0 {
            return;
        }
        let e = ConvEntry {
            seq: h.seq,
            offset: h.log_offset,
            pos,
        };
        if !conv.push(h.conversation_id, e) {
            *unindexed += 1;
        }
    }

    fn recover_sealed(
        &mut self,
        base: u64,
        plain: bool,
        next_base: Option<u64>,
        report: &mut RecoveryReport,
    ) -> Result<Segment> {
        let end_max = next_base.unwrap_or(u64::MAX);
        let (bytes, disk_bytes, state): (Vec<u8>, u64, SegState);
        let mut mapped = None;
        if plain {
            let path = segment::log_path(&self.cfg.dir, base);
            let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
            disk_bytes = file
                .metadata()
                .map_err(|e| Error::io("stat", &path, e))?
                .len();
            check_segment_len(base, disk_bytes)?;
            if disk_bytes > 0 {
                // SAFETY: segment files are only written by this process through the log,
                // which holds the directory lock.
                let m = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mmap", &path, e))?;
                mapped = Some(m);
            }
            bytes = Vec::new();
            state = SegState::Plain { cache: None };
        } else {
            let path = segment::zst_path(&self.cfg.dir, base);
            let raw = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            disk_bytes = raw.len() as u64;
            state = SegState::Compressed { cache: None };
            match decompress_segment(&raw) {
                Ok(b) => bytes = b,
                Err(e) => {
                    report.sealed_corruption.push(SealedCorruption {
                        segment_base: base,
                        offset: base,
                        expected_end: end_max,
                        position: 0,
                        reason: format!("zstd segment does not decompress: {e}"),
                    });
                    bytes = Vec::new();
                }
            }
        }
        let data: &[u8] = mapped.as_deref().unwrap_or(&bytes);
        let conv = &mut self.conv;
        let unindexed = &mut report.unindexed_records;
        let index = self.cfg.index_conversations_at_open;
        let scan = segment::scan(
            data,
            base,
            end_max,
            self.cfg.index_interval_bytes,
            |h, pos| {
                if index {
                    Self::index_conv(conv, unindexed, h, pos)
                }
            },
        );
        let expected_end = next_base.unwrap_or(scan.end);
        let damaged = match &scan.stop {
            Stop::Clean if scan.end == expected_end => None,
            Stop::Clean => Some(format!(
                "segment ends at offset {} but the next segment starts at {expected_end}",
                scan.end
            )),
            Stop::Damaged { reason, .. } => Some(reason.clone()),
        };
        let already_reported = report
            .sealed_corruption
            .last()
            .is_some_and(|c| c.segment_base == base);
        if let Some(reason) = damaged
            && !already_reported
        {
            report.sealed_corruption.push(SealedCorruption {
                segment_base: base,
                offset: scan.end,
                expected_end,
                position: scan.valid_len,
                reason,
            });
        }
        Ok(Segment {
            base,
            end: scan.end,
            len: scan.valid_len,
            index: scan.index,
            max_timestamp_us: scan.max_timestamp_us,
            disk_bytes,
            state,
        })
    }

    fn recover_active(&mut self, base: u64, report: &mut RecoveryReport) -> Result<Segment> {
        let path = segment::log_path(&self.cfg.dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        check_segment_len(base, file_len)?;
        if file_len < self.cfg.segment_bytes_max {
            // Sealed-then-shrunk before a crash, or written with a smaller segment size.
            self.cfg
                .io
                .allocate(&file, self.cfg.segment_bytes_max)
                .map_err(|e| Error::io("allocate", &path, e))?;
        }
        // SAFETY: see `recover_sealed`; the lock keeps other writers out.
        let mut map =
            unsafe { MmapMut::map_mut(&file) }.map_err(|e| Error::io("mmap", &path, e))?;
        advise_active(&map);
        let conv = &mut self.conv;
        let unindexed = &mut report.unindexed_records;
        let index = self.cfg.index_conversations_at_open;
        let scan = segment::scan(
            &map,
            base,
            u64::MAX,
            self.cfg.index_interval_bytes,
            |h, pos| {
                if index {
                    Self::index_conv(conv, unindexed, h, pos)
                }
            },
        );
        if let Stop::Damaged {
            reason,
            garbage_bytes,
        } = &scan.stop
        {
            // Zero the cut bytes: a stale record behind the cut must never be mistaken for a
            // later append's successor.
            let from = scan.valid_len as usize;
            map[from..from + *garbage_bytes as usize].fill(0);
            report.truncated = Some(Truncation {
                segment_base: base,
                offset: scan.end,
                position: scan.valid_len,
                bytes_cut: *garbage_bytes,
                reason: reason.clone(),
            });
        }
        Ok(Segment {
            base,
            end: scan.end,
            len: scan.valid_len,
            index: scan.index,
            max_timestamp_us: scan.max_timestamp_us,
            disk_bytes: scan.valid_len,
            state: SegState::Active {
                file: Arc::new(file),
                map,
                zero_filled: false,
            },
        })
    }

    /// Creates, pre-allocates and maps a new active segment at `base`: the zero-filled spare
    /// if one is ready, else a new `fallocate`d file.
    fn create_active(&mut self, base: u64) -> Result<()> {
        let path = segment::log_path(&self.cfg.dir, base);
        if let Some((file, map)) = self.take_spare(&path) {
            self.insert_active(base, file, map, true);
            return Ok(());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        let setup = || -> io::Result<MmapMut> {
            self.cfg.io.allocate(&file, self.cfg.segment_bytes_max)?;
            // SAFETY: a file we just created, under the directory lock.
            let map = unsafe { MmapMut::map_mut(&file) }?;
            advise_active(&map);
            Ok(map)
        };
        let map = match setup() {
            Ok(m) => m,
            Err(e) => {
                // A half-made segment must not outlive the failure (recovery would take it
                // for the active segment).
                let _ = fs::remove_file(&path);
                return Err(Error::io("allocate", &path, e));
            }
        };
        self.insert_active(base, file, map, false);
        Ok(())
    }

    fn insert_active(&mut self, base: u64, file: File, map: MmapMut, zero_filled: bool) {
        self.segments.insert(
            base,
            Segment {
                base,
                end: base,
                len: 0,
                index: SparseIndex::default(),
                max_timestamp_us: 0,
                disk_bytes: 0,
                state: SegState::Active {
                    file: Arc::new(file),
                    map,
                    zero_filled,
                },
            },
        );
        self.dir_dirty = true;
    }

    /// Renames a ready spare to `path` (never over an existing file) and maps it. `None` if
    /// there is none, or if that failed: then the spare is deleted and no new one is made
    /// until the next roll.
    fn take_spare(&mut self, path: &Path) -> Option<(File, MmapMut)> {
        let file = match std::mem::replace(&mut self.spare, Spare::Failed) {
            Spare::Ready(file) => file,
            other => {
                self.spare = other;
                return None;
            }
        };
        let spare_path = self.cfg.dir.join(SPARE_NAME);
        if let Err(_e) = rename_noreplace(&spare_path, path) {
            let _ = fs::remove_file(&spare_path);
            return None;
        }
        // SAFETY: our own file, under the directory lock.
        match unsafe { MmapMut::map_mut(&file) } {
            Ok(map) => {
                advise_active(&map);
                self.spare = Spare::None;
                Some((file, map))
            }
            Err(_) => {
                // Only zeros, and no record refers to it yet.
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    /// Advances the spare segment (only with `zero_fill_segments`): collects a finished
    /// spare thread, starts one once the active segment is 1/[`SPARE_START_DIVISOR`] full,
    /// and moves appends out of a `fallocate`d active segment (one recovered at open, or made
    /// while no spare was ready) as soon as a spare is ready.
    fn tend_spare(&mut self) {
        match &self.spare {
            Spare::Filling { thread, .. } if thread.is_finished() => {
                let Spare::Filling { thread, .. } = std::mem::replace(&mut self.spare, Spare::None)
                else {
                    unreachable!("matched above")
                };
                self.spare = match thread.join() {
                    Ok(Ok(file)) => Spare::Ready(file),
                    _ => {
                        let _ = fs::remove_file(self.cfg.dir.join(SPARE_FILLING_NAME));
                        Spare::Failed
                    }
                };
            }
            Spare::None
                if self.active().len >= self.cfg.segment_bytes_max / SPARE_START_DIVISOR =>
            {
                let stop = Arc::new(AtomicBool::new(false));
                let (path, len, io) = (
                    self.cfg.dir.join(SPARE_FILLING_NAME),
                    self.cfg.segment_bytes_max,
                    self.cfg.io.clone(),
                );
                let thread_stop = stop.clone();
                self.spare = match std::thread::Builder::new()
                    .name("log-zero-fill".into())
                    .spawn(move || fill_spare(&path, len, &io, &thread_stop, true))
                {
                    Ok(thread) => Spare::Filling { stop, thread },
                    Err(_) => Spare::Failed,
                };
            }
            Spare::Ready(_)
                if self.active().len > 0
                    && self.segments.len() < self.cfg.segments_max
                    && matches!(
                        self.active().state,
                        SegState::Active {
                            zero_filled: false,
                            ..
                        }
                    ) =>
            {
                // Best effort: on failure the active segment simply stays.
                let _ = self.roll();
            }
            _ => {}
        }
    }

    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has an active segment")
    }

    fn active_file(&self) -> &Arc<File> {
        match &self.active().state {
            SegState::Active { file, .. } => file,
            _ => unreachable!("the last segment is the active one"),
        }
    }

    fn active_path(&self) -> PathBuf {
        segment::log_path(&self.cfg.dir, self.active().base)
    }

    /// Seals the active segment and starts a new one at `next_offset`.
    fn roll(&mut self) -> Result<()> {
        if self.segments.len() >= self.cfg.segments_max {
            return Err(Error::LimitExceeded(format!(
                "segments_max {} reached; retention must delete segments first",
                self.cfg.segments_max
            )));
        }
        let new_base = self.next_offset;
        let old_base = self.active().base;
        assert!(new_base > old_base, "rolling an empty segment");
        self.create_active(new_base)?;
        let old = self
            .segments
            .get_mut(&old_base)
            .expect("old active segment present");
        let state = std::mem::replace(&mut old.state, SegState::Plain { cache: None });
        let SegState::Active { file, map, .. } = state else {
            unreachable!("old segment was active")
        };
        drop(map);
        // Give back the unused pre-allocation. Best effort: recovery reads a zero tail as
        // the clean end of a segment, so a failed shrink loses nothing.
        if file.set_len(old.len).is_ok() {
            old.disk_bytes = old.len;
        } else {
            old.disk_bytes = self.cfg.segment_bytes_max;
        }
        if self.active_dirty {
            self.dirty_files.push(file);
        }
        self.active_dirty = false;
        if matches!(self.spare, Spare::Failed) {
            self.spare = Spare::None;
        }
        Ok(())
    }

    /// Appends one record; storage sets `log_offset` and the CRC. Returns its offset.
    ///
    /// The record is readable and counted durable only once a sync covering it completed
    /// (immediately under [`Durability::Never`]); acknowledge it after [`Log::durable_offset`]
    /// passed it.
    pub fn append(&mut self, header: &Header, payload: &[u8]) -> Result<u64> {
        self.append_inner(header, payload, None)
    }

    /// [`append`](Self::append), and also appends the record's frame, exactly the bytes just
    /// written to the log (header with its CRC, then `payload`), to `frame`: the caller gets the
    /// wire form without encoding it (and computing its CRC) a second time.
    pub fn append_framed(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: &mut Vec<u8>,
    ) -> Result<u64> {
        self.append_inner(header, payload, Some(frame))
    }

    fn append_inner(
        &mut self,
        header: &Header,
        payload: &[u8],
        frame: Option<&mut Vec<u8>>,
    ) -> Result<u64> {
        if let Some(cause) = &self.poisoned {
            return Err(Error::Poisoned(cause.clone()));
        }
        if !header.kind.is_record() {
            return Err(Error::NotARecord(header.kind));
        }
        if header.flags & !FLAGS_KNOWN != 0 {
            return Err(Error::BadFlags(header.flags));
        }
        let frame_len = HEADER_LEN as u64 + payload.len() as u64;
        if frame_len > self.cfg.record_bytes_max as u64 {
            return Err(Error::RecordTooLarge {
                len: frame_len,
                max: self.cfg.record_bytes_max,
            });
        }
        if self.next_offset >= segment::OFFSET_MAX {
            return Err(Error::LimitExceeded("log offsets exhausted (2^63)".into()));
        }
        if header.seq != 0 {
            if let Some(last) = self.conv.last_seq(header.conversation_id)
                && header.seq <= last
            {
                return Err(Error::SeqNotIncreasing {
                    conversation_id: header.conversation_id,
                    last,
                    got: header.seq,
                });
            }
            if self.conv.entries >= self.cfg.conversation_index_entries_max {
                return Err(Error::LimitExceeded(format!(
                    "conversation_index_entries_max {} reached",
                    self.cfg.conversation_index_entries_max
                )));
            }
        }
        if self.cfg.zero_fill_segments {
            self.tend_spare();
        }
        let capacity = match &self.active().state {
            SegState::Active { map, .. } => (map.len() as u64).min(self.cfg.segment_bytes_max),
            _ => unreachable!("the last segment is the active one"),
        };
        if self.active().len + frame_len > capacity {
            self.roll()?;
        }

        let offset = self.next_offset;
        let h = Header {
            log_offset: offset,
            ..*header
        };
        let mut head = [0u8; HEADER_LEN];
        frame::encode_header(&h, payload, &mut head);
        let interval = self.cfg.index_interval_bytes;
        let seg = self.active_mut();
        let pos = seg.len as usize;
        let SegState::Active { map, .. } = &mut seg.state else {
            unreachable!("the last segment is the active one")
        };
        let end = pos + frame_len as usize;
        map[pos..pos + HEADER_LEN].copy_from_slice(&head);
        map[pos + HEADER_LEN..end].copy_from_slice(payload);
        debug_assert!(
            frame::decode(&map[pos..end], u32::MAX).is_ok(),
            "record verifies right after writing"
        );
        if let Some(frame) = frame {
            frame.reserve(frame_len as usize);
            frame.extend_from_slice(&head);
            frame.extend_from_slice(payload);
        }
        seg.index
            .note((offset - seg.base) as u32, pos as u32, interval);
        seg.len = end as u64;
        seg.disk_bytes = seg.len;
        seg.end = offset + 1;
        seg.max_timestamp_us = seg.max_timestamp_us.max(h.timestamp_us);
        if h.seq != 0 {
            let pushed = self.conv.push(
                h.conversation_id,
                ConvEntry {
                    seq: h.seq,
                    offset,
                    pos: pos as u32,
                },
            );
            assert!(pushed, "seq order was checked above");
        }
        self.next_offset = offset + 1;
        self.active_dirty = true;
        if self.cfg.durability == Durability::Never {
            self.durable_offset = self.next_offset;
        }
        Ok(offset)
    }

    /// The offset the next append gets.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Records below this offset are durable under the configured policy, and readable.
    pub fn durable_offset(&self) -> u64 {
        self.durable_offset
    }

    /// The oldest offset still in the log.
    pub fn start_offset(&self) -> u64 {
        self.segments.values().next().map_or(0, |s| s.base)
    }

    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    /// The cause, once a failed sync poisoned the log.
    pub fn poisoned(&self) -> Option<&Arc<io::Error>> {
        self.poisoned.as_ref()
    }

    /// The highest seq stored (durable or not) for a conversation.
    pub fn conversation_last_seq(&self, conversation_id: u64) -> Option<u64> {
        self.conv.last_seq(conversation_id)
    }

    /// Drops a conversation from the conversation index: its records stay in the segments
    /// (offset reads and the firehose still return them), but [`Log::read_conversation`] and
    /// [`Log::conversation_last_seq`] no longer know it, and its entries no longer count
    /// against `conversation_index_entries_max`. For conversations the caller is done with
    /// (closed ones): a later append to it starts a fresh index of it. Not durable: a reopen
    /// indexes every record again, and the caller forgets again. Returns the entries dropped.
    pub fn forget_conversation(&mut self, conversation_id: u64) -> usize {
        self.conv.forget(conversation_id)
    }

    /// Entries of the conversation index (one per record with `seq > 0` of a conversation not
    /// forgotten). Appends fail once this reaches `conversation_index_entries_max`; a reopen
    /// indexes every record in the segments, which may be more (the caller then forgets
    /// conversations it is done with).
    pub fn conversation_index_entries(&self) -> usize {
        self.conv.entries
    }

    /// Every conversation in the index with its last seq (for rebuilding state at startup).
    pub fn conversations(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.conv
            .map
            .iter()
            .filter_map(|(&id, v)| v.last().map(|e| (id, e.seq)))
    }

    /// Bytes of the log on disk (sealed files plus the active segment's records).
    pub fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.disk_bytes).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Where the zero-filled spare segment stands (always [`SpareStatus::None`] without
    /// `zero_fill_segments`).
    pub fn spare_status(&self) -> SpareStatus {
        match self.spare {
            Spare::None => SpareStatus::None,
            Spare::Failed => SpareStatus::Failed,
            Spare::Filling { .. } => SpareStatus::Filling,
            Spare::Ready(_) => SpareStatus::Ready,
        }
    }

    /// Whether the active segment is a zero-filled spare (no unwritten extents).
    pub fn active_is_zero_filled(&self) -> bool {
        matches!(
            self.active().state,
            SegState::Active {
                zero_filled: true,
                ..
            }
        )
    }

    /// Whether appends wait for a sync.
    fn has_unsynced(&self) -> bool {
        self.active_dirty || !self.dirty_files.is_empty() || self.dir_dirty
    }

    /// Whether the caller should sync now under the durability policy.
    pub fn sync_due(&self, now_ms: u64) -> bool {
        if self.syncs.len() >= self.cfg.syncs_in_flight_max
            || self.poisoned.is_some()
            || !self.has_unsynced()
        {
            return false;
        }
        match self.cfg.durability {
            Durability::Always => true,
            Durability::IntervalMs(ms) => now_ms >= self.last_sync_ms.saturating_add(ms),
            Durability::Never => false,
        }
    }

    /// When the next sync is due under `interval:MS`, if anything waits for one.
    pub fn next_sync_due_ms(&self) -> Option<u64> {
        match self.cfg.durability {
            Durability::IntervalMs(ms) if self.has_unsynced() => {
                Some(self.last_sync_ms.saturating_add(ms))
            }
            Durability::Always if self.has_unsynced() => Some(self.last_sync_ms),
            _ => None,
        }
    }

    /// Starts a group-commit sync of everything appended so far. `None` when nothing waits
    /// or `syncs_in_flight_max` syncs are already in flight (call again after one ends).
    pub fn prepare_sync(&mut self, now_ms: u64) -> Result<Option<SyncJob>> {
        if let Some(cause) = &self.poisoned {
            return Err(Error::Poisoned(cause.clone()));
        }
        if self.syncs.len() >= self.cfg.syncs_in_flight_max || !self.has_unsynced() {
            return Ok(None);
        }
        // The sealed files to sync, if any, else the list the last completed job gave back.
        let spare = std::mem::take(&mut self.spare_files);
        let mut files = if self.dirty_files.is_empty() {
            spare
        } else {
            std::mem::replace(&mut self.dirty_files, spare)
        };
        if self.active_dirty {
            files.push(self.active_file().clone());
        }
        let id = self.next_sync_id;
        self.next_sync_id += 1;
        let job = SyncJob {
            id,
            files,
            dir: self.dir_dirty.then(|| self.dir.clone()),
            target_offset: self.next_offset,
            io: self.cfg.io.clone(),
        };
        self.syncs.push_back(InFlightSync {
            id,
            target_offset: job.target_offset,
            done: false,
        });
        self.active_dirty = false;
        self.dir_dirty = false;
        self.last_sync_ms = now_ms;
        Ok(Some(job))
    }

    /// Syncs prepared and not yet applied.
    pub fn syncs_in_flight(&self) -> usize {
        self.syncs.len()
    }

    /// Finishes a sync, in any order. Success makes everything below the job's target
    /// durable once every earlier job succeeded too: a job only covers the files written
    /// since the previous one was prepared (a sealed segment or the directory may be in the
    /// earlier job alone), so durability advances strictly in preparation order. Failure
    /// poisons the log: no silent retry, since the kernel may have dropped the dirty pages;
    /// nothing becomes durable after that, also from jobs still in flight.
    /// Returns the durable offset.
    pub fn complete_sync(&mut self, mut job: SyncJob, result: io::Result<()>) -> Result<u64> {
        if self.spare_files.capacity() == 0 {
            job.files.clear();
            self.spare_files = std::mem::take(&mut job.files);
        }
        let pos = self
            .syncs
            .iter()
            .position(|s| s.id == job.id)
            .expect("complete_sync of a job this log prepared, once");
        if let Err(e) = result {
            self.syncs.remove(pos);
            // Later jobs that already succeeded will never apply; those still running
            // complete (and are dropped) when they end.
            self.syncs.retain(|s| !s.done);
            let cause = Arc::new(e);
            self.poisoned = Some(cause.clone());
            return Err(Error::Poisoned(cause));
        }
        if let Some(cause) = &self.poisoned {
            self.syncs.remove(pos);
            return Err(Error::Poisoned(cause.clone()));
        }
        self.syncs[pos].done = true;
        let before = self.durable_offset;
        while self.syncs.front().is_some_and(|s| s.done) {
            let s = self.syncs.pop_front().expect("front exists");
            self.durable_offset = self.durable_offset.max(s.target_offset);
        }
        if self.durable_offset != before {
            self.checkpoint.record(self.durable_offset);
        }
        Ok(self.durable_offset)
    }

    /// Blocking convenience: prepare, run and complete one sync. Returns the durable offset
    /// (which waits for the caller's own syncs still in flight, if any).
    pub fn sync(&mut self, now_ms: u64) -> Result<u64> {
        match self.prepare_sync(now_ms)? {
            None => Ok(self.durable_offset),
            Some(job) => {
                let r = job.run();
                self.complete_sync(job, r)
            }
        }
    }

    /// Maps or decompresses a sealed segment for reading, evicting the least recently used.
    fn load(&mut self, base: u64) -> Result<()> {
        let seg = self
            .segments
            .get(&base)
            .expect("loading an existing segment");
        if matches!(seg.state, SegState::Active { .. }) {
            return Ok(());
        }
        if seg.is_loaded() {
            if let Some(i) = self.loaded.iter().position(|&b| b == base) {
                self.loaded.remove(i);
            }
            self.loaded.push_back(base);
            return Ok(());
        }
        let seg_len = seg.len;
        let plain = matches!(seg.state, SegState::Plain { .. });
        while self.loaded.len() >= self.cfg.mapped_segments_max {
            let evict = self.loaded.pop_front().expect("non-empty");
            if let Some(s) = self.segments.get_mut(&evict) {
                s.drop_cache();
            }
        }
        let new_state = if plain {
            let path = segment::log_path(&self.cfg.dir, base);
            let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
            let map = if seg_len > 0 {
                // SAFETY: sealed segments are never written again.
                Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mmap", &path, e))?)
            } else {
                None
            };
            if map.as_ref().is_some_and(|m| (m.len() as u64) < seg_len) {
                return Err(Error::Corrupt {
                    offset: base,
                    segment_base: base,
                    reason: "segment file shrank since recovery".into(),
                });
            }
            SegState::Plain {
                cache: Some(PlainCache {
                    file: Arc::new(file),
                    map,
                }),
            }
        } else {
            let path = segment::zst_path(&self.cfg.dir, base);
            let raw = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            let bytes = decompress_segment(&raw).map_err(|e| Error::io("decompress", &path, e))?;
            if (bytes.len() as u64) < seg_len {
                return Err(Error::Corrupt {
                    offset: base,
                    segment_base: base,
                    reason: "compressed segment shrank since recovery".into(),
                });
            }
            SegState::Compressed {
                cache: Some(Arc::new(bytes)),
            }
        };
        self.segments.get_mut(&base).expect("present").state = new_state;
        self.loaded.push_back(base);
        Ok(())
    }

    /// The segment holding `offset`, loaded, or why it cannot be read.
    fn segment_for(&mut self, offset: u64) -> Result<u64> {
        let start = self.start_offset();
        if offset < start {
            return Err(Error::BelowStart {
                requested: offset,
                start,
            });
        }
        let seg = self
            .segments
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s)
            .expect("offset >= start has a segment");
        if offset >= seg.end {
            return Err(Error::Corrupt {
                offset,
                segment_base: seg.base,
                reason: format!(
                    "records from offset {} of this sealed segment were lost to corruption (see the recovery report)",
                    seg.end
                ),
            });
        }
        let base = seg.base;
        self.load(base)?;
        Ok(base)
    }

    fn corrupt(offset: u64, segment_base: u64, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            offset,
            segment_base,
            reason: reason.into(),
        }
    }

    /// Calls `f` with each durable record from offset `from`, at most `max_records`, each
    /// CRC-checked. Returns the offset to continue from. Stops early before records lost to
    /// sealed-segment corruption; a read starting at them answers [`Error::Corrupt`].
    pub fn read_range(
        &mut self,
        from: u64,
        max_records: usize,
        f: impl FnMut(FrameRef<'_>),
    ) -> Result<u64> {
        self.read_range_inner(from, max_records, None, f)
    }

    /// [`Log::read_range`], indexing what it reads when given a count of the records left out.
    fn read_range_inner(
        &mut self,
        from: u64,
        max_records: usize,
        mut index: Option<&mut u64>,
        mut f: impl FnMut(FrameRef<'_>),
    ) -> Result<u64> {
        let end = self.durable_offset;
        let mut off = from;
        let mut left = max_records;
        while left > 0 && off < end {
            let base = match self.segment_for(off) {
                Ok(b) => b,
                // Deliver what is readable first; the next call starts at the damage and
                // gets the error.
                Err(Error::Corrupt { .. }) if off > from => break,
                Err(e) => return Err(e),
            };
            let seg = &self.segments[&base];
            let data = seg.data();
            let mut pos = segment::locate(data, &seg.index, base, seg.end, off)
                .map_err(|r| Self::corrupt(off, base, r))?;
            let seg_end = seg.end.min(end);
            while left > 0 && off < seg_end {
                let (fr, used) = frame::decode(&data[pos..], u32::MAX)
                    .map_err(|e| Self::corrupt(off, base, e.to_string()))?;
                if fr.header.log_offset != off {
                    return Err(Self::corrupt(
                        off,
                        base,
                        format!("record carries offset {}", fr.header.log_offset),
                    ));
                }
                if let Some(unindexed) = index.as_deref_mut() {
                    Self::index_conv(&mut self.conv, unindexed, &fr.header, pos as u32);
                }
                f(fr);
                pos += used;
                off += 1;
                left -= 1;
            }
        }
        Ok(off)
    }

    /// [`Log::read_range`] that also puts each record it reads into the conversation index,
    /// for a log opened without `index_conversations_at_open`: read the whole log back once,
    /// from [`Log::start_offset`], before the first append, and forget conversations as they
    /// are done with. A record whose seq does not follow its conversation's last one is left
    /// out of the index (as open does); returns the next offset and how many were left out.
    pub fn read_range_indexing(
        &mut self,
        from: u64,
        max_records: usize,
        f: impl FnMut(FrameRef<'_>),
    ) -> Result<(u64, u64)> {
        let mut unindexed = 0;
        let next = self.read_range_inner(from, max_records, Some(&mut unindexed), f)?;
        Ok((next, unindexed))
    }

    /// Calls `f` with a conversation's durable records with `seq > after_seq`, oldest first,
    /// at most `limit`. Returns how many it delivered.
    pub fn read_conversation(
        &mut self,
        conversation_id: u64,
        after_seq: u64,
        limit: usize,
        mut f: impl FnMut(FrameRef<'_>),
    ) -> Result<usize> {
        let Some(entries) = self.conv.map.get(&conversation_id) else {
            return Ok(0);
        };
        let mut i = entries.partition_point(|e| e.seq <= after_seq);
        let mut delivered = 0;
        while delivered < limit {
            let Some(&e) = self.conv.map.get(&conversation_id).and_then(|v| v.get(i)) else {
                break;
            };
            if e.offset >= self.durable_offset {
                break;
            }
            let base = self.segment_for(e.offset)?;
            let data = self.segments[&base].data();
            let (fr, _) = frame::decode(data.get(e.pos as usize..).unwrap_or(&[]), u32::MAX)
                .map_err(|err| Self::corrupt(e.offset, base, err.to_string()))?;
            if fr.header.log_offset != e.offset || fr.header.conversation_id != conversation_id {
                return Err(Self::corrupt(
                    e.offset,
                    base,
                    "conversation index points at a different record",
                ));
            }
            f(fr);
            delivered += 1;
            i += 1;
        }
        Ok(delivered)
    }

    /// Raw byte runs of whole durable records from `from_offset`, about `max_bytes` in total
    /// (at least one record, so a reader always progresses), for `sendfile`.
    pub fn file_runs(&mut self, from_offset: u64, max_bytes: u64) -> Result<Vec<FileRun>> {
        let end = self.durable_offset;
        let mut runs = Vec::new();
        let mut off = from_offset;
        let mut budget = max_bytes;
        while off < end {
            let base = match self.segment_for(off) {
                Ok(b) => b,
                // Report damage only if nothing readable comes before it.
                Err(e @ Error::Corrupt { .. }) if runs.is_empty() => return Err(e),
                Err(Error::Corrupt { .. }) => break,
                Err(e) => return Err(e),
            };
            let seg = &self.segments[&base];
            let data = seg.data();
            let start_pos = segment::locate(data, &seg.index, base, seg.end, off)
                .map_err(|r| Self::corrupt(off, base, r))?;
            let seg_end = seg.end.min(end);
            let first = off;
            let mut pos = start_pos;
            while off < seg_end {
                let h = frame::peek_header(&data[pos..], u32::MAX)
                    .map_err(|e| Self::corrupt(off, base, e.to_string()))?;
                let len = h.frame_len() as u64;
                let taken = (pos - start_pos) as u64;
                let nothing_yet = runs.is_empty() && taken == 0;
                if taken + len > budget && !nothing_yet {
                    break;
                }
                pos += len as usize;
                off += 1;
            }
            let len = (pos - start_pos) as u64;
            if len == 0 {
                break;
            }
            let source = match &seg.state {
                SegState::Active { file, .. } => RunSource::File(file.clone()),
                SegState::Plain {
                    cache: Some(PlainCache { file, .. }),
                } => RunSource::File(file.clone()),
                SegState::Compressed { cache: Some(bytes) } => RunSource::Memory(bytes.clone()),
                _ => unreachable!("segment_for loads the segment"),
            };
            runs.push(FileRun {
                source,
                position: start_pos as u64,
                len,
                first_offset: first,
                end_offset: off,
            });
            budget = budget.saturating_sub(len);
            if budget == 0 || off < seg_end {
                break;
            }
        }
        Ok(runs)
    }

    /// Deletes the oldest sealed segments while the log is over `retention_bytes_max` or
    /// their newest record is older than `retention_age_ms`. The active segment stays.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<RetentionReport> {
        self.enforce_retention_below(now_ms, u64::MAX)
    }

    /// Where [`Log::enforce_retention`] would start the log now: the base of the oldest
    /// segment it would keep (the current start if it would delete nothing).
    pub fn retention_target(&self, now_ms: u64) -> u64 {
        let mut total = self.disk_bytes();
        let mut segments = self.segments.values().peekable();
        while let Some(seg) = segments.next() {
            // The active (last) segment always stays.
            if segments.peek().is_none() || !self.retention_wants(seg, total, now_ms) {
                return seg.base;
            }
            total -= seg.disk_bytes;
        }
        self.next_offset
    }

    fn retention_wants(&self, oldest: &Segment, total_bytes: u64, now_ms: u64) -> bool {
        let over_size = self
            .cfg
            .retention_bytes_max
            .is_some_and(|max| total_bytes > max);
        let too_old = self
            .cfg
            .retention_age_ms
            .is_some_and(|age| oldest.max_timestamp_us / 1000 + age < now_ms);
        over_size || too_old
    }

    /// [`Log::enforce_retention`] that keeps every record at or above `keep_from`: a segment
    /// goes only if all its records are below it (the caller still needs the rest).
    pub fn enforce_retention_below(
        &mut self,
        now_ms: u64,
        keep_from: u64,
    ) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        let mut total = self.disk_bytes();
        loop {
            if self.segments.len() <= 1 {
                break;
            }
            let mut two = self.segments.values();
            let oldest = two.next().expect("non-empty");
            let next_base = two.next().expect("two segments").base;
            if next_base > keep_from || !self.retention_wants(oldest, total, now_ms) {
                break;
            }
            let base = oldest.base;
            let compressed = matches!(oldest.state, SegState::Compressed { .. });
            let path = if compressed {
                segment::zst_path(&self.cfg.dir, base)
            } else {
                segment::log_path(&self.cfg.dir, base)
            };
            fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
            let seg = self.segments.remove(&base).expect("present");
            self.loaded.retain(|&b| b != base);
            total -= seg.disk_bytes;
            report.segments_deleted += 1;
            report.bytes_deleted += seg.disk_bytes;
            self.dir_dirty = true;
        }
        report.start_offset = self.start_offset();
        if report.segments_deleted > 0 {
            self.conv.prune_below(report.start_offset);
        }
        Ok(report)
    }

    /// Rewrites the oldest plain sealed segment as zstd (when `compress_sealed` is set).
    /// Blocking and CPU-heavy: schedule it off the hot path. Returns the segment's base.
    pub fn compress_sealed_once(&mut self) -> Result<Option<u64>> {
        if !self.cfg.compress_sealed {
            return Ok(None);
        }
        if let Some(cause) = &self.poisoned {
            return Err(Error::Poisoned(cause.clone()));
        }
        // Oldest plain sealed segment whose records all survived recovery: a damaged one
        // stays as it is, as evidence.
        let bases: Vec<u64> = self.segments.keys().copied().collect();
        let Some(base) = bases.windows(2).find_map(|w| {
            let s = &self.segments[&w[0]];
            (matches!(s.state, SegState::Plain { .. }) && s.end == w[1]).then_some(w[0])
        }) else {
            return Ok(None);
        };
        self.load(base)?;
        let seg = &self.segments[&base];
        let mut c = zstd::bulk::Compressor::new(self.cfg.zstd_level)
            .map_err(|e| Error::io("zstd init", &self.cfg.dir, e))?;
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(|e| Error::io("zstd init", &self.cfg.dir, e))?;
        let compressed = c
            .compress(seg.data())
            .map_err(|e| Error::io("compress", segment::log_path(&self.cfg.dir, base), e))?;
        let plain_path = segment::log_path(&self.cfg.dir, base);
        let zst_path = segment::zst_path(&self.cfg.dir, base);
        let mut tmp_path = zst_path.clone().into_os_string();
        tmp_path.push(segment::TMP_SUFFIX);
        let tmp_path = PathBuf::from(tmp_path);
        let mut tmp = File::create(&tmp_path).map_err(|e| Error::io("create", &tmp_path, e))?;
        tmp.write_all(&compressed)
            .map_err(|e| Error::io("write", &tmp_path, e))?;
        // The compressed copy must be durable before the plain one goes away; a failed sync
        // poisons like any other.
        self.guarded_sync(|io| io.sync_data(&tmp))?;
        fs::rename(&tmp_path, &zst_path).map_err(|e| Error::io("rename", &tmp_path, e))?;
        let dir = self.dir.clone();
        self.guarded_sync(|io| io.sync_dir(&dir))?;
        fs::remove_file(&plain_path).map_err(|e| Error::io("remove", &plain_path, e))?;
        self.guarded_sync(|io| io.sync_dir(&dir))?;
        let seg = self.segments.get_mut(&base).expect("present");
        seg.state = SegState::Compressed { cache: None };
        seg.disk_bytes = compressed.len() as u64;
        self.loaded.retain(|&b| b != base);
        Ok(Some(base))
    }

    fn guarded_sync(
        &mut self,
        f: impl FnOnce(&dyn crate::io::LogIo) -> io::Result<()>,
    ) -> Result<()> {
        if let Err(e) = f(&*self.cfg.io) {
            let cause = Arc::new(e);
            self.poisoned = Some(cause.clone());
            return Err(Error::Poisoned(cause));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.cfg.dir)
            .field("segments", &self.segments.len())
            .field("start_offset", &self.start_offset())
            .field("next_offset", &self.next_offset)
            .field("durable_offset", &self.durable_offset)
            .field("syncs_in_flight", &self.syncs.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}
