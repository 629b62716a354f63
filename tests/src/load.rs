//! A small HTTP/1.1 load generator for the side-by-side benchmarks: keep-alive connections, each
//! sending one request at a time, either as fast as it can (closed loop: the maximum load) or on
//! a fixed schedule (open loop: latency at a given load).
//!
//! In the paced mode a request's latency is measured from the moment it was *due*, not from when
//! it was sent, so a stall delays every request queued behind it and shows in the percentiles
//! (no "coordinated omission"). Each connection may send its own headers (one API key per
//! connection, or all on one key for the hot-key case).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Headers for the requests of connection `i`.
pub type HeadersFor = Arc<dyn Fn(usize) -> Vec<(String, String)> + Send + Sync>;

/// The path and body of connection `i`'s next request, when requests differ (a new idempotency
/// key each, another account each).
pub type RequestFor = Arc<dyn Fn(usize) -> (String, Bytes) + Send + Sync>;

#[derive(Clone)]
pub struct Load {
    pub port: u16,
    pub method: &'static str,
    pub path: String,
    pub body: Bytes,
    pub connections: usize,
    pub duration: Duration,
    /// Total requests per second over all connections; `None` runs closed-loop (as fast as it can).
    pub rate: Option<u64>,
    pub headers: HeadersFor,
    /// Overrides `path` and `body` per request.
    pub vary: Option<RequestFor>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub elapsed: Duration,
    /// Every response's latency in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    pub statuses: BTreeMap<u16, u64>,
    /// Connection or protocol failures (no HTTP status).
    pub errors: u64,
}

impl Outcome {
    pub fn requests(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn per_second(&self) -> f64 {
        self.requests() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of latency, in milliseconds.
    pub fn pct_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i.min(self.latencies_us.len() - 1)]) / 1000.0
    }

    /// Responses with a status other than `ok`, plus transport errors.
    pub fn not(&self, ok: u16) -> u64 {
        self.errors
            + self
                .statuses
                .iter()
                .filter(|(s, _)| **s != ok)
                .map(|(_, n)| n)
                .sum::<u64>()
    }
}

struct ConnResult {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
}

/// Runs the load and gathers every connection's results.
pub async fn run(load: Load) -> Outcome {
    let started = Instant::now();
    let end = started + load.duration;
    let tasks: Vec<_> = (0..load.connections)
        .map(|i| tokio::spawn(connection(load.clone(), i, started, end)))
        .collect();
    let mut out = Outcome::default();
    for t in tasks {
        if let Ok(r) = t.await {
            out.latencies_us.extend(r.latencies_us);
            for (s, n) in r.statuses {
                *out.statuses.entry(s).or_default() += n;
            }
            out.errors += r.errors;
        }
    }
    out.elapsed = started.elapsed();
    out.latencies_us.sort_unstable();
    out
}

async fn connection(load: Load, i: usize, started: Instant, end: Instant) -> ConnResult {
    let mut r = ConnResult {
        latencies_us: Vec::with_capacity(1 << 14),
        statuses: BTreeMap::new(),
        errors: 0,
    };
    let headers = (load.headers)(i);
    // Paced: this connection's share of the rate, its first request offset so connections
    // do not fire in lockstep.
    let interval = load
        .rate
        .map(|rate| Duration::from_secs_f64(load.connections as f64 / rate.max(1) as f64));
    let offset = interval.map_or(Duration::ZERO, |iv| {
        iv.mul_f64(i as f64 / load.connections as f64)
    });
    let mut due = started + offset;
    let mut sender = None;
    while Instant::now() < end {
        if interval.is_some() {
            tokio::time::sleep_until(due.into()).await;
            if due >= end {
                break;
            }
        }
        if sender.is_none() {
            sender = connect(load.port).await;
            if sender.is_none() {
                r.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let (path, body) = match &load.vary {
            Some(f) => f(i),
            None => (load.path.clone(), load.body.clone()),
        };
        let mut req = Request::builder()
            .method(load.method)
            .uri(path.as_str())
            .header("host", "bench.local");
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let Ok(req) = req.body(Full::new(body)) else {
            r.errors += 1;
            break;
        };
        let t0 = if interval.is_some() {
            due
        } else {
            Instant::now()
        };
        let result = async {
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        }
        .await;
        match result {
            Ok(status) => {
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                r.latencies_us.push(us);
                *r.statuses.entry(status).or_default() += 1;
            }
            Err(_) => {
                r.errors += 1;
                sender = None; // reconnect
            }
        }
        if let Some(iv) = interval {
            due += iv;
        }
    }
    r
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}
