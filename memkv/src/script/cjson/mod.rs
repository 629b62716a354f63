//! `cjson.encode` / `cjson.decode` / `cjson.null`, behaving like the lua-cjson 2.1 that Redis
//! 7.0 embeds, with its default settings.
//!
//! - Numbers print with 14 significant digits (`%.14g`); NaN and ±inf refuse to encode.
//! - Strings escape `"`, `\`, `/` and control characters (`\u001f` style); other bytes pass.
//! - A table whose keys are all integers ≥ 1 is an array (holes become `null`) unless it is
//!   excessively sparse (an error); an empty table is `{}`; other tables are objects whose keys
//!   must be strings or numbers, in `next()` order — the same order as in Redis, since the
//!   tables come from the same Lua 5.1 and decoded objects are built key by key in the same
//!   way.
//! - `decode` builds tables, numbers (C `strtod`, so `1e2`, `0x10`, `Infinity` too), strings
//!   (with `\uXXXX` and surrogate pairs to UTF-8), booleans, and JSON `null` as `cjson.null`:
//!   a light userdata NULL pointer, as in Redis (it is truthy, and compares equal to
//!   `cjson.null`).
//! - Errors carry lua-cjson's messages ("Expected value but found T_END at character 1") and
//!   are raised at the caller's line, like `luaL_error`.

mod decode;
mod encode;

use super::shim;
use mlua::{LightUserData, Lua, MultiValue, Table, Value};

/// lua-cjson's default nesting limit, for encoding and decoding.
const MAX_DEPTH: usize = 1000;

/// The `cjson` table.
pub fn build(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "encode",
        shim::wrap(lua, lua.create_function(encode::encode_fn)?)?,
    )?;
    t.raw_set(
        "decode",
        shim::wrap(lua, lua.create_function(decode::decode_fn)?)?,
    )?;
    t.raw_set("null", null())?;
    Ok(t)
}

/// `cjson.null`: a light userdata NULL pointer.
fn null() -> Value {
    Value::LightUserData(LightUserData(std::ptr::null_mut()))
}

fn ok(v: Value) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![Value::Boolean(true), v]))
}

/// A failure in the shim's convention (see [`shim`]).
fn fail(lua: &Lua, msg: &str, mode: i64) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Boolean(false),
        Value::String(lua.create_string(msg)?),
        Value::Integer(mode),
    ]))
}
