//! Cold load: rebuilding an account's Redis state from the ledger.
//!
//! Invariant 6: the state is rebuilt from the ledger's *remaining* amounts (used per current
//! window, remaining per grant, open holds) — never from totals — and only after the shard's
//! outbox backlog has reached PostgreSQL, so no change is missed or counted twice. Concurrent
//! loaders are harmless: a Redis lock makes the others wait, and the load script writes only if
//! the account is still absent.

use super::Engine;
use crate::error::ApiError;
use crate::store::{LoadArgs, StoreError};
use redis::AsyncCommands;
use std::time::Duration;

const LOAD_DEADLINE: Duration = Duration::from_secs(10);

impl Engine {
    pub(crate) async fn cold_load(&self, acct: &str) -> Result<(), ApiError> {
        // The levels above first (each loads only if Redis lost it too): their counters are
        // shared with this account's requests.
        if let Some(a) = self.directory.account(acct).await? {
            for anc in self.ancestors(&a).await?.iter().rev() {
                let loaded: bool = self
                    .store
                    .conn()
                    .exists(self.store.keys.account(&anc.row.id))
                    .await
                    .map_err(StoreError::from)?;
                if !loaded {
                    self.cold_load_one(&anc.row.id).await?;
                }
            }
        }
        self.cold_load_one(acct).await
    }

    async fn cold_load_one(&self, acct: &str) -> Result<(), ApiError> {
        let mut conn = self.store.conn();
        let lock = self.store.keys.loading(acct);
        let token = crate::apikey::new_id("load");
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(LOAD_DEADLINE.as_millis() as u64));
        let got: Option<String> = conn
            .set_options(&lock, &token, opts)
            .await
            .map_err(StoreError::from)?;
        if got.is_none() {
            // Someone else is loading: wait for them (the caller retries its script either way).
            let until = tokio::time::Instant::now() + LOAD_DEADLINE;
            while tokio::time::Instant::now() < until {
                let busy: bool = conn.exists(&lock).await.map_err(StoreError::from)?;
                if !busy {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            return Ok(());
        }
        let result = self.load_locked(acct).await;
        let _: redis::RedisResult<i64> = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(&lock)
        .arg(&token)
        .invoke_async(&mut conn)
        .await;
        result
    }

    async fn load_locked(&self, acct: &str) -> Result<(), ApiError> {
        self.metrics.cold_loads.inc();
        let shard = self.store.keys.shard_of(acct);
        if let Some((epoch, newest)) = self.sync.newest(shard).await? {
            let until = tokio::time::Instant::now() + LOAD_DEADLINE;
            loop {
                self.sync.sync_shard(shard).await?;
                if self.sync.applied_through(shard, &epoch, &newest).await? {
                    break;
                }
                if tokio::time::Instant::now() > until {
                    return Err(ApiError::Unavailable(format!(
                        "outbox of shard {shard} did not reach the ledger in time"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.sync.wait_for_passes(shard).await?;
        let now = self.clock.now_ms();
        let st = self.ledger.account_state(acct, now as i64).await?;
        let window = (self.cfg.server.recheck_window_secs * 1000) as i64;
        let recheck_until = if super::pools::is_pool(acct) {
            // A pool's claims are idempotent forever: after a load, every claimant not yet in
            // Redis is looked up in the ledger.
            u64::MAX / 4
        } else {
            st.last_idempotent_ms
                .map(|t| t + window)
                .filter(|u| *u > now as i64)
                .unwrap_or(0) as u64
        };
        let version = self.ledger.account(acct).await?.map_or(0, |a| a.version);
        let mut args = self.load_args(acct, st, now, recheck_until);
        args.version = version;
        self.store.load(acct, &args).await?;
        tracing::info!(
            account = acct,
            recheck_until,
            "account state loaded from the ledger"
        );
        Ok(())
    }

    /// What a load installs for `acct`: its remaining state from the ledger.
    pub(crate) fn load_args(
        &self,
        acct: &str,
        st: crate::ledger::AccountState,
        now: u64,
        recheck_until: u64,
    ) -> LoadArgs {
        let keys = &self.store.keys;
        LoadArgs {
            now,
            recheck_until,
            version: 0,
            counters: st
                .usage
                .into_iter()
                .map(|(scope, meter, period, used, end)| {
                    (keys.counter(acct, &scope, &meter, &period), used, end)
                })
                .collect(),
            grants: st.grants,
            holds: st
                .holds
                .into_iter()
                .map(|(id, rec, fp, ares, exp)| (keys.hold(acct, &id), id, rec, fp, ares, exp))
                .collect(),
        }
    }

    /// Just after a cold load, an idempotency key may have been used before Redis lost its
    /// record. Returns the first result when the ledger has it for the same request.
    pub(crate) async fn recheck(
        &self,
        acct: &str,
        kind: &str,
        idem: &str,
        fp: &str,
    ) -> Result<Option<String>, ApiError> {
        self.metrics.rechecks.inc();
        self.ledger_answer(acct, kind, idem, fp).await
    }

    /// The first result of `idem` when the ledger has it for the same request; a conflict when
    /// it has it for another.
    pub(crate) async fn ledger_answer(
        &self,
        acct: &str,
        kind: &str,
        idem: &str,
        fp: &str,
    ) -> Result<Option<String>, ApiError> {
        match self.ledger.idempotent_result(acct, kind, idem).await? {
            Some((Some(f), result)) if f == fp => Ok(Some(result)),
            Some(_) => Err(ApiError::Conflict(format!(
                "idempotency_key {idem:?} was already used for a different request"
            ))),
            None => Ok(None),
        }
    }
}
