//! The fault suite: load held while a part fails, then what was lost or charged twice (the target
//! is zero every time). Each scenario (`fault_*`) prints one `fault:` line with the load it held,
//! the faults it injected and the outcome; `./tg test` runs them last and shows those lines
//! (`./tg faults` runs only them).
//!
//! Real Redis and PostgreSQL; the network between the sidecar and them is cut with a
//! [`FaultProxy`], and sidecar processes are killed with SIGKILL.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_sidecar::config::Config;

/// A plan whose daily request counter every decision touches, far from its limit.
const BIG_PLAN: &str = r#"
[plans.big]
limits = [{ meter = "requests", window = "day", max = 100000000 }]
"#;

/// What callers were told: every allowed authorize (hold id) and every committed hold.
#[derive(Default)]
struct Acknowledged {
    holds: Mutex<HashSet<String>>,
    /// When each hold was acknowledged.
    when: Mutex<std::collections::HashMap<String, Instant>>,
    commits: Mutex<HashSet<String>>,
    failed: AtomicU64,
    decisions: AtomicU64,
}

/// One caller: authorize then commit, with unique request ids, until `stop`.
async fn caller(
    http: reqwest::Client,
    bases: Vec<String>,
    key: String,
    tag: String,
    stop: Arc<AtomicBool>,
    ack: Arc<Acknowledged>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let base = &bases[i as usize % bases.len()];
        let body = json!({"api_key": key, "idempotency_key": format!("{tag}-{i}"),
                          "route": "paid", "meters": {"requests": 1, "tokens": 5}});
        let r = http
            .post(format!("{base}/v1/authorize"))
            .bearer_auth(SERVICE)
            .json(&body)
            .send()
            .await;
        let v: Value = match r {
            Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
            _ => {
                ack.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        ack.decisions.fetch_add(1, Ordering::Relaxed);
        let Some(hold) = v["hold_id"].as_str().map(str::to_string) else {
            continue;
        };
        ack.holds.lock().unwrap().insert(hold.clone());
        ack.when
            .lock()
            .unwrap()
            .insert(hold.clone(), Instant::now());
        let commit =
            json!({"hold_id": hold, "route": "paid", "meters": {"requests": 1, "tokens": 3}});
        let base = &bases[(i as usize + 1) % bases.len()];
        if let Ok(r) = http
            .post(format!("{base}/v1/commit"))
            .bearer_auth(SERVICE)
            .json(&commit)
            .send()
            .await
        {
            if r.status() == 200 {
                ack.commits.lock().unwrap().insert(hold);
            }
        }
    }
}

/// `n` accounts `acct0`… on the big plan with a million credits; their API keys.
async fn big_accounts(env: &Env, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..n {
        let id = format!("acct{i}");
        keys.push(env.account(&id, "big", "UTC").await);
        env.grant(&id, "g", 1_000_000, json!({})).await;
    }
    keys
}

/// One [`caller`] per key, against `bases`, with request ids tagged `<tag><i>`.
fn start_callers(
    http: &reqwest::Client,
    bases: Vec<String>,
    keys: &[String],
    tag: &str,
    stop: &Arc<AtomicBool>,
    ack: &Arc<Acknowledged>,
) -> Vec<tokio::task::JoinHandle<()>> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            tokio::spawn(caller(
                http.clone(),
                bases.clone(),
                k.clone(),
                format!("{tag}{i}"),
                stop.clone(),
                ack.clone(),
            ))
        })
        .collect()
}

/// The sync worker as a running sidecar has it (a test environment starts no background tasks).
fn keep_syncing(e: Arc<tollgate_sidecar::engine::Engine>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = e.sync.sync_all().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Counters of `acct0`… that differ between Redis and the ledger (a counter not in Redis counts
/// as 0, or is skipped with `absent_ok`: an account not rebuilt yet).
async fn counters_differing(env: &Env, n: usize, absent_ok: bool) -> i64 {
    let e = env.engine();
    let mut conn = e.store.conn();
    let mut differ = 0;
    for i in 0..n {
        let acct = format!("acct{i}");
        for (scope, meter, period, used, _) in e.ledger.usage_of(&acct).await.unwrap() {
            let r: Option<i64> = redis::AsyncCommands::get(
                &mut conn,
                e.store.keys.counter(&acct, &scope, &meter, &period),
            )
            .await
            .unwrap();
            if !(absent_ok && r.is_none()) && r.unwrap_or(0) != used {
                println!("differs: {acct} {scope} {meter} {period}: ledger {used}, redis {r:?}");
                differ += 1;
            }
        }
    }
    differ
}

/// Ledger rows of these kinds beyond one per hold, over `acct0`….
async fn doubled(env: &Env, n: usize, kinds: &[&str]) -> i64 {
    let mut extra = 0;
    for i in 0..n {
        for kind in kinds {
            extra += env
                .sql_i64(
                    &format!(
                        "SELECT count(*) - count(DISTINCT hold_id) FROM ledger \
                         WHERE account_id = $1 AND kind = '{kind}'"
                    ),
                    &format!("acct{i}"),
                )
                .await;
        }
    }
    extra
}

/// Waits (at most 10 s) until the store's outbox is empty.
async fn drained(env: &Env) {
    for _ in 0..200 {
        if env
            .engine()
            .sync
            .backlog()
            .await
            .map(|n| n == 0)
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PostgreSQL unreachable for 3 s under load: every decision is still made (Redis is the
/// real-time truth), the backlog grows and is reported, and when PostgreSQL is back it drains
/// exactly once — the ledger then holds every acknowledged hold and commit, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_postgres_cut_under_load() {
    let proxy = FaultProxy::start(5432).await;
    let env = Env::with_pg(
        1,
        BIG_PLAN,
        &format!("postgres://postgres@127.0.0.1:{}", proxy.port),
    )
    .await;
    let keys = big_accounts(&env, 8).await;
    env.sync().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ack = Arc::new(Acknowledged::default());
    let tasks = start_callers(
        &env.http,
        vec![env.base(0).to_string()],
        &keys,
        "pg",
        &stop,
        &ack,
    );
    let syncing = keep_syncing(env.engine().clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before_cut = ack.decisions.load(Ordering::Relaxed);
    proxy.cut();
    let cut_at = Instant::now();
    let mut peak_backlog = 0;
    while cut_at.elapsed() < Duration::from_secs(3) {
        peak_backlog = peak_backlog.max(env.engine().sync.backlog().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during_cut = ack.decisions.load(Ordering::Relaxed) - before_cut;
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Drain: the worker reconnects by itself; wait until the backlog is gone.
    let drained = Instant::now();
    while env.engine().sync.backlog().await.unwrap() > 0 {
        assert!(
            drained.elapsed() < Duration::from_secs(30),
            "backlog never drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    syncing.abort();
    env.sync().await;

    let holds = ack.holds.lock().unwrap().clone();
    let commits = ack.commits.lock().unwrap().clone();
    let mut ledger_holds = 0;
    let mut ledger_commits = 0;
    for i in 0..8 {
        let acct = format!("acct{i}");
        ledger_holds += env
            .sql_i64(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'hold'",
                &acct,
            )
            .await;
        ledger_commits += env
            .sql_i64(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'commit'",
                &acct,
            )
            .await;
    }
    let failed = ack.failed.load(Ordering::Relaxed);
    println!(
        "fault: PostgreSQL cut for 3 s under load (8 callers) — {} decisions, {during_cut} of \
         them while it was cut, {failed} failed; backlog peak {peak_backlog} events, drained in \
         {} ms; ledger {ledger_holds} holds / {ledger_commits} commits for {} / {} acknowledged: \
         lost {}, double-charged {}",
        ack.decisions.load(Ordering::Relaxed),
        drained.elapsed().as_millis(),
        holds.len(),
        commits.len(),
        (holds.len() as i64 - ledger_holds).max(0) + (commits.len() as i64 - ledger_commits).max(0),
        (ledger_holds - holds.len() as i64).max(0) + (ledger_commits - commits.len() as i64).max(0),
    );
    assert_eq!(
        failed, 0,
        "no decision may fail while only PostgreSQL is down"
    );
    assert!(during_cut > 0, "decisions continued during the cut");
    assert!(
        peak_backlog > 0,
        "the backlog grew while the ledger was away"
    );
    assert_eq!(ledger_holds, holds.len() as i64);
    assert_eq!(ledger_commits, commits.len() as i64);
    // And the ledger agrees with Redis on what was used.
    for i in 0..8 {
        let acct = format!("acct{i}");
        let used = env
            .sql_i64(
                "SELECT CAST(sum(used) AS BIGINT) FROM usage WHERE account_id = $1 AND meter = 'requests'",
                &acct,
            )
            .await;
        let tag = format!("acct{i}/");
        let acked = holds.iter().filter(|h| h.starts_with(&tag)).count() as i64;
        assert_eq!(used, acked, "{acct}: requests used in the ledger");
    }
}

/// The real sidecar binary on a loopback port; SIGKILL on drop.
struct Process {
    child: std::process::Child,
    port: u16,
}

impl Process {
    async fn start(config: &std::path::Path, env: &[(&str, String)], port: u16) -> Process {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"));
        cmd.arg("--config")
            .arg(config)
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let p = Process {
            child: cmd.spawn().expect("sidecar binary"),
            port,
        };
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
                if r.status() == 200 {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("sidecar on {port} not ready");
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    common::cluster::spare_port()
}

/// Two sidecar processes on one Redis and one PostgreSQL; one of them is killed with SIGKILL five
/// times under load and restarted. Every acknowledged decision and commit reaches the ledger
/// exactly once, and the holds the killed one left open are expired by the other's sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sidecar_killed_five_times_under_load() {
    let prefix = unique("tgt");
    let db_url = format!("{}/{prefix}", pg_base());
    let dir = std::env::temp_dir().join(format!("{prefix}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sidecar.toml");
    let text = CONFIG.replace(
        "hold_ttl_secs = 60",
        "hold_ttl_secs = 3\nidempotency_ttl_secs = 60\nsweep_interval_ms = 200",
    );
    std::fs::write(
        &config,
        format!("{text}\n{BIG_PLAN}\n[redis]\nkey_prefix = \"{prefix}\"\n"),
    )
    .unwrap();
    let env = [
        ("TOLLGATE_REDIS_URL", redis_url()),
        ("TOLLGATE_DATABASE_URL", db_url.clone()),
        ("TOLLGATE_ADMIN_TOKEN", ADMIN.to_string()),
        ("TOLLGATE_DECISION_TOKEN", DECISION.to_string()),
        ("TOLLGATE_SERVICE_TOKEN", SERVICE.to_string()),
    ];
    let b = Process::start(&config, &env, free_port()).await;
    let a_port = free_port();
    let mut a = Process::start(&config, &env, a_port).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut keys = Vec::new();
    for i in 0..6 {
        let id = format!("acct{i}");
        let post = |path: String, body: Value| {
            http.post(format!("{}{path}", b.base()))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
        };
        post("/admin/accounts".into(), json!({"id": id, "plan": "big"}))
            .await
            .unwrap();
        let k: Value = post(format!("/admin/accounts/{id}/keys"), json!({}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        keys.push(k["api_key"].as_str().unwrap().to_string());
        post(
            format!("/admin/accounts/{id}/grants"),
            json!({"grant_id": "g", "amount": 1_000_000}),
        )
        .await
        .unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ack = Arc::new(Acknowledged::default());
    let tasks = start_callers(&http, vec![a.base(), b.base()], &keys, "kill", &stop, &ack);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        a = Process::start(&config, &env, a_port).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // Holds whose commit was lost with a killed process expire (3 s) and the sweeper of a
    // living sidecar releases them; then the ledger catches up.
    let ledger = tollgate_sidecar::ledger::Ledger::connect(&db_url, 2, &prefix)
        .await
        .unwrap();
    let open = || async {
        let mut n = 0;
        for i in 0..6 {
            n += ledger
                .scalar(
                    "SELECT count(*) FROM holds WHERE account_id = $1 AND status = 'open'",
                    &format!("acct{i}"),
                )
                .await
                .unwrap();
        }
        n
    };
    let waited = Instant::now();
    let mut still_open = open().await;
    while still_open > 0 && waited.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        still_open = open().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // the last settlements' sync

    let holds = ack.holds.lock().unwrap().clone();
    let commits = ack.commits.lock().unwrap().clone();
    let (mut missing_holds, mut missing_commits, mut doubled, mut expired) = (0, 0, 0, 0);
    for i in 0..6 {
        let acct = format!("acct{i}");
        doubled += ledger
            .scalar(
                "SELECT count(*) - count(DISTINCT hold_id) FROM ledger WHERE account_id = $1 AND kind = 'hold'",
                &acct,
            )
            .await
            .unwrap();
        doubled += ledger
            .scalar(
                "SELECT count(*) - count(DISTINCT hold_id) FROM ledger WHERE account_id = $1 AND kind IN ('commit', 'release', 'expire')",
                &acct,
            )
            .await
            .unwrap();
        expired += ledger
            .scalar(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'expire'",
                &acct,
            )
            .await
            .unwrap();
    }
    for h in &holds {
        let (acct, _) = h.split_once('/').unwrap();
        match ledger.hold(acct, h).await.unwrap() {
            None => missing_holds += 1,
            Some(row) if commits.contains(h) && row.status != "committed" => missing_commits += 1,
            Some(_) => {}
        }
    }
    println!(
        "fault: sidecar killed (SIGKILL) 5 times under load (6 callers over 2 sidecars) — {} \
         decisions acknowledged, {} calls failed against the dead one; {} holds / {} commits \
         acknowledged; lost {} holds and {} commits, double-charged {doubled}; {expired} holds \
         left open by the kills expired by the other sidecar's sweeper, {still_open} still open",
        ack.decisions.load(Ordering::Relaxed),
        ack.failed.load(Ordering::Relaxed),
        holds.len(),
        commits.len(),
        missing_holds,
        missing_commits,
    );
    assert_eq!((missing_holds, missing_commits, doubled), (0, 0, 0));
    assert_eq!(still_open, 0, "every hold resolved");
    ledger.close().await;
    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis loses everything (FLUSHALL, Redis without persistence) under load: decisions go on
/// (each account is rebuilt from the ledger's remaining amounts on its next request), and what
/// is lost is at most what the ledger had not received yet — the sync lag at that instant, which
/// is reported. Afterwards Redis and the ledger agree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_flushall_under_load() {
    flushall_scenario(false).await;
}

/// The same with `sync.ack_after_ledger`: a change is answered only once it is in the ledger,
/// so the flush loses nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_flushall_under_load_with_ack_after_ledger() {
    flushall_scenario(true).await;
}

async fn flushall_scenario(ack_after_ledger: bool) {
    let env = {
        let mut e = Env::isolated(Backend::RedisPostgres, 0).await;
        let plans = Config::from_toml(&format!("{CONFIG}\n{BIG_PLAN}"))
            .unwrap()
            .plans;
        e.cfg.plans = plans;
        e.cfg.sync.ack_after_ledger = ack_after_ledger;
        e.add_sidecar().await;
        e
    };
    let keys = big_accounts(&env, 8).await;
    env.sync().await;
    let stop = Arc::new(AtomicBool::new(false));
    let ack = Arc::new(Acknowledged::default());
    let tasks = start_callers(
        &env.http,
        vec![env.base(0).to_string()],
        &keys,
        "fl",
        &stop,
        &ack,
    );
    let syncing = keep_syncing(env.engine().clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = ack.decisions.load(Ordering::Relaxed);
    env.flushall().await;
    let flushed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    while env.engine().sync.backlog().await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    syncing.abort();
    env.sync().await;

    let holds = ack.holds.lock().unwrap().clone();
    let when = ack.when.lock().unwrap().clone();
    let mut lost = Vec::new();
    for h in &holds {
        let (acct, _) = h.split_once('/').unwrap();
        if env.engine().ledger.hold(acct, h).await.unwrap().is_none() {
            lost.push(when[h]);
        }
    }
    let oldest_lost_ms = lost
        .iter()
        .filter(|t| **t <= flushed_at)
        .map(|t| flushed_at.duration_since(*t).as_millis())
        .max()
        .unwrap_or(0);
    // After recovery every counter in Redis equals the ledger's.
    let differ = counters_differing(&env, 8, false).await;
    let failed = ack.failed.load(Ordering::Relaxed);
    println!(
        "fault: Redis FLUSHALL under load (8 callers{}) — {} decisions ({} after the flush), {failed} \
         failed; lost {} acknowledged holds, all from the last {oldest_lost_ms} ms before the flush \
         (the sync lag then); after recovery {differ} counters differ between Redis and the ledger",
        if ack_after_ledger { ", sync.ack_after_ledger" } else { "" },
        ack.decisions.load(Ordering::Relaxed),
        ack.decisions.load(Ordering::Relaxed) - before,
        lost.len(),
    );
    if ack_after_ledger {
        // Requests in flight at the flush are not confirmed (503): their change went with Redis.
        assert!(
            failed <= 16,
            "only requests in flight at the flush fail: {failed}"
        );
    } else {
        assert_eq!(failed, 0, "decisions go on through the flush");
    }
    assert!(
        ack.decisions.load(Ordering::Relaxed) > before,
        "decided after the flush"
    );
    assert!(
        // (An answer already on its way when the flush returned arrives a little later.)
        lost.iter()
            .all(|t| *t <= flushed_at + Duration::from_millis(100))
            && oldest_lost_ms <= 1000,
        "only what was within the sync lag at the flush may be lost"
    );
    assert_eq!(differ, 0, "Redis and the ledger agree after recovery");
    if ack_after_ledger {
        assert!(
            lost.is_empty(),
            "nothing acknowledged is lost when answers wait for the ledger"
        );
    }
}

/// Redis stopped for ~4.5 s under load, then back empty (no persistence). After the first
/// failed round trips the circuit breaker opens and every decision is made from PostgreSQL
/// instead (under the account's row lock, by the same Lua script on a private key space), so
/// decisions go on; /readyz says `redis_down`. When Redis is back the accounts changed meanwhile
/// are rebuilt from the ledger. What is lost is only what Redis had not synced when it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_stopped_under_load() {
    let mut env = {
        let mut e = Env::isolated(Backend::RedisPostgres, 0).await;
        e.cfg.plans = Config::from_toml(&format!("{CONFIG}\n{BIG_PLAN}"))
            .unwrap()
            .plans;
        e.add_sidecar().await;
        e
    };
    let keys = big_accounts(&env, 6).await;
    env.sync().await;
    let stop = Arc::new(AtomicBool::new(false));
    let ack = Arc::new(Acknowledged::default());
    let tasks = start_callers(
        &env.http,
        vec![env.base(0).to_string()],
        &keys,
        "rd",
        &stop,
        &ack,
    );
    let syncing = keep_syncing(env.engine().clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let redis = env.private_redis.as_mut().unwrap();
    redis.stop();
    let stopped = Instant::now();
    let failed_before = ack.failed.load(Ordering::Relaxed);
    let decisions_at_stop = ack.decisions.load(Ordering::Relaxed);
    // While it is down: a decision fails fast, and readiness says why.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probe = Instant::now();
    let (status, _) = env
        .post(
            "/v1/authorize",
            &json!({"api_key": keys[0], "idempotency_key": "probe", "route": "paid",
                    "meters": {"requests": 1}}),
        )
        .await;
    let probe_ms = probe.elapsed().as_millis();
    let ready: Value = reqwest::get(format!("{}/readyz", env.base(0)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed_down = ack.failed.load(Ordering::Relaxed) - failed_before;
    let decisions_at_restart = ack.decisions.load(Ordering::Relaxed);
    let decided_down = decisions_at_restart - decisions_at_stop;
    env.private_redis.as_mut().unwrap().restart().await;
    let down_ms = stopped.elapsed().as_millis();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let after = ack.decisions.load(Ordering::Relaxed) - decisions_at_restart;
    drained(&env).await;
    syncing.abort();
    env.sync().await;

    let holds = ack.holds.lock().unwrap().clone();
    let when = ack.when.lock().unwrap().clone();
    let mut lost = 0;
    let mut oldest_ms = 0;
    for h in &holds {
        let (acct, _) = h.split_once('/').unwrap();
        if env.engine().ledger.hold(acct, h).await.unwrap().is_none() {
            lost += 1;
            oldest_ms = oldest_ms.max(stopped.saturating_duration_since(when[h]).as_millis());
        }
    }
    let differ = counters_differing(&env, 6, false).await;
    let doubled = doubled(&env, 6, &["hold"]).await;
    println!(
        "fault: Redis stopped for {down_ms} ms under load (6 callers) — {decided_down} decisions \
         made from PostgreSQL while it was down ({failed_down} calls failed while the breaker \
         tripped; a decision then took {probe_ms} ms, status {status}, readyz mode {}), {after} \
         decisions after it came back empty; lost {lost} acknowledged holds, all from the last \
         {oldest_ms} ms before it stopped (the sync lag), double-charged {doubled}; afterwards \
         {differ} counters differ between Redis and the ledger",
        ready["mode"]
    );
    assert_eq!(status, 200, "decided from PostgreSQL while Redis is down");
    assert!(decided_down > 0, "decisions go on while Redis is down");
    assert_eq!(ready["mode"], "redis_down");
    assert_eq!(doubled, 0, "nothing charged twice");
    assert!(after > 0, "decisions resume when Redis is back");
    assert!(oldest_ms <= 1000, "only the sync-lag tail may be lost");
    assert_eq!(differ, 0, "Redis and the ledger agree afterwards");
}

/// No sidecar yet, on a private Redis reached through a [`FaultProxy`] that can cut the network.
async fn behind_a_fault_proxy(extra: &str) -> (Env, FaultProxy) {
    let redis = PrivateRedis::start().await;
    let redis_port: u16 = redis.url.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(redis_port).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let env = Env::build(Backend::RedisPostgres, 0, extra, &url, Some(redis)).await;
    (env, proxy)
}

/// Creates these accounts on plan `basic` (no keys).
async fn basic_accounts(env: &Env, ids: &[String]) {
    for id in ids {
        let (s, v) = env
            .admin_post("/admin/accounts", &json!({"id": id, "plan": "basic"}))
            .await;
        assert_eq!(s, 201, "{v}");
    }
}

/// The network to Redis cut for 3 s under load; Redis itself keeps everything, including the
/// outbox entries not yet in the ledger. Decisions go on from PostgreSQL; when the network is
/// back, that backlog drains, the state changed meanwhile is rebuilt from the ledger, and nothing
/// acknowledged is lost or charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_network_cut_under_load() {
    let (mut env, proxy) = behind_a_fault_proxy(BIG_PLAN).await;
    env.add_sidecar().await;
    let keys = big_accounts(&env, 6).await;
    env.sync().await;
    let stop = Arc::new(AtomicBool::new(false));
    let ack = Arc::new(Acknowledged::default());
    let tasks = start_callers(
        &env.http,
        vec![env.base(0).to_string()],
        &keys,
        "nc",
        &stop,
        &ack,
    );
    let e = env.engine().clone();
    let background = tokio::spawn(async move {
        loop {
            let _ = e.sync.sync_all().await;
            e.handback_pending
                .store(true, std::sync::atomic::Ordering::Release);
            let _ = e.hand_back().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let at_cut = ack.decisions.load(Ordering::Relaxed);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let during = ack.decisions.load(Ordering::Relaxed) - at_cut;
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    drained(&env).await;
    background.abort();
    env.sync().await;

    let holds = ack.holds.lock().unwrap().clone();
    let commits = ack.commits.lock().unwrap().clone();
    let (mut lost, mut uncommitted) = (0, 0);
    for h in &holds {
        let (acct, _) = h.split_once('/').unwrap();
        match env.engine().ledger.hold(acct, h).await.unwrap() {
            None => lost += 1,
            Some(row) if commits.contains(h) && row.status != "committed" => uncommitted += 1,
            Some(_) => {}
        }
    }
    let doubled = doubled(&env, 6, &["hold", "commit"]).await;
    // An account changed during the cut is rebuilt by its next decision in Redis: until then
    // its counters are absent there, not different.
    let differ = counters_differing(&env, 6, true).await;
    let failed = ack.failed.load(Ordering::Relaxed);
    println!(
        "fault: Redis network cut for 3 s under load (6 callers), Redis keeping its data — \
         {during} decisions made from PostgreSQL during the cut, {failed} calls failed while the \
         breaker tripped; {} holds / {} commits acknowledged: lost {lost}, commits missing \
         {uncommitted}, double-charged {doubled}; afterwards {differ} counters differ between \
         Redis and the ledger",
        holds.len(),
        commits.len()
    );
    assert!(during > 0, "decisions go on while Redis is unreachable");
    assert_eq!((lost, uncommitted), (0, 0), "nothing acknowledged is lost");
    assert_eq!(doubled, 0, "nothing charged twice");
    assert_eq!(differ, 0, "Redis and the ledger agree afterwards");
    drop(proxy);
}

/// Pool claims while the network to Redis is cut: claims go on from PostgreSQL under the pool's
/// row lock, on two sidecars at once, and the stock stays exact — 25 of 60 claimants get one,
/// each once — before, during and after the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_pool_claims_while_redis_is_cut() {
    let (mut env, proxy) = behind_a_fault_proxy("").await;
    env.add_sidecar().await;
    env.add_sidecar().await;
    let ids: Vec<String> = (0..60).map(|i| format!("c{i:02}")).collect();
    basic_accounts(&env, &ids).await;
    let (s, v) = env
        .admin_post("/admin/pools", &json!({"id": "trial", "stock": 25}))
        .await;
    assert_eq!(s, 201, "{v}");
    // Claims until each claimant has an answer (503 while the breaker trips is retried).
    let claim_all = |ids: Vec<String>| {
        let env = &env;
        async move {
            let calls = ids.into_iter().enumerate().map(|(i, id)| async move {
                for _ in 0..200 {
                    let (s, v, _) = env
                        .post_to_admin(i, "/admin/pools/trial/claims", &json!({"account": id}))
                        .await;
                    if s == 200 || s == 201 {
                        return (id, v["claimed"] == true);
                    }
                    assert_eq!(s, 503, "{v}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("{id}: no answer");
            });
            futures::future::join_all(calls).await
        }
    };
    let before = claim_all(ids[..10].to_vec()).await;
    assert!(
        before.iter().all(|(_, c)| *c),
        "10 of 25 claimed before the cut"
    );
    // Those are in the ledger when the network goes (what Redis had not synced yet is the
    // PostgreSQL mode's known blind spot, measured by the Redis-stopped scenario).
    env.sync().await;
    proxy.cut();
    let during = claim_all(ids.clone()).await;
    let won: Vec<&String> = during
        .iter()
        .filter(|(_, c)| *c)
        .map(|(id, _)| id)
        .collect();
    let from_pg = !env.engine().store.breaker.closed();
    // The pool's state is read from the ledger meanwhile.
    let (s, cut_state) = env.admin_get("/admin/pools/trial").await;
    assert_eq!(
        (s, cut_state["claimed"].clone()),
        (200, json!(25)),
        "{cut_state}"
    );
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = claim_all(ids.clone()).await;
    let won_after: Vec<&String> = after.iter().filter(|(_, c)| *c).map(|(id, _)| id).collect();
    env.sync().await;
    let in_ledger = env
        .sql_i64(
            "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'consume'",
            "pool:trial",
        )
        .await;
    let (_, state) = env.admin_get("/admin/pools/trial").await;
    println!(
        "fault: pool claims with the network to Redis cut (2 sidecars, 60 claimants, stock 25) — \
         {} claimed during the cut (decided from PostgreSQL: {from_pg}), {} after; ledger has \
         {in_ledger} claims; pool says claimed {}",
        won.len(),
        won_after.len(),
        state["claimed"]
    );
    assert_eq!(won.len(), 25, "exactly the stock, the first 10 as replays");
    assert_eq!(won_after, won, "the same 25 afterwards, each a replay");
    assert_eq!(in_ledger, 25, "each claim recorded once");
    assert_eq!(state["claimed"], 25, "{state}");
    assert_eq!(state["remaining"], 0, "{state}");
    drop(proxy);
}

/// Limits reached across a Redis network cut, with `sync.ack_after_ledger` (without it the
/// decisions from PostgreSQL cannot see what Redis had not synced at the cut: the sync lag's worth
/// of admissions, the mode's known blind spot). Six accounts of 100 requests a day are consumed
/// at a steady pace; the network to Redis is cut for 3 s in the middle and restored. Each
/// account ends at 100 — admitted partly in Redis, partly from PostgreSQL, partly in Redis again
/// after the hand-back — with Redis and the ledger agreeing. The one exception allowed: a call
/// in flight when the network went, applied in Redis but never confirmed (503), whose retry is
/// decided from PostgreSQL without seeing it — at most one per caller, reported. One sidecar:
/// with two, each leaves PostgreSQL mode at its own probe, up to a second apart (a known limit,
/// see DESIGN-NOTES).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_limits_reached_across_a_redis_network_cut() {
    let (mut env, proxy) = behind_a_fault_proxy("").await;
    env.cfg.sync.ack_after_ledger = true;
    env.cfg.sync.ack_timeout_ms = 300;
    env.add_sidecar().await;
    let ids: Vec<String> = (0..6).map(|i| format!("lim{i}")).collect();
    basic_accounts(&env, &ids).await;
    let admitted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Each caller consumes until refused twice; a failed call is retried with the same
    // idempotency key, so what it did (if anything) is counted once.
    let callers: Vec<_> = ids
        .iter()
        .map(|id| {
            let (http, base) = (env.http.clone(), env.base(0).to_string());
            let (id, admitted, failed) = (id.clone(), admitted.clone(), failed.clone());
            tokio::spawn(async move {
                let (mut mine, mut refused, mut i) = (0u64, 0, 0u64);
                let deadline = Instant::now() + Duration::from_secs(30);
                while refused < 2 && Instant::now() < deadline {
                    let body = json!({"account": id, "idempotency_key": format!("k{i}"),
                                      "meters": {"requests": 1}});
                    let r = http
                        .post(format!("{base}/v1/consume"))
                        .bearer_auth(SERVICE)
                        .json(&body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            if v["allowed"] == true {
                                mine += 1;
                                admitted.fetch_add(1, Ordering::Relaxed);
                            } else {
                                refused += 1;
                            }
                            i += 1;
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                (id, mine)
            })
        })
        .collect();
    while admitted.load(Ordering::Relaxed) < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_cut = admitted.load(Ordering::Relaxed);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let during = admitted.load(Ordering::Relaxed) - at_cut;
    proxy.restore();
    let mut per_account = Vec::new();
    for c in callers {
        per_account.push(c.await.unwrap());
    }
    let after = admitted.load(Ordering::Relaxed) - at_cut - during;
    let sidecar = env.engine().clone();
    sidecar.hand_back().await.unwrap();
    env.sync().await;
    let (mut wrong, mut told_otherwise, mut over) = (Vec::new(), 0, 0);
    for (id, mine) in &per_account {
        let in_ledger = env
            .sql_i64(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'consume'",
                id,
            )
            .await;
        let keys = env
            .sql_i64(
                "SELECT count(DISTINCT idem_key) FROM ledger WHERE account_id = $1 AND kind = 'consume'",
                id,
            )
            .await;
        let (_, usage) = env.admin_get(&format!("/v1/accounts/{id}/usage")).await;
        let used = usage["limits"][0]["used"].as_i64().unwrap_or(-1);
        // 100 charges; a key charged twice only for the retry of a call left unconfirmed at
        // the cut (at most one per caller), which may also take the account one past its limit.
        let twice = in_ledger - keys;
        if twice > 1 || !(100..=100 + twice).contains(&in_ledger) || used != in_ledger {
            wrong.push(format!(
                "{id}: told {mine}, ledger {in_ledger} ({keys} keys), used {used}"
            ));
        }
        over += twice;
        told_otherwise += mine.abs_diff(100);
    }
    println!(
        "fault: limits reached across a Redis network cut of 3 s (6 accounts of 100, 1 sidecar, \
         sync.ack_after_ledger) — {at_cut} admitted before the cut, {during} during it (from \
         PostgreSQL), {after} after; {} calls failed and were retried; accounts off their limit \
         or with Redis != ledger: {}; keys charged twice (the retry of a call left unconfirmed at \
         the cut, decided from PostgreSQL): {over}; answers that differ from what was charged: \
         {told_otherwise}",
        failed.load(Ordering::Relaxed),
        wrong.len()
    );
    assert!(during > 0, "decisions went on during the cut");
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(
        over <= 6 && told_otherwise <= 6,
        "at most one call in flight per caller"
    );
    drop(proxy);
}
