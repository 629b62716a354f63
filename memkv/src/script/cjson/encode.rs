//! `cjson.encode`: Lua values to JSON text, iteratively (tables may nest 1000 deep).

use super::{fail, ok, MAX_DEPTH};
use crate::num::fmt_g;
use crate::script::convert::{as_number, type_name};
use crate::script::shim::RAISE_WHERE;
use mlua::{Lua, MultiValue, Table, Value};

pub(super) fn encode_fn(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    if args.len() != 1 {
        return fail(lua, "expected 1 argument", 1);
    }
    match encode(&args[0]) {
        Ok(out) => ok(Value::String(lua.create_string(&out)?)),
        Err(msg) => fail(lua, &msg, RAISE_WHERE),
    }
}

/// A table being encoded. Iterative, with an explicit stack: nesting may be 1000 deep.
enum EncFrame {
    Array {
        t: Table,
        len: usize,
        next: usize,
    },
    Object {
        pairs: Vec<(Value, Value)>,
        next: usize,
    },
}

fn encode(v: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut stack: Vec<EncFrame> = Vec::new();
    encode_value(v, &mut stack, &mut out)?;
    while let Some(frame) = stack.last_mut() {
        let item = match frame {
            EncFrame::Array { t, len, next } => {
                if *next == *len {
                    out.push(b']');
                    stack.pop();
                    continue;
                }
                if *next > 0 {
                    out.push(b',');
                }
                *next += 1;
                t.raw_get::<Value>(*next).map_err(|e| e.to_string())?
            }
            EncFrame::Object { pairs, next } => {
                let Some((k, v)) = pairs.get(*next).cloned() else {
                    out.push(b'}');
                    stack.pop();
                    continue;
                };
                if *next > 0 {
                    out.push(b',');
                }
                *next += 1;
                match &k {
                    Value::String(s) => {
                        encode_string(&s.as_bytes(), &mut out);
                        out.push(b':');
                    }
                    Value::Integer(_) | Value::Number(_) => {
                        out.push(b'"');
                        encode_number(as_number(&k).unwrap_or(0.0), &mut out)?;
                        out.extend_from_slice(b"\":");
                    }
                    other => {
                        return Err(format!(
                            "Cannot serialise {}: table key must be a number or string",
                            type_name(other)
                        ))
                    }
                }
                v
            }
        };
        encode_value(&item, &mut stack, &mut out)?;
    }
    Ok(out)
}

/// Writes a scalar, or opens a table (pushing its frame).
fn encode_value(v: &Value, stack: &mut Vec<EncFrame>, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::Nil => out.extend_from_slice(b"null"),
        Value::LightUserData(p) if p.0.is_null() => out.extend_from_slice(b"null"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Integer(_) | Value::Number(_) => encode_number(as_number(v).unwrap_or(0.0), out)?,
        Value::String(s) => encode_string(&s.as_bytes(), out),
        Value::Table(t) => {
            let depth = stack.len() + 1;
            if depth > MAX_DEPTH {
                return Err(format!("Cannot serialise, excessive nesting ({depth})"));
            }
            match array_length(t)? {
                Some(len) => {
                    out.push(b'[');
                    stack.push(EncFrame::Array {
                        t: t.clone(),
                        len,
                        next: 0,
                    });
                }
                None => {
                    out.push(b'{');
                    let pairs = t
                        .pairs::<Value, Value>()
                        .collect::<mlua::Result<Vec<_>>>()
                        .map_err(|e| e.to_string())?;
                    stack.push(EncFrame::Object { pairs, next: 0 });
                }
            }
        }
        other => {
            return Err(format!(
                "Cannot serialise {}: type not supported",
                type_name(other)
            ))
        }
    }
    Ok(())
}

fn encode_number(n: f64, out: &mut Vec<u8>) -> Result<(), String> {
    if !n.is_finite() {
        return Err("Cannot serialise number: must not be NaN or Inf".into());
    }
    out.extend_from_slice(fmt_g(n, 14).as_bytes());
    Ok(())
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\/"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\x0c' => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            c if c < 0x20 || c == 0x7f => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
    out.push(b'"');
}

/// lua-cjson's `lua_array_length`: Some(n) for an array of n slots, None for an object.
fn array_length(t: &Table) -> Result<Option<usize>, String> {
    let (mut max, mut items) = (0f64, 0f64);
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair.map_err(|e| e.to_string())?;
        match as_number(&k) {
            Some(k) if k != 0.0 && k.floor() == k && k >= 1.0 => {
                max = max.max(k);
                items += 1.0;
            }
            _ => return Ok(None),
        }
    }
    if max > items * 2.0 && max > 10.0 {
        return Err("Cannot serialise table: excessively sparse array".into());
    }
    Ok(if max > 0.0 { Some(max as usize) } else { None })
}
