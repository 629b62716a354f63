//! Scripts are atomic: concurrent check-then-increment scripts never overshoot a limit.

use tollgate_memkv::MemKv;

const ADMIT: &str = "
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return 0 end
redis.call('INCRBY', KEYS[1], 1)
return 1
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scripts_admit_exactly_the_limit() {
    let kv = MemKv::new();
    let script = redis::Script::new(ADMIT);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut conn = kv.conn();
        let script = script.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0i64;
            for _ in 0..500 {
                let r: i64 = script
                    .key("quota")
                    .arg(1000)
                    .invoke_async(&mut conn)
                    .await
                    .expect("eval");
                admitted += r;
                tokio::task::yield_now().await;
            }
            admitted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, 1000);
    let used: i64 = redis::cmd("GET")
        .arg("quota")
        .query_async(&mut kv.conn())
        .await
        .expect("get");
    assert_eq!(used, 1000);
}

#[test]
fn concurrent_threads_and_pipelines_lose_no_update() {
    let kv = MemKv::new();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let mut conn = kv.conn();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    for _ in 0..250 {
                        let mut pipe = redis::pipe();
                        pipe.atomic()
                            .cmd("INCRBY")
                            .arg("n")
                            .arg(1)
                            .cmd("HINCRBY")
                            .arg("h")
                            .arg("f")
                            .arg(2);
                        let _: (i64, i64) = pipe.query_async(&mut conn).await.expect("pipeline");
                    }
                });
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (n, f): (i64, i64) = rt.block_on(async {
        let mut conn = kv.conn();
        let n: i64 = redis::cmd("GET")
            .arg("n")
            .query_async(&mut conn)
            .await
            .expect("get");
        let f: i64 = redis::cmd("HGET")
            .arg("h")
            .arg("f")
            .query_async(&mut conn)
            .await
            .expect("hget");
        (n, f)
    });
    assert_eq!((n, f), (1000, 2000));
}

/// A runaway script cannot hang the store: it is aborted after the time limit (5 s), and the
/// store keeps serving.
#[tokio::test]
async fn runaway_script_is_aborted() {
    let kv = MemKv::new();
    let mut conn = kv.conn();
    let started = std::time::Instant::now();
    let r: redis::RedisResult<i64> = redis::cmd("EVAL")
        .arg(
            "redis.call('SET', KEYS[1], 'before')
            while true do
              pcall(function() while true do end end)
              xpcall(function() while true do end end, function(e) return e end)
              coroutine.resume(coroutine.create(function() while true do end end))
            end",
        )
        .arg(1)
        .arg("k")
        .query_async(&mut conn)
        .await;
    let e = r.expect_err("aborted");
    println!("{e}");
    assert_eq!(e.kind(), redis::ErrorKind::ResponseError);
    assert!(
        e.to_string()
            .contains("script aborted after running for more than 5 s"),
        "{e}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(v, "before");
}
