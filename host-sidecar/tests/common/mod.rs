//! Test environment, on either store ([`Backend`]): real Redis and real PostgreSQL (the ones on
//! this machine, or the URLs in TOLLGATE_TEST_REDIS_URL / TOLLGATE_TEST_DATABASE_URL), or the
//! embedded store with an SQLite ledger in a temporary file. Every environment gets its own
//! database and key prefix, so tests run in parallel and never see each other's state. Time is a
//! `ManualClock` the test moves.
//!
//! [`conformance!`] runs a test once per backend: the embedded store must behave exactly like
//! Redis + PostgreSQL, and this is what keeps it so.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use tollgate_sidecar::clock::ManualClock;
use tollgate_sidecar::config::Config;
use tollgate_sidecar::engine::Engine;

pub const ADMIN: &str = "test-admin-token";
/// The filter's token (decisions for API keys) and a trusted service's (also bare accounts).
pub const DECISION: &str = "test-decision-token";
pub const SERVICE: &str = "test-service-token";

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

/// Which store and ledger an environment runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    RedisPostgres,
    /// A 3-master Redis Cluster of the test's own, and PostgreSQL.
    RedisCluster,
    /// The in-process key space (the same Lua scripts) and an SQLite ledger.
    Embedded,
}

/// Defines each test once per [`Backend`], in modules `redis_postgres` and `embedded`:
/// `conformance! { async fn name(backend: Backend) { ... } }`.
#[macro_export]
macro_rules! conformance {
    ($($tests:tt)*) => {
        $crate::conformance_on!(redis_postgres, RedisPostgres, $($tests)*);
        $crate::conformance_on!(redis_cluster, RedisCluster, $($tests)*);
        $crate::conformance_on!(embedded, Embedded, $($tests)*);
    };
}

/// The tests of [`conformance!`] in module `$module`, each on `Backend::$backend`.
#[macro_export]
macro_rules! conformance_on {
    ($module:ident, $backend:ident,
     $( $(#[$meta:meta])* async fn $name:ident($b:ident: Backend) $body:block )*) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let $b = $crate::common::Backend::$backend;
                $body
            } )*
        }
    };
}

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
    pub backend: Backend,
    /// A redis-server of this environment's own (for tests that flush or restart Redis).
    pub private_redis: Option<PrivateRedis>,
    pub cluster: Option<LocalCluster>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.backend == Backend::Embedded {
            let path = &self.cfg.postgres.sqlite_path;
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
    }
}

pub fn config(extra: &str, prefix: &str, db_url: &str, redis: &str) -> Config {
    let mut cfg = Config::from_toml(&format!("{CONFIG}\n{extra}")).expect("test config");
    cfg.redis.key_prefix = prefix.to_string();
    cfg.redis.url = Some(redis.to_string());
    cfg.postgres.url = Some(db_url.to_string());
    cfg.postgres.max_connections = 16;
    cfg.server.admin_token = Some(ADMIN.to_string());
    cfg.server.decision_token = Some(DECISION.to_string());
    cfg.server.service_token = Some(SERVICE.to_string());
    cfg
}

impl Env {
    pub async fn new(instances: usize) -> Env {
        Self::with(instances, "", &redis_url()).await
    }

    /// `extra` TOML is appended to [`CONFIG`] (e.g. more `[server]`-less sections).
    pub async fn with(instances: usize, extra: &str, redis: &str) -> Env {
        Self::build(Backend::RedisPostgres, instances, extra, redis, None).await
    }

    /// Redis and PostgreSQL, PostgreSQL reached at `pg_base` (e.g. through a [`FaultProxy`]).
    pub async fn with_pg(instances: usize, extra: &str, pg_base: &str) -> Env {
        let mut env = Self::build(Backend::RedisPostgres, 0, extra, &redis_url(), None).await;
        env.cfg.postgres.url = Some(format!("{pg_base}/{}", env.db));
        for _ in 0..instances {
            env.add_sidecar().await;
        }
        env
    }

    /// `instances` sidecars on `backend`. On the embedded store they share one key space and
    /// one ledger file, as sidecars share one Redis and one PostgreSQL.
    pub async fn on(backend: Backend, instances: usize) -> Env {
        Self::build(backend, instances, "", &redis_url(), None).await
    }

    /// Like [`Env::on`], with a Redis of its own that [`Env::flushall`] may wipe.
    pub async fn isolated(backend: Backend, instances: usize) -> Env {
        Self::isolated_with(backend, instances, "").await
    }

    /// [`Env::isolated`] with `extra` TOML appended to [`CONFIG`].
    pub async fn isolated_with(backend: Backend, instances: usize, extra: &str) -> Env {
        let private = match backend {
            Backend::RedisPostgres => Some(PrivateRedis::start().await),
            // The cluster is the environment's own already.
            Backend::RedisCluster | Backend::Embedded => None,
        };
        let url = private.as_ref().map_or_else(redis_url, |r| r.url.clone());
        Self::build(backend, instances, extra, &url, private).await
    }

    pub async fn build(
        backend: Backend,
        instances: usize,
        extra: &str,
        redis: &str,
        private_redis: Option<PrivateRedis>,
    ) -> Env {
        let prefix = unique("tgt");
        let db = prefix.clone();
        let mut cfg = config(extra, &prefix, &format!("{}/{db}", pg_base()), redis);
        if backend == Backend::Embedded {
            cfg.redis.url = None;
            cfg.postgres.url = None;
            cfg.postgres.sqlite_path = std::env::temp_dir()
                .join(format!("{prefix}.sqlite"))
                .to_string_lossy()
                .into_owned();
        }
        let clock = ManualClock::new(NOON);
        let mut env = Env {
            clock,
            sidecars: Vec::new(),
            http: reqwest::Client::new(),
            prefix,
            db,
            cfg,
            backend,
            private_redis,
            cluster: None,
        };
        if backend == Backend::RedisCluster {
            let c = LocalCluster::start().await;
            env.cfg.redis.url = Some(c.url());
            env.cluster = Some(c);
        }
        for _ in 0..instances {
            env.add_sidecar().await;
        }
        env
    }

    /// The store loses everything (Redis FLUSHALL; the embedded key space the same).
    pub async fn flushall(&self) {
        if let Some(c) = &self.cluster {
            return c.flushall().await;
        }
        match &self.private_redis {
            Some(r) => r.flushall().await,
            None => {
                assert_eq!(
                    self.backend,
                    Backend::Embedded,
                    "flushall needs Env::isolated"
                );
                let mut c = self.engine().store.conn();
                let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
            }
        }
    }

    pub async fn add_sidecar(&mut self) {
        let clock = Arc::new(self.clock.clone());
        let engine = match (self.backend, self.sidecars.first()) {
            (Backend::Embedded, Some(first)) => tollgate_sidecar::engine_on(
                self.cfg.clone(),
                clock,
                first.engine.store.clone(),
                first.engine.ledger.clone(),
            )
            .expect("sidecar starts"),
            _ => tollgate_sidecar::build_engine(self.cfg.clone(), clock)
                .await
                .expect("sidecar starts"),
        };
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

    /// POST to sidecar `i` as a trusted service (decision routes, for keys and bare accounts);
    /// returns status, body and whether it was marked as a replay.
    pub async fn post_to(&self, i: usize, path: &str, body: &Value) -> (u16, Value, bool) {
        self.send_post(i, path, body, Some(SERVICE)).await
    }

    /// POST with the admin token to sidecar `i`; returns status, body and the replay mark.
    pub async fn post_to_admin(&self, i: usize, path: &str, body: &Value) -> (u16, Value, bool) {
        self.send_post(i, path, body, Some(ADMIN)).await
    }

    async fn send_post(
        &self,
        i: usize,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> (u16, Value, bool) {
        let mut r = self.http.post(format!("{}{path}", self.base(i))).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.expect("request sent");
        let status = r.status().as_u16();
        let replay = r.headers().get("x-tollgate-replayed").is_some();
        (status, r.json().await.unwrap_or(Value::Null), replay)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, v, _) = self.post_to(0, path, body).await;
        (s, v)
    }

    /// A raw body POST with `token` (the service token when None).
    pub async fn post_raw(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base(0)))
            .header("content-type", "application/json")
            .bearer_auth(token.unwrap_or(SERVICE))
            .body(body.to_string());
        let r = r.send().await.expect("request sent");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, v, _) = self.post_to_admin(0, path, body).await;
        (s, v)
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

    /// A count or sum over one account's ledger rows (`$1`); the SQL must suit both dialects.
    pub async fn sql_i64(&self, sql: &str, acct: &str) -> i64 {
        self.engine().ledger.scalar(sql, acct).await.expect("query")
    }

    pub async fn ledger_rows(&self, acct: &str) -> i64 {
        self.sql_i64("SELECT count(*) FROM ledger WHERE account_id = $1", acct)
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
    /// A redis-server of its own on a spare port (another port if that one was taken).
    pub async fn start() -> PrivateRedis {
        for _ in 0..5 {
            if let Some(server) = Self::try_start(cluster::spare_port()).await {
                return server;
            }
        }
        panic!("private redis-server did not start in five attempts");
    }

    async fn try_start(port: u16) -> Option<PrivateRedis> {
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
        // Owned from here on: dropping it (also on the way out below) stops the server.
        let mut server = PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        let client = redis::Client::open(server.url.as_str()).unwrap();
        for _ in 0..200 {
            if let Ok(Some(_)) = server.child.try_wait() {
                return None; // exited: the port was taken
            }
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return Some(server);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        None
    }

    /// Stops the server (SIGKILL): Redis is down.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new, empty server on the same port (no persistence: everything is gone).
    pub async fn restart(&mut self) {
        let port = self.url.rsplit(':').next().unwrap().to_string();
        self.child = Command::new("redis-server")
            .args([
                "--port",
                &port,
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
        let client = redis::Client::open(self.url.as_str()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("redis-server did not restart");
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

/// A TCP proxy on a loopback port in front of a real server, that a test can cut (every open
/// connection dropped, new ones refused) and restore: the network failing between the sidecar
/// and PostgreSQL or Redis, without stopping the shared server other tests use.
pub struct FaultProxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target_port: u16) -> FaultProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, links2) = (up.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound); // refused: the peer sees the connection closed at once
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut l = links2.lock().unwrap();
                l.retain(|h| !h.is_finished());
                l.push(link);
            }
        });
        FaultProxy {
            port,
            up,
            links,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for h in self.links.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

// The local Redis Cluster is shared with the end-to-end tests (tests/src/cluster.rs).
#[path = "../../../tests/src/cluster.rs"]
pub mod cluster;
pub use cluster::LocalCluster;
