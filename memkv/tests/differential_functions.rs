//! Redis Functions (FUNCTION LOAD / DELETE, FCALL, FCALL_RO), run against the real Redis and
//! against MemKv: the replies must be identical, errors included, except where a test says it
//! compares only that both refused (messages Redis words differently between 7.x releases).
//!
//! Library names carry the run's unique id, and every library a test loads is deleted at its
//! end, so runs against one Redis never collide.

mod common;

use common::{c, unique_id, Pair};

/// A library name of this run (letters, digits and underscores only, as Redis requires).
fn lib_name(tag: &str) -> String {
    format!(
        "tgt_{tag}_{}",
        unique_id().replace(|ch: char| !ch.is_ascii_alphanumeric(), "_")
    )
}

async fn fcall(p: &mut Pair, cmd: &str, f: &str, keys: &[&str], args: &[&str]) -> common::Outcome {
    let mut v: Vec<String> = vec![cmd.into(), f.into(), keys.len().to_string()];
    v.extend(keys.iter().map(|k| p.k(k)));
    v.extend(args.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = v.iter().map(String::as_str).collect();
    p.s(&refs).await
}

#[tokio::test]
async fn a_library_loads_once_and_its_functions_share_its_locals() {
    let mut p = Pair::new().await;
    let lib = lib_name("fn");
    let (add, peek) = (format!("{lib}_add"), format!("{lib}_peek"));
    // Locals of the library are the functions' upvalues: the pattern the sidecar's library uses
    // (KEYS and ARGV set at the top of each call, read by helpers defined once).
    let code = format!(
        "#!lua name={lib}\n\
         local KEYS, ARGV\n\
         local function incr(i) return redis.call('INCRBY', KEYS[i], ARGV[i]) end\n\
         redis.register_function('{add}', function(keys, args)\n\
           KEYS, ARGV = keys, args\n\
           return {{incr(1), incr(2), #keys, #args}}\n\
         end)\n\
         redis.register_function{{function_name = '{peek}', callback = function(keys)\n\
           return redis.call('MGET', unpack(keys))\n\
         end, flags = {{'no-writes'}}}}\n"
    );
    let loaded = p.s(&["FUNCTION", "LOAD", &code]).await;
    assert!(!loaded.is_err(), "the library loads: {loaded:?}");
    fcall(&mut p, "FCALL", &add, &["{t}a", "{t}b"], &["3", "4"]).await;
    fcall(&mut p, "FCALL", &add, &["{t}a", "{t}b"], &["3", "4"]).await;
    let peeked = fcall(&mut p, "FCALL_RO", &peek, &["{t}a", "{t}b"], &[]).await;
    assert_eq!(
        peeked.value(),
        &redis::Value::Array(vec![
            redis::Value::BulkString(b"6".to_vec()),
            redis::Value::BulkString(b"8".to_vec())
        ])
    );
    // A writing function through FCALL_RO is refused before it runs.
    assert!(
        fcall(&mut p, "FCALL_RO", &add, &["{t}a", "{t}b"], &["1", "1"])
            .await
            .is_err()
    );
    // Loading the same library again needs REPLACE; with it, the new code is what runs.
    assert!(p.s(&["FUNCTION", "LOAD", &code]).await.is_err());
    let v2 = code.replace("#keys, #args", "'v2'");
    p.s(&["FUNCTION", "LOAD", "REPLACE", &v2]).await;
    fcall(&mut p, "FCALL", &add, &["{t}a", "{t}b"], &["1", "1"]).await;
    // Bad calls.
    p.s(&["FCALL", &format!("{lib}_nope"), "0"]).await;
    p.s(&["FCALL", &add, "3", "x"]).await;
    p.s(&["FCALL", &add, "-1"]).await;
    p.s(&["FCALL", &add, "x"]).await;
    // Deleted: gone from both.
    p.s(&["FUNCTION", "DELETE", &lib]).await;
    p.s(&["FCALL", &add, "0"]).await;
    p.s(&["FUNCTION", "DELETE", &lib]).await;
}

#[tokio::test]
async fn a_function_that_writes_under_no_writes_or_raises_fails_alike() {
    let mut p = Pair::new().await;
    let lib = lib_name("fe");
    let code = format!(
        "#!lua name={lib}\n\
         redis.register_function{{function_name = '{lib}_w', callback = function(keys)\n\
           return redis.call('SET', keys[1], 'x')\n\
         end, flags = {{'no-writes'}}}}\n\
         redis.register_function('{lib}_boom', function(keys, args)\n\
           redis.call('SET', keys[1], args[1])\n\
           error('boom')\n\
         end)\n\
         redis.register_function('{lib}_reg', function()\n\
           return redis.register_function('{lib}_late', function() return 1 end)\n\
         end)\n"
    );
    p.s(&["FUNCTION", "LOAD", &code]).await;
    fcall(&mut p, "FCALL", &format!("{lib}_w"), &["{t}k"], &[]).await;
    // The write before the error stays, as with scripts.
    fcall(
        &mut p,
        "FCALL",
        &format!("{lib}_boom"),
        &["{t}k"],
        &["kept"],
    )
    .await;
    p.s(&["GET", &p.k("{t}k")]).await;
    // register_function only while a library loads.
    let (r, m) = p.both(&c(&["FCALL", &format!("{lib}_reg"), "0"])).await;
    assert!(r.is_err() && m.is_err(), "redis {r:?} memkv {m:?}");
    p.s(&["FUNCTION", "DELETE", &lib]).await;
}

#[tokio::test]
async fn bad_libraries_are_refused_and_change_nothing() {
    let mut p = Pair::new().await;
    let lib = lib_name("fb");
    let good =
        format!("#!lua name={lib}\nredis.register_function('{lib}_f', function() return 1 end)\n");
    p.s(&["FUNCTION", "LOAD", &good]).await;
    let bad = [
        // No metadata line, another engine, no name, a name Redis refuses.
        "redis.register_function('x', function() return 1 end)".to_string(),
        format!("#!js name={lib}_2\n"),
        "#!lua\nredis.register_function('x', function() return 1 end)".to_string(),
        "#!lua name=bad-name\nredis.register_function('x', function() return 1 end)".to_string(),
        // Registers nothing; a syntax error; a global assignment; a runtime error.
        format!("#!lua name={lib}_3\nlocal x = 1\n"),
        format!("#!lua name={lib}_4\nredis.register_function('{lib}_4f', function() return 1 end\n"),
        format!("#!lua name={lib}_5\nfoo = 1\nredis.register_function('{lib}_5f', function() return 1 end)\n"),
        format!("#!lua name={lib}_6\nerror('no')\n"),
        // A function name another library has; the same name twice in one library.
        format!("#!lua name={lib}_7\nredis.register_function('{lib}_f', function() return 2 end)\n"),
        format!(
            "#!lua name={lib}_8\nredis.register_function('{lib}_8f', function() return 1 end)\n\
             redis.register_function('{lib}_8f', function() return 2 end)\n"
        ),
        // A replacement that fails keeps the old library.
        format!("#!lua name={lib}\nerror('broken release')\n"),
    ];
    for code in &bad {
        let (r, m) = p.both(&c(&["FUNCTION", "LOAD", "REPLACE", code])).await;
        assert!(
            r.is_err() && m.is_err(),
            "{code:?}: redis {r:?} memkv {m:?}"
        );
    }
    // The first library is untouched by all of that.
    p.s(&["FCALL", &format!("{lib}_f"), "0"]).await;
    for n in 2..=8 {
        p.s(&["FCALL", &format!("{lib}_{n}f"), "0"]).await;
    }
    p.s(&["FUNCTION", "DELETE", &lib]).await;
}
