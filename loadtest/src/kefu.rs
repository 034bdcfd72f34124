//! kefu's public API as the scenarios need it for setup: blocking one-off HTTP calls (create a
//! conversation, set an agent online, read history) and the demo credentials that `kefu`
//! prints. Setup is not measured, so it favours plainness over speed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::http1::{BodyReader, ParseError, build_request, parse_head};

/// Timeout of one setup call.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const SETUP_RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A blocking HTTP/1.1 call; returns the status and the body.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    crate::target::check_loopback(addr)?;
    let mut s = TcpStream::connect_timeout(&addr, SETUP_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(SETUP_TIMEOUT))?;
    s.set_write_timeout(Some(SETUP_TIMEOUT))?;
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Connection", "close")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let body_bytes = body.map(|b| b.to_string()).unwrap_or_default();
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let req = build_request(
        method,
        &addr.to_string(),
        path,
        &headers,
        body_bytes.as_bytes(),
    );
    s.write_all(&req)
        .with_context(|| format!("{method} {path}: sending"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head = loop {
        match parse_head(&buf, 64 * 1024) {
            Ok(h) => break h,
            Err(ParseError::Incomplete) => {}
            Err(e) => bail!("{method} {path}: {e}"),
        }
        let n = read_retrying(&mut s, &mut chunk)
            .with_context(|| format!("{method} {path}: reading"))?;
        if n == 0 {
            bail!("{method} {path}: connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut reader = BodyReader::new(head.body);
    let mut out = Vec::new();
    let mut pending = buf.split_off(head.head_len);
    loop {
        let n = reader
            .feed(&pending, |d| out.extend_from_slice(d))
            .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
        pending.drain(..n);
        if reader.is_done() || out.len() > SETUP_RESPONSE_BYTES_MAX {
            break;
        }
        let n = read_retrying(&mut s, &mut chunk)
            .with_context(|| format!("{method} {path}: reading body"))?;
        if n == 0 {
            if reader == BodyReader::UntilClose {
                break;
            }
            bail!("{method} {path}: connection closed inside the body");
        }
        pending.extend_from_slice(&chunk[..n]);
    }
    Ok((head.status, out))
}

/// `read`, retried on EINTR: called from a thread that also runs an io_uring runtime (chat
/// creates conversations inside it), the kernel's task-work notification interrupts blocking
/// reads.
fn read_retrying(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A call that must answer one of `ok` statuses with a JSON body.
pub fn call_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    ok: &[u16],
) -> anyhow::Result<Value> {
    let (status, bytes) = call(addr, method, path, token, body)?;
    if !ok.contains(&status) {
        bail!(
            "{method} {path}: status {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: body is not JSON"))
}

/// A conversation a scenario created, with the visitor's credential.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub id: String,
    pub visitor_token: String,
}

impl Conversation {
    /// The bytes of its visitor's `POST /v1/conversations/{id}/messages` with a JSON `body`.
    pub fn send_request(&self, host: &str, body: &str) -> Vec<u8> {
        build_request(
            "POST",
            host,
            &format!("/v1/conversations/{}/messages", self.id),
            &[
                ("Authorization", &format!("Bearer {}", self.visitor_token)),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    }
}

pub fn create_conversation(
    addr: SocketAddr,
    visitor: &str,
    text: Option<&str>,
) -> anyhow::Result<Conversation> {
    let mut body = serde_json::json!({"visitor": {"name": visitor}, "channel": "web"});
    if let Some(t) = text {
        body["text"] = t.into();
    }
    let v = call_json(
        addr,
        "POST",
        "/v1/conversations",
        None,
        Some(&body),
        &[200, 201],
    )?;
    let id = v["conversation_id"]
        .as_str()
        .context("no conversation_id in the answer")?;
    let token = v["visitor_token"]
        .as_str()
        .context("no visitor_token in the answer")?;
    Ok(Conversation {
        id: id.to_string(),
        visitor_token: token.to_string(),
    })
}

pub fn set_agent_status(addr: SocketAddr, agent_token: &str, online: bool) -> anyhow::Result<()> {
    let body = serde_json::json!({"status": if online { "online" } else { "offline" }});
    call_json(
        addr,
        "POST",
        "/v1/agents/me/status",
        Some(agent_token),
        Some(&body),
        &[200, 201, 204],
    )?;
    Ok(())
}

/// Demo credentials as printed by `kefu` before its ready line.
#[derive(Debug, Clone, Default)]
pub struct DemoCredentials {
    /// (agent name, groups, token)
    pub agents: Vec<(String, Vec<String>, String)>,
    pub integration: Option<String>,
}

impl DemoCredentials {
    /// Read `kefu demo ...` lines; other lines are ignored.
    pub fn parse(text: &str) -> DemoCredentials {
        let mut d = DemoCredentials::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("kefu demo ") else {
                continue;
            };
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name).map(str::to_string))
            };
            if let Some(agent) = rest.strip_prefix("agent=").and(field("agent=")) {
                let groups = field("groups=").unwrap_or_default();
                if let Some(token) = field("token=") {
                    let groups = groups
                        .split(',')
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect();
                    d.agents.push((agent, groups, token));
                }
            } else if rest.starts_with("integration") {
                d.integration = field("token=");
            }
        }
        d
    }
}

/// The `kefu ready http=ADDR tcp=ADDR shards=N data=DIR` line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub http: SocketAddr,
    pub tcp: Option<SocketAddr>,
    pub shards: Option<usize>,
}

pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.trim().strip_prefix("kefu ready ")?;
    let field = |name: &str| rest.split_whitespace().find_map(|kv| kv.strip_prefix(name));
    Some(Ready {
        http: field("http=")?.parse().ok()?,
        tcp: field("tcp=").and_then(|v| v.parse().ok()),
        shards: field("shards=").and_then(|v| v.parse().ok()),
    })
}

/// A process's resident memory in KiB, from `/proc/PID/status` (VmRSS).
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_and_ready_lines() {
        let out = "kefu demo agent=alice groups=sales,support token=tA\n\
                   kefu demo agent=bob groups=support token=tB\n\
                   kefu demo integration token=tI\n\
                   kefu ready http=127.0.0.1:4001 tcp=127.0.0.1:4002 shards=2 data=/tmp/x\n";
        let d = DemoCredentials::parse(out);
        assert_eq!(d.agents.len(), 2);
        assert_eq!(
            d.agents[0],
            (
                "alice".into(),
                vec!["sales".into(), "support".into()],
                "tA".into()
            )
        );
        assert_eq!(d.integration.as_deref(), Some("tI"));
        let r = out.lines().find_map(parse_ready).unwrap();
        assert_eq!(r.http, "127.0.0.1:4001".parse().unwrap());
        assert_eq!(r.shards, Some(2));
        assert!(parse_ready("kefu ready http=nonsense").is_none());
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
    }
}
