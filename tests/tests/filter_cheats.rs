//! The compiled filter against a caller who would like to pay less, and an upstream or sidecar
//! that does not cooperate: each scenario is a way around the meter, driven through the
//! wasmtime host, and what the filter does instead. (The same attempts through a real Envoy
//! are in e2e_cheats.rs.)

use serde_json::{json, Value};
use wasm_host::{Filter, HttpCall, CONTINUE, PAUSE};

fn config() -> String {
    json!({
        "sidecar": {"cluster": "sidecar", "timeout_ms": 200, "token": "filter-decision-token"},
        "deadline_ms": 100,
        "key": {"header": "x-api-key"},
        "commit_batch": 100,
        "commit_interval_ms": 50,
        "commit_batch_bytes": 65536,
        // A callout per request, so each attempt's authorize is read on its own (batched ones
        // carry the same request: tests/tests/filter_batch.rs).
        "authorize_batch": 0,
        "routes": [
            {"name": "chat", "method": "POST", "path_prefix": "/v1/chat/completions",
             "charges": {"requests": {"fixed": 1}, "input_tokens": {"fixed": 0},
                         "output_tokens": {"body_field": ["max_tokens", "max_completion_tokens", "max_output_tokens"],
                                           "default": 256, "cap": 4096}},
             "usage": {"source": "body"}, "model_field": "model"},
            {"name": "strict", "method": "POST", "path_prefix": "/strict/", "bad_estimate": "reject",
             "on_upstream_error": "requests",
             "charges": {"requests": {"fixed": 1}, "output_tokens": {"body_field": "max_tokens", "cap": 1000}},
             "usage": {"source": "body"}},
            {"name": "pay", "method": "POST", "path_prefix": "/pay/", "idempotency_header": "idempotency-key",
             "on_upstream_error": "estimate", "charges": {"requests": {"fixed": 1}}},
            {"name": "exact", "path_prefix": "/Exact/", "case_sensitive": true,
             "charges": {"requests": {"fixed": 1}}}
        ]
    })
    .to_string()
}

fn load() -> Filter {
    let f = Filter::load(&config()).expect("filter loads");
    assert!(f.configured, "configuration refused: {:?}", f.logs());
    f
}

fn allowed(hold: &str) -> Vec<u8> {
    json!({"allowed": true, "status": 200, "account": "acme", "hold_id": hold, "credits": 0})
        .to_string()
        .into_bytes()
}

/// Sends a POST with a body; returns the context and the authorize callout, if one was made.
fn post(
    f: &mut Filter,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> (u32, Option<HttpCall>) {
    let ctx = f.new_request().unwrap();
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "api"),
        ("x-api-key", "tg_key"),
        ("content-length", "99"),
        ("accept-encoding", "gzip, br"),
    ];
    headers.extend_from_slice(extra);
    let a = f.request_headers(ctx, &headers, body.is_empty()).unwrap();
    if !body.is_empty() && a == CONTINUE {
        f.request_body(ctx, body, true).unwrap();
    }
    let mut calls = f.take_calls();
    (ctx, (!calls.is_empty()).then(|| calls.remove(0)))
}

fn chat_body(extra: &str) -> Vec<u8> {
    format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
        .into_bytes()
}

/// Ticks past the commit interval (and any retry backoff) and returns the callouts.
fn flush_after(f: &mut Filter, ms: u64) -> Vec<HttpCall> {
    f.advance_ms(ms);
    f.tick().unwrap();
    f.take_calls()
}

fn respond(f: &mut Filter, ctx: u32, status: &str, content_type: &str, body: &[u8]) {
    f.response_headers(
        ctx,
        &[(":status", status), ("content-type", content_type)],
        false,
    )
    .unwrap();
    f.response_body(ctx, body, true).unwrap();
    f.finish(ctx).unwrap();
}

#[test]
fn the_client_request_id_is_a_correlation_id_never_the_key() {
    let mut f = load();
    let mut keys = Vec::new();
    for _ in 0..6 {
        let (_, call) = post(
            &mut f,
            "/v1/chat/completions",
            &[("x-request-id", "same-id-6-times")],
            &chat_body(r#","max_tokens":10"#),
        );
        let body = call.unwrap().json();
        assert_eq!(body["correlation_id"], "same-id-6-times");
        keys.push(body["idempotency_key"].as_str().unwrap().to_string());
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 6, "each request is its own charge: {keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("tg-")));
    // No x-request-id: an id is set for the upstream and the logs — not the decision key, which
    // names the hold and so never leaves the filter and the sidecar.
    let (ctx, call) = post(&mut f, "/pay/x", &[], b"");
    let call = call.unwrap();
    let body = call.json();
    let sent = f.request_header(ctx, "x-request-id").unwrap();
    assert!(sent.starts_with("tg-") && sent.len() == 35, "{sent}");
    assert_ne!(body["idempotency_key"], sent.as_str());
    assert_eq!(body["correlation_id"], sent.as_str());
    // Every callout carries the decision token.
    assert_eq!(
        call.header("authorization"),
        Some("Bearer filter-decision-token")
    );
}

#[test]
fn a_reused_client_idempotency_key_is_refused_not_served() {
    let mut f = load();
    let (ctx1, call) = post(
        &mut f,
        "/pay/charge",
        &[("idempotency-key", "order-77")],
        b"",
    );
    let call = call.unwrap();
    assert_eq!(call.json()["idempotency_key"], "ik:order-77");
    f.answer(call.token, 200, &allowed("acme/ik:order-77"))
        .unwrap();
    assert_eq!(f.resumed(ctx1), 1);
    // The repeat: the sidecar answers the first decision again, marked replayed.
    let (ctx2, call) = post(
        &mut f,
        "/pay/charge",
        &[("idempotency-key", "order-77")],
        b"",
    );
    let call = call.unwrap();
    f.answer_with(
        call.token,
        200,
        &[("x-tollgate-replayed", "true")],
        &allowed("acme/ik:order-77"),
    )
    .unwrap();
    let r = f.local_response(ctx2).expect("refused");
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (409, json!("idempotency_key_reused"))
    );
    assert_eq!(f.resumed(ctx2), 0);
    assert_eq!(f.metric("tollgate.idempotency_key_reused"), 1);
    // The repeat settles nothing; the first settles its own hold once.
    f.finish(ctx2).unwrap();
    respond(&mut f, ctx1, "200", "application/json", b"{}");
    let calls = flush_after(&mut f, 60);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].json()["commits"][0]["hold_id"], "acme/ik:order-77");
    assert_eq!(
        calls[0].header("authorization"),
        Some("Bearer filter-decision-token")
    );
    // A key too long or odd for an id is hashed, not refused.
    let long = "x/".repeat(100);
    let (_, call) = post(&mut f, "/pay/charge", &[("idempotency-key", &long)], b"");
    let k = call.unwrap().json()["idempotency_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(k.starts_with("ik:h") && k.len() == 36, "{k}");
}

#[test]
fn every_spelling_of_a_path_is_metered_as_the_canonical_one() {
    let mut f = load();
    for p in [
        "//v1/chat/completions",
        "/./v1/chat/completions",
        "/%76%31/chat/completions",
        "/V1/chat/completions",
        "/v1/chat/x/../completions?x=1",
    ] {
        let (ctx, call) = post(&mut f, p, &[], &chat_body(r#","max_tokens":5"#));
        let call = call.unwrap_or_else(|| panic!("{p} was not metered"));
        assert_eq!(call.json()["route"], "chat", "{p}");
        // The upstream is sent the path that was matched and charged.
        let fwd = f.request_header(ctx, ":path").unwrap();
        assert!(
            fwd.eq_ignore_ascii_case("/v1/chat/completions") || fwd.ends_with("?x=1"),
            "{p} -> {fwd}"
        );
    }
    for bad in ["/v1%2Fchat/completions", "/v1/chat/%zz", "/v1/%00"] {
        let (ctx, call) = post(&mut f, bad, &[], b"");
        assert!(call.is_none(), "{bad}");
        let r = f.local_response(ctx).unwrap();
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (400, json!("invalid_path"))
        );
    }
    assert_eq!(f.metric("tollgate.invalid_path"), 3);
    // A case-sensitive route is told so; other spellings are not it.
    let ctx = f.new_request().unwrap();
    let a = f
        .request_headers(
            ctx,
            &[
                (":method", "GET"),
                (":path", "/exact/a"),
                ("x-api-key", "k"),
            ],
            true,
        )
        .unwrap();
    assert_eq!((a, f.take_calls().len()), (CONTINUE, 0));
}

#[test]
fn estimates_that_cannot_be_read_are_charged_their_cap() {
    let mut f = load();
    let cases: [(&str, u64); 7] = [
        (r#","max_tokens":100"#, 100),
        (r#","max_completion_tokens":200"#, 200),
        (r#","max_output_tokens":300"#, 300),
        (r#","max_tokens":"8192""#, 4096),
        (r#","max_tokens":8192.0"#, 4096),
        ("", 4096),
        (r#","max_tokens":-1"#, 4096),
    ];
    for (extra, want) in cases {
        let (_, call) = post(&mut f, "/v1/chat/completions", &[], &chat_body(extra));
        assert_eq!(
            call.unwrap().json()["meters"]["output_tokens"],
            want,
            "{extra:?}"
        );
    }
    for body in [
        &b"not json"[..],
        b"[1,2]",
        b"{\"max_tokens\":1,\"max_tokens\":2}",
    ] {
        let (_, call) = post(&mut f, "/v1/chat/completions", &[], body);
        assert_eq!(call.unwrap().json()["meters"]["output_tokens"], 4096);
    }
    // Compressed: unreadable, so the cap.
    let (_, call) = post(
        &mut f,
        "/v1/chat/completions",
        &[("content-encoding", "gzip")],
        &chat_body(r#","max_tokens":1"#),
    );
    assert_eq!(call.unwrap().json()["meters"]["output_tokens"], 4096);
    // A route that refuses them says why.
    for (body, headers, status, code) in [
        (&b"not json"[..], vec![], 400, "invalid_body"),
        (
            &br#"{"max_tokens":"5"}"#[..],
            vec![],
            400,
            "invalid_estimate",
        ),
        (
            &br#"{"max_tokens":5}"#[..],
            vec![("content-encoding", "br")],
            415,
            "compressed_body",
        ),
    ] {
        let (ctx, call) = post(&mut f, "/strict/x", &headers, body);
        assert!(call.is_none());
        let r = f.local_response(ctx).unwrap();
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (status, json!(code))
        );
    }
    let huge = format!(r#"{{"max_tokens":5,"pad":"{}"}}"#, "x".repeat(2 << 20));
    let (ctx, call) = post(&mut f, "/strict/x", &[], huge.as_bytes());
    assert!(call.is_none());
    assert_eq!(f.local_response(ctx).unwrap().status, 413);
    assert_eq!(f.metric("tollgate.bad_estimate"), 4);
}

#[test]
fn streams_are_asked_for_usage_and_responses_for_plain_bytes() {
    let mut f = load();
    let (ctx, call) = post(
        &mut f,
        "/v1/chat/completions",
        &[],
        &chat_body(r#","stream":true,"max_tokens":9"#),
    );
    assert!(call.is_some());
    let sent: Value = serde_json::from_slice(&f.request_body_now(ctx)).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    assert_eq!(sent["messages"][0]["content"], "hi");
    assert_eq!(
        f.request_header(ctx, "content-length"),
        None,
        "the body's length changed"
    );
    assert_eq!(
        f.request_header(ctx, "accept-encoding"),
        None,
        "asked for identity"
    );
    assert_eq!(f.metric("tollgate.usage_requested"), 1);
    // Not streaming, or already asking: the body is left as it was.
    let body = chat_body(r#","max_tokens":9"#);
    let (ctx, _) = post(&mut f, "/v1/chat/completions", &[], &body);
    assert_eq!(f.request_body_now(ctx), body);
    let body = chat_body(r#","stream":true,"stream_options":{"include_usage":true}"#);
    let (ctx, _) = post(&mut f, "/v1/chat/completions", &[], &body);
    assert_eq!(f.request_body_now(ctx), body);
    assert_eq!(f.metric("tollgate.usage_requested"), 1);
}

/// Answers `call` allowed, responds, flushes; returns the settlement callouts.
fn settle_after(
    f: &mut Filter,
    ctx: u32,
    call: HttpCall,
    hold: &str,
    status: &str,
    ct: &str,
    body: &[u8],
) -> Vec<HttpCall> {
    f.answer(call.token, 200, &allowed(hold)).unwrap();
    respond(f, ctx, status, ct, body);
    flush_after(f, 60)
}

#[test]
fn upstream_errors_without_usage_are_not_billed_as_usage() {
    let mut f = load();
    // Default: released.
    let (ctx, call) = post(
        &mut f,
        "/v1/chat/completions",
        &[],
        &chat_body(r#","max_tokens":1024"#),
    );
    let err = br#"{"error":{"message":"The model `gpt-9` does not exist","type":"invalid_request_error"}}"#;
    let calls = settle_after(
        &mut f,
        ctx,
        call.unwrap(),
        "acme/a",
        "404",
        "application/json",
        err,
    );
    assert_eq!(calls[0].header(":path"), Some("/v1/release"));
    // `requests`: the request counts, its tokens do not.
    let (ctx, call) = post(&mut f, "/strict/x", &[], br#"{"max_tokens":500}"#);
    let calls = settle_after(
        &mut f,
        ctx,
        call.unwrap(),
        "acme/b",
        "429",
        "application/json",
        err,
    );
    assert_eq!(
        calls[0].json()["commits"][0]["meters"],
        json!({"requests": 1, "output_tokens": 0})
    );
    // `estimate`.
    let (ctx, call) = post(&mut f, "/pay/x", &[], b"");
    let calls = settle_after(
        &mut f,
        ctx,
        call.unwrap(),
        "acme/c",
        "422",
        "application/json",
        err,
    );
    assert_eq!(
        calls[0].json()["commits"][0]["meters"],
        json!({"requests": 1})
    );
    // An error that reports usage is charged it.
    let (ctx, call) = post(
        &mut f,
        "/v1/chat/completions",
        &[],
        &chat_body(r#","max_tokens":1024"#),
    );
    let with_usage =
        br#"{"error":{"message":"cut"},"usage":{"prompt_tokens":10,"completion_tokens":3}}"#;
    let calls = settle_after(
        &mut f,
        ctx,
        call.unwrap(),
        "acme/d",
        "400",
        "application/json",
        with_usage,
    );
    assert_eq!(calls[0].json()["commits"][0]["meters"]["output_tokens"], 3);
    assert_eq!(f.metric("tollgate.upstream_errors"), 3);
}

#[test]
fn a_compressed_response_is_charged_the_estimate_and_counted() {
    let mut f = load();
    let (ctx, call) = post(
        &mut f,
        "/v1/chat/completions",
        &[],
        &chat_body(r#","max_tokens":700"#),
    );
    f.answer(call.unwrap().token, 200, &allowed("acme/z"))
        .unwrap();
    f.response_headers(
        ctx,
        &[
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        false,
    )
    .unwrap();
    f.response_body(ctx, &[0x1f, 0x8b, 8, 0, 1, 2, 3], true)
        .unwrap();
    f.finish(ctx).unwrap();
    let calls = flush_after(&mut f, 60);
    assert_eq!(
        calls[0].json()["commits"][0]["meters"]["output_tokens"],
        700
    );
    assert_eq!(f.metric("tollgate.usage_errors"), 1);
}

/// A usage-less SSE stream of `n` bytes of text.
fn usage_less_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let piece = "lorem ipsum dolor sit amet ";
    let mut sent = 0;
    while sent < n {
        out.extend_from_slice(
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{piece}\"}}}}]}}\n\n")
                .as_bytes(),
        );
        sent += piece.len();
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

#[test]
fn settlement_is_split_to_fit_and_never_dropped_free() {
    let mut f = load();
    // Three 30 KB usage-less streams: their commits carry the text, and a batch is at most
    // 64 KiB (this config), so they go in two batches.
    let mut holds = Vec::new();
    for i in 0..3 {
        let (ctx, call) = post(
            &mut f,
            "/v1/chat/completions",
            &[],
            &chat_body(r#","max_tokens":900"#),
        );
        let hold = format!("acme/s{i}");
        f.answer(call.unwrap().token, 200, &allowed(&hold)).unwrap();
        respond(
            &mut f,
            ctx,
            "200",
            "text/event-stream",
            &usage_less_stream(30_000),
        );
        holds.push(hold);
    }
    let calls = flush_after(&mut f, 60);
    let sizes: Vec<usize> = calls
        .iter()
        .map(|c| c.json()["commits"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [2, 1]);
    assert!(calls.iter().all(|c| c.body.len() <= 65536));
    // The sidecar refuses the first batch whole (too large for it): each item goes alone.
    f.answer(calls[0].token, 413, b"").unwrap();
    // The second batch: its item is refused on its own (a bad item): committed at the estimate.
    let failed = json!({"results": [{"status": 400, "error": {"code": "invalid_request", "message": "output_text: too long"}}]});
    f.answer(calls[1].token, 200, failed.to_string().as_bytes())
        .unwrap();
    let again = flush_after(&mut f, 60);
    let items: Vec<Value> = again.iter().map(|c| c.json()["commits"].clone()).collect();
    assert_eq!(items.len(), 3, "two alone, one at the estimate: {items:?}");
    let at_estimate = items.iter().find(|c| c[0]["hold_id"] == "acme/s2").unwrap();
    assert_eq!(at_estimate[0]["meters"]["output_tokens"], 900);
    assert!(at_estimate[0].get("output_text").is_none());
    assert_eq!(f.metric("tollgate.settle_split"), 1);
    assert_eq!(f.metric("tollgate.settle_at_estimate"), 1);
    // The sidecar is down from now on: retried with backoff, then at the estimate, then dropped.
    let mut pending: Vec<HttpCall> = again;
    let mut rounds = 0;
    while !pending.is_empty() && rounds < 100 {
        for c in &pending {
            f.answer(c.token, 503, b"").unwrap();
        }
        pending = flush_after(&mut f, 2100);
        rounds += 1;
    }
    assert!(pending.is_empty());
    assert_eq!(
        f.metric("tollgate.settle_at_estimate"),
        3,
        "every measured commit fell back"
    );
    assert_eq!(f.metric("tollgate.settle_dropped"), 3);
    assert!(f.metric("tollgate.settle_retried") >= 15);
}

#[test]
fn a_tool_call_only_stream_sends_its_arguments_to_be_counted() {
    let mut f = load();
    let (ctx, call) = post(
        &mut f,
        "/v1/chat/completions",
        &[],
        &chat_body(r#","max_tokens":1024"#),
    );
    let sse = concat!(
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"lookup\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"q\\\":\\\"tolls\\\"}\"}}]}}]}\n\n",
        "data: [DONE]\n\n"
    );
    let calls = settle_after(
        &mut f,
        ctx,
        call.unwrap(),
        "acme/t",
        "200",
        "text/event-stream",
        sse.as_bytes(),
    );
    let c = &calls[0].json()["commits"][0];
    assert_eq!(c["output_text"], "lookup{\"q\":\"tolls\"}");
    let _ = PAUSE;
}

#[test]
fn a_decision_the_stream_outlived_is_cancelled_by_its_key() {
    let mut f = load();
    let (ctx, call) = post(&mut f, "/pay/x", &[], b"");
    let key = call.unwrap().json()["idempotency_key"].clone();
    // The deadline passes: fail closed (503), and the stream ends before the answer comes.
    f.advance_ms(150);
    f.tick().unwrap();
    assert_eq!(f.local_response(ctx).map(|r| r.status), Some(503));
    f.finish(ctx).unwrap();
    let calls = flush_after(&mut f, 60);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header(":path"), Some("/v1/cancel"));
    assert_eq!(
        calls[0].json(),
        json!({"api_key": "tg_key", "idempotency_key": key})
    );
    assert_eq!(f.metric("tollgate.decisions_cancelled"), 1);
}
