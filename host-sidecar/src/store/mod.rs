//! The real-time side of the quota engine: key names, the Lua scripts and their replies.
//!
//! Each operation is one EVALSHA of one script, so every decision is atomic: all of a request's
//! limits and its balance are checked and charged together, or nothing changes.
//!
//! The key space is a Redis server or, when none is configured, the embedded one
//! (`tollgate-memkv`: an in-process key space that runs the *same* scripts in Lua 5.1, as Redis
//! does). Both sit behind [`Conn`], a redis-rs connection, so every line of the engine, the sync
//! worker and the scripts is shared; only where the bytes go differs. With Redis the connection
//! is a multiplexed `ConnectionManager`: concurrent requests share one socket and are pipelined
//! by redis-rs, and it reconnects by itself.

pub mod breaker;
pub mod keys;
pub mod scripts;

use keys::Keyspace;
use redis::aio::ConnectionManager;
use scripts::{Op, Scripts};
use serde::Serialize;
use std::sync::Arc;
use tollgate_protocol::{Meters, Resource};

/// What a script answered (see the header of each file in `lua/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Replay(String),
    Deny(String),
    /// The account's state is not in Redis: cold-load it and retry.
    Cold,
    /// Just after a cold load: ask the ledger whether this idempotency key was used.
    Recheck,
    /// The idempotency key was used by a different request (commit: the hold's route and
    /// model, as JSON, when the commit was priced with others).
    Conflict(String),
    /// The account changed since the sidecar read it (plan, limits, keys): re-read and retry.
    Stale,
    /// No such hold in Redis.
    Gone,
    /// The hold was already settled otherwise.
    Resolved(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected script reply {0:?}")]
    Reply(String),
    #[error("redis unreachable (circuit open; retrying shortly)")]
    CircuitOpen,
}

/// One limit as the scripts see it: the counter of (scope, meter, period) may reach `max`.
#[derive(Debug, Clone)]
pub struct LuaLimit {
    pub scope: String,
    pub meter: String,
    pub period: String,
    pub amt: u64,
    pub max: u64,
    pub end: u64,
    pub name: String,
    pub mode: crate::config::LimitMode,
}

/// The arguments of authorize / consume / check (see `spend_req` in `lua/lib.lua`).
#[derive(Debug)]
pub struct SpendArgs<'a> {
    pub now: u64,
    pub acct: &'a str,
    pub key: Option<&'a str>,
    pub idem: &'a str,
    pub fp: &'a str,
    pub checked: bool,
    pub credit: u64,
    pub meters: &'a Meters,
    pub lims: &'a [LuaLimit],
    pub route: &'a str,
    pub model: Option<&'a str>,
    pub resource: Option<&'a Resource>,
    /// authorize: the hold id and its expiry.
    pub hold: Option<&'a str>,
    pub exp: u64,
    pub idem_ttl_ms: u64,
    /// The replay window (`server.replay_window_secs`) in ms: how long tombstones are kept.
    pub window_ms: u64,
    /// The version of the account the limits were read from (see [`Store::set_version`]).
    pub version: i64,
    /// The caller's correlation id (validated printable ASCII), recorded on the ledger entry;
    /// not part of the fingerprint.
    pub correlation_id: Option<&'a str>,
}

impl<'a> SpendArgs<'a> {
    /// Arguments that ask for nothing: the check script then reads `lims`' counters and the
    /// balance (reports). Other calls fill in what they ask on top of it.
    pub fn probe(now: u64, acct: &'a str, meters: &'a Meters, lims: &'a [LuaLimit]) -> Self {
        SpendArgs {
            now,
            acct,
            key: None,
            idem: "",
            fp: "",
            checked: false,
            credit: 0,
            meters,
            lims,
            route: "default",
            model: None,
            resource: None,
            hold: None,
            exp: 0,
            idem_ttl_ms: 0,
            window_ms: 1,
            // Not a caller's request: never told `stale`.
            version: i64::MAX,
            correlation_id: None,
        }
    }

    /// The request's tombstone field: its hold id, or for a consume `<account>//<key>`.
    fn tomb_field(&self) -> String {
        match self.hold {
            Some(h) => keys::tomb_field(h),
            None => keys::tomb_field(&format!("{}//{}", self.acct, self.idem)),
        }
    }

    fn argv(&self, tomb: &str, tomb_ttl_ms: u64) -> Vec<String> {
        let mut v = Vec::with_capacity(19 + self.lims.len() * 8);
        v.extend([
            self.now.to_string(),
            self.acct.to_string(),
            self.key.unwrap_or_default().to_string(),
            self.idem.to_string(),
            self.fp.to_string(),
            if self.checked { "1" } else { "0" }.to_string(),
            self.credit.to_string(),
            self.route.to_string(),
            self.model.unwrap_or_default().to_string(),
            self.hold.unwrap_or_default().to_string(),
            self.exp.to_string(),
            self.idem_ttl_ms.to_string(),
            json(self.meters),
            self.resource.map(json).unwrap_or_default(),
            self.lims.len().to_string(),
        ]);
        for l in self.lims {
            v.extend([
                l.scope.clone(),
                l.meter.clone(),
                l.period.clone(),
                l.amt.to_string(),
                l.max.to_string(),
                l.end.to_string(),
                l.name.clone(),
                l.mode.code().to_string(),
            ]);
        }
        v.push(self.version.to_string());
        // As a JSON string (quotes and escapes included): the scripts splice it into JSON as is.
        v.push(self.correlation_id.map(|c| json(&c)).unwrap_or_default());
        v.push(tomb.to_string());
        v.push(tomb_ttl_ms.to_string());
        v
    }
}

/// The arguments of commit / release (see `settle_req` in `lua/lib.lua`).
#[derive(Debug)]
pub struct SettleArgs<'a> {
    pub now: u64,
    pub hold: &'a str,
    pub fp: &'a str,
    pub meters: &'a Meters,
    pub credit: u64,
    /// The replay window in ms: how long the settled hold's tombstone is kept.
    pub window_ms: u64,
    /// commit: how its route and model are known (checked against the hold's in the script,
    /// or unknown: a replay only).
    pub priced: crate::engine::Pricing<'a>,
}

impl SettleArgs<'_> {
    fn argv(&self, tomb: &str, tomb_ttl_ms: u64) -> Vec<String> {
        let mut v = vec![
            self.now.to_string(),
            self.hold.to_string(),
            self.fp.to_string(),
            self.credit.to_string(),
            tomb_ttl_ms.to_string(),
            tomb.to_string(),
            json(self.meters),
            self.meters.len().to_string(),
        ];
        for (m, a) in self.meters {
            v.push(m.clone());
            v.push(a.to_string());
        }
        v
    }
}

#[derive(Debug, Serialize)]
pub struct GrantArgs<'a> {
    pub now: u64,
    pub acct: &'a str,
    pub gid: &'a str,
    pub amount: u64,
    pub priority: u32,
    pub expires: u64,
    pub source: &'a str,
    pub fp: &'a str,
    pub checked: bool,
    pub idem_ttl_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct LapseArgs<'a> {
    pub now: u64,
    pub acct: &'a str,
    /// `lapse` (expiry) or `revoke`: the ledger kind of the event.
    pub kind: &'a str,
    pub idem: &'a str,
    pub revoke: &'a [String],
}

/// What a cold load installs.
#[derive(Debug, Default, Serialize)]
pub struct LoadArgs {
    pub now: u64,
    pub recheck_until: u64,
    /// The account's version (see [`Store::set_version`]).
    pub version: i64,
    /// [key, used, period end ms]
    pub counters: Vec<(String, i64, i64)>,
    /// [grant id, order member, remaining]
    pub grants: Vec<(String, String, i64)>,
    /// [hold key, hold id, record json, fingerprint, authorize answer json, expires ms]
    pub holds: Vec<(String, String, String, String, String, i64)>,
}

/// A connection to the store's key space.
#[derive(Clone)]
pub enum Conn {
    Redis(ConnectionManager),
    /// A Redis Cluster: each command goes to the node owning its key's slot. Every key a script
    /// touches carries its shard's hash tag, so each script runs on one node.
    Cluster(redis::cluster_async::ClusterConnection),
    Embedded(tollgate_memkv::MemConn),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Redis(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Embedded(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Redis(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Embedded(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Redis(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Embedded(c) => c.get_db(),
        }
    }
}

/// The key space and the scripts that decide in it.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    pub breaker: Arc<breaker::Breaker>,
    scripts: Arc<Scripts>,
    pub keys: Keyspace,
}

/// Commands a Redis server has executed since it started (`INFO stats`), including those run
/// inside scripts; 0 when it cannot be asked. For benchmarks.
pub async fn commands_processed(url: &str) -> u64 {
    info_fields(url, "stats", &["total_commands_processed"]).await as u64
}

/// The CPU time a Redis server has used since it started (`INFO cpu`: user + system), in
/// seconds; 0 when it cannot be asked. For benchmarks: unlike throughput on a shared, noisy
/// machine, Redis's own CPU time per request is what its scripts cost.
pub async fn cpu_seconds(url: &str) -> f64 {
    info_fields(url, "cpu", &["used_cpu_user", "used_cpu_sys"]).await
}

/// The sum of numeric `INFO <section>` fields.
async fn info_fields(url: &str, section: &str, fields: &[&str]) -> f64 {
    let Ok(client) = redis::Client::open(url) else {
        return 0.0;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return 0.0;
    };
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| fields.contains(k))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// "Function not found": the server does not have this release's library (yet, or any more).
fn function_missing(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::ResponseError
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

fn json<T: Serialize>(v: &T) -> String {
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

impl Store {
    /// The embedded key space: nothing to connect to, state lives in this process (and is
    /// rebuilt from the ledger after a restart, like a Redis that lost its data).
    pub fn embedded(keys: Keyspace) -> Self {
        Self {
            conn: Conn::Embedded(tollgate_memkv::MemKv::new().conn()),
            breaker: Arc::default(),
            scripts: Scripts::shared(),
            keys,
        }
    }

    /// `redis` or `embedded`.
    pub fn kind(&self) -> &'static str {
        match self.conn {
            Conn::Redis(_) => "redis",
            Conn::Cluster(_) => "redis-cluster",
            Conn::Embedded(_) => "embedded",
        }
    }

    /// `redis://host:port` (one server) or `redis+cluster://h1:p1,h2:p2,...` (a Redis Cluster,
    /// given by any of its nodes; the rest are discovered).
    pub async fn connect(url: &str, keys: Keyspace) -> Result<Self, StoreError> {
        if let Some(nodes) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = nodes
                .split(',')
                .filter(|n| !n.is_empty())
                .map(|n| format!("redis://{n}"))
                .collect();
            let conn = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(std::time::Duration::from_secs(2))
                .response_timeout(std::time::Duration::from_secs(2))
                .retries(2)
                .build()?
                .get_async_connection()
                .await?;
            return Ok(Self {
                conn: Conn::Cluster(conn),
                breaker: Arc::default(),
                scripts: Scripts::shared(),
                keys,
            }
            .with_library()
            .await);
        }
        let client = redis::Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_millis(500))
            .set_response_timeout(std::time::Duration::from_millis(1000))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, cfg).await?;
        Ok(Self {
            conn: Conn::Redis(conn),
            breaker: Arc::default(),
            scripts: Scripts::shared(),
            keys,
        }
        .with_library()
        .await)
    }

    /// Loads the library now, so the first decisions do not all find it missing at once; if
    /// that fails (Redis not up yet), the first call loads it.
    async fn with_library(self) -> Self {
        if let Err(e) = self.load_library().await {
            tracing::warn!(error = %e, "could not load the Lua library yet; the first call will");
        }
        self
    }

    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Loads the library into the key space (every master of a cluster): at connect, and again
    /// whenever a call finds its function missing.
    pub async fn load_library(&self) -> Result<(), StoreError> {
        Ok(self.send_library(&mut self.conn.clone()).await?)
    }

    async fn send_library(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.scripts.library)
            .query_async(conn)
            .await?;
        Ok(())
    }

    async fn run(&self, op: Op, keys: &[String], args: &[String]) -> Result<Reply, StoreError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(self.scripts.function(op)).arg(keys.len());
        for k in keys {
            cmd.arg(k.as_str());
        }
        for a in args {
            cmd.arg(a.as_str());
        }
        // The engine asks the breaker (Engine::redis_down) before it comes here; a call that
        // arrives anyway (the sweeper, a cold load) simply tries.
        let mut conn = self.conn.clone();
        let mut answer = cmd.query_async::<(String, String)>(&mut conn).await;
        if matches!(&answer, Err(e) if function_missing(e)) {
            // A Redis that restarted, was flushed of functions, or a new cluster master: load
            // the library (REPLACE: other sidecars may be doing the same) and call once more.
            tracing::info!(library = %self.scripts.library_name, "loading the Lua library");
            answer = match self.send_library(&mut conn).await {
                Ok(()) => cmd.query_async::<(String, String)>(&mut conn).await,
                Err(e) => Err(e),
            };
        }
        let (kind, body) = match answer {
            Ok(r) => {
                self.breaker.success();
                r
            }
            Err(e) => {
                // A script's own error reply is Redis answering; only a failed round trip counts.
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                {
                    self.breaker.failure();
                }
                return Err(e.into());
            }
        };
        Ok(match kind.as_str() {
            "ok" => Reply::Ok(body),
            "replay" => Reply::Replay(body),
            "deny" => Reply::Deny(body),
            "cold" => Reply::Cold,
            "recheck" => Reply::Recheck,
            "conflict" => Reply::Conflict(body),
            "stale" => Reply::Stale,
            "gone" => Reply::Gone,
            "resolved" => Reply::Resolved(body),
            _ => return Err(StoreError::Reply(kind)),
        })
    }

    fn counter_keys(&self, acct: &str, lims: &[LuaLimit]) -> impl Iterator<Item = String> + '_ {
        let acct = acct.to_string();
        lims.iter()
            .map(move |l| self.keys.counter(&acct, &l.scope, &l.meter, &l.period))
            .collect::<Vec<_>>()
            .into_iter()
    }

    pub async fn authorize(&self, a: &SpendArgs<'_>) -> Result<Reply, StoreError> {
        let hold = a.hold.unwrap_or_default();
        let field = a.tomb_field();
        let (cur, prev, ttl) = self.keys.tombs(a.acct, &field, a.now, a.window_ms);
        let mut keys = vec![
            self.keys.account(a.acct),
            self.keys.outbox(self.keys.shard_of(a.acct)),
            self.keys.hold(a.acct, hold),
            self.keys.holds(self.keys.shard_of(a.acct)),
            self.keys.grant_order(a.acct),
            self.keys.grant_remaining(a.acct),
            cur,
            prev,
        ];
        keys.extend(self.counter_keys(a.acct, a.lims));
        keys.extend(self.keys.levels(a.acct));
        self.run(Op::Authorize, &keys, &a.argv(&field, ttl)).await
    }

    pub async fn consume(&self, a: &SpendArgs<'_>) -> Result<Reply, StoreError> {
        let field = a.tomb_field();
        let (cur, prev, ttl) = self.keys.tombs(a.acct, &field, a.now, a.window_ms);
        let mut keys = vec![
            self.keys.account(a.acct),
            self.keys.outbox(self.keys.shard_of(a.acct)),
            cur,
            prev,
            self.keys.grant_order(a.acct),
            self.keys.grant_remaining(a.acct),
        ];
        keys.extend(self.counter_keys(a.acct, a.lims));
        keys.extend(self.keys.levels(a.acct));
        self.run(Op::Consume, &keys, &a.argv(&field, ttl)).await
    }

    pub async fn check(&self, a: &SpendArgs<'_>) -> Result<Reply, StoreError> {
        let mut keys = vec![
            self.keys.account(a.acct),
            self.keys.grant_order(a.acct),
            self.keys.grant_remaining(a.acct),
        ];
        keys.extend(self.counter_keys(a.acct, a.lims));
        keys.extend(self.keys.levels(a.acct));
        self.run(Op::Check, &keys, &a.argv("", 0)).await
    }

    /// The keys of commit and release, and their arguments (without what each script adds).
    fn settle_call(&self, acct: &str, a: &SettleArgs<'_>) -> (Vec<String>, Vec<String>) {
        let shard = self.keys.shard_of(acct);
        let field = keys::tomb_field(a.hold);
        let (cur, prev, ttl) = self.keys.tombs(acct, &field, a.now, a.window_ms);
        let mut keys = vec![
            self.keys.account(acct),
            self.keys.outbox(shard),
            self.keys.hold(acct, a.hold),
            self.keys.holds(shard),
            self.keys.grant_order(acct),
            self.keys.grant_remaining(acct),
            cur,
            prev,
        ];
        keys.extend(self.keys.levels(acct));
        (keys, a.argv(&field, ttl))
    }

    pub async fn commit(&self, acct: &str, a: &SettleArgs<'_>) -> Result<Reply, StoreError> {
        let (keys, mut argv) = self.settle_call(acct, a);
        match a.priced {
            crate::engine::Pricing::Read => {}
            crate::engine::Pricing::Check(route, model) => {
                argv.extend(["check", route, model.unwrap_or_default()].map(String::from))
            }
            crate::engine::Pricing::ReplayOnly => argv.push("replay".into()),
        }
        self.run(Op::Commit, &keys, &argv).await
    }

    /// Raises the hold's estimate to `totals` (see `lua/extend.lua`): `credit` is what the hold
    /// costs at them (which limits may refuse is on the hold's own counter rows).
    #[allow(clippy::too_many_arguments)]
    pub async fn extend(
        &self,
        acct: &str,
        hold: &str,
        route: &str,
        model: Option<&str>,
        credit: u64,
        totals: &Meters,
        now: u64,
    ) -> Result<Reply, StoreError> {
        let mut keys = vec![
            self.keys.account(acct),
            self.keys.outbox(self.keys.shard_of(acct)),
            self.keys.hold(acct, hold),
            self.keys.grant_order(acct),
            self.keys.grant_remaining(acct),
        ];
        keys.extend(self.keys.levels(acct));
        let mut argv = vec![
            now.to_string(),
            hold.to_string(),
            route.to_string(),
            model.unwrap_or_default().to_string(),
            credit.to_string(),
            totals.len().to_string(),
        ];
        for (m, a) in totals {
            argv.push(m.clone());
            argv.push(a.to_string());
        }
        self.run(Op::Extend, &keys, &argv).await
    }

    /// `status` is `released` (a caller cancelled) or `expired` (the sweeper).
    pub async fn release(
        &self,
        acct: &str,
        a: &SettleArgs<'_>,
        status: &str,
    ) -> Result<Reply, StoreError> {
        let (keys, mut argv) = self.settle_call(acct, a);
        argv.push(status.to_string());
        self.run(Op::Release, &keys, &argv).await
    }

    /// The keys of a script that changes an account's grants: its state, its shard's outbox,
    /// its grant order and remaining amounts.
    fn grant_keys(&self, acct: &str) -> Vec<String> {
        vec![
            self.keys.account(acct),
            self.keys.outbox(self.keys.shard_of(acct)),
            self.keys.grant_order(acct),
            self.keys.grant_remaining(acct),
        ]
    }

    pub async fn grant(&self, a: &GrantArgs<'_>) -> Result<Reply, StoreError> {
        let mut keys = self.grant_keys(a.acct);
        keys.push(self.keys.idempotency(a.acct, "grant", a.gid));
        self.run(Op::Grant, &keys, &[json(a)]).await
    }

    /// Records credit that can no longer be spent: expired grants, and `revoke`d ones.
    pub async fn lapse(&self, a: &LapseArgs<'_>) -> Result<Reply, StoreError> {
        self.run(Op::Lapse, &self.grant_keys(a.acct), &[json(a)])
            .await
    }

    /// Tells every sidecar that `acct` changed: their next request for it is answered `stale`
    /// until they re-read it. A no-op when the account's state is not loaded (a load sets it).
    pub async fn set_version(&self, acct: &str, version: i64) -> Result<(), StoreError> {
        let keys = [self.keys.account(acct)];
        self.run(Op::SetVersion, &keys, &[version.to_string()])
            .await
            .map(drop)
    }

    pub async fn load(&self, acct: &str, a: &LoadArgs) -> Result<Reply, StoreError> {
        let keys = vec![
            self.keys.account(acct),
            self.keys.grant_order(acct),
            self.keys.grant_remaining(acct),
            self.keys.holds(self.keys.shard_of(acct)),
        ];
        self.run(Op::Load, &keys, &[json(a)]).await
    }
}
