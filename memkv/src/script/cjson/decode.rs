//! `cjson.decode`: a port of lua-cjson's tokenizer and parser (same accepted inputs, same
//! error messages and positions), building Lua tables iteratively in document order.

use super::{fail, null, ok, MAX_DEPTH};
use crate::num::strtod;
use crate::script::convert::{to_lua_string, type_name};
use crate::script::shim::RAISE_WHERE;
use mlua::{Lua, MultiValue, Table, Value};

pub(super) fn decode_fn(lua: &Lua, args: MultiValue) -> mlua::Result<MultiValue> {
    if args.len() != 1 {
        return fail(lua, "expected 1 argument", 1);
    }
    let Some(text) = to_lua_string(&args[0]) else {
        return fail(
            lua,
            &format!("string expected, got {}", type_name(&args[0])),
            1,
        );
    };
    if text.len() >= 2 && (text[0] == 0 || text[1] == 0) {
        return fail(
            lua,
            "JSON parser does not support UTF-16 or UTF-32",
            RAISE_WHERE,
        );
    }
    let mut p = Parser {
        s: &text,
        pos: 0,
        depth: 0,
    };
    match p.decode(lua) {
        Ok(Ok(v)) => ok(v),
        Ok(Err(msg)) => fail(lua, &msg, RAISE_WHERE),
        Err(e) => Err(e),
    }
}

/// A container being decoded. Iterative, with an explicit stack: nesting may be 1000 deep.
enum DecFrame {
    Array { t: Table, n: usize },
    Object { t: Table, key: Vec<u8> },
}

enum Tok {
    ObjBegin,
    ObjEnd,
    ArrBegin,
    ArrEnd,
    Str(Vec<u8>),
    Num(f64),
    Bool(bool),
    Null,
    Colon,
    Comma,
    End,
    Error(&'static str),
}

struct Token {
    tok: Tok,
    /// 0-based offset where the token (or the error) is.
    index: usize,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    /// The byte at `i`, 0 past the end (the C code reads a NUL-terminated buffer).
    fn at(&self, i: usize) -> u8 {
        self.s.get(i).copied().unwrap_or(0)
    }

    fn starts_with(&self, word: &[u8]) -> bool {
        self.s[self.pos.min(self.s.len())..].starts_with(word)
    }

    /// lua-cjson's `json_is_invalid_number` (numbers strict JSON forbids but strtod takes).
    fn is_invalid_number(&self) -> bool {
        let mut p = self.pos;
        if self.at(p) == b'+' {
            return true;
        }
        if self.at(p) == b'-' {
            p += 1;
        }
        let c = self.at(p);
        if c == b'0' {
            let c2 = self.at(p + 1);
            return (c2 | 0x20) == b'x' || c2.is_ascii_digit();
        }
        if c <= b'9' {
            return false;
        }
        let rest = &self.s[p.min(self.s.len())..];
        let ci = |w: &[u8]| rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(w);
        ci(b"inf") || ci(b"nan")
    }

    fn number(&mut self) -> Tok {
        let r = strtod(&self.s[self.pos..]);
        if r.len == 0 {
            return Tok::Error("invalid number");
        }
        self.pos += r.len;
        Tok::Num(r.value)
    }

    fn next_token(&mut self) -> Token {
        while matches!(self.at(self.pos), b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
        let index = self.pos;
        let c = self.at(self.pos);
        let single = match c {
            b'{' => Some(Tok::ObjBegin),
            b'}' => Some(Tok::ObjEnd),
            b'[' => Some(Tok::ArrBegin),
            b']' => Some(Tok::ArrEnd),
            b':' => Some(Tok::Colon),
            b',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(tok) = single {
            self.pos += 1;
            return Token { tok, index };
        }
        let tok = match c {
            0 => Tok::End,
            b'"' => {
                let mut t = self.string();
                if !matches!(t.tok, Tok::Error(_)) {
                    t.index = index;
                }
                return t;
            }
            b'-' | b'0'..=b'9' => self.number(),
            b't' if self.starts_with(b"true") => {
                self.pos += 4;
                Tok::Bool(true)
            }
            b'f' if self.starts_with(b"false") => {
                self.pos += 5;
                Tok::Bool(false)
            }
            b'n' if self.starts_with(b"null") => {
                self.pos += 4;
                Tok::Null
            }
            b'f' | b'i' | b'I' | b'n' | b'N' | b't' | b'+' if self.is_invalid_number() => {
                self.number()
            }
            _ => Tok::Error("invalid token"),
        };
        let index = if matches!(tok, Tok::Error(_)) {
            self.pos
        } else {
            index
        };
        Token { tok, index }
    }

    fn string(&mut self) -> Token {
        let err = |p: &Self, e: &'static str| Token {
            tok: Tok::Error(e),
            index: p.pos,
        };
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let c = self.at(self.pos);
            match c {
                b'"' => break,
                0 => return err(self, "unexpected end of string"),
                b'\\' => {
                    let mapped = match self.at(self.pos + 1) {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => b'\x08',
                        b'f' => b'\x0c',
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            match self.unicode_escape(&mut out) {
                                Some(len) => self.pos += len,
                                None => return err(self, "invalid unicode escape code"),
                            }
                            continue;
                        }
                        _ => return err(self, "invalid escape code"),
                    };
                    out.push(mapped);
                    self.pos += 2;
                }
                c => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        self.pos += 1;
        Token {
            tok: Tok::Str(out),
            index: 0,
        }
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let mut v = 0u32;
        for i in 0..4 {
            let d = char::from(self.at(at + i)).to_digit(16)?;
            v = v * 16 + d;
        }
        Some(v)
    }

    /// `\uXXXX` (or a surrogate pair) at `pos`, appended as UTF-8; returns the escape length.
    fn unicode_escape(&self, out: &mut Vec<u8>) -> Option<usize> {
        let mut cp = self.hex4(self.pos + 2)?;
        let mut len = 6;
        if cp & 0xF800 == 0xD800 {
            if cp & 0x400 != 0 {
                return None;
            }
            if self.at(self.pos + 6) != b'\\' || self.at(self.pos + 7) != b'u' {
                return None;
            }
            let low = self.hex4(self.pos + 8)?;
            if low & 0xFC00 != 0xDC00 {
                return None;
            }
            cp = (((cp & 0x3FF) << 10) | (low & 0x3FF)) + 0x10000;
            len = 12;
        }
        match cp {
            0..=0x7F => out.push(cp as u8),
            0x80..=0x7FF => {
                out.extend_from_slice(&[0xC0 | (cp >> 6) as u8, 0x80 | (cp & 0x3F) as u8])
            }
            0x800..=0xFFFF => out.extend_from_slice(&[
                0xE0 | (cp >> 12) as u8,
                0x80 | ((cp >> 6) & 0x3F) as u8,
                0x80 | (cp & 0x3F) as u8,
            ]),
            _ => out.extend_from_slice(&[
                0xF0 | (cp >> 18) as u8,
                0x80 | ((cp >> 12) & 0x3F) as u8,
                0x80 | ((cp >> 6) & 0x3F) as u8,
                0x80 | (cp & 0x3F) as u8,
            ]),
        }
        Some(len)
    }

    fn unexpected(&self, expected: &str, t: &Token) -> String {
        let found = match &t.tok {
            Tok::Error(e) => e,
            Tok::ObjBegin => "T_OBJ_BEGIN",
            Tok::ObjEnd => "T_OBJ_END",
            Tok::ArrBegin => "T_ARR_BEGIN",
            Tok::ArrEnd => "T_ARR_END",
            Tok::Str(_) => "T_STRING",
            Tok::Num(_) => "T_NUMBER",
            Tok::Bool(_) => "T_BOOLEAN",
            Tok::Null => "T_NULL",
            Tok::Colon => "T_COLON",
            Tok::Comma => "T_COMMA",
            Tok::End => "T_END",
        };
        format!(
            "Expected {expected} but found {found} at character {}",
            t.index + 1
        )
    }

    fn descend(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "Found too many nested data structures ({}) at character {}",
                self.depth, self.pos
            ));
        }
        Ok(())
    }

    /// Parses the whole text into Lua values: `Ok(Err(msg))` is a JSON error to raise.
    fn decode(&mut self, lua: &Lua) -> mlua::Result<Result<Value, String>> {
        let mut stack: Vec<DecFrame> = Vec::new();
        let mut tok = self.next_token();
        loop {
            // `tok` starts a value.
            let mut value = match tok.tok {
                Tok::Str(s) => Value::String(lua.create_string(&s)?),
                Tok::Num(n) => Value::Number(n),
                Tok::Bool(b) => Value::Boolean(b),
                Tok::Null => null(),
                Tok::ObjBegin | Tok::ArrBegin => {
                    let is_obj = matches!(tok.tok, Tok::ObjBegin);
                    if let Err(e) = self.descend() {
                        return Ok(Err(e));
                    }
                    let t = lua.create_table()?;
                    let first = self.next_token();
                    let empty = if is_obj {
                        matches!(first.tok, Tok::ObjEnd)
                    } else {
                        matches!(first.tok, Tok::ArrEnd)
                    };
                    if empty {
                        self.depth -= 1;
                        Value::Table(t)
                    } else if is_obj {
                        let key = match self.object_key(first) {
                            Ok(k) => k,
                            Err(e) => return Ok(Err(e)),
                        };
                        stack.push(DecFrame::Object { t, key });
                        tok = self.next_token();
                        continue;
                    } else {
                        stack.push(DecFrame::Array { t, n: 0 });
                        tok = first;
                        continue;
                    }
                }
                _ => return Ok(Err(self.unexpected("value", &tok))),
            };
            // A value is complete: store it in its container, closing containers that end.
            loop {
                let Some(frame) = stack.last_mut() else {
                    let end = self.next_token();
                    return Ok(match end.tok {
                        Tok::End => Ok(value),
                        _ => Err(self.unexpected("the end", &end)),
                    });
                };
                let sep = match frame {
                    DecFrame::Array { t, n } => {
                        *n += 1;
                        t.raw_set(*n, value)?;
                        self.next_token()
                    }
                    DecFrame::Object { t, key } => {
                        t.raw_set(lua.create_string(&*key)?, value)?;
                        self.next_token()
                    }
                };
                let is_obj = matches!(frame, DecFrame::Object { .. });
                match (&sep.tok, is_obj) {
                    (Tok::ArrEnd, false) | (Tok::ObjEnd, true) => {
                        self.depth -= 1;
                        value = match stack.pop() {
                            Some(DecFrame::Array { t, .. }) | Some(DecFrame::Object { t, .. }) => {
                                Value::Table(t)
                            }
                            None => Value::Nil,
                        };
                    }
                    (Tok::Comma, false) => {
                        tok = self.next_token();
                        break;
                    }
                    (Tok::Comma, true) => {
                        let key_tok = self.next_token();
                        let key = match self.object_key(key_tok) {
                            Ok(k) => k,
                            Err(e) => return Ok(Err(e)),
                        };
                        if let Some(DecFrame::Object { key: k, .. }) = stack.last_mut() {
                            *k = key;
                        }
                        tok = self.next_token();
                        break;
                    }
                    (_, false) => return Ok(Err(self.unexpected("comma or array end", &sep))),
                    (_, true) => return Ok(Err(self.unexpected("comma or object end", &sep))),
                }
            }
        }
    }

    /// An object key and the colon after it.
    fn object_key(&mut self, t: Token) -> Result<Vec<u8>, String> {
        let Tok::Str(key) = t.tok else {
            return Err(self.unexpected("object key string", &t));
        };
        let colon = self.next_token();
        if !matches!(colon.tok, Tok::Colon) {
            return Err(self.unexpected("colon", &colon));
        }
        Ok(key)
    }
}
