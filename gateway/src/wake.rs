//! Cross-shard wake-ups without a lock.
//!
//! A task that waits on another shard's work (a command's reply, a delivery, the committer
//! waiting for commands) registers its waker in a [`ShardWaker`]. Woken from another shard,
//! a monoio waker would travel through monoio's cross-thread path: a flume channel per
//! thread, which takes a lock per wake, then an eventfd write. Instead, the waking shard
//! takes the waker out of the `ShardWaker`, pushes it onto the waiting shard's [`Doorbell`]
//! (a bounded lock-free queue) and rings the bell once: one byte on a socket pair, written
//! only when the bell is not already rung. The waiting shard's doorbell task reads the byte
//! and wakes every queued waker on its own thread.
//!
//! Threads that are not shards (the legacy driver's flusher, tests) and wakers whose shard
//! is this thread wake directly; so does a full doorbell queue (monoio's own path, correct
//! but with its lock), counted in `kefu_doorbell_overflows_total`.

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::Waker;

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

/// Wakers queued per shard before a waking shard falls back to monoio's own path.
pub const DOORBELL_WAKES_MAX: usize = 16_384;

/// No shard registered yet.
const NO_SHARD: u32 = u32::MAX;

thread_local! {
    /// This thread's shard and every shard's doorbell; set on shard threads only.
    static HOME: RefCell<Option<(u16, Arc<Doorbells>)>> = const { RefCell::new(None) };
}

/// Marks the calling thread as shard `id`: wakers registered here are woken through its
/// doorbell when another shard wakes them.
pub fn enter_shard(id: u16, bells: Arc<Doorbells>) {
    HOME.with(|h| *h.borrow_mut() = Some((id, bells)));
}

fn home_shard() -> u32 {
    HOME.with(|h| {
        h.borrow()
            .as_ref()
            .map_or(NO_SHARD, |(id, _)| u32::from(*id))
    })
}

/// Appends this shard thread's doorbell series to `out` (nothing off shard threads).
pub fn render_metrics(out: &mut String) {
    HOME.with(|h| {
        if let Some((id, bells)) = h.borrow().as_ref() {
            bells.render(*id, out);
        }
    });
}

/// The next item of `queue`; when it is empty, waits for a push that wakes `waker`. The waker
/// is registered before the second look, so a push between the two looks is not missed.
pub async fn pop_or_wait<T>(queue: &ArrayQueue<T>, waker: &ShardWaker) -> T {
    std::future::poll_fn(|cx| {
        if let Some(item) = queue.pop() {
            return std::task::Poll::Ready(item);
        }
        waker.register(cx.waker());
        match queue.pop() {
            Some(item) => std::task::Poll::Ready(item),
            None => std::task::Poll::Pending,
        }
    })
    .await
}

/// An [`AtomicWaker`] that remembers which shard registered it.
#[derive(Debug)]
pub struct ShardWaker {
    waker: AtomicWaker,
    shard: AtomicU32,
}

impl Default for ShardWaker {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardWaker {
    pub const fn new() -> Self {
        Self {
            waker: AtomicWaker::new(),
            shard: AtomicU32::new(NO_SHARD),
        }
    }

    pub fn register(&self, waker: &Waker) {
        self.shard.store(home_shard(), Ordering::Release);
        self.waker.register(waker);
    }

    /// Wakes the registered task: directly on its own shard (or off shards), else through
    /// its shard's doorbell.
    pub fn wake(&self) {
        let target = self.shard.load(Ordering::Acquire);
        let rung = HOME.with(|h| match h.borrow().as_ref() {
            Some((me, bells)) if target != NO_SHARD && target != u32::from(*me) => {
                if let Some(w) = self.waker.take() {
                    bells.ring(target as usize, w);
                }
                true
            }
            _ => false,
        });
        if !rung {
            self.waker.wake();
        }
    }
}

/// One shard's doorbell: the wakers other shards queued for it, and whether its byte is
/// already on the way.
struct Doorbell {
    wakes: ArrayQueue<Waker>,
    rung: AtomicBool,
    writer: std::os::unix::net::UnixStream,
    /// Bytes written (a ring when the bell was not rung already).
    rings: AtomicU64,
    /// Wakes for this shard that found its queue full and took monoio's own path.
    overflows: AtomicU64,
}

/// Every shard's doorbell.
pub struct Doorbells {
    bells: Box<[Doorbell]>,
}

impl Doorbells {
    /// The doorbells of `shards` shards and, for each, the reading end its task serves.
    pub fn new(shards: usize) -> std::io::Result<(Arc<Self>, Vec<std::os::unix::net::UnixStream>)> {
        let mut bells = Vec::with_capacity(shards);
        let mut readers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (reader, writer) = std::os::unix::net::UnixStream::pair()?;
            reader.set_nonblocking(true)?;
            writer.set_nonblocking(true)?;
            bells.push(Doorbell {
                wakes: ArrayQueue::new(DOORBELL_WAKES_MAX),
                rung: AtomicBool::new(false),
                writer,
                rings: AtomicU64::new(0),
                overflows: AtomicU64::new(0),
            });
            readers.push(reader);
        }
        let bells = Arc::new(Self {
            bells: bells.into_boxed_slice(),
        });
        Ok((bells, readers))
    }

    fn ring(&self, shard: usize, waker: Waker) {
        let bell = &self.bells[shard];
        if let Err(waker) = bell.wakes.push(waker) {
            bell.overflows.fetch_add(1, Ordering::Relaxed);
            waker.wake();
            return;
        }
        // The reader clears `rung` before it drains the queue: either it sees this push, or
        // this swap sees `false` and writes a new byte.
        if !bell.rung.swap(true, Ordering::SeqCst) {
            // WouldBlock means unread bytes are waiting already: the reader wakes anyway.
            let _ = (&bell.writer).write(&[1]);
            bell.rings.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wakers queued for `shard`.
    pub fn queued(&self, shard: usize) -> usize {
        self.bells[shard].wakes.len()
    }

    /// Shard `shard`'s doorbell series in Prometheus text format.
    pub fn render(&self, shard: u16, out: &mut String) {
        use std::fmt::Write as _;
        let bell = &self.bells[shard as usize];
        let s = shard;
        let _ = writeln!(
            out,
            "kefu_queue_depth{{shard=\"{s}\",queue=\"doorbell\"}} {}",
            bell.wakes.len()
        );
        let _ = writeln!(
            out,
            "kefu_doorbell_rings_total{{shard=\"{s}\"}} {}",
            bell.rings.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "kefu_doorbell_overflows_total{{shard=\"{s}\"}} {}",
            bell.overflows.load(Ordering::Relaxed)
        );
    }

    /// The doorbell task of shard `id`: wakes, on this thread, what other shards queued.
    /// Returns when the writing end is gone.
    pub async fn serve(self: Arc<Self>, id: u16, reader: std::os::unix::net::UnixStream) {
        use monoio::io::AsyncReadRent;
        let Ok(mut reader) = monoio::net::UnixStream::from_std(reader) else {
            eprintln!(
                "kefu: shard {id}: doorbell not registered; cross-shard wakes take monoio's path"
            );
            self.bells[id as usize].rung.store(true, Ordering::SeqCst);
            return;
        };
        let bell = &self.bells[id as usize];
        let mut buf = vec![0u8; 64];
        loop {
            let (read, back) = reader.read(buf).await;
            buf = back;
            match read {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
            bell.rung.store(false, Ordering::SeqCst);
            while let Some(w) = bell.wakes.pop() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_from_another_shard_goes_through_the_doorbell_once_rung() {
        let (bells, readers) = Doorbells::new(2).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let slot = Arc::new(ShardWaker::new());
        enter_shard(0, bells.clone());
        slot.register(&waker);
        // Shard 1 wakes shard 0's waiter: queued, one byte, nothing woken yet.
        let (s, b) = (slot.clone(), bells.clone());
        std::thread::spawn(move || {
            enter_shard(1, b);
            s.wake();
            // A second wake before the bell is served queues nothing (the waker was taken)
            // and writes no second byte.
            s.wake();
        })
        .join()
        .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert_eq!(bells.queued(0), 1);
        let mut byte = [0u8; 8];
        use std::io::Read;
        assert_eq!((&readers[0]).read(&mut byte).unwrap(), 1);
        // Serving the bell on shard 0 wakes the waiter there.
        bells.bells[0].rung.store(false, Ordering::SeqCst);
        while let Some(w) = bells.bells[0].wakes.pop() {
            w.wake();
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // On its own shard a wake is direct.
        slot.register(&waker);
        slot.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(bells.queued(0), 0);
    }

    #[test]
    fn a_full_doorbell_wakes_directly_and_counts_it() {
        let (bells, _readers) = Doorbells::new(1).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        for _ in 0..DOORBELL_WAKES_MAX + 3 {
            bells.ring(0, Waker::from(count.clone()));
        }
        assert_eq!(bells.queued(0), DOORBELL_WAKES_MAX);
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
        let mut text = String::new();
        bells.render(0, &mut text);
        assert!(
            text.contains("kefu_doorbell_overflows_total{shard=\"0\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("kefu_doorbell_rings_total{shard=\"0\"} 1\n"),
            "{text}"
        );
    }
}
