//! SQL of the billing side: subscriptions, billing-provider events, shared pools, alerts, and
//! the operator's reports (export, top consumers, account pages). Same conventions as the rest
//! of the ledger: one statement text for both databases where they agree, side by side where
//! they differ; times are unix milliseconds.

use super::{on_db, AccountRow, BeginWrite, Ledger};
use serde::Serialize;
use sqlx::Row;

/// Bumps the version of every account on plan `$name` inside a transaction (so every sidecar
/// re-reads them on their next request); evaluates to those (account, new version) pairs.
macro_rules! bump_accounts_on_plan {
    ($ex:expr, $name:expr) => {
        sqlx::query_as::<_, (String, i64)>(
            "UPDATE accounts SET version = version + 1 WHERE plan = $1 RETURNING id, version",
        )
        .bind($name)
        .fetch_all($ex)
        .await?
    };
}

/// Inserts a billing event (`ON CONFLICT DO NOTHING`) on `$ex`; evaluates to rows affected.
/// A macro, not a function: the statement runs on either driver's pool or transaction.
macro_rules! insert_event {
    ($ex:expr, $ev:expr) => {
        sqlx::query(
            "INSERT INTO billing_events (provider, event_id, kind, account_id, event_at, outcome,
                detail, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (provider, event_id) DO NOTHING",
        )
        .bind(&$ev.provider)
        .bind(&$ev.event_id)
        .bind(&$ev.kind)
        .bind(&$ev.account_id)
        .bind($ev.event_at_ms)
        .bind(&$ev.outcome)
        .bind(&$ev.detail)
        .bind($ev.received_at_ms)
        .execute($ex)
        .await?
        .rows_affected()
    };
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriptionRow {
    pub account_id: String,
    pub plan: String,
    pub status: String,
    pub provider: String,
    pub subject: Option<String>,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// When the newest change applied to it happened (events older than this are stale).
    pub event_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One billing-provider event as recorded.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BillingEventRow {
    pub provider: String,
    pub event_id: String,
    pub kind: String,
    pub account_id: Option<String>,
    pub event_at_ms: i64,
    pub outcome: String,
    pub detail: String,
    pub received_at_ms: i64,
}

/// Why an event about another subscription changed nothing (recorded as its detail).
pub(crate) fn other_subscription_detail(provider: &str, subject: Option<&str>) -> String {
    match subject {
        Some(id) => format!("the account's subscription on record is {provider} {id}"),
        None => format!("the account's subscription on record is {provider}'s (no provider id)"),
    }
}

/// What applying a subscription change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubOutcome {
    /// Applied; the account's new version.
    Applied(i64),
    /// A newer change was applied already; nothing changed (the event is recorded as stale).
    Stale,
    /// The event id was seen before; nothing changed.
    Duplicate,
    /// The account's subscription on record is another one (provider, subject), and this change
    /// may not replace it; nothing changed (the event is recorded as `ignored_other_subscription`).
    OtherSubscription {
        /// The provider of the subscription on record.
        provider: String,
        /// Its subscription id at the provider, if any.
        subject: Option<String>,
    },
    NoAccount,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolRow {
    pub id: String,
    pub stock: i64,
    pub description: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AlertRow {
    pub account_id: String,
    pub scope: String,
    pub meter: String,
    pub period: String,
    pub level: i32,
    pub name: String,
    pub used: i64,
    pub max: i64,
    pub at_ms: i64,
    pub delivered_at_ms: Option<i64>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// What [`Ledger::delete_plan`] did.
#[derive(Debug)]
pub enum PlanDeleted {
    /// Tombstoned at `version`; `bumped` are the accounts on it with their new versions.
    Deleted {
        version: i64,
        bumped: Vec<(String, i64)>,
    },
    /// No plan of that name was written through the API (or it was deleted already).
    NoSuchPlan,
    /// That many accounts are on it, and the configuration has no plan of that name.
    InUse(i64),
}

/// One row of a ledger export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportRow {
    pub seq: i64,
    pub account_id: String,
    pub kind: String,
    pub key_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub hold_id: Option<String>,
    pub credit: i64,
    pub shortfall: i64,
    pub meters: Option<String>,
    pub route: Option<String>,
    pub model: Option<String>,
    pub at_ms: i64,
    /// The caller's correlation id, when the request had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// One line of a top-consumers report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopRow {
    pub account_id: String,
    pub period: String,
    pub used: i64,
}

/// An account with the version of its plan (0 when the plan is the configuration's).
pub(crate) const ACCOUNT_COLUMNS: &str = "SELECT a.id, a.plan, a.timezone, a.billing_anchor_day,
    CAST(a.limits AS TEXT) AS limits, a.disabled, a.version, COALESCE(p.version, 0) AS plan_version,
    a.parent, a.draw_from_parents
    FROM accounts a LEFT JOIN plans p ON p.name = a.plan";

pub(crate) fn account_row<R: Row>(r: &R) -> AccountRow
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i16: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    bool: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    AccountRow {
        parent: r.get("parent"),
        draw_from_parents: r.get("draw_from_parents"),
        id: r.get("id"),
        plan: r.get("plan"),
        timezone: r.get("timezone"),
        billing_anchor_day: r.get("billing_anchor_day"),
        limits: super::limits_of(r.get("limits")),
        disabled: r.get("disabled"),
        version: r.get("version"),
        plan_version: r.get("plan_version"),
    }
}

fn alert_row<R: Row>(r: &R) -> AlertRow
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i32: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    AlertRow {
        account_id: r.get("account_id"),
        scope: r.get("scope"),
        meter: r.get("meter"),
        period: r.get("period"),
        level: r.get("level"),
        name: r.get("name"),
        used: r.get("used"),
        max: r.get("max"),
        at_ms: r.get("at"),
        delivered_at_ms: r.get("delivered_at"),
        attempts: r.get("attempts"),
        last_error: r.get("last_error"),
    }
}

const ALERT_COLUMNS: &str = "SELECT account_id, scope, meter, period, level, name, used, max, at, delivered_at, attempts, last_error FROM alerts";

impl Ledger {
    /// Accounts in id order after `after` (exclusive), for jobs that visit every account.
    pub async fn accounts_page(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<AccountRow>, sqlx::Error> {
        let sql = format!("{ACCOUNT_COLUMNS} WHERE a.id > $1 ORDER BY a.id LIMIT $2");
        on_db!(&self.db, p => {
            let rows = sqlx::query(&sql).bind(after).bind(limit).fetch_all(p).await?;
            Ok(rows.iter().map(account_row).collect())
        })
    }

    // ---- subscriptions and billing events ------------------------------------------------------

    pub async fn subscription(
        &self,
        account: &str,
    ) -> Result<Option<SubscriptionRow>, sqlx::Error> {
        type R = (
            String,
            String,
            String,
            String,
            Option<String>,
            i64,
            i64,
            i64,
            i64,
        );
        let row: Option<R> = on_db!(&self.db, p => sqlx::query_as(
                "SELECT account_id, plan, status, provider, subject, period_start, period_end, event_at,
                        updated_at FROM subscriptions WHERE account_id = $1",
            )
            .bind(account)
            .fetch_optional(p)
            .await?);
        Ok(row.map(|r| SubscriptionRow {
            account_id: r.0,
            plan: r.1,
            status: r.2,
            provider: r.3,
            subject: r.4,
            period_start_ms: r.5,
            period_end_ms: r.6,
            event_at_ms: r.7,
            updated_at_ms: r.8,
        }))
    }

    /// Applies a subscription change and moves the account to `effective_plan`, in one
    /// transaction — unless a newer change was applied already (stale), `event` was recorded
    /// before (duplicate), or the account's subscription on record is another one (a different
    /// provider or subject) and `may_replace` is false (other subscription: a provider's event
    /// about a subscription that is not the account's changes nothing, unless it starts one).
    /// `event` is recorded in the same transaction, so a provider's event changes the
    /// subscription exactly once.
    pub async fn apply_subscription(
        &self,
        s: &SubscriptionRow,
        effective_plan: &str,
        event: Option<&BillingEventRow>,
        may_replace: bool,
    ) -> Result<SubOutcome, sqlx::Error> {
        let _guard = self.write_lock().await;
        let lock_sql = self.dialect(
            "SELECT version FROM accounts WHERE id = $1 FOR UPDATE",
            // SQLite: a write first, so the transaction holds the write lock from its start
            // (a read first would make its later writes fail on a stale snapshot).
            "UPDATE accounts SET version = version WHERE id = $1 RETURNING version",
        );
        on_db!(&self.db, p => {
            let mut tx = p.begin_write().await?;
            if let Some(ev) = event {
                let n = insert_event!(&mut *tx, ev);
                if n == 0 {
                    tx.rollback().await?;
                    return Ok(SubOutcome::Duplicate);
                }
            }
            let locked: Option<i64> = sqlx::query_scalar(lock_sql)
                .bind(&s.account_id)
                .fetch_optional(&mut *tx)
                .await?;
            if locked.is_none() {
                tx.rollback().await?;
                return Ok(SubOutcome::NoAccount);
            }
            let on_record: Option<(String, Option<String>, i64)> = sqlx::query_as(
                "SELECT provider, subject, event_at FROM subscriptions WHERE account_id = $1",
            )
            .bind(&s.account_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((provider, subject, _)) = &on_record {
                let same = *provider == s.provider && *subject == s.subject;
                if !same && !may_replace {
                    if let Some(ev) = event {
                        let detail = other_subscription_detail(provider, subject.as_deref());
                        sqlx::query(
                            "UPDATE billing_events SET outcome = 'ignored_other_subscription',
                                detail = $3 WHERE provider = $1 AND event_id = $2",
                        )
                        .bind(&ev.provider)
                        .bind(&ev.event_id)
                        .bind(&detail)
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    return Ok(SubOutcome::OtherSubscription {
                        provider: provider.clone(),
                        subject: subject.clone(),
                    });
                }
            }
            if on_record.is_some_and(|(_, _, newest)| newest > s.event_at_ms) {
                if let Some(ev) = event {
                    sqlx::query(
                        "UPDATE billing_events SET outcome = 'stale', detail = 'a newer change was applied'
                         WHERE provider = $1 AND event_id = $2",
                    )
                    .bind(&ev.provider)
                    .bind(&ev.event_id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                return Ok(SubOutcome::Stale);
            }
            sqlx::query(
                "INSERT INTO subscriptions (account_id, plan, status, provider, subject, period_start,
                    period_end, event_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (account_id) DO UPDATE SET plan = EXCLUDED.plan, status = EXCLUDED.status,
                    provider = EXCLUDED.provider, subject = EXCLUDED.subject,
                    period_start = EXCLUDED.period_start, period_end = EXCLUDED.period_end,
                    event_at = EXCLUDED.event_at, updated_at = EXCLUDED.updated_at",
            )
            .bind(&s.account_id)
            .bind(&s.plan)
            .bind(&s.status)
            .bind(&s.provider)
            .bind(&s.subject)
            .bind(s.period_start_ms)
            .bind(s.period_end_ms)
            .bind(s.event_at_ms)
            .bind(s.updated_at_ms)
            .execute(&mut *tx)
            .await?;
            let version: i64 = sqlx::query_scalar(
                "UPDATE accounts SET plan = $2, version = version + 1, updated_at = CURRENT_TIMESTAMP
                 WHERE id = $1 RETURNING version",
            )
            .bind(&s.account_id)
            .bind(effective_plan)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(SubOutcome::Applied(version))
        })
    }

    /// Records an event; false when its (provider, id) was recorded before.
    pub async fn record_billing_event(&self, ev: &BillingEventRow) -> Result<bool, sqlx::Error> {
        let _guard = self.write_lock().await;
        let n = on_db!(&self.db, p => insert_event!(p, ev));
        Ok(n == 1)
    }

    pub async fn billing_event(
        &self,
        provider: &str,
        event_id: &str,
    ) -> Result<Option<BillingEventRow>, sqlx::Error> {
        let rows = self
            .billing_events_where(
                "WHERE provider = $1 AND event_id = $2",
                &[provider, event_id],
                1,
            )
            .await?;
        Ok(rows.into_iter().next())
    }

    /// The newest events first; of one account when `account` is given.
    pub async fn billing_events(
        &self,
        account: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BillingEventRow>, sqlx::Error> {
        match account {
            Some(a) => {
                self.billing_events_where("WHERE account_id = $1", &[a], limit)
                    .await
            }
            None => self.billing_events_where("", &[], limit).await,
        }
    }

    async fn billing_events_where(
        &self,
        filter: &str,
        binds: &[&str],
        limit: i64,
    ) -> Result<Vec<BillingEventRow>, sqlx::Error> {
        let sql = format!(
            "SELECT provider, event_id, kind, account_id, event_at, outcome, detail, received_at
             FROM billing_events {filter} ORDER BY received_at DESC, event_id LIMIT {limit}"
        );
        type R = (
            String,
            String,
            String,
            Option<String>,
            i64,
            String,
            String,
            i64,
        );
        let rows: Vec<R> = on_db!(&self.db, p => {
            let mut q = sqlx::query_as(&sql);
            for b in binds {
                q = q.bind(*b);
            }
            q.fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .map(|r| BillingEventRow {
                provider: r.0,
                event_id: r.1,
                kind: r.2,
                account_id: r.3,
                event_at_ms: r.4,
                outcome: r.5,
                detail: r.6,
                received_at_ms: r.7,
            })
            .collect())
    }

    // ---- plans ---------------------------------------------------------------------------------

    /// Plans written through the API: (name, body JSON, version).
    pub async fn plans(&self) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_as(
            "SELECT name, CAST(body AS TEXT), version FROM plans WHERE NOT deleted ORDER BY name",
        )
        .fetch_all(p)
        .await)
    }

    /// (body JSON — none once deleted —, version) of a plan written through the API.
    pub async fn plan(&self, name: &str) -> Result<Option<(Option<String>, i64)>, sqlx::Error> {
        let row: Option<(String, i64, bool)> = on_db!(&self.db, p => sqlx::query_as(
            "SELECT CAST(body AS TEXT), version, deleted FROM plans WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(p)
        .await)?;
        Ok(row.map(|(body, v, deleted)| ((!deleted).then_some(body), v)))
    }

    /// Deletes a plan written through the API, leaving a tombstone with the next version.
    /// A plan with accounts on it is kept unless `config_has_it` (the configuration's plan of
    /// that name takes over; its accounts' versions are bumped so every sidecar re-reads them).
    pub async fn delete_plan(
        &self,
        name: &str,
        config_has_it: bool,
        now_ms: i64,
    ) -> Result<PlanDeleted, sqlx::Error> {
        let _guard = self.write_lock().await;
        let lock = self.dialect(
            "SELECT deleted FROM plans WHERE name = $1 FOR UPDATE",
            "SELECT deleted FROM plans WHERE name = $1",
        );
        on_db!(&self.db, p => {
            let mut tx = p.begin_write().await?;
            let deleted: Option<bool> = sqlx::query_scalar(lock)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            if deleted.is_none_or(|d| d) {
                return Ok(PlanDeleted::NoSuchPlan);
            }
            if !config_has_it {
                let on_it: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM accounts WHERE plan = $1")
                        .bind(name)
                        .fetch_one(&mut *tx)
                        .await?;
                if on_it > 0 {
                    return Ok(PlanDeleted::InUse(on_it));
                }
            }
            let version: i64 = sqlx::query_scalar(
                "UPDATE plans SET deleted = TRUE, version = version + 1, updated_at = $2
                 WHERE name = $1 RETURNING version",
            )
            .bind(name)
            .bind(now_ms)
            .fetch_one(&mut *tx)
            .await?;
            let bumped = bump_accounts_on_plan!(&mut *tx, name);
            tx.commit().await?;
            Ok(PlanDeleted::Deleted { version, bumped })
        })
    }

    /// Writes a plan and bumps the version of every account on it; returns the plan's version
    /// and those accounts with their new versions.
    pub async fn put_plan(
        &self,
        name: &str,
        body: &str,
        now_ms: i64,
    ) -> Result<(i64, Vec<(String, i64)>), sqlx::Error> {
        let _guard = self.write_lock().await;
        let upsert = self.dialect(
            "INSERT INTO plans (name, body, updated_at) VALUES ($1, $2::jsonb, $3)
             ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, updated_at = EXCLUDED.updated_at,
               version = plans.version + 1, deleted = FALSE RETURNING version",
            "INSERT INTO plans (name, body, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, updated_at = EXCLUDED.updated_at,
               version = plans.version + 1, deleted = FALSE RETURNING version",
        );
        on_db!(&self.db, p => {
            let mut tx = p.begin_write().await?;
            let version: i64 = sqlx::query_scalar(upsert)
                .bind(name)
                .bind(body)
                .bind(now_ms)
                .fetch_one(&mut *tx)
                .await?;
            let bumped = bump_accounts_on_plan!(&mut *tx, name);
            tx.commit().await?;
            Ok((version, bumped))
        })
    }

    // ---- pools ---------------------------------------------------------------------------------

    /// False when the id is taken.
    pub async fn insert_pool(&self, p: &PoolRow) -> Result<bool, sqlx::Error> {
        let n = on_db!(&self.db, db => sqlx::query(
            "INSERT INTO pools (id, stock, description, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&p.id)
        .bind(p.stock)
        .bind(&p.description)
        .bind(p.created_at_ms)
        .execute(db)
        .await?
        .rows_affected());
        Ok(n == 1)
    }

    pub async fn pool(&self, id: &str) -> Result<Option<PoolRow>, sqlx::Error> {
        Ok(self
            .pools_where("WHERE id = $1", Some(id))
            .await?
            .into_iter()
            .next())
    }

    pub async fn pools(&self) -> Result<Vec<PoolRow>, sqlx::Error> {
        self.pools_where("", None).await
    }

    async fn pools_where(
        &self,
        filter: &str,
        id: Option<&str>,
    ) -> Result<Vec<PoolRow>, sqlx::Error> {
        let sql =
            format!("SELECT id, stock, description, created_at FROM pools {filter} ORDER BY id");
        let rows: Vec<(String, i64, String, i64)> = on_db!(&self.db, p => {
            let mut q = sqlx::query_as(&sql);
            if let Some(id) = id {
                q = q.bind(id);
            }
            q.fetch_all(p).await?
        });
        Ok(rows
            .into_iter()
            .map(|r| PoolRow {
                id: r.0,
                stock: r.1,
                description: r.2,
                created_at_ms: r.3,
            })
            .collect())
    }

    // ---- alerts --------------------------------------------------------------------------------

    /// Records an alert; false when this (account, scope, meter, period, level) was raised before.
    pub async fn insert_alert(&self, a: &AlertRow) -> Result<bool, sqlx::Error> {
        let n = on_db!(&self.db, p => sqlx::query(
            "INSERT INTO alerts (account_id, scope, meter, period, level, name, used, max, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (account_id, scope, meter, period, level) DO NOTHING",
        )
        .bind(&a.account_id)
        .bind(&a.scope)
        .bind(&a.meter)
        .bind(&a.period)
        .bind(a.level)
        .bind(&a.name)
        .bind(a.used)
        .bind(a.max)
        .bind(a.at_ms)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n == 1)
    }

    pub async fn alerts_of(&self, account: &str, limit: i64) -> Result<Vec<AlertRow>, sqlx::Error> {
        let sql =
            format!("{ALERT_COLUMNS} WHERE account_id = $1 ORDER BY at DESC, level DESC LIMIT $2");
        on_db!(&self.db, p => {
            let rows = sqlx::query(&sql).bind(account).bind(limit).fetch_all(p).await?;
            Ok(rows.iter().map(alert_row).collect())
        })
    }

    /// Alerts still to deliver, oldest first.
    pub async fn undelivered_alerts(
        &self,
        max_attempts: i32,
        limit: i64,
    ) -> Result<Vec<AlertRow>, sqlx::Error> {
        let sql = format!(
            "{ALERT_COLUMNS} WHERE delivered_at IS NULL AND attempts < $1 ORDER BY at LIMIT $2"
        );
        on_db!(&self.db, p => {
            let rows = sqlx::query(&sql).bind(max_attempts).bind(limit).fetch_all(p).await?;
            Ok(rows.iter().map(alert_row).collect())
        })
    }

    /// Marks a delivery attempt: delivered at `at_ms`, or failed with `error`.
    pub async fn mark_alert(
        &self,
        a: &AlertRow,
        delivered_at_ms: Option<i64>,
        error: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        on_db!(&self.db, p => sqlx::query(
            "UPDATE alerts SET attempts = attempts + 1, delivered_at = $6, last_error = $7
             WHERE account_id = $1 AND scope = $2 AND meter = $3 AND period = $4 AND level = $5",
        )
        .bind(&a.account_id)
        .bind(&a.scope)
        .bind(&a.meter)
        .bind(&a.period)
        .bind(a.level)
        .bind(delivered_at_ms)
        .bind(error)
        .execute(p)
        .await
        .map(drop))
    }

    // ---- jobs and reports ----------------------------------------------------------------------

    /// Accounts holding credit past its expiry that the ledger has not recorded as expired yet.
    pub async fn accounts_with_lapsed_credit(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        on_db!(&self.db, p => sqlx::query_scalar(
            "SELECT DISTINCT account_id FROM grants WHERE expires_at IS NOT NULL AND expires_at <= $1
               AND remaining > 0 ORDER BY account_id LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(p)
        .await)
    }

    /// Ledger entries after `after_seq`, oldest first; of one account when given.
    pub async fn export(
        &self,
        account: Option<&str>,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<ExportRow>, sqlx::Error> {
        Ok(self
            .entries(account, after_seq, limit)
            .await?
            .into_iter()
            .map(|r| ExportRow {
                seq: r.seq,
                account_id: r.account_id,
                kind: r.kind,
                key_id: r.key_id,
                idempotency_key: r.idem_key,
                hold_id: r.hold_id,
                credit: r.credit,
                shortfall: r.shortfall,
                meters: r.meters,
                route: r.route,
                model: r.model,
                at_ms: r.at_ms,
                correlation_id: r.correlation_id,
            })
            .collect())
    }

    /// The accounts that used the most of `meter` in `period` (account scope), as synced.
    pub async fn top(
        &self,
        meter: &str,
        period: &str,
        limit: i64,
    ) -> Result<Vec<TopRow>, sqlx::Error> {
        let rows: Vec<(String, String, i64)> = on_db!(&self.db, p => sqlx::query_as(
            "SELECT account_id, period, used FROM usage
             WHERE meter = $1 AND period = $2 AND scope = 'a:' || account_id AND used > 0
             ORDER BY used DESC, account_id LIMIT $3",
        )
        .bind(meter)
        .bind(period)
        .bind(limit)
        .fetch_all(p)
        .await?);
        Ok(rows
            .into_iter()
            .map(|(account_id, period, used)| TopRow {
                account_id,
                period,
                used,
            })
            .collect())
    }
}
