//! One request's pipeline: canonical path and route, key, idempotency key, estimate, ask the
//! sidecar (paused until it answers or the root's tick applies the deadline), then measure the
//! response and queue its settlement.
//!
//! Everything the client sends is treated as an attempt to pay less: the decision's
//! idempotency key is the filter's own (a client's `x-request-id` is only a correlation id), the
//! route is matched on the canonical path ([`crate::path`]), an estimate that cannot be read is
//! charged at its cap, the response is asked for uncompressed, and a stream is asked to report
//! its usage. See docs/FILTER.md, "What a client cannot do".

use crate::authz::{Admission, Item};
use crate::body::{Field, RequestBody};
use crate::budget::{Stop, StreamBudget, Verdict};
use crate::config::{
    BadEstimate, FailureMode, FilterConfig, KeySource, OnUpstreamError, Route, Unmatched,
    UsageSource,
};
use crate::path;
use crate::reply;
use crate::shared::{bump, now_ms, record, Pending, Settle, SharedRef, Waiting, MAX_QUEUED_TEXT};
use crate::usage::{header_amount, JsonBody, SseBody, TokenUsage};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::rc::Rc;
use std::time::Duration;
use tollgate_protocol::{
    validate_correlation_id, validate_id, CommitRequest, Decision, ExtendRequest, LimitState,
    Meters, SpendRequest,
};

/// Most bytes read of a response body held for a stream budget (Envoy's own buffer limit
/// applies long before).
const MAX_HELD: usize = 64 << 20;

/// Longest SSE line kept while looking for usage (events are small; a longer line is skipped).
const MAX_SSE_LINE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not ours (no route, passed, refused, or failed open): nothing to settle.
    Idle,
    /// Waiting for the request body to read the estimate.
    ReadingBody,
    /// Waiting for the sidecar.
    Deciding,
    /// Allowed with a hold: measure the response and settle.
    Allowed,
    Settled,
}

enum Measure {
    Estimate,
    /// The response is compressed (the upstream ignored `accept-encoding: identity`).
    Unreadable,
    Json(JsonBody),
    Sse(Box<SseBody>),
    Header(Option<u64>),
    Bytes,
}

/// Why a request body's estimate could not be read: what a route that refuses such bodies
/// answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreadable {
    NotJson,
    BadField,
    TooLarge,
    Compressed,
}

impl Unreadable {
    fn reply(self) {
        let (status, code, msg) = match self {
            Unreadable::NotJson => (400, "invalid_body", "the request body is not a JSON object"),
            Unreadable::BadField => (
                400,
                "invalid_estimate",
                "a field the charge is estimated from is not a non-negative integer",
            ),
            Unreadable::TooLarge => (413, "body_too_large", "the request body is too large"),
            Unreadable::Compressed => (
                415,
                "compressed_body",
                "compressed request bodies are not accepted on this route",
            ),
        };
        reply::reject(status, code, msg);
    }
}

pub struct Request {
    id: u32,
    shared: SharedRef,
    cfg: Rc<FilterConfig>,
    route: Option<usize>,
    api_key: String,
    /// The decision's idempotency key: made by the filter, or the client's `Idempotency-Key`
    /// on a route that opts in (`client_key`).
    request_id: String,
    client_key: bool,
    /// The client's `x-request-id`, kept on the ledger entry as a correlation id.
    correlation_id: Option<String>,
    body_too_large: bool,
    /// The request body is compressed (`content-encoding`): its estimate cannot be read.
    body_compressed: bool,
    estimate: Meters,
    model: Option<String>,
    phase: Phase,
    asked_ms: u64,
    hold_id: Option<String>,
    limit: Option<LimitState>,
    release: bool,
    /// The upstream answered 4xx/5xx (not in `release_statuses`).
    upstream_error: bool,
    measure: Measure,
    response_bytes: u64,
    /// Admitted from this lease (no hold of its own).
    lease: Option<u64>,
    /// This request's own authorize callout is out (the SDK answers it to this context; Envoy
    /// drops it with the stream).
    single_inflight: bool,
    /// Its authorize waited for the line and went (or goes) in the root's batch.
    batched: bool,
    /// `x-tollgate-shadow` for the response (see `reply::shadow_header`).
    shadow: Option<String>,
    /// The route is in shadow mode: its callout is a check, and nothing is refused or settled.
    shadow_route: bool,
    /// A streamed answer on a route with `stream_budget`: counted as it passes.
    budget: Option<StreamBudget>,
    /// The upstream's answer has ended (its last body call said so).
    response_ended: bool,
}

/// A header's value. Read as bytes: the SDK's string getter panics on a value that is not
/// UTF-8, which a client controls.
pub fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The status (0 when there is none: no answer came) and body of the callout answering now.
pub(crate) fn call_answer(body_size: usize) -> (u16, Vec<u8>) {
    let status = header(MapType::HttpCallResponseHeaders, ":status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

/// Whether the callout answering now replays an earlier request with the same key.
pub(crate) fn replayed() -> bool {
    header(MapType::HttpCallResponseHeaders, "x-tollgate-replayed").is_some_and(|v| v == "true")
}

fn req_header(name: &str) -> Option<String> {
    header(MapType::HttpRequestHeaders, name)
}

fn resp_header(name: &str) -> Option<String> {
    header(MapType::HttpResponseHeaders, name)
}

/// A `content-encoding` that is set and not `identity`.
fn compressed(encoding: Option<String>) -> bool {
    encoding.is_some_and(|e| {
        let e = e.trim();
        !e.is_empty() && !e.eq_ignore_ascii_case("identity")
    })
}

/// Sends `POST /v1/authorize` to the sidecar (for a request, or for a lease); the answer comes
/// back to the context that called this. Returns the callout's token.
pub(crate) fn dispatch_authorize(
    cfg: &FilterConfig,
    req: &SpendRequest,
) -> Result<u32, proxy_wasm::types::Status> {
    dispatch_decision(cfg, "/v1/authorize", req)
}

/// A shadow route's decision: `/v1/check`, which changes nothing at the sidecar.
fn dispatch_check(
    cfg: &FilterConfig,
    req: &SpendRequest,
) -> Result<u32, proxy_wasm::types::Status> {
    dispatch_decision(cfg, "/v1/check", req)
}

fn dispatch_decision(
    cfg: &FilterConfig,
    path: &str,
    req: &SpendRequest,
) -> Result<u32, proxy_wasm::types::Status> {
    let body = serde_json::to_vec(req).unwrap_or_default();
    let auth = cfg.sidecar_auth();
    hostcalls::dispatch_http_call(
        &cfg.sidecar.cluster,
        cfg.sidecar.headers(path, &auth),
        Some(&body),
        vec![],
        Duration::from_millis(cfg.sidecar.timeout_ms),
    )
}

/// A non-cryptographic 64-bit hash (FNV-1a), for client keys too long or odd to use as ids.
fn fnv(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The decision key for a client's `Idempotency-Key`: itself when it is a short id, else a
/// 128-bit hash of it. Keys are per account (a hold id is `<account>/<key>`).
fn client_idempotency_key(value: &str) -> String {
    if value.len() <= 100 && validate_id("idempotency-key", value).is_ok() {
        return format!("ik:{value}");
    }
    let b = value.as_bytes();
    format!(
        "ik:h{:016x}{:016x}",
        fnv(b, 0),
        fnv(b, 0x9e37_79b9_7f4a_7c15)
    )
}

/// Meters of a request settled by `on_upstream_error: requests`: its `requests`, nothing else.
fn requests_only(estimate: &Meters) -> Meters {
    estimate
        .iter()
        .map(|(m, v)| (m.clone(), if m == "requests" { *v } else { 0 }))
        .collect()
}

impl Request {
    pub fn new(id: u32, shared: SharedRef) -> Self {
        let cfg = Rc::clone(&shared.borrow().config);
        Request {
            id,
            shared,
            cfg,
            route: None,
            api_key: String::new(),
            request_id: String::new(),
            client_key: false,
            correlation_id: None,
            body_too_large: false,
            body_compressed: false,
            estimate: Meters::new(),
            model: None,
            phase: Phase::Idle,
            asked_ms: 0,
            hold_id: None,
            limit: None,
            release: false,
            upstream_error: false,
            measure: Measure::Estimate,
            response_bytes: 0,
            lease: None,
            single_inflight: false,
            batched: false,
            shadow: None,
            shadow_route: false,
            budget: None,
            response_ended: false,
        }
    }

    /// Takes up what the root decided for this request (a batched authorize, or a deadline
    /// that let it pass), if it decided while this request was not running.
    fn adopt(&mut self) {
        if self.phase != Phase::Deciding {
            return;
        }
        let admitted = self.shared.borrow_mut().authz.admitted.remove(&self.id);
        match admitted {
            Some(Admission::Allowed {
                hold_id,
                limit,
                shadow,
            }) => {
                self.hold_id = Some(hold_id);
                self.limit = limit;
                self.shadow = shadow;
                self.phase = Phase::Allowed;
            }
            Some(Admission::Answered) => self.phase = Phase::Idle,
            None => {}
        }
    }

    /// This request's own callout answered or was dropped: the line has room; wake the root if
    /// requests wait for it.
    fn free_line(&mut self) {
        if !std::mem::take(&mut self.single_inflight) {
            return;
        }
        let wake = {
            let mut s = self.shared.borrow_mut();
            if s.authz.freed() {
                s.authz.wake
            } else {
                None
            }
        };
        if let Some(q) = wake {
            if !crate::authz::wake(q) {
                // The root's tick sends the queue instead.
                self.shared.borrow_mut().authz.woken = false;
            }
        }
    }

    fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.cfg.routes.get(i))
    }

    fn mode(&self) -> FailureMode {
        self.route()
            .and_then(|r| r.failure_mode)
            .unwrap_or(self.cfg.failure_mode)
    }

    fn api_key(&self) -> Option<String> {
        let k = match &self.cfg.key {
            KeySource::Header(h) => req_header(h),
            KeySource::Bearer => req_header("authorization").and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_string())
            }),
        }?;
        (!k.is_empty() && k.len() <= 256).then_some(k)
    }

    /// The decision's idempotency key, which the client cannot choose: a new unguessable one per
    /// request (a replayed `x-request-id` is a new generation at the upstream, so it is a new
    /// charge),
    /// or, on a route with `idempotency_header`, the client's key — whose repeat is refused.
    /// The client's `x-request-id` is kept as the correlation id; without a usable one, the
    /// filter's key is set as the request's `x-request-id`, so the upstream and the logs see it.
    fn identify(&mut self) {
        let client = self.route().and_then(|r| r.idempotency_header.clone());
        let given = client
            .as_deref()
            .and_then(req_header)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        if let Some(v) = given {
            self.request_id = client_idempotency_key(&v);
            self.client_key = true;
        } else {
            self.request_id = format!("tg-{}", self.shared.borrow_mut().new_id());
        }
        self.correlation_id = req_header("x-request-id")
            .filter(|id| validate_correlation_id("x-request-id", id).is_ok());
        if self.correlation_id.is_none() {
            // The upstream and the logs get an id of their own, never the decision key (a key
            // the upstream saw would name the hold to anyone the upstream shows it to).
            let id = format!("tg-{}", self.shared.borrow_mut().new_id());
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-request-id", Some(&id));
            self.correlation_id = Some(id);
        }
    }

    /// The estimate of every meter (from the body when a charge reads it), the model, and the
    /// stream's `include_usage`. `Err` when the route refuses an estimate it cannot read.
    fn estimate(&mut self, route: &Route, body: &[u8]) -> Result<(), Unreadable> {
        let parsed = if !needs_body(route) {
            Ok(None)
        } else if self.body_compressed {
            Err(Unreadable::Compressed)
        } else if self.body_too_large {
            Err(Unreadable::TooLarge)
        } else {
            RequestBody::parse(body)
                .map(Some)
                .ok_or(Unreadable::NotJson)
        };
        let mut problem = parsed.as_ref().err().copied();
        let doc = parsed.ok().flatten();
        self.estimate = route
            .charges
            .iter()
            .map(|(m, c)| {
                let v = match (c.fixed, &c.body_field) {
                    (Some(v), _) => v,
                    (None, Some(names)) => match doc.as_ref().map(|d| d.amount(names.names())) {
                        Some(Field::Value(v)) => v.min(c.cap_amount()),
                        Some(Field::Bad) => {
                            problem = problem.or(Some(Unreadable::BadField));
                            c.cap_amount()
                        }
                        Some(Field::Missing) | None => c.cap_amount(),
                    },
                    (None, None) => 0,
                };
                (m.clone(), v.min(tollgate_protocol::MAX_AMOUNT))
            })
            .collect();
        if let (Some(p), BadEstimate::Reject) = (problem, route.bad_estimate) {
            return Err(p);
        }
        let Some(doc) = doc else { return Ok(()) };
        self.model = route
            .model_field
            .as_deref()
            .and_then(|f| doc.string(f))
            .filter(|m| validate_id("model", m).is_ok());
        if route.include_usage() && doc.streams() && !doc.includes_usage() {
            let patched = doc.with_include_usage();
            if hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body.len(), &patched).is_ok() {
                bump(self.shared.borrow().metrics.usage_requested);
            }
        }
        Ok(())
    }

    /// Computes the estimate (from the body when the route reads one) and asks the sidecar.
    fn authorize(&mut self, body: &[u8]) -> Action {
        let cfg = Rc::clone(&self.cfg);
        let Some((route_ix, route)) = self.route.and_then(|i| Some((i, cfg.routes.get(i)?))) else {
            return Action::Continue;
        };
        if let Err(problem) = self.estimate(route, body) {
            bump(self.shared.borrow().metrics.bad_estimate);
            self.phase = Phase::Idle;
            problem.reply();
            return Action::Pause;
        }
        if let Some(lease) = &route.lease {
            let key = (self.api_key.clone(), route_ix, self.model.clone());
            let taken = self.shared.borrow_mut().leases.take(
                &key,
                &route.name,
                &self.estimate,
                lease.requests,
                lease.ttl_ms,
                now_ms(),
            );
            if let Some(id) = taken {
                bump(self.shared.borrow().metrics.leased);
                self.lease = Some(id);
                self.phase = Phase::Allowed;
                return Action::Continue;
            }
        }
        let req = SpendRequest {
            api_key: Some(self.api_key.clone()),
            account: None,
            idempotency_key: self.request_id.clone(),
            correlation_id: self.correlation_id.clone(),
            route: route.name.clone(),
            model: self.model.clone(),
            meters: self.estimate.clone(),
            credits: 0,
            resource: None,
        };
        let now = now_ms();
        let waiting = Waiting {
            deadline_ms: now + self.cfg.deadline_ms,
            mode: self.mode(),
        };
        if route.shadow {
            // Decided, never refused, never held: one check, outside the authorize line.
            return match dispatch_check(&self.cfg, &req) {
                Ok(_) => {
                    self.shadow_route = true;
                    self.phase = Phase::Deciding;
                    self.asked_ms = now;
                    self.shared.borrow_mut().waiting.insert(
                        self.id,
                        Waiting {
                            deadline_ms: waiting.deadline_ms,
                            mode: FailureMode::Open,
                        },
                    );
                    Action::Pause
                }
                Err(_) => Action::Continue,
            };
        }
        let must_wait = self.shared.borrow().authz.must_wait(
            self.cfg.authorize_inflight,
            self.cfg.authorize_batch,
            now,
        );
        if must_wait {
            let queued = Item {
                context_id: self.id,
                body: serde_json::to_vec(&req).unwrap_or_default(),
                api_key: req.api_key.unwrap_or_default(),
                idempotency_key: req.idempotency_key,
                client_key: self.client_key,
                asked_ms: now,
            };
            let mut s = self.shared.borrow_mut();
            s.authz.queue.push(queued);
            s.waiting.insert(self.id, waiting);
            self.batched = true;
            self.phase = Phase::Deciding;
            self.asked_ms = now;
            return Action::Pause;
        }
        match dispatch_authorize(&self.cfg, &req) {
            Ok(_) => {
                self.phase = Phase::Deciding;
                self.asked_ms = now;
                self.single_inflight = true;
                let mut s = self.shared.borrow_mut();
                s.authz.inflight += 1;
                s.waiting.insert(self.id, waiting);
                Action::Pause
            }
            Err(_) => self.fail_now(),
        }
    }

    /// The sidecar cannot be asked or did not answer usably: the route's failure mode, now.
    /// Returns the action for a callback that can still return one.
    fn fail_now(&mut self) -> Action {
        self.phase = Phase::Idle;
        match self.count_failure() {
            FailureMode::Open => Action::Continue,
            FailureMode::Closed => {
                reply::unavailable();
                Action::Pause
            }
        }
    }

    fn queue(&self, settle: Settle) {
        let mut s = self.shared.borrow_mut();
        let mut p = Pending::new(settle);
        let text = p.text_len();
        if text > 0 && s.text_bytes.saturating_add(text) > MAX_QUEUED_TEXT {
            bump(s.metrics.settle_at_estimate);
            p.fall_back_to_estimate();
        } else {
            s.text_bytes += text;
        }
        s.settles.push_back(p);
    }

    /// Measures the actual usage and queues the commit (or the release).
    fn settle(&mut self) {
        if self.phase != Phase::Allowed {
            return;
        }
        self.phase = Phase::Settled;
        if let Some(id) = self.lease.take() {
            // Admitted from a lease: its usage counts toward the lease's commit. Text without
            // a usage object cannot be counted here; the estimate stands for it.
            let used = if self.release { None } else { self.measure().0 };
            self.shared.borrow_mut().leases.settle(id, used.as_ref());
            return;
        }
        let Some(hold_id) = self.hold_id.take() else {
            return;
        };
        if self.release {
            self.queue(Settle::Release(hold_id));
            return;
        }
        let Some(route) = self.route().map(|r| r.name.clone()) else {
            return;
        };
        let (meters, output_text) = self.measure();
        let Some(meters) = meters else {
            self.queue(Settle::Release(hold_id));
            return;
        };
        self.queue(Settle::Commit {
            req: CommitRequest {
                hold_id,
                route: Some(route),
                model: self.model.clone(),
                meters,
                credits: 0,
                output_text,
            },
            estimate: self.estimate.clone(),
        });
    }

    /// The actual usage (the estimate where it could not be measured), and the response's
    /// generated output when it reported no output count. `None` meters: release the hold (an
    /// upstream error without usage, on a route that releases those).
    fn measure(&mut self) -> (Option<Meters>, Option<String>) {
        let usage_meter = self.route().and_then(|r| r.usage.meter.clone());
        let mut meters = self.estimate.clone();
        let mut failed = false;
        let mut output_text = None;
        let mut found_usage = false;
        let apply = |meters: &mut Meters, u: &TokenUsage| {
            meters
                .iter_mut()
                .for_each(|(m, v)| *v = u.meter(m).unwrap_or(*v));
        };
        match std::mem::replace(&mut self.measure, Measure::Estimate) {
            Measure::Estimate => {}
            Measure::Unreadable => failed = true,
            Measure::Json(j) => match j.finish_with_text() {
                (Ok(u), _) => {
                    found_usage = true;
                    apply(&mut meters, &u);
                }
                // No usage object: the sidecar counts the generated output.
                (Err(_), Some(text)) => output_text = Some(text),
                (Err(_), None) => failed = true,
            },
            Measure::Sse(s) => match s.finish_with_text() {
                (Ok(u), text) => {
                    found_usage = true;
                    apply(&mut meters, &u);
                    output_text = text;
                }
                // No usage (or the stream was cut before it): the sidecar counts the output.
                (Err(_), Some(text)) => output_text = Some(text),
                (Err(_), None) => failed = true,
            },
            Measure::Header(Some(v)) => {
                found_usage = true;
                if let Some(m) = usage_meter {
                    meters.insert(m, v);
                }
            }
            Measure::Header(None) => failed = true,
            Measure::Bytes => {
                if let Some(m) = usage_meter {
                    meters.insert(m, self.response_bytes.min(tollgate_protocol::MAX_AMOUNT));
                }
            }
        }
        if self.upstream_error && !found_usage {
            bump(self.shared.borrow().metrics.upstream_errors);
            let policy = self
                .route()
                .map_or(OnUpstreamError::Release, |r| r.on_upstream_error);
            return match policy {
                OnUpstreamError::Release => (None, None),
                OnUpstreamError::Requests => (Some(requests_only(&self.estimate)), None),
                OnUpstreamError::Estimate => (Some(self.estimate.clone()), None),
            };
        }
        if failed {
            // Settled at the estimate, and counted.
            bump(self.shared.borrow().metrics.usage_errors);
        }
        (Some(meters), output_text)
    }

    /// Sends `POST /v1/extend` to raise this request's hold to `target` output tokens; false
    /// when it cannot be sent.
    fn ask_extend(&mut self, target: u64) -> bool {
        let Some(hold_id) = self.hold_id.clone() else {
            return false;
        };
        let req = ExtendRequest {
            hold_id,
            meters: [("output_tokens".to_string(), target)]
                .into_iter()
                .collect(),
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        let auth = self.cfg.sidecar_auth();
        let sent = hostcalls::dispatch_http_call(
            &self.cfg.sidecar.cluster,
            self.cfg.sidecar.headers("/v1/extend", &auth),
            Some(&body),
            vec![],
            Duration::from_millis(self.cfg.sidecar.timeout_ms),
        )
        .is_ok();
        if let (true, Some(b)) = (sent, self.budget.as_mut()) {
            b.asking(target);
        }
        sent
    }

    /// Held response bytes that go on to the client: measured for the commit.
    fn deliver(&mut self, bytes: &[u8]) {
        self.response_bytes = self.response_bytes.saturating_add(bytes.len() as u64);
        if let Measure::Sse(s) = &mut self.measure {
            s.feed(bytes);
        }
    }

    /// Judges the held response body against the hold: the action for a body callback (or,
    /// from a callout's answer, whether to resume).
    fn budget_step(&mut self, held: &[u8]) -> Action {
        let ended = self.response_ended;
        let Some(b) = self.budget.as_mut() else {
            return Action::Continue;
        };
        match b.judge(held, ended) {
            Verdict::Pass => {
                b.passed(held);
                self.deliver(held);
                Action::Continue
            }
            Verdict::Wait => Action::Pause,
            Verdict::Extend(target) => {
                if self.ask_extend(target) {
                    Action::Pause
                } else {
                    self.extend_failed(held)
                }
            }
        }
    }

    /// An extension could not be asked or answered usably: the route's failure mode (open:
    /// the stream goes on, its commit charges what it used; closed: it ends here).
    fn extend_failed(&mut self, held: &[u8]) -> Action {
        match self.count_failure() {
            FailureMode::Open => {
                if let Some(b) = self.budget.as_mut() {
                    b.give_up();
                }
                self.deliver(held);
            }
            FailureMode::Closed => self.stop_stream(held, &Stop::Unavailable),
        }
        Action::Continue
    }

    /// The route's failure mode, counted in `tollgate.failed_open` / `tollgate.failed_closed`.
    fn count_failure(&self) -> FailureMode {
        let mode = self.mode();
        let s = self.shared.borrow();
        bump(match mode {
            FailureMode::Open => s.metrics.failed_open,
            FailureMode::Closed => s.metrics.failed_closed,
        });
        mode
    }

    /// Ends the stream: what of `held` fits the hold goes on, then the final event; the rest
    /// of the upstream's answer is dropped.
    fn stop_stream(&mut self, held: &[u8], why: &Stop) {
        let Some(b) = self.budget.as_mut() else {
            return;
        };
        let (cut, last) = b.stop(held, why);
        let kept = held.get(..cut).unwrap_or_default();
        let mut out = Vec::with_capacity(kept.len() + last.len());
        out.extend_from_slice(kept);
        out.extend_from_slice(&last);
        self.deliver(kept);
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, held.len(), &out);
        bump(self.shared.borrow().metrics.streams_stopped);
    }

    /// The sidecar's answer to this request's `/v1/extend`.
    fn on_extend_answer(&mut self, body_size: usize) {
        let (status, body) = call_answer(body_size);
        let decision: Option<Decision> = (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten();
        let held = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, MAX_HELD)
            .ok()
            .flatten()
            .unwrap_or_default();
        let action = match decision {
            Some(d) if d.allowed => {
                if let Some(b) = self.budget.as_mut() {
                    b.extended();
                    // What the commit falls back on when the output cannot be counted.
                    self.estimate.insert("output_tokens".into(), b.covered);
                }
                bump(self.shared.borrow().metrics.stream_extensions);
                self.budget_step(&held)
            }
            Some(d) => {
                let smaller = self.budget.as_mut().and_then(|b| b.retry_smaller(&d));
                match smaller {
                    Some(t) if self.ask_extend(t) => Action::Pause,
                    _ => {
                        let why = Stop::Refused {
                            reason: d.reason,
                            limit: d.limit.map(|l| l.name),
                        };
                        self.stop_stream(&held, &why);
                        Action::Continue
                    }
                }
            }
            None => self.extend_failed(&held),
        };
        if action == Action::Continue {
            let _ = hostcalls::resume_http_response();
        }
    }

    /// A response body call on a route with a stream budget.
    fn budgeted_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.response_ended = end_of_stream;
        let (stopped, extending, active) = match &self.budget {
            Some(b) => (b.stopped(), b.extending(), b.active()),
            None => return Action::Continue,
        };
        if stopped {
            // The final event went out: nothing more of the upstream's answer.
            let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &[]);
            return Action::Continue;
        }
        if extending {
            return Action::Pause; // held until the sidecar answers
        }
        let held = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if !active {
            self.deliver(&held);
            return Action::Continue;
        }
        self.budget_step(&held)
    }

    /// Refuses a request before it reaches the sidecar or the upstream.
    fn refuse(&mut self, metric: u32, status: u32, code: &str, message: &str) -> Action {
        bump(metric);
        self.route = None;
        self.phase = Phase::Idle;
        reply::reject(status, code, message);
        Action::Pause
    }
}

/// Whether a route reads the request body before deciding.
fn needs_body(route: &Route) -> bool {
    route.charges.values().any(|c| c.body_field.is_some())
        || route.model_field.is_some()
        || route.include_usage()
}

impl Context for Request {
    /// Called when the stream is torn down, whatever ended it. Envoy skips `on_log` for a stream
    /// reset before it completed (a client that went away mid-stream), so settling here is what
    /// keeps such a request from waiting for its hold to expire.
    fn on_done(&mut self) -> bool {
        self.adopt();
        {
            let mut s = self.shared.borrow_mut();
            s.waiting.remove(&self.id);
            s.authz.admitted.remove(&self.id);
            if self.phase == Phase::Deciding && self.batched {
                // Still queued: nothing was sent. Else in a batch: the root gives back what its
                // answer holds for a request that is gone.
                s.authz.unqueue(self.id);
                self.phase = Phase::Idle;
            }
        }
        if self.single_inflight {
            // The stream ends before its decision came back (the deadline answered it, or the
            // client left): Envoy drops the callout with the stream, so its answer — and any
            // hold it placed — would never be seen here. Cancel it by its key instead.
            self.free_line();
            self.phase = Phase::Idle;
            bump(self.shared.borrow().metrics.cancelled);
            self.queue(Settle::Cancel(tollgate_protocol::CancelRequest {
                api_key: self.api_key.clone(),
                idempotency_key: self.request_id.clone(),
            }));
        }
        self.settle();
        true
    }

    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.phase == Phase::Allowed && self.budget.as_ref().is_some_and(|b| b.extending()) {
            self.on_extend_answer(body_size);
            return;
        }
        self.free_line();
        self.adopt();
        let now = now_ms();
        let still_waiting = self.shared.borrow_mut().waiting.remove(&self.id).is_some();
        record(
            self.shared.borrow().metrics.callout_ms,
            now.saturating_sub(self.asked_ms),
        );
        let (status, body) = call_answer(body_size);
        let replayed = replayed();
        let decision: Option<Decision> = (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten();
        if !still_waiting || self.phase != Phase::Deciding {
            // Too late: the deadline already decided. Give back what the sidecar held (unless
            // it is the hold of an earlier request with the same client key).
            if let Some(hold) = decision.and_then(|d| d.hold_id).filter(|_| !replayed) {
                self.queue(Settle::Release(hold));
            }
            if self.phase == Phase::Deciding {
                self.phase = Phase::Idle; // answered: nothing to cancel at the end
            }
            return;
        }
        if self.shadow_route {
            // A shadow route passes whatever the check said; a refusal is only reported.
            self.phase = Phase::Idle;
            if let Some(d) = decision.as_ref() {
                self.shadow = if d.allowed {
                    crate::reply::shadow_header(d)
                } else {
                    Some(crate::reply::shadow_refusal(d))
                };
            }
            if self.shadow.is_some() {
                bump(self.shared.borrow().metrics.shadow_would_deny);
            }
            let _ = hostcalls::resume_http_request();
            return;
        }
        match decision {
            // A client idempotency key already admitted: the first request owns the hold and
            // was (or is being) served. The repeat is not served again, and not charged again.
            Some(d) if d.allowed && replayed && self.client_key => {
                self.phase = Phase::Idle;
                bump(self.shared.borrow().metrics.key_reused);
                reply::reject(
                    409,
                    "idempotency_key_reused",
                    "a request with this Idempotency-Key was already accepted",
                );
            }
            Some(d) if d.allowed && d.hold_id.is_some() => {
                bump(self.shared.borrow().metrics.allowed);
                self.shadow = crate::reply::shadow_header(&d);
                if self.shadow.is_some() {
                    bump(self.shared.borrow().metrics.shadow_would_deny);
                }
                self.hold_id = d.hold_id;
                self.limit = d.limit;
                self.phase = Phase::Allowed;
                let _ = hostcalls::resume_http_request();
            }
            Some(d) if !d.allowed => {
                bump(self.shared.borrow().metrics.denied);
                self.phase = Phase::Idle;
                reply::denied(&d, now);
            }
            _ => {
                if self.fail_now() == Action::Continue {
                    let _ = hostcalls::resume_http_request();
                }
            }
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let (passed, rejected, invalid_path) = {
            let s = self.shared.borrow();
            (s.metrics.passed, s.metrics.rejected, s.metrics.invalid_path)
        };
        let method = req_header(":method").unwrap_or_default();
        let host = req_header(":authority")
            .or_else(|| req_header("host"))
            .unwrap_or_default();
        let raw_path = req_header(":path").unwrap_or_default();
        let Ok(canonical) = path::normalize(&raw_path) else {
            return self.refuse(
                invalid_path,
                400,
                "invalid_path",
                "the request path has no canonical form (an encoded slash, a broken escape or a control character)",
            );
        };
        // The upstream serves what was matched and charged: the canonical path.
        let forwarded = format!("{canonical}{}", path::query(&raw_path));
        if forwarded != raw_path {
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, ":path", Some(&forwarded));
        }
        self.route = self
            .cfg
            .routes
            .iter()
            .position(|r| r.matches(&method, &host, &canonical));
        if self.route.is_none() {
            return match self.cfg.unmatched {
                Unmatched::Pass => {
                    bump(passed);
                    Action::Continue
                }
                Unmatched::Reject => self.refuse(
                    rejected,
                    404,
                    "no_route",
                    "no metered route matches this request",
                ),
            };
        }
        let Some(key) = self.api_key() else {
            self.route = None;
            return match self.cfg.missing_key {
                Unmatched::Pass => {
                    bump(passed);
                    Action::Continue
                }
                Unmatched::Reject => {
                    self.refuse(rejected, 401, "missing_api_key", "an API key is required")
                }
            };
        };
        self.api_key = key;
        self.identify();
        let (body_usage, include_usage, reads_body) =
            self.route().map_or((false, false, false), |r| {
                (
                    r.usage.source == UsageSource::Body,
                    r.include_usage(),
                    needs_body(r),
                )
            });
        if body_usage {
            // Usage is read from the response: ask for it uncompressed.
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "accept-encoding", None);
        }
        self.body_compressed = compressed(req_header("content-encoding"));
        if reads_body && !end_of_stream {
            if include_usage {
                // The body may grow by `stream_options`; its length is not known yet.
                let _ =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, "content-length", None);
            }
            // Envoy turns Pause here into StopAllIteration, which also withholds the body from
            // this filter. So the headers go on (the upstream request starts) and the body is
            // held back in on_http_request_body until the decision; a denial resets it.
            self.phase = Phase::ReadingBody;
            return Action::Continue;
        }
        self.authorize(&[])
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.adopt();
        match self.phase {
            Phase::ReadingBody => {}
            Phase::Deciding => return Action::Pause,
            _ => return Action::Continue,
        }
        if body_size > self.cfg.max_body_bytes {
            self.body_too_large = true;
            return self.authorize(&[]);
        }
        if !end_of_stream {
            // Envoy buffers the body while we pause; it is read whole at its end.
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.authorize(&body)
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        self.adopt();
        if let Some(v) = self.shadow.take() {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                "x-tollgate-shadow",
                Some(&v),
            );
        }
        if self.phase != Phase::Allowed {
            return Action::Continue;
        }
        if let Some(l) = &self.limit {
            for (k, v) in reply::ratelimit_headers(l, now_ms()) {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, k, Some(&v));
            }
        }
        let status = resp_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        self.release = self.cfg.release_statuses.contains(&status);
        self.upstream_error = status >= 400;
        let cfg = Rc::clone(&self.cfg);
        let Some(route) = self.route.and_then(|i| cfg.routes.get(i)) else {
            return Action::Continue;
        };
        self.measure = match route.usage.source {
            UsageSource::Estimate => Measure::Estimate,
            UsageSource::Bytes => Measure::Bytes,
            UsageSource::Header => Measure::Header(
                route
                    .usage
                    .header
                    .as_deref()
                    .and_then(resp_header)
                    .as_deref()
                    .and_then(header_amount),
            ),
            UsageSource::Body if compressed(resp_header("content-encoding")) => Measure::Unreadable,
            UsageSource::Body => {
                let sse =
                    resp_header("content-type").is_some_and(|c| c.contains("text/event-stream"));
                if sse {
                    if let (Some(b), false, false) =
                        (route.stream_budget, self.upstream_error, self.release)
                    {
                        let covered = self.estimate.get("output_tokens").copied().unwrap_or(0);
                        self.budget = Some(StreamBudget::new(covered, b.step, b.bytes_per_token));
                    }
                    Measure::Sse(Box::new(SseBody::new(MAX_SSE_LINE)))
                } else {
                    Measure::Json(JsonBody::new(self.cfg.max_body_bytes))
                }
            }
        };
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.phase != Phase::Allowed {
            return Action::Continue;
        }
        if self.budget.is_some() {
            return self.budgeted_body(body_size, end_of_stream);
        }
        self.response_bytes = self.response_bytes.saturating_add(body_size as u64);
        if matches!(self.measure, Measure::Json(_) | Measure::Sse(_)) {
            // Each call sees only the newest chunk: the body streams on to the client.
            let chunk = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            match &mut self.measure {
                Measure::Json(j) => j.feed(&chunk),
                Measure::Sse(s) => s.feed(&chunk),
                _ => {}
            }
        }
        Action::Continue
    }

    /// Called at the end of a completed stream (after `on_done` in some hosts, before it in
    /// others): settling twice is harmless, [`Request::settle`] runs once.
    fn on_log(&mut self) {
        self.adopt();
        self.shared.borrow_mut().waiting.remove(&self.id);
        self.settle();
    }
}
