//! Scripting: EVAL, EVALSHA (and their `_RO` forms), SCRIPT LOAD / EXISTS / FLUSH, and Redis
//! Functions: FUNCTION LOAD [REPLACE] / DELETE / FLUSH, FCALL, FCALL_RO.
//!
//! A function library (`#!lua name=<lib>`) runs once when loaded; the functions it registers
//! with `redis.register_function` are kept by name and called with their keys and arguments as
//! parameters. That is why the sidecar uses them: its helpers are defined once, not again on
//! every call as a script's prepended helpers are.
//!
//! Scripts are the same source text Redis would run, executed by a real Lua 5.1 interpreter
//! (the version Redis embeds) in an environment shaped like Redis 7.0's (see [`sandbox`]).
//! Compiled functions are cached by the SHA-1 of their source, as Redis caches them: EVAL
//! caches too, so a later EVALSHA finds the script; EVALSHA of an unknown script answers
//! NOSCRIPT, which makes redis-rs' `Script::invoke_async` load it and retry.
//!
//! A script runs while the caller holds the key space's lock, which is what makes it atomic.
//! For its duration the key space is lent to Lua (as app data) so `redis.call` can reach it,
//! and taken back afterwards, even if the script failed.

mod cjson;
mod convert;
mod redis_lib;
mod sandbox;
mod shim;

use crate::commands::ScriptCmd;
use crate::keyspace::Keyspace;
use crate::num::parse_i64;
use crate::reply::{Reply, NOSCRIPT};
use mlua::{Function, Lua, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What `redis.call` needs while a script runs.
pub(crate) struct ScriptCtx {
    pub ks: Keyspace,
    pub read_only: bool,
    started: Instant,
}

/// A script still running after this long is aborted. Redis would instead answer BUSY to
/// every other client until an operator intervenes; in-process, a runaway script would hang
/// the sidecar, so it fails (keeping the writes it made, as any failed script does).
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// How often (in Lua VM instructions) the time limit is checked.
const CHECK_EVERY: u32 = 100_000;

struct Compiled {
    func: Function,
    /// `#!lua flags=no-writes`.
    no_writes: bool,
}

/// A function registered by a loaded library.
struct Registered {
    callback: Function,
    /// Registered with `flags = {'no-writes'}`.
    no_writes: bool,
    library: String,
}

pub struct ScriptEngine {
    lua: Lua,
    sandbox: sandbox::Sandbox,
    cache: HashMap<String, Compiled>,
    functions: HashMap<String, Registered>,
    /// Library name -> the names of its functions.
    libraries: HashMap<String, Vec<String>>,
}

/// Gives the key space back to its owner when a script ends, however it ends.
struct Lend<'a> {
    lua: &'a Lua,
    ks: &'a mut Keyspace,
}

impl<'a> Lend<'a> {
    /// Lends the key space to Lua for one script or function call.
    fn new(lua: &'a Lua, ks: &'a mut Keyspace, read_only: bool) -> Self {
        lua.set_app_data(ScriptCtx {
            ks: std::mem::take(ks),
            read_only,
            started: Instant::now(),
        });
        Lend { lua, ks }
    }
}

impl Drop for Lend<'_> {
    fn drop(&mut self) {
        if let Some(ctx) = self.lua.remove_app_data::<ScriptCtx>() {
            *self.ks = ctx.ks;
        }
    }
}

fn sha1_hex(body: &[u8]) -> String {
    sha1_smol::Sha1::from(body).digest().to_string()
}

/// Redis 7.0's `evalExtractShebangFlags`: returns (no-writes, shebang length).
fn parse_shebang(body: &[u8]) -> Result<(bool, usize), String> {
    if !body.starts_with(b"#!") {
        return Ok((false, 0));
    }
    let Some(end) = body.iter().position(|&b| b == b'\n') else {
        return Err("Invalid script shebang".into());
    };
    let line = String::from_utf8_lossy(&body[..end]);
    let mut parts = line.split_ascii_whitespace();
    let Some(engine) = parts.next() else {
        return Err("Invalid engine in script shebang".into());
    };
    if engine != "#!lua" {
        return Err(format!("Unexpected engine in script shebang: {engine}"));
    }
    let mut no_writes = false;
    for part in parts {
        let Some(flags) = part.strip_prefix("flags=") else {
            return Err(format!("Unknown lua shebang option: {part}"));
        };
        for flag in flags.split(',').filter(|f| !f.is_empty()) {
            match flag {
                "no-writes" => no_writes = true,
                "allow-oom" | "allow-stale" | "no-cluster" | "allow-cross-slot-keys" => {}
                other => return Err(format!("Unexpected flag in script shebang: {other}")),
            }
        }
    }
    Ok((no_writes, end))
}

impl ScriptEngine {
    pub fn new() -> mlua::Result<Self> {
        let lua = Lua::new_with(
            mlua::StdLib::TABLE | mlua::StdLib::STRING | mlua::StdLib::MATH,
            mlua::LuaOptions::default(),
        )?;
        let sandbox = sandbox::build(&lua)?;
        lua.set_global_hook(
            mlua::HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            |lua, _| {
                if overdue(lua) {
                    return Err(mlua::Error::runtime(format!(
                        "script aborted after running for more than {} s",
                        TIME_LIMIT.as_secs()
                    )));
                }
                Ok(mlua::VmState::Continue)
            },
        )?;
        Ok(Self {
            lua,
            sandbox,
            cache: HashMap::new(),
            functions: HashMap::new(),
            libraries: HashMap::new(),
        })
    }

    pub fn run(&mut self, ks: &mut Keyspace, cmd: ScriptCmd, argv: &[&[u8]]) -> Reply {
        match cmd {
            ScriptCmd::Eval { sha, read_only } => self.eval(ks, argv, sha, read_only),
            ScriptCmd::Load => match self.compile(argv[2]) {
                Ok(sha) => Reply::bulk(sha),
                Err(e) => e,
            },
            ScriptCmd::Exists => Reply::Array(
                argv[2..]
                    .iter()
                    .map(|s| Reply::Int(i64::from(self.cache.contains_key(&lower(s)))))
                    .collect(),
            ),
            ScriptCmd::Flush => {
                if !flush_mode_ok(argv) {
                    return Reply::err("ERR SCRIPT FLUSH only support SYNC|ASYNC option");
                }
                self.cache.clear();
                self.lua.gc_collect().ok();
                Reply::ok()
            }
            ScriptCmd::Fcall { read_only } => self.fcall(ks, argv, read_only),
            ScriptCmd::FunctionLoad => self.function_load(argv),
            ScriptCmd::FunctionDelete => {
                let name = String::from_utf8_lossy(argv[2]).into_owned();
                match self.libraries.remove(&name) {
                    Some(fns) => {
                        for f in fns {
                            self.functions.remove(&f);
                        }
                        Reply::ok()
                    }
                    None => Reply::err("ERR Library not found"),
                }
            }
            ScriptCmd::FunctionFlush => {
                if !flush_mode_ok(argv) {
                    return Reply::err("ERR FUNCTION FLUSH only supports SYNC|ASYNC option");
                }
                self.functions.clear();
                self.libraries.clear();
                self.lua.gc_collect().ok();
                Reply::ok()
            }
        }
    }

    /// `FUNCTION LOAD [REPLACE] <code>`: runs the library's code and keeps what it registered.
    /// Nothing changes unless the whole library loads.
    fn function_load(&mut self, argv: &[&[u8]]) -> Reply {
        let (replace, code) = match argv.len() {
            3 => (false, argv[2]),
            4 if super::commands::is(argv[2], "replace") => (true, argv[3]),
            4 => {
                return Reply::Error(format!(
                    "ERR Unknown option given: {}",
                    String::from_utf8_lossy(argv[2])
                ))
            }
            _ => return Reply::err("ERR wrong number of arguments for 'function|load' command"),
        };
        let (name, skip) = match parse_library_shebang(code) {
            Ok(v) => v,
            Err(e) => return Reply::Error(format!("ERR {e}")),
        };
        if !replace && self.libraries.contains_key(&name) {
            return Reply::Error(format!("ERR Library '{name}' already exists"));
        }
        let func = match sandbox::compile(
            &self.lua,
            &self.sandbox.lib_env,
            &code[skip..],
            "@user_function",
        ) {
            Ok(f) => f,
            Err(e) => {
                let msg = match e {
                    mlua::Error::SyntaxError { message, .. } => message,
                    other => other.to_string(),
                };
                return Reply::Error(format!("ERR Error compiling function: {msg}"));
            }
        };
        let (ok, out): (bool, Value) = match self.sandbox.load_library.call(func) {
            Ok(r) => r,
            Err(e) => return Reply::Error(format!("ERR Error registering functions: {e}")),
        };
        if !ok {
            let msg = match error_reply("", &out) {
                Reply::Error(m) => m,
                _ => "ERR unknown error".into(),
            };
            return Reply::Error(format!(
                "ERR Error registering functions: {}",
                msg.trim_start_matches("ERR ")
            ));
        }
        let Value::Table(registered) = out else {
            return Reply::err("ERR No functions registered");
        };
        let mut new = Vec::new();
        for pair in registered.pairs::<String, mlua::Table>() {
            let Ok((fname, entry)) = pair else {
                return Reply::err("ERR Error registering functions");
            };
            let (Ok(callback), Ok(no_writes)) =
                (entry.raw_get::<Function>(1), entry.raw_get::<bool>(2))
            else {
                return Reply::err("ERR Error registering functions");
            };
            if let Some(other) = self.functions.get(&fname) {
                if other.library != name {
                    return Reply::Error(format!("ERR Function {fname} already exists"));
                }
            }
            new.push((fname, callback, no_writes));
        }
        if new.is_empty() {
            return Reply::err("ERR No functions registered");
        }
        if let Some(old) = self.libraries.remove(&name) {
            for f in old {
                self.functions.remove(&f);
            }
        }
        let mut names = Vec::with_capacity(new.len());
        for (fname, callback, no_writes) in new {
            names.push(fname.clone());
            self.functions.insert(
                fname,
                Registered {
                    callback,
                    no_writes,
                    library: name.clone(),
                },
            );
        }
        self.libraries.insert(name.clone(), names);
        Reply::bulk(name)
    }

    /// `FCALL <function> <numkeys> <key>... <arg>...` (and `FCALL_RO`).
    fn fcall(&mut self, ks: &mut Keyspace, argv: &[&[u8]], read_only_cmd: bool) -> Reply {
        let name = String::from_utf8_lossy(argv[1]).into_owned();
        let Some(numkeys) = parse_i64(argv[2]) else {
            return Reply::err("ERR Bad number of keys provided");
        };
        if numkeys > argv.len() as i64 - 3 {
            return Reply::err("ERR Number of keys can't be greater than number of args");
        }
        if numkeys < 0 {
            return Reply::err("ERR Number of keys can't be negative");
        }
        let Some(f) = self.functions.get(&name) else {
            return Reply::err("ERR Function not found");
        };
        if read_only_cmd && !f.no_writes {
            return Reply::err("ERR Can not execute a script with write flag using *_ro command.");
        }
        let split = 3 + numkeys as usize;
        let callback = f.callback.clone();
        let read_only = f.no_writes;
        match self.call_function(ks, callback, &argv[3..split], &argv[split..], read_only) {
            Ok((true, v)) => convert::lua_to_reply(&v),
            Ok((false, info)) => error_reply(&name, &info),
            Err(e) => Reply::Error(format!("ERR Error running script {name}, {e}")),
        }
    }

    fn call_function(
        &self,
        ks: &mut Keyspace,
        callback: Function,
        keys: &[&[u8]],
        args: &[&[u8]],
        read_only: bool,
    ) -> mlua::Result<(bool, Value)> {
        let lua = &self.lua;
        let (keys, args) = (strings(lua, keys)?, strings(lua, args)?);
        let _lend = Lend::new(lua, ks, read_only);
        self.sandbox.call_function.call((callback, keys, args))
    }

    /// Compiles and caches a script body; returns its SHA-1.
    fn compile(&mut self, body: &[u8]) -> Result<String, Reply> {
        let sha = sha1_hex(body);
        if self.cache.contains_key(&sha) {
            return Ok(sha);
        }
        let (no_writes, skip) =
            parse_shebang(body).map_err(|e| Reply::Error(format!("ERR {e}")))?;
        // The shebang line goes, its line feed stays: line numbers in errors match the source.
        let func = sandbox::compile(&self.lua, &self.sandbox.env, &body[skip..], "@user_script")
            .map_err(|e| {
                let msg = match e {
                    mlua::Error::SyntaxError { message, .. } => message,
                    other => other.to_string(),
                };
                Reply::Error(format!("ERR Error compiling script (new function): {msg}"))
            })?;
        self.cache.insert(sha.clone(), Compiled { func, no_writes });
        Ok(sha)
    }

    fn eval(
        &mut self,
        ks: &mut Keyspace,
        argv: &[&[u8]],
        by_sha: bool,
        read_only_cmd: bool,
    ) -> Reply {
        if by_sha && argv[1].len() != 40 {
            return Reply::err(NOSCRIPT);
        }
        let Some(numkeys) = parse_i64(argv[2]) else {
            return Reply::not_int();
        };
        if numkeys > argv.len() as i64 - 3 {
            return Reply::err("ERR Number of keys can't be greater than number of args");
        }
        if numkeys < 0 {
            return Reply::err("ERR Number of keys can't be negative");
        }
        let sha = if by_sha {
            lower(argv[1])
        } else {
            match self.compile(argv[1]) {
                Ok(sha) => sha,
                Err(e) => return e,
            }
        };
        let Some(script) = self.cache.get(&sha) else {
            return Reply::err(NOSCRIPT);
        };
        let split = 3 + numkeys as usize;
        let read_only = read_only_cmd || script.no_writes;
        match self.call(ks, &script.func, &argv[3..split], &argv[split..], read_only) {
            Ok((true, v)) => convert::lua_to_reply(&v),
            Ok((false, info)) => error_reply(&sha, &info),
            Err(e) => Reply::Error(format!("ERR Error running script {sha}, {e}")),
        }
    }

    fn call(
        &self,
        ks: &mut Keyspace,
        func: &Function,
        keys: &[&[u8]],
        args: &[&[u8]],
        read_only: bool,
    ) -> mlua::Result<(bool, Value)> {
        let lua = &self.lua;
        self.sandbox.globals.raw_set("KEYS", strings(lua, keys)?)?;
        self.sandbox.globals.raw_set("ARGV", strings(lua, args)?)?;
        let _lend = Lend::new(lua, ks, read_only);
        self.sandbox.runner.call(func.clone())
    }
}

/// A Lua array of the given strings (KEYS, ARGV, a function's keys and arguments).
fn strings(lua: &Lua, items: &[&[u8]]) -> mlua::Result<mlua::Table> {
    let t = lua.create_table_with_capacity(items.len(), 0)?;
    for (i, item) in items.iter().enumerate() {
        t.raw_set(i + 1, lua.create_string(item)?)?;
    }
    Ok(t)
}

/// `SCRIPT FLUSH` / `FUNCTION FLUSH` take nothing, `SYNC` or `ASYNC`.
fn flush_mode_ok(argv: &[&[u8]]) -> bool {
    argv.len() == 2
        || (argv.len() == 3
            && (super::commands::is(argv[2], "sync") || super::commands::is(argv[2], "async")))
}

/// A function library's first line, `#!lua name=<library>`: returns the name and the line's
/// length (the line feed stays, so line numbers in errors match the source).
fn parse_library_shebang(code: &[u8]) -> Result<(String, usize), String> {
    if !code.starts_with(b"#!") {
        return Err("Missing library metadata".into());
    }
    let end = code.iter().position(|&b| b == b'\n').unwrap_or(code.len());
    let line = String::from_utf8_lossy(&code[..end]);
    let mut parts = line.split_ascii_whitespace();
    match parts.next() {
        Some("#!lua") => {}
        Some(other) => {
            return Err(format!(
                "Engine '{}' not found",
                other.trim_start_matches("#!")
            ))
        }
        None => return Err("Invalid metadata value, engine not found".into()),
    }
    let mut name = None;
    for part in parts {
        match part.strip_prefix("name=") {
            Some(n) => name = Some(n.to_string()),
            None => return Err(format!("Invalid metadata value given: {part}")),
        }
    }
    let Some(name) = name else {
        return Err("Library name was not given".into());
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(
            "Library names can only contain letters, numbers, or underscores(_) and must be at least one character long"
                .into(),
        );
    }
    Ok((name, end))
}

/// Whether the running script has passed its time limit.
fn overdue(lua: &Lua) -> bool {
    lua.try_app_data_ref::<ScriptCtx>()
        .ok()
        .flatten()
        .is_some_and(|ctx| ctx.started.elapsed() > TIME_LIMIT)
}

fn lower(sha: &[u8]) -> String {
    String::from_utf8_lossy(sha).to_ascii_lowercase()
}

/// The error reply for a failed script, from the handler's `{err, source, line}`.
fn error_reply(sha: &str, info: &Value) -> Reply {
    let Value::Table(t) = info else {
        let msg = match info {
            Value::String(s) => String::from_utf8_lossy(&s.as_bytes()).into_owned(),
            _ => "execution failure".into(),
        };
        return Reply::Error(format!("ERR Error running script {sha}, {msg}"));
    };
    let get = |k: &str| -> Option<String> {
        match t.raw_get::<Value>(k).ok()? {
            Value::String(s) => Some(String::from_utf8_lossy(&s.as_bytes()).into_owned()),
            Value::Integer(i) => Some(i.to_string()),
            Value::Number(n) => Some(crate::num::fmt_g(n, 14)),
            _ => None,
        }
    };
    // Redis 7.0.15 crashes on an error table without a message (`error({})`); answer instead.
    let msg = get("err").unwrap_or_else(|| "ERR unknown error".into());
    match (get("source"), get("line")) {
        (Some(source), Some(line)) => {
            Reply::Error(format!("{msg} script: {sha}, on {source}:{line}."))
        }
        _ => Reply::Error(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_shebang;

    #[test]
    fn shebangs() {
        assert_eq!(parse_shebang(b"return 1"), Ok((false, 0)));
        assert_eq!(parse_shebang(b"#!lua\nreturn 1"), Ok((false, 5)));
        assert_eq!(
            parse_shebang(b"#!lua flags=no-writes,allow-oom\n"),
            Ok((true, 31))
        );
        assert!(parse_shebang(b"#!lua").is_err());
        assert!(parse_shebang(b"#!python\n").is_err());
        assert!(parse_shebang(b"#!lua flags=bogus\n").is_err());
        assert!(parse_shebang(b"#!lua name=x\n").is_err());
    }
}
