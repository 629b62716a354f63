//! Sorted set commands: ZADD (with NX/XX/GT/LT/CH/INCR), ZREM, ZRANGE (by rank or BYSCORE,
//! REV, LIMIT, WITHSCORES), ZRANGEBYSCORE, ZCARD, ZSCORE.

use super::is;
use crate::keyspace::{Keyspace, Val};
use crate::num::{fmt_double, parse_f64_strict, parse_i64, strtod};
use crate::reply::{Reply, NOT_FLOAT};
use crate::types::zset::{Ranked, ScoreBound};
use crate::types::ZSet;

pub fn zadd(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let (mut nx, mut xx, mut gt, mut lt, mut ch, mut incr) =
        (false, false, false, false, false, false);
    let mut idx = 2;
    while idx < argv.len() {
        let opt = argv[idx];
        if is(opt, "nx") {
            nx = true;
        } else if is(opt, "xx") {
            xx = true;
        } else if is(opt, "ch") {
            ch = true;
        } else if is(opt, "incr") {
            incr = true;
        } else if is(opt, "gt") {
            gt = true;
        } else if is(opt, "lt") {
            lt = true;
        } else {
            break;
        }
        idx += 1;
    }
    let pairs = &argv[idx..];
    if pairs.is_empty() || pairs.len() % 2 != 0 {
        return Reply::syntax();
    }
    if nx && xx {
        return Reply::err("ERR XX and NX options at the same time are not compatible");
    }
    if (nx && (gt || lt)) || (gt && lt) {
        return Reply::err("ERR GT, LT, and/or NX options at the same time are not compatible");
    }
    if incr && pairs.len() > 2 {
        return Reply::err("ERR INCR option supports a single increment-element pair");
    }
    let mut scores = Vec::with_capacity(pairs.len() / 2);
    for pair in pairs.chunks(2) {
        match parse_f64_strict(pair[0]) {
            Some(s) => scores.push(s),
            None => return Reply::err(NOT_FLOAT),
        }
    }
    let key = argv[1];
    match ks.zset(key) {
        Err(e) => return e,
        Ok(None) if xx => return if incr { Reply::Nil } else { Reply::Int(0) },
        Ok(None) => ks.set(key, Val::ZSet(ZSet::default()), false),
        Ok(Some(_)) => {}
    }
    let Ok(Some(z)) = ks.zset_mut(key) else {
        return Reply::wrongtype();
    };
    let (mut added, mut updated, mut processed) = (0i64, 0i64, 0i64);
    let mut last_score = 0.0;
    for (pair, &given) in pairs.chunks(2).zip(&scores) {
        let member = pair[1];
        match z.score(member) {
            Some(cur) => {
                if nx {
                    continue;
                }
                let score = if incr { cur + given } else { given };
                if score.is_nan() {
                    return Reply::err("ERR resulting score is not a number (NaN)");
                }
                if (lt && score >= cur) || (gt && score <= cur) {
                    continue;
                }
                last_score = score;
                if score != cur {
                    z.insert(member, score);
                    updated += 1;
                }
                processed += 1;
            }
            None if !xx => {
                z.insert(member, given);
                last_score = given;
                added += 1;
                processed += 1;
            }
            None => {}
        }
    }
    if incr {
        if processed > 0 {
            Reply::bulk(fmt_double(last_score))
        } else {
            Reply::Nil
        }
    } else {
        Reply::Int(if ch { added + updated } else { added })
    }
}

pub fn zrem(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let removed = match ks.zset_mut(argv[1]) {
        Ok(Some(z)) => argv[2..].iter().filter(|m| z.remove(m)).count(),
        Ok(None) => return Reply::Int(0),
        Err(e) => return e,
    };
    ks.remove_if_empty(argv[1]);
    Reply::Int(removed as i64)
}

pub fn zcard(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.zset(argv[1]) {
        Ok(z) => Reply::Int(z.map_or(0, |z| z.len()) as i64),
        Err(e) => e,
    }
}

pub fn zscore(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match ks.zset(argv[1]) {
        Ok(z) => z
            .and_then(|z| z.score(argv[2]))
            .map_or(Reply::Nil, |s| Reply::bulk(fmt_double(s))),
        Err(e) => e,
    }
}

#[derive(PartialEq, Clone, Copy)]
enum RangeType {
    Auto,
    Rank,
    Score,
    Lex,
}

/// ZRANGE (`score_only == false`) and ZRANGEBYSCORE: Redis 7.0's `zrangeGenericCommand`.
fn zrange_generic(ks: &mut Keyspace, argv: &[&[u8]], by_score_cmd: bool) -> Reply {
    let mut range_type = if by_score_cmd {
        RangeType::Score
    } else {
        RangeType::Auto
    };
    let mut reverse: Option<bool> = if by_score_cmd { Some(false) } else { None };
    let (mut withscores, mut offset, mut limit) = (false, 0i64, -1i64);
    let mut j = 4;
    while j < argv.len() {
        let left = argv.len() - j - 1;
        let opt = argv[j];
        if is(opt, "withscores") {
            withscores = true;
        } else if is(opt, "limit") && left >= 2 {
            match (parse_i64(argv[j + 1]), parse_i64(argv[j + 2])) {
                (Some(o), Some(l)) => (offset, limit) = (o, l),
                _ => return Reply::not_int(),
            }
            j += 2;
        } else if reverse.is_none() && is(opt, "rev") {
            reverse = Some(true);
        } else if range_type == RangeType::Auto && is(opt, "bylex") {
            range_type = RangeType::Lex;
        } else if range_type == RangeType::Auto && is(opt, "byscore") {
            range_type = RangeType::Score;
        } else {
            return Reply::syntax();
        }
        j += 1;
    }
    let reverse = reverse.unwrap_or(false);
    if range_type == RangeType::Auto {
        range_type = RangeType::Rank;
    }
    if limit != -1 && range_type == RangeType::Rank {
        return Reply::err(
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
        );
    }
    if withscores && range_type == RangeType::Lex {
        return Reply::err("ERR syntax error, WITHSCORES not supported in combination with BYLEX");
    }
    if range_type == RangeType::Lex {
        // Not implemented: say so rather than answer something else than Redis would.
        return Reply::err("ERR BYLEX is not supported by the embedded store");
    }
    let (lo_arg, hi_arg) = if reverse && range_type == RangeType::Score {
        (argv[3], argv[2])
    } else {
        (argv[2], argv[3])
    };
    let out = |items: Vec<&Ranked>| {
        let mut v = Vec::with_capacity(items.len() * if withscores { 2 } else { 1 });
        for r in items {
            v.push(Reply::bulk(r.member.clone()));
            if withscores {
                v.push(Reply::bulk(fmt_double(r.score)));
            }
        }
        Reply::Array(v)
    };
    if range_type == RangeType::Rank {
        let (Some(start), Some(end)) = (parse_i64(lo_arg), parse_i64(hi_arg)) else {
            return Reply::not_int();
        };
        let z = match ks.zset(argv[1]) {
            Ok(Some(z)) => z,
            Ok(None) => return Reply::Array(vec![]),
            Err(e) => return e,
        };
        let len = z.len() as i64;
        let (mut start, mut end) = (start, end);
        if start < 0 {
            start += len;
        }
        if end < 0 {
            end += len;
        }
        start = start.max(0);
        if start > end || start >= len {
            return Reply::Array(vec![]);
        }
        end = end.min(len - 1);
        let take = usize::try_from(end - start + 1).unwrap_or(0);
        let skip = usize::try_from(start).unwrap_or(0);
        let items: Vec<&Ranked> = if reverse {
            z.iter().rev().skip(skip).take(take).collect()
        } else {
            z.iter().skip(skip).take(take).collect()
        };
        return out(items);
    }
    let (Some(min), Some(max)) = (score_bound(lo_arg), score_bound(hi_arg)) else {
        return Reply::err("ERR min or max is not a float");
    };
    let z = match ks.zset(argv[1]) {
        Ok(Some(z)) => z,
        Ok(None) => return Reply::Array(vec![]),
        Err(e) => return e,
    };
    if offset > 0 && offset >= z.len() as i64 {
        return Reply::Array(vec![]);
    }
    if offset < 0 {
        return Reply::Array(vec![]);
    }
    let skip = usize::try_from(offset).unwrap_or(0);
    let take = if limit < 0 {
        usize::MAX
    } else {
        usize::try_from(limit).unwrap_or(0)
    };
    let range = z.range_by_score(min, max);
    let items: Vec<&Ranked> = if reverse {
        range.rev().skip(skip).take(take).collect()
    } else {
        range.skip(skip).take(take).collect()
    };
    out(items)
}

/// A score range bound: `1.5`, `(1.5` (exclusive), `-inf`, `+inf`. Like Redis' `zslParseRange`
/// it is C's `strtod` and must consume the whole argument.
fn score_bound(arg: &[u8]) -> Option<ScoreBound> {
    let (text, exclusive) = match arg.split_first() {
        Some((b'(', rest)) => (rest, true),
        _ => (arg, false),
    };
    let r = strtod(text);
    if r.len != text.len() || r.value.is_nan() {
        return None;
    }
    Some(ScoreBound {
        value: r.value,
        exclusive,
    })
}

/// `ZREMRANGEBYSCORE key min max`: removes the members whose score is in the range; answers
/// how many.
pub fn zremrangebyscore(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let (Some(min), Some(max)) = (score_bound(argv[2]), score_bound(argv[3])) else {
        return Reply::err("ERR min or max is not a float");
    };
    let removed = match ks.zset_mut(argv[1]) {
        Ok(Some(z)) => {
            let gone: Vec<Vec<u8>> = z
                .range_by_score(min, max)
                .map(|r| r.member.clone())
                .collect();
            for m in &gone {
                z.remove(m);
            }
            gone.len()
        }
        Ok(None) => return Reply::Int(0),
        Err(e) => return e,
    };
    ks.remove_if_empty(argv[1]);
    Reply::Int(removed as i64)
}

pub fn zrange(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    zrange_generic(ks, argv, false)
}

pub fn zrangebyscore(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    zrange_generic(ks, argv, true)
}
