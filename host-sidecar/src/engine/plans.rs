//! Plans: those of the configuration, overridden or added to through the admin API (stored in the
//! ledger's `plans` table with a version bumped on every write). Each sidecar keeps them in memory
//! with their version. Writing a plan bumps the version of every account on it, so every sidecar
//! re-reads the account on that account's next request (see `Engine::publish_version`); an
//! account row carries its plan's version, and a plan older in memory than that is re-read.

use super::Engine;
use crate::config::Plan;
use crate::error::ApiError;
use crate::ledger::billing::PlanDeleted;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Name -> (plan, version); version 0 is the configuration's plan, no plan a deleted one.
pub type Plans = Arc<RwLock<BTreeMap<String, (Option<Arc<Plan>>, i64)>>>;

/// The configuration's plans, as the starting point of a sidecar's plans.
pub fn from_config(plans: &BTreeMap<String, Plan>) -> Plans {
    Arc::new(RwLock::new(
        plans
            .iter()
            .map(|(k, v)| (k.clone(), (Some(Arc::new(v.clone())), 0)))
            .collect(),
    ))
}

fn unreadable(name: &str, e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("plan {name:?} in the ledger is unreadable: {e}"))
}

impl Engine {
    /// The plan named `name`, if this sidecar knows it.
    pub(crate) fn plan(&self, name: &str) -> Option<Arc<Plan>> {
        self.plans
            .read()
            .ok()?
            .get(name)
            .and_then(|(p, _)| p.clone())
    }

    fn plan_version(&self, name: &str) -> Option<i64> {
        self.plans.read().ok()?.get(name).map(|(_, v)| *v)
    }

    /// Every plan this sidecar knows, by name.
    pub fn plan_list(&self) -> Vec<(String, Arc<Plan>)> {
        self.plans
            .read()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, (p, _))| Some((k.clone(), p.clone()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keeps the newer of what is known and `p` at `version`. A deleted plan (`None`) gives
    /// way to the configuration's plan of that name, if there is one.
    fn remember_plan(&self, name: &str, p: Option<Plan>, version: i64) {
        let p = p
            .or_else(|| self.cfg.plans.get(name).cloned())
            .map(Arc::new);
        if let Ok(mut m) = self.plans.write() {
            if m.get(name).is_none_or(|(_, v)| *v <= version) {
                m.insert(name.to_string(), (p, version));
            }
        }
    }

    /// Makes sure the plan is known as the ledger has it now, before an account is put on it:
    /// another sidecar may have written or deleted it.
    pub(crate) async fn ensure_plan(&self, name: &str) -> Result<(), ApiError> {
        self.reload_plan(name).await
    }

    /// Makes sure the plan known is at least at `version` (an account row's `plan_version`).
    pub(crate) async fn ensure_plan_at(&self, name: &str, version: i64) -> Result<(), ApiError> {
        match self.plan_version(name) {
            Some(v) if v >= version => Ok(()),
            _ => self.reload_plan(name).await,
        }
    }

    /// Re-reads one plan from the ledger (another sidecar may have written it).
    pub(crate) async fn reload_plan(&self, name: &str) -> Result<(), ApiError> {
        // A name from a request is checked before it reaches the ledger.
        tollgate_protocol::validate_id("plan", name)?;
        if let Some((body, version)) = self.ledger.plan(name).await? {
            let p: Option<Plan> = body
                .map(|b| serde_json::from_str(&b).map_err(|e| unreadable(name, e)))
                .transpose()?;
            self.remember_plan(name, p, version);
        }
        Ok(())
    }

    /// Reads every plan written through the API (at start-up).
    pub async fn load_plans(&self) -> Result<usize, ApiError> {
        let rows = self.ledger.plans().await?;
        let n = rows.len();
        for (name, body, version) in rows {
            let p: Plan = serde_json::from_str(&body).map_err(|e| unreadable(&name, e))?;
            self.remember_plan(&name, Some(p), version);
        }
        Ok(n)
    }

    /// Creates or replaces a plan. Every account on it gets the new limits on its next request,
    /// on every sidecar. Returns the plan and how many accounts are on it.
    pub async fn put_plan(&self, name: &str, p: Plan) -> Result<(Plan, usize), ApiError> {
        self.cfg
            .validate_plan(&format!("plans.{name}"), name, &p)
            .map_err(|e| ApiError::Invalid(e.to_string().replace("invalid configuration: ", "")))?;
        let body = serde_json::to_string(&p).map_err(|e| ApiError::Internal(e.to_string()))?;
        let (version, bumped) = self
            .ledger
            .put_plan(name, &body, self.clock.now_ms() as i64)
            .await?;
        self.remember_plan(name, Some(p.clone()), version);
        for (acct, version) in &bumped {
            self.publish_version(acct, *version).await;
        }
        tracing::info!(plan = name, accounts = bumped.len(), "plan written");
        Ok((p, bumped.len()))
    }

    /// Deletes a plan written through the API. Refused (409) while accounts are on it, unless
    /// the configuration has a plan of that name, which then applies to them again on their next
    /// request. A configuration-only plan cannot be deleted here (remove it from the file).
    /// Returns how many accounts were on it.
    pub async fn delete_plan(&self, name: &str) -> Result<usize, ApiError> {
        tollgate_protocol::validate_id("plan", name)?;
        // `[billing]` names configuration plans only, so deleting a written one cannot strand it.
        let config_has_it = self.cfg.plans.contains_key(name);
        let now = self.clock.now_ms() as i64;
        match self.ledger.delete_plan(name, config_has_it, now).await? {
            PlanDeleted::Deleted { version, bumped } => {
                self.remember_plan(name, None, version);
                for (acct, v) in &bumped {
                    self.publish_version(acct, *v).await;
                }
                tracing::info!(plan = name, accounts = bumped.len(), "plan deleted");
                Ok(bumped.len())
            }
            PlanDeleted::NoSuchPlan if config_has_it => Err(ApiError::Conflict(format!(
                "plan {name:?} is defined in the configuration; remove it there"
            ))),
            PlanDeleted::NoSuchPlan => Err(ApiError::NotFound(format!("unknown plan {name:?}"))),
            PlanDeleted::InUse(n) => Err(ApiError::Conflict(format!(
                "plan {name:?} has {n} account(s) on it; move them to another plan first"
            ))),
        }
    }
}
