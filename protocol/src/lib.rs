//! Wire types shared by the Tollgate filter and sidecar.
//!
//! Everything here is plain data plus validation: no I/O, so the crate builds for `wasm32-wasip1`
//! (the filter) and for the native sidecar alike. One place for each fact: if a field's meaning or
//! bound changes, it changes here and both ends see it.
//!
//! Money and usage are integers (`u64`) everywhere. JSON numbers that are negative, fractional or
//! larger than [`MAX_AMOUNT`] are rejected before anything is charged.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The largest amount a single request may carry for one meter or for credits.
///
/// Redis Lua numbers are IEEE doubles and its JSON encoder prints 14 significant digits, so every
/// value that crosses a script must stay well below 10^14 to remain exact. 10^12 minor units per
/// request is far beyond any real charge and keeps sums of many charges exact.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;

/// The token meters the filter measures from a model's response, each with one meaning whatever
/// the provider (docs/CONFIGURATION.md, "Token meters"): `input_tokens` is uncached input, cache
/// reads and writes are meters of their own, `output_tokens` includes reasoning
/// (`reasoning_tokens` is the part of it), `tokens` is every input kind plus output.
pub const TOKEN_METERS: [&str; 8] = [
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tokens",
];

/// Longest identifier (account id, key id, idempotency key, grant id, route, meter, model).
pub const MAX_ID_LEN: usize = 128;

/// Amounts per meter, e.g. `{"requests": 1, "output_tokens": 512}`. Sorted for stable fingerprints.
pub type Meters = BTreeMap<String, u64>;

/// What a request is for, recorded on its ledger entries (e.g. `image-analysis` / an image id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    pub kind: String,
    pub id: String,
}

/// Ask to spend: authorize (creates a hold), consume (charges at once) and check (changes nothing)
/// all take this shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendRequest {
    /// The caller's API key as presented (the sidecar hashes it; it is never stored or logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Or the account id, for trusted server-side callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The request id / trace id: a repeat with the same key returns the first answer.
    /// Required for authorize and consume, ignored by check.
    #[serde(default)]
    pub idempotency_key: String,
    /// Route name from the filter's rule; selects the price.
    #[serde(default = "default_route")]
    pub route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Estimated (authorize) or actual (consume) amounts per meter.
    #[serde(default)]
    pub meters: Meters,
    /// Extra credits to charge on top of what the route's price gives for `meters`.
    #[serde(default)]
    pub credits: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
    /// The caller's own id for the request (an `x-request-id`, a UUID), recorded on its ledger
    /// entries (the hold and its settlement, or the consume). Not part of the idempotency key nor
    /// of the request's
    /// fingerprint: a repeat with the same `idempotency_key` and another correlation id is the
    /// same request (answered as a replay, charged once, the first one's id kept).
    /// At most [`MAX_CORRELATION_ID_LEN`] bytes of printable ASCII (see
    /// [`validate_correlation_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// Longest `correlation_id`, in bytes.
pub const MAX_CORRELATION_ID_LEN: usize = 128;

pub fn default_route() -> String {
    "default".to_string()
}

/// Raise an open hold's estimate to new totals (a stream that outgrew its hold): every limit the
/// hold counts against and the credit balance are checked for what it adds, all or nothing. The
/// totals are absolute, so a retry adds nothing. Answered with a [`Decision`] (`credits`: what
/// the hold now holds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub hold_id: String,
    /// New totals of the meters to raise; a meter not named, or named below the hold's
    /// estimate, keeps its estimate.
    pub meters: Meters,
}

impl ExtendRequest {
    pub fn validate(&self) -> Result<(), InvalidField> {
        split_hold_id(&self.hold_id)?;
        if self.meters.is_empty() {
            return Err(invalid("meters", "name at least one meter"));
        }
        validate_meters(&self.meters)
    }
}

/// Settle a hold with the actual usage (commit). The difference to the estimate is charged or
/// returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub hold_id: String,
    /// Route and model the usage is priced with. When `route` is absent, the route and model
    /// the hold was authorized with are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub meters: Meters,
    #[serde(default)]
    pub credits: u64,
    /// The text the response carried, when it had no `usage` object: the sidecar counts its
    /// tokens with the model's tokenizer and charges them as `output_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_text: Option<String>,
}

/// Longest `output_text` a commit may carry.
pub const MAX_OUTPUT_TEXT: usize = 1 << 20;

/// Several commits in one call (the filter batches its settlements). At most
/// [`MAX_BATCH`] items; each is applied on its own, in any order, and answered in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBatch {
    pub commits: Vec<CommitRequest>,
}

pub const MAX_BATCH: usize = 1000;

/// One item's answer in a batch: the settlement, or the error it would have had alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommitOutcome {
    Settled(Settlement),
    Failed { status: u16, error: ErrorDetail },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitBatchResult {
    pub results: Vec<CommitOutcome>,
}

/// Several authorizes in one call (the filter batches the requests that arrive while a worker's
/// authorize is in flight). At most [`MAX_AUTHORIZE_BATCH`] items; each is decided on its own —
/// all or nothing, idempotent by its own key — and answered in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeBatch {
    pub requests: Vec<SpendRequest>,
}

pub const MAX_AUTHORIZE_BATCH: usize = 256;

/// One item's answer in an authorize batch: its decision (and whether it replays an earlier
/// request with the same key, the `x-tollgate-replayed` of a single authorize), or the error it
/// would have had alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuthorizeOutcome {
    Decided {
        decision: Decision,
        #[serde(default)]
        replayed: bool,
    },
    Failed {
        status: u16,
        error: ErrorDetail,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeBatchResult {
    pub results: Vec<AuthorizeOutcome>,
}

/// Cancel a hold; everything it reserved is returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub hold_id: String,
}

/// Give up on a decision by its idempotency key (the filter, when its deadline passed or the
/// client went away before the answer came): the hold is released if it was made, and can no
/// longer be made if not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub api_key: String,
    pub idempotency_key: String,
}

impl CancelRequest {
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.api_key.is_empty() || self.api_key.len() > 256 {
            return Err(invalid("api_key", "must be 1..=256 characters"));
        }
        validate_id("idempotency_key", &self.idempotency_key)
    }
}

/// Add credit to an account (admin).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Unique per account; also the idempotency key of the grant.
    pub grant_id: String,
    pub amount: u64,
    /// Lower numbers are spent first (0..=9999).
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Unix milliseconds after which the grant's remainder is no longer spendable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Why: `purchase`, `promotion`, `refund`, `plan`, `adjustment`, ...
    #[serde(default = "default_source")]
    pub source: String,
}

pub fn default_priority() -> u32 {
    100
}

pub fn default_source() -> String {
    "adjustment".to_string()
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// A limit (meter, window, max) would be exceeded: HTTP 429.
    Limit,
    /// Not enough spendable credit: HTTP 402.
    Credits,
    /// Unknown API key: HTTP 401.
    Unauthenticated,
    /// Account or key disabled: HTTP 403.
    Disabled,
}

impl DenyReason {
    /// The status the edge should answer with.
    pub fn http_status(self) -> u16 {
        match self {
            DenyReason::Limit => 429,
            DenyReason::Credits => 402,
            DenyReason::Unauthenticated => 401,
            DenyReason::Disabled => 403,
        }
    }
}

/// The state of the tightest limit a decision touched: what RateLimit headers report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitState {
    /// `scope:meter:window`, e.g. `account:requests:day` or `key:tokens:minute`.
    pub name: String,
    pub max: u64,
    pub remaining: u64,
    /// Unix milliseconds when the window resets (0 for `lifetime`).
    pub reset_ms: u64,
}

/// The answer to authorize / consume / check. Always sent with HTTP 200: a 5xx means the sidecar
/// itself is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    /// HTTP status the edge should use: 200 when allowed, else 429 / 402 / 401 / 403.
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenyReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Set by authorize when allowed: commit or release it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
    /// When the hold expires (unix ms) if it is not settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_expires_ms: Option<u64>,
    /// The limit that denied, or the tightest one when allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitState>,
    /// Seconds until retrying can succeed (denied by a limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// Credits held (authorize), charged (consume) or required (check / denied).
    pub credits: u64,
    /// Spendable credit after this decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<u64>,
    /// Shadow limits that would have refused this request had they been enforced (their
    /// names); it passed anyway. The filter reports them in `x-tollgate-shadow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<String>,
    /// Soft limits this request took (or found) past their max, and by how much.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub over: Vec<Overage>,
}

/// A soft limit past its max: the request passed, the overage is reported and alerted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overage {
    pub limit: String,
    pub by: u64,
}

/// The answer to commit / release (and to the sweeper's expiry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub hold_id: String,
    /// `committed`, `released` or `expired`.
    pub status: String,
    /// Credits finally charged for the hold.
    pub credits: u64,
    /// Credits the actual usage cost beyond what could be drawn (balance never goes below zero).
    #[serde(default)]
    pub shortfall: u64,
    #[serde(default)]
    pub meters: Meters,
}

/// The body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `invalid_request`, `not_found`, `conflict`, `unauthorized`,
    /// `unavailable` or `internal`.
    pub code: String,
    pub message: String,
}

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidField {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Identifiers are 1..=128 characters of `[A-Za-z0-9_.:-]`: safe inside Redis key names, log
/// lines and URLs, and free of the `/` that separates a hold id's account from its request id.
pub fn validate_id(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!("longer than {MAX_ID_LEN} characters"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(invalid(
            field,
            format!("contains {c:?}; allowed are letters, digits and _ . : -"),
        ));
    }
    Ok(())
}

/// A correlation id is 1..=128 bytes of printable ASCII without space (0x21..=0x7e): what a
/// client puts in `x-request-id` (a UUID, a trace id), wider than an [identifier](validate_id)
/// since it is never part of a key name, only stored beside the ledger entry.
pub fn validate_correlation_id(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_CORRELATION_ID_LEN {
        return Err(invalid(
            field,
            format!("longer than {MAX_CORRELATION_ID_LEN} bytes"),
        ));
    }
    if let Some(c) = value.chars().find(|c| !matches!(*c, '\x21'..='\x7e')) {
        return Err(invalid(
            field,
            format!("contains {c:?}; allowed is printable ASCII without space (0x21..=0x7e)"),
        ));
    }
    Ok(())
}

pub fn validate_amount(field: &str, value: u64) -> Result<(), InvalidField> {
    if value > MAX_AMOUNT {
        return Err(invalid(
            field,
            format!("{value} exceeds the maximum {MAX_AMOUNT}"),
        ));
    }
    Ok(())
}

pub fn validate_meters(meters: &Meters) -> Result<(), InvalidField> {
    if meters.len() > 32 {
        return Err(invalid("meters", "more than 32 meters"));
    }
    for (name, amount) in meters {
        validate_id("meters", name)?;
        validate_amount(&format!("meters.{name}"), *amount)?;
    }
    Ok(())
}

impl SpendRequest {
    /// Validates everything but the idempotency key, which only mutating calls require.
    pub fn validate(&self, needs_idempotency_key: bool) -> Result<(), InvalidField> {
        match (&self.api_key, &self.account) {
            (None, None) => {
                return Err(invalid("api_key", "either api_key or account is required"))
            }
            (Some(_), Some(_)) => {
                return Err(invalid("account", "give api_key or account, not both"))
            }
            (Some(k), None) => {
                if k.is_empty() || k.len() > 256 {
                    return Err(invalid("api_key", "must be 1..=256 characters"));
                }
            }
            (None, Some(a)) => validate_id("account", a)?,
        }
        if needs_idempotency_key {
            validate_id("idempotency_key", &self.idempotency_key)?;
        }
        validate_id("route", &self.route)?;
        if let Some(m) = &self.model {
            validate_id("model", m)?;
        }
        validate_meters(&self.meters)?;
        validate_amount("credits", self.credits)?;
        if let Some(r) = &self.resource {
            validate_id("resource.kind", &r.kind)?;
            validate_id("resource.id", &r.id)?;
        }
        if let Some(c) = &self.correlation_id {
            validate_correlation_id("correlation_id", c)?;
        }
        Ok(())
    }
}

/// A hold id is `<account>/<idempotency key>`.
pub fn split_hold_id(hold_id: &str) -> Result<(&str, &str), InvalidField> {
    let (account, key) = hold_id
        .split_once('/')
        .ok_or_else(|| invalid("hold_id", "expected <account>/<request id>"))?;
    validate_id("hold_id", account)?;
    validate_id("hold_id", key)?;
    Ok((account, key))
}

impl CommitRequest {
    pub fn validate(&self) -> Result<(), InvalidField> {
        split_hold_id(&self.hold_id)?;
        if let Some(r) = &self.route {
            validate_id("route", r)?;
        }
        if let Some(m) = &self.model {
            validate_id("model", m)?;
        }
        validate_meters(&self.meters)?;
        if self
            .output_text
            .as_ref()
            .is_some_and(|t| t.len() > MAX_OUTPUT_TEXT)
        {
            return Err(invalid(
                "output_text",
                format!("longer than {MAX_OUTPUT_TEXT} bytes"),
            ));
        }
        validate_amount("credits", self.credits)
    }
}

impl GrantRequest {
    pub fn validate(&self) -> Result<(), InvalidField> {
        validate_id("grant_id", &self.grant_id)?;
        validate_id("source", &self.source)?;
        if self.amount == 0 {
            return Err(invalid("amount", "must be positive"));
        }
        validate_amount("amount", self.amount)?;
        if self.priority > 9999 {
            return Err(invalid("priority", "must be 0..=9999"));
        }
        if let Some(e) = self.expires_at_ms {
            if e >= 10_000_000_000_000 {
                return Err(invalid("expires_at_ms", "beyond year 2286"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_separators_and_control_characters() {
        assert!(validate_id("x", "acct_1.a:b-c").is_ok());
        for bad in ["", "a/b", "a b", "a{b}", "é", "a\nb"] {
            assert!(validate_id("x", bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_id("x", &"a".repeat(129)).is_err());
    }

    #[test]
    fn negative_fractional_and_huge_amounts_do_not_parse_or_validate() {
        for body in [
            r#"{"account":"a","idempotency_key":"k","meters":{"requests":-1}}"#,
            r#"{"account":"a","idempotency_key":"k","meters":{"requests":1.5}}"#,
            r#"{"account":"a","idempotency_key":"k","meters":{"requests":99999999999999999999999}}"#,
            r#"{"account":"a","idempotency_key":"k","bogus":1}"#,
        ] {
            assert!(
                serde_json::from_str::<SpendRequest>(body).is_err(),
                "{body}"
            );
        }
        let r: SpendRequest = serde_json::from_str(
            r#"{"account":"a","idempotency_key":"k","meters":{"requests":1000000000001}}"#,
        )
        .unwrap();
        assert_eq!(r.validate(true).unwrap_err().field, "meters.requests");
    }

    #[test]
    fn correlation_ids_are_printable_ascii_up_to_128_bytes() {
        for good in [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "req/1?x=\"a\"\\{b}",
            "!",
            &"~".repeat(128),
        ] {
            assert!(
                validate_correlation_id("c", good).is_ok(),
                "{good:?} refused"
            );
        }
        for bad in [
            "",
            "a b",
            "a\tb",
            "a\nb",
            "é",
            "a\u{7f}",
            "\0",
            &"a".repeat(129),
        ] {
            let e = validate_correlation_id("c", bad).unwrap_err();
            assert_eq!(e.field, "c", "{bad:?}");
        }
        // On a spend request: optional, validated, and a field error names it.
        let mut r: SpendRequest = serde_json::from_str(
            r#"{"account":"a","idempotency_key":"k","correlation_id":"trace-1"}"#,
        )
        .unwrap();
        assert_eq!(r.correlation_id.as_deref(), Some("trace-1"));
        assert!(r.validate(true).is_ok());
        r.correlation_id = Some("has space".into());
        assert_eq!(r.validate(true).unwrap_err().field, "correlation_id");
        r.correlation_id = None;
        assert!(r.validate(true).is_ok());
        assert!(!serde_json::to_string(&r)
            .unwrap()
            .contains("correlation_id"));
        assert!(serde_json::from_str::<SpendRequest>(
            r#"{"account":"a","idempotency_key":"k","correlation_id":7}"#
        )
        .is_err());
    }

    #[test]
    fn hold_ids_split_at_the_first_slash() {
        assert_eq!(split_hold_id("acct/req-1").unwrap(), ("acct", "req-1"));
        assert!(split_hold_id("acct").is_err());
        assert!(split_hold_id("a/b/c").is_err());
    }

    #[test]
    fn exactly_one_caller_identity() {
        let mut r = SpendRequest {
            idempotency_key: "k".into(),
            route: "default".into(),
            ..Default::default()
        };
        assert!(r.validate(true).is_err());
        r.account = Some("a".into());
        assert!(r.validate(true).is_ok());
        r.api_key = Some("tg_x".into());
        assert!(r.validate(true).is_err());
    }
}
