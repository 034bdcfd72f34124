//! Who a request is: the gateway's view of `tenant::TenantRegistry` (agent, integration and signed visitor tokens) as engine [`Actor`]s with tenant indexes, and visitor-token issue.

use std::sync::Arc;

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
        Ok(Self {
            registry: Arc::new(registry),
            visitor_token_ttl_s: config.visitor_token_ttl_ms / 1000,
        })
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
        let now_s = crate::shard::now_ms() / 1000;
        Ok(match self.registry.authenticate(token, now_s)? {
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
        })
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
