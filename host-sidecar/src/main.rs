//! `tollgate-sidecar [--config FILE]`: runs the API, the ledger sync worker and the hold sweeper.

/// glibc's allocator spent about a third of the sidecar's CPU in malloc/free under load
/// (perf); mimalloc's thread-local heaps avoid that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use tollgate_sidecar::clock::SystemClock;
use tollgate_sidecar::config::Config;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = run().await {
        eprintln!("tollgate-sidecar: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var("TOLLGATE_CONFIG").map(PathBuf::from).ok();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => path = args.next().map(PathBuf::from),
            "--help" | "-h" => {
                println!("usage: tollgate-sidecar [--config FILE]   (or TOLLGATE_CONFIG=FILE)");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let path = path.unwrap_or_else(|| PathBuf::from("host-sidecar/tollgate.toml"));
    let cfg = Config::from_file(&path)?;
    if cfg.server.admin_token.is_none() {
        tracing::warn!(
            "no admin token set (TOLLGATE_ADMIN_TOKEN): the admin API refuses every call"
        );
    }
    let listen = cfg.server.listen.clone();
    let webhook_listen = cfg.server.webhook_listen.clone();
    let engine = tollgate_sidecar::build_engine(cfg, Arc::new(SystemClock)).await?;
    let _tasks = tollgate_sidecar::spawn_background(&engine);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    // The webhooks on a listener of their own, when configured (and then only there).
    let webhooks = match &webhook_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot bind server.webhook_listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let serve_webhooks = async {
        match webhooks {
            Some(l) => tollgate_sidecar::serve_webhooks(engine.clone(), l).await,
            None => std::future::pending().await,
        }
    };
    tracing::info!(
        %listen,
        webhook_listen = webhook_listen.as_deref().unwrap_or("(on listen)"),
        config = %path.display(),
        store = engine.store.kind(),
        ledger = engine.ledger.kind(),
        "tollgate sidecar ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tollgate_sidecar::serve(engine.clone(), listener) => r?,
        r = serve_webhooks => r?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
        _ = term.recv() => tracing::info!("terminated: shutting down"),
    }
    // Whatever the store holds that the ledger does not yet have goes there now: with the
    // embedded store this is the difference between a clean stop and losing the sync lag.
    match engine.sync.sync_all().await {
        Ok(n) => tracing::info!(events = n, "ledger synced"),
        Err(e) => tracing::warn!(error = %e, "final ledger sync failed"),
    }
    engine.ledger.close().await;
    Ok(())
}
