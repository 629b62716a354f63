//! `tollgate-sidebyside` (run it with `./tg bench`): every setup of BENCHMARKS.md started in one
//! run on this machine, driven with the same load, and printed side by side. On a 2-core machine
//! everything (Envoy, the sidecar, Redis, PostgreSQL, the upstream and the load generator) shares
//! the cores, so the ratios measured in one run are the numbers that mean something.
//!
//! Setups, each behind Envoy 1.40 (V8, `--concurrency 1`, the same `envoy/envoy.tmpl.yaml`):
//! 1. passthrough (no filter);
//! 2. the no-op callout filter (`filter/examples/noop_callout.rs`: one callout per request to a
//!    trivial HTTP/2 server) — the ceiling for any design with a callout per request;
//! 3. Tollgate, full enforcement: filter + sidecar process + Redis + PostgreSQL sync, one key per
//!    connection, then every connection on one key (hot key), then with a callout per request
//!    (authorize batching off);
//! 4. Tollgate on the embedded store and SQLite ledger;
//! 5. Tollgate with leases, on the body-reading route and on one that reads no body.
//!
//! Options: --seconds N (10) --connections N (32) --authorize-inflight N (1)
//! --commit-interval-ms N (20) --filter PATH --noop PATH --sidecar PATH
//! (the release binaries `./tg bench` builds). Redis and PostgreSQL: TOLLGATE_REDIS_URL
//! (redis://127.0.0.1:6379), TOLLGATE_BENCH_DATABASE_URL (postgres://postgres@127.0.0.1:5432);
//! a fresh key prefix and database per run, removed afterwards.

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasm_host::envoy::{free_port, peak_rss_kib, Envoy};
use wasm_host::load::{self, Load, Outcome};
use wasm_host::sidecar::SidecarProcess;

const ADMIN: &str = "bench-admin-token-0123456789";
const DECISION: &str = "bench-decision-token-0123456789";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn num_arg(name: &str, default: u64) -> u64 {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn sidecar_toml(prefix: &str) -> String {
    format!(
        r#"
meters = ["requests", "input_tokens", "output_tokens"]
[server]
listen = "127.0.0.1:0"
shards = 16
[redis]
key_prefix = "{prefix}"
[plans.bench]
limits = [
  {{ meter = "requests", window = "minute", max = 1000000000 }},
  {{ meter = "output_tokens", window = "day", max = 1000000000000 }},
]
[prices.chat]
requests = 1
input_tokens = 1
output_tokens = 1
"#
    )
}

/// Tollgate's filter configuration for the benchmark route: the estimate from the request body,
/// the usage from the JSON response (the realistic LLM-gateway path).
/// With `lease`, the route is served from leases of that many requests (2 s each). Without
/// `batch`, every request has an authorize callout of its own (`authorize_batch: 0`).
fn filter_config(lease: Option<u64>, batch: bool, reads_body: bool) -> String {
    let mut route = json!({
        "name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
        "charges": {"requests": {"fixed": 1}, "input_tokens": {"fixed": 0},
                    "output_tokens": {"body_field": "max_tokens", "default": 64, "cap": 1000}},
        "usage": {"source": "body"}, "model_field": "model"
    });
    if !reads_body {
        // The same route with fixed charges: no body read, the estimate charged.
        route = json!({
            "name": "chat", "method": "POST", "path_prefix": "/v1/chat/",
            "charges": {"requests": {"fixed": 1}, "output_tokens": {"fixed": 32}}
        });
    }
    if let Some(n) = lease {
        route["lease"] = json!({"requests": n, "ttl_ms": 2000});
    }
    json!({
        "sidecar": {"cluster": "tollgate_sidecar", "timeout_ms": 1000, "token": DECISION},
        "deadline_ms": 1000,
        "key": {"header": "x-api-key"},
        "authorize_batch": if batch { 64 } else { 0 },
        "commit_interval_ms": num_arg("--commit-interval-ms", 20),
        "authorize_inflight": num_arg("--authorize-inflight", 1),
        "routes": [route]
    })
    .to_string()
}

/// A trivial HTTP/2 (h2c) server: `POST /noop` answers `{}`. The no-op filter's callout target.
async fn trivial_server() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().route("/noop", axum::routing::post(|| async { "{}" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

/// The responses that were not 200, with their statuses ("0" when all were).
fn errors_of(out: &Outcome) -> String {
    let n = out.not(200);
    if n == 0 {
        return "0".into();
    }
    let by: Vec<String> = out
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(s, c)| format!("{s}: {c}"))
        .chain((out.errors > 0).then(|| format!("no status: {}", out.errors)))
        .collect();
    format!("{n} ({})", by.join(", "))
}

struct Row {
    name: String,
    out: Outcome,
    envoy_kib: Option<u64>,
    sidecar_kib: Option<u64>,
    extra: String,
}

fn body() -> Bytes {
    Bytes::from_static(
        br#"{"model":"gpt-4o-mini","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#,
    )
}

/// The benchmark request on `port`: `conns` connections, each with its own key from `keys`
/// (connection i uses key i mod n; none when `keys` is empty).
fn load_of(port: u16, conns: usize, secs: u64, rate: Option<u64>, keys: &Arc<Vec<String>>) -> Load {
    let k = keys.clone();
    Load {
        port,
        method: "POST",
        path: "/v1/chat/completions".into(),
        body: body(),
        connections: conns,
        duration: Duration::from_secs(secs),
        rate,
        headers: Arc::new(move |i| {
            let mut h = vec![("content-type".to_string(), "application/json".to_string())];
            if !k.is_empty() {
                h.push(("x-api-key".into(), k[i % k.len()].clone()));
            }
            h
        }),
        vary: None,
    }
}

/// Closed-loop load (as fast as it goes) after a short warm-up.
async fn drive(port: u16, conns: usize, secs: u64, keys: &Arc<Vec<String>>) -> Outcome {
    load::run(load_of(port, conns, 1, None, keys)).await; // warm-up: connections, caches, V8 tiers
    load::run(load_of(port, conns, secs, None, keys)).await
}

/// Open-loop load at `rate` requests/s (latency at a given load).
async fn paced(port: u16, conns: usize, secs: u64, rate: u64, keys: &Arc<Vec<String>>) -> Outcome {
    load::run(load_of(port, conns, secs, Some(rate), keys)).await
}

/// A sidecar process on `store` with `conns` accounts and keys, credits for the whole run.
struct Tollgate {
    process: SidecarProcess,
    port: u16,
    keys: Vec<String>,
    dir: PathBuf,
}

async fn start_tollgate(
    binary: &Path,
    prefix: &str,
    env: Vec<(String, String)>,
    accounts: usize,
) -> Result<Tollgate> {
    let dir = std::env::temp_dir().join(format!("{prefix}.d"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("sidecar.toml");
    std::fs::write(&config, sidecar_toml(prefix))?;
    let port = free_port();
    let mut env = env;
    env.push(("TOLLGATE_ADMIN_TOKEN".into(), ADMIN.into()));
    env.push(("TOLLGATE_DECISION_TOKEN".into(), DECISION.into()));
    env.push((
        "TOLLGATE_SQLITE_PATH".into(),
        dir.join("ledger.sqlite").display().to_string(),
    ));
    let process = SidecarProcess::start(binary, &config, &env, port).await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut keys = Vec::new();
    for i in 0..accounts {
        let id = format!("bench-{i}");
        let post = |path: String, body: Value| {
            http.post(format!("{base}{path}"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
        };
        let r = post("/admin/accounts".into(), json!({"id": id, "plan": "bench"})).await?;
        if !r.status().is_success() {
            bail!("create account: {}", r.text().await?);
        }
        let k: Value = post(format!("/admin/accounts/{id}/keys"), json!({}))
            .await?
            .json()
            .await?;
        keys.push(
            k["api_key"]
                .as_str()
                .context("no api_key in the answer")?
                .to_string(),
        );
        post(
            format!("/admin/accounts/{id}/grants"),
            json!({"grant_id": "bench", "amount": 1_000_000_000_000u64}),
        )
        .await?;
    }
    Ok(Tollgate {
        process,
        port,
        keys,
        dir,
    })
}

/// Sync lag quantiles from the sidecar's Prometheus histogram (bucket upper bounds, ms).
async fn sync_lag(port: u16) -> String {
    let (p50, p99) = sidecar_quantiles(port, "tollgate_sync_lag_milliseconds").await;
    format!("sync lag p50 {p50} / p99 {p99} ms")
}

/// The p50 and p99 of one of the sidecar's Prometheus histograms, as bucket upper bounds.
async fn sidecar_quantiles(port: u16, name: &str) -> (String, String) {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return ("?".into(), "?".into());
    };
    let text = r.text().await.unwrap_or_default();
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((le.to_string(), n.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= total * p)
            .map_or("?".to_string(), |(le, _)| format!("≤{le}"))
    };
    (q(0.5), q(0.99))
}

#[tokio::main]
async fn main() -> Result<()> {
    let secs: u64 = arg("--seconds").and_then(|v| v.parse().ok()).unwrap_or(10);
    let conns: usize = arg("--connections")
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let filter = arg("--filter").context("--filter PATH (tollgate_filter.wasm)")?;
    let noop = arg("--noop").context("--noop PATH (noop_callout.wasm)")?;
    let sidecar = PathBuf::from(arg("--sidecar").context("--sidecar PATH (release binary)")?);
    let redis_url =
        std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg = std::env::var("TOLLGATE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let run = tollgate_sidecar::apikey::new_id("bench");
    println!(
        "tollgate-sidebyside: {secs}s per setup, {conns} connections, closed loop (each connection \
         sends its next request when the last is answered); Envoy --concurrency 1"
    );
    let upstream = wasm_host::mock::start().await?;
    let none = Arc::new(Vec::<String>::new());
    let mut rows: Vec<Row> = Vec::new();

    // 1. Passthrough.
    let envoy = Envoy::start_with(upstream, free_port(), None)?;
    let out = drive(envoy.port, conns, secs, &none).await;
    let passthrough_rps = out.per_second();
    let half = (passthrough_rps / 2.0) as u64;
    let paced_pass = paced(envoy.port, conns, secs, half, &none).await;
    rows.push(Row {
        name: "1. Envoy passthrough".into(),
        out,
        envoy_kib: peak_rss_kib(envoy.pid()),
        sidecar_kib: None,
        extra: String::new(),
    });
    drop(envoy);

    // 2. No-op callout filter.
    let trivial = trivial_server().await?;
    let envoy = Envoy::start_with(upstream, trivial, Some((&noop, "{}")))?;
    let out = drive(envoy.port, conns, secs, &none).await;
    rows.push(Row {
        name: "2. Envoy + no-op callout filter".into(),
        out,
        envoy_kib: peak_rss_kib(envoy.pid()),
        sidecar_kib: None,
        extra: String::new(),
    });
    drop(envoy);

    // 3. Full enforcement on Redis + PostgreSQL; 4. the embedded store.
    let mut paced_full = None;
    let mut paced_lease = None;
    let db = format!("tollgate_{run}");
    for (label, env) in [
        (
            "redis",
            vec![
                ("TOLLGATE_REDIS_URL".to_string(), redis_url.clone()),
                ("TOLLGATE_DATABASE_URL".to_string(), format!("{pg}/{db}")),
            ],
        ),
        (
            "embedded",
            vec![
                ("TOLLGATE_REDIS_URL".to_string(), String::new()),
                ("TOLLGATE_DATABASE_URL".to_string(), String::new()),
            ],
        ),
    ] {
        let prefix = format!("{run}_{label}");
        let tg = start_tollgate(&sidecar, &prefix, env, conns).await?;
        let envoy = Envoy::start_with(
            upstream,
            tg.port,
            Some((&filter, &filter_config(None, true, true))),
        )?;
        let keys = Arc::new(tg.keys.clone());
        let hot = Arc::new(vec![tg.keys[0].clone()]);
        let cmds_before = tollgate_sidecar::store::commands_processed(&redis_url).await;
        let cpu_before = tollgate_sidecar::store::cpu_seconds(&redis_url).await;
        let out = drive(envoy.port, conns, secs, &keys).await;
        let cmds = tollgate_sidecar::store::commands_processed(&redis_url)
            .await
            .saturating_sub(cmds_before);
        let cpu = tollgate_sidecar::store::cpu_seconds(&redis_url).await - cpu_before;
        let per_req = if label == "redis" {
            let n = out.requests().max(1) as f64;
            format!(
                "; Redis commands/request {:.1}, Redis CPU/request {:.1} µs",
                cmds as f64 / n,
                cpu * 1e6 / n
            )
        } else {
            String::new()
        };
        let name = if label == "redis" {
            "3. Tollgate (Redis + PostgreSQL), key per connection"
        } else {
            "4. Tollgate (embedded store + SQLite), key per connection"
        };
        let lag = sync_lag(tg.port).await;
        // Where a request's time goes: the filter's wait for its decision (Envoy's histogram,
        // from asking to the answer, a wait for the line included) and the sidecar's own time
        // per decision.
        let (d50, d99) =
            sidecar_quantiles(tg.port, "tollgate_decision_duration_microseconds").await;
        let q = |p: &str| {
            envoy
                .quantile("wasmcustom.tollgate.callout_ms", p)
                .map_or("?".into(), |v| format!("{v:.1}"))
        };
        let rq = |p: &str| {
            envoy
                .quantile("cluster.tollgate_sidecar.upstream_rq_time", p)
                .map_or("?".into(), |v| format!("{v:.1}"))
        };
        let lag = format!(
            "{lag}; decision wait p50 {} / p99 {} ms, Envoy's callouts to the sidecar p50 {} / p99 {} ms, sidecar's decision p50 {d50} / p99 {d99} µs",
            q("P50"),
            q("P99"),
            rq("P50"),
            rq("P99")
        );
        rows.push(Row {
            name: name.into(),
            out,
            envoy_kib: peak_rss_kib(envoy.pid()),
            sidecar_kib: peak_rss_kib(tg.process.pid()),
            extra: format!("{lag}{per_req}"),
        });
        let out = drive(envoy.port, conns, secs, &hot).await;
        rows.push(Row {
            name: format!(
                "{}, hot key",
                if label == "redis" {
                    "3b. Tollgate (Redis + PostgreSQL)"
                } else {
                    "4b. Tollgate (embedded)"
                }
            ),
            out,
            envoy_kib: peak_rss_kib(envoy.pid()),
            sidecar_kib: peak_rss_kib(tg.process.pid()),
            extra: String::new(),
        });
        if label == "redis" {
            let batches = envoy.stat("wasmcustom.tollgate.authorize_batches");
            let batched = envoy.stat("wasmcustom.tollgate.authorize_batched");
            if let Some(r) = rows.iter_mut().find(|r| r.name.starts_with("3. ")) {
                r.extra.push_str(&format!(
                    "; 3 and 3b sent {} authorizes in {} batches",
                    batched.map_or("?".into(), |n| n.to_string()),
                    batches.map_or("?".into(), |n| n.to_string())
                ));
            }
            paced_full = Some(paced(envoy.port, conns, secs, half, &keys).await);
            // The same sidecar, a callout per request (batching off): what batching adds.
            drop(envoy);
            let envoy = Envoy::start_with(
                upstream,
                tg.port,
                Some((&filter, &filter_config(None, false, true))),
            )?;
            let out = drive(envoy.port, conns, secs, &keys).await;
            rows.push(Row {
                name: "3c. Tollgate (Redis + PostgreSQL), a callout per request (no batching)"
                    .into(),
                out,
                envoy_kib: peak_rss_kib(envoy.pid()),
                sidecar_kib: peak_rss_kib(tg.process.pid()),
                extra: String::new(),
            });
            // The same sidecar, the route opted into leases of 200 requests.
            drop(envoy);
            let envoy = Envoy::start_with(
                upstream,
                tg.port,
                Some((&filter, &filter_config(Some(200), true, true))),
            )?;
            let out = drive(envoy.port, conns, secs, &keys).await;
            rows.push(Row {
                name: "5. Tollgate with leases (Redis + PostgreSQL), key per connection".into(),
                out,
                envoy_kib: peak_rss_kib(envoy.pid()),
                sidecar_kib: peak_rss_kib(tg.process.pid()),
                extra: format!(
                    "{} of the requests admitted from a lease",
                    envoy
                        .stat("wasmcustom.tollgate.leased")
                        .map_or("?".into(), |n| n.to_string())
                ),
            });
            paced_lease = Some(paced(envoy.port, conns, secs, half, &keys).await);
            // Leases on a route that reads no body (fixed charges).
            drop(envoy);
            let envoy = Envoy::start_with(
                upstream,
                tg.port,
                Some((&filter, &filter_config(Some(200), true, false))),
            )?;
            let out = drive(envoy.port, conns, secs, &keys).await;
            rows.push(Row {
                name: "5b. Tollgate with leases, a route that reads no body".into(),
                out,
                envoy_kib: peak_rss_kib(envoy.pid()),
                sidecar_kib: peak_rss_kib(tg.process.pid()),
                extra: String::new(),
            });
        } else {
            drop(envoy);
        }
        let dir = tg.dir.clone();
        drop(tg);
        let _ = std::fs::remove_dir_all(dir);
    }

    println!();
    println!("| setup | requests/s | p50 ms | p99 ms | p99.9 ms | errors | Envoy peak RSS MiB | sidecar peak RSS MiB | notes |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |k: Option<u64>| k.map_or("-".to_string(), |k| format!("{:.0}", k as f64 / 1024.0));
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            r.name,
            r.out.per_second(),
            r.out.pct_ms(0.5),
            r.out.pct_ms(0.99),
            r.out.pct_ms(0.999),
            errors_of(&r.out),
            mib(r.envoy_kib),
            mib(r.sidecar_kib),
            r.extra
        );
    }
    let rps = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .map_or(0.0, |r| r.out.per_second())
    };
    println!();
    println!(
        "ratios: full/passthrough (3/1) {:.2}, full/no-op callout (3/2) {:.2}, \
         hot key/no-op callout (3b/2) {:.2}, unbatched/no-op callout (3c/2) {:.2}, \
         leases/passthrough (5/1) {:.2}, leases without a body/passthrough (5b/1) {:.2}, \
         embedded/full (4/3) {:.2}",
        rps("3.") / rps("1.").max(1.0),
        rps("3.") / rps("2.").max(1.0),
        rps("3b.") / rps("2.").max(1.0),
        rps("3c.") / rps("2.").max(1.0),
        rps("5.") / rps("1.").max(1.0),
        rps("5b.") / rps("1.").max(1.0),
        rps("4.") / rps("3.").max(1.0)
    );
    if let Some(full) = paced_full {
        println!(
            "at half the passthrough maximum ({half} req/s, open loop): passthrough p99 {:.2} ms, \
             Tollgate p99 {:.2} ms — added p99 {:.2} ms (errors {} / {})",
            paced_pass.pct_ms(0.99),
            full.pct_ms(0.99),
            full.pct_ms(0.99) - paced_pass.pct_ms(0.99),
            paced_pass.not(200),
            full.not(200)
        );
    }

    if let Some(lease) = paced_lease {
        println!(
            "at the same load with leases: p99 {:.2} ms — added p99 {:.2} ms (errors {})",
            lease.pct_ms(0.99),
            lease.pct_ms(0.99) - paced_pass.pct_ms(0.99),
            lease.not(200)
        );
    }

    // Leave nothing behind.
    if let Ok(client) = redis::Client::open(redis_url.as_str()) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{run}_*"))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(1000) {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
            }
        }
    }
    if let Ok(admin) = sqlx::PgPool::connect(&format!("{pg}/postgres")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
    Ok(())
}
