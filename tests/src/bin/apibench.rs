//! `tollgate-apibench` (`./tg bench api`): the sidecar's HTTP API against the targets the
//! systems it replaces set themselves (../shared/seeds): coupon claims 1,000/s at p95 < 500 ms,
//! points deductions 2,000/s at p95 < 200 ms, balance queries 5,000/s at p95 < 100 ms, and a
//! billing decision at p99 < 100 ms. Those services call their quota system from an application
//! server, so this drives the release sidecar over HTTP from this separate process.
//!
//! For each store (Redis + PostgreSQL with the sync running, then the embedded store) it starts
//! the sidecar binary, makes `--accounts` accounts with credit and `--pools` pools, and for each
//! operation measures
//! - the rate at saturation (closed loop, `--connections` keep-alive connections), and
//! - p50/p95/p99 at the seed's target rate (open loop: latency from when a request was *due*,
//!   so a stall counts against every request queued behind it),
//!
//! and a trivial endpoint of the same server (`GET /healthz`) the same way, in the same run: every
//! figure is also printed as a ratio to it, because these two cores are shared by the load, the
//! sidecar, Redis and PostgreSQL, and they are noisy.
//!
//! Operations: `claim` (`POST /admin/pools/{id}/claims`, each account once per pool), `consume`
//! (`POST /v1/consume`, 5 points a deduction, a new idempotency key each), `authorize` then
//! `commit` (`/v1/authorize`, `/v1/commit` of the same holds: the LLM gateway's billing
//! decision), `balance` and `usage` (`GET /v1/accounts/{id}/…`). Trusted server-side calls
//! (`server.service_token`, accounts by id), as an application server makes them.
//!
//! Options: --seconds N (5) --accounts N (2000) --pools N (24) --connections N (64)
//! --store redis|embedded|both (both). The sidecar binary: TOLLGATE_SIDECAR_BIN, else
//! `$CARGO_TARGET_DIR/release/tollgate-sidecar`. URLs: TOLLGATE_REDIS_URL
//! (redis://127.0.0.1:6379), TOLLGATE_BENCH_DATABASE_URL (postgres://postgres@127.0.0.1:5432); a
//! fresh database and key prefix per run, dropped at the end.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasm_host::load::{self, Load, Outcome};
use wasm_host::sidecar::SidecarProcess;

const ADMIN: &str = "apibench-admin-token-0123456789";
const SERVICE: &str = "apibench-service-token-0123456789";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn num(name: &str, default: u64) -> u64 {
    arg(name, &default.to_string()).parse().unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18_089)
}

fn sidecar_toml(prefix: &str) -> String {
    format!(
        r#"
meters = ["requests", "points"]
[server]
listen = "127.0.0.1:0"
shards = 16
[redis]
key_prefix = "{prefix}"
[plans.member]
limits = [
  {{ meter = "requests", window = "minute", max = 1000000000 }},
  {{ meter = "points", window = "day", max = 1000000000000 }},
]
[prices.default]
requests = 1
[prices.points]
requests = 0
points = 1
"#
    )
}

/// One measured operation: its saturation, and its latency at a rate.
struct Row {
    name: &'static str,
    saturation: Outcome,
    paced: Option<(u64, Outcome)>,
    ok: u16,
}

struct Bench {
    port: u16,
    connections: usize,
    seconds: u64,
    accounts: usize,
}

impl Bench {
    fn load(
        &self,
        method: &'static str,
        rate: Option<u64>,
        token: &str,
        vary: load::RequestFor,
    ) -> Load {
        let token = token.to_string();
        Load {
            port: self.port,
            method,
            path: "/".into(),
            body: Bytes::new(),
            connections: self.connections,
            duration: Duration::from_secs(self.seconds),
            rate,
            headers: Arc::new(move |_| {
                vec![
                    ("content-type".to_string(), "application/json".to_string()),
                    ("authorization".to_string(), format!("Bearer {token}")),
                ]
            }),
            vary: Some(vary),
        }
    }

    /// Saturation (after a second's warm-up), then the paced run at `rate`.
    async fn measure(
        &self,
        name: &'static str,
        method: &'static str,
        token: &str,
        ok: u16,
        rate: Option<u64>,
        vary: load::RequestFor,
    ) -> Row {
        let mut warm = self.load(method, None, token, vary.clone());
        warm.duration = Duration::from_secs(1);
        load::run(warm).await;
        let saturation = load::run(self.load(method, None, token, vary.clone())).await;
        let paced = match rate {
            Some(r) => Some((r, load::run(self.load(method, Some(r), token, vary)).await)),
            None => None,
        };
        Row {
            name,
            saturation,
            paced,
            ok,
        }
    }

    fn account(&self, n: u64) -> String {
        format!("m{}", n % self.accounts as u64)
    }
}

fn fixed(path: &str) -> load::RequestFor {
    let path = path.to_string();
    Arc::new(move |_| (path.clone(), Bytes::new()))
}

async fn setup(base: &str, accounts: usize, pools: usize, stock: u64) -> Result<()> {
    let http = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.post(url).bearer_auth(ADMIN).json(&body).send().await?;
            if !r.status().is_success() {
                bail!("{}: {}", r.status(), r.text().await.unwrap_or_default());
            }
            Ok::<(), anyhow::Error>(())
        }
    };
    let made = futures::stream::iter(0..accounts)
        .map(|i| {
            let post = &post;
            async move {
                let id = format!("m{i}");
                post(
                    "/admin/accounts".into(),
                    json!({"id": id, "plan": "member"}),
                )
                .await?;
                post(
                    format!("/admin/accounts/{id}/grants"),
                    json!({"grant_id": "points", "amount": 1_000_000_000_000u64}),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    if let Some(Err(e)) = made.into_iter().find(|r| r.is_err()) {
        return Err(e.context("making the accounts"));
    }
    for p in 0..pools {
        post(
            "/admin/pools".into(),
            json!({"id": format!("coupon{p}"), "stock": stock}),
        )
        .await?;
    }
    Ok(())
}

fn ms(o: &Outcome, q: f64) -> f64 {
    o.pct_ms(q)
}

#[tokio::main]
async fn main() -> Result<()> {
    let seconds = num("--seconds", 5);
    let accounts = num("--accounts", 2000) as usize;
    let pools = num("--pools", 24) as usize;
    let connections = num("--connections", 64) as usize;
    let which = arg("--store", "both");
    let binary = match std::env::var("TOLLGATE_SIDECAR_BIN") {
        Ok(b) => PathBuf::from(b),
        Err(_) => {
            let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
            PathBuf::from(dir).join("release/tollgate-sidecar")
        }
    };
    if !binary.exists() {
        bail!(
            "no sidecar binary at {} (cargo build --release --bin tollgate-sidecar)",
            binary.display()
        );
    }
    let stores: Vec<&str> = match which.as_str() {
        "redis" => vec!["redis"],
        "embedded" => vec!["embedded"],
        _ => vec!["redis", "embedded"],
    };
    println!(
        "tollgate-apibench: {seconds} s per run, {accounts} accounts, {connections} connections, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut verdicts = Vec::new();
    for store in stores {
        verdicts.extend(run_store(store, &binary, seconds, accounts, pools, connections).await?);
    }
    println!("\nTargets (the seeds' own):");
    for v in &verdicts {
        println!("  {v}");
    }
    Ok(())
}

async fn run_store(
    store: &str,
    binary: &std::path::Path,
    seconds: u64,
    accounts: usize,
    pools: usize,
    connections: usize,
) -> Result<Vec<String>> {
    let run = tollgate_sidecar::apikey::new_id("apib");
    let dir = std::env::temp_dir().join(format!("{run}.d"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("sidecar.toml");
    std::fs::write(&config, sidecar_toml(&run))?;
    let pg_base = std::env::var("TOLLGATE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let redis_url =
        std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut env = vec![
        ("TOLLGATE_ADMIN_TOKEN".to_string(), ADMIN.to_string()),
        ("TOLLGATE_SERVICE_TOKEN".to_string(), SERVICE.to_string()),
        (
            "TOLLGATE_SQLITE_PATH".to_string(),
            dir.join("ledger.sqlite").display().to_string(),
        ),
    ];
    if store == "redis" {
        env.push(("TOLLGATE_REDIS_URL".into(), redis_url.clone()));
        env.push(("TOLLGATE_DATABASE_URL".into(), format!("{pg_base}/{run}")));
    } else {
        env.push(("TOLLGATE_REDIS_URL".into(), String::new()));
        env.push(("TOLLGATE_DATABASE_URL".into(), String::new()));
    }
    let port = free_port();
    let process = SidecarProcess::start(binary, &config, &env, port).await;
    let base = format!("http://127.0.0.1:{port}");
    println!(
        "\n== {} (sidecar pid {}) ==",
        if store == "redis" {
            "Redis + PostgreSQL, sync running"
        } else {
            "embedded store + SQLite ledger"
        },
        process.pid()
    );
    // Enough for every account in every pool: each claim is a new one (201).
    let stock = accounts as u64;
    setup(&base, accounts, pools, stock)
        .await
        .context("setting up accounts and pools")?;

    let b = Arc::new(Bench {
        port,
        connections,
        seconds,
        accounts,
    });
    let mut rows = Vec::new();
    // The trivial endpoint, at saturation and at each target rate.
    let mut trivial = Vec::new();
    for rate in [1000, 2000, 5000] {
        let row = b
            .measure("trivial", "GET", ADMIN, 200, Some(rate), fixed("/healthz"))
            .await;
        trivial.push(row);
    }
    let seq = Arc::new(AtomicU64::new(0));

    // Coupon claims: account n claims once from pool n / accounts.
    let claims = {
        let (b2, s) = (b.clone(), seq.clone());
        let claims_per_pool = accounts as u64;
        let vary: load::RequestFor = Arc::new(move |_| {
            let n = s.fetch_add(1, Ordering::Relaxed);
            let pool = (n / claims_per_pool) % 1_000_000;
            let body = json!({"account": b2.account(n)}).to_string();
            (
                format!("/admin/pools/coupon{pool}/claims"),
                Bytes::from(body),
            )
        });
        b.measure("claim", "POST", ADMIN, 201, Some(1000), vary)
            .await
    };
    let claimed = seq.swap(0, Ordering::Relaxed);
    if claimed > (accounts * pools) as u64 {
        println!(
            "  (claims: {claimed} made, more than {} distinct: the rest were repeats)",
            accounts * pools
        );
    }
    rows.push(claims);

    // Points deductions: 5 points each, a new idempotency key each.
    let consume = {
        let (b2, s) = (b.clone(), seq.clone());
        let vary: load::RequestFor = Arc::new(move |_| {
            let n = s.fetch_add(1, Ordering::Relaxed);
            let body = json!({"account": b2.account(n), "idempotency_key": format!("c{n}"),
                              "route": "points", "meters": {"points": 5}});
            ("/v1/consume".to_string(), Bytes::from(body.to_string()))
        });
        b.measure("consume", "POST", SERVICE, 200, Some(2000), vary)
            .await
    };
    rows.push(consume);

    // Billing decisions: authorize, then commit the same holds (hold id = account/key).
    let authorize_seq = Arc::new(AtomicU64::new(0));
    let authorize = {
        let (b2, s) = (b.clone(), authorize_seq.clone());
        let vary: load::RequestFor = Arc::new(move |_| {
            let n = s.fetch_add(1, Ordering::Relaxed);
            let body = json!({"account": b2.account(n), "idempotency_key": format!("d{n}"),
                              "meters": {"requests": 1}});
            ("/v1/authorize".to_string(), Bytes::from(body.to_string()))
        });
        b.measure("authorize", "POST", SERVICE, 200, Some(1000), vary)
            .await
    };
    let holds = authorize_seq.load(Ordering::Relaxed);
    rows.push(authorize);
    let commit = {
        let (b2, s) = (b.clone(), Arc::new(AtomicU64::new(0)));
        let vary: load::RequestFor = Arc::new(move |_| {
            let n = s.fetch_add(1, Ordering::Relaxed) % holds.max(1);
            let body = json!({"hold_id": format!("{}/d{n}", b2.account(n)),
                              "meters": {"requests": 1}});
            ("/v1/commit".to_string(), Bytes::from(body.to_string()))
        });
        b.measure("commit", "POST", SERVICE, 200, Some(1000), vary)
            .await
    };
    rows.push(commit);

    // Read paths.
    for (name, suffix) in [("balance", "balance"), ("usage", "usage")] {
        let (b2, s) = (b.clone(), seq.clone());
        let vary: load::RequestFor = Arc::new(move |_| {
            let n = s.fetch_add(1, Ordering::Relaxed);
            (
                format!("/v1/accounts/{}/{suffix}", b2.account(n)),
                Bytes::new(),
            )
        });
        rows.push(b.measure(name, "GET", SERVICE, 200, Some(5000), vary).await);
    }

    // The table.
    let sat0 = trivial
        .iter()
        .map(|t| t.saturation.per_second())
        .fold(0.0, f64::max);
    let trivial_p = |rate: u64| -> Option<&Outcome> {
        trivial
            .iter()
            .find_map(|t| t.paced.as_ref().filter(|(r, _)| *r == rate).map(|(_, o)| o))
    };
    println!(
        "{:<10} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
        "operation",
        "saturation/s",
        "x triv",
        "rate/s",
        "done/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p95 x triv",
        "not ok"
    );
    let t0 = &trivial[0];
    println!(
        "{:<10} {:>12.0} {:>8.2} {:>8} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>8}",
        "trivial",
        sat0,
        1.0,
        "-",
        "-",
        ms(&t0.saturation, 0.5),
        ms(&t0.saturation, 0.95),
        ms(&t0.saturation, 0.99),
        "-",
        t0.saturation.not(200)
    );
    for t in &trivial {
        if let Some((rate, o)) = &t.paced {
            println!(
                "{:<10} {:>12} {:>8} {:>8} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>8}",
                "trivial",
                "",
                "",
                rate,
                o.per_second(),
                ms(o, 0.5),
                ms(o, 0.95),
                ms(o, 0.99),
                "1.00",
                o.not(200)
            );
        }
    }
    let mut verdicts = Vec::new();
    let store_name = if store == "redis" {
        "redis+pg"
    } else {
        "embedded"
    };
    for r in &rows {
        let sat = r.saturation.per_second();
        let (rate, o) = r
            .paced
            .as_ref()
            .map(|(a, o)| (*a, o))
            .unwrap_or((0, &r.saturation));
        let tp = trivial_p(rate).map_or(0.0, |t| ms(t, 0.95));
        println!(
            "{:<10} {:>12.0} {:>8.2} {:>8} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>10.1} {:>8}",
            r.name,
            sat,
            sat / sat0.max(1.0),
            rate,
            o.per_second(),
            ms(o, 0.5),
            ms(o, 0.95),
            ms(o, 0.99),
            ms(o, 0.95) / tp.max(0.001),
            o.not(r.ok) + r.saturation.not(r.ok)
        );
        let target = match r.name {
            "claim" => Some(("coupon claims 1,000/s, p95 < 500 ms", 1000, 0.95, 500.0)),
            "consume" => Some(("points deductions 2,000/s, p95 < 200 ms", 2000, 0.95, 200.0)),
            "balance" => Some(("balance queries 5,000/s, p95 < 100 ms", 5000, 0.95, 100.0)),
            "authorize" => Some((
                "billing decision p99 < 100 ms (authorize at 1,000/s)",
                1000,
                0.99,
                100.0,
            )),
            "commit" => Some((
                "billing decision p99 < 100 ms (commit at 1,000/s)",
                1000,
                0.99,
                100.0,
            )),
            _ => None,
        };
        if let Some((what, want_rate, q, limit)) = target {
            let done = o.per_second();
            let lat = ms(o, q);
            let errors = o.not(r.ok);
            // Met: every request the schedule offered was answered (each connection's schedule
            // starts up to one interval late: at most one request a connection short), in time,
            // without errors.
            let offered = want_rate * b.seconds;
            let answered = o.requests() + b.connections as u64;
            let met = answered >= offered && lat < limit && errors == 0;
            verdicts.push(format!(
                "{store_name:<9} {what}: {} — {} of {offered} offered answered ({done:.0}/s), p{} {lat:.1} ms, {errors} not ok; saturation {sat:.0}/s ({:.2} × trivial)",
                if met { "MET" } else { "MISSED" },
                o.requests(),
                (q * 100.0) as u32,
                sat / sat0.max(1.0),
            ));
        }
    }
    drop(process);
    // Clean up: the run's database, keys and files.
    if store == "redis" {
        if let Ok(pool) = sqlx::PgPool::connect(&format!("{pg_base}/postgres")).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{run}\" WITH (FORCE)"))
                .execute(&pool)
                .await;
        }
        if let Ok(c) = redis::Client::open(redis_url.as_str()) {
            if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{run}*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                for chunk in keys.chunks(500) {
                    let _: redis::RedisResult<i64> =
                        redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(verdicts)
}
