//! PostgreSQL: the durable ledger (written by [`sync::SyncWorker`]) and the directory of accounts
//! and API keys (written by the admin API). All SQL of the sidecar lives in this module and the
//! migrations beside the crate; queries are checked at run time, so builds need no database.

pub mod sync;

use crate::config::LimitSpec;
use serde::Serialize;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    prefix: String,
}

#[derive(Debug, Clone)]
pub struct AccountRow {
    pub id: String,
    pub plan: String,
    pub timezone: String,
    pub billing_anchor_day: i16,
    pub limits: Vec<LimitSpec>,
    pub disabled: bool,
}

#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: String,
    pub account_id: String,
    pub masked: String,
    pub name: String,
    pub limits: Vec<LimitSpec>,
    pub disabled: bool,
}

/// Everything a cold load restores for one account.
#[derive(Debug, Default)]
pub struct AccountState {
    /// (scope, meter, period, used, period end ms)
    pub usage: Vec<(String, String, String, i64, i64)>,
    /// (grant id, order member, remaining)
    pub grants: Vec<(String, String, i64)>,
    /// (hold id, record json, fingerprint, authorize answer json, expires ms)
    pub holds: Vec<(String, String, String, String, i64)>,
    /// When the newest idempotent change of the account happened (unix ms).
    pub last_idempotent_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerEntry {
    pub seq: i64,
    pub kind: String,
    pub key_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub hold_id: Option<String>,
    pub credit: i64,
    pub shortfall: i64,
    pub meters: Option<serde_json::Value>,
    pub expired: Option<serde_json::Value>,
    pub route: Option<String>,
    pub model: Option<String>,
    pub resource: Option<serde_json::Value>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrantRow {
    pub grant_id: String,
    pub amount: i64,
    pub remaining: i64,
    pub expired: i64,
    pub priority: i32,
    pub expires_at_ms: Option<i64>,
    pub source: String,
}

/// A settled or open hold as the ledger knows it.
#[derive(Debug, Clone)]
pub struct HoldRow {
    pub status: String,
    pub result: Option<String>,
    pub settle_fp: Option<String>,
}

fn limits_of(v: serde_json::Value) -> Vec<LimitSpec> {
    serde_json::from_value(v).unwrap_or_default()
}

impl Ledger {
    /// Connects (creating the database if it does not exist) and runs the migrations.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        prefix: &str,
    ) -> Result<Self, sqlx::Error> {
        if !sqlx::Postgres::database_exists(url).await.unwrap_or(true) {
            sqlx::Postgres::create_database(url).await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            prefix: prefix.to_string(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The Redis key prefix this ledger's cursors belong to.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- directory -------------------------------------------------------------------------

    pub async fn account(&self, id: &str) -> Result<Option<AccountRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, plan, timezone, billing_anchor_day, limits, disabled FROM accounts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| AccountRow {
            id: r.get("id"),
            plan: r.get("plan"),
            timezone: r.get("timezone"),
            billing_anchor_day: r.get("billing_anchor_day"),
            limits: limits_of(r.get("limits")),
            disabled: r.get("disabled"),
        }))
    }

    /// Inserts an account; false when the id is taken.
    pub async fn insert_account(&self, a: &AccountRow) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO accounts (id, plan, timezone, billing_anchor_day, limits, disabled)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&a.id)
        .bind(&a.plan)
        .bind(&a.timezone)
        .bind(a.billing_anchor_day)
        .bind(serde_json::to_value(&a.limits).unwrap_or_default())
        .bind(a.disabled)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn update_account(&self, a: &AccountRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE accounts SET plan = $2, timezone = $3, billing_anchor_day = $4, limits = $5,
               disabled = $6, updated_at = now() WHERE id = $1",
        )
        .bind(&a.id)
        .bind(&a.plan)
        .bind(&a.timezone)
        .bind(a.billing_anchor_day)
        .bind(serde_json::to_value(&a.limits).unwrap_or_default())
        .bind(a.disabled)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn key_by_hash(&self, hash: &[u8]) -> Result<Option<KeyRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, account_id, masked, name, limits, disabled FROM api_keys WHERE key_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(key_row))
    }

    pub async fn key_by_id(&self, id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, account_id, masked, name, limits, disabled FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(key_row))
    }

    pub async fn keys_of(&self, account: &str) -> Result<Vec<KeyRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, account_id, masked, name, limits, disabled FROM api_keys
             WHERE account_id = $1 ORDER BY created_at",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(key_row).collect())
    }

    pub async fn insert_key(&self, k: &KeyRow, hash: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, key_hash, masked, name, limits) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&k.id)
        .bind(&k.account_id)
        .bind(hash)
        .bind(&k.masked)
        .bind(&k.name)
        .bind(serde_json::to_value(&k.limits).unwrap_or_default())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_key_disabled(&self, id: &str, disabled: bool) -> Result<bool, sqlx::Error> {
        let r = sqlx::query("UPDATE api_keys SET disabled = $2 WHERE id = $1")
            .bind(id)
            .bind(disabled)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- cold load and idempotency -----------------------------------------------------------

    /// The remaining state of an account: used amounts of windows not yet over, grants with
    /// credit left, open holds. Never totals.
    pub async fn account_state(
        &self,
        account: &str,
        now_ms: i64,
    ) -> Result<AccountState, sqlx::Error> {
        let usage = sqlx::query_as(
            "SELECT scope, meter, period, used, period_end FROM usage
             WHERE account_id = $1 AND (period_end = 0 OR period_end > $2)",
        )
        .bind(account)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let grants = sqlx::query_as(
            "SELECT id, member, remaining FROM grants WHERE account_id = $1 AND remaining > 0",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        let holds = sqlx::query_as(
            "SELECT id, record::text, fp, auth_result::text, expires_at FROM holds
             WHERE account_id = $1 AND status = 'open'",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        let last: Option<(f64,)> = sqlx::query_as(
            "SELECT extract(epoch FROM at)::float8 * 1000 FROM ledger
             WHERE account_id = $1 AND idem_key IS NOT NULL ORDER BY seq DESC LIMIT 1",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        Ok(AccountState {
            usage,
            grants,
            holds,
            last_idempotent_ms: last.map(|(ms,)| ms as i64),
        })
    }

    /// The fingerprint and result of the change `idem_key` caused, if the ledger has it.
    pub async fn idempotent_result(
        &self,
        account: &str,
        kind: &str,
        idem_key: &str,
    ) -> Result<Option<(Option<String>, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT fp, result::text FROM ledger WHERE account_id = $1 AND idem_key = $2 AND kind = $3
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(account)
        .bind(idem_key)
        .bind(kind)
        .fetch_optional(&self.pool)
        .await
    }

    pub async fn hold(&self, account: &str, hold_id: &str) -> Result<Option<HoldRow>, sqlx::Error> {
        let row: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT status, result::text, settle_fp FROM holds WHERE account_id = $1 AND id = $2",
        )
        .bind(account)
        .bind(hold_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(status, result, settle_fp)| HoldRow {
            status,
            result,
            settle_fp,
        }))
    }

    pub async fn hold_record(
        &self,
        account: &str,
        hold_id: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT record::text FROM holds WHERE account_id = $1 AND id = $2")
            .bind(account)
            .bind(hold_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn grant_exists(&self, account: &str, grant_id: &str) -> Result<bool, sqlx::Error> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM grants WHERE account_id = $1 AND id = $2")
                .bind(account)
                .bind(grant_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    // ---- reports -------------------------------------------------------------------------------

    /// Ledger history of an account, oldest first, after `after_seq`.
    pub async fn history(
        &self,
        account: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<LedgerEntry>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT seq, kind, key_id, idem_key, hold_id, credit, shortfall, meters, expired, route,
                    model, resource, (extract(epoch FROM at) * 1000)::int8 AS at_ms
             FROM ledger WHERE account_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(account)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| LedgerEntry {
                seq: r.get("seq"),
                kind: r.get("kind"),
                key_id: r.get("key_id"),
                idempotency_key: r.get("idem_key"),
                hold_id: r.get("hold_id"),
                credit: r.get("credit"),
                shortfall: r.get("shortfall"),
                meters: r.get("meters"),
                expired: r.get("expired"),
                route: r.get("route"),
                model: r.get("model"),
                resource: r.get("resource"),
                at_ms: r.get("at_ms"),
            })
            .collect())
    }

    pub async fn grants_of(&self, account: &str) -> Result<Vec<GrantRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, amount, remaining, expired, priority, expires_at, source FROM grants
             WHERE account_id = $1 ORDER BY member",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| GrantRow {
                grant_id: r.get("id"),
                amount: r.get("amount"),
                remaining: r.get("remaining"),
                expired: r.get("expired"),
                priority: r.get("priority"),
                expires_at_ms: r.get("expires_at"),
                source: r.get("source"),
            })
            .collect())
    }

    /// Used amount per (scope, meter, period) for the account, as synced.
    pub async fn usage_of(
        &self,
        account: &str,
    ) -> Result<Vec<(String, String, String, i64, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT scope, meter, period, used, period_end FROM usage WHERE account_id = $1
             ORDER BY scope, meter, period",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await
    }
}

fn key_row(r: sqlx::postgres::PgRow) -> KeyRow {
    KeyRow {
        id: r.get("id"),
        account_id: r.get("account_id"),
        masked: r.get("masked"),
        name: r.get("name"),
        limits: limits_of(r.get("limits")),
        disabled: r.get("disabled"),
    }
}
