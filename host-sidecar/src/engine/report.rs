//! Operator reports that compare or summarise: reconciliation of Redis against the ledger, top
//! consumers of a meter in a window.

use super::Engine;
use crate::error::ApiError;
use crate::ledger::billing::TopRow;
use crate::windows::Window;
use serde::{Deserialize, Serialize};

/// One value on which Redis and the ledger disagree.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Difference {
    pub account: String,
    /// `counter <scope> <meter> <period>` or `grant <id>`.
    pub what: String,
    pub ledger: i64,
    pub redis: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reconciliation {
    /// Accounts whose state is in Redis and was compared.
    pub accounts_compared: u64,
    /// Accounts not loaded in Redis (nothing to compare: Redis would load them from the ledger).
    pub accounts_not_loaded: u64,
    pub values_compared: u64,
    /// Ledger events still to sync when the comparison ran (non-zero makes differences expected).
    pub backlog: u64,
    pub differences: Vec<Difference>,
}

impl Engine {
    /// Compares Redis with the ledger — each current window's used amount and each grant's
    /// remaining credit — for one account or all of them, after draining the outbox. Zero
    /// differences is invariant 10.
    pub async fn reconcile(&self, account: Option<&str>) -> Result<Reconciliation, ApiError> {
        for _ in 0..50 {
            if self.sync.sync_all().await? == 0 {
                break;
            }
        }
        let backlog = self.sync.backlog().await?;
        let mut out = Reconciliation {
            accounts_compared: 0,
            accounts_not_loaded: 0,
            values_compared: 0,
            backlog,
            differences: Vec::new(),
        };
        let ids: Vec<String> = match account {
            Some(a) => {
                tollgate_protocol::validate_id("account", a)?;
                vec![a.to_string()]
            }
            None => {
                let mut ids = Vec::new();
                let mut after = String::new();
                loop {
                    let page = self.ledger.accounts_page(&after, 1000).await?;
                    let Some(last) = page.last() else { break };
                    after = last.id.clone();
                    ids.extend(page.into_iter().map(|a| a.id));
                }
                for p in self.ledger.pools().await? {
                    ids.push(format!("pool:{}", p.id));
                }
                ids
            }
        };
        let now = self.clock.now_ms() as i64;
        let mut conn = self.store.conn();
        for acct in ids {
            let loaded: bool =
                redis::AsyncCommands::exists(&mut conn, self.store.keys.account(&acct))
                    .await
                    .map_err(crate::store::StoreError::from)?;
            if !loaded {
                out.accounts_not_loaded += 1;
                continue;
            }
            out.accounts_compared += 1;
            for (scope, meter, period, used, end) in self.ledger.usage_of(&acct).await? {
                if end != 0 && end <= now {
                    continue;
                }
                let key = self.store.keys.counter(&acct, &scope, &meter, &period);
                let r: Option<i64> = redis::AsyncCommands::get(&mut conn, key)
                    .await
                    .map_err(crate::store::StoreError::from)?;
                out.values_compared += 1;
                if r.unwrap_or(0) != used {
                    out.differences.push(Difference {
                        account: acct.clone(),
                        what: format!("counter {scope} {meter} {period}"),
                        ledger: used,
                        redis: r.unwrap_or(0),
                    });
                }
            }
            for g in self.ledger.grants_of(&acct).await? {
                if g.expires_at_ms.is_some_and(|e| e <= now) {
                    continue;
                }
                let r: Option<i64> = redis::AsyncCommands::hget(
                    &mut conn,
                    self.store.keys.grant_remaining(&acct),
                    &g.grant_id,
                )
                .await
                .map_err(crate::store::StoreError::from)?;
                out.values_compared += 1;
                if r.unwrap_or(0) != g.remaining {
                    out.differences.push(Difference {
                        account: acct.clone(),
                        what: format!("grant {}", g.grant_id),
                        ledger: g.remaining,
                        redis: r.unwrap_or(0),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The accounts that used the most of `meter` in a window: `period` as stored (e.g.
    /// `d:2026-12-01`), or the current period of `window` (computed in UTC).
    pub async fn top(
        &self,
        meter: &str,
        window: Option<Window>,
        period: Option<&str>,
        limit: i64,
    ) -> Result<(String, Vec<TopRow>), ApiError> {
        if !self.cfg.is_meter(meter) {
            return Err(ApiError::Invalid(format!(
                "meter: {meter:?} is not a declared meter"
            )));
        }
        let period = match (period, window) {
            (Some(p), _) => {
                tollgate_protocol::validate_id("period", p)?;
                p.to_string()
            }
            (None, Some(w)) => {
                crate::windows::current_period(
                    w,
                    self.clock.now_ms(),
                    chrono_tz::Tz::UTC,
                    &self.windows,
                    1,
                )
                .id
            }
            (None, None) => {
                return Err(ApiError::Invalid(
                    "window: give a window (day, month, ...) or a period".into(),
                ))
            }
        };
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::Invalid("limit: must be 1..=1000".into()));
        }
        let rows = self.ledger.top(meter, &period, limit).await?;
        Ok((period, rows))
    }
}
