//! Errors of the storage crate.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use kefu_protocol::frame::Kind;

/// Everything a log operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log config: {0}")]
    Config(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An earlier sync failed, so nothing written since can be promised durable; the log
    /// refuses appends and syncs until it is reopened (which re-runs recovery).
    #[error("log is poisoned by a failed sync: {0}")]
    Poisoned(#[source] Arc<io::Error>),
    #[error("log directory {} is locked by another process", .0.display())]
    Locked(PathBuf),
    #[error("record of {len} bytes exceeds record_bytes_max {max}")]
    RecordTooLarge { len: u64, max: u32 },
    #[error("frame kind {0:?} is not a stored record kind")]
    NotARecord(Kind),
    #[error("unknown frame flags {0:#06x}")]
    BadFlags(u16),
    #[error("seq {got} of conversation {conversation_id:#018x} is not after its last seq {last}")]
    SeqNotIncreasing {
        conversation_id: u64,
        last: u64,
        got: u64,
    },
    #[error("limit reached: {0}")]
    LimitExceeded(String),
    #[error("offset {requested} is below the log start {start} (deleted by retention)")]
    BelowStart { requested: u64, start: u64 },
    #[error("record at offset {offset} (segment {segment_base}) is unreadable: {reason}")]
    Corrupt {
        offset: u64,
        segment_base: u64,
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
