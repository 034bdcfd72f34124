//! Per-shard metrics kept on the shard's own thread (plain cells and hdrhistograms, no atomics or locks on the data path), rendered as Prometheus text when `/metrics` asks every shard through its inbox.

use std::cell::{Cell, RefCell};
use std::fmt::Write;

use hdrhistogram::Histogram;
use kefu_storage::{Log, SpareStatus};

/// Why a connection ended (label values of `kefu_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    Closed,
    IdleTimeout,
    BadRequest,
    SlowConsumer,
    Unauthorized,
    Shutdown,
    IoError,
    /// A request did not arrive whole in time (`limits.request_timeout_ms`): answered 408.
    RequestTimeout,
    /// A write made no progress for `limits.write_timeout_ms`: the peer stopped reading.
    WriteTimeout,
}

impl Disconnect {
    /// Why a connection whose write failed with `e` ends: [`Disconnect::WriteTimeout`] for
    /// the write timeout (`conn::write_timed_out`), else [`Disconnect::IoError`].
    pub fn of_write(e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            Self::WriteTimeout
        } else {
            Self::IoError
        }
    }
}

const DISCONNECTS: [(Disconnect, &str); 9] = [
    (Disconnect::Closed, "closed"),
    (Disconnect::IdleTimeout, "idle_timeout"),
    (Disconnect::BadRequest, "bad_request"),
    (Disconnect::SlowConsumer, "slow_consumer"),
    (Disconnect::Unauthorized, "unauthorized"),
    (Disconnect::Shutdown, "shutdown"),
    (Disconnect::IoError, "io_error"),
    (Disconnect::RequestTimeout, "request_timeout"),
    (Disconnect::WriteTimeout, "write_timeout"),
];

/// Request stages whose latency is tracked (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Whole HTTP request: parsed to response written.
    Request,
    /// From handing a command to its owning shard until its (durable) reply.
    Command,
    /// One group-commit fdatasync.
    LogSync,
    /// A WebSocket delivery: taken from the outbox to written.
    Deliver,
}

const STAGES: [(Stage, &str); 4] = [
    (Stage::Request, "request"),
    (Stage::Command, "command"),
    (Stage::LogSync, "log_sync"),
    (Stage::Deliver, "deliver"),
];

/// What `/metrics` shows of a shard's engine.
pub struct EngineFigures {
    pub conversations: usize,
    /// Conversations forgotten so far (`Engine::forget_closed`).
    pub forgotten: u64,
    /// Idempotency keys kept (`Engine::idempotency_keys`).
    pub idempotency_keys: usize,
    /// Typing notices dropped over their sender's rate limit.
    pub notices_dropped: u64,
}

pub struct ShardMetrics {
    pub connections_open: Cell<u64>,
    pub connections_total: Cell<u64>,
    pub connections_refused: Cell<u64>,
    /// Connections this shard took over from another one, and gave to another one
    /// ([`crate::migrate`]).
    pub connections_migrated_in: Cell<u64>,
    pub connections_migrated_out: Cell<u64>,
    pub requests_total: Cell<u64>,
    pub responses_by_class: [Cell<u64>; 6],
    pub overload_503_total: Cell<u64>,
    pub messages_in: Cell<u64>,
    pub deliveries_out: Cell<u64>,
    pub conversations_created: Cell<u64>,
    pub commands_handled: Cell<u64>,
    pub pending_deliveries: Cell<u64>,
    pub held_replies: Cell<u64>,
    disconnects: [Cell<u64>; DISCONNECTS.len()],
    latency: RefCell<Vec<Histogram<u64>>>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardMetrics {
    pub fn new() -> Self {
        let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("valid bounds");
        Self {
            connections_open: Cell::new(0),
            connections_total: Cell::new(0),
            connections_refused: Cell::new(0),
            connections_migrated_in: Cell::new(0),
            connections_migrated_out: Cell::new(0),
            requests_total: Cell::new(0),
            responses_by_class: Default::default(),
            overload_503_total: Cell::new(0),
            messages_in: Cell::new(0),
            deliveries_out: Cell::new(0),
            conversations_created: Cell::new(0),
            commands_handled: Cell::new(0),
            pending_deliveries: Cell::new(0),
            held_replies: Cell::new(0),
            disconnects: Default::default(),
            latency: RefCell::new(STAGES.iter().map(|_| hist()).collect()),
        }
    }

    fn bump(c: &Cell<u64>, by: u64) {
        c.set(c.get().wrapping_add(by));
    }

    pub fn connection_opened(&self) {
        Self::bump(&self.connections_open, 1);
        Self::bump(&self.connections_total, 1);
    }

    /// A connection another shard moved here.
    pub fn connection_arrived(&self) {
        Self::bump(&self.connections_open, 1);
        Self::bump(&self.connections_migrated_in, 1);
    }

    /// A connection this shard moved to another one (not a disconnect: it goes on there).
    pub fn connection_left(&self) {
        self.connections_open
            .set(self.connections_open.get().saturating_sub(1));
        Self::bump(&self.connections_migrated_out, 1);
    }

    pub fn connection_closed(&self, why: Disconnect) {
        self.connections_open
            .set(self.connections_open.get().saturating_sub(1));
        let i = DISCONNECTS
            .iter()
            .position(|(d, _)| *d == why)
            .expect("listed");
        Self::bump(&self.disconnects[i], 1);
    }

    pub fn response(&self, status: u16) {
        Self::bump(&self.requests_total, 1);
        let class = usize::from(status / 100).min(5);
        Self::bump(&self.responses_by_class[class], 1);
        if status == 503 {
            Self::bump(&self.overload_503_total, 1);
        }
    }

    pub fn message_in(&self) {
        Self::bump(&self.messages_in, 1);
    }

    pub fn delivered(&self, n: u64) {
        Self::bump(&self.deliveries_out, n);
    }

    pub fn conversation_created(&self) {
        Self::bump(&self.conversations_created, 1);
    }

    pub fn commands(&self, n: u64) {
        Self::bump(&self.commands_handled, n);
    }

    pub fn set_pending(&self, deliveries: u64, replies: u64) {
        self.pending_deliveries.set(deliveries);
        self.held_replies.set(replies);
    }

    pub fn latency(&self, stage: Stage, us: u64) {
        let i = STAGES
            .iter()
            .position(|(s, _)| *s == stage)
            .expect("listed");
        let _ = self.latency.borrow_mut()[i].record(us.max(1));
    }

    pub fn sync_latency_us(&self, us: u64) {
        self.latency(Stage::LogSync, us);
    }

    /// This shard's series in Prometheus text format, with its engine's figures.
    pub fn render(&self, shard: u16, engine: EngineFigures, log: &Log) -> String {
        let EngineFigures {
            conversations,
            forgotten,
            idempotency_keys,
            notices_dropped,
        } = engine;
        let mut out = String::with_capacity(4096);
        let s = shard;
        let mut line = |name: &str, labels: &str, value: u64| {
            let _ = if labels.is_empty() {
                writeln!(out, "{name}{{shard=\"{s}\"}} {value}")
            } else {
                writeln!(out, "{name}{{shard=\"{s}\",{labels}}} {value}")
            };
        };
        line("kefu_connections_open", "", self.connections_open.get());
        line("kefu_connections_total", "", self.connections_total.get());
        line(
            "kefu_connections_refused_total",
            "",
            self.connections_refused.get(),
        );
        line(
            "kefu_connections_migrated_total",
            "direction=\"in\"",
            self.connections_migrated_in.get(),
        );
        line(
            "kefu_connections_migrated_total",
            "direction=\"out\"",
            self.connections_migrated_out.get(),
        );
        line("kefu_http_requests_total", "", self.requests_total.get());
        for (class, c) in self.responses_by_class.iter().enumerate().skip(1) {
            line(
                "kefu_http_responses_total",
                &format!("class=\"{class}xx\""),
                c.get(),
            );
        }
        line("kefu_overload_total", "", self.overload_503_total.get());
        line("kefu_messages_in_total", "", self.messages_in.get());
        line("kefu_messages_out_total", "", self.deliveries_out.get());
        line(
            "kefu_conversations_created_total",
            "",
            self.conversations_created.get(),
        );
        line("kefu_conversations", "", conversations as u64);
        line("kefu_conversations_forgotten_total", "", forgotten);
        line("kefu_notices_dropped_total", "", notices_dropped);
        line(
            "kefu_log_conversation_index_entries",
            "",
            log.conversation_index_entries() as u64,
        );
        line("kefu_idempotency_keys", "", idempotency_keys as u64);
        line("kefu_commands_total", "", self.commands_handled.get());
        line(
            "kefu_queue_depth",
            "queue=\"pending_deliveries\"",
            self.pending_deliveries.get(),
        );
        line(
            "kefu_queue_depth",
            "queue=\"held_replies\"",
            self.held_replies.get(),
        );
        for (i, (_, name)) in DISCONNECTS.iter().enumerate() {
            line(
                "kefu_disconnects_total",
                &format!("reason=\"{name}\""),
                self.disconnects[i].get(),
            );
        }
        line("kefu_log_start_offset", "", log.start_offset());
        line("kefu_log_next_offset", "", log.next_offset());
        line("kefu_log_durable_offset", "", log.durable_offset());
        line("kefu_log_disk_bytes", "", log.disk_bytes());
        line("kefu_log_syncs_in_flight", "", log.syncs_in_flight() as u64);
        // The zero-filled spare segment (`limits.zero_fill_segments`), one line per state.
        let spare = log.spare_status();
        for (state, name) in [
            (SpareStatus::None, "none"),
            (SpareStatus::Filling, "filling"),
            (SpareStatus::Ready, "ready"),
            (SpareStatus::Failed, "failed"),
        ] {
            line(
                "kefu_log_spare_segment",
                &format!("state=\"{name}\""),
                u64::from(spare == state),
            );
        }
        line(
            "kefu_log_active_segment_zero_filled",
            "",
            u64::from(log.active_is_zero_filled()),
        );
        for (i, (_, stage)) in STAGES.iter().enumerate() {
            let h = &self.latency.borrow()[i];
            for q in [0.5, 0.9, 0.99, 0.999] {
                line(
                    "kefu_latency_us",
                    &format!("stage=\"{stage}\",quantile=\"{q}\""),
                    h.value_at_quantile(q),
                );
            }
            line(
                "kefu_latency_us_count",
                &format!("stage=\"{stage}\""),
                h.len(),
            );
        }
        out
    }
}
