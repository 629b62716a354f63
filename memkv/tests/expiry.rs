//! Expiry: keys vanish once their time has passed (lazy), and are purged from memory even if
//! nobody reads them again (active).

use redis::{AsyncCommands, Value};
use std::time::Duration;
use tollgate_memkv::MemKv;

async fn q(conn: &mut tollgate_memkv::MemConn, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[tokio::test]
async fn px_key_disappears() {
    let kv = MemKv::new();
    let mut c = kv.conn();
    assert_eq!(q(&mut c, &["SET", "k", "v", "PX", "50"]).await, Value::Okay);
    assert_eq!(
        q(&mut c, &["GET", "k"]).await,
        Value::BulkString(b"v".to_vec())
    );
    let Value::Int(ttl) = q(&mut c, &["PTTL", "k"]).await else {
        panic!()
    };
    assert!((0..=50).contains(&ttl), "{ttl}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(q(&mut c, &["GET", "k"]).await, Value::Nil);
    assert_eq!(q(&mut c, &["EXISTS", "k"]).await, Value::Int(0));
    assert_eq!(q(&mut c, &["PTTL", "k"]).await, Value::Int(-2));
    assert_eq!(kv.dbsize(), 0);
}

#[tokio::test]
async fn ttl_rules() {
    let kv = MemKv::new();
    let mut c = kv.conn();
    assert_eq!(
        q(&mut c, &["PEXPIRE", "missing", "100"]).await,
        Value::Int(0)
    );
    assert_eq!(q(&mut c, &["PTTL", "missing"]).await, Value::Int(-2));
    q(&mut c, &["SET", "k", "v"]).await;
    assert_eq!(q(&mut c, &["PTTL", "k"]).await, Value::Int(-1));
    assert_eq!(q(&mut c, &["TTL", "k"]).await, Value::Int(-1));
    assert_eq!(q(&mut c, &["PEXPIRE", "k", "100000"]).await, Value::Int(1));
    q(&mut c, &["SET", "k", "v2", "KEEPTTL"]).await;
    let Value::Int(ttl) = q(&mut c, &["PTTL", "k"]).await else {
        panic!()
    };
    assert!(ttl > 99_000);
    assert_eq!(q(&mut c, &["TTL", "k"]).await, Value::Int(100));
    q(&mut c, &["SET", "k", "v3"]).await;
    assert_eq!(q(&mut c, &["PTTL", "k"]).await, Value::Int(-1));
    // Hash and sorted set keys expire too.
    let _: () = c.hset("h", "f", 1).await.expect("hset");
    assert_eq!(q(&mut c, &["PEXPIRE", "h", "30"]).await, Value::Int(1));
    q(&mut c, &["ZADD", "z", "1", "m"]).await;
    assert_eq!(q(&mut c, &["EXPIRE", "z", "-1"]).await, Value::Int(1));
    assert_eq!(q(&mut c, &["EXISTS", "z"]).await, Value::Int(0));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(q(&mut c, &["HGETALL", "h"]).await, Value::Array(vec![]));
    // A rewritten key is not removed by its old expiry.
    q(&mut c, &["SET", "r", "1", "PX", "30"]).await;
    q(&mut c, &["SET", "r", "2"]).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        q(&mut c, &["GET", "r"]).await,
        Value::BulkString(b"2".to_vec())
    );
}

#[tokio::test]
async fn expired_keys_are_purged_without_being_read() {
    let kv = MemKv::new();
    let mut c = kv.conn();
    for i in 0..5 {
        q(&mut c, &["SET", &format!("keep{i}"), "1"]).await;
    }
    // 20 000 expiring keys, written by scripts and pipelines.
    let script = redis::Script::new(
        "for i = 1, 10000 do redis.call('SET', ARGV[1] .. i, 'x', 'PX', 2000) end return redis.call('DBSIZE')",
    );
    let n: i64 = script.arg("s:").invoke_async(&mut c).await.expect("script");
    assert_eq!(n, 10_005);
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        pipe.cmd("HSET")
            .arg(format!("h:{i}"))
            .arg("f")
            .arg(i)
            .ignore();
        pipe.cmd("PEXPIRE").arg(format!("h:{i}")).arg(2000).ignore();
    }
    let () = pipe.query_async(&mut c).await.expect("pipeline");
    assert_eq!(kv.dbsize(), 20_005);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    // Any command purges what is due; so does dbsize().
    assert_eq!(q(&mut c, &["DBSIZE"]).await, Value::Int(5));
    assert_eq!(kv.dbsize(), 5);
    let info: String = redis::cmd("INFO")
        .arg("keyspace")
        .query_async(&mut c)
        .await
        .expect("info");
    assert!(info.contains("db0:keys=5,expires=0"), "{info}");
}
