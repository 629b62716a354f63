//! The operator's configuration: one TOML file read top to bottom (see `host-sidecar/tollgate.toml`
//! and docs/CONFIGURATION.md), plus environment variables for URLs and secrets.
//!
//! Everything is validated at start; an error names the field, e.g.
//! `plans.free.limits[1].meter: "tokns" is not a declared meter`.

use crate::windows::{Window, WindowSettings};
use chrono::Weekday;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tollgate_protocol::{validate_id, MAX_AMOUNT};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The causes are part of the message (not `source`s), so a printed chain says it once.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("invalid configuration: {0}")]
    Parse(toml::de::Error),
    #[error("invalid configuration: {field}: {problem}")]
    Field { field: String, problem: String },
}

impl From<toml::de::Error> for ConfigError {
    fn from(e: toml::de::Error) -> Self {
        ConfigError::Parse(e)
    }
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The token meters the filter reports from a response's `usage` (docs/CONFIGURATION.md, "Token
/// meters"), with one meaning for every provider: `input_tokens` is the *uncached* input only,
/// cache reads and writes are meters of their own, `output_tokens` includes reasoning, `tokens`
/// is every input kind plus output. Always available, like `credits`: a configuration that does
/// not list them still accepts a filter's commit that reports them (a refused commit would let
/// its hold expire and charge nothing).
pub use tollgate_protocol::TOKEN_METERS;

/// Bounds of `server.max_commit_body_bytes`.
const MIN_COMMIT_BODY: usize = 64 * 1024;
const MAX_COMMIT_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub windows: WindowsConfig,
    /// The units of usage this installation counts. `credits` is always available (a limit on it
    /// caps the credit a request may spend per window), and so are the [`TOKEN_METERS`].
    pub meters: Vec<String>,
    #[serde(default)]
    pub plans: BTreeMap<String, Plan>,
    /// Route name -> price. A route not listed uses `default`; with no `default`, it is refused.
    #[serde(default)]
    pub prices: BTreeMap<String, RoutePrice>,
    #[serde(default)]
    pub billing: BillingConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
}

/// Billing providers and how their products map to plans and credit packs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// The plan an account falls back to when its subscription is no longer entitled
    /// (canceled, expired). Must be a configured plan when any provider is configured.
    pub fallback_plan: Option<String>,
    /// How often the scheduler grants plans' included credits and records expired credit.
    pub schedule_interval_ms: u64,
    /// Priority of purchased credit packs (lower spends first).
    pub pack_priority: u32,
    /// Apply events from the providers' test environments (Stripe `livemode: false`,
    /// RevenueCat `environment: SANDBOX`). Off: they are recorded (`ignored_test_event`, so a
    /// replay is a duplicate) and change nothing.
    pub accept_test_events: bool,
    pub stripe: Option<ProviderConfig>,
    pub revenuecat: Option<ProviderConfig>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            fallback_plan: None,
            schedule_interval_ms: 60_000,
            pack_priority: 50,
            accept_test_events: false,
            stripe: None,
            revenuecat: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Stripe: the endpoint's signing secret (`whsec_…`). RevenueCat: the authorization header
    /// value configured for the webhook.
    pub secret: String,
    /// Stripe only: how far the signed timestamp may be from now.
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: i64,
    /// Provider price / product id -> plan name. A product named like a plan maps to it.
    #[serde(default)]
    pub plans: BTreeMap<String, String>,
    /// Provider product id -> credits a purchase of it grants.
    #[serde(default)]
    pub packs: BTreeMap<String, u64>,
    /// Days purchased credit stays spendable (absent: it never expires).
    #[serde(default)]
    pub pack_expiry_days: Option<u32>,
}

fn default_tolerance() -> i64 {
    300
}

/// Threshold alerts: raised once per account, limit, window and level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Percentages of a limit at which an alert is raised; 100 = exhausted.
    pub thresholds: Vec<u32>,
    /// Per meter, thresholds replacing `thresholds`.
    pub meters: BTreeMap<String, Vec<u32>>,
    /// Where alerts are POSTed (JSON), http:// only. Absent: alerts are only recorded (API, metrics).
    pub webhook_url: Option<String>,
    /// Signs each delivery: header `Tollgate-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of
    /// "<t>.<body>">`.
    pub webhook_secret: Option<String>,
    /// Delivery attempts per alert before it is left undelivered.
    pub max_attempts: u32,
    /// Credits below which an admitted spend raises the `low_balance` warning (once per account
    /// and day), before the account runs out. 0: off.
    pub low_balance: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            thresholds: vec![80, 95, 100],
            meters: BTreeMap::new(),
            webhook_url: None,
            webhook_secret: None,
            max_attempts: 8,
            low_balance: 0,
        }
    }
}

impl AlertsConfig {
    pub fn thresholds_for(&self, meter: &str) -> &[u32] {
        self.meters.get(meter).unwrap_or(&self.thresholds)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Where the billing-provider webhooks (`/webhooks/stripe`, `/webhooks/revenuecat`, and
    /// `/healthz`) are served, e.g. `"0.0.0.0:8701"`: then on that listener only, and no longer on
    /// `listen`, so the decision and admin API never has to face the internet. Absent: they are
    /// served on `listen`.
    pub webhook_listen: Option<String>,
    /// Virtual shards: each has its own Redis hash tag and outbox stream. Fixed once data exists.
    pub shards: u32,
    pub hold_ttl_secs: u64,
    pub idempotency_ttl_secs: u64,
    /// How long a settled hold the filter made (for an API key) stays in Redis to answer the
    /// filter's own retries; later repeats are answered from the ledger. At most
    /// `idempotency_ttl_secs` applies.
    pub replay_window_secs: u64,
    /// After a cold load, how far back idempotency keys are re-checked against PostgreSQL.
    pub recheck_window_secs: u64,
    pub account_cache_ttl_ms: u64,
    /// Largest request body, on every route but the two commit routes.
    pub max_body_bytes: usize,
    /// Largest body of `/v1/commit` and `/v1/commit/batch`: a commit may carry the response's
    /// text (up to `MAX_OUTPUT_TEXT`, 1 MiB, per item) and the filter batches them.
    pub max_commit_body_bytes: usize,
    pub sweep_interval_ms: u64,
    /// Bearer token for the admin API; `TOLLGATE_ADMIN_TOKEN` overrides. Required.
    pub admin_token: Option<String>,
    /// Bearer token the filter sends on every callout (its `sidecar.token`): required by the
    /// decision routes (`/v1/authorize`, `check`, `consume`, `commit`, `commit/batch`,
    /// `release`) for calls that name an API key; `TOLLGATE_DECISION_TOKEN` overrides. Required
    /// on a listener that is not loopback; on loopback without one the decision API is open.
    pub decision_token: Option<String>,
    /// Bearer token of trusted server-side callers: the decision routes for a bare `account`
    /// (no API key), and the account read routes; `TOLLGATE_SERVICE_TOKEN` overrides. The admin
    /// token may do the same.
    pub service_token: Option<String>,
    /// Mixed into API key hashes; `TOLLGATE_KEY_PEPPER` overrides.
    pub key_pepper: Option<String>,
    /// Longest a request may take before it is answered 503.
    pub request_timeout_ms: u64,
    /// Most requests served at once; more wait for a slot.
    pub max_concurrent_requests: usize,
}

/// The admin token the README's examples use: refused on a listener that is not loopback.
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token-change-me";

impl ServerConfig {
    /// Whether `listen` binds only the loopback interface.
    pub fn listens_on_loopback(&self) -> bool {
        self.listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8700".into(),
            webhook_listen: None,
            shards: 16,
            hold_ttl_secs: 300,
            idempotency_ttl_secs: 86_400,
            replay_window_secs: 600,
            recheck_window_secs: 600,
            account_cache_ttl_ms: 1_000,
            max_body_bytes: 64 * 1024,
            max_commit_body_bytes: 8 * 1024 * 1024,
            sweep_interval_ms: 1_000,
            admin_token: None,
            decision_token: None,
            service_token: None,
            key_pepper: None,
            request_timeout_ms: 10_000,
            max_concurrent_requests: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://…`; absent (and no `TOLLGATE_REDIS_URL`): the embedded in-process store, for a
    /// first run and single-node installs.
    pub url: Option<String>,
    /// Prefix of every key; lets several installations (or test runs) share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "tg".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://…`; absent (and no `TOLLGATE_DATABASE_URL`): the embedded SQLite ledger at
    /// `sqlite_path`.
    pub url: Option<String>,
    pub max_connections: u32,
    /// The embedded ledger's file (`TOLLGATE_SQLITE_PATH` overrides), used when `url` is absent.
    pub sqlite_path: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            sqlite_path: "tollgate-ledger.sqlite".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Most outbox events written to PostgreSQL in one transaction.
    pub batch: usize,
    /// How often each shard's outbox is polled when idle.
    pub interval_ms: u64,
    /// The shortest time between two sync passes, even when changes wake the worker sooner:
    /// under load each pass then carries many changes in few ledger transactions (at most
    /// `interval_ms`; 0 = a pass as soon as woken).
    pub min_gap_ms: u64,
    /// Outbox events not yet in the ledger above which the alert gauge and /readyz say so.
    pub backlog_alert: u64,
    /// Above this backlog, spending decisions are refused (503): the ledger has been unreachable
    /// so long that the store would otherwise keep growing without bound.
    pub max_backlog: u64,
    /// Answer a change only once it is in the ledger (group commit: the waiting requests'
    /// changes are written in one transaction). Nothing acknowledged is lost even if Redis loses
    /// everything at once (FLUSHALL, a restart without persistence); each change waits for one
    /// ledger write (see BENCHMARKS.md). While the ledger is unreachable changes are answered
    /// 503 after `ack_timeout_ms` — made in Redis, synced later; a retry with the same
    /// idempotency key gets the first answer.
    pub ack_after_ledger: bool,
    pub ack_timeout_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            batch: 2_000,
            interval_ms: 10,
            min_gap_ms: 5,
            backlog_alert: 100_000,
            max_backlog: 5_000_000,
            ack_after_ledger: false,
            ack_timeout_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsConfig {
    /// Local time at which day, week and month windows start, e.g. "00:05".
    pub day_starts_at: String,
    pub week_starts_on: String,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        Self {
            day_starts_at: "00:00".into(),
            week_starts_on: "monday".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// Credits granted to each account on the plan once per `credits_period` (by the scheduler;
    /// once per account and period however many sidecars run it).
    #[serde(default)]
    pub included_credits: u64,
    /// `week` or `month` (in the account's timezone and billing anchor day).
    #[serde(default = "month")]
    pub credits_period: Window,
    /// Included credits expire at the end of their period (true) or never.
    #[serde(default = "yes")]
    pub credits_expire: bool,
    /// Spending priority of included credits (lower spends first).
    #[serde(default = "ten")]
    pub credits_priority: u32,
}

fn month() -> Window {
    Window::Month
}
fn yes() -> bool {
    true
}
fn ten() -> u32 {
    10
}

/// One limit: at most `max` of `meter` per `window` (`concurrent`: at most `max` held at once,
/// by requests in flight).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub meter: String,
    pub window: Window,
    pub max: u64,
    /// `enforce` (refuse past it), `soft` (pass, record the overage, alert) or `shadow` (pass,
    /// report what would have been refused; for rolling a limit out on live traffic).
    #[serde(default, skip_serializing_if = "LimitMode::is_enforce")]
    pub mode: LimitMode,
}

/// How a limit acts when a request would take it past its `max`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// The request is refused (429).
    #[default]
    Enforce,
    /// The request passes and is counted; the overage is reported and alerted once a window.
    Soft,
    /// The request passes; it is counted only where the limit admits it, as enforcement would
    /// have; the decision names the limit as one that would have refused it.
    Shadow,
}

impl LimitMode {
    pub fn is_enforce(&self) -> bool {
        *self == LimitMode::Enforce
    }

    /// How the scripts see it (`mode` in `spend_req`, lua/lib.lua).
    pub fn code(self) -> &'static str {
        match self {
            LimitMode::Enforce => "e",
            LimitMode::Soft => "s",
            LimitMode::Shadow => "h",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitMode::Enforce => "enforce",
            LimitMode::Soft => "soft",
            LimitMode::Shadow => "shadow",
        }
    }
}

/// A price: credits per unit (`requests = 2`) or per `per` units (`{ credits = 150, per = 1000 }`).
/// Fractions round up, per meter, per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Price {
    PerUnit(u64),
    Ratio { credits: u64, per: u64 },
}

impl Price {
    pub fn credits_for(self, amount: u64) -> u64 {
        let (c, p) = match self {
            Price::PerUnit(c) => (c, 1),
            Price::Ratio { credits, per } => (credits, per.max(1)),
        };
        let total = (amount as u128 * c as u128).div_ceil(p as u128);
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RoutePrice {
    /// Model-specific prices; a meter not priced for the model uses the route's price.
    #[serde(default)]
    pub models: BTreeMap<String, BTreeMap<String, Price>>,
    #[serde(flatten)]
    pub meters: BTreeMap<String, Price>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let mut cfg: Config = toml::from_str(&text)?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates (no environment).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// URLs and secrets from the environment win over the file.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        let set = |v: String| (!v.is_empty()).then_some(v);
        if let Some(v) = get("TOLLGATE_REDIS_URL") {
            self.redis.url = set(v);
        }
        if let Some(v) = get("TOLLGATE_DATABASE_URL") {
            self.postgres.url = set(v);
        }
        if let Some(v) = get("TOLLGATE_SQLITE_PATH") {
            self.postgres.sqlite_path = v;
        }
        if let Some(v) = get("TOLLGATE_ADMIN_TOKEN") {
            self.server.admin_token = Some(v);
        }
        if let Some(v) = get("TOLLGATE_DECISION_TOKEN") {
            self.server.decision_token = set(v);
        }
        if let Some(v) = get("TOLLGATE_SERVICE_TOKEN") {
            self.server.service_token = set(v);
        }
        if let Some(v) = get("TOLLGATE_KEY_PEPPER") {
            self.server.key_pepper = Some(v);
        }
        if let Some(v) = get("TOLLGATE_LISTEN") {
            self.server.listen = v;
        }
        if let Some(v) = get("TOLLGATE_WEBHOOK_LISTEN") {
            self.server.webhook_listen = set(v);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(field_err(
                "server.listen",
                format!("{:?} is not host:port", s.listen),
            ));
        }
        if let Some(w) = &s.webhook_listen {
            let addr = w.parse::<std::net::SocketAddr>().map_err(|_| {
                field_err("server.webhook_listen", format!("{w:?} is not host:port"))
            })?;
            if addr.port() != 0 && s.listen.parse::<std::net::SocketAddr>().ok() == Some(addr) {
                return Err(field_err(
                    "server.webhook_listen",
                    "must differ from server.listen (the webhooks get a listener of their own)",
                ));
            }
        }
        if let Some(t) = &s.admin_token {
            if t.len() < 16 {
                return Err(field_err(
                    "server.admin_token",
                    "must be at least 16 characters (or unset to disable the admin API)",
                ));
            }
        }
        for (field, t) in [
            ("server.decision_token", &s.decision_token),
            ("server.service_token", &s.service_token),
        ] {
            if t.as_ref().is_some_and(|t| t.len() < 16) {
                return Err(field_err(field, "must be at least 16 characters"));
            }
        }
        let tokens = [&s.admin_token, &s.decision_token, &s.service_token];
        let given: Vec<&String> = tokens.iter().filter_map(|t| t.as_ref()).collect();
        if (0..given.len()).any(|i| given[i + 1..].contains(&given[i])) {
            return Err(field_err(
                "server.decision_token",
                "the admin, decision and service tokens must differ (each is its own scope)",
            ));
        }
        if !s.listens_on_loopback() {
            if s.decision_token.is_none() {
                return Err(field_err(
                    "server.decision_token",
                    format!(
                        "required when listening on {} (not loopback): anyone who reaches the port could move money (set TOLLGATE_DECISION_TOKEN)",
                        s.listen
                    ),
                ));
            }
            if s.admin_token.as_deref() == Some(DEV_ADMIN_TOKEN) {
                return Err(field_err(
                    "server.admin_token",
                    "the documented development token may only be used on loopback",
                ));
            }
        }
        if s.replay_window_secs < 10 {
            return Err(field_err(
                "server.replay_window_secs",
                "must be at least 10 (the filter retries a settlement for about 10 s)",
            ));
        }
        if !(100..=600_000).contains(&s.request_timeout_ms) {
            return Err(field_err(
                "server.request_timeout_ms",
                "must be 100..=600000",
            ));
        }
        if !(1..=1_000_000).contains(&s.max_concurrent_requests) {
            return Err(field_err(
                "server.max_concurrent_requests",
                "must be 1..=1000000",
            ));
        }
        if !(MIN_COMMIT_BODY..=MAX_COMMIT_BODY).contains(&s.max_commit_body_bytes) {
            return Err(field_err(
                "server.max_commit_body_bytes",
                format!("must be {MIN_COMMIT_BODY}..={MAX_COMMIT_BODY} (64 KiB to 64 MiB)"),
            ));
        }
        if !(1..=1024).contains(&s.shards) {
            return Err(field_err("server.shards", "must be 1..=1024"));
        }
        for (name, v) in [
            ("server.hold_ttl_secs", s.hold_ttl_secs),
            ("server.idempotency_ttl_secs", s.idempotency_ttl_secs),
            ("server.sweep_interval_ms", s.sweep_interval_ms),
            ("sync.interval_ms", self.sync.interval_ms),
        ] {
            if v == 0 {
                return Err(field_err(name, "must be positive"));
            }
        }
        // Counters live an hour past their window (lua/lib.lua COUNTER_GRACE_MS): a hold must be
        // settled while the counters it charged still exist.
        if s.hold_ttl_secs > 3600 {
            return Err(field_err("server.hold_ttl_secs", "must be at most 3600"));
        }
        if s.idempotency_ttl_secs < s.hold_ttl_secs {
            return Err(field_err(
                "server.idempotency_ttl_secs",
                "must be at least server.hold_ttl_secs",
            ));
        }
        if self.sync.backlog_alert == 0 || self.sync.max_backlog < self.sync.backlog_alert {
            return Err(field_err(
                "sync.max_backlog",
                "must be at least sync.backlog_alert, which must be positive",
            ));
        }
        if self.sync.batch == 0 || self.sync.batch > 50_000 {
            return Err(field_err("sync.batch", "must be 1..=50000"));
        }
        if let Some(u) = &self.redis.url {
            if !["redis://", "rediss://", "redis+cluster://"]
                .iter()
                .any(|p| u.starts_with(p))
            {
                return Err(field_err(
                    "redis.url",
                    "must start with redis://, rediss:// or redis+cluster:// (or be absent for \
                     the embedded store)",
                ));
            }
        }
        if let Some(u) = &self.postgres.url {
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(field_err(
                    "postgres.url",
                    "must start with postgres:// (or be absent for the embedded SQLite ledger)",
                ));
            }
        }
        if self.postgres.url.is_none() && self.postgres.sqlite_path.trim().is_empty() {
            return Err(field_err(
                "postgres.sqlite_path",
                "must name a file when postgres.url is absent",
            ));
        }
        validate_id("redis.key_prefix", &self.redis.key_prefix)
            .map_err(|e| field_err("redis.key_prefix", e.problem))?;
        self.window_settings()?;
        if self.meters.is_empty() {
            return Err(field_err("meters", "declare at least one meter"));
        }
        for (i, m) in self.meters.iter().enumerate() {
            validate_id("meters", m).map_err(|e| field_err(format!("meters[{i}]"), e.problem))?;
        }
        for (plan, p) in &self.plans {
            self.validate_plan(&format!("plans.{plan}"), plan, p)?;
        }
        self.validate_billing()?;
        self.validate_alerts()?;
        for (route, rp) in &self.prices {
            validate_id("prices", route)
                .map_err(|e| field_err(format!("prices.{route}"), e.problem))?;
            self.validate_prices(&format!("prices.{route}"), &rp.meters)?;
            for (model, m) in &rp.models {
                validate_id("model", model)
                    .map_err(|e| field_err(format!("prices.{route}.models.{model}"), e.problem))?;
                self.validate_prices(&format!("prices.{route}.models.{model}"), m)?;
            }
        }
        Ok(())
    }

    /// Checks a plan from the configuration (`field` = `plans.NAME`) or from the admin API.
    pub fn validate_plan(&self, field: &str, name: &str, p: &Plan) -> Result<(), ConfigError> {
        validate_id("plans", name).map_err(|e| field_err(field.to_string(), e.problem))?;
        self.validate_limits(&format!("{field}.limits"), &p.limits)?;
        if p.included_credits > MAX_AMOUNT {
            return Err(field_err(format!("{field}.included_credits"), "too large"));
        }
        if !matches!(p.credits_period, Window::Day | Window::Week | Window::Month) {
            return Err(field_err(
                format!("{field}.credits_period"),
                "must be day, week or month",
            ));
        }
        if p.credits_priority > 9999 {
            return Err(field_err(
                format!("{field}.credits_priority"),
                "must be 0..=9999",
            ));
        }
        Ok(())
    }

    fn validate_billing(&self) -> Result<(), ConfigError> {
        let b = &self.billing;
        if b.schedule_interval_ms == 0 {
            return Err(field_err(
                "billing.schedule_interval_ms",
                "must be positive",
            ));
        }
        if let Some(p) = &b.fallback_plan {
            if !self.plans.contains_key(p) {
                return Err(field_err(
                    "billing.fallback_plan",
                    format!("{p:?} is not a configured plan"),
                ));
            }
        }
        for (name, prov) in [("stripe", &b.stripe), ("revenuecat", &b.revenuecat)] {
            let Some(prov) = prov else { continue };
            if b.fallback_plan.is_none() {
                return Err(field_err(
                    "billing.fallback_plan",
                    format!("required when billing.{name} is configured"),
                ));
            }
            if prov.secret.len() < 16 {
                return Err(field_err(
                    format!("billing.{name}.secret"),
                    "must be at least 16 characters",
                ));
            }
            if !(1..=3600).contains(&prov.tolerance_secs) {
                return Err(field_err(
                    format!("billing.{name}.tolerance_secs"),
                    "must be 1..=3600",
                ));
            }
            for (product, plan) in &prov.plans {
                if !self.plans.contains_key(plan) {
                    return Err(field_err(
                        format!("billing.{name}.plans.{product}"),
                        format!("{plan:?} is not a configured plan"),
                    ));
                }
            }
            for (product, credits) in &prov.packs {
                if *credits == 0 || *credits > MAX_AMOUNT {
                    return Err(field_err(
                        format!("billing.{name}.packs.{product}"),
                        "must be 1..=10^14",
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many decisions from PostgreSQL (Redis down) may run at once: each holds a
    /// transaction and reads on a second connection, so half the pool.
    pub fn degraded_slots(&self) -> u32 {
        (self.postgres.max_connections / 2).max(1)
    }

    fn validate_alerts(&self) -> Result<(), ConfigError> {
        let a = &self.alerts;
        let check = |field: String, t: &[u32]| -> Result<(), ConfigError> {
            if t.iter().any(|v| !(1..=100).contains(v)) {
                return Err(field_err(field, "thresholds are percentages 1..=100"));
            }
            Ok(())
        };
        check("alerts.thresholds".into(), &a.thresholds)?;
        for (m, t) in &a.meters {
            if !self.is_meter(m) {
                return Err(field_err(
                    format!("alerts.meters.{m}"),
                    "not a declared meter",
                ));
            }
            check(format!("alerts.meters.{m}"), t)?;
        }
        if let Some(u) = &a.webhook_url {
            // The sidecar is built without a TLS stack: deliver to a local relay over http.
            if !u.starts_with("http://") {
                return Err(field_err(
                    "alerts.webhook_url",
                    "must be an http:// URL (TLS is not built in; use a local relay)",
                ));
            }
        }
        if a.max_attempts == 0 {
            return Err(field_err("alerts.max_attempts", "must be positive"));
        }
        if a.low_balance > MAX_AMOUNT {
            return Err(field_err("alerts.low_balance", "must be 0..=10^14"));
        }
        Ok(())
    }

    /// Checks limits from the config or from the admin API.
    pub fn validate_limits(&self, field: &str, limits: &[LimitSpec]) -> Result<(), ConfigError> {
        for (i, l) in limits.iter().enumerate() {
            if !self.is_meter(&l.meter) {
                return Err(field_err(
                    format!("{field}[{i}].meter"),
                    format!("{:?} is not a declared meter", l.meter),
                ));
            }
            if l.max > MAX_AMOUNT {
                return Err(field_err(format!("{field}[{i}].max"), "too large"));
            }
            if limits[..i]
                .iter()
                .any(|o| o.meter == l.meter && o.window == l.window)
            {
                return Err(field_err(
                    format!("{field}[{i}]"),
                    format!("a second limit for {} per {}", l.meter, l.window.as_str()),
                ));
            }
        }
        Ok(())
    }

    fn validate_prices(
        &self,
        field: &str,
        prices: &BTreeMap<String, Price>,
    ) -> Result<(), ConfigError> {
        for (meter, p) in prices {
            if !self.is_meter(meter) {
                return Err(field_err(
                    format!("{field}.{meter}"),
                    format!("{meter:?} is not a declared meter"),
                ));
            }
            if let Price::Ratio { per: 0, .. } = p {
                return Err(field_err(
                    format!("{field}.{meter}.per"),
                    "must be positive",
                ));
            }
        }
        Ok(())
    }

    /// A declared meter, `credits`, or one of the [`TOKEN_METERS`].
    pub fn is_meter(&self, name: &str) -> bool {
        name == "credits" || TOKEN_METERS.contains(&name) || self.meters.iter().any(|m| m == name)
    }

    pub fn window_settings(&self) -> Result<WindowSettings, ConfigError> {
        let w = &self.windows;
        let (h, m) = w
            .day_starts_at
            .split_once(':')
            .and_then(|(h, m)| Some((h.parse::<u32>().ok()?, m.parse::<u32>().ok()?)))
            .filter(|(h, m)| *h < 24 && *m < 60)
            .ok_or_else(|| field_err("windows.day_starts_at", "expected HH:MM, e.g. \"00:05\""))?;
        let week_start: Weekday = w
            .week_starts_on
            .parse()
            .map_err(|_| field_err("windows.week_starts_on", "expected a weekday, e.g. monday"))?;
        Ok(WindowSettings {
            day_offset_minutes: h * 60 + m,
            week_start,
        })
    }

    /// The credits a route charges for `meters` (model-specific prices first).
    pub fn price(
        &self,
        route: &str,
        model: Option<&str>,
        meters: &tollgate_protocol::Meters,
    ) -> Option<u64> {
        let rp = match self
            .prices
            .get(route)
            .or_else(|| self.prices.get("default"))
        {
            Some(rp) => rp,
            None if self.prices.is_empty() => return Some(0),
            None => return None,
        };
        let by_model = model.and_then(|m| rp.models.get(m));
        let mut total: u64 = 0;
        for (meter, amount) in meters {
            let price = by_model
                .and_then(|p| p.get(meter))
                .or_else(|| rp.meters.get(meter));
            if let Some(p) = price {
                total = total.saturating_add(p.credits_for(*amount));
            }
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
meters = ["requests", "tokens"]
[plans.free]
limits = [{ meter = "requests", window = "day", max = 100 }]
[prices.chat]
requests = 2
tokens = { credits = 150, per = 1000 }
[prices.chat.models.big]
tokens = { credits = 600, per = 1000 }
"#;

    #[test]
    fn prices_round_up_and_prefer_the_model() {
        let cfg = Config::from_toml(BASE).unwrap();
        let m = |r: u64, t: u64| {
            [("requests".to_string(), r), ("tokens".to_string(), t)]
                .into_iter()
                .collect()
        };
        assert_eq!(cfg.price("chat", None, &m(1, 1000)), Some(152));
        assert_eq!(cfg.price("chat", None, &m(1, 1)), Some(3));
        assert_eq!(cfg.price("chat", Some("big"), &m(0, 1000)), Some(600));
        assert_eq!(cfg.price("nope", None, &m(1, 0)), None);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (BASE.replace("window = \"day\"", "window = \"dya\""), "dya"),
            (
                BASE.replace("meter = \"requests\"", "meter = \"reqs\""),
                "plans.free.limits[0].meter",
            ),
            (
                BASE.replace("per = 1000 }\n[prices", "per = 0 }\n[prices"),
                "prices.chat.tokens.per",
            ),
            (format!("{BASE}\n[server]\nshards = 0\n"), "server.shards"),
            (
                format!("{BASE}\n[windows]\nday_starts_at = \"25:00\"\n"),
                "windows.day_starts_at",
            ),
            (format!("{BASE}\n[server]\nbogus = 1\n"), "bogus"),
            (
                format!("{BASE}\n[server]\nadmin_token = \"\"\n"),
                "server.admin_token",
            ),
            (
                format!("{BASE}\n[server]\nmax_commit_body_bytes = 1000\n"),
                "server.max_commit_body_bytes",
            ),
            (
                format!("{BASE}\n[server]\nmax_commit_body_bytes = 67108865\n"),
                "server.max_commit_body_bytes",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not name {needle}");
        }
    }

    #[test]
    fn the_shipped_configuration_is_valid() {
        let cfg = Config::from_toml(include_str!("../tollgate.toml")).unwrap();
        assert!(cfg.plans.contains_key("free") && cfg.plans.contains_key("pro"));
        let m = [("output_tokens".to_string(), 1000)].into_iter().collect();
        assert_eq!(cfg.price("chat", Some("gpt-4o-mini"), &m), Some(60));
        assert_eq!(cfg.price("chat", None, &m), Some(600));
    }

    #[test]
    fn token_meters_need_no_declaring_and_commit_bodies_default_to_8_mib() {
        let cfg = Config::from_toml(&format!(
            "{BASE}\n[prices.llm]\ninput_tokens = {{ credits = 300, per = 1000000 }}\n\
             cached_input_tokens = {{ credits = 30, per = 1000000 }}\n\
             cache_write_5m_tokens = {{ credits = 375, per = 1000000 }}\n\
             cache_write_1h_tokens = {{ credits = 600, per = 1000000 }}\n\
             output_tokens = {{ credits = 1500, per = 1000000 }}\n"
        ))
        .unwrap();
        for m in TOKEN_METERS {
            assert!(cfg.is_meter(m), "{m}");
        }
        assert!(!cfg.is_meter("cached_tokens"));
        let m = [
            ("input_tokens".to_string(), 1_000_000),
            ("cached_input_tokens".to_string(), 1_000_000),
            ("cache_write_tokens".to_string(), 1_000_000),
            ("cache_write_5m_tokens".to_string(), 1_000_000),
            ("reasoning_tokens".to_string(), 1_000_000),
            ("output_tokens".to_string(), 1_000_000),
        ]
        .into_iter()
        .collect();
        // cache_write_tokens and reasoning_tokens are unpriced here: informational.
        assert_eq!(cfg.price("llm", None, &m), Some(300 + 30 + 375 + 1500));
        assert_eq!(cfg.server.max_commit_body_bytes, 8 << 20);
        assert_eq!(cfg.server.max_body_bytes, 64 << 10);
    }

    #[test]
    fn environment_overrides_urls_and_secrets() {
        let mut cfg = Config::from_toml(BASE).unwrap();
        cfg.apply_env(|k| (k == "TOLLGATE_REDIS_URL").then(|| "redis://other:1".to_string()));
        assert_eq!(cfg.redis.url.as_deref(), Some("redis://other:1"));
        assert_eq!(cfg.postgres.url, None, "no URL: the embedded ledger");
        cfg.apply_env(|k| (k == "TOLLGATE_REDIS_URL").then(String::new));
        assert_eq!(
            cfg.redis.url, None,
            "an empty variable selects the embedded store"
        );
    }

    #[test]
    fn a_store_url_of_the_wrong_kind_is_refused() {
        let mut cfg = Config::from_toml(BASE).unwrap();
        cfg.redis.url = Some("postgres://x".into());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("redis.url"));
        let mut cfg = Config::from_toml(BASE).unwrap();
        cfg.postgres.url = Some("mysql://x".into());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("postgres.url"));
    }
}
