//! An in-process, Redis-compatible key space that runs Redis Lua scripts: Tollgate's
//! "embedded store", for a sidecar that has no Redis server.
//!
//! Why: the sidecar's quota logic lives in Lua (a Redis Functions library called with FCALL),
//! plus a few plain commands (hashes, sorted sets, a stream outbox). Rather than maintain a second
//! implementation of that logic, the embedded store runs the *same* scripts in a real Lua 5.1
//! interpreter (the version Redis embeds) against a key space with Redis 7.0's semantics, and
//! [`MemConn`] is a `redis::aio::ConnectionLike`, so the sidecar's redis-rs code
//! (`conn.hget(..)`, `redis::cmd(..).query_async(&mut conn)`,
//! `Script::invoke_async(&mut conn)`) runs unchanged against it.
//!
//! Atomicity: one mutex covers the key space and the Lua state; every command and every
//! script runs entirely while holding it, as Redis runs one thing at a time. Nothing is awaited
//! under the lock: a reply is computed synchronously and handed back as a ready future.
//!
//! Replies are what a real RESP2 connection gives: error replies arrive as
//! `Value::ServerError`, parsed from the same `-CODE message` line Redis sends, so callers get
//! the same `RedisError` (kind `ResponseError` for `ERR`, `NoScriptError` for `NOSCRIPT`, an
//! extension error with code `WRONGTYPE` for type errors, ...).
//!
//! Commands: GET, MGET, SET (NX, XX, GET, EX, PX, EXAT, PXAT, KEEPTTL), SETNX, INCRBY, INCR, DECR,
//! DECRBY, DEL, EXISTS, PEXPIRE, EXPIRE (NX, XX, GT, LT), PTTL, TTL; HGET, HMGET, HSET, HDEL,
//! HINCRBY, HGETALL, HLEN, HEXISTS; ZADD (NX, XX, GT, LT, CH, INCR), ZREM, ZRANGE (by rank or
//! BYSCORE, REV, LIMIT, WITHSCORES), ZRANGEBYSCORE, ZREMRANGEBYSCORE, ZCARD, ZSCORE; XADD (NOMKSTREAM, MAXLEN,
//! MINID), XRANGE, XREVRANGE, XTRIM, XLEN, XDEL; PING, FLUSHALL, FLUSHDB, DBSIZE, KEYS, TYPE,
//! CONFIG GET, INFO, TIME; EVAL, EVALSHA, EVAL_RO, EVALSHA_RO, SCRIPT LOAD / EXISTS / FLUSH;
//! FUNCTION LOAD [REPLACE] / DELETE / FLUSH, FCALL, FCALL_RO (Redis Functions: the sidecar's
//! scripts are one library).
//! Pipelines run in order; atomic pipelines (MULTI/EXEC) run under one lock.
//!
//! Where it differs from Redis 7.0 (everything else is checked reply for reply against a real
//! Redis by the tests in `tests/`):
//! - KEYS answers sorted (Redis: hash-table order); HGETALL answers in insertion order, which
//!   is Redis' order only for hashes it keeps as listpacks (≤ 128 fields of ≤ 64 bytes).
//! - Stream trimming with `~` trims exactly (Redis may keep a few more entries).
//! - ZRANGE BYLEX, CONFIG SET/HELP, SCRIPT KILL, MULTI/EXEC sent as separate commands, and any
//!   command not listed above answer an error.
//! - Lua: no `bit`, `struct` or `cmsgpack` libraries, no cjson configuration functions;
//!   `math.random` is Lua's own; `redis.setresp(3)` is refused (RESP2 only); `redis.log` and
//!   `redis.set_repl` are validated and ignored; `getmetatable` of a protected table (such as
//!   `_G`) is false.
//! - A script running over 5 s is aborted with an error (Redis would answer BUSY to everyone
//!   until SCRIPT KILL); an error table without a message (`error({})`) answers
//!   `ERR unknown error` (Redis 7.0.15 crashes).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use redis::AsyncCommands;
//! let kv = tollgate_memkv::MemKv::new();
//! let mut conn = kv.conn();
//! let _: () = conn.hset("h", "f", 7).await.unwrap();
//! let n: i64 = redis::Script::new("return redis.call('HINCRBY', KEYS[1], 'f', ARGV[1])")
//!     .key("h")
//!     .arg(3)
//!     .invoke_async(&mut conn)
//!     .await
//!     .unwrap();
//! assert_eq!(n, 10);
//! # });
//! ```

mod commands;
mod glob;
mod keyspace;
mod num;
mod reply;
mod script;
mod state;
mod types;

use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use state::State;
use std::sync::{Arc, Mutex, MutexGuard};

/// The key space. Cheap to clone: clones share the same data.
#[derive(Clone)]
pub struct MemKv {
    inner: Arc<Mutex<State>>,
}

impl Default for MemKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemKv {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(State::new())),
        }
    }

    /// A connection to this key space.
    pub fn conn(&self) -> MemConn {
        MemConn {
            inner: self.inner.clone(),
        }
    }

    /// Keys stored, after removing the ones whose time is past.
    pub fn dbsize(&self) -> usize {
        let mut state = lock(&self.inner);
        state.ks.begin(keyspace::unix_ms());
        state.ks.len()
    }
}

/// A connection to a [`MemKv`]. Clones share the key space.
#[derive(Clone)]
pub struct MemConn {
    inner: Arc<Mutex<State>>,
}

/// The state, even if a previous holder panicked (each command leaves it consistent).
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A command's arguments as byte slices (a cursor argument counts as cursor 0).
fn args(cmd: &Cmd) -> Vec<&[u8]> {
    cmd.args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b,
            redis::Arg::Cursor => b"0".as_slice(),
        })
        .collect()
}

impl MemConn {
    fn run(&self, cmd: &Cmd) -> Value {
        let argv = args(cmd);
        lock(&self.inner).exec(&argv).into_value()
    }

    /// Runs a pipeline and answers like redis-rs' multiplexed connection: the `count` replies
    /// from `offset`, or, for a transaction, the first error among the skipped replies
    /// (a command rejected while queuing).
    fn run_pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let cmds: Vec<Vec<&[u8]>> = pipeline.cmd_iter().map(args).collect();
        let replies = {
            let mut state = lock(&self.inner);
            if pipeline.is_transaction() {
                state.exec_transaction(&cmds)
            } else {
                cmds.iter().map(|argv| state.exec(argv)).collect()
            }
        };
        let mut values = replies.into_iter().map(reply::Reply::into_value);
        if pipeline.is_transaction() {
            for skipped in values.by_ref().take(offset) {
                skipped.extract_error()?;
            }
        } else {
            values.by_ref().take(offset).for_each(drop);
        }
        Ok(values.take(count).collect())
    }
}

impl redis::aio::ConnectionLike for MemConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let value = self.run(cmd);
        Box::pin(std::future::ready(Ok(value)))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let values = self.run_pipeline(pipeline, offset, count);
        Box::pin(std::future::ready(values))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<MemKv>();
        assert_send_sync::<MemConn>();
    }
}
