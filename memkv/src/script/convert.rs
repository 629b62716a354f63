//! Conversions between command replies and Lua values, as Redis 7.0 (RESP2) makes them.
//!
//! Command → Lua (what `redis.call` returns): integer → number, bulk → string, nil → false,
//! array → table (1-based), status → `{ok = s}`, error → `{err = s}`.
//!
//! Lua → reply (what a script returns): string → bulk, number → integer (truncated toward
//! zero), true → 1, false and nil → nil, a table with a string `err` → error, with a string
//! `ok` → status, with a number `double` → bulk of the double, `big_number`, `map` and `set`
//! tables as RESP2 shows them, any other table → array of its items up to the first nil.

use crate::num::{f64_to_i64, fmt_double, fmt_g};
use crate::reply::{sanitize, Reply};
use mlua::{Lua, Table, Value};

/// Lua's `lua_typename` for a value (light userdata is "userdata", numbers are "number").
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        _ => "userdata",
    }
}

/// A number as a Lua number (`lua_Number`).
pub fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

/// `lua_tolstring`: strings as they are, numbers as Lua prints them (`%.14g`), else None.
pub fn to_lua_string(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        _ => as_number(v).map(|n| fmt_g(n, 14).into_bytes()),
    }
}

/// Redis' `luaPushErrorBuff`: `-CODE msg` keeps its code, anything else gets `ERR `.
pub fn error_text(raw: &str) -> String {
    let (code, msg) = match raw.strip_prefix('-') {
        Some(rest) => match rest.find(' ') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => ("ERR", rest),
        },
        None => ("ERR", raw),
    };
    format!("{code} {}", msg.trim_matches(['\r', '\n']))
}

/// The `{err = ...}` table Redis pushes for an error (`ignore_stats` marks errors of commands
/// that ran, as Redis does with its `ignore_error_stats_update` field).
pub fn error_table(lua: &Lua, raw: &str, ignore_stats: bool) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("err", error_text(raw))?;
    if ignore_stats {
        t.raw_set("ignore_error_stats_update", true)?;
    }
    Ok(t)
}

/// A command's reply as `redis.call` returns it.
pub fn reply_to_lua(lua: &Lua, reply: &Reply) -> mlua::Result<Value> {
    Ok(match reply {
        Reply::Int(i) => Value::Number(*i as f64),
        Reply::Bulk(b) => Value::String(lua.create_string(b)?),
        Reply::Nil | Reply::NilArray => Value::Boolean(false),
        Reply::Array(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, reply_to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
        Reply::Status(s) => {
            let t = lua.create_table()?;
            t.raw_set("ok", s.as_str())?;
            Value::Table(t)
        }
        Reply::Error(e) => Value::Table(error_table(lua, &format!("-{e}"), true)?),
    })
}

/// Deeper tables than this answer an error instead of nesting further (Redis answers
/// "reached lua stack limit" when its Lua stack runs out, e.g. for a table containing itself).
const MAX_DEPTH: usize = 1000;

/// A script's return value as the reply Redis sends.
pub fn lua_to_reply(v: &Value) -> Reply {
    to_reply(v).unwrap_or_else(|e| Reply::Error(format!("ERR {e}")))
}

fn lossy(s: &mlua::LuaString) -> String {
    String::from_utf8_lossy(&s.as_bytes()).into_owned()
}

/// A value is either a reply by itself or an array of further values.
enum Shape {
    Leaf(Reply),
    Items(Vec<Value>),
}

/// Iterative, with an explicit stack, since tables may nest deeply.
fn to_reply(v: &Value) -> mlua::Result<Reply> {
    // Each frame: the values still to convert, and the replies converted so far.
    let mut stack: Vec<(std::vec::IntoIter<Value>, Vec<Reply>)> = Vec::new();
    let mut next = shape_of(v)?;
    loop {
        let mut finished = match next {
            Shape::Leaf(r) => Some(r),
            Shape::Items(_) if stack.len() >= MAX_DEPTH => {
                Some(Reply::err("ERR reached lua stack limit"))
            }
            Shape::Items(items) => {
                stack.push((items.into_iter(), Vec::new()));
                None
            }
        };
        // Hand finished replies to their parent; close frames with nothing left to convert.
        loop {
            let Some((items, out)) = stack.last_mut() else {
                return Ok(finished.unwrap_or(Reply::Nil));
            };
            if let Some(r) = finished.take() {
                out.push(r);
            }
            if let Some(v) = items.next() {
                next = shape_of(&v)?;
                break;
            }
            finished = stack.pop().map(|(_, out)| Reply::Array(out));
        }
    }
}

fn shape_of(v: &Value) -> mlua::Result<Shape> {
    Ok(Shape::Leaf(match v {
        Value::String(s) => Reply::Bulk(s.as_bytes().to_vec()),
        Value::Boolean(true) => Reply::Int(1),
        Value::Boolean(false) => Reply::Nil,
        Value::Integer(_) | Value::Number(_) => Reply::Int(f64_to_i64(as_number(v).unwrap_or(0.0))),
        Value::Table(t) => return table_shape(t),
        _ => Reply::Nil,
    }))
}

fn table_shape(t: &Table) -> mlua::Result<Shape> {
    if let Value::String(e) = t.raw_get::<Value>("err")? {
        return Ok(Shape::Leaf(Reply::Error(lossy(&e))));
    }
    if let Value::String(s) = t.raw_get::<Value>("ok")? {
        return Ok(Shape::Leaf(Reply::Status(sanitize(&lossy(&s)))));
    }
    if let Some(d) = as_number(&t.raw_get::<Value>("double")?) {
        return Ok(Shape::Leaf(Reply::bulk(fmt_double(d))));
    }
    if let Value::String(s) = t.raw_get::<Value>("big_number")? {
        return Ok(Shape::Leaf(Reply::bulk(sanitize(&lossy(&s)))));
    }
    if let Value::Table(m) = t.raw_get::<Value>("map")? {
        let mut items = Vec::new();
        for pair in m.pairs::<Value, Value>() {
            let (k, v) = pair?;
            items.push(k);
            items.push(v);
        }
        return Ok(Shape::Items(items));
    }
    if let Value::Table(s) = t.raw_get::<Value>("set")? {
        let keys = s
            .pairs::<Value, Value>()
            .map(|p| p.map(|(k, _)| k))
            .collect::<mlua::Result<_>>()?;
        return Ok(Shape::Items(keys));
    }
    let mut items = Vec::new();
    for i in 1.. {
        let item: Value = t.raw_get(i)?;
        if item.is_nil() {
            break;
        }
        items.push(item);
    }
    Ok(Shape::Items(items))
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn error_codes_like_redis() {
        assert_eq!(error_text("-WRONGTYPE Operation"), "WRONGTYPE Operation");
        assert_eq!(error_text("-hi"), "ERR hi");
        assert_eq!(error_text("hi there"), "ERR hi there");
        assert_eq!(error_text("-ERR x\r\n"), "ERR x");
    }
}
