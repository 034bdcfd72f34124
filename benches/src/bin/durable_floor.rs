//! `durable_floor`: a minimal HTTP/1.1 keep-alive POST server that acknowledges each request
//! only after an `fdatasync` covering it (group commit), to measure the *durable-send
//! ceiling*: the best throughput any durable server can reach on this machine, relative to
//! nginx `return 200` (which does no I/O at all).
//!
//! Why: the benchmark machine has 2 vCPUs, shared by the server and the load generator
//! (`wrk`). A gateway's durable send can only be judged against what the cheapest possible
//! durable server reaches under the same conditions, not against nginx alone. This binary
//! is that cheapest server, in several designs, so the figures in `benches/README.md` can
//! be reproduced:
//!
//! * `--mode epoll|uring`: readiness loop with `read`/`write`, or an io_uring loop
//!   (multishot accept, recv/send, `IORING_OP_FSYNC` with `DATASYNC`);
//! * `--threads N`: event-loop threads sharing the port via `SO_REUSEPORT`;
//! * `--file shared|perthread`: one log file for all threads or one per thread
//!   (io_uring mode with more than one thread needs `perthread`);
//! * `--inline` (epoll): `fdatasync` runs inside the event loop; what arrives meanwhile waits
//!   in the socket buffers and forms the next batch. Without it (epoll), a sync thread per
//!   file runs one `fdatasync` at a time and wakes the loops through an eventfd;
//! * `--nosync`: write the records but never sync (the non-durable reference);
//! * `--mmap`: append by copying into a shared mapping of the file (as kefu's log does)
//!   instead of `pwrite`;
//! * `--pin`: pin thread i to CPU i % 2; `--synctest`: only measure `fdatasync` latency.
//!
//! Each POST body is appended as a 40-byte-header record (`pwrite`, one per loop pass) to a
//! zero-filled, preallocated file (`--size-mib`, default 64) in `--dir` (default: a
//! directory under the system temp dir), reused circularly. The files are left in place
//! (they are reused by the next run) and must be deleted by the caller.
//!
//! The server prints `READY` on stdout once listening; `SIGUSR1` prints cumulative counters
//! `STATS reqs=.. syncs=.. sync_ns=.. writes=..`, `SIGINT`/`SIGTERM` prints `FINAL ...` and
//! exits. It runs until signalled. Run it through the driver, which builds it, interleaves
//! it with nginx over several rounds and prints a table:
//!
//! ```text
//! python3 benches/scripts/durable_floor.py            # all variants, 3 rounds of 5 s
//! cargo build --release -p kefu-benches --bin durable_floor
//! target/release/durable_floor --port 18090 --mode epoll --threads 1 --inline
//! wrk -t1 -c100 -d5s -s benches/scripts/durable_floor_post.lua http://127.0.0.1:18090/
//! ```
//!
//! Benchmark code only: no pipelining, one request per connection at a time, responses are
//! assumed never to short-write, and the log wraps around instead of growing.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

static REQS: AtomicU64 = AtomicU64::new(0);
static SYNCS: AtomicU64 = AtomicU64::new(0);
static SYNC_NS: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static FILE_IDX: AtomicUsize = AtomicUsize::new(0);

const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

const USAGE: &str = "usage: durable_floor [--port P] [--threads N] [--mode epoll|uring] \
[--file shared|perthread] [--inline] [--nosync] [--mmap] [--pin] [--dir DIR] [--size-mib M] [--synctest]";

#[derive(Clone)]
struct Args {
    port: u16,
    threads: usize,
    mode: String,
    file: String,
    nosync: bool,
    mmap: bool,
    pin: bool,
    dir: PathBuf,
    size: u64,
    synctest: bool,
    inline: bool,
}

fn usage_exit(msg: &str) -> ! {
    eprintln!("{msg}\n{USAGE}");
    std::process::exit(2);
}

fn num<T: std::str::FromStr>(flag: &str, v: String) -> T {
    v.parse()
        .unwrap_or_else(|_| usage_exit(&format!("bad value for {flag}: {v}")))
}

fn parse_args() -> Args {
    let mut a = Args {
        port: 18080,
        threads: 1,
        mode: "epoll".into(),
        file: "shared".into(),
        nosync: false,
        mmap: false,
        pin: false,
        dir: std::env::temp_dir().join("kefu-durable-floor"),
        size: 64 << 20,
        synctest: false,
        inline: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage_exit(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--port" => a.port = num(&flag, value()),
            "--threads" => a.threads = num(&flag, value()),
            "--mode" => a.mode = value(),
            "--file" => a.file = value(),
            "--dir" => a.dir = value().into(),
            "--size-mib" => a.size = num::<u64>(&flag, value()) << 20,
            "--nosync" => a.nosync = true,
            "--mmap" => a.mmap = true,
            "--pin" => a.pin = true,
            "--synctest" => a.synctest = true,
            "--inline" => a.inline = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            x => usage_exit(&format!("bad arg {x}")),
        }
    }
    if !matches!(a.mode.as_str(), "epoll" | "uring") {
        usage_exit(&format!("bad --mode {}", a.mode));
    }
    if !matches!(a.file.as_str(), "shared" | "perthread") {
        usage_exit(&format!("bad --file {}", a.file));
    }
    // The sync thread tracks waiting workers in a u64 bitmask.
    if a.threads == 0 || a.threads > 64 {
        usage_exit("--threads must be 1..=64");
    }
    if a.size < 1 << 20 {
        usage_exit("--size-mib must be at least 1");
    }
    a
}

fn cerr(r: i64, what: &str) -> i64 {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn fdatasync_counted(fd: i32) {
    let t = Instant::now();
    // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
    cerr(unsafe { libc::fdatasync(fd) } as i64, "fdatasync");
    SYNC_NS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    SYNCS.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------- log file
struct SyncState {
    cur_gen: u64,
    pending: bool,
    waiters: u64, // bitmask of worker ids waiting for cur_gen
}

struct LogFile {
    fd: i32,
    size: u64,
    off: AtomicU64,
    st: Mutex<SyncState>,
    cv: Condvar,
    done_gen: AtomicU64,
    evfds: Mutex<Vec<i32>>, // worker id -> eventfd
    /// `--mmap`: the address of a shared read-write mapping of the whole file.
    map: Option<usize>,
}

impl LogFile {
    /// Open and preallocate by writing zeros, fdatasync, then reuse from offset 0.
    fn open(dir: &Path, size: u64, mmap: bool) -> Arc<LogFile> {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("create_dir_all {}: {e}", dir.display()));
        let idx = FILE_IDX.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("log-{idx}.bin"));
        let cpath =
            std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
        // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
        let fd = unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o644,
            )
        };
        let fd = cerr(fd as i64, "open") as i32;
        // SAFETY: `stat` is plain old data; all-zero is a valid value.
        let mut stt: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `stt` is a valid, writable stat buffer.
        cerr(unsafe { libc::fstat(fd, &mut stt) } as i64, "fstat");
        // Only zero-fill if not already a fully written file of at least `size` (blocks allocated).
        let allocated = (stt.st_blocks as u64) * 512;
        if (stt.st_size as u64) < size || allocated < size {
            let zeros = vec![0u8; 1 << 20];
            let mut o = 0u64;
            while o < size {
                let len = zeros.len().min((size - o) as usize);
                // SAFETY: `zeros` is valid for `len <= zeros.len()` bytes.
                let n = unsafe { libc::pwrite(fd, zeros.as_ptr().cast(), len, o as i64) };
                cerr(n as i64, "pwrite zero");
                o += n as u64;
            }
            eprintln!("zero-filled {} ({} MiB)", path.display(), size >> 20);
        }
        // SAFETY: plain syscall on the descriptor opened above.
        cerr(unsafe { libc::fdatasync(fd) } as i64, "fdatasync init");
        let map = mmap.then(|| {
            // SAFETY: maps `size` bytes of the file opened read-write above; the mapping lives
            // as long as the process.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert!(p != libc::MAP_FAILED, "mmap");
            p as usize
        });
        Arc::new(LogFile {
            map,
            fd,
            size,
            off: AtomicU64::new(0),
            st: Mutex::new(SyncState {
                cur_gen: 1,
                pending: false,
                waiters: 0,
            }),
            cv: Condvar::new(),
            done_gen: AtomicU64::new(0),
            evfds: Mutex::new(Vec::new()),
        })
    }

    /// Append a batch; wraps to offset 0 within the preallocated area (benchmark only).
    fn append(&self, buf: &[u8]) {
        let len = buf.len() as u64;
        let pos = self.off.fetch_add(len, Ordering::Relaxed);
        let mut p = pos % self.size;
        if p + len > self.size {
            p = 0;
        }
        if let Some(map) = self.map {
            // SAFETY: `p + len <= size`, inside the mapping; writers of one file take
            // disjoint ranges (`off` is atomic).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf.as_ptr(),
                    (map as *mut u8).add(p as usize),
                    buf.len(),
                );
            }
        } else {
            // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
            let n = unsafe { libc::pwrite(self.fd, buf.as_ptr().cast(), buf.len(), p as i64) };
            assert_eq!(n as usize, buf.len(), "short pwrite");
        }
        WRITES.fetch_add(1, Ordering::Relaxed);
    }

    /// Register that worker `wid` has completed writes that must be covered by the
    /// next sync; returns the generation to wait for.
    fn enqueue(&self, wid: usize) -> u64 {
        let mut st = self.st.lock().unwrap();
        st.pending = true;
        st.waiters |= 1 << wid;
        let g = st.cur_gen;
        drop(st);
        self.cv.notify_one();
        g
    }

    /// Dedicated sync thread: at most one fdatasync in flight; everything enqueued
    /// while it runs is covered by the next one.
    fn sync_loop(self: Arc<Self>) {
        loop {
            let mut st = self.st.lock().unwrap();
            while !st.pending {
                st = self.cv.wait(st).unwrap();
            }
            let g = st.cur_gen;
            st.cur_gen += 1;
            st.pending = false;
            let w = st.waiters;
            st.waiters = 0;
            drop(st);
            fdatasync_counted(self.fd);
            self.done_gen.store(g, Ordering::Release);
            let evs = self.evfds.lock().unwrap().clone();
            for (i, &e) in evs.iter().enumerate() {
                if w & (1 << i) != 0 {
                    let one: u64 = 1;
                    // SAFETY: writes the 8 bytes of `one` to an eventfd.
                    unsafe { libc::write(e, (&raw const one).cast(), 8) };
                }
            }
        }
    }
}

// ---------------------------------------------------------------- HTTP parsing
fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &[u8]) -> usize {
    for line in head.split(|&c| c == b'\n') {
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            let s = std::str::from_utf8(&line[15..]).unwrap_or("0").trim();
            return s.parse().unwrap_or(0);
        }
    }
    0
}

/// If a complete request is in `b`, returns (total_len, body_start, is_post).
fn parse_req(b: &[u8]) -> Option<(usize, usize, bool)> {
    let h = find_head_end(b)?;
    let cl = content_length(&b[..h]);
    if b.len() < h + cl {
        return None;
    }
    Some((h + cl, h, b.starts_with(b"POST")))
}

fn push_record(out: &mut Vec<u8>, body: &[u8], seq: u64, conn: u64) {
    // 40-byte header: magic(4) len(4) seq(8) ts(8) conn(8) fnv checksum(8)
    let mut h: u64 = 0xcbf29ce484222325;
    for &c in body {
        h ^= c as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    out.extend_from_slice(&0x4b454655u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&now_ns().to_le_bytes());
    out.extend_from_slice(&conn.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(body);
}

// ---------------------------------------------------------------- sockets
fn listener(port: u16, nonblock: bool) -> i32 {
    let ty =
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblock { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain syscall, no memory passed.
    let fd = cerr(
        unsafe { libc::socket(libc::AF_INET, ty, 0) } as i64,
        "socket",
    ) as i32;
    let one: i32 = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: `one` is a valid i32 option value of the given length.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const one).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
    }
    // SAFETY: `sockaddr_in` is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    // SAFETY: `sa` is a valid sockaddr_in and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    cerr(rc as i64, "bind");
    // SAFETY: plain syscall on the socket created above.
    cerr(unsafe { libc::listen(fd, 4096) } as i64, "listen");
    fd
}

fn set_nodelay(fd: i32) {
    let one: i32 = 1;
    // SAFETY: `one` is a valid i32 option value of the given length.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
}

fn pin(cpu: usize) {
    // SAFETY: `cpu_set_t` is plain old data (all-zero is the empty set); CPU_SET stays
    // within the set for cpu < CPU_SETSIZE, and the size passed matches the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

// ---------------------------------------------------------------- epoll worker
struct Conn {
    fd: i32,
    buf: Vec<u8>,
}

fn epoll_worker(wid: usize, cpu: usize, a: Args, log: Arc<LogFile>) {
    if a.pin {
        pin(cpu % 2);
    }
    let lfd = listener(a.port, true);
    // SAFETY: plain syscall, no memory passed.
    let ep = cerr(
        unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as i64,
        "epoll",
    ) as i32;
    // SAFETY: plain syscall, no memory passed.
    let evfd = cerr(
        unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) } as i64,
        "eventfd",
    ) as i32;
    {
        let mut v = log.evfds.lock().unwrap();
        if v.len() <= wid {
            v.resize(wid + 1, -1);
        }
        v[wid] = evfd;
    }
    const TL: u64 = u64::MAX;
    const TE: u64 = u64::MAX - 1;
    let add = |fd: i32, tok: u64| {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: tok,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        cerr(rc as i64, "epoll_ctl");
    };
    add(lfd, TL);
    add(evfd, TE);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut rbuf = vec![0u8; 65536];
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch_conns: Vec<usize> = Vec::new();
    let mut waiting: VecDeque<(u64, usize)> = VecDeque::new();
    let mut seq: u64 = 0;
    let respond = |conns: &[Option<Conn>], ci: usize| {
        if let Some(c) = &conns[ci] {
            // SAFETY: RESP is a static buffer of RESP.len() bytes.
            let n = unsafe { libc::write(c.fd, RESP.as_ptr().cast(), RESP.len()) };
            if n != RESP.len() as isize {
                // benchmark server: a 40-byte response on an idle socket never short-writes
                eprintln!("short write {n}");
            }
        }
    };
    loop {
        // SAFETY: `events` is valid for `events.len()` entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            continue;
        }
        for ev in &events[..n as usize] {
            let tok = ev.u64;
            if tok == TL {
                loop {
                    // SAFETY: null address pointers are allowed by accept4.
                    let cfd = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if cfd < 0 {
                        break;
                    }
                    set_nodelay(cfd);
                    let ci = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    conns[ci] = Some(Conn {
                        fd: cfd,
                        buf: Vec::new(),
                    });
                    add(cfd, ci as u64);
                }
            } else if tok == TE {
                let mut v: u64 = 0;
                // SAFETY: reads 8 bytes from the eventfd into `v`.
                unsafe { libc::read(evfd, (&raw mut v).cast(), 8) };
                let d = log.done_gen.load(Ordering::Acquire);
                while let Some(&(g, ci)) = waiting.front() {
                    if g > d {
                        break;
                    }
                    waiting.pop_front();
                    respond(&conns, ci);
                }
            } else {
                let ci = tok as usize;
                let Some(c) = conns[ci].as_mut() else {
                    continue;
                };
                // SAFETY: `rbuf` is valid for `rbuf.len()` writable bytes.
                let r = unsafe { libc::read(c.fd, rbuf.as_mut_ptr().cast(), rbuf.len()) };
                if r <= 0 {
                    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
                    {
                        continue;
                    }
                    // SAFETY: closes the connection's own descriptor, dropped right after.
                    unsafe { libc::close(c.fd) };
                    conns[ci] = None;
                    free.push(ci);
                    continue;
                }
                c.buf.extend_from_slice(&rbuf[..r as usize]);
                // no pipelining: at most one request per connection at a time
                if let Some((tot, bs, post)) = parse_req(&c.buf) {
                    if post {
                        seq += 1;
                        push_record(&mut batch, &c.buf[bs..tot], seq, ci as u64);
                        batch_conns.push(ci);
                    } else {
                        // SAFETY: RESP is a static buffer of RESP.len() bytes.
                        let _ = unsafe { libc::write(c.fd, RESP.as_ptr().cast(), RESP.len()) };
                        REQS.fetch_add(1, Ordering::Relaxed);
                    }
                    c.buf.drain(..tot);
                }
            }
        }
        if !batch_conns.is_empty() {
            log.append(&batch);
            REQS.fetch_add(batch_conns.len() as u64, Ordering::Relaxed);
            if a.nosync {
                for &ci in &batch_conns {
                    respond(&conns, ci);
                }
            } else if a.inline {
                // group commit inside the event loop: block in fdatasync; requests arriving
                // meanwhile queue in socket buffers and form the next batch.
                fdatasync_counted(log.fd);
                for &ci in &batch_conns {
                    respond(&conns, ci);
                }
            } else {
                let g = log.enqueue(wid);
                for &ci in &batch_conns {
                    waiting.push_back((g, ci));
                }
            }
            batch.clear();
            batch_conns.clear();
        }
    }
}

// ---------------------------------------------------------------- io_uring worker
const K_ACCEPT: u64 = 1 << 60;
const K_RECV: u64 = 2 << 60;
const K_SEND: u64 = 3 << 60;
const K_FSYNC: u64 = 4 << 60;
const KMASK: u64 = 0xf << 60;

struct UConn {
    fd: i32,
    buf: Vec<u8>, // capacity 4096 fixed, len = bytes held
}

fn uring_worker(cpu: usize, a: Args, log: Arc<LogFile>) {
    use io_uring::{IoUring, opcode, types};
    if a.pin {
        pin(cpu % 2);
    }
    let lfd = listener(a.port, false);
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .build(1024)
        .expect("io_uring setup");
    let mut conns: Vec<Option<UConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut sqes: Vec<io_uring::squeue::Entry> = Vec::new();
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch_conns: Vec<usize> = Vec::new();
    let mut written: Vec<usize> = Vec::new(); // written, not yet covered by an in-flight sync
    let mut inflight: Vec<usize> = Vec::new(); // covered by the in-flight sync
    let mut sync_inflight = false;
    let mut sync_t0 = 0u64;
    let mut seq = 0u64;
    sqes.push(
        opcode::AcceptMulti::new(types::Fd(lfd))
            .build()
            .user_data(K_ACCEPT),
    );
    // At most one operation (recv or send) is in flight per connection, and a connection is
    // only dropped on a recv completion, so its buffer outlives every recv submitted for it.
    let recv_sqe = |c: &mut UConn, ci: usize| {
        let len = c.buf.len();
        let cap = c.buf.capacity();
        // SAFETY: `len <= cap`, so the pointer stays within (one past) the allocation.
        let ptr = unsafe { c.buf.as_mut_ptr().add(len) };
        opcode::Recv::new(types::Fd(c.fd), ptr, (cap - len) as u32)
            .build()
            .user_data(K_RECV | ci as u64)
    };
    let send_sqe = |fd: i32, ci: usize| {
        opcode::Send::new(types::Fd(fd), RESP.as_ptr(), RESP.len() as u32)
            .build()
            .user_data(K_SEND | ci as u64)
    };
    loop {
        {
            let mut sq = ring.submission();
            for e in sqes.drain(..) {
                // SAFETY: every buffer an entry points to (RESP, a live connection's buffer)
                // stays valid until its completion; see `recv_sqe`.
                unsafe { sq.push(&e).expect("sq full") };
            }
        }
        ring.submit_and_wait(1).expect("io_uring submit");
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            let kind = ud & KMASK;
            let ci = (ud & !KMASK) as usize;
            match kind {
                K_ACCEPT => {
                    if res >= 0 {
                        set_nodelay(res);
                        let ci = free.pop().unwrap_or_else(|| {
                            conns.push(None);
                            conns.len() - 1
                        });
                        let c = conns[ci].insert(UConn {
                            fd: res,
                            buf: Vec::with_capacity(4096),
                        });
                        sqes.push(recv_sqe(c, ci));
                    }
                    if !io_uring::cqueue::more(flags) {
                        sqes.push(
                            opcode::AcceptMulti::new(types::Fd(lfd))
                                .build()
                                .user_data(K_ACCEPT),
                        );
                    }
                }
                K_RECV => {
                    let Some(c) = conns[ci].as_mut() else {
                        continue;
                    };
                    if res <= 0 {
                        // SAFETY: closes the connection's own descriptor; nothing is in
                        // flight on it (this was its only operation).
                        unsafe { libc::close(c.fd) };
                        conns[ci] = None;
                        free.push(ci);
                        continue;
                    }
                    // SAFETY: the kernel initialised `res` bytes past the old length, within
                    // the capacity passed to the recv.
                    unsafe { c.buf.set_len(c.buf.len() + res as usize) };
                    if let Some((tot, bs, post)) = parse_req(&c.buf) {
                        if post {
                            seq += 1;
                            push_record(&mut batch, &c.buf[bs..tot], seq, ci as u64);
                            batch_conns.push(ci);
                        } else {
                            REQS.fetch_add(1, Ordering::Relaxed);
                            sqes.push(send_sqe(c.fd, ci));
                        }
                        c.buf.drain(..tot);
                    } else {
                        assert!(c.buf.len() < c.buf.capacity(), "request too large");
                        sqes.push(recv_sqe(c, ci));
                    }
                }
                K_SEND => {
                    if let Some(c) = conns[ci].as_mut() {
                        if res < 0 {
                            continue; // recv will see the error / close
                        }
                        sqes.push(recv_sqe(c, ci));
                    }
                }
                K_FSYNC => {
                    assert!(res >= 0, "fsync failed {res}");
                    SYNCS.fetch_add(1, Ordering::Relaxed);
                    SYNC_NS.fetch_add(now_ns() - sync_t0, Ordering::Relaxed);
                    sync_inflight = false;
                    for ci in inflight.drain(..) {
                        if let Some(c) = conns[ci].as_ref() {
                            sqes.push(send_sqe(c.fd, ci));
                        }
                    }
                }
                _ => unreachable!(),
            }
        }
        if !batch_conns.is_empty() {
            log.append(&batch); // buffered pwrite syscall
            REQS.fetch_add(batch_conns.len() as u64, Ordering::Relaxed);
            if a.nosync {
                for &ci in &batch_conns {
                    let fd = conns[ci].as_ref().unwrap().fd;
                    sqes.push(send_sqe(fd, ci));
                }
            } else {
                written.extend_from_slice(&batch_conns);
            }
            batch.clear();
            batch_conns.clear();
        }
        if !sync_inflight && !written.is_empty() {
            std::mem::swap(&mut written, &mut inflight);
            sync_inflight = true;
            sync_t0 = now_ns();
            sqes.push(
                opcode::Fsync::new(types::Fd(log.fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(K_FSYNC),
            );
        }
    }
}

// ---------------------------------------------------------------- main
fn print_stats(tag: &str) {
    println!(
        "{tag} reqs={} syncs={} sync_ns={} writes={}",
        REQS.load(Ordering::Relaxed),
        SYNCS.load(Ordering::Relaxed),
        SYNC_NS.load(Ordering::Relaxed),
        WRITES.load(Ordering::Relaxed)
    );
    std::io::stdout().flush().unwrap();
}

/// `--synctest`: fdatasync latency of a 66-byte overwrite in a preallocated file
/// (2000 iterations), then of an fdatasync with nothing dirty.
fn synctest(a: &Args) {
    let log = LogFile::open(&a.dir, a.size, a.mmap);
    let rec = vec![7u8; 66];
    let mut lat = Vec::new();
    for _ in 0..2000 {
        log.append(&rec);
        let t = Instant::now();
        // SAFETY: plain syscall on the log's descriptor.
        unsafe { libc::fdatasync(log.fd) };
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    println!(
        "fdatasync after 66B pwrite: n={} p50={}us p90={}us p99={}us max={}us mean={}us",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1],
        lat.iter().sum::<u64>() / lat.len() as u64
    );
    let t = Instant::now();
    for _ in 0..2000 {
        // SAFETY: plain syscall on the log's descriptor.
        unsafe { libc::fdatasync(log.fd) };
    }
    println!(
        "fdatasync with nothing dirty: mean={}ns",
        t.elapsed().as_nanos() / 2000
    );
}

fn main() {
    let a = parse_args();
    if a.synctest {
        synctest(&a);
        return;
    }
    // block signals in all threads (spawned below, they inherit the mask); main thread sigwaits
    // SAFETY: `sigset_t` is plain old data; it is initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; a null old-mask pointer is allowed.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let uring = a.mode == "uring";
    let shared = a.file == "shared";
    if uring && shared && a.threads > 1 && !a.nosync {
        usage_exit("uring mode supports --file perthread only (or --threads 1)");
    }
    let mut logs: Vec<Arc<LogFile>> = Vec::new();
    let nfiles = if shared { 1 } else { a.threads };
    for _ in 0..nfiles {
        let l = LogFile::open(&a.dir, a.size, a.mmap);
        if !uring && !a.nosync && !a.inline {
            let l2 = l.clone();
            std::thread::spawn(move || l2.sync_loop());
        }
        logs.push(l);
    }
    for wid in 0..a.threads {
        let log = logs[if shared { 0 } else { wid }].clone();
        let a2 = a.clone();
        // per-thread files: the worker's id within its file (its eventfd slot) is 0
        let fwid = if shared { wid } else { 0 };
        std::thread::spawn(move || {
            if uring {
                uring_worker(wid, a2, log)
            } else {
                epoll_worker(fwid, wid, a2, log)
            }
        });
    }
    eprintln!(
        "listening on 127.0.0.1:{} threads={} mode={} file={} inline={} nosync={} pin={} dir={}",
        a.port,
        a.threads,
        a.mode,
        a.file,
        a.inline,
        a.nosync,
        a.pin,
        a.dir.display()
    );
    println!("READY");
    std::io::stdout().flush().unwrap();
    loop {
        let mut sig: i32 = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        if sig == libc::SIGUSR1 {
            print_stats("STATS");
        } else {
            print_stats("FINAL");
            std::process::exit(0);
        }
    }
}
