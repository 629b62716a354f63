//! The billing side: subscriptions (by API or by billing-provider webhooks), the plans' included
//! credits granted once per period, credit that lapses (expiry) or is revoked (refund).
//!
//! A subscription change moves the account to its effective plan — the subscribed plan while
//! the subscription is entitled (active, trialing, past due), else `billing.fallback_plan` — in
//! one ledger transaction that also records the provider's event, and bumps the account's
//! version, so every sidecar applies the new plan's limits on its next request. Events carry
//! the provider's time: a change older than the one applied is recorded as `stale` and changes
//! nothing, whatever order the provider delivers them in.

use super::Engine;
use crate::config::ProviderConfig;
use crate::directory::Account;
use crate::error::ApiError;
use crate::ledger::billing::{
    other_subscription_detail, BillingEventRow, SubOutcome, SubscriptionRow,
};
use crate::store::{LapseArgs, Reply};
use crate::webhooks::{self, Action, BillingEvent, Provider, SubStatus};
use serde::{Deserialize, Serialize};
use tollgate_protocol::{validate_id, GrantRequest};

/// A subscription change through the admin API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionChange {
    pub plan: String,
    /// active | trialing | past_due | canceled | expired
    pub status: String,
    #[serde(default)]
    pub period_start_ms: Option<i64>,
    #[serde(default)]
    pub period_end_ms: Option<i64>,
}

/// What `lua/lapse.lua` recorded: [grant id, amount] per grant removed.
#[derive(Debug, Deserialize)]
pub(crate) struct Lapsed {
    pub expired: Vec<(String, u64)>,
}

/// What a webhook delivery did.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookOutcome {
    pub provider: String,
    pub event_id: String,
    /// applied | duplicate | stale | ignored | ignored_test_event | ignored_other_subscription |
    /// unknown | unmapped
    pub outcome: String,
    #[serde(default)]
    pub detail: String,
}

fn status_of(s: &str) -> Option<SubStatus> {
    Some(match s {
        "active" => SubStatus::Active,
        "trialing" => SubStatus::Trialing,
        "past_due" => SubStatus::PastDue,
        "canceled" => SubStatus::Canceled,
        "expired" => SubStatus::Expired,
        _ => return None,
    })
}

impl Engine {
    pub async fn subscription(&self, account: &str) -> Result<SubscriptionRow, ApiError> {
        self.ledger
            .subscription(account)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("account {account:?} has no subscription")))
    }

    /// Sets an account's subscription from the admin API (provider `api`, effective now).
    pub async fn set_subscription(
        &self,
        account: &str,
        ch: SubscriptionChange,
    ) -> Result<SubscriptionRow, ApiError> {
        validate_id("account", account)?;
        let status = status_of(&ch.status).ok_or_else(|| {
            ApiError::Invalid(
                "status: must be active, trialing, past_due, canceled or expired".into(),
            )
        })?;
        validate_id("plan", &ch.plan)?;
        self.ensure_plan(&ch.plan).await?;
        if self.plan(&ch.plan).is_none() {
            return Err(ApiError::Invalid(format!(
                "plan: {:?} is not a plan",
                ch.plan
            )));
        }
        let now = self.clock.now_ms() as i64;
        let start = ch.period_start_ms.unwrap_or(now);
        let end = ch.period_end_ms.unwrap_or(0);
        if start < 0 || end < 0 || (end != 0 && end < start) || end >= 10_000_000_000_000 {
            return Err(ApiError::Invalid(
                "period_end_ms: must be after period_start_ms (both unix ms)".into(),
            ));
        }
        let row = SubscriptionRow {
            account_id: account.to_string(),
            plan: ch.plan,
            status: status.as_str().into(),
            provider: "api".into(),
            subject: None,
            period_start_ms: start,
            period_end_ms: end,
            event_at_ms: now,
            updated_at_ms: now,
        };
        // The operator's change replaces whatever subscription is on record.
        match self.apply_subscription(&row, status, None, true).await? {
            SubOutcome::NoAccount => {
                Err(ApiError::NotFound(format!("unknown account {account:?}")))
            }
            _ => self.subscription(account).await,
        }
    }

    async fn apply_subscription(
        &self,
        row: &SubscriptionRow,
        status: SubStatus,
        event: Option<&BillingEventRow>,
        may_replace: bool,
    ) -> Result<SubOutcome, ApiError> {
        let effective = if status.entitled() {
            row.plan.clone()
        } else {
            self.cfg.billing.fallback_plan.clone().ok_or_else(|| {
                ApiError::Conflict(
                    "billing.fallback_plan is not configured: an account whose subscription \
                     ends needs a plan to fall back to"
                        .into(),
                )
            })?
        };
        let out = self
            .ledger
            .apply_subscription(row, &effective, event, may_replace)
            .await?;
        if let SubOutcome::Applied(version) = out {
            self.publish_version(&row.account_id, version).await;
            tracing::info!(
                account = %row.account_id,
                plan = %effective,
                status = status.as_str(),
                provider = %row.provider,
                "subscription changed"
            );
            // A new plan's included credits are there at once, not at the next scheduler tick.
            if let Some(acct) = self.ledger.account(&row.account_id).await? {
                if let Err(e) = self.grant_included_for(&Account::new(acct)).await {
                    tracing::warn!(account = %row.account_id, error = %e, "included credits not granted yet; the scheduler retries");
                }
            }
        }
        Ok(out)
    }

    fn provider_config(&self, p: Provider) -> Result<&ProviderConfig, ApiError> {
        let cfg = match p {
            Provider::Stripe => &self.cfg.billing.stripe,
            Provider::RevenueCat => &self.cfg.billing.revenuecat,
        };
        cfg.as_ref()
            .ok_or_else(|| ApiError::NotFound(format!("billing.{} is not configured", p.as_str())))
    }

    /// A billing-provider webhook: verified (signature or shared secret), then applied once per
    /// event id. `signature` is the `Stripe-Signature` or the `Authorization` header.
    pub async fn webhook(
        &self,
        provider: Provider,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<WebhookOutcome, ApiError> {
        let prov = self.provider_config(provider)?;
        let verified = match provider {
            Provider::Stripe => webhooks::verify_stripe(
                body,
                signature,
                &prov.secret,
                (self.clock.now_ms() / 1000) as i64,
                prov.tolerance_secs,
            ),
            Provider::RevenueCat => webhooks::verify_revenuecat(signature, &prov.secret),
        };
        if let Err(e) = verified {
            self.metrics.billing_rejected.inc();
            tracing::warn!(provider = provider.as_str(), error = %e, "webhook rejected");
            return Err(ApiError::BadSignature(e.to_string()));
        }
        let ev = match provider {
            Provider::Stripe => webhooks::stripe::parse(body),
            Provider::RevenueCat => webhooks::revenuecat::parse(body),
        }
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
        if let Some(first) = self.ledger.billing_event(provider.as_str(), &ev.id).await? {
            self.metrics.billing_duplicate.inc();
            return Ok(WebhookOutcome {
                provider: provider.as_str().into(),
                event_id: ev.id,
                outcome: "duplicate".into(),
                detail: format!("first delivery: {}", first.outcome),
            });
        }
        let (outcome, detail) = self.apply_event(prov, &ev).await?;
        match outcome {
            "applied" => self.metrics.billing_applied.inc(),
            "duplicate" => self.metrics.billing_duplicate.inc(),
            "stale" => self.metrics.billing_stale.inc(),
            "ignored" | "ignored_test_event" | "ignored_other_subscription" => {
                self.metrics.billing_ignored.inc()
            }
            "unknown" => self.metrics.billing_unknown.inc(),
            _ => self.metrics.billing_unmapped.inc(),
        }
        tracing::info!(provider = provider.as_str(), event = %ev.id, kind = %ev.kind, outcome, "billing event");
        Ok(WebhookOutcome {
            provider: provider.as_str().into(),
            event_id: ev.id,
            outcome: outcome.into(),
            detail,
        })
    }

    /// Records an event that changes nothing (or whose change was made already); "duplicate"
    /// when another delivery of it was recorded first.
    async fn record(
        &self,
        ev: &BillingEvent,
        outcome: &'static str,
        detail: String,
    ) -> Result<(&'static str, String), ApiError> {
        let row = event_row(ev, outcome, &detail, self.clock.now_ms() as i64);
        if self.ledger.record_billing_event(&row).await? {
            Ok((outcome, detail))
        } else {
            Ok(("duplicate", detail))
        }
    }

    async fn apply_event(
        &self,
        prov: &ProviderConfig,
        ev: &BillingEvent,
    ) -> Result<(&'static str, String), ApiError> {
        // A test-mode event is remembered (a replay is a duplicate) and changes nothing, unless
        // the operator accepts them (a staging installation).
        if ev.test && !self.cfg.billing.accept_test_events {
            let env = match ev.provider {
                Provider::Stripe => "livemode false",
                Provider::RevenueCat => "environment SANDBOX",
            };
            return self
                .record(
                    ev,
                    "ignored_test_event",
                    format!("a test event ({env}); billing.accept_test_events is off"),
                )
                .await;
        }
        match (&ev.action, self.known_account(ev).await?) {
            (Action::Ignore, _) => self.record(ev, "ignored", String::new()).await,
            (Action::Unknown, _) => {
                self.record(ev, "unknown", "event type not handled".into())
                    .await
            }
            (_, Err(why)) => self.record(ev, "unmapped", why).await,
            (
                Action::Subscription {
                    product,
                    status,
                    period_start_ms,
                    period_end_ms,
                },
                Ok(account),
            ) => {
                self.ensure_plan(product).await?;
                let Some(plan) = prov
                    .plans
                    .get(product)
                    .cloned()
                    .or_else(|| self.plan(product).is_some().then(|| product.clone()))
                else {
                    return self
                        .record(ev, "unmapped", format!("no plan for product {product:?}"))
                        .await;
                };
                let now = self.clock.now_ms() as i64;
                let row = SubscriptionRow {
                    account_id: account,
                    plan: plan.clone(),
                    status: status.as_str().into(),
                    provider: ev.provider.as_str().into(),
                    subject: ev.subject.clone(),
                    period_start_ms: *period_start_ms,
                    period_end_ms: *period_end_ms,
                    event_at_ms: ev.at_ms,
                    updated_at_ms: now,
                };
                let detail = format!("plan {plan}, {}", status.as_str());
                let rec = event_row(ev, "applied", &detail, now);
                // Only the subscription on record changes the account; another one replaces it
                // only by starting (active or trialing) — an ending or failing payment of a
                // subscription that is not the account's changes nothing.
                let may_replace = matches!(status, SubStatus::Active | SubStatus::Trialing);
                Ok(
                    match self
                        .apply_subscription(&row, *status, Some(&rec), may_replace)
                        .await?
                    {
                        SubOutcome::Applied(_) => ("applied", detail),
                        SubOutcome::Stale => ("stale", "a newer change was applied".into()),
                        SubOutcome::OtherSubscription { provider, subject } => (
                            "ignored_other_subscription",
                            other_subscription_detail(&provider, subject.as_deref()),
                        ),
                        SubOutcome::Duplicate => ("duplicate", String::new()),
                        SubOutcome::NoAccount => {
                            return self.record(ev, "unmapped", "unknown account".into()).await
                        }
                    },
                )
            }
            (Action::Purchase { product, amount }, Ok(account)) => {
                let Some(credits) = amount.or_else(|| prov.packs.get(product).copied()) else {
                    return self
                        .record(ev, "unmapped", format!("no credit pack {product:?}"))
                        .await;
                };
                if credits == 0 {
                    return self.record(ev, "ignored", "zero credits".into()).await;
                }
                // One grant per purchase, whichever of its events arrives: the grant id is its
                // idempotency key.
                let gid = format!(
                    "{}.{}",
                    ev.provider.as_str(),
                    ev.subject.as_deref().unwrap_or(&ev.id)
                );
                let expires = prov
                    .pack_expiry_days
                    .map(|d| ev.at_ms.max(0) as u64 + u64::from(d) * 86_400_000);
                let g = GrantRequest {
                    grant_id: gid.clone(),
                    amount: credits,
                    priority: self.cfg.billing.pack_priority,
                    expires_at_ms: expires,
                    source: "purchase".into(),
                };
                self.grant(&account, g).await?;
                self.record(ev, "applied", format!("granted {credits} as {gid}"))
                    .await
            }
            (Action::Refund { reference }, Ok(account)) => {
                let revoked: u64 = self
                    .lapse(&account, "revoke", &ev.id, std::slice::from_ref(reference))
                    .await?
                    .expired
                    .iter()
                    .map(|(_, amount)| amount)
                    .sum();
                self.record(
                    ev,
                    "applied",
                    format!("revoked {revoked} remaining of grant {reference}"),
                )
                .await
            }
        }
    }

    /// The account the event names, if it exists; else why not.
    async fn known_account(&self, ev: &BillingEvent) -> Result<Result<String, String>, ApiError> {
        let Some(account) = &ev.account else {
            return Ok(Err("the event names no account".into()));
        };
        Ok(match self.directory.account(account).await? {
            Some(_) => Ok(account.clone()),
            None => Err(format!("unknown account {account:?}")),
        })
    }

    /// Grants every account's plan its included credits for the current period, once: the
    /// grant id is `included.<period>`, so any number of schedulers grant it once. Returns how
    /// many grants were new.
    pub async fn grant_included_credits(&self) -> Result<u64, ApiError> {
        let mut after = String::new();
        let mut granted = 0;
        loop {
            let page = self.ledger.accounts_page(&after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.id.clone();
            for row in page {
                let id = row.id.clone();
                match self.grant_included_for(&Account::new(row)).await {
                    Ok(true) => granted += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(account = %id, error = %e, "included credits not granted; retried next run")
                    }
                }
            }
        }
        Ok(granted)
    }

    /// Grants one account its plan's included credits for the current period; true if new.
    pub(crate) async fn grant_included_for(&self, acct: &Account) -> Result<bool, ApiError> {
        let row = &acct.row;
        self.ensure_plan_at(&row.plan, row.plan_version).await?;
        let Some(plan) = self.plan(&row.plan) else {
            return Ok(false);
        };
        if row.disabled || plan.included_credits == 0 {
            return Ok(false);
        }
        let period = crate::windows::current_period(
            plan.credits_period,
            self.clock.now_ms(),
            acct.tz,
            &self.windows,
            row.billing_anchor_day as u32,
        );
        let gid = format!("included.{}", period.id);
        let done_key = format!("{}/{gid}", row.id);
        if self.included_done.contains(&done_key) {
            return Ok(false);
        }
        let g = GrantRequest {
            grant_id: gid,
            amount: plan.included_credits,
            priority: plan.credits_priority,
            expires_at_ms: plan.credits_expire.then_some(period.end_ms),
            source: "plan".into(),
        };
        match self.grant(&row.id, g).await {
            Ok((_, replay)) => {
                self.included_done.insert(&done_key);
                if !replay {
                    self.metrics.periodic_grants.inc();
                }
                Ok(!replay)
            }
            // Granted this period already under another plan's amount: once per period.
            Err(ApiError::Conflict(_)) => {
                self.included_done.insert(&done_key);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Records the credit that expired, for every account the ledger shows holding some.
    /// Returns how many accounts had credit lapse.
    pub async fn lapse_expired_credit(&self) -> Result<u64, ApiError> {
        let now = self.clock.now_ms() as i64;
        let mut n = 0;
        for acct in self.ledger.accounts_with_lapsed_credit(now, 1000).await? {
            if !self
                .lapse(&acct, "lapse", "expiry", &[])
                .await?
                .expired
                .is_empty()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes an account's expired grants and the `revoke`d ones, recording their remainder
    /// in the ledger (kind `lapse` or `revoke`).
    pub(crate) async fn lapse(
        &self,
        account: &str,
        kind: &str,
        idem: &str,
        revoke: &[String],
    ) -> Result<Lapsed, ApiError> {
        if self.redis_down().await {
            return Err(ApiError::Unavailable(
                "Redis is unreachable; credit lapses are recorded when it is back".into(),
            ));
        }
        let reply = self
            .run_loaded(account, || {
                let args = LapseArgs {
                    now: self.clock.now_ms(),
                    acct: account,
                    kind,
                    idem,
                    revoke,
                };
                async move { self.store.lapse(&args).await }
            })
            .await?;
        let Reply::Ok(body) = reply else {
            return Err(super::unexpected(reply));
        };
        let out: Lapsed = serde_json::from_str(&body)
            .map_err(|e| ApiError::Internal(format!("unreadable lapse reply: {e}")))?;
        if !out.expired.is_empty() {
            self.metrics.lapsed.inc();
            self.sync_wake.notify_one();
        }
        Ok(out)
    }

    /// One pass of the billing scheduler: included credits, lapsed credit, alert delivery.
    pub async fn billing_tick(&self) {
        if let Err(e) = self.grant_included_credits().await {
            tracing::warn!(error = %e, "included-credit grants failed; will retry");
        }
        if let Err(e) = self.lapse_expired_credit().await {
            tracing::warn!(error = %e, "credit expiry failed; will retry");
        }
        self.deliver_alerts().await;
    }
}

fn event_row(ev: &BillingEvent, outcome: &str, detail: &str, now: i64) -> BillingEventRow {
    BillingEventRow {
        provider: ev.provider.as_str().into(),
        event_id: ev.id.clone(),
        kind: ev.kind.clone(),
        account_id: ev.account.clone(),
        event_at_ms: ev.at_ms,
        outcome: outcome.into(),
        detail: detail.into(),
        received_at_ms: now,
    }
}
