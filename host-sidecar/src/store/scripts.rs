//! The Lua scripts from `lua/`, each with the shared helpers (`lua/lib.lua`) prepended, loaded
//! once and run with EVALSHA (redis-rs falls back to EVAL after a NOSCRIPT, e.g. after a restart).

use redis::Script;

const LIB: &str = include_str!("../../../lua/lib.lua");

pub struct Scripts {
    pub authorize: Script,
    pub check: Script,
    pub consume: Script,
    pub commit: Script,
    pub release: Script,
    pub grant: Script,
    pub load: Script,
    pub lapse: Script,
    /// Sets an account's version (see `account_state` in lib.lua) if its state is loaded.
    pub set_version: Script,
}

/// Prepends the helpers, keeping a `#!lua flags=...` line first where a script has one.
fn with_lib(body: &str) -> Script {
    let source = match body.strip_prefix("#!") {
        Some(rest) => {
            let (shebang, rest) = rest.split_once('\n').unwrap_or((rest, ""));
            format!("#!{shebang}\n{LIB}\n{rest}")
        }
        None => format!("{LIB}\n{body}"),
    };
    Script::new(&source)
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            authorize: with_lib(include_str!("../../../lua/authorize.lua")),
            check: with_lib(include_str!("../../../lua/check.lua")),
            consume: with_lib(include_str!("../../../lua/consume.lua")),
            commit: with_lib(include_str!("../../../lua/commit.lua")),
            release: with_lib(include_str!("../../../lua/release.lua")),
            grant: with_lib(include_str!("../../../lua/grant.lua")),
            load: with_lib(include_str!("../../../lua/load.lua")),
            lapse: with_lib(include_str!("../../../lua/lapse.lua")),
            set_version: Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 then \
                   local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0 \
                   if tonumber(ARGV[1]) > v then redis.call('HSET', KEYS[1], 'v', ARGV[1]) end \
                 end return {'ok', ''}",
            ),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
