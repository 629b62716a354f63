//! The root context: configuration, the tick that enforces decision deadlines, and batched
//! settlement (commits queued by requests are sent together, so settling costs less than one
//! callout per request).

use crate::authz::{holds, Admission, Authz, Item};
use crate::config::{FailureMode, FilterConfig};
use crate::http::{call_answer, replayed, Request};
use crate::lease::LeaseAsk;
use crate::payload::{batch_outcomes, ItemStatus};
use crate::reply;
use crate::shared::{bump, now_ms, Metrics, Pending, Settle, Shared, SharedRef};
use crate::vecmap::VecMap;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;
use tollgate_protocol::{
    AuthorizeBatchResult, AuthorizeOutcome, CancelRequest, CommitRequest, Decision, SpendRequest,
};

/// A settlement is retried this many times (backing off from 100 ms to 2 s, about 5 s in all);
/// then a commit is sent at its hold's estimate instead — a hold is never left to expire free —
/// and retried as long again; only then is it dropped (counted, logged).
const MAX_ATTEMPTS: u8 = 6;

fn backoff_ms(attempts: u8) -> u64 {
    (100u64 << attempts.min(5)).min(2000)
}

#[derive(Default)]
pub struct Root {
    shared: Option<SharedRef>,
    /// Callouts in flight: token -> what they settle.
    inflight: VecMap<u32, Vec<Pending>>,
    /// Lease requests in flight: token -> what was asked.
    lease_calls: VecMap<u32, LeaseAsk>,
    /// Authorize callouts of the root in flight: token -> the requests in it, in order, and
    /// whether it is a single `/v1/authorize` (sent again alone after a 404 on the batch route).
    authz_calls: VecMap<u32, (Vec<Item>, bool)>,
    last_flush_ms: u64,
}

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if let Some(ask) = self.lease_calls.remove(&token) {
            self.lease_answered(ask, body_size);
            return;
        }
        if let Some((items, single)) = self.authz_calls.remove(&token) {
            self.authz_answered(body_size, items, single);
            return;
        }
        let Some(batch) = self.inflight.remove(&token) else {
            return;
        };
        let (status, body) = call_answer(body_size);
        if let Some(shared) = self.shared.clone() {
            Self::answered(&shared, status, &body, batch);
        }
    }
}

/// What becomes of one settlement after its callout answered.
#[derive(Clone, Copy)]
enum Next {
    Done,
    /// Refused for good by the sidecar (unknown or already settled hold).
    Refused,
    Retry,
    /// Its batch was refused whole: send it again in a batch of its own.
    Split,
    /// The sidecar cannot take this measured commit: send the estimate instead.
    AtEstimate,
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match FilterConfig::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("tollgate: invalid configuration: {e}"),
                );
                return false;
            }
        };
        // A request waits at most its deadline plus one tick.
        let tick = (config.deadline_ms / 2).clamp(5, config.commit_interval_ms.max(5));
        let _ = hostcalls::set_tick_period(Duration::from_millis(tick));
        let secret = std::collections::hash_map::RandomState::new();
        // This VM's own wake-up queue (each worker's root registers one under a name of its
        // own; Envoy posts its `on_queue_ready` to the worker that registered it).
        let wake = {
            use std::hash::BuildHasher;
            let name = format!("tollgate.authz.{:016x}", secret.hash_one(0u8));
            hostcalls::register_shared_queue(&name).ok()
        };
        self.shared = Some(Rc::new(RefCell::new(Shared {
            config: Rc::new(config),
            metrics: Metrics::define(),
            waiting: VecMap::new(),
            text_bytes: 0,
            settles: VecDeque::new(),
            leases: Default::default(),
            counter: 0,
            secret,
            authz: Authz {
                wake,
                ..Authz::default()
            },
        })));
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if shared.borrow().authz.wake != Some(queue_id) {
            return;
        }
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        shared.borrow_mut().authz.woken = false;
        self.send_authorizes();
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.enforce_deadlines(now);
        self.tend_leases(now);
        self.flush(now);
        // A wake-up the host did not deliver: the queue goes now.
        if let Some(shared) = &self.shared {
            shared.borrow_mut().authz.woken = false;
        }
        self.send_authorizes();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Request::new(context_id, shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// One of the root's authorize callouts answered: a batch, or a request sent alone after the
    /// sidecar refused the batch route.
    fn authz_answered(&mut self, body_size: usize, items: Vec<Item>, single: bool) {
        let (status, body) = call_answer(body_size);
        if let Some(shared) = self.shared.clone() {
            {
                let mut s = shared.borrow_mut();
                s.authz.inflight = s.authz.inflight.saturating_sub(1);
            }
            if single {
                batch_answered(&shared, single_outcome(status, &body, replayed()), items);
            } else if status == 404 {
                // A sidecar without the batch route: no batches from this worker for a minute.
                shared.borrow_mut().authz.unsupported_until_ms = now_ms() + 60_000;
                log(
                    LogLevel::Warn,
                    "tollgate: the sidecar has no /v1/authorize/batch (an older version?); \
                     authorizing each request on its own for a minute",
                );
                self.send_singly(&shared, items);
            } else {
                batch_answered(&shared, batch_outcomes_of(status, &body), items);
            }
        }
        self.send_authorizes();
    }

    /// Sends what waits for the line, in batches, while it has room.
    fn send_authorizes(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        loop {
            let (cfg, items, body) = {
                let mut s = shared.borrow_mut();
                let cfg = Rc::clone(&s.config);
                if s.authz.inflight >= cfg.authorize_inflight {
                    return;
                }
                let Some((items, body)) = s.authz.next_batch(cfg.authorize_batch) else {
                    return;
                };
                (cfg, items, body)
            };
            let auth = cfg.sidecar_auth();
            let sent = hostcalls::dispatch_http_call(
                &cfg.sidecar.cluster,
                cfg.sidecar.headers("/v1/authorize/batch", &auth),
                Some(&body),
                vec![],
                Duration::from_millis(cfg.sidecar.timeout_ms),
            );
            match sent {
                Ok(token) => {
                    let mut s = shared.borrow_mut();
                    s.authz.inflight += 1;
                    bump(s.metrics.authorize_batches);
                    let _ = hostcalls::increment_metric(
                        s.metrics.authorize_batched,
                        items.len() as i64,
                    );
                    drop(s);
                    self.authz_calls.insert(token, (items, false));
                }
                // Cannot be asked: each request gets its failure mode now.
                Err(_) => batch_answered(&shared, Vec::new(), items),
            }
        }
    }

    /// Sends each request of a batch the sidecar could not take as a `/v1/authorize` of its own
    /// (from the root, which answers it); those no longer waiting are not sent.
    fn send_singly(&mut self, shared: &SharedRef, items: Vec<Item>) {
        let cfg = Rc::clone(&shared.borrow().config);
        let auth = cfg.sidecar_auth();
        for item in items {
            if !shared.borrow().waiting.contains_key(&item.context_id) {
                continue;
            }
            let sent = hostcalls::dispatch_http_call(
                &cfg.sidecar.cluster,
                cfg.sidecar.headers("/v1/authorize", &auth),
                Some(&item.body),
                vec![],
                Duration::from_millis(cfg.sidecar.timeout_ms),
            );
            match sent {
                Ok(token) => {
                    shared.borrow_mut().authz.inflight += 1;
                    self.authz_calls.insert(token, (vec![item], true));
                }
                Err(_) => batch_answered(shared, Vec::new(), vec![item]),
            }
        }
    }

    /// Asks for the leases requests asked for, and settles the leases that are done: a commit of
    /// what their requests used, or a release when they admitted nothing.
    fn tend_leases(&mut self, now: u64) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let (asks, due, cfg) = {
            let mut s = shared.borrow_mut();
            let asks: Vec<LeaseAsk> = s.leases.asks.drain(..).collect();
            let due = s.leases.due(now);
            (asks, due, Rc::clone(&s.config))
        };
        for lease in due {
            let settle = if lease.used.is_empty() {
                Settle::Release(lease.hold_id)
            } else {
                Settle::Commit {
                    estimate: lease.used.clone(),
                    req: CommitRequest {
                        hold_id: lease.hold_id,
                        route: Some(lease.route),
                        model: lease.model,
                        meters: lease.used,
                        credits: 0,
                        output_text: None,
                    },
                }
            };
            let mut s = shared.borrow_mut();
            bump(s.metrics.leases_committed);
            s.settles.push_back(Pending::new(settle));
        }
        for ask in asks {
            let idem = format!("lease.{}", shared.borrow_mut().new_id());
            let req = SpendRequest {
                api_key: Some(ask.key.0.clone()),
                account: None,
                idempotency_key: idem,
                correlation_id: None,
                route: ask.route.clone(),
                model: ask.key.2.clone(),
                meters: ask.meters.clone(),
                credits: 0,
                resource: None,
            };
            match crate::http::dispatch_authorize(&cfg, &req) {
                Ok(token) => {
                    self.lease_calls.insert(token, ask);
                }
                Err(_) => shared.borrow_mut().leases.refused(&ask.key, now + 1000),
            }
        }
    }

    /// The sidecar answered a lease request.
    fn lease_answered(&mut self, ask: LeaseAsk, body_size: usize) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = now_ms();
        let (status, body) = call_answer(body_size);
        let decision: Option<Decision> = (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten();
        let mut s = shared.borrow_mut();
        match decision {
            Some(Decision {
                allowed: true,
                hold_id: Some(hold),
                ..
            }) => {
                bump(s.metrics.leases_granted);
                s.leases.granted(ask, hold, now);
            }
            // Refused (a limit or the balance cannot cover a whole lease): exact decisions
            // until the lease would have ended.
            Some(_) => {
                bump(s.metrics.leases_refused);
                let until = now + ask.ttl_ms;
                s.leases.refused(&ask.key, until);
            }
            None => s.leases.refused(&ask.key, now + 1000),
        }
    }

    /// Requests whose decision is late get their route's failure mode now.
    fn enforce_deadlines(&mut self, now: u64) {
        let Some(shared) = &self.shared else { return };
        let late: Vec<(u32, FailureMode)> = {
            let mut s = shared.borrow_mut();
            let ids: Vec<(u32, FailureMode)> = s
                .waiting
                .iter()
                .filter(|(_, w)| w.deadline_ms <= now)
                .map(|(id, w)| (*id, w.mode))
                .collect();
            for (id, _) in &ids {
                s.waiting.remove(id);
                // Answered now: a request still queued is never sent, and the request takes
                // up the answer at its next callback (a body held back goes on, or is reset).
                s.authz.unqueue(*id);
                s.authz.admitted.insert(*id, Admission::Answered);
            }
            ids
        };
        for (id, mode) in late {
            if hostcalls::set_effective_context(id).is_err() {
                continue;
            }
            let metrics = {
                let s = shared.borrow();
                (s.metrics.failed_open, s.metrics.failed_closed)
            };
            match mode {
                FailureMode::Open => {
                    bump(metrics.0);
                    let _ = hostcalls::resume_http_request();
                }
                FailureMode::Closed => {
                    bump(metrics.1);
                    reply::unavailable();
                }
            }
        }
    }

    /// Sends queued settlements that are due: commits in batches of at most `commit_batch`
    /// items and `commit_batch_bytes` bytes (an item larger than that alone), releases one by
    /// one. What fails goes back to the queue for a later tick.
    fn flush(&mut self, now: u64) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let (cfg, queued) = {
            let mut s = shared.borrow_mut();
            let due = !s.settles.is_empty()
                && (s.settles.len() >= s.config.commit_batch
                    || now.saturating_sub(self.last_flush_ms) >= s.config.commit_interval_ms);
            if !due {
                return;
            }
            let (ready, later): (VecDeque<Pending>, VecDeque<Pending>) =
                std::mem::take(&mut s.settles)
                    .into_iter()
                    .partition(|p| p.not_before_ms <= now);
            s.settles = later;
            (Rc::clone(&s.config), ready)
        };
        self.last_flush_ms = now;
        let mut batch: Vec<Pending> = Vec::new();
        let mut body: Vec<u8> = Vec::new();
        let mut releases: Vec<Pending> = Vec::new();
        for p in queued {
            let item = match &p.settle {
                Settle::Commit { req, .. } => serde_json::to_vec(req).unwrap_or_default(),
                Settle::Release(_) | Settle::Cancel(_) => {
                    releases.push(p);
                    continue;
                }
            };
            let full = !batch.is_empty()
                && (p.alone
                    || batch.len() >= cfg.commit_batch
                    || body.len() + item.len() + 2 > cfg.commit_batch_bytes);
            if full {
                self.send_batch(&cfg, &mut body, std::mem::take(&mut batch), &shared);
            }
            body.push(if batch.is_empty() { b'[' } else { b',' });
            body.extend_from_slice(&item);
            let alone = p.alone;
            batch.push(p);
            if alone {
                self.send_batch(&cfg, &mut body, std::mem::take(&mut batch), &shared);
            }
        }
        if !batch.is_empty() {
            self.send_batch(&cfg, &mut body, batch, &shared);
        }
        for p in releases {
            let (path, body) = match &p.settle {
                Settle::Release(hold_id) => (
                    "/v1/release",
                    serde_json::to_vec(&tollgate_protocol::ReleaseRequest {
                        hold_id: hold_id.clone(),
                    }),
                ),
                Settle::Cancel(c) => ("/v1/cancel", serde_json::to_vec(c)),
                Settle::Commit { .. } => continue,
            };
            self.send(&cfg, path, &body.unwrap_or_default(), vec![p], &shared);
        }
    }

    /// Sends `{"commits":[…]}` made of the items in `items` (already written to `list`).
    fn send_batch(
        &mut self,
        cfg: &FilterConfig,
        list: &mut Vec<u8>,
        items: Vec<Pending>,
        shared: &SharedRef,
    ) {
        let mut body = Vec::with_capacity(list.len() + 16);
        body.extend_from_slice(b"{\"commits\":");
        body.append(list);
        body.extend_from_slice(b"]}");
        let n = items.len() as i64;
        if self.send(cfg, "/v1/commit/batch", &body, items, shared) {
            let s = shared.borrow();
            let _ = hostcalls::increment_metric(s.metrics.commits_batched, n);
            bump(s.metrics.commit_batches);
        }
    }

    /// Decides what becomes of each settlement of a callout that answered `status`.
    fn answered(shared: &SharedRef, status: u16, body: &[u8], batch: Vec<Pending>) {
        let is_batch =
            matches!(batch.first(), Some(p) if matches!(p.settle, Settle::Commit { .. }));
        let mut nexts: Vec<(Pending, Next)> = Vec::with_capacity(batch.len());
        match status {
            200 if is_batch => {
                let results = batch_outcomes(body);
                for (i, item) in batch.into_iter().enumerate() {
                    let next = match results.get(i) {
                        Some(ItemStatus::Settled) => Next::Done,
                        Some(ItemStatus::Failed(404 | 409)) => Next::Refused,
                        // This item, not its batch: a measured commit the sidecar cannot take.
                        Some(ItemStatus::Failed(s)) if *s < 500 => Next::AtEstimate,
                        _ => Next::Retry,
                    };
                    nexts.push((item, next));
                }
            }
            200 => nexts.extend(batch.into_iter().map(|p| (p, Next::Done))),
            404 | 409 => nexts.extend(batch.into_iter().map(|p| (p, Next::Refused))),
            // Refused whole (too large, unreadable): each item goes again on its own, and an
            // item that is refused alone is committed at its estimate.
            400 | 413 if is_batch => {
                let next = if batch.len() > 1 {
                    bump(shared.borrow().metrics.settle_split);
                    Next::Split
                } else {
                    Next::AtEstimate
                };
                nexts.extend(batch.into_iter().map(|p| (p, next)));
            }
            _ => nexts.extend(batch.into_iter().map(|p| (p, Next::Retry))),
        }
        let now = now_ms();
        let mut s = shared.borrow_mut();
        for (mut p, next) in nexts {
            // Text leaves the budget with its settlement (done, dropped, or at the estimate).
            let text = p.text_len();
            let keeps_text = match next {
                Next::Split => true,
                Next::Retry => p.attempts.saturating_add(1) < MAX_ATTEMPTS,
                _ => false,
            };
            if !keeps_text {
                s.text_bytes = s.text_bytes.saturating_sub(text);
            }
            match next {
                Next::Done => {}
                Next::Refused => bump(s.metrics.settle_refused),
                Next::Split => {
                    p.alone = true;
                    p.not_before_ms = now;
                    s.settles.push_back(p);
                }
                Next::Retry if p.attempts.saturating_add(1) < MAX_ATTEMPTS => {
                    bump(s.metrics.settle_retried);
                    p.attempts += 1;
                    p.not_before_ms = now + backoff_ms(p.attempts);
                    s.settles.push_back(p);
                }
                Next::Retry | Next::AtEstimate => {
                    let can_fall_back = !p.at_estimate && matches!(p.settle, Settle::Commit { .. });
                    if can_fall_back {
                        bump(s.metrics.settle_at_estimate);
                        p.fall_back_to_estimate();
                        p.attempts = 0;
                        p.alone = true;
                        p.not_before_ms = now;
                        s.settles.push_back(p);
                    } else {
                        bump(s.metrics.settle_dropped);
                        log(
                            LogLevel::Warn,
                            "tollgate: settlement dropped after retries; the hold will expire",
                        );
                    }
                }
            }
        }
    }

    /// Dispatches one settlement callout; false (and requeued) when the host refuses it.
    fn send(
        &mut self,
        cfg: &FilterConfig,
        path: &str,
        body: &[u8],
        items: Vec<Pending>,
        shared: &SharedRef,
    ) -> bool {
        let auth = cfg.sidecar_auth();
        match hostcalls::dispatch_http_call(
            &cfg.sidecar.cluster,
            cfg.sidecar.headers(path, &auth),
            Some(body),
            vec![],
            Duration::from_millis(cfg.sidecar.timeout_ms.max(1000)),
        ) {
            Ok(token) => {
                self.inflight.insert(token, items);
                true
            }
            Err(_) => {
                Self::answered(shared, 0, &[], items);
                false
            }
        }
    }
}

/// The outcomes of a batch callout's answer, in order (none when it failed or is unreadable).
fn batch_outcomes_of(status: u16, body: &[u8]) -> Vec<AuthorizeOutcome> {
    if status != 200 {
        return Vec::new();
    }
    serde_json::from_slice::<AuthorizeBatchResult>(body)
        .map(|r| r.results)
        .unwrap_or_default()
}

/// A single `/v1/authorize`'s answer as a batch item's outcome: its decision, or its error
/// status (none when no status came: then nothing is known of what it did).
fn single_outcome(status: u16, body: &[u8], replayed: bool) -> Vec<AuthorizeOutcome> {
    match status {
        200 => serde_json::from_slice::<Decision>(body)
            .map(|decision| AuthorizeOutcome::Decided { decision, replayed })
            .into_iter()
            .collect(),
        0 => Vec::new(),
        status => vec![AuthorizeOutcome::Failed {
            status,
            error: tollgate_protocol::ErrorDetail {
                code: "callout".into(),
                message: String::new(),
            },
        }],
    }
}

/// Answers each request of an authorize batch (`results` in order; a request without one gets
/// its failure mode: the batch could not be asked, or no answer came), in the request's
/// context; a request that is no longer waiting (gone, or answered by its deadline) has what was
/// held for it given back.
fn batch_answered(shared: &SharedRef, results: Vec<AuthorizeOutcome>, items: Vec<Item>) {
    let now = now_ms();
    for (i, item) in items.into_iter().enumerate() {
        let outcome = results.get(i);
        let waiting = shared.borrow_mut().waiting.remove(&item.context_id);
        let here = waiting.is_some() && hostcalls::set_effective_context(item.context_id).is_ok();
        let Some(w) = waiting.filter(|_| here) else {
            let give_back = match outcome {
                Some(AuthorizeOutcome::Decided {
                    decision,
                    replayed: false,
                }) if holds(decision) => decision.hold_id.clone().map(Settle::Release),
                Some(AuthorizeOutcome::Decided { .. }) => None,
                // Refused as a bad request: nothing was made.
                Some(AuthorizeOutcome::Failed { status, .. }) if *status < 500 => None,
                // No answer: whatever it may have made is cancelled by its key.
                _ => Some(Settle::Cancel(CancelRequest {
                    api_key: item.api_key,
                    idempotency_key: item.idempotency_key,
                })),
            };
            if let Some(settle) = give_back {
                shared.borrow_mut().settles.push_back(Pending::new(settle));
            }
            continue;
        };
        let mut s = shared.borrow_mut();
        crate::shared::record(s.metrics.callout_ms, now.saturating_sub(item.asked_ms));
        let ctx = item.context_id;
        match outcome {
            Some(AuthorizeOutcome::Decided {
                decision: d,
                replayed: true,
            }) if d.allowed && item.client_key => {
                bump(s.metrics.key_reused);
                s.authz.admitted.insert(ctx, Admission::Answered);
                drop(s);
                reply::reject(
                    409,
                    "idempotency_key_reused",
                    "a request with this Idempotency-Key was already accepted",
                );
            }
            Some(AuthorizeOutcome::Decided { decision: d, .. }) if holds(d) => {
                bump(s.metrics.allowed);
                let shadow = crate::reply::shadow_header(d);
                if shadow.is_some() {
                    bump(s.metrics.shadow_would_deny);
                }
                let admission = Admission::Allowed {
                    hold_id: d.hold_id.clone().unwrap_or_default(),
                    limit: d.limit.clone(),
                    shadow,
                };
                s.authz.admitted.insert(ctx, admission);
                drop(s);
                let _ = hostcalls::resume_http_request();
            }
            Some(AuthorizeOutcome::Decided { decision: d, .. }) if !d.allowed => {
                bump(s.metrics.denied);
                s.authz.admitted.insert(ctx, Admission::Answered);
                drop(s);
                reply::denied(d, now);
            }
            _ => {
                s.authz.admitted.insert(ctx, Admission::Answered);
                match w.mode {
                    FailureMode::Open => {
                        bump(s.metrics.failed_open);
                        drop(s);
                        let _ = hostcalls::resume_http_request();
                    }
                    FailureMode::Closed => {
                        bump(s.metrics.failed_closed);
                        drop(s);
                        reply::unavailable();
                    }
                }
            }
        }
    }
}
