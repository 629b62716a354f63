//! authorize (hold), consume (charge now) and check (change nothing).

use super::{fingerprint, not_loaded, unexpected, Caller, Engine, Resolved};
use crate::error::ApiError;
use crate::store::{Reply, SpendArgs};
use serde::Deserialize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tollgate_protocol::{Decision, DenyReason, LimitState, SpendRequest};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Authorize,
    Consume,
    Check,
}

impl Op {
    /// The ledger kind an idempotency key of this operation is recorded under.
    fn kind(self) -> &'static str {
        match self {
            Op::Authorize => "hold",
            Op::Consume => "consume",
            Op::Check => "check",
        }
    }
}

/// What authorize / consume / check (and extend) scripts answer (see `lua/`).
#[derive(Deserialize)]
pub(super) struct LuaDecision {
    #[serde(default)]
    hold: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    reason: Option<DenyReason>,
    #[serde(default)]
    limit: Option<LimitState>,
    #[serde(default)]
    credits: u64,
    #[serde(default)]
    balance: Option<u64>,
    /// Each limit's used amount after an admitted request (what alerts are computed from).
    #[serde(default)]
    used: Vec<u64>,
    /// Shadow limits that would have refused the request.
    #[serde(default)]
    shadow: Vec<String>,
    /// Soft limits past their max: (name, by how much).
    #[serde(default)]
    over: Vec<(String, u64)>,
}

/// What the caller is charged for: the fingerprint of a spend request.
#[derive(serde::Serialize)]
struct SpendPrint<'a> {
    op: &'static str,
    key: Option<&'a str>,
    route: &'a str,
    model: Option<&'a str>,
    meters: &'a tollgate_protocol::Meters,
    credits: u64,
    resource: Option<&'a tollgate_protocol::Resource>,
}

impl Engine {
    pub async fn authorize(&self, req: SpendRequest) -> Result<(Decision, bool), ApiError> {
        self.spend(Op::Authorize, req).await
    }

    pub async fn consume(&self, req: SpendRequest) -> Result<(Decision, bool), ApiError> {
        self.spend(Op::Consume, req).await
    }

    pub async fn check(&self, req: SpendRequest) -> Result<Decision, ApiError> {
        Ok(self.spend(Op::Check, req).await?.0)
    }

    /// Returns the decision and whether it is a replay of an earlier identical request.
    async fn spend(&self, op: Op, req: SpendRequest) -> Result<(Decision, bool), ApiError> {
        let started = Instant::now();
        req.validate(op != Op::Check)?;
        if op != Op::Check {
            self.refuse_if_backlog_full()?;
        }
        self.check_meters(&req.meters)?;
        let caller = match self
            .resolve(req.api_key.as_deref(), req.account.as_deref())
            .await?
        {
            Resolved::Denied(d) => return Ok((d, false)),
            Resolved::Caller(c) => c,
        };
        let credit = self.price(&req.route, req.model.as_deref(), &req.meters, req.credits)?;
        let out = self.spend_as(op, &req, &caller, credit).await;
        self.metrics
            .decision_us
            .observe(started.elapsed().as_micros() as u64);
        let (d, replay, epoch) = out?;
        if d.allowed {
            self.until_in_ledger(&caller.account.row.id, epoch).await?;
        }
        if replay {
            self.metrics.idempotent_replays.inc();
        } else if op != Op::Check {
            match d.reason {
                None if op == Op::Consume => {
                    self.metrics.allowed.inc();
                    self.metrics.consumed.inc();
                }
                None => self.metrics.allowed.inc(),
                Some(DenyReason::Limit) => self.metrics.denied_limit.inc(),
                Some(DenyReason::Credits) => self.metrics.denied_credits.inc(),
                Some(_) => self.metrics.denied_auth.inc(),
            }
            if d.allowed {
                self.sync_wake.notify_one();
            }
        }
        Ok((d, replay))
    }

    /// The decision, from Redis or (Redis down) from PostgreSQL, with the outbox epoch to
    /// confirm it against under `sync.ack_after_ledger` (none from PostgreSQL: the change is in
    /// the ledger already).
    async fn spend_as(
        &self,
        op: Op,
        req: &SpendRequest,
        caller: &Caller,
        credit: u64,
    ) -> Result<(Decision, bool, Option<String>), ApiError> {
        if self.redis_down().await {
            let (req, caller) = (req.clone(), caller.clone());
            let acct = caller.account.row.id.clone();
            let (d, replay) = self
                .via_ledger(&acct, move |e| async move {
                    e.spend_in_store(op, &req, &caller, credit).await
                })
                .await?;
            return Ok((d, replay, None));
        }
        let epoch = match op {
            Op::Check => None,
            _ => self.ack_epoch(&caller.account.row.id).await?,
        };
        self.hand_back_before_decision().await?;
        let (d, replay) = self.spend_in_store(op, req, caller, credit).await?;
        Ok((d, replay, epoch))
    }

    /// The decision in the store this engine has (Redis, or a private key space).
    async fn spend_in_store(
        &self,
        op: Op,
        req: &SpendRequest,
        caller: &Caller,
        credit: u64,
    ) -> Result<(Decision, bool), ApiError> {
        let mut fresh: Option<Caller> = None;
        let acct = caller.account.row.id.as_str();
        let key_id = caller.key.as_ref().map(|k| k.id.as_str());
        let fp = fingerprint(&SpendPrint {
            op: op.kind(),
            key: key_id,
            route: &req.route,
            model: req.model.as_deref(),
            meters: &req.meters,
            credits: credit,
            resource: req.resource.as_ref(),
        });
        let hold_id = format!("{acct}/{}", req.idempotency_key);
        // Redis keeps a settled request's tombstone for the replay window only. A key the
        // filter made (`tg-`: unguessable and never used twice) has no repeat after it; any
        // other key may (a client's `Idempotency-Key`, a trusted caller's), so the ledger is
        // asked first whether it was used — an index lookup, answered as a replay if so.
        // While the ledger is unreachable the lookup is skipped, not waited on: Redis still
        // answers every repeat within the replay window (and after a cold load, `recheck`
        // asks the ledger and fails closed, as before).
        let mut checked = false;
        let unreachable = &self.metrics.ledger_unreachable;
        if op != Op::Check && !filter_key(req) && !unreachable.load(Relaxed) {
            self.metrics.ledger_idempotency_lookups.inc();
            match self
                .ledger_answer(acct, op.kind(), &req.idempotency_key, &fp)
                .await
            {
                Ok(Some(body)) => {
                    let now = self.clock.now_ms();
                    return Ok((self.decision(acct, parse_decision(&body)?, now), true));
                }
                Ok(None) => checked = true,
                Err(ApiError::Conflict(m)) => return Err(ApiError::Conflict(m)),
                Err(e) => {
                    unreachable.store(true, Relaxed);
                    tracing::warn!(error = %e, "ledger lookup of an idempotency key failed; deciding from Redis");
                }
            }
        }
        for _ in 0..4 {
            let caller = fresh.as_ref().unwrap_or(caller);
            // Periods are computed per attempt: a cold load may have taken a while.
            let now = self.clock.now_ms();
            let lims = self.limits_for(caller, &req.meters, credit, now, op != Op::Consume)?;
            let args = SpendArgs {
                now,
                acct,
                key: key_id,
                idem: &req.idempotency_key,
                fp: &fp,
                checked,
                credit,
                meters: &req.meters,
                lims: &lims,
                route: &req.route,
                model: req.model.as_deref(),
                resource: req.resource.as_ref(),
                hold: (op == Op::Authorize).then_some(hold_id.as_str()),
                exp: now + self.cfg.server.hold_ttl_secs * 1000,
                idem_ttl_ms: self.idem_ttl_ms(),
                window_ms: self.window_ms(),
                version: caller.account.row.version,
                correlation_id: req.correlation_id.as_deref(),
            };
            let reply = match op {
                Op::Authorize => self.store.authorize(&args).await?,
                Op::Consume => self.store.consume(&args).await?,
                Op::Check => self.store.check(&args).await?,
            };
            match reply {
                Reply::Ok(body) => {
                    let lua = parse_decision(&body)?;
                    if op != Op::Check {
                        self.metrics.shadow_denials.add(lua.shadow.len() as u64);
                        self.metrics.soft_overages.add(lua.over.len() as u64);
                        self.raise_alerts(acct, &lims, &lua.used, None);
                        if let Some(balance) = lua.balance {
                            self.check_low_balance(&caller.account, lua.credits, balance);
                        }
                    }
                    return Ok((self.decision(acct, lua, now), false));
                }
                Reply::Replay(body) => {
                    return Ok((self.decision(acct, parse_decision(&body)?, now), true))
                }
                Reply::Deny(body) => {
                    let d = self.decision(acct, parse_decision(&body)?, now);
                    match (d.reason, &d.limit, op == Op::Check) {
                        (Some(DenyReason::Limit), Some(l), false) => {
                            self.raise_alerts(acct, &lims, &[], Some(&l.name))
                        }
                        (Some(DenyReason::Credits), _, false) => self.raise_balance_alert(
                            &caller.account,
                            credit,
                            d.balance.unwrap_or(0),
                        ),
                        _ => {}
                    }
                    return Ok((d, false));
                }
                Reply::Cold => self.cold_load(acct).await?,
                // Another sidecar changed the account (see `Engine::publish_version`): resolve
                // the caller again from the ledger, plan included.
                Reply::Stale => {
                    self.metrics.stale_rereads.inc();
                    self.directory.forget_account(acct);
                    self.directory.forget_keys();
                    // A change above it (a parent's limits, plan, `disabled`) is announced on
                    // this account's version too: read its parents again as well.
                    for a in &fresh.as_ref().unwrap_or(caller).ancestors {
                        self.directory.forget_account(&a.row.id);
                    }
                    match self
                        .resolve(req.api_key.as_deref(), req.account.as_deref())
                        .await?
                    {
                        Resolved::Caller(c) => fresh = Some(c),
                        Resolved::Denied(d) => return Ok((d, false)),
                    }
                }
                Reply::Recheck => {
                    if let Some(body) = self
                        .recheck(acct, op.kind(), &req.idempotency_key, &fp)
                        .await?
                    {
                        return Ok((self.decision(acct, parse_decision(&body)?, now), true));
                    }
                    checked = true;
                }
                Reply::Conflict(_) => {
                    return Err(ApiError::Conflict(format!(
                        "idempotency_key {:?} was already used for a different request",
                        req.idempotency_key
                    )))
                }
                other => return Err(unexpected(other)),
            }
        }
        Err(not_loaded(acct))
    }

    pub(super) fn decision(&self, acct: &str, d: LuaDecision, now: u64) -> Decision {
        let allowed = d.reason.is_none();
        let retry_after_s = match (d.reason, &d.limit) {
            (Some(DenyReason::Limit), Some(l)) if l.reset_ms > 0 => {
                Some(l.reset_ms.saturating_sub(now).div_ceil(1000).max(1))
            }
            // A concurrency limit has no reset: a request in flight may end any moment.
            (Some(DenyReason::Limit), Some(l)) if l.name.ends_with(":concurrent") => Some(1),
            _ => None,
        };
        Decision {
            allowed,
            status: d.reason.map_or(200, |r| r.http_status()),
            reason: d.reason,
            account: Some(acct.to_string()),
            hold_id: d.hold,
            hold_expires_ms: d.exp,
            limit: d.limit,
            retry_after_s,
            credits: d.credits,
            balance: d.balance,
            shadow: d.shadow,
            over: d
                .over
                .into_iter()
                .map(|(limit, by)| tollgate_protocol::Overage { limit, by })
                .collect(),
        }
    }
}

/// Whether the request's idempotency key is one the filter made for it: `tg-` and an API key
/// (the filter's callouts name the key; trusted callers name an account). Such a key is never
/// used again after its retries, so its tombstone is all the replay protection it needs.
fn filter_key(req: &SpendRequest) -> bool {
    req.api_key.is_some() && req.idempotency_key.starts_with("tg-")
}

pub(super) fn parse_decision(body: &str) -> Result<LuaDecision, ApiError> {
    serde_json::from_str(body)
        .map_err(|e| ApiError::Internal(format!("unreadable script reply: {e}")))
}
