//! Gateway configuration: the TOML file (unknown keys rejected), the embedded default, command-line flags, and the checks that turn bad values into one-line errors naming the key.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::tenant::TenantConfig;

/// The config `kefu` runs on without `--config`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../kefu.default.toml");

/// A bad config or bad flags: `key` names what is wrong, so the operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// When an appended record counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before every acknowledgement (group commit: one sync per batch).
    Always,
    /// Acknowledge after the write; a background sync every `ms`.
    Interval { ms: u64 },
    /// Never sync (the kernel writes back when it likes).
    Never,
}

/// Where a shard's group-commit sync runs (`server.sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The shard thread calls `fdatasync` itself between rounds: no hand-off to another thread
    /// and no wake-up when it ends; whatever arrives meanwhile waits in the socket buffers
    /// and forms the next group. The shard serves nothing else for that time (0.1-0.3 ms here).
    Inline,
    /// An io_uring fsync op on the shard's ring, run by the kernel's workers (a flusher thread
    /// under the legacy driver): the shard keeps serving while the device flushes, and syncs
    /// can be pipelined (`limits.syncs_in_flight_max`).
    Ring,
}

impl SyncMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "inline" => Ok(Self::Inline),
            "ring" => Ok(Self::Ring),
            _ => Err(format!("`{text}`: expected inline or ring")),
        }
    }
}

/// Which monoio driver the shards run on (`server.driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    /// io_uring with `setup_single_issuer` + `setup_defer_taskrun`, then plain io_uring, then
    /// the legacy epoll driver, each fallback logged.
    Auto,
    /// The legacy epoll driver (syncs on a flusher thread): for kernels or sandboxes where
    /// io_uring is set up but its ops are refused.
    Legacy,
}

impl DriverChoice {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "legacy" => Ok(Self::Legacy),
            _ => Err(format!("`{text}`: expected auto or legacy")),
        }
    }
}

impl Durability {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => {
                let ms = text
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|ms| (1..=60_000).contains(ms))
                    .ok_or_else(|| {
                        format!("{text:?} is not always, never or interval:MS with MS in 1..=60000")
                    })?;
                Ok(Self::Interval { ms })
            }
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Never => f.write_str("never"),
            Self::Interval { ms } => write!(f, "interval:{ms}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub tls: Option<TlsFile>,
    #[serde(default)]
    /// No tenant: the embedded demo tenant (`tenant::DEMO_TENANT_TOML`).
    pub tenant: Vec<TenantConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub http: String,
    pub tcp: String,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz` to anyone who reaches it; nothing
    /// else). Empty: none, and `/metrics` is answered on the HTTP listener to loopback peers.
    pub admin: String,
    pub data_dir: PathBuf,
    pub shards: usize,
    pub backlog: u32,
    pub durability: String,
    pub sync: String,
    pub pin_threads: bool,
    pub sync_realtime: bool,
    pub migrate_connections: bool,
    pub driver: String,
    pub uring_entries: u32,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            http: "127.0.0.1:8080".into(),
            tcp: "127.0.0.1:7070".into(),
            admin: String::new(),
            data_dir: "./kefu-data".into(),
            shards: 0,
            backlog: 1024,
            durability: "always".into(),
            sync: "ring".into(),
            pin_threads: true,
            sync_realtime: true,
            migrate_connections: true,
            driver: "auto".into(),
            uring_entries: 1024,
        }
    }
}

/// Every bound of the gateway, chosen at start. Units are in the names.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub connections_per_shard_max: usize,
    pub shard_inbox_depth: usize,
    pub subscriber_queue_depth: usize,
    pub subscriptions_per_socket_max: usize,
    pub request_head_bytes_max: usize,
    pub request_uri_bytes_max: usize,
    pub request_headers_max: usize,
    pub request_body_bytes_max: usize,
    pub ws_frame_bytes_max: usize,
    pub binary_frame_bytes_max: usize,
    pub text_bytes_max: usize,
    pub client_msg_id_bytes_max: usize,
    pub idle_timeout_ms: u64,
    /// An HTTP request must arrive whole this long after its first bytes (plus one second
    /// per `upload_bytes_per_s_min` bytes of its body), else 408 and the connection closes.
    pub request_timeout_ms: u64,
    /// The slowest body upload rate allowed for (see `request_timeout_ms`).
    pub upload_bytes_per_s_min: u64,
    /// A write that the peer takes no byte of for this long closes the connection
    /// (`kefu_disconnects_total{reason="write_timeout"}`).
    pub write_timeout_ms: u64,
    pub ws_ping_interval_ms: u64,
    /// `POST /v1/conversations` per peer address and shard: sustained rate (0: no limit) and
    /// burst, over a table of at most `conversation_create_ips_tracked_max` addresses (429
    /// with `Retry-After` beyond). IPv6 peers count by /64. Loopback peers are not limited
    /// unless `ip_limits_include_loopback` (a reverse proxy on the same host then
    /// counts as one address).
    pub conversation_creates_per_ip_per_s: u32,
    pub conversation_creates_per_ip_burst: u32,
    pub conversation_create_ips_tracked_max: usize,
    /// Client connections per peer address and shard (IPv6 by /64; 0: no limit); beyond, a new
    /// connection is answered 503 (HTTP) or an error frame (binary) and closed.
    pub connections_per_ip_max: usize,
    /// Apply the per-address limits (`conversation_creates_per_ip_*`,
    /// `connections_per_ip_max`) to loopback peers too.
    pub ip_limits_include_loopback: bool,
    pub long_poll_timeout_ms_max: u64,
    pub history_limit_max: usize,
    pub conversations_per_shard_max: usize,
    pub idempotency_keys_per_conversation_max: usize,
    pub idempotency_keys_per_shard_max: usize,
    pub buffers_per_shard_max: usize,
    pub buffer_bytes: usize,
    pub stream_chunk_bytes_max: usize,
    pub overload_inflight_per_shard_max: usize,
    /// Size of one log segment file (pre-allocated).
    pub segment_bytes_max: u64,
    /// Log retention per shard (0: keep everything, the default): the oldest segments go while
    /// the log is larger than `log_retention_bytes_max`, or while their newest record is older
    /// than `log_retention_age_ms`, but never a record of an open conversation (its first
    /// record on is kept) or of the active segment. Closed conversations that began in a
    /// deleted segment are forgotten first (404, as when a full shard forgets them).
    pub log_retention_bytes_max: u64,
    pub log_retention_age_ms: u64,
    /// Group-commit syncs of one shard's log running at once (pipelined group commit).
    pub syncs_in_flight_max: usize,
    /// Append into log segments written full of zeros ahead of time (storage's
    /// `zero_fill_segments`: the first at start, about 0.2 s for 64 MiB, the next on a
    /// background thread): syncs skip the extent conversion and inode write that a
    /// `fallocate`d segment costs. One spare segment of disk per shard.
    pub zero_fill_segments: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_per_shard_max: 20_000,
            shard_inbox_depth: 8192,
            subscriber_queue_depth: 1024,
            subscriptions_per_socket_max: 64,
            request_head_bytes_max: 8192,
            request_uri_bytes_max: 2048,
            request_headers_max: 64,
            request_body_bytes_max: 65_536,
            ws_frame_bytes_max: 65_536,
            binary_frame_bytes_max: 65_536,
            text_bytes_max: 8192,
            client_msg_id_bytes_max: 128,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 30_000,
            upload_bytes_per_s_min: 65_536,
            write_timeout_ms: 30_000,
            ws_ping_interval_ms: 20_000,
            conversation_creates_per_ip_per_s: 2,
            conversation_creates_per_ip_burst: 20,
            conversation_create_ips_tracked_max: 65_536,
            connections_per_ip_max: 4096,
            ip_limits_include_loopback: false,
            long_poll_timeout_ms_max: 60_000,
            history_limit_max: 1000,
            conversations_per_shard_max: 100_000,
            idempotency_keys_per_conversation_max: 1024,
            idempotency_keys_per_shard_max: 1_000_000,
            buffers_per_shard_max: 4096,
            buffer_bytes: 4096,
            stream_chunk_bytes_max: 1 << 20,
            overload_inflight_per_shard_max: 4096,
            segment_bytes_max: 64 << 20,
            log_retention_bytes_max: 0,
            log_retention_age_ms: 0,
            syncs_in_flight_max: 1,
            zero_fill_segments: true,
        }
    }
}

impl Limits {
    fn check(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, usize, usize, usize); 22] = [
            (
                "syncs_in_flight_max",
                self.syncs_in_flight_max,
                1,
                kefu_storage::SYNCS_IN_FLIGHT_LIMIT,
            ),
            (
                "connections_per_shard_max",
                self.connections_per_shard_max,
                1,
                1 << 20,
            ),
            ("shard_inbox_depth", self.shard_inbox_depth, 16, 1 << 20),
            (
                "subscriber_queue_depth",
                self.subscriber_queue_depth,
                4,
                1 << 20,
            ),
            (
                "subscriptions_per_socket_max",
                self.subscriptions_per_socket_max,
                1,
                1 << 16,
            ),
            (
                "request_head_bytes_max",
                self.request_head_bytes_max,
                256,
                1 << 20,
            ),
            (
                "request_uri_bytes_max",
                self.request_uri_bytes_max,
                16,
                1 << 16,
            ),
            ("request_headers_max", self.request_headers_max, 4, 1024),
            (
                "request_body_bytes_max",
                self.request_body_bytes_max,
                64,
                1 << 30,
            ),
            ("ws_frame_bytes_max", self.ws_frame_bytes_max, 64, 1 << 26),
            (
                "binary_frame_bytes_max",
                self.binary_frame_bytes_max,
                64,
                1 << 26,
            ),
            ("text_bytes_max", self.text_bytes_max, 1, 1 << 24),
            (
                "client_msg_id_bytes_max",
                self.client_msg_id_bytes_max,
                1,
                4096,
            ),
            ("history_limit_max", self.history_limit_max, 1, 100_000),
            (
                "conversations_per_shard_max",
                self.conversations_per_shard_max,
                1,
                1 << 28,
            ),
            (
                "idempotency_keys_per_conversation_max",
                self.idempotency_keys_per_conversation_max,
                1,
                1 << 20,
            ),
            (
                "idempotency_keys_per_shard_max",
                self.idempotency_keys_per_shard_max,
                1,
                1 << 28,
            ),
            (
                "buffers_per_shard_max",
                self.buffers_per_shard_max,
                1,
                1 << 24,
            ),
            ("buffer_bytes", self.buffer_bytes, 512, 1 << 24),
            (
                "stream_chunk_bytes_max",
                self.stream_chunk_bytes_max,
                4096,
                1 << 30,
            ),
            (
                "overload_inflight_per_shard_max",
                self.overload_inflight_per_shard_max,
                1,
                1 << 24,
            ),
            (
                "idle_timeout_ms",
                self.idle_timeout_ms.min(u64::from(u32::MAX)) as usize,
                100,
                86_400_000,
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::new(
                    format!("limits.{key}"),
                    format!("{value} is not in {lo}..={hi}"),
                ));
            }
        }
        if !((1 << 20)..=(1 << 31)).contains(&self.segment_bytes_max) {
            return Err(ConfigError::new(
                "limits.segment_bytes_max",
                "must be in 1048576..=2147483648",
            ));
        }
        for (key, value) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&value) {
                return Err(ConfigError::new(
                    format!("limits.{key}"),
                    format!("{value} is not in 100..=3600000"),
                ));
            }
        }
        if self.conversation_creates_per_ip_per_s > 0 {
            if !(1..=1_000_000).contains(&self.conversation_creates_per_ip_burst) {
                return Err(ConfigError::new(
                    "limits.conversation_creates_per_ip_burst",
                    format!(
                        "{} is not in 1..=1000000",
                        self.conversation_creates_per_ip_burst
                    ),
                ));
            }
            if !(1..=(1 << 24)).contains(&self.conversation_create_ips_tracked_max) {
                return Err(ConfigError::new(
                    "limits.conversation_create_ips_tracked_max",
                    format!(
                        "{} is not in 1..=16777216",
                        self.conversation_create_ips_tracked_max
                    ),
                ));
            }
        }
        if self.log_retention_bytes_max != 0
            && self.log_retention_bytes_max < 2 * self.segment_bytes_max
        {
            return Err(ConfigError::new(
                "limits.log_retention_bytes_max",
                format!(
                    "{} is below two segments (2 x segment_bytes_max = {}); 0 keeps everything",
                    self.log_retention_bytes_max,
                    2 * self.segment_bytes_max
                ),
            ));
        }
        if self.connections_per_ip_max > 1 << 24 {
            return Err(ConfigError::new(
                "limits.connections_per_ip_max",
                format!("{} is not in 0..=16777216", self.connections_per_ip_max),
            ));
        }
        if !(1024..=(1 << 30)).contains(&self.upload_bytes_per_s_min) {
            return Err(ConfigError::new(
                "limits.upload_bytes_per_s_min",
                format!(
                    "{} is not in 1024..=1073741824",
                    self.upload_bytes_per_s_min
                ),
            ));
        }
        if !(10..=self.idle_timeout_ms).contains(&self.ws_ping_interval_ms) {
            return Err(ConfigError::new(
                "limits.ws_ping_interval_ms",
                "must be in 10..=idle_timeout_ms",
            ));
        }
        if !(1..=600_000).contains(&self.long_poll_timeout_ms_max) {
            return Err(ConfigError::new(
                "limits.long_poll_timeout_ms_max",
                "must be in 1..=600000",
            ));
        }
        if self.text_bytes_max + 1024 > self.request_body_bytes_max {
            return Err(ConfigError::new(
                "limits.text_bytes_max",
                "must leave 1024 bytes of request_body_bytes_max for the JSON around it",
            ));
        }
        // The log refuses a record larger than a segment: a text that could be stored larger
        // than that could never be stored at all.
        if self.record_bytes_max() > self.segment_bytes_max {
            return Err(ConfigError::new(
                "limits.text_bytes_max",
                format!(
                    "a text of {} bytes may be stored as a record of {} bytes (JSON escapes a \
                     control character as \\u00XX, {JSON_ESCAPED_BYTES_PER_BYTE_MAX} bytes), \
                     more than limits.segment_bytes_max = {}",
                    self.text_bytes_max,
                    self.message_record_bytes_max(),
                    self.segment_bytes_max
                ),
            ));
        }
        Ok(())
    }

    /// The largest stored message record (frame header and JSON payload) these limits let
    /// through, with every string at its longest and escaped at its worst.
    ///
    /// A message record is `MessageRecordRef` as JSON: tenant, sender id, text and
    /// `client_msg_id`, plus numbers. Its text is checked as UTF-8 bytes before it is stored
    /// (`text_bytes_max`; an agent's canned reply or the tenant's auto-reply may be up to
    /// `tenant::REPLY_TEXT_BYTES_MAX` instead) and written escaped, where a control character
    /// takes six bytes (`\u0001`). Over HTTP and WebSocket the client had to escape it the
    /// same way, but the binary protocol carries the text raw: 8 KiB of control characters in
    /// a `Send` frame are a 48 KiB record.
    pub fn message_record_bytes_max(&self) -> u64 {
        use kefu_protocol::model::{ConversationId, MessageRecordRef, ParticipantRef, Role};
        let empty = MessageRecordRef {
            tenant: "",
            conversation_id: ConversationId(u64::MAX),
            seq: u64::MAX,
            ts: u64::MAX,
            from: ParticipantRef {
                role: Role::Visitor,
                id: "",
            },
            text: "",
            client_msg_id: Some(""),
        };
        let skeleton = serde_json::to_vec(&empty).map_or(0, |v| v.len());
        let names = crate::tenant::NAME_BYTES_MAX;
        let text = self.text_bytes_max.max(crate::tenant::REPLY_TEXT_BYTES_MAX);
        let strings = names + names + text + self.client_msg_id_bytes_max;
        (kefu_protocol::frame::HEADER_LEN + skeleton + strings * JSON_ESCAPED_BYTES_PER_BYTE_MAX)
            as u64
    }

    /// The shard log's `record_bytes_max`: room for the largest message record
    /// ([`Self::message_record_bytes_max`]; event records are far smaller), and never less
    /// than the `request_body_bytes_max + 4096`, at least 64 KiB, that bounded records before,
    /// so no message taken before is refused now.
    pub fn record_bytes_max(&self) -> u64 {
        let before = (self.request_body_bytes_max as u64 + 4096).max(1 << 16);
        before.max(self.message_record_bytes_max())
    }
}

/// Most bytes serde_json writes for one byte of a string: a control character becomes
/// `\u00XX` (any other character is written as it is, or as a two-byte escape).
pub const JSON_ESCAPED_BYTES_PER_BYTE_MAX: usize = 6;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFile {
    pub visitor_token_ttl_ms: u64,
}

impl Default for AuthFile {
    fn default() -> Self {
        Self {
            visitor_token_ttl_ms: 86_400_000,
        }
    }
}

/// TLS for the listeners that ask for it (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    #[serde(default = "yes")]
    pub http: bool,
    #[serde(default)]
    pub tcp: bool,
}

fn yes() -> bool {
    true
}

/// Flag overrides (`None`: keep the file's value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub admin: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub shards: Option<String>,
    pub durability: Option<String>,
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Serve(Flags),
    Help,
    Version,
    /// Print the embedded default config, with its demo tenant written out.
    PrintDefaultConfig,
}

pub const USAGE: &str = "usage: kefu [serve] [--config PATH] [--http ADDR] [--tcp ADDR] [--admin ADDR] [--data-dir DIR] [--shards N] [--durability always|interval:MS|never]\n       kefu --print-default-config   (the embedded config, a starting point for --config)";

/// The embedded default config as a file would hold it: the defaults, then the demo tenant
/// that kefu uses when a config names no tenant (`[[tenant]]` and its `[[tenant.agent]]`
/// sections). `kefu --config` on this text runs the same gateway as no `--config`.
pub fn default_config_text() -> String {
    let tenant = crate::tenant::DEMO_TENANT_TOML.replace("\n[[", "\n[[tenant.");
    format!("{DEFAULT_CONFIG_TOML}\n[[tenant]]{tenant}")
}

/// Parses the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut flags = Flags::default();
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("serve") {
        args.next();
    }
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--print-default-config" => return Ok(Command::PrintDefaultConfig),
            "--config" | "--http" | "--tcp" | "--admin" | "--data-dir" | "--shards"
            | "--durability" => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .ok_or_else(|| ConfigError::new(&name, "needs a value"))?,
                };
                let slot = match name.as_str() {
                    "--config" => {
                        flags.config = Some(value.into());
                        continue;
                    }
                    "--data-dir" => {
                        flags.data_dir = Some(value.into());
                        continue;
                    }
                    "--http" => &mut flags.http,
                    "--tcp" => &mut flags.tcp,
                    "--admin" => &mut flags.admin,
                    "--shards" => &mut flags.shards,
                    _ => &mut flags.durability,
                };
                *slot = Some(value);
            }
            _ => return Err(ConfigError::new(arg, "unknown argument (see kefu --help)")),
        }
    }
    Ok(Command::Serve(flags))
}

/// The checked configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    /// `server.admin` / `--admin`: the admin listener, if any.
    pub admin: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub shards: usize,
    pub backlog: u32,
    pub durability: Durability,
    pub sync: SyncMode,
    /// Pin shard `i` to CPU `i % cpus` (`server.pin_threads`).
    pub pin_threads: bool,
    /// Run the threads that sync the logs (the shards' io_uring workers, the legacy driver's
    /// flushers) as `SCHED_FIFO` priority 1 (`server.sync_realtime`).
    pub sync_realtime: bool,
    /// Move a plain keep-alive HTTP connection to the shard its message sends go to
    /// (`server.migrate_connections`, see [`crate::migrate`]).
    pub migrate_connections: bool,
    pub driver: DriverChoice,
    pub uring_entries: u32,
    pub limits: Limits,
    pub visitor_token_ttl_ms: u64,
    pub tls: Option<TlsFile>,
    pub tenants: Vec<TenantConfig>,
    /// Where relative paths of the config (intents files) are resolved.
    pub config_dir: PathBuf,
}

/// Reads the file named by `--config` (or the embedded default) and applies the flags.
pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
    let (text, origin) = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("--config", format!("{}: {e}", path.display())))?;
            (text, path.display().to_string())
        }
        None => (
            DEFAULT_CONFIG_TOML.to_owned(),
            "embedded default".to_owned(),
        ),
    };
    let file = parse_toml(&text, &origin)?;
    let mut config = resolve(file, flags)?;
    if let Some(dir) = flags.config.as_ref().and_then(|p| p.parent()) {
        config.config_dir = dir.to_owned();
    }
    Ok(config)
}

/// Parses config text; errors name the key (or the line and column where TOML gave up).
pub fn parse_toml(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let (line, col) = e
            .span()
            .map(|span| line_col(text, span.start))
            .unwrap_or((0, 0));
        let message = e.message().replace('\n', " ");
        ConfigError::new(
            format!("{origin} line {line} column {col}"),
            message.trim().to_owned(),
        )
    })
}

fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

fn addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("{text:?} is not an IP:PORT address (e.g. 127.0.0.1:8080)"),
        )
    })
}

/// Applies flags over the file and checks every value.
pub fn resolve(file: FileConfig, flags: &Flags) -> Result<Config, ConfigError> {
    let http = match &flags.http {
        Some(v) => addr("--http", v)?,
        None => addr("server.http", &file.server.http)?,
    };
    let tcp = match &flags.tcp {
        Some(v) => addr("--tcp", v)?,
        None => addr("server.tcp", &file.server.tcp)?,
    };
    let admin = match &flags.admin {
        Some(v) => Some(addr("--admin", v)?),
        None if file.server.admin.is_empty() => None,
        None => Some(addr("server.admin", &file.server.admin)?),
    };
    let shards = match &flags.shards {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ConfigError::new("--shards", format!("{v:?} is not a number")))?,
        None => file.server.shards,
    };
    let shards = if shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        shards
    };
    // 16 bits of a conversation id name its shard; far fewer threads make sense.
    if !(1..=256).contains(&shards) {
        let key = if flags.shards.is_some() {
            "--shards"
        } else {
            "server.shards"
        };
        return Err(ConfigError::new(
            key,
            format!("{shards} is not in 0..=256 (0: one per core)"),
        ));
    }
    let durability = match &flags.durability {
        Some(v) => Durability::parse(v).map_err(|p| ConfigError::new("--durability", p))?,
        None => Durability::parse(&file.server.durability)
            .map_err(|p| ConfigError::new("server.durability", p))?,
    };
    let sync =
        SyncMode::parse(&file.server.sync).map_err(|p| ConfigError::new("server.sync", p))?;
    let driver = DriverChoice::parse(&file.server.driver)
        .map_err(|p| ConfigError::new("server.driver", p))?;
    if !(1..=65_535).contains(&file.server.backlog) {
        return Err(ConfigError::new("server.backlog", "must be in 1..=65535"));
    }
    if !(64..=32_768).contains(&file.server.uring_entries)
        || !file.server.uring_entries.is_power_of_two()
    {
        return Err(ConfigError::new(
            "server.uring_entries",
            "must be a power of two in 64..=32768",
        ));
    }
    file.limits.check()?;
    if !(1000..=365 * 86_400_000).contains(&file.auth.visitor_token_ttl_ms) {
        return Err(ConfigError::new(
            "auth.visitor_token_ttl_ms",
            "must be in 1000..=31536000000",
        ));
    }
    let tenants = if file.tenant.is_empty() {
        vec![crate::tenant::demo_tenant_config()]
    } else {
        file.tenant
    };
    crate::tenant::validate_tenants(&tenants, None)
        .map_err(|e| ConfigError::new(e.key, e.problem))?;
    Ok(Config {
        http,
        tcp,
        admin,
        data_dir: flags
            .data_dir
            .clone()
            .unwrap_or_else(|| file.server.data_dir.clone()),
        shards,
        backlog: file.server.backlog,
        durability,
        sync,
        pin_threads: file.server.pin_threads,
        sync_realtime: file.server.sync_realtime,
        migrate_connections: file.server.migrate_connections,
        driver,
        uring_entries: file.server.uring_entries,
        limits: file.limits,
        visitor_token_ttl_ms: file.auth.visitor_token_ttl_ms,
        tls: file.tls,
        tenants,
        config_dir: PathBuf::from("."),
    })
}

/// Checks what the config names outside itself: the TLS certificate and key
/// (`tls.cert_path`, `tls.key_path`), each tenant's intents file (`tenant[i].intents`) and
/// visitor key (kept in the data dir, created there on first start; `tenant[i].name`). Run it
/// after the demo tokens are filled in (the registry needs every token).
///
/// `server::run` loads them again; checking them first makes a missing or unreadable file a
/// bad config (exit 2, the key named) rather than a failed start (exit 1).
pub fn check_files(config: &Config) -> Result<(), ConfigError> {
    if let Some(tls) = &config.tls {
        crate::tls::server_config(tls)?;
    }
    crate::tenant::TenantRegistry::load(
        config.tenants.clone(),
        None,
        &config.config_dir,
        &config.data_dir,
    )
    .map_err(|e| ConfigError::new(e.key, e.problem))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn embedded_default_loads() {
        let config = load(&Flags::default()).expect("default config is valid");
        assert_eq!(config.http.port(), 8080);
        assert_eq!(config.tcp.port(), 7070);
        assert_eq!(config.durability, Durability::Always);
        assert!(config.tenants[0].demo);
        assert!(config.shards >= 1);
        assert_eq!(config.sync, SyncMode::Ring);
        assert!(config.pin_threads);
        assert!(config.sync_realtime);
        assert_eq!(config.driver, DriverChoice::Auto);
    }

    #[test]
    fn sync_mode_pinning_and_driver_come_from_the_file() {
        let text = DEFAULT_CONFIG_TOML
            .replace("sync = \"ring\" ", "sync = \"inline\" ")
            .replace("pin_threads = true", "pin_threads = false")
            .replace("sync_realtime = true", "sync_realtime = false");
        let config = resolve(parse_toml(&text, "x").unwrap(), &Flags::default()).unwrap();
        assert_eq!(config.sync, SyncMode::Inline);
        assert!(!config.pin_threads);
        assert!(!config.sync_realtime);
        let text = DEFAULT_CONFIG_TOML.replace("sync = \"ring\" ", "sync = \"sometimes\" ");
        let err = resolve(parse_toml(&text, "x").unwrap(), &Flags::default()).unwrap_err();
        assert_eq!(err.key, "server.sync");
        assert!(err.to_string().contains("expected inline or ring"), "{err}");
        let text = DEFAULT_CONFIG_TOML.replace("driver = \"auto\"", "driver = \"legacy\"");
        let config = resolve(parse_toml(&text, "x").unwrap(), &Flags::default()).unwrap();
        assert_eq!(config.driver, DriverChoice::Legacy);
        let text = DEFAULT_CONFIG_TOML.replace("driver = \"auto\"", "driver = \"kqueue\"");
        let err = resolve(parse_toml(&text, "x").unwrap(), &Flags::default()).unwrap_err();
        assert_eq!(err.key, "server.driver");
    }

    /// The printed default config is a config file that runs the same gateway.
    #[test]
    fn printed_default_config_loads_like_the_embedded_one() {
        let text = default_config_text();
        let file = parse_toml(&text, "printed").unwrap();
        let printed = resolve(file, &Flags::default()).unwrap();
        let embedded = load(&Flags::default()).unwrap();
        assert_eq!(printed.http, embedded.http);
        assert_eq!(printed.shards, embedded.shards);
        assert_eq!(printed.tenants.len(), 1);
        assert_eq!(printed.tenants[0].name, embedded.tenants[0].name);
        assert!(printed.tenants[0].demo);
        assert_eq!(
            format!("{:?}", printed.limits),
            format!("{:?}", embedded.limits)
        );
    }

    #[test]
    fn flags_override_file() {
        let Command::Serve(flags) = parse_args(args(&[
            "serve",
            "--http",
            "127.0.0.1:0",
            "--tcp=127.0.0.1:0",
            "--shards",
            "3",
            "--durability",
            "interval:5",
            "--data-dir",
            "/tmp/x",
        ]))
        .unwrap() else {
            panic!("serve expected");
        };
        let config = load(&flags).unwrap();
        assert_eq!(config.http.port(), 0);
        assert_eq!(config.shards, 3);
        assert_eq!(config.durability, Durability::Interval { ms: 5 });
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn unknown_key_names_the_key_on_one_line() {
        let text = format!("{DEFAULT_CONFIG_TOML}\n[limits2]\nx = 1\n");
        let err = parse_toml(&text, "f.toml").unwrap_err();
        let line = err.to_string();
        assert!(line.contains("limits2"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let text = DEFAULT_CONFIG_TOML.replace("idle_timeout_ms", "idle_timeout_secs");
        let err = parse_toml(&text, "f.toml").unwrap_err().to_string();
        assert!(err.contains("idle_timeout_secs"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |flags: Flags| load(&flags).unwrap_err().key;
        assert_eq!(
            bad(Flags {
                durability: Some("sometimes".into()),
                ..Flags::default()
            }),
            "--durability"
        );
        assert_eq!(
            bad(Flags {
                http: Some("localhost".into()),
                ..Flags::default()
            }),
            "--http"
        );
        // The shard count names the flag when the flag set it, else the file's key.
        let err = load(&Flags {
            shards: Some("300".into()),
            ..Flags::default()
        })
        .unwrap_err();
        assert_eq!(err.key, "--shards");
        assert!(err.problem.contains("300 is not in 0..=256"), "{err}");
        let text = DEFAULT_CONFIG_TOML.replace("shards = 0 ", "shards = 300 ");
        let file = parse_toml(&text, "x").unwrap();
        assert_eq!(
            resolve(file, &Flags::default()).unwrap_err().key,
            "server.shards"
        );
        let text = DEFAULT_CONFIG_TOML.replace("buffer_bytes = 4096", "buffer_bytes = 1");
        let file = parse_toml(&text, "x").unwrap();
        assert_eq!(
            resolve(file, &Flags::default()).unwrap_err().key,
            "limits.buffer_bytes"
        );
        let text = format!(
            "{DEFAULT_CONFIG_TOML}\n[[tenant]]\nname = \"acme\"\ngroups = [\"a\"]\n[[tenant.agent]]\nname = \"x\"\ngroups = [\"a\"]\n"
        );
        let file = parse_toml(&text, "x").unwrap();
        assert_eq!(
            resolve(file, &Flags::default()).unwrap_err().key,
            "tenant[0].agent[0].token"
        );
    }

    /// The bound is exact: a message with every string at its limit, all of it control
    /// characters, is stored as exactly that many bytes; and no character escapes to more than
    /// six bytes per byte.
    #[test]
    fn the_largest_message_record_is_what_the_record_limit_allows_for() {
        use kefu_protocol::model::{ConversationId, MessageRecordRef, ParticipantRef, Role};
        for c in (0..=0x7f_u8)
            .map(char::from)
            .chain(['\u{80}', 'é', '中', '\u{2028}', '\u{feff}', '😀'])
        {
            let escaped = serde_json::to_string(&c.to_string()).unwrap().len() - 2;
            assert!(
                escaped <= JSON_ESCAPED_BYTES_PER_BYTE_MAX * c.len_utf8(),
                "{c:?} is written as {escaped} bytes"
            );
        }
        for text_bytes_max in [1, 4096, 5000, 32_768] {
            let limits = Limits {
                text_bytes_max,
                request_body_bytes_max: 1 << 20,
                ..Limits::default()
            };
            let worst = |n: usize| "\u{1}".repeat(n);
            let name = worst(crate::tenant::NAME_BYTES_MAX);
            let text = worst(text_bytes_max.max(crate::tenant::REPLY_TEXT_BYTES_MAX));
            let key = worst(limits.client_msg_id_bytes_max);
            let record = MessageRecordRef {
                tenant: &name,
                conversation_id: ConversationId(u64::MAX),
                seq: u64::MAX,
                ts: u64::MAX,
                from: ParticipantRef {
                    role: Role::Visitor,
                    id: &name,
                },
                text: &text,
                client_msg_id: Some(&key),
            };
            let stored =
                kefu_protocol::frame::HEADER_LEN + serde_json::to_vec(&record).unwrap().len();
            assert_eq!(stored as u64, limits.message_record_bytes_max());
            assert!(limits.record_bytes_max() >= stored as u64);
        }
        // Never below the limit used so far.
        let limits = Limits::default();
        assert_eq!(limits.record_bytes_max(), 65_536 + 4096);
    }

    /// Event records carry names, ids and short reasons only: the record limit's 64 KiB floor
    /// holds the largest with room to spare.
    #[test]
    fn the_largest_event_record_is_far_below_the_record_limit() {
        use kefu_protocol::model::{
            ConversationId, Event, EventRecord, ModelLimits, Opened, Participant, Role,
        };
        let m = ModelLimits::DEFAULT;
        let worst = |n: usize| "\u{1}".repeat(n);
        let name = worst(crate::tenant::NAME_BYTES_MAX);
        let record = EventRecord {
            tenant: name.clone(),
            conversation_id: ConversationId(u64::MAX),
            seq: u64::MAX,
            ts: u64::MAX,
            from: Some(Participant::new(Role::Visitor, name.clone())),
            event: Event::Queued {
                group: name.clone(),
                queue_position: u32::MAX,
                reason: Some(worst(m.reason_bytes_max)),
            },
            opened: Some(Opened {
                channel: worst(m.channel_bytes_max),
                visitor_id: name.clone(),
                visitor_name: worst(m.name_bytes_max),
            }),
        };
        let stored = kefu_protocol::frame::HEADER_LEN + serde_json::to_vec(&record).unwrap().len();
        assert!(stored < 16_384, "{stored} bytes");
        assert!((stored as u64) < Limits::default().record_bytes_max());
    }

    #[test]
    fn a_text_limit_whose_records_cannot_fit_a_segment_is_refused() {
        let limits = Limits {
            text_bytes_max: 1 << 20,
            request_body_bytes_max: 2 << 20,
            segment_bytes_max: 4 << 20,
            ..Limits::default()
        };
        let err = limits.check().unwrap_err();
        assert_eq!(err.key, "limits.text_bytes_max");
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("limits.segment_bytes_max = 4194304"),
            "{line}"
        );
        assert!(line.contains("\\u00XX"), "{line}");
        // With segments of 8 MiB it fits, and the log's record limit has room for it.
        let limits = Limits {
            segment_bytes_max: 8 << 20,
            ..limits
        };
        limits.check().unwrap();
        assert!(limits.record_bytes_max() >= 6 << 20);
        assert!(limits.record_bytes_max() <= limits.segment_bytes_max);
    }

    /// Each file the config names is checked before the gateway starts, and a problem with it
    /// names its key: the TLS certificate and key, an intents file, a visitor key.
    #[test]
    fn files_the_config_names_are_checked_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = load(&Flags::default()).unwrap();
        config.data_dir = dir.path().join("data");
        std::fs::create_dir_all(&config.data_dir).unwrap();
        crate::demo::fill_demo_tokens(&config.data_dir, &mut config.tenants).unwrap();
        check_files(&config).unwrap();
        let problem = |config: &Config| {
            let err = check_files(config).unwrap_err();
            assert!(!err.to_string().contains('\n'), "{err}");
            (err.key.clone(), err.problem.clone())
        };

        let path = |name: &str| dir.path().join(name);
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(path("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(path("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        std::fs::write(path("other-key.pem"), other.key_pair.serialize_pem()).unwrap();
        std::fs::write(path("junk.pem"), "not a certificate\n").unwrap();
        let with_tls = |cert: &str, key: &str| {
            let mut c = config.clone();
            c.tls = Some(TlsFile {
                cert_path: path(cert),
                key_path: path(key),
                http: true,
                tcp: false,
            });
            c
        };
        check_files(&with_tls("cert.pem", "key.pem")).unwrap();
        let (key, why) = problem(&with_tls("missing.pem", "key.pem"));
        assert_eq!(key, "tls.cert_path");
        assert!(
            why.contains("missing.pem") && why.contains("No such file"),
            "{why}"
        );
        let (key, why) = problem(&with_tls("junk.pem", "key.pem"));
        assert_eq!(key, "tls.cert_path");
        assert!(why.contains("holds no PEM certificate"), "{why}");
        let (key, why) = problem(&with_tls("cert.pem", "missing.pem"));
        assert_eq!(key, "tls.key_path");
        assert!(why.contains("No such file"), "{why}");
        let (key, why) = problem(&with_tls("cert.pem", "cert.pem"));
        assert_eq!(key, "tls.key_path");
        assert!(why.contains("holds no PEM private key"), "{why}");
        let (key, why) = problem(&with_tls("cert.pem", "other-key.pem"));
        assert_eq!(key, "tls.key_path");
        assert!(why.contains("tls.cert_path"), "{why}");

        let mut missing_intents = config.clone();
        missing_intents.tenants[0].intents = Some("no-such-intents.toml".into());
        let (key, why) = problem(&missing_intents);
        assert_eq!(key, "tenant[0].intents");
        assert!(why.contains("no-such-intents.toml"), "{why}");

        let key_file = config
            .data_dir
            .join(crate::tenant::KEYS_DIR)
            .join(format!("{}.visitor-key", config.tenants[0].name));
        std::fs::write(&key_file, "not hex\n").unwrap();
        let (key, why) = problem(&config);
        assert_eq!(key, "tenant[0].name");
        assert!(why.contains("visitor key"), "{why}");
    }

    #[test]
    fn cli_shapes() {
        assert_eq!(
            parse_args(args(&[])).unwrap(),
            Command::Serve(Flags::default())
        );
        assert_eq!(parse_args(args(&["--help"])).unwrap(), Command::Help);
        assert_eq!(
            parse_args(args(&["--print-default-config"])).unwrap(),
            Command::PrintDefaultConfig
        );
        assert_eq!(parse_args(args(&["--bogus"])).unwrap_err().key, "--bogus");
        assert_eq!(parse_args(args(&["--http"])).unwrap_err().key, "--http");
    }
}
