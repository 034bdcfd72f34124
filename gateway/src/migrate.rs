//! Keep-alive HTTP connections follow their conversation to its shard.
//!
//! A conversation lives on one shard; a connection lives on the shard that accepted it. A
//! visitor whose connection the kernel gave to another shard than its conversation's pays a
//! cross-shard hop twice per message (the command there, the reply back): about 6 us of CPU
//! per send and 0.3 ms at p99 each way on the development machine (see the gateway README).
//!
//! So when the last [`MIGRATE_AFTER_SENDS`] message sends of a keep-alive connection all went
//! to one other shard, and nothing of the connection is buffered (no partial request read, no
//! answer unwritten, no read in flight), the connection moves there: [`leave`] duplicates its
//! socket, queues the copy (with the connection's TLS session, if it has one) on the target
//! shard's bounded [`Arrivals`] queue and wakes the target, and the origin closes its own
//! descriptor. The target's [`adopt`] task then serves the socket as if it had accepted it. The
//! client sees nothing: the TCP connection (and TLS session) is the same, and no byte was read
//! by the origin that the target does not have.
//!
//! A TLS session moves only once rustls has no record left to write; whatever else rustls
//! holds (a partial record read, say) is part of the session and moves with it.
//!
//! Invariants:
//! - A connection moves only between requests, with empty read and write buffers and no read
//!   in flight, so no byte of it is lost or served twice.
//! - A shard adopts no connection above `limits.connections_per_shard_max`: the origin checks
//!   the target's count before it moves one, and the target closes an arrival that finds it
//!   full anyway (a race of two origins: counted in `kefu_connections_refused_total`).
//! - At most [`ARRIVALS_QUEUED_MAX`] connections wait in a shard's queue; a full queue keeps
//!   the connection where it is.
//! - Shards that are stopping move nothing; arrivals still queued at shutdown are closed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

use crate::conn::TlsSession;
use crate::server::ShardCtx;
use crate::wake::ShardWaker;

/// Consecutive message sends to one other shard after which a connection moves there. One
/// is not enough: an agent's connection may answer in one conversation of another shard and
/// then go on elsewhere. Each move of a connection doubles its count (up to
/// [`MIGRATE_AFTER_SENDS_MAX`]), so a connection whose sends alternate between shards moves
/// ever more rarely instead of paying a move every other send.
pub const MIGRATE_AFTER_SENDS: u8 = 2;
pub const MIGRATE_AFTER_SENDS_MAX: u8 = 64;

/// A connection on its way to another shard: its socket, its TLS session if it has one, and
/// how often it moved before.
pub struct Migrant {
    fd: OwnedFd,
    tls: Option<TlsSession>,
    moves: u8,
}

/// Connections waiting in one shard's arrival queue.
pub const ARRIVALS_QUEUED_MAX: usize = 1024;

/// One shard's incoming connections and its count of open ones (read by other shards).
pub struct Arrivals {
    queue: ArrayQueue<Migrant>,
    waker: ShardWaker,
    /// The shard's open client connections: a copy of its `kefu_connections_open` that other
    /// shards can read before they move a connection here.
    open: AtomicU64,
}

impl Default for Arrivals {
    fn default() -> Self {
        Self::new()
    }
}

impl Arrivals {
    pub fn new() -> Self {
        Self {
            queue: ArrayQueue::new(ARRIVALS_QUEUED_MAX),
            waker: ShardWaker::new(),
            open: AtomicU64::new(0),
        }
    }

    /// Sets the shard's open-connection count (by the shard itself, whenever it changes).
    pub fn set_open(&self, n: u64) {
        self.open.store(n, Ordering::Relaxed);
    }

    /// Waits for the next arrival.
    async fn next(&self) -> Migrant {
        crate::wake::pop_or_wait(&self.queue, &self.waker).await
    }
}

/// Which shard a connection's message sends went to, how many in a row, and how often the
/// connection moved before.
#[derive(Debug, Clone, Copy, Default)]
pub struct Follow {
    shard: u16,
    sends: u8,
    moves: u8,
}

impl Follow {
    /// A connection that moved `moves` times before.
    pub fn moved(moves: u8) -> Self {
        Self {
            moves,
            ..Self::default()
        }
    }

    /// How often the connection moved before.
    pub fn moves(&self) -> u8 {
        self.moves
    }

    /// Records a message send from shard `here` into a conversation of shard `to`.
    pub fn sent(&mut self, here: u16, to: u16) {
        if to == here {
            self.sends = 0;
        } else if to == self.shard {
            self.sends = self.sends.saturating_add(1);
        } else {
            self.shard = to;
            self.sends = 1;
        }
    }

    /// The shard to move to, once the sends said so.
    pub fn target(&self) -> Option<u16> {
        let needed = MIGRATE_AFTER_SENDS
            .checked_shl(u32::from(self.moves))
            .unwrap_or(MIGRATE_AFTER_SENDS_MAX)
            .min(MIGRATE_AFTER_SENDS_MAX);
        (self.sends >= needed).then_some(self.shard)
    }

    /// Starts counting again (a move that did not happen is tried after as many sends again).
    pub fn reset(&mut self) {
        self.sends = 0;
    }
}

/// Moves the connection whose socket is `socket` (with its TLS session `tls`, if any) to
/// shard `to`, if it can go: `Ok` when the target has it queued (the caller then drops its own
/// descriptor and forgets the connection), else the session back. The caller guarantees the
/// connection is idle between requests.
pub fn leave(
    ctx: &ShardCtx,
    socket: &impl AsRawFd,
    tls: Option<TlsSession>,
    to: u16,
    moves: u8,
) -> Result<(), Option<TlsSession>> {
    let shared = &ctx.shared;
    let Some(arrivals) = shared.arrivals.get(to as usize) else {
        return Err(tls);
    };
    if to == ctx.id
        || !shared.config.migrate_connections
        || ctx.stopping.get()
        || shared.stopping.load(Ordering::Acquire)
        || arrivals.open.load(Ordering::Relaxed)
            >= shared.config.limits.connections_per_shard_max as u64
    {
        return Err(tls);
    }
    // A second descriptor of the same socket: the origin's is closed by monoio when its
    // stream drops (which also unregisters it from an epoll driver).
    // SAFETY: fcntl on a descriptor we hold; a new descriptor is returned or -1.
    let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(tls);
    }
    // SAFETY: `fd` was just returned by fcntl and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let migrant = Migrant {
        fd,
        tls,
        moves: moves.saturating_add(1),
    };
    if let Err(back) = arrivals.queue.push(migrant) {
        return Err(back.tls);
    }
    arrivals.waker.wake();
    Ok(())
}

/// Serves the connections other shards move to this one, until the shard stops.
pub async fn adopt(ctx: Rc<ShardCtx>) {
    let me = ctx.next_conn_id();
    let arrivals = &ctx.shared.arrivals[ctx.id as usize];
    let limit = ctx.shared.config.limits.connections_per_shard_max as u64;
    loop {
        let Migrant { fd, tls, moves } = monoio::select! {
            m = arrivals.next() => m,
            _ = ctx.stopped(me) => break,
        };
        if ctx.metrics.connections_open.get() >= limit {
            let refused = &ctx.metrics.connections_refused;
            refused.set(refused.get() + 1);
            ctx.shared.connections.give();
            continue;
        }
        let stream = match monoio::net::TcpStream::from_std(std::net::TcpStream::from(fd)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kefu: shard {}: adopting a connection: {e}", ctx.id);
                ctx.shared.connections.give();
                continue;
            }
        };
        // Counted against its address here. An address already at its limit on this shard
        // does not get one more by moving it (its connections could otherwise be steered
        // here one by one past the limit): the connection is closed, between requests.
        let ip = ctx.ip_limited(stream.peer_addr().ok());
        if ip.is_some_and(|ip| ctx.ip_full(ip)) {
            let refused = &ctx.metrics.connections_refused;
            refused.set(refused.get() + 1);
            ctx.shared.connections.give();
            continue;
        }
        ctx.metrics.connection_arrived();
        crate::server::serve_http(&ctx, stream, tls, moves, false, ip);
    }
    ctx.forget_conn(me);
    // Arrivals after the stop are closed: the shard no longer serves.
    while arrivals.queue.pop().is_some() {
        ctx.shared.connections.give();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_follows_after_two_sends_in_a_row_to_one_other_shard() {
        let mut f = Follow::default();
        f.sent(0, 1);
        assert_eq!(f.target(), None, "one send is not enough");
        f.sent(0, 1);
        assert_eq!(f.target(), Some(1));
        f.reset();
        assert_eq!(f.target(), None);
        // A send on its own shard, or to a third shard, starts the count again.
        f.sent(0, 1);
        f.sent(0, 0);
        f.sent(0, 1);
        assert_eq!(f.target(), None);
        f.sent(0, 2);
        f.sent(0, 1);
        assert_eq!(f.target(), None);
        f.sent(0, 1);
        assert_eq!(f.target(), Some(1));
    }

    #[test]
    fn each_move_doubles_the_sends_before_the_next_one() {
        for (moves, needed) in [(0, 2), (1, 4), (2, 8), (5, 64), (6, 64), (200, 64)] {
            let mut f = Follow::moved(moves);
            for _ in 1..needed {
                f.sent(1, 0);
            }
            assert_eq!(f.target(), None, "moves {moves}: {needed} sends needed");
            f.sent(1, 0);
            assert_eq!(f.target(), Some(0), "moves {moves}");
        }
    }

    #[test]
    fn the_arrival_queue_is_bounded() {
        let a = Arrivals::new();
        let (s, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let migrant = || Migrant {
            fd: OwnedFd::from(s.try_clone().expect("dup")),
            tls: None,
            moves: 1,
        };
        for _ in 0..ARRIVALS_QUEUED_MAX {
            assert!(a.queue.push(migrant()).is_ok());
        }
        assert!(a.queue.push(migrant()).is_err(), "a full queue refuses");
    }
}
