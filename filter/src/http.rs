//! One request's pipeline: match the route, find the key and the estimate, ask the sidecar
//! (paused until it answers or the root's tick applies the deadline), then measure the response
//! and queue its settlement.

use crate::config::{Charge, FailureMode, FilterConfig, KeySource, Route, Unmatched, UsageSource};
use crate::reply;
use crate::shared::{bump, now_ms, record, Settle, SharedRef, Waiting};
use crate::usage::{header_amount, JsonBody, SseBody};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::rc::Rc;
use std::time::Duration;
use tollgate_protocol::{validate_id, CommitRequest, Decision, LimitState, Meters, SpendRequest};

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
    Json(JsonBody),
    Sse(SseBody),
    Header(Option<u64>),
    Bytes,
}

pub struct Request {
    id: u32,
    shared: SharedRef,
    cfg: Rc<FilterConfig>,
    route: Option<usize>,
    api_key: String,
    request_id: String,
    body: Vec<u8>,
    body_too_large: bool,
    estimate: Meters,
    model: Option<String>,
    phase: Phase,
    asked_ms: u64,
    hold_id: Option<String>,
    limit: Option<LimitState>,
    release: bool,
    measure: Measure,
    response_bytes: u64,
    /// Admitted from this lease (no hold of its own).
    lease: Option<u64>,
}

/// A header's value. Read as bytes: the SDK's string getter panics on a value that is not
/// UTF-8, which a client controls.
pub fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn req_header(name: &str) -> Option<String> {
    header(MapType::HttpRequestHeaders, name)
}

fn resp_header(name: &str) -> Option<String> {
    header(MapType::HttpResponseHeaders, name)
}

/// Sends `POST /v1/authorize` to the sidecar (for a request, or for a lease); the answer comes
/// back to the context that called this. Returns the callout's token.
pub(crate) fn dispatch_authorize(
    cfg: &FilterConfig,
    req: &SpendRequest,
) -> Result<u32, proxy_wasm::types::Status> {
    let body = serde_json::to_vec(req).unwrap_or_default();
    hostcalls::dispatch_http_call(
        &cfg.sidecar.cluster,
        vec![
            (":method", "POST"),
            (":path", "/v1/authorize"),
            (":authority", cfg.sidecar.authority.as_str()),
            ("content-type", "application/json"),
        ],
        Some(&body),
        vec![],
        Duration::from_millis(cfg.sidecar.timeout_ms),
    )
}

/// The estimate of one meter from the (JSON) request body, capped.
fn estimate_from(charge: &Charge, body: Option<&serde_json::Value>) -> u64 {
    let found = match (&charge.body_field, body) {
        (Some(f), Some(b)) => b.get(f).and_then(serde_json::Value::as_u64),
        _ => None,
    };
    let v = charge.fixed.or(found).unwrap_or(charge.default);
    charge
        .cap
        .map_or(v, |cap| v.min(cap))
        .min(tollgate_protocol::MAX_AMOUNT)
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
            body: Vec::new(),
            body_too_large: false,
            estimate: Meters::new(),
            model: None,
            phase: Phase::Idle,
            asked_ms: 0,
            hold_id: None,
            limit: None,
            release: false,
            measure: Measure::Estimate,
            response_bytes: 0,
            lease: None,
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

    /// The caller's request id if it is a usable idempotency key, else a new one (also set on
    /// the request, so the upstream and the logs see the same id).
    fn request_id(&self) -> String {
        if let Some(id) =
            req_header("x-request-id").filter(|id| validate_id("x-request-id", id).is_ok())
        {
            return id;
        }
        let n = {
            let mut s = self.shared.borrow_mut();
            s.counter = s.counter.wrapping_add(1);
            s.seed.rotate_left(17) ^ s.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        };
        let id = format!("tg-{:x}-{:x}-{:016x}", now_ms(), self.id, n);
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-request-id", Some(&id));
        id
    }

    /// Computes the estimate (from the body when the route reads one) and asks the sidecar.
    fn authorize(&mut self) -> Action {
        let Some(route) = self.route().cloned() else {
            return Action::Continue;
        };
        let doc: Option<serde_json::Value> = if self.body_too_large {
            None
        } else {
            serde_json::from_slice(&self.body).ok()
        };
        self.estimate = route
            .charges
            .iter()
            .map(|(m, c)| (m.clone(), estimate_from(c, doc.as_ref())))
            .collect();
        self.model = route
            .model_field
            .as_ref()
            .and_then(|f| doc.as_ref()?.get(f)?.as_str().map(str::to_string))
            .filter(|m| validate_id("model", m).is_ok());
        self.body = Vec::new();
        if let Some(lease) = &route.lease {
            let key = (
                self.api_key.clone(),
                self.route.unwrap_or(0),
                self.model.clone(),
            );
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
            route: route.name.clone(),
            model: self.model.clone(),
            meters: self.estimate.clone(),
            credits: 0,
            resource: None,
        };
        let now = now_ms();
        match dispatch_authorize(&self.cfg, &req) {
            Ok(_) => {
                self.phase = Phase::Deciding;
                self.asked_ms = now;
                let waiting = Waiting {
                    deadline_ms: now + self.cfg.deadline_ms,
                    mode: self.mode(),
                };
                self.shared.borrow_mut().waiting.insert(self.id, waiting);
                Action::Pause
            }
            Err(_) => self.fail_now(),
        }
    }

    /// The sidecar cannot be asked or did not answer usably: the route's failure mode, now.
    /// Returns the action for a callback that can still return one.
    fn fail_now(&mut self) -> Action {
        self.phase = Phase::Idle;
        let (open, closed) = {
            let s = self.shared.borrow();
            (s.metrics.failed_open, s.metrics.failed_closed)
        };
        match self.mode() {
            FailureMode::Open => {
                bump(open);
                Action::Continue
            }
            FailureMode::Closed => {
                bump(closed);
                reply::unavailable();
                Action::Pause
            }
        }
    }

    fn queue(&self, settle: Settle) {
        self.shared.borrow_mut().settles.push_back((settle, 0));
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
            let used = (!self.release).then(|| self.measure().0);
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
        let Some(route) = self.route().cloned() else {
            return;
        };
        let (meters, output_text) = self.measure();
        self.queue(Settle::Commit(CommitRequest {
            hold_id,
            route: Some(route.name.clone()),
            model: self.model.clone(),
            meters,
            credits: 0,
            output_text,
        }));
    }

    /// The actual usage (the estimate where it could not be measured), and the response's text
    /// when it had no usage object.
    fn measure(&mut self) -> (Meters, Option<String>) {
        let usage_meter = self.route().and_then(|r| r.usage.meter.clone());
        let mut meters = self.estimate.clone();
        let mut failed = false;
        let mut output_text = None;
        match std::mem::replace(&mut self.measure, Measure::Estimate) {
            Measure::Estimate => {}
            Measure::Json(j) => match j.finish_with_text() {
                (Ok(u), _) => meters
                    .iter_mut()
                    .for_each(|(m, v)| *v = u.meter(m).unwrap_or(*v)),
                // No usage object: the sidecar counts the text's tokens.
                (Err(_), Some(text)) => output_text = Some(text),
                (Err(_), None) => failed = true,
            },
            Measure::Sse(s) => match s.finish_with_text() {
                (Ok(u), _) => meters
                    .iter_mut()
                    .for_each(|(m, v)| *v = u.meter(m).unwrap_or(*v)),
                // No usage object (or the stream was cut before it): the sidecar counts the text.
                (Err(_), Some(text)) => output_text = Some(text),
                (Err(_), None) => failed = true,
            },
            Measure::Header(Some(v)) => {
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
        if failed {
            // Settled at the estimate, and counted.
            bump(self.shared.borrow().metrics.usage_errors);
        }
        (meters, output_text)
    }
}

impl Context for Request {
    /// Called when the stream is torn down, whatever ended it. Envoy skips `on_log` for a stream
    /// reset before it completed (a client that went away mid-stream), so settling here is what
    /// keeps such a request from waiting for its hold to expire.
    fn on_done(&mut self) -> bool {
        self.shared.borrow_mut().waiting.remove(&self.id);
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
        let now = now_ms();
        let still_waiting = self.shared.borrow_mut().waiting.remove(&self.id).is_some();
        record(
            self.shared.borrow().metrics.callout_ms,
            now.saturating_sub(self.asked_ms),
        );
        let status = header(MapType::HttpCallResponseHeaders, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let decision: Option<Decision> = if status == 200 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice(&b).ok())
        } else {
            None
        };
        if !still_waiting || self.phase != Phase::Deciding {
            // Too late: the deadline already decided. Give back what the sidecar held.
            if let Some(hold) = decision.and_then(|d| d.hold_id) {
                self.queue(Settle::Release(hold));
            }
            return;
        }
        match decision {
            Some(d) if d.allowed && d.hold_id.is_some() => {
                bump(self.shared.borrow().metrics.allowed);
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
        let method = req_header(":method").unwrap_or_default();
        let host = req_header(":authority")
            .or_else(|| req_header("host"))
            .unwrap_or_default();
        let path = req_header(":path").unwrap_or_default();
        self.route = self
            .cfg
            .routes
            .iter()
            .position(|r| r.matches(&method, &host, &path));
        let (passed, rejected) = {
            let s = self.shared.borrow();
            (s.metrics.passed, s.metrics.rejected)
        };
        if self.route.is_none() {
            return match self.cfg.unmatched {
                Unmatched::Pass => {
                    bump(passed);
                    Action::Continue
                }
                Unmatched::Reject => {
                    bump(rejected);
                    reply::reject(404, "no_route", "no metered route matches this request");
                    Action::Pause
                }
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
                    bump(rejected);
                    reply::reject(401, "missing_api_key", "an API key is required");
                    Action::Pause
                }
            };
        };
        self.api_key = key;
        self.request_id = self.request_id();
        let needs_body = self.route().is_some_and(|r| {
            r.charges.values().any(|c| c.body_field.is_some()) || r.model_field.is_some()
        });
        if needs_body && !end_of_stream {
            // Envoy turns Pause here into StopAllIteration, which also withholds the body from
            // this filter. So the headers go on (the upstream request starts) and the body is
            // held back in on_http_request_body until the decision; a denial resets it.
            self.phase = Phase::ReadingBody;
            return Action::Continue;
        }
        self.authorize()
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.phase {
            Phase::ReadingBody => {}
            Phase::Deciding => return Action::Pause,
            _ => return Action::Continue,
        }
        if !end_of_stream {
            // Envoy buffers the body while we pause; it is read whole at its end.
            if body_size > self.cfg.max_body_bytes {
                self.body_too_large = true;
                return self.authorize();
            }
            return Action::Pause;
        }
        if body_size > self.cfg.max_body_bytes {
            self.body_too_large = true;
        } else {
            self.body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
        }
        self.authorize()
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
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
        let Some(route) = self.route() else {
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
            UsageSource::Body => {
                let sse =
                    resp_header("content-type").is_some_and(|c| c.contains("text/event-stream"));
                if sse {
                    Measure::Sse(SseBody::new(MAX_SSE_LINE))
                } else {
                    Measure::Json(JsonBody::new(self.cfg.max_body_bytes))
                }
            }
        };
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.phase != Phase::Allowed {
            return Action::Continue;
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
        self.shared.borrow_mut().waiting.remove(&self.id);
        self.settle();
    }
}
