//! Server and key-space commands: PING, FLUSHALL, FLUSHDB, DBSIZE, KEYS, TYPE, INFO, TIME,
//! CONFIG GET.

use super::is;
use crate::glob;
use crate::keyspace::Keyspace;
use crate::reply::Reply;

/// The Redis version the embedded store answers like (`INFO`, `redis.REDIS_VERSION`).
pub const REDIS_VERSION: &str = "7.0.15";

pub fn ping(_ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    match argv.len() {
        1 => Reply::Status("PONG".into()),
        2 => Reply::bulk(argv[1]),
        _ => Reply::arity("ping"),
    }
}

fn flush(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    if argv.len() > 2 || (argv.len() == 2 && !is(argv[1], "sync") && !is(argv[1], "async")) {
        return Reply::syntax();
    }
    ks.clear();
    Reply::ok()
}

pub fn flushall(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    flush(ks, argv)
}

pub fn flushdb(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    flush(ks, argv)
}

pub fn dbsize(ks: &mut Keyspace, _argv: &[&[u8]]) -> Reply {
    Reply::Int(ks.len() as i64)
}

/// KEYS pattern. Redis answers in hash-table order; here keys come sorted.
pub fn keys(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let pattern = argv[1];
    let all = pattern == b"*";
    let mut found: Vec<&[u8]> = ks
        .keys()
        .filter(|k| all || glob::matches(pattern, k))
        .collect();
    found.sort_unstable();
    Reply::Array(found.into_iter().map(Reply::bulk).collect())
}

pub fn type_(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    Reply::Status(ks.get(argv[1]).map_or("none", |v| v.type_name()).into())
}

/// INFO [section ...]: a few fields of the server, stats and keyspace sections.
pub fn info(ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let wanted = |name: &str| {
        argv.len() == 1
            || argv[1..]
                .iter()
                .any(|s| is(s, name) || is(s, "all") || is(s, "default") || is(s, "everything"))
    };
    let mut out = String::new();
    if wanted("server") {
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nembedded_store:tollgate-memkv\r\n"
        ));
    }
    if wanted("stats") {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str(&format!(
            "# Stats\r\ntotal_commands_processed:{}\r\n",
            ks.commands_processed
        ));
    }
    if wanted("keyspace") {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str("# Keyspace\r\n");
        if !ks.is_empty() {
            out.push_str(&format!(
                "db0:keys={},expires={},avg_ttl=0\r\n",
                ks.len(),
                ks.expiring()
            ));
        }
    }
    Reply::bulk(out)
}

pub fn time(_ks: &mut Keyspace, _argv: &[&[u8]]) -> Reply {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Reply::Array(vec![
        Reply::bulk(now.as_secs().to_string()),
        Reply::bulk(now.subsec_micros().to_string()),
    ])
}

/// The configuration the embedded store reports: it never evicts.
const CONFIG: &[(&str, &str)] = &[("maxmemory-policy", "noeviction"), ("maxmemory", "0")];

/// CONFIG GET pattern [pattern ...]: name/value pairs of the matching parameters. As in
/// Redis 7, a pattern without glob characters is looked up case-insensitively and answered
/// under the name as given; glob patterns answer the canonical names.
pub fn config_get(_ks: &mut Keyspace, argv: &[&[u8]]) -> Reply {
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for pattern in &argv[2..] {
        let is_glob = pattern.iter().any(|b| matches!(b, b'[' | b'*' | b'?'));
        for (name, value) in CONFIG {
            let hit = if is_glob {
                glob::matches(&pattern.to_ascii_lowercase(), name.as_bytes())
            } else {
                pattern.eq_ignore_ascii_case(name.as_bytes())
            };
            if hit && !seen.contains(name) {
                seen.push(name);
                out.push(if is_glob {
                    Reply::bulk(*name)
                } else {
                    Reply::bulk(*pattern)
                });
                out.push(Reply::bulk(*value));
            }
        }
    }
    Reply::Array(out)
}
