//! Who a request is: agent and integration bearer tokens from the config, and visitor tokens (HMAC-signed by `auth`, scoped to one conversation, with expiry) issued here with a per-tenant key derived from the data dir's secret.

use std::collections::HashMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use kefu_protocol::model::ModelLimits;
use sha2::Sha256;

use crate::auth::{self, AuthError, VisitorKey};
use crate::config::{Config, Limits};
use crate::engine::Actor;

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
    tokens: HashMap<Box<str>, Actor>,
    tenant_names: Vec<Box<str>>,
    keys: Vec<VisitorKey>,
    visitor_token_ttl_s: u64,
}

impl Access {
    /// Every tenant's tokens must be filled in (demo tokens are generated before this).
    pub fn new(config: &Config, secret: &[u8]) -> anyhow::Result<Self> {
        let mut tokens = HashMap::new();
        let mut keys = Vec::new();
        for (i, t) in config.tenants.iter().enumerate() {
            let tenant = i as u16;
            for a in &t.agent {
                let token = a
                    .token
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("agent {} has no token", a.name))?;
                tokens.insert(
                    token.into_boxed_str(),
                    Actor::Agent {
                        tenant,
                        name: Arc::from(a.name.as_str()),
                    },
                );
            }
            for n in &t.integration {
                let token = n
                    .token
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("integration {} has no token", n.name))?;
                tokens.insert(token.into_boxed_str(), Actor::Integration { tenant });
            }
            // One key per tenant, derived from the server secret, so a leaked visitor token
            // of one tenant says nothing about another's.
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
            mac.update(b"kefu visitor key v1\0");
            mac.update(t.name.as_bytes());
            let bytes: [u8; 32] = mac.finalize().into_bytes().into();
            keys.push(VisitorKey::from_bytes(bytes));
        }
        Ok(Self {
            tokens,
            tenant_names: config
                .tenants
                .iter()
                .map(|t| t.name.as_str().into())
                .collect(),
            keys,
            visitor_token_ttl_s: config.visitor_token_ttl_ms / 1000,
        })
    }

    /// The actor a bearer token stands for (401 on `Err`).
    pub fn authenticate(&self, token: &str) -> Result<Actor, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.starts_with(auth::VISITOR_TOKEN_PREFIX) {
            let now_s = crate::shard::now_ms() / 1000;
            let claims = auth::verify_visitor_token(token, now_s, |tenant| {
                let i = self.tenant_names.iter().position(|n| &**n == tenant)?;
                Some((&*self.tenant_names[i], &self.keys[i]))
            })?;
            let tenant = self
                .tenant_names
                .iter()
                .position(|n| &**n == claims.tenant)
                .ok_or(AuthError::BadSignature)? as u16;
            return Ok(Actor::Visitor {
                tenant,
                conversation_id: claims.conversation,
            });
        }
        self.tokens
            .get(token)
            .cloned()
            .ok_or(AuthError::UnknownToken)
    }

    pub fn issue_visitor_token(&self, tenant: u16, conversation: u64) -> String {
        let now_s = crate::shard::now_ms() / 1000;
        auth::issue_visitor_token(
            &self.keys[tenant as usize],
            &self.tenant_names[tenant as usize],
            conversation,
            now_s + self.visitor_token_ttl_s,
        )
    }

    pub fn tenants_len(&self) -> usize {
        self.tenant_names.len()
    }
}
