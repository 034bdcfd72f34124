//! `cargo xtask loadtest`: build release, start kefu on a temporary data dir and port 0, wait
//! for its ready line, run a `kefu-loadtest` scenario against it, stop kefu with SIGTERM, and
//! fail when a target was missed.
//!
//! xtask stays light: the generator is the `kefu-loadtest` binary, run as a child process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{cargo, project_root};

const USAGE: &str = "\
usage: cargo xtask loadtest [--scenario send|chat|connections|reconnect|http] [xtask flags] [scenario flags]

xtask flags:
  --scenario NAME        (send); `http` loads GET /healthz unless --url is given
  --shards N             kefu --shards (default: kefu's, one per core)
  --durability MODE      kefu --durability always|interval:MS|never (default: kefu's config)
  --kefu-config PATH     kefu --config PATH (default: kefu's embedded demo config)
  --ready-timeout-s S    wait for `kefu ready` at most S seconds (30)
  --no-build             use the release binaries as they are

Every other flag goes to `kefu-loadtest SCENARIO` (see `kefu-loadtest help`), e.g.
  --min-rps 8900 --max-p99-ms 11 --compare wrk --json report.json
Exit status is non-zero when a target is missed.";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut scenario = "send".to_string();
    let mut shards: Option<String> = None;
    let mut durability: Option<String> = None;
    let mut kefu_config: Option<String> = None;
    let mut ready_timeout = Duration::from_secs(30);
    let mut build = true;
    let mut forward: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--scenario" => scenario = value("--scenario")?,
            "--shards" => shards = Some(value("--shards")?),
            "--durability" => durability = Some(value("--durability")?),
            "--kefu-config" => kefu_config = Some(value("--kefu-config")?),
            "--ready-timeout-s" => {
                let v = value("--ready-timeout-s")?;
                let secs: f64 = v
                    .parse()
                    .with_context(|| format!("--ready-timeout-s {v}"))?;
                ready_timeout = Duration::from_secs_f64(secs);
            }
            "--no-build" => build = false,
            _ => forward.push(a.clone()),
        }
    }

    let root = project_root();
    if build {
        let mut cmd = cargo();
        cmd.current_dir(&root).args([
            "build",
            "--release",
            "-p",
            "kefu-gateway",
            "-p",
            "kefu-loadtest",
        ]);
        crate::run(&mut cmd)?;
    }
    let bin_dir = target_dir(&root).join("release");
    let kefu_bin = bin_dir.join("kefu");
    let loadtest_bin = bin_dir.join("kefu-loadtest");
    for b in [&kefu_bin, &loadtest_bin] {
        if !b.exists() {
            bail!("{} is missing: build it (drop --no-build)", b.display());
        }
    }

    let data_dir = temp_dir()?;
    let result = with_kefu(
        &kefu_bin,
        &data_dir,
        KefuFlags {
            shards: shards.as_deref(),
            durability: durability.as_deref(),
            config: kefu_config.as_deref(),
        },
        ready_timeout,
        |kefu| {
            let mut cmd = Command::new(&loadtest_bin);
            cmd.arg(&scenario);
            if scenario == "http" {
                // The plain HTTP scenario takes a URL: kefu's health endpoint unless given one.
                if !forward
                    .iter()
                    .any(|a| a == "--url" || a.starts_with("--url="))
                {
                    cmd.arg("--url")
                        .arg(format!("http://{}/healthz", kefu.http));
                }
            } else {
                cmd.arg("--http").arg(kefu.http.as_str());
            }
            match scenario.as_str() {
                "chat" => {
                    for t in &kefu.agent_tokens {
                        cmd.arg("--agent-token").arg(t);
                    }
                }
                "connections" => {
                    cmd.arg("--gateway-pid").arg(kefu.pid.to_string());
                }
                _ => {}
            }
            cmd.args(&forward);
            let status = cmd
                .status()
                .with_context(|| format!("running {}", loadtest_bin.display()))?;
            Ok(status.code())
        },
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    match result? {
        Some(0) => Ok(()),
        Some(1) => bail!("load test: a target was missed (see the report above)"),
        other => bail!("load test failed (kefu-loadtest exit status {other:?})"),
    }
}

/// What the scenario needs to know about the running gateway.
struct RunningKefu {
    pid: u32,
    http: String,
    agent_tokens: Vec<String>,
}

/// Kills the gateway if the caller returns early (the normal path stops it with SIGTERM).
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Flags passed through to `kefu`.
struct KefuFlags<'a> {
    shards: Option<&'a str>,
    durability: Option<&'a str>,
    config: Option<&'a str>,
}

fn with_kefu<T>(
    kefu_bin: &Path,
    data_dir: &Path,
    flags: KefuFlags<'_>,
    ready_timeout: Duration,
    body: impl FnOnce(&RunningKefu) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let stderr_path = data_dir.with_extension("stderr.log");
    let stderr_file = std::fs::File::create(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    let mut cmd = Command::new(kefu_bin);
    cmd.args([
        "--http",
        "127.0.0.1:0",
        "--tcp",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data_dir);
    if let Some(s) = flags.shards {
        cmd.args(["--shards", s]);
    }
    if let Some(d) = flags.durability {
        cmd.args(["--durability", d]);
    }
    if let Some(c) = flags.config {
        cmd.args(["--config", c]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_file));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kefu_bin.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("kefu stdout")?;
    let mut guard = KillOnDrop(Some(child));

    // Lines arrive on a thread so the wait can time out; the thread keeps draining stdout
    // afterwards so kefu never blocks on a full pipe.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Receiver gone: keep reading and dropping.
            }
        }
    });
    let deadline = Instant::now() + ready_timeout;
    let mut agent_tokens = Vec::new();
    let http = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("kefu demo agent=") {
                    if let Some(tok) = rest
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("token="))
                    {
                        agent_tokens.push(tok.to_string());
                    }
                } else if let Some(rest) = line.strip_prefix("kefu ready ") {
                    let http = rest
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("http="))
                        .with_context(|| format!("ready line without http=: {line}"))?;
                    eprintln!("xtask loadtest: {line}");
                    break http.to_string();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "kefu printed no ready line within {ready_timeout:?}; its stderr:\n{}",
                    tail(&stderr_path)
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.0.as_mut().and_then(|c| c.wait().ok());
                bail!(
                    "kefu exited before it was ready ({status:?}); its stderr:\n{}",
                    tail(&stderr_path)
                )
            }
        }
    };
    let kefu = RunningKefu {
        pid,
        http,
        agent_tokens,
    };
    let out = body(&kefu);

    // SIGTERM: kefu drains, syncs and exits 0; give it a bounded time.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let child = guard.0.as_mut().expect("child is held until here");
    let stop_deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= stop_deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match status {
        Some(s) if s.success() => {
            guard.0 = None;
            eprintln!("xtask loadtest: kefu stopped cleanly on SIGTERM");
        }
        Some(s) => {
            guard.0 = None;
            eprintln!(
                "xtask loadtest: kefu exited with {s} on SIGTERM; its stderr:\n{}",
                tail(&stderr_path)
            );
        }
        None => eprintln!("xtask loadtest: kefu did not stop within 15 s of SIGTERM; killing it"),
    }
    drop(guard);
    let _ = std::fs::remove_file(&stderr_path);
    out
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root.join(d) }
        }
        None => root.join("target"),
    }
}

/// A fresh, empty directory under the system temp dir for kefu's data.
fn temp_dir() -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("kefu-loadtest-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
