//! Local replies the filter sends instead of forwarding, and the RateLimit headers it adds.

use proxy_wasm::hostcalls;
use tollgate_protocol::{Decision, DenyReason, LimitState};

/// `RateLimit-Limit`, `-Remaining`, `-Reset` (seconds) for the tightest limit of a decision.
pub fn ratelimit_headers(limit: &LimitState, now_ms: u64) -> [(&'static str, String); 3] {
    let reset = if limit.reset_ms == 0 {
        0
    } else {
        limit.reset_ms.saturating_sub(now_ms).div_ceil(1000)
    };
    [
        ("ratelimit-limit", limit.max.to_string()),
        ("ratelimit-remaining", limit.remaining.to_string()),
        ("ratelimit-reset", reset.to_string()),
    ]
}

#[derive(serde::Serialize)]
struct ErrorReply<'a> {
    error: ErrorFields<'a>,
}

#[derive(serde::Serialize)]
struct ErrorFields<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'a str>,
}

fn body(code: &str, message: &str, limit: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&ErrorReply {
        error: ErrorFields {
            code,
            message,
            limit,
        },
    })
    .unwrap_or_default()
}

fn send(status: u32, extra: &[(&str, String)], body: &[u8]) {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
    let _ = hostcalls::send_http_response(status, headers, Some(body));
}

/// The sidecar could not decide in time and the route fails closed.
pub fn unavailable() {
    send(
        503,
        &[],
        &body(
            "unavailable",
            "usage limits cannot be checked right now; retry shortly",
            None,
        ),
    );
}

/// `x-tollgate-shadow` for an admitted request that shadow limits would have refused:
/// `would-deny limit=<name>[,<name>...]`; none when no shadow limit would have.
pub fn shadow_header(d: &Decision) -> Option<String> {
    (!d.shadow.is_empty()).then(|| format!("would-deny limit={}", d.shadow.join(",")))
}

/// `x-tollgate-shadow` for a request of a shadow route the sidecar's check refused: what the
/// refusal would have been (`would-deny limit=<name>`, `would-deny reason=credits`, ...).
pub fn shadow_refusal(d: &Decision) -> String {
    match (&d.limit, d.reason) {
        (Some(l), Some(DenyReason::Limit)) => format!("would-deny limit={}", l.name),
        (_, Some(DenyReason::Credits)) => "would-deny reason=credits".into(),
        (_, Some(DenyReason::Unauthenticated)) => "would-deny reason=invalid_api_key".into(),
        (_, Some(DenyReason::Disabled)) => "would-deny reason=forbidden".into(),
        _ => "would-deny".into(),
    }
}

/// A request refused before asking the sidecar (no key, no route).
pub fn reject(status: u32, code: &str, message: &str) {
    send(status, &[], &body(code, message, None));
}

/// A denial from the sidecar: 429 (limit), 402 (credits), 401 (unknown key), 403 (disabled).
pub fn denied(d: &Decision, now_ms: u64) {
    let (code, message) = match d.reason {
        Some(DenyReason::Limit) => ("rate_limited", "a usage limit was reached"),
        Some(DenyReason::Credits) => (
            "insufficient_credits",
            "not enough credits for this request",
        ),
        Some(DenyReason::Unauthenticated) => ("invalid_api_key", "the API key is not valid"),
        Some(DenyReason::Disabled) => ("forbidden", "this API key or account is disabled"),
        None => ("denied", "request denied"),
    };
    let mut extra: Vec<(&str, String)> = Vec::new();
    if let Some(s) = d.retry_after_s {
        extra.push(("retry-after", s.to_string()));
    }
    if let Some(l) = &d.limit {
        extra.extend(ratelimit_headers(l, now_ms));
    }
    let status = if (400..=599).contains(&d.status) {
        u32::from(d.status)
    } else {
        429
    };
    send(
        status,
        &extra,
        &body(code, message, d.limit.as_ref().map(|l| l.name.as_str())),
    );
}
