//! The quota engine: turns API requests into script calls and script replies into answers.
//!
//! Per request it resolves the caller (key -> account, cached), prices the usage, works out every
//! limit that applies (plan, account overrides, key limits) with the current period of each
//! window in the account's timezone, and runs one script. Replies that need more work — `cold`
//! (account state missing from Redis), `recheck` (just after a cold load) — are handled here and
//! the script is retried; the script itself stays the only place where anything is decided.

mod admin;
mod alerts;
mod billing;
mod coldload;
mod degraded;
mod extend;
mod plans;
mod pools;
mod report;
mod settle;
mod spend;

pub use admin::{AccountPatch, NewAccount, NewKey, UsageLine};
pub use billing::{SubscriptionChange, WebhookOutcome};
pub use plans::from_config as plans_from_config;
pub use pools::{Claim, NewPool, PoolState};
pub use report::{Difference, Reconciliation};
pub use settle::Pricing;

use crate::clock::Clock;
use crate::config::{Config, LimitSpec};
use crate::directory::{Account, Directory};
use crate::error::ApiError;
use crate::ledger::sync::SyncWorker;
use crate::ledger::{KeyRow, Ledger};
use crate::metrics::Metrics;
use crate::store::keys::Level;
use crate::store::{LuaLimit, Reply, Store};
use crate::windows::{current_period, WindowSettings};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tollgate_protocol::{Decision, DenyReason, Meters};

pub struct Engine {
    pub cfg: Arc<Config>,
    pub windows: WindowSettings,
    pub store: Store,
    pub ledger: Ledger,
    pub sync: SyncWorker,
    pub directory: Directory,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// Wakes the sync worker after a change, so the ledger lags by milliseconds, not a tick.
    pub sync_wake: Arc<tokio::sync::Notify>,
    /// Set when decisions were made from PostgreSQL: Redis state must be dropped before the
    /// next decision in Redis (see `degraded.rs`).
    pub handback_pending: Arc<std::sync::atomic::AtomicBool>,
    pub handback_lock: Arc<tokio::sync::Mutex<()>>,
    /// Decisions made from PostgreSQL at once: each holds two connections while it runs.
    pub degraded_slots: Arc<tokio::sync::Semaphore>,
    /// Alerts this sidecar knows were raised, and the client that delivers them.
    pub alerts: Arc<alerts::AlertState>,
    /// Included-credit grants (`<account>/<grant id>`) this sidecar knows exist: the scheduler's
    /// later passes skip them without a round trip.
    pub included_done: Arc<Remembered>,
    /// The plans this sidecar knows: the configuration's, overridden by those written through
    /// the API (see `plans.rs`).
    pub plans: plans::Plans,
}

/// Keys this sidecar knows are done (an alert raised, a grant made), so it can skip a round
/// trip; the ledger stays the judge. Cleared, not grown, past `cap` entries.
pub struct Remembered {
    set: std::sync::Mutex<std::collections::HashSet<String>>,
    cap: usize,
}

impl Remembered {
    pub fn new(cap: usize) -> Self {
        Self {
            set: Default::default(),
            cap,
        }
    }

    /// True when `key` was not remembered yet (also when the set is unusable).
    pub fn insert(&self, key: &str) -> bool {
        let Ok(mut set) = self.set.lock() else {
            return true;
        };
        if set.len() >= self.cap {
            set.clear();
        }
        set.insert(key.to_string())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.set.lock().is_ok_and(|s| s.contains(key))
    }

    pub fn forget(&self, key: &str) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(key);
        }
    }
}

/// The resolved caller of a spend request.
#[derive(Clone)]
pub(crate) struct Caller {
    pub account: Arc<Account>,
    pub key: Option<Arc<KeyRow>>,
    /// The accounts above it, its parent first (see [`Engine::ancestors`]).
    pub ancestors: Vec<Arc<Account>>,
}

pub(crate) enum Resolved {
    Caller(Caller),
    Denied(Decision),
}

pub(crate) fn denial(reason: DenyReason, account: Option<String>) -> Decision {
    Decision {
        allowed: false,
        status: reason.http_status(),
        reason: Some(reason),
        account,
        hold_id: None,
        hold_expires_ms: None,
        limit: None,
        retry_after_s: None,
        credits: 0,
        balance: None,
        shadow: Vec::new(),
        over: Vec::new(),
    }
}

/// A script kept answering `cold` after loads: the account's state did not stick in Redis.
pub(crate) fn not_loaded(acct: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "state of account {acct:?} could not be loaded into Redis"
    ))
}

/// A script answered something its caller does not expect: a bug, reported as a 500.
pub(crate) fn unexpected(reply: crate::store::Reply) -> ApiError {
    ApiError::Internal(format!("unexpected script reply {reply:?}"))
}

/// A short stable digest of what a request asks, to tell a replay from a reuse of its key.
pub(crate) fn fingerprint(parts: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(parts).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..12])
}

impl Engine {
    /// Refuses a new spending decision while the ledger backlog is past `sync.max_backlog`: the
    /// ledger has been unreachable for so long that the store would grow without bound.
    pub(crate) fn refuse_if_backlog_full(&self) -> Result<(), ApiError> {
        let backlog = self
            .metrics
            .outbox_backlog
            .load(std::sync::atomic::Ordering::Relaxed);
        if backlog > self.cfg.sync.max_backlog {
            return Err(ApiError::Unavailable(format!(
                "ledger backlog of {backlog} events is past sync.max_backlog; refusing new \
                 decisions until the ledger catches up"
            )));
        }
        Ok(())
    }

    /// With `sync.ack_after_ledger`: the epoch of the account's outbox before a change is made
    /// in Redis, to confirm the change with [`Engine::until_in_ledger`]. None when not needed.
    /// Only for a change going to Redis: one decided from PostgreSQL (Redis down, see
    /// [`Engine::redis_down`]) is in the ledger already.
    pub(crate) async fn ack_epoch(&self, acct: &str) -> Result<Option<String>, ApiError> {
        if !self.cfg.sync.ack_after_ledger {
            return Ok(None);
        }
        let shard = self.store.keys.shard_of(acct);
        match self.sync.epoch(shard).await {
            Ok(epoch) => Ok(Some(epoch)),
            Err(e) => {
                // The first round trip of such a decision: Redis not answering it counts toward
                // the breaker, as a script's would (else the breaker never opens and every
                // decision waits out its timeout).
                self.store.breaker.failure();
                Err(e.into())
            }
        }
    }

    /// With `sync.ack_after_ledger` (`epoch` from [`Engine::ack_epoch`]), returns once the
    /// account's outbox is in the ledger up to (at least) the change just made. Group commit: the
    /// sync worker writes whatever is pending in one transaction per shard. If
    /// Redis lost its state meanwhile (a new epoch), the change is not confirmed: 503, and a
    /// retry with the same idempotency key finds out what became of it.
    pub(crate) async fn until_in_ledger(
        &self,
        acct: &str,
        epoch: Option<String>,
    ) -> Result<(), ApiError> {
        let Some(before) = epoch else {
            return Ok(());
        };
        let unconfirmed = || {
            ApiError::Unavailable(
                "the ledger did not confirm the change (sync.ack_after_ledger): retry with the \
                 same idempotency key"
                    .into(),
            )
        };
        let shard = self.store.keys.shard_of(acct);
        // The newest entry is at least as new as this request's own.
        let Some((epoch, newest)) = self.sync.newest(shard).await? else {
            // The stream is empty: applied and trimmed, or lost with Redis's state.
            return if self.sync.epoch(shard).await? == before {
                Ok(())
            } else {
                Err(unconfirmed())
            };
        };
        if epoch != before {
            return Err(unconfirmed());
        }
        let until = std::time::Instant::now()
            + std::time::Duration::from_millis(self.cfg.sync.ack_timeout_ms);
        // The sync worker writes every pending change of the shard in one transaction; wake it
        // and watch its progress in memory. Every 25 ms a waiter also tries the shard itself,
        // and reads the ledger's cursor (another sidecar may be the one applying it).
        self.sync_wake.notify_one();
        let mut round = 0u32;
        loop {
            if self.sync.applied_locally(shard, &epoch, &newest) {
                return Ok(());
            }
            round += 1;
            if round.is_multiple_of(25) {
                // Slow: apply it ourselves (or learn that another sidecar did).
                if let Err(e) = self.sync.sync_shard(shard).await {
                    tracing::debug!(error = %e, "ledger write while waiting to acknowledge");
                }
                if self.sync.applied_locally(shard, &epoch, &newest)
                    || self
                        .sync
                        .applied_through(shard, &epoch, &newest)
                        .await
                        .unwrap_or(false)
                {
                    return Ok(());
                }
                // Redis lost its state while we waited: the change went with it.
                if self.sync.epoch(shard).await? != before {
                    return Err(unconfirmed());
                }
                self.sync_wake.notify_one();
            }
            if std::time::Instant::now() > until {
                return Err(unconfirmed());
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Runs a script on `acct`'s state until that state is in Redis: a `cold` answer loads it
    /// from the ledger and the script runs again (a few times at most). Returns the first other
    /// answer.
    pub(crate) async fn run_loaded<F, Fut>(
        &self,
        acct: &str,
        mut script: F,
    ) -> Result<Reply, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Reply, crate::store::StoreError>>,
    {
        self.place(acct).await?;
        for _ in 0..4 {
            match script().await? {
                Reply::Cold => self.cold_load(acct).await?,
                other => return Ok(other),
            }
        }
        Err(not_loaded(acct))
    }

    pub fn idem_ttl_ms(&self) -> u64 {
        self.cfg.server.idempotency_ttl_secs * 1000
    }

    /// How long a settled request's tombstone answers its repeats from Redis
    /// (`server.replay_window_secs`); later ones are answered from the ledger.
    pub fn window_ms(&self) -> u64 {
        self.cfg.server.replay_window_secs * 1000
    }

    pub(crate) async fn resolve(
        &self,
        api_key: Option<&str>,
        account: Option<&str>,
    ) -> Result<Resolved, ApiError> {
        let (acct_id, key) = match (api_key, account) {
            (Some(k), _) => match self.directory.key(k).await? {
                None => {
                    tracing::info!(key = %crate::apikey::mask(k), "unknown API key");
                    self.metrics.denied_auth.inc();
                    return Ok(Resolved::Denied(denial(DenyReason::Unauthenticated, None)));
                }
                Some(key) => (key.account_id.clone(), Some(key)),
            },
            (None, Some(a)) => (a.to_string(), None),
            (None, None) => {
                return Err(ApiError::Invalid(
                    "api_key: either api_key or account is required".into(),
                ))
            }
        };
        let account = self
            .directory
            .account(&acct_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("unknown account {acct_id:?}")))?;
        self.ensure_plan_at(&account.row.plan, account.row.plan_version)
            .await?;
        let ancestors = self.ancestors(&account).await?;
        // A disabled team or organization disables everything under it.
        if account.row.disabled
            || key.as_ref().is_some_and(|k| k.disabled)
            || ancestors.iter().any(|a| a.row.disabled)
        {
            self.metrics.denied_auth.inc();
            return Ok(Resolved::Denied(denial(
                DenyReason::Disabled,
                Some(acct_id),
            )));
        }
        for a in &ancestors {
            self.ensure_plan_at(&a.row.plan, a.row.plan_version).await?;
        }
        Ok(Resolved::Caller(Caller {
            account,
            key,
            ancestors,
        }))
    }

    /// The accounts above `account` (its parent first, its root last), read through the
    /// directory; places `account` in its root's shard on the way ([`Keyspace::place`]).
    pub(crate) async fn ancestors(&self, account: &Account) -> Result<Vec<Arc<Account>>, ApiError> {
        let mut out: Vec<Arc<Account>> = Vec::new();
        let mut next = account.row.parent.clone();
        while let Some(id) = next {
            if out.len() >= admin::MAX_DEPTH || id == account.row.id {
                return Err(ApiError::Conflict(format!(
                    "account {:?}: its parents do not end (at most {} levels)",
                    account.row.id,
                    admin::MAX_DEPTH
                )));
            }
            let a = self.directory.account(&id).await?.ok_or_else(|| {
                ApiError::Conflict(format!(
                    "account {:?}: its parent {id:?} does not exist",
                    account.row.id
                ))
            })?;
            next = a.row.parent.clone();
            out.push(a);
        }
        // The account, and each level above it that has levels above it in turn. A level pays
        // for the one below while every account from there down draws from its parent.
        let chain: Vec<&Account> = std::iter::once(account)
            .chain(out.iter().map(|a| a.as_ref()))
            .collect();
        for (i, who) in chain.iter().enumerate().take(out.len()) {
            let mut pays = true;
            let above: Vec<Level> = chain[i..]
                .windows(2)
                .map(|w| {
                    pays = pays && w[0].row.draw_from_parents;
                    Level {
                        id: w[1].row.id.clone(),
                        pays,
                    }
                })
                .collect();
            self.store.keys.place(&who.row.id, &above);
        }
        Ok(out)
    }

    /// Makes sure `acct`'s keys are named in its root's shard before anything names them (a
    /// commit, a release or an expiry of one of its holds, a grant, a cold load): reads its
    /// parents if this process has not yet.
    pub(crate) async fn place(&self, acct: &str) -> Result<(), ApiError> {
        if let Some(a) = self.directory.account(acct).await? {
            if a.row.parent.is_some() {
                self.ancestors(&a).await?;
            }
        }
        Ok(())
    }

    pub(crate) fn check_meters(&self, meters: &Meters) -> Result<(), ApiError> {
        match meters.keys().find(|m| !self.cfg.is_meter(m)) {
            Some(m) => Err(ApiError::Invalid(format!(
                "meters.{m}: not a declared meter"
            ))),
            None => Ok(()),
        }
    }

    /// Credits for `meters` on `route` (+ `extra`).
    pub(crate) fn price(
        &self,
        route: &str,
        model: Option<&str>,
        meters: &Meters,
        extra: u64,
    ) -> Result<u64, ApiError> {
        let c = self.cfg.price(route, model, meters).ok_or_else(|| {
            ApiError::Invalid(format!(
                "route: no price for route {route:?} and no default"
            ))
        })?;
        let total = c.saturating_add(extra);
        tollgate_protocol::validate_amount("credits", total)?;
        Ok(total)
    }

    /// The account's limits: the plan's, with the account's overrides replacing the plan's limit
    /// for the same meter and window.
    pub(crate) fn account_limits(&self, account: &Account) -> Result<Vec<LimitSpec>, ApiError> {
        let plan = self.plan(&account.row.plan).ok_or_else(|| {
            ApiError::Conflict(format!(
                "account {:?} is on plan {:?}, which is not a plan (configured or written)",
                account.row.id, account.row.plan
            ))
        })?;
        let mut limits: Vec<LimitSpec> = plan
            .limits
            .iter()
            .filter(|l| {
                !account
                    .row
                    .limits
                    .iter()
                    .any(|o| o.meter == l.meter && o.window == l.window)
            })
            .cloned()
            .collect();
        limits.extend(account.row.limits.iter().cloned());
        Ok(limits)
    }

    /// Every limit the request touches, with its counter's current period. `held`: the request
    /// becomes a hold (authorize, check); a consume is never in flight, so `concurrent` limits
    /// do not apply to it.
    pub(crate) fn limits_for(
        &self,
        caller: &Caller,
        meters: &Meters,
        credit: u64,
        now: u64,
        held: bool,
    ) -> Result<Vec<LuaLimit>, ApiError> {
        let acct = &caller.account;
        let amount = |meter: &str| -> Option<u64> {
            if meter == "credits" {
                (credit > 0).then_some(credit)
            } else {
                meters.get(meter).copied()
            }
        };
        let mut out = Vec::new();
        // A limit of `level` (the account, or one above it: its periods follow that level's
        // timezone and billing day, so every account under it shares one counter).
        let mut push = |level: &Account, scope: String, scope_name: &str, l: &LimitSpec| {
            if l.window == crate::windows::Window::Concurrent && !held {
                return;
            }
            if let Some(amt) = amount(&l.meter) {
                let p = current_period(
                    l.window,
                    now,
                    level.tz,
                    &self.windows,
                    level.row.billing_anchor_day as u32,
                );
                out.push(LuaLimit {
                    scope,
                    meter: l.meter.clone(),
                    period: p.id,
                    amt,
                    max: l.max,
                    end: p.end_ms,
                    name: format!("{scope_name}:{}:{}", l.meter, l.window.as_str()),
                    mode: l.mode,
                });
            }
        };
        for l in &self.account_limits(acct)? {
            push(acct, format!("a:{}", acct.row.id), "account", l);
        }
        if let Some(k) = &caller.key {
            for l in &k.limits {
                push(acct, format!("k:{}", k.id), "key", l);
            }
        }
        // Every level above counts this account's spending too, under its own scope.
        for anc in &caller.ancestors {
            for l in &self.account_limits(anc)? {
                push(
                    anc,
                    format!("a:{}", anc.row.id),
                    &parent_scope(&anc.row.id),
                    l,
                );
            }
        }
        Ok(out)
    }
}

/// The scope name of a parent's limit in decisions and headers: `parent(acme)`.
pub(crate) fn parent_scope(id: &str) -> String {
    format!("parent({id})")
}
