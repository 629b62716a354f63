//! commit and release of holds, and the sweeper that expires holds nobody settled.

use super::{fingerprint, not_loaded, unexpected, Engine};
use crate::error::ApiError;
use crate::store::{LuaLimit, Reply, SettleArgs};
use redis::AsyncCommands;
use serde::Deserialize;
use std::time::Instant;
use tollgate_protocol::{split_hold_id, CommitRequest, Meters, Settlement};

#[derive(Deserialize)]
struct LuaSettlement {
    hold: String,
    status: String,
    credits: u64,
    #[serde(default)]
    shortfall: u64,
    #[serde(default)]
    meters: serde_json::Value,
    #[serde(default)]
    grew: Vec<Grew>,
}

/// A limit a commit took past its estimate: name, scope, meter, period, max, used after.
#[derive(Deserialize)]
struct Grew(String, String, String, String, u64, u64);

fn parse_settlement(body: &str) -> Result<LuaSettlement, ApiError> {
    serde_json::from_str(body)
        .map_err(|e| ApiError::Internal(format!("unreadable script reply: {e}")))
}

fn settlement(body: &str) -> Result<Settlement, ApiError> {
    parse_settlement(body).map(Settlement::from)
}

impl From<LuaSettlement> for Settlement {
    fn from(s: LuaSettlement) -> Self {
        // An empty Lua table encodes as `{}` or `[]`; the `credits` meter is internal.
        let mut meters: Meters = serde_json::from_value(s.meters).unwrap_or_default();
        meters.remove("credits");
        Settlement {
            hold_id: s.hold,
            status: s.status,
            credits: s.credits,
            shortfall: s.shortfall,
            meters,
        }
    }
}

/// What a commit is: its hold's usage as reported (meters, and the text counted when it came
/// as text), not its price, so that a repeat is recognised without knowing the hold's route.
fn commit_fp(req: &CommitRequest) -> String {
    fingerprint(&("commit", &req.meters, &req.output_text))
}

/// How a commit's route and model are known (see `Engine::commit`).
#[derive(Debug, Clone, Copy)]
pub enum Pricing<'a> {
    /// Read from the hold by the sidecar (release, expiry: no price at all).
    Read,
    /// Given by the commit: checked against the hold's in the commit script.
    Check(&'a str, Option<&'a str>),
    /// Unknown (the hold's record is gone): answer a replay of its settlement, change nothing.
    ReplayOnly,
}

/// What settling a hold came to.
enum Settled {
    /// The settlement, and whether it is a replay.
    Done(Settlement, bool),
    /// Nothing changed: the commit was priced with a route and model (given) that are not the
    /// hold's.
    PricedOtherwise(String, Option<String>),
}

impl Settled {
    fn done(self) -> Result<(Settlement, bool), ApiError> {
        match self {
            Settled::Done(s, replay) => Ok((s, replay)),
            Settled::PricedOtherwise(route, _) => Err(ApiError::Conflict(format!(
                "the hold was authorized for route {route:?}"
            ))),
        }
    }
}

impl Engine {
    /// Settles a hold with the actual usage. Returns the settlement and whether it is a replay.
    pub async fn commit(&self, req: CommitRequest) -> Result<(Settlement, bool), ApiError> {
        req.validate()?;
        self.check_meters(&req.meters)?;
        if req.credits > 0 {
            return Err(ApiError::Invalid(
                "credits: a commit is priced from its meters with its hold's route and model; extra credits are not accepted".into(),
            ));
        }
        // A hold is settled as it was made: priced with its own route and model, whatever the
        // commit says (one that names others is refused, so a caller cannot pick a cheaper
        // price for the usage). A commit that names its route (the filter's do) is priced with
        // it and the commit script checks it against the hold's, in the same call; one that
        // does not has the hold's read first.
        let (mut route, mut model) = match &req.route {
            Some(r) => (r.clone(), req.model.clone()),
            None => match self.hold_route(&req.hold_id).await {
                Ok(rm) => rm,
                // No record in Redis nor (yet) in the ledger: the hold is settled (its
                // tombstone answers a repeat) or unknown. Only a replay can be answered.
                Err(ApiError::NotFound(m)) => {
                    let fp = commit_fp(&req);
                    return match self
                        .settle(
                            &req.hold_id,
                            "committed",
                            &req.meters,
                            0,
                            &fp,
                            Pricing::ReplayOnly,
                        )
                        .await?
                    {
                        Settled::Done(s, true) => Ok((s, true)),
                        _ => Err(ApiError::NotFound(m)),
                    };
                }
                Err(e) => return Err(e),
            },
        };
        let checked_here = req.route.is_none();
        for _ in 0..2 {
            let (meters, credit, fp) = self.priced_commit(&req, model.as_deref(), &route).await?;
            let priced = if checked_here {
                Pricing::Read
            } else {
                Pricing::Check(route.as_str(), model.as_deref())
            };
            match self
                .settle(&req.hold_id, "committed", &meters, credit, &fp, priced)
                .await?
            {
                Settled::Done(s, replay) => return Ok((s, replay)),
                // The hold was made with another route or model: a commit naming another
                // route is refused; one that named no model is priced again with the hold's.
                Settled::PricedOtherwise(hold_route, hold_model) => {
                    if hold_route != route {
                        return Err(ApiError::Conflict(format!(
                            "route: the hold was authorized for route {hold_route:?}"
                        )));
                    }
                    if req.model.is_some() || hold_model == model {
                        return Err(ApiError::Conflict(format!(
                            "model: the hold was authorized for model {hold_model:?}"
                        )));
                    }
                    route = hold_route;
                    model = hold_model;
                }
            }
        }
        Err(ApiError::Conflict(
            "the hold's route and model changed while committing".into(),
        ))
    }

    /// A commit's meters (its output counted when it came as text), credit and fingerprint,
    /// priced with `route` and `model`.
    async fn priced_commit(
        &self,
        req: &CommitRequest,
        model: Option<&str>,
        route: &str,
    ) -> Result<(Meters, u64, String), ApiError> {
        let mut meters = req.meters.clone();
        if let Some(text) = &req.output_text {
            // No usage object: the output is counted here, with the model's tokenizer.
            if let Some(out) = meters.get_mut("output_tokens") {
                *out = crate::tokens::count_async(model, text).await;
            }
        }
        let credit = self.price(route, model, &meters, 0)?;
        meters.insert("credits".into(), credit);
        Ok((meters, credit, commit_fp(req)))
    }

    /// The route and model a hold was authorized with (from Redis, else the ledger).
    async fn hold_route(&self, hold_id: &str) -> Result<(String, Option<String>), ApiError> {
        #[derive(Deserialize)]
        struct RouteOf {
            route: Option<String>,
            model: Option<String>,
        }
        let (acct, _) = split_hold_id(hold_id)?;
        self.place(acct).await?;
        // While Redis is down (the breaker open) the commit is decided from PostgreSQL, which
        // has the hold's record too: it must not fail here first. (Redis failing this read with
        // the breaker still closed is an error, as before: the ledger may not have the hold yet,
        // and a wrong route would misprice the commit.)
        let rec: Option<String> = if self.store.breaker.closed() {
            let mut conn = self.store.conn();
            conn.hget(self.store.keys.hold(acct, hold_id), "d")
                .await
                .map_err(crate::store::StoreError::from)?
        } else {
            None
        };
        let rec = match rec {
            Some(r) => Some(r),
            None => self.ledger.hold_record(acct, hold_id).await?,
        };
        let Some(rec) = rec else {
            return Err(ApiError::NotFound(format!("hold_id: no hold {hold_id:?}")));
        };
        let r: Option<RouteOf> = serde_json::from_str(&rec).ok();
        Ok(match r {
            Some(RouteOf {
                route: Some(route),
                model,
            }) => (route, model),
            _ => (tollgate_protocol::default_route(), None),
        })
    }

    /// Gives up on the decision of `api_key` under `idempotency_key`: releases its hold, or (not
    /// made yet) makes sure it never is (`lua/release.lua`, status `cancelled`).
    pub async fn cancel(
        &self,
        req: tollgate_protocol::CancelRequest,
    ) -> Result<(Settlement, bool), ApiError> {
        req.validate()?;
        let acct = match self.resolve(Some(&req.api_key), None).await? {
            super::Resolved::Caller(c) => c.account.row.id.clone(),
            super::Resolved::Denied(_) => {
                return Err(ApiError::NotFound("api_key: no such key".into()))
            }
        };
        let hold_id = format!("{acct}/{}", req.idempotency_key);
        self.settle(
            &hold_id,
            "cancelled",
            &Meters::new(),
            0,
            "release",
            Pricing::Read,
        )
        .await?
        .done()
    }

    pub async fn release(&self, hold_id: &str) -> Result<(Settlement, bool), ApiError> {
        split_hold_id(hold_id)?;
        self.settle(
            hold_id,
            "released",
            &Meters::new(),
            0,
            "release",
            Pricing::Read,
        )
        .await?
        .done()
    }

    async fn settle(
        &self,
        hold_id: &str,
        status: &str,
        meters: &Meters,
        credit: u64,
        fp: &str,
        priced: Pricing<'_>,
    ) -> Result<Settled, ApiError> {
        self.place(split_hold_id(hold_id)?.0).await?;
        if self.redis_down().await {
            let (acct, _) = split_hold_id(hold_id)?;
            let acct = acct.to_string();
            let (hold, status, meters, fp) = (
                hold_id.to_string(),
                status.to_string(),
                meters.clone(),
                fp.to_string(),
            );
            let owned = match priced {
                Pricing::Check(r, m) => Some((r.to_string(), m.map(str::to_string))),
                _ => None,
            };
            let replay_only = matches!(priced, Pricing::ReplayOnly);
            return self
                .via_ledger(&acct, move |e| async move {
                    let priced = match (&owned, replay_only) {
                        (Some((r, m)), _) => Pricing::Check(r, m.as_deref()),
                        (None, true) => Pricing::ReplayOnly,
                        (None, false) => Pricing::Read,
                    };
                    e.settle_in_store(&hold, &status, &meters, credit, &fp, priced)
                        .await
                })
                .await;
        }
        self.hand_back_before_decision().await?;
        let (acct, _) = split_hold_id(hold_id)?;
        let epoch = self.ack_epoch(acct).await?;
        let out = self
            .settle_in_store(hold_id, status, meters, credit, fp, priced)
            .await?;
        self.until_in_ledger(acct, epoch).await?;
        Ok(out)
    }

    /// The settlement in the store this engine has (Redis, or a private key space).
    async fn settle_in_store(
        &self,
        hold_id: &str,
        status: &str,
        meters: &Meters,
        credit: u64,
        fp: &str,
        priced: Pricing<'_>,
    ) -> Result<Settled, ApiError> {
        let started = Instant::now();
        let (acct, _) = split_hold_id(hold_id)?;
        if self.directory.account(acct).await?.is_none() {
            return Err(ApiError::NotFound(format!("unknown hold {hold_id:?}")));
        }
        let out = self
            .settle_in_redis(acct, hold_id, status, meters, credit, fp, priced)
            .await;
        self.metrics
            .decision_us
            .observe(started.elapsed().as_micros() as u64);
        let (s, replay) = match out? {
            Settled::Done(s, replay) => (s, replay),
            other => return Ok(other),
        };
        if replay {
            self.metrics.idempotent_replays.inc();
        } else {
            match status {
                "committed" => self.metrics.committed.inc(),
                "released" | "cancelled" => self.metrics.released.inc(),
                _ => self.metrics.expired.inc(),
            }
            self.sync_wake.notify_one();
        }
        Ok(Settled::Done(s, replay))
    }

    #[allow(clippy::too_many_arguments)]
    async fn settle_in_redis(
        &self,
        acct: &str,
        hold_id: &str,
        status: &str,
        meters: &Meters,
        credit: u64,
        fp: &str,
        priced: Pricing<'_>,
    ) -> Result<Settled, ApiError> {
        for _ in 0..4 {
            let args = SettleArgs {
                now: self.clock.now_ms(),
                hold: hold_id,
                fp,
                meters,
                credit,
                window_ms: self.window_ms(),
                priced,
            };
            let reply = if status == "committed" {
                self.store.commit(acct, &args).await?
            } else {
                self.store.release(acct, &args, status).await?
            };
            match reply {
                Reply::Ok(body) => {
                    let s = parse_settlement(&body)?;
                    self.raise_commit_alerts(acct, &s.grew);
                    return Ok(Settled::Done(s.into(), false));
                }
                Reply::Replay(body) => return Ok(Settled::Done(settlement(&body)?, true)),
                Reply::Conflict(body) => {
                    #[derive(Deserialize)]
                    struct Made {
                        route: String,
                        model: String,
                    }
                    let m: Made = serde_json::from_str(&body)
                        .map_err(|e| ApiError::Internal(format!("unreadable script reply: {e}")))?;
                    let route = if m.route.is_empty() {
                        tollgate_protocol::default_route()
                    } else {
                        m.route
                    };
                    return Ok(Settled::PricedOtherwise(
                        route,
                        (!m.model.is_empty()).then_some(m.model),
                    ));
                }
                Reply::Resolved(body) => {
                    let st: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let was = st
                        .get("status")
                        .and_then(|s| s.as_str())
                        .unwrap_or("settled");
                    return Err(ApiError::Conflict(format!(
                        "hold {hold_id:?} is already {was}"
                    )));
                }
                Reply::Cold => self.cold_load(acct).await?,
                // Not in Redis: it may have been settled long ago (its record expired) or before
                // Redis lost its data. The ledger knows.
                Reply::Gone => {
                    return match self.ledger.hold(acct, hold_id).await? {
                        Some(h) if h.status == status && h.settle_fp.as_deref() == Some(fp) => Ok(
                            Settled::Done(settlement(h.result.as_deref().unwrap_or("{}"))?, true),
                        ),
                        Some(h) if h.status != "open" => Err(ApiError::Conflict(format!(
                            "hold {hold_id:?} is already {}",
                            h.status
                        ))),
                        _ => Err(ApiError::NotFound(format!("unknown hold {hold_id:?}"))),
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Err(not_loaded(acct))
    }

    /// A commit larger than its estimate may take a limit past a threshold: its alerts are
    /// raised now, as a request's would be.
    fn raise_commit_alerts(&self, acct: &str, grew: &[Grew]) {
        if grew.is_empty() {
            return;
        }
        let lims: Vec<LuaLimit> = grew
            .iter()
            .map(|Grew(name, scope, meter, period, max, _)| LuaLimit {
                scope: scope.clone(),
                meter: meter.clone(),
                period: period.clone(),
                amt: 0,
                max: *max,
                end: 0,
                name: name.clone(),
                mode: crate::config::LimitMode::Enforce,
            })
            .collect();
        let used: Vec<u64> = grew.iter().map(|g| g.5).collect();
        self.raise_alerts(acct, &lims, &used, None);
    }

    /// Expires every hold past its expiry, in every shard. Safe to run on several sidecars at
    /// once: a hold resolves once, whoever gets there first.
    pub async fn sweep_once(&self) -> Result<usize, ApiError> {
        let mut conn = self.store.conn();
        let mut expired = 0;
        for shard in 0..self.store.keys.shards() {
            let zkey = self.store.keys.holds(shard);
            let due: Vec<String> = conn
                .zrangebyscore_limit(&zkey, "-inf", self.clock.now_ms(), 0, 256)
                .await
                .map_err(crate::store::StoreError::from)?;
            for hold_id in due {
                let Ok((acct, _)) = split_hold_id(&hold_id) else {
                    let _: Result<i64, _> = conn.zrem(&zkey, &hold_id).await;
                    continue;
                };
                // Its keys are in this shard only once its tree is known here.
                if self.place(acct).await.is_err() {
                    continue;
                }
                let args = SettleArgs {
                    now: self.clock.now_ms(),
                    hold: &hold_id,
                    fp: "expire",
                    meters: &Meters::new(),
                    credit: 0,
                    window_ms: self.window_ms(),
                    priced: Pricing::Read,
                };
                match self.store.release(acct, &args, "expired").await? {
                    Reply::Ok(_) => {
                        expired += 1;
                        self.metrics.expired.inc();
                    }
                    // A leftover entry for a hold that no longer exists: drop it.
                    Reply::Gone | Reply::Cold => {
                        let _: Result<i64, _> = conn.zrem(&zkey, &hold_id).await;
                    }
                    _ => {}
                }
            }
        }
        if expired > 0 {
            self.sync_wake.notify_one();
        }
        Ok(expired)
    }
}
