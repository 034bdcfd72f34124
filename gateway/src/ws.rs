//! WebSocket sessions on `/v1/ws`: subscribe with `after` (exact replay, then live), send with ack, typing and read notices, agent inboxes, ping/pong keep-alive, idle timeout, and the API's close codes (4001, 4003, 4008 slow consumer, 1009, 1001 going away).
//!
//! Each socket has one bounded [`Outbox`] that every conversation it follows pushes into (from
//! whichever shard owns the conversation). When it overflows the socket is closed with 4008: the
//! client reconnects and resubscribes with `after`, and loses nothing.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kefu_protocol::http::RequestHead;
use kefu_protocol::model::{
    ClientMessage, ClientMessageRef, ConversationId, Event, ServerMessage, WriteJson,
    parse_json_borrowed, write_ack_json,
};
use kefu_protocol::ws::frame::close_code;
use kefu_protocol::ws::{WsConnection, WsError, WsEvent, WsLimits, check_upgrade, write_accept};
use kefu_trace_common::{RequestRecord, Stage as TraceStage, emit, now_ns, route as trace_route};

use crate::conn::Conn;
use crate::engine::give_back_delivery;
use crate::engine::{Actor, Delivery, Outbox, Sent};
use crate::http::{HttpError, call, known_shard, token};
use crate::metrics::{Disconnect, Stage};
use crate::recycle::Recycled;
use crate::server::{ShardCtx, Woken};
use crate::shard::{Command, Outcome, SendBody, give_vec, pooled_string, recycle_string, take_vec};

/// An accepted upgrade: the token was checked (or not); the session writes the 101 answer
/// (with `accept`) once it is ready for the client, see [`open`].
pub struct Upgraded {
    actor: Result<Actor, String>,
    accept: [u8; 28],
}

/// Checks the handshake. A bad or missing token still upgrades, so the client sees close
/// code 4001 (browsers cannot read an HTTP 401 on a WebSocket).
pub fn upgrade(ctx: &ShardCtx, head: &RequestHead<'_>) -> Result<Upgraded, HttpError> {
    let up = check_upgrade(head).map_err(|e| HttpError::new(e.status(), e.to_string()))?;
    let actor = match token(head) {
        None => Err("missing token".to_owned()),
        Some(t) => ctx
            .shared
            .access
            .authenticate(&t)
            .map_err(|e| e.to_string()),
    };
    Ok(Upgraded {
        actor,
        accept: up.accept,
    })
}

/// The 101 answer of an upgrade.
fn write_switching(out: &mut Vec<u8>, accept: [u8; 28]) {
    let up = kefu_protocol::ws::WsUpgrade {
        key: "",
        protocols: None,
        accept,
    };
    write_accept(out, &up, None);
}

/// One replay step for a subscriber: records after `after` and whether the subscription
/// reached the live edge (registered). Shared by WebSocket and binary sessions.
pub async fn replay_step(
    ctx: &ShardCtx,
    conv: u64,
    actor: &Actor,
    after: u64,
    outbox: &Arc<Outbox>,
) -> Result<(Vec<Arc<Delivery>>, bool), HttpError> {
    let limit = ctx.shared.config.limits.history_limit_max;
    let outcome = call(ctx, (conv >> 48) as u16, |reply| Command::Replay {
        conv,
        actor: actor.clone(),
        after,
        limit,
        subscriber: Some(outbox.clone()),
        reply,
    })
    .await?;
    match outcome {
        Outcome::Replay(r) => {
            let r = r?;
            Ok((r.entries, r.registered))
        }
        _ => Err(HttpError::new(500, "unexpected reply")),
    }
}

/// Stores a message (shared by HTTP, WebSocket and binary sessions).
pub async fn send_message(
    ctx: &ShardCtx,
    conv: u64,
    actor: &Actor,
    body: SendBody,
    trace: Option<&RefCell<RequestRecord>>,
) -> Result<Sent, HttpError> {
    let queued = queue_send(ctx, conv, actor, body, trace).map_err(|(e, _)| e)?;
    queued.sent(ctx, trace).await.0
}

/// A message's send queued on its conversation's shard and not yet awaited: a session that
/// read a burst queues all its sends (in order) before it awaits the first, so one group
/// commit covers them.
pub struct QueuedSend(crate::http::Pending);

/// The first half of [`send_message`]: queues the send without waiting. A refused send
/// (overload) gives its body back, for the refusal's `client_msg_id`, unless the command
/// was already made.
pub fn queue_send(
    ctx: &ShardCtx,
    conv: u64,
    actor: &Actor,
    body: SendBody,
    trace: Option<&RefCell<RequestRecord>>,
) -> Result<QueuedSend, (HttpError, Option<SendBody>)> {
    let mut body = Some(body);
    crate::http::dispatch(ctx, (conv >> 48) as u16, trace, |reply| Command::Send {
        conv,
        actor: actor.clone(),
        body: body.take().expect("a command is made once"),
        reply,
    })
    .map(QueuedSend)
    .map_err(|e| (e, body))
}

impl QueuedSend {
    /// The second half of [`send_message`]: the stored message, or why not, and the send's
    /// body back (for its `client_msg_id`).
    pub async fn sent(
        self,
        ctx: &ShardCtx,
        trace: Option<&RefCell<RequestRecord>>,
    ) -> (Result<Sent, HttpError>, Option<SendBody>) {
        match self.0.wait(ctx, trace).await {
            Outcome::Sent(s, body) => (s.map_err(HttpError::from), Some(body)),
            _ => (Err(HttpError::new(500, "unexpected reply")), None),
        }
    }
}

/// Typing and read notices (not stored).
pub async fn ephemeral(
    ctx: &ShardCtx,
    conv: u64,
    actor: &Actor,
    event: Event,
) -> Result<(), HttpError> {
    let outcome = call(ctx, (conv >> 48) as u16, |reply| Command::Ephemeral {
        conv,
        actor: actor.clone(),
        event,
        reply: Some(reply),
    })
    .await?;
    match outcome {
        Outcome::Done(r) => Ok(r?),
        _ => Err(HttpError::new(500, "unexpected reply")),
    }
}

/// Registers an agent socket's inbox on every shard and waits until all have it, so the
/// session handles the client's first message only once offers and assignments reach it.
pub async fn register_agent_inbox(ctx: &ShardCtx, actor: &Actor, outbox: &Arc<Outbox>) {
    if let Actor::Agent { tenant, name } = actor {
        for shard in 0..ctx.shared.shards() {
            // A refused registration (overload) only costs this socket its offers; it still
            // gets what it subscribes to.
            let _ = call(ctx, shard as u16, |reply| Command::AgentInbox {
                tenant: *tenant,
                agent: name.clone(),
                outbox: outbox.clone(),
                reply,
            })
            .await;
        }
    }
}

fn error_json(message: &str, conv: Option<u64>, client_msg_id: Option<&str>) -> Vec<u8> {
    ServerMessage::Error(kefu_protocol::model::WsError {
        error: message.to_owned(),
        conversation_id: conv.map(ConversationId),
        client_msg_id: client_msg_id.map(str::to_owned),
    })
    .to_json_vec()
}

thread_local! {
    /// Where an ack's JSON is written before it is framed (no allocation per ack).
    static ACK_JSON: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Per-step lists of sockets (see [`take_vec`]), so a step allocates none.
    static TEXTS_POOL: RefCell<Vec<Vec<String>>> = const { RefCell::new(Vec::new()) };
    static PENDING_POOL: RefCell<Vec<Vec<Queued>>> = const { RefCell::new(Vec::new()) };
}

/// A trace record of one client message (only while a tracer is attached).
type Trace = Box<RefCell<RequestRecord>>;
/// A queued send with its trace record.
type Queued = (PendingSend, Option<Trace>);

/// What handling one client message asks of the socket.
enum Verdict {
    Fine,
    Close(u16, String),
    /// The connection failed (a write): end it without a close frame.
    Gone(Disconnect),
}

/// A subscribe's replay writes what it has gathered once it holds this much, before its next
/// step: a long history goes out in pieces instead of being built whole in memory.
pub const REPLAY_FLUSH_BYTES: usize = 256 * 1024;

struct Session {
    ctx: Rc<ShardCtx>,
    actor: Actor,
    /// Created on the first subscription (or at once for an agent's inbox), so an idle
    /// socket that follows nothing holds no delivery queue, and pays one pointer for it.
    following: Option<Box<Following>>,
    ws: WsConnection,
}

/// What a socket that follows conversations (or an agent's inbox) holds.
struct Following {
    outbox: Arc<Outbox>,
    subscriptions: Vec<u64>,
    /// Frames of deliveries the socket's send buffer did not take at once while it waited
    /// ([`deliver_waiting`]): the next step writes them before anything else. Here rather
    /// than in `Socket`, so a socket that follows nothing does not pay for it.
    unsent: Option<Vec<u8>>,
}

impl Session {
    fn following(&mut self) -> &mut Following {
        let depth = self.ctx.shared.config.limits.subscriber_queue_depth;
        self.following.get_or_insert_with(|| {
            Box::new(Following {
                outbox: Outbox::new(depth),
                subscriptions: Vec::new(),
                unsent: None,
            })
        })
    }

    fn outbox(&self) -> Option<&Arc<Outbox>> {
        self.following.as_ref().map(|f| &f.outbox)
    }

    fn subscribed(&self, conv: u64) -> bool {
        self.following
            .as_ref()
            .is_some_and(|f| f.subscriptions.contains(&conv))
    }

    fn subscriptions_len(&self) -> usize {
        self.following.as_ref().map_or(0, |f| f.subscriptions.len())
    }

    fn text(&mut self, out: &mut Vec<u8>, json: &[u8]) {
        write_text(&mut self.ws, out, json);
    }

    /// A client message (borrowing from `text`), or why the text is not one.
    fn parse<'a>(&self, text: &'a str) -> Result<ClientMessageRef<'a>, String> {
        let limits = crate::access::model_limits(&self.ctx.shared.config.limits);
        parse_json_borrowed::<_, ClientMessage>(text.as_bytes(), &limits).map_err(|e| e.to_string())
    }

    /// Queues a send on its conversation's shard without waiting for it (see
    /// [`PendingSend`]); anything else comes back to take the ordinary path, answered in order
    /// with the rest.
    fn dispatch_send(
        &mut self,
        msg: ClientMessageRef<'_>,
        trace: Option<&RefCell<RequestRecord>>,
    ) -> Dispatched {
        let ClientMessageRef::Send {
            conversation_id,
            text,
            client_msg_id,
        } = &msg
        else {
            return Dispatched::Other(msg.into_owned());
        };
        match self.queue(*conversation_id, text, client_msg_id.as_deref(), trace) {
            Ok(p) => Dispatched::Pending(p),
            Err((conv, error)) => Dispatched::Refused {
                conv,
                client_msg_id: client_msg_id.as_deref().map(str::to_owned),
                error,
            },
        }
    }

    /// Queues a send: the strings go to the owning shard in a pooled buffer and come back with
    /// the answer. `Err`: the conversation it names and why it was refused (a bad id, overload).
    fn queue(
        &mut self,
        conversation_id: ConversationId,
        text: &str,
        client_msg_id: Option<&str>,
        trace: Option<&RefCell<RequestRecord>>,
    ) -> Result<PendingSend, (u64, HttpError)> {
        let conv = known_shard(&self.ctx, conversation_id).map_err(|e| (conversation_id.0, e))?;
        if let Some(rec) = trace {
            rec.borrow_mut().conversation_id = conv;
        }
        let body = SendBody::pooled(text, client_msg_id);
        match queue_send(&self.ctx, conv, &self.actor, body, trace) {
            Ok(queued) => Ok(PendingSend { queued, conv }),
            Err((e, _)) => Err((conv, e)),
        }
    }

    /// Writes the answer to a send: its ack, or the refusal.
    fn answer_send(
        &mut self,
        out: &mut Vec<u8>,
        conv: u64,
        client_msg_id: Option<&str>,
        sent: Result<Sent, HttpError>,
    ) -> Verdict {
        match sent {
            Ok(sent) => {
                ACK_JSON.with(|json| {
                    let mut json = json.borrow_mut();
                    json.clear();
                    write_ack_json(&mut json, client_msg_id, ConversationId(conv), sent.seq);
                    self.text(out, &json);
                });
                Verdict::Fine
            }
            Err(e) => self.refuse(out, e, Some(conv), client_msg_id),
        }
    }

    /// Awaits a queued send and writes its answer.
    async fn answer_queued(
        &mut self,
        out: &mut Vec<u8>,
        p: PendingSend,
        trace: Option<&RefCell<RequestRecord>>,
    ) -> Verdict {
        let (sent, body) = p.queued.sent(&self.ctx, trace).await;
        self.answer_send(
            out,
            p.conv,
            body.as_ref().and_then(SendBody::client_msg_id),
            sent,
        )
    }

    async fn handle_msg(
        &mut self,
        msg: ClientMessage,
        out: &mut Vec<u8>,
        conn: &mut Conn,
        trace: Option<&RefCell<RequestRecord>>,
    ) -> Verdict {
        let ctx = self.ctx.clone();
        match msg {
            ClientMessage::Subscribe {
                conversation_id,
                after,
            } => {
                let conv = match known_shard(&ctx, conversation_id) {
                    Ok(c) => c,
                    Err(e) => return self.refuse(out, e, Some(conversation_id.0), None),
                };
                if self.subscribed(conv) {
                    self.text(out, &error_json("already subscribed", Some(conv), None));
                    return Verdict::Fine;
                }
                if self.subscriptions_len() >= ctx.shared.config.limits.subscriptions_per_socket_max
                {
                    self.text(
                        out,
                        &error_json(
                            "subscriptions_per_socket_max reached on this socket",
                            Some(conv),
                            None,
                        ),
                    );
                    return Verdict::Fine;
                }
                let mut after = after;
                loop {
                    let outbox = self.following().outbox.clone();
                    match replay_step(&ctx, conv, &self.actor, after, &outbox).await {
                        Ok((entries, registered)) => {
                            for d in &entries {
                                self.text(out, &d.json);
                                after = d.seq;
                            }
                            ctx.metrics.delivered(entries.len() as u64);
                            if !registered && out.len() >= REPLAY_FLUSH_BYTES {
                                let (res, o) = conn.write_all(std::mem::take(out)).await;
                                *out = o;
                                if let Err(e) = res {
                                    return Verdict::Gone(Disconnect::of_write(&e));
                                }
                            }
                            if registered {
                                self.following().subscriptions.push(conv);
                                return Verdict::Fine;
                            }
                            if entries.is_empty() {
                                // Nothing more but not registered: subscriber limit.
                                self.text(out, &error_json("cannot subscribe", Some(conv), None));
                                return Verdict::Fine;
                            }
                        }
                        Err(e) => return self.refuse(out, e, Some(conv), None),
                    }
                }
            }
            ClientMessage::Send {
                conversation_id,
                text,
                client_msg_id,
            } => match self.queue(conversation_id, &text, client_msg_id.as_deref(), trace) {
                Ok(p) => self.answer_queued(out, p, trace).await,
                Err((conv, e)) => self.refuse(out, e, Some(conv), client_msg_id.as_deref()),
            },
            ClientMessage::Typing { conversation_id } => {
                let conv = conversation_id.0;
                match ephemeral(&ctx, conv, &self.actor, Event::Typing).await {
                    Ok(()) => Verdict::Fine,
                    Err(e) => self.refuse(out, e, Some(conv), None),
                }
            }
            ClientMessage::Read {
                conversation_id,
                seq,
            } => {
                let conv = conversation_id.0;
                match ephemeral(&ctx, conv, &self.actor, Event::Read { seq }).await {
                    Ok(()) => Verdict::Fine,
                    Err(e) => self.refuse(out, e, Some(conv), None),
                }
            }
        }
    }

    /// 401/403 close the socket (4001/4003); other refusals are error messages.
    fn refuse(
        &mut self,
        out: &mut Vec<u8>,
        e: HttpError,
        conv: Option<u64>,
        client_msg_id: Option<&str>,
    ) -> Verdict {
        match e.status {
            401 => Verdict::Close(close_code::UNAUTHORIZED, e.message),
            403 => Verdict::Close(close_code::FORBIDDEN, e.message),
            _ => {
                self.text(out, &error_json(&e.message, conv, client_msg_id));
                Verdict::Fine
            }
        }
    }
}

/// A send queued on its conversation's shard, answered once the session awaits it (its
/// `client_msg_id` comes back with the answer).
struct PendingSend {
    queued: QueuedSend,
    conv: u64,
}

/// What [`Session::dispatch_send`] did with a client message.
enum Dispatched {
    Pending(PendingSend),
    /// A send refused before it was queued (a bad conversation id, overload): answered in
    /// order.
    Refused {
        conv: u64,
        client_msg_id: Option<String>,
        error: HttpError,
    },
    /// Not a send: take the ordinary path.
    Other(ClientMessage),
}

/// A client message's eBPF trace record, started now, while a tracer is attached (WebSocket
/// and binary-protocol sessions).
pub fn message_trace(
    ctx: &ShardCtx,
    conn_id: u64,
    fd: i32,
    route: u16,
) -> Option<Box<RefCell<RequestRecord>>> {
    kefu_trace_common::trace_enabled().then(|| {
        let mut rec = RequestRecord {
            request_id: (u64::from(ctx.id) << 48) | ctx.next_conn_id(),
            connection_id: conn_id,
            shard: ctx.id,
            fd,
            route,
            ..Default::default()
        };
        let now = now_ns();
        rec.set(TraceStage::Accepted, now);
        rec.set(TraceStage::Parsed, now);
        Box::new(RefCell::new(rec))
    })
}

/// Ends a client message's trace record (status and answer time) and hands it to the tracer.
fn finish_trace(trace: Option<&RefCell<RequestRecord>>, verdict: &Verdict) {
    finish_message_trace(trace, !matches!(verdict, Verdict::Fine));
}

/// Ends a WebSocket or binary-protocol message's trace record (started by [`message_trace`]):
/// status 400 if the message was `refused`, else 200, and the answer time.
pub fn finish_message_trace(trace: Option<&RefCell<RequestRecord>>, refused: bool) {
    if let Some(rec) = trace {
        let mut rec = rec.borrow_mut();
        rec.status = if refused { 400 } else { 200 };
        rec.set(TraceStage::Answered, now_ns());
        emit(&rec);
    }
}

/// Runs a WebSocket session until it closes, then accounts for the connection (the caller
/// spawns it as the connection's task: an idle WebSocket's memory is that one allocation).
/// `rest` holds bytes that arrived after the upgrade request.
///
/// Not an `async fn`: an async fn keeps its arguments in its future for as long as it runs
/// (rust-lang/rust#62958), which here would be the whole hand-over (connection, token check,
/// leftover bytes) in every idle socket. The opening step is boxed and freed once it ran.
pub fn serve(
    ctx: Rc<ShardCtx>,
    conn: Conn,
    up: Upgraded,
    rest: Vec<u8>,
    conn_id: u64,
) -> impl std::future::Future<Output = ()> {
    let opening = Box::pin(open(ctx, conn, up, rest, conn_id));
    async move {
        // A refused opening has accounted for itself.
        let Some(mut socket) = opening.await else {
            return;
        };
        let why = socket.run().await;
        if let Some(outbox) = socket.session.outbox() {
            outbox.close();
        }
        crate::server::ended(&socket.session.ctx, socket.conn_id, why);
    }
}

/// Starts a session: refuses a bad token (4001), registers an agent's inbox. Boxed by the
/// caller, so none of this sits in the state of the session's future.
async fn open(
    ctx: Rc<ShardCtx>,
    mut conn: Conn,
    up: Upgraded,
    rest: Vec<u8>,
    conn_id: u64,
) -> Option<Socket> {
    let limits = &ctx.shared.config.limits;
    let mut ws = WsConnection::new(WsLimits {
        frame_payload_bytes_max: limits.ws_frame_bytes_max as u64,
        message_bytes_max: limits.ws_frame_bytes_max,
    });
    let mut out = Vec::new();
    write_switching(&mut out, up.accept);
    let actor = match up.actor {
        Ok(a) => a,
        Err(reason) => {
            ws.send_close(&mut out, close_code::UNAUTHORIZED, &reason);
            let _ = conn.write_all(out).await;
            crate::server::ended(&ctx, conn_id, Disconnect::Unauthorized);
            return None;
        }
    };
    // An agent's socket answers the upgrade only once its inbox is registered on every shard:
    // a client that sees the 101 and then (over another connection) makes a conversation
    // assigned to this agent must get the `assigned` notice on this socket. Answering first
    // lost such notices when the registration was slower than the client.
    let following = match actor {
        Actor::Agent { .. } => {
            let outbox = Outbox::new(limits.subscriber_queue_depth);
            register_agent_inbox(&ctx, &actor, &outbox).await;
            Some(Box::new(Following {
                outbox,
                subscriptions: Vec::new(),
                unsent: None,
            }))
        }
        _ => None,
    };
    let (res, _) = conn.write_all(out).await;
    if res.is_err() {
        if let Some(f) = &following {
            f.outbox.close();
        }
        crate::server::ended(&ctx, conn_id, Disconnect::IoError);
        return None;
    }
    // Each connection's ping phase is spread over the interval (by its id): sockets opened
    // in one burst would otherwise all be pinged in the same sweep, a burst of writes that
    // delays every other socket of the shard.
    let phase = ((conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64) / (1u64 << 53) as f64;
    let now = now_ms();
    let last_ping = now.wrapping_sub((ping_interval_ms(&ctx) as f64 * phase) as u32);
    Some(Socket {
        session: Session {
            ctx,
            actor,
            following,
            ws,
        },
        conn,
        buf: if rest.is_empty() { None } else { Some(rest) },
        last_rx: now,
        last_ping,
        conn_id,
    })
}

/// Milliseconds on a monotonic clock, wrapping every 49 days: a socket's two timestamps in 8
/// bytes instead of 32 (two `Instant`s). Differences are taken with `wrapping_sub`, right
/// for any span under 24 days; the intervals compared are bounded by [`ms_u32`].
fn now_ms() -> u32 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u32
}

/// A configured interval in ms, capped at 24 days (the span [`now_ms`] differences cover).
fn ms_u32(ms: u64) -> u32 {
    ms.min(24 * 86_400_000) as u32
}

fn ping_interval_ms(ctx: &ShardCtx) -> u32 {
    ms_u32(ctx.shared.config.limits.ws_ping_interval_ms)
}

/// All that a WebSocket holds while it waits: the future of [`Socket::run`] is this and the
/// [`Wait`] it parks in, nothing else (every step of work runs in its own box).
/// `tests::idle_socket_state_is_small` pins its size.
struct Socket {
    session: Session,
    conn: Conn,
    /// Received bytes not yet decoded (an incomplete frame), in a pooled buffer; `None`
    /// between messages.
    buf: Option<Vec<u8>>,
    /// When the peer last sent a whole frame, and when we last pinged ([`now_ms`]). Bytes of
    /// a frame that is not complete yet do not count: a peer that trickles a frame (one byte
    /// a minute) is closed by the idle timeout like a silent one.
    last_rx: u32,
    last_ping: u32,
    conn_id: u64,
}

/// What woke a waiting socket: the work of its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Decode what is in `buf` (bytes that came with the upgrade request).
    Decode,
    /// The socket is readable.
    Read,
    /// Deliveries are queued (or the outbox overflowed).
    Deliver,
    Ping,
    IdleTimeout,
    Stop,
}

impl Socket {
    /// Serves the socket until it closes. No `async fn`: that would keep its `&mut self`
    /// argument twice (rust-lang/rust#62958).
    #[allow(clippy::manual_async_fn)]
    fn run(&mut self) -> impl std::future::Future<Output = Disconnect> + '_ {
        async move {
            let mut work = if self.buf.is_some() {
                Work::Decode
            } else {
                Work::Deliver
            };
            loop {
                match Recycled::new(self.step(work)).await {
                    Err(why) => break why,
                    Ok(true) => {
                        work = Work::Deliver;
                        continue;
                    }
                    Ok(false) => {}
                }
                if let Err(due) = self.due() {
                    work = due;
                    continue;
                }
                // TLS records waiting to go out: the read step flushes them first.
                let Some(readable) = self.conn.readable_op() else {
                    work = Work::Read;
                    continue;
                };
                let mut readable = std::pin::pin!(readable);
                let woke = loop {
                    // (The deadline is worked out again for each wait rather than kept:
                    // whatever this future keeps across its wait, every idle socket holds.)
                    // A ping or idle timeout that came due while deliveries flowed goes first.
                    let wait_ms = match self.due() {
                        Ok(ms) => ms,
                        Err(due) => break Some(due),
                    };
                    let wake_at = Instant::now() + Duration::from_millis(u64::from(wait_ms));
                    let woke = Wait {
                        readable: readable.as_mut(),
                        socket: self,
                        deadline_ms: self.session.ctx.deadline_ms(wake_at),
                    }
                    .await;
                    // Deliveries go out from here when they can, so the readiness poll stays
                    // armed; else (and for everything else) a step runs.
                    if woke != Some(Work::Deliver) {
                        break woke;
                    }
                    match deliver_waiting(&self.conn, &mut self.session) {
                        Waiting::Sent => continue,
                        Waiting::NotHere => break woke,
                        Waiting::Rest(rest) => {
                            if let Some(f) = &mut self.session.following {
                                f.unsent = Some(rest);
                            }
                            break woke;
                        }
                    }
                };
                work = match woke {
                    Some(w) => w,
                    None => break Disconnect::IoError,
                };
            }
        }
    }

    /// How long the socket may wait (ms) before its next ping or its idle timeout, or which of
    /// the two is due now. (Read from the config each time rather than kept: whatever the
    /// socket's future keeps across its wait, every idle socket holds.)
    fn due(&self) -> Result<u32, Work> {
        let ctx = &self.session.ctx;
        let idle = ms_u32(ctx.shared.config.limits.idle_timeout_ms);
        let ping_every = ping_interval_ms(ctx);
        let now = now_ms();
        let since_rx = now.wrapping_sub(self.last_rx);
        let since_ping = now.wrapping_sub(self.last_ping);
        if since_rx >= idle {
            return Err(Work::IdleTimeout);
        }
        if since_ping >= ping_every {
            return Err(Work::Ping);
        }
        Ok((ping_every - since_ping).min(idle - since_rx))
    }

    /// One round of work: read and decode what arrived, act on it, write what is due.
    /// `Ok(true)`: deliveries are still queued. Boxed by [`Socket::run`], so a waiting
    /// socket's future holds none of this state.
    async fn step(&mut self, work: Work) -> Result<bool, Disconnect> {
        let ctx = self.session.ctx.clone();
        // Deliveries sent in part while the socket waited come first.
        if let Some(rest) = self
            .session
            .following
            .as_mut()
            .and_then(|f| f.unsent.take())
        {
            let (res, rest) = self.conn.write_all(rest).await;
            ctx.pool.give(rest);
            if let Err(e) = res {
                return Err(Disconnect::of_write(&e));
            }
        }
        // Pooled, and given back after the write: a step allocates no output buffer.
        let mut out = ctx.pool.take();
        match work {
            Work::Read => {
                let b = self.buf.take().unwrap_or_else(|| ctx.pool.take());
                let (res, b) = self.conn.read_append(b).await;
                self.buf = Some(b);
                match res {
                    Ok(0) => return Err(Disconnect::Closed),
                    // Counted as traffic once `decode` finds whole frames in it.
                    Ok(_) => {}
                    // TLS records without data (a key update): nothing to decode.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(Disconnect::IoError),
                }
            }
            Work::Decode | Work::Deliver => {}
            Work::Ping => {
                self.session.ws.send_ping(&mut out, b"kefu");
                self.last_ping = now_ms();
            }
            Work::IdleTimeout => {
                return Err(self
                    .close(
                        out,
                        close_code::GOING_AWAY,
                        "idle timeout",
                        Disconnect::IdleTimeout,
                    )
                    .await);
            }
            Work::Stop => {
                return Err(self
                    .close(
                        out,
                        close_code::GOING_AWAY,
                        "server going away",
                        Disconnect::Shutdown,
                    )
                    .await);
            }
        }
        // 1. Decode what arrived (into pooled strings, in a pooled list).
        let mut texts = take_vec(&TEXTS_POOL);
        if matches!(work, Work::Read | Work::Decode)
            && let Some(why) = self.decode(&mut out, &mut texts)
        {
            let _ = self.conn.write_all(out).await;
            return Err(why);
        }
        // 2. Act on complete messages. Sends are queued on their shards without waiting, so
        // one group commit covers a burst of them, and answered in order; anything else first
        // waits for the sends before it, so answers keep the order of the client's messages.
        let mut pending = take_vec(&PENDING_POOL);
        for text in texts.drain(..) {
            // The eBPF request marker, one per client message (route WS_FRAME).
            let trace = message_trace(
                &ctx,
                self.conn_id,
                self.conn.stream.as_raw_fd(),
                trace_route::WS_FRAME,
            );
            let trace_ref = trace.as_deref();
            let dispatched = self
                .session
                .parse(&text)
                .map(|msg| self.session.dispatch_send(msg, trace_ref));
            recycle_string(text);
            let verdict = match dispatched {
                Err(why) => {
                    if let Some(close) = self.answer_pending(&mut pending, &mut out).await {
                        return Err(self.close_with(out, close).await);
                    }
                    self.session.text(&mut out, &error_json(&why, None, None));
                    Verdict::Fine
                }
                Ok(dispatched) => match dispatched {
                    Dispatched::Pending(p) => {
                        pending.push((p, trace));
                        continue;
                    }
                    Dispatched::Refused {
                        conv,
                        client_msg_id,
                        error,
                    } => {
                        if let Some(close) = self.answer_pending(&mut pending, &mut out).await {
                            return Err(self.close_with(out, close).await);
                        }
                        self.session.answer_send(
                            &mut out,
                            conv,
                            client_msg_id.as_deref(),
                            Err(error),
                        )
                    }
                    Dispatched::Other(msg) => {
                        if let Some(close) = self.answer_pending(&mut pending, &mut out).await {
                            return Err(self.close_with(out, close).await);
                        }
                        // Boxed: a subscribe's replay state only lives while it runs.
                        Recycled::new(self.session.handle_msg(
                            msg,
                            &mut out,
                            &mut self.conn,
                            trace_ref,
                        ))
                        .await
                    }
                },
            };
            finish_trace(trace_ref, &verdict);
            match verdict {
                Verdict::Fine => {}
                Verdict::Close(code, reason) => {
                    return Err(self.close_with(out, (code, reason)).await);
                }
                Verdict::Gone(why) => {
                    ctx.pool.give(out);
                    return Err(why);
                }
            }
        }
        if let Some(close) = self.answer_pending(&mut pending, &mut out).await {
            return Err(self.close_with(out, close).await);
        }
        give_vec(&TEXTS_POOL, texts);
        give_vec(&PENDING_POOL, pending);
        // 3. Deliveries.
        let mut delivered = 0;
        let started = Instant::now();
        let outbox = self.session.outbox().cloned();
        if let Some(outbox) = &outbox {
            delivered = frame_deliveries(&mut self.session.ws, outbox, &ctx, &mut out);
            if outbox.is_overflowed() {
                return Err(self
                    .close(
                        out,
                        close_code::TOO_SLOW,
                        "too slow: resubscribe with after",
                        Disconnect::SlowConsumer,
                    )
                    .await);
            }
        }
        if out.is_empty() {
            ctx.pool.give(out);
        } else {
            let (res, out) = self.conn.write_all(out).await;
            ctx.pool.give(out);
            if let Err(e) = res {
                return Err(Disconnect::of_write(&e));
            }
            if delivered > 0 {
                ctx.metrics.delivered(delivered);
                ctx.metrics
                    .latency(Stage::Deliver, started.elapsed().as_micros() as u64);
            }
        }
        // A socket between messages keeps no buffer.
        if self.buf.as_ref().is_some_and(|b| b.is_empty())
            && let Some(b) = self.buf.take()
        {
            ctx.pool.give(b);
        }
        Ok(outbox.is_some_and(|o| !o.is_empty()))
    }

    /// Awaits the queued sends in order and writes their answers. `Some`: one of them closes
    /// the socket (401/403); the rest are dropped (their commands still complete).
    async fn answer_pending(
        &mut self,
        pending: &mut Vec<Queued>,
        out: &mut Vec<u8>,
    ) -> Option<(u16, String)> {
        for (p, trace) in pending.drain(..) {
            let trace_ref = trace.as_deref();
            let verdict = self.session.answer_queued(out, p, trace_ref).await;
            finish_trace(trace_ref, &verdict);
            if let Verdict::Close(code, reason) = verdict {
                return Some((code, reason));
            }
        }
        None
    }

    /// Closes with a client-caused code (4001/4003 for auth, else a protocol error).
    async fn close_with(&mut self, out: Vec<u8>, (code, reason): (u16, String)) -> Disconnect {
        let why = if code == close_code::UNAUTHORIZED {
            Disconnect::Unauthorized
        } else {
            Disconnect::BadRequest
        };
        self.close(out, code, &reason, why).await
    }

    /// Decodes the frames in `buf`: texts to act on, pongs and errors into `out`. `Some`:
    /// the socket is done (the peer closed, or broke the protocol).
    fn decode(&mut self, out: &mut Vec<u8>, texts: &mut Vec<String>) -> Option<Disconnect> {
        let b = self.buf.as_mut()?;
        let mut used_total = 0;
        let mut closing = None;
        loop {
            let slice = &mut b[used_total..];
            if slice.is_empty() {
                break;
            }
            match self.session.ws.decode(slice, out) {
                Ok((None, used)) => used_total += used,
                Ok((Some(ev), used)) => {
                    used_total += used;
                    match ev {
                        WsEvent::Text(t) => {
                            let mut text = pooled_string();
                            text.push_str(t);
                            texts.push(text);
                        }
                        WsEvent::Binary(_) => {
                            let msg = error_json("binary messages are not accepted", None, None);
                            self.session.text(out, &msg);
                        }
                        WsEvent::Ping(_) | WsEvent::Pong(_) => {}
                        WsEvent::Close { .. } => {
                            closing = Some(Disconnect::Closed);
                            break;
                        }
                    }
                }
                Err(WsError::Incomplete { .. }) => break,
                Err(WsError::Invalid(_)) => {
                    closing = Some(Disconnect::BadRequest);
                    break;
                }
                Err(WsError::Closed) => {
                    closing = Some(Disconnect::Closed);
                    break;
                }
            }
        }
        b.drain(..used_total);
        if used_total > 0 {
            self.last_rx = now_ms();
        }
        closing
    }

    /// Sends a close frame after what `out` already holds, and ends with `why`.
    async fn close(
        &mut self,
        mut out: Vec<u8>,
        code: u16,
        reason: &str,
        why: Disconnect,
    ) -> Disconnect {
        self.session.ws.send_close(&mut out, code, reason);
        let _ = self.conn.write_all(out).await;
        why
    }
}

/// Resolves when the outbox has something (never, without an outbox).
pub async fn ready(outbox: &Option<Arc<Outbox>>) {
    match outbox {
        Some(o) => o.ready().await,
        None => std::future::pending().await,
    }
}

/// What a waiting socket parks in: readability, a delivery, its deadline or shutdown, polled
/// by hand (`monoio::select!` would add its own state to every idle socket). `None`: the
/// socket failed.
struct Wait<'a, 'r, R> {
    /// Borrowed, so it outlives this wait: a delivery sent from the run loop between two
    /// waits keeps the same readiness poll armed.
    readable: Pin<&'r mut R>,
    socket: &'a Socket,
    /// Milliseconds since the shard's epoch ([`ShardCtx::deadline_ms`]). This wait is a
    /// deadline waiter of its own (no `DeadlineOrStop` in it, whose copies of the shard and
    /// connection id would add 16 bytes to every idle socket).
    deadline_ms: u64,
}

impl<R: std::future::Future<Output = std::io::Result<()>>> std::future::Future for Wait<'_, '_, R> {
    type Output = Option<Work>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Work>> {
        let this = self.get_mut();
        let ctx = &this.socket.session.ctx;
        // Shutdown first, so a socket that always has input still hears it.
        if ctx.stopping.get() {
            return Poll::Ready(Some(Work::Stop));
        }
        if let Poll::Ready(r) = this.readable.as_mut().poll(cx) {
            return Poll::Ready(r.ok().map(|()| Work::Read));
        }
        if let Some(outbox) = this.socket.session.outbox() {
            // `Outbox::ready` keeps no state of its own: a fresh one registers the waker
            // and looks at the queue, which is all a poll needs.
            let ready = std::pin::pin!(outbox.ready());
            if ready.poll(cx).is_ready() {
                return Poll::Ready(Some(Work::Deliver));
            }
        }
        match ctx.poll_deadline_or_stop(this.socket.conn_id, this.deadline_ms, cx) {
            // The run loop finds what is due.
            Poll::Ready(Woken::Deadline) => Poll::Ready(Some(Work::Deliver)),
            Poll::Ready(Woken::Stop) => Poll::Ready(Some(Work::Stop)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<R> Drop for Wait<'_, '_, R> {
    fn drop(&mut self) {
        self.socket.session.ctx.leave_deadline(self.socket.conn_id);
    }
}

/// Frames `json` as a text message (JSON is UTF-8; writing into a `Vec` cannot fail).
fn write_text(ws: &mut WsConnection, out: &mut Vec<u8>, json: &[u8]) {
    ws.send_text(out, std::str::from_utf8(json).unwrap_or("{}"));
}

/// Frames every delivery queued in `outbox` into `out` and gives each back to its shard's
/// pool; returns how many.
fn frame_deliveries(
    ws: &mut WsConnection,
    outbox: &Outbox,
    ctx: &ShardCtx,
    out: &mut Vec<u8>,
) -> u64 {
    let mut delivered = 0;
    while let Some(d) = outbox.pop() {
        write_text(ws, out, &d.json);
        give_back_delivery(&ctx.shared.delivery_returns, d);
        delivered += 1;
    }
    delivered
}

/// What [`deliver_waiting`] did.
enum Waiting {
    /// Every queued delivery went out.
    Sent,
    /// Nothing for it to do: nothing queued (a deadline woke the socket), an overflow to
    /// close for, or a connection whose bytes go through the ring (TLS, a tracer attached).
    NotHere,
    /// The deliveries were taken, but the send buffer did not take all of their frames: the
    /// rest goes first in the next step.
    Rest(Vec<u8>),
}

/// Writes the deliveries queued for a waiting socket with one non-blocking `send`, without
/// leaving its wait. Leaving it (to run a step) dropped the socket's pending readiness poll,
/// which monoio cancels in the kernel and keeps boxed until the cancel completes: one
/// allocation and two more ring ops per delivery to a socket whose peer is quiet, the usual
/// state of a chat's receiving side.
fn deliver_waiting(conn: &Conn, session: &mut Session) -> Waiting {
    if !conn.sends_directly() {
        return Waiting::NotHere;
    }
    let ctx = &session.ctx;
    let Some(outbox) = session.following.as_ref().map(|f| &f.outbox) else {
        return Waiting::NotHere;
    };
    if outbox.is_empty() || outbox.is_overflowed() {
        return Waiting::NotHere;
    }
    let started = Instant::now();
    let mut out = ctx.pool.take();
    // On the session's fields: `outbox` borrows `session.following`.
    let delivered = frame_deliveries(&mut session.ws, outbox, ctx, &mut out);
    let sent = conn.try_send(&out);
    // As a step counts them: framed and handed to the socket.
    ctx.metrics.delivered(delivered);
    ctx.metrics
        .latency(Stage::Deliver, started.elapsed().as_micros() as u64);
    match sent {
        Some(Ok(n)) if n == out.len() => {
            ctx.pool.give(out);
            // An overflow that came meanwhile is the step's to close for.
            if outbox.is_overflowed() {
                Waiting::NotHere
            } else {
                Waiting::Sent
            }
        }
        Some(Ok(n)) => {
            out.drain(..n);
            Waiting::Rest(out)
        }
        // Full (the ring waits for room), or failed (the ring's write fails the same way).
        _ => Waiting::Rest(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle WebSocket holds is its task (see `server::tests`): this future plus a few
    /// words. It was 1,232 bytes before the opening step was boxed, the socket's state
    /// gathered in `Socket` and its wait polled by hand; 400 keeps the task in mimalloc's
    /// 448-byte class.
    #[test]
    fn idle_socket_state_is_small() {
        let serve = crate::future_size(serve);
        let socket = std::mem::size_of::<Socket>();
        assert!(socket <= 232, "Socket grew to {socket} bytes");
        assert!(serve <= 400, "ws::serve's future grew to {serve} bytes");
    }
}
