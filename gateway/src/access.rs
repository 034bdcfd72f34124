//! Who a request is: the gateway's view of `tenant::TenantRegistry` (agent, integration and signed visitor tokens) as engine [`Actor`]s with tenant indexes, a per-thread cache of verified tokens, and visitor-token issue.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kefu_protocol::model::ModelLimits;

use crate::auth::{AuthError, Principal};
use crate::config::{Config, Limits};
use crate::engine::Actor;
use crate::tenant::TenantRegistry;

/// The model limits the gateway's config implies.
pub fn model_limits(l: &Limits) -> ModelLimits {
    ModelLimits {
        text_bytes_max: l.text_bytes_max,
        client_msg_id_bytes_max: l.client_msg_id_bytes_max,
        page_entries_max: l.history_limit_max,
        ..ModelLimits::DEFAULT
    }
}

pub struct Access {
    pub registry: Arc<TenantRegistry>,
    visitor_token_ttl_s: u64,
    /// Tells this instance's entries in the per-thread token cache from another's (tests run
    /// several gateways' worth of `Access` on one thread).
    instance: u64,
}

/// Slots of the per-thread cache of verified tokens (direct-mapped, a power of two): at most
/// this many tokens (512 bytes each at most) are kept per shard thread.
pub const TOKEN_CACHE_SLOTS: usize = 1024;
const _: () = assert!(TOKEN_CACHE_SLOTS.is_power_of_two());

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A token that verified, and what it stands for until `valid_until_s`.
struct CachedToken {
    instance: u64,
    token: String,
    actor: Actor,
    valid_until_s: u64,
}

/// Verified tokens of one thread: a hit skips the HMAC of a visitor token (four SHA-256 blocks
/// and two base64 decodes) or the SHA-256 and table lookup of a config token, and the tenant
/// lookups after it. Only tokens that verified are kept, compared in full (in constant time),
/// and only until they expire; the registry never changes after start, so a kept answer stays
/// the answer. Keyed by a per-process seeded hash, so nobody can aim tokens at one slot.
struct TokenCache {
    hasher: foldhash::fast::RandomState,
    slots: Vec<Option<CachedToken>>,
}

thread_local! {
    static TOKEN_CACHE: RefCell<TokenCache> = RefCell::new(TokenCache {
        hasher: foldhash::fast::RandomState::default(),
        slots: Vec::new(),
    });
}

impl TokenCache {
    fn slot(&self, token: &str) -> usize {
        (self.hasher.hash_one(token) as usize) & (TOKEN_CACHE_SLOTS - 1)
    }

    fn get(&self, instance: u64, token: &str, now_s: u64) -> Option<Actor> {
        let hit = self.slots.get(self.slot(token))?.as_ref()?;
        (hit.instance == instance
            && now_s < hit.valid_until_s
            && constant_time_eq(hit.token.as_bytes(), token.as_bytes()))
        .then(|| hit.actor.clone())
    }

    fn put(&mut self, instance: u64, token: &str, actor: &Actor, valid_until_s: u64) {
        if self.slots.is_empty() {
            self.slots.resize_with(TOKEN_CACHE_SLOTS, || None);
        }
        let at = self.slot(token);
        match &mut self.slots[at] {
            // Reuse the slot's string: no allocation once it has held a token this long.
            Some(slot) => {
                slot.instance = instance;
                slot.token.clear();
                slot.token.push_str(token);
                slot.actor = actor.clone();
                slot.valid_until_s = valid_until_s;
            }
            empty => {
                *empty = Some(CachedToken {
                    instance,
                    token: token.to_owned(),
                    actor: actor.clone(),
                    valid_until_s,
                })
            }
        }
    }
}

/// Unix seconds from the kernel's coarse clock: token expiry is in whole seconds, and the
/// coarse clock (at most one scheduler tick behind) costs a few nanoseconds instead of a
/// timer read per request.
fn unix_seconds_coarse() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    match u64::try_from(ts.tv_sec) {
        Ok(s) if rc == 0 => s,
        _ => crate::shard::now_ms() / 1000,
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    /// Loads the tenants (their tokens must be filled in: demo tokens are generated before
    /// this), their intents and their visitor keys (created in the data dir on first start).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let registry = TenantRegistry::load(
            config.tenants.clone(),
            None,
            &config.config_dir,
            &config.data_dir,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self::from_registry(
            Arc::new(registry),
            config.visitor_token_ttl_ms / 1000,
        ))
    }

    /// From a loaded registry (tests, tools); `Access::new` loads it from the config.
    pub fn from_registry(registry: Arc<TenantRegistry>, visitor_token_ttl_s: u64) -> Self {
        Self {
            registry,
            visitor_token_ttl_s,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn index(&self, tenant: &str) -> Result<u16, AuthError> {
        self.registry
            .tenants()
            .iter()
            .position(|t| t.name() == tenant)
            .map(|i| i as u16)
            .ok_or(AuthError::UnknownToken)
    }

    /// The actor a bearer token stands for (401 on `Err`).
    pub fn authenticate(&self, token: &str) -> Result<Actor, AuthError> {
        let now_s = unix_seconds_coarse();
        if let Some(actor) = TOKEN_CACHE.with(|c| c.borrow().get(self.instance, token, now_s)) {
            return Ok(actor);
        }
        let (actor, valid_until_s) = self.verify(token, now_s)?;
        TOKEN_CACHE.with(|c| {
            c.borrow_mut()
                .put(self.instance, token, &actor, valid_until_s)
        });
        Ok(actor)
    }

    /// [`Self::authenticate`] without the cache, and until when the answer holds.
    fn verify(&self, token: &str, now_s: u64) -> Result<(Actor, u64), AuthError> {
        let (principal, valid_until_s) = self.registry.authenticate_until(token, now_s)?;
        let actor = match principal {
            Principal::Visitor {
                tenant,
                conversation,
            } => Actor::Visitor {
                tenant: self.index(tenant)?,
                conversation_id: conversation,
            },
            Principal::Agent { tenant, name } => Actor::Agent {
                tenant: self.index(tenant)?,
                name: Arc::from(name),
            },
            Principal::Integration { tenant } => Actor::Integration {
                tenant: self.index(tenant)?,
            },
            // No admin token is configured by the gateway; treat one like the first tenant's
            // integration should a future config add it.
            Principal::Admin => Actor::Integration { tenant: 0 },
        };
        Ok((actor, valid_until_s))
    }

    pub fn issue_visitor_token(&self, tenant: u16, conversation: u64) -> String {
        let now_s = crate::shard::now_ms() / 1000;
        let name = self.registry.tenants()[tenant as usize].name();
        self.registry
            .issue_visitor_token(name, conversation, now_s, self.visitor_token_ttl_s)
            .expect("tenant indexes come from the registry")
    }

    pub fn tenant_name(&self, tenant: u16) -> &str {
        self.registry.tenants()[tenant as usize].name()
    }

    pub fn tenants_len(&self) -> usize {
        self.registry.tenants().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::VisitorKey;
    use crate::tenant::{Secret, Tenant, demo_tenant_config};

    fn access(key_byte: u8) -> Access {
        let mut config = demo_tenant_config();
        for (i, a) in config.agent.iter_mut().enumerate() {
            a.token = Some(Secret::new(format!(
                "access-test-agent-token-{key_byte}-{i:04}"
            )));
        }
        for (i, n) in config.integration.iter_mut().enumerate() {
            n.token = Some(Secret::new(format!(
                "access-test-integration-{key_byte}-{i:04}"
            )));
        }
        let key = VisitorKey::from_bytes([key_byte; 32]);
        let registry = TenantRegistry::new(vec![Tenant::new(config, key, None)], None).unwrap();
        Access::from_registry(Arc::new(registry), 3600)
    }

    #[test]
    fn cached_tokens_answer_as_verified_ones() {
        let a = access(1);
        let token = a.issue_visitor_token(0, 42);
        let want = Actor::Visitor {
            tenant: 0,
            conversation_id: 42,
        };
        // Miss, then hits: the same actor each time.
        for _ in 0..3 {
            assert_eq!(a.authenticate(&token), Ok(want.clone()));
        }
        let agent = format!("access-test-agent-token-1-{:04}", 0);
        for _ in 0..2 {
            assert!(
                matches!(a.authenticate(&agent), Ok(Actor::Agent { ref name, .. }) if &**name == "alice")
            );
        }
        // A refused token is never kept: refused again, with the same reason.
        // One signature character changed, away from the last one (whose low bits must stay
        // zero for the base64 to be canonical): a well-formed token with a wrong signature.
        let at = token.len() - 5;
        let mut forged = token.clone();
        let other = if &token[at..=at] == "A" { "B" } else { "A" };
        forged.replace_range(at..=at, other);
        for _ in 0..2 {
            assert_eq!(a.authenticate(&forged), Err(AuthError::BadSignature));
        }
        assert_eq!(a.authenticate("nope"), Err(AuthError::UnknownToken));
    }

    #[test]
    fn another_instance_does_not_see_the_first_ones_tokens() {
        // Same thread, different visitor keys: a token the first verified (and cached) does
        // not verify for the second.
        let (a, b) = (access(2), access(3));
        let token = a.issue_visitor_token(0, 7);
        assert!(a.authenticate(&token).is_ok());
        assert_eq!(b.authenticate(&token), Err(AuthError::BadSignature));
        assert!(a.authenticate(&token).is_ok());
    }

    #[test]
    fn coarse_seconds_follow_the_system_clock() {
        let precise = |_: ()| crate::shard::now_ms() / 1000;
        let (before, coarse, after) = (precise(()), unix_seconds_coarse(), precise(()));
        // At most one scheduler tick behind: within a second of the precise reads.
        assert!(
            coarse + 1 >= before && coarse <= after,
            "{before} {coarse} {after}"
        );
    }

    #[test]
    fn cache_entries_end_at_their_expiry_and_compare_whole_tokens() {
        let mut cache = TokenCache {
            hasher: foldhash::fast::RandomState::default(),
            slots: Vec::new(),
        };
        let actor = Actor::Integration { tenant: 0 };
        assert_eq!(cache.get(1, "tok", 0), None);
        cache.put(1, "tok", &actor, 100);
        assert_eq!(cache.get(1, "tok", 99), Some(actor.clone()));
        assert_eq!(cache.get(1, "tok", 100), None, "expired at valid_until_s");
        assert_eq!(cache.get(2, "tok", 99), None, "another instance");
        assert_eq!(cache.get(1, "to", 99), None);
        assert_eq!(cache.get(1, "tok2", 99), None);
        // Overwriting a slot replaces its answer.
        cache.put(1, "tok", &actor, 50);
        assert_eq!(cache.get(1, "tok", 60), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
