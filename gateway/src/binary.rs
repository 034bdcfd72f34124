//! Binary-protocol sessions on the TCP listener (default port 7070): `kefu_protocol::binproto` frames, the same bytes as the storage records. Hello/Welcome, Send/Ack, Subscribe (exact replay, then live stored frames), Typing/Read, Ping/Pong, and StreamOpen (the firehose).

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kefu_protocol::binproto::{
    self, BinLimits, ClientMsg, Principal, ServerMsg, Welcome, decode_client, encode_server,
};
use kefu_protocol::frame::HEADER_LEN;
use kefu_protocol::model::{ConversationId, Event};
use kefu_trace_common::{RequestRecord, route as trace_route};
use monoio::net::TcpStream;

use crate::conn::Conn;
use crate::engine::give_back_delivery;
use crate::engine::{Actor, Outbox, Sent};
use crate::http::{HttpError, known_shard};
use crate::metrics::Disconnect;
use crate::recycle::Recycled;
use crate::server::{ShardCtx, Woken};
use crate::shard::{SendBody, give_vec, take_vec};
use crate::ws::{
    QueuedSend, ephemeral, finish_message_trace, message_trace, queue_send, register_agent_inbox,
    replay_step,
};

pub(crate) fn error_frame(
    out: &mut Vec<u8>,
    conv: u64,
    code: u16,
    client_msg_id: Option<&str>,
    reason: &str,
) {
    let reason: String = reason.chars().take(200).collect();
    let _ = encode_server(
        &ServerMsg::Error {
            conversation_id: ConversationId(conv),
            code,
            client_msg_id,
            reason: &reason,
        },
        out,
    );
}

struct Session {
    actor: Option<Actor>,
    /// Created on the first subscription or for an agent's inbox: idle sessions hold none.
    outbox: Option<Arc<Outbox>>,
    outbox_depth: usize,
    subscriptions: Vec<u64>,
}

impl Session {
    fn outbox(&mut self) -> Arc<Outbox> {
        let depth = self.outbox_depth;
        self.outbox
            .get_or_insert_with(|| Outbox::new(depth))
            .clone()
    }
}

/// What one frame asks of the connection.
enum Verdict {
    Fine,
    Close(Disconnect),
    Stream { shard: u16, from: u64, follow: bool },
}

/// Owned copy of a decoded client message, so handling may await without borrowing the buffer.
enum Owned {
    Hello(String),
    /// The text and `client_msg_id` in a pooled buffer (see [`SendBody`]).
    Send {
        conv: ConversationId,
        body: SendBody,
    },
    Subscribe {
        conv: ConversationId,
        after: u64,
    },
    Typing(ConversationId),
    Read(ConversationId, u64),
    StreamOpen {
        shard: u16,
        from: u64,
        follow: bool,
    },
    Ping(u64),
    /// A Send refused before it was queued: answered in order.
    Refused(Refused),
}

/// A Send refused before it was queued (a bad conversation id, overload).
struct Refused {
    conv: ConversationId,
    /// The conversation's id as the Error frame names it.
    id: u64,
    client_msg_id: Option<String>,
    error: HttpError,
}

impl Refused {
    fn answer(self, out: &mut Vec<u8>) -> Verdict {
        let client_msg_id = self.client_msg_id.as_deref();
        answer_send(out, self.conv, self.id, client_msg_id, Err(self.error))
    }
}

impl From<ClientMsg<'_>> for Owned {
    fn from(m: ClientMsg<'_>) -> Self {
        match m {
            ClientMsg::Hello { token } => Owned::Hello(token.to_owned()),
            ClientMsg::Send {
                conversation_id,
                client_msg_id,
                text,
            } => Owned::Send {
                conv: conversation_id,
                body: SendBody::pooled(text, client_msg_id),
            },
            ClientMsg::Subscribe {
                conversation_id,
                after_seq,
            } => Owned::Subscribe {
                conv: conversation_id,
                after: after_seq,
            },
            ClientMsg::Typing { conversation_id } => Owned::Typing(conversation_id),
            ClientMsg::Read {
                conversation_id,
                seq,
            } => Owned::Read(conversation_id, seq),
            ClientMsg::StreamOpen {
                shard,
                from_offset,
                follow,
            } => Owned::StreamOpen {
                shard,
                from: from_offset,
                follow,
            },
            ClientMsg::Ping { nonce } => Owned::Ping(nonce),
        }
    }
}

/// An Error frame; 401/403 close the connection.
fn refuse(out: &mut Vec<u8>, e: HttpError, conv: u64, cmid: Option<&str>) -> Verdict {
    error_frame(out, conv, e.status, cmid, &e.message);
    if e.status == 401 || e.status == 403 {
        Verdict::Close(Disconnect::Unauthorized)
    } else {
        Verdict::Fine
    }
}

/// The answer to a Send: its Ack, or the refusal.
fn answer_send(
    out: &mut Vec<u8>,
    conv: ConversationId,
    id: u64,
    client_msg_id: Option<&str>,
    sent: Result<Sent, HttpError>,
) -> Verdict {
    match sent {
        Ok(sent) => {
            let _ = encode_server(
                &ServerMsg::Ack {
                    conversation_id: conv,
                    seq: sent.seq,
                    log_offset: sent.log_offset,
                    timestamp_us: sent.ts,
                    duplicate: sent.duplicate,
                    client_msg_id,
                },
                out,
            );
            Verdict::Fine
        }
        Err(e) => refuse(out, e, id, client_msg_id),
    }
}

/// A frame's eBPF trace record (only while a tracer is attached).
type Trace = Box<RefCell<RequestRecord>>;

thread_local! {
    /// Per-round lists of sessions (see [`take_vec`]), so a round allocates none.
    static MESSAGES_POOL: RefCell<Vec<Vec<Owned>>> = const { RefCell::new(Vec::new()) };
    static PENDING_POOL: RefCell<Vec<Vec<PendingSend>>> = const { RefCell::new(Vec::new()) };
}

/// A Send queued on its conversation's shard, answered once the session awaits it: a burst
/// of frames queues its sends together, so one group commit covers them.
struct PendingSend {
    queued: QueuedSend,
    conv: ConversationId,
    id: u64,
    trace: Option<Trace>,
}

/// Queues an authenticated Send without waiting; anything else, and a Send that was refused,
/// comes back for the ordinary path.
fn dispatch_send(
    ctx: &ShardCtx,
    s: &Session,
    msg: Owned,
    trace: Option<Trace>,
) -> Result<PendingSend, (Owned, Option<Trace>)> {
    let Some(actor) = &s.actor else {
        return Err((msg, trace));
    };
    let Owned::Send { conv, body } = msg else {
        return Err((msg, trace));
    };
    match queue(ctx, actor, conv, body, trace.as_deref()) {
        Ok((queued, id)) => Ok(PendingSend {
            queued,
            conv,
            id,
            trace,
        }),
        Err(refused) => Err((Owned::Refused(refused), trace)),
    }
}

/// Queues a Send on its conversation's shard: the queued send and the conversation's id, or
/// why not.
fn queue(
    ctx: &ShardCtx,
    actor: &Actor,
    conv: ConversationId,
    body: SendBody,
    trace: Option<&RefCell<RequestRecord>>,
) -> Result<(QueuedSend, u64), Refused> {
    let id = match known_shard(ctx, conv) {
        Ok(id) => id,
        Err(e) => {
            let client_msg_id = body.client_msg_id().map(str::to_owned);
            return Err(Refused {
                conv,
                id: conv.0,
                client_msg_id,
                error: e,
            });
        }
    };
    if let Some(rec) = trace {
        rec.borrow_mut().conversation_id = id;
    }
    queue_send(ctx, id, actor, body, trace)
        .map(|queued| (queued, id))
        .map_err(|(e, body)| {
            let client_msg_id = body
                .as_ref()
                .and_then(|b| b.client_msg_id().map(str::to_owned));
            Refused {
                conv,
                id,
                client_msg_id,
                error: e,
            }
        })
}

/// Awaits queued sends in order and writes their answers; `Some` when one closes the
/// connection (the rest are dropped; their commands still complete).
async fn answer_pending(
    ctx: &ShardCtx,
    pending: &mut Vec<PendingSend>,
    out: &mut Vec<u8>,
) -> Option<Disconnect> {
    for p in pending.drain(..) {
        let trace = p.trace.as_deref();
        let (sent, body) = p.queued.sent(ctx, trace).await;
        let before = out.len();
        let client_msg_id = body.as_ref().and_then(SendBody::client_msg_id);
        let verdict = answer_send(out, p.conv, p.id, client_msg_id, sent);
        finish_trace(trace, out, before);
        if let Verdict::Close(why) = verdict {
            return Some(why);
        }
    }
    None
}

/// Ends a frame's trace record: 400 when its answer (from `out[before..]`) is an Error frame.
fn finish_trace(trace: Option<&RefCell<RequestRecord>>, out: &[u8], before: usize) {
    let refused = out[before..]
        .get(3)
        .is_some_and(|&kind| kind == kefu_protocol::frame::Kind::Error as u8);
    finish_message_trace(trace, refused);
}

async fn handle(
    ctx: &Rc<ShardCtx>,
    s: &mut Session,
    msg: Owned,
    out: &mut Vec<u8>,
    conn: &mut Conn,
    conn_id: u64,
    trace: Option<&RefCell<RequestRecord>>,
) -> Verdict {
    let Some(actor) = s.actor.clone() else {
        let Owned::Hello(token) = msg else {
            error_frame(out, 0, 401, None, "send Hello first");
            return Verdict::Close(Disconnect::Unauthorized);
        };
        return match ctx.shared.access.authenticate(&token) {
            Ok(actor) => {
                let (principal, tenant, id) = match &actor {
                    Actor::Visitor {
                        tenant,
                        conversation_id,
                    } => (Principal::Visitor, *tenant, format!("v{conversation_id:x}")),
                    Actor::Agent { tenant, name } => (Principal::Agent, *tenant, name.to_string()),
                    Actor::Integration { tenant } => {
                        (Principal::Integration, *tenant, "integration".to_owned())
                    }
                };
                let limits = &ctx.shared.config.limits;
                let _ = encode_server(
                    &ServerMsg::Welcome(Welcome {
                        session_id: conn_id,
                        payload_len_max: limits.binary_frame_bytes_max as u32,
                        idle_timeout_ms: limits.idle_timeout_ms.min(u64::from(u32::MAX)) as u32,
                        principal,
                        shards: ctx.shared.shards() as u16,
                        tenant: ctx.shared.access.tenant_name(tenant),
                        principal_id: &id,
                    }),
                    out,
                );
                if matches!(actor, Actor::Agent { .. }) {
                    let outbox = s.outbox();
                    register_agent_inbox(ctx, &actor, &outbox).await;
                }
                s.actor = Some(actor);
                Verdict::Fine
            }
            Err(e) => {
                error_frame(out, 0, 401, None, &e.to_string());
                Verdict::Close(Disconnect::Unauthorized)
            }
        };
    };
    match msg {
        Owned::Refused(refused) => refused.answer(out),
        Owned::Hello(_) => {
            error_frame(out, 0, 400, None, "Hello was already sent");
            Verdict::Fine
        }
        Owned::Ping(nonce) => {
            let _ = encode_server(&ServerMsg::Pong { nonce }, out);
            Verdict::Fine
        }
        Owned::Send { conv, body } => match queue(ctx, &actor, conv, body, trace) {
            Ok((queued, id)) => {
                let (sent, body) = queued.sent(ctx, trace).await;
                answer_send(
                    out,
                    conv,
                    id,
                    body.as_ref().and_then(SendBody::client_msg_id),
                    sent,
                )
            }
            Err(refused) => refused.answer(out),
        },
        Owned::Subscribe { conv, mut after } => {
            let id = match known_shard(ctx, conv) {
                Ok(id) => id,
                Err(e) => return refuse(out, e, conv.0, None),
            };
            if s.subscriptions.contains(&id) {
                error_frame(out, id, 409, None, "already subscribed");
                return Verdict::Fine;
            }
            if s.subscriptions.len() >= ctx.shared.config.limits.subscriptions_per_socket_max {
                error_frame(out, id, 429, None, "subscriptions_per_socket_max reached");
                return Verdict::Fine;
            }
            loop {
                let outbox = s.outbox();
                match replay_step(ctx, id, &actor, after, &outbox).await {
                    Ok((entries, registered)) => {
                        for d in &entries {
                            out.extend_from_slice(&d.frame);
                            after = d.seq;
                        }
                        ctx.metrics.delivered(entries.len() as u64);
                        // A long history goes out in pieces (see `ws::REPLAY_FLUSH_BYTES`).
                        if !registered && out.len() >= crate::ws::REPLAY_FLUSH_BYTES {
                            let (res, o) = conn.write_all(std::mem::take(out)).await;
                            *out = o;
                            if let Err(e) = res {
                                // Nothing more is written on a failed connection.
                                out.clear();
                                return Verdict::Close(Disconnect::of_write(&e));
                            }
                        }
                        if registered {
                            s.subscriptions.push(id);
                            return Verdict::Fine;
                        }
                        if entries.is_empty() {
                            error_frame(out, id, 503, None, "cannot subscribe now");
                            return Verdict::Fine;
                        }
                    }
                    Err(e) => return refuse(out, e, id, None),
                }
            }
        }
        Owned::Typing(conv) => match ephemeral(ctx, conv.0, &actor, Event::Typing).await {
            Ok(()) => Verdict::Fine,
            Err(e) => refuse(out, e, conv.0, None),
        },
        Owned::Read(conv, seq) => match ephemeral(ctx, conv.0, &actor, Event::Read { seq }).await {
            Ok(()) => Verdict::Fine,
            Err(e) => refuse(out, e, conv.0, None),
        },
        Owned::StreamOpen {
            shard,
            from,
            follow,
        } => {
            let registry = &ctx.shared.access.registry;
            let allowed = match actor {
                Actor::Integration { tenant } => registry.firehose_allowed(tenant),
                _ => false,
            };
            if !allowed {
                let why = "streams need an integration token of the only tenant";
                error_frame(out, 0, 403, None, why);
                return Verdict::Close(Disconnect::Unauthorized);
            }
            if shard as usize >= ctx.shared.shards() {
                error_frame(out, 0, 404, None, "no such shard");
                return Verdict::Fine;
            }
            Verdict::Stream {
                shard,
                from,
                follow,
            }
        }
    }
}

/// Serves one binary-protocol connection until it closes.
pub async fn serve(ctx: Rc<ShardCtx>, stream: TcpStream, conn_id: u64) -> Disconnect {
    let mut conn = match &ctx.shared.tls {
        Some(cfg) if ctx.shared.config.tls.as_ref().is_some_and(|t| t.tcp) => {
            match Conn::tls(stream, cfg.clone()) {
                Ok(c) => c,
                Err(_) => return Disconnect::IoError,
            }
        }
        _ => Conn::plain(stream),
    };
    let limits = ctx.shared.config.limits;
    let model = crate::access::model_limits(&limits);
    let bin_limits = BinLimits::from_model(&model, limits.binary_frame_bytes_max as u32);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let mut s = Session {
        actor: None,
        outbox: None,
        outbox_depth: limits.subscriber_queue_depth,
        subscriptions: Vec::new(),
    };
    let why = session_loop(&ctx, &mut conn, &mut s, &bin_limits, idle, conn_id).await;
    if let Some(o) = &s.outbox {
        o.close();
    }
    match why {
        Ok(d) => d,
        Err((shard, from, follow)) => {
            Box::pin(crate::stream::serve(
                ctx.clone(),
                conn,
                shard,
                from,
                follow,
                conn_id,
                false,
            ))
            .await
        }
    }
}

/// Appends the stored frame of every delivery queued in `outbox` to `out` and gives each back
/// to its shard's pool; returns how many.
fn frame_deliveries(outbox: &Outbox, ctx: &ShardCtx, out: &mut Vec<u8>) -> u64 {
    let mut delivered = 0;
    while let Some(d) = outbox.pop() {
        out.extend_from_slice(&d.frame);
        give_back_delivery(&ctx.shared.delivery_returns, d);
        delivered += 1;
    }
    delivered
}

/// `Err` carries a stream request: the caller turns the connection into a stream.
async fn session_loop(
    ctx: &Rc<ShardCtx>,
    conn: &mut Conn,
    s: &mut Session,
    bin_limits: &BinLimits,
    idle: Duration,
    conn_id: u64,
) -> Result<Disconnect, (u16, u64, bool)> {
    let mut buf: Option<Vec<u8>> = None;
    let mut out: Vec<u8> = Vec::new();
    // When the peer last sent a whole frame: bytes of an incomplete one do not count, so a
    // peer that trickles a frame is closed by the idle timeout like a silent one.
    let mut last_rx = Instant::now();
    loop {
        // Decode and handle every complete frame.
        let mut messages = take_vec(&MESSAGES_POOL);
        let mut fatal = None;
        if let Some(b) = buf.as_mut() {
            let mut used_total = 0;
            while used_total < b.len() {
                match decode_client(&b[used_total..], bin_limits) {
                    Ok((msg, used)) => {
                        messages.push(Owned::from(msg));
                        used_total += used;
                    }
                    Err(e) if e.is_incomplete() => break,
                    Err(e) => {
                        let code = match e {
                            binproto::Error::Frame(
                                kefu_protocol::frame::DecodeError::TooLarge { .. },
                            ) => 413,
                            _ => 400,
                        };
                        fatal = Some((code, e.to_string()));
                        break;
                    }
                }
            }
            b.drain(..used_total);
            if used_total > 0 {
                last_rx = Instant::now();
            }
        }
        let mut pending = take_vec(&PENDING_POOL);
        for msg in messages.drain(..) {
            // The eBPF request marker, one per client frame (route BINARY_FRAME).
            let trace = message_trace(
                ctx,
                conn_id,
                conn.stream.as_raw_fd(),
                trace_route::BINARY_FRAME,
            );
            // Sends queue without waiting; anything else first answers the sends before it.
            let (msg, trace) = match dispatch_send(ctx, s, msg, trace) {
                Ok(p) => {
                    pending.push(p);
                    continue;
                }
                Err(back) => back,
            };
            if let Some(why) = answer_pending(ctx, &mut pending, &mut out).await {
                let _ = conn.write_all(out).await;
                return Ok(why);
            }
            let out_len_before = out.len();
            let verdict = Recycled::new(handle(
                ctx,
                s,
                msg,
                &mut out,
                conn,
                conn_id,
                trace.as_deref(),
            ))
            .await;
            finish_trace(trace.as_deref(), &out, out_len_before);
            match verdict {
                Verdict::Fine => {}
                Verdict::Close(why) => {
                    let _ = conn.write_all(out).await;
                    return Ok(why);
                }
                Verdict::Stream {
                    shard,
                    from,
                    follow,
                } => {
                    let (res, _) = conn.write_all(std::mem::take(&mut out)).await;
                    if let Err(e) = res {
                        return Ok(Disconnect::of_write(&e));
                    }
                    return Err((shard, from, follow));
                }
            }
        }
        if let Some(why) = answer_pending(ctx, &mut pending, &mut out).await {
            let _ = conn.write_all(out).await;
            return Ok(why);
        }
        give_vec(&MESSAGES_POOL, messages);
        give_vec(&PENDING_POOL, pending);
        if let Some((code, reason)) = fatal {
            error_frame(&mut out, 0, code, None, &reason);
            let _ = conn.write_all(out).await;
            return Ok(Disconnect::BadRequest);
        }
        let outbox = s.outbox.clone();
        let delivered = outbox
            .as_ref()
            .map_or(0, |o| frame_deliveries(o, ctx, &mut out));
        if outbox.as_ref().is_some_and(|o| o.is_overflowed()) {
            error_frame(
                &mut out,
                0,
                429,
                None,
                "too slow: resubscribe with after_seq",
            );
            let _ = conn.write_all(out).await;
            return Ok(Disconnect::SlowConsumer);
        }
        ctx.metrics.delivered(delivered);
        if !out.is_empty() {
            let (res, o) = conn.write_all(std::mem::take(&mut out)).await;
            out = o;
            if let Err(e) = res {
                return Ok(Disconnect::of_write(&e));
            }
        }
        if buf.as_ref().is_some_and(|b| b.is_empty())
            && let Some(b) = buf.take()
        {
            ctx.pool.give(b);
        }
        if outbox.as_ref().is_some_and(|o| !o.is_empty()) {
            continue;
        }
        let now = Instant::now();
        if now.duration_since(last_rx) >= idle {
            return Ok(Disconnect::IdleTimeout);
        }
        let wake_at = last_rx + idle;
        enum Woke {
            Readable(bool),
            Outbox,
            Timer,
            Stop,
        }
        // Deliveries go out from the wait itself when the send buffer takes them all, so its
        // readiness poll stays armed: leaving the wait cancelled the poll, one allocation and
        // two ring ops per delivery (see `ws::deliver_waiting`). What the buffer does not take
        // stays in `out`, ahead of whatever the next round appends.
        let woke = {
            let mut readable = std::pin::pin!(conn.readable());
            loop {
                let woke = monoio::select! {
                    r = readable.as_mut() => Woke::Readable(r.is_ok()),
                    _ = crate::ws::ready(&outbox) => Woke::Outbox,
                    w = ctx.deadline_or_stop(conn_id, wake_at) => match w {
                        Woken::Deadline => Woke::Timer,
                        Woken::Stop => Woke::Stop,
                    },
                };
                let Some(o) = outbox.as_ref().filter(|_| matches!(woke, Woke::Outbox)) else {
                    break woke;
                };
                // TLS, a tracer, or an overflow to answer: the round does it.
                if !conn.sends_directly() || o.is_overflowed() {
                    break woke;
                }
                let delivered = frame_deliveries(o, ctx, &mut out);
                ctx.metrics.delivered(delivered);
                match conn.try_send(&out) {
                    Some(Ok(n)) if n == out.len() && !o.is_overflowed() => out.clear(),
                    Some(Ok(n)) => {
                        out.drain(..n);
                        break woke;
                    }
                    _ => break woke,
                }
            }
        };
        match woke {
            Woke::Readable(false) => return Ok(Disconnect::IoError),
            Woke::Readable(true) => {
                let mut b = buf.take().unwrap_or_else(|| ctx.pool.take());
                // A frame announces its length: make room for all of it, within the limit.
                if let Ok(h) = kefu_protocol::frame::peek_header(&b, bin_limits.payload_len_max) {
                    let need = HEADER_LEN + h.payload_len as usize;
                    if b.capacity() < need {
                        b.reserve(need - b.len());
                    }
                }
                let (res, b) = conn.read_append(b).await;
                buf = Some(b);
                match res {
                    Ok(0) => return Ok(Disconnect::Closed),
                    // Traffic once whole frames are decoded from it (above).
                    Ok(_) => {}
                    // TLS records without data (a key update): nothing to decode.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Ok(Disconnect::IoError),
                }
            }
            Woke::Outbox | Woke::Timer => {}
            Woke::Stop => return Ok(Disconnect::Shutdown),
        }
    }
}
