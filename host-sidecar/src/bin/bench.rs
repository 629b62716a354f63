//! `tollgate-bench`: authorize+commit throughput and latency of the quota engine against a real
//! Redis, with the ledger sync to PostgreSQL running, and the sync lag. See BENCHMARKS.md.
//!
//! It drives the engine in-process (no HTTP) so the number is the engine's: key resolution,
//! pricing, window computation, one EVALSHA per operation, and the sync worker writing the
//! ledger in the background on the same two cores.
//!
//! Options (all optional): --seconds N (10) --concurrency N (64) --accounts N (1000)
//! --rate N (total authorize+commit pairs per second to offer; 0 = as fast as possible)
//! --authorize-only (no commits: holds are left to expire)
//! --trusted (a trusted caller's requests: a bare account and keys of its own, each looked up in
//! the ledger first; default: the filter's, an API key and a `tg-` key of the filter's making)
//! --min-gap-ms N (sync.min_gap_ms)
//! --soak [--soak-minutes N (10)]: the exact maximum, then N minutes at half of it, a row per
//! minute (pairs/s, p99s, Redis memory); `./tg bench soak` runs it with a 60 s replay window
//! --window N (server.replay_window_secs for the run, 10: the bytes after the window are
//! measured by waiting it out twice; the projection uses the default, 600)
//! --ack-after-ledger (sync.ack_after_ledger: every answer waits for its ledger write)
//! URLs: TOLLGATE_REDIS_URL (redis://127.0.0.1:6379), TOLLGATE_BENCH_DATABASE_URL
//! (postgres://postgres@127.0.0.1:5432); a fresh database and key prefix are made per run.

/// glibc's allocator spent about a third of the sidecar's CPU in malloc/free under load
/// (perf); mimalloc's thread-local heaps avoid that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_protocol::{CommitRequest, SpendRequest};
use tollgate_sidecar::clock::SystemClock;
use tollgate_sidecar::config::Config;

const CONFIG: &str = r#"
meters = ["requests", "tokens"]
[plans.bench]
limits = [
  { meter = "requests", window = "minute", max = 1000000000 },
  { meter = "tokens", window = "day", max = 1000000000000 },
]
[prices.default]
requests = 1
tokens = { credits = 2, per = 1000 }
"#;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = arg("--seconds", 10);
    let concurrency = arg("--concurrency", 64) as usize;
    let accounts = arg("--accounts", 1000) as usize;
    let rate = arg("--rate", 0);
    let authorize_only = std::env::args().any(|a| a == "--authorize-only");
    let ack_after_ledger = std::env::args().any(|a| a == "--ack-after-ledger");
    let trusted = std::env::args().any(|a| a == "--trusted");
    let soak = std::env::args().any(|a| a == "--soak");
    let window = arg("--window", 10).max(10);
    let redis_url =
        std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg = std::env::var("TOLLGATE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let run = tollgate_sidecar::apikey::new_id("bench");

    let mut cfg = Config::from_toml(CONFIG)?;
    cfg.redis.url = Some(redis_url.clone());
    cfg.redis.key_prefix = run.clone();
    cfg.postgres.url = Some(format!("{pg}/tollgate_{run}"));
    cfg.server.admin_token = Some("bench-admin-token-unused".into());
    cfg.sync.ack_after_ledger = ack_after_ledger;
    let default_window = cfg.server.replay_window_secs;
    cfg.server.replay_window_secs = window;
    cfg.sync.min_gap_ms = arg("--min-gap-ms", cfg.sync.min_gap_ms);
    let engine = tollgate_sidecar::build_engine(cfg, Arc::new(SystemClock)).await?;
    let _bg = tollgate_sidecar::spawn_background(&engine);

    eprintln!("setting up {accounts} accounts ...");
    let mut api_keys = Vec::with_capacity(accounts);
    for i in 0..accounts {
        let id = format!("a{i}");
        engine
            .create_account(serde_json::from_value(
                serde_json::json!({"id": id, "plan": "bench"}),
            )?)
            .await?;
        let (_, key) = engine
            .create_key(
                &id,
                serde_json::from_value(serde_json::json!({"name": "bench"}))?,
            )
            .await?;
        api_keys.push(key);
        engine
            .grant(
                &id,
                serde_json::from_value(
                    serde_json::json!({"grant_id": "start", "amount": 1_000_000_000u64}),
                )?,
            )
            .await?;
    }
    while engine.sync.sync_all().await? > 0 {}

    let redis_client = redis::Client::open(redis_url.as_str())?;
    let mut rc = redis_client.get_multiplexed_async_connection().await?;
    let (_, bytes_before) = keyspace_bytes(&mut rc, &run).await;

    let api_keys = Arc::new(api_keys);
    let load = Load {
        engine: engine.clone(),
        api_keys: api_keys.clone(),
        accounts,
        concurrency,
        trusted,
        authorize_only,
    };
    if soak {
        let minutes = arg("--soak-minutes", 10);
        return run_soak(&load, minutes, rate, &redis_url, &run, &pg).await;
    }

    eprintln!("running {seconds}s with {concurrency} concurrent callers ...");
    let commands_before = tollgate_sidecar::store::commands_processed(&redis_url).await;
    let cpu_before = tollgate_sidecar::store::cpu_seconds(&redis_url).await;
    let round_trips_before = engine.metrics.ledger_round_trips.get();
    let started = Instant::now();
    let (auth, commit, errors) = load.run(seconds, rate, 0).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let commands = tollgate_sidecar::store::commands_processed(&redis_url)
        .await
        .saturating_sub(commands_before);
    let redis_cpu = tollgate_sidecar::store::cpu_seconds(&redis_url).await - cpu_before;
    let round_trips = engine
        .metrics
        .ledger_round_trips
        .get()
        .saturating_sub(round_trips_before);
    // Drain: how long until the ledger has everything.
    let t_drain = Instant::now();
    while engine.sync.sync_all().await? > 0 {}
    let drain_ms = t_drain.elapsed().as_millis();
    let pairs = commit.len() as f64;
    let lag = engine.metrics.sync_lag_ms.quantiles(&[0.5, 0.99]);
    let rows: i64 = match engine.ledger.db() {
        tollgate_sidecar::ledger::Db::Pg(p) => {
            sqlx::query_scalar("SELECT count(*) FROM ledger")
                .fetch_one(p)
                .await?
        }
        tollgate_sidecar::ledger::Db::Lite(p) => {
            sqlx::query_scalar("SELECT count(*) FROM ledger")
                .fetch_one(p)
                .await?
        }
    };

    // What the run left in Redis once the ledger has everything: the accounts' state was there
    // before; the rest is per request (settled requests' tombstones, for one to two replay
    // windows). Then again once two windows have passed: what stays for good.
    let (keys_after, bytes_after) = keyspace_bytes(&mut rc, &run).await;
    let per_request = bytes_after.saturating_sub(bytes_before) as f64 / pairs.max(1.0);
    eprintln!("waiting out the replay window ({window} s) twice ...");
    tokio::time::sleep(Duration::from_secs(2 * window + 2)).await;
    let (keys_later, bytes_later) = keyspace_bytes(&mut rc, &run).await;
    let per_request_later = bytes_later.saturating_sub(bytes_before) as f64 / pairs.max(1.0);
    // Steady state at this rate with the default window: tombstones live 1.5 windows on average.
    // What stays after the window is the accounts' own state (their counters of this minute and
    // day, expiring an hour after their window): per account, not per request.
    let rate_now = pairs / elapsed;
    let steady_gb = per_request * rate_now * 1.5 * default_window as f64 / 1e9;
    let kept_mb = bytes_later.saturating_sub(bytes_before) as f64 / 1e6;

    let offered = if rate > 0 {
        format!("{rate} pairs/s offered")
    } else {
        "unpaced".into()
    };
    let mode = match (authorize_only, ack_after_ledger) {
        (true, false) => "authorize only",
        (false, false) => "authorize+commit",
        (true, true) => "authorize only, ack after ledger",
        (false, true) => "authorize+commit, ack after ledger",
    };
    let caller = if trusted {
        "trusted caller (account, own keys)"
    } else {
        "the filter (API key, tg- keys)"
    };
    println!(
        "tollgate-bench: {mode}, {caller}, {seconds}s, {concurrency} callers, {accounts} accounts, {offered}, Redis {redis_url}"
    );
    println!("| metric | value |");
    println!("|---|---|");
    println!("| authorize/s | {:.0} |", auth.len() as f64 / elapsed);
    println!("| authorize+commit pairs/s | {:.0} |", pairs / elapsed);
    println!(
        "| authorize p50 / p99 / p99.9 (µs) | {} / {} / {} |",
        pct(&auth, 0.5),
        pct(&auth, 0.99),
        pct(&auth, 0.999)
    );
    println!(
        "| commit p50 / p99 / p99.9 (µs) | {} / {} / {} |",
        pct(&commit, 0.5),
        pct(&commit, 0.99),
        pct(&commit, 0.999)
    );
    println!("| errors | {errors} |");
    let ops = (auth.len() + commit.len()) as f64;
    println!(
        "| Redis commands executed per operation (incl. inside scripts) | {:.2} |",
        commands as f64 / ops.max(1.0)
    );
    println!(
        "| Redis CPU time per authorize+commit pair (µs; the sync worker's reads included) | {:.1} |",
        redis_cpu * 1e6 / pairs.max(1.0)
    );
    println!(
        "| sync lag p50 / p99 (ms, histogram bucket bound) | ≤{} / ≤{} |",
        lag[0], lag[1]
    );
    println!(
        "| PostgreSQL round trips per request (sync worker statements / pairs) | {:.2} |",
        round_trips as f64 / pairs.max(1.0)
    );
    println!("| ledger drain after load (ms) | {drain_ms} |");
    println!("| ledger rows written | {rows} |");
    println!(
        "| Redis bytes per settled request, within the replay window (MEMORY USAGE of the run's keys, after the ledger caught up) | {per_request:.0} ({keys_after} keys, {bytes_after} bytes) |"
    );
    println!(
        "| Redis bytes per settled request, after the replay window ({window} s, waited twice) | {per_request_later:.0} ({keys_later} keys, {bytes_later} bytes) |"
    );
    println!(
        "| Redis memory for requests at this rate with the default window ({default_window} s), steady state | {steady_gb:.2} GB (+ {kept_mb:.1} MB of the accounts' counters, per account) |"
    );
    // The whole process: the engine (directory cache, connections, sync worker) and the load
    // generator's latency vectors; the sidecar alone is less.
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    println!("| peak RSS of the benchmark process ({accounts} accounts) | {peak} |");

    // Leave nothing behind: drop the run's keys and database.
    cleanup(&load, &redis_url, &run, &pg).await
}

/// Every key under `prefix` (SCAN, so a big key space does not block Redis).
async fn run_keys(c: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let Ok((next, batch)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(c)
            .await
        else {
            return keys;
        };
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return keys;
        }
    }
}

/// Keys under `prefix` and the bytes Redis says they take (`MEMORY USAGE`, sampled exactly).
async fn keyspace_bytes(c: &mut redis::aio::MultiplexedConnection, prefix: &str) -> (u64, u64) {
    let keys = run_keys(c, prefix).await;
    let mut bytes = 0u64;
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(c).await.unwrap_or_default();
        bytes += sizes.into_iter().flatten().sum::<u64>();
    }
    (keys.len() as u64, bytes)
}

/// One load: `concurrency` callers, each an authorize then (unless authorize-only) a commit, on
/// accounts in turn, for `seconds`, paced at `rate` pairs/s in all (0: unpaced).
struct Load {
    engine: Arc<tollgate_sidecar::engine::Engine>,
    api_keys: Arc<Vec<String>>,
    accounts: usize,
    concurrency: usize,
    trusted: bool,
    authorize_only: bool,
}

type Latencies = (Vec<u64>, Vec<u64>, u64);

impl Load {
    /// Authorize and commit latencies (µs) and the errors. `round` keeps the idempotency keys
    /// of successive loads apart.
    async fn run(&self, seconds: u64, rate: u64, round: u64) -> anyhow::Result<Latencies> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        let concurrency = self.concurrency;
        for t in 0..concurrency {
            let engine = self.engine.clone();
            let api_keys = self.api_keys.clone();
            let (accounts, trusted, authorize_only) =
                (self.accounts, self.trusted, self.authorize_only);
            tasks.push(tokio::spawn(async move {
                let (mut auth_us, mut commit_us, mut errors) = (Vec::new(), Vec::new(), 0u64);
                let mut i = 0u64;
                // Paced runs: each caller offers rate/concurrency pairs per second.
                // Callers start spread over one period so their requests do not arrive in bursts.
                let period = Duration::from_secs_f64(concurrency as f64 / rate.max(1) as f64);
                let mut pace = (rate > 0).then(|| {
                    let first =
                        tokio::time::Instant::now() + period.mul_f64(t as f64 / concurrency as f64);
                    tokio::time::interval_at(first, period)
                });
                while Instant::now() < deadline {
                    if let Some(p) = pace.as_mut() {
                        p.tick().await;
                    }
                    let n = ((t as u64 * 7919 + i) % accounts as u64) as usize;
                    i += 1;
                    // The filter's request (its key and one of its own unguessable decision
                    // keys), or a trusted caller's.
                    let (account, api_key, idem) = if trusted {
                        (Some(format!("a{n}")), None, format!("t{round}-{t}-{i}"))
                    } else {
                        (
                            None,
                            Some(api_keys[n].clone()),
                            format!("tg-{round}-{t}-{i}"),
                        )
                    };
                    let req = SpendRequest {
                        account,
                        api_key,
                        idempotency_key: idem,
                        route: "default".into(),
                        meters: [("requests".to_string(), 1), ("tokens".to_string(), 500)]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    };
                    let t0 = Instant::now();
                    let d = match engine.authorize(req).await {
                        Ok((d, _)) => d,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    };
                    auth_us.push(t0.elapsed().as_micros() as u64);
                    if authorize_only {
                        continue;
                    }
                    let Some(hold_id) = d.hold_id else {
                        errors += 1;
                        continue;
                    };
                    let c = CommitRequest {
                        hold_id,
                        route: Some("default".into()),
                        meters: [("requests".to_string(), 1), ("tokens".to_string(), 321)]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    };
                    let t1 = Instant::now();
                    match engine.commit(c).await {
                        Ok(_) => commit_us.push(t1.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (auth_us, commit_us, errors)
            }));
        }
        let (mut auth, mut commit, mut errors) = (Vec::new(), Vec::new(), 0);
        for t in tasks {
            let (a, c, e) = t.await?;
            auth.extend(a);
            commit.extend(c);
            errors += e;
        }
        auth.sort_unstable();
        commit.sort_unstable();
        Ok((auth, commit, errors))
    }
}

/// `--soak`: the exact maximum (10 s unpaced, unless `--rate` is given), then `minutes` minutes
/// at half of it, with each minute's throughput, p99s and Redis memory (`used_memory`, whole
/// server) and key count. Flat memory and p99 from the second replay window on is the claim.
async fn run_soak(
    load: &Load,
    minutes: u64,
    rate: u64,
    redis_url: &str,
    run: &str,
    pg: &str,
) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let rate = if rate > 0 {
        rate
    } else {
        eprintln!("measuring the exact maximum (10 s unpaced) ...");
        let (_, commit, _) = load.run(10, 0, 0).await?;
        (commit.len() as u64 / 10 / 2).max(1)
    };
    let window = load.engine.cfg.server.replay_window_secs;
    println!(
        "tollgate-bench soak: {minutes} min at {rate} pairs/s (half the exact maximum), replay window {window} s, {} callers, {} accounts",
        load.concurrency, load.accounts
    );
    println!("| minute | pairs/s | authorize p99 (µs) | commit p99 (µs) | errors | Redis used_memory (MB) | keys of the run |");
    println!("|---|---|---|---|---|---|---|");
    let (mem0, keys0) = redis_memory(&mut c, run).await;
    println!("| start | | | | | {:.1} | {keys0} |", mem0 as f64 / 1e6);
    for m in 1..=minutes {
        let (auth, commit, errors) = load.run(60, rate, m).await?;
        let (mem, keys) = redis_memory(&mut c, run).await;
        println!(
            "| {m} | {:.0} | {} | {} | {errors} | {:.1} | {keys} |",
            commit.len() as f64 / 60.0,
            pct(&auth, 0.99),
            pct(&commit, 0.99),
            mem as f64 / 1e6
        );
    }
    cleanup(load, redis_url, run, pg).await
}

/// Redis's `used_memory` and how many keys the run has.
async fn redis_memory(c: &mut redis::aio::MultiplexedConnection, run: &str) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(c)
        .await
        .unwrap_or_default();
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (used, run_keys(c, run).await.len() as u64)
}

/// Drops the run's keys and database.
async fn cleanup(load: &Load, redis_url: &str, run: &str, pg: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys = run_keys(&mut c, run).await;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
    }
    load.engine.ledger.close().await;
    let admin = sqlx::PgPool::connect(&format!("{pg}/postgres")).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS tollgate_{run} WITH (FORCE)"
    ))
    .execute(&admin)
    .await?;
    Ok(())
}
