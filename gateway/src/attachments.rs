//! Attachment storage under `<data_dir>/attachments/<tenant>/<id>`: uploads stream into a temp file with the size limit (413) and content-type allow-list (415) enforced as they arrive, become visible only after fsync and rename, carry their metadata in a JSON file beside them, and open again for download with their length for sendfile.
//!
//! Files of one tenant, in its own directory:
//!
//! | name | what |
//! |---|---|
//! | `<id>` | the bytes, exactly as uploaded |
//! | `<id>.json` | [`AttachmentMeta`]: conversation, content type, size, SHA-256 |
//! | `.upload-<id>.tmp`, `.<id>.json.<rand>.tmp` | in progress; never read |
//!
//! Commit order: data to the temp file, fsync, rename to `<id>`; then the metadata through
//! `tenant::write_file_atomic` (temp, fsync, rename, directory fsync). The metadata file is the
//! commit point: lookups need it, and [`AttachmentStore::open`] deletes temp files and data files
//! without metadata, so an upload cut off at any point (client gone, crash, full disk) leaves
//! nothing behind after the next start, and nothing visible before it.
//!
//! Ids are 128 random bits (`a` + 32 hex digits): unguessable, and checked for that exact shape
//! before they touch a path, so an id cannot climb out of the tenant's directory. A tenant's
//! lookup only searches its own directory, so another tenant's id is simply not found; who may
//! download within the tenant is the caller's check (`auth::authorize` against
//! [`AttachmentMeta::conversation`]).
//!
//! The calls block on the file system (writes of one request chunk, one fsync at the end); the
//! gateway runs uploads on [`UploadWriter`]'s thread, so a shard never waits for a 10 MiB
//! write and its fsyncs.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tenant::{AttachmentConfig, write_file_atomic};

/// Directory under the data dir.
pub const ATTACHMENTS_DIR: &str = "attachments";
/// Characters of an attachment id: `a` + 32 lowercase hex digits.
pub const ATTACHMENT_ID_LEN: usize = 33;
/// Largest metadata file read back.
const META_BYTES_MAX: u64 = 4096;
const UPLOAD_PREFIX: &str = ".upload-";
const TMP_SUFFIX: &str = ".tmp";
const META_SUFFIX: &str = ".json";

#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("attachment larger than size_bytes_max = {size_bytes_max}")]
    TooLarge { size_bytes_max: u64 },
    #[error("the conversation's attachments are at their limit ({limit})")]
    ConversationFull { limit: String },
    #[error("the tenant's attachments are at tenant_bytes_max = {tenant_bytes_max} ({used} used)")]
    TenantFull { tenant_bytes_max: u64, used: u64 },
    #[error("content type {content_type:?} is not allowed")]
    UnsupportedType { content_type: String },
    #[error("body has {received} bytes but Content-Length said {declared}")]
    LengthMismatch { declared: u64, received: u64 },
    #[error("no such attachment")]
    NotFound,
    #[error("attachment {id} is damaged: {problem}")]
    Damaged { id: String, problem: String },
    #[error("attachment storage: {0}")]
    Io(#[from] std::io::Error),
}

impl AttachmentError {
    pub fn http_status(&self) -> u16 {
        match self {
            AttachmentError::TooLarge { .. }
            | AttachmentError::ConversationFull { .. }
            | AttachmentError::TenantFull { .. } => 413,
            AttachmentError::UnsupportedType { .. } => 415,
            AttachmentError::LengthMismatch { .. } => 400,
            AttachmentError::NotFound => 404,
            AttachmentError::Damaged { .. } | AttachmentError::Io(_) => 500,
        }
    }
}

/// What is stored beside each attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentMeta {
    pub id: String,
    pub tenant: String,
    pub conversation: u64,
    /// The normalized content type (lowercase essence, no parameters).
    pub content_type: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// What [`AttachmentStore::open`] cleaned up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub temp_files_removed: usize,
    pub orphans_removed: usize,
}

/// The attachments of every tenant under one data dir.
#[derive(Debug, Clone)]
pub struct AttachmentStore {
    root: PathBuf,
    /// Attachments per conversation and bytes per tenant, stored or being uploaded (see
    /// [`Usage`]).
    usage: Arc<Mutex<Usages>>,
}

/// What [`AttachmentStore`] counts.
#[derive(Debug, Default)]
struct Usages {
    conversations: HashMap<u64, Usage>,
    tenant_bytes: HashMap<String, u64>,
}

/// A conversation's attachments: count and bytes, the uploads in progress included (reserved
/// at [`AttachmentStore::begin`] with their declared length, given back if they fail). Built
/// at open from the metadata files. Behind a mutex taken once per upload start and end, never
/// on the message path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub count: u32,
    pub bytes: u64,
}

/// An upload's hold on its conversation's [`Usage`], given back on drop unless kept.
#[derive(Debug)]
struct Reservation {
    usage: Arc<Mutex<Usages>>,
    tenant: String,
    conversation: u64,
    bytes: u64,
    kept: bool,
}

impl Reservation {
    /// The upload is stored, with `size` bytes: its usage stays.
    fn keep(&mut self, size: u64) {
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(u) = usage.conversations.get_mut(&self.conversation) {
            u.bytes = u.bytes.saturating_sub(self.bytes) + size;
        }
        if let Some(t) = usage.tenant_bytes.get_mut(&self.tenant) {
            *t = t.saturating_sub(self.bytes) + size;
        }
        self.kept = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(u) = usage.conversations.get_mut(&self.conversation) {
            u.count = u.count.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(self.bytes);
            if u.count == 0 {
                usage.conversations.remove(&self.conversation);
            }
        }
        if let Some(t) = usage.tenant_bytes.get_mut(&self.tenant) {
            *t = t.saturating_sub(self.bytes);
        }
    }
}

/// The lowercase `type/subtype` of a `Content-Type` value, without parameters; `None` if it is
/// not of that shape.
pub fn content_type_essence(value: &str) -> Option<String> {
    let essence = value.split(';').next()?.trim().to_ascii_lowercase();
    let (kind, subtype) = essence.split_once('/')?;
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    (token(kind) && token(subtype) && essence.len() <= 127).then_some(essence)
}

/// Does the allow-list admit `essence`? Entries are `type/subtype` or `type/*`; an empty list
/// admits nothing (attachments off).
pub fn content_type_allowed(allow: &[String], essence: &str) -> bool {
    let kind = essence.split('/').next().unwrap_or_default();
    allow
        .iter()
        .any(|pattern| match pattern.strip_suffix("/*") {
            Some(pattern_kind) => pattern_kind == kind,
            None => pattern == essence,
        })
}

fn valid_id(id: &str) -> bool {
    id.len() == ATTACHMENT_ID_LEN
        && id.starts_with('a')
        && id[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn new_id() -> std::io::Result<String> {
    let bytes: [u8; 16] = crate::auth::random_bytes()?;
    let mut id = String::with_capacity(ATTACHMENT_ID_LEN);
    id.push('a');
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl AttachmentStore {
    /// A conversation's attachments, stored or in progress.
    pub fn usage(&self, conversation: u64) -> Usage {
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .conversations
            .get(&conversation)
            .copied()
            .unwrap_or_default()
    }

    /// Bytes of a tenant's attachments, stored or in progress.
    pub fn tenant_bytes(&self, tenant: &str) -> u64 {
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tenant_bytes
            .get(tenant)
            .copied()
            .unwrap_or_default()
    }

    /// Opens (creating) `<data_dir>/attachments` and removes what interrupted uploads left.
    pub fn open(data_dir: &Path) -> std::io::Result<(Self, Cleanup)> {
        let root = data_dir.join(ATTACHMENTS_DIR);
        std::fs::create_dir_all(&root)?;
        let mut cleanup = Cleanup::default();
        let mut usage = Usages::default();
        for tenant_dir in std::fs::read_dir(&root)? {
            let tenant_dir = tenant_dir?;
            if !tenant_dir.file_type()?.is_dir() {
                continue;
            }
            let dir = tenant_dir.path();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
                    std::fs::remove_file(entry.path())?;
                    cleanup.temp_files_removed += 1;
                } else if valid_id(name) && !dir.join(format!("{name}{META_SUFFIX}")).exists() {
                    // Data renamed into place but the metadata never committed.
                    std::fs::remove_file(entry.path())?;
                    cleanup.orphans_removed += 1;
                } else if let Some(id) = name.strip_suffix(META_SUFFIX)
                    && valid_id(id)
                    && let Ok(text) = std::fs::read(entry.path())
                    && let Ok(meta) = serde_json::from_slice::<AttachmentMeta>(&text)
                {
                    let u = usage.conversations.entry(meta.conversation).or_default();
                    u.count += 1;
                    u.bytes += meta.size;
                    *usage.tenant_bytes.entry(meta.tenant).or_default() += meta.size;
                }
            }
            if cleanup != Cleanup::default() {
                File::open(&dir)?.sync_all()?;
            }
        }
        Ok((
            Self {
                root,
                usage: Arc::new(Mutex::new(usage)),
            },
            cleanup,
        ))
    }

    /// The tenant's directory. Tenant names are validated at config load ([A-Za-z0-9_-]); a name
    /// that is not (it would be a path) finds nothing rather than panicking.
    fn tenant_dir(&self, tenant: &str) -> Result<PathBuf, AttachmentError> {
        let ok = !tenant.is_empty()
            && tenant.len() <= crate::tenant::NAME_BYTES_MAX
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(self.root.join(tenant))
        } else {
            Err(AttachmentError::NotFound)
        }
    }

    /// Starts an upload for `conversation` of `tenant`. `content_type` is the request's header
    /// value; `declared_len` its Content-Length, if any (checked against the limit now, and
    /// against the body at the end).
    pub fn begin(
        &self,
        tenant: &str,
        conversation: u64,
        content_type: &str,
        declared_len: Option<u64>,
        limits: &AttachmentConfig,
    ) -> Result<Upload, AttachmentError> {
        let essence = content_type_essence(content_type)
            .filter(|e| content_type_allowed(&limits.content_types, e))
            .ok_or_else(|| AttachmentError::UnsupportedType {
                content_type: content_type.chars().take(127).collect(),
            })?;
        if declared_len.is_some_and(|len| len > limits.size_bytes_max) {
            return Err(AttachmentError::TooLarge {
                size_bytes_max: limits.size_bytes_max,
            });
        }
        let dir = self.tenant_dir(tenant)?;
        // Without a declared length the upload may be as large as the limit.
        let bytes = declared_len.unwrap_or(limits.size_bytes_max);
        let reservation = {
            let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
            let tenant_used = usage.tenant_bytes.get(tenant).copied().unwrap_or_default();
            if limits.tenant_bytes_max > 0 && tenant_used + bytes > limits.tenant_bytes_max {
                return Err(AttachmentError::TenantFull {
                    tenant_bytes_max: limits.tenant_bytes_max,
                    used: tenant_used,
                });
            }
            let u = usage.conversations.entry(conversation).or_default();
            if u.count >= limits.per_conversation_count_max {
                return Err(AttachmentError::ConversationFull {
                    limit: format!(
                        "per_conversation_count_max = {}",
                        limits.per_conversation_count_max
                    ),
                });
            }
            if u.bytes + bytes > limits.per_conversation_bytes_max {
                return Err(AttachmentError::ConversationFull {
                    limit: format!(
                        "per_conversation_bytes_max = {}, {} used",
                        limits.per_conversation_bytes_max, u.bytes
                    ),
                });
            }
            u.count += 1;
            u.bytes += bytes;
            *usage.tenant_bytes.entry(tenant.to_owned()).or_default() += bytes;
            Reservation {
                usage: self.usage.clone(),
                tenant: tenant.to_owned(),
                conversation,
                bytes,
                kept: false,
            }
        };
        std::fs::create_dir_all(&dir)?;
        let id = new_id()?;
        let tmp_path = dir.join(format!("{UPLOAD_PREFIX}{id}{TMP_SUFFIX}"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)?;
        Ok(Upload {
            reservation,
            dir,
            tmp_path,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
            size_bytes_max: limits.size_bytes_max,
            declared_len,
            meta: AttachmentMeta {
                id,
                tenant: tenant.to_owned(),
                conversation,
                content_type: essence,
                size: 0,
                sha256: String::new(),
            },
        })
    }

    /// The attachment `id` of `tenant`: its metadata and the open file, positioned at 0, whose
    /// length is `meta.size` (checked), ready for sendfile.
    pub fn open_for_download(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<(AttachmentMeta, File), AttachmentError> {
        if !valid_id(id) {
            return Err(AttachmentError::NotFound);
        }
        let dir = self.tenant_dir(tenant)?;
        let meta_path = dir.join(format!("{id}{META_SUFFIX}"));
        let text = match File::open(&meta_path) {
            Ok(file) => {
                use std::io::Read;
                let mut text = String::new();
                file.take(META_BYTES_MAX).read_to_string(&mut text)?;
                text
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AttachmentError::NotFound);
            }
            Err(e) => return Err(e.into()),
        };
        let damaged = |problem: String| AttachmentError::Damaged {
            id: id.to_owned(),
            problem,
        };
        let meta: AttachmentMeta =
            serde_json::from_str(&text).map_err(|e| damaged(format!("metadata: {e}")))?;
        if meta.id != id || meta.tenant != tenant {
            return Err(damaged("metadata names another attachment".into()));
        }
        let file = File::open(dir.join(id)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => damaged("data file missing".into()),
            _ => e.into(),
        })?;
        let len = file.metadata()?.len();
        if len != meta.size {
            return Err(damaged(format!(
                "{len} bytes on disk, {} in metadata",
                meta.size
            )));
        }
        Ok((meta, file))
    }
}

/// An upload in progress. Dropping it without [`Upload::finish`] removes its temp file.
#[derive(Debug)]
pub struct Upload {
    /// Its conversation's usage, held until the upload is stored (then kept) or fails.
    reservation: Reservation,
    dir: PathBuf,
    tmp_path: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    size: u64,
    size_bytes_max: u64,
    declared_len: Option<u64>,
    meta: AttachmentMeta,
}

impl Upload {
    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// Bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a chunk of the body. Past the limit: `TooLarge`, and the temp file is gone (the
    /// caller answers 413 and drops the upload).
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), AttachmentError> {
        let Some(file) = self.file.as_mut() else {
            return Err(AttachmentError::Io(std::io::Error::other(
                "upload already failed",
            )));
        };
        let size = self.size + chunk.len() as u64;
        if size > self.size_bytes_max {
            self.discard();
            return Err(AttachmentError::TooLarge {
                size_bytes_max: self.size_bytes_max,
            });
        }
        if let Err(e) = file.write_all(chunk) {
            self.discard();
            return Err(e.into());
        }
        self.hasher.update(chunk);
        self.size = size;
        Ok(())
    }

    /// Makes the upload durable and visible; returns its metadata.
    pub fn finish(mut self) -> Result<AttachmentMeta, AttachmentError> {
        if let Some(declared) = self.declared_len
            && declared != self.size
        {
            self.discard();
            return Err(AttachmentError::LengthMismatch {
                declared,
                received: self.size,
            });
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("upload already failed"))?;
        let result = (|| -> Result<AttachmentMeta, AttachmentError> {
            file.sync_all()?;
            drop(file);
            let data_path = self.dir.join(&self.meta.id);
            std::fs::rename(&self.tmp_path, &data_path)?;
            let mut meta = self.meta.clone();
            meta.size = self.size;
            meta.sha256 = hex(&std::mem::take(&mut self.hasher).finalize());
            let json = serde_json::to_vec(&meta).expect("metadata serializes");
            if let Err(e) =
                write_file_atomic(&self.dir.join(format!("{}{META_SUFFIX}", meta.id)), &json)
            {
                let _ = std::fs::remove_file(&data_path);
                return Err(e.into());
            }
            Ok(meta)
        })();
        match &result {
            Ok(meta) => self.reservation.keep(meta.size),
            Err(_) => {
                let _ = std::fs::remove_file(&self.tmp_path);
            }
        }
        result
    }

    fn discard(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(&self.tmp_path);
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.discard();
        }
    }
}

/// Uploads queued for the writer thread at once; one more is answered 503.
pub const UPLOADS_QUEUED_MAX: usize = 16;

/// One upload for the writer thread: the started upload, its whole body, and where the result
/// goes.
pub struct UploadJob {
    pub upload: Upload,
    pub body: Vec<u8>,
    pub reply: std::sync::Arc<crate::shard::ReplySlot<Result<AttachmentMeta, AttachmentError>>>,
}

/// A thread that writes and syncs uploads, so a shard thread never blocks on one: a 10 MiB
/// upload's write and its three fsyncs took the shard (and every connection on it) off the
/// CPU for tens of milliseconds. Bounded: at most [`UPLOADS_QUEUED_MAX`] uploads wait, with
/// their bodies (so at most that many times the largest attachment limit in memory).
pub struct UploadWriter {
    jobs: crossbeam_queue::ArrayQueue<Box<UploadJob>>,
    thread: std::sync::OnceLock<std::thread::Thread>,
    stop: std::sync::atomic::AtomicBool,
}

impl UploadWriter {
    /// Starts the writer thread (`kefu-uploads`).
    pub fn start() -> std::io::Result<(std::sync::Arc<Self>, std::thread::JoinHandle<()>)> {
        let writer = std::sync::Arc::new(Self {
            jobs: crossbeam_queue::ArrayQueue::new(UPLOADS_QUEUED_MAX),
            thread: std::sync::OnceLock::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let w = writer.clone();
        let handle = std::thread::Builder::new()
            .name("kefu-uploads".into())
            .spawn(move || w.run())?;
        let _ = writer.thread.set(handle.thread().clone());
        Ok((writer, handle))
    }

    /// Queues an upload; gives it back when the queue is full.
    pub fn submit(&self, job: Box<UploadJob>) -> Result<(), Box<UploadJob>> {
        self.jobs.push(job)?;
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
        Ok(())
    }

    /// Stops the thread once the queued uploads are done.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn run(&self) {
        loop {
            while let Some(job) = self.jobs.pop() {
                let UploadJob {
                    mut upload,
                    body,
                    reply,
                } = *job;
                let result = upload.write_chunk(&body).and_then(|()| upload.finish());
                drop(body);
                reply.put(result);
            }
            if self.stop.load(std::sync::atomic::Ordering::Acquire) && self.jobs.is_empty() {
                return;
            }
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(size_bytes_max: u64) -> AttachmentConfig {
        AttachmentConfig {
            size_bytes_max,
            content_types: vec!["image/*".into(), "application/pdf".into()],
            per_conversation_count_max: 100,
            per_conversation_bytes_max: 100 * size_bytes_max,
            tenant_bytes_max: 0,
        }
    }

    /// With `tenant_bytes_max`, a tenant's attachments stop there across its conversations
    /// (413), another tenant's are not affected, a failed upload gives its bytes back, and a
    /// reopened store counts the disk.
    #[test]
    fn a_tenant_s_attachments_stop_at_tenant_bytes_max() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        let mut l = limits(1000);
        l.tenant_bytes_max = 2500;
        store_one(&store, 1, 1000, &l).unwrap();
        store_one(&store, 2, 1000, &l).unwrap();
        let e = store_one(&store, 3, 1000, &l).unwrap_err();
        assert_eq!(e.http_status(), 413);
        assert!(e.to_string().contains("tenant_bytes_max = 2500"), "{e}");
        assert_eq!(store.tenant_bytes("acme"), 2000);
        let mut upload = store
            .begin("globex", 9, "image/png", Some(1000), &l)
            .unwrap();
        upload.write_chunk(&[1; 1000]).unwrap();
        upload.finish().unwrap();
        let mut failing = store.begin("acme", 3, "image/png", Some(400), &l).unwrap();
        assert_eq!(store.tenant_bytes("acme"), 2400);
        failing.write_chunk(&[1; 10]).unwrap();
        assert!(failing.finish().is_err());
        assert_eq!(store.tenant_bytes("acme"), 2000);
        drop(store);
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        assert_eq!(store.tenant_bytes("acme"), 2000);
        assert_eq!(store.tenant_bytes("globex"), 1000);
    }

    /// Stores one attachment of `len` bytes in `conversation`.
    fn store_one(
        store: &AttachmentStore,
        conversation: u64,
        len: usize,
        limits: &AttachmentConfig,
    ) -> Result<AttachmentMeta, AttachmentError> {
        let mut upload =
            store.begin("acme", conversation, "image/png", Some(len as u64), limits)?;
        upload.write_chunk(&vec![7u8; len])?;
        upload.finish()
    }

    /// A conversation takes at most `per_conversation_count_max` attachments and
    /// `per_conversation_bytes_max` bytes of them (413 beyond, nothing written); a failed
    /// upload gives its share back; other conversations are not affected; a reopened store
    /// counts what is on disk.
    #[test]
    fn a_conversation_s_attachments_are_bounded_in_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        let mut l = limits(1000);
        l.per_conversation_count_max = 3;
        l.per_conversation_bytes_max = 2500;
        store_one(&store, 1, 1000, &l).unwrap();
        store_one(&store, 1, 1000, &l).unwrap();
        // 2000 + 1000 > 2500.
        let e = store_one(&store, 1, 1000, &l).unwrap_err();
        assert_eq!(e.http_status(), 413);
        assert!(e.to_string().contains("per_conversation_bytes_max"), "{e}");
        // A failed upload (length mismatch) gives back what it reserved.
        let mut upload = store.begin("acme", 1, "image/png", Some(400), &l).unwrap();
        upload.write_chunk(&[1; 10]).unwrap();
        assert!(upload.finish().is_err());
        assert_eq!(
            store.usage(1),
            Usage {
                count: 2,
                bytes: 2000
            }
        );
        store_one(&store, 1, 400, &l).unwrap();
        let e = store_one(&store, 1, 1, &l).unwrap_err();
        assert!(
            e.to_string().contains("per_conversation_count_max = 3"),
            "{e}"
        );
        store_one(&store, 2, 1000, &l).unwrap();
        let before = files(dir.path()).len();
        assert!(store_one(&store, 1, 1, &l).is_err());
        assert_eq!(
            files(dir.path()).len(),
            before,
            "a refused upload writes nothing"
        );
        drop(store);
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        assert_eq!(
            store.usage(1),
            Usage {
                count: 3,
                bytes: 2400
            }
        );
        assert_eq!(
            store.usage(2),
            Usage {
                count: 1,
                bytes: 1000
            }
        );
        assert!(store_one(&store, 1, 1, &l).is_err());
    }

    /// Every file under the store, relative, sorted.
    fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for tenant in std::fs::read_dir(root.join(ATTACHMENTS_DIR)).unwrap() {
            let tenant = tenant.unwrap();
            for f in std::fs::read_dir(tenant.path()).unwrap() {
                out.push(format!(
                    "{}/{}",
                    tenant.file_name().to_str().unwrap(),
                    f.unwrap().file_name().to_str().unwrap()
                ));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn round_trip_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cleanup) = AttachmentStore::open(dir.path()).unwrap();
        assert_eq!(cleanup, Cleanup::default());
        let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut upload = store
            .begin(
                "acme",
                42,
                "Image/PNG; name=x",
                Some(body.len() as u64),
                &limits(1 << 20),
            )
            .unwrap();
        for chunk in body.chunks(4096) {
            upload.write_chunk(chunk).unwrap();
        }
        let id = upload.id().to_owned();
        // Not visible before finish.
        assert!(matches!(
            store.open_for_download("acme", &id),
            Err(AttachmentError::NotFound)
        ));
        let meta = upload.finish().unwrap();
        assert_eq!(meta.id, id);
        assert_eq!(meta.size, body.len() as u64);
        assert_eq!(meta.content_type, "image/png");
        assert_eq!(meta.conversation, 42);
        assert_eq!(meta.sha256, hex(&Sha256::digest(&body)));
        let (found, mut file) = store.open_for_download("acme", &id).unwrap();
        assert_eq!(found, meta);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut back).unwrap();
        assert_eq!(back, body);
        assert_eq!(
            files(dir.path()),
            [format!("acme/{id}"), format!("acme/{id}.json")]
        );
        // Another tenant cannot reach it, and ids cannot climb out of the directory.
        for tenant in ["globex", "../acme", "", "acme/."] {
            assert!(matches!(
                store.open_for_download(tenant, &id),
                Err(AttachmentError::NotFound)
            ));
        }
        for bad in [
            "../acme/x",
            "",
            "A0",
            &id.to_uppercase(),
            &format!("{id}.json"),
        ] {
            assert!(matches!(
                store.open_for_download("acme", bad),
                Err(AttachmentError::NotFound)
            ));
        }
    }

    #[test]
    fn limits_answer_413_and_415_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        let e = store
            .begin("acme", 1, "text/html", None, &limits(10))
            .unwrap_err();
        assert_eq!(e.http_status(), 415);
        let e = store
            .begin("acme", 1, "not a type", None, &limits(10))
            .unwrap_err();
        assert_eq!(e.http_status(), 415);
        let e = store
            .begin("acme", 1, "application/pdf", Some(11), &limits(10))
            .unwrap_err();
        assert_eq!(e.http_status(), 413);
        // No Content-Length (chunked): the limit trips while streaming.
        let mut upload = store
            .begin("acme", 1, "application/pdf", None, &limits(10))
            .unwrap();
        upload.write_chunk(b"0123456789").unwrap();
        let e = upload.write_chunk(b"x").unwrap_err();
        assert_eq!(e.http_status(), 413);
        assert!(
            upload.write_chunk(b"").is_err(),
            "a failed upload stays failed"
        );
        drop(upload);
        // A body shorter than declared.
        let mut upload = store
            .begin("acme", 1, "application/pdf", Some(5), &limits(10))
            .unwrap();
        upload.write_chunk(b"abc").unwrap();
        assert_eq!(upload.finish().unwrap_err().http_status(), 400);
        // Exactly at the limit is fine.
        let mut upload = store
            .begin("acme", 1, "application/pdf", None, &limits(10))
            .unwrap();
        upload.write_chunk(b"0123456789").unwrap();
        let meta = upload.finish().unwrap();
        assert_eq!(
            files(dir.path()).len(),
            2,
            "only the one complete upload: {:?}",
            files(dir.path())
        );
        assert!(store.open_for_download("acme", &meta.id).is_ok());
        // An empty allow-list turns attachments off.
        let off = AttachmentConfig {
            content_types: vec![],
            ..limits(10)
        };
        assert_eq!(
            store
                .begin("acme", 1, "image/png", None, &off)
                .unwrap_err()
                .http_status(),
            415
        );
    }

    #[test]
    fn aborted_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        // The client goes away mid-body: the handler drops the upload.
        let mut upload = store
            .begin("acme", 7, "image/jpeg", Some(1_000), &limits(1 << 20))
            .unwrap();
        upload.write_chunk(&[1; 500]).unwrap();
        let id = upload.id().to_owned();
        assert_eq!(
            files(dir.path()).len(),
            1,
            "the temp file exists while uploading"
        );
        drop(upload);
        assert!(files(dir.path()).is_empty());
        assert!(matches!(
            store.open_for_download("acme", &id),
            Err(AttachmentError::NotFound)
        ));
    }

    #[test]
    fn a_crash_mid_upload_is_cleaned_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AttachmentStore::open(dir.path()).unwrap();
        let mut done = store
            .begin("acme", 1, "image/gif", None, &limits(1 << 20))
            .unwrap();
        done.write_chunk(b"GIF89a").unwrap();
        let done = done.finish().unwrap();
        // Simulate a process killed mid-upload: the temp file stays (forget skips Drop) ...
        let mut cut = store
            .begin("acme", 1, "image/gif", None, &limits(1 << 20))
            .unwrap();
        cut.write_chunk(b"GIF8").unwrap();
        std::mem::forget(cut);
        // ... and one killed between the data rename and the metadata commit.
        let orphan = new_id().unwrap();
        std::fs::write(
            dir.path().join(ATTACHMENTS_DIR).join("acme").join(&orphan),
            b"x",
        )
        .unwrap();
        std::fs::write(
            dir.path()
                .join(ATTACHMENTS_DIR)
                .join("acme")
                .join(".x.json.1234.tmp"),
            b"{",
        )
        .unwrap();
        assert_eq!(files(dir.path()).len(), 5);
        let (store, cleanup) = AttachmentStore::open(dir.path()).unwrap();
        assert_eq!(
            cleanup,
            Cleanup {
                temp_files_removed: 2,
                orphans_removed: 1
            }
        );
        assert_eq!(
            files(dir.path()),
            [
                format!("acme/{}", done.id),
                format!("acme/{}.json", done.id)
            ]
        );
        assert!(store.open_for_download("acme", &done.id).is_ok());
        // A damaged file is reported, not served.
        std::fs::write(
            dir.path().join(ATTACHMENTS_DIR).join("acme").join(&done.id),
            b"GIF",
        )
        .unwrap();
        assert!(matches!(
            store.open_for_download("acme", &done.id),
            Err(AttachmentError::Damaged { .. })
        ));
    }

    #[test]
    fn content_type_rules() {
        let allow = ["image/*".to_string(), "application/pdf".to_string()];
        for (value, ok) in [
            ("image/png", true),
            ("IMAGE/SVG+XML; charset=utf-8", true),
            ("application/pdf", true),
            ("application/pdfx", false),
            ("application/*", false),
            ("imagex/png", false),
            ("image", false),
            ("image/", false),
            ("/png", false),
        ] {
            let allowed =
                content_type_essence(value).is_some_and(|e| content_type_allowed(&allow, &e));
            assert_eq!(allowed, ok, "{value}");
        }
    }
}
