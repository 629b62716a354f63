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
        // price for the usage).
        let (route, model, by_key) = self.hold_route(&req.hold_id).await?;
        if req.route.as_ref().is_some_and(|r| *r != route) {
            return Err(ApiError::Conflict(format!(
                "route: the hold was authorized for route {route:?}"
            )));
        }
        if req.model.is_some() && req.model != model {
            return Err(ApiError::Conflict(format!(
                "model: the hold was authorized for model {model:?}"
            )));
        }
        let mut meters = req.meters.clone();
        if let Some(text) = &req.output_text {
            // No usage object: the output is counted here, with the model's tokenizer.
            if let Some(out) = meters.get_mut("output_tokens") {
                *out = crate::tokens::count_async(model.as_deref(), text).await;
            }
        }
        let credit = self.price(&route, model.as_deref(), &meters, 0)?;
        meters.insert("credits".into(), credit);
        let fp = fingerprint(&("commit", &meters));
        // A hold the filter made (for an API key) is never asked again by a client under its
        // key (the filter's keys are its own), only by the filter's retries: its settled record
        // stays for the replay window, not a day; a repeat after that is answered from the
        // ledger (Reply::Gone below). Holds of trusted callers keep the idempotency TTL.
        let ttl_ms = if by_key {
            (self.cfg.server.replay_window_secs * 1000).min(self.idem_ttl_ms())
        } else {
            self.idem_ttl_ms()
        };
        self.settle(&req.hold_id, "committed", &meters, credit, &fp, ttl_ms)
            .await
    }

    /// The route and model a hold was authorized with (from Redis, else the ledger).
    /// The route and model a hold was authorized with, and whether it was made for an API key.
    async fn hold_route(&self, hold_id: &str) -> Result<(String, Option<String>, bool), ApiError> {
        #[derive(Deserialize)]
        struct RouteOf {
            route: Option<String>,
            model: Option<String>,
            #[serde(default)]
            key: Option<String>,
        }
        let (acct, _) = split_hold_id(hold_id)?;
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
                key,
            }) => (route, model, key.is_some()),
            _ => (tollgate_protocol::default_route(), None, false),
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
            self.idem_ttl_ms(),
        )
        .await
    }

    pub async fn release(&self, hold_id: &str) -> Result<(Settlement, bool), ApiError> {
        split_hold_id(hold_id)?;
        self.settle(
            hold_id,
            "released",
            &Meters::new(),
            0,
            "release",
            self.idem_ttl_ms(),
        )
        .await
    }

    async fn settle(
        &self,
        hold_id: &str,
        status: &str,
        meters: &Meters,
        credit: u64,
        fp: &str,
        ttl_ms: u64,
    ) -> Result<(Settlement, bool), ApiError> {
        if self.redis_down().await {
            let (acct, _) = split_hold_id(hold_id)?;
            let acct = acct.to_string();
            let (hold, status, meters, fp) = (
                hold_id.to_string(),
                status.to_string(),
                meters.clone(),
                fp.to_string(),
            );
            return self
                .via_ledger(&acct, move |e| async move {
                    e.settle_in_store(&hold, &status, &meters, credit, &fp, ttl_ms)
                        .await
                })
                .await;
        }
        self.hand_back_before_decision().await?;
        let (acct, _) = split_hold_id(hold_id)?;
        let epoch = self.ack_epoch(acct).await?;
        let out = self
            .settle_in_store(hold_id, status, meters, credit, fp, ttl_ms)
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
        ttl_ms: u64,
    ) -> Result<(Settlement, bool), ApiError> {
        let started = Instant::now();
        let (acct, _) = split_hold_id(hold_id)?;
        if self.directory.account(acct).await?.is_none() {
            return Err(ApiError::NotFound(format!("unknown hold {hold_id:?}")));
        }
        let out = self
            .settle_in_redis(acct, hold_id, status, meters, credit, fp, ttl_ms)
            .await;
        self.metrics
            .decision_us
            .observe(started.elapsed().as_micros() as u64);
        let (s, replay) = out?;
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
        Ok((s, replay))
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
        ttl_ms: u64,
    ) -> Result<(Settlement, bool), ApiError> {
        for _ in 0..4 {
            let args = SettleArgs {
                now: self.clock.now_ms(),
                hold: hold_id,
                fp,
                meters,
                credit,
                idem_ttl_ms: ttl_ms,
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
                    return Ok((s.into(), false));
                }
                Reply::Replay(body) => return Ok((settlement(&body)?, true)),
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
                        Some(h) if h.status == status && h.settle_fp.as_deref() == Some(fp) => {
                            Ok((settlement(h.result.as_deref().unwrap_or("{}"))?, true))
                        }
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
                let args = SettleArgs {
                    now: self.clock.now_ms(),
                    hold: &hold_id,
                    fp: "expire",
                    meters: &Meters::new(),
                    credit: 0,
                    idem_ttl_ms: self.idem_ttl_ms(),
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
