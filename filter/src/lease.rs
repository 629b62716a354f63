//! Leases: the step past the callout ceiling, opt-in per route.
//!
//! A lease is an ordinary hold at the sidecar — one authorize of `requests` × the triggering
//! request's estimate, under its own idempotency key — so the sidecar checks every limit and the
//! balance for the whole lease at once, exactly as for one request, and reserves it. This worker
//! then admits requests of the same key, route and model by subtracting their estimate from the
//! lease's allowance, with no callout. Each such request adds its *measured* usage to the lease;
//! when the lease expires (or is replaced by a fresh one) and its last request has settled, the
//! lease is committed with the sum of what was used, which returns what was not.
//!
//! What this keeps exact: credit is never spent that the lease did not reserve at the sidecar,
//! and a limit is never passed by more than what a worker holds unused in its leases (the
//! operator bounds it with `requests`). What it gives up: a request admitted from a lease gets
//! no RateLimit headers, and a response that carries no `usage` object is charged its estimate
//! (the tokenizer runs at the sidecar, per commit). Each Envoy worker holds its own leases.
//!
//! State lives in the VM's [`crate::shared::Shared`]; the root context asks for leases on its
//! tick, so their answers come back to the root and outlive any one request.

use crate::vecmap::VecMap;
use std::collections::VecDeque;
use tollgate_protocol::Meters;

/// What a lease is for: one API key on one route and model.
pub type LeaseKey = (String, usize, Option<String>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub hold_id: String,
    pub route: String,
    pub model: Option<String>,
    /// Allowance left to admit requests with.
    pub remaining: Meters,
    /// Measured usage of the requests admitted so far (what the commit charges).
    pub used: Meters,
    pub expires_ms: u64,
    /// Requests admitted from this lease and not yet settled.
    pub inflight: u32,
    /// No more requests are admitted from it; committed once `inflight` is 0.
    pub closed: bool,
}

/// A lease to ask the sidecar for (sent by the root on its tick).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub key: LeaseKey,
    pub route: String,
    pub meters: Meters,
    pub ttl_ms: u64,
}

#[derive(Default)]
pub struct Leases {
    /// The lease requests of a key are admitted from.
    active: VecMap<LeaseKey, u64>,
    leases: VecMap<u64, Lease>,
    next_id: u64,
    /// Keys with a lease asked for and not answered yet.
    pending: VecMap<LeaseKey, ()>,
    /// Keys not to ask for again before the time (after a denial or a failure).
    backoff: VecMap<LeaseKey, u64>,
    pub asks: VecDeque<LeaseAsk>,
}

/// Whether `allowance` covers `estimate` on every meter.
fn covers(allowance: &Meters, estimate: &Meters) -> bool {
    estimate
        .iter()
        .all(|(m, v)| allowance.get(m).is_some_and(|a| a >= v))
}

impl Leases {
    /// Admits a request from the key's lease if it covers the estimate; returns the lease id.
    /// Asks for a new lease when there is none (or the current one runs low), unless one is
    /// already asked for or the key is backing off.
    pub fn take(
        &mut self,
        key: &LeaseKey,
        route: &str,
        estimate: &Meters,
        requests: u64,
        ttl_ms: u64,
        now: u64,
    ) -> Option<u64> {
        let mut taken = None;
        let mut low = true;
        if let Some(id) = self.active.get(key).copied() {
            if let Some(l) = self.leases.get_mut(&id) {
                if !l.closed && l.expires_ms > now && covers(&l.remaining, estimate) {
                    for (m, v) in estimate {
                        if let Some(a) = l.remaining.get_mut(m) {
                            *a -= v;
                        }
                    }
                    l.inflight += 1;
                    taken = Some(id);
                    // Ask for the next lease while a quarter of this one is left.
                    let quarter: Meters = estimate
                        .iter()
                        .map(|(m, v)| (m.clone(), v.saturating_mul(requests / 4)))
                        .collect();
                    low = !covers(&l.remaining, &quarter) || l.expires_ms <= now + ttl_ms / 4;
                }
            }
        }
        if low && !self.pending.contains_key(key) && self.backoff.get(key).is_none_or(|t| *t <= now)
        {
            self.backoff.remove(key);
            self.pending.insert(key.clone(), ());
            self.asks.push_back(LeaseAsk {
                key: key.clone(),
                route: route.to_string(),
                meters: estimate
                    .iter()
                    .map(|(m, v)| (m.clone(), v.saturating_mul(requests)))
                    .collect(),
                ttl_ms,
            });
        }
        taken
    }

    /// The sidecar granted `ask` as `hold_id`: it becomes the key's lease (the one it replaces is
    /// closed and committed once its requests have settled).
    pub fn granted(&mut self, ask: LeaseAsk, hold_id: String, now: u64) {
        self.pending.remove(&ask.key);
        self.next_id += 1;
        let id = self.next_id;
        if let Some(old) = self.active.insert(ask.key.clone(), id) {
            if let Some(l) = self.leases.get_mut(&old) {
                l.closed = true;
            }
        }
        self.leases.insert(
            id,
            Lease {
                hold_id,
                route: ask.route,
                model: ask.key.2.clone(),
                remaining: ask.meters,
                used: Meters::new(),
                expires_ms: now + ask.ttl_ms,
                inflight: 0,
                closed: false,
            },
        );
    }

    /// The sidecar refused the lease (a limit or the balance cannot cover it) or could not be
    /// asked: requests of the key go the exact way, and no lease is asked for until `until`.
    pub fn refused(&mut self, key: &LeaseKey, until: u64) {
        self.pending.remove(key);
        self.backoff.insert(key.clone(), until);
    }

    /// A request admitted from lease `id` ended: its measured usage (or nothing, when it is not
    /// to be charged) counts toward the lease's commit.
    pub fn settle(&mut self, id: u64, used: Option<&Meters>) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.inflight = l.inflight.saturating_sub(1);
            for (m, v) in used.into_iter().flatten() {
                let slot = l.used.entry(m.clone()).or_insert(0);
                *slot = slot.saturating_add(*v);
            }
        }
    }

    /// Closes expired leases and takes out those ready to commit (closed, nothing in flight).
    pub fn due(&mut self, now: u64) -> Vec<Lease> {
        for l in self.leases.values_mut() {
            if l.expires_ms <= now {
                l.closed = true;
            }
        }
        let done: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.closed && l.inflight == 0)
            .map(|(id, _)| *id)
            .collect();
        self.active.retain(|_, id| !done.contains(id));
        done.iter()
            .filter_map(|id| self.leases.remove(id))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.pending.is_empty()
    }
}
