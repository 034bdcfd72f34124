//! HTTP/1.1 keep-alive connections: the REST endpoints of the API, long-polling, `/metrics`, and the hand-over to WebSocket (`/v1/ws`) and the firehose (`/v1/stream`).
//!
//! An idle connection holds no buffer: it waits for readability, then takes a buffer from the
//! shard's pool, and gives it back once nothing is left in it. Requests are parsed by
//! `kefu_protocol::http` (limits give 413/414/431); a command for a conversation goes to the
//! shard that owns it and the reply comes back through a one-shot slot.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kefu_protocol::http::{
    Method, ParseError, PreparedHead, RequestHead, ResponseHead, parse_head, parse_request,
    query_get, write_continue, write_json_error, write_response,
};
use kefu_protocol::model::{
    AgentStatus, AgentStatusRequest, ConversationId, CreateConversationRequest,
    CreateConversationResponse, ErrorBody, ModelLimits, SendMessageRequest, SendMessageRequestRef,
    TransferRequest, Validate, WriteJson, parse_json, parse_json_borrowed,
};
use kefu_trace_common::{RequestRecord, Stage as TraceStage, emit, now_ns, route as trace_route};
use monoio::net::TcpStream;

use crate::conn::Conn;
use crate::engine::{Actor, Delivery, EngineError, Outbox, Transition};
use crate::metrics::{Disconnect, Stage};
use crate::recycle::Recycled;
use crate::server::{ShardCtx, Woken};
use crate::shard::{Command, Outcome, ReplySlot};

const JSON: &str = "application/json";

/// Answers to pipelined requests are written once they reach this many bytes (see `burst`).
const OUT_FLUSH_BYTES: usize = 256 * 1024;

/// Why a handler could not answer normally.
pub struct HttpError {
    pub status: u16,
    pub message: String,
    pub state: Option<kefu_protocol::model::ConversationState>,
    /// `Retry-After` seconds (429 and 503).
    pub retry_after_s: u32,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            state: None,
            retry_after_s: 1,
        }
    }
}

impl From<EngineError> for HttpError {
    fn from(e: EngineError) -> Self {
        let state = match &e {
            EngineError::Conflict { state, .. } => Some(*state),
            _ => None,
        };
        let retry_after_s = match &e {
            EngineError::RateLimited { retry_after_s } => (*retry_after_s).min(3600) as u32,
            _ => 1,
        };
        Self {
            status: e.status(),
            message: e.to_string(),
            state,
            retry_after_s,
        }
    }
}

impl From<crate::auth::AuthError> for HttpError {
    fn from(e: crate::auth::AuthError) -> Self {
        Self::new(401, e.to_string())
    }
}

/// What a request turns the connection into.
pub enum Next {
    /// Keep serving HTTP (or close when `keep_alive` is false).
    Continue { keep_alive: bool },
    /// Switch to WebSocket: the 101 answer is in `out`.
    WebSocket(crate::ws::Upgraded),
    /// Switch to streaming the log of `shard` from `from`.
    Stream { shard: u16, from: u64, follow: bool },
    /// Send an attachment's bytes (sendfile on plain connections), then go on.
    Attachment {
        id: String,
        actor: Actor,
        keep_alive: bool,
    },
}

/// Sends a command to the shard owning it and waits for the answer. A full inbox is overload:
/// 503 with `Retry-After`.
pub async fn call(
    ctx: &ShardCtx,
    shard: u16,
    make: impl FnOnce(crate::shard::Reply) -> Command,
) -> Result<Outcome, HttpError> {
    call_traced(ctx, shard, None, make).await
}

/// [`call`] that fills the stages of a traced request's record.
pub async fn call_traced(
    ctx: &ShardCtx,
    shard: u16,
    trace: Option<&RefCell<RequestRecord>>,
    make: impl FnOnce(crate::shard::Reply) -> Command,
) -> Result<Outcome, HttpError> {
    let pending = dispatch(ctx, shard, trace, make)?;
    Ok(pending.wait(ctx, trace).await)
}

/// A command in its shard's inbox whose reply has not been awaited yet: a session can
/// dispatch several (in order, so they keep their order in the log) before it awaits them,
/// and one group commit then covers them all.
pub struct Pending {
    reply: crate::shard::Reply,
    started: Instant,
}

/// The first half of [`call_traced`]: queues the command on its shard, without waiting.
pub fn dispatch(
    ctx: &ShardCtx,
    shard: u16,
    trace: Option<&RefCell<RequestRecord>>,
    make: impl FnOnce(crate::shard::Reply) -> Command,
) -> Result<Pending, HttpError> {
    let inbox = ctx
        .shared
        .inboxes
        .get(shard as usize)
        .ok_or_else(|| HttpError::new(404, "conversation not found"))?;
    let reply = ReplySlot::pooled();
    let started = Instant::now();
    // Shed load before the queue is full, so commands already queued still finish in time.
    if inbox.len() >= ctx.shared.config.limits.overload_inflight_per_shard_max {
        return Err(HttpError::new(
            503,
            "the gateway is overloaded; retry shortly",
        ));
    }
    if inbox.push(make(reply.clone())).is_err() {
        return Err(HttpError::new(
            503,
            "the gateway is overloaded; retry shortly",
        ));
    }
    if let Some(rec) = trace {
        rec.borrow_mut().set(TraceStage::RoutedToShard, now_ns());
    }
    Ok(Pending { reply, started })
}

impl Pending {
    /// The second half of [`call_traced`]: the command's outcome, its stages in `trace`.
    pub async fn wait(self, ctx: &ShardCtx, trace: Option<&RefCell<RequestRecord>>) -> Outcome {
        let outcome = self.reply.wait().await;
        if let Some(rec) = trace {
            let mut rec = rec.borrow_mut();
            for (stage, at) in [
                (TraceStage::Appended, &self.reply.appended_ns),
                (TraceStage::Synced, &self.reply.synced_ns),
            ] {
                let ns = at.load(std::sync::atomic::Ordering::Relaxed);
                if ns != 0 {
                    rec.set(stage, ns);
                }
            }
        }
        ctx.metrics
            .latency(Stage::Command, self.started.elapsed().as_micros() as u64);
        ReplySlot::recycle(self.reply);
        outcome
    }
}

/// Parses a conversation id from a path segment and checks its shard exists.
pub fn conversation_id(ctx: &ShardCtx, text: &str) -> Result<u64, HttpError> {
    let id =
        ConversationId::parse(text).map_err(|_| HttpError::new(404, "conversation not found"))?;
    known_shard(ctx, id)
}

/// A decoded conversation id whose shard exists (WebSocket and binary messages carry ids
/// already parsed).
pub fn known_shard(ctx: &ShardCtx, id: ConversationId) -> Result<u64, HttpError> {
    if (id.0 >> 48) as usize >= ctx.shared.shards() {
        return Err(HttpError::new(404, "conversation not found"));
    }
    Ok(id.0)
}

fn model_limits(ctx: &ShardCtx) -> ModelLimits {
    crate::access::model_limits(&ctx.shared.config.limits)
}

fn check_body_len(ctx: &ShardCtx, body: &[u8]) -> Result<(), HttpError> {
    if body.len() > ctx.shared.json_body_bytes_max {
        return Err(HttpError::new(
            413,
            format!(
                "body larger than request_body_bytes_max = {}",
                ctx.shared.json_body_bytes_max
            ),
        ));
    }
    Ok(())
}

/// The largest body the request's endpoint takes: an attachment upload the largest tenant
/// limit (each tenant's own is checked by the upload), everything else
/// `request_body_bytes_max`.
fn body_bytes_max(ctx: &ShardCtx, head: &RequestHead<'_>) -> u64 {
    let mut segments = [""; PATH_SEGMENTS_MAX + 1];
    let n = path_segments(head.path, &mut segments);
    match (head.method, &segments[..n]) {
        (Method::Post, ["v1", "conversations", _, "attachments"]) => {
            ctx.shared.http_limits.body_bytes_max
        }
        _ => ctx.shared.json_body_bytes_max as u64,
    }
}

/// Refuses an incomplete request whose body is already known to be too large for its
/// endpoint: a `Content-Length` above [`body_bytes_max`], or more chunked bytes buffered than
/// that limit plus the chunks' framing can explain. `buffered` counts the head too.
fn check_body_framing(
    ctx: &ShardCtx,
    head: &RequestHead<'_>,
    buffered: usize,
) -> Result<(), HttpError> {
    let max = body_bytes_max(ctx, head);
    let too_large = match head.body {
        kefu_protocol::http::BodyFraming::None => false,
        kefu_protocol::http::BodyFraming::Length(n) => n > max,
        // Chunk size lines and CRLFs: at most `CHUNKS_COUNT_MAX` chunks (the parser refuses
        // more), each with up to 16 bytes of framing, plus the last chunk and trailers.
        kefu_protocol::http::BodyFraming::Chunked => {
            let framing = u64::from(kefu_protocol::http::CHUNKS_COUNT_MAX) * 16 + 1024;
            buffered.saturating_sub(head.head_len) as u64 > max + framing
        }
    };
    if too_large {
        return Err(HttpError::new(
            413,
            format!("body larger than this endpoint's limit of {max} bytes"),
        ));
    }
    Ok(())
}

/// When an incomplete request that began arriving at `since` must be whole:
/// `request_timeout_ms` after its first bytes, plus one second per `upload_bytes_per_s_min`
/// bytes of its body (its `Content-Length`, or for a chunked body the endpoint's limit), so a
/// large upload over a slow link still fits but a trickling peer does not hold on for ever.
fn partial_request_deadline(
    ctx: &ShardCtx,
    since: Instant,
    head: Option<&RequestHead<'_>>,
) -> Instant {
    let limits = &ctx.shared.config.limits;
    let body_bytes = match head {
        Some(h) => match h.body {
            kefu_protocol::http::BodyFraming::Length(n) => n,
            kefu_protocol::http::BodyFraming::Chunked => body_bytes_max(ctx, h),
            kefu_protocol::http::BodyFraming::None => 0,
        },
        None => 0,
    };
    let body_ms = body_bytes.saturating_mul(1000) / limits.upload_bytes_per_s_min.max(1);
    since + Duration::from_millis(limits.request_timeout_ms.saturating_add(body_ms))
}

fn body_json<T: serde::de::DeserializeOwned + Validate>(
    ctx: &ShardCtx,
    body: &[u8],
) -> Result<T, HttpError> {
    check_body_len(ctx, body)?;
    parse_json::<T>(body, &model_limits(ctx)).map_err(|e| HttpError::new(400, e.to_string()))
}

fn query_u64(head: &RequestHead<'_>, key: &str) -> Result<Option<u64>, HttpError> {
    let Some(q) = head.query else {
        return Ok(None);
    };
    match query_get(q, key) {
        None => Ok(None),
        Some(Ok(v)) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| HttpError::new(400, format!("query parameter `{key}` is not a number"))),
        Some(Err(_)) => Err(HttpError::new(
            400,
            format!("query parameter `{key}` is malformed"),
        )),
    }
}

/// The request's token: `Authorization: Bearer`, or `?token=` (WebSocket clients cannot set
/// headers from a browser).
pub fn token<'a>(head: &'a RequestHead<'a>) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(t) = head.bearer_token() {
        return Some(t.into());
    }
    head.query
        .and_then(|q| query_get(q, "token"))
        .and_then(Result::ok)
}

fn authenticate(ctx: &ShardCtx, head: &RequestHead<'_>) -> Result<Actor, HttpError> {
    let token = token(head).ok_or_else(|| HttpError::new(401, "missing bearer token"))?;
    Ok(ctx.shared.access.authenticate(&token)?)
}

fn write_error(out: &mut Vec<u8>, e: &HttpError, keep_alive: bool) {
    let mut head = ResponseHead::new(e.status)
        .content_type(JSON)
        .keep_alive(keep_alive);
    if e.status == 503 || e.status == 429 {
        head = head.retry_after_secs(e.retry_after_s);
    }
    // Only a refused WebSocket upgrade answers 426 (RFC 6455 §4.4, RFC 9110 §15.5.22).
    if e.status == 426 {
        head = head.extra_headers(kefu_protocol::ws::UPGRADE_REQUIRED_HEADERS);
    }
    match e.state {
        Some(state) => {
            let body = ErrorBody {
                error: e.message.clone(),
                state: Some(state),
            };
            write_response(out, &head, &body.to_json_vec());
        }
        None => write_json_error(out, &head, &e.message),
    }
}

fn write_json(out: &mut Vec<u8>, status: u16, keep_alive: bool, body: &[u8]) {
    let head = ResponseHead::new(status)
        .content_type(JSON)
        .keep_alive(keep_alive);
    write_response(out, &head, body);
}

/// Longest `SendMessageResponse` JSON: `{"seq":N,"ts":N}` with two 20-digit numbers.
const SENT_JSON_BYTES_MAX: usize = 64;

/// The heads of a send's answers, rendered once: 201 (stored) and 200 (an idempotent retry),
/// keep-alive or not.
static SENT_HEADS: std::sync::LazyLock<[[PreparedHead; 2]; 2]> = std::sync::LazyLock::new(|| {
    let head = |status, keep_alive| {
        let head = ResponseHead::new(status)
            .content_type(JSON)
            .keep_alive(keep_alive);
        PreparedHead::new(&head).expect("200 and 201 have a Content-Length")
    };
    [
        [head(200, false), head(200, true)],
        [head(201, false), head(201, true)],
    ]
});

/// Writes the answer to a send (`{"seq":..,"ts":..}`, `status` 200 or 201), rendered on the
/// stack behind a prepared head: no allocation, no header-by-header render.
pub fn write_sent(out: &mut Vec<u8>, status: u16, keep_alive: bool, seq: u64, ts: u64) {
    // `SendMessageResponse` as serde_json writes it (a test holds the two together), without
    // a serializer: two numbers and fixed text.
    let mut buf = [0u8; SENT_JSON_BYTES_MAX];
    let mut len = 0;
    for part in [
        &b"{\"seq\":"[..],
        kefu_protocol::http::response::decimal(seq, &mut [0; 20]),
        b",\"ts\":",
        kefu_protocol::http::response::decimal(ts, &mut [0; 20]),
        b"}",
    ] {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    match status {
        200 | 201 => SENT_HEADS[usize::from(status == 201)][usize::from(keep_alive)]
            .write_response(out, &buf[..len]),
        _ => write_json(out, status, keep_alive, &buf[..len]),
    }
}

/// Most path segments a route has (`v1/conversations/{id}/messages`).
const PATH_SEGMENTS_MAX: usize = 4;

/// Splits a path into its `/`-separated segments (after the leading slashes) without
/// allocating: at most `PATH_SEGMENTS_MAX + 1` of them, so a longer path still has more
/// segments than any route and matches none, as the whole list would.
fn path_segments<'p>(path: &'p str, out: &mut [&'p str; PATH_SEGMENTS_MAX + 1]) -> usize {
    let mut n = 0;
    for segment in path.trim_start_matches('/').split('/') {
        if n == out.len() {
            break;
        }
        out[n] = segment;
        n += 1;
    }
    n
}

/// `POST /v1/conversations/{id}/messages`: the id segment. The send is the hot path, served
/// without boxing the router's (large) future.
fn message_send_target<'p>(head: &RequestHead<'p>) -> Option<&'p str> {
    if head.method != Method::Post {
        return None;
    }
    let mut segments = [""; PATH_SEGMENTS_MAX + 1];
    let n = path_segments(head.path, &mut segments);
    match segments[..n] {
        ["v1", "conversations", id, "messages"] => Some(id),
        _ => None,
    }
}

/// Serves one HTTP connection until it closes; returns why it ended.
/// What a burst of activity on a connection ended with.
enum After {
    /// Back to waiting (idle, no buffer pinned); the idle time counts from `idle_from` (when
    /// the last answer was ready: the clock read that timed it, not another one).
    Wait {
        idle_from: Instant,
    },
    End(Disconnect),
    WebSocket(crate::ws::Upgraded),
    Stream {
        shard: u16,
        from: u64,
        follow: bool,
    },
}

/// One HTTP connection's state between bursts: small, so an idle connection costs little.
struct HttpConn {
    conn: Conn,
    buf: Option<Vec<u8>>,
    out: Vec<u8>,
    continue_sent: bool,
    /// Requests already buffered after a response that took over the socket for a while.
    parse_pending: bool,
    local_port: u16,
    peer_port: u16,
    peer: Peer,
    conn_id: u64,
    /// Where its message sends went: a connection moves to their shard ([`crate::migrate`]).
    sends_to: crate::migrate::Follow,
    /// When the first bytes of the buffered, incomplete request were seen, and when it must be
    /// complete ([`partial_request_deadline`]); `None` between requests. Every byte resets
    /// the idle timer, so without this a peer that trickles a request (one byte a minute)
    /// would hold its connection and buffer for ever.
    partial: Option<(Instant, Instant)>,
}

/// The peer of an HTTP connection, as its requests need it.
#[derive(Clone, Copy)]
struct Peer {
    /// `/metrics` is served to loopback peers only; by default they are not rate-limited.
    loopback: bool,
    /// `ratelimit::ip_key` of its address.
    ip: u64,
    /// Accepted on the admin listener: `/metrics` and the health checks only.
    admin: bool,
}

/// How an HTTP connection ended: closed, or handed over to a WebSocket or stream session,
/// which the caller runs in its own boxed future (see `server::accept_loop`).
pub enum Served {
    Closed(Disconnect),
    /// Moved to another shard, which serves it from now on ([`crate::migrate`]).
    Migrated,
    WebSocket {
        conn: Conn,
        up: crate::ws::Upgraded,
        rest: Vec<u8>,
    },
    Stream {
        conn: Conn,
        shard: u16,
        from: u64,
        follow: bool,
    },
}

/// `tls` and `moves`: the TLS session a connection brought from another shard, and how often
/// it moved between shards before ([`crate::migrate`]).
pub async fn serve(
    ctx: Rc<ShardCtx>,
    stream: TcpStream,
    tls: Option<crate::conn::TlsSession>,
    conn_id: u64,
    moves: u8,
    admin: bool,
) -> Served {
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let peer = stream.peer_addr().ok();
    let peer_port = peer.map_or(0, |a| a.port());
    let peer_loopback = peer.is_some_and(|a| a.ip().is_loopback());
    let peer_ip = peer.map_or(0, |a| crate::ratelimit::ip_key(a.ip()));
    let conn = match (&ctx.shared.tls, tls) {
        (_, Some(session)) => Conn::resume(stream, session),
        // The admin listener is plain, whatever `tls.http` says.
        (Some(cfg), None) if !admin && ctx.shared.config.tls.as_ref().is_some_and(|t| t.http) => {
            match Conn::tls(stream, cfg.clone()) {
                Ok(c) => c,
                Err(_) => return Served::Closed(Disconnect::IoError),
            }
        }
        _ => Conn::plain(stream),
    };
    let idle = Duration::from_millis(ctx.shared.config.limits.idle_timeout_ms);
    let mut idle_from = Instant::now();
    let mut c = HttpConn {
        conn,
        buf: None,
        out: Vec::new(),
        continue_sent: false,
        parse_pending: false,
        local_port,
        peer_port,
        peer: Peer {
            loopback: peer_loopback,
            ip: peer_ip,
            admin,
        },
        conn_id,
        sends_to: crate::migrate::Follow::moved(moves),
        partial: None,
    };
    loop {
        if !c.parse_pending {
            if c.buf.as_ref().is_some_and(|b| b.is_empty())
                && let Some(b) = c.buf.take()
            {
                ctx.pool.give(b);
            }
            // Idle: no buffer pinned while waiting (unless a partial request is buffered:
            // then the idle timeout also bounds how long a slow sender holds it). The write
            // buffer goes back to the pool (one that grew for a large answer is freed there).
            if c.out.capacity() > 0 {
                ctx.pool.give(std::mem::take(&mut c.out));
            }
            let idle_deadline = idle_from + idle;
            let deadline = c
                .partial
                .map_or(idle_deadline, |(_, due)| due.min(idle_deadline));
            let ready = monoio::select! {
                r = c.conn.readable() => r.is_ok(),
                w = ctx.deadline_or_stop(conn_id, deadline) => match w {
                    Woken::Deadline if c.partial.is_some_and(|(_, due)| deadline == due) => {
                        let limits = &ctx.shared.config.limits;
                        let err = HttpError::new(
                            408,
                            format!(
                                "the request did not arrive whole within request_timeout_ms = {} \
                                 (plus 1 s per upload_bytes_per_s_min = {} bytes of its body)",
                                limits.request_timeout_ms, limits.upload_bytes_per_s_min
                            ),
                        );
                        let mut out = std::mem::take(&mut c.out);
                        out.clear();
                        write_error(&mut out, &err, false);
                        ctx.metrics.response(err.status);
                        // Boxed: rare, and the idle connection's future stays small.
                        let _ = Box::pin(c.conn.write_all(out)).await;
                        return Served::Closed(Disconnect::RequestTimeout);
                    }
                    Woken::Deadline => return Served::Closed(Disconnect::IdleTimeout),
                    Woken::Stop => return Served::Closed(Disconnect::Shutdown),
                },
            };
            if !ready {
                return Served::Closed(Disconnect::IoError);
            }
        }
        // Boxed: parsing, handlers and writes only live while there is traffic, so the
        // future an idle connection parks in stays small.
        // Bound first: a temporary in the `match` head would keep the burst's box alive for
        // the whole WebSocket or stream session below.
        let after = Recycled::new(burst(&ctx, &mut c)).await;
        match after {
            After::Wait { idle_from: at } => {
                idle_from = at;
                if let Some(to) = c.sends_to.target() {
                    // Only between requests with nothing buffered; a TLS session goes along
                    // once all its records are written.
                    let idle = !c.parse_pending
                        && !c.continue_sent
                        && c.buf.as_ref().is_none_or(|b| b.is_empty());
                    // A plain connection has no session to take; a TLS one that cannot
                    // give its up stays.
                    let tls = if idle { c.conn.take_tls() } else { None };
                    if idle && !c.conn.is_tls() {
                        let moves = c.sends_to.moves();
                        match crate::migrate::leave(&ctx, &c.conn.stream, tls, to, moves) {
                            Ok(()) => {
                                if let Some(b) = c.buf.take() {
                                    ctx.pool.give(b);
                                }
                                if c.out.capacity() > 0 {
                                    ctx.pool.give(std::mem::take(&mut c.out));
                                }
                                return Served::Migrated;
                            }
                            Err(Some(tls)) => c.conn.restore_tls(tls),
                            Err(None) => {}
                        }
                    }
                    c.sends_to.reset();
                }
            }
            After::End(why) => return Served::Closed(why),
            After::WebSocket(up) => {
                // Bytes after the upgrade request go to the WebSocket session; an empty buffer
                // goes back to the pool (an idle socket holds none).
                let rest = match c.buf.take() {
                    Some(b) if !b.is_empty() => b,
                    Some(b) => {
                        ctx.pool.give(b);
                        Vec::new()
                    }
                    None => Vec::new(),
                };
                return Served::WebSocket {
                    conn: c.conn,
                    up,
                    rest,
                };
            }
            After::Stream {
                shard,
                from,
                follow,
            } => {
                if let Some(b) = c.buf.take() {
                    ctx.pool.give(b);
                }
                return Served::Stream {
                    conn: c.conn,
                    shard,
                    from,
                    follow,
                };
            }
        }
    }
}

/// Reads what arrived, answers every complete request in the buffer (pipelining), writes once.
async fn burst(ctx: &Rc<ShardCtx>, c: &mut HttpConn) -> After {
    let HttpConn {
        conn,
        buf,
        out,
        continue_sent,
        parse_pending,
        local_port,
        peer_port,
        peer,
        conn_id,
        sends_to,
        partial,
    } = c;
    let (local_port, peer_port, peer, conn_id) = (*local_port, *peer_port, *peer, *conn_id);
    let mut read_at_ns = 0;
    if !*parse_pending {
        let b = buf.take().unwrap_or_else(|| ctx.pool.take());
        let (res, b) = conn.read_append(b).await;
        if kefu_trace_common::tracer_attached() {
            read_at_ns = now_ns();
        }
        *buf = Some(b);
        match res {
            Ok(0) => return After::End(Disconnect::Closed),
            Ok(_) => {}
            // TLS records without data: back to the wait (and its idle deadline), with a
            // partial request, if any, still buffered.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                *parse_pending = false;
                return After::Wait {
                    idle_from: Instant::now(),
                };
            }
            Err(_) => return After::End(Disconnect::IoError),
        }
    }
    *parse_pending = false;
    if out.capacity() == 0 {
        // A pooled write buffer: growing a fresh one response by response would allocate
        // several times per request.
        *out = ctx.pool.take();
    }
    // Handle every complete request in the buffer (pipelining), then write once.
    let mut next = Next::Continue { keep_alive: true };
    // When the previous answer was ready: a pipelined request starts there (it was already
    // buffered), so one clock read per request times it.
    let mut answered: Option<Instant> = None;
    loop {
        let b = buf.as_mut().expect("buffer taken above");
        if b.is_empty() {
            break;
        }
        let started = answered.unwrap_or_else(Instant::now);
        // The eBPF request marker: one relaxed load when no tracer is attached.
        let traced = kefu_trace_common::trace_enabled();
        let trace = RefCell::new(RequestRecord::default());
        if traced {
            let mut rec = trace.borrow_mut();
            let n = ctx.next_conn_id();
            rec.request_id = (u64::from(ctx.id) << 48) | n;
            rec.connection_id = conn_id;
            rec.shard = ctx.id;
            rec.fd = conn.stream.as_raw_fd();
            rec.local_port = local_port;
            rec.peer_port = peer_port;
            rec.set(TraceStage::Accepted, read_at_ns);
        }
        let parsed = parse_request(b, &ctx.shared.http_limits);
        let req = match parsed {
            Ok(req) => req,
            Err(ParseError::Incomplete { .. }) => {
                // One clock read per read of an incomplete request, none for whole ones.
                let since = partial.map_or_else(Instant::now, |(since, _)| since);
                let head = parse_head(b, &ctx.shared.http_limits).ok();
                if let Some(head) = &head
                    && let Err(err) = check_body_framing(ctx, head, b.len())
                {
                    // Refused from its head: the body is neither waited for nor buffered
                    // (and a client that sent `Expect: 100-continue` gets this, not a 100).
                    write_error(out, &err, false);
                    ctx.metrics.response(err.status);
                    let (_, _) = conn.write_all(std::mem::take(out)).await;
                    return After::End(Disconnect::BadRequest);
                }
                *partial = Some((since, partial_request_deadline(ctx, since, head.as_ref())));
                if !*continue_sent
                    && let Some(head) = &head
                    && head.expect_continue
                {
                    write_continue(out);
                    *continue_sent = true;
                }
                break;
            }
            Err(ParseError::Invalid(e)) => {
                let err = HttpError::new(e.status(), e.to_string());
                write_error(out, &err, false);
                ctx.metrics.response(err.status);
                let (_, _) = conn.write_all(std::mem::take(out)).await;
                return After::End(Disconnect::BadRequest);
            }
        };
        *continue_sent = false;
        *partial = None;
        let consumed = req.consumed;
        let keep_alive = req.head.keep_alive && !ctx.stopping.get();
        let mut body_copy = Vec::new();
        let body: &[u8] = match req.body.as_contiguous() {
            Some(body) => body,
            None => {
                req.body.copy_into(&mut body_copy);
                &body_copy
            }
        };
        let status_before = out.len();
        if traced {
            let mut rec = trace.borrow_mut();
            rec.set(TraceStage::Parsed, now_ns());
            rec.route = route_id(&req.head);
        }
        let trace_ref = traced.then_some(&trace);
        // (The admin listener serves no sends: `route` answers them 404.)
        let send_target = if peer.admin {
            None
        } else {
            message_send_target(&req.head)
        };
        let routed = match send_target {
            // The hot path: its future is small, so it runs inline in this burst's box (one
            // allocation and copy less per message).
            Some(id) => {
                let sent = send_message(ctx, &req.head, id, body, keep_alive, out, trace_ref).await;
                // Only sends that were taken count towards moving the connection: refused ones
                // (a bad token) must not steer it to another shard.
                if sent.is_ok()
                    && let Ok(cid) = ConversationId::parse(id)
                {
                    sends_to.sent(ctx.id, kefu_protocol::frame::shard_of(cid.0));
                }
                sent.map(|()| Next::Continue { keep_alive })
            }
            // Boxed: the other handlers' state is large and only lives during a request, so
            // the burst's box stays small (see the idle-memory figures in the README).
            None => {
                Recycled::new(route(
                    ctx, &req.head, body, keep_alive, peer, out, conn_id, trace_ref,
                ))
                .await
            }
        };
        next = match routed {
            Ok(next) => next,
            Err(e) => {
                write_error(out, &e, keep_alive);
                Next::Continue { keep_alive }
            }
        };
        // An upgrade's 101 is written by its session (`ws::open`), once it is ready.
        let status = if matches!(next, Next::WebSocket(_)) {
            101
        } else {
            status_of(&out[status_before..])
        };
        ctx.metrics.response(status);
        if traced {
            let mut rec = trace.borrow_mut();
            rec.status = status;
            // Answered: the response is complete in the write buffer, written right after.
            rec.set(TraceStage::Answered, now_ns());
            emit(&rec);
        }
        let done = Instant::now();
        answered = Some(done);
        ctx.metrics
            .latency(Stage::Request, (done - started).as_micros() as u64);
        let b = buf.as_mut().expect("buffer");
        b.drain(..consumed);
        if !matches!(next, Next::Continue { keep_alive: true }) {
            break;
        }
        // Pipelined answers go out once they add up to this much, rather than all at the
        // end: many buffered requests for large answers (history pages) do not pile up.
        if out.len() >= OUT_FLUSH_BYTES {
            let (res, o) = conn.write_all(std::mem::take(out)).await;
            *out = o;
            if let Err(e) = res {
                return After::End(Disconnect::of_write(&e));
            }
        }
    }
    if !out.is_empty() {
        let (res, o) = conn.write_all(std::mem::take(out)).await;
        *out = o;
        if let Err(e) = res {
            return After::End(Disconnect::of_write(&e));
        }
    }
    match next {
        Next::Continue { keep_alive: true } => After::Wait {
            idle_from: answered.unwrap_or_else(Instant::now),
        },
        Next::Continue { keep_alive: false } => After::End(Disconnect::Closed),
        Next::Attachment {
            id,
            actor,
            keep_alive,
        } => {
            match Box::pin(download(ctx, conn, &id, &actor, keep_alive)).await {
                Err(e) => {
                    let mut out = Vec::new();
                    write_error(&mut out, &e, keep_alive);
                    ctx.metrics.response(e.status);
                    let (res, _) = conn.write_all(out).await;
                    if let Err(e) = res {
                        return After::End(Disconnect::of_write(&e));
                    }
                }
                Ok(Err(e)) => {
                    ctx.metrics.response(200);
                    return After::End(Disconnect::of_write(&e));
                }
                Ok(Ok(())) => ctx.metrics.response(200),
            }
            if !keep_alive {
                return After::End(Disconnect::Closed);
            }
            *parse_pending = buf.as_ref().is_some_and(|b| !b.is_empty());
            After::Wait {
                idle_from: Instant::now(),
            }
        }
        Next::WebSocket(up) => After::WebSocket(up),
        Next::Stream {
            shard,
            from,
            follow,
        } => After::Stream {
            shard,
            from,
            follow,
        },
    }
}

/// The status code of a response written at the start of `out` (for metrics).
fn status_of(out: &[u8]) -> u16 {
    // "HTTP/1.1 200 ..."
    out.get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The eBPF tracer's route id of a request.
fn route_id(head: &RequestHead<'_>) -> u16 {
    let mut segments = [""; PATH_SEGMENTS_MAX + 1];
    let n = path_segments(head.path, &mut segments);
    match (head.method, &segments[..n]) {
        (_, ["healthz" | "readyz"]) => trace_route::HEALTH,
        (_, ["metrics"]) => trace_route::METRICS,
        (Method::Post, ["v1", "conversations"]) => trace_route::CONVERSATION_CREATE,
        (Method::Get, ["v1", "conversations", _]) => trace_route::CONVERSATION_GET,
        (Method::Post, ["v1", "conversations", _, "messages"]) => trace_route::MESSAGE_SEND,
        (Method::Get, ["v1", "conversations", _, "messages"]) => trace_route::MESSAGES_LIST,
        (_, ["v1", "conversations", _, "poll"]) => trace_route::POLL,
        (_, ["v1", "agents", "me", "status"]) => trace_route::AGENT_STATUS,
        (_, ["v1", "conversations", _, _]) => trace_route::CONVERSATION_ACTION,
        (_, ["v1", "stream"]) => trace_route::STREAM,
        _ => trace_route::UNKNOWN,
    }
}

#[allow(clippy::too_many_arguments)]
async fn route(
    ctx: &Rc<ShardCtx>,
    head: &RequestHead<'_>,
    body: &[u8],
    keep_alive: bool,
    peer: Peer,
    out: &mut Vec<u8>,
    conn_id: u64,
    trace: Option<&RefCell<RequestRecord>>,
) -> Result<Next, HttpError> {
    let done = Next::Continue { keep_alive };
    let mut segments = [""; PATH_SEGMENTS_MAX + 1];
    let n = path_segments(head.path, &mut segments);
    if peer.admin && !matches!(&segments[..n], ["healthz" | "readyz" | "metrics"]) {
        return Err(HttpError::new(
            404,
            "the admin listener serves /metrics, /healthz and /readyz only",
        ));
    }
    match (head.method, &segments[..n]) {
        (Method::Get, ["healthz"]) => {
            write_json(out, 200, keep_alive, br#"{"status":"ok"}"#);
            Ok(done)
        }
        (Method::Get, ["readyz"]) => {
            if ctx.shared.is_ready() {
                write_json(out, 200, keep_alive, br#"{"status":"ready"}"#);
            } else {
                return Err(HttpError::new(503, "not ready"));
            }
            Ok(done)
        }
        (Method::Get, ["metrics"]) => {
            // With an admin listener, there only; else to loopback peers.
            if ctx.shared.config.admin.is_some() && !peer.admin {
                return Err(HttpError::new(
                    403,
                    "metrics are served on the admin listener (server.admin)",
                ));
            }
            if !peer.admin && !peer.loopback {
                return Err(HttpError::new(
                    403,
                    "metrics are served to loopback clients only (or on server.admin)",
                ));
            }
            let text = metrics_text(ctx).await?;
            let head = ResponseHead::new(200)
                .content_type("text/plain; version=0.0.4")
                .keep_alive(keep_alive);
            write_response(out, &head, text.as_bytes());
            Ok(done)
        }
        (Method::Post, ["v1", "conversations"]) => {
            create(ctx, head, body, keep_alive, peer, out, trace).await?;
            Ok(done)
        }
        (Method::Get, ["v1", "conversations", id]) => {
            let id = conversation_id(ctx, id)?;
            let actor = authenticate(ctx, head)?;
            let outcome = call(ctx, (id >> 48) as u16, |reply| Command::View {
                conv: id,
                actor,
                reply,
            })
            .await?;
            let Outcome::View(view) = outcome else {
                return Err(internal());
            };
            write_json(out, 200, keep_alive, &view?.to_json_vec());
            Ok(done)
        }
        (Method::Post, ["v1", "conversations", id, "messages"]) => {
            send_message(ctx, head, id, body, keep_alive, out, trace).await?;
            Ok(done)
        }
        (Method::Get, ["v1", "conversations", id, "messages"]) => {
            let id = conversation_id(ctx, id)?;
            let actor = authenticate(ctx, head)?;
            let after = query_u64(head, "after")?.unwrap_or(0);
            let limit = query_u64(head, "limit")?
                .unwrap_or(100)
                .min(ctx.shared.config.limits.history_limit_max as u64)
                as usize;
            let outcome = call(ctx, (id >> 48) as u16, |reply| Command::Replay {
                conv: id,
                actor,
                after,
                limit,
                subscriber: None,
                reply,
            })
            .await?;
            let Outcome::Replay(replay) = outcome else {
                return Err(internal());
            };
            let replay = replay?;
            let mut page = ctx.pool.take();
            write_page(
                &mut page,
                replay.entries.iter().map(|d| &*d.json),
                replay.last_seq,
            );
            write_json(out, 200, keep_alive, &page);
            ctx.pool.give(page);
            Ok(done)
        }
        (Method::Get, ["v1", "conversations", id, "poll"]) => {
            let id = conversation_id(ctx, id)?;
            let actor = authenticate(ctx, head)?;
            long_poll(ctx, head, id, actor, keep_alive, out, conn_id).await?;
            Ok(done)
        }
        (
            Method::Post,
            [
                "v1",
                "conversations",
                id,
                action @ ("accept" | "resolve" | "reopen" | "transfer"),
            ],
        ) => {
            let id = conversation_id(ctx, id)?;
            let actor = authenticate(ctx, head)?;
            let Actor::Agent { tenant, name } = actor else {
                return Err(HttpError::new(403, "only agents can do this"));
            };
            let what = match *action {
                "accept" => Transition::Accept,
                "resolve" => Transition::Resolve,
                "reopen" => Transition::Reopen,
                _ => match body_json::<TransferRequest>(ctx, body)? {
                    TransferRequest::ToAgent(a) => Transition::TransferToAgent(a),
                    TransferRequest::ToGroup(g) => Transition::TransferToGroup(g),
                },
            };
            let outcome = call_traced(ctx, (id >> 48) as u16, trace, |reply| Command::Transition {
                conv: id,
                tenant,
                agent: name,
                what,
                reply,
            })
            .await?;
            let Outcome::State(state) = outcome else {
                return Err(internal());
            };
            let state = state?;
            let body = format!(
                "{{\"conversation_id\":\"{}\",\"state\":\"{}\"}}",
                ConversationId(id),
                state.as_str()
            );
            write_json(out, 200, keep_alive, body.as_bytes());
            Ok(done)
        }
        (Method::Post, ["v1", "agents", "me", "status"]) => {
            let actor = authenticate(ctx, head)?;
            let Actor::Agent { tenant, name } = actor else {
                return Err(HttpError::new(403, "only agents have a status"));
            };
            let req: AgentStatusRequest = body_json(ctx, body)?;
            let online = req.status == AgentStatus::Online;
            // Every shard routes its own conversations: tell them all. Refused up front if
            // any is overloaded, so a status is not applied on some shards only (a push can
            // still fail past this check; the status is idempotent, so a retry mends that).
            let limit = ctx.shared.config.limits.overload_inflight_per_shard_max;
            if ctx.shared.inboxes.iter().any(|inbox| inbox.len() >= limit) {
                return Err(HttpError::new(
                    503,
                    "the gateway is overloaded; retry shortly",
                ));
            }
            let mut slots = Vec::with_capacity(ctx.shared.shards());
            for inbox in &ctx.shared.inboxes {
                let reply = ReplySlot::new();
                let cmd = Command::AgentStatus {
                    tenant,
                    agent: name.clone(),
                    online,
                    reply: Some(reply.clone()),
                };
                if inbox.push(cmd).is_err() {
                    return Err(HttpError::new(
                        503,
                        "the gateway is overloaded; retry shortly",
                    ));
                }
                slots.push(reply);
            }
            for slot in slots {
                if let Outcome::Done(Err(e)) = slot.wait().await {
                    return Err(e.into());
                }
            }
            let body = format!(
                "{{\"agent\":\"{}\",\"status\":\"{}\"}}",
                name,
                if online { "online" } else { "offline" }
            );
            write_json(out, 200, keep_alive, body.as_bytes());
            Ok(done)
        }
        (Method::Post, ["v1", "conversations", id, "attachments"]) => {
            let id = conversation_id(ctx, id)?;
            let actor = authenticate(ctx, head)?;
            upload(ctx, head, body, id, actor, keep_alive, out).await?;
            Ok(done)
        }
        (Method::Get, ["v1", "attachments", att]) => {
            let actor = authenticate(ctx, head)?;
            let att = (*att).to_owned();
            Ok(Next::Attachment {
                id: att,
                actor,
                keep_alive,
            })
        }
        (Method::Get, ["v1", "ws"]) => {
            let up = crate::ws::upgrade(ctx, head)?;
            Ok(Next::WebSocket(up))
        }
        (Method::Get, ["v1", "stream"]) => {
            let actor = authenticate(ctx, head)?;
            if !matches!(actor, Actor::Integration { .. }) {
                return Err(HttpError::new(
                    403,
                    "the firehose needs an integration token",
                ));
            }
            let registry = &ctx.shared.access.registry;
            if !registry.firehose_allowed(tenant_of(&actor)) {
                let why = "the firehose carries every tenant's records: one tenant only";
                return Err(HttpError::new(403, why));
            }
            let shard = query_u64(head, "shard")?.unwrap_or(0);
            if shard as usize >= ctx.shared.shards() {
                return Err(HttpError::new(404, format!("no shard {shard}")));
            }
            let from = query_u64(head, "from")?.unwrap_or(0);
            let follow = query_u64(head, "follow")?.unwrap_or(0) == 1;
            Ok(Next::Stream {
                shard: shard as u16,
                from,
                follow,
            })
        }
        // A known path with another method.
        (_, ["healthz" | "readyz" | "metrics"])
        | (_, ["v1", "conversations"])
        | (_, ["v1", "conversations", _])
        | (
            _,
            [
                "v1",
                "conversations",
                _,
                "messages" | "poll" | "attachments" | "accept" | "resolve" | "reopen" | "transfer",
            ],
        )
        | (_, ["v1", "attachments", _])
        | (_, ["v1", "ws" | "stream"])
        | (_, ["v1", "agents", "me", "status"]) => Err(HttpError::new(405, "method not allowed")),
        _ => Err(HttpError::new(404, "no such endpoint")),
    }
}

/// `POST /v1/conversations/{id}/messages` (`id`: the path segment).
async fn send_message(
    ctx: &ShardCtx,
    head: &RequestHead<'_>,
    id: &str,
    body: &[u8],
    keep_alive: bool,
    out: &mut Vec<u8>,
    trace: Option<&RefCell<RequestRecord>>,
) -> Result<(), HttpError> {
    let id = conversation_id(ctx, id)?;
    let actor = authenticate(ctx, head)?;
    check_body_len(ctx, body)?;
    let req: SendMessageRequestRef<'_> =
        parse_json_borrowed::<_, SendMessageRequest>(body, &model_limits(ctx))
            .map_err(|e| HttpError::new(400, e.to_string()))?;
    if let Some(rec) = trace {
        rec.borrow_mut().conversation_id = id;
    }
    // The strings go to the owning shard in a pooled buffer and come back with the answer.
    let body = crate::shard::SendBody::pooled(&req.text, req.client_msg_id.as_deref());
    let sent = crate::ws::send_message(ctx, id, &actor, body, trace).await?;
    let status = if sent.duplicate { 200 } else { 201 };
    write_sent(out, status, keep_alive, sent.seq, sent.ts);
    Ok(())
}

fn internal() -> HttpError {
    HttpError::new(500, "unexpected reply from the shard")
}

/// Checks that `actor` may see conversation `id` (through its owning shard).
async fn check_participant(ctx: &ShardCtx, id: u64, actor: Actor) -> Result<(), HttpError> {
    let outcome = call(ctx, (id >> 48) as u16, |reply| Command::View {
        conv: id,
        actor,
        reply,
    })
    .await?;
    match outcome {
        Outcome::View(v) => v.map(|_| ()).map_err(HttpError::from),
        _ => Err(internal()),
    }
}

fn tenant_of(actor: &Actor) -> u16 {
    match actor {
        Actor::Visitor { tenant, .. }
        | Actor::Agent { tenant, .. }
        | Actor::Integration { tenant } => *tenant,
    }
}

/// `POST /v1/conversations/{id}/attachments`: the raw body, stored by `attachments` (size
/// limit 413, type allow-list 415, fsync before the 201).
async fn upload(
    ctx: &Rc<ShardCtx>,
    head: &RequestHead<'_>,
    body: &[u8],
    id: u64,
    actor: Actor,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Result<(), HttpError> {
    let tenant = tenant_of(&actor);
    check_participant(ctx, id, actor).await?;
    let content_type = head
        .header_str("content-type")
        .ok_or_else(|| HttpError::new(415, "Content-Type is required"))?;
    let name = ctx.shared.access.tenant_name(tenant);
    let limits = &ctx.shared.access.registry.tenants()[tenant as usize]
        .config
        .attachments;
    let store = &ctx.shared.attachments;
    let err =
        |e: crate::attachments::AttachmentError| HttpError::new(e.http_status(), e.to_string());
    // Checks, the temp file's creation: short. The write and the fsyncs run on the upload
    // writer's thread while this shard serves on.
    let upload = store
        .begin(name, id, content_type, Some(body.len() as u64), limits)
        .map_err(err)?;
    let reply = crate::shard::ReplySlot::new();
    let job = Box::new(crate::attachments::UploadJob {
        upload,
        body: body.to_vec(),
        reply: reply.clone(),
    });
    if ctx.shared.uploads.submit(job).is_err() {
        // The upload dropped with the job removes its temp file.
        return Err(HttpError::new(
            503,
            "too many uploads in progress; retry shortly",
        ));
    }
    let meta = reply.wait().await.map_err(err)?;
    let json = kefu_protocol::model::AttachmentResponse {
        attachment_id: meta.id,
        size: meta.size,
    };
    write_json(out, 201, keep_alive, &json.to_json_vec());
    Ok(())
}

/// `GET /v1/attachments/{id}`: the bytes with `sendfile` on plain connections.
async fn download(
    ctx: &Rc<ShardCtx>,
    conn: &mut Conn,
    id: &str,
    actor: &Actor,
    keep_alive: bool,
) -> Result<std::io::Result<()>, HttpError> {
    let tenant = tenant_of(actor);
    let name = ctx.shared.access.tenant_name(tenant);
    let (meta, file) = ctx
        .shared
        .attachments
        .open_for_download(name, id)
        .map_err(|e| HttpError::new(e.http_status(), e.to_string()))?;
    check_participant(ctx, meta.conversation, actor.clone()).await?;
    let mut out = Vec::with_capacity(256);
    let head = ResponseHead::new(200)
        .content_type(&meta.content_type)
        .keep_alive(keep_alive);
    kefu_protocol::http::write_response_head(&mut out, &head, meta.size);
    // From the head on, a failure can only end the connection: an error answer would land
    // in the middle of this one.
    let (res, _) = conn.write_all(out).await;
    if let Err(e) = res {
        return Ok(Err(e));
    }
    Ok(crate::stream::send_file(conn, &file, 0, meta.size).await)
}

/// Writes a history page, `{"messages":[...],"last_seq":N}`, into `page` (cleared first):
/// nothing allocated beyond the buffer's growth.
pub fn write_page<'a>(page: &mut Vec<u8>, entries: impl Iterator<Item = &'a [u8]>, last_seq: u64) {
    use std::io::Write as _;
    page.clear();
    page.extend_from_slice(b"{\"messages\":[");
    for (i, e) in entries.enumerate() {
        if i > 0 {
            page.push(b',');
        }
        page.extend_from_slice(e);
    }
    // Writing into a Vec cannot fail.
    let _ = write!(page, "],\"last_seq\":{last_seq}}}");
}

#[allow(clippy::too_many_arguments)]
async fn create(
    ctx: &Rc<ShardCtx>,
    head: &RequestHead<'_>,
    body: &[u8],
    keep_alive: bool,
    peer: Peer,
    out: &mut Vec<u8>,
    trace: Option<&RefCell<RequestRecord>>,
) -> Result<(), HttpError> {
    // Anyone may start a conversation, and each one is kept: starts are limited per peer
    // address (before the body is even parsed), so one client cannot fill the conversation
    // table.
    if (!peer.loopback || ctx.shared.config.limits.ip_limits_include_loopback)
        && let Some(limiter) = ctx.create_limiter.borrow_mut().as_mut()
        && let Err(limited) = limiter.check(peer.ip, crate::shard::now_ms())
    {
        let mut e = HttpError::new(
            429,
            format!(
                "too many conversations started from this address: {limited} \
                 (limits.conversation_creates_per_ip_per_s)"
            ),
        );
        e.retry_after_s = limited.retry_after_s().min(u64::from(u32::MAX)) as u32;
        return Err(e);
    }
    let req: CreateConversationRequest = body_json(ctx, body)?;
    // Tenant: the `Kefu-Tenant` header or `?tenant=`, else the first configured tenant.
    let tenant_name = head
        .header_str("kefu-tenant")
        .map(std::borrow::Cow::Borrowed)
        .or_else(|| {
            head.query
                .and_then(|q| query_get(q, "tenant"))
                .and_then(Result::ok)
        });
    let tenant = match tenant_name {
        None => 0,
        Some(name) => ctx
            .shared
            .config
            .tenants
            .iter()
            .position(|t| t.name == *name)
            .ok_or_else(|| HttpError::new(404, format!("no tenant {name:?}")))?
            as u16,
    };
    // A new conversation lives on the shard that accepted the connection (no hop), unless its
    // tenant routes on one shard.
    let registry = &ctx.shared.access.registry;
    let shard = registry
        .home_shard(tenant, ctx.shared.shards())
        .unwrap_or(ctx.id);
    let outcome = call_traced(ctx, shard, trace, |reply| Command::Create {
        tenant,
        visitor_name: req.visitor.name,
        channel: req.channel,
        text: req.text,
        group: req.group,
        reply,
    })
    .await?;
    let Outcome::Created(created) = outcome else {
        return Err(internal());
    };
    let created = created?;
    let body = CreateConversationResponse {
        conversation_id: ConversationId(created.conversation_id),
        visitor_token: ctx
            .shared
            .access
            .issue_visitor_token(tenant, created.conversation_id),
        state: created.state,
        group: created.group,
        queue_position: created.queue_position,
    };
    write_json(out, 201, keep_alive, &body.to_json_vec());
    Ok(())
}

/// Moves the stored records a long-poll's outbox holds into its page, in seq order, and returns
/// the page's `last_seq` (starting from `last_seq`, the conversation's last seq when the poll
/// registered). Typing and read notices (seq 0) are not part of a page. The page stops at the
/// first missing seq: a record the full queue dropped while the poll was draining it must not
/// be skipped by a `last_seq` past it; the next poll reads it from the log.
fn drain_page(
    outbox: &Outbox,
    after: u64,
    mut last_seq: u64,
    entries: &mut Vec<Arc<Delivery>>,
) -> u64 {
    while let Some(d) = outbox.pop() {
        if d.seq == 0 {
            continue;
        }
        if d.seq != last_seq + 1 {
            break;
        }
        last_seq = d.seq;
        if d.seq > after {
            entries.push(d);
        }
    }
    last_seq
}

/// Deliveries a waiting long-poll can take before its queue is full. A poll answers at its
/// first delivery, so only what arrives until its task runs lands here; anything beyond is
/// dropped from this queue, not lost: the page's `last_seq` stops before it, and the next poll
/// (`after = last_seq`) reads it from the log. A full `subscriber_queue_depth` queue (16 KiB at
/// the default 1,024) made each waiting poll cost 12 KiB of memory.
const LONG_POLL_QUEUE_DEPTH: usize = 64;

/// Long-poll outboxes a thread keeps for reuse.
const POLL_OUTBOXES_MAX: usize = 256;

/// Kept outboxes a new long-poll looks at for one it may reuse, oldest first.
const POLL_OUTBOXES_SCANNED_MAX: usize = 8;

thread_local! {
    /// Lists for the pages of waiting long-polls (bounded like the other scratch lists).
    static PAGE_ENTRIES: RefCell<Vec<Vec<Arc<Delivery>>>> = const { RefCell::new(Vec::new()) };
    /// Outboxes of finished long-polls. The engine lets go of a closed one at its
    /// conversation's next delivery or registration (usually the same client's next poll), so
    /// the oldest are the first free again; one still held is skipped.
    static POLL_OUTBOXES: RefCell<VecDeque<Arc<Outbox>>> = const { RefCell::new(VecDeque::new()) };
}

/// An outbox for a long-poll: a kept one nobody else holds any more, else a new one.
fn poll_outbox(returns: &[Arc<crate::engine::DeliveryReturns>], depth: usize) -> Arc<Outbox> {
    POLL_OUTBOXES.with(|kept| {
        let mut kept = kept.borrow_mut();
        let scanned = kept.len().min(POLL_OUTBOXES_SCANNED_MAX);
        for i in 0..scanned {
            if let Some(o) = Arc::get_mut(&mut kept[i])
                && o.capacity() == depth
            {
                o.clear_for_reuse(returns);
                return kept.remove(i).expect("index below the length");
            }
        }
        Outbox::new(depth)
    })
}

/// Keeps a finished long-poll's outbox for reuse (closed already); a full list lets its
/// oldest go.
fn keep_poll_outbox(outbox: Arc<Outbox>) {
    POLL_OUTBOXES.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() >= POLL_OUTBOXES_MAX {
            kept.pop_front();
        }
        kept.push_back(outbox);
    });
}

async fn long_poll(
    ctx: &Rc<ShardCtx>,
    head: &RequestHead<'_>,
    id: u64,
    actor: Actor,
    keep_alive: bool,
    out: &mut Vec<u8>,
    conn_id: u64,
) -> Result<(), HttpError> {
    let after = query_u64(head, "after")?.unwrap_or(0);
    let limits = &ctx.shared.config.limits;
    let timeout_ms = query_u64(head, "timeout_ms")?
        .unwrap_or(limits.long_poll_timeout_ms_max)
        .min(limits.long_poll_timeout_ms_max);
    let outbox = poll_outbox(
        &ctx.shared.delivery_returns,
        limits.subscriber_queue_depth.min(LONG_POLL_QUEUE_DEPTH),
    );
    let outcome = call(ctx, (id >> 48) as u16, |reply| Command::Replay {
        conv: id,
        actor,
        after,
        limit: limits.history_limit_max,
        subscriber: Some(outbox.clone()),
        reply,
    })
    .await?;
    let Outcome::Replay(replay) = outcome else {
        return Err(internal());
    };
    let replay = replay?;
    let mut entries = replay.entries;
    if entries.capacity() == 0 {
        // A waiting poll: its page comes from this thread's pool, not a new list.
        entries = crate::shard::take_vec(&PAGE_ENTRIES);
    }
    let mut last_seq = replay.last_seq;
    if entries.is_empty() && replay.registered {
        let deadline = Duration::from_millis(timeout_ms);
        monoio::select! {
            _ = outbox.ready() => {}
            _ = monoio::time::sleep(deadline) => {}
            _ = ctx.stopped(conn_id) => {}
        }
        last_seq = drain_page(&outbox, after, last_seq, &mut entries);
    }
    outbox.close();
    keep_poll_outbox(outbox);
    let mut page = ctx.pool.take();
    write_page(&mut page, entries.iter().map(|d| &*d.json), last_seq);
    write_json(out, 200, keep_alive, &page);
    ctx.pool.give(page);
    for d in entries.drain(..) {
        crate::engine::give_back_delivery(&ctx.shared.delivery_returns, d);
    }
    crate::shard::give_vec(&PAGE_ENTRIES, entries);
    Ok(())
}

async fn metrics_text(ctx: &Rc<ShardCtx>) -> Result<String, HttpError> {
    let mut text = String::from(
        "# HELP kefu_latency_us Per-stage latency in microseconds (hdrhistogram quantiles).\n\
         # TYPE kefu_latency_us summary\n\
         # HELP kefu_connections_open Open client connections.\n\
         # TYPE kefu_connections_open gauge\n\
         # HELP kefu_connections_migrated_total Keep-alive HTTP connections moved to the shard of their conversation (in: taken over, out: given away).\n\
         # TYPE kefu_connections_migrated_total counter\n\
         # HELP kefu_messages_in_total Messages stored.\n\
         # TYPE kefu_messages_in_total counter\n\
         # HELP kefu_messages_out_total Deliveries written to sockets.\n\
         # TYPE kefu_messages_out_total counter\n\
         # HELP kefu_disconnects_total Connections ended, by reason.\n\
         # TYPE kefu_disconnects_total counter\n\
         # HELP kefu_doorbell_rings_total Doorbell bytes written to the shard: cross-shard wake-ups, coalesced.\n\
         # TYPE kefu_doorbell_rings_total counter\n\
         # HELP kefu_doorbell_overflows_total Cross-shard wake-ups that found the shard's doorbell queue full.\n\
         # TYPE kefu_doorbell_overflows_total counter\n",
    );
    for (shard, inbox) in ctx.shared.inboxes.iter().enumerate() {
        text.push_str(&format!(
            "kefu_inbox_depth{{shard=\"{shard}\"}} {}\n",
            inbox.len()
        ));
    }
    for shard in 0..ctx.shared.shards() {
        if let Outcome::Text(t) =
            call(ctx, shard as u16, |reply| Command::Metrics { reply }).await?
        {
            text.push_str(&t);
        }
    }
    // Connection-level series live on the shard whose thread serves the connection: the
    // engine shard renders only its own cells, so connections are counted where they live.
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(seq: u64) -> Arc<Delivery> {
        Arc::new(Delivery {
            seq,
            ..Delivery::default()
        })
    }

    /// A finished long-poll's outbox is reused once nobody else holds it (the engine drops a
    /// closed one at its conversation's next delivery), cleared: open, empty, not overflowed.
    #[test]
    fn long_poll_outboxes_are_reused_once_the_engine_lets_go() {
        let first = poll_outbox(&[], 4);
        let engine_holds = first.clone();
        first.push(delivery(7));
        first.close();
        let first_at = Arc::as_ptr(&first);
        keep_poll_outbox(first);
        let second = poll_outbox(&[], 4);
        assert!(
            !Arc::ptr_eq(&second, &engine_holds),
            "still held: not reused"
        );
        assert_eq!(
            poll_outbox(&[], 8).capacity(),
            8,
            "another depth: a new one"
        );
        drop(engine_holds);
        let third = poll_outbox(&[], 4);
        assert_eq!(third.capacity(), 4);
        assert!(!third.is_closed() && !third.is_overflowed() && third.is_empty());
        assert_eq!(Arc::as_ptr(&third), first_at, "the first one, reused");
        assert!(POLL_OUTBOXES.with(|k| k.borrow().is_empty()));
        keep_poll_outbox(second);
        keep_poll_outbox(third);
        for _ in 0..POLL_OUTBOXES_MAX + 10 {
            keep_poll_outbox(Outbox::new(1));
        }
        assert_eq!(POLL_OUTBOXES.with(|k| k.borrow().len()), POLL_OUTBOXES_MAX);
    }

    /// A long-poll page is a run of consecutive seqs: a record its full queue dropped (65,
    /// while 66 found room after the drain began) ends the page before it.
    #[test]
    fn a_page_is_written_into_a_reused_buffer() {
        let mut page = b"left over from the last request".to_vec();
        write_page(&mut page, [&b"{\"a\":1}"[..], b"{\"b\":2}"].into_iter(), 42);
        assert_eq!(page, br#"{"messages":[{"a":1},{"b":2}],"last_seq":42}"#);
        write_page(&mut page, std::iter::empty(), u64::MAX);
        assert_eq!(page, br#"{"messages":[],"last_seq":18446744073709551615}"#);
    }

    #[test]
    fn a_long_poll_page_stops_at_a_dropped_record() {
        let outbox = Outbox::new(LONG_POLL_QUEUE_DEPTH);
        let mut entries = Vec::new();
        for seq in 1..=64 {
            outbox.push(delivery(seq));
        }
        outbox.push(delivery(65));
        assert!(outbox.is_overflowed());
        let first = outbox.pop().unwrap();
        outbox.push(delivery(66));
        entries.push(first);
        let last = drain_page(&outbox, 0, 1, &mut entries);
        assert_eq!(last, 64);
        let seqs: Vec<u64> = entries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, (1..=64).collect::<Vec<_>>());
        // Typing notices (seq 0) are skipped; records up to `after` count for the run but are
        // not in the page.
        let outbox = Outbox::new(8);
        for seq in [0, 5, 0, 6, 7] {
            outbox.push(delivery(seq));
        }
        let mut entries = Vec::new();
        assert_eq!(drain_page(&outbox, 5, 4, &mut entries), 7);
        let seqs: Vec<u64> = entries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [6, 7]);
    }

    /// The send's answer is what the generic writer makes of the same head and body.
    #[test]
    fn sent_answers_match_the_generic_writer() {
        for status in [200, 201, 202] {
            for keep_alive in [true, false] {
                for (seq, ts) in [(1, 0), (u64::MAX, u64::MAX), (42, 1_700_000_000_000_000)] {
                    let mut got = Vec::new();
                    write_sent(&mut got, status, keep_alive, seq, ts);
                    let mut want = Vec::new();
                    write_json(
                        &mut want,
                        status,
                        keep_alive,
                        &kefu_protocol::model::SendMessageResponse { seq, ts }.to_json_vec(),
                    );
                    assert_eq!(
                        String::from_utf8(got).unwrap(),
                        String::from_utf8(want).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn path_segments_match_a_full_split() {
        for path in [
            "/",
            "",
            "/v1",
            "/v1/conversations/c1/messages",
            "//a//b/",
            "/a/b/c/d/e/f",
        ] {
            let all: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let mut segments = [""; PATH_SEGMENTS_MAX + 1];
            let n = path_segments(path, &mut segments);
            if all.len() <= PATH_SEGMENTS_MAX {
                assert_eq!(&segments[..n], &all[..], "{path:?}");
            } else {
                // Longer than any route either way.
                assert_eq!(n, PATH_SEGMENTS_MAX + 1, "{path:?}");
                assert_eq!(&segments[..n], &all[..n], "{path:?}");
            }
        }
    }
}
