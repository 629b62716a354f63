//! extend: raise an open hold's estimate (a stream that outgrew its hold) — `lua/extend.lua`.
//!
//! The caller names new totals; the sidecar prices the hold at them (with the hold's own route
//! and model) and the script checks and charges only what they add, against the same counters
//! and the same balance as the hold's authorize. Absolute totals make a retry harmless.

use super::spend::{parse_decision, LuaDecision};
use super::Engine;
use crate::error::ApiError;
use crate::store::Reply;
use serde::Deserialize;
use tollgate_protocol::{split_hold_id, Decision, ExtendRequest, Meters};

/// What an extension needs of the hold's record.
#[derive(Deserialize)]
struct HoldOf {
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    meters: Meters,
}

impl Engine {
    pub async fn extend(&self, req: ExtendRequest) -> Result<Decision, ApiError> {
        req.validate()?;
        self.check_meters(&req.meters)?;
        let (acct, _) = split_hold_id(&req.hold_id)?;
        self.place(acct).await?;
        if self.redis_down().await {
            return Err(ApiError::Unavailable(
                "holds are extended in Redis only; it is unreachable (retry shortly)".into(),
            ));
        }
        for _ in 0..3 {
            let Some(hold) = self.open_hold(acct, &req.hold_id).await? else {
                return Err(self.no_open_hold(acct, &req.hold_id).await);
            };
            let route = hold
                .route
                .clone()
                .unwrap_or_else(tollgate_protocol::default_route);
            let mut totals = hold.meters.clone();
            for (m, t) in &req.meters {
                let e = totals.entry(m.clone()).or_insert(0);
                *e = (*e).max(*t);
            }
            totals.remove("credits");
            let credit = self.price(&route, hold.model.as_deref(), &totals, 0)?;
            let now = self.clock.now_ms();
            let reply = self
                .store
                .extend(
                    acct,
                    &req.hold_id,
                    &route,
                    hold.model.as_deref(),
                    credit,
                    &totals,
                    now,
                )
                .await?;
            match reply {
                Reply::Ok(body) | Reply::Deny(body) => {
                    let lua: LuaDecision = parse_decision(&body)?;
                    let d = self.decision(acct, lua, now);
                    if d.allowed {
                        self.metrics.extended.inc();
                        self.sync_wake.notify_one();
                    }
                    return Ok(d);
                }
                Reply::Cold => self.cold_load(acct).await?,
                // Settled or gone between the read and the script.
                Reply::Gone | Reply::Resolved(_) => {
                    return Err(self.no_open_hold(acct, &req.hold_id).await)
                }
                // The record changed under us (it cannot change route): read it again.
                Reply::Conflict(_) => continue,
                other => return Err(super::unexpected(other)),
            }
        }
        Err(ApiError::Conflict(
            "the hold changed while it was being extended; retry".into(),
        ))
    }

    /// The open hold's record in Redis, if it is there (after a cold load when Redis lost the
    /// account: its open holds come back with it).
    async fn open_hold(&self, acct: &str, hold_id: &str) -> Result<Option<HoldOf>, ApiError> {
        let mut conn = self.store.conn();
        let key = self.store.keys.hold(acct, hold_id);
        let mut rec: Option<String> = redis::AsyncCommands::hget(&mut conn, &key, "d")
            .await
            .map_err(crate::store::StoreError::from)?;
        if rec.is_none() {
            let present: bool =
                redis::AsyncCommands::exists(&mut conn, self.store.keys.account(acct))
                    .await
                    .map_err(crate::store::StoreError::from)?;
            if !present {
                self.cold_load(acct).await?;
                rec = redis::AsyncCommands::hget(&mut conn, &key, "d")
                    .await
                    .map_err(crate::store::StoreError::from)?;
            }
        }
        Ok(rec.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// 409 for a hold that is settled (its tombstone in Redis, or its row in the ledger), 404
    /// for one neither knows.
    async fn no_open_hold(&self, acct: &str, hold_id: &str) -> ApiError {
        let field = crate::store::keys::tomb_field(hold_id);
        let (cur, prev, _) =
            self.store
                .keys
                .tombs(acct, &field, self.clock.now_ms(), self.window_ms());
        let mut conn = self.store.conn();
        for bucket in [cur, prev] {
            let t: Result<Option<String>, _> =
                redis::AsyncCommands::hget(&mut conn, bucket, &field).await;
            if matches!(t, Ok(Some(_))) {
                return ApiError::Conflict(format!(
                    "hold_id: {hold_id:?} is settled; only an open hold can be extended"
                ));
            }
        }
        match self.ledger.hold_record(acct, hold_id).await {
            Ok(Some(_)) => ApiError::Conflict(format!(
                "hold_id: {hold_id:?} is settled; only an open hold can be extended"
            )),
            Ok(None) => ApiError::NotFound(format!("hold_id: no hold {hold_id:?}")),
            Err(e) => e.into(),
        }
    }
}
