//! Prometheus metrics, kept as plain atomics (no registry, no locks on the hot path) and rendered
//! in the text exposition format at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram over fixed bucket bounds (unit given by the metric's name).
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, v: u64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    /// For each quantile, the upper bound of the bucket it falls in (`u64::MAX` past the last).
    pub fn quantiles(&self, qs: &[f64]) -> Vec<u64> {
        let count = self.count.load(Ordering::Relaxed);
        qs.iter()
            .map(|q| {
                let want = ((count as f64) * q).ceil() as u64;
                let mut acc = 0;
                for (b, n) in self.bounds.iter().zip(&self.buckets) {
                    acc += n.load(Ordering::Relaxed);
                    if acc >= want {
                        return *b;
                    }
                }
                u64::MAX
            })
            .collect()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            acc += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const MICROS: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];
const MILLIS: &[u64] = &[
    1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 250, 500, 1_000, 5_000, 30_000,
];

pub struct Metrics {
    pub allowed: Counter,
    pub denied_limit: Counter,
    pub denied_credits: Counter,
    pub denied_auth: Counter,
    pub committed: Counter,
    pub released: Counter,
    pub expired: Counter,
    pub consumed: Counter,
    pub granted: Counter,
    pub idempotent_replays: Counter,
    /// Shadow limits that would have refused an admitted request (one per limit and request).
    pub shadow_denials: Counter,
    /// Soft limits an admitted request was past (one per limit and request).
    pub soft_overages: Counter,
    /// Holds extended (a stream that outgrew its hold).
    pub extended: Counter,
    pub authorize_batches: Counter,
    pub authorize_batched: Counter,
    pub cold_loads: Counter,
    pub rechecks: Counter,
    pub ledger_idempotency_lookups: Counter,
    pub bad_requests: Counter,
    pub internal_errors: Counter,
    pub sync_events: Counter,
    /// Statements the sync worker sent to the ledger (each one round trip).
    pub ledger_round_trips: Counter,
    pub sync_errors: Counter,
    pub sync_bad_events: Counter,
    pub stale_rereads: Counter,
    pub periodic_grants: Counter,
    pub lapsed: Counter,
    pub pool_claims: Counter,
    pub pool_denied: Counter,
    pub alerts_warning: Counter,
    pub alerts_critical: Counter,
    pub alerts_exhausted: Counter,
    pub alerts_delivered: Counter,
    pub alert_delivery_errors: Counter,
    pub billing_applied: Counter,
    pub billing_duplicate: Counter,
    pub billing_stale: Counter,
    pub billing_ignored: Counter,
    pub billing_unknown: Counter,
    pub billing_unmapped: Counter,
    pub billing_rejected: Counter,
    pub decision_us: Histogram,
    pub sync_lag_ms: Histogram,
    /// Outbox events not yet in the ledger, over all shards, as of the last sync pass (gauge).
    pub outbox_backlog: AtomicU64,
    /// Set while the last sync pass (or a ledger lookup of an idempotency key) failed: the
    /// lookup before a decision is then skipped rather than waited on (see `Engine::spend`).
    pub ledger_unreachable: std::sync::atomic::AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            allowed: Counter::default(),
            denied_limit: Counter::default(),
            denied_credits: Counter::default(),
            denied_auth: Counter::default(),
            committed: Counter::default(),
            released: Counter::default(),
            expired: Counter::default(),
            consumed: Counter::default(),
            granted: Counter::default(),
            idempotent_replays: Counter::default(),
            shadow_denials: Counter::default(),
            soft_overages: Counter::default(),
            extended: Counter::default(),
            authorize_batches: Counter::default(),
            authorize_batched: Counter::default(),
            cold_loads: Counter::default(),
            rechecks: Counter::default(),
            ledger_idempotency_lookups: Counter::default(),
            bad_requests: Counter::default(),
            internal_errors: Counter::default(),
            sync_events: Counter::default(),
            ledger_round_trips: Counter::default(),
            sync_errors: Counter::default(),
            sync_bad_events: Counter::default(),
            stale_rereads: Counter::default(),
            periodic_grants: Counter::default(),
            lapsed: Counter::default(),
            pool_claims: Counter::default(),
            pool_denied: Counter::default(),
            alerts_warning: Counter::default(),
            alerts_critical: Counter::default(),
            alerts_exhausted: Counter::default(),
            alerts_delivered: Counter::default(),
            alert_delivery_errors: Counter::default(),
            billing_applied: Counter::default(),
            billing_duplicate: Counter::default(),
            billing_stale: Counter::default(),
            billing_ignored: Counter::default(),
            billing_unknown: Counter::default(),
            billing_unmapped: Counter::default(),
            billing_rejected: Counter::default(),
            decision_us: Histogram::new(MICROS),
            sync_lag_ms: Histogram::new(MILLIS),
            outbox_backlog: AtomicU64::new(0),
            ledger_unreachable: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// `alert`: the backlog above which the alert gauge is 1 (`sync.backlog_alert`).
    pub fn render_with(&self, alert: u64) -> String {
        let mut out = self.render();
        let backlog = self.outbox_backlog.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tollgate_outbox_backlog_events Changes in the store not yet in the ledger.\n\
             # TYPE tollgate_outbox_backlog_events gauge\ntollgate_outbox_backlog_events {backlog}"
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_outbox_backlog_alert 1 while the backlog is above sync.backlog_alert.\n\
             # TYPE tollgate_outbox_backlog_alert gauge\ntollgate_outbox_backlog_alert {}",
            u8::from(backlog > alert)
        );
        out
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, labels: &[(&str, &Counter)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, c) in labels {
                let _ = writeln!(out, "{name}{l} {}", c.get());
            }
        };
        counter(
            "tollgate_decisions_total",
            "Authorize/consume decisions by result.",
            &[
                ("{result=\"allowed\"}", &self.allowed),
                ("{result=\"denied_limit\"}", &self.denied_limit),
                ("{result=\"denied_credits\"}", &self.denied_credits),
                ("{result=\"denied_auth\"}", &self.denied_auth),
            ],
        );
        counter(
            "tollgate_holds_settled_total",
            "Holds settled, by outcome.",
            &[
                ("{status=\"committed\"}", &self.committed),
                ("{status=\"released\"}", &self.released),
                ("{status=\"expired\"}", &self.expired),
            ],
        );
        counter(
            "tollgate_consumed_total",
            "One-shot consumes applied.",
            &[("", &self.consumed)],
        );
        counter(
            "tollgate_grants_total",
            "Credit grants applied.",
            &[("", &self.granted)],
        );
        counter(
            "tollgate_idempotent_replays_total",
            "Requests answered from an earlier identical request.",
            &[("", &self.idempotent_replays)],
        );
        counter(
            "tollgate_shadow_denials_total",
            "Admitted requests a shadow limit would have refused (one per limit).",
            &[("", &self.shadow_denials)],
        );
        counter(
            "tollgate_soft_limit_overages_total",
            "Admitted requests past a soft limit (one per limit).",
            &[("", &self.soft_overages)],
        );
        counter(
            "tollgate_holds_extended_total",
            "Holds extended to new totals (/v1/extend).",
            &[("", &self.extended)],
        );
        counter(
            "tollgate_authorize_batches_total",
            "Authorize batches received (the filter's requests that waited for a callout).",
            &[("", &self.authorize_batches)],
        );
        counter(
            "tollgate_authorize_batched_total",
            "Authorizes that came in a batch.",
            &[("", &self.authorize_batched)],
        );
        counter(
            "tollgate_cold_loads_total",
            "Accounts rebuilt in Redis from the ledger.",
            &[("", &self.cold_loads)],
        );
        counter(
            "tollgate_idempotency_rechecks_total",
            "Idempotency keys checked against PostgreSQL after a cold load.",
            &[("", &self.rechecks)],
        );
        counter(
            "tollgate_idempotency_ledger_lookups_total",
            "Idempotency keys not made by the filter, checked against the ledger before deciding.",
            &[("", &self.ledger_idempotency_lookups)],
        );
        counter(
            "tollgate_bad_requests_total",
            "Requests refused with 4xx.",
            &[("", &self.bad_requests)],
        );
        counter(
            "tollgate_internal_errors_total",
            "Requests failed with 5xx.",
            &[("", &self.internal_errors)],
        );
        counter(
            "tollgate_sync_events_total",
            "Outbox events written to the ledger.",
            &[("", &self.sync_events)],
        );
        counter(
            "tollgate_sync_ledger_round_trips_total",
            "Statements the sync worker sent to the ledger (one round trip each).",
            &[("", &self.ledger_round_trips)],
        );
        counter(
            "tollgate_sync_errors_total",
            "Failed ledger sync passes.",
            &[("", &self.sync_errors)],
        );
        counter(
            "tollgate_sync_bad_events_total",
            "Unreadable outbox entries skipped (a bug if non-zero).",
            &[("", &self.sync_bad_events)],
        );
        counter(
            "tollgate_stale_rereads_total",
            "Accounts re-read because another sidecar changed them (plan, limits, keys).",
            &[("", &self.stale_rereads)],
        );
        counter(
            "tollgate_periodic_grants_total",
            "Included credits granted for a plan period.",
            &[("", &self.periodic_grants)],
        );
        counter(
            "tollgate_credit_lapses_total",
            "Accounts whose expired or revoked credit was recorded.",
            &[("", &self.lapsed)],
        );
        counter(
            "tollgate_pool_claims_total",
            "Claims admitted from shared pools.",
            &[("", &self.pool_claims)],
        );
        counter(
            "tollgate_pool_claims_denied_total",
            "Claims refused: the pool was empty.",
            &[("", &self.pool_denied)],
        );
        counter(
            "tollgate_alerts_delivered_total",
            "Alerts delivered to the alert webhook.",
            &[("", &self.alerts_delivered)],
        );
        counter(
            "tollgate_alert_delivery_errors_total",
            "Failed alert webhook deliveries (retried).",
            &[("", &self.alert_delivery_errors)],
        );
        counter(
            "tollgate_alerts_total",
            "Threshold alerts raised (once per account, limit, window and level), by level.",
            &[
                ("{level=\"warning\"}", &self.alerts_warning),
                ("{level=\"critical\"}", &self.alerts_critical),
                ("{level=\"exhausted\"}", &self.alerts_exhausted),
            ],
        );
        counter(
            "tollgate_billing_events_total",
            "Billing-provider webhook events, by outcome.",
            &[
                ("{outcome=\"applied\"}", &self.billing_applied),
                ("{outcome=\"duplicate\"}", &self.billing_duplicate),
                ("{outcome=\"stale\"}", &self.billing_stale),
                ("{outcome=\"ignored\"}", &self.billing_ignored),
                ("{outcome=\"unknown\"}", &self.billing_unknown),
                ("{outcome=\"unmapped\"}", &self.billing_unmapped),
                ("{outcome=\"rejected\"}", &self.billing_rejected),
            ],
        );
        self.decision_us.render(
            &mut out,
            "tollgate_decision_duration_microseconds",
            "Time to answer authorize/consume/commit/release.",
        );
        self.sync_lag_ms.render(
            &mut out,
            "tollgate_sync_lag_milliseconds",
            "Time from a change in Redis to its ledger row.",
        );
        out
    }
}
