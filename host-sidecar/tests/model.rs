//! The randomized model test: a seeded generator of operations (authorize, commit, release,
//! consume, grant, replays, hold expiry, day rollover) run against the real engine on Redis and
//! PostgreSQL, with faults injected between operations (a sidecar restart, Redis FLUSHALL after
//! the ledger caught up, PostgreSQL cut off for a stretch of operations). Every answer is checked
//! against a simple reference model of what the answer must be; after each seed the balance and
//! every counter in the ledger are compared with the model, and conservation is checked.
//!
//! It prints how many operations and faults it ran and how many violations it found (0 is the
//! only passing number). `TOLLGATE_MODEL_SEEDS` and `TOLLGATE_MODEL_OPS` change its size.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use tollgate_protocol::{CommitRequest, GrantRequest, SpendRequest};

const PLAN: &str = r#"
[plans.model]
limits = [
  { meter = "requests", window = "day", max = 50 },
  { meter = "tokens", window = "day", max = 2000 },
]
"#;
const MAX_REQUESTS: i64 = 50;
const MAX_TOKENS: i64 = 2000;
const DAY_MS: u64 = 86_400_000;

/// Price of route `paid` in the test configuration: 10 per request, 1 per token.
fn price(requests: i64, tokens: i64) -> i64 {
    10 * requests + tokens
}

#[derive(Clone)]
struct OpenHold {
    tokens: i64,
    credit: i64,
    day: u64,
}

#[derive(Default)]
struct Account {
    balance: i64,
    granted: i64,
    /// (meter, day) -> used (held + committed)
    used: HashMap<(&'static str, u64), i64>,
    holds: HashMap<String, OpenHold>,
    /// Allowed authorizes of this round, to replay: idempotency key -> (tokens, hold id)
    allowed: Vec<(String, i64, String)>,
}

impl Account {
    /// Every limit admits the amounts (and a limit already at its maximum admits nothing, not
    /// even a zero amount: the meter is exhausted), and the balance covers the credit.
    fn fits(&self, day: u64, requests: i64, tokens: i64, credit: i64) -> bool {
        let admits = |meter, amount: i64, max: i64| {
            let used = self.used.get(&(meter, day)).copied().unwrap_or(0);
            used + amount <= max && used < max
        };
        admits("requests", requests, MAX_REQUESTS)
            && admits("tokens", tokens, MAX_TOKENS)
            && self.balance >= credit
    }
    fn add(&mut self, day: u64, requests: i64, tokens: i64) {
        *self.used.entry(("requests", day)).or_default() += requests;
        *self.used.entry(("tokens", day)).or_default() += tokens;
    }
}

struct Run {
    ops: u64,
    allowed: u64,
    denied: u64,
    faults: u64,
    refused_during_cut: u64,
    violations: Vec<String>,
}

impl Run {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            if self.violations.len() < 20 {
                eprintln!("violation: {w}");
            }
            self.violations.push(w);
        }
    }
}

fn spend(acct: &str, idem: &str, tokens: i64) -> SpendRequest {
    serde_json::from_value(serde_json::json!({
        "account": acct, "idempotency_key": idem, "route": "paid",
        "meters": {"requests": 1, "tokens": tokens}
    }))
    .unwrap()
}

/// An engine call's result: the value, or — when PostgreSQL is cut off and the call needs it
/// (a grant, or a cold load after a flush) — a refusal that must have changed nothing; any other
/// error is a violation.
macro_rules! ok_or_skip {
    ($run:expr, $cut:expr, $what:expr, $call:expr) => {
        match $call {
            Ok(v) => v,
            Err(e) => {
                if $cut {
                    $run.refused_during_cut += 1;
                } else {
                    $run.check(false, || format!("{}: {e}", $what));
                }
                continue;
            }
        }
    };
}

/// Drains the outbox into the ledger, retrying while connections broken by a cut are replaced.
async fn sync(env: &Env) {
    let e = env.engine();
    for _ in 0..100 {
        match e.sync.sync_all().await {
            Ok(0) => return,
            Ok(_) => continue,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    panic!("the ledger did not catch up");
}

async fn one_seed(seed: u64, ops: u64, run: &mut Run) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let proxy = FaultProxy::start(5432).await;
    let redis = PrivateRedis::start().await;
    let url = redis.url.clone();
    let mut env = Env::build(Backend::RedisPostgres, 0, PLAN, &url, Some(redis)).await;
    env.cfg.postgres.url = Some(format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        proxy.port, env.db
    ));
    env.add_sidecar().await;
    let names: Vec<String> = (0..4).map(|i| format!("m{i}")).collect();
    let mut model: HashMap<String, Account> = HashMap::new();
    for n in &names {
        env.account(n, "model", "UTC").await;
        env.grant(n, "start", 500, serde_json::json!({})).await;
        model.insert(
            n.clone(),
            Account {
                balance: 500,
                granted: 500,
                ..Default::default()
            },
        );
    }
    let mut next = 0u64;
    let mut pg_cut_left = 0u32;
    let mut round_left = 0u32;
    for _ in 0..ops {
        run.ops += 1;
        // Rounds: time stands still within one; between rounds it jumps past every open hold's
        // expiry (60 s) and sometimes past midnight, and the sweeper runs.
        if round_left == 0 {
            round_left = rng.random_range(5..40);
            env.clock
                .advance_ms(61_000 + rng.random_range(0..7_200_000));
            if pg_cut_left == 0 {
                env.engine().sweep_once().await.unwrap();
            } else {
                // The sweeper may need the ledger (a cold account); leave the holds for later.
                let _ = env.engine().sweep_once().await;
            }
            for a in model.values_mut() {
                for (_, h) in a.holds.drain() {
                    *a.used.entry(("requests", h.day)).or_default() -= 1;
                    *a.used.entry(("tokens", h.day)).or_default() -= h.tokens;
                    a.balance += h.credit;
                }
                a.allowed.clear();
            }
            // Faults, now and then, between operations.
            match rng.random_range(0..30) {
                0 if pg_cut_left == 0 => {
                    run.faults += 1; // a sidecar restart: a fresh engine on the same Redis and ledger
                    sync(&env).await;
                    env.sidecars.clear();
                    env.add_sidecar().await;
                }
                1 if pg_cut_left == 0 => {
                    run.faults += 1; // Redis loses everything, once the ledger has caught up
                    sync(&env).await;
                    env.flushall().await;
                }
                2 if pg_cut_left == 0 => {
                    run.faults += 1; // PostgreSQL unreachable for the next operations
                    proxy.cut();
                    pg_cut_left = rng.random_range(10..60);
                }
                _ => {}
            }
        }
        round_left -= 1;
        if pg_cut_left > 0 {
            pg_cut_left -= 1;
            if pg_cut_left == 0 {
                proxy.restore();
            }
        }
        let day = tollgate_sidecar::clock::Clock::now_ms(&env.clock) / DAY_MS;
        let name = names[rng.random_range(0..names.len())].clone();
        let e = env.engine().clone();
        let a = model.get_mut(&name).unwrap();
        match rng.random_range(0..100) {
            // authorize
            0..=39 => {
                next += 1;
                let idem = format!("s{seed}-{next}");
                let tokens = rng.random_range(0..120);
                let credit = price(1, tokens);
                let want = a.fits(day, 1, tokens, credit);
                let cut = pg_cut_left > 0;
                let (d, _) = ok_or_skip!(
                    run,
                    cut,
                    "authorize",
                    e.authorize(spend(&name, &idem, tokens)).await
                );
                let op = run.ops;
                run.check(d.allowed == want, || {
                    format!(
                        "seed {seed} op {}: authorize {name} {tokens} tokens: allowed {} want \
                         {want} ({:?} {:?} balance {:?}; model: requests {:?} tokens {:?} \
                         balance {}; pg cut {cut})",
                        op,
                        d.allowed,
                        d.reason,
                        d.limit,
                        d.balance,
                        a.used.get(&("requests", day)),
                        a.used.get(&("tokens", day)),
                        a.balance
                    )
                });
                if d.allowed {
                    run.allowed += 1;
                } else {
                    run.denied += 1;
                }
                if d.allowed && want {
                    a.add(day, 1, tokens);
                    a.balance -= credit;
                    let hold = d.hold_id.clone().unwrap_or_default();
                    a.holds.insert(
                        hold.clone(),
                        OpenHold {
                            tokens,
                            credit,
                            day,
                        },
                    );
                    a.allowed.push((idem, tokens, hold));
                }
            }
            // commit an open hold of this round with its actual usage
            40..=64 => {
                let Some(hold) = a.holds.keys().next().cloned() else {
                    continue;
                };
                let actual = rng.random_range(0..160);
                let cut = pg_cut_left > 0;
                let (s, _) = ok_or_skip!(
                    run,
                    cut,
                    "commit",
                    e.commit(CommitRequest {
                        hold_id: hold.clone(),
                        route: Some("paid".into()),
                        meters: [
                            ("requests".to_string(), 1),
                            ("tokens".to_string(), actual as u64)
                        ]
                        .into_iter()
                        .collect(),
                        ..Default::default()
                    })
                    .await
                );
                let h = a.holds.remove(&hold).unwrap();
                let cost = price(1, actual);
                let (charged, short) = if cost <= h.credit {
                    a.balance += h.credit - cost;
                    (cost, 0)
                } else {
                    let drawn = (cost - h.credit).min(a.balance);
                    a.balance -= drawn;
                    (h.credit + drawn, cost - h.credit - drawn)
                };
                *a.used.entry(("tokens", h.day)).or_default() += actual - h.tokens;
                run.check(
                    s.credits as i64 == charged && s.shortfall as i64 == short,
                    || format!("seed {seed}: commit {hold}: charged {} short {} want {charged} {short}", s.credits, s.shortfall),
                );
            }
            // release
            65..=72 => {
                let Some(hold) = a.holds.keys().next().cloned() else {
                    continue;
                };
                let cut = pg_cut_left > 0;
                let (s, _) = ok_or_skip!(run, cut, "release", e.release(&hold).await);
                let h = a.holds.remove(&hold).unwrap();
                *a.used.entry(("requests", h.day)).or_default() -= 1;
                *a.used.entry(("tokens", h.day)).or_default() -= h.tokens;
                a.balance += h.credit;
                run.check(s.status == "released", || {
                    format!("seed {seed}: release {hold}: {}", s.status)
                });
            }
            // consume
            73..=85 => {
                next += 1;
                let tokens = rng.random_range(0..80);
                let credit = price(1, tokens);
                let want = a.fits(day, 1, tokens, credit);
                let cut = pg_cut_left > 0;
                let (d, _) = ok_or_skip!(
                    run,
                    cut,
                    "consume",
                    e.consume(spend(&name, &format!("c{seed}-{next}"), tokens))
                        .await
                );
                run.check(d.allowed == want, || {
                    format!(
                        "seed {seed}: consume {name} {tokens}: allowed {} want {want}",
                        d.allowed
                    )
                });
                if d.allowed && want {
                    a.add(day, 1, tokens);
                    a.balance -= credit;
                }
            }
            // grant
            86..=90 => {
                next += 1;
                // m0 lives on small grants (credit binds), the others on large ones (limits bind).
                let amount = if name == "m0" {
                    rng.random_range(1..100)
                } else {
                    rng.random_range(1..3000)
                };
                let g: GrantRequest = serde_json::from_value(
                    serde_json::json!({"grant_id": format!("g{next}"), "amount": amount}),
                )
                .unwrap();
                let cut = pg_cut_left > 0;
                ok_or_skip!(run, cut, "grant", e.grant(&name, g).await);
                a.balance += amount;
                a.granted += amount;
            }
            // replay an allowed authorize of this round: same answer, nothing charged
            _ => {
                let Some((idem, tokens, hold)) = a.allowed.last().cloned() else {
                    continue;
                };
                let cut = pg_cut_left > 0;
                let (d, replay) = ok_or_skip!(
                    run,
                    cut,
                    "replay",
                    e.authorize(spend(&name, &idem, tokens)).await
                );
                run.check(
                    replay && d.hold_id.as_deref() == Some(hold.as_str()),
                    || {
                        format!(
                            "seed {seed}: replay of {idem}: replay {replay}, hold {:?}",
                            d.hold_id
                        )
                    },
                );
            }
        }
    }
    proxy.restore();
    // Quiesce, then compare everything with the model.
    sync(&env).await;
    let e = env.engine().clone();
    for n in &names {
        let a = &model[n];
        let balance = e.balance(n).await.unwrap() as i64;
        run.check(balance == a.balance, || {
            format!("seed {seed}: {n} balance {balance} want {}", a.balance)
        });
        let mut ledger: HashMap<(String, u64), i64> = HashMap::new();
        for (_, meter, period, used, _) in e.ledger.usage_of(n).await.unwrap() {
            let day =
                chrono::NaiveDate::parse_from_str(period.trim_start_matches("d:"), "%Y-%m-%d")
                    .map(|d| {
                        d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis() as u64 / DAY_MS
                    })
                    .unwrap_or(u64::MAX);
            ledger.insert((meter, day), used);
        }
        for ((meter, day), want) in &a.used {
            let got = ledger.get(&(meter.to_string(), *day)).copied().unwrap_or(0);
            run.check(got == *want, || {
                format!("seed {seed}: {n} {meter} day {day}: ledger {got} want {want}")
            });
        }
        let remaining = env
            .sql_i64(
                "SELECT CAST(sum(remaining) AS BIGINT) FROM grants WHERE account_id = $1",
                n,
            )
            .await;
        let granted = env
            .sql_i64(
                "SELECT CAST(sum(amount) AS BIGINT) FROM grants WHERE account_id = $1",
                n,
            )
            .await;
        run.check(granted == a.granted && remaining == a.balance, || {
            format!(
                "seed {seed}: {n} ledger granted {granted} remaining {remaining}, want {} {}",
                a.granted, a.balance
            )
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_randomized_operations_match_the_model() {
    let seeds: u64 = std::env::var("TOLLGATE_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let ops: u64 = std::env::var("TOLLGATE_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut run = Run {
        ops: 0,
        allowed: 0,
        denied: 0,
        faults: 0,
        refused_during_cut: 0,
        violations: Vec::new(),
    };
    let started = std::time::Instant::now();
    let first: u64 = std::env::var("TOLLGATE_MODEL_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for seed in first..first + seeds {
        one_seed(seed, ops, &mut run).await;
    }
    println!(
        "fault: randomized model test — {} operations over {seeds} seeds ({} authorizes allowed, \
         {} denied), {} faults injected \
         (sidecar restarts, FLUSHALL, PostgreSQL cut; {} calls refused while PostgreSQL was cut, \
         each changing nothing), {} invariant violations ({} s)",
        run.ops,
        run.allowed,
        run.denied,
        run.faults,
        run.refused_during_cut,
        run.violations.len(),
        started.elapsed().as_secs()
    );
    assert!(
        run.violations.is_empty(),
        "{:?}",
        &run.violations[..run.violations.len().min(5)]
    );
}
