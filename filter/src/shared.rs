//! State shared by the root context and the request contexts of one VM (one Envoy worker):
//! the configuration, requests waiting for a decision (so the root's tick can enforce the
//! deadline), settlements waiting to be sent in a batch, and metric ids.
//!
//! Everything runs on the worker's single thread, so `Rc<RefCell<_>>` is enough; borrows are
//! never held across a host call that could re-enter the filter.

use crate::config::{FailureMode, FilterConfig};
use crate::vecmap::VecMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use tollgate_protocol::{CommitRequest, Meters};

/// A settlement to send to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The actual usage, and the hold's estimate to commit instead if the sidecar cannot take
    /// the measured commit (a hold is never left to expire free).
    Commit {
        req: CommitRequest,
        estimate: Meters,
    },
    Release(String),
    /// Give up on a decision whose answer may never come back (`/v1/cancel`): its hold is
    /// released if it was made, and can no longer be made if not.
    Cancel(tollgate_protocol::CancelRequest),
}

/// A settlement waiting to be sent, with its retry state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub settle: Settle,
    pub attempts: u8,
    /// Already replaced by a commit at the estimate: the next failure drops it.
    pub at_estimate: bool,
    /// Sent in a batch of its own (its batch was refused whole).
    pub alone: bool,
    pub not_before_ms: u64,
}

/// Most `output_text` a worker keeps waiting for the sidecar; past it, a commit is queued at
/// its estimate instead (counted in `tollgate.settle_at_estimate`).
pub const MAX_QUEUED_TEXT: usize = 32 << 20;

impl Pending {
    /// Bytes of text this settlement carries.
    pub fn text_len(&self) -> usize {
        match &self.settle {
            Settle::Commit { req, .. } => req.output_text.as_ref().map_or(0, String::len),
            Settle::Release(_) | Settle::Cancel(_) => 0,
        }
    }

    /// Replaces a commit's measured usage with its hold's estimate (and drops its text).
    pub fn fall_back_to_estimate(&mut self) {
        if let Settle::Commit { req, estimate } = &mut self.settle {
            req.meters = estimate.clone();
            req.output_text = None;
        }
        self.at_estimate = true;
    }

    pub fn new(settle: Settle) -> Self {
        Pending {
            settle,
            attempts: 0,
            at_estimate: false,
            alone: false,
            not_before_ms: 0,
        }
    }
}

/// A request paused for its decision.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    pub deadline_ms: u64,
    pub mode: FailureMode,
}

#[derive(Default)]
pub struct Metrics {
    pub allowed: u32,
    pub denied: u32,
    pub failed_open: u32,
    pub failed_closed: u32,
    pub passed: u32,
    pub rejected: u32,
    pub commits_batched: u32,
    pub commit_batches: u32,
    pub settle_dropped: u32,
    /// Settlement callouts retried, batches split because the sidecar refused them whole,
    /// commits sent at the estimate after the measured one could not be taken, and items the
    /// sidecar refused for good (unknown or already settled hold).
    pub settle_retried: u32,
    pub settle_split: u32,
    pub settle_at_estimate: u32,
    pub settle_refused: u32,
    /// Decisions given up on by their key (the stream ended before the answer came).
    pub cancelled: u32,
    /// Streaming requests given `stream_options.include_usage`.
    pub usage_requested: u32,
    /// Requests refused before the sidecar: a path with no canonical form, an estimate that
    /// cannot be read (`bad_estimate: reject`), a reused client idempotency key.
    pub invalid_path: u32,
    pub bad_estimate: u32,
    pub key_reused: u32,
    /// Upstream errors without usage, settled by the route's `on_upstream_error`.
    pub upstream_errors: u32,
    pub usage_errors: u32,
    pub callout_ms: u32,
    /// Requests admitted from a lease (no callout).
    pub leased: u32,
    /// Leases granted, refused, committed.
    pub leases_granted: u32,
    pub leases_refused: u32,
    pub leases_committed: u32,
    /// Authorize batches sent, and the requests they carried.
    pub authorize_batches: u32,
    pub authorize_batched: u32,
    /// Requests that passed although a shadow limit or a shadow route would have refused them.
    pub shadow_would_deny: u32,
    /// Stream budgets: holds extended mid-stream, and streams ended because an extension was
    /// refused (or could not be asked on a route that fails closed).
    pub stream_extensions: u32,
    pub streams_stopped: u32,
}

impl Metrics {
    /// Defines the metrics with the host; a metric the host refuses is simply not recorded.
    pub fn define() -> Self {
        let c = |name: &str| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        Metrics {
            allowed: c("tollgate.allowed"),
            denied: c("tollgate.denied"),
            failed_open: c("tollgate.failed_open"),
            failed_closed: c("tollgate.failed_closed"),
            passed: c("tollgate.passed"),
            rejected: c("tollgate.rejected"),
            commits_batched: c("tollgate.commits_batched"),
            commit_batches: c("tollgate.commit_batches"),
            settle_dropped: c("tollgate.settle_dropped"),
            settle_retried: c("tollgate.settle_retried"),
            settle_split: c("tollgate.settle_split"),
            settle_at_estimate: c("tollgate.settle_at_estimate"),
            settle_refused: c("tollgate.settle_refused"),
            usage_requested: c("tollgate.usage_requested"),
            cancelled: c("tollgate.decisions_cancelled"),
            invalid_path: c("tollgate.invalid_path"),
            bad_estimate: c("tollgate.bad_estimate"),
            key_reused: c("tollgate.idempotency_key_reused"),
            upstream_errors: c("tollgate.upstream_errors"),
            usage_errors: c("tollgate.usage_errors"),
            leased: c("tollgate.leased"),
            leases_granted: c("tollgate.leases_granted"),
            leases_refused: c("tollgate.leases_refused"),
            leases_committed: c("tollgate.leases_committed"),
            authorize_batches: c("tollgate.authorize_batches"),
            authorize_batched: c("tollgate.authorize_batched"),
            shadow_would_deny: c("tollgate.shadow_would_deny"),
            stream_extensions: c("tollgate.stream_extensions"),
            streams_stopped: c("tollgate.streams_stopped"),
            callout_ms: hostcalls::define_metric(MetricType::Histogram, "tollgate.callout_ms")
                .unwrap_or(0),
        }
    }
}

pub fn bump(metric: u32) {
    if metric != 0 {
        let _ = hostcalls::increment_metric(metric, 1);
    }
}

pub fn record(metric: u32, value: u64) {
    if metric != 0 {
        let _ = hostcalls::record_metric(metric, value);
    }
}

pub struct Shared {
    pub config: Rc<FilterConfig>,
    pub metrics: Metrics,
    /// context id -> its deadline, while it waits for the sidecar.
    pub waiting: VecMap<u32, Waiting>,
    pub settles: VecDeque<Pending>,
    /// Bytes of `output_text` held by queued and in-flight settlements (bounded by
    /// [`MAX_QUEUED_TEXT`]: while the sidecar cannot take commits, they do not pile up text).
    pub text_bytes: usize,
    /// Leases this worker holds (routes with `lease`).
    pub leases: crate::lease::Leases,
    /// The authorize line: callouts out, requests waiting for a batch.
    pub authz: crate::authz::Authz,
    /// Makes request ids unique within this VM.
    pub counter: u64,
    /// Secret keys (from the host's WASI random source) of the PRF that makes ids.
    pub secret: std::collections::hash_map::RandomState,
}

pub type SharedRef = Rc<RefCell<Shared>>;

/// Unix time in milliseconds from the host (0 if it will not say).
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    /// A new unguessable 128-bit id, as 32 hex digits: SipHash (a PRF) of a counter under keys
    /// only this VM knows. Decision keys and hold ids carry it, so a hold cannot be named by
    /// anyone who did not make it; nothing about one id tells another.
    pub fn new_id(&mut self) -> String {
        use std::hash::{BuildHasher, Hasher};
        self.counter = self.counter.wrapping_add(1);
        let half = |lane: u8| {
            let mut h = self.secret.build_hasher();
            h.write_u64(self.counter);
            h.write_u8(lane);
            h.finish()
        };
        format!("{:016x}{:016x}", half(0), half(1))
    }
}
