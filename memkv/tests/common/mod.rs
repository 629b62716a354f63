//! Differential harness: the same command against the real Redis at 127.0.0.1:6379 and against
//! a `MemKv`, with the replies compared as redis-rs sees them (values, or error kind + code +
//! detail). Keys live under a unique `tgt_memkv_<random>:` prefix, deleted when the pair drops
//! (even after a failed assertion).
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use redis::{Cmd, RedisResult, Value};
use tollgate_memkv::{MemConn, MemKv};

pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A command from string arguments.
pub fn c(args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd
}

/// What a call gave, comparable across the two stores.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok(Value),
    Err {
        kind: String,
        code: Option<String>,
        detail: Option<String>,
    },
}

impl Outcome {
    pub fn of(r: RedisResult<Value>) -> Self {
        match r {
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::Err {
                kind: format!("{:?}", e.kind()),
                code: e.code().map(str::to_string),
                detail: e.detail().map(str::to_string),
            },
        }
    }

    pub fn value(&self) -> &Value {
        match self {
            Outcome::Ok(v) => v,
            Outcome::Err { .. } => panic!("expected a value, got {self:?}"),
        }
    }

    pub fn is_err(&self) -> bool {
        matches!(self, Outcome::Err { .. })
    }
}

pub fn describe(cmd: &Cmd) -> String {
    cmd.args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Arg::Cursor => "<cursor>".into(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A random-enough id for key prefixes (time, pid and a counter; no extra crates).
pub fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{}",
        t,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct Pair {
    pub real: MultiplexedConnection,
    pub kv: MemKv,
    pub mem: MemConn,
    pub prefix: String,
    /// Commands compared so far.
    pub compared: usize,
}

impl Pair {
    pub async fn new() -> Self {
        let client = redis::Client::open(REDIS_URL).expect("redis url");
        let real = client
            .get_multiplexed_async_connection()
            .await
            .expect("these tests need Redis on 127.0.0.1:6379 (`./tg test` starts one)");
        let kv = MemKv::new();
        let mem = kv.conn();
        Self {
            real,
            kv,
            mem,
            prefix: format!("tgt_memkv_{}:", unique_id()),
            compared: 0,
        }
    }

    /// A key under this pair's prefix.
    pub fn k(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    pub async fn real(&mut self, cmd: &Cmd) -> Outcome {
        Outcome::of(cmd.query_async::<Value>(&mut self.real).await)
    }

    pub async fn mem(&mut self, cmd: &Cmd) -> Outcome {
        Outcome::of(cmd.query_async::<Value>(&mut self.mem).await)
    }

    pub async fn both(&mut self, cmd: &Cmd) -> (Outcome, Outcome) {
        let r = self.real(cmd).await;
        let m = self.mem(cmd).await;
        self.compared += 1;
        (r, m)
    }

    /// Runs on both and asserts identical outcomes; returns the outcome.
    pub async fn same(&mut self, cmd: &Cmd) -> Outcome {
        let (r, m) = self.both(cmd).await;
        assert_eq!(
            m,
            r,
            "memkv (left) and Redis (right) differ on: {}",
            describe(cmd)
        );
        r
    }

    /// `same` for a command given as strings.
    pub async fn s(&mut self, args: &[&str]) -> Outcome {
        self.same(&c(args)).await
    }

    /// EVAL of `script` with keys (prefixed here) and args, compared.
    pub async fn eval(&mut self, script: &str, keys: &[&str], args: &[&str]) -> Outcome {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len());
        for k in keys {
            cmd.arg(self.k(k));
        }
        for a in args {
            cmd.arg(*a);
        }
        self.same(&cmd).await
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Synchronous, so it also runs while a failed assertion unwinds.
        let Ok(client) = redis::Client::open(REDIS_URL) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}
