//! Deciding from PostgreSQL while Redis is down, and handing back when it returns.
//!
//! While the circuit breaker says Redis is unreachable, each decision for an account runs in
//! one PostgreSQL transaction that holds the account's row lock (`SELECT … FOR UPDATE`), so
//! decisions on one account are serialized across every sidecar. Inside it the account's
//! remaining state is loaded from the ledger into a key space private to this decision (the
//! embedded store), the *same* Lua script decides there, and the change it emits is written to
//! the ledger in the same transaction — slower than Redis, exact against the ledger. Every idempotency
//! key not found is looked up in the ledger (the load sets the re-check window to "always").
//!
//! The account and the holds it touched are recorded in `degraded_changes`. When Redis answers
//! again, before the next decision in Redis, their Redis state is dropped — the account's state
//! hash and grants, the touched hold records — so the next request rebuilds the account from
//! the ledger (after the Redis outbox backlog that survived has been applied, as any cold load).
//!
//! Shared pools take the same path: a claim locks the pool's row instead of an account's, and
//! every claimant not in the private key space is looked up in the ledger.
//!
//! Limits of this mode: what Redis had not yet synced when it became unreachable is not in the
//! ledger, so decisions made from PostgreSQL do not see it (the sync lag's worth of usage); and a
//! sidecar that still reaches Redis while another does not decides in Redis meanwhile — Redis
//! being down is expected to be seen by every sidecar at once.

use super::Engine;
use crate::error::ApiError;
use crate::ledger::Db;
use crate::store::Store;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Engine {
    /// Whether this decision is to be made from PostgreSQL: while the breaker is open, it is.
    /// Once per pause one caller probes Redis with a PING (not with its decision: a decision in
    /// Redis must come after the hand-back of what PostgreSQL changed meanwhile, see
    /// [`Engine::hand_back_before_decision`]); if Redis answers, the breaker closes and this
    /// decision goes to Redis.
    pub(crate) async fn redis_down(&self) -> bool {
        if !matches!(self.ledger.db(), Db::Pg(_)) || self.store.kind() == "embedded" {
            return false;
        }
        let breaker = &self.store.breaker;
        if breaker.closed() {
            return false;
        }
        // This sidecar saw Redis unreachable: others may be deciding from PostgreSQL too, so
        // its next decision in Redis hands back first, whoever made the changes.
        self.handback_pending.store(true, Ordering::Release);
        if !breaker.allow() {
            return true;
        }
        let mut conn = self.store.conn();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(std::time::Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => {
                breaker.success();
                tracing::info!("Redis answers again: deciding there after the hand-back");
                false
            }
            _ => {
                breaker.failure();
                true
            }
        }
    }

    /// Runs `op` for account `acct` against a private key space loaded from the ledger, under
    /// the account's row lock, and writes what it changed to the ledger in the same transaction.
    pub(crate) async fn via_ledger<T, F, Fut>(&self, acct: &str, op: F) -> Result<T, ApiError>
    where
        F: FnOnce(Arc<Engine>) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let Db::Pg(pool) = self.ledger.db() else {
            return Err(ApiError::Unavailable("the store is unreachable".into()));
        };
        let _slot = self
            .degraded_slots
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
        let mut tx = pool.begin().await?;
        // A shared pool (pseudo-account `pool:<id>`) is serialized on its `pools` row; an
        // account on its tree's root row (the levels above share their counters with it).
        let root = self.store.keys.root_of(acct).into_owned();
        let above = self.store.keys.above(acct);
        let (lock, id) = match acct.strip_prefix("pool:") {
            Some(id) => ("SELECT 1 FROM pools WHERE id = $1 FOR UPDATE", id),
            None => (
                "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                root.as_str(),
            ),
        };
        let found: Option<i32> = sqlx::query_scalar(lock)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            // Unknown account: the normal path gives the normal answer (no state to lock).
            return op(self.private_engine()).await;
        }
        let now = self.clock.now_ms();
        let st = self.ledger.account_state(acct, now as i64).await?;
        let private = self.private_engine();
        for a in above.iter().rev() {
            let st = self.ledger.account_state(a, now as i64).await?;
            let args = private.load_args(a, st, now, u64::MAX / 4);
            private.store.load(a, &args).await?;
        }
        let args = private.load_args(acct, st, now, u64::MAX / 4);
        private.store.load(acct, &args).await?;
        let out = op(private.clone()).await;
        let label = crate::apikey::new_id("dg");
        let touched = private.sync.apply_all_pg(&mut tx, &label).await?;
        // The levels above are handed back too: their counters changed here.
        for (a, hold) in touched
            .into_iter()
            .chain(std::iter::once((acct.to_string(), String::new())))
            .chain(above.into_iter().map(|a| (a, String::new())))
        {
            sqlx::query(
                "INSERT INTO degraded_changes (prefix, account_id, hold_id) VALUES ($1, $2, $3)
                 ON CONFLICT (prefix, account_id, hold_id) DO UPDATE SET n = degraded_changes.n + 1",
            )
            .bind(self.ledger.prefix())
            .bind(&a)
            .bind(&hold)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.handback_pending.store(true, Ordering::Release);
        out
    }

    /// An engine like this one on a fresh embedded key space (same configuration, ledger,
    /// directory cache and metrics).
    fn private_engine(&self) -> Arc<Engine> {
        let store = Store::embedded(self.store.keys.clone());
        Arc::new(Engine {
            cfg: self.cfg.clone(),
            windows: self.windows,
            sync: crate::ledger::sync::SyncWorker::new(
                self.ledger.clone(),
                store.clone(),
                self.cfg.sync.batch,
                self.metrics.clone(),
                self.clock.clone(),
            ),
            store,
            ledger: self.ledger.clone(),
            directory: self.directory.clone(),
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            sync_wake: Arc::new(tokio::sync::Notify::new()),
            handback_pending: Arc::default(),
            handback_lock: Arc::default(),
            degraded_slots: self.degraded_slots.clone(),
            alerts: self.alerts.clone(),
            included_done: self.included_done.clone(),
            plans: self.plans.clone(),
        })
    }

    /// Drops the Redis state of what was changed from PostgreSQL, once Redis answers again (a
    /// background job: nothing while the breaker is open). Cheap when there is nothing to do;
    /// safe to run on several sidecars at once.
    pub async fn hand_back(&self) -> Result<(), ApiError> {
        if !self.store.breaker.closed() {
            return Ok(());
        }
        self.hand_back_before_decision().await
    }

    /// [`Engine::hand_back`] for a decision about to be made in Redis (the breaker closed when
    /// [`Engine::redis_down`] was asked): it runs even if the breaker opened again since, so the
    /// decision never meets state PostgreSQL changed meanwhile. If Redis is unreachable this
    /// fails, as the decision would have.
    pub(crate) async fn hand_back_before_decision(&self) -> Result<(), ApiError> {
        if !matches!(self.ledger.db(), Db::Pg(_))
            || self.store.kind() == "embedded"
            || !self.handback_pending.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let _one = self.handback_lock.lock().await;
        if !self.handback_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        // Decisions from PostgreSQL still in flight on this sidecar finish first: a decision in
        // Redis must not load an account from the ledger before their changes are in it.
        let total = self.cfg.degraded_slots();
        let _drained = self
            .degraded_slots
            .acquire_many(total)
            .await
            .map_err(|_| ApiError::Unavailable("shutting down".into()))?;
        let rows: Vec<(String, String, i64)> = match self.ledger.db() {
            Db::Pg(p) => {
                sqlx::query_as(
                    "SELECT account_id, hold_id, n FROM degraded_changes WHERE prefix = $1",
                )
                .bind(self.ledger.prefix())
                .fetch_all(p)
                .await?
            }
            Db::Lite(_) => Vec::new(),
        };
        let keys = &self.store.keys;
        let mut conn = self.store.conn();
        let mut kept = false;
        for (acct, hold, _) in &rows {
            let mut del = redis::cmd("DEL");
            if hold.is_empty() {
                del.arg(keys.account(acct))
                    .arg(keys.grant_order(acct))
                    .arg(keys.grant_remaining(acct));
            } else {
                del.arg(keys.hold(acct, hold));
                let _: i64 = redis::cmd("ZREM")
                    .arg(keys.holds(keys.shard_of(acct)))
                    .arg(hold)
                    .query_async(&mut conn)
                    .await
                    .map_err(crate::store::StoreError::from)?;
            }
            let _: i64 = del
                .query_async(&mut conn)
                .await
                .map_err(crate::store::StoreError::from)?;
        }
        if let Db::Pg(p) = self.ledger.db() {
            for (acct, hold, n) in &rows {
                // At the count read: a decision from PostgreSQL that changed it again meanwhile
                // (this sidecar's probe may run while others still decide there) keeps the row,
                // and the next hand-back drops what that decision made stale.
                let gone = sqlx::query(
                    "DELETE FROM degraded_changes
                     WHERE prefix = $1 AND account_id = $2 AND hold_id = $3 AND n = $4",
                )
                .bind(self.ledger.prefix())
                .bind(acct)
                .bind(hold)
                .bind(n)
                .execute(p)
                .await?
                .rows_affected();
                if gone == 0 {
                    kept = true;
                }
            }
        }
        if !rows.is_empty() {
            tracing::info!(
                changes = rows.len(),
                "Redis is back: state changed meanwhile dropped, to be rebuilt from the ledger"
            );
        }
        self.handback_pending.store(kept, Ordering::Release);
        Ok(())
    }
}
