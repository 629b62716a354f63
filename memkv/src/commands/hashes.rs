//! Hash commands: HGET, HMGET, HSET, HDEL, HINCRBY, HGETALL, HLEN, HEXISTS.

use super::int_arg;
use crate::keyspace::Keyspace;
use crate::reply::{Reply, OVERFLOW};

pub fn hget(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.hash(argv[1]) {
        Ok(h) => Reply::opt_bulk(h.and_then(|h| h.get(argv[2]))),
        Err(e) => e,
    }
}

pub fn hmget(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.hash(argv[1]) {
        Ok(h) => Reply::Array(
            argv[2..]
                .iter()
                .map(|f| Reply::opt_bulk(h.and_then(|h| h.get(f))))
                .collect(),
        ),
        Err(e) => e,
    }
}

pub fn hset(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    if argv.len() % 2 == 1 {
        return Reply::arity("hset");
    }
    let h = match ks.hash_or_create(argv[1]) {
        Ok(h) => h,
        Err(e) => return e,
    };
    let added = argv[2..]
        .chunks(2)
        .filter(|fv| h.insert(fv[0], fv[1].to_vec()))
        .count();
    Reply::Int(added as i64)
}

pub fn hdel(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let removed = match ks.hash_mut(argv[1]) {
        Ok(Some(h)) => argv[2..].iter().filter(|f| h.remove(f)).count(),
        Ok(None) => return Reply::Int(0),
        Err(e) => return e,
    };
    ks.remove_if_empty(argv[1]);
    Reply::Int(removed as i64)
}

pub fn hincrby(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let by = match int_arg(argv[3]) {
        Ok(by) => by,
        Err(e) => return e,
    };
    let h = match ks.hash_or_create(argv[1]) {
        Ok(h) => h,
        Err(e) => return e,
    };
    let current = match h.get(argv[2]) {
        Some(v) => match crate::num::parse_i64(v) {
            Some(n) => n,
            None => return Reply::err("ERR hash value is not an integer"),
        },
        None => 0,
    };
    let Some(next) = current.checked_add(by) else {
        return Reply::err(OVERFLOW);
    };
    h.insert(argv[2], next.to_string().into_bytes());
    Reply::Int(next)
}

pub fn hgetall(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.hash(argv[1]) {
        Ok(h) => Reply::Array(
            h.into_iter()
                .flat_map(|h| h.iter())
                .flat_map(|(f, v)| [Reply::bulk(f), Reply::bulk(v)])
                .collect(),
        ),
        Err(e) => e,
    }
}

pub fn hlen(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.hash(argv[1]) {
        Ok(h) => Reply::Int(h.map_or(0, |h| h.len()) as i64),
        Err(e) => e,
    }
}

pub fn hexists(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.hash(argv[1]) {
        Ok(h) => Reply::Int(i64::from(h.is_some_and(|h| h.get(argv[2]).is_some()))),
        Err(e) => e,
    }
}
