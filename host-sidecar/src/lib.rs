//! Tollgate sidecar: decides atomically in Redis (one Lua script per operation) whether a caller
//! may spend, and keeps PostgreSQL as the durable ledger. With neither configured it runs the
//! same scripts in an embedded key space and keeps the ledger in SQLite.
//!
//! Layout, from the request inwards:
//! - [`api`]: HTTP routes (axum) and their error bodies ([`error`]).
//! - [`engine`]: resolves callers, prices usage, computes windows, runs scripts, handles cold loads.
//! - [`store`]: Redis key names, the Lua scripts from `lua/`, their replies.
//! - [`ledger`]: PostgreSQL — directory of accounts and keys, the ledger, and the sync worker that
//!   drains the outbox streams into it exactly once.
//! - [`config`], [`windows`], [`clock`], [`apikey`], [`directory`], [`metrics`]: the supporting facts.

pub mod api;
pub mod api_batch;
pub mod api_billing;
pub mod apikey;
pub mod clock;
pub mod config;
pub mod directory;
pub mod engine;
pub mod error;
pub(crate) mod handler;
pub mod ledger;
pub mod metrics;
pub mod store;
pub mod tokens;
pub mod webhooks;
pub mod windows;

use clock::Clock;
use config::Config;
use engine::Engine;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Connects to Redis and PostgreSQL (running migrations), or opens the embedded store and
/// SQLite ledger where no URL is given, and builds the engine.
pub async fn build_engine(cfg: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Arc<Engine>> {
    let (store, ledger) = open_backends(&cfg).await?;
    let engine = engine_on(cfg, clock, store, ledger)?;
    engine
        .load_plans()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the plans written through the API: {e}"))?;
    Ok(engine)
}

/// The store and the ledger `cfg` names.
pub async fn open_backends(cfg: &Config) -> anyhow::Result<(store::Store, ledger::Ledger)> {
    let keys = store::keys::Keyspace::new(&cfg.redis.key_prefix, cfg.server.shards);
    let store = match &cfg.redis.url {
        Some(url) => {
            let r = store::Store::connect(url, keys)
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to Redis at {url}: {e}"))?;
            warn_unless_noeviction(&r).await;
            r
        }
        None => {
            tracing::info!("no Redis URL: using the embedded in-process store (single node)");
            store::Store::embedded(keys)
        }
    };
    let ledger_url = match &cfg.postgres.url {
        Some(url) => url.clone(),
        None => {
            tracing::info!(path = %cfg.postgres.sqlite_path, "no PostgreSQL URL: using the embedded SQLite ledger");
            format!("sqlite://{}", cfg.postgres.sqlite_path)
        }
    };
    let ledger = ledger::Ledger::connect(
        &ledger_url,
        cfg.postgres.max_connections,
        &cfg.redis.key_prefix,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot open the ledger database: {e}"))?;
    Ok((store, ledger))
}

/// An engine on a store and ledger that are already open (several engines may share them, as
/// several sidecars share one Redis and one PostgreSQL).
pub fn engine_on(
    cfg: Config,
    clock: Arc<dyn Clock>,
    store: store::Store,
    ledger: ledger::Ledger,
) -> anyhow::Result<Arc<Engine>> {
    let cfg = Arc::new(cfg);
    let plans = engine::plans_from_config(&cfg.plans);
    let windows = cfg.window_settings()?;
    let degraded_slots = Arc::new(tokio::sync::Semaphore::new(cfg.degraded_slots() as usize));
    let metrics = Arc::new(metrics::Metrics::default());
    let sync = ledger::sync::SyncWorker::new(
        ledger.clone(),
        store.clone(),
        cfg.sync.batch,
        metrics.clone(),
        clock.clone(),
    );
    let directory = directory::Directory::new(
        ledger.clone(),
        Duration::from_millis(cfg.server.account_cache_ttl_ms),
        cfg.server.key_pepper.clone().unwrap_or_default(),
    );
    Ok(Arc::new(Engine {
        cfg,
        windows,
        store,
        ledger,
        sync,
        directory,
        clock,
        metrics,
        sync_wake: Arc::new(tokio::sync::Notify::new()),
        // After a restart the ledger may list changes made while Redis was down: check once.
        handback_pending: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        handback_lock: Arc::default(),
        degraded_slots,
        alerts: Arc::default(),
        included_done: Arc::new(engine::Remembered::new(1_000_000)),
        plans,
    }))
}

/// Redis is the real-time truth: if it evicts keys under memory pressure, usage is forgotten.
async fn warn_unless_noeviction(redis: &store::Store) {
    let mut conn = redis.conn();
    let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut conn)
        .await;
    match policy {
        Ok(v) if v.get(1).map(String::as_str) == Some("noeviction") => {}
        Ok(v) => tracing::warn!(
            policy = v.get(1).map(String::as_str).unwrap_or("?"),
            "Redis maxmemory-policy must be noeviction: an evicted counter or grant would be forgotten"
        ),
        Err(_) => tracing::warn!("cannot read Redis maxmemory-policy; make sure it is noeviction"),
    }
}

/// Starts the ledger sync worker, the hold sweeper and the billing scheduler (included credits,
/// credit expiry, alert delivery retries).
pub fn spawn_background(engine: &Arc<Engine>) -> Vec<JoinHandle<()>> {
    let mut sync = engine.sync.clone();
    sync.min_gap = Duration::from_millis(engine.cfg.sync.min_gap_ms);
    let wake = engine.sync_wake.clone();
    let interval = Duration::from_millis(engine.cfg.sync.interval_ms);
    let sweeper = {
        let e = engine.clone();
        let every = Duration::from_millis(e.cfg.server.sweep_interval_ms);
        async move {
            loop {
                tokio::time::sleep(every).await;
                // Other sidecars may have decided from PostgreSQL while Redis was down.
                e.handback_pending
                    .store(true, std::sync::atomic::Ordering::Release);
                if let Err(err) = e.hand_back().await {
                    tracing::warn!(error = %err, "hand-back to Redis failed; will retry");
                }
                if let Err(err) = e.sweep_once().await {
                    tracing::warn!(error = %err, "hold sweep failed; will retry");
                }
            }
        }
    };
    let scheduler = {
        let e = engine.clone();
        let every = Duration::from_millis(e.cfg.billing.schedule_interval_ms);
        async move {
            tokio::time::sleep(Duration::from_secs(1).min(every)).await;
            loop {
                e.billing_tick().await;
                tokio::time::sleep(every).await;
            }
        }
    };
    vec![
        tokio::spawn(sync.run(interval, wake, engine.cfg.sync.backlog_alert)),
        tokio::spawn(sweeper),
        tokio::spawn(scheduler),
    ]
}

/// Serves the HTTP API on `listener` until the future is dropped. The tokenizers are built on
/// the blocking pool meanwhile; `/readyz` answers 503 until they are.
pub async fn serve(engine: Arc<Engine>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    if !tokens::loaded() {
        drop(tokio::task::spawn_blocking(tokens::preload));
    }
    // Decisions are small frames on one long-lived HTTP/2 connection per Envoy worker: without
    // TCP_NODELAY, Nagle's algorithm and the peer's delayed ACK hold answers back by up to 40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, api::router(engine)).await
}

/// Serves the billing-provider webhooks ([`api_billing::webhook_router`]: `/webhooks/stripe`,
/// `/webhooks/revenuecat`, `/healthz`) on `listener` until the future is dropped. With
/// `server.webhook_listen` set, the sidecar runs this beside [`serve`], and [`serve`] no longer
/// answers the webhooks.
pub async fn serve_webhooks(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    // The same guards as the main listener's (request timeout, concurrency limit).
    let guards = api::guards(&engine.cfg.server);
    axum::serve(listener, api_billing::webhook_router(engine).layer(guards)).await
}
