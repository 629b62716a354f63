//! The durable ledger (written by [`sync::SyncWorker`]) and the directory of accounts and API
//! keys (written by the admin API), in PostgreSQL or, for the embedded default, in SQLite.
//!
//! All SQL of the sidecar lives in this module and the migrations beside the crate
//! (`migrations/` for PostgreSQL, `migrations-sqlite/` for SQLite: the same tables, with JSON as
//! text and times as unix milliseconds). Most statements are the same text for both databases and
//! are run through [`on_db!`], which type-checks the body once per driver; where the dialects
//! differ the two statements sit side by side. Queries are checked at run time, so builds need no
//! database.

pub mod billing;
pub mod sync;

use crate::config::LimitSpec;
use serde::Serialize;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;
use std::sync::Arc;

/// The database behind the ledger.
#[derive(Clone)]
pub enum Db {
    Pg(PgPool),
    /// The embedded ledger: one file, one sidecar. Its multi-statement writers take
    /// [`Ledger::write_lock`] so they queue in-process rather than in SQLite's busy wait, and
    /// open their transactions with [`BeginWrite::begin_write`] (`BEGIN IMMEDIATE`), so a
    /// single-statement writer committing meanwhile cannot make them fail.
    Lite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to whichever pool the ledger has (the body is compiled once
/// per driver, so the same statement text serves both).
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::ledger::Db::Pg($pool) => $body,
            $crate::ledger::Db::Lite($pool) => $body,
        }
    };
}
pub(crate) use on_db;

/// Opens a transaction that is going to write. On SQLite it is `BEGIN IMMEDIATE`: a deferred
/// transaction that reads first pins a snapshot, and if any other connection commits before its
/// first write, that write fails at once with "database is locked" (no busy wait can help). An
/// immediate one takes the write lock up front, waiting up to the busy timeout for it.
pub(crate) trait BeginWrite {
    type Db: sqlx::Database;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>;
}

impl BeginWrite for PgPool {
    type Db = sqlx::Postgres;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error> {
        self.begin().await
    }
}

impl BeginWrite for SqlitePool {
    type Db = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

#[derive(Clone)]
pub struct Ledger {
    db: Db,
    prefix: String,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Clone)]
pub struct AccountRow {
    pub id: String,
    pub plan: String,
    pub timezone: String,
    pub billing_anchor_day: i16,
    pub limits: Vec<LimitSpec>,
    pub disabled: bool,
    /// Bumped on every change (see `Store::set_version`).
    pub version: i64,
    /// The version of its plan as written through the API (0: the configuration's plan).
    pub plan_version: i64,
    /// The account above it (organization > team > account), set at creation; None for a root.
    pub parent: Option<String>,
    /// Its spending draws on the parent's credit once its own is spent (set at creation).
    pub draw_from_parents: bool,
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
    /// The caller's correlation id, when the request had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub at_ms: i64,
}

/// A ledger row as stored, JSON columns as text (see [`Ledger::entries`]).
#[derive(Debug, Clone)]
pub(crate) struct StoredEntry {
    pub seq: i64,
    pub account_id: String,
    pub kind: String,
    pub key_id: Option<String>,
    pub idem_key: Option<String>,
    pub hold_id: Option<String>,
    pub credit: i64,
    pub shortfall: i64,
    pub meters: Option<String>,
    pub expired: Option<String>,
    pub route: Option<String>,
    pub model: Option<String>,
    pub resource: Option<String>,
    pub correlation_id: Option<String>,
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

pub(crate) fn limits_of(v: String) -> Vec<LimitSpec> {
    serde_json::from_str(&v).unwrap_or_default()
}

impl Ledger {
    /// Opens the ledger at `url` and runs the migrations: `postgres://…` (the database is
    /// created if it does not exist) or `sqlite://<path>` (the file is created if missing).
    pub async fn connect(
        url: &str,
        max_connections: u32,
        prefix: &str,
    ) -> Result<Self, sqlx::Error> {
        let db = if let Some(path) = url.strip_prefix("sqlite://") {
            Db::Lite(open_sqlite(path).await?)
        } else {
            if !sqlx::Postgres::database_exists(url).await.unwrap_or(true) {
                sqlx::Postgres::create_database(url).await?;
            }
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(url)
                .await?;
            sqlx::migrate!("./migrations").run(&pool).await?;
            Db::Pg(pool)
        };
        Ok(Self {
            db,
            prefix: prefix.to_string(),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// `postgres` or `sqlite`.
    pub fn kind(&self) -> &'static str {
        match self.db {
            Db::Pg(_) => "postgres",
            Db::Lite(_) => "sqlite",
        }
    }

    /// Held by every multi-statement writer of an SQLite ledger (see [`Db::Lite`]); PostgreSQL
    /// writers coordinate with row and advisory locks instead and need not take it.
    pub async fn write_lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.db {
            Db::Pg(_) => None,
            Db::Lite(_) => Some(self.write_lock.lock().await),
        }
    }

    /// The Redis key prefix this ledger's cursors belong to.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One round trip to the database (readiness).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_db!(&self.db, p => sqlx::query("SELECT 1").execute(p).await.map(drop))
    }

    /// Closes every connection (waits for those in use).
    pub async fn close(&self) {
        on_db!(&self.db, p => p.close().await)
    }

    /// A count or sum over one account (`$1` is the account id), for reports and tests; NULL
    /// (no rows to sum) is 0. The statement must be valid in both dialects.
    pub async fn scalar(&self, sql: &str, account: &str) -> Result<i64, sqlx::Error> {
        let v: Option<i64> =
            on_db!(&self.db, p => sqlx::query_scalar(sql).bind(account).fetch_one(p).await?);
        Ok(v.unwrap_or(0))
    }

    // ---- directory -------------------------------------------------------------------------

    pub async fn account(&self, id: &str) -> Result<Option<AccountRow>, sqlx::Error> {
        let sql = format!("{} WHERE a.id = $1", billing::ACCOUNT_COLUMNS);
        on_db!(&self.db, p => {
            let row = sqlx::query(&sql).bind(id).fetch_optional(p).await?;
            Ok(row.as_ref().map(billing::account_row))
        })
    }

    /// Inserts an account; false when the id is taken.
    pub async fn insert_account(&self, a: &AccountRow) -> Result<bool, sqlx::Error> {
        let sql = self.dialect(
            "INSERT INTO accounts (id, plan, timezone, billing_anchor_day, limits, disabled, parent,
               draw_from_parents)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
            "INSERT INTO accounts (id, plan, timezone, billing_anchor_day, limits, disabled, parent,
               draw_from_parents)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        );
        let limits = limits_json(&a.limits);
        let done = on_db!(&self.db, p => sqlx::query(sql)
            .bind(&a.id)
            .bind(&a.plan)
            .bind(&a.timezone)
            .bind(a.billing_anchor_day)
            .bind(&limits)
            .bind(a.disabled)
            .bind(&a.parent)
            .bind(a.draw_from_parents)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Writes the account's fields and bumps its version; returns the new version.
    pub async fn update_account(&self, a: &AccountRow) -> Result<i64, sqlx::Error> {
        let sql = self.dialect(
            "UPDATE accounts SET plan = $2, timezone = $3, billing_anchor_day = $4, limits = $5::jsonb,
               disabled = $6, version = version + 1, updated_at = CURRENT_TIMESTAMP WHERE id = $1
             RETURNING version",
            "UPDATE accounts SET plan = $2, timezone = $3, billing_anchor_day = $4, limits = $5,
               disabled = $6, version = version + 1, updated_at = CURRENT_TIMESTAMP WHERE id = $1
             RETURNING version",
        );
        let limits = limits_json(&a.limits);
        on_db!(&self.db, p => sqlx::query_scalar(sql)
            .bind(&a.id)
            .bind(&a.plan)
            .bind(&a.timezone)
            .bind(a.billing_anchor_day)
            .bind(&limits)
            .bind(a.disabled)
            .fetch_one(p)
            .await)
    }

    /// The accounts directly under `parent`.
    pub async fn children_of(&self, parent: &str) -> Result<Vec<String>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_scalar(
            "SELECT id FROM accounts WHERE parent = $1 ORDER BY id",
        )
        .bind(parent)
        .fetch_all(p)
        .await)
    }

    /// Bumps an account's version (one of its keys changed); returns the new version.
    pub async fn bump_version(&self, id: &str) -> Result<Option<i64>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_scalar(
            "UPDATE accounts SET version = version + 1 WHERE id = $1 RETURNING version",
        )
        .bind(id)
        .fetch_optional(p)
        .await)
    }

    pub async fn key_by_hash(&self, hash: &[u8]) -> Result<Option<KeyRow>, sqlx::Error> {
        let sql = format!("{KEY_COLUMNS} WHERE key_hash = $1");
        let hash = hash.to_vec();
        on_db!(&self.db, p => {
            let row = sqlx::query(&sql).bind(&hash).fetch_optional(p).await?;
            Ok(row.map(|r| key_row(&r)))
        })
    }

    pub async fn key_by_id(&self, id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
        let sql = format!("{KEY_COLUMNS} WHERE id = $1");
        on_db!(&self.db, p => {
            let row = sqlx::query(&sql).bind(id).fetch_optional(p).await?;
            Ok(row.map(|r| key_row(&r)))
        })
    }

    pub async fn keys_of(&self, account: &str) -> Result<Vec<KeyRow>, sqlx::Error> {
        let sql = format!("{KEY_COLUMNS} WHERE account_id = $1 ORDER BY created_at, id");
        on_db!(&self.db, p => {
            let rows = sqlx::query(&sql).bind(account).fetch_all(p).await?;
            Ok(rows.iter().map(key_row).collect())
        })
    }

    pub async fn insert_key(&self, k: &KeyRow, hash: &[u8]) -> Result<(), sqlx::Error> {
        let sql = self.dialect(
            "INSERT INTO api_keys (id, account_id, key_hash, masked, name, limits) VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
            "INSERT INTO api_keys (id, account_id, key_hash, masked, name, limits) VALUES ($1, $2, $3, $4, $5, $6)",
        );
        let limits = limits_json(&k.limits);
        let hash = hash.to_vec();
        on_db!(&self.db, p => sqlx::query(sql)
            .bind(&k.id)
            .bind(&k.account_id)
            .bind(&hash)
            .bind(&k.masked)
            .bind(&k.name)
            .bind(&limits)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Returns the key's account, or None for an unknown key.
    pub async fn set_key_disabled(
        &self,
        id: &str,
        disabled: bool,
    ) -> Result<Option<String>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_scalar(
            "UPDATE api_keys SET disabled = $2 WHERE id = $1 RETURNING account_id",
        )
        .bind(id)
        .bind(disabled)
        .fetch_optional(p)
        .await)
    }

    // ---- cold load and idempotency -----------------------------------------------------------

    /// The remaining state of an account: used amounts of windows not yet over, grants with
    /// credit left, open holds. Never totals.
    pub async fn account_state(
        &self,
        account: &str,
        now_ms: i64,
    ) -> Result<AccountState, sqlx::Error> {
        let last_sql = self.dialect(
            "SELECT (extract(epoch FROM at) * 1000)::int8 FROM ledger
             WHERE account_id = $1 AND idem_key IS NOT NULL ORDER BY seq DESC LIMIT 1",
            "SELECT at FROM ledger WHERE account_id = $1 AND idem_key IS NOT NULL ORDER BY seq DESC LIMIT 1",
        );
        on_db!(&self.db, p => {
            let usage = sqlx::query_as(
                "SELECT scope, meter, period, used, period_end FROM usage
                 WHERE account_id = $1 AND (period_end = 0 OR period_end > $2)",
            )
            .bind(account)
            .bind(now_ms)
            .fetch_all(p)
            .await?;
            let grants = sqlx::query_as(
                "SELECT id, member, remaining FROM grants WHERE account_id = $1 AND remaining > 0",
            )
            .bind(account)
            .fetch_all(p)
            .await?;
            let holds = sqlx::query_as(
                "SELECT id, CAST(record AS TEXT), fp, CAST(auth_result AS TEXT), expires_at FROM holds
                 WHERE account_id = $1 AND status = 'open'",
            )
            .bind(account)
            .fetch_all(p)
            .await?;
            let last: Option<i64> = sqlx::query_scalar(last_sql)
                .bind(account)
                .fetch_optional(p)
                .await?;
            Ok(AccountState {
                usage,
                grants,
                holds,
                last_idempotent_ms: last,
            })
        })
    }

    /// The fingerprint and result of the change `idem_key` caused, if the ledger has it.
    pub async fn idempotent_result(
        &self,
        account: &str,
        kind: &str,
        idem_key: &str,
    ) -> Result<Option<(Option<String>, String)>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_as(
            "SELECT fp, CAST(result AS TEXT) FROM ledger WHERE account_id = $1 AND idem_key = $2 AND kind = $3
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(account)
        .bind(idem_key)
        .bind(kind)
        .fetch_optional(p)
        .await)
    }

    pub async fn hold(&self, account: &str, hold_id: &str) -> Result<Option<HoldRow>, sqlx::Error> {
        let row: Option<(String, Option<String>, Option<String>)> = on_db!(&self.db, p => sqlx::query_as(
            "SELECT status, CAST(result AS TEXT), settle_fp FROM holds WHERE account_id = $1 AND id = $2",
        )
        .bind(account)
        .bind(hold_id)
        .fetch_optional(p)
        .await?);
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
        on_db!(&self.db, p => sqlx::query_scalar(
            "SELECT CAST(record AS TEXT) FROM holds WHERE account_id = $1 AND id = $2",
        )
        .bind(account)
        .bind(hold_id)
        .fetch_optional(p)
        .await)
    }

    pub async fn grant_exists(&self, account: &str, grant_id: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = on_db!(&self.db, p => sqlx::query_scalar(
            "SELECT count(*) FROM grants WHERE account_id = $1 AND id = $2",
        )
        .bind(account)
        .bind(grant_id)
        .fetch_one(p)
        .await?);
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
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        Ok(self
            .entries(Some(account), after_seq, limit)
            .await?
            .into_iter()
            .map(|r| LedgerEntry {
                seq: r.seq,
                kind: r.kind,
                key_id: r.key_id,
                idempotency_key: r.idem_key,
                hold_id: r.hold_id,
                credit: r.credit,
                shortfall: r.shortfall,
                meters: json(r.meters),
                expired: json(r.expired),
                route: r.route,
                model: r.model,
                resource: json(r.resource),
                correlation_id: r.correlation_id,
                at_ms: r.at_ms,
            })
            .collect())
    }

    /// Ledger rows after `after_seq`, oldest first, as stored (JSON as text); of one account
    /// when given. What the history and the export are made from.
    pub(crate) async fn entries(
        &self,
        account: Option<&str>,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredEntry>, sqlx::Error> {
        let at_ms = self.dialect("(extract(epoch FROM at) * 1000)::int8", "at");
        let filter = if account.is_some() {
            "AND account_id = $3"
        } else {
            ""
        };
        let sql = format!(
            "SELECT seq, account_id, kind, key_id, idem_key, hold_id, credit, shortfall,
                    CAST(meters AS TEXT) AS meters, CAST(expired AS TEXT) AS expired, route, model,
                    CAST(resource AS TEXT) AS resource, correlation_id, {at_ms} AS at_ms
             FROM ledger WHERE seq > $1 {filter} ORDER BY seq LIMIT $2"
        );
        on_db!(&self.db, p => {
            let mut q = sqlx::query(&sql).bind(after_seq).bind(limit);
            if let Some(a) = account {
                q = q.bind(a);
            }
            let rows = q.fetch_all(p).await?;
            Ok(rows
                .into_iter()
                .map(|r| StoredEntry {
                    seq: r.get("seq"),
                    account_id: r.get("account_id"),
                    kind: r.get("kind"),
                    key_id: r.get("key_id"),
                    idem_key: r.get("idem_key"),
                    hold_id: r.get("hold_id"),
                    credit: r.get("credit"),
                    shortfall: r.get("shortfall"),
                    meters: r.get("meters"),
                    expired: r.get("expired"),
                    route: r.get("route"),
                    model: r.get("model"),
                    resource: r.get("resource"),
                    correlation_id: r.get("correlation_id"),
                    at_ms: r.get("at_ms"),
                })
                .collect())
        })
    }

    pub async fn grants_of(&self, account: &str) -> Result<Vec<GrantRow>, sqlx::Error> {
        on_db!(&self.db, p => {
            let rows = sqlx::query(
                "SELECT id, amount, remaining, expired, priority, expires_at, source FROM grants
                 WHERE account_id = $1 ORDER BY member",
            )
            .bind(account)
            .fetch_all(p)
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
        })
    }

    /// Used amount per (scope, meter, period) for the account, as synced.
    pub async fn usage_of(
        &self,
        account: &str,
    ) -> Result<Vec<(String, String, String, i64, i64)>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_as(
            "SELECT scope, meter, period, used, period_end FROM usage WHERE account_id = $1
             ORDER BY scope, meter, period",
        )
        .bind(account)
        .fetch_all(p)
        .await)
    }

    /// The PostgreSQL or the SQLite text of a statement whose dialects differ.
    fn dialect(&self, pg: &'static str, lite: &'static str) -> &'static str {
        match self.db {
            Db::Pg(_) => pg,
            Db::Lite(_) => lite,
        }
    }
}

/// Opens (creating if needed) the embedded ledger file: WAL, so readers never wait for the sync
/// worker; `synchronous = FULL`, so a committed batch survives a power cut.
async fn open_sqlite(path: &str) -> Result<SqlitePool, sqlx::Error> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(std::time::Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await?;
    sqlx::migrate!("./migrations-sqlite").run(&pool).await?;
    Ok(pool)
}

const KEY_COLUMNS: &str =
    "SELECT id, account_id, masked, name, CAST(limits AS TEXT) AS limits, disabled FROM api_keys";

fn limits_json(limits: &[LimitSpec]) -> String {
    serde_json::to_string(limits).unwrap_or_else(|_| "[]".into())
}

fn key_row<R: Row>(r: &R) -> KeyRow
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    bool: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    KeyRow {
        id: r.get("id"),
        account_id: r.get("account_id"),
        masked: r.get("masked"),
        name: r.get("name"),
        limits: limits_of(r.get("limits")),
        disabled: r.get("disabled"),
    }
}
