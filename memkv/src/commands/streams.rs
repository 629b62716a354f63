//! Stream commands: XADD, XRANGE, XREVRANGE, XTRIM, XLEN, XDEL.
//!
//! Ids and their errors follow Redis 7.0 (`ms-seq`, `ms` alone, `ms-*`, `-`, `+`, exclusive
//! `(id`). Trimming is always exact: `~` is accepted but trims as much as `=` would, where Redis
//! may keep a few more entries (it only drops whole internal nodes).

use super::{int_arg, is};
use crate::keyspace::{Keyspace, Val};
use crate::num::parse_u64;
use crate::reply::Reply;
use crate::types::{Stream, StreamId};

const INVALID_ID: &str = "ERR Invalid stream ID specified as stream command argument";

/// Redis' `streamGenericParseIDOrReply`. `seq_given` is Some only where `ms-*` is allowed (XADD).
fn parse_id(
    arg: &[u8],
    missing_seq: u64,
    strict: bool,
    seq_given: Option<&mut bool>,
) -> Result<StreamId, Reply> {
    let invalid = || Reply::err(INVALID_ID);
    if arg.len() > 127 {
        return Err(invalid());
    }
    if strict && (arg == b"-" || arg == b"+") {
        return Err(invalid());
    }
    if arg == b"-" {
        return Ok(StreamId::MIN);
    }
    if arg == b"+" {
        return Ok(StreamId::MAX);
    }
    // C stops at the first NUL byte.
    let arg = arg.split(|&b| b == 0).next().unwrap_or_default();
    let (ms_part, seq_part) = match arg.iter().position(|&b| b == b'-') {
        Some(i) => (&arg[..i], Some(&arg[i + 1..])),
        None => (arg, None),
    };
    let ms = parse_u64(ms_part).ok_or_else(invalid)?;
    let seq = match seq_part {
        Some(b"*") if seq_given.is_some() => {
            if let Some(flag) = seq_given {
                *flag = false;
            }
            0
        }
        Some(s) => parse_u64(s).ok_or_else(invalid)?,
        None => missing_seq,
    };
    Ok(StreamId { ms, seq })
}

fn strict_id(arg: &[u8]) -> Result<StreamId, Reply> {
    parse_id(arg, 0, true, None)
}

#[derive(Clone, Copy, PartialEq)]
enum Trim {
    None,
    MaxLen(i64),
    MinId(StreamId),
}

struct AddTrimArgs {
    trim: Trim,
    no_mkstream: bool,
    /// The explicit id, and whether its sequence was given (false for `ms-*`).
    id: Option<(StreamId, bool)>,
    /// Where parsing stopped: the id for XADD.
    pos: usize,
}

/// Redis 7.0's `streamParseAddOrTrimArgsOrReply`.
fn parse_add_or_trim(argv: &[&[u8]], xadd: bool) -> Result<AddTrimArgs, Reply> {
    let mut a = AddTrimArgs {
        trim: Trim::None,
        no_mkstream: false,
        id: None,
        pos: 2,
    };
    let (mut approx, mut limit_given, mut limit) = (false, false, 0i64);
    let mut i = 2;
    while i < argv.len() {
        let more = argv.len() - 1 - i;
        let opt = argv[i];
        if xadd && opt == b"*" {
            break;
        } else if (is(opt, "maxlen") || is(opt, "minid")) && more > 0 {
            if a.trim != Trim::None {
                return Err(Reply::err(
                    "ERR syntax error, MAXLEN and MINID options at the same time are not compatible",
                ));
            }
            approx = false;
            let next = argv[i + 1];
            if more >= 2 && next == b"~" {
                approx = true;
                i += 1;
            } else if more >= 2 && next == b"=" {
                i += 1;
            }
            if is(opt, "maxlen") {
                let n = int_arg(argv[i + 1])?;
                if n < 0 {
                    return Err(Reply::err("ERR The MAXLEN argument must be >= 0."));
                }
                a.trim = Trim::MaxLen(n);
            } else {
                a.trim = Trim::MinId(strict_id(argv[i + 1])?);
            }
            i += 1;
        } else if is(opt, "limit") && more > 0 {
            limit = int_arg(argv[i + 1])?;
            if limit < 0 {
                return Err(Reply::err("ERR The LIMIT argument must be >= 0."));
            }
            limit_given = true;
            i += 1;
        } else if xadd && is(opt, "nomkstream") {
            a.no_mkstream = true;
        } else if xadd {
            let mut seq_given = true;
            let id = parse_id(opt, 0, true, Some(&mut seq_given))?;
            a.id = Some((id, seq_given));
            break;
        } else {
            return Err(Reply::syntax());
        }
        i += 1;
    }
    a.pos = i;
    if limit != 0 && a.trim == Trim::None {
        return Err(Reply::err(
            "ERR syntax error, LIMIT cannot be used without specifying a trimming strategy",
        ));
    }
    if !xadd && a.trim == Trim::None {
        return Err(Reply::err(
            "ERR syntax error, XTRIM must be called with a trimming strategy",
        ));
    }
    if limit_given && !approx {
        return Err(Reply::err(
            "ERR syntax error, LIMIT cannot be used without the special ~ option",
        ));
    }
    Ok(a)
}

fn apply_trim(s: &mut Stream, trim: Trim) -> usize {
    match trim {
        Trim::None => 0,
        Trim::MaxLen(n) => s.trim_max_len(usize::try_from(n).unwrap_or(usize::MAX)),
        Trim::MinId(id) => s.trim_min_id(id),
    }
}

pub fn xadd(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let a = match parse_add_or_trim(argv, true) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let field_pos = a.pos + 1;
    if field_pos > argv.len() || (argv.len() - field_pos) < 2 || (argv.len() - field_pos) % 2 == 1 {
        return Reply::arity("xadd");
    }
    if let Some((StreamId { ms: 0, seq: 0 }, true)) = a.id {
        return Reply::err("ERR The ID specified in XADD must be greater than 0-0");
    }
    let key = argv[1];
    match ks.stream(key) {
        Err(e) => return e,
        Ok(None) if a.no_mkstream => return Reply::Nil,
        Ok(None) => ks.set(key, Val::Stream(Stream::default()), false),
        Ok(Some(_)) => {}
    }
    let now = ks.now();
    let Ok(Some(s)) = ks.stream_mut(key) else {
        return Reply::wrongtype();
    };
    if s.last_id == StreamId::MAX {
        return Reply::err(
            "ERR The stream has exhausted the last possible ID, unable to add more items",
        );
    }
    let too_small = || {
        Reply::err(
            "ERR The ID specified in XADD is equal or smaller than the target stream top item",
        )
    };
    let id = match a.id {
        Some((id, true)) => id,
        Some((id, false)) if id.ms == s.last_id.ms => match s.last_id.incr() {
            Some(next) if s.last_id.seq != u64::MAX => next,
            _ => return too_small(),
        },
        Some((id, false)) => id,
        None if now > s.last_id.ms => StreamId { ms: now, seq: 0 },
        None => match s.last_id.incr() {
            Some(next) => next,
            None => return too_small(),
        },
    };
    if id <= s.last_id {
        return too_small();
    }
    s.entries
        .insert(id, argv[field_pos..].iter().map(|b| b.to_vec()).collect());
    s.last_id = id;
    apply_trim(s, a.trim);
    Reply::bulk(id.to_string())
}

/// An XRANGE/XREVRANGE bound: Redis' `streamParseIntervalIDOrReply` plus the exclusive step.
fn interval_bound(arg: &[u8], missing_seq: u64, is_start: bool) -> Result<StreamId, Reply> {
    if arg.len() > 1 && arg[0] == b'(' {
        let id = parse_id(&arg[1..], missing_seq, true, None)?;
        let stepped = if is_start { id.incr() } else { id.decr() };
        return stepped.ok_or_else(|| {
            Reply::err(if is_start {
                "ERR invalid start ID for the interval"
            } else {
                "ERR invalid end ID for the interval"
            })
        });
    }
    parse_id(arg, missing_seq, false, None)
}

fn entry_reply(id: &StreamId, fields: &[Vec<u8>]) -> Reply {
    Reply::Array(vec![
        Reply::bulk(id.to_string()),
        Reply::Array(fields.iter().map(|f| Reply::bulk(f.clone())).collect()),
    ])
}

fn xrange_generic(ks: &mut Keyspace, argv: &[&[u8]], rev: bool) -> Reply {
    let (start_arg, end_arg) = if rev {
        (argv[3], argv[2])
    } else {
        (argv[2], argv[3])
    };
    let start = match interval_bound(start_arg, 0, true) {
        Ok(id) => id,
        Err(e) => return e,
    };
    let end = match interval_bound(end_arg, u64::MAX, false) {
        Ok(id) => id,
        Err(e) => return e,
    };
    let mut count: i64 = -1;
    let mut j = 4;
    while j < argv.len() {
        if is(argv[j], "count") && j + 1 < argv.len() {
            count = match int_arg(argv[j + 1]) {
                Ok(c) => c.max(0),
                Err(e) => return e,
            };
            j += 2;
        } else {
            return Reply::syntax();
        }
    }
    let s = match ks.stream(argv[1]) {
        Ok(Some(s)) => s,
        Ok(None) => return Reply::Array(vec![]),
        Err(e) => return e,
    };
    if count == 0 {
        return Reply::NilArray;
    }
    let take = usize::try_from(count).unwrap_or(usize::MAX);
    if start > end {
        return Reply::Array(vec![]);
    }
    let range = s.entries.range(start..=end);
    let items: Vec<Reply> = if rev {
        range
            .rev()
            .take(take)
            .map(|(id, f)| entry_reply(id, f))
            .collect()
    } else {
        range.take(take).map(|(id, f)| entry_reply(id, f)).collect()
    };
    Reply::Array(items)
}

pub fn xrange(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    xrange_generic(ks, argv, false)
}

pub fn xrevrange(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    xrange_generic(ks, argv, true)
}

pub fn xtrim(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let a = match parse_add_or_trim(argv, false) {
        Ok(a) => a,
        Err(e) => return e,
    };
    match ks.stream_mut(argv[1]) {
        Ok(Some(s)) => Reply::Int(apply_trim(s, a.trim) as i64),
        Ok(None) => Reply::Int(0),
        Err(e) => e,
    }
}

pub fn xlen(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.stream(argv[1]) {
        Ok(s) => Reply::Int(s.map_or(0, |s| s.len()) as i64),
        Err(e) => e,
    }
}

pub fn xdel(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let s = match ks.stream_mut(argv[1]) {
        Ok(Some(s)) => s,
        Ok(None) => return Reply::Int(0),
        Err(e) => return e,
    };
    let mut ids = Vec::with_capacity(argv.len() - 2);
    for arg in &argv[2..] {
        match strict_id(arg) {
            Ok(id) => ids.push(id),
            Err(e) => return e,
        }
    }
    let n = ids
        .iter()
        .filter(|id| s.entries.remove(id).is_some())
        .count();
    Reply::Int(n as i64)
}
