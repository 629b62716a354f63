//! The Lua environment scripts run in, shaped like Redis 7.0's.
//!
//! - Globals: the base functions Redis keeps (no `print`, `dofile`, `require`, `setfenv`,
//!   `getfenv`, `newproxy`, `module`), `coroutine`, `string`, `table`, `math`, `redis`, `cjson`,
//!   and `KEYS` / `ARGV` set before each call. No `io`, `os`, `debug` or `package`: scripts
//!   cannot reach files, the process or the interpreter's internals.
//! - Protection, as in Redis 7: reading an undefined global raises "Script attempted to access
//!   nonexistent global variable 'x'", and assigning a global or a field of a library table
//!   raises "Attempt to modify a readonly table". Library tables are empty proxies whose
//!   `__index` is the real table, so one script cannot change what the next one sees.
//! - `pcall` unwraps error tables (`{err = ...}`) into their message, as Redis 7 does;
//!   `loadstring`/`load` compile text only, into the same protected environment.
//! - Errors: scripts run under `xpcall` with a handler that, like Redis' `__redis__err__handler`,
//!   turns the error into `{err = "ERR ...", source, line}` with the position of the script
//!   code that raised it, which the engine formats as `... script: <sha>, on @user_script:N.`.

use super::convert::{to_lua_string, type_name};
use super::shim::{self, RAISE};
use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaString, MultiValue, Table, Value};

/// The chunk name of the environment's own Lua code; its frames are skipped when reporting an
/// error's position.
const INTERNAL: &str = "=memkv";

const BOOTSTRAP: &str = r#"
local base, helpers = ...
local redis, cjson, handler, compile, readonly, rawset, setmetatable_checked, overdue =
  helpers.redis, helpers.cjson, helpers.handler, helpers.compile, helpers.readonly,
  helpers.rawset, helpers.setmetatable, helpers.overdue
local error, setmetatable, getmetatable, pcall, xpcall, type, tostring, concat =
  base.error, base.setmetatable, base.getmetatable, base.pcall, base.xpcall,
  base.type, base.tostring, base.table.concat

local function deny() error('Attempt to modify a readonly table', 2) end
local function protect(t)
  local p = setmetatable({}, {__index = t, __newindex = deny, __metatable = false})
  readonly[p] = true
  return p
end

local G = {}
for _, k in base.ipairs({'assert', 'error', 'ipairs', 'next', 'pairs', 'rawequal', 'rawget',
    'select', 'getmetatable', 'tonumber', 'tostring', 'type', 'unpack',
    'collectgarbage', 'gcinfo', '_VERSION'}) do
  G[k] = base[k]
end
for _, k in base.ipairs({'string', 'table', 'math'}) do
  G[k] = protect(base[k])
end

-- A script past its time limit must not be able to swallow the abort.
local function recheck(ok, ...)
  if not ok and overdue() then error((...), 0) end
  return ok, ...
end
local co = {}
for k, v in base.pairs(base.coroutine) do co[k] = v end
co.resume = function(c, ...) return recheck(base.coroutine.resume(c, ...)) end
G.coroutine = protect(co)
G.xpcall = function(f, h) return recheck(xpcall(f, h)) end
G.redis = protect(redis)
G.cjson = protect(cjson)

local smt = getmetatable('')
smt.__index = G.string
smt.__metatable = protect(smt)

local function unwrap(ok, ...)
  if ok then return true, ... end
  local e = ...
  if type(e) == 'table' then
    local m = e.err
    if type(m) == 'string' or type(m) == 'number' then e = m end
  end
  return false, e
end
G.pcall = function(f, ...) return unwrap(recheck(pcall(f, ...))) end

G.rawset = rawset
G.setmetatable = setmetatable_checked

local env = setmetatable({}, {__index = G, __newindex = deny, __metatable = false})
readonly[env] = true
G._G = env

G.loadstring = function(s, name) return compile(s, name, env) end
G.load = function(reader, name)
  local parts = {}
  while true do
    local piece = reader()
    if piece == nil or piece == '' then break end
    if type(piece) ~= 'string' then return nil, 'reader function must return a string' end
    parts[#parts + 1] = piece
  end
  return compile(concat(parts), name or '=(load)', env)
end

setmetatable(G, {
  __index = function(_, k)
    error("Script attempted to access nonexistent global variable '" .. tostring(k) .. "'", 2)
  end,
  __metatable = false,
})

local function run(f)
  local ok, r = xpcall(f, handler)
  return ok, r
end

-- Redis Functions (FUNCTION LOAD, FCALL). A library's code runs once, in an environment whose
-- `redis` also has `register_function`, which collects the library's functions while it loads
-- (and raises at any other time, as in Redis). Functions get their keys and arguments as
-- parameters; there are no KEYS and ARGV globals.
local registry = nil
local lredis = {}
for k, v in base.pairs(redis) do lredis[k] = v end
lredis.register_function = function(a, b)
  if registry == nil then
    error('redis.register_function can only be called on FUNCTION LOAD command', 2)
  end
  local name, cb, flags = a, b, nil
  if type(a) == 'table' then name, cb, flags = a.function_name, a.callback, a.flags end
  if type(name) ~= 'string' or not base.string.match(name, '^[%w_]+$') then
    error('Function names can only contain letters, numbers, or underscores(_) and must be at least one character long', 2)
  end
  if type(cb) ~= 'function' then
    error('callback argument given to redis.register_function must be a function', 2)
  end
  local no_writes = false
  if flags ~= nil then
    if type(flags) ~= 'table' then
      error('flags argument to redis.register_function must be a table representing function flags', 2)
    end
    for _, f in base.ipairs(flags) do
      if f == 'no-writes' then
        no_writes = true
      elseif f ~= 'allow-oom' and f ~= 'allow-stale' and f ~= 'no-cluster'
          and f ~= 'allow-cross-slot-keys' then
        error('unknown flag given', 2)
      end
    end
  end
  if registry[name] ~= nil then error('Function already exists in the library', 2) end
  registry[name] = {cb, no_writes}
end
local LG = setmetatable({redis = protect(lredis)}, {__index = G, __metatable = false})
local lenv = setmetatable({}, {__index = LG, __newindex = deny, __metatable = false})
readonly[lenv] = true

-- Runs a library's code; returns true and {name = {callback, no_writes}}, or false and the error.
local function load_library(f)
  registry = {}
  local ok, r = xpcall(f, handler)
  local fns = registry
  registry = nil
  if not ok then return false, r end
  return true, fns
end

local function call_function(cb, keys, args)
  local ok, r = xpcall(function() return cb(keys, args) end, handler)
  return ok, r
end

return G, env, run, lenv, load_library, call_function
"#;

/// Handles to the environment.
pub struct Sandbox {
    /// The table behind the globals: where `KEYS` and `ARGV` go.
    pub globals: Table,
    /// The protected table scripts see as their globals.
    pub env: Table,
    /// `run(f)`: `xpcall(f, handler)`, returning `ok, result_or_error_info`.
    pub runner: Function,
    /// The environment a function library's code is compiled in (`redis.register_function`).
    pub lib_env: Table,
    /// Runs a compiled library: `(ok, {name = {callback, no_writes}} | error)`.
    pub load_library: Function,
    /// Calls a function with its keys and arguments: `(ok, result | error)`.
    pub call_function: Function,
}

pub fn build(lua: &Lua) -> mlua::Result<Sandbox> {
    let redis = super::redis_lib::build(lua)?;
    let cjson = super::cjson::build(lua)?;
    let tostring: Function = lua.globals().raw_get("tostring")?;
    let handler = lua.create_function(move |lua, e: Value| error_info(lua, &tostring, e))?;
    let compile = lua.create_function(compile_text)?;
    // The protected tables (weak keys), and a `rawset` that refuses them.
    let readonly = lua.create_table()?;
    readonly.set_metatable(Some(lua.create_table_from([("__mode", "k")])?))?;
    let ro = readonly.clone();
    let rawset = shim::wrap(
        lua,
        lua.create_function(move |lua, args: MultiValue| checked_rawset(lua, &ro, args))?,
    )?;
    let overdue = lua.create_function(|lua, ()| Ok(super::overdue(lua)))?;
    let ro = readonly.clone();
    let setmt = shim::wrap(
        lua,
        lua.create_function(move |lua, args| checked_setmetatable(lua, &ro, args))?,
    )?;
    let helpers = lua.create_table()?;
    helpers.raw_set("redis", redis)?;
    helpers.raw_set("cjson", cjson)?;
    helpers.raw_set("handler", handler)?;
    helpers.raw_set("compile", compile)?;
    helpers.raw_set("readonly", readonly)?;
    helpers.raw_set("rawset", rawset)?;
    helpers.raw_set("setmetatable", setmt)?;
    helpers.raw_set("overdue", overdue)?;
    let (globals, env, runner, lib_env, load_library, call_function): (
        Table,
        Table,
        Function,
        Table,
        Function,
        Function,
    ) = lua
        .load(BOOTSTRAP)
        .set_name(INTERNAL)
        .call((lua.globals(), helpers))?;
    Ok(Sandbox {
        globals,
        env,
        runner,
        lib_env,
        load_library,
        call_function,
    })
}

fn raise(lua: &Lua, msg: &str, mode: i64) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Boolean(false),
        Value::String(lua.create_string(msg)?),
        Value::Integer(mode),
    ]))
}

/// `setmetatable(t, mt)` (Lua 5.1's checks), refusing the protected tables.
fn checked_setmetatable(lua: &Lua, readonly: &Table, args: MultiValue) -> mlua::Result<MultiValue> {
    let t = match args.front() {
        Some(Value::Table(t)) => t.clone(),
        other => {
            return raise(
                lua,
                &format!(
                    "table expected, got {}",
                    other.map_or("no value", type_name)
                ),
                1,
            )
        }
    };
    let mt = match args.get(1) {
        Some(Value::Nil) => None,
        Some(Value::Table(mt)) => Some(mt.clone()),
        _ => return raise(lua, "nil or table expected", 2),
    };
    if readonly.raw_get::<Value>(&t)? != Value::Nil {
        return raise(lua, "Attempt to modify a readonly table", RAISE);
    }
    if let Some(current) = t.metatable() {
        if current.raw_get::<Value>("__metatable")? != Value::Nil {
            return raise(
                lua,
                "cannot change a protected metatable",
                super::shim::RAISE_WHERE,
            );
        }
    }
    t.set_metatable(mt)?;
    Ok(MultiValue::from_vec(vec![
        Value::Boolean(true),
        Value::Table(t),
    ]))
}

/// `rawset(t, k, v)`, refusing the protected tables like Redis' read-only tables do.
fn checked_rawset(lua: &Lua, readonly: &Table, args: MultiValue) -> mlua::Result<MultiValue> {
    let fail = |msg: String, mode: i64| -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_vec(vec![
            Value::Boolean(false),
            Value::String(lua.create_string(msg)?),
            Value::Integer(mode),
        ]))
    };
    let t = match args.front() {
        Some(Value::Table(t)) => t.clone(),
        other => {
            let got = other.map_or("no value", type_name);
            return fail(format!("table expected, got {got}"), 1);
        }
    };
    if args.len() < 2 {
        return fail("value expected".into(), 2);
    }
    if args.len() < 3 {
        return fail("value expected".into(), 3);
    }
    if readonly.raw_get::<Value>(&t)? != Value::Nil {
        return fail("Attempt to modify a readonly table".into(), RAISE);
    }
    match t.raw_set(args[1].clone(), args[2].clone()) {
        Ok(()) => Ok(MultiValue::from_vec(vec![
            Value::Boolean(true),
            Value::Table(t),
        ])),
        Err(mlua::Error::RuntimeError(msg)) => fail(msg, RAISE),
        Err(e) => fail(e.to_string(), RAISE),
    }
}

/// Compiles a script body (text only, never bytecode) into the protected environment.
pub fn compile(lua: &Lua, env: &Table, source: &[u8], name: &str) -> mlua::Result<Function> {
    lua.load(source)
        .set_name(name)
        .set_mode(ChunkMode::Text)
        .set_environment(env.clone())
        .into_function()
}

/// `loadstring(s [, name])` / `load`: the function, or nil and the message.
fn compile_text(
    lua: &Lua,
    (src, name, env): (Value, Option<LuaString>, Table),
) -> mlua::Result<MultiValue> {
    let Some(src) = to_lua_string(&src) else {
        return Ok(MultiValue::from_vec(vec![
            Value::Nil,
            Value::String(lua.create_string("bad argument")?),
        ]));
    };
    // Lua's loadstring names the chunk after its source by default.
    let name = match name {
        Some(n) => String::from_utf8_lossy(&n.as_bytes()).into_owned(),
        None => String::from_utf8_lossy(&src).into_owned(),
    };
    let name = name.replace('\0', " ");
    match compile(lua, &env, &src, &name) {
        Ok(f) => Ok(MultiValue::from_vec(vec![Value::Function(f)])),
        Err(e) => {
            let msg = match e {
                mlua::Error::SyntaxError { message, .. } => message,
                other => other.to_string(),
            };
            Ok(MultiValue::from_vec(vec![
                Value::Nil,
                Value::String(lua.create_string(msg)?),
            ]))
        }
    }
}

/// The error handler: Redis' `__redis__err__handler`. Returns `{err = msg, source, line}`.
fn error_info(lua: &Lua, tostring: &Function, e: Value) -> mlua::Result<Table> {
    let msg: Value = match &e {
        Value::Table(t) => match t.get::<Value>("err")? {
            v @ Value::String(_) => v,
            v @ (Value::Integer(_) | Value::Number(_)) => tostring.call(v)?,
            _ => Value::Nil,
        },
        Value::String(s) => {
            let mut m = b"ERR ".to_vec();
            m.extend_from_slice(&s.as_bytes());
            Value::String(lua.create_string(&m)?)
        }
        // An error raised by Rust code (e.g. the time limit): its own message.
        Value::Error(err) => {
            let msg = match err.as_ref() {
                mlua::Error::RuntimeError(m) => m.clone(),
                other => other.to_string(),
            };
            Value::String(lua.create_string(format!("ERR {msg}"))?)
        }
        other => {
            let s: LuaString = tostring.call(other.clone())?;
            let mut m = b"ERR ".to_vec();
            m.extend_from_slice(&s.as_bytes());
            Value::String(lua.create_string(&m)?)
        }
    };
    let info = lua.create_table()?;
    info.raw_set("err", msg)?;
    // Level 0 is this handler; the first frame that is neither C nor ours is the script's.
    for level in 1..200 {
        let frame = lua.inspect_stack(level, |d| {
            let src = d.source();
            (
                src.what,
                src.source.map(|s| s.into_owned()),
                d.current_line(),
            )
        });
        let Some((what, source, line)) = frame else {
            break;
        };
        if what == "C" || source.as_deref() == Some(INTERNAL) {
            continue;
        }
        info.raw_set("source", source.unwrap_or_default())?;
        info.raw_set("line", line.map_or(-1, |l| l as i64))?;
        break;
    }
    Ok(info)
}
