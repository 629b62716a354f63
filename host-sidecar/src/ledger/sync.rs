//! The sync worker: drains each shard's outbox stream into PostgreSQL, exactly once.
//!
//! Exactly once because the stream cursor is stored in the same transaction as the rows it
//! applied: a crash before COMMIT applies nothing and the next pass re-reads the same entries; a
//! crash after COMMIT leaves the cursor past them. Several sidecars may run the worker; a
//! transaction-scoped advisory lock per shard lets one apply a shard at a time and the others
//! move on. Entries are trimmed from the stream only after their transaction committed.
//!
//! Each pass aggregates usage and grant deltas in memory first, then writes the batch: in
//! PostgreSQL with one statement per table (UNNEST arrays), in the embedded SQLite ledger row by
//! row inside one transaction (a local file: the round trips cost nothing).

use super::{on_db, BeginWrite, Ledger};
use crate::metrics::Metrics;
use crate::store::Store;
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("ledger: {0}")]
    Ledger(#[from] sqlx::Error),
}

/// A grant's change in an event: `[grant id, amount]`, or `[grant id, amount, account]` when
/// the grant is another account's (a parent's credit, spent by an account under it).
#[derive(Debug, Clone, Deserialize)]
struct GrantRow(String, i64, #[serde(default)] Option<String>);

impl GrantRow {
    fn owner<'a>(&'a self, acct: &'a str) -> &'a str {
        self.2.as_deref().unwrap_or(acct)
    }
}

/// Written back as it came: two elements, or three with the account.
impl serde::Serialize for GrantRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(2 + usize::from(self.2.is_some())))?;
        seq.serialize_element(&self.0)?;
        seq.serialize_element(&self.1)?;
        if let Some(a) = &self.2 {
            seq.serialize_element(a)?;
        }
        seq.end()
    }
}

/// One outbox event, as the scripts in `lua/` write it.
#[derive(Debug, Deserialize)]
struct Event {
    t: String,
    acct: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    hold: Option<String>,
    #[serde(default)]
    idem: Option<String>,
    #[serde(default)]
    fp: Option<String>,
    at: i64,
    #[serde(default)]
    credit: i64,
    #[serde(default)]
    short: i64,
    #[serde(default)]
    meters: Option<Value>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    resource: Option<Value>,
    /// The caller's correlation id (hold and consume events; a hold's settlement carries its
    /// hold's).
    #[serde(default)]
    cid: Option<String>,
    #[serde(default)]
    u: Vec<(String, String, String, i64, i64)>,
    #[serde(default)]
    g: Vec<GrantRow>,
    #[serde(default)]
    x: Vec<GrantRow>,
    #[serde(default)]
    rec: Option<Value>,
    #[serde(default)]
    grant: Option<GrantInfo>,
    result: Value,
}

#[derive(Debug, Deserialize)]
struct GrantInfo {
    id: String,
    member: String,
    amount: i64,
    priority: i32,
    #[serde(default)]
    expires: i64,
    source: String,
}

/// Rows per INSERT into the SQLite ledger (20 columns: well under SQLite's 32,766 parameters).
const LITE_ROWS_PER_INSERT: usize = 200;

/// A stream entry id `ms-seq`, ordered numerically.
pub fn parse_stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn lock_key(prefix: &str, shard: u32) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("tollgate-sync:{prefix}:{shard}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// A hold created in this batch.
struct NewHold {
    account: String,
    id: String,
    key: Option<String>,
    credit: i64,
    expires: i64,
    record: String,
    fp: String,
    auth_result: String,
    created: i64,
    /// Settled in the same batch: (status, result, settle fingerprint, when), written with the
    /// row itself, so the hold takes one insert and no update.
    settled: Option<(String, String, Option<String>, i64)>,
}
/// Per shard: the (epoch, last applied id) this process last saw.
type Seen = Arc<Vec<Mutex<Option<(String, String)>>>>;

#[derive(Default)]
struct Batch {
    event_id: Vec<String>,
    /// The shard each row came from (one batch may carry several shards' events).
    shard: Vec<i32>,
    account: Vec<String>,
    key: Vec<Option<String>>,
    kind: Vec<String>,
    idem: Vec<Option<String>>,
    hold: Vec<Option<String>>,
    fp: Vec<Option<String>>,
    credit: Vec<i64>,
    short: Vec<i64>,
    meters: Vec<Option<String>>,
    usage: Vec<Option<String>>,
    grants: Vec<Option<String>>,
    expired: Vec<Option<String>>,
    route: Vec<Option<String>>,
    model: Vec<Option<String>>,
    resource: Vec<Option<String>>,
    correlation_id: Vec<Option<String>>,
    result: Vec<String>,
    at: Vec<i64>,
    usage_delta: HashMap<(String, String, String, String), (i64, i64)>,
    grant_new: Vec<(String, GrantInfo, i64)>,
    grant_delta: HashMap<(String, String), (i64, i64)>,
    holds_new: Vec<NewHold>,
    /// Where each (account, hold) of `holds_new` is.
    holds_new_at: HashMap<(String, String), usize>,
    holds_settled: Vec<(String, String, String, String, Option<String>, i64)>,
    /// Open holds extended: (account, hold) -> (record, credit); the latest extension wins.
    holds_extended: HashMap<(String, String), (String, i64)>,
}

fn json_opt<T: serde::Serialize>(v: &[T]) -> Option<String> {
    (!v.is_empty()).then(|| serde_json::to_string(v).unwrap_or_default())
}

impl Batch {
    /// The statements [`Batch::write_pg`] sends: one round trip each.
    fn statements(&self) -> u64 {
        1 + u64::from(!self.usage_delta.is_empty())
            + self.grant_new.len() as u64
            + u64::from(!self.grant_delta.is_empty())
            + u64::from(!self.holds_new.is_empty())
            + u64::from(!self.holds_settled.is_empty())
            + u64::from(!self.holds_extended.is_empty())
    }

    fn push(&mut self, event_id: String, shard: i32, e: Event) {
        for (scope, meter, period, delta, end) in &e.u {
            // A parent's counter (scope `a:<parent>`) is the parent's usage, shared by every
            // account under it: it is kept on the parent's rows, where a cold load finds it.
            let owner = scope
                .strip_prefix("a:")
                .filter(|id| *id != e.acct)
                .map_or_else(|| e.acct.clone(), str::to_string);
            let k = (owner, scope.clone(), meter.clone(), period.clone());
            let slot = self.usage_delta.entry(k).or_insert((0, *end));
            slot.0 += delta;
        }
        for r in &e.g {
            self.grant_delta
                .entry((r.owner(&e.acct).to_string(), r.0.clone()))
                .or_default()
                .0 += r.1;
        }
        for r in &e.x {
            let slot = self
                .grant_delta
                .entry((r.owner(&e.acct).to_string(), r.0.clone()))
                .or_default();
            slot.0 -= r.1;
            slot.1 += r.1;
        }
        let mut fp = e.fp.clone();
        match e.t.as_str() {
            "hold" => {
                if let (Some(hold), Some(rec)) = (&e.hold, &e.rec) {
                    if fp.is_none() {
                        fp = rec.get("fp").and_then(Value::as_str).map(str::to_string);
                    }
                    self.holds_new_at
                        .insert((e.acct.clone(), hold.clone()), self.holds_new.len());
                    self.holds_new.push(NewHold {
                        account: e.acct.clone(),
                        id: hold.clone(),
                        key: e.key.clone(),
                        credit: e.credit,
                        expires: rec.get("exp").and_then(Value::as_i64).unwrap_or(0),
                        record: rec.to_string(),
                        fp: fp.clone().unwrap_or_default(),
                        auth_result: e.result.to_string(),
                        created: e.at,
                        settled: None,
                    });
                }
            }
            "extend" => {
                if let (Some(hold), Some(rec)) = (&e.hold, &e.rec) {
                    let credit = rec.get("credit").and_then(Value::as_i64).unwrap_or(0);
                    let k = (e.acct.clone(), hold.clone());
                    match self.holds_new_at.get(&k) {
                        Some(&i) => {
                            self.holds_new[i].record = rec.to_string();
                            self.holds_new[i].credit = credit;
                        }
                        None => {
                            self.holds_extended.insert(k, (rec.to_string(), credit));
                        }
                    }
                }
            }
            "commit" | "release" | "expire" => {
                if let Some(hold) = &e.hold {
                    let status = match e.t.as_str() {
                        "commit" => "committed",
                        "release" => "released",
                        _ => "expired",
                    };
                    let settled = (status.to_string(), e.result.to_string(), e.fp.clone(), e.at);
                    match self.holds_new_at.get(&(e.acct.clone(), hold.clone())) {
                        Some(&i) => self.holds_new[i].settled = Some(settled),
                        None => self.holds_settled.push((
                            e.acct.clone(),
                            hold.clone(),
                            settled.0,
                            settled.1,
                            settled.2,
                            settled.3,
                        )),
                    }
                }
            }
            _ => {}
        }
        if let Some(g) = e.grant {
            self.grant_new.push((e.acct.clone(), g, e.at));
        }
        self.event_id.push(event_id);
        self.shard.push(shard);
        self.account.push(e.acct);
        self.key.push(e.key);
        self.kind.push(e.t);
        self.idem.push(e.idem);
        self.hold.push(e.hold);
        self.fp.push(fp);
        self.credit.push(e.credit);
        self.short.push(e.short);
        self.meters.push(e.meters.map(|m| m.to_string()));
        self.usage.push(json_opt(&e.u));
        self.grants.push(json_opt(&e.g));
        self.expired.push(json_opt(&e.x));
        self.route.push(e.route);
        self.model.push(e.model);
        self.resource.push(e.resource.map(|r| r.to_string()));
        self.correlation_id.push(e.cid);
        self.result.push(e.result.to_string());
        self.at.push(e.at);
    }

    async fn write_pg(self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO ledger (event_id, shard, account_id, key_id, kind, idem_key, hold_id, fp,
                credit, shortfall, meters, usage, grants, expired, route, model, resource, result, at,
                correlation_id)
             SELECT e, sh, a, k, t, i, h, f, c, s, m::jsonb, u::jsonb, g::jsonb, x::jsonb, r, md,
                rs::jsonb, res::jsonb, to_timestamp(at / 1000.0), cid
             FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::int8[], $10::int8[], $11::text[], $12::text[], $13::text[],
                $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::int8[],
                $20::text[])
               AS t(e, sh, a, k, t, i, h, f, c, s, m, u, g, x, r, md, rs, res, at, cid)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&self.event_id)
        .bind(&self.shard)
        .bind(&self.account)
        .bind(&self.key)
        .bind(&self.kind)
        .bind(&self.idem)
        .bind(&self.hold)
        .bind(&self.fp)
        .bind(&self.credit)
        .bind(&self.short)
        .bind(&self.meters)
        .bind(&self.usage)
        .bind(&self.grants)
        .bind(&self.expired)
        .bind(&self.route)
        .bind(&self.model)
        .bind(&self.resource)
        .bind(&self.result)
        .bind(&self.at)
        .bind(&self.correlation_id)
        .execute(&mut *tx)
        .await?;

        if !self.usage_delta.is_empty() {
            let (mut a, mut sc, mut m, mut p, mut d, mut end) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for ((acct, scope, meter, period), (delta, e)) in self.usage_delta {
                a.push(acct);
                sc.push(scope);
                m.push(meter);
                p.push(period);
                d.push(delta);
                end.push(e);
            }
            sqlx::query(
                "INSERT INTO usage (account_id, scope, meter, period, used, period_end)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[])
                 ON CONFLICT (account_id, scope, meter, period)
                 DO UPDATE SET used = usage.used + EXCLUDED.used",
            )
            .bind(a)
            .bind(sc)
            .bind(m)
            .bind(p)
            .bind(d)
            .bind(end)
            .execute(&mut *tx)
            .await?;
        }

        for (acct, g, at) in &self.grant_new {
            sqlx::query(
                "INSERT INTO grants (account_id, id, member, amount, remaining, priority, expires_at, source, created_at)
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7, $8) ON CONFLICT (account_id, id) DO NOTHING",
            )
            .bind(acct)
            .bind(&g.id)
            .bind(&g.member)
            .bind(g.amount)
            .bind(g.priority)
            .bind((g.expires > 0).then_some(g.expires))
            .bind(&g.source)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        if !self.grant_delta.is_empty() {
            let (mut a, mut id, mut rem, mut exp) = (vec![], vec![], vec![], vec![]);
            for ((acct, gid), (r, x)) in self.grant_delta {
                a.push(acct);
                id.push(gid);
                rem.push(r);
                exp.push(x);
            }
            sqlx::query(
                "UPDATE grants SET remaining = grants.remaining + d.r, expired = grants.expired + d.x
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[]) AS d(a, id, r, x)
                 WHERE grants.account_id = d.a AND grants.id = d.id",
            )
            .bind(a)
            .bind(id)
            .bind(rem)
            .bind(exp)
            .execute(&mut *tx)
            .await?;
        }

        if !self.holds_new.is_empty() {
            // A hold id is created once per idempotency window; keep the last if it repeats.
            let mut by_id: HashMap<(String, String), NewHold> = HashMap::new();
            for h in self.holds_new {
                by_id.insert((h.account.clone(), h.id.clone()), h);
            }
            let n = by_id.len();
            let (mut a, mut id, mut k, mut c, mut e) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut r, mut f, mut ar, mut at) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut st, mut res, mut sfp, mut rat) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for h in by_id.into_values() {
                a.push(h.account);
                id.push(h.id);
                k.push(h.key);
                c.push(h.credit);
                e.push(h.expires);
                r.push(h.record);
                f.push(h.fp);
                ar.push(h.auth_result);
                at.push(h.created);
                let (s1, s2, s3, s4) = match h.settled {
                    Some((s1, s2, s3, s4)) => (s1, Some(s2), s3, Some(s4)),
                    None => ("open".to_string(), None, None, None),
                };
                st.push(s1);
                res.push(s2);
                sfp.push(s3);
                rat.push(s4);
            }
            sqlx::query(
                "INSERT INTO holds (account_id, id, key_id, status, credit, expires_at, record, fp, auth_result, created_at,
                   result, settle_fp, resolved_at)
                 SELECT a, id, k, st, c, e, r::jsonb, f, ar::jsonb, at, res::jsonb, sfp, rat
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[],
                   $7::text[], $8::text[], $9::int8[], $10::text[], $11::text[], $12::text[], $13::int8[])
                   AS t(a, id, k, c, e, r, f, ar, at, st, res, sfp, rat)
                 ON CONFLICT (account_id, id) DO UPDATE SET key_id = EXCLUDED.key_id, status = EXCLUDED.status,
                   credit = EXCLUDED.credit, expires_at = EXCLUDED.expires_at, record = EXCLUDED.record,
                   fp = EXCLUDED.fp, auth_result = EXCLUDED.auth_result, created_at = EXCLUDED.created_at,
                   result = EXCLUDED.result, settle_fp = EXCLUDED.settle_fp, resolved_at = EXCLUDED.resolved_at",
            )
            .bind(a)
            .bind(id)
            .bind(k)
            .bind(c)
            .bind(e)
            .bind(r)
            .bind(f)
            .bind(ar)
            .bind(at)
            .bind(st)
            .bind(res)
            .bind(sfp)
            .bind(rat)
            .execute(&mut *tx)
            .await?;
        }
        if !self.holds_extended.is_empty() {
            let (mut a, mut id, mut rec, mut cr) = (vec![], vec![], vec![], vec![]);
            for ((acct, hid), (record, credit)) in self.holds_extended {
                a.push(acct);
                id.push(hid);
                rec.push(record);
                cr.push(credit);
            }
            sqlx::query(
                "UPDATE holds SET record = s.rec::jsonb, credit = s.cr
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) AS s(a, id, rec, cr)
                 WHERE holds.account_id = s.a AND holds.id = s.id",
            )
            .bind(a)
            .bind(id)
            .bind(rec)
            .bind(cr)
            .execute(&mut *tx)
            .await?;
        }
        if !self.holds_settled.is_empty() {
            let (mut a, mut id, mut st, mut res, mut fp, mut at) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for (acct, hid, status, result, f, when) in self.holds_settled {
                a.push(acct);
                id.push(hid);
                st.push(status);
                res.push(result);
                fp.push(f);
                at.push(when);
            }
            sqlx::query(
                "UPDATE holds SET status = s.st, result = s.res::jsonb, settle_fp = s.fp, resolved_at = s.at
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[])
                   AS s(a, id, st, res, fp, at)
                 WHERE holds.account_id = s.a AND holds.id = s.id",
            )
            .bind(a)
            .bind(id)
            .bind(st)
            .bind(res)
            .bind(fp)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

impl Batch {
    /// The same rows as [`Batch::write_pg`], for the embedded SQLite ledger.
    async fn write_lite(self, tx: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
        // Many rows per statement: each statement is a round trip to SQLite's worker thread.
        let rows: Vec<usize> = (0..self.event_id.len()).collect();
        for chunk in rows.chunks(LITE_ROWS_PER_INSERT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO ledger (event_id, shard, account_id, key_id, kind, idem_key, hold_id, fp,
                    credit, shortfall, meters, usage, grants, expired, route, model, resource, result, at,
                    correlation_id) ",
            );
            q.push_values(chunk, |mut b, &i| {
                b.push_bind(&self.event_id[i])
                    .push_bind(self.shard[i])
                    .push_bind(&self.account[i])
                    .push_bind(&self.key[i])
                    .push_bind(&self.kind[i])
                    .push_bind(&self.idem[i])
                    .push_bind(&self.hold[i])
                    .push_bind(&self.fp[i])
                    .push_bind(self.credit[i])
                    .push_bind(self.short[i])
                    .push_bind(&self.meters[i])
                    .push_bind(&self.usage[i])
                    .push_bind(&self.grants[i])
                    .push_bind(&self.expired[i])
                    .push_bind(&self.route[i])
                    .push_bind(&self.model[i])
                    .push_bind(&self.resource[i])
                    .push_bind(&self.result[i])
                    .push_bind(self.at[i])
                    .push_bind(&self.correlation_id[i]);
            });
            q.push(" ON CONFLICT (event_id) DO NOTHING");
            q.build().execute(&mut *tx).await?;
        }
        for ((acct, scope, meter, period), (delta, end)) in &self.usage_delta {
            sqlx::query(
                "INSERT INTO usage (account_id, scope, meter, period, used, period_end)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (account_id, scope, meter, period) DO UPDATE SET used = used + excluded.used",
            )
            .bind(acct)
            .bind(scope)
            .bind(meter)
            .bind(period)
            .bind(delta)
            .bind(end)
            .execute(&mut *tx)
            .await?;
        }
        for (acct, g, at) in &self.grant_new {
            sqlx::query(
                "INSERT INTO grants (account_id, id, member, amount, remaining, priority, expires_at, source, created_at)
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7, $8) ON CONFLICT (account_id, id) DO NOTHING",
            )
            .bind(acct)
            .bind(&g.id)
            .bind(&g.member)
            .bind(g.amount)
            .bind(g.priority)
            .bind((g.expires > 0).then_some(g.expires))
            .bind(&g.source)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        for ((acct, gid), (r, x)) in &self.grant_delta {
            sqlx::query(
                "UPDATE grants SET remaining = remaining + $3, expired = expired + $4
                 WHERE account_id = $1 AND id = $2",
            )
            .bind(acct)
            .bind(gid)
            .bind(r)
            .bind(x)
            .execute(&mut *tx)
            .await?;
        }
        // In stream order, so a hold created and settled in one batch ends settled.
        let mut holds: HashMap<(String, String), NewHold> = HashMap::new();
        for h in self.holds_new {
            holds.insert((h.account.clone(), h.id.clone()), h);
        }
        let holds: Vec<NewHold> = holds.into_values().collect();
        for chunk in holds.chunks(LITE_ROWS_PER_INSERT) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO holds (account_id, id, key_id, status, credit, expires_at, record, fp,
                    auth_result, created_at, result, settle_fp, resolved_at) ",
            );
            q.push_values(chunk, |mut b, h| {
                let settled = h.settled.as_ref();
                b.push_bind(&h.account)
                    .push_bind(&h.id)
                    .push_bind(&h.key)
                    .push_bind(settled.map_or("open", |s| s.0.as_str()))
                    .push_bind(h.credit)
                    .push_bind(h.expires)
                    .push_bind(&h.record)
                    .push_bind(&h.fp)
                    .push_bind(&h.auth_result)
                    .push_bind(h.created)
                    .push_bind(settled.map(|s| s.1.as_str()))
                    .push_bind(settled.and_then(|s| s.2.as_deref()))
                    .push_bind(settled.map(|s| s.3));
            });
            q.push(
                " ON CONFLICT (account_id, id) DO UPDATE SET key_id = excluded.key_id, status = excluded.status,
                   credit = excluded.credit, expires_at = excluded.expires_at, record = excluded.record,
                   fp = excluded.fp, auth_result = excluded.auth_result, created_at = excluded.created_at,
                   result = excluded.result, settle_fp = excluded.settle_fp, resolved_at = excluded.resolved_at",
            );
            q.build().execute(&mut *tx).await?;
        }
        for ((acct, hid), (record, credit)) in &self.holds_extended {
            sqlx::query(
                "UPDATE holds SET record = $3, credit = $4 WHERE account_id = $1 AND id = $2",
            )
            .bind(acct)
            .bind(hid)
            .bind(record)
            .bind(credit)
            .execute(&mut *tx)
            .await?;
        }
        for (acct, hid, status, result, fp, at) in &self.holds_settled {
            sqlx::query(
                "UPDATE holds SET status = $3, result = $4, settle_fp = $5, resolved_at = $6
                 WHERE account_id = $1 AND id = $2",
            )
            .bind(acct)
            .bind(hid)
            .bind(status)
            .bind(result)
            .bind(fp)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// What applying a batch needs from a ledger connection, per database.
trait BatchTarget {
    /// The shards of `keys` (shard, lock key) this transaction may apply now (the others:
    /// another sidecar is at them).
    async fn lock_shards(&mut self, keys: &[(u32, i64)]) -> Result<Vec<u32>, sqlx::Error>;
    async fn apply(&mut self, batch: Batch) -> Result<(), sqlx::Error>;
    /// Moves the cursors of `done` (shard, epoch, last id applied).
    async fn save_cursors(
        &mut self,
        prefix: &str,
        done: &[(u32, String, String)],
    ) -> Result<(), sqlx::Error>;
}

impl BatchTarget for sqlx::PgConnection {
    async fn lock_shards(&mut self, keys: &[(u32, i64)]) -> Result<Vec<u32>, sqlx::Error> {
        let (shards, locks): (Vec<i32>, Vec<i64>) =
            keys.iter().map(|(s, k)| (*s as i32, *k)).unzip();
        let got: Vec<i32> = sqlx::query_scalar(
            "SELECT s FROM UNNEST($1::int4[], $2::int8[]) AS t(s, k) WHERE pg_try_advisory_xact_lock(k)",
        )
        .bind(shards)
        .bind(locks)
        .fetch_all(self)
        .await?;
        Ok(got.into_iter().map(|s| s as u32).collect())
    }
    async fn apply(&mut self, batch: Batch) -> Result<(), sqlx::Error> {
        batch.write_pg(self).await
    }
    async fn save_cursors(
        &mut self,
        prefix: &str,
        done: &[(u32, String, String)],
    ) -> Result<(), sqlx::Error> {
        let shards: Vec<i32> = done.iter().map(|d| d.0 as i32).collect();
        let epochs: Vec<&str> = done.iter().map(|d| d.1.as_str()).collect();
        let lasts: Vec<&str> = done.iter().map(|d| d.2.as_str()).collect();
        sqlx::query(
            "INSERT INTO sync_cursor (prefix, shard, epoch, last_id)
             SELECT $1, s, e, l FROM UNNEST($2::int4[], $3::text[], $4::text[]) AS t(s, e, l)
             ON CONFLICT (prefix, shard) DO UPDATE SET epoch = EXCLUDED.epoch, last_id = EXCLUDED.last_id,
               updated_at = CURRENT_TIMESTAMP",
        )
        .bind(prefix)
        .bind(shards)
        .bind(epochs)
        .bind(lasts)
        .execute(self)
        .await?;
        Ok(())
    }
}

impl BatchTarget for sqlx::SqliteConnection {
    /// One sidecar per SQLite file; within it, [`Ledger::write_lock`] serializes the writers.
    async fn lock_shards(&mut self, keys: &[(u32, i64)]) -> Result<Vec<u32>, sqlx::Error> {
        Ok(keys.iter().map(|k| k.0).collect())
    }
    async fn apply(&mut self, batch: Batch) -> Result<(), sqlx::Error> {
        batch.write_lite(self).await
    }
    async fn save_cursors(
        &mut self,
        prefix: &str,
        done: &[(u32, String, String)],
    ) -> Result<(), sqlx::Error> {
        for (shard, epoch, last) in done {
            sqlx::query(
                "INSERT INTO sync_cursor (prefix, shard, epoch, last_id) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (prefix, shard) DO UPDATE SET epoch = $3, last_id = $4,
                   updated_at = CURRENT_TIMESTAMP",
            )
            .bind(prefix)
            .bind(*shard as i32)
            .bind(epoch)
            .bind(last)
            .execute(&mut *self)
            .await?;
        }
        Ok(())
    }
}

/// Drains the outbox streams of every shard into the ledger.
#[derive(Clone)]
pub struct SyncWorker {
    ledger: Ledger,
    redis: Store,
    batch: usize,
    metrics: Arc<Metrics>,
    clock: Arc<dyn crate::clock::Clock>,
    /// Per shard: the (epoch, last id) this process last saw applied; skips idle shards cheaply.
    seen: Seen,
    /// The shortest time between two passes of [`SyncWorker::run`] (`sync.min_gap_ms`).
    pub min_gap: Duration,
}

type Entries = Vec<(String, Vec<String>)>;

impl SyncWorker {
    pub fn new(
        ledger: Ledger,
        redis: Store,
        batch: usize,
        metrics: Arc<Metrics>,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Self {
        let shards = redis.keys.shards() as usize;
        Self {
            ledger,
            redis,
            batch,
            metrics,
            clock,
            seen: Arc::new((0..shards).map(|_| Mutex::new(None)).collect()),
            min_gap: Duration::ZERO,
        }
    }

    /// The shard's stream epoch, created on first use.
    pub(crate) async fn epoch(&self, shard: u32) -> Result<String, SyncError> {
        let mut conn = self.redis.conn();
        let key = self.redis.keys.epoch(shard);
        if let Some(e) = conn.get::<_, Option<String>>(&key).await? {
            return Ok(e);
        }
        let fresh = crate::apikey::new_id("ep");
        let _: bool = conn.set_nx(&key, &fresh).await?;
        Ok(conn.get::<_, Option<String>>(&key).await?.unwrap_or(fresh))
    }

    async fn read(&self, shard: u32, after: &str, count: usize) -> Result<Entries, SyncError> {
        let mut conn = self.redis.conn();
        let entries: Entries = redis::cmd("XRANGE")
            .arg(self.redis.keys.outbox(shard))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(entries)
    }

    /// The id of the newest entry in the shard's outbox, if any.
    pub async fn newest(&self, shard: u32) -> Result<Option<(String, String)>, SyncError> {
        let mut conn = self.redis.conn();
        let entries: Entries = redis::cmd("XREVRANGE")
            .arg(self.redis.keys.outbox(shard))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let epoch = self.epoch(shard).await?;
        Ok(entries.into_iter().next().map(|(id, _)| (epoch, id)))
    }

    /// Returns once no sync pass of the shard is in flight, in any process: a pass that read its
    /// entries before Redis lost its state has committed them. A cold load calls this before it
    /// reads the ledger, so such a pass cannot add to the ledger what the load did not see.
    /// (A pass that starts later reads the new epoch, or finds it changed and applies nothing.)
    pub(crate) async fn wait_for_passes(&self, shard: u32) -> Result<(), SyncError> {
        match self.ledger.db() {
            super::Db::Pg(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL lock_timeout = '5s'")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(lock_key(self.ledger.prefix(), shard))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            super::Db::Lite(_) => drop(self.ledger.write_lock().await),
        }
        Ok(())
    }

    /// Whether this process saw the shard's outbox applied up to `id` in `epoch` (no round trip).
    pub fn applied_locally(&self, shard: u32, epoch: &str, id: &str) -> bool {
        let seen = self.seen[shard as usize]
            .lock()
            .map(|g| g.clone())
            .unwrap_or(None);
        matches!(seen, Some((e, last)) if e == epoch && parse_stream_id(&last) >= parse_stream_id(id))
    }

    /// Whether the ledger has applied the shard's outbox up to `id` in `epoch`.
    pub async fn applied_through(
        &self,
        shard: u32,
        epoch: &str,
        id: &str,
    ) -> Result<bool, SyncError> {
        let row: Option<(String, String)> = on_db!(self.ledger.db(), p => sqlx::query_as(
            "SELECT epoch, last_id FROM sync_cursor WHERE prefix = $1 AND shard = $2",
        )
        .bind(self.ledger.prefix())
        .bind(shard as i32)
        .fetch_optional(p)
        .await?);
        Ok(
            matches!(row, Some((e, last)) if e == epoch && parse_stream_id(&last) >= parse_stream_id(id)),
        )
    }

    /// Applies up to one batch of the shard's outbox. Returns how many events were applied (0
    /// when there was nothing new or another sidecar holds the shard).
    pub async fn sync_shard(&self, shard: u32) -> Result<usize, SyncError> {
        match self.probe(shard).await? {
            Some(epoch) => Ok(self.sync_shards(&[(shard, epoch)], self.batch).await?.0),
            None => Ok(0),
        }
    }

    /// The shard's epoch when it may have entries this process has not seen applied; `None`
    /// when it has nothing new (one cheap read).
    async fn probe(&self, shard: u32) -> Result<Option<String>, SyncError> {
        let epoch = self.epoch(shard).await?;
        let seen = self.seen[shard as usize]
            .lock()
            .map(|g| g.clone())
            .unwrap_or(None);
        if let Some((e, last)) = &seen {
            if *e == epoch && self.read(shard, last, 1).await?.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(epoch))
    }

    /// Applies up to `per_shard` events of each of `want` (shard, epoch) in **one** ledger
    /// transaction: under load a pass writes every shard's events with a handful of statements
    /// and one commit, instead of as many transactions as shards. Returns the events applied and
    /// whether some shard had more than `per_shard`.
    async fn sync_shards(
        &self,
        want: &[(u32, String)],
        per_shard: usize,
    ) -> Result<(usize, bool), SyncError> {
        use futures::future::join_all;
        let prefix = self.ledger.prefix().to_string();
        let _writer = self.ledger.write_lock().await;
        let keys: Vec<(u32, i64)> = want
            .iter()
            .map(|(s, _)| (*s, lock_key(&prefix, *s)))
            .collect();
        let outcome = on_db!(self.ledger.db(), p => {
            let mut tx = p.begin_write().await?;
            let locked = tx.lock_shards(&keys).await?;
            let cursors: Vec<(i32, String, String)> = sqlx::query_as(
                "SELECT shard, epoch, last_id FROM sync_cursor WHERE prefix = $1",
            )
            .bind(&prefix)
            .fetch_all(&mut *tx)
            .await?;
            // Each locked shard from its cursor; a different epoch means Redis lost the stream:
            // the new one is read from its start.
            let starts: Vec<(u32, String, String)> = want
                .iter()
                .filter(|(s, _)| locked.contains(s))
                .map(|(s, epoch)| {
                    let start = cursors
                        .iter()
                        .find(|c| c.0 == *s as i32 && c.1 == *epoch)
                        .map_or_else(|| "0-0".to_string(), |c| c.2.clone());
                    (*s, epoch.clone(), start)
                })
                .collect();
            let reads = join_all(starts.iter().map(|(s, epoch, start)| async move {
                let entries = self.read(*s, start, per_shard).await?;
                // Redis lost its state between reading the epoch and the entries: they may be
                // the new stream's, which must not be labelled with the old epoch (the next pass
                // would apply them again under the new one). Skip the shard this pass.
                let same = entries.is_empty() || self.epoch(*s).await? == *epoch;
                Ok::<_, SyncError>((entries, same))
            }))
            .await;
            let mut batch = Batch::default();
            let (mut done, mut idle, mut full, mut n) = (Vec::new(), Vec::new(), false, 0);
            for ((s, epoch, start), read) in starts.into_iter().zip(reads) {
                let (entries, same) = read?;
                match entries.last().map(|(id, _)| id.clone()) {
                    None => idle.push((s, epoch, start)),
                    Some(_) if !same => {}
                    Some(last) => {
                        full |= entries.len() >= per_shard;
                        n += entries.len();
                        self.fill(&mut batch, s, &epoch, entries);
                        done.push((s, epoch, last));
                    }
                }
            }
            if done.is_empty() {
                tx.commit().await?;
                // begin, lock, cursors, commit
                self.metrics.ledger_round_trips.add(4);
            } else {
                // begin, lock, cursors, the batch, cursor update, commit
                self.metrics.ledger_round_trips.add(5 + batch.statements());
                tx.apply(batch).await?;
                tx.save_cursors(&prefix, &done).await?;
                tx.commit().await?;
            }
            Ok::<_, SyncError>((done, idle, full, n))
        });
        let (done, idle, full, n) = outcome?;
        for (s, epoch, start) in idle {
            self.remember(s, epoch, start);
        }
        if n == 0 {
            return Ok((0, false));
        }
        self.metrics.sync_events.add(n as u64);
        // Only now that the rows are durable may the streams forget them.
        join_all(done.iter().map(|(s, _, last)| async move {
            let (ms, seq) = parse_stream_id(last);
            let mut conn = self.redis.conn();
            let _: redis::RedisResult<i64> = redis::cmd("XTRIM")
                .arg(self.redis.keys.outbox(*s))
                .arg("MINID")
                .arg(format!("{ms}-{}", seq + 1))
                .query_async(&mut conn)
                .await;
        }))
        .await;
        for (s, epoch, last) in done {
            self.remember(s, epoch, last);
        }
        Ok((n, full))
    }

    /// Writes every entry of every shard's outbox into the ledger inside `tx` (event ids
    /// `<label>:<stream id>`), for a key space private to one decision (the degraded path).
    /// Returns the (account, hold) pairs the entries touched.
    pub(crate) async fn apply_all_pg(
        &self,
        tx: &mut sqlx::PgConnection,
        label: &str,
    ) -> Result<Vec<(String, String)>, SyncError> {
        let mut touched = Vec::new();
        for shard in 0..self.redis.keys.shards() {
            let entries = self.read(shard, "0-0", 10_000).await?;
            if entries.is_empty() {
                continue;
            }
            for (_, fields) in &entries {
                let ev = fields
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some("e"))
                    .and_then(|kv| kv.get(1))
                    .and_then(|p| serde_json::from_str::<Value>(p).ok());
                if let Some(ev) = ev {
                    let acct = ev["acct"].as_str().unwrap_or_default().to_string();
                    let hold = ev["hold"].as_str().unwrap_or_default().to_string();
                    touched.push((acct, hold));
                }
            }
            self.batch_of(shard, label, entries).write_pg(tx).await?;
        }
        Ok(touched)
    }

    /// Parses a shard's outbox entries into one batch of ledger rows.
    fn batch_of(&self, shard: u32, epoch: &str, entries: Entries) -> Batch {
        let mut batch = Batch::default();
        self.fill(&mut batch, shard, epoch, entries);
        batch
    }

    /// Adds a shard's outbox entries to `batch`.
    fn fill(&self, batch: &mut Batch, shard: u32, epoch: &str, entries: Entries) {
        let now = self.clock.now_ms() as i64;
        for (id, fields) in entries {
            let payload = fields
                .chunks(2)
                .find(|kv| kv.first().map(String::as_str) == Some("e"))
                .and_then(|kv| kv.get(1));
            match payload.map(|p| serde_json::from_str::<Event>(p)) {
                Some(Ok(ev)) => {
                    self.metrics
                        .sync_lag_ms
                        .observe((now - ev.at).max(0) as u64);
                    batch.push(format!("{epoch}:{id}"), shard as i32, ev);
                }
                // Scripts are the only writers; an unreadable entry is a bug. Keep it out of
                // the ledger but count it loudly rather than blocking the shard forever.
                other => {
                    self.metrics.sync_bad_events.inc();
                    tracing::error!(shard, id, ?other, "unreadable outbox entry skipped");
                }
            }
        }
    }

    fn remember(&self, shard: u32, epoch: String, last: String) {
        if let Ok(mut g) = self.seen[shard as usize].lock() {
            *g = Some((epoch, last));
        }
    }

    /// One pass over every shard; returns the number of events applied. The shards with news
    /// (probed at once) are applied together, in one ledger transaction per round.
    pub async fn sync_all(&self) -> Result<usize, SyncError> {
        use futures::future::join_all;
        let probes = join_all(
            (0..self.redis.keys.shards())
                .map(|s| async move { self.probe(s).await.map(|e| e.map(|e| (s, e))) }),
        )
        .await;
        let mut want = Vec::new();
        for p in probes {
            want.extend(p?);
        }
        if want.is_empty() {
            return Ok(0);
        }
        // A round carries at most about `batch` events over all of them.
        let per_shard = (self.batch / want.len()).max(64);
        let mut total = 0;
        loop {
            let (n, full) = self.sync_shards(&want, per_shard).await?;
            total += n;
            if !full {
                return Ok(total);
            }
        }
    }

    /// Outbox entries not yet in the ledger, over all shards (applied entries are trimmed).
    pub async fn backlog(&self) -> Result<u64, SyncError> {
        let mut conn = self.redis.conn();
        let mut total = 0u64;
        for shard in 0..self.redis.keys.shards() {
            let n: u64 = redis::cmd("XLEN")
                .arg(self.redis.keys.outbox(shard))
                .query_async(&mut conn)
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// Runs until the process ends: a pass every `interval`, sooner when woken. Between passes
    /// it measures the backlog (at most every 250 ms) for the gauge, the alert and the bound.
    pub async fn run(self, interval: Duration, wake: Arc<tokio::sync::Notify>, backlog_alert: u64) {
        let mut measured = tokio::time::Instant::now();
        let mut alerting = false;
        loop {
            let pass = self.sync_all().await;
            if measured.elapsed() >= Duration::from_millis(250) || pass.is_err() {
                measured = tokio::time::Instant::now();
                if let Ok(n) = self.backlog().await {
                    self.metrics
                        .outbox_backlog
                        .store(n, std::sync::atomic::Ordering::Relaxed);
                    if (n > backlog_alert) != alerting {
                        alerting = n > backlog_alert;
                        if alerting {
                            tracing::warn!(backlog = n, "ledger backlog above sync.backlog_alert");
                        } else {
                            tracing::info!(
                                backlog = n,
                                "ledger backlog back below sync.backlog_alert"
                            );
                        }
                    }
                }
            }
            self.metrics
                .ledger_unreachable
                .store(pass.is_err(), std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = pass {
                self.metrics.sync_errors.inc();
                tracing::warn!(error = %e, "ledger sync pass failed; will retry");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Woken by a change, the next pass still waits `min_gap`, so that under load each
            // pass carries many changes (fewer, larger ledger transactions) rather than a few.
            let gap = self.min_gap.min(interval);
            tokio::time::sleep(gap).await;
            tokio::select! {
                _ = tokio::time::sleep(interval - gap) => {}
                _ = wake.notified() => {}
            }
        }
    }
}
