//! The compiled filter (`wasm32-wasip1`, release) driven through the wasmtime host as Envoy would
//! drive it. Each test is a scenario: configure, send a request, see the callout, answer it (or
//! let it fail), see the reply or the resumed request, stream the response, see the settlement.

use serde_json::{json, Value};
use wasm_host::{Filter, HttpCall, CONTINUE, PAUSE};

fn config(deadline_ms: u64) -> String {
    json!({
        "sidecar": {"cluster": "sidecar", "timeout_ms": 200},
        "deadline_ms": deadline_ms,
        "key": {"header": "x-api-key"},
        "commit_batch": 3,
        "commit_interval_ms": 50,
        // Up to two requests decide at once below, each with its own callout; requests that
        // wait for a full line go in batches (tests/tests/filter_batch.rs).
        "authorize_inflight": 2,
        "routes": [
            {"name": "chat", "method": "POST", "path_prefix": "/v1/chat/", "failure_mode": "closed",
             "charges": {"requests": {"fixed": 1}, "input_tokens": {"fixed": 0},
                         "output_tokens": {"body_field": "max_tokens", "default": 256, "cap": 4096}},
             "usage": {"source": "body"}, "model_field": "model"},
            {"name": "open", "path_prefix": "/open/", "failure_mode": "open",
             "charges": {"requests": {"fixed": 1}}},
            {"name": "files", "path_prefix": "/files/",
             "charges": {"requests": {"fixed": 1}, "bytes": {"fixed": 0}},
             "usage": {"source": "bytes", "meter": "bytes"}},
            {"name": "hdr", "path_prefix": "/hdr/", "charges": {"tokens": {"fixed": 10}},
             "usage": {"source": "header", "header": "x-usage-tokens", "meter": "tokens"}}
        ]
    })
    .to_string()
}

fn load() -> Filter {
    let f = Filter::load(&config(100)).expect("filter loads");
    assert!(f.configured, "configuration refused: {:?}", f.logs());
    f
}

fn allowed(hold: &str) -> Vec<u8> {
    json!({"allowed": true, "status": 200, "account": "acme", "hold_id": hold,
           "limit": {"name": "account:requests:minute", "max": 600, "remaining": 599, "reset_ms": 1_795_348_860_000u64},
           "credits": 10, "balance": 990})
    .to_string()
    .into_bytes()
}

/// Sends a GET to `path` with a key and request id; returns the context and the callout.
fn get(f: &mut Filter, path: &str, id: &str) -> (u32, HttpCall) {
    let ctx = f.new_request().unwrap();
    let a = f
        .request_headers(
            ctx,
            &[
                (":method", "GET"),
                (":path", path),
                (":authority", "api"),
                ("x-api-key", "tg_key"),
                ("x-request-id", id),
            ],
            true,
        )
        .unwrap();
    assert_eq!(a, PAUSE);
    let mut calls = f.take_calls();
    assert_eq!(calls.len(), 1);
    (ctx, calls.remove(0))
}

/// A chat request with a JSON body; returns the context and its authorize callout.
fn chat(f: &mut Filter, id: &str, body: &str) -> (u32, HttpCall) {
    let ctx = f.new_request().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "api"),
        ("x-api-key", "tg_key"),
        ("x-request-id", id),
    ];
    // Headers go on (Envoy would withhold the body too if they paused); the body is held.
    assert_eq!(f.request_headers(ctx, &headers, false).unwrap(), CONTINUE);
    assert!(f.take_calls().is_empty(), "waits for the body to estimate");
    assert_eq!(f.request_body(ctx, body.as_bytes(), true).unwrap(), PAUSE);
    let mut calls = f.take_calls();
    assert_eq!(calls.len(), 1);
    (ctx, calls.remove(0))
}

/// Ticks past the commit interval and returns the settlement callouts.
fn flush(f: &mut Filter) -> Vec<HttpCall> {
    f.advance_ms(60);
    f.tick().unwrap();
    f.take_calls()
}

#[test]
fn allow_then_settle_from_the_json_usage() {
    let mut f = load();
    let (ctx, call) = chat(
        &mut f,
        "req-1",
        r#"{"model":"gpt-4o","max_tokens":100,"messages":[]}"#,
    );
    assert_eq!(call.cluster, "sidecar");
    assert_eq!(call.header(":path"), Some("/v1/authorize"));
    let body = call.json();
    // The client's request id is a correlation id; the key is the filter's own.
    assert_eq!(body["correlation_id"], "req-1");
    assert!(body["idempotency_key"].as_str().unwrap().starts_with("tg-"));
    assert_eq!(body["api_key"], "tg_key");
    assert_eq!(body["route"], "chat");
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(
        body["meters"],
        json!({"requests": 1, "input_tokens": 0, "output_tokens": 100})
    );

    f.answer(call.token, 200, &allowed("acme/req-1")).unwrap();
    assert_eq!(f.resumed(ctx), 1);
    assert!(f.local_response(ctx).is_none());
    assert_eq!(
        f.response_headers(
            ctx,
            &[(":status", "200"), ("content-type", "application/json")],
            false
        )
        .unwrap(),
        CONTINUE
    );
    assert_eq!(
        f.response_header(ctx, "ratelimit-remaining").as_deref(),
        Some("599")
    );
    let usage = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
    let (a, b) = usage.split_at(40);
    f.response_body(ctx, a, false).unwrap();
    f.response_body(ctx, b, true).unwrap();
    f.finish(ctx).unwrap();
    assert!(f.take_calls().is_empty(), "commits wait for the batch");
    let calls = flush(&mut f);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header(":path"), Some("/v1/commit/batch"));
    let commit = &calls[0].json()["commits"][0];
    assert_eq!(commit["hold_id"], "acme/req-1");
    assert_eq!(commit["route"], "chat");
    assert_eq!(
        commit["meters"],
        json!({"requests": 1, "input_tokens": 12, "output_tokens": 34})
    );
    assert_eq!(f.metric("tollgate.allowed"), 1);
}

#[test]
fn denials_answer_429_and_402_with_headers_and_a_json_body() {
    let mut f = load();
    let (ctx, call) = get(&mut f, "/open/x", "r-429");
    let denied = json!({"allowed": false, "status": 429, "reason": "limit", "retry_after_s": 30, "credits": 0,
        "limit": {"name": "account:requests:minute", "max": 600, "remaining": 0, "reset_ms": f.now_ms() + 30_000}});
    f.answer(call.token, 200, denied.to_string().as_bytes())
        .unwrap();
    let r = f.local_response(ctx).expect("a local reply");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(r.header("ratelimit-limit"), Some("600"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("ratelimit-reset"), Some("30"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_eq!(r.json()["error"]["limit"], "account:requests:minute");
    assert_eq!(f.resumed(ctx), 0);

    let (ctx, call) = get(&mut f, "/open/y", "r-402");
    let broke =
        json!({"allowed": false, "status": 402, "reason": "credits", "credits": 10, "balance": 3});
    f.answer(call.token, 200, broke.to_string().as_bytes())
        .unwrap();
    let r = f.local_response(ctx).unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (402, json!("insufficient_credits"))
    );
    f.finish(ctx).unwrap();
    assert!(flush(&mut f).is_empty(), "a denied request settles nothing");
    assert_eq!(f.metric("tollgate.denied"), 2);
}

#[test]
fn sidecar_failures_apply_the_failure_mode_of_the_route() {
    let mut f = load();
    // Connect failure (Envoy answers 503) and 5xx: closed route -> 503, open route -> pass.
    for status in [503u16, 500, 504] {
        let (ctx, call) = chat(&mut f, &format!("c{status}"), "{}");
        f.answer(call.token, status, b"upstream connect error")
            .unwrap();
        assert_eq!(
            f.local_response(ctx).map(|r| r.status),
            Some(503),
            "closed on {status}"
        );
        let (ctx, call) = get(&mut f, "/open/x", &format!("o{status}"));
        f.answer(call.token, status, b"").unwrap();
        assert_eq!(
            (f.resumed(ctx), f.local_response(ctx).is_none()),
            (1, true),
            "open on {status}"
        );
    }
    // No answer at all: the tick applies the deadline (100 ms) and nothing waits longer.
    let (closed, _) = chat(&mut f, "t1", "{}");
    let (open, late) = get(&mut f, "/open/x", "t2");
    f.advance_ms(60);
    f.tick().unwrap();
    assert!(
        f.local_response(closed).is_none() && f.resumed(open) == 0,
        "not yet at 60 ms"
    );
    f.advance_ms(50);
    f.tick().unwrap();
    assert_eq!(f.local_response(closed).map(|r| r.status), Some(503));
    assert_eq!(f.resumed(open), 1);
    assert!(f.tick_period_ms() <= 100);
    // The late answer allowed it after all: the hold is given back, not charged.
    f.answer(late.token, 200, &allowed("acme/t2")).unwrap();
    assert_eq!(f.resumed(open), 1, "not resumed twice");
    let calls = flush(&mut f);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header(":path"), Some("/v1/release"));
    assert_eq!(calls[0].json()["hold_id"], "acme/t2");
    assert_eq!(f.metric("tollgate.failed_open"), 4);
    assert_eq!(f.metric("tollgate.failed_closed"), 4);
}

#[test]
fn an_unknown_sidecar_cluster_fails_at_once() {
    let mut f = Filter::load_with(&config(100), &["elsewhere"]).unwrap();
    assert!(f.configured);
    let ctx = f.new_request().unwrap();
    let a = f
        .request_headers(
            ctx,
            &[(":method", "GET"), (":path", "/open/x"), ("x-api-key", "k")],
            true,
        )
        .unwrap();
    assert_eq!(a, CONTINUE, "open route passes without waiting");
    let ctx = f.new_request().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/x"),
        ("x-api-key", "k"),
    ];
    f.request_headers(ctx, &headers, true).unwrap();
    assert_eq!(f.local_response(ctx).map(|r| r.status), Some(503));
}

#[test]
fn a_bad_configuration_is_refused_with_the_field_named() {
    let bad = config(100)
        .replace("\"max_tokens\"", "\"max tokens\"")
        .replace("\"cap\":4096", "\"cap\":1");
    let f = Filter::load(&bad).unwrap();
    assert!(!f.configured);
    assert!(
        f.logs()
            .iter()
            .any(|(_, l)| l.contains("routes[0].charges.output_tokens.cap")),
        "{:?}",
        f.logs()
    );
    let f = Filter::load("not json").unwrap();
    assert!(!f.configured);
}

#[test]
fn a_request_without_a_key_is_refused_and_ids_are_made_when_missing() {
    let mut f = load();
    let ctx = f.new_request().unwrap();
    f.request_headers(ctx, &[(":method", "GET"), (":path", "/open/x")], true)
        .unwrap();
    let r = f.local_response(ctx).unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (401, json!("missing_api_key"))
    );
    assert!(f.take_calls().is_empty());
    // No x-request-id (or an unusable one): the filter makes one and sets it on the request.
    let ctx = f.new_request().unwrap();
    f.request_headers(
        ctx,
        &[
            (":method", "GET"),
            (":path", "/open/x"),
            ("x-api-key", "k"),
            ("x-request-id", "bad id!"),
        ],
        true,
    )
    .unwrap();
    let call = f.take_calls().remove(0);
    let made = f.request_header(ctx, "x-request-id").unwrap();
    assert!(made.starts_with("tg-"), "{made}");
    assert_eq!(call.json()["correlation_id"], made.as_str());
    assert_ne!(call.json()["idempotency_key"], made.as_str());
    assert_eq!(
        call.header("authorization"),
        None,
        "no token configured, none sent"
    );
    // Unmatched paths pass untouched.
    let ctx = f.new_request().unwrap();
    assert_eq!(
        f.request_headers(ctx, &[(":method", "GET"), (":path", "/elsewhere")], true)
            .unwrap(),
        CONTINUE
    );
}

const OPENAI_SSE: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"he\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"llo\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
data: [DONE]\n\n";
const ANTHROPIC_SSE: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";

/// Streams `body` in chunks of `size` through an allowed chat request; returns the commit.
fn stream(f: &mut Filter, id: &str, content_type: &str, body: &[u8], size: usize) -> Value {
    let (ctx, call) = chat(f, id, r#"{"max_tokens":64}"#);
    f.answer(call.token, 200, &allowed(&format!("acme/{id}")))
        .unwrap();
    f.response_headers(
        ctx,
        &[(":status", "200"), ("content-type", content_type)],
        false,
    )
    .unwrap();
    let chunks: Vec<&[u8]> = body.chunks(size.max(1)).collect();
    for (i, c) in chunks.iter().enumerate() {
        f.response_body(ctx, c, i + 1 == chunks.len()).unwrap();
    }
    f.finish(ctx).unwrap();
    let calls = flush(f);
    assert_eq!(calls.len(), 1);
    calls[0].json()["commits"][0]["meters"].clone()
}

#[test]
fn sse_streams_of_both_shapes_split_at_awkward_boundaries() {
    let mut f = load();
    for size in [1, 2, 3, 7, 13, 64, 4096] {
        let m = stream(
            &mut f,
            &format!("o{size}"),
            "text/event-stream",
            OPENAI_SSE.as_bytes(),
            size,
        );
        assert_eq!(
            m,
            json!({"requests": 1, "input_tokens": 7, "output_tokens": 2}),
            "chunks of {size}"
        );
        let m = stream(
            &mut f,
            &format!("a{size}"),
            "text/event-stream; charset=utf-8",
            ANTHROPIC_SSE.as_bytes(),
            size,
        );
        assert_eq!(
            m,
            json!({"requests": 1, "input_tokens": 25, "output_tokens": 15}),
            "chunks of {size}"
        );
    }
    // Non-streaming Anthropic JSON, in odd chunks.
    let anthropic = br#"{"id":"m","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"output_tokens":20}}"#;
    let m = stream(&mut f, "aj", "application/json", anthropic, 11);
    assert_eq!(
        m,
        json!({"requests": 1, "input_tokens": 10, "output_tokens": 20})
    );
    assert_eq!(f.metric("tollgate.usage_errors"), 0);
}

#[test]
fn truncated_malformed_and_huge_bodies_settle_at_the_estimate() {
    let mut f = load();
    let estimate = json!({"requests": 1, "input_tokens": 0, "output_tokens": 64});
    let truncated = &br#"{"usage":{"prompt_tokens":12,"completion_"#[..];
    assert_eq!(
        stream(&mut f, "t", "application/json", truncated, 5),
        estimate
    );
    assert_eq!(
        stream(&mut f, "m", "application/json", b"<html>oops</html>", 3),
        estimate
    );
    let huge = vec![b'x'; 3 << 20];
    assert_eq!(
        stream(&mut f, "h", "application/json", &huge, 65536),
        estimate
    );
    // A stream cut before its usage event settles at the estimate too, but it carries the text
    // it delivered for the sidecar to count (a_stream_reset_mid_response_...): no usage error.
    let cut_stream = &OPENAI_SSE.as_bytes()[..60];
    assert_eq!(
        stream(&mut f, "s", "text/event-stream", cut_stream, 9),
        estimate
    );
    // A cut stream with no text at all is a usage error, settled at the estimate.
    let no_text = "data: {\"choices\":[],\"usage\":null}\n\n";
    assert_eq!(
        stream(&mut f, "n", "text/event-stream", no_text.as_bytes(), 9),
        estimate
    );
    assert_eq!(f.metric("tollgate.usage_errors"), 4);
}

#[test]
fn usage_from_a_header_or_the_byte_count_and_release_on_upstream_failure() {
    let mut f = load();
    let (ctx, call) = get(&mut f, "/hdr/x", "h1");
    f.answer(call.token, 200, &allowed("acme/h1")).unwrap();
    f.response_headers(ctx, &[(":status", "200"), ("x-usage-tokens", "42")], true)
        .unwrap();
    f.finish(ctx).unwrap();
    let (ctx, call) = get(&mut f, "/files/a", "b1");
    f.answer(call.token, 200, &allowed("acme/b1")).unwrap();
    f.response_headers(ctx, &[(":status", "200")], false)
        .unwrap();
    f.response_body(ctx, &[0u8; 1000], false).unwrap();
    f.response_body(ctx, &[0u8; 234], true).unwrap();
    f.finish(ctx).unwrap();
    let (ctx, call) = get(&mut f, "/files/b", "b2");
    f.answer(call.token, 200, &allowed("acme/b2")).unwrap();
    f.response_headers(ctx, &[(":status", "503")], true)
        .unwrap();
    f.finish(ctx).unwrap();
    let calls = flush(&mut f);
    let paths: Vec<_> = calls
        .iter()
        .map(|c| c.header(":path").unwrap_or_default().to_string())
        .collect();
    assert_eq!(paths, ["/v1/commit/batch", "/v1/release"]);
    let commits = calls[0].json()["commits"].clone();
    assert_eq!(commits[0]["meters"], json!({"tokens": 42}));
    assert_eq!(commits[1]["meters"], json!({"requests": 1, "bytes": 1234}));
    assert_eq!(calls[1].json()["hold_id"], "acme/b2");
}

#[test]
fn commits_are_batched_and_retried_when_the_sidecar_fails() {
    let mut f = load();
    for i in 0..5 {
        let (ctx, call) = get(&mut f, "/open/x", &format!("b{i}"));
        f.answer(call.token, 200, &allowed(&format!("acme/b{i}")))
            .unwrap();
        f.response_headers(ctx, &[(":status", "200")], true)
            .unwrap();
        f.finish(ctx).unwrap();
    }
    let calls = flush(&mut f);
    assert_eq!(calls.len(), 2, "5 commits, batches of 3: 2 callouts");
    let sizes: Vec<usize> = calls
        .iter()
        .map(|c| c.json()["commits"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, [3, 2]);
    // The first batch fails (sidecar down): it is sent again on a later tick; the second lands.
    f.answer(calls[0].token, 503, b"").unwrap();
    let ok = json!({"results": [{"hold_id": "acme/b3", "status": "committed", "credits": 1}, {"hold_id": "acme/b4", "status": "committed", "credits": 1}]});
    f.answer(calls[1].token, 200, ok.to_string().as_bytes())
        .unwrap();
    f.advance_ms(200); // the retry backs off
    let again = flush(&mut f);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].json()["commits"], calls[0].json()["commits"]);
    assert_eq!(f.metric("tollgate.commit_batches"), 3);
    assert_eq!(f.metric("tollgate.commits_batched"), 8);
}

#[test]
fn instructions_per_allowed_request() {
    let mut f = load();
    // Warm up once (first calls allocate), then measure one allow + settle.
    for id in ["w", "m"] {
        let before = f.fuel_used();
        let (ctx, call) = chat(&mut f, id, r#"{"model":"gpt-4o","max_tokens":100}"#);
        f.answer(call.token, 200, &allowed(&format!("acme/{id}")))
            .unwrap();
        f.response_headers(
            ctx,
            &[(":status", "200"), ("content-type", "application/json")],
            false,
        )
        .unwrap();
        f.response_body(
            ctx,
            br#"{"usage":{"prompt_tokens":12,"completion_tokens":34}}"#,
            true,
        )
        .unwrap();
        f.finish(ctx).unwrap();
        let used = f.fuel_used() - before;
        if id == "m" {
            let size = std::fs::metadata(wasm_host::wasm_path())
                .map(|m| m.len())
                .unwrap_or(0);
            println!("filter: {used} wasm instructions (fuel) per allowed request with JSON usage; .wasm {size} bytes");
            assert!(used > 1000, "the measurement measures something");
        }
    }
}

#[test]
fn a_stream_without_usage_sends_its_text_to_be_counted() {
    let mut f = load();
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\ndata: [DONE]\n\n";
    let (ctx, call) = chat(&mut f, "nu", r#"{"max_tokens":64}"#);
    f.answer(call.token, 200, &allowed("acme/nu")).unwrap();
    f.response_headers(
        ctx,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    )
    .unwrap();
    for c in sse.as_bytes().chunks(7) {
        f.response_body(ctx, c, false).unwrap();
    }
    f.response_body(ctx, b"", true).unwrap();
    f.finish(ctx).unwrap();
    let calls = flush(&mut f);
    let commit = &calls[0].json()["commits"][0];
    assert_eq!(commit["output_text"], "Hello world");
    assert_eq!(f.metric("tollgate.usage_errors"), 0);
}

#[test]
fn a_stream_reset_mid_response_is_settled_with_what_it_carried() {
    let mut f = load();
    let first = "data: {\"choices\":[{\"delta\":{\"content\":\"He\"}}],\"usage\":null}\n\n";
    let (ctx, call) = chat(&mut f, "cut", r#"{"max_tokens":40,"stream":true}"#);
    f.answer(call.token, 200, &allowed("acme/cut")).unwrap();
    f.response_headers(
        ctx,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    )
    .unwrap();
    f.response_body(ctx, first.as_bytes(), false).unwrap();
    // No on_log: Envoy skips it for a stream reset before completion.
    f.reset(ctx).unwrap();
    let calls = flush(&mut f);
    assert_eq!(calls.len(), 1, "one settlement callout");
    let commit = &calls[0].json()["commits"][0];
    assert_eq!(commit["hold_id"], "acme/cut");
    assert_eq!(commit["output_text"], "He", "{commit}");
}

fn lease_config() -> String {
    json!({
        "sidecar": {"cluster": "sidecar", "timeout_ms": 200},
        "deadline_ms": 100,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 50,
        "routes": [
            {"name": "leased", "path_prefix": "/lease/",
             "charges": {"requests": {"fixed": 1}, "tokens": {"fixed": 10}},
             "usage": {"source": "header", "header": "x-usage-tokens", "meter": "tokens"},
             "lease": {"requests": 3, "ttl_ms": 1000}}
        ]
    })
    .to_string()
}

/// Sends a GET on the leased route; returns the context, the action and the callouts it made.
fn leased_get(f: &mut Filter, id: &str) -> (u32, i32, Vec<HttpCall>) {
    let ctx = f.new_request().unwrap();
    let a = f
        .request_headers(
            ctx,
            &[
                (":method", "GET"),
                (":path", "/lease/x"),
                (":authority", "api"),
                ("x-api-key", "tg_key"),
                ("x-request-id", id),
            ],
            true,
        )
        .unwrap();
    (ctx, a, f.take_calls())
}

/// The commits in these settlement callouts.
fn commits_in(calls: &[HttpCall]) -> Vec<Value> {
    calls
        .iter()
        .filter_map(|c| c.json()["commits"].as_array().cloned())
        .flatten()
        .collect()
}

fn respond_with_tokens(f: &mut Filter, ctx: u32, tokens: &str) {
    f.response_headers(ctx, &[(":status", "200"), ("x-usage-tokens", tokens)], true)
        .unwrap();
    f.finish(ctx).unwrap();
}

#[test]
fn a_leased_route_admits_from_the_lease_without_callouts_and_commits_what_was_used() {
    let mut f = Filter::load(&lease_config()).expect("filter loads");
    assert!(f.configured, "{:?}", f.logs());

    // No lease yet: the first request is decided exactly, and a lease is asked for on the tick.
    let (ctx, a, calls) = leased_get(&mut f, "r1");
    assert_eq!((a, calls.len()), (PAUSE, 1));
    assert_eq!(calls[0].json()["correlation_id"], "r1");
    f.answer(calls[0].token, 200, &allowed("acme/r1")).unwrap();
    respond_with_tokens(&mut f, ctx, "7");
    f.advance_ms(10);
    f.tick().unwrap();
    let calls = f.take_calls();
    let mut settled = commits_in(&calls);
    let ask = calls
        .iter()
        .find(|c| {
            c.json()["idempotency_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("lease."))
        })
        .expect("a lease is asked for");
    assert_eq!(ask.header(":path"), Some("/v1/authorize"));
    assert_eq!(ask.json()["meters"], json!({"requests": 3, "tokens": 30}));
    let lease_hold = format!("acme/{}", ask.json()["idempotency_key"].as_str().unwrap());
    f.answer(ask.token, 200, &allowed(&lease_hold)).unwrap();
    assert_eq!(f.metric("tollgate.leases_granted"), 1);

    // Three requests fit the lease: admitted at once, no callout.
    for (id, used) in [("r2", "4"), ("r3", "5"), ("r4", "6")] {
        let (ctx, a, calls) = leased_get(&mut f, id);
        assert_eq!(
            (a, calls.len()),
            (CONTINUE, 0),
            "{id} is admitted from the lease"
        );
        respond_with_tokens(&mut f, ctx, used);
    }
    assert_eq!(f.metric("tollgate.leased"), 3);
    // The fourth does not fit what is left: decided exactly again.
    let (ctx, a, calls) = leased_get(&mut f, "r5");
    assert_eq!((a, calls.len()), (PAUSE, 1));
    f.answer(calls[0].token, 200, &allowed("acme/r5")).unwrap();
    respond_with_tokens(&mut f, ctx, "1");

    // After the lease's time: committed with the measured usage of its three requests.
    f.advance_ms(1100);
    f.tick().unwrap();
    settled.extend(commits_in(&f.take_calls()));
    let lease_commit = settled
        .iter()
        .find(|c| c["hold_id"] == lease_hold.as_str())
        .unwrap_or_else(|| panic!("the lease is committed: {settled:?}"));
    assert_eq!(lease_commit["meters"], json!({"requests": 3, "tokens": 15}));
    assert!(settled.iter().any(|c| c["hold_id"] == "acme/r1"));
    assert!(settled.iter().any(|c| c["hold_id"] == "acme/r5"));
    assert_eq!(f.metric("tollgate.leases_committed"), 1);
}

#[test]
fn a_refused_lease_leaves_every_request_to_the_exact_decision() {
    let mut f = Filter::load(&lease_config()).expect("filter loads");
    let (ctx, _, calls) = leased_get(&mut f, "r1");
    f.answer(calls[0].token, 200, &allowed("acme/r1")).unwrap();
    respond_with_tokens(&mut f, ctx, "1");
    f.advance_ms(10);
    f.tick().unwrap();
    let ask = f
        .take_calls()
        .into_iter()
        .find(|c| {
            c.json()["idempotency_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("lease."))
        })
        .expect("a lease is asked for");
    let denied = json!({"allowed": false, "status": 429, "reason": "limit", "credits": 0,
                        "retry_after_s": 30,
                        "limit": {"name": "account:requests:day", "max": 10, "remaining": 2, "reset_ms": 0}});
    f.answer(ask.token, 200, denied.to_string().as_bytes())
        .unwrap();
    assert_eq!(f.metric("tollgate.leases_refused"), 1);
    // Every request now asks the sidecar, and no new lease is asked for within its time.
    for id in ["r2", "r3"] {
        let (ctx, a, calls) = leased_get(&mut f, id);
        assert_eq!((a, calls.len()), (PAUSE, 1), "{id}");
        f.answer(calls[0].token, 200, &allowed(&format!("acme/{id}")))
            .unwrap();
        respond_with_tokens(&mut f, ctx, "1");
    }
    f.advance_ms(20);
    f.tick().unwrap();
    assert!(f.take_calls().iter().all(|c| !c.json()["idempotency_key"]
        .as_str()
        .is_some_and(|k| k.starts_with("lease."))));
}

/// Shadow limits: an admitted request that a shadow limit would have refused carries
/// `x-tollgate-shadow` and is settled as usual. A shadow route asks `/v1/check`, passes whatever
/// it answers (a refusal only reported, a failure passed), and settles nothing.
#[test]
fn shadow_limits_and_shadow_routes_report_and_never_refuse() {
    let cfg = json!({
        "sidecar": {"cluster": "sidecar", "timeout_ms": 200},
        "deadline_ms": 100,
        "key": {"header": "x-api-key"},
        "commit_interval_ms": 50,
        "routes": [
            {"name": "rollout", "path_prefix": "/new/", "shadow": true, "failure_mode": "closed",
             "charges": {"requests": {"fixed": 1}}},
            {"name": "open", "path_prefix": "/open/", "charges": {"requests": {"fixed": 1}}}
        ]
    })
    .to_string();
    let mut f = Filter::load(&cfg).unwrap();
    assert!(f.configured, "{:?}", f.logs());
    // A shadow route cannot hold a lease or refuse a repeated client key.
    for extra in [
        json!({"lease": {"requests": 10}}),
        json!({"idempotency_header": "idempotency-key"}),
    ] {
        let mut bad: Value = serde_json::from_str(&cfg).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            bad["routes"][0][k] = v.clone();
        }
        let refused = Filter::load(&bad.to_string()).unwrap();
        assert!(!refused.configured, "{extra}");
        assert!(
            refused
                .logs()
                .iter()
                .any(|(_, l)| l.contains("routes[0].shadow")),
            "{:?}",
            refused.logs()
        );
    }

    // An enforced route whose decision names a shadow limit.
    let (ctx, call) = get(&mut f, "/open/a", "s-1");
    assert_eq!(call.header(":path"), Some("/v1/authorize"));
    let mut d: Value = serde_json::from_slice(&allowed("acme/s-1")).unwrap();
    d["shadow"] = json!(["account:requests:minute", "key:requests:day"]);
    f.answer(call.token, 200, d.to_string().as_bytes()).unwrap();
    assert_eq!(f.resumed(ctx), 1);
    f.response_headers(ctx, &[(":status", "200")], true)
        .unwrap();
    assert_eq!(
        f.response_header(ctx, "x-tollgate-shadow").as_deref(),
        Some("would-deny limit=account:requests:minute,key:requests:day")
    );
    f.finish(ctx).unwrap();
    let commits = flush(&mut f);
    assert_eq!(commits.len(), 1, "settled as usual");
    assert_eq!(commits[0].json()["commits"][0]["hold_id"], "acme/s-1");

    // The shadow route: a check, a refusal reported and passed, nothing settled.
    let (ctx, call) = get(&mut f, "/new/b", "s-2");
    assert_eq!(call.header(":path"), Some("/v1/check"));
    let denied = json!({"allowed": false, "status": 429, "reason": "limit", "retry_after_s": 30, "credits": 0,
        "limit": {"name": "account:requests:day", "max": 2, "remaining": 0, "reset_ms": f.now_ms() + 30_000}});
    f.answer(call.token, 200, denied.to_string().as_bytes())
        .unwrap();
    assert!(f.local_response(ctx).is_none(), "never refused");
    assert_eq!(f.resumed(ctx), 1);
    f.response_headers(ctx, &[(":status", "200")], true)
        .unwrap();
    assert_eq!(
        f.response_header(ctx, "x-tollgate-shadow").as_deref(),
        Some("would-deny limit=account:requests:day")
    );
    f.finish(ctx).unwrap();
    // Admitted by the check: no header. Out of credit: the reason.
    let (ctx, call) = get(&mut f, "/new/c", "s-3");
    f.answer(
        call.token,
        200,
        json!({"allowed": true, "status": 200, "credits": 0})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    f.response_headers(ctx, &[(":status", "200")], true)
        .unwrap();
    assert_eq!(f.response_header(ctx, "x-tollgate-shadow"), None);
    f.finish(ctx).unwrap();
    let (ctx, call) = get(&mut f, "/new/d", "s-4");
    let broke =
        json!({"allowed": false, "status": 402, "reason": "credits", "credits": 10, "balance": 3});
    f.answer(call.token, 200, broke.to_string().as_bytes())
        .unwrap();
    f.response_headers(ctx, &[(":status", "200")], true)
        .unwrap();
    assert_eq!(
        f.response_header(ctx, "x-tollgate-shadow").as_deref(),
        Some("would-deny reason=credits")
    );
    f.finish(ctx).unwrap();
    // The sidecar fails: a shadow route passes anyway (its own failure mode says closed).
    let (ctx, call) = get(&mut f, "/new/e", "s-5");
    f.answer(call.token, 503, b"").unwrap();
    assert!(f.local_response(ctx).is_none());
    assert_eq!(f.resumed(ctx), 1);
    f.finish(ctx).unwrap();
    assert!(
        flush(&mut f).is_empty(),
        "a shadow route holds and settles nothing"
    );
    assert_eq!(f.metric("tollgate.shadow_would_deny"), 3);
}
