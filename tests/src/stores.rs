//! The store an end-to-end test's sidecar runs on, and a sidecar configuration of its own: a
//! private key prefix and database (Redis + PostgreSQL), or a private SQLite file (embedded), so
//! parallel tests and runs never collide.

use tollgate_sidecar::config::Config;

/// The decision token the end-to-end sidecars require and their filters send.
pub const DECISION_TOKEN: &str = "e2e-decision-token-xxxx";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    RedisPostgres,
    Embedded,
}

/// `toml` on its own key prefix and database `run` (or SQLite file), with an admin token.
pub fn sidecar_config(toml: &str, backend: Backend, run: &str) -> Config {
    let mut cfg = Config::from_toml(toml).expect("a valid test configuration");
    cfg.redis.key_prefix = run.to_string();
    match backend {
        Backend::RedisPostgres => {
            cfg.redis.url = Some(
                std::env::var("TOLLGATE_TEST_REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            );
            cfg.postgres.url = Some(format!(
                "{}/{run}",
                std::env::var("TOLLGATE_TEST_DATABASE_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
            ));
        }
        Backend::Embedded => {
            cfg.postgres.sqlite_path = std::env::temp_dir()
                .join(format!("{run}.sqlite"))
                .to_string_lossy()
                .into_owned();
        }
    }
    cfg.server.admin_token = Some("e2e-admin-token-xxxx".into());
    cfg.server.decision_token = Some(DECISION_TOKEN.into());
    cfg
}

/// Removes an embedded ledger's files.
pub fn remove_sqlite(cfg: &Config) {
    if cfg.postgres.url.is_none() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", cfg.postgres.sqlite_path));
        }
    }
}
