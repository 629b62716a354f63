//! Replies as Redis sends them over RESP2, and their conversion to redis-rs values.
//!
//! Commands build a [`Reply`]; the connection turns it into the `redis::Value` a real
//! connection would have produced. Error replies in particular are built by parsing the same
//! `-CODE message` line Redis would send, so the `RedisError` a caller finally gets (kind, code,
//! detail) is exactly what redis-rs makes of a real server's answer.

use redis::Value;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Int(i64),
    Bulk(Vec<u8>),
    /// The null bulk string (`$-1`).
    Nil,
    /// The null array (`*-1`); redis-rs reads it as `Nil` as well.
    NilArray,
    Array(Vec<Reply>),
    /// A status line such as `OK` or `PONG`.
    Status(String),
    /// An error line without its leading `-`, e.g. `ERR syntax error`.
    Error(String),
}

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
pub const NOT_INT: &str = "ERR value is not an integer or out of range";
pub const NOT_FLOAT: &str = "ERR value is not a valid float";
pub const SYNTAX: &str = "ERR syntax error";
pub const OVERFLOW: &str = "ERR increment or decrement would overflow";
pub const NOSCRIPT: &str = "NOSCRIPT No matching script. Please use EVAL.";

impl Reply {
    pub fn ok() -> Self {
        Reply::Status("OK".into())
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Reply::Error(msg.into())
    }

    pub fn wrongtype() -> Self {
        Reply::err(WRONGTYPE)
    }

    pub fn not_int() -> Self {
        Reply::err(NOT_INT)
    }

    pub fn syntax() -> Self {
        Reply::err(SYNTAX)
    }

    pub fn bulk(b: impl Into<Vec<u8>>) -> Self {
        Reply::Bulk(b.into())
    }

    /// A bulk string or nil.
    pub fn opt_bulk(b: Option<&[u8]>) -> Self {
        b.map_or(Reply::Nil, |b| Reply::Bulk(b.to_vec()))
    }

    pub fn arity(fullname: &str) -> Self {
        Reply::Error(format!(
            "ERR wrong number of arguments for '{fullname}' command"
        ))
    }

    /// The redis-rs value a real RESP2 connection would have parsed from this reply.
    pub fn into_value(self) -> Value {
        match self {
            Reply::Int(i) => Value::Int(i),
            Reply::Bulk(b) => Value::BulkString(b),
            Reply::Nil | Reply::NilArray => Value::Nil,
            Reply::Array(items) => Value::Array(items.into_iter().map(Reply::into_value).collect()),
            Reply::Status(s) if s == "OK" => Value::Okay,
            Reply::Status(s) => Value::SimpleString(sanitize(&s)),
            Reply::Error(msg) => error_value(&msg),
        }
    }
}

/// Redis never sends CR or LF inside a status or error line: it maps them to spaces.
pub fn sanitize(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// `Value::ServerError` for an error line, built the way redis-rs parses one.
fn error_value(msg: &str) -> Value {
    let line = format!("-{}\r\n", sanitize(msg));
    match redis::parse_redis_value(line.as_bytes()) {
        Ok(v) => v,
        // Unreachable for a single sanitized line; keep a well-formed error regardless.
        Err(_) => {
            redis::parse_redis_value(b"-ERR unparsable error reply\r\n").unwrap_or(Value::Nil)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::ErrorKind;

    fn as_err(r: Reply) -> redis::RedisError {
        match r.into_value().extract_error() {
            Err(e) => e,
            Ok(v) => panic!("not an error: {v:?}"),
        }
    }

    #[test]
    fn errors_parse_like_a_server_reply() {
        let e = as_err(Reply::err(NOSCRIPT));
        assert_eq!(e.kind(), ErrorKind::NoScriptError);
        let e = as_err(Reply::wrongtype());
        assert_eq!(e.code(), Some("WRONGTYPE"));
        let e = as_err(Reply::syntax());
        assert_eq!(e.kind(), ErrorKind::ResponseError);
        assert_eq!(e.detail(), Some("syntax error"));
        assert_eq!(Reply::ok().into_value(), Value::Okay);
    }
}
