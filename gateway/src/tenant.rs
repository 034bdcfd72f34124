//! Tenants: their configuration (agents, skill groups, tokens, intents, replies, limits), its validation at load, the embedded demo tenant with its generated secrets, and the registry that turns a bearer token into a [`Principal`] in O(1).
//!
//! Config shape (one `[[tenant]]` table each; unknown keys are an error, every limit has a
//! default). It is a superset of the gateway's first tenant table, so existing files keep working:
//!
//! ```toml
//! [[tenant]]
//! name = "acme"                       # [A-Za-z0-9_-], 1..=64 bytes; also a directory name
//! groups = ["sales", "support"]
//! default_group = "support"           # optional: else the intents file's, else the first group
//! intents = "intents/acme.toml"       # optional, relative to the config file's directory
//! intents_confidence_threshold = 0.6  # optional: overrides the intents file's threshold
//! auto_close_idle_ms = 1800000        # resolved and idle this long: closed (0 = never)
//! agent_socket_grace_ms = 30000       # an agent's last socket dropped this long: re-queue its conversations
//! route_on_one_shard = true           # false: per-shard routing (capacity per shard), all cores for this tenant
//! auto_replies_per_conversation_max = 3
//! visitor_rate_limit = { messages_per_s = 5, burst = 20, visitors_tracked_max = 65536 }
//! attachments = { size_bytes_max = 10485760, content_types = ["image/*", "application/pdf"], per_conversation_count_max = 100, per_conversation_bytes_max = 104857600, tenant_bytes_max = 0 }
//!
//! [[tenant.agent]]
//! name = "alice"
//! groups = ["sales", "support"]
//! capacity = 8                        # conversations at once, 1..=64
//! token = "..."                       # 16..=256 printable ASCII; unique across all tenants
//!
//! [[tenant.integration]]
//! name = "crm"
//! token = "..."
//!
//! [[tenant.auto_reply]]
//! keywords = ["opening hours", "营业时间"]
//! text = "We are open 9:00-18:00. 营业时间 9:00-18:00。"
//!
//! [[tenant.canned_reply]]
//! name = "greeting"
//! text = "Hello, how can I help? 您好，请问有什么可以帮您？"
//! ```
//!
//! Secrets: [`Secret`] and [`VisitorKey`] print as `<redacted>` in `Debug`, so logging a config
//! or a principal never leaks a token. The registry keys its table by SHA-256 of the token, so the
//! lookup's timing depends on a hash the caller cannot steer, not on the token's bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::auth::{
    self, AuthError, Principal, TENANT_ID_BYTES_MAX, VISITOR_KEY_BYTES, VISITOR_TOKEN_PREFIX,
    VisitorKey,
};
use crate::intent::{IntentError, IntentModel};
use crate::replies::{AutoReplies, CannedReplies};

/// Most tenants one gateway serves.
pub const TENANTS_MAX: usize = 64;
/// Most skill groups per tenant.
pub const GROUPS_PER_TENANT_MAX: usize = 64;
/// Most agents per tenant.
pub const AGENTS_PER_TENANT_MAX: usize = 1024;
/// Most groups one agent serves.
pub const GROUPS_PER_AGENT_MAX: usize = 16;
/// Most integrations per tenant.
pub const INTEGRATIONS_PER_TENANT_MAX: usize = 64;
/// Largest agent capacity (conversations at once).
pub const AGENT_CAPACITY_MAX: u32 = 64;
/// Longest tenant, group, agent, integration or canned-reply name.
pub const NAME_BYTES_MAX: usize = TENANT_ID_BYTES_MAX;
/// Shortest and longest static token.
pub const TOKEN_BYTES_MIN: usize = 16;
pub const TOKEN_BYTES_MAX: usize = 256;
/// Most keyword auto-replies and canned replies per tenant, and their sizes.
pub const AUTO_REPLIES_MAX: usize = 256;
pub const KEYWORDS_PER_AUTO_REPLY_MAX: usize = 32;
pub const KEYWORD_BYTES_MAX: usize = 128;
pub const CANNED_REPLIES_MAX: usize = 1024;
pub const REPLY_TEXT_BYTES_MAX: usize = 4096;
/// Longest grace period of an agent whose socket dropped: 1 hour.
pub const AGENT_SOCKET_GRACE_MS_MAX: u64 = 3600 * 1000;
/// Longest auto-close idle time: 30 days.
pub const AUTO_CLOSE_IDLE_MS_MAX: u64 = 30 * 24 * 3600 * 1000;
/// Bounds of the visitor rate limit settings.
pub const MESSAGES_PER_S_MAX: u32 = 10_000;
pub const BURST_MAX: u32 = 100_000;
pub const VISITORS_TRACKED_MAX: usize = 1 << 22;
/// Largest attachment size limit a config may set: 1 GiB.
pub const ATTACHMENT_SIZE_BYTES_MAX: u64 = 1 << 30;
pub const CONTENT_TYPES_MAX: usize = 64;
pub const CONTENT_TYPE_BYTES_MAX: usize = 127;
/// Largest secrets file read from the data dir.
pub const SECRETS_FILE_BYTES_MAX: u64 = 64 * 1024;
/// Largest intents file read (the intent module checks the same bound on the text).
pub const INTENTS_FILE_BYTES_MAX: u64 = crate::intent::INTENTS_FILE_BYTES_MAX as u64;

/// An intents path naming the embedded demo intents instead of a file.
pub const BUILTIN_DEMO_INTENTS: &str = "builtin:demo";
/// The embedded demo intents (bilingual, groups `sales` and `support`).
pub const DEMO_INTENTS_TOML: &str = include_str!("../intents/demo.toml");

/// A token or other secret from the config. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(text: impl Into<Box<str>>) -> Self {
        Self(text.into())
    }

    /// The secret itself: for comparing, hashing and printing the demo credentials, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One tenant as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Demo tenant: agent and integration tokens may be omitted; they are generated on first
    /// start, kept in the data dir and printed.
    #[serde(default)]
    pub demo: bool,
    pub groups: Vec<String>,
    #[serde(default)]
    pub default_group: Option<String>,
    /// Intents file (relative to the config file's directory), or [`BUILTIN_DEMO_INTENTS`].
    /// Absent: the embedded demo intents for a demo tenant, no classifier otherwise (every
    /// conversation starts in the default group).
    #[serde(default)]
    pub intents: Option<PathBuf>,
    #[serde(default)]
    pub intents_confidence_threshold: Option<f64>,
    #[serde(default)]
    pub agent: Vec<AgentConfig>,
    #[serde(default)]
    pub integration: Vec<IntegrationConfig>,
    #[serde(default)]
    pub auto_reply: Vec<AutoReplyConfig>,
    #[serde(default = "auto_replies_per_conversation_max_default")]
    pub auto_replies_per_conversation_max: u32,
    #[serde(default)]
    pub canned_reply: Vec<CannedReplyConfig>,
    #[serde(default = "auto_close_idle_ms_default")]
    pub auto_close_idle_ms: u64,
    /// How long an online agent whose last socket dropped keeps its conversations before they
    /// go back to the queue (a reconnect within it changes nothing).
    #[serde(default = "agent_socket_grace_ms_default")]
    pub agent_socket_grace_ms: u64,
    /// All conversations of this tenant live on one shard (tenant index mod shards) instead of
    /// the shard that accepted the visitor's connection: routing is then exact (one capacity per
    /// agent, one queue order per group) at the cost of one core's throughput for the tenant.
    /// On by default: exact capacities are the promise; `false` trades them for all cores.
    #[serde(default = "route_on_one_shard_default")]
    pub route_on_one_shard: bool,
    #[serde(default)]
    pub visitor_rate_limit: RateLimitConfig,
    #[serde(default)]
    pub attachments: AttachmentConfig,
}

fn auto_replies_per_conversation_max_default() -> u32 {
    3
}

fn auto_close_idle_ms_default() -> u64 {
    30 * 60 * 1000
}

fn route_on_one_shard_default() -> bool {
    true
}

fn agent_socket_grace_ms_default() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    pub groups: Vec<String>,
    #[serde(default = "capacity_default")]
    pub capacity: u32,
    /// Required unless the tenant is a demo tenant.
    #[serde(default)]
    pub token: Option<Secret>,
}

fn capacity_default() -> u32 {
    8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrationConfig {
    pub name: String,
    #[serde(default)]
    pub token: Option<Secret>,
}

/// Sent as a system message when a visitor's message contains one of `keywords`
/// (case-insensitive; see `replies`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoReplyConfig {
    pub keywords: Vec<String>,
    pub text: String,
}

/// A reply agents send by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CannedReplyConfig {
    pub name: String,
    pub text: String,
}

/// Per-visitor token bucket: `messages_per_s` sustained, `burst` at once; the table tracks at
/// most `visitors_tracked_max` visitors (see `ratelimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub messages_per_s: u32,
    pub burst: u32,
    pub visitors_tracked_max: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            messages_per_s: 5,
            burst: 20,
            visitors_tracked_max: 65_536,
        }
    }
}

/// Upload limits: 413 above `size_bytes_max`, 415 for a type not in `content_types`
/// (`type/subtype` or `type/*`, lowercase; parameters such as `; charset=` are ignored), and
/// 413 once a conversation holds `per_conversation_count_max` attachments or would hold more
/// than `per_conversation_bytes_max` bytes of them, or the tenant's would pass
/// `tenant_bytes_max` (0: no tenant limit).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachmentConfig {
    pub size_bytes_max: u64,
    pub content_types: Vec<String>,
    pub per_conversation_count_max: u32,
    pub per_conversation_bytes_max: u64,
    pub tenant_bytes_max: u64,
}

impl Default for AttachmentConfig {
    fn default() -> Self {
        Self {
            size_bytes_max: 10 * 1024 * 1024,
            per_conversation_count_max: 100,
            per_conversation_bytes_max: 100 * 1024 * 1024,
            tenant_bytes_max: 0,
            content_types: [
                "image/png",
                "image/jpeg",
                "image/gif",
                "image/webp",
                "application/pdf",
                "text/plain",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// A bad tenant config: `key` names the setting (`tenant[1].agent[0].groups`), `problem` says
/// what is wrong. Displayed on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TenantConfigError {
    pub key: String,
    pub problem: String,
}

fn bad(key: impl Into<String>, problem: impl Into<String>) -> TenantConfigError {
    TenantConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

fn check_name(key: &str, name: &str) -> Result<(), TenantConfigError> {
    let ok = (1..=NAME_BYTES_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(bad(
            key,
            format!("{name:?} is not 1..={NAME_BYTES_MAX} bytes of [A-Za-z0-9_-]"),
        ))
    }
}

fn check_count(
    key: &str,
    count: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<(), TenantConfigError> {
    if range.contains(&count) {
        Ok(())
    } else {
        Err(bad(
            key,
            format!(
                "has {count} entries, needs {}..={}",
                range.start(),
                range.end()
            ),
        ))
    }
}

fn check_text(key: &str, text: &str, bytes_max: usize) -> Result<(), TenantConfigError> {
    if text.trim().is_empty() {
        return Err(bad(key, "is empty"));
    }
    if text.len() > bytes_max {
        return Err(bad(
            key,
            format!("is {} bytes, more than {bytes_max}", text.len()),
        ));
    }
    Ok(())
}

/// Where each static token was first seen, to report duplicates by key.
type TokensSeen = HashMap<[u8; 32], String>;

fn check_token(
    key: String,
    token: Option<&Secret>,
    demo: bool,
    seen: &mut TokensSeen,
) -> Result<(), TenantConfigError> {
    let Some(token) = token else {
        return if demo {
            Ok(())
        } else {
            Err(bad(key, "required outside a demo tenant"))
        };
    };
    let text = token.expose();
    if !(TOKEN_BYTES_MIN..=TOKEN_BYTES_MAX).contains(&text.len())
        || !text.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad(
            key,
            format!("must be {TOKEN_BYTES_MIN}..={TOKEN_BYTES_MAX} printable ASCII characters"),
        ));
    }
    if text.starts_with(VISITOR_TOKEN_PREFIX) {
        return Err(bad(
            key,
            format!("must not start with {VISITOR_TOKEN_PREFIX:?} (reserved for visitor tokens)"),
        ));
    }
    match seen.entry(token_hash(text)) {
        std::collections::hash_map::Entry::Occupied(first) => Err(bad(
            key,
            format!("the same token is already used by {}", first.get()),
        )),
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(key);
            Ok(())
        }
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks one content-type pattern of the allow-list.
fn check_content_type(key: &str, pattern: &str) -> Result<(), TenantConfigError> {
    let token_ok = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+".contains(&b))
    };
    let ok = pattern.len() <= CONTENT_TYPE_BYTES_MAX
        && match pattern.split_once('/') {
            Some((kind, "*")) => token_ok(kind),
            Some((kind, subtype)) => token_ok(kind) && token_ok(subtype),
            None => false,
        };
    if ok {
        Ok(())
    } else {
        Err(bad(
            key,
            format!("{pattern:?} is not a lowercase `type/subtype` or `type/*`"),
        ))
    }
}

impl TenantConfig {
    /// Checks this tenant alone; `at` is its key prefix (`tenant[0]`), `tokens` collects the
    /// static tokens of all tenants so a duplicate across tenants is caught.
    fn validate(&self, at: &str, tokens: &mut TokensSeen) -> Result<(), TenantConfigError> {
        check_name(&format!("{at}.name"), &self.name)?;
        check_count(
            &format!("{at}.groups"),
            self.groups.len(),
            1..=GROUPS_PER_TENANT_MAX,
        )?;
        for (gi, group) in self.groups.iter().enumerate() {
            let key = format!("{at}.groups[{gi}]");
            check_name(&key, group)?;
            if self.groups[..gi].contains(group) {
                return Err(bad(key, format!("group {group:?} is listed twice")));
            }
        }
        let group_known = |key: String, group: &str| {
            if self.groups.iter().any(|g| g == group) {
                Ok(())
            } else {
                Err(bad(
                    key,
                    format!(
                        "unknown group {group:?} (the tenant's groups are {})",
                        self.groups.join(", ")
                    ),
                ))
            }
        };
        if let Some(group) = &self.default_group {
            group_known(format!("{at}.default_group"), group)?;
        }
        if let Some(threshold) = self.intents_confidence_threshold
            && !(0.0..=1.0).contains(&threshold)
        {
            return Err(bad(
                format!("{at}.intents_confidence_threshold"),
                format!("{threshold} is not between 0 and 1"),
            ));
        }
        if let Some(path) = &self.intents
            && path.as_os_str().is_empty()
        {
            return Err(bad(format!("{at}.intents"), "is empty"));
        }
        check_count(
            &format!("{at}.agent"),
            self.agent.len(),
            0..=AGENTS_PER_TENANT_MAX,
        )?;
        for (ai, agent) in self.agent.iter().enumerate() {
            let at = format!("{at}.agent[{ai}]");
            check_name(&format!("{at}.name"), &agent.name)?;
            if self.agent[..ai].iter().any(|a| a.name == agent.name) {
                return Err(bad(
                    format!("{at}.name"),
                    format!("agent {:?} is defined twice", agent.name),
                ));
            }
            // The router keeps agents and groups in one namespace so a name in a log line is
            // unambiguous.
            if self.groups.contains(&agent.name) {
                return Err(bad(
                    format!("{at}.name"),
                    format!("{:?} is also a group name", agent.name),
                ));
            }
            check_count(
                &format!("{at}.groups"),
                agent.groups.len(),
                0..=GROUPS_PER_AGENT_MAX,
            )?;
            for (gi, group) in agent.groups.iter().enumerate() {
                group_known(format!("{at}.groups[{gi}]"), group)?;
                if agent.groups[..gi].contains(group) {
                    return Err(bad(
                        format!("{at}.groups[{gi}]"),
                        format!("group {group:?} is listed twice"),
                    ));
                }
            }
            if !(1..=AGENT_CAPACITY_MAX).contains(&agent.capacity) {
                return Err(bad(
                    format!("{at}.capacity"),
                    format!("{} is not in 1..={AGENT_CAPACITY_MAX}", agent.capacity),
                ));
            }
            check_token(
                format!("{at}.token"),
                agent.token.as_ref(),
                self.demo,
                tokens,
            )?;
        }
        check_count(
            &format!("{at}.integration"),
            self.integration.len(),
            0..=INTEGRATIONS_PER_TENANT_MAX,
        )?;
        for (ii, integration) in self.integration.iter().enumerate() {
            let at = format!("{at}.integration[{ii}]");
            check_name(&format!("{at}.name"), &integration.name)?;
            if self.integration[..ii]
                .iter()
                .any(|i| i.name == integration.name)
            {
                return Err(bad(
                    format!("{at}.name"),
                    format!("integration {:?} is defined twice", integration.name),
                ));
            }
            check_token(
                format!("{at}.token"),
                integration.token.as_ref(),
                self.demo,
                tokens,
            )?;
        }
        check_count(
            &format!("{at}.auto_reply"),
            self.auto_reply.len(),
            0..=AUTO_REPLIES_MAX,
        )?;
        for (ri, reply) in self.auto_reply.iter().enumerate() {
            let at = format!("{at}.auto_reply[{ri}]");
            check_count(
                &format!("{at}.keywords"),
                reply.keywords.len(),
                1..=KEYWORDS_PER_AUTO_REPLY_MAX,
            )?;
            for (ki, keyword) in reply.keywords.iter().enumerate() {
                check_text(&format!("{at}.keywords[{ki}]"), keyword, KEYWORD_BYTES_MAX)?;
            }
            check_text(&format!("{at}.text"), &reply.text, REPLY_TEXT_BYTES_MAX)?;
        }
        check_count(
            &format!("{at}.canned_reply"),
            self.canned_reply.len(),
            0..=CANNED_REPLIES_MAX,
        )?;
        for (ci, reply) in self.canned_reply.iter().enumerate() {
            let at = format!("{at}.canned_reply[{ci}]");
            check_name(&format!("{at}.name"), &reply.name)?;
            if self.canned_reply[..ci].iter().any(|r| r.name == reply.name) {
                return Err(bad(
                    format!("{at}.name"),
                    format!("canned reply {:?} is defined twice", reply.name),
                ));
            }
            check_text(&format!("{at}.text"), &reply.text, REPLY_TEXT_BYTES_MAX)?;
        }
        if self.auto_close_idle_ms > AUTO_CLOSE_IDLE_MS_MAX {
            return Err(bad(
                format!("{at}.auto_close_idle_ms"),
                format!("more than {AUTO_CLOSE_IDLE_MS_MAX} (30 days)"),
            ));
        }
        if self.agent_socket_grace_ms > AGENT_SOCKET_GRACE_MS_MAX {
            return Err(bad(
                format!("{at}.agent_socket_grace_ms"),
                format!("more than {AGENT_SOCKET_GRACE_MS_MAX} (1 hour)"),
            ));
        }
        let rate = &self.visitor_rate_limit;
        if !(1..=MESSAGES_PER_S_MAX).contains(&rate.messages_per_s) {
            return Err(bad(
                format!("{at}.visitor_rate_limit.messages_per_s"),
                format!("{} is not in 1..={MESSAGES_PER_S_MAX}", rate.messages_per_s),
            ));
        }
        if !(1..=BURST_MAX).contains(&rate.burst) {
            return Err(bad(
                format!("{at}.visitor_rate_limit.burst"),
                format!("{} is not in 1..={BURST_MAX}", rate.burst),
            ));
        }
        if !(1..=VISITORS_TRACKED_MAX).contains(&rate.visitors_tracked_max) {
            return Err(bad(
                format!("{at}.visitor_rate_limit.visitors_tracked_max"),
                format!(
                    "{} is not in 1..={VISITORS_TRACKED_MAX}",
                    rate.visitors_tracked_max
                ),
            ));
        }
        let attachments = &self.attachments;
        if !(1..=ATTACHMENT_SIZE_BYTES_MAX).contains(&attachments.size_bytes_max) {
            return Err(bad(
                format!("{at}.attachments.size_bytes_max"),
                format!(
                    "{} is not in 1..={ATTACHMENT_SIZE_BYTES_MAX}",
                    attachments.size_bytes_max
                ),
            ));
        }
        if attachments.per_conversation_count_max == 0 {
            return Err(bad(
                format!("{at}.attachments.per_conversation_count_max"),
                "must be at least 1".to_owned(),
            ));
        }
        if attachments.per_conversation_bytes_max < attachments.size_bytes_max {
            return Err(bad(
                format!("{at}.attachments.per_conversation_bytes_max"),
                format!(
                    "{} is below size_bytes_max = {}",
                    attachments.per_conversation_bytes_max, attachments.size_bytes_max
                ),
            ));
        }
        check_count(
            &format!("{at}.attachments.content_types"),
            attachments.content_types.len(),
            0..=CONTENT_TYPES_MAX,
        )?;
        for (ci, pattern) in attachments.content_types.iter().enumerate() {
            check_content_type(&format!("{at}.attachments.content_types[{ci}]"), pattern)?;
        }
        Ok(())
    }

    /// The group a conversation starts in when the classifier is absent or not confident.
    pub fn fallback_group<'a>(&'a self, intents: Option<&'a IntentModel>) -> &'a str {
        self.default_group
            .as_deref()
            .or(intents.map(|m| m.default_group()))
            .unwrap_or(&self.groups[0])
    }
}

/// Checks every tenant and what spans tenants (unique names, tokens unique across all tenants
/// and distinct from the admin token). Errors name the key.
pub fn validate_tenants(
    tenants: &[TenantConfig],
    admin_token: Option<&Secret>,
) -> Result<(), TenantConfigError> {
    check_count("tenant", tenants.len(), 1..=TENANTS_MAX)?;
    let mut tokens = TokensSeen::new();
    check_token("auth.admin_token".into(), admin_token, true, &mut tokens)?;
    for (ti, tenant) in tenants.iter().enumerate() {
        let at = format!("tenant[{ti}]");
        tenant.validate(&at, &mut tokens)?;
        if tenants[..ti].iter().any(|t| t.name == tenant.name) {
            return Err(bad(
                format!("{at}.name"),
                format!("tenant {:?} is defined twice", tenant.name),
            ));
        }
    }
    Ok(())
}

/// Loads and trains a tenant's intent model: `None` when it has none. Relative paths are
/// resolved against `config_dir`. Every group the model can answer must be a group of the tenant.
pub fn load_intents(
    tenant: &TenantConfig,
    at: &str,
    config_dir: &Path,
) -> Result<Option<IntentModel>, TenantConfigError> {
    let key = format!("{at}.intents");
    let text = match &tenant.intents {
        None if tenant.demo => DEMO_INTENTS_TOML.to_owned(),
        None => return Ok(None),
        Some(path) if path.as_os_str() == BUILTIN_DEMO_INTENTS => DEMO_INTENTS_TOML.to_owned(),
        Some(path) => {
            let path = config_dir.join(path);
            read_bounded(&path, INTENTS_FILE_BYTES_MAX)
                .map_err(|e| bad(&key, format!("{}: {e}", path.display())))?
        }
    };
    let mut model =
        IntentModel::from_toml_str(&text).map_err(|e: IntentError| bad(&key, e.to_string()))?;
    if let Some(threshold) = tenant.intents_confidence_threshold {
        model = model.with_threshold(threshold);
    }
    if let Some(group) = model
        .groups()
        .find(|g| !tenant.groups.iter().any(|t| t == g))
    {
        return Err(bad(
            key,
            format!(
                "the intents file routes to group {group:?}, which is not one of the tenant's groups ({})",
                tenant.groups.join(", ")
            ),
        ));
    }
    Ok(Some(model))
}

fn read_bounded(path: &Path, bytes_max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(bytes_max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > bytes_max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {bytes_max} bytes"),
        ));
    }
    Ok(text)
}

/// A tenant ready to serve: its checked config, visitor signing key, intent model and replies.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    pub visitor_key: VisitorKey,
    pub intents: Option<IntentModel>,
    pub auto_replies: AutoReplies,
    pub canned_replies: CannedReplies,
}

impl Tenant {
    pub fn new(
        config: TenantConfig,
        visitor_key: VisitorKey,
        intents: Option<IntentModel>,
    ) -> Self {
        let auto_replies =
            AutoReplies::new(&config.auto_reply, config.auto_replies_per_conversation_max);
        let canned_replies = CannedReplies::new(&config.canned_reply);
        Self {
            config,
            visitor_key,
            intents,
            auto_replies,
            canned_replies,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The group for a conversation whose first message is `text` (`None`: no text yet): the
    /// classifier's pick when it is confident, else the tenant's fallback group.
    pub fn classify_group(&self, text: Option<&str>) -> &str {
        if let (Some(text), Some(model)) = (text, &self.intents) {
            let c = model.classify(text);
            if c.intent.is_some() {
                return c.group;
            }
        }
        self.config.fallback_group(self.intents.as_ref())
    }
}

#[derive(Debug, Clone, Copy)]
enum Credential {
    Agent { tenant: u32, agent: u32 },
    Integration { tenant: u32 },
    Admin,
}

/// All tenants, and every static token mapped to who holds it. Immutable after start; share it
/// across shards by reference.
pub struct TenantRegistry {
    tenants: Vec<Tenant>,
    by_name: HashMap<Box<str>, u32>,
    by_token: HashMap<[u8; 32], Credential>,
}

impl fmt::Debug for TenantRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantRegistry")
            .field("tenants", &self.tenants)
            .field("tokens", &self.by_token.len())
            .finish()
    }
}

impl TenantRegistry {
    /// Builds the registry from tenants whose configs passed [`validate_tenants`] (checked again
    /// here: a registry never holds an invalid tenant). Demo tenants must have their tokens filled
    /// in (see [`DemoSecrets::fill`]).
    pub fn new(
        tenants: Vec<Tenant>,
        admin_token: Option<&Secret>,
    ) -> Result<Self, TenantConfigError> {
        let configs: Vec<TenantConfig> = tenants.iter().map(|t| t.config.clone()).collect();
        validate_tenants(&configs, admin_token)?;
        let mut by_token = HashMap::new();
        if let Some(token) = admin_token {
            by_token.insert(token_hash(token.expose()), Credential::Admin);
        }
        let mut by_name = HashMap::new();
        for (ti, tenant) in tenants.iter().enumerate() {
            let at = format!("tenant[{ti}]");
            by_name.insert(tenant.config.name.clone().into_boxed_str(), ti as u32);
            for (ai, agent) in tenant.config.agent.iter().enumerate() {
                let token = agent.token.as_ref().ok_or_else(|| {
                    bad(
                        format!("{at}.agent[{ai}].token"),
                        "demo token not filled in",
                    )
                })?;
                by_token.insert(
                    token_hash(token.expose()),
                    Credential::Agent {
                        tenant: ti as u32,
                        agent: ai as u32,
                    },
                );
            }
            for (ii, integration) in tenant.config.integration.iter().enumerate() {
                let token = integration.token.as_ref().ok_or_else(|| {
                    bad(
                        format!("{at}.integration[{ii}].token"),
                        "demo token not filled in",
                    )
                })?;
                by_token.insert(
                    token_hash(token.expose()),
                    Credential::Integration { tenant: ti as u32 },
                );
            }
        }
        Ok(Self {
            tenants,
            by_name,
            by_token,
        })
    }

    /// Validates `configs`, loads their intents (relative to `config_dir`) and their visitor keys
    /// (created on first start in `data_dir`), and builds the registry.
    pub fn load(
        configs: Vec<TenantConfig>,
        admin_token: Option<&Secret>,
        config_dir: &Path,
        data_dir: &Path,
    ) -> Result<Self, TenantConfigError> {
        validate_tenants(&configs, admin_token)?;
        let mut tenants = Vec::with_capacity(configs.len());
        for (ti, config) in configs.into_iter().enumerate() {
            let at = format!("tenant[{ti}]");
            let intents = load_intents(&config, &at, config_dir)?;
            let visitor_key = load_or_create_visitor_key(data_dir, &config.name)
                .map_err(|e| bad(format!("{at}.name"), format!("visitor key: {e}")))?;
            tenants.push(Tenant::new(config, visitor_key, intents));
        }
        Self::new(tenants, admin_token)
    }

    /// Who holds `token`: an agent, integration or admin token from the config, or a visitor
    /// token signed by its tenant's key and not expired at `now_s`. O(1): one SHA-256 and one
    /// hash lookup, or one HMAC.
    pub fn authenticate(&self, token: &str, now_s: u64) -> Result<Principal<'_>, AuthError> {
        self.authenticate_until(token, now_s).map(|(p, _)| p)
    }

    /// [`Self::authenticate`], and the first second (unix) at which the answer no longer holds:
    /// a visitor token's expiry, `u64::MAX` for config tokens (the registry never changes), so
    /// a caller may remember the answer until then.
    pub fn authenticate_until(
        &self,
        token: &str,
        now_s: u64,
    ) -> Result<(Principal<'_>, u64), AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.starts_with(VISITOR_TOKEN_PREFIX) {
            let claims = auth::verify_visitor_token(token, now_s, |name| {
                let tenant = self.tenant(name)?;
                Some((tenant.name(), &tenant.visitor_key))
            })?;
            let principal = Principal::Visitor {
                tenant: claims.tenant,
                conversation: claims.conversation,
            };
            return Ok((principal, claims.expires_at_s));
        }
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::Malformed {
                reason: "token too long",
            });
        }
        let principal = match self.by_token.get(&token_hash(token)) {
            None => return Err(AuthError::UnknownToken),
            Some(&Credential::Admin) => Principal::Admin,
            Some(&Credential::Integration { tenant }) => Principal::Integration {
                tenant: self.tenants[tenant as usize].name(),
            },
            Some(&Credential::Agent { tenant, agent }) => {
                let tenant = &self.tenants[tenant as usize];
                Principal::Agent {
                    tenant: tenant.name(),
                    name: &tenant.config.agent[agent as usize].name,
                }
            }
        };
        Ok((principal, u64::MAX))
    }

    /// A visitor token for `conversation` of `tenant`, valid for `ttl_s` from `now_s`.
    /// `None` if the tenant is unknown.
    pub fn issue_visitor_token(
        &self,
        tenant: &str,
        conversation: u64,
        now_s: u64,
        ttl_s: u64,
    ) -> Option<String> {
        let tenant = self.tenant(tenant)?;
        Some(auth::issue_visitor_token(
            &tenant.visitor_key,
            tenant.name(),
            conversation,
            now_s.saturating_add(ttl_s),
        ))
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.by_name
            .get(name)
            .map(|&index| &self.tenants[index as usize])
    }

    /// The tenant's index in config order (what per-tenant tables are indexed by).
    pub fn tenant_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).map(|&index| index as usize)
    }

    pub fn tenants(&self) -> &[Tenant] {
        &self.tenants
    }

    /// May an integration of `tenant` read the firehose? A shard log holds the records of every
    /// tenant and is sent as it is stored (sendfile, no filtering), so only when that tenant is
    /// the only one configured.
    pub fn firehose_allowed(&self, tenant: u16) -> bool {
        self.tenants.len() == 1 && (tenant as usize) < self.tenants.len()
    }

    /// The shard a new conversation of `tenant` opens on, when the tenant routes on one shard
    /// (`None`: the shard that accepted the connection).
    pub fn home_shard(&self, tenant: u16, shards: usize) -> Option<u16> {
        let config = &self.tenants.get(tenant as usize)?.config;
        (config.route_on_one_shard && shards > 0).then(|| (tenant as usize % shards) as u16)
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the complete new one:
/// a uniquely named temp file in the same directory, fsync, rename over `path`, fsync of the
/// directory (so the rename itself is durable). The file is created with mode 0600 because it
/// may hold secrets.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let suffix: [u8; 8] = auth::random_bytes()?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{:016x}.tmp", u64::from_le_bytes(suffix)));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Directory under the data dir holding per-tenant visitor keys.
pub const KEYS_DIR: &str = "keys";

/// The tenant's visitor-token key, from `<data_dir>/keys/<tenant>.visitor-key` (64 hex digits),
/// created on first start. A file that exists but is not a key is an error, not silently
/// replaced: replacing it would void every visitor token issued before.
pub fn load_or_create_visitor_key(data_dir: &Path, tenant: &str) -> std::io::Result<VisitorKey> {
    let dir = data_dir.join(KEYS_DIR);
    let path = dir.join(format!("{tenant}.visitor-key"));
    match read_bounded(&path, SECRETS_FILE_BYTES_MAX) {
        Ok(text) => parse_hex_key(text.trim()).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is not {} hex digits: remove it to make a new key (visitor tokens are then void)",
                    path.display(),
                    VISITOR_KEY_BYTES * 2
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)?;
            let key = VisitorKey::generate()?;
            let hex: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
            write_file_atomic(&path, format!("{hex}\n").as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

fn parse_hex_key(text: &str) -> Option<VisitorKey> {
    if text.len() != VISITOR_KEY_BYTES * 2 || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; VISITOR_KEY_BYTES];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(VisitorKey::from_bytes(bytes))
}

/// The embedded demo tenant (tokens are filled from [`DemoSecrets`]): agents alice (sales,
/// support), bob (support) and carol (sales), integration `crm`, bilingual intents, keyword
/// auto-replies and canned replies.
pub const DEMO_TENANT_TOML: &str = r#"
name = "demo"
demo = true
groups = ["sales", "support"]
default_group = "support"
intents = "builtin:demo"
auto_close_idle_ms = 600000
auto_replies_per_conversation_max = 2

[[agent]]
name = "alice"
groups = ["sales", "support"]
capacity = 8

[[agent]]
name = "bob"
groups = ["support"]
capacity = 8

[[agent]]
name = "carol"
groups = ["sales"]
capacity = 8

[[integration]]
name = "crm"

[[auto_reply]]
keywords = ["opening hours", "business hours", "when are you open", "营业时间", "几点上班"]
text = "Our agents are online 9:00-18:00 (UTC+8), Monday to Friday. 人工客服工作时间：周一至周五 9:00-18:00。"

[[auto_reply]]
keywords = ["human", "real person", "人工", "转人工"]
text = "You are in the queue for a human agent; you will see your position here. 正在为您转接人工客服，请稍候。"

[[canned_reply]]
name = "greeting"
text = "Hello, this is kefu support. How can I help you? 您好，请问有什么可以帮您？"

[[canned_reply]]
name = "closing"
text = "Is there anything else I can do for you? 请问还有其他问题吗？"
"#;

/// Where the demo tokens live under the data dir.
pub const DEMO_SECRETS_FILE: &str = "demo-secrets.toml";

/// The generated demo tokens: `agent.<name>` and `integration.<name>` → token.
#[derive(Clone, PartialEq, Eq)]
pub struct DemoSecrets {
    tokens: BTreeMap<String, Secret>,
}

impl fmt::Debug for DemoSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoSecrets")
            .field("keys", &self.tokens.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Errors reading or creating files of secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem} (remove the file to generate new demo tokens)")]
    Invalid { path: PathBuf, problem: String },
}

impl DemoSecrets {
    pub fn agent_token(&self, name: &str) -> Option<&Secret> {
        self.tokens.get(&format!("agent.{name}"))
    }

    pub fn integration_token(&self, name: &str) -> Option<&Secret> {
        self.tokens.get(&format!("integration.{name}"))
    }

    /// Fills the missing tokens of a demo tenant's agents and integrations. Returns `false` if
    /// some token has no secret.
    pub fn fill(&self, tenant: &mut TenantConfig) -> bool {
        let mut complete = true;
        for agent in &mut tenant.agent {
            if agent.token.is_none() {
                agent.token = self.agent_token(&agent.name).cloned();
                complete &= agent.token.is_some();
            }
        }
        for integration in &mut tenant.integration {
            if integration.token.is_none() {
                integration.token = self.integration_token(&integration.name).cloned();
                complete &= integration.token.is_some();
            }
        }
        complete
    }
}

/// The demo tenant's config without tokens.
pub fn demo_tenant_config() -> TenantConfig {
    toml::from_str(DEMO_TENANT_TOML).expect("the embedded demo tenant parses (tested)")
}

/// The demo tenant with its tokens filled in.
pub fn demo_tenant(secrets: &DemoSecrets) -> TenantConfig {
    let mut config = demo_tenant_config();
    let complete = secrets.fill(&mut config);
    assert!(complete, "demo secrets cover the embedded demo tenant");
    config
}

/// The lines `kefu` prints before its ready line for a demo tenant (API "Command line").
/// These are the only place tokens are ever printed.
pub fn demo_credential_lines(tenant: &TenantConfig) -> Vec<String> {
    let mut lines = Vec::new();
    for agent in &tenant.agent {
        if let Some(token) = &agent.token {
            lines.push(format!(
                "kefu demo agent={} groups={} token={}",
                agent.name,
                agent.groups.join(","),
                token.expose()
            ));
        }
    }
    for integration in &tenant.integration {
        if let Some(token) = &integration.token {
            lines.push(format!("kefu demo integration token={}", token.expose()));
        }
    }
    lines
}

fn random_token() -> std::io::Result<Secret> {
    use base64::Engine;
    let bytes: [u8; 24] = auth::random_bytes()?;
    Ok(Secret::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
}

/// The demo tokens from `<data_dir>/demo-secrets.toml`, generating (and saving, atomically) any
/// that the embedded demo tenant needs and the file lacks. Restarting prints the same tokens.
pub fn load_or_create_demo_secrets(data_dir: &Path) -> Result<DemoSecrets, SecretsError> {
    let path = data_dir.join(DEMO_SECRETS_FILE);
    let io = |source| SecretsError::Io {
        path: path.clone(),
        source,
    };
    let mut tokens: BTreeMap<String, Secret> = match read_bounded(&path, SECRETS_FILE_BYTES_MAX) {
        Ok(text) => toml::from_str(&text).map_err(|e| SecretsError::Invalid {
            path: path.clone(),
            problem: e.message().replace('\n', " "),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(io(e)),
    };
    for (key, token) in &tokens {
        let text = token.expose();
        if !(TOKEN_BYTES_MIN..=TOKEN_BYTES_MAX).contains(&text.len())
            || !text.bytes().all(|b| b.is_ascii_graphic())
            || text.starts_with(VISITOR_TOKEN_PREFIX)
        {
            return Err(SecretsError::Invalid {
                path: path.clone(),
                problem: format!("{key}: not a valid token"),
            });
        }
    }
    let demo = demo_tenant_config();
    let needed = demo
        .agent
        .iter()
        .map(|a| format!("agent.{}", a.name))
        .chain(
            demo.integration
                .iter()
                .map(|i| format!("integration.{}", i.name)),
        );
    let mut changed = false;
    for key in needed {
        if let std::collections::btree_map::Entry::Vacant(slot) = tokens.entry(key) {
            slot.insert(random_token().map_err(io)?);
            changed = true;
        }
    }
    if changed {
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut text =
            String::from("# kefu demo tokens, generated on first start. Keep private.\n");
        for (key, token) in &tokens {
            // Keys are `agent.NAME` with NAME in [A-Za-z0-9_-]: quote them so the dot is literal.
            text.push_str(&format!("\"{key}\" = \"{}\"\n", token.expose()));
        }
        write_file_atomic(&path, text.as_bytes()).map_err(io)?;
    }
    Ok(DemoSecrets { tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(n: u8) -> Secret {
        Secret::new(format!("token-{n:02}-0123456789abcdef"))
    }

    fn tenant(name: &str, token_base: u8) -> TenantConfig {
        let mut config: TenantConfig = toml::from_str(&format!(
            r#"
            name = "{name}"
            groups = ["sales", "support"]
            [[agent]]
            name = "alice"
            groups = ["sales", "support"]
            [[agent]]
            name = "bob"
            groups = ["support"]
            capacity = 2
            [[integration]]
            name = "crm"
            "#
        ))
        .unwrap();
        config.agent[0].token = Some(token(token_base));
        config.agent[1].token = Some(token(token_base + 1));
        config.integration[0].token = Some(token(token_base + 2));
        config
    }

    fn registry(tenants: Vec<TenantConfig>, admin: Option<&Secret>) -> TenantRegistry {
        let tenants = tenants
            .into_iter()
            .enumerate()
            .map(|(i, config)| {
                Tenant::new(
                    config,
                    VisitorKey::from_bytes([i as u8 + 1; VISITOR_KEY_BYTES]),
                    None,
                )
            })
            .collect();
        TenantRegistry::new(tenants, admin).unwrap()
    }

    type Mutation = Box<dyn Fn(&mut TenantConfig)>;

    fn error_of(tenants: &[TenantConfig]) -> String {
        validate_tenants(tenants, None).unwrap_err().to_string()
    }

    #[test]
    fn validation_names_the_key() {
        assert!(validate_tenants(&[tenant("a", 0), tenant("b", 10)], None).is_ok());

        let mut t = tenant("a", 0);
        t.agent[1].groups.push("billing".into());
        let e = error_of(&[t]);
        assert_eq!(
            e,
            "tenant[0].agent[1].groups[1]: unknown group \"billing\" (the tenant's groups are sales, support)"
        );
        assert!(!e.contains('\n'));

        let mut t = tenant("a", 0);
        t.agent[0].capacity = 0;
        assert_eq!(
            error_of(&[t]),
            "tenant[0].agent[0].capacity: 0 is not in 1..=64"
        );

        // The same token in two tenants.
        let e = error_of(&[tenant("a", 0), tenant("b", 1)]);
        assert_eq!(
            e,
            "tenant[1].agent[0].token: the same token is already used by tenant[0].agent[1].token"
        );
        assert!(!e.contains("token-"), "error leaks the token: {e}");

        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|t| t.name = "a/b".into()), "tenant[0].name"),
            (Box::new(|t| t.groups.clear()), "tenant[0].groups"),
            (
                Box::new(|t| t.groups.push("sales".into())),
                "tenant[0].groups[2]",
            ),
            (
                Box::new(|t| t.default_group = Some("x".into())),
                "tenant[0].default_group",
            ),
            (
                Box::new(|t| t.intents_confidence_threshold = Some(1.5)),
                "tenant[0].intents_confidence_threshold",
            ),
            (
                Box::new(|t| t.agent[1].name = "alice".into()),
                "tenant[0].agent[1].name",
            ),
            (
                Box::new(|t| t.agent[1].name = "sales".into()),
                "tenant[0].agent[1].name",
            ),
            (
                Box::new(|t| t.agent[0].groups = vec!["sales".into(), "sales".into()]),
                "tenant[0].agent[0].groups[1]",
            ),
            (
                Box::new(|t| t.agent[0].capacity = AGENT_CAPACITY_MAX + 1),
                "tenant[0].agent[0].capacity",
            ),
            (
                Box::new(|t| t.agent[0].token = None),
                "tenant[0].agent[0].token",
            ),
            (
                Box::new(|t| t.agent[0].token = Some(Secret::new("short"))),
                "tenant[0].agent[0].token",
            ),
            (
                Box::new(|t| t.agent[0].token = Some(Secret::new("kv1.looks-like-a-visitor"))),
                "tenant[0].agent[0].token",
            ),
            (
                Box::new(|t| t.agent[0].token = Some(Secret::new("has a space in the token"))),
                "tenant[0].agent[0].token",
            ),
            (
                Box::new(|t| t.integration[0].token = t.agent[0].token.clone()),
                "tenant[0].integration[0].token",
            ),
            (
                Box::new(|t| t.integration.push(t.integration[0].clone())),
                "tenant[0].integration[1].name",
            ),
            (
                Box::new(|t| {
                    t.auto_reply.push(AutoReplyConfig {
                        keywords: vec![],
                        text: "x".into(),
                    })
                }),
                "tenant[0].auto_reply[0].keywords",
            ),
            (
                Box::new(|t| {
                    t.auto_reply.push(AutoReplyConfig {
                        keywords: vec![" ".into()],
                        text: "x".into(),
                    })
                }),
                "tenant[0].auto_reply[0].keywords[0]",
            ),
            (
                Box::new(|t| {
                    t.auto_reply.push(AutoReplyConfig {
                        keywords: vec!["k".into()],
                        text: "x".repeat(REPLY_TEXT_BYTES_MAX + 1),
                    })
                }),
                "tenant[0].auto_reply[0].text",
            ),
            (
                Box::new(|t| {
                    t.canned_reply.push(CannedReplyConfig {
                        name: "bad name".into(),
                        text: "x".into(),
                    })
                }),
                "tenant[0].canned_reply[0].name",
            ),
            (
                Box::new(|t| t.auto_close_idle_ms = AUTO_CLOSE_IDLE_MS_MAX + 1),
                "tenant[0].auto_close_idle_ms",
            ),
            (
                Box::new(|t| t.agent_socket_grace_ms = AGENT_SOCKET_GRACE_MS_MAX + 1),
                "tenant[0].agent_socket_grace_ms",
            ),
            (
                Box::new(|t| t.visitor_rate_limit.messages_per_s = 0),
                "tenant[0].visitor_rate_limit.messages_per_s",
            ),
            (
                Box::new(|t| t.visitor_rate_limit.burst = 0),
                "tenant[0].visitor_rate_limit.burst",
            ),
            (
                Box::new(|t| t.visitor_rate_limit.visitors_tracked_max = 0),
                "tenant[0].visitor_rate_limit.visitors_tracked_max",
            ),
            (
                Box::new(|t| t.attachments.size_bytes_max = 0),
                "tenant[0].attachments.size_bytes_max",
            ),
            (
                Box::new(|t| t.attachments.content_types.push("Image/PNG".into())),
                "tenant[0].attachments.content_types[6]",
            ),
            (
                Box::new(|t| t.attachments.content_types.push("*/*".into())),
                "tenant[0].attachments.content_types[6]",
            ),
        ];
        for (mutate, key) in cases {
            let mut t = tenant("a", 0);
            mutate(&mut t);
            let e = validate_tenants(&[t], None).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
        assert_eq!(
            error_of(&[tenant("a", 0), tenant("a", 10)]),
            "tenant[1].name: tenant \"a\" is defined twice"
        );
        assert_eq!(error_of(&[]), "tenant: has 0 entries, needs 1..=64");
        // The admin token may not double as a tenant token.
        let e = validate_tenants(&[tenant("a", 0)], Some(&token(1))).unwrap_err();
        assert_eq!(e.key, "tenant[0].agent[1].token");
        // A demo tenant may leave tokens out.
        let mut t = tenant("a", 0);
        t.demo = true;
        t.agent[0].token = None;
        assert!(validate_tenants(&[t], None).is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<TenantConfig>(
            "name = \"a\"\ngroups = [\"s\"]\n[[agent]]\nname = \"x\"\ngroups = []\ncapacty = 3\n",
        )
        .unwrap_err();
        assert!(e.message().contains("capacty"), "{e}");
        let e = toml::from_str::<TenantConfig>(
            "name = \"a\"\ngroups = [\"s\"]\nvisitor_rate_limit = { per_minute = 3 }\n",
        )
        .unwrap_err();
        assert!(e.message().contains("per_minute"), "{e}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let t = tenant("a", 0);
        let registry = registry(vec![t.clone()], Some(&token(50)));
        for shown in [
            format!("{t:?}"),
            format!("{registry:?}"),
            format!("{:?}", token(3)),
        ] {
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
            assert!(!shown.contains("token-"), "{shown}");
        }
        assert!(format!("{t:?}").contains("<redacted>"));
    }

    #[test]
    fn registry_resolves_tokens_to_principals() {
        let admin = Secret::new("admin-token-0123456789");
        let registry = registry(vec![tenant("acme", 0), tenant("globex", 10)], Some(&admin));
        assert_eq!(
            registry.authenticate(token(1).expose(), 0),
            Ok(Principal::Agent {
                tenant: "acme",
                name: "bob"
            })
        );
        assert_eq!(
            registry.authenticate(token(10).expose(), 0),
            Ok(Principal::Agent {
                tenant: "globex",
                name: "alice"
            })
        );
        assert_eq!(
            registry.authenticate(token(12).expose(), 0),
            Ok(Principal::Integration { tenant: "globex" })
        );
        assert_eq!(
            registry.authenticate(admin.expose(), 0),
            Ok(Principal::Admin)
        );
        assert_eq!(
            registry.authenticate("not-a-known-token-at-all", 0),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(registry.authenticate("", 0), Err(AuthError::Missing));
        assert!(matches!(
            registry.authenticate(&"x".repeat(TOKEN_BYTES_MAX + 1), 0),
            Err(AuthError::Malformed { .. })
        ));
        // Visitor tokens: issued per tenant, verified with that tenant's key only.
        let v = registry
            .issue_visitor_token("globex", 42, 1_000, 60)
            .unwrap();
        assert_eq!(
            registry.authenticate(&v, 1_059),
            Ok(Principal::Visitor {
                tenant: "globex",
                conversation: 42
            })
        );
        assert_eq!(
            registry.authenticate(&v, 1_060),
            Err(AuthError::Expired {
                expired_at_s: 1_060
            })
        );
        assert!(registry.issue_visitor_token("initech", 1, 0, 60).is_none());
        // A token signed with acme's key but naming globex does not verify.
        let acme_key = &registry.tenant("acme").unwrap().visitor_key;
        let forged = auth::issue_visitor_token(acme_key, "globex", 42, 10_000);
        assert_eq!(
            registry.authenticate(&forged, 0),
            Err(AuthError::BadSignature)
        );
        // Agent names repeat across tenants, but each principal carries its own tenant, so the
        // participant check fences them.
        let acme_alice = registry.authenticate(token(0).expose(), 0).unwrap();
        assert!(auth::authorize(&acme_alice, "globex", 42, Some("alice")).is_err());
        assert!(auth::authorize(&acme_alice, "acme", 42, Some("alice")).is_ok());
    }

    #[test]
    fn demo_secrets_persist_and_fill_the_demo_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = load_or_create_demo_secrets(&data).unwrap();
        let second = load_or_create_demo_secrets(&data).unwrap();
        assert_eq!(first, second, "restart keeps the tokens");
        let demo = demo_tenant(&first);
        assert!(demo.demo);
        validate_tenants(std::slice::from_ref(&demo), None).unwrap();
        let lines = demo_credential_lines(&demo);
        let alice = first.agent_token("alice").unwrap().expose();
        assert!(lines.contains(&format!(
            "kefu demo agent=alice groups=sales,support token={alice}"
        )));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("kefu demo agent=bob groups=support token="))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("kefu demo agent=carol groups=sales token="))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("kefu demo integration token="))
        );
        assert_ne!(first.agent_token("alice"), first.agent_token("bob"));
        // No temp file left behind; the file is private.
        let names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [DEMO_SECRETS_FILE]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(DEMO_SECRETS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "secrets readable by others: {mode:o}");
        // A damaged file is an error naming the path, not silently replaced.
        std::fs::write(
            data.join(DEMO_SECRETS_FILE),
            "\"agent.alice\" = \"short\"\n",
        )
        .unwrap();
        let e = load_or_create_demo_secrets(&data).unwrap_err().to_string();
        assert!(
            e.contains(DEMO_SECRETS_FILE) && e.contains("agent.alice"),
            "{e}"
        );
    }

    #[test]
    fn visitor_keys_persist_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_visitor_key(dir.path(), "acme").unwrap();
        assert_eq!(a, load_or_create_visitor_key(dir.path(), "acme").unwrap());
        let b = load_or_create_visitor_key(dir.path(), "globex").unwrap();
        assert_ne!(a, b);
        std::fs::write(dir.path().join("keys/acme.visitor-key"), "zz\n").unwrap();
        assert!(load_or_create_visitor_key(dir.path(), "acme").is_err());
    }

    #[test]
    fn load_builds_a_registry_with_intents() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = load_or_create_demo_secrets(dir.path()).unwrap();
        let demo = demo_tenant(&secrets);
        let mut other = tenant("acme", 100);
        other.groups = vec!["billing".into()];
        for agent in &mut other.agent {
            agent.groups = vec!["billing".into()];
        }
        // Intents routing to groups this tenant lacks: refused, naming the key.
        other.intents = Some(BUILTIN_DEMO_INTENTS.into());
        let e = TenantRegistry::load(
            vec![demo.clone(), other.clone()],
            None,
            dir.path(),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(e.key, "tenant[1].intents");
        // A missing intents file names the key and the path.
        other.intents = Some("nope.toml".into());
        let e = TenantRegistry::load(
            vec![demo.clone(), other.clone()],
            None,
            dir.path(),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(e.key, "tenant[1].intents");
        assert!(e.problem.contains("nope.toml"), "{e}");
        other.intents = None;
        let registry =
            TenantRegistry::load(vec![demo, other], None, dir.path(), dir.path()).unwrap();
        assert_eq!(registry.tenant_index("acme"), Some(1));
        assert_eq!(registry.tenant_index("nope"), None);
        let demo = registry.tenant("demo").unwrap();
        assert!(demo.canned_replies.get("greeting").is_some());
        assert_eq!(demo.classify_group(Some("我要退款")), "support");
        assert_eq!(
            demo.classify_group(Some("how much does the pro plan cost")),
            "sales"
        );
        assert_eq!(demo.classify_group(Some("zzz qqq")), "support");
        assert_eq!(demo.classify_group(None), "support");
        let acme = registry.tenant("acme").unwrap();
        assert!(acme.intents.is_none());
        assert_eq!(
            acme.classify_group(Some("how much does it cost")),
            "billing"
        );
        // The demo agent tokens resolve.
        let alice = secrets.agent_token("alice").unwrap();
        assert_eq!(
            registry.authenticate(alice.expose(), 0),
            Ok(Principal::Agent {
                tenant: "demo",
                name: "alice"
            })
        );
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_file_atomic(&path, b"one").unwrap();
        write_file_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_file_atomic(&dir.path().join("missing/f"), b"x").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
