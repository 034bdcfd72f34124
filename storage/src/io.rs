//! The thin layer of file-system calls whose failures matter (sync, allocate), as a trait so
//! tests can inject a failing fsync or a full disk.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// File-system calls the log makes through this trait instead of directly.
pub trait LogIo: Send + Sync + fmt::Debug {
    /// `fdatasync`: makes the file's written bytes (including those written through a shared
    /// mapping) durable.
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    /// `fsync` of a directory, so created, renamed and deleted entries are durable.
    fn sync_dir(&self, dir: &File) -> io::Result<()> {
        dir.sync_all()
    }

    /// Reserves `len` bytes of disk for `file` so writes through a mapping cannot hit a full
    /// disk (SIGBUS) later. Falls back to a sparse `set_len` where the file system cannot.
    fn allocate(&self, file: &File, len: u64) -> io::Result<()> {
        let len_off = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file length over off_t"))?;
        // SAFETY: plain syscall on a valid descriptor; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
            _ => Err(err),
        }
    }
}

/// The real calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdIo;

impl LogIo for StdIo {}

/// Shared handle to the log's I/O layer.
pub type SharedIo = Arc<dyn LogIo>;
