//! End-to-end tests: the real `kefu` binary on port 0 with a temporary data dir, driven over real sockets by the blocking clients of the `kefu-tests` crate.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kefu_protocol::binproto::ClientMsg;
use kefu_protocol::frame;
use kefu_protocol::model::ConversationId;
use kefu_tests::{Bin, BinMsg, Http, Kefu, SIGKILL, SIGTERM, Ws, WsMsg, create_conversation};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_kefu");

/// Writes the default config with small segments (tests start many gateways) and the given
/// replacements, and returns its path.
fn config(dir: &Path, replace: &[(&str, &str)]) -> String {
    // The embedded default with its demo tenant written out (`kefu --print-default-config`).
    let mut text = kefu_gateway::config::default_config_text().replace(
        "segment_bytes_max = 67108864",
        "segment_bytes_max = 4194304",
    );
    for (from, to) in replace {
        assert!(text.contains(from), "config has no {from:?}");
        text = text.replace(from, to);
    }
    // The demo tenant with a rate limit the load of these tests stays under.
    text = text.replacen(
        "name = \"demo\"",
        "name = \"demo\"\nvisitor_rate_limit = { messages_per_s = 10000, burst = 10000 }",
        1,
    );
    let path = dir.join("kefu.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The conversation's last stored seq, as its visitor sees it.
fn last_seq(http: &mut Http, id: &str, token: &str) -> u64 {
    http.get(&format!("/v1/conversations/{id}/messages"), Some(token))
        .json()["last_seq"]
        .as_u64()
        .unwrap()
}

fn start(dir: &tempfile::TempDir, shards: &str, durability: &str) -> Kefu {
    start_with(dir, shards, durability, &[])
}

/// [`start`] with lines of the default config replaced.
fn start_with(
    dir: &tempfile::TempDir,
    shards: &str,
    durability: &str,
    replace: &[(&str, &str)],
) -> Kefu {
    let cfg = config(dir.path(), replace);
    let data = dir.path().join("data");
    Kefu::start(
        Path::new(BIN),
        &data,
        &[
            "--config",
            &cfg,
            "--shards",
            shards,
            "--durability",
            durability,
        ],
    )
}

#[test]
fn ready_line_demo_tokens_health_and_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The embedded default config, as `cargo run` starts it.
    let mut kefu = Kefu::start(Path::new(BIN), &data, &["--shards", "1"]);
    assert!(kefu.ready_line.contains("shards=1"), "{}", kefu.ready_line);
    assert!(
        kefu.ready_line
            .contains(&format!("data={}", data.display()))
    );
    assert_ne!(kefu.http.port(), 0);
    assert_ne!(kefu.tcp.port(), 0);
    assert!(kefu.agents.len() >= 2, "{:?}", kefu.lines);
    let groups: HashSet<&str> = kefu
        .lines
        .iter()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("groups=")))
        .flat_map(|g| g.split(','))
        .collect();
    assert!(
        groups.contains("sales") && groups.contains("support"),
        "{groups:?}"
    );
    assert!(kefu.integration.is_some());
    let mut http = kefu.http();
    assert_eq!(http.get("/healthz", None).status, 200);
    assert_eq!(http.get("/readyz", None).status, 200);
    let metrics = http.get("/metrics", None);
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("kefu_messages_in_total{shard=\"0\"}"),
        "{text}"
    );
    assert!(text.contains("kefu_latency_us{shard=\"0\",stage=\"log_sync\""));
    let tokens = kefu.agents.clone();
    // An open WebSocket is told the server is going away (1001) when it drains.
    let alice = kefu.agent("alice").to_owned();
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={alice}")).expect("upgrade");
    ws.send_json(&json!({"type": "hello"}));
    assert!(matches!(ws.recv(), WsMsg::Text(_)));
    drop(http);
    let pid = kefu.pid();
    let closer = std::thread::spawn(move || ws.recv());
    let status = kefu.signal_and_wait(SIGTERM);
    assert!(status.success(), "SIGTERM exit of {pid}: {status:?}");
    assert_eq!(closer.join().unwrap(), WsMsg::Close(Some(1001)));
    // Same tokens after a restart: they live in the data dir.
    let kefu = Kefu::start(Path::new(BIN), &data, &["--shards", "1"]);
    assert_eq!(kefu.agents, tokens);
}

#[test]
fn bad_flags_and_config_exit_2_with_one_line() {
    let out = std::process::Command::new(BIN)
        .args(["--durability", "sometimes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--durability"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[("idle_timeout_ms", "idle_timeout_secs")]);
    let out = std::process::Command::new(BIN)
        .args(["--config", &cfg])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("idle_timeout_secs"), "{err}");
}

/// SO_REUSEPORT would let a second gateway join the first one's port and take half its
/// connections; it must refuse to start instead. A stopped gateway's port is free again at
/// once, even with its closed connections in TIME_WAIT.
#[test]
fn a_second_gateway_on_a_taken_port_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start(&dir, "2", "always");
    let mut http = first.http();
    let (id, token) = create_conversation(&mut http, Some("before"));
    let seq = last_seq(&mut http, &id, &token);
    for (flag, addr) in [("--http", first.http), ("--tcp", first.tcp)] {
        let mut second = std::process::Command::new(BIN)
            .args(["--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
            .args([flag, &addr.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join(format!("second{flag}")))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while second.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = second.kill();
                let _ = second.wait();
                panic!("a second gateway started on {addr}, which the first one holds");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = second.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{addr} is already in use")), "{err}");
    }
    // The first one still has every connection: a fresh one finds the conversation.
    for _ in 0..8 {
        let mut fresh = first.http();
        assert_eq!(last_seq(&mut fresh, &id, &token), seq);
    }
    let http_addr = first.http.to_string();
    drop(http);
    assert_eq!(first.signal_and_wait(SIGTERM).code(), Some(0));
    let cfg = config(dir.path(), &[]);
    let again = Kefu::start(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--http", &http_addr],
    );
    assert_eq!(again.http.to_string(), http_addr);
    assert_eq!(last_seq(&mut again.http(), &id, &token), seq);
}

/// Pinned shards keep their io_uring workers (the kernel threads that run the fsyncs) off
/// their single CPU: within a second of appearing, a worker may use every CPU the process
/// may.
#[test]
fn pinned_shards_widen_their_io_uring_workers() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("one CPU: pinning and widening are the same set here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, token) = create_conversation(&mut http, None);
    for i in 0..20 {
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&token),
            &json!({ "text": format!("m{i}") }).to_string(),
        );
        assert_eq!(r.status, 201);
    }
    let allowed = |tid: &str| -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", kefu.pid()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let process = allowed(&kefu.pid().to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    loop {
        let workers: Vec<(String, String)> =
            std::fs::read_dir(format!("/proc/{}/task", kefu.pid()))
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    let tid = e.file_name().to_str()?.to_owned();
                    let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                    comm.starts_with("iou-wrk-")
                        .then(|| (comm.trim_end().to_owned(), allowed(&tid)))
                })
                .collect();
        if !workers.is_empty() && workers.iter().all(|(_, cpus)| *cpus == process) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "io_uring workers {workers:?}, process cpus {process}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn conversation_flow_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("my package never arrived"));
    let view = http.get(&format!("/v1/conversations/{id}"), Some(&visitor));
    assert_eq!(view.status, 200);
    assert_eq!(view.json()["state"], "queued");
    assert_eq!(view.json()["group"], "support");

    let path = format!("/v1/conversations/{id}/messages");
    let body = json!({"text": "hello?", "client_msg_id": "m-1"}).to_string();
    let first = http.post(&path, Some(&visitor), &body);
    assert_eq!(first.status, 201);
    let retry = http.post(&path, Some(&visitor), &body);
    assert_eq!(retry.status, 200, "an idempotent retry answers 200");
    assert_eq!(retry.json()["seq"], first.json()["seq"]);
    let history = http.get(&format!("{path}?after=0"), Some(&visitor)).json();
    let seqs: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "dense seqs"
    );
    let hello = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["text"] == "hello?")
        .count();
    assert_eq!(hello, 1, "the retry stored nothing new");

    // An agent of the group accepts and answers; the visitor sees it.
    let bob = kefu.agent("bob").to_owned();
    let accept = http.post(&format!("/v1/conversations/{id}/accept"), Some(&bob), "");
    assert_eq!(
        accept.status,
        200,
        "{}",
        String::from_utf8_lossy(&accept.body)
    );
    assert_eq!(accept.json()["state"], "assigned");
    let again = http.post(&format!("/v1/conversations/{id}/accept"), Some(&bob), "");
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["state"], "assigned");
    let reply = http.post(&path, Some(&bob), &json!({"text": "on it"}).to_string());
    assert_eq!(reply.status, 201);
    let seen = http.get(&format!("{path}?after=0"), Some(&visitor)).json();
    assert!(
        seen["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"] == "on it" && m["from"]["role"] == "agent")
    );
    // Resolve, then the visitor writes again: reopened.
    let resolve = http.post(&format!("/v1/conversations/{id}/resolve"), Some(&bob), "");
    assert_eq!(resolve.json()["state"], "resolved");
    let resolve_again = http.post(&format!("/v1/conversations/{id}/resolve"), Some(&bob), "");
    assert_eq!(resolve_again.status, 409);
    assert_eq!(resolve_again.json()["state"], "resolved");
    let back = http.post(
        &path,
        Some(&visitor),
        &json!({"text": "one more"}).to_string(),
    );
    assert_eq!(back.status, 201);
    let events = http.get(&format!("{path}?after=0"), Some(&visitor)).json();
    assert!(
        events["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["event"] == "reopened")
    );
    // Agent offline re-queues; the status endpoint answers.
    let status = http.post(
        "/v1/agents/me/status",
        Some(&bob),
        &json!({"status": "online"}).to_string(),
    );
    assert_eq!(status.status, 200);
}

#[test]
fn websocket_resumes_after_n_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let path = format!("/v1/conversations/{id}/messages");
    for i in 0..6 {
        let r = http.post(
            &path,
            Some(&visitor),
            &json!({"text": format!("m{i}")}).to_string(),
        );
        assert_eq!(r.status, 201);
    }
    let first_last = http.get(&format!("{path}?after=0"), Some(&visitor)).json()["last_seq"]
        .as_u64()
        .unwrap();
    let after = 3;
    // Several sockets, so at least one likely lands on the shard that does not own it.
    for round in 0..3u64 {
        // Each round also replays the live messages of the rounds before.
        let last = first_last + round;
        let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
        ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": after}));
        for want in after + 1..=last {
            match ws.recv_stored() {
                WsMsg::Text(v) => assert_eq!(v["seq"].as_u64(), Some(want), "round {round}: {v}"),
                other => panic!("round {round}: {other:?}"),
            }
        }
        // Live: a send over WebSocket is acked, and arrives as the next seq.
        ws.send_json(&json!({"type": "send", "conversation_id": id, "text": "live", "client_msg_id": format!("live-{round}")}));
        let mut got_ack = false;
        let mut got_live = false;
        while !(got_ack && got_live) {
            match ws.recv_stored() {
                WsMsg::Text(v) if v["type"] == "ack" => {
                    assert_eq!(v["seq"].as_u64(), Some(last + 1));
                    got_ack = true;
                }
                WsMsg::Text(v) if v["type"] == "message" => {
                    assert_eq!(v["seq"].as_u64(), Some(last + 1), "{v}");
                    assert_eq!(v["text"], "live");
                    got_live = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn long_poll_returns_when_a_message_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hi"));
    let last = last_seq(&mut http, &id, &visitor);
    // Empty at the timeout.
    let empty = http.get(
        &format!("/v1/conversations/{id}/poll?after={last}&timeout_ms=200"),
        Some(&visitor),
    );
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json()["messages"].as_array().unwrap().len(), 0);
    let addr = kefu.http;
    let (id2, visitor2) = (id.clone(), visitor.clone());
    let poller = std::thread::spawn(move || {
        let mut http = Http::connect(addr);
        http.get(
            &format!("/v1/conversations/{id2}/poll?after={last}&timeout_ms=15000"),
            Some(&visitor2),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let sent = http.post(
        &format!("/v1/conversations/{id}/messages"),
        Some(&visitor),
        &json!({"text": "wake up"}).to_string(),
    );
    assert_eq!(sent.status, 201);
    let page = poller.join().unwrap().json();
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{page}");
    assert_eq!(messages[0]["text"], "wake up");
    assert_eq!(messages[0]["seq"].as_u64(), Some(last + 1));
}

#[test]
fn bad_input_gets_documented_errors_and_the_gateway_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "never");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hello"));
    let (other, _) = create_conversation(&mut http, Some("hello"));
    let msgs = format!("/v1/conversations/{id}/messages");
    let body = json!({"text": "x"}).to_string();
    assert_eq!(http.post(&msgs, None, &body).status, 401);
    assert_eq!(
        http.post(&msgs, Some("nope-not-a-token"), &body).status,
        401
    );
    assert_eq!(
        http.get(&format!("/v1/conversations/{other}"), Some(&visitor))
            .status,
        403
    );
    assert_eq!(
        http.get("/v1/conversations/c00000000000fffff", Some(&visitor))
            .status,
        404
    );
    assert_eq!(http.get("/v1/nothing", None).status, 404);
    // A known path with a method it does not take: 405, not 404.
    for path in ["accept", "attachments", "transfer"] {
        let r = http.get(&format!("/v1/conversations/{id}/{path}"), Some(&visitor));
        assert_eq!(r.status, 405, "GET {path}");
    }
    assert_eq!(
        http.post(&format!("/v1/conversations/{id}/poll"), Some(&visitor), "")
            .status,
        405
    );
    assert_eq!(http.post("/v1/ws", None, "").status, 405);
    let carol = kefu.agent("carol").to_owned();
    let r = http.post(&format!("/v1/conversations/{id}/resolve"), Some(&carol), "");
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["state"], "queued");
    let bad_json = http.post(&msgs, Some(&visitor), "{\"text\": ");
    assert_eq!(bad_json.status, 400);
    assert!(bad_json.json()["error"].is_string());
    let unknown_field = http.post(&msgs, Some(&visitor), r#"{"text":"a","bogus":1}"#);
    assert_eq!(unknown_field.status, 400);
    // Size limits: each on its own connection (the server closes after them).
    let mut big = Http::connect(kefu.http);
    let huge = "x".repeat(70_000);
    let r = big.post(&msgs, Some(&visitor), &json!({"text": huge}).to_string());
    assert_eq!(r.status, 413);
    let mut long_header = Http::connect(kefu.http);
    long_header.send_raw(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: k\r\nX-Big: {}\r\n\r\n",
            "y".repeat(9000)
        )
        .as_bytes(),
    );
    assert_eq!(long_header.read_response().status, 431);
    let mut long_uri = Http::connect(kefu.http);
    long_uri.send_raw(format!("GET /{} HTTP/1.1\r\nHost: k\r\n\r\n", "z".repeat(3000)).as_bytes());
    assert_eq!(long_uri.read_response().status, 414);
    let mut garbage = Http::connect(kefu.http);
    garbage.send_raw(b"HELLO\x00\x01 what\r\n\r\n");
    assert_eq!(garbage.read_response().status, 400);
    assert!(garbage.is_closed());
    // WebSocket: a bad handshake is an HTTP error; a bad token closes with 4001; another
    // conversation with 4003; an oversized frame with 1009.
    let mut bad_ws = Http::connect(kefu.http);
    bad_ws.send_raw(
        b"GET /v1/ws HTTP/1.1\r\nHost: k\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    // Missing Sec-WebSocket-Key and version: 400 or 426 (Upgrade Required, names the version).
    let status = bad_ws.read_response().status;
    assert!(status == 400 || status == 426, "{status}");
    let mut ws = Ws::connect(kefu.http, "/v1/ws?token=wrong").expect("upgrade");
    assert_eq!(ws.recv(), WsMsg::Close(Some(4001)));
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_json(&json!({"type": "subscribe", "conversation_id": other, "after": 0}));
    assert_eq!(ws.recv(), WsMsg::Close(Some(4003)));
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_json(&json!({"type": "nonsense"}));
    match ws.recv() {
        WsMsg::Text(v) => assert_eq!(v["type"], "error"),
        other => panic!("{other:?}"),
    }
    // A masked text frame header announcing 1 MiB (over ws_frame_bytes_max).
    let mut frame_header = vec![0x81u8, 0x80 | 127];
    frame_header.extend_from_slice(&(1u64 << 20).to_be_bytes());
    frame_header.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&frame_header);
    assert_eq!(ws.recv(), WsMsg::Close(Some(1009)));
    // Everyone else is still served.
    let mut fresh = kefu.http();
    assert_eq!(fresh.get("/healthz", None).status, 200);
    assert_eq!(http.post(&msgs, Some(&visitor), &body).status, 201);
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    // Pipelined group commit (the default is one sync at a time, which the other tests use):
    // replies released in log order must still mean durable.
    sigkill_under_load(&[("syncs_in_flight_max = 1 ", "syncs_in_flight_max = 4 ")]);
}

#[test]
fn sigkill_under_load_with_syncs_on_the_shard_thread_loses_no_acknowledged_message() {
    // `sync = "inline"`: the shard thread runs fdatasync itself between rounds; and shards
    // not pinned.
    sigkill_under_load(&[
        ("sync = \"ring\" ", "sync = \"inline\" "),
        ("pin_threads = true", "pin_threads = false"),
    ]);
}

#[test]
fn sigkill_under_load_on_the_legacy_driver_loses_no_acknowledged_message() {
    // `driver = "legacy"`: epoll, and each group commit's sync on the shard's flusher thread.
    sigkill_under_load(&[("driver = \"auto\"", "driver = \"legacy\"")]);
}

/// Keep-alive connections whose sends go to a conversation of the other shard move there
/// (`server.migrate_connections`): afterwards no test connection is left on shard 1, every
/// send was answered on the same TCP connection, and the conversation holds every message once,
/// in order. With the io_uring driver and with the legacy epoll one.
#[test]
fn keep_alive_connections_move_to_their_conversations_shard() {
    for driver in ["auto", "legacy"] {
        let dir = tempfile::tempdir().unwrap();
        let kefu = start_with(
            &dir,
            "2",
            "always",
            &[("driver = \"auto\"", &format!("driver = \"{driver}\""))],
        );
        let mut setup = kefu.http();
        // The demo tenant routes on one shard: its conversations open on shard 0.
        let (id, token) = create_conversation(&mut setup, None);
        assert_eq!(frame::shard_of(ConversationId::parse(&id).unwrap().0), 0);
        let base = last_seq(&mut setup, &id, &token);
        drop(setup);
        const CONNECTIONS: usize = 16;
        const ROUNDS: usize = 4;
        let mut conns: Vec<Http> = (0..CONNECTIONS).map(|_| kefu.http()).collect();
        let mut seqs = Vec::new();
        for round in 0..ROUNDS {
            for (c, http) in conns.iter_mut().enumerate() {
                let body = json!({ "text": format!("r{round} c{c}") }).to_string();
                let r = http.post(
                    &format!("/v1/conversations/{id}/messages"),
                    Some(&token),
                    &body,
                );
                assert_eq!(r.status, 201, "{driver}: round {round}, connection {c}");
                seqs.push(r.json()["seq"].as_u64().unwrap());
            }
        }
        // Each answer came on the connection it was sent on, and each connection still serves.
        for http in &mut conns {
            assert_eq!(last_seq(http, &id, &token), base + seqs.len() as u64);
        }
        assert_eq!(
            seqs,
            (base + 1..=base + seqs.len() as u64).collect::<Vec<_>>()
        );
        let text = String::from_utf8(kefu.http().get("/metrics", None).body).unwrap();
        let metric = |line: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{line} ")))
                .unwrap_or_else(|| panic!("no {line} in\n{text}"))
                .trim()
                .parse()
                .unwrap()
        };
        // Only the /metrics connection itself may be open on shard 1.
        assert!(
            metric("kefu_connections_open{shard=\"1\"}") <= 1,
            "{driver}: connections left on shard 1:\n{text}"
        );
        assert!(metric("kefu_connections_open{shard=\"0\"}") >= CONNECTIONS as u64);
        let moved = metric("kefu_connections_migrated_total{shard=\"0\",direction=\"in\"}");
        assert_eq!(
            moved,
            metric("kefu_connections_migrated_total{shard=\"1\",direction=\"out\"}")
        );
        assert_eq!(
            metric("kefu_connections_migrated_total{shard=\"1\",direction=\"in\"}"),
            0
        );
        // Every message is stored once, in order.
        let page = conns[0]
            .get(
                &format!("/v1/conversations/{id}/messages?after={base}&limit=100"),
                Some(&token),
            )
            .json();
        let stored: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(stored, seqs);
    }
}

/// Moving a connection loses no byte: pipelined sends (written in one go, so the next ones may
/// already wait in the socket while the connection moves) and a request split in two writes
/// with a pause between (a partial request buffered: the connection must not move then) are all
/// answered, in order, on the same connection.
#[test]
fn moving_connections_lose_no_pipelined_or_partial_request() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let (id, token) = create_conversation(&mut kefu.http(), None);
    let base = last_seq(&mut kefu.http(), &id, &token);
    let request = |text: &str| {
        let body = json!({ "text": text }).to_string();
        format!(
            "POST /v1/conversations/{id}/messages HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut seqs = Vec::new();
    let mut conns: Vec<Http> = (0..8).map(|_| kefu.http()).collect();
    for (c, http) in conns.iter_mut().enumerate() {
        // Two whole sends and half of a third in one write, the rest 50 ms later: after the
        // two, a connection of the other shard would move, but the half is buffered.
        let third = request(&format!("c{c} split"));
        let (a, b) = third.as_bytes().split_at(third.len() / 2);
        let mut first = format!(
            "{}{}",
            request(&format!("c{c} 1")),
            request(&format!("c{c} 2"))
        )
        .into_bytes();
        first.extend_from_slice(a);
        http.send_raw(&first);
        std::thread::sleep(Duration::from_millis(50));
        http.send_raw(b);
        // Then three pipelined sends, three times.
        for round in 0..4 {
            if round > 0 {
                let burst: String = (0..3)
                    .map(|i| request(&format!("c{c} r{round} {i}")))
                    .collect();
                http.send_raw(burst.as_bytes());
            }
            for _ in 0..3 {
                let r = http.read_response();
                assert_eq!(r.status, 201, "connection {c}, round {round}");
                seqs.push(r.json()["seq"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(
        seqs,
        (base + 1..=base + seqs.len() as u64).collect::<Vec<_>>(),
        "every send answered once, in order"
    );
    for http in &mut conns {
        assert_eq!(last_seq(http, &id, &token), base + seqs.len() as u64);
    }
}

/// Client connections stop where the open-file limit would leave the logs without
/// descriptors: under a limit of 104 with one shard (64 kept for the process and the shard)
/// 40 connections are served, the 41st is closed at once, sends on the open ones still sync,
/// and once some close, new ones are served again.
#[test]
fn the_open_file_limit_caps_connections_and_keeps_descriptors_for_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    let kefu = Kefu::start_limited(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--shards", "1"],
        Some(104),
    );
    let mut setup = kefu.http();
    let (id, token) = create_conversation(&mut setup, None);
    drop(setup);
    // Let the setup connection's close be counted.
    std::thread::sleep(Duration::from_millis(100));
    let send = |http: &mut Http, text: &str| {
        http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&token),
            &json!({ "text": text }).to_string(),
        )
        .status
    };
    let mut open: Vec<Http> = Vec::new();
    for i in 0..40 {
        let mut http = kefu.http();
        assert_eq!(send(&mut http, &format!("c{i}")), 201, "connection {i}");
        open.push(http);
    }
    let mut over = kefu.http();
    over.send_raw(b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n");
    // Refused with a reason, then closed.
    let r = over.read_response();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(over.is_closed(), "the 41st connection is refused");
    for (i, http) in open.iter_mut().enumerate() {
        assert_eq!(send(http, &format!("again {i}")), 201, "connection {i}");
    }
    open.truncate(35);
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..5 {
        let mut http = kefu.http();
        assert_eq!(
            send(&mut http, &format!("new {i}")),
            201,
            "new connection {i}"
        );
        open.push(http);
    }
    let text = String::from_utf8(open[0].get("/metrics", None).body).unwrap();
    let refused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kefu_connections_refused_total{shard=\"0\"} "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(refused >= 1, "{text}");
}

/// A connection whose sends alternate between conversations of two shards (two to one, two to
/// the other, ...) keeps working and does not move back and forth: after its first move it
/// needs four sends in a row to one shard, which this pattern never makes.
#[test]
fn a_connection_alternating_between_shards_moves_rarely() {
    let dir = tempfile::tempdir().unwrap();
    // Conversations open on the shard that accepted their creation.
    let kefu = start_with(
        &dir,
        "2",
        "always",
        &[(
            "name = \"demo\"",
            "name = \"demo\"\nroute_on_one_shard = false",
        )],
    );
    let mut by_shard: [Option<(String, String)>; 2] = [None, None];
    for _ in 0..64 {
        let (id, token) = create_conversation(&mut kefu.http(), None);
        let shard = frame::shard_of(ConversationId::parse(&id).unwrap().0) as usize;
        by_shard[shard].get_or_insert((id, token));
        if by_shard.iter().all(Option::is_some) {
            break;
        }
    }
    let convs: Vec<(String, String)> = by_shard
        .into_iter()
        .map(|c| c.expect("64 new connections all landed on one shard"))
        .collect();
    let mut http = kefu.http();
    let mut stored = [0u64; 2];
    for (c, (id, token)) in convs.iter().enumerate() {
        stored[c] = last_seq(&mut http, id, token);
    }
    for k in 0..40 {
        let c = (k / 2) % 2;
        let (id, token) = &convs[c];
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(token),
            &json!({ "text": format!("m{k}") }).to_string(),
        );
        assert_eq!(r.status, 201, "send {k}");
        stored[c] += 1;
        assert_eq!(r.json()["seq"].as_u64().unwrap(), stored[c], "send {k}");
    }
    let text = String::from_utf8(http.get("/metrics", None).body).unwrap();
    let sum = |direction: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("kefu_connections_migrated_total{")
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(sum("in"), sum("out"));
    assert!(sum("out") <= 1, "moved {} times:\n{text}", sum("out"));
}

/// Four visitors send keyed messages on two shards until a SIGKILL; after the restart every
/// acknowledged message is there at its seq, with no gap or duplicate, a retry finds its
/// original seq, and a WebSocket resume from the middle continues exactly.
fn sigkill_under_load(config: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut kefu = start_with(&dir, "2", "always", config);
    let mut http = kefu.http();
    let convs: Vec<(String, String)> = (0..4)
        .map(|_| create_conversation(&mut http, None))
        .collect();
    let acked: Arc<Mutex<BTreeMap<(String, String), u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for (w, (id, token)) in convs.iter().cloned().enumerate() {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), kefu.http);
        workers.push(std::thread::spawn(move || {
            let mut http = Http::connect(addr);
            for i in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let key = format!("w{w}-{i}");
                let body = json!({"text": format!("load {i}"), "client_msg_id": key}).to_string();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    http.post(
                        &format!("/v1/conversations/{id}/messages"),
                        Some(&token),
                        &body,
                    )
                }));
                match r {
                    Ok(r) if r.status == 201 => {
                        acked
                            .lock()
                            .unwrap()
                            .insert((id.clone(), key), r.json()["seq"].as_u64().unwrap());
                    }
                    // The kill cut the connection: this send was never acknowledged.
                    _ => return,
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    kefu.signal_and_wait(SIGKILL);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "too little load before the kill: {}",
        acked.len()
    );

    let kefu = start_with(&dir, "2", "always", config);
    let mut http = kefu.http();
    for (id, token) in &convs {
        let mut after = 0;
        let mut seen = BTreeMap::new();
        loop {
            let page = http
                .get(
                    &format!("/v1/conversations/{id}/messages?after={after}&limit=1000"),
                    Some(token),
                )
                .json();
            let messages = page["messages"].as_array().unwrap().clone();
            if messages.is_empty() {
                break;
            }
            for m in messages {
                let seq = m["seq"].as_u64().unwrap();
                assert_eq!(seq, after + 1, "no gap, no duplicate in {id}");
                after = seq;
                if let Some(key) = m["client_msg_id"].as_str() {
                    assert!(
                        seen.insert(key.to_owned(), seq).is_none(),
                        "duplicate {key}"
                    );
                }
            }
        }
        for ((cid, key), seq) in acked.iter().filter(|((c, _), _)| c == id) {
            assert_eq!(
                seen.get(key),
                Some(seq),
                "acked {key} of {cid} lost or moved"
            );
        }
        // A retry of an acknowledged send after the restart finds its original seq (the
        // latest one: the oldest keys beyond idempotency_keys_per_conversation_max are gone).
        let latest = acked
            .iter()
            .filter(|((c, _), _)| c == id)
            .max_by_key(|(_, seq)| **seq);
        if let Some(((_, key), seq)) = latest {
            let r = http.post(
                &format!("/v1/conversations/{id}/messages"),
                Some(token),
                &json!({"text": "again", "client_msg_id": key}).to_string(),
            );
            assert_eq!(r.status, 200);
            assert_eq!(r.json()["seq"].as_u64(), Some(*seq));
        }
        // And a WebSocket resume from the middle continues exactly.
        let mid = after / 2;
        let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={token}")).expect("upgrade");
        ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": mid}));
        for want in mid + 1..=after {
            match ws.recv_stored() {
                WsMsg::Text(v) => assert_eq!(v["seq"].as_u64(), Some(want)),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn binary_protocol_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hello"));
    let conv = ConversationId::parse(&id).unwrap();
    let mut bin = Bin::connect(kefu.tcp);
    // Anything before Hello is refused.
    bin.send(&ClientMsg::Ping { nonce: 1 });
    assert!(matches!(bin.recv(), Some(BinMsg::Error { code: 401, .. })));
    let mut bin = Bin::connect(kefu.tcp);
    bin.send(&ClientMsg::Hello { token: &visitor });
    assert_eq!(
        bin.recv(),
        Some(BinMsg::Welcome {
            principal: 1,
            tenant: "demo".into()
        })
    );
    bin.send(&ClientMsg::Ping { nonce: 42 });
    assert_eq!(bin.recv(), Some(BinMsg::Pong { nonce: 42 }));
    bin.send(&ClientMsg::Send {
        conversation_id: conv,
        client_msg_id: Some("b-1"),
        text: "over tcp",
    });
    let Some(BinMsg::Ack {
        seq,
        duplicate: false,
        ..
    }) = bin.recv()
    else {
        panic!("expected an ack");
    };
    bin.send(&ClientMsg::Send {
        conversation_id: conv,
        client_msg_id: Some("b-1"),
        text: "over tcp",
    });
    assert!(matches!(bin.recv(), Some(BinMsg::Ack { seq: s, duplicate: true, .. }) if s == seq));
    bin.send(&ClientMsg::Subscribe {
        conversation_id: conv,
        after_seq: 0,
    });
    for want in 1..=seq {
        match bin.recv() {
            Some(BinMsg::Record {
                seq: got,
                conversation_id,
                bytes,
                ..
            }) => {
                assert_eq!(got, want);
                assert_eq!(conversation_id, conv.0);
                let (f, used) = frame::decode(&bytes, u32::MAX).expect("a valid stored frame");
                assert_eq!(used, bytes.len());
                assert_eq!(f.header.seq, want);
            }
            other => panic!("{other:?}"),
        }
    }
    // Live over HTTP, delivered over TCP.
    let r = http.post(
        &format!("/v1/conversations/{id}/messages"),
        Some(&visitor),
        &json!({"text": "live"}).to_string(),
    );
    assert_eq!(r.status, 201);
    match bin.recv() {
        Some(BinMsg::Record { seq: got, .. }) => assert_eq!(got, seq + 1),
        other => panic!("{other:?}"),
    }
    // Garbage gets an error frame and a close.
    let mut junk = Bin::connect(kefu.tcp);
    junk.send_raw(b"NOT A FRAME AT ALL, NOT EVEN 48 BYTES OF HEADER......");
    assert!(matches!(junk.recv(), Some(BinMsg::Error { code: 400, .. })));
}

/// One shard, no syncs, and texts of up to 32 KiB: for the flooded-subscriber tests.
fn start_for_floods(dir: &tempfile::TempDir) -> Kefu {
    start_with(
        dir,
        "1",
        "never",
        &[("text_bytes_max = 8192", "text_bytes_max = 32768")],
    )
}

/// Sends `n` messages of 30 KB into conversation `id`; message `i`'s text starts `{i:06}:`.
fn flood(http: &mut Http, id: &str, token: &str, n: u64) {
    for i in 0..n {
        let text = format!("{i:06}:{}", "w".repeat(30_000));
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(token),
            &json!({ "text": text }).to_string(),
        );
        assert_eq!(r.status, 201, "send {i}");
    }
}

/// The binary protocol's version of
/// `a_websocket_that_stops_reading_gets_every_delivery_once_it_reads_again`: a subscriber that
/// stops reading while ~30 MB of records are delivered gets every record once, whole (its CRC
/// checks) and in seq order once it reads again.
#[test]
fn a_binary_subscriber_that_stops_reading_gets_every_record_once_it_reads_again() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_for_floods(&dir);
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hello"));
    let conv = ConversationId::parse(&id).unwrap();
    let mut bin = Bin::connect(kefu.tcp);
    bin.send(&ClientMsg::Hello { token: &visitor });
    assert!(matches!(bin.recv(), Some(BinMsg::Welcome { .. })));
    bin.send(&ClientMsg::Subscribe {
        conversation_id: conv,
        after_seq: 0,
    });
    // The subscription is live once the replay's first record arrived.
    let mut last = match bin.recv() {
        Some(BinMsg::Record { seq, .. }) => seq,
        other => panic!("{other:?}"),
    };
    flood(&mut http, &id, &visitor, 1000);
    let end = last_seq(&mut http, &id, &visitor);
    while last < end {
        match bin.recv() {
            Some(BinMsg::Record { seq, bytes, .. }) => {
                assert_eq!(seq, last + 1, "records in seq order, none missing");
                let (f, used) = frame::decode(&bytes, u32::MAX).expect("a whole stored frame");
                assert_eq!((used, f.header.seq), (bytes.len(), seq));
                last = seq;
            }
            other => panic!("after seq {last}: {other:?}"),
        }
    }
}

#[test]
fn stream_bytes_equal_the_segment_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut kefu = start(&dir, "1", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hello"));
    for i in 0..20 {
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&visitor),
            &json!({"text": format!("s{i}")}).to_string(),
        );
        assert_eq!(r.status, 201);
    }
    let integration = kefu.integration.clone().unwrap();
    assert_eq!(
        http.get("/v1/stream?shard=0&from=0", Some(&visitor)).status,
        403
    );
    assert_eq!(http.get("/v1/stream?shard=0&from=0", None).status, 401);
    let mut stream = std::net::TcpStream::connect(kefu.http).unwrap();
    stream
        .write_all(
            format!(
                "GET /v1/stream?shard=0&from=0 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {integration}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let all = kefu_tests::read_until_quiet(&mut stream, Duration::from_secs(5));
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(all.starts_with(b"HTTP/1.1 200"));
    let body = &all[body_at..];
    let mut at = 0;
    let mut offsets = Vec::new();
    while at < body.len() {
        let (f, used) = frame::decode(&body[at..], u32::MAX).expect("whole frames");
        offsets.push(f.header.log_offset);
        at += used;
    }
    assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    assert!(offsets.len() >= 21);
    // Byte for byte what the segment file holds.
    let _ = kefu.signal_and_wait(SIGTERM);
    let seg_dir = dir.path().join("data").join("shard-0");
    let mut files: Vec<_> = std::fs::read_dir(&seg_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    let disk = std::fs::read(&files[0]).unwrap();
    assert_eq!(&disk[..body.len()], body);
}

#[test]
fn slow_websocket_consumer_is_closed_with_4008() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[(
            "subscriber_queue_depth = 1024",
            "subscriber_queue_depth = 8",
        )],
    );
    let data = dir.path().join("data");
    let kefu = Kefu::start(
        Path::new(BIN),
        &data,
        &["--config", &cfg, "--shards", "1", "--durability", "never"],
    );
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": 0}));
    // Make sure the subscription is live before flooding.
    let _ = ws.recv_stored();
    // Stop reading; flood with large messages until the socket buffers and the 8-slot queue
    // overflow. Bounded: at most 4000 sends.
    let text = "w".repeat(7000);
    let body = json!({"text": text}).to_string();
    for _ in 0..4000 {
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&visitor),
            &body,
        );
        assert_eq!(r.status, 201);
    }
    let mut closed = None;
    for _ in 0..10_000 {
        match ws.recv() {
            WsMsg::Close(code) => {
                closed = code;
                break;
            }
            WsMsg::Text(_) => {}
        }
    }
    assert_eq!(closed, Some(4008));
}

/// A subscriber that stops reading while much more than the kernel's socket buffers hold
/// (~30 MB) is delivered, but less than its queue: once it reads again, every message arrives
/// once, whole and in order. A waiting socket writes deliveries from its wait with one
/// non-blocking send; what the send buffer did not take must go out first in the next step.
#[test]
fn a_websocket_that_stops_reading_gets_every_delivery_once_it_reads_again() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_for_floods(&dir);
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": 0}));
    // The subscription is live once the replay's first record arrived.
    let mut last_seq = match ws.recv_stored() {
        WsMsg::Text(v) => v["seq"].as_u64().expect("a stored record"),
        other => panic!("{other:?}"),
    };
    // Below the 1,024-slot queue; the socket is not read meanwhile.
    let sends = 1000u64;
    flood(&mut http, &id, &visitor, sends);
    let mut next = 0u64;
    while next < sends {
        let v = match ws.recv_stored() {
            WsMsg::Text(v) => v,
            other => panic!("message {next}: {other:?}"),
        };
        let seq = v["seq"].as_u64().expect("a stored record");
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
        // Only the visitor's messages count (events of the conversation may come between).
        if v["type"] != "message" || v["from"]["role"] != "visitor" {
            continue;
        }
        let text = v["text"].as_str().expect("text");
        assert_eq!(text.len(), 7 + 30_000, "message {next}");
        assert!(text.starts_with(&format!("{next:06}:")), "message {next}");
        next += 1;
    }
}

#[test]
fn attachments_upload_and_download() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("see the picture"));
    let (_, stranger) = create_conversation(&mut http, Some("me too"));
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let upload = |http: &mut Http, token: &str, content_type: &str, body: &[u8]| {
        let mut req = format!(
            "POST /v1/conversations/{id}/attachments HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        http.send_raw(&req);
        http.read_response()
    };
    let r = upload(&mut http, &visitor, "image/png", &bytes);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let att = r.json()["attachment_id"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["size"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(
        upload(&mut http, &visitor, "application/x-evil", b"zz").status,
        415
    );
    assert_eq!(upload(&mut http, &stranger, "image/png", b"zz").status, 403);
    // Download twice on one keep-alive connection (sendfile, then the socket goes on).
    for _ in 0..2 {
        let got = http.get(&format!("/v1/attachments/{att}"), Some(&visitor));
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-type"), Some("image/png"));
        assert!(got.body == bytes, "downloaded bytes differ");
    }
    assert_eq!(
        http.get(&format!("/v1/attachments/{att}"), Some(&stranger))
            .status,
        403
    );
    assert_eq!(
        http.get(
            "/v1/attachments/a00000000000000000000000000000000",
            Some(&visitor)
        )
        .status,
        404
    );
    assert_eq!(http.get("/healthz", None).status, 200);
}

/// A TLS client connection to the gateway, trusting exactly `cert`.
fn tls_connect(
    addr: std::net::SocketAddr,
    cert: &rcgen::CertifiedKey,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads one Content-Length response from a TLS stream: (status, body).
fn tls_response(stream: &mut impl std::io::Read) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return (status, buf[end + 4..end + 4 + len].to_vec());
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A gateway with TLS on its HTTP and binary-protocol listeners (two shards), and the
/// certificate it serves.
fn start_tls(dir: &tempfile::TempDir) -> (Kefu, rcgen::CertifiedKey) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\nhttp = true\ntcp = true\n\n[limits]",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let cfg = config(dir.path(), &[("[limits]", &tls)]);
    let kefu = Kefu::start(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--shards", "2"],
    );
    (kefu, cert)
}

/// Sends a POST with a body (and a bearer token) on a TLS stream and reads its response.
fn tls_post(
    stream: &mut (impl std::io::Read + std::io::Write),
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Vec<u8>) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    tls_response(stream)
}

/// Opens a conversation over TLS with the first message "hello over tls": (id, visitor token).
fn tls_create_conversation(
    addr: std::net::SocketAddr,
    cert: &rcgen::CertifiedKey,
) -> (String, String) {
    let mut s = tls_connect(addr, cert);
    let body = r#"{"visitor":{"name":"T"},"channel":"web","text":"hello over tls"}"#;
    let (status, created) = tls_post(&mut s, "/v1/conversations", None, body);
    assert_eq!(status, 201);
    let created: serde_json::Value = serde_json::from_slice(&created).unwrap();
    (
        created["conversation_id"].as_str().unwrap().to_owned(),
        created["visitor_token"].as_str().unwrap().to_owned(),
    )
}

/// Reads stored records until the message with `text`.
fn recv_message<S: std::io::Read + std::io::Write>(ws: &mut Ws<S>, text: &str) {
    loop {
        match ws.recv_stored() {
            WsMsg::Text(v) if v["type"] == "message" && v["text"] == text => return,
            WsMsg::Text(_) => {}
            other => panic!("waiting for {text:?}: {other:?}"),
        }
    }
}

#[test]
fn a_quiet_tls_websocket_gets_deliveries_after_a_key_update() {
    let dir = tempfile::tempdir().unwrap();
    let (kefu, cert) = start_tls(&dir);
    let (id, visitor) = tls_create_conversation(kefu.http, &cert);
    let mut sub = Ws::upgrade(
        tls_connect(kefu.http, &cert),
        &format!("/v1/ws?token={visitor}"),
    );
    sub.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": 0}));
    recv_message(&mut sub, "hello over tls");
    // The client rolls its keys and asks the server to roll its own, then stays quiet: the
    // server reads a record with no data in it and has one of its own to write.
    sub.stream_mut().conn.refresh_traffic_keys().unwrap();
    sub.stream_mut().flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sub.stream_mut()
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A message sent meanwhile reaches it.
    let mut s = tls_connect(kefu.http, &cert);
    let path = format!("/v1/conversations/{id}/messages");
    let body = r#"{"text":"after the key update"}"#;
    assert_eq!(tls_post(&mut s, &path, Some(&visitor), body).0, 201);
    recv_message(&mut sub, "after the key update");
    // And the socket still reads: a send over it is acked.
    sub.send_json(&json!({"type": "send", "conversation_id": id, "text": "still here"}));
    loop {
        match sub.recv_stored() {
            WsMsg::Text(v) if v["type"] == "ack" => break,
            WsMsg::Text(v) if v["type"] == "error" => panic!("{v}"),
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn the_binary_protocol_over_tls_sends_and_streams_records() {
    let dir = tempfile::tempdir().unwrap();
    let (kefu, cert) = start_tls(&dir);
    let (id, visitor) = tls_create_conversation(kefu.http, &cert);
    let conv = ConversationId::parse(&id).unwrap();
    let mut bin = Bin::over(tls_connect(kefu.tcp, &cert));
    bin.send(&ClientMsg::Hello { token: &visitor });
    assert!(matches!(bin.recv(), Some(BinMsg::Welcome { .. })));
    bin.send(&ClientMsg::Subscribe {
        conversation_id: conv,
        after_seq: 0,
    });
    // Sends of several TLS records each, in one burst.
    const SENDS: usize = 30;
    let texts: Vec<String> = (0..SENDS)
        .map(|i| format!("{i:04}{}", "b".repeat(6000)))
        .collect();
    let keys: Vec<String> = (0..SENDS).map(|i| format!("tls-b{i}")).collect();
    let msgs: Vec<ClientMsg<'_>> = (0..SENDS)
        .map(|i| ClientMsg::Send {
            conversation_id: conv,
            client_msg_id: Some(&keys[i]),
            text: &texts[i],
        })
        .collect();
    bin.send_all(&msgs);
    // Every send acked once; every record streamed once, in seq order, whole.
    let (mut acks, mut seen, mut last_seq) = (0, Vec::new(), 0);
    while acks < SENDS || seen.len() < SENDS {
        match bin.recv() {
            Some(BinMsg::Ack {
                duplicate: false, ..
            }) => acks += 1,
            Some(BinMsg::Record { seq, bytes, .. }) => {
                assert_eq!(seq, last_seq + 1, "records in seq order");
                last_seq = seq;
                let (f, used) = frame::decode(&bytes, u32::MAX).expect("a whole stored frame");
                assert_eq!(used, bytes.len());
                let payload: serde_json::Value = serde_json::from_slice(f.payload).unwrap();
                if let Some(text) = payload["text"].as_str()
                    && text.len() == 6004
                {
                    seen.push(text[..4].parse::<usize>().unwrap());
                }
            }
            other => panic!("unexpected {other:?} after {acks} acks"),
        }
    }
    assert_eq!(seen, (0..SENDS).collect::<Vec<_>>());
}

#[test]
fn websockets_over_tls_carry_a_conversation_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (kefu, cert) = start_tls(&dir);
    let (id, visitor) = tls_create_conversation(kefu.http, &cert);
    // Two subscribers over TLS, so at least one likely sits on the shard that does not own
    // the conversation (its deliveries cross shards), and a sender over TLS.
    let mut subs: Vec<_> = (0..2)
        .map(|_| {
            let mut ws = Ws::upgrade(
                tls_connect(kefu.http, &cert),
                &format!("/v1/ws?token={visitor}"),
            );
            ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": 0}));
            ws
        })
        .collect();
    // Each replays the opening records up to the first message.
    for ws in &mut subs {
        loop {
            match ws.recv_stored() {
                WsMsg::Text(v) if v["type"] == "message" => {
                    assert_eq!(v["text"], "hello over tls");
                    break;
                }
                WsMsg::Text(_) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    let mut sender = Ws::upgrade(
        tls_connect(kefu.http, &cert),
        &format!("/v1/ws?token={visitor}"),
    );
    // Messages of several TLS records each (8 KB, a record holds at most 16 KiB of the
    // frames a burst writes), sent and delivered in order, each once.
    const MESSAGES: usize = 40;
    for i in 0..MESSAGES {
        let text = format!("{i:04}{}", "x".repeat(8000));
        sender.send_json(&json!({"type": "send", "conversation_id": id, "text": text, "client_msg_id": format!("t{i}")}));
    }
    let mut acked = 0;
    while acked < MESSAGES {
        match sender.recv_stored() {
            WsMsg::Text(v) if v["type"] == "ack" => acked += 1,
            WsMsg::Text(v) if v["type"] == "error" => panic!("{v}"),
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
    for (n, ws) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < MESSAGES {
            match ws.recv_stored() {
                WsMsg::Text(v) if v["type"] == "message" => {
                    let text = v["text"].as_str().unwrap();
                    assert_eq!(text.len(), 8004, "subscriber {n}");
                    got.push(text[..4].parse::<usize>().unwrap());
                }
                WsMsg::Text(_) => {}
                other => panic!("subscriber {n}: {other:?}"),
            }
        }
        assert_eq!(got, (0..MESSAGES).collect::<Vec<_>>(), "subscriber {n}");
    }
}

#[test]
fn tls_listener_serves_http_and_the_firehose() {
    let dir = tempfile::tempdir().unwrap();
    let (kefu, cert) = start_tls(&dir);
    let mut s = tls_connect(kefu.http, &cert);
    // Keep-alive over TLS: several requests on one session.
    for _ in 0..3 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let (status, body) = tls_response(&mut s);
        assert_eq!(status, 200);
        assert_eq!(body, br#"{"status":"ok"}"#);
    }
    let body = r#"{"visitor":{"name":"T"},"channel":"web","text":"over tls"}"#;
    let (status, created) = tls_post(&mut s, "/v1/conversations", None, body);
    assert_eq!(status, 201);
    // A TLS session accepted by the shard that does not own the conversation moves to the
    // owner after two sends, rustls state and all, and goes on serving on the same session.
    // Sixteen sessions, so some were accepted by the other shard; all stay open throughout.
    let created: serde_json::Value = serde_json::from_slice(&created).unwrap();
    let (id, token) = (
        created["conversation_id"].as_str().unwrap(),
        created["visitor_token"].as_str().unwrap(),
    );
    let mut sessions: Vec<_> = (0..16).map(|_| tls_connect(kefu.http, &cert)).collect();
    let mut seqs = Vec::new();
    let path = format!("/v1/conversations/{id}/messages");
    for i in 0..5 {
        for (session, t) in sessions.iter_mut().enumerate() {
            let body = format!(r#"{{"text":"tls {session} {i}"}}"#);
            let (status, answer) = tls_post(t, &path, Some(token), &body);
            assert_eq!(status, 201, "session {session}, send {i}");
            let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
            seqs.push(answer["seq"].as_u64().unwrap());
        }
    }
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "every send stored once, in order"
    );
    for (session, t) in sessions.iter_mut().enumerate() {
        t.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        assert_eq!(tls_response(t).0, 200, "session {session}");
    }
    let mut m = tls_connect(kefu.http, &cert);
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, text) = tls_response(&mut m);
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    let moved = |direction: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("kefu_connections_migrated_total{")
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert!(moved("in") > 0, "no TLS session moved:\n{text}");
    assert_eq!(moved("in"), moved("out"));
    // The firehose copies through TLS (no sendfile): whole frames, also when a chunk of the
    // log is larger than what rustls buffers at once (64 KiB): 16 messages of 7 KB more.
    let big = "f".repeat(7000);
    for i in 0..16 {
        let body = format!(r#"{{"text":"{big}{i}"}}"#);
        let (status, _) = tls_post(&mut sessions[0], &path, Some(token), &body);
        assert_eq!(status, 201, "big message {i}");
    }
    let integration = kefu.integration.clone().unwrap();
    let mut total = Vec::new();
    for shard in 0..2 {
        let mut f = tls_connect(kefu.http, &cert);
        f.write_all(
            format!("GET /v1/stream?shard={shard}&from=0 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {integration}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut all = Vec::new();
        let _ = std::io::Read::read_to_end(&mut f, &mut all);
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        total.extend_from_slice(&all[at..]);
        let mut pos = at;
        while pos < all.len() {
            let (_, used) = frame::decode(&all[pos..], u32::MAX).expect("whole frames");
            pos += used;
        }
    }
    assert!(
        total.len() > 16 * 7000,
        "the conversation's records came through: {} bytes",
        total.len()
    );
    // Plain HTTP on the TLS port is refused, and the gateway keeps serving.
    let mut plain = Http::connect(kefu.http);
    plain.send_raw(b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n");
    assert!(plain.is_closed());
    let mut again = tls_connect(kefu.http, &cert);
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    assert_eq!(tls_response(&mut again).0, 200);
}

#[test]
fn agent_inbox_and_two_parties_over_websocket_and_long_poll() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let carol = kefu.agent("carol").to_owned();
    let mut agent_ws = Ws::connect(kefu.http, &format!("/v1/ws?token={carol}")).expect("upgrade");
    let mut http = kefu.http();
    let online = http.post(
        "/v1/agents/me/status",
        Some(&carol),
        &json!({"status": "online"}).to_string(),
    );
    assert_eq!(online.status, 200);
    // The session answers its first message only after its inbox is registered on every
    // shard: an error reply to a bad message proves the registration landed.
    agent_ws.send_json(&json!({"type": "hello"}));
    match agent_ws.recv() {
        WsMsg::Text(v) => assert_eq!(v["type"], "error"),
        other => panic!("{other:?}"),
    }
    let (id, visitor) = create_conversation(&mut http, Some("how much is the pro plan?"));
    // Carol (sales) gets the offer and the assignment in her inbox.
    let mut assigned = false;
    for _ in 0..10 {
        match agent_ws.recv_stored() {
            WsMsg::Text(v) if v["event"] == "assigned" => {
                assert_eq!(v["conversation_id"], id.as_str());
                assert_eq!(v["agent"], "carol");
                assigned = true;
                break;
            }
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(assigned, "carol's inbox shows the assignment");
    // The visitor follows over WebSocket; carol answers over WebSocket; both see it.
    let mut visitor_ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).unwrap();
    let last = last_seq(&mut http, &id, &visitor);
    visitor_ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": last}));
    // A subscribe with nothing to replay answers nothing: make sure it is registered by
    // sending a typing notice the visitor's own socket then receives.
    visitor_ws.send_json(&json!({"type": "typing", "conversation_id": id}));
    match visitor_ws.recv() {
        WsMsg::Text(v) => assert_eq!(v["event"], "typing"),
        other => panic!("{other:?}"),
    }
    agent_ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": last}));
    agent_ws.send_json(&json!({"type": "send", "conversation_id": id, "text": "Hi, Carol here", "client_msg_id": "c-1"}));
    let got = loop {
        match visitor_ws.recv_stored() {
            WsMsg::Text(v) if v["type"] == "message" => break v,
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(got["text"], "Hi, Carol here");
    assert_eq!(got["from"]["role"], "agent");
    assert_eq!(got["seq"].as_u64(), Some(last + 1));
    // The visitor answers over HTTP; carol's socket and a long-poll both see it.
    let addr = kefu.http;
    let (id2, visitor2) = (id.clone(), visitor.clone());
    let poll = std::thread::spawn(move || {
        Http::connect(addr).get(
            &format!(
                "/v1/conversations/{id2}/poll?after={}&timeout_ms=10000",
                last + 1
            ),
            Some(&visitor2),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    let r = http.post(
        &format!("/v1/conversations/{id}/messages"),
        Some(&visitor),
        &json!({"text": "thanks!"}).to_string(),
    );
    assert_eq!(r.status, 201);
    let page = poll.join().unwrap().json();
    assert_eq!(page["messages"][0]["text"], "thanks!");
    loop {
        match agent_ws.recv_stored() {
            WsMsg::Text(v) if v["text"] == "thanks!" => break,
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[
            ("idle_timeout_ms = 60000", "idle_timeout_ms = 600"),
            ("ws_ping_interval_ms = 20000", "ws_ping_interval_ms = 200"),
        ],
    );
    let kefu = Kefu::start(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--shards", "2"],
    );
    let mut http = kefu.http();
    assert_eq!(http.get("/healthz", None).status, 200);
    let (_, visitor) = create_conversation(&mut http, None);
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(http.is_closed(), "an idle HTTP connection is closed");
    // The WebSocket was pinged but never answered (this client did not read): going away.
    assert_eq!(ws.recv(), WsMsg::Close(Some(1001)));
}

/// A peer that trickles a request, one byte at a time (each resets the idle timer), gets 408
/// once `request_timeout_ms` has passed since the request's first bytes; a body too large for
/// its endpoint is refused from the head alone (413, no `100 Continue`, nothing buffered),
/// while an upload of the same size is still waited for.
#[test]
fn a_trickled_request_gets_408_and_a_body_too_large_for_its_endpoint_413_from_its_head() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[("request_timeout_ms = 30000", "request_timeout_ms = 600")],
    );
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);

    let mut s = std::net::TcpStream::connect(kefu.http).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nX-a: ").unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: 100 bytes, 100 ms apart.
    for _ in 0..100 {
        if s.write_all(b"a").is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if !got.is_empty() {
            break;
        }
    }
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text:?}");
    assert!(text.contains("request_timeout_ms"), "{text:?}");
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(5),
        "408 after {waited:?}"
    );
    assert_eq!(
        shard0_metric(
            &mut http,
            "kefu_disconnects_total{shard=\"0\",reason=\"request_timeout\"}"
        ),
        Some(1)
    );

    // 413 from the head: no body sent, and no `100 Continue` either.
    let head_only = |req: String| {
        let mut s = std::net::TcpStream::connect(kefu.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let refused = head_only(
        "POST /v1/conversations HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
            .into(),
    );
    assert!(refused.starts_with("HTTP/1.1 413 "), "{refused:?}");
    let refused = head_only(format!(
        "POST /v1/conversations/{id}/messages HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer \
         {visitor}\r\nContent-Length: 70000\r\n\r\n"
    ));
    assert!(refused.starts_with("HTTP/1.1 413 "), "{refused:?}");
    // A chunked body just within the limit (62 KB) in 4,000 small chunks (84 KB on the wire),
    // arriving in two writes, is not taken for a large one.
    let json_body = format!(
        "{}{}",
        json!({"visitor": {"name": "v"}, "channel": "web"}),
        " ".repeat(62_000)
    );
    let mut chunked = String::new();
    for part in json_body.as_bytes().chunks(json_body.len().div_ceil(4000)) {
        chunked.push_str(&format!("{:x}\r\n", part.len()));
        chunked.push_str(std::str::from_utf8(part).unwrap());
        chunked.push_str("\r\n");
    }
    chunked.push_str("0\r\n\r\n");
    assert!(chunked.len() > 83_000, "{}", chunked.len());
    let mut c = std::net::TcpStream::connect(kefu.http).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(
        b"POST /v1/conversations HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let (first, second) = chunked.as_bytes().split_at(chunked.len() - 1000);
    c.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c.write_all(second).unwrap();
    let mut answer = [0u8; 4096];
    let n = c.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 201 "), "{answer:?}");
    // The same size as an attachment upload (limit 10 MiB) is waited for.
    let go_on = head_only(format!(
        "POST /v1/conversations/{id}/attachments HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer \
         {visitor}\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\
         Expect: 100-continue\r\n\r\n"
    ));
    assert!(go_on.starts_with("HTTP/1.1 100 "), "{go_on:?}");
    assert_eq!(http.get("/healthz", None).status, 200);
}

/// A conversation takes at most the tenant's `attachments.per_conversation_count_max`
/// uploads (here 2): the next is answered 413 naming the limit, and another conversation may
/// still upload.
#[test]
fn a_conversation_s_attachments_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[(
            "name = \"demo\"",
            "name = \"demo\"\nattachments = { per_conversation_count_max = 2 }",
        )],
    );
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let (other, other_visitor) = create_conversation(&mut http, None);
    let upload = |http: &mut Http, id: &str, token: &str| {
        let body = [1u8; 100];
        let mut req = format!(
            "POST /v1/conversations/{id}/attachments HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        http.send_raw(&req);
        http.read_response()
    };
    for _ in 0..2 {
        assert_eq!(upload(&mut http, &id, &visitor).status, 201);
    }
    let r = upload(&mut http, &id, &visitor);
    assert_eq!(r.status, 413);
    assert!(
        String::from_utf8_lossy(&r.body).contains("per_conversation_count_max = 2"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(upload(&mut http, &other, &other_visitor).status, 201);
}

/// A TCP connection to `addr` whose receive buffer is 4 KiB, set before the handshake so the
/// window the peer sees stays small.
fn connect_small_rcvbuf(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("tests listen on IPv4");
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// Whether shard 0 dropped a connection for the write timeout within 10 s (looks 100 times,
/// 100 ms apart).
fn write_timed_out(http: &mut Http) -> bool {
    let timed_out = "kefu_disconnects_total{shard=\"0\",reason=\"write_timeout\"}";
    (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        shard0_metric(http, timed_out) == Some(1)
    })
}

/// A client that stops reading in the middle of a response is dropped once a write has taken
/// nothing for `write_timeout_ms` (counted as `write_timeout`), instead of holding its
/// connection for ever; everyone else is served meanwhile.
#[test]
fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[("write_timeout_ms = 30000", "write_timeout_ms = 500")],
    );
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    // 9 MB: more than the socket buffers hold (the send buffer grows to tcp_wmem's 4 MiB; the
    // reader's is 4 KiB), less than the attachment limit (10 MiB).
    let size = 9_000_000;
    let mut req = format!(
        "POST /v1/conversations/{id}/attachments HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer \
         {visitor}\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n"
    )
    .into_bytes();
    req.resize(req.len() + size, 7);
    http.send_raw(&req);
    let r = http.read_response();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let att = r.json()["attachment_id"].as_str().unwrap().to_owned();

    let mut reader = connect_small_rcvbuf(kefu.http);
    reader
        .write_all(
            format!("GET /v1/attachments/{att} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {visitor}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    assert!(
        write_timed_out(&mut http),
        "the stalled download was not dropped"
    );
    // What the socket buffers held arrives, then the end: never the whole attachment.
    reader
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got > 0 && got < size, "read {got} bytes");
    assert_eq!(http.get("/healthz", None).status, 200);
}

/// A history of several times `ws::REPLAY_FLUSH_BYTES` (256 KiB), so written in pieces,
/// replays to a WebSocket and to a binary subscriber whole, in order and once, and the live
/// stream follows without a gap; pipelined history pages come back in order. (That the
/// pieces bound memory is not observable from the client; this holds the flush path to
/// delivering everything.)
#[test]
fn a_long_history_replays_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "1", "never");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let conv = ConversationId::parse(&id).unwrap();
    let n = 150u64;
    for i in 1..=n {
        let text = format!("{i:04}{}", "h".repeat(7000));
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&visitor),
            &json!({ "text": text }).to_string(),
        );
        assert_eq!(r.status, 201);
    }
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": 0}));
    let mut bin = Bin::connect(kefu.tcp);
    bin.send(&ClientMsg::Hello { token: &visitor });
    assert!(matches!(bin.recv(), Some(BinMsg::Welcome { .. })));
    bin.send(&ClientMsg::Subscribe {
        conversation_id: conv,
        after_seq: 0,
    });
    // Events (queued, ...) have seqs too: everything up to the last one, dense.
    let last = last_seq(&mut http, &id, &visitor);
    let mut ws_seqs = Vec::new();
    let mut texts = Vec::new();
    while ws_seqs.last() != Some(&last) {
        match ws.recv_stored() {
            WsMsg::Text(v) if v["seq"].is_u64() => {
                ws_seqs.push(v["seq"].as_u64().unwrap());
                if v["type"] == "message" {
                    texts.push(v["text"].as_str().unwrap()[..4].to_owned());
                }
            }
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ws_seqs, (1..=last).collect::<Vec<_>>());
    let want: Vec<String> = (1..=n).map(|i| format!("{i:04}")).collect();
    assert_eq!(texts, want);
    for want in 1..=last {
        match bin.recv() {
            Some(BinMsg::Record { seq, .. }) => assert_eq!(seq, want),
            other => panic!("{other:?}"),
        }
    }
    let n = last;
    let r = http.post(
        &format!("/v1/conversations/{id}/messages"),
        Some(&visitor),
        &json!({"text": "live"}).to_string(),
    );
    assert_eq!(r.status, 201);
    loop {
        match ws.recv_stored() {
            WsMsg::Text(v) if v["type"] == "message" => {
                assert_eq!(v["seq"].as_u64(), Some(n + 1));
                break;
            }
            WsMsg::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
    match bin.recv() {
        Some(BinMsg::Record { seq, .. }) => assert_eq!(seq, n + 1),
        other => panic!("{other:?}"),
    }
    // Three pipelined pages of ~350 KB each: written as they are ready, read back in order.
    let mut pipelined = Vec::new();
    for after in [0u64, 50, 100] {
        pipelined.extend_from_slice(
            format!(
                "GET /v1/conversations/{id}/messages?after={after}&limit=50 HTTP/1.1\r\nHost: k\r\n\
                 Authorization: Bearer {visitor}\r\n\r\n"
            )
            .as_bytes(),
        );
    }
    http.send_raw(&pipelined);
    for after in [0u64, 50, 100] {
        let page = http.read_response();
        assert_eq!(page.status, 200);
        let seqs: Vec<u64> = page.json()["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (after + 1..=after + 50).collect::<Vec<_>>());
    }
}

/// A firehose cut short (here: its reader stalls past `write_timeout_ms`) ends in a reset,
/// not a clean end of file: its body is delimited by the close, so a clean close would make a
/// truncated export look complete. A firehose that reaches the end closes cleanly.
#[test]
fn a_firehose_cut_short_ends_in_a_reset_not_an_end_of_file() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[("write_timeout_ms = 30000", "write_timeout_ms = 500")],
    );
    let mut http = kefu.http();
    let integration = kefu.integration.clone().unwrap();
    let (id, visitor) = create_conversation(&mut http, None);
    // About 5 MB of records: more than the socket buffers of a 4 KiB-window reader hold.
    let body = json!({"text": "f".repeat(7000)}).to_string();
    for _ in 0..700 {
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&visitor),
            &body,
        );
        assert_eq!(r.status, 201);
    }
    let request = format!(
        "GET /v1/stream?shard=0&from=0 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {integration}\r\n\r\n"
    );
    // Read whole: the end is a clean end of file.
    let mut whole = std::net::TcpStream::connect(kefu.http).unwrap();
    whole
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    whole.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    whole
        .read_to_end(&mut all)
        .expect("a whole firehose ends cleanly");
    assert!(all.len() > 4_900_000, "{} bytes", all.len());
    // Stalled: dropped after the write timeout, and the reader then sees a reset.
    let mut stalled = connect_small_rcvbuf(kefu.http);
    stalled.write_all(request.as_bytes()).unwrap();
    assert!(
        write_timed_out(&mut http),
        "the stalled firehose was not dropped"
    );
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0usize;
    let end = loop {
        match stalled.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got += n,
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(
        end,
        Some(std::io::ErrorKind::ConnectionReset),
        "after {got} bytes"
    );
    assert!(got < all.len());
}

/// With an admin listener (`--admin`), `/metrics` is served there (to anyone who reaches it)
/// and nowhere else; the admin listener serves only `/metrics` and the health checks. The
/// ready line names it.
#[test]
fn the_admin_listener_serves_metrics_and_health_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    let kefu = Kefu::start(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--shards", "2", "--admin", "127.0.0.1:0"],
    );
    let admin: std::net::SocketAddr = kefu
        .ready_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .expect("the ready line names the admin listener")
        .parse()
        .unwrap();
    let mut ops = Http::connect(admin);
    let r = ops.get("/metrics", None);
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("kefu_connections_open{shard=\"1\"}"));
    assert_eq!(ops.get("/healthz", None).status, 200);
    assert_eq!(ops.get("/readyz", None).status, 200);
    let r = ops.post(
        "/v1/conversations",
        None,
        &json!({"visitor": {"name": "v"}, "channel": "web"}).to_string(),
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    // The API listener no longer answers /metrics, even to loopback peers.
    let mut http = kefu.http();
    let r = http.get("/metrics", None);
    assert_eq!(r.status, 403);
    assert!(String::from_utf8_lossy(&r.body).contains("server.admin"));
    // Sends are API requests too: not on the admin listener, valid token or not, and bogus
    // ones cannot move the admin connection to another shard (where it would serve the API).
    let (id, visitor) = create_conversation(&mut http, None);
    let send = format!("/v1/conversations/{id}/messages");
    let body = json!({"text": "hi"}).to_string();
    assert_eq!(ops.post(&send, Some(&visitor), &body).status, 404);
    let other_shard = format!(
        "{}",
        ConversationId(ConversationId::parse(&id).unwrap().0 ^ (1 << 48))
    );
    for _ in 0..3 {
        let r = ops.post(
            &format!("/v1/conversations/{other_shard}/messages"),
            Some("bogus"),
            &body,
        );
        assert_eq!(r.status, 404);
    }
    let r = ops.post(
        "/v1/conversations",
        None,
        &json!({"visitor": {"name": "v"}, "channel": "web"}).to_string(),
    );
    assert_eq!(r.status, 404);
    // Without one, the ready line has no admin= and /metrics is on the API listener.
    let plain = tempfile::tempdir().unwrap();
    let k = start(&plain, "1", "never");
    assert!(!k.ready_line.contains("admin="), "{}", k.ready_line);
    assert_eq!(k.http().get("/metrics", None).status, 200);
}

/// `limits.connections_per_ip_max` (here 2, loopback included) counts an address's open
/// connections of every kind on a shard: the next one is answered 503 with the reason and
/// closed; once one of them closes, the address may connect again.
#[test]
fn connections_are_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[
            (
                "connections_per_ip_max = 4096",
                "connections_per_ip_max = 2",
            ),
            (
                "ip_limits_include_loopback = false",
                "ip_limits_include_loopback = true",
            ),
        ],
    );
    let mut http = kefu.http();
    let (_, visitor) = create_conversation(&mut http, None);
    // The second: a WebSocket (counted for as long as it is open).
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    let mut over = kefu.http();
    over.send_raw(b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n");
    let r = over.read_response();
    assert_eq!(r.status, 503);
    assert!(
        String::from_utf8_lossy(&r.body).contains("too many connections from this address"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(over.is_closed());
    // A binary connection counts too.
    let mut bin = Bin::connect(kefu.tcp);
    bin.send(&ClientMsg::Ping { nonce: 1 });
    assert!(matches!(bin.recv(), Some(BinMsg::Error { code: 503, .. })));
    // Those still open work; once the WebSocket is gone, a new connection is taken.
    assert_eq!(http.get("/healthz", None).status, 200);
    ws.send_raw(&[0x88, 0x80, 0, 0, 0, 0]);
    drop(ws);
    let mut again = None;
    // Bounded: 50 tries, 20 ms apart (the server counts the close when it sees it).
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let mut h = kefu.http();
        h.send_raw(b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n");
        let status = h.read_response().status;
        if status == 200 {
            again = Some(h);
            break;
        }
        assert_eq!(status, 503);
    }
    assert!(again.is_some(), "no connection taken after one closed");
}

/// Starting conversations is limited per peer address (here with loopback peers counted):
/// the burst passes, the next start gets 429 with `Retry-After` and creates nothing, and
/// conversations already started go on.
#[test]
fn conversation_starts_are_rate_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[
            (
                "conversation_creates_per_ip_burst = 20",
                "conversation_creates_per_ip_burst = 3",
            ),
            (
                "ip_limits_include_loopback = false",
                "ip_limits_include_loopback = true",
            ),
        ],
    );
    let mut http = kefu.http();
    let body = json!({"visitor": {"name": "v"}, "channel": "web"}).to_string();
    let mut started = Vec::new();
    for _ in 0..3 {
        let r = http.post("/v1/conversations", None, &body);
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        started.push((
            r.json()["conversation_id"].as_str().unwrap().to_owned(),
            r.json()["visitor_token"].as_str().unwrap().to_owned(),
        ));
    }
    let r = http.post("/v1/conversations", None, &body);
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert!(
        String::from_utf8_lossy(&r.body).contains("conversation_creates_per_ip_per_s"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // A refused start stores nothing: the shard holds the three conversations only.
    assert_eq!(
        shard0_metric(&mut http, "kefu_conversations{shard=\"0\"}"),
        Some(3)
    );
    let (id, token) = &started[0];
    let r = http.post(
        &format!("/v1/conversations/{id}/messages"),
        Some(token),
        &json!({"text": "still here"}).to_string(),
    );
    assert_eq!(r.status, 201);
    // The bucket refills at 2 per second.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(http.post("/v1/conversations", None, &body).status, 201);
}

/// A WebSocket or binary-protocol peer that trickles a frame (one byte every 100 ms, each
/// arriving as traffic) is closed by the idle timeout (600 ms here), as a silent one is: only
/// whole frames count as traffic.
#[test]
fn a_trickled_frame_does_not_keep_a_websocket_or_binary_session_alive() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start_with(
        &dir,
        "1",
        "never",
        &[
            ("idle_timeout_ms = 60000", "idle_timeout_ms = 600"),
            ("ws_ping_interval_ms = 20000", "ws_ping_interval_ms = 500"),
        ],
    );
    let mut http = kefu.http();
    let (_, visitor) = create_conversation(&mut http, None);
    // A masked text frame announcing 200 bytes, then its mask and payload a byte at a time.
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    let mut frame = vec![0x81u8, 0x80 | 126, 0, 200, 1, 2, 3, 4];
    frame.extend(std::iter::repeat_n(b'x', 200));
    let started = std::time::Instant::now();
    // Pings come meanwhile; the close frame (1001) is 0x88 0x02, and the socket closes after.
    let closed = trickle_until_closed(ws.stream_mut(), &frame, |got| {
        got.windows(2).any(|w| w == [0x88, 0x02])
    });
    assert!(closed, "a trickled WebSocket frame kept the socket open");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The binary protocol: a Hello frame's bytes one at a time.
    let mut hello = Vec::new();
    kefu_protocol::binproto::encode_client(&ClientMsg::Hello { token: &visitor }, 0, &mut hello)
        .unwrap();
    assert!(hello.len() > 60);
    let mut bin = std::net::TcpStream::connect(kefu.tcp).unwrap();
    let closed = trickle_until_closed(&mut bin, &hello, |_| false);
    assert!(closed, "a trickled binary frame kept the session open");
}

/// Sends the first 60 bytes of `bytes` one at a time, 100 ms apart; true once the peer closed
/// (end of file, an error, or what it sent passes `closing`).
fn trickle_until_closed(
    stream: &mut std::net::TcpStream,
    bytes: &[u8],
    closing: impl Fn(&[u8]) -> bool,
) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    // Bounded: 60 bytes, 100 ms apart (6 s).
    for byte in bytes.iter().take(60) {
        if stream.write_all(&[*byte]).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut probe = [0u8; 512];
        match stream.read(&mut probe) {
            Ok(0) => return true,
            Ok(n) if closing(&probe[..n]) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn overload_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    // Shed load as soon as one command waits for a shard.
    let cfg = config(
        dir.path(),
        &[(
            "overload_inflight_per_shard_max = 4096",
            "overload_inflight_per_shard_max = 1",
        )],
    );
    let kefu = Kefu::start(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--shards", "1", "--durability", "always"],
    );
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let seen = Arc::new(Mutex::new(None::<kefu_tests::Response>));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (id, visitor, seen, addr) = (id.clone(), visitor.clone(), seen.clone(), kefu.http);
            std::thread::spawn(move || {
                let mut http = Http::connect(addr);
                let mut i = 0;
                while seen.lock().unwrap().is_none() && std::time::Instant::now() < deadline {
                    i += 1;
                    let body = json!({"text": format!("{w}-{i}")}).to_string();
                    let r = http.post(
                        &format!("/v1/conversations/{id}/messages"),
                        Some(&visitor),
                        &body,
                    );
                    match r.status {
                        201 => {}
                        503 => *seen.lock().unwrap() = Some(r),
                        other => panic!("unexpected status {other}"),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let r = seen
        .lock()
        .unwrap()
        .clone()
        .expect("some send was shed with 503");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"].is_string());
    // And the gateway serves again once the burst is over.
    assert_eq!(http.get("/healthz", None).status, 200);
}

#[test]
fn a_burst_of_websocket_messages_is_answered_in_order() {
    // The session queues a burst's sends without waiting for each sync; answers (and seqs)
    // must still follow the client's order, with other messages answered between them.
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hi"));
    let path = format!("/v1/conversations/{id}/messages");
    let last = last_seq(&mut http, &id, &visitor);
    let send = |cmid: &str| {
        json!({"type": "send", "conversation_id": id, "text": format!("text {cmid}"), "client_msg_id": cmid})
            .to_string()
    };
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_texts(&[
        send("b0"),
        send("b1"),
        "{not json".to_string(),
        send("b2"),
        send("b1"), // a retry: the same seq again
        json!({"type": "send", "conversation_id": "c00000000000000zz", "text": "x"}).to_string(),
        send("b3"),
    ]);
    let mut answers = Vec::new();
    while answers.len() < 7 {
        match ws.recv_stored() {
            WsMsg::Text(v) => answers.push(v),
            other => panic!("unexpected {other:?} after {answers:?}"),
        }
    }
    let ack = |v: &serde_json::Value, cmid: &str, seq: u64| {
        assert_eq!(v["type"], "ack", "{v}");
        assert_eq!(v["client_msg_id"], cmid, "{v}");
        assert_eq!(v["seq"].as_u64(), Some(seq), "{v}");
    };
    ack(&answers[0], "b0", last + 1);
    ack(&answers[1], "b1", last + 2);
    assert_eq!(answers[2]["type"], "error", "{}", answers[2]);
    ack(&answers[3], "b2", last + 3);
    ack(&answers[4], "b1", last + 2);
    assert_eq!(answers[5]["type"], "error", "{}", answers[5]);
    ack(&answers[6], "b3", last + 4);
    // Stored once each, in the client's order.
    let history = http
        .get(&format!("{path}?after={last}"), Some(&visitor))
        .json();
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["text b0", "text b1", "text b2", "text b3"]);
}

#[test]
fn a_burst_of_binary_frames_is_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "2", "always");
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, Some("hi"));
    let last = last_seq(&mut http, &id, &visitor);
    let conv = ConversationId::parse(&id).unwrap();
    let mut bin = Bin::connect(kefu.tcp);
    let send = |cmid| ClientMsg::Send {
        conversation_id: conv,
        client_msg_id: Some(cmid),
        text: "burst",
    };
    bin.send_all(&[
        ClientMsg::Hello { token: &visitor },
        send("b0"),
        send("b1"),
        ClientMsg::Ping { nonce: 9 },
        send("b2"),
        send("b1"),
        ClientMsg::Send {
            conversation_id: ConversationId(u64::MAX),
            client_msg_id: Some("bad"),
            text: "nowhere",
        },
        send("b3"),
    ]);
    assert!(matches!(bin.recv(), Some(BinMsg::Welcome { .. })));
    let ack = |bin: &mut Bin, want_seq: u64, want_dup: bool| match bin.recv() {
        Some(BinMsg::Ack { seq, duplicate, .. }) => {
            assert_eq!((seq, duplicate), (want_seq, want_dup));
        }
        other => panic!("expected ack {want_seq}, got {other:?}"),
    };
    ack(&mut bin, last + 1, false);
    ack(&mut bin, last + 2, false);
    assert_eq!(bin.recv(), Some(BinMsg::Pong { nonce: 9 }));
    ack(&mut bin, last + 3, false);
    ack(&mut bin, last + 2, true);
    assert!(matches!(bin.recv(), Some(BinMsg::Error { code: 404, .. })));
    ack(&mut bin, last + 4, false);
}

/// The value of a metric line of shard 0 (`name{shard="0"...} value`), if present.
fn shard0_metric(http: &mut Http, name_and_labels: &str) -> Option<u64> {
    let text = String::from_utf8(http.get("/metrics", None).body).unwrap();
    let prefix = format!("{name_and_labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn sends_move_into_a_zero_filled_segment_and_survive_sigkill() {
    // A new gateway starts in zero-filled segments. One whose log was written without them
    // (here: `zero_fill_segments = false`) moves into one at the first send after restart.
    let dir = tempfile::tempdir().unwrap();
    let zero_filled = "kefu_log_active_segment_zero_filled{shard=\"0\"}";
    let off = [("zero_fill_segments = true", "zero_fill_segments = false")];
    let mut kefu = start_with(&dir, "1", "always", &off);
    let mut http = kefu.http();
    assert_eq!(shard0_metric(&mut http, zero_filled), Some(0));
    let (id, token) = create_conversation(&mut http, None);
    let send = |http: &mut Http, i: u64| {
        let r = http.post(
            &format!("/v1/conversations/{id}/messages"),
            Some(&token),
            &json!({ "text": format!("m{i}") }).to_string(),
        );
        assert_eq!(r.status, 201);
    };
    for i in 0..20 {
        send(&mut http, i);
    }
    drop(http);
    kefu.signal_and_wait(SIGKILL);

    let mut kefu = start_with(&dir, "1", "always", &[]);
    let mut http = kefu.http();
    assert_eq!(shard0_metric(&mut http, zero_filled), Some(0));
    assert_eq!(
        shard0_metric(
            &mut http,
            "kefu_log_spare_segment{shard=\"0\",state=\"ready\"}"
        ),
        Some(1)
    );
    send(&mut http, 20);
    assert_eq!(shard0_metric(&mut http, zero_filled), Some(1));
    let logs = std::fs::read_dir(dir.path().join("data/shard-0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count();
    assert_eq!(logs, 2, "the recovered segment was sealed");
    for i in 21..30 {
        send(&mut http, i);
    }
    let last = last_seq(&mut http, &id, &token);
    drop(http);
    kefu.signal_and_wait(SIGKILL);

    let kefu = start_with(&dir, "1", "always", &[]);
    let mut http = kefu.http();
    assert_eq!(last_seq(&mut http, &id, &token), last);
    let page = http
        .get(
            &format!("/v1/conversations/{id}/messages?after=0&limit=1000"),
            Some(&token),
        )
        .json();
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    let want: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
}

/// Scheduling policies (field 41 of `/proc/PID/task/TID/stat`: 0 normal, 1 `SCHED_FIFO`) of the
/// threads of `pid` whose name starts with `prefix`.
fn thread_policies(pid: u32, prefix: &str) -> Vec<u32> {
    let mut policies = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        // A thread that exits meanwhile has no stat any more.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        // Fields from 3 (state) on follow the name.
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        policies.push(fields[41 - 3].parse().unwrap());
    }
    policies
}

/// `server.sync_realtime` (on by default): the threads that run the logs' syncs, the shard's
/// io_uring workers (`iou-wrk-<shard tid>`) or the legacy driver's flusher (`kefu-flush-N`),
/// run `SCHED_FIFO`; with the key off they stay normal threads. Where the test may not raise
/// priorities (not root, no `RLIMIT_RTPRIO`), kefu serves on at normal priority.
#[test]
fn sync_threads_run_realtime_unless_turned_off() {
    // SAFETY: plain calls with no preconditions; `rtprio` outlives getrlimit.
    let permitted = unsafe {
        let mut rtprio: libc::rlimit = std::mem::zeroed();
        libc::geteuid() == 0
            || (libc::getrlimit(libc::RLIMIT_RTPRIO, &mut rtprio) == 0 && rtprio.rlim_cur >= 1)
    };
    for (driver, prefix) in [("auto", "iou-wrk-"), ("legacy", "kefu-flush-")] {
        for realtime in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let kefu = start_with(
                &dir,
                "1",
                "always",
                &[
                    ("driver = \"auto\"", &format!("driver = \"{driver}\"")),
                    (
                        "sync_realtime = true",
                        &format!("sync_realtime = {realtime}"),
                    ),
                ],
            );
            let mut http = kefu.http();
            let (id, token) = create_conversation(&mut http, None);
            let want = if realtime && permitted { 1 } else { 0 };
            // The shard tends its io_uring workers once a second; keep them busy meanwhile
            // (an idle one exits after 5 s).
            let mut seen = Vec::new();
            for i in 0..40 {
                let status = http
                    .post(
                        &format!("/v1/conversations/{id}/messages"),
                        Some(&token),
                        &json!({ "text": format!("m{i}") }).to_string(),
                    )
                    .status;
                assert_eq!(status, 201);
                std::thread::sleep(Duration::from_millis(100));
                seen = thread_policies(kefu.pid(), prefix);
                // Past the first passes, every sync thread has its final policy.
                if i >= 15 && !seen.is_empty() && seen.iter().all(|&p| p == want) {
                    break;
                }
            }
            assert!(
                !seen.is_empty() && seen.iter().all(|&p| p == want),
                "driver {driver}, sync_realtime {realtime}: {prefix}* policies {seen:?}, want {want}"
            );
        }
    }
}

/// Typing and read notices are rate-limited per sender like messages (the tenant's
/// `visitor_rate_limit`, here burst 3): over a WebSocket, typing beyond the limit is dropped
/// without an answer, a read beyond it is answered with a rate-limit `error`.
#[test]
fn typing_and_read_notices_beyond_the_rate_limit_are_dropped_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "visitor_rate_limit = { messages_per_s = 10000, burst = 10000 }",
        "visitor_rate_limit = { messages_per_s = 1, burst = 3 }",
    );
    std::fs::write(&cfg, text).unwrap();
    let kefu = Kefu::start(
        Path::new(BIN),
        &dir.path().join("data"),
        &["--config", &cfg, "--shards", "1", "--durability", "never"],
    );
    let mut http = kefu.http();
    let (id, visitor) = create_conversation(&mut http, None);
    let mut ws = Ws::connect(kefu.http, &format!("/v1/ws?token={visitor}")).expect("upgrade");
    ws.send_json(&json!({"type": "subscribe", "conversation_id": id, "after": 0}));
    let queued = ws.recv();
    assert!(
        matches!(&queued, WsMsg::Text(v) if v["event"] == "queued"),
        "{queued:?}"
    );
    let mut burst = Vec::new();
    for seq in 1..=10 {
        burst.push(json!({"type": "typing", "conversation_id": id}).to_string());
        burst.push(json!({"type": "read", "conversation_id": id, "seq": seq}).to_string());
    }
    burst.push(
        json!({"type": "send", "conversation_id": id, "text": "marker", "client_msg_id": "m1"})
            .to_string(),
    );
    ws.send_texts(&burst);
    // Answers come in order and the notices before the message's delivery: read until both the
    // send's ack and the message itself arrived.
    let (mut typing, mut read, mut errors, mut acked, mut delivered) =
        (0, 0, Vec::new(), false, false);
    while !(acked && delivered) {
        match ws.recv() {
            WsMsg::Text(v) if v["type"] == "error" => errors.push(v),
            WsMsg::Text(v) if v["event"] == "typing" => typing += 1,
            WsMsg::Text(v) if v["event"] == "read" => read += 1,
            WsMsg::Text(v) if v["type"] == "ack" => acked = true,
            WsMsg::Text(v) if v["type"] == "message" => delivered = v["text"] == "marker",
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((typing, read), (3, 3));
    assert_eq!(errors.len(), 7, "one per read over the limit: {errors:?}");
    for e in &errors {
        let reason = e["error"].as_str().unwrap();
        assert!(reason.contains("rate limit"), "{e}");
    }
    // The typing notices dropped are counted.
    assert_eq!(
        shard0_metric(&mut http, "kefu_notices_dropped_total{shard=\"0\"}"),
        Some(7)
    );
}

/// Files the config names are part of the config: a missing TLS certificate or intents file is
/// a bad config (exit 2, one line naming the key), not a failed start (exit 1).
#[test]
fn a_missing_tls_certificate_or_intents_file_exits_2_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n\n[limits]",
        dir.path().join("no-such-cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let intents = (
        "intents = \"builtin:demo\"",
        "intents = \"no-such-intents.toml\"",
    );
    for (replace, key, file) in [
        (
            ("[limits]", tls.as_str()),
            "tls.cert_path",
            "no-such-cert.pem",
        ),
        (intents, "tenant[0].intents", "no-such-intents.toml"),
    ] {
        let cfg = config(dir.path(), &[replace]);
        let out = std::process::Command::new(BIN)
            .args([
                "--config",
                &cfg,
                "--http",
                "127.0.0.1:0",
                "--tcp",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("{key}: ")), "{err}");
        assert!(err.contains(file), "{err}");
    }
}

/// A refused WebSocket upgrade answers 426 with the version the server speaks
/// (`Sec-WebSocket-Version: 13`, RFC 6455 §4.4) and `Upgrade: websocket` (RFC 9110 §15.5.22).
#[test]
fn a_websocket_upgrade_of_another_version_gets_426_naming_version_13() {
    let dir = tempfile::tempdir().unwrap();
    let kefu = start(&dir, "1", "never");
    for (version, upgrade) in [("8", "Upgrade: websocket\r\n"), ("13", "")] {
        let mut http = kefu.http();
        http.send_raw(
            format!(
                "GET /v1/ws HTTP/1.1\r\nHost: kefu\r\n{upgrade}Connection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
            )
            .as_bytes(),
        );
        let r = http.read_response();
        assert_eq!(r.status, 426, "version {version}");
        assert_eq!(
            r.header("sec-websocket-version"),
            Some("13"),
            "version {version}"
        );
        assert_eq!(r.header("upgrade"), Some("websocket"), "version {version}");
    }
}
