//! The Lua of `lua/` as one Redis Functions library, loaded once per Redis server (each master
//! of a cluster; the embedded store too) and called with FCALL.
//!
//! Why a library and not EVALSHA: a script is a fresh chunk on every call, so the ~450 lines
//! of shared helpers (`lua/lib.lua`) prepended to each script were defined again on every
//! decision — measured here, ~2.5–5 µs of Redis time per call, a tenth of a decision script.
//! A library runs its code once, at `FUNCTION LOAD`; its functions close over the helpers.
//!
//! The library: `lua/lib.lua` first, behind two library locals, `KEYS` and `ARGV`, which each
//! function sets from its parameters before it runs its operation's body (so the helpers and
//! the operation files read them exactly as they did as scripts); then each file of `lua/`
//! as a local function, registered as `tg_<version>_<operation>`. The version is a hash of
//! the library's text: sidecars of two releases can share one Redis during a rolling upgrade,
//! each calling its own functions. A Redis that lost its functions (a restart without
//! persistence, `FUNCTION FLUSH`) answers "Function not found"; the store then loads the
//! library again and retries the call (see `Store::run`).

use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};

const LIB: &str = include_str!("../../../lua/lib.lua");

/// The globals the Lua uses, as library locals: a function's global reads go through a
/// metatable to Redis's globals (two lookups each), and made FCALL slower than EVALSHA
/// (measured: 53–57 µs against 45–48 µs per decision) until they were locals. They are taken
/// at the first call, not at load: while a library loads, Redis gives it only `redis` (another
/// one, with `register_function` and without `call`), none of the others.
const GLOBALS: &str = "local register_function = redis.register_function\n\
    local function run_globals()\n\
    return redis, cjson, tonumber, tostring, type, ipairs, pairs, unpack, string, table, math, \
    setmetatable, getmetatable\n\
    end\n\
    local redis, cjson, tonumber, tostring, type, ipairs, pairs, unpack, string, table, math, \
    setmetatable, getmetatable\n";

/// What each function does first (see [`GLOBALS`]).
const BIND: &str = "if cjson == nil then\n    \
    redis, cjson, tonumber, tostring, type, ipairs, pairs, unpack, string, table, math, \
    setmetatable, getmetatable = run_globals()\n  \
    end";

/// The operations, each one function of the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Authorize,
    Check,
    Consume,
    Commit,
    Release,
    Grant,
    Load,
    Lapse,
    /// Sets an account's version (see `account_state` in lib.lua) if its state is loaded.
    SetVersion,
    Extend,
}

impl Op {
    const ALL: [Op; 10] = [
        Op::Authorize,
        Op::Check,
        Op::Consume,
        Op::Commit,
        Op::Release,
        Op::Grant,
        Op::Load,
        Op::Lapse,
        Op::SetVersion,
        Op::Extend,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Authorize => "authorize",
            Op::Check => "check",
            Op::Consume => "consume",
            Op::Commit => "commit",
            Op::Release => "release",
            Op::Grant => "grant",
            Op::Load => "load",
            Op::Lapse => "lapse",
            Op::SetVersion => "set_version",
            Op::Extend => "extend",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Op::Authorize => include_str!("../../../lua/authorize.lua"),
            Op::Check => include_str!("../../../lua/check.lua"),
            Op::Consume => include_str!("../../../lua/consume.lua"),
            Op::Commit => include_str!("../../../lua/commit.lua"),
            Op::Release => include_str!("../../../lua/release.lua"),
            Op::Grant => include_str!("../../../lua/grant.lua"),
            Op::Load => include_str!("../../../lua/load.lua"),
            Op::Lapse => include_str!("../../../lua/lapse.lua"),
            Op::Extend => include_str!("../../../lua/extend.lua"),
            Op::SetVersion => {
                "if redis.call('EXISTS', KEYS[1]) == 1 then\n\
                   local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0\n\
                   if tonumber(ARGV[1]) > v then redis.call('HSET', KEYS[1], 'v', ARGV[1]) end\n\
                 end\n\
                 return {'ok', ''}\n"
            }
        }
    }
}

/// The library's source, its name and its functions' names.
pub struct Scripts {
    /// `FUNCTION LOAD REPLACE` text.
    pub library: String,
    /// `tollgate_<version>`.
    pub library_name: String,
    names: [String; 10],
}

/// A file's `#!lua flags=...` line: whether it asks for `no-writes`, and the body after it
/// (its line feed kept, so line numbers in errors stay the file's).
fn split_shebang(body: &str) -> (bool, &str) {
    match body.strip_prefix("#!") {
        Some(rest) => {
            let (line, _) = rest.split_once('\n').unwrap_or((rest, ""));
            let no_writes = line
                .split_ascii_whitespace()
                .filter_map(|p| p.strip_prefix("flags="))
                .any(|flags| flags.split(',').any(|f| f == "no-writes"));
            (no_writes, &body[2 + line.len()..])
        }
        None => (false, body),
    }
}

impl Scripts {
    pub fn new() -> Self {
        // The operations as local functions after the helpers; the version is a hash of that.
        let mut code = String::with_capacity(LIB.len() + 16 * 1024);
        code.push_str("local KEYS, ARGV\n");
        // The globals the Lua uses, as library locals: a library's globals table is empty and
        // reaches Redis's through a metatable, so every global read in a function took two
        // lookups (measured: FCALL 53–57 µs against EVALSHA's 45–48 µs per decision until
        // these were locals).
        code.push_str(GLOBALS);
        code.push_str(LIB);
        for op in Op::ALL {
            let (_, body) = split_shebang(op.body());
            code.push_str(&format!("\nlocal function op_{}()\n", op.name()));
            code.push_str(body);
            code.push_str("\nend\n");
        }
        let version = hex::encode(&Sha256::digest(code.as_bytes())[..6]);
        let library_name = format!("tollgate_{version}");
        let names = Op::ALL.map(|op| format!("tg_{version}_{}", op.name()));
        let mut library = format!("#!lua name={library_name}\n{code}");
        for (op, name) in Op::ALL.iter().zip(&names) {
            let (no_writes, _) = split_shebang(op.body());
            let flags = if no_writes {
                ", flags = {'no-writes'}"
            } else {
                ""
            };
            library.push_str(&format!(
                "register_function{{function_name = '{name}', callback = function(keys, args)\n  \
                 KEYS, ARGV = keys, args\n  \
                 {BIND}\n  return op_{}()\nend{flags}}}\n",
                op.name()
            ));
        }
        Self {
            library,
            library_name,
            names,
        }
    }

    /// The one library of this build (every store shares it: it is ~30 KB of text).
    pub fn shared() -> Arc<Self> {
        static SHARED: OnceLock<Arc<Scripts>> = OnceLock::new();
        SHARED.get_or_init(|| Arc::new(Self::new())).clone()
    }

    /// The FCALL name of an operation.
    pub fn function(&self, op: Op) -> &str {
        let i = Op::ALL.iter().position(|o| *o == op).unwrap_or(0);
        &self.names[i]
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_names_every_operation_once_and_keeps_check_read_only() {
        let s = Scripts::new();
        assert!(s
            .library
            .starts_with(&format!("#!lua name={}\n", s.library_name)));
        for op in Op::ALL {
            let name = s.function(op);
            assert!(
                name.starts_with("tg_") && name.ends_with(op.name()),
                "{name}"
            );
            assert_eq!(s.library.matches(&format!("'{name}'")).count(), 1, "{name}");
        }
        let check = s.function(Op::Check);
        let line = s
            .library
            .lines()
            .find(|l| l.contains(&format!("'{check}'")))
            .unwrap_or_default();
        assert!(line.contains("function_name"), "{line}");
        assert!(s.library.contains("end, flags = {'no-writes'}}"));
        // No file's shebang is left inside the library (only its first line is one).
        assert_eq!(s.library.matches("#!lua").count(), 1);
    }

    #[test]
    fn shebangs_are_read_and_removed() {
        assert_eq!(split_shebang("return 1"), (false, "return 1"));
        assert_eq!(
            split_shebang("#!lua flags=no-writes\nreturn 1"),
            (true, "\nreturn 1")
        );
        assert_eq!(
            split_shebang("#!lua flags=allow-oom\nreturn 1"),
            (false, "\nreturn 1")
        );
    }
}
