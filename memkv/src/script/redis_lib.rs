//! The `redis` table scripts see: `call`, `pcall`, `error_reply`, `status_reply`, `sha1hex`,
//! `log`, `setresp`, `set_repl`, `replicate_commands`, `breakpoint`, `debug` and the
//! `LOG_*`, `REPL_*`, `REDIS_VERSION*` constants, with Redis 7.0's argument checks and messages.
//!
//! `redis.call` runs the command in the same key space, which the script engine lends to Lua
//! (as app data) for the duration of the script: the key space is already locked, so nothing
//! is locked again here.

use super::convert::{as_number, error_table, reply_to_lua, to_lua_string};
use super::shim::{self, RAISE};
use super::ScriptCtx;
use crate::commands;
use crate::commands::REDIS_VERSION;
use crate::num::fmt_g;
use crate::reply::Reply;
use mlua::{Lua, MultiValue, Table, Value};

fn ok(v: Value) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![Value::Boolean(true), v]))
}

/// Raise `{err = "ERR <msg>"}`, as Redis' `luaPushError` + `luaError` do.
fn raise_err(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Boolean(false),
        Value::Table(error_table(lua, msg, false)?),
        Value::Integer(RAISE),
    ]))
}

/// The `redis` table.
pub fn build(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "call",
        shim::wrap(
            lua,
            lua.create_function(|lua, args| generic_call(lua, args, true))?,
        )?,
    )?;
    t.raw_set("pcall", lua.create_function(pcall)?)?;
    t.raw_set("error_reply", lua.create_function(error_reply)?)?;
    t.raw_set("status_reply", lua.create_function(status_reply)?)?;
    t.raw_set("sha1hex", shim::wrap(lua, lua.create_function(sha1hex)?)?)?;
    t.raw_set("log", shim::wrap(lua, lua.create_function(log)?)?)?;
    t.raw_set("setresp", shim::wrap(lua, lua.create_function(setresp)?)?)?;
    t.raw_set("set_repl", shim::wrap(lua, lua.create_function(set_repl)?)?)?;
    t.raw_set("replicate_commands", lua.create_function(|_, ()| Ok(true))?)?;
    t.raw_set("breakpoint", lua.create_function(|_, ()| Ok(false))?)?;
    t.raw_set("debug", lua.create_function(|_, _: MultiValue| Ok(()))?)?;
    for (name, v) in [
        ("LOG_DEBUG", 0),
        ("LOG_VERBOSE", 1),
        ("LOG_NOTICE", 2),
        ("LOG_WARNING", 3),
    ] {
        t.raw_set(name, v)?;
    }
    for (name, v) in [
        ("REPL_NONE", 0),
        ("REPL_AOF", 1),
        ("REPL_SLAVE", 2),
        ("REPL_REPLICA", 2),
        ("REPL_ALL", 3),
    ] {
        t.raw_set(name, v)?;
    }
    t.raw_set("REDIS_VERSION", REDIS_VERSION)?;
    t.raw_set("REDIS_VERSION_NUM", version_num())?;
    Ok(t)
}

/// 7.0.15 → 0x07000f.
fn version_num() -> i64 {
    REDIS_VERSION
        .split('.')
        .map(|p| p.parse::<i64>().unwrap_or(0))
        .fold(0, |acc, p| (acc << 8) | p)
}

fn pcall(lua: &Lua, args: MultiValue) -> mlua::Result<Value> {
    let mut r = generic_call(lua, args, false)?.into_vec();
    Ok(if r.len() > 1 {
        r.swap_remove(1)
    } else {
        Value::Nil
    })
}

/// `redis.call` (raise) and `redis.pcall` (return the error table): Redis 7.0's
/// `luaRedisGenericCommand`.
fn generic_call(lua: &Lua, args: MultiValue, raise: bool) -> mlua::Result<MultiValue> {
    let fail = |t: Table| -> mlua::Result<MultiValue> {
        if raise {
            Ok(MultiValue::from_vec(vec![
                Value::Boolean(false),
                Value::Table(t),
                Value::Integer(RAISE),
            ]))
        } else {
            ok(Value::Table(t))
        }
    };
    if args.is_empty() {
        return fail(error_table(
            lua,
            "Please specify at least one argument for this redis lib call",
            false,
        )?);
    }
    let mut argv = Vec::with_capacity(args.len());
    for a in args.iter() {
        match a {
            Value::String(s) => argv.push(s.as_bytes().to_vec()),
            Value::Integer(_) | Value::Number(_) => {
                argv.push(fmt_g(as_number(a).unwrap_or(0.0), 17).into_bytes());
            }
            _ => {
                return fail(error_table(
                    lua,
                    "Lua redis lib command arguments must be strings or integers",
                    false,
                )?);
            }
        }
    }
    let argv: Vec<&[u8]> = argv.iter().map(Vec::as_slice).collect();
    let reply = {
        let Some(mut ctx) = lua.app_data_mut::<ScriptCtx>() else {
            return raise_err(
                lua,
                "redis.call/pcall can only be called inside a script invocation",
            );
        };
        let ctx = &mut *ctx;
        match commands::check_from_script(&argv, ctx.read_only) {
            Err(msg) => Err(msg),
            Ok(handler) => {
                ctx.ks.commands_processed += 1;
                Ok(handler(&mut ctx.ks, &argv))
            }
        }
    };
    match reply {
        Err(msg) => fail(error_table(lua, msg, true)?),
        Ok(Reply::Error(e)) => fail(error_table(lua, &format!("-{e}"), true)?),
        Ok(r) => ok(reply_to_lua(lua, &r)?),
    }
}

/// `redis.error_reply(msg)`: `{err = msg}`, with the `-CODE` handling of `luaPushErrorBuff`.
fn error_reply(lua: &Lua, args: MultiValue) -> mlua::Result<Table> {
    match args.front() {
        Some(Value::String(s)) if args.len() == 1 => {
            let s = String::from_utf8_lossy(&s.as_bytes()).into_owned();
            let raw = if s.starts_with('-') {
                s
            } else {
                format!("-{s}")
            };
            error_table(lua, &raw, false)
        }
        _ => error_table(lua, "wrong number or type of arguments", false),
    }
}

/// `redis.status_reply(msg)`: `{ok = msg}`.
fn status_reply(lua: &Lua, args: MultiValue) -> mlua::Result<Table> {
    match args.front() {
        Some(v @ Value::String(_)) if args.len() == 1 => {
            let t = lua.create_table()?;
            t.raw_set("ok", v.clone())?;
            Ok(t)
        }
        _ => error_table(lua, "wrong number or type of arguments", false),
    }
}

fn sha1hex(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    if args.len() != 1 {
        return raise_err(lua, "wrong number of arguments");
    }
    let bytes = to_lua_string(&args[0]).unwrap_or_default();
    ok(Value::String(lua.create_string(
        sha1_smol::Sha1::from(&bytes).digest().to_string(),
    )?))
}

/// `redis.log(level, ...)`: validated like Redis, then dropped (the embedded store has no log).
fn log(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    if args.len() < 2 {
        return raise_err(lua, "redis.log() requires two arguments or more.");
    }
    let level = match &args[0] {
        Value::String(s) => crate::num::parse_f64_strict(&s.as_bytes()),
        v => as_number(v),
    };
    match level {
        None => raise_err(lua, "First argument must be a number (log level)."),
        Some(l) if !(0.0..=3.0).contains(&l.trunc()) => raise_err(lua, "Invalid debug level."),
        Some(_) => ok(Value::Nil),
    }
}

/// `redis.setresp(2)`; RESP3 replies are not supported by the embedded store.
fn setresp(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    if args.len() != 1 {
        return raise_err(lua, "redis.setresp() requires one argument.");
    }
    match as_number(&args[0]).map(|n| n as i64) {
        Some(2) => ok(Value::Nil),
        Some(3) => raise_err(lua, "RESP3 is not supported by the embedded store."),
        _ => raise_err(lua, "RESP version must be 2 or 3."),
    }
}

/// `redis.set_repl(flags)`: validated and ignored (nothing replicates).
fn set_repl(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    if args.len() != 1 {
        return raise_err(lua, "redis.set_repl() requires two arguments.");
    }
    match as_number(&args[0]).map(|n| n as i64) {
        Some(0..=3) => ok(Value::Nil),
        _ => raise_err(
            lua,
            "Invalid replication flags. Use REPL_AOF, REPL_REPLICA, REPL_ALL or REPL_NONE.",
        ),
    }
}
