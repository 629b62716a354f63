//! `tollgate-demo` (run it with `./tg demo`): the whole product on one machine, end to end.
//!
//! Starts the sidecar — by default on the embedded store and an SQLite ledger in a fresh temporary
//! file, so nothing else needs to run; with `TOLLGATE_REDIS_URL` and `TOLLGATE_DEMO_DATABASE_URL`
//! (a server URL without a database) on Redis and PostgreSQL, on a fresh key prefix and database —
//! a mock OpenAI-style upstream, and a real Envoy with the compiled filter; creates a plan, two
//! accounts and their keys; sends traffic through Envoy with a line per request; shows requests
//! allowed, then 429 when the daily request limit is hit, then 402 when credits run out
//! mid-stream usage; prints a table of usage, balance and ledger per account; stops everything it
//! started. Exits non-zero if any of that did not happen, so CI can run it (`--short`).

use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tollgate_sidecar::clock::SystemClock;
use tollgate_sidecar::config::Config;
use wasm_host::envoy::Envoy;

const SIDECAR: &str = r#"
meters = ["requests", "input_tokens", "output_tokens"]
[server]
listen = "127.0.0.1:0"
shards = 4
[plans.starter]
limits = [{ meter = "requests", window = "day", max = 5 }]
[plans.scale]
limits = [{ meter = "requests", window = "day", max = 1000 }]
[prices.chat]
requests = 1
input_tokens = 1
output_tokens = 2
"#;

/// The filter's configuration; `token` is the sidecar's decision token, made for this run.
fn filter_config(token: &str) -> String {
    json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 1000, "token": token},
        "deadline_ms": 1000,
        "key": "bearer",
        "commit_interval_ms": 50,
        "routes": [{
            "name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
            "charges": {"requests": {"fixed": 1}, "input_tokens": {"fixed": 0},
                        "output_tokens": {"body_field": "max_tokens", "default": 64, "cap": 1024}},
            "usage": {"source": "body"}, "model_field": "model"
        }]
    })
    .to_string()
}

#[derive(Default)]
struct Tally {
    allowed: u32,
    limited: u32,
    broke: u32,
    other: u32,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let short = std::env::args().any(|a| a == "--short");
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let redis = var("TOLLGATE_REDIS_URL");
    let pg = var("TOLLGATE_DEMO_DATABASE_URL");
    let run = tollgate_sidecar::apikey::new_id("demo");
    let sqlite = std::env::temp_dir().join(format!("tollgate_{run}.sqlite"));

    println!("== Tollgate demo ({run})");
    let mut cfg = Config::from_toml(SIDECAR)?;
    cfg.redis.url = redis.clone();
    cfg.redis.key_prefix = run.clone();
    cfg.postgres.url = pg.as_ref().map(|pg| format!("{pg}/tollgate_{run}"));
    cfg.postgres.sqlite_path = sqlite.to_string_lossy().into_owned();
    let store = match &redis {
        Some(url) => format!("Redis {url}"),
        None => "embedded store".to_string(),
    };
    let ledger = match &cfg.postgres.url {
        Some(_) => format!("PostgreSQL database tollgate_{run}"),
        None => format!("SQLite {}", sqlite.display()),
    };
    cfg.server.admin_token = Some(format!("{run}-admin-token"));
    // Only the filter may ask for decisions: a token made for this run, given to both.
    let decision_token = format!("{run}-decision-{}", tollgate_sidecar::apikey::new_id("t"));
    cfg.server.decision_token = Some(decision_token.clone());
    let engine = tollgate_sidecar::build_engine(cfg, Arc::new(SystemClock)).await?;
    let _background = tollgate_sidecar::spawn_background(&engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sidecar_port = listener.local_addr()?.port();
    tokio::spawn(tollgate_sidecar::serve(engine.clone(), listener));
    println!("   sidecar   127.0.0.1:{sidecar_port}  ({store}, ledger in {ledger})");
    let upstream = wasm_host::mock::start().await?;
    println!("   upstream  127.0.0.1:{upstream}  (mock OpenAI chat API)");
    let envoy = Envoy::start(
        upstream,
        sidecar_port,
        &wasm_host::wasm_path(),
        &filter_config(&decision_token),
    )?;
    println!(
        "   envoy     127.0.0.1:{}  (admin {}, filter {})",
        envoy.port,
        envoy.admin_port,
        wasm_host::wasm_path()
    );

    // Plans come from the configuration; accounts, keys and credit through the admin side.
    let mut keys = BTreeMap::new();
    for (id, plan, credits) in [("acme", "starter", 5_000u64), ("tiny", "scale", 200)] {
        engine
            .create_account(serde_json::from_value(
                json!({"id": id, "plan": plan, "timezone": "Europe/Berlin"}),
            )?)
            .await?;
        let (key, plain) = engine.create_key(id, Default::default()).await?;
        engine
            .grant(
                id,
                serde_json::from_value(
                    json!({"grant_id": "welcome", "amount": credits, "source": "promotion"}),
                )?,
            )
            .await?;
        println!(
            "   account {id:<5} plan {plan:<8} key {} credits {credits}",
            key.masked
        );
        keys.insert(id, plain);
    }

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", envoy.port);
    // acme: plain requests until the daily limit (5) answers 429.
    // tiny: streamed completions until its 200 credits run out (each costs 1 + 10 + 2×20 = 51).
    let plan: Vec<(&str, bool)> = if short {
        vec![("acme", false); 6]
            .into_iter()
            .chain(vec![("tiny", true); 5])
            .collect()
    } else {
        vec![("acme", false); 7]
            .into_iter()
            .chain(vec![("acme", true); 1])
            .chain(vec![("tiny", true); 6])
            .collect()
    };
    let mut tally: BTreeMap<&str, Tally> = BTreeMap::new();
    println!("\n== Traffic through Envoy");
    for (n, (acct, stream)) in plan.iter().enumerate() {
        let body = json!({"model": "gpt-demo", "max_tokens": 48, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]});
        let r = http
            .post(&url)
            .bearer_auth(&keys[acct])
            .header("x-request-id", format!("{run}-{n}"))
            .json(&body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let remaining = r
            .headers()
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(|s| format!(" retry-after {s}s"))
            .unwrap_or_default();
        let text = r.text().await.unwrap_or_default();
        let t = tally.entry(acct).or_default();
        let what = match status {
            200 => {
                t.allowed += 1;
                if *stream {
                    "streamed".to_string()
                } else {
                    "ok".to_string()
                }
            }
            429 => {
                t.limited += 1;
                format!("rate limited{retry}")
            }
            402 => {
                t.broke += 1;
                "out of credits".to_string()
            }
            _ => {
                t.other += 1;
                format!("unexpected: {text}")
            }
        };
        // Let the filter's batched commit land so the balance shown is settled.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let balance = engine.balance(acct).await?;
        println!("   [{:>2}/{}] {acct:<5} {:<6} → {status}  {what:<28} remaining {remaining:<3} balance {balance}", n + 1, plan.len(), if *stream { "stream" } else { "json" });
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    while engine.sync.sync_all().await? > 0 {}
    println!("\n== Summary");
    println!(
        "| account | allowed | 429 | 402 | requests today | balance | ledger (hold/commit/grant) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for acct in ["acme", "tiny"] {
        let t = tally.remove(acct).unwrap_or_default();
        let used = engine
            .usage(acct, None)
            .await?
            .into_iter()
            .find(|l| l.meter == "requests")
            .map_or(0, |l| l.used);
        let balance = engine.balance(acct).await?;
        let entries = engine.ledger.history(acct, 0, 1000).await?;
        let count = |k: &str| entries.iter().filter(|e| e.kind == k).count();
        println!(
            "| {acct} | {} | {} | {} | {used} | {balance} | {}/{}/{} |",
            t.allowed,
            t.limited,
            t.broke,
            count("hold"),
            count("commit"),
            count("grant")
        );
        let ok = match acct {
            "acme" => t.allowed == 5 && t.limited >= 1 && t.other == 0,
            _ => t.allowed >= 1 && t.broke >= 1 && t.other == 0,
        };
        if !ok {
            anyhow::bail!(
                "{acct}: expected allowed then {}, got allowed {} / 429 {} / 402 {} / other {}",
                if acct == "acme" { "429" } else { "402" },
                t.allowed,
                t.limited,
                t.broke,
                t.other
            );
        }
        if count("hold") != count("commit") {
            anyhow::bail!(
                "{acct}: {} holds but {} commits in the ledger",
                count("hold"),
                count("commit")
            );
        }
    }
    let stats: Vec<String> = ["allowed", "denied", "commits_batched"]
        .iter()
        .map(|s| {
            format!(
                "{s} {}",
                envoy.stat(&format!("wasmcustom.tollgate.{s}")).unwrap_or(0)
            )
        })
        .collect();
    println!("\nEnvoy stats: {}", stats.join(", "));
    println!("demo: ok");

    drop(envoy);
    engine.ledger.close().await;
    if pg.is_none() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", sqlite.display()));
        }
    }
    println!("(data: {ledger}, key prefix {run}; removed afterwards)");
    Ok(())
}
