//! Authorize callouts past one per request: a worker keeps at most `authorize_inflight` of them
//! out. A request that comes while the line is full waits here, in the root context, and goes
//! with the others that came meanwhile as one `/v1/authorize/batch` callout as soon as a callout
//! answers — adaptive, like Nagle's algorithm: no timer, and no wait at all when the line is
//! idle. The sidecar decides each item on its own (all or nothing, idempotent by its own key).
//!
//! A batch is sent from the root context, so its answer comes back even when a request in it
//! has gone (then the root gives back what was held for it). The request that freed the line
//! may be a request context, whose callouts the SDK answers to that context only: it wakes the
//! root through a shared queue of this VM's own, whose `on_queue_ready` Envoy posts to the same
//! worker's event loop.
//!
//! A sidecar that does not know the batch route (an older version, during a rolling upgrade)
//! answers it 404: the worker then stops batching for a minute, and the requests of that batch
//! are sent again one by one, from the root.

use proxy_wasm::hostcalls;
use tollgate_protocol::{Decision, LimitState};

/// A request waiting for the line or in a batch: what the root needs to send it, answer it, or
/// give back its hold.
#[derive(Debug, Clone)]
pub struct Item {
    pub context_id: u32,
    /// Its `SpendRequest`, serialized.
    pub body: Vec<u8>,
    pub api_key: String,
    pub idempotency_key: String,
    /// The decision key is the client's `Idempotency-Key` (a replay of it is refused, 409).
    pub client_key: bool,
    pub asked_ms: u64,
}

/// What the root decided for a request in a batch, for the request to take up at its next
/// callback (the root cannot reach the request's own state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Allowed with this hold: measure the response and settle.
    Allowed {
        hold_id: String,
        limit: Option<LimitState>,
        /// `x-tollgate-shadow` for the response: shadow limits that would have refused it.
        shadow: Option<String>,
    },
    /// Answered (denied, refused, or passed by the failure mode): nothing to settle.
    Answered,
}

#[derive(Default)]
pub struct Authz {
    /// Authorize callouts out now (single or batch).
    pub inflight: u32,
    pub queue: Vec<Item>,
    /// The sidecar answered the batch route 404: until then (unix ms), every request has a
    /// callout of its own.
    pub unsupported_until_ms: u64,
    /// This VM's wake-up queue (`None`: the host has none, so no batching).
    pub wake: Option<u32>,
    /// A wake-up is posted and not yet delivered.
    pub woken: bool,
    pub admitted: crate::vecmap::VecMap<u32, Admission>,
}

impl Authz {
    /// Whether a request should wait for the line instead of calling out now.
    pub fn must_wait(&self, inflight_max: u32, batch: usize, now_ms: u64) -> bool {
        batch > 0
            && self.wake.is_some()
            && now_ms >= self.unsupported_until_ms
            && self.inflight >= inflight_max
    }

    /// A callout answered (or was dropped with its stream): the line has room. Returns whether
    /// the root must be woken to send the queue.
    pub fn freed(&mut self) -> bool {
        self.inflight = self.inflight.saturating_sub(1);
        if self.queue.is_empty() || self.woken {
            return false;
        }
        self.woken = true;
        true
    }

    /// Removes a request from the queue; whether it was there (then nothing was sent for it).
    pub fn unqueue(&mut self, context_id: u32) -> bool {
        let before = self.queue.len();
        self.queue.retain(|q| q.context_id != context_id);
        self.queue.len() != before
    }

    /// The next batch: up to `max` queued requests, and its body.
    pub fn next_batch(&mut self, max: usize) -> Option<(Vec<Item>, Vec<u8>)> {
        if self.queue.is_empty() {
            return None;
        }
        let n = self.queue.len().min(max.max(1));
        let items: Vec<Item> = self.queue.drain(..n).collect();
        let mut body =
            Vec::with_capacity(items.iter().map(|q| q.body.len() + 1).sum::<usize>() + 16);
        body.extend_from_slice(b"{\"requests\":[");
        for (i, q) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&q.body);
        }
        body.extend_from_slice(b"]}");
        Some((items, body))
    }
}

/// Posts a wake-up to the root (see the module's note). False if the host refused.
pub fn wake(queue: u32) -> bool {
    hostcalls::enqueue_shared_queue(queue, Some(b"1")).is_ok()
}

/// Whether a decision admits a request with a hold of its own.
pub fn holds(d: &Decision) -> bool {
    d.allowed && d.hold_id.is_some()
}
