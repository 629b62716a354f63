//! Shared pools: a stock many accounts claim from, each at most once (a coupon's stock, a
//! free-trial pool).
//!
//! A pool is the pseudo-account `pool:<id>` with one lifetime limit (`claims` ≤ stock), and a
//! claim is a `consume` of one claim on it whose idempotency key is the claimant: the same
//! script that keeps every limit exact under contention keeps the stock exact, and the same
//! idempotency record makes a second claim by the same account a replay. A pool's records
//! never expire, and after a cold load every claimant is looked up in the ledger (see
//! `coldload.rs`), so "once per account" holds for the pool's lifetime.

use super::{fingerprint, not_loaded, unexpected, Engine};
use crate::error::ApiError;
use crate::ledger::billing::PoolRow;
use crate::store::{LuaLimit, Reply, SpendArgs};
use serde::{Deserialize, Serialize};
use tollgate_protocol::{validate_id, Meters, MAX_AMOUNT};

/// Claim records are kept for a century: for the life of the pool.
const CLAIM_RECORD_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

pub(crate) fn is_pool(acct: &str) -> bool {
    acct.starts_with("pool:")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPool {
    pub id: String,
    pub stock: u64,
    #[serde(default)]
    pub description: String,
}

/// A pool and how much of it is claimed (from Redis, the real-time truth).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolState {
    pub id: String,
    pub stock: u64,
    pub claimed: u64,
    pub remaining: u64,
    pub description: String,
}

/// The answer to a claim.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claim {
    pub pool: String,
    pub account: String,
    /// True when this account holds a claim (now or from before); false when the pool is empty.
    pub claimed: bool,
    pub remaining: u64,
}

impl Engine {
    pub async fn create_pool(&self, n: NewPool) -> Result<PoolRow, ApiError> {
        validate_id("id", &n.id)?;
        if n.stock > MAX_AMOUNT {
            return Err(ApiError::Invalid("stock: too large".into()));
        }
        if n.description.len() > 500 {
            return Err(ApiError::Invalid(
                "description: longer than 500 characters".into(),
            ));
        }
        let row = PoolRow {
            id: n.id,
            stock: n.stock as i64,
            description: n.description,
            created_at_ms: self.clock.now_ms() as i64,
        };
        if !self.ledger.insert_pool(&row).await? {
            return Err(ApiError::Conflict(format!(
                "pool {:?} already exists",
                row.id
            )));
        }
        Ok(row)
    }

    async fn pool_row(&self, id: &str) -> Result<PoolRow, ApiError> {
        validate_id("pool", id)?;
        self.ledger
            .pool(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("unknown pool {id:?}")))
    }

    fn pool_limit(p: &PoolRow, amt: u64) -> Vec<LuaLimit> {
        vec![LuaLimit {
            scope: format!("p:{}", p.id),
            meter: "claims".into(),
            period: "l".into(),
            amt,
            max: p.stock.max(0) as u64,
            end: 0,
            name: format!("pool:{}", p.id),
            mode: crate::config::LimitMode::Enforce,
        }]
    }

    /// Claims one unit of `pool` for `account`; a repeat by the same account is a replay.
    /// Returns the answer and whether it is a replay.
    pub async fn claim(&self, pool: &str, account: &str) -> Result<(Claim, bool), ApiError> {
        let p = self.pool_row(pool).await?;
        validate_id("account", account)?;
        if self.directory.account(account).await?.is_none() {
            return Err(ApiError::NotFound(format!("unknown account {account:?}")));
        }
        let pacct = format!("pool:{}", p.id);
        if self.redis_down().await {
            // Decided from PostgreSQL under the pool's row lock (see `degraded.rs`).
            let account = account.to_string();
            return self
                .via_ledger(&pacct, move |e| async move {
                    e.claim_in_store(&p, &account).await
                })
                .await;
        }
        self.refuse_if_backlog_full()?;
        self.hand_back_before_decision().await?;
        let epoch = self.ack_epoch(&pacct).await?;
        let (claim, replay) = self.claim_in_store(&p, account).await?;
        if claim.claimed && !replay {
            self.until_in_ledger(&pacct, epoch).await?;
        }
        Ok((claim, replay))
    }

    /// The claim in the store this engine has (Redis, or a private key space).
    async fn claim_in_store(&self, p: &PoolRow, account: &str) -> Result<(Claim, bool), ApiError> {
        let pacct = format!("pool:{}", p.id);
        let meters: Meters = [("claims".to_string(), 1u64)].into_iter().collect();
        let lims = Self::pool_limit(p, 1);
        // The same for every claimant: a claim is a claim.
        let fp = fingerprint(&("claim", &p.id));
        let mut checked = false;
        for _ in 0..4 {
            let args = SpendArgs {
                idem: account,
                fp: &fp,
                checked,
                route: "pool",
                idem_ttl_ms: CLAIM_RECORD_TTL_MS,
                // A claim's tombstone is kept as long as its record was: a pool's claims are
                // bounded by its stock, and an account claims once.
                window_ms: CLAIM_RECORD_TTL_MS,
                ..SpendArgs::probe(self.clock.now_ms(), &pacct, &meters, &lims)
            };
            let (body, claimed, replay) = match self.store.consume(&args).await? {
                Reply::Ok(b) => (b, true, false),
                Reply::Replay(b) => (b, true, true),
                Reply::Deny(b) => (b, false, false),
                Reply::Cold => {
                    self.cold_load(&pacct).await?;
                    continue;
                }
                Reply::Recheck => match self.recheck(&pacct, "consume", account, &fp).await? {
                    Some(b) => (b, true, true),
                    None => {
                        checked = true;
                        continue;
                    }
                },
                other => return Err(unexpected(other)),
            };
            if claimed && !replay {
                self.metrics.pool_claims.inc();
                self.sync_wake.notify_one();
            } else if !claimed {
                self.metrics.pool_denied.inc();
            }
            return Ok((
                Claim {
                    pool: p.id.clone(),
                    account: account.to_string(),
                    claimed,
                    remaining: remaining_of(&body),
                },
                replay,
            ));
        }
        Err(not_loaded(&pacct))
    }

    /// The pool with how much of it is claimed: from Redis, the real-time truth, or while
    /// Redis is unreachable from the ledger (where claims decided meanwhile are written at once).
    pub async fn pool_state(&self, pool: &str) -> Result<PoolState, ApiError> {
        let p = self.pool_row(pool).await?;
        let pacct = format!("pool:{}", p.id);
        let stock = p.stock.max(0) as u64;
        let remaining = if self.redis_down().await {
            let claimed = self
                .ledger
                .scalar(
                    "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'consume'",
                    &pacct,
                )
                .await?;
            stock.saturating_sub(claimed.max(0) as u64)
        } else {
            let lims = Self::pool_limit(&p, 0);
            let nothing = Meters::new();
            let reply = self
                .run_loaded(&pacct, || {
                    let args = SpendArgs::probe(self.clock.now_ms(), &pacct, &nothing, &lims);
                    async move { self.store.check(&args).await }
                })
                .await?;
            match reply {
                Reply::Ok(b) | Reply::Deny(b) => remaining_of(&b).min(stock),
                other => return Err(unexpected(other)),
            }
        };
        Ok(PoolState {
            id: p.id,
            stock,
            claimed: stock - remaining,
            remaining,
            description: p.description,
        })
    }
}

/// The pool limit's remaining, from a script answer.
fn remaining_of(body: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("limit")?.get("remaining")?.as_u64())
        .unwrap_or(0)
}
