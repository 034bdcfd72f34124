//! Authentication and authorization: HMAC-SHA256 signed visitor tokens, the [`Principal`] a bearer token stands for, and the checks that keep each tenant's conversations to itself.
//!
//! Agents and integrations hold static tokens from the config (resolved by
//! `tenant::TenantRegistry::authenticate`). A visitor gets a token when it starts a conversation;
//! the token names the tenant and the conversation and carries an expiry, signed with a key per
//! tenant that lives in the data dir, so the gateway needs no table of visitor tokens and a
//! restart keeps them valid.
//!
//! Visitor token text: `kv1.` + base64url(payload) + `.` + base64url(HMAC-SHA256(key, payload)),
//! no padding. Payload bytes:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 1 | version = 1 |
//! | 1 | 8 | conversation id, u64 little-endian |
//! | 9 | 8 | expires_at_s, u64 little-endian (unix seconds) |
//! | 17 | 1 | tenant id length `n` (1..=[`TENANT_ID_BYTES_MAX`]) |
//! | 18 | n | tenant id, UTF-8 |
//!
//! Status mapping (API "Identities and tokens"): every [`AuthError`] is 401 (WebSocket close 4001);
//! [`Forbidden`] is 403 (close 4003). Verification allocates nothing and compares the MAC in
//! constant time.

use std::fmt;
use std::io::Read;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Every visitor token starts with this; agent and integration tokens never do.
pub const VISITOR_TOKEN_PREFIX: &str = "kv1.";
/// Bytes of a tenant's visitor signing key.
pub const VISITOR_KEY_BYTES: usize = 32;
/// Longest tenant id a visitor token can carry (also the config limit on tenant ids).
pub const TENANT_ID_BYTES_MAX: usize = 64;
/// Longest bearer token looked at; anything longer is malformed before any decoding.
pub const BEARER_TOKEN_BYTES_MAX: usize = 512;

const PAYLOAD_VERSION: u8 = 1;
const PAYLOAD_FIXED_BYTES: usize = 18;
const PAYLOAD_BYTES_MAX: usize = PAYLOAD_FIXED_BYTES + TENANT_ID_BYTES_MAX;
const MAC_BYTES: usize = 32;
/// base64url without padding: 4 characters per 3 bytes, rounded up.
const fn b64_len(bytes: usize) -> usize {
    (bytes * 4).div_ceil(3)
}
const _: () = assert!(
    VISITOR_TOKEN_PREFIX.len() + b64_len(PAYLOAD_BYTES_MAX) + 1 + b64_len(MAC_BYTES)
        <= BEARER_TOKEN_BYTES_MAX
);
const _: () = assert!(TENANT_ID_BYTES_MAX <= u8::MAX as usize);

/// A tenant's key for signing visitor tokens. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct VisitorKey([u8; VISITOR_KEY_BYTES]);

impl VisitorKey {
    pub fn from_bytes(bytes: [u8; VISITOR_KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        Ok(Self(random_bytes()?))
    }

    /// The raw key, for persisting it (never for logs).
    pub fn expose(&self) -> &[u8; VISITOR_KEY_BYTES] {
        &self.0
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for VisitorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VisitorKey(<redacted>)")
    }
}

/// `N` bytes from `/dev/urandom` (the kernel CSPRNG; never blocks after boot).
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Why a bearer token was refused: all of these answer 401 (WebSocket close 4001).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token: {reason}")]
    Malformed { reason: &'static str },
    #[error("unknown token")]
    UnknownToken,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {expired_at_s} (unix seconds)")]
    Expired { expired_at_s: u64 },
}

impl AuthError {
    pub const HTTP_STATUS: u16 = 401;
    pub const WS_CLOSE_CODE: u16 = 4001;
}

/// A valid identity asking for something it may not have: 403 (WebSocket close 4003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("forbidden: {reason}")]
pub struct Forbidden {
    pub reason: &'static str,
}

impl Forbidden {
    pub const HTTP_STATUS: u16 = 403;
    pub const WS_CLOSE_CODE: u16 = 4003;
}

/// Who is asking. Borrowed from the tenant registry, so resolving a token allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal<'r> {
    /// Holds a visitor token: one conversation of one tenant.
    Visitor {
        tenant: &'r str,
        conversation: u64,
    },
    Agent {
        tenant: &'r str,
        name: &'r str,
    },
    /// A tenant's backend integration (bots, CRM sync).
    Integration {
        tenant: &'r str,
    },
    /// The operator: every tenant.
    Admin,
}

impl<'r> Principal<'r> {
    /// The tenant the principal belongs to; `None` for the operator.
    pub fn tenant(&self) -> Option<&'r str> {
        match *self {
            Principal::Visitor { tenant, .. }
            | Principal::Agent { tenant, .. }
            | Principal::Integration { tenant } => Some(tenant),
            Principal::Admin => None,
        }
    }
}

/// What a verified visitor token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisitorClaims<'r> {
    pub tenant: &'r str,
    pub conversation: u64,
    pub expires_at_s: u64,
}

/// Signs a visitor token for `conversation` of `tenant`, valid until `expires_at_s`.
/// Panics if `tenant` is empty or longer than [`TENANT_ID_BYTES_MAX`] (config validation
/// guarantees it is not).
pub fn issue_visitor_token(
    key: &VisitorKey,
    tenant: &str,
    conversation: u64,
    expires_at_s: u64,
) -> String {
    assert!(
        (1..=TENANT_ID_BYTES_MAX).contains(&tenant.len()),
        "tenant ids are validated at config load"
    );
    let mut payload = [0u8; PAYLOAD_BYTES_MAX];
    payload[0] = PAYLOAD_VERSION;
    payload[1..9].copy_from_slice(&conversation.to_le_bytes());
    payload[9..17].copy_from_slice(&expires_at_s.to_le_bytes());
    payload[17] = tenant.len() as u8;
    let payload_len = PAYLOAD_FIXED_BYTES + tenant.len();
    payload[PAYLOAD_FIXED_BYTES..payload_len].copy_from_slice(tenant.as_bytes());
    let payload = &payload[..payload_len];
    let mut mac = key.mac();
    mac.update(payload);
    let tag = mac.finalize().into_bytes();
    let mut token = String::with_capacity(BEARER_TOKEN_BYTES_MAX);
    token.push_str(VISITOR_TOKEN_PREFIX);
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut token);
    token
}

/// Verifies a visitor token. `key_for` maps a tenant id to the registry's copy of that id and the
/// tenant's key (`None`: no such tenant, answered as a bad signature so a forged tenant learns
/// nothing). The signature is checked before the expiry, so `Expired` is only ever said about a
/// token this gateway issued.
pub fn verify_visitor_token<'r>(
    token: &str,
    now_s: u64,
    key_for: impl FnOnce(&str) -> Option<(&'r str, &'r VisitorKey)>,
) -> Result<VisitorClaims<'r>, AuthError> {
    let malformed = |reason| AuthError::Malformed { reason };
    if token.len() > BEARER_TOKEN_BYTES_MAX {
        return Err(malformed("token too long"));
    }
    let rest = token
        .strip_prefix(VISITOR_TOKEN_PREFIX)
        .ok_or(malformed("not a visitor token"))?;
    let (payload_b64, mac_b64) = rest
        .split_once('.')
        .ok_or(malformed("missing signature part"))?;
    if payload_b64.len() > b64_len(PAYLOAD_BYTES_MAX) {
        return Err(malformed("payload too long"));
    }
    if mac_b64.len() != b64_len(MAC_BYTES) {
        return Err(malformed("signature has the wrong length"));
    }
    let mut payload = [0u8; PAYLOAD_BYTES_MAX];
    let payload_len = URL_SAFE_NO_PAD
        .decode_slice(payload_b64, &mut payload)
        .map_err(|_| malformed("payload is not base64url"))?;
    let payload = &payload[..payload_len];
    let mut tag = [0u8; MAC_BYTES + 2];
    let tag_len = URL_SAFE_NO_PAD
        .decode_slice(mac_b64, &mut tag)
        .map_err(|_| malformed("signature is not base64url"))?;
    if tag_len != MAC_BYTES {
        return Err(malformed("signature has the wrong length"));
    }
    if payload.len() < PAYLOAD_FIXED_BYTES {
        return Err(malformed("payload too short"));
    }
    if payload[0] != PAYLOAD_VERSION {
        return Err(malformed("unknown token version"));
    }
    let tenant_len = usize::from(payload[17]);
    if payload.len() != PAYLOAD_FIXED_BYTES + tenant_len || tenant_len == 0 {
        return Err(malformed("tenant length does not match the payload"));
    }
    let tenant = std::str::from_utf8(&payload[PAYLOAD_FIXED_BYTES..])
        .map_err(|_| malformed("tenant id is not UTF-8"))?;
    let (tenant, key) = key_for(tenant).ok_or(AuthError::BadSignature)?;
    let mut mac = key.mac();
    mac.update(payload);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&tag[..MAC_BYTES])
        .map_err(|_| AuthError::BadSignature)?;
    let field = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
    let (conversation, expires_at_s) = (field(1), field(9));
    if now_s >= expires_at_s {
        return Err(AuthError::Expired {
            expired_at_s: expires_at_s,
        });
    }
    Ok(VisitorClaims {
        tenant,
        conversation,
        expires_at_s,
    })
}

/// The token of an `Authorization` header value: `Bearer TOKEN` (scheme case-insensitive).
pub fn bearer_token(header_value: &[u8]) -> Result<&str, AuthError> {
    const SCHEME: &[u8] = b"bearer ";
    if header_value.len() < SCHEME.len()
        || !header_value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME)
    {
        return Err(AuthError::Malformed {
            reason: "authorization scheme is not Bearer",
        });
    }
    let token = header_value[SCHEME.len()..].trim_ascii();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > BEARER_TOKEN_BYTES_MAX {
        return Err(AuthError::Malformed {
            reason: "token too long",
        });
    }
    std::str::from_utf8(token).map_err(|_| AuthError::Malformed {
        reason: "token is not ASCII",
    })
}

/// May `principal` read and write conversation `conversation_id` of `conversation_tenant`, whose
/// assigned agent is `assigned_agent`? Participants only: its own visitor, its assigned agent,
/// an integration of the same tenant (bots post as the tenant), and the operator. The tenant is
/// compared first, so no identity of one tenant reaches another tenant's conversation even if
/// ids or agent names coincide.
pub fn authorize(
    principal: &Principal<'_>,
    conversation_tenant: &str,
    conversation_id: u64,
    assigned_agent: Option<&str>,
) -> Result<(), Forbidden> {
    authorize_tenant(principal, conversation_tenant)?;
    match *principal {
        Principal::Admin | Principal::Integration { .. } => Ok(()),
        Principal::Visitor { conversation, .. } => {
            if conversation == conversation_id {
                Ok(())
            } else {
                Err(Forbidden {
                    reason: "visitor token is for another conversation",
                })
            }
        }
        Principal::Agent { name, .. } => {
            if assigned_agent == Some(name) {
                Ok(())
            } else {
                Err(Forbidden {
                    reason: "conversation is not assigned to this agent",
                })
            }
        }
    }
}

/// May `principal` act on `tenant` at all? The tenant fence for everything that is not a
/// participant check (an agent accepting a queued conversation, reading an attachment's
/// metadata, ...): same tenant or the operator.
pub fn authorize_tenant(principal: &Principal<'_>, tenant: &str) -> Result<(), Forbidden> {
    match principal.tenant() {
        None => Ok(()),
        Some(own) if own == tenant => Ok(()),
        Some(_) => Err(Forbidden {
            reason: "token belongs to another tenant",
        }),
    }
}

/// May `principal` perform agent actions (accept, transfer, resolve, reopen, status) in
/// `tenant`? Returns the agent's name (`None` for the operator, who acts on behalf of none).
pub fn authorize_agent_action<'r>(
    principal: &Principal<'r>,
    tenant: &str,
) -> Result<Option<&'r str>, Forbidden> {
    authorize_tenant(principal, tenant)?;
    match *principal {
        Principal::Agent { name, .. } => Ok(Some(name)),
        Principal::Admin => Ok(None),
        Principal::Visitor { .. } | Principal::Integration { .. } => Err(Forbidden {
            reason: "only agents may do this",
        }),
    }
}

/// May `principal` read the raw shard stream (`GET /v1/stream`)? The API gives it to integration
/// tokens, but the stream is the shard log as stored, carrying every tenant of the shard, and it is
/// sent with sendfile, so it cannot be filtered. An integration token qualifies only while the
/// gateway serves a single tenant (`tenants_len == 1`, as with the demo config); with several
/// tenants only the operator's token does, or one tenant would read the others' conversations.
pub fn authorize_stream(principal: &Principal<'_>, tenants_len: usize) -> Result<(), Forbidden> {
    match principal {
        Principal::Admin => Ok(()),
        Principal::Integration { .. } if tenants_len == 1 => Ok(()),
        Principal::Integration { .. } => Err(Forbidden {
            reason: "the shard stream carries several tenants: operator token required",
        }),
        Principal::Visitor { .. } | Principal::Agent { .. } => Err(Forbidden {
            reason: "the shard stream needs an integration token",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> VisitorKey {
        VisitorKey::from_bytes([byte; VISITOR_KEY_BYTES])
    }

    /// A two-tenant key table, as the registry provides it.
    fn lookup<'a>(
        keys: &'a [(&'a str, VisitorKey)],
    ) -> impl Fn(&str) -> Option<(&'a str, &'a VisitorKey)> {
        move |tenant| {
            keys.iter()
                .find(|(t, _)| *t == tenant)
                .map(|(t, k)| (*t, k))
        }
    }

    #[test]
    fn round_trip_and_expiry() {
        let keys = [("acme", key(1)), ("globex", key(2))];
        let token = issue_visitor_token(&keys[0].1, "acme", 0x0001_0000_0000_002a, 1_000);
        assert!(token.starts_with(VISITOR_TOKEN_PREFIX));
        assert!(token.len() <= BEARER_TOKEN_BYTES_MAX);
        assert!(
            token[VISITOR_TOKEN_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{token}"
        );
        let claims = verify_visitor_token(&token, 999, lookup(&keys)).unwrap();
        assert_eq!(
            claims,
            VisitorClaims {
                tenant: "acme",
                conversation: 0x0001_0000_0000_002a,
                expires_at_s: 1_000
            }
        );
        assert_eq!(
            verify_visitor_token(&token, 1_000, lookup(&keys)),
            Err(AuthError::Expired {
                expired_at_s: 1_000
            })
        );
        let long_tenant = "t".repeat(TENANT_ID_BYTES_MAX);
        let keys = [(long_tenant.as_str(), key(3))];
        let token = issue_visitor_token(&keys[0].1, &long_tenant, u64::MAX, u64::MAX);
        assert!(token.len() <= BEARER_TOKEN_BYTES_MAX);
        assert_eq!(
            verify_visitor_token(&token, 0, lookup(&keys))
                .unwrap()
                .conversation,
            u64::MAX
        );
    }

    #[test]
    fn forged_and_cross_tenant_tokens_fail() {
        let keys = [("acme", key(1)), ("globex", key(2))];
        // Signed with globex's key but claiming acme: the acme key does not verify it.
        let forged = issue_visitor_token(&keys[1].1, "acme", 7, 1_000);
        assert_eq!(
            verify_visitor_token(&forged, 0, lookup(&keys)),
            Err(AuthError::BadSignature)
        );
        // Unknown tenant.
        let token = issue_visitor_token(&key(9), "initech", 7, 1_000);
        assert_eq!(
            verify_visitor_token(&token, 0, lookup(&keys)),
            Err(AuthError::BadSignature)
        );
        // Any flipped character of a valid token fails (signature or format), never verifies.
        let good = issue_visitor_token(&keys[0].1, "acme", 7, 1_000);
        for at in VISITOR_TOKEN_PREFIX.len()..good.len() {
            let mut bytes = good.clone().into_bytes();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let bad = String::from_utf8(bytes).unwrap();
            if bad == good {
                continue;
            }
            let result = verify_visitor_token(&bad, 0, lookup(&keys));
            assert!(
                matches!(
                    result,
                    Err(AuthError::BadSignature | AuthError::Malformed { .. })
                ),
                "flip at {at}: {result:?}"
            );
        }
        // Replacing the payload with another conversation's keeps the old signature: refused.
        let other = issue_visitor_token(&keys[0].1, "acme", 8, 1_000);
        let (good_payload, _) = good.rsplit_once('.').unwrap();
        let (_, other_mac) = other.rsplit_once('.').unwrap();
        let spliced = format!("{good_payload}.{other_mac}");
        assert_eq!(
            verify_visitor_token(&spliced, 0, lookup(&keys)),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_say_why() {
        let keys = [("acme", key(1))];
        let cases: &[&str] = &[
            "",
            "ka_agent_token",
            "kv1.",
            "kv1.nodot",
            "kv1.AAAA.short",
            &format!("kv1.!!!!.{}", "A".repeat(43)),
            &format!("kv1.AAAA.{}", "!".repeat(43)),
            &format!("kv1.AAAA.{}", "A".repeat(43)),
            &format!("kv1.{}.{}", "A".repeat(200), "A".repeat(43)),
            &"x".repeat(BEARER_TOKEN_BYTES_MAX + 1),
        ];
        for case in cases {
            let result = verify_visitor_token(case, 0, lookup(&keys));
            assert!(
                matches!(result, Err(AuthError::Malformed { .. })),
                "{case:?}: {result:?}"
            );
        }
        // Valid base64 and length but version 2.
        let mut payload = vec![2u8];
        payload.extend_from_slice(&[0; 16]);
        payload.push(4);
        payload.extend_from_slice(b"acme");
        let token = format!(
            "kv1.{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            "A".repeat(43)
        );
        assert_eq!(
            verify_visitor_token(&token, 0, lookup(&keys)),
            Err(AuthError::Malformed {
                reason: "unknown token version"
            })
        );
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Ok("abc"));
        assert_eq!(bearer_token(b"bearer   abc  "), Ok("abc"));
        assert_eq!(bearer_token(b"Bearer "), Err(AuthError::Missing));
        assert!(matches!(
            bearer_token(b"Basic abc"),
            Err(AuthError::Malformed { .. })
        ));
        assert!(matches!(
            bearer_token(b"Bearer \xff"),
            Err(AuthError::Malformed { .. })
        ));
    }

    #[test]
    fn a_tenant_never_reaches_another_tenants_conversation() {
        let visitor = Principal::Visitor {
            tenant: "acme",
            conversation: 7,
        };
        let agent = Principal::Agent {
            tenant: "acme",
            name: "alice",
        };
        let integration = Principal::Integration { tenant: "acme" };
        // Own data.
        assert_eq!(authorize(&visitor, "acme", 7, None), Ok(()));
        assert_eq!(authorize(&agent, "acme", 7, Some("alice")), Ok(()));
        assert_eq!(authorize(&integration, "acme", 7, None), Ok(()));
        assert_eq!(authorize(&Principal::Admin, "globex", 7, None), Ok(()));
        // Same conversation id and agent name in another tenant: refused for everyone.
        for p in [visitor, agent, integration] {
            assert_eq!(
                authorize(&p, "globex", 7, Some("alice")),
                Err(Forbidden {
                    reason: "token belongs to another tenant"
                }),
                "{p:?}"
            );
            assert!(authorize_tenant(&p, "globex").is_err());
            assert!(authorize_agent_action(&p, "globex").is_err());
        }
        // Within the tenant: another conversation, or not the assigned agent.
        assert!(authorize(&visitor, "acme", 8, None).is_err());
        assert!(authorize(&agent, "acme", 7, Some("bob")).is_err());
        assert!(authorize(&agent, "acme", 7, None).is_err());
        // Agent actions.
        assert_eq!(authorize_agent_action(&agent, "acme"), Ok(Some("alice")));
        assert_eq!(authorize_agent_action(&Principal::Admin, "acme"), Ok(None));
        assert!(authorize_agent_action(&visitor, "acme").is_err());
        assert!(authorize_agent_action(&integration, "acme").is_err());
        // The all-tenant stream.
        assert!(authorize_stream(&Principal::Admin, 2).is_ok());
        assert!(authorize_stream(&integration, 1).is_ok());
        assert!(authorize_stream(&integration, 2).is_err());
        assert!(authorize_stream(&agent, 1).is_err());
        assert!(authorize_stream(&visitor, 1).is_err());
    }

    #[test]
    fn arbitrary_input_never_panics_or_verifies() {
        let keys = [("acme", key(1))];
        let good = issue_visitor_token(&keys[0].1, "acme", 7, 1_000);
        // xorshift64*, fixed seed: random lengths and bytes from the token alphabet and beyond,
        // plus random edits of a valid token.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let alphabet = b"kv1.ABCxyz019-_=+/ \xff";
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 200) as usize;
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            } else {
                good.clone().into_bytes()
            };
            if !bytes.is_empty() {
                for _ in 0..1 + next() % 3 {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize];
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            let result = verify_visitor_token(&text, 0, lookup(&keys));
            if text != good {
                assert!(result.is_err(), "{text:?} verified");
            }
            let _ = bearer_token(&bytes);
        }
    }

    #[test]
    fn keys_are_random_and_redacted() {
        let (a, b) = (
            VisitorKey::generate().unwrap(),
            VisitorKey::generate().unwrap(),
        );
        assert_ne!(a, b);
        let shown = format!("{a:?}");
        assert_eq!(shown, "VisitorKey(<redacted>)");
    }
}
