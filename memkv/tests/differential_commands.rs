//! Plain commands, run against the real Redis and against MemKv: every reply must be
//! identical (clock-dependent ones — TTLs, stream auto ids, TIME — are compared by shape).

mod common;

use common::{c, Outcome, Pair};
use redis::Value;

fn int(o: &Outcome) -> i64 {
    match o.value() {
        Value::Int(i) => *i,
        v => panic!("not an int: {v:?}"),
    }
}

#[tokio::test]
async fn strings_and_keys() {
    let mut p = Pair::new().await;
    let (a, b, n, h) = (p.k("a"), p.k("b"), p.k("n"), p.k("h"));
    let (a, b, n, h) = (a.as_str(), b.as_str(), n.as_str(), h.as_str());
    for args in [
        &["GET", a][..],
        &["SET", a, "1"],
        &["GET", a],
        &["SET", a, "2", "NX"],
        &["SET", a, "3", "XX"],
        &["SET", b, "x", "XX"],
        &["SET", b, "x", "NX"],
        &["SET", a, "4", "GET"],
        &["SET", n, "9", "NX", "GET"],
        &["SET", a, "1", "nx", "xx"],
        &["SET", a, "1", "EX"],
        &["SET", a, "1", "PX", "0"],
        &["SET", a, "1", "PX", "-5"],
        &["SET", a, "1", "PX", "abc"],
        &["SET", a, "1", "EX", "1", "PX", "1"],
        &["SET", a, "1", "KEEPTTL", "PX", "10"],
        &["SET", a, "1", "bogus"],
        &["SET", a, "1", "EX", "9223372036854775807"],
        &["SET", a],
        &["SETNX", a, "z"],
        &["SETNX", p.k("new").as_str(), "z"],
        &["SETNX", a],
        &["DEL", a, b, a, p.k("missing").as_str()],
        &["EXISTS", a, b, n, n],
        &["SET", n, "10"],
        &["INCRBY", n, "5"],
        &["INCRBY", n, "-20"],
        &["INCRBY", n, "x"],
        &["INCRBY", n, "+1"],
        &["INCRBY", n, "01"],
        &["INCRBY", n, "1.5"],
        &["INCRBY", p.k("fresh").as_str(), "7"],
        &["SET", n, "9223372036854775806"],
        &["INCRBY", n, "1"],
        &["INCRBY", n, "1"],
        &["SET", n, " 1"],
        &["INCRBY", n, "1"],
        &["SET", n, "abc"],
        &["INCRBY", n, "1"],
        &["INCR", n],
        &["SET", n, "5"],
        &["INCR", n],
        &["DECR", n],
        &["DECRBY", n, "3"],
        &["DECRBY", n, "-9223372036854775808"],
        &["HSET", h, "f", "v"],
        &["GET", h],
        &["INCRBY", h, "1"],
        &["SET", h, "now-a-string"],
        &["TYPE", h],
        &["GET", a, b],
        &["INCRBY", n],
        // MGET: a missing key and one of another type read as nil.
        &["MGET", a, n, h, b],
        &["MGET", b],
        &["MGET"],
    ] {
        p.s(args).await;
    }
}

#[tokio::test]
async fn expiry_commands() {
    let mut p = Pair::new().await;
    let (a, m) = (p.k("a"), p.k("missing"));
    let (a, m) = (a.as_str(), m.as_str());
    p.s(&["SET", a, "1"]).await;
    for args in [
        &["PTTL", a][..],
        &["TTL", a],
        &["PTTL", m],
        &["TTL", m],
        &["PEXPIRE", m, "1000"],
        &["EXPIRE", m, "10"],
        &["PEXPIRE", a, "x"],
        &["PEXPIRE", a, "1000", "bogus"],
        &["PEXPIRE", a, "1000", "NX", "XX"],
        &["PEXPIRE", a, "1000", "GT", "LT"],
        &["PEXPIRE", a, "9223372036854775807"],
        &["EXPIRE", a, "9223372036854775807"],
        &["PEXPIRE", a, "100000", "XX"],
        &["PEXPIRE", a, "100000", "GT"],
        &["PEXPIRE", a, "100000", "NX"],
        &["PEXPIRE", a, "200000", "NX"],
        &["PEXPIRE", a, "300000", "LT"],
        &["PEXPIRE", a, "50000", "LT"],
        &["PEXPIRE", a, "900000", "GT"],
        &["EXPIRE", a, "100"],
        &["PEXPIRE"],
    ] {
        p.s(args).await;
    }
    // Clock-dependent: PTTL within a tolerance.
    for args in [["PTTL", a], ["TTL", a]] {
        let (r, m) = p.both(&c(&args)).await;
        assert!(
            (int(&r) - int(&m)).abs() <= 1000,
            "{args:?}: {r:?} vs {m:?}"
        );
        assert!(int(&m) > 0);
    }
    // SET without KEEPTTL clears the expiry; with KEEPTTL keeps it.
    p.s(&["SET", a, "2", "KEEPTTL"]).await;
    let (r, m) = p.both(&c(&["PTTL", a])).await;
    assert!(int(&r) > 0 && int(&m) > 0);
    p.s(&["SET", a, "3"]).await;
    p.s(&["PTTL", a]).await;
    // INCRBY keeps the expiry, PEXPIRE in the past deletes.
    p.s(&["SET", a, "1", "PX", "100000"]).await;
    p.s(&["INCRBY", a, "1"]).await;
    let (r, m) = p.both(&c(&["PTTL", a])).await;
    assert!(int(&r) > 90_000 && int(&m) > 90_000);
    p.s(&["PEXPIRE", a, "-1"]).await;
    p.s(&["EXISTS", a]).await;
    p.s(&["SET", a, "1", "EX", "100"]).await;
    p.s(&["EXPIRE", a, "0"]).await;
    p.s(&["GET", a]).await;
    // A key set with PX disappears on both once its time has passed.
    p.s(&["SET", a, "1", "PX", "40"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    p.s(&["GET", a]).await;
    p.s(&["EXISTS", a]).await;
    p.s(&["PTTL", a]).await;
}

#[tokio::test]
async fn hashes() {
    let mut p = Pair::new().await;
    let (h, s, m) = (p.k("h"), p.k("s"), p.k("m"));
    let (h, s, m) = (h.as_str(), s.as_str(), m.as_str());
    p.s(&["SET", s, "x"]).await;
    for args in [
        &["HSET", h, "a", "1", "b", "2"][..],
        &["HSET", h, "a", "9", "c", "3"],
        &["HSET", h, "a"],
        &["HSET", h, "a", "1", "b"],
        &["HGET", h, "a"],
        &["HGET", h, "zz"],
        &["HGET", m, "a"],
        &["HMGET", h, "a", "zz", "c", "a"],
        &["HMGET", m, "a", "b"],
        &["HGETALL", h],
        &["HGETALL", m],
        &["HLEN", h],
        &["HLEN", m],
        &["HEXISTS", h, "a"],
        &["HEXISTS", h, "zz"],
        &["HEXISTS", m, "a"],
        &["HINCRBY", h, "a", "5"],
        &["HINCRBY", h, "new", "-3"],
        &["HINCRBY", h, "a", "x"],
        &["HINCRBY", h, "a", "1.5"],
        &[
            "HSET",
            h,
            "txt",
            "abc",
            "big",
            "9223372036854775807",
            "sp",
            " 1",
        ],
        &["HINCRBY", h, "txt", "1"],
        &["HINCRBY", h, "sp", "1"],
        &["HINCRBY", h, "big", "1"],
        &["HINCRBY", m, "f", "2"],
        &["HGETALL", m],
        &["HDEL", h, "a", "zz", "b"],
        &["HGETALL", h],
        &["HDEL", m, "f"],
        &["EXISTS", m],
        &["HDEL", p.k("none").as_str(), "f"],
        &["HSET", h, "a", "again"],
        &["HGETALL", h],
        &["HGET", s, "a"],
        &["HSET", s, "a", "1"],
        &["HMGET", s, "a"],
        &["HGETALL", s],
        &["HLEN", s],
        &["HDEL", s, "a"],
        &["HINCRBY", s, "a", "1"],
        &["HEXISTS", s, "a"],
        &["TYPE", h],
    ] {
        p.s(args).await;
    }
}

#[tokio::test]
async fn sorted_sets() {
    let mut p = Pair::new().await;
    let (z, s, m) = (p.k("z"), p.k("s"), p.k("m"));
    let (z, s, m) = (z.as_str(), s.as_str(), m.as_str());
    p.s(&["SET", s, "x"]).await;
    for args in [
        &[
            "ZADD", z, "0", "b", "0", "a", "0", "c", "1.5", "x", "-2", "y",
        ][..],
        &["ZADD", z, "0", "b", "3", "a"],
        &["ZADD", z, "1"],
        &["ZADD", z, "1", "a", "2"],
        &["ZADD", z, "x", "a"],
        &["ZADD", z, "nan", "a"],
        &["ZADD", z, "inf", "top", "-inf", "bottom", "+1e3", "e"],
        &["ZADD", z, "NX", "XX", "1", "a"],
        &["ZADD", z, "GT", "LT", "1", "a"],
        &["ZADD", z, "NX", "5", "a", "5", "nx-new"],
        &["ZADD", z, "XX", "CH", "7", "a", "7", "xx-new"],
        &["ZADD", z, "GT", "CH", "1", "a", "8", "b"],
        &["ZADD", z, "LT", "CH", "100", "c", "-1", "c"],
        &["ZADD", z, "INCR", "2", "a"],
        &["ZADD", z, "INCR", "2", "a", "1", "b"],
        &["ZADD", z, "XX", "INCR", "2", "nobody"],
        &["ZADD", z, "INCR", "-inf", "top"],
        &["ZADD", m, "XX", "1", "a"],
        &["ZCARD", z],
        &["ZCARD", m],
        &["ZSCORE", z, "a"],
        &["ZSCORE", z, "x"],
        &["ZSCORE", z, "top"],
        &["ZSCORE", z, "nobody"],
        &["ZSCORE", m, "a"],
        &["ZRANGE", z, "0", "-1"],
        &["ZRANGE", z, "0", "-1", "WITHSCORES"],
        &["ZRANGE", z, "1", "2"],
        &["ZRANGE", z, "-2", "-1"],
        &["ZRANGE", z, "-100", "100"],
        &["ZRANGE", z, "5", "2"],
        &["ZRANGE", z, "50", "60"],
        &["ZRANGE", z, "0", "1", "REV"],
        &["ZRANGE", z, "0", "-1", "REV", "WITHSCORES"],
        &["ZRANGE", z, "x", "1"],
        &["ZRANGE", z, "0", "1", "LIMIT", "0", "1"],
        &["ZRANGE", z, "0", "1", "bogus"],
        &["ZRANGE", z, "-inf", "+inf", "BYSCORE"],
        &["ZRANGE", z, "(0", "5", "BYSCORE", "LIMIT", "1", "2"],
        &["ZRANGE", z, "+inf", "-inf", "BYSCORE", "REV"],
        &[
            "ZRANGE",
            z,
            "10",
            "0",
            "BYSCORE",
            "REV",
            "LIMIT",
            "0",
            "3",
            "WITHSCORES",
        ],
        &["ZRANGE", m, "0", "-1"],
        &["ZRANGEBYSCORE", z, "-inf", "+inf"],
        &["ZRANGEBYSCORE", z, "-inf", "+inf", "WITHSCORES"],
        &["ZRANGEBYSCORE", z, "0", "0"],
        &["ZRANGEBYSCORE", z, "(0", "(8"],
        &["ZRANGEBYSCORE", z, "(0", "8"],
        &["ZRANGEBYSCORE", z, "0", "(0"],
        &["ZRANGEBYSCORE", z, "5", "1"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "1", "3"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "0", "-1"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "0", "0"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "-1", "2"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "100", "2"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "1"],
        &["ZRANGEBYSCORE", z, "-inf", "inf", "LIMIT", "x", "1"],
        &["ZRANGEBYSCORE", z, "a", "1"],
        &["ZRANGEBYSCORE", z, "1", "nan"],
        &["ZRANGEBYSCORE", z, "(", "5"],
        &["ZRANGEBYSCORE", z, "0", "5", "REV"],
        &["ZRANGEBYSCORE", m, "0", "5"],
        &["ZREMRANGEBYSCORE", z, "x", "1"],
        &["ZREMRANGEBYSCORE", z, "5", "1"],
        &["ZREMRANGEBYSCORE", z, "(100", "+inf"],
        &["ZREMRANGEBYSCORE", m, "0", "5"],
        &["ZREMRANGEBYSCORE", s, "0", "5"],
        &["ZREMRANGEBYSCORE", z, "0"],
        &["ZREM", z, "a", "nobody", "b"],
        &["ZRANGE", z, "0", "-1", "WITHSCORES"],
        &["ZREM", m, "a"],
        &["ZADD", m, "1", "only"],
        &["ZREM", m, "only"],
        &["EXISTS", m],
        &["ZADD", s, "1", "a"],
        &["ZRANGE", s, "0", "-1"],
        &["ZRANGE", s, "x", "-1"],
        &["ZRANGEBYSCORE", s, "0", "1"],
        &["ZCARD", s],
        &["ZSCORE", s, "a"],
        &["ZREM", s, "a"],
        &["TYPE", z],
    ] {
        p.s(args).await;
    }
    // Equal scores order by member bytes, including after score changes.
    let q = p.k("lex");
    let members = ["m", "a", "zz", "b", "aa", "A", "", "b\u{e9}", "0"];
    for m in members {
        p.s(&["ZADD", &q, "0", m]).await;
    }
    p.s(&["ZADD", &q, "-0", "neg-zero", "0", "A"]).await;
    p.s(&["ZRANGE", &q, "0", "-1", "WITHSCORES"]).await;
    p.s(&["ZSCORE", &q, "neg-zero"]).await;
    p.s(&["ZRANGEBYSCORE", &q, "0", "0", "LIMIT", "2", "3"])
        .await;
    // ZREMRANGEBYSCORE takes what is in range, bounds exclusive or not, and the key with its
    // last member.
    let r = p.k("rem");
    for (score, member) in [("1", "a"), ("2", "b"), ("3", "c"), ("4", "d"), ("5", "e")] {
        p.s(&["ZADD", &r, score, member]).await;
    }
    p.s(&["ZREMRANGEBYSCORE", &r, "-inf", "(2"]).await;
    p.s(&["ZREMRANGEBYSCORE", &r, "(3", "4"]).await;
    p.s(&["ZRANGE", &r, "0", "-1", "WITHSCORES"]).await;
    p.s(&["ZREMRANGEBYSCORE", &r, "-inf", "+inf"]).await;
    p.s(&["EXISTS", &r]).await;
}

#[tokio::test]
async fn streams() {
    let mut p = Pair::new().await;
    let (x, s, m) = (p.k("x"), p.k("s"), p.k("m"));
    let (x, s, m) = (x.as_str(), s.as_str(), m.as_str());
    p.s(&["SET", s, "1"]).await;
    for args in [
        &["XADD", x, "1-1", "f", "v"][..],
        &["XADD", x, "1-1", "f", "v"],
        &["XADD", x, "1-0", "f", "v"],
        &["XADD", x, "0-0", "f", "v"],
        &["XADD", x, "1-2", "a", "1", "b", "2"],
        &["XADD", x, "1-*", "f", "seq"],
        &["XADD", x, "5", "f", "ms-only"],
        &["XADD", x, "7-*", "f", "new-ms"],
        &["XADD", x, "3-*", "f", "older"],
        &["XADD", x, "8-0", "f"],
        &["XADD", x, "8-0"],
        &["XADD", x, "bad", "f", "v"],
        &["XADD", x, "-", "f", "v"],
        &["XADD", x, "8-x", "f", "v"],
        &["XADD", x, "nomkstream", "9-0", "f", "v"],
        &["XADD", m, "NOMKSTREAM", "*", "f", "v"],
        &["EXISTS", m],
        &["XADD", x, "MAXLEN", "-1", "*", "f", "v"],
        &["XADD", x, "MAXLEN", "5", "MINID", "1", "*", "f", "v"],
        &["XADD", x, "LIMIT", "5", "*", "f", "v"],
        &["XADD", x, "MAXLEN", "5", "LIMIT", "5", "*", "f", "v"],
        &["XADD", s, "*", "f", "v"],
        &["XLEN", x],
        &["XLEN", m],
        &["XLEN", s],
        &["XRANGE", x, "-", "+"],
        &["XRANGE", x, "-", "+", "COUNT", "2"],
        &["XRANGE", x, "-", "+", "COUNT", "0"],
        &["XRANGE", x, "-", "+", "COUNT", "-3"],
        &["XRANGE", x, "-", "+", "COUNT"],
        &["XRANGE", x, "-", "+", "LIMIT", "1"],
        &["XRANGE", x, "1", "1"],
        &["XRANGE", x, "1-1", "5"],
        &["XRANGE", x, "(1-1", "+"],
        &["XRANGE", x, "-", "(7-0"],
        &["XRANGE", x, "(1", "+"],
        &["XRANGE", x, "(-", "+"],
        &["XRANGE", x, "-", "(+"],
        &[
            "XRANGE",
            x,
            "(18446744073709551615-18446744073709551615",
            "+",
        ],
        &["XRANGE", x, "-", "(0-0"],
        &["XRANGE", x, "9", "1"],
        &["XRANGE", x, "x", "+"],
        &["XRANGE", x, "01", "+"],
        &["XRANGE", x, "-1", "+"],
        &["XRANGE", m, "-", "+"],
        &["XRANGE", s, "-", "+"],
        &["XREVRANGE", x, "+", "-"],
        &["XREVRANGE", x, "+", "-", "COUNT", "1"],
        &["XREVRANGE", x, "(7-0", "(1-1"],
        &["XREVRANGE", x, "-", "+"],
        &["XREVRANGE", s, "+", "-"],
        &["XDEL", x, "1-2", "99-0"],
        &["XDEL", x, "1-1", "bad"],
        &["XDEL", m, "1-1"],
        &["XDEL", s, "1-1"],
        &["XRANGE", x, "-", "+"],
        &["XTRIM", x, "MINID", "5"],
        &["XTRIM", x, "MINID", "=", "5-1"],
        &["XRANGE", x, "-", "+"],
        &["XTRIM", x, "MAXLEN", "1"],
        &["XRANGE", x, "-", "+"],
        &["XTRIM", x, "MAXLEN", "x"],
        &["XTRIM", x, "MINID", "-"],
        &["XTRIM", x, "foo", "1"],
        &["XTRIM", x, "MAXLEN", "1", "extra"],
        &["XTRIM", m, "MAXLEN", "0"],
        &["XTRIM", s, "MAXLEN", "0"],
        &["XTRIM", x, "MAXLEN", "0"],
        &["XLEN", x],
        &["EXISTS", x],
        &["TYPE", x],
        &["XADD", x, "8-0", "f", "after-emptied"],
        &["XADD", x, "MAXLEN", "2", "8-1", "f", "v"],
        &["XADD", x, "MAXLEN", "=", "2", "8-2", "f", "v"],
        &["XRANGE", x, "-", "+"],
        &["XADD", x, "MINID", "8-2", "8-3", "f", "v"],
        &[
            "XADD", x, "MINID", "=", "8-3", "LIMIT", "0", "8-4", "f", "v",
        ],
        &["XADD", x, "MAXLEN", "0", "8-5", "f", "gone"],
        &["XLEN", x],
        &["XADD", x, "MAXLEN", "1", "LIMIT", "5", "*", "f", "v"],
        &["XADD", x, "MAXLEN", "1"],
        &["XTRIM", x, "MAXLEN", "-1"],
        &["XTRIM", x, "LIMIT", "1", "MAXLEN", "0"],
        &["XTRIM", x, "MAXLEN"],
        &["XADD", x, "9-0", "f", "v"],
        &["XRANGE", x, "-", "+"],
    ] {
        p.s(args).await;
    }
    // Auto ids depend on the clock: strictly increasing, `ms-seq`, ms close to now.
    let y = p.k("auto");
    let mut last = (0u64, 0u64);
    for i in 0..20 {
        let (r, m) = p.both(&c(&["XADD", &y, "*", "i", &i.to_string()])).await;
        for o in [&r, &m] {
            let Value::BulkString(id) = o.value() else {
                panic!("{o:?}")
            };
            let id = String::from_utf8_lossy(id).into_owned();
            let (ms, seq) = id.split_once('-').expect("ms-seq");
            let _: u64 = ms.parse().expect("ms");
            let _: u64 = seq.parse().expect("seq");
        }
        let Value::BulkString(id) = m.value() else {
            unreachable!()
        };
        let id = String::from_utf8_lossy(id).into_owned();
        let (ms, seq) = id.split_once('-').unwrap_or_default();
        let cur: (u64, u64) = (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0));
        assert!(cur > last, "{cur:?} after {last:?}");
        last = cur;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    assert!(last.0.abs_diff(now) < 5_000);
    // Entries read back have the same shape on both.
    let (r, m) = p.both(&c(&["XRANGE", &y, "-", "+", "COUNT", "3"])).await;
    let shape = |o: &Outcome| match o.value() {
        Value::Array(items) => items
            .iter()
            .map(|e| match e {
                Value::Array(parts) => match parts.as_slice() {
                    [Value::BulkString(_), Value::Array(fv)] => fv.clone(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(shape(&m), shape(&r));
}

#[tokio::test]
async fn server_commands_and_errors() {
    let mut p = Pair::new().await;
    let (a, h) = (p.k("a"), p.k("h"));
    let (a, h) = (a.as_str(), h.as_str());
    p.s(&["SET", a, "1"]).await;
    p.s(&["HSET", h, "f", "1"]).await;
    p.s(&["ZADD", p.k("z").as_str(), "1", "m"]).await;
    p.s(&["XADD", p.k("x").as_str(), "1-1", "f", "v"]).await;
    for args in [
        &["PING"][..],
        &["PING", "hello"],
        &["PING", "a", "b"],
        &["ping"],
        &["TYPE", a],
        &["TYPE", h],
        &["type", p.k("z").as_str()],
        &["TYPE", p.k("x").as_str()],
        &["TYPE", p.k("none").as_str()],
        &["CONFIG", "GET", "maxmemory-policy"],
        &["config", "get", "MAXMEMORY-POLICY"],
        &["CONFIG", "GET"],
        &["CONFIG"],
        &["CONFIG", "NOSUCH"],
        &["NOSUCHCOMMAND"],
        &["nosuchcommand", "a", "b"],
        &["GET"],
        &["DBSIZE", "x"],
        &["KEYS"],
        &["TIME", "x"],
        &["SCRIPT"],
        &["SCRIPT", "NOSUCH"],
        &["SCRIPT", "LOAD"],
        &["SCRIPT", "EXISTS"],
        &["SCRIPT", "FLUSH", "BOGUS"],
        &["EVAL"],
        &["EVALSHA", "abc"],
        &["FLUSHALL", "BOGUS"],
        &["FLUSHDB", "a", "b"],
    ] {
        p.s(args).await;
    }
    let long = "x".repeat(300);
    p.s(&["NOSUCH", &long, "b"]).await;
    p.s(&["NOSUCH", "a", &long, "c"]).await;
    // KEYS: Redis answers in hash-table order; compare sorted.
    for pattern in ["*", "?", "[ah]", "[^a]", "[a-h]", "h*", "*x*", "\\a"] {
        let cmd = c(&["KEYS", &format!("{}{pattern}", p.prefix)]);
        let (r, m) = p.both(&cmd).await;
        let sorted = |o: &Outcome| {
            let Value::Array(mut v) = o.value().clone() else {
                panic!()
            };
            v.sort_by_key(|k| format!("{k:?}"));
            v
        };
        assert_eq!(sorted(&m), sorted(&r), "KEYS {pattern}");
    }
    // Shapes only.
    let (r, m) = p.both(&c(&["INFO"])).await;
    assert!(matches!(r.value(), Value::BulkString(_)) && matches!(m.value(), Value::BulkString(_)));
    let (_, m) = p.both(&c(&["INFO", "stats"])).await;
    let Value::BulkString(info) = m.value() else {
        panic!()
    };
    assert!(String::from_utf8_lossy(info).contains("total_commands_processed:"));
    let (r, m) = p.both(&c(&["TIME"])).await;
    for o in [&r, &m] {
        let Value::Array(parts) = o.value() else {
            panic!("{o:?}")
        };
        assert_eq!(parts.len(), 2);
    }
    let secs = |o: &Outcome| match o.value() {
        Value::Array(p) => match &p[0] {
            Value::BulkString(s) => String::from_utf8_lossy(s).parse::<i64>().unwrap_or(0),
            _ => 0,
        },
        _ => 0,
    };
    assert!((secs(&r) - secs(&m)).abs() <= 2);
}

#[tokio::test]
async fn pipelines_and_transactions() {
    let mut p = Pair::new().await;
    let (a, h) = (p.k("a"), p.k("h"));
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(&a)
        .arg("1")
        .cmd("INCRBY")
        .arg(&a)
        .arg(2)
        .cmd("HSET")
        .arg(&a)
        .arg("f")
        .arg("v")
        .cmd("GET")
        .arg(&a);
    let r: redis::RedisResult<Value> = pipe.query_async(&mut p.real).await;
    let m: redis::RedisResult<Value> = pipe.query_async(&mut p.mem).await;
    assert_eq!(Outcome::of(m), Outcome::of(r));

    let mut ok = redis::pipe();
    ok.cmd("SET")
        .arg(&a)
        .arg("5")
        .ignore()
        .cmd("INCRBY")
        .arg(&a)
        .arg(2)
        .cmd("HSET")
        .arg(&h)
        .arg("f")
        .arg("v")
        .cmd("HGETALL")
        .arg(&h);
    let r: redis::RedisResult<Value> = ok.query_async(&mut p.real).await;
    let m: redis::RedisResult<Value> = ok.query_async(&mut p.mem).await;
    assert_eq!(Outcome::of(m), Outcome::of(r));

    // Atomic pipelines: results of EXEC; a runtime error stays in its slot.
    let mut tx = redis::pipe();
    tx.atomic()
        .cmd("INCRBY")
        .arg(&a)
        .arg(1)
        .cmd("INCRBY")
        .arg(&h)
        .arg(1)
        .cmd("GET")
        .arg(&a);
    let r: redis::RedisResult<Value> = tx.query_async(&mut p.real).await;
    let m: redis::RedisResult<Value> = tx.query_async(&mut p.mem).await;
    assert_eq!(Outcome::of(m), Outcome::of(r));
    let mut tx = redis::pipe();
    tx.atomic().cmd("INCRBY").arg(&a).arg(1).cmd("GET").arg(&a);
    let r: redis::RedisResult<(i64, String)> = tx.query_async(&mut p.real).await;
    let m: redis::RedisResult<(i64, String)> = tx.query_async(&mut p.mem).await;
    assert_eq!(m.ok(), r.ok());
    // A command rejected while queuing aborts the transaction.
    let mut bad = redis::pipe();
    bad.atomic().cmd("INCRBY").arg(&a).arg(1).cmd("GET");
    let r: redis::RedisResult<Value> = bad.query_async(&mut p.real).await;
    let m: redis::RedisResult<Value> = bad.query_async(&mut p.mem).await;
    assert_eq!(Outcome::of(m), Outcome::of(r));
    p.s(&["GET", &a]).await;
}

#[tokio::test]
async fn typed_helpers_run_unchanged() {
    let mut p = Pair::new().await;
    let (h, k) = (p.k("h"), p.k("k"));
    async fn run<C: redis::AsyncCommands>(
        conn: &mut C,
        h: &str,
        k: &str,
    ) -> (Option<String>, bool, Option<String>, i64) {
        let _: () = conn.hset(h, "d", "{\"a\":1}").await.unwrap_or_default();
        let got: Option<String> = conn.hget(h, "d").await.unwrap_or_default();
        let fresh: bool = conn.set_nx(k, "v1").await.unwrap_or_default();
        let again: Option<String> = conn.get(k).await.unwrap_or_default();
        let n: i64 = conn.incr(format!("{k}:n"), 5).await.unwrap_or_default();
        (got, fresh, again, n)
    }
    let r = run(&mut p.real, &h, &k).await;
    let m = run(&mut p.mem, &h, &k).await;
    assert_eq!(m, r);
    assert_eq!(m, (Some("{\"a\":1}".into()), true, Some("v1".into()), 5));
}

/// Only on MemKv: commands that would touch the whole shared Redis (FLUSHALL, DBSIZE).
#[tokio::test]
async fn whole_keyspace_commands_on_memkv() {
    let kv = tollgate_memkv::MemKv::new();
    let mut conn = kv.conn();
    let q = |args: &[&str]| c(args);
    let v = |r: redis::RedisResult<Value>| r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        v(q(&["DBSIZE"]).query_async(&mut conn).await),
        Value::Int(0)
    );
    v(q(&["SET", "a", "1"]).query_async(&mut conn).await);
    v(q(&["HSET", "b", "f", "1"]).query_async(&mut conn).await);
    assert_eq!(
        v(q(&["DBSIZE"]).query_async(&mut conn).await),
        Value::Int(2)
    );
    assert_eq!(kv.dbsize(), 2);
    assert_eq!(v(q(&["FLUSHDB"]).query_async(&mut conn).await), Value::Okay);
    assert_eq!(kv.dbsize(), 0);
    v(q(&["SET", "a", "1"]).query_async(&mut conn).await);
    assert_eq!(
        v(q(&["FLUSHALL", "ASYNC"]).query_async(&mut conn).await),
        Value::Okay
    );
    assert_eq!(
        v(q(&["KEYS", "*"]).query_async(&mut conn).await),
        Value::Array(vec![])
    );
    // Scripts survive FLUSHALL, as in Redis.
    let sha: String = q(&["SCRIPT", "LOAD", "return 1"])
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    v(q(&["FLUSHALL"]).query_async(&mut conn).await);
    assert_eq!(
        v(q(&["EVALSHA", &sha, "0"]).query_async(&mut conn).await),
        Value::Int(1)
    );
    let info: String = q(&["INFO", "keyspace"])
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    assert!(info.starts_with("# Keyspace"), "{info}");
    assert_eq!(conn.clone_get_db(), 0);
}

trait GetDb {
    fn clone_get_db(&self) -> i64;
}

impl GetDb for tollgate_memkv::MemConn {
    fn clone_get_db(&self) -> i64 {
        redis::aio::ConnectionLike::get_db(self)
    }
}
