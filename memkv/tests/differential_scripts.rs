//! Lua scripts, run against the real Redis and against MemKv: every reply (values and error
//! kind, code and message, including `script: <sha>, on @user_script:N.`) must be identical.
//!
//! Never send Redis 7.0.15 a script that raises a table without a string `err` (such as
//! `error({})`): that crashes the server.

mod common;

use common::{c, Outcome, Pair};
use redis::Value;

/// (script, keys, args), each compared on both stores.
async fn all_same(p: &mut Pair, cases: &[(&str, &[&str], &[&str])]) {
    for (script, keys, args) in cases {
        p.eval(script, keys, args).await;
    }
}

#[tokio::test]
async fn return_value_conversions() {
    let mut p = Pair::new().await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("return 1", &[], &[]),
        ("return 3.99", &[], &[]),
        ("return -3.99", &[], &[]),
        ("return 0.5", &[], &[]),
        ("return 2^53", &[], &[]),
        ("return 1e20", &[], &[]),
        ("return -1e20", &[], &[]),
        ("return 'hello'", &[], &[]),
        ("return ''", &[], &[]),
        ("return '\\0binary\\255'", &[], &[]),
        ("return true", &[], &[]),
        ("return false", &[], &[]),
        ("return nil", &[], &[]),
        ("return", &[], &[]),
        ("return 1, 2", &[], &[]),
        ("return {}", &[], &[]),
        ("return {1, 2, nil, 4}", &[], &[]),
        ("return {1, 'a', {2, true, false}, 3.5, {}}", &[], &[]),
        ("return {1, {2, {3, nil, 4}}, 'x'}", &[], &[]),
        ("return {nil, 1}", &[], &[]),
        ("return {a = 1, b = 2}", &[], &[]),
        ("return {1, 2, a = 3}", &[], &[]),
        ("return {err = 'MYERR something bad'}", &[], &[]),
        ("return {err = 'plain'}", &[], &[]),
        ("return {err = 'ERR with\\nnewline'}", &[], &[]),
        ("return {err = 5}", &[], &[]),
        ("return {ok = 'FINE'}", &[], &[]),
        ("return {ok = 'OK'}", &[], &[]),
        ("return {ok = 5}", &[], &[]),
        ("return {ok = 'a\\r\\nb'}", &[], &[]),
        ("return {err = 'E1 x', ok = 'y'}", &[], &[]),
        ("return {double = 1.5}", &[], &[]),
        ("return {double = 3}", &[], &[]),
        ("return {double = 0.1}", &[], &[]),
        ("return {big_number = '123456789012345678901234567890'}", &[], &[]),
        ("return {map = {a = 1, b = 'x', c = {1, 2}}}", &[], &[]),
        ("return {set = {a = true, b = true, [3] = true}}", &[], &[]),
        ("return {1, {err = 'INNER e'}, {ok = 'in'}}", &[], &[]),
        ("return redis.status_reply('GOOD')", &[], &[]),
        ("return redis.status_reply()", &[], &[]),
        ("return redis.status_reply(5)", &[], &[]),
        ("return redis.error_reply('MYERR hi')", &[], &[]),
        ("return redis.error_reply('hi')", &[], &[]),
        ("return redis.error_reply('-hi there')", &[], &[]),
        ("return redis.error_reply('-NOSPACE')", &[], &[]),
        ("return redis.error_reply('')", &[], &[]),
        ("return redis.error_reply(5)", &[], &[]),
        ("return redis.error_reply('a', 'b')", &[], &[]),
        ("return type(redis.error_reply('x'))", &[], &[]),
        ("return redis.error_reply('x').err", &[], &[]),
        ("return {KEYS[1], KEYS[2], ARGV[1], ARGV[2], #KEYS, #ARGV}", &["k1", "k2"], &["a1", "a2", "a3"]),
        ("return ARGV", &[], &["x", "", "\u{e9}"]),
        ("return KEYS", &[], &[]),
        ("return {type(KEYS), type(ARGV), type(ARGV[1])}", &[], &["1"]),
        ("return tostring(0.1) .. ' ' .. tostring(1e15) .. ' ' .. tostring(1e16) .. ' ' .. 7/2", &[], &[]),
        ("return string.format('%d %s %5.2f %q', 3.7, 'x', 2.345, 'a\\nb')", &[], &[]),
        ("return {math.floor(2.5), math.ceil(2.5), math.max(1, 5, 3), math.abs(-2), math.fmod(7, 3)}", &[], &[]),
        ("return {math.huge > 0, math.pi > 3, tonumber('0x10'), tonumber('1e2'), tonumber('z')}", &[], &[]),
        ("return {string.rep('ab', 3), ('x'):upper(), string.sub('hello', 2, 3), #'abc'}", &[], &[]),
        ("return {string.find('hello', 'l+'), string.match('k:12:v', ':(%d+):'), string.gsub('aaa', 'a', 'b')}", &[], &[]),
        ("local t = {} for i = 1, 5 do t[#t + 1] = i * i end return table.concat(t, ',')", &[], &[]),
        ("local t = {3, 1, 2} table.sort(t) return t", &[], &[]),
        ("local t = {1, 2} table.insert(t, 1, 0) table.remove(t) return {unpack(t)}", &[], &[]),
        ("return {select('#', 1, nil, 3), select(2, 'a', 'b', 'c')}", &[], &[]),
        ("local co = coroutine.create(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
          local _, x = coroutine.resume(co, 1) local _, y = coroutine.resume(co, 10) return {x, y}", &[], &[]),
        ("return _VERSION", &[], &[]),
        ("return {type(_G), type(string), type(redis), type(cjson), type(coroutine), type(loadstring)}", &[], &[]),
        ("return getmetatable('').__index == string", &[], &[]),
        ("return {pcall(function() return 1, 2 end)}", &[], &[]),
        ("return {xpcall(function() error('boom') end, function(e) return 'handled: ' .. e end)}", &[], &[]),
        ("local f = loadstring('return 1 + 1') return f()", &[], &[]),
        ("local f, e = loadstring('return +') return {tostring(f), e}", &[], &[]),
        ("local f = loadstring('return KEYS[1]') return f()", &["lk"], &[]),
        ("return redis.sha1hex('abc')", &[], &[]),
        ("return redis.sha1hex('')", &[], &[]),
        ("return redis.sha1hex(5)", &[], &[]),
        ("return {redis.LOG_DEBUG, redis.LOG_VERBOSE, redis.LOG_NOTICE, redis.LOG_WARNING}", &[], &[]),
        ("return {redis.REPL_NONE, redis.REPL_AOF, redis.REPL_REPLICA, redis.REPL_SLAVE, redis.REPL_ALL}", &[], &[]),
        ("return {redis.REDIS_VERSION, redis.REDIS_VERSION_NUM}", &[], &[]),
        ("redis.log(redis.LOG_WARNING, 'hello', 'world') return 1", &[], &[]),
        ("return redis.replicate_commands()", &[], &[]),
        ("redis.set_repl(redis.REPL_ALL) return 1", &[], &[]),
        ("redis.setresp(2) return 1", &[], &[]),
    ];
    all_same(&mut p, cases).await;
}

#[tokio::test]
async fn redis_call_conversions() {
    let mut p = Pair::new().await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("return redis.call('SET', KEYS[1], 'v')", &["s"], &[]),
        ("local r = redis.call('SET', KEYS[1], 'v') return {type(r), r.ok}", &["s"], &[]),
        ("return redis.call('GET', KEYS[1])", &["s"], &[]),
        ("return redis.call('GET', KEYS[1])", &["missing"], &[]),
        ("return {redis.call('GET', KEYS[1]) == false, type(redis.call('GET', KEYS[1]))}", &["missing"], &[]),
        ("return redis.call('HSET', KEYS[1], 'a', 1, 'b', 2.5, 'c', 'x')", &["h"], &[]),
        ("return redis.call('HMGET', KEYS[1], 'a', 'nope', 'b', 'c')", &["h"], &[]),
        ("local r = redis.call('HMGET', KEYS[1], 'a', 'nope') return {#r, r[2] == false}", &["h"], &[]),
        ("return redis.call('HGETALL', KEYS[1])", &["h"], &[]),
        ("return redis.call('HINCRBY', KEYS[1], 'a', 5)", &["h"], &[]),
        ("return redis.call('INCRBY', KEYS[1], 2^53)", &["n"], &[]),
        ("return type(redis.call('INCRBY', KEYS[1], 1))", &["n2"], &[]),
        ("return redis.call('PING')", &[], &[]),
        ("return redis.call('PING', 'x')", &[], &[]),
        ("return redis.call('TYPE', KEYS[1])", &["h"], &[]),
        ("return redis.pcall('TYPE', KEYS[1]).ok", &["nothing"], &[]),
        ("redis.call('XADD', KEYS[1], '1-1', 'f', 'v', 'g', 'w') return redis.call('XRANGE', KEYS[1], '-', '+')", &["x"], &[]),
        ("return redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 0)", &["x"], &[]),
        ("return {redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 0)}", &["x"], &[]),
        ("return redis.call('ZADD', KEYS[1], 0, 'b', 0, 'a', 1.5, 'c')", &["z"], &[]),
        ("return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')", &["z"], &[]),
        ("return redis.call('ZSCORE', KEYS[1], 'c')", &["z"], &[]),
        // Lua numbers as command arguments: integers print as integers, others as %.17g.
        ("redis.call('SET', KEYS[1], 1.5) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 1e20) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 1e17) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 0.1) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], -0.0) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 1/0) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], -1/0) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 2^53) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 123) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], -7) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("redis.call('SET', KEYS[1], 1/3) return redis.call('GET', KEYS[1])", &["f"], &[]),
        ("return redis.call('SET', KEYS[1], true)", &["f"], &[]),
        ("return redis.call('SET', KEYS[1], {})", &["f"], &[]),
        ("return redis.call('SET', KEYS[1], nil)", &["f"], &[]),
        ("return redis.pcall('SET', KEYS[1], true)", &["f"], &[]),
        ("return redis.call()", &[], &[]),
        ("return redis.pcall()", &[], &[]),
        ("return redis.call(1)", &[], &[]),
    ];
    all_same(&mut p, cases).await;
}

#[tokio::test]
async fn errors_call_pcall_and_positions() {
    let mut p = Pair::new().await;
    p.s(&["SET", &p.k("str"), "abc"]).await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("return redis.call('INCRBY', KEYS[1], 1)", &["str"], &[]),
        ("return redis.call('HGET', KEYS[1], 'a')", &["str"], &[]),
        ("return redis.pcall('HGET', KEYS[1], 'a')", &["str"], &[]),
        ("local r = redis.pcall('HGET', KEYS[1], 'a') return r.err", &["str"], &[]),
        ("local r = redis.pcall('INCRBY', KEYS[1], 1) return r['err']", &["str"], &[]),
        ("local r = redis.pcall('INCRBY', KEYS[1], 1) return type(r)", &["str"], &[]),
        ("return redis.call('nosuch')", &[], &[]),
        ("return redis.pcall('nosuch', 'a')", &[], &[]),
        ("return redis.call('GET')", &[], &[]),
        ("return redis.pcall('GET', 'a', 'b')", &[], &[]),
        ("return redis.call('SET', KEYS[1])", &["s"], &[]),
        ("return redis.call('SET', KEYS[1], 'v', 'bogus')", &["s"], &[]),
        ("return redis.call('EVAL', 'return 1', 0)", &[], &[]),
        ("return redis.call('EVALSHA', 'abc', 0)", &[], &[]),
        ("return redis.call('SCRIPT', 'LOAD', 'return 1')", &[], &[]),
        ("return redis.call('SCRIPT', 'nosuch')", &[], &[]),
        ("return redis.call('CONFIG', 'GET', 'maxmemory-policy')", &[], &[]),
        ("return redis.call('CONFIG')", &[], &[]),
        ("return redis.pcall('EVAL', 'return 1', 0)", &[], &[]),
        ("error('boom')", &[], &[]),
        ("error('boom', 0)", &[], &[]),
        ("error('boom', 2)", &[], &[]),
        ("error({err = 'MYERR table error'})", &[], &[]),
        ("error({err = 'nospace'})", &[], &[]),
        ("error({err = 5})", &[], &[]),
        ("error(nil)", &[], &[]),
        ("error(5)", &[], &[]),
        ("error(true)", &[], &[]),
        ("local x = nil\nreturn x.y", &[], &[]),
        ("local x = 1\n\n\nreturn x + {}", &[], &[]),
        ("local function f()\n  error('deep')\nend\nlocal function g() f() end\ng()", &[], &[]),
        ("local t = {}\nt.x.y = 1", &[], &[]),
        ("return ('x'):bad()", &[], &[]),
        ("return #nil", &[], &[]),
        ("local a = 'x' .. {}", &[], &[]),
        ("return 1 <", &[], &[]),
        ("x(", &[], &[]),
        ("return 'unterminated", &[], &[]),
        ("\n\n  local = 1", &[], &[]),
        // Raised inside redis.call at a given line, also as a tail call.
        ("local a = 1\nlocal b = 2\nreturn redis.call('INCRBY', KEYS[1], 1)", &["str"], &[]),
        ("local a = 1\nredis.call('INCRBY', KEYS[1], 1)\nreturn a", &["str"], &[]),
        ("local function f() return redis.call('nosuch') end\nreturn f()", &[], &[]),
        ("local ok, e = pcall(redis.call, 'nosuch') return {tostring(ok), type(e), e}", &[], &[]),
        ("local ok, e = pcall(redis.call, 'INCRBY', KEYS[1], 1) return {tostring(ok), e}", &["str"], &[]),
        ("local ok, e = pcall(error, {err = 'X y'}) return e", &[], &[]),
        ("local ok, e = pcall(error, {err = 5}) return {type(e), e}", &[], &[]),
        ("local ok, e = pcall(error, 'plain') return e", &[], &[]),
        ("local ok, e = pcall(function() local x = nil; return x.y end) return e", &[], &[]),
        ("local ok, e = pcall(error, {}) return type(e)", &[], &[]),
        ("local ok, e = xpcall(function() redis.call('nosuch') end, function(e) return e end) return {type(e), e.err}", &[], &[]),
        ("return pcall(redis.call, 'GET', KEYS[1])", &["missing"], &[]),
        ("return {pcall(redis.call, 'PING')}", &[], &[]),
        ("return redis.sha1hex()", &[], &[]),
        ("return redis.log()", &[], &[]),
        ("return redis.log('x', 'y')", &[], &[]),
        ("return redis.log(99, 'y')", &[], &[]),
        ("return redis.log('1', 'y')", &[], &[]),
        ("redis.setresp()", &[], &[]),
        ("redis.setresp(7)", &[], &[]),
        ("redis.set_repl()", &[], &[]),
        ("redis.set_repl(99)", &[], &[]),
        // Globals protection and the sandbox.
        ("x = 1", &[], &[]),
        ("return undefinedvar", &[], &[]),
        ("local t = undefined_table.field", &[], &[]),
        ("function foo() end", &[], &[]),
        ("string.foo = 1 return 1", &[], &[]),
        ("redis.call = nil return 1", &[], &[]),
        ("cjson.encode = nil", &[], &[]),
        ("KEYS = {}", &[], &[]),
        ("_G.x = 1", &[], &[]),
        ("return rawset(_G, 'q', 1)", &[], &[]),
        ("return rawset(string, 'q', 1)", &[], &[]),
        ("local t = {} rawset(t, 'a', 1) return t.a", &[], &[]),
        ("KEYS[1] = 'changed' return KEYS[1]", &["orig"], &[]),
        ("return type(debug)", &[], &[]),
        ("return type(os)", &[], &[]),
        ("return type(io)", &[], &[]),
        ("return type(print)", &[], &[]),
        ("return type(require)", &[], &[]),
        ("return type(dofile)", &[], &[]),
        ("return type(loadfile)", &[], &[]),
        ("return type(setfenv)", &[], &[]),
        ("return type(getfenv)", &[], &[]),
        ("return type(module)", &[], &[]),
        ("return type(newproxy)", &[], &[]),
        ("return type(package)", &[], &[]),
        ("return setmetatable(_G, {})", &[], &[]),
        ("return string.nosuch", &[], &[]),
        ("return redis.nosuch", &[], &[]),
        ("return redis.nosuch()", &[], &[]),
        ("local f = loadstring('y = 1') f()", &[], &[]),
        ("local f = loadstring('return zzz') return f()", &[], &[]),
    ];
    all_same(&mut p, cases).await;
    // The global written by none of the above is still absent, on both.
    p.eval("return x", &[], &[]).await;
}

#[tokio::test]
async fn writes_before_an_error_stay() {
    let mut p = Pair::new().await;
    p.eval("redis.call('SET', KEYS[1], 'kept') redis.call('HSET', KEYS[2], 'f', 1) error('after writes')", &["a", "b"], &[])
        .await;
    p.s(&["GET", &p.k("a")]).await;
    p.s(&["HGETALL", &p.k("b")]).await;
    p.eval(
        "redis.call('INCRBY', KEYS[1], 5) redis.call('HSET', KEYS[2], 'x', 'y') return redis.call('INCRBY', KEYS[2], 1)",
        &["n", "b"],
        &[],
    )
    .await;
    p.s(&["GET", &p.k("n")]).await;
    p.s(&["HGETALL", &p.k("b")]).await;
    // pcall keeps the script going.
    p.eval(
        "local r = redis.pcall('INCRBY', KEYS[2], 1) redis.call('INCRBY', KEYS[1], 1) return {r.err, redis.call('GET', KEYS[1])}",
        &["n", "b"],
        &[],
    )
    .await;
}

#[tokio::test]
async fn shebangs_flags_and_read_only() {
    let mut p = Pair::new().await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("#!lua\nreturn 1", &[], &[]),
        (
            "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])",
            &["a"],
            &[],
        ),
        (
            "#!lua flags=no-writes\nreturn redis.call('SET', KEYS[1], '1')",
            &["a"],
            &[],
        ),
        (
            "#!lua flags=no-writes\nreturn redis.pcall('SET', KEYS[1], '1')",
            &["a"],
            &[],
        ),
        ("#!lua flags=no-writes,allow-oom\nreturn 2", &[], &[]),
        ("#!lua flags=\nreturn 3", &[], &[]),
        ("#!lua\nerror('line two')", &[], &[]),
        ("#!lua\n\n\nreturn redis.call('nosuch')", &[], &[]),
        ("#!python\nreturn 1", &[], &[]),
        ("#!lua flags=bogus\nreturn 1", &[], &[]),
        ("#!lua name=x\nreturn 1", &[], &[]),
        ("#!luax\nreturn 1", &[], &[]),
        ("#!lua", &[], &[]),
        ("#!lua\nreturn +", &[], &[]),
    ];
    all_same(&mut p, cases).await;
    let a = p.k("a");
    for cmd in ["EVAL_RO", "eval_ro"] {
        p.same(&c(&[cmd, "return redis.call('GET', KEYS[1])", "1", &a]))
            .await;
        p.same(&c(&[
            cmd,
            "return redis.call('SET', KEYS[1], 'x')",
            "1",
            &a,
        ]))
        .await;
        p.same(&c(&[cmd, "return redis.pcall('DEL', KEYS[1])", "1", &a]))
            .await;
    }
    p.s(&["EXISTS", &a]).await;
}

#[tokio::test]
async fn cjson() {
    let mut p = Pair::new().await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("return cjson.encode({1, 2, 3, 'a/b', 0.1, 1e20, 2^53, -0.0, 1/3, 100000000000000, 123456789012345678})", &[], &[]),
        ("return cjson.encode({})", &[], &[]),
        ("return cjson.encode({a = 1, b = {c = true, d = false}, e = 'x\"y\\\\z\\n\\t\\1\\127'})", &[], &[]),
        ("return cjson.encode({[1] = 1, [3] = 3})", &[], &[]),
        ("return cjson.encode({[1] = 1, [20] = 3})", &[], &[]),
        ("return cjson.encode({[1] = 1, [11] = 3})", &[], &[]),
        ("return cjson.encode({[1] = 1, [10] = 3})", &[], &[]),
        ("return cjson.encode({1, 2, x = 3})", &[], &[]),
        ("return cjson.encode({[0] = 'zero'})", &[], &[]),
        ("return cjson.encode({[-1] = 'neg'})", &[], &[]),
        ("return cjson.encode({[1.5] = 1})", &[], &[]),
        ("return cjson.encode({[true] = 1})", &[], &[]),
        ("return cjson.encode(function() end)", &[], &[]),
        ("return cjson.encode({f = function() end})", &[], &[]),
        ("return cjson.encode(1/0)", &[], &[]),
        ("return cjson.encode(0/0)", &[], &[]),
        ("return cjson.encode(cjson.null)", &[], &[]),
        ("return cjson.encode({cjson.null, 1})", &[], &[]),
        ("return cjson.encode(nil)", &[], &[]),
        ("return cjson.encode()", &[], &[]),
        ("return cjson.encode(1, 2)", &[], &[]),
        ("return cjson.encode('\u{e9}\\0')", &[], &[]),
        ("return cjson.encode(12)", &[], &[]),
        ("return cjson.encode(true)", &[], &[]),
        ("return cjson.encode({['k1'] = 'v1', ['k2'] = 'v2', ['k3'] = 'v3', z = 1, y = 2, x = 3})", &[], &[]),
        ("local t = {} local c = t for i = 1, 1005 do c[1] = {} c = c[1] end return cjson.encode(t)", &[], &[]),
        ("local t = {} t.self = t return cjson.encode(t)", &[], &[]),
        ("return cjson.decode('[1,2')", &[], &[]),
        ("return cjson.decode('{\"a\":1,}')", &[], &[]),
        ("return cjson.decode('{\"a\" 1}')", &[], &[]),
        ("return cjson.decode('{1:1}')", &[], &[]),
        ("return cjson.decode('[1 2]')", &[], &[]),
        ("return cjson.decode('x')", &[], &[]),
        ("return cjson.decode('')", &[], &[]),
        ("return cjson.decode('   ')", &[], &[]),
        ("return cjson.decode('1 2')", &[], &[]),
        ("return cjson.decode('\"\\\\q\"')", &[], &[]),
        ("return cjson.decode('\"abc')", &[], &[]),
        ("return cjson.decode('\"\\\\u12\"')", &[], &[]),
        ("return cjson.decode('\"\\\\udc00\"')", &[], &[]),
        ("return cjson.decode('\"\\\\ud800x\"')", &[], &[]),
        ("return cjson.decode('\"\\\\u00e9\\\\ud83d\\\\ude00 \\\\/ \\\\b\\\\f\\\\n\\\\r\\\\t \\\\\" \\\\\\\\\"')", &[], &[]),
        ("return cjson.decode('\"\\\\u0000\"')", &[], &[]),
        ("return cjson.decode('tru')", &[], &[]),
        ("return cjson.decode('nul')", &[], &[]),
        ("return cjson.decode('-')", &[], &[]),
        ("return cjson.decode('+')", &[], &[]),
        ("return cjson.decode('+5')", &[], &[]),
        ("return cjson.decode('1e2')", &[], &[]),
        ("return cjson.decode('-0.5e-1') * 1000", &[], &[]),
        ("return cjson.decode('0x10')", &[], &[]),
        ("return cjson.decode('01')", &[], &[]),
        ("return cjson.decode('1.5')", &[], &[]),
        ("return tostring(cjson.decode('Infinity'))", &[], &[]),
        ("return tostring(cjson.decode('-Infinity'))", &[], &[]),
        ("return cjson.decode('1e400') > 0", &[], &[]),
        ("return cjson.decode('[]')", &[], &[]),
        ("return cjson.decode('{}')", &[], &[]),
        ("return cjson.decode('\"str\"')", &[], &[]),
        ("return cjson.decode('true')", &[], &[]),
        ("return cjson.decode('false')", &[], &[]),
        ("return type(cjson.decode('null'))", &[], &[]),
        ("return cjson.decode('null') == cjson.null", &[], &[]),
        ("return type(cjson.null)", &[], &[]),
        ("return cjson.decode('{\"a\":null}').a == cjson.null", &[], &[]),
        ("return cjson.decode('[1,null,3]')", &[], &[]),
        ("return #cjson.decode('[1,null,3]')", &[], &[]),
        ("return cjson.decode('{\"b\":2,\"a\":1,\"c\":3}')", &[], &[]),
        ("return cjson.decode(' [ 1 , [ 2 , { \"x\" : [ ] } ] ] ')", &[], &[]),
        ("return cjson.decode(5)", &[], &[]),
        ("return cjson.decode()", &[], &[]),
        ("return cjson.decode({})", &[], &[]),
        ("return cjson.decode(nil)", &[], &[]),
        ("return cjson.decode('\\0x')", &[], &[]),
        ("return cjson.decode(string.rep('[', 1001) .. string.rep(']', 1001))", &[], &[]),
        ("return #cjson.encode(cjson.decode(string.rep('[', 999) .. string.rep(']', 999)))", &[], &[]),
        // Round trips: object key order follows the Lua table, identical on both.
        ("local t = cjson.decode('{\"b\":2,\"a\":1,\"c\":3,\"zz\":4,\"k\":5}') return cjson.encode(t)", &[], &[]),
        ("return cjson.encode(cjson.decode(ARGV[1]))", &[], &[r#"{"now":1700000000000,"acct":"a1","limits":[{"k":"x","max":100,"amt":2.5}],"flag":true,"none":null,"s":"\u00e9\n"}"#]),
        ("local r = cjson.decode(ARGV[1]) return {r.now, r.acct, r.limits[1].k, r.limits[1].amt * 2, tostring(r.flag), tostring(r.none == cjson.null)}", &[], &[r#"{"now":1700000000000,"acct":"a1","limits":[{"k":"x","max":100,"amt":2.5}],"flag":true,"none":null}"#]),
        ("local t = {} for i = 1, 40 do t['key' .. i] = i end return cjson.encode(t)", &[], &[]),
        ("local t = {} for i = 40, 1, -1 do t['key' .. i] = {i, 'v' .. i} end return cjson.encode(t)", &[], &[]),
        ("return cjson.encode({a = {}, b = {{}}, c = {[1] = {}}})", &[], &[]),
        ("return cjson.encode(cjson.decode('[{\"k\":\"a\"},{\"k\":\"b\"}]'))", &[], &[]),
        ("local pcall_ok, e = pcall(cjson.decode, '{') return e", &[], &[]),
        ("local ok, e = pcall(cjson.encode, 1/0) return e", &[], &[]),
    ];
    all_same(&mut p, cases).await;
}

#[tokio::test]
async fn evalsha_script_load_and_invoke() {
    let mut p = Pair::new().await;
    // Unique text so Redis has not cached it (it is never SCRIPT FLUSHed: Redis is shared).
    let body = format!(
        "-- {}\nreturn {{KEYS[1], ARGV[1], redis.call('INCRBY', KEYS[1], ARGV[1])}}",
        p.prefix
    );
    let sha = redis::Script::new(&body).get_hash().to_string();
    let key = p.k("n");
    p.same(&c(&[
        "SCRIPT",
        "EXISTS",
        &sha,
        "0000000000000000000000000000000000000000",
    ]))
    .await;
    p.same(&c(&["EVALSHA", &sha, "1", &key, "2"])).await;
    p.same(&c(&["EVALSHA", &sha.to_uppercase(), "1", &key, "2"]))
        .await;
    p.same(&c(&["EVALSHA_RO", &sha, "1", &key, "2"])).await;
    let loaded = p.same(&c(&["SCRIPT", "LOAD", &body])).await;
    assert_eq!(
        loaded,
        Outcome::Ok(Value::BulkString(sha.clone().into_bytes()))
    );
    p.same(&c(&["SCRIPT", "EXISTS", &sha, &sha.to_uppercase(), "nope"]))
        .await;
    p.same(&c(&["EVALSHA", &sha, "1", &key, "2"])).await;
    p.same(&c(&["EVALSHA", &sha.to_uppercase(), "1", &key, "3"]))
        .await;
    p.same(&c(&["EVALSHA", &sha, "2", &key])).await;
    p.same(&c(&["EVALSHA", &sha, "-1"])).await;
    p.same(&c(&["EVALSHA", &sha, "x"])).await;
    p.same(&c(&["EVAL", "return 1", "-1"])).await;
    p.same(&c(&["EVAL", "return 1", "2", "a"])).await;
    p.same(&c(&["EVAL", "return 1", "x"])).await;
    p.same(&c(&["EVAL", "return 1"])).await;
    p.same(&c(&["SCRIPT", "LOAD", "return +"])).await;
    p.same(&c(&["SCRIPT", "LOAD", "#!python\nreturn 1"])).await;
    p.same(&c(&["SCRIPT", "LOAD", "return 1", "extra"])).await;
    // EVAL caches the script: EVALSHA finds it afterwards.
    let body2 = format!("-- {} eval-cached\nreturn 7", p.prefix);
    let sha2 = redis::Script::new(&body2).get_hash().to_string();
    p.same(&c(&["EVALSHA", &sha2, "0"])).await;
    p.same(&c(&["EVAL", &body2, "0"])).await;
    p.same(&c(&["EVALSHA", &sha2, "0"])).await;

    // redis-rs Script::invoke_async on a fresh connection: EVALSHA, NOSCRIPT, SCRIPT LOAD,
    // EVALSHA again.
    let body3 = format!(
        "-- {} invoke\nreturn redis.call('HINCRBY', KEYS[1], 'f', ARGV[1])",
        p.prefix
    );
    let script = redis::Script::new(&body3);
    let h = p.k("h");
    let fresh_kv = tollgate_memkv::MemKv::new();
    let mut fresh = fresh_kv.conn();
    let m: redis::RedisResult<i64> = script.key(&h).arg(5).invoke_async(&mut fresh).await;
    let r: redis::RedisResult<i64> = script.key(&h).arg(5).invoke_async(&mut p.real).await;
    assert_eq!(m.ok(), Some(5));
    assert_eq!(r.ok(), Some(5));
    let m: redis::RedisResult<i64> = script.key(&h).arg(5).invoke_async(&mut fresh).await;
    assert_eq!(m.ok(), Some(10));
    // Errors come back as RedisError with the same kind either way.
    let bad = redis::Script::new(&format!("-- {} bad\nreturn redis.call('nosuch')", p.prefix));
    let m: redis::RedisResult<i64> = bad.prepare_invoke().invoke_async(&mut fresh).await;
    let r: redis::RedisResult<i64> = bad.prepare_invoke().invoke_async(&mut p.real).await;
    assert_eq!(
        Outcome::of(m.map(Value::Int)),
        Outcome::of(r.map(Value::Int))
    );
    let e = bad
        .prepare_invoke()
        .invoke_async::<i64>(&mut fresh)
        .await
        .expect_err("error");
    assert_eq!(e.kind(), redis::ErrorKind::ResponseError);
    let e = redis::cmd("EVALSHA")
        .arg("0".repeat(40))
        .arg(0)
        .query_async::<Value>(&mut fresh)
        .await
        .expect_err("noscript");
    assert_eq!(e.kind(), redis::ErrorKind::NoScriptError);
    let s = p.k("s");
    let _: () = redis::cmd("SET")
        .arg(&s)
        .arg("x")
        .query_async(&mut fresh)
        .await
        .unwrap_or_default();
    let e = redis::cmd("HGET")
        .arg(&s)
        .arg("f")
        .query_async::<Value>(&mut fresh)
        .await
        .expect_err("wrongtype");
    assert_eq!(
        (e.kind(), e.code()),
        (redis::ErrorKind::ExtensionError, Some("WRONGTYPE"))
    );

    // SCRIPT FLUSH only on MemKv (the real Redis is shared).
    let flushed: String = c(&["SCRIPT", "FLUSH"])
        .query_async(&mut fresh)
        .await
        .unwrap_or_default();
    assert_eq!(flushed, "OK");
    let e = redis::cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(1)
        .arg(&h)
        .arg(1)
        .query_async::<Value>(&mut fresh)
        .await;
    assert_eq!(
        e.map_err(|e| e.kind()),
        Err(redis::ErrorKind::NoScriptError)
    );
    let m: redis::RedisResult<i64> = script.key(&h).arg(1).invoke_async(&mut fresh).await;
    assert_eq!(m.ok(), Some(11));
}

/// The repository's own scripts (lua/*.lua with lua/lib.lua prepended, as the sidecar loaded
/// them before they became one Functions library) compile to the same SHA on both.
#[tokio::test]
async fn repository_scripts_compile_alike() {
    let mut p = Pair::new().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua");
    let Ok(lib) = std::fs::read_to_string(dir.join("lib.lua")) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "lib.lua")
            || path.extension().is_none_or(|e| e != "lua")
        {
            continue;
        }
        let Ok(body) = std::fs::read_to_string(&path) else {
            continue;
        };
        let source = match body.strip_prefix("#!") {
            Some(rest) => {
                let (shebang, rest) = rest.split_once('\n').unwrap_or((rest, ""));
                format!("#!{shebang}\n{lib}\n{rest}")
            }
            None => format!("{lib}\n{body}"),
        };
        p.same(&c(&["SCRIPT", "LOAD", &source])).await;
    }
}

/// Two of the repository's own scripts (lua/load.lua and lua/grant.lua, with lua/lib.lua
/// prepended; the sidecar's library runs the same text) run through a small scenario on both stores: same replies,
/// same resulting state (outbox entries compared without their clock-made ids).
#[tokio::test]
async fn repository_scripts_run_alike() {
    let mut p = Pair::new().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua");
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(lib), Ok(load), Ok(grant)) = (read("lib.lua"), read("load.lua"), read("grant.lua"))
    else {
        return;
    };
    let load = redis::Script::new(&format!("{lib}\n{load}"));
    let grant = redis::Script::new(&format!("{lib}\n{grant}"));
    let (state, outbox, order, remaining) = (p.k("acct"), p.k("outbox"), p.k("order"), p.k("rem"));
    let (holds, ctr) = (p.k("holds"), p.k("ctr"));
    let now = 1_700_000_000_000u64;
    let grant_req = |gid: &str, amount: i64, fp: &str, expires: u64| {
        format!(
            r#"{{"now":{now},"acct":"a1","gid":"{gid}","amount":{amount},"priority":1,"expires":{expires},"source":"purchase","fp":"{fp}","checked":false,"idem_ttl_ms":600000}}"#
        )
    };
    let load_req = format!(
        r#"{{"now":{now},"recheck_until":0,"counters":[["{ctr}",5,{}]],"grants":[["g0","0001|99999999999999|00000000000001|g0",50]],"holds":[]}}"#,
        now + 100_000
    );
    let steps: Vec<(&redis::Script, Vec<String>, String)> = vec![
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g1"),
            ],
            grant_req("g1", 100, "fp1", 0),
        ),
        (
            &load,
            vec![
                state.clone(),
                order.clone(),
                remaining.clone(),
                holds.clone(),
            ],
            load_req.clone(),
        ),
        (
            &load,
            vec![
                state.clone(),
                order.clone(),
                remaining.clone(),
                holds.clone(),
            ],
            load_req,
        ),
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g1"),
            ],
            grant_req("g1", 100, "fp1", 0),
        ),
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g1"),
            ],
            grant_req("g1", 100, "fp1", 0),
        ),
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g1"),
            ],
            grant_req("g1", 7, "other", 0),
        ),
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g2"),
            ],
            grant_req("g2", 30, "fp2", now + 5_000),
        ),
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g3"),
            ],
            grant_req("g3", 9, "fp3", now - 5_000),
        ),
        (
            &grant,
            vec![
                state.clone(),
                outbox.clone(),
                order.clone(),
                remaining.clone(),
                p.k("i:g4"),
            ],
            "not json".into(),
        ),
    ];
    for (script, keys, arg) in &steps {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        inv.arg(arg);
        let r = Outcome::of(inv.invoke_async::<Value>(&mut p.real).await);
        let m = Outcome::of(inv.invoke_async::<Value>(&mut p.mem).await);
        assert_eq!(m, r, "step with {arg}");
    }
    for key in [&state, &remaining, &p.k("i:g1"), &p.k("i:g2")] {
        p.s(&["HGETALL", key]).await;
    }
    p.s(&["ZRANGE", &order, "0", "-1", "WITHSCORES"]).await;
    p.s(&["GET", &ctr]).await;
    p.s(&["XLEN", &outbox]).await;
    let (r, m) = p.both(&c(&["XRANGE", &outbox, "-", "+"])).await;
    let bodies = |o: &Outcome| match o.value() {
        Value::Array(entries) => entries
            .iter()
            .map(|e| match e {
                Value::Array(parts) => parts.get(1).cloned(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(bodies(&m), bodies(&r));
    assert!(bodies(&m).len() >= 3, "the scenario wrote events: {m:?}");
}
