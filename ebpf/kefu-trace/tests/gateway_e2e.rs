//! End to end: start the real `kefu` gateway, attach the tracer, make N HTTP requests with a
//! real client over one keep-alive connection, and check that exactly N request traces arrive
//! with every stage in order and the connection's io_uring reads and writes joined; then detach
//! and check the gateway's markers are off again.
//!
//! The `kefu` binary is found next to this test's directory (`target/<profile>/kefu`, which
//! `cargo test --workspace` / `cargo xtask test` build because the gateway has integration
//! tests) or through `KEFU_BIN`.

mod common;

use common::collect;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kefu_protocol::binproto::ClientMsg;
use kefu_protocol::model::ConversationId;
use kefu_tests::{Bin, BinMsg, Kefu, create_conversation};
use kefu_trace::elf::find_hooks;
use kefu_trace::join::opcode;
use kefu_trace::join::{JoinConfig, Joiner, Trace};
use kefu_trace::output::parse_conversation;
use kefu_trace::probes::{TraceTarget, Tracer, unavailable_reason};
use kefu_trace::procfs;
use kefu_trace_common::{Stage, route};

fn kefu_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEFU_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/gateway_e2e-<hash> -> target/<profile>/kefu
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("kefu");
    bin.is_file().then_some(bin)
}

/// A one-shard gateway under `always` on a fresh data dir below `dir`, or why this machine
/// cannot run the test (printed as a skip).
fn start_kefu(name: &str) -> Option<(Kefu, PathBuf, PathBuf)> {
    if let Some(reason) = unavailable_reason() {
        eprintln!("skipped: {reason}");
        return None;
    }
    let Some(bin) = kefu_bin() else {
        eprintln!(
            "skipped: no kefu binary next to this test; run `cargo xtask test` (or `cargo test --workspace`), which builds it, or set KEFU_BIN"
        );
        return None;
    };
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kefu = Kefu::start(
        &bin,
        &dir.join("data"),
        &["--shards", "1", "--durability", "always"],
    );
    Some((kefu, bin, dir))
}

#[test]
fn traces_every_request_of_a_real_gateway_with_io_uring_joined() {
    const CONVERSATIONS: usize = 3;
    const N: usize = 30;
    let Some((kefu, bin, dir)) = start_kefu("kefu-trace-e2e") else {
        return;
    };
    let pid = kefu.pid();
    let hooks = find_hooks(Path::new(&bin)).expect("kefu carries the request marker");
    let semaphore =
        || u16::from_le_bytes(procfs::read_mem::<2>(pid, hooks.semaphore_offset).unwrap());
    assert_eq!(semaphore(), 0, "markers off before attaching");

    let mut tracer = Tracer::attach(&TraceTarget {
        pid: Some(pid),
        ..Default::default()
    })
    .expect("attaching to kefu");
    assert_eq!(semaphore(), 1, "markers on while attached");
    // The kernel raises the semaphore a moment before the program is attached to the probe.
    std::thread::sleep(Duration::from_millis(200));

    // The default tenant limits each visitor to a burst of 20 messages: spread the sends over a
    // few conversations, all on one keep-alive connection.
    let mut http = kefu.http();
    let mut conversations = Vec::new();
    for _ in 0..CONVERSATIONS {
        let (conversation, token) = create_conversation(&mut http, None);
        conversations.push((conversation, token));
    }
    for i in 0..N {
        let (conversation, token) = &conversations[i % CONVERSATIONS];
        let body =
            serde_json::json!({"text": format!("hello {i}"), "client_msg_id": format!("m{i}")});
        let r = http.post(
            &format!("/v1/conversations/{conversation}/messages"),
            Some(token),
            &body.to_string(),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let conversation_ids: Vec<u64> = conversations
        .iter()
        .map(|(c, _)| parse_conversation(c).expect("c<16 hex>"))
        .collect();

    let mut joiner = Joiner::new(JoinConfig::default());
    let traces = collect(&mut tracer, &mut joiner, N + CONVERSATIONS);
    let counters = tracer.counters().unwrap();
    assert_eq!(counters.ringbuf_drops, 0);
    assert_eq!(counters.record_read_errors, 0);
    assert_eq!(
        traces.len(),
        N + CONVERSATIONS,
        "one trace per request: the create and N sends"
    );
    let sends: Vec<&Trace> = traces
        .iter()
        .filter(|t| t.record.route == route::MESSAGE_SEND)
        .collect();
    assert_eq!(sends.len(), N);
    let fd = sends[0].record.fd;
    for t in &sends {
        let r = &t.record;
        assert_eq!(t.tgid, pid);
        assert!(conversation_ids.contains(&r.conversation_id), "{r:?}");
        assert_eq!(r.status, 201);
        assert_eq!(r.fd, fd, "one keep-alive connection");
        assert!(r.stages_in_order(), "{r:?}");
        for stage in [
            Stage::Accepted,
            Stage::Parsed,
            Stage::RoutedToShard,
            Stage::Appended,
            Stage::Synced,
            Stage::Answered,
        ] {
            assert!(r.get(stage).is_some(), "{stage:?} missing in {r:?}");
        }
        let reads =
            t.io.iter()
                .filter(|e| e.fd == fd && opcode::is_read(e.opcode))
                .count();
        let writes =
            t.io.iter()
                .filter(|e| e.fd == fd && !opcode::is_read(e.opcode))
                .count();
        assert!(
            reads >= 1 && writes >= 1,
            "request {} joined {:?}",
            r.request_id,
            t.io.iter()
                .map(|e| (opcode::name(e.opcode), e.fd))
                .collect::<Vec<_>>()
        );
    }

    tracer.detach();
    drop(tracer);
    assert_eq!(semaphore(), 0, "markers off again after detach");
    drop(kefu);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traces_each_frame_of_the_binary_protocol() {
    const SENDS: usize = 5;
    let Some((kefu, _, dir)) = start_kefu("kefu-trace-bin") else {
        return;
    };
    let mut http = kefu.http();
    let (conversation, token) = create_conversation(&mut http, None);
    let conversation_id = parse_conversation(&conversation).expect("c<16 hex>");

    let mut tracer = Tracer::attach(&TraceTarget {
        pid: Some(kefu.pid()),
        ..Default::default()
    })
    .expect("attaching to kefu");
    std::thread::sleep(Duration::from_millis(200));

    // Hello, SENDS sends, one ping, one send to a conversation the visitor may not use.
    let mut b = Bin::connect(kefu.tcp);
    b.send(&ClientMsg::Hello { token: &token });
    assert!(matches!(b.recv(), Some(BinMsg::Welcome { .. })));
    for i in 0..SENDS {
        let cmid = format!("t{i}");
        b.send(&ClientMsg::Send {
            conversation_id: ConversationId(conversation_id),
            client_msg_id: Some(&cmid),
            text: "traced over tcp",
        });
        assert!(matches!(b.recv(), Some(BinMsg::Ack { .. })));
    }
    b.send(&ClientMsg::Ping { nonce: 7 });
    assert_eq!(b.recv(), Some(BinMsg::Pong { nonce: 7 }));
    b.send(&ClientMsg::Send {
        conversation_id: ConversationId(conversation_id ^ 1),
        client_msg_id: None,
        text: "not mine",
    });
    assert!(matches!(b.recv(), Some(BinMsg::Error { .. })));

    let mut joiner = Joiner::new(JoinConfig::default());
    let traces = collect(&mut tracer, &mut joiner, SENDS + 3);
    tracer.detach();
    assert_eq!(traces.len(), SENDS + 3, "one trace per client frame");
    assert!(traces.iter().all(|t| t.record.route == route::BINARY_FRAME));
    let sends: Vec<&Trace> = traces
        .iter()
        .filter(|t| t.record.conversation_id == conversation_id)
        .collect();
    assert_eq!(sends.len(), SENDS, "{traces:?}");
    for t in &sends {
        let r = &t.record;
        assert_eq!(r.status, 200);
        assert!(r.stages_in_order(), "{r:?}");
        for stage in [
            Stage::Accepted,
            Stage::RoutedToShard,
            Stage::Appended,
            Stage::Synced,
            Stage::Answered,
        ] {
            assert!(r.get(stage).is_some(), "{stage:?} missing in {r:?}");
        }
    }
    assert_eq!(
        traces.iter().filter(|t| t.record.status == 400).count(),
        1,
        "the refused send is traced with its error"
    );
    drop(kefu);
    let _ = std::fs::remove_dir_all(&dir);
}
