//! Accounts, keys, grants and reports: what the admin API and the operator's tools call.

use super::{fingerprint, unexpected, Caller, Engine, Resolved};
use crate::config::LimitSpec;
use crate::error::ApiError;
use crate::ledger::{AccountRow, KeyRow};
use crate::store::{GrantArgs, Reply, SpendArgs};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tollgate_protocol::{validate_id, GrantRequest};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub id: String,
    pub plan: String,
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(default = "one")]
    pub billing_anchor_day: i16,
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// The account above it (a team, an organization): its limits apply to this account's
    /// spending too. Set once, here; see `Engine::check_parent`.
    #[serde(default)]
    pub parent: Option<String>,
    /// Spend the parent's credit once this account's own is spent (and the grandparent's, if
    /// the parent draws on it). Set once, here.
    #[serde(default)]
    pub draw_from_parents: bool,
}

/// Most levels of a tree: organization > team > account.
pub const MAX_DEPTH: usize = 3;

fn utc() -> String {
    "UTC".into()
}
fn one() -> i16 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    pub plan: Option<String>,
    pub timezone: Option<String>,
    pub billing_anchor_day: Option<i16>,
    pub limits: Option<Vec<LimitSpec>>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
}

/// One limit's state in the current window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageLine {
    pub name: String,
    pub meter: String,
    pub window: String,
    pub period: String,
    pub used: u64,
    pub max: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    /// `enforce`, `soft` or `shadow` (see `LimitMode`).
    pub mode: String,
    /// How far past its max the limit is (a soft or shadow limit may be; an enforced one never).
    #[serde(default)]
    pub over: u64,
}

impl Engine {
    fn validate_account(&self, a: &AccountRow) -> Result<(), ApiError> {
        validate_id("id", &a.id)?;
        if super::pools::is_pool(&a.id) {
            return Err(ApiError::Invalid(
                "id: the prefix \"pool:\" is reserved for shared pools".into(),
            ));
        }
        if self.plan(&a.plan).is_none() {
            return Err(ApiError::Invalid(format!(
                "plan: {:?} is not a plan (configured or written through /admin/plans)",
                a.plan
            )));
        }
        if a.timezone.parse::<Tz>().is_err() {
            return Err(ApiError::Invalid(format!(
                "timezone: {:?} is not an IANA timezone",
                a.timezone
            )));
        }
        if !(1..=28).contains(&a.billing_anchor_day) {
            return Err(ApiError::Invalid(
                "billing_anchor_day: must be 1..=28".into(),
            ));
        }
        self.cfg
            .validate_limits("limits", &a.limits)
            .map_err(|e| ApiError::Invalid(e.to_string().replace("invalid configuration: ", "")))
    }

    pub async fn create_account(&self, n: NewAccount) -> Result<AccountRow, ApiError> {
        let row = AccountRow {
            id: n.id,
            plan: n.plan,
            timezone: n.timezone,
            billing_anchor_day: n.billing_anchor_day,
            limits: n.limits,
            disabled: false,
            version: 1,
            plan_version: 0,
            parent: n.parent,
            draw_from_parents: n.draw_from_parents,
        };
        self.ensure_plan(&row.plan).await?;
        self.validate_account(&row)?;
        if row.id.contains(':') {
            // An account's Redis keys are `…:a:<id>`, `…:a:<id>:go`, `…:i:<id>:<op>:<key>`: an
            // id with a colon could name another account's key (`x:go` is `x`'s grant order).
            // Checked for new accounts only: older ones keep working.
            return Err(ApiError::Invalid(
                "id: ':' is reserved in account ids (it separates the parts of their keys)".into(),
            ));
        }
        self.check_parent(&row).await?;
        if !self.ledger.insert_account(&row).await? {
            return Err(ApiError::Conflict(format!(
                "account {:?} already exists",
                row.id
            )));
        }
        self.directory.forget_account(&row.id);
        Ok(row)
    }

    /// A parent must exist, not be a pool, and leave the tree at most [`MAX_DEPTH`] deep. It is
    /// fixed at creation: every account of a tree keeps its Redis state in the shard of the
    /// tree's root (one Redis Cluster slot), so that one script checks every level.
    async fn check_parent(&self, row: &AccountRow) -> Result<(), ApiError> {
        let Some(parent) = &row.parent else {
            if row.draw_from_parents {
                return Err(ApiError::Invalid(
                    "draw_from_parents: the account has no parent".into(),
                ));
            }
            return Ok(());
        };
        validate_id("parent", parent)?;
        if super::pools::is_pool(parent) {
            return Err(ApiError::Invalid(
                "parent: a pool cannot be a parent".into(),
            ));
        }
        let Some(p) = self.directory.account(parent).await? else {
            return Err(ApiError::Invalid(format!("parent: no account {parent:?}")));
        };
        let above = self.ancestors(&p).await?.len() + 1;
        if above + 1 > MAX_DEPTH {
            return Err(ApiError::Invalid(format!(
                "parent: {parent:?} is already {above} levels deep (at most {MAX_DEPTH}: organization > team > account)"
            )));
        }
        Ok(())
    }

    pub async fn get_account(&self, id: &str) -> Result<AccountRow, ApiError> {
        self.ledger
            .account(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("unknown account {id:?}")))
    }

    /// Changes take effect on the next request, on every sidecar: the account's version is
    /// bumped in the ledger and in Redis, and a script given an older version answers `stale`.
    pub async fn patch_account(&self, id: &str, p: AccountPatch) -> Result<AccountRow, ApiError> {
        let mut row = self.get_account(id).await?;
        if let Some(v) = p.plan {
            row.plan = v;
        }
        if let Some(v) = p.timezone {
            row.timezone = v;
        }
        if let Some(v) = p.billing_anchor_day {
            row.billing_anchor_day = v;
        }
        if let Some(v) = p.limits {
            row.limits = v;
        }
        if let Some(v) = p.disabled {
            row.disabled = v;
        }
        self.ensure_plan(&row.plan).await?;
        self.validate_account(&row)?;
        row.version = self.ledger.update_account(&row).await?;
        self.publish_version(id, row.version).await;
        self.publish_descendants(id).await;
        Ok(row)
    }

    /// A changed account's limits, plan and `disabled` apply to everything under it: each
    /// account below gets a new version too, so every sidecar's next request for it is answered
    /// `stale` and reads it — and its parents — again.
    async fn publish_descendants(&self, id: &str) {
        let mut level = vec![id.to_string()];
        for _ in 1..MAX_DEPTH {
            let mut next = Vec::new();
            for parent in &level {
                let children = match self.ledger.children_of(parent).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(account = %parent, error = %e, "could not read the accounts under a changed account; they see the change within their cache TTL");
                        return;
                    }
                };
                for child in children {
                    if let Ok(Some(v)) = self.ledger.bump_version(&child).await {
                        self.publish_version(&child, v).await;
                    }
                    next.push(child);
                }
            }
            if next.is_empty() {
                return;
            }
            level = next;
        }
    }

    /// Creates a key; returns it with the plaintext, which is never shown again.
    pub async fn create_key(&self, account: &str, n: NewKey) -> Result<(KeyRow, String), ApiError> {
        let acct = self
            .directory
            .account(account)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("unknown account {account:?}")))?;
        self.ensure_plan(&acct.row.plan).await?;
        // The name is free text shown in listings, but the ledger's text columns cannot hold a
        // NUL, and control characters have no business in a label (found by tests/hostile.rs).
        if n.name.len() > 200 || n.name.chars().any(char::is_control) {
            return Err(ApiError::Invalid(
                "name: at most 200 characters, no control characters".into(),
            ));
        }
        self.cfg
            .validate_limits("limits", &n.limits)
            .map_err(|e| ApiError::Invalid(e.to_string().replace("invalid configuration: ", "")))?;
        // A key's limits sit below the account's: a key may not allow more of a meter per window
        // than its account does.
        let acct_limits = self.account_limits(&acct)?;
        for (i, l) in n.limits.iter().enumerate() {
            if let Some(a) = acct_limits
                .iter()
                .find(|a| a.meter == l.meter && a.window == l.window)
            {
                if l.max > a.max {
                    return Err(ApiError::Invalid(format!(
                        "limits[{i}].max: {} is above the account's {} per {}",
                        l.max,
                        a.max,
                        a.window.as_str()
                    )));
                }
            }
        }
        if n.name.len() > 200 {
            return Err(ApiError::Invalid("name: longer than 200 characters".into()));
        }
        let plain = crate::apikey::generate(self.directory.pepper());
        let row = KeyRow {
            id: crate::apikey::new_id("key"),
            account_id: account.to_string(),
            masked: crate::apikey::mask(&plain),
            name: n.name,
            limits: n.limits,
            disabled: false,
        };
        self.ledger
            .insert_key(&row, &self.directory.hash_key(&plain))
            .await?;
        Ok((row, plain))
    }

    pub async fn set_key_disabled(&self, key_id: &str, disabled: bool) -> Result<(), ApiError> {
        let Some(acct) = self.ledger.set_key_disabled(key_id, disabled).await? else {
            return Err(ApiError::NotFound(format!("unknown key {key_id:?}")));
        };
        self.directory.forget_keys();
        if let Some(v) = self.ledger.bump_version(&acct).await? {
            self.publish_version(&acct, v).await;
        }
        Ok(())
    }

    /// Makes a change to an account visible to every sidecar's next request: this one forgets
    /// its cached copy; the others are told by the version in Redis (their scripts answer
    /// `stale`). If Redis cannot be told, the others see the change within their cache TTL.
    pub(crate) async fn publish_version(&self, acct: &str, version: i64) {
        self.directory.forget_account(acct);
        if let Err(e) = self.store.set_version(acct, version).await {
            tracing::warn!(account = acct, error = %e, "could not publish the account's new version to Redis; other sidecars see it within their cache TTL");
        }
    }

    /// Adds credit. The grant id is its idempotency key, checked against the ledger too, so a
    /// grant is applied once however late it is repeated.
    pub async fn grant(
        &self,
        account: &str,
        g: GrantRequest,
    ) -> Result<(serde_json::Value, bool), ApiError> {
        g.validate()?;
        if self.directory.account(account).await?.is_none() {
            return Err(ApiError::NotFound(format!("unknown account {account:?}")));
        }
        let fp = fingerprint(&(
            &g.grant_id,
            g.amount,
            g.priority,
            g.expires_at_ms,
            &g.source,
        ));
        if self.ledger.grant_exists(account, &g.grant_id).await? {
            return match self
                .ledger
                .idempotent_result(account, "grant", &g.grant_id)
                .await?
            {
                Some((Some(f), res)) if f == fp => {
                    Ok((serde_json::from_str(&res).unwrap_or_default(), true))
                }
                _ => Err(ApiError::Conflict(format!(
                    "grant_id {:?} already exists",
                    g.grant_id
                ))),
            };
        }
        let epoch = self.ack_epoch(account).await?;
        let reply = self
            .run_loaded(account, || {
                let args = GrantArgs {
                    now: self.clock.now_ms(),
                    acct: account,
                    gid: &g.grant_id,
                    amount: g.amount,
                    priority: g.priority,
                    expires: g.expires_at_ms.unwrap_or(0),
                    source: &g.source,
                    fp: &fp,
                    checked: true,
                    idem_ttl_ms: self.idem_ttl_ms(),
                };
                async move { self.store.grant(&args).await }
            })
            .await?;
        match reply {
            Reply::Ok(b) => {
                self.metrics.granted.inc();
                self.sync_wake.notify_one();
                self.until_in_ledger(account, epoch).await?;
                Ok((serde_json::from_str(&b).unwrap_or_default(), false))
            }
            Reply::Replay(b) => {
                self.metrics.idempotent_replays.inc();
                Ok((serde_json::from_str(&b).unwrap_or_default(), true))
            }
            Reply::Conflict(_) => Err(ApiError::Conflict(format!(
                "grant_id {:?} already exists",
                g.grant_id
            ))),
            other => Err(unexpected(other)),
        }
    }

    /// Spendable credit now, from Redis (the real-time truth): the check script with nothing to
    /// charge.
    pub async fn balance(&self, account: &str) -> Result<u64, ApiError> {
        if self.directory.account(account).await?.is_none() {
            return Err(ApiError::NotFound(format!("unknown account {account:?}")));
        }
        let nothing = tollgate_protocol::Meters::new();
        let reply = self
            .run_loaded(account, || {
                let args = SpendArgs::probe(self.clock.now_ms(), account, &nothing, &[]);
                async move { self.store.check(&args).await }
            })
            .await?;
        match reply {
            Reply::Ok(b) => {
                let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
                Ok(v.get("balance").and_then(|b| b.as_u64()).unwrap_or(0))
            }
            other => Err(unexpected(other)),
        }
    }

    /// The current window of every limit of the account, or of one of its keys.
    pub async fn usage(
        &self,
        account: &str,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageLine>, ApiError> {
        let caller = match self.resolve(None, Some(account)).await? {
            Resolved::Caller(c) => c,
            Resolved::Denied(_) => {
                let acct =
                    self.directory.account(account).await?.ok_or_else(|| {
                        ApiError::NotFound(format!("unknown account {account:?}"))
                    })?;
                let ancestors = self.ancestors(&acct).await?;
                Caller {
                    account: acct,
                    key: None,
                    ancestors,
                }
            }
        };
        let (scope, scope_name, limits) = match key_id {
            Some(k) => {
                let key = self
                    .ledger
                    .key_by_id(k)
                    .await?
                    .filter(|key| key.account_id == account)
                    .ok_or_else(|| ApiError::NotFound(format!("unknown key {k:?}")))?;
                (format!("k:{}", key.id), "key", key.limits.clone())
            }
            None => (
                format!("a:{account}"),
                "account",
                self.account_limits(&caller.account)?,
            ),
        };
        let now = self.clock.now_ms();
        let acct = Arc::clone(&caller.account);
        let mut conn = self.store.conn();
        // Make sure the account's state is in Redis before reading counters from it.
        let present: bool =
            redis::AsyncCommands::exists(&mut conn, self.store.keys.account(account))
                .await
                .map_err(crate::store::StoreError::from)?;
        if !present {
            self.cold_load(account).await?;
        }
        let mut out = Vec::new();
        for l in limits {
            let p = crate::windows::current_period(
                l.window,
                now,
                acct.tz,
                &self.windows,
                acct.row.billing_anchor_day as u32,
            );
            let key = self.store.keys.counter(account, &scope, &l.meter, &p.id);
            let (used, reset_ms) = match l.window.sliding_ms() {
                // What the window holds now, from its log (the sum drops the rest only at the
                // next request), and when its oldest charge leaves it.
                Some(w) => {
                    let from = format!("({}", now.saturating_sub(w));
                    let log: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
                        .arg(format!("{key}:log"))
                        .arg(from)
                        .arg("+inf")
                        .arg("WITHSCORES")
                        .query_async(&mut conn)
                        .await
                        .map_err(crate::store::StoreError::from)?;
                    let sum = log
                        .iter()
                        .filter_map(|(m, _)| m.rsplit('|').next()?.parse::<u64>().ok())
                        .sum::<u64>();
                    (sum, log.first().map_or(0, |(_, at)| at + w))
                }
                None => {
                    let used: Option<u64> = redis::AsyncCommands::get(&mut conn, key)
                        .await
                        .map_err(crate::store::StoreError::from)?;
                    (used.unwrap_or(0), p.end_ms)
                }
            };
            out.push(UsageLine {
                name: format!("{scope_name}:{}:{}", l.meter, l.window.as_str()),
                meter: l.meter.clone(),
                window: l.window.as_str().into(),
                period: p.id,
                used,
                max: l.max,
                remaining: l.max.saturating_sub(used),
                reset_ms,
                mode: l.mode.as_str().into(),
                over: used.saturating_sub(l.max),
            });
        }
        Ok(out)
    }
}
