//! Helpers for kefu end-to-end tests: start the real `kefu` binary on port 0 with a temporary data dir, and small blocking clients (HTTP/1.1, WebSocket, binary protocol) over real sockets.
//!
//! The end-to-end tests themselves live in `gateway/tests/`, because Cargo hands the path of
//! the `kefu` binary (`CARGO_BIN_EXE_kefu`) only to the integration tests of the package that
//! builds it. They pass that path to [`Kefu::start`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kefu_protocol::binproto::{self, BinLimits, ClientMsg};
use kefu_protocol::model::ModelLimits;
use kefu_protocol::ws::{Role, WsConnection, WsError, WsEvent, WsLimits};

/// How long a test waits for the gateway to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Socket read timeout of the test clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A running gateway process.
pub struct Kefu {
    child: Option<Child>,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    pub shards: usize,
    pub data_dir: PathBuf,
    /// Demo agent name -> token.
    pub agents: HashMap<String, String>,
    pub integration: Option<String>,
    /// The lines printed before the ready line.
    pub lines: Vec<String>,
    pub ready_line: String,
}

impl Kefu {
    /// Starts `bin` on port 0 with `data_dir` and `extra` flags; waits for the ready line.
    pub fn start(bin: &Path, data_dir: &Path, extra: &[&str]) -> Kefu {
        Self::start_limited(bin, data_dir, extra, None)
    }

    /// [`Kefu::start`] with the open-file limit (soft and hard) set to `nofile` in the child.
    pub fn start_limited(bin: &Path, data_dir: &Path, extra: &[&str], nofile: Option<u64>) -> Kefu {
        let mut command = Command::new(bin);
        command
            .args([
                "--http",
                "127.0.0.1:0",
                "--tcp",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().expect("start kefu");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut lines = Vec::new();
        let ready_line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("kefu ready ") => break line,
                Ok(line) => lines.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("kefu printed no ready line in time; got {lines:?}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        let field = |name: &str| -> String {
            ready_line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("ready line lacks {name}: {ready_line}"))
                .to_owned()
        };
        let http: SocketAddr = field("http").parse().expect("http addr");
        let tcp: SocketAddr = field("tcp").parse().expect("tcp addr");
        let shards: usize = field("shards").parse().expect("shards");
        let mut agents = HashMap::new();
        let mut integration = None;
        for line in &lines {
            let kv: HashMap<&str, &str> = line
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            if line.starts_with("kefu demo agent=") {
                agents.insert(kv["agent"].to_owned(), kv["token"].to_owned());
            } else if line.starts_with("kefu demo integration ") {
                integration = Some(kv["token"].to_owned());
            }
        }
        Kefu {
            child: Some(child),
            http,
            tcp,
            shards,
            data_dir: data_dir.to_owned(),
            agents,
            integration,
            lines,
            ready_line,
        }
    }

    pub fn agent(&self, name: &str) -> &str {
        &self.agents[name]
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` and waits for the exit (bounded).
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child process.
        unsafe { libc_kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kefu did not exit within 30 s of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn http(&self) -> Http {
        Http::connect(self.http)
    }
}

impl Drop for Kefu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    pub fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Http {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: kefu\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        self.send_raw(req.as_bytes());
        self.read_response()
    }

    pub fn get(&mut self, path: &str, token: Option<&str>) -> Response {
        self.request("GET", path, token, None)
    }

    pub fn post(&mut self, path: &str, token: Option<&str>, body: &str) -> Response {
        self.request("POST", path, token, Some(body))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write request");
    }

    /// Reads one response (Content-Length framed, or to EOF without one).
    pub fn read_response(&mut self) -> Response {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let status: u16 = status_line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                    .collect();
                let len = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse::<usize>().expect("content-length"));
                if status == 100 {
                    self.buf.drain(..end + 4);
                    continue;
                }
                let body_start = end + 4;
                match len {
                    Some(len) => {
                        while self.buf.len() < body_start + len {
                            self.fill();
                        }
                        let body = self.buf[body_start..body_start + len].to_vec();
                        self.buf.drain(..body_start + len);
                        return Response {
                            status,
                            headers,
                            body,
                        };
                    }
                    None => {
                        while self.try_fill() {}
                        let body = self.buf[body_start..].to_vec();
                        self.buf.clear();
                        return Response {
                            status,
                            headers,
                            body,
                        };
                    }
                }
            }
            self.fill();
        }
    }

    fn fill(&mut self) {
        assert!(self.try_fill(), "connection closed before a full response");
    }

    fn try_fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Creates a conversation; answers (conversation_id, visitor_token).
pub fn create_conversation(http: &mut Http, text: Option<&str>) -> (String, String) {
    let body = match text {
        Some(t) => serde_json::json!({"visitor": {"name": "Ann"}, "channel": "web", "text": t}),
        None => serde_json::json!({"visitor": {"name": "Ann"}, "channel": "web"}),
    };
    let r = http.post("/v1/conversations", None, &body.to_string());
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    (
        v["conversation_id"].as_str().expect("id").to_owned(),
        v["visitor_token"].as_str().expect("token").to_owned(),
    )
}

/// What a WebSocket client received.
#[derive(Debug, Clone, PartialEq)]
pub enum WsMsg {
    Text(serde_json::Value),
    Close(Option<u16>),
}

/// A blocking WebSocket client built on the protocol crate's codec (client role), over plain
/// TCP or any other stream (a TLS one: [`Ws::upgrade`]).
pub struct Ws<S: Read + Write = TcpStream> {
    stream: S,
    conn: WsConnection,
    buf: Vec<u8>,
}

fn client_codec() -> WsConnection {
    WsConnection::with_role(
        WsLimits {
            frame_payload_bytes_max: 1 << 24,
            message_bytes_max: 1 << 24,
        },
        Role::Client,
    )
}

impl<S: Read + Write> Ws<S> {
    /// Upgrades `stream` (already connected, a TLS session say) at `path`; panics unless the
    /// answer is a 101.
    pub fn upgrade(mut stream: S, path: &str) -> Ws<S> {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: kefu\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).expect("upgrade write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
                let rest = buf[end + 4..].to_vec();
                return Ws {
                    stream,
                    conn: client_codec(),
                    buf: rest,
                };
            }
            let n = stream.read(&mut chunk).expect("upgrade read");
            assert!(n > 0, "closed before the upgrade's answer");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Ws {
    /// Connects and upgrades; answers the HTTP status when the upgrade is refused.
    pub fn connect(addr: SocketAddr, path: &str) -> Result<Ws, Response> {
        let mut http = Http::connect(addr);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: kefu\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        http.send_raw(req.as_bytes());
        // The 101 has no body: read the head only.
        loop {
            if let Some(end) = find(&http.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&http.buf[..end]).into_owned();
                if !head.starts_with("HTTP/1.1 101") {
                    return Err(http.read_response());
                }
                assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
                let rest = http.buf[end + 4..].to_vec();
                return Ok(Ws {
                    stream: http.stream,
                    conn: client_codec(),
                    buf: rest,
                });
            }
            http.fill();
        }
    }
}

impl<S: Read + Write> Ws<S> {
    /// The stream under the WebSocket (to act on a TLS session, say).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn send_json(&mut self, value: &serde_json::Value) {
        let mut out = Vec::new();
        self.conn.send_text(&mut out, &value.to_string());
        self.stream.write_all(&out).expect("ws write");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("ws write");
    }

    /// Sends text messages (JSON or not) in one write, so the server reads them as a burst.
    pub fn send_texts(&mut self, texts: &[String]) {
        let mut out = Vec::new();
        for t in texts {
            self.conn.send_text(&mut out, t);
        }
        self.stream.write_all(&out).expect("ws write");
    }

    /// The next text message or close (pings are answered by the codec).
    pub fn recv(&mut self) -> WsMsg {
        loop {
            let mut out = Vec::new();
            let step = match self.conn.decode(&mut self.buf, &mut out) {
                Ok((Some(WsEvent::Text(t)), used)) => {
                    let v = serde_json::from_str(t).expect("server sends JSON");
                    Some((Some(WsMsg::Text(v)), used))
                }
                Ok((Some(WsEvent::Close { code, .. }), used)) => {
                    Some((Some(WsMsg::Close(code)), used))
                }
                Ok((_, used)) => Some((None, used)),
                Err(WsError::Incomplete { .. }) => None,
                Err(e) => panic!("ws decode: {e}"),
            };
            if !out.is_empty() {
                let _ = self.stream.write_all(&out);
            }
            match step {
                Some((msg, used)) => {
                    self.buf.drain(..used);
                    if let Some(m) = msg {
                        return m;
                    }
                }
                None => {
                    let mut chunk = [0u8; 65536];
                    match self.stream.read(&mut chunk) {
                        Ok(0) => return WsMsg::Close(None),
                        Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                        Err(e) => panic!("ws read: {e}"),
                    }
                }
            }
        }
    }

    /// The next message that is not a typing/read notice (ephemeral: not stored, no seq of
    /// their own).
    pub fn recv_stored(&mut self) -> WsMsg {
        loop {
            match self.recv() {
                WsMsg::Text(v) if v["event"] == "typing" || v["event"] == "read" => continue,
                other => return other,
            }
        }
    }
}

/// A blocking binary-protocol client.
pub struct Bin<S: Read + Write = TcpStream> {
    stream: S,
    buf: Vec<u8>,
    limits: BinLimits,
}

/// An owned server message of the binary protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum BinMsg {
    Welcome {
        principal: u8,
        tenant: String,
    },
    Ack {
        seq: u64,
        duplicate: bool,
        log_offset: u64,
    },
    Error {
        code: u16,
        reason: String,
    },
    Pong {
        nonce: u64,
    },
    Record {
        kind: u8,
        conversation_id: u64,
        seq: u64,
        bytes: Vec<u8>,
    },
}

impl Bin {
    pub fn connect(addr: SocketAddr) -> Bin {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Bin::over(stream)
    }
}

impl<S: Read + Write> Bin<S> {
    /// A binary-protocol client over an already connected stream (a TLS session, say).
    pub fn over(stream: S) -> Bin<S> {
        Bin {
            stream,
            buf: Vec::new(),
            limits: BinLimits::from_model(&ModelLimits::DEFAULT, 1 << 24),
        }
    }

    pub fn send(&mut self, msg: &ClientMsg<'_>) {
        let mut out = Vec::new();
        binproto::encode_client(msg, 0, &mut out).expect("encode");
        self.stream.write_all(&out).expect("write");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends frames in one write, so the server reads them as a burst.
    pub fn send_all(&mut self, msgs: &[ClientMsg<'_>]) {
        let mut out = Vec::new();
        for m in msgs {
            binproto::encode_client(m, 0, &mut out).expect("encode");
        }
        self.stream.write_all(&out).expect("write");
    }

    pub fn recv(&mut self) -> Option<BinMsg> {
        loop {
            match binproto::decode_server(&self.buf, &self.limits) {
                Ok((msg, used)) => {
                    let owned = match msg {
                        binproto::ServerMsg::Welcome(w) => BinMsg::Welcome {
                            principal: w.principal as u8,
                            tenant: w.tenant.to_owned(),
                        },
                        binproto::ServerMsg::Ack {
                            seq,
                            duplicate,
                            log_offset,
                            ..
                        } => BinMsg::Ack {
                            seq,
                            duplicate,
                            log_offset,
                        },
                        binproto::ServerMsg::Error { code, reason, .. } => BinMsg::Error {
                            code,
                            reason: reason.to_owned(),
                        },
                        binproto::ServerMsg::Pong { nonce } => BinMsg::Pong { nonce },
                        binproto::ServerMsg::Record(f) => BinMsg::Record {
                            kind: f.header.kind as u8,
                            conversation_id: f.header.conversation_id,
                            seq: f.header.seq,
                            bytes: f.bytes.to_vec(),
                        },
                    };
                    self.buf.drain(..used);
                    return Some(owned);
                }
                Err(e) if e.is_incomplete() => {}
                Err(e) => panic!("binary decode: {e}"),
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("binary read: {e}"),
            }
        }
    }
}

/// Reads everything from a TCP connection until EOF or `quiet` passes without bytes.
pub fn read_until_quiet(stream: &mut TcpStream, quiet: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(quiet)).expect("timeout");
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(_) => return out,
        }
    }
}
