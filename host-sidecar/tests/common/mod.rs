//! Test environment: real Redis and real PostgreSQL (the ones on this machine, or the URLs in
//! TOLLGATE_TEST_REDIS_URL / TOLLGATE_TEST_DATABASE_URL). Every environment gets its own
//! database and Redis key prefix, so tests run in parallel and never see each other's state.
//! Time is a `ManualClock` the test moves.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use tollgate_sidecar::clock::ManualClock;
use tollgate_sidecar::config::Config;
use tollgate_sidecar::engine::Engine;

pub const ADMIN: &str = "test-admin-token";

/// 2026-11-22T12:00:00Z
pub const NOON: u64 = 1_795_348_800_000;

pub const CONFIG: &str = r#"
meters = ["requests", "tokens"]
[server]
listen = "127.0.0.1:0"
shards = 4
hold_ttl_secs = 60
account_cache_ttl_ms = 60000
[plans.basic]
limits = [{ meter = "requests", window = "day", max = 100 }]
[plans.tokens]
limits = [
  { meter = "requests", window = "day", max = 10 },
  { meter = "tokens", window = "day", max = 100 },
]
[plans.monthly]
limits = [{ meter = "tokens", window = "month", max = 1000 }]
[plans.open]
limits = []
[prices.default]
requests = 0
[prices.paid]
requests = 10
tokens = 1
"#;

pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn pg_base() -> String {
    std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        tollgate_sidecar::apikey::new_id("t").trim_start_matches("t_")
    )
}

/// One sidecar instance serving HTTP on a loopback port.
pub struct Sidecar {
    pub engine: Arc<Engine>,
    pub base: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub struct Env {
    pub clock: ManualClock,
    pub sidecars: Vec<Sidecar>,
    pub http: reqwest::Client,
    pub prefix: String,
    pub db: String,
    pub cfg: Config,
}

pub fn config(extra: &str, prefix: &str, db_url: &str, redis: &str) -> Config {
    let mut cfg = Config::from_toml(&format!("{CONFIG}\n{extra}")).expect("test config");
    cfg.redis.key_prefix = prefix.to_string();
    cfg.redis.url = redis.to_string();
    cfg.postgres.url = db_url.to_string();
    cfg.postgres.max_connections = 16;
    cfg.server.admin_token = Some(ADMIN.to_string());
    cfg
}

impl Env {
    pub async fn new(instances: usize) -> Env {
        Self::with(instances, "", &redis_url()).await
    }

    /// `extra` TOML is appended to [`CONFIG`] (e.g. more `[server]`-less sections).
    pub async fn with(instances: usize, extra: &str, redis: &str) -> Env {
        let prefix = unique("tgt");
        let db = prefix.clone();
        let cfg = config(extra, &prefix, &format!("{}/{db}", pg_base()), redis);
        let clock = ManualClock::new(NOON);
        let mut env = Env {
            clock,
            sidecars: Vec::new(),
            http: reqwest::Client::new(),
            prefix,
            db,
            cfg,
        };
        for _ in 0..instances {
            env.add_sidecar().await;
        }
        env
    }

    pub async fn add_sidecar(&mut self) {
        let engine = tollgate_sidecar::build_engine(self.cfg.clone(), Arc::new(self.clock.clone()))
            .await
            .expect("sidecar starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let e = engine.clone();
        let server = tokio::spawn(async move {
            let _ = tollgate_sidecar::serve(e, listener).await;
        });
        self.sidecars.push(Sidecar {
            engine,
            base,
            server,
        });
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.sidecars[0].engine
    }

    pub fn base(&self, i: usize) -> &str {
        &self.sidecars[i % self.sidecars.len()].base
    }

    /// POST to sidecar `i`; returns status, body and whether it was marked as a replay.
    pub async fn post_to(&self, i: usize, path: &str, body: &Value) -> (u16, Value, bool) {
        let r = self
            .http
            .post(format!("{}{path}", self.base(i)))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        let replay = r.headers().get("x-tollgate-replayed").is_some();
        let v = r.json().await.unwrap_or(Value::Null);
        (status, v, replay)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, v, _) = self.post_to(0, path, body).await;
        (s, v)
    }

    pub async fn post_raw(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base(0)))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.expect("request sent");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base(0)))
            .bearer_auth(ADMIN)
            .json(body)
            .send()
            .await
            .expect("request sent");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base(0)))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("request sent");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Creates an account on `plan` in `tz` with one key; returns the key's plaintext.
    pub async fn account(&self, id: &str, plan: &str, tz: &str) -> String {
        let (s, v) = self
            .admin_post(
                "/admin/accounts",
                &json!({"id": id, "plan": plan, "timezone": tz}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = self
            .admin_post(&format!("/admin/accounts/{id}/keys"), &json!({}))
            .await;
        assert_eq!(s, 201, "{v}");
        v["api_key"].as_str().unwrap().to_string()
    }

    pub async fn grant(&self, acct: &str, id: &str, amount: u64, extra: Value) -> (u16, Value) {
        let mut body = json!({"grant_id": id, "amount": amount});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.admin_post(&format!("/admin/accounts/{acct}/grants"), &body)
            .await
    }

    pub async fn balance(&self, acct: &str) -> u64 {
        let (s, v) = self
            .admin_get(&format!("/v1/accounts/{acct}/balance"))
            .await;
        assert_eq!(s, 200, "{v}");
        v["balance"].as_u64().unwrap()
    }

    /// Used amount of the account's limit `name` in its current window (from Redis).
    pub async fn used(&self, acct: &str, name: &str) -> u64 {
        let (s, v) = self.admin_get(&format!("/v1/accounts/{acct}/usage")).await;
        assert_eq!(s, 200, "{v}");
        v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no limit {name} in {v}"))["used"]
            .as_u64()
            .unwrap()
    }

    /// Drains every outbox into the ledger.
    pub async fn sync(&self) {
        let e = self.engine();
        while e.sync.sync_all().await.expect("sync") > 0 {}
    }

    pub async fn pg_i64(&self, sql: &str, acct: &str) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(sql)
            .bind(acct)
            .fetch_one(self.engine().ledger.pool())
            .await
            .expect("query")
            .unwrap_or(0)
    }

    pub async fn ledger_rows(&self, acct: &str) -> i64 {
        self.pg_i64("SELECT count(*) FROM ledger WHERE account_id = $1", acct)
            .await
    }
}

pub fn authorize_body(key: &str, idem: &str, meters: Value) -> Value {
    json!({"api_key": key, "idempotency_key": idem, "meters": meters})
}

/// A private redis-server on a free loopback port, for tests that FLUSHALL or restart Redis.
/// Stopped (by PID) when dropped.
pub struct PrivateRedis {
    child: Child,
    pub url: String,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        // Owned from here on: dropping it (also on the panic below) stops the server.
        let server = PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        let client = redis::Client::open(server.url.as_str()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return server;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("private redis-server did not start");
    }

    pub async fn flushall(&self) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
