//! Seeded random differential test: thousands of random commands and random Lua snippets
//! over a small set of keys (so types collide and errors happen), each reply compared between
//! the real Redis and MemKv. Set `MEMKV_SEED` to replay another sequence.

mod common;

use common::Pair;

/// xorshift64*: tiny, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const FIELDS: &[&str] = &["f0", "f1", "f2", "f3"];
const MEMBERS: &[&str] = &["m0", "m1", "m2", "m3", "m4", "a", "b", ""];
const VALUES: &[&str] = &[
    "0",
    "1",
    "-3",
    "17",
    "abc",
    "9223372036854775807",
    "1.5",
    "",
    "007",
];
const INCRS: &[&str] = &[
    "1",
    "-1",
    "5",
    "100",
    "x",
    "9223372036854775807",
    "-9223372036854775808",
];
const SCORES: &[&str] = &[
    "0", "1", "-1", "2.5", "0", "0", "1e3", "-inf", "+inf", "nan", "x",
];
const BOUNDS: &[&str] = &[
    "-inf", "+inf", "0", "(0", "1", "(1", "2.5", "(2.5", "-1", "x",
];
const INDEXES: &[&str] = &["0", "1", "-1", "-2", "2", "5", "-10", "x"];

/// One statement of a random script; `k` and `a` are KEYS/ARGV indexes (1-based).
fn statement(rng: &mut Rng, nkeys: usize, nargs: usize) -> String {
    let k = rng.below(nkeys) + 1;
    let a = rng.below(nargs) + 1;
    let call = if rng.chance(30) {
        "redis.pcall"
    } else {
        "redis.call"
    };
    match rng.below(10) {
        0 => format!("acc[#acc + 1] = {call}('INCRBY', KEYS[{k}], ARGV[{a}])"),
        1 => format!(
            "acc[#acc + 1] = {call}('HSET', KEYS[{k}], '{}', ARGV[{a}])",
            rng.pick(FIELDS)
        ),
        2 => format!(
            "acc[#acc + 1] = {call}('ZADD', KEYS[{k}], ARGV[{a}], '{}')",
            rng.pick(MEMBERS)
        ),
        3 => format!("local r = {call}('ZRANGE', KEYS[{k}], 0, -1) acc[#acc + 1] = r"),
        4 => format!(
            "local r = {call}('HMGET', KEYS[{k}], '{}', '{}') acc[#acc + 1] = r",
            rng.pick(FIELDS),
            rng.pick(FIELDS)
        ),
        5 => format!(
            "acc[#acc + 1] = {call}('HINCRBY', KEYS[{k}], '{}', ARGV[{a}])",
            rng.pick(FIELDS)
        ),
        6 => format!("if tonumber(ARGV[{a}]) then acc[#acc + 1] = tonumber(ARGV[{a}]) * 2 end"),
        7 => format!("acc[#acc + 1] = {call}('GET', KEYS[{k}])"),
        8 => format!("acc[#acc + 1] = cjson.encode({call}('HGETALL', KEYS[{k}]))"),
        _ => format!("acc[#acc + 1] = {call}('TYPE', KEYS[{k}])"),
    }
}

fn script(rng: &mut Rng, nkeys: usize, nargs: usize) -> String {
    let mut lines = vec!["local acc = {}".to_string()];
    for _ in 0..rng.below(4) + 1 {
        lines.push(statement(rng, nkeys, nargs));
    }
    lines.push("return acc".into());
    lines.join("\n")
}

#[tokio::test]
async fn random_commands_and_scripts() {
    let seed: u64 = std::env::var("MEMKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7011_6a7e);
    let mut rng = Rng(seed | 1);
    let mut p = Pair::new().await;
    let keys: Vec<String> = (0..6).map(|i| p.k(&format!("k{i}"))).collect();
    let mut stream_ms = 1u64;
    let ops = 3000;
    for _ in 0..ops {
        let key = keys[rng.below(keys.len())].clone();
        let other = keys[rng.below(keys.len())].clone();
        let args: Vec<String> = match rng.below(27) {
            0 => {
                let mut a = vec!["SET".into(), key, rng.pick(VALUES).into()];
                if rng.chance(20) {
                    a.push(rng.pick(&["NX", "XX", "GET"]).into());
                }
                a
            }
            1 => vec!["GET".into(), key],
            2 | 3 => vec!["INCRBY".into(), key, rng.pick(INCRS).into()],
            4 => vec!["DEL".into(), key, other],
            5 => vec!["EXISTS".into(), key, other],
            6 | 7 => {
                let mut a = vec!["HSET".into(), key];
                for _ in 0..rng.below(3) + 1 {
                    a.push(rng.pick(FIELDS).into());
                    a.push(rng.pick(VALUES).into());
                }
                a
            }
            8 => vec!["HGET".into(), key, rng.pick(FIELDS).into()],
            9 => vec![
                "HMGET".into(),
                key,
                rng.pick(FIELDS).into(),
                rng.pick(FIELDS).into(),
                rng.pick(FIELDS).into(),
            ],
            10 => vec![
                "HINCRBY".into(),
                key,
                rng.pick(FIELDS).into(),
                rng.pick(INCRS).into(),
            ],
            11 => vec![
                "HDEL".into(),
                key,
                rng.pick(FIELDS).into(),
                rng.pick(FIELDS).into(),
            ],
            12 => vec![
                rng.pick(&["HGETALL", "HLEN", "TYPE", "ZCARD", "XLEN"])
                    .into(),
                key,
            ],
            13 => vec!["HEXISTS".into(), key, rng.pick(FIELDS).into()],
            14 | 15 => {
                let mut a = vec!["ZADD".into(), key];
                for _ in 0..rng.below(3) + 1 {
                    a.push(rng.pick(SCORES).into());
                    a.push(rng.pick(MEMBERS).into());
                }
                a
            }
            16 => vec![
                "ZREM".into(),
                key,
                rng.pick(MEMBERS).into(),
                rng.pick(MEMBERS).into(),
            ],
            17 => {
                let mut a = vec![
                    "ZRANGE".into(),
                    key,
                    rng.pick(INDEXES).into(),
                    rng.pick(INDEXES).into(),
                ];
                if rng.chance(30) {
                    a.push("WITHSCORES".into());
                }
                a
            }
            18 => {
                let mut a = vec![
                    "ZRANGEBYSCORE".into(),
                    key,
                    rng.pick(BOUNDS).into(),
                    rng.pick(BOUNDS).into(),
                ];
                if rng.chance(30) {
                    a.push("WITHSCORES".into());
                }
                if rng.chance(30) {
                    a.extend([
                        "LIMIT".into(),
                        rng.pick(&["0", "1", "-1", "3"]).into(),
                        rng.pick(&["1", "2", "-1", "0"]).into(),
                    ]);
                }
                a
            }
            19 => vec!["ZSCORE".into(), key, rng.pick(MEMBERS).into()],
            20 => {
                // Explicit, mostly increasing ids (auto ids depend on the clock).
                stream_ms += rng.below(3) as u64;
                let id = if rng.chance(10) {
                    "1-0".to_string()
                } else {
                    format!("{stream_ms}-{}", rng.below(3))
                };
                vec![
                    "XADD".into(),
                    key,
                    id,
                    rng.pick(FIELDS).into(),
                    rng.pick(VALUES).into(),
                ]
            }
            21 => vec![
                "XRANGE".into(),
                key,
                "-".into(),
                "+".into(),
                "COUNT".into(),
                rng.pick(&["1", "3", "100"]).into(),
            ],
            22 => vec![
                "XTRIM".into(),
                key,
                "MINID".into(),
                format!("{}", stream_ms.saturating_sub(rng.below(4) as u64)),
            ],
            23 => vec!["XDEL".into(), key, format!("{stream_ms}-{}", rng.below(3))],
            _ => {
                let nkeys = rng.below(3) + 1;
                let nargs = rng.below(3) + 1;
                let body = script(&mut rng, nkeys, nargs);
                let mut a = vec!["EVAL".into(), body, nkeys.to_string()];
                for _ in 0..nkeys {
                    a.push(keys[rng.below(keys.len())].clone());
                }
                for _ in 0..nargs {
                    a.push(rng.pick(SCORES).into());
                }
                a
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        p.s(&args).await;
    }
    // Final state, key by key.
    for key in &keys {
        for cmd in [
            &["TYPE", key][..],
            &["HGETALL", key],
            &["ZRANGE", key, "0", "-1", "WITHSCORES"],
            &["XRANGE", key, "-", "+"],
            &["GET", key],
        ] {
            p.s(cmd).await;
        }
    }
    assert!(p.compared >= ops);
}
