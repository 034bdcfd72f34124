//! The integration firehose: a shard's log as raw stored frames from an offset, sent with `sendfile(2)` straight from the segment files on plain connections (copied through rustls on TLS ones: no kTLS here), following the tail when asked. Serves `GET /v1/stream` and the binary protocol's `StreamOpen`.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use kefu_storage::{FileRun, RunSource};

use crate::conn::Conn;
use crate::http::call;
use crate::metrics::Disconnect;
use crate::server::ShardCtx;
use crate::shard::{Command, Outcome};

/// How often a following stream looks for new records when it has caught up.
const FOLLOW_POLL_MS: u64 = 5;

/// Streams shard `shard`'s log from offset `from` until the end (or forever with `follow`).
/// With `http`, writes the response head first.
///
/// The body's end is the connection's end (its length is not known up front), so a stream
/// cut short by a failure must not look like one that reached the end: after a failure the
/// connection is reset (`SO_LINGER` 0), not closed, and the client sees an error instead of
/// a clean end of file. Only a stream that sent everything up to the end closes normally.
pub async fn serve(
    ctx: Rc<ShardCtx>,
    mut conn: Conn,
    shard: u16,
    from: u64,
    follow: bool,
    conn_id: u64,
    http: bool,
) -> Disconnect {
    let fd = conn.stream.as_raw_fd();
    let why = stream(ctx, conn_id, &mut conn, shard, from, follow, http).await;
    if !matches!(why, Disconnect::Closed | Disconnect::Shutdown) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a descriptor the caller still owns (it closes it after this
        // returns), from a local value of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
    drop(conn);
    why
}

async fn stream(
    ctx: Rc<ShardCtx>,
    conn_id: u64,
    conn: &mut Conn,
    shard: u16,
    mut from: u64,
    follow: bool,
    http: bool,
) -> Disconnect {
    if http {
        // The length is unknown (the tail may grow): the body ends when the connection closes.
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-kefu-frames\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n".to_vec();
        let (res, _) = conn.write_all(head).await;
        if res.is_err() {
            return Disconnect::IoError;
        }
    }
    let chunk = ctx.shared.config.limits.stream_chunk_bytes_max as u64;
    let fd = conn.stream.as_raw_fd();
    let plain = !conn.is_tls();
    if plain {
        // sendfile needs a non-blocking socket so a full send buffer parks the task, not the
        // shard thread. From here on this socket is only written with sendfile.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    loop {
        if ctx.stopping.get() {
            return Disconnect::Shutdown;
        }
        let outcome = match call(&ctx, shard, |reply| Command::FileRuns {
            from,
            max_bytes: chunk,
            reply,
        })
        .await
        {
            Ok(o) => o,
            Err(_) => return Disconnect::IoError,
        };
        let runs = match outcome {
            Outcome::Runs(Ok(runs)) => runs,
            _ => return Disconnect::IoError,
        };
        if runs.is_empty() {
            if !follow {
                return Disconnect::Closed;
            }
            monoio::select! {
                _ = monoio::time::sleep(Duration::from_millis(FOLLOW_POLL_MS)) => {}
                _ = ctx.stopped(conn_id) => return Disconnect::Shutdown,
            }
            continue;
        }
        for run in &runs {
            let sent = if plain {
                send_run(conn, fd, run).await
            } else {
                copy_run(conn, run).await
            };
            if let Err(e) = sent {
                return Disconnect::of_write(&e);
            }
            from = run.end_offset;
        }
    }
}

/// Sends one run with sendfile, waiting for writability when the socket buffer is full.
async fn send_run(conn: &Conn, fd: i32, run: &FileRun) -> std::io::Result<()> {
    match &run.source {
        RunSource::File(file) => {
            let mut offset = run.position as libc::off_t;
            let end = (run.position + run.len) as libc::off_t;
            while offset < end {
                let left = (end - offset) as usize;
                // SAFETY: both descriptors are open; `offset` is a valid in/out pointer.
                let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut offset, left) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        crate::conn::writable(&conn.stream).await?;
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
            }
            Ok(())
        }
        RunSource::Memory(bytes) => {
            let start = run.position as usize;
            let mut data = &bytes[start..start + run.len as usize];
            while !data.is_empty() {
                // SAFETY: writing from a valid slice to an open descriptor.
                let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        crate::conn::writable(&conn.stream).await?;
                        continue;
                    }
                    return Err(e);
                }
                data = &data[n as usize..];
            }
            Ok(())
        }
    }
}

/// TLS fallback: read the run's bytes and write them through the TLS session.
async fn copy_run(conn: &mut Conn, run: &FileRun) -> std::io::Result<()> {
    let mut data = vec![0u8; run.len as usize];
    match &run.source {
        RunSource::File(file) => {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut data, run.position)?;
        }
        RunSource::Memory(bytes) => {
            let start = run.position as usize;
            data.copy_from_slice(&bytes[start..start + run.len as usize]);
        }
    }
    let (res, _) = conn.write_all(data).await;
    res
}

/// Sends `len` bytes of `file` from `position`: `sendfile` on a plain connection (the socket is
/// non-blocking for the duration, then restored), a read-and-write copy through TLS.
pub async fn send_file(
    conn: &mut Conn,
    file: &std::fs::File,
    position: u64,
    len: u64,
) -> std::io::Result<()> {
    if conn.is_tls() {
        use std::os::unix::fs::FileExt;
        let mut at = position;
        let end = position + len;
        while at < end {
            let mut chunk = vec![0u8; (end - at).min(64 * 1024) as usize];
            file.read_exact_at(&mut chunk, at)?;
            at += chunk.len() as u64;
            let (res, _) = conn.write_all(chunk).await;
            res?;
        }
        return Ok(());
    }
    let fd = conn.stream.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let was_nonblocking = flags & libc::O_NONBLOCK != 0;
    if !was_nonblocking {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    }
    let mut offset = position as libc::off_t;
    let end = (position + len) as libc::off_t;
    let mut result = Ok(());
    while offset < end {
        // SAFETY: both descriptors are open; `offset` is a valid in/out pointer.
        let n =
            unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut offset, (end - offset) as usize) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                if let Err(e) = crate::conn::writable(&conn.stream).await {
                    result = Err(e);
                    break;
                }
                continue;
            }
            result = Err(e);
            break;
        }
        if n == 0 {
            result = Err(std::io::ErrorKind::UnexpectedEof.into());
            break;
        }
    }
    if !was_nonblocking {
        // SAFETY: as above; the socket goes back to what monoio's driver expects.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    }
    result
}
