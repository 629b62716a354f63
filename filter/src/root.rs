//! The root context: configuration, the tick that enforces decision deadlines, and batched
//! settlement (commits queued by requests are sent together, so settling costs less than one
//! callout per request).

use crate::config::{FailureMode, FilterConfig};
use crate::http::Request;
use crate::lease::LeaseAsk;
use crate::reply;
use crate::shared::{bump, now_ms, random_seed, Metrics, Settle, Shared, SharedRef};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;
use tollgate_protocol::{
    CommitBatch, CommitBatchResult, CommitOutcome, CommitRequest, Decision, SpendRequest,
};

/// A settlement is retried this many times, then dropped (its hold then expires at the
/// sidecar and is released: an undercharge, never a double charge).
const MAX_ATTEMPTS: u8 = 5;

#[derive(Default)]
pub struct Root {
    shared: Option<SharedRef>,
    /// Callouts in flight: token -> what they settle.
    inflight: BTreeMap<u32, Vec<(Settle, u8)>>,
    /// Lease requests in flight: token -> what was asked.
    lease_calls: BTreeMap<u32, LeaseAsk>,
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
        let Some(batch) = self.inflight.remove(&token) else {
            return;
        };
        let status = crate::http::header(MapType::HttpCallResponseHeaders, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut retry: Vec<(Settle, u8)> = Vec::new();
        match (status, batch.first()) {
            // A batch of commits: look at each item.
            (200, Some((Settle::Commit(_), _))) => {
                let results = serde_json::from_slice::<CommitBatchResult>(&body)
                    .map(|r| r.results)
                    .unwrap_or_default();
                for (i, item) in batch.into_iter().enumerate() {
                    match results.get(i) {
                        Some(CommitOutcome::Settled(_)) => {}
                        // 4xx: the sidecar says no (unknown hold, already settled): final.
                        Some(CommitOutcome::Failed { status, .. }) if *status < 500 => {}
                        _ => retry.push(item),
                    }
                }
            }
            (200 | 404 | 409, _) => {}
            _ => retry = batch,
        }
        if let Some(shared) = &self.shared {
            Self::requeue(shared, retry);
        }
    }
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
        self.shared = Some(Rc::new(RefCell::new(Shared {
            config: Rc::new(config),
            metrics: Metrics::define(),
            waiting: BTreeMap::new(),
            settles: VecDeque::new(),
            leases: Default::default(),
            counter: 0,
            seed: random_seed(),
        })));
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.enforce_deadlines(now);
        self.tend_leases(now);
        self.flush(now);
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
                Settle::Commit(CommitRequest {
                    hold_id: lease.hold_id,
                    route: Some(lease.route),
                    model: lease.model,
                    meters: lease.used,
                    credits: 0,
                    output_text: None,
                })
            };
            let mut s = shared.borrow_mut();
            bump(s.metrics.leases_committed);
            s.settles.push_back((settle, 0));
        }
        for ask in asks {
            let idem = {
                let mut s = shared.borrow_mut();
                s.counter = s.counter.wrapping_add(1);
                format!("lease.{:x}.{:x}.{:x}", s.seed, now, s.counter)
            };
            let req = SpendRequest {
                api_key: Some(ask.key.0.clone()),
                account: None,
                idempotency_key: idem,
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
        let status = crate::http::header(MapType::HttpCallResponseHeaders, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let decision: Option<Decision> = (status == 200)
            .then(|| hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok())
            .flatten()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
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

    /// Sends queued settlements: commits in batches, releases one by one. Only what is queued
    /// now is sent; what fails goes back to the queue for a later tick.
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
            (Rc::clone(&s.config), std::mem::take(&mut s.settles))
        };
        self.last_flush_ms = now;
        let (commits, releases): (Vec<_>, Vec<_>) = queued
            .into_iter()
            .partition(|(s, _)| matches!(s, Settle::Commit(_)));
        let mut commits = commits.into_iter().peekable();
        while commits.peek().is_some() {
            let chunk: Vec<(Settle, u8)> = commits.by_ref().take(cfg.commit_batch).collect();
            let batch = CommitBatch {
                commits: chunk
                    .iter()
                    .filter_map(|(s, _)| match s {
                        Settle::Commit(c) => Some(c.clone()),
                        Settle::Release(_) => None,
                    })
                    .collect(),
            };
            let n = batch.commits.len() as i64;
            let body = serde_json::to_vec(&batch).unwrap_or_default();
            if self.send(&cfg, "/v1/commit/batch", &body, chunk, &shared) {
                let s = shared.borrow();
                let _ = hostcalls::increment_metric(s.metrics.commits_batched, n);
                bump(s.metrics.commit_batches);
            }
        }
        for (settle, n) in releases {
            if let Settle::Release(hold_id) = &settle {
                let body = serde_json::to_vec(&tollgate_protocol::ReleaseRequest {
                    hold_id: hold_id.clone(),
                })
                .unwrap_or_default();
                self.send(&cfg, "/v1/release", &body, vec![(settle, n)], &shared);
            }
        }
    }

    /// Puts settlements back for a later tick, or drops them after MAX_ATTEMPTS.
    fn requeue(shared: &SharedRef, items: Vec<(Settle, u8)>) {
        let mut s = shared.borrow_mut();
        for (settle, attempts) in items {
            if attempts.saturating_add(1) >= MAX_ATTEMPTS {
                bump(s.metrics.settle_dropped);
                log(
                    LogLevel::Warn,
                    "tollgate: settlement dropped after retries; the hold will expire",
                );
            } else {
                s.settles.push_back((settle, attempts + 1));
            }
        }
    }

    /// Dispatches one settlement callout; false (and requeued) when the host refuses it.
    fn send(
        &mut self,
        cfg: &FilterConfig,
        path: &str,
        body: &[u8],
        items: Vec<(Settle, u8)>,
        shared: &SharedRef,
    ) -> bool {
        let headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", cfg.sidecar.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match hostcalls::dispatch_http_call(
            &cfg.sidecar.cluster,
            headers,
            Some(body),
            vec![],
            Duration::from_millis(cfg.sidecar.timeout_ms.max(1000)),
        ) {
            Ok(token) => {
                self.inflight.insert(token, items);
                true
            }
            Err(_) => {
                Self::requeue(shared, items);
                false
            }
        }
    }
}
