//! Loads the real probes and attaches them to the demo process (`kefu-trace-demo`), a stand-in
//! for the gateway: exactly N markers must arrive with their stages in order, io_uring and TCP
//! events must join to the requests of a real socket, and after detaching the semaphore must be
//! back to 0. Needs root and BPF; without them each test says why and skips.

mod common;

use common::{WAIT_MAX, collect};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kefu_trace::join::{JoinConfig, Joiner};
use kefu_trace::probes::{TraceTarget, Tracer, unavailable_reason};
use kefu_trace_common::{STAGE_COUNT, Stage};

fn skip() -> bool {
    match unavailable_reason() {
        Some(reason) => {
            eprintln!("skipped: {reason}");
            true
        }
        None => false,
    }
}

/// The demo process; killed on drop so a failing test leaves nothing running.
struct Demo {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Demo {
    fn start(args: &[&str]) -> (Demo, Vec<String>) {
        Demo::start_binary(
            std::path::Path::new(env!("CARGO_BIN_EXE_kefu-trace-demo")),
            args,
        )
    }

    fn start_binary(bin: &std::path::Path, args: &[&str]) -> (Demo, Vec<String>) {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting kefu-trace-demo");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut demo = Demo {
            child,
            stdin,
            stdout,
        };
        let ready = demo.line();
        let words: Vec<String> = ready.split_whitespace().map(String::from).collect();
        assert_eq!(words.first().map(String::as_str), Some("ready"), "{ready}");
        (demo, words)
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading the demo");
        line.trim().to_string()
    }

    fn semaphore(&mut self) -> u16 {
        writeln!(self.stdin, "sem").unwrap();
        let line = self.line();
        line.strip_prefix("sem ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected demo answer `{line}`"))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn traces_exactly_n_markers_then_switches_them_off() {
    if skip() {
        return;
    }
    const N: usize = 500;
    let (mut demo, words) = Demo::start(&["markers", &N.to_string()]);
    let pid: u32 = words[1].parse().unwrap();
    assert_eq!(demo.semaphore(), 0, "markers must be off before attaching");
    let mut tracer = Tracer::attach(&TraceTarget {
        pid: Some(pid),
        ..Default::default()
    })
    .expect("attaching to the demo");
    let mut joiner = Joiner::new(JoinConfig::default());
    let traces = collect(&mut tracer, &mut joiner, N);
    assert_eq!(demo.line(), format!("emitted {N}"));
    let counters = tracer.counters().unwrap();
    assert_eq!(counters.ringbuf_drops, 0);
    assert_eq!(counters.record_read_errors, 0);
    assert_eq!(traces.len(), N, "exactly N request records");
    let mut ids: Vec<u64> = traces.iter().map(|t| t.record.request_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=N as u64).collect::<Vec<_>>());
    for t in &traces {
        assert_eq!(t.tgid, pid);
        assert!(t.record.stages_in_order(), "{:?}", t.record);
        assert!(
            t.record.stage_ns.iter().all(|&ns| ns != 0),
            "all {STAGE_COUNT} stages set"
        );
        // The probe's clock and the process's CLOCK_MONOTONIC are the same clock.
        assert!(t.marker_ns >= t.record.get(Stage::Answered).unwrap());
    }
    assert_eq!(
        demo.semaphore(),
        1,
        "the kernel holds the semaphore while attached"
    );
    tracer.detach();
    drop(tracer);
    assert_eq!(demo.semaphore(), 0, "markers off again after detach");
}

#[test]
fn joins_io_uring_and_tcp_events_of_real_connections() {
    if skip() {
        return;
    }
    const CONNECTIONS: usize = 3;
    const PER_CONNECTION: usize = 20;
    let (mut demo, words) = Demo::start(&["serve"]);
    let pid: u32 = words[1].parse().unwrap();
    let port: u16 = words[2].parse().unwrap();
    let mut tracer = Tracer::attach(&TraceTarget {
        pid: Some(pid),
        ..Default::default()
    })
    .expect("attaching to the demo server");
    // See the demo's ATTACH_SETTLE: the semaphore is up a moment before the program is attached.
    std::thread::sleep(Duration::from_millis(200));
    for c in 0..CONNECTIONS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WAIT_MAX)).unwrap();
        for i in 0..PER_CONNECTION {
            s.write_all(format!("conn {c} req {i}\n").as_bytes())
                .unwrap();
            let mut reply = [0u8; 3];
            s.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"ok\n");
        }
    }
    let mut joiner = Joiner::new(JoinConfig::default());
    let traces = collect(&mut tracer, &mut joiner, CONNECTIONS * PER_CONNECTION);
    assert_eq!(traces.len(), CONNECTIONS * PER_CONNECTION);
    let mut with_tcp = 0;
    for t in &traces {
        let r = &t.record;
        assert!(
            r.stages_in_order() && r.stage_ns.iter().all(|&ns| ns != 0),
            "{r:?}"
        );
        let ops: Vec<u8> = t.io.iter().map(|e| e.opcode).collect();
        // recv (27) carrying the request, fsync (3) between appended and synced, send (26).
        assert_eq!(
            ops,
            vec![27, 3, 26],
            "request {} joined {:?}",
            r.request_id,
            t.io
        );
        let recv = &t.io[0];
        let send = &t.io[2];
        assert_eq!((recv.fd, send.fd), (r.fd, r.fd));
        assert!(recv.res > 0 && send.res == 3);
        assert!(recv.header.ktime_ns <= r.get(Stage::Accepted).unwrap());
        assert!(send.submit_ns <= r.get(Stage::Answered).unwrap());
        if t.tcp
            .iter()
            .any(|e| e.local_port == port && e.remote_port == r.peer_port)
        {
            with_tcp += 1;
        }
    }
    // Each connection's handshake (SYN_RECV -> ESTABLISHED) joins to its first requests.
    assert!(
        with_tcp >= CONNECTIONS,
        "TCP events joined to {with_tcp} requests"
    );
    tracer.detach();
    drop(tracer);
    assert_eq!(demo.semaphore(), 0);
}

#[test]
fn cli_prints_json_lines_and_detaches() {
    if skip() {
        return;
    }
    const N: usize = 50;
    let (mut demo, words) = Demo::start(&["markers", &N.to_string()]);
    let pid = &words[1];
    let dir = std::env::temp_dir().join(format!("kefu-trace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chrome = dir.join("trace.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kefu-trace"))
        .args([
            "--pid",
            pid,
            "--json",
            "--max-requests",
            &N.to_string(),
            "--duration-s",
            "60",
        ])
        .arg("--chrome-trace")
        .arg(&chrome)
        .output()
        .expect("running kefu-trace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("detached; markers off"), "{stderr}");
    assert!(
        stderr.contains("\"ringbuf_drops\":0"),
        "drops are reported: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), N);
    for v in &lines {
        assert_eq!(v["stages_us"].as_object().unwrap().len(), STAGE_COUNT);
        assert_eq!(v["route"], "message_send");
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&chrome).unwrap()).unwrap();
    let requests = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "request")
        .count();
    assert_eq!(requests, N);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(demo.line(), format!("emitted {N}"));
    assert_eq!(demo.semaphore(), 0);
}

#[test]
fn tracer_started_before_the_process_switches_its_markers_on() {
    if skip() {
        return;
    }
    const N: usize = 100;
    // A private copy of the demo binary: a system-wide uprobe on the shared one would also raise
    // the semaphore of the other tests' demo processes.
    let dir = std::env::temp_dir().join(format!("kefu-trace-before-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("kefu-trace-demo");
    std::fs::copy(env!("CARGO_BIN_EXE_kefu-trace-demo"), &bin).unwrap();
    let mut tracer = Tracer::attach(&TraceTarget {
        binary: Some(bin.clone()),
        ..Default::default()
    })
    .expect("attaching by binary with no process running");
    assert_eq!(tracer.target_tgid(), None);
    let (mut demo, words) = Demo::start_binary(&bin, &["markers", &N.to_string()]);
    let pid: u32 = words[1].parse().unwrap();
    let mut joiner = Joiner::new(JoinConfig::default());
    let traces = collect(&mut tracer, &mut joiner, N);
    assert_eq!(demo.line(), format!("emitted {N}"));
    assert_eq!(traces.len(), N);
    assert!(traces.iter().all(|t| t.tgid == pid));
    tracer.refresh().unwrap();
    assert_eq!(
        tracer.target_tgid(),
        Some(pid),
        "the tracer found the new process"
    );
    drop(tracer);
    assert_eq!(demo.semaphore(), 0);
    drop(demo);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sampling_marks_one_request_in_k() {
    if skip() {
        return;
    }
    const N: usize = 300;
    const EVERY: u32 = 10;
    let (mut demo, words) = Demo::start(&["markers", &N.to_string()]);
    let pid: u32 = words[1].parse().unwrap();
    let mut tracer = Tracer::attach(&TraceTarget {
        pid: Some(pid),
        sample_every: EVERY,
        ..Default::default()
    })
    .expect("attaching with sampling");
    let want = N / EVERY as usize;
    let mut joiner = Joiner::new(JoinConfig::default());
    let traces = collect(&mut tracer, &mut joiner, want);
    assert_eq!(demo.line(), format!("emitted {want}"));
    assert_eq!(traces.len(), want);
    assert_eq!(tracer.counters().unwrap().marker_hits, want as u64);
    drop(tracer);
    assert_eq!(demo.semaphore(), 0);
}

#[test]
fn markers_go_off_even_when_the_tracer_is_killed() {
    if skip() {
        return;
    }
    const N: usize = 5;
    let (mut demo, words) = Demo::start(&["markers", &N.to_string()]);
    let pid = &words[1];
    let mut tracer = Command::new(env!("CARGO_BIN_EXE_kefu-trace"))
        .args(["--pid", pid, "--json", "--duration-s", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting kefu-trace");
    // The demo emits once the tracer has switched its markers on.
    assert_eq!(demo.line(), format!("emitted {N}"));
    assert_eq!(demo.semaphore(), 1);
    tracer.kill().unwrap();
    tracer.wait().unwrap();
    // The kernel drops the uprobe (and its semaphore count) when the perf event's last fd goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while demo.semaphore() != 0 {
        assert!(
            Instant::now() < deadline,
            "semaphore still set after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A usage error is one message and the usage, exit 2, without a backtrace even when
/// RUST_BACKTRACE is set (needs no privileges: nothing is attached).
#[test]
fn cli_usage_errors_exit_2_without_a_backtrace() {
    for args in [&["--bogus"][..], &["--pid", "1", "--window-s", "0"], &[]] {
        let out = Command::new(env!("CARGO_BIN_EXE_kefu-trace"))
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("running kefu-trace");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("kefu-trace: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("backtrace"), "{args:?}: {stderr}");
    }
}
