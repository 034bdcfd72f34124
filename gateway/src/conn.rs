//! A client connection's byte transport: plain TCP with monoio's owned-buffer I/O, or TLS through rustls on top of it. Reads append into the caller's (pooled) buffer.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;

/// Every idle WebSocket holds one of these: the TLS state is boxed in one piece, so a plain
/// connection pays one pointer for it.
pub struct Conn {
    pub stream: TcpStream,
    tls: Option<Box<Tls>>,
}

/// A TLS session on its way to another shard with its socket (`migrate`). rustls keeps no
/// reference to the thread or runtime that served it.
pub struct TlsSession(Box<Tls>);

/// A TLS connection's state. Its raw records pass through buffers of a per-thread pool
/// ([`tls_buf`]): each read is fed to rustls whole and each write sent out before the buffer
/// goes back, so an idle TLS connection holds none.
struct Tls {
    conn: rustls::ServerConnection,
}

/// Size of a buffer for raw TLS records: one full record (16 KiB of plaintext plus overhead)
/// fits.
const TLS_BUF_BYTES: usize = 17 * 1024;
/// Raw-record buffers kept per thread for reuse (a thread serves one TLS read or write at a
/// time per connection, and only the busy connections hold one).
const TLS_BUFS_KEPT_MAX: usize = 64;

/// How long one write may wait for the peer to take any bytes (`limits.write_timeout_ms`,
/// set once at start by [`set_write_timeout_ms`]). A peer that stops reading would otherwise
/// hold its connection, and everything queued for it, for ever: a blocked write is past the
/// checks (idle, ping, the 4008 overflow) that run between a socket's steps.
static WRITE_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30_000);

/// Sets the write timeout of every connection of this process (from the config, at start).
pub fn set_write_timeout_ms(ms: u64) {
    WRITE_TIMEOUT_MS.store(ms.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The write timeout ([`set_write_timeout_ms`]).
pub fn write_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(WRITE_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// The error a write that made no progress for the write timeout ends with (kind `TimedOut`;
/// see [`crate::metrics::Disconnect::of_write`]).
pub fn write_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the peer took no bytes for write_timeout_ms",
    )
}

/// Waits until `stream` can take bytes, at most the write timeout.
pub async fn writable(stream: &TcpStream) -> io::Result<()> {
    match monoio::time::timeout(write_timeout(), stream.writable(false)).await {
        Ok(res) => res,
        Err(_) => Err(write_timed_out()),
    }
}

/// Writes all of `buf` through the ring, each write within the write timeout (a slow peer
/// that keeps taking bytes is not cut off, one that takes none is). Returns the buffer,
/// except after a timeout: the abandoned op keeps it until the kernel lets go of it.
async fn ring_write_all(stream: &mut TcpStream, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    use monoio::buf::IoBuf;
    use monoio::io::AsyncWriteRent;
    let mut buf = buf;
    let mut at = 0;
    while at < buf.len() {
        match monoio::time::timeout(write_timeout(), stream.write(buf.slice(at..))).await {
            Ok((Ok(0), slice)) => {
                return (Err(io::ErrorKind::WriteZero.into()), slice.into_inner());
            }
            Ok((Ok(n), slice)) => {
                buf = slice.into_inner();
                at += n;
            }
            Ok((Err(e), slice)) => return (Err(e), slice.into_inner()),
            Err(_) => return (Err(write_timed_out()), Vec::new()),
        }
    }
    (Ok(()), buf)
}

thread_local! {
    static TLS_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty raw-record buffer from this thread's pool, or a new one.
fn tls_buf() -> Vec<u8> {
    TLS_BUFS
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(TLS_BUF_BYTES))
}

/// Gives a raw-record buffer back to this thread's pool (bounded; an oversized one is freed).
fn give_tls_buf(mut buf: Vec<u8>) {
    if buf.capacity() > 4 * TLS_BUF_BYTES {
        return;
    }
    buf.clear();
    let _ = TLS_BUFS.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < TLS_BUFS_KEPT_MAX {
            p.push(buf);
        }
    });
}

impl Conn {
    pub fn plain(stream: TcpStream) -> Self {
        Self { stream, tls: None }
    }

    pub fn tls(stream: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Self {
            stream,
            tls: Some(Box::new(Tls { conn })),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A connection another shard started: its socket, and its TLS session if it has one.
    pub fn resume(stream: TcpStream, tls: TlsSession) -> Self {
        Self {
            stream,
            tls: Some(tls.0),
        }
    }

    /// Takes the TLS session out to move it with the socket to another shard, if it can go:
    /// nothing of it waits to be written (its records are all sent). Whatever rustls holds
    /// besides (a partial record read, say) goes with it. `None` for a plain connection.
    pub fn take_tls(&mut self) -> Option<TlsSession> {
        if self.tls.as_ref()?.conn.wants_write() {
            return None;
        }
        self.tls.take().map(TlsSession)
    }

    /// Puts back a session [`Conn::take_tls`] took, when the move did not happen.
    pub fn restore_tls(&mut self, tls: TlsSession) {
        self.tls = Some(tls.0);
    }

    /// Waits until the socket has something to read (holding no buffer meanwhile).
    pub async fn readable(&self) -> io::Result<()> {
        if let Some(tls) = &self.tls
            && tls.conn.wants_write()
        {
            return Ok(());
        }
        self.stream.readable(false).await
    }

    /// [`Conn::readable`] without its `async fn` wrapper, for futures kept across an idle
    /// wait (16 bytes less in every idle WebSocket): `None` when there is work at once (TLS
    /// records to send), else the wait for readability.
    pub fn readable_op(&self) -> Option<impl std::future::Future<Output = io::Result<()>> + '_> {
        if let Some(tls) = &self.tls
            && tls.conn.wants_write()
        {
            return None;
        }
        Some(self.stream.readable(false))
    }

    /// Reads what is available and appends it to `buf` (growing it by one chunk if full).
    /// `Ok(0)` means the peer closed. On a TLS connection, `Err` of kind `WouldBlock` means
    /// records came but no application data yet (a key update, part of a record, a warning
    /// alert): the caller goes back to its wait, as after a partial frame on a plain socket,
    /// instead of this read waiting for data while deliveries and deadlines wait behind it.
    pub async fn read_append(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(buf.capacity().max(4096));
        }
        if self.tls.is_none() {
            // The callers read after the socket polled readable: one non-blocking `recv`
            // takes the bytes now instead of another ring round trip (an op, a submit and a
            // trip through the event loop per request).
            if let Some(res) = self.try_recv(&mut buf) {
                return (res, buf);
            }
            let len = buf.len();
            let cap = buf.capacity();
            let (res, slice) = self.stream.read(buf.slice_mut(len..cap)).await;
            return (res, slice.into_inner());
        }
        // Hand pending plaintext first.
        let tls = self.tls.as_mut().expect("tls");
        let before = buf.len();
        match take_plaintext(&mut tls.conn, &mut buf) {
            Ok(Some(n)) => return (Ok(n), buf),
            Ok(None) => {}
            Err(e) => return (Err(e), buf),
        }
        debug_assert_eq!(before, buf.len());
        if let Err(e) = self.flush_tls().await {
            return (Err(e), buf);
        }
        let mut raw = tls_buf();
        // As for plain connections: the records that made the socket readable are taken
        // with one non-blocking `recv`; the ring reads only when nothing is there yet.
        let res = match self.try_recv(&mut raw) {
            Some(res) => res,
            None => {
                let cap = raw.capacity();
                let (res, slice) = self.stream.read(raw.slice_mut(0..cap)).await;
                raw = slice.into_inner();
                res
            }
        };
        let fed = match res {
            Ok(0) => Ok(Some(0)),
            Ok(_) => feed_tls(&mut self.tls.as_mut().expect("tls").conn, &raw, &mut buf),
            Err(e) => Err(e),
        };
        give_tls_buf(raw);
        match fed {
            Ok(Some(n)) => return (Ok(n), buf),
            Ok(None) => {}
            Err(e) => return (Err(e), buf),
        }
        // No application data, but rustls may have an answer to send (a key update of its
        // own).
        if let Err(e) = self.flush_tls().await {
            return (Err(e), buf);
        }
        (
            Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "TLS records without application data",
            )),
            buf,
        )
    }
}

/// Hands all of `raw` to rustls, moving the plaintext into `buf` as it comes: rustls holds at
/// most 16 KiB of it and refuses more records until it is read (so one read of more records
/// than that, as a client sending fast gets, would otherwise fail). Answers as
/// [`take_plaintext`] does: how much plaintext it moved, `Some(0)` when the peer closed,
/// `None` when the records held no data.
fn feed_tls(
    tls: &mut rustls::ServerConnection,
    raw: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    let start = buf.len();
    let mut cursor = raw;
    while !cursor.is_empty() {
        // 0: a close_notify came, after which rustls reads nothing more.
        if tls.read_tls(&mut cursor)? == 0 {
            break;
        }
        tls.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        take_plaintext(tls, buf)?;
    }
    match buf.len() - start {
        0 => take_plaintext(tls, buf),
        moved => Ok(Some(moved)),
    }
}

/// Moves decrypted bytes from rustls into `buf`: `Some(0)` when the peer closed, `None` when
/// rustls has none. A plain function, so its stack chunk is not part of the connection's
/// future (an idle connection's task stays small).
fn take_plaintext(
    tls: &mut rustls::ServerConnection,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    // Drain everything rustls has decrypted: the caller then waits for socket readability,
    // which would never come for plaintext left behind in rustls.
    let mut chunk = [0u8; 4096];
    let mut total = 0;
    loop {
        match tls.reader().read(&mut chunk) {
            Ok(n) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                total += n;
            }
            Ok(_) if total == 0 => return Ok(Some(0)),
            Ok(_) => return Ok(Some(total)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(if total == 0 { None } else { Some(total) });
            }
            Err(e) => return Err(e),
        }
    }
}

impl Conn {
    /// Sends TLS records rustls has queued (handshake, alerts, encrypted data): one
    /// non-blocking `send` first, the ring only for what the socket buffer did not take.
    async fn flush_tls(&mut self) -> io::Result<()> {
        loop {
            let tls = &mut self.tls.as_mut().expect("tls").conn;
            if !tls.wants_write() {
                return Ok(());
            }
            let mut out = tls_buf();
            if let Err(e) = tls.write_tls(&mut out) {
                give_tls_buf(out);
                return Err(e);
            }
            match self.try_send(&out) {
                Some(Ok(n)) if n == out.len() => {
                    give_tls_buf(out);
                    continue;
                }
                Some(Ok(n)) => {
                    out.drain(..n);
                }
                Some(Err(e)) => {
                    give_tls_buf(out);
                    return Err(e);
                }
                None => {}
            }
            // Boxed: the slow path's state (a ring op under a timer) would otherwise sit in
            // every caller's future, which a connection moves and keeps per burst.
            let (res, out) = Box::pin(ring_write_all(&mut self.stream, out)).await;
            give_tls_buf(out);
            res?;
        }
    }

    /// Writes all of `buf`; returns it (cleared) for reuse.
    pub async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if self.tls.is_none() {
            // A response or a few frames fit the socket's send buffer almost always: one
            // non-blocking `send` instead of a ring op; only what did not fit goes through
            // the ring (which waits for room).
            let mut buf = buf;
            match self.try_send(&buf) {
                Some(Ok(n)) if n == buf.len() => {
                    buf.clear();
                    return (Ok(()), buf);
                }
                Some(Ok(n)) => {
                    buf.drain(..n);
                }
                Some(Err(e)) => {
                    buf.clear();
                    return (Err(e), buf);
                }
                None => {}
            }
            // Boxed, as in `flush_tls`: only when the socket did not take it all.
            let (res, mut buf) = Box::pin(ring_write_all(&mut self.stream, buf)).await;
            buf.clear();
            return (res, buf);
        }
        // rustls takes plaintext only up to its buffer limit (64 KiB of records not yet
        // sent) and then takes nothing: write what it takes, send the records, go on.
        let mut buf = buf;
        let mut at = 0;
        let mut res = Ok(());
        while at < buf.len() {
            let tls = &mut self.tls.as_mut().expect("tls").conn;
            match tls.writer().write(&buf[at..]) {
                Ok(0) if !tls.wants_write() => {
                    res = Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "rustls took no plaintext",
                    ));
                    break;
                }
                Ok(n) => at += n,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
            if let Err(e) = self.flush_tls().await {
                res = Err(e);
                break;
            }
        }
        buf.clear();
        if res.is_ok() {
            res = self.flush_tls().await;
        }
        (res, buf)
    }
}

impl Conn {
    /// Direct syscalls skip the ring, and the eBPF tracer follows a request through the
    /// ring's recv/send ops: while a tracer is attached every transfer goes through the ring.
    fn direct_io(&self) -> bool {
        !kefu_trace_common::tracer_attached()
    }

    /// One non-blocking `recv` into `buf`'s spare capacity: `None` when nothing is there yet
    /// (the caller falls back to a ring read) or when direct I/O is off.
    fn try_recv(&self, buf: &mut Vec<u8>) -> Option<io::Result<usize>> {
        if !self.direct_io() {
            return None;
        }
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `buf`; recv
        // writes at most that many and returns how many it wrote.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            // SAFETY: the kernel initialized the first `n` spare bytes.
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Some(Ok(n as usize));
        }
        would_block_or(io::Error::last_os_error())
    }

    /// Whether [`Conn::try_send`] may write this connection's bytes: plain (no TLS, whose
    /// records rustls frames) and no tracer wanting every send on the ring.
    pub fn sends_directly(&self) -> bool {
        self.tls.is_none() && self.direct_io()
    }

    /// One non-blocking `send` of `data`: how much went out, or `None` when the send buffer
    /// is full (the caller falls back to the ring) or direct I/O is off. Raw bytes: on a TLS
    /// connection only the records rustls wrote (`flush_tls`), never plaintext.
    pub fn try_send(&self, data: &[u8]) -> Option<io::Result<usize>> {
        if !self.direct_io() || data.is_empty() {
            return None;
        }
        // SAFETY: `data` is readable memory of `data.len()` bytes.
        let n = unsafe {
            libc::send(
                self.stream.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        would_block_or(io::Error::last_os_error())
    }
}

/// `None` for "try the ring instead" (would block, interrupted), the error otherwise.
fn would_block_or<T>(e: io::Error) -> Option<io::Result<T>> {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
        _ => Some(Err(e)),
    }
}
