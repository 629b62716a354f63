//! Threshold alerts: when a request takes a limit past one of its thresholds (80 %, 95 %, 100 %
//! by default, per meter configurable) or is refused by it, an alert is raised — once per
//! account, limit scope, meter, window period and level, however many sidecars see it (the
//! ledger's primary key decides) — recorded in the ledger, counted in the metrics, and POSTed to
//! `alerts.webhook_url` (signed, retried until delivered or `alerts.max_attempts`).
//!
//! Delivery is at least once: a receiver dedupes on the alert's `id`. A commit larger than its
//! estimate raises the levels it crossed at the commit (the script answers the limits that grew).
//! Every level at or below the used amount is raised if this sidecar has not seen it raised (a
//! set in memory; the ledger decides across sidecars). With `alerts.low_balance`, a spend that
//! leaves fewer credits raises `low_balance` once a day, before a 402 raises `balance`.

use super::{Engine, Remembered};
use crate::ledger::billing::AlertRow;
use crate::store::LuaLimit;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// What every sidecar keeps for alerts: the ones it knows were raised, and an HTTP client.
pub struct AlertState {
    raised: Remembered,
    client: reqwest::Client,
}

impl Default for AlertState {
    fn default() -> Self {
        Self {
            raised: Remembered::new(100_000),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }
}

/// `warning`, `critical` or `exhausted`, from a level in percent.
pub fn severity(level: i32) -> &'static str {
    match level {
        100.. => "exhausted",
        90..=99 => "critical",
        _ => "warning",
    }
}

/// The body POSTed to the alert webhook.
#[derive(Debug, Serialize)]
struct AlertMessage<'a> {
    id: String,
    account: &'a str,
    limit: &'a str,
    scope: &'a str,
    meter: &'a str,
    period: &'a str,
    level: i32,
    severity: &'static str,
    used: i64,
    max: i64,
    at_ms: i64,
}

fn alert_id(a: &AlertRow) -> String {
    format!(
        "{}/{}/{}/{}/{}",
        a.account_id, a.scope, a.meter, a.period, a.level
    )
}

impl Engine {
    /// After a decision: the alerts it raises. `used` is each limit's used amount after an
    /// admitted request (same order as `lims`); `denied` names the limit that refused one.
    pub(crate) fn raise_alerts(
        &self,
        acct: &str,
        lims: &[LuaLimit],
        used: &[u64],
        denied: Option<&str>,
    ) {
        let now = self.clock.now_ms() as i64;
        let mut new = Vec::new();
        for (i, l) in lims.iter().enumerate() {
            // Concurrency is not consumption (what is held now, given back at settle), a sliding
            // window has no period to raise an alert once in, and a shadow limit is not in
            // effect: none of them raises threshold alerts.
            if l.max == 0
                || l.period == "c"
                || l.period.starts_with("s:")
                || l.mode == crate::config::LimitMode::Shadow
            {
                continue;
            }
            // A refusal by this limit counts as the limit reached. Every level at or below the
            // used amount is raised if it was not yet — not only the one this request crossed:
            // a commit larger than its hold may have crossed one with no request to see it.
            let after = match (denied, used.get(i)) {
                (Some(name), _) if name == l.name => l.max,
                (None, Some(u)) => *u,
                _ => continue,
            };
            for &level in self.cfg.alerts.thresholds_for(&l.meter) {
                let at = (u128::from(l.max) * u128::from(level)).div_ceil(100) as u64;
                if after < at {
                    continue;
                }
                let row = AlertRow {
                    account_id: acct.to_string(),
                    scope: l.scope.clone(),
                    meter: l.meter.clone(),
                    period: l.period.clone(),
                    level: level as i32,
                    name: l.name.clone(),
                    used: after.min(i64::MAX as u64) as i64,
                    max: l.max as i64,
                    at_ms: now,
                    delivered_at_ms: None,
                    attempts: 0,
                    last_error: None,
                };
                if self.alerts.raised.insert(&alert_id(&row)) {
                    new.push(row);
                }
            }
        }
        self.record_alerts(new);
    }

    /// A request refused for credit: the account's balance is exhausted. Raised once per day
    /// (the account's day) as `balance` at level 100, with `used` = the credit asked for and
    /// `max` = the balance there was.
    pub(crate) fn raise_balance_alert(
        &self,
        account: &crate::directory::Account,
        wanted: u64,
        balance: u64,
    ) {
        self.raise_daily_credit_alert(account, "balance", 100, wanted, balance);
    }

    /// An admitted spend of `spent` credits left `balance`: below `alerts.low_balance` it raises
    /// `low_balance` at level 80 (a warning, before the account runs out) once per day, with
    /// `used` = the balance left and `max` = the threshold.
    pub(crate) fn check_low_balance(
        &self,
        account: &crate::directory::Account,
        spent: u64,
        balance: u64,
    ) {
        let floor = self.cfg.alerts.low_balance;
        if floor > 0 && spent > 0 && balance < floor {
            self.raise_daily_credit_alert(account, "low_balance", 80, balance, floor);
        }
    }

    /// A credit alert (scope `b:<account>`, meter `credits`) keyed by the account's day.
    fn raise_daily_credit_alert(
        &self,
        account: &crate::directory::Account,
        name: &str,
        level: i32,
        used: u64,
        max: u64,
    ) {
        let now = self.clock.now_ms();
        let day = crate::windows::current_period(
            crate::windows::Window::Day,
            now,
            account.tz,
            &self.windows,
            account.row.billing_anchor_day as u32,
        );
        let row = AlertRow {
            account_id: account.row.id.clone(),
            scope: format!("b:{}", account.row.id),
            meter: "credits".into(),
            period: day.id,
            level,
            name: name.into(),
            used: used.min(i64::MAX as u64) as i64,
            max: max.min(i64::MAX as u64) as i64,
            at_ms: now as i64,
            delivered_at_ms: None,
            attempts: 0,
            last_error: None,
        };
        if self.alerts.raised.insert(&alert_id(&row)) {
            self.record_alerts(vec![row]);
        }
    }

    /// Records new alerts (once: the ledger's primary key decides), counts and delivers them,
    /// off the request's path.
    fn record_alerts(&self, new: Vec<AlertRow>) {
        if new.is_empty() {
            return;
        }
        let e = self.delivery();
        tokio::spawn(async move {
            for row in new {
                match e.ledger.insert_alert(&row).await {
                    Ok(true) => {
                        match severity(row.level) {
                            "exhausted" => e.metrics.alerts_exhausted.inc(),
                            "critical" => e.metrics.alerts_critical.inc(),
                            _ => e.metrics.alerts_warning.inc(),
                        }
                        tracing::info!(account = %row.account_id, limit = %row.name, period = %row.period, level = row.level, "alert raised");
                        e.deliver(&row).await;
                    }
                    Ok(false) => {}
                    Err(err) => {
                        // Forget it so the next crossing request tries again.
                        e.alerts.raised.forget(&alert_id(&row));
                        tracing::warn!(error = %err, "alert not recorded");
                    }
                }
            }
        });
    }

    fn delivery(&self) -> Delivery {
        Delivery {
            ledger: self.ledger.clone(),
            metrics: Arc::clone(&self.metrics),
            alerts: Arc::clone(&self.alerts),
            cfg: Arc::clone(&self.cfg),
            clock: Arc::clone(&self.clock),
        }
    }

    /// Retries alerts not delivered yet (a failed webhook, a sidecar that stopped).
    pub async fn deliver_alerts(&self) {
        if self.cfg.alerts.webhook_url.is_none() {
            return;
        }
        let d = self.delivery();
        let max = self.cfg.alerts.max_attempts as i32;
        match self.ledger.undelivered_alerts(max, 100).await {
            Ok(rows) => {
                for a in rows {
                    d.deliver(&a).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "undelivered alerts not read"),
        }
    }
}

/// What recording and delivering an alert needs, detached from the request that raised it.
struct Delivery {
    ledger: crate::ledger::Ledger,
    metrics: Arc<crate::metrics::Metrics>,
    alerts: Arc<AlertState>,
    cfg: Arc<crate::config::Config>,
    clock: Arc<dyn crate::clock::Clock>,
}

impl Delivery {
    /// POSTs one alert to the webhook and records the attempt. Without a webhook it is done.
    async fn deliver(&self, a: &AlertRow) {
        let Some(url) = &self.cfg.alerts.webhook_url else {
            return;
        };
        let msg = AlertMessage {
            id: alert_id(a),
            account: &a.account_id,
            limit: &a.name,
            scope: &a.scope,
            meter: &a.meter,
            period: &a.period,
            level: a.level,
            severity: severity(a.level),
            used: a.used,
            max: a.max,
            at_ms: a.at_ms,
        };
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        let mut req = self
            .alerts
            .client
            .post(url)
            .header("content-type", "application/json");
        if let Some(secret) = &self.cfg.alerts.webhook_secret {
            let t = (self.clock.now_ms() / 1000) as i64;
            // The scheme Stripe signs its webhooks with: `t=<unix s>,v1=<hex HMAC-SHA256 of
            // "<t>.<body>">`, so receivers can verify it with the same code.
            req = req.header(
                "tollgate-signature",
                crate::webhooks::sign_stripe(&body, secret, t),
            );
        }
        let outcome = match req.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("webhook answered {}", r.status())),
            Err(e) => Err(format!("webhook unreachable: {e}")),
        };
        let now = self.clock.now_ms() as i64;
        let marked = match &outcome {
            Ok(()) => {
                self.metrics.alerts_delivered.inc();
                self.ledger.mark_alert(a, Some(now), None).await
            }
            Err(err) => {
                self.metrics.alert_delivery_errors.inc();
                tracing::warn!(account = %a.account_id, limit = %a.name, error = %err, "alert delivery failed; will retry");
                self.ledger.mark_alert(a, None, Some(err)).await
            }
        };
        if let Err(e) = marked {
            tracing::warn!(error = %e, "alert delivery not recorded");
        }
    }
}
