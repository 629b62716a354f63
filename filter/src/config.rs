//! The filter's configuration: JSON from Envoy's plugin configuration, validated once in
//! `on_configure`. A bad configuration is refused with a message naming the field, e.g.
//! `routes[2].charges.output_tokens.cap: must be at least default`.

use serde::Deserialize;
use std::collections::BTreeMap;
use tollgate_protocol::{validate_id, MAX_AMOUNT};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// What to do when the sidecar cannot answer in time (unreachable, slow, 5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Let the request through uncharged.
    Open,
    /// Answer 503.
    Closed,
}

/// Where the caller's API key is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    /// A request header, e.g. `x-api-key`.
    Header(String),
    /// `Authorization: Bearer <key>`.
    Bearer,
}

/// What to do with a request that matches no route, or has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    Pass,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Envoy cluster of the sidecar.
    pub cluster: String,
    /// `:authority` of the callouts.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Envoy's own timeout for one callout.
    #[serde(default = "default_callout_timeout")]
    pub timeout_ms: u64,
    /// The sidecar's decision token (`server.decision_token`), sent on every callout as
    /// `authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
}

impl Sidecar {
    /// The headers of a callout to `path`.
    pub fn headers<'a>(&'a self, path: &'a str, auth: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut h = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", self.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if !auth.is_empty() {
            h.push(("authorization", auth));
        }
        h
    }
}

fn default_authority() -> String {
    "tollgate-sidecar".into()
}
fn default_callout_timeout() -> u64 {
    200
}

/// One field name, or several tried in order (`["max_tokens", "max_completion_tokens"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldNames(pub Vec<String>);

impl<'de> Deserialize<'de> for FieldNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldNames;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name or a list of them")
            }
            fn visit_str<E>(self, v: &str) -> Result<FieldNames, E> {
                Ok(FieldNames(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FieldNames, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(FieldNames(names))
            }
        }
        d.deserialize_any(V)
    }
}

impl FieldNames {
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

/// How an estimated amount for one meter is found before the request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// A fixed amount per request.
    #[serde(default)]
    pub fixed: Option<u64>,
    /// Top-level fields of the JSON request body (e.g. `max_tokens`), the first present one
    /// counts, capped at `cap`.
    #[serde(default)]
    pub body_field: Option<FieldNames>,
    /// The cap when `cap` is not given (older configurations).
    #[serde(default)]
    pub default: u64,
    /// The most one request is estimated at, and what it is estimated at when the field is
    /// missing, is not a non-negative integer, or the body cannot be read: a caller cannot
    /// lower its estimate by leaving the field out or sending `"8192"`.
    #[serde(default)]
    pub cap: Option<u64>,
}

impl Charge {
    /// The estimate when the body cannot say (and the most it may say).
    pub fn cap_amount(&self) -> u64 {
        self.cap.unwrap_or(self.default).min(MAX_AMOUNT)
    }
}

/// What a route does with a request body whose estimate cannot be read (not JSON, too large,
/// compressed, or a charged field that is not a non-negative integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadEstimate {
    /// Estimate it at the charge's `cap`.
    #[default]
    Cap,
    /// Refuse it: 400 (unreadable or a bad field value), 413 (too large), 415 (compressed).
    Reject,
}

/// What an upstream error response (4xx/5xx) that carries no usage is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUpstreamError {
    /// Nothing: the hold is released.
    #[default]
    Release,
    /// Only the `requests` meter (every other meter 0).
    Requests,
    /// The estimate.
    Estimate,
}

/// Where the actual usage comes from after the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The estimate is final: nothing is measured.
    Estimate,
    /// The JSON `usage` object, OpenAI or Anthropic shape; SSE streams (`text/event-stream`)
    /// are read event by event.
    Body,
    /// A response header holding a number.
    Header,
    /// The response body's size in bytes.
    Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub source: UsageSource,
    /// For `header`: its name; for `header` and `bytes`: the meter it measures.
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub meter: Option<String>,
    /// OpenAI-shaped streaming requests (`"stream": true`) without
    /// `stream_options.include_usage` get it added to their body, so the stream reports exact
    /// usage. Default: on for `body` routes whose path has `completions` or `/chat` in it
    /// (OpenAI-shaped); set it for others (Anthropic's API refuses unknown fields).
    #[serde(default)]
    pub include_usage: Option<bool>,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            source: UsageSource::Estimate,
            header: None,
            meter: None,
            include_usage: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Sent to the sidecar, which prices the usage by it.
    pub name: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Paths compare case-insensitively unless this is true (`/V1/chat` is `/v1/chat`: a path
    /// the upstream may serve the same must not escape its route).
    #[serde(default)]
    pub case_sensitive: bool,
    /// What an estimate that cannot be read is charged (or whether it is refused).
    #[serde(default)]
    pub bad_estimate: BadEstimate,
    /// What an upstream 4xx/5xx without usage is charged.
    #[serde(default)]
    pub on_upstream_error: OnUpstreamError,
    /// Opt-in client idempotency: a request header (e.g. `idempotency-key`) whose value keys
    /// the decision; a repeat of a key already admitted is refused with 409, never served.
    #[serde(default)]
    pub idempotency_header: Option<String>,
    /// Overrides the filter-wide failure mode.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// Meter -> how its estimate is found.
    #[serde(default)]
    pub charges: BTreeMap<String, Charge>,
    #[serde(default)]
    pub usage: Usage,
    /// A JSON body field naming the model (e.g. `model`), sent for pricing.
    #[serde(default)]
    pub model_field: Option<String>,
    /// Opt-in: serve requests from a local allowance instead of a callout each (see `lease.rs`).
    #[serde(default)]
    pub lease: Option<LeaseConfig>,
    /// Shadow mode: each request is decided (a `/v1/check` at the sidecar, which changes
    /// nothing) and passes whatever the answer; a refusal is reported in `x-tollgate-shadow`
    /// and counted (`tollgate.shadow_would_deny`). Nothing is refused, held or charged.
    #[serde(default)]
    pub shadow: bool,
    /// Opt-in: a streamed answer is counted as it passes, its hold extended before the stream
    /// outgrows it, and the stream ended cleanly when the sidecar refuses (see `budget.rs`).
    #[serde(default)]
    pub stream_budget: Option<StreamBudgetConfig>,
}

/// A route's `stream_budget`: how a stream's output is counted and how far its hold is raised
/// each time. The metered output is `output_tokens` (the route must charge it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamBudgetConfig {
    /// How many output tokens each extension adds to the hold.
    #[serde(default = "default_budget_step")]
    pub step: u64,
    /// Bytes of generated text counted as one token while the stream runs (the commit counts
    /// the delivered text exactly). Lower is stricter.
    #[serde(default = "default_bytes_per_token")]
    pub bytes_per_token: u64,
}

fn default_budget_step() -> u64 {
    256
}

fn default_bytes_per_token() -> u64 {
    4
}

/// A lease: the sidecar holds `requests` times a request's estimate against the account at once
/// (an ordinary hold, so limits and credits are checked as for any request), and this Envoy
/// worker spends it locally for up to `ttl_ms`, then commits what was actually used. The
/// operator bounds what a worker may have outstanding: `requests` × the estimate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// How many requests' estimates one lease holds.
    pub requests: u64,
    /// How long a lease may be spent before it is settled.
    #[serde(default = "default_lease_ttl")]
    pub ttl_ms: u64,
}

fn default_lease_ttl() -> u64 {
    2000
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub sidecar: Sidecar,
    /// The longest a request waits for a decision; then the failure mode applies.
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    #[serde(default = "default_failure_mode")]
    pub failure_mode: FailureMode,
    pub key: KeySource,
    #[serde(default = "default_reject")]
    pub missing_key: Unmatched,
    #[serde(default = "default_pass")]
    pub unmatched: Unmatched,
    /// Upstream statuses that release the hold instead of charging.
    #[serde(default = "default_release_statuses")]
    pub release_statuses: Vec<u16>,
    /// Most bytes of a response body read for usage; past it the estimate is charged.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Commits are sent in batches of at most this many, at least every `commit_interval_ms`.
    #[serde(default = "default_batch")]
    pub commit_batch: usize,
    #[serde(default = "default_commit_interval")]
    pub commit_interval_ms: u64,
    /// Most bytes of one commit batch's body; a batch is split to fit (an item larger than
    /// this goes alone). The sidecar accepts 8 MiB by default (`server.max_commit_body_bytes`).
    #[serde(default = "default_batch_bytes")]
    pub commit_batch_bytes: usize,
    /// Authorize callouts a worker keeps in flight; a request that comes while this many are
    /// out waits in the root context and goes in the next batch, sent as soon as one answers.
    #[serde(default = "default_authorize_inflight")]
    pub authorize_inflight: u32,
    /// Most requests in one authorize batch; 0 turns batching off (a callout per request).
    #[serde(default = "default_authorize_batch")]
    pub authorize_batch: usize,
    pub routes: Vec<Route>,
}

fn default_authorize_inflight() -> u32 {
    1
}
fn default_authorize_batch() -> usize {
    64
}
fn default_deadline() -> u64 {
    100
}
fn default_failure_mode() -> FailureMode {
    FailureMode::Closed
}
fn default_reject() -> Unmatched {
    Unmatched::Reject
}
fn default_pass() -> Unmatched {
    Unmatched::Pass
}
fn default_release_statuses() -> Vec<u16> {
    vec![500, 502, 503, 504]
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_batch() -> usize {
    100
}
fn default_commit_interval() -> u64 {
    20
}
fn default_batch_bytes() -> usize {
    1 << 20
}

impl FilterConfig {
    /// Parses and validates; the error names the field.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: FilterConfig = serde_json::from_slice(bytes)
            .map_err(|e| err("configuration", format!("invalid JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.sidecar.cluster.is_empty() {
            return Err(err("sidecar.cluster", "must not be empty"));
        }
        if let Some(t) = &self.sidecar.token {
            if t.len() < 16 || t.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
                return Err(err(
                    "sidecar.token",
                    "must be at least 16 printable characters without spaces",
                ));
            }
        }
        if !(1..=60_000).contains(&self.sidecar.timeout_ms) {
            return Err(err("sidecar.timeout_ms", "must be 1..=60000"));
        }
        if !(1..=60_000).contains(&self.deadline_ms) {
            return Err(err("deadline_ms", "must be 1..=60000"));
        }
        if let KeySource::Header(h) = &self.key {
            if h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase() || b == b' ') {
                return Err(err("key.header", "must be a lower-case header name"));
            }
        }
        if let Some(s) = self
            .release_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(err(
                "release_statuses",
                format!("{s} is not an HTTP status"),
            ));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > 64 << 20 {
            return Err(err("max_body_bytes", "must be 1..=67108864"));
        }
        if !(1..=tollgate_protocol::MAX_BATCH).contains(&self.commit_batch) {
            return Err(err("commit_batch", "must be 1..=1000"));
        }
        if !(64 << 10..=64 << 20).contains(&self.commit_batch_bytes) {
            return Err(err("commit_batch_bytes", "must be 65536..=67108864"));
        }
        if self.commit_interval_ms == 0 {
            return Err(err("commit_interval_ms", "must be positive"));
        }
        if !(1..=64).contains(&self.authorize_inflight) {
            return Err(err("authorize_inflight", "must be 1..=64"));
        }
        if self.authorize_batch > tollgate_protocol::MAX_AUTHORIZE_BATCH {
            return Err(err("authorize_batch", "must be 0..=256"));
        }
        if self.routes.is_empty() {
            return Err(err("routes", "declare at least one route"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.validate(&format!("routes[{i}]"))?;
        }
        Ok(())
    }
}

impl Route {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        validate_id("name", &self.name).map_err(|e| err(format!("{at}.name"), e.problem))?;
        if self.path_prefix.is_some() && self.path_exact.is_some() {
            return Err(err(
                format!("{at}.path_exact"),
                "give path_prefix or path_exact, not both",
            ));
        }
        for (field, p) in [
            ("path_prefix", &self.path_prefix),
            ("path_exact", &self.path_exact),
        ] {
            if let Some(p) = p {
                if !p.starts_with('/') {
                    return Err(err(format!("{at}.{field}"), "must start with /"));
                }
            }
        }
        if self.charges.is_empty() {
            return Err(err(format!("{at}.charges"), "declare at least one meter"));
        }
        for (meter, c) in &self.charges {
            let f = format!("{at}.charges.{meter}");
            validate_id("meter", meter).map_err(|e| err(&f, e.problem))?;
            match (c.fixed, &c.body_field) {
                (Some(_), Some(_)) => return Err(err(&f, "give fixed or body_field, not both")),
                (None, None) => return Err(err(&f, "give fixed or body_field")),
                _ => {}
            }
            for (name, v) in [
                ("fixed", c.fixed),
                ("default", Some(c.default)),
                ("cap", c.cap),
            ] {
                if v.is_some_and(|v| v > MAX_AMOUNT) {
                    return Err(err(
                        format!("{f}.{name}"),
                        format!("must be at most {MAX_AMOUNT}"),
                    ));
                }
            }
            if c.cap.is_some_and(|cap| cap < c.default) {
                return Err(err(format!("{f}.cap"), "must be at least default"));
            }
            if let Some(names) = &c.body_field {
                if names.names().is_empty() || names.names().iter().any(String::is_empty) {
                    return Err(err(
                        format!("{f}.body_field"),
                        "give one or more non-empty field names",
                    ));
                }
                if c.cap.is_none() && c.default == 0 {
                    return Err(err(
                        format!("{f}.cap"),
                        "required with body_field: it is the estimate when the field is missing or unreadable",
                    ));
                }
            }
        }
        if let Some(h) = &self.idempotency_header {
            if h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase() || b == b' ') {
                return Err(err(
                    format!("{at}.idempotency_header"),
                    "must be a lower-case header name",
                ));
            }
        }
        if self.shadow && (self.lease.is_some() || self.idempotency_header.is_some()) {
            // A lease is a real hold, and a client key is refused on its repeat: neither is
            // what a route that never refuses or charges can do.
            return Err(err(
                format!("{at}.shadow"),
                "a shadow route cannot have a lease or an idempotency_header",
            ));
        }
        if let Some(b) = &self.stream_budget {
            let f = format!("{at}.stream_budget");
            if self.shadow || self.lease.is_some() {
                return Err(err(
                    &f,
                    "needs a hold of its own: not on a shadow route or one with a lease",
                ));
            }
            if self.usage.source != UsageSource::Body {
                return Err(err(&f, "needs usage.source = body (the stream is read)"));
            }
            if !self.charges.contains_key("output_tokens") {
                return Err(err(
                    &f,
                    "the route must charge output_tokens (the hold's output is what is extended)",
                ));
            }
            if !(1..=MAX_AMOUNT).contains(&b.step) {
                return Err(err(format!("{f}.step"), "must be at least 1"));
            }
            if !(1..=16).contains(&b.bytes_per_token) {
                return Err(err(format!("{f}.bytes_per_token"), "must be 1..=16"));
            }
        }
        if let Some(l) = &self.lease {
            if !(2..=10_000).contains(&l.requests) {
                return Err(err(format!("{at}.lease.requests"), "must be 2..=10000"));
            }
            if !(100..=60_000).contains(&l.ttl_ms) {
                return Err(err(
                    format!("{at}.lease.ttl_ms"),
                    "must be 100..=60000 (a lease is settled well before its hold expires)",
                ));
            }
        }
        let u = &self.usage;
        match u.source {
            UsageSource::Header if u.header.is_none() => {
                return Err(err(
                    format!("{at}.usage.header"),
                    "required when source is header",
                ))
            }
            UsageSource::Header | UsageSource::Bytes => match &u.meter {
                Some(m) if self.charges.contains_key(m) => {}
                Some(m) => {
                    return Err(err(
                        format!("{at}.usage.meter"),
                        format!("{m:?} must also be in charges (its counter is made at authorize)"),
                    ))
                }
                None => {
                    return Err(err(
                        format!("{at}.usage.meter"),
                        "required for header and bytes",
                    ))
                }
            },
            _ => {}
        }
        Ok(())
    }

    /// Whether a request matches this route. `path` is already normalized
    /// ([`crate::path::normalize`]: no query, no dot segments, no doubled slashes, unreserved
    /// characters decoded). Hosts compare case-insensitively without a port or a trailing dot.
    pub fn matches(&self, method: &str, host: &str, path: &str) -> bool {
        let host = host_name(host);
        let path_is = |want: &str, prefix: bool| {
            let got = if prefix {
                path.get(..want.len())
            } else {
                Some(path)
            };
            got.is_some_and(|g| {
                if self.case_sensitive {
                    g == want
                } else {
                    g.eq_ignore_ascii_case(want)
                }
            })
        };
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .host
                .as_deref()
                .is_none_or(|h| host_name(h).eq_ignore_ascii_case(host))
            && self.path_exact.as_deref().is_none_or(|p| path_is(p, false))
            && self.path_prefix.as_deref().is_none_or(|p| path_is(p, true))
    }

    /// Whether an OpenAI-shaped streaming request gets `stream_options.include_usage` added.
    pub fn include_usage(&self) -> bool {
        self.usage.source == UsageSource::Body
            && self.usage.include_usage.unwrap_or_else(|| {
                [&self.path_prefix, &self.path_exact]
                    .into_iter()
                    .flatten()
                    .any(|p| {
                        let p = p.to_ascii_lowercase();
                        p.contains("completions") || p.contains("/chat")
                    })
            })
    }
}

/// A host without its port and trailing dot (`API.example.com.:443` → `API.example.com`).
fn host_name(host: &str) -> &str {
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host.strip_suffix('.').unwrap_or(host)
}

impl FilterConfig {
    /// `Bearer <token>` for callouts, or empty without a token.
    pub fn sidecar_auth(&self) -> String {
        self.sidecar
            .token
            .as_deref()
            .map_or_else(String::new, |t| format!("Bearer {t}"))
    }

    /// The first route that matches.
    pub fn route_for(&self, method: &str, host: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, host, path))
    }
}
