//! String and generic key commands: GET, MGET, SET, SETNX, INCRBY (INCR, DECR, DECRBY), DEL, EXISTS,
//! PEXPIRE, EXPIRE, PTTL, TTL.

use super::{int_arg, is};
use crate::keyspace::{Keyspace, Val};
use crate::reply::{Reply, OVERFLOW};

pub fn get(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.get_str(argv[1]) {
        Ok(v) => Reply::opt_bulk(v),
        Err(e) => e,
    }
}

/// `MGET key [key ...]`: a key holding another type reads as nil, as in Redis.
pub fn mget(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    Reply::Array(
        argv[1..]
            .iter()
            .map(|k| Reply::opt_bulk(ks.get_str(k).ok().flatten()))
            .collect(),
    )
}

#[derive(Default)]
struct SetOpts {
    nx: bool,
    xx: bool,
    get: bool,
    keep_ttl: bool,
    /// (unit in ms, absolute?, argument)
    expire: Option<(i64, bool, usize)>,
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`, parsed exactly as Redis
/// 7.0's `parseExtendedStringArgumentsOrReply` does (including which repeats it tolerates).
fn parse_set(argv: &[&[u8]]) -> Result<SetOpts, Reply> {
    let mut o = SetOpts::default();
    let mut j = 3;
    while j < argv.len() {
        let opt = argv[j];
        let has_next = j + 1 < argv.len();
        let (ex, px, exat, pxat) = match o.expire {
            Some((1000, false, _)) => (true, false, false, false),
            Some((1, false, _)) => (false, true, false, false),
            Some((1000, true, _)) => (false, false, true, false),
            Some((_, true, _)) => (false, false, false, true),
            _ => (false, false, false, false),
        };
        if is(opt, "nx") && !o.xx {
            o.nx = true;
        } else if is(opt, "xx") && !o.nx {
            o.xx = true;
        } else if is(opt, "get") {
            o.get = true;
        } else if is(opt, "keepttl") && o.expire.is_none() {
            o.keep_ttl = true;
        } else if is(opt, "ex") && !o.keep_ttl && !exat && !px && !pxat && has_next {
            o.expire = Some((1000, false, j + 1));
            j += 1;
        } else if is(opt, "px") && !o.keep_ttl && !ex && !exat && !pxat && has_next {
            o.expire = Some((1, false, j + 1));
            j += 1;
        } else if is(opt, "exat") && !o.keep_ttl && !ex && !px && !pxat && has_next {
            o.expire = Some((1000, true, j + 1));
            j += 1;
        } else if is(opt, "pxat") && !o.keep_ttl && !ex && !exat && !px && has_next {
            o.expire = Some((1, true, j + 1));
            j += 1;
        } else {
            return Err(Reply::syntax());
        }
        j += 1;
    }
    Ok(o)
}

/// Redis' `getExpireMillisecondsOrReply`: the absolute expiry in ms.
fn expire_ms(
    ks: &Keyspace,
    arg: &[u8],
    unit: i64,
    absolute: bool,
    cmd: &str,
) -> Result<u64, Reply> {
    let invalid = || Reply::Error(format!("ERR invalid expire time in '{cmd}' command"));
    let v = int_arg(arg)?;
    if v <= 0 || (unit == 1000 && v > i64::MAX / 1000) {
        return Err(invalid());
    }
    let mut ms = v * unit;
    if !absolute {
        ms = ms.checked_add(now_i64(ks)).ok_or_else(invalid)?;
    }
    u64::try_from(ms).map_err(|_| invalid())
}

fn now_i64(ks: &Keyspace) -> i64 {
    i64::try_from(ks.now()).unwrap_or(i64::MAX)
}

pub fn set(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let o = match parse_set(argv) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let expire = match o.expire {
        Some((unit, absolute, idx)) => match expire_ms(ks, argv[idx], unit, absolute, "set") {
            Ok(at) => Some(at),
            Err(e) => return e,
        },
        None => None,
    };
    let key = argv[1];
    let old = if o.get {
        match ks.get_str(key) {
            Ok(v) => Some(Reply::opt_bulk(v)),
            Err(e) => return e,
        }
    } else {
        None
    };
    let found = ks.exists(key);
    if (o.nx && found) || (o.xx && !found) {
        return old.unwrap_or(Reply::Nil);
    }
    ks.set(key, Val::Str(argv[2].to_vec()), o.keep_ttl);
    if let Some(at) = expire {
        ks.set_expire(key, Some(at));
    }
    old.unwrap_or_else(Reply::ok)
}

pub fn setnx(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    if ks.exists(argv[1]) {
        return Reply::Int(0);
    }
    ks.set(argv[1], Val::Str(argv[2].to_vec()), false);
    Reply::Int(1)
}

/// INCRBY and friends: the value must be a strict integer; the expiry is kept.
fn incr_by(ks: &mut Keyspace, key: &[u8], by: i64) -> Reply {
    let current = match ks.get_str(key) {
        Ok(Some(v)) => match crate::num::parse_i64(v) {
            Some(n) => n,
            None => return Reply::not_int(),
        },
        Ok(None) => 0,
        Err(e) => return e,
    };
    let Some(next) = current.checked_add(by) else {
        return Reply::err(OVERFLOW);
    };
    let text = next.to_string().into_bytes();
    match ks.str_mut(key) {
        Ok(Some(v)) => *v = text,
        _ => ks.set(key, Val::Str(text), false),
    }
    Reply::Int(next)
}

pub fn incrby(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match int_arg(argv[2]) {
        Ok(by) => incr_by(ks, argv[1], by),
        Err(e) => e,
    }
}

pub fn incr(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    incr_by(ks, argv[1], 1)
}

pub fn decr(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    incr_by(ks, argv[1], -1)
}

pub fn decrby(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match int_arg(argv[2]) {
        Ok(i64::MIN) => Reply::err("ERR decrement would overflow"),
        Ok(by) => incr_by(ks, argv[1], -by),
        Err(e) => e,
    }
}

pub fn del(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let n = argv[1..].iter().filter(|k| ks.remove(k)).count();
    Reply::Int(n as i64)
}

pub fn exists(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let n = argv[1..].iter().filter(|k| ks.exists(k)).count();
    Reply::Int(n as i64)
}

/// EXPIRE / PEXPIRE key time [NX|XX|GT|LT] (Redis 7.0's `expireGenericCommand`).
fn expire_generic(ks: &mut Keyspace, argv: &[&[u8]], unit: i64, cmd: &str) -> Reply {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &argv[3..] {
        if is(opt, "nx") {
            nx = true;
        } else if is(opt, "xx") {
            xx = true;
        } else if is(opt, "gt") {
            gt = true;
        } else if is(opt, "lt") {
            lt = true;
        } else {
            return Reply::Error(format!(
                "ERR Unsupported option {}",
                String::from_utf8_lossy(opt)
            ));
        }
    }
    if nx && (xx || gt || lt) {
        return Reply::err("ERR NX and XX, GT or LT options at the same time are not compatible");
    }
    if gt && lt {
        return Reply::err("ERR GT and LT options at the same time are not compatible");
    }
    let invalid = || Reply::Error(format!("ERR invalid expire time in '{cmd}' command"));
    let mut when = match int_arg(argv[2]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if unit == 1000 {
        if !(i64::MIN / 1000..=i64::MAX / 1000).contains(&when) {
            return invalid();
        }
        when *= 1000;
    }
    let now = now_i64(ks);
    let Some(when) = when.checked_add(now).filter(|_| when <= i64::MAX - now) else {
        return invalid();
    };
    let Some(current) = ks.expire_at(argv[1]) else {
        return Reply::Int(0);
    };
    let current = current.map(|c| i64::try_from(c).unwrap_or(i64::MAX));
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current.is_none_or(|c| when <= c))
        || (lt && current.is_some_and(|c| when >= c));
    if refused {
        return Reply::Int(0);
    }
    if when <= now {
        ks.remove(argv[1]);
    } else {
        ks.set_expire(argv[1], u64::try_from(when).ok());
    }
    Reply::Int(1)
}

pub fn pexpire(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    expire_generic(ks, argv, 1, "pexpire")
}

pub fn expire(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    expire_generic(ks, argv, 1000, "expire")
}

/// PTTL/TTL: -2 missing, -1 no expiry, else the time left (TTL rounds to the nearest second).
fn ttl_generic(ks: &Keyspace, key: &[u8], ms: bool) -> Reply {
    match ks.expire_at(key) {
        None => Reply::Int(-2),
        Some(None) => Reply::Int(-1),
        Some(Some(at)) => {
            let left = i64::try_from(at.saturating_sub(ks.now())).unwrap_or(i64::MAX);
            Reply::Int(if ms { left } else { (left + 500) / 1000 })
        }
    }
}

pub fn pttl(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    ttl_generic(ks, argv[1], true)
}

pub fn ttl(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    ttl_generic(ks, argv[1], false)
}
